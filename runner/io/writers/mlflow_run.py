"""``logger=mlflow`` (the ``mlflow`` extra): the run as an MLflow run, in a real MLflow
tracking store: by default a SQLite store beside the runs, ``<sweep dir>/mlflow.db`` for a
sweep's jobs (one experiment, named by the sweep dir: a run per job) and
``<run dir>/mlflow.db`` for a single run (experiment ``runner``), or the ``tracking_uri`` and
``experiment_name`` given. Its params are the run's HPARAMS row; its metrics every scalar at
its step; its status how the run ended (``STATUS``).

A resumed run continues the same MLflow run (``mlflow_run.json`` in the run dir names it) and
logs again the steps after its checkpoint. MLflow cannot delete a metric's points: for a step
that the interrupted attempt logged after its checkpoint, the history holds its point and the
resumed run's, the later (by timestamp) the resumed run's, which is also the run's latest
value. Params cannot change either: a value that a resume changed (``trainer.steps=400``)
becomes a tag of the same name; the run's ``status`` is its MLflow status and ``status`` tag.
"""

import contextlib
import fcntl
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from runner.config.errors import RunnerError, first_line
from runner.io.files import write_atomic
from runner.io.layout import RunPaths
from runner.io.writers.base import RunInfo

try:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
except ImportError as err:  # the writer's module imports it: one line at the config's check
    raise ImportError(f"{err}; logger=mlflow needs the mlflow extra: "
                      f"pip install 'jax-yaml-runner[mlflow]'") from None

# metrics.json's status -> the MLflow run's. A pruned run ended before its end by its
# search's decision: KILLED, like an interrupted one (its `status` tag tells them apart).
STATUS = {"completed": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED",
          "failed": "FAILED"}
SINGLE_RUN_EXPERIMENT = "runner"
SQLITE = "sqlite:///"
MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


class MLflowWriter:
    """The run ``run`` as an MLflow run (see the module doc). ``tracking_uri``: the store
    (null: ``sqlite:///<sweep or run dir>/mlflow.db``); ``experiment_name`` (null: the sweep
    dir's absolute path, or ``runner`` for a single run)."""

    run_files = (RunPaths.MLFLOW_RUN, RunPaths.MLFLOW_DB)

    def __init__(self, *, run: RunInfo, tracking_uri: Optional[str] = None,
                 experiment_name: Optional[str] = None):
        home = (run.sweep_dir or run.dir).absolute()
        self.uri = tracking_uri or f"{SQLITE}{RunPaths(home).mlflow_db}"
        self.record = RunPaths(run.dir).mlflow_run
        self.pending: List[Metric] = []
        self.status: Optional[str] = None
        self.client = MlflowClient(tracking_uri=self.uri)
        with _exclusive(self.uri):  # one store set-up and experiment at a time (joblib jobs)
            self.run_id = self._call(self._same_run) or self._call(
                lambda: self._new_run(run, experiment_name or (
                    str(run.sweep_dir.absolute()) if run.sweep_dir else SINGLE_RUN_EXPERIMENT)))

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(f"{prefix}/{name}", float(value), now, int(step))
                         for name, value in values.items()]

    def hparams(self, hparams: Mapping[str, Any], *, status: Optional[str]) -> None:
        """Params (those already logged with another value: tags), and the end ``status``
        (set when the run closes, after its last metrics)."""
        values = {k: str(v) for k, v in hparams.items() if not (k == "status" and v == status)}
        logged = self._call(lambda: self.client.get_run(self.run_id).data.params)
        params = [Param(k, v) for k, v in values.items() if k not in logged]
        tags = [RunTag(k, v) for k, v in values.items() if k in logged and logged[k] != v]
        if status:
            tags.append(RunTag("status", status))
        self._call(lambda: self.client.log_batch(self.run_id, params=params, tags=tags))
        self.status = status

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            self._call(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def close(self) -> None:
        self.flush()
        if self.status is not None:
            self._call(lambda: self.client.set_terminated(
                self.run_id, STATUS.get(self.status, "FAILED")))

    def _same_run(self) -> Optional[str]:
        """The MLflow run an earlier attempt of this run made in this store, marked running
        again; None when there is none."""
        try:
            recorded = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("tracking_uri") != self.uri:
            return None
        try:
            self.client.update_run(recorded["run_id"], status="RUNNING")
        except (MlflowException, KeyError):  # deleted from the store since: a new one
            return None
        return recorded["run_id"]

    def _new_run(self, run: RunInfo, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = self.client.create_experiment(experiment)
        else:
            experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        created = self.client.create_run(experiment_id, run_name=run.name,
                                         tags={"runner.run_dir": str(run.dir.absolute())})
        run_id = created.info.run_id
        write_atomic(self.record, (json.dumps({"tracking_uri": self.uri, "run_id": run_id,
                                               "experiment_id": experiment_id}) + "\n").encode())
        return run_id

    def _call(self, call):
        """``call()``; an MLflow error is one line naming the store."""
        try:
            return call()
        except (MlflowException, OSError) as err:
            raise RunnerError(f"MLflow store {self.uri}: {first_line(err)}") from err


@contextlib.contextmanager
def _exclusive(uri: str) -> Iterator[None]:
    """Hold an OS lock on a local SQLite store's file while inside (other URIs: no lock).
    Processes that create the store's tables or the sweep's experiment at once would clash."""
    if not uri.startswith(SQLITE):
        yield
        return
    path = Path(uri[len(SQLITE):])
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
