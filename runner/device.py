"""The ``device`` group: choose JAX's platform before JAX initialises a backend."""

from typing import List

import jax
from omegaconf import DictConfig

from runner.errors import RunnerError
from runner.schema import Platform

# JAX's platform names for the config's choices (``auto`` leaves JAX's own preference order:
# an accelerator when one is present, else the CPU).
_JAX_PLATFORMS = {Platform.cpu: "cpu", Platform.gpu: "cuda", Platform.tpu: "tpu"}


def select_devices(cfg: DictConfig) -> List[jax.Device]:
    """Apply ``device.platform`` and return the devices JAX will use.

    Must run before anything creates a JAX array; afterwards JAX's platform is fixed.
    """
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
