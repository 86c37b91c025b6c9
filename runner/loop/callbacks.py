"""Callbacks: periodic work on the host, each from a ``_target_`` (the ``callbacks`` config
key: ``{name: {_target_, every, ...its own arguments}}``), runner's own early stopping
(``trainer.early_stop``) and figures (``trainer.log_images``) through the same door.

The protocol (a class needs no base; ``Callback`` below says it in types):

- ``callback(info)`` is called on the host after each dispatch that ends on a multiple of its
  ``every`` (runner's eval-time built-ins: after each eval, the run's last step included),
  after that step's log and eval and before its checkpoint. ``info`` is a ``StepInfo``: the
  step, that step's metrics, the run's metric writer, its run dir, the state (only for a
  callback whose ``needs_state`` attribute is true: the state is then fetched to the host)
  and ``info.stop(reason)``, which ends the run at this step (checkpoint, ``metrics.json``:
  ``stopped_at``, ``stopped_by``, ``stop_reason``, and ``stop_details``: the keywords given).
- Optional ``state_dict()`` (JSON values) and ``load_state_dict(state)``: saved with each
  checkpoint (``checkpoints/callbacks.json``, written before the checkpoint, atomically) and
  given back on resume from that checkpoint, so a resumed run calls it as an uninterrupted
  one does, no step twice.
- Optional ``finish(info)``: once, when the run ends (completed or stopped; not when it fails
  or a signal interrupts it), with its last step's metrics.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Protocol

import jax
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import ConfigError
from runner.config.schema import choice_value
from runner.config.targets import build, check
from runner.io.checkpoint import list_checkpoints
from runner.io.files import write_atomic
from runner.io.layout import RunPaths

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepInfo:
    """What a callback is called with. ``metrics``: ``train/<name>`` as logged at ``step``
    (present when ``step`` is a log step, ``trainer.log_every``) and ``eval/<name>`` of the
    latest eval (at or before ``step``). ``state``: the train state on the host, for a callback
    with ``needs_state``, else None. ``eval_outputs``: the eval's outputs when the run
    evaluated at ``step``, else None. ``writer``: the run's metric writer
    (``scalars(step, prefix, values)``, ``text``, ``images``...)."""

    step: int
    metrics: Dict[str, float]
    writer: Any
    run_dir: Path
    state: Any = None
    eval_outputs: Any = None
    stop_request: Optional[str] = None
    stop_record: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def stop(self, reason: str, **details: Any) -> None:
        """End the run at this step, for ``reason`` (one line; ``metrics.json``'s
        ``stop_reason``); ``details`` (JSON values): ``metrics.json``'s ``stop_details``."""
        if self.stop_request is None:
            self.stop_request, self.stop_record = str(reason), details


class Callback(Protocol):
    """See the module doc. ``needs_state``, ``state_dict``, ``load_state_dict`` and ``finish``
    are optional."""

    def __call__(self, info: StepInfo) -> None:
        ...


class Scheduled(NamedTuple):
    """A built callback: its config ``key`` (``callbacks.<name>``, ``trainer.early_stop``) and
    ``every``; ``after_eval``: runner's own, called after each eval instead (``every`` is
    ``trainer.eval_every``, and the last step too); ``recorded_as``: a ``metrics.json`` key of
    its own that records the step it stopped the run at (early stopping's
    ``stopped_early_at``)."""

    key: str
    callback: Callback
    every: Optional[int]
    after_eval: bool = False
    recorded_as: Optional[str] = None

    @property
    def needs_state(self) -> bool:
        return bool(getattr(self.callback, "needs_state", False))

    @property
    def stateful(self) -> bool:
        return hasattr(self.callback, "state_dict")

    @property
    def resumes(self) -> bool:
        """Whether a resume must give it something back: its state, or the latest eval's
        metrics (a callback called between evals reads an earlier eval's)."""
        return self.stateful or not self.after_eval


def user_cadences(callbacks: Optional[Mapping[str, Any]]) -> Dict[str, int]:
    """``{callbacks.<name>: every}`` of the ``callbacks`` config, each checked first: a
    mapping, ``every`` a positive int, a ``_target_`` that imports and takes the other keys
    (a one-line ConfigError naming the key)."""
    found: Dict[str, int] = {}
    for name, conf in (callbacks or {}).items():
        key = f"callbacks.{name}"
        if not isinstance(conf, (DictConfig, dict)):
            raise ConfigError(f"{key}={conf}: must be a mapping with _target_ and every (e.g. "
                              f"+{key}._target_=mypkg.MyCallback +{key}.every=100)")
        every = conf.get("every")
        if every is None:
            raise ConfigError(f"{key}.every: missing; set it to a positive int (the steps "
                              f"between calls)")
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ConfigError(f"{key}.every={every}: must be a positive int (the callback is "
                              f"called after every {key}.every steps)")
        check(_arguments(conf), key)
        found[key] = every
    return found


def build_user_callbacks(callbacks: Optional[Mapping[str, Any]]) -> List[Scheduled]:
    """Fresh instances of the ``callbacks`` config's callbacks (each run's own)."""
    return [Scheduled(key, build(check(_arguments(callbacks[key.split(".", 1)[1]]), key), key),
                      every)
            for key, every in user_cadences(callbacks).items()]


def _arguments(conf: Any) -> DictConfig:
    """A callback's config without ``every`` (runner's, not the class's)."""
    values = OmegaConf.to_container(conf, resolve=True) if isinstance(conf, DictConfig) \
        else dict(conf)
    values.pop("every", None)
    return OmegaConf.create(values)


def built_in_callbacks(trainer: Any, renderer: Any) -> List[Scheduled]:
    """Runner's own callbacks, built from their ``_target_`` as a user's are, run after each
    eval (``trainer.eval_every`` and the last step): early stopping (when
    ``trainer.early_stop.patience`` is set) and the figures (a ``renderer``: the task draws
    them and this process writes)."""
    specs = []
    if trainer.early_stop.patience is not None:
        specs.append(("trainer.early_stop", {
            "_target_": "runner.loop.early_stop.EarlyStop",
            "patience": trainer.early_stop.patience, "min_delta": trainer.early_stop.min_delta,
            "metric": trainer.best_metric, "mode": choice_value(trainer.best_mode)},
            "stopped_early_at"))
    if renderer is not None:
        specs.append(("trainer.log_images", {"_target_": "runner.loop.callbacks.LogFigures",
                                             "renderer": None}, None))
    return [Scheduled(key, build(conf, key, renderer=renderer), trainer.eval_every,
                      after_eval=True, recorded_as=recorded_as)
            for key, conf, recorded_as in specs]


class LogFigures:
    """``trainer.log_images``: hands each eval's outputs to the figure renderer
    (``runner.io.renderer``, a worker thread) and writes the images drawn since, at their
    own steps; the last ones when the run ends."""

    def __init__(self, renderer=None):
        self.renderer = renderer

    def __call__(self, info: StepInfo) -> None:
        if info.eval_outputs is not None:
            self.renderer.submit(info.step, jax.device_get(info.eval_outputs))
        self.write(info.writer)

    def finish(self, info: StepInfo) -> None:
        self.write(info.writer, wait=True)

    def write(self, writer, *, wait: bool = False) -> None:
        for step, images in self.renderer.ready(wait=wait).items():
            writer.images(step, "eval", images)


class CallbackStates:
    """``checkpoints/callbacks.json``: each stateful callback's ``state_dict()`` at each
    checkpoint still on disk, ``{"states": {"<step>": {key: state}}}``. Written before the
    checkpoint it goes with (atomically; by process 0), so a checkpoint never exists without
    its callbacks' states. Reads an older run's ``checkpoints/early_stop.json`` too."""

    def __init__(self, run_dir: Path, *, write: bool = True):
        self.paths, self.write = RunPaths(run_dir), write

    def load(self, step: int) -> Dict[str, Any]:
        """The states saved with the checkpoint at ``step`` (``{}``: none)."""
        try:
            return json.loads(self.paths.callback_states.read_text())["states"].get(
                str(step), {})
        except FileNotFoundError:
            return self._early_stop_record(step)
        except (OSError, ValueError, KeyError, AttributeError):
            log.warning("%s: unreadable; the callbacks start afresh",
                        self.paths.callback_states)
            return {}

    def save(self, step: int, states: Dict[str, Any]) -> None:
        """``states`` go with the checkpoint at ``step`` (about to be written); those of
        checkpoints no longer on disk are dropped."""
        if not self.write:
            return
        kept = {str(s) for s, _ in list_checkpoints(self.paths.checkpoints)}
        try:
            saved = json.loads(self.paths.callback_states.read_text())["states"]
        except (OSError, ValueError, KeyError):
            saved = {}
        saved = {s: v for s, v in saved.items() if s in kept}
        saved[str(step)] = states
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        write_atomic(self.paths.callback_states,
                     (json.dumps({"states": saved}, sort_keys=True) + "\n").encode())

    def _early_stop_record(self, step: int) -> Dict[str, Any]:
        """Early stopping's count as an older run recorded it (``early_stop.json``: each
        eval's ``[step, best, rounds]``), at the eval at or before ``step``."""
        try:
            evals = json.loads(self.paths.early_stop_record.read_text())["evals"]
        except (OSError, ValueError, KeyError):
            return {}
        before = [(best, rounds) for s, best, rounds in evals if s <= step]
        if not before:
            return {}
        best, rounds = before[-1]
        return {"trainer.early_stop": {"best": best, "rounds": rounds}}
