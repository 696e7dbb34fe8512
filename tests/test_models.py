"""Classifier zoo: the ImageClassifier contract for every architecture, published parameter counts, depth and width
scaling, argument checks, and the torchvision wrappers (offline pretrained loading fails loudly)."""
from __future__ import annotations

import hashlib
import pickle
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from lib.models import imagenet

from lib.models import (ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, BasicBlock, ImageClassifier,
                        InceptionInputTransform, Normalize, WideBasic, build_classifier, count_parameters,
                        scale_channels)

TORCHVISION_ARCHS = ("inception_v3", "resnet50_imagenet")
SCRATCH_ARCHS = tuple(a for a in ARCHITECTURES if a not in TORCHVISION_ARCHS)
GRAY = dict(in_channels=1, mean=[0.3], std=[0.4])
RGB = dict(in_channels=3, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine spinning threads cost seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(arch: str, channels: dict, image_size: int, width: float = 0.125, num_classes: int = 7,
           **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return build_classifier(arch, num_classes=num_classes, image_size=image_size, width=width, **channels, **kwargs)


def test_registry_names_sorted_and_complete():
    required = {"lenet5", "resnet18", "resnet34", "resnet50", "resnet56", "resnet110", "wrn", "vgg11", "vgg16",
                "vgg19", "googlenet", "smallcnn", "resnet50_imagenet", "inception_v3"}
    assert list(ARCHITECTURES) == sorted(ARCHITECTURES)
    assert required <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", SCRATCH_ARCHS)
@pytest.mark.parametrize("channels,size", [(GRAY, 8), (RGB, 32)], ids=["gray8", "rgb32"])
def test_classifier_contract(arch, channels, size):
    model = _build(arch, channels, size).eval()
    x = torch.rand(3, channels["in_channels"], size, size, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    h = model.features(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert h.shape == (3, model.feat_dim)
    torch.testing.assert_close(model.classify(h), logits)
    mean = torch.tensor(channels["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(channels["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(model.head(model.body((x - mean) / std)), logits)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x_req)[:, 0].sum(), x_req)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", SCRATCH_ARCHS)
@pytest.mark.parametrize("channels,size", [(GRAY, 28), (RGB, 64)], ids=["gray28", "rgb64"])
def test_other_image_sizes(arch, channels, size):
    model = _build(arch, channels, size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels["in_channels"], size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch", SCRATCH_ARCHS)
def test_width_scaling_lowers_parameter_count(arch):
    small, larger = (count_parameters(_build(arch, RGB, 32, width=w)) for w in (0.25, 0.5))
    assert small < larger


def test_scale_channels_has_a_floor():
    assert scale_channels(64, 0.5) == 32
    assert scale_channels(16, 0.01) == 4


# Published sizes: kuangliu/pytorch-cifar (ResNet-18/50, VGG16-BN, GoogLeNet), He et al. 2016 / akamaster
# (ResNet-20 0.27M, ResNet-56 0.85M), WRN-28-10 (36.5M), advertorch LeNet5 and LeCun's LeNet-5 on 28x28 (61,706).
@pytest.mark.parametrize("arch,channels,size,expected", [
    ("resnet18", RGB, 32, 11_173_962), ("resnet50", RGB, 32, 23_520_842), ("vgg16", RGB, 32, 14_728_266),
    ("googlenet", RGB, 32, 6_166_250), ("resnet20", RGB, 32, 269_722), ("resnet56", RGB, 32, 853_018),
    ("wrn", RGB, 32, 36_479_194), ("lenet5", GRAY, 28, 648_226), ("lenet5_classic", GRAY, 28, 61_706),
])
def test_full_width_parameter_counts_match_published(arch, channels, size, expected):
    model = build_classifier(arch, num_classes=10, image_size=size, **channels)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("arch,depth", [("resnet56", 56), ("resnet110", 110)])
def test_he_resnet_depth(arch, depth):
    model = _build(arch, RGB, 32)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(blocks) == 3 * (depth - 2) // 6
    assert len(convs) + 1 == depth  # weighted layers: convolutions plus the linear head (option-A shortcuts)


def test_depth_override_for_depth_families():
    assert sum(isinstance(m, BasicBlock) for m in _build("resnet_cifar", RGB, 32, depth=8).modules()) == 3
    wrn = _build("wrn", RGB, 32, depth=16, widen_factor=2, dropout=0.0)
    assert sum(isinstance(m, WideBasic) for m in wrn.modules()) == 6
    assert wrn.feat_dim == scale_channels(64 * 2, 0.125)


def test_wrn_dropout_only_in_training():
    model = _build("wrn", RGB, 32, depth=10, widen_factor=1, dropout=0.5)
    x = torch.rand(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("size,pools", [(8, 3), (28, 4), (32, 5), (64, 5)])
def test_vgg_keeps_pools_while_the_map_is_at_least_two_pixels(size, pools):
    model = _build("vgg16", RGB, size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet999"), "unknown architecture.*resnet18"),
    (dict(mean=[0.5, 0.5]), "one value per channel"),
    (dict(std=[0.2]), "one value per channel"),
    (dict(std=[0.2, 0.0, 0.2]), "std must be positive"),
    (dict(width=0.0), "width"),
    (dict(image_size=4), "image_size"),
    (dict(num_classes=0), "num_classes"),
    (dict(pretrained=True), "no published weights"),
    (dict(arch="resnet56", depth=20), "depth 56"),
    (dict(arch="googlenet", depth=22), "no depth"),
    (dict(arch="resnet_cifar", depth=21), "6n\\+2"),
    (dict(arch="wrn", depth=27), "6n\\+4"),
    (dict(arch="wrn", dropout=1.0), "dropout"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    args = dict(arch="resnet18", num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_classifier(args.pop("arch"), **args)


def test_smallcnn_learns_digits(digits_split):
    torch.manual_seed(0)
    model = build_classifier("smallcnn", num_classes=10, image_size=8, width=1.0, **GRAY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        for idx in torch.randperm(len(digits_split["x_train"]), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(digits_split["x_train"][idx]), digits_split["y_train"][idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(digits_split["x_test"]).argmax(1) == digits_split["y_test"]).float().mean()
    assert acc > 0.9


def test_count_parameters_trainable_only():
    model = _build("smallcnn", GRAY, 8)
    total = count_parameters(model)
    for p in model.body.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model.head) < total


def _torchvision_reference(arch: str, model: ImageClassifier) -> nn.Module:
    """torchvision's own network carrying the wrapper's weights (same parameter names), for output comparison."""
    if arch == "resnet50_imagenet":
        net = torchvision.models.resnet50(weights=None, num_classes=model.num_classes)
    else:
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                              num_classes=model.num_classes)
    state = {k: v for k, v in model.body.state_dict().items()}
    state.update({f"fc.{k}": v for k, v in model.head.state_dict().items()})
    net.load_state_dict(state)
    return net.eval()


@pytest.mark.parametrize("arch,size", [("resnet50_imagenet", 64), ("inception_v3", 75)])
def test_torchvision_wrappers_match_torchvision(arch, size):
    model = build_classifier(arch, num_classes=200, in_channels=3, image_size=size,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, h = model(x), model.features(x)
        expected = _torchvision_reference(arch, model)(Normalize(IMAGENET_MEAN, IMAGENET_STD)(x))
    assert h.shape == (1, 2048) and model.feat_dim == 2048
    assert isinstance(model.head, nn.Linear) and logits.shape == (1, 200)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model.classify(h), logits)


def test_inception_transform_input_gives_half_normalisation():
    x = torch.rand(2, 3, 5, 5)
    out = InceptionInputTransform()(Normalize(IMAGENET_MEAN, IMAGENET_STD)(x))
    torch.testing.assert_close(out, (x - 0.5) / 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=1, mean=[0.5], std=[0.25]), "RGB"),
    (dict(width=0.5), "width must be 1.0"),
    (dict(pretrained=True, mean=[0.5] * 3), "ImageNet mean"),
    (dict(depth=50), "fixed depth"),
    (dict(arch="inception_v3", image_size=64), ">= 75"),
    (dict(pretrained=True, weights="NO_SUCH_WEIGHTS"), "unknown weights"),
])
def test_torchvision_wrapper_argument_checks(kwargs, match):
    args = dict(arch="resnet50_imagenet", num_classes=10, in_channels=3, image_size=224,
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_classifier(args.pop("arch"), **args)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME and a download function that fails as it would without network."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (simulated)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


@pytest.mark.parametrize("arch,filename,size", [
    ("resnet50_imagenet", "resnet50-0676ba61.pth", 224), ("inception_v3", "inception_v3_google-0cc3c7bd.pth", 299)])
def test_pretrained_offline_raises_runtime_error_with_instructions(offline_torch_home, arch, filename, size):
    with pytest.raises(RuntimeError) as info:
        build_classifier(arch, num_classes=1000, in_channels=3, image_size=size, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, pretrained=True)
    message = str(info.value)
    assert filename in message
    assert str(offline_torch_home / "hub" / "checkpoints") in message
    assert "network access" in message and "URLError" in message
    assert not (offline_torch_home / "hub" / "checkpoints" / filename).exists()


@pytest.mark.parametrize("arch,filename", [
    ("resnet50_imagenet", "resnet50-0676ba61.pth"), ("inception_v3", "inception_v3_google-0cc3c7bd.pth")])
def test_pretrained_loads_cached_weights_file(offline_torch_home, monkeypatch, arch, filename):
    torch.manual_seed(3)
    if arch == "resnet50_imagenet":
        published = torchvision.models.resnet50(weights=None)
    else:  # the published file holds the auxiliary classifier and expects transform_input; torchvision's
        # own init keeps activations O(1) (PyTorch's default init makes them vanish, hiding input differences)
        published = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True,
                                                    init_weights=True)
    folder = offline_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(published.state_dict(), folder / filename)
    # these random weights stand in for the published file: accept the hash of the file written here
    monkeypatch.setattr(imagenet, "published_hash_prefix", lambda path: _sha256(path)[:8])
    model = build_classifier(arch, num_classes=1000, in_channels=3, image_size=299, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, pretrained=True).eval()
    x = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), published.eval()(Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)))
    tiny = build_classifier(arch, num_classes=200, in_channels=3, image_size=299, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, pretrained=True)
    last_block = "Mixed_7c" if arch == "inception_v3" else "layer4"
    torch.testing.assert_close(getattr(tiny.body, last_block).state_dict(),
                               getattr(published, last_block).state_dict())
    assert tiny.head.out_features == 200


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    """A pickle that runs code when unpickled: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(offline_torch_home, tmp_path):
    folder = offline_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "payload_ran"
    path = folder / "resnet50-0676ba61.pth"
    torch.save({"conv1.weight": _Payload(marker)}, path)
    return path, marker


def test_hand_placed_weights_with_a_payload_are_refused_by_their_hash(offline_torch_home, tmp_path):
    path, marker = _plant_payload(offline_torch_home, tmp_path)
    with pytest.raises(RuntimeError, match="does not match its published hash") as info:
        build_classifier("resnet50_imagenet", num_classes=1000, in_channels=3, image_size=224, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, pretrained=True)
    assert str(path) in str(info.value) and "fetch it again" in str(info.value)
    assert not marker.exists()


def test_a_payload_matching_the_hash_still_does_not_run(offline_torch_home, tmp_path, monkeypatch):
    path, marker = _plant_payload(offline_torch_home, tmp_path)
    monkeypatch.setattr(imagenet, "published_hash_prefix", lambda p: _sha256(p)[:8])
    with pytest.raises(pickle.UnpicklingError):
        build_classifier("resnet50_imagenet", num_classes=1000, in_channels=3, image_size=224, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, pretrained=True)
    assert not marker.exists()
