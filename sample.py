"""sample.py -- draw images from a trained M-VAR (or VAR) generator.

    python sample.py                                               # the shipped Fashion-MNIST M-VAR
    python sample.py --arch var --strip                            # the shipped VAR, + coarse-to-fine
    python sample.py --ckpt runs/tiny/mvar.pt                      # class grid PNG in runs/tiny/
    python sample.py --ckpt runs/tiny/mvar.pt --classes 0-3 --per_class 8 --strip
    python sample.py --ckpt RUN/mvar.pt --npz 10000 --batch 250    # FID input, classes balanced
    python sample.py --official mvar_d16.pth --vae_ckpt vae_ch160v4096z32.pth   # released weights

Generation itself is `MVAR.generate` (mvar.py): class -> K token maps, coarse to fine, one scale
at a time -> the tokenizer decodes them. This file batches it and writes `<arch>_grid.png` (one
column per class), `<arch>_strip.png` (--strip: the picture after every scale, for the grid's
first sample of each class) or `<arch>_N.npz`
(--npz N: the ImageNet FID evaluator's layout, arr_0 uint8 (n, S, S, 3) and the classes in arr_1;
sample i has class classes[i % #classes]) into --out (a folder, or a .png / .npz name).
With neither --ckpt nor --official it samples the trained Fashion-MNIST models that come with the
repository (weights/fashion-mnist/: M-VAR, or VAR with --arch var) into samples/.
Settings default to the checkpoint's (for the shipped models, the setting measured to draw them
best), or for --official weights to those of the papers' FID numbers. Same seed, batch and device
give the same images. images/s excludes loading.

Shape letters: n images, B images per batch, Cimg image channels, S image side, K scales.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import output_paths, save_image_grid, to_uint8_nhw3
from runtime import (REGENERATE, SHIPPED, autocast, load_generator, load_official, resolve_device,
                     sampling_defaults)

# The sampling setting behind the published FID numbers (VAR and M-VAR: cfg 1.5, top-k 900,
# top-p 0.96, no gumbel smoothing).
OFFICIAL_FID = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}


@torch.no_grad()
def sample_images(model, tokenizer, labels: torch.Tensor, batch: int, settings: dict, device,
                  amp_dtype=None, seed: int = 0, strip: bool = False, desc: str = "sampling"):
    """labels (n,) -> images (n, Cimg, S, S) in [0, 1] on the CPU, the picture after every scale
    (n, K, Cimg, S, S) or None, and the seconds spent (CUDA synchronised). One generator seeded
    once drives every batch, so the output is a function of (seed, batch, device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    images, scales = [], []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch), desc=desc, dynamic_ncols=True, disable=len(labels) <= batch):
        with autocast(device, amp_dtype):
            out = model.generate(tokenizer, labels[start:start + batch].to(device), guidance=settings["cfg"],
                                 top_k=settings["top_k"], top_p=settings["top_p"],
                                 more_smooth=settings["more_smooth"], generator=gen, return_scales=strip)
        img, per_scale = out if strip else (out, None)
        images.append(img.float().cpu())
        if strip:
            scales.append(torch.stack([s.float().cpu() for s in per_scale], dim=1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(images), (torch.cat(scales) if strip else None), time.perf_counter() - t0


def main(argv=None) -> dict:
    """Sample as the command line says. Returns {"grid", "strip", "npz": path or None,
    "images": n, "seconds": s, "images_per_s": n/s, "settings": {...}}. Bad input raises
    FileNotFoundError / ValueError with a message that says how to fix it."""
    args = build_parser().parse_args(argv)
    if args.per_class < 1 or args.batch < 1 or args.npz < 0:
        raise ValueError("--per_class and --batch must be >= 1, --npz >= 0")
    if args.npz and args.strip:
        raise ValueError("--strip draws the grid's samples; --npz writes no grid: run them separately")
    if args.ckpt and args.official:
        raise ValueError("pass at most one of --ckpt RUN/<arch>.pt (a train.py run) or "
                         "--official PATH.pth (released weights, with --vae_ckpt)")
    shipped = not (args.ckpt or args.official)          # the trained models in weights/
    if shipped:
        args.ckpt = str(SHIPPED / f"{args.arch or 'mvar'}.pt")
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"the shipped weights {args.ckpt} are missing: restore them (git "
                                    f"checkout -- weights), remake them with `{REGENERATE}`, or pass "
                                    "--ckpt RUN/mvar.pt")
    device = resolve_device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") else None

    if args.ckpt:
        model, tok, ck = load_generator(args.ckpt, device, tokenizer_path=args.tokenizer or None)
        defaults = sampling_defaults(ck)
        default_dir = Path("samples") if shipped else Path(args.ckpt).parent
        class_names = ck.get("class_names") or []
    else:   # every architecture setting is read from the two files; --arch / --depth only check
        pns = tuple(int(p) for p in args.patch_nums.split(",")) if args.patch_nums else None
        model, tok = load_official(args.official, args.vae_ckpt, device, pns, {"arch": args.arch, "depth": args.depth})
        defaults, default_dir, class_names = dict(OFFICIAL_FID), Path("samples"), []
    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    settings["more_smooth"] = args.more_smooth
    num_classes = model.cfg.num_classes
    classes = parse_classes(args.classes, num_classes) if args.classes else \
        list(range(num_classes if args.npz else min(10, num_classes)))
    paths = output_paths(args.out, default_dir, model.cfg.arch, args.npz)
    print(f"{model.cfg.arch} generator, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{num_classes} classes, on {device}{' (bf16)' if amp_dtype else ''}; cfg {settings['cfg']}, "
          f"top_k {settings['top_k']}, top_p {settings['top_p']}, more_smooth {args.more_smooth}, seed {args.seed}")

    result = {"grid": None, "strip": None, "npz": None, "settings": settings}
    if args.npz:
        labels = torch.tensor(classes)[torch.arange(args.npz) % len(classes)]
        if args.npz % len(classes):
            print(f"note: {args.npz} samples over {len(classes)} classes: counts differ by one")
        images, _, seconds = sample_images(model, tok, labels, args.batch, settings, device, amp_dtype, args.seed, desc="npz")
        paths["npz"].parent.mkdir(parents=True, exist_ok=True)
        np.savez(paths["npz"], arr_0=to_uint8_nhw3(images), arr_1=labels.numpy().astype(np.int64))
        result["npz"] = paths["npz"]
    else:
        labels = torch.tensor(classes).repeat(args.per_class)   # row r: sample r of every class
        images, scales, seconds = sample_images(model, tok, labels, args.batch, settings, device,
                                                amp_dtype, args.seed, strip=args.strip, desc="grid")
        names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
        save_image_grid(images, paths["grid"], len(classes), column_labels=names)
        result["grid"] = paths["grid"]
        if args.strip:   # the grid's first row, one class per row, one column per scale
            pns = tok.cfg.patch_nums
            save_image_grid(scales[:len(classes)].flatten(0, 1), paths["strip"], len(pns),
                            column_labels=[f"{p}x{p}" for p in pns], row_labels=names)
            result["strip"] = paths["strip"]
    result.update(images=len(labels), seconds=seconds, images_per_s=len(labels) / seconds)
    print("\n".join(f"wrote {result[kind]}" for kind in ("grid", "strip", "npz") if result[kind]))
    print(f"{len(labels)} images in {seconds:.2f} s: {result['images_per_s']:.2f} images/s "
          f"(generation + decoding, batch {args.batch}, model load excluded)")
    return result


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    src = p.add_argument_group("what to load")
    src.add_argument("--ckpt", default="", help="generator checkpoint written by train.py (RUN/mvar.pt, "
                     "RUN/var.pt); default: the shipped one in weights/fashion-mnist/")
    src.add_argument("--tokenizer", default="", help="tokenizer checkpoint (default: the one the generator names)")
    src.add_argument("--official", default="", help="released M-VAR / VAR ImageNet-256 weights (.pth)")
    src.add_argument("--vae_ckpt", default="data/vae_ch160v4096z32.pth", help="VAR's released tokenizer, with --official (default %(default)s)")
    src.add_argument("--arch", default=None, choices=("mvar", "var"),
                     help="the shipped generator to sample (default mvar); with --official: check that "
                          "the file holds this architecture")
    src.add_argument("--depth", type=int, default=None, help="with --official: check that the file holds this depth")
    src.add_argument("--patch_nums", default="", help="with --official: the scales, e.g. 1,2,3,4, if the file cannot tell them")
    what = p.add_argument_group("what to sample")
    what.add_argument("--classes", default="", help="class ids, e.g. 0-9 or 1,5,7 or all (default: the first 10; with --npz: all)")
    what.add_argument("--per_class", type=int, default=4, help="grid rows: samples per class (default 4)")
    what.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (default: checkpoint's / 1.5)")
    what.add_argument("--top_k", type=int, default=None, help="top-k, 0 = off (default: checkpoint's / 900)")
    what.add_argument("--top_p", type=float, default=None, help="top-p, 0 = off (default: checkpoint's / 0.96)")
    what.add_argument("--more_smooth", action="store_true", help="gumbel-softmax codes: smoother pictures, not for FID")
    what.add_argument("--seed", type=int, default=0, help="default 0")
    what.add_argument("--strip", action="store_true", help="also write the coarse-to-fine strip: one row per class "
                      "(the grid's first sample), one column per scale")
    what.add_argument("--npz", type=int, default=0, metavar="N", help="write N samples as .npz for FID instead of a grid")
    run = p.add_argument_group("how")
    run.add_argument("--batch", type=int, default=64, help="images per forward pass (default 64)")
    run.add_argument("--out", default="", help="output folder, or a .png / .npz file name (default: the "
                     "run folder; samples/ for the shipped and --official weights)")
    run.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA, fp32 elsewhere")
    return p


def parse_classes(text: str, num_classes: int) -> list[int]:
    """"0-9" / "3,5,7" / "0-3,8" / "all" -> the class ids in the order given, each in range."""
    if text.strip().lower() == "all":
        return list(range(num_classes))
    ids = []
    for part in filter(None, text.replace(" ", "").split(",")):
        if m := re.fullmatch(r"(\d+)-(\d+)", part):          # an inclusive range a-b
            if int(m[2]) < int(m[1]):
                raise ValueError(f"--classes {text!r}: the range {part} is empty")
            ids += range(int(m[1]), int(m[2]) + 1)
        elif re.fullmatch(r"-?\d+", part):
            ids.append(int(part))
        else:
            raise ValueError(f"--classes {text!r}: expected ids and ranges like 0-9 or 1,5,7 or all")
    bad = [c for c in ids if not 0 <= c < num_classes]
    if not ids or bad:
        raise ValueError(f"--classes {text!r}: " + (f"class label(s) {bad[:5]} out of range: this model has "
                         f"{num_classes} classes, valid labels are 0..{num_classes - 1}" if bad else "names no class"))
    return ids


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad settings, data or checkpoints: the
        print(f"error: {e}", file=sys.stderr)      # message says what to fix; a traceback
        sys.exit(2)                                # would only bury it
