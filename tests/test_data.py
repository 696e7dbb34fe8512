from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import datasets as datasets_fixture
from lib import data

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist-test"


def test_digits_split_is_fixed_and_in_unit_range():
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 == float(train.x.min()) and float(train.x.max()) == 1.0
    again = data.load_dataset("digits", "test")
    assert torch.equal(test.x, again.x) and torch.equal(test.y, again.y)


def test_balanced_subset_is_deterministic_and_balanced():
    y = torch.arange(10).repeat_interleave(50)
    a, b = data.balanced_subset(y, 95, seed=3), data.balanced_subset(y, 95, seed=3)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 95
    counts = torch.bincount(y[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(a, data.balanced_subset(y, 95, seed=4))


def test_balanced_subset_handles_a_small_class():
    y = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    idx = data.balanced_subset(y, 40)
    assert len(idx) == 40 and int((y[idx] == 0).sum()) == 3
    with pytest.raises(ValueError, match="subset of 200"):
        data.balanced_subset(y, 200)


def test_resize_and_colour_conversion():
    d = data.load_dataset("digits", "test", n=20, image_size=32, channels=3)
    assert d.x.shape == (20, 3, 32, 32)
    assert d.info.image_size == 32 and d.info.channels == 3 and len(d.info.mean) == 3
    assert float(d.x.min()) >= 0 and float(d.x.max()) <= 1
    assert torch.equal(d.x[:, 0], d.x[:, 2])


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="valid datasets: digits"):
        data.load_dataset("cifar11")
    with pytest.raises(ValueError, match="valid splits"):
        data.load_dataset("digits", "val")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "imagenet"])
def test_missing_dataset_error_names_it_and_says_how_to_get_it(name, tmp_path):
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load_dataset(name, "test", root=tmp_path, download=False)
    message = str(err.value)
    assert repr(name) in message and str(tmp_path) in message and "How to get it" in message
    assert not data.is_available(name, tmp_path)


def test_idx_reader_on_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        datasets_fixture.write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        datasets_fixture.write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert data.is_available("mnist", tmp_path)
    d = data.load_dataset("mnist", "test", root=tmp_path, download=False)
    assert d.x.shape == (20, 1, 28, 28) and torch.equal(d.y, torch.arange(20) % 10)


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_found_offline_in_debian_location(tmp_path):
    assert data.is_available("fashion_mnist", tmp_path)
    d = data.load_dataset("fashion_mnist", "test", n=100, root=tmp_path, download=False)
    assert d.x.shape == (100, 1, 28, 28) and torch.bincount(d.y).tolist() == [10] * 10
    assert float(d.x.max()) <= 1.0 and float(d.x.mean()) > 0.1


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="optional local copy of the MNIST test set not present")
def test_real_mnist_test_files_parse(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in SHARED_MNIST.iterdir():
        (raw / f.name).symlink_to(f)
    d = data.load_dataset("mnist", "test", root=tmp_path, download=False)
    assert d.x.shape == (10000, 1, 28, 28) and torch.bincount(d.y).sum() == 10000


def test_availability_table_lists_every_dataset():
    table = data.availability()
    assert list(table["dataset"]) == list(data.DATASETS)
    assert bool(table.set_index("dataset").loc["digits", "available"])


# --------------------------------------------------------------------------- fixtures in each real on-disk format

FIXTURE_SPLITS = {"train": datasets_fixture.TRAIN, "test": datasets_fixture.TEST}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets_fixture.write_datasets(root)
    return root


@pytest.fixture
def trusted(fixture_root, monkeypatch):
    for obj, name, value in datasets_fixture.trusted_attributes(fixture_root):
        monkeypatch.setattr(obj, name, value)
    return fixture_root


@pytest.mark.parametrize("name", list(datasets_fixture.WRITERS))
@pytest.mark.parametrize("split", list(FIXTURE_SPLITS))
def test_each_loader_reads_its_fixture(name, split, trusted):
    info = data.dataset_info(name)
    assert data.is_available(name, trusted)
    d = data.load_dataset(name, split, root=trusted, download=False)
    assert d.x.shape == (FIXTURE_SPLITS[split], info.channels, info.image_size, info.image_size)
    assert d.x.dtype == torch.float32
    assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    classes = torch.unique(d.y)
    assert len(classes) == datasets_fixture.CLASSES and int(classes.max()) < info.num_classes
    # each class has its own brightness in the fixture: the labels came through in the pixels' order
    brightness = torch.stack([d.x[d.y == c].mean() for c in classes])
    assert bool((brightness.diff() > 0).all()), brightness
    assert data.split_size(name, split, root=trusted, download=False) == FIXTURE_SPLITS[split]


def test_svhn_label_10_is_the_digit_0(trusted):
    d = data.load_dataset("svhn", "test", root=trusted, download=False)
    assert int(d.y.min()) == 0 and torch.equal(d.y[:4], torch.arange(4))


def test_torchvision_checks_fixture_files_against_their_own_checksums(fixture_root, monkeypatch):
    import torchvision.datasets as tvd

    with pytest.raises(RuntimeError, match="not found or corrupted"):
        tvd.CIFAR10(str(fixture_root), train=False)   # the published MD5s: a fixture file cannot pass
    for obj, name, value in datasets_fixture.trusted_attributes(fixture_root):
        monkeypatch.setattr(obj, name, value)
    assert len(tvd.CIFAR100(str(fixture_root), train=True)) == datasets_fixture.TRAIN
    damaged = fixture_root / "svhn" / "test_32x32.mat"
    original = damaged.read_bytes()
    try:
        damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(RuntimeError, match="not found or corrupted"):
            tvd.SVHN(str(fixture_root / "svhn"), split="test")
    finally:
        damaged.write_bytes(original)
