"""`saelab demo --quick` end to end on the real embedded default (what `make demo` runs, smaller)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from saelab import ActivationStore


@pytest.mark.gguf
def test_quick_demo_caches_real_gemma_activations(tmp_path):
    out = subprocess.run([sys.executable, "-m", "saelab", "demo", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    store = ActivationStore(tmp_path / "activations")
    assert (store.model, store.site, store.d_model) == ("gemma-3-270m", "blocks.6.hook_resid_post",
                                                        640)
    assert len(store) == 4000 and str(store.path) in out.stdout
    x = store[:].numpy()
    assert np.isfinite(x).all() and (np.linalg.norm(x, axis=1) > 1).all()
    store.verify()
