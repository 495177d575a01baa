"""What crosses the scales, retrained: five generators trained alike, each over several seeds.

M-VAR's idea is a decoupling: attention works inside a scale, and a Mamba-2 layer carries what a
scale needs from the coarser ones. But every scale also receives the coarser scales through its
input (the teacher input: the picture drawn so far, resized to the scale). Notebook 05 cuts paths
at test time in the shipped models; this script trains models that never had them:

  mvar        M-VAR: attention inside a scale, Mamba over the whole sequence (the shipped recipe)
  var         VAR: block-causal attention (a scale sees itself and every coarser scale)
  mvar-reset  M-VAR with Mamba's state emptied at every scale boundary, in training and in
              sampling: nothing but the teacher input crosses the scales
  attn-only   attention inside a scale, no Mamba: again only the teacher input crosses
  mamba-only  M-VAR without its attention: Mamba alone mixes the tokens, causally in raster order

Every run is train.py's `--preset fashion-mnist --stage generator` on the shipped tokenizer's token
cache, with the preset's whole schedule (4,737 steps: warm-up, then a linear decay) *stopped* at
--steps. So a run of this study is the first --steps steps of the run that made the shipped
weights (seed 0, `mvar` and `var`), and --steps 4737 would finish it; the ranking at the stop can
be checked against the shipped models at the end. The variants are built here, from mvar.py's
modules (`build_variant`), as notebook 05 builds its cuts: mvar.py is not changed.

Each run reports:
  - parameters (those that reach the output) and training FLOPs (counted by
    benchmarks/train_step.step_flops on one step, times the steps);
  - a validation curve (every --eval_every steps, the first 2,000 test images) and the training
    loss history;
  - at the stop: per-scale validation loss and accuracy on the 10,000 test images
    (train.eval_generator), and 1,000 samples (100 per class, the preset's guidance 3) judged by
    benchmarks/sample_quality.py's classifier: recognised %, Frechet distance and diversity in
    its feature space.

    python benchmarks/decoupling.py                    # the study: 5 variants x 2 seeds (~90 min, 2 cores)
    python benchmarks/decoupling.py --steps 300 --seeds 0 --out runs/decoupling-small
    python benchmarks/decoupling.py --report           # the table and figure from the finished runs

Everything is resumable: re-running the command skips finished work and resumes unfinished runs
from their checkpoints (train.py's resume, bit-identical). Runs go to --out (runs/decoupling/:
one folder per variant and seed, with train.py's files); the summary to --results
(benchmarks/results/decoupling.json, decoupling_curves.png). Runs are spread over --workers
processes of one thread each (two torch threads per job on a busy 2-core machine are slower).
Needs Fashion-MNIST (as train.py finds it) and the shipped tokenizer (weights/fashion-mnist/).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import data  # noqa: E402
import runtime  # noqa: E402
import sample_quality  # noqa: E402
import train  # noqa: E402
from mvar import MVAR, MVARConfig  # noqa: E402
from sample import sample_images  # noqa: E402
from train_step import step_flops  # noqa: E402

VARIANTS = {
    "mvar": "M-VAR",
    "var": "VAR",
    "mvar-reset": "M-VAR, Mamba reset per scale",
    "attn-only": "attention inside a scale only",
    "mamba-only": "Mamba only (no attention)",
}
ARCH = {"mvar": "mvar", "var": "var", "mvar-reset": "mvar", "attn-only": "var", "mamba-only": "mvar"}
EVAL_IMAGES_CURVE = 2000          # test images behind each point of the validation curve


# ============================================================================================
# 1. The variants, built from mvar.py's modules
# ============================================================================================

def mamba_reset(forward, spans, seq_len):
    """Mamba2.forward (bound) -> the same layer with an empty state at every scale boundary.
    Teacher-forced (u holds all seq_len tokens): each scale's span runs on its own, from a fresh
    state (conv and SSM). Sampling (u holds one scale): the state carried from the coarser scales
    is dropped. Returns what Mamba2.forward returns: (y, state after the last token)."""
    def reset_forward(u, state=None):
        if u.shape[1] == seq_len:
            pieces = [forward(u[:, start:end]) for start, end in spans]
            return torch.cat([y for y, _ in pieces], dim=1), pieces[-1][1]
        return forward(u)
    return reset_forward


class NoAttention(nn.Module):
    """Stands in for ScaleAttention in `mamba-only`: adds nothing, has no parameters.
    x (B, L, C), spans -> zeros (B, L, C)."""

    def forward(self, x, spans):
        return torch.zeros_like(x)


def build_variant(name: str, mcfg) -> MVAR:
    """The generator of variant `name` for the model config mcfg (its arch is set here)."""
    model = MVAR(dataclasses.replace(mcfg, arch=ARCH[name]))
    for block in model.blocks:
        if name == "mvar-reset":
            block.mamba.forward = mamba_reset(block.mamba.forward, model.spans, model.cfg.seq_len)
        elif name == "attn-only":        # VAR's block (no Mamba) with M-VAR's attention rule
            block.attn.block_causal = False
        elif name == "mamba-only":
            block.attn = NoAttention()
    return model


def live_parameters(name: str, model: MVAR) -> int:
    """Parameters that reach the output. `mamba-only` keeps each block's AdaLN rows of the
    attention branch (its gate, gain and shift: 3C rows of C weights and a bias), which get no
    gradient; they are not counted."""
    n = sum(p.numel() for p in model.parameters())
    if name == "mamba-only":
        C = model.cfg.width
        n -= len(model.blocks) * 3 * C * (C + 1)
    return n


# ============================================================================================
# 2. One run: train (resumably) to --steps, with a validation curve, then judge it
# ============================================================================================

def run_dir(args, name: str, seed: int) -> Path:
    return Path(args.out) / f"{name}-s{seed}"


def train_config(args, name: str, seed: int) -> train.TrainConfig:
    """The preset's generator stage, for this variant and seed; checkpoints only when stopped."""
    return train.make_config("fashion-mnist", stage="generator", arch=ARCH[name], seed=seed,
                             out_dir=str(run_dir(args, name, seed)), ckpt_every=10**9,
                             image_every=10**9, data_dir=args.data_dir, subset=args.subset)


def load_run(name: str, path: Path):
    """RUN/<arch>.pt of a variant -> (model in eval mode, tokenizer, checkpoint)."""
    ck = runtime.load_checkpoint(path, "generator")
    model = build_variant(name, MVARConfig.from_dict(ck["config"]["model"]))
    runtime.load_state_dict_checked(model, ck["model"], what=f"{name} generator")
    tok, _ = runtime.load_trained_tokenizer(path.parent / "tokenizer.pt")
    return model.eval(), tok, ck


def train_run(args, name: str, seed: int) -> dict:
    """Train variant `name` with `seed` to args.steps of the preset's schedule, evaluating the
    validation loss every args.eval_every steps -> RUN/curve.json. Resumes where it stopped."""
    cfg, proc = train_config(args, name, seed), runtime.DistInfo()
    run = Path(cfg.out_dir)
    curve_path = run / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    tok, _ = runtime.load_trained_tokenizer(run / "tokenizer.pt")
    cache = train.token_cache(cfg, proc, tok)
    test = data.TokenDataset(cache["test"])
    # train_generator builds its model with train.MVAR(config): build this variant instead.
    train.MVAR = lambda mcfg: build_variant(name, mcfg)
    done = {point["step"] for point in curve}
    for stop in list(range(args.eval_every, args.steps, args.eval_every)) + [args.steps]:
        if stop in done:
            continue
        path = run / f"{cfg.arch}.pt"
        at = runtime.load_checkpoint(path, "generator")["step"] if path.exists() else 0
        if at < stop:
            train.train_generator(dataclasses.replace(cfg, stop_after=stop - at), proc, tok)
        model, _, ck = load_run(name, path)
        assert ck["step"] == stop, (ck["step"], stop)
        res = train.eval_generator(model, tok, test, 500, EVAL_IMAGES_CURVE, proc.device, None)
        curve.append({"step": stop, "val_loss": res["val_loss"], "per_scale_loss": res["per_scale_loss"],
                      "per_scale_acc": res["per_scale_acc"]})
        runtime.write_json(curve, curve_path)
        print(f"{name} seed {seed}: step {stop}, validation loss ({EVAL_IMAGES_CURVE} images) "
              f"{res['val_loss']:.4f}", flush=True)
    return {"curve": curve}


@torch.no_grad()
def judge_run(args, name: str, seed: int) -> dict:
    """The stopped run's numbers: parameters, FLOPs, the 10,000-image evaluation, the samples
    judged by the classifier -> RUN/result.json (and returned)."""
    cfg = train_config(args, name, seed)
    run = Path(cfg.out_dir)
    model, tok, ck = load_run(name, run / f"{cfg.arch}.pt")
    cache = train.token_cache(cfg, runtime.DistInfo(), tok)
    res = train.eval_generator(model, tok, data.TokenDataset(cache["test"]), 500, 0, torch.device("cpu"), None)

    # Training FLOPs: one step of the preset's batch (random tokens: the count does not depend on
    # them), times the steps. step_flops runs a real step, so on a throwaway copy of the variant.
    with torch.enable_grad():
        fresh = build_variant(name, model.cfg).train()
        B, L, first = cfg.gen_batch, model.cfg.seq_len, model.cfg.patch_nums[0] ** 2
        inputs = (torch.zeros(B, dtype=torch.long), torch.randn(B, L - first, model.cfg.Cvae),
                  torch.zeros(B, L, dtype=torch.long))
        opt = torch.optim.AdamW(train.param_groups(fresh, cfg.weight_decay), lr=1e-4)
        flops_per_step = step_flops(fresh, opt, inputs, cfg.grad_clip)

    judge = torch.load(Path(args.out) / "judge.pt", weights_only=True)
    clf = sample_quality.SmallCNN(1, judge["num_classes"], judge["image_size"])
    clf.load_state_dict(judge["classifier"])
    M = judge["num_classes"]
    labels = torch.arange(M).repeat_interleave(args.per_class)
    settings = {"guidance": cfg.guidance, "top_k": cfg.top_k, "top_p": cfg.top_p, "more_smooth": False}
    images, _, _ = sample_images(model, tok, labels, 250, settings, torch.device("cpu"), seed=0)
    x = images * 2 - 1                                             # the classifier's [-1, 1]
    feats = sample_quality.features(clf, x, "cpu")
    spread = sample_quality.class_spread(feats, labels, M) / judge["real_spread"]
    result = {
        "variant": name, "seed": seed, "step": ck["step"], "schedule_steps": ck["total_steps"],
        "parameters": live_parameters(name, model), "flops_per_step": flops_per_step,
        "train_flops": flops_per_step * ck["step"], "val_loss": res["val_loss"],
        "per_scale_loss": res["per_scale_loss"], "per_scale_acc": res["per_scale_acc"],
        "test_images": res["tokens_images"], "samples": len(labels), "guidance": cfg.guidance,
        "recognised": (sample_quality.predict(clf, x, "cpu") == labels).float().mean().item(),
        "frechet_distance": sample_quality.frechet_distance(feats, judge["train_features"]),
        "diversity": spread.mean().item(),
        "history": ck["history"],
    }
    runtime.write_json(result, run / "result.json")
    return result


def finished(args, name: str, seed: int) -> bool:
    """Has this run been trained to args.steps and judged?"""
    path = run_dir(args, name, seed) / "result.json"
    return path.exists() and json.loads(path.read_text())["step"] == args.steps


def worker(args, name: str, seed: int) -> None:
    """One job: train, then judge (each step skipped when its file says it is done)."""
    torch.set_num_threads(1)
    train_run(args, name, seed)
    if not finished(args, name, seed):
        r = judge_run(args, name, seed)
        print(f"{name} seed {seed}: val loss {r['val_loss']:.4f}, recognised {100 * r['recognised']:.1f}%",
              flush=True)


# ============================================================================================
# 3. The study: shared inputs, the jobs, the summary
# ============================================================================================

def prepare(args) -> None:
    """Once: each run folder gets the shipped tokenizer and its seed's token cache (train.py's,
    encoded once per seed and linked into the runs); the classifier that judges the samples and
    its reference features -> OUT/judge.pt."""
    out = Path(args.out)
    for seed in args.seeds:
        first = run_dir(args, args.variants[0], seed)
        for name in args.variants:
            run = run_dir(args, name, seed)
            run.mkdir(parents=True, exist_ok=True)
            if not (run / "tokenizer.pt").exists():
                shutil.copyfile(runtime.SHIPPED / "tokenizer.pt", run / "tokenizer.pt")
            if run != first and not (run / "tokens.pt").exists() and (first / "tokens.pt").exists():
                os.link(first / "tokens.pt", run / "tokens.pt")
            if not (run / "tokens.pt").exists():     # encode (about a minute), then share
                tok, _ = runtime.load_trained_tokenizer(run / "tokenizer.pt")
                train.token_cache(train_config(args, name, seed), runtime.DistInfo(), tok)
    if (out / "judge.pt").exists():
        return
    cfg = train_config(args, args.variants[0], args.seeds[0])
    train_x, train_y = sample_quality.split_tensors(data.load_dataset(cfg, "train", download_ok=False))
    test_x, test_y = sample_quality.split_tensors(data.load_dataset(cfg, "test", download_ok=False))
    M = int(train_y.max()) + 1
    opts = types.SimpleNamespace(steps=400, seed=0)
    clf, _ = sample_quality.get_classifier(cfg, "grey", train_x, train_y, M, opts, "cpu", out)
    pick = torch.cat([torch.nonzero(test_y == c).flatten()[:args.per_class] for c in range(M)])
    real = sample_quality.features(clf, test_x[pick], "cpu")
    train_features = sample_quality.features(clf, train_x, "cpu")
    torch.save({"classifier": clf.state_dict(), "num_classes": M, "image_size": train_x.shape[-1],
                "train_features": train_features,
                "real_spread": sample_quality.class_spread(real, test_y[pick], M),
                "real": {"recognised": (sample_quality.predict(clf, test_x, "cpu") == test_y).float().mean().item(),
                         "frechet_distance": sample_quality.frechet_distance(real, train_features),
                         "diversity": 1.0, "images": len(pick)}}, out / "judge.pt")


def run_jobs(args) -> None:
    """Every (variant, seed) job not finished yet, --workers at a time, one thread each; the
    most expensive first, so that the two workers finish together. Logs: RUN/log.txt."""
    cost = {"mvar-reset": 5, "mvar": 4, "mamba-only": 3, "var": 2, "attn-only": 1}
    jobs = sorted(((n, s) for s in args.seeds for n in args.variants if not finished(args, n, s)),
                  key=lambda j: (-cost[j[0]], j[1]))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = ["--out", args.out, "--steps", str(args.steps), "--eval_every", str(args.eval_every),
              "--subset", str(args.subset), "--per_class", str(args.per_class)]
    if args.data_dir:
        common += ["--data_dir", args.data_dir]
    running, t0 = [], time.time()
    while jobs or running:
        while jobs and len(running) < args.workers:
            name, seed = jobs.pop(0)
            log = open(run_dir(args, name, seed) / "log.txt", "a")
            cmd = [sys.executable, __file__, "--worker", name, str(seed), *common]
            running.append((name, seed, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"[{(time.time() - t0) / 60:5.1f} min] started {name} seed {seed}", flush=True)
        time.sleep(2)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            job[3].close()
            name, seed, proc = job[:3]
            if proc.returncode:
                raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}): see "
                                 f"{run_dir(args, name, seed) / 'log.txt'}")
            print(f"[{(time.time() - t0) / 60:5.1f} min] finished {name} seed {seed}", flush=True)


def summarise(args) -> dict:
    """Per variant, mean and spread (min .. max over seeds) of every number -> the JSON, the
    table (printed) and the curves figure."""
    results = {n: [json.loads((run_dir(args, n, s) / "result.json").read_text()) for s in args.seeds]
               for n in args.variants}
    curves = {n: [json.loads((run_dir(args, n, s) / "curve.json").read_text()) for s in args.seeds]
              for n in args.variants}
    judge = torch.load(Path(args.out) / "judge.pt", weights_only=True)
    keys = ("val_loss", "recognised", "frechet_distance", "diversity")
    stat = lambda xs: {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "values": xs}
    summary = {"steps": args.steps, "schedule_steps": results[args.variants[0]][0]["schedule_steps"],
               "seeds": args.seeds, "eval_every": args.eval_every, "curve_images": EVAL_IMAGES_CURVE,
               "samples": results[args.variants[0]][0]["samples"], "real_images": judge["real"],
               "command": (f"python benchmarks/decoupling.py --steps {args.steps} --eval_every {args.eval_every} "
                           f"--seeds {' '.join(map(str, args.seeds))}"), "variants": {}}
    for n, rs in results.items():
        K = len(rs[0]["per_scale_loss"])
        summary["variants"][n] = {
            "label": VARIANTS[n], "parameters": rs[0]["parameters"], "train_flops": rs[0]["train_flops"],
            **{k: stat([r[k] for r in rs]) for k in keys},
            "per_scale_loss": [stat([r["per_scale_loss"][k] for r in rs]) for k in range(K)],
            "per_scale_acc": [stat([r["per_scale_acc"][k] for r in rs]) for k in range(K)],
            "runs": [{k: v for k, v in r.items() if k != "history"} for r in rs],
            "curves": [[[p["step"], p["val_loss"]] for p in c] for c in curves[n]],
            "train_loss": [[h[:2] for h in r["history"]] for r in rs],
        }
    print_table(summary)
    results_dir = Path(args.results)
    runtime.write_json(summary, results_dir / "decoupling.json")
    plot(summary, results_dir / "decoupling_curves.png")
    print(f"wrote {results_dir / 'decoupling.json'} and {results_dir / 'decoupling_curves.png'}")
    return summary


def print_table(summary: dict) -> None:
    pm = lambda s, f, t=1: f"{f.format(t * s['mean'])} ({f.format(t * s['min'])}-{f.format(t * s['max'])})"
    print(f"\n{summary['steps']} of the preset's {summary['schedule_steps']} steps, seeds {summary['seeds']}: "
          "mean (min-max over seeds)")
    print(f"{'variant':32s} {'params':>7s} {'TFLOP':>6s} {'val loss':>22s} {'recognised %':>18s} "
          f"{'distance':>18s} {'diversity':>18s}")
    for v in summary["variants"].values():
        print(f"{v['label']:32s} {v['parameters'] / 1e6:6.2f}M {v['train_flops'] / 1e12:6.1f} "
              f"{pm(v['val_loss'], '{:.4f}'):>22s} {pm(v['recognised'], '{:.1f}', 100):>18s} "
              f"{pm(v['frechet_distance'], '{:.1f}'):>18s} {pm(v['diversity'], '{:.2f}'):>18s}")
    print("per-scale validation loss (mean over seeds):")
    for v in summary["variants"].values():
        print(f"  {v['label']:32s} " + " ".join(f"{s['mean']:7.3f}" for s in v["per_scale_loss"]))
    print("per-scale accuracy % (mean over seeds):")
    for v in summary["variants"].values():
        print(f"  {v['label']:32s} " + " ".join(f"{100 * s['mean']:7.1f}" for s in v["per_scale_acc"]))


def plot(summary: dict, path: Path) -> None:
    """Three panels against the step, one colour per variant, one line per seed: the training loss
    (a moving mean), the validation loss, and the validation loss minus M-VAR's of the same seed."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.2))
    ax_train, ax_val, ax_diff = fig.subplots(1, 3)
    base = summary["variants"]["mvar"]["curves"] if "mvar" in summary["variants"] else None
    for i, v in enumerate(summary["variants"].values()):
        for seed, (hist, curve) in enumerate(zip(v["train_loss"], v["curves"])):
            steps, losses = zip(*hist) if hist else ((), ())
            w = 10                                          # a moving mean over 10 history points
            smooth = [sum(losses[max(0, j - w + 1):j + 1]) / len(losses[max(0, j - w + 1):j + 1])
                      for j in range(len(losses))]
            label = v["label"] if seed == 0 else None
            ax_train.plot(steps, smooth, color=f"C{i}", alpha=0.8, label=label)
            ax_val.plot(*zip(*curve), "o-", color=f"C{i}", alpha=0.8, ms=3, label=label)
            if base:
                ax_diff.plot([s for s, _ in curve], [a - b for (_, a), (_, b) in zip(curve, base[seed])],
                             "o-", color=f"C{i}", alpha=0.8, ms=3, label=label)
    ends = [min(line.get_ydata()) for line in ax_train.lines if len(line.get_ydata())]
    if ends:
        ax_train.set_ylim(min(ends) - 0.05, min(ends) + 1.0)      # the part where the variants differ
    ax_train.set_title("training loss (moving mean of 100 steps)")
    ax_val.set_title(f"validation loss ({summary['curve_images']} test images)")
    ax_diff.set_title("validation loss minus M-VAR's (same seed)")
    ax_diff.axhline(0, color="k", lw=0.8)
    for ax in (ax_train, ax_val, ax_diff):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats per token)")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.suptitle(f"{len(summary['seeds'])} seeds per variant (one line each); the preset's schedule "
                 f"of {summary['schedule_steps']} steps, stopped at {summary['steps']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1800, help="stop every run at this step of the schedule")
    p.add_argument("--eval_every", type=int, default=300, help="steps between validation-curve points")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--workers", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--out", default=str(ROOT / "runs" / "decoupling"), help="run folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="summary folder")
    p.add_argument("--data_dir", default="", help="Fashion-MNIST folder, if train.py does not find it")
    p.add_argument("--subset", type=int, default=0, help="only the first N images of each split (tests)")
    p.add_argument("--per_class", type=int, default=100, help="samples judged per class")
    p.add_argument("--report", action="store_true", help="only summarise the finished runs")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval_every must be positive")
    if args.worker:
        return worker(args, args.worker[0], int(args.worker[1]))
    if not args.report:
        t0 = time.time()
        prepare(args)
        run_jobs(args)
        print(f"study: {(time.time() - t0) / 60:.1f} min wall")
    summarise(args)


if __name__ == "__main__":
    runtime.exit_on_error(main)
