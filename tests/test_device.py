"""The tests that run on another device when told to: MVAR_TEST_DEVICE=cuda (benchmarks/gpu_check.py
sets it). By default they run on the CPU with the rest of the quick suite.

Each compares what the device computes with an independent reference on the CPU: the chunked scan
against the float64 loop, the model's logits against the same weights' logits on the CPU, the
sampler against the teacher-forced pass on the device, and a train.py run (autocast, and on CUDA
the fp16 GradScaler) that must train: finite losses, a checkpoint that loads and samples.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import train
from mvar import ssd_scan_parallel, ssd_scan_sequential
from test_mvar import random_teacher_input, tiny_model, tokenizer  # noqa: F401  (a fixture)
from test_scan import make_inputs, rel_err
from test_train import TINY

DEVICE = torch.device(os.environ.get("MVAR_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_chunked_scan_on_the_device_equals_the_float64_loop(dtype, tol):
    """Three chunks and a carried-in state; bf16 runs its matmuls in bf16 (looser tolerance)."""
    args = make_inputs(2, 150, 4, 8, 2, 16, dtype=torch.float64)
    y_ref, s_ref = ssd_scan_sequential(*args)
    on_device = [None if t is None else t.to(DEVICE, dtype if i in (0, 3, 4) else torch.float32)
                 for i, t in enumerate(args)]                        # x, Bm, Cm in dtype; dt, A, D, h0 fp32
    y, s = ssd_scan_parallel(*on_device, chunk_size=64)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert rel_err(y.double().cpu(), y_ref) < tol and rel_err(s.double().cpu(), s_ref) < tol


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_logits_on_the_device_equal_the_cpus(arch):
    model = tiny_model(arch)
    labels, x = torch.tensor([0, 1, 4]), random_teacher_input(model)
    cpu = model(labels, x)
    dev = model.to(DEVICE)(labels.to(DEVICE), x.to(DEVICE)).cpu()
    torch.testing.assert_close(dev, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["mvar", "var"])
def test_sampler_on_the_device_matches_its_teacher_forced_pass(arch, tokenizer):  # noqa: F811
    model, tok = tiny_model(arch).to(DEVICE), tokenizer.to(DEVICE)
    classes = torch.arange(4, device=DEVICE)
    out = model.sample_tokens(tok, classes, guidance=1.5, top_k=10,
                              generator=torch.Generator(device=DEVICE).manual_seed(0), return_logits=True)
    both = torch.cat([classes, torch.full_like(classes, model.cfg.num_classes)])
    forced = model(both, tok.idx_to_teacher_input([i.repeat(2, 1) for i in out["idx"]]))
    torch.testing.assert_close(torch.cat(out["logits"], dim=1), forced, rtol=1e-4, atol=1e-4)
    images = model.generate(tok, classes, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert images.device.type == DEVICE.type and 0 <= images.min() and images.max() <= 1
    tok.cpu()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_py_runs_on_the_device(precision, tmp_path):
    """Both stages of the tiny run under autocast (fp16: with the GradScaler, CUDA only); the
    losses stay finite, and the generator checkpoint loads and samples on the device."""
    if precision == "fp16" and not CUDA:
        pytest.skip("fp16 and the GradScaler need CUDA")
    assert TINY[-2:] == ["--device", "cpu"]
    train.main(TINY[:-1] + [str(DEVICE), "--out_dir", str(tmp_path), "--precision", precision, "--gen_epochs", "0.5"])
    ck = runtime.load_checkpoint(tmp_path / "mvar.pt", "generator")
    assert ck["done"] and all(torch.isfinite(torch.tensor([h[1] for h in ck["history"]])))
    model, tok, _ = runtime.load_generator(tmp_path / "mvar.pt", DEVICE)
    images = model.generate(tok, torch.arange(2, device=DEVICE),
                            generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert images.shape[0] == 2 and torch.isfinite(images).all()


@pytest.mark.processes
def test_gpu_check_runs_its_cpu_form(tmp_path):
    """benchmarks/gpu_check.py --tiny, as CI runs it, so that the script cannot rot before a GPU
    is lent: every check it can run on a CPU is ok, and the table reaches the JSON."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MVAR_TEST_DEVICE": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["check"]: r["result"] for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert {k for k, v in rows.items() if v == "ok"} == {"train bf16", "train fp32", "scan", "sampling",
                                                          "device tests"}, rows
