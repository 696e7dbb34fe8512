"""Our numbers beside the published ones: `beside_paper` for every paper notebook, on top of the join `compare`."""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd


def _side(frame: pd.DataFrame, on: list[str], value_col: str, name: str, label: str) -> pd.DataFrame:
    """Keys plus one value column renamed to `name`; keys must exist and identify rows uniquely."""
    missing = [c for c in [*on, value_col] if c not in frame.columns]
    if missing:
        raise ValueError(f"{label} frame lacks columns {missing}")
    side = frame[[*on, value_col]].rename(columns={value_col: name})
    dup = side.duplicated(subset=on, keep=False)
    if dup.any():
        raise ValueError(
            f"{label} frame has {int(dup.sum())} rows sharing keys {on}; add key columns "
            f"(e.g. 'setting' or 'note') or filter first. First duplicate: {side.loc[dup, on].iloc[0].tolist()}"
        )
    side[name] = pd.to_numeric(side[name], errors="raise").astype(float)
    return side


def compare(ours: pd.DataFrame, paper: pd.DataFrame, on: list[str], value_col: str = "value") -> pd.DataFrame:
    """Outer join on `on`: columns on + ours, paper, diff (= ours - paper); a side without the row gives NaN.

    `value_col` names the measured column in `ours`; the published column is always `value` (the reference schema).
    Paper rows come first in their order, then rows only we measured.
    """
    if not on:
        raise ValueError("compare needs at least one key column in `on`")
    left = _side(paper, list(on), "value", "paper", "paper").assign(_lpos=lambda f: range(len(f)))
    right = _side(ours, list(on), value_col, "ours", "ours").assign(_rpos=lambda f: range(len(f)))
    joined = left.merge(right, on=list(on), how="outer")
    joined = joined.sort_values(["_lpos", "_rpos"], na_position="last", kind="stable").reset_index(drop=True)
    joined["diff"] = joined["ours"] - joined["paper"]
    return joined[[*on, "ours", "paper", "diff"]]


def _dataset_key(name: str) -> str:
    """'CIFAR-10', 'cifar10', 'CIFAR10' -> 'cifar10'; 'F-MNIST', 'fashion_mnist' -> 'fashionmnist'."""
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    return {"fmnist": "fashionmnist"}.get(key, key)


def _same(field: str, a: object, b: object) -> bool:
    if field == "dataset":
        return _dataset_key(str(a)) == _dataset_key(str(b))
    if field == "model":   # the paper's "ResNet18" / "InceptionV3" are our archs resnet18 / inception_v3
        return _model_key(str(a)) == _model_key(str(b))
    return str(a) == str(b)


def _model_key(models: str) -> list[str]:
    """Comma-separated model names, each lower-case alphanumerics without our '_imagenet' tag (resnet50_imagenet is
    torchvision's ResNet-50); a width suffix ('resnet18 x0.25') keeps the names apart."""
    return ["".join(c for c in m.lower().replace("_imagenet", "") if c.isalnum()) for m in models.split(",")]


def stand_in_label(paper_setting: Mapping[str, object], ours_setting: Mapping[str, object]) -> str | None:
    """None when our run matches the paper's table in every field of `paper_setting` (dataset, model, budget...);
    else the column label of a stand-in comparison, e.g. 'paper (CIFAR10; ours fashion_mnist)'."""
    differ = [f for f, v in paper_setting.items() if f not in ours_setting or not _same(f, v, ours_setting[f])]
    if not differ:
        return None
    paper = ", ".join(str(paper_setting[f]) for f in differ)
    ours = ", ".join(str(ours_setting.get(f, "?")) for f in differ)
    return f"paper ({paper}; ours {ours})"


def beside_paper(ours: pd.DataFrame, reference: pd.DataFrame, on: Sequence[str], *, value_col: str = "value",
                 paper_setting: Mapping[str, object] | None = None,
                 ours_setting: Mapping[str, object] | None = None) -> pd.DataFrame:
    """Our numbers beside the paper's: the one comparison every paper notebook uses.

    Rows are joined on `on` (see `compare`). When our run used the paper's own setting (every field of
    `paper_setting`, e.g. {"dataset": "CIFAR10"}, equal in `ours_setting`) the columns are on + ours, paper,
    diff. Otherwise the comparison is a stand-in: the paper column is labelled with what differs
    ('paper (CIFAR10; ours fashion_mnist)') and there is no diff column, so it never counts as agreement.
    """
    joined = compare(ours, reference, list(on), value_col)
    label = stand_in_label(paper_setting or {}, ours_setting or {})
    if label is None:
        return joined
    return joined.drop(columns="diff").rename(columns={"paper": label})
