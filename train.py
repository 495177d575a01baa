"""train.py -- train M-VAR in two stages, on one CPU, one GPU or many (torchrun).

Stage 1 trains the multi-scale VQ tokenizer (tokenizer.py) on images, or imports VAR's released
one. Then every image is encoded once into K token maps. Stage 2 trains the generator (mvar.py)
on those tokens with teacher forcing: the input for scale k is built from the ground-truth
tokens of scales 0..k-1, and one cross-entropy over all L tokens trains every scale at once.

    python train.py                                   # tiny built-in data, both stages, CPU ok
    python train.py --preset fashion-mnist            # both stages, 38-53 min on a 2-core CPU
    python train.py --preset fashion-mnist --stage generator --arch var   # VAR, same tokens
    torchrun --nproc_per_node=8 train.py --preset imagenet256-d16 \
        --data_dir /data/imagenet --vae_ckpt /ckpt/vae_ch160v4096z32.pth

Re-running the same command resumes from the run folder (--out_dir, default runs/<preset>):
config.json; tokenizer.pt, tokenizer_eval.json, tokenizer_recon.png, tokenizer_loss.png
(stage 1); tokens.pt (the token cache); <arch>.pt, <arch>_eval.json, <arch>_loss.png,
<arch>_samples.png, images/<arch>_step*.png (stage 2; <arch> = mvar | var).

The chapter, top to bottom:
  1. TrainConfig and the presets
  2. the learning-rate schedule and AdamW's parameter groups
  3. stage 1, the tokenizer loop
  4. encoding the dataset to tokens
  5. stage 2, the generator loop: batch -> teacher input -> logits -> loss -> step
  6. main.
Datasets, the resumable sampler and pictures live in data.py; torchrun set-up, checkpoint files
and the command line in runtime.py. Neither is needed to understand M-VAR.

Paper -> code
  VAR (arXiv 2404.02905) "next-scale prediction": p(r_1..r_K) = prod_k p(r_k | r_<k), trained
      by teacher forcing on the ground-truth maps ............ train_generator's loop
  VAR, implementation details: AdamW (0.9, 0.95), weight decay 0.05, lr 1e-4 per 256 images,
      linear warm-up then decay, class dropout 0.1 for classifier-free guidance ... PRESETS,
      lr_at, wd_at, param_groups, MVARConfig.cond_drop
  M-VAR (arXiv 2411.10433), experiments: "the hyperparameters of training are the same as VAR"
      ... the imagenet256-d16..d30 presets
  VQVAE training (VAR's tokenizer, VQGAN-style) ............... train_tokenizer (this project
      uses L1 + L2 + the VQ losses; VAR adds perceptual and GAN losses: pretrained downloads)

Official code -> this file (VAR's repository: train.py, trainer.py, utils/)
  arg_util.Args -> TrainConfig                      lr_control.lr_wd_annealing -> lr_at, wd_at
  lr_control.filter_params -> param_groups          VARTrainer.train_step -> the loop body
  vae.img_to_idxBl at every step -> encode_images, once  dist.initialize -> runtime.setup_distributed

Shape letters (as in mvar.py and tokenizer.py): B batch (per process), Cimg image channels,
S image side, K scales, pn side of one scale's token map, L = sum pn^2 tokens of all scales,
V codebook size, Cvae tokenizer latent channels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from runtime import (DistInfo, amp_setup, autocast, check_same_run, checkpoint_or_stop, file_digest,
                  gather_rng, load_checkpoint, load_state_dict_checked, load_tokenizer_state, load_trained_tokenizer,
                  load_var_checkpoint, parse_config_args, restore_rng, save_checkpoint, setup_distributed, wrap_ddp, write_json)
from data import (ShardedSampler, TokenDataset, cached_tokens, check_labels, load_dataset,
                  save_image_grid, save_loss_plot, split_scales, step_loader)
from mvar import MVAR, MVARConfig, compute_loss
from tokenizer import MultiScaleVQVAE, code_usage, psnr, tokenizer_config


# ============================================================================================
# 1. Config: one dataclass, a few presets, and command-line overrides (`--field value`)
# ============================================================================================

def _f(default, help):
    """A dataclass field with a help string (shown by `python train.py --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- run control -----------------------------------------------------------------------
    preset: str = _f("tiny", "preset the defaults come from (see PRESETS)")
    stage: str = _f("all", "tokenizer | generator | all")
    arch: str = _f("mvar", "generator architecture: mvar | var (the VAR baseline)")
    out_dir: str = _f("", "run folder (default runs/<preset>); re-running resumes from it")
    seed: int = _f(0, "seed for init, data order and augmentation")
    device: str = _f("auto", "auto | cpu | cuda | mps (auto: cuda:LOCAL_RANK if available)")
    precision: str = _f("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA if supported, else fp16; fp32 on CPU)")
    compile: bool = _f(False, "torch.compile the generator")
    max_minutes: float = _f(0.0, "stop cleanly (with a checkpoint) after this many minutes; 0 = no limit")
    stop_after: int = _f(0, "stop (with a checkpoint) after this many steps in this invocation; 0 = no limit")
    log_every: int = _f(10, "steps between loss-history points")
    ckpt_every: int = _f(500, "steps between checkpoints (one is always written at the end)")
    image_every: int = _f(500, "steps between reconstruction / sample grid PNGs")
    num_workers: int = _f(0, "DataLoader worker processes (helps for JPEG folders)")
    # --- data ------------------------------------------------------------------------------
    dataset: str = _f("shapes", "shapes (built-in) | fashion-mnist | cifar10 | folder")
    data_dir: str = _f("", "dataset folder (default: the dataset's usual place, see the error)")
    download: bool = _f(False, "download Fashion-MNIST / CIFAR-10 into data/ if missing")
    image_size: int = _f(16, "training resolution (pixels)")
    hflip: bool = _f(False, "random horizontal flips (the token cache then stores flipped copies)")
    subset: int = _f(0, "use only the first N images of each split (0 = all); for quick tests")
    shapes_train: int = _f(4000, "built-in dataset: number of training images")
    shapes_test: int = _f(800, "built-in dataset: number of test images")
    # --- stage 1: tokenizer ----------------------------------------------------------------
    # The tokenizer architecture comes from tokenizer.py's preset (--tok_preset); a non-zero /
    # non-empty value below overrides that field of the preset.
    tok_preset: str = _f("32px", "tokenizer preset in tokenizer.py: 32px (8x8 latents at 32 px, 7x7 at 28) | var256")
    tok_ch: int = _f(0, "tokenizer base channels (0 = the preset's)")
    tok_ch_mult: tuple = _f((), "tokenizer channel multipliers, one per level (empty = the preset's)")
    tok_z_channels: int = _f(0, "tokenizer latent channels Cvae (0 = the preset's)")
    vocab_size: int = _f(0, "codebook size V (0 = the preset's)")
    patch_nums: tuple = _f((1, 2, 3, 4), "side of each scale's token map, coarse to fine (empty = the preset's)")
    tok_batch: int = _f(64, "tokenizer global batch size")
    tok_lr: float = _f(4e-4, "tokenizer peak learning rate")
    tok_epochs: float = _f(8.0, "tokenizer training epochs")
    tok_l1: float = _f(1.0, "weight of the L1 pixel loss")
    tok_l2: float = _f(1.0, "weight of the L2 pixel loss")
    vae_ckpt: str = _f("", "import VAR's released tokenizer from this .pth instead of training one")
    eval_images: int = _f(0, "images of the test split used by the final evals (0 = all)")
    # --- stage 2: generator ----------------------------------------------------------------
    depth: int = _f(4, "generator depth (VAR/M-VAR size rule: width 64*depth, heads = depth)")
    width: int = _f(128, "model width C (0 = 64*depth)")
    num_heads: int = _f(4, "attention heads (0 = depth)")
    d_state: int = _f(64, "M-VAR's Mamba-2: SSM state size N (the released models: 64)")
    headdim: int = _f(64, "M-VAR's Mamba-2: channels per SSM head P (released: 64)")
    expand: int = _f(2, "M-VAR's Mamba-2: inner width = expand * width (released: 2)")
    gen_batch: int = _f(64, "generator global batch size (over all processes and accumulation)")
    grad_accum: int = _f(1, "gradient accumulation micro-steps per optimizer step")
    base_lr: float = _f(4e-3, "generator lr per 256 images: peak lr = base_lr * gen_batch / 256")
    gen_epochs: float = _f(10.0, "generator training epochs")
    warmup_frac: float = _f(0.02, "fraction of steps spent in linear warm-up, both stages (VAR: ep/50)")
    end_lr_ratio: float = _f(0.1, "final lr / peak lr at the end of the linear decay, both stages "
                                  "(VAR's wpe)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, pos/level embeddings, "
                                   "attention temperature, Mamba's dt_bias / A_log / D)")
    weight_decay_end: float = _f(0.05, "weight decay at the end (cosine from weight_decay; VAR's twde)")
    grad_clip: float = _f(2.0, "gradient-norm clip, both stages")
    alng: float = _f(1e-3, "AdaLN gate init scale (VAR: 1e-3 for d12-d20, 1e-4 d24, 1e-5 d30)")
    drop_path: float = _f(-1.0, "max drop-path rate (-1 = 0.1*depth/24, the VAR rule)")
    cond_drop: float = _f(0.1, "probability of replacing the class by the null class (for CFG)")
    guidance: float = _f(1.5, "classifier-free guidance for the sample grids")
    top_k: int = _f(0, "top-k for the sample grids (0 = off)")
    top_p: float = _f(0.0, "top-p for the sample grids (0 = off)")
    samples_per_class: int = _f(4, "sample grid: images per class (first 10 classes)")


# Presets change only what differs from the defaults above ("tiny": 16 px shapes, 4x4 latents,
# a depth-4 width-128 generator, both stages in ~12 minutes on a 2-core CPU). The ImageNet ones
# are VAR's / M-VAR's released training commands (M-VAR: "the hyperparameters of training are
# the same as VAR"), warm-up ep/50 (VAR's default); each preset lists what its command sets.
_IMAGENET = dict(dataset="folder", image_size=256, tok_preset="var256", patch_nums=(), width=0,
                 num_heads=0, vae_ckpt="data/vae_ch160v4096z32.pth", base_lr=1e-4, num_workers=8,
                 log_every=100, ckpt_every=2000, image_every=5000, eval_images=10000,
                 gen_batch=768, samples_per_class=1)
PRESETS = {
    "tiny": dict(),
    # Both stages in 38-53 minutes on a 2-core CPU (benchmarks/RESULTS.md): native 28x28 images,
    # 7x7 latents, L = 88 tokens; one tokenizer epoch at lr 2e-3 (0.6-0.7 dB better than 1e-3 in
    # the same time); many small generator steps (batch 32); a Mamba sized for width 128 (d_state 16,
    # headdim 32, expand 1: about 0.75x the step time of expand 2, and better than it at equal
    # wall time). 2.5264 epochs of 1,875 steps are 4,737 steps, the wall time of the 3,562 steps
    # the preset ran with expand 2 before. Generator peak lr 4e-3 (base_lr 32e-3 at batch 32):
    # M-VAR's lowest validation loss of 1, 2, 4 and 8e-3, more varied samples than 1e-3, no cost.
    "fashion-mnist": dict(dataset="fashion-mnist", image_size=28, patch_nums=(1, 2, 3, 5, 7),
                          tok_epochs=1.0, tok_batch=32, tok_lr=2e-3,
                          gen_batch=32, base_lr=32e-3, gen_epochs=2.5264, guidance=3.0,
                          d_state=16, headdim=32, expand=1),
    # 32px tokenizer with its own 8x8 pyramid (patch_nums=()), VAR's size rule (width, heads = 0).
    "cifar10": dict(image_size=32, patch_nums=(), width=0, num_heads=0,
                    dataset="cifar10", hflip=True, tok_ch=64, tok_epochs=40.0, depth=8,
                    gen_batch=256, base_lr=4e-4, gen_epochs=200.0, ckpt_every=2000,
                    image_every=2000, num_workers=2),
    "imagenet256-d16": dict(_IMAGENET, depth=16, gen_epochs=200.0, alng=1e-3, end_lr_ratio=0.1),
    "imagenet256-d20": dict(_IMAGENET, depth=20, gen_epochs=250.0, alng=1e-3, end_lr_ratio=0.1),
    "imagenet256-d24": dict(_IMAGENET, depth=24, gen_epochs=350.0, base_lr=8e-5, alng=1e-4,
                            end_lr_ratio=0.01),
    "imagenet256-d30": dict(_IMAGENET, depth=30, gen_epochs=350.0, base_lr=8e-5, alng=1e-5,
                            end_lr_ratio=0.01, gen_batch=1024, weight_decay_end=0.08),
}

# The fields that define each stage's result: resuming a checkpoint written under other
# values is refused. All other fields (RUNTIME_FIELDS) only steer this invocation -- output,
# logging, devices, the number of processes / accumulation steps -- and may change freely.
DATA_FIELDS = ("seed", "dataset", "image_size", "hflip", "subset", "shapes_train", "shapes_test")
STAGE1_FIELDS = DATA_FIELDS + ("tok_preset", "tok_ch", "tok_ch_mult", "tok_z_channels", "vocab_size",
                               "patch_nums", "tok_batch", "tok_lr", "tok_epochs", "tok_l1", "tok_l2",
                               "warmup_frac", "end_lr_ratio", "grad_clip")
STAGE2_FIELDS = DATA_FIELDS + ("arch", "depth", "width", "num_heads", "d_state", "headdim", "expand",
                               "gen_batch", "base_lr", "gen_epochs", "warmup_frac", "end_lr_ratio", "weight_decay",
                               "weight_decay_end", "grad_clip", "alng", "drop_path", "cond_drop")
RUNTIME_FIELDS = ("preset", "stage", "out_dir", "device", "precision", "compile", "max_minutes",
                  "stop_after", "log_every", "ckpt_every", "image_every", "num_workers", "download",
                  "data_dir", "vae_ckpt", "eval_images", "grad_accum", "guidance", "top_k", "top_p",
                  "samples_per_class")
_CHOICES = {"stage": ("tokenizer", "generator", "all"), "arch": ("mvar", "var"),
            "dataset": ("shapes", "fashion-mnist", "cifar10", "folder"),
            "precision": ("auto", "fp32", "bf16", "fp16"), "tok_preset": ("32px", "var256")}


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's TrainConfig with `overrides` applied (the Python twin of the command line)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    bad = [k for k in overrides if k not in {f.name for f in fields(TrainConfig)}]
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; see `python train.py --help`")
    cfg = TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    for name, allowed in _CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    cfg.out_dir = cfg.out_dir or os.path.join("runs", preset)
    return cfg


# ============================================================================================
# 2. The schedule: learning rate, weight decay, and which parameters decay
# ============================================================================================

def lr_at(step: int, total: int, peak: float, warmup_frac: float, end_ratio: float) -> float:
    """Linear warm-up to `peak` over the first warmup_frac of the steps, then linear decay to
    end_ratio * peak at the last step (VAR's schedule, without its 5% plateau).

    Warm-up step s (0-based) uses peak * (s+1)/W, so step 0 already moves and step W-1 reaches
    the peak (VAR's warm-up starts from 0.005 * peak instead, and reaches it one step later); the
    decay runs from step W (peak) to step total-1 (end_ratio * peak).
    """
    warm = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, total - 1 - warm)
    return peak * (1.0 - (1.0 - end_ratio) * min(1.0, (step - warm) / span))


def wd_at(step: int, total: int, wd: float, wd_end: float) -> float:
    """Weight decay from wd to wd_end along a half cosine (VAR's --twde)."""
    t = min(1.0, step / max(1, total - 1))
    return wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * t))


# Parameters that must not shrink toward zero: position / level embeddings, the cosine-attention
# temperature, what Mamba2 marks `_no_weight_decay` (dt_bias, A_log: each SSM head's time scale;
# the skip weight D), as mamba_ssm does; biases and norm weights, caught by ndim <= 1.
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight matrices (decayed), and (not decayed) every parameter with
    ndim <= 1, marked `_no_weight_decay`, or named in NO_DECAY_KEYS (see the comment above)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0}]


def optimizer_step(opt, model, scaler, grad_clip: float) -> torch.Tensor:
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping.
    fp16 needs the GradScaler (it unscales before clipping); bf16 and fp32 pass scaler=None."""
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt) if scaler else opt.step()
    if scaler:
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return grad_norm


# ============================================================================================
# 3. Stage 1: the multi-scale VQ tokenizer
# ============================================================================================

def tokenizer_config_for(cfg: TrainConfig, in_channels: int):
    """TrainConfig -> TokenizerConfig: the tok_preset with the non-zero tok_* overrides."""
    over = {"image_size": cfg.image_size, "in_channels": in_channels}
    for name, value in (("ch", cfg.tok_ch), ("ch_mult", cfg.tok_ch_mult), ("z_channels", cfg.tok_z_channels),
                        ("vocab_size", cfg.vocab_size), ("patch_nums", cfg.patch_nums)):
        if value:
            over[name] = value
    return tokenizer_config(cfg.tok_preset, **over)


def train_tokenizer(cfg: TrainConfig, d: DistInfo, deadline: float = math.inf) -> MultiScaleVQVAE | None:
    """Stage 1. Trains (or resumes, or imports) the tokenizer; writes RUN/tokenizer.pt,
    RUN/tokenizer_recon.png, RUN/tokenizer_eval.json. Returns the finished tokenizer (eval
    mode), or None if the time budget / --stop_after ended this invocation first."""
    run, path = Path(cfg.out_dir), Path(cfg.out_dir) / "tokenizer.pt"
    if cfg.vae_ckpt:
        return load_trained_tokenizer(path, d.device)[0] if path.exists() else import_var_tokenizer(cfg, d)
    train_ds, test_ds = load_dataset(cfg, "train"), load_dataset(cfg, "test", download_ok=False)
    tok_cfg = tokenizer_config_for(cfg, in_channels=train_ds[0][0].shape[0])
    torch.manual_seed(cfg.seed)                        # identical init on every rank
    model = MultiScaleVQVAE(tok_cfg).to(d.device)
    # No weight decay: it would pull the codebook and the convs toward 0 for no benefit here.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.tok_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = ShardedSampler(len(train_ds), cfg.tok_batch, cfg.seed, d.rank, d.world_size)
    total = max(1, round(cfg.tok_epochs * sampler.steps_per_epoch))
    torch.manual_seed(cfg.seed * 1000 + d.rank)        # per-rank stream (dead-code restarts)
    step, history = 0, []
    amp_dtype, scaler = amp_setup(cfg, d.device)
    if path.exists():
        ck = load_checkpoint(path, "tokenizer")
        check_same_run(ck["config"]["train"], dataclasses.asdict(cfg), path, STAGE1_FIELDS)
        load_tokenizer_state(model, ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, history = ck["step"], ck["history"]
        restore_rng(ck["rng"])
        d.print(f"stage 1: resuming {path} at step {step}/{total}")
    if step >= total:
        return model.eval().requires_grad_(False)
    net = wrap_ddp(model, d)
    preview = torch.stack([test_ds[i][0] for i in range(min(8, len(test_ds)))]).to(d.device)

    def checkpoint(done):
        rng = gather_rng()
        if d.is_main:
            save_checkpoint(tokenizer_payload(cfg, model, opt, step, total, rng, history, done,
                                              scaler=scaler.state_dict() if scaler else {}), path)

    def recon_grid():                                  # originals above, reconstructions below
        if d.is_main:
            with torch.no_grad():
                rec = model.eval().idx_to_img(model.img_to_idx(preview))
            model.train()
            save_image_grid(torch.cat([preview, rec]).add(1).div(2), run / "tokenizer_recon.png", len(preview))

    model.train()
    bar = tqdm(total=total, initial=step, desc="stage 1 tokenizer", disable=not d.is_main, dynamic_ncols=True)
    steps_here, running = 0, []
    for img, _ in step_loader(train_ds, sampler, step, total, cfg.num_workers, d.device.type == "cuda"):
        img = img.to(d.device, non_blocking=True)      # (B, Cimg, S, S) in [-1, 1]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.tok_lr, cfg.warmup_frac, cfg.end_lr_ratio)
        with autocast(d.device, amp_dtype):
            recon, vq_loss, stats = net(img)           # encode, quantize every scale, decode
        recon = recon.float()
        # Pixel loss: L1 keeps edges sharp, L2 (= the PSNR objective) fixes large errors.
        loss = cfg.tok_l1 * F.l1_loss(recon, img) + cfg.tok_l2 * F.mse_loss(recon, img) + vq_loss
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, model, scaler, cfg.grad_clip)
        step, steps_here = step + 1, steps_here + 1
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == total:
            history.append([step, sum(running) / len(running)])
            running = []
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{float(psnr(img, recon.detach()).mean()):.2f}",
                        used="/".join(str(int(u)) for u in stats["used"]))
        if step % cfg.image_every == 0:
            recon_grid()
        if checkpoint_or_stop(cfg, d, deadline, step, total, steps_here, checkpoint, bar, "stage 1", path):
            return None
    bar.close()
    recon_grid()
    model.eval().requires_grad_(False)
    if d.is_main:
        report_tokenizer_eval(eval_tokenizer(model, test_ds, cfg.tok_batch, cfg.eval_images, d.device), run)
        save_loss_plot(history, run / "tokenizer_loss.png", "stage 1: tokenizer")
    d.barrier()
    return model


def tokenizer_payload(cfg, model, opt, step, total, rng, history, done, **extra) -> dict:
    """What RUN/tokenizer.pt holds: plain types and tensors only (weights_only loads)."""
    return {"kind": "tokenizer", "config": {"train": dataclasses.asdict(cfg), "tokenizer": model.cfg.to_dict()},
            "model": model.state_dict(), "optimizer": opt.state_dict() if opt else {},
            "step": step, "total_steps": total, "rng": rng, "history": history, "done": done, **extra}


def import_var_tokenizer(cfg: TrainConfig, d: DistInfo) -> MultiScaleVQVAE:
    """ImageNet presets: stage 1 = convert VAR's released tokenizer into RUN/tokenizer.pt."""
    src = Path(cfg.vae_ckpt)
    model = load_var_checkpoint(src).to(d.device)
    if model.cfg.image_size != cfg.image_size or tuple(cfg.patch_nums or model.cfg.patch_nums) != model.cfg.patch_nums:
        raise ValueError(f"VAR's tokenizer works at {model.cfg.image_size}px with patch_nums "
                         f"{model.cfg.patch_nums}; got --image_size {cfg.image_size} --patch_nums {cfg.patch_nums}")
    if d.is_main:
        print(f"stage 1: imported VAR's tokenizer from {src}")
        report_tokenizer_eval(eval_tokenizer(model, load_dataset(cfg, "test"), cfg.tok_batch,
                                             cfg.eval_images, d.device), Path(cfg.out_dir))
        save_checkpoint(tokenizer_payload(cfg, model, None, 0, 0, [], [], True, source=str(src)),
                        Path(cfg.out_dir) / "tokenizer.pt")
    d.barrier()
    return model


@torch.no_grad()
def eval_tokenizer(model: MultiScaleVQVAE, ds, batch: int, limit: int, device) -> dict:
    """Test-set PSNR (dB, mean over images) and per-scale code usage."""
    n = min(limit or len(ds), len(ds))
    psnrs, idx_batches = [], []
    model.eval()
    for start in range(0, n, batch):
        img = torch.stack([ds[i][0] for i in range(start, min(n, start + batch))]).to(device)
        idx = model.img_to_idx(img)
        psnrs.append(psnr(img, model.idx_to_img(idx)).cpu())
        idx_batches.append([i.cpu() for i in idx])
    usage = code_usage(idx_batches, model.cfg.vocab_size)
    return {"images": n, "psnr_db": float(torch.cat(psnrs).mean()), "codes_used": usage["used"].tolist(),
            "perplexity": [round(float(p), 2) for p in usage["perplexity"]],
            "patch_nums": list(model.cfg.patch_nums), "vocab_size": model.cfg.vocab_size}


def report_tokenizer_eval(res: dict, run: Path) -> None:
    """Print the stage-1 eval table and write it to RUN/tokenizer_eval.json."""
    write_json(res, run / "tokenizer_eval.json")
    print(f"stage 1 eval on {res['images']} test images: PSNR {res['psnr_db']:.2f} dB")
    print("  per scale  pn: " + " ".join(f"{p:>6}" for p in res["patch_nums"]))
    print("  codes used   : " + " ".join(f"{u:>6}" for u in res["codes_used"]))
    print("  perplexity   : " + " ".join(f"{p:>6.1f}" for p in res["perplexity"]))


# ============================================================================================
# 4. Encoding the dataset to tokens, once
# ============================================================================================
# The generator never sees pixels: it learns from the K token maps of every image. Encoding
# them once, instead of at every step as VAR's trainer does, makes stage 2 several times faster
# on a CPU. With --hflip the mirrored image is encoded too (its tokens are not a mirror of the
# tokens: the residual quantizer is not mirror-symmetric), and training picks one of the two.

@torch.no_grad()
def encode_images(tokenizer: MultiScaleVQVAE, ds, indices, batch: int, device, flip: bool,
                  num_workers: int = 0):
    """ds[i] (the evaluation view) for i in indices -> idx (n, L), and the same for the mirrored
    images or None. Stored as int16 when V fits (half the memory of int32)."""
    dtype = torch.int16 if tokenizer.cfg.vocab_size <= 2**15 else torch.int32
    out, out_flip = [], []
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch,
                                         num_workers=num_workers)
    for img, _ in tqdm(loader, desc="encoding", leave=False, disable=len(loader) < 20):
        img = img.to(device)                                    # (B, Cimg, S, S)
        idx_list = tokenizer.img_to_idx(img)                    # K maps (B, pn_k^2), coarse to fine
        out.append(torch.cat(idx_list, 1).to("cpu", dtype))     # (B, L)
        if flip:
            out_flip.append(torch.cat(tokenizer.img_to_idx(img.flip(-1)), 1).to("cpu", dtype))
    L = sum(p * p for p in tokenizer.cfg.patch_nums)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, L, dtype=dtype)
    return cat(out), (cat(out_flip) if flip else None)


def token_cache(cfg: TrainConfig, d: DistInfo, tokenizer: MultiScaleVQVAE) -> dict:
    """RUN/tokens.pt, built by encode_images and kept while the tokenizer file (by sha256), the
    data settings and --data_dir stay the same (the file handling is data.cached_tokens)."""
    identity = {"tokenizer_sha256": file_digest(Path(cfg.out_dir) / "tokenizer.pt"),
                "data": {k: getattr(cfg, k) for k in DATA_FIELDS + ("data_dir",)},
                "patch_nums": list(tokenizer.cfg.patch_nums)}

    def encode_split(split, rank, world):
        ds = load_dataset(cfg, split, download_ok=False)
        mine = list(range(rank, len(ds), world))
        idx, idx_flip = encode_images(tokenizer.eval(), ds, mine, cfg.tok_batch, d.device,
                                      cfg.hflip and split == "train", cfg.num_workers)
        return {"idx": idx, "idx_flip": idx_flip, "labels": ds.labels[mine].clone(),
                "num_classes": ds.num_classes, "class_names": ds.class_names}
    return cached_tokens(Path(cfg.out_dir) / "tokens.pt", identity, encode_split)


# ============================================================================================
# 5. Stage 2: the generator (M-VAR, or VAR with --arch var)
# ============================================================================================

def model_config_for(cfg: TrainConfig, tok_cfg, num_classes: int) -> MVARConfig:
    """TrainConfig + the tokenizer's config -> MVARConfig (vocab, Cvae and the scales come from
    the tokenizer, so the two can never disagree)."""
    return MVARConfig(arch=cfg.arch, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads,
                      num_classes=num_classes, vocab_size=tok_cfg.vocab_size, Cvae=tok_cfg.z_channels,
                      patch_nums=tok_cfg.patch_nums, cond_drop=cfg.cond_drop, drop_path=cfg.drop_path,
                      alng=cfg.alng, d_state=cfg.d_state, headdim=cfg.headdim, expand=cfg.expand)


def train_generator(cfg: TrainConfig, d: DistInfo, tokenizer: MultiScaleVQVAE, deadline: float = math.inf):
    """Stage 2. Trains (or resumes) the generator on the token cache; writes RUN/<arch>.pt,
    RUN/<arch>_loss.png, RUN/<arch>_samples.png, RUN/<arch>_eval.json. Returns the model
    (eval mode), or None if the time budget / --stop_after ended this invocation first."""
    run, path = Path(cfg.out_dir), Path(cfg.out_dir) / f"{cfg.arch}.pt"   # mvar.pt / var.pt
    cache = token_cache(cfg, d, tokenizer)
    pns = tokenizer.cfg.patch_nums
    train_ds, test_ds = TokenDataset(cache["train"], cfg.seed), TokenDataset(cache["test"])
    num_classes, class_names = cache["num_classes"], cache["class_names"]
    check_labels(train_ds.labels, num_classes, "token cache (train)")
    check_labels(test_ds.labels, num_classes, "token cache (test)")
    if cfg.gen_batch % (d.world_size * cfg.grad_accum):
        raise ValueError(f"--gen_batch {cfg.gen_batch} must be divisible by processes x grad_accum "
                         f"= {d.world_size} x {cfg.grad_accum}")
    micro = cfg.gen_batch // (d.world_size * cfg.grad_accum)
    mcfg = model_config_for(cfg, tokenizer.cfg, num_classes)
    torch.manual_seed(cfg.seed)                        # identical init on every rank
    model = MVAR(mcfg).to(d.device)
    peak_lr = cfg.base_lr * cfg.gen_batch / 256        # VAR's linear scaling rule
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                            fused=(d.device.type == "cuda") or None)
    amp_dtype, scaler = amp_setup(cfg, d.device)
    sampler = ShardedSampler(len(train_ds), cfg.gen_batch, cfg.seed, d.rank, d.world_size)
    total = max(1, round(cfg.gen_epochs * sampler.steps_per_epoch))
    torch.manual_seed(cfg.seed * 1000 + d.rank)        # per-rank stream: class dropout, drop-path
    step, history = 0, []
    if path.exists():
        ck = load_checkpoint(path, "generator")
        check_same_run(ck["config"]["train"], dataclasses.asdict(cfg), path, STAGE2_FIELDS)
        if ck["tokenizer_sha256"] != cache["identity"]["tokenizer_sha256"]:
            raise ValueError(f"{path} was trained on the tokens of another tokenizer.pt (sha256 "
                             "differs); use another --out_dir, or delete it to start stage 2 over")
        load_state_dict_checked(model, ck["model"], what=f"{cfg.arch} generator")
        opt.load_state_dict(ck["optimizer"])
        if scaler and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, history = ck["step"], ck["history"]
        restore_rng(ck["rng"])
        d.print(f"stage 2: resuming {path} at step {step}/{total}")
    if step >= total:
        return model.eval()
    d.print(f"stage 2: {cfg.arch} depth {mcfg.depth} width {mcfg.width}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, L={mcfg.seq_len} tokens, "
            f"{len(train_ds)} images{' (+ flipped copies)' if train_ds.flip is not None else ''}, "
            f"{total} steps of {cfg.gen_batch}, peak lr {peak_lr:.2e}")
    net = wrap_ddp(model, d)
    net = torch.compile(net) if cfg.compile else net

    def checkpoint(done):
        rng = gather_rng()
        if d.is_main:
            save_checkpoint({
                "kind": "generator", "config": {"train": dataclasses.asdict(cfg),
                                                "tokenizer": tokenizer.cfg.to_dict(), "model": mcfg.to_dict()},
                "class_names": class_names, "tokenizer_path": "tokenizer.pt",
                "tokenizer_sha256": cache["identity"]["tokenizer_sha256"],
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler else {}, "step": step, "total_steps": total,
                "rng": rng, "history": history, "done": done}, path)

    def pictures(final):
        if d.is_main:
            name = run / f"{cfg.arch}_samples.png" if final else run / "images" / f"{cfg.arch}_step{step:07d}.png"
            sample_grid(model, tokenizer, cfg, class_names, name, d.device)
            save_loss_plot(history, run / f"{cfg.arch}_loss.png", f"stage 2: {cfg.arch}")

    model.train()
    bar = tqdm(total=total, initial=step, desc=f"stage 2 {cfg.arch}", disable=not d.is_main, dynamic_ncols=True)
    steps_here, running, t0 = 0, [], time.time()
    for idx_BL, labels in step_loader(train_ds, sampler, step, total):
        lr = lr_at(step, total, peak_lr, cfg.warmup_frac, cfg.end_lr_ratio)
        wd = wd_at(step, total, cfg.weight_decay, cfg.weight_decay_end)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
        idx_BL, labels = idx_BL.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        loss_sum, acc_sum = 0.0, 0.0
        for j in range(cfg.grad_accum):                # gradient accumulation over micro-batches
            part = slice(j * micro, (j + 1) * micro)
            # The ground-truth token maps of the batch: K tensors (B, pn_k^2), coarse to fine.
            idx_list = split_scales(idx_BL[part], pns)
            # Teacher forcing: the input for scale k is built from the *true* scales 0..k-1
            # (tokenizer.idx_to_teacher_input), so every scale is trained in one pass.
            with torch.no_grad():
                teacher = tokenizer.idx_to_teacher_input(idx_list)        # (B, L - pn_0^2, Cvae)
            # DDP all-reduces gradients at every backward unless told not to: only the last
            # micro-batch needs it.
            last = j == cfg.grad_accum - 1
            no_sync = net.no_sync() if (d.world_size > 1 and not last and hasattr(net, "no_sync")) \
                else contextlib.nullcontext()
            with no_sync:
                with autocast(d.device, amp_dtype):
                    logits = net(labels[part], teacher)                   # (B, L, V)
                loss, acc = compute_loss(logits, idx_list)   # cross-entropy over all L tokens
                (scaler.scale(loss / cfg.grad_accum) if scaler else loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            acc_sum = acc_sum + acc.detach().float().cpu() / cfg.grad_accum
        grad_norm = optimizer_step(opt, model, scaler, cfg.grad_clip)
        step, steps_here = step + 1, steps_here + 1
        running.append(loss_sum)
        if step % cfg.log_every == 0 or step == total:
            history.append([step, sum(running) / len(running), lr])
            running = []
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc="/".join(f"{100 * a:.0f}" for a in acc_sum),
                        gnorm=f"{float(grad_norm):.2f}",
                        tok_s=f"{steps_here * cfg.gen_batch * mcfg.seq_len / max(1e-9, time.time() - t0):.0f}")
        if step % cfg.image_every == 0 and step < total:
            pictures(final=False)
        if checkpoint_or_stop(cfg, d, deadline, step, total, steps_here, checkpoint, bar, "stage 2", path):
            return None
    bar.close()
    if d.is_main:
        res = eval_generator(model, tokenizer, test_ds, micro, cfg.eval_images, d.device, amp_dtype)
        res.update(arch=cfg.arch, steps=total, train_loss_last=history[-1][1] if history else None)
        write_json(res, run / f"{cfg.arch}_eval.json")
        print(f"stage 2 eval on {res['tokens_images']} test images: loss {res['val_loss']:.4f}, "
              "per-scale accuracy " + " ".join(f"{100 * a:.1f}%" for a in res["per_scale_acc"]))
        pictures(final=True)
        print(f"wrote {path}, {run / f'{cfg.arch}_samples.png'}, {run / f'{cfg.arch}_loss.png'}")
    d.barrier()
    return model.eval()


@torch.no_grad()
def eval_generator(model, tokenizer, ds: TokenDataset, batch: int, limit: int, device, amp_dtype) -> dict:
    """Teacher-forced validation: mean loss and per-scale top-1 token accuracy (eval mode: no
    class dropout, so this scores the conditional model)."""
    model.eval()
    pns, n = tokenizer.cfg.patch_nums, min(limit or len(ds), len(ds))
    tot_loss, tot_acc = 0.0, torch.zeros(len(pns))
    for s in range(0, n, batch):
        idx_list = split_scales(ds.idx[s:min(n, s + batch)].long().to(device), pns)
        labels = ds.labels[s:min(n, s + batch)].to(device)
        with autocast(device, amp_dtype):
            logits = model(labels, tokenizer.idx_to_teacher_input(idx_list))
        loss, acc = compute_loss(logits, idx_list)
        tot_loss += loss.item() * len(labels)
        tot_acc += acc.float().cpu() * len(labels)
    return {"tokens_images": n, "val_loss": tot_loss / n,
            "per_scale_acc": [round(float(a), 4) for a in tot_acc / n], "patch_nums": list(pns)}


@torch.no_grad()
def sample_grid(model, tokenizer, cfg: TrainConfig, class_names, path, device) -> None:
    """Sample grid PNG: one column per class (the first 10), samples_per_class rows, fixed seed."""
    was_training, classes = model.training, min(len(class_names), 10)
    labels = torch.arange(classes, device=device).repeat(cfg.samples_per_class)
    images = model.eval().generate(tokenizer, labels, guidance=cfg.guidance, top_k=cfg.top_k, top_p=cfg.top_p,
                                   generator=torch.Generator(device=device).manual_seed(cfg.seed))
    save_image_grid(images, path, classes, column_labels=class_names[:classes])
    model.train(was_training)


# ============================================================================================
# 6. main
# ============================================================================================

def main(argv=None) -> dict:
    """Run the requested stage(s). Returns {"tokenizer": ..., "generator": ...} (the trained
    modules, or None for a stage that did not run to the end)."""
    cfg = parse_args(argv)
    tokenizer_config_for(cfg, in_channels=3)   # an impossible scale schedule fails here, before any work
    d = setup_distributed(cfg.device)
    deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
    if d.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        write_json(dataclasses.asdict(cfg), Path(cfg.out_dir) / "config.json")
    d.print(f"run folder {cfg.out_dir}: preset {cfg.preset}, stage {cfg.stage}, arch {cfg.arch}, "
            f"{d.world_size} process(es) on {d.device}")
    out = {"tokenizer": None, "generator": None}
    try:
        if cfg.stage in ("tokenizer", "all"):
            out["tokenizer"] = train_tokenizer(cfg, d, deadline)
        if cfg.stage == "generator" or (cfg.stage == "all" and out["tokenizer"] is not None):
            tok = out["tokenizer"] or load_trained_tokenizer(Path(cfg.out_dir) / "tokenizer.pt", d.device)[0]
            out["generator"] = train_generator(cfg, d, tok, deadline)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig: every field is a flag `--field value` (runtime.parse_config_args)."""
    return parse_config_args(argv, TrainConfig, PRESETS, make_config, _CHOICES,
                             "Train the M-VAR tokenizer and generator.")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad settings, data or checkpoints: the
        print(f"error: {e}", file=sys.stderr)      # message says what to fix; a traceback
        sys.exit(2)                                # would only bury it
