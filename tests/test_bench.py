"""The benchmark's smoke mode: it runs end to end and writes every figure (no speed asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config, start_process


# `python -m runner.bench --quick` as two `--only` processes at once (2 cores), sharing their
# results among the tests below: the in-process sections and the sweeps, then the feed and the
# searches, each writing its own results file.
QUICK_PARTS = (("linear_fit", "arrays", "cnn", "overheads", "compiles", "sweeps"),
               ("feed", "search"))


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """(results of every section, the console tables) of the quick bench's parts."""
    tmp = tmp_path_factory.mktemp("bench")
    procs = []
    try:
        for i, part in enumerate(QUICK_PARTS):  # files, not pipes: neither waits on the other
            with open(tmp / f"{i}.out", "w") as out, open(tmp / f"{i}.err", "w") as err:
                procs.append(start_process(
                    [sys.executable, "-m", "runner.bench", "--quick", "--only", *part, "--out",
                     f"bench/{i}.json"], cwd=tmp, stdout=out, stderr=err, text=True))
        for proc in procs:
            proc.wait(timeout=900)
    finally:
        for proc in procs:  # a part that failed or hung is ended here, not left running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp / f"{i}.err").read_text()[-3000:]
    results = {}
    for i in range(len(QUICK_PARTS)):
        results.update(json.loads((tmp / f"bench/{i}.json").read_text()))
    return results, "".join((tmp / f"{i}.out").read_text() for i in range(len(QUICK_PARTS)))


@pytest.mark.slow
def test_quick_benchmark_writes_the_results_schema(quick_bench):
    results, stdout = quick_bench
    assert {"machine", "linear_fit", "arrays", "cnn", "overheads", "compiles",
            "sweeps", "feed", "search"} <= set(results)
    assert results["machine"]["versions"]["jax"] and results["quick"] is True
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
    assert "linear_fit: runner / reference" in stdout
    # linear_fit ran in a process with the task config's XLA flag, as `python -m runner` runs
    assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false"
            in results["linear_fit"]["xla_flags"].split())


@pytest.mark.slow
def test_quick_benchmark_sweeps_feed_and_searches(quick_bench):
    results, stdout = quick_bench
    sweeps = results["sweeps"]
    assert sweeps["fused_goal_over_single"] == 1.4
    # --quick: linear_fit's 2-job sweep alone (the other cases: test_every_sweep_case_composes)
    assert {n: c["jobs"] for n, c in sweeps["cases"].items()} == {"linear_fit": 2}
    for case in sweeps["cases"].values():  # one run, the basic sweep, the fused sweep
        for key in ("single_run_s", "basic_sweep_s", "fused_sweep_s", "basic_over_single",
                    "fused_over_single", "fused_over_basic"):
            assert case[key] > 0
        assert isinstance(case["fused_not_slower"], bool)  # its rule: test_sweep_ratios_...
    assert "linear_fit 2-job sweep / one run: fused" in stdout
    feed = results["feed"]  # every arm ran: each figure is read from its runs
    for name in ("digits", "big"):
        assert feed["steps_per_s"][name]["host_over_device"] > 0
    assert feed["cold"]["run_cold_steps_per_s"] > 0 and feed["memory"]["host_peak_mib"] > 0
    assert feed["startup"]["big_resume_s"] > 0 and "feed host >= 0.9x device" in stdout
    search = results["search"]["searches"]  # --quick: 2 short trials, no baseline venv
    assert search["hydra_optuna"] == {"skipped": "--quick: no baseline venv"}
    assert {s["trials"] for n, s in search.items() if n != "hydra_optuna"} == {2}
    assert {s["returncode"] for n, s in search.items() if n != "hydra_optuna"} == {0}
    assert "search fused pruned <= basic pruned, wall" in stdout


def test_every_sweep_case_composes(tmp_path):
    """The sweeps' cases of the full bench (the quick one runs linear_fit's alone): each job's
    overrides are a config ``python -m runner`` composes (a renamed key fails here)."""
    from runner.bench.process import sweep_cases

    cases = sweep_cases(str(tmp_path), quick=False)
    assert list(cases) == ["linear_fit", "digits", "cnn"]
    for name, case in cases.items():
        cfg = compose_config([*case["overrides"], f"optimizer.lr={case['lrs'][-1]}"])
        assert cfg.task._target_, name


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

    def process(tmp, runs, *overrides, lrs=None, fused=False, flags=None):  # its known time
        assert flags == bench_process.NO_CACHE  # the full bench: each process compiles anew

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


def trials_of(*rows):
    """Trials as ``runner.bench.search.read_trials`` reads them: (job, status, steps, value,
    end_s), in the order they ended."""
    return [dict(zip(("job", "status", "steps", "value", "end_s"), row)) for row in rows]


def search_record(wall_s, *rows, returncode=0):
    return {"wall_s": wall_s, "returncode": returncode, "load_before": 1.0, "load_after": 1.5,
            "trials": trials_of(*rows)}


def known_searches():
    """Four trials per search, as if measured (worked by hand in test_search_figures_...)."""
    return {
        # best 0.98: the target is 0.98 * 0.99 = 0.9702; reached at job 2 (30 s, 6,000 steps)
        "unpruned": search_record(50.0, (0, "completed", 2000, 0.90, 10.0),
                                  (1, "completed", 2000, 0.97, 20.0),
                                  (2, "completed", 2000, 0.98, 30.0),
                                  (3, "completed", 2000, 0.95, 40.0)),
        # job 1's 0.99 is a pruned trial's last eval, not a final value: it reaches nothing
        "hyperband": search_record(20.0, (0, "completed", 2000, 0.90, 10.0),
                                   (1, "pruned", 200, 0.99, 11.0),
                                   (2, "completed", 2000, 0.975, 18.0),
                                   (3, "pruned", 400, 0.50, 19.0)),
        "halving": search_record(12.0, (0, "completed", 2000, 0.90, 10.0),
                                 (1, "pruned", 200, 0.10, 10.5),
                                 (2, "pruned", 200, 0.10, 11.0),
                                 (3, "pruned", 200, 0.10, 11.5)),
        "fused_hyperband": search_record(19.0, (0, "completed", 2000, 0.90, 9.0),
                                         (1, "pruned", 200, 0.99, 9.0),
                                         (2, "completed", 2000, 0.975, 15.0),
                                         (3, "pruned", 400, 0.50, 15.0)),
        "hydra_optuna": search_record(60.0, (0, "completed", 2000, 0.90, 12.0),
                                      (1, "failed", 300, None, 14.0),
                                      (2, "completed", 2000, 0.99, 40.0),
                                      (3, "completed", 2000, 0.97, 55.0), returncode=1)}


def test_search_figures_of_known_trials():
    """The search section's figures, ratios and verdicts from known trials, worked by hand."""
    from runner.bench.search import STEPS_GOAL, WALL_GOAL, summarize

    result = summarize(known_searches(), trials=4, steps=2000, eval_every=200)
    assert (STEPS_GOAL, WALL_GOAL) == (0.4, 0.5)
    assert result["target"] == pytest.approx(0.9702)
    s = result["searches"]
    assert {k: s["unpruned"][k] for k in ("best", "train_steps", "wall_s", "to_target_s",
                                          "to_target_steps", "to_target_trial")} == {
        "best": 0.98, "train_steps": 8000, "wall_s": 50.0, "to_target_s": 30.0,
        "to_target_steps": 6000, "to_target_trial": 2}
    assert (s["unpruned"]["to_best_s"], s["unpruned"]["to_best_steps"]) == (30.0, 6000)
    hyperband = s["hyperband"]
    assert (hyperband["best"], hyperband["completed"], hyperband["pruned"]) == (0.975, 2, 2)
    # to the target: job 2 at 18 s, after jobs 0, 1 and 2: 2,000 + 200 + 2,000 steps
    assert (hyperband["to_target_s"], hyperband["to_target_steps"]) == (18.0, 4200)
    assert hyperband["train_steps"] == 4600
    assert hyperband["steps_over_unpruned"] == pytest.approx(4600 / 8000)
    assert hyperband["wall_over_unpruned"] == pytest.approx(0.4)
    assert hyperband["to_target_steps_over_unpruned"] == pytest.approx(4200 / 8000)  # > 0.4
    assert hyperband["to_target_wall_over_unpruned"] == pytest.approx(18 / 50)  # <= 0.5
    assert hyperband["to_target_over_unpruned_to_target"] == pytest.approx(18 / 30)
    assert hyperband["to_best_s"] is None and hyperband["to_best_over_unpruned_to_best"] is None
    assert s["halving"]["to_target_s"] is None and s["halving"]["to_target_steps"] is None
    assert result["pruned_goals_met"] == {"hyperband": {"steps": False, "wall": True},
                                          "halving": {"steps": False, "wall": False}}
    baseline = s["hydra_optuna"]
    assert (baseline["best"], baseline["failed"], baseline["train_steps"]) == (0.99, 1, 6300)
    assert (baseline["to_target_s"], baseline["to_target_steps"]) == (40.0, 4300)
    assert baseline["returncode"] == 1
    assert (baseline["to_best_s"], baseline["to_best_steps"], baseline["to_best_trial"]) == (
        40.0, 4300, 2)  # its 0.99 is past the unpruned search's best
    assert baseline["to_best_over_unpruned_to_best"] == pytest.approx(40 / 30)
    assert result["fused_over_basic"] == pytest.approx(19 / 20)
    assert result["fused_not_slower"] is True


def test_search_fused_verdict_needs_every_trial():
    """A fused search that stopped early is not counted faster, whatever its wall time."""
    from runner.bench.search import summarize

    searches = known_searches()
    searches["fused_hyperband"]["trials"] = searches["fused_hyperband"]["trials"][:2]
    result = summarize(searches, trials=4, steps=2000, eval_every=200)
    assert result["fused_over_basic"] == pytest.approx(19 / 20)
    assert result["fused_not_slower"] is False


def test_search_configs_and_the_sweeper_that_ran(tmp_path):
    """runner's and Hydra's search configs hold the same space, trials and seed; the bench
    reads the sweeper a search ran from multirun.yaml, or from its first job's hydra.yaml."""
    from omegaconf import OmegaConf

    from runner.bench.search import HYDRA_SWEEPER, SPACE, sweeper_target, write_configs

    write_configs(tmp_path / "conf", trials=24, steps=2000, eval_every=200)
    ours, hydras = (OmegaConf.load(tmp_path / "conf" / "hparams_search" / f"{n}.yaml")
                    for n in ("bench_search", "bench_optuna"))
    assert ours.defaults[-1] == {"override /hydra/sweeper": "search"}
    assert hydras.defaults[-1] == {"override /hydra/sweeper": "optuna"}
    for cfg in (ours, hydras):
        assert dict(cfg.hydra.sweeper.params) == SPACE and cfg.hydra.sweeper.n_trials == 24
        assert cfg.hydra.sweeper.sampler.seed == 0 and cfg.trainer.steps == 2000
        assert (cfg.trainer.best_metric, cfg.trainer.best_mode) == ("accuracy", "max")
    assert hydras.hydra.sweeper.direction == "maximize"
    (tmp_path / "ours").mkdir()
    OmegaConf.save({"hydra": {"sweeper": {"_target_": "ours"}}}, tmp_path / "ours/multirun.yaml")
    (tmp_path / "hydras/0/.hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"sweeper": {"_target_": HYDRA_SWEEPER}}},
                   tmp_path / "hydras/0/.hydra/hydra.yaml")
    assert sweeper_target(tmp_path / "ours") == "ours"
    assert sweeper_target(tmp_path / "hydras") == HYDRA_SWEEPER
    assert sweeper_target(tmp_path / "none") is None
