"""What a run dir holds and who may write it: the rules every writer follows before its first
write (a single run, ``resume=``, a sweep job of any launcher).

Hydra writes ``.hydra/`` and opens the job's log file before the task function runs, that
is before runner knows whether this process may write into the dir (another holds its lock,
or it holds a run this one must not mix with). So the configs turn both off
(``hydra.output_subdir: null``, a console-only ``hydra.job_logging``) and runner writes the
same three files and ``runner.log`` itself, once the run dir is its own (``claim``).
"""

import contextlib
import logging
import logging.handlers
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from runner.config.errors import RunnerError, first_line, runner_command
from runner.io.checkpoint import list_checkpoints
from runner.io.files import read_metrics, write_atomic
from runner.io.layout import RUN_FILES, RunPaths

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging
MULTIRUN_FILE = "multirun.yaml"  # a sweep dir's (Hydra's sweepers write it)


def held_run(run_dir: Path) -> Optional[str]:
    """What run ``run_dir`` holds, in words ("completed at step 200", ...), or None when it
    holds none (no ``metrics.json``, checkpoint, sweep, nor any file a run writes: a run
    overwrites no file of the user's either)."""
    metrics = read_metrics(run_dir)
    checkpoints = list_checkpoints(RunPaths(run_dir).checkpoints)
    if metrics:
        return f"{metrics.get('status', 'unknown')} at step {metrics.get('steps', '?')}"
    if checkpoints:
        return f"checkpoints up to step {checkpoints[-1][0]}"
    if (run_dir / MULTIRUN_FILE).is_file():
        return "a sweep"
    left = [name for name in RUN_FILES if (run_dir / name).exists()]
    if left:  # a run's files, or a file of the user's own under a name a run writes
        return f"files a run writes: {', '.join(left)}"
    return None


def refuse_fresh_run(run_dir: Path, *, overwrite: bool) -> None:
    """A run without ``resume=`` never writes into a dir that holds another run: one line
    naming the ways on (resume it, ``overwrite=true``, another dir)."""
    held = held_run(run_dir)
    shown = os.path.relpath(run_dir) if not os.path.relpath(run_dir).startswith("..") \
        else str(run_dir)
    if (run_dir / MULTIRUN_FILE).is_file():  # its jobs are its subdirs: no run goes on top
        raise RunnerError(f"{shown} holds a sweep; give the run another hydra.run.dir")
    if held is None or overwrite:
        return
    raise RunnerError(f"{shown} holds a run ({held}): continue it with "
                      f"{runner_command(f'resume={shown}')} (trainer.steps=N to train "
                      f"longer), or start over there with overwrite=true (the old run is "
                      f"moved to {shown}/{RunPaths.ATTEMPTS}/), or give another hydra.run.dir")


# Decides, for the process that will write (``writer``), whether a run continues what its dir
# holds (True: resume) or starts anew (False), or refuses the dir (RunnerError). Called
# before the lock (reading only) and again holding it.
Claim = Callable[[Path, bool], bool]


def fresh(*, overwrite: bool) -> Claim:
    """A run without ``resume=``: a dir that holds a run is refused (or, with ``overwrite``,
    that run is moved aside)."""
    def claim(run_dir: Path, writer: bool) -> bool:
        if writer:
            refuse_fresh_run(run_dir, overwrite=overwrite)
        return False
    return claim


def resuming(run_dir: Path, writer: bool) -> bool:
    """``resume=``: the run continues from its newest checkpoint."""
    return True


def set_aside(run_dir: Path, names: Sequence[str] = RUN_FILES) -> Optional[Path]:
    """Move an earlier run's (or attempt's) files into ``attempts/<n>/``: kept, never mixed
    into the new one's curves and checkpoints. The new dir, or None when nothing was there."""
    left = [run_dir / name for name in dict.fromkeys(names) if (run_dir / name).exists()]
    if not left:
        return None
    taken = [int(p.name) for p in (RunPaths(run_dir).attempts).glob("*") if p.name.isdigit()]
    dest = RunPaths(run_dir).attempts / str(max(taken, default=0) + 1)
    dest.mkdir(parents=True)
    for path in left:
        shutil.move(str(path), str(dest / path.name))
    log.info("set aside the earlier files of %s in %s", run_dir, dest)
    return dest


def write_hydra_files(run_dir: Path, job: "HydraJob") -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` as Hydra writes them (a
    part that is None stays as it is: a resume keeps the run's ``hydra.yaml``)."""
    RunPaths(run_dir).hydra.mkdir(exist_ok=True)
    for name, cfg in (("config.yaml", job.config), ("hydra.yaml", job.hydra),
                      ("overrides.yaml", job.overrides)):
        if cfg is not None:
            write_atomic(RunPaths(run_dir).hydra_file(name), OmegaConf.to_yaml(cfg).encode())


def recorded_choices(run_dir: Path) -> Dict[str, str]:
    """The config group options the run in ``run_dir`` was composed with (``task: arrays``,
    ``model: cnn1d``), as its ``.hydra/hydra.yaml`` records them (``hydra.runtime.choices``);
    {} for a run made without Hydra. A resumed run labels itself with these."""
    path = RunPaths(run_dir).hydra_file("hydra.yaml")
    if not path.is_file():
        return {}
    try:
        choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default=None)
    except Exception as err:  # noqa: BLE001 (yaml's and OmegaConf's errors for a bad file)
        raise RunnerError(f"{path}: not a readable Hydra config ({first_line(err)})") from None
    if not isinstance(choices, DictConfig):
        return {}
    return {k: v for k, v in OmegaConf.to_container(choices).items() if v is not None}


class HydraJob:
    """The three configs Hydra would have saved in a job's ``.hydra/``: the job's config, the
    Hydra config (``output_subdir`` as Hydra's default names it) and the task overrides."""

    def __init__(self, config: DictConfig, hydra: Optional[DictConfig],
                 overrides: Sequence[str]):
        self.config, self.overrides = config, OmegaConf.create(list(overrides))
        self.hydra = None
        if hydra is not None:
            self.hydra = OmegaConf.create({"hydra": OmegaConf.to_container(hydra)})
            self.hydra.hydra.output_subdir = RunPaths.HYDRA

    @classmethod
    def current(cls, config: DictConfig) -> Optional["HydraJob"]:
        """The job Hydra is running now (None outside Hydra)."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra = HydraConfig.get()
        return cls(config, hydra, list(hydra.overrides.task))


@contextlib.contextmanager
def buffered_log(only: Optional[logging.Filter] = None) -> Iterator["RunLog"]:
    """Hold the log lines of a run (those ``only`` passes) until it may write its run dir
    (``RunLog.write_to``); lines of a run that never may are dropped from the file (the
    console has them all)."""
    run_log = RunLog()
    if only is not None:
        run_log.buffer.addFilter(only)
    root = logging.getLogger()
    root.addHandler(run_log.buffer)
    try:
        yield run_log
    finally:
        root.removeHandler(run_log.buffer)
        run_log.close()


class RunLog:
    """A run's ``runner.log``: a memory buffer first, the file once the run owns its dir."""

    def __init__(self):
        # flushLevel above CRITICAL: nothing reaches the file before ``write_to``
        self.buffer = logging.handlers.MemoryHandler(capacity=10_000,
                                                     flushLevel=logging.CRITICAL + 1)
        self.file: Optional[logging.FileHandler] = None

    def write_to(self, run_dir: Path) -> None:
        """From now on (the buffered lines first), append to ``run_dir/runner.log``."""
        self.file = logging.FileHandler(RunPaths(run_dir).log, mode="a")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self.buffer.capacity = 0  # every later line goes straight through

    def attach(self) -> None:
        """Take the root logger's lines again after a logging set-up closed and removed every
        handler (``logging.config.dictConfig``: Hydra's set-up of another job)."""
        if self.file is not None:
            self.buffer.setTarget(self.file)  # closing the buffer dropped its target
        logging.getLogger().addHandler(self.buffer)

    def close(self) -> None:
        # A log the disk cannot take any more (ENOSPC) is not the run's error to report: the
        # write that failed first says why, once.
        with contextlib.suppress(OSError):
            self.buffer.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def log_error_line(run_dir: Path, logger: str, message: str) -> None:
    """Append one ERROR line to ``run_dir/runner.log`` as a run's log has it (for a job that
    failed before its run, and so its log, started)."""
    handler = logging.FileHandler(RunPaths(run_dir).log, mode="a")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    try:
        handler.handle(logging.makeLogRecord(
            {"name": logger, "levelno": logging.ERROR, "levelname": "ERROR", "msg": message}))
    finally:
        handler.close()


def remove_if_unused(run_dir: Path) -> None:
    """Remove ``run_dir`` when it is empty (Hydra made it for a run that failed its checks),
    and the parents below the working dir that it leaves empty (``outputs/<date>``)."""
    path, cwd = Path(run_dir).resolve(), Path.cwd().resolve()
    while path != cwd:
        try:
            path.rmdir()
        except OSError:  # not empty (or not ours to remove): it stays
            return
        path = path.parent
        if cwd not in path.parents:
            return
