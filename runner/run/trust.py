"""Which code a stored run config may call: ``resume=`` and ``runner.eval`` build every
``_target_`` in it, and a run dir may come from anyone (shared, downloaded)."""

import os
import shlex
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, ListConfig

from runner.config.errors import RunnerError, runner_command

# A stored config may come from anyone (a shared or downloaded run dir), and building it calls
# every `_target_` in it: only these module prefixes, and those the user names in RUNNER_TRUST
# (comma-separated), are called.
TRUSTED = ("runner", "optax", "flax", "jax")
TRUST_VARIABLE = "RUNNER_TRUST"


def check_trusted(cfg: Any, path: Path, key: str = "") -> None:
    """Raise before anything is built when a ``_target_`` of the stored config lies outside
    the trusted modules, naming the key and the target."""
    trusted = (*TRUSTED, *filter(None, os.environ.get(TRUST_VARIABLE, "").split(",")))
    if isinstance(cfg, DictConfig):
        target = cfg.get("_target_")
        if target is not None and not any(str(target) == t.strip() or str(target).startswith(
                f"{t.strip()}.") for t in trusted):
            raise RunnerError(f"{path}: {key}_target_={target} is not in a trusted module "
                              f"({', '.join(trusted)}); if you trust this run dir, add its "
                              f"module: {TRUST_VARIABLE}={str(target).split('.')[0]}")
        for name, value in cfg.items():
            check_trusted(value, path, f"{key}{name}.")
    elif isinstance(cfg, ListConfig):
        for i, value in enumerate(cfg):
            check_trusted(value, path, f"{key[:-1]}[{i}].")


def untrusted_modules(cfg: Any) -> List[str]:
    """The top-level modules of ``cfg``'s targets outside the built-in trusted ones (a user's
    own package), in order of appearance."""
    found: List[str] = []
    if isinstance(cfg, DictConfig):
        target = cfg.get("_target_")
        if target is not None and str(target).split(".")[0] not in TRUSTED:
            found.append(str(target).split(".")[0])
        for value in cfg.values():
            found.extend(untrusted_modules(value))
    elif isinstance(cfg, ListConfig):
        for value in cfg:
            found.extend(untrusted_modules(value))
    return list(dict.fromkeys(found))


def resume_command(run_dir: Path, cfg: Any) -> str:
    """The command that continues the run in ``run_dir`` as it stands, ready to paste into a
    shell of the same working directory: the interpreter that runs now, and the user's own
    modules of every ``_target_`` of ``cfg`` named in RUNNER_TRUST (resume refuses them
    otherwise)."""
    modules = untrusted_modules(cfg)
    trust = f"{TRUST_VARIABLE}={shlex.quote(','.join(modules))} " if modules else ""
    return f"{trust}{runner_command(f'resume={run_dir}')}"
