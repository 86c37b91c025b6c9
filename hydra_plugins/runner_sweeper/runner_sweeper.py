"""A Hydra sweeper (``hydra/sweeper=runner``): Hydra's basic sweep, each batch checked by
composing one job per composition signature instead of every job.

The jobs are those ``hydra/sweeper=basic`` makes: the cartesian product of the sweep overrides
(``hydra.sweeper.params`` first, then the command line's), in batches of ``max_batch_size``.
Before launching a batch, Hydra's basic sweeper composes each of its jobs to fail early, and the
launcher then composes each again. runner's schemas are untyped (docs/design.md, "Values are
typed in the job"), so whether a job composes depends on its override keys, its config-group
choices, its ``hydra.`` values (Hydra's typed config) and which values are dicts or lists, not
on its other values: composing one job per such signature fails as early, with Hydra's error.
"""

import itertools
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

MULTIRUN_FILE = "multirun.yaml"  # the sweep's config in its dir, as hydra/sweeper=basic saves it


class RunnerSweeper(Sweeper):
    """Hydra's basic sweep (``hydra/sweeper=basic``), each batch checked by fewer compositions."""

    def __init__(self, max_batch_size: Optional[int] = None,
                 params: Optional[Dict[str, str]] = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise HydraException(f"hydra.sweeper.max_batch_size={max_batch_size}: must be a "
                                 f"positive number of jobs, or null for one batch")
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self.groups: Dict[str, Set[str]] = {}  # parent group -> its child groups

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        """Launch every job, batch by batch; returns each batch's results."""
        assert self.config is not None and self.launcher is not None
        jobs = job_overrides(self.parse([*(f"{k}={v}" for k, v in self.params.items()),
                                         *arguments]))
        # Saved after Hydra's on_multirun_start callbacks (runner's SweepSummary holds and
        # checks the sweep dir there), as hydra/sweeper=basic saves it.
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / MULTIRUN_FILE)
        size = self.max_batch_size or len(jobs)
        returns = []
        for start in range(0, len(jobs), size):
            batch = jobs[start:start + size]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            for result in results:
                _ = result.return_value  # a failed job's exception stops the sweep, as in basic
            returns.append(results)
        return returns

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose one job of each composition signature in ``batch``: a job that cannot
        compose stops the sweep, with Hydra's error, before any job of the batch runs."""
        representatives: Dict[Tuple, Sequence[str]] = {}
        for overrides in batch:
            representatives.setdefault(self.signature(overrides), overrides)
        super().validate_batch_is_legal(list(representatives.values()))

    def signature(self, overrides: Sequence[str]) -> Tuple[Tuple[str, Optional[str]], ...]:
        """What of a job's overrides decides whether it composes: each key, and each value
        but a scalar one of a key in the job's own config (None in its place). A deletion
        keeps its value: Hydra compares it with the config's."""
        return tuple((o.get_key_element(),
                      o.get_value_element_as_str()
                      if isinstance(o.value(), (dict, list)) or o.is_delete()
                      or o.is_hydra_override() or self.is_group(o.key_or_group) else None)
                     for o in self.parse(overrides))

    def is_group(self, name: str) -> bool:
        """Whether ``name`` (``model``, ``hydra/launcher``) is a config group, on the search
        path the sweep composes with (its primary config's and command line's searchpath)."""
        assert self.hydra_context is not None and self.config is not None
        parent, _, child = name.rpartition("/")
        if parent not in self.groups:
            self.groups[parent] = set(self.hydra_context.config_loader.get_group_options(
                parent, results_filter=ObjectType.GROUP,
                config_name=self.config.hydra.job.config_name,
                overrides=list(self.config.hydra.overrides.hydra)))
        return child in self.groups[parent]

    def parse(self, overrides: Sequence[str]) -> List[Override]:
        """``overrides`` parsed by Hydra's parser, as Hydra parses a command line's."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        return parser.parse_overrides(list(overrides))


def job_overrides(overrides: Sequence[Override]) -> List[List[str]]:
    """Every job's overrides: the cartesian product of the sweeps' values (a key given twice
    keeps its first place and its last values, as in hydra/sweeper=basic)."""
    choices: Dict[str, List[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"{override.input_line}: hydra/sweeper=runner sweeps lists of "
                                 f"values (a,b / choice(...) / range(...)), not "
                                 f"{override.value_type.name if override.value_type else 'this'}")
    return [list(job) for job in itertools.product(*choices.values())]
