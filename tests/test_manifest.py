"""manifest.json's record of the code: the user's project (the repos of the working directory
and of the user's modules), each attempt's own, and runner's version and commit."""

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO, TINY, compose_config, run_cli
from runner.io.code_record import DISTRIBUTION, project_repos
from runner.run.train import run
from test_own_project import MODEL, TASK


def git(cwd: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A user's project under git: its package ``myproj`` (task, model), its config dir
    ``myconf``, one commit on branch ``main``."""
    root = tmp_path / "proj"
    (root / "myproj").mkdir(parents=True)
    (root / "myproj" / "__init__.py").write_text("")
    (root / "myproj" / "tasks.py").write_text(TASK)
    (root / "myproj" / "models.py").write_text(MODEL)
    for group, text in (("task", "_target_: myproj.tasks.Sine\n"),
                        ("model", "_target_: myproj.models.TwoLayer\nhidden: 8\n")):
        (root / "myconf" / group).mkdir(parents=True)
        (root / "myconf" / group / "own.yaml").write_text(text)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    return root.resolve()  # as git names it (no symbolic links)


@pytest.mark.slow
def test_records_the_users_repo_and_each_attempts_changes(repo, monkeypatch):
    run_cli(["--config-dir", "myconf", *TINY, "task=own", "model=own", "device=cpu",
             "hydra.run.dir=out/a"], cwd=repo)
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    (repo / "myproj" / "models.py").write_text(MODEL + "# tried a change\n")  # tracked
    monkeypatch.setenv("RUNNER_TRUST", "myproj")
    run_cli(["resume=out/a", "trainer.steps=6"], cwd=repo)

    manifest = json.loads((repo / "out/a/manifest.json").read_text())
    first, second = (a["code"]["project"] for a in manifest["attempts"])
    assert [(r["root"], r["holds"], r["commit"], r["branch"], r["dirty"], r["diff"])
            for r in first] == [(str(repo), [".", "myproj"], head, "main", False, None)]
    assert first[0]["untracked"] == ["out/"]  # the run's own outputs: not "dirty"
    diff = git(repo, "diff", "HEAD", "--binary")
    assert b"+# tried a change" in diff
    [record] = second
    assert (record["commit"], record["dirty"]) == (head, True)
    assert record["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    assert record["diff_bytes"] == len(diff)
    assert (repo / "out/a" / record["diff"]).read_bytes() == diff


def test_records_runners_version_and_commit_and_no_project_outside_a_repo(tmp_path,
                                                                          monkeypatch):
    outside = tmp_path / "work"
    outside.mkdir()
    monkeypatch.chdir(outside)
    run(compose_config(), tmp_path / "run")
    [attempt] = json.loads((tmp_path / "run/manifest.json").read_text())["attempts"]
    assert attempt["code"]["project"] == []  # the run still succeeded
    own = attempt["code"]["runner"]
    assert own["version"] == metadata.version(DISTRIBUTION)
    if (REPO / ".git").exists():  # tests run from a checkout: its commit
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert (own["git"]["root"], own["git"]["commit"]) == (str(REPO), head)
    else:
        assert own["git"] is None


def test_installed_modules_detached_heads_and_no_git(repo, tmp_path, monkeypatch):
    # optax lies in the venv, which may sit inside a repo (runner's): an installed copy, no repo
    assert project_repos(tmp_path, ["optax", "not_a_module"]) == []
    git(repo, "checkout", "-q", "--detach")
    [(record, diff)] = project_repos(repo, [])
    assert (record["branch"], record["dirty"], diff) == (None, False, None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all: nothing, no error
    assert project_repos(repo, []) == []
