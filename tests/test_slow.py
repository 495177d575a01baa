"""Long end-to-end checks, skipped by default (pytest.ini). Run them with `pytest -m slow`.

The default `python train.py` run, on the built-in data, must produce samples in which a
classifier trained on real images recognises the class (README "python train.py"). 7:15 on an
idle 2-core CPU with one thread (benchmarks/RESULTS.md, "python train.py").
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_run_samples_are_recognisable(tmp_path):
    import torch
    import train
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sample_quality

    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)          # robust on a shared machine (README)
    out = train.main(["--out_dir", str(tmp_path)])
    assert out["generator"] is not None, "the default run did not finish"
    res = sample_quality.main(["--ckpt", str(tmp_path / "mvar.pt"), "--per_class", "10",
                               "--device", "cpu"])
    acc = {r["name"].split(" ")[0]: r["accuracy"]["grey"] for r in res["rows"]}
    assert acc["real"] > 0.95                       # the classifier itself works
    assert acc["mvar"] > 0.9, f"M-VAR samples are not recognisable: {res['rows']}"
