"""A run's HPARAMS row: the same labels on every attempt (the options as the user chose them,
their own config dir's too) and numbers, integers included, as numbers. Read back from each
attempt's event file, the real TensorBoard server, and (slow) its UI in headless Chromium:
an integer sweep sorts and plots by value."""

import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, chromium_or_skip, free_port, run_cli
from test_tb_logger import ARTIFACTS, CHROMIUM_ARGS, get_json, hparams_data, load

# The user's own option: named cnn1d, its class runner's MLP (the name a label must not take).
USER_MODEL = "_target_: runner.models.mlp.MLP\nfeatures: [8]\n"
LABELS = {"task": "linear_fit", "model": "cnn1d", "optimizer": "sgd", "device": "cpu"}
SIZES = (2, 10, 4)  # as text they sort 10, 2, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """With a config dir of the user's (``model=cnn1d``): a run, then resumed to 8 steps; and
    a sweep over ``task.batch_size``."""
    root = tmp_path_factory.mktemp("hparams")
    (root / "myconf" / "model").mkdir(parents=True)
    (root / "myconf" / "model" / "cnn1d.yaml").write_text(USER_MODEL)
    config_dir, chosen = ["--config-dir", str(root / "myconf")], ["model=cnn1d", "optimizer=sgd"]
    run_cli([*config_dir, *chosen, *TINY, f"hydra.run.dir={root / 'run'}"], cwd=root)
    run_cli([f"resume={root / 'run'}", "trainer.steps=8"], cwd=root)
    run_cli([*config_dir, "-m", *chosen, *TINY, f"task.batch_size={','.join(map(str, SIZES))}",
             f"hydra.sweep.dir={root / 'sweep'}"], cwd=root)
    return root


def session_start(acc: EventAccumulator) -> Dict:
    """The HParams row an event file holds: {name: protobuf Value}."""
    return dict(hparams_data(acc)["session_start_info"].session_start_info.hparams)


def shown(values: Dict) -> Dict:
    """{name: the Value's bool, number or string}."""
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}


def attempts(run_dir: Path) -> List[Dict]:
    """Each attempt's row, from its own event file (named by the second it was opened in)."""
    rows = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        rows.append(shown(session_start(acc)))
    return rows


def test_a_resumed_run_keeps_the_labels_the_user_chose(runs):
    first, resumed = attempts(runs / "run")
    assert {k: first[k] for k in LABELS} == LABELS
    assert {k: resumed[k] for k in LABELS} == LABELS  # old: LinearFit, MLP (class names)
    assert (first["trainer.steps"], resumed["trainer.steps"]) == (4, 8)
    for job in ("0", "1", "2"):  # a sweep's jobs: the same labels
        assert {k: v for k, v in shown(session_start(load(runs / "sweep" / job))).items()
                if k in LABELS} == LABELS


def test_integers_are_numbers_in_the_event_files(runs):
    for job, size in zip(("0", "1", "2"), SIZES):
        values = session_start(load(runs / "sweep" / job))
        kinds = {k: values[k].WhichOneof("kind") for k in (
            "seed", "task.batch_size", "trainer.steps", "trainer.log_every", "optimizer.lr")}
        assert set(kinds.values()) == {"number_value"}, kinds  # old: seed '0', ...
        assert (values["task.batch_size"].number_value, values["seed"].number_value,
                values["trainer.steps"].number_value) == (size, 0, 4)
    for row in attempts(runs / "run"):
        assert isinstance(row["seed"], float) and isinstance(row["trainer.steps"], float)


@pytest.fixture(scope="module")
def tensorboard_url(runs):
    """The real ``tensorboard --logdir <the sweep>`` on a free loopback port, once it serves
    the three jobs."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                             str(runs / "sweep"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(get_json(f"{url}/data/runs")) == 3:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not serve the jobs in 90 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def column(page, name: str) -> List[str]:
    """The texts the HParams table view shows in column ``name``, top to bottom."""
    cells = page.locator("tf-hparams-table-view vaadin-grid-cell-content").evaluate_all(
        "cells => cells.map(c => { const r = c.getBoundingClientRect();"
        " return [c.innerText.trim(), r.x, r.y, r.width * r.height > 0]; })")
    cells = [c for c in cells if c[3] and c[0]]
    x, y = next((x, y) for text, x, y, _ in cells if text == name)
    return [text for text, _, _ in sorted(
        ((text, cx, cy) for text, cx, cy, _ in cells if abs(cx - x) < 2 and cy > y),
        key=lambda c: c[2])]


def sort_ascending_by(page, name: str) -> List[str]:
    """Sort the table view by ``name`` as a user does (the query pane's Sorting); the
    trial ids the server sent back, in order."""
    page.locator("tf-hparams-query-pane paper-dropdown-menu[label='Sort by']").click()
    page.locator("tf-hparams-query-pane paper-dropdown-menu[label='Sort by'] paper-item",
                 has_text=name).click()
    direction = page.locator("tf-hparams-query-pane paper-dropdown-menu[label='Direction']")
    direction.click()
    with page.expect_response(lambda r: "session_groups" in r.url
                              and "ORDER_ASC" in (r.request.post_data or "")) as sorted_:
        direction.locator("paper-item", has_text="Ascending").click()
    return [g["name"] for g in sorted_.value.json()["sessionGroups"]]


def axis(page, name: str) -> Dict[str, float]:
    """The parallel-coordinates axis of ``name``: {tick label: its height on the plot}."""
    axes = page.locator("tf-hparams-parallel-coords-plot g.axis-parent").evaluate_all(
        "axes => axes.map(a => [a.querySelector('.axis-title').textContent,"
        " [...a.querySelectorAll('g.tick')].map(t => [t.textContent,"
        " -t.getBoundingClientRect().y])])")
    return dict(next(ticks for title, ticks in axes if title == name))


@pytest.mark.slow
def test_an_integer_sweep_sorts_and_plots_by_value_in_chromium(tensorboard_url):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            with page.expect_response(lambda r: r.url.endswith("/hparams/experiment")) as got:
                page.goto(f"{tensorboard_url}/#hparams")
            types = {h["name"]: h["type"] for h in got.value.json()["hparamInfos"]}
            assert {types[k] for k in ("task.batch_size", "seed", "trainer.steps")} == {
                "DATA_TYPE_FLOAT64"}, types  # old: DATA_TYPE_STRING
            page.get_by_text("task.batch_size").first.wait_for(timeout=60_000)
            order = sort_ascending_by(page, "task.batch_size")
            deadline = time.monotonic() + 30
            while column(page, "Trial ID") != order and time.monotonic() < deadline:
                page.wait_for_timeout(200)  # the grid redraws after the server's answer
            assert column(page, "Trial ID") == order
            # What the table shows: by value (old, as text: 10, 2, 4)
            assert [float(v) for v in column(page, "task.batch_size")] == sorted(SIZES)
            page.screenshot(path=str(ARTIFACTS / "hparams_sorted.png"))

            page.get_by_text("PARALLEL COORDINATES VIEW").click()
            page.locator("tf-hparams-parallel-coords-plot g.axis-parent").first.wait_for(
                timeout=60_000)
            # A numeric feature: it has a scale to choose (old: none, a categorical axis)
            assert "task.batch_size" in page.locator(
                "tf-hparams-parallel-coords-view tf-hparams-scale-and-color-controls "
                ".column-title").all_inner_texts()
            ticks = axis(page, "task.batch_size")
            page.screenshot(path=str(ARTIFACTS / "hparams_parallel_coordinates.png"))
        finally:
            browser.close()
    # A linear axis from 2 to 10 (old: three evenly spaced categories "10", "2", "4")
    heights = {float(label): height for label, height in ticks.items()}
    assert min(heights) == 2 and max(heights) == 10 and len(heights) > len(SIZES)
    assert sorted(heights, key=heights.get) == sorted(heights)
    assert (heights[10] - heights[4]) == pytest.approx(3 * (heights[4] - heights[2]), abs=1)
