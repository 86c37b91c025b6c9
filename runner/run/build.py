"""A run's build step: from the config to everything its host loop needs, in one ``Run``."""

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from omegaconf import DictConfig

from runner.config.errors import AlreadyComplete, ConfigError, RunnerError
from runner.config.schema import Precision, validate
from runner.config.targets import build, check
from runner.core.cadence import Cadence
from runner.core.optim import (Optimizer, make_optimizer, with_hyperparams,
                               with_schedule_length)
from runner.core.shapes import check_output
from runner.core.examples import probe
from runner.core.sharding import DATA_AXIS, make_mesh, place, replicated
from runner.io.layout import RunPaths
from runner.loop.throughput import peak_flops
from runner.core.spec import StepSpec
from runner.core.steps import check_examples, setup, step_flops
from runner.io import inputs
from runner.io.checkpoint import list_checkpoints, restore_latest
from runner.loop.feed import from_host
from runner.loop.callbacks import user_cadences
from runner.platform.device import configure_jax, is_primary
from runner.tasks.base import best_rule, check_task

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {Precision.fp32: None, Precision.bf16: "bfloat16"}


class Parts(NamedTuple):
    task: Any
    model: nn.Module
    optimizer: Optimizer


def build_parts(cfg: DictConfig) -> Parts:
    """The task, model and optimizer the config describes, each checked against its class's
    or factory's signature (types, keys) and by its own ``__post_init__`` (values). The model's
    null ``out_features`` is the task's ``output_dim``; its output on the task's example input
    must have the task's shape (``runner.core.shapes.check_output``). The callbacks' configs
    are checked too (``runner.loop.callbacks.user_cadences``), each run builds its own."""
    validate(cfg)
    user_cadences(cfg.get("callbacks"))
    task = build(check(cfg.task, "task"), "task")
    check_task(task)
    trainer = cfg.trainer  # its null best_metric and best_mode: the task's (once, here)
    trainer.best_metric, trainer.best_mode = best_rule(task, trainer.best_metric,
                                                       trainer.best_mode)
    if cfg.model is None:
        raise ConfigError("model: none chosen; pick one with model=<name> (mlp, cnn, or one "
                          "from your own config dir)")
    model = build(check(cfg.model, "model"), "model", out_features=task.output_dim)
    for key, value in (("task", task), ("model", model)):
        try:
            hash(value)
        except TypeError as err:
            raise ConfigError(f"{key} ({cfg[key]._target_}): not hashable ({err}); runner "
                              f"compiles it into the step as a static argument: give it "
                              f"hashable fields (a frozen dataclass; tuples, not lists)") from None
    optimizer = make_optimizer(cfg.optimizer, total_steps=cfg.trainer.steps)
    # Here, so a run, a sweep job, resume and runner.eval all refuse a model whose output the
    # task's loss cannot take, before anything compiles (traced abstractly: no device touched).
    check_output(task, model)
    return Parts(task, model, optimizer)


@dataclasses.dataclass
class Run:
    """Everything a run's host loop works with (see ``build_run``)."""

    cfg: DictConfig
    run_dir: Path
    parts: Parts
    mesh: Mesh
    state: Any  # TrainState
    data: Any
    init_rng: jax.Array
    train_rng: jax.Array
    start_step: int
    cadence: Cadence  # steps per dispatch, log windows, every periodic action's every
    writer: bool  # process 0: the one that writes TensorBoard, checkpoints and run files
    spec: StepSpec  # the static arguments of its compiled train and eval programs
    placement: Dict[str, Any]  # devices, precision, FLOPs: recorded in manifest and metrics
    resume: bool = False
    host_fed: bool = False  # its examples read on the host a dispatch ahead (runner.loop.feed)

    @property
    def peak_flops(self) -> Optional[Tuple[float, float]]:
        """(peak FLOP/s of all devices, FLOPs per step) when both are known: ``perf/mfu``."""
        peak, flops = self.placement["peak_flops_per_device"], self.placement["flops_per_step"]
        return (peak * self.mesh.size, flops) if peak and flops else None


def build_run(cfg: DictConfig, run_dir: Path, *, resume: bool,
              parts: Optional[Parts] = None) -> Run:
    """Set JAX up, build the parts (unless given), start the state from the seed (or the
    newest valid checkpoint, with ``resume``) and decide the dispatch length."""
    parts = parts or build_parts(cfg)
    if resume:
        inputs.verify(parts.task, run_dir)
    devices = configure_jax(cfg.device)
    mesh = make_mesh(cfg.device, devices)
    if parts.task.batch_size % mesh.size:
        raise RunnerError(f"task.batch_size={parts.task.batch_size} is not divisible by the "
                          f"{mesh.size} devices in use (device.num_devices="
                          f"{_show(cfg.device.num_devices)}): use a multiple of {mesh.size}, or "
                          f"set device.num_devices")
    host_fed = from_host(parts.task, list(mesh.devices.flat))
    state, data, init_rng, train_rng = setup(cfg.seed, *parts, mesh=mesh, host_fed=host_fed)
    if host_fed:
        check_examples(parts.task, data)
    if resume:
        state = _restore(run_dir, state, mesh)
    start_step = _agreed_start(int(state.step), run_dir)
    if start_step >= cfg.trainer.steps:
        raise AlreadyComplete(run_dir, start_step)
    cadence = Cadence.of(cfg.trainer, start_step=start_step,
                         callbacks=user_cadences(cfg.get("callbacks")))
    spec = StepSpec(task=parts.task, steps_per_dispatch=cadence.steps_per_dispatch,
                    log_windows=cadence.log_windows,
                    layer_norms=cfg.trainer.log_histograms, unroll=cfg.trainer.scan_unroll,
                    compute_dtype=COMPUTE_DTYPES[Precision(cfg.device.precision)], mesh=mesh)
    run = Run(cfg, run_dir, parts, mesh, state, data, init_rng, train_rng, start_step,
              cadence, is_primary(cfg.device), spec, {}, resume, host_fed)
    run.placement = _placement(run)
    log.info("devices: %d x %s (%s) in %d process(es), batch split over a '%s' mesh axis; "
             "steps %d..%d, %d per dispatch%s", mesh.size, run.placement["platform"],
             run.placement["device_kind"], jax.process_count(), DATA_AXIS, start_step,
             cfg.trainer.steps, cadence.steps_per_dispatch,
             ", examples read on the host" if host_fed else "")
    return run


def _restore(run_dir: Path, template, mesh: Mesh):
    """The newest valid checkpoint of the run, with this config's optimizer hyperparameters
    (so that e.g. ``optimizer.lr=...`` given with ``resume`` applies), replicated over
    ``mesh`` (whatever devices it was saved from); ``template`` when the run saved none
    (stopped before its first checkpoint). Checkpoints that none fits stop the resume."""
    found = list_checkpoints(RunPaths(run_dir).checkpoints)
    # A _target_ schedule's values as long as the newest checkpoint's (trainer.steps may change)
    loading = with_schedule_length(template, found[-1][1].read_bytes()) if found else template
    restored, path = restore_latest(RunPaths(run_dir).checkpoints, loading)
    if restored is None:
        log.warning("no checkpoint in %s: starting from step 0", RunPaths(run_dir).checkpoints)
        return template
    log.info("resuming from %s (step %d)", path, int(restored.step))
    opt_state = with_hyperparams(restored.opt_state, template.opt_state)
    return place(restored.replace(opt_state=opt_state), replicated(mesh))


def _agreed_start(start_step: int, run_dir: Path) -> int:
    """The step every process starts from (they must agree: a shared filesystem)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        starts = multihost_utils.process_allgather(np.array(start_step))
        if np.any(starts != start_step):
            raise RunnerError(f"the processes resumed from different steps ({starts.tolist()}): "
                              f"each must see the same {run_dir / 'checkpoints'} (a shared "
                              f"filesystem)")
    return start_step


def _placement(run: Run) -> Dict[str, Any]:
    device = run.mesh.devices.flat[0]
    precision = run.cfg.device.precision
    peak = peak_flops(device.device_kind, precision, jax.config.jax_default_matmul_precision)
    examples = None  # one step's, shaped as the host reads them
    if peak and run.host_fed:
        examples = {k: np.repeat(a, run.parts.task.batch_size, 0)
                    for k, a in probe(run.parts.task).items()}
    flops = step_flops(run.state, run.data, run.train_rng, task=run.parts.task,
                       compute_dtype=run.spec.compute_dtype, examples=examples) if peak else None
    return {"num_devices": run.mesh.size, "processes": jax.process_count(),
            "platform": device.platform, "device_kind": device.device_kind,
            "precision": Precision(precision).value,
            "matmul_precision": jax.config.jax_default_matmul_precision,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "peak_flops_per_device": peak, "flops_per_step": flops}


def _show(value) -> str:
    return "null" if value is None else str(value)
