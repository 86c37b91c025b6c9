"""Tasks: data from the stated law, made deterministically from the PRNG; losses and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner.config.errors import ConfigError
from runner.tasks.cnn_random_images import CNNRandomImages
from runner.tasks.linear_fit import LinearFit


def test_linear_fit_data_follows_the_reference_law():
    task = LinearFit(num_train=20_000, num_eval=100, batch_size=20_000)
    data = task.make_data(jax.random.PRNGKey(0))
    x, y = np.asarray(data["train"]["x"][:, 0]), np.asarray(data["train"]["y"][:, 0])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    assert abs(slope - 2) < 0.01 and abs(intercept - 1) < 0.01
    assert abs(residual.std() - 0.2) < 0.01 and abs(x.std() - 1) < 0.02
    assert data["eval"]["x"].shape == (100, 1)


def test_linear_fit_defaults_are_full_batch_with_a_held_out_set():
    task = LinearFit()
    data = task.make_data(jax.random.PRNGKey(0))
    batch = task.train_batch(data, jax.random.PRNGKey(1))
    assert batch["x"].shape == (100, 1) and batch is data["train"]
    assert not np.allclose(data["train"]["x"], data["eval"]["x"])
    again = task.make_data(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(again["train"]["y"], data["train"]["y"])


def test_linear_fit_minibatches_are_subsets_of_the_training_set():
    task = LinearFit(batch_size=10)
    data = task.make_data(jax.random.PRNGKey(0))
    batch = task.train_batch(data, jax.random.PRNGKey(1))
    assert batch["x"].shape == (10, 1)
    assert set(np.asarray(batch["x"][:, 0])) <= set(np.asarray(data["train"]["x"][:, 0]))
    with pytest.raises(ConfigError, match="task.batch_size=200"):
        LinearFit(batch_size=200)


def test_linear_fit_loss_is_the_per_sample_mse():
    task = LinearFit()
    batch = {"x": jnp.zeros((4, 1)), "y": jnp.array([[1.0], [2.0], [3.0], [4.0]])}
    loss, metrics = task.loss(jnp.zeros((4, 1)), batch)
    assert float(loss) == pytest.approx(7.5) and float(metrics["mse"]) == pytest.approx(7.5)


def test_cnn_images_are_class_prototypes_plus_noise():
    task = CNNRandomImages(image_size=16, batch_size=8, num_eval=64)
    data = task.make_data(jax.random.PRNGKey(0))
    batch = task.train_batch(data, jax.random.PRNGKey(1))
    assert batch["x"].shape == (8, 16, 16, 3) and batch["y"].shape == (8,)
    assert int(batch["y"].min()) >= 0 and int(batch["y"].max()) < 10
    assert abs(float(batch["x"].std()) - 1) < 0.1  # unit variance at any noise level
    # Nearest prototype recovers the label: the task is learnable.
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    scores = flat(data["eval"]["x"]) @ flat(data["prototypes"]).T
    assert float(jnp.mean(jnp.argmax(scores, -1) == data["eval"]["y"])) > 0.9
    stacked = task.eval_batches(data)
    assert stacked["x"].shape == (8, 8, 16, 16, 3) and stacked["y"].shape == (8, 8)


def test_cnn_train_batches_differ_per_rng_and_repeat_per_rng():
    task = CNNRandomImages(image_size=8, batch_size=4, num_eval=4)
    data = task.make_data(jax.random.PRNGKey(0))
    a, b = (task.train_batch(data, jax.random.PRNGKey(i)) for i in (1, 2))
    assert not np.allclose(a["x"], b["x"])
    np.testing.assert_array_equal(a["x"], task.train_batch(data, jax.random.PRNGKey(1))["x"])


def test_cnn_loss_is_cross_entropy_and_accuracy():
    task = CNNRandomImages()
    logits = jnp.array([[10.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 10.0, 0, 0, 0, 0, 0, 0, 0, 0]])
    loss, metrics = task.loss(logits, {"x": None, "y": jnp.array([0, 2])})
    assert float(metrics["accuracy"]) == 0.5
    expected = np.mean([-jax.nn.log_softmax(logits[0])[0], -jax.nn.log_softmax(logits[1])[2]])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_cnn_rejects_inconsistent_sizes():
    with pytest.raises(ConfigError, match="task.num_eval=33"):
        CNNRandomImages(num_eval=33)
    with pytest.raises(ConfigError, match="task.num_classes=1: must be > 1"):
        CNNRandomImages(num_classes=1)
    assert CNNRandomImages(num_classes=4).output_dim == 4


@pytest.mark.parametrize("n, k", [(1437, 128), (60000, 128), (100, 100), (5, 3), (1, 1)])
def test_distinct_indices_are_distinct_in_range_and_follow_the_key(n, k):
    from runner.core.sampling import distinct_indices

    draws = [np.asarray(distinct_indices(jax.random.PRNGKey(s), n, k)) for s in range(20)]
    for idx in draws:
        assert idx.dtype == np.int32 and len(set(idx.tolist())) == k
        assert 0 <= idx.min() and idx.max() < n
    np.testing.assert_array_equal(draws[0], distinct_indices(jax.random.PRNGKey(0), n, k))
    if k < n:
        assert any(not np.array_equal(draws[0], d) for d in draws[1:])


def test_distinct_indices_cover_every_example_evenly():
    from runner.core.sampling import distinct_indices

    draw = jax.jit(lambda key: distinct_indices(key, 1437, 128))
    counts = np.zeros(1437)
    for s in range(1000):
        counts[np.asarray(draw(jax.random.PRNGKey(s)))] += 1
    expected = 1000 * 128 / 1437  # ~89 per example; binomial std ~9
    assert counts.min() > expected - 50 and counts.max() < expected + 50
    assert abs(counts.std() - np.sqrt(expected * (1 - 128 / 1437))) < 2


def test_built_in_tasks_have_the_interface_and_one_data_source(tmp_path):
    """Every built-in task is a ``Task`` with exactly one data source, and only the optional
    hooks it means to have (what runner calls is what these protocols say)."""
    from runner.tasks.arrays import Arrays
    from runner.tasks.base import (ChoosesFeed, DeclaresOutputShape, DeviceData, DrawsFigures,
                                   HostData, HostExamples, PreparesBatch, RecordsInputs, Task,
                                   check_task)

    for task in (LinearFit(), CNNRandomImages()):
        check_task(task)
        assert all(isinstance(task, p) for p in (Task, DeviceData, DrawsFigures))
        assert not any(isinstance(task, p) for p in (HostData, RecordsInputs,
                                                     DeclaresOutputShape))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(8, 2)), y_train=np.arange(8) % 2,
             x_eval=rng.normal(size=(4, 2)), y_eval=np.arange(4) % 2)
    arrays = Arrays(str(tmp_path / "d.npz"), batch_size=4)
    check_task(arrays)
    assert all(isinstance(arrays, p) for p in (Task, HostExamples, PreparesBatch, ChoosesFeed,
                                               RecordsInputs, DrawsFigures))
    assert not any(isinstance(arrays, p) for p in (DeviceData, HostData, DeclaresOutputShape))


def test_a_task_class_lacking_a_hook_is_one_line_naming_it():
    import dataclasses

    from runner.tasks.base import check_task

    @dataclasses.dataclass(frozen=True)
    class NoLoss:
        batch_size: int = 4
        output_dim = 1

        def make_data(self, rng): ...
        def train_batch(self, data, rng): ...
        def eval_batches(self, data): ...
        def example_input(self): ...

    @dataclasses.dataclass(frozen=True)
    class Complete(NoLoss):
        def loss(self, outputs, batch): ...

    @dataclasses.dataclass(frozen=True)
    class BothData(Complete):
        def load_data(self): ...

    with pytest.raises(ConfigError, match=r"^task \(.*NoLoss\): lacks loss \(see "
                                          r"runner\.tasks\.base\.Task\)$"):
        check_task(NoLoss())
    check_task(Complete())  # make_data: one data hook
    with pytest.raises(ConfigError, match=r"needs exactly one data source: .* it has DeviceData "
                                          r"and HostData \(see runner.tasks.base\)$"):
        check_task(BothData())

    @dataclasses.dataclass(frozen=True)
    class Reader:  # examples read on the host: no train_batch
        batch_size: int = 4
        output_dim = 1
        train_examples = 10

        def load_data(self): ...
        def read_examples(self, indices): ...
        def eval_batches(self, data): ...
        def loss(self, outputs, batch): ...
        def example_input(self): ...

    check_task(Reader())
    with pytest.raises(ConfigError, match=r"^task.batch_size=11: task \(.*Reader\) has 10 "
                                          r"training examples \(train_examples\); a batch is 1 "
                                          r"to that many distinct ones$"):
        check_task(Reader(batch_size=11))  # each step's examples are distinct

    @dataclasses.dataclass(frozen=True)
    class ReaderAndBatches(Reader):
        def train_batch(self, data, rng): ...

    with pytest.raises(ConfigError, match=r"it has HostData and HostExamples"):
        check_task(ReaderAndBatches())
