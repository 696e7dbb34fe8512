"""Execute the notebook series with papermill for one profile; write SUMMARY.md and manifest.json.

Usage: python -m lib.runner --profile quick [--only 00,03] [--run-id ID]. A failing notebook is reported with
its error and the others still run; the exit status is 1 if any notebook failed.

Every invocation is one run with an id (UTC time + process id, or --run-id to continue an earlier run), exported
to the notebook kernels as ADV_RUN_ID. Before a notebook runs, the tables and figures of its previous run are
moved to <notebook>/previous/; after it, <notebook>/status.json records the run id, ok/failed/timeout and the
time. The reproduction report (lib.reproduction) reads only tables whose status.json names the current run.
A notebook that runs longer than the profile's `notebook_timeout_s` is stopped and reported as "timeout". Ctrl-C
or SIGTERM stops the run, and SUMMARY.md and manifest.json still say which notebook was interrupted and which
did not run (exit status 130).

Under torch.distributed (`--nproc N` on one machine, or torchrun across machines, see README): `--nproc N` re-launches
the runner as `torchrun --standalone --nproc_per_node N -m lib.runner ...`; each runner process is one rank and
executes every notebook in a kernel of its own, which inherits the rank and joins a process group of its own for that
notebook (lib.distributed.init_from_env, in a namespace of torchrun's store named after the run and the notebook), so
lib's evaluations and trainings share their work over the ranks. A rank other than 0 writes everything (executed
notebooks, tables, figures, status, SUMMARY.md, REPORT.md) to a scratch folder of its own that is deleted at the end
(lib.report.results_root): only rank 0 writes results. After each notebook the ranks' records meet on rank 0: the
notebook failed if it failed on any rank, and the error names the rank that failed first (a killed kernel shows as
DeadKernelError); a rank whose runner dies ends the job through torchrun, which names it. Caches make a re-run resume.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Iterator

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import default

from lib import distributed
from lib.cache import atomic_write_text
from lib.data import REPO_ROOT
from lib.memory import MEMORY_FILE, memory_cell, notebook_memory, paper_scale_section
from lib.profiles import PROFILES, dry_run_banner, dry_run_name, load_profile
from lib.report import read_skips, reset_skips, results_dir, results_root

NOTEBOOKS_DIR = Path(os.environ.get("ADV_NOTEBOOKS_DIR", REPO_ROOT / "notebooks"))   # the series to run
RUN_ID_ENV = "ADV_RUN_ID"
STATUS_FILE = "status.json"
PREVIOUS_DIR = "previous"
RUN_OUTPUTS = ("tables", "figures", STATUS_FILE, MEMORY_FILE)
INTERRUPTED_EXIT = 130  # the shell's status for a run stopped by a signal (128 + SIGINT)
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


class LocalKernelManager(AsyncKernelManager):
    """Starts notebook kernels that talk to the runner over Unix domain sockets (ZeroMQ's ipc transport) in the
    user's Jupyter runtime directory instead of TCP ports on localhost.

    Nothing of the kernel is then reachable through the network stack, so ipykernel has no reason to print its
    "Kernel is running over TCP without encryption" warning (messages are still signed with the connection
    file's private key). The socket path is absolute and unique per kernel, because the kernel runs in the
    notebooks' folder and parallel runners start kernels at the same time.
    """

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        return str(runtime / f"kernel-{uuid.uuid4().hex[:12]}-ipc")


def run_notebook(book: Path, profile: str, run_id: str | None = None, timeout_s: float | None = None) -> dict:
    """Execute one notebook as part of run `run_id` (a new run when None); returns its status record (never
    raises for notebook errors) and writes it to the notebook's status.json.

    `timeout_s` bounds the whole notebook (None: no bound): each cell may run only until the notebook's time is
    up, then the kernel is stopped and the record's status is "timeout". In a distributed job the kernel joins a
    process group named after the run and the notebook, and the record says which rank ran it and when it ended.
    """
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    run_id = run_id or new_run_id()
    out_dir = results_root() / profile / book.stem
    set_aside_previous(out_dir)
    out_dir = results_dir(profile, book.stem)
    reset_skips(out_dir)
    t0 = time.perf_counter()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def cell_timeout(cell) -> int | None:  # seconds this cell may take: what is left of the notebook's time
        return None if deadline is None else max(1, math.ceil(deadline - time.monotonic()))

    record = {"notebook": book.stem, "status": "ok", "error": ""}
    env = {RUN_ID_ENV: run_id, **({distributed.PREFIX_ENV: f"{run_id}/{book.stem}"} if distributed.active() else {})}
    try:
        with _environment(env):   # inherited by the kernel papermill starts
            pm.execute_notebook(str(book), str(out_dir / book.name), parameters={"profile": profile},
                                cwd=str(book.parent), progress_bar=False, kernel_name="python3",
                                kernel_manager_class=LocalKernelManager, timeout_func=cell_timeout)
    except CellTimeoutError:
        record["status"] = "timeout"
        record["error"] = f"stopped after the profile's notebook_timeout_s = {timeout_s:g} s"
    except Exception as exc:  # papermill wraps cell errors; report and continue with the next notebook
        record["status"] = "failed"
        name = getattr(exc, "ename", None) or type(exc).__name__   # a cell's error by its own name
        record["error"] = f"{name}: {_first_line(getattr(exc, 'evalue', None) or str(exc))}"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["rank"], record["ended"] = distributed.rank(), time.time()
    record["skipped"] = read_skips(out_dir)
    record["memory"] = notebook_memory(out_dir, profile, book.stem)   # the kernel's peak; None if setup never ran
    write_status(out_dir, run_id, record)
    return record


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block, as it was after it."""
    outer = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in outer.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def merged_record(records: list[dict]) -> dict:
    """One notebook's record over the ranks of a job (in rank order): rank 0's, but failed when it failed on any rank,
    with an error that names the rank that failed first, then the other ranks' errors. A rank that failed because
    another one did (a lib.distributed.RankFailure) is named first only when no other rank failed otherwise."""
    failed = sorted((r for r in records if r["status"] != "ok"),
                    key=lambda r: (r["error"].startswith(distributed.RankFailure.__name__), r["ended"]))
    if not failed:
        return records[0]
    first = failed[0]
    then = "".join(f"; then rank {r['rank']}: {r['error']}" for r in failed[1:])
    return {**records[0], "status": first["status"],
            "error": f"rank {first['rank']} of {len(records)} failed first: {first['error']}{then}"}


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
            "platform": platform.platform(), "device": device, "processes": distributed.world_size(),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain")), "packages": versions,
            "finished_utc": datetime.now(UTC).isoformat(timespec="seconds")}


def summary_markdown(profile: str, records: list[dict], total_seconds: float, run_id: str = "") -> str:
    """SUMMARY.md: each notebook's status, time, peak memory and skipped parts (a dry run: then each notebook's
    paper-scale memory estimate, lib.memory), then the failures' errors (an interrupted run says which notebook
    was interrupted and which did not run)."""
    banner = dry_run_banner(profile)
    lines = [f"# Run summary: profile `{profile}`" + (f", run `{run_id}`" if run_id else ""), "",
             *([banner, ""] if banner else []),
             (f"{sum(r['status'] == 'ok' for r in records)} of {len(records)} notebooks ran to the end "
              f"in {total_seconds / 60:.1f} min."), ""]
    stopped = [r["notebook"] for r in records if r["status"] == "interrupted"]
    if stopped:
        not_run = [r["notebook"] for r in records if r["status"] == "not run"]
        lines += [f"**The run was interrupted** during {stopped[0]}; "
                  f"{'not run: ' + ', '.join(not_run) if not_run else 'it was the last notebook'}.", ""]
    lines += ["| notebook | status | time (s) | peak memory | skipped parts |", "|---|---|---|---|---|"]
    for r in records:
        skipped = "; ".join(f"{s['what']}: {' '.join(s['reason'].split())}" for s in r["skipped"]) or "none"
        lines.append(f"| {r['notebook']} | {r['status']} | {r['seconds']:.1f} | {memory_cell(r.get('memory'))} "
                     f"| {skipped.replace('|', '/')} |")
    lines += paper_scale_section(records)
    failures = [r for r in records if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failures", ""] + [f"- **{r['notebook']}**: {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def parse_only(text: str | None) -> list[str] | None:
    """The notebook prefixes of `--only` ("00,03" -> ["00", "03"]); None when the option was not given.
    ValueError for an empty prefix (e.g. "--only ," or "--only 00,"), which would otherwise select every notebook."""
    if text is None:
        return None
    prefixes = [p.strip() for p in text.split(",")]
    if not all(prefixes):
        raise ValueError(f"--only {text!r} has an empty notebook prefix; give comma-separated prefixes such as 00,03")
    return prefixes


def notebook_timeout(profile: dict) -> float | None:
    """The profile's `notebook_timeout_s` (seconds one notebook may run; None: no limit)."""
    value = profile.get("notebook_timeout_s")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"profile {profile['name']!r}: notebook_timeout_s must be a number of seconds > 0 or null, "
                         f"got {value!r}")
    return None if value is None else float(value)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that the summary of an interrupted run is still written."""


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    parser.add_argument("--only", default=None, help="comma-separated notebook name prefixes, e.g. 00,03")
    parser.add_argument("--run-id", default="", help="continue the run with this id (see a notebook's status.json), "
                        "e.g. to rerun only the report over tables of that run; default: a new run")
    parser.add_argument("--dry-run", action="store_true", help="the profile capped to a minimum (lib.profiles."
                        "dry_run): every code path in minutes; results go to results/<profile>-dry-run/, no results")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine, e.g. one per GPU: the series "
                        "runs under torchrun --standalone --nproc_per_node NPROC (README: several machines)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.profile = dry_run_name(args.profile)
    try:
        profile = load_profile(args.profile)
        timeout_s = notebook_timeout(profile)
        books = discover(parse_only(args.only))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if profile.get("threads") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(profile["threads"])  # inherited by the notebook kernels
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return relaunch(args.nproc, args.profile, args.only, args.run_id or new_run_id())
    in_job = distributed.init_from_env("gloo", timeout_s=(timeout_s or 365 * 86400.0) + 600)   # peers' notebooks
    run_id = distributed.from_main(lambda: args.run_id or new_run_id())
    say = print if distributed.is_main() else _silent
    say(f"run {run_id}, profile {args.profile}" + (f", {distributed.world_size()} processes" if in_job else ""),
        flush=True)
    t0 = time.perf_counter()
    records: list[dict] = []
    t_book = t0
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        for i, book in enumerate(books, 1):
            say(f"[{i}/{len(books)}] {book.stem} ...", flush=True)
            t_book = time.perf_counter()
            record = run_notebook(book, args.profile, run_id, timeout_s)
            if in_job:   # rank 0 learns how the notebook went on every rank
                record = merged_record(distributed.all_gather(record))
                write_status(results_root() / args.profile / book.stem, run_id, record)
            records.append(record)
            extra = f" ({len(record['skipped'])} part(s) skipped)" if record["skipped"] else ""
            say(f"[{i}/{len(books)}] {book.stem} {record['status']} in {record['seconds']:.0f} s{extra}"
                + (f": {record['error']}" if record["error"] else ""), flush=True)
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, _Terminated) else "Ctrl-C"
        if len(records) < len(books):
            print(f"interrupted by {how} during {books[len(records)].stem}", file=sys.stderr, flush=True)
            records += _interrupted_records(books[len(records):], how, time.perf_counter() - t_book, args.profile,
                                            run_id)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    out = results_root() / args.profile
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary_markdown(args.profile, records, time.perf_counter() - t0, run_id), out / "SUMMARY.md")
    atomic_write_text(json.dumps({**manifest(profile), "run_id": run_id, "notebooks": records}, indent=2),
                      out / "manifest.json")
    say(f"summary: {out / 'SUMMARY.md'}")
    if in_job:   # the other ranks drop their scratch copies; rank 0 alone reports the run by its exit status
        if not distributed.is_main():
            shutil.rmtree(results_root(), ignore_errors=True)
        with contextlib.suppress(distributed.RankFailure):   # torchrun stops the others when rank 0 exits non-zero
            distributed.barrier()
        if not distributed.is_main():
            return 0
    if any(r["status"] == "interrupted" for r in records):
        return INTERRUPTED_EXIT
    return 1 if any(r["status"] != "ok" for r in records) else 0


def relaunch(nproc: int, profile: str, only: str | None, run_id: str) -> int:
    """Run the series as `torchrun --standalone --nproc_per_node nproc -m lib.runner ...`, one runner per rank, and
    return torchrun's exit status: rank 0's, unless a runner process died (torchrun then names its rank). SIGTERM is
    passed on."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lib.runner", "--profile", profile, "--run-id", run_id, *(["--only", only] if only else [])]
    with subprocess.Popen(cmd, cwd=REPO_ROOT) as job:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: job.terminate())
        try:
            while True:
                try:
                    return job.wait()
                except KeyboardInterrupt:   # the terminal sent it to the job's processes too: they stop and report
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)


def _silent(*args: object, **kwargs: object) -> None:
    """print on the ranks that do not report."""


def _interrupted_records(books: list[Path], how: str, seconds: float, profile: str, run_id: str) -> list[dict]:
    """Status records for an interrupted run: the first of `books` was interrupted (its status.json says so),
    the rest did not run."""
    records = [{"notebook": book.stem, "status": "not run", "seconds": 0.0, "skipped": [],
                "error": f"not run: the run was stopped by {how}"} for book in books]
    records[0].update(status="interrupted", seconds=round(seconds, 1), error=f"interrupted by {how}")
    out_dir = results_root() / profile / books[0].stem
    if out_dir.is_dir():
        records[0]["memory"] = notebook_memory(out_dir, profile, books[0].stem)   # the peak up to its last cell
        write_status(out_dir, run_id, records[0])
    return records


if __name__ == "__main__":
    sys.exit(main())
