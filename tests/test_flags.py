"""Every flag has a test of its effect, and the plumbing around the algorithms is held to it.

The other test files check the algorithms. This one checks the layer around them: that every
train.py flag (a field of train.TrainConfig) and every sample.py option (a dest of
runtime.sample_parser) reaches the thing it controls, with NON-default values (0 and the other
boundaries included where they mean something: drop_path 0, cond_drop 0, warmup_frac 0,
guidance 0, --guidance 0, --top_k 0, --top_p 0); that evaluation is evaluation; that pictures hold
the decoded pixel values; and that the sampler's and the restarts' distributions are the
documented ones.

  1. FLAG_TESTS, the table: each field / option -> the tests that cover it (here, or elsewhere as
     tests/test_x.py::test_name). test_every_flag_has_a_test_and_every_named_test_exists fails
     when a field or option is missing from it, when it names a test that does not exist, or when
     one of the rows below sets a flag to its default (a row must change something).
     Three table-driven tests do most of the work:
       test_train_flag[flag=value@scenario]     TRAIN_ROWS: a value and a check of its effect
       test_sample_flag[option=value-mode]      SAMPLE_ROWS: what sample.py passes the sampler,
                                                in the grid and in the .npz mode
       test_resume_refuses_a_changed_setting    every field that defines a stage's result
     Rows of one scenario share one run: "stage1" is one tokenizer run (4 steps), "stage2" one
     generator run on its tokenizer (4 steps), both with every row's value set at once and the
     optimizer, loader, checkpoint, picture and sampler calls recorded; "mini" rows are a
     generator step of their own; "cli" rows parse the command line and check what the config
     builds. Every run check is against a reference written here: the lr / weight-decay schedule
     as literal numbers, the first step recomputed from the seeded initial model and the
     sampler's first batch (stage 1: its loss; stage 2: its logits, as an untrained generator's
     loss is log V whatever its settings), shown to move when the flag is set back to its
     default; the configs written out by hand.
  2. Evaluation: train.eval_generator / eval_tokenizer give the same numbers from a model in
     train or in eval mode, with class dropout, drop-path and dropout set high.
  3. Pixels: MVAR.generate's images, sample.py's grid, strip and .npz, and the tokenizer's
     reconstruction grid hold (decoder(f_hat) + 1) / 2 of the sampled tokens, decoded here by
     hand; the shipped M-VAR's seeded sample is pinned to recorded pixel values.
  4. Distributions: gumbel_softmax's hard picks against softmax(logits) for every tau, its soft
     mixture's expectation against an integral, the --more_smooth sampler's picks against
     softmax(guided logits x (1 + k/(K-1))) at every scale, class dropout's boundaries in the
     training loop, and the dead-code restarts spread uniformly over all scales.

Tiny settings throughout: 16px shapes (16 training and 6 test images), a 64-channel tokenizer
with 4x4 latents and scales 1,2,3,4 (L = 30 tokens), a depth-2 width-32 generator.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mvar
import runtime
import sample
import train
from mvar import MVAR, MVARConfig
from tokenizer import MultiScaleVQVAE, TokenizerConfig, tokenizer_config
from test_sample import SMALL, tiles
from test_data import write_fmnist

TESTS = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
NUM_CLASSES = len(data.SHAPE_CLASSES)          # 8
PNS = (1, 2, 3, 4)                             # the runs' scales (4x4 latents)


# ============================================================================================
# 1. The rows: a flag, a non-default value, where it runs, and the check of its effect
# ============================================================================================

@dataclass
class Row:
    flag: str
    value: object
    scenario: str                       # "cli" | "stage1" | "stage2" | "mini"
    check: Callable                     # check(ctx, row)
    extra: tuple = ()                   # further flags the row needs ("cli" and "mini" rows)

    @property
    def id(self) -> str:
        return f"{self.flag}={fmt(self.value)}@{self.scenario}"


def fmt(v) -> str:
    """A value as its command line writes it."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


def argv_of(flags: dict) -> list:
    return [a for k, v in flags.items() for a in (f"--{k}", fmt(v))]


# The data of both runs (and of the generator run's token cache).
DATA = {"seed": 2, "hflip": True, "shapes_train": 16, "shapes_test": 6, "device": "cpu"}
# What the "mini" generator runs share with the stage-2 run (they start from its run folder).
MINI = {**DATA, "stage": "generator", "depth": 2, "width": 32, "num_heads": 2, "d_state": 8,
        "headdim": 16, "expand": 1, "gen_batch": 8, "gen_steps": 4, "cond_drop": 0.0, "drop_path": 0.0,
        "samples_per_class": 1, "image_every": 1000, "ckpt_every": 1000}
SCENARIO_EXTRAS = {"stage1": DATA, "stage2": {**DATA, "log_every": 1}}


# --- references written out by hand --------------------------------------------------------

def tok_config_by_hand(ch=64, ch_mult=(1, 1, 1), z=8, V=64, pns=PNS, **more) -> TokenizerConfig:
    """The stage-1 run's tokenizer: tokenizer.py's "32px" preset with the run's overrides."""
    return tokenizer_config("32px", image_size=16, in_channels=3, ch=ch, ch_mult=ch_mult, z_channels=z,
                            vocab_size=V, patch_nums=pns, **more)


def gen_config_by_hand(f: dict) -> MVARConfig:
    """The stage-2 run's generator, from its flags (vocab, Cvae and scales: the tokenizer's)."""
    return MVARConfig(arch="mvar", depth=f["depth"], width=f["width"], num_heads=f["num_heads"],
                      num_classes=NUM_CLASSES, vocab_size=64, Cvae=8, patch_nums=PNS, cond_drop=f["cond_drop"],
                      drop_path=f["drop_path"], alng=f["alng"], d_state=f["d_state"], headdim=f["headdim"],
                      expand=f["expand"])


def data_config(f: dict):
    return train.make_config("tiny", **{k: f[k] for k in ("seed", "hflip", "shapes_train", "shapes_test")})


TOK_FIELDS = {"tok_ch": "ch", "tok_ch_mult": "ch_mult", "tok_z_channels": "z_channels", "vocab_size": "vocab_size"}


def tok_first_loss(run, **change) -> float:
    """Stage 1's first loss, written out: the tokenizer the run saved the config of, built from the
    seed; the sampler's first batch (training views); tok_l1 * L1 + tok_l2 * L2 + the VQ loss."""
    f = {**run.flags, **change}
    ds = data.load_dataset(data_config(f), "train")
    epoch, items = data.ShardedSampler(len(ds), f["tok_batch"], f["seed"]).batch(0)
    img = torch.stack([ds[(i, epoch)][0] for i in items])
    torch.manual_seed(f["seed"])
    cfg = {**run.ck["config"]["tokenizer"], **{TOK_FIELDS[k]: v for k, v in change.items() if k in TOK_FIELDS}}
    model = MultiScaleVQVAE(TokenizerConfig.from_dict(cfg))
    with torch.no_grad():
        recon, vq_loss, _ = model(img)
        return float(f["tok_l1"] * (recon - img).abs().mean() + f["tok_l2"] * (recon - img).square().mean()
                     + vq_loss)


def assert_first_loss(run, row, by_hand, default=None):
    """The run's first logged loss (--log_every 1) equals the one written out here; and with the
    flag at `default` the written-out loss is another number (so this check sees the flag)."""
    got = run.history[0][1]
    assert run.history[0][0] == 1
    assert got == pytest.approx(by_hand(run), rel=1e-5), f"--{row.flag} {fmt(row.value)}: first loss differs"
    if default is not None:
        other = by_hand(run, **{row.flag: default})
        assert abs(other - got) > 1e-4 * abs(got), f"the first loss does not depend on --{row.flag}"


MODEL_FIELDS = ("depth", "width", "num_heads", "d_state", "headdim", "expand", "alng", "drop_path", "cond_drop")


def gen_first_pass(run, **change):
    """Stage 2's first step, written out: the generator the run saved the config of, built from the
    seed; the sampler's first batch of the token cache (its training view) -> (labels, tokens,
    teacher input, logits)."""
    f = {**run.flags, **change}
    tds = data.TokenDataset(run.cache["train"], f["seed"])
    epoch, items = data.ShardedSampler(len(tds), f["gen_batch"], f["seed"]).batch(0)
    idx = torch.stack([tds[(i, epoch)][0] for i in items])
    labels = torch.tensor([tds[(i, epoch)][1] for i in items])
    torch.manual_seed(f["seed"])
    model = MVAR(MVARConfig.from_dict({**run.ck["config"]["model"],
                                       **{k: v for k, v in change.items() if k in MODEL_FIELDS}})).train()
    with torch.no_grad():
        teacher = run.tokenizer.idx_to_teacher_input(list(idx.split([p * p for p in PNS], dim=1)))
        return labels, idx, teacher, model(labels, teacher)


def assert_gen_first_pass(run, row, default=None):
    """The run's first training forward pass (recorded) is the one written out here -- same labels,
    teacher input and logits -- and its loss the run's first logged loss (--log_every 1). With the
    flag at `default` the written-out logits move by far more than the tolerance. (The logits, not
    the loss: an untrained generator's loss is log V to six digits whatever its settings.)"""
    labels, idx, teacher, logits = gen_first_pass(run)
    seen = run.forwards[0]
    assert torch.equal(seen["labels"], labels) and torch.equal(seen["teacher"], teacher)
    torch.testing.assert_close(seen["logits"], logits, rtol=0, atol=1e-7)
    assert run.history[0][0] == 1
    assert run.history[0][1] == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), idx.flatten())), rel=1e-6)
    if default is not None:
        other = gen_first_pass(run, **{row.flag: default})[3]
        assert other.shape != logits.shape or (other - logits).abs().max() > 1e-6, \
            f"the first pass does not depend on --{row.flag}"


# --- the checks (ctx: the scenario's record; row: the row) -----------------------------------

def first_loss(default=None, stage=1):
    if stage == 2:
        return lambda run, row: assert_gen_first_pass(run, row, default)
    return lambda run, row: assert_first_loss(run, row, tok_first_loss, default)


def check_tok_config(run, row):
    """The tokenizer the run built (and saved the config of) has the flag's value, and the first
    loss is that tokenizer's; with the preset's value instead, the loss moves."""
    model, field_ = run.result["tokenizer"], TOK_FIELDS[row.flag]
    built = {"ch": model.encoder.conv_in.out_channels, "z_channels": model.quantize.embedding.weight.shape[1],
             "vocab_size": model.quantize.embedding.weight.shape[0], "ch_mult": tuple(model.cfg.ch_mult)}
    assert built[field_] == row.value
    assert run.ck["config"]["tokenizer"][field_] == (list(row.value) if isinstance(row.value, tuple) else row.value)
    preset_value = {"tok_ch": 32, "tok_ch_mult": (1, 2, 2), "tok_z_channels": 32, "vocab_size": 512}[row.flag]
    assert_first_loss(run, row, tok_first_loss, preset_value)


def check_schedule(stage):
    def check(run, row):
        """The lr and weight decay of every group at every optimizer step (recorded as the
        optimizer stepped), and in the checkpoint's optimizer state after the last step."""
        if stage == 1:       # tok_lr 1e-3, no warm-up, straight down to 0.3 x at the last of 4 steps
            lrs = [1e-3 * (1 - 0.7 * s / 3) for s in range(4)]
            wds = [[0.0] for _ in range(4)]      # the tokenizer never decays, whatever --weight_decay
        else:                # peak 2e-3 x 8 / 256; 2 warm-up steps; 0.25 x at the last step
            p = 2e-3 * 8 / 256
            lrs = [p / 2, p, p, 0.25 * p]
            # decay group: a half cosine from 0.07 to 0.11 over the 4 steps; no-decay group: 0
            wds = [[0.11 + (0.07 - 0.11) * 0.5 * (1 + math.cos(math.pi * s / 3)), 0.0] for s in range(4)]
            assert [r[2] for r in run.history] == pytest.approx(lrs, rel=1e-9)      # the logged lr
        assert len(run.steps) == 4
        for s, rec in enumerate(run.steps):
            assert [g[0] for g in rec["groups"]] == pytest.approx([lrs[s]] * len(wds[s]), rel=1e-9), s
            assert [g[1] for g in rec["groups"]] == pytest.approx(wds[s], rel=1e-9, abs=0), s
        saved = run.ck["optimizer"]["param_groups"]
        assert [g["lr"] for g in saved] == pytest.approx([lrs[-1]] * len(saved), rel=1e-9)
        assert [g["weight_decay"] for g in saved] == pytest.approx(wds[-1], rel=1e-9, abs=0)
        if stage == 2:       # the decay group holds the weight matrices, the other the rest
            model = run.result["generator"]
            decay = {id(p) for p in train.param_groups(model, 0.0)[0]["params"]}
            assert len(decay) == run.steps[0]["groups"][0][2] and 0 < len(decay) < len(list(model.parameters()))
    return check


def check_grad_clip(run, row):
    """optimizer_step gets --grad_clip, and the gradient the optimizer steps with has that norm
    (the raw gradient is larger: clipping acts)."""
    for rec in run.steps:
        assert rec["clip"] == row.value
        assert rec["norm_before"] > 10 * row.value
        assert rec["norm_at_step"] == pytest.approx(row.value, rel=1e-4)


def check_stage1_only(run, row):
    """Only the tokenizer: its config is tokenizer.py's 32px preset with the run's overrides."""
    assert run.ck["config"]["tokenizer"] == tok_config_by_hand().to_dict()
    assert run.result["tokenizer"] is not None and run.result["generator"] is None
    assert (run.out / "tokenizer.pt").is_file()
    assert not (run.out / "mvar.pt").exists() and not (run.out / "tokens.pt").exists()


def check_stage2_only(run, row):
    """Only the generator, on the stage-1 tokenizer (its V, Cvae and scales), which is not retrained."""
    model = run.ck["config"]["model"]
    assert (model["vocab_size"], model["Cvae"], model["patch_nums"], model["num_classes"]) == \
        (64, 8, list(PNS), NUM_CLASSES)
    assert model == gen_config_by_hand(run.flags).to_dict()            # and the flags' settings, the rest defaults
    assert run.result["tokenizer"] is None and run.result["generator"] is not None
    assert (run.out / "tokenizer.pt").read_bytes() == (run.tok_out / "tokenizer.pt").read_bytes()  # not retrained
    assert run.ck["step"] == run.ck["total_steps"] == 4


def check_out_dir(run, row):
    assert {p.name for p in run.out.iterdir()} >= {"config.json", "tokenizer.pt", "tokenizer_eval.json",
                                                   "tokenizer_recon.png", "tokenizer_loss.png"}
    import json
    assert json.loads((run.out / "config.json").read_text())["out_dir"] == str(run.out)


def check_device(run, row):
    assert run.devices == [row.value]
    assert {p.device.type for p in run.result["tokenizer"].parameters()} == {row.value}


def check_log_every(run, row):
    assert [r[0] for r in run.history] == [1, 2, 3, 4]          # one point per step, each its own loss
    assert len(set(r[1] for r in run.history)) == 4


def check_recon_pictures(run, row):
    assert run.recon_calls == 2              # step 2, then the final one at step 4 (default 500: the final one)


def check_num_workers(run, row):
    assert run.workers == [row.value] * len(run.workers) and run.workers


def check_tok_eval_images(run, row):
    """The final eval scores the first --eval_images test images (of 6)."""
    import json
    res = json.loads((run.out / "tokenizer_eval.json").read_text())
    model = run.result["tokenizer"]
    ds = data.load_dataset(data_config(run.flags), "test")
    img = torch.stack([ds[i][0] for i in range(row.value)])
    with torch.no_grad():
        recon = model.fhat_to_img(model.idx_to_fhat(model.img_to_idx(img)))
    mse = (img - recon).square().flatten(1).mean(1)
    assert res["images"] == row.value
    assert res["psnr_db"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-5)


def check_tok_total(run, row):
    assert run.ck["total_steps"] == 4 == round(2.0 * (16 // 8))    # tok_epochs x (images // tok_batch)


def check_gen_model_config(run, row):
    """The generator the run built is the one its flags describe (checkpoint, built model), and
    its first pass is that model's; set back to the default, the flag gives other logits."""
    assert run.ck["config"]["model"][row.flag] == row.value
    model = run.result["generator"]
    got = {"depth": len(model.blocks), "width": model.word_embed.out_features,
           "num_heads": model.blocks[0].attn.num_heads, "d_state": model.blocks[0].mamba.d_state,
           "headdim": model.blocks[0].mamba.headdim, "expand": model.blocks[0].mamba.d_inner // model.cfg.width,
           "alng": model.cfg.alng, "drop_path": max(b.drop_path_rate for b in model.blocks),
           "cond_drop": model.cfg.cond_drop}
    assert got[row.flag] == row.value
    # set back to the default (headdim: 32, as 64 does not divide the inner width 32); drop_path
    # and cond_drop at their defaults draw random numbers in the pass: no fixed reference
    other = {"depth": 4, "width": 128, "num_heads": 4, "d_state": 64, "headdim": 32, "expand": 2,
             "alng": 1e-3}.get(row.flag)
    assert_gen_first_pass(run, row, other)


def check_gen_lengths(run, row):
    assert run.ck["total_steps"] == 4 and [r[0] for r in run.history] == [1, 2, 3, 4]


def check_gen_batch(run, row):
    check_schedule(2)(run, row)                      # the peak lr is base_lr x gen_batch / 256
    assert_gen_first_pass(run, row, 16)              # and a step sees gen_batch items
    assert len(run.forwards[0]["labels"]) == row.value


def check_sample_grid_settings(run, row):
    """The run's sample grids: --guidance, --top_k, --top_p, --samples_per_class reach MVAR.generate."""
    assert len(run.generated) == 2                   # step 2 (--image_every 2) and the final grid
    for call in run.generated:
        assert (call["guidance"], call["top_k"], call["top_p"]) == (0.0, 7, 0.9)
        assert torch.equal(call["labels"], torch.arange(NUM_CLASSES).repeat(2))


def check_image_every(run, row):
    assert run.pictures == [2, None]
    assert (run.out / "images" / "mvar_step0000002.png").is_file()


def check_ckpt_every(run, row):
    assert run.saves == [("generator", 3), ("generator", 4)]    # every 3 steps, and at the end


def check_compile(run, row):
    assert run.compiled == [run.result["generator"]]


def check_gen_eval_images(run, row):
    """The final eval scores the first --eval_images test images (of 6), teacher-forced."""
    import json
    res = json.loads((run.out / "mvar_eval.json").read_text())
    model, test = run.result["generator"].eval(), run.cache["test"]
    idx, labels = test["idx"][:row.value].long(), test["labels"][:row.value]
    with torch.no_grad():
        logits = model(labels, run.tokenizer.idx_to_teacher_input(list(idx.split([p * p for p in PNS], 1))))
    assert res["tokens_images"] == row.value
    assert res["val_loss"] == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), idx.flatten())), rel=1e-5)


def check_shapes_counts(run, row):
    split = "train" if row.flag == "shapes_train" else "test"
    assert len(run.cache[split]["labels"]) == len(run.cache[split]["idx"]) == row.value


def check_gen_hflip(run, row):
    """--hflip: the cache holds the mirrors' tokens (train split only), and the first batch the
    run trained on took them where the item's draw says so (without them: another batch)."""
    assert run.cache["train"]["idx_flip"] is not None and run.cache["test"].get("idx_flip") is None
    assert_gen_first_pass(run, row)
    no_mirrors = {**run.cache, "train": {**run.cache["train"], "idx_flip": None}}
    unflipped = SimpleNamespace(**{**vars(run), "cache": no_mirrors})
    assert not torch.equal(gen_first_pass(unflipped)[1], gen_first_pass(run)[1])   # some items were mirrored


def check_gen_num_workers(run, row):
    assert run.encode_workers == [row.value, row.value]          # the token cache: train and test


# --- "cli" rows: the command line, then what the config builds -------------------------------

def cli(ctx, row):
    return train.parse_args([f"--{row.flag}", fmt(row.value), *row.extra])


def check_preset(ctx, row):
    cfg = cli(ctx, row)
    assert (cfg.dataset, cfg.depth, cfg.hflip, cfg.gen_batch) == ("cifar10", 8, True, 256)
    assert train.tokenizer_config_for(cfg, 3) == tokenizer_config("32px", image_size=32, in_channels=3, ch=64)


def built_model(cfg):
    return MVAR(train.model_config_for(cfg, train.tokenizer_config_for(cfg, 3), NUM_CLASSES))


def check_arch_var(ctx, row):
    model = built_model(cli(ctx, row))
    assert model.cfg.arch == "var" and not any(hasattr(b, "mamba") for b in model.blocks)
    assert all(b.attn.block_causal for b in model.blocks)


def check_depth(ctx, row):
    assert len(built_model(cli(ctx, row)).blocks) == row.value


def check_drop_path(ctx, row):
    """The max drop-path rate reaches the last block; the first one never drops."""
    rates = [b.drop_path_rate for b in built_model(cli(ctx, row)).blocks]
    assert rates[-1] == pytest.approx(row.value) and rates[0] == 0.0


def check_cond_drop(ctx, row):
    assert built_model(cli(ctx, row)).cfg.cond_drop == row.value


def check_image_size(ctx, row):
    cfg = cli(ctx, row)
    assert data.load_dataset(cfg, "train")[0][0].shape == (3, row.value, row.value)
    assert train.tokenizer_config_for(cfg, 3).image_size == row.value


def check_subset(ctx, row):
    cfg = cli(ctx, row)
    full = data.load_dataset(dataclasses.replace(cfg, subset=0), "train")
    part = data.load_dataset(cfg, "train")
    assert len(full) == 12 and len(part) == row.value
    for i in range(row.value):
        assert torch.equal(part[i][0], full[i][0]) and part[i][1] == full[i][1]
    assert torch.equal(part.labels, full.labels[:row.value])


def check_patch_nums(ctx, row):
    """--patch_nums with one halving (8x8 latents): the tokenizer's scales, and the generator's
    (which takes them from the tokenizer)."""
    cfg = cli(ctx, row)
    tok_cfg = train.tokenizer_config_for(cfg, 3)
    assert tok_cfg.patch_nums == row.value and tok_cfg.latent_size == 8
    assert train.model_config_for(cfg, tok_cfg, NUM_CLASSES).patch_nums == row.value


def check_tok_preset(ctx, row):
    assert train.tokenizer_config_for(cli(ctx, row), 3) == tokenizer_config("var256", in_channels=3)


def check_dataset(ctx, row):
    """--dataset fashion-mnist --data_dir D: the IDX files of D, grey, Fashion-MNIST's classes."""
    written = write_fmnist(ctx.tmp / "fm")
    cfg = train.parse_args([f"--{row.flag}", fmt(row.value), "--data_dir", str(ctx.tmp / "fm"), "--image_size", "28"])
    ds = data.load_dataset(cfg, "train")
    assert ds.class_names == list(data.FASHION_CLASSES) and len(ds) == len(written["train"][0])
    assert ds[0][0].shape == (1, 28, 28) and ds[0][1] == written["train"][1][0]


def check_download(ctx, row):
    """--download fetches the four Fashion-MNIST files into --data_dir (data._download stubbed:
    it copies fake files); without it the missing folder is an error and nothing is fetched."""
    write_fmnist(ctx.tmp / "source")
    fetched = []

    def fake_download(url, dest):
        fetched.append((url, Path(dest)))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ctx.tmp / "source" / Path(dest).name, dest)
    common = ["--dataset", "fashion-mnist", "--data_dir", str(ctx.tmp / "dl"), "--image_size", "28"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "_download", fake_download)
        with pytest.raises(FileNotFoundError, match="--download"):
            data.load_dataset(train.parse_args(common), "train")
        assert fetched == []
        ds = data.load_dataset(train.parse_args(common + [f"--{row.flag}"]), "train")
    files = data.FASHION_FILES["train"] + data.FASHION_FILES["test"]
    assert sorted(fetched) == sorted((data.FASHION_URL + f, ctx.tmp / "dl" / f) for f in files)
    assert len(ds) == 7


def check_vae_ckpt(ctx, row):
    """--vae_ckpt: stage 1 imports that file (the loader stubbed by a small tokenizer; called
    directly, as check_settings only lets the 256px file in) instead of training: tokenizer.pt
    holds its weights and names its source, no step is taken."""
    torch.manual_seed(5)
    imported = MultiScaleVQVAE(tok_config_by_hand()).eval()
    asked = []
    cfg = train.parse_args(argv_of({**DATA, "out_dir": str(ctx.tmp / "imported"), "tok_ch_mult": (1, 1, 1)})
                           + [f"--{row.flag}", fmt(row.value)])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "load_var_checkpoint", lambda path, **kw: (asked.append(path), imported)[1])
        m.setattr(train, "optimizer_step", lambda *a: pytest.fail("an imported tokenizer is not trained"))
        got = train.train_tokenizer(cfg, runtime.DistInfo())
    assert asked == [row.value] and got is imported
    ck = runtime.load_checkpoint(ctx.tmp / "imported" / "tokenizer.pt", "tokenizer")
    assert ck["source"] == row.value and ck["step"] == 0 and ck["done"]
    for k, v in imported.state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    assert (ctx.tmp / "imported" / "tokenizer_eval.json").is_file()


def check_device_refused(ctx, row):
    """--device cuda where there is none: refused at once (the flag reaches the set-up)."""
    if CUDA:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    with pytest.raises(ValueError, match="--device cuda requested"):
        train.main([f"--{row.flag}", fmt(row.value), "--out_dir", str(ctx.tmp / "nocuda")])
    assert not (ctx.tmp / "nocuda").exists()


# --- "mini" rows: a generator run of their own, from the stage-2 run's tokenizer and cache ---

def mini_run(ctx, row, spy_forward=False) -> SimpleNamespace:
    out = ctx.tmp / "mini"
    out.mkdir()
    for name in ("tokenizer.pt", "tokens.pt"):
        shutil.copy(ctx.gen.out / name, out / name)
    seen, real_forward = [], MVAR.forward

    def forward(self, labels, teacher_input):
        embedded = []
        hook = self.class_emb.register_forward_pre_hook(lambda m, a: embedded.append(a[0].clone()))
        try:
            return real_forward(self, labels, teacher_input)
        finally:
            hook.remove()
            seen.append({"training": self.training, "labels": embedded[0],
                         "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None})
    flags = {**MINI, row.flag: row.value, "out_dir": str(out)}
    with pytest.MonkeyPatch.context() as m:
        if spy_forward:
            m.setattr(MVAR, "forward", forward)
        result = train.main(argv_of(flags) + list(row.extra))
    return SimpleNamespace(result=result, forwards=seen, out=out,
                           ck=runtime.load_checkpoint(out / "mvar.pt", "generator"))


def check_max_minutes(ctx, row):
    run = mini_run(ctx, row)
    assert run.result["generator"] is None                     # stopped by the time budget...
    assert run.ck["step"] == 1 and not run.ck["done"] and run.ck["total_steps"] == 4   # ...with a checkpoint


def check_precision(ctx, row):
    """--precision bf16: the training forward passes run under bf16 autocast (fp16 wants CUDA)."""
    run = mini_run(ctx, row, spy_forward=True)
    assert [f["autocast"] for f in run.forwards if f["training"]] == [torch.bfloat16]
    if not CUDA:
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            train.amp_setup(dataclasses.replace(train.make_config(), precision="fp16"), torch.device("cpu"))


def check_cond_drop_everything(ctx, row):
    """--cond_drop 1: every label the training step embeds is the null class; the validation pass
    (eval mode) embeds the real ones."""
    run = mini_run(ctx, row, spy_forward=True)
    training = [f["labels"] for f in run.forwards if f["training"]]
    evaluating = [f["labels"] for f in run.forwards if not f["training"]]
    assert len(training) == 1 and (training[0] == NUM_CLASSES).all()
    assert evaluating and all((lab < NUM_CLASSES).all() for lab in evaluating)


TRAIN_ROWS = [
    # run control
    Row("preset", "cifar10", "cli", check_preset),
    Row("stage", "tokenizer", "stage1", check_stage1_only),
    Row("stage", "generator", "stage2", check_stage2_only),
    Row("arch", "var", "cli", check_arch_var),
    Row("out_dir", "{tmp}", "stage1", check_out_dir),
    Row("seed", 2, "stage1", first_loss(default=0)),     # seed 2: 5 of batch 0's 8 images mirrored
    Row("seed", 2, "stage2", first_loss(default=0, stage=2)),
    Row("device", "cpu", "stage1", check_device),
    Row("device", "cuda", "cli", check_device_refused),
    Row("precision", "bf16", "mini", check_precision, ("--stop_after", "1")),
    Row("compile", True, "stage2", check_compile),
    Row("max_minutes", 1e-9, "mini", check_max_minutes),
    Row("log_every", 1, "stage1", check_log_every),
    Row("ckpt_every", 3, "stage2", check_ckpt_every),
    Row("image_every", 2, "stage1", check_recon_pictures),
    Row("image_every", 2, "stage2", check_image_every),
    Row("num_workers", 2, "stage1", check_num_workers),
    Row("num_workers", 2, "stage2", check_gen_num_workers),
    # data
    Row("dataset", "fashion-mnist", "cli", check_dataset),
    Row("download", True, "cli", check_download),
    Row("image_size", 24, "cli", check_image_size, ("--patch_nums", "1,2,3,6", "--shapes_train", "4",
                                                    "--shapes_test", "4")),
    Row("hflip", True, "stage1", first_loss(default=False)),
    Row("hflip", True, "stage2", check_gen_hflip),
    Row("subset", 5, "cli", check_subset, ("--shapes_train", "12", "--shapes_test", "4")),
    Row("shapes_train", 16, "stage2", check_shapes_counts),
    Row("shapes_test", 6, "stage2", check_shapes_counts),
    # stage 1
    Row("tok_preset", "var256", "cli", check_tok_preset, ("--image_size", "256", "--patch_nums", "")),
    Row("tok_ch", 64, "stage1", check_tok_config),
    Row("tok_ch_mult", (1, 1, 1), "stage1", check_tok_config),
    Row("tok_z_channels", 8, "stage1", check_tok_config),
    Row("vocab_size", 64, "stage1", check_tok_config),
    Row("patch_nums", (1, 2, 4, 8), "cli", check_patch_nums, ("--tok_ch_mult", "1,1")),
    Row("tok_batch", 8, "stage1", lambda run, row: (check_tok_total(run, row), first_loss()(run, row))),
    Row("tok_lr", 1e-3, "stage1", check_schedule(1)),
    Row("tok_epochs", 2.0, "stage1", check_tok_total),
    Row("tok_l1", 0.3, "stage1", first_loss(default=1.0)),
    Row("tok_l2", 2.5, "stage1", first_loss(default=1.0)),
    Row("vae_ckpt", "fake/vae.pth", "cli", check_vae_ckpt),
    Row("eval_images", 4, "stage1", check_tok_eval_images),
    Row("eval_images", 4, "stage2", check_gen_eval_images),
    Row("warmup_frac", 0.0, "stage1", check_schedule(1)),
    Row("end_lr_ratio", 0.3, "stage1", check_schedule(1)),
    Row("weight_decay", 0.2, "stage1", check_schedule(1)),
    Row("grad_clip", 0.01, "stage1", check_grad_clip),
    # stage 2
    Row("depth", 2, "stage2", check_gen_model_config),
    Row("depth", 3, "cli", check_depth),
    Row("width", 32, "stage2", check_gen_model_config),
    Row("num_heads", 2, "stage2", check_gen_model_config),
    Row("d_state", 8, "stage2", check_gen_model_config),
    Row("headdim", 16, "stage2", check_gen_model_config),
    Row("expand", 1, "stage2", check_gen_model_config),
    Row("alng", 0.01, "stage2", check_gen_model_config),
    Row("drop_path", 0.0, "stage2", check_gen_model_config),
    Row("drop_path", 0.3, "cli", check_drop_path),
    Row("cond_drop", 0.0, "stage2", check_gen_model_config),
    Row("cond_drop", 0.7, "cli", check_cond_drop),
    Row("cond_drop", 1.0, "mini", check_cond_drop_everything, ("--gen_steps", "1")),
    Row("gen_batch", 8, "stage2", check_gen_batch),
    Row("base_lr", 2e-3, "stage2", check_schedule(2)),
    Row("gen_steps", 4, "stage2", check_gen_lengths),
    Row("warmup_frac", 0.5, "stage2", check_schedule(2)),
    Row("end_lr_ratio", 0.25, "stage2", check_schedule(2)),
    Row("weight_decay", 0.07, "stage2", check_schedule(2)),
    Row("weight_decay_end", 0.11, "stage2", check_schedule(2)),
    Row("grad_clip", 0.01, "stage2", check_grad_clip),
    Row("guidance", 0.0, "stage2", check_sample_grid_settings),
    Row("top_k", 7, "stage2", check_sample_grid_settings),
    Row("top_p", 0.9, "stage2", check_sample_grid_settings),
    Row("samples_per_class", 2, "stage2", check_sample_grid_settings),
]


def scenario_flags(name: str) -> dict:
    """A run scenario's command line: its extras and the value of each of its rows."""
    flags = dict(SCENARIO_EXTRAS[name])
    for row in TRAIN_ROWS:
        if row.scenario == name:
            assert flags.get(row.flag, row.value) == row.value, f"two values for --{row.flag} in {name}"
            flags[row.flag] = row.value
    return flags


# --- the two runs, with everything they hand on recorded --------------------------------------

def recording(m, rec: SimpleNamespace):
    """Spies on what train.py hands on: the optimizer step (each group's lr and weight decay,
    the clip and the gradient norms), the data loaders' worker counts, the device, pictures,
    checkpoints, torch.compile and MVAR.generate. Each calls the real thing."""
    rec.steps, rec.workers, rec.encode_workers, rec.devices = [], [], [], []
    rec.recon_calls, rec.pictures, rec.saves, rec.compiled, rec.generated, rec.forwards = 0, [], [], [], [], []
    real = SimpleNamespace(step=train.optimizer_step, loader=train.step_loader, encode=train.encode_images,
                           setup=runtime.setup_distributed, recon=train.save_recon_grid,
                           pictures=train.save_generator_pictures, save=runtime.StageRun.save,
                           generate=MVAR.generate, forward=MVAR.forward)
    norm = lambda ps: math.sqrt(sum(float(p.grad.double().square().sum()) for p in ps))

    def optimizer_step(opt, model, scaler, grad_clip):
        params = [p for p in model.parameters() if p.grad is not None]
        r = {"clip": grad_clip, "norm_before": norm(params),
             "groups": [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]}
        real_opt_step = opt.step

        def step(*a, **k):
            r["norm_at_step"] = norm(params)
            return real_opt_step(*a, **k)
        opt.step = step
        try:
            return real.step(opt, model, scaler, grad_clip)
        finally:
            del opt.step
            rec.steps.append(r)

    def step_loader(ds, sampler, start, end, num_workers=0, pin=False):
        rec.workers.append(num_workers)          # no worker processes in a test: the batches are the same
        return real.loader(ds, sampler, start, end, 0, pin)

    def encode_images(tokenizer, ds, indices, batch, device, flip, num_workers=0):
        rec.encode_workers.append(num_workers)
        return real.encode(tokenizer, ds, indices, batch, device, flip, 0)

    def setup_distributed(device="auto"):
        rec.devices.append(device)
        return real.setup(device)

    def save_recon_grid(*a):
        rec.recon_calls += 1
        return real.recon(*a)

    def save_generator_pictures(cfg, model, tokenizer, class_names, history, step=None):
        rec.pictures.append(step)
        return real.pictures(cfg, model, tokenizer, class_names, history, step)

    def save(self, step):
        rec.saves.append((self.kind, step))
        return real.save(self, step)

    def generate(self, tokenizer, labels, guidance=1.5, top_k=0, top_p=0.0, *a, **k):
        rec.generated.append({"labels": labels.clone(), "guidance": guidance, "top_k": top_k, "top_p": top_p})
        return real.generate(self, tokenizer, labels, guidance, top_k, top_p, *a, **k)

    def forward(self, labels, teacher_input):
        logits = real.forward(self, labels, teacher_input)
        if self.training:
            rec.forwards.append({"labels": labels.clone(), "teacher": teacher_input.clone(),
                                 "logits": logits.detach().clone()})
        return logits

    def compile_(model, *a, **k):                # the eager model: compiling would take minutes
        rec.compiled.append(model)
        return model
    for obj, name, fn in ((train, "optimizer_step", optimizer_step), (train, "step_loader", step_loader),
                          (train, "encode_images", encode_images), (runtime, "setup_distributed", setup_distributed),
                          (train, "save_recon_grid", save_recon_grid),
                          (train, "save_generator_pictures", save_generator_pictures),
                          (runtime.StageRun, "save", save), (MVAR, "generate", generate), (MVAR, "forward", forward),
                          (torch, "compile", compile_)):
        m.setattr(obj, name, fn)


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    """Stage 1 with every "stage1" row's value: 4 steps of 8 images."""
    out = tmp_path_factory.mktemp("stage1")
    rec = SimpleNamespace(out=out, flags={**scenario_flags("stage1"), "out_dir": str(out)})
    with pytest.MonkeyPatch.context() as m:
        recording(m, rec)
        rec.result = train.main(argv_of(rec.flags))
    rec.ck = runtime.load_checkpoint(out / "tokenizer.pt", "tokenizer")
    rec.history = rec.ck["history"]
    return rec


@pytest.fixture(scope="module")
def gen_run(tok_run, tmp_path_factory):
    """Stage 2 with every "stage2" row's value, on the stage-1 run's tokenizer: 4 steps of 8."""
    out = tmp_path_factory.mktemp("stage2")
    shutil.copy(tok_run.out / "tokenizer.pt", out / "tokenizer.pt")
    rec = SimpleNamespace(out=out, tok_out=tok_run.out, flags={**scenario_flags("stage2"), "out_dir": str(out)})
    with pytest.MonkeyPatch.context() as m:
        recording(m, rec)
        rec.result = train.main(argv_of(rec.flags))
    rec.ck = runtime.load_checkpoint(out / "mvar.pt", "generator")
    rec.history = rec.ck["history"]
    rec.cache = torch.load(out / "tokens.pt", weights_only=True)
    rec.tokenizer = runtime.load_trained_tokenizer(out / "tokenizer.pt")[0]
    return rec


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=[r.id for r in TRAIN_ROWS])
def test_train_flag(row, request, tmp_path):
    """One train.py flag set to a non-default value, and the thing it controls checked."""
    if row.scenario == "stage1":
        ctx = request.getfixturevalue("tok_run")
    elif row.scenario == "stage2":
        ctx = request.getfixturevalue("gen_run")
    else:
        ctx = SimpleNamespace(tmp=tmp_path)
        if row.scenario == "mini":
            ctx.gen = request.getfixturevalue("gen_run")
    row.check(ctx, row)


# --- resuming: every setting that defines a stage's result is checked against the checkpoint --

DATA_FIELDS = ("seed", "dataset", "image_size", "hflip", "subset", "shapes_train", "shapes_test")
DEFINING = {   # written out here, not read from runtime.py: a field moved to RUNTIME_FIELDS fails
    "tokenizer": DATA_FIELDS + ("tok_preset", "tok_ch", "tok_ch_mult", "tok_z_channels", "vocab_size",
                                "patch_nums", "tok_batch", "tok_lr", "tok_epochs", "tok_l1", "tok_l2",
                                "warmup_frac", "end_lr_ratio", "grad_clip"),
    "generator": DATA_FIELDS + ("arch", "depth", "width", "num_heads", "d_state", "headdim", "expand",
                                "gen_batch", "base_lr", "warmup_frac", "end_lr_ratio", "weight_decay",
                                "weight_decay_end", "grad_clip", "alng", "drop_path", "cond_drop"),
}
RESUME_CASES = [(stage, name) for stage, names in DEFINING.items() for name in names]


def another_value(name: str, v):
    choices = next(f.metadata.get("choices") for f in dataclasses.fields(train.TrainConfig) if f.name == name)
    if choices:
        return next(c for c in choices if c != v)
    if isinstance(v, bool):
        return not v
    if isinstance(v, tuple):
        return v + (v[-1] + 1,) if v else (1, 2)
    return v + 1 if isinstance(v, int) else v + 0.5


@pytest.fixture(scope="module")
def resumable(tok_run, gen_run):
    """Per stage: resume(cfg) -> StageRun(...).resume() on the run's own checkpoint, with a model and
    an optimizer of its shapes; and the run's config. The run's own settings resume."""
    out = {}
    for stage, run in (("tokenizer", tok_run), ("generator", gen_run)):
        ck = run.ck
        if stage == "tokenizer":
            model = MultiScaleVQVAE(TokenizerConfig.from_dict(ck["config"]["tokenizer"]))
            opt, extra, path = torch.optim.AdamW(model.parameters()), (), run.out / "tokenizer.pt"
        else:
            model = MVAR(MVARConfig.from_dict(ck["config"]["model"]))
            opt, extra = torch.optim.AdamW(train.param_groups(model, 0.0)), (run.tokenizer, run.cache)
            path = run.out / "mvar.pt"
        cfg = train.parse_args(argv_of(run.flags))
        assert dataclasses.asdict(cfg) == ck["config"]["train"]

        def resume(c, stage=stage, path=path, model=model, opt=opt, extra=extra, ck=ck, read=False):
            with pytest.MonkeyPatch.context() as m:
                if not read:         # the file, as the fixture read it (a refusal reads no further)
                    m.setattr(runtime, "load_checkpoint", lambda p, kind: ck if Path(p) == path else pytest.fail(p))
                return runtime.StageRun(stage, c, runtime.DistInfo(), path, ck["total_steps"], math.inf, model,
                                        opt, None, *extra).resume()
        assert resume(cfg, read=True) == ck["step"]
        out[stage] = SimpleNamespace(cfg=cfg, resume=resume)
    return out


@pytest.mark.parametrize("stage, name", RESUME_CASES, ids=[f"{s}-{n}" for s, n in RESUME_CASES])
def test_resume_refuses_a_changed_setting(stage, name, resumable):
    """Resuming a stage's checkpoint under another value of a field that defines its result (the
    data above all: --subset, --seed, ...) is refused, naming the field (the same settings resume:
    the fixture checks it)."""
    cfg = resumable[stage].cfg
    changed = dataclasses.replace(cfg, **{name: another_value(name, getattr(cfg, name))})
    message = "holds a 'mvar' generator" if name == "arch" else rf"other settings:\n  {name}: checkpoint"
    with pytest.raises(ValueError, match=message):
        resumable[stage].resume(changed)


# ============================================================================================
# sample.py's options: what reaches the sampler (MVAR.sample_tokens), grid and .npz alike
# ============================================================================================

# The checkpoint sample.py reads: the stage-2 run's, its sampling setting made non-zero, so that
# a flag's 0 is told apart from "not given".
CKPT_SETTING = {"guidance": 2.0, "top_k": 20, "top_p": 0.9}


@pytest.fixture(scope="module")
def sampling(gen_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    shutil.copy(gen_run.out / "tokenizer.pt", folder / "tokenizer.pt")
    ck = runtime.load_checkpoint(gen_run.out / "mvar.pt", "generator")
    ck["config"]["train"].update(CKPT_SETTING)
    runtime.save_checkpoint(ck, folder / "mvar.pt")
    return SimpleNamespace(ckpt=folder / "mvar.pt", tmp=tmp_path_factory.mktemp("sampled"), runs={})


def run_sample(ctx, argv: list, default_args=True):
    """sample.main(argv) with MVAR.sample_tokens recorded -> (result, calls). One image of class 1
    unless the row says otherwise; --out in a folder of its own."""
    argv = list(argv)
    if default_args and "--ckpt" not in argv and "--official" not in argv and "--arch" not in argv:
        argv = ["--ckpt", str(ctx.ckpt)] + argv
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    if not {"--classes", "--per_class", "--npz"} & set(argv):
        argv += ["--classes", "1", "--per_class", "1"]
    if "--out" not in argv:
        argv += ["--out", str(ctx.tmp / f"out{len(ctx.runs)}")]
    key = tuple(argv)
    if key in ctx.runs:
        return ctx.runs[key]
    calls, real = [], MVAR.sample_tokens
    signature = inspect.signature(real)

    def sample_tokens(self, *args, **kwargs):
        a = signature.bind(self, *args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        calls.append({"labels": a["labels"].clone(), "guidance": a["guidance"], "top_k": a["top_k"],
                      "top_p": a["top_p"], "more_smooth": a["more_smooth"], "return_scales": a["return_scales"],
                      "generator": a["generator"].get_state().clone(), "arch": self.cfg.arch,
                      "patch_nums": self.cfg.patch_nums, "device": a["labels"].device.type,
                      "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None})
        return real(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(MVAR, "sample_tokens", sample_tokens)
        result = sample.main(argv)
    ctx.runs[key] = (result, calls)
    return result, calls


@dataclass
class SampleRow:
    option: str
    argv: tuple
    check: Callable                     # check(ctx, row)
    mode: str = "grid"                  # "grid" | "npz": the row's argv gets --npz 2 in npz mode

    @property
    def id(self) -> str:
        shown = "=".join(a.removeprefix("--") for a in self.argv[:2])
        return f"{shown}-{self.mode}"

    @property
    def full_argv(self) -> list:
        return list(self.argv) + (["--npz", "2"] if self.mode == "npz" and "--npz" not in self.argv else [])


def sampler_gets(**want):
    """Every sampler call gets these settings; the others are the checkpoint's."""
    def check(ctx, row):
        result, calls = run_sample(ctx, row.full_argv)
        expected = {"guidance": CKPT_SETTING["guidance"], "top_k": CKPT_SETTING["top_k"],
                    "top_p": CKPT_SETTING["top_p"], "more_smooth": False, **want}
        assert calls
        for c in calls:
            assert {k: c[k] for k in expected} == expected
        assert (result["npz"] is not None, result["grid"] is not None) == (row.mode == "npz", row.mode == "grid")
    return check


def check_seed(ctx, row):
    """One generator, seeded with --seed, drives the sampling; the setting is the checkpoint's."""
    sampler_gets()(ctx, row)
    _, calls = run_sample(ctx, row.full_argv)
    assert torch.equal(calls[0]["generator"], torch.Generator().manual_seed(7).get_state())


def labels_drawn(want):
    def check(ctx, row):
        result, calls = run_sample(ctx, row.full_argv)
        assert torch.cat([c["labels"] for c in calls]).tolist() == want
        if result["npz"] is not None:
            assert np.load(result["npz"])["arr_1"].tolist() == want
    return check


def check_per_class(ctx, row):
    labels_drawn([2, 4] * 3)(ctx, row)
    result, _ = run_sample(ctx, row.full_argv)
    assert tiles(result["grid"], rows=3, cols=2).shape[0] == 6          # 3 rows of 2 classes


def check_npz(ctx, row):
    """--npz 5: five images over all 8 classes, in a .npz and no grid."""
    labels_drawn([0, 1, 2, 3, 4])(ctx, row)
    result, _ = run_sample(ctx, row.full_argv)
    assert result["grid"] is None and np.load(result["npz"])["arr_0"].shape == (5, 16, 16, 3)


def check_strip(ctx, row):
    result, calls = run_sample(ctx, row.full_argv)
    assert [c["return_scales"] for c in calls] == [True] and result["strip"].is_file()
    no_strip, calls = run_sample(ctx, ["--seed", "0"])
    assert [c["return_scales"] for c in calls] == [False] and no_strip["strip"] is None


def check_batch(ctx, row):
    _, calls = run_sample(ctx, row.full_argv)
    assert [len(c["labels"]) for c in calls] == [2, 2, 1]


def check_out(ctx, row):
    target = ctx.tmp / "named.png"
    result, _ = run_sample(ctx, ["--out", str(target)])
    assert result["grid"] == target and target.is_file()


def check_sample_device(ctx, row):
    _, calls = run_sample(ctx, row.full_argv)
    assert [c["device"] for c in calls] == ["cpu"]


def check_sample_device_refused(ctx, row):
    if CUDA:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    with pytest.raises(ValueError, match="--device cuda: that backend is not available"):
        run_sample(ctx, row.full_argv)


def check_precision_sampling(ctx, row):
    _, calls = run_sample(ctx, row.full_argv)
    assert [c["autocast"] for c in calls] == [torch.bfloat16 if row.argv[1] == "bf16" else None]


def check_shipped_arch(ctx, row):
    """No --ckpt: --arch picks the shipped model (weights/fashion-mnist/var.pt) and its setting."""
    _, calls = run_sample(ctx, row.full_argv, default_args=False)
    shipped = runtime.sampling_defaults(runtime.load_checkpoint(runtime.SHIPPED / "var.pt", "generator"))
    assert [c["arch"] for c in calls] == ["var"]
    assert (calls[0]["guidance"], calls[0]["top_k"], calls[0]["top_p"]) == (shipped["guidance"], shipped["top_k"],
                                                                           shipped["top_p"])


def check_tokenizer_option(ctx, row):
    """--tokenizer: the tokenizer is read from that file, not from beside the checkpoint."""
    alone = ctx.tmp / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(ctx.ckpt, alone / "mvar.pt")
    (ctx.tmp / "elsewhere").mkdir(exist_ok=True)
    shutil.copy(ctx.ckpt.parent / "tokenizer.pt", ctx.tmp / "elsewhere" / "tok.pt")
    with pytest.raises(FileNotFoundError, match="tokenizer.pt does not exist"):
        run_sample(ctx, ["--ckpt", str(alone / "mvar.pt")])
    result, calls = run_sample(ctx, ["--ckpt", str(alone / "mvar.pt"),
                                     "--tokenizer", str(ctx.tmp / "elsewhere" / "tok.pt")])
    assert result["grid"].is_file() and len(calls) == 1


def check_official_patch_nums(ctx, row):
    """--official files that do not say their scales (no lvl_1L, L = 30 is no released pyramid):
    --patch_nums gives them, and the sampled model has them."""
    torch.manual_seed(1)
    model = MVAR(MVARConfig(arch="mvar", num_classes=1000, **SMALL["model"]))
    torch.save(model.state_dict(), ctx.tmp / "gen.pth")                 # lvl_1L is not persistent
    torch.save(MultiScaleVQVAE(tokenizer_config("var256", **SMALL["tokenizer"])).state_dict(), ctx.tmp / "vae.pth")
    official = ["--official", str(ctx.tmp / "gen.pth"), "--vae_ckpt", str(ctx.tmp / "vae.pth"), "--classes", "0",
                "--per_class", "1"]
    with pytest.raises(ValueError, match="pass --patch_nums"):
        run_sample(ctx, official)
    _, calls = run_sample(ctx, official + list(row.argv))
    assert [c["patch_nums"] for c in calls] == [(1, 2, 3, 4)]


SAMPLE_ROWS = [
    *[SampleRow("guidance", ("--guidance", "0"), sampler_gets(guidance=0.0), mode) for mode in ("grid", "npz")],
    SampleRow("guidance", ("--cfg", "3.5"), sampler_gets(guidance=3.5)),   # the old name, an alias
    *[SampleRow("top_k", ("--top_k", "0"), sampler_gets(top_k=0), mode) for mode in ("grid", "npz")],
    SampleRow("top_k", ("--top_k", "5"), sampler_gets(top_k=5)),
    *[SampleRow("top_p", ("--top_p", "0"), sampler_gets(top_p=0.0), mode) for mode in ("grid", "npz")],
    SampleRow("top_p", ("--top_p", "0.5"), sampler_gets(top_p=0.5)),
    *[SampleRow("more_smooth", ("--more_smooth",), sampler_gets(more_smooth=True), mode) for mode in ("grid", "npz")],
    *[SampleRow("seed", ("--seed", "7"), check_seed, mode) for mode in ("grid", "npz")],
    SampleRow("classes", ("--classes", "5,0-1", "--per_class", "1"), labels_drawn([5, 0, 1])),
    SampleRow("classes", ("--classes", "6,1", "--npz", "3"), labels_drawn([6, 1, 6]), "npz"),
    SampleRow("per_class", ("--per_class", "3", "--classes", "2,4"), check_per_class),
    SampleRow("npz", ("--npz", "5"), check_npz, "npz"),
    SampleRow("strip", ("--strip",), check_strip),
    SampleRow("batch", ("--batch", "2", "--per_class", "5", "--classes", "3"), check_batch),
    SampleRow("out", ("--out", "named.png"), check_out),
    SampleRow("device", ("--device", "cpu"), check_sample_device),
    SampleRow("device", ("--device", "cuda"), check_sample_device_refused),
    SampleRow("precision", ("--precision", "bf16"), check_precision_sampling),
    SampleRow("precision", ("--precision", "fp32"), check_precision_sampling),
    SampleRow("arch", ("--arch", "var"), check_shipped_arch),
    SampleRow("tokenizer", ("--tokenizer", "tok.pt"), check_tokenizer_option),
    SampleRow("patch_nums", ("--patch_nums", "1,2,3,4"), check_official_patch_nums),
]


@pytest.mark.parametrize("row", SAMPLE_ROWS, ids=[r.id for r in SAMPLE_ROWS])
def test_sample_flag(row, sampling):
    """One sample.py option set to a non-default value, and what reaches the sampler checked."""
    row.check(sampling, row)


# ============================================================================================
# The table, and the meta-test that keeps it complete
# ============================================================================================

def here(test: str, *ids: str) -> list:
    return [f"tests/test_flags.py::{test}[{i}]" for i in ids] if ids else [f"tests/test_flags.py::{test}"]


def resumes(name: str, stages=("tokenizer", "generator")) -> list:
    return here("test_resume_refuses_a_changed_setting", *[f"{s}-{name}" for s in stages])


TT, TTP, TS, TD = ("tests/test_train.py::", "tests/test_training_path.py::", "tests/test_sample.py::",
                   "tests/test_data.py::")
FLAG_TESTS = {
    "train": {   # train.TrainConfig's fields (train.py --FIELD)
        "preset": here("test_train_flag", "preset=cifar10@cli") + [TT + "test_cli_overrides_and_presets",
                                                                   TT + "test_imagenet_presets_follow_var_commands"],
        "stage": here("test_train_flag", "stage=tokenizer@stage1", "stage=generator@stage2"),
        "arch": here("test_train_flag", "arch=var@cli") + resumes("arch", ("generator",))
        + [TT + "test_other_arch_shares_the_tokenizer_and_cache"],
        "out_dir": here("test_train_flag", "out_dir={tmp}@stage1") + [TT + "test_full_run_outputs"],
        "seed": here("test_train_flag", "seed=2@stage1", "seed=2@stage2") + resumes("seed"),
        "device": here("test_train_flag", "device=cpu@stage1", "device=cuda@cli"),
        "precision": here("test_train_flag", "precision=bf16@mini"),
        "compile": here("test_train_flag", "compile=1@stage2"),
        "max_minutes": here("test_train_flag", "max_minutes=1e-09@mini"),
        "stop_after": [TT + "test_resume_matches_uninterrupted_run", TT + "test_resume_checks_the_length_in_steps"],
        "log_every": here("test_train_flag", "log_every=1@stage1") + [TT + "test_full_run_outputs"],
        "ckpt_every": here("test_train_flag", "ckpt_every=3@stage2"),
        "image_every": here("test_train_flag", "image_every=2@stage1", "image_every=2@stage2"),
        "num_workers": here("test_train_flag", "num_workers=2@stage1", "num_workers=2@stage2"),
        "dataset": here("test_train_flag", "dataset=fashion-mnist@cli") + resumes("dataset")
        + [TD + "test_cifar10_pickle_roundtrip", TD + "test_image_folder_png_exact_center_crop"],
        "data_dir": here("test_train_flag", "dataset=fashion-mnist@cli", "download=1@cli")
        + [TD + "test_fashion_mnist_idx_roundtrip", TT + "test_token_cache_rebuilt_for_another_tokenizer"],
        "download": here("test_train_flag", "download=1@cli"),
        "image_size": here("test_train_flag", "image_size=24@cli") + resumes("image_size"),
        "hflip": here("test_train_flag", "hflip=1@stage1", "hflip=1@stage2") + resumes("hflip")
        + [TTP + "test_token_cache_pairs_each_image_with_its_tokens_and_label"],
        "subset": here("test_train_flag", "subset=5@cli") + resumes("subset"),
        "shapes_train": here("test_train_flag", "shapes_train=16@stage2") + resumes("shapes_train"),
        "shapes_test": here("test_train_flag", "shapes_test=6@stage2") + resumes("shapes_test"),
        "tok_preset": here("test_train_flag", "tok_preset=var256@cli") + resumes("tok_preset", ("tokenizer",)),
        "tok_ch": here("test_train_flag", "tok_ch=64@stage1") + resumes("tok_ch", ("tokenizer",)),
        "tok_ch_mult": here("test_train_flag", "tok_ch_mult=1,1,1@stage1") + resumes("tok_ch_mult", ("tokenizer",)),
        "tok_z_channels": here("test_train_flag", "tok_z_channels=8@stage1")
        + resumes("tok_z_channels", ("tokenizer",)),
        "vocab_size": here("test_train_flag", "vocab_size=64@stage1") + resumes("vocab_size", ("tokenizer",)),
        "patch_nums": here("test_train_flag", "patch_nums=1,2,4,8@cli") + resumes("patch_nums", ("tokenizer",)),
        "tok_batch": here("test_train_flag", "tok_batch=8@stage1") + resumes("tok_batch", ("tokenizer",)),
        "tok_lr": here("test_train_flag", "tok_lr=0.001@stage1") + resumes("tok_lr", ("tokenizer",)),
        "tok_epochs": here("test_train_flag", "tok_epochs=2.0@stage1") + resumes("tok_epochs", ("tokenizer",)),
        "tok_l1": here("test_train_flag", "tok_l1=0.3@stage1") + resumes("tok_l1", ("tokenizer",)),
        "tok_l2": here("test_train_flag", "tok_l2=2.5@stage1") + resumes("tok_l2", ("tokenizer",)),
        "vae_ckpt": here("test_train_flag", "vae_ckpt=fake/vae.pth@cli")
        + [TT + "test_missing_vae_checkpoint_says_where_to_get_it"],
        "eval_images": here("test_train_flag", "eval_images=4@stage1", "eval_images=4@stage2"),
        "depth": here("test_train_flag", "depth=2@stage2", "depth=3@cli") + resumes("depth", ("generator",))
        + [TT + "test_resume_refuses_other_config_and_arch"],
        "width": here("test_train_flag", "width=32@stage2") + resumes("width", ("generator",)),
        "num_heads": here("test_train_flag", "num_heads=2@stage2") + resumes("num_heads", ("generator",)),
        "d_state": here("test_train_flag", "d_state=8@stage2") + resumes("d_state", ("generator",)),
        "headdim": here("test_train_flag", "headdim=16@stage2") + resumes("headdim", ("generator",)),
        "expand": here("test_train_flag", "expand=1@stage2") + resumes("expand", ("generator",)),
        "gen_batch": here("test_train_flag", "gen_batch=8@stage2") + resumes("gen_batch", ("generator",)),
        "grad_accum": [TTP + "test_grad_accum_equals_one_step_on_the_whole_batch"],
        "base_lr": here("test_train_flag", "base_lr=0.002@stage2") + resumes("base_lr", ("generator",)),
        "gen_steps": here("test_train_flag", "gen_steps=4@stage2")
        + [TT + "test_resume_checks_the_length_in_steps", TT + "test_generator_length_in_steps_or_epochs"],
        "gen_epochs": [TT + "test_full_run_outputs", TT + "test_resume_checks_the_length_in_steps",
                       TT + "test_generator_length_in_steps_or_epochs"],
        "warmup_frac": here("test_train_flag", "warmup_frac=0.0@stage1", "warmup_frac=0.5@stage2")
        + resumes("warmup_frac"),
        "end_lr_ratio": here("test_train_flag", "end_lr_ratio=0.3@stage1", "end_lr_ratio=0.25@stage2")
        + resumes("end_lr_ratio"),
        "weight_decay": here("test_train_flag", "weight_decay=0.2@stage1", "weight_decay=0.07@stage2")
        + resumes("weight_decay", ("generator",)),
        "weight_decay_end": here("test_train_flag", "weight_decay_end=0.11@stage2")
        + resumes("weight_decay_end", ("generator",)),
        "grad_clip": here("test_train_flag", "grad_clip=0.01@stage1", "grad_clip=0.01@stage2") + resumes("grad_clip"),
        "alng": here("test_train_flag", "alng=0.01@stage2") + resumes("alng", ("generator",)),
        "drop_path": here("test_train_flag", "drop_path=0.0@stage2", "drop_path=0.3@cli")
        + resumes("drop_path", ("generator",))
        + [TTP + "test_drop_path_keeps_the_expectation_drops_and_is_off_in_eval"],
        "cond_drop": here("test_train_flag", "cond_drop=0.0@stage2", "cond_drop=0.7@cli", "cond_drop=1.0@mini")
        + resumes("cond_drop", ("generator",))
        + [TTP + "test_class_dropout_replaces_labels_by_the_null_class_at_its_rate"],
        "guidance": here("test_train_flag", "guidance=0.0@stage2"),
        "top_k": here("test_train_flag", "top_k=7@stage2"),
        "top_p": here("test_train_flag", "top_p=0.9@stage2"),
        "samples_per_class": here("test_train_flag", "samples_per_class=2@stage2"),
    },
    "sample": {   # runtime.sample_parser's dests (sample.py --OPTION)
        "ckpt": [TS + "test_grid_has_one_column_per_class", TS + "test_missing_and_corrupt_checkpoints"],
        "tokenizer": here("test_sample_flag", "tokenizer=tok.pt-grid") + [TS + "test_another_tokenizer_is_refused"],
        "official": [TS + "test_official_weights_load_and_sample",
                     "tests/test_golden.py::test_sample_official_needs_only_the_two_paths"],
        "vae_ckpt": [TS + "test_official_weights_load_and_sample", TS + "test_official_errors"],
        "arch": here("test_sample_flag", "arch=var-grid") + [TS + "test_official_errors",
                                                            TS + "test_missing_shipped_weights_say_how_to_get_them"],
        "depth": [TS + "test_official_errors"],
        "patch_nums": here("test_sample_flag", "patch_nums=1,2,3,4-grid"),
        "classes": here("test_sample_flag", "classes=5,0-1-grid", "classes=6,1-npz")
        + [TTP + "test_grid_columns_are_labelled_with_the_class_they_hold"],
        "per_class": here("test_sample_flag", "per_class=3-grid"),
        "guidance": here("test_sample_flag", "guidance=0-grid", "guidance=0-npz", "cfg=3.5-grid")
        + [TS + "test_cfg_flag_is_an_alias_of_guidance"],
        "top_k": here("test_sample_flag", "top_k=0-grid", "top_k=0-npz", "top_k=5-grid"),
        "top_p": here("test_sample_flag", "top_p=0-grid", "top_p=0-npz", "top_p=0.5-grid"),
        "more_smooth": here("test_sample_flag", "more_smooth-grid", "more_smooth-npz")
        + here("test_more_smooth_picks_follow_the_guided_sharpened_softmax_at_every_scale"),
        "seed": here("test_sample_flag", "seed=7-grid", "seed=7-npz"),
        "strip": here("test_sample_flag", "strip-grid") + here("test_grid_strip_and_npz_hold_the_decoded_pixels"),
        "npz": here("test_sample_flag", "npz=5-npz") + here("test_grid_strip_and_npz_hold_the_decoded_pixels")
        + [TTP + "test_npz_labels_name_the_class_of_each_image"],
        "batch": here("test_sample_flag", "batch=2-grid"),
        "out": here("test_sample_flag", "out=named.png-grid"),
        "device": here("test_sample_flag", "device=cpu-grid", "device=cuda-grid"),
        "precision": here("test_sample_flag", "precision=bf16-grid", "precision=fp32-grid"),
    },
}

PARAM_IDS = {"test_train_flag": [r.id for r in TRAIN_ROWS], "test_sample_flag": [r.id for r in SAMPLE_ROWS],
             "test_resume_refuses_a_changed_setting": [f"{s}-{n}" for s, n in RESUME_CASES]}


def resolve(test_id: str) -> None:
    """'tests/test_x.py::test_name[param]' -> fails unless the module has that test function, in the
    quick suite (not marked slow / processes / notebooks), and for this file's parametrized tests
    that parameter id."""
    path, _, name = test_id.partition("::")
    name, _, param = name.partition("[")
    assert path.startswith("tests/") and path.endswith(".py") and (TESTS / path[6:]).is_file(), test_id
    module = importlib.import_module(Path(path).stem)
    assert name.startswith("test_") and callable(getattr(module, name, None)), f"{test_id}: no such test"
    module_marks = getattr(module, "pytestmark", [])
    marks = {m.name for m in getattr(getattr(module, name), "pytestmark", [])}
    marks |= {m.name for m in (module_marks if isinstance(module_marks, list) else [module_marks])}
    assert not marks & {"slow", "processes", "notebooks"}, f"{test_id} is not in the quick suite"
    if param:
        assert Path(path).name == "test_flags.py", f"{test_id}: parameter ids are only checked in this file"
        assert param[:-1] in PARAM_IDS[name], f"{test_id}: no such parameter id"


def test_every_flag_has_a_test_and_every_named_test_exists():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    options = {a.dest for a in runtime.sample_parser("x")._actions if a.dest != "help"}
    for kind, names in (("train.py field", fields), ("sample.py option", options)):
        table = FLAG_TESTS["train" if kind.startswith("train") else "sample"]
        assert not names - table.keys(), f"{kind}(s) without a test in FLAG_TESTS: {sorted(names - table.keys())}"
        assert not table.keys() - names, f"FLAG_TESTS names no such {kind}: {sorted(table.keys() - names)}"
        assert all(table[n] for n in names)
    for tests in (t for table in FLAG_TESTS.values() for t in table.values()):
        for test_id in tests:
            resolve(test_id)
    # every row is listed under its flag, and sets a value other than the default
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    for row in TRAIN_ROWS:
        assert f"tests/test_flags.py::test_train_flag[{row.id}]" in FLAG_TESTS["train"][row.flag], row.id
        assert row.value != defaults[row.flag], f"{row.id} sets the default"
        if row.scenario in ("stage1", "stage2"):
            assert scenario_flags(row.scenario)[row.flag] == row.value
    parser = runtime.sample_parser("x")
    for row in SAMPLE_ROWS:
        assert f"tests/test_flags.py::test_sample_flag[{row.id}]" in FLAG_TESTS["sample"][row.option], row.id
        args = parser.parse_args(row.full_argv)
        assert getattr(args, row.option) != parser.get_default(row.option), f"{row.id} sets the default"
    for stage, name in RESUME_CASES:
        assert here("test_resume_refuses_a_changed_setting", f"{stage}-{name}")[0] in FLAG_TESTS["train"][name]


# ============================================================================================
# 2. Evaluation is evaluation: the same numbers from a model in train or in eval mode
# ============================================================================================

def test_eval_generator_is_the_same_from_train_or_eval_mode(gen_run):
    """With class dropout 0.9 and drop-path 0.5, a model handed over in train mode must score what
    it scores in eval mode: the conditional model, teacher-forced (checked by hand here), with
    no dropped class and no dropped branch. The same pass in train mode gives another loss, so
    the comparison can fail."""
    cfg = MVARConfig.from_dict({**gen_run.ck["config"]["model"], "cond_drop": 0.9, "drop_path": 0.5})
    model = MVAR(cfg)
    model.load_state_dict(gen_run.ck["model"])
    torch.manual_seed(0)
    with torch.no_grad():                # visible gates and class embeddings (the init keeps them tiny)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = data.TokenDataset(gen_run.cache["test"])
    args = (gen_run.tokenizer, ds, 4, 0, torch.device("cpu"), None)         # batches of 4 and 2
    from_eval = train.eval_generator(model.eval(), *args)
    torch.manual_seed(1)
    from_train = train.eval_generator(model.train(), *args)
    assert from_train == from_eval

    idx, labels = ds.idx.long(), ds.labels
    teacher = gen_run.tokenizer.idx_to_teacher_input(list(idx.split([p * p for p in PNS], 1)))
    with torch.no_grad():
        logits = model.eval()(labels, teacher)
        loss = float(F.cross_entropy(logits.flatten(0, 1), idx.flatten()))
        torch.manual_seed(2)
        in_train_mode = float(F.cross_entropy(model.train()(labels, teacher).flatten(0, 1), idx.flatten()))
    acc = [float(h.float().mean()) for h in (logits.argmax(-1) == idx).split([p * p for p in PNS], 1)]
    assert from_eval["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert from_eval["per_scale_acc"] == pytest.approx(acc, abs=1e-4)
    assert abs(in_train_mode - loss) > 1e-3


def test_eval_tokenizer_is_the_same_from_train_or_eval_mode(tok_run):
    """The tokenizer's training-only behaviour -- dropout (0.5 here), the code-usage EMA and the
    dead-code restarts -- must not touch its evaluation: same PSNR and code counts from train or
    eval mode (PSNR checked by hand), and the codebook and its EMA unchanged."""
    cfg = TokenizerConfig.from_dict({**tok_run.ck["config"]["tokenizer"], "dropout": 0.5, "dead_code_threshold": 0.5})
    model = MultiScaleVQVAE(cfg)
    model.load_state_dict(tok_run.ck["model"])
    ds = data.load_dataset(data_config(tok_run.flags), "test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_eval = train.eval_tokenizer(model.eval(), ds, 4, 0, torch.device("cpu"))
    torch.manual_seed(1)
    from_train = train.eval_tokenizer(model.train(), ds, 4, 0, torch.device("cpu"))
    assert from_train == from_eval
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    img = torch.stack([ds[i][0] for i in range(len(ds))])
    psnr = lambda recon: float((10 * torch.log10(4 / (img - recon.clamp(-1, 1)).square().flatten(1).mean(1))).mean())
    with torch.no_grad():
        want = psnr(model.eval().idx_to_img(model.img_to_idx(img)))
        torch.manual_seed(2)
        model.train()
        in_train_mode = psnr(model.idx_to_img(model.img_to_idx(img)))
    assert from_eval["psnr_db"] == pytest.approx(want, rel=1e-5) and from_eval["images"] == len(ds)
    assert abs(in_train_mode - want) > 0.01


# ============================================================================================
# 3. Pixels: every picture holds (decoder(f_hat) + 1) / 2 of the sampled tokens
# ============================================================================================

def decode_by_hand(tokenizer, idx_list, upto=None) -> torch.Tensor:
    """VAR's Algorithm 2 written out: f_hat = the sum of the contributions of scales 0..upto (all by
    default), the decoder, then [-1, 1] -> [0, 1] as (x + 1) / 2, clamped."""
    with torch.no_grad():
        K = len(idx_list) if upto is None else upto + 1
        f_hat = sum(tokenizer.scale_contribution(tokenizer.embed_scale(idx_list[k], k), k) for k in range(K))
        # contiguous, as the sampler's f_hat is: the convs round differently on a channels-last
        # layout (about 1e-6), which would flip a few uint8 values
        return ((tokenizer.decoder(tokenizer.post_quant_conv(f_hat.contiguous())) + 1) / 2).clamp(0, 1)


def assert_rounded(got: np.ndarray, images: torch.Tensor, what=""):
    """got (uint8, n S S C) is round(images * 255): within 0.5 of x * 255 everywhere (1e-3 more for
    a value that float round-off puts on the other side of a .5), and equal almost everywhere."""
    want = images.double().permute(0, 2, 3, 1).numpy() * 255
    assert got.dtype == np.uint8 and got.shape == want.shape, what
    assert np.abs(got - want).max() <= 0.5 + 1e-3, what
    assert (got == np.round(want)).mean() > 0.99, what


def test_generate_returns_the_decoded_tokens_in_unit_range(gen_run):
    """MVAR.generate's images (and with return_scales its picture after every scale) equal the
    sampled token maps (sample_tokens, same seed) decoded by hand and mapped to [0, 1]."""
    model, tok, _ = runtime.load_generator(gen_run.out / "mvar.pt")
    labels, kw = torch.tensor([0, 3, 5, 7]), dict(guidance=1.5, top_k=10, top_p=0.9)
    out = model.sample_tokens(tok, labels, generator=torch.Generator().manual_seed(4), **kw)
    images, per_scale = model.generate(tok, labels, generator=torch.Generator().manual_seed(4),
                                       return_scales=True, **kw)
    want = decode_by_hand(tok, out["idx"])
    torch.testing.assert_close(images, want, rtol=0, atol=1e-6)
    assert len(per_scale) == len(PNS)
    for k, picture in enumerate(per_scale):
        torch.testing.assert_close(picture, decode_by_hand(tok, out["idx"], k), rtol=0, atol=1e-6)
    assert ((want > 0.01) & (want < 0.99)).float().mean() > 0.5     # mostly unclamped: a slip shows


def test_grid_strip_and_npz_hold_the_decoded_pixels(sampling):
    """sample.py's grid PNG, strip PNG and .npz hold the decoded pixels of the sampled tokens
    (recomputed here from sample_tokens with the same seed and setting) as round(x * 255)."""
    grid, _ = run_sample(sampling, ["--classes", "0,3", "--per_class", "2", "--seed", "4", "--strip"])
    npz, _ = run_sample(sampling, ["--classes", "0,3", "--npz", "4", "--seed", "4"])
    model, tok, _ = runtime.load_generator(sampling.ckpt)
    out = model.sample_tokens(tok, torch.tensor([0, 3, 0, 3]), guidance=CKPT_SETTING["guidance"],
                              top_k=CKPT_SETTING["top_k"], top_p=CKPT_SETTING["top_p"],
                              generator=torch.Generator().manual_seed(4))
    want = decode_by_hand(tok, out["idx"])
    assert_rounded(tiles(grid["grid"], rows=2, cols=2), want, "grid")
    assert_rounded(np.load(npz["npz"])["arr_0"], want, "npz")
    strip = tiles(grid["strip"], rows=2, cols=len(PNS))                 # row = class, column = scale
    for k in range(len(PNS)):
        after_k = decode_by_hand(tok, out["idx"], k)
        for c in range(2):
            assert_rounded(strip[c * len(PNS) + k][None], after_k[c:c + 1], f"strip: class {c}, scale {k}")


def test_tokenizer_recon_grid_holds_the_pixels(tok_run, tmp_path):
    """Stage 1's picture: the test images above, their reconstructions below, both as
    round((x + 1) / 2 * 255)."""
    tok = runtime.load_trained_tokenizer(tok_run.out / "tokenizer.pt")[0]
    ds = data.load_dataset(data_config(tok_run.flags), "test")
    images = torch.stack([ds[i][0] for i in range(3)])
    data.save_recon_grid(tok, images, tmp_path / "recon.png")
    recon = decode_by_hand(tok.eval(), tok.img_to_idx(images))
    assert_rounded(tiles(tmp_path / "recon.png", rows=2, cols=3), torch.cat([(images + 1) / 2, recon]))


# The shipped M-VAR's seeded sample, a few pixel values. Recorded once (2026-12-06, torch 2.13 on
# the CPU, OMP_NUM_THREADS=1; the same values to 1e-7 with 2 threads) by this test's own call:
# generate(labels [0, 7], the checkpoint's sampling setting cfg 3 / top-k 0 / top-p 0, seed 0),
# pixels picked where the value is mid-range (0.2-0.8, where any change of the mapping shows).
SHIPPED_PIXELS = {(0, 0, 14): 0.3602837, (0, 4, 9): 0.7287958, (0, 6, 15): 0.6574922, (0, 8, 19): 0.4025688,
                  (0, 11, 13): 0.2224268, (0, 14, 18): 0.7107309, (1, 9, 15): 0.2897532, (1, 12, 12): 0.7200426,
                  (1, 13, 17): 0.7148910, (1, 16, 14): 0.6787996}
SHIPPED_MEANS = (0.4270578, 0.1568971)


def test_shipped_sample_pixels_are_pinned():
    model, tok, ck = runtime.load_generator(runtime.SHIPPED / "mvar.pt")
    s = runtime.sampling_defaults(ck)
    images = model.generate(tok, torch.tensor([0, 7]), guidance=s["guidance"], top_k=s["top_k"], top_p=s["top_p"],
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 28, 28)
    got = {key: float(images[key[0], 0, key[1], key[2]]) for key in SHIPPED_PIXELS}
    assert got == pytest.approx(SHIPPED_PIXELS, abs=1e-4)
    assert [float(m) for m in images.mean((1, 2, 3))] == pytest.approx(SHIPPED_MEANS, abs=1e-4)


# ============================================================================================
# 4. Distributions, with a fixed seed and enough draws for a tight tolerance
# ============================================================================================

def test_gumbel_hard_picks_follow_softmax_of_the_logits_whatever_tau():
    """argmax softmax((logits + G) / tau) = argmax (logits + G): the Gumbel-max trick, so the hard
    pick follows softmax(logits) for every tau -- not softmax(logits / tau)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p, N = logits.softmax(-1).double(), 200_000
    tol = 5 * (p * (1 - p) / N).sqrt()
    g = torch.Generator().manual_seed(0)
    for tau in (0.005, 0.27, 1.0, 4.0):
        picks = mvar.gumbel_softmax(logits.expand(N, -1), tau, g).argmax(-1)
        freq = torch.bincount(picks, minlength=len(logits)).double() / N
        assert ((freq - p).abs() <= tol).all(), (tau, freq, p)
        if tau != 1.0:                      # the tempting answer is far outside the tolerance
            assert ((freq - (logits / tau).softmax(-1).double()).abs() > 10 * tol).any()


def test_gumbel_soft_mixture_has_the_expectation_of_its_definition():
    """The soft mixture softmax((logits + G) / tau), two codes: p0 = sigmoid((d + e) / tau), e =
    G0 - G1 logistic. Its mean over draws equals that integral; it tends to softmax(logits) as
    tau -> 0, and is flatter than softmax(logits) at tau = 1 (smoother pictures)."""
    d, N = 0.8, 200_000
    e = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    density = torch.exp(-e) / (1 + torch.exp(-e)) ** 2                   # logistic pdf
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([d, 0.0]).expand(N, 2)
    for tau in (0.005, 0.27, 1.0, 3.0):
        probs = mvar.gumbel_softmax(logits, tau, g).double()
        assert torch.allclose(probs.sum(-1), torch.ones(N, dtype=torch.float64), atol=1e-6)
        want = float(torch.trapezoid(torch.sigmoid((d + e) / tau) * density, e))
        mean, sd = float(probs[:, 0].mean()), float(probs[:, 0].std())
        assert abs(mean - want) < 5 * sd / math.sqrt(N) + 1e-4, tau
        if tau == 0.005:
            assert want == pytest.approx(torch.sigmoid(torch.tensor(d)).item(), abs=2e-3)
        if tau == 1.0:
            assert 0.5 < want < torch.sigmoid(torch.tensor(d)).item() - 0.02


def smooth_setup():
    """A generator whose logits are far from flat (the head scaled up), and a tokenizer of 16 codes."""
    torch.manual_seed(0)
    tok = MultiScaleVQVAE(TokenizerConfig(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                          z_channels=8, vocab_size=16, patch_nums=(1, 2, 3, 4))).eval()
    model = MVAR(MVARConfig(depth=1, width=32, num_heads=2, num_classes=5, vocab_size=16, Cvae=8,
                            patch_nums=(1, 2, 3, 4), d_state=8, headdim=16, expand=1, drop_path=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.head.weight.mul_(10.0)
    return model, tok


def test_more_smooth_picks_follow_the_guided_sharpened_softmax_at_every_scale(monkeypatch):
    """--more_smooth (MVAR.sample_tokens): at scale k, ratio r = k / (K-1), the sampler feeds
    gumbel_softmax the guided logits times (1 + r) at tau = max(0.27 (1 - 0.95 r), 0.005); the
    token kept is the mixture's argmax, so it follows softmax(guided x (1 + r)) -- checked on 600
    images x 30 tokens by the picked logit's deviation from its expectation (a z-score), which
    softmax(guided) and softmax(guided / tau) fail by far -- and f_hat is built from the soft
    mixtures (probs @ codebook), not from the picked codes."""
    model, tok = smooth_setup()
    seen, real = [], mvar.gumbel_softmax
    monkeypatch.setattr(mvar, "gumbel_softmax", lambda logits, tau, generator=None: (
        seen.append((logits.clone(), tau)) or seen.__setitem__(-1, seen[-1] + (real(logits, tau, generator),))
        or seen[-1][2]))
    N, guidance, K = 600, 1.5, 4
    out = model.sample_tokens(tok, torch.arange(N) % 5, guidance=guidance, more_smooth=True, return_logits=True,
                              generator=torch.Generator().manual_seed(0))
    assert len(seen) == K
    f_hat = 0
    for k, ((fed, tau, probs), raw, idx) in enumerate(zip(seen, out["logits"], out["idx"])):
        r = k / (K - 1)
        guided = (1 + guidance * r) * raw[:N] - guidance * r * raw[N:]
        assert tau == pytest.approx(max(0.27 * (1 - 0.95 * r), 0.005))
        torch.testing.assert_close(fed, guided * (1 + r))
        assert torch.equal(idx, probs.argmax(-1))
        pn = (1, 2, 3, 4)[k]
        f_hat = f_hat + tok.scale_contribution((probs @ tok.quantize.embedding.weight).transpose(1, 2)
                                               .reshape(N, -1, pn, pn), k)

        picked = guided.gather(-1, idx[..., None])[..., 0]

        def z(q):                              # sum of (picked logit - its mean under q) / its sd
            mean = (q * guided).sum(-1)
            var = (q * guided.square()).sum(-1) - mean.square()
            return float((picked - mean).sum() / var.sum().sqrt())
        assert abs(z((guided * (1 + r)).softmax(-1))) < 4, k
        assert abs(z((guided / tau).softmax(-1))) > 8, k
        if k > 0:
            assert abs(z(guided.softmax(-1))) > 8, k
    torch.testing.assert_close(out["f_hat"], f_hat, rtol=1e-5, atol=1e-5)


def test_dead_code_restarts_spread_over_every_scale_the_finest_included():
    """restart_dead_codes' docstring: a dead code moves onto a residual vector of this batch "from a
    scale drawn uniformly". 4096 dead codes over 5 scales whose residuals carry their scale's
    mark: each code lands on a row of its scale's residuals, and every scale, the finest (8x8)
    included, gets V / K of them within 5 binomial sd (not in proportion to its residual count)."""
    from test_tokenizer import tiny_config as tokenizer_tiny_config      # scales 1,2,3,5,8; Cvae 8
    torch.manual_seed(0)
    model = MultiScaleVQVAE(tokenizer_tiny_config(vocab_size=4096, dead_code_threshold=0.5)).train()
    K, V = len(model.cfg.patch_nums), model.cfg.vocab_size
    model.quantize.ema_vocab_hit_SV.zero_()                               # every code dead
    residuals = [0.1 * torch.randn(4 * pn * pn, 8) + 100.0 * k for k, pn in enumerate(model.cfg.patch_nums)]
    assert model.restart_dead_codes(residuals, hits_per_step=1000.0) == V
    codebook = model.quantize.embedding.weight.detach()
    scale = (codebook.mean(1) / 100).round().long()
    for k in range(K):
        rows = codebook[scale == k]
        assert (rows[:, None, :] == residuals[k][None]).all(-1).any(-1).all(), k
    counts = torch.bincount(scale, minlength=K).double()
    sd = math.sqrt(V * (1 / K) * (1 - 1 / K))
    assert ((counts - V / K).abs() <= 5 * sd).all(), counts.tolist()
