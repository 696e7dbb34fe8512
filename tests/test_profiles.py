import pytest

from lib.profiles import PROFILES, dataset_config, load_profile, notebook_config


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_with_its_name_and_seed(name):
    profile = load_profile(name)
    assert profile["name"] == name
    assert isinstance(profile["seed"], int)
    assert "00_setup_and_data" in profile["notebooks"]


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="smoke, quick, paper"):
        load_profile("fast")


def test_dotted_overrides_change_one_value_only():
    base = load_profile("smoke")
    changed = load_profile("smoke", {"datasets.digits.test_size": 7})
    assert changed["datasets"]["digits"]["test_size"] == 7
    assert changed["datasets"]["digits"]["classifier"] == base["datasets"]["digits"]["classifier"]
    with pytest.raises(ValueError, match="not a section"):
        load_profile("smoke", {"seed.x": 1})


def test_missing_sections_are_named():
    profile = load_profile("smoke")
    with pytest.raises(ValueError, match="no section for notebook '99_x'"):
        notebook_config(profile, "99_x")
    with pytest.raises(ValueError, match="no settings for dataset 'cifar10'"):
        dataset_config(profile, "cifar10")


def test_smoke_uses_only_bundled_data():
    profile = load_profile("smoke")
    assert set(profile["datasets"]) == {"digits"}
    for section in profile["notebooks"].values():
        assert set(section.get("datasets", [])) <= {"digits"}
