"""``manifest.json``: what a run ran on, to reproduce it (one entry per start or resume)."""

import json
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax

from runner.io.code_record import (project_repos, repo_record, repo_root, runner_checkout,
                                   runner_version)
from runner.io.files import write_atomic
from runner.io.layout import RunPaths

PACKAGES = ("jax", "jaxlib", "flax", "optax", "hydra-core", "omegaconf", "tensorboardX", "numpy")


def write_manifest(run_dir: Path, *, devices: List[jax.Device], overrides: Sequence[str],
                   start_step: int, placement: Optional[Dict[str, Any]] = None,
                   user_modules: Sequence[str] = ()) -> None:
    """Record versions, the devices used (and ``placement``: their count, processes,
    precision, peak FLOP/s), XLA flags and, per attempt (a resume appends its own), the
    command line and the code: the user's project (the repos of the working directory and of
    ``user_modules``) and runner's own version and commit."""
    path = RunPaths(run_dir).manifest
    try:
        attempts = json.loads(path.read_text()).get("attempts", [])
    except (OSError, ValueError):
        attempts = []
    attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
                     "overrides": list(overrides), "start_step": start_step,
                     "host": socket.gethostname(), "code": code(run_dir, user_modules)})
    manifest: Dict[str, Any] = {
        "versions": {"python": platform.python_version(), **{p: package_version(p) for p in PACKAGES}},
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "placement": placement,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS",
                                               "XLA_PYTHON_CLIENT_PREALLOCATE",
                                               "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        "attempts": attempts,
    }
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())


def package_version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code(run_dir: Path, user_modules: Sequence[str]) -> Dict[str, Any]:
    """The attempt's code: ``project``, a record per repo of the user's (its root, what it
    holds, commit, branch, dirty, the uncommitted diff's sha256 and size, its file in the run
    dir when small, the untracked files), and ``runner``: its version and its repo's record
    when it runs from a checkout (else null), its diff saved alike."""
    checkout = runner_checkout()
    root = repo_root(checkout) if checkout else None
    own = repo_record(root, ["runner"]) if root else None
    return {"project": [{**record, "diff": save_diff(run_dir, record, diff)}
                        for record, diff in project_repos(Path.cwd(), user_modules)],
            "runner": {"version": runner_version(),
                       "git": {**own[0], "diff": save_diff(run_dir, *own)} if own else None}}


def save_diff(run_dir: Path, record: Dict[str, Any], diff: Optional[bytes]) -> Optional[str]:
    """Write ``diff`` as ``code/<its sha256>.diff`` (an attempt with unchanged code finds it
    there already); its path in the run dir, or None when there is no diff to keep."""
    if diff is None:
        return None
    path = RunPaths(run_dir).code_diff(record["diff_sha256"])
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, diff)
    return path.relative_to(run_dir).as_posix()
