"""runtime.py -- starting, saving and resuming runs; loading weights. Not needed to understand M-VAR.

The plumbing of train.py and sample.py; nothing in this file is part of the method. It holds:

  * how a run starts: torchrun / DDP set-up, mixed precision, the command line of a config
    dataclass, and the time budget / --stop_after logic that ends an invocation cleanly;
  * atomic checkpoint files: save_checkpoint / load_checkpoint, and the checks that refuse to
    resume a run under other settings (check_same_run);
  * the random-number-generator states that make a resumed run bit-identical to one that was
    never interrupted (rng_state, gather_rng, restore_rng);
  * loading state dicts with errors a person can act on (load_state_dict_checked);
  * the models of a train.py run folder (load_trained_tokenizer, load_generator), and the trained
    Fashion-MNIST models shipped in weights/fashion-mnist/ (SHIPPED, shippable_copy), which the
    same two functions load;
  * the officially released weights: VAR's tokenizer (load_var_checkpoint) and the M-VAR / VAR
    generators (load_official_checkpoint), with every architecture setting read from the files
    themselves (official_generator_config, var_tokenizer_config; load_official does both).

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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
    if prec == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def checkpoint_or_stop(cfg, d: DistInfo, deadline: float, step: int, total: int,
                       steps_here: int, checkpoint, bar, stage: str, path) -> bool:
    """End of an optimizer step, for both stages: checkpoint every ckpt_every steps, at the last
    step, and when the time budget / --stop_after ends this invocation. Returns True when the
    caller should stop now (running the same command again resumes). Rank 0 decides for all."""
    stop = time.time() > deadline or (cfg.stop_after > 0 and steps_here >= cfg.stop_after)
    if d.world_size > 1:                               # every rank must stop at the same step
        flag = torch.tensor([float(stop)], device=d.device)
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
    if step % cfg.ckpt_every == 0 or step == total or stop:
        checkpoint(done=step == total)
    if stop and step < total:
        bar.close()
        d.print(f"{stage}: stopped at step {step}/{total} (checkpoint {path}); run the same command to resume")
        return True
    return False


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {s!r}")


def _tuple_parser(kind):
    def parse(s: str) -> tuple:
        try:
            return tuple(kind(x) for x in s.replace(" ", "").split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list like 1,2,3, got {s!r}")
    return parse


def parse_config_args(argv, config_class, presets: dict, make_config, choices: dict, description: str):
    """Command line -> a config dataclass (train.py's TrainConfig). `--preset` is read first, so
    `--help` shows that preset's defaults; make_config(preset, **fields) builds the result.

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
        default, help_ = getattr(defaults, f.name), f.metadata["help"]
        flag = "--" + f.name
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default,
                                help=help_, metavar="0|1")
            parser.add_argument("--no-" + f.name, dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, type=_tuple_parser(kind), default=default, help=help_,
                                metavar="A,B,...")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_,
                                choices=choices.get(f.name))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        flags = [u for u in unknown if u.startswith("-")] or unknown
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(
            u.split("=")[0], known, n=1)) else u for u in flags]
        parser.error("unknown argument(s): " + ", ".join(hints))
    values = vars(args)
    try:
        return make_config(preset, **{k: v for k, v in values.items() if k != "preset"})
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
    """Refuse to resume a run whose defining settings (train.py's STAGE1_FIELDS /
    STAGE2_FIELDS) differ from this invocation's. `saved`, `now`: TrainConfig as dicts."""
    if "arch" in defining and saved.get("arch", now["arch"]) != now["arch"]:
        raise ValueError(f"{path} holds a {saved['arch']!r} generator but this run asks for "
                         f"--arch {now['arch']}; pass --arch {saved['arch']} or use another --out_dir")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in defining
            if saved.get(k) != now[k]]
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
    """A generator checkpoint -> its sampling setting {"cfg", "top_k", "top_p"}: the one stored
    with it (the shipped weights: the setting measured to draw them best), else the grids' setting
    of its run (`guidance`, named `cfg_scale` in checkpoints written before the rename)."""
    if ck.get("sampling"):
        return dict(ck["sampling"])
    t = ck["config"]["train"]
    return {"cfg": t.get("guidance", t.get("cfg_scale")), "top_k": t["top_k"], "top_p": t["top_p"]}


# The trained Fashion-MNIST tokenizer, M-VAR and VAR that come with the repository (made by
# `python weights/make.py`; weights/fashion-mnist/PROVENANCE.md says how and how well).
SHIPPED = Path(__file__).resolve().parent / "weights" / "fashion-mnist"
REGENERATE = "python weights/make.py"


def shippable_copy(ck: dict, **extra) -> dict:
    """A finished train.py checkpoint -> the weights-only copy that weights/ ships: the config,
    the class names and the weights, floating tensors in float16 (half the bytes; load_state_dict
    casts them back to float32), without the optimizer state, RNG states and loss history.
    load_trained_tokenizer / load_generator read it like the checkpoint it came from."""
    if not ck.get("done"):
        raise ValueError(f"only a finished run can be shipped (this one is at step {ck.get('step')} "
                         f"of {ck.get('total_steps')})")
    half = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    keep = {k: ck[k] for k in ("kind", "config", "class_names", "tokenizer_path", "step", "total_steps")
            if k in ck}
    return {**keep, "model": half, "done": True, **extra}


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
