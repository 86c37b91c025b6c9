"""Whole-process figures of ``python -m runner.bench`` (a run's wall time against the bare
imports, compilations per run and per sweep, an lr sweep against one run) and the machine."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

SWEEP_LRS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]
NO_CACHE = ["device.compilation_cache_dir=null", "trainer.progress_bar=false"]


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
        per_job = [json.loads((Path(tmp) / "sweep" / str(i) / "metrics.json").read_text())
                   ["train_step_compiles"] for i in range(jobs)]
    return {"per_run": per_job[0], "per_sweep": sum(per_job), "sweep_jobs": jobs}


def bench_sweep(repeats: int, lrs: List[str]) -> dict:
    """Median wall time of one run and of a len(lrs)-job lr sweep (basic launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))
        t = median_times({
            "single": lambda: _run([sys.executable, "-m", "runner", *NO_CACHE,
                                    f"hydra.run.dir={tmp}/single{next(runs)}"], tmp),
            "sweep": lambda: _run([sys.executable, "-m", "runner", "-m",
                                   f"optimizer.lr={','.join(lrs)}", *NO_CACHE,
                                   f"hydra.sweep.dir={tmp}/sweep{next(runs)}"], tmp)},
            repeats)
    return {"jobs": len(lrs), "single_run_s": t["single"], "sweep_s": t["sweep"],
            "sweep_over_single": t["sweep"] / t["single"],
            "per_job_over_single": t["sweep"] / t["single"] / len(lrs)}


def _run(cmd: List[str], cwd) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def machine_info() -> dict:
    import jax

    from runner.manifest import PACKAGES, _version

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                 .splitlines() if line.startswith("model name")]
        cpu = names[0] if names else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
            "versions": {"python": platform.python_version(),
                         **{p: _version(p) for p in (*PACKAGES, "torch")}}}
