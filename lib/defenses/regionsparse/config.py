"""RegionSparse's settings (spec-002 §2.8) and the Fig. 4 ablations as named changes to them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from lib.validate import check_positive_int

DICTIONARIES = ("learned", "dct")
REGIONS = ("bbox", "full", "none")
BACKGROUNDS = ("bilateral", "identity")
# Fig. 4's ablations (one added step removed each) and two extra variants that isolate the region split.
VARIANTS: dict[str, dict[str, Any]] = {
    "Region": {},
    "noTR": {"dictionary": "dct"},
    "noIS": {"smooth": False},
    "noPN": {"normalize": False},
    "noBS": {"background": "identity"},
    "Full-image SC (not in paper)": {"region": "full"},
    "BF only (not in paper)": {"region": "none"},
}
EPS = 1e-6
# the settings the dictionary depends on (its cache key); test-time knobs are left out so variants share it
DICTIONARY_FIELDS = ("patch_size", "n_atoms", "alpha", "dict_epochs", "dict_batch_size", "patches_per_image",
                      "nlm_h", "nlm_template", "nlm_search", "dictionary", "smooth", "normalize", "seed")


@dataclass(frozen=True)
class RegionSparseConfig:
    """Every RegionSparse knob (spec-002 §2.8); paper-unspecified values are the spec's assumptions."""

    patch_size: int = 5            # b
    n_atoms: int = 64              # k
    sparsity: int = 3              # K non-zero OMP coefficients per patch
    alpha: float = 1.0             # beta of Eq. 20 (dictionary learning only)
    dict_epochs: int = 5
    dict_batch_size: int = 256
    patches_per_image: int = 200   # n
    nlm_h: float = 10.0            # uint8 scale, as OpenCV takes it
    nlm_template: int = 5
    nlm_search: int = 11
    stride: int = 2                # test-time patch stride
    bilateral_d: int = 5
    bilateral_sigma_color: float = 50.0   # uint8 scale (applied to float images as sigma / 255)
    bilateral_sigma_space: float = 5.0
    loc_scale: float | None = None        # s of §2.4; None = image height / 299
    min_area: float = 0.02                # boxes smaller than this fraction fall back to the whole image
    dictionary: str = "learned"    # "dct" = noTR
    smooth: bool = True            # False = noIS
    normalize: bool = True         # False = noPN
    background: str = "bilateral"  # "identity" = noBS
    region: str = "bbox"           # "full" = sparse-code everything, "none" = bilateral only
    seed: int = 0

    def __post_init__(self) -> None:
        for value, name in ((self.patch_size, "patch_size"), (self.n_atoms, "n_atoms"), (self.sparsity, "sparsity"),
                            (self.dict_epochs, "dict_epochs"), (self.patches_per_image, "patches_per_image"),
                            (self.stride, "stride"), (self.dict_batch_size, "dict_batch_size")):
            check_positive_int(value, name)
        if self.sparsity > self.n_atoms:
            raise ValueError(f"sparsity K={self.sparsity} exceeds the number of atoms {self.n_atoms}")
        for value, name, valid in ((self.dictionary, "dictionary", DICTIONARIES), (self.region, "region", REGIONS),
                                   (self.background, "background", BACKGROUNDS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"min_area must lie in [0, 1), got {self.min_area}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RegionSparseConfig":
        """Build from a profile section, ignoring keys that are not RegionSparse settings."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in names})

    def variant(self, name: str) -> "RegionSparseConfig":
        """The configuration of one Fig. 4 ablation / extra variant (see VARIANTS)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        return replace(self, **VARIANTS[name])
