"""GPU check: what no test exercises without a CUDA device, checked against the CPU, timed.

    .venv/bin/python benchmarks/gpu.py [--out FILE] [--quick]

On one NVIDIA GPU (a CUDA torch in `.venv`, see benchmarks/README.md, "gpu.py"), a few
minutes in all:

1. the GPU's own floor: float32 (TF32 off) and bfloat16 GEMMs of [4096, 640] x [640, 16384];
2. every pursuit (mp, gp, omp, signed and non-negative) with the Gram path forced on and off:
   supports and values against the same coder on the CPU (the bf16 screen's CUDA branch runs
   where the Gram path does not);
3. a few training steps of every registered built-in architecture on the GPU (fused Adam)
   against the same steps on the CPU: the losses step by step and the weights at the end;
   a dictionary moved between the devices codes the same;
4. one training run under `torchrun` with the NCCL backend (one process);
5. activations cached with the model in bfloat16 on the GPU against float32 on the CPU;
6. a small `compare` on the GPU against the same on the CPU.

Every check prints a line (ok / FAILED, with the measured difference and the tolerance); the
exit status is 1 if any failed, 2 without a CUDA device. It writes JSON (`--out`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import saelab as sl
from saelab.coding import Coder
from saelab.evals import CompareConfig
from saelab.evals import compare as run_compare

ROOT = Path(__file__).resolve().parent
N_LATENTS, D_MODEL, K = 16384, 640, 32
SITE = "blocks.6.hook_resid_post"
checks: list[dict[str, Any]] = []
DEVICE = "cuda"  # --dry-run-on-cpu sets "cpu": the script's own test, every check CPU v CPU


def check(name: str, value: float, tolerance: float, **extra: Any) -> None:
    """Record and print one comparison: ok when `value` <= `tolerance`."""
    ok = bool(value <= tolerance)
    checks.append({"check": name, "value": value, "tolerance": tolerance, "ok": ok, **extra})
    print(f"  {'ok' if ok else 'FAILED':6} {name}: {value:.3g} (tolerance {tolerance:g})"
          + "".join(f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}"
                    for k, v in extra.items()), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], Any], reps: int = 5) -> float:
    """Best seconds of `fn` on the GPU (synchronised), after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_floor() -> dict[str, float]:
    """FLOP/s of the encoder's GEMM in float32 (TF32 off, as saelab runs) and bfloat16."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(4096, D_MODEL, device=DEVICE, dtype=dtype)
        b = torch.randn(D_MODEL, N_LATENTS, device=DEVICE, dtype=dtype)
        seconds = cuda_time(lambda a=a, b=b: a @ b, reps=20)
        out[f"{name}_tflops"] = 2 * a.shape[0] * D_MODEL * N_LATENTS / seconds / 1e12
        print(f"  {name} GEMM [4096,{D_MODEL}]x[{D_MODEL},{N_LATENTS}]: {seconds * 1e3:.2f} ms, "
              f"{out[f'{name}_tflops']:.1f} TFLOP/s", flush=True)
    return out


def planted(n_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(a unit-norm dictionary [N_LATENTS, D_MODEL], rows that are sparse mixtures of it)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(N_LATENTS, D_MODEL, generator=g), dim=1)
    idx = torch.randint(N_LATENTS, (n_rows, K), generator=g)
    mags = torch.rand(n_rows, K, generator=g) + 0.5
    x = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=mags, mode="sum")
    return W, x + 0.05 * torch.randn(n_rows, D_MODEL, generator=g)


def pursuits(n_rows: int) -> list[dict[str, Any]]:
    W, x = planted(n_rows)
    W_gpu, x_gpu = W.to(DEVICE), x.to(DEVICE)
    rows = []
    for method in ("mp", "gp", "omp"):
        for nonnegative in (False, True):
            cpu = Coder(W, method, k=K, nonnegative=nonnegative)(x)
            for gram in (True, False):
                coder = Coder(W_gpu, method, k=K, nonnegative=nonnegative, gram=gram)
                seconds = cuda_time(lambda c=coder: c(x_gpu), reps=3)
                gpu = coder(x_gpu)
                same = _support_agreement(cpu, gpu)
                err = float((gpu.decode(W_gpu).cpu() - cpu.decode(W)).norm()
                            / cpu.decode(W).norm())
                label = f"{method}{' nonneg' if nonnegative else ''} gram={gram}"
                check(f"pursuit {label}: rows whose support differs from the CPU's",
                      1 - same, 0.01, reconstruction_rel_diff=err,
                      tokens_per_s=n_rows / seconds)
                check(f"pursuit {label}: reconstruction against the CPU's (relative)", err, 1e-3)
                rows.append({"method": method, "nonnegative": nonnegative, "gram": gram,
                             "seconds": seconds, "tokens_per_s": n_rows / seconds,
                             "support_agreement": same, "rel_diff": err})
    # a dictionary moved to the GPU and back codes as it did
    back = Coder(W_gpu.cpu(), "gp", k=K)(x)
    check("a dictionary moved cuda -> cpu codes the same (max |values| diff)",
          float((back.values - Coder(W, "gp", k=K)(x).values).abs().max()), 0.0)
    return rows


def _support_agreement(a: Any, b: Any) -> float:
    """Share of rows whose sets of chosen latents are equal."""
    sa = a.indices.cpu().sort(dim=1).values
    sb = b.indices.cpu().sort(dim=1).values
    return float((sa == sb).all(dim=1).double().mean())


def training(steps: int) -> list[dict[str, Any]]:
    """`steps` steps of each architecture on the same rows, CPU then GPU."""
    _, x = planted(steps * 1024, seed=1)
    rows = []
    for arch in ("topk", "batchtopk", "jumprelu", "relu"):
        results = []  # [cpu, device] (both "cpu" in a dry run)
        for device in ("cpu", DEVICE):
            cfg = sl.TrainConfig(architecture=arch, n_latents=4096, k=K, tokens=len(x),
                                 batch_size=1024, device=device, log_every=1,
                                 lr_warmup_steps=1, sparsity_warmup_steps=1)
            with tempfile.TemporaryDirectory() as run:
                t0 = time.perf_counter()
                sae = sl.train(cfg, x, out=run)
                seconds = time.perf_counter() - t0
                losses = [json.loads(line)["loss"]
                          for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in line]
            results.append((sae.to("cpu"), losses, seconds))
        (cpu, l_cpu, t_cpu), (gpu, l_gpu, t_gpu) = results
        loss_diff = max(abs(a - b) / abs(a) for a, b in zip(l_cpu, l_gpu, strict=True))
        w_diff = float((gpu.W_dec - cpu.W_dec).norm() / cpu.W_dec.norm())
        check(f"train {arch}: losses step by step against the CPU's (max relative)",
              loss_diff, 1e-3, steps=len(l_cpu), cpu_s=t_cpu, gpu_s=t_gpu)
        check(f"train {arch}: W_dec at the end against the CPU's (relative)", w_diff, 1e-2)
        rows.append({"architecture": arch, "loss_rel_diff": loss_diff, "W_dec_rel_diff": w_diff,
                     "cpu_s": t_cpu, "gpu_s": t_gpu})
    return rows


def nccl(work: Path) -> None:
    """`saelab train` under torchrun (one process) on the cached store: the NCCL start-up and
    all-reduce path."""
    store = work / "cpu-cache" / SITE
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    saelab = str(Path(sys.executable).with_name("saelab"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=1", saelab, "train",
           "--activations", str(store), "--architecture", "topk", "--n-latents", "1024",
           "--k", "16", "--tokens", str(len(sl.ActivationStore(store))), "--batch-size", "1024",
           "--device", DEVICE, "--out", str(work / "nccl-run")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ok = done.returncode == 0 and (work / "nccl-run" / "cfg.json").is_file()
    check("torchrun + NCCL: one-process training run exits 0 with its SAE written",
          0.0 if ok else 1.0, 0.0, seconds=time.perf_counter() - t0)
    if not ok:
        print(done.stderr[-2000:])


def caching(work: Path, tokens: int) -> None:
    """The same windows cached on the CPU in float32 and on the GPU with a bfloat16 model."""
    cpu = sl.cache_activations(work / "cpu-cache", sites=(SITE,), tokens=tokens)[SITE]
    t0 = time.perf_counter()
    gpu = sl.cache_activations(work / "gpu-cache", sites=(SITE,), tokens=tokens,
                               model_dtype="bfloat16", device=DEVICE)[SITE]
    seconds = time.perf_counter() - t0
    a, b = cpu[:], gpu[:].float()
    err = float((b - a).norm() / a.norm())
    check("cache: bfloat16 model on the GPU against float32 on the CPU (relative)", err, 0.05,
          tokens_per_s=tokens / seconds)


def compare(work: Path, tokens: int) -> None:
    """A small `compare` of a TopK SAE on the GPU and on the CPU: delta loss per coder."""
    store = sl.ActivationStore(work / "cpu-cache" / SITE)
    sl.train(sl.TrainConfig(architecture="topk", n_latents=2048, k=K, tokens=len(store),
                            batch_size=1024), store, work / "sae")
    results = []  # [cpu, device]
    for run, device in enumerate(("cpu", DEVICE)):  # two folders even in a dry run
        cfg = CompareConfig(sae=str(work / "sae"), out=work / f"compare-{run}", site=SITE,
                               tokens=tokens, fit_tokens=tokens, skip_tokens=len(store),
                               k=(K,), coders=("encoder", "gp", "omp"), device=device)
        t0 = time.perf_counter()
        results.append((run_compare(cfg), time.perf_counter() - t0))
    (cpu, t_cpu), (gpu, t_gpu) = results
    for row_cpu, row_gpu in zip(cpu["rows"], gpu["rows"], strict=True):
        diff = abs(row_gpu["delta_loss"] - row_cpu["delta_loss"])
        check(f"compare {row_cpu['coder']} k={row_cpu.get('k')}: delta loss, GPU - CPU (nats)",
              diff, 0.01 + 0.002 * abs(row_cpu["delta_loss"]), cpu_s=t_cpu, gpu_s=t_gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu.json",
                        help="where the JSON goes (default benchmarks/results/gpu.json)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows everywhere (a minute or two)")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="run every step with the CPU standing in for the GPU (checks the "
                             "script itself, not the GPU)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.dry_run_on_cpu else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu.py needs a CUDA device: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}); install a CUDA torch into .venv (benchmarks/README.md, "
              "gpu.py) on a machine with an NVIDIA GPU")
        sys.exit(2)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}", flush=True)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("GEMM floor", flush=True)
        result["gemm"] = gemm_floor()
        print("pursuits, GPU against CPU", flush=True)
        result["pursuits"] = pursuits(1024 if args.quick else 4096)
        print("training, GPU against CPU", flush=True)
        result["training"] = training(3 if args.quick else 6)
        print("caching activations", flush=True)
        caching(work, 4096 if args.quick else 16384)
        print("torchrun + NCCL", flush=True)
        nccl(work)
        print("compare, GPU against CPU", flush=True)
        compare(work, 1024 if args.quick else 4096)
    result["checks"] = checks
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks ok; wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
