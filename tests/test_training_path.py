"""The training path, piece by piece, each against an independent reference.

  * gradient accumulation: a train.py step with --grad_accum 2 against the same step on the
    whole batch (--grad_accum 1), with gradient clipping active;
  * drop-path (Block.adaln's gate): its mean over many draws against the no-drop output
    y * g_i written by hand from ada_lin's rows, and eval mode against a block without drop-path;
  * class dropout (MVAR.forward): the labels the model really embeds (seen by a hook on
    class_emb) against the labels given: a dropped one is the null class, at the set rate;
  * the token cache: every cached (tokens, label) pair against encoding that image with the
    tokenizer, in dataset order, in the shuffled training batches (flips included), and in the
    shards that two processes encode and merge;
  * cosine attention's learned temperature: ScaleAttention against attention written by hand,
    with the temperature clamped at 100 as in VAR;
  * sample.py's pictures: the grid's column labels and the .npz labels against the labels each
    image was really generated with (seen by wrapping MVAR.generate).

Everything runs on tiny settings: 16px shapes, 4x4 latents (patch_nums 1,2,3,4 -> L = 30
tokens), a random (untrained) tokenizer, a depth-2 width-32 generator.
"""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import runtime
import sample
import train
from mvar import MVAR, Block, MVARConfig, ScaleAttention, scale_spans
from tokenizer import MultiScaleVQVAE

TINY = ["--image_size", "16", "--shapes_train", "25", "--shapes_test", "6", "--tok_ch", "32",
        "--tok_ch_mult", "1,1,1", "--tok_z_channels", "8", "--vocab_size", "64",
        "--patch_nums", "1,2,3,4", "--tok_batch", "8", "--depth", "2", "--width", "32",
        "--num_heads", "2", "--d_state", "8", "--headdim", "16", "--expand", "1",
        "--gen_batch", "8", "--gen_epochs", "2", "--hflip", "1", "--ckpt_every", "1000",
        "--image_every", "1000", "--device", "cpu"]
# 25 images (odd: two processes' shards differ in size) in batches of 8: 3 steps per epoch.


def small_config(**overrides) -> MVARConfig:
    """A generator small enough to build in milliseconds."""
    return MVARConfig(**{"depth": 1, "width": 32, "num_heads": 2, "num_classes": 5, "vocab_size": 16,
                         "Cvae": 4, "patch_nums": (1, 2, 3), "d_state": 8, "headdim": 16, "expand": 1,
                         **overrides})


def encode(tokenizer, images) -> torch.Tensor:
    """The reference encoding: each image on its own through the tokenizer -> (n, L) tokens."""
    return torch.cat([torch.cat(tokenizer.img_to_idx(img[None]), 1) for img in images])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run folder with a finished (random, untrained) tokenizer.pt and the token cache
    train.token_cache builds from it: stage 1 is not what these tests are about."""
    out = tmp_path_factory.mktemp("base")
    cfg = train.parse_args(TINY + ["--out_dir", str(out)])
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(train.tokenizer_config_for(cfg, in_channels=3)).eval()
    # A random codebook at the scale of the random encoder's output (the default one is about 6x
    # wider, and most latents would pick the same few codes): every image gets its own tokens.
    ds = data.load_dataset(cfg, "train")
    with torch.no_grad():
        latents = tokenizer.quant_conv(tokenizer.encoder(torch.stack([ds[i][0] for i in range(len(ds))])))
        codebook = tokenizer.quantize.embedding.weight
        codebook.copy_(torch.randn_like(codebook) * latents.std())
    runtime.save_checkpoint(runtime.stage_checkpoint("tokenizer", cfg, tokenizer), out / "tokenizer.pt")
    tokenizer = runtime.load_trained_tokenizer(out / "tokenizer.pt")[0]
    train.token_cache(cfg, runtime.DistInfo(), tokenizer)
    return out, cfg, tokenizer


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------

def one_step(base, out, monkeypatch, *flags):
    """One train.py generator step in a copy of the base run -> (the gradient before clipping,
    the gradient the optimizer stepped with, the norm optimizer_step returned, mvar.pt)."""
    out.mkdir()
    for name in ("tokenizer.pt", "tokens.pt"):
        shutil.copy(base / name, out / name)
    seen = {}
    real_optimizer_step = train.optimizer_step
    grads = lambda model: {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def recording_optimizer_step(opt, model, scaler, grad_clip):
        seen["before"] = grads(model)
        real_step = opt.step

        def recording_step(*args, **kwargs):          # the optimizer's step runs after the clip
            seen["clipped"] = grads(model)
            return real_step(*args, **kwargs)
        opt.step = recording_step
        seen["norm"] = real_optimizer_step(opt, model, scaler, grad_clip)
        return seen["norm"]
    with monkeypatch.context() as m:
        m.setattr(train, "optimizer_step", recording_optimizer_step)
        train.main(TINY + ["--out_dir", str(out), "--stage", "generator", "--stop_after", "1", *flags])
    ck = runtime.load_checkpoint(out / "mvar.pt", "generator")
    return seen["before"], seen["clipped"], float(seen["norm"]), ck


def test_grad_accum_equals_one_step_on_the_whole_batch(base, tmp_path, monkeypatch):
    """Two micro-batches of 4 must give the gradient, the clipping and the weights of one batch of
    8: each micro-batch's loss is divided by grad_accum, and the norm is clipped once, on the sum.
    Class dropout and drop-path are off, so both runs draw no random numbers in the forward pass.
    The clip is far below the gradient's norm, so clipping acts (and is checked to)."""
    out, _, _ = base
    flags = ["--cond_drop", "0", "--drop_path", "0", "--grad_clip", "0.01"]
    whole = one_step(out, tmp_path / "whole", monkeypatch, *flags, "--grad_accum", "1")
    accum = one_step(out, tmp_path / "accum", monkeypatch, *flags, "--grad_accum", "2")
    for (before, clipped, norm, ck) in (whole, accum):
        by_hand = math.sqrt(sum(float(g.double().square().sum()) for g in before.values()))
        assert norm == pytest.approx(by_hand, rel=1e-5) and norm > 10 * 0.01     # it clips...
        assert set(clipped) == set(before)
        for name, g in before.items():                                          # ...by 0.01 / norm
            torch.testing.assert_close(clipped[name], g * (0.01 / (norm + 1e-6)), msg=name)
        assert ck["step"] == 1
    assert accum[2] == pytest.approx(whole[2], rel=1e-5)
    for name in whole[0]:
        torch.testing.assert_close(accum[0][name], whole[0][name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(accum[1][name], whole[1][name], rtol=1e-4, atol=1e-8, msg=name)
    for name, w in whole[3]["model"].items():
        torch.testing.assert_close(accum[3]["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------
# Drop-path and class dropout
# --------------------------------------------------------------------------------------------

def test_drop_path_keeps_the_expectation_drops_and_is_off_in_eval():
    """Block.adaln's gate(y, i) is g_i * y (g_i: rows i*C..(i+1)*C of ada_lin, the official
    g1, g2, g3 order), and in training drop-path: per sample, 0 with probability p, else the
    same divided by 1 - p. So every draw is 0 or g_i y / (1 - p), the zeros come at rate p, and
    the mean over N draws is g_i y, up to the noise of N draws (sd sqrt(p / (1 - p) / N))."""
    torch.manual_seed(0)
    p, N = 0.3, 4000
    cfg = small_config()
    block, C = Block(cfg, drop_path_rate=p), cfg.width
    cond = torch.randn(1, C).expand(N, C)               # N draws: one sample repeated N times
    y = torch.randn(1, 3, C).expand(N, 3, C)
    with torch.no_grad():
        rows = block.ada_lin(cond[:1])                   # (1, 9C): g1 g2 g3 s1 s2 s3 b1 b2 b3
        block.train()
        gate = block.adaln(cond)[1]
        for i in (0, 1, 2):
            no_drop = y[:1] * rows[:, None, i * C:(i + 1) * C]               # (1, 3, C)
            out = gate(y, i)                                                 # (N, 3, C)
            dropped = (out == 0).all(dim=(1, 2))
            torch.testing.assert_close(out[~dropped], (no_drop / (1 - p)).expand_as(out[~dropped]))
            rate = dropped.float().mean().item()
            assert 0 < rate < 1 and abs(rate - p) < 5 * math.sqrt(p * (1 - p) / N)     # it drops
            tol = 5 * math.sqrt(p / (1 - p) / N) * no_drop.abs() + 1e-6
            assert ((out.mean(0, keepdim=True) - no_drop).abs() <= tol).all()   # expectation kept

        # eval mode: the gate is exactly g_i y, and the block equals one without drop-path
        block.eval()
        gate = block.adaln(cond[:2])[1]
        assert torch.equal(gate(y[:2], 1), y[:2] * block.ada_lin(cond[:2])[:, None, C:2 * C])
        no_drop_block = Block(cfg, drop_path_rate=0.0)
        no_drop_block.load_state_dict(block.state_dict())
        x, spans = torch.randn(4, 14, C), scale_spans((1, 2, 3))
        assert torch.equal(block(x, cond[:4], spans), no_drop_block.train()(x, cond[:4], spans))
        assert not torch.equal(block.train()(x, cond[:4], spans), block.eval()(x, cond[:4], spans))


def test_class_dropout_replaces_labels_by_the_null_class_at_its_rate():
    """A hook on class_emb sees the labels the model really embeds. In training each one is, with
    probability cond_drop, replaced by exactly the null class (index num_classes), never by
    another real class; the others are left as they are. In eval mode nothing is dropped."""
    torch.manual_seed(0)
    p, N = 0.25, 4000
    cfg = small_config(cond_drop=p)
    model = MVAR(cfg)
    used = []

    class Seen(Exception):
        """Raised by the hook: once the labels are embedded, the rest of the pass is not needed."""

    def spy(module, args):
        used.append(args[0].clone())
        raise Seen
    model.class_emb.register_forward_pre_hook(spy)
    labels = torch.arange(N) % cfg.num_classes
    teacher = torch.zeros(N, cfg.seq_len - 1, cfg.Cvae)
    for mode in (model.train, model.eval):
        with pytest.raises(Seen):
            mode()(labels, teacher)
    in_training, in_eval = used
    dropped = in_training != labels
    assert (in_training[dropped] == cfg.num_classes).all()          # only ever the null class
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / N)
    for c in range(cfg.num_classes):                                 # at the same rate for every class
        n = (labels == c).sum().item()
        assert abs(dropped[labels == c].float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(in_eval, labels)


# --------------------------------------------------------------------------------------------
# The token cache
# --------------------------------------------------------------------------------------------

class TwoProcesses:
    """Stands in for torch.distributed in data.py: a world of 2, rank 1 first. When rank 1 waits
    at its first barrier (its part files written), rank 0 runs its whole cached_tokens call,
    which writes its own parts and merges both into the cache file; then rank 1 reads that file."""

    def __init__(self, run_rank0):
        self.rank, self.run_rank0 = 1, run_rank0

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 2

    def barrier(self):
        if self.rank == 1 and self.run_rank0 is not None:
            self.rank, run, self.run_rank0 = 0, self.run_rank0, None
            run()
            self.rank = 1


def test_token_cache_pairs_each_image_with_its_tokens_and_label(base, tmp_path, monkeypatch):
    """Reference: the image dataset itself, each image encoded on its own. The cache must hold
    image i's tokens, its mirror's tokens (--hflip) and its label at row i; the shuffled training
    batches must be the tokens of the training view of the same images (flipped or not, as the
    image dataset flips them); and two processes' shards must hold every image exactly once."""
    out, cfg, tokenizer = base
    cache = torch.load(out / "tokens.pt", weights_only=True)
    datasets = {split: data.load_dataset(cfg, split) for split in ("train", "test")}
    test_ds = datasets["test"]
    test_images = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
    assert torch.equal(cache["test"]["labels"], torch.tensor([test_ds[i][1] for i in range(len(test_ds))]))
    assert torch.equal(cache["test"]["idx"].long(), encode(tokenizer, test_images))
    assert cache["test"].get("idx_flip") is None                      # no flips at test time
    images_ds = datasets["train"]
    images = torch.stack([images_ds[i][0] for i in range(len(images_ds))])
    want = {"idx": encode(tokenizer, images), "idx_flip": encode(tokenizer, images.flip(-1)),
            "labels": torch.tensor([images_ds[i][1] for i in range(len(images_ds))])}
    for key, value in want.items():                   # --hflip: the mirror's tokens, same label
        assert torch.equal(cache["train"][key].long(), value), key
    # every image and every mirror has tokens of its own, so no mix-up can pass unseen
    assert len(torch.unique(torch.cat([want["idx"], want["idx_flip"]]), dim=0)) == 2 * len(images)

    # Shuffled: train.py's batches (TokenDataset through the sampler) against the image
    # pipeline's batches for the same steps: each item's training view is image i or its
    # mirror, and its tokens must be that view's. Two epochs: two orders.
    steps = 6
    sampler = data.ShardedSampler(len(images_ds), cfg.gen_batch, cfg.seed)
    token_batches = data.step_loader(data.TokenDataset(cache["train"], cfg.seed), sampler, 0, steps)
    image_batches = data.step_loader(images_ds, sampler, 0, steps)
    flipped = 0
    for step, ((idx, labels), (views, view_labels)) in enumerate(zip(token_batches, image_batches)):
        epoch, items = sampler.batch(step)
        assert torch.equal(labels, view_labels) and torch.equal(labels, want["labels"][items])
        for tokens, view, i in zip(idx, views, items):
            mirrored = not torch.equal(view, images[i])
            assert torch.equal(view, images[i].flip(-1) if mirrored else images[i])
            assert torch.equal(tokens, want["idx_flip" if mirrored else "idx"][i])
            flipped += mirrored
    assert 0 < flipped < steps * cfg.gen_batch                     # both views were checked

    # Sharded: the encode_split that train.token_cache hands to data.cached_tokens, for two
    # processes. Rank r encodes images r, r + 2, ...: together every image, once.
    calls = []
    monkeypatch.setattr(train, "cached_tokens", lambda path, identity, encode_split: calls.append(
        (identity, encode_split)))
    train.token_cache(cfg, runtime.DistInfo(), tokenizer)
    monkeypatch.undo()
    identity, encode_split = calls[0]
    shards = [encode_split("train", rank, 2) for rank in (0, 1)]
    assert [len(s["labels"]) for s in shards] == [13, 12]
    for rank, shard in enumerate(shards):
        for key, value in want.items():
            assert torch.equal(shard[key].long(), value[rank::2]), (rank, key)
    # ...and merged back into dataset order by cached_tokens, as under torchrun
    path = tmp_path / "tokens.pt"
    merged = {}
    fake = TwoProcesses(lambda: merged.update(data.cached_tokens(path, identity, encode_split)))
    monkeypatch.setattr(data, "dist", fake)
    seen_by_rank1 = data.cached_tokens(path, identity, encode_split)
    monkeypatch.undo()
    for split in ("train", "test"):
        for key in ("idx", "idx_flip", "labels"):
            a, b, c = cache[split].get(key), merged[split].get(key), seen_by_rank1[split].get(key)
            assert (a is None and b is None and c is None) or (torch.equal(a, b) and torch.equal(a, c))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.pt"]       # part files removed


# --------------------------------------------------------------------------------------------
# Cosine attention's temperature
# --------------------------------------------------------------------------------------------

def attention_by_hand(attn, x, spans, temperature):
    """ScaleAttention written out: per scale and head, softmax(t_h * cos(q_i, k_j)) over the keys
    of the same scale (M-VAR), times the values, then the output projection. float64."""
    B, L, C = x.shape
    H = attn.num_heads
    W = attn.mat_qkv.weight                                     # rows: q (C), k (C), v (C)
    heads = lambda t: t.view(B, L, H, C // H)
    q, k = heads(x @ W[:C].T + attn.q_bias), heads(x @ W[C:2 * C].T)
    v = heads(x @ W[2 * C:].T + attn.v_bias)
    out = torch.zeros(B, L, H, C // H, dtype=x.dtype)
    for start, end in spans:
        for h in range(H):
            qh, kh = F.normalize(q[:, start:end, h], dim=-1), F.normalize(k[:, start:end, h], dim=-1)
            probs = (temperature[h] * qh @ kh.transpose(1, 2)).softmax(-1)
            out[:, start:end, h] = probs @ v[:, start:end, h]
    return attn.proj(out.flatten(2))


def test_attention_temperature_is_clamped_at_100():
    """VAR's cosine attention multiplies q.k / (|q| |k|) by exp(min(scale_mul_1H11, log 100)): a
    learned temperature, at most 100. A head whose parameter is above log 100 must attend with
    exactly 100; one below it, with its own exp(scale_mul_1H11). The reference is attention
    written out by hand; it tells apart no clamp, and the clamp at log 100 applied after exp."""
    torch.manual_seed(0)
    C, H = 32, 2
    attn = ScaleAttention(C, H, l2_norm=True, block_causal=False).double()
    spans = scale_spans((1, 2, 3))
    # nearly parallel inputs: the cosines differ little, so the temperature changes the output
    x = torch.randn(1, 1, C, dtype=torch.float64) + 0.05 * torch.randn(3, 14, C, dtype=torch.float64)
    with torch.no_grad():
        for wanted in ([500.0, 30.0], [4.0, 99.0], [1e4, 100.0]):
            attn.scale_mul_1H11.copy_(torch.tensor(wanted, dtype=torch.float64).log().view(1, H, 1, 1))
            temperature = [min(t, 100.0) for t in wanted]
            want = attention_by_hand(attn, x, spans, temperature)
            torch.testing.assert_close(attn(x, spans), want, rtol=1e-9, atol=1e-12)
            # the wrong clamps give other outputs, so the comparison above can fail
            unclamped = attention_by_hand(attn, x, spans, wanted)
            after_exp = attention_by_hand(attn, x, spans, [min(t, math.log(100.0)) for t in wanted])
            assert (after_exp - want).abs().max() > 1e-3
            if wanted[0] > 100:                         # the clamp matters for these inputs
                assert (unclamped - want).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# sample.py: which class is in which picture
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generator(base):
    """A train.py generator checkpoint (one step: the weights are nearly random) in the base run."""
    out, _, _ = base
    train.main(TINY + ["--out_dir", str(out), "--stage", "generator", "--stop_after", "1"])
    return out / "mvar.pt"


def record_generate(monkeypatch):
    """Wrap MVAR.generate: -> the list of (labels, images) of every call sample.py makes."""
    calls, real_generate = [], MVAR.generate

    def recording_generate(self, tokenizer, labels, *args, **kwargs):
        images = real_generate(self, tokenizer, labels, *args, **kwargs)
        calls.append((labels.clone(), images.clone()))
        return images
    monkeypatch.setattr(MVAR, "generate", recording_generate)
    return calls


def test_grid_columns_are_labelled_with_the_class_they_hold(generator, tmp_path, monkeypatch):
    """The grid's column j must hold only images generated with class classes[j], and be
    labelled with that class's name (data.SHAPE_CLASSES, the dataset's own list)."""
    calls, grids = record_generate(monkeypatch), []
    real_grid = sample.save_image_grid
    monkeypatch.setattr(sample, "save_image_grid", lambda images, path, ncol, **kw: (
        grids.append((images.clone(), ncol, kw)), real_grid(images, path, ncol, **kw)))
    classes = [5, 0, 3]
    sample.main(["--ckpt", str(generator), "--classes", "5,0,3", "--per_class", "3", "--batch", "4",
                 "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    (images, ncol, kw), = grids
    generated_with = torch.cat([labels for labels, _ in calls])
    assert torch.equal(images, torch.cat([img for _, img in calls]))    # the pictures, in order
    assert ncol == len(classes) and len(images) == 3 * ncol
    for i, label in enumerate(generated_with.tolist()):
        assert label == classes[i % ncol], f"image {i} (column {i % ncol}) has class {label}"
    assert list(kw["column_labels"]) == [data.SHAPE_CLASSES[c] for c in classes]


def test_npz_labels_name_the_class_of_each_image(generator, tmp_path, monkeypatch):
    """arr_1[i] must be the class image arr_0[i] was generated with."""
    calls = record_generate(monkeypatch)
    res = sample.main(["--ckpt", str(generator), "--npz", "7", "--classes", "6,1,4", "--batch", "3",
                       "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    written = np.load(res["npz"])
    generated_with = torch.cat([labels for labels, _ in calls])
    np.testing.assert_array_equal(written["arr_1"], generated_with.numpy())
    np.testing.assert_array_equal(written["arr_0"], data.to_uint8_nhw3(torch.cat([img for _, img in calls])))
    assert sorted(set(written["arr_1"].tolist())) == [1, 4, 6]
