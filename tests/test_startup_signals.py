"""Ctrl-C or SIGTERM at any moment of ``python -m runner``, from its first line: the run stops
(exit status not 0), before its loop leaving no run behind (or an ``interrupted`` one), and
what it left goes on (``resume=``, or the same command again).

The moments: at once (the imports), after fixed delays (the imports, composing the config, the
run's own imports, where Python's KeyboardInterrupt was lost inside JAX's garbage-collector
callback and the run trained to its end), when Hydra made the run dir, when the run wrote its
``running`` record (the step compiling). Any moment may come earlier or later on a loaded
machine: each outcome is checked against what every moment allows, never against a time."""

import json
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import run_cli, start_process

pytestmark = pytest.mark.slow

# Far more steps than a start-up's time: a run that ignored the signal trains on to the end.
STEPS = 200_000
ARGS = [f"trainer.steps={STEPS}", "trainer.log_images=false", "trainer.progress_bar=false"]
DELAYS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_with_signal(args: List[str], *, sig: signal.Signals, cwd: Path,
                    delay: float = 0.0, marker: Optional[Path] = None):
    """``python -m runner <args>``, sent ``sig`` once ``delay`` passed (or ``marker`` exists);
    its exit status and output."""
    out = cwd / f"out-{len(list(cwd.glob('out-*')))}.txt"
    with out.open("w") as sink:
        # As from a terminal: SIGINT at its default in the new process, even where this one
        # ignores it (a script's `&` job), which the process would inherit until runner's
        # handler, its first line, replaces it: a signal before then would be ignored.
        proc = start_process([sys.executable, "-m", "runner", *args], cwd=cwd, stdout=sink,
                             stderr=sink, preexec_fn=default_sigint)
        time.sleep(delay)
        while marker is not None and not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        running = proc.poll() is None
        proc.send_signal(sig)
        proc.wait()
    assert running, f"it ended before the signal, exit {proc.returncode}:\n{out.read_text()}"
    return proc.returncode, out.read_text()


def check_stopped(run_dir: Path, returncode: int, output: str) -> Optional[str]:
    """Assert the run stopped: exit status not 0, its dir absent, unused (Hydra's empty dir)
    or recorded ``interrupted`` before the last step. Its status, or None (no run)."""
    said = f"exit {returncode}:\n{output[-3000:]}"
    assert returncode != 0, said
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        assert not run_dir.exists() or not any(run_dir.iterdir()), said
        return None
    record = json.loads(metrics.read_text())
    assert record["status"] == "interrupted", said
    assert record["steps"] < STEPS, said
    return record["status"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_run_starts_stops_it_and_the_run_goes_on(tmp_path, sig):
    """Each moment: exit not 0, no run or an interrupted one; then resume= and a rerun work."""
    moments = [{"delay": d} for d in DELAYS] + [
        {"marker": ""},  # Hydra made the run dir: runner's imports, the checks
        {"marker": "metrics.json"}]  # the run's `running` record: the step compiling
    kept, unused = None, None
    for i, moment in enumerate(moments):
        run_dir = tmp_path / f"run{i}"
        marker = moment.get("marker")
        returncode, output = run_with_signal(
            [*ARGS, f"hydra.run.dir={run_dir}"], sig=sig, cwd=tmp_path,
            delay=moment.get("delay", 0.0), marker=None if marker is None else run_dir / marker)
        if check_stopped(run_dir, returncode, output):
            kept = kept or run_dir
        else:
            unused = unused or run_dir
    assert kept is not None, "the last moment comes after the run wrote its record"

    # Its resume, stopped as it starts, leaves it as it was (or interrupted anew) ...
    for delay in (0.0, 1.5):
        check_stopped(kept, *run_with_signal([f"resume={kept}"], sig=sig, cwd=tmp_path,
                                             delay=delay))
    # ... and resumes where it stopped; a dir left unused takes a new run.
    run_cli([f"resume={kept}", "trainer.steps=300"], cwd=tmp_path)
    assert json.loads((kept / "metrics.json").read_text())["status"] == "completed"
    if unused is not None:
        run_cli([*ARGS[1:], "trainer.steps=100", f"hydra.run.dir={unused}"], cwd=tmp_path)
        assert json.loads((unused / "metrics.json").read_text())["status"] == "completed"


def test_a_signal_while_a_sweep_starts_stops_it(tmp_path):
    """``-m``: the sweep stops, none of its jobs trained to the end."""
    for sweep, moment in [(tmp_path / "a", {"delay": 1.5}),
                          (tmp_path / "b", {"marker": tmp_path / "b/0"})]:
        returncode, output = run_with_signal(
            ["-m", "seed=0,1", *ARGS, f"hydra.sweep.dir={sweep}"], sig=signal.SIGINT,
            cwd=tmp_path, **moment)
        for job in ("0", "1"):
            check_stopped(sweep / job, returncode, output)
