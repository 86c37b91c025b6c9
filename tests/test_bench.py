"""The benchmark's smoke mode: it runs end to end and writes every figure (no speed asserts)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_benchmark_writes_the_results_schema(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner.bench", "--quick"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench/results.json").read_text())
    assert {"machine", "linear_fit", "arrays", "cnn", "overheads", "compiles",
            "sweep", "cnn_sweep"} <= set(results)
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
    sweep = results["sweep"]
    assert sweep["jobs"] == 2 and sweep["fused_goal_over_single"] == 1.25
    for images in ("images", "no_images"):  # one run, the basic sweep, the fused sweep
        for key in ("single_run_s", "basic_sweep_s", "fused_sweep_s", "basic_over_single",
                    "fused_over_single", "fused_over_basic", "basic_per_job_over_single",
                    "fused_per_job_over_single"):
            assert sweep[images][key] > 0
        assert sweep[images]["fused_goal_met"] == (sweep[images]["fused_over_single"] <= 1.25)
    cnn_sweep = results["cnn_sweep"]
    assert cnn_sweep["jobs"] == 2 and "task=cnn_random_images" in cnn_sweep["overrides"]
    for key in ("basic_per_job_s", "fused_per_job_s", "fused_over_basic"):
        assert cnn_sweep[key] > 0
    assert cnn_sweep["fused_not_slower"] == (cnn_sweep["fused_over_basic"] <= 1)
    assert "linear_fit: runner / reference" in proc.stdout
    assert "2-job lr sweep / one run, log_images=false: fused" in proc.stdout
    # linear_fit ran in a process with the task config's XLA flag, as `python -m runner` runs
    assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false"
            in results["linear_fit"]["xla_flags"].split())


def test_gpu_check_reads_step_time_back_from_a_run(tmp_path):
    """`python -m runner.gpu_check`'s reading of one CLI run (here on the CPU: same path)."""
    from runner.gpu_check import run_case

    case = run_case("linear fit (cpu)", ["trainer.steps=40", "trainer.log_every=10",
                                         "trainer.eval_every=20", "trainer.checkpoint_every=20",
                                         "trainer.progress_bar=false"], tmp_path, 120,
                    device="cpu")
    assert case["steps_per_s"] > 0 and case["ms_per_step"] == pytest.approx(
        1e3 / case["steps_per_s"])
    assert case["mfu"] is None and case["devices"] == ["cpu:0"]  # no known CPU peak
    assert case["placement"]["platform"] == "cpu" and case["eval_loss"] > 0
