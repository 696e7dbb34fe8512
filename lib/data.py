"""Dataset registry and loading: every dataset as float tensors in [0, 1], shape (N, C, H, W).

Sources: scikit-learn's bundled digits (smoke data), MNIST and Fashion-MNIST from idx files
(Debian's `dataset-fashion-mnist` is found offline), CIFAR-10/100 and SVHN through torchvision,
Tiny-ImageNet and ImageNet from folders the user provides. A dataset that cannot be had raises
`DatasetUnavailable` naming it, where to put it and how to get it; nothing is substituted.
"""
from __future__ import annotations

import contextlib
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lib import distributed
from lib.validate import check_positive_int

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")


class DatasetUnavailable(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str
    classes: tuple[str, ...] = field(default=())


@dataclass
class ImageData:
    """A labelled image set: x float (N, C, H, W) in [0, 1], y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches as views (shuffled deterministically from `seed`)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            yield self.x[idx], self.y[idx]

    def subset(self, indices: torch.Tensor) -> "ImageData":
        return ImageData(self.x[indices], self.y[indices], self.info)


_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS: dict[str, DatasetInfo] = {
    d.name: d for d in [
        DatasetInfo("digits", 10, 1, 8, (0.3,), (0.4,),
                    "bundled with scikit-learn (sklearn.datasets.load_digits); nothing to download",
                    tuple(str(i) for i in range(10))),
        DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,),
                    "downloaded by torchvision into <data>/MNIST/raw on a networked machine "
                    "(or copy the four idx .gz files there)", tuple(str(i) for i in range(10))),
        DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,),
                    "Debian: apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist), "
                    "or torchvision downloads it into <data>/FashionMNIST/raw", _FASHION_CLASSES),
        DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    "downloaded by torchvision into <data>/cifar-10-batches-py on a networked machine",
                    _CIFAR10_CLASSES),
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    "downloaded by torchvision into <data>/cifar-100-python on a networked machine"),
        DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                    "downloaded by torchvision into <data>/svhn (train_32x32.mat, test_32x32.mat) on a networked machine",
                    tuple(str(i) for i in range(10))),
        DatasetInfo("tiny_imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
                    "download tiny-imagenet-200.zip from the CS231n site and unzip it as <data>/tiny-imagenet-200 "
                    "(train/<wnid>/images, val/images + val/val_annotations.txt)"),
        DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    "obtain ILSVRC2012 from image-net.org and place it as <data>/imagenet/{train,val}/<wnid>/*.JPEG"),
    ]
}


def data_root() -> Path:
    """Where datasets live: $ADV_DATA_ROOT, else <repo>/data."""
    return Path(os.environ.get("ADV_DATA_ROOT", REPO_ROOT / "data")).expanduser()


def downloads_allowed() -> bool:
    """Downloads are attempted unless ADV_DATA_DOWNLOAD=0."""
    return os.environ.get("ADV_DATA_DOWNLOAD", "1") != "0"


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for `name` (ValueError listing valid names otherwise)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- raw loaders

def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _idx_dirs(name: str, root: Path) -> list[Path]:
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    dirs = [root / folder / "raw"]
    if name == "fashion_mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def _find_idx(name: str, root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    for d in _idx_dirs(name, root):
        for suffix in ("", ".gz"):
            images = d / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = d / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def _load_idx_dataset(name: str, split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    found = _find_idx(name, root, split)
    if found is None and download:
        import torchvision.datasets as tvd

        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}[name]
        _torchvision_download(name, lambda: cls(str(root), train=split == "train", download=True))
        found = _find_idx(name, root, split)
    if found is None:
        raise _unavailable(name, root, f"no {split} idx files in " + ", ".join(str(d) for d in _idx_dirs(name, root)))
    images, labels = found
    return _read_idx(images)[:, None], _read_idx(labels).astype(np.int64)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits with a fixed stratified 80/20 split (1437 train / 360 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    tr_x, te_x, tr_y, te_y = train_test_split(images, d.target, test_size=360, stratify=d.target, random_state=0)
    return (tr_x, tr_y) if split == "train" else (te_x, te_y)


def _torchvision_download(name: str, make: Callable[[], object]) -> object:
    try:
        return make()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError ... when offline
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _unavailable(name, data_root(), f"download failed: {type(exc).__name__}: {first_line}") from exc


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd

    train = split == "train"
    if name == "svhn":
        make = lambda dl: tvd.SVHN(str(root / "svhn"), split=split, download=dl)  # noqa: E731
    else:
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
        make = lambda dl: cls(str(root), train=train, download=dl)  # noqa: E731
    try:
        ds = make(False)
    except RuntimeError:
        if not download:
            raise _unavailable(name, root, "not found on disk and downloads are disabled (ADV_DATA_DOWNLOAD=0)")
        ds = _torchvision_download(name, lambda: make(True))
    if name == "svhn":
        return np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64) % 10
    return np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)


def _folder_root(name: str, root: Path, split: str) -> Path:
    if name == "tiny_imagenet":
        return root / "tiny-imagenet-200" / ("train" if split == "train" else "val")
    return root / "imagenet" / ("train" if split == "train" else "val")


def _list_folder(name: str, root: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths and labels of a user-provided folder dataset (classes = sorted wnids of train/)."""
    base = _folder_root(name, root, "train")
    if not base.is_dir():
        raise _unavailable(name, root, f"folder {base} does not exist")
    wnids = sorted(p.name for p in base.iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    if name == "tiny_imagenet" and split == "test":
        val = _folder_root(name, root, "test")
        rows = [line.split("\t")[:2] for line in (val / "val_annotations.txt").read_text().splitlines() if line]
        paths = [val / "images" / f for f, _ in rows]
        labels = np.array([index[w] for _, w in rows], dtype=np.int64)
        return paths, labels, wnids
    folder = _folder_root(name, root, split)
    pairs = [(p, index[w.name]) for w in sorted(folder.iterdir()) if w.is_dir()
             for p in sorted(w.rglob("*")) if p.suffix.lower() in {".jpeg", ".jpg", ".png"}]
    return [p for p, _ in pairs], np.array([c for _, c in pairs], dtype=np.int64), wnids


# Folder datasets are decoded as the pretrained weights expect (torchvision's evaluation transform): the shorter side
# resized to size / crop fraction, then the centre size x size crop (ImageNet: 256 -> 224 for ResNet-50, 342 -> 299
# for Inception-v3). Tiny-ImageNet keeps its whole 64 x 64 image (spec-000: no resizing).
CROP_FRACTION = {"imagenet": 0.875, "tiny_imagenet": 1.0}


def _read_images(paths: list[Path], size: int, crop_fraction: float) -> np.ndarray:
    """Decode image files as uint8 (N, 3, size, size): shorter side resized to round(size / crop_fraction)
    (bilinear, antialiased when shrinking), then the centre crop, without squashing the aspect ratio."""
    from PIL import Image

    resize = int(round(size / crop_fraction))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):  # file decoding is inherently per image
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size   # the shorter side becomes `resize`, the longer one int(resize * long / short)
            w, h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            im = im.resize((w, h), Image.BILINEAR)
            left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
            out[i] = np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
    return out


def _unavailable(name: str, root: Path, reason: str) -> DatasetUnavailable:
    info = DATASETS[name]
    return DatasetUnavailable(f"dataset {name!r} is not available ({reason}). Data root: {root} "
                              f"(set ADV_DATA_ROOT to change it). How to get it: {info.how_to_get}.")


# --------------------------------------------------------------------------- public API

def balanced_subset(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a deterministic class-balanced subset of size n (as equal per class as possible)."""
    check_positive_int(n, "n")
    if n > len(y):
        raise ValueError(f"n must be at most the {len(y)} examples available (a subset of {n} was requested)")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per_class = [torch.nonzero(y == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    quota = torch.full((len(classes),), n // len(classes), dtype=torch.long)
    quota[torch.randperm(len(classes), generator=g)[: n % len(classes)]] += 1
    sizes = torch.tensor([len(i) for i in per_class])
    while (quota > sizes).any():  # classes too small: share their excess evenly among the others
        excess = int((quota - sizes).clamp(min=0).sum())
        quota = torch.minimum(quota, sizes)
        room = (sizes - quota).nonzero().flatten()
        quota[room] += excess // len(room)
        quota[room[torch.randperm(len(room), generator=g)[: excess % len(room)]]] += 1
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota.tolist())])
    return chosen[torch.randperm(len(chosen), generator=g)]


def _source(name: str, split: str, root: str | Path | None, download: bool | None
            ) -> tuple[np.ndarray | list[Path], np.ndarray]:
    """The split's decoded images (array datasets) or image files (folder datasets), with their labels."""
    root = Path(root) if root is not None else data_root()
    download = downloads_allowed() if download is None else download
    if name == "digits":
        return _load_digits(split)
    if name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"):
        load = _load_idx_dataset if name in ("mnist", "fashion_mnist") else _load_torchvision
        with distributed.main_first() if download else contextlib.nullcontext():   # one rank downloads, others read
            return load(name, split, root, download)
    paths, labels, _ = _list_folder(name, root, split)
    return paths, labels


def split_size(name: str, split: str = "test", *, root: str | Path | None = None,
               download: bool | None = None) -> int:
    """How many images `split` of dataset `name` holds (a folder dataset's files are counted, not decoded)."""
    dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return len(_source(name, split, root, download)[1])


def load_dataset(name: str, split: str = "train", *, n: int | None = None, seed: int = 0,
                 image_size: int | None = None, channels: int | None = None,
                 root: str | Path | None = None, download: bool | None = None) -> ImageData:
    """Load `split` of dataset `name` as tensors in [0, 1].

    n: class-balanced deterministic subset size (None = all). image_size: bilinear resize
    (e.g. upscale 8x8 digits); for the folder datasets (Tiny-ImageNet, ImageNet) the size the files are decoded
    at, resize-then-centre-crop (`_read_images`), so pass the input size of the model that will see them
    (224 for ResNet-50, 299 for Inception-v3). channels: 3 turns grey images into RGB by repetition.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    for value, param in ((n, "n"), (image_size, "image_size"), (channels, "channels")):
        if value is not None:
            check_positive_int(value, param)
    images, labels = _source(name, split, root, download)
    if isinstance(images, list):    # a folder dataset: decode only the subset's files
        paths = images
        if n is not None:
            keep = balanced_subset(torch.from_numpy(labels), n, seed).numpy()
            paths, labels, n = [paths[i] for i in keep], labels[keep], None
        size = image_size or info.image_size
        images = _read_images(paths, size, CROP_FRACTION[name])
        info = _replace(info, image_size=size)

    y = torch.from_numpy(np.ascontiguousarray(labels))
    if n is not None:
        keep = balanced_subset(y, n, seed)
        images, y = images[keep.numpy()], y[keep]
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x, info = _reshape(x, info, image_size, channels)
    return ImageData(x, y, info)


def _reshape(x: torch.Tensor, info: DatasetInfo, image_size: int | None, channels: int | None) -> tuple[torch.Tensor, DatasetInfo]:
    if image_size is not None and image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
        info = _replace(info, image_size=image_size)
    if channels is not None and channels != x.shape[1]:
        if (x.shape[1], channels) != (1, 3):
            raise ValueError(f"can only convert 1 channel to 3, not {x.shape[1]} to {channels}")
        x = x.expand(-1, 3, -1, -1).contiguous()
        info = _replace(info, channels=3, mean=info.mean * 3, std=info.std * 3)
    return x, info


def _replace(info: DatasetInfo, **changes) -> DatasetInfo:
    from dataclasses import replace

    return replace(info, **changes)


def is_available(name: str, root: str | Path | None = None) -> bool:
    """True when `name` can be loaded from disk right now (no download attempted)."""
    dataset_info(name)
    root = Path(root) if root is not None else data_root()
    if name == "digits":
        return True
    if name in ("mnist", "fashion_mnist"):
        return all(_find_idx(name, root, s) is not None for s in SPLITS)
    if name in ("cifar10", "cifar100"):
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
        return (root / folder).is_dir()
    if name == "svhn":
        return all((root / "svhn" / f"{s}_32x32.mat").is_file() for s in SPLITS)
    return _folder_root(name, root, "train").is_dir()


def availability(root: str | Path | None = None) -> pd.DataFrame:
    """One row per registered dataset: whether it is on disk, and how to get it if not."""
    rows = [{"dataset": d.name, "available": is_available(d.name, root), "classes": d.num_classes,
             "shape": f"{d.channels}x{d.image_size}x{d.image_size}", "how to get it": d.how_to_get}
            for d in DATASETS.values()]
    return pd.DataFrame(rows)
