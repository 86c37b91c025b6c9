"""The hand-written baselines ``runner.bench`` measures runner against, as a user writes them.

``reference_*`` follow ../shared/reference (the project's origin): a jitted ``train_step``
called from a Python ``for`` loop, with flax's ``nn.max_pool`` and plain ``nn.Conv``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState


class ReferenceCNN(nn.Module):
    """The reference's CNN, verbatim."""

    @nn.compact
    def __call__(self, inputs):
        x = nn.relu(nn.Conv(64, kernel_size=(3, 3), kernel_init=nn.initializers.orthogonal(
            jnp.sqrt(2)), bias_init=nn.initializers.constant(0.0))(inputs))
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(128, kernel_size=(3, 3))(x))
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def reference_linear_fit():
    """(step_fn, state, args): the reference's linear fit, TrainState version."""
    np.random.seed(42)
    model = nn.Sequential([nn.Dense(128), nn.Dense(1)])
    state = TrainState.create(apply_fn=model.apply,
                              params=model.init(jax.random.PRNGKey(42), jnp.empty((1,))),
                              tx=optax.adam(learning_rate=1e-3))
    x = np.random.normal(size=(100, 1))
    y = x * 2 + 1 + np.random.normal(scale=0.2, size=(100, 1))

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params, x, y):
            return ((state.apply_fn(params, x) - y) ** 2).mean(-1).sum()
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
        return state.apply_gradients(grads=grads), loss

    return train_step, state, (jnp.asarray(x), jnp.asarray(y))


def classifier_step():
    """The reference's jitted step for a classifier: adam on softmax cross-entropy."""
    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            logits = state.apply_fn(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return train_step


def reference_arrays(x: np.ndarray, y: np.ndarray, batch_size: int):
    """(step_fn, state, args): a hand-written loop over arrays, as the reference's style
    writes it: each step samples its batch on the host (numpy) and calls the jitted step."""
    model = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(int(y.max()) + 1)])
    x = x.reshape(len(x), -1).astype(np.float32)
    state = TrainState.create(apply_fn=model.apply,
                              params=model.init(jax.random.PRNGKey(42), x[:1]),
                              tx=optax.adam(learning_rate=1e-3))
    rng = np.random.default_rng(42)

    train_step = classifier_step()
    def step(state):
        idx = rng.choice(len(x), batch_size, replace=False)
        return train_step(state, x[idx], y[idx])

    return step, state, ()


def reference_cnn(batch_size: int = 32, image_size: int = 84):
    """(step_fn, state, args): the reference CNN trained with adam on one random batch."""
    model = ReferenceCNN()
    key, x_key, y_key = jax.random.split(jax.random.PRNGKey(42), 3)
    x = jax.random.normal(x_key, (batch_size, image_size, image_size, 3))
    y = jax.random.randint(y_key, (batch_size,), 0, 10)
    state = TrainState.create(apply_fn=model.apply, params=model.init(key, x),
                              tx=optax.adam(learning_rate=1e-3))

    train_step = classifier_step()
    return train_step, state, (x, y)


def torch_cnn_step(batch_size: int = 32, image_size: int = 84):
    """A step function for the same CNN in PyTorch (NCHW, adam 1e-3), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    tnn = torch.nn
    side = image_size // 4
    model = tnn.Sequential(
        tnn.Conv2d(3, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(64, 128, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
        tnn.Linear(128 * side * side, 64), tnn.ReLU(), tnn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step, torch.__version__
