"""``manifest.json``: what a run ran on, to reproduce it (one entry per start or resume)."""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax

from runner.io.files import write_atomic
from runner.io.layout import RunPaths

PACKAGES = ("jax", "jaxlib", "flax", "optax", "hydra-core", "omegaconf", "tensorboardX", "numpy")


def write_manifest(run_dir: Path, *, devices: List[jax.Device], overrides: Sequence[str],
                   start_step: int, placement: Optional[Dict[str, Any]] = None) -> None:
    """Record versions, the devices used (and ``placement``: their count, processes,
    precision, peak FLOP/s), XLA flags, the project's git commit and the command line; a
    resume appends its own entry to ``attempts``."""
    path = RunPaths(run_dir).manifest
    try:
        attempts = json.loads(path.read_text()).get("attempts", [])
    except (OSError, ValueError):
        attempts = []
    attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
                     "overrides": list(overrides), "start_step": start_step,
                     "host": socket.gethostname()})
    manifest: Dict[str, Any] = {
        "versions": {"python": platform.python_version(), **{p: package_version(p) for p in PACKAGES}},
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "placement": placement,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS",
                                               "XLA_PYTHON_CLIENT_PREALLOCATE",
                                               "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        "git": _git_state(Path(__file__).resolve().parents[1]),
        "attempts": attempts,
    }
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())


def package_version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_state(source: Path) -> Optional[Dict[str, Any]]:
    """The commit of the runner source tree (and whether it had local changes), if it is a
    git checkout itself (an installed copy in a venv inside some other repo is not)."""
    if not (source / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None
