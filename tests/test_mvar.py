"""Tests of the M-VAR generator (mvar.py sections 3-8) against independent references:
brute-force masks and attention written by hand for the attention pattern, the teacher-forced
pass for what the sampler carries from scale to scale (Block.forward_one_scale, and the official
re-run sampler, benchmarks/rerun_sampler.py), a hand count of the papers' parameter numbers, and
plain loops for sampling and the loss."""
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime import load_official_checkpoint
from mvar import MVAR, MVARConfig, attention_pairs, compute_loss, sample_top_k_top_p, scale_spans
from tokenizer import MultiScaleVQVAE, TokenizerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rerun_sampler  # noqa: E402  (the official sampler's Mamba re-run, the benchmarks' baseline)

REFERENCE = Path(__file__).resolve().parent / "reference" / "mvar_d16_keys.txt"
PATCH_NUMS = (1, 2, 3, 4)       # L = 30: small, but with scales of several sizes


def tiny_config(arch, **kw):
    kw = {"depth": 2, "width": 64, "num_heads": 2, "num_classes": 5, "vocab_size": 32,
          "Cvae": 8, "patch_nums": PATCH_NUMS, "headdim": 16, "d_state": 8, "scan_chunk": 8,
          "drop_path": 0.0, "alng": 1.0, **kw}
    return MVARConfig(arch=arch, **kw)


def tiny_model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    model = MVAR(tiny_config(arch, **kw)).eval()
    # Give every parameter a visible value: the VAR init zeroes biases and shrinks gates, which
    # would hide leaks behind tiny numbers.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return MultiScaleVQVAE(TokenizerConfig(**TOKENIZER_KW)).eval()


TOKENIZER_KW = dict(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                    z_channels=8, vocab_size=32, patch_nums=PATCH_NUMS)


def random_teacher_input(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return torch.randn(B, cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.Cvae, generator=g)


# ----- 1. no leak: the attention/Mamba pattern against brute force -----------------------

@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_changing_a_scale_never_changes_coarser_scales(arch):
    model = tiny_model(arch)
    labels = torch.tensor([0, 3, 4])
    x = random_teacher_input(model)
    base = model(labels, x)
    spans = scale_spans(PATCH_NUMS)
    first = PATCH_NUMS[0] ** 2
    for k in range(1, len(PATCH_NUMS)):
        s, e = spans[k]
        x2 = x.clone()
        x2[:, s - first:e - first] += torch.randn_like(x2[:, s - first:e - first])
        out = model(labels, x2)
        torch.testing.assert_close(out[:, :s], base[:, :s], rtol=0, atol=1e-6)
        assert (out[:, s:e] - base[:, s:e]).abs().max() > 1e-3, "the scale's own logits must react"


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_attention_is_bidirectional_inside_a_scale(arch):
    # Change only the LAST token of the last scale: Mamba is causal, so the earlier tokens of
    # that scale can only notice through attention, which must see the whole scale.
    model = tiny_model(arch)
    labels = torch.tensor([1, 2])
    x = random_teacher_input(model, B=2)
    base = model(labels, x)
    x2 = x.clone()
    x2[:, -1] += 3.0
    out = model(labels, x2)
    s, e = scale_spans(PATCH_NUMS)[-1]
    torch.testing.assert_close(out[:, :s], base[:, :s], rtol=0, atol=1e-6)
    assert (out[:, s:e - 1] - base[:, s:e - 1]).abs().amax(-1).min() > 1e-4


def test_mvar_attention_sees_only_its_own_scale():
    # With the Mamba branch switched off (gate rows zero), an M-VAR block is pure intra-scale
    # attention + FFN: a change at scale k must not reach any finer scale either.
    model = tiny_model("mvar")
    C = model.cfg.width
    with torch.no_grad():
        for block in model.blocks:
            block.ada_lin[-1].weight[C:2 * C].zero_()    # g2 (the Mamba gate) = 0
            block.ada_lin[-1].bias[C:2 * C].zero_()
    labels = torch.tensor([0, 1])
    x = random_teacher_input(model, B=2)
    base = model(labels, x)
    s, e = scale_spans(PATCH_NUMS)[1]
    x2 = x.clone()
    x2[:, s - 1:e - 1] += 1.0
    out = model(labels, x2)
    torch.testing.assert_close(out[:, e:], base[:, e:], rtol=0, atol=1e-6)
    assert (out[:, s:e] - base[:, s:e]).abs().max() > 1e-3


def test_attention_pairs_match_brute_force_masks():
    for pn in [(1, 2, 3), PATCH_NUMS, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]:
        lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(pn)])
        same = lvl[:, None] == lvl[None, :]
        causal = lvl[:, None] >= lvl[None, :]
        assert attention_pairs(pn, "mvar") == int(same.sum())
        assert attention_pairs(pn, "var") == int(causal.sum())


# ----- 2. the sampler's caches equal the teacher-forced pass ------------------------------

@pytest.mark.parametrize("arch,guidance,mode", [("mvar", 0.0, "carry"), ("mvar", 2.0, "carry"),
                                                ("mvar", 2.0, "rerun"), ("var", 0.0, "carry"),
                                                ("var", 2.0, "carry")])
def test_sampling_logits_equal_teacher_forced_logits(tokenizer, arch, guidance, mode):
    model = tiny_model(arch)
    labels = torch.tensor([0, 4, 2])
    g = torch.Generator().manual_seed(0)
    sample = rerun_sampler.sample_tokens if mode == "rerun" else MVAR.sample_tokens
    out = sample(model, tokenizer, labels, guidance=guidance, top_k=0, top_p=0.0, generator=g,
                 return_logits=True)
    teacher = tokenizer.idx_to_teacher_input(out["idx"])
    if guidance > 0:   # the sampler ran the conditional and the null class as one batch
        labels = torch.cat([labels, torch.full_like(labels, model.cfg.num_classes)])
        teacher = torch.cat([teacher, teacher])
    with torch.no_grad():
        full = model(labels, teacher)
    for (s, e), logits in zip(scale_spans(PATCH_NUMS), out["logits"]):
        torch.testing.assert_close(logits, full[:, s:e], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_a_block_fed_one_scale_at_a_time_equals_the_whole_sequence(arch):
    # One block alone: forward_one_scale with what it carries (Mamba state or KV cache), and the
    # official re-run sampler's step, give the rows of the teacher-forced forward, scale by scale.
    model = tiny_model(arch)
    block, spans = model.blocks[0], scale_spans(PATCH_NUMS)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, spans[-1][1], model.cfg.width, generator=g)
    cond = torch.randn(2, model.cfg.width, generator=g)
    rerun = functools.partial(rerun_sampler.forward_one_scale_rerun, block)
    steps = [block.forward_one_scale] + ([rerun] if arch == "mvar" else [])
    with torch.no_grad():
        whole = block(x, cond, spans)
        for step in steps:
            carried, rows = None, []
            for s, e in spans:
                y, carried = step(x[:, s:e], cond, carried)
                rows.append(y)
            torch.testing.assert_close(torch.cat(rows, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_generate_is_seeded_and_decodes_in_unit_range(tokenizer):
    model = tiny_model("mvar")
    labels = torch.tensor([1, 3])
    run = lambda seed: model.generate(tokenizer, labels, guidance=1.5, top_k=10, top_p=0.9,
                                      generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    images, steps = model.generate(tokenizer, labels, more_smooth=True, return_scales=True,
                                   generator=torch.Generator().manual_seed(0))
    assert len(steps) == len(PATCH_NUMS)
    torch.testing.assert_close(steps[-1], images)


def test_more_smooth_mixes_only_the_top_k_top_p_tokens(tokenizer):
    """As in the official sampler, the gumbel mixture of more_smooth runs over the tokens that
    top-k / top-p keep: with top_k = 1 it is the greedy sample, whatever the noise."""
    model = tiny_model("mvar")
    labels = torch.tensor([0, 2, 4])
    greedy = model.sample_tokens(tokenizer, labels, top_k=1, generator=torch.Generator().manual_seed(0))
    smooth = model.sample_tokens(tokenizer, labels, top_k=1, more_smooth=True,
                                 generator=torch.Generator().manual_seed(1))
    for a, b in zip(greedy["idx"], smooth["idx"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(smooth["f_hat"], greedy["f_hat"])


def test_generate_rejects_bad_labels_and_mismatched_tokenizer(tokenizer):
    model = tiny_model("mvar")
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 4\]"):
        model.generate(tokenizer, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class labels"):
        model.generate(tokenizer, torch.tensor([-1]))
    for field in ({"vocab_size": 64}, {"Cvae": 16}, {"patch_nums": (1, 2, 4)}):
        other = MVAR(tiny_config("mvar", **field))
        with pytest.raises(ValueError, match="does not match the generator"):
            other.generate(tokenizer, torch.tensor([0]))


# ----- 3. sampling rules ------------------------------------------------------------------

def test_top_k_1_is_argmax_and_top_p_keeps_the_best_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=g)
    best = logits.argmax(-1)
    assert torch.equal(sample_top_k_top_p(logits, top_k=1, generator=g), best)
    assert torch.equal(sample_top_k_top_p(logits, top_p=1e-6, generator=g), best)


def test_top_k_and_top_p_sample_only_allowed_tokens():
    # Brute force: draw many samples and check every one lies in the allowed set.
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]]).expand(1, 2000, 6)
    g = torch.Generator().manual_seed(0)
    assert set(sample_top_k_top_p(logits, top_k=3, generator=g).unique().tolist()) == {0, 1, 2}
    p = logits[0, 0].softmax(-1)          # 0.64, 0.23, 0.09, ...: 0.8 needs the top two
    assert p[0] < 0.8 < p[:2].sum()
    assert set(sample_top_k_top_p(logits, top_p=0.8, generator=g).unique().tolist()) == {0, 1}


# ----- 4. loss, sizes and checkpoints -----------------------------------------------------

def test_compute_loss_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    B, V = 3, 11
    idx = [torch.randint(V, (B, p * p), generator=g) for p in PATCH_NUMS]
    logits = torch.randn(B, sum(p * p for p in PATCH_NUMS), V, generator=g)
    loss, acc = compute_loss(logits, idx)
    target = torch.cat(idx, 1)
    nll = [-logits[b, t].log_softmax(-1)[target[b, t]] for b in range(B) for t in range(target.shape[1])]
    torch.testing.assert_close(loss, torch.stack(nll).mean())
    for k, (s, e) in enumerate(scale_spans(PATCH_NUMS)):
        hits = [int(logits[b, t].argmax() == target[b, t]) for b in range(B) for t in range(s, e)]
        assert acc[k].item() == pytest.approx(sum(hits) / len(hits))


def _count(arch):
    with torch.device("meta"):
        model = MVAR(MVARConfig(arch=arch, depth=16))
    return model, sum(p.numel() for p in model.parameters())


def test_d16_parameter_counts_match_the_papers():
    _, n_var = _count("var")
    model, n_mvar = _count("mvar")
    assert n_mvar == 464_157_440          # paper: M-VAR-d16 464M
    assert n_var == 310_283_520           # VAR paper: VAR-d16 310M
    # names and shapes of the official code's d16 model (its constructor's default, attn_l2_norm=True:
    # the released d16 file has the same keys but no scale_mul_1H11; tests/test_scan.py's docstring)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    for line in REFERENCE.read_text().splitlines():
        name, shape = line.split(" ")[0], line[line.index("["):line.index("]") + 1]
        if "(buffer)" in line:
            continue
        assert name in ours, f"missing parameter {name}"
        assert ours[name] == [int(d) for d in shape.strip("[]").split(",")], name


def test_official_checkpoint_loader_ignores_buffers_and_names_mismatches(tmp_path):
    model = tiny_model("mvar")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    L = model.cfg.seq_len
    sd.update({"lvl_1L": torch.zeros(1, L, dtype=torch.long),
               "attn_bias_for_masking": torch.zeros(1, 1, L, L),
               "blocks.0.attn.zero_k_bias": torch.zeros(64),
               "blocks.0.attn.patch_nums": torch.tensor(PATCH_NUMS, dtype=torch.int32)})
    torch.save(sd, tmp_path / "official.pth")
    fresh = tiny_model("mvar", seed=1)
    report = load_official_checkpoint(fresh, tmp_path / "official.pth")
    assert len(report["ignored_buffers"]) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    del sd["head.bias"]
    with pytest.raises(ValueError, match="head.bias"):
        load_official_checkpoint(fresh, sd)
    with pytest.raises(ValueError, match="mamba"):     # an M-VAR checkpoint into a VAR model
        load_official_checkpoint(tiny_model("var"), model.state_dict())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_checkpoint(fresh, tmp_path / "missing.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "official.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_official_checkpoint(fresh, tmp_path / "cut.pth")


def test_a_few_training_steps_lower_the_loss(tokenizer):
    # Gradients reach every branch: the loss on one fixed batch must fall quickly.
    model = tiny_model("mvar").train()
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(32, (4, p * p), generator=g) for p in PATCH_NUMS]
    teacher = tokenizer.idx_to_teacher_input(idx).detach()
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = compute_loss(model(labels, teacher), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("depth", [4, 8])
def test_init_follows_the_official_recipe(depth):
    """The official M-VAR init_weights, group by group (std measured over all blocks): Linear
    std = sqrt(1 / 3C); conv1d 0.02 with zero bias; attn.proj and ffn.fc2 divided by sqrt(2
    depth) but Mamba's out_proj not; AdaLN rows [:2C] (g1, g2) x alng and rows [2C:] (g3, the
    scales and shifts) x 0.5; head x 0.02."""
    torch.manual_seed(0)
    alng = 1e-3
    model = MVAR(MVARConfig(arch="mvar", depth=depth, num_classes=10, vocab_size=512, Cvae=8,
                            patch_nums=PATCH_NUMS, alng=alng))
    C = model.cfg.width
    std = (1 / (3 * C)) ** 0.5
    every = lambda get: torch.cat([get(b).detach().flatten() for b in model.blocks])
    want = {
        "conv1d": (every(lambda b: b.mamba.conv1d.weight), 0.02),
        "in_proj": (every(lambda b: b.mamba.in_proj.weight), std),
        "out_proj": (every(lambda b: b.mamba.out_proj.weight), std),
        "attn.proj": (every(lambda b: b.attn.proj.weight), std / (2 * depth) ** 0.5),
        "ffn.fc2": (every(lambda b: b.ffn.fc2.weight), std / (2 * depth) ** 0.5),
        "g1, g2": (every(lambda b: b.ada_lin[1].weight[:2 * C]), std * alng),
        "g3": (every(lambda b: b.ada_lin[1].weight[2 * C:3 * C]), std * 0.5),
        "scales, shifts": (every(lambda b: b.ada_lin[1].weight[3 * C:]), std * 0.5),
        "head": (model.head.weight.detach().flatten(), std * 0.02),
    }
    for name, (values, official) in want.items():
        assert abs(values.std().item() / official - 1) < 0.05, f"{name}: std {values.std():.3e}, official {official:.3e}"
    assert not every(lambda b: b.mamba.conv1d.bias).any()


def attention_by_hand(attn, x, spans, keys_of):
    """ScaleAttention written out in float64: per scale and head, softmax(temperature * q . k)
    over the keys keys_of(start, end) names, times the values, then the output projection.
    Returns the output and the probabilities, one (B, H, l, keys) tensor per scale."""
    B, L, C = x.shape
    H, W = attn.num_heads, attn.mat_qkv.weight                  # W's rows: q (C), k (C), v (C)
    heads = lambda t: t.view(B, L, H, C // H).transpose(1, 2)   # (B, H, L, d)
    q, k = heads(x @ W[:C].T + attn.q_bias), heads(x @ W[C:2 * C].T)
    v = heads(x @ W[2 * C:].T + attn.v_bias)
    if attn.l2_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        temperature = attn.scale_mul_1H11.clamp_max(torch.tensor(100.0).log()).exp()   # (1, H, 1, 1)
    else:
        temperature = 0.25 / (C // H) ** 0.5
    out, probs = torch.zeros_like(q), []
    for start, end in spans:
        keys = keys_of(start, end)
        probs.append((temperature * q[:, :, start:end] @ k[:, :, keys].transpose(-1, -2)).softmax(-1))
        out[:, :, start:end] = probs[-1] @ v[:, :, keys]
    return attn.proj(out.transpose(1, 2).flatten(2)), probs


@pytest.mark.parametrize("arch,l2_norm", [("mvar", True), ("mvar", False), ("var", True)])
def test_attention_written_by_hand_gives_the_model_output(arch, l2_norm):
    """The paper's rule spelled out: the queries of scale k see the keys of scale k only (M-VAR)
    or of scales 0..k (VAR). Probabilities computed by hand over exactly those keys give what
    ScaleAttention returns (notebook 04 reads such probabilities), and the other rule does not."""
    model = tiny_model(arch, attn_l2_norm=l2_norm).double()
    attn, spans = model.blocks[0].attn, scale_spans(PATCH_NUMS)
    x = torch.randn(3, spans[-1][1], model.cfg.width, dtype=torch.float64)
    own, prefix = (lambda s, e: slice(s, e)), (lambda s, e: slice(0, e))
    rule, other = (own, prefix) if arch == "mvar" else (prefix, own)
    with torch.no_grad():
        got = attn(x, spans)
        want, probs = attention_by_hand(attn, x, spans, rule)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert (got - attention_by_hand(attn, x, spans, other)[0]).abs().max() > 1e-3
    for (start, end), p in zip(spans, probs):
        assert p.shape == (3, 2, end - start, end - start if arch == "mvar" else end)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, end - start, dtype=torch.float64))
