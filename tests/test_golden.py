"""The official code's own numbers: outputs of the official VAR, M-VAR and mamba_ssm code, saved in
tests/reference/official_golden.pt, reproduced through this project's public loading path.

How the file was made (once, outside this repository; the official code is not part of it): tiny
models of the official code (depth 2, width 64, 2 heads, 10 classes, V = 64, Cvae = 8, patch_nums
1,2,3,4), every parameter perturbed away from the official initialisation so that every path
matters, run in float32 on a CPU. For each of M-VAR (with and without `attn_l2_norm`) and VAR it
holds the official state dict, the teacher-forced logits, and the greedy token maps of the
official sampler (`autoregressive_infer_cfg`, top_k=1, cfg 1.5); for VAR's multi-scale quantizer
its state dict, an input feature map, the token maps, f_hat and the teacher input it produces.
"Same numbers as the official code" means: identical token maps, logits within float32 rounding.
"""
import sys
from pathlib import Path

import pytest
import torch

from mvar import MVAR, MVARConfig
import sample
from runtime import KNOWN_PYRAMIDS, load_official_checkpoint, official_generator_config, var_tokenizer_config
from tokenizer import MultiScaleVQVAE, tokenizer_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rerun_sampler  # noqa: E402  (the official sampler's way through Mamba: re-run the prefix)

GOLDEN = torch.load(Path(__file__).resolve().parent / "reference" / "official_golden.pt", weights_only=True)


def golden_tokenizer() -> MultiScaleVQVAE:
    """A tokenizer with a 4x4 latent, V = 64, Cvae = 8, whose quantizer holds the official
    quantizer's weights (codebook and phi convs). The encoder and decoder are never used here."""
    cfg = tokenizer_config("32px", image_size=16, ch=32, ch_mult=(1, 1, 1), z_channels=8,
                           vocab_size=64, patch_nums=(1, 2, 3, 4))
    assert (cfg.beta, cfg.quant_resi, cfg.share_quant_resi) == (0.25, 0.5, 4)   # VAR's values
    tok = MultiScaleVQVAE(cfg).eval()
    tok.quantize.load_state_dict(GOLDEN["quantizer"]["state_dict"], strict=True)
    return tok


def golden_model(name: str) -> MVAR:
    g = GOLDEN[name]
    cfg = MVARConfig(arch=g["arch"], depth=GOLDEN["depth"], width=GOLDEN["width"],
                     num_heads=GOLDEN["num_heads"], num_classes=GOLDEN["num_classes"],
                     vocab_size=GOLDEN["vocab_size"], Cvae=GOLDEN["Cvae"],
                     patch_nums=GOLDEN["patch_nums"], attn_l2_norm=g["attn_l2_norm"])
    model = MVAR(cfg)
    load_official_checkpoint(model, dict(g["state_dict"]))
    return model.eval()


def test_quantizer_matches_the_official_code():
    q, tok = GOLDEN["quantizer"], golden_tokenizer()
    with torch.no_grad():
        idx, f_hat = tok.residual_quantize(q["f"])[:2]
        teacher = tok.idx_to_teacher_input(q["idx"])
    for k, (ours, official) in enumerate(zip(idx, q["idx"])):
        assert torch.equal(ours, official), f"token map of scale {k} differs"
    torch.testing.assert_close(f_hat, q["f_hat"], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher, q["teacher_input"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mvar", "mvar_no_l2", "var"])
def test_teacher_forced_logits_match_the_official_code(name):
    g, tok, model = GOLDEN[name], golden_tokenizer(), golden_model(name)
    with torch.no_grad():
        teacher = tok.idx_to_teacher_input(g["teacher_idx"])
        logits = model(g["labels"], g["teacher_input"])
    torch.testing.assert_close(teacher, g["teacher_input"], rtol=0, atol=1e-6)
    rel = (logits - g["logits"]).abs().max() / g["logits"].abs().max()
    assert rel < 1e-5, f"{name}: logits differ from the official ones by {rel:.2e} (relative)"


@pytest.mark.parametrize("name,mamba_mode", [("mvar", "carry"), ("mvar", "rerun"),
                                             ("mvar_no_l2", "carry"), ("var", "carry")])
def test_greedy_samples_match_the_official_sampler(name, mamba_mode):
    g, tok, model = GOLDEN[name], golden_tokenizer(), golden_model(name)
    sample = rerun_sampler.sample_tokens if mamba_mode == "rerun" else MVAR.sample_tokens
    with torch.no_grad():
        out = sample(model, tok, g["sample_labels"], guidance=g["sample_cfg"], top_k=1)
    for k, (ours, official) in enumerate(zip(out["idx"], g["sample_idx"])):
        assert torch.equal(ours, official), f"{name} ({mamba_mode}): scale {k} differs"


def test_each_greedy_token_is_the_argmax_of_the_guided_logits():
    """Classifier-free guidance by hand: at scale k of K the strength is t = cfg * k / (K - 1)
    (0 at the first scale, cfg at the last), and the guided logits are (1 + t) cond - t uncond."""
    g, tok, model = GOLDEN["mvar"], golden_tokenizer(), golden_model("mvar")
    cfg, B, K = 1.5, len(g["sample_labels"]), len(GOLDEN["patch_nums"])
    with torch.no_grad():
        out = model.sample_tokens(tok, g["sample_labels"], guidance=cfg, top_k=1, return_logits=True)
    for k in range(K):
        t = cfg * k / (K - 1)
        cond, uncond = out["logits"][k][:B], out["logits"][k][B:]
        assert torch.equal(out["idx"][k], ((1 + t) * cond - t * uncond).argmax(-1)), f"scale {k}"


# --------------------------------------------------------------------------------------------
# Everything about a model read from its file
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mvar", "mvar_no_l2", "var"])
def test_config_is_read_from_the_official_state_dicts(name):
    g = GOLDEN[name]
    cfg = official_generator_config(g["state_dict"])
    assert (cfg.arch, cfg.depth, cfg.width, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.Cvae,
            cfg.patch_nums, cfg.attn_l2_norm) == (g["arch"], 2, 64, 2, 10, 64, 8, (1, 2, 3, 4), g["attn_l2_norm"])


@pytest.mark.parametrize("l2_norm", [True, False])
def test_d16_sized_key_sets_give_the_released_config(l2_norm):
    """The released d16 / d20 M-VAR files were trained with attn_l2_norm=False: no scale_mul_1H11.
    The key sets are built on the meta device (shapes only, no memory), without lvl_1L, so the
    scales come from L = 680."""
    with torch.device("meta"):
        released = MVAR(MVARConfig(arch="mvar", depth=16, num_classes=1000, attn_l2_norm=l2_norm))
    sd = released.state_dict()
    assert any("scale_mul_1H11" in k for k in sd) == l2_norm
    cfg = official_generator_config(sd)
    assert (cfg.arch, cfg.depth, cfg.width, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.Cvae,
            cfg.patch_nums, cfg.attn_l2_norm, cfg.d_state, cfg.headdim, cfg.expand) == \
        ("mvar", 16, 1024, 16, 1000, 4096, 32, KNOWN_PYRAMIDS[680], l2_norm, 64, 64, 2)
    with torch.device("meta"):
        rebuilt = MVAR(cfg).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


def test_the_tokenizer_config_is_read_from_its_shapes():
    released = tokenizer_config("var256")
    with torch.device("meta"):
        sd = MultiScaleVQVAE(released).state_dict()
    assert var_tokenizer_config(sd, released.patch_nums) == released
    with pytest.raises(ValueError, match="generator file"):
        var_tokenizer_config(GOLDEN["var"]["state_dict"], (1, 2, 3, 4))
    with pytest.raises(ValueError, match="VAR tokenizer file"):
        official_generator_config(sd)


def test_sample_official_needs_only_the_two_paths(tmp_path):
    """A golden state dict and a VAR-format tokenizer holding the golden quantizer, saved as
    files: sample.py --official writes a grid with no other flag."""
    torch.save(dict(GOLDEN["mvar_no_l2"]["state_dict"]), tmp_path / "mvar.pth")
    torch.save(golden_tokenizer().state_dict(), tmp_path / "vae.pth")
    res = sample.main(["--official", str(tmp_path / "mvar.pth"), "--vae_ckpt", str(tmp_path / "vae.pth"),
                       "--out", str(tmp_path), "--per_class", "1", "--device", "cpu"])
    assert res["grid"] == tmp_path / "mvar_grid.png" and res["grid"].is_file() and res["images"] == 10


def test_scales_are_read_from_lvl_1L_or_asked_for():
    sd = dict(GOLDEN["var"]["state_dict"])
    assert "lvl_1L" in sd and official_generator_config(sd).patch_nums == (1, 2, 3, 4)
    del sd["lvl_1L"]                             # L = 30 is not a released pyramid: ask
    with pytest.raises(ValueError, match="pass --patch_nums"):
        official_generator_config(sd)
    assert official_generator_config(sd, patch_nums=(1, 2, 3, 4)).patch_nums == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="squares must sum to 30"):
        official_generator_config(sd, patch_nums=(1, 2, 3))
