"""A Hydra launcher that trains a batch of runner jobs as vmapped groups (``runner.run.fused``),
or a search's stream of jobs in groups that keep their width (``launch_stream``,
``runner.run.refill``).

Jobs of any other task function, and any job runner cannot fuse, run one after another in
this process, as Hydra's basic launcher runs them.
"""

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from hydra.core.utils import (JobReturn, configure_log, filter_overrides, run_job,
                              setup_globals)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class FusedLauncher(Launcher):
    def __init__(self, max_members: Optional[int] = None) -> None:
        self.max_members = max_members
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        return self.launch_indices(job_overrides, range(
            initial_job_idx, initial_job_idx + len(job_overrides)))

    def launch_indices(self, job_overrides: Sequence[Sequence[str]],
                       indices: Sequence[int]) -> Sequence[JobReturn]:
        """The jobs numbered ``indices`` (a batch's, or a SLURM job's group of a batch:
        ``hydra/launcher=fused_slurm``)."""
        self.prepare()
        log.info(f"Launching {len(job_overrides)} jobs, fused where they share a program")
        if _is_runner(self.task_function):
            from runner.run.fused import launch

            return launch(self, job_overrides, indices[0], indices=indices)
        return [self.run_one(idx, overrides, self.task_function)
                for idx, overrides in zip(indices, job_overrides)]

    def launch_stream(self, next_job: Callable[[], Optional[Tuple[int, Sequence[str]]]],
                      on_end: Callable[[int, JobReturn], None], width: int) -> None:
        """The jobs ``next_job()`` gives (``(number, overrides)``; None: no more), each one's
        return to ``on_end(number, ret)`` as soon as it ends: runner's train in groups of
        ``width`` slots, a freed slot taking the next job (``runner.run.refill``); another
        app's run one after another."""
        self.prepare()
        log.info(f"Launching jobs as they come, {width} at a time, fused where they share a "
                 f"program")
        if _is_runner(self.task_function):
            from runner.run.refill import launch_stream

            return launch_stream(self, next_job, on_end, width)
        while (job := next_job()) is not None:
            on_end(job[0], self.run_one(job[0], job[1], self.task_function))
        return None

    def prepare(self) -> None:
        """Hydra's globals and logging, and the sweep dir, as Hydra's launchers set them."""
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    def compose(self, idx: int, overrides: Sequence[str]) -> DictConfig:
        """Job ``idx``'s config, as Hydra's own launchers compose it."""
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def run_one(self, idx: int, overrides: Sequence[str], task_function: TaskFunction,
                sweep_config: Optional[DictConfig] = None) -> JobReturn:
        """One job in this process, as the basic launcher runs it."""
        assert self.hydra_context is not None and self.config is not None
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        ret = run_job(hydra_context=self.hydra_context, task_function=task_function,
                      config=sweep_config if sweep_config is not None
                      else self.compose(idx, overrides),
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret


def _is_runner(task_function: Optional[TaskFunction]) -> bool:
    """Whether the task function is runner's own (``python -m runner``'s). Told by its name,
    not by importing ``runner.cli``: importing a ``@hydra.main`` module sets Hydra's global
    version base, which would change another app's job (its working dir)."""
    return (getattr(task_function, "__module__", None) == "runner.cli"
            and getattr(task_function, "__qualname__", None) == "main")
