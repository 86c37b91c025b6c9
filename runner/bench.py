"""``python -m runner.bench``: what a sweep costs against a single run (wall-clock ratio).

Times, as a user runs them, ``python -m runner`` (one linear_fit run) against
``python -m runner -m optimizer.lr=<8 values>`` (the basic launcher, one process), interleaved
and repeated, median of each. The persistent compilation cache is off in both, so the ratio
shows what in-process compile sharing buys: 8 jobs, one compilation of the train step.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

LRS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]
COMMON = ["device.compilation_cache_dir=null", "trainer.progress_bar=false"]


def _time(args: List[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner", *args, *COMMON], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"runner failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_sweep(repeats: int, lrs: List[str]) -> dict:
    """Median wall time of one run and of a len(lrs)-job lr sweep, and their ratio."""
    singles, sweeps, compiles = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(repeats):
            singles.append(_time([f"hydra.run.dir={tmp}/single{i}"], tmp))
            sweeps.append(_time(["-m", f"optimizer.lr={','.join(lrs)}",
                                 f"hydra.sweep.dir={tmp}/sweep{i}"], tmp))
            with open(tmp / f"sweep{i}" / "summary.csv") as f:
                compiles.append(sum(int(r["train_step_compiles"]) for r in csv.DictReader(f)))
    single, sweep = statistics.median(singles), statistics.median(sweeps)
    return {"jobs": len(lrs), "repeats": repeats, "single_run_s": single, "sweep_s": sweep,
            "sweep_over_single": sweep / single, "per_job_over_single": sweep / single / len(lrs),
            "train_step_compiles_per_sweep": max(compiles)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats of a 2-job sweep")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    result = bench_sweep(2 if args.quick else args.repeats, LRS[:2] if args.quick else LRS)
    print(f"linear_fit, {result['jobs']}-job lr sweep (basic launcher) vs one run, "
          f"median of {result['repeats']}:")
    print(f"  one run          {result['single_run_s']:7.2f} s")
    print(f"  sweep            {result['sweep_s']:7.2f} s   = {result['sweep_over_single']:.2f}x "
          f"one run ({result['per_job_over_single']:.2f}x per job)")
    print(f"  train-step compilations in the sweep: {result['train_step_compiles_per_sweep']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sweep": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
