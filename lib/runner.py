"""Execute the notebook series with papermill for one profile; write SUMMARY.md and manifest.json.

Usage: python -m lib.runner --profile quick [--only 00,03]. A failing notebook is reported with its
error and the others still run; the exit status is 1 if any notebook failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from lib.cache import atomic_write_text
from lib.data import REPO_ROOT
from lib.profiles import PROFILES, load_profile
from lib.report import read_skips, reset_skips, results_dir, results_root

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
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


def run_notebook(book: Path, profile: str) -> dict:
    """Execute one notebook; returns its status record (never raises for notebook errors)."""
    import papermill as pm

    out_dir = results_dir(profile, book.stem)
    reset_skips(out_dir)
    t0 = time.perf_counter()
    record = {"notebook": book.stem, "status": "ok", "error": ""}
    try:
        pm.execute_notebook(str(book), str(out_dir / book.name), parameters={"profile": profile},
                            cwd=str(book.parent), progress_bar=False, kernel_name="python3")
    except Exception as exc:  # papermill wraps cell errors; report and continue with the next notebook
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {_first_line(getattr(exc, 'evalue', None) or str(exc))}"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["skipped"] = read_skips(out_dir)
    return record


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def manifest(profile: dict) -> dict:
    """What produced these results: versions, commit, seed, device."""
    import torch

    versions = {}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {"profile": profile["name"], "seed": profile["seed"], "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain")), "packages": versions,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def summary_markdown(profile: str, records: list[dict], total_seconds: float) -> str:
    lines = [f"# Run summary: profile `{profile}`", "",
             f"{sum(r['status'] == 'ok' for r in records)} of {len(records)} notebooks ran to the end "
             f"in {total_seconds / 60:.1f} min.", "",
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
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        books = discover([o.strip() for o in args.only.split(",") if o.strip()])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if profile.get("threads") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(profile["threads"])  # inherited by the notebook kernels
    t0 = time.perf_counter()
    records = []
    for i, book in enumerate(books, 1):
        print(f"[{i}/{len(books)}] {book.stem} ...", flush=True)
        record = run_notebook(book, args.profile)
        records.append(record)
        extra = f" ({len(record['skipped'])} part(s) skipped)" if record["skipped"] else ""
        print(f"[{i}/{len(books)}] {book.stem} {record['status']} in {record['seconds']:.0f} s{extra}"
              + (f": {record['error']}" if record["error"] else ""), flush=True)
    out = results_root() / args.profile
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary_markdown(args.profile, records, time.perf_counter() - t0), out / "SUMMARY.md")
    atomic_write_text(json.dumps({**manifest(profile), "notebooks": records}, indent=2), out / "manifest.json")
    print(f"summary: {out / 'SUMMARY.md'}")
    return 1 if any(r["status"] != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
