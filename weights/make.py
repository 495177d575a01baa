"""Make (or remake) the trained Fashion-MNIST models that come with the repository.

    python weights/make.py            # train or resume in runs/fashion-mnist, then ship the weights

weights/fashion-mnist/ holds a tokenizer, an M-VAR and a VAR trained by the committed code with
the `fashion-mnist` preset's commands, so that `python sample.py`, notebooks 02-05 and the
regression tests (tests/test_shipped.py) have a trained model without anyone training one. Run
this after an intentional change to what the models compute; the regression tests say when.

  1. train, exactly as README's recipe (each command resumes, and returns at once when its run is
     finished): the tokenizer stage, then M-VAR on its token cache (these two are
     `python train.py --preset fashion-mnist`), then VAR on the same tokens;
  2. ship: weights-only float16 copies (shippable_copy) into weights/fashion-mnist/,
     with the sampling setting below as the models' default;
  3. record what the shipped models compute on a fixed slice of the Fashion-MNIST test set
     (32 images, the token maps of 512): tests/reference/fashion_mnist_shipped.pt;
  4. measure: validation loss on the whole test set (shipped float16 weights and the run's
     float32 ones), and how many samples a small classifier recognises
     (benchmarks/sample_quality.py, 50 per class);
  5. write weights/fashion-mnist/PROVENANCE.md and provenance.json.

Needs Fashion-MNIST (Debian's dataset-fashion-mnist, or --download on the first command). The
training takes 40-60 minutes on an idle 2-core CPU (the commit, the commands and their wall time
go into PROVENANCE.md); steps 2-5 take about six minutes (5:42 measured).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from mvar import compute_loss  # noqa: E402
from tokenizer import psnr, split_scales  # noqa: E402

RUN = ROOT / "runs" / "fashion-mnist"
REFERENCE = ROOT / "tests" / "reference" / "fashion_mnist_shipped.pt"
COMMANDS = {   # name -> train.py arguments; "tokenizer" + "mvar" = the preset's one command
    "tokenizer": ["--preset", "fashion-mnist", "--stage", "tokenizer"],
    "mvar": ["--preset", "fashion-mnist", "--stage", "generator"],
    "var": ["--preset", "fashion-mnist", "--stage", "generator", "--arch", "var"],
}
# The shipped models' default sampling setting (sample.py, the notebooks): the one that drew
# them best, measured with benchmarks/sample_quality.py (benchmarks/RESULTS.md, "The shipped weights").
SAMPLING = {"guidance": 3.0, "top_k": 0, "top_p": 0.0}
# The fixed slice of the test set the regression tests use.
N_IMAGES, N_TOKENS, SAMPLE_SEED = 32, 512, 0


def train_all(run: Path) -> dict:
    """Step 1: run each command unless its checkpoint is finished. -> {name: wall seconds}, kept
    in RUN/wall_times.json across invocations (a resumed command adds its time)."""
    times_path = run / "wall_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for name, args in COMMANDS.items():
        ckpt = run / ("tokenizer.pt" if name == "tokenizer" else f"{name}.pt")
        if ckpt.exists() and runtime.load_checkpoint(ckpt, "tokenizer" if name == "tokenizer" else "generator")["done"]:
            continue
        cmd = [sys.executable, "train.py", *args, "--out_dir", str(run)]
        print("running:", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        times[name] = times.get(name, 0.0) + time.time() - t0
        runtime.write_json(times, times_path)
    return times


def shippable_copy(ck: dict, **extra) -> dict:
    """A finished train.py checkpoint -> the weights-only copy that weights/ ships: the config,
    the class names and the weights, floating tensors in float16 (half the bytes; load_state_dict
    casts them back to float32), without the optimizer state, RNG states and loss history.
    runtime.load_trained_tokenizer / load_generator read it like the checkpoint it came from."""
    if not ck.get("done"):
        raise ValueError(f"only a finished run can be shipped (this one is at step {ck.get('step')} "
                         f"of {ck.get('total_steps')})")
    half = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    keep = {k: ck[k] for k in ("kind", "config", "class_names", "tokenizer_path", "step", "total_steps")
            if k in ck}
    return {**keep, "model": half, "done": True, **extra}


def ship(run: Path, dest: Path) -> None:
    """Step 2: RUN/{tokenizer,mvar,var}.pt -> weights-only float16 copies in dest/. A generator
    names its tokenizer by sha256, so the tokenizer goes first."""
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = runtime.load_checkpoint(run / "tokenizer.pt", "tokenizer")
    runtime.save_checkpoint(shippable_copy(tokenizer), dest / "tokenizer.pt")
    sha = runtime.file_digest(dest / "tokenizer.pt")
    for arch in ("mvar", "var"):
        ck = runtime.load_checkpoint(run / f"{arch}.pt", "generator")
        runtime.save_checkpoint(shippable_copy(ck, tokenizer_sha256=sha, sampling=SAMPLING),
                                dest / f"{arch}.pt")


@torch.no_grad()
def measure(tokenizer, generators: dict, images, image_labels, tokens, token_labels) -> dict:
    """What the regression tests compare: the tokenizer's token maps of `images` (uint8
    (n, Cimg, S, S)) and its reconstruction PSNR; each generator's teacher-forced loss and
    per-scale accuracy on `tokens` (int (N, L)); and a seeded sample's token maps (one image per
    class, the shipped sampling setting). tests/test_shipped.py calls this same function."""
    pns = tokenizer.cfg.patch_nums
    img = images.float() / 127.5 - 1                                     # uint8 -> [-1, 1]
    idx = tokenizer.img_to_idx(img)
    out = {"tokenizer": {"idx": torch.cat(idx, 1),
                         "psnr_db": psnr(img, tokenizer.idx_to_img(idx)).mean().item()}}
    idx_list = split_scales(tokens.long(), pns)
    teacher = tokenizer.idx_to_teacher_input(idx_list)
    for arch, model in generators.items():
        loss, acc = compute_loss(model(token_labels, teacher), idx_list)
        labels = torch.arange(model.cfg.num_classes)
        sampled = model.sample_tokens(tokenizer, labels, SAMPLING["guidance"], SAMPLING["top_k"], SAMPLING["top_p"],
                                      generator=torch.Generator().manual_seed(SAMPLE_SEED))
        out[arch] = {"loss": loss.item(), "per_scale_acc": acc.tolist(),
                     "sample_idx": torch.cat(sampled["idx"], 1)}
    return out


def load_shipped(folder: Path = runtime.SHIPPED):
    """-> tokenizer, {"mvar": model, "var": model}, every one in eval mode on the CPU."""
    gens = {arch: runtime.load_generator(folder / f"{arch}.pt") for arch in ("mvar", "var")}
    return gens["mvar"][1], {arch: g[0] for arch, g in gens.items()}


def record_reference(run: Path, tokenizer, generators) -> dict:
    """Step 3: the fixed test slice and what the shipped models compute on it ->
    tests/reference/fashion_mnist_shipped.pt (about 100 KB)."""
    cfg = train.make_config("fashion-mnist")
    test = data.load_dataset(cfg, "test", download_ok=False)
    images = torch.stack([test[i][0] for i in range(N_IMAGES)])          # (n, 1, 28, 28) in [-1, 1]
    images = ((images + 1) * 127.5).round().to(torch.uint8)              # the IDX file's bytes
    cache = torch.load(run / "tokens.pt", weights_only=True, mmap=True)["test"]
    ref = {"images": images, "image_labels": test.labels[:N_IMAGES].clone(),
           "tokens": cache["idx"][:N_TOKENS].clone(), "token_labels": cache["labels"][:N_TOKENS].clone()}
    ref["expected"] = measure(tokenizer, generators, ref["images"], ref["image_labels"], ref["tokens"],
                              ref["token_labels"])
    runtime.save_checkpoint(ref, REFERENCE)
    return ref


def evaluate(run: Path, tokenizer, generators) -> dict:
    """Step 4: validation loss of the shipped models on all 10,000 test images, and the
    classifier's accuracy on 50 samples per class drawn with SAMPLING."""
    test = data.TokenDataset(torch.load(run / "tokens.pt", weights_only=True, mmap=True)["test"])
    res = {}
    for arch, model in generators.items():
        res[arch] = train.eval_generator(model, tokenizer, test, 500, 0, torch.device("cpu"), None)
        res[arch]["run_fp32"] = json.loads((run / f"{arch}_eval.json").read_text())
    res["tokenizer"] = json.loads((run / "tokenizer_eval.json").read_text())
    # sample_quality writes its classifier and JSON beside the checkpoint: score copies.
    scratch = run / "shipped"
    shutil.copytree(runtime.SHIPPED, scratch, dirs_exist_ok=True)
    import sample_quality
    q = sample_quality.main(["--ckpt", str(scratch / "mvar.pt"), "--ckpt2", str(scratch / "var.pt"),
                             "--per_class", "50", "--device", "cpu"])
    res["classified"] = {r["name"]: r["accuracy"]["grey"] for r in q["rows"]}
    return res


def write_provenance(dest: Path, times: dict, res: dict) -> None:
    """Step 5: PROVENANCE.md (for people) and provenance.json (for the tests and RESULTS)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sizes = {p.name: p.stat().st_size for p in sorted(dest.glob("*.pt"))}
    info = {"commit": commit, "commands": {k: "python train.py " + " ".join(v) for k, v in COMMANDS.items()},
            "wall_seconds": times, "sampling": SAMPLING, "file_bytes": sizes, **res}
    runtime.write_json(info, dest / "provenance.json")
    fmt = lambda s: f"{int(s // 60)}:{int(s % 60):02d}" if s else "?"
    acc = lambda a: " / ".join(f"{100 * x:.1f}" for x in a)
    lines = [
        "# The shipped Fashion-MNIST models",
        "",
        "Made by `python weights/make.py` (run it again after an intentional change to the models;",
        "`tests/test_shipped.py` says when). Weights only, float16, each file loads with",
        "`torch.load(..., weights_only=True)` and through `runtime.load_generator` /",
        "`runtime.load_trained_tokenizer`.",
        "",
        f"- code: commit `{commit[:12]}` (the commit that ran `weights/make.py`; the training ran",
        "  on the same model code)",
        "- files: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in sizes.items()),
        f"- default sampling (sample.py, notebooks): guidance {SAMPLING['guidance']:g}, top-k {SAMPLING['top_k']}, "
        f"top-p {SAMPLING['top_p']:g}",
        "",
        "| model | command | wall (2-core CPU) | on the 10,000 test images | samples classified |",
        "|---|---|---|---|---|",
        f"| tokenizer | `{info['commands']['tokenizer']}` | {fmt(times.get('tokenizer'))} | PSNR "
        f"{res['tokenizer']['psnr_db']:.2f} dB | - |",
    ]
    for arch in ("mvar", "var"):
        r = res[arch]
        clf = next((v for k, v in res["classified"].items() if k.startswith(arch)), None)
        lines.append(f"| {arch} | `{info['commands'][arch]}` | {fmt(times.get(arch))} | val loss "
                     f"{r['val_loss']:.4f} (float32: {r['run_fp32']['val_loss']:.4f}); accuracy per scale "
                     f"{acc(r['per_scale_acc'])} % | {100 * clf:.1f}% of 500 |")
    real = res["classified"].get("real test images")
    lines += ["", f"The classifier (benchmarks/sample_quality.py's small CNN) gets {100 * real:.1f}% of the "
              "real test images right.", ""]
    if times.get("note"):                      # how this run's wall times were taken, if unusual
        lines += [times["note"], ""]
    (dest / "PROVENANCE.md").write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(RUN), help="run folder to train in (default %(default)s)")
    args = p.parse_args(argv)
    run = Path(args.run)
    times = train_all(run)
    ship(run, runtime.SHIPPED)
    torch.manual_seed(0)
    tokenizer, generators = load_shipped()
    record_reference(run, tokenizer, generators)
    print(f"wrote {runtime.SHIPPED}/*.pt and {REFERENCE}")
    write_provenance(runtime.SHIPPED, times, evaluate(run, tokenizer, generators))
    print(f"wrote {runtime.SHIPPED / 'PROVENANCE.md'}")


if __name__ == "__main__":
    main()
