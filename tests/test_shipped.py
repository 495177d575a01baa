"""The shipped Fashion-MNIST models still compute what they computed when they were made.

weights/fashion-mnist/ holds a trained tokenizer, M-VAR and VAR. When `python weights/make.py`
made them, it also recorded what they compute on a fixed slice of the Fashion-MNIST test set
(tests/reference/fashion_mnist_shipped.pt: 32 images and the token maps of 512): the tokenizer's
token maps and reconstruction PSNR, each generator's teacher-forced loss and per-scale accuracy,
and a seeded sample's token maps. These tests recompute them with today's code (the same
`measure` function) and compare.

Random weights hide bugs that trained weights show: a trained model's loss moves by far more
than float rounding when any part of what it computes changes (a mask, a scan step, a
quantizer detail), while shapes and most hand-written references stay satisfied. The tolerances
are a few times the float32 rounding between machines; a real change exceeds them by orders of
magnitude (benchmarks/RESULTS.md, "The shipped weights", lists the changes tried). They need neither
the dataset nor any training.

If a change is *meant* to alter what the models compute, regenerate the weights and this
reference with `python weights/make.py` (about an hour on a 2-core CPU).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

import runtime

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference" / "fashion_mnist_shipped.pt"
FIX = f"If the change is intended, regenerate the weights and the reference with `{runtime.REGENERATE}`."


def _make_module():
    """weights/make.py, imported by its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("make_shipped", ROOT / "weights" / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped():
    """(tokenizer, {"mvar", "var"}, reference dict, what today's code computes on it)."""
    make = _make_module()
    try:
        tokenizer, generators = make.load_shipped()
    except (FileNotFoundError, ValueError, KeyError) as e:
        pytest.fail(f"the shipped weights no longer load: regenerate them with `{runtime.REGENERATE}`\n"
                    f"({type(e).__name__}: {e})")
    ref = torch.load(REFERENCE, weights_only=True)
    now = make.measure(tokenizer, generators, ref["images"], ref["image_labels"], ref["tokens"],
                       ref["token_labels"])
    return tokenizer, generators, ref, now


def test_shipped_files_are_weights_only_and_small():
    """Each file loads with weights_only=True, holds no optimizer state, and all fit in 12 MB."""
    files = sorted(runtime.SHIPPED.glob("*.pt"))
    assert [f.name for f in files] == ["mvar.pt", "tokenizer.pt", "var.pt"]
    for f in files:
        ck = torch.load(f, weights_only=True)
        assert ck["done"] and "optimizer" not in ck and "rng" not in ck, f.name
        assert {v.dtype for v in ck["model"].values() if v.is_floating_point()} == {torch.float16}, f.name
    assert sum(f.stat().st_size for f in files) <= 12e6


def test_tokenizer_reproduces_its_token_maps_and_psnr(shipped):
    _, _, ref, now = shipped
    want, got = ref["expected"]["tokenizer"], now["tokenizer"]
    # Nearest-code search can flip on a near tie under another machine's float rounding: allow
    # 1% of the 32 x 88 tokens to differ. A changed quantizer changes most of them.
    agree = (got["idx"] == want["idx"]).float().mean().item()
    assert agree >= 0.99, f"the shipped tokenizer's token maps changed ({100 * agree:.1f}% agree). {FIX}"
    # The PSNR of the decoded token maps checks the decoder too.
    assert got["psnr_db"] == pytest.approx(want["psnr_db"], abs=0.02), \
        f"the shipped tokenizer's PSNR changed from {want['psnr_db']:.3f} to {got['psnr_db']:.3f} dB. {FIX}"


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_generator_reproduces_its_loss_and_accuracy(shipped, arch):
    """Teacher-forced loss and per-scale accuracy on 512 test images."""
    _, _, ref, now = shipped
    want, got = ref["expected"][arch], now[arch]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), \
        f"the shipped {arch}'s loss changed from {want['loss']:.5f} to {got['loss']:.5f}. {FIX}"
    # One token of the 1x1 scale is 1/512 of its accuracy: allow one flipped argmax per scale.
    tokens = [p * p * len(ref["tokens"]) for p in shipped[1][arch].cfg.patch_nums]
    for k, (w, g, n) in enumerate(zip(want["per_scale_acc"], got["per_scale_acc"], tokens)):
        assert abs(w - g) <= 1.5 / n, \
            f"the shipped {arch}'s accuracy at scale {k} changed from {w:.4f} to {g:.4f}. {FIX}"


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_seeded_sample_reproduces_its_token_maps(shipped, arch):
    """One image per class, the shipped sampling setting, seed 0: the same token maps. A flipped
    draw changes every scale after it, so this is exact."""
    _, _, ref, now = shipped
    want, got = ref["expected"][arch]["sample_idx"], now[arch]["sample_idx"]
    agree = (got == want).float().mean().item()
    assert torch.equal(got, want), \
        f"the shipped {arch}'s seeded sample changed ({100 * agree:.1f}% of tokens agree). {FIX}"


@pytest.mark.slow
def test_shipped_samples_are_recognisable(tmp_path):
    """A small classifier trained on real Fashion-MNIST recognises >= 90% of 200 samples."""
    import shutil
    import sys
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not (ROOT / "data" / "fashion-mnist").is_dir():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sample_quality
    shutil.copytree(runtime.SHIPPED, tmp_path, dirs_exist_ok=True)   # it writes beside the checkpoint
    res = sample_quality.main(["--ckpt", str(tmp_path / "mvar.pt"), "--ckpt2", str(tmp_path / "var.pt"),
                               "--per_class", "20", "--device", "cpu"])
    acc = {r["name"].split(" ")[0]: r["accuracy"]["grey"] for r in res["rows"]}
    assert acc["real"] > 0.85                       # the classifier itself works
    assert acc["mvar"] >= 0.9 and acc["var"] >= 0.9, f"shipped samples are not recognisable: {acc}"
