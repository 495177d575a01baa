"""Multi-scale residual VQ-VAE: the image tokenizer of VAR, which M-VAR reuses unchanged.

What it does. An image becomes K token maps of growing size (1x1, 2x2, ..., h x w), coarse to
fine. Scale k quantizes only what the coarser scales have not explained yet (the residual), so
summing the decoded scales gives a better and better approximation f_hat of the encoder's
feature map f. The generator (mvar.py) then predicts scale k's tokens from scales 0..k-1.

    image x --encoder--> --quant_conv--> f --residual multi-scale VQ--> K index maps
    K index maps --embedding, upsample, phi, sum--> f_hat --post_quant_conv--> --decoder--> x'

Three ideas make it work, each explained where its code is:
  * the residual (residual_quantize): scale k sees f minus what scales 0..k-1 rebuilt, so the
    scales add up, and "the image so far" is one tensor, f_hat, that the generator can be fed;
  * phi (Phi, scale_contribution): a coarse scale's codes are blown up to h x w by bicubic
    upsampling, which blurs; a light conv after it repairs part of that (VAR §3.2);
  * straight-through (forward): picking the nearest code has no gradient, so the decoder's
    gradient is copied past the quantizer onto the encoder (VQ-VAE, van den Oord et al. 2017).
Everything else is a standard conv autoencoder (section 4), as in any single-scale VQ-VAE.

Every parameter's name follows VAR's code: MultiScaleVQVAE(tokenizer_config("var256")) has exactly
the keys and shapes of VAR's released 256px tokenizer vae_ch160v4096z32.pth (its key list is in
tests/reference/), which runtime.load_var_checkpoint loads strictly. The file itself was never
loaded here (no download); tests/test_golden.py checks the quantizer against the official code.

Shape letters (one meaning each as a size or an index in this file; mvar.py's glossary lists the
letters that mean something else there: its einsum strings write the heads H as h, attention's
keys are k, and M is its SSM matrix):
    B     batch
    Cimg  image channels (1 grey, 3 RGB; cfg.in_channels)
    S     image side: images are S x S (cfg.image_size)
    h, w  height, width of a feature map: the latent's, S / 2**(len(ch_mult) - 1) (cfg.latent_size,
          h == w), once encoded
    ch    channels of a feature map inside the conv autoencoder (cfg.ch * cfg.ch_mult[level])
    Cvae  latent channels = codebook vector size (cfg.z_channels; VAR: 32)
    V     codebook size (cfg.vocab_size; VAR: 4096)
    K     number of scales = len(cfg.patch_nums) (VAR: 10);  k  a scale index, 0..K-1
    pn    side of one scale's token map (VAR's "patch number"); scale k's is pn_k = cfg.patch_nums[k]
    l     tokens of one scale = pn^2;  L  tokens of all scales = sum_k pn_k^2 (VAR 256px: 680)
    M     a flat batch of vectors to quantize (e.g. M = B * pn^2)
(C, the generator's width, and N, its SSM state size, belong to mvar.py.)
A "scale" is always one level of the token pyramid. A suffix spells a tensor's axes: idx_Bl is
(B, l), hits_KV is (K, V). The one exception is the buffer ema_vocab_hit_SV, named by VAR's
checkpoint: its S counts scales (our K).

Map 1, paper -> code. VAR: Tian et al., arXiv 2404.02905. M-VAR (arXiv 2411.10433) takes VAR's
tokenizer as it is, so everything here is VAR's.
    VAR §3.1 Eq. 3, nearest code in the Euclidean sense          nearest_code
    VAR §3.2 "Tokenization", Algorithm 1: multi-scale encoding    residual_quantize, img_to_idx
    VAR §3.2 Algorithm 2: multi-scale reconstruction              idx_to_fhat, idx_to_img
    Alg. 1 and 2, lookup(Z, r_k): one codebook Z for all scales   embed_scale, quantize.embedding
    Alg. 1 and 2, phi_k(interpolate(z_k, h_K, w_K))               scale_contribution, Phi, phi_index
    VAR Fig. 4, stage 2: the generator's input, f_hat so far      idx_to_teacher_input, next_input,
                                                                  split_scales
    VAR §3.1 Eq. 5, the compound training loss                    forward (+ the caller's pixel loss)
    VQ-VAE §3.2, the straight-through gradient estimator          forward
    VAR §4 "VAR tokenizer": VQGAN's conv autoencoder, 16x down    Encoder, Decoder, preset "var256"
    not in the papers: code-usage statistics, and a remedy for   update_code_usage,
      codebook collapse (off in var256)                           restart_dead_codes

Map 2, VAR's code (github.com/FoundationVision/VAR, models/vqvae.py, quant.py, basic_vae.py):
    VQVAE -> MultiScaleVQVAE            VectorQuantizer2 -> MultiScaleQuantizer + the methods below
    img_to_idxBl -> img_to_idx          f_to_idxBl_or_fhat -> residual_quantize
    idxBl_to_img -> idx_to_img          embed_to_fhat -> idx_to_fhat (from indices, not embeddings)
    fhat_to_img -> fhat_to_img          idxBl_to_var_input -> idx_to_teacher_input
    get_next_autoregressive_input -> next_input
    forward (both) -> forward; the usage EMA in VectorQuantizer2.forward -> update_code_usage
    Phi -> Phi                          quant_resi, a PhiPartiallyShared -> quant_resi.qresi_ls
    quant_resi[k / (K-1)] -> quantize.phi(k), phi_index
    embedding(idx_Bl).transpose(1, 2).view(B, Cvae, pn, pn) in idxBl_to_img -> embed_scale
    Normalize -> group_norm             down[i], up[i], mid (bare nn.Modules) -> Level, middle
    Downsample2x, Upsample2x -> resample2x
    v_patch_nums, Cvae -> cfg.patch_nums, cfg.z_channels      all other names are the same:
    Encoder, Decoder, ResnetBlock, AttnBlock, ema_vocab_hit_SV

Sections: 1 config, 2 quantizer pieces, 3 the tokenizer (Algorithms 1 and 2, the generator's input,
training, codebook bookkeeping), 4 the conv autoencoder (VQGAN's, standard), 5 usage statistics,
6 input checks.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ----------------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TokenizerConfig:
    """Everything needed to build a MultiScaleVQVAE, in VAR's names; saved as a dict in checkpoints.
    The architecture has no defaults: take it from a preset (tokenizer_config)."""

    image_size: int              # S
    in_channels: int             # Cimg (1 = grey, 3 = RGB)
    ch: int                      # level i of the conv autoencoder has ch * ch_mult[i] channels;
    ch_mult: tuple[int, ...]     # len(ch_mult) - 1 halvings: the latent is S / 2**(len(ch_mult)-1)
    num_res_blocks: int          # ResNet blocks per encoder level (the decoder has one more, as VAR)
    z_channels: int              # Cvae
    vocab_size: int              # V, one codebook for all scales
    patch_nums: tuple[int, ...]  # pn_k, coarse to fine; the last one is the latent side
    beta: float = 0.25           # commitment weight of the vq loss (see residual_quantize)
    quant_resi: float = 0.5      # r in phi(z) = (1 - r) * z + r * conv3x3(z)
    share_quant_resi: int = 4    # number of phi convs, shared among the K scales
    using_znorm: bool = False    # nearest code by cosine similarity instead of squared L2
    dropout: float = 0.0         # inside the ResNet blocks
    # training only: these never change what a trained tokenizer computes
    usage_ema: float = 0.99      # decay of the per-scale code-hit EMA quantize.ema_vocab_hit_SV
    dead_code_threshold: float = 0.0   # 0 = off (VAR); see MultiScaleVQVAE.restart_dead_codes

    def __post_init__(self):
        # JSON round trips turn tuples into lists: normalise, so configs compare equal.
        self.ch_mult, self.patch_nums = tuple(map(int, self.ch_mult)), tuple(map(int, self.patch_nums))
        _check_config(self)

    @property
    def latent_size(self) -> int:
        """h == w, the side of the encoder's feature map."""
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """A plain, JSON-able dict (tuples become lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        """Inverse of to_dict; unknown keys are an error (they usually mean a version mismatch)."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TokenizerConfig field(s) {unknown}; the fields are TokenizerConfig's")
        return cls(**d)


# "var256" has the architecture of VAR's released vae_ch160v4096z32 (256px ImageNet, 16x
# downsampling): its parameter names and shapes match the file's key list exactly
# (tests/reference/var_vae_ch160v4096z32_keys.txt; the file itself was never loaded here).
# "32px" is small enough to train on a CPU (4x downsampling to 8x8 latents at 32 px, 1.1M
# parameters); its dead-code restarts keep the coarse scales from collapsing onto a few codes.
# The same layers take any S divisible by 4. The measurements behind it: benchmarks/RESULTS.md,
# "The tokenizer: recipe and codebook collapse".
# Both keep VAR's quantizer defaults (beta 0.25, quant_resi 0.5, 4 phi convs, L2 lookup).
TOKENIZER_PRESETS: dict[str, dict] = {
    "32px": dict(image_size=32, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32,
                 vocab_size=512, patch_nums=(1, 2, 3, 4, 5, 6, 8), dead_code_threshold=0.03),
    "var256": dict(image_size=256, in_channels=3, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                   z_channels=32, vocab_size=4096, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
}


def tokenizer_config(name: str, **overrides) -> TokenizerConfig:
    """A preset by name, with any field overridden, e.g. tokenizer_config("32px", in_channels=1)."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    return TokenizerConfig.from_dict({**TOKENIZER_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# 2. Quantizer pieces: nearest code, the phi convs, one shared codebook
# ----------------------------------------------------------------------------------------------

def nearest_code(z: torch.Tensor, codebook: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """VAR §3.1 Eq. 3: the index of the nearest codebook row for every vector.

    z (M, Cvae), codebook (V, Cvae) -> (M,) long. Squared L2 is expanded as |z|^2 + |e|^2 - 2 z.e,
    so the M x V distance table is one matmul; with VAR's formula and op order, a released
    checkpoint picks VAR's codes. Ties go to the lowest index (argmin returns the first minimum).
    cosine=True (using_znorm): both sides are l2-normalised and the largest dot product wins.
    """
    if cosine:
        return torch.argmax(F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T, dim=1)
    sq_MV = z.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
    return torch.argmin(torch.addmm(sq_MV, z, codebook.T, beta=1, alpha=-2), dim=1)


def phi_index(k: int, K: int, n_phi: int) -> int:
    """Which of the n_phi shared phi convs scale k (of K) uses: VAR's PhiPartiallyShared.

    VAR's paper has one conv per scale; its code shares n_phi = 4 among the K scales. Conv i owns
    a tick in [0, 1]; scale k sits at k/(K-1) and takes the nearest tick (the first one on an
    exact float tie, like numpy.argmin). Ticks are linspace(1/(3n), 1-1/(3n), n) for n == 4, else
    linspace(1/(2n), 1-1/(2n), n). For n = 4: K=10 gives 0,0,1,1,1,2,2,3,3,3; K=7 (the 32px
    preset) 0,0,1,2,2,3,3; K=5 (the fashion-mnist preset) 0,1,2,2,3.
    Rounding decides: on paper some scales sit exactly halfway between two ticks (k=2 and k=7 of
    10, e.g. |2/9 - 1/12| == |2/9 - 13/36|; k=3 of 7; k=2 of 5), and float64 sends each to the
    later conv, so the ticks are Python float64s built as numpy.linspace builds them (start +
    i*step, the last one set to stop).
    """
    at = k / max(K - 1, 1)
    start = 1 / (3 * n_phi) if n_phi == 4 else 1 / (2 * n_phi)
    stop = 1 - start
    step = (stop - start) / max(n_phi - 1, 1)                 # (n_phi == 1: one tick, at 1/2)
    dists = [abs(t - at) for t in [start + i * step for i in range(n_phi - 1)] + [stop]]
    return dists.index(min(dists))


class Phi(nn.Conv2d):
    """phi(z) = (1 - r) * z + r * conv3x3(z), with r = quant_resi = 0.5. (B, Cvae, h, w) -> same.

    Why (VAR §3.2): a coarse scale's 1x1 or 2x2 code map is blown up to h x w by bicubic
    interpolation, which can only make a smooth blob. To make up for what upscaling loses, VAR
    adds K extra convolution layers phi_k after it. The identity half passes the codes through
    whatever the conv learns; the conv half learns to put back some of what the blur lost.
    Notebook 03 sets the convs to the identity and measures what that costs the shipped tokenizer.
    """

    def __init__(self, Cvae: int, ratio: float):
        super().__init__(Cvae, Cvae, 3, padding=1)
        self.ratio = ratio

    def forward(self, z):
        return z * (1 - self.ratio) + super().forward(z) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """The quantizer's parameters (keys quantize.*); its algorithms are MultiScaleVQVAE's methods,
    so that encoding, decoding and the generator's input read in one place.
      embedding          (V, Cvae) the codebook Z, one for all K scales (VAR §3.2: so every
                         scale's tokens come from one vocabulary, the generator's V outputs)
      quant_resi         the share_quant_resi phi convs, as quant_resi.qresi_ls.i (VAR's keys; the
                         ModuleDict is there only for those names)
      ema_vocab_hit_SV   (K, V) buffer: how often each code is picked at each scale in training (EMA)
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        K, n_phi = len(cfg.patch_nums), cfg.share_quant_resi
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = nn.ModuleDict({"qresi_ls": nn.ModuleList([Phi(cfg.z_channels, cfg.quant_resi)
                                                                    for _ in range(n_phi)])})
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, cfg.vocab_size))
        self.phi_of_scale = [phi_index(k, K, n_phi) for k in range(K)]   # e.g. [0,0,1,1,1,2,2,3,3,3]

    def phi(self, k: int) -> Phi:
        """The phi conv used by scale k."""
        return self.quant_resi.qresi_ls[self.phi_of_scale[k]]


# ----------------------------------------------------------------------------------------------
# 3. The tokenizer: VAR's Algorithms 1 and 2, the generator's input, training
# ----------------------------------------------------------------------------------------------
# A pyramid of token maps travels in two forms: a list of K maps (B, pn_k^2), coarse to fine, which
# the methods below take and return, and one flat row of L tokens per image (B, L), which the
# token cache stores and the generator's logits follow. split_scales turns the second into the first.

def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """(B, L) flat tokens -> K tensors (B, pn_k^2), coarse to fine (the inverse of torch.cat(.., 1))."""
    return list(idx_BL.split([p * p for p in patch_nums], dim=1))


class MultiScaleVQVAE(nn.Module):
    """VAR's multi-scale residual VQ-VAE.

    An index list is K LongTensors idx_Bl of shape (B, pn_k^2), coarse to fine: VAR's token maps
    r_1..r_K, each flattened row-major. Encode with img_to_idx (Algorithm 1), decode with
    idx_to_fhat / fhat_to_img / idx_to_img (Algorithm 2); the generator's input comes from
    idx_to_teacher_input (training) and next_input (sampling); forward is the training pass, and
    update_code_usage its codebook bookkeeping.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # two 3x3 convs between the autoencoder and the quantizer, one on either side of it (VAR's)
        self.quant_conv, self.post_quant_conv = (nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
                                                 for _ in range(2))
        self.quantize = MultiScaleQuantizer(cfg)

    # ---- the two steps shared by encoding, decoding, teacher forcing and sampling ------------

    def embed_scale(self, idx_Bl: torch.Tensor, k: int) -> torch.Tensor:
        """z_k = lookup(Z, r_k), scale k's codes as a map: (B, pn_k^2) -> (B, Cvae, pn_k, pn_k).
        No upsampling, no phi: this is what a sampler gets from the codes it just drew.
        Token i sits at row i // pn, column i % pn (row-major), in the generator's order too."""
        pn = self.cfg.patch_nums[k]
        return rearrange(self.quantize.embedding(idx_Bl), "b (row col) cvae -> b cvae row col", row=pn)

    def scale_contribution(self, z_k: torch.Tensor, k: int) -> torch.Tensor:
        """phi_k(interpolate(z_k, h, w)): scale k's part of f_hat. (B, Cvae, pn_k, pn_k) -> (B, Cvae, h, w).

        Bicubic upsampling to the latent size, except at the last scale, which is already full
        size (VAR skips the no-op resize). Encoding, decoding, teacher forcing and sampling all
        go through this one function and add its output to f_hat in the same order, so they
        agree bit for bit. Always in the codebook's dtype (float32), with autocast off: training
        builds its teacher input outside autocast, while validation and sampling run under it.
        """
        with torch.autocast(z_k.device.type, enabled=False):
            if k != len(self.cfg.patch_nums) - 1:
                z_k = F.interpolate(z_k, size=(self.cfg.latent_size, self.cfg.latent_size), mode="bicubic")
            return self.quantize.phi(k)(z_k)

    def _zeros_fhat(self, B: int) -> torch.Tensor:
        """The empty reconstruction f_hat = 0, (B, Cvae, h, w), before any scale is added."""
        return self.quantize.embedding.weight.new_zeros(B, self.cfg.z_channels, *(self.cfg.latent_size,) * 2)

    # ---- encoding: VAR Algorithm 1 -----------------------------------------------------------

    def residual_quantize(self, f: torch.Tensor):
        """VAR Algorithm 1 (multi-scale VQ-VAE encoding) on encoder features f (B, Cvae, h, w):

            for k = 1..K:                                (the paper counts from 1, the code from 0)
                r_k = Q(interpolate(f, h_k, w_k))        quantize the residual, seen at pn_k x pn_k
                z_k = interpolate(lookup(Z, r_k), h, w)  its codes, back at full size
                f   = f - phi_k(z_k)                     remove what scale k explained
            return r_1..r_K

        Why the residual: scale k quantizes only what scales < k left unexplained, so its codes
        refine, never repeat; the scales then add up (Algorithm 2 is a plain sum), and the sum of
        the scales so far, f_hat, is all the generator needs to know about them (VAR Fig. 4).
        "interpolate" down is area (average) pooling; up is bicubic (scale_contribution).

        Returns
            idx_list   K LongTensors (B, pn_k^2): the token maps r_k
            f_hat      (B, Cvae, h, w): the sum of all scales' contributions. Its gradient reaches
                       the codebook and the phi convs, not f (forward does the straight-through step)
            vq_loss    scalar: the mean over k of beta*||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2,
                       f_hat_k being the reconstruction from scales 0..k (sg = stop-gradient)
            residuals  K tensors (B * pn_k^2, Cvae): the vectors quantized (for restart_dead_codes)
        """
        cfg, K = self.cfg, len(self.cfg.patch_nums)
        f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f   # quantize in float32, as VAR
        f_rest = f.detach().clone()        # Alg. 1's f, what is still unexplained; it only picks codes
        f_hat = torch.zeros_like(f_rest)
        idx_list, residuals, vq_loss = [], [], 0.0
        codebook = self.quantize.embedding.weight.detach()
        with torch.autocast(f.device.type, enabled=False):
            for k, pn in enumerate(cfg.patch_nums):
                # r_k = Q(interpolate(f_rest, pn, pn)), "area" being average pooling
                rest_k = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != K - 1 else f_rest
                rest = rearrange(rest_k, "b cvae row col -> (b row col) cvae")        # (M, Cvae)
                idx_Bl = nearest_code(rest, codebook, cosine=cfg.using_znorm).view(-1, pn * pn)
                # f_hat += phi_k(z_k) and f_rest -= phi_k(z_k), with z_k = lookup(Z, r_k) upsampled
                contribution = self.scale_contribution(self.embed_scale(idx_Bl, k), k)
                f_hat = f_hat + contribution
                f_rest = f_rest - contribution.detach()
                # VQ-VAE's two terms (van den Oord et al. 2017, Eq. 3), once per scale: the codebook
                # and the phis move towards f (second term); the encoder commits to the
                # reconstruction so far (first term, weight beta). Each partial sum f_hat_k is
                # pulled towards f: every prefix of the scales is trained to reconstruct f.
                vq_loss = vq_loss + cfg.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
                idx_list.append(idx_Bl)
                residuals.append(rest)
        return idx_list, f_hat, vq_loss / K, residuals

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(B, Cimg, S, S) in [-1, 1] -> K LongTensors (B, pn_k^2), coarse to fine."""
        _check_images(self.cfg, img)
        return self.residual_quantize(self.quant_conv(self.encoder(img)))[0]

    # ---- decoding: VAR Algorithm 2 -----------------------------------------------------------

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """VAR Algorithm 2 (multi-scale reconstruction), up to the decoder: K index maps -> f_hat

            f_hat = 0
            for k = 1..K:  f_hat = f_hat + phi_k(interpolate(lookup(Z, r_k), h, w))

        (B, Cvae, h, w). Encoding added the very same terms, so f - f_hat is what the last scale
        left unexplained."""
        _check_idx(self.cfg, idx_list)
        f_hat = self._zeros_fhat(len(idx_list[0]))
        for k, idx_Bl in enumerate(idx_list):
            f_hat = f_hat + self.scale_contribution(self.embed_scale(idx_Bl, k), k)
        return f_hat

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, h, w) -> (B, Cimg, S, S) image clamped to [-1, 1]: Algorithm 2's im = D(f_hat)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K index maps -> (B, Cimg, S, S) image in [-1, 1]: all of Algorithm 2."""
        return self.fhat_to_img(self.idx_to_fhat(idx_list))

    # ---- what the generator sees: VAR Fig. 4, stage 2 ----------------------------------------

    def next_input(self, k: int, f_hat: torch.Tensor | None, z_k: torch.Tensor):
        """One autoregressive step (sampling): fold scale k's codes into f_hat, get scale k+1's input.

        k: scale just produced; f_hat: (B, Cvae, h, w) or None at k = 0;
        z_k = embed_scale(idx, k): (B, Cvae, pn_k, pn_k).
        Returns (f_hat, next_in): the updated f_hat and, for k < K-1, f_hat area-downsampled to
        scale k+1's size (B, Cvae, pn_{k+1}, pn_{k+1}); at the last scale next_in is f_hat itself.
        The generator thus sees the whole image so far at the size it is about to predict.
        """
        f_hat = (self._zeros_fhat(len(z_k)) if f_hat is None else f_hat) + self.scale_contribution(z_k, k)
        if k == len(self.cfg.patch_nums) - 1:        # the last scale: nothing is left to predict
            return f_hat, f_hat
        return f_hat, F.interpolate(f_hat, size=(self.cfg.patch_nums[k + 1],) * 2, mode="area")

    def idx_to_teacher_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for the generator: K index maps -> (B, L - pn_0^2, Cvae).

        Row block k (k = 1..K-1) is the ground-truth f_hat after scales 0..k-1, area-downsampled
        to pn_k x pn_k and flattened row-major. (Scale 0's input is the class token, built by
        the generator.) Built with `next_input`, so sampling sees exactly what training saw.
        """
        _check_idx(self.cfg, idx_list)
        B, Cvae = len(idx_list[0]), self.cfg.z_channels
        f_hat, chunks = None, [self.quantize.embedding.weight.new_zeros(B, 0, Cvae)]   # K = 1: (B, 0, Cvae)
        for k in range(len(idx_list) - 1):
            f_hat, next_in = self.next_input(k, f_hat, self.embed_scale(idx_list[k], k))
            chunks.append(rearrange(next_in, "b cvae row col -> b (row col) cvae"))
        return torch.cat(chunks, dim=1)

    # ---- training: VAR §3.1 Eq. 5 ------------------------------------------------------------

    def forward(self, img: torch.Tensor):
        """Training pass: encode, quantize, straight-through, decode. img (B, Cimg, S, S) in [-1, 1] ->
            recon    (B, Cimg, S, S) decoder output, NOT clamped (use it in the pixel loss)
            vq_loss  scalar; the caller adds the pixel loss, e.g.
                     loss = F.l1_loss(recon, img) + F.mse_loss(recon, img) + vq_loss
            stats    this batch's code usage (see update_code_usage)
        VAR §3.1 Eq. 5 trains with ||x - x'|| + ||f - f_hat|| + perceptual and GAN losses. Here the
        vq_loss stands for ||f - f_hat||, and the pixel loss is the caller's (train.py: L1 + L2; no
        perceptual or GAN loss, whose pretrained networks are downloads).

        Why straight-through (VQ-VAE, van den Oord et al. 2017, §3.2): the nearest-code choice
        is an argmin, with no gradient, so a pixel loss could never reach the encoder. The
        decoder is fed f + sg(f_hat - f): in value exactly f_hat, in the backward pass the
        identity on f. The gradient the decoder sends to "f_hat" is copied onto f unchanged; the
        codebook learns from vq_loss alone.
        """
        _check_images(self.cfg, img)
        f = self.quant_conv(self.encoder(img))                            # (B, Cvae, h, w)
        idx_list, f_hat, vq_loss, residuals = self.residual_quantize(f)   # Algorithm 1
        recon = self.decoder(self.post_quant_conv(f + (f_hat - f).detach()))   # straight-through
        return recon, vq_loss, self.update_code_usage(idx_list, residuals)

    # ---- codebook bookkeeping: not part of the method (VAR's code keeps a similar usage EMA) ---

    def update_code_usage(self, idx_list: list[torch.Tensor], residuals: list[torch.Tensor]) -> dict:
        """Counts this batch's codes per scale; in training, also updates the usage EMA and
        restarts dead codes. Called by forward, after the loss is built; it changes no gradient.

        idx_list, residuals: residual_quantize's. Returns {"hits" (K, V), "used" (K,),
        "perplexity" (K,)} (see code_usage), under DDP training of all ranks' batches, and
        "restarted": the number of dead codes restarted now (0 when dead_code_threshold is 0).
        Under DDP the counts are summed over ranks first, so every rank keeps the same EMA and
        decides the same restarts.
        """
        hits_KV = torch.stack([torch.bincount(idx.flatten(), minlength=self.cfg.vocab_size).float()
                               for idx in idx_list])
        if self.training:
            if dist.is_available() and dist.is_initialized():   # DDP: count all ranks' batches
                dist.all_reduce(hits_KV)
            ema = self.quantize.ema_vocab_hit_SV
            decay = self.cfg.usage_ema if ema.sum() > 0 else 0.0   # the first step starts from its batch
            ema.mul_(decay).add_(hits_KV, alpha=1 - decay)
        # none when dead_code_threshold is 0 (VAR), and never outside training
        restarted = self.restart_dead_codes(residuals, hits_KV.sum().item()) if self.training else 0
        return {**_usage_stats(hits_KV), "restarted": restarted}

    @torch.no_grad()
    def restart_dead_codes(self, residuals: list[torch.Tensor], hits_per_step: float) -> int:
        """Remedy for codebook collapse (not in VAR): move dead codes onto real residual vectors.

        Why: a code that is never picked gets no gradient from vq_loss, so it never moves and
        stays unpicked; with a small codebook trained briefly, a coarse scale can end up using a
        handful of codes (notebook 03, section 5, measures it).
        residuals: K tensors (M_k, Cvae) from residual_quantize. Returns the number restarted.
        A code is dead when its usage EMA, summed over scales, is below dead_code_threshold *
        hits_per_step / V (that fraction of uniform use). It moves onto a residual vector of this
        batch from a scale drawn uniformly, so that the coarse scales (a few vectors per image)
        get new codes as often as the fine ones: a 1x1 scale whose few codes sit far from the data
        then picks among many codes placed on its own residuals. At the first step every unused
        code is dead, which makes this a data-dependent init too. A restarted code's EMA is 2x the
        threshold, a grace period. Under DDP all ranks take rank 0's codebook and EMA.
        """
        ema = self.quantize.ema_vocab_hit_SV                 # (K, V)
        K, V = ema.shape
        threshold = self.cfg.dead_code_threshold * hits_per_step / V
        dead = torch.nonzero(ema.sum(0) < threshold).flatten()
        if dead.numel() == 0:
            return 0
        new = residuals[0].new_empty(dead.numel(), residuals[0].shape[1])
        scale_of = torch.randint(K, (dead.numel(),), device=new.device)   # the scale each dead code joins
        for k, rest in enumerate(residuals):
            rows = torch.nonzero(scale_of == k).flatten()
            if rows.numel():
                new[rows] = rest[torch.randint(rest.shape[0], (rows.numel(),), device=new.device)]
        codebook = self.quantize.embedding.weight.data
        codebook[dead] = new.to(codebook.dtype)
        ema[:, dead] = 2 * threshold / K
        for shared in (codebook, ema) if dist.is_available() and dist.is_initialized() else ():
            dist.broadcast(shared, src=0)
        return dead.numel()


# ----------------------------------------------------------------------------------------------
# 4. The convolutional autoencoder: VQGAN's (the LDM code), as VAR §4 uses it. It is the same
#    as in a single-scale VQ-VAE; everything multi-scale lives in sections 2 and 3. Modules are
#    created in VAR's order, so that a seed gives the same initial weights.
# ----------------------------------------------------------------------------------------------

def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, the normalisation of every LDM-style block."""
    return nn.GroupNorm(num_groups=32, num_channels=ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x))))))). (B, c_in, h, w) -> (B, c_out, h, w).
    The shortcut is a 1x1 conv (nin_shortcut) when c_in != c_out, else the identity."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.dropout = group_norm(c_out), nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        y = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(self.dropout(F.silu(self.norm2(y))))


class AttnBlock(nn.Module):
    """Single-head self-attention among the h*w positions, with a residual. (B, ch, h, w) -> same.
    q, k, v come from ONE fused 1x1 conv qkv (ch -> 3 ch), as in VAR's checkpoint; the logits are
    divided by sqrt(ch), as in any dot-product attention."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        q, k, v = (rearrange(t, "b ch h w -> b 1 (h w) ch") for t in self.qkv(self.norm(x)).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)                    # (B, 1 head, h*w, ch)
        return x + self.proj_out(rearrange(out, "b 1 (h w) ch -> b ch h w", h=h, w=w))


def resample2x(ch: int, down: bool) -> nn.Sequential:
    """VAR's Downsample2x, (B, ch, h, w) -> (B, ch, h/2, w/2): pad one pixel right and bottom (LDM's
    asymmetric pad, which keeps the conv aligned to the top-left pixel), then a stride-2 3x3 conv;
    or its Upsample2x, -> (B, ch, 2h, 2w): nearest-neighbour upsampling, then a 3x3 conv.
    The conv is the only parameter, under VAR's key name: downsample.conv | upsample.conv."""
    resize = nn.ZeroPad2d((0, 1, 0, 1)) if down else nn.Upsample(scale_factor=2, mode="nearest")
    conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)
    return nn.Sequential(OrderedDict(resize=resize, conv=conv))


class Level(nn.Module):
    """One resolution level, (B, c_in, h, w) -> (B, c_out, h', w'): n_blocks ResNet blocks, each
    followed by attention when attn is set (the lowest-resolution level), then an optional 2x
    resampling. Its children are VAR's state-dict names: block.j, attn.j, downsample | upsample.
    """

    def __init__(self, c_in: int, c_out: int, n_blocks: int, dropout: float, attn: bool, resample=None):
        super().__init__()
        self.block, self.attn, self.resample = nn.ModuleList(), nn.ModuleList(), resample
        for number in range(n_blocks):
            self.block.append(ResnetBlock(c_in if number == 0 else c_out, c_out, dropout))
            if attn:
                self.attn.append(AttnBlock(c_out))
        if resample:
            setattr(self, resample, resample2x(c_out, down=resample == "downsample"))

    def forward(self, x):
        for number, block in enumerate(self.block):
            x = self.attn[number](block(x)) if len(self.attn) else block(x)
        return getattr(self, self.resample)(x) if self.resample else x


def middle(ch: int, dropout: float) -> nn.Sequential:
    """ResNet block -> attention -> ResNet block at the lowest resolution (VAR's mid.* keys)."""
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(ch, ch, dropout), attn_1=AttnBlock(ch),
                                     block_2=ResnetBlock(ch, ch, dropout)))


class Encoder(nn.Module):
    """(B, Cimg, S, S) image -> (B, Cvae, h, w) features. Level i runs num_res_blocks ResNet
    blocks at width ch * ch_mult[i], then halves the resolution (all levels but the last)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        # chs: conv_in's channels, then each level's
        last, chs = len(cfg.ch_mult) - 1, [cfg.ch] + [cfg.ch * mult for mult in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.Sequential(*[Level(chs[level], chs[level + 1], cfg.num_res_blocks, cfg.dropout,
                                          attn=level == last, resample="downsample" if level < last else None)
                                    for level in range(last + 1)])
        self.mid = middle(chs[-1], cfg.dropout)
        self.norm_out, self.conv_out = group_norm(chs[-1]), nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.mid(self.down(self.conv_in(x))))))


class Decoder(nn.Module):
    """(B, Cvae, h, w) latent -> (B, Cimg, S, S) image, unbounded (callers clamp to [-1, 1]). The
    encoder's mirror with num_res_blocks + 1 blocks per level; up[level] works at that level's
    resolution and the last level runs first (VAR builds the levels in that order too)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        levels, chs = len(cfg.ch_mult), [cfg.ch * mult for mult in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = middle(chs[-1], cfg.dropout)
        up = [Level(chs[min(level + 1, levels - 1)], chs[level], cfg.num_res_blocks + 1, cfg.dropout,
                    attn=level == levels - 1, resample="upsample" if level != 0 else None)
              for level in reversed(range(levels))]                          # VAR's order
        self.up = nn.ModuleList(up[::-1])                        # but stored so that up[level] is that level
        self.norm_out, self.conv_out = group_norm(chs[0]), nn.Conv2d(chs[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ----------------------------------------------------------------------------------------------
# 5. Code usage statistics: how many codes each scale uses (training display, notebook 03)
# ----------------------------------------------------------------------------------------------

def _usage_stats(hits_KV: torch.Tensor) -> dict:
    """(K, V) hit counts -> {"hits", "used" (K,), "perplexity" (K,)}. Perplexity = exp(entropy)
    of the per-scale code distribution: V if all codes are used equally, 1 if one code only."""
    p = hits_KV / hits_KV.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
    return {"hits": hits_KV, "used": (hits_KV > 0).sum(dim=1), "perplexity": entropy.exp()}


def code_usage(idx_lists, vocab_size: int) -> dict:
    """Per-scale codebook usage over a dataset. idx_lists: one list of K LongTensors (B, pn_k^2)
    (e.g. from img_to_idx), or a list of such lists (one per batch). Returns {"hits": (K, V)
    float counts, "used": (K,) distinct codes per scale, "perplexity": (K,)}.
    """
    idx_lists = [idx_lists] if torch.is_tensor(idx_lists[0]) else idx_lists
    if max(int(idx.max()) for idx_list in idx_lists for idx in idx_list if idx.numel()) >= vocab_size:
        raise ValueError(f"code_usage: found a code index >= vocab_size={vocab_size}; pass the tokenizer's")
    return _usage_stats(sum(torch.stack([torch.bincount(idx.flatten().cpu(), minlength=vocab_size).double()
                                        for idx in idx_list]) for idx_list in idx_lists))


def psnr(img: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2).
    (B, Cimg, S, S) x 2 -> (B,). Equals the usual PSNR of the same images mapped to [0, 1]."""
    mse = (img.float() - recon.float().clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------
# 6. Input checks: what a user can get wrong (the config, the images, the token maps), each
#    error saying what to change.
# ----------------------------------------------------------------------------------------------

def _check_config(cfg: TokenizerConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"TokenizerConfig: {msg}")

    pns, K, n_phi, f = cfg.patch_nums, len(cfg.patch_nums), cfg.share_quant_resi, 2 ** (len(cfg.ch_mult) - 1)
    need(all(cfg.ch * m % 32 == 0 for m in (1, *cfg.ch_mult)), f"ch and every ch * ch_mult[i] must be "
         f"divisible by 32 (GroupNorm has 32 groups); got ch={cfg.ch}, ch_mult={cfg.ch_mult}")
    need(cfg.image_size % f == 0, f"image_size={cfg.image_size} must be divisible by 2**(len(ch_mult)-1)="
         f"{f}; pad or resize the images, or use fewer levels")
    need(pns and pns[0] >= 1 and all(a < b for a, b in zip(pns, pns[1:])),
         f"patch_nums must be positive and strictly increasing, got {pns}")
    need(pns[-1] == cfg.latent_size, f"patch_nums (--patch_nums) must end at the latent size image_size"
         f" / 2**(len(ch_mult)-1) = {cfg.image_size}/{f} = {cfg.latent_size}, but it ends at {pns[-1]}")
    unused = sorted(set(range(n_phi)) - {phi_index(k, K, n_phi) for k in range(K)})   # DDP fails on them
    need(not unused, f"share_quant_resi={n_phi} leaves phi conv(s) {unused} unused ({K} scales); use fewer")


def _check_images(cfg: TokenizerConfig, img: torch.Tensor) -> None:
    S, Cimg, shape = cfg.image_size, cfg.in_channels, tuple(img.shape)
    if len(shape) != 4 or shape[1:] != (Cimg, S, S):
        raise ValueError(f"tokenizer expects images of shape (B, {Cimg}, {S}, {S}) (in_channels={Cimg}, "
                         f"image_size={S}), got {shape}. Fix: resize or convert (grey <-> RGB) the images, "
                         f"or build the tokenizer for them: tokenizer_config(..., in_channels="
                         f"{shape[1] if len(shape) == 4 else '?'}, image_size=S)")
    if img.numel() and (top := img.detach().abs().amax()) > 1.5:   # [0, 1] or [0, 255] pixels
        raise ValueError(f"tokenizer expects pixel values in [-1, 1], got max |x| = {top.item():.3g}; "
                         f"map [0, 255] images with x/127.5 - 1")


def _check_idx(cfg: TokenizerConfig, idx_list: list[torch.Tensor]) -> None:
    want, got = [pn * pn for pn in cfg.patch_nums], [tuple(idx.shape) for idx in idx_list]
    if len(got) != len(want) or any(len(g) != 2 or g[1] != n for g, n in zip(got, want)):
        raise ValueError(f"expected {len(want)} index maps, one per scale, of shapes (B, l_k), l_k = "
                         f"pn_k^2 = {want} (patch_nums={cfg.patch_nums}); got shapes {got}")
