"""The reproduction report: every ours-vs-paper table a run wrote, summarised, and the papers' headline claims checked.

Paper notebooks save comparison tables: key columns, then `ours` and the paper's value (`paper`, or
`paper (<dataset>, other dataset)` when our dataset is not the paper's), usually with `diff`.
This module finds them under results/<profile>/, measures agreement per table, and evaluates each headline
claim of lib/reference/headline_claims.csv (its `table` is a glob over table names, one verdict per match) on
our numbers and, as a control, on the paper's.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd

from lib import report

CLAIMS_FILE = Path(__file__).resolve().parent / "reference" / "headline_claims.csv"
NOTEBOOK_PAPERS = {"01_sfm_defense": "sfm", "02_idfr": "idfr", "03_regionsparse": "regionsparse",
                   "04_image_reconstruction": "reconstruction", "05_attack_invariant_arn": "arn"}
CLOSE = 5.0  # points: a cell "agrees" when |ours - paper| is at most this


def paper_column(table: pd.DataFrame) -> str | None:
    """The column holding the paper's numbers: `paper`, else the first one named `paper (...)`."""
    if "paper" in table.columns:
        return "paper"
    return next((c for c in table.columns if str(c).startswith("paper (")), None)


def comparison_tables(profile: str) -> dict[tuple[str, str], pd.DataFrame]:
    """{(notebook, table name): table} for every saved table with `ours` and a paper column in this run.

    The paper column is renamed `paper`; `other_dataset` in table.attrs says it is from another dataset.
    """
    root = report.results_root() / profile
    found = {}
    for notebook in NOTEBOOK_PAPERS:
        for path in sorted((root / notebook / "tables").glob("*.csv")):
            table = pd.read_csv(path)
            column = paper_column(table)
            if "ours" in table.columns and column is not None:
                table = table.rename(columns={column: "paper"})
                table.attrs["paper_column"] = column
                found[(notebook, path.stem)] = table
    return found


def agreement(table: pd.DataFrame) -> dict[str, float | int | str]:
    """Cells compared, reproduced-only / paper-only cells, mean and max |ours - paper|, share within CLOSE points."""
    ours = pd.to_numeric(table["ours"], errors="coerce")
    paper = pd.to_numeric(table["paper"], errors="coerce")
    both = ours.notna() & paper.notna()
    gap = (ours[both] - paper[both]).abs()
    return {"paper_column": table.attrs.get("paper_column", "paper"),
            "cells_compared": int(both.sum()), "ours_only": int((ours.notna() & paper.isna()).sum()),
            "paper_only": int((paper.notna() & ours.isna()).sum()),
            "mean_abs_diff": float(gap.mean()) if len(gap) else np.nan,
            "max_abs_diff": float(gap.max()) if len(gap) else np.nan,
            "share_within_5": float((gap <= CLOSE).mean()) if len(gap) else np.nan}


def agreement_summary(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per comparison table."""
    rows = [{"paper": NOTEBOOK_PAPERS[nb], "notebook": nb, "table": name, **agreement(t)}
            for (nb, name), t in tables.items()]
    columns = ["paper", "notebook", "table", "paper_column", "cells_compared", "ours_only", "paper_only",
               "mean_abs_diff", "max_abs_diff", "share_within_5"]
    return pd.DataFrame(rows, columns=columns)


def not_reproduced(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Every cell the paper reports and this run did not produce, with the row's keys."""
    parts = []
    for (nb, name), table in tables.items():
        missing = table[pd.to_numeric(table["paper"], errors="coerce").notna()
                        & pd.to_numeric(table["ours"], errors="coerce").isna()]
        if len(missing):
            keys = [c for c in table.columns if c not in ("ours", "paper", "diff")]
            parts.append(pd.DataFrame({"paper": NOTEBOOK_PAPERS[nb], "table": name,
                                       "cell": [" / ".join(str(v) for v in row if pd.notna(v))
                                                for row in missing[keys].itertuples(index=False)],
                                       "paper_value": missing["paper"].to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["paper", "table", "cell", "paper_value"])


def load_claims(path: Path = CLAIMS_FILE) -> pd.DataFrame:
    """The headline claims: in tables matching `table`, rows with `key` == `better` should beat rows with `key` ==
    `worse` in every cell paired on the `match_on` columns (';'-separated), after the `filter` (col=value or
    col!=value, ';'-separated)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _claim_holds(table: pd.DataFrame, claim: pd.Series, column: str) -> tuple[str, str]:
    """('holds' | 'fails' | 'not measured', detail) for one claim on one value column (ours or paper)."""
    key = claim["key"]
    if key not in table.columns:
        return "not measured", f"table has no column {key!r}"
    if claim["filter"]:
        for condition in claim["filter"].split(";"):
            negate = "!=" in condition
            col, value = condition.split("!=" if negate else "=", 1)
            if col not in table.columns:
                return "not measured", f"table has no column {col!r}"
            equal = table[col].astype(str) == value
            table = table[~equal if negate else equal]
    values = pd.to_numeric(table[column], errors="coerce")
    others = [c for c in claim["match_on"].split(";") if c]
    if absent := [c for c in others if c not in table.columns]:
        return "not measured", f"table has no column(s) {absent}"
    side = {}
    for label in ("better", "worse"):
        rows = table[table[key].astype(str) == claim[label]]
        side[label] = pd.Series(values[rows.index].to_numpy(), index=pd.MultiIndex.from_frame(rows[others].astype(str))
                                if others else None)
    paired = pd.concat(side, axis=1).dropna()
    if paired.empty:
        return "not measured", f"no cells with both {claim['better']!r} and {claim['worse']!r}"
    sign = 1.0 if claim["higher_is_better"].lower() == "true" else -1.0
    wins = int((sign * (paired["better"] - paired["worse"]) > 0).sum())
    verdict = "holds" if wins == len(paired) else "fails"
    return verdict, f"{claim['better']} better in {wins}/{len(paired)} cells"


def check_claims(tables: dict[tuple[str, str], pd.DataFrame], claims: pd.DataFrame) -> pd.DataFrame:
    """Each claim evaluated on every matching table, on our numbers and on the paper's (the control)."""
    rows = []
    for _, claim in claims.iterrows():
        matches = {name: t for (nb, name), t in tables.items()
                   if NOTEBOOK_PAPERS[nb] == claim["paper"] and fnmatch.fnmatch(name, claim["table"])}
        if not matches:
            missing = ("not measured", f"no table matching {claim['table']!r} was written in this run")
            matches = {claim["table"]: None}
        for name, table in matches.items():
            ours, paper = (missing, missing) if table is None else (
                _claim_holds(table, claim, "ours"), _claim_holds(table, claim, "paper"))
            rows.append({"paper": claim["paper"], "claim": claim["claim"], "table": name, "ours": ours[0],
                         "ours_detail": ours[1], "in_paper": paper[0], "paper_detail": paper[1]})
    return pd.DataFrame(rows, columns=["paper", "claim", "table", "ours", "ours_detail", "in_paper", "paper_detail"])


def report_markdown(profile: str, summary: pd.DataFrame, claims: pd.DataFrame, missing: pd.DataFrame) -> str:
    """REPORT.md: agreement per table, claims, and what was not reproduced."""
    parts = [f"# Reproduction report ({profile} profile)\n",
             "Generated by notebooks/10_reproduction_report.ipynb from the tables this run wrote; the papers' numbers "
             "come from lib/reference/. `share_within_5` is the share of cells where |ours - paper| <= 5 points.\n",
             "## Agreement per table\n", report.to_markdown(summary) if len(summary) else "_no comparison tables found_",
             "\n## Headline claims\n", report.to_markdown(claims) if len(claims) else "_no claims_",
             "\n## Not reproduced (paper value shown, no number of ours)\n",
             report.to_markdown(missing) if len(missing) else "_every paper cell has a number of ours_"]
    return "\n".join(parts) + "\n"
