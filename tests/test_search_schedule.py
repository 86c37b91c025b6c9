"""runner's search has no batch barrier: a trial is asked as soon as a running one ends or is
pruned. joblib's workers each take the next trial; a fused group keeps its width, a freed
slot taking the next trial in the same program, each trial's run bit-identical to the basic
launcher's."""

import json
from pathlib import Path

import jax
import numpy as np
import optuna
import pytest
from conftest import run_cli

from runner.io.checkpoint import list_checkpoints

SPACE = ("hydra.sweeper.params={optimizer.lr:'choice(1e-5,0.008)',"
         "optimizer.b1:'interval(0.8,0.99)',model.features:'[64]'}")
RANDOM = ["hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
          "hydra.sweeper.sampler.seed=0"]
# Prunes a trial whose eval/loss is above 3 at step 10 (lr=1e-5's; lr=0.008's is ~1.0)
PRUNE = ["hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
         "+hydra.sweeper.pruner.upper=3.0"]
TRAINER = ["trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=10",
           "trainer.checkpoint_every=10", "trainer.progress_bar=false"]


def study_of(sweep_dir: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name="linear_fit", storage=storage)


def search(tmp_path: Path, name: str, *args: str):
    return run_cli(["-m", "hparams_search=linear_fit_optuna", *args,
                    f"hydra.sweep.dir={tmp_path / name}"], cwd=tmp_path)


@pytest.mark.slow
def test_joblib_workers_ask_a_trial_as_soon_as_one_ends(tmp_path):
    """n_jobs=2: trial 0 trains 100,000 steps, trials 1 and 2 1,000 each. Trial 2 is asked
    when trial 1 ends, while trial 0 still trains (in batches it waited for trial 0)."""
    search(tmp_path, "s", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3",
           "hydra.sweeper.params={optimizer.lr:'0.001',optimizer.b1:'0.9',"
           "model.features:'[64]'}", "trainer.steps=choice(1000,100000)",
           "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
           "hydra.sweeper.sampler.seed=8",  # draws 100000, 1000, 1000
           "trainer.log_every=1000", "trainer.eval_every=null",
           "trainer.checkpoint_every=null", "trainer.progress_bar=false")
    long, short, next_ = study_of(tmp_path / "s").trials
    assert [t.params["trainer.steps"] for t in (long, short, next_)] == [100000, 1000, 1000]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in (long, short, next_))
    assert short.datetime_complete <= next_.datetime_start < long.datetime_complete
    for trial in (long, short, next_):
        m = json.loads((tmp_path / "s" / str(trial.number) / "metrics.json").read_text())
        assert (m["status"], m["steps"]) == ("completed", trial.params["trainer.steps"])


@pytest.fixture(scope="module")
def fused_and_basic(tmp_path_factory):
    """The same seeded search with a pruner, 5 trials: through the fused launcher, 2 slots,
    and through the basic launcher."""
    tmp_path = tmp_path_factory.mktemp("searches")
    args = [SPACE, *RANDOM, *PRUNE, *TRAINER, "hydra.sweeper.n_trials=5",
            "hydra.sweeper.n_jobs=2"]
    fused = search(tmp_path, "fused", "hydra/launcher=fused", *args)
    basic = search(tmp_path, "basic", *args)
    # Hydra's basic launcher runs a job in this process: one trial at a time, no batches
    assert "trials launched one at a time, in this process" in basic.stdout + basic.stderr
    return tmp_path, fused.stdout + fused.stderr


@pytest.mark.slow
def test_a_fused_search_keeps_its_width_in_one_group_bit_for_bit(fused_and_basic):
    tmp_path, out = fused_and_basic
    assert out.count("fusing jobs") == 1 and "fusing jobs 0, 1 into one group" in out
    for job in (2, 3, 4):
        assert f"job {job} takes job " in out
    trials = study_of(tmp_path / "fused").trials
    assert [t.params for t in trials] == [t.params for t in study_of(tmp_path / "basic").trials]
    assert [t.state for t in trials] == [t.state for t in study_of(tmp_path / "basic").trials]
    compiles = []
    for trial in trials:
        fused, basic = (tmp_path / name / str(trial.number) for name in ("fused", "basic"))
        assert {p.name for p in fused.iterdir()} >= {
            ".hydra", "runner.log", "tb", "checkpoints", "metrics.json", "manifest.json"}
        steps = [s for s, _ in list_checkpoints(basic / "checkpoints")]
        assert [s for s, _ in list_checkpoints(fused / "checkpoints")] == steps and steps
        for step in steps:
            name = f"checkpoints/step_{step}.msgpack"
            assert (fused / name).read_bytes() == (basic / name).read_bytes(), (trial, step)
        metrics = json.loads((fused / "metrics.json").read_text())
        assert metrics["status"] == json.loads((basic / "metrics.json").read_text())["status"]
        assert f"step {metrics['steps']}/20 eval/loss" in (fused / "runner.log").read_text()
        compiles.append(metrics["train_step_compiles"])
    assert compiles == [1, 1, 0, 0, 0]  # the group's one compile, counted by its first two


@pytest.mark.slow
def test_a_pruned_members_slot_takes_the_next_trial_while_the_other_trains(fused_and_basic):
    tmp_path, out = fused_and_basic
    trials = study_of(tmp_path / "fused").trials
    done, pruned, refill = trials[:3]
    assert (done.state, pruned.state) == (optuna.trial.TrialState.COMPLETE,
                                          optuna.trial.TrialState.PRUNED)
    assert "job 2 takes job 1's slot in the group (from step 0)" in out
    assert pruned.datetime_complete <= refill.datetime_start < done.datetime_complete
    assert json.loads((tmp_path / "fused" / "2" / "metrics.json").read_text())["steps"] > 0


def test_a_batched_programs_refilled_slot_trains_from_its_own_step():
    """The accelerators' program (jax.vmap over the members), forced here: slot 1 takes a
    fresh run after one dispatch; the slot then trains from that run's step 0 while slot 0
    goes on, each as the run trained alone (to float32 round-off: test_fused's RTOLs)."""
    from conftest import start
    from runner.core.spec import StepSpec
    from runner.loop.programs import FusedProgram, SingleProgram

    def begin(seed, lr):
        (task, _, optimizer), s = start(["task.batch_size=16", f"optimizer.lr={lr}"],
                                        seed=seed)
        return StepSpec(task=task, steps_per_dispatch=10), (
            s.state, s.data, s.train_rng)

    spec, first = begin(0, 1e-3)
    program = FusedProgram(spec, [first, begin(1, 1e-2)[1]], [None, None])
    alive = np.ones(2, bool)
    program.dispatch(alive)
    program.replace(1, begin(2, 3e-3)[1], None)
    program.dispatch(alive)
    program.dispatch(alive)
    states = program.host_states()
    assert [int(s.step) for s in states] == [30, 20]
    for i, (seed, lr, dispatches) in enumerate(((0, 1e-3, 3), (2, 3e-3, 2))):
        alone = SingleProgram(*begin(seed, lr))
        for _ in range(dispatches):
            alone.dispatch(np.ones(1, bool))
        for a, b in zip(jax.tree.leaves(states[i]), jax.tree.leaves(alone.host_states()[0])):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert a.shape == b.shape
            assert np.linalg.norm(a - b) <= 2e-5 * max(np.linalg.norm(b), 1e-30), i
