"""Peak memory of a notebook, measured inside its kernel, and the paper-scale estimate made from a dry run.

What is measured: on a GPU, CUDA's peak allocated bytes (torch.cuda.max_memory_allocated: tensors, not the
caching allocator's reserve); always, the kernel process's peak resident set (ru_maxrss, Linux's VmHWM). The
notebook kernel is a separate process from the runner, so `watch` (called by lib.notebook.setup) writes
<notebook>/memory.json after every cell the kernel runs; the runner reads it when the notebook ends (ok, failed
or stopped: the file holds the peak up to the last finished cell).

The paper-scale estimate (`paper_scale_estimate`) is deliberately simple. Evaluation and training stream their
data in batches, so what a cell allocates and frees while it runs (its working memory: activations, gradients,
purifier buffers) grows with the images per batch, while what the kernel holds when the cell starts (libraries,
models, kept sets) does not. The recorder therefore also keeps, per cell, the memory at its start and its peak
(on the CPU the peak resident set is reset before each cell through /proc/self/clear_refs; on a GPU, CUDA's peak
statistics). A dry run keeps the profile's batch sizes but caps every subset, so its batches hold at most
min(batch size, cap) images. The estimate is

    paper peak ~= max over cells of  start + (cell peak - start) x growth,   growth = max over the profile's batch
                                                                              sizes b of b / min(b, cap)

i.e. each cell's working memory scaled by the largest factor by which any batch grows (an upper bound under the
linear model). Where the peak cannot be reset per cell (no /proc), a cell's peak is the kernel's so far and the
estimate falls back to baseline + (peak - baseline) x growth. It does not cover memory proportional to whole sets
that a notebook keeps (a dataset loaded as one tensor, adversarial sets kept for later tables), allocator
fragmentation, or cuDNN workspaces that depend on the batch non-linearly.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from lib.cache import atomic_write_text

MEMORY_FILE = "memory.json"
GPU_LIMIT_BYTES = 80 * 10 ** 9   # the largest single GPU a paper-scale run is planned for (80 GB)
BATCH_KEYS = ("batch_size", "eval_batch_size")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _proc_status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes (VmRSS, VmHWM); getrusage's peak where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def current_rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


def current_peak_rss_bytes() -> int:
    """This process's peak resident set since the last `reset_rss_peak` (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def reset_rss_peak() -> bool:
    """Reset this process's peak resident set to its current one (Linux: 5 to /proc/self/clear_refs); False where
    that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def snapshot(device: torch.device) -> dict[str, Any]:
    """{"device": "cuda"|"cpu", "rss_peak_bytes", and on CUDA "cuda_peak_bytes" (max allocated since the last
    reset) and "cuda_now_bytes"}."""
    out: dict[str, Any] = {"device": device.type, "rss_peak_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_now_bytes"] = int(torch.cuda.memory_allocated(device))
    return out


class Recorder:
    """Writes the kernel's peak memory to `out_dir`/memory.json: the baseline when created, then after every cell
    the peak so far and the cell's (start, peak) pair (`start_cell` before it, `record` after it)."""

    def __init__(self, out_dir: Path, device: torch.device):
        self.path = Path(out_dir) / MEMORY_FILE
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        now = snapshot(device)
        self.baseline = now["cuda_now_bytes"] if device.type == "cuda" else current_rss_bytes()
        self.peak = self.baseline
        self.cells: list[tuple[int, int]] = []
        self.cell_start: int | None = None
        self.record()

    def start_cell(self, *_: Any) -> None:
        """Note the memory held now and reset the peak, so that `record` sees this cell's own peak (IPython calls
        it before every cell with the cell's info, ignored)."""
        if self.device.type == "cuda":
            self.cell_start = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.cell_start = current_rss_bytes() if reset_rss_peak() else None

    def record(self, *_: Any) -> None:
        """Write the peak so far and this cell's (start, peak) (IPython calls it after every cell with the cell's
        result, ignored)."""
        now = snapshot(self.device)
        cell_peak = now["cuda_peak_bytes"] if self.device.type == "cuda" else current_peak_rss_bytes()
        self.peak = max(self.peak, cell_peak)
        if self.cell_start is not None:
            self.cells.append((self.cell_start, max(cell_peak, self.cell_start)))
            self.cell_start = None
        record = {**now, "baseline_bytes": self.baseline, "peak_bytes": self.peak, "cells": self.cells}
        if self.device.type != "cuda":
            record["rss_peak_bytes"] = self.peak   # getrusage's peak forgets what a reset cleared
        atomic_write_text(json.dumps(record), self.path)


def watch(out_dir: Path, device: torch.device) -> Recorder:
    """Record the notebook's peak memory in out_dir/memory.json after every cell of the running IPython kernel
    (replacing an earlier recorder of the same folder); outside IPython, once now (call `record` to update)."""
    recorder = Recorder(out_dir, device)
    try:
        from IPython import get_ipython
    except ImportError:   # pragma: no cover - IPython is a dependency of the notebooks
        return recorder
    shell = get_ipython()
    if shell is not None:
        events = shell.events
        for event, method in (("pre_run_cell", "start_cell"), ("post_run_cell", "record")):
            for callback in list(events.callbacks[event]):
                owner = getattr(callback, "__self__", None)
                if isinstance(owner, Recorder) and owner.path == recorder.path:
                    events.unregister(event, callback)
            events.register(event, getattr(recorder, method))
    return recorder


def read_memory(out_dir: Path) -> dict[str, Any] | None:
    """The notebook's memory.json (device, peak_bytes, baseline_bytes, rss_peak_bytes, ...), or None."""
    path = Path(out_dir) / MEMORY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def notebook_memory(out_dir: Path, profile: str, notebook: str) -> dict[str, Any] | None:
    """`read_memory`, and for a dry run also `growth` (batch_growth of its profile) and `paper_scale_bytes`
    (paper_scale_estimate); None when the notebook recorded nothing (it stopped before setup)."""
    from lib.profiles import DRY_RUN_SUFFIX, load_profile

    recorded = read_memory(out_dir)
    if recorded is None or not profile.endswith(DRY_RUN_SUFFIX):
        return recorded
    growth = batch_growth(load_profile(profile), notebook)
    return {**recorded, "growth": growth, "paper_scale_bytes": paper_scale_estimate(recorded, growth)}


def memory_cell(memory: Mapping[str, Any] | None) -> str:
    """A notebook's peak for SUMMARY.md: "1.23 GB CUDA (RSS 4.56 GB)" on a GPU, "1.23 GB RSS" on the CPU."""
    if not memory:
        return "–"
    if memory["device"] == "cuda":
        return f"{gigabytes(memory['peak_bytes'])} CUDA (RSS {gigabytes(memory['rss_peak_bytes'])})"
    return f"{gigabytes(memory['peak_bytes'])} RSS"


def paper_scale_section(records: list[Mapping[str, Any]]) -> list[str]:
    """SUMMARY.md's lines on the paper-scale peak of each notebook of a dry run (none for other runs)."""
    rows = [(r["notebook"], r["memory"]) for r in records if (r.get("memory") or {}).get("paper_scale_bytes")]
    if not rows:
        return []
    kind = "CUDA allocated" if rows[0][1]["device"] == "cuda" else "host RSS (this dry run ran on the CPU)"
    lines = ["", "## Paper-scale memory estimate", "",
             f"Peak {kind} at the profile's own batch sizes, estimated from this dry run as the largest over its "
             "cells of start + (cell peak - start) x growth: what the kernel held when the cell started, plus the "
             "memory the cell worked in scaled by growth, the largest factor by which one of the notebook's batch "
             "sizes exceeds the batch the dry run filled (lib.memory). Evaluation and training stream in batches, so "
             "this is an upper bound under a linear model; it does not count sets a notebook keeps whole (datasets "
             "loaded as one tensor, adversarial sets kept for later tables) or allocator fragmentation.", "",
             "| notebook | baseline | dry-run peak | largest cell working memory | growth | paper-scale estimate | "
             f"fits in {GPU_LIMIT_BYTES // 10**9} GB |",
             "|---|---|---|---|---|---|---|"]
    for notebook, m in rows:
        fits = "yes" if m["paper_scale_bytes"] <= GPU_LIMIT_BYTES else "**NO**"
        work = max((peak - start for start, peak in m.get("cells") or []), default=None)
        lines.append(f"| {notebook} | {gigabytes(m['baseline_bytes'])} | {gigabytes(m['peak_bytes'])} | "
                     f"{gigabytes(work)} | {m['growth']:.1f}x | {gigabytes(m['paper_scale_bytes'])} | {fits} |")
    return lines


def _batch_sizes(node: Any) -> Iterator[tuple[str, int]]:
    """(key, value) of every batch-size setting under `node` (BATCH_KEYS, and each value of purify_batch_sizes)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "purify_batch_sizes" and isinstance(value, Mapping):
                yield from (("purify_batch_sizes", v) for v in value.values() if isinstance(v, int))
            elif key in BATCH_KEYS and isinstance(value, int) and not isinstance(value, bool):
                yield key, value
            else:
                yield from _batch_sizes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _batch_sizes(value)


def batch_growth(profile: Mapping[str, Any], notebook: str) -> float:
    """The largest factor b / min(b, cap) by which one of the batch sizes `notebook` may use (the profile's
    evaluation and per-defense batches, its datasets' training batches, its own section's) exceeds the batch a dry
    run of the profile fills; cap: the dry run's training subset for training batches, its other subsets else."""
    from lib.profiles import DRY_RUN_SIZE, DRY_RUN_TRAIN, notebook_config

    scope = {k: profile.get(k) for k in ("eval_batch_size", "purify_batch_sizes") if k in profile}
    section = notebook_config(profile, notebook)
    datasets = {d: profile["datasets"][d] for d in section.get("datasets", profile["datasets"])
                if d in profile["datasets"]}
    factors = [1.0]
    for key, b in _batch_sizes({"top": scope, "datasets": datasets, "section": section}):
        cap = DRY_RUN_TRAIN if key == "batch_size" else DRY_RUN_SIZE
        factors.append(b / min(b, cap))
    return max(factors)


def paper_scale_estimate(memory: Mapping[str, Any], growth: float) -> int:
    """max over cells of start + (peak - start) x growth, in bytes; baseline + (peak - baseline) x growth without
    per-cell records (the model in this module's docstring)."""
    cells = memory.get("cells") or [(int(memory.get("baseline_bytes", 0)), int(memory["peak_bytes"]))]
    return max(start + int(max(0, peak - start) * growth) for start, peak in cells)


def gigabytes(n: float | None) -> str:
    """Bytes as '1.23 GB' (decimal); '–' for None."""
    return "–" if n is None else f"{n / 1e9:.2f} GB"
