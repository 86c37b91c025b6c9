"""One training run: build everything from the config, run the host loop, write the run dir."""

import json
import logging
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from hydra.utils import instantiate
from jax.sharding import Mesh
from omegaconf import DictConfig, OmegaConf

from runner.checkpoint import Checkpointer, restore_latest, write_atomic
from runner.compiles import cache_hits, compile_stats
from runner.device import (DATA_AXIS, configure_jax, make_mesh, peak_flops, place,
                           replicated)
from runner.errors import RunnerError, describe_error
from runner.figures import FigureRenderer, Images
from runner.hparams import run_hparams
from runner.manifest import write_manifest
from runner.optim import make_optimizer
from runner.preemption import Interrupted, StopRequest, stop_on_signals
from runner.schema import Precision, validate
from runner.steps import LAYER_GRAD_NORM, evaluate, setup, step_flops, train_steps
from runner.tb_logger import NullLogger, TensorBoardLogger

log = logging.getLogger(__name__)


def is_time(step: int, every: Optional[int]) -> bool:
    """Whether periodic work with cadence ``every`` (None = never) falls on ``step``."""
    return every is not None and step % every == 0


# The automatic dispatch length stays at most this many steps (or log_every, if larger), so a
# stop request (SIGTERM) and the progress bar are not held up by one very long dispatch.
MAX_AUTO_DISPATCH = 1000


def steps_per_dispatch(trainer: DictConfig, *, start_step: int = 0) -> int:
    """Steps fused per dispatch: the configured count, or else the largest count that lands on
    every eval and checkpoint step, on the last step and on the step a resume starts from (so
    all dispatches share one shape: one compilation), and that is a multiple of ``log_every``
    (one dispatch then returns the metrics of several log windows) or divides it. Parameter
    histograms need the state at each log step: with them a dispatch is at most ``log_every``.
    """
    if trainer.steps_per_dispatch is not None:
        return trainer.steps_per_dispatch
    base = math.gcd(trainer.steps, start_step,
                    *[c for c in (trainer.eval_every, trainer.checkpoint_every) if c is not None])
    log_every = trainer.log_every
    if trainer.log_histograms or base % log_every:
        return math.gcd(base, log_every)
    cap = max(MAX_AUTO_DISPATCH // log_every, 1) * log_every
    return max(d for d in range(log_every, min(base, cap) + 1, log_every) if base % d == 0)


def log_windows(trainer: DictConfig, chunk: int) -> int:
    """Log windows per dispatch of ``chunk`` steps: ``chunk / log_every`` when a dispatch
    spans several, else 1 (the dispatch's metrics are logged when it ends on a log step)."""
    if chunk > trainer.log_every and chunk % trainer.log_every == 0:
        return chunk // trainer.log_every
    return 1


def run(cfg: DictConfig, run_dir: Path, *, overrides: Sequence[str] = (),
        resume: bool = False) -> float:
    """Train as ``cfg`` says, writing TensorBoard events, checkpoints, ``metrics.json``,
    ``manifest.json`` and ``model_summary.txt`` into ``run_dir``. Returns the final eval loss.

    With ``resume``, continue from the newest valid checkpoint in ``run_dir``. SIGTERM and
    SIGINT save a checkpoint at the current step and stop the run. ``metrics.json`` is written
    however the run ends: ``"status"`` is ``completed``, ``interrupted`` or ``failed``, with the
    ``reason``; ``overrides`` (the job's command-line overrides) are recorded.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    start, compiles_before, hits_before = (time.perf_counter(), compile_stats("train_steps"),
                                           cache_hits())
    summary: Dict[str, Any] = {"status": "failed", "steps": 0, "overrides": list(overrides)}
    try:
        with stop_on_signals() as stop, ExitStack() as cleanup:
            summary.update(_train(cfg, run_dir, overrides=overrides, resume=resume, stop=stop,
                                  cleanup=cleanup, compiles_before=compiles_before))
    except Exception as err:
        summary["reason"] = describe_error(err) or f"{type(err).__name__}: {err}"
        if isinstance(err, Interrupted):
            summary.update(status="interrupted", steps=err.step)
        raise
    finally:
        compiles, compile_s = np.subtract(compile_stats("train_steps"), compiles_before)
        summary.update(wall_time_s=time.perf_counter() - start, compile_s=float(compile_s),
                       train_step_compiles=int(compiles),
                       compile_cache_hits=cache_hits() - hits_before)
        if not jax.distributed.is_initialized() or jax.process_index() == 0:
            write_atomic(run_dir / "metrics.json",
                         (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary["eval"]["loss"]


def _train(cfg: DictConfig, run_dir: Path, *, overrides: Sequence[str], resume: bool,
           stop: StopRequest, cleanup: ExitStack, compiles_before) -> Dict[str, Any]:
    validate(cfg)
    devices = configure_jax(cfg.device)
    mesh = make_mesh(cfg.device, devices)
    # Every process computes; process 0 alone writes TensorBoard, checkpoints and run files.
    writer = jax.process_index() == 0
    if not writer:
        _log_to_console_only()
    trainer = cfg.trainer
    task = instantiate(cfg.task, _convert_="all")
    if task.batch_size % mesh.size:
        raise RunnerError(f"task.batch_size={task.batch_size} is not divisible by the "
                          f"{mesh.size} devices in use (device.num_devices="
                          f"{_show(cfg.device.num_devices)}): use a multiple of {mesh.size}, or "
                          f"set device.num_devices")
    # Started first: its process imports matplotlib while this one compiles and trains.
    renderer = (cleanup.enter_context(FigureRenderer())
                if writer and trainer.log_images and hasattr(task, "figures") else None)
    model = build_model(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, total_steps=trainer.steps)
    state, data, init_rng, train_rng = setup(cfg.seed, model, task, optimizer, mesh=mesh)
    if resume:
        state = _restore(run_dir, state, mesh)
    start_step = int(state.step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        starts = multihost_utils.process_allgather(np.array(start_step))
        if np.any(starts != start_step):
            raise RunnerError(f"the processes resumed from different steps ({starts.tolist()}): "
                              f"each must see the same {run_dir / 'checkpoints'} (a shared "
                              f"filesystem)")
    if start_step >= trainer.steps:
        raise RunnerError(f"{run_dir} is at step {start_step} of trainer.steps={trainer.steps}: "
                          f"nothing to do (resume with a larger trainer.steps to train longer)")
    chunk = steps_per_dispatch(trainer, start_step=start_step)
    if start_step % chunk or (trainer.steps - start_step) % chunk or any(
            c is not None and c % chunk for c in (trainer.eval_every, trainer.checkpoint_every)
    ) or (trainer.log_every % chunk and (chunk % trainer.log_every or trainer.log_histograms)):
        raise RunnerError(
            f"trainer.steps_per_dispatch={chunk}: must divide trainer.steps, the step a resume "
            f"starts from ({start_step}), trainer.eval_every and trainer.checkpoint_every, and "
            f"divide trainer.log_every or (without trainer.log_histograms) be a multiple of it")
    if renderer:
        renderer.set_data(task, jax.device_get(data))
    step_options = StepOptions(mesh=mesh, compute_dtype=COMPUTE_DTYPES[Precision(
        cfg.device.precision)], unroll=trainer.scan_unroll)
    kind = mesh.devices.flat[0].device_kind
    peak = peak_flops(kind, cfg.device.precision, jax.config.jax_default_matmul_precision)
    flops = step_flops(state, data, train_rng, task=task, schedule=optimizer.schedule,
                       compute_dtype=step_options.compute_dtype) if peak else None
    placement = {"num_devices": mesh.size, "processes": jax.process_count(),
                 "platform": mesh.devices.flat[0].platform, "device_kind": kind,
                 "precision": Precision(cfg.device.precision).value,
                 "matmul_precision": jax.config.jax_default_matmul_precision,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "peak_flops_per_device": peak, "flops_per_step": flops}
    log.info("devices: %d x %s (%s) in %d process(es), batch split over a '%s' mesh axis; "
             "steps %d..%d, %d per dispatch", mesh.size, placement["platform"], kind,
             jax.process_count(), DATA_AXIS, start_step, trainer.steps, chunk)
    if writer:
        write_manifest(run_dir, devices=list(mesh.devices.flat), overrides=overrides,
                       start_step=start_step, placement=placement)

    # The table needs only the input's shape: zeros on the host, where jnp.zeros would compile
    # and run two small programs.
    example = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           jax.eval_shape(task.example_input))
    model_summary = model.tabulate(init_rng, example, console_kwargs={"width": 120})
    if writer:
        (run_dir / "model_summary.txt").write_text(model_summary)
    # A resumed run drops what the interrupted attempt logged after its checkpoint.
    logger = (TensorBoardLogger(run_dir / "tb", purge_step=start_step + 1 if start_step else None)
              if writer else NullLogger())
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=trainer.keep_checkpoints,
                                metric=trainer.best_metric, mode=trainer.best_mode,
                                write=writer)
    summary: Dict[str, Any] = {}
    try:
        logger.text("config", OmegaConf.to_yaml(cfg, resolve=True))
        logger.text("model_summary", model_summary)
        state, summary = train_loop(state, data, train_rng, task=task,
                                    schedule=optimizer.schedule, trainer=trainer, chunk=chunk,
                                    logger=logger, checkpointer=checkpointer, stop=stop,
                                    renderer=renderer, options=step_options,
                                    peak_flops=peak and flops and (peak * mesh.size, flops))
        compile_s = compile_stats("train_steps")[1] - compiles_before[1]
        logger.scalars(summary["steps"], "perf", {"compile_s": compile_s})
        summary.update(best=checkpointer.best, resumed_from=start_step if resume else None,
                       devices=placement)
    finally:
        tags = ["eval/loss", *(f"eval/{k}" for k in summary.get("eval", {}) if k != "loss"),
                "train/loss"]
        logger.hparams(run_hparams(cfg, overrides), tags, completed=bool(summary))
        logger.close()
    return summary


def _agreed(stop: StopRequest, dispatch: int) -> bool:
    """Whether to stop after this dispatch. The processes of a multi-process run must stop
    after the same one, or the others would wait forever in the next one's collectives:
    SIGTERM there reaches JAX's preemption service (``jax.distributed`` takes the signal),
    which agrees on a dispatch (``reached_preemption_sync_point``, called with the same
    consecutive ids everywhere); a signal runner's own handler took (SIGINT) is all-gathered."""
    if not jax.distributed.is_initialized():
        return stop.requested
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(dispatch):
        stop.signal_name = stop.signal_name or "SIGTERM (preemption notice)"
        return True
    if jax.process_count() == 1:
        return stop.requested
    if np.any(multihost_utils.process_allgather(np.array(stop.requested))):
        stop.signal_name = stop.signal_name or "a signal to another process"
        return True
    return False


def _show(value) -> str:
    return "null" if value is None else str(value)


def _log_to_console_only() -> None:
    """A process other than 0 leaves the run dir's ``runner.log`` to process 0."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def _restore(run_dir: Path, template, mesh):
    """The newest valid checkpoint of the run, with this config's optimizer hyperparameters
    (so that e.g. ``optimizer.lr=...`` given with ``resume`` applies), replicated over
    ``mesh`` (whatever devices it was saved from); else ``template``."""
    restored, path = restore_latest(run_dir / "checkpoints", template)
    if restored is None:
        log.warning("no valid checkpoint in %s: starting from step 0", run_dir / "checkpoints")
        return template
    log.info("resuming from %s (step %d)", path, int(restored.step))
    opt_state = restored.opt_state._replace(hyperparams=template.opt_state.hyperparams)
    return place(restored.replace(opt_state=opt_state), replicated(mesh))


def train_loop(state, data, rng, *, task, schedule, trainer, chunk, logger, checkpointer,
               stop, renderer=None, options: Optional["StepOptions"] = None,
               peak_flops: Optional[Tuple[float, float]] = None):
    """The host loop: dispatch fused steps; on cadence fetch metrics, log, evaluate, save.

    Metrics come to the host only at the end of a dispatch that ends on a log, eval or
    checkpoint step (each fetch waits for the device), with one entry per log window of the
    dispatch; the loss is checked for NaN/Inf there, before anything is saved.
    A stop request (SIGTERM/SIGINT) saves a checkpoint after the current dispatch and raises.
    ``renderer`` draws the task's figures of eval steps; they are logged as they come back.
    ``options``: the mesh, compute dtype and unroll of the compiled steps. ``peak_flops``
    ``(peak FLOP/s of all devices, FLOPs per step)`` adds ``perf/mfu``.
    """
    options = options or StepOptions(unroll=trainer.scan_unroll)
    step, train_metrics, eval_metrics = int(state.step), {}, {}
    windows = log_windows(trainer, chunk)
    window_start, window_steps = time.perf_counter(), 0  # throughput, between host syncs
    dispatches = 0
    compiled = False
    bar = _progress_bar(trainer, initial=step)
    with bar or nullcontext():
        while step < trainer.steps:
            state, metrics = train_steps(state, data, rng, task=task, schedule=schedule,
                                         num_steps=chunk, windows=windows,
                                         layer_norms=trainer.log_histograms,
                                         **options._asdict())
            start, step, last = step, step + chunk, step + chunk == trainer.steps
            if compiled:
                window_steps += chunk
            else:  # keep compilation out of steps/s: wait for it, start timing after
                jax.block_until_ready(metrics)
            log_now, eval_now = is_time(step, trainer.log_every), is_time(step, trainer.eval_every)
            save_now = is_time(step, trainer.checkpoint_every) or last
            stopping = _agreed(stop, dispatches)
            dispatches += 1
            if log_now or eval_now or last or save_now or stopping:
                metrics = jax.device_get(metrics)  # waits for the device: ends the window
                perf = {"steps_per_sec": window_steps / (time.perf_counter() - window_start)
                        } if window_steps else {}
                if perf and peak_flops:  # model FLOPs utilisation of the devices' peak
                    perf["mfu"] = perf["steps_per_sec"] * peak_flops[1] / peak_flops[0]
                _check_finite(metrics, start, chunk // windows)  # before anything is saved
            if log_now or last:
                logger.scalars(step, "perf", perf)
                for i in range(windows):  # the log windows that ended in this dispatch
                    end = start + (i + 1) * chunk // windows
                    if is_time(end, trainer.log_every) or end == trainer.steps:
                        train_metrics = _log_train(state, {k: v[i] for k, v in metrics.items()},
                                                   end, trainer, logger)
                _report(bar, step, trainer.steps, train_metrics, perf)
            if eval_now or last:
                eval_metrics = _log_eval(state, data, task, step, logger, renderer, options)
                checkpointer.consider(state, step, eval_metrics)
                _report(bar, step, trainer.steps, eval_metrics, prefix="eval")
            if save_now or stopping:
                checkpoint = checkpointer.save(state, step)
            if stopping and not last:
                raise Interrupted(f"stopped by {stop.signal_name} at step {step}, checkpoint "
                                  f"{checkpoint}; continue with: python -m runner "
                                  f"resume={checkpointer.dir.parent}", step)
            if not compiled or log_now or eval_now or save_now:  # host work ends the window
                compiled, window_start, window_steps = True, time.perf_counter(), 0
            if renderer:
                _log_images(renderer.ready(), logger)
            if bar:
                bar.update(chunk)
    if renderer:
        _log_images(renderer.ready(wait=True), logger)
    return state, {"status": "completed", "steps": step, "train": train_metrics,
                   "eval": eval_metrics, "checkpoint": str(checkpoint)}


class StepOptions(NamedTuple):
    """Static options of the compiled train steps (``train_steps``' keyword arguments)."""

    mesh: Optional[Mesh] = None
    compute_dtype: Optional[str] = None
    unroll: int = 1


COMPUTE_DTYPES = {Precision.fp32: None, Precision.bf16: "bfloat16"}


def build_model(cfg: DictConfig) -> nn.Module:
    """Instantiate the model; equal configs give the same Module object in this process, so
    jobs of a sweep that share a model config also share the compiled step."""
    key = OmegaConf.to_yaml(cfg, resolve=True)
    if key not in _MODELS:
        _MODELS[key] = instantiate(cfg, _convert_="all")
    return _MODELS[key]


_MODELS: Dict[str, nn.Module] = {}


def _check_finite(metrics, start: int, window: int) -> None:
    """Stop the run at a non-finite loss or gradient norm (the last checkpoint stays good).
    ``metrics`` are a dispatch's from step ``start`` on, one entry per ``window`` steps."""
    for key in ("loss", "grad_norm"):
        bad = np.flatnonzero(~np.isfinite(metrics[key]))
        if bad.size:
            raise RunnerError(f"train/{key} is {float(metrics[key][bad[0]])} at step "
                              f"{start + (bad[0] + 1) * window}: training diverged (try a "
                              f"lower optimizer.lr)")


def _log_train(state, metrics, step: int, trainer: DictConfig, logger) -> Dict[str, float]:
    """Log the train metrics (on host); returns them."""
    values = {k: float(v) for k, v in metrics.items()}
    layers = {k[len(LAYER_GRAD_NORM):]: values.pop(k) for k in list(values)
              if k.startswith(LAYER_GRAD_NORM)}
    logger.scalars(step, "train", values)
    if trainer.log_histograms:  # the step computed the per-layer norms too
        logger.scalars(step, "opt/grad_norm", layers)
        logger.histograms(step, "params", state.params)
    return values


def _log_eval(state, data, task, step: int, logger, renderer,
              options: "StepOptions") -> Dict[str, float]:
    """Evaluate, log the metrics and hand the outputs to ``renderer`` (the task's figures)."""
    metrics, outputs = evaluate(state, data, task=task, mesh=options.mesh,
                                compute_dtype=options.compute_dtype)
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    logger.scalars(step, "eval", values)
    if renderer:
        renderer.submit(step, jax.device_get(outputs))
    return values


def _log_images(images: Dict[int, Images], logger) -> None:
    for step, named in images.items():
        logger.images(step, "eval", named)


def _progress_bar(trainer: DictConfig, *, initial: int):
    """A tqdm bar when stderr is a terminal (and enabled); None means plain log lines."""
    if not (trainer.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=trainer.steps, initial=initial, unit="step", dynamic_ncols=True)


def _report(bar, step: int, total: int, metrics: Dict[str, float],
            extra: Optional[Dict[str, float]] = None, *, prefix: str = "train") -> None:
    values = {f"{prefix}/{k}": v for k, v in metrics.items()}
    values.update({f"perf/{k}": v for k, v in (extra or {}).items()})
    if bar:
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                         if k.endswith(("loss", "steps_per_sec", "accuracy"))})
    else:
        log.info("step %d/%d %s", step, total,
                 " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
