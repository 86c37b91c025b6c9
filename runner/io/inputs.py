"""``inputs.json``: the files a task read, recorded in the run dir when the run starts.

A task that reads files says which in ``inputs(recorded)`` (``task=arrays``: the absolute path,
its size, modification time and SHA-256, and its statistics; given the run's record on a
resume, it hashes again only a file whose size or modification time changed). ``resume=``
and ``runner.eval`` read the same files (a recorded key that is a task
key, such as ``path``, replaces the stored config's possibly relative value) and refuse to go on,
with one line, when what the task reads now differs from the record.
"""

import json
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, open_dict

from runner.config.errors import RunnerError
from runner.io.files import write_atomic
from runner.tasks.base import RecordsInputs
from runner.io.layout import RunPaths

STAMP = ("bytes", "mtime_ns")  # a task's record of its files' sizes and times (task=arrays)


def recorded(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((RunPaths(run_dir).inputs).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise RunnerError(f"{RunPaths(run_dir).inputs}: unreadable ({err})") from None


def use_recorded(cfg: DictConfig, run_dir: Path) -> None:
    """Point the config's task at the files the run read (an absolute ``task.path``)."""
    with open_dict(cfg.task):
        for key, value in recorded(run_dir).items():
            if key in cfg.task:
                cfg.task[key] = value


def verify(task: Any, run_dir: Path) -> None:
    """The task reads what the run read when it started."""
    was = recorded(run_dir)
    now = _inputs(task, was)
    # A file's size and time say only that it may have changed (a task rehashes then): the
    # contents decide.
    changed = sorted(k for k in set(was) | set(now) if k not in STAMP
                     and was.get(k) != now.get(k))
    if was and changed:
        what = ", ".join(f"{k}: now {_short(now.get(k))}, recorded {_short(was.get(k))}"
                         for k in changed)
        raise RunnerError(f"{now.get('path', 'the task inputs')}: changed since the run started "
                          f"({what}; see {RunPaths(run_dir).inputs}): resume and eval need "
                          f"the same data")


def record(task: Any, run_dir: Path) -> None:
    """Write ``inputs.json`` when a run starts from step 0 (a resume keeps the record it was
    checked against)."""
    inputs = _inputs(task, {})
    if inputs:
        write_atomic(RunPaths(run_dir).inputs, (json.dumps(inputs, indent=2) + "\n").encode())
    elif (RunPaths(run_dir).inputs).exists():  # an earlier attempt's, at another task
        (RunPaths(run_dir).inputs).unlink()


def _inputs(task: Any, was: Dict[str, Any]) -> Dict[str, Any]:
    inputs = task.inputs(was) if isinstance(task, RecordsInputs) else {}
    return json.loads(json.dumps(inputs))  # as the record holds them: tuples become lists


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 16 else f"{text[:12]}…"
