"""train.py -- single-file training for M-VAR: datasets, both stages, checkpoints, DDP.

Read it top to bottom; each numbered section is one idea (SPEC section 5):

  1. TrainConfig     one dataclass holds every knob; presets; `--field value` overrides.
  2. Distributed     torchrun/DDP setup (a no-op for plain `python train.py`).
  3. Data            a built-in procedural dataset (no download), Fashion-MNIST (IDX .gz),
                     CIFAR-10 (python pickles), class-per-folder trees (ImageNet layout).
  4. Sampler         seeded, resumable, rank-sharded batch order (a pure function of step).
  5. Checkpoints     atomic writes, weights_only loads, clear errors, automatic resume.
  6. Schedule        lr warm-up + linear decay, weight-decay groups.
  7. Machinery       mixed precision, RNG gathering, PNG grids, loss plots, stop conditions.
  8. Stage 1         train the multi-scale VQ tokenizer (or import VAR's released one).
  9. Token cache     encode the dataset once to per-scale indices, so stage 2 never encodes.
 10. Stage 2         train the generator (M-VAR, or the VAR baseline with --arch var).
 11. main            `python train.py [--preset NAME] [--stage ...] [--field value ...]`.

Files in the run folder: config.json; tokenizer.pt, tokenizer_eval.json, tokenizer_recon.png,
tokenizer_loss.png (stage 1); tokens.pt (the cache); <arch>.pt, <arch>_eval.json,
<arch>_loss.png, <arch>_samples.png, images/<arch>_step*.png (stage 2; <arch> = mvar | var).

Usage:
    python train.py                                   # tiny built-in data, both stages, CPU ok
    python train.py --preset fashion-mnist            # both stages, 37 min on an idle 2-core CPU
    python train.py --preset fashion-mnist --stage generator --arch var   # VAR, same tokens
    torchrun --nproc_per_node=8 train.py --preset imagenet256-d16 \
        --data_dir /data/imagenet --vae_ckpt /ckpt/vae_ch160v4096z32.pth
Re-running the same command resumes from the run folder (--out_dir, default runs/<preset>).

Shape glossary:
    B    batch size (per process)             N    number of images in a dataset
    C    image channels (1 or 3)              H, W image height, width
    K    number of scales                     pn   side of one scale's token map (pn x pn)
    L    tokens over all scales, sum pn^2     V    codebook size (vocab_size)
    Cvae latent channels of the tokenizer
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import struct
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from mvar import MVAR, MVARConfig, compute_loss
from checkpoints import load_state_dict_checked, load_tokenizer_state, load_var_checkpoint
from tokenizer import MultiScaleVQVAE, TokenizerConfig, code_usage, psnr, tokenizer_config


# ============================================================================================
# 1. Config: one dataclass, a few presets, and command-line overrides
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
    precision: str = _f("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA if supported, "
                                "else fp16; fp32 on CPU)")
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
    gen_batch: int = _f(64, "generator global batch size (over all processes and accumulation)")
    grad_accum: int = _f(1, "gradient accumulation micro-steps per optimizer step")
    base_lr: float = _f(4e-3, "generator lr per 256 images: peak lr = base_lr * gen_batch / 256")
    gen_epochs: float = _f(10.0, "generator training epochs")
    warmup_frac: float = _f(0.02, "fraction of steps spent in linear warm-up (VAR: ep/50)")
    end_lr_ratio: float = _f(0.1, "final lr / peak lr at the end of the linear decay (VAR's wpe)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, pos/level embeddings)")
    weight_decay_end: float = _f(0.05, "weight decay at the end (cosine from weight_decay; VAR's twde)")
    grad_clip: float = _f(2.0, "gradient-norm clip")
    alng: float = _f(1e-3, "AdaLN gate init scale (VAR: 1e-3 for d12-d20, 1e-4 d24, 1e-5 d30)")
    drop_path: float = _f(-1.0, "max drop-path rate (-1 = 0.1*depth/24, the VAR rule)")
    cond_drop: float = _f(0.1, "probability of replacing the class by the null class (for CFG)")
    cfg_scale: float = _f(1.5, "classifier-free guidance for the sample grids")
    top_k: int = _f(0, "top-k for the sample grids (0 = off)")
    top_p: float = _f(0.0, "top-p for the sample grids (0 = off)")
    samples_per_class: int = _f(4, "sample grid: images per class (first 10 classes)")


# Presets change only what differs from the dataclass defaults above (which are "tiny": 16px
# shapes, 4x4 latents, a depth-4 width-128 generator -- sized so `python train.py` finishes
# both stages within 15 minutes on a 2-core CPU).
# ImageNet numbers are VAR's / M-VAR's official training commands ("the hyperparameters of
# training are the same as VAR"): d16 --bs=768 --ep=200 --alng=1e-3 --wpe=0.1; d20 --ep=250;
# d24 --ep=350 --tblr=8e-5 --alng=1e-4 --wpe=0.01; d30 --bs=1024 --ep=350 --tblr=8e-5
# --alng=1e-5 --wpe=0.01 --twde=0.08; warm-up ep/50 (VAR's default), base lr 1e-4 per 256.
# VAR trains those in fp16; we default to bf16 on GPUs that support it (no loss scaling).
_IMAGENET = dict(dataset="folder", image_size=256, tok_preset="var256", patch_nums=(),
                 width=0, num_heads=0,
                 vae_ckpt="data/vae_ch160v4096z32.pth", base_lr=1e-4, num_workers=8,
                 log_every=100, ckpt_every=2000, image_every=5000, eval_images=10000,
                 gen_batch=768, samples_per_class=1)
PRESETS = {
    "tiny": dict(),
    # Both stages in 37 minutes on an idle 2-core CPU with 2 threads (~1 h with 1 thread; README
    # "Fashion-MNIST in 40 minutes"): the native 28x28 images (no padding) with the 32px
    # tokenizer's layers give 7x7 latents and 5 scales, L = 88 tokens; 1 tokenizer epoch; the
    # tiny generator for 1.6 epochs at batch 32, base_lr 8e-3 per 256 images = peak lr 1e-3:
    # many small steps learn more per CPU-second than few big ones.
    "fashion-mnist": dict(dataset="fashion-mnist", image_size=28, patch_nums=(1, 2, 3, 5, 7),
                          tok_epochs=1.0, tok_batch=32, tok_lr=1e-3,
                          gen_batch=32, base_lr=8e-3, gen_epochs=1.6, cfg_scale=3.0),
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
STAGE2_FIELDS = DATA_FIELDS + ("arch", "depth", "width", "num_heads", "gen_batch", "base_lr",
                               "gen_epochs", "warmup_frac", "end_lr_ratio", "weight_decay",
                               "weight_decay_end", "grad_clip", "alng", "drop_path", "cond_drop")
RUNTIME_FIELDS = ("preset", "stage", "out_dir", "device", "precision", "compile", "max_minutes",
                  "stop_after", "log_every", "ckpt_every", "image_every", "num_workers", "download",
                  "data_dir", "vae_ckpt", "eval_images", "grad_accum", "cfg_scale", "top_k", "top_p",
                  "samples_per_class")
_CHOICES = {"stage": ("tokenizer", "generator", "all"), "arch": ("mvar", "var"),
            "dataset": ("shapes", "fashion-mnist", "cifar10", "folder"),
            "precision": ("auto", "fp32", "bf16", "fp16"), "tok_preset": ("32px", "var256")}


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's TrainConfig with `overrides` applied (Python twin of the command line)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(TrainConfig)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; see `python train.py --help`")
    cfg = TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    for name, allowed in _CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("runs", preset)
    return cfg


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {s!r}")


def _tuple_parser(kind):
    def parse(s: str) -> tuple:
        try:
            return tuple(kind(x) for x in s.replace(" ", "").split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list like 1,2,3, got {s!r}")
    return parse


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig. `--preset` is read first, so `--help` shows its defaults.

    Every field is a flag: `--field value`; booleans also as `--flag` / `--no-flag`;
    tuples as comma lists (`--patch_nums 1,2,4,8`). Unknown flags are an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="tiny")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        pre.error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    defaults = TrainConfig(**PRESETS[preset])

    parser = argparse.ArgumentParser(
        usage="python train.py [--preset NAME] [--stage tokenizer|generator|all] [--FIELD VALUE ...]",
        description="Train the M-VAR tokenizer and generator. Presets: " + ", ".join(PRESETS),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in fields(TrainConfig):
        default, help_ = getattr(defaults, f.name), f.metadata["help"]
        flag = "--" + f.name
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default,
                                help=help_, metavar="0|1")
            parser.add_argument("--no-" + f.name, dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, type=_tuple_parser(kind), default=default, help=help_,
                                metavar="A,B,...")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_,
                                choices=_CHOICES.get(f.name))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        flags = [u for u in unknown if u.startswith("-")] or unknown
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(
            u.split("=")[0], known, n=1)) else u for u in flags]
        parser.error("unknown argument(s): " + ", ".join(hints))
    values = vars(args)
    try:
        return make_config(preset, **{k: v for k, v in values.items() if k != "preset"})
    except ValueError as e:
        parser.error(str(e))


# ============================================================================================
# 2. Distributed: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; plain python is one process
# ============================================================================================

@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group only when launched by torchrun with WORLD_SIZE > 1.

    NCCL on CUDA, gloo on CPU. Each process drives the GPU named by LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world, dev)


def barrier(d: DistInfo):
    if d.world_size > 1:
        dist.barrier()


def all_ranks_agree(flag: bool, d: DistInfo) -> bool:
    """True on every rank if `flag` is True on rank 0 (so all ranks stop at the same step)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ============================================================================================
# 3. Data. Every dataset returns (image float (C, H, W) in [-1, 1], label int).
#    Key convention: ds[i] is the evaluation view (centre crop, no flip); ds[(i, epoch)] is
#    the training view, whose random crop/flip comes from a generator seeded by
#    (seed, epoch, i) -- so augmentation is identical after a resume and in any worker.
# ============================================================================================

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes",
                 "checker")
_SHAPE_COLORS = np.array([(230, 60, 50), (60, 200, 70), (60, 90, 230), (235, 210, 50),
                          (210, 70, 210), (50, 210, 220), (245, 140, 40), (235, 235, 235)])


def make_shapes(n: int, image_size: int = 32, seed: int = 0):
    """The built-in dataset: coloured shapes/stripes, one class per kind (see SHAPE_CLASSES).

    Each class has its own shape *and* colour, with random position, size, stripe period
    and colour jitter, on a dark noisy background -- distinct enough for a small classifier
    (so sample quality can be scored), varied enough to be worth modelling.
    Returns images uint8 (n, 3, S, S) and labels int64 (n,), a pure function of the seed.
    """
    rng = np.random.default_rng(seed)
    S = image_size
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES))
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    images = np.empty((n, 3, S, S), np.uint8)
    for i, c in enumerate(labels):
        cy, cx = S / 2 + rng.uniform(-S / 8, S / 8, size=2)
        r = S * rng.uniform(0.22, 0.36)
        dy, dx = yy - cy, xx - cx
        period = rng.uniform(S / 8, S / 4)
        phase = rng.uniform(0, period)
        name = SHAPE_CLASSES[c]
        if name == "circle":
            mask = dy**2 + dx**2 <= r**2
        elif name == "square":
            mask = np.maximum(abs(dy), abs(dx)) <= 0.8 * r
        elif name == "triangle":      # apex up: inside three half-planes
            mask = (dy <= 0.8 * r) & (dy >= 2 * abs(dx) - 1.1 * r)
        elif name == "ring":
            d2 = dy**2 + dx**2
            mask = (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
        elif name == "cross":
            mask = ((abs(dy) <= 0.25 * r) | (abs(dx) <= 0.25 * r)) & (np.maximum(abs(dy), abs(dx)) <= r)
        elif name == "h-stripes":
            mask = ((yy + phase) % period) < period / 2
        elif name == "v-stripes":
            mask = ((xx + phase) % period) < period / 2
        else:                         # checker
            mask = (((yy + phase) // (period / 1.5) + (xx + phase) // (period / 1.5)) % 2) == 0
        color = np.clip(_SHAPE_COLORS[c] + rng.integers(-25, 26, size=3), 0, 255)
        background = rng.integers(0, 40, size=(3, 1, 1)) + rng.integers(0, 12, size=(3, S, S))
        images[i] = np.where(mask[None], color[:, None, None], background).astype(np.uint8)
    return images, torch.from_numpy(labels.astype(np.int64))


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one training draw, independent of workers/resumes."""
    return np.random.default_rng([seed, epoch, index])


def _split_key(key):
    """ds[i] -> (i, None) (evaluation view); ds[(i, epoch)] -> (i, epoch) (training view)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


class TensorImages(torch.utils.data.Dataset):
    """A dataset held in memory as uint8 (N, C, H, W) plus int64 labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 hflip: bool = False, seed: int = 0, name: str = "dataset"):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        check_labels(labels, num_classes, name)
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.hflip, self.seed, self.name = hflip, seed, name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        img = self.images[i].float() / 127.5 - 1.0           # uint8 [0, 255] -> [-1, 1]
        if epoch is not None and self.hflip and _item_rng(self.seed, epoch, i).random() < 0.5:
            img = img.flip(-1)
        return img, int(self.labels[i])


def check_labels(labels: torch.Tensor, num_classes: int, name: str):
    """Labels must be integers in [0, num_classes): catch a wrong file before training."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found "
                         f"[{int(labels.min())}, {int(labels.max())}] -- wrong or corrupt label file?")


# --- Fashion-MNIST: IDX files (big-endian header, then raw bytes), gzipped --------------------

FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (.gz or plain) -> uint8 array of its dims.

    Format: 2 zero bytes, a type byte (0x08 = uint8), the number of dims, then each dim as a
    big-endian uint32, then the data in C order.
    """
    path = str(path)
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            data = fh.read()
    except (OSError, EOFError) as e:                   # BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read it as {'gzip' if path.endswith('.gz') else 'a file'} "
                         f"({e}); the download is probably corrupt -- delete and re-fetch it") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()}, "
                         "expected 0000 08 <ndim>)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header cut short")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    if len(payload) != math.prod(dims):
        raise ValueError(f"{path}: IDX dims {dims} need {math.prod(dims)} bytes, file has "
                         f"{len(payload)} -- truncated or corrupt")
    return np.frombuffer(payload, np.uint8).reshape(dims)


def load_fashion_mnist(root, split: str, image_size: int = 28):
    """Fashion-MNIST split -> uint8 (N, 1, S, S), int64 (N,). S = 28 keeps the images as they
    are; a larger S zero-pads them (the background is black), centred."""
    img_file, lbl_file = FASHION_FILES[split]
    images, labels = read_idx(Path(root) / img_file), read_idx(Path(root) / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: expected images (N, 28, 28) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")
    h, w = images.shape[1:]
    if image_size < max(h, w):
        raise ValueError(f"--image_size {image_size} is smaller than Fashion-MNIST's {h}x{w}")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    x = np.zeros((len(images), 1, image_size, image_size), np.uint8)
    x[:, 0, top:top + h, left:left + w] = images
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


# --- CIFAR-10: python pickles of {b"data": uint8 (10000, 3072), b"labels": [...]} -------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _CifarUnpickler(pickle.Unpickler):
    """Pickle can run arbitrary code; the CIFAR batches only need numpy arrays, so refuse
    everything else."""

    def find_class(self, module, name):
        numpy_ok = module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar")
        if numpy_ok or (module, name) == ("_codecs", "encode"):   # protocol-2 bytes from Python 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar10(root, split: str):
    """CIFAR-10 split -> uint8 (N, 3, 32, 32), int64 (N,)."""
    xs, ys = [], []
    for name in CIFAR_FILES[split]:
        path = Path(root) / name
        try:
            with open(path, "rb") as fh:
                batch = _CifarUnpickler(fh, encoding="bytes").load()
            data, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the CIFAR-10 folder must hold "
                                    f"{', '.join(CIFAR_FILES['train'] + CIFAR_FILES['test'])}")
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                             "delete the folder and re-download it") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape}, {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))              # stored as R plane, G plane, B plane
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# --- class-per-folder trees (ImageNet layout: root/train/<class>/*.JPEG, root/val/<class>/*) --

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


class ImageFolder(torch.utils.data.Dataset):
    """Class-per-folder images (classes = sorted folder names), VAR's preprocessing:
    resize the shorter side to 1.125 x S (Lanczos), crop S x S (random when training, centre
    for evaluation), optional random flip, RGB, [-1, 1]."""

    def __init__(self, root, image_size: int, hflip: bool = False, seed: int = 0, classes=None):
        """classes: the class names in label order (default: root's sorted sub-folders). The
        validation split passes the training split's list, so label i names the same class."""
        from PIL import Image                          # Pillow ships with matplotlib
        self._Image = Image
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not found:
            raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image>")
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root} has class folders the training split lacks: {unknown[:5]}")
        self.files, labels = [], []
        for c, name in enumerate(self.classes):
            if not (root / name).is_dir():
                continue                               # a class absent from this split
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.files += files
            labels += [c] * len(files)
        self.labels = torch.tensor(labels)
        self.num_classes, self.image_size, self.hflip, self.seed = len(self.classes), image_size, hflip, seed
        self.mid_size = round(image_size * 1.125)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        try:
            with self._Image.open(self.files[i]) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError) as e:            # PIL raises these for broken files
            raise ValueError(f"{self.files[i]}: cannot decode the image ({e})") from e
        w, h = im.size
        if min(w, h) != self.mid_size:                 # shorter side -> 1.125 x S
            s = self.mid_size / min(w, h)
            im = im.resize((max(self.mid_size, round(w * s)), max(self.mid_size, round(h * s))),
                           self._Image.LANCZOS)
        x = torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1)   # (3, h, w)
        S, (h, w) = self.image_size, x.shape[1:]
        if epoch is None:
            top, left, flip = (h - S) // 2, (w - S) // 2, False
        else:
            rng = _item_rng(self.seed, epoch, i)
            top, left = int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))
            flip = self.hflip and rng.random() < 0.5
        x = x[:, top:top + S, left:left + S].float() / 127.5 - 1.0
        return (x.flip(-1) if flip else x), int(self.labels[i])


# --- locating / downloading, and the one entry point ------------------------------------------

def _download(url: str, dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    urllib.request.urlretrieve(url, tmp)
    os.replace(tmp, dest)


def _find_data_dir(cfg: TrainConfig, candidates, marker: str) -> Path | None:
    """The first folder holding `marker`; None if none does."""
    for c in ([cfg.data_dir] if cfg.data_dir else candidates):
        if (Path(c) / marker).exists():
            return Path(c)
    return None


def _missing(name: str, looked, how_to_get: str):
    return FileNotFoundError(f"{name} not found: looked in {', '.join(map(str, looked))}. {how_to_get}")


def load_dataset(cfg: TrainConfig, split: str, download_ok: bool = True):
    """The `split` ("train" | "test") of cfg.dataset as a Dataset with .num_classes.

    Training splits get the training view (random crop/flip) through ds[(i, epoch)] keys;
    see the key convention at the top of this section.
    """
    hflip = cfg.hflip and split == "train"
    if cfg.dataset == "shapes":
        n = cfg.shapes_train if split == "train" else cfg.shapes_test
        images, labels = make_shapes(n, cfg.image_size, seed=cfg.seed * 2 + (split == "test"))
        ds = TensorImages(torch.from_numpy(images), labels, len(SHAPE_CLASSES), hflip, cfg.seed, "shapes")
    elif cfg.dataset == "fashion-mnist":
        candidates = ["/usr/share/datasets/fashion-mnist", "data/fashion-mnist"]
        root = _find_data_dir(cfg, candidates, FASHION_FILES[split][0])
        if root is None and cfg.download and download_ok:
            root = Path(cfg.data_dir or "data/fashion-mnist")
            for f in FASHION_FILES["train"] + FASHION_FILES["test"]:
                if not (root / f).exists():
                    _download(FASHION_URL + f, root / f)
        if root is None:
            raise _missing("Fashion-MNIST", [cfg.data_dir] if cfg.data_dir else candidates,
                           "Install the Debian package `dataset-fashion-mnist` (it fills "
                           "/usr/share/datasets/fashion-mnist), or pass --download to fetch it "
                           "into data/fashion-mnist, or point --data_dir at a folder with "
                           + ", ".join(FASHION_FILES["train"] + FASHION_FILES["test"]) + ".")
        images, labels = load_fashion_mnist(root, split, cfg.image_size)
        ds = TensorImages(images, labels, 10, hflip, cfg.seed, f"Fashion-MNIST {root}")
    elif cfg.dataset == "cifar10":
        if cfg.image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; got --image_size {cfg.image_size}")
        candidates = ["data/cifar-10-batches-py"]
        look = [cfg.data_dir, os.path.join(cfg.data_dir, "cifar-10-batches-py")] if cfg.data_dir else candidates
        root = next((Path(c) for c in look if (Path(c) / "test_batch").exists()), None)
        if root is None and cfg.download and download_ok:
            parent = Path(cfg.data_dir or "data")
            archive = parent / "cifar-10-python.tar.gz"
            _download(CIFAR_URL, archive)
            with tarfile.open(archive) as tar:   # the "data" filter refuses unsafe paths
                tar.extractall(parent, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            root = parent / "cifar-10-batches-py"
        if root is None:
            raise _missing("CIFAR-10", look, f"Pass --download to fetch {CIFAR_URL} into data/, "
                           "or point --data_dir at the extracted cifar-10-batches-py folder.")
        images, labels = load_cifar10(root, split)
        ds = TensorImages(images, labels, 10, hflip, cfg.seed, f"CIFAR-10 {root}")
    else:                                                # "folder"
        sub = "train" if split == "train" else "val"
        if not cfg.data_dir:
            raise ValueError("--dataset folder needs --data_dir ROOT with ROOT/train/<class>/* "
                             "and ROOT/val/<class>/* (the ImageNet layout)")
        if not (Path(cfg.data_dir) / sub).is_dir():
            raise _missing(f"image folder '{sub}'", [Path(cfg.data_dir) / sub],
                           f"--data_dir must hold {sub}/<class>/<image files> (for ImageNet, "
                           "the validation images sorted into class folders).")
        classes = None
        if split != "train":                           # label order = the training folders'
            classes = sorted(d.name for d in (Path(cfg.data_dir) / "train").iterdir() if d.is_dir())
        ds = ImageFolder(Path(cfg.data_dir) / sub, cfg.image_size, hflip, cfg.seed, classes)
    if cfg.subset:
        ds = _Subset(ds, cfg.subset)
    return ds


class _Subset(torch.utils.data.Dataset):
    """The first n items of a dataset (keeps .num_classes and the key convention)."""

    def __init__(self, ds, n: int):
        self.ds, self.n, self.num_classes = ds, min(n, len(ds)), ds.num_classes
        self.labels = ds.labels[:self.n]

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return self.ds[key]


# ============================================================================================
# 4. Sampler: the batch of every step is a pure function of (seed, step, rank)
# ============================================================================================

class ShardedSampler:
    """Seeded, resumable, rank-sharded batches (what DistributedSampler does, per step).

    Epoch e visits a permutation of the N items drawn from a generator seeded with
    (seed, e); step s of that epoch takes the next `global_batch` items, and rank r keeps
    every world_size-th of them. The last incomplete global batch is dropped. Because a
    batch depends only on (seed, step), the checkpoint's step *is* the sampler state.
    """

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch of {global_batch}; "
                             "lower the batch size or use more data")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // global_batch
        self._perm_epoch, self._perm = None, None

    def state_dict(self) -> dict:
        return {"n": self.n, "global_batch": self.global_batch, "seed": self.seed}

    def batch(self, step: int) -> tuple[int, list[int]]:
        """-> (epoch, this rank's item indices for optimizer step `step`)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        chunk = self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]
        return epoch, chunk[self.rank::self.world_size].tolist()


class _StepBatches:
    """Batch sampler for a DataLoader: yields the keys [(index, epoch), ...] of steps
    start..end-1 (the training view of every item; see section 3)."""

    def __init__(self, sampler: ShardedSampler, start: int, end: int):
        self.sampler, self.start, self.end = sampler, start, end

    def __len__(self):
        return self.end - self.start

    def __iter__(self):
        for step in range(self.start, self.end):
            epoch, idx = self.sampler.batch(step)
            yield [(i, epoch) for i in idx]


def step_loader(ds, sampler: ShardedSampler, start: int, end: int, num_workers: int = 0, pin: bool = False):
    """Iterate the training batches of steps start..end-1 -> (images (B,C,H,W), labels (B,)).

    The DataLoader gets its own generator: otherwise starting it draws a seed from the global
    RNG, and a resumed run would see different dropout noise than an uninterrupted one.
    """
    return torch.utils.data.DataLoader(ds, batch_sampler=_StepBatches(sampler, start, end),
                                       num_workers=num_workers, pin_memory=pin,
                                       generator=torch.Generator().manual_seed(sampler.seed))


# ============================================================================================
# 5. Checkpoints: {"kind", "config", "model", "optimizer", "step", "rng", ...}
#    Only tensors and plain Python types, so torch.load(weights_only=True) can read them.
# ============================================================================================

def save_checkpoint(obj: dict, path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then os.replace.

    A crash (or Ctrl-C) mid-write leaves the previous checkpoint untouched: os.replace is
    atomic on POSIX and Windows when both names are on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, kind: str, map_location="cpu") -> dict:
    """Load a checkpoint written by save_checkpoint; check it is a `kind` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:     # truncated zip, bad pickle, foreign objects: all mean "unusable"
        raise ValueError(f"checkpoint {path} is corrupt or truncated, or was not written by "
                         f"train.py ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         "Delete it (or restore a copy) and run again.") from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is a {found!r} checkpoint, expected a {kind!r} checkpoint")
    return ckpt


def check_same_run(saved: dict, cfg: TrainConfig, path, defining=STAGE2_FIELDS) -> None:
    """Refuse to resume a run whose defining settings (STAGE1_FIELDS / STAGE2_FIELDS) differ
    from this invocation's."""
    now = dataclasses.asdict(cfg)
    if "arch" in defining and saved.get("arch", cfg.arch) != cfg.arch:
        raise ValueError(f"{path} holds a {saved['arch']!r} generator but this run asks for "
                         f"--arch {cfg.arch}; pass --arch {saved['arch']} or use another --out_dir")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in defining
            if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path} was written by a run with other settings:\n  " + "\n  ".join(diff)
                         + "\nResume with the same settings, or choose another --out_dir.")


def rng_state() -> dict:
    """Every random-number generator training touches, as tensors / plain types."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def file_digest(path) -> str:
    """sha256 of a file: the identity of a tokenizer checkpoint, for the token cache."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ============================================================================================
# 6. Schedule and optimizer groups
# ============================================================================================

def lr_at(step: int, total: int, peak: float, warmup_frac: float, end_ratio: float) -> float:
    """Linear warm-up to `peak` over the first warmup_frac of the steps, then linear decay to
    end_ratio * peak at the last step (VAR's schedule, without its 5% plateau).

    Warm-up step s (0-based) uses peak * (s+1)/W, so step 0 already moves and step W-1
    reaches the peak; the decay runs from step W (peak) to step total-1 (end_ratio * peak).
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


# Parameters that should not shrink toward zero: position/level embeddings, the cosine-
# attention temperature, and Mamba's dt_bias / A_log / D (SPEC section 5). Biases and norm
# weights are caught by their shape (ndim <= 1).
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "dt_bias", "A_log")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into an AdamW group with weight decay and one without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in ("bias", "D") or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0}]


# ============================================================================================
# 7. Shared training machinery: precision, RNG states, images, plots, stop conditions
# ============================================================================================

def amp_setup(cfg: TrainConfig, device: torch.device):
    """-> (autocast dtype or None, GradScaler or None). bf16 needs no loss scaling; fp16 does."""
    prec = cfg.precision
    if prec == "auto":
        prec = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if prec == "fp32":
        return None, None
    if prec == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def gather_rng(d: DistInfo) -> list:
    """Every rank's RNG states (a collective call: all ranks must make it)."""
    mine = rng_state()
    if d.world_size == 1:
        return [mine]
    states = [None] * d.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list, d: DistInfo) -> None:
    if len(states) == d.world_size:
        set_rng_state(states[d.rank])
    elif d.is_main:
        print(f"note: checkpoint was written by {len(states)} processes, now {d.world_size}: "
              "data order is unchanged, dropout randomness restarts from the seed")


def save_image_grid(images: torch.Tensor, path, nrow: int) -> None:
    """images (N, C, H, W) in [0, 1] -> a PNG grid with nrow images per row (2 px gaps)."""
    from PIL import Image
    N, C, H, W = images.shape
    rows = math.ceil(N / nrow)
    grid = torch.ones(C, rows * (H + 2) + 2, nrow * (W + 2) + 2)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if C == 1 else arr).save(path)


def save_loss_plot(history: list, path, title: str) -> None:
    """history: [[step, loss, ...], ...] -> loss-vs-step PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    h = np.array([row[:2] for row in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h[:, 0], h[:, 1])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(obj, path) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _should_stop(cfg: TrainConfig, deadline: float, steps_done_here: int, d: DistInfo) -> bool:
    """Time budget or --stop_after reached? Rank 0 decides for everyone."""
    stop = time.time() > deadline or (cfg.stop_after > 0 and steps_done_here >= cfg.stop_after)
    return all_ranks_agree(stop, d)


def _checkpoint_or_stop(cfg: TrainConfig, d: DistInfo, deadline: float, step: int, total: int,
                        steps_here: int, checkpoint, bar, stage: str, path) -> bool:
    """End of an optimizer step, shared by both stages: checkpoint every ckpt_every steps, at
    the last step, and when the time budget / --stop_after ends this invocation. Returns True
    when the caller should stop now (a later run of the same command resumes)."""
    stop = _should_stop(cfg, deadline, steps_here, d)
    if step % cfg.ckpt_every == 0 or step == total or stop:
        checkpoint(done=step == total)
    if stop and step < total:
        bar.close()
        if d.is_main:
            print(f"{stage}: stopped at step {step}/{total} (checkpoint {path}); run the same command to resume")
        return True
    return False


# ============================================================================================
# 8. Stage 1: the multi-scale VQ tokenizer
# ============================================================================================

def tokenizer_config_for(cfg: TrainConfig, in_channels: int) -> TokenizerConfig:
    """TrainConfig -> TokenizerConfig: the tok_preset with the non-zero tok_* overrides."""
    over = {"image_size": cfg.image_size, "in_channels": in_channels}
    for name, value in (("ch", cfg.tok_ch), ("ch_mult", cfg.tok_ch_mult),
                        ("z_channels", cfg.tok_z_channels), ("vocab_size", cfg.vocab_size),
                        ("patch_nums", cfg.patch_nums)):
        if value:
            over[name] = value
    return tokenizer_config(cfg.tok_preset, **over)


def load_trained_tokenizer(path, device="cpu") -> tuple[MultiScaleVQVAE, dict]:
    """RUN/tokenizer.pt -> (tokenizer in eval mode, checkpoint dict). Refuses an unfinished one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: train the tokenizer first "
                                "(--stage tokenizer, or --stage all)")
    ck = load_checkpoint(path, "tokenizer")
    if not ck["done"]:
        raise ValueError(f"{path} is an unfinished tokenizer run (step {ck['step']} of "
                         f"{ck['total_steps']}); finish it with --stage tokenizer first")
    model = MultiScaleVQVAE(TokenizerConfig.from_dict(ck["config"]["tokenizer"]))
    load_tokenizer_state(model, ck["model"])
    return model.to(device).eval().requires_grad_(False), ck


def _tokenizer_payload(cfg, tok_cfg, model, opt, step, total, rng, history, done, **extra) -> dict:
    return {"kind": "tokenizer",
            "config": {"train": dataclasses.asdict(cfg), "tokenizer": tok_cfg.to_dict()},
            "model": model.state_dict(), "optimizer": opt.state_dict() if opt else {},
            "step": step, "total_steps": total, "rng": rng, "history": history, "done": done, **extra}


def import_var_tokenizer(cfg: TrainConfig, d: DistInfo):
    """ImageNet presets: stage 1 = convert VAR's released tokenizer into RUN/tokenizer.pt."""
    src = Path(cfg.vae_ckpt)
    if not src.is_file():
        raise FileNotFoundError(
            f"VAR tokenizer not found at {src}. Download it (436 MB) with\n  mkdir -p {src.parent} && "
            f"wget -O {src} https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth\n"
            "or pass --vae_ckpt PATH.")
    model = load_var_checkpoint(src)
    tok_cfg = model.cfg
    if tok_cfg.image_size != cfg.image_size or tuple(cfg.patch_nums or tok_cfg.patch_nums) != tok_cfg.patch_nums:
        raise ValueError(f"VAR's tokenizer works at {tok_cfg.image_size}px with patch_nums "
                         f"{tok_cfg.patch_nums}; got --image_size {cfg.image_size} --patch_nums {cfg.patch_nums}")
    model = model.to(d.device)
    if d.is_main:
        print(f"stage 1: imported VAR's tokenizer from {src}")
        report_tokenizer_eval(eval_tokenizer(model, load_dataset(cfg, "test"), cfg.tok_batch,
                                             cfg.eval_images, d.device), Path(cfg.out_dir))
        save_checkpoint(_tokenizer_payload(cfg, tok_cfg, model, None, 0, 0, [], [], True,
                                           source=str(src)), Path(cfg.out_dir) / "tokenizer.pt")
    barrier(d)
    return model


@torch.no_grad()
def eval_tokenizer(model: MultiScaleVQVAE, ds, batch: int, limit: int, device) -> dict:
    """Test-set PSNR (dB, mean over images) and per-scale code usage."""
    n = len(ds) if not limit else min(limit, len(ds))
    model.eval()
    psnrs, idx_batches = [], []
    for start in range(0, n, batch):
        items = [ds[i] for i in range(start, min(n, start + batch))]
        img = torch.stack([x for x, _ in items]).to(device)
        idx = model.img_to_idx(img)
        psnrs.append(psnr(img, model.idx_to_img(idx)).cpu())
        idx_batches.append([i.cpu() for i in idx])
    usage = code_usage(idx_batches, model.cfg.vocab_size)
    return {"images": n, "psnr_db": float(torch.cat(psnrs).mean()),
            "codes_used": usage["used"].tolist(), "perplexity": [round(float(p), 2) for p in usage["perplexity"]],
            "patch_nums": list(model.cfg.patch_nums), "vocab_size": model.cfg.vocab_size}


def report_tokenizer_eval(res: dict, run: Path) -> None:
    """Print the stage-1 eval table and write it to RUN/tokenizer_eval.json."""
    write_json(res, run / "tokenizer_eval.json")
    print(f"stage 1 eval on {res['images']} test images: PSNR {res['psnr_db']:.2f} dB")
    print("  per scale  pn: " + " ".join(f"{p:>6}" for p in res["patch_nums"]))
    print("  codes used   : " + " ".join(f"{u:>6}" for u in res["codes_used"]))
    print("  perplexity   : " + " ".join(f"{p:>6.1f}" for p in res["perplexity"]))


def train_tokenizer(cfg: TrainConfig, d: DistInfo, deadline: float = math.inf) -> MultiScaleVQVAE | None:
    """Stage 1. Trains (or resumes, or imports) the tokenizer; writes RUN/tokenizer.pt,
    RUN/tokenizer_recon.png, RUN/tokenizer_eval.json. Returns the finished tokenizer (eval
    mode), or None if the time budget / --stop_after ended this invocation first."""
    run = Path(cfg.out_dir)
    path = run / "tokenizer.pt"
    if cfg.vae_ckpt:
        if path.exists():
            return load_trained_tokenizer(path, d.device)[0]
        return import_var_tokenizer(cfg, d)
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
    if path.exists():
        ck = load_checkpoint(path, "tokenizer")
        check_same_run(ck["config"]["train"], cfg, path, STAGE1_FIELDS)
        load_tokenizer_state(model, ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history = ck["step"], ck["history"]
        restore_rng(ck["rng"], d)
        if d.is_main:
            print(f"stage 1: resuming {path} at step {step}/{total}")
    if step >= total:
        return model.eval().requires_grad_(False)
    amp_dtype, scaler = amp_setup(cfg, d.device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    preview = torch.stack([test_ds[i][0] for i in range(min(8, len(test_ds)))]).to(d.device)

    def checkpoint(done):
        rng = gather_rng(d)
        if d.is_main:
            save_checkpoint(_tokenizer_payload(cfg, tok_cfg, model, opt, step, total, rng, history, done), path)

    def recon_grid():
        if d.is_main:
            model.eval()
            with torch.no_grad():
                rec = model.idx_to_img(model.img_to_idx(preview))
            model.train()
            save_image_grid(torch.cat([preview, rec]).add(1).div(2), run / "tokenizer_recon.png", len(preview))

    model.train()
    bar = tqdm(total=total, initial=step, desc="stage 1 tokenizer", disable=not d.is_main, dynamic_ncols=True)
    loader = step_loader(train_ds, sampler, step, total, cfg.num_workers, d.device.type == "cuda")
    steps_here, running = 0, []
    for img, _ in loader:
        img = img.to(d.device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.tok_lr, cfg.warmup_frac, cfg.end_lr_ratio)
        with autocast(d.device, amp_dtype):
            recon, vq_loss, stats = net(img)
        recon = recon.float()
        # Pixel loss: L1 keeps edges sharp, L2 (= the PSNR objective) fixes large errors.
        loss = cfg.tok_l1 * F.l1_loss(recon, img) + cfg.tok_l2 * F.mse_loss(recon, img) + vq_loss
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
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
        if _checkpoint_or_stop(cfg, d, deadline, step, total, steps_here, checkpoint, bar, "stage 1", path):
            return None
    bar.close()
    recon_grid()
    model.eval().requires_grad_(False)
    if d.is_main:
        report_tokenizer_eval(eval_tokenizer(model, test_ds, cfg.tok_batch, cfg.eval_images, d.device), run)
        save_loss_plot(history, run / "tokenizer_loss.png", "stage 1: tokenizer")
    barrier(d)
    return model


# ============================================================================================
# 9. Token cache: every image as K index maps, computed once (with flipped copies if hflip)
# ============================================================================================

class TokenDataset(torch.utils.data.Dataset):
    """Cached tokens of one split: ds[key] -> (idx (L,) int64, label int). The training view
    ds[(i, epoch)] picks the flipped copy with probability 1/2 when the cache has one."""

    def __init__(self, split: dict, seed: int = 0):
        self.idx, self.labels, self.flip = split["idx"], split["labels"], split.get("idx_flip")
        self.seed = seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        use_flip = self.flip is not None and epoch is not None and _item_rng(self.seed, epoch, i).random() < 0.5
        return (self.flip if use_flip else self.idx)[i].long(), int(self.labels[i])


def split_scales(idx_BL: torch.Tensor, patch_nums) -> list:
    """(B, L) flat tokens -> K tensors (B, pn_k^2), coarse to fine."""
    return list(idx_BL.split([p * p for p in patch_nums], dim=1))


@torch.no_grad()
def _encode(tokenizer, ds, indices, batch: int, device, flip: bool, num_workers: int = 0):
    """Encode ds[i] (evaluation view) for i in indices -> (idx (n, L) int16/int32, the same
    for the mirrored images or None). Encoding runs in float32, so tokens are exact."""
    dtype = torch.int16 if tokenizer.cfg.vocab_size <= 2**15 else torch.int32
    out, out_flip = [], []
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch,
                                         num_workers=num_workers)
    for img, _ in tqdm(loader, desc="encoding", leave=False, disable=len(loader) < 20):
        img = img.to(device)
        out.append(torch.cat(tokenizer.img_to_idx(img), 1).to("cpu", dtype))
        if flip:
            out_flip.append(torch.cat(tokenizer.img_to_idx(img.flip(-1)), 1).to("cpu", dtype))
    L = sum(p * p for p in tokenizer.cfg.patch_nums)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, L, dtype=dtype)
    return cat(out), (cat(out_flip) if flip else None)


def build_token_cache(cfg: TrainConfig, d: DistInfo, tokenizer: MultiScaleVQVAE) -> dict:
    """RUN/tokens.pt: {"kind": "tokens", "tokenizer_sha256", "data", "train": {...}, "test": {...}}.

    Reused while the tokenizer checkpoint (by sha256) and the data settings are unchanged;
    rebuilt otherwise. Under DDP each rank encodes every world_size-th image into a part file
    and rank 0 merges them. Loaded with mmap, so a big cache is paged in, not copied.
    """
    run = Path(cfg.out_dir)
    path = run / "tokens.pt"
    digest = file_digest(run / "tokenizer.pt")
    data_id = {k: getattr(cfg, k) for k in DATA_FIELDS}
    if path.exists():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if cache.get("tokenizer_sha256") == digest and cache.get("data") == data_id:
                return cache
            reason = "the tokenizer or the data settings changed"
        except Exception as e:
            reason = f"it is unreadable ({type(e).__name__})"
        if d.is_main:
            print(f"token cache {path} is stale ({reason}); rebuilding it")
    barrier(d)
    tokenizer.eval()
    for split in ("train", "test"):
        ds = load_dataset(cfg, split, download_ok=False)
        mine = list(range(d.rank, len(ds), d.world_size))
        idx, idx_flip = _encode(tokenizer, ds, mine, cfg.tok_batch, d.device,
                                cfg.hflip and split == "train", cfg.num_workers)
        labels = ds.labels[mine].clone()
        save_checkpoint({"idx": idx, "idx_flip": idx_flip, "labels": labels,
                         "num_classes": ds.num_classes}, run / f".tokens.{split}.part{d.rank}")
    barrier(d)
    if d.is_main:
        cache = {"kind": "tokens", "tokenizer_sha256": digest, "data": data_id,
                 "patch_nums": list(tokenizer.cfg.patch_nums)}
        for split in ("train", "test"):
            parts = [torch.load(run / f".tokens.{split}.part{r}", weights_only=True) for r in range(d.world_size)]
            cache["num_classes"] = parts[0]["num_classes"]
            merged = {}
            for key in ("idx", "idx_flip", "labels"):
                if parts[0][key] is None:
                    continue
                # Part r holds items r, r+W, r+2W, ...: interleave back into dataset order.
                n = sum(len(p[key]) for p in parts)
                full = parts[0][key].new_zeros((n, *parts[0][key].shape[1:]))
                for r, p in enumerate(parts):
                    full[r::d.world_size] = p[key]
                merged[key] = full
            cache[split] = merged
        save_checkpoint(cache, path)
        for split in ("train", "test"):
            for r in range(d.world_size):
                (run / f".tokens.{split}.part{r}").unlink()
    barrier(d)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# ============================================================================================
# 10. Stage 2: the generator (M-VAR, or VAR with --arch var)
# ============================================================================================

def model_config_for(cfg: TrainConfig, tok_cfg: TokenizerConfig, num_classes: int) -> MVARConfig:
    """TrainConfig + the tokenizer's config -> MVARConfig (vocab, Cvae, scales come from the
    tokenizer, so the two can never disagree)."""
    return MVARConfig(arch=cfg.arch, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads,
                      num_classes=num_classes, vocab_size=tok_cfg.vocab_size, Cvae=tok_cfg.z_channels,
                      patch_nums=tok_cfg.patch_nums, cond_drop=cfg.cond_drop, drop_path=cfg.drop_path,
                      alng=cfg.alng)


def generator_path(cfg: TrainConfig) -> Path:
    """RUN/mvar.pt or RUN/var.pt: both architectures can share one run's tokenizer and cache."""
    return Path(cfg.out_dir) / f"{cfg.arch}.pt"


def load_generator(path, device="cpu", tokenizer_path=None):
    """A generator checkpoint -> (model in eval mode, tokenizer in eval mode, checkpoint dict).

    Everything needed to rebuild both is in the checkpoint: the generator config, and the
    tokenizer checkpoint's file name (relative to the generator's folder unless absolute)
    together with its sha256, so a swapped tokenizer is caught. This is what sample.py uses.
    """
    path = Path(path)
    ck = load_checkpoint(path, "generator")
    tok_path = Path(tokenizer_path) if tokenizer_path else path.parent / ck["tokenizer_path"]
    tokenizer, _ = load_trained_tokenizer(tok_path, device)
    if file_digest(tok_path) != ck["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {path} was trained with (sha256 differs)")
    model = MVAR(MVARConfig.from_dict(ck["config"]["model"]))
    load_state_dict_checked(model, ck["model"], what=f"{ck['config']['model']['arch']} generator")
    return model.to(device).eval(), tokenizer, ck


@torch.no_grad()
def eval_generator(model, tokenizer, ds: TokenDataset, batch: int, limit: int, device, amp_dtype) -> dict:
    """Teacher-forced validation: mean loss and per-scale top-1 token accuracy (eval mode:
    no class dropout, so this scores the conditional model)."""
    model.eval()
    pns = tokenizer.cfg.patch_nums
    n = len(ds) if not limit else min(limit, len(ds))
    tot_loss, tot_acc, seen = 0.0, torch.zeros(len(pns)), 0
    for s in range(0, n, batch):
        idx_BL = ds.idx[s:min(n, s + batch)].long().to(device)
        labels = ds.labels[s:min(n, s + batch)].to(device)
        idx_list = split_scales(idx_BL, pns)
        with autocast(device, amp_dtype):
            logits = model(labels, tokenizer.idx_to_teacher_input(idx_list))
        loss, acc = compute_loss(logits, idx_list)
        tot_loss += loss.item() * len(labels)
        tot_acc += acc.float().cpu() * len(labels)
        seen += len(labels)
    return {"tokens_images": seen, "val_loss": tot_loss / seen,
            "per_scale_acc": [round(float(a), 4) for a in tot_acc / seen], "patch_nums": list(pns)}


@torch.no_grad()
def sample_grid(model, tokenizer, cfg: TrainConfig, num_classes: int, path, device) -> None:
    """Sample grid PNG: one column per class (the first 10), samples_per_class rows, fixed seed."""
    was_training = model.training
    model.eval()
    classes = min(num_classes, 10)
    labels = torch.arange(classes, device=device).repeat(cfg.samples_per_class)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    images = model.generate(tokenizer, labels, cfg=cfg.cfg_scale, top_k=cfg.top_k, top_p=cfg.top_p,
                            generator=gen)
    save_image_grid(images, path, nrow=classes)
    model.train(was_training)


def train_generator(cfg: TrainConfig, d: DistInfo, tokenizer: MultiScaleVQVAE, deadline: float = math.inf):
    """Stage 2. Trains (or resumes) the generator on the token cache; writes RUN/<arch>.pt,
    RUN/<arch>_loss.png, RUN/<arch>_samples.png, RUN/<arch>_eval.json. Returns the model
    (eval mode), or None if the time budget / --stop_after ended this invocation first."""
    run, path = Path(cfg.out_dir), generator_path(cfg)
    cache = build_token_cache(cfg, d, tokenizer)
    pns = tokenizer.cfg.patch_nums
    if list(cache["patch_nums"]) != list(pns):
        raise ValueError(f"{run / 'tokens.pt'} holds patch_nums {cache['patch_nums']}, tokenizer has {pns}")
    train_ds, test_ds = TokenDataset(cache["train"], cfg.seed), TokenDataset(cache["test"])
    num_classes = cache["num_classes"]
    mcfg = model_config_for(cfg, tokenizer.cfg, num_classes)
    check_labels(train_ds.labels, num_classes, "token cache (train)")
    check_labels(test_ds.labels, num_classes, "token cache (test)")

    if cfg.gen_batch % (d.world_size * cfg.grad_accum):
        raise ValueError(f"--gen_batch {cfg.gen_batch} must be divisible by processes x grad_accum "
                         f"= {d.world_size} x {cfg.grad_accum}")
    micro = cfg.gen_batch // (d.world_size * cfg.grad_accum)
    torch.manual_seed(cfg.seed)                        # identical init on every rank
    model = MVAR(mcfg).to(d.device)
    peak_lr = cfg.base_lr * cfg.gen_batch / 256        # linear scaling rule (VAR, SPEC section 5)
    fused = d.device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                            fused=fused or None)
    amp_dtype, scaler = amp_setup(cfg, d.device)
    sampler = ShardedSampler(len(train_ds), cfg.gen_batch, cfg.seed, d.rank, d.world_size)
    total = max(1, round(cfg.gen_epochs * sampler.steps_per_epoch))
    torch.manual_seed(cfg.seed * 1000 + d.rank)        # per-rank stream: class dropout, drop-path
    step, history = 0, []
    if path.exists():
        ck = load_checkpoint(path, "generator")
        check_same_run(ck["config"]["train"], cfg, path, STAGE2_FIELDS)
        if ck["tokenizer_sha256"] != cache["tokenizer_sha256"]:
            raise ValueError(f"{path} was trained on the tokens of another tokenizer.pt (sha256 "
                             "differs); use another --out_dir, or delete it to start stage 2 over")
        load_state_dict_checked(model, ck["model"], what=f"{cfg.arch} generator")
        opt.load_state_dict(ck["optimizer"])
        if scaler and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, history = ck["step"], ck["history"]
        restore_rng(ck["rng"], d)
        if d.is_main:
            print(f"stage 2: resuming {path} at step {step}/{total}")
    if step >= total:
        return model.eval()
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage 2: {cfg.arch} depth {mcfg.depth} width {mcfg.width}, {n_params / 1e6:.2f}M params, "
              f"L={mcfg.seq_len} tokens, {len(train_ds)} images"
              f"{' (+ flipped copies)' if train_ds.flip is not None else ''}, {total} steps of "
              f"{cfg.gen_batch}, peak lr {peak_lr:.2e}")
    net = model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    def checkpoint(done):
        rng = gather_rng(d)
        if d.is_main:
            save_checkpoint({
                "kind": "generator",
                "config": {"train": dataclasses.asdict(cfg), "tokenizer": tokenizer.cfg.to_dict(),
                           "model": mcfg.to_dict()},
                "tokenizer_path": "tokenizer.pt", "tokenizer_sha256": cache["tokenizer_sha256"],
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler else {}, "step": step, "total_steps": total,
                "rng": rng, "history": history, "done": done}, path)

    def pictures(final):
        if d.is_main:
            name = run / f"{cfg.arch}_samples.png" if final else run / "images" / f"{cfg.arch}_step{step:07d}.png"
            sample_grid(model, tokenizer, cfg, num_classes, name, d.device)
            save_loss_plot(history, run / f"{cfg.arch}_loss.png", f"stage 2: {cfg.arch}")

    model.train()
    bar = tqdm(total=total, initial=step, desc=f"stage 2 {cfg.arch}", disable=not d.is_main, dynamic_ncols=True)
    loader = step_loader(train_ds, sampler, step, total, 0)
    steps_here, running, t0 = 0, [], time.time()
    for idx_BL, labels in loader:
        lr = lr_at(step, total, peak_lr, cfg.warmup_frac, cfg.end_lr_ratio)
        wd = wd_at(step, total, cfg.weight_decay, cfg.weight_decay_end)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
        idx_BL, labels = idx_BL.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        loss_sum, acc_sum = 0.0, 0.0
        for j in range(cfg.grad_accum):                # gradient accumulation over micro-batches
            sl = slice(j * micro, (j + 1) * micro)
            idx_list = split_scales(idx_BL[sl], pns)
            with torch.no_grad():
                teacher = tokenizer.idx_to_teacher_input(idx_list)   # (B, L - pn0^2, Cvae)
            last = j == cfg.grad_accum - 1
            # DDP all-reduces gradients on every backward unless told not to: only the last
            # micro-batch needs it.
            sync = net.no_sync() if (d.world_size > 1 and not last and hasattr(net, "no_sync")) else contextlib.nullcontext()
            with sync:
                with autocast(d.device, amp_dtype):
                    logits = net(labels[sl], teacher)
                loss, acc = compute_loss(logits, idx_list)
                (scaler.scale(loss / cfg.grad_accum) if scaler else loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            acc_sum = acc_sum + acc.detach().float().cpu() / cfg.grad_accum
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        step, steps_here = step + 1, steps_here + 1
        running.append(loss_sum)
        if step % cfg.log_every == 0 or step == total:
            history.append([step, sum(running) / len(running), lr])
            running = []
        tok_s = steps_here * cfg.gen_batch * mcfg.seq_len / max(1e-9, time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", acc="/".join(f"{100 * a:.0f}" for a in acc_sum),
                        gnorm=f"{float(grad_norm):.2f}", tok_s=f"{tok_s:.0f}")
        if step % cfg.image_every == 0 and step < total:
            pictures(final=False)
        if _checkpoint_or_stop(cfg, d, deadline, step, total, steps_here, checkpoint, bar, "stage 2", path):
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
    barrier(d)
    return model.eval()


# ============================================================================================
# 11. main
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
        print(f"run folder {cfg.out_dir}: preset {cfg.preset}, stage {cfg.stage}, arch {cfg.arch}, "
              f"{d.world_size} process(es) on {d.device}")
    out = {"tokenizer": None, "generator": None}
    try:
        if cfg.stage in ("tokenizer", "all"):
            out["tokenizer"] = train_tokenizer(cfg, d, deadline)
        if cfg.stage in ("generator", "all"):
            if cfg.stage == "generator" or out["tokenizer"] is not None:
                tok = out["tokenizer"] or load_trained_tokenizer(Path(cfg.out_dir) / "tokenizer.pt", d.device)[0]
                out["generator"] = train_generator(cfg, d, tok, deadline)
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return out


def run_cli(entry_point) -> None:
    """Run a script's main(). Bad settings, data or checkpoints raise ValueError /
    FileNotFoundError with a message that says what is wrong and how to fix it: print just that
    as one line and exit with status 2 -- a traceback would only bury it. (Used by sample.py too.)"""
    try:
        entry_point()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
