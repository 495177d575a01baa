"""Benchmark: this checkout's scan and Mamba-2 layer against another checkout's, side by side.

A change to mvar.py's scan is often worth 10-20%, and on a shared or virtual machine two runs of
benchmarks/scan.py a minute apart differ by about as much. So this script imports both versions
of mvar.py into one process and times them interleaved (one call of each, taking turns to go
first, --reps times (21); the median of each), so that a slow moment of the machine slows both alike. It
prints each case's two medians and their ratio, and the largest relative difference between
the two versions' outputs and gradients (flagged above 1e-4: a speed-up must not change them).
For the scan it also prints the floor of benchmarks/scan.py (max(FLOPs / matmul rate, bytes /
bandwidth), the rate and bandwidth measured right before the table) and this version's distance
from it.

    git worktree add /tmp/before HEAD~1               # the code to compare against
    python benchmarks/compare_scan.py /tmp/before --threads 1
    git worktree remove /tmp/before

Cases (fp32, random inputs, chunk 64): exp(segsum(a)) alone at the shape the scan gives it for
L = 680 (8, 1, 8, 11 chunks, 62); the scan alone at the 256px pyramid's L = 680 (B=8, H=8, P=64,
N=64) and at the fashion-mnist preset's L = 88 (B=32, H=4, P=32, N=16: width 128, expand 1); forward and forward +
backward (gradients of all five inputs, as in training); and a whole Mamba2 layer with the
preset's sizes (width 128, d_state 16, headdim 32, expand 1) forward + backward at L = 88.
Run it two or three times: the ratio is what should repeat.
"""
import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from scan import floors, make_inputs, measure_machine   # benchmarks/scan.py, next to this one


def load_mvar(checkout: Path, name: str):
    """Import checkout/mvar.py as a module named `name`, so that two versions live side by side."""
    path = checkout / "mvar.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass the folder of a checkout of this project")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def segsum_case(versions, backward):
    """-> run(key) -> what to compare: exp(segsum(a)) at the shape the scan gives it for L = 680,
    and with backward its gradient."""
    a = -0.5 * torch.rand(8, 1, 8, 11, 62, generator=torch.Generator().manual_seed(0))

    def run(key):
        a_ = a.clone().requires_grad_(backward)
        decay = torch.exp(versions[key].segsum(a_))
        if not backward:
            return [decay]
        decay.sum().backward()
        return [decay.detach(), a_.grad]
    return run


def scan_case(versions, b, L, H, P, N, backward):
    """-> run(key) -> what to compare: the scan's output on scan.py's random inputs, and with
    backward the gradients of all five inputs (x, dt, A, B, C), as in training."""
    *inputs, D = make_inputs(b, L, H, P, N, "cpu", requires_grad=False)

    def run(key):
        leaves = [t.clone().requires_grad_(backward) for t in inputs]
        y, _ = versions[key].ssd_scan_parallel(*leaves, D, chunk_size=64)
        if not backward:
            return [y]
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in leaves]
    return run


def layer_case(layers, u0):
    """-> run(key) -> what to compare: one Mamba2 layer's output and input gradient, fwd+bwd
    (the two versions' layers hold the same weights)."""
    def run(key):
        u = u0.clone().requires_grad_(True)
        layers[key].zero_grad(set_to_none=True)
        y, _ = layers[key](u)
        y.square().sum().backward()
        return [y.detach(), u.grad]
    return run


def max_rel_diff(these, baselines):
    """Largest |this - baseline| / max |baseline| over the tensors of one case."""
    return max(((t - b).abs().max() / b.abs().max()).item() for t, b in zip(these, baselines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("baseline", type=Path, help="folder of the checkout to compare against")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=21, help="interleaved calls of each version")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"baseline": load_mvar(args.baseline, "baseline"),
                "this": load_mvar(Path(__file__).resolve().parents[1], "this")}

    torch.manual_seed(0)                                   # the preset's Mamba, same weights
    layers = {k: m.Mamba2(128, d_state=16, headdim=32, expand=1) for k, m in versions.items()}
    layers["this"].load_state_dict(layers["baseline"].state_dict())
    rate, bw = measure_machine("cpu", args.threads)
    floor680, floor88 = (floors(*shape, 64, rate, bw) for shape in [(8, 680, 8, 64, 64),
                                                                    (32, 88, 4, 32, 16)])
    cases = [("exp(segsum) L=680 fwd", segsum_case(versions, False), None),   # name, run, floor
             ("exp(segsum) L=680 fwd+bwd", segsum_case(versions, True), None),
             ("scan L=680 fwd", scan_case(versions, 8, 680, 8, 64, 64, False), floor680[0]),
             ("scan L=680 fwd+bwd", scan_case(versions, 8, 680, 8, 64, 64, True), floor680[1]),
             ("scan L=88 fwd", scan_case(versions, 32, 88, 4, 32, 16, False), floor88[0]),
             ("scan L=88 fwd+bwd", scan_case(versions, 32, 88, 4, 32, 16, True), floor88[1]),
             ("Mamba2 layer L=88 fwd+bwd", layer_case(layers, torch.randn(32, 88, 128)), None)]

    print(f"baseline: {args.baseline.resolve()}   threads {args.threads}, {args.reps} interleaved "
          f"calls each, torch {torch.__version__}")
    print(f"machine now: matmul {rate / 1e9:.0f} GFLOP/s, copy {bw / 1e9:.1f} GB/s")
    print(f"{'case':28s} {'baseline ms':>12s} {'this ms':>9s} {'this/baseline':>14s} "
          f"{'max rel diff':>13s} {'floor ms':>9s} {'this/floor':>11s}")
    for name, run, floor in cases:
        outputs = {key: run(key) for key in versions}                 # untimed warm-up
        times = {key: [] for key in versions}
        for rep in range(args.reps):
            order = list(versions) if rep % 2 == 0 else list(versions)[::-1]   # take turns first
            for key in order:
                t0 = time.perf_counter()
                run(key)
                times[key].append(time.perf_counter() - t0)
        med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        diff = max_rel_diff(outputs["this"], outputs["baseline"])
        versus_floor = (f"{floor * 1e3:9.1f} {med['this'] / (floor * 1e3):10.1f}x" if floor
                        else f"{'-':>9s} {'-':>11s}")
        print(f"{name:28s} {med['baseline']:12.1f} {med['this']:9.1f} "
              f"{med['this'] / med['baseline']:13.2f}x {diff:13.1e} {versus_floor}"
              + ("   <- the versions disagree" if diff > 1e-4 else ""))


if __name__ == "__main__":
    main()
