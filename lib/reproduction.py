"""The reproduction report: the ours-vs-paper tables of this run, agreement over like-for-like cells, stand-in
comparisons listed apart, and the papers' headline claims checked.

Paper notebooks save comparison tables made by lib.reference.beside_paper: key columns, then `ours` and the
paper's value. A like-for-like table (our run used the paper's dataset, model and budget) has the columns
`ours`, `paper`, `diff`; a stand-in comparison (another dataset, model or budget) has `ours` and
`paper (<paper setting>; ours <our setting>)` and no `diff`. Only like-for-like cells count towards agreement;
stand-in tables are listed apart with their cell counts and no gap.

Only tables of the current run are read: a notebook's tables count when its status.json (written by lib.runner)
says `ok` and, when ADV_RUN_ID is set (the runner sets it for every kernel), names the current run. Without
ADV_RUN_ID (interactive use) the latest finished run of each notebook counts. Notebooks that failed, did not run
in this run or never finished are listed in the report with the reason.

Each headline claim of lib/reference/headline_claims.csv (its `table` is a glob over table names, one verdict per
match) is evaluated on our numbers and, as a control, on the paper's, on both kinds of table (a column says which).
A verdict per paper sums up its claims on our numbers: holds, does not hold, or cannot be tested here.

Tables that carry our 95% interval (`paper in interval`, e.g. notebook 04's) also give the share of like-for-like
cells whose paper number lies inside it (`share_in_interval`).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib import report
from lib.cache import atomic_write_text
from lib.profiles import dry_run_banner
from lib.runner import RUN_ID_ENV, read_status

CLAIMS_FILE = Path(__file__).resolve().parent / "reference" / "headline_claims.csv"
NOTEBOOK_PAPERS = {"01_sfm_defense": "sfm", "02_idfr": "idfr", "03_regionsparse": "regionsparse",
                   "04_image_reconstruction": "reconstruction", "05_attack_invariant_arn": "arn"}
CLOSE = 5.0  # points: a cell "agrees" when |ours - paper| is at most this
IN_INTERVAL = "paper in interval"  # bool column: the paper's number lies in our 95% interval (empty: no paper number)
LIKE_FOR_LIKE, STAND_IN = "like for like", "stand-in"
REPORT_FILE = "REPORT.md"


def paper_columns(table: pd.DataFrame) -> list[str]:
    """The columns holding the paper's numbers: `paper` and every `paper (...)` (a table over several of our
    datasets has one stand-in column per dataset)."""
    return [c for c in table.columns if c == "paper" or str(c).startswith("paper (")]


def comparison_kind(column: str) -> str:
    """LIKE_FOR_LIKE for the plain `paper` column, STAND_IN for a labelled `paper (<setting>...)` one."""
    return LIKE_FOR_LIKE if column == "paper" else STAND_IN


def current_run_id() -> str | None:
    """The run id lib.runner exported to this kernel, or None in interactive use."""
    return os.environ.get(RUN_ID_ENV) or None


def notebook_states(profile: str, run_id: str | None = None,
                    notebooks: tuple[str, ...] = tuple(NOTEBOOK_PAPERS)) -> pd.DataFrame:
    """One row per paper notebook: whether its tables are read (`read`) in this report, and if not, why.

    `run_id` is the current run (default: ADV_RUN_ID; None reads the latest finished run of each notebook).
    """
    run_id = current_run_id() if run_id is None else run_id
    rows = []
    for notebook in notebooks:
        status = read_status(report.results_root() / profile / notebook)
        if status is None:
            state, reason = "not run", "no status.json: the notebook never finished a run of lib.runner"
        elif run_id and status.get("run_id") != run_id:
            state, reason = "not run", f"not in this run (its latest finished run is {status.get('run_id')})"
        elif status.get("status") != "ok":
            state, reason = "failed", status.get("error") or "the notebook failed"
        else:
            state, reason = "read", ""
        rows.append({"notebook": notebook, "paper": NOTEBOOK_PAPERS.get(notebook, ""), "state": state,
                     "run_id": (status or {}).get("run_id", ""), "finished_utc": (status or {}).get("finished_utc", ""),
                     "reason": reason})
    return pd.DataFrame(rows, columns=["notebook", "paper", "state", "run_id", "finished_utc", "reason"])


def comparison_tables(profile: str, run_id: str | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    """{(notebook, table name): table} for every saved table with `ours` and a paper column, from the notebooks
    whose state in `notebook_states(profile, run_id)` is `read`; a table of the other reading of an open setting
    (name ending in report.OTHER_READING) is shown in its notebook but is no comparison.

    The paper column is renamed `paper`; table.attrs keeps its original name (`paper_column`) and the kind of
    comparison (`kind`: LIKE_FOR_LIKE or STAND_IN). A table with several paper columns gives one comparison per
    column (its rows with a number in that column), named `<table> [<column>]`.
    """
    states = notebook_states(profile, run_id)
    root = report.results_root() / profile
    found = {}
    for notebook in states.loc[states["state"] == "read", "notebook"]:
        for path in sorted((root / notebook / "tables").glob("*.csv")):
            if path.stem.endswith(report.OTHER_READING):
                continue
            table = pd.read_csv(path)
            columns = paper_columns(table)
            if "ours" not in table.columns:
                continue
            for column in columns:
                part = table if len(columns) == 1 else table[table[column].notna()]
                part = part.drop(columns=[c for c in columns if c != column]).rename(columns={column: "paper"})
                part.attrs.update(paper_column=column, kind=comparison_kind(column))
                found[(notebook, path.stem if len(columns) == 1 else f"{path.stem} [{column}]")] = part
    return found


def _split(tables: dict[tuple[str, str], pd.DataFrame], kind: str) -> dict[tuple[str, str], pd.DataFrame]:
    return {key: t for key, t in tables.items() if t.attrs.get("kind", LIKE_FOR_LIKE) == kind}


def _cells(table: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(ours, paper, both present) as numbers."""
    ours = pd.to_numeric(table["ours"], errors="coerce")
    paper = pd.to_numeric(table["paper"], errors="coerce")
    return ours, paper, ours.notna() & paper.notna()


def _counts(table: pd.DataFrame) -> dict[str, int]:
    ours, paper, both = _cells(table)
    return {"cells_compared": int(both.sum()), "ours_only": int((ours.notna() & paper.isna()).sum()),
            "paper_only": int((paper.notna() & ours.isna()).sum())}


def _interval_flags(table: pd.DataFrame) -> pd.Series:
    """`paper in interval` of the compared cells as True/False (unknown ones dropped); a CSV round trip leaves
    bools, "True"/"False" strings or NaN, so the column is parsed from its text."""
    text = table[IN_INTERVAL][_cells(table)[2]].astype(str).str.strip().str.lower()
    return text.map({"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}).dropna()


def _share_in_interval(frames: list[pd.DataFrame]) -> float:
    """Share of compared cells whose paper number lies in our 95% interval, over the tables of `frames` with the
    column; NaN when none has it (or none of their compared cells has a flag)."""
    flags = [_interval_flags(t) for t in frames if IN_INTERVAL in t.columns]
    known = pd.concat(flags) if flags else pd.Series(dtype=bool)
    return float(known.astype(bool).mean()) if len(known) else np.nan


def _gaps(frames: list[pd.DataFrame]) -> dict[str, float]:
    """Mean and max |ours - paper|, the share within CLOSE points and the share in our 95% interval, over the cells
    of all `frames`."""
    gap = pd.concat([(o[b] - p[b]).abs() for o, p, b in map(_cells, frames)] or [pd.Series(dtype=float)])
    if not len(gap):
        return {"mean_abs_diff": np.nan, "max_abs_diff": np.nan, "share_within_5": np.nan, "share_in_interval": np.nan}
    return {"mean_abs_diff": float(gap.mean()), "max_abs_diff": float(gap.max()),
            "share_within_5": float((gap <= CLOSE).mean()), "share_in_interval": _share_in_interval(frames)}


def agreement(table: pd.DataFrame) -> dict[str, float | int | str]:
    """Cells compared, reproduced-only / paper-only cells, mean and max |ours - paper|, share within CLOSE points
    and share in our 95% interval (for a like-for-like table; a stand-in's gaps are no measure of agreement)."""
    return {"paper_column": table.attrs.get("paper_column", "paper"), **_counts(table), **_gaps([table])}


AGREEMENT_COLUMNS = ["paper", "notebook", "table", "paper_column", "cells_compared", "ours_only", "paper_only",
                     "mean_abs_diff", "max_abs_diff", "share_within_5", "share_in_interval"]
STAND_IN_COLUMNS = ["paper", "notebook", "table", "paper_column", "cells_compared", "ours_only", "paper_only"]


def agreement_summary(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per like-for-like comparison table, with its agreement (stand-in tables are left out)."""
    rows = [{"paper": NOTEBOOK_PAPERS[nb], "notebook": nb, "table": name, **agreement(t)}
            for (nb, name), t in _split(tables, LIKE_FOR_LIKE).items()]
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def overall_agreement(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per paper and one `all` row: agreement over every like-for-like cell (each cell weighs the same)."""
    like = _split(tables, LIKE_FOR_LIKE)
    groups = {paper: [t for (nb, _), t in like.items() if NOTEBOOK_PAPERS[nb] == paper]
              for paper in dict.fromkeys(NOTEBOOK_PAPERS[nb] for nb, _ in like)}
    groups["all"] = list(like.values())
    rows = [{"paper": paper, "tables": len(frames),
             **{k: sum(_counts(t)[k] for t in frames) for k in ("cells_compared", "ours_only", "paper_only")},
             **_gaps(frames)} for paper, frames in groups.items()]
    return pd.DataFrame(rows, columns=["paper", "tables", "cells_compared", "ours_only", "paper_only",
                                       "mean_abs_diff", "max_abs_diff", "share_within_5", "share_in_interval"])


def stand_in_summary(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """One row per stand-in comparison table: what the paper column compares with, and cell counts (no gaps)."""
    rows = [{"paper": NOTEBOOK_PAPERS[nb], "notebook": nb, "table": name,
             "paper_column": t.attrs.get("paper_column", ""), **_counts(t)}
            for (nb, name), t in _split(tables, STAND_IN).items()]
    return pd.DataFrame(rows, columns=STAND_IN_COLUMNS)


def not_reproduced(tables: dict[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """Every cell the paper reports and this run did not produce, with the row's keys and the table's kind."""
    parts = []
    for (nb, name), table in tables.items():
        ours, paper, _ = _cells(table)
        missing = table[paper.notna() & ours.isna()]
        if len(missing):
            keys = [c for c in table.columns if c not in ("ours", "paper", "diff")]
            parts.append(pd.DataFrame({"paper": NOTEBOOK_PAPERS[nb], "table": name,
                                       "comparison": table.attrs.get("kind", LIKE_FOR_LIKE),
                                       "cell": [" / ".join(str(v) for v in row if pd.notna(v))
                                                for row in missing[keys].itertuples(index=False)],
                                       "paper_value": missing["paper"].to_numpy()}))
    columns = ["paper", "table", "comparison", "cell", "paper_value"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


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
    """Each claim evaluated on every matching table (like for like or stand-in, as the `comparison` column says),
    on our numbers and on the paper's (the control)."""
    rows = []
    for _, claim in claims.iterrows():
        matches = {name: t for (nb, name), t in tables.items()
                   if NOTEBOOK_PAPERS[nb] == claim["paper"] and fnmatch.fnmatch(name, claim["table"])}
        missing = ("not measured", f"no table matching {claim['table']!r} was written in this run")
        for name, table in (matches or {claim["table"]: None}).items():
            ours, paper = (missing, missing) if table is None else (
                _claim_holds(table, claim, "ours"), _claim_holds(table, claim, "paper"))
            rows.append({"paper": claim["paper"], "claim": claim["claim"], "table": name,
                         "comparison": "" if table is None else table.attrs.get("kind", LIKE_FOR_LIKE),
                         "ours": ours[0], "ours_detail": ours[1], "in_paper": paper[0], "paper_detail": paper[1]})
    return pd.DataFrame(rows, columns=["paper", "claim", "table", "comparison", "ours", "ours_detail", "in_paper",
                                       "paper_detail"])


VERDICT_COLUMNS = ["paper", "verdict", "claims_measured", "claims_holding", "claims_failing", "basis",
                   "cells_compared", "share_within_5", "share_in_interval", "detail"]


def _basis(kinds: set[str]) -> str:
    """What the measured claims of a paper were tested on: like for like, stand-ins only, or both."""
    if kinds == {LIKE_FOR_LIKE}:
        return LIKE_FOR_LIKE
    return "stand-in (another dataset/model)" if kinds == {STAND_IN} else "mixed"


def paper_verdicts(claims: pd.DataFrame, overall: pd.DataFrame) -> pd.DataFrame:
    """One row per paper (all of NOTEBOOK_PAPERS, in series order): whether its headline claims hold on our numbers
    (`check_claims` rows; a claim fails when any of its measured tables fails), on what basis, beside the paper's
    like-for-like agreement from `overall_agreement`, so that a verdict is never read without its scale."""
    agree = overall.set_index("paper")
    rows = []
    for paper in NOTEBOOK_PAPERS.values():
        measured = claims[(claims["paper"] == paper) & claims["ours"].isin(["holds", "fails"])]
        failing = measured[measured["ours"] == "fails"].groupby("claim", sort=False)["table"].agg(", ".join)
        n_measured = measured["claim"].nunique()
        verdict = "cannot be tested here" if not n_measured else "does not hold" if len(failing) else "holds"
        row = agree.loc[paper] if paper in agree.index else {}
        rows.append({"paper": paper, "verdict": verdict, "claims_measured": n_measured,
                     "claims_holding": n_measured - len(failing), "claims_failing": len(failing),
                     "basis": _basis(set(measured["comparison"])) if len(measured) else "",
                     "cells_compared": int(row.get("cells_compared", 0)),
                     "share_within_5": row.get("share_within_5", np.nan),
                     "share_in_interval": row.get("share_in_interval", np.nan),
                     "detail": "; ".join(f"{claim} ({tables})" for claim, tables in failing.items())})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def recorded_skips(profile: str, states: pd.DataFrame) -> pd.DataFrame:
    """The parts the notebooks of this run recorded as skipped (read or failed notebooks), with the reasons."""
    ran = states.loc[states["state"] != "not run", "notebook"]
    rows = [{"notebook": nb, "what": s["what"], "reason": " ".join(str(s["reason"]).split())}
            for nb in ran for s in report.read_skips(report.results_root() / profile / nb)]
    return pd.DataFrame(rows, columns=["notebook", "what", "reason"])


BENCHMARK = "09_cross_defense_benchmark"
SANITY_COLUMNS = ["dataset", "defense", "check", "status", "measured", "explanation"]


def benchmark_sanity(profile: str, run_id: str | None = None) -> pd.DataFrame:
    """The WARN rows of the benchmark's sanity checks (notebook 09's `<dataset>_sanity` tables), when notebook 09
    finished ok in this run; empty otherwise."""
    state = notebook_states(profile, run_id, (BENCHMARK,)).iloc[0]
    if state["state"] != "read":
        return pd.DataFrame(columns=SANITY_COLUMNS)
    found = sorted((report.results_root() / profile / BENCHMARK / "tables").glob("*_sanity.csv"))
    tables = [pd.read_csv(path) for path in found]
    checks = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=SANITY_COLUMNS)
    return checks[checks["status"] == "WARN"].reset_index(drop=True)


@dataclass
class Report:
    """The pieces of REPORT.md, for display: each a table, plus the Markdown text and where it was written."""

    notebooks: pd.DataFrame
    verdicts: pd.DataFrame
    overall: pd.DataFrame
    agreement: pd.DataFrame
    stand_ins: pd.DataFrame
    claims: pd.DataFrame
    missing: pd.DataFrame
    skips: pd.DataFrame
    sanity: pd.DataFrame
    markdown: str
    path: Path


def _section(title: str, table: pd.DataFrame, empty: str, note: str = "") -> list[str]:
    return [f"\n## {title}\n", *([note + "\n"] if note else []), report.to_markdown(table) if len(table) else empty]


def report_markdown(profile: str, summary: pd.DataFrame, claims: pd.DataFrame, missing: pd.DataFrame, *,
                    overall: pd.DataFrame | None = None, stand_ins: pd.DataFrame | None = None,
                    notebooks: pd.DataFrame | None = None, skips: pd.DataFrame | None = None,
                    sanity: pd.DataFrame | None = None, verdicts: pd.DataFrame | None = None,
                    run_id: str | None = None) -> str:
    """REPORT.md: which notebooks were read, a verdict per paper, agreement over like-for-like tables, the stand-in
    comparisons apart, claims, what was not reproduced, and the skips the notebooks recorded."""
    run = f"run `{run_id}`" if run_id else "the latest finished run of each notebook"
    banner = dry_run_banner(profile)
    parts = [f"# Reproduction report ({profile} profile)\n", *([banner + "\n"] if banner else []),
             (f"Generated by notebooks/10_reproduction_report.ipynb from the tables written by {run}; the papers' "
             "numbers come from lib/reference/. Agreement counts like-for-like cells only (our run used the paper's "
             f"dataset, model and budget); `share_within_5` is the share of them where |ours - paper| <= {CLOSE:g} "
             "points, and `share_in_interval` the share, over tables that carry our 95% interval, where the paper's "
             "number lies inside that interval (– when no table carries one). Comparisons on another dataset, "
             "model or budget are listed apart and are not agreement.")]
    if notebooks is not None:
        unread = notebooks[notebooks["state"] != "read"]
        parts += _section("Paper notebooks not read", unread[["notebook", "state", "reason"]],
                          "_every paper notebook finished ok in this run_",
                          "Their tables (if any are left from earlier runs) are not part of this report.")
    if verdicts is not None:
        parts += _section("Verdict per paper", verdicts, "_no papers_",
                          "Computed from this run's tables against lib/reference/headline_claims.csv, on our numbers: "
                          "`holds` when every measured claim holds, `does not hold` when any fails (`detail` names "
                          "them and their tables). `cannot be tested here` means no table of its claims was measured "
                          "(dataset not on this machine, notebook not run or failed). A claim tested on a stand-in "
                          "dataset or model (`basis`) is a verdict at this profile's scale, never agreement with the "
                          "paper; the paper's like-for-like agreement stands beside it.")
    if overall is not None:
        parts += _section("Agreement overall (like-for-like cells)", overall, "_no like-for-like cells_")
    parts += _section("Agreement per table (like for like)", summary, "_no like-for-like comparison tables found_")
    if stand_ins is not None:
        parts += _section("Compared on another dataset/model: not agreement", stand_ins,
                          "_no stand-in comparisons_",
                          "The paper column names the paper's setting and ours; the gap between the two numbers "
                          "measures the change of setting as much as the reproduction, so it is not scored.")
    parts += _section("Headline claims", claims, "_no claims_",
                      "`comparison` says whether the table compares like for like or is a stand-in.")
    parts += _section("Not reproduced (paper value shown, no number of ours)", missing,
                      "_every paper cell has a number of ours_")
    if sanity is not None:
        parts += _section("Benchmark sanity checks that warn (notebook 09)", sanity,
                          "_no WARN (or notebook 09 did not finish in this run)_",
                          "Unbounded attacks should reach 0%, more iterations or restarts should never help the "
                          "defense, and white box <= gray box <= transfer; each WARN says what was measured and why.")
    if skips is not None:
        parts += _section("Skips recorded by the notebooks", skips, "_none_")
    return "\n".join(parts) + "\n"


def write_report(profile: str, out: Path | None = None, *, run_id: str | None = None,
                 claims: pd.DataFrame | None = None) -> Report:
    """Build the report of this run (`run_id`, default ADV_RUN_ID), save its tables under `out` (notebook 10's
    results folder) when given, write results/<profile>/REPORT.md, and return the pieces."""
    run_id = current_run_id() if run_id is None else run_id
    states = notebook_states(profile, run_id)
    tables = comparison_tables(profile, run_id)
    pieces = {"notebooks": states, "overall": overall_agreement(tables), "agreement": agreement_summary(tables),
              "stand_ins": stand_in_summary(tables),
              "claims": check_claims(tables, load_claims() if claims is None else claims),
              "missing": not_reproduced(tables), "skips": recorded_skips(profile, states),
              "sanity": benchmark_sanity(profile, run_id)}
    pieces["verdicts"] = paper_verdicts(pieces["claims"], pieces["overall"])
    captions = {"notebooks": "Paper notebooks and whether this report reads their tables",
                "verdicts": "Verdict per paper: its headline claims on our numbers, beside its agreement",
                "overall": "Agreement over like-for-like cells, per paper and overall",
                "agreement": "Ours vs paper, per like-for-like table",
                "stand_ins": "Stand-in comparisons (another dataset/model/budget): not agreement",
                "claims": "Headline claims on our numbers and on the paper's",
                "missing": "Paper cells without a number of ours", "skips": "Skips recorded by the notebooks",
                "sanity": "Benchmark sanity checks that warn"}
    names = {"agreement": "agreement", "missing": "not_reproduced", "stand_ins": "stand_in_comparisons",
             "sanity": "benchmark_sanity_warnings", "verdicts": "paper_verdicts"}
    if out is not None:
        for key, table in pieces.items():
            report.save_table(table, names.get(key, key), out, caption=captions[key])
    text = report_markdown(profile, pieces["agreement"], pieces["claims"], pieces["missing"],
                           overall=pieces["overall"], stand_ins=pieces["stand_ins"], notebooks=states,
                           skips=pieces["skips"], sanity=pieces["sanity"], verdicts=pieces["verdicts"], run_id=run_id)
    path = report.results_root() / profile / REPORT_FILE
    atomic_write_text(text, path)
    return Report(**pieces, markdown=text, path=path)
