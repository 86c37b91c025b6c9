"""runner's Optuna search (``hydra/sweeper=search``, ``runner.run.search``) against the real
Optuna: the override grammar to distributions, seeded searches, pruning at an eval in each
launcher, a study that survives a SIGKILL, one-line errors, and optuna-dashboard reading it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import free_port, group_options, run_cli
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydra_plugins.runner_search.space import distributions, overrides
from runner.io.checkpoint import list_checkpoints
from runner.run.summary import summarize

# Two trials of 20 steps, an eval every 10. With the sampler's seed 0, trial 0 draws lr=0.008
# (eval/loss ~1.0 at step 10) and trial 1 lr=1e-5 (~5.9: it has barely moved).
SEARCH = ["-m", "hparams_search=linear_fit_optuna", "hydra.sweeper.n_trials=2",
          "hydra.sweeper.params={optimizer.lr:'choice(1e-5,0.008)',optimizer.b1:'0.9',"
          "model.features:'[64]'}",
          "trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=10",
          "trainer.checkpoint_every=10", "trainer.progress_bar=false"]
# Prunes a trial whose eval/loss is above 3 (trial 1's at step 10).
PRUNE = ["hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
         "+hydra.sweeper.pruner.upper=3.0"]


def study_of(sweep_dir: Path, name: str = "linear_fit") -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def summary_rows(sweep_dir: Path):
    import csv

    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error: ")][-1]


def parse(*args: str):
    return distributions(OverridesParser.create().parse_overrides(list(args)))


def test_the_override_grammar_maps_to_optuna_distributions():
    space, fixed = parse("a=interval(1e-4,1e-1)", "b=tag(log, interval(1e-4, 1e-1))",
                         "c=int(interval(1,10))", "d=tag(log, int(interval(1,64)))",
                         "e=choice([64],[128])", "f=range(1,9,2)", "g=x,y",
                         "h=range(0.1,0.3,0.1)", "i=shuffle(range(1,4))", "j=5",
                         "k=choice(true,false)", "l=shuffle(a,b,c,d,e)")
    assert space == {
        "a": FloatDistribution(1e-4, 1e-1), "b": FloatDistribution(1e-4, 1e-1, log=True),
        "c": IntDistribution(1, 10), "d": IntDistribution(1, 64, log=True),
        "e": CategoricalDistribution(["[64]", "[128]"]),
        "f": IntDistribution(1, 7, step=2),  # Hydra's range leaves its stop out
        "g": CategoricalDistribution(["x", "y"]),
        "h": CategoricalDistribution([0.1, 0.2]),
        "i": IntDistribution(1, 3),  # Optuna draws in its own order
        "k": CategoricalDistribution([True, False]),
        "l": CategoricalDistribution(["a", "b", "c", "d", "e"])}  # the same on a rerun
    assert fixed == {"j": "5"}
    assert overrides({"e": "[64]", "a": 0.001, "k": False}, fixed) == [
        "e=[64]", "a=0.001", "k=false", "j=5"]


@pytest.mark.parametrize("option", group_options("hparams_search"))
def test_every_hparams_search_option_is_runners_search_over_a_parsed_space(option):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="runner.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"hparams_search={option}"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.runner_search.search_sweeper.SearchSweeper"
    space, fixed = parse(*(f"{k}={v}" for k, v in sweeper.params.items()))
    assert space and not fixed and sweeper.storage is None and sweeper.sampler.seed == 0


def test_no_pruner_given_is_optunas_nop_pruner_not_its_median_default():
    from runner.run.search import build_pruner

    assert isinstance(build_pruner({"_target_": None}), optuna.pruners.NopPruner)
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)
    assert isinstance(build_pruner({"_target_": "optuna.pruners.ThresholdPruner", "upper": 1}),
                      optuna.pruners.ThresholdPruner)


def test_the_pareto_front_is_marked_in_the_summary(tmp_path):
    for job, (loss, acc) in enumerate([(1.0, 0.5), (2.0, 0.9), (3.0, 0.4), (1.0, 0.6)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text("[]\n")
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(
            {"status": "completed", "eval": {"loss": loss, "accuracy": acc}}))
    rows = summarize(tmp_path, [("eval/loss", "minimize"), ("eval/accuracy", "maximize")])
    assert [r["best"] for r in rows] == ["", "*", "", "*"]
    rows = summarize(tmp_path, [("eval/accuracy", "maximize")])
    assert [r["best"] for r in rows] == ["", "*", "", ""]


@pytest.mark.slow
def test_a_pruned_trial_stops_at_its_eval_and_the_study_says_so(tmp_path):
    sweep = tmp_path / "s"
    proc = run_cli([*SEARCH, *PRUNE, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert "step 10: pruned (ThresholdPruner, eval/loss=5.9" in proc.stdout + proc.stderr
    done, pruned = metrics(sweep / "0"), metrics(sweep / "1")
    assert (done["status"], done["steps"]) == ("completed", 20)
    assert (pruned["status"], pruned["pruned_at"], pruned["steps"]) == ("pruned", 10, 10)
    # its checkpoint and TensorBoard end at the prune step; its HParams row is written
    assert [s for s, _ in list_checkpoints(sweep / "1" / "checkpoints")] == [10]
    tb = EventAccumulator(str(sweep / "1" / "tb")).Reload()
    assert [e.step for e in tb.Scalars("eval/loss")] == [10]
    assert max(e.step for e in tb.Scalars("train/loss")) == 10
    assert "_hparams_/session_start_info" in tb.PluginTagToContent("hparams")
    # Optuna: trial 1 PRUNED with its intermediate value, trial 0 COMPLETE with its final one
    trials = study_of(sweep).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED]
    assert trials[0].intermediate_values == {10: pytest.approx(done_eval_at(sweep / "0", 10)),
                                             20: pytest.approx(done["eval"]["loss"])}
    assert trials[0].value == pytest.approx(done["eval"]["loss"])
    assert trials[1].intermediate_values == {10: pytest.approx(pruned["eval"]["loss"])}
    assert trials[1].params == {"optimizer.lr": 1e-5}
    rows = summary_rows(sweep)
    assert [(r["status"], r["pruned_at"], r["best"]) for r in rows] == [
        ("completed", "", "*"), ("pruned", "10", "")]
    assert "pruned@10" in proc.stdout
    # resume= of the pruned run: finished, nothing touched
    again = run_cli([f"resume={sweep / '1'}"], cwd=tmp_path)
    assert f"{sweep / '1'}: already complete: its search pruned it at step 10" in again.stdout
    # the same search with another direction into its dir: refused, the study as it was
    journal = (sweep / "optuna.journal").read_bytes()
    refused = run_cli([*SEARCH, *PRUNE, "hydra.sweeper.direction=maximize",
                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert refused.returncode == 1
    assert error_line(refused.stderr) == (
        f"error: hydra.sweep.dir={sweep} holds a search of study linear_fit with other "
        f"hydra.sweeper.direction; rerun it as it was, or give this one another "
        f"hydra.sweep.dir")
    assert (sweep / "optuna.journal").read_bytes() == journal


def done_eval_at(run_dir: Path, step: int) -> float:
    tb = EventAccumulator(str(run_dir / "tb")).Reload()
    return {e.step: e.value for e in tb.Scalars("eval/loss")}[step]


@pytest.mark.slow
def test_a_seeded_search_is_repeatable_and_reports_from_joblib_jobs(tmp_path):
    """The sampler without a seed of its own, seeded by hydra.sweeper.seed: two searches draw
    the same trials. The second runs its jobs in joblib's processes, which report to the
    study and are pruned there themselves."""
    space = ["hydra.sweeper.params={optimizer.lr:'tag(log, interval(1e-5, 1e-2))',"
             "optimizer.b1:'interval(0.8,0.99)',model.features:'[64]'}",
             "hydra.sweeper.sampler.seed=null", "hydra.sweeper.seed=3"]
    run_cli([*SEARCH, *space, f"hydra.sweep.dir={tmp_path / 'a'}"], cwd=tmp_path)
    run_cli([*SEARCH, *space, "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
             "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
             "+hydra.sweeper.pruner.lower=1e9",  # every trial pruned at its first eval
             f"hydra.sweep.dir={tmp_path / 'b'}"], cwd=tmp_path)
    a, b = study_of(tmp_path / "a").trials, study_of(tmp_path / "b").trials
    assert [t.params for t in a] == [t.params for t in b]
    assert a[0].params != a[1].params
    assert [t.state for t in b] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in b:
        m = metrics(tmp_path / "b" / str(trial.number))
        assert (m["status"], m["pruned_at"]) == ("pruned", 10)
        assert trial.intermediate_values == {10: pytest.approx(m["eval"]["loss"])}
        assert m["overrides"][0] == f"optimizer.lr={trial.params['optimizer.lr']}"


@pytest.mark.slow
def test_a_fused_member_pruned_stops_alone(tmp_path):
    sweep = tmp_path / "s"
    proc = run_cli([*SEARCH, *PRUNE, "hydra/launcher=fused", "hydra.sweeper.n_jobs=2",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert "fusing jobs 0, 1 into one group (2 members" in proc.stdout + proc.stderr
    done, pruned = metrics(sweep / "0"), metrics(sweep / "1")
    assert (done["status"], done["steps"]) == ("completed", 20)
    assert (pruned["status"], pruned["pruned_at"]) == ("pruned", 10)
    assert [s for s, _ in list_checkpoints(sweep / "1" / "checkpoints")] == [10]
    assert [t.state for t in study_of(sweep).trials] == [optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED]


@pytest.mark.slow
def test_a_killed_search_resumes_its_running_trial_to_the_same_bits(tmp_path):
    """SIGKILL mid-trial, rerun: the trial left running goes on from its own checkpoint in its
    own dir, and ends byte-identical to the same trial of a search never interrupted."""
    long = ["hydra.sweeper.n_trials=1", "trainer.steps=20000", "trainer.log_every=2000",
            "trainer.eval_every=2000", "trainer.checkpoint_every=2000"]
    args = [sys.executable, "-m", "runner", *SEARCH, *long]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([*args, f"hydra.sweep.dir={tmp_path / 'killed'}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        first = tmp_path / "killed" / "0" / "checkpoints" / "step_2000.msgpack"
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGSTOP)
        left = [s for s, _ in list_checkpoints(tmp_path / "killed" / "0" / "checkpoints")]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert left and max(left) < 20000, left  # killed mid-trial
    assert study_of(tmp_path / "killed").trials[0].state == optuna.trial.TrialState.RUNNING

    rerun = run_cli([*args[3:], f"hydra.sweep.dir={tmp_path / 'killed'}"], cwd=tmp_path)
    assert "trials 0 were running when the search stopped" in rerun.stdout + rerun.stderr
    run_cli([*args[3:], f"hydra.sweep.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    resumed = metrics(tmp_path / "killed" / "0")
    assert resumed["status"] == "completed" and resumed["resumed_from"] == max(left)
    assert ((tmp_path / "killed/0/checkpoints/step_20000.msgpack").read_bytes()
            == (tmp_path / "ref/0/checkpoints/step_20000.msgpack").read_bytes())
    trials = study_of(tmp_path / "killed").trials  # the total stays n_trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert trials[0].value == pytest.approx(resumed["eval"]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["hydra.sweeper.pruner._target_=optuna.pruners.Nope"],
     "hydra.sweeper.pruner._target_=optuna.pruners.Nope: no such class; name one of "
     "optuna.pruners (e.g. optuna.pruners.MedianPruner)"),
    (["hydra.sweeper.sampler._target_=optuna.samplers.Nope"],
     "hydra.sweeper.sampler._target_=optuna.samplers.Nope: no such class; name one of "
     "optuna.samplers (e.g. optuna.samplers.TPESampler)"),
    (["optimizer.lrr=interval(0.1,0.2)"],
     "hydra.sweeper.params: optimizer.lrr: unknown key; valid keys: lr, schedule, "
     "warmup_steps, clip_norm, accumulate_steps, decay_exclude, b1, b2, eps, eps_root, "
     "mu_dtype, nesterov"),
    (["hydra.sweeper.objective=[eval/loss,eval/mse]", "hydra.sweeper.direction=minimize"],
     "hydra.sweeper.direction=[minimize]: 1 direction(s) for 2 objective(s) (eval/loss, "
     "eval/mse); give one each"),
    (["hydra.sweeper.objective=[eval/loss,eval/mse]",
      "hydra.sweeper.direction=[minimize,minimize]", *PRUNE],
     "hydra.sweeper.pruner: Optuna prunes single-objective searches only; this one has 2 "
     "objectives (eval/loss, eval/mse)"),
    (["hydra.sweeper.storage={tmp}/a_file/study.journal"],
     "hydra.sweeper.storage={tmp}/a_file/study.journal: cannot open the study there: "
     "{tmp}/a_file/study.journal: [Errno 20] Not a directory"),
])
def test_bad_search_config_is_one_line_before_anything_runs(tmp_path, args, message):
    (tmp_path / "a_file").write_text("")
    proc = run_cli([*SEARCH, *(a.format(tmp=tmp_path) for a in args),
                    f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert error_line(proc.stderr) == "error: " + message.format(tmp=tmp_path)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock"]


@pytest.mark.slow
def test_an_objective_the_task_does_not_log_stops_the_search_at_its_first_eval(tmp_path):
    proc = run_cli([*SEARCH, "hydra.sweeper.objective=eval/accuracy",
                    "hydra.sweeper.direction=maximize", f"hydra.sweep.dir={tmp_path}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1
    line = ("hydra.sweeper.objective=eval/accuracy: the task logs no such metric; it logs "
            "eval/loss, eval/mse")
    assert error_line(proc.stderr) == f"error: {line}"
    assert metrics(tmp_path / "0")["reason"] == line and not (tmp_path / "1").exists()
    assert [t.state for t in study_of(tmp_path).trials] == [optuna.trial.TrialState.FAIL]


@pytest.mark.slow
def test_a_multi_objective_search_reports_its_pareto_front(tmp_path):
    run_cli([*SEARCH, "hydra.sweeper.objective=[eval/loss,eval/mse]",
             "hydra.sweeper.direction=[minimize,maximize]", f"hydra.sweep.dir={tmp_path}"],
            cwd=tmp_path)
    study = study_of(tmp_path)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    # loss and mse are equal in linear_fit: each trial is on the front of (min, max)
    assert [r["best"] for r in summary_rows(tmp_path)] == ["*", "*"]
    assert [t.values for t in study.trials] == [
        [metrics(tmp_path / str(i))["eval"]["loss"]] * 2 for i in (0, 1)]


@pytest.mark.slow
def test_optuna_dashboard_reads_the_study_from_the_sweep_dir(tmp_path):
    run_cli([*SEARCH, *PRUNE, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).with_name("optuna-dashboard")),
         str(tmp_path / "optuna.journal"), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", dashboard)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["linear_fit"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}",
                          dashboard)
    finally:
        dashboard.kill()
        dashboard.wait()
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    assert [t["state"] for t in trials] == ["Complete", "Pruned"]
    assert [[v["step"] for v in t["intermediate_values"]] for t in trials] == [[10, 20], [10]]
    assert trials[1]["intermediate_values"][0]["value"] == pytest.approx(
        metrics(tmp_path / "1")["eval"]["loss"])


def get_json(url: str, server: subprocess.Popen) -> dict:
    """``url``'s JSON, once the server answers (it is still starting meanwhile)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            assert server.poll() is None, "optuna-dashboard exited"
            assert time.monotonic() < deadline, "optuna-dashboard did not answer"
            time.sleep(0.2)
