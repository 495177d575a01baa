"""sample.py -- draw images from a trained M-VAR (or VAR) generator: class labels in, pictures out.

The last chapter. Generation itself is `MVAR.generate` (mvar.py): a class label becomes K token
maps, coarse to fine, one scale at a time, and the tokenizer decodes them into an image. This
file batches that call, seeds it, and writes what you look at or measure:

    python sample.py                                               # the shipped Fashion-MNIST M-VAR
    python sample.py --arch var --strip                            # the shipped VAR, + coarse-to-fine
    python sample.py --ckpt runs/tiny/mvar.pt                      # class grid PNG in runs/tiny/
    python sample.py --ckpt runs/tiny/mvar.pt --classes 0-3 --per_class 8 --strip
    python sample.py --ckpt RUN/mvar.pt --npz 10000 --batch 250    # FID input, classes balanced
    python sample.py --official mvar_d16.pth --vae_ckpt vae_ch160v4096z32.pth   # released weights

  <arch>_grid.png   one column per class, --per_class rows (each row: one sample of every class);
  <arch>_strip.png  (--strip) one row per class -- the grid's first sample -- and one column
                    per scale: the picture decoded after scales 0..k, so you see it sharpen;
  <arch>_n.npz      (--npz n) the ImageNet FID evaluator's layout: arr_0 uint8 (n, S, S, 3),
                    arr_1 the classes, taken in turn (the classes list repeated).
They go to --out (a folder, or a .png / .npz name). With neither --ckpt nor --official it samples
the trained Fashion-MNIST models that come with the repository (weights/fashion-mnist/: M-VAR,
or VAR with --arch var) into samples/. The sampling setting defaults to the checkpoint's (for
the shipped models, the one measured to draw them best), or for --official weights to the one
behind the papers' FID numbers. Same seed, batch and device give the same images.

The chapter, top to bottom:
  1. sample_images: labels -> images, batch by batch, one random generator seeded once
  2. main: load a generator and its tokenizer, pick the classes, sample, write the files
  3. not here: the command line, its checks and loading the models, plumbing a learner can
     skip (runtime.parse_sample_args, runtime.load_sampling_models, runtime.OFFICIAL_FID).

How one image is drawn (mvar.MVAR.sample_tokens; nothing here changes it):
  for k = 0 .. K-1:  the blocks see only scale k's new tokens (earlier scales are carried:
                     Mamba's fixed-size state in M-VAR, the attention KV cache in VAR)
                     logits = (1 + s) * cond - s * uncond,   s = guidance * k / (K - 1)
                     keep the top-k tokens, then the smallest set holding top-p of the
                     probability; draw all pn x pn tokens of the scale at once
                     f_hat += phi_k(upsample(the new tokens' codes)); scale k+1's input is
                     f_hat area-downsampled to its pn x pn (tokenizer.next_input, as in training)
  image = the tokenizer's decoder(f_hat)
So guidance is off on the first (1x1) scale, drawn from the conditional logits alone, and at
full strength on the last. cond and uncond (the null class) run as one batch of 2B rows, so
guidance doubles the work; guidance 0 runs B rows.

Paper -> code
  VAR (arXiv 2404.02905) §3, next-scale prediction at inference: scale k is drawn from
      p(r_k | class, r_1..r_k-1), all of its tokens in parallel ........ MVAR.sample_tokens
  M-VAR (arXiv 2411.10433): the same sampler (its official code re-runs Mamba over the prefix
      at every scale); here each block carries Mamba's state instead .... Block.forward_one_scale
  classifier-free guidance (Ho & Salimans, arXiv 2207.12598) with the strength ramped linearly
      over the scales, as VAR's and M-VAR's code do ................. --guidance, sample_tokens
  top-k / top-p (nucleus) sampling (Holtzman et al., arXiv 1904.09751) . --top_k, --top_p,
                                                      mvar.top_k_top_p_filter, sample_top_k_top_p
  FID protocol of both papers: 50,000 samples, 50 per ImageNet class, guidance 1.5, top-k 900,
      top-p 0.96, scored by OpenAI's evaluator (guided-diffusion) ....... --npz 50000, runtime.OFFICIAL_FID
Official code -> this code (VAR's repository, which M-VAR's code builds on)
  VAR.autoregressive_infer_cfg(B, label_B, g_seed, cfg, top_k, top_p, more_smooth)
                                                    -> MVAR.generate / sample_tokens (mvar.py)
  demo_sample.ipynb (load d16..d30, sample a class grid)          -> main, runtime.load_official
  README "FID evaluation" + utils/misc.create_npz_from_sample_folder (PNG folder -> .npz)
                                                    -> main's --npz branch, data.to_uint8_nhw3
  torchvision.utils.save_image (the demo's grid)                  -> data.save_image_grid

Shape letters (as in mvar.py and tokenizer.py): n images in all, B images per batch, Cimg image
channels, S image side, K scales, pn side of one scale's token map.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from data import output_paths, save_image_grid, to_uint8_nhw3
from runtime import autocast, exit_on_error, load_sampling_models, parse_sample_args, pick_classes


# ============================================================================================
# 1. Sampling in batches
# ============================================================================================

@torch.no_grad()
def sample_images(model, tokenizer, labels: torch.Tensor, batch: int, settings: dict, device,
                  amp_dtype=None, seed: int = 0, strip: bool = False, desc: str = "sampling"):
    """labels (n,) -> images (n, Cimg, S, S) in [0, 1] on the CPU; with `strip` also the picture
    after every scale (n, K, Cimg, S, S), else None; and the seconds spent.

    One generator, seeded once, drives every batch in turn, so the output is a function of
    (seed, batch, device): another batch size draws other images from the same seed.
    CUDA runs asynchronously, so the clock waits for the GPU before it is read."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    images, per_scale = [], []
    sync(device)
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch), desc=desc, disable=len(labels) <= batch):
        with autocast(device, amp_dtype):
            out = model.generate(tokenizer, labels[start:start + batch].to(device),
                                 guidance=settings["guidance"], top_k=settings["top_k"],
                                 top_p=settings["top_p"], more_smooth=settings["more_smooth"],
                                 generator=gen, return_scales=strip)
        img, scales = out if strip else (out, [])
        images.append(img.float().cpu())
        if strip:   # K pictures of (B, Cimg, S, S) -> (B, K, Cimg, S, S)
            per_scale.append(torch.stack([s.float().cpu() for s in scales], dim=1))
    sync(device)
    return torch.cat(images), (torch.cat(per_scale) if strip else None), time.perf_counter() - t0


# ============================================================================================
# 2. main: load, sample, write
# ============================================================================================

def main(argv=None) -> dict:
    """Sample as the command line says. Returns {"grid", "strip", "npz": path or None,
    "images": n, "seconds": s, "images_per_s": n/s, "settings": {...}}. Bad input raises
    FileNotFoundError / ValueError with a message that says how to fix it."""
    args = parse_sample_args(argv, __doc__.split("\n\n")[0])   # checked; no model named: the shipped one
    model, tok, defaults, class_names, default_dir = load_sampling_models(args)
    # a flag given on the command line wins over the checkpoint's (or the papers') setting
    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    settings["more_smooth"] = args.more_smooth
    classes = pick_classes(args, model.cfg.num_classes)
    paths = output_paths(args.out, default_dir, model.cfg.arch, args.npz)
    print(f"{model.cfg.arch} generator, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{model.cfg.num_classes} classes, on {args.device}{' (bf16)' if args.amp_dtype else ''}; "
          f"guidance {settings['guidance']}, top_k {settings['top_k']}, top_p {settings['top_p']}, "
          f"more_smooth {args.more_smooth}, seed {args.seed}")
    result = {"grid": None, "strip": None, "npz": None, "settings": settings}
    run = dict(batch=args.batch, settings=settings, device=args.device, amp_dtype=args.amp_dtype,
               seed=args.seed)

    if args.npz:    # FID: the classes in turn, so every class gets n / #classes samples
        labels = torch.tensor(classes)[torch.arange(args.npz) % len(classes)]
        if args.npz % len(classes):
            print(f"note: {args.npz} samples over {len(classes)} classes: counts differ by one")
        images, _, seconds = sample_images(model, tok, labels, **run, desc="npz")
        paths["npz"].parent.mkdir(parents=True, exist_ok=True)
        np.savez(paths["npz"], arr_0=to_uint8_nhw3(images), arr_1=labels.numpy().astype(np.int64))
        result["npz"] = paths["npz"]
    else:           # each row of the grid holds one sample of every class
        labels = torch.tensor(classes).repeat(args.per_class)
        images, per_scale, seconds = sample_images(model, tok, labels, **run, strip=args.strip, desc="grid")
        names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
        save_image_grid(images, paths["grid"], len(classes), column_labels=names)
        result["grid"] = paths["grid"]
        if args.strip:   # the grid's first row: one class per row, one column per scale
            pns = tok.cfg.patch_nums
            save_image_grid(per_scale[:len(classes)].flatten(0, 1), paths["strip"], len(pns),
                            column_labels=[f"{p}x{p}" for p in pns], row_labels=names)
            result["strip"] = paths["strip"]

    result.update(images=len(labels), seconds=seconds, images_per_s=len(labels) / seconds)
    print("\n".join(f"wrote {result[kind]}" for kind in ("grid", "strip", "npz") if result[kind]))
    print(f"{len(labels)} images in {seconds:.2f} s: {result['images_per_s']:.2f} images/s "
          f"(generation + decoding, batch {args.batch}, model load excluded)")
    return result


if __name__ == "__main__":
    exit_on_error(main)   # a bad setting or file ends with `error: <what to fix>`, no traceback
