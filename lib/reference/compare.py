"""Join reproduced numbers with published ones, so every table can show ours, the paper's and the difference."""
from __future__ import annotations

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
