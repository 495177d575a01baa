"""checkpoints.py -- saving and loading weights. Not needed to understand M-VAR.

train.py and sample.py keep their runs here; nothing in this file is part of the method. It holds:

  * atomic checkpoint files: save_checkpoint / load_checkpoint, and the checks that refuse to
    resume a run under other settings (check_same_run);
  * the random-number-generator states that make a resumed run bit-identical to one that was
    never interrupted (rng_state, gather_rng, restore_rng);
  * loading state dicts with errors a person can act on (load_state_dict_checked);
  * the models of a train.py run folder (load_trained_tokenizer, load_generator);
  * the officially released weights: VAR's tokenizer (load_var_checkpoint) and the M-VAR / VAR
    generators (load_official_checkpoint).

Every file is read with torch.load(weights_only=True): a checkpoint holds only tensors and plain
Python values, so loading one never runs pickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mvar import MVAR, MVARConfig
from tokenizer import MultiScaleVQVAE, TokenizerConfig, tokenizer_config


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
    """A small JSON file (config, eval results), written atomically like a checkpoint."""
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
                         f"Delete it and get it again. {how_to_get}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, not a dict")
    return obj


def load_checkpoint(path, kind: str) -> dict:
    """A checkpoint written by save_checkpoint; checks that it is a `kind` checkpoint
    ("tokenizer", "generator", ...)."""
    ckpt = read_torch_file(path, "checkpoint", "Run the training stage that writes it.")
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
    """Refuse to resume a run whose defining settings (train.py's STAGE1_FIELDS /
    STAGE2_FIELDS) differ from this invocation's. `saved`, `now`: TrainConfig as dicts."""
    if "arch" in defining and saved.get("arch", now["arch"]) != now["arch"]:
        raise ValueError(f"{path} holds a {saved['arch']!r} generator but this run asks for "
                         f"--arch {now['arch']}; pass --arch {saved['arch']} or use another --out_dir")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in defining
            if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path} was written by a run with other settings:\n  " + "\n  ".join(diff)
                         + "\nResume with the same settings, or choose another --out_dir.")


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


# --------------------------------------------------------------------------------------------
# The officially released weights (VAR's tokenizer; the M-VAR and VAR generators)
# --------------------------------------------------------------------------------------------

VAE_URL = "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"

# Buffers the official generator files carry that mvar.py computes instead.
OFFICIAL_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias", "patch_nums")


def load_var_checkpoint(path_or_state_dict, map_location="cpu") -> MultiScaleVQVAE:
    """VAR's released tokenizer `vae_ch160v4096z32.pth` -> the "var256" MultiScaleVQVAE, loaded
    strictly, in eval mode with gradients off (it is a frozen tokenizer)."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = read_torch_file(sd, "VAR tokenizer", f"Download it (436 MB): wget -O {sd} {VAE_URL}")
    model = MultiScaleVQVAE(tokenizer_config("var256"))
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
