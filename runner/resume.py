"""``python -m runner resume=<run_dir> [key=value ...]``: continue a run in its own dir."""

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from runner.checkpoint import write_atomic
from runner.device import launch_process_index
from runner import lock
from runner.errors import (AlreadyComplete, ConfigError, RunnerError, describe_error,
                           first_line)
from runner.inputs import use_recorded, verify
from runner.schema import typed

GROUPS = ("task", "model", "optimizer", "device", "hparams_search")
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


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Tuple[DictConfig, List[str]]:
    """The config stored in ``run_dir/.hydra`` (typed by the schemas), with ``overrides``
    (``key=value``) applied on top; and the run's own overrides."""
    stored_path = run_dir / ".hydra" / "config.yaml"
    if not stored_path.is_file():
        raise RunnerError(f"{run_dir}: not a run dir (no .hydra/config.yaml)")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in GROUPS or "/" in key or key.startswith("hydra"):
            raise RunnerError(f"{override}: a resumed run keeps its task, model, optimizer and "
                              f"device; change values (e.g. trainer.steps=400), not groups")
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    stored_overrides = (OmegaConf.to_container(OmegaConf.load(overrides_path))
                        if overrides_path.is_file() else [])
    # Typed by runner's own schema (keys added since the run was made get their defaults;
    # task, model and optimizer are checked against their targets when built). The new
    # overrides win over the stored values (``+key=value`` adds a key, as for a new run).
    try:
        stored = OmegaConf.load(stored_path)
    except Exception as err:  # noqa: BLE001 (yaml's and OmegaConf's errors for a bad file)
        raise ConfigError(f"{stored_path}: not a readable config "
                          f"({describe_error(err) or first_line(err)})") from None
    check_trusted(stored, stored_path)
    try:
        cfg = typed(stored)  # struct, as Hydra composes: a new key needs +key=value
    except ConfigError as err:  # a value or key the schema rejects, named
        raise ConfigError(f"{stored_path}: {err}") from None
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(
        [o for o in overrides if not o.startswith("+")]))
    for override in (o[1:] for o in overrides if o.startswith("+")):
        key = override.split("=", 1)[0]
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key),
                         force_add=True)
    cfg.resume = None
    use_recorded(cfg, run_dir)
    return cfg, [*stored_overrides, *overrides]


def build_stored(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()):
    """The stored run's task, model and optimizer; a value they reject names the file."""
    from runner.build import build_parts

    try:
        return build_parts(cfg)
    except ConfigError as err:
        given = " with the overrides given" if overrides else ""
        raise ConfigError(f"{run_dir / '.hydra' / 'config.yaml'}{given}: {err}") from None


def resume_run(run_dir_arg: str, overrides: Sequence[str]) -> Tuple[Path, Dict[str, Any]]:
    """Continue the run in ``run_dir_arg`` from its newest valid checkpoint, in place, holding
    its lock; the run dir and the run's summary. A completed run raises AlreadyComplete."""
    from runner.sweep import read_metrics
    from runner.train import run

    run_dir = Path(run_dir_arg).expanduser().resolve()
    if not run_dir.is_dir():
        raise RunnerError(f"resume={run_dir_arg}: no such directory")
    cfg, all_overrides = load_run_config(run_dir, overrides)
    # Every value checked, and the task's files against the record, before anything in the
    # run dir is rewritten.
    verify(build_stored(cfg, run_dir, overrides).task, run_dir)
    writer = launch_process_index(cfg.device) == 0
    _check_not_complete(read_metrics(run_dir), run_dir, cfg)  # touches nothing, not even the lock
    with lock.hold(run_dir) if writer else nullcontext():
        _check_not_complete(read_metrics(run_dir), run_dir, cfg)  # as it stands, held
        _log_to(run_dir / "runner.log")
        # The run dir's config is the run's as it now stands (for later resumes and
        # runner.eval); written by one process of a multi-process run.
        if writer:
            write_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg).encode())
            write_atomic(run_dir / ".hydra" / "overrides.yaml",
                         OmegaConf.to_yaml(OmegaConf.create(all_overrides)).encode())
        return run_dir, run(cfg, run_dir, overrides=all_overrides, resume=True)


def _check_not_complete(done: Dict[str, Any], run_dir: Path, cfg: DictConfig) -> None:
    """A completed run (an early-stopped one too: it is finished) raises AlreadyComplete."""
    if done.get("status") == "completed" and done.get("steps", 0) >= cfg.trainer.steps:
        raise AlreadyComplete(run_dir, done["steps"])
    if done.get("status") == "completed" and done.get("stopped_early_at") is not None:
        raise AlreadyComplete(run_dir, done["steps"], stopped_early=True)


def _log_to(log_file: Path) -> None:
    """Log as Hydra does for a run (console and the run's log file), appending."""
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file, mode="a")):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("jax").setLevel(logging.WARNING)
