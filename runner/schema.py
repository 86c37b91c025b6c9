"""Typed schemas for every config group, registered with Hydra's ConfigStore.

Hydra checks types (``optimizer.lr=abc``) and unknown keys (``optimizer.lrr=1``) against these
while composing; ``validate`` then checks the value ranges declared next to each field
(``optimizer.lr=-1``, ``trainer.steps=0``, ``model.features=[0]``).
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from runner.errors import ConfigError


def bounded(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
            le: Optional[float] = None) -> Any:
    """A dataclass field whose value (or every item, for a list) must lie in the given range."""
    metadata = {"gt": gt, "ge": ge, "le": le}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Schedule(str, Enum):
    """Learning-rate schedule shapes; the peak value is ``optimizer.lr``."""

    constant = "constant"
    cosine = "cosine"
    warmup_cosine = "warmup_cosine"


class BestMode(str, Enum):
    """Whether a lower (``min``) or higher (``max``) ``trainer.best_metric`` is better."""

    min = "min"
    max = "max"


class Platform(str, Enum):
    """Where JAX runs: ``auto`` takes an accelerator when one is present, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    tpu = "tpu"


class Precision(str, Enum):
    """Compute dtype: ``bf16`` runs the model in bfloat16 on float32 params (mixed precision)."""

    fp32 = "fp32"
    bf16 = "bf16"


class MatmulPrecision(str, Enum):
    """``jax_default_matmul_precision``: ``default`` lets GPUs use TF32 and TPUs bf16 passes
    for float32 matmuls and convolutions; ``highest`` asks for full float32."""

    default = "default"
    high = "high"
    highest = "highest"


# ---- task ----------------------------------------------------------------------------------
@dataclass
class LinearFitConf:
    _target_: str = "tasks.linear_fit.LinearFit"
    output_dim: int = bounded(1, ge=1, le=1)
    num_train: int = bounded(100, gt=0)
    num_eval: int = bounded(100, gt=0)
    batch_size: int = bounded(100, gt=0)
    slope: float = 2.0
    intercept: float = 1.0
    noise_std: float = bounded(0.2, ge=0)


@dataclass
class CNNRandomImagesConf:
    _target_: str = "tasks.cnn_random_images.CNNRandomImages"
    batch_size: int = bounded(32, gt=0)
    num_eval: int = bounded(320, gt=0)
    image_size: int = bounded(84, gt=0)
    channels: int = bounded(3, gt=0)
    num_classes: int = bounded(10, gt=1)
    output_dim: int = bounded(10, gt=1)
    prototype_size: int = bounded(7, gt=0)
    noise_std: float = bounded(3.0, ge=0)


# ---- model ---------------------------------------------------------------------------------
@dataclass
class MLPConf:
    _target_: str = "models.mlp.MLP"
    features: List[int] = bounded([128], gt=0)
    out_features: int = bounded(1, gt=0)
    activation: Optional[str] = None
    kernel_init: Any = MISSING
    bias_init: Any = MISSING


@dataclass
class CNNConf:
    _target_: str = "models.cnn.CNN"
    conv_features: List[int] = bounded([64, 128], gt=0)
    kernel_sizes: List[int] = bounded([3, 3], gt=0)
    pool_size: int = bounded(2, gt=0)
    dense_features: List[int] = bounded([64], gt=0)
    num_classes: int = bounded(10, gt=0)
    first_kernel_init: Any = MISSING


# ---- optimizer -----------------------------------------------------------------------------
@dataclass
class OptimizerConf:
    """Keys every optimizer has; ``_target_`` names the optax factory, the rest are its own."""

    _target_: str = MISSING
    lr: float = bounded(1e-3, gt=0)
    schedule: Schedule = Schedule.constant
    warmup_steps: int = bounded(0, ge=0)
    clip_norm: Optional[float] = bounded(None, gt=0)


@dataclass
class AdamConf(OptimizerConf):
    _target_: str = "optax.adam"
    b1: float = bounded(0.9, ge=0, le=1)
    b2: float = bounded(0.999, ge=0, le=1)
    eps: float = bounded(1e-8, ge=0)


@dataclass
class AdamWConf(AdamConf):
    _target_: str = "optax.adamw"
    weight_decay: float = bounded(1e-4, ge=0)


@dataclass
class SGDConf(OptimizerConf):
    _target_: str = "optax.sgd"
    momentum: Optional[float] = bounded(0.9, ge=0, le=1)
    nesterov: bool = False


@dataclass
class RMSPropConf(OptimizerConf):
    _target_: str = "optax.rmsprop"
    decay: float = bounded(0.9, ge=0, le=1)
    eps: float = bounded(1e-8, ge=0)
    momentum: Optional[float] = bounded(None, ge=0, le=1)
    centered: bool = False


# ---- device, trainer, run ------------------------------------------------------------------
@dataclass
class DeviceConf:
    platform: Platform = Platform.auto
    # GPU memory: preallocation (null = JAX's default, except off when jobs run in parallel
    # processes on one machine) and the fraction of memory JAX may take (null = JAX's default).
    preallocate: Optional[bool] = None
    mem_fraction: Optional[float] = bounded(None, gt=0, le=1)
    # JAX's persistent compilation cache, shared by every process (null = off).
    compilation_cache_dir: Optional[str] = "${oc.env:XDG_CACHE_HOME,'~/.cache'}/runner/jax"
    # Data parallelism: the batch is split over this many devices (null = every device of the
    # platform, over all processes); params and optimizer state are replicated.
    num_devices: Optional[int] = bounded(None, gt=0)
    # Several processes (hosts): jax.distributed.initialize, which detects SLURM (and other
    # clusters) by itself; or give the coordinator's host:port, the process count and this
    # process's index.
    distributed: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = bounded(None, gt=0)
    process_id: Optional[int] = bounded(None, ge=0)
    precision: Precision = Precision.fp32
    matmul_precision: Optional[MatmulPrecision] = None
    # XLA flags (name: value) added to XLA_FLAGS before JAX starts its backend; a flag the
    # environment's XLA_FLAGS already sets is left as it is. XLA reads them once per process.
    xla_flags: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConf:
    steps: int = bounded(200, gt=0)
    log_every: int = bounded(50, gt=0)
    eval_every: Optional[int] = bounded(100, gt=0)
    checkpoint_every: Optional[int] = bounded(100, gt=0)
    steps_per_dispatch: Optional[int] = bounded(None, gt=0)
    scan_unroll: int = bounded(1, gt=0)
    progress_bar: bool = True
    log_images: bool = True
    log_histograms: bool = False
    keep_checkpoints: Optional[int] = bounded(None, gt=0)
    best_metric: str = "loss"
    best_mode: BestMode = BestMode.min


@dataclass
class RunConf:
    seed: int = bounded(0, ge=0, le=2**31 - 1)  # a jitted int32 argument
    resume: Optional[str] = None
    task: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    device: DeviceConf = field(default_factory=DeviceConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)


SCHEMAS = {
    "task": {"linear_fit": LinearFitConf, "cnn_random_images": CNNRandomImagesConf},
    "model": {"mlp": MLPConf, "cnn": CNNConf},
    "optimizer": {"adam": AdamConf, "adamw": AdamWConf, "sgd": SGDConf, "rmsprop": RMSPropConf},
    "device": {"device": DeviceConf},
}


def register_schemas() -> None:
    """Store the schemas so that configs can extend them (``- /schema/optimizer/adam@_here_``)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConf)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def validate(cfg: DictConfig, path: str = "") -> None:
    """Raise ConfigError for the first value outside the range its schema field declares."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        schema = None
    for f in dataclasses.fields(schema) if schema else ():
        key = f"{path}{f.name}"
        value = cfg[f.name] if f.name in cfg else None
        _check_range(key, value, f.metadata)
    for name in cfg:
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_none():
            validate(node, f"{path}{name}.")


def _check_range(key: str, value: Any, bounds: Any) -> None:
    if value is None or not bounds:
        return
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    if isinstance(value, (list, ListConfig)) and not items:
        raise ConfigError(f"{key}=[]: must list at least one value")
    for item in items:
        if bounds.get("gt") is not None and not item > bounds["gt"]:
            raise ConfigError(f"{key}={_show(value)}: must be > {bounds['gt']}")
        if bounds.get("ge") is not None and not item >= bounds["ge"]:
            raise ConfigError(f"{key}={_show(value)}: must be >= {bounds['ge']}")
        if bounds.get("le") is not None and not item <= bounds["le"]:
            raise ConfigError(f"{key}={_show(value)}: must be <= {bounds['le']}")


def _show(value: Any) -> str:
    if isinstance(value, ListConfig):
        return str(OmegaConf.to_container(value))
    return str(value)
