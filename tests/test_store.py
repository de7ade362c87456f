"""The activation store: round trip against the model, resume after SIGKILL, shuffling, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_lm
from saelab import ActivationStore, SaelabError, cache_activations
from saelab.activations import batch_indices
from saelab.activations.order import BLOCK_ROWS, WINDOW_ROWS
from saelab.activations.store import VERIFIED, shard_name
from saelab.training import TrainingData

SITES = ("blocks.1.hook_resid_post", "blocks.0.mlp.hook_post")
SETTINGS = dict(model="tiny", sites=SITES, tokens=1000, context_size=32, batch_size=4,
                shard_tokens=300)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return tiny_lm("llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def stores(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    return out, cache_activations(out, lm=lm, **SETTINGS)


def test_rows_equal_the_model_read_at_their_window_and_position(lm, stores):
    _, by_site = stores
    for site in SITES:
        store = by_site[site]
        assert len(store) == SETTINGS["tokens"] and store.site == site
        # 300 rows per shard round down to 2 batches of 4 windows of 31 rows: 248
        assert [s["rows"] for s in store.manifest["shards"]] == [248, 248, 248, 248, 8]
        tokens = store.token_ids()
        assert (tokens[:, 0] == lm.bos_token_id).all()
        expected = lm.read(torch.from_numpy(tokens.astype(np.int64)), [site])[site]
        expected = expected[:, 1:].reshape(-1, store.d_model)[: SETTINGS["tokens"]]  # no BOS
        torch.testing.assert_close(store[:], expected, atol=1e-5, rtol=0)
        for row in (0, 30, 31, 999):
            ctx = store.context(row)
            assert (ctx.window, ctx.position) == (row // 31, row % 31 + 1)
            torch.testing.assert_close(store[row], expected[row])


def test_manifest_statistics_match_a_float64_reference(stores, lm):
    _, by_site = stores
    store = by_site[SITES[0]]
    x = store[:].double()
    norm = store.normalisation
    np.testing.assert_allclose(norm["mean"], x.mean(0).numpy(), rtol=1e-9, atol=1e-9)
    sq = (x**2).sum(1).mean().item()
    assert norm["mean_squared_norm"] == pytest.approx(sq, rel=1e-9)
    assert norm["mean_centered_squared_norm"] == pytest.approx(
        ((x - x.mean(0)) ** 2).sum(1).mean().item(), rel=1e-6)
    assert norm["norm_scale"] == pytest.approx((store.d_model / sq) ** 0.5, rel=1e-9)
    assert store.manifest["model_fingerprint"] == lm.fingerprint()  # hashlib: test_loading
    store.verify(force=True)  # every shard hashed again: checksums as written


def test_shuffled_batches_are_a_seeded_partition(stores):
    store = stores[1][SITES[0]]
    everything = store[:]

    def multiset(rows: torch.Tensor) -> list[bytes]:  # rows as a sorted list of their bytes
        return sorted(r.numpy().tobytes() for r in rows)

    def run(**kw) -> torch.Tensor:
        return torch.cat(list(store.batches(64, **kw)))

    once, again, other = run(seed=3), run(seed=3), run(seed=4)
    assert torch.equal(once, again) and not torch.equal(once, other)
    assert not torch.equal(run(seed=3, epoch=1), once)  # each epoch its own order
    assert not torch.equal(once, everything)  # really shuffled
    assert multiset(once) == multiset(everything)  # every row exactly once
    sizes = [len(b) for b in store.batches(64, seed=0, drop_last=True)]
    assert set(sizes) == {64} and len(sizes) == len(store) // 64
    assert torch.equal(torch.cat(list(store.batches(100, shuffle=False))), everything)


@pytest.mark.parametrize(("batch_size", "world_size"), [(37, 2), (64, 3), (1000, 4)])
def test_the_order_does_not_depend_on_the_number_of_processes(stores, batch_size, world_size):
    """Rank r of w gets a slice of each global batch, so the ranks together read exactly what
    one process reads, batch for batch (torchrun training relies on it)."""
    store = stores[1][SITES[0]]
    whole = list(store.batches(batch_size, seed=5))
    parts = [list(store.batches(batch_size, seed=5, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert all(len(p) == len(whole) for p in parts)
    for b, batch in enumerate(whole):
        torch.testing.assert_close(torch.cat([p[b] for p in parts]), batch, rtol=0, atol=0)


def test_the_order_keeps_blocks_together_inside_windows():
    """What the order promises, checked from its output alone: a partition of the rows, in
    which each window of WINDOW_ROWS positions holds whole blocks of BLOCK_ROWS contiguous
    rows (reads stay mostly sequential), shuffled inside the window, seeded by (seed, epoch)."""
    n, bs = 3 * WINDOW_ROWS + 5 * BLOCK_ROWS, 512  # whole blocks (a short one shifts windows)
    order = np.concatenate(list(batch_indices(n, bs, seed=1, drop_last=False)))
    assert np.array_equal(np.sort(order), np.arange(n))
    for at in range(0, n, WINDOW_ROWS):
        window = order[at:at + WINDOW_ROWS]
        _, counts = np.unique(window // BLOCK_ROWS, return_counts=True)
        assert (counts == BLOCK_ROWS).all()  # every block it touches, whole
        assert (np.diff(window) != 1).mean() > 0.9  # and shuffled inside
    assert len(set(np.unique(order[:WINDOW_ROWS] // BLOCK_ROWS)) - set(range(64))) > 0
    again = np.concatenate(list(batch_indices(n, bs, seed=1, drop_last=False)))
    other = np.concatenate(list(batch_indices(n, bs, seed=1, epoch=1, drop_last=False)))
    assert np.array_equal(order, again) and not np.array_equal(order, other)
    assert len(list(batch_indices(n, bs, seed=1))) == n // bs


def test_training_reads_the_stores_own_order(stores):
    """One order: TrainingData's batches are the store's, row for row (full batches)."""
    store = stores[1][SITES[0]]
    data = TrainingData(store)
    for epoch in (0, 2):
        expected = [store[:][index] for index in data.global_batches(64, 11, epoch)]
        got = list(store.batches(64, seed=11, epoch=epoch, drop_last=True))
        assert len(got) == len(expected) == len(store) // 64
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    resumed = list(batch_indices(len(store), 64, seed=11, epoch=0, start=5))
    assert all(np.array_equal(a, b) for a, b in
               zip(resumed, list(batch_indices(len(store), 64, seed=11, epoch=0))[5:],
                   strict=True))


def test_re_running_a_finished_cache_reuses_it(stores, lm):
    out, by_site = stores
    before = {p: p.stat().st_mtime_ns for p in by_site[SITES[0]].path.iterdir()}
    cache_activations(out, lm=lm, **SETTINGS)
    assert before == {p: p.stat().st_mtime_ns for p in by_site[SITES[0]].path.iterdir()}


def _cache_cmd(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "saelab", "cache", "--model", str(model_dir), "--out", str(out),
            "--site", "blocks.1.hook_resid_post", "--tokens", "60000", "--context-size", "64",
            "--batch-size", "4", "--shard-tokens", "500"]


def test_sigkill_then_resume_gives_an_identical_store(tiny_model_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cache_cmd(tiny_model_dir, whole), check=True, capture_output=True)
    proc = subprocess.Popen(_cache_cmd(tiny_model_dir, killed), stderr=subprocess.DEVNULL)
    site_dir = killed / "blocks.1.hook_resid_post"
    deadline = time.time() + 120
    while not (site_dir / shard_name(3)).exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (site_dir / "manifest.json").exists()  # it really was cut off mid-run
    subprocess.run(_cache_cmd(tiny_model_dir, killed), check=True, capture_output=True)
    names = sorted(p.name for p in (whole / site_dir.name).iterdir())
    assert names == sorted(p.name for p in site_dir.iterdir())  # no leftover temp files
    for name in names:
        if name == VERIFIED:  # a local record of file mtimes, not the store's content
            continue
        assert (whole / site_dir.name / name).read_bytes() == (site_dir / name).read_bytes(), name


def test_truncated_and_corrupt_shards_are_refused(stores, tmp_path):
    import shutil

    src = stores[1][SITES[0]].path
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip the bits of the last byte
    shard.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="corrupt"):
        ActivationStore(bad)  # opening checks, since the file changed after it was recorded
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SaelabError, match="missing or truncated"):
        ActivationStore(bad)


def test_verification_is_recorded_and_redone_only_for_changed_shards(stores, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stores[1][SITES[0]].path, bad)
    recorded = json.loads((bad / VERIFIED).read_text())  # the writer recorded every shard
    assert sorted(recorded) == [e["file"] for e in ActivationStore(bad).manifest["shards"]]
    shard = bad / shard_name(2)
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a flip that keeps the mtime
    store = ActivationStore(bad)  # not re-hashed: recorded, and unchanged to all appearances
    with pytest.raises(SaelabError, match="corrupt"):
        store.verify(force=True)  # ... but a forced check reads every byte


def test_non_finite_activations_are_refused(tiny_tokenizer, tmp_path):
    lm = tiny_lm("llama", tiny_tokenizer)
    with torch.no_grad():
        lm.hf_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(SaelabError, match="non-finite"):
        cache_activations(tmp_path, lm=lm, model="tiny", sites=("blocks.1.hook_resid_post",),
                          tokens=100, context_size=16)


def test_a_store_of_another_model_or_site_is_refused(stores, lm):
    out, by_site = stores
    store = by_site[SITES[0]]
    store.require(model="tiny", site=SITES[0], fingerprint=lm.fingerprint(), d_model=64)
    with pytest.raises(SaelabError, match="another site"):
        store.require(site="blocks.0.hook_resid_post")
    with pytest.raises(SaelabError, match="another model"):
        store.require(model="gemma-3-270m")
    with pytest.raises(SaelabError, match="another width"):
        store.require(d_model=640)
    with pytest.raises(SaelabError, match="made with other settings") as err:
        cache_activations(out, lm=lm, **{**SETTINGS, "sites": ("blocks.0.hook_resid_pre",)})
    assert "blocks.0.hook_resid_pre" in str(err.value)
    with pytest.raises(SaelabError, match="site folders"):
        ActivationStore(out)  # two sites: which one?
    assert ActivationStore(out, site=SITES[1]).site == SITES[1]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_two_ranks_under_torchrun_write_the_same_store(tiny_model_dir, tmp_path):
    args = _cache_cmd(tiny_model_dir, tmp_path / "ddp")[3:]
    args[args.index("60000")] = "6000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29517", "-m", "saelab", *args], check=True,
                   capture_output=True, env=env)
    args[args.index(str(tmp_path / "ddp"))] = str(tmp_path / "one")
    subprocess.run([sys.executable, "-m", "saelab", *args], check=True, capture_output=True)
    one = ActivationStore(tmp_path / "one")
    ddp = ActivationStore(tmp_path / "ddp")
    assert [s["sha256"] for s in one.manifest["shards"]] == \
        [s["sha256"] for s in ddp.manifest["shards"]]
    assert len(one.manifest["shards"]) > 2
