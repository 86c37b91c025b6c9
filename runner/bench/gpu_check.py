"""``python -m runner.bench.gpu_check``: both tasks on the GPU through the real CLI; step time and MFU.

Each case is one ``python -m runner device=gpu ...`` process; its step time and ``perf/mfu``
are read back from the run's TensorBoard events (medians over the log windows, compilation
excluded). Then, in this process, the hand-written reference loops against runner's fused loop
on the same GPU (``runner.bench``'s cases). Prints a table; ``--out`` writes everything as JSON.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from runner.io.layout import RunPaths

LONG = ["trainer.progress_bar=false", "trainer.log_images=false",
        "device.compilation_cache_dir=null"]
CNN = ["task=cnn_random_images", "trainer.steps=600", "trainer.log_every=100",
       "trainer.eval_every=300", "trainer.checkpoint_every=300"]
BIG = ["task.batch_size=256", "task.num_eval=512"]
CASES: Dict[str, List[str]] = {
    "linear_fit default run": ["trainer.progress_bar=false"],
    "linear_fit 20k steps": ["trainer.steps=20000", "trainer.log_every=1000",
                             "trainer.eval_every=10000", "trainer.checkpoint_every=10000", *LONG],
    "cnn fp32 (tf32) b32": [*CNN, *LONG],
    "cnn bf16 b32": [*CNN, *LONG, "device.precision=bf16"],
    "cnn fp32 (tf32) b256": [*CNN, *BIG, *LONG],
    "cnn bf16 b256": [*CNN, *BIG, *LONG, "device.precision=bf16"],
    "cnn fp32 highest b256": [*CNN, *BIG, *LONG, "device.matmul_precision=highest"],
}


def run_case(name: str, overrides: List[str], tmp: Path, timeout: float,
             device: str = "gpu") -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "runner", f"device={device}", *overrides,
           f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": wall}
    acc = EventAccumulator(str(RunPaths(run_dir).tb)).Reload()
    tags = acc.Tags()["scalars"]

    def median(tag):
        return statistics.median(e.value for e in acc.Scalars(tag)) if tag in tags else None

    steps_per_s = median("perf/steps_per_sec")
    manifest = json.loads(RunPaths(run_dir).manifest.read_text())
    return {"overrides": overrides, "wall_s": wall, "steps_per_s": steps_per_s,
            "ms_per_step": 1e3 / steps_per_s if steps_per_s else None,
            "mfu": median("perf/mfu"),
            "eval_loss": json.loads(RunPaths(run_dir).metrics.read_text())["eval"]["loss"],
            "devices": manifest.get("devices"),
            "placement": manifest.get("placement"), "stdout_tail": proc.stdout[-600:]}


def in_process(repeats: int) -> dict:
    """runner.bench's linear_fit loops and the CNN step (reference Flax vs runner) on the GPU."""
    from runner.bench.cases import reference_cnn
    from runner.bench.process import median_times
    from runner.bench.suite import bench_linear_fit, loops, runner_parts_of

    out = {"linear_fit": bench_linear_fit(repeats, steps=2000)}
    for batch in (32, 256):
        steps = 50
        reference = reference_cnn(batch_size=batch)
        _, *parts = runner_parts_of(["task=cnn_random_images", f"task.batch_size={batch}",
                                   f"task.num_eval={2 * batch}"])
        t = median_times(loops(reference, parts, steps=steps, chunk=steps), repeats,
                         warmup=True)
        out[f"cnn_b{batch}"] = {"reference_ms": 1e3 * t["reference"] / steps,
                                "runner_ms": 1e3 * t["runner"] / steps,
                                "runner_over_reference": t["runner"] / t["reference"]}
    return out


def _gflops(case: dict) -> float:
    return ((case.get("placement") or {}).get("flops_per_step") or 0) / 1e9


def _g(value) -> str:
    """A figure to 4 significant digits; ``-`` where a run logged none."""
    return "-" if value is None else f"{value:.4g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=180, help="seconds per CLI case")
    parser.add_argument("--cli-only", action="store_true", help="skip the in-process loops")
    args = parser.parse_args(argv)
    import os

    import jax

    # This process only looks at the GPU: leave its memory to the runs (they start after).
    preallocate = os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    results = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
               "device_kind": jax.devices()[0].device_kind, "cases": {}}
    os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
    if preallocate is not None:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = preallocate
    print(f"jax {results['jax']}: {results['device_kind']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            try:
                results["cases"][name] = r = run_case(name, overrides, Path(tmp), args.timeout)
            except subprocess.TimeoutExpired:
                results["cases"][name] = r = {"error": f"timed out after {args.timeout} s"}
            print(f"{name}: " + (f"error: {r['error']}" if "error" in r else
                                 f"{_g(r['ms_per_step'])} ms/step, mfu {_g(r['mfu'])}, "
                                 f"GFLOP/step {_gflops(r):.3g}, "
                                 f"eval loss {r['eval_loss']:.5g}, wall {r['wall_s']:.1f} s"),
                  flush=True)
    if not args.cli_only:
        try:
            results["in_process"] = in_process(args.repeats)
        except Exception as err:  # noqa: BLE001 -- report, keep the CLI figures
            results["in_process"] = {"error": repr(err)}
        print(json.dumps(results["in_process"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
