"""One generator training step, M-VAR vs VAR, side by side: time, FLOPs, and where the time goes.

For a train.py preset (default: fashion-mnist) this builds the generator both ways (the same
depth, width, heads, scales and batch as the preset), feeds random tokens through the step
train.py takes (teacher-forced forward, cross-entropy, backward, grad clip, AdamW), and prints:

  - parameters; FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode (it counts
    matmuls, convs and attention, so elementwise work is free: the ratio of counted FLOPs is what
    the two *should* cost if the arithmetic-heavy ops dominated; see step_flops for one fix);
  - the median wall time of a step, the two models interleaved (one step each, in turn) so that
    a noisy machine slows both alike;
  - the M-VAR/VAR ratios of both, and their quotient ("overhead": time ratio / FLOP ratio, 1.0
    when M-VAR's extra time is all arithmetic);
  - with --profile, the ten most expensive ops of an M-VAR step.

Mamba's settings can be changed to see what they cost (--d_state, --headdim, --expand, which
train.py also takes); --compile model mamba also times both models under torch.compile (all of it, or
only the Mamba layers; the first steps, which compile, are not timed), interleaved with the eager
steps in a rotating order, so that the compiled / eager ratios are measured side by side too.

    python benchmarks/train_step.py --threads 1                       # the fashion-mnist preset
    python benchmarks/train_step.py --threads 1 --expand 2            # its Mamba at expand 2
    python benchmarks/train_step.py --threads 1 --compile model mamba
    python benchmarks/train_step.py --threads 1 --steps 60            # the median of 60 steps
    python benchmarks/train_step.py --preset cifar10 --batch 16 --threads 2
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from mvar import MVAR  # noqa: E402


def build(arch: str, args) -> tuple:
    """The preset's generator (random init) and random inputs of one training batch."""
    mamba = {k: getattr(args, k) for k in ("d_state", "headdim", "expand") if getattr(args, k)}
    cfg = train.make_config(args.preset, arch=arch, **mamba)
    tok_cfg = train.tokenizer_config_for(cfg, in_channels=3)     # the generator is the same for 1
    num_classes = {"shapes": len(data.SHAPE_CLASSES), "folder": 1000}.get(cfg.dataset, 10)
    mcfg = train.model_config_for(cfg, tok_cfg, num_classes)
    torch.manual_seed(0)
    model = MVAR(mcfg)
    batch = args.batch or cfg.gen_batch
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    L, first = mcfg.seq_len, mcfg.patch_nums[0] ** 2
    teacher = torch.randn(batch, L - first, mcfg.Cvae, generator=gen)
    targets = torch.randint(0, mcfg.vocab_size, (batch, L), generator=gen)
    opt = torch.optim.AdamW(train.param_groups(model, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95))
    return model.train(), opt, (labels, teacher, targets), cfg.grad_clip


def step(model, opt, inputs, grad_clip, net=None):
    """train.py's step on one batch: forward, cross-entropy, backward, clip, AdamW."""
    labels, teacher, targets = inputs
    logits = (model if net is None else net)(labels, teacher)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    train.optimizer_step(opt, model, None, grad_clip)


def step_flops(model, opt, inputs, grad_clip) -> int:
    """FLOPs of one step. FlopCounterMode (torch 2.x) counts a grouped convolution's weight
    gradient as if the convolution were dense: for Mamba's depthwise conv1d (one group per
    channel) that is conv_dim times too many, more than all the rest of the step. The conv's
    backward is counted here as 2x its forward instead."""
    with FlopCounterMode(display=False) as counter:
        step(model, opt, inputs, grad_clip)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    conv_fwd = by_op.get("aten.convolution", 0)
    return counter.get_total_flops() - by_op.get("aten.convolution_backward", 0) + 2 * conv_fwd


def compiled(model, what: str):
    """The network a step calls under torch.compile: all of it ("model", as train.py --compile),
    or the model with only its Mamba layers compiled ("mamba"; VAR has none: it stays eager)."""
    if what == "model":
        return torch.compile(model)
    for block in model.blocks:
        if hasattr(block, "mamba"):
            block.mamba.compile()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fashion-mnist", choices=list(train.PRESETS))
    ap.add_argument("--batch", type=int, default=0, help="0: the preset's gen_batch")
    for name in ("d_state", "headdim", "expand"):
        ap.add_argument(f"--{name}", type=int, default=0, help=f"M-VAR's Mamba {name} (0: the preset's)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per model (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", nargs="*", default=[], choices=["model", "mamba"],
                    help="also time under torch.compile: of the whole model, of the Mamba layers")
    ap.add_argument("--profile", action="store_true", help="print the top ops of an M-VAR step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    setups = {arch: build(arch, args) for arch in ("mvar", "var")}
    m = setups["mvar"][0].cfg
    print(f"preset {args.preset}: depth {m.depth}, width {m.width}, L = {m.seq_len} tokens, batch "
          f"{setups['mvar'][2][0].shape[0]}, fp32, {args.threads} thread(s), torch {torch.__version__}")
    print(f"M-VAR's Mamba: d_state {m.d_state}, headdim {m.headdim}, expand {m.expand}, "
          f"chunk {m.scan_chunk}\n")
    flops = {arch: step_flops(*s) for arch, s in setups.items()}

    # Every variant gets fresh models (so each starts alike), is warmed up (and compiled), and
    # then all of them are timed in one interleaved loop: eager mvar, eager var, compiled mvar,
    # ... step by step, so that a noisy machine slows every variant alike and the columns compare.
    # Each round starts one place further along that list, so that no variant always follows the
    # same one.
    variants = {}
    for label in ["eager"] + args.compile:
        fresh = {arch: build(arch, args) for arch in setups}
        variants[label] = {arch: (s, None if label == "eager" else compiled(s[0], label))
                           for arch, s in fresh.items()}
        for arch, ((model, opt, inputs, clip), net) in variants[label].items():
            t0 = time.perf_counter()
            for _ in range(2):                                # warm-up (and compilation)
                step(model, opt, inputs, clip, net)
            if label != "eager":
                print(f"{label}: {arch} warm-up (compiling) took {time.perf_counter() - t0:.0f} s")
    times = {(label, arch): [] for label, v in variants.items() for arch in v}
    order = list(times)
    for i in range(args.steps):
        for label, arch in order[i % len(order):] + order[:i % len(order)]:
            (model, opt, inputs, clip), net = variants[label][arch]
            t0 = time.perf_counter()
            step(model, opt, inputs, clip, net)
            times[label, arch].append(time.perf_counter() - t0)
    rows = [(label, {arch: statistics.median(times[label, arch]) for arch in setups})
            for label in variants]

    params = {arch: sum(p.numel() for p in s[0].parameters()) for arch, s in setups.items()}
    hdr = f"{'':9} {'params':>8} {'GFLOP/step':>10} {'ms/step':>8}"
    print(hdr + "".join(f" {label + ' ms':>12}" for label, _ in rows[1:]))
    for arch in setups:
        print(f"{arch:9} {params[arch] / 1e6:7.2f}M {flops[arch] / 1e9:10.2f} "
              f"{rows[0][1][arch] * 1e3:8.0f}" + "".join(f" {r[arch] * 1e3:12.0f}" for _, r in rows[1:]))
    flop_ratio = flops["mvar"] / flops["var"]
    print(f"\nM-VAR / VAR: params {params['mvar'] / params['var']:.2f}x, FLOPs {flop_ratio:.2f}x")
    for label, r in rows:
        time_ratio = r["mvar"] / r["var"]
        print(f"  {label:8} step time {time_ratio:.2f}x  -> overhead (time ratio / FLOP ratio) "
              f"{time_ratio / flop_ratio:.2f}")
    for label, r in rows[1:]:
        print(f"  {label} compiled / eager: " + ", ".join(
            f"{arch} {r[arch] / rows[0][1][arch]:.2f}x" for arch in setups))

    if args.profile:
        model, opt, inputs, clip = setups["mvar"]
        with torch.profiler.profile() as prof:
            step(model, opt, inputs, clip)
        print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
