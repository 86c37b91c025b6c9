"""The conventions Hydra users know and the views JAX users want: ``experiment=`` configs,
``debug=fast|profile|nans`` presets (the profile in TensorBoard's Profile tab), early stopping."""

import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (CONF, TINY_CNN, compose_config, free_port, group_options,
                      run_cli)
from runner.io.checkpoint import list_checkpoints
from runner.run.hparams import run_hparams
from test_tb_logger import ARTIFACTS, CHROMIUM_ARGS

# linear_fit with plain SGD at a tiny rate: the eval loss creeps down by ~2e-4 per 10 steps,
# a plateau for min_delta=1e-3. Evals at 10 (the first best), then 20, 30, 40 each improve on
# it by less than 1e-3: patience 3 stops the run at step 40.
PLATEAU = ["optimizer=sgd", "optimizer.lr=1e-9", "trainer.eval_every=10",
           "trainer.log_every=10", "trainer.checkpoint_every=50", "trainer.progress_bar=false",
           "trainer.early_stop.patience=3", "trainer.early_stop.min_delta=1e-3"]


def test_each_experiment_names_itself_and_composes_with_overrides():
    assert group_options("experiment") == ["cnn_baseline", "linear_fit_reference"]
    for name in group_options("experiment"):
        assert yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())[
            "experiment"] == name  # the name recorded is the file's
    cfg = compose_config(["experiment=cnn_baseline", "optimizer.lr=3e-4"])
    assert cfg.experiment == "cnn_baseline" and cfg.task._target_.endswith("CNNRandomImages")
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.schedule,
            cfg.trainer.best_metric) == ("optax.adamw", 3e-4, "warmup_cosine", "accuracy")
    reference = compose_config(["experiment=linear_fit_reference"])
    assert (reference.seed, list(reference.model.features), reference.model.activation,
            reference.optimizer.lr) == (42, [128], None, 1e-3)
    assert reference.trainer.steps == 4  # compose_config's command line wins over it


def test_an_experiment_run_records_its_name(tmp_path):
    run_cli(["experiment=linear_fit_reference", "trainer.steps=40", "optimizer.lr=3e-3",
             f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["experiment"] == "linear_fit_reference" and metrics["steps"] == 40
    stored = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert stored["experiment"] == "linear_fit_reference" and stored["optimizer"]["lr"] == 3e-3
    assert run_hparams(compose_config(["experiment=cnn_baseline"]))["experiment"] == \
        "cnn_baseline"


@pytest.mark.parametrize("task", [[], TINY_CNN, ["experiment=cnn_baseline", *TINY_CNN[1:]]])
def test_debug_fast_runs_any_task_for_a_few_steps(tmp_path, task):
    start = time.monotonic()
    proc = run_cli([*task, "debug=fast", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert time.monotonic() - start < 60
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 10
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [10]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [10]  # one eval, at the end
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    assert acc.Tags()["images"] == []
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: .  eval ") and "  best: step 10 eval/" in last, last


# debug=nans's reason: the step, the primitive, and the model's line that called it.
NAN_REASON = (r"step 2: invalid value \(nan\) encountered in dot_general at "
              r"\S*/models/mlp\.py:\d+ \(__call__: ")


def test_debug_nans_fails_at_the_operation_that_made_the_nan(tmp_path):
    proc = run_cli(["debug=nans", "optimizer.lr=1e30", "trainer.progress_bar=false",
                    f"hydra.run.dir={tmp_path}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(f"error: {NAN_REASON}", error[0]), error[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "dot_general" in metrics["reason"]
    stored = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert stored["device"]["debug_nans"] is True and stored["trainer"]["steps_per_dispatch"] == 1


def test_debug_nans_in_a_fused_sweep_fails_only_the_job_with_the_nan_as_a_run_would(tmp_path):
    """Under debug=nans the fused launcher trains each job alone: the NaN is named as in a
    single run, and fails only its own job."""
    proc = run_cli(["-m", "hydra/launcher=fused", "debug=nans", "optimizer.lr=1e30,1e-3",
                    "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path / 's'}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "into one group" not in out and out.count("debug=nans: each job trains alone") == 2
    failed, completed = (json.loads((tmp_path / "s" / job / "metrics.json").read_text())
                         for job in ("0", "1"))
    assert failed["status"] == "failed" and completed["status"] == "completed"
    assert re.match(NAN_REASON, failed["reason"]), failed["reason"]


def get_profile_json(url: str):
    """The profile plugin's JSON (it gzips its answers whatever the request accepts)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)


def test_debug_profile_traces_steps_that_tensorboard_shows(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["debug=profile", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    traces = sorted((run_dir / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"profile: 5 steps traced to {traces[0]}" in proc.stdout + proc.stderr
    # The trace's steps are the annotated train steps (after the first, compiling one).
    trace = json.loads(gzip.decompress(next(traces[0].parent.glob("*.trace.json.gz"))
                                       .read_bytes()))
    steps = [e["args"]["step_num"] for e in trace["traceEvents"] if e.get("name") == "train"]
    assert steps == ["1", "2", "3", "4", "5"]  # profile_steps=5, after the compiling step 0
    if importlib.util.find_spec("tensorboard_plugin_profile") is None:
        if os.environ.get("CI"):
            pytest.fail("tensorboard-plugin-profile is missing: the test extra installs it")
        pytest.skip("tensorboard-plugin-profile is not installed (pip install "
                    "'jax-yaml-runner[profile]')")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               str(run_dir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, runs = time.monotonic() + 90, []
        while not runs and time.monotonic() < deadline:
            try:
                runs = get_profile_json(f"{url}/data/plugin/profile/runs")
            except OSError:
                time.sleep(0.5)
        assert runs == [f"tb/{traces[0].parent.name}"]
        tools = get_profile_json(f"{url}/data/plugin/profile/run_tools?run="
                         f"{urllib.parse.quote(runs[0])}")
        assert "trace_viewer@" in tools or "trace_viewer" in tools, tools
        screenshot_profile_tab(url)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_debug_profile_of_a_fused_sweep_traces_its_one_program_once(tmp_path):
    """Into the first member's tb/; every member's log says where."""
    proc = run_cli(["-m", "hydra/launcher=fused", "debug=profile", "optimizer.lr=1e-3,1e-2",
                    "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path / 's'}"],
                   cwd=tmp_path)
    assert "into one group (2 members" in proc.stdout + proc.stderr
    traces = sorted((tmp_path / "s").glob("*/tb/plugins/profile/*/*.xplane.pb"))
    assert [t.relative_to(tmp_path / "s").parts[0] for t in traces] == ["0"]
    for job in ("0", "1"):
        log = (tmp_path / "s" / job / "runner.log").read_text()
        assert f"profile: 5 steps traced to {traces[0]}" in log
        assert json.loads((tmp_path / "s" / job / "metrics.json").read_text())["status"] \
            == "completed"


def screenshot_profile_tab(url: str) -> None:
    """The Profile tab in headless Chromium, kept as test-artifacts/profile.png."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        return
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"{url}/#profile")
            # XProf renders in a frame of its own: wait for its overview of the session.
            deadline = time.monotonic() + 60
            while not any("Performance Summary" in frame.content() for frame in page.frames):
                assert time.monotonic() < deadline, "the Profile tab showed no session"
                page.wait_for_timeout(500)
            page.wait_for_timeout(1000)  # its step-time graph draws after the text
            page.screenshot(path=str(ARTIFACTS / "profile.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "profile.png").read_bytes().startswith(b"\x89PNG")


def test_early_stop_at_the_eval_round_patience_allows_and_resume_keeps_counting(tmp_path):
    proc = run_cli([*PLATEAU, "trainer.steps=200", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["stopped_early_at"]) == (
        "completed", 40, 40)
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [40]
    assert "stopped early at step 40" in proc.stdout.strip().splitlines()[-1]
    assert "best: step 40 eval/loss=" in proc.stdout.strip().splitlines()[-1]
    # An early-stopped run is complete: resuming it changes nothing and exits 0.
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = run_cli([f"resume={tmp_path / 'run'}"], cwd=tmp_path)
    assert again.stdout.strip().splitlines()[-1] == (
        f"{tmp_path / 'run'}: already complete: stopped early at step 40 (trainer.early_stop)")
    assert before == {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    # Interrupted at step 30 (two non-improving evals behind it), the resumed run stops at
    # step 40 too: the count went on from the checkpoint.
    run_cli([*PLATEAU, "trainer.steps=30", "trainer.checkpoint_every=30",
             f"hydra.run.dir={tmp_path / 'split'}"], cwd=tmp_path)
    run_cli([f"resume={tmp_path / 'split'}", "trainer.steps=200"], cwd=tmp_path)
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert (split["steps"], split["stopped_early_at"], split["resumed_from"]) == (40, 40, 30)
    # Off (the default): the same run goes to its last step.
    run_cli([*PLATEAU, "trainer.steps=60", "trainer.early_stop.patience=null",
             f"hydra.run.dir={tmp_path / 'off'}"], cwd=tmp_path)
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert off["steps"] == 60 and off["stopped_early_at"] is None
