"""Tests for tokenizer.py: every algorithm against an independent reference (brute force,
float64 re-implementation, plain loops), plus VAR checkpoint compatibility and clear errors.

All CPU and fast; the one VAR-sized (~109M parameter) model is built once per session.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import (
    MultiScaleVQVAE, TokenizerConfig, TOKENIZER_PRESETS, code_usage, nearest_code, phi_index, psnr,
    tokenizer_config,
)
from runtime import load_state_dict_checked, load_tokenizer_state, load_var_checkpoint

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
VAR_KEYS = REFERENCE_DIR / "var_vae_ch160v4096z32_keys.txt"


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

def tiny_config(**overrides) -> TokenizerConfig:
    """16px RGB, one downsampling -> 8x8 latents; scales 1,2,3,5,8 include non-divisible
    area-downsampling ratios (8 -> 3, 8 -> 5) and more scales (5) than phi convs (4)."""
    base = dict(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                z_channels=8, vocab_size=64, patch_nums=(1, 2, 3, 5, 8))
    return TokenizerConfig(**{**base, **overrides})


def tiny_model(seed=0, **overrides) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(tiny_config(**overrides)).eval()
    with torch.no_grad():
        # Random phi convs (default init is fine) and a codebook of the same magnitude as the encoder's
        # features, so that many different codes get picked and the tests are not trivial.
        model.quantize.embedding.weight.mul_(0.3)
    return model


def images(B=4, Cimg=3, S=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, Cimg, S, S, generator=g) * 2 - 1


def random_idx(cfg, B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(cfg.vocab_size, (B, pn * pn), generator=g) for pn in cfg.patch_nums]


def parse_reference_keys(path):
    """'name [d0, d1] float32' lines -> {name: (shape, dtype)}."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"(\S+) \[([\d, ]*)\] (\S+)", line.strip())
        if m:
            shape = tuple(int(d) for d in m.group(2).split(",") if d.strip())
            out[m.group(1)] = (shape, m.group(3))
    return out


@pytest.fixture(scope="module")
def fake_var_checkpoint(tmp_path_factory):
    """A state dict with exactly the released checkpoint's keys and shapes (from the reference
    list, not from our model) filled with random numbers, saved with torch.save."""
    ref = parse_reference_keys(VAR_KEYS)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, (shape, _) in ref.items()}
    path = tmp_path_factory.mktemp("var") / "vae_ch160v4096z32.pth"
    torch.save(sd, path)
    return path, sd, ref


@pytest.fixture(scope="module")
def var_model(fake_var_checkpoint):
    """The one VAR-sized model of the session, loaded from the fake checkpoint."""
    path, _, _ = fake_var_checkpoint
    return load_var_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# independent float64 reference of the quantizer's pieces
# ---------------------------------------------------------------------------------------------

def area_downsample_loop(x, pn):
    """Plain-loop adaptive average pooling: output cell i covers input rows
    [floor(i*h/pn), ceil((i+1)*h/pn)) (same for columns). x: (B, C, h, w)."""
    B, C, h, w = x.shape
    out = torch.empty(B, C, pn, pn, dtype=x.dtype)
    for i in range(pn):
        r0, r1 = (i * h) // pn, -((-(i + 1) * h) // pn)
        for j in range(pn):
            c0, c1 = (j * w) // pn, -((-(j + 1) * w) // pn)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def reference_contribution(model, idx_Bl, k):
    """float64: phi_k(bicubic_upsample(codebook[idx])), phi written out as 0.5 z + 0.5 conv(z)."""
    cfg = model.cfg
    pn, s, K = cfg.patch_nums[k], cfg.latent_size, len(cfg.patch_nums)
    E = model.quantize.embedding.weight.detach().double()
    B = idx_Bl.shape[0]
    z = torch.stack([E[idx_Bl[b]].T.reshape(-1, pn, pn) for b in range(B)])   # (B, Cvae, pn, pn)
    if k != K - 1:
        z = F.interpolate(z, size=(s, s), mode="bicubic")
    conv = model.quantize.quant_resi.qresi_ls[phi_index(k, K, cfg.share_quant_resi)]
    r = cfg.quant_resi
    return (1 - r) * z + r * F.conv2d(z, conv.weight.double(), conv.bias.double(), padding=1)


# ---------------------------------------------------------------------------------------------
# nearest code, phi choice
# ---------------------------------------------------------------------------------------------

def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 8, generator=g)
    E = torch.randn(50, 8, generator=g)
    idx = nearest_code(z, E)
    # brute force in float64: a loop over vectors, full distance to every code
    zd, Ed = z.double(), E.double()
    for n in range(len(z)):
        d = ((zd[n] - Ed) ** 2).sum(1)
        best = int(d.argmin())
        # the float32 expanded formula may only disagree on a near-tie
        assert idx[n] == best or abs(d[idx[n]] - d[best]) < 1e-4, (n, idx[n], best)
    assert (idx == torch.cdist(zd, Ed).argmin(1)).float().mean() > 0.99


def test_nearest_code_cosine_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    z, E = torch.randn(200, 6, generator=g), torch.randn(40, 6, generator=g) * 5
    idx = nearest_code(z, E, cosine=True)
    for n in range(len(z)):
        cos = [float(z[n].double() @ E[v].double() / (z[n].double().norm() * E[v].double().norm())) for v in range(len(E))]
        assert cos[int(idx[n])] >= max(cos) - 1e-6


def test_nearest_code_ties_and_exact_hits():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])   # rows 2, 3 duplicate 0, 1
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.5, 0.5]])
    # duplicates -> the lowest index; (0.5, 0.5) is equidistant from all four -> index 0
    assert nearest_code(z, E).tolist() == [0, 1, 0, 0]
    assert nearest_code(z, E, cosine=True).tolist() == [0, 1, 0, 0]


def test_phi_choice_for_ten_scales():
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    cfg = tokenizer_config("var256")
    assert len(cfg.patch_nums) == 10 and cfg.share_quant_resi == 4


@pytest.mark.parametrize("K,n", [(10, 4), (7, 4), (5, 4), (10, 3), (6, 2), (5, 5), (4, 1)])
def test_phi_choice_matches_numpy_linspace(K, n):
    """Independent reference: VAR's formula written with numpy (float64 linspace, argmin)."""
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    expected = [int(np.argmin(np.abs(ticks - k / (K - 1)))) for k in range(K)]
    assert [phi_index(k, K, n) for k in range(K)] == expected


# ---------------------------------------------------------------------------------------------
# encoding / decoding / teacher forcing / sampling step
# ---------------------------------------------------------------------------------------------

def test_encoder_loop_matches_float64_reference():
    """Residual quantization re-derived in float64 with plain-loop area pooling and a
    brute-force nearest code: same indices, same f_hat (up to float32 round-off)."""
    model = tiny_model()
    x = images()
    with torch.no_grad():
        f = model.quant_conv(model.encoder(x))
        idx_list, f_hat, _, _ = model.residual_quantize(f)
    E = model.quantize.embedding.weight.detach().double()
    f_rest, f_hat_ref = f.double().clone(), torch.zeros_like(f.double())
    K = len(model.cfg.patch_nums)
    for k, pn in enumerate(model.cfg.patch_nums):
        rest_k = area_downsample_loop(f_rest, pn) if k != K - 1 else f_rest
        rest = rest_k.permute(0, 2, 3, 1).reshape(-1, rest_k.shape[1])          # (M, Cvae)
        d = torch.cdist(rest, E)
        # allow a different pick only on a float32-level near-tie
        chosen = idx_list[k].flatten()
        gap = d.gather(1, chosen[:, None]).squeeze(1) - d.min(1).values
        assert (gap < 1e-4).all(), f"scale {k}: a code far from the nearest was picked"
        contribution = reference_contribution(model, chosen.view(len(x), -1), k)
        f_hat_ref += contribution
        f_rest -= contribution
    assert torch.allclose(f_hat.double(), f_hat_ref, atol=1e-5)
    assert len({int(i) for idx in idx_list for i in idx.flatten()}) > 10, "test too trivial: few codes used"


def test_residual_identity_encode_then_decode():
    """idx_to_fhat(img_to_idx(x)) is exactly the f_hat the encoder loop built."""
    model = tiny_model()
    x = images()
    with torch.no_grad():
        idx_list, f_hat_enc, _, _ = model.residual_quantize(model.quant_conv(model.encoder(x)))
        assert all(torch.equal(a, b) for a, b in zip(idx_list, model.img_to_idx(x)))
        assert torch.equal(model.idx_to_fhat(idx_list), f_hat_enc)
        img = model.idx_to_img(idx_list)
        assert torch.equal(img, model.decoder(model.post_quant_conv(f_hat_enc)).clamp(-1, 1))
    assert img.shape == x.shape and img.abs().max() <= 1


def test_embed_scale_is_row_major_codebook_lookup():
    model = tiny_model()
    idx = random_idx(model.cfg)
    E = model.quantize.embedding.weight.detach()
    for k, pn in enumerate(model.cfg.patch_nums):
        h = model.embed_scale(idx[k], k)
        for b in range(idx[k].shape[0]):
            for t in range(pn * pn):
                assert torch.equal(h[b, :, t // pn, t % pn], E[idx[k][b, t]])


def test_teacher_input_matches_float64_reference():
    model = tiny_model()
    cfg = model.cfg
    idx = random_idx(cfg)
    with torch.no_grad():
        teacher = model.idx_to_teacher_input(idx)
    L = sum(pn * pn for pn in cfg.patch_nums)
    assert teacher.shape == (3, L - cfg.patch_nums[0] ** 2, cfg.z_channels)
    f_hat, chunks = 0, []
    for k in range(len(cfg.patch_nums) - 1):
        f_hat = f_hat + reference_contribution(model, idx[k], k)
        nxt = area_downsample_loop(f_hat, cfg.patch_nums[k + 1])
        chunks.append(nxt.flatten(2).transpose(1, 2))
    assert torch.allclose(teacher.double(), torch.cat(chunks, 1), atol=1e-5)


def test_next_input_reproduces_teacher_input_exactly():
    model = tiny_model()
    cfg = model.cfg
    idx = random_idx(cfg)
    with torch.no_grad():
        teacher = model.idx_to_teacher_input(idx)
        f_hat, chunks, K = None, [], len(cfg.patch_nums)
        for k in range(K):
            f_hat, nxt = model.next_input(k, f_hat, model.embed_scale(idx[k], k))
            if k < K - 1:
                assert nxt.shape == (3, cfg.z_channels, cfg.patch_nums[k + 1], cfg.patch_nums[k + 1])
                chunks.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is f_hat
        assert torch.equal(torch.cat(chunks, 1), teacher)
        assert torch.equal(f_hat, model.idx_to_fhat(idx))


def test_teacher_input_and_sampling_step_ignore_autocast():
    """Training builds the teacher input outside autocast; validation and sampling run under it
    (bf16 on a GPU). The phi convs must give the same float32 result either way."""
    model = tiny_model()
    idx = random_idx(model.cfg)
    with torch.no_grad():
        teacher = model.idx_to_teacher_input(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            teacher_amp = model.idx_to_teacher_input(idx)
            f_hat_amp = model.idx_to_fhat(idx)
        assert teacher_amp.dtype == torch.float32 and torch.equal(teacher_amp, teacher)
        assert torch.equal(f_hat_amp, model.idx_to_fhat(idx))


# ---------------------------------------------------------------------------------------------
# training pass: losses, straight-through gradient, usage statistics, dead-code restart
# ---------------------------------------------------------------------------------------------

def test_vq_loss_value_and_straight_through_gradient():
    # float64 so that the straight-through detour f + (f_hat - f) == f_hat to round-off
    model = tiny_model().double().train()
    x = images().double()
    recon, vq_loss, stats = model(x)
    enc_params = [p for p in model.encoder.parameters()]

    # Independent reference. f and the per-scale reconstructions f_hat_k (teacher-forced
    # through next_input from the indices the model picked).
    f = model.quant_conv(model.encoder(x))
    idx = [torch.as_tensor(i) for i in model.img_to_idx(x)]
    f_hats, fh = [], None
    for k in range(len(idx)):
        fh, _ = model.next_input(k, fh, model.embed_scale(idx[k], k))
        f_hats.append(fh)
    beta, K = model.cfg.beta, len(idx)
    ref_vq = sum(beta * F.mse_loss(fk.detach(), f) + F.mse_loss(fk, f.detach()) for fk in f_hats) / K
    assert torch.allclose(vq_loss, ref_vq, rtol=1e-10, atol=1e-12)
    # ... and its gradient to the encoder is the commitment term's only.
    g_model = torch.autograd.grad(vq_loss, enc_params, retain_graph=True)
    g_ref = torch.autograd.grad(ref_vq, enc_params, retain_graph=True)
    for a, b in zip(g_model, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)

    # Straight-through: d(pixel loss)/d(encoder) == (d loss / d f_hat) pushed back through f.
    target = torch.randn_like(recon)
    pixel = (recon * target).sum()
    g_st = torch.autograd.grad(pixel, enc_params, retain_graph=True)
    f_hat_leaf = f_hats[-1].detach().requires_grad_(True)
    dL_dfhat, = torch.autograd.grad((model.decoder(model.post_quant_conv(f_hat_leaf)) * target).sum(), f_hat_leaf)
    g_ref = torch.autograd.grad(f, enc_params, grad_outputs=dL_dfhat)
    assert any(a.abs().sum() > 0 for a in g_st), "no gradient reached the encoder"
    for a, b in zip(g_st, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    # The codebook learns from the vq loss only, never from the pixel loss.
    g_emb, = torch.autograd.grad(pixel, model.quantize.embedding.weight, allow_unused=True)
    assert g_emb is None or g_emb.abs().sum() == 0


def test_forward_stats_match_code_usage_and_brute_force_counts():
    model = tiny_model().train()
    x = images(B=6)
    _, _, stats = model(x)
    idx = model.img_to_idx(x)
    usage = code_usage(idx, model.cfg.vocab_size)
    assert torch.equal(stats["hits"].double(), usage["hits"])
    for k, idx_Bl in enumerate(idx):
        counts = {}
        for i in idx_Bl.flatten().tolist():
            counts[i] = counts.get(i, 0) + 1
        assert stats["used"][k] == len(counts) == usage["used"][k]
        total = sum(counts.values())
        ppl = math.exp(-sum(c / total * math.log(c / total) for c in counts.values()))
        assert abs(stats["perplexity"][k].item() - ppl) < 1e-4 * ppl
    assert stats["restarted"] == 0          # tiny_config leaves restarts off
    # EMA buffer: the first training step copies the batch's hits
    assert torch.equal(model.quantize.ema_vocab_hit_SV, stats["hits"])
    # forward's bookkeeping is update_code_usage; outside training it only counts
    with torch.no_grad():
        idx2, _, _, residuals = model.residual_quantize(model.quant_conv(model.encoder(x)))
    ema = model.quantize.ema_vocab_hit_SV.clone()
    again = model.eval().update_code_usage(idx2, residuals)
    assert torch.equal(again["hits"], stats["hits"]) and again["restarted"] == 0
    assert torch.equal(model.quantize.ema_vocab_hit_SV, ema)


def test_code_usage_over_batches_and_uniform_perplexity():
    idx_a = [torch.tensor([[0], [1]]), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])]
    idx_b = [torch.tensor([[2], [3]]), torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]])]
    u = code_usage([idx_a, idx_b], vocab_size=5)
    assert u["used"].tolist() == [4, 4]
    assert u["hits"][0].tolist() == [1, 1, 1, 1, 0]
    assert abs(u["perplexity"][0].item() - 4.0) < 1e-9            # uniform over 4 codes
    assert u["hits"][1].tolist() == [10, 2, 2, 2, 0]
    with pytest.raises(ValueError, match="vocab_size"):
        code_usage(idx_a, vocab_size=3)


def test_dead_code_restart_moves_only_dead_codes_onto_residuals():
    model = tiny_model(dead_code_threshold=0.5).train()
    V = model.cfg.vocab_size
    ema = model.quantize.ema_vocab_hit_SV
    ema.fill_(10.0)
    dead = [3, 17, 40]
    ema[:, dead] = 0.0
    before = model.quantize.embedding.weight.detach().clone()
    residuals = [torch.randn(n, model.cfg.z_channels) for n in (4, 16, 36, 100, 256)]
    hits_per_step = 1000.0                     # threshold = 0.5 * 1000 / 64 = 7.8 < 10 * K
    n = model.restart_dead_codes(residuals, hits_per_step)
    after = model.quantize.embedding.weight.detach()
    assert n == len(dead)
    alive = [v for v in range(V) if v not in dead]
    assert torch.equal(after[alive], before[alive])
    pool = torch.cat(residuals)
    for v in dead:
        assert (pool == after[v]).all(1).any(), f"code {v} was not moved onto a residual vector"
        assert ema[:, v].sum().item() == pytest.approx(2 * 0.5 * hits_per_step / V)
    assert model.restart_dead_codes(residuals, hits_per_step) == 0   # grace period: nothing dead now


def test_first_training_step_with_restarts_initialises_codebook_from_data():
    torch.manual_seed(0)
    model = MultiScaleVQVAE(tiny_config(dead_code_threshold=0.03)).train()   # default N(0, 1) codebook
    x = images(B=8)
    _, _, stats = model(x)
    # the codebook sits far from the small initial features: few codes are picked ...
    assert stats["used"][0] == 1 and stats["restarted"] >= model.cfg.vocab_size - stats["used"].sum()
    # ... after the restart the 1x1 scale finds codes placed on its own residuals
    _, _, stats2 = model(x)
    assert stats2["used"][0] >= 3


# ---------------------------------------------------------------------------------------------
# VAR checkpoint compatibility
# ---------------------------------------------------------------------------------------------

def test_var256_state_dict_equals_reference_key_list(var_model, fake_var_checkpoint):
    _, _, ref = fake_var_checkpoint
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in var_model.state_dict().items()}
    assert ours == ref
    assert var_model.quantize.phi_of_scale == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_fake_var_checkpoint_loads_strict_and_round_trips(var_model, fake_var_checkpoint):
    """The fixture saved random weights with torch.save and loaded them with
    load_var_checkpoint (weights_only, strict): every tensor comes back bit for bit."""
    _, sd, _ = fake_var_checkpoint
    loaded = var_model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not var_model.training and not any(p.requires_grad for p in var_model.parameters())


def test_var_checkpoint_with_wrong_vocab_size_is_a_clear_error(var_model, fake_var_checkpoint):
    _, sd, _ = fake_var_checkpoint
    bad = dict(sd)
    bad["quantize.embedding.weight"] = torch.zeros(512, 32)
    bad["quantize.ema_vocab_hit_SV"] = torch.zeros(10, 512)
    with pytest.raises(ValueError, match=r"vocab_size=512 but the config says 4096"):
        load_tokenizer_state(var_model, bad)      # (the same check load_var_checkpoint runs)
    assert torch.equal(var_model.quantize.embedding.weight, sd["quantize.embedding.weight"])


# ---------------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------------

def test_checkpoint_from_another_config_names_the_field(tmp_path):
    small = tiny_model(vocab_size=64)
    torch.save(small.state_dict(), tmp_path / "tok.pth")
    other = tiny_model(vocab_size=32)
    sd = torch.load(tmp_path / "tok.pth", weights_only=True)
    with pytest.raises(ValueError) as e:
        load_tokenizer_state(other, sd)
    msg = str(e.value)
    assert "vocab_size=64 but the config says 32" in msg
    assert "quantize.embedding.weight: checkpoint (64, 8) vs model (32, 8)" in msg
    # the matching config loads and round-trips
    same = tiny_model(seed=5, vocab_size=64)
    load_tokenizer_state(same, sd)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in sd.items())


def test_load_state_dict_checked_lists_missing_and_unexpected_keys():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = net.state_dict()
    sd.pop("1.bias")
    sd["2.weight"] = torch.zeros(1)
    before = net[0].weight.detach().clone()
    sd["0.weight"] = sd["0.weight"] + 1
    with pytest.raises(ValueError) as e:
        load_state_dict_checked(net, sd, what="generator")
    msg = str(e.value)
    assert "generator checkpoint" in msg and "missing from the checkpoint: 1.bias" in msg
    assert "unexpected in the checkpoint: 2.weight" in msg
    assert torch.equal(net[0].weight, before), "nothing may be loaded when the check fails"


def test_wrong_image_size_and_channels_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 16, 16\).*got \(2, 3, 32, 32\)"):
        model.img_to_idx(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"in_channels=3.*got \(2, 1, 16, 16\).*in_channels=1"):
        model.img_to_idx(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.full((2, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match="expected 5 index maps"):
        model.idx_to_fhat(random_idx(model.cfg)[:4])
    # scale 2 (3x3, 9 tokens) given 4 tokens: the message lists what each scale needs and got
    with pytest.raises(ValueError, match=r"pn_k\^2 = \[1, 4, 9, 25, 64\].*got shapes "
                                         r"\[\(3, 1\), \(3, 4\), \(3, 4\), \(3, 25\)"):
        model.idx_to_fhat([i if k != 2 else i[:, :4] for k, i in enumerate(random_idx(model.cfg))])


@pytest.mark.parametrize("overrides,pattern", [
    (dict(patch_nums=(1, 3, 2, 8)), "strictly increasing"),
    (dict(patch_nums=(1, 2, 2, 8)), "strictly increasing"),
    (dict(patch_nums=(1, 2, 4)), r"end at the latent size .* = 8, but it ends at 4"),
    (dict(patch_nums=(0, 2, 8)), "positive"),
    (dict(image_size=17), r"image_size=17 must be divisible by 2\*\*\(len\(ch_mult\)-1\)=2"),
    (dict(ch=48), "divisible by 32"),
    (dict(ch=16, ch_mult=(2, 2)), r"ch and every ch \* ch_mult\[i\] must be divisible by 32"),
    (dict(share_quant_resi=9), "share_quant_resi"),
    (dict(share_quant_resi=6, patch_nums=(1, 2, 3, 4, 5, 6, 8)), r"leaves phi conv\(s\) \[4\] unused"),
    (dict(ch_mult=(1, 2, 2)), r"= 16/4 = 4, but it ends at 8"),
])
def test_bad_config_is_a_clear_error(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


def test_config_dict_round_trip_and_presets():
    cfg = tokenizer_config("32px", in_channels=1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TokenizerConfig.from_dict(d) == cfg
    assert cfg.latent_size == 8 and cfg.patch_nums[-1] == 8 and cfg.in_channels == 1
    var = tokenizer_config("var256")
    assert (var.ch, var.ch_mult, var.num_res_blocks, var.z_channels, var.vocab_size) == (160, (1, 1, 2, 2, 4), 2, 32, 4096)
    assert var.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and var.latent_size == 16
    assert not var.using_znorm and var.share_quant_resi == 4 and var.quant_resi == 0.5
    assert var.dead_code_threshold == 0      # VAR's exact behaviour
    assert var.beta == 0.25 and var.usage_ema == 0.99 and var.dropout == 0
    assert tokenizer_config("32px") == TokenizerConfig(
        image_size=32, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32,
        vocab_size=512, patch_nums=(1, 2, 3, 4, 5, 6, 8), beta=0.25, quant_resi=0.5,
        share_quant_resi=4, using_znorm=False, dropout=0.0, usage_ema=0.99, dead_code_threshold=0.03)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_config("64px")
    with pytest.raises(ValueError, match="unknown TokenizerConfig field"):
        tokenizer_config("32px", vocab=3)
    with pytest.raises(ValueError, match=r"unknown TokenizerConfig field\(s\) \['foo'\]"):
        TokenizerConfig.from_dict({**d, "foo": 1})
    assert set(TOKENIZER_PRESETS) >= {"32px", "var256"}


def test_psnr_matches_formula():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.2                         # mse 0.04 on a peak-to-peak range of 2 -> 10 log10(4 / 0.04) = 20 dB
    y[1] += 0.02                        # 40 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 40.0]), atol=1e-4)
