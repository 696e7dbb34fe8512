"""Writing results: tables (CSV + Markdown), figures (PNG) and skip records under results/<profile>/<notebook>/.

Tables that reproduce a paper's table carry the published number beside ours with the
difference (lib.reference.compare); "best" marks are computed here from the data.
"""
from __future__ import annotations

import getpass
import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from lib import distributed
from lib.cache import atomic_write_bytes, atomic_write_text
from lib.data import REPO_ROOT

SKIPS_FILE = "skipped.json"


def results_root() -> Path:
    """$ADV_RESULTS_DIR, else <repo>/results; on a rank other than 0 of a distributed job a scratch folder of that rank
    and job instead, so that only rank 0 writes results (lib.runner deletes the scratch at the end of a run)."""
    if distributed.env_rank() != 0:
        job = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", ""))
        return Path(tempfile.gettempdir()) / f"adv-results-{getpass.getuser()}-{job}-rank{distributed.env_rank()}"
    return Path(os.environ.get("ADV_RESULTS_DIR", REPO_ROOT / "results")).expanduser()


def results_dir(profile: str, notebook: str) -> Path:
    """results/<profile>/<notebook>/, created with tables/ and figures/ inside."""
    return make_results_dir(results_root() / profile / notebook)


def make_results_dir(out: Path | str) -> Path:
    """The folder `out`, created with tables/ and figures/ inside."""
    out = Path(out)
    for sub in ("tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def to_markdown(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A GitHub-style Markdown table; missing values print as an en dash."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="–")


# name suffix of a table that shows a second reading of a setting the paper leaves open (notebook 04's DeepFool / CW):
# shown beside the chosen one, never counted as a comparison with the paper (lib.reproduction)
OTHER_READING = "_other_reading"


def save_table(df: pd.DataFrame, name: str, out_dir: Path, *, caption: str | None = None,
               floatfmt: str = ".2f") -> tuple[Path, Path]:
    """Write tables/<name>.csv and tables/<name>.md (with an optional caption line)."""
    tables = Path(out_dir) / "tables"
    buffer = io.StringIO()
    df.to_csv(buffer, index=False)
    csv_path, md_path = tables / f"{name}.csv", tables / f"{name}.md"
    atomic_write_text(buffer.getvalue(), csv_path)
    md = (f"**{caption}**\n\n" if caption else "") + to_markdown(df, floatfmt) + "\n"
    atomic_write_text(md, md_path)
    return csv_path, md_path


def save_tidy(df: pd.DataFrame, name: str, out_dir: Path) -> Path:
    """Write a long tidy table (e.g. per-example outcomes) as tables/<name>.csv.gz, atomically, without a Markdown copy."""
    path = Path(out_dir) / "tables" / f"{name}.csv.gz"
    atomic_write_bytes(gzip.compress(df.to_csv(index=False).encode(), mtime=0), path)
    return path


def save_figure(fig, name: str, out_dir: Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as figures/<name>.png (atomically)."""
    path = Path(out_dir) / "figures" / f"{name}.png"
    atomic_write_bytes(_png_bytes(fig, dpi), path)
    return path


def _png_bytes(fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def mark_best(df: pd.DataFrame, column: str, *, higher_is_better: bool = True,
              by: Sequence[str] | None = None) -> pd.Series:
    """Boolean Series: True where `column` is the best value (ties included), within groups `by`."""
    values = df[column]
    best = values.groupby([df[c] for c in by]).transform("max" if higher_is_better else "min") if by else (
        values.max() if higher_is_better else values.min())
    return values.eq(best) & values.notna()


def record_skip(out_dir: Path, what: str, reason: str) -> None:
    """Note that part of a notebook was not run (e.g. a dataset is missing); run_all.sh reports it."""
    path = Path(out_dir) / SKIPS_FILE
    skips = json.loads(path.read_text()) if path.is_file() else []
    skips.append({"what": what, "reason": reason})
    atomic_write_text(json.dumps(skips, indent=2), path)


def read_skips(out_dir: Path) -> list[dict[str, str]]:
    path = Path(out_dir) / SKIPS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def reset_skips(out_dir: Path) -> None:
    """Forget skips of an earlier run of the same notebook."""
    (Path(out_dir) / SKIPS_FILE).unlink(missing_ok=True)


def pivot_accuracy(df: pd.DataFrame, index: Iterable[str] = ("defense",), columns: Iterable[str] = ("attack",),
                   value: str = "robust_acc") -> pd.DataFrame:
    """Reshape a tidy evaluation table into the paper layout (rows = defenses, columns = attacks)."""
    wide = df.pivot_table(index=list(index), columns=list(columns), values=value, sort=False)
    wide.columns = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in wide.columns]
    return wide.reset_index()
