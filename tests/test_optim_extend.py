"""Optimizers as researchers write them: any optax schedule by ``_target_`` (a user's too),
gradient accumulation, a weight-decay mask by parameter path, a chain of transforms in YAML;
their numbers in the optimizer state (one compiled step for a sweep over them)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compose_config, run_cli, start_process
from runner.config.errors import ConfigError
from runner.core.optim import make_optimizer
from runner.core.schedules import VALUES

PARAMS = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
          "LayerNorm_0": {"scale": jnp.ones(3)}}


def optimizer(*overrides, steps=20):
    return make_optimizer(compose_config(list(overrides)).optimizer, total_steps=steps)


def sgd(*overrides, steps=20):
    return optimizer("optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=0.5",
                     *overrides, steps=steps)


def halving(every: int = 4, floor: float = 0.25):
    """A user's own schedule factory: the multiplier halves every ``every`` steps, to ``floor``
    (Python control flow on its numbers, as optax's own factories have)."""
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    return lambda step: jnp.maximum(0.5 ** (step // every), floor)


def lrs_and_updates(opt, steps):
    """``tx.learning_rate`` at ``steps``, and the updates of a unit gradient at steps 0..3."""
    state = opt.init(PARAMS)
    lrs = [float(opt.tx.learning_rate(state, jnp.asarray(step))) for step in steps]
    grads, updates = jax.tree.map(jnp.ones_like, PARAMS), []
    for _ in range(4):
        update, state = opt.tx.update(grads, state, PARAMS)
        updates.append(float(update["Dense_0"]["bias"][0]))
    return np.array(lrs), np.array(updates)


@pytest.mark.parametrize("overrides, reference", [
    (["optimizer/schedule=exponential_decay", "optimizer.schedule.decay_rate=0.5"],
     optax.exponential_decay(1.0, 200, 0.5)),
    (["optimizer/schedule=warmup_exponential"],
     optax.join_schedules([optax.linear_schedule(0.0, 1.0, 10),
                           optax.exponential_decay(1.0, 200, 0.1)], [10])),
    (["optimizer/schedule=piecewise_constant", "optimizer.schedule.init_value=2"],
     optax.piecewise_constant_schedule(2.0, {100: 0.1, 150: 0.1})),
    (["optimizer/schedule=warmup_constant", "optimizer.schedule.warmup_steps=6"],
     optax.warmup_constant_schedule(0.0, 1.0, 6)),
    (["optimizer.schedule={_target_: test_optim_extend.halving, every: 3}"],
     halving(every=3)),
])
def test_a_target_schedule_scales_optimizer_lr_as_optax_would(overrides, reference):
    """trainer.steps=200 (${trainer.steps} in the YAMLs); sgd's update is -lr x schedule."""
    opt = sgd(*overrides, "trainer.steps=200", steps=200)
    steps = [*range(0, 200, 3), 199, 200, 201, 500]  # past trainer.steps: the last value
    want = 0.5 * np.array([float(reference(min(s, 200))) for s in steps], np.float32)
    lrs, updates = lrs_and_updates(opt, steps)
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    np.testing.assert_allclose(updates, [-0.5 * float(reference(s)) for s in range(4)],
                               rtol=1e-6)


def test_a_sweep_over_schedule_numbers_compiles_one_step():
    """Values of one schedule, and other schedules altogether, are state: equal
    transformations (the jit key), one compilation, each run its own lr."""
    opts = [sgd("optimizer/schedule=exponential_decay", f"optimizer.schedule.decay_rate={r}",
                "trainer.steps=20") for r in (0.1, 0.5)]
    opts.append(sgd("optimizer/schedule=warmup_exponential",
                    "optimizer.schedule.schedules.0.transition_steps=4", "trainer.steps=20"))
    assert opts[0].tx == opts[1].tx == opts[2].tx and len({hash(o.tx) for o in opts}) == 1
    update = jax.jit(lambda grads, state: opts[0].tx.update(grads, state, PARAMS))
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for opt, reference in zip(opts, (optax.exponential_decay(1.0, 20, 0.1),
                                     optax.exponential_decay(1.0, 20, 0.5))):
        state = opt.init(PARAMS)
        for _ in range(3):
            got, state = update(grads, state)
        np.testing.assert_allclose(got["Dense_0"]["bias"], -0.5 * reference(2), rtol=1e-6)
    assert update._cache_size() == 1
    assert opts[0].init(PARAMS).hyperparams[VALUES].shape == (21,)  # steps 0..20, in the state
    assert sgd("optimizer/schedule=exponential_decay", steps=30).tx != opts[0].tx  # its length


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    """adam with accumulate_steps=2 on two halves of a batch (a mean loss: the mean of their
    gradients is the whole batch's) gives the params of one step on the whole batch; train/lr
    of a micro-step is the schedule at the micro-step its update's accumulation began. The
    schedule counts micro-steps (trainer.steps): 40 of them span what 20 whole steps do."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def grad(params, idx):
        return jax.grad(lambda p: jnp.mean((x[idx] @ p["w"] - y[idx]) ** 2))(params)

    overrides = ["optimizer=adam", "optimizer.lr=0.1", "optimizer.schedule=cosine"]
    whole = optimizer(*overrides, steps=20)
    micro = optimizer(*overrides, "optimizer.accumulate_steps=2", steps=40)
    p_whole = p_micro = {"w": jnp.zeros(3)}
    s_whole, s_micro = whole.init(p_whole), micro.init(p_micro)
    for step in range(3):
        update, s_whole = whole.tx.update(grad(p_whole, slice(0, 8)), s_whole, p_whole)
        p_whole = optax.apply_updates(p_whole, update)
        for half in (slice(0, 4), slice(4, 8)):
            update, s_micro = micro.tx.update(grad(p_micro, half), s_micro, p_micro)
            p_micro = optax.apply_updates(p_micro, update)
        np.testing.assert_allclose(p_micro["w"], p_whole["w"], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(p_whole["w"]).min()) > 0
    cosine = optax.cosine_decay_schedule(0.1, 40)
    got = [float(micro.tx.learning_rate(s_micro, jnp.asarray(s))) for s in (4, 5, 6)]
    np.testing.assert_allclose(got, [cosine(4), cosine(4), cosine(6)], rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    ["optimizer=adamw", "optimizer.weight_decay=0.5"],
    ["optimizer=chain", "optimizer.transforms.2.weight_decay=0.5"],
])
def test_decay_exclude_spares_matching_parameters(overrides):
    """Zero gradients: only weight decay moves the params, by -lr x wd x param."""
    opt = optimizer(*overrides, "optimizer.lr=0.1", "optimizer.decay_exclude=[bias,LayerNorm*]")
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = opt.tx.update(zeros, opt.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.05, rtol=1e-6)
    assert not np.any(updates["Dense_0"]["bias"]) and not np.any(updates["LayerNorm_0"]["scale"])
    plain = optimizer(*overrides, "optimizer.lr=0.1")  # without it, every parameter decays
    updates, _ = plain.tx.update(zeros, plain.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["Dense_0"]["bias"], -0.05, rtol=1e-6)


def test_a_chain_from_yaml_keeps_every_number_in_its_state():
    a = optimizer("optimizer=chain", "optimizer.transforms.1.b1=0.8")
    b = optimizer("optimizer=chain", "optimizer.transforms.2.weight_decay=0.3", "optimizer.lr=1")
    assert a.tx == b.tx
    state = b.init(PARAMS)
    hyperparams = [s.hyperparams for s in state.inner_state[:3]]  # the chain's transforms
    assert float(hyperparams[2]["weight_decay"]) == pytest.approx(0.3)
    assert float(hyperparams[1]["b1"]) == pytest.approx(0.9)
    assert float(a.init(PARAMS).inner_state[1].hyperparams["b1"]) == pytest.approx(0.8)
    assert optimizer("optimizer=chain", "+optimizer.transforms.1.nesterov=true").tx != a.tx


@pytest.mark.parametrize("overrides, message", [
    (["optimizer/schedule=exponential_decay", "optimizer.schedule._target_=optax.nope"],
     "optimizer.schedule._target_=optax.nope: cannot import it"),
    (["optimizer/schedule=exponential_decay", "+optimizer.schedule.decay=2"],
     "optimizer.schedule.decay: unknown key; optax.exponential_decay takes: decay_rate"),
    (["optimizer/schedule=warmup_exponential", "+optimizer.schedule.schedules.1.rate=2"],
     "optimizer.schedule.schedules.1 (optax.exponential_decay): "),
    (["optimizer.schedule={_target_: test_optim_extend.halving, every: 0}"],
     "optimizer.schedule (test_optim_extend.halving): every must be positive, got 0"),
    (["optimizer.schedule=cosin"], "optimizer.schedule=cosin: not a schedule"),
    (["optimizer=chain", "optimizer.transforms.0._target_=mypkg.clip"],
     "optimizer.transforms.0._target_=mypkg.clip: cannot import it"),
    (["optimizer=chain", "+optimizer.transforms.1.beta=2"],
     "optimizer.transforms.1.beta: unknown key; optax.scale_by_adam takes: b1"),
    (["optimizer=adam", "optimizer.decay_exclude=[bias]"],
     "optimizer.decay_exclude: optax.adam takes no mask"),
    (["optimizer.accumulate_steps=0"], "optimizer.accumulate_steps=0: must be > 0"),
])
def test_a_bad_schedule_or_transform_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        optimizer(*overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


SCHEDULE = '''
import optax


def warmup_then_halving(warmup: int = 4, every: int = 8):
    """The user's own: a linear warmup, then halving every ``every`` steps."""
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup),
                                 lambda step: 0.5 ** (step // every)], [warmup])
'''


@pytest.mark.slow
def test_a_users_schedule_trains_fuses_and_resumes_after_sigkill_to_the_same_bits(tmp_path,
                                                                                 monkeypatch):
    """One .py and one YAML in the user's project (optimizer/schedule=mine): a fused sweep over
    its warmup length is one group; a run SIGKILLed mid-way and resumed ends byte-identical
    to an uninterrupted one, with optax's lr in its metrics; a target that does not import is
    one line, exit 1, nothing written."""
    (tmp_path / "mysched.py").write_text(SCHEDULE)
    (tmp_path / "myconf" / "optimizer" / "schedule").mkdir(parents=True)
    (tmp_path / "myconf" / "optimizer" / "schedule" / "mine.yaml").write_text(
        "_target_: mysched.warmup_then_halving\nwarmup: 4\nevery: 20000\n")
    common = ["--config-dir", "myconf", "optimizer/schedule=mine", "task.batch_size=10",
              "trainer.progress_bar=false", "trainer.log_every=10"]

    proc = run_cli(["-m", "hydra/launcher=fused", *common, "optimizer.schedule.warmup=2,6",
                    "optimizer.schedule.every=8",
                    "trainer.steps=20", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert "into one group (2 members" in proc.stdout + proc.stderr
    lrs = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["train"]["lr"]
           for i in (0, 1)]
    assert lrs == pytest.approx([1e-3 * 0.5 ** (17 // 8), 1e-3 * 0.5 ** (13 // 8)], rel=1e-6)

    steps, every = 600000, 20000  # checkpoints every 20,000 steps; killed after the first
    long = [*common, f"trainer.steps={steps}", f"trainer.checkpoint_every={every}",
            f"trainer.log_every={every}", f"trainer.eval_every={every}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    run_dir = tmp_path / "run"
    proc = start_process([sys.executable, "-m", "runner", *long, f"hydra.run.dir={run_dir}"],
                         cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / f"step_{every}.msgpack").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    end = 3 * every
    monkeypatch.setenv("RUNNER_TRUST", "mysched")  # a resume imports only trusted targets
    run_cli([f"resume={run_dir}", f"trainer.steps={end}"], cwd=tmp_path)
    run_cli([*long, f"trainer.steps={end}", f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path)
    name = f"checkpoints/step_{end}.msgpack"
    assert (run_dir / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] >= every
    assert metrics["train"]["lr"] == pytest.approx(1e-3 * 0.25, rel=1e-6)

    bad = run_cli([*common, "optimizer.schedule._target_=mysched.nope", "hydra.run.dir=bad"],
                  cwd=tmp_path, check=False)
    assert bad.returncode == 1 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines() == [
        "error: optimizer.schedule._target_=mysched.nope: cannot import it (module 'mysched' "
        "has no attribute 'nope')"]
