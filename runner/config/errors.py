"""Errors meant for people: each carries a one-line message naming the key or file at fault."""

import os
import shlex
import sys


class RunnerError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits non-zero."""


class ConfigError(RunnerError):
    """A config value that composes but is not valid (out of range, inconsistent)."""


class AlreadyComplete(RunnerError):
    """A resumed run that has nothing left to do: not a failure (requeue loops rerun the same
    resume command), and nothing in its run dir is touched."""

    def __init__(self, run_dir, step: int, *, stopped_early: bool = False,
                 pruned: bool = False, stopped_by: str = ""):
        if stopped_by and not stopped_early:
            super().__init__(f"{run_dir}: already complete: stopped at step {step} by "
                             f"{stopped_by}")
        elif pruned:
            super().__init__(f"{run_dir}: already complete: its search pruned it at step "
                             f"{step} (hydra.sweeper.pruner)")
        elif stopped_early:
            super().__init__(f"{run_dir}: already complete: stopped early at step {step} "
                             f"(trainer.early_stop)")
        else:
            super().__init__(f"{run_dir}: already complete at step {step}; give a larger "
                             f"trainer.steps to train longer")


class WriteError(RunnerError):
    """A file the run could not write (disk full, no permission, a read-only filesystem)."""

    def __init__(self, path, err: OSError):
        super().__init__(f"cannot write {path}: {os_reason(err)}")


def os_reason(err: OSError) -> str:
    """``[Errno 28] No space left on device``, as Python words an OSError, without the path."""
    return f"[Errno {err.errno}] {err.strerror}" if err.errno else str(err)


def check_range(key: str, value, *, gt=None, ge=None, le=None) -> None:
    """Raise ConfigError naming ``key`` when ``value`` (or any item of a list or tuple) lies
    outside the range; None passes. For tasks' and models' ``__post_init__`` checks."""
    if value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not items:
        raise ConfigError(f"{key}=[]: must list at least one value")
    shown = list(value) if isinstance(value, (list, tuple)) else value
    for item in items:
        for bound, ok, word in ((gt, lambda b: item > b, ">"), (ge, lambda b: item >= b, ">="),
                                (le, lambda b: item <= b, "<=")):
            if bound is not None and not ok(bound):
                raise ConfigError(f"{key}={shown}: must be {word} {bound}")


def chosen(group: str, default: str) -> str:
    """``group=<option>`` as chosen for this job (Hydra records the choice: ``model=cnn_small``,
    though its class is the CNN), else ``group=<default>`` (no Hydra job: a class used
    directly). For a class's messages, which name the option the user typed."""
    from hydra.core.hydra_config import HydraConfig

    option = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    return f"{group}={option or default}"


def runner_command(*args: str) -> str:
    """``<python> -m runner <args>``, shell-quoted, for a message to print: ``<python>`` is the
    interpreter that runs now (a venv's, though none may be active in the shell it is pasted
    into), shown relative to the working directory when it lies under it
    (``.venv/bin/python``), else absolute."""
    python = sys.executable or "python"  # none known (an embedded interpreter): PATH's
    try:
        relative = os.path.relpath(python) if sys.executable else os.pardir
    except (OSError, ValueError):  # no working directory, or another drive
        relative = os.pardir
    if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
        # a bare name would be looked up on PATH
        python = relative if os.sep in relative else os.path.join(os.curdir, relative)
    return " ".join(shlex.quote(word) for word in (python, "-m", "runner", *args))


# Config options of plugins that are not installed, and what to use instead.
MISSING_PLUGINS = {("hydra/sweeper", "optuna"): (
    "not installed (hydra-optuna-sweeper); runner's own Optuna sweeper is "
    "hydra/sweeper=search: pip install 'jax-yaml-runner[search]'")}
# Parameters of a group's target that runner sets itself, from a key of the group: an optax
# factory's learning_rate is optimizer.lr times the schedule (runner.core.optim). They are no
# keys of the group, and `+` cannot add them.
SET_BY_RUNNER = {"optimizer": {"learning_rate": "lr"}}


def set_by_runner(key: str, target: str) -> "str | None":
    """The one line for ``key`` (``optimizer.learning_rate``) when runner sets that parameter
    of ``target`` itself, naming the key to set instead; None for any other key."""
    group, _, name = str(key).rpartition(".")
    own = SET_BY_RUNNER.get(group, {}).get(name)
    if own is None:
        return None
    return (f"{key}: runner sets {target}'s {name} from {group}.{own}; set {group}.{own}=... "
            f"instead")


def describe_error(err: BaseException) -> "str | None":
    """One line for an error the user can fix (a RunnerError, or a Hydra/OmegaConf config
    error anywhere in the exception's chain); None for anything else (a bug: show it all)."""
    from hydra.errors import (ConfigCompositionException, InstantiationException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, RunnerError):
            return str(e)
    for e in chain:  # a file the run reads or writes: the OS's reason is the user's to fix
        if isinstance(e, OSError) and e.filename:
            return f"{e.filename}: {os_reason(e)}"
    for e in chain:
        unchosen = _unchosen_group(e) if isinstance(e, ConfigCompositionException) else None
        if unchosen:
            return f"{unchosen}: no option chosen; pick one with {unchosen}=<name>"
        if isinstance(e, MissingConfigException):
            group, _, name = (e.missing_cfg_file or "").rpartition("/")
            if (group, name) in MISSING_PLUGINS:
                return f"{group}={name}: {MISSING_PLUGINS[group, name]}"
            if group and e.options:
                return f"{group}={name}: no such option; available: {', '.join(e.options)}"
            return first_line(e)
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and getattr(e, "full_key", None):
            return _unknown_key(e)
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return f"{e.full_key}: {first_line(e)}"
    for e in chain:
        if isinstance(e, OverrideParseException):
            return f"cannot parse override '{e.override}': {first_line(e)}"
        if isinstance(e, ConfigCompositionException):  # its fix may be on a later line
            return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if isinstance(e, (InstantiationException, OmegaConfBaseException)):
            return first_line(e)
    return None


def _unchosen_group(err: BaseException) -> "str | None":
    """The group whose choice the defaults list interpolates (conf/config.yaml's
    ``model_${model}``) when it has none (``~model``), from Hydra's message."""
    import re

    found = re.match(r"Error resolving interpolation '[^']*\$\{([\w/]+)\}", first_line(err))
    return found.group(1) if found else None


def first_line(err: BaseException) -> str:
    text = getattr(err, "msg", None) or str(err)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _valid_keys(err: BaseException) -> str:
    """The keys of the config an unknown key was given to: its schema's fields, else (a config
    Hydra composed untyped) the keys it holds."""
    import dataclasses

    from omegaconf import DictConfig

    schema = getattr(err, "object_type", None)
    if schema is not None and dataclasses.is_dataclass(schema):
        keys = [f.name for f in dataclasses.fields(schema)]
    elif isinstance(getattr(err, "parent_node", None), DictConfig):
        keys = list(err.parent_node.keys())
    else:
        keys = []
    return ", ".join(str(k) for k in keys if k != "_target_")


def _unknown_key(err: BaseException) -> str:
    """``key: unknown key; valid keys: ...``. The ``+key=value`` hint only where it adds the
    key for good: to a dict of free keys (``device.xla_flags``), or for a target's parameter
    whose default no config holds (a function: ``runner.config.targets.signature_schema`` leaves it
    out). Elsewhere the job rejects the key anyway, and the user may have written the ``+``."""
    from omegaconf import DictConfig

    key, valid, parent = err.full_key, _valid_keys(err), getattr(err, "parent_node", None)
    target = parent.get("_target_") if isinstance(parent, DictConfig) else None
    driven = set_by_runner(key, target) if isinstance(target, str) else None
    if driven:
        return driven
    if isinstance(target, str) and _is_parameter(target, str(key).rsplit(".", 1)[-1]):
        return (f"{key}: a parameter of {target} that the config leaves out (its default is no "
                f"config value); set it with +{key}=...")
    return (f"{key}: unknown key" + (f"; valid keys: {valid}" if valid else "")
            + (" (use +key=value to add a new one)" if _free_keys(key) else ""))


def _is_parameter(target: str, name: str) -> bool:
    from runner.config.targets import import_object, parameters

    try:
        return name in parameters(import_object(target))
    except Exception:  # noqa: BLE001 (a target that does not import: the job says so)
        return False


def _free_keys(key) -> bool:
    """Whether ``key``'s parent is a dict of free keys in runner's schema (``RunConf``)."""
    import dataclasses
    import typing

    from runner.config.schema import RunConf

    kind: typing.Any = RunConf
    for name in str(key).split(".")[:-1]:
        kind = {f.name: f.type for f in dataclasses.fields(kind)}.get(name) \
            if dataclasses.is_dataclass(kind) else None
    return typing.get_origin(kind) is dict
