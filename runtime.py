"""runtime.py -- starting, saving and resuming runs; loading weights. Not needed to understand M-VAR.

The plumbing of train.py and sample.py; nothing in this file is part of the method. It holds:

  * how a run starts: torchrun / DDP set-up, mixed precision, the command line of a config
    dataclass (option, make_config_of, parse_config_args) and which of train.py's fields define
    a stage's result (DATA_FIELDS, STAGE1_FIELDS, STAGE2_FIELDS, LENGTH_FIELDS, RUNTIME_FIELDS);
  * StageRun: everything around a training loop that is not training -- resuming, checkpoints,
    the loss history, the progress bar, and the time budget / --stop_after that ends an
    invocation cleanly;
  * atomic checkpoint files: save_checkpoint / load_checkpoint, and the checks that refuse to
    resume a run under other settings (check_same_run);
  * the random-number-generator states that make a resumed run bit-identical to one that was
    never interrupted (rng_state, gather_rng, restore_rng);
  * loading state dicts with errors a person can act on (load_state_dict_checked);
  * the models of a train.py run folder (load_trained_tokenizer, load_generator), and the trained
    Fashion-MNIST models shipped in weights/fashion-mnist/ (SHIPPED; weights/make.py makes them),
    which the same two functions load;
  * the officially released weights: VAR's tokenizer (load_var_checkpoint) and the M-VAR / VAR
    generators (load_official_checkpoint), with every architecture setting read from the files
    themselves (official_generator_config, var_tokenizer_config; load_official does both);
  * sample.py's command line, its checks, and loading what it samples (parse_sample_args,
    load_sampling_models, pick_classes, parse_classes), with the papers' FID setting (OFFICIAL_FID).

Every file is read with torch.load(weights_only=True): a checkpoint holds only tensors and plain
Python values, so loading one never runs pickled code.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mvar import MVAR, MVARConfig
from tokenizer import MultiScaleVQVAE, TokenizerConfig, tokenizer_config


# --------------------------------------------------------------------------------------------
# Starting a run: processes, devices, precision, the command line
# --------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    """Where this process runs. torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; plain python is
    one process (rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args):                            # rank 0 speaks for everyone
        if self.is_main:
            print(*args)

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU). Each
    process drives the GPU named by LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world, dev)


@contextmanager
def distributed(device: str = "auto"):
    """with distributed(device) as d: ... -- setup_distributed, and torchrun's process group left
    at the end, also after an error (so that every process exits)."""
    d = setup_distributed(device)
    try:
        yield d
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_on_error(main) -> None:
    """Run a script's main(); a bad setting, file or checkpoint ends it with `error: <message>`
    and exit status 2 -- the message says what to fix, and a traceback would only bury it."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device (auto: CUDA, else MPS, else CPU)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (name.startswith("cuda") and not torch.cuda.is_available()) or (name == "mps" and not mps):
        raise ValueError(f"--device {name}: that backend is not available here; use --device cpu")
    return torch.device(name)


def wrap_ddp(model: torch.nn.Module, d: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (it all-reduces the gradients), else the model."""
    if d.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def amp_setup(cfg, device: torch.device):
    """-> (autocast dtype or None, GradScaler or None). bf16 needs no loss scaling; fp16 does."""
    prec = cfg.precision
    if prec == "auto":
        prec = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if prec == "fp32":
        return None, None
    if prec == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return (torch.float16, torch.amp.GradScaler("cuda")) if prec == "fp16" else (torch.bfloat16, None)


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_sync(net: torch.nn.Module, d: DistInfo, last: bool):
    """DDP all-reduces the gradients at every backward unless told not to. With gradient
    accumulation only the last micro-batch needs it: the others run inside net.no_sync()."""
    if d.world_size > 1 and not last and hasattr(net, "no_sync"):
        return net.no_sync()
    return nullcontext()


# The command line of a config dataclass -----------------------------------------------------

def option(default, help: str, choices: tuple | None = None):
    """A config dataclass field with its --help text (and, for a string, the values it allows)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def make_config_of(config_class, presets: dict, preset: str, overrides: dict):
    """presets[preset] with `overrides` applied -> config_class; refuses unknown presets, unknown
    fields and values outside a field's choices. out_dir defaults to runs/<preset>."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    names = {f.name: f for f in dataclasses.fields(config_class)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; see `python train.py --help`")
    cfg = config_class(**{**presets[preset], **overrides, "preset": preset})
    for name, f in names.items():
        allowed = f.metadata.get("choices")
        if allowed and getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    cfg.out_dir = cfg.out_dir or os.path.join("runs", preset)
    return cfg


# Which of train.py's TrainConfig fields define each stage's result: resuming a checkpoint
# written under other values is refused (check_same_run). LENGTH_FIELDS set stage 2's number of
# steps (gen_steps, else gen_epochs x the steps of an epoch): a resume compares the number they
# come to with the checkpoint's total_steps, so the fashion-mnist run folders written before
# gen_steps existed (gen_epochs 2.5264 = 4,737 steps) still resume. RUNTIME_FIELDS only steer
# this invocation -- output, logging, devices, the number of processes / accumulation steps --
# and may change freely. tests/test_train.py checks that every field is in exactly one list.
DATA_FIELDS = ("seed", "dataset", "image_size", "hflip", "subset", "shapes_train", "shapes_test")
STAGE1_FIELDS = DATA_FIELDS + ("tok_preset", "tok_ch", "tok_ch_mult", "tok_z_channels", "vocab_size",
                               "patch_nums", "tok_batch", "tok_lr", "tok_epochs", "tok_l1", "tok_l2",
                               "warmup_frac", "end_lr_ratio", "grad_clip")
STAGE2_FIELDS = DATA_FIELDS + ("arch", "depth", "width", "num_heads", "d_state", "headdim", "expand",
                               "gen_batch", "base_lr", "warmup_frac", "end_lr_ratio", "weight_decay",
                               "weight_decay_end", "grad_clip", "alng", "drop_path", "cond_drop")
LENGTH_FIELDS = ("gen_epochs", "gen_steps")
RUNTIME_FIELDS = ("preset", "stage", "out_dir", "device", "precision", "compile", "max_minutes", "stop_after",
                  "log_every", "ckpt_every", "image_every", "num_workers", "download", "data_dir", "vae_ckpt",
                  "eval_images", "grad_accum", "guidance", "top_k", "top_p", "samples_per_class")


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {s!r}")
    return v in ("1", "true", "yes", "on")


def _tuple_parser(kind):
    def parse(s: str) -> tuple:
        try:
            return tuple(kind(x) for x in s.replace(" ", "").split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list like 1,2,3, got {s!r}")
    return parse


def parse_config_args(argv, config_class, presets: dict, make_config, description: str):
    """Command line -> a config dataclass (train.py's TrainConfig). `--preset` is read first, so
    `--help` shows that preset's defaults; make_config(preset, **fields) builds the result from
    the fields given on the command line (so it can tell a flag given from a preset's value).

    Every field is a flag: `--field value`; booleans also as `--flag` / `--no-flag`;
    tuples as comma lists (`--patch_nums 1,2,4,8`). Unknown flags are an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="tiny")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        pre.error(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    defaults = config_class(**presets[preset])

    parser = argparse.ArgumentParser(
        usage="python train.py [--preset NAME] [--stage tokenizer|generator|all] [--FIELD VALUE ...]",
        description=description + " Presets: " + ", ".join(presets),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(config_class):
        default = getattr(defaults, f.name)
        how = dict(type=type(default), choices=f.metadata.get("choices"))     # a str, int or float
        if isinstance(default, bool):
            how = dict(type=_parse_bool, nargs="?", const=True, metavar="0|1")
        elif isinstance(default, tuple):
            how = dict(type=_tuple_parser(type(default[0]) if default else int), metavar="A,B,...")
        parser.add_argument("--" + f.name, default=default, help=f.metadata["help"], **how)
        if isinstance(default, bool):   # --no-flag too (added second, so --flag's default counts)
            parser.add_argument("--no-" + f.name, dest=f.name, action="store_false", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        flags = [u for u in unknown if u.startswith("-")] or unknown
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(
            u.split("=")[0], known, n=1)) else u for u in flags]
        parser.error("unknown argument(s): " + ", ".join(hints))
    given = {a[2:].split("=")[0].removeprefix("no-") for a in argv if a.startswith("--")}
    try:
        return make_config(preset, **{k: v for k, v in vars(args).items() if k in given and k != "preset"})
    except ValueError as e:
        parser.error(str(e))


# --------------------------------------------------------------------------------------------
# Files: atomic writes, readable errors
# --------------------------------------------------------------------------------------------

def save_checkpoint(obj: dict, path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then os.replace.

    A crash (or Ctrl-C) mid-write leaves the previous checkpoint untouched: os.replace is atomic
    on POSIX and Windows when both names are on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(obj, path) -> None:
    """A small JSON file (config, eval results), written atomically like a checkpoint (and its
    folder made if need be)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def report_tokenizer_eval(res: dict, run: Path) -> None:
    """Print train.eval_tokenizer's results as a table and write them to RUN/tokenizer_eval.json."""
    write_json(res, Path(run) / "tokenizer_eval.json")
    print(f"stage 1 eval on {res['images']} test images: PSNR {res['psnr_db']:.2f} dB")
    print("  per scale  pn: " + " ".join(f"{p:>6}" for p in res["patch_nums"]))
    print("  codes used   : " + " ".join(f"{u:>6}" for u in res["codes_used"]))
    print("  perplexity   : " + " ".join(f"{p:>6.1f}" for p in res["perplexity"]))


def report_generator_eval(res: dict, path) -> None:
    """Print train.eval_generator's results in one line and write them to `path` (JSON)."""
    write_json(res, path)
    print(f"stage 2 eval on {res['tokens_images']} test images: loss {res['val_loss']:.4f}, "
          "per-scale accuracy " + " ".join(f"{100 * a:.1f}%" for a in res["per_scale_acc"]))


def read_torch_file(path, what: str, how_to_get: str) -> dict:
    """torch.load(weights_only=True) of a dict, with one clear error per way a file can be bad."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist. {how_to_get}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # truncated zip, bad pickle, foreign objects: all mean "unusable"
        raise ValueError(f"{what} {path} is corrupt, truncated or not a torch file "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"{how_to_get}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, not a dict")
    return obj


def load_checkpoint(path, kind: str) -> dict:
    """A checkpoint written by save_checkpoint; checks that it is a `kind` checkpoint
    ("tokenizer", "generator", ...)."""
    ckpt = read_torch_file(path, "checkpoint", "(Re)run the training stage that writes it, or restore a copy.")
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt.get('kind')!r} checkpoint, expected a {kind!r} checkpoint")
    return ckpt


def file_digest(path) -> str:
    """sha256 of a file: the identity of a tokenizer checkpoint, for the token cache."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_same_run(saved: dict, now: dict, path, defining) -> None:
    """Refuse to resume a run whose defining settings (STAGE1_FIELDS / STAGE2_FIELDS above)
    differ from this invocation's. `saved`, `now`: train.py's TrainConfig as dicts."""
    if "arch" in defining and saved.get("arch", now["arch"]) != now["arch"]:
        raise ValueError(f"{path} holds a {saved['arch']!r} generator but this run asks for "
                         f"--arch {now['arch']}; pass --arch {saved['arch']} or use another --out_dir")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in defining if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path} was written by a run with other settings:\n  " + "\n  ".join(diff)
                         + "\nResume with the same settings, or choose another --out_dir (to train "
                         "another generator on a finished tokenizer, copy tokenizer.pt and tokens.pt "
                         "into the new folder).")


# --------------------------------------------------------------------------------------------
# Random-number generators: a resumed run continues every stream where it stopped
# --------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every random-number generator training touches, as tensors / plain types."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def gather_rng() -> list:
    """Every process's RNG states, rank order (under torchrun a collective: all ranks call it)."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(states: list) -> None:
    """Undo gather_rng: this process takes its own state back. A run resumed with another number
    of processes keeps its data order (a function of the step) but not its dropout noise."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world:
        set_rng_state(states[rank])
    elif rank == 0:
        print(f"note: checkpoint was written by {len(states)} processes, now {world}: "
              "data order is unchanged, dropout randomness restarts from the seed")


# --------------------------------------------------------------------------------------------
# State dicts: strict loads with errors that name the difference
# --------------------------------------------------------------------------------------------

def load_state_dict_checked(module: torch.nn.Module, state_dict: dict, what: str, hint: str = "") -> None:
    """load_state_dict(strict=True), but a mismatch raises a ValueError that lists the missing,
    unexpected and wrongly shaped keys (a few of each) followed by `hint`. Loads nothing unless
    every key matches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def show(items):
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
        lines = [f"{what} checkpoint does not match the model built from the config:"]
        lines += [f"  shape mismatches: {show(mismatched)}"] if mismatched else []
        lines += [f"  missing from the checkpoint: {show(missing)}"] if missing else []
        lines += [f"  unexpected in the checkpoint: {show(unexpected)}"] if unexpected else []
        raise ValueError("\n".join(lines + ([hint] if hint else [])))
    module.load_state_dict(state_dict, strict=True)


def load_tokenizer_state(model: MultiScaleVQVAE, state_dict: dict) -> None:
    """Strict load into a MultiScaleVQVAE. On failure, the two shapes that pin the most fields
    (the codebook: V x Cvae; the first conv: ch x image channels) say which config differs."""
    cfg, hints = model.cfg, []
    for key, names in (("quantize.embedding.weight", ("vocab_size", "z_channels")),
                       ("encoder.conv_in.weight", ("ch", "in_channels"))):
        if key in state_dict:
            hints += [f"  checkpoint was trained with {n}={v} but the config says {getattr(cfg, n)}"
                      for n, v in zip(names, state_dict[key].shape) if getattr(cfg, n) != v]
    hint = "\n".join(hints + ["  fix: build the tokenizer with the checkpoint's config (saved next to "
                              "its weights), or pass the matching overrides"])
    load_state_dict_checked(model, state_dict, "tokenizer", hint=hint)


# --------------------------------------------------------------------------------------------
# One training stage's bookkeeping: resume, checkpoints, history, progress, stopping
# --------------------------------------------------------------------------------------------

def stage_checkpoint(kind: str, cfg, model, opt=None, scaler=None, step=0, total=0, rng=(), history=(),
                     done=True, configs: dict | None = None, **extra) -> dict:
    """What RUN/tokenizer.pt and RUN/<arch>.pt hold: the TrainConfig and the model configs
    (`configs`; default: the tokenizer's own), the weights, the optimizer and GradScaler states, the
    step, every process's RNG states, the loss history -- plain types and tensors only
    (weights_only loads). With the defaults: a finished tokenizer without an optimizer (an
    imported or an untrained one)."""
    configs = configs or {"tokenizer": model.cfg.to_dict()}
    return {"kind": kind, "config": {"train": dataclasses.asdict(cfg), **configs}, **extra,
            "model": model.state_dict(), "optimizer": opt.state_dict() if opt else {},
            "scaler": scaler.state_dict() if scaler else {}, "step": step, "total_steps": total,
            "rng": list(rng), "history": list(history), "done": done}


class StageRun:
    """Everything around a training loop that is not training, so that train.py shows the step
    itself. kind "tokenizer" (stage 1) or "generator" (stage 2; give it the tokenizer and the
    token cache: its checkpoint keeps both configs, the class names, and the tokenizer file's
    name and sha256, so that load_generator can rebuild everything):

      resume()              load RUN/<file> if it exists (refusing one of another run) -> step
      record(step, loss)    the loss history (a mean every log_every steps) and the progress bar
      checkpoint_or_stop()  a checkpoint every ckpt_every steps, at the end, and when the time
                            budget / --stop_after ends this invocation (True: stop now; running
                            the same command again resumes, bit-identical to an uninterrupted run)
    """

    def __init__(self, kind: str, cfg, d: DistInfo, path, total: int, deadline: float, model, opt,
                 scaler, tokenizer=None, cache: dict | None = None):
        self.kind, self.cfg, self.d, self.path, self.total = kind, cfg, d, Path(path), total
        self.deadline, self.model, self.opt, self.scaler = deadline, model, opt, scaler
        self.configs, self.extra, self.tokens_per_step = None, {}, 0
        if kind == "generator":
            self.configs = {"tokenizer": tokenizer.cfg.to_dict(), "model": model.cfg.to_dict()}
            self.extra = {"class_names": cache["class_names"], "tokenizer_path": "tokenizer.pt",
                          "tokenizer_sha256": cache["identity"]["tokenizer_sha256"]}
            self.tokens_per_step = cfg.gen_batch * model.cfg.seq_len
        self.name = "stage 1" if kind == "tokenizer" else "stage 2"
        self.label = f"{self.name} {'tokenizer' if kind == 'tokenizer' else cfg.arch}"
        self.history, self.running, self.steps_here, self.bar, self.t0 = [], [], 0, None, time.time()

    def resume(self) -> int:
        """-> the step to start at: 0, or the checkpoint's, with the model, optimizer, GradScaler,
        history and RNG states restored. Prints what is about to be trained."""
        step = self._load() if self.path.exists() else 0
        if step < self.total:
            batch = self.cfg.tok_batch if self.kind == "tokenizer" else self.cfg.gen_batch
            params = sum(p.numel() for p in self.model.parameters()) / 1e6
            seq = f", L = {self.model.cfg.seq_len} tokens" if hasattr(self.model.cfg, "seq_len") else ""
            self.d.print(f"{self.label}: {params:.2f}M parameters{seq}, {self.total} steps of {batch} images")
        self.t0 = time.time()
        return step

    def _load(self) -> int:
        ck, path = load_checkpoint(self.path, self.kind), self.path
        defining = STAGE1_FIELDS if self.kind == "tokenizer" else STAGE2_FIELDS
        check_same_run(ck["config"]["train"], dataclasses.asdict(self.cfg), path, defining)
        if ck["total_steps"] != self.total:
            flags = "--tok_epochs" if self.kind == "tokenizer" else "--gen_steps / --gen_epochs"
            raise ValueError(f"{path} was written by a run of {ck['total_steps']} steps; this one asks "
                             f"for {self.total} ({flags}). Resume with the same length, or choose "
                             "another --out_dir")
        if ck.get("tokenizer_sha256") != self.extra.get("tokenizer_sha256"):
            raise ValueError(f"{path} was trained on the tokens of another tokenizer.pt (sha256 "
                             "differs); use another --out_dir, or delete it to start stage 2 over")
        if self.kind == "tokenizer":
            load_tokenizer_state(self.model, ck["model"])
        else:
            load_state_dict_checked(self.model, ck["model"], what=f"{self.cfg.arch} generator")
        self.opt.load_state_dict(ck["optimizer"])
        if self.scaler and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.history = ck["history"]
        restore_rng(ck["rng"])
        self.d.print(f"{self.name}: resuming {path} at step {ck['step']}/{self.total}")
        return ck["step"]

    def record(self, step: int, loss: float, lr: float | None = None, **shown) -> None:
        """After optimizer step `step`: keep the loss for the history ([step, mean loss(, lr)]
        every log_every steps) and show it, with `shown` (numbers or per-scale tensors), on the bar."""
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step - 1, desc=self.label, disable=not self.d.is_main,
                            dynamic_ncols=True)
        self.steps_here += 1
        self.running.append(loss)
        if step % self.cfg.log_every == 0 or step == self.total:
            mean = sum(self.running) / len(self.running)
            self.history.append([step, mean] if lr is None else [step, mean, lr])
            self.running = []
        if self.tokens_per_step:
            shown["tok_s"] = self.steps_here * self.tokens_per_step / max(1e-9, time.time() - self.t0)
        num = lambda x: f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        fmt = lambda v: "/".join(num(float(x)) for x in torch.as_tensor(v).detach().float().cpu().flatten())
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", **{k: fmt(v) for k, v in shown.items()})

    def save(self, step: int) -> None:
        """Write the checkpoint (every rank takes part: the RNG states are gathered)."""
        rng = gather_rng()
        if self.d.is_main:
            save_checkpoint(stage_checkpoint(self.kind, self.cfg, self.model, self.opt, self.scaler, step,
                                             self.total, rng, self.history, step == self.total,
                                             self.configs, **self.extra), self.path)

    def checkpoint_or_stop(self, step: int) -> bool:
        """End of optimizer step `step`: checkpoint when due; True when this invocation should stop
        (time budget or --stop_after). Rank 0 decides for all, so every rank stops at one step."""
        cfg, d = self.cfg, self.d
        stop = time.time() > self.deadline or (cfg.stop_after > 0 and self.steps_here >= cfg.stop_after)
        if d.world_size > 1:
            flag = torch.tensor([float(stop)], device=d.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if step % cfg.ckpt_every == 0 or step == self.total or stop:
            self.save(step)
        if stop and step < self.total:
            self.close()
            d.print(f"{self.name}: stopped at step {step}/{self.total} (checkpoint {self.path}); "
                    "run the same command to resume")
            return True
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# A train.py run folder
# --------------------------------------------------------------------------------------------

def load_trained_tokenizer(path, device="cpu") -> tuple[MultiScaleVQVAE, dict]:
    """RUN/tokenizer.pt -> (tokenizer in eval mode, checkpoint dict). Refuses an unfinished one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: train the tokenizer first "
                                "(--stage tokenizer, or --stage all)")
    ck = load_checkpoint(path, "tokenizer")
    if not ck["done"]:
        raise ValueError(f"{path} is an unfinished tokenizer run (step {ck['step']} of "
                         f"{ck['total_steps']}); finish it with --stage tokenizer first")
    model = MultiScaleVQVAE(TokenizerConfig.from_dict(ck["config"]["tokenizer"]))
    load_tokenizer_state(model, ck["model"])
    return model.to(device).eval().requires_grad_(False), ck


def load_generator(path, device="cpu", tokenizer_path=None):
    """A generator checkpoint -> (model in eval mode, tokenizer in eval mode, checkpoint dict).

    The checkpoint holds everything needed to rebuild both: the generator config, and the
    tokenizer checkpoint's file name (relative to the generator's folder unless absolute) with
    its sha256, so a swapped tokenizer is caught. This is what sample.py uses.
    """
    path = Path(path)
    ck = load_checkpoint(path, "generator")
    tok_path = Path(tokenizer_path) if tokenizer_path else path.parent / ck["tokenizer_path"]
    tokenizer, _ = load_trained_tokenizer(tok_path, device)
    if file_digest(tok_path) != ck["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {path} was trained with (sha256 differs)")
    model = MVAR(MVARConfig.from_dict(ck["config"]["model"]))
    load_state_dict_checked(model, ck["model"], what=f"{ck['config']['model']['arch']} generator")
    return model.to(device).eval(), tokenizer, ck


def sampling_defaults(ck: dict) -> dict:
    """A generator checkpoint -> its sampling setting {"guidance", "top_k", "top_p"}: the one stored
    with it (the shipped weights: the setting measured to draw them best), else the grids' setting
    of its run. Files written before the rename call the strength "cfg" (the shipped ones) or
    "cfg_scale" (a run's config): read as guidance."""
    if ck.get("sampling"):
        s = dict(ck["sampling"])
        return {"guidance": s.pop("guidance", s.pop("cfg", None)), **s}
    t = ck["config"]["train"]
    return {"guidance": t.get("guidance", t.get("cfg_scale")), "top_k": t["top_k"], "top_p": t["top_p"]}


# The trained Fashion-MNIST tokenizer, M-VAR and VAR that come with the repository (made by
# `python weights/make.py`; weights/fashion-mnist/PROVENANCE.md says how and how well).
SHIPPED = Path(__file__).resolve().parent / "weights" / "fashion-mnist"
REGENERATE = "python weights/make.py"


# --------------------------------------------------------------------------------------------
# The officially released weights (VAR's tokenizer; the M-VAR and VAR generators)
# --------------------------------------------------------------------------------------------

VAE_URL = "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"

# Buffers the official generator files carry that mvar.py computes instead.
OFFICIAL_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "patch_nums")


def load_var_checkpoint(path_or_state_dict, map_location="cpu", patch_nums=None) -> MultiScaleVQVAE:
    """VAR's released tokenizer `vae_ch160v4096z32.pth` -> the "var256" MultiScaleVQVAE, loaded
    strictly, in eval mode with gradients off (it is a frozen tokenizer). Given the generator's
    `patch_nums`, any VAR-format tokenizer file instead, its config read from its shapes."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = read_torch_file(sd, "VAR tokenizer", f"Download it (436 MB): wget -O {sd} {VAE_URL}")
    model = MultiScaleVQVAE(tokenizer_config("var256") if patch_nums is None else var_tokenizer_config(sd, patch_nums))
    load_tokenizer_state(model, sd)
    return model.to(map_location).eval().requires_grad_(False)


def load_official_checkpoint(model: MVAR, path_or_state_dict) -> dict:
    """Load a released M-VAR / VAR generator `.pth` into `model` (strict).

    The buffers in OFFICIAL_BUFFERS are ignored (mvar.py recomputes them); any other difference
    raises a ValueError naming the missing, unexpected and wrongly shaped parameters.
    Returns {"loaded": number of tensors, "ignored_buffers": [names]}."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = read_torch_file(sd, f"{model.cfg.arch} generator checkpoint",
                             "Download the released .pth (see README, 'Released weights') or fix the path.")
    for wrapper in ("model", "state_dict"):   # some releases nest the weights one level down
        if isinstance(sd.get(wrapper), dict) and "head.weight" not in sd:
            sd = sd[wrapper]
    ignored = sorted(k for k in sd if k.rsplit(".", 1)[-1] in OFFICIAL_BUFFERS)
    sd = {k: v for k, v in sd.items() if k not in ignored}
    load_state_dict_checked(model, sd, what=f"{model.cfg.arch} generator",
                            hint="check --arch, depth, patch_nums and vocab_size")
    return {"loaded": len(sd), "ignored_buffers": ignored}


# The scale pyramids of the released models, by sequence length L: VAR's 256 px and 512 px ones.
KNOWN_PYRAMIDS = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def official_generator_config(sd: dict, patch_nums=None) -> MVARConfig:
    """An official M-VAR / VAR generator's MVARConfig, read from its state dict's keys and shapes:
    Mamba keys or not (arch), the number of blocks (depth), word_embed (width, Cvae), head (V),
    class_emb (classes + the null class), scale_mul_1H11 present or not (attn_l2_norm; its shape
    gives the heads, else VAR's rule heads = depth), Mamba's projections (its settings), and the
    scales from the lvl_1L buffer (the scale id of every position), else from L."""
    if "quantize.embedding.weight" in sd:
        raise ValueError("this is a VAR tokenizer file (it has quantize.embedding.weight), not a "
                         "generator: pass it as --vae_ckpt, and the M-VAR / VAR .pth as --official")
    missing = [k for k in ("word_embed.weight", "head.weight", "class_emb.weight", "pos_1LC",
                           "blocks.0.ffn.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an M-VAR / VAR generator state dict: it has no {', '.join(missing)}")
    C, Cvae = sd["word_embed.weight"].shape
    L, l2 = sd["pos_1LC"].shape[1], "blocks.0.attn.scale_mul_1H11" in sd
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if patch_nums is None and "lvl_1L" in sd:
        patch_nums = tuple(round(math.sqrt(n)) for n in torch.bincount(sd["lvl_1L"].flatten()).tolist())
    patch_nums = patch_nums or KNOWN_PYRAMIDS.get(L)
    if patch_nums is None or sum(p * p for p in patch_nums) != L:
        raise ValueError(f"cannot tell the scales of this {L}-token model (no lvl_1L buffer, or it "
                         f"disagrees): pass --patch_nums, e.g. 1,2,3,4 (the squares must sum to {L})")
    mamba = {}
    if "blocks.0.mamba.in_proj.weight" in sd:
        d_inner, conv = sd["blocks.0.mamba.out_proj.weight"].shape[1], sd["blocks.0.mamba.conv1d.weight"]
        mamba = dict(expand=d_inner // C, headdim=d_inner // sd["blocks.0.mamba.A_log"].shape[0],
                     d_conv=conv.shape[-1], d_state=(conv.shape[0] - d_inner) // 2)
    return MVARConfig(arch="mvar" if mamba else "var", depth=depth, width=C,
                      num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth,
                      num_classes=sd["class_emb.weight"].shape[0] - 1, vocab_size=sd["head.weight"].shape[0],
                      Cvae=Cvae, patch_nums=tuple(patch_nums), attn_l2_norm=l2,
                      mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C, **mamba)


def var_tokenizer_config(sd: dict, patch_nums) -> TokenizerConfig:
    """A VAR-format tokenizer's TokenizerConfig from its shapes (channels, channel multipliers,
    residual blocks, V, Cvae, shared phi convs); the scales are the generator's."""
    if "head.weight" in sd:
        raise ValueError("this is a generator file (it has head.weight), not a VAR tokenizer: pass "
                         "it as --official, and vae_ch160v4096z32.pth (or the like) as --vae_ckpt")
    if "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        raise ValueError("not a VAR tokenizer state dict: it has no quantize.embedding.weight / encoder.conv_in.weight")
    count = lambda prefix, at: 1 + max(int(k.split(".")[at]) for k in sd if k.startswith(prefix))
    ch, levels = sd["encoder.conv_in.weight"].shape[0], count("encoder.down.", 2)
    return tokenizer_config("var256", image_size=patch_nums[-1] * 2 ** (levels - 1),
                            in_channels=sd["encoder.conv_in.weight"].shape[1], ch=ch,
                            ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)),
                            num_res_blocks=count("encoder.down.0.block.", 4), z_channels=sd["quantize.embedding.weight"].shape[1],
                            vocab_size=sd["quantize.embedding.weight"].shape[0], patch_nums=tuple(patch_nums),
                            share_quant_resi=count("quantize.quant_resi.qresi_ls.", 3))


def load_official(path, vae_ckpt, device="cpu", patch_nums=None, expect: dict | None = None):
    """Released weights -> (generator, tokenizer), both in eval mode on `device`, with every
    architecture setting read from the two files (official_generator_config, var_tokenizer_config).
    `expect`, e.g. {"arch": "mvar", "depth": 16}, turns settings given by hand into checks."""
    sd = read_torch_file(path, "generator checkpoint", "Pass the released .pth of the official M-VAR / VAR repository.")
    cfg = official_generator_config(sd, patch_nums)
    wrong = [f"--{k} {v} (the file holds {getattr(cfg, k)})" for k, v in (expect or {}).items()
             if v is not None and v != getattr(cfg, k)]
    if wrong:
        raise ValueError(f"{path} does not match {', '.join(wrong)}: drop the flag, the file says it all")
    model = MVAR(cfg)
    load_official_checkpoint(model, sd)
    return model.to(device).eval(), load_var_checkpoint(vae_ckpt, device, cfg.patch_nums)


# --------------------------------------------------------------------------------------------
# sample.py's command line, its checks, and loading what it samples
# --------------------------------------------------------------------------------------------

# The sampling setting behind the published FID numbers of VAR and M-VAR (no gumbel smoothing).
OFFICIAL_FID = {"guidance": 1.5, "top_k": 900, "top_p": 0.96}


def parse_sample_args(argv, description: str):
    """The command line -> args: flags checked together, args.device a torch.device, args.amp_dtype
    bf16 or None, and --ckpt the shipped weights when neither --ckpt nor --official names a model."""
    args = sample_parser(description).parse_args(argv)
    if args.per_class < 1 or args.batch < 1 or args.npz < 0:
        raise ValueError("--per_class and --batch must be >= 1, --npz >= 0")
    if args.npz and args.strip:
        raise ValueError("--strip draws the grid's samples; --npz writes no grid: run them separately")
    if args.ckpt and args.official:
        raise ValueError("pass at most one of --ckpt RUN/<arch>.pt (a train.py run) or "
                         "--official PATH.pth (released weights, with --vae_ckpt)")
    args.shipped = not (args.ckpt or args.official)
    if args.shipped:
        args.ckpt = str(SHIPPED / f"{args.arch or 'mvar'}.pt")
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"the shipped weights {args.ckpt} are missing: restore them (git "
                                    f"checkout -- weights), remake them with `{REGENERATE}`, or pass "
                                    "--ckpt RUN/mvar.pt")
    args.device = resolve_device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and args.device.type == "cuda")
    args.amp_dtype = torch.bfloat16 if bf16 else None
    return args


def load_sampling_models(args):
    """-> (generator, tokenizer, default sampling setting, class names, default output folder).
    A train.py checkpoint names its tokenizer and stores its setting; released weights are two
    files whose keys and shapes give every architecture setting (--arch / --depth only check)."""
    if args.ckpt:
        model, tok, ck = load_generator(args.ckpt, args.device, tokenizer_path=args.tokenizer or None)
        folder = Path("samples") if args.shipped else Path(args.ckpt).parent
        return model, tok, sampling_defaults(ck), ck.get("class_names") or [], folder
    pns = tuple(int(p) for p in args.patch_nums.split(",")) if args.patch_nums else None
    expect = {"arch": args.arch, "depth": args.depth}
    model, tok = load_official(args.official, args.vae_ckpt, args.device, pns, expect)
    return model, tok, dict(OFFICIAL_FID), [], Path("samples")


def pick_classes(args, num_classes: int) -> list[int]:
    """--classes, or by default all classes for --npz (FID wants them all), the first 10 for a grid."""
    if args.classes:
        return parse_classes(args.classes, num_classes)
    return list(range(num_classes if args.npz else min(10, num_classes)))


def parse_classes(text: str, num_classes: int) -> list[int]:
    """"0-9" / "3,5,7" / "0-3,8" / "all" -> the class ids in the order given, each in range."""
    if text.strip().lower() == "all":
        return list(range(num_classes))
    ids = []
    for part in filter(None, text.replace(" ", "").split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)                 # an id, or an inclusive range a-b
        if not m or int(m[2] or m[1]) < int(m[1]):
            raise ValueError(f"--classes {text!r}: {part!r} is not an id or an increasing range; "
                             "expected e.g. 0-9 or 1,5,7 or all")
        ids += range(int(m[1]), int(m[2] or m[1]) + 1)
    bad = [c for c in ids if c >= num_classes]
    if bad:
        raise ValueError(f"--classes {text!r}: class label(s) {bad[:5]} out of range: this model has "
                         f"{num_classes} classes, valid labels are 0..{num_classes - 1}")
    if not ids:
        raise ValueError(f"--classes {text!r} names no class")
    return ids


def sample_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add = p.add_argument_group("what to load").add_argument
    add("--ckpt", default="", help="train.py's RUN/mvar.pt or RUN/var.pt (default: the shipped one)")
    add("--tokenizer", default="", help="tokenizer checkpoint (default: the one the generator names)")
    add("--official", default="", help="released M-VAR / VAR ImageNet-256 weights (.pth)")
    add("--vae_ckpt", default="data/vae_ch160v4096z32.pth",
        help="with --official: VAR's tokenizer (default %(default)s)")
    add("--arch", choices=("mvar", "var"), help="the shipped model (default mvar); --official: a check")
    add("--depth", type=int, help="with --official: check that the file holds this depth")
    add("--patch_nums", default="", help="with --official: the scales, e.g. 1,2,3,4, if the file can't tell")
    add = p.add_argument_group("what to sample").add_argument
    add("--classes", default="", help="class ids: 0-9, 1,5,7 or all (default: the first 10; --npz: all)")
    add("--per_class", type=int, default=4, help="grid rows: samples per class (default 4)")
    add("--guidance", "--cfg", dest="guidance", type=float,
        help="classifier-free guidance strength (default: checkpoint's / 1.5)")
    add("--top_k", type=int, help="top-k, 0 = off (default: checkpoint's / 900)")
    add("--top_p", type=float, help="top-p, 0 = off (default: checkpoint's / 0.96)")
    add("--more_smooth", action="store_true", help="gumbel-softmax codes: smoother pictures, not for FID")
    add("--seed", type=int, default=0, help="default 0")
    add("--strip", action="store_true", help="also the coarse-to-fine strip: row = class, column = scale")
    add("--npz", type=int, default=0, metavar="COUNT", help="write COUNT samples as .npz for FID instead of a grid")
    add = p.add_argument_group("how").add_argument
    add("--batch", type=int, default=64, help="images per forward pass (default 64)")
    add("--out", default="", help="a folder or a .png / .npz name (default: the run's; samples/)")
    add("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N | mps")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on CUDA, else fp32")
    return p
