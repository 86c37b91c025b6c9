"""A fused search keeps its groups' width (``hydra/launcher=fused`` under runner's search).

The sweeper hands over a source of jobs (``next_job``: a trial's number and overrides, None
once the search has asked all its trials) instead of a batch. A group opens with up to
``width`` jobs of one program; when a member ends (completed, pruned, failed) its job's end goes
back at once (``on_end``: the study hears of it before the next trial is asked) and its slot
takes the next job, at that job's own step (0, or the checkpoint of a trial a killed search left
running), in its own run dir, in the same compiled program (``runner.loop.host``: each member is
at its own step; on accelerators a slot is a slice of the batched states). A job whose program
differs (a structural choice of the search space) waits, with at most a group's width of
others, for a group of its own, which starts once the current one has no member left. Each job
is composed, prepared and recorded as in a fused sweep (``runner.run.fused``).
"""

import logging
from contextlib import ExitStack
from typing import Callable, Dict, Hashable, List, Optional, Set, Tuple

from hydra.core.utils import JobReturn

from runner.loop.feed import feeds_for
from runner.loop.groups import group_key
from runner.loop.host import Result
from runner.loop.member import working_for
from runner.loop.programs import compiled_name
from runner.platform.preemption import Interrupted, StopRequest, stop_on_signals
from runner.run.fused import (Job, announce_group, end_job, end_with, fit_to_device,
                              job_return, open_job, register_job)
from runner.run.sweep import marks_failed_trials, stop_sweep
from runner.run.train import train_group

log = logging.getLogger(__name__)
NextJob = Callable[[], Optional[Tuple[int, List[str]]]]  # (job number, overrides) or None
OnEnd = Callable[[int, JobReturn], None]  # (job number, how it ended)


def launch_stream(launcher, next_job: NextJob, on_end: OnEnd, width: int) -> None:
    """Train the jobs ``next_job`` gives in groups of ``width`` slots (``max_members`` caps
    it), each job's end to ``on_end`` as it ends. A signal stops every member (each saves a
    checkpoint); the sweep then ends (``runner.run.sweep.stop_sweep``), the trials it stopped
    left running in the study, for the rerun."""
    stream = JobStream(launcher, next_job, on_end, min(width, launcher.max_members or width))
    interrupted: Optional[Interrupted] = None
    with stop_on_signals() as stop:
        while not stop.requested:
            group = stream.next_group()
            if not group:
                break
            interrupted = stream.train(group, stop) or interrupted
        if stop.requested:
            interrupted = stream.stop_waiting(stop) or interrupted
    if interrupted:
        raise SystemExit(stop_sweep(interrupted))


class JobStream:
    """The jobs of a search's stream: opened as they come, waiting for a group, ended and
    told as they end (see the module doc)."""

    def __init__(self, launcher, next_job: NextJob, on_end: OnEnd, width: int):
        self.launcher, self.next_job, self.on_end, self.width = launcher, next_job, on_end, width
        self.optuna = marks_failed_trials(launcher.config.hydra)
        self.waiting: List[Job] = []  # opened, for a group to come
        self.live: List[Job] = []  # opened and not yet ended
        self.keys: Dict[int, Hashable] = {}

    def key(self, job: Job) -> Hashable:
        """What a job's program is: jobs of equal keys share one. A slot's member trains from
        its own step, so the start step does not part them (``group_key``'s is set to 0)."""
        if job.idx not in self.keys:
            run = job.session.run
            key = group_key(run.spec, run.cadence, run.cfg.trainer, 0,
                            (run.state, run.data, run.train_rng))
            self.keys[job.idx] = ("alone", job.idx) if key is None else key
        return self.keys[job.idx]

    def pull(self) -> Optional[Job]:
        """The search's next job, opened (its run built); None once the search asks no more.
        A job that ends before it trains (done before, or failing to compose or open) is
        told at once, and the next one pulled."""
        while True:
            with working_for(()):  # the sweeper's lines and Hydra's set-up: no run's
                item = self.next_job()
                if item is None:
                    return None
                job = register_job(self.launcher, item[0], list(item[1]))
            # Hydra's set-up of the job reset the logging: the open runs' logs come back
            for other in self.live:
                other.session.log.attach()
            if job.value is None:
                with working_for([job.run_dir]):
                    open_job(job)
            if job.member is not None:
                self.live.append(job)
                return job
            self.tell(job)

    def tell(self, job: Job) -> None:
        with working_for(()):
            self.on_end(job.idx, job_return(self.launcher, job, self.optuna))

    def end(self, job: Job, result: Result) -> None:
        """A trained job's end recorded; told unless a signal stopped it (its trial stays
        running in the study: the rerun resumes it)."""
        end_with(job, result)
        self.live.remove(job)
        if not isinstance(result, Interrupted):
            self.tell(job)

    def next_group(self) -> List[Job]:
        """The next group's jobs: the first waiting job's program, up to ``width`` of them
        (fewer where the device's free memory says so)."""
        while len(self.waiting) < self.width:
            job = self.pull()
            if job is None:
                break
            self.waiting.append(job)
        if not self.waiting:
            return []
        key = self.key(self.waiting[0])
        group = fit_to_device([j for j in self.waiting if self.key(j) == key][:self.width])[0]
        self.waiting = [j for j in self.waiting if j not in group]
        return group

    def next_for(self, key: Hashable) -> Optional[Job]:
        """A job of program ``key`` for a freed slot: a waiting one, else the next pulled;
        others pulled meanwhile wait (up to ``width``) for their own group."""
        for job in self.waiting:
            if self.key(job) == key:
                self.waiting.remove(job)
                return job
        while len(self.waiting) < self.width:
            job = self.pull()
            if job is None or self.key(job) == key:
                return job
            self.waiting.append(job)
        return None

    def train(self, group: List[Job], stop: StopRequest) -> Optional[Interrupted]:
        """Train a group whose freed slots take the stream's next jobs of its program; how
        a signal stopped it (a member's Interrupted), if one did."""
        for job in group:  # their wall time and compilations count from here
            job.session.begin(compiled_name(len(group)))
        announce_group(group)
        slots = Slots(self, group, stop)
        with slots.feeds:
            results = train_group([job.session for job in group], stop, refill=slots.refill)
        for job, result in zip(slots.jobs, results):
            if job.idx not in slots.ended:
                self.end(job, result)
        return next((r for r in results if isinstance(r, Interrupted)), None)

    def stop_waiting(self, stop: StopRequest) -> Optional[Interrupted]:
        """A signal: the waiting jobs end before their group trained (the rerun runs them)."""
        interrupted: Optional[Interrupted] = None
        for job in self.waiting:
            error = Interrupted(f"stopped by {stop.signal_name} before its group trained",
                                job.member.step)
            end_job(job, error=error)
            self.live.remove(job)
            interrupted = interrupted or error
        self.waiting = []
        return interrupted


class Slots:
    """A group's slots: which job each holds, and the host loop's ``refill`` of a freed one."""

    def __init__(self, stream: JobStream, group: List[Job], stop: StopRequest):
        self.stream, self.stop, self.jobs = stream, stop, list(group)
        self.key, self.size = stream.key(group[0]), len(group)
        self.ended: Set[int] = set()  # the jobs ended (and told) through ``refill``
        self.feeds = ExitStack()  # the feeds of the jobs that came into a slot
        self.slot_feeds: Dict[int, ExitStack] = {}

    def refill(self, slot: int, result: Result):
        """End the slot's job; its next (a job of the group's program), its start and its
        feed, or None (a stop request, or no such job)."""
        ending = self.jobs[slot]
        self.stream.end(ending, result)
        self.ended.add(ending.idx)
        if slot in self.slot_feeds:  # the ended job's feed, if it came into this slot
            self.slot_feeds.pop(slot).close()
        job = None if self.stop.requested else self.stream.next_for(self.key)
        if job is None:
            return None
        job.session.begin(compiled_name(self.size))
        log.info("job %d takes job %d's slot in the group (from step %d)", job.idx, ending.idx,
                 job.member.step)
        self.jobs[slot] = job
        run = job.session.run
        own = self.slot_feeds[slot] = self.feeds.enter_context(ExitStack())
        feed, = own.enter_context(feeds_for([run]))
        return job.member, (run.state, run.data, run.train_rng), feed
