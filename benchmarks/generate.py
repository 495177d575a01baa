"""Sampling cost of M-VAR vs VAR, measured side by side (README "Measured results").

For the 256px pyramid (10 scales, L=680) and the 512px one (L=2240), at one small equal
depth/width, this prints per method: parameters, attention query-key pairs per layer, the
median time to sample the token maps of one batch (classifier-free guidance on, so the network
sees 2x the batch), the peak extra memory of a sampling run, and what each block carries from
one scale to the next at the end of sampling.

    (a) M-VAR, carrying each Mamba layer's state          (this project's sampler)
    (b) M-VAR, re-running Mamba over the whole prefix     (the official sampler, rerun_sampler.py)
    (c) VAR with a KV cache                               (the baseline)

Every case runs in its own fresh Python process, one after the other. Peak memory is measured
as in benchmarks/scan.py: after a warm-up run on one image the kernel's peak-RSS counter is
reset to the current resident size, one sampling run follows, and peak minus start is what
sampling needed on top of the model's weights. At the last scales that peak is dominated by
the top-k/top-p step over (2B, n, V) logits, the same for every method; "carried/block" is
what each block keeps between scales, where the methods differ. Time is the median of --repeats further runs. The tokenizer's
decoder is not timed: `MVAR.sample_tokens` stops at f_hat.
Use --threads 1 on a machine shared with other jobs (2 threads waiting on each other are slowed
far more than 1).

    python benchmarks/generate.py                 # depth 4, width 256, batch 4: ~2 minutes
    python benchmarks/generate.py --depth 6 --width 384 --repeats 5
    python benchmarks/generate.py --device cuda --depth 16 --width 1024 --batch 16   # on a GPU

On CUDA the clock waits for the GPU (torch.cuda.synchronize) before it is read, and "peak MB" is
the GPU memory the sampling run allocated on top of the model (torch.cuda.max_memory_allocated).
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
from mvar import MVAR, MVARConfig, attention_pairs  # noqa: E402
from tokenizer import MultiScaleVQVAE, tokenizer_config  # noqa: E402
from scan import proc_status_bytes  # noqa: E402  (benchmarks/scan.py, beside this file)
import rerun_sampler  # noqa: E402  (benchmarks/rerun_sampler.py: the official sampler's Mamba re-run)

PYRAMIDS = {"256px": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "512px": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
METHODS = {"a: M-VAR carry state": ("mvar", "carry"), "b: M-VAR re-run prefix": ("mvar", "rerun"),
           "c: VAR KV cache": ("var", "carry")}


def carried_bytes(cfg: MVARConfig, rows: int, mode: str) -> int:
    """Bytes one block carries into the next scale after the last one (float32):
    Mamba state (conv window + SSM state), or the whole prefix (re-run), or the KV cache."""
    if cfg.arch == "var":
        return 2 * rows * cfg.seq_len * cfg.width * 4                         # k and v
    if mode == "rerun":
        return rows * cfg.seq_len * cfg.width * 4                             # every Mamba input
    d_inner = cfg.expand * cfg.width
    conv = rows * (d_inner + 2 * cfg.d_state) * (cfg.d_conv - 1)
    ssm = rows * (d_inner // cfg.headdim) * cfg.headdim * cfg.d_state
    return (conv + ssm) * 4


def run_one(args) -> dict:
    """Child process: build one model and time its sampler."""
    torch.manual_seed(0)
    patch_nums = PYRAMIDS[args.pyramid]
    arch, mode = METHODS[args.method]
    # A thin tokenizer with the real quantizer (V=4096, Cvae=32, the right latent size): the
    # sampler only uses its codebook and phi convs, so the conv autoencoder width is irrelevant.
    image_size = 16 * patch_nums[-1]
    device = torch.device(args.device)
    tok = MultiScaleVQVAE(tokenizer_config("var256", ch=32, image_size=image_size,
                                           patch_nums=patch_nums)).eval().to(device)
    cfg = MVARConfig(arch=arch, depth=args.depth, width=args.width, num_heads=args.width // 64,
                     patch_nums=patch_nums)
    model = MVAR(cfg).eval().to(device)
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    sampler = rerun_sampler.sample_tokens if mode == "rerun" else MVAR.sample_tokens
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def sample(labels):
        g = torch.Generator(device=device).manual_seed(0)
        sync()
        t0 = time.perf_counter()
        sampler(model, tok, labels, guidance=1.5, top_k=900, top_p=0.96, generator=g)
        sync()
        return time.perf_counter() - t0

    sample(labels[:1])            # warm-up on one image (kernels, thread pools), small footprint
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        sample(labels)
        peak = torch.cuda.max_memory_allocated() - start
    else:
        Path("/proc/self/clear_refs").write_text("5")             # peak RSS := current RSS
        rss0 = proc_status_bytes("VmRSS")
        sample(labels)
        peak = proc_status_bytes("VmHWM") - rss0
    times = [sample(labels) for _ in range(args.repeats)]
    return {"params": sum(p.numel() for p in model.parameters()),
            "pairs": attention_pairs(patch_nums, arch), "seconds": statistics.median(times),
            "peak_mb": max(peak, 0) / 2**20,
            "carried_mb": carried_bytes(cfg, 2 * args.batch, mode) / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="images per batch (CFG doubles the rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--pyramids", default="256px,512px")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--pyramid", help=argparse.SUPPRESS)      # child-process arguments
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(run_one(args)))
        return

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, depth {args.depth}, "
          f"width {args.width}, batch {args.batch} (x2 rows for CFG), median of {args.repeats}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}")
    header = f"{'pyramid':8} {'method':24} {'params':>8} {'attn pairs':>11} {'time s':>7} " \
             f"{'vs a':>6} {'peak MB':>8} {'carried/block MB':>17}"
    print(header + "\n" + "-" * len(header))
    for pyramid in args.pyramids.split(","):
        rows = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--pyramid", pyramid, "--method", method,
                   "--depth", str(args.depth), "--width", str(args.width),
                   "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        base = rows["a: M-VAR carry state"]["seconds"]
        for method, r in rows.items():
            print(f"{pyramid:8} {method:24} {r['params'] / 1e6:7.2f}M {r['pairs']:11,d} "
                  f"{r['seconds']:7.3f} {r['seconds'] / base:5.2f}x {r['peak_mb']:8.1f} "
                  f"{r['carried_mb']:17.2f}")


if __name__ == "__main__":
    main()
