"""The names of what a run dir holds, in one place: ``RunPaths(run_dir).checkpoints`` and the
like are the only way the rest of runner names a run's files (no path literal of them outside
``runner.io``), and ``RUN_FILES`` (what an earlier run's set aside moves) is derived from them.
"""

import dataclasses
from pathlib import Path
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The paths of run dir ``root``'s files. The class attributes are their names."""

    root: Path

    HYDRA = ".hydra"  # Hydra's own name (hydra.output_subdir's default)
    LOG = "runner.log"  # Hydra's ${hydra.job.name}.log
    TB = "tb"  # the tensorboard writer's (conf/logger/tensorboard.yaml)
    JSONL = "metrics.jsonl"  # the jsonl writer's: a line per logged step
    MLFLOW_RUN = "mlflow_run.json"  # the mlflow writer's: which MLflow run this run is
    MLFLOW_DB = "mlflow.db"  # its default local store (a sweep's: in the sweep dir)
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.json"
    MANIFEST = "manifest.json"
    INPUTS = "inputs.json"
    MODEL_SUMMARY = "model_summary.txt"
    CODE = "code"  # the uncommitted diffs of the user's repos, by their sha256
    ATTEMPTS = "attempts"  # earlier runs set aside (overwrite=true)
    CALLBACK_STATES = "callbacks.json"  # in checkpoints/: the callbacks' states per checkpoint
    EARLY_STOP_RECORD = "early_stop.json"  # in checkpoints/: an older run's early stopping

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def hydra(self) -> Path:
        return self.root / self.HYDRA

    def hydra_file(self, name: str) -> Path:
        """``.hydra/<name>``: ``config.yaml``, ``hydra.yaml`` or ``overrides.yaml``."""
        return self.hydra / name

    @property
    def log(self) -> Path:
        return self.root / self.LOG

    @property
    def tb(self) -> Path:
        return self.root / self.TB

    @property
    def jsonl(self) -> Path:
        return self.root / self.JSONL

    @property
    def mlflow_run(self) -> Path:
        return self.root / self.MLFLOW_RUN

    @property
    def mlflow_db(self) -> Path:
        return self.root / self.MLFLOW_DB

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def callback_states(self) -> Path:
        return self.checkpoints / self.CALLBACK_STATES

    @property
    def early_stop_record(self) -> Path:
        return self.checkpoints / self.EARLY_STOP_RECORD

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def inputs(self) -> Path:
        return self.root / self.INPUTS

    @property
    def model_summary(self) -> Path:
        return self.root / self.MODEL_SUMMARY

    @property
    def code(self) -> Path:
        return self.root / self.CODE

    def code_diff(self, sha256: str) -> Path:
        """``code/<sha256>.diff``: an uncommitted diff recorded in ``manifest.json``."""
        return self.code / f"{sha256}.diff"

    @property
    def attempts(self) -> Path:
        return self.root / self.ATTEMPTS


# What a run writes at its top level, its built-in metric writers' files included: an earlier
# run's are moved aside together (with those a user's writer declares, its ``run_files``).
RUN_FILES: Tuple[str, ...] = (RunPaths.HYDRA, RunPaths.TB, RunPaths.CHECKPOINTS,
                              RunPaths.METRICS, RunPaths.MANIFEST, RunPaths.INPUTS,
                              RunPaths.MODEL_SUMMARY, RunPaths.CODE, RunPaths.LOG,
                              RunPaths.JSONL, RunPaths.MLFLOW_RUN, RunPaths.MLFLOW_DB)
