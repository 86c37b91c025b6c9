"""``python -m runner.bench``: runner against hand-written JAX (and PyTorch), in one run.

Every comparison is interleaved (A, B, A, B, ...) and repeated; figures are medians. Sections:
linear_fit steps/s (reference per-step loop vs runner's scan-fused loop), the CNN step (the
reference's Flax step vs runner's, GFLOP/s against this machine's fp32 matmul, PyTorch when
installed), overheads (compile time, whole-process wall vs bare imports, logging and
checkpointing per 1,000 steps), compilations per run and per sweep, and three sweeps (8-job
linear_fit, 4-job digits ``task=arrays``, 2-job CNN) on the basic and the fused launcher against
one run, side by side, and ``task=arrays`` read from the host against kept on the device
(``runner.bench.feed``), and a hyperparameter search with and without pruning against Hydra's
optuna sweeper (``runner.bench.search``).
Writes a table to the console and everything to ``bench/results.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from runner.bench.feed import bench_feed
from runner.bench.process import (bench_compiles, bench_process_wall, bench_sweeps,
                                  machine_info, median_times)
from runner.bench.search import bench_search
from runner.bench.table import print_table

SECTIONS = ("linear_fit", "arrays", "cnn", "overheads", "compiles", "sweeps", "feed", "search")
# --quick: the CNN sections' batch and images (the reference's and runner's), and the matmul's n
QUICK_CNN, QUICK_MATMUL = {"batch_size": 8, "image_size": 16}, 256


def _compose(overrides: List[str]):
    """The config of ``python -m runner <overrides>``."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="runner.conf", version_base=None):
        return compose(config_name="config", overrides=overrides)


def runner_parts_of(overrides: List[str]):
    """task, optimizer, state, data and rng of ``python -m runner <overrides>``."""
    from runner.core.steps import setup
    from runner.run.build import build_parts

    cfg = _compose(overrides)
    task, model, optimizer = build_parts(cfg)
    state, data, _, rng = setup(0, task, model, optimizer)
    return cfg, task, optimizer, state, data, rng


def loops(reference, runner_parts, *, steps: int, chunk: int, windows: int = 1,
           unroll: int = 1) -> Dict[str, Callable]:
    """Two ways to train ``steps`` steps: the reference's Python loop over its jitted step,
    and runner's ``train_steps`` fusing ``chunk`` steps per dispatch (returning the metrics of
    ``windows`` log windows). Each call continues from the state the previous one left (the
    state is donated)."""
    import jax

    from runner.core.steps import train_steps

    ref_step, ref_state, ref_args = reference
    task, optimizer, state, data, rng = runner_parts
    box = {"reference": ref_state, "runner": state}

    def reference_loop():
        s = box["reference"]
        for _ in range(steps):
            s, _ = ref_step(s, *ref_args)
        box["reference"] = jax.block_until_ready(s)

    def runner_loop():
        s = box["runner"]
        for _ in range(steps // chunk):
            s, _ = train_steps(s, data, rng, task=task,
                               steps_per_dispatch=chunk, log_windows=windows, unroll=unroll)
        box["runner"] = jax.block_until_ready(s)

    return {"reference": reference_loop, "runner": runner_loop}


def bench_linear_fit(repeats: int, steps: int) -> dict:
    """Steps/s of the reference's per-step loop and of runner's fused loop, same work.

    Each loop runs in a process of its own, as its user runs it: the reference with this
    process's XLA_FLAGS, runner's with the task config's ``device.xla_flags`` added the way
    ``python -m runner`` adds them (XLA reads its flags once per process). The two processes
    take turns, one round each, ``repeats`` times after a warm-up round."""
    from runner.platform.device import with_xla_flags

    env = os.environ.get("XLA_FLAGS", "")
    flags = {"reference": env, "runner": with_xla_flags(_compose([]).device.xla_flags, env)}
    workers, times, info = {}, {name: [] for name in flags}, {}
    with tempfile.TemporaryFile("w+") as errors:
        try:
            for name, xla_flags in flags.items():
                workers[name] = subprocess.Popen(
                    [sys.executable, "-m", "runner.bench", "--linear-fit-worker", name,
                     "--steps", str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=errors, text=True, env={**os.environ, "XLA_FLAGS": xla_flags})
            for worker in workers.values():  # each says ready (its dispatch layout) when warm
                info = json.loads(_worker_line(worker, errors))
            for _ in range(repeats):
                for name, worker in workers.items():
                    worker.stdin.write("run\n")
                    worker.stdin.flush()
                    times[name].append(float(_worker_line(worker, errors)))
        finally:
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
    t = {name: statistics.median(v) for name, v in times.items()}
    return {"steps": steps, **info,
            "reference_steps_per_s": steps / t["reference"],
            "runner_steps_per_s": steps / t["runner"],
            "runner_over_reference": t["reference"] / t["runner"],
            "xla_flags": flags["runner"], "reference_xla_flags": flags["reference"]}


def _worker_line(worker, errors) -> str:
    line = worker.stdout.readline()
    if not line:
        errors.seek(0)
        raise SystemExit(f"bench_linear_fit: a worker failed:\n{errors.read()[-3000:]}")
    return line


def _linear_fit_worker(name: str, steps: int) -> None:
    """One side of ``bench_linear_fit``: warm up, say ``ready`` (with the dispatch layout), then
    time one round of ``steps`` steps per ``run`` line on stdin."""
    from runner.bench.cases import reference_linear_fit
    from runner.core.cadence import Cadence

    cfg, *parts = runner_parts_of([])
    # The default run's dispatch: 100 steps, the metrics of two 50-step log windows.
    cadence = Cadence.of(cfg.trainer)
    chunk, windows = cadence.steps_per_dispatch, cadence.log_windows
    loop = loops(reference_linear_fit(), parts, steps=steps, chunk=chunk, windows=windows,
                  unroll=cfg.trainer.scan_unroll)[name]
    loop()
    print(json.dumps({"steps_per_dispatch": chunk, "log_windows_per_dispatch": windows,
                      "scan_unroll": cfg.trainer.scan_unroll}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        loop()
        print(time.perf_counter() - start, flush=True)


def bench_arrays(repeats: int, steps: int) -> dict:
    """Steps/s on scikit-learn's digits (``task=arrays``, an MLP of 128 relu units, batch
    128): the reference-style loop (each batch sampled on the host) against runner's fused
    loop (batches drawn on device inside ``lax.scan``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return {"skipped": "scikit-learn is not installed (pip install scikit-learn)"}
    import numpy as np

    from runner.bench.cases import reference_arrays
    from runner.core.cadence import steps_per_dispatch

    digits = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.npz"
        x, y = digits.images.astype(np.float32), digits.target
        np.savez(path, x_train=x[:1437], y_train=y[:1437], x_eval=x[1437:], y_eval=y[1437:])
        cfg, *parts = runner_parts_of(["task=arrays", f"task.path={path}",
                                     "model.activation=relu"])
    chunk = steps_per_dispatch(cfg.trainer)
    fns = loops(reference_arrays(x[:1437], y[:1437], cfg.task.batch_size), parts,
                 steps=steps, chunk=chunk)
    t = median_times(fns, repeats, warmup=True)
    return {"steps": steps, "steps_per_dispatch": chunk, "batch_size": cfg.task.batch_size,
            "reference_steps_per_s": steps / t["reference"],
            "runner_steps_per_s": steps / t["runner"],
            "runner_over_reference": t["reference"] / t["runner"]}


def cnn_overrides(shape: Dict[str, int]) -> List[str]:
    """``task=cnn_random_images`` of ``shape`` (batch_size, image_size: the reference's)."""
    return ["task=cnn_random_images", *(f"task.{k}={v}" for k, v in shape.items())]


def bench_cnn(repeats: int, steps: int, shape: Optional[Dict[str, int]] = None,
              matmul_n: int = 2048) -> dict:
    """ms/step of the reference Flax CNN step, runner's scanned step and PyTorch's, on the
    reference's batch (``shape``: another batch_size and image_size for both)."""
    from runner.bench.cases import reference_cnn, torch_cnn_step

    shape = shape or {}
    reference = reference_cnn(**shape)
    ref_step, ref_state, ref_args = reference
    flops = ref_step.lower(ref_state, *ref_args).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", 0.0)
    _, *parts = runner_parts_of(cnn_overrides(shape))
    fns = loops(reference, parts, steps=steps, chunk=steps)
    torch_case = torch_cnn_step(**shape)
    if torch_case:
        torch_step, torch_version = torch_case
        fns["torch"] = lambda: [torch_step() for _ in range(steps)]
    t = {k: v / steps for k, v in median_times(fns, repeats, warmup=True).items()}
    result = {"steps_per_call": steps, "flops_per_step": flops,
              "reference_ms": 1e3 * t["reference"], "runner_ms": 1e3 * t["runner"],
              "runner_over_reference": t["runner"] / t["reference"],
              "reference_gflops": flops / t["reference"] / 1e9,
              "runner_gflops": flops / t["runner"] / 1e9,
              "matmul_gflops": matmul_gflops(repeats, matmul_n)}
    if torch_case:
        result.update(torch_version=torch_version, torch_ms=1e3 * t["torch"],
                      runner_over_torch=t["runner"] / t["torch"])
    return result


def matmul_gflops(repeats: int, n: int = 2048) -> float:
    """This machine's fp32 matmul throughput through XLA (n x n times n x n)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    dot = jax.jit(jnp.dot)
    t = median_times({"dot": lambda: dot(a, a).block_until_ready()}, repeats,
                     warmup=True)["dot"]
    return 2 * n**3 / t / 1e9


def bench_overheads(repeats: int, cnn_shape: Optional[Dict[str, int]] = None) -> dict:
    """Compile time, process wall vs bare imports, logging and checkpoint cost (the CNN's on
    ``cnn_shape``, as ``bench_cnn``'s ``shape``)."""
    import jax

    from runner.core.steps import train_steps
    from runner.io.checkpoint import save_checkpoint
    from runner.io.layout import RunPaths
    from runner.io.tb_logger import TensorBoardLogger
    from runner.platform.compiles import compile_stats

    result = {}
    for name, overrides, chunk in (("linear_fit", [], 50),
                                   ("cnn_random_images", cnn_overrides(cnn_shape or {}), 10)):
        cfg, task, optimizer, state, data, rng = runner_parts_of(overrides)
        before = compile_stats("train_steps")
        state, metrics = train_steps(state, data, rng, task=task,
                                     steps_per_dispatch=chunk + 1,  # a length no call compiled yet
                                     unroll=cfg.trainer.scan_unroll)
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            logger = TensorBoardLogger(RunPaths(tmp).tb)
            t = median_times({  # a log step: fetch the metrics, write the scalars
                "log": lambda lg=logger, m=metrics: lg.scalars(
                    0, "train", {k: v[-1] for k, v in jax.device_get(m).items()}),
                "checkpoint": lambda d=Path(tmp), s=state: save_checkpoint(d, s, step=0)},
                repeats, warmup=True)
            logger.close()
        per_1000 = (1000 / cfg.trainer.log_every * t["log"]
                    + 1000 / cfg.trainer.checkpoint_every * t["checkpoint"])
        result[name] = {"compile_s": compile_stats("train_steps")[1] - before[1],
                        "log_step_ms": 1e3 * t["log"], "checkpoint_ms": 1e3 * t["checkpoint"],
                        "log_and_checkpoint_s_per_1000_steps": per_1000}
    result["process"] = bench_process_wall(repeats)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per comparison (median)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 1 round, few steps, small shapes, one sweep case, a "
                        "compilation cache (figures are not meaningful)")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        help="run only these sections (updated in --out, the others kept)")
    parser.add_argument("--linear-fit-worker", choices=["reference", "runner"],
                        help=argparse.SUPPRESS)  # one side of the linear_fit comparison
    parser.add_argument("--steps", type=int, default=2000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.linear_fit_worker:
        return _linear_fit_worker(args.linear_fit_worker, args.steps)
    repeats, steps = (1, 200) if args.quick else (args.repeats, 2000)
    sections = {"linear_fit": lambda: bench_linear_fit(repeats, steps=steps),
                "arrays": lambda: bench_arrays(repeats, steps=steps),
                "cnn": lambda: bench_cnn(repeats, steps=1, shape=QUICK_CNN,
                                         matmul_n=QUICK_MATMUL) if args.quick
                else bench_cnn(repeats, steps=10),
                "overheads": lambda: bench_overheads(repeats, QUICK_CNN if args.quick else None),
                "compiles": bench_compiles,
                "sweeps": lambda: bench_sweeps(repeats, quick=args.quick),
                "feed": lambda: bench_feed(repeats, quick=args.quick),
                "search": lambda: bench_search(quick=args.quick, cache=args.out.parent)}
    # --only: those sections, updated in the results file (the others kept as they were)
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    results.update({"machine": machine_info(), "repeats": repeats, "quick": args.quick})
    for name in args.only or sections:
        results[name] = sections[name]()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")

