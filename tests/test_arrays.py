"""task=arrays: real data (scikit-learn's digits and diabetes) from .npz files and .npy dirs,
every bad input one line, masked eval, the recorded file, bit-exact resume."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import TINY, compose_config, run_cli, start
from runner.config.errors import ConfigError, RunnerError
from runner.core.sharding import check_fits
from runner.io.checkpoint import load_checkpoint
from runner.run.build import build_parts
from runner.run.train import run
from runner.tasks.arrays_io import read
from test_resume import newest_step, wait_past
from test_resume import start as start_cli

DIGITS_MLP = ["model.activation=relu", "trainer.steps=400", "trainer.eval_every=200",
              "trainer.checkpoint_every=200", "trainer.progress_bar=false"]


def split(x, y, seed=0):
    """The fixed 80/20 split the tests and README use."""
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return {"x_train": x[order[:cut]], "y_train": y[order[:cut]],
            "x_eval": x[order[cut:]], "y_eval": y[order[cut:]]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sklearn.datasets import load_diabetes, load_digits

    root = tmp_path_factory.mktemp("data")
    digits = load_digits()
    np.savez(root / "digits.npz", **split(digits.images.astype(np.float32), digits.target))
    np.savez(root / "diabetes.npz", **split(*load_diabetes(return_X_y=True)))
    return root


def arrays(path, *overrides):
    return compose_config(["task=arrays", f"task.path={path}", *overrides])


def write(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    base = {"x_train": rng.normal(size=(20, 3)).astype(np.float32),
            "y_train": rng.integers(0, 3, 20), "x_eval": rng.normal(size=(10, 3)),
            "y_eval": rng.integers(0, 3, 10)}
    base.update(changes)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


@pytest.mark.parametrize("changes, overrides, message", [
    ({}, ["task.path=nope.npz"], r"task.path=nope.npz: no such file or directory \(/"),
    ({"y_eval": None}, [], r"no array y_eval; found: x_train, y_train, x_eval \(needs"),
    ({"y_train": np.zeros(9, int)}, [], "x_train has 20 examples but y_train has 9"),
    ({"y_train": np.full(20, 0.5)}, ["task.kind=classification"],
     "y_train holds the label 0.5 at index 0, not a whole number"),
    ({"y_eval": np.full(10, -1)}, [], "y_eval holds the label -1 at index 0; labels are"),
    ({}, ["task.num_classes=2"], "holds the label 2 at index .*, not below task.num_classes=2"),
    ({"x_train": np.where(np.eye(20, 3) > 0, np.nan, 1.0)}, [],
     r"x_train holds nan at index \(0, 0\)"),
    ({"y_eval": np.array([1.0] * 9 + [np.inf])}, ["task.kind=regression"],
     "y_eval holds inf at index 9"),
    ({}, ["task.batch_size=50"], "task.batch_size=50: more than the 20 training examples"),
    ({"x_eval": np.zeros((10, 4))}, [], r"x_eval's examples have shape \(4,\), x_train's \(3,\)"),
    ({}, ["task.kind=cluster"], "task.kind=cluster: use classification or regression"),
])
def test_bad_input_is_one_line_naming_the_key_and_array(tmp_path, changes, overrides, message):
    path = write(tmp_path / "d.npz", **changes)
    with pytest.raises(ConfigError, match=message) as info:
        task = build_parts(arrays(path, "task.batch_size=10", *overrides)).task
        task.inputs({})  # the one pass over the inputs a run makes as it starts
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # nothing written


def test_unreadable_files_and_a_missing_path_are_one_line(tmp_path):
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for name in ("text.npz", "one.npy"):
        with pytest.raises(ConfigError, match=f"task.path={tmp_path / name}: not an .npz file"):
            build_parts(arrays(tmp_path / name))
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "x_train.npy", np.zeros(3))
    with pytest.raises(ConfigError, match="no y_train.npy in the directory; found: x_train.npy"):
        build_parts(arrays(tmp_path / "dir"))
    with pytest.raises(ConfigError, match="task.path: required by runner.tasks.arrays.Arrays"):
        build_parts(compose_config(["task=arrays"]))


def test_an_image_shape_the_cnn_cannot_pool_names_the_layer(tmp_path):
    path = write(tmp_path / "d.npz", x_train=np.ones((20, 3, 3)), x_eval=np.ones((10, 3, 3)))
    with pytest.raises(ConfigError, match=r"model=cnn: conv layer 1 gives 1x1 images, smaller "
                                          r"than model.pool_size=2"):
        start(["task=arrays", f"task.path={path}", "model=cnn_small", "task.batch_size=10"])


def test_kinds_shapes_and_standardized_data(data_dir):
    digits = build_parts(arrays(data_dir / "digits.npz")).task
    assert (digits.info.kind, digits.output_dim, digits.info.x_shape) == (
        "classification", 10, (8, 8, 1))  # [N, H, W]: one channel
    data = digits.load_data()
    train = digits.device_batch(data, digits.read_examples(np.arange(digits.train_examples)))
    assert abs(float(train["x"].mean())) < 1e-5 and train["y"].dtype == np.int32
    assert data["eval"]["x"].shape[0] % 128 == 0 and data["eval"]["mask"].sum() == 360
    diabetes = build_parts(arrays(data_dir / "diabetes.npz")).task
    assert (diabetes.info.kind, diabetes.output_dim) == ("regression", 1)
    train = diabetes.device_batch(diabetes.load_data(), diabetes.read_examples(
        np.arange(diabetes.train_examples)))
    assert abs(float(train["y"].std()) - 1) < 1e-4  # scaled targets
    assert build_parts(arrays(data_dir / "diabetes.npz", "model=mlp")).model.out_features == 1


def test_a_dir_of_npy_files_is_memory_mapped(tmp_path, data_dir):
    (tmp_path / "digits").mkdir()
    with np.load(data_dir / "digits.npz") as npz:
        for key in npz.files:
            np.save(tmp_path / "digits" / f"{key}.npy", npz[key])
    assert all(isinstance(a, np.memmap) for a in read(tmp_path / "digits", "d").values())
    summary = run(arrays(tmp_path / "digits", *DIGITS_MLP), tmp_path / "run")
    assert summary["eval"]["accuracy"] >= 0.95


def test_masked_eval_counts_exactly_the_eval_examples(tmp_path, data_dir):
    """10 eval examples in batches of 4: 4 + 4 + 2 real ones, the padding masked out."""
    rng = np.random.default_rng(1)
    path = write(tmp_path / "d.npz", x_eval=rng.normal(size=(10, 3)),
                 y_eval=rng.integers(0, 3, 10))
    cfg = arrays(path, "task.batch_size=4")
    summary = run(cfg, tmp_path / "run")
    (task, model, _), (template, data, *_) = start(["task=arrays", f"task.path={path}",
                                                    "task.batch_size=4"])
    state = load_checkpoint(tmp_path / "run/checkpoints/step_4.msgpack", template)
    # the inputs as the model sees them: standardized by the training set's statistics
    x = (np.asarray(data["eval"]["x"][:10], np.float32) - np.asarray(data["stats"]["x_mean"])) \
        / np.asarray(data["stats"]["x_std"])
    outputs = model.apply({"params": state.params}, x)
    accuracy = float(np.mean(np.argmax(outputs, -1) == np.asarray(data["eval"]["y"][:10])))
    assert summary["eval"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert round(summary["eval"]["accuracy"] * 10, 4) == round(accuracy * 10)


def test_arrays_larger_than_the_device_memory_are_refused(monkeypatch):
    class Device:
        device_kind = "fake GPU"
        process_index = 0

        def memory_stats(self):
            return {"bytes_limit": 2**20, "bytes_in_use": 0}

    host = {"train": {"x": np.zeros((1024, 512), np.float32)}}
    with pytest.raises(RunnerError, match=r"the task's arrays take 2 MiB \(\['train'\]\['x'\] "
                                          r"2 MiB\) but fake GPU has 1 MiB free"):
        check_fits(host, [Device()])
    check_fits({"x": np.zeros(10)}, [Device()])  # fits
    check_fits(host, jax.devices("cpu"))  # a CPU reports no limit: no check


@pytest.mark.slow
def test_digits_and_diabetes_from_the_cli(data_dir, tmp_path):
    from sklearn.linear_model import Ridge

    run_cli(["task=arrays", f"task.path={data_dir / 'digits.npz'}", *DIGITS_MLP,
             "hydra.run.dir=mlp"], cwd=tmp_path)
    mlp = json.loads((tmp_path / "mlp/metrics.json").read_text())
    assert mlp["eval"]["accuracy"] >= 0.95
    run_cli(["task=arrays", f"task.path={data_dir / 'digits.npz'}", "model=cnn_small",
             *DIGITS_MLP[1:], "hydra.run.dir=cnn"], cwd=tmp_path)
    cnn = json.loads((tmp_path / "cnn/metrics.json").read_text())
    assert cnn["eval"]["accuracy"] >= 0.97
    run_cli(["task=arrays", f"task.path={data_dir / 'diabetes.npz'}", "model.activation=relu",
             "model.features=[32]", "trainer.progress_bar=false", "hydra.run.dir=reg"],
            cwd=tmp_path)
    reg = json.loads((tmp_path / "reg/metrics.json").read_text())["eval"]
    with np.load(data_dir / "diabetes.npz") as d:
        mean_mse = float(np.mean((d["y_eval"] - d["y_train"].mean()) ** 2))
        ridge = Ridge(alpha=1.0).fit(d["x_train"], d["y_train"]).predict(d["x_eval"])
        ridge_mse = float(np.mean((ridge - d["y_eval"]) ** 2))
    # in the targets' own units (~5,000 for the mean predictor), clearly below the mean's
    assert 1000 < reg["mse"] < 0.75 * mean_mse and reg["mae"] > 10
    assert reg["mse"] < 1.25 * ridge_mse


@pytest.mark.slow
def test_a_copied_run_dir_evaluates_and_a_changed_file_is_refused(data_dir, tmp_path):
    shutil.copy(data_dir / "digits.npz", tmp_path / "digits.npz")
    run_cli(["task=arrays", "task.path=digits.npz", *TINY, "hydra.run.dir=out/run"],
            cwd=tmp_path)  # a path relative to where the command starts
    recorded = json.loads((tmp_path / "out/run/inputs.json").read_text())
    assert recorded["path"] == str(tmp_path / "digits.npz") and len(recorded["sha256"]) == 64
    elsewhere = tmp_path / "elsewhere"  # no digits.npz here: the recorded path is used
    shutil.copytree(tmp_path / "out/run", elsewhere / "copy")
    evaluated = evaluate(elsewhere, "copy")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "out/run/metrics.json").read_text())["eval"]
    assert json.loads(evaluated.stdout)["eval"] == pytest.approx(metrics, rel=1e-6)
    with np.load(tmp_path / "digits.npz") as npz:
        changed = {k: npz[k] for k in npz.files}
    changed["y_eval"][0] = (changed["y_eval"][0] + 1) % 10
    np.savez(tmp_path / "digits.npz", **changed)
    refused = f"error: {tmp_path / 'digits.npz'}: changed since the run started (sha256: now "
    resumed = run_cli(["resume=out/run", "trainer.steps=8"], cwd=tmp_path, check=False)
    evaluated = evaluate(elsewhere, "copy")
    for proc in (resumed, evaluated):
        assert proc.returncode == 1 and proc.stderr.startswith(refused), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "out/run/metrics.json").read_text())["steps"] == 4


def evaluate(cwd: Path, run_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.eval", run_dir], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_a_sigkilled_arrays_run_resumes_bit_exact(data_dir, tmp_path):
    long = ["task=arrays", f"task.path={data_dir / 'digits.npz'}", "task.batch_size=32",
            "trainer.steps=24000", "trainer.log_every=2000", "trainer.eval_every=12000",
            "trainer.checkpoint_every=2000", "trainer.progress_bar=false"]
    run_cli([*long, "hydra.run.dir=reference"], cwd=tmp_path)
    proc = start_cli([*long, "hydra.run.dir=run"], tmp_path)
    wait_past(proc, tmp_path / "run", 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = newest_step(tmp_path / "run")
    assert 0 < killed < 24000
    run_cli(["resume=run"], cwd=tmp_path)
    final = "checkpoints/step_24000.msgpack"
    assert (tmp_path / "run" / final).read_bytes() == (tmp_path / "reference" / final
                                                        ).read_bytes()


def test_setup_checks_the_arrays_fit_before_placing_them(tmp_path, monkeypatch):
    import runner.core.steps

    def refuse(host, devices):
        raise RunnerError(f"checked {sorted(host)} on {len(devices)} device(s)")

    monkeypatch.setattr(runner.core.steps, "check_fits", refuse)
    path = write(tmp_path / "d.npz")
    with pytest.raises(RunnerError, match=r"checked \['eval', 'stats', 'train_examples'\] on 1 "):
        start(["task=arrays", f"task.path={path}", "task.batch_size=10"])


def test_a_run_overwriting_a_used_dir_records_its_own_file(tmp_path):
    for seed in (0, 1):
        path = write(tmp_path / f"d{seed}.npz", x_train=np.full((20, 3), seed, np.float32))
        run(arrays(path, "task.batch_size=10", "overwrite=true"), tmp_path / "run")
        assert json.loads((tmp_path / "run/inputs.json").read_text())["path"] == str(path)
