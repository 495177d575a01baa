"""Benchmark: the sequential SSM loop vs the chunked parallel scan (mvar.py section 1).

Prints, for each sequence length L and each method (loop = ssd_scan_sequential; chunk Q =
ssd_scan_parallel with chunk_size Q; matmuls Q = its four matmuls alone, see below; with
--compile, compiled Q = ssd_scan_parallel under torch.compile, its compilation not timed), the
median wall time and the peak memory of a forward pass (under torch.no_grad, as when sampling)
and of a forward + backward pass (as in training), the loop / parallel ratios, and a lower bound
("floor") for the parallel scan on this machine, with how far above it each chunked case is.

    python benchmarks/scan.py                 # default: B=8 H=8 P=64 N=64 fp32, L=130,680,2240
    python benchmarks/scan.py --quick         # L=130,680, chunk 64 only, fewer repeats
    python benchmarks/scan.py --threads 1     # fairer on a machine shared with other jobs
    python benchmarks/scan.py --quick --compile   # + the scan under torch.compile
    python benchmarks/scan.py --lengths 680 --chunks 32 64   # chosen lengths and chunk sizes
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/scan.py   # see "Allocator" below

Time: median of up to --repeats runs after one untimed run; a case stops repeating once it has
used --budget seconds, and is stopped after --timeout seconds (shown as ">"): the loop at
L=2240 with backward allocates ~7 GB and takes from a minute to several on a busy 2-core VM.
The default table takes 3-6 minutes on a busy 2-core VM. On a machine shared with other jobs,
2 threads that wait on each other are slowed far more than 1, and the loop (thousands of small ops) more
than the parallel scan (a few large ones): --threads 1 gives the fairer ratio there.

How memory is measured. torch allocates CPU tensors with the C allocator, which Python's
tracemalloc does not see, so the script measures the process itself. Every case runs in a fresh
subprocess, which first runs a tiny version of the same case (loading kernels and thread pools)
and builds the inputs, then resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs, Linux >= 4.0), notes the resident set size, runs the case once, and reads
the peak (VmHWM in /proc/self/status). Peak minus start is the memory the case needed on top of
its inputs: activations kept for backward, temporaries, gradients. It can only under-count a
little (pages the allocator already held and reused), or over-count what the tensors need by
the allocator's fragmentation (which is real memory all the same). On CUDA:
torch.cuda.max_memory_allocated.

The floor. A rough lower bound for the time of the chunked algorithm: max(FLOPs / matmul rate,
bytes / memory bandwidth), with the rate and bandwidth measured on this machine right before the
table (a large matmul, a large copy). FLOPs counted: the four matmul steps of ssd_scan_parallel
(C B^T per group, the (Q,Q) mix applied to x, chunk states, carried state applied to C); backward
~2x forward. Bytes: reading x, dt, B, C and writing y once (backward: ~3x that). No floor is
printed for the loop: its time is per-step overhead and, with backward, storing one (B,H,P,N)
state per step for autograd (B*H*P*N*4*L bytes: the memory column).

The floor assumes every matmul runs at the rate of one large (1024 x 1024) matmul. The scan's
matmuls are thousands of small ones (at L = 680 with chunk 64: one per sequence, head and chunk
in each of three steps, such as (62 x 62) @ (62 x 64)), which run slower. So the table also
times "matmuls Q": the same four matmuls at the same shapes and nothing else, on random tensors
already laid out in chunks. chunk Q / matmuls Q is then what the elementwise work around the
matmuls costs (decays, masks, padding, layout copies); matmuls Q / floor, what the small matmuls
cost beyond the floor's large-matmul rate. The matmuls and compiled cases are warmed up at full
size (the compiled one compiles for its shapes), so their memory column would count only what
the allocator did not already hold: it is left out ("-").

Allocator. Buffers above glibc's mmap threshold (at most 32 MB) are fresh pages from the kernel on
every allocation, and page faults can dominate; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 makes
those mappings use transparent huge pages. The script prints whether it was set.

Timings on a shared machine are noisy: compare the ratios within one run, not across runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mvar import ssd_scan_parallel, ssd_scan_sequential  # noqa: E402


def make_inputs(b, l, h, p, n, device, requires_grad):
    """Inputs in the range Mamba-2 sees at init: dt in [1e-3, 0.1], A in [-16, -1]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.099 + 0.001
    A = -(torch.rand(h, generator=gen) * 15 + 1)
    B = torch.randn(b, l, 1, n, generator=gen)
    C = torch.randn(b, l, 1, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return [t.to(device).requires_grad_(requires_grad) for t in (x, dt, A, B, C, D)]


def chunk_cut(l, q):
    """How ssd_scan_parallel cuts L tokens for chunk_size q: c equal chunks of Q <= q. -> (c, Q)"""
    c = -(-l // q)
    return c, -(-l // c)


def chunked_shapes(b, l, h, p, n, q):
    """The shapes ssd_scan_parallel multiplies, in c chunks of Q tokens (chunk_cut): C, B (per
    group), decay (the (Q, Q) mix per head), dt x, B and C scaled per head, h_in."""
    c, q = chunk_cut(l, q)
    return [(b, 1, 1, c, q, n), (b, 1, 1, c, q, n), (b, 1, h, c, q, q), (b, 1, h, c, q, p),
            (b, 1, h, c, q, n), (b, 1, h, c, q, n), (b, 1, h, c, p, n)]


def matmuls_only(C, B, decay, xdt, B_scaled, C_scaled, h_in):
    """ssd_scan_parallel's four matmuls at its shapes, and nothing else (no decays, masks, layout
    copies or padding): the time the scan would take if all its elementwise work were free."""
    return (C @ B.transpose(-1, -2),                  # 1. C B^T per group
            decay @ xdt,                              # 1. the (Q, Q) mix applied to dt x
            xdt.transpose(-1, -2) @ B_scaled,         # 2. each chunk's own state
            C_scaled @ h_in.transpose(-1, -2))        # 4. the carried-in state's output


def run_once(fn, args, backward):
    if backward:
        sum(out.sum() for out in fn(*args)).backward()
    else:
        with torch.no_grad():
            fn(*args)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def proc_status_bytes(key):
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024                     # reported in kB
    raise RuntimeError(f"{key} not in /proc/self/status: memory measurement needs Linux")


def run_case(case):
    """Child process: time one (method, L, chunk, mode) case and measure its peak memory."""
    torch.set_num_threads(case["threads"])
    dev, backward, kind = case["device"], case["mode"] == "fwd+bwd", case["kind"]
    shape = (case["b"], case["h"], case["p"], case["n"])
    if kind == "matmuls":
        fn = matmuls_only
        gen = torch.Generator().manual_seed(0)
        args = [torch.randn(s, generator=gen).to(dev).requires_grad_(backward)
                for s in chunked_shapes(shape[0], case["L"], *shape[1:], case["chunk"])]
    else:
        fn = (ssd_scan_sequential if kind == "loop"
              else lambda *a: ssd_scan_parallel(*a, chunk_size=case["chunk"]))
        run_once(fn, make_inputs(shape[0], 3, *shape[1:], dev, backward), backward)   # warm-up
        args = make_inputs(shape[0], case["L"], *shape[1:], dev, backward)
    if kind == "compiled":       # compiled for these shapes: warm up (and compile) on them
        fn = torch.compile(fn, dynamic=False)
    if kind in ("matmuls", "compiled"):
        for _ in range(2):
            run_once(fn, args, backward)
        for a in args:
            a.grad = None
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")         # peak RSS := current RSS
        base = proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    run_once(fn, args, backward)
    sync(dev)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else proc_status_bytes("VmHWM")
    # Warmed up at full size, these two cases reuse memory the allocator already holds: their
    # peak growth does not compare with the others', so it is not reported (-1: shown as "-").
    peak = -1 if kind in ("matmuls", "compiled") else peak - base
    cold = time.perf_counter() - t0
    times = []           # timed repeats; a slow case (the loop at large L) stops at the budget
    while len(times) < case["repeats"] and cold + sum(times) < case["budget_s"]:
        for a in args:
            a.grad = None
        t1 = time.perf_counter()
        run_once(fn, args, backward)
        sync(dev)
        times.append(time.perf_counter() - t1)
    times = times or [cold]
    return {"median_s": statistics.median(times), "runs": len(times), "peak_bytes": peak}


def measure_machine(device, threads):
    """Achieved matmul rate (FLOP/s) and copy bandwidth (bytes/s) on this machine, now."""
    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024, device=device)
    big = torch.randn(64 * 2**20 // 4, device=device)       # 64 MB
    out = torch.empty_like(big)
    rate, bw = 0.0, 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        t1 = time.perf_counter()
        out.copy_(big)
        sync(device)
        t2 = time.perf_counter()
        rate, bw = max(rate, 2 * 1024**3 / (t1 - t0)), max(bw, 2 * big.numel() * 4 / (t2 - t1))
    return rate, bw


def floors(b, l, h, p, n, q, rate, bw):
    """(fwd, fwd+bwd) lower-bound seconds for the chunked algorithm with chunk q."""
    c, q = chunk_cut(l, q)
    lp = c * q                                               # padded length
    flops = 2 * b * lp * q * n + 2 * b * h * lp * q * p + 2 * 2 * b * h * lp * p * n
    io = 4 * (2 * b * l * h * p + b * l * h + 2 * b * l * n)
    return max(flops / rate, io / bw), max(3 * flops / rate, 3 * io / bw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[130, 680, 2240])
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per case: stop repeating past this (then the median of fewer "
                         "runs, or the one memory-measuring run if that alone took longer)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds: a case still running is stopped and shown as '>' this")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="L=130,680, chunk 64, 3 repeats")
    ap.add_argument("--compile", action="store_true",
                    help="also time the chunked scan under torch.compile (compilation not timed)")
    ap.add_argument("--case", help=argparse.SUPPRESS)     # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.quick:
        args.lengths, args.chunks, args.repeats = [130, 680], [64], 3

    b, h, p, n = args.batch, args.heads, args.headdim, args.dstate
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    print(f"problem: B={b} H={h} P={p} N={n} fp32, device={args.device}, threads={args.threads}, "
          f"torch {torch.__version__}")
    print(f"GLIBC_TUNABLES=glibc.malloc.hugetlb=1 set: {'glibc.malloc.hugetlb=1' in tunables}"
          f" (GLIBC_TUNABLES={tunables!r})")
    rate, bw = measure_machine(args.device, args.threads)
    print(f"machine now: matmul {rate / 1e9:.0f} GFLOP/s, copy {bw / 1e9:.1f} GB/s")
    print("memory: peak growth of the process during the case (see the docstring)\n")

    methods = [("loop", "loop", 0)]
    for q in args.chunks:
        methods.append((f"chunk {q}", "chunk", q))
        if args.compile:
            methods.append((f"compiled {q}", "compiled", q))
        methods.append((f"matmuls {q}", "matmuls", q))
    hdr = (f"{'L':>5} {'method':>12} | {'fwd ms':>8} {'MB':>6} | {'fwd+bwd ms':>10} {'MB':>6} | "
           f"{'loop/this: fwd':>14} {'f+b time':>8} {'f+b mem':>7} | {'floor ms fwd, f+b':>17} | "
           f"{'this/floor: fwd, f+b':>20}")
    print(hdr)
    print("-" * len(hdr))
    for l in args.lengths:
        res = {}
        for name, kind, q in methods:
            for mode in ("fwd", "fwd+bwd"):
                case = dict(L=l, kind=kind, chunk=q, mode=mode, b=b, h=h, p=p, n=n,
                            device=args.device, threads=args.threads, repeats=args.repeats,
                            budget_s=args.budget)
                try:
                    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                         capture_output=True, text=True, check=True,
                                         timeout=args.timeout)
                    res[name, mode] = json.loads(out.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:   # a lower bound on the time, memory unknown
                    res[name, mode] = {"median_s": args.timeout, "peak_bytes": None}
        for name, _, q in methods:
            print(table_row(l, name, q, res, floors(b, l, h, p, n, q, rate, bw) if q else None),
                  flush=True)
        print()


def table_row(l, name, q, res, floor):
    """One line of the table; '>' marks a case stopped at --timeout (its time is a bound)."""
    def ms(r):
        return (">" if r["peak_bytes"] is None else "") + f"{r['median_s'] * 1e3:.1f}"

    def mb(r):
        if r["peak_bytes"] is None:
            return "?"
        return "-" if r["peak_bytes"] < 0 else f"{r['peak_bytes'] / 2**20:.0f}"

    def ratio(loop, this, key):
        stopped_loop, stopped_this = loop["peak_bytes"] is None, this["peak_bytes"] is None
        if stopped_this or (stopped_loop and key == "peak_bytes"):
            return "?"
        if key == "peak_bytes" and this[key] < 0:       # memory not reported for this case
            return "-"
        return (">" if stopped_loop else "") + f"{loop[key] / max(this[key], 1e-9):.1f}x"

    f, fb = res[name, "fwd"], res[name, "fwd+bwd"]
    lf, lfb = res["loop", "fwd"], res["loop", "fwd+bwd"]
    fl = "-" if floor is None else f"{floor[0] * 1e3:7.1f}, {floor[1] * 1e3:7.1f}"
    above = "-" if floor is None else f"{f['median_s'] / floor[0]:.1f}x, {fb['median_s'] / floor[1]:.1f}x"
    return (f"{l:>5} {name:>12} | {ms(f):>8} {mb(f):>6} | {ms(fb):>10} {mb(fb):>6} | "
            f"{ratio(lf, f, 'median_s'):>14} {ratio(lfb, fb, 'median_s'):>8} "
            f"{ratio(lfb, fb, 'peak_bytes'):>7} | {fl:>17} | {above:>20}")


if __name__ == "__main__":
    main()
