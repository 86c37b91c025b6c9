"""The files every layer writes and reads: atomic writes (a crash leaves the old file or the new
one, never half of one) and a run's ``metrics.json``."""

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

from runner.config.errors import WriteError
from runner.io.layout import RunPaths

TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any instant leaves either the old file or
    the complete new one: a temporary file, fsynced, renamed over ``path``, the rename fsynced.
    A failed write (a full disk) removes its temporary file, leaves ``path`` as it was and
    raises WriteError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")  # unique per process
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(path, err) from err


def remove_stale_temps(directory: Path) -> None:
    """Delete the temporary files of writes a killed process never finished (call it holding
    the run dir's lock: no other process is writing there)."""
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_metrics(run_dir: Path) -> Dict[str, Any]:
    """The run's ``metrics.json``, or {} when there is none (never started, or killed)."""
    try:
        return json.loads((RunPaths(run_dir).metrics).read_text())
    except (OSError, ValueError):
        return {}


# The keys of every metrics.json, whoever writes it (a run as it starts and ends, a resume with
# nothing left to train, a sweep job that failed before its run): one shape, null where the
# writer has no value (a failed job's metrics, an early stop that never happened).
RECORD_KEYS = (
    "status",  # running | completed | pruned | interrupted | failed
    "reason",  # why it did not complete
    "overrides", "steps", "train", "eval", "checkpoint", "best",
    "stopped_early_at", "stopped_at", "stopped_by", "stop_reason", "stop_details", "pruned_at",
    "resumed_from", "experiment", "devices",
    "wall_time_s", "compile_s", "train_step_compiles", "compile_cache_hits")


def run_record(summary: Dict[str, Any]) -> Dict[str, Any]:
    """``summary`` in metrics.json's shape: every key of RECORD_KEYS, null where it has none.
    A key of no such shape is a bug of the writer, raised."""
    unknown = sorted(set(summary) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"metrics.json has no key {', '.join(unknown)}: add it to "
                         f"runner.io.files.RECORD_KEYS")
    return {key: summary.get(key) for key in RECORD_KEYS}


def write_metrics(run_dir: Path, summary: Dict[str, Any]) -> None:
    """Write the run's record, ``metrics.json`` (``summary`` in its one shape, ``run_record``),
    atomically. After a failure, on a full disk, the record goes over the ``running`` one in
    place (its blocks are already the file's; not atomic, but better than none); a write that
    fails even so is said on stderr."""
    path, data = RunPaths(run_dir).metrics, (json.dumps(run_record(summary), indent=2,
                                                        sort_keys=True) + "\n").encode()
    try:
        write_atomic(path, data)
    except WriteError as err:
        if summary["status"] in ("completed", "running"):
            raise
        try:
            with open(path, "r+b") as f:
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            print(f"error: the run's status was not recorded: {err}", file=sys.stderr)
