"""When runner's search launches its trials: with no batch barrier. A new trial is asked as
soon as a running one ends (or is pruned), so ``n_jobs`` trials run at once until the study
holds ``n_trials``:

- the fused launcher takes a stream of trials (``launch_stream``): a group of ``n_jobs``
  slots whose freed slots take the next trials, in the same compiled program
  (``runner.run.refill``);
- launchers whose jobs run in processes of their own (joblib, SLURM) are called from
  ``n_jobs`` worker threads, each launching one trial at a time. Concurrent ``launch`` calls
  are safe there: joblib's share loky's process-wide reusable executor (taken under its lock;
  equal arguments reuse it, with no resize), submitit's each submit their own files (uuid
  names) and poll one shared watcher; the rest of a Hydra launch is idempotent set-up (its
  globals, the logging config under logging's own lock, the sweep dir);
- the basic launcher runs a job in this process (Hydra's ``run_job``: its globals, the
  working dir, the logging), which no two threads may do at once: one trial at a time;
- any other launcher (``fused_slurm``, whose SLURM job fuses a batch; one whose thread safety
  is unknown) gets batches of ``n_jobs``, as Hydra's optuna sweeper launches them.
"""

import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn

from hydra_plugins.runner_search import space as search_space
from hydra_plugins.runner_search.study import existing_trial, stops_search, tell

log = logging.getLogger(__name__)
Job = Tuple[int, List[str]]  # a trial's number (its job's) and its job's overrides

# Launchers by their classes' (or a base class's) qualified names: the optional plugins are
# not imported to be told apart.
BATCHED = {"hydra_plugins.runner_slurm_launcher.slurm_launcher.FusedSlurmLauncher"}
PARALLEL = {"hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher"}
# Hydra's basic launcher by its option (hydra.runtime.choices): its class is in a private module.
IN_PROCESS = {"basic"}


class Trials:
    """The search's trials to launch, asked and told under one lock (the workers share the
    study, its sampler and its storage): first those a killed search left running, then new
    ones until the study holds ``n_trials``; none once the search must stop (a failure every
    trial would repeat, too many failed, a signal: ``stop``). ``error``: why it must."""

    def __init__(self, study, search: Dict[str, Any], n_trials: int, max_failure_rate: float,
                 stop):
        import optuna

        self.study, self.search, self.n_trials, self.stop = study, search, n_trials, stop
        self.max_failure_rate = max_failure_rate
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if running:
            log.info("trials %s were running when the search stopped: they go on first",
                     ", ".join(str(t.number) for t in running))
        self.pending = [existing_trial(study, search["storage"], t.number) for t in running]
        self.live: Dict[int, Any] = {}  # launched, not yet told
        self.error: Optional[BaseException] = None
        self.lock = threading.Lock()

    def next(self) -> Optional[Job]:
        """The next trial's job, or None: the search has asked all its trials, or must stop."""
        with self.lock:
            if self.error is not None or self.stop.requested:
                return None
            if self.pending:
                trial = self.pending.pop(0)
            elif len(self.study.get_trials(deepcopy=False)) < self.n_trials:
                trial = self.study.ask(self.search["space"])
            else:
                return None
            self.live[trial.number] = trial
            return trial.number, [*search_space.overrides(
                {k: trial.params[k] for k in self.search["space"]}, self.search["fixed"]),
                *self.search["link"]]

    def end(self, number: int, ret: JobReturn) -> None:
        """Tell the study how trial ``number``'s job ended; whether the search must stop."""
        with self.lock:
            tell(self.study, self.live.pop(number), ret)
            self.error = self.error or self.must_stop(number)

    def fail(self, err: BaseException) -> None:
        """A launch raised (a job's exit on a signal, a launcher's error): no more trials."""
        with self.lock:
            self.error = self.error or err

    def must_stop(self, number: int) -> Optional[BaseException]:
        import optuna

        from runner.config.errors import RunnerError

        stop = stops_search(self.study, [number])
        if stop:
            return RunnerError(stop)
        state = optuna.trial.TrialState
        ended = self.study.get_trials(deepcopy=False,
                                      states=(state.COMPLETE, state.PRUNED, state.FAIL))
        failed = [t for t in ended if t.state == state.FAIL]
        if ended and len(failed) / len(ended) > self.max_failure_rate:
            return RunnerError(f"{len(failed)} of {len(ended)} trials failed, more than "
                               f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")
        return None


def schedule_of(launcher, option: Optional[str]) -> str:
    """How ``launcher``, chosen as ``hydra/launcher=<option>``, takes trials: ``stream``,
    ``workers``, ``one_by_one`` or ``batches`` (the module doc)."""
    if callable(getattr(launcher, "launch_stream", None)):
        return "stream"
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(launcher).__mro__}
    if names & BATCHED:
        return "batches"
    if names & PARALLEL:
        return "workers"
    return "one_by_one" if option in IN_PROCESS else "batches"


def run_trials(launcher, trials: Trials, n_jobs: int, option: Optional[str]) -> None:
    """Launch ``trials`` on ``launcher`` (``hydra/launcher=<option>``), ``n_jobs`` at a time
    (the module doc)."""
    how = schedule_of(launcher, option)
    log.info("trials launched %s", {
        "stream": f"as slots free up, {n_jobs} at a time in one fused group",
        "workers": f"as jobs end, {n_jobs} at a time",
        "one_by_one": "one at a time, in this process",
        "batches": f"in batches of {n_jobs}"}[how])
    if how == "stream":
        launcher.launch_stream(trials.next, trials.end, n_jobs)
    elif how == "batches":
        in_batches(launcher, trials, n_jobs)
    else:
        in_workers(launcher, trials, n_jobs if how == "workers" else 1)


def in_workers(launcher, trials: Trials, count: int) -> None:
    """``count`` workers, each launching a trial, telling its end and asking the next. One
    runs in this (the main) thread, where a job run in this process gets the signals; alone,
    what its launch raises (a job's exit on a signal: the sweep ended) goes on up."""
    def work(catch: bool) -> None:
        try:
            while (job := trials.next()) is not None:
                ret, = launcher.launch([job[1]], initial_job_idx=job[0])
                trials.end(job[0], ret)
        # A launcher's error, or a job's exit on a signal (SystemExit): the search ends once
        # the other workers' trials end. A second Ctrl-C (KeyboardInterrupt) ends it now.
        except (Exception, SystemExit) as err:  # noqa: BLE001
            if not catch:
                raise
            trials.fail(err)

    threads = [threading.Thread(target=work, args=(True,), name=f"trials-{i}", daemon=True)
               for i in range(1, count)]
    for thread in threads:
        thread.start()
    work(catch=count > 1)
    for thread in threads:
        thread.join()


def in_batches(launcher, trials: Trials, size: int) -> None:
    """Batches of ``size`` trials, each launched whole and waited for."""
    while True:
        batch: List[Job] = []
        while len(batch) < size and (job := trials.next()) is not None:
            batch.append(job)
        if not batch:
            return
        for (number, _), ret in zip(batch, launch_in_runs(launcher, batch)):
            trials.end(number, ret)


def launch_in_runs(launcher, jobs: Sequence[Job]) -> List[JobReturn]:
    """Each job as the job of its number (numbers in a row launch together)."""
    returns: List[JobReturn] = []
    start = 0
    for end in range(1, len(jobs) + 1):
        if end == len(jobs) or jobs[end][0] != jobs[end - 1][0] + 1:
            returns += launcher.launch([o for _, o in jobs[start:end]],
                                       initial_job_idx=jobs[start][0])
            start = end
    return returns
