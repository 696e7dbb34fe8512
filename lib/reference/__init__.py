"""The five papers' published numbers as tidy tables, so notebooks can print them beside reproduced ones.

Data files: ``<paper>/<table>.csv`` (one published number per row) and ``index.csv`` (one row per table).
They are inputs transcribed from the papers, never outputs of this project.
"""
from __future__ import annotations

from importlib.resources import files

import pandas as pd

from lib.reference.compare import beside_paper, compare, stand_in_label

PAPERS: tuple[str, ...] = ("sfm", "idfr", "regionsparse", "reconstruction", "arn")
COLUMNS: tuple[str, ...] = (
    "paper", "table", "dataset", "model", "defense", "setting", "attack", "eps", "metric", "value", "unit", "note",
)
INDEX_COLUMNS: tuple[str, ...] = ("paper", "table", "title", "metric", "unit", "spec_section", "description")

CONTROL_COLUMNS: tuple[str, ...] = (
    "dataset", "norm", "eps", "model", "training", "attack", "ours_attack", "clean", "value", "unit", "source",
)

__all__ = ["PAPERS", "COLUMNS", "INDEX_COLUMNS", "CONTROL_COLUMNS", "list_tables", "load_reference", "load_controls",
           "compare", "beside_paper", "stand_in_label"]


def _read(name: str) -> pd.DataFrame:
    """Read a packaged CSV with every column as text and empty cells kept as ''."""
    with files(__name__).joinpath(name).open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh, dtype=str, keep_default_na=False)


def _check_paper(paper: str) -> None:
    """Raise ValueError naming the valid ids when `paper` is not one of them."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; valid papers: {', '.join(PAPERS)}")


def list_tables(paper: str | None = None) -> pd.DataFrame:
    """The index of transcribed tables (all papers, or one), to discover what can be loaded."""
    index = _read("index.csv")
    if paper is not None:
        _check_paper(paper)
        index = index[index["paper"] == paper].reset_index(drop=True)
    return index


def load_reference(paper: str, table: str) -> pd.DataFrame:
    """One published table in long format: `value` as float (NaN where not reported), every other column str."""
    _check_paper(paper)
    tables = list_tables(paper)["table"].tolist()
    if table not in tables:
        raise ValueError(f"unknown table {table!r} for paper {paper!r}; valid tables: {', '.join(tables)}")
    frame = _read(f"{paper}/{table}.csv")
    frame["value"] = pd.to_numeric(frame["value"].replace("", None), errors="raise").astype(float)
    return frame


def load_controls() -> pd.DataFrame:
    """Published robust accuracies of adversarially trained classifiers (controls.csv), the control of notebook 09:
    one row per (dataset, our dataset name; norm; eps; model; training; attack) with `ours_attack`, the label of our
    headline attack it is printed beside, `clean` and `value` (robust accuracy) in %, and its `source` (paper and
    table). eps, clean and value as float."""
    frame = _read("controls.csv")
    if tuple(frame.columns) != CONTROL_COLUMNS:
        raise ValueError(f"controls.csv must have the columns {CONTROL_COLUMNS}, has {tuple(frame.columns)}")
    for column in ("eps", "clean", "value"):
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype(float)
    return frame
