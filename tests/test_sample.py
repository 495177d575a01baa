"""sample.py: grids, strips and FID .npz files from a real (tiny) train.py run, released-weight
loading from a fake state dict, and the error messages.

The run is 16px shapes, patch_nums 1,2,3,4 (K = 4 scales), a depth-2 width-64 generator,
trained for one step of each stage: the pictures are noise, but the checkpoint format, the
tokenizer and the sampler are the real ones. Every picture sample.py writes is compared with
what MVAR.generate returns for the same labels and seed, so a wrong layout, class order or
seed handling fails.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import data
import runtime
import train
from mvar import MVAR, MVARConfig
from tokenizer import MultiScaleVQVAE, tokenizer_config

REPO = Path(__file__).resolve().parents[1]
S, NUM_CLASSES, K = 16, len(data.SHAPE_CLASSES), 4
TINY = ["--image_size", "16", "--shapes_train", "32", "--shapes_test", "8", "--tok_ch", "32",
        "--tok_ch_mult", "1,2,2", "--tok_z_channels", "8", "--vocab_size", "64",
        "--patch_nums", "1,2,3,4", "--tok_batch", "16", "--tok_epochs", "0.5", "--depth", "2",
        "--width", "64", "--num_heads", "2", "--gen_batch", "16", "--gen_epochs", "0.5",
        "--image_every", "1000", "--ckpt_every", "1000", "--samples_per_class", "1",
        "--guidance", "2.0", "--top_k", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: RUN/tokenizer.pt and RUN/mvar.pt (one step per stage)."""
    out = tmp_path_factory.mktemp("run")
    train.main(TINY + ["--out_dir", str(out)])
    return out


def reference(run, labels, seed, batch, **settings):
    """What MVAR.generate gives for these labels, batch by batch with one seeded generator,
    as uint8 (N, H, W, C) -- computed without sample.py."""
    model, tok, ck = runtime.load_generator(run / "mvar.pt")
    t = ck["config"]["train"]
    opts = dict(guidance=t["guidance"], top_k=t["top_k"], top_p=t["top_p"])
    opts.update(settings)
    gen = torch.Generator().manual_seed(seed)
    out = [model.generate(tok, labels[i:i + batch], generator=gen, **opts) for i in range(0, len(labels), batch)]
    return (torch.cat(out) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def tiles(png, rows, cols, size=S, zoom=4):
    """Cut save_image_grid's PNG into its rows x cols tiles -> uint8 (rows*cols, size, size, C).

    Each tile is the image upscaled `zoom` times (nearest neighbour: zoom x zoom blocks of one
    colour), with 2 px gaps, below a band of column labels and right of a band of row labels."""
    arr = np.asarray(Image.open(png))
    arr = arr[..., None] if arr.ndim == 2 else arr
    cell = size * zoom + 2
    top, left = arr.shape[0] - rows * cell - 2, arr.shape[1] - cols * cell - 2
    assert 0 <= top < 40 and 0 <= left < 200, arr.shape
    big = [arr[top + 2 + r * cell:top + r * cell + cell, left + 2 + c * cell:left + c * cell + cell]
           for r in range(rows) for c in range(cols)]
    small = np.stack([b[::zoom, ::zoom] for b in big])
    np.testing.assert_array_equal(np.stack(big), small.repeat(zoom, 1).repeat(zoom, 2))   # crisp blocks
    return small


# --------------------------------------------------------------------------------------------
# Grid, strip, npz from a train.py run
# --------------------------------------------------------------------------------------------

def test_grid_has_one_column_per_class(run, tmp_path):
    res = sample.main(["--ckpt", str(run / "mvar.pt"), "--classes", "5,0-1", "--per_class", "2",
                       "--seed", "3", "--batch", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert res["grid"] == tmp_path / "g.png" and res["npz"] is None and res["strip"] is None
    assert res["images"] == 6 and res["images_per_s"] > 0
    # the checkpoint's sampling settings are the defaults
    assert res["settings"] == {"guidance": 2.0, "top_k": 20, "top_p": 0.0, "more_smooth": False}
    got = tiles(res["grid"], rows=2, cols=3)
    want = reference(run, torch.tensor([5, 0, 1, 5, 0, 1]), seed=3, batch=4)
    np.testing.assert_array_equal(got, want)


def test_strip_shows_every_scale_of_one_sample_per_class(run, tmp_path):
    res = sample.main(["--ckpt", str(run / "mvar.pt"), "--classes", "2,7", "--per_class", "3",
                       "--strip", "--out", str(tmp_path), "--device", "cpu", "--guidance", "0"])
    assert res["grid"] == tmp_path / "mvar_grid.png" and res["strip"] == tmp_path / "mvar_strip.png"
    strip = tiles(res["strip"], rows=2, cols=K)     # one row per class: it reads at a glance
    grid = tiles(res["grid"], rows=3, cols=2)
    np.testing.assert_array_equal(strip[K - 1::K], grid[:2])   # the last scale is the grid's first row
    # each column is a different stage of the coarse-to-fine build-up
    assert all(not np.array_equal(strip[k], strip[k + 1]) for k in range(K - 1))


def test_npz_is_fid_layout_balanced_and_seeded(run, tmp_path):
    args = ["--ckpt", str(run / "mvar.pt"), "--npz", "10", "--batch", "6", "--device", "cpu",
            "--top_p", "0.9"]
    a = sample.main(args + ["--out", str(tmp_path / "a.npz")])
    b = sample.main(args + ["--out", str(tmp_path / "b.npz")])
    c = sample.main(args + ["--out", str(tmp_path / "c.npz"), "--seed", "1"])
    da, db, dc = (np.load(r["npz"]) for r in (a, b, c))
    assert sorted(da.files) == ["arr_0", "arr_1"]
    x, y = da["arr_0"], da["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (10, S, S, 3)
    assert y.shape == (10,) and y.min() >= 0 and y.max() < NUM_CLASSES
    counts = np.bincount(y, minlength=NUM_CLASSES)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10      # all 8 classes, balanced
    np.testing.assert_array_equal(x, db["arr_0"])                          # same seed, same images
    np.testing.assert_array_equal(y, db["arr_1"])
    assert not np.array_equal(x, dc["arr_0"])                              # another seed differs
    np.testing.assert_array_equal(x, reference(run, torch.from_numpy(y), seed=0, batch=6, top_p=0.9))


def test_cfg_flag_is_an_alias_of_guidance(run, tmp_path):
    """--cfg (the papers' and the official code's name, and this flag's before the rename) sets
    what --guidance sets: the same images. A checkpoint that stores "cfg" reads as guidance."""
    common = ["--ckpt", str(run / "mvar.pt"), "--classes", "0,3", "--per_class", "1", "--device", "cpu"]
    a = sample.main(common + ["--guidance", "0.5", "--out", str(tmp_path / "a.png")])
    b = sample.main(common + ["--cfg", "0.5", "--out", str(tmp_path / "b.png")])
    assert a["settings"]["guidance"] == b["settings"]["guidance"] == 0.5
    np.testing.assert_array_equal(tiles(a["grid"], rows=1, cols=2), tiles(b["grid"], rows=1, cols=2))
    old = {"sampling": {"cfg": 2.5, "top_k": 7, "top_p": 0.5}}                   # the shipped files' keys
    assert runtime.sampling_defaults(old) == {"guidance": 2.5, "top_k": 7, "top_p": 0.5}


def test_grey_images_are_replicated_to_three_channels():
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(3, 1, 5, 4, generator=g)
    grey[0, 0, 0, 0], grey[0, 0, 0, 1] = 1.0, 0.0
    got = sample.to_uint8_nhw3(grey)
    want = np.floor(grey[:, 0].double().numpy() * 255 + 0.5).astype(np.uint8)     # (N, H, W)
    assert got.shape == (3, 5, 4, 3) and got.dtype == np.uint8
    for ch in range(3):
        np.testing.assert_array_equal(got[..., ch], want)


def test_class_lists_and_ranges():
    assert runtime.parse_classes("0-3,8", 10) == [0, 1, 2, 3, 8]
    assert runtime.parse_classes("all", 4) == [0, 1, 2, 3]
    assert runtime.parse_classes(" 7 , 2 ", 10) == [7, 2]
    for text in ("a", "5-2", ",", "1.5"):
        with pytest.raises(ValueError, match="--classes"):
            runtime.parse_classes(text, 10)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_missing_shipped_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "SHIPPED", tmp_path)             # a clone without weights/
    with pytest.raises(FileNotFoundError, match="shipped weights .* are missing.*weights/make.py"):
        sample.main(["--arch", "var", "--device", "cpu"])


def test_missing_and_corrupt_checkpoints(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main(["--ckpt", str(tmp_path / "nope.pt"), "--device", "cpu"])
    bad = tmp_path / "mvar.pt"
    bad.write_bytes((run / "mvar.pt").read_bytes()[:5000])                 # truncated copy
    with pytest.raises(ValueError, match="corrupt, truncated"):
        sample.main(["--ckpt", str(bad), "--device", "cpu"])
    with pytest.raises(ValueError, match="at most one of --ckpt"):
        sample.main(["--ckpt", str(run / "mvar.pt"), "--official", "x.pth", "--device", "cpu"])
    with pytest.raises(ValueError, match="run them separately"):
        sample.main(["--ckpt", str(run / "mvar.pt"), "--npz", "8", "--strip", "--device", "cpu"])


def test_class_out_of_range_names_the_valid_range(run):
    with pytest.raises(ValueError, match=r"\[8\] out of range.*valid labels are 0\.\.7"):
        sample.main(["--ckpt", str(run / "mvar.pt"), "--classes", "6-8", "--device", "cpu"])


def test_another_tokenizer_is_refused(run, tmp_path):
    ck = runtime.load_checkpoint(run / "tokenizer.pt", "tokenizer")
    ck["model"]["quantize.embedding.weight"] += 0.01                    # same shape, other weights
    runtime.save_checkpoint(ck, tmp_path / "other_tokenizer.pt")
    with pytest.raises(ValueError, match="not the tokenizer"):
        sample.main(["--ckpt", str(run / "mvar.pt"), "--tokenizer", str(tmp_path / "other_tokenizer.pt"),
                     "--device", "cpu"])


def test_cli_prints_the_error_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


# --------------------------------------------------------------------------------------------
# Released weights (--official): a fake state dict of a small config, saved like the release
# --------------------------------------------------------------------------------------------

SMALL = {"model": {"depth": 2, "width": 64, "num_heads": 2, "vocab_size": 64, "Cvae": 8,
                   "patch_nums": [1, 2, 3, 4]},
         "tokenizer": {"image_size": 16, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                       "z_channels": 8, "vocab_size": 64, "patch_nums": [1, 2, 3, 4]}}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Fake released files: mvar .pth (random weights + the buffers the official code saves),
    VAR-tokenizer .pth. Returns (folder, generator state dict, tokenizer state dict)."""
    d = tmp_path_factory.mktemp("official")
    torch.manual_seed(123)
    model = MVAR(MVARConfig(arch="mvar", num_classes=1000, **SMALL["model"]))
    sd = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({**sd, "lvl_1L": model.lvl_1L.clone()}, d / "mvar_d2.pth")
    tok = MultiScaleVQVAE(tokenizer_config("var256", **SMALL["tokenizer"]))
    tok_sd = {k: v.clone() for k, v in tok.state_dict().items()}
    torch.save(tok_sd, d / "vae.pth")
    return d, sd, tok_sd


def official_args(d, *more):
    """Only the two paths: everything else is read from the files."""
    return ["--official", str(d / "mvar_d2.pth"), "--vae_ckpt", str(d / "vae.pth"), "--device", "cpu", *more]


def test_official_weights_load_and_sample(official, tmp_path):
    d, sd, tok_sd = official
    res = sample.main(official_args(d, "--npz", "6", "--classes", "0,999", "--batch", "3",
                                    "--out", str(tmp_path)))
    assert res["settings"] == {**runtime.OFFICIAL_FID, "more_smooth": False}
    written = np.load(tmp_path / "mvar_6.npz")
    np.testing.assert_array_equal(written["arr_1"], [0, 999, 0, 999, 0, 999])
    # independent reference: the same config loaded with torch's own load_state_dict
    model = MVAR(MVARConfig(arch="mvar", num_classes=1000, **SMALL["model"])).eval()
    model.load_state_dict(sd)
    tok = MultiScaleVQVAE(tokenizer_config("var256", **SMALL["tokenizer"])).eval()
    tok.load_state_dict(tok_sd)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 999, 0, 999, 0, 999])
    want = torch.cat([model.generate(tok, labels[i:i + 3], guidance=1.5, top_k=900, top_p=0.96, generator=gen)
                      for i in (0, 3)])
    np.testing.assert_array_equal(written["arr_0"], (want * 255).round().byte().permute(0, 2, 3, 1).numpy())


def test_official_errors(official, tmp_path):
    d, _, _ = official
    with pytest.raises(ValueError, match=r"valid labels are 0\.\.999"):
        sample.main(official_args(d, "--classes", "1000"))
    with pytest.raises(FileNotFoundError, match="wget"):               # says where to get it
        sample.main(official_args(d)[:-2] + ["--vae_ckpt", str(tmp_path / "no_vae.pth"), "--device", "cpu"])
    swapped = official_args(d)
    swapped[1], swapped[3] = str(d / "vae.pth"), str(d / "mvar_d2.pth")  # the two files swapped
    with pytest.raises(ValueError, match="VAR tokenizer file .* pass it as --vae_ckpt"):
        sample.main(swapped)
    swapped[1] = str(d / "mvar_d2.pth")                                   # a generator as --vae_ckpt
    with pytest.raises(ValueError, match="generator file .* pass it as --official"):
        sample.main(swapped)
    with pytest.raises(ValueError, match=r"--arch var \(the file holds mvar\)"):
        sample.main(official_args(d, "--arch", "var"))
    with pytest.raises(ValueError, match=r"--depth 16 \(the file holds 2\)"):
        sample.main(official_args(d, "--depth", "16"))
    assert sample.main(official_args(d, "--arch", "mvar", "--depth", "2", "--classes", "1", "--per_class", "1",
                                     "--out", str(tmp_path)))["images"] == 1   # agreeing checks pass
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    junk = official_args(d)
    junk[1] = str(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="corrupt"):
        sample.main(junk)


# --------------------------------------------------------------------------------------------
# benchmarks/sample_quality.py (a smoke test: the table it prints is the README's evidence)
# --------------------------------------------------------------------------------------------

def test_sample_quality_benchmark_runs_and_caches_its_classifier(run):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sample_quality
    args = ["--ckpt", str(run / "mvar.pt"), "--per_class", "1", "--steps", "5", "--device", "cpu"]
    first = sample_quality.main(args)
    assert (run / "classifier_rgb.pt").exists() and (run / "classifier_grey.pt").exists()
    second = sample_quality.main(args)                       # classifiers loaded from the cache
    assert first == second == json.loads((run / "sample_quality.json").read_text())
    names = [r["name"] for r in first["rows"]]
    assert names[0] == "real test images" and names[2].startswith("mvar samples (guidance 2")
    assert [r["images"] for r in first["rows"]] == [8, 8, NUM_CLASSES]
    for r in first["rows"]:
        assert all(0 <= a <= 1 for a in r["accuracy"].values()) and len(r["per_class"]["grey"]) == NUM_CLASSES
    # another draw of the samples, scored by the same (cached) classifier
    redraw = sample_quality.main(args + ["--sample_seed", "1"])
    assert redraw["rows"][:2] == first["rows"][:2] and (redraw["seed"], redraw["sample_seed"]) == (0, 1)


def test_sample_quality_scores_a_tokenizer_alone(run):
    """--tokenizer: the real and reconstruction rows of a --ckpt run on the same tokenizer."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sample_quality
    common = ["--per_class", "1", "--steps", "5", "--device", "cpu"]
    with_generator = sample_quality.main(["--ckpt", str(run / "mvar.pt")] + common)
    alone = sample_quality.main(["--tokenizer", str(run / "tokenizer.pt")] + common)
    assert alone["rows"] == with_generator["rows"][:2]
    assert alone["rows"][1]["name"] == "tokenizer reconstructions of test"
    assert json.loads((run / "tokenizer_quality.json").read_text()) == alone   # not sample_quality.json
    assert json.loads((run / "sample_quality.json").read_text()) == with_generator
    with pytest.raises(SystemExit):
        sample_quality.main(["--tokenizer", str(run / "tokenizer.pt"), "--ckpt", str(run / "mvar.pt")])


def test_sample_quality_spread_table(run):
    """--fd_per_class: one row per source, each with the same n, real images at ratio 1 (on
    random stand-in images: 2 per class, as the tiny run's test split has only 1)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import argparse
    import sample_quality
    gen = torch.Generator().manual_seed(0)
    test_x = torch.rand(3 * NUM_CLASSES, 3, S, S, generator=gen) * 2 - 1
    test_y = torch.arange(3 * NUM_CLASSES) % NUM_CLASSES
    clf = sample_quality.SmallCNN(1, NUM_CLASSES, S)
    args = argparse.Namespace(fd_per_class=2, fd_guidance=[0.0, 2.0], batch=8, seed=0, sample_seed=0, guidance=None, top_k=None,
                              top_p=None)
    loaded = runtime.load_generator(run / "mvar.pt", torch.device("cpu"))
    rows = sample_quality.spread_table(args, clf, "grey", test_x, test_x, test_y, *loaded,
                                       NUM_CLASSES, torch.device("cpu"))
    assert [r["name"] for r in rows] == ["real test images", "tokenizer reconstructions",
                                         "mvar samples, guidance 0", "mvar samples, guidance 2"]
    assert all(r["images"] == 2 * NUM_CLASSES for r in rows)
    assert rows[0]["diversity_ratio"] == pytest.approx(1.0)
    assert rows[1]["frechet_distance"] > 0
    alone = sample_quality.spread_table(args, clf, "grey", test_x, test_x, test_y, None, *loaded[1:],
                                        NUM_CLASSES, torch.device("cpu"))   # --tokenizer: no generator
    assert alone == rows[:2]
    args.fd_per_class = 1
    with pytest.raises(ValueError, match="at least 2"):
        sample_quality.spread_table(args, clf, "grey", test_x, test_x, test_y, *loaded,
                                    NUM_CLASSES, torch.device("cpu"))


def test_frechet_distance_and_class_spread():
    """Against independent formulas: tr((S1^1/2 S2 S1^1/2)^1/2) is the sum of the square roots
    of the eigenvalues of S1 S2 (same spectrum); spreads from an explicit loop."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sample_quality
    gen = torch.Generator().manual_seed(0)
    f1 = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    f2 = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                              dtype=torch.float64) + 0.5
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    cross = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    want = (f1.mean(0) - f2.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * cross
    assert sample_quality.frechet_distance(f1, f2) == pytest.approx(want.item(), rel=1e-9)
    assert sample_quality.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)
    y = torch.arange(300) % 3
    spread = sample_quality.class_spread(f1, y, 3)
    for c in range(3):
        rows = [f1[i] for i in range(300) if y[i] == c]
        mean = sum(rows) / len(rows)
        assert spread[c].item() == pytest.approx(sum((r - mean).norm() for r in rows).item() / len(rows))


def test_sample_quality_classifier_sizes():
    # The pools round up, so any even side works (28 px Fashion-MNIST: 14 -> 7 -> 4); a wrong
    # size of the final linear layer would raise in the forward pass.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sample_quality
    for side in (16, 28, 30, 32):
        clf = sample_quality.SmallCNN(1, 10, side)
        assert clf(torch.zeros(2, 1, side, side)).shape == (2, 10)
        assert clf.fc.in_features == 64 * ((side + 7) // 8) ** 2           # ceil(side / 8)^2
    with pytest.raises(ValueError, match="even"):
        sample_quality.SmallCNN(1, 10, 27)
