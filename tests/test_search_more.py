"""runner's Optuna search with ``optuna.samplers.GridSampler``: the grid built from the search
space, every point tried once, the search ended at the grid's size; a grid refuses an
interval in one line."""

import itertools

import optuna
import pytest
from conftest import run_cli
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.runner_search import grid
from hydra_plugins.runner_search.space import distributions
from runner.config.errors import RunnerError
from test_search import error_line, metrics, study_of, summary_rows

# A 2 x 2 grid (lr by seed) of 2-step trials.
GRID = ["-m", "hparams_search=linear_fit_optuna",
        "hydra.sweeper.sampler._target_=optuna.samplers.GridSampler",
        "hydra.sweeper.params={optimizer.lr:'choice(0.001,0.01)',optimizer.b1:'0.9',"
        "model.features:'[64]'}", "seed=range(0,2)",
        "trainer.steps=2", "trainer.log_every=2", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.progress_bar=false"]


def grid_of(*args: str):
    parsed = OverridesParser.create().parse_overrides(list(args))
    return grid.values(parsed, distributions(parsed)[0])


def test_a_grid_lists_each_keys_values_and_refuses_an_interval():
    assert grid_of("a=choice(0.1,0.2)", "b=range(1,9,3)", "c=x,y", "d=5",
                   "e=range(0.5,0.7,0.1)") == {
        "a": [0.1, 0.2], "b": [1, 4, 7], "c": ["x", "y"], "e": [0.5, 0.6]}
    assert grid_of("a=interval(1,2)", "a=1,2") == {"a": [1, 2]}  # the last one given
    with pytest.raises(RunnerError, match=r"^optimizer.lr=tag\(log, interval\(0.1, 1.0\)\): "
                       r"optuna.samplers.GridSampler needs a key's values listed"):
        grid_of("optimizer.lr=tag(log, interval(0.1, 1.0))")
    with pytest.raises(RunnerError, match=r"^seed=int\(interval\(0, 3\)\): "):
        grid_of("seed=int(interval(0, 3))")


def test_the_search_ends_at_the_grids_size():
    sampler = grid.build({"_target_": grid.GRID, "seed": 0},
                         *parsed_space("a=choice(1,2,3)", "b=x,y"))
    assert isinstance(sampler, optuna.samplers.GridSampler)
    assert (grid.n_trials(sampler, None), grid.n_trials(sampler, 4),
            grid.n_trials(sampler, 100)) == (6, 4, 6)
    assert grid.n_trials(optuna.samplers.TPESampler(), 100) == 100
    with pytest.raises(RunnerError, match=r"^hydra.sweeper.n_trials=null: only a GridSampler"):
        grid.n_trials(optuna.samplers.TPESampler(), None)


def parsed_space(*args: str):
    parsed = OverridesParser.create().parse_overrides(list(args))
    return parsed, distributions(parsed)[0]


@pytest.mark.slow
def test_a_grid_search_tries_every_point_once_and_stops_there(tmp_path):
    """n_trials larger than the grid: its 4 points, each once (2 jobs launched together),
    and the search ends with no error from Optuna's stop; a rerun with n_trials=null asks no
    more."""
    sweep = tmp_path / "s"
    run_cli([*GRID, "hydra.sweeper.n_trials=10", "hydra.sweeper.n_jobs=2",
             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    trials = study_of(sweep).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted((t.params["optimizer.lr"], t.params["seed"]) for t in trials) == sorted(
        itertools.product([0.001, 0.01], [0, 1]))
    for trial in trials:
        m = metrics(sweep / str(trial.number))
        assert m["status"] == "completed" and trial.value == pytest.approx(m["eval"]["loss"])
        assert m["overrides"][:2] == [f"optimizer.lr={trial.params['optimizer.lr']}",
                                      f"seed={trial.params['seed']}"]
    assert len(summary_rows(sweep)) == 4
    again = run_cli([*GRID, "hydra.sweeper.n_trials=null", f"hydra.sweep.dir={sweep}"],
                    cwd=tmp_path)
    assert "Launching" not in again.stdout + again.stderr
    assert len(study_of(sweep).trials) == 4


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["optimizer.lr=interval(0.001,0.01)"],
     "optimizer.lr=interval(0.001,0.01): optuna.samplers.GridSampler needs a key's values "
     "listed: choice(...), range(...) or a,b,c, not an interval"),
    (["+hydra.sweeper.sampler.search_space={seed:[0,1]}"],
     "hydra.sweeper.sampler.search_space: the grid is built from hydra.sweeper.params; "
     "leave it out"),
])
def test_a_grid_search_refuses_what_it_cannot_list_in_one_line(tmp_path, args, message):
    proc = run_cli([*GRID, *args, f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1
    assert error_line(proc.stderr) == "error: " + message
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock"]
