"""Tests of benchmarks/decoupling.py, the study that retrains M-VAR without its paths across scales.

Each variant must cut exactly what its name says, in the teacher-forced pass *and* in the sampler
(the study trains on the first and judges samples from the second). The references: a brute-force
probe (swap every other scale's teacher input for another image's and watch scale k's logits),
the teacher-forced pass for the sampler, and gradients for the parameter count.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar import MVAR
from test_mvar import random_teacher_input, tiny_config, tokenizer  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import decoupling  # noqa: E402

# Which variants let the coarser scales reach scale k other than through its teacher input.
CROSSES = {"mvar": True, "var": True, "mvar-reset": False, "attn-only": False, "mamba-only": True}


def variant(name, seed=0):
    torch.manual_seed(seed)
    model = decoupling.build_variant(name, tiny_config("mvar")).eval()
    with torch.no_grad():            # visible values everywhere: the init hides leaks behind tiny gates
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_variants_are_the_named_architectures():
    assert set(CROSSES) == set(decoupling.VARIANTS)
    for name in decoupling.VARIANTS:
        model = variant(name)
        keys = " ".join(model.state_dict())
        assert model.cfg.arch == decoupling.ARCH[name]
        assert ("mamba" in keys) == (name in ("mvar", "mvar-reset", "mamba-only")), name
        assert ("attn" in keys) == (name != "mamba-only"), name
        causal = [b.attn.block_causal for b in model.blocks] if name != "mamba-only" else []
        assert all(causal) == (name == "var") or not causal, name


@pytest.mark.parametrize("name", list(decoupling.VARIANTS))
def test_what_reaches_scale_k_from_the_other_scales(name):
    """Scale k's logits, when every *other* scale's teacher input is another image's: unchanged
    exactly for the variants with no path across scales, changed for the others (from the 3x3
    scale on: before the 2x2 scale there is only the class token, which no image swap changes)."""
    model = variant(name)
    labels, x = torch.tensor([0, 1, 2]), random_teacher_input(model)
    logits, first = model(labels, x), model.cfg.patch_nums[0] ** 2
    for k, (start, end) in enumerate(model.spans[2:], start=2):
        mixed = x.roll(1, dims=0).clone()
        mixed[:, start - first:end - first] = x[:, start - first:end - first]   # scale k's own input
        moved = (model(labels, mixed)[:, start:end] - logits[:, start:end]).abs().max().item()
        assert (moved > 1e-4) if CROSSES[name] else (moved == 0), (name, k, moved)


@pytest.mark.parametrize("name", list(decoupling.VARIANTS))
def test_the_sampler_runs_the_same_variant(name, tokenizer):  # noqa: F811
    """sample_tokens' logits (both halves of guidance) equal the teacher-forced pass on the
    tokens it drew: the samples come from the model that was trained."""
    model = variant(name)
    classes = torch.arange(4)
    out = model.sample_tokens(tokenizer, classes, guidance=2.0, generator=torch.Generator().manual_seed(0),
                              return_logits=True)
    both = torch.cat([classes, torch.full_like(classes, model.cfg.num_classes)])
    forced = model(both, tokenizer.idx_to_teacher_input([i.repeat(2, 1) for i in out["idx"]]))
    torch.testing.assert_close(torch.cat(out["logits"], dim=1), forced, rtol=1e-4, atol=1e-4)


def test_mamba_reset_equals_separate_sequences():
    """The reset is each scale run through the Mamba layer as a sequence of its own: the same
    outputs as calling the layer on each scale's tokens alone."""
    model = variant("mvar-reset")
    u = torch.randn(2, model.cfg.seq_len, model.cfg.width)
    layer = model.blocks[0].mamba
    y, _ = layer(u)
    for start, end in model.spans:
        torch.testing.assert_close(y[:, start:end], type(layer).forward(layer, u[:, start:end])[0])


@pytest.mark.parametrize("name", list(decoupling.VARIANTS))
def test_live_parameters_are_those_that_get_a_gradient(name):
    """live_parameters against a gradient: the count of parameter entries whose gradient is not
    exactly zero after one loss on a batch with every class (eval mode: no class dropout)."""
    model = variant(name)
    labels = torch.arange(model.cfg.num_classes + 1)           # every class and the null class
    x = random_teacher_input(model, B=len(labels))
    model(labels, x).logsumexp(-1).sum().backward()
    reached = sum(int((p.grad != 0).sum()) for p in model.parameters() if p.grad is not None)
    assert decoupling.live_parameters(name, model) == reached


@pytest.mark.processes
def test_the_study_runs_end_to_end(tmp_path):
    """The whole script on a sliver (2 steps of every variant, one seed, 200 images per split,
    10 samples per class), in its own processes: its JSON has every variant, and a second run
    only reports (nothing is trained again)."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not (ROOT / "data" / "fashion-mnist").is_dir():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decoupling.py"), "--steps", "2", "--eval_every", "1",
           "--seeds", "0", "--subset", "200", "--per_class", "10", "--out", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "decoupling.json").read_text())
    assert set(summary["variants"]) == set(decoupling.VARIANTS) and summary["steps"] == 2
    for v in summary["variants"].values():
        assert [p[0] for p in v["curves"][0]] == [1, 2] and len(v["per_scale_loss"]) == 5
        assert v["runs"][0]["samples"] == 100 and 0 <= v["recognised"]["mean"] <= 1
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout[-2000:]
    assert (tmp_path / "results" / "decoupling_curves.png").stat().st_size > 10_000
