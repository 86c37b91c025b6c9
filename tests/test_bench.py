"""The benchmark's smoke mode: it runs end to end and writes every figure (no speed asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_benchmark_writes_the_results_schema(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner.bench", "--quick"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench/results.json").read_text())
    assert {"machine", "linear_fit", "arrays", "cnn", "overheads", "compiles",
            "sweeps"} <= set(results)
    assert results["machine"]["versions"]["jax"]
    for key in ("reference_steps_per_s", "runner_steps_per_s", "runner_over_reference"):
        assert results["linear_fit"][key] > 0
    for key in ("reference_steps_per_s", "runner_steps_per_s", "runner_over_reference"):
        assert results["arrays"][key] > 0  # scikit-learn comes with the test extra
    for key in ("reference_ms", "runner_ms", "flops_per_step", "runner_gflops",
                "matmul_gflops"):
        assert results["cnn"][key] > 0
    for task in ("linear_fit", "cnn_random_images"):
        assert results["overheads"][task]["log_and_checkpoint_s_per_1000_steps"] > 0
    assert results["overheads"]["process"]["default_run_over_import"] > 0
    assert results["compiles"] == {"per_run": 1, "per_sweep": 1, "sweep_jobs": 3}
    sweeps = results["sweeps"]
    assert sweeps["fused_goal_over_single"] == 1.4
    assert {n: c["jobs"] for n, c in sweeps["cases"].items()} == {
        "linear_fit": 2, "digits": 2, "cnn": 2}  # --quick: 2 jobs each
    for case in sweeps["cases"].values():  # one run, the basic sweep, the fused sweep
        for key in ("single_run_s", "basic_sweep_s", "fused_sweep_s", "basic_over_single",
                    "fused_over_single", "fused_over_basic"):
            assert case[key] > 0
        assert isinstance(case["fused_not_slower"], bool)  # its rule: test_sweep_ratios_...
    assert "linear_fit: runner / reference" in proc.stdout
    assert "digits 2-job sweep / one run: fused" in proc.stdout
    # linear_fit ran in a process with the task config's XLA flag, as `python -m runner` runs
    assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false"
            in results["linear_fit"]["xla_flags"].split())


def test_gpu_check_reads_step_time_back_from_a_run(tmp_path):
    """`python -m runner.bench.gpu_check`'s reading of one CLI run (here on the CPU: same path)."""
    from runner.bench.gpu_check import run_case

    case = run_case("linear fit (cpu)", ["trainer.steps=40", "trainer.log_every=10",
                                         "trainer.eval_every=20", "trainer.checkpoint_every=20",
                                         "trainer.progress_bar=false"], tmp_path, 120,
                    device="cpu")
    # 40 steps at that pace fit in the process's wall time (start-up and compilation besides);
    # the arithmetic is checked on known figures in test_gpu_check_figures_of_known_events.
    assert case["steps_per_s"] > 0 and 0 < 40 * case["ms_per_step"] / 1e3 < case["wall_s"]
    assert case["mfu"] is None and case["devices"] == ["cpu:0"]  # no known CPU peak
    assert case["placement"]["platform"] == "cpu" and case["eval_loss"] > 0


# Median seconds of each arm of the sweeps, as if measured: (case, arm) -> seconds.
SWEEP_TIMES = {("linear_fit", "single"): 2.0, ("linear_fit", "basic"): 6.0,
               ("linear_fit", "fused"): 2.8, ("digits", "single"): 1.0,
               ("digits", "basic"): 4.0, ("digits", "fused"): 4.0, ("cnn", "single"): 3.0,
               ("cnn", "basic"): 4.0, ("cnn", "fused"): 5.0}


def test_sweep_ratios_of_known_times(monkeypatch, tmp_path):
    """The sweeps' ratios and verdicts from known median times, worked by hand."""
    from runner.bench import process as bench_process

    cases = bench_process.sweep_cases(str(tmp_path), quick=False)
    assert [(name, len(c["lrs"])) for name, c in cases.items()] == [
        ("linear_fit", 8), ("digits", 4), ("cnn", 2)]
    assert "task=arrays" in cases["digits"]["overrides"]

    def process(tmp, runs, *overrides, lrs=None, fused=False):  # no process: its known time
        def call():
            raise AssertionError("median_times is faked: nothing runs")
        case = next(n for n, c in cases.items() if list(overrides) == c["overrides"])
        call.key = (case, "single" if lrs is None else "fused" if fused else "basic")
        return call

    monkeypatch.setattr(bench_process, "_process", process)
    monkeypatch.setattr(bench_process, "median_times", lambda fns, repeats, warmup=False: {
        name: SWEEP_TIMES[fn.key] for name, fn in fns.items()})
    monkeypatch.setattr(bench_process, "sweep_cases", lambda tmp, quick: cases)
    sweeps = bench_process.bench_sweeps(5)
    assert (sweeps["rounds"], sweeps["fused_goal_over_single"]) == (3, 1.4)
    linear = sweeps["cases"]["linear_fit"]  # fused 2.8 s against one run's 2 s: 1.4x, the goal
    assert {k: v for k, v in linear.items() if k != "overrides"} == {
        "jobs": 8, "single_run_s": 2.0, "basic_sweep_s": 6.0, "fused_sweep_s": 2.8,
        "basic_over_single": 3.0, "fused_over_single": pytest.approx(1.4),
        "fused_over_basic": pytest.approx(2.8 / 6), "fused_not_slower": True}
    assert sweeps["cases"]["digits"]["fused_not_slower"] is True  # as fast: not slower
    cnn = sweeps["cases"]["cnn"]
    assert (cnn["fused_over_basic"], cnn["fused_not_slower"]) == (1.25, False)
    assert sweeps["fused_goal_met"] is True and sweeps["fused_never_slower"] is False
    monkeypatch.setitem(SWEEP_TIMES, ("linear_fit", "fused"), 2.9)
    monkeypatch.setitem(SWEEP_TIMES, ("cnn", "fused"), 4.0)
    sweeps = bench_process.bench_sweeps(5)
    assert sweeps["fused_goal_met"] is False and sweeps["fused_never_slower"] is True


def test_gpu_check_figures_of_known_events(tmp_path, monkeypatch):
    """``run_case``'s figures from a run dir of known TensorBoard events, worked by hand:
    the medians (not the means) of steps/s (100, 500, 250: 250, so 4 ms a step) and of MFU."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from runner.bench import gpu_check

    def fake_run(cmd, **kwargs):  # the run a `python -m runner` process would leave
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        writer = EventFileWriter(str(run_dir / "tb"))
        for step, rate, mfu in ((10, 100.0, 0.125), (20, 500.0, 0.5), (30, 250.0, 0.25)):
            writer.add_event(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag="perf/steps_per_sec", simple_value=rate),
                summary_pb2.Summary.Value(tag="perf/mfu", simple_value=mfu)])))
        writer.close()
        (run_dir / "metrics.json").write_text(json.dumps({"eval": {"loss": 0.5}}))
        (run_dir / "manifest.json").write_text(json.dumps(
            {"devices": ["gpu:0"], "placement": {"platform": "gpu"}}))
        return subprocess.CompletedProcess(cmd, 0, "done", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    case = gpu_check.run_case("known (events)", ["trainer.steps=30"], tmp_path, 60)
    assert (case["steps_per_s"], case["ms_per_step"], case["mfu"]) == (250.0, 4.0, 0.25)
    assert (case["eval_loss"], case["devices"], case["placement"]) == (
        0.5, ["gpu:0"], {"platform": "gpu"})
    assert case["overrides"] == ["trainer.steps=30"] and case["wall_s"] >= 0
