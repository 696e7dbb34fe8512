"""Throughput of sharded attacks (lib.evaluate.adversarial_set) against the number of torch.distributed processes.

    python benchmarks/distributed.py [--nproc 1,2] [--images 360] [--batch 24] [--threads 1] [--device cpu|cuda]
                                     [--aa-iter 10] [--aa-queries 100] [--out results/benchmarks]

The same work for every process count: the smoke profile's digits classifier (trained once, then cached) attacked on
the first --images digits test images in chunks of --batch, with PGD-Linf (eps 0.15, 100 steps, random start) and with
AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) at reduced budgets (--aa-iter iterations, --aa-queries
queries), nothing cached. One process runs outside a job; N > 1 run under torchrun (gloo on the CPU, NCCL on GPUs),
each crafting its share of the chunks, and the time runs from a barrier before the attack to the end of the gather.
Writes distributed.csv and distributed.md under --out: images per second per process count, the ratio to one
process, and the machine's 1-minute load average after each attack (other work on the machine skews the ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lib import distributed  # noqa: E402
from lib.data import load_dataset  # noqa: E402
from lib.evaluate import AttackSpec, adversarial_set  # noqa: E402
from lib.profiles import load_profile  # noqa: E402
from lib.train import trained_classifier  # noqa: E402

WORKER_ENV = "ADV_BENCH_WORKER"   # set for the worker processes: their settings, as JSON


def attacks(aa_iter: int, aa_queries: int) -> list[AttackSpec]:
    """The two attacks timed."""
    return [AttackSpec("pgd", {"eps": 0.15, "steps": 100}, "PGD-Linf (100 steps)"),
            AttackSpec("autoattack", {"eps": 0.15, "version": "standard", "n_iter": aa_iter, "n_queries": aa_queries},
                       f"AutoAttack standard ({aa_iter} iterations, {aa_queries} queries)")]


def worker(args: argparse.Namespace) -> None:
    """One process's part: craft this rank's chunks of every attack; rank 0 writes the timings to args.result."""
    distributed.init_from_env()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    model, _ = trained_classifier(load_profile("smoke"), "digits", device=device)
    test = load_dataset("digits", "test")
    x, y = test.x[:args.images].to(device), test.y[:args.images].to(device)
    rows = []
    for spec in attacks(args.aa_iter, args.aa_queries):
        distributed.barrier()
        t0 = time.perf_counter()
        adversarial_set(spec, model, x, y, batch_size=args.batch, use_cache=False)   # gathered on every rank
        seconds = time.perf_counter() - t0
        rows.append({"attack": spec.title, "processes": distributed.world_size(), "images": len(x),
                     "seconds": seconds, "images_per_s": len(x) / seconds, "load_1min": os.getloadavg()[0]})
    if distributed.is_main():
        Path(args.result).write_text(json.dumps(rows))


def measure(nproc: int, args: argparse.Namespace) -> list[dict]:
    """Run the worker with `nproc` processes (one outside a job, more under torchrun) and read rank 0's timings. The
    worker's settings travel in an environment variable, out of reach of torchrun's own option parsing."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = {**vars(args), "result": str(Path(tmp) / "result.json")}
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        subprocess.run([sys.executable, *launch, str(Path(__file__).resolve())], cwd=REPO, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads), WORKER_ENV: json.dumps(settings)})
        return json.loads(Path(settings["result"]).read_text())


def main() -> None:
    if WORKER_ENV in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ[WORKER_ENV])))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    parser.add_argument("--images", type=int, default=360, help="test images (digits has 360)")
    parser.add_argument("--batch", type=int, default=24, help="images per chunk (the unit shared out to ranks)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--aa-iter", type=int, default=10)
    parser.add_argument("--aa-queries", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks"))
    args = parser.parse_args()
    trained_classifier(load_profile("smoke"), "digits", device=torch.device(args.device))   # train once, before timing
    table = pd.DataFrame([row for k in map(int, args.nproc.split(",")) for row in measure(k, args)])
    single = table[table.processes == 1].set_index("attack").images_per_s
    table["speedup_vs_1"] = table.images_per_s / table.attack.map(single)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "distributed.csv", index=False)
    (out / "distributed.md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
