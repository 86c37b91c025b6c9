"""SLURM launchers (through submitit): ``hydra/launcher=slurm``, one SLURM job per sweep job,
and ``hydra/launcher=fused_slurm``, one SLURM job per group of jobs the fused launcher would
train as one program (``runner.run.fused``).

Both are submitit's SLURM launcher with what a sweep on a real cluster needs:
- a job that ends without a result (``scancel``, a node failure, a run interrupted for good)
  is one log line naming it and a failed return: the sweep goes on to its ``summary.csv``,
  which says how each job ended, and exits 1;
- in the job, SIGTERM before runner's own handler is installed (Hydra composing the job,
  imports) ends the job at once: submitit would ignore it ("Bypassing signal SIGTERM") until
  SLURM's SIGKILL, leaving the run's ``metrics.json`` at ``running``.
Requeue and preemption need nothing more: SLURM reruns the job, whose runs resume from their
newest checkpoints (``runner.run.sweep``).
"""

import logging
import math
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class JobTerminated(Exception):
    """SIGTERM reached a SLURM job before its run installed its own handler."""


@contextmanager
def _terminated_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``JobTerminated`` (the job ends, its runs' records say how) until the
    run's own handler takes over (``runner.platform.preemption``)."""
    def terminate(signum, frame):
        raise JobTerminated(f"stopped by {signal.Signals(signum).name} while starting")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunnerSlurmLauncher(SlurmLauncher):
    """``hydra/launcher=slurm`` (see the module doc)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        with _terminated_on_sigterm():
            return super().__call__(*args, **kwargs)

    def executor(self):
        """A submitit executor with this launcher's SLURM parameters."""
        import submitit

        params = {k: v for k, v in self.params.items() if k != "max_members"}
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v
                                      for k, v in params.items()})
        return executor

    def prepare_sweep_dir(self) -> None:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"SLURM sweep output dir : {sweep_dir}")

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        self.prepare_sweep_dir()
        indices = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        for idx, overrides in zip(indices, job_overrides):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        jobs = self.executor().map_array(
            self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(indices),
            indices, [f"job_id_for_{idx}" for idx in indices], [state] * len(indices))
        return [self.collect(job, [list(o)], [idx])[0]
                for job, idx, o in zip(jobs, indices, job_overrides)]

    def collect(self, job: Any, members: List[List[str]],
                indices: List[int]) -> List[JobReturn]:
        """The SLURM job's returns (one per member). A job that ended without them (scancel,
        a failure SLURM reports, a run interrupted and not requeued) is one log line, a record
        for each member that has none of its own (killed before its run started: the summary
        lists it), and what a failed sweep job returns (``runner.run.sweep``): NaN, or under
        Optuna a failed trial."""
        from runner.run.sweep import JobFailed, marks_failed_trials

        try:
            results = job.results()[0]
            return results if isinstance(results, list) else [results]
        except Exception as err:  # noqa: BLE001 (submitit's UncompletedJobError, a job's error)
            reason = f"SLURM job {job.job_id} ended {job.state} without a result: {_cause(err)}"
        log.error("sweep job%s #%s: %s", "s" if len(indices) > 1 else "",
                  ", #".join(map(str, indices)), reason)
        for idx, overrides in zip(indices, members):
            try:
                self.record(idx, overrides, reason)
            except Exception as record_err:  # noqa: BLE001 (the sweep goes on to its summary)
                log.error("sweep job #%d: its failure is not recorded: %s", idx, record_err)
        assert self.config is not None
        if marks_failed_trials(self.config.hydra):
            return [JobReturn(overrides=m, status=JobStatus.FAILED,
                              _return_value=JobFailed(reason)) for m in members]
        return [JobReturn(overrides=m, status=JobStatus.COMPLETED, _return_value=math.nan)
                for m in members]

    def record(self, idx: int, overrides: List[str], reason: str) -> None:
        """Job ``idx``'s failure in its run dir, unless a run there recorded how it ended."""
        from runner.io.rundir import HydraJob
        from runner.run.sweep import record_failure

        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.num = idx
            run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
            hydra = config.pop("hydra")
        record_failure(run_dir, overrides, reason, HydraJob(config, hydra, overrides))


class FusedSlurmLauncher(RunnerSlurmLauncher):
    """``hydra/launcher=fused_slurm``: the jobs that differ only in numbers (the fused
    launcher's candidates) go to one SLURM job, which trains them as the fused launcher does
    (groups of one program each; a job that cannot join trains alone in the same
    allocation)."""

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        self.prepare_sweep_dir()
        groups = partition(job_overrides, initial_job_idx)
        for n, (indices, members) in enumerate(groups):
            log.info(f"\tSLURM job {n}: #{', #'.join(map(str, indices))}")
        state = Singleton.get_state()
        jobs = self.executor().map_array(FusedGroupJob(self), [m for _, m in groups],
                                         [i for i, _ in groups], [state] * len(groups))
        returns: Dict[int, JobReturn] = {}
        for job, (indices, members) in zip(jobs, groups):
            returns.update(zip(indices, self.collect(job, members, indices)))
        return [returns[idx] for idx in sorted(returns)]


class FusedGroupJob:
    """The callable a fused group's SLURM job runs (and reruns when requeued)."""

    def __init__(self, launcher: FusedSlurmLauncher):
        self.launcher = launcher

    def __call__(self, members: List[List[str]], indices: List[int],
                 singleton_state: Dict[type, Singleton]) -> List[JobReturn]:
        from hydra_plugins.runner_fused_launcher.fused_launcher import FusedLauncher

        with _terminated_on_sigterm():
            Singleton.set_state(singleton_state)
            setup_globals()
            outer = self.launcher
            fused = FusedLauncher(max_members=outer.params.get("max_members"))
            fused.setup(hydra_context=outer.hydra_context, task_function=outer.task_function,
                        config=outer.config)
            return fused.launch_indices(members, indices)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue on timeout: the same call again (its runs resume)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def partition(job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int) -> List[Tuple[List[int], List[List[str]]]]:
    """The jobs by their overrides with every number left out: jobs that differ only in
    numbers (learning rates, seeds) can share one program."""
    groups: Dict[Tuple[str, ...], Tuple[List[int], List[List[str]]]] = {}
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        shape = tuple(o for o in overrides if not NUMBER.match(o.split("=", 1)[-1]))
        indices, members = groups.setdefault(shape, ([], []))
        indices.append(idx)
        members.append(list(overrides))
    return list(groups.values())


def _cause(err: BaseException) -> str:
    """The line that says why: submitit's failed-job error quotes the job's traceback, whose
    last line is the exception; its other errors say it first."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if "failed during processing" in lines[0] else lines[0]
