"""Shared fixtures: configs composed with Hydra's compose API (tiny sizes), and the real CLI."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig


REPO = Path(__file__).resolve().parents[1]
# JAX's persistent compilation cache (device.compilation_cache_dir) of the test session's runs,
# in-process and CLI: shared between them, never the user's own ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="runner-tests-cache-")
CONF = REPO / "conf"

# Few steps and small shapes: every test run finishes in seconds on 2 CPU cores.
TINY = ["trainer.steps=4", "trainer.log_every=2", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.progress_bar=false"]
TINY_CNN = ["task=cnn_random_images", "task.image_size=16", "task.batch_size=8",
            "task.num_eval=16", "model.dense_features=[16]", "model.conv_features=[8,8]"]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m runner <overrides>`` would run, with tiny trainer settings."""
    with initialize_config_module(config_module="runner.conf", version_base=None):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def group_options(group: str) -> List[str]:
    """Every option of a config group, as files in conf/ (e.g. "optimizer" -> adam, sgd...)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def free_port() -> int:
    """A free TCP port on the loopback interface (a coordinator's, a TensorBoard server's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED: List[subprocess.Popen] = []  # every process a test started: ended with the test


@pytest.fixture(autouse=True)
def end_started_processes():
    """Kill what a test started and left running, however the test ended (an assertion that
    failed mid-way, a run that never stopped)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_process(args: Sequence[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``, ended when the test ends if still running."""
    proc = subprocess.Popen(list(args), **kwargs)
    STARTED.append(proc)
    return proc


def user_project(root: Path, package: str, modules: Dict[str, str],
                 configs: Dict[str, str]) -> Path:
    """A researcher's project in ``root``: their package ``package`` with ``modules`` (module
    name: source) and their config dir ``myconf`` with ``configs`` (path in it: YAML)."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    for name, source in modules.items():
        (root / package / f"{name}.py").write_text(source)
    for name, text in configs.items():
        path = root / "myconf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_cli(args: Sequence[str], *, cwd: Path, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m runner <args>`` in a subprocess, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def start(overrides: Sequence[str] = (), *, seed: int = 0, mesh=None):
    """(task, model, optimizer) of ``python -m runner <overrides>`` and the run's start from
    ``seed`` (state, data, init key, train key)."""
    from runner.core.steps import setup
    from runner.run.build import build_parts

    parts = build_parts(compose_config(overrides))
    return parts, setup(seed, *parts, mesh=mesh)


@pytest.fixture
def tiny_cfg():
    return compose_config


def chromium_or_skip() -> str:
    """Debian's chromium for the browser tests: skipped without it, but failed in CI, where
    .ci/run installs it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return chromium
