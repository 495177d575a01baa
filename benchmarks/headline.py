"""The M-VAR paper's headline, measured with this code: fewer parameters *and* faster inference
than VAR. For example M-VAR-d24 (about 1.5B parameters) against VAR-d30 (about 2.0B).

RANDOM WEIGHTS. Speed and memory do not depend on what the weights are, so no checkpoint is
needed; quality is not measured here (the paper's FID comes from the released, trained models).

Per setting, side by side in one run, every case in its own fresh Python process:
  params, attention query-key pairs per layer (M-VAR attends inside each scale, VAR over all
  coarser scales too), the time to sample the token maps (`MVAR.sample_tokens`: every scale, CFG
  1.5 so the network sees 2x the rows, top-k 900, top-p 0.96, the tokenizer's decoder not
  included), the fp32 weights' size, and the peak memory the sampling run added on top of them
  (measured as in benchmarks/scan.py: peak RSS on the CPU, torch.cuda.max_memory_allocated on
  CUDA). Their sum is about what the machine needs.

Settings (the full run; each pair's time ratio and whether "fewer params and faster" holds):
  256px pyramid (L = 680):   M-VAR-d24 vs VAR-d30,  M-VAR-d16 vs VAR-d16,  batch 1 and batch 16
  512px pyramid (L = 2,240): M-VAR-d16 vs VAR-d16,                          batch 1 and batch 16

    python benchmarks/headline.py --quick           # d16 vs d16, 256px, batch 1: under 2 minutes
    python benchmarks/headline.py --threads 2       # the full table: about an hour on 2 CPU cores
    python benchmarks/headline.py --settings 256px:16:16 --batches 16     # one pair, one batch size
    python benchmarks/headline.py --device cuda

The d30 model alone holds 7.5 GB of fp32 weights; the full table needs about 20 GB of free memory
(VAR-d30 at batch 16 added 11.5 GB while sampling, benchmarks/RESULTS.md).
Time is one sampling run after a one-image warm-up (--repeats for the median of more).
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mvar import MVAR, MVARConfig, attention_pairs  # noqa: E402
from tokenizer import MultiScaleVQVAE, tokenizer_config  # noqa: E402
from generate import PYRAMIDS  # noqa: E402  (benchmarks/generate.py, beside this file)
from scan import proc_status_bytes  # noqa: E402

# (pyramid, M-VAR depth, VAR depth): each pair is run at every batch size.
FULL = [("256px", 24, 30), ("256px", 16, 16), ("512px", 16, 16)]
QUICK = [("256px", 16, 16)]


def run_case(case: dict) -> dict:
    """Child process: build one random-weight model (the official sizes for its depth) and time
    its sampler on case["batch"] images."""
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    torch.manual_seed(0)
    patch_nums = PYRAMIDS[case["pyramid"]]
    # The real quantizer (V 4096, Cvae 32) on a thin conv stack: sampling only uses the codebook
    # and the phi convs, so the autoencoder's width does not matter.
    tok = MultiScaleVQVAE(tokenizer_config("var256", ch=32, image_size=16 * patch_nums[-1],
                                           patch_nums=patch_nums)).to(device).eval()
    with torch.device(device):
        model = MVAR(MVARConfig(arch=case["arch"], depth=case["depth"], patch_nums=patch_nums)).eval()
    labels = torch.arange(case["batch"], device=device) % 1000

    def sample(lab) -> float:
        gen = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.sample_tokens(tok, lab, guidance=1.5, top_k=900, top_p=0.96, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    sample(labels[:1])                                  # warm-up: kernels, thread pools
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")   # peak RSS := current RSS
            base = proc_status_bytes("VmRSS")
        except OSError:                                     # not allowed here: memory unknown
            base = None
    times = [sample(labels)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = float("nan") if base is None else proc_status_bytes("VmHWM") - base
    times += [sample(labels) for _ in range(case["repeats"] - 1)]
    return {"params": sum(p.numel() for p in model.parameters()), "seconds": statistics.median(times),
            "peak_gb": peak / 2**30, "pairs": attention_pairs(patch_nums, case["arch"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only d16 vs d16 at 256px, batch 1")
    ap.add_argument("--settings", nargs="+", default=[":".join(map(str, s)) for s in FULL],
                    help="pairs to run, as PYRAMID:MVAR_DEPTH:VAR_DEPTH")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="images per batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--case", help=argparse.SUPPRESS)   # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.quick:
        settings, batches = QUICK, [1]
    else:
        try:
            settings = [(p, int(dm), int(dv)) for p, dm, dv in (s.split(":") for s in args.settings)]
        except ValueError:
            ap.error(f"--settings takes PYRAMID:MVAR_DEPTH:VAR_DEPTH, e.g. 256px:24:30; got {args.settings}")
        if any(p not in PYRAMIDS for p, _, _ in settings):
            ap.error(f"--settings: the pyramid must be one of {', '.join(PYRAMIDS)}")
        batches = args.batches

    print(f"RANDOM WEIGHTS (speed and memory only). torch {torch.__version__}, device {args.device}, "
          f"{args.threads} thread(s), fp32, CFG 1.5, top-k 900, top-p 0.96, median of {args.repeats}")
    hdr = (f"{'pyramid':7} {'batch':>5} {'model':10} {'params':>7} {'attn pairs':>11} {'time s':>8} "
           f"{'weights GB':>10} {'+ sampling GB':>13} | {'M-VAR/VAR: params':>17} {'time':>5} "
           f"{'weights + sampling':>18}  holds?")
    print(hdr + "\n" + "-" * len(hdr))
    for pyramid, d_mvar, d_var in settings:
        for batch in batches:
            res = {}
            for arch, depth in (("mvar", d_mvar), ("var", d_var)):
                case = dict(pyramid=pyramid, arch=arch, depth=depth, batch=batch, repeats=args.repeats,
                            threads=args.threads, device=args.device)
                out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"case {case} failed:\n{out.stderr[-2000:]}")
                res[arch] = r = json.loads(out.stdout.strip().splitlines()[-1])
                name = f"{'M-VAR' if arch == 'mvar' else 'VAR'}-d{depth}"
                print(f"{pyramid:7} {batch:5d} {name:10} {r['params'] / 1e9:6.2f}B {r['pairs']:11,d} "
                      f"{r['seconds']:8.2f} {r['params'] * 4 / 2**30:10.2f} {r['peak_gb']:13.2f} |",
                      end="" if arch == "var" else "\n", flush=True)
            m, v = res["mvar"], res["var"]
            total = {a: r["params"] * 4 / 2**30 + r["peak_gb"] for a, r in res.items()}
            measured = not any(math.isnan(t) for t in total.values())  # nan: peak not measurable
            memory = f"{total['mvar'] / total['var']:18.2f}" if measured else f"{'-':>18}"
            fewer, faster = m["params"] < v["params"], m["seconds"] < v["seconds"]
            print(f" {m['params'] / v['params']:17.2f} {m['seconds'] / v['seconds']:5.2f} {memory}  "
                  f"{'yes' if fewer and faster else 'no'}", flush=True)


if __name__ == "__main__":
    main()
