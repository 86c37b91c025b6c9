"""``trainer.early_stop``: stop a run whose eval metric has stopped improving (a callback,
``runner.loop.callbacks``, called after each eval)."""

from typing import Any, Dict, Optional

from runner.loop.callbacks import StepInfo


class EarlyStop:
    """Counts evals in a row where ``eval/<metric>`` did not improve on its best by more than
    ``min_delta`` (in the direction of ``mode``: ``min`` or ``max``), and stops the run when
    ``patience`` of them have passed (``metrics.json``: ``stopped_early_at``). Its count is
    its state: saved with each checkpoint, it survives a resume."""

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "loss",
                 mode: str = "min"):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.best: Optional[float] = None
        self.rounds = 0

    def __call__(self, info: StepInfo) -> None:
        value = info.metrics[f"eval/{self.metric}"]
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.rounds = value, 0
        else:
            self.rounds += 1
        if self.rounds >= self.patience:
            info.stop(f"eval/{self.metric} has not improved for {self.rounds} evals "
                      f"(trainer.early_stop.patience): stopping early")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "rounds": self.rounds}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.rounds = state["best"], state["rounds"]


class StopAt:
    """``callbacks=[stop_at]``: stop the run once ``metric`` (``eval/loss``,
    ``train/accuracy``...) reaches ``value``: at or below it (``mode: min``) or at or above it
    (``max``). A step without the metric (not a log or eval step) changes nothing."""

    def __init__(self, metric: str = "eval/loss", value: float = 0.0, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode}: must be min or max")
        self.metric, self.value, self.mode = metric, value, mode

    def __call__(self, info: StepInfo) -> None:
        got = info.metrics.get(self.metric)
        if got is not None and (got <= self.value if self.mode == "min" else got >= self.value):
            info.stop(f"{self.metric}={got:.6g} reached {self.value:g} ({self.mode})")
