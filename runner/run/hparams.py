"""The hyperparameters a run shows in TensorBoard's HPARAMS tab."""

from typing import Any, Dict, Mapping, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

ENDED = ("completed", "pruned")  # the statuses of a run that ended (HParams: its session end)
# Overridable keys that do not change what is learned: no HParams column for them (nor for
# the keys under one: logger.mlflow.tracking_uri).
NOT_HPARAMS = {"trainer.progress_bar", "trainer.log_images", "trainer.log_histograms",
               "device.compilation_cache_dir", "logger"}


def job_choices() -> Dict[str, Any]:
    """The config group options of the job Hydra is running now (``task: linear_fit``, ...);
    {} outside Hydra. Taken when a job starts: a fused launcher trains its jobs later, under
    the sweep's own Hydra config."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def run_hparams(cfg: DictConfig, overrides: Sequence[str] = (), *,
                choices: Optional[Mapping[str, Any]] = None,
                platform: Optional[str] = None) -> Dict[str, Any]:
    """The run's main choices (task, model, optimizer, lr, seed, steps, device) plus every key
    its overrides set, so a sweep's table has a column for each swept key. ``choices`` are the
    job's group options (default: the current Hydra job's, ``job_choices``; a resumed run's:
    those its first attempt recorded, ``runner.io.rundir.recorded_choices``), so that every
    attempt and launcher labels a run alike; without any, a group is named by its class.
    ``platform`` is the platform that ran (``cpu``), else the configured one (``auto``)."""
    choices = job_choices() if choices is None else choices
    name = lambda group: choices.get(group) or cfg[group]._target_.rsplit(".", 1)[-1]  # noqa
    hparams: Dict[str, Any] = {
        "task": name("task"), "model": name("model"), "optimizer": name("optimizer"),
        "optimizer.lr": cfg.optimizer.lr, "seed": cfg.seed, "trainer.steps": cfg.trainer.steps,
        "device": platform or _plain(cfg.device.platform), "experiment": cfg.get("experiment")}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if (key.startswith("hydra") or "/" in key or "@" in key or key in hparams
                or key in NOT_HPARAMS or key.split(".", 1)[0] in NOT_HPARAMS):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            value = choices.get(key)  # a group choice such as task=...
        hparams[key] = _plain(value)
    return {k: v for k, v in hparams.items() if v is not None}


def end_hparams(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """How a run ended, as HParams columns to filter its table by: ``status`` (``completed``,
    ``pruned``) and a pruned run's ``pruned_at`` step; {} for a run that did not end (failed,
    interrupted: a resume may end it)."""
    if summary.get("status") not in ENDED:
        return {}
    return {key: summary[key] for key in ("status", "pruned_at") if key in summary}


def _plain(value: Any) -> Any:
    """A value TensorBoard's HParams can show: bool, number or string."""
    if isinstance(value, ListConfig):
        return str(OmegaConf.to_container(value))
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(getattr(value, "value", value))
