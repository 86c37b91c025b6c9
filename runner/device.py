"""The ``device`` group: where and how JAX runs, set before JAX initialises a backend."""

import os
from pathlib import Path
from typing import List

import jax
from omegaconf import DictConfig

from runner.errors import RunnerError
from runner.schema import Platform

# JAX's platform names for the config's choices (``auto`` leaves JAX's own preference order:
# an accelerator when one is present, else the CPU).
_JAX_PLATFORMS = {Platform.cpu: "cpu", Platform.gpu: "cuda", Platform.tpu: "tpu"}


def configure_jax(cfg: DictConfig) -> List[jax.Device]:
    """Apply the ``device`` config and return the devices JAX will use.

    Must run before anything creates a JAX array: the platform and the GPU memory settings
    are read once, when JAX starts its backend.
    """
    if cfg.preallocate is not None:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = str(cfg.preallocate).lower()
    if cfg.mem_fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(cfg.mem_fraction)
    if cfg.compilation_cache_dir:
        cache_dir = Path(cfg.compilation_cache_dir).expanduser()
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        # Cache every compiled step, not only those over JAX's default 1 s of compile time:
        # sweep jobs in separate processes (joblib, SLURM) then compile each step once.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    platform = Platform(cfg.platform)
    if platform != Platform.auto:
        jax.config.update("jax_platforms", _JAX_PLATFORMS[platform])
    try:
        devices = jax.devices()
    except Exception:  # noqa: BLE001 (JAX raises RuntimeError, or AssertionError for 'cuda')
        name = platform.value.upper()
        raise RunnerError(
            f"device={platform.value}: JAX has no usable {name} here (no {name} is visible, or "
            f"jaxlib's {name} support is not installed); use device=cpu, or device=auto to "
            f"take whatever is present") from None
    if platform != Platform.auto and devices[0].platform not in _JAX_PLATFORMS[platform]:
        raise RunnerError(f"device={platform.value}: JAX is already running on "
                          f"{devices[0].platform}; the platform is fixed once JAX has started")
    return devices
