"""Benchmark: this checkout's scan and Mamba-2 layer against another checkout's, side by side.

A change to mvar.py's scan is often worth 10-20%, and on a shared or virtual machine two runs of
benchmarks/scan.py a minute apart differ by about as much. So this script imports both versions
of mvar.py into one process and times them interleaved (one call of each, in turn, 21 times;
the median of each), so that a slow moment of the machine slows both alike. It prints each
case's two medians and their ratio, and checks that both versions give the same output.

    git worktree add /tmp/before HEAD~1               # the code to compare against
    python benchmarks/compare_scan.py /tmp/before --threads 1

Cases (fp32, random inputs, chunk 64): exp(segsum(a)) alone at the shape the scan gives it for
L = 680 (8, 1, 8, 11 chunks, 62); the scan alone at the 256px pyramid's L = 680 (B=8, H=8, P=64,
N=64) and at the fashion-mnist preset's L = 88 (B=32, H=8, P=32, N=16); forward and forward +
backward; and a whole Mamba2 layer (width 128, d_state 16, headdim 32) forward + backward at
L = 88. Run it two or three times: the ratio is what should repeat.
"""
import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch


def load_mvar(checkout: Path, name: str):
    """Import checkout/mvar.py as a module called `name` (two versions can then live side by side)."""
    path = checkout / "mvar.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass the folder of a checkout of this project")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def segsum_case(backward):
    """-> run(mvar_module) -> output, for the scan's decay matrices exp(segsum(a)) at L = 680."""
    a = -0.5 * torch.rand(8, 1, 8, 11, 62, generator=torch.Generator().manual_seed(0))

    def run(mvar):
        a_ = a.clone().requires_grad_(backward)
        decay = torch.exp(mvar.segsum(a_))
        if backward:
            decay.sum().backward()
        return decay.detach()
    return run


def scan_case(b, L, H, P, N, backward):
    """-> run(mvar_module) -> output, for the scan alone on fixed random inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, L, H, P, generator=gen)
    dt = 0.01 + 0.1 * torch.rand(b, L, H, generator=gen)
    A = -(0.5 + torch.rand(H, generator=gen))
    B, C = torch.randn(b, L, 1, N, generator=gen), torch.randn(b, L, 1, N, generator=gen)

    def run(mvar):
        xs = x.clone().requires_grad_(backward)
        y, _ = mvar.ssd_scan_parallel(xs, dt, A, B, C, torch.ones(H), chunk_size=64)
        if backward:
            y.square().sum().backward()
        return y.detach()
    return run


def layer_case(layers, u0):
    """-> run(mvar_module) -> output, for one Mamba2 layer (same weights in both versions), fwd+bwd."""
    def run(mvar):
        u = u0.clone().requires_grad_(True)
        y, _ = layers[mvar.__name__](u)
        y.square().sum().backward()
        return y.detach()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("baseline", type=Path, help="folder of the checkout to compare against")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=21, help="interleaved calls of each version")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"baseline": load_mvar(args.baseline, "baseline"),
                "this": load_mvar(Path(__file__).resolve().parents[1], "this")}

    torch.manual_seed(0)
    layers = {"baseline": versions["baseline"].Mamba2(128, d_state=16, headdim=32)}
    layers["this"] = versions["this"].Mamba2(128, d_state=16, headdim=32)
    layers["this"].load_state_dict(layers["baseline"].state_dict())
    cases = [("exp(segsum) L=680 fwd", segsum_case(False)),
             ("exp(segsum) L=680 fwd+bwd", segsum_case(True)),
             ("scan L=680 fwd", scan_case(8, 680, 8, 64, 64, False)),
             ("scan L=680 fwd+bwd", scan_case(8, 680, 8, 64, 64, True)),
             ("scan L=88 fwd", scan_case(32, 88, 8, 32, 16, False)),
             ("scan L=88 fwd+bwd", scan_case(32, 88, 8, 32, 16, True)),
             ("Mamba2 layer L=88 fwd+bwd", layer_case(layers, torch.randn(32, 88, 128)))]

    print(f"baseline: {args.baseline.resolve()}   threads {args.threads}, {args.reps} interleaved "
          f"calls each, torch {torch.__version__}")
    print(f"{'case':28s} {'baseline ms':>12s} {'this ms':>9s} {'this/baseline':>14s} {'max rel diff':>13s}")
    for name, run in cases:
        times = {k: [] for k in versions}
        outputs = {k: run(m) for k, m in versions.items()}            # untimed warm-up
        for _ in range(args.reps):
            for k, m in versions.items():
                t0 = time.perf_counter()
                run(m)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        diff = ((outputs["this"] - outputs["baseline"]).abs().max()
                / outputs["baseline"].abs().max()).item()
        print(f"{name:28s} {med['baseline']:12.1f} {med['this']:9.1f} "
              f"{med['this'] / med['baseline']:13.2f}x {diff:13.1e}")


if __name__ == "__main__":
    main()
