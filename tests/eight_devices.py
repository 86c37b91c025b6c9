"""Run by test_scaleout.py in a process with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): prints one JSON object of results.

For each task: the train/loss curve, final eval loss and final state on 1 and on 8 devices;
a checkpoint saved on 8 devices resumed on 1 (and the reverse) against an uninterrupted
1-device run, with the step it resumed from; the error for a batch the device count does not
divide.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import serialization
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runner.config.errors import RunnerError
from runner.run.train import run

TINY = ["trainer.steps=8", "trainer.log_every=2", "trainer.eval_every=4",
        "trainer.checkpoint_every=4", "trainer.progress_bar=false", "trainer.log_images=false"]
TASKS = {
    "linear_fit": ["task.num_train=128", "task.batch_size=64"],  # minibatches: data order too
    "cnn_random_images": ["task=cnn_random_images", "task.image_size=16", "task.batch_size=16",
                          "task.num_eval=32", "model.dense_features=[16]",
                          "model.conv_features=[8,8]"],
}


def config(*overrides):
    with initialize_config_module(config_module="runner.conf", version_base=None):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def curve(run_dir: Path):
    return [e.value for e in EventAccumulator(str(run_dir / "tb")).Reload().Scalars("train/loss")]


def leaves(path: Path):
    return [np.asarray(x, np.float64) for x in
            jax.tree.leaves(serialization.msgpack_restore(path.read_bytes()))]


def max_rel(a, b):
    """The largest relative difference, elementwise (curves) or per array (checkpoints)."""
    return max(float(np.linalg.norm(np.ravel(x) - np.ravel(y)) /
                     max(np.linalg.norm(np.ravel(y)), 1e-12)) for x, y in zip(a, b))


def compiled_step_facts():
    """What XLA made of the 8-device step: an all-reduce (of the gradients), and per-device
    batch shapes (64 samples / 8 devices = 8 rows each)."""
    from runner.core.sharding import make_mesh
    from runner.core.steps import setup, train_steps
    from runner.run.build import build_parts

    cfg = config(*TASKS["linear_fit"], "device.num_devices=8")
    mesh = make_mesh(cfg.device, jax.devices())
    task, model, optimizer = parts = build_parts(cfg)
    state, data, _, rng = setup(0, *parts, mesh=mesh)
    hlo = train_steps.lower(state, data, rng, task=task,
                            steps_per_dispatch=2,
                            mesh=mesh).compile().as_text()
    return {"all_reduce": "all-reduce" in hlo, "per_device_batch": "f32[8,1]" in hlo,
            "whole_batch": "f32[64,1]" in hlo}


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {"devices": jax.device_count()}
    tmp = Path(tempfile.mkdtemp())
    for name, task in TASKS.items():
        result = {}
        for n in (1, 8):
            result[f"eval_loss_{n}"] = run(config(*task, f"device.num_devices={n}"),
                                           tmp / f"{name}{n}")["eval"]["loss"]
            result[f"curve_{n}"] = curve(tmp / f"{name}{n}")
            result[f"devices_{n}"] = json.loads(
                (tmp / f"{name}{n}" / "metrics.json").read_text())["devices"]["num_devices"]
        result["state_max_rel"] = max_rel(leaves(tmp / f"{name}8" / "checkpoints/step_8.msgpack"),
                                          leaves(tmp / f"{name}1" / "checkpoints/step_8.msgpack"))
        # Half the steps on one device count, the rest resumed on the other.
        for first, then in ((8, 1), (1, 8)):
            half, key = tmp / f"{name}{first}to{then}", f"resumed_{first}_to_{then}"
            run(config(*task, f"device.num_devices={first}", "trainer.steps=4"), half)
            resumed = run(config(*task, f"device.num_devices={then}"), half, resume=True)
            result[f"{key}_from"] = resumed["resumed_from"]
            result[f"{key}_devices"] = resumed["devices"]["num_devices"]
            result[f"{key}_curve_len"] = len(curve(half))
            result[f"{key}_max_rel"] = max_rel(
                leaves(half / "checkpoints" / "step_8.msgpack"),
                leaves(tmp / f"{name}1" / "checkpoints" / "step_8.msgpack"))
        result["curve_max_rel"] = max(abs(x - y) / abs(y) for x, y in
                                      zip(result["curve_8"], result["curve_1"]))
        out[name] = result
    out["compiled_step"] = compiled_step_facts()
    try:
        run(config("device.num_devices=8"), tmp / "indivisible")  # batch 100 on 8 devices
    except RunnerError as err:
        out["indivisible_error"] = str(err)
    shutil.rmtree(tmp)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
