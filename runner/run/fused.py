"""Fused sweeps (``hydra/launcher=fused``): the jobs of a batch that differ only in numbers the
step reads from its state (the optimizer's hyperparameters, ``seed``) train as one program over
a leading member axis of the states, data and keys (``runner.loop.programs``); each job keeps its
own run dir, TensorBoard run, checkpoints and ``metrics.json``.

``launch`` composes every job as Hydra's launchers do (a job that fails to compose, under a
sweeper that did not compose it first, or to validate fails alone), prepares each as a sweep
job (a completed one is skipped, an interrupted one resumes, a failed one's files are set
aside), builds each run, groups the runs by everything that shapes their program
(``runner.loop.groups.group_key``) and trains each group in one host loop: a group of one on its
own program, a larger one on the fused program. A search's jobs come one at a time instead,
into groups whose freed slots take the next ones (``runner.run.refill``).
"""

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from runner.config.errors import RunnerError, describe_error
from runner.config.schema import typed
from runner.core.sharding import free_bytes
from runner.core.spec import fused_bytes
from runner.core.spec import members_batched
from runner.io import lock
from runner.io.rundir import HydraJob
from runner.loop.groups import group_key, split_to_fit
from runner.loop.host import Result
from runner.loop.member import MEMBERS, Member, working_for
from runner.loop.programs import compiled_name
from runner.platform.preemption import Interrupted, stop_on_signals
from runner.run.hparams import job_choices
from runner.run.search import TrialLink
from runner.run.summary import job_value, rerun_command
from runner.run.sweep import (JobFailed, completed_value, continue_or_restart,
                              marks_failed_trials, record_failure, stop_sweep)
from runner.run.train import Session, train_group

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    idx: int
    overrides: List[str]
    run_dir: Path
    ret: Optional[JobReturn] = None  # Hydra's record of the job (its config, its dir)
    value: Optional[float] = None  # known before training: a completed or failed job's
    cfg: Any = None  # its typed config, until its session opens
    hydra_job: Optional[HydraJob] = None  # its .hydra/ files, written once the dir is its own
    choices: Dict[str, Any] = dataclasses.field(default_factory=dict)
    session: Optional[Session] = None
    member: Optional[Member] = None  # its share of a host loop, once its run is built
    reason: str = ""  # why it failed
    trial: Optional[TrialLink] = None  # a search's trial (runner.run.search)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           indices: Optional[Sequence[int]] = None) -> List[JobReturn]:
    optuna = marks_failed_trials(launcher.config.hydra)
    log.info("fused groups run on one device each (device.num_devices=1 unless a job sets it; "
             "such a job trains alone, data-parallel)")
    if indices is None:  # a batch's jobs are numbered on from initial_job_idx
        indices = range(initial_job_idx, initial_job_idx + len(job_overrides))
    jobs = [register_job(launcher, idx, list(overrides))
            for idx, overrides in zip(indices, job_overrides)]
    with stop_on_signals() as stop:
        # Opened after every job is composed: Hydra's set-up of a job resets the logging
        # handlers (a session's runner.log among them).
        for job in jobs:
            if job.value is None:
                with working_for([job.run_dir]):
                    open_job(job)
        groups: Dict[Any, List[Job]] = {}
        for job in jobs:
            if job.member is not None:
                run = job.session.run
                key = group_key(run.spec, run.cadence, run.cfg.trainer, run.start_step,
                                (run.state, run.data, run.train_rng))
                groups.setdefault(("alone", job.idx) if key is None else key, []).append(job)
        cap = launcher.max_members or len(jobs) or 1
        interrupted: Optional[Interrupted] = None  # the first member a signal stopped
        for members in groups.values():
            for start in range(0, len(members), cap):
                capped = members[start:start + cap]
                for job in capped:  # their wall time and compilations count from here
                    job.session.begin(compiled_name(len(capped)))
                for part in fit_to_device(capped):
                    if stop.requested:  # a signal: the groups not started stay for the rerun
                        for job in part:
                            end_job(job, error=Interrupted(
                                f"stopped by {stop.signal_name} before its group trained",
                                job.member.step))
                        continue
                    stopped = _train(part, stop)
                    interrupted = interrupted or stopped
    returns = [job_return(launcher, job, optuna) for job in jobs]
    if interrupted:  # SIGTERM/SIGINT is meant for the whole sweep: its rerun resumes it
        raise SystemExit(stop_sweep(interrupted))
    return returns


def register_job(launcher, idx: int, overrides: List[str]) -> Job:
    """Compose job ``idx`` and let Hydra make its run dir (``.hydra/``, logging, callbacks)
    with a task function that only records the job; training comes later, in its group."""
    from hydra.core.utils import run_job

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    try:
        config = launcher.compose(idx, overrides)
    except Exception as err:  # noqa: BLE001 (Hydra's and OmegaConf's composition errors)
        job = Job(idx, overrides, sweep_dir / str(idx))
        return _fail_early(job, describe_error(err) or f"{type(err).__name__}: {err}")
    recorded: Dict[str, Any] = {}

    def record(cfg):
        recorded.update(cfg=cfg, run_dir=Path(HydraConfig.get().runtime.output_dir),
                        choices=job_choices(), hydra_job=HydraJob.current(cfg),
                        trial=TrialLink.of(HydraConfig.get()),
                        # hydra.* overrides (a search's study) are Hydra's, not the job's
                        overrides=list(HydraConfig.get().overrides.task))

    ret = run_job(hydra_context=launcher.hydra_context, task_function=record, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    overrides = recorded["overrides"]
    job = Job(idx, overrides, recorded["run_dir"], ret=ret, hydra_job=recorded["hydra_job"],
              choices=recorded["choices"], trial=recorded["trial"])
    try:
        job.value = completed_value(job.run_dir, overrides, job.trial)
    except RunnerError as err:  # another sweep's job: touch nothing
        return _fail_early(job, str(err), write=False)
    if job.value is not None:
        return job
    try:
        job.cfg = typed(recorded["cfg"])
    except RunnerError as err:
        return _fail_early(job, str(err))
    if job.cfg.device.num_devices is None:
        # A fused group runs on one device; a job given device.num_devices runs alone,
        # data-parallel (group_key).
        job.cfg.device.num_devices = 1
    return job


def _fail_early(job: Job, reason: str, *, write: bool = True) -> Job:
    log.error("job %s (%s) failed: %s", job.idx, " ".join(job.overrides), reason)
    if write:
        record_failure(job.run_dir, job.overrides, reason, job.hydra_job)
    job.value, job.session, job.reason = math.nan, None, reason
    return job


def open_job(job: Job) -> None:
    """Open the job's session: its checks, its run dir claimed as a sweep job's (an
    interrupted attempt resumes, an earlier failed one is set aside), its run built; a
    failure is the job's alone."""
    job.session = Session(job.cfg, job.run_dir, overrides=job.overrides,
                          claim=continue_or_restart(job.overrides), hydra_job=job.hydra_job,
                          choices=job.choices, log_filter=_OwnLines(job.run_dir),
                          on_eval=job.trial.on_eval if job.trial else None,
                          continue_with=rerun_command(job.run_dir.parent))
    try:
        job.member = job.session.open()
    except Exception as err:  # noqa: BLE001 (recorded as the job's failure)
        end_job(job, error=err)
        if not isinstance(err, lock.Busy):  # failed before its run started: its record
            record_failure(job.run_dir, job.overrides, job.reason, job.hydra_job)


def fit_to_device(group: List[Job]) -> List[List[Job]]:
    """``group`` in parts whose fused program fits the free memory of the device it runs on
    (``runner.loop.groups.split_to_fit``)."""
    run = group[0].session.run
    need = functools.partial(fused_bytes, run.spec, (run.state, run.data, run.train_rng))
    return split_to_fit(group, need, free_bytes(run.mesh.devices.flat[0]))


def _train(members: List[Job], stop) -> Optional[Interrupted]:
    """Train a group; how a signal stopped it (a member's Interrupted), if one did."""
    announce_group(members)
    results = train_group([job.session for job in members], stop)
    for job, result in zip(members, results):
        end_with(job, result)
    return next((r for r in results if isinstance(r, Interrupted)), None)


def end_with(job: Job, result: Result) -> None:
    """The job's end as its host loop gave it: a summary, or the exception it ended with."""
    with working_for([job.run_dir]):
        end_job(job, **({"error": result} if isinstance(result, BaseException)
                        else {"result": result}))


def announce_group(members: Sequence[Job]) -> None:
    """The log line of a group of several jobs about to train: which, and how."""
    if len(members) > 1:
        log.info("fusing jobs %s into one group (%d members, %s)",
                 ", ".join(str(j.idx) for j in members), len(members),
                 "one batched program" if members_batched() else "in turn on one compiled step")


def end_job(job: Job, *, result=None, error: Optional[BaseException] = None) -> None:
    if error is None:
        try:
            summary = job.session.finish(result)
            job.value = job.trial.value(summary) if job.trial else job_value(summary)
            return
        except Exception as err:  # noqa: BLE001
            error = err
    job.session.fail(error)
    reason = describe_error(error) or f"{type(error).__name__}: {error}"
    if isinstance(error, Interrupted):  # the sweep's ending names them all, and the rerun
        log.info("job %s (%s) interrupted at step %d", job.idx, " ".join(job.overrides),
                 error.step)
    else:
        log.error("job %s (%s) failed: %s", job.idx, " ".join(job.overrides), reason)
    job.value, job.reason = math.nan, reason or "failed"


class _OwnLines(logging.Filter):
    """A job's ``runner.log`` takes the lines of its own work, its group's, and the sweep's
    (no run's)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def filter(self, record: logging.LogRecord) -> bool:
        members = MEMBERS.get()
        return members is None or self.run_dir in members


def job_return(launcher, job: Job, optuna: bool) -> JobReturn:
    ret = job.ret or JobReturn(overrides=job.overrides, cfg=OmegaConf.create(),
                               hydra_cfg=OmegaConf.create(), working_dir=str(job.run_dir),
                               task_name="runner")
    ret.status, ret.return_value = JobStatus.COMPLETED, job.value
    if optuna and job.reason:  # Optuna marks the trial failed (a NaN value would stop it)
        ret.status, ret.return_value = JobStatus.FAILED, JobFailed(job.reason)
    return ret
