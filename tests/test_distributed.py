"""torch.distributed on 2 gloo processes (torchrun, CPU): a sharded evaluation is identical, image for image, to the
single-process one; a classifier trained data-parallel is loaded from the cache by one process (and the reverse); a
rank killed mid-run is named, and the re-run resumes from the chunks already cached."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from lib import distributed, runner, train
from lib.evaluate import model_digest
from tests import distributed_job as job

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """A child's environment: this checkout first on the path (whatever the shared environment's editable install
    points at), one thread per process."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The job of tests/distributed_job.py on 2 ranks, after the tiny model was trained here by one process."""
    root = tmp_path_factory.mktemp("job")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADV_CACHE_DIR", str(root / "cache"))
        assert not job.tiny_cached_model()[1]["cache_hit"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "distributed_job.py"), str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_env(ADV_CACHE_DIR=str(root / "cache")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = []
    for r in range(2):
        with open(root / f"rank{r}.pkl", "rb") as fh:
            ranks.append(pickle.load(fh))
    return root, ranks


def test_shards_cover_the_range_once_in_order():
    assert distributed.shard(10) == range(10) and distributed.shard(10, strided=True) == range(10)   # outside a job
    assert distributed.gather_parts({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    assert distributed.from_main(lambda: 3) == 3 and distributed.all_gather("x") == ["x"]


def test_sharded_evaluation_is_identical_to_one_process(two_ranks, monkeypatch):
    root, ranks = two_ranks
    monkeypatch.setenv("ADV_CACHE_DIR", str(root / "cache"))
    classifier, _ = job.smoke_classifier()
    monkeypatch.setenv("ADV_CACHE_DIR", str(root / "fresh"))   # every attack crafted anew, in one process
    (rows, examples), calls = job.crafting_calls(lambda: job.smoke_outcomes(classifier))
    assert [r["calls"] for r in ranks] == [calls // 3, 2 * calls // 3]   # rank 0 crafted 1 chunk of 3, rank 1 two
    assert len(examples) == 4 * 24 and examples.linf.gt(0).any()   # (gray, white) x (none, tvm)
    for r in ranks:   # every rank received all outcomes: per example, perturbation norms to the last bit
        pd.testing.assert_frame_equal(r["examples"], examples, check_exact=True)
        pd.testing.assert_frame_equal(r["rows"].drop(columns="attack_seconds"), rows.drop(columns="attack_seconds"),
                                      check_exact=True)


def test_classifier_trained_by_two_processes_is_loaded_by_one_and_the_reverse(two_ranks, monkeypatch):
    root, ranks = two_ranks
    assert [r["meta"]["cache_hit"] for r in ranks] == [False, False]          # the job trained it ...
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["meta"]["test_accuracy"] > 80
    assert [r["tiny_meta"]["cache_hit"] for r in ranks] == [True, True]       # ... and loaded what one process trained
    monkeypatch.setenv("ADV_CACHE_DIR", str(root / "cache"))
    monkeypatch.setattr(train, "descend", lambda *a, **k: pytest.fail("trained again despite the cache"))
    model, meta = job.smoke_classifier()
    assert meta["cache_hit"] and model_digest(model) == ranks[0]["digest"]


def test_data_parallel_steps_are_the_single_process_steps(two_ranks):
    _, ranks = two_ranks
    weights, history = job.parallel_steps()
    for r in ranks:   # share-weighted gradient averaging: the gradient of the whole batch, also for shares 4 + 3
        for name, value in weights.items():
            torch.testing.assert_close(r["weights"][name], value, rtol=0, atol=1e-6)
        assert [h["loss"] for h in r["history"]] == pytest.approx([h["loss"] for h in history], abs=1e-6)


SHARDS_NOTEBOOK = """\
import json, os, signal
import torch
import lib.attacks as attacks
from lib import distributed, report
from lib.data import load_dataset
from lib.evaluate import AttackSpec, adversarial_set

distributed.init_from_env()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
test = load_dataset("digits", "test", n=32)
calls, generate = [], attacks.generate

def counted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and os.environ.get("KILL_RANK") == str(distributed.rank()):
        os.kill(os.getpid(), signal.SIGKILL)   # dies after its first chunk was crafted and cached
    return generate(*args, **kwargs)

attacks.generate = counted
adversarial_set(AttackSpec("pgd", {"eps": 0.1, "steps": 2}), model, test.x, test.y, batch_size=4)   # 4 chunks a rank
out = report.results_dir(profile, "01_shards")
(out / "tables" / "calls.json").write_text(json.dumps(distributed.all_gather(len(calls))))
"""


@pytest.mark.notebook
def test_a_killed_rank_is_named_and_the_rerun_resumes_from_its_cached_chunks(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "quick"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(SHARDS_NOTEBOOK)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, books / "01_shards.ipynb")
    env = _env(ADV_NOTEBOOKS_DIR=str(books), ADV_RESULTS_DIR=str(tmp_path / "results"),
               ADV_CACHE_DIR=str(tmp_path / "cache"), ADV_DIST_TIMEOUT_S="120")

    def run_series(*launch: str, **extra: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, *launch], cwd=REPO, env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        summary = tmp_path / "results" / "smoke" / "SUMMARY.md"
        return done.returncode, summary.read_text() if summary.is_file() else done.stdout + done.stderr

    # launched as on several machines (torchrun around the runner), then as ./run_all.sh --nproc 2 launches it
    code, summary = run_series("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "lib.runner", "--profile", "smoke", KILL_RANK="1")
    assert code != 0 and "| 01_shards | failed |" in summary, summary
    assert "rank 1 of 2 failed first: DeadKernelError" in summary        # the dead rank, not the one it stranded
    assert "then rank 0: RankFailure" in summary
    code, summary = run_series("-m", "lib.runner", "--profile", "smoke", "--nproc", "2")
    assert code == 0 and "| 01_shards | ok |" in summary, summary
    calls = json.loads((tmp_path / "results" / "smoke" / "01_shards" / "tables" / "calls.json").read_text())
    assert calls == [0, 3]   # rank 0's 4 chunks and rank 1's first were cached: only rank 1's last 3 are crafted
    assert [p.name for p in (tmp_path / "results" / "smoke" / "01_shards").glob("*.ipynb")] == ["01_shards.ipynb"]
    manifest = json.loads((tmp_path / "results" / "smoke" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert runner.read_status(tmp_path / "results" / "smoke" / "01_shards")["status"] == "ok"
