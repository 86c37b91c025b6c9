"""The writers the ``logger`` key configures, checked and built through ``_target_`` (runner's
own as a user's): ``logger=[tensorboard,jsonl]`` composes ``logger.tensorboard`` and
``logger.jsonl``, each ``conf/logger/<name>.yaml`` holding its writer's config under its name."""

import contextlib
from pathlib import Path
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig

from runner.config.errors import ConfigError
from runner.config.targets import build, check, load_target
from runner.io.rundir import MULTIRUN_FILE
from runner.io.writers.base import MetricWriter, RunInfo, Writers

RUN = "run"  # the keyword every writer's target is called with (RunInfo); no config key


def configured(logger: Optional[DictConfig]) -> List[Tuple[str, DictConfig, Any]]:
    """(``name``, its config typed by its target's signature, the target) for each writer of
    ``logger`` (None or empty: none); a ``_target_`` that does not import, a key its target
    does not take or a value of the wrong type is one line naming ``logger.<name>...``."""
    found = []
    for name in (logger or {}):
        key = f"logger.{name}"
        cfg = logger[name]
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"{key}={cfg}: not a writer's config (a _target_ and its keys, "
                              f"e.g. conf/logger/jsonl.yaml)")
        typed = check(cfg, key, skip=(RUN,))
        found.append((name, typed, load_target(typed._target_, key)))
    return found


def writer_files(logger: Optional[DictConfig]) -> Tuple[str, ...]:
    """The names (relative to the run dir) the configured writers write there: their
    targets' ``run_files``. Checks them as ``configured`` does."""
    return tuple(name for _, _, target in configured(logger)
                 for name in getattr(target, "run_files", ()))


def run_info(run_dir: Path, start_step: int) -> RunInfo:
    """What the writers of the run in ``run_dir`` are told: a sweep job's dir is a subdir of
    its sweep's (the one holding ``multirun.yaml``, whatever the launcher)."""
    run_dir = Path(run_dir)
    sweep = run_dir.parent if (run_dir.parent / MULTIRUN_FILE).is_file() else None
    return RunInfo(dir=run_dir, start_step=start_step, sweep_dir=sweep)


def open_writers(logger: Optional[DictConfig], run: RunInfo) -> Writers:
    """Build every configured writer for ``run`` (its config's values and ``run=``), as one.
    A target that builds something without the ``MetricWriter`` methods is one line; so is
    an error its constructor raises (naming ``logger.<name>`` and the target)."""
    writers = []
    try:
        for name, cfg, _ in configured(logger):
            writer = build(cfg, f"logger.{name}", **{RUN: run})
            if not isinstance(writer, MetricWriter):
                raise ConfigError(f"logger.{name} ({cfg._target_}): not a metric writer; it "
                                  f"needs scalars(step, prefix, values), flush() and close() "
                                  f"(runner.io.writers.base)")
            writers.append(writer)
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped it is the one to report
            Writers(writers).close()  # those opened already
        raise
    return Writers(writers)
