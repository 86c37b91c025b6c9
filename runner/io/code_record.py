"""The record of the code a run ran, for ``manifest.json``: the git repos of the user's project
(the one that holds the working directory, and each one holding a user module that a
``_target_`` names) and runner's own version and commit.

git is asked through its command line: a library (GitPython, pygit2) would be a new dependency
for five read-only queries. Whatever git cannot answer (not installed, not a repo, a failure,
slower than ``GIT_TIMEOUT``) is null: the record never fails a run.
"""

import hashlib
import importlib.util
import subprocess
import sysconfig
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

GIT_TIMEOUT = 5.0  # seconds per git command: a hung or huge repo costs a run at most this
DIFF_LIMIT = 1 << 20  # bytes: a larger diff is hashed and sized, not saved
DISTRIBUTION = "jax-yaml-runner"  # runner's distribution: pyproject's [project] name
# A module below one of these is an installed copy, not a checkout, whatever repo holds the
# venv it was installed into.
INSTALLED = tuple(Path(p).resolve() for p in {sysconfig.get_paths()[k]
                                              for k in ("purelib", "platlib")})


def git_command(root: Path, *args: str) -> List[str]:
    # --no-optional-locks: a run's `git status` must not take the index lock from the user's git.
    return ["git", "--no-optional-locks", "-C", str(root), *args]


def git(root: Path, *args: str) -> Optional[str]:
    """``git -C root <args>``'s output, stripped; None when git fails, is missing or slow."""
    try:
        proc = subprocess.run(git_command(root, *args), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=GIT_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.decode(errors="replace").strip() if proc.returncode == 0 else None


def uncommitted_diff(root: Path) -> Optional[Tuple[str, int, Optional[bytes]]]:
    """``git diff HEAD --binary`` (staged and unstaged changes of tracked files, binary ones
    included, appliable with ``git apply``): its sha256, its size, and itself when at most
    DIFF_LIMIT bytes. Read in chunks, so a huge diff is hashed without being held."""
    try:
        proc = subprocess.Popen(git_command(root, "diff", "HEAD", "--binary", "--no-color",
                                            "--no-ext-diff", "--no-textconv"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
    except OSError:
        return None
    timer = threading.Timer(GIT_TIMEOUT, proc.kill)
    timer.start()
    digest, size, kept = hashlib.sha256(), 0, []
    try:
        for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):
            digest.update(chunk)
            size += len(chunk)
            if size <= DIFF_LIMIT:
                kept.append(chunk)
        ok = proc.wait() == 0  # killed by the timer: negative
    finally:
        timer.cancel()
        proc.stdout.close()
    if not ok:
        return None
    return digest.hexdigest(), size, b"".join(kept) if size <= DIFF_LIMIT else None


def untracked_files(root: Path) -> Optional[List[str]]:
    """Files git does not track and does not ignore (a new folder: its name), as git status
    lists them."""
    status = git(root, "status", "--porcelain", "--untracked-files=normal")
    if status is None:
        return None
    return [line[3:] for line in status.splitlines() if line.startswith("?? ")]


def repo_root(directory: Path) -> Optional[Path]:
    """The top of the git work tree that holds ``directory``; None outside any."""
    top = git(directory, "rev-parse", "--show-toplevel")
    return Path(top) if top else None


def repo_record(root: Path, holds: List[str]) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """One repo's record and its uncommitted diff (None: clean, too large or unknown).
    ``dirty`` counts changes to tracked files only (``untracked`` lists the rest): a run's own
    outputs inside the project are untracked, and would make every run dirty."""
    commit = git(root, "rev-parse", "--verify", "-q", "HEAD")
    diff = uncommitted_diff(root) if commit else None
    record = {"root": str(root), "holds": holds, "commit": commit,
              "branch": git(root, "symbolic-ref", "--short", "-q", "HEAD"),  # detached: None
              "dirty": None if diff is None else diff[1] > 0,
              "diff_sha256": diff[0] if diff and diff[1] else None,
              "diff_bytes": diff[1] if diff else None,
              "untracked": untracked_files(root)}
    return record, diff[2] if diff and diff[1] else None


def source_dirs(module: str) -> List[Path]:
    """Where top-level ``module``'s code lies (a namespace package: each of its folders),
    symbolic links resolved (an editable install's link tree leads to the checkout); none for
    a module that cannot be found, has no files, or is an installed copy."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.origin and spec.has_location:
        dirs = [Path(spec.origin).resolve().parent]
    else:
        dirs = [Path(d).resolve() for d in spec.submodule_search_locations or ()]
    return [d for d in dirs if not any(d.is_relative_to(p) for p in INSTALLED)]


def project_repos(cwd: Path, modules: Iterable[str]) -> List[Tuple[Dict[str, Any],
                                                                  Optional[bytes]]]:
    """The records of the repos holding ``cwd`` and the user's ``modules``, each repo once,
    ``holds`` naming what it holds (``"."``: the working directory)."""
    holders: Dict[Path, List[str]] = {}
    for name, directories in (("." , [cwd]), *((m, source_dirs(m)) for m in modules)):
        for root in filter(None, map(repo_root, directories)):
            holders.setdefault(root, [])
            if name not in holders[root]:
                holders[root].append(name)
    return [repo_record(root, holds) for root, holds in holders.items()]


def runner_checkout() -> Optional[Path]:
    """The checkout runner runs from: the folder above the ``runner`` package, where its
    pyproject.toml sits; None for an installed copy (no pyproject.toml beside it)."""
    dirs = source_dirs("runner")
    root = dirs[0].parent if dirs else None
    return root if root is not None and (root / "pyproject.toml").is_file() else None


def runner_version() -> Optional[str]:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return None
