"""``python -m runner resume=<run_dir> [key=value ...]``: continue a run in its own dir."""

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from runner.config.errors import (AlreadyComplete, ConfigError, RunnerError, describe_error,
                           first_line)
from runner.config.schema import typed
from runner.io import lock
from runner.io.files import RECORD_KEYS, read_metrics, write_metrics
from runner.io.inputs import use_recorded, verify
from runner.io.layout import RunPaths
from runner.io.rundir import LOG_FORMAT, HydraJob, recorded_choices
from runner.run.trust import check_trusted

if TYPE_CHECKING:  # built on demand: importing it imports JAX
    from runner.run.build import Parts

GROUPS = ("task", "model", "optimizer", "device", "hparams_search")
def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> Tuple[DictConfig, List[str]]:
    """The config stored in ``run_dir/.hydra`` (typed by the schemas), with ``overrides``
    (``key=value``) applied on top; and the run's own overrides."""
    stored_path = RunPaths(run_dir).hydra_file("config.yaml")
    if not stored_path.is_file():
        raise RunnerError(f"{run_dir}: not a run dir (no .hydra/config.yaml)")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in GROUPS or "/" in key or key.startswith("hydra"):
            raise RunnerError(f"{override}: a resumed run keeps its task, model, optimizer and "
                              f"device; change values (e.g. trainer.steps=400), not groups")
    overrides_path = RunPaths(run_dir).hydra_file("overrides.yaml")
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
    from runner.run.build import build_parts

    try:
        return build_parts(cfg)
    except ConfigError as err:
        given = " with the overrides given" if overrides else ""
        raise ConfigError(f"{RunPaths(run_dir).hydra_file('config.yaml')}{given}: {err}") from None


def resume_run(run_dir_arg: str, overrides: Sequence[str]) -> Tuple[Path, Dict[str, Any]]:
    """Continue the run in ``run_dir_arg`` from its newest valid checkpoint, in place, holding
    its lock; the run dir and the run's summary. A completed run raises AlreadyComplete and
    leaves every file as it was (the lock file too); so does a run with nothing left to train
    (its newest checkpoint at or past ``trainer.steps``), once recorded completed."""
    from runner.run.train import run

    run_dir = Path(run_dir_arg).expanduser().resolve()
    if run_dir.is_file():
        raise RunnerError(f"resume={run_dir_arg}: a file; give the run's dir (the one that "
                          f"holds .hydra/ and checkpoints/)")
    if not run_dir.is_dir():
        raise RunnerError(f"resume={run_dir_arg}: no such directory")
    cfg, all_overrides = load_run_config(run_dir, overrides)
    # Every value checked, and the task's files against the record, before anything in the
    # run dir is rewritten.
    parts = build_stored(cfg, run_dir, overrides)
    verify(parts.task, run_dir)
    # HParams name the task, model and optimizer by the options the run was composed with.
    choices = recorded_choices(run_dir)
    _log_to_console()
    # The run dir's config is the run's as it now stands (for later resumes and runner.eval).
    job = HydraJob(cfg, None, all_overrides)
    try:
        return run_dir, run(cfg, run_dir, overrides=all_overrides, claim=_unless_complete(cfg),
                            hydra_job=job, parts=parts, choices=choices)
    except AlreadyComplete:  # nothing to train: a run not yet recorded completed is now
        if read_metrics(run_dir).get("status") != "completed":
            record_completed(cfg, run_dir, parts)
        raise


def record_completed(cfg: DictConfig, run_dir: Path, parts: "Parts") -> None:
    """Record the run in ``run_dir`` completed at its newest valid checkpoint (which reaches
    ``trainer.steps``), with that state's eval metrics, as a finished run records itself; the
    run's earlier record (overrides, times) kept, its failure reason dropped. Holds the run
    dir's lock; every other file stays as it was (the lock file too)."""
    from runner.io.checkpoint import read_best, restore_latest
    from runner.platform.device import is_primary

    if not is_primary(cfg.device):  # process 0 writes the run's files
        return
    ckpt_dir = RunPaths(run_dir).checkpoints
    with lock.hold(run_dir) as before:
        try:
            record = read_metrics(run_dir)
            if record.get("status") == "completed":  # another resume just recorded it
                return
            # kept as data: what another version of runner recorded beside is dropped
            record = {k: v for k, v in record.items() if k in RECORD_KEYS}
            state, path, metrics = evaluate_checkpoint(
                cfg, parts, lambda template: restore_latest(ckpt_dir, template))
            if state is None:
                return
            record.update(status="completed", reason=None, steps=int(state.step),
                          eval=metrics, checkpoint=str(path),
                          best=read_best(ckpt_dir, metric=cfg.trainer.best_metric,
                                         mode=cfg.trainer.best_mode))
            write_metrics(run_dir, record)
        finally:
            lock.sign(run_dir, before)


def evaluate_checkpoint(cfg: DictConfig, parts: "Parts",
                        restore: Callable[[Any], Tuple[Any, Optional[Path]]]
                        ) -> Tuple[Any, Optional[Path], Dict[str, float]]:
    """The state and path ``restore(template)`` gives (a checkpoint of the run; None, None:
    there is none) and the state's eval metrics on the task's held-out set."""
    import jax

    from runner.config.schema import Precision
    from runner.core.steps import evaluate, setup
    from runner.run.build import COMPUTE_DTYPES

    template, data, _, _ = setup(cfg.seed, *parts, host_fed=True)  # no training set needed
    state, path = restore(template)
    if state is None:
        return None, None, {}
    metrics, _ = evaluate(state, data, task=parts.task,
                          compute_dtype=COMPUTE_DTYPES[Precision(cfg.device.precision)])
    return state, path, {k: float(v) for k, v in jax.device_get(metrics).items()}


def _unless_complete(cfg: DictConfig):
    """``resume=``'s claim: a completed run (one a callback stopped too: it is finished) raises
    AlreadyComplete; anything else resumes."""
    def claim(run_dir: Path, writer: bool) -> bool:
        done = read_metrics(run_dir)
        if done.get("status") == "completed" and done.get("steps", 0) >= cfg.trainer.steps:
            raise AlreadyComplete(run_dir, done["steps"])
        if done.get("status") == "completed" and (
                done.get("stopped_early_at") is not None or done.get("stopped_at") is not None):
            raise AlreadyComplete(run_dir, done["steps"],
                                  stopped_early=done.get("stopped_early_at") is not None,
                                  stopped_by=done.get("stopped_by") or "a callback")
        if done.get("status") == "pruned":
            raise AlreadyComplete(run_dir, done["steps"], pruned=True)
        return True
    return claim


def _log_to_console() -> None:
    """Log to the console as Hydra does for a run (``runner.log`` is the run's: it opens it
    once the run dir is its own)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.getLogger("jax").setLevel(logging.WARNING)
