"""Models: exact parameter counts, the reference architecture, and the fast pool and conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import compose_config
from runner.bench.cases import ReferenceCNN  # the reference's CNN, verbatim
from runner.config.errors import ConfigError
from runner.models.cnn import CNN
from runner.models.conv import conv_general_dilated
from runner.models.mlp import MLP
from runner.models.pooling import max_pool
from runner.run.build import build_parts


def param_count(model, x):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_mlp_default_has_the_reference_385_parameters():
    assert param_count(MLP(out_features=1), jnp.zeros((1, 1))) == 385
    reference = nn.Sequential([nn.Dense(128), nn.Dense(1)])
    assert param_count(reference, jnp.zeros((1, 1))) == 385


def additivity_gap(model, x: jax.Array) -> float:
    """max |f(a+b) - f(a) - f(b) + f(0)| over pairs of ``x``'s rows: 0 for an affine map."""
    params = model.init(jax.random.PRNGKey(0), x[:1])
    f = lambda v: model.apply(params, v)  # noqa: E731
    a, b = x, jnp.roll(x, 1, axis=0) * -2.0
    return float(jnp.max(jnp.abs(f(a + b) - f(a) - f(b) + f(jnp.zeros_like(a)))))


def test_model_mlp_is_nonlinear_by_default():
    """``model=mlp``, with a task that takes the group's default (arrays) or picked over a
    task's own (cnn_random_images), has an activation: it is no linear map."""
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    assert additivity_gap(MLP(out_features=2), x) > 1e-2
    for overrides in (["task=cnn_random_images", "model=mlp"], ["model=mlp"]):
        model = build_parts(compose_config(overrides)).model
        assert model.activation == "relu" and additivity_gap(model, x) > 1e-2


def test_linear_fit_trains_the_reference_linear_model():
    """The default run's model (task=linear_fit's own, model=linear) is the reference's
    Dense(128) -> Dense(1), no activation: the same parameters give the same outputs."""
    cfg = compose_config()
    model = build_parts(cfg).model
    assert cfg.model.activation is None and list(cfg.model.features) == [128]
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 1))
    assert additivity_gap(model, x) < 1e-5
    reference = nn.Sequential([nn.Dense(128), nn.Dense(1)])
    ref_params = reference.init(jax.random.PRNGKey(42), x[:1])
    ours = model.init(jax.random.PRNGKey(42), x[:1])
    assert jax.tree.map(jnp.shape, jax.tree.leaves(ours)) == \
        jax.tree.map(jnp.shape, jax.tree.leaves(ref_params))
    same = jax.tree.unflatten(jax.tree.structure(ours), jax.tree.leaves(ref_params))
    np.testing.assert_array_equal(model.apply(same, x), reference.apply(ref_params, x))
    reference_experiment = build_parts(compose_config(["experiment=linear_fit_reference"]))
    assert reference_experiment.model == model


def test_mlp_without_activation_is_affine_and_with_one_is_not():
    x = jnp.linspace(-2, 2, 9)[:, None]
    for activation, affine in ((None, True), ("relu", False)):
        model = MLP(features=(16,), out_features=1, activation=activation)
        params = model.init(jax.random.PRNGKey(0), x)
        y = model.apply(params, x)[:, 0]
        second_diff = y[2:] - 2 * y[1:-1] + y[:-2]
        assert bool(jnp.allclose(second_diff, 0, atol=1e-5)) is affine


def test_cnn_default_has_3_689_034_parameters_like_the_reference():
    x = jnp.zeros((1, 84, 84, 3))
    assert param_count(CNN(out_features=10), x) == 3_689_034
    assert param_count(ReferenceCNN(), x) == 3_689_034


def test_cnn_matches_reference_outputs_and_gradients():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    params = ReferenceCNN().init(jax.random.PRNGKey(0), x)
    ours = jax.tree.map(jnp.shape, CNN(out_features=10).init(jax.random.PRNGKey(0), x))
    assert ours == jax.tree.map(jnp.shape, params)  # same names and shapes

    def loss(model):
        return lambda p: jnp.sum(jnp.sin(model.apply(p, x)))

    ours = CNN(out_features=10).apply(params, x)
    np.testing.assert_allclose(ours, ReferenceCNN().apply(params, x),
                               rtol=1e-5, atol=1e-5)
    ref_grads = jax.grad(loss(ReferenceCNN()))(params)
    our_grads = jax.grad(loss(CNN(out_features=10)))(params)
    for ref, our in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(our_grads)):
        np.testing.assert_allclose(our, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 12, 3), (2, 9, 7, 3)])  # divisible; fallback
def test_max_pool_equals_nn_max_pool_forward_and_gradient(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
    ours = lambda x: max_pool(x, (2, 2))  # noqa: E731
    np.testing.assert_array_equal(ours(x), ref(x))
    g = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(x)  # noqa: E731
    np.testing.assert_array_equal(grad(ours), grad(ref))


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1)), ((-1, 0), (0, -1))])
def test_conv_gradients_equal_lax(padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 12, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(
            x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))))

    np.testing.assert_allclose(
        loss(conv_general_dilated)(x, w), loss(lax.conv_general_dilated)(x, w), rtol=1e-6)
    ours = jax.grad(loss(conv_general_dilated), (0, 1))(x, w)
    ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_keeps_scan_gradients_in_the_fast_layout():
    """Inside lax.scan, every convolution of the gradient stays NHWC x HWIO -> NHWC."""
    x = jnp.ones((2, 8, 8, 3))
    w = jnp.ones((3, 3, 3, 4))

    def scanned(conv):
        def body(w, _):
            grad = jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=(
                "NHWC", "HWIO", "NHWC")) ** 2))(w)
            return w - 1e-3 * grad, None
        return jax.jit(lambda w: lax.scan(body, w, length=2)[0])

    def conv_layouts(conv):
        hlo = scanned(conv).lower(w).compile().as_text()
        return {line.split("dim_labels=")[1].split(",")[0]
                for line in hlo.splitlines() if "convolution(" in line and "dim_labels" in line}

    assert conv_layouts(conv_general_dilated) == {"b01f_01io->b01f"}
    assert conv_layouts(lax.conv_general_dilated) != {"b01f_01io->b01f"}  # XLA's slow case


def test_conv_takes_lax_gradients_on_accelerators(monkeypatch):
    """The custom gradient is a CPU workaround: on a GPU the convolution is lax's (cuDNN's)."""
    import runner.models.conv

    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def grad_jaxpr():  # a new function each time: JAX caches traces per function
        return str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))(w))

    assert "dot_general" in grad_jaxpr()  # the patch matmul
    monkeypatch.setattr(runner.models.conv.jax, "default_backend", lambda: "gpu")
    jaxpr = grad_jaxpr()
    assert "dot_general" not in jaxpr and "conv_general_dilated" in jaxpr


def test_conv_falls_back_to_lax_for_strides():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
    args = ((2, 2), "SAME")
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(conv_general_dilated(x, w, *args, **kw),
                                  lax.conv_general_dilated(x, w, *args, **kw))


def test_cnn_rejects_non_image_inputs_and_mismatched_kernel_sizes():
    with pytest.raises(ConfigError, match="model=cnn needs images"):
        CNN(out_features=10).init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    with pytest.raises(ConfigError, match="kernel_sizes"):
        CNN(kernel_sizes=(3,)).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_unknown_activation_names_the_key():
    with pytest.raises(ConfigError, match="model.activation=nope"):
        MLP(activation="nope").init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
