"""The figure worker: same images as drawing in-process, errors reported, survives a crash."""

import jax
import numpy as np
import pytest

from runner import figures
from runner.errors import RunnerError
from runner.figures import FigureRenderer
from tasks.linear_fit import LinearFit


@pytest.fixture
def fit():
    task = LinearFit()
    data = jax.device_get(task.make_data(jax.random.PRNGKey(0)))
    return task, data, data["eval"]["y"] * 0.5


def test_the_worker_draws_what_the_run_would_draw_itself(fit):
    task, data, outputs = fit
    images = {}
    for background in (True, False):
        with FigureRenderer(background=background) as renderer:
            assert (renderer._worker is not None) == background
            renderer.set_data(task, data)
            renderer.submit(10, outputs)
            renderer.submit(20, outputs * 2)
            images[background] = renderer.ready(wait=True)
            assert (renderer._worker is not None) == background  # the worker drew them
    assert sorted(images[True]) == [10, 20]
    for step in (10, 20):
        worker, own = images[True][step]["fit"], images[False][step]["fit"]
        pixels = worker.pixels()
        assert pixels.dtype == np.uint8 and pixels.shape == worker.shape and pixels.shape[2] == 3
        assert worker == own  # same PNG bytes and shape
    assert not np.array_equal(images[True][10]["fit"].pixels(), images[True][20]["fit"].pixels())


def test_runs_in_one_process_share_one_worker(fit):
    task, data, outputs = fit
    pids = []
    for _ in range(2):
        with FigureRenderer() as renderer:
            renderer.set_data(task, data)
            renderer.submit(1, outputs)
            assert renderer.ready(wait=True)[1]["fit"].pixels().ndim == 3
            pids.append(renderer._worker.proc.pid)
    assert pids[0] == pids[1]


def test_an_error_in_the_task_figures_names_the_step(fit):
    task, data, _ = fit
    with FigureRenderer() as renderer:
        renderer.set_data(task, data)
        renderer.submit(7, np.zeros(3))  # 3 predictions for 100 points: matplotlib raises
        with pytest.raises(RunnerError, match="figures at step 7 failed"):
            renderer.ready(wait=True)


def test_a_dead_worker_leaves_the_figures_to_the_run(fit):
    task, data, outputs = fit
    with FigureRenderer() as renderer:
        renderer.set_data(task, data)
        renderer._worker.proc.kill()
        renderer._worker.proc.wait()
        renderer.submit(3, outputs)  # sent into a dead pipe, or lost with the worker
        renderer.submit(4, outputs)
        images = renderer.ready(wait=True)
        assert sorted(images) == [3, 4] and renderer._worker is None
        renderer.submit(5, outputs)  # each step drawn once: nothing stale comes back
        assert sorted(renderer.ready(wait=True)) == [5]
    assert not figures._IDLE or figures._IDLE[0].proc.poll() is None
