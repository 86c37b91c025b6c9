"""Fused sweeps (``hydra/launcher=fused``): the jobs of a batch that differ only in numbers the
step reads from its state (the optimizer's hyperparameters, ``seed``) train as one program over
a leading member axis of the states, data and keys (``runner.loop.fused``); each job keeps its
own run dir, TensorBoard run, checkpoints and ``metrics.json``.

``launch`` composes every job as Hydra's launchers do (a job that fails to compose, under a
sweeper that did not compose it first, or to validate fails alone), prepares each as a sweep
job (a completed one is skipped, an interrupted one resumes, a failed one's files are set
aside), builds each run, groups the runs by everything that shapes their program, and trains
each group: a group of one with its own host loop, a larger one with ``FusedLoop``.
"""

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from runner.io import lock
from runner.config.errors import RunnerError, describe_error
from runner.loop.fused import COMPILED_NAME, MEMBER, FusedLoop, group_key, split_to_fit
from runner.run.hparams import job_choices
from runner.platform.preemption import Interrupted, stop_on_signals
from runner.config.schema import typed
from runner.io.rundir import HydraJob
from runner.run.sweep import JobFailed, completed_value, continue_or_restart, record_failure
from runner.run.train import Session

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
    loop: Any = None  # its HostLoop, once built
    reason: str = ""  # why it failed


def launch(launcher, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> List[JobReturn]:
    optuna = "optuna" in str(launcher.config.hydra.sweeper.get("_target_", "")).lower()
    log.info("fused groups run on one device each (device.num_devices=1 unless a job sets it; "
             "such a job trains alone, data-parallel)")
    jobs = [_register(launcher, idx, list(overrides))
            for idx, overrides in enumerate(job_overrides, initial_job_idx)]
    with stop_on_signals() as stop:
        # Opened after every job is composed: Hydra's set-up of a job resets the logging
        # handlers (a session's runner.log among them).
        for job in jobs:
            if job.value is None:
                with _as_member(job.run_dir):
                    _open(job, stop)
        groups: Dict[Any, List[Job]] = {}
        for job in jobs:
            if job.loop is not None:
                groups.setdefault(group_key(job.loop), []).append(job)
        cap = launcher.max_members or len(jobs) or 1
        interrupted = False
        for members in groups.values():
            for start in range(0, len(members), cap):
                capped = members[start:start + cap]
                for job in capped:  # their wall time and compilations count from here
                    job.session.begin(COMPILED_NAME if len(capped) > 1 else "train_steps")
                by_loop = {id(j.loop): j for j in capped}
                for part in split_to_fit([j.loop for j in capped]):
                    if stop.requested:  # a signal: the groups not started stay for the rerun
                        for job in (by_loop[id(loop)] for loop in part):
                            _end(job, error=Interrupted(
                                f"stopped by {stop.signal_name} before its group trained",
                                job.loop.step))
                        continue
                    interrupted |= _train([by_loop[id(loop)] for loop in part], stop)
    returns = [_job_return(launcher, job, optuna) for job in jobs]
    if interrupted:  # SIGTERM/SIGINT is meant for the whole sweep: rerun resumes it
        raise SystemExit(1)
    return returns


def _register(launcher, idx: int, overrides: List[str]) -> Job:
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
                        choices=job_choices(), hydra_job=HydraJob.current(cfg))

    ret = run_job(hydra_context=launcher.hydra_context, task_function=record, config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    job = Job(idx, overrides, recorded["run_dir"], ret=ret, hydra_job=recorded["hydra_job"],
              choices=recorded["choices"])
    try:
        job.value = completed_value(job.run_dir, overrides)
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


def _open(job: Job, stop) -> None:
    """Open the job's session: its checks, its run dir claimed as a sweep job's (an
    interrupted attempt resumes, an earlier failed one is set aside), its run built; a
    failure is the job's alone."""
    job.session = Session(job.cfg, job.run_dir, overrides=job.overrides,
                          claim=continue_or_restart(job.overrides), hydra_job=job.hydra_job,
                          choices=job.choices, log_filter=_OwnLines(job.run_dir))
    try:
        job.loop = job.session.open(stop)
    except Exception as err:  # noqa: BLE001 (recorded as the job's failure)
        _end(job, error=err)
        if not isinstance(err, lock.Busy):  # failed before its run started: its record
            record_failure(job.run_dir, job.overrides, job.reason, job.hydra_job)


def _train(members: List[Job], stop) -> bool:
    """Train a group; True when a signal stopped it."""
    if len(members) == 1:
        results = {0: _run_alone(members[0].loop)}
    else:
        log.info("fusing jobs %s into one program (%d members)",
                 ", ".join(str(j.idx) for j in members), len(members))
        results = FusedLoop([j.loop for j in members], stop).run()
    for i, job in enumerate(members):
        result = results[i]
        with _as_member(job.run_dir):
            _end(job, **({"error": result} if isinstance(result, BaseException)
                         else {"result": result}))
    return any(isinstance(r, Interrupted) for r in results.values())


def _run_alone(loop):
    try:
        with _as_member(loop.checkpointer.dir.parent):
            return loop.run()[1]
    except Exception as err:  # noqa: BLE001
        return err


def _end(job: Job, *, result=None, error: Optional[BaseException] = None) -> None:
    if error is None:
        try:
            job.value = job.session.finish(result)["eval"]["loss"]
            return
        except Exception as err:  # noqa: BLE001
            error = err
    job.session.fail(error)
    reason = describe_error(error) or f"{type(error).__name__}: {error}"
    if isinstance(error, Interrupted):
        log.error("%s", error)
    else:
        log.error("job %s (%s) failed: %s", job.idx, " ".join(job.overrides), reason)
    job.value, job.reason = math.nan, reason or "failed"


@contextlib.contextmanager
def _as_member(run_dir: Path) -> Iterator[None]:
    token = MEMBER.set(run_dir)
    try:
        yield
    finally:
        MEMBER.reset(token)


class _OwnLines(logging.Filter):
    """A job's ``runner.log`` takes its own lines and the group's (no member set)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def filter(self, record: logging.LogRecord) -> bool:
        member = MEMBER.get()
        return member is None or member == self.run_dir


def _job_return(launcher, job: Job, optuna: bool) -> JobReturn:
    ret = job.ret or JobReturn(overrides=job.overrides, cfg=OmegaConf.create(),
                               hydra_cfg=OmegaConf.create(), working_dir=str(job.run_dir),
                               task_name="runner")
    ret.status, ret.return_value = JobStatus.COMPLETED, job.value
    if optuna and job.reason:  # Optuna marks the trial failed (a NaN value would stop it)
        ret.status, ret.return_value = JobStatus.FAILED, JobFailed(job.reason)
    return ret
