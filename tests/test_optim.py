"""Optimizers: every option builds, hyperparameters are traced state, schedules, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compose_config, group_options
from runner.config.errors import ConfigError
from runner.config.schema import Schedule
from runner.core.optim import make_optimizer
from runner.core.schedules import LRSchedule


@pytest.mark.parametrize("name", group_options("optimizer"))
def test_every_optimizer_builds_and_steps_with_lr_in_its_state(name):
    cfg = compose_config([f"optimizer={name}", "optimizer.lr=0.05"])
    opt = make_optimizer(cfg.optimizer, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.05)
    updates, _ = opt.tx.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_lr_is_traced_state_not_a_compiled_constant():
    cfg = compose_config(["optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=0.1"])
    opt = make_optimizer(cfg.optimizer, total_steps=10)
    update = jax.jit(opt.tx.update)
    params = grads = {"w": jnp.ones(2)}
    state = opt.init(params)
    first, _ = update(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    second, _ = update(grads, state, params)
    np.testing.assert_allclose(first["w"], -0.1)
    np.testing.assert_allclose(second["w"], -0.5)
    assert update._cache_size() == 1


def test_schedules_scale_the_peak_lr():
    steps = jnp.arange(11)
    np.testing.assert_allclose(LRSchedule(Schedule.constant, 10)(steps), 1.0)
    cosine = LRSchedule(Schedule.cosine, 10)(steps)
    assert float(cosine[0]) == 1.0 and float(cosine[-1]) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(cosine) <= 0)
    warm = LRSchedule(Schedule.warmup_cosine, 10, warmup_steps=4)(steps)
    assert float(warm[0]) == 0.0 and float(warm[4]) == pytest.approx(1.0)
    assert float(warm[2]) == pytest.approx(0.5) and float(warm[-1]) == pytest.approx(0, abs=1e-6)


def test_warmup_cosine_needs_warmup_steps():
    cfg = compose_config(["optimizer.schedule=warmup_cosine", "optimizer.warmup_steps=0"])
    with pytest.raises(ConfigError, match="optimizer.warmup_steps=0"):
        make_optimizer(cfg.optimizer, total_steps=10)


def test_clip_norm_bounds_the_update():
    cfg = compose_config(["optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=1",
                          "optimizer.clip_norm=0.5"])
    opt = make_optimizer(cfg.optimizer, total_steps=10)
    params = {"w": jnp.zeros(4)}
    updates, _ = opt.tx.update({"w": jnp.full(4, 10.0)}, opt.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)


def test_optimizer_specific_keys_reach_optax():
    cfg = compose_config(["optimizer=adamw", "optimizer.weight_decay=0.25", "optimizer.b1=0.5"])
    state = make_optimizer(cfg.optimizer, total_steps=10).init({"w": jnp.ones(2)})
    assert float(state.hyperparams["weight_decay"]) == 0.25
    assert float(state.hyperparams["b1"]) == 0.5


def test_optimizers_of_one_structure_share_the_transformation_not_the_values():
    cfg = lambda *o: compose_config(["optimizer=sgd", *o]).optimizer  # noqa: E731
    a = make_optimizer(cfg("optimizer.lr=0.1"), total_steps=10)
    b = make_optimizer(cfg("optimizer.lr=0.2", "optimizer.momentum=0.5"), total_steps=10)
    params = {"w": jnp.ones(2)}
    assert a.tx == b.tx and hash(a.tx) == hash(b.tx)  # the jit cache key of the train step
    assert float(b.init(params).hyperparams["learning_rate"]) == pytest.approx(0.2)
    assert float(b.init(params).hyperparams["momentum"]) == pytest.approx(0.5)
    for other in (cfg("optimizer.nesterov=true"), cfg("optimizer.momentum=null"),
                  cfg("optimizer.schedule=cosine"), cfg("optimizer.clip_norm=1.0")):
        assert make_optimizer(other, total_steps=10).tx != a.tx
    assert make_optimizer(cfg(), total_steps=20).tx == make_optimizer(
        cfg(), total_steps=20).tx


# Each option as written by hand with optax itself (its own defaults for every other key), the
# independent side of the comparison below; a new option needs its line here.
OPTAX_BY_HAND = {
    "adam": lambda: optax.adam(0.05),
    "adamw": lambda: optax.adamw(0.05),
    "rmsprop": lambda: optax.rmsprop(0.05, initial_scale=0.5),
    "sgd": lambda: optax.sgd(0.05, momentum=0.9),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                                 optax.add_decayed_weights(1e-4),
                                 optax.scale_by_learning_rate(0.05)),
}


@pytest.mark.parametrize("name", group_options("optimizer"))
def test_a_run_starts_from_optax_own_initial_state(name):
    """The run's set-up call (shared by runs of one structure) starts the optimizer state from
    this run's values, where a factory's init reads one (rmsprop's initial_scale): its first
    two updates from that state are those of the optax optimizer written by hand."""
    from conftest import start

    overrides = [f"optimizer={name}", "optimizer.lr=0.05"]
    if name == "rmsprop":
        overrides.append("optimizer.initial_scale=0.5")  # every optax key is in the schema
    (_, _, optimizer), (state, *_) = start(overrides)
    assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.05)
    reference = OPTAX_BY_HAND[name]()
    ref_state, params = reference.init(state.params), state.params
    run_state = state.opt_state
    for seed in (1, 2):  # two steps: the second reads the state the first left
        keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params))))
        grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
        got, run_state = optimizer.tx.update(grads, run_state, params)
        want, ref_state = reference.update(grads, ref_state, params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        params = optax.apply_updates(params, want)
    if name == "rmsprop":
        assert float(state.opt_state.inner_state[0].nu["Dense_0"]["kernel"][0, 0]) == 0.5
