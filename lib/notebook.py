"""What every notebook does first and around each dataset: one setup call, one loop that records skips.

    run = setup(profile, "01_sfm_defense")          # profile, its notebook section, results folder, device, seed
    results = run.per_dataset(sfm.tables.prepare)   # {dataset: prepare(run, dataset)}, missing datasets skipped
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from lib import distributed, memory, report
from lib.data import DatasetUnavailable
from lib.defenses.base import NotBuiltForDataset
from lib.profiles import dry_run_banner, is_dry_run, load_profile, notebook_config, notebook_profile
from lib.runtime import get_device, seed_everything

T = TypeVar("T")


@dataclass
class Run:
    """One notebook's run: the profile, the notebook's section of it, where results go, the device."""

    profile: dict[str, Any]
    notebook: str
    config: dict[str, Any]
    out: Path
    device: torch.device

    @property
    def profile_name(self) -> str:
        return self.profile["name"]

    def skip(self, what: str, reason: str) -> None:
        """Record (in the run summary) and print that part of the notebook did not run, and why."""
        report.record_skip(self.out, what, reason)
        print(f"skipped {what}: {' '.join(str(reason).split())}")

    def per_dataset(self, fn: Callable[["Run", str], T], datasets: Sequence[str] | None = None) -> dict[str, T]:
        """{dataset: fn(run, dataset)} over the notebook's datasets (or `datasets`), in order.

        A dataset the profile has no settings for, that is not on this machine (DatasetUnavailable), or that a
        defense of the notebook has no settings for (NotBuiltForDataset), is recorded as skipped and the loop goes
        on; RuntimeError when none is left (the skip records say why).
        """
        results: dict[str, T] = {}
        names = list(datasets if datasets is not None else self.config["datasets"])
        for dataset in names:
            if dataset not in self.profile["datasets"]:
                self.skip(f"dataset {dataset}", f"profile {self.profile_name!r} has no settings for {dataset}")
                continue
            try:
                results[dataset] = fn(self, dataset)
            except (DatasetUnavailable, NotBuiltForDataset) as err:
                self.skip(f"dataset {dataset}", str(err))
        if not results:
            raise RuntimeError(f"none of the datasets {names} is available in profile {self.profile_name!r}; "
                               f"see {self.out / report.SKIPS_FILE}")
        return results


def setup(profile: str, notebook: str, overrides: Mapping[str, Any] | None = None, out: Path | None = None) -> Run:
    """Load the profile (with dotted-key `overrides`; "<name>-dry-run" for its dry run) as the notebook sees it
    (lib.profiles.notebook_profile: its `dataset_settings` applied), its section for `notebook`, the results
    folder (results/<profile>/<notebook>, or `out`, e.g. for an own defense evaluated as notebook 09; skips of an
    earlier run forgotten), the device and thread count, and seed everything; prints one line saying so (and a
    second marking a dry run as no results). Under torchrun or `run_all.sh --nproc N` it joins the distributed job
    first (lib.distributed), so that lib's evaluations and trainings share their work over the ranks. From then on
    the kernel's peak memory is written to the results folder after every cell (lib.memory.watch) for the run
    summary."""
    in_job = distributed.init_from_env()
    loaded = notebook_profile(load_profile(profile, overrides), notebook)
    out = report.results_dir(profile, notebook) if out is None else report.make_results_dir(out)
    report.reset_skips(out)
    if loaded.get("threads"):
        torch.set_num_threads(loaded["threads"])
    seed_everything(loaded["seed"])
    run = Run(loaded, notebook, notebook_config(loaded, notebook), out, get_device())
    memory.watch(out, run.device)   # peak memory after every cell -> out/memory.json, for the run summary
    rank = f"  rank {distributed.rank()} of {distributed.world_size()}" if in_job else ""
    print(f"profile={profile}  device={run.device}  threads={torch.get_num_threads()}{rank}  results -> {out}")
    if is_dry_run(loaded):
        print(dry_run_banner(profile))
    return run
