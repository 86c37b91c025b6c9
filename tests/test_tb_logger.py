"""TensorBoard: scalars, images, text, histograms and HParams, read back by TensorBoard itself
(EventAccumulator, the real server's HTTP API, and the real UI in headless Chromium)."""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import (REPO, TINY, TINY_CNN, chromium_or_skip, compose_config, free_port,
                      run_cli)
from runner.config.errors import RunnerError
from runner.io.tb_logger import TensorBoardLogger
from runner.run.train import run

ARTIFACTS = REPO / "test-artifacts"  # screenshots of the browser test, kept after the run


def load(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={
        "images": 0, "tensors": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def hparams_data(acc: EventAccumulator):
    """The HParams plugin's records in this run's event file, decoded with its protos."""
    decoded = {}
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData()
        data.ParseFromString(content)
        decoded[tag.split("/")[-1]] = data
    return decoded


def test_a_run_writes_scalars_images_text_and_its_own_hparams(tmp_path):
    run(compose_config(["trainer.eval_every=2"]), tmp_path, overrides=["optimizer.lr=0.001"])
    acc = load(tmp_path)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/mse", "eval/loss", "eval/mse",
            "perf/steps_per_sec", "perf/compile_s"} <= set(tags["scalars"])
    assert tags["images"] == ["eval/fit"]
    assert [e.step for e in acc.Images("eval/fit")] == [2, 4]
    assert acc.Images("eval/fit")[0].encoded_image_string.startswith(b"\x89PNG")
    assert {"config/text_summary", "model_summary/text_summary"} <= set(tags["tensors"])
    text = acc.Tensors("model_summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "Total Parameters: 385" in text
    assert not tags["histograms"]  # off by default
    assert not [t for t in tags["scalars"] if t.startswith("opt/")]  # layer norms: off too

    hp = hparams_data(acc)
    # No experiment summary: TensorBoard makes the columns from every run's session start
    # info and scalars (tests/test_tensorboard_truth.py).
    assert set(hp) == {"session_start_info", "session_end_info"}
    start = hp["session_start_info"].session_start_info.hparams
    assert {"task", "model", "optimizer", "optimizer.lr", "seed", "trainer.steps",
            "device"} <= set(start)
    assert start["optimizer.lr"].number_value == pytest.approx(1e-3)
    assert (start["seed"].number_value, start["trainer.steps"].number_value) == (0, 4)
    assert start["trainer.steps"].WhichOneof("kind") == "number_value"  # old: the text "4"
    assert start["task"].string_value == "LinearFit"  # composed without Hydra's choices
    assert hp["session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []  # no sub-run


def test_hparams_keep_each_values_kind(tmp_path):
    """Integers and floats are numbers (sorted by value, numeric axes), booleans booleans."""
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.hparams({"seed": 10, "optimizer.lr": 0.5, "task": "linear_fit",
                    "model.use_bias": False}, status="completed")
    logger.close()
    start = hparams_data(load(tmp_path))["session_start_info"].session_start_info.hparams
    assert {k: (v.WhichOneof("kind"), getattr(v, v.WhichOneof("kind")))
            for k, v in start.items()} == {
        "seed": ("number_value", 10), "optimizer.lr": ("number_value", 0.5),
        "task": ("string_value", "linear_fit"), "model.use_bias": ("bool_value", False)}


def test_cnn_logs_sample_grid_and_confusion_matrix(tmp_path):
    run(compose_config([*TINY_CNN, "task.num_eval=16"]), tmp_path)
    assert set(load(tmp_path).Tags()["images"]) == {"eval/samples", "eval/confusion_matrix"}


def test_histograms_and_layer_gradient_norms_when_asked(tmp_path):
    run(compose_config(["trainer.log_histograms=true"]), tmp_path)
    tags = load(tmp_path).Tags()
    assert {"params/Dense_0/kernel", "params/Dense_1/bias"} <= set(tags["histograms"])
    assert {"opt/grad_norm/Dense_0", "opt/grad_norm/Dense_1"} <= set(tags["scalars"])


def test_a_failed_run_has_an_hparams_row_without_session_end(tmp_path):
    with pytest.raises(RunnerError):
        run(compose_config(["optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=1e6"]),
            tmp_path)
    assert set(hparams_data(load(tmp_path))) == {"session_start_info"}


def test_no_images_and_no_matplotlib_when_images_are_off(tmp_path):
    code = ("import sys; from conftest import compose_config; from runner.run.train import run; "
            f"run(compose_config(['trainer.log_images=false']), __import__('pathlib').Path("
            f"{str(tmp_path)!r})); print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert load(tmp_path).Tags()["images"] == []


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A 2-job lr sweep through the real CLI."""
    root = tmp_path_factory.mktemp("tb_sweep")
    run_cli(["-m", "optimizer.lr=1e-3,1e-2", *TINY, f"hydra.sweep.dir={root}/sweep"], cwd=root)
    return root / "sweep"


def test_sweep_jobs_each_carry_their_swept_values(sweep_dir):
    lrs = []
    for job in ("0", "1"):
        hp = hparams_data(load(sweep_dir / job))
        start = hp["session_start_info"].session_start_info.hparams
        assert start["task"].string_value == "linear_fit"  # Hydra's choice name
        lrs.append(start["optimizer.lr"].number_value)
    assert lrs == pytest.approx([1e-3, 1e-2])


@pytest.fixture(scope="module")
def tensorboard_url(sweep_dir):
    """The real ``tensorboard --logdir <sweep_dir>`` on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                             str(sweep_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if len(get_json(f"{url}/data/runs")) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("tensorboard did not serve the two runs within 90 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get_json(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_tensorboard_server_lists_both_runs_and_their_hparams(tensorboard_url, sweep_dir):
    tags = get_json(f"{tensorboard_url}/data/plugin/scalars/tags")
    assert set(tags) == {"0/tb", "1/tb"}
    for run_tags in tags.values():
        assert {"train/loss", "train/lr", "eval/loss", "perf/steps_per_sec"} <= set(run_tags)
    experiment = get_json(f"{tensorboard_url}/data/plugin/hparams/experiment",
                          {"experimentName": ""})
    assert "optimizer.lr" in {h["name"] for h in experiment["hparamInfos"]}
    groups = get_json(f"{tensorboard_url}/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"hparam": "optimizer.lr"}, {"metric": {"tag": "eval/loss"}}],
        "aggregationType": "AGGREGATION_AVG"})
    rows = {g["name"]: g for g in groups["sessionGroups"]}
    assert set(rows) == {"0/tb", "1/tb"}  # one row per job
    assert rows["0/tb"]["hparams"]["optimizer.lr"] == pytest.approx(1e-3)
    assert rows["1/tb"]["hparams"]["optimizer.lr"] == pytest.approx(1e-2)
    for name, row in rows.items():
        loss = {m["name"]["tag"]: m["value"] for m in row["metricValues"]}["eval/loss"]
        final = json.loads((sweep_dir / name.split("/")[0] / "metrics.json").read_text())
        assert loss == pytest.approx(final["eval"]["loss"])


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.mark.slow
def test_tensorboard_ui_renders_both_runs_in_chromium(tensorboard_url, tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            page.goto(f"{tensorboard_url}/#hparams")
            page.get_by_text("optimizer.lr").first.wait_for(timeout=60_000)
            runs = page.locator("text=/^[01]\\/tb$/ >> visible=true")
            runs.first.wait_for(timeout=60_000)
            assert runs.count() == 2  # the HPARAMS table: one row per job
            page.screenshot(path=str(ARTIFACTS / "hparams.png"))

            page = context.new_page()
            page.goto(f"{tensorboard_url}/#scalars")
            page.locator("text=eval/loss >> visible=true").first.wait_for(timeout=60_000)
            page.locator("text=perf/steps_per_sec >> visible=true").first.wait_for(
                timeout=60_000)
            assert page.locator("text=/^[01]\\/tb$/ >> visible=true").count() == 2
            page.screenshot(path=str(ARTIFACTS / "scalars.png"))
        finally:
            browser.close()
    for name in ("hparams.png", "scalars.png"):
        assert (ARTIFACTS / name).read_bytes().startswith(b"\x89PNG")


def test_a_pruned_runs_hparams_row_says_it_was_pruned(tmp_path):
    """A run its search's pruner stops at its first eval (a real Optuna trial whose bound every
    loss crosses): its session ends FAILURE, not SUCCESS, and its columns say ``pruned`` and
    the step, so the HPARAMS tab filters it apart from completed runs."""
    optuna = pytest.importorskip("optuna")
    from runner.run.search import SPACE_ATTR, TrialLink, open_storage

    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(storage=open_storage(journal), study_name="s")
    study.set_user_attr(SPACE_ATTR, {"objectives": ["eval/loss"]})
    study.ask()
    link = TrialLink(journal, "s", 0, {"_target_": "optuna.pruners.ThresholdPruner",
                                       "upper": -1.0})
    run(compose_config(["trainer.eval_every=2"]), tmp_path / "run", on_eval=link.on_eval)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["pruned_at"] == 2
    hp = hparams_data(load(tmp_path / "run"))
    assert hp["session_end_info"].session_end_info.status == 2  # old: 1, STATUS_SUCCESS
    start = hp["session_start_info"].session_start_info.hparams
    assert (start["status"].string_value, start["pruned_at"].number_value) == ("pruned", 2)


def test_a_completed_runs_hparams_row_says_completed(tmp_path):
    run(compose_config(), tmp_path)
    hp = hparams_data(load(tmp_path))
    assert hp["session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    start = hp["session_start_info"].session_start_info.hparams
    assert start["status"].string_value == "completed" and "pruned_at" not in start
