"""Whole-process figures of ``python -m runner.bench`` (a run's wall time against the bare
imports, compilations per run and per sweep, three sweeps on the basic and the fused launcher
against one run) and the machine."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from runner.io.layout import RunPaths

SWEEP_LRS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]
NO_CACHE = ["device.compilation_cache_dir=null", "trainer.progress_bar=false"]
QUICK_CACHE = "jax-cache"  # --quick: the compilation cache of a section's processes, in its tmp
FUSED_GOAL = 1.4  # the 8-job linear_fit fused sweep's wall against one run's: the aim
SWEEP_ROUNDS = 3  # at most, for the sweeps (9 whole processes a round)
# The CNN sweep: the reference CNN on 32x32 images (84x84 takes ~0.3 s a step on 2 cores).
CNN_SWEEP = ["task=cnn_random_images", "task.image_size=32", "task.num_eval=64",
             "trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=20",
             "trainer.checkpoint_every=20", "trainer.log_images=false"]


def process_flags(tmp, *, quick: bool) -> List[str]:
    """The flags of every ``python -m runner`` process a section times: ``NO_CACHE`` (each
    compiles as a user's first run does). ``quick`` (a smoke run, figures not meaningful): a
    compilation cache of the section's own under ``tmp`` instead, so the section's processes
    of one program compile it once (most of a small run's process is its compilation)."""
    if not quick:
        return NO_CACHE
    return [f"device.compilation_cache_dir={Path(tmp) / QUICK_CACHE}",
            "trainer.progress_bar=false"]


def median_times(fns: Dict[str, Callable[[], None]], repeats: int, *,
                 warmup: bool = False) -> Dict[str, float]:
    """The median seconds of each fn over ``repeats`` rounds, called in turn; ``warmup``: call
    each once first (to compile). Whole processes need no warm-up: each starts cold anyway."""
    for fn in fns.values() if warmup else ():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_process_wall(repeats: int) -> dict:
    """The default run's whole-process wall time against ``import jax, flax, optax``."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))
        t = median_times({
            "import": lambda: _run([sys.executable, "-c", "import jax, flax, optax"], tmp),
            "runner": lambda: _run([sys.executable, "-m", "runner",
                                    f"hydra.run.dir={tmp}/{next(runs)}"], tmp),
            "runner_no_images": lambda: _run([sys.executable, "-m", "runner",
                                              "trainer.log_images=false",
                                              f"hydra.run.dir={tmp}/{next(runs)}"], tmp)},
            repeats)
    return {"bare_import_s": t["import"], "default_run_s": t["runner"],
            "default_run_over_import": t["runner"] / t["import"],
            "no_images_run_s": t["runner_no_images"],
            "no_images_over_import": t["runner_no_images"] / t["import"]}


def bench_compiles(jobs: int = 3) -> dict:
    """Train-step compilations of one run, and of a ``jobs``-job lr sweep in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "optimizer.lr=" + ",".join(SWEEP_LRS[:jobs]), "trainer.steps=20",
                "trainer.log_every=10", *NO_CACHE, f"hydra.sweep.dir={tmp}/sweep"]
        _run([sys.executable, "-m", "runner", *args], tmp)
        per_job = [json.loads((Path(tmp) / "sweep" / str(i) / RunPaths.METRICS).read_text())
                   ["train_step_compiles"] for i in range(jobs)]
    return {"per_run": per_job[0], "per_sweep": sum(per_job), "sweep_jobs": jobs}


def sweep_cases(tmp: str, *, quick: bool) -> Dict[str, Dict[str, Any]]:
    """The sweeps the launchers are compared on: name -> the overrides of one job and the lrs
    swept. ``tmp`` holds the digits file (scikit-learn's, 1,437 train examples). ``quick`` (a
    smoke run): the linear_fit case alone, 2 jobs; every case's three processes are the same
    code, and the other cases' overrides are checked by composing them (tests/test_bench.py)."""
    cases: Dict[str, Dict[str, Any]] = {
        "linear_fit": {"overrides": [], "lrs": SWEEP_LRS[:2] if quick else SWEEP_LRS}}
    if quick:
        return cases
    digits = _digits_file(tmp)
    if digits:
        cases["digits"] = {"overrides": ["task=arrays", f"task.path={digits}",
                                         "trainer.steps=300"], "lrs": SWEEP_LRS[2:6]}
    cases["cnn"] = {"overrides": CNN_SWEEP, "lrs": SWEEP_LRS[:3:2]}
    return cases


def bench_sweeps(repeats: int, *, quick: bool = False) -> dict:
    """For each of ``sweep_cases``: the median wall time of one run, of its sweep on Hydra's
    basic launcher and of the same sweep on the fused one (``hydra/launcher=fused``), whole
    processes, interleaved, ``SWEEP_ROUNDS`` rounds at most."""
    rounds = min(repeats, SWEEP_ROUNDS)
    with tempfile.TemporaryDirectory() as tmp:
        runs, cases, fns = iter(range(10**6)), sweep_cases(tmp, quick=quick), {}
        flags = process_flags(tmp, quick=quick)
        for name, case in cases.items():
            fns[(name, "single")] = _process(tmp, runs, *case["overrides"], flags=flags)
            fns[(name, "basic")] = _process(tmp, runs, *case["overrides"], lrs=case["lrs"],
                                            flags=flags)
            fns[(name, "fused")] = _process(tmp, runs, *case["overrides"], lrs=case["lrs"],
                                            fused=True, flags=flags)
        t = median_times(fns, rounds)
    result: Dict[str, Any] = {"rounds": rounds, "fused_goal_over_single": FUSED_GOAL,
                              "cases": {}}
    for name, case in cases.items():
        single, basic, fused = (t[(name, arm)] for arm in ("single", "basic", "fused"))
        result["cases"][name] = {
            "jobs": len(case["lrs"]), "overrides": case["overrides"],
            "single_run_s": single, "basic_sweep_s": basic, "fused_sweep_s": fused,
            "basic_over_single": basic / single, "fused_over_single": fused / single,
            "fused_over_basic": fused / basic, "fused_not_slower": fused <= basic}
    linear = result["cases"]["linear_fit"]
    result["fused_goal_met"] = linear["fused_over_single"] <= FUSED_GOAL
    result["fused_never_slower"] = all(c["fused_not_slower"] for c in result["cases"].values())
    return result


def _digits_file(tmp: str) -> Optional[str]:
    """scikit-learn's digits as a ``task=arrays`` file (None without scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    import numpy as np

    digits, path = load_digits(), f"{tmp}/digits.npz"
    x, y = digits.images.astype(np.float32), digits.target
    np.savez(path, x_train=x[:1437], y_train=y[:1437], x_eval=x[1437:], y_eval=y[1437:])
    return path


def _process(tmp: str, runs: Iterator[int], *overrides: str, lrs: Optional[List[str]] = None,
             fused: bool = False, flags: List[str] = NO_CACHE) -> Callable[[], None]:
    """A whole ``python -m runner`` process (with ``flags``, ``process_flags``): one run, or
    (``lrs``) an lr multirun, on the fused launcher when ``fused``; every call in a fresh run
    or sweep dir under ``tmp``. A failed job fails the process (the sweep summary exits 1)
    and so the bench, as does a fused sweep whose jobs did not train as one group."""
    def call() -> None:
        where = f"{tmp}/{next(runs)}"
        if lrs is None:
            args = [f"hydra.run.dir={where}"]
        else:
            args = ["-m", *(["hydra/launcher=fused"] if fused else []),
                    "optimizer.lr=" + ",".join(lrs), f"hydra.sweep.dir={where}"]
        out = _run([sys.executable, "-m", "runner", *args, *overrides, *flags], tmp)
        if fused and f"({len(lrs)} members" not in out:
            raise SystemExit(f"the fused sweep did not train its {len(lrs)} jobs as one "
                             f"group:\n{out[-3000:]}")
    return call


def _run(cmd: List[str], cwd) -> str:
    """Run ``cmd``; its stdout and stderr."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def machine_info() -> dict:
    import jax

    from runner.io.manifest import PACKAGES, package_version

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                 .splitlines() if line.startswith("model name")]
        cpu = names[0] if names else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
            "versions": {"python": platform.python_version(),
                         **{p: package_version(p) for p in (*PACKAGES, "torch")}}}
