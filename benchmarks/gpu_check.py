"""The CUDA paths in one command, for the day a GPU is lent; on a CPU, a tiny form that CI runs.

No GPU was available while this project was written, so the code paths that only a GPU takes
(bf16 / fp16 autocast, the GradScaler, fused AdamW, torch.compile on CUDA, the benchmarks'
--device cuda) are checked here, all at once, with a table at the end:

  train bf16      `train.py --preset cifar10` on fake CIFAR-10 data (random images in the real
                  pickled format): its tokenizer for a few steps, then --steps generator steps of
                  the preset's model (depth 8, width 512, batch 256), --precision bf16
  train fp16      the same generator steps with --precision fp16 (autocast and the GradScaler)
  train compile   the same with --compile (bf16); the first steps, which compile, are not timed
  scan            benchmarks/scan.py --device cuda --quick (the chunked scan against the loop)
  sampling        benchmarks/generate.py --device cuda (carried state, official re-run, VAR)
  device tests    tests/test_device.py with MVAR_TEST_DEVICE=cuda (scan, sampler, training
                  step and pictures on the GPU, against their CPU / float64 references)
  quick suite     the whole quick suite, MVAR_TEST_DEVICE=cuda (CPU tests stay on the CPU)

Each row: ok or FAILED, wall seconds, and what it measured (median ms per training step, the
last training loss against the first, peak GPU memory). A failing check does not stop the
others; the exit status is 1 if any failed. Every subprocess's output is kept in --out.

    python benchmarks/gpu_check.py                 # on a CUDA machine (its time there: not measured yet)
    python benchmarks/gpu_check.py --steps 500     # more training steps per precision
    python benchmarks/gpu_check.py --tiny          # the CPU form (what CI runs): about half a minute

On a machine without CUDA the tiny form runs whatever the flags say: fp32 and bf16 training
(fp16 and the GradScaler need CUDA, the row says so), no compile, small benchmark settings, the
device tests on the CPU. SCALING_UP.md says when to run it.
"""
import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402


def write_fake_cifar(root: Path, per_batch: int, seed: int = 0) -> None:
    """CIFAR-10's python batches (5 training batches and test_batch), random images and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in data.CIFAR_FILES["train"] + data.CIFAR_FILES["test"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


def timed_training(argv: list, out: Path) -> dict:
    """train.main(argv) with the wall time of every generator step recorded (StageRun.record runs
    after the step's loss.item(), which waits for the GPU) -> the numbers of one table row."""
    times, real_record = [], runtime.StageRun.record

    def record(self, step, loss, *args, **kwargs):
        if self.kind == "generator":
            times.append(time.perf_counter())
        return real_record(self, step, loss, *args, **kwargs)
    runtime.StageRun.record = record
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        train.main(argv + ["--out_dir", str(out)])
    finally:
        runtime.StageRun.record = real_record
    history = runtime.load_checkpoint(out / "mvar.pt", "generator")["history"]
    losses = [h[1] for h in history]
    steps = [b - a for a, b in zip(times, times[1:])][len(times) // 5:]      # the first fifth: warm-up
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite training loss: {losses}")
    return {"ms_per_step": 1000 * statistics.median(steps) if steps else float("nan"),
            "first_loss": losses[0], "last_loss": losses[-1],
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run_script(cmd: list, log: Path, env=None, summary=False) -> dict:
    """A benchmark or pytest in its own process; its output goes to `log`. The row shows pytest's
    summary line (summary=True), or names the log that holds the benchmark's table."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: see {log}")
    last = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"output": last[-1][:90] if summary and last else f"its table: {log}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the CPU form: tiny sizes (default without CUDA)")
    p.add_argument("--steps", type=int, default=0, help="generator steps per precision (default 300; tiny 3)")
    p.add_argument("--out", default="", help="folder for the runs and logs (default: a temporary one)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    steps = args.steps or (3 if tiny else 300)
    device = "cuda" if cuda and not args.tiny else "cpu"
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    write_fake_cifar(out / "cifar-10-batches-py", per_batch=8 if tiny else 512)
    print(f"gpu_check: {'tiny form' if tiny else 'full'} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f", torch {torch.__version__}; runs and logs in {out}")

    # --- training: the cifar10 preset (tiny: a depth-1, width-64 generator, batches of 8) -------
    size = (["--tok_ch", "32", "--tok_batch", "8", "--depth", "1", "--width", "64", "--num_heads", "2",
             "--gen_batch", "8", "--samples_per_class", "1"] if tiny else ["--tok_epochs", "0.25"])
    base = ["--preset", "cifar10", "--data_dir", str(out), "--device", device, "--gen_steps", str(steps),
            "--log_every", "1", "--num_workers", "0", "--eval_images", "64", *size]
    if tiny:
        base += ["--tok_epochs", "0.1"]
    first = out / "train_bf16"
    checks = [("train bf16", lambda: timed_training(base + ["--precision", "bf16"], first))]

    def generator_only(name, extra):
        def run():
            run_dir = out / name.replace(" ", "_")
            run_dir.mkdir(exist_ok=True)
            for f in ("tokenizer.pt", "tokens.pt"):              # the same tokenizer and token cache
                shutil.copy(first / f, run_dir / f)
            return timed_training(base + ["--stage", "generator", *extra], run_dir)
        return run
    checks.append(("train fp16", generator_only("train fp16", ["--precision", "fp16"]) if device == "cuda"
                   else None))
    checks.append(("train fp32", generator_only("train fp32", ["--precision", "fp32"])))
    checks.append(("train compile", generator_only("train compile", ["--precision", "bf16", "--compile"])
                   if device == "cuda" else None))

    # --- the benchmarks, and the tests that take a device ---------------------------------------
    py = sys.executable
    bench = ROOT / "benchmarks"
    scan = ["--quick"] if not tiny else ["--lengths", "64", "--chunks", "32", "--repeats", "1", "--batch", "1",
                                         "--heads", "2", "--headdim", "8", "--dstate", "8"]
    gen = (["--depth", "16", "--width", "1024", "--batch", "16"] if not tiny else
           ["--depth", "1", "--width", "64", "--batch", "1", "--repeats", "1", "--pyramids", "256px"])
    env = {"MVAR_TEST_DEVICE": device}
    checks += [
        ("scan", lambda: run_script([py, str(bench / "scan.py"), "--device", device, *scan], out / "scan.log")),
        ("sampling", lambda: run_script([py, str(bench / "generate.py"), "--device", device, *gen],
                                        out / "generate.log")),
        ("device tests", lambda: run_script([py, "-m", "pytest", "-q", "tests/test_device.py"],
                                            out / "device_tests.log", env, summary=True)),
        ("quick suite", (lambda: run_script([py, "-m", "pytest", "-q"], out / "quick_suite.log", env,
                                            summary=True)) if not tiny else None),
    ]

    rows, failed = [], False
    for name, check in checks:
        t0 = time.perf_counter()
        if check is None:
            rows.append((name, "skipped", 0.0, "needs CUDA" if name in ("train fp16", "train compile")
                         else "the tiny form leaves it to CI's own run"))
            continue
        try:
            r = check()
            what = r.get("output") or (f"{r['ms_per_step']:.1f} ms/step, loss {r['first_loss']:.3f} -> "
                                       f"{r['last_loss']:.3f}" + (f", peak {r['peak_gpu_mb']:.0f} MB"
                                                                  if r["peak_gpu_mb"] else ""))
            rows.append((name, "ok", time.perf_counter() - t0, what))
        except Exception as e:                      # report it and go on with the other checks
            failed = True
            rows.append((name, "FAILED", time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200]))
        print(f"  {name}: {rows[-1][1]} ({rows[-1][2]:.0f} s)", flush=True)

    print(f"\n{'check':14s} {'result':7s} {'wall s':>7s}  measured")
    for name, status, seconds, what in rows:
        print(f"{name:14s} {status:7s} {seconds:7.1f}  {what}")
    runtime.write_json({"device": device, "tiny": tiny, "steps": steps, "torch": torch.__version__,
                        "rows": [dict(zip(("check", "result", "seconds", "measured"), r)) for r in rows]},
                       out / "gpu_check.json")
    print(f"\nwrote {out / 'gpu_check.json'}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
