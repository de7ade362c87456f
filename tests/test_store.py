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
from saelab import ActivationStore, CacheConfig, SaelabError, cache_activations
from saelab.activations.store import shard_name

SITES = ("blocks.1.hook_resid_post", "blocks.0.mlp.hook_post")


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return tiny_lm("llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def stores(lm, tmp_path_factory):
    cfg = CacheConfig(out=tmp_path_factory.mktemp("cache"), model="tiny", site=SITES,
                      tokens=1000, context_size=32, batch_size=4, shard_tokens=300)
    return cfg, cache_activations(cfg, lm=lm)


def test_rows_equal_the_model_read_at_their_window_and_position(lm, stores):
    cfg, by_site = stores
    for site in SITES:
        store = by_site[site]
        assert len(store) == cfg.tokens and store.site == site
        # 300 rows per shard round down to 2 batches of 4 windows of 31 rows: 248
        assert [s["rows"] for s in store.manifest["shards"]] == [248, 248, 248, 248, 8]
        tokens = store.token_ids()
        assert (tokens[:, 0] == lm.bos_token_id).all()
        expected = lm.read(torch.from_numpy(tokens.astype(np.int64)), [site])[site]
        expected = expected[:, 1:].reshape(-1, store.d_model)[: cfg.tokens]  # BOS excluded
        torch.testing.assert_close(store[:], expected, atol=1e-5, rtol=0)
        for row in (0, 30, 31, 999):
            ctx = store.context(row)
            assert (ctx.window, ctx.position) == (row // 31, row % 31 + 1)
            torch.testing.assert_close(store[row], expected[row])


def test_manifest_statistics_match_a_float64_reference(stores):
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
    for key in ("model", "site", "d_model", "dtype", "n_tokens", "context_size",
                "model_fingerprint", "exclude_bos"):
        assert key in store.manifest
    store.verify()  # checksums as written


def test_shuffled_batches_are_a_seeded_partition(stores):
    store = stores[1][SITES[0]]
    everything = store[:]

    def multiset(rows: torch.Tensor) -> list[bytes]:  # rows as a sorted list of their bytes
        return sorted(r.numpy().tobytes() for r in rows)

    def run(**kw) -> torch.Tensor:
        return torch.cat(list(store.batches(64, block_rows=16, buffer_rows=128, **kw)))

    once, again, other = run(seed=3), run(seed=3), run(seed=4)
    assert torch.equal(once, again) and not torch.equal(once, other)
    assert not torch.equal(once, everything)  # really shuffled
    assert multiset(once) == multiset(everything)  # every row exactly once
    ranks = [run(seed=3, rank=r, world_size=2) for r in range(2)]
    assert abs(len(ranks[0]) - len(ranks[1])) <= 2 * 16  # whole blocks, one of them short
    assert multiset(torch.cat(ranks)) == multiset(everything)
    sizes = [len(b) for b in store.batches(64, seed=0, drop_last=True)]
    assert set(sizes) == {64} and len(sizes) == len(store) // 64
    assert torch.equal(torch.cat(list(store.batches(100, shuffle=False))), everything)


def reference_batches(store: ActivationStore, batch_size: int, *, shuffle: bool, seed: int,
                      rank: int, world_size: int, block_rows: int, buffer_rows: int
                      ) -> list[torch.Tensor]:
    """The documented order, brute force on the whole store in RAM: blocks permuted and dealt
    to the ranks, each buffer of blocks sorted and its rows permuted, then cut into batches."""
    everything = store[:]
    rng = np.random.default_rng(seed)
    n_blocks = -(-len(store) // block_rows)
    blocks = (rng.permutation(n_blocks) if shuffle else np.arange(n_blocks))[rank::world_size]
    per_buffer = max(1, buffer_rows // block_rows)
    order = []
    for start in range(0, len(blocks), per_buffer):
        index = np.concatenate([np.arange(b * block_rows, min((b + 1) * block_rows, len(store)))
                                for b in np.sort(blocks[start:start + per_buffer])])
        order.append(index[rng.permutation(len(index))] if shuffle else index)
    return list(everything[np.concatenate(order)].split(batch_size))


@pytest.mark.parametrize(("shuffle", "seed", "rank", "world_size", "block_rows", "buffer_rows"), [
    (True, 0, 0, 1, 16, 128),
    (True, 7, 1, 2, 16, 100),  # buffers of 6 blocks
    (True, 3, 0, 3, 50, 1 << 18),  # one buffer; blocks cross shard boundaries (248 rows)
    (False, 0, 0, 1, 1024, 1 << 18),
    (False, 0, 1, 2, 10, 64),
])
def test_batches_follow_the_documented_order(stores, shuffle, seed, rank, world_size, block_rows,
                                             buffer_rows):
    """Training resumes by skipping batches: the order is part of the contract."""
    store = stores[1][SITES[0]]
    got = list(store.batches(37, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                             block_rows=block_rows, buffer_rows=buffer_rows))
    expected = reference_batches(store, 37, shuffle=shuffle, seed=seed, rank=rank,
                                 world_size=world_size, block_rows=block_rows,
                                 buffer_rows=buffer_rows)
    assert [len(b) for b in got] == [len(b) for b in expected]
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shuffled_batches_copy_each_row_once(stores):
    """No gathered or concatenated copies of a buffer: peak memory is about one buffer."""
    import tracemalloc

    store = stores[1][SITES[0]]
    buffer_bytes = len(store) * store.d_model * 4  # one buffer holds the whole store
    tracemalloc.start()
    try:
        n = sum(len(b) for b in store.batches(64, block_rows=16, buffer_rows=len(store)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == len(store)
    assert buffer_bytes < peak < 1.5 * buffer_bytes


def test_re_running_a_finished_cache_reuses_it(stores, lm):
    cfg, by_site = stores
    before = {p: p.stat().st_mtime_ns for p in by_site[SITES[0]].path.iterdir()}
    cache_activations(cfg, lm=lm)
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
        assert (whole / site_dir.name / name).read_bytes() == (site_dir / name).read_bytes(), name


def test_truncated_and_corrupt_shards_are_refused(stores, tmp_path):
    import shutil

    src = stores[1][SITES[0]].path
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip one bit of the last value
    shard.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="corrupt"):
        ActivationStore(bad).verify()
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SaelabError, match="missing or truncated"):
        ActivationStore(bad)


def test_non_finite_activations_are_refused(tiny_tokenizer, tmp_path):
    lm = tiny_lm("llama", tiny_tokenizer)
    with torch.no_grad():
        lm.hf_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    cfg = CacheConfig(out=tmp_path, model="tiny", site=("blocks.1.hook_resid_post",), tokens=100,
                      context_size=16)
    with pytest.raises(SaelabError, match="non-finite"):
        cache_activations(cfg, lm=lm)


def test_a_store_of_another_model_or_site_is_refused(stores, lm):
    cfg, by_site = stores
    store = by_site[SITES[0]]
    store.require(model="tiny", site=SITES[0], fingerprint=lm.fingerprint())
    with pytest.raises(SaelabError, match="another site"):
        store.require(site="blocks.0.hook_resid_post")
    with pytest.raises(SaelabError, match="another model"):
        store.require(model="gemma-3-270m")
    from dataclasses import replace

    with pytest.raises(SaelabError, match="another config") as err:
        cache_activations(replace(cfg, site=("blocks.0.hook_resid_pre",)), lm=lm)
    assert "blocks.0.hook_resid_pre" in str(err.value)
    with pytest.raises(SaelabError, match="site folders"):
        ActivationStore(cfg.out)  # two sites: which one?
    assert ActivationStore(cfg.out, site=SITES[1]).site == SITES[1]


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
