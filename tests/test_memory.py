"""Memory: sets streamed through each defense in batches the profile bounds (lib.evaluate.purify_stream,
purify_batch_sizes); peak memory measured inside the notebook kernel after every cell, shown per notebook in
SUMMARY.md and the manifest, and a dry run's paper-scale estimate with its 80 GB flag (lib.memory)."""
from __future__ import annotations

import json

import pytest
import torch

from lib import memory, runner
from lib.defenses.base import Defense
from lib.defenses.baselines import TotalVariationMinimization
from lib.defenses.regionsparse.evaluation import purify_sets
from lib.defenses.registry import bounded, purify_batch_size
from lib.defenses.squeeze import MedianFilter
from lib.evaluate import attack_specs, purify_stream, stream_size, threat_outcomes
from lib.profiles import DRY_RUN_SIZE, DRY_RUN_TRAIN, load_profile


def _notebook(path, *cells: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.notebook
def test_the_kernels_peak_reaches_summary_and_manifest(tmp_path, monkeypatch):
    """A cell that holds 400 MB and frees it: the kernel's recorded peak is at least that far above its baseline,
    although the memory was given back before the notebook ended."""
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "01_mem.ipynb",
              "import torch\nfrom lib import memory, report\n"
              "memory.watch(report.results_dir(profile, '01_mem'), torch.device('cpu'))",
              "block = b'x' * 400_000_000", "del block", "kept = b'x' * 200_000_000")
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", books)
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path / "results"))
    assert runner.main(["--profile", "smoke"]) == 0
    out = tmp_path / "results" / "smoke"
    record = json.loads((out / "manifest.json").read_text())["notebooks"][0]["memory"]
    assert record["device"] == "cpu" and record["peak_bytes"] - record["baseline_bytes"] >= 3.9e8
    assert record["peak_bytes"] == record["rss_peak_bytes"]
    (start, peak), (held, _), (kept_start, kept_peak) = record["cells"][-3:]   # each cell's own start and peak
    assert peak - start >= 3.9e8 and held - start >= 3.9e8       # the block, then held when `del` starts
    assert kept_start < start + 1e8 and kept_peak - kept_start >= 1.9e8   # freed; the last cell's own peak
    assert f"| {memory.gigabytes(record['peak_bytes'])} RSS |" in (out / "SUMMARY.md").read_text()
    assert "Paper-scale" not in (out / "SUMMARY.md").read_text()   # only dry runs estimate the paper's scale
    runner.set_aside_previous(out / "01_mem")                       # a later run never reads this peak
    assert memory.read_memory(out / "01_mem") is None


def test_the_estimate_scales_each_cells_working_memory_not_what_the_kernel_holds():
    cells = [(10 ** 9, 2 * 10 ** 9), (3 * 10 ** 9, 3 * 10 ** 9 + 10 ** 8)]   # (start, peak): 1 GB and 0.1 GB work
    recorded = {"baseline_bytes": 10 ** 9, "peak_bytes": 3 * 10 ** 9 + 10 ** 8, "cells": cells}
    assert memory.paper_scale_estimate(recorded, 10.0) == 11 * 10 ** 9           # 1 + 1 x 10, over 3 + 0.1 x 10
    assert memory.paper_scale_estimate(recorded, 30.0) == 31 * 10 ** 9
    without_cells = {"baseline_bytes": 10 ** 9, "peak_bytes": 3 * 10 ** 9}     # no per-cell record: all of it grows
    assert memory.paper_scale_estimate(without_cells, 10.0) == 21 * 10 ** 9


def test_a_notebook_that_recorded_nothing_shows_a_dash():
    assert memory.memory_cell(None) == "–"
    cuda = {"device": "cuda", "peak_bytes": 2e9, "rss_peak_bytes": 5e9}
    assert memory.memory_cell(cuda) == "2.00 GB CUDA (RSS 5.00 GB)"


def test_growth_is_the_largest_batch_a_dry_run_does_not_fill():
    paper = load_profile("paper")
    # notebook 03 evaluates in batches of eval_batch_size; its dry run fills DRY_RUN_SIZE images of them
    expected = max(paper["eval_batch_size"] / DRY_RUN_SIZE, paper["notebooks"]["03_regionsparse"]["finetune"]
                   ["batch_size"] / DRY_RUN_TRAIN)
    assert memory.batch_growth(paper, "03_regionsparse") == expected
    small = load_profile("paper", {"eval_batch_size": 8})
    arn = small["notebooks"]["05_attack_invariant_arn"]["arn"]["batch_size"]   # ARN trains in batches of 300
    assert memory.batch_growth(small, "05_attack_invariant_arn") >= arn / DRY_RUN_TRAIN
    assert memory.batch_growth(load_profile("paper-dry-run"), "02_idfr") == memory.batch_growth(paper, "02_idfr")


def test_a_dry_runs_summary_estimates_the_paper_scale_and_flags_what_does_not_fit(tmp_path):
    out = tmp_path / "03_regionsparse"
    out.mkdir()
    recorded = {"device": "cuda", "peak_bytes": 4 * 10 ** 9, "baseline_bytes": 10 ** 9, "rss_peak_bytes": 6 * 10 ** 9}
    (out / memory.MEMORY_FILE).write_text(json.dumps(recorded))
    m = memory.notebook_memory(out, "paper-dry-run", "03_regionsparse")
    growth = memory.batch_growth(load_profile("paper-dry-run"), "03_regionsparse")
    assert m["growth"] == growth and m["paper_scale_bytes"] == 10 ** 9 + int(3 * 10 ** 9 * growth)
    assert memory.notebook_memory(out, "paper", "03_regionsparse") == recorded   # no estimate outside dry runs
    small = {**m, "paper_scale_bytes": 5 * 10 ** 9, "cells": [(10 ** 9, 15 * 10 ** 8), (10 ** 9, 12 * 10 ** 8)]}
    records = [{"notebook": "03_regionsparse", "status": "ok", "seconds": 1.0, "skipped": [], "error": "", "memory": m},
               {"notebook": "04_image_reconstruction", "status": "ok", "seconds": 1.0, "skipped": [], "error": "",
                "memory": small},
               {"notebook": "05_attack_invariant_arn", "status": "failed", "seconds": 1.0, "skipped": [],
                "error": "boom", "memory": None}]
    text = runner.summary_markdown("paper-dry-run", records, 60.0)
    assert "## Paper-scale memory estimate" in text and "start + (cell peak - start) x growth" in text
    big = memory.gigabytes(m["paper_scale_bytes"])
    assert m["paper_scale_bytes"] > memory.GPU_LIMIT_BYTES   # 1 GB + 3 GB x 31 is more than 80 GB
    assert f"| 03_regionsparse | 1.00 GB | 4.00 GB | – | {growth:.1f}x | {big} | **NO** |" in text
    assert "| 04_image_reconstruction | 1.00 GB | 4.00 GB | 0.50 GB |" in text and "| 5.00 GB | yes |" in text
    assert "| 05_attack_invariant_arn | failed | 1.0 | – |" in text


# --------------------------------------------------------------------------- streaming sets through a defense

class _Spy(Defense):
    """A deterministic per-image defense that records how many images each purify call got; `last_stats` as
    RegionSparse's: the share of bright images of the latest call."""

    def __init__(self, max_batch=None):
        super().__init__()
        self.calls: list[int] = []
        self.max_batch = max_batch

    def purify(self, x):
        self.calls.append(len(x))
        self.last_stats = {"bright": float((x.mean((1, 2, 3)) > 0.5).float().mean())}
        return MedianFilter(2).purify(x)


def _sets(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, 8, 8, generator=g) for n in (5, 7, 3)]


def test_a_set_streams_through_a_defense_in_its_batches_with_the_same_result():
    sets = _sets()
    whole = MedianFilter(2).purify(torch.cat(sets))
    spy = _Spy(max_batch=4)
    out = purify_stream(spy, sets, batch_size=500)
    assert spy.calls == [4, 4, 4, 3]                  # batches span the tensors; never more than max_batch
    assert [len(t) for t in out] == [5, 7, 3] and torch.equal(torch.cat(out), whole)
    assert stream_size(spy, 2) == 2 and stream_size(_Spy(), 500) == 500


def test_tvm_streamed_is_seeded_per_batch_and_one_batch_is_one_call():
    sets = _sets(1)
    tvm = lambda: TotalVariationMinimization(keep_prob=0.5, lamb=0.03, max_iter=5, seed=0)   # noqa: E731
    once = tvm().purify(torch.cat(sets))
    assert torch.equal(torch.cat(purify_stream(tvm(), sets, batch_size=15)), once)
    first, second = tvm(), tvm()
    first.max_batch = second.max_batch = 4
    a, b = purify_stream(first, sets, 500), purify_stream(second, sets, 500)
    assert all(torch.equal(u, v) for u, v in zip(a, b))   # the same batches give the same images


def test_purify_sets_streams_and_keeps_the_stats_of_the_whole_set():
    x, *adv = _sets(2)
    sets = {("FGSM", 2.0): adv[0], ("BIM", 2.0): adv[1]}
    spy, whole = _Spy(max_batch=4), _Spy()
    clean, purified = purify_sets(spy, x, sets)
    clean_all, purified_all = purify_sets(whole, x, sets)
    assert max(spy.calls) == 4 and whole.calls == [15]
    assert torch.equal(clean, clean_all) and all(torch.equal(purified[k], purified_all[k]) for k in sets)
    assert spy.last_stats["bright"] == pytest.approx(whole.last_stats["bright"])


def test_threat_outcomes_bounds_the_batches_through_a_defense(digits_model, digits_batch):
    x, y = digits_batch[0][:24], digits_batch[1][:24]
    attack = attack_specs([{"name": "fgsm", "params": {"eps": 0.1}}])
    bounded_spy, free_spy = _Spy(max_batch=5), _Spy()
    rows, examples = threat_outcomes(digits_model, {"median": bounded_spy}, x, y, attack, batch_size=16,
                                     use_cache=False, device=torch.device("cpu"))
    rows_free, examples_free = threat_outcomes(digits_model, {"median": free_spy}, x, y, attack, batch_size=16,
                                               use_cache=False, device=torch.device("cpu"))
    assert max(bounded_spy.calls) == 5 and max(free_spy.calls) == 16
    assert examples["correct"].tolist() == examples_free["correct"].tolist()


def test_purify_batch_sizes_come_from_the_profile_and_bad_ones_are_named():
    paper, dry = load_profile("paper"), load_profile("paper-dry-run")
    for name in ("regionsparse", "tvm", "median"):
        assert purify_batch_size(paper, name) == purify_batch_size(dry, name) <= paper["eval_batch_size"]
    assert bounded(MedianFilter(2), paper, "median").max_batch == paper["purify_batch_sizes"]["median"]
    assert bounded(MedianFilter(2), load_profile("smoke"), "median").max_batch is None
    with pytest.raises(ValueError, match="unknown defense.*'medain'"):
        purify_batch_size({"name": "p", "purify_batch_sizes": {"medain": 4}}, "median")
    with pytest.raises(ValueError, match="purify_batch_sizes.median must be a positive integer, got 0"):
        purify_batch_size({"name": "p", "purify_batch_sizes": {"median": 0}}, "median")


def test_idfr_never_loads_the_whole_imagenet_training_split(monkeypatch):
    """The paper profile's id_train_size is null ("the dataset's training subset"): on ImageNet that is the profile's
    25,000-image subset (spec-001 §3.1), not all 1.28 million images stacked as one tensor; CIFAR stays whole."""
    import lib.data
    from lib.data import ImageData, dataset_info
    from lib.defenses.idfr.training import IDFRSetting

    asked = {}

    def fake_load(name, split, *, n=None, seed=0, **kwargs):
        asked[name] = n
        return ImageData(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), dataset_info(name))

    monkeypatch.setattr(lib.data, "load_dataset", fake_load)
    paper = load_profile("paper")
    for dataset in ("imagenet", "cifar10"):
        IDFRSetting.from_profile(paper, dataset)
    assert asked == {"imagenet": 25_000, "cifar10": None}
    assert IDFRSetting.from_profile(load_profile("paper-dry-run"), "imagenet") and asked["imagenet"] <= DRY_RUN_TRAIN
