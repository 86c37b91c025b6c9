"""runner's Optuna search (``hydra/sweeper=search``, ``hydra_plugins/runner_search``), the job's
side, and the rules the sweeper, its jobs and the sweep's summary share.

A search's job number is its trial's number in the study that the job's own Hydra config names
(``hydra.sweeper.storage``, absolute, and ``study_name``, both set by the sweeper), so a job in
any process (the basic launcher's, joblib's, a SLURM node's, a fused group's) finds its trial
itself: ``TrialLink`` reports the objective to the study at each eval and asks the pruner
whether to stop there (a ``runner.loop.member.Stop``, as early stopping stops a run). The
sweeper tells the study how the trial ended from the job's value: its objective value(s), or
``Pruned``.
"""

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, OmegaConf

from runner.config.errors import RunnerError, first_line
from runner.config.schema import choice_value, typed

SWEEPER_TARGET = "hydra_plugins.runner_search.search_sweeper.SearchSweeper"
JOURNAL = "optuna.journal"  # the study's default storage, in the sweep dir
DEFAULT_STUDY = "runner"  # a null study_name (one study per journal: the sweep dir's)
SPACE_ATTR = "runner_search"  # the study's user attr holding its search space and objectives
STOPS_SEARCH = "stops_search"  # a trial's user attr: a failure every trial would repeat
DIRECTIONS = ("minimize", "maximize")
EVAL = "eval/"


def is_search(hydra_cfg: DictConfig) -> bool:
    """Whether the multirun's sweeper (``hydra_cfg.sweeper``) is runner's search."""
    return str(hydra_cfg.sweeper.get("_target_", "")) == SWEEPER_TARGET


def best_of(config: DictConfig) -> Tuple[str, str]:
    """``trainer.best_metric`` and ``best_mode`` as the jobs resolve them (null: the task's,
    ``runner.tasks.base.best_rule``), from the multirun's config: the task is built to ask."""
    trainer = config.trainer
    if trainer.best_metric is not None and trainer.best_mode is not None:
        return str(trainer.best_metric), choice_value(trainer.best_mode)
    from runner.config.targets import build, check
    from runner.tasks.base import best_rule

    job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])  # a job's keys
    task = build(check(typed(job).task, "task"), "task")
    return best_rule(task, trainer.best_metric, trainer.best_mode)


def objectives(sweeper: DictConfig, config: DictConfig) -> List[str]:
    """The metrics a trial's value is made of: ``hydra.sweeper.objective`` (one, or a list for
    a multi-objective search), by default ``eval/<trainer.best_metric>`` (``best_of``)."""
    given = sweeper.get("objective")
    if given is None:
        return [f"{EVAL}{best_of(config)[0]}"]
    names = [given] if isinstance(given, str) else list(given)
    if not names:
        raise RunnerError("hydra.sweeper.objective=[]: name at least one eval metric")
    for name in names:
        if not (isinstance(name, str) and name.startswith(EVAL) and len(name) > len(EVAL)):
            raise RunnerError(f"hydra.sweeper.objective={name}: not an eval metric; name one "
                              f"as eval/<metric> (eval/loss, eval/accuracy)")
    return names


def directions(sweeper: DictConfig, config: DictConfig, names: Sequence[str]) -> List[str]:
    """One direction per objective: ``hydra.sweeper.direction`` (a string or a list), or when
    it is null that of ``trainer.best_mode`` for ``eval/<trainer.best_metric>``."""
    given = sweeper.get("direction")
    if given is None:
        metric, mode = best_of(config)
        default = f"{EVAL}{metric}"
        if any(name != default for name in names):
            raise RunnerError(f"hydra.sweeper.direction=null: give minimize or maximize for "
                              f"each objective ({', '.join(names)}); only {default} "
                              f"(trainer.best_metric) follows trainer.best_mode by itself")
        return ["minimize" if mode == "min" else "maximize"] * len(names)
    given = [given] if isinstance(given, str) else [str(d) for d in given]
    if len(given) != len(names):
        raise RunnerError(f"hydra.sweeper.direction=[{','.join(given)}]: {len(given)} "
                          f"direction(s) for "
                          f"{len(names)} objective(s) ({', '.join(names)}); give one each")
    for direction in given:
        if direction not in DIRECTIONS:
            raise RunnerError(f"hydra.sweeper.direction={direction}: must be minimize or "
                              f"maximize")
    return given


def storage_url(given: Optional[str], sweep_dir: Path) -> str:
    """Where the study lives, absolute (a job may run in another dir or on another node):
    null is ``<sweep_dir>/optuna.journal``; a URL (``sqlite:///study.db``) is Optuna's; any
    other string is the path of a journal file."""
    if given is None:
        return str((sweep_dir / JOURNAL).absolute())
    given = str(given)
    if given.startswith("sqlite:///") and not given.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(given[len("sqlite:///"):]).absolute())
    if "://" in given:
        return given
    return str(Path(given).expanduser().absolute())


def open_storage(url: str):
    """The Optuna storage at ``url`` (``storage_url``): a journal file (``JournalStorage``,
    which also works on a cluster's shared file system) or a database URL."""
    import optuna

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    backend = optuna.storages.journal.JournalFileBackend(url)
    return optuna.storages.JournalStorage(backend)


def build_pruner(spec: Optional[Any]):
    """``hydra.sweeper.pruner`` (a ``_target_`` and its arguments) built; without one, Optuna's
    ``NopPruner`` (Optuna's own default for a study is ``MedianPruner``)."""
    import optuna

    spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec or {})
    if spec.get("_target_") is None:
        return optuna.pruners.NopPruner()
    return build_optuna("hydra.sweeper.pruner", spec, optuna.pruners.BasePruner,
                        "optuna.pruners.MedianPruner")


def build_optuna(key: str, spec: Dict[str, Any], kind: type, example: str):
    """An Optuna sampler or pruner from ``spec`` (``_target_`` and arguments) at config
    ``key``; a target that is not there, not a ``kind``, or refuses its arguments is one
    line."""
    from hydra.utils import get_object, instantiate

    target = spec.get("_target_")
    where = f"{key}._target_={target}"
    try:
        get_object(str(target))
    except Exception:  # noqa: BLE001 (ImportError, AttributeError, Hydra's wrapping)
        raise RunnerError(f"{where}: no such class; name one of "
                          f"{example.rsplit('.', 1)[0]} (e.g. {example})") from None
    try:
        built = instantiate(spec)
    except Exception as err:  # noqa: BLE001 (its own argument checks)
        cause = err.__cause__ or err
        raise RunnerError(f"{where}: {first_line(cause)} (its arguments: {key}.<name>)"
                          ) from None
    if not isinstance(built, kind):
        raise RunnerError(f"{where}: not an Optuna {kind.__module__}.{kind.__name__}")
    return built


@dataclasses.dataclass(frozen=True)
class Pruned:
    """A search job's value when the pruner stopped its trial at ``step``: the sweeper tells
    the study PRUNED (Optuna keeps its intermediate values)."""

    step: int


Value = Union[float, List[float], Pruned]


class TrialLink:
    """A search job's trial (number ``number`` in ``study_name`` at ``storage``), opened when
    first needed. ``on_eval`` is the run's eval hook; ``value`` the job's value."""

    def __init__(self, storage: str, study_name: str, number: int, pruner: Optional[Any]):
        self.storage, self.study_name, self.number = storage, study_name, number
        self.pruner_spec = pruner
        self.trial = None
        self.names: List[str] = []
        self.reported: set = set()

    @classmethod
    def of(cls, hydra_cfg: DictConfig) -> Optional["TrialLink"]:
        """The trial of the current Hydra job, when its sweeper is runner's search."""
        if not is_search(hydra_cfg):
            return None
        sweeper = hydra_cfg.sweeper
        return cls(str(sweeper.storage), str(sweeper.study_name), int(hydra_cfg.job.num),
                   sweeper.get("pruner"))

    def open(self):
        """The trial (``optuna.trial.Trial``) and the study's objectives."""
        if self.trial is None:
            import optuna

            storage = open_storage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage,
                                      pruner=build_pruner(self.pruner_spec))
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(
                    storage.get_study_id_from_name(self.study_name), self.number)
            except KeyError:
                raise RunnerError(f"{self.storage}: study {self.study_name} has no trial "
                                  f"{self.number} (hydra.job.num)") from None
            self.names = list(study.user_attrs[SPACE_ATTR]["objectives"])
            self.reported = set(storage.get_trial(trial_id).intermediate_values)
            self.trial = optuna.trial.Trial(study, trial_id)
        return self.trial

    def on_eval(self, step: int, metrics: Dict[str, float]):
        """Report the objective at ``step`` (once: a resumed run repeats no step) and stop the
        run when the pruner says so. A multi-objective search reports nothing (Optuna prunes
        only single-objective studies)."""
        from runner.loop.member import Stop

        trial = self.open()
        values = self.objective_values(metrics)
        if len(values) > 1:
            return None
        if step not in self.reported:
            trial.report(values[0], step)
            self.reported.add(step)
        if not trial.should_prune():
            return None
        message = (f"step {step}: pruned ({type(trial.study.pruner).__name__}, "
                   f"{self.names[0]}={values[0]:.6g})")
        return Stop(step, {"status": "pruned", "pruned_at": step, "reason": message}, message)

    def objective_values(self, metrics: Dict[str, float]) -> List[float]:
        """The objectives' values in eval ``metrics``. A metric the task does not log fails
        the trial and, marked on it, stops the search: every trial would fail alike."""
        missing = [n for n in self.names if n[len(EVAL):] not in metrics]
        if missing:
            message = (f"hydra.sweeper.objective={missing[0]}: the task logs no such metric; "
                       f"it logs {', '.join(EVAL + k for k in sorted(metrics))}")
            self.trial.set_user_attr(STOPS_SEARCH, message)
            raise RunnerError(message)
        return [metrics[n[len(EVAL):]] for n in self.names]

    def value(self, summary: Dict[str, Any]) -> Value:
        """The job's value from its summary (``metrics.json``): ``Pruned``, or the objective's
        final value (a list of them for several objectives)."""
        if summary.get("status") == "pruned":
            return Pruned(int(summary["pruned_at"]))
        self.open()
        values = self.objective_values(summary.get("eval") or {})
        return values[0] if len(values) == 1 else values
