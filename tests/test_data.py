"""Data loading (data.py): every on-disk format is written here in its REAL format (IDX .gz
bytes, CIFAR-10 pickles, PNG/JPEG folders), read back through data.load_dataset, and must
round-trip exactly; broken inputs must fail with a message that says what to do."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import train

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> the uint8 values it was made from (exact for x = u/127.5 - 1)."""
    return ((x.double() + 1) * 127.5).round().numpy().astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding, written independently of data.read_idx: 0, 0, 0x08, ndim, dims."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fmnist(root: Path, n_train=7, n_test=3, seed=0, labels_max=9):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, labels_max + 1, size=n, dtype=np.uint8)
        img_name, lbl_name = data.FASHION_FILES[split]
        (root / img_name).write_bytes(gzip.compress(idx_bytes(imgs)))
        (root / lbl_name).write_bytes(gzip.compress(idx_bytes(labels)))
        written[split] = (imgs, labels)
    return written


def test_fashion_mnist_idx_roundtrip(tmp_path):
    written = write_fmnist(tmp_path / "fm")
    # 28 = the preset (images as they are); 32 = zero-padded, centred.
    for split, size in (("train", 28), ("test", 28), ("train", 32)):
        cfg = train.make_config("fashion-mnist", data_dir=str(tmp_path / "fm"), image_size=size)
        ds = data.load_dataset(cfg, split)
        imgs, labels = written[split]
        assert len(ds) == len(imgs) and ds.num_classes == 10
        pad = (size - 28) // 2
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, size, size) and x.dtype == torch.float32
            assert y == labels[i]
            u = to_uint8(x)[0]
            inner = u[pad:pad + 28, pad:pad + 28]
            np.testing.assert_array_equal(inner, imgs[i])
            assert u.sum() - inner.sum() == 0                          # padding = background 0
            assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("damage, message", [
    (lambda b: gzip.compress(b"\x00\x00\x0c\x03" + b[4:]), "not an IDX file"),   # int type, not ubyte
    (lambda b: gzip.compress(b[:-5]), "truncated"),
    (lambda b: b"this is not gzip data", "gzip"),
])
def test_fashion_mnist_corrupt_files(tmp_path, damage, message):
    write_fmnist(tmp_path)
    name = tmp_path / data.FASHION_FILES["train"][0]
    name.write_bytes(damage(gzip.decompress(name.read_bytes())))
    with pytest.raises(ValueError, match=message):
        data.load_dataset(train.make_config("fashion-mnist", data_dir=str(tmp_path)), "train")


def test_fashion_mnist_label_count_and_range_errors(tmp_path):
    write_fmnist(tmp_path, labels_max=12)                       # labels up to 12 for 10 classes
    cfg = train.make_config("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.load_dataset(cfg, "train")
    write_fmnist(tmp_path, seed=1)
    lbl = tmp_path / data.FASHION_FILES["train"][1]
    lbl.write_bytes(gzip.compress(idx_bytes(np.zeros(6, np.uint8))))   # 6 labels for 7 images
    with pytest.raises(ValueError, match="expected images"):
        data.load_dataset(cfg, "train")


def test_missing_dataset_folder_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset(train.make_config("fashion-mnist", data_dir=str(missing)), "train")
    assert str(missing) in str(e.value) and "--download" in str(e.value)
    assert "dataset-fashion-mnist" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset(train.make_config("cifar10", data_dir=str(missing)), "train")
    assert str(missing) in str(e.value) and "--download" in str(e.value)
    with pytest.raises(FileNotFoundError, match="val"):
        data.load_dataset(train.make_config(dataset="folder", data_dir=str(missing)), "test")
    with pytest.raises(ValueError, match="--data_dir"):
        data.load_dataset(train.make_config(dataset="folder"), "train")


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    cfg = train.make_config("fashion-mnist")           # default location
    tr, te = data.load_dataset(cfg, "train"), data.load_dataset(cfg, "test")
    assert (len(tr), len(te)) == (60000, 10000)
    for ds, per_class in ((tr, 6000), (te, 1000)):
        assert torch.equal(torch.bincount(ds.labels, minlength=10), torch.full((10,), per_class))
    x, _ = tr[0]
    assert x.shape == (1, 28, 28) and x.max() > 0.9           # the preset keeps the native size
    x32, _ = data.load_dataset(train.make_config("fashion-mnist", image_size=32), "test")[0]
    assert x32.shape == (1, 32, 32) and x32[:, :2].eq(-1).all()   # padded rows are background
    assert torch.equal(x32[:, 2:30, 2:30], te[0][0])


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# --------------------------------------------------------------------------------------------

def write_cifar(root: Path, n=4, seed=0):
    """The real layout: dicts with bytes keys, data uint8 (n, 3072) = R, G, B planes, labels list."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in data.CIFAR_FILES["train"] + data.CIFAR_FILES["test"]:
        written = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(root / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": written,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, fh, protocol=2)
        out[name] = (written, labels)
    return out


def test_cifar10_pickle_roundtrip(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    # --data_dir may name the batches folder itself or the folder above it
    for data_dir in (tmp_path / "cifar-10-batches-py", tmp_path):
        cfg = train.make_config("cifar10", data_dir=str(data_dir))
        tr, te = data.load_dataset(cfg, "train"), data.load_dataset(cfg, "test")
        assert (len(tr), len(te)) == (20, 4)
        for ds, names in ((tr, data.CIFAR_FILES["train"]), (te, ["test_batch"])):
            i = 0
            for name in names:
                raw, labels = written[name]
                for row, label in zip(raw, labels):
                    x, y = ds[i]
                    assert y == label
                    r, g, b = row[:1024].reshape(32, 32), row[1024:2048].reshape(32, 32), row[2048:].reshape(32, 32)
                    np.testing.assert_array_equal(to_uint8(x), np.stack([r, g, b]))
                    i += 1


def test_cifar10_bad_files(tmp_path):
    write_cifar(tmp_path)
    cfg = train.make_config("cifar10", data_dir=str(tmp_path))
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10 python batch"):
        data.load_dataset(cfg, "train")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(ValueError, match="refusing to load"):
        data.load_dataset(cfg, "train")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        data.load_dataset(cfg, "train")


# --------------------------------------------------------------------------------------------
# Class-per-folder trees (ImageNet layout)
# --------------------------------------------------------------------------------------------

def write_folder(root: Path, fmt: str, size=(36, 36), per_class=2, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in ("zebra", "apple", "mango"):                     # sorted: apple=0, mango=1, zebra=2
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            if fmt == "JPEG":                                  # smooth, so JPEG keeps it well
                arr = np.repeat(np.repeat(arr[::8, ::8], 8, 0), 8, 1)[:size[1], :size[0]]
            path = root / c / f"img{j}.{'png' if fmt == 'PNG' else 'JPEG'}"
            Image.fromarray(arr).save(path, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
            arrays[path] = arr
    return arrays


def test_image_folder_png_exact_center_crop(tmp_path):
    arrays = write_folder(tmp_path / "train", "PNG")          # 36 = 1.125 * 32: no resize needed
    write_folder(tmp_path / "val", "PNG", seed=1)
    cfg = train.make_config(dataset="folder", data_dir=str(tmp_path), image_size=32)
    ds = data.load_dataset(cfg, "train")
    assert ds.classes == ["apple", "mango", "zebra"] and ds.num_classes == 3
    assert len(ds) == 6 and len(data.load_dataset(cfg, "test")) == 6
    for i, path in enumerate(ds.files):
        x, y = ds[i]
        assert y == ["apple", "mango", "zebra"].index(path.parent.name)
        np.testing.assert_array_equal(to_uint8(x), arrays[path][2:34, 2:34].transpose(2, 0, 1))


def test_image_folder_random_crop_and_flip(tmp_path):
    arrays = write_folder(tmp_path / "train", "PNG")
    cfg = train.make_config(dataset="folder", data_dir=str(tmp_path), image_size=32, hflip=True)
    ds = data.load_dataset(cfg, "train")
    crops = set()
    for epoch in range(12):
        x, _ = ds[(0, epoch)]
        assert torch.equal(x, ds[(0, epoch)][0])              # deterministic per (item, epoch)
        u = to_uint8(x).transpose(1, 2, 0)
        full = arrays[ds.files[0]]
        found = [(t, l, f) for f in (False, True) for t in range(5) for l in range(5)
                 if np.array_equal((full[:, ::-1] if f else full)[t:t + 32, l:l + 32], u)]
        assert found, "a training view must be an exact 32x32 window (optionally mirrored)"
        crops.add(found[0])
    assert len(crops) > 3 and {f for _, _, f in crops} == {False, True}


def test_image_folder_jpeg_and_resize(tmp_path):
    arrays = write_folder(tmp_path / "train", "JPEG")
    cfg = train.make_config(dataset="folder", data_dir=str(tmp_path), image_size=32)
    ds = data.load_dataset(cfg, "train")
    for i, path in enumerate(ds.files):
        x, y = ds[i]
        assert y == ds.classes.index(path.parent.name)
        ref = arrays[path][2:34, 2:34].transpose(2, 0, 1).astype(float)
        assert np.abs(to_uint8(x).astype(float) - ref).mean() < 4      # JPEG q95 is close
    # non-square, larger images: shorter side -> 36, then a 32x32 centre crop
    write_folder(tmp_path / "big" / "train", "PNG", size=(90, 72))
    ds = data.load_dataset(train.make_config(dataset="folder", data_dir=str(tmp_path / "big"),
                                              image_size=32), "train")
    assert ds[0][0].shape == (3, 32, 32)


def test_image_folder_errors(tmp_path):
    write_folder(tmp_path / "train", "PNG")
    (tmp_path / "train" / "empty_class").mkdir()
    cfg = train.make_config(dataset="folder", data_dir=str(tmp_path), image_size=32)
    with pytest.raises(ValueError, match="empty_class holds no images"):
        data.load_dataset(cfg, "train")
    (tmp_path / "train" / "empty_class").rmdir()
    (tmp_path / "train" / "apple" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = data.load_dataset(cfg, "train")
    with pytest.raises(ValueError, match="broken.png: cannot decode"):
        ds[ds.files.index(tmp_path / "train" / "apple" / "broken.png")]


# --------------------------------------------------------------------------------------------
# The built-in dataset and the sampler
# --------------------------------------------------------------------------------------------

def test_shapes_deterministic_balanced_and_separable():
    a, la = data.make_shapes(400, 32, seed=3)
    b, lb = data.make_shapes(400, 32, seed=3)
    c, _ = data.make_shapes(400, 32, seed=4)
    assert np.array_equal(a, b) and torch.equal(la, lb) and not np.array_equal(a, c)
    K = len(data.SHAPE_CLASSES)
    assert torch.equal(torch.bincount(la, minlength=K), torch.full((K,), 400 // K))
    # Distinct enough for a trivial classifier: nearest class centroid on a few colour/layout
    # features must be near perfect on fresh images.
    def feats(x):
        x = torch.from_numpy(x).float() / 255
        fg = (x.max(1).values > 0.3).float()                          # (N, S, S) foreground
        rows, cols = fg.mean(2), fg.mean(1)                            # stripe / shape profiles
        return torch.cat([(x * fg[:, None]).sum((2, 3)) / fg.sum((1, 2))[:, None].clamp_min(1),
                          fg.mean((1, 2))[:, None], rows.std(1, keepdim=True),
                          cols.std(1, keepdim=True)], 1)
    fa, ftest = feats(a), feats(data.make_shapes(400, 32, seed=9)[0])
    _, ltest = data.make_shapes(400, 32, seed=9)
    mu, sd = fa.mean(0), fa.std(0)
    cent = torch.stack([((fa - mu) / sd)[la == k].mean(0) for k in range(K)])
    pred = torch.cdist((ftest - mu) / sd, cent).argmin(1)
    assert (pred == ltest).float().mean() > 0.95


def test_tensor_images_flip_view():
    imgs, labels = data.make_shapes(64, 32, seed=0)
    ds = data.TensorImages(torch.from_numpy(imgs), labels, data.SHAPE_CLASSES, hflip=True, seed=5)
    flips = 0
    for i in range(64):
        x = ds[i][0]
        assert torch.equal(x, torch.from_numpy(imgs[i]).float() / 127.5 - 1)   # eval view
        t = ds[(i, 2)][0]
        assert torch.equal(t, ds[(i, 2)][0])
        assert torch.equal(t, x) or torch.equal(t, x.flip(-1))
        flips += torch.equal(t, x.flip(-1)) and not torch.equal(t, x)
    assert 16 < flips < 48


def test_sampler_epochs_shards_and_resume():
    n, gb, world = 50, 12, 3                                   # 4 steps/epoch, 2 items dropped
    samplers = [data.ShardedSampler(n, gb, seed=7, rank=r, world_size=world) for r in range(world)]
    assert samplers[0].steps_per_epoch == 4
    for epoch in range(3):
        seen = []
        for step in range(epoch * 4, epoch * 4 + 4):
            per_rank = [s.batch(step) for s in samplers]
            assert all(e == epoch and len(idx) == gb // world for e, idx in per_rank)
            seen += [i for _, idx in per_rank for i in idx]
        assert len(seen) == len(set(seen)) == 48                # no repeats inside an epoch
    orders = [tuple(samplers[0].batch(s)[1]) for s in (0, 4, 8)]
    assert len(set(orders)) == 3                               # reshuffled every epoch
    fresh = data.ShardedSampler(n, gb, seed=7, rank=1, world_size=world)
    assert fresh.batch(9) == samplers[1].batch(9)              # a resumed sampler agrees
    assert data.ShardedSampler(n, gb, seed=8).batch(0) != data.ShardedSampler(n, gb, seed=7).batch(0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.ShardedSampler(5, 8)
    with pytest.raises(ValueError, match="not divisible"):
        data.ShardedSampler(50, 10, world_size=3)


def test_image_folder_val_uses_training_label_order(tmp_path):
    write_folder(tmp_path / "train", "PNG")
    write_folder(tmp_path / "val", "PNG", seed=1)
    for p in (tmp_path / "val" / "apple").iterdir():         # val lacks one class ...
        p.unlink()
    (tmp_path / "val" / "apple").rmdir()
    cfg = train.make_config(dataset="folder", data_dir=str(tmp_path), image_size=32)
    val = data.load_dataset(cfg, "test")
    assert val.classes == ["apple", "mango", "zebra"]
    assert sorted(set(val.labels.tolist())) == [1, 2]          # ... yet mango is still 1
    (tmp_path / "val" / "kiwi").mkdir()                        # a class training never saw
    with pytest.raises(ValueError, match="kiwi"):
        data.load_dataset(cfg, "test")
