"""The paper profile has what each paper's tables need (issue 16): dataset sections with the specs' architectures,
ImageNet decoded as the pretrained weights expect, defenses that cannot be built for a dataset recorded as skips,
and our model names matched to the papers' where they are the same architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from lib import data, report
from lib.data import DatasetUnavailable
from lib.defenses import registry
from lib.defenses.base import Built, NoDefense, NotBuiltForDataset
from lib.defenses.idfr.tables import our_model
from lib.models import IMAGENET_MEAN, IMAGENET_STD, classifier_from_spec, zoo
from lib.notebook import Run
from lib.profiles import load_profile, notebook_config, notebook_profile
from lib.reference import stand_in_label

PAPER = load_profile("paper")

# spec-000 §2.3, spec-001 Tables 1-3, spec-004 §models: notebook -> dataset -> role section -> (arch, extra settings)
SPEC_MODELS = {
    "01_sfm_defense": {
        "cifar10": {"classifier": ("resnet18", {}), "surrogate": ("resnet18", {})},
        "svhn": {"classifier": ("resnet18", {}), "surrogate": ("resnet18", {})},
        "tiny_imagenet": {"classifier": ("resnet50_imagenet", {"pretrained": True}),
                          "surrogate": ("resnet50_imagenet", {"pretrained": True})},
    },
    "02_idfr": {
        "cifar10": {"classifier": ("resnet18", {}), "surrogate": ("vgg16", {})},
        "cifar100": {"classifier": ("resnet18", {}), "surrogate": ("vgg16", {})},
        "imagenet": {"classifier": ("resnet50_imagenet", {"pretrained": True, "image_size": 224, "epochs": 0}),
                     "surrogate": ("inception_v3", {"pretrained": True, "image_size": 299, "epochs": 0})},
    },
    "05_attack_invariant_arn": {
        "mnist": {"classifier": ("lenet5", {})},
        "cifar10": {"classifier": ("resnet110", {}), "adversarial": ("resnet110", {}),
                    "surrogate": ("wrn", {"depth": 28, "widen_factor": 20})},
    },
}


@pytest.mark.parametrize("notebook", sorted(SPEC_MODELS))
def test_paper_notebooks_have_a_section_with_the_specs_models_for_each_dataset(notebook):
    seen = notebook_profile(PAPER, notebook)
    paper_datasets = set(SPEC_MODELS[notebook])
    assert paper_datasets <= set(notebook_config(PAPER, notebook)["datasets"])
    for dataset, roles in SPEC_MODELS[notebook].items():
        assert dataset in seen["datasets"], f"{notebook}: no dataset section for {dataset}"
        for role, (arch, extra) in roles.items():
            spec = seen["datasets"][dataset][role]
            assert spec["arch"] == arch, (notebook, dataset, role)
            assert {k: spec.get(k) for k in extra} == extra, (notebook, dataset, role)
            assert spec.get("width", 1.0) == 1.0


def test_sfm_uses_its_own_tiny_imagenet_loss_weights():
    cfg = notebook_config(PAPER, "01_sfm_defense")
    assert cfg["sfm_per_dataset"]["tiny_imagenet"] == {"w2": 0.01, "w3": 100.0}   # spec-000 §2.6
    assert (cfg["sfm"]["w2"], cfg["sfm"]["w3"]) == (1.0, 1.0)                     # CIFAR10 / SVHN


def test_the_shared_sections_are_left_alone_by_a_notebooks_dataset_settings():
    assert PAPER["datasets"]["cifar10"]["surrogate"]["arch"] == "resnet18"        # SFM's independent ResNet-18
    assert notebook_profile(PAPER, "09_cross_defense_benchmark")["datasets"] == PAPER["datasets"]
    bad = {**PAPER, "notebooks": {"x": {"dataset_settings": {"lisa": {"classifier": {"arch": "lisacnn"}}}}}}
    with pytest.raises(ValueError, match="'lisa'"):
        notebook_profile(bad, "x")


def test_wrn_28_20_is_built_with_its_widen_factor():
    spec = notebook_profile(PAPER, "05_attack_invariant_arn")["datasets"]["cifar10"]["surrogate"]
    model = classifier_from_spec(spec, data.dataset_info("cifar10"))
    assert model.feat_dim == 64 * 20                      # WRN-d-k: final width 64k
    assert sum(p.numel() for p in model.parameters()) > 140e6   # WRN-28-20 has about 146 M parameters


def test_a_pretrained_spec_gets_the_imagenet_normalisation(monkeypatch):
    seen = {}
    monkeypatch.setattr(zoo, "build_classifier", lambda arch, **kw: seen.update(arch=arch, **kw))
    classifier_from_spec({"arch": "resnet50_imagenet", "pretrained": True, "weights": "IMAGENET1K_V2"},
                         data.dataset_info("tiny_imagenet"))
    assert (seen["mean"], seen["std"], seen["pretrained"]) == (IMAGENET_MEAN, IMAGENET_STD, True)
    assert seen["num_classes"] == 200 and seen["image_size"] == 64 and seen["weights"] == "IMAGENET1K_V2"


# --------------------------------------------------------------------------- ImageNet preprocessing

def _write_folder(root, dataset: str, size: tuple[int, int]) -> np.ndarray:
    """One class, one image in train/<wnid>/ and val/<wnid>/ under `dataset`; returns the image."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 3] = 0                         # a dark left third: squashing and cropping differ there
    for split in ("train", "val"):
        folder = root / dataset / split / "n01440764"
        folder.mkdir(parents=True)
        Image.fromarray(pixels).save(folder / "a.png")
    return pixels


@pytest.mark.parametrize("image_size,resize", [(224, 256), (299, 342)])
def test_imagenet_is_resized_then_centre_cropped_as_the_pretrained_weights_expect(tmp_path, image_size, resize):
    pixels = _write_folder(tmp_path, "imagenet", (400, 300))
    got = data.load_dataset("imagenet", "test", root=tmp_path, image_size=image_size)
    expected = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                   transforms.PILToTensor()])(Image.fromarray(pixels)).float() / 255
    assert got.x.shape == (1, 3, image_size, image_size) and got.info.image_size == image_size
    assert torch.equal(got.x[0], expected)
    squashed = torch.from_numpy(np.array(Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)))
    assert not torch.equal(got.x[0], squashed.permute(2, 0, 1).float() / 255)   # the old transform


def test_tiny_imagenet_images_keep_their_64_pixels(tmp_path):
    pixels = _write_folder(tmp_path, "tiny-imagenet-200", (64, 64))
    got = data.load_dataset("tiny_imagenet", "train", root=tmp_path)
    assert got.x.shape == (1, 3, 64, 64)
    assert torch.equal(got.x[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


# --------------------------------------------------------------------------- skips

def _run(tmp_path, datasets) -> Run:
    return Run({"name": "smoke", "datasets": {d: {} for d in datasets}}, "nb", {"datasets": list(datasets)}, tmp_path,
               torch.device("cpu"))


def _raises(error: Exception):
    def factory(profile, dataset, classifier, *, device=None):
        raise error
    return factory


def test_a_defense_that_cannot_be_built_for_a_dataset_is_skipped_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "ENTRIES", {
        "ok": ("fine", registry._fixed()),
        "no_budgets": ("no settings", _raises(NotBuiltForDataset("no IDFR budgets for 'mnist'"))),
        "no_data": ("no data", _raises(DatasetUnavailable("dataset 'svhn' is not available"))),
    })
    run = _run(tmp_path, ["mnist"])
    built = registry.build_each(["no_budgets", "ok", "no_data"], run.profile, "mnist", torch.nn.Identity(),
                                skip=run.skip)
    assert list(built) == ["ok"] and isinstance(built["ok"], Built)
    assert report.read_skips(tmp_path) == [
        {"what": "no_budgets on mnist", "reason": "no IDFR budgets for 'mnist'"},
        {"what": "no_data on mnist", "reason": "dataset 'svhn' is not available"}]


def test_a_bug_in_a_factory_is_not_taken_for_a_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "ENTRIES", {"broken": ("broken", _raises(ValueError("shapes differ")))})
    run = _run(tmp_path, ["mnist"])
    with pytest.raises(ValueError, match="shapes differ"):
        registry.build_each(["broken"], run.profile, "mnist", torch.nn.Identity(), skip=run.skip)


def test_per_dataset_records_a_dataset_a_defense_is_not_built_for(tmp_path):
    run = _run(tmp_path, ["mnist", "cifar10"])

    def prepare(run, dataset):
        if dataset == "mnist":
            raise NotBuiltForDataset(f"no IDFR budgets for {dataset!r}")
        return Built(NoDefense(), torch.nn.Identity())

    assert list(run.per_dataset(prepare)) == ["cifar10"]
    assert report.read_skips(tmp_path) == [{"what": "dataset mnist", "reason": "no IDFR budgets for 'mnist'"}]


# --------------------------------------------------------------------------- like-for-like labels

@pytest.mark.parametrize("paper,ours,same", [
    ("ResNet18", "resnet18", True), ("ResNet50", "resnet50_imagenet", True), ("InceptionV3", "inception_v3", True),
    ("resnet110, wrn-28-20", "resnet110, wrn-28-20", True), ("ResNet18", "resnet18 x0.25", False),
    ("VGG16", "resnet18", False), ("ResNet18, VGG16", "resnet18, vgg19", False)])
def test_model_names_compare_across_the_papers_spelling(paper, ours, same):
    assert (stand_in_label({"model": paper}, {"model": ours}) is None) == same


def test_idfr_names_the_paper_profiles_models_as_the_paper_does():
    seen = notebook_profile(PAPER, "02_idfr")
    assert our_model(seen, "imagenet", "target", "ResNet50") == "ResNet50"
    assert our_model(seen, "imagenet", "surrogate", "InceptionV3") == "InceptionV3"
    assert our_model(seen, "cifar10", "surrogate", "VGG16") == "VGG16"
