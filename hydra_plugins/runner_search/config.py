"""``hydra/sweeper=search``: registered in Hydra's ConfigStore when Hydra scans its plugins.
Nothing here imports Optuna: the scan runs for every command, the ``search`` extra or not."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.runner_search.search_sweeper.SearchSweeper"
    # The sampler and pruner reach the sweeper as configs (it builds them, naming the key of
    # a bad one), not built by Hydra first.
    _recursive_: bool = False
    # minimize | maximize, or one per objective; null: trainer.best_mode's, for the default
    # objective.
    direction: Any = None
    # The metric(s) a trial's value is: eval/<name>, or a list (multi-objective, the Pareto
    # front marked in summary.csv). null: eval/<trainer.best_metric>.
    objective: Any = None
    study_name: Optional[str] = None  # null: "runner"
    # null: Optuna's journal file <hydra.sweep.dir>/optuna.journal; a path: a journal file
    # there; a URL (sqlite:///study.db): Optuna's database storage.
    storage: Optional[str] = None
    # The study's total: a rerun asks only what is missing. null: a GridSampler's grid size.
    n_trials: Optional[int] = 20
    n_jobs: int = 2  # trials running at once, each asked as soon as one ends
    # Seeds the sampler when its own config gives no seed: a repeatable search.
    seed: Optional[int] = None
    sampler: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    # Any optuna.pruners.* by _target_ (with its arguments); a null _target_ (or pruner: null):
    # no pruning. A dict, so that hydra.sweeper.pruner._target_=... sets one.
    pruner: Optional[Dict[str, Any]] = field(default_factory=lambda: {"_target_": None})
    # The search stops once more than this fraction of its trials failed (1.0: never).
    max_failure_rate: float = 1.0
    # The search space in Hydra's override grammar (key: "interval(1e-4, 1e-1)"), before the
    # command line's sweep overrides; a plain value is fixed for every trial.
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="search", node=SearchSweeperConf,
                             provider="runner")
