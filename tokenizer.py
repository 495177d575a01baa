"""Multi-scale residual VQ-VAE: the image tokenizer of VAR / M-VAR (SPEC.md section 3).

An image is turned into K token maps of growing size (1x1, 2x2, ..., h x w), coarse to fine.
Scale k quantizes *what the coarser scales have not explained yet* (the residual), so summing
the decoded scales back up gives a better and better approximation f_hat of the encoder's
feature map f. A generator (mvar.py) then predicts scale k's tokens from scales 0..k-1.

    image x --encoder--> --quant_conv--> f --residual multi-scale VQ--> K index maps
    K index maps --embedding, upsample, phi, sum--> f_hat --post_quant_conv--> --decoder--> x'

The architecture and every submodule name follow VAR's `VQVAE` (which reuses the LDM / VQGAN
convolutional autoencoder), so VAR's released 256px tokenizer `vae_ch160v4096z32.pth` loads
with strict=True into `MultiScaleVQVAE(tokenizer_config("var256"))` (see `load_var_checkpoint`).

Shape glossary (used in names like `f_BChw`, `idx_Bl`):
    B     batch size
    C     image channels (1 for Fashion-MNIST, 3 for RGB); also "channels" inside conv blocks
    H, W  image height and width (H == W == cfg.image_size)
    Cvae  latent / codebook vector size (cfg.z_channels; VAR: 32)
    h, w  latent height and width = image_size / 2**(len(ch_mult) - 1)   (VAR 256px: 16)
    V     codebook size (cfg.vocab_size; VAR: 4096)
    K     number of scales = len(patch_nums)                             (VAR: 10)
    pn    side of one scale's token map ("patch number"); scale k has pn_k * pn_k tokens
    l     tokens of one scale = pn * pn
    L     tokens of all scales = sum(pn * pn)                            (VAR 256px: 680)
    N     a flat batch of vectors (e.g. B * pn * pn residual vectors to quantize)

Reading order: config and presets -> autoencoder blocks -> quantizer pieces (nearest code,
phi) -> MultiScaleVQVAE (encode, decode, teacher forcing, sampling step, training loss,
dead-code restart) -> usage statistics -> checkpoint loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenizerConfig:
    """Everything needed to build a `MultiScaleVQVAE`. Saved as a plain dict in checkpoints.

    Architecture (VAR's names where VAR has one):
      image_size   side of the (square) input image, in pixels
      in_channels  image channels (1 = grey, 3 = RGB)
      ch           base width of the conv autoencoder; level i has ch * ch_mult[i] channels
      ch_mult      one entry per resolution level; len(ch_mult) - 1 stride-2 downsamplings,
                   so the latent is image_size / 2**(len(ch_mult) - 1) pixels wide
      num_res_blocks  ResNet blocks per level in the encoder (the decoder uses one more, as VAR)
      z_channels   Cvae, the latent / codebook vector size
      vocab_size   V, the number of codebook vectors (one codebook shared by all scales)
      patch_nums   side of each scale's token map, coarse to fine; must end at the latent size
      dropout      dropout inside the ResNet blocks

    Quantizer (SPEC section 3):
      beta         commitment weight: vq loss = beta*||sg(f_hat)-f||^2 + ||f_hat-sg(f)||^2
      quant_resi   phi(h) = (1 - quant_resi) * h + quant_resi * conv3x3(h)
      share_quant_resi  number of phi convs shared across the K scales (VAR: 4)
      using_znorm  nearest code by cosine similarity instead of squared L2 (VAR: False)

    Training-only knobs (they never change what a trained model computes at inference):
      usage_ema    decay of the per-scale code-hit EMA kept in `quantize.ema_vocab_hit_SV`
      dead_code_threshold  0 disables (VAR's exact behaviour). Otherwise, during training a
                   code whose EMA hit count (summed over scales) falls below this fraction of
                   the count it would have if all V codes were used equally is "dead" and is
                   moved onto a residual vector from the current batch (see
                   `MultiScaleVQVAE.restart_dead_codes`).
    """

    # architecture: no defaults, take them from a preset (`tokenizer_config`)
    image_size: int
    in_channels: int
    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    vocab_size: int
    patch_nums: Tuple[int, ...]
    # quantizer (VAR's defaults) and training-only knobs
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_znorm: bool = False
    dropout: float = 0.0
    usage_ema: float = 0.99
    dead_code_threshold: float = 0.0

    def __post_init__(self):
        # JSON round trips turn tuples into lists: normalise, so configs compare equal.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)

        def bad(msg):
            raise ValueError(f"TokenizerConfig: {msg}")

        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "z_channels", "vocab_size"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            bad(f"ch_mult must be a non-empty tuple of positive integers, got {self.ch_mult}")
        for m in self.ch_mult:
            # GroupNorm(32 groups) needs a channel count divisible by 32 at every level.
            if (self.ch * m) % 32 != 0:
                bad(f"ch * ch_mult[i] must be divisible by 32 (GroupNorm uses 32 groups); "
                    f"ch={self.ch}, ch_mult={self.ch_mult} gives {self.ch * m} channels")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor != 0:
            bad(f"image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1)={factor} "
                f"(ch_mult={self.ch_mult}); pad or resize the images, or use fewer levels")
        latent = self.image_size // factor
        pns = self.patch_nums
        if not pns or min(pns) < 1:
            bad(f"patch_nums must be non-empty positive integers, got {pns}")
        if any(b <= a for a, b in zip(pns, pns[1:])):
            bad(f"patch_nums must be strictly increasing (coarse to fine), got {pns}")
        if pns[-1] != latent:
            bad(f"patch_nums must end at the latent size image_size / 2**(len(ch_mult)-1) = "
                f"{self.image_size}/{factor} = {latent}, but it ends at {pns[-1]} (patch_nums={pns}); "
                f"choose patch_nums ending at {latent} (train.py: --patch_nums)")
        if not 1 <= self.share_quant_resi <= len(pns):
            bad(f"share_quant_resi must be between 1 and len(patch_nums)={len(pns)}, "
                f"got {self.share_quant_resi}")
        used_phis = {phi_index(k, len(pns), self.share_quant_resi) for k in range(len(pns))}
        if len(used_phis) != self.share_quant_resi:
            # an unused conv would be a dead parameter (and an error under DDP)
            bad(f"share_quant_resi={self.share_quant_resi} with {len(pns)} scales leaves phi conv(s) "
                f"{sorted(set(range(self.share_quant_resi)) - used_phis)} unused; choose fewer phi convs")
        if not 0.0 <= self.quant_resi <= 1.0:
            bad(f"quant_resi must be in [0, 1], got {self.quant_resi}")
        if self.beta < 0:
            bad(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.usage_ema < 1.0:
            bad(f"usage_ema must be in [0, 1), got {self.usage_ema}")
        if self.dead_code_threshold < 0:
            bad(f"dead_code_threshold must be >= 0 (0 disables restarts), got {self.dead_code_threshold}")

    @property
    def latent_size(self) -> int:
        """h == w, the side of the encoder's feature map."""
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """A plain, JSON-able dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        """Inverse of `to_dict`; unknown keys are an error (they usually mean a version mismatch)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TokenizerConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# Presets. "var256" is exactly VAR's released vae_ch160v4096z32 (256px ImageNet, f=16).
#
# "32px" (f=4, 8x8 latents, 1.1M parameters) was chosen by measurement for a 30-minute training
# run on a 2-core CPU (Fashion-MNIST padded 28 -> 32 with -1, in_channels=1; CIFAR-10 uses 3).
# Measured recipe: AdamW(betas 0.9, 0.95, no weight decay), lr 1e-3, batch 32,
# loss = L1 + L2 (pixels) + vq_loss. One training image costs ~1/50 CPU-second (~50 img/s on
# one thread). With dead-code restarts, after 50k images (constant lr, no decay yet) the 10k
# test images reach 24.9 dB PSNR and every scale uses many codes (1x1 scale: 32 codes,
# 8x8 scale: all 512). Without restarts the same run collapses to 2-8 codes per coarse scale.
# ch=64 costs 3x more per image; vocab_size=1024 gave no better PSNR at equal budget.
# The same layers work for any image side divisible by 4: train.py's fashion-mnist preset feeds
# the native 28x28 images (image_size=28, patch_nums 1,2,3,5,7 ending at the 7x7 latent), which
# costs 0.77x the pixels and 0.57x the generator tokens of the padded 32x32 version.
TOKENIZER_PRESETS: Dict[str, dict] = {
    "32px": dict(
        image_size=32, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        z_channels=32, vocab_size=512, patch_nums=(1, 2, 3, 4, 5, 6, 8),
        beta=0.25, quant_resi=0.5, share_quant_resi=4, using_znorm=False,
        usage_ema=0.99, dead_code_threshold=0.03,
    ),
    "var256": dict(
        image_size=256, in_channels=3, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        z_channels=32, vocab_size=4096, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        beta=0.25, quant_resi=0.5, share_quant_resi=4, using_znorm=False, dropout=0.0,
        dead_code_threshold=0.0,
    ),
}


def tokenizer_config(name: str, **overrides) -> TokenizerConfig:
    """A preset by name, with any field overridden, e.g. tokenizer_config("32px", in_channels=1)."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    known = {f.name for f in dataclasses.fields(TokenizerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TokenizerConfig field(s) {unknown}; known fields are {sorted(known)}")
    return TokenizerConfig(**{**TOKENIZER_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# 2. The convolutional autoencoder (LDM / VQGAN style, as in VAR)
# ----------------------------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the normalisation of every LDM-style block."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x -> x' = shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x))))))).   (B,Ci,h,w)->(B,Co,h,w)

    The shortcut is a 1x1 conv (`nin_shortcut`) only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map, with a residual.

    (B, C, h, w) -> (B, C, h, w). q, k, v come from ONE fused 1x1 conv `qkv` (C -> 3C), as in
    VAR's checkpoint; the output goes through the 1x1 conv `proj_out`. Scale 1/sqrt(C).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)             # 3 x (B, C, h, w)
        # (B, C, h, w) -> (B, 1 head, h*w positions, C): one token per position.
        q, k, v = (t.reshape(B, 1, C, h * w).transpose(2, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)                   # (B, 1, h*w, C)
        out = out.transpose(2, 3).reshape(B, C, h, w)
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    """(B, C, h, w) -> (B, C, h/2, w/2): pad one pixel right/bottom, then a stride-2 3x3 conv.

    The asymmetric pad is LDM's choice; it keeps the conv aligned to the top-left pixel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """(B, C, h, w) -> (B, C, 2h, 2w): nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: List[nn.Module], attns: List[nn.Module], resample: Optional[nn.Module], resample_name: str) -> nn.Module:
    """One resolution level as a bare nn.Module with `block`, `attn` (and `downsample` or
    `upsample`) children: exactly the attribute names in VAR's state dict."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def _middle(channels: int, dropout: float) -> nn.Module:
    """ResNet block -> attention -> ResNet block at the lowest resolution (`mid.*` keys)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """(B, C, H, W) image -> (B, Cvae, h, w) features.

    Level i runs `num_res_blocks` ResNet blocks at width ch*ch_mult[i] (each followed by an
    attention block on the lowest level only), then halves the resolution (not after the last).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if i == n_levels - 1:
                    attns.append(AttnBlock(c_out))
            last = i == n_levels - 1
            self.down.append(_level(blocks, attns, None if last else Downsample2x(c_out), "downsample"))
        self.mid = _middle(c_in, cfg.dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Cvae, h, w) latent -> (B, C, H, W) image (unbounded; callers clamp to [-1, 1]).

    The mirror of the encoder with num_res_blocks + 1 blocks per level. `up[i]` is stored at
    index i (level i's resolution) but the levels run from the lowest resolution up.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, cfg.dropout)
        levels = []
        for i in reversed(range(n_levels)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if i == n_levels - 1:
                    attns.append(AttnBlock(c_out))
            levels.insert(0, _level(blocks, attns, Upsample2x(c_out) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):              # lowest resolution first
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# 3. Quantizer pieces: nearest code, phi convs
# ----------------------------------------------------------------------------------------------

def nearest_code(z_NC: torch.Tensor, codebook_VC: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """Index of the nearest codebook row for every vector. (N, Cvae), (V, Cvae) -> (N,) long.

    Squared L2 is expanded as |z|^2 + |e|^2 - 2 z.e so the N x V distance table is one matmul
    (the same formula and op order as VAR, so a released checkpoint picks the same codes).
    Ties go to the lowest index (torch.argmin/argmax return the first extremum).
    With cosine=True (`using_znorm`) both sides are l2-normalised and the largest dot wins.
    """
    if cosine:
        return torch.argmax(F.normalize(z_NC, dim=1) @ F.normalize(codebook_VC, dim=1).T, dim=1)
    sq = z_NC.square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)   # (N, V)
    dist_NV = torch.addmm(sq, z_NC, codebook_VC.T, beta=1, alpha=-2)
    return torch.argmin(dist_NV, dim=1)


def phi_index(k: int, K: int, n_phi: int) -> int:
    """Which of the n_phi shared phi convs scale k (of K) uses (SPEC section 3).

    Each conv owns a "tick" in [0, 1]; scale k sits at k/(K-1) and takes the nearest tick.
    Ticks are linspace(1/(3n), 1-1/(3n), n) for n == 4 (VAR's choice) else
    linspace(1/(2n), 1-1/(2n), n). For K=10, n=4: 0,0,1,1,1,2,2,3,3,3.
    Precision matters: k=2 of 10 is an exact tie on paper (|2/9 - 1/12| == |2/9 - 13/36|) and
    float64 rounding breaks it towards conv 1; in float32, k=7 would even flip to conv 2.
    Python floats are float64, and we build the ticks the way numpy.linspace does
    (start + i*step, last tick set to stop), so this matches VAR bit for bit.
    """
    K_minus_1 = max(K - 1, 1)
    at = k / K_minus_1
    if n_phi == 1:
        return 0
    margin = 1 / (3 * n_phi) if n_phi == 4 else 1 / (2 * n_phi)
    start, stop = margin, 1 - margin
    step = (stop - start) / (n_phi - 1)
    ticks = [start + i * step for i in range(n_phi - 1)] + [stop]
    dists = [abs(t - at) for t in ticks]
    return dists.index(min(dists))     # first minimum, like numpy.argmin


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h): a light residual refinement of an upsampled
    scale's embedding (VAR section 3.2; r = quant_resi = 0.5). (B, Cvae, h, w) -> same."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhis(nn.Module):
    """The `share_quant_resi` phi convs, stored as `qresi_ls` (VAR's key names)."""

    def __init__(self, channels: int, ratio: float, n_phi: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(n_phi)])


class MultiScaleQuantizer(nn.Module):
    """Parameter container for the quantizer (keys `quantize.*`); the algorithms live in
    MultiScaleVQVAE below so the whole encode/decode story reads in one place.

      embedding          (V, Cvae) codebook shared by all K scales
      quant_resi         the shared phi convs
      ema_vocab_hit_SV   (K, V) buffer: EMA of how often each code is picked at each scale in
                         training (VAR's name; S = scales). Used for dead-code restarts.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = SharedPhis(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        K, n = len(cfg.patch_nums), cfg.share_quant_resi
        self.phi_of_scale = [phi_index(k, K, n) for k in range(K)]   # e.g. [0,0,1,1,1,2,2,3,3,3]

    def phi(self, k: int) -> Phi:
        """The phi conv used by scale k."""
        return self.quant_resi.qresi_ls[self.phi_of_scale[k]]


# ----------------------------------------------------------------------------------------------
# 4. The model
# ----------------------------------------------------------------------------------------------

class MultiScaleVQVAE(nn.Module):
    """VAR-compatible multi-scale residual VQ-VAE.

    Inference API (all index lists are K LongTensors idx_Bl of shape (B, pn_k * pn_k), tokens of
    one scale flattened row-major):
        img_to_idx(img)                 (B,C,H,W) in [-1,1] -> list of K (B, pn_k^2)
        idx_to_fhat(idx_list)           -> f_hat (B, Cvae, h, w)
        fhat_to_img(f_hat)              -> (B, C, H, W) in [-1, 1]
        idx_to_img(idx_list)            -> (B, C, H, W) in [-1, 1]
        embed_scale(idx_Bl, k)          -> (B, Cvae, pn_k, pn_k), raw codebook vectors
        idx_to_teacher_input(idx_list)  -> (B, L - pn_0^2, Cvae), the generator's training input
        next_input(k, f_hat, h_BChw)    -> (f_hat, next scale's input), one sampling step
    Training: forward(img) -> (recon, vq_loss, stats).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.quantize = MultiScaleQuantizer(cfg)

    # ---- input checks ------------------------------------------------------------------------

    def _check_img(self, img: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(
                f"tokenizer expects images of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) "
                f"(in_channels={cfg.in_channels}, image_size={cfg.image_size}), got {tuple(img.shape)}. "
                f"Fix: resize/pad the images to {cfg.image_size}x{cfg.image_size}, convert "
                f"grey <-> RGB, or build the tokenizer for your data: tokenizer_config(..., "
                f"in_channels={img.shape[1] if img.dim() == 4 else '?'}, image_size=S, patch_nums "
                f"ending at S / {2 ** (len(cfg.ch_mult) - 1)}).")
        # One cheap reduction catches the most common mistake: [0, 1] or [0, 255] pixels.
        if img.numel() and img.detach().abs().amax() > 1.5:
            raise ValueError(f"tokenizer expects pixel values in [-1, 1], got max |x| = "
                             f"{img.detach().abs().amax().item():.3g}; map [0, 255] images with x/127.5 - 1")

    def _check_idx(self, idx_list: Sequence[torch.Tensor]) -> None:
        pns = self.cfg.patch_nums
        if len(idx_list) != len(pns):
            raise ValueError(f"expected {len(pns)} index maps (one per scale, patch_nums={pns}), got {len(idx_list)}")
        for k, (idx, pn) in enumerate(zip(idx_list, pns)):
            if idx.dim() != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"scale {k} index map must have shape (B, {pn * pn}) (pn={pn}), got {tuple(idx.shape)}")

    # ---- the building steps shared by encoding, decoding, teacher forcing and sampling ---------

    def embed_scale(self, idx_Bl: torch.Tensor, k: int) -> torch.Tensor:
        """Codebook vectors of scale k's tokens as a map. (B, pn_k^2) -> (B, Cvae, pn_k, pn_k).

        No upsampling, no phi: this is what a sampler gets from the codes it just drew.
        """
        pn = self.cfg.patch_nums[k]
        B, l = idx_Bl.shape
        if l != pn * pn:
            raise ValueError(f"scale {k} has {pn}x{pn}={pn * pn} tokens, got idx of shape {tuple(idx_Bl.shape)}")
        # (B, l, Cvae) -> (B, Cvae, l) -> (B, Cvae, pn, pn): token t sits at row t // pn, column t % pn.
        return self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.cfg.z_channels, pn, pn)

    def scale_contribution(self, h_BChw: torch.Tensor, k: int) -> torch.Tensor:
        """phi_k(upsample(h)): what scale k adds to f_hat. (B, Cvae, pn_k, pn_k) -> (B, Cvae, h, w).

        Bicubic upsampling to the latent size, except at the last scale, which is already full
        size (VAR skips the no-op resize). Encoding, decoding, teacher forcing and sampling all
        go through this one function and add its output to f_hat in the same order, so they
        agree bit for bit.
        """
        cfg = self.cfg
        if k != len(cfg.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(cfg.latent_size, cfg.latent_size), mode="bicubic")
        return self.quantize.phi(k)(h_BChw)

    def _zeros_fhat(self, B: int) -> torch.Tensor:
        """The empty reconstruction f_hat = 0, (B, Cvae, h, w), before any scale is added."""
        w = self.quantize.embedding.weight
        return w.new_zeros(B, self.cfg.z_channels, self.cfg.latent_size, self.cfg.latent_size)

    # ---- encoding ----------------------------------------------------------------------------

    def residual_quantize(self, f_BChw: torch.Tensor):
        """Multi-scale residual quantization of encoder features (SPEC section 3, VAR Alg. 1).

        f_BChw: (B, Cvae, h, w). Returns
            idx_list  K LongTensors (B, pn_k^2)
            f_hat     (B, Cvae, h, w) the sum of all scales' contributions (with gradient to the
                      codebook and phi convs, none to f: the straight-through step is the
                      caller's)
            vq_loss   scalar, mean over scales of beta*||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2
                      where f_hat_k is the reconstruction after scales 0..k
            z_list    K tensors (B*pn_k^2, Cvae): the residual vectors that were quantized
                      (used to restart dead codes)
        """
        cfg = self.cfg
        B, C, h, w = f_BChw.shape
        K = len(cfg.patch_nums)
        if f_BChw.dtype in (torch.float16, torch.bfloat16):
            f_BChw = f_BChw.float()        # quantize in float32 even under autocast, as VAR does
        f_sg = f_BChw.detach()
        f_rest = f_sg.clone()              # what is still unexplained; only used to pick codes
        f_hat = torch.zeros_like(f_sg)
        idx_list, z_list, vq_loss = [], [], 0.0
        codebook = self.quantize.embedding.weight.detach()
        with torch.autocast(f_BChw.device.type, enabled=False):
            for k, pn in enumerate(cfg.patch_nums):
                # 1. Look at the residual at this scale's resolution (area = average pooling).
                z_BCpp = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != K - 1 else f_rest
                z_NC = z_BCpp.permute(0, 2, 3, 1).reshape(-1, C)          # row-major tokens
                # 2. Nearest code for every position.
                idx_Bl = nearest_code(z_NC, codebook, cosine=cfg.using_znorm).view(B, pn * pn)
                # 3. Add its (upsampled, phi-refined) embedding to f_hat, remove it from the
                #    residual (f_rest gets no gradient: it only decides which codes are picked).
                h_BChw = self.scale_contribution(self.embed_scale(idx_Bl, k), k)
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                # 4. VQ loss at this scale: the codebook and phi move towards f (second term);
                #    the encoder commits to the current reconstruction (first term, weight beta).
                vq_loss = vq_loss + cfg.beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_sg)
                idx_list.append(idx_Bl)
                z_list.append(z_NC)
        return idx_list, f_hat, vq_loss / K, z_list

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W) in [-1, 1] -> K LongTensors (B, pn_k^2), coarse to fine."""
        self._check_img(img)
        return self.residual_quantize(self.quant_conv(self.encoder(img)))[0]

    # ---- decoding ----------------------------------------------------------------------------

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """K index maps -> f_hat (B, Cvae, h, w): the sum over scales of phi_k(upsample(embed))."""
        self._check_idx(idx_list)
        f_hat = self._zeros_fhat(idx_list[0].shape[0])
        for k, idx_Bl in enumerate(idx_list):
            f_hat = f_hat + self.scale_contribution(self.embed_scale(idx_Bl, k), k)
        return f_hat

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, h, w) -> (B, C, H, W) image clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idx_to_img(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """K index maps -> (B, C, H, W) image in [-1, 1]."""
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    # ---- what the generator sees -------------------------------------------------------------

    def next_input(self, k: int, f_hat: Optional[torch.Tensor], h_BChw: torch.Tensor):
        """One autoregressive step (sampling): fold scale k's codes into f_hat, get scale k+1's input.

        k: scale just produced; f_hat: (B, Cvae, h, w) or None at k = 0;
        h_BChw = embed_scale(idx, k): (B, Cvae, pn_k, pn_k).
        Returns (f_hat, next_in): the updated f_hat and, for k < K-1, f_hat area-downsampled to
        scale k+1's size (B, Cvae, pn_{k+1}, pn_{k+1}); at the last scale next_in is f_hat itself.
        """
        if f_hat is None:
            f_hat = self._zeros_fhat(h_BChw.shape[0])
        f_hat = f_hat + self.scale_contribution(h_BChw, k)
        pns = self.cfg.patch_nums
        if k == len(pns) - 1:
            return f_hat, f_hat
        return f_hat, F.interpolate(f_hat, size=(pns[k + 1], pns[k + 1]), mode="area")

    def idx_to_teacher_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for the generator: K index maps -> (B, L - pn_0^2, Cvae).

        Row block k (k = 1..K-1) is the ground-truth f_hat after scales 0..k-1, area-downsampled
        to pn_k x pn_k and flattened row-major. (Scale 0's input is the class token, built by
        the generator.) Built with `next_input`, so sampling sees exactly what training saw.
        """
        self._check_idx(idx_list)
        f_hat, chunks = None, []
        for k in range(len(idx_list) - 1):
            f_hat, nxt = self.next_input(k, f_hat, self.embed_scale(idx_list[k], k))
            chunks.append(nxt.flatten(2).transpose(1, 2))            # (B, pn_{k+1}^2, Cvae)
        if not chunks:   # a single scale: nothing to teacher-force
            return self._zeros_fhat(idx_list[0].shape[0]).flatten(2).transpose(1, 2)[:, :0]
        return torch.cat(chunks, dim=1)

    # ---- training ----------------------------------------------------------------------------

    def forward(self, img: torch.Tensor):
        """Training pass. img (B, C, H, W) in [-1, 1] ->
            recon    (B, C, H, W) decoder output, NOT clamped (use it in the pixel loss)
            vq_loss  scalar (SPEC section 3); the caller adds the pixel loss, e.g.
                     loss = F.l1_loss(recon, img) + F.mse_loss(recon, img) + vq_loss
            stats    dict of per-scale code usage in this batch:
                       "hits"        (K, V) float: how often each code was picked at each scale
                       "used"        (K,) long:    distinct codes per scale
                       "perplexity"  (K,) float:   exp(entropy) of each scale's code histogram
                       "restarted"   int:          dead codes restarted in this step (training)
        Straight-through estimator: the decoder sees f + sg(f_hat - f), so the pixel loss's
        gradient w.r.t. f_hat is passed unchanged to the encoder's f.
        """
        self._check_img(img)
        f = self.quant_conv(self.encoder(img))
        idx_list, f_hat, vq_loss, z_list = self.residual_quantize(f)
        f_st = f + (f_hat - f).detach()
        recon = self.decoder(self.post_quant_conv(f_st))

        hits_KV = torch.stack([torch.bincount(idx.flatten(), minlength=self.cfg.vocab_size).float()
                               for idx in idx_list])
        restarted = 0
        if self.training:
            if _distributed():           # every rank must agree on usage, hence on restarts
                dist.all_reduce(hits_KV)
            self._update_usage_ema(hits_KV)
            if self.cfg.dead_code_threshold > 0:
                restarted = self.restart_dead_codes(z_list, hits_KV.sum().item())
        stats = _usage_stats(hits_KV)
        stats["restarted"] = restarted
        return recon, vq_loss, stats

    @torch.no_grad()
    def _update_usage_ema(self, hits_KV: torch.Tensor) -> None:
        ema = self.quantize.ema_vocab_hit_SV
        if ema.sum() == 0:                # first step: start from this batch, not from zero
            ema.copy_(hits_KV)
        else:
            ema.mul_(self.cfg.usage_ema).add_(hits_KV, alpha=1 - self.cfg.usage_ema)

    @torch.no_grad()
    def restart_dead_codes(self, z_list: Sequence[torch.Tensor], hits_per_step: float) -> int:
        """Remedy for codebook collapse: move dead codes onto real residual vectors.

        A code is dead when its usage EMA summed over scales is below
        dead_code_threshold * hits_per_step / V (i.e. that fraction of uniform use). Each dead
        code is re-initialised to a residual vector z from this batch: the scale is drawn
        uniformly at random and then a random vector of that scale, so the coarse scales (a
        handful of vectors per image) get new codes as often as the fine ones. That is what
        fights the coarse-scale collapse: a 1x1 scale whose few codes all sit far from the data
        starts picking among many codes placed right on its residuals. On the first training
        step every unused code is dead, so this also gives a data-dependent codebook init.
        Restarted codes get an EMA of 2x the threshold, a grace period before they can be
        judged again. In DDP, rank 0's codebook and EMA are broadcast so all ranks agree.

        z_list: K tensors (N_k, Cvae) from `residual_quantize`. Returns the number restarted.
        """
        ema = self.quantize.ema_vocab_hit_SV                 # (K, V)
        K, V = ema.shape
        threshold = self.cfg.dead_code_threshold * hits_per_step / V
        dead = torch.nonzero(ema.sum(0) < threshold).flatten()
        n = dead.numel()
        if n == 0:
            return 0
        device = z_list[0].device
        scale_of = torch.randint(K, (n,), device=device)
        new = torch.empty(n, z_list[0].shape[1], device=device, dtype=z_list[0].dtype)
        for k, z_NC in enumerate(z_list):
            rows = torch.nonzero(scale_of == k).flatten()
            if rows.numel():
                new[rows] = z_NC[torch.randint(z_NC.shape[0], (rows.numel(),), device=device)]
        weight = self.quantize.embedding.weight
        weight.data[dead] = new.to(weight.dtype)
        ema[:, dead] = 2 * threshold / K
        if _distributed():
            dist.broadcast(weight.data, src=0)
            dist.broadcast(ema, src=0)
        return n


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# 5. Code usage statistics
# ----------------------------------------------------------------------------------------------

def _usage_stats(hits_KV: torch.Tensor) -> dict:
    """(K, V) hit counts -> {"hits", "used" (K,), "perplexity" (K,)}. Perplexity = exp(entropy)
    of the per-scale code distribution: V if all codes are used equally, 1 if one code only."""
    p = hits_KV / hits_KV.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
    return {"hits": hits_KV, "used": (hits_KV > 0).sum(dim=1), "perplexity": entropy.exp()}


def code_usage(idx_lists, vocab_size: int) -> dict:
    """Per-scale codebook usage over a dataset.

    idx_lists: one list of K LongTensors (B, pn_k^2) (e.g. from img_to_idx), or an iterable of
    such lists (one per batch). Returns {"hits": (K, V) float counts, "used": (K,) distinct
    codes per scale, "perplexity": (K,)}.
    """
    if len(idx_lists) and torch.is_tensor(idx_lists[0]):
        idx_lists = [idx_lists]
    hits = None
    for idx_list in idx_lists:
        top = max(int(idx.max()) for idx in idx_list if idx.numel())
        if top >= vocab_size:
            raise ValueError(f"code_usage: found code index {top} >= vocab_size={vocab_size}")
        h = torch.stack([torch.bincount(idx.flatten().cpu(), minlength=vocab_size).double() for idx in idx_list])
        hits = h if hits is None else hits + h
    if hits is None:
        raise ValueError("code_usage: no index lists given")
    return _usage_stats(hits)


def psnr(img: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2).
    (B, C, H, W) x 2 -> (B,). Equals the usual PSNR of the same images mapped to [0, 1]."""
    mse = (img.float() - recon.float().clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
