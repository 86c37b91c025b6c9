"""A Hydra sweeper (``hydra/sweeper=search``): an Optuna study asked and told by runner, its
trials launched as runner's sweep jobs by any launcher.

Job number is trial number, and each job's Hydra config names the study (absolute storage,
study name), so a job reports its own evals to the study and is pruned there
(``runner.run.search``); the sweeper tells the study how each trial ended from the job's value.
The study lives in the sweep dir (Optuna's journal file) with its search space in its user
attrs: rerunning the command continues it, relaunching first the trials a killed search left
running (their jobs resume from their checkpoints) and asking new ones up to ``n_trials`` in
all; a rerun with another search space is refused. Every check runs before the study is
opened or anything is written.
"""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.runner_search import grid
from hydra_plugins.runner_search import space as search_space
from hydra_plugins.runner_search.schedule import Trials, run_trials
from hydra_plugins.runner_search.study import KEYS, space_record, write_results

log = logging.getLogger(__name__)
MULTIRUN_FILE = "multirun.yaml"  # the sweep's config, as runner's and Hydra's sweepers save it
RESULTS_FILE = "optimization_results.yaml"  # the best trial, as hydra-optuna-sweeper writes it


class SearchSweeper(Sweeper):
    """runner's Optuna search (see the module doc and ``config.SearchSweeperConf``)."""

    def __init__(self, direction: Any = None, objective: Any = None,
                 study_name: Optional[str] = None, storage: Optional[str] = None,
                 n_trials: Optional[int] = 20, n_jobs: int = 2, seed: Optional[int] = None,
                 sampler: Any = None, pruner: Any = None, max_failure_rate: float = 1.0,
                 params: Optional[Dict[str, str]] = None) -> None:
        self.study_name, self.storage = study_name, storage
        self.n_trials, self.n_jobs, self.seed = n_trials, n_jobs, seed
        self.sampler_spec, self.pruner_spec = sampler, pruner
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        from runner.run.search import DEFAULT_STUDY, storage_url

        assert self.config is not None
        search = self.prepare(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        url = storage_url(self.storage, sweep_dir)
        search["name"] = self.study_name or DEFAULT_STUDY
        study = self.open_study(url, search, sweep_dir)
        # Saved once every check passed (runner's SweepSummary reads it on a rerun)
        OmegaConf.save(self.config, sweep_dir / MULTIRUN_FILE)
        log.info("study %s in %s (view: optuna-dashboard %s); sampler %s, pruner %s, %s",
                 search["name"], url, url, type(study.sampler).__name__,
                 type(study.pruner).__name__, ", ".join(
                     f"{d} {n}" for n, d in zip(search["objectives"], search["directions"])))
        # Each job finds the study in its own Hydra config (runner.run.search.TrialLink).
        search["link"] = [f"hydra.sweeper.storage={quoted(url)}",
                          f"hydra.sweeper.study_name={quoted(search['name'])}"]
        self.run(study, search)
        write_results(study, sweep_dir / RESULTS_FILE)

    def prepare(self, arguments: Sequence[str]) -> Dict[str, Any]:
        """Every check of the search's config, before anything is opened or written: its
        sampler, pruner, objectives and directions, and the space (one job composed per
        choice)."""
        from runner.config.errors import RunnerError
        from runner.run.search import build_pruner, directions, objectives

        try:
            import optuna
        except ImportError:
            raise RunnerError("hydra/sweeper=search needs Optuna: pip install "
                              "'jax-yaml-runner[search]'") from None
        for key, value, low in (("n_trials", self.n_trials, 1), ("n_jobs", self.n_jobs, 1)):
            if value is not None and value < low:  # n_trials=null: a grid's size
                raise RunnerError(f"hydra.sweeper.{key}={value}: must be >= {low}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise RunnerError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: must "
                              f"lie in [0, 1]")
        assert self.config is not None
        names = objectives(self.config.hydra.sweeper, self.config)
        ways = directions(self.config.hydra.sweeper, self.config, names)
        pruner = build_pruner(self.pruner_spec)
        if not isinstance(pruner, optuna.pruners.NopPruner) and len(names) > 1:
            raise RunnerError(f"hydra.sweeper.pruner: Optuna prunes single-objective searches "
                              f"only; this one has {len(names)} objectives ({', '.join(names)})")
        parsed = self.parse([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        space, fixed = search_space.distributions(parsed)
        self.check_composes(space, fixed)
        sampler = self.build_sampler(parsed, space)
        self.n_trials = grid.n_trials(sampler, self.n_trials)
        return {"objectives": names, "directions": ways, "pruner": pruner,
                "sampler": sampler, "space": space, "fixed": fixed}

    def build_sampler(self, parsed: Sequence[Any], space: Dict[str, Any]):
        """``hydra.sweeper.sampler`` built, seeded by ``hydra.sweeper.seed`` unless it has a
        seed of its own; a ``GridSampler``'s grid from the search space (``grid``)."""
        import optuna

        from runner.run.search import build_optuna

        spec = OmegaConf.to_container(self.sampler_spec) if isinstance(
            self.sampler_spec, DictConfig) else dict(self.sampler_spec or {})
        if self.seed is not None and spec.get("seed") is None:
            spec["seed"] = self.seed
        if grid.is_grid(spec):
            return grid.build(spec, parsed, space)
        return build_optuna("hydra.sweeper.sampler", spec, optuna.samplers.BaseSampler,
                            "optuna.samplers.TPESampler")

    def check_composes(self, space: Dict[str, Any], fixed: Dict[str, str]) -> None:
        """Compose a job per value of the widest choice (numbers at their lower bound): a
        ``params`` key that is not in the config, or an option that does not exist, is one
        line before the study starts."""
        from optuna.distributions import CategoricalDistribution

        from runner.config.errors import RunnerError, describe_error, first_line

        width = max([len(d.choices) for d in space.values()
                     if isinstance(d, CategoricalDistribution)], default=1)
        jobs = [search_space.overrides({k: d.choices[i % len(d.choices)]
                                        if isinstance(d, CategoricalDistribution) else d.low
                                        for k, d in space.items()}, fixed)
                for i in range(width)]
        try:
            self.validate_batch_is_legal(jobs)
        except Exception as err:  # noqa: BLE001 (Hydra's and OmegaConf's composition errors)
            raise RunnerError(f"hydra.sweeper.params: {describe_error(err) or first_line(err)}"
                              ) from None

    def open_study(self, url: str, search: Dict[str, Any], sweep_dir: Path):
        """The study at ``url``: created, or continued when it searches the same space."""
        import optuna

        from runner.config.errors import RunnerError, describe_error, first_line
        from runner.run.search import SPACE_ATTR, open_storage

        kwargs = dict(study_name=search["name"], sampler=search["sampler"],
                      pruner=search["pruner"])
        try:
            storage = open_storage(url)
            try:  # looked up first: a refused rerun must not add to the study's journal
                storage.get_study_id_from_name(search["name"])
                study = optuna.load_study(storage=storage, **kwargs)
            except KeyError:
                study = optuna.create_study(storage=storage, directions=search["directions"],
                                            **kwargs)
        except Exception as err:  # noqa: BLE001 (the file system's, Optuna's, SQLAlchemy's)
            raise RunnerError(f"hydra.sweeper.storage={url}: cannot open the study there: "
                              f"{describe_error(err) or first_line(err)}") from None
        search["storage"] = storage
        record = json.loads(json.dumps(space_record(search)))
        before = study.user_attrs.get(SPACE_ATTR)
        if before is None and [d.name.lower() for d in study.directions] != record[
                "directions"]:  # a study of the same name not made here
            before = {**record, "directions": [d.name.lower() for d in study.directions]}
        if before is None:
            study.set_user_attr(SPACE_ATTR, record)
        elif before != record:
            changed = [key for key in record if before.get(key) != record[key]]
            raise RunnerError(
                f"hydra.sweep.dir={sweep_dir} holds a search of study {search['name']} with "
                f"other {' and '.join(KEYS[key] for key in changed)}; rerun it as it was, or "
                f"give this one another hydra.sweep.dir")
        return study

    def run(self, study, search: Dict[str, Any]) -> None:
        """Launch the trials a killed search left running, then ask new ones until the study
        holds ``n_trials``, ``n_jobs`` running at once, each asked as soon as one ends
        (``schedule``); tell the study each one's end. A signal ends the sweep as it ends a
        sweep (``runner.run.sweep.stop_sweep``)."""
        from runner.platform.preemption import Interrupted, stop_on_signals
        from runner.run.sweep import stop_sweep

        with stop_on_signals() as stop:
            trials = Trials(study, search, self.n_trials, self.max_failure_rate, stop)
            run_trials(self.launcher, trials, self.n_jobs,
                       self.config.hydra.runtime.choices.get("hydra/launcher"))
        if stop.requested:
            raise SystemExit(stop_sweep(Interrupted(f"stopped by {stop.signal_name}", 0)))
        if trials.error is not None:
            raise trials.error

    def parse(self, overrides: Sequence[str]):
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        return parser.parse_overrides(list(overrides))


def quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
