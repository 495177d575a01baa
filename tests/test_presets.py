"""Every preset of train.py runs end to end, on fake data in its dataset's real on-disk format.

The cifar10 and imagenet256-* presets need data this machine cannot download, so each gets a
fake dataset in the real format -- CIFAR-10's pickled python batches; ImageNet's class folders of
image files, with a tokenizer file in the format of VAR's released vae_ch160v4096z32.pth (a plain
state dict, 32 base channels instead of 160) -- and size overrides that make it fit a test: a small generator,
a few steps. Everything else is the preset's (dataset code path, tokenizer preset, scales,
precision rule, data workers, evaluation, pictures). Each run is stopped, resumed, finished, then
sampled by `python sample.py` in its own process.

    python -m pytest -q -m processes tests/test_presets.py
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import train
from test_data import write_cifar
from tokenizer import MultiScaleVQVAE, tokenizer_config

pytestmark = pytest.mark.processes
REPO = Path(__file__).resolve().parents[1]
SMALL_GENERATOR = ["--depth", "1", "--width", "64", "--num_heads", "2", "--d_state", "16", "--headdim", "32",
                   "--log_every", "1", "--device", "cpu"]


def run_stopped_resumed_finished(argv, out, stage_args=()):
    """train.main three times on the same folder: stopped after 1 step of each stage that runs,
    stopped again, then to the end. Returns the last result and the checkpoint."""
    first = train.main(argv + ["--stop_after", "1", *stage_args])
    assert first["generator"] is None                            # stopped: nothing finished yet
    train.main(argv + ["--stop_after", "1", *stage_args])
    result = train.main(argv + list(stage_args))
    ck = runtime.load_checkpoint(out / "mvar.pt", "generator")
    assert result["generator"] is not None and ck["done"] and ck["step"] == ck["total_steps"]
    return result, ck


def sample_cli(ckpt, out, *extra):
    """`python sample.py` on the finished run, as a user runs it -> the grid as an array."""
    done = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(ckpt), "--per_class", "1",
                           "--out", str(out), "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return np.asarray(Image.open(out / "mvar_grid.png"))


def test_cifar10_preset(tmp_path):
    """--preset cifar10: both stages (its 32px tokenizer with 7 scales, horizontal flips, two
    data workers), stopped and resumed in each stage (tokenizer 0 -> 1 | 1 -> 2, generator 0 -> 1
    | 1 -> 3), then sampled."""
    write_cifar(tmp_path / "cifar-10-batches-py", n=12)          # 60 training images, 12 test images
    out = tmp_path / "run"
    argv = ["--preset", "cifar10", "--data_dir", str(tmp_path), "--out_dir", str(out), "--tok_ch", "32",
            "--tok_epochs", "0.34", "--tok_batch", "10", "--gen_batch", "10", "--gen_steps", "3", *SMALL_GENERATOR]
    result, ck = run_stopped_resumed_finished(argv, out)
    cfg = ck["config"]["train"]
    assert (cfg["dataset"], cfg["hflip"], cfg["num_workers"], ck["config"]["model"]["patch_nums"]) == \
        ("cifar10", True, 2, [1, 2, 3, 4, 5, 6, 8])
    tok = runtime.load_checkpoint(out / "tokenizer.pt", "tokenizer")
    assert tok["done"] and tok["step"] == 2 and len(tok["history"]) == 2   # 0.34 epoch of 6 steps
    assert [h[0] for h in ck["history"]] == [1, 2, 3]           # three steps, in three invocations
    grid = sample_cli(out / "mvar.pt", tmp_path / "samples", "--classes", "0-3")
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0   # RGB pictures, not blank


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.png (2 classes; 256 px and odd sizes:
    the loader resizes and centre-crops), and a VAR-format tokenizer file with 32 base channels (VAR: 160)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                size = (256, 256) if i % 2 else (300, 280)
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(tokenizer_config("var256", ch=32))
    torch.save(vae.state_dict(), root / "vae.pth")                 # VAR's release: a bare state dict
    return root


@pytest.mark.parametrize("preset", ["imagenet256-d16", "imagenet256-d20", "imagenet256-d24", "imagenet256-d30"])
def test_imagenet_presets(preset, imagenet, tmp_path):
    """--preset imagenet256-*: the generator on VAR's imported tokenizer (10 scales, L = 680),
    stopped and resumed, finished, sampled; the preset's own learning-rate rule and AdaLN init."""
    out = tmp_path / "run"
    argv = ["--preset", preset, "--data_dir", str(imagenet), "--vae_ckpt", str(imagenet / "vae.pth"),
            "--out_dir", str(out), "--gen_batch", "4", "--gen_steps", "3", "--num_workers", "0",
            "--eval_images", "4", *SMALL_GENERATOR]
    result, ck = run_stopped_resumed_finished(argv, out)
    want = train.make_config(preset)
    cfg = ck["config"]["train"]
    assert (cfg["base_lr"], cfg["alng"], cfg["end_lr_ratio"]) == (want.base_lr, want.alng, want.end_lr_ratio)
    assert ck["config"]["model"]["patch_nums"] == list(tokenizer_config("var256").patch_nums)
    assert ck["config"]["tokenizer"]["ch"] == 32                  # read from the file's shapes
    assert [h[0] for h in ck["history"]] == [1, 2, 3]
    grid = sample_cli(out / "mvar.pt", tmp_path / "samples")
    assert grid.shape[2] == 3 and grid.std() > 0
