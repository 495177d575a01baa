"""Does the sample grid show each class recognisably? A classifier answers (README "Measured results").

Trains a small CNN (plain torch, a few conv layers) on the training split of the dataset a
generator (or a --tokenizer) was trained on (train.py's loader: the built-in "shapes" data or
Fashion-MNIST), reports its accuracy on the real test images and on the tokenizer's reconstructions of them
(the ceiling: a sample cannot be drawn better than the tokenizer can draw), then its accuracy
on N generated samples per class from each generator checkpoint given (--ckpt, and --ckpt2 to
compare M-VAR with VAR).
A generator whose samples are classified as well as real images draws every class
recognisably; the per-class table shows which classes it gets wrong.

Recognisable is not the whole story: samples can all be one prototype per class. With
--fd_per_class n, the classifier's features (its flattened conv map, before the last layer; for
RGB data the grey, shape-only classifier's) also give, for n images per class of each row (real
test images, their reconstructions, and the first checkpoint's samples at each --fd_guidance
guidance), against the features of the real training images (all, or --train_images of them):
  - the Frechet distance (FID's formula in this classifier's feature space: lower is closer to
    the real distribution; it depends on n, so every row uses the same n);
  - the within-class diversity ratio: the mean distance of a class's features to their class
    mean, divided by the same for n real test images per class, averaged over classes (1.0:
    as varied as real images; below 1: samples closer to a prototype).

For RGB data the built-in classes differ in colour *and* shape, so a colour-blind second
classifier (trained and tested on luminance only) is reported too: it checks the shape.
Classifier weights are cached in the folder of the first checkpoint given (classifier_<mode>.pt)
and reused while the data settings are unchanged (copy the file to score other run folders with
the same classifier); the results go to sample_quality.json there (tokenizer_quality.json for
--tokenizer). Sampling uses the checkpoint's guidance / top-k / top-p unless overridden, and a
fixed seed (--sample_seed draws other samples for the same classifier: the table's noise).

    python benchmarks/sample_quality.py --ckpt runs/tiny/mvar.pt --ckpt2 runs/tiny/var.pt
    python benchmarks/sample_quality.py --ckpt runs/fashion-mnist/mvar.pt --per_class 50 --guidance 2
    python benchmarks/sample_quality.py --dataset fashion-mnist     # classifier only, no generator
    python benchmarks/sample_quality.py --ckpt runs/fashion-mnist/mvar.pt --fd_per_class 200
    python benchmarks/sample_quality.py --tokenizer runs/x/tokenizer.pt --fd_per_class 200

--tokenizer scores a tokenizer alone, before any generator is trained on it: its reconstructions'
accuracy and, with --fd_per_class, their row of the table (the ceiling a generator can reach);
the sampling options then have nothing to do.

Cost on a 2-core CPU: each classifier trains for 400 steps of 128 images, about a minute for
16px shapes and two for 28px Fashion-MNIST; sampling 20 images per class of a small generator
takes seconds to a minute.

Shape glossary:
    N   images        C  image channels (1 grey, 3 RGB)     H, W  image height, width
    B   batch         M  number of classes       F  classifier feature dimension
"""
import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from runtime import resolve_device  # noqa: E402
from sample import sample_images  # noqa: E402


class SmallCNN(nn.Module):
    """A stride-2 conv to half resolution, then two conv3x3 + 2x max-pool stages (each conv
    followed by BatchNorm and ReLU), then a linear layer on the flattened (64, S/8, S/8) map
    (kept spatial: where the parts of a garment sit is what tells a shirt from a coat).
    (B, C, S, S) in [-1, 1] -> logits (B, M), for any even S (the pools round up, so 28 px
    Fashion-MNIST gives 14 -> 7 -> 4). ~35k parameters at S = 32: small enough to train on a
    busy 2-core CPU in a minute or two."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        if image_size % 2:
            raise ValueError(f"SmallCNN needs an even image size, got {image_size}")

        def conv(ci, co, k, stride):
            return [nn.Conv2d(ci, co, k, stride, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU()]

        self.features = nn.Sequential(*conv(in_channels, 16, 4, 2),
                                      *conv(16, 32, 3, 1), nn.MaxPool2d(2, ceil_mode=True),
                                      *conv(32, 64, 3, 1), nn.MaxPool2d(2, ceil_mode=True))
        self.fc = nn.Linear(64 * math.ceil(image_size / 8) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def to_mode(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, C, H, W) -> the classifier's input: unchanged ("rgb"), or luminance (N, 1, H, W)
    ("grey": Rec. 601 weights, so a classifier cannot tell classes apart by colour)."""
    if mode == "grey" and x.shape[1] == 3:
        return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).contiguous()
    return x


def split_tensors(ds, limit: int = 0):
    """A train.py dataset (evaluation view) -> images (N, C, H, W) in [-1, 1], labels (N,)."""
    n = len(ds) if not limit else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def predict(clf: nn.Module, x: torch.Tensor, device, batch: int = 500) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> predicted class (N,)."""
    clf.eval()
    return torch.cat([clf(x[i:i + batch].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch)])


@torch.no_grad()
def features(clf: SmallCNN, x: torch.Tensor, device, batch: int = 500) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> the classifier's features (N, F), float64."""
    clf.eval()
    return torch.cat([clf.features(x[i:i + batch].to(device)).flatten(1).double().cpu()
                      for i in range(0, len(x), batch)])


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Between Gaussians fitted to features (N1, F) and (N2, F):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), square roots by eigh."""
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    ev, vec = torch.linalg.eigh(s1)
    s1_half = vec @ torch.diag(ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross).item()


def class_spread(f: torch.Tensor, y: torch.Tensor, M: int) -> torch.Tensor:
    """Features (N, F), labels (N,) -> (M,): each class's mean distance to its own mean."""
    return torch.stack([(f[y == c] - f[y == c].mean(0)).norm(dim=1).mean() for c in range(M)])


def train_classifier(x, y, num_classes: int, steps: int, device, seed: int = 0, batch: int = 128):
    """`steps` Adam steps on random batches, cosine learning rate, light augmentation (each
    batch shifted by a random -2..2 pixels in each direction, wrapping around, so the classifier
    does not depend on exact positions).
    x (N, C, H, W), y (N,) -> SmallCNN. A fixed step count (not epochs) gives a small
    dataset as much training as a big one."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = SmallCNN(x.shape[1], num_classes, x.shape[-1]).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    clf.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        xb = x[idx]
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(clf(xb.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


def get_classifier(cfg, mode: str, train_x, train_y, num_classes, args, device, cache_dir):
    """Load the cached classifier for (data settings, mode, recipe) from cache_dir, or train
    and cache it. Returns (classifier, seconds spent training, 0 if cached)."""
    ident = {**{k: getattr(cfg, k) for k in train.DATA_FIELDS}, "mode": mode,
             "train_images": len(train_x), "steps": args.steps, "seed": args.seed}
    path = Path(cache_dir) / f"classifier_{mode}.pt" if cache_dir else None
    in_ch = 1 if mode == "grey" else train_x.shape[1]
    if path and path.exists():
        ck = runtime.load_checkpoint(path, "classifier")
        if ck["ident"] == ident:
            clf = SmallCNN(in_ch, num_classes, train_x.shape[-1]).to(device)
            clf.load_state_dict(ck["model"])
            return clf.eval(), 0.0
    t0 = time.perf_counter()
    clf = train_classifier(to_mode(train_x, mode), train_y, num_classes, args.steps, device, args.seed)
    seconds = time.perf_counter() - t0
    if path:
        runtime.save_checkpoint({"kind": "classifier", "ident": ident,
                               "model": {k: v.cpu() for k, v in clf.state_dict().items()}}, path)
    return clf, seconds


@torch.no_grad()
def reconstruct(tok, x: torch.Tensor, device, batch: int = 200) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> the tokenizer's reconstructions, same shape."""
    return torch.cat([tok.idx_to_img(tok.img_to_idx(x[j:j + batch].to(device))).cpu()
                      for j in range(0, len(x), batch)])


def settings_of(ck: dict, args) -> dict:
    """Sampling settings: the checkpoint's, unless given on the command line."""
    saved = runtime.sampling_defaults(ck)
    given = {"guidance": args.guidance, "top_k": args.top_k, "top_p": args.top_p}
    return {**{k: saved[k] if v is None else v for k, v in given.items()}, "more_smooth": False}


def spread_table(args, clf, mode, train_x, test_x, test_y, model, tok, ck, M, device) -> list:
    """The Frechet distance / diversity table of the docstring for a loaded generator (model,
    tokenizer, checkpoint dict; model None: the real and reconstruction rows only), printed;
    returns its rows."""
    n = args.fd_per_class
    if n < 2:
        raise ValueError(f"--fd_per_class must be at least 2 (a spread needs two images), got {n}")
    pick = torch.cat([torch.nonzero(test_y == c).flatten()[:n] for c in range(M)])
    if len(pick) < n * M:
        raise ValueError(f"--fd_per_class {n}: the test split has fewer images than that of some class")
    labels = test_y[pick]                                   # n of class 0, then n of class 1, ...
    feats = lambda x: features(clf, to_mode(x, mode), device)
    rows = [("real test images", feats(test_x[pick])),
            ("tokenizer reconstructions", feats(reconstruct(tok, test_x[pick], device)))]
    for strength in (args.fd_guidance if model is not None else []):  # no generator, no samples
        settings = {**settings_of(ck, args), "guidance": strength}
        images, _, _ = sample_images(model, tok, labels, args.batch, settings, device, seed=args.sample_seed,
                                     desc=f"sampling guidance {strength:g}")
        rows.append((f"{model.cfg.arch} samples, guidance {strength:g}", feats(images * 2 - 1)))
    reference = feats(train_x)
    real_spread = class_spread(rows[0][1], labels, M)
    print(f"\nIn the classifier's feature space ({reference.shape[1]} features), n = {n} images per "
          f"class ({n * M} in all) per row, against {len(train_x)} real training images:")
    if n * M <= reference.shape[1]:
        print(f"  (n * classes = {n * M} <= {reference.shape[1]} features: the covariances are "
              f"singular and the distances unstable; use --fd_per_class > {reference.shape[1] // M})")
    print(f"{'':38} {'Frechet distance':>17} {'diversity vs real':>18}")
    out = []
    for name, f in rows:
        fd = frechet_distance(f, reference)
        ratio = (class_spread(f, labels, M) / real_spread).mean().item()
        print(f"{name:38} {fd:17.2f} {ratio:18.2f}")
        out.append({"name": name, "images": len(f), "frechet_distance": fd, "diversity_ratio": ratio})
    return out


def data_config(args, ckpts, kind="generator"):
    """The train.py config whose data the checkpoints (of `kind`: generator or tokenizer) saw,
    from the first one, or a preset for --dataset when no checkpoint is given."""
    if ckpts:
        saved = [runtime.load_checkpoint(p, kind)["config"]["train"] for p in ckpts]
        data = [{k: s[k] for k in train.DATA_FIELDS} for s in saved]
        if any(d != data[0] for d in data):
            raise ValueError(f"--ckpt and --ckpt2 were trained on different data: {data}")
        if args.dataset and args.dataset != saved[0]["dataset"]:
            raise ValueError(f"--dataset {args.dataset} but {ckpts[0]} was trained on {saved[0]['dataset']}")
        fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
        cfg = train.make_config(**{k: v for k, v in saved[0].items() if k in fields})
    else:
        dataset = args.dataset or "shapes"
        cfg = train.make_config("tiny" if dataset == "shapes" else dataset, dataset=dataset)
    if cfg.dataset == "folder":
        raise ValueError("this benchmark trains its classifier on small datasets (shapes, "
                         "Fashion-MNIST, CIFAR-10); for ImageNet use FID on sample.py --npz")
    if args.data_dir:
        cfg.data_dir = args.data_dir
    return cfg


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="", help="generator checkpoint (RUN/mvar.pt)")
    p.add_argument("--ckpt2", default="", help="a second one to compare (RUN/var.pt)")
    p.add_argument("--tokenizer", default="", help="instead of a generator: score this RUN/tokenizer.pt "
                   "(its reconstructions only; the sampling options are unused)")
    p.add_argument("--dataset", default="", choices=("", "shapes", "fashion-mnist", "cifar10"),
                   help="without --ckpt / --tokenizer: which dataset (default shapes); with one, a check")
    p.add_argument("--data_dir", default="", help="dataset folder, if not where train.py looks")
    p.add_argument("--per_class", type=int, default=20, help="generated samples per class")
    p.add_argument("--guidance", "--cfg", type=float, default=None,
                   help="classifier-free guidance strength (default: the checkpoint's)")
    p.add_argument("--top_k", type=int, default=None, help="top-k (default: the checkpoint's)")
    p.add_argument("--top_p", type=float, default=None, help="top-p (default: the checkpoint's)")
    p.add_argument("--train_images", type=int, default=0, help="classifier training images (0 = all)")
    p.add_argument("--steps", type=int, default=400, help="classifier training steps (batch 128)")
    p.add_argument("--batch", type=int, default=50, help="generator batch")
    p.add_argument("--fd_per_class", type=int, default=0,
                   help="images per class for the Frechet distance / diversity table (0: skip it)")
    p.add_argument("--fd_guidance", "--fd_cfgs", type=float, nargs="+", default=[0.0, 1.5, 3.0],
                   help="guidance strengths sampled for that table")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and of the samples")
    p.add_argument("--sample_seed", type=int, default=None,
                   help="seed of the samples only (default: --seed); another value with the same "
                        "cached classifier shows how much a table moves from one draw to the next")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--no_cache", action="store_true", help="always retrain the classifier")
    args = p.parse_args(argv)
    args.sample_seed = args.seed if args.sample_seed is None else args.sample_seed
    if args.tokenizer and (args.ckpt or args.ckpt2):
        p.error("--ckpt already scores its generator's tokenizer; drop --tokenizer")
    gens = [c for c in (args.ckpt, args.ckpt2) if c]
    ckpts = gens or ([args.tokenizer] if args.tokenizer else [])   # the data settings come from these
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    cfg = data_config(args, ckpts, "generator" if gens else "tokenizer")
    loaded = [runtime.load_generator(path, device) for path in gens]    # (model, tokenizer, ckpt)
    # (model, tokenizer, checkpoint) behind the reconstruction rows; model None for --tokenizer
    first = (None, *runtime.load_trained_tokenizer(args.tokenizer, device)) if args.tokenizer else \
        (loaded[0] if loaded else None)

    train_ds, test_ds = data.load_dataset(cfg, "train", download_ok=False), data.load_dataset(cfg, "test", download_ok=False)
    M = train_ds.num_classes
    train_x, train_y = split_tensors(train_ds, args.train_images)
    test_x, test_y = split_tensors(test_ds)
    modes = ["rgb", "grey"] if train_x.shape[1] == 3 else ["grey"]
    cache_dir = None if args.no_cache or not ckpts else Path(ckpts[0]).parent
    clfs = {}
    for mode in modes:
        clfs[mode], secs = get_classifier(cfg, mode, train_x, train_y, M, args, device, cache_dir)
        print(f"classifier ({mode}): " + (f"trained on {len(train_x)} images in {secs:.0f} s" if secs
                                          else f"loaded from {cache_dir}/classifier_{mode}.pt"))

    def score(x, y):
        """-> {mode: accuracy}, {mode: per-class accuracy, M values (None: no image of that class)}"""
        acc, per = {}, {}
        for mode in modes:
            hit = (predict(clfs[mode], to_mode(x, mode), device) == y).float()
            acc[mode] = hit.mean().item()
            per[mode] = [hit[y == c].mean().item() if (y == c).any() else None for c in range(M)]
        return acc, per

    rows = [("real test images", len(test_y), *score(test_x, test_y), None)]
    if first:
        # The ceiling for any generator on this tokenizer: its reconstructions of the test
        # images (a sample can only be as recognisable as what the tokenizer can draw).
        _, tok, _ = first
        recon = reconstruct(tok, test_x, device)
        rows.append(("tokenizer reconstructions of test", len(test_y), *score(recon, test_y), None))
    for model, tok, ck in loaded:
        settings = settings_of(ck, args)
        labels = torch.arange(M).repeat_interleave(args.per_class)
        images, _, secs = sample_images(model, tok, labels, args.batch, settings, device,
                                        seed=args.sample_seed, desc=f"sampling {model.cfg.arch}")
        name = f"{model.cfg.arch} samples (guidance {settings['guidance']:g}, step {ck['step']})"
        rows.append((name, len(labels), *score(images * 2 - 1, labels), settings))
        print(f"{name}: {len(labels)} images in {secs:.0f} s")

    names = data.SHAPE_CLASSES if cfg.dataset == "shapes" else [str(c) for c in range(M)]
    head = {"rgb": "acc colour+shape", "grey": "acc grey (shape)"} if len(modes) == 2 else {"grey": "accuracy"}
    print(f"\nSample quality on {cfg.dataset} ({cfg.image_size}px): accuracy of a CNN trained on "
          f"{len(train_x)} real training images")
    print(f"{'':38} {'images':>7} " + " ".join(f"{head[m]:>17}" for m in modes))
    for name, n, acc, _, _ in rows:
        print(f"{name:38} {n:>7} " + " ".join(f"{100 * acc[m]:>16.1f}%" for m in modes))
    mode = modes[-1]
    print("\nPer-class accuracy (%)" + (f", {head[mode]}:" if len(modes) == 2 else ":"))
    print(f"{'':38} " + " ".join(f"{c[:9]:>9}" for c in names))
    for name, _, _, per, _ in rows:
        print(f"{name:38} " + " ".join(f"{100 * a:>9.0f}" if a is not None else f"{'-':>9}" for a in per[mode]))

    result = {"dataset": cfg.dataset, "image_size": cfg.image_size, "checkpoints": ckpts,
              "classifier_train_images": len(train_x), "seed": args.seed, "sample_seed": args.sample_seed,
              "rows": [{"name": r[0], "images": r[1], "accuracy": r[2], "per_class": r[3], "settings": r[4]}
                       for r in rows]}
    if args.fd_per_class and ckpts:
        result["spread"] = spread_table(args, clfs[modes[-1]], modes[-1], train_x, test_x, test_y,
                                        *first, M, device)
    if ckpts:
        out = Path(ckpts[0]).parent / ("tokenizer_quality.json" if args.tokenizer else "sample_quality.json")
        runtime.write_json(result, out)
        print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
