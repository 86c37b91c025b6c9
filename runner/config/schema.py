"""runner's own config keys as typed dataclasses: the run (``seed``, ``trainer``, ``device``)
and the keys every optimizer has. Each default and range is declared here, once.

Hydra checks keys (``trainer.stepz=1``) against these while composing (``conf/config.yaml``
extends ``run_schema``); the values are checked inside the job, so that a bad value in a sweep
fails that job alone: ``typed`` converts each value to its field's type (``trainer.steps=abc``),
``validate`` checks the ranges declared next to each field (``trainer.steps=0``). Task, model
and optimizer-factory keys come from their classes' signatures (``runner.config.targets``).
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from runner.config.errors import check_range


def bounded(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
            le: Optional[float] = None) -> Any:
    """A dataclass field whose value (or every item, for a list) must lie in the given range."""
    metadata = {"gt": gt, "ge": ge, "le": le}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _choices(name: str, values: str, doc: str) -> type:
    """A str enum whose members are named as their values: OmegaConf checks a value is one."""
    choice = Enum(name, {value: value for value in values.split()}, type=str, module=__name__)
    choice.__doc__ = doc
    return choice


Schedule = _choices("Schedule", "constant cosine warmup_cosine",
                    "Learning-rate schedule shapes by name; the peak value is ``optimizer.lr``. "
                    "(``optimizer.schedule`` may also be a ``_target_`` node: "
                    "``runner.core.schedules``.)")
BestMode = _choices("BestMode", "min max", "Whether a lower (``min``) or higher (``max``) "
                    "``trainer.best_metric`` is better.")
Platform = _choices("Platform", "auto cpu gpu tpu", "Where JAX runs: ``auto`` takes an "
                    "accelerator when one is present, else the CPU.")
Precision = _choices("Precision", "fp32 bf16", "Compute dtype: ``bf16`` runs the model in "
                     "bfloat16 on float32 params (mixed precision).")
MatmulPrecision = _choices(
    "MatmulPrecision", "default high highest", "``jax_default_matmul_precision``: ``default`` "
    "lets GPUs use TF32 and TPUs bf16 passes for float32 matmuls and convolutions; "
    "``highest`` asks for full float32.")


def choice_value(choice: Any) -> str:
    """A choice as its plain string: a member of one of these enums (``BestMode.max``: what
    a typed config holds) its value, a string (an untyped config's, a task's own) itself."""
    return str(choice.value if isinstance(choice, Enum) else choice)


# ---- optimizer -----------------------------------------------------------------------------
@dataclass
class OptimizerConf:
    """Keys every optimizer has; ``_target_`` names the optax factory, whose own arguments
    (``b1``, ``momentum``...) join these with the factory's defaults (``runner.config.targets``).
    ``schedule``: a ``Schedule`` name, or a ``_target_`` node (``optimizer/schedule=<name>``),
    a multiplier of ``lr`` (``runner.core.schedules``). ``accumulate_steps``: gradients of this
    many (micro-)steps averaged into one update (``optax.MultiSteps``; null or 1: off).
    ``decay_exclude``: glob patterns of parameter paths the factory's weight decay spares (its
    ``mask``; ``runner.core.transforms.DecayMask``)."""

    _target_: str = MISSING
    lr: float = bounded(1e-3, gt=0)
    schedule: Any = Schedule.constant.value
    warmup_steps: int = bounded(0, ge=0)
    clip_norm: Optional[float] = bounded(None, gt=0)
    accumulate_steps: Optional[int] = bounded(None, gt=0)
    decay_exclude: Optional[List[str]] = None


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
    # jax_debug_nans (debug=nans): a NaN fails the run at the operation that made it.
    debug_nans: bool = False


@dataclass
class EarlyStopConf:
    # Stop after this many evals in a row without eval/<trainer.best_metric> improving on its
    # best by more than min_delta (null: never stop early).
    patience: Optional[int] = bounded(None, gt=0)
    min_delta: float = bounded(0.0, ge=0)


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
    # The eval metric that picks best.msgpack, early stopping's best, a sweep's best job and
    # the value a sweep job returns ("loss" or a metric of the task's), and whether higher
    # (max) or lower (min) is better. null: the task's own (accuracy, max for a classifier),
    # else loss, min (runner.tasks.base.best_rule, once the task is built).
    best_metric: Optional[str] = None
    best_mode: Optional[BestMode] = None
    early_stop: EarlyStopConf = field(default_factory=EarlyStopConf)
    # debug=profile: trace this many steps (after the compiling dispatch) into the run's tb/,
    # for TensorBoard's Profile tab (null: no trace).
    profile_steps: Optional[int] = bounded(None, gt=0)


@dataclass
class RunConf:
    experiment: Optional[str] = None  # set by the experiment=<name> config chosen
    seed: int = bounded(0, ge=0, le=2**31 - 1)  # a jitted int32 argument
    resume: Optional[str] = None
    # A run into a dir that holds another run: move that one to <dir>/attempts/<n> first.
    overwrite: bool = False
    task: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    device: DeviceConf = field(default_factory=DeviceConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    # The metric writers (conf/logger/<name>.yaml, logger=[a,b]): name -> its _target_ and
    # keys (runner.io.writers).
    logger: Dict[str, Any] = field(default_factory=dict)
    # name -> {_target_, every, ...its own arguments}: called every <every> steps
    # (runner.loop.callbacks); conf/callbacks/ and your config dir's callbacks/ hold options.
    callbacks: Dict[str, Any] = field(default_factory=dict)


def untyped(schema: type) -> DictConfig:
    """``schema``'s keys and defaults as a plain config, for Hydra to compose: a value of the
    wrong type then reaches the job (``typed``), where a sweep isolates its failure, instead of
    stopping the whole sweep while Hydra composes it."""
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(schema),
                                                   enum_to_str=True))


def typed(cfg: DictConfig) -> DictConfig:
    """The composed config on ``RunConf``: runner's own values converted to their fields' types
    (``"5"`` -> 5, ``"cosine"`` -> Schedule.cosine); one that cannot be is a ConfigError naming
    the key. Struct, as Hydra composes (a new key needs ``+key=value``)."""
    from runner.config.errors import ConfigError, describe_error

    if OmegaConf.get_type(cfg) is RunConf:
        return cfg  # typed already (a sweep job types it before its run)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConf), cfg)
    except Exception as err:  # noqa: BLE001 (OmegaConf's validation errors, named by key)
        raise ConfigError(describe_error(err) or str(err)) from None
    OmegaConf.set_struct(merged, True)
    return merged


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of runner's own keys (``seed``, ``trainer``,
    ``device``) outside the range its field declares. The task's, model's and optimizer's
    values are checked by ``runner.config.targets`` (the optimizer's common keys: ``check_fields``
    with ``OptimizerConf``, once typed)."""
    check_fields(RunConf, cfg, "")


def check_fields(schema: type, cfg: DictConfig, path: str) -> None:
    for f in dataclasses.fields(schema):
        value = cfg.get(f.name)
        if dataclasses.is_dataclass(f.type) and isinstance(value, DictConfig):
            check_fields(f.type, value, f"{path}{f.name}.")
        elif f.metadata and value is not None:
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value)
            check_range(f"{path}{f.name}", value, **f.metadata)
