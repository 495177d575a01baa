"""train.py -- train M-VAR in two stages, on one CPU, one GPU or many (torchrun).

Stage 1 trains the multi-scale VQ tokenizer (tokenizer.py) on images, or imports VAR's released
one. Then every image is encoded once into its K token maps. Stage 2 trains the generator
(mvar.py) on those tokens by teacher forcing: one forward pass, one cross-entropy over all L
tokens, and every scale is trained at once.

    python train.py                                   # tiny built-in data, both stages, CPU ok
    python train.py --preset fashion-mnist            # both stages, about 50 min on a 2-core CPU
    python train.py --preset fashion-mnist --stage generator --arch var   # VAR, same tokens
    torchrun --nproc_per_node=8 train.py --preset imagenet256-d16 \\
        --data_dir /data/imagenet --vae_ckpt /ckpt/vae_ch160v4096z32.pth

Re-running the same command resumes from the run folder (--out_dir, default runs/<preset>):
config.json; tokenizer.pt, tokenizer_eval.json, tokenizer_recon.png, tokenizer_loss.png
(stage 1); tokens.pt (the token cache); <arch>.pt, <arch>_eval.json, <arch>_loss.png,
<arch>_samples.png, images/<arch>_step*.png (stage 2; <arch> = mvar | var).

The three ideas of this chapter:
  * Teacher forcing (VAR, arXiv 2404.02905, §3). The model factorises an image as
    p(r_1..r_K) = prod_k p(r_k | r_<k): each scale's token map given the coarser ones. In
    training the true maps r_<k are known, so the input of *every* scale is built from them at
    once (tokenizer.idx_to_teacher_input), and one pass yields the logits of all L tokens. The
    model lets scale k see only inputs of scales <= k (VAR: a block-causal mask; M-VAR: attention
    inside a scale, a causal Mamba across scales), and that input is built from r_<k alone, so
    each prediction sees exactly what sampling will give it -- with the difference that in
    sampling r_<k are the model's own draws (notebook 02 checks the logits agree).
  * The schedule (VAR's trainer, which M-VAR's official README says it keeps: "The
    hyperparameters of training are same as that in VAR."): AdamW with betas (0.9, 0.95), a peak
    learning rate that grows with the batch (1e-4 per 256 images), a short linear warm-up
    (AdamW's early steps rest on noisy moment estimates), then a linear decay; weight decay only
    on weight matrices.
  * Class dropout for classifier-free guidance: with probability cond_drop (0.1) the class is
    replaced by a null class (MVAR.forward), so one network also learns the unconditional
    distribution that guidance extrapolates away from when sampling (MVAR.sample_tokens).

The chapter, top to bottom:
  1. TrainConfig and the presets
  2. the learning-rate schedule, AdamW's parameter groups and the optimizer step
  3. stage 1, the tokenizer loop
  4. encoding the dataset to tokens, once
  5. stage 2, the generator loop: batch -> teacher input -> logits -> loss -> backward -> step
  6. main, and the checks of the settings.
Datasets, the resumable sampler and pictures live in data.py; torchrun, checkpoints, resuming,
the progress bar and the command line in runtime.py (StageRun). Neither is needed for M-VAR.

Paper -> code
  VAR "next-scale prediction", trained by teacher forcing ........ train_generator's loop
  VAR, implementation details: AdamW (0.9, 0.95), weight decay 0.05, lr 1e-4 per 256 images,
      linear warm-up then decay, class dropout 0.1 ................ PRESETS, lr_at, wd_at,
      param_groups, MVARConfig.cond_drop
  M-VAR, experiments: VAR's training hyperparameters ............. the imagenet256-d16..d30 presets
  VQVAE training (VAR's tokenizer, VQGAN-style) .................. train_tokenizer (this project
      uses L1 + L2 + the VQ losses; VAR adds perceptual and GAN losses: pretrained downloads)

Official code -> this file (VAR's repository: train.py, trainer.py, utils/)
  arg_util.Args -> TrainConfig                      lr_control.lr_wd_annealing -> lr_at, wd_at
  lr_control.filter_params -> param_groups          VARTrainer.train_step -> the loop body
  vae.img_to_idxBl at every step -> encode_images, once  dist.initialize -> runtime.setup_distributed
  utils/misc.auto_resume, trainer.state_dict -> runtime.StageRun (resume, checkpoints)

Shape letters (as in mvar.py and tokenizer.py): B batch (per process), Cimg image channels,
S image side, K scales, pn side of one scale's token map, L = sum pn^2 tokens of all scales,
V codebook size, Cvae tokenizer latent channels. `proc` is this process: its rank, the number
of processes and its device (runtime.DistInfo; one process unless started by torchrun).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime import (DATA_FIELDS, DistInfo, StageRun, amp_setup, autocast, distributed, exit_on_error,
                     file_digest, grad_sync, load_trained_tokenizer, load_var_checkpoint, make_config_of,
                     option, parse_config_args, report_generator_eval, report_tokenizer_eval,
                     save_checkpoint, stage_checkpoint, wrap_ddp, write_json)
from data import (ShardedSampler, TokenDataset, cached_tokens, load_dataset, save_generator_pictures,
                  save_loss_plot, save_recon_grid, step_loader)
from mvar import MVAR, MVARConfig, compute_loss
from tokenizer import MultiScaleVQVAE, code_usage, psnr, split_scales, tokenizer_config


# ============================================================================================
# 1. Config: one dataclass, a few presets, and command-line overrides (`--field value`)
# ============================================================================================

@dataclass
class TrainConfig:
    """Every knob of a run, each one a command-line flag (`--field value`; runtime.py builds the
    parser from the fields and their help texts). The defaults are the "tiny" preset; a preset
    below changes only what differs."""
    # --- run control -----------------------------------------------------------------------
    preset: str = option("tiny", "preset the defaults come from (see PRESETS)")
    stage: str = option("all", "tokenizer | generator | all", ("tokenizer", "generator", "all"))
    arch: str = option("mvar", "generator architecture: mvar | var (the VAR baseline)", ("mvar", "var"))
    out_dir: str = option("", "run folder (default runs/<preset>); re-running resumes from it")
    seed: int = option(0, "seed for init, data order and augmentation")
    device: str = option("auto", "auto | cpu | cuda | mps (auto: cuda:LOCAL_RANK if available)")
    precision: str = option("auto", "auto: bf16 on CUDA (fp16 if unsupported), fp32 on CPU",
                            ("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the generator")
    max_minutes: float = option(0.0, "stop cleanly, with a checkpoint, after this many minutes (0 = off)")
    stop_after: int = option(0, "stop cleanly after this many steps of this invocation (0 = off)")
    log_every: int = option(10, "steps between loss-history points")
    ckpt_every: int = option(500, "steps between checkpoints (one is always written at the end)")
    image_every: int = option(500, "steps between reconstruction / sample grid PNGs")
    num_workers: int = option(0, "DataLoader worker processes (helps for JPEG folders)")
    # --- data ------------------------------------------------------------------------------
    dataset: str = option("shapes", "shapes (built-in) | fashion-mnist | cifar10 | folder",
                          ("shapes", "fashion-mnist", "cifar10", "folder"))
    data_dir: str = option("", "dataset folder (default: the dataset's usual place, see the error)")
    download: bool = option(False, "download Fashion-MNIST / CIFAR-10 into data/ if missing")
    image_size: int = option(16, "training resolution (pixels)")
    hflip: bool = option(False, "random horizontal flips (the token cache then keeps flipped copies)")
    subset: int = option(0, "use only the first N images of each split (0 = all); for quick tests")
    shapes_train: int = option(4000, "built-in dataset: number of training images")
    shapes_test: int = option(800, "built-in dataset: number of test images")
    # --- stage 1: tokenizer ----------------------------------------------------------------
    # The tokenizer architecture comes from tokenizer.py's preset (--tok_preset); a non-zero /
    # non-empty value below overrides that field of the preset.
    tok_preset: str = option("32px", "tokenizer.py preset: 32px (S / 4 latents) | var256", ("32px", "var256"))
    tok_ch: int = option(0, "tokenizer base channels (0 = the preset's)")
    tok_ch_mult: tuple = option((), "tokenizer channel multiplier per level (empty = the preset's)")
    tok_z_channels: int = option(0, "tokenizer latent channels Cvae (0 = the preset's)")
    vocab_size: int = option(0, "codebook size V (0 = the preset's)")
    patch_nums: tuple = option((1, 2, 3, 4), "each scale's side pn, coarse to fine (empty = the preset's)")
    tok_batch: int = option(64, "tokenizer global batch size")
    tok_lr: float = option(4e-4, "tokenizer peak learning rate")
    tok_epochs: float = option(8.0, "tokenizer training epochs")
    tok_l1: float = option(1.0, "weight of the L1 pixel loss")
    tok_l2: float = option(1.0, "weight of the L2 pixel loss")
    vae_ckpt: str = option("", "import VAR's released tokenizer from this .pth, instead of training")
    eval_images: int = option(0, "images of the test split used by the final evals (0 = all)")
    # --- stage 2: generator ----------------------------------------------------------------
    depth: int = option(4, "generator depth (width, heads = 0: VAR's rule, 64*depth, depth)")
    width: int = option(128, "model width C (0 = 64*depth)")
    num_heads: int = option(4, "attention heads (0 = depth)")
    d_state: int = option(64, "M-VAR's Mamba-2: SSM state size N (the released models: 64)")
    headdim: int = option(64, "M-VAR's Mamba-2: channels per SSM head P (released: 64)")
    expand: int = option(2, "M-VAR's Mamba-2: inner width = expand * width (released: 2)")
    gen_batch: int = option(64, "generator global batch size (all processes and micro-steps)")
    grad_accum: int = option(1, "gradient accumulation micro-steps per optimizer step")
    base_lr: float = option(4e-3, "generator lr per 256 images: peak lr = base_lr * gen_batch / 256")
    gen_steps: int = option(0, "generator optimizer steps (0 = gen_epochs x the steps of one epoch)")
    gen_epochs: float = option(10.0, "generator training epochs (used when gen_steps is 0)")
    warmup_frac: float = option(0.02, "share of the steps in linear warm-up, both stages (VAR: ep/50)")
    end_lr_ratio: float = option(0.1, "last lr / peak lr, after the linear decay, both stages (VAR's wpe)")
    weight_decay: float = option(0.05, "AdamW weight decay of the weight matrices (see NO_DECAY_KEYS)")
    weight_decay_end: float = option(0.05, "weight decay at the end (cosine from weight_decay; VAR's twde)")
    grad_clip: float = option(2.0, "gradient-norm clip, both stages")
    alng: float = option(1e-3, "AdaLN gate init scale (VAR's commands: 1e-3 d16-d20, 1e-4 d24, 1e-5 d30)")
    drop_path: float = option(-1.0, "max drop-path rate (-1 = 0.1*depth/24, the VAR rule)")
    cond_drop: float = option(0.1, "probability of replacing the class by the null class (for CFG)")
    guidance: float = option(1.5, "classifier-free guidance for the sample grids")
    top_k: int = option(0, "top-k for the sample grids (0 = off)")
    top_p: float = option(0.0, "top-p for the sample grids (0 = off)")
    samples_per_class: int = option(4, "sample grid: images per class (first 10 classes)")


# Presets change only what differs from the defaults above ("tiny": 16 px shapes, 4x4 latents,
# a depth-4 width-128 generator, both stages in minutes on a CPU). The ImageNet ones
# are VAR's / M-VAR's released training commands (M-VAR's README: "The hyperparameters of
# training are same as that in VAR."), warm-up ep/50 (VAR's default); each preset lists what its command sets.
# How the fashion-mnist values were chosen: benchmarks/RESULTS.md, "The recipe, and where its
# numbers come from".
_IMAGENET = dict(dataset="folder", image_size=256, tok_preset="var256", patch_nums=(), width=0, num_heads=0,
                 vae_ckpt="data/vae_ch160v4096z32.pth", gen_batch=768, base_lr=1e-4, num_workers=8,
                 log_every=100, ckpt_every=2000, image_every=5000, eval_images=10000, samples_per_class=1)
PRESETS = {
    "tiny": dict(),
    # Native 28 px images, 7x7 latents, L = 88 tokens; one tokenizer epoch; 4,737 generator steps
    # of 32 images at peak lr 4e-3 (base_lr 32e-3 x 32 / 256); a Mamba sized for width 128.
    "fashion-mnist": dict(dataset="fashion-mnist", image_size=28, patch_nums=(1, 2, 3, 5, 7),
                          tok_epochs=1.0, tok_batch=32, tok_lr=2e-3, d_state=16, headdim=32, expand=1,
                          gen_batch=32, base_lr=32e-3, gen_steps=4737, guidance=3.0),
    # 32px tokenizer with its own 8x8 pyramid (patch_nums=()), VAR's size rule (width, heads = 0).
    "cifar10": dict(dataset="cifar10", image_size=32, patch_nums=(), hflip=True, tok_ch=64, tok_epochs=40.0,
                    depth=8, width=0, num_heads=0, gen_batch=256, base_lr=4e-4, gen_epochs=200.0,
                    ckpt_every=2000, image_every=2000, num_workers=2),
    "imagenet256-d16": dict(_IMAGENET, depth=16, gen_epochs=200.0, alng=1e-3, end_lr_ratio=0.1),
    "imagenet256-d20": dict(_IMAGENET, depth=20, gen_epochs=250.0, alng=1e-3, end_lr_ratio=0.1),
    "imagenet256-d24": dict(_IMAGENET, depth=24, gen_epochs=350.0, base_lr=8e-5, alng=1e-4,
                            end_lr_ratio=0.01),
    "imagenet256-d30": dict(_IMAGENET, depth=30, gen_epochs=350.0, base_lr=8e-5, alng=1e-5,
                            end_lr_ratio=0.01, gen_batch=1024, weight_decay_end=0.08),
}


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's TrainConfig with `overrides` applied (the Python twin of the command line).
    A length given in epochs (gen_epochs) replaces a preset's length in steps (gen_steps)."""
    if "gen_epochs" in overrides and "gen_steps" not in overrides:
        overrides["gen_steps"] = 0
    return make_config_of(TrainConfig, PRESETS, preset, overrides)


# ============================================================================================
# 2. The schedule: learning rate, weight decay, and which parameters decay
# ============================================================================================

def lr_at(step: int, total: int, peak: float, warmup_frac: float, end_ratio: float) -> float:
    """Linear warm-up to `peak` over the first warmup_frac of the steps, then linear decay to
    end_ratio * peak at the last step (VAR's schedule, without its 5% plateau).

    Warm-up step s (0-based) uses peak * (s+1)/W, so step 0 already moves and step W-1 reaches
    the peak (VAR's warm-up starts from 0.005 * peak instead, and reaches it one step later); the
    decay runs from step W (peak) to step total-1 (end_ratio * peak).

    Why: the first steps rest on AdamW's noisy early moment estimates and on a random network, so
    they are kept small; the decay then shrinks the noise of the last steps, which lowers the
    final loss.
    """
    warm = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (1.0 - (1.0 - end_ratio) * min(1.0, (step - warm) / max(1, total - 1 - warm)))


def wd_at(step: int, total: int, wd: float, wd_end: float) -> float:
    """Weight decay from wd to wd_end along a half cosine (VAR's --twde; its d30 command raises it
    from 0.05 to 0.08, every other preset keeps it constant)."""
    progress = min(1.0, step / max(1, total - 1))
    return wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * progress))


def set_schedule(opt, step: int, total: int, peak_lr: float, cfg: TrainConfig) -> float:
    """Give every parameter group the learning rate and weight decay of `step`; -> the lr.
    A group's wd_scale (param_groups) is 1 where weights decay, 0 where they must not."""
    lr = lr_at(step, total, peak_lr, cfg.warmup_frac, cfg.end_lr_ratio)
    wd = wd_at(step, total, cfg.weight_decay, cfg.weight_decay_end)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = lr, wd * g.get("wd_scale", 0.0)
    return lr


# Parameters that must not shrink toward zero: position / level embeddings, the cosine-attention
# temperature, what Mamba2 marks `_no_weight_decay` (dt_bias, A_log: each SSM head's time scale;
# the skip weight D), as mamba_ssm does; biases and norm weights, caught by ndim <= 1. Decay on
# them would not regularise anything: it would only pull a gain, an offset or a time scale
# toward a value (0) that means something else.
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight matrices (decayed), and (not decayed) every parameter with
    ndim <= 1, marked `_no_weight_decay`, or named in NO_DECAY_KEYS (see the comment above)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or any(k in name for k in NO_DECAY_KEYS)
        if p.requires_grad:
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0}]


def optimizer_step(opt, model, scaler, grad_clip: float) -> torch.Tensor:
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping.
    fp16 needs the GradScaler (it unscales before clipping); bf16 and fp32 pass scaler=None."""
    if scaler:
        scaler.unscale_(opt)
    # Clipping bounds the step when one batch's gradient is unusually large (VAR: --tclip 2).
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
    over = {"ch": cfg.tok_ch, "ch_mult": cfg.tok_ch_mult, "z_channels": cfg.tok_z_channels,
            "vocab_size": cfg.vocab_size, "patch_nums": cfg.patch_nums}
    return tokenizer_config(cfg.tok_preset, image_size=cfg.image_size, in_channels=in_channels,
                            **{k: v for k, v in over.items() if v})


def train_tokenizer(cfg: TrainConfig, proc: DistInfo, deadline: float = math.inf) -> MultiScaleVQVAE | None:
    """Stage 1. Trains (or resumes, or imports) the tokenizer; writes RUN/tokenizer.pt,
    RUN/tokenizer_recon.png, RUN/tokenizer_eval.json. Returns the finished tokenizer (eval
    mode), or None if the time budget / --stop_after ended this invocation first.

    The loss is the pixel loss of the reconstruction plus vq_loss, the codebook and commitment
    terms of every scale (tokenizer.py); the encoder gets its gradient through the quantizer by
    the straight-through estimator. Codes that fall out of use are restarted by the model itself
    (MultiScaleVQVAE.update_code_usage, where the tokenizer preset turns it on)."""
    run, path = Path(cfg.out_dir), Path(cfg.out_dir) / "tokenizer.pt"
    if cfg.vae_ckpt:                                   # the ImageNet presets: VAR's released tokenizer
        return import_var_tokenizer(cfg, proc, path)
    train_ds, test_ds = load_dataset(cfg, "train"), load_dataset(cfg, "test", download_ok=False)
    torch.manual_seed(cfg.seed)                        # identical init on every rank
    model = MultiScaleVQVAE(tokenizer_config_for(cfg, in_channels=train_ds[0][0].shape[0])).to(proc.device)
    # No weight decay: it would pull the codebook and the convs toward 0 for no benefit here.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.tok_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = ShardedSampler(len(train_ds), cfg.tok_batch, cfg.seed, proc.rank, proc.world_size)
    total = max(1, round(cfg.tok_epochs * sampler.steps_per_epoch))
    torch.manual_seed(cfg.seed * 1000 + proc.rank)        # per-rank stream (dead-code restarts)
    amp_dtype, scaler = amp_setup(cfg, proc.device)
    stage = StageRun("tokenizer", cfg, proc, path, total, deadline, model, opt, scaler)   # runtime.py
    step = stage.resume()
    if step >= total:
        return model.eval().requires_grad_(False)
    net = wrap_ddp(model, proc)
    preview = torch.stack([test_ds[i][0] for i in range(min(8, len(test_ds)))]).to(proc.device)
    for img, _ in step_loader(train_ds, sampler, step, total, cfg.num_workers, proc.device.type == "cuda"):
        img = img.to(proc.device, non_blocking=True)      # (B, Cimg, S, S) in [-1, 1]
        set_schedule(opt, step, total, cfg.tok_lr, cfg)
        with autocast(proc.device, amp_dtype):
            recon, vq_loss, stats = net(img)           # encode, quantize every scale, decode
        recon = recon.float()
        # Pixel loss: L1 keeps edges sharp, L2 (= the PSNR objective) fixes large errors.
        loss = cfg.tok_l1 * F.l1_loss(recon, img) + cfg.tok_l2 * F.mse_loss(recon, img) + vq_loss
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, model, scaler, cfg.grad_clip)
        step += 1
        stage.record(step, loss.item(), psnr=psnr(img, recon.detach()).mean(), used=stats["used"])
        if step % cfg.image_every == 0 and step < total and proc.is_main:
            save_recon_grid(model, preview, run / "tokenizer_recon.png")
        if stage.checkpoint_or_stop(step):
            return None
    stage.close()
    if proc.is_main:                                      # originals above, reconstructions below
        save_recon_grid(model, preview, run / "tokenizer_recon.png")
        res = eval_tokenizer(model, test_ds, cfg.tok_batch, cfg.eval_images, proc.device)
        report_tokenizer_eval(res, run)
        save_loss_plot(stage.history, run / "tokenizer_loss.png", "stage 1: tokenizer")
    proc.barrier()
    return model.eval().requires_grad_(False)


def import_var_tokenizer(cfg: TrainConfig, proc: DistInfo, path: Path) -> MultiScaleVQVAE:
    """ImageNet presets: stage 1 = convert VAR's released tokenizer into RUN/tokenizer.pt (`path`).
    VAR trained it on OpenImages with perceptual and GAN losses; it is used frozen, as in VAR."""
    if path.exists():                                  # imported by an earlier invocation
        return load_trained_tokenizer(path, proc.device)[0]
    # Its architecture is read from the file's shapes: VAR's release gives exactly tokenizer.py's
    # "var256" (tests/test_golden.py), and a smaller file in VAR's format works the same way.
    var_scales = tokenizer_config("var256").patch_nums
    model = load_var_checkpoint(cfg.vae_ckpt, patch_nums=var_scales).to(proc.device)
    if proc.is_main:
        print(f"stage 1: imported VAR's tokenizer from {cfg.vae_ckpt}")
        report_tokenizer_eval(eval_tokenizer(model, load_dataset(cfg, "test"), cfg.tok_batch,
                                             cfg.eval_images, proc.device), path.parent)
        save_checkpoint(stage_checkpoint("tokenizer", cfg, model, source=cfg.vae_ckpt), path)
    proc.barrier()
    return model


@torch.no_grad()
def eval_tokenizer(model: MultiScaleVQVAE, ds, batch: int, limit: int, device) -> dict:
    """Test-set PSNR (dB, mean over images) and, per scale, how many codes are used and their
    perplexity (exp of the entropy of code use: V if all codes were used equally often)."""
    n, psnrs, idx_batches = min(limit or len(ds), len(ds)), [], []
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


# ============================================================================================
# 4. Encoding the dataset to tokens, once
# ============================================================================================
# The generator never sees pixels: it learns from the K token maps of every image. Encoding
# them once, instead of at every step as VAR's trainer does, takes the tokenizer's encoder out of
# every step of stage 2 (the price: one fixed crop per image, see SCALING_UP.md). With --hflip
# the mirrored image is encoded too (its tokens are not a mirror of the tokens: the residual
# quantizer is not mirror-symmetric), and training picks one of the two.

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


def token_cache(cfg: TrainConfig, proc: DistInfo, tokenizer: MultiScaleVQVAE) -> dict:
    """RUN/tokens.pt, built by encode_images and kept while the tokenizer file (by sha256), the
    data settings and --data_dir stay the same (the file handling is data.cached_tokens)."""
    identity = {"tokenizer_sha256": file_digest(Path(cfg.out_dir) / "tokenizer.pt"),
                "data": {k: getattr(cfg, k) for k in DATA_FIELDS + ("data_dir",)},
                "patch_nums": list(tokenizer.cfg.patch_nums)}

    def encode_split(split, rank, world):
        ds = load_dataset(cfg, split, download_ok=False)
        mine = list(range(rank, len(ds), world))
        idx, idx_flip = encode_images(tokenizer.eval(), ds, mine, cfg.tok_batch, proc.device,
                                      cfg.hflip and split == "train", cfg.num_workers)
        return {"idx": idx, "idx_flip": idx_flip, "labels": ds.labels[mine].clone(),
                "num_classes": ds.num_classes, "class_names": ds.class_names}
    return cached_tokens(Path(cfg.out_dir) / "tokens.pt", identity, encode_split)


# ============================================================================================
# 5. Stage 2: the generator (M-VAR, or VAR with --arch var)
# ============================================================================================
# M-VAR and VAR train the same way here: the same tokens, loop, schedule and number of steps;
# only the blocks differ (--arch). That keeps the comparisons in benchmarks/RESULTS.md fair.

def model_config_for(cfg: TrainConfig, tok_cfg, num_classes: int) -> MVARConfig:
    """TrainConfig + the tokenizer's config -> MVARConfig (vocab, Cvae and the scales come from
    the tokenizer, so the two can never disagree)."""
    return MVARConfig(arch=cfg.arch, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads,
                      num_classes=num_classes, vocab_size=tok_cfg.vocab_size, Cvae=tok_cfg.z_channels,
                      patch_nums=tok_cfg.patch_nums, cond_drop=cfg.cond_drop, drop_path=cfg.drop_path,
                      alng=cfg.alng, d_state=cfg.d_state, headdim=cfg.headdim, expand=cfg.expand)


def train_generator(cfg: TrainConfig, proc: DistInfo, tokenizer: MultiScaleVQVAE, deadline: float = math.inf):
    """Stage 2: train (or resume) the generator on the token cache -> RUN/<arch>.pt (mvar.pt or
    var.pt), its eval and its pictures. Each step is VAR's train_step: the batch's true token maps
    -> the teacher input -> logits -> cross-entropy -> backward -> clip and AdamW step (class
    dropout happens inside the model's forward). Returns the model (eval mode), or None when the
    time budget / --stop_after ended this invocation first."""
    cache = token_cache(cfg, proc, tokenizer)
    train_ds, test_ds = TokenDataset(cache["train"], cfg.seed), TokenDataset(cache["test"])
    pns, micro = tokenizer.cfg.patch_nums, cfg.gen_batch // (proc.world_size * cfg.grad_accum)
    torch.manual_seed(cfg.seed)                        # identical init on every rank
    model = MVAR(model_config_for(cfg, tokenizer.cfg, cache["num_classes"])).to(proc.device)
    peak_lr = cfg.base_lr * cfg.gen_batch / 256        # VAR's linear scaling rule
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                            fused=(proc.device.type == "cuda") or None)
    amp_dtype, scaler = amp_setup(cfg, proc.device)
    sampler = ShardedSampler(len(train_ds), cfg.gen_batch, cfg.seed, proc.rank, proc.world_size)
    total = cfg.gen_steps or max(1, round(cfg.gen_epochs * sampler.steps_per_epoch))
    torch.manual_seed(cfg.seed * 1000 + proc.rank)        # per-rank stream: class dropout, drop-path
    path = Path(cfg.out_dir) / f"{cfg.arch}.pt"
    stage = StageRun("generator", cfg, proc, path, total, deadline, model, opt,
                     scaler, tokenizer, cache)          # resume, checkpoints, log: runtime.py
    step = stage.resume()
    if step >= total:
        return model.eval()
    net = torch.compile(wrap_ddp(model, proc)) if cfg.compile else wrap_ddp(model, proc)
    for idx_BL, labels in step_loader(train_ds, sampler, step, total):       # (B, L), (B,)
        lr = set_schedule(opt, step, total, peak_lr, cfg)
        idx_BL, labels = idx_BL.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)
        loss_sum, acc_sum = 0.0, 0.0
        for micro_step in range(cfg.grad_accum):       # gradient accumulation over micro-batches
            part = slice(micro_step * micro, (micro_step + 1) * micro)
            idx_list = split_scales(idx_BL[part], pns)                    # K maps (B, pn_k^2)
            # Teacher forcing: scale k's input is built from the *true* maps of scales < k, so all
            # K predictions p(r_k | r_<k) are made and scored in this one pass (VAR §3).
            with torch.no_grad():
                teacher = tokenizer.idx_to_teacher_input(idx_list)        # (B, L - pn_0^2, Cvae)
            with grad_sync(net, proc, last=micro_step == cfg.grad_accum - 1):   # DDP: all-reduce at the last
                with autocast(proc.device, amp_dtype):
                    logits = net(labels[part], teacher)                   # (B, L, V)
                loss, acc = compute_loss(logits, idx_list)   # cross-entropy over all L tokens
                # Dividing by grad_accum makes the summed gradients those of the whole batch;
                # fp16 scales the loss up so that small gradients do not round to zero.
                (scaler.scale(loss / cfg.grad_accum) if scaler else loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            acc_sum = acc_sum + acc.detach().float().cpu() / cfg.grad_accum
        grad_norm = optimizer_step(opt, model, scaler, cfg.grad_clip)
        step += 1
        stage.record(step, loss_sum, lr, acc=(100 * acc_sum).round(), gnorm=grad_norm)   # acc: % per scale
        if step % cfg.image_every == 0 and step < total and proc.is_main:
            save_generator_pictures(cfg, model, tokenizer, cache["class_names"], stage.history, step)
        if stage.checkpoint_or_stop(step):
            return None
    stage.close()
    if proc.is_main:
        res = eval_generator(model, tokenizer, test_ds, micro, cfg.eval_images, proc.device, amp_dtype)
        report_generator_eval(dict(res, arch=cfg.arch, steps=total, train_loss_last=stage.history[-1][1]),
                              Path(cfg.out_dir) / f"{cfg.arch}_eval.json")
        save_generator_pictures(cfg, model, tokenizer, cache["class_names"], stage.history)
    proc.barrier()
    return model.eval()


@torch.no_grad()
def eval_generator(model, tokenizer, ds: TokenDataset, batch: int, limit: int, device, amp_dtype) -> dict:
    """Teacher-forced validation: mean loss, and per scale the loss and the top-1 token accuracy
    (eval mode: no class dropout, so this scores the conditional model). The loss is the mean
    negative log-likelihood per token; fine scales hold most tokens, so they weigh most in it."""
    model.eval()
    pns, n = tokenizer.cfg.patch_nums, min(limit or len(ds), len(ds))
    tot_loss, tot_acc, tot_scale_loss = 0.0, torch.zeros(len(pns)), torch.zeros(len(pns))
    for s in range(0, n, batch):
        idx_list = split_scales(ds.idx[s:min(n, s + batch)].long().to(device), pns)
        labels = ds.labels[s:min(n, s + batch)].to(device)
        with autocast(device, amp_dtype):
            logits = model(labels, tokenizer.idx_to_teacher_input(idx_list))
        loss, acc = compute_loss(logits, idx_list)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), torch.cat(idx_list, 1), reduction="none")
        tot_loss += loss.item() * len(labels)
        tot_acc += acc.float().cpu() * len(labels)
        tot_scale_loss += torch.stack([t.mean() for t in split_scales(per_token, pns)]).cpu() * len(labels)
    return {"tokens_images": n, "val_loss": tot_loss / n,
            "per_scale_loss": [round(float(v), 4) for v in tot_scale_loss / n],
            "per_scale_acc": [round(float(a), 4) for a in tot_acc / n], "patch_nums": list(pns)}


# ============================================================================================
# 6. main, and the checks of the settings
# ============================================================================================

def main(argv=None) -> dict:
    """Run the requested stage(s). Returns {"tokenizer": ..., "generator": ...} (the trained
    modules, or None for a stage that did not run to the end)."""
    cfg, out = parse_args(argv), {"tokenizer": None, "generator": None}
    with distributed(cfg.device) as proc:                 # one process, or torchrun's process group
        check_settings(cfg, proc)                         # bad settings fail here, before any work
        deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
        if proc.is_main:
            write_json(asdict(cfg), Path(cfg.out_dir) / "config.json")    # (makes the run folder)
        proc.print(f"run folder {cfg.out_dir}: preset {cfg.preset}, stage {cfg.stage}, arch {cfg.arch}, "
                   f"{proc.world_size} process(es) on {proc.device}")
        if cfg.stage in ("tokenizer", "all"):
            out["tokenizer"] = train_tokenizer(cfg, proc, deadline)
        if cfg.stage == "generator" or (cfg.stage == "all" and out["tokenizer"] is not None):
            tok = out["tokenizer"] or load_trained_tokenizer(Path(cfg.out_dir) / "tokenizer.pt",
                                                             proc.device)[0]
            out["generator"] = train_generator(cfg, proc, tok, deadline)
    return out


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig: every field is a flag `--field value` (runtime.parse_config_args)."""
    return parse_config_args(argv, TrainConfig, PRESETS, make_config,
                             "Train the M-VAR tokenizer and generator.")


def check_settings(cfg: TrainConfig, proc: DistInfo) -> None:
    """What a command line can get wrong that the stages would only find out late (an hour in,
    on the first batch or when the token cache is built); each message names the flag to fix."""
    tokenizer_config_for(cfg, in_channels=3)           # an impossible scale schedule fails here
    v = tokenizer_config("var256")                     # what --vae_ckpt's released file can do
    if cfg.vae_ckpt and (cfg.image_size, tuple(cfg.patch_nums or v.patch_nums)) != (256, v.patch_nums):
        raise ValueError(f"VAR's tokenizer works at {v.image_size}px with patch_nums {v.patch_nums}; "
                         f"got --image_size {cfg.image_size} --patch_nums {cfg.patch_nums}")
    if cfg.stage != "tokenizer" and cfg.gen_batch % (proc.world_size * cfg.grad_accum):
        raise ValueError(f"--gen_batch {cfg.gen_batch} must be divisible by processes x grad_accum "
                         f"= {proc.world_size} x {cfg.grad_accum}")


if __name__ == "__main__":
    exit_on_error(main)            # a bad setting, file or checkpoint: `error: <what to fix>`
