"""Execute the notebook series with papermill for one profile; write SUMMARY.md and manifest.json.

Usage: python -m lib.runner --profile quick [--only 00,03] [--run-id ID]. A failing notebook is reported with
its error and the others still run; the exit status is 1 if any notebook failed.

Every invocation is one run with an id (UTC time + process id, or --run-id to continue an earlier run), exported
to the notebook kernels as ADV_RUN_ID. Before a notebook runs, the tables and figures of its previous run are
moved to <notebook>/previous/; after it, <notebook>/status.json records the run id, ok/failed and the time.
The reproduction report (lib.reproduction) reads only tables whose status.json names the current run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from lib.cache import atomic_write_text
from lib.data import REPO_ROOT
from lib.profiles import PROFILES, load_profile
from lib.report import read_skips, reset_skips, results_dir, results_root

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RUN_ID_ENV = "ADV_RUN_ID"
STATUS_FILE = "status.json"
PREVIOUS_DIR = "previous"
RUN_OUTPUTS = ("tables", "figures", STATUS_FILE)
MANIFEST_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "scikit-learn", "opencv-python-headless",
                     "adversarial-robustness-toolbox", "pyautoattack", "grad-cam", "papermill", "jupyterlab",
                     "ipywidgets", "matplotlib", "seaborn")


def discover(only: list[str] | None = None) -> list[Path]:
    """Notebooks in series order; `only` keeps those whose name starts with one of the given prefixes."""
    books = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return books
    chosen = [b for b in books if any(b.stem.startswith(o) for o in only)]
    missing = [o for o in only if not any(b.stem.startswith(o) for b in books)]
    if missing:
        raise ValueError(f"--only {','.join(missing)} matches no notebook; have: {', '.join(b.stem for b in books)}")
    return chosen


def new_run_id() -> str:
    """A fresh run id: UTC time to the second plus this process's id (unique across parallel runners)."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"


def set_aside_previous(out_dir: Path) -> None:
    """Move the tables, figures and status of the notebook's previous run into out_dir/previous/ (replacing an
    older one), so that nothing left from it can pass for a result of this run."""
    previous = out_dir / PREVIOUS_DIR
    if any((out_dir / name).exists() for name in RUN_OUTPUTS):
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for name in RUN_OUTPUTS:
            if (out_dir / name).exists():
                os.replace(out_dir / name, previous / name)


def write_status(out_dir: Path, run_id: str, record: dict) -> None:
    """out_dir/status.json: which run finished this notebook, ok or failed (with the error), how long it took."""
    status = {"run_id": run_id, "status": record["status"], "seconds": record["seconds"], "error": record["error"],
              "finished_utc": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_text(json.dumps(status, indent=2), out_dir / STATUS_FILE)


def read_status(out_dir: Path) -> dict | None:
    """The notebook's status.json (run_id, status, seconds, error, finished_utc), or None when no run of the
    runner has finished it since its outputs were last set aside."""
    path = Path(out_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_notebook(book: Path, profile: str, run_id: str | None = None) -> dict:
    """Execute one notebook as part of run `run_id` (a new run when None); returns its status record (never
    raises for notebook errors) and writes it to the notebook's status.json."""
    import papermill as pm

    run_id = run_id or new_run_id()
    out_dir = results_root() / profile / book.stem
    set_aside_previous(out_dir)
    out_dir = results_dir(profile, book.stem)
    reset_skips(out_dir)
    t0 = time.perf_counter()
    record = {"notebook": book.stem, "status": "ok", "error": ""}
    outer = os.environ.get(RUN_ID_ENV)
    os.environ[RUN_ID_ENV] = run_id  # inherited by the kernel papermill starts
    try:
        pm.execute_notebook(str(book), str(out_dir / book.name), parameters={"profile": profile},
                            cwd=str(book.parent), progress_bar=False, kernel_name="python3")
    except Exception as exc:  # papermill wraps cell errors; report and continue with the next notebook
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {_first_line(getattr(exc, 'evalue', None) or str(exc))}"
    finally:
        if outer is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = outer
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["skipped"] = read_skips(out_dir)
    write_status(out_dir, run_id, record)
    return record


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False).stdout.strip()


def manifest(profile: dict) -> dict:
    """What produced these results: versions, commit, seed, device."""
    import torch

    versions = {}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {"profile": profile["name"], "seed": profile["seed"], "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain")), "packages": versions,
            "finished_utc": datetime.now(UTC).isoformat(timespec="seconds")}


def summary_markdown(profile: str, records: list[dict], total_seconds: float, run_id: str = "") -> str:
    """SUMMARY.md: each notebook's status, time and skipped parts, then the failures' errors."""
    lines = [f"# Run summary: profile `{profile}`" + (f", run `{run_id}`" if run_id else ""), "",
             (f"{sum(r['status'] == 'ok' for r in records)} of {len(records)} notebooks ran to the end "
              f"in {total_seconds / 60:.1f} min."), "",
             "| notebook | status | time (s) | skipped parts |", "|---|---|---|---|"]
    for r in records:
        skipped = "; ".join(f"{s['what']}: {' '.join(s['reason'].split())}" for s in r["skipped"]) or "none"
        lines.append(f"| {r['notebook']} | {r['status']} | {r['seconds']:.1f} | {skipped.replace('|', '/')} |")
    failures = [r for r in records if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failures", ""] + [f"- **{r['notebook']}**: {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    parser.add_argument("--only", default="", help="comma-separated notebook name prefixes, e.g. 00,03")
    parser.add_argument("--run-id", default="", help="continue the run with this id (see a notebook's status.json), "
                        "e.g. to rerun only the report over tables of that run; default: a new run")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        books = discover([o.strip() for o in args.only.split(",") if o.strip()])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if profile.get("threads") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(profile["threads"])  # inherited by the notebook kernels
    run_id = args.run_id or new_run_id()
    print(f"run {run_id}, profile {args.profile}", flush=True)
    t0 = time.perf_counter()
    records = []
    for i, book in enumerate(books, 1):
        print(f"[{i}/{len(books)}] {book.stem} ...", flush=True)
        record = run_notebook(book, args.profile, run_id)
        records.append(record)
        extra = f" ({len(record['skipped'])} part(s) skipped)" if record["skipped"] else ""
        print(f"[{i}/{len(books)}] {book.stem} {record['status']} in {record['seconds']:.0f} s{extra}"
              + (f": {record['error']}" if record["error"] else ""), flush=True)
    out = results_root() / args.profile
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary_markdown(args.profile, records, time.perf_counter() - t0, run_id), out / "SUMMARY.md")
    atomic_write_text(json.dumps({**manifest(profile), "run_id": run_id, "notebooks": records}, indent=2),
                      out / "manifest.json")
    print(f"summary: {out / 'SUMMARY.md'}")
    return 1 if any(r["status"] != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
