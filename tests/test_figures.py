"""The figure thread: the images drawing in-process gives, in step order; errors named."""

import threading

import jax
import numpy as np
import pytest

from runner.config.errors import RunnerError
from runner.io.renderer import FigureRenderer, draw
from runner.tasks.linear_fit import LinearFit


@pytest.fixture
def fit():
    task = LinearFit()
    data = jax.device_get(task.make_data(jax.random.PRNGKey(0)))
    return task, data, data["eval"]["y"] * 0.5


def test_the_thread_draws_what_drawing_in_process_gives(fit):
    task, data, outputs = fit
    with FigureRenderer() as renderer:
        renderer.set_data(task, data)
        renderer.submit(10, outputs)
        renderer.submit(20, outputs * 2)
        images = renderer.ready(wait=True)
        assert renderer.ready(wait=True) == {}  # each step comes back once
    assert list(images) == [10, 20]
    for step, scale in ((10, 1), (20, 2)):
        pixels = images[step]["fit"]
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        np.testing.assert_array_equal(pixels, draw(task, data, outputs * scale)["fit"])
    assert not np.array_equal(images[10]["fit"], images[20]["fit"])
    assert not [t for t in threading.enumerate() if t.name.startswith("figures")]


def test_an_error_in_the_task_figures_names_the_step(fit):
    task, data, _ = fit
    with FigureRenderer() as renderer:
        renderer.set_data(task, data)
        renderer.submit(7, np.zeros(3))  # 3 predictions for 100 points: matplotlib raises
        with pytest.raises(RunnerError, match="figures at step 7 failed"):
            renderer.ready(wait=True)
