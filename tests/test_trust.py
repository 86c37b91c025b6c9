"""The resume command a stopped run prints works as printed: in a fresh shell of the same
working directory, no venv active, with RUNNER_TRUST naming the user's own modules of every
``_target_`` (here a built-in task and the user's own model)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import user_project
from runner.run.trust import resume_command

MODEL = '''
from typing import Optional

import flax.linen as nn


class Affine(nn.Module):
    """The user's own model: one Dense layer."""

    out_features: Optional[int] = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out_features)(x)
'''
# Minibatch steps, 20,000 (~0.3 s) per dispatch, no end of its own: the signal stops it.
LONG = ["task.batch_size=10", "trainer.log_every=20000", "trainer.steps_per_dispatch=20000",
        "trainer.eval_every=null", "trainer.checkpoint_every=null", "trainer.log_images=false",
        "trainer.progress_bar=false", "trainer.steps=1000000000", "device=cpu"]
# A shell as a user opens it: no venv on PATH, none active, nothing trusted yet.
FRESH_SHELL = {**{k: v for k, v in os.environ.items()
                  if k not in ("PATH", "VIRTUAL_ENV", "RUNNER_TRUST", "HYDRA_FULL_ERROR")},
               "PATH": "/usr/bin:/bin"}


@pytest.fixture
def own_model(tmp_path):
    """A user's package ``mymodels`` holding only a model, and its config dir."""
    return user_project(tmp_path, "mymodels", {"affine": MODEL},
                        {"model/affine.yaml": "_target_: mymodels.affine.Affine\n"})


def stopped_run(cwd: Path, args, signum) -> str:
    """Start ``python -m runner args`` in ``cwd``, stop it with ``signum`` once it has logged
    a dispatch; the command its last line says to continue with."""
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args, "hydra.run.dir=out/run"],
                            cwd=cwd, env={**FRESH_SHELL, "PATH": os.environ["PATH"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = cwd / "out/run/runner.log", time.monotonic() + 120
    try:
        while "step 20000/" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no dispatch logged in time"
            time.sleep(0.02)
        proc.send_signal(signum)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    printed = re.search(r"; continue with: (.*)$", err.strip().splitlines()[-1])
    assert printed, err[-3000:]
    return printed.group(1)


def resume_as_printed(command: str, cwd: Path) -> None:
    """Run ``command`` (plus a nearby end) with ``bash -c`` in a fresh shell in ``cwd``: it
    resumes the run and completes it."""
    stopped = json.loads((cwd / "out/run/metrics.json").read_text())
    assert stopped["status"] == "interrupted"
    end = stopped["steps"] + 20000
    proc = subprocess.run(["bash", "-c", f"{command} trainer.steps={end}"], cwd=cwd,
                          env=FRESH_SHELL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((cwd / "out/run/metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["resumed_from"]) == (
        "completed", end, stopped["steps"])


@pytest.mark.slow
def test_the_printed_command_of_an_interrupted_run_resumes_it_in_a_fresh_shell(tmp_path):
    command = stopped_run(tmp_path, LONG, signal.SIGINT)
    assert "RUNNER_TRUST" not in command  # runner's own task and model
    resume_as_printed(command, tmp_path)


@pytest.mark.slow
def test_the_printed_command_trusts_the_users_own_model(own_model):
    """A built-in task with the user's own model: the command names the model's package."""
    command = stopped_run(own_model, ["--config-dir", "myconf", "model=affine", *LONG],
                          signal.SIGTERM)
    assert command.startswith("RUNNER_TRUST=mymodels "), command
    resume_as_printed(command, own_model)


def test_the_command_names_the_interpreter_as_a_shell_finds_it(tmp_path, monkeypatch):
    """Relative to the working directory when the interpreter lies under it (a bare name is
    made a path, or the shell would look it up on PATH), else absolute; shell-quoted; every
    user module of a ``_target_``, nested ones too, in RUNNER_TRUST."""
    cfg = OmegaConf.create({
        "task": {"_target_": "runner.tasks.linear_fit.LinearFit"},
        "model": {"_target_": "mymodels.affine.Affine",
                  "init": {"_target_": "myinits.Scaled"}},
        "optimizer": {"_target_": "optax.adam"}})
    run_dir = tmp_path / "a run"
    python = Path(sys.executable)
    monkeypatch.chdir(python.parent)
    assert resume_command(run_dir, cfg) == (
        f"RUNNER_TRUST=mymodels,myinits ./{shlex.quote(python.name)} -m runner "
        f"'resume={run_dir}'")
    monkeypatch.chdir(python.parent.parent)
    assert resume_command(run_dir, cfg).split(" ")[1] == shlex.quote(
        f"{python.parent.name}/{python.name}")
    monkeypatch.chdir(tmp_path)
    assert resume_command(run_dir, OmegaConf.create({})) == (
        f"{shlex.quote(str(python))} -m runner 'resume={run_dir}'")
