"""The ``device`` group: where and how JAX runs (platform, XLA flags, precision, distributed
initialisation), set before JAX initialises a backend."""

import logging
import os
import re
from pathlib import Path
from typing import List, Optional

import jax
from omegaconf import DictConfig

from runner.config.errors import ConfigError, RunnerError
from runner.config.schema import Platform
from runner.platform.launch import launcher_rank

log = logging.getLogger(__name__)

# JAX's platform names for the config's choices (``auto`` leaves JAX's own preference order:
# an accelerator when one is present, else the CPU). The CPU comes second on accelerators: XLA's
# cost analysis of the step (for perf/mfu) runs there.
_JAX_PLATFORMS = {Platform.cpu: "cpu", Platform.gpu: "cuda,cpu", Platform.tpu: "tpu,cpu"}
# What ``jax.Device.platform`` says for each (a CUDA device reports "gpu").
_DEVICE_PLATFORMS = {Platform.cpu: {"cpu"}, Platform.gpu: {"gpu", "cuda"}, Platform.tpu: {"tpu"}}


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
    jax.config.update("jax_debug_nans", bool(cfg.get("debug_nans")))
    if cfg.matmul_precision is not None:
        jax.config.update("jax_default_matmul_precision", str(cfg.matmul_precision.value))
    platform = Platform(cfg.platform)
    started = _backends_started()
    _add_xla_flags(cfg.get("xla_flags") or {}, started=started)
    if platform != Platform.auto:
        jax.config.update("jax_platforms", _JAX_PLATFORMS[platform])
    if cfg.distributed:
        _initialize_distributed(cfg)
    name = platform.value.upper()
    missing = RunnerError(
        f"device={platform.value}: JAX has no usable {name} here (no {name} is visible, or "
        f"jaxlib's {name} support is not installed); use device=cpu, or device=auto to take "
        f"whatever is present")
    try:
        devices = jax.devices()
    except Exception:  # noqa: BLE001 (JAX raises RuntimeError, or AssertionError for 'cuda')
        raise missing from None
    _STARTED.append(True)
    if platform != Platform.auto and devices[0].platform not in _DEVICE_PLATFORMS[platform]:
        if not started:  # JAX skipped the missing accelerator and took the CPU listed after it
            raise missing
        raise RunnerError(f"device={platform.value}: JAX is already running on "
                          f"{devices[0].platform}; the platform is fixed once JAX has started")
    return devices


_XLA_FLAG_NAME = re.compile(r"xla_[a-z0-9_]+")


def xla_flag_args(flags) -> List[str]:
    """``device.xla_flags`` as XLA_FLAGS arguments (``--name=value``)."""
    args = []
    for name, value in flags.items():
        if not _XLA_FLAG_NAME.fullmatch(str(name)):
            raise ConfigError(f"device.xla_flags.{name}: not an XLA flag name (xla_..., as "
                              f"in XLA_FLAGS)")
        if isinstance(value, bool):
            value = str(value).lower()
        elif not isinstance(value, (int, float, str)) or re.search(r"\s", str(value)):
            raise ConfigError(f"device.xla_flags.{name}={value!r}: must be a bool, a number "
                              f"or a string without spaces")
        args.append(f"--{name}={value}")
    return args


def with_xla_flags(flags, env: str) -> str:
    """``env`` (an XLA_FLAGS value) with ``flags`` added, except those it sets already (the
    environment's own settings win)."""
    given = {arg.split("=", 1)[0].lstrip("-") for arg in env.split()}
    args = [arg for arg in xla_flag_args(flags) if arg.split("=", 1)[0][2:] not in given]
    return " ".join([env, *args]).strip()


def _add_xla_flags(flags, *, started: bool) -> None:
    """Set XLA_FLAGS to the environment's own (as this process found it) plus ``flags``. XLA
    reads XLA_FLAGS once, when JAX starts its backend: a later job of a multirun in this
    process that asks for other flags runs with the first job's (warned). XLA itself rejects
    an unknown name."""
    global _ENV_XLA_FLAGS
    if _ENV_XLA_FLAGS is None:
        _ENV_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
    wanted, current = with_xla_flags(flags, _ENV_XLA_FLAGS), os.environ.get("XLA_FLAGS", "")
    if wanted.split() == current.split():
        return
    if started:
        log.warning("device.xla_flags ask for XLA_FLAGS=%r, but XLA read %r when JAX started in "
                    "this process (once per process): this job runs with the latter", wanted,
                    current)
        return
    log.info("XLA_FLAGS=%s (device.xla_flags added)", wanted)
    os.environ["XLA_FLAGS"] = wanted


_ENV_XLA_FLAGS = None  # XLA_FLAGS as the environment set it, before any device.xla_flags
_STARTED: List[bool] = []  # non-empty once configure_jax has started JAX in this process


def _backends_started() -> bool:
    """Whether JAX's backend already runs in this process (it reads the platform and
    XLA_FLAGS once, at its start). JAX has no public way to ask; runner knows of the start
    it made itself (an earlier job of a multirun in this process)."""
    return bool(_STARTED)


def available_memory() -> Optional[int]:
    """Bytes of host memory available to a new allocation without swapping (Linux's
    ``MemAvailable``: free plus reclaimable page cache), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_primary(cfg: DictConfig) -> bool:
    """Whether this process is the one that writes the run's files (TensorBoard, checkpoints,
    ``metrics.json``): process 0. Known before JAX starts (``launch_process_index``), which a
    run needs to decide on its dir before it builds; once ``jax.distributed`` runs, JAX's own
    index decides."""
    if jax.distributed.is_initialized():
        return jax.process_index() == 0
    return launch_process_index(cfg) == 0


def launch_process_index(cfg: DictConfig) -> int:
    """This process's index in a multi-process run, known before JAX starts: the configured
    ``device.process_id``, else the launcher's rank (SLURM, Open MPI, PMI), else 0."""
    if not cfg.distributed:
        return 0
    if cfg.process_id is not None:
        return cfg.process_id
    return launcher_rank() or 0


# A process that dies without a word (SIGKILL, a crash) is noticed by the others when its
# heartbeats stop for this long, and they end too (JAX's default, 100 s, kept them waiting for
# minutes). Failures runner sees are shared at once (runner.platform.peers); at exit a process waits at
# most SHUTDOWN_TIMEOUT_S for the others (JAX's default: 300 s).
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 30


def _initialize_distributed(cfg: DictConfig) -> None:
    """``jax.distributed.initialize`` with the explicit settings given (the rest detected from
    SLURM, Open MPI, Kubernetes... by JAX); once per process."""
    if jax.distributed.is_initialized():
        return
    given = {key: cfg[key] for key in ("coordinator_address", "num_processes", "process_id")
             if cfg[key] is not None}
    try:
        jax.distributed.initialize(**given, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 (ValueError, RuntimeError, XlaRuntimeError)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunnerError(
            f"device.distributed=true: jax.distributed.initialize failed ({reason}); outside "
            f"SLURM (or another cluster JAX detects) set device.coordinator_address=<host:port>, "
            f"device.num_processes and device.process_id") from None
