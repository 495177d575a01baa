"""data.py -- datasets in, pictures out. Not needed to understand M-VAR.

The plumbing that feeds train.py and sample.py; nothing in it is part of the method:

  1. Datasets: a built-in procedural one (no download), Fashion-MNIST (IDX .gz files), CIFAR-10
     (python pickles), class-per-folder trees (the ImageNet layout). Each returns
     (image float (Cimg, S, S) in [-1, 1], label int) and has .num_classes and .class_names.
  2. ShardedSampler: the batch of every step is a pure function of (seed, step, rank), so a
     checkpoint's step number is the whole data-loader state and a resumed run sees the same
     batches as an uninterrupted one.
  3. The token cache file: train.py encodes every image once (train.encode_images); this part
     stores the result, reuses it while the tokenizer and the data are unchanged, and merges
     the shards that torchrun's processes encode.
  4. Pictures: PNG grids (cells upscaled so they can be seen, labelled with class names), the
     training's reconstruction and sample grids, the loss plot, and the uint8 layout of FID
     .npz files.

Key convention of every dataset: ds[i] is the evaluation view (centre crop, no flip); ds[(i,
epoch)] is the training view, whose random crop / flip comes from a generator seeded by (seed,
epoch, i), so augmentation is identical after a resume and in any DataLoader worker.

Shape letters: B batch, Cimg image channels (1 or 3), S image side, L tokens of all scales.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime import save_checkpoint


# ============================================================================================
# 1. Datasets
# ============================================================================================

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "checker")
_SHAPE_COLORS = np.array([(230, 60, 50), (60, 200, 70), (60, 90, 230), (235, 210, 50),
                          (210, 70, 210), (50, 210, 220), (245, 140, 40), (235, 235, 235)])


def make_shapes(n: int, image_size: int = 32, seed: int = 0):
    """The built-in dataset: coloured shapes/stripes, one class per kind (see SHAPE_CLASSES).

    Each class has its own shape *and* colour, with random position, size, stripe period
    and colour jitter, on a dark noisy background -- distinct enough for a small classifier
    (so sample quality can be scored), varied enough to be worth modelling.
    Returns images uint8 (n, 3, S, S) and labels int64 (n,), a pure function of the seed.
    """
    rng = np.random.default_rng(seed)
    S = image_size
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES))
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    images = np.empty((n, 3, S, S), np.uint8)
    for i, c in enumerate(labels):
        cy, cx = S / 2 + rng.uniform(-S / 8, S / 8, size=2)
        r = S * rng.uniform(0.22, 0.36)
        dy, dx = yy - cy, xx - cx
        period = rng.uniform(S / 8, S / 4)
        phase = rng.uniform(0, period)
        d2, box = dy**2 + dx**2, np.maximum(abs(dy), abs(dx))   # squared distance, "square radius"
        masks = {   # class name -> its mask; only this image's class is computed
            "circle": lambda: d2 <= r**2,
            "square": lambda: box <= 0.8 * r,
            "triangle": lambda: (dy <= 0.8 * r) & (dy >= 2 * abs(dx) - 1.1 * r),   # apex up: 3 half-planes
            "ring": lambda: (d2 <= r**2) & (d2 >= (0.55 * r) ** 2),
            "cross": lambda: ((abs(dy) <= 0.25 * r) | (abs(dx) <= 0.25 * r)) & (box <= r),
            "h-stripes": lambda: ((yy + phase) % period) < period / 2,
            "v-stripes": lambda: ((xx + phase) % period) < period / 2,
            "checker": lambda: (((yy + phase) // (period / 1.5) + (xx + phase) // (period / 1.5)) % 2) == 0,
        }
        mask = masks[SHAPE_CLASSES[c]]()
        color = np.clip(_SHAPE_COLORS[c] + rng.integers(-25, 26, size=3), 0, 255)
        background = rng.integers(0, 40, size=(3, 1, 1)) + rng.integers(0, 12, size=(3, S, S))
        images[i] = np.where(mask[None], color[:, None, None], background).astype(np.uint8)
    return images, torch.from_numpy(labels.astype(np.int64))


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one training draw, independent of workers/resumes."""
    return np.random.default_rng([seed, epoch, index])


def _split_key(key):
    """ds[i] -> (i, None) (evaluation view); ds[(i, epoch)] -> (i, epoch) (training view)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


class TensorImages(torch.utils.data.Dataset):
    """A dataset held in memory as uint8 (n, Cimg, S, S) plus int64 labels (n,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names,
                 hflip: bool = False, seed: int = 0, name: str = "dataset"):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: expected uint8 images (n, Cimg, S, S), got {images.dtype} {tuple(images.shape)}")
        check_labels(labels, len(class_names), name)
        self.images, self.labels = images, labels
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.hflip, self.seed, self.name = hflip, seed, name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        img = self.images[i].float() / 127.5 - 1.0           # uint8 [0, 255] -> [-1, 1]
        if epoch is not None and self.hflip and _item_rng(self.seed, epoch, i).random() < 0.5:
            img = img.flip(-1)
        return img, int(self.labels[i])


def check_labels(labels: torch.Tensor, num_classes: int, name: str):
    """Labels must be integers in [0, num_classes): catch a wrong file before training."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found "
                         f"[{int(labels.min())}, {int(labels.max())}] -- wrong or corrupt label file?")


# --- Fashion-MNIST: IDX files (big-endian header, then raw bytes), gzipped --------------------

FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (.gz or plain) -> uint8 array of its dims.

    Format: 2 zero bytes, a type byte (0x08 = uint8), the number of dims, then each dim as a
    big-endian uint32, then the data in C order.
    """
    path = str(path)
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            data = fh.read()
    except (OSError, EOFError) as e:                   # BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read it as {'gzip' if path.endswith('.gz') else 'a file'} "
                         f"({e}); the download is probably corrupt -- delete and re-fetch it") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()}, "
                         "expected 0000 08 <ndim>)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header cut short")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    if len(payload) != math.prod(dims):
        raise ValueError(f"{path}: IDX dims {dims} need {math.prod(dims)} bytes, file has "
                         f"{len(payload)} -- truncated or corrupt")
    return np.frombuffer(payload, np.uint8).reshape(dims)


def load_fashion_mnist(root, split: str, image_size: int = 28):
    """Fashion-MNIST split -> uint8 (N, 1, S, S), int64 (N,). S = 28 keeps the images as they
    are; a larger S zero-pads them (the background is black), centred."""
    images, labels = (read_idx(Path(root) / name) for name in FASHION_FILES[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: expected images (N, 28, 28) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")
    h, w = images.shape[1:]
    if image_size < max(h, w):
        raise ValueError(f"--image_size {image_size} is smaller than Fashion-MNIST's {h}x{w}")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    x = np.zeros((len(images), 1, image_size, image_size), np.uint8)
    x[:, 0, top:top + h, left:left + w] = images
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


# --- CIFAR-10: python pickles of {b"data": uint8 (10000, 3072), b"labels": [...]} -------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _CifarUnpickler(pickle.Unpickler):
    """Pickle can run arbitrary code; the CIFAR batches only need numpy arrays, so refuse
    everything else."""

    def find_class(self, module, name):
        numpy_ok = module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar")
        if numpy_ok or (module, name) == ("_codecs", "encode"):   # protocol-2 bytes from Python 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def load_cifar10(root, split: str):
    """CIFAR-10 split -> uint8 (N, 3, 32, 32), int64 (N,)."""
    xs, ys = [], []
    for name in CIFAR_FILES[split]:
        path = Path(root) / name
        try:
            with open(path, "rb") as fh:
                batch = _CifarUnpickler(fh, encoding="bytes").load()
            data, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the CIFAR-10 folder must hold "
                                    f"{', '.join(CIFAR_FILES['train'] + CIFAR_FILES['test'])}")
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                             "delete the folder and re-download it") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape}, {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))              # stored as R plane, G plane, B plane
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# --- class-per-folder trees (ImageNet layout: root/train/<class>/*.JPEG, root/val/<class>/*) --

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


class ImageFolder(torch.utils.data.Dataset):
    """Class-per-folder images (classes = sorted folder names), VAR's preprocessing:
    resize the shorter side to 1.125 x S (Lanczos), crop S x S (random when training, centre
    for evaluation), optional random flip, RGB, [-1, 1]."""

    def __init__(self, root, image_size: int, hflip: bool = False, seed: int = 0, classes=None):
        """classes: the class names in label order (default: root's sorted sub-folders). The
        validation split passes the training split's list, so label i names the same class."""
        from PIL import Image                          # Pillow ships with matplotlib
        self._Image = Image
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not found:
            raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image>")
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{root} has class folders the training split lacks: {unknown[:5]}")
        self.files, labels = [], []
        for c, name in enumerate(self.classes):
            if not (root / name).is_dir():
                continue                               # a class absent from this split
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.files += files
            labels += [c] * len(files)
        self.labels, self.class_names = torch.tensor(labels), self.classes
        self.num_classes, self.image_size, self.hflip, self.seed = len(self.classes), image_size, hflip, seed
        self.mid_size = round(image_size * 1.125)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        try:
            with self._Image.open(self.files[i]) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError) as e:            # PIL raises these for broken files
            raise ValueError(f"{self.files[i]}: cannot decode the image ({e})") from e
        w, h = im.size
        if min(w, h) != self.mid_size:                 # shorter side -> 1.125 x S
            s = self.mid_size / min(w, h)
            im = im.resize((max(self.mid_size, round(w * s)), max(self.mid_size, round(h * s))),
                           self._Image.LANCZOS)
        x = torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1)   # (3, h, w)
        S, (h, w) = self.image_size, x.shape[1:]
        if epoch is None:
            top, left, flip = (h - S) // 2, (w - S) // 2, False
        else:
            rng = _item_rng(self.seed, epoch, i)
            top, left = int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))
            flip = self.hflip and rng.random() < 0.5
        x = x[:, top:top + S, left:left + S].float() / 127.5 - 1.0
        return (x.flip(-1) if flip else x), int(self.labels[i])


# --- locating / downloading, and the one entry point ------------------------------------------

def _download(url: str, dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    urllib.request.urlretrieve(url, tmp)
    tmp.replace(dest)


def _missing(name: str, looked, how_to_get: str):
    return FileNotFoundError(f"{name} not found: looked in {', '.join(map(str, looked))}. {how_to_get}")


def load_dataset(cfg, split: str, download_ok: bool = True):
    """The `split` ("train" | "test") of cfg.dataset (a train.TrainConfig) as a Dataset with
    .labels, .num_classes and .class_names.

    Training splits get the training view (random crop/flip) through ds[(i, epoch)] keys;
    see the key convention at the top of this section.
    """
    hflip = cfg.hflip and split == "train"
    if cfg.dataset == "shapes":
        n = cfg.shapes_train if split == "train" else cfg.shapes_test
        images, labels = make_shapes(n, cfg.image_size, seed=cfg.seed * 2 + (split == "test"))
        ds = TensorImages(torch.from_numpy(images), labels, SHAPE_CLASSES, hflip, cfg.seed, "shapes")
    elif cfg.dataset == "fashion-mnist":
        look = [cfg.data_dir] if cfg.data_dir else ["/usr/share/datasets/fashion-mnist", "data/fashion-mnist"]
        root = next((Path(c) for c in look if (Path(c) / FASHION_FILES[split][0]).exists()), None)
        if root is None and cfg.download and download_ok:
            root = Path(cfg.data_dir or "data/fashion-mnist")
            for f in FASHION_FILES["train"] + FASHION_FILES["test"]:
                if not (root / f).exists():
                    _download(FASHION_URL + f, root / f)
        if root is None:
            raise _missing("Fashion-MNIST", look,
                           "Install the Debian package `dataset-fashion-mnist` (it fills "
                           "/usr/share/datasets/fashion-mnist), or pass --download to fetch it "
                           "into data/fashion-mnist, or point --data_dir at a folder with "
                           + ", ".join(FASHION_FILES["train"] + FASHION_FILES["test"]) + ".")
        images, labels = load_fashion_mnist(root, split, cfg.image_size)
        ds = TensorImages(images, labels, FASHION_CLASSES, hflip, cfg.seed, f"Fashion-MNIST {root}")
    elif cfg.dataset == "cifar10":
        if cfg.image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; got --image_size {cfg.image_size}")
        look = ([cfg.data_dir, Path(cfg.data_dir) / "cifar-10-batches-py"] if cfg.data_dir
                else ["data/cifar-10-batches-py"])
        root = next((Path(c) for c in look if (Path(c) / "test_batch").exists()), None)
        if root is None and cfg.download and download_ok:
            parent = Path(cfg.data_dir or "data")
            archive = parent / "cifar-10-python.tar.gz"
            _download(CIFAR_URL, archive)
            with tarfile.open(archive) as tar:   # the "data" filter refuses unsafe paths
                tar.extractall(parent, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            root = parent / "cifar-10-batches-py"
        if root is None:
            raise _missing("CIFAR-10", look, f"Pass --download to fetch {CIFAR_URL} into data/, "
                           "or point --data_dir at the extracted cifar-10-batches-py folder.")
        images, labels = load_cifar10(root, split)
        ds = TensorImages(images, labels, CIFAR_CLASSES, hflip, cfg.seed, f"CIFAR-10 {root}")
    else:                                                # "folder"
        sub = "train" if split == "train" else "val"
        if not cfg.data_dir:
            raise ValueError("--dataset folder needs --data_dir ROOT with ROOT/train/<class>/* "
                             "and ROOT/val/<class>/* (the ImageNet layout)")
        if not (Path(cfg.data_dir) / sub).is_dir():
            raise _missing(f"image folder '{sub}'", [Path(cfg.data_dir) / sub],
                           f"--data_dir must hold {sub}/<class>/<image files> (for ImageNet, "
                           "the validation images sorted into class folders).")
        # label order = the training folders' (the train split's own: ImageFolder's default)
        classes = sorted(d.name for d in (Path(cfg.data_dir) / "train").iterdir() if d.is_dir())
        ds = ImageFolder(Path(cfg.data_dir) / sub, cfg.image_size, hflip, cfg.seed, classes)
    if cfg.subset:
        ds = _Subset(ds, cfg.subset)
    return ds


class _Subset(torch.utils.data.Dataset):
    """The first n items of a dataset (keeps .num_classes and the key convention)."""

    def __init__(self, ds, n: int):
        self.ds, self.n, self.num_classes = ds, min(n, len(ds)), ds.num_classes
        self.class_names, self.labels = ds.class_names, ds.labels[:self.n]

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return self.ds[key]


# ============================================================================================
# 2. Sampler: the batch of every step is a pure function of (seed, step, rank)
# ============================================================================================

class ShardedSampler:
    """Seeded, resumable, rank-sharded batches (what DistributedSampler does, per step).

    Epoch e visits a permutation of the N items drawn from a generator seeded with
    (seed, e); step s of that epoch takes the next `global_batch` items, and rank r keeps
    every world_size-th of them. The last incomplete global batch is dropped. Because a
    batch depends only on (seed, step), the checkpoint's step *is* the sampler state.
    """

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch of {global_batch}; "
                             "lower the batch size or use more data")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // global_batch
        self._perm_epoch, self._perm = None, None

    def batch(self, step: int) -> tuple[int, list[int]]:
        """-> (epoch, this rank's item indices for optimizer step `step`)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        chunk = self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]
        return epoch, chunk[self.rank::self.world_size].tolist()


def step_loader(ds, sampler: ShardedSampler, start: int, end: int, num_workers: int = 0, pin: bool = False):
    """Iterate the training batches of steps start..end-1 -> (images (B,C,H,W), labels (B,)).

    Its batch sampler yields, step by step, the keys [(index, epoch), ...] of the step's items:
    the training view of every item (see the key convention at the top). The DataLoader gets its
    own generator: otherwise starting it draws a seed from the global RNG, and a resumed run
    would see different dropout noise than an uninterrupted one.
    """
    def step_keys():
        for step in range(start, end):
            epoch, idx = sampler.batch(step)
            yield [(i, epoch) for i in idx]
    return torch.utils.data.DataLoader(ds, batch_sampler=step_keys(), num_workers=num_workers,
                                       pin_memory=pin, generator=torch.Generator().manual_seed(sampler.seed))


# ============================================================================================
# 3. The token cache file
# ============================================================================================

class TokenDataset(torch.utils.data.Dataset):
    """Cached tokens of one split: ds[key] -> (idx (L,) int64, label int). The training view
    ds[(i, epoch)] picks the flipped copy with probability 1/2 when the cache has one."""

    def __init__(self, split: dict, seed: int = 0):
        self.idx, self.labels, self.flip = split["idx"], split["labels"], split.get("idx_flip")
        self.seed = seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        use_flip = self.flip is not None and epoch is not None and _item_rng(self.seed, epoch, i).random() < 0.5
        return (self.flip if use_flip else self.idx)[i].long(), int(self.labels[i])


def cached_tokens(path, identity: dict, encode_split) -> dict:
    """RUN/tokens.pt: {"kind": "tokens", "identity", "num_classes", "class_names",
    "train": {"idx", "idx_flip", "labels"}, "test": {...}}, loaded with mmap (a big cache is
    paged in, not copied).

    Reused while `identity` (the tokenizer file's sha256 and the data settings) is unchanged;
    rebuilt otherwise. encode_split(split, rank, world) -> {"idx": (n, L), "idx_flip": (n, L)
    or None, "labels": (n,), "num_classes", "class_names"} encodes the items rank, rank +
    world, ... of the split. Under torchrun each process writes its share to a part file and
    rank 0 interleaves the parts back into dataset order.
    """
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if path.exists():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            reason = "the tokenizer or the data settings changed"
        except Exception as e:
            cache, reason = {}, f"it is unreadable ({type(e).__name__})"
        if isinstance(cache, dict) and cache.get("identity") == identity:
            return _labels_checked(cache)
        if rank == 0:
            print(f"token cache {path} is stale ({reason}); rebuilding it")
    part = lambda split, r: path.with_name(f".{path.stem}.{split}.part{r}")
    for split in ("train", "test"):
        save_checkpoint(encode_split(split, rank, world), part(split, rank))
    if world > 1:
        dist.barrier()
    if rank == 0:
        cache = {"kind": "tokens", "identity": identity}
        for split in ("train", "test"):
            parts = [torch.load(part(split, r), weights_only=True) for r in range(world)]
            cache["num_classes"], cache["class_names"] = parts[0]["num_classes"], parts[0]["class_names"]
            cache[split] = {}
            for key in ("idx", "idx_flip", "labels"):
                if parts[0][key] is None:
                    continue
                # Part r holds items r, r+world, r+2*world, ...: interleave them back.
                full = parts[0][key].new_zeros((sum(len(p[key]) for p in parts), *parts[0][key].shape[1:]))
                for r, p in enumerate(parts):
                    full[r::world] = p[key]
                cache[split][key] = full
        save_checkpoint(cache, path)
        for split in ("train", "test"):
            for r in range(world):
                part(split, r).unlink()
    if world > 1:
        dist.barrier()
    return _labels_checked(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def _labels_checked(cache: dict) -> dict:
    for split in ("train", "test"):
        check_labels(cache[split]["labels"], cache["num_classes"], f"token cache ({split})")
    return cache


# ============================================================================================
# 4. Pictures
# ============================================================================================

def save_image_grid(images: torch.Tensor, path, ncol: int, column_labels=(), row_labels=(),
                    min_cell: int = 64) -> None:
    """images (n, Cimg, S, S) in [0, 1] -> a PNG grid, ncol images per row, 2 px white gaps.

    Each image is upscaled by a whole factor (nearest neighbour: every token-sized block stays
    a crisp block) until it is at least `min_cell` pixels wide, so a 16 px sample is visible.
    Optional text above the columns (e.g. class names) and left of the rows (e.g. scales).
    """
    from PIL import Image, ImageDraw, ImageFont
    images = images.detach().float().cpu().clamp(0, 1)
    n, Cimg, S, _ = images.shape
    zoom = max(1, math.ceil(min_cell / S))
    images = images.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    cell = S * zoom + 2
    font = ImageFont.load_default(size=11)
    top = 16 if column_labels else 0
    left = (max(int(font.getlength(str(s))) for s in row_labels) + 6) if row_labels else 0
    rows = math.ceil(n / ncol)
    grid = torch.ones(Cimg, top + rows * cell + 2, left + ncol * cell + 2)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[:, top + 2 + r * cell:top + r * cell + cell, left + 2 + c * cell:left + c * cell + cell] = img
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(arr[:, :, 0] if Cimg == 1 else arr)
    draw = ImageDraw.Draw(picture)
    black = 0 if Cimg == 1 else (0, 0, 0)
    for c, text in enumerate(column_labels):
        text = str(text)
        while len(text) > 1 and font.getlength(text) > cell - 2:   # shorten names that don't fit
            text = text[:-1]
        draw.text((left + 2 + c * cell, 2), text, fill=black, font=font)
    for r, text in enumerate(row_labels):
        draw.text((2, top + 2 + r * cell + cell // 2 - 6), str(text), fill=black, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


@torch.no_grad()
def save_recon_grid(tokenizer, images: torch.Tensor, path) -> None:
    """Stage 1's picture: images (n, Cimg, S, S) in [-1, 1] in the top row, the tokenizer's
    reconstructions (encode to tokens, decode) below. Leaves the tokenizer in training mode."""
    recon = tokenizer.eval().idx_to_img(tokenizer.img_to_idx(images))
    tokenizer.train()
    save_image_grid(torch.cat([images, recon]).add(1).div(2), path, len(images))


@torch.no_grad()
def save_generator_pictures(cfg, model, tokenizer, class_names, history, step=None) -> None:
    """train.py stage 2's pictures: a sample grid -- one column per class (the first 10),
    cfg.samples_per_class rows, a fixed seed, the run's guidance / top-k / top-p -- and the loss
    plot. RUN/images/<arch>_step<step>.png during training, RUN/<arch>_samples.png at the end."""
    run, classes, was_training = Path(cfg.out_dir), min(len(class_names), 10), model.training
    name = f"{cfg.arch}_samples.png" if step is None else f"images/{cfg.arch}_step{step:07d}.png"
    device = next(model.parameters()).device
    labels = torch.arange(classes, device=device).repeat(cfg.samples_per_class)
    images = model.eval().generate(tokenizer, labels, guidance=cfg.guidance, top_k=cfg.top_k, top_p=cfg.top_p,
                                   generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model.train(was_training)
    save_image_grid(images, run / name, classes, column_labels=class_names[:classes])
    save_loss_plot(history, run / f"{cfg.arch}_loss.png", f"stage 2: {cfg.arch}")
    if step is None:
        print(f"wrote {run / f'{cfg.arch}.pt'}, {run / name}, {run / f'{cfg.arch}_loss.png'}")


def to_uint8_nhw3(images: torch.Tensor) -> np.ndarray:
    """(n, Cimg, S, S) in [0, 1] -> uint8 (n, S, S, 3), grey replicated to 3 channels: the input
    layout of the standard ImageNet FID evaluator (openai/guided-diffusion)."""
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 image channels, got {x.shape[1]}")
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def save_loss_plot(history: list, path, title: str) -> None:
    """history: [[step, loss, ...], ...] -> loss-vs-step PNG. Drawn on a bare matplotlib Figure,
    so it never changes the pyplot backend of a notebook that called train.py."""
    from matplotlib.figure import Figure
    if not history:
        return
    h = np.array([row[:2] for row in history])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(h[:, 0], h[:, 1])
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def output_paths(out: str, default_dir: Path, name: str, n_npz: int) -> dict:
    """--out (a folder, a .png grid name or a .npz name) -> {"grid", "strip", "npz"} paths."""
    p = Path(out) if out else default_dir
    if p.suffix.lower() in (".png", ".npz"):
        folder, stem = p.parent, p.stem
        return {"grid": p if p.suffix.lower() == ".png" else folder / f"{stem}.png",
                "strip": folder / f"{stem}_strip.png",
                "npz": p if p.suffix.lower() == ".npz" else folder / f"{stem}_{n_npz}.npz"}
    if p.suffix:
        raise ValueError(f"--out {out}: give a folder, or a file name ending in .png or .npz")
    return {"grid": p / f"{name}_grid.png", "strip": p / f"{name}_strip.png", "npz": p / f"{name}_{n_npz}.npz"}
