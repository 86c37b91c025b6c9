"""The hyperparameters a run shows in TensorBoard's HPARAMS tab."""

from typing import Any, Dict, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

# Overridable keys that do not change what is learned: no HParams column for them.
NOT_HPARAMS = {"trainer.progress_bar", "trainer.log_images", "trainer.log_histograms",
               "device.compilation_cache_dir"}


def run_hparams(cfg: DictConfig, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The run's main choices (task, model, optimizer, lr, seed, steps, device) plus every key
    its overrides set, so a sweep's table has a column for each swept key."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    name = lambda group: choices.get(group) or cfg[group]._target_.rsplit(".", 1)[-1]  # noqa
    hparams: Dict[str, Any] = {
        "task": name("task"), "model": name("model"), "optimizer": name("optimizer"),
        "optimizer.lr": cfg.optimizer.lr, "seed": cfg.seed, "trainer.steps": cfg.trainer.steps,
        "device": cfg.device.platform.value if hasattr(cfg.device.platform, "value")
        else str(cfg.device.platform), "experiment": cfg.get("experiment")}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if (key.startswith("hydra") or "/" in key or "@" in key or key in hparams
                or key in NOT_HPARAMS):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            value = choices.get(key)  # a group choice such as task=...
        hparams[key] = _plain(value)
    return {k: v for k, v in hparams.items() if v is not None}


def _plain(value: Any) -> Any:
    """A value TensorBoard's HParams can show: bool, number or string."""
    if isinstance(value, ListConfig):
        return str(OmegaConf.to_container(value))
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(getattr(value, "value", value))
