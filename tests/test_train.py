"""train.py: command line, schedule, optimizer groups, checkpoints, token cache, resume and DDP.

Everything runs the real pipeline (real tokenizer, real MVAR) on a tiny configuration: 16px
shapes, 4x4 latents (patch_nums 1,2,3,4 -> L = 30 tokens), depth-2 width-64 generator.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

import data
import runtime
import train
from mvar import MVAR, MVARConfig
from tokenizer import MultiScaleVQVAE, split_scales

REPO = Path(__file__).resolve().parents[1]

TINY = ["--image_size", "16", "--shapes_train", "64", "--shapes_test", "16", "--tok_ch", "32",
        "--tok_ch_mult", "1,1,1", "--tok_z_channels", "8", "--vocab_size", "64",
        "--patch_nums", "1,2,3,4", "--tok_batch", "16", "--tok_epochs", "1", "--depth", "2",
        "--width", "64", "--num_heads", "2", "--gen_batch", "16", "--gen_epochs", "1.5",
        "--base_lr", "1e-3", "--cond_drop", "0.5", "--hflip", "1", "--log_every", "1",
        "--image_every", "1000", "--ckpt_every", "1000", "--samples_per_class", "1",
        "--device", "cpu"]
TOK_STEPS, GEN_STEPS = 4, 6          # 64 images / batch 16 = 4 steps per epoch


def tensors_equal(a, b, path="") -> None:
    """Assert two nested checkpoint structures hold identical tensors and values."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ"
        for k in a:
            tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{path} differs (max diff {(a.float() - b.float()).abs().max()})"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted tiny run of both stages (shared by several tests)."""
    out = tmp_path_factory.mktemp("full")
    result = train.main(TINY + ["--out_dir", str(out)])
    return out, result


# --------------------------------------------------------------------------------------------
# Command line and config
# --------------------------------------------------------------------------------------------

def test_cli_overrides_and_presets():
    cfg = train.parse_args([])
    assert cfg == train.make_config("tiny") and cfg.out_dir == os.path.join("runs", "tiny")
    cfg = train.parse_args(["--preset", "cifar10", "--depth", "3", "--hflip", "0", "--compile",
                            "--patch_nums", "1,2,4,8", "--base_lr", "3e-4", "--arch", "var",
                            "--stage", "generator", "--out_dir", "x"])
    assert (cfg.preset, cfg.dataset, cfg.depth, cfg.hflip, cfg.compile) == ("cifar10", "cifar10", 3, False, True)
    assert cfg.patch_nums == (1, 2, 4, 8) and cfg.base_lr == 3e-4 and cfg.arch == "var"
    assert cfg.stage == "generator" and cfg.out_dir == "x"
    assert train.parse_args(["--preset", "cifar10", "--no-hflip"]).hflip is False
    assert train.parse_args(["--hflip", "true"]).hflip is True
    assert train.parse_args(["--preset", "fashion-mnist"]).dataset == "fashion-mnist"


def test_generator_length_in_steps_or_epochs():
    """fashion-mnist states its length in steps: the 4,737 steps its earlier `gen_epochs 2.5264`
    came to (60,000 images, batch 32: 1,875 steps an epoch), so the shipped weights' command
    still trains the same. A length given in epochs replaces a preset's length in steps."""
    fm = train.make_config("fashion-mnist")
    assert fm.gen_steps == 4737 == round(2.5264 * (60000 // fm.gen_batch))
    assert train.parse_args(["--preset", "fashion-mnist"]) == fm
    assert train.parse_args(["--preset", "fashion-mnist", "--gen_epochs", "3"]).gen_steps == 0
    assert train.make_config("fashion-mnist", gen_epochs=3.0).gen_steps == 0
    both = train.parse_args(["--preset", "fashion-mnist", "--gen_epochs", "3", "--gen_steps", "9"])
    assert both.gen_steps == 9                                   # gen_steps, when set, wins
    assert train.make_config("tiny").gen_steps == 0 and train.make_config("cifar10").gen_epochs == 200


def test_every_preset_builds_a_valid_tokenizer_config():
    # TokenizerConfig refuses a scale schedule that does not end at the latent size, so a preset
    # that changes image_size without patch_nums (or the reverse) fails here, not an hour in.
    for name in train.PRESETS:
        cfg = train.make_config(name)
        tok = train.tokenizer_config_for(cfg, in_channels=3)
        assert tok.image_size == cfg.image_size and tok.patch_nums[-1] == tok.latent_size, name
    fm = train.tokenizer_config_for(train.make_config("fashion-mnist"), in_channels=1)
    assert (fm.image_size, fm.latent_size, sum(p * p for p in fm.patch_nums)) == (28, 7, 88)


@pytest.mark.parametrize("argv, message", [
    (["--tok_lrr", "1"], "unknown argument.*--tok_lrr.*did you mean --tok_lr"),
    (["--hflip", "maybe"], "expected a boolean"),
    (["--arch", "gpt"], "invalid choice"),
    (["--preset", "huge"], "unknown preset"),
    (["--patch_nums", "1,x"], "comma list"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    captured = capsys.readouterr()
    import re
    assert re.search(message, captured.err + captured.out)


def test_every_field_is_classified():
    """A field must either define a stage (checked on resume: its value, or for stage 2's length
    the number of steps it comes to) or be a runtime knob."""
    names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    defining = set(runtime.STAGE1_FIELDS) | set(runtime.STAGE2_FIELDS) | set(runtime.LENGTH_FIELDS)
    assert defining | set(runtime.RUNTIME_FIELDS) == names
    assert not defining & set(runtime.RUNTIME_FIELDS)
    for f in dataclasses.fields(train.TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no --help text"


def test_imagenet_presets_follow_var_commands():
    """VAR / M-VAR's released training commands (README of both repos)."""
    expected = {  # depth: (global batch, epochs, base lr, alng, final lr ratio, final wd)
        16: (768, 200, 1e-4, 1e-3, 0.1, 0.05), 20: (768, 250, 1e-4, 1e-3, 0.1, 0.05),
        24: (768, 350, 8e-5, 1e-4, 0.01, 0.05), 30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08)}
    for depth, (bs, ep, lr, alng, wpe, twde) in expected.items():
        c = train.make_config(f"imagenet256-d{depth}")
        assert (c.depth, c.gen_batch, c.gen_epochs, c.base_lr, c.alng, c.end_lr_ratio,
                c.weight_decay, c.weight_decay_end) == (depth, bs, ep, lr, alng, wpe, 0.05, twde)
        assert (c.image_size, c.tok_preset, c.dataset, c.grad_clip) == (256, "var256", "folder", 2.0)
        assert c.vae_ckpt.endswith("vae_ch160v4096z32.pth")
    assert train.make_config("imagenet256-d16").base_lr * 768 / 256 == pytest.approx(3e-4)


# --------------------------------------------------------------------------------------------
# Schedule and optimizer groups
# --------------------------------------------------------------------------------------------

def test_lr_schedule_values():
    peak, total = 1.0, 12
    lrs = [train.lr_at(s, total, peak, warmup_frac=0.25, end_ratio=0.1) for s in range(total)]
    # 3 warm-up steps: 1/3, 2/3, 1; then a straight line from 1 (step 3) to 0.1 (step 11)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[7] == pytest.approx(1.0 - 0.9 * 4 / 8)
    steps = [b - a for a, b in zip(lrs[3:], lrs[4:])]
    assert steps == pytest.approx([steps[0]] * len(steps))        # linear decay
    assert train.lr_at(0, 100, 2e-4, 0.0, 0.5) == pytest.approx(2e-4)   # no warm-up
    assert train.wd_at(0, 11, 0.05, 0.08) == pytest.approx(0.05)
    assert train.wd_at(10, 11, 0.05, 0.08) == pytest.approx(0.08)
    assert train.wd_at(5, 11, 0.05, 0.08) == pytest.approx(0.065)      # cosine midpoint


def test_param_groups_no_decay_set():
    from mvar import MVAR, MVARConfig
    model = MVAR(MVARConfig(arch="mvar", depth=2, width=64, num_heads=2, num_classes=4,
                            vocab_size=32, Cvae=8, patch_nums=(1, 2, 3)))
    decay, no_decay = train.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert nd | d == set(names.values()) and not nd & d
    for n in d:           # decayed: only weight matrices / conv kernels / class embedding
        assert not n.endswith("bias") and not any(k in n for k in train.NO_DECAY_KEYS), n
    for must in ("pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11",
                 "blocks.0.mamba.dt_bias", "blocks.0.mamba.A_log", "blocks.0.mamba.D",
                 "blocks.0.mamba.norm.weight", "blocks.0.attn.q_bias", "head.bias"):
        assert must in nd, must
    for must in ("class_emb.weight", "word_embed.weight", "blocks.0.attn.mat_qkv.weight",
                 "blocks.0.ffn.fc1.weight", "blocks.0.mamba.in_proj.weight", "head.weight"):
        assert must in d, must


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ck.pt"
    good = {"kind": "generator", "step": 1, "model": {"w": torch.arange(5.0)}}
    runtime.save_checkpoint(good, path)

    def dying_save(obj, fh):                  # writes half a file, then the process "dies"
        fh.write(b"PK\x03\x04 partial zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint({"kind": "generator", "step": 2}, path)
    monkeypatch.undo()
    ck = runtime.load_checkpoint(path, "generator")
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.arange(5.0))
    assert os.listdir(path.parent) == ["ck.pt"]                   # no temp file left behind


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.load_checkpoint(tmp_path / "nope.pt", "generator")
    path = tmp_path / "ck.pt"
    runtime.save_checkpoint({"kind": "tokenizer", "model": {"w": torch.randn(1000)}}, path)
    with pytest.raises(ValueError, match="'tokenizer' checkpoint, expected a 'generator'"):
        runtime.load_checkpoint(path, "generator")
    written = path.read_bytes()
    path.write_bytes(written[:len(written) // 2])                       # truncated
    with pytest.raises(ValueError, match="corrupt, truncated"):
        runtime.load_checkpoint(path, "tokenizer")
    torch.save({"kind": "generator", "path": Path("x")}, path)          # not a plain type
    with pytest.raises(ValueError, match="corrupt"):   # weights_only refuses it
        runtime.load_checkpoint(path, "generator")


def test_resume_refuses_other_config_and_arch(full_run, tmp_path):
    out, _ = full_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.pt", "tokens.pt", "mvar.pt"):
        (run / name).write_bytes((out / name).read_bytes())
    ck = runtime.load_checkpoint(run / "mvar.pt", "generator")
    ck["done"], ck["step"] = False, 1                             # pretend it was interrupted
    runtime.save_checkpoint(ck, run / "mvar.pt")
    with pytest.raises(ValueError, match=r"other settings:\n  depth: checkpoint 2 vs now 3"):
        train.main(TINY + ["--out_dir", str(run), "--stage", "generator", "--depth", "3"])
    # a VAR checkpoint where an M-VAR one is expected
    ck["config"]["train"]["arch"] = "var"
    runtime.save_checkpoint(ck, run / "mvar.pt")
    with pytest.raises(ValueError, match="holds a 'var' generator.*--arch mvar"):
        train.main(TINY + ["--out_dir", str(run), "--stage", "generator"])
    # the generator stage without a finished tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer.pt does not exist"):
        train.main(TINY + ["--out_dir", str(tmp_path / "empty"), "--stage", "generator"])


def test_resume_checks_the_length_in_steps(full_run, tmp_path):
    """A run folder written before gen_steps existed (its config has gen_epochs only) resumes
    under a config that states the same number of steps as gen_steps, and ends bit-identical to
    the uninterrupted run; another number of steps is refused, with the flags to fix it."""
    out, _ = full_run
    run = tmp_path / "old"
    run.mkdir()
    for name in ("tokenizer.pt", "tokens.pt"):
        (run / name).write_bytes((out / name).read_bytes())
    train.main(TINY + ["--out_dir", str(run), "--stage", "generator", "--stop_after", "2"])
    ck = runtime.load_checkpoint(run / "mvar.pt", "generator")
    del ck["config"]["train"]["gen_steps"]                     # as the older code wrote it
    runtime.save_checkpoint(ck, run / "mvar.pt")
    with pytest.raises(ValueError, match=r"run of 6 steps; this one asks for 7 \(--gen_steps / --gen_epochs\)"):
        train.main(TINY + ["--out_dir", str(run), "--stage", "generator", "--gen_steps", "7"])
    in_steps = [a for a in TINY if a not in ("--gen_epochs", "1.5")] + ["--gen_steps", str(GEN_STEPS)]
    train.main(in_steps + ["--out_dir", str(run), "--stage", "generator"])
    a, b = runtime.load_checkpoint(out / "mvar.pt", "generator"), runtime.load_checkpoint(run / "mvar.pt", "generator")
    for key in ("model", "optimizer", "step", "history"):
        tensors_equal(a[key], b[key], key)


# --------------------------------------------------------------------------------------------
# Full pipeline: outputs, resume, token cache, reloading for sampling
# --------------------------------------------------------------------------------------------

def test_full_run_outputs(full_run):
    out, result = full_run
    for name in ("config.json", "tokenizer.pt", "tokenizer_eval.json", "tokenizer_recon.png",
                 "tokens.pt", "mvar.pt", "mvar_eval.json", "mvar_loss.png", "mvar_samples.png"):
        assert (out / name).is_file(), name
    tok = runtime.load_checkpoint(out / "tokenizer.pt", "tokenizer")
    gen = runtime.load_checkpoint(out / "mvar.pt", "generator")
    assert (tok["step"], tok["done"], gen["step"], gen["done"]) == (TOK_STEPS, True, GEN_STEPS, True)
    assert gen["config"]["model"]["arch"] == "mvar" and gen["config"]["model"]["vocab_size"] == 64
    assert gen["config"]["tokenizer"]["patch_nums"] == [1, 2, 3, 4]
    assert [row[0] for row in gen["history"]] == list(range(1, GEN_STEPS + 1))
    import json
    ev = json.loads((out / "mvar_eval.json").read_text())
    assert len(ev["per_scale_acc"]) == 4 and ev["tokens_images"] == 16


def test_losses_fell(full_run):
    out, _ = full_run
    for name, kind in (("tokenizer.pt", "tokenizer"), ("mvar.pt", "generator")):
        history = runtime.load_checkpoint(out / name, kind)["history"]      # [[step, loss, ...]]
        assert history[-1][1] < history[0][1], f"{name}: loss did not fall: {history}"


def test_generator_step_is_teacher_forcing_plus_one_adamw_step(full_run, tmp_path, monkeypatch):
    """Record what the model is called with during a real train.py step, then redo that step by
    hand: the input must be idx_to_teacher_input of the step's *ground-truth* tokens, and the
    weights after it must equal a hand-written cross-entropy + clip + AdamW step on them."""
    out, _ = full_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.pt", "tokens.pt"):
        (run / name).write_bytes((out / name).read_bytes())
    calls = []
    real_forward = MVAR.forward

    def recording_forward(self, labels, teacher_input):
        if self.training:
            calls.append({"labels": labels.clone(), "teacher": teacher_input.clone(),
                          "rng": torch.get_rng_state(),
                          "state": {k: v.clone() for k, v in self.state_dict().items()}})
        return real_forward(self, labels, teacher_input)
    monkeypatch.setattr(MVAR, "forward", recording_forward)
    train.main(TINY + ["--out_dir", str(run), "--stage", "generator", "--stop_after", "1"])
    monkeypatch.undo()
    assert len(calls) == 1
    call, after = calls[0], runtime.load_checkpoint(run / "mvar.pt", "generator")
    assert after["step"] == 1

    # 1. the ground truth of step 0: the sampler's items, through the cache's training view
    cache = torch.load(run / "tokens.pt", weights_only=True)
    cfg = train.parse_args(TINY)
    epoch, items = data.ShardedSampler(len(cache["train"]["labels"]), cfg.gen_batch, cfg.seed).batch(0)
    batch = [data.TokenDataset(cache["train"], cfg.seed)[(i, epoch)] for i in items]
    idx_BL, labels = torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch])
    tokenizer, _ = runtime.load_trained_tokenizer(run / "tokenizer.pt")
    idx_list = split_scales(idx_BL, (1, 2, 3, 4))
    assert torch.equal(call["labels"], labels)
    assert torch.equal(call["teacher"], tokenizer.idx_to_teacher_input(idx_list))

    # 2. the step by hand: same weights, same randomness (class dropout, drop-path)
    model = MVAR(MVARConfig.from_dict(after["config"]["model"]))
    model.load_state_dict(call["state"])
    model.train()
    torch.set_rng_state(call["rng"])
    logits = model(labels, call["teacher"])
    F.cross_entropy(logits.flatten(0, 1), idx_BL.flatten()).backward()
    params = dict(model.named_parameters())
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values()))
    clip = min(1.0, cfg.grad_clip / (float(norm) + 1e-6))
    warmup = max(1, round(cfg.warmup_frac * after["total_steps"]))
    lr = cfg.base_lr * cfg.gen_batch / 256 / warmup                 # first warm-up step
    no_decay = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "dt_bias", "A_log")
    for name, p in params.items():
        decays = p.ndim > 1 and not any(k in name for k in no_decay)
        g = p.grad * clip
        # AdamW's first step: m = (1-b1) g, v = (1-b2) g^2; bias correction turns them back
        # into g and g^2, so the update is lr * g / (|g| + eps), after the decoupled decay.
        m_hat, v_hat = (0.1 * g) / 0.1, (0.05 * g * g) / 0.05
        want = p.detach() * (1 - lr * cfg.weight_decay * decays) - lr * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(after["model"][name], want, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_matches_uninterrupted_run(full_run, tmp_path):
    out, _ = full_run
    run = str(tmp_path / "resumed")
    # invocation 1: stage 1 stops after 3 of 4 steps; stage 2 does not start
    r = train.main(TINY + ["--out_dir", run, "--stop_after", "3"])
    assert r["tokenizer"] is None and not Path(run, "mvar.pt").exists()
    assert runtime.load_checkpoint(Path(run) / "tokenizer.pt", "tokenizer")["step"] == 3
    # invocation 2: stage 1 finishes (1 step), stage 2 stops after 3 of 6 steps
    r = train.main(TINY + ["--out_dir", run, "--stop_after", "3"])
    assert r["tokenizer"] is not None and r["generator"] is None
    assert runtime.load_checkpoint(Path(run) / "mvar.pt", "generator")["step"] == 3
    # invocation 3: stage 2 finishes
    train.main(TINY + ["--out_dir", run])
    for name, kind in (("tokenizer.pt", "tokenizer"), ("mvar.pt", "generator")):
        a, b = runtime.load_checkpoint(out / name, kind), runtime.load_checkpoint(Path(run) / name, kind)
        for key in ("model", "optimizer", "step", "history"):
            tensors_equal(a[key], b[key], f"{name}:{key}")


def test_token_cache_equals_on_the_fly_encoding(full_run):
    out, result = full_run
    cfg = train.parse_args(TINY + ["--out_dir", str(out)])
    tokenizer, _ = runtime.load_trained_tokenizer(out / "tokenizer.pt")
    cache = torch.load(out / "tokens.pt", weights_only=True)
    assert cache["identity"]["tokenizer_sha256"] == runtime.file_digest(out / "tokenizer.pt")
    pns = tokenizer.cfg.patch_nums
    for split in ("train", "test"):
        ds = data.load_dataset(cfg, split)
        img = torch.stack([ds[i][0] for i in range(len(ds))])
        labels = torch.tensor([ds[i][1] for i in range(len(ds))])
        assert torch.equal(cache[split]["labels"], labels)
        views = [(img, cache[split]["idx"])]
        if split == "train":                                      # hflip: flipped copies too
            views.append((img.flip(-1), cache[split]["idx_flip"]))
        else:
            assert cache[split].get("idx_flip") is None
        for x, cached in views:
            fresh = tokenizer.img_to_idx(x)
            cached_list = split_scales(cached.long(), pns)
            assert all(torch.equal(a, b) for a, b in zip(fresh, cached_list))
            assert torch.equal(tokenizer.idx_to_teacher_input(cached_list),
                               tokenizer.idx_to_teacher_input(fresh))
    # an unchanged tokenizer.pt reuses the cache
    d = runtime.DistInfo()
    assert train.token_cache(cfg, d, tokenizer)["identity"] == cache["identity"]


def test_token_cache_rebuilt_for_another_tokenizer(tmp_path):
    cfg = train.parse_args(TINY + ["--out_dir", str(tmp_path)])
    tok_cfg = train.tokenizer_config_for(cfg, in_channels=3)
    d = runtime.DistInfo()
    caches = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tok = MultiScaleVQVAE(tok_cfg).eval()
        runtime.save_checkpoint(runtime.stage_checkpoint("tokenizer", cfg, tok), tmp_path / "tokenizer.pt")
        caches.append(train.token_cache(cfg, d, tok))
        again = train.token_cache(cfg, d, tok)              # reused, not re-encoded
        assert torch.equal(again["train"]["idx"], caches[-1]["train"]["idx"])
        expect = torch.cat(tok.img_to_idx(torch.stack([data.load_dataset(cfg, "test")[i][0]
                                                       for i in range(16)])), 1)
        assert torch.equal(caches[-1]["test"]["idx"].long(), expect)
    assert caches[0]["identity"] != caches[1]["identity"]
    # another --data_dir (other images, same settings) is another cache too
    moved = train.token_cache(dataclasses.replace(cfg, data_dir=str(tmp_path / "elsewhere")), d, tok)
    assert moved["identity"] != caches[1]["identity"]


def test_load_generator_rebuilds_the_trained_model(full_run):
    out, result = full_run
    model, tokenizer, ck = runtime.load_generator(out / "mvar.pt")
    trained = result["generator"]
    for (n, p), (n2, q) in zip(model.state_dict().items(), trained.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
    labels = torch.tensor([0, 3])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model.generate(tokenizer, labels, generator=g1),
                       trained.generate(result["tokenizer"], labels, generator=g2))


def test_other_arch_shares_the_tokenizer_and_cache(full_run, tmp_path):
    out, _ = full_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("tokenizer.pt", "tokens.pt"):
        (run / name).write_bytes((out / name).read_bytes())
    mtime = (run / "tokens.pt").stat().st_mtime_ns
    r = train.main(TINY + ["--out_dir", str(run), "--arch", "var", "--stage", "generator"])
    assert r["generator"].cfg.arch == "var" and (run / "var.pt").is_file()
    assert (run / "tokens.pt").stat().st_mtime_ns == mtime       # cache reused
    assert runtime.load_generator(run / "var.pt")[2]["config"]["model"]["arch"] == "var"


def test_missing_vae_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"):
        train.main(["--preset", "imagenet256-d16", "--out_dir", str(tmp_path), "--stage", "tokenizer",
                    "--vae_ckpt", str(tmp_path / "missing.pth"), "--device", "cpu"])


# --------------------------------------------------------------------------------------------
# DDP under torchrun (gloo on CPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.processes
def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "run"
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import train
        out = train.main({TINY!r} + ["--out_dir", {str(run)!r}])
        rank = os.environ["RANK"]
        torch.save(out["tokenizer"].state_dict(), {str(tmp_path)!r} + f"/tok{{rank}}.pt")
        torch.save(out["generator"].state_dict(), {str(tmp_path)!r} + f"/gen{{rank}}.pt")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(job)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kind in ("tok", "gen"):
        a, b = (torch.load(tmp_path / f"{kind}{r}.pt", weights_only=True) for r in (0, 1))
        tensors_equal(a, b, kind)                                 # replicas stayed identical
    gen0 = torch.load(tmp_path / "gen0.pt", weights_only=True)
    ck = runtime.load_checkpoint(run / "mvar.pt", "generator")
    tensors_equal(gen0, ck["model"], "checkpoint")
    assert ck["step"] == GEN_STEPS and len(ck["rng"]) == 2        # one RNG state per rank
    # the sharded token cache equals encoding the whole dataset in one process
    cfg = train.parse_args(TINY + ["--out_dir", str(run)])
    tokenizer, _ = runtime.load_trained_tokenizer(run / "tokenizer.pt")
    ds = data.load_dataset(cfg, "train")
    img = torch.stack([ds[i][0] for i in range(len(ds))])
    cache = torch.load(run / "tokens.pt", weights_only=True)
    assert torch.equal(cache["train"]["idx"].long(), torch.cat(tokenizer.img_to_idx(img), 1))
    assert torch.equal(cache["train"]["idx_flip"].long(), torch.cat(tokenizer.img_to_idx(img.flip(-1)), 1))


def test_cli_bad_settings_are_one_line_errors_before_any_work(tmp_path):
    # 32 px images need a schedule ending at the 8x8 latent; the preset's ends at 7.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--preset", "fashion-mnist", "--image_size", "32",
                           "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "--patch_nums" in proc.stderr
    assert not out.exists()                                  # refused before touching the run folder
