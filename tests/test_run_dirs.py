"""Run dirs you can trust, at the seams: nothing is written by a process that does not own the
dir (or is about to refuse it), a fresh run never mixes with an old one, a resume never
restarts over checkpoints it cannot read, and what a run prints works as printed. Each test
compares the dir byte for byte before and after."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from conftest import TINY, run_cli
from test_own_project import project  # noqa: F401 (a fixture: the user's own package)


def snapshot(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def assert_same(before: Dict[str, bytes], root: Path) -> None:
    after = snapshot(root)
    assert sorted(after) == sorted(before), set(after) ^ set(before)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, changed


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit 1 and said why on one stderr line (and printed no config)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: "), errors
    assert "config" not in proc.stdout or "├" not in proc.stdout, proc.stdout[-2000:]
    return errors[0]


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"no {text!r} in {path}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_fresh_run_never_reuses_a_run_dir(tmp_path):
    run_cli([*TINY, "hydra.run.dir=runs/same"], cwd=tmp_path)
    before = snapshot(tmp_path / "runs/same")
    again = run_cli([*TINY, "hydra.run.dir=runs/same", "optimizer.lr=0.01", "seed=3"],
                    cwd=tmp_path, check=False)
    line = one_error_line(again)
    assert "runs/same holds a run (completed at step 4)" in line
    assert "python -m runner resume=runs/same" in line and "overwrite=true" in line
    assert_same(before, tmp_path / "runs/same")
    # overwrite=true: the old run is moved aside whole, never deleted nor mixed in.
    run_cli([*TINY, "trainer.steps=6", "hydra.run.dir=runs/same", "overwrite=true"],
            cwd=tmp_path)
    old = tmp_path / "runs/same/attempts/1"
    assert {k: v for k, v in before.items() if k != ".lock"} == snapshot(old)
    assert sorted(p.name for p in (tmp_path / "runs/same/checkpoints").iterdir()) == \
        ["best.json", "best.msgpack", "step_2.msgpack", "step_4.msgpack", "step_6.msgpack"]
    assert json.loads((tmp_path / "runs/same/metrics.json").read_text())["steps"] == 6
    assert len(list((tmp_path / "runs/same/tb").glob("events.*"))) == 1


def small_arrays(path: Path, seed: int) -> Path:
    """A task=arrays file: 3-class labels of 3 features, 24 to train on and 8 to eval."""
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.normal(size=(24, 3)).astype(np.float32),
             y_train=rng.integers(0, 3, 24), x_eval=rng.normal(size=(8, 3)).astype(np.float32),
             y_eval=rng.integers(0, 3, 8))
    return path


@pytest.mark.slow
def test_overwrite_sets_aside_every_file_of_a_run_that_read_files(tmp_path):
    """The record of the files an arrays run read (inputs.json) goes aside with its run: the
    new run records its own."""
    common = [*TINY, "task=arrays", "task.batch_size=8", "hydra.run.dir=runs/a"]
    first = small_arrays(tmp_path / "first.npz", 0)
    run_cli([*common, f"task.path={first}"], cwd=tmp_path)
    before = snapshot(tmp_path / "runs/a")
    assert "inputs.json" in before
    second = small_arrays(tmp_path / "second.npz", 1)
    run_cli([*common, f"task.path={second}", "overwrite=true"], cwd=tmp_path)
    kept = snapshot(tmp_path / "runs/a/attempts/1")
    assert sorted(kept) == sorted(k for k in before if k != ".lock")
    assert [k for k in kept if kept[k] != before[k]] == []
    recorded = json.loads((tmp_path / "runs/a/inputs.json").read_text())
    assert recorded["path"] == str(second) and recorded["bytes"] == [second.stat().st_size]
    assert json.loads(kept["inputs.json"])["path"] == str(first)


@pytest.mark.slow
def test_a_fresh_run_into_an_interrupted_dir_points_at_resume(tmp_path):
    run_cli([*TINY, "hydra.run.dir=runs/x"], cwd=tmp_path)
    metrics = tmp_path / "runs/x/metrics.json"
    record = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**record, "status": "interrupted", "steps": 2}))
    before = snapshot(tmp_path / "runs/x")
    line = one_error_line(run_cli([*TINY, "hydra.run.dir=runs/x"], cwd=tmp_path, check=False))
    assert "holds a run (interrupted at step 2)" in line and "resume=runs/x" in line
    assert_same(before, tmp_path / "runs/x")


@pytest.mark.slow
def test_a_resume_that_no_checkpoint_fits_writes_nothing(tmp_path):
    run_cli([*TINY, "hydra.run.dir=runs/r"], cwd=tmp_path)
    stored = tmp_path / "runs/r/.hydra/config.yaml"
    stored.write_text(stored.read_text().replace("- 128\n", "- 48\n", 1))  # another model
    before = snapshot(tmp_path / "runs/r")
    line = one_error_line(run_cli(["resume=runs/r", "trainer.steps=8"], cwd=tmp_path,
                                  check=False))
    assert re.search(r"checkpoint .*step_4\.msgpack: does not match this run's state \(.*"
                     r"params\['Dense_0'\]\['bias'\] is float32\[128\], expected float32\[48\]\)", line), line
    assert "none of the 2 checkpoint(s)" in line
    assert_same(before, tmp_path / "runs/r")


@pytest.mark.slow
def test_checks_that_fail_leave_no_run_dir_and_print_no_config(tmp_path):
    for bad in ("trainer.steps=abc", "optimizer.lr=-1", "model=nope"):
        line = one_error_line(run_cli([bad], cwd=tmp_path, check=False))
        assert bad.split("=")[0] in line, line
    assert not (tmp_path / "outputs").exists()
    (tmp_path / "afile").write_text("x")
    line = one_error_line(run_cli(["resume=afile"], cwd=tmp_path, check=False))
    assert line == "error: resume=afile: a file; give the run's dir (the one that holds " \
                   ".hydra/ and checkpoints/)"


@pytest.mark.slow
def test_hydra_files_are_written_by_the_run_as_hydra_names_them(tmp_path):
    run_cli([*TINY, "hydra.run.dir=runs/h", "optimizer.lr=0.003"], cwd=tmp_path)
    hydra = tmp_path / "runs/h/.hydra"
    assert sorted(p.name for p in hydra.iterdir()) == ["config.yaml", "hydra.yaml",
                                                     "overrides.yaml"]
    assert "lr: 0.003" in (hydra / "config.yaml").read_text()
    assert "output_subdir: .hydra" in (hydra / "hydra.yaml").read_text()
    assert "- optimizer.lr=0.003" in (hydra / "overrides.yaml").read_text()
    log = (tmp_path / "runs/h/runner.log").read_text()
    assert "[runner.run.build][INFO] - devices:" in log and "eval/loss=" in log
    assert "\x1b" not in (tmp_path / "runs/h/model_summary.txt").read_text()


@pytest.mark.slow
def test_the_printed_resume_command_works_as_printed(project):  # noqa: F811
    """A user's task and model: the command a stopped run prints names RUNNER_TRUST."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS",
                                                            "RUNNER_TRUST")}
    a = subprocess.Popen(
        [sys.executable, "-m", "runner", "--config-dir", "myconf", "task=sine",
         "model=two_layer", "trainer.steps=3000000", "trainer.log_every=100",
         "trainer.steps_per_dispatch=100",
         "trainer.eval_every=null", "trainer.checkpoint_every=null", "device=cpu",
         "trainer.log_images=false", "trainer.progress_bar=false", "hydra.run.dir=out/s"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(project / "out/s/runner.log", "step 100/", a)
    finally:
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    printed = re.search(r"continue with: (.*)$", err, re.M)
    assert printed, err[-2000:]
    command = printed.group(1)
    assert command.startswith(f"RUNNER_TRUST=myproj {sys.executable} -m runner resume="), command
    stopped = json.loads((project / "out/s/metrics.json").read_text())["steps"]
    resumed = subprocess.run(
        f"{command} trainer.steps={stopped + 100}",
        shell=True, cwd=project, capture_output=True, text=True, timeout=300,
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((project / "out/s/metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_runs_and_sweeps_keep_to_their_own_dirs(tmp_path):
    """A run never goes on top of a sweep, nor a sweep into a run's dir; Hydra is not let
    write .hydra/ first; a dir of the user's own files (no run) keeps them where they are."""
    run_cli([*TINY, "hydra.run.dir=run"], cwd=tmp_path)
    run_cli(["-m", *TINY, "trainer.log_images=false", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    before = {name: snapshot(tmp_path / name) for name in ("run", "sweep")}
    for args, said in ((["hydra.run.dir=sweep", "overwrite=true"], "sweep holds a sweep"),
                       (["-m", "hydra.sweep.dir=run"], "run holds a run (completed at step 4), "
                                                       "not a sweep"),
                       (["hydra.run.dir=run", "hydra.output_subdir=.hydra"],
                        "hydra.output_subdir=.hydra: runner writes .hydra/"),
                       (["hydra.run.dir=run", "hydra/job_logging=default"],
                        "hydra/job_logging=default: runner writes")):
        assert said in one_error_line(run_cli([*TINY, *args] if args[0] != "-m" else
                                              ["-m", *TINY, *args[1:]], cwd=tmp_path,
                                              check=False))
    for name, files in before.items():
        assert_same(files, tmp_path / name)
    own = tmp_path / "own"
    (own / "notes").mkdir(parents=True)
    (own / "notes/plan.txt").write_text("mine")
    (own / "model_summary.txt").write_text("my own summary")  # a name a run writes too
    before = snapshot(own)
    line = one_error_line(run_cli([*TINY, "hydra.run.dir=."], cwd=own, check=False))
    assert ". holds a run (files a run writes: model_summary.txt)" in line, line
    assert_same(before, own)
    (own / "model_summary.txt").unlink()
    run_cli([*TINY, "hydra.run.dir=."], cwd=own)
    assert (own / "notes/plan.txt").read_text() == "mine"
    assert not (own / "attempts").exists() and (own / "metrics.json").is_file()
