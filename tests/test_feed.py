"""Training examples read on the host (``task.feed=host``, ``runner.loop.feed``): the same bits
as the device-resident feed, exact resume, a training set larger than the device, the user's
own reader (docs/data.md's example), and every bad input one line with the run dir intact."""

import dataclasses
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import runner.loop.feed
from conftest import REPO, compose_config, free_port, run_cli, start_process
from runner.config.errors import RunnerError
from runner.run.build import Parts, build_parts
from runner.run.train import run
from runner.tasks import arrays_io
from runner.tasks.arrays import Arrays
from test_resume import newest_step, wait_past
from test_run_dirs import one_error_line

SHORT = ["model.activation=relu", "trainer.steps=600", "trainer.log_every=100",
         "trainer.eval_every=300", "trainer.checkpoint_every=100", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits as a directory of .npy files (uint8 pixels, int64 labels)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("feed") / "digits"
    root.mkdir()
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = data.images.astype(np.uint8)[order], data.target[order]
    for name, a in (("x_train", x[:1437]), ("y_train", y[:1437]), ("x_eval", x[1437:]),
                    ("y_eval", y[1437:])):
        np.save(root / f"{name}.npy", a)
    return root


def digits_copy(digits: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "digits"
    copy.mkdir()
    for f in digits.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def checkpoints(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("*.msgpack"))}


def start_cli(args, cwd: Path) -> subprocess.Popen:
    """``python -m runner <args>`` in the background (killed when the test ends, if still
    running)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return start_process([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rewrite_in_place(npy: Path) -> None:
    """Other values over the data bytes of a uint8 ``.npy`` file, written in place: the same
    size (never shorter, even while it is written), a new modification time."""
    data = np.load(npy)
    assert data.dtype == np.uint8
    with open(npy, "r+b") as f:
        f.seek(npy.stat().st_size - data.nbytes)
        f.write((255 - data).tobytes())


def test_host_and_device_feeds_train_the_same_bits(digits, tmp_path):
    """The same examples in the same order, whatever the dispatch length or thread count."""
    common = ["task=arrays", f"task.path={digits}", *SHORT]
    run_cli([*common, "task.feed=device", "hydra.run.dir=device"], cwd=tmp_path)
    run_cli([*common, "task.feed=host", "trainer.steps_per_dispatch=50", "task.read_threads=3",
             "hydra.run.dir=host"], cwd=tmp_path)
    device, host = checkpoints(tmp_path / "device"), checkpoints(tmp_path / "host")
    assert "step_600.msgpack" in device and device == host
    assert "examples read on the host" in (tmp_path / "host" / "runner.log").read_text()
    assert "examples read on the host" not in (tmp_path / "device" / "runner.log").read_text()
    recorded = json.loads((tmp_path / "host" / "inputs.json").read_text())
    assert recorded["sha256"] == arrays_io.sha256(digits)
    assert recorded["bytes"] == [(digits / f"{k}.npy").stat().st_size for k in arrays_io.KEYS]


def test_auto_reads_a_training_set_larger_than_the_device_from_the_host(digits, tmp_path,
                                                                       monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    cfg = compose_config(["task=arrays", f"task.path={digits}", *SHORT])
    reference = run(cfg, tmp_path / "roomy")  # the CPU: the host's memory is ample
    assert "is kept on the device" in caplog.text
    assert "examples read on the host" not in caplog.text
    caplog.clear()
    training_set = 1437 * 64  # bytes: 1,437 uint8 8x8 images (+ labels)
    monkeypatch.setattr(runner.loop.feed, "free_bytes", lambda device: training_set)
    summary = run(cfg, tmp_path / "small")
    assert "is read from the host a dispatch ahead" in caplog.text
    assert "examples read on the host" in caplog.text
    assert summary["eval"] == reference["eval"]
    assert checkpoints(tmp_path / "small") == checkpoints(tmp_path / "roomy")


@pytest.mark.slow
def test_a_host_fed_run_killed_anywhere_resumes_to_the_same_bits(digits, tmp_path):
    """SIGKILL mid-run, resumed with another dispatch length and thread count: the final
    checkpoint equals an uninterrupted device-fed run's."""
    # Dispatches of 2,000 steps, a checkpoint after each: killed once the first is written,
    # the run is before its last (step 12,000) with 4 dispatches to spare.
    long = ["task=arrays", f"task.path={digits}", "task.batch_size=32", "trainer.steps=12000",
            "trainer.log_every=2000", "trainer.eval_every=6000",
            "trainer.checkpoint_every=2000", "trainer.progress_bar=false"]
    run_cli([*long, "task.feed=device", "hydra.run.dir=reference"], cwd=tmp_path)
    proc = start_cli([*long, "task.feed=host", "hydra.run.dir=run"], tmp_path)
    wait_past(proc, tmp_path / "run", 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < newest_step(tmp_path / "run") < 12000
    run_cli(["resume=run", "trainer.steps_per_dispatch=1000", "task.read_threads=1"],
            cwd=tmp_path)
    final = "checkpoints/step_12000.msgpack"
    assert (tmp_path / "run" / final).read_bytes() == (tmp_path / "reference" / final
                                                        ).read_bytes()


def test_a_process_scans_the_files_of_one_stamp_once(digits, tmp_path, monkeypatch):
    import runner.tasks.arrays as arrays_task

    path = digits_copy(digits, tmp_path)
    first = Arrays(str(path)).inputs({})
    assert first["sha256"] == arrays_io.sha256(path)
    scanned, scan = [], arrays_task.scan
    monkeypatch.setattr(arrays_task, "scan", lambda *a: scanned.append(a[1]) or scan(*a))
    assert Arrays(str(path)).inputs({}) == first and scanned == []  # this process's scan
    os.utime(path / "x_train.npy", ns=(1, 1))  # touched: read and hashed again
    touched = Arrays(str(path)).inputs(first)
    assert scanned == [path] and touched == {**first, "mtime_ns": [1, *first["mtime_ns"][1:]]}
    # ...once per process: a sweep's next job takes this process's scan
    assert Arrays(str(path)).inputs(first) == touched and scanned == [path]


def test_a_resume_rehashes_a_file_only_when_its_stamp_differs_from_the_record(digits,
                                                                             tmp_path):
    """Each resume a fresh process (no scan of its own to fall back on). Which hash it took
    shows in bytes changed under the recorded size and time: the record's, so the resume goes
    on; once the file is touched, the file's, so the resume is refused naming the hash."""
    path = digits_copy(digits, tmp_path)
    run_cli(["task=arrays", f"task.path={path}", "trainer.steps=20", "trainer.log_every=10",
             "trainer.eval_every=20", "trainer.checkpoint_every=10",
             "trainer.progress_bar=false", "hydra.run.dir=run"], cwd=tmp_path)
    recorded = json.loads((tmp_path / "run" / "inputs.json").read_text())
    x = path / "x_eval.npy"
    stat = x.stat()
    rewrite_in_place(x)
    os.utime(x, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its size and time as recorded
    run_cli(["resume=run", "trainer.steps=40"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 40
    os.utime(x, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed again
    line = one_error_line(run_cli(["resume=run", "trainer.steps=60"], cwd=tmp_path,
                                  check=False))
    rehashed = arrays_io.sha256(path)
    assert rehashed != recorded["sha256"]
    assert f"(sha256: now {rehashed[:12]}…, recorded {recorded['sha256'][:12]}…;" in line, line


def test_rows_are_read_in_any_order_and_an_io_error_names_the_file(tmp_path, monkeypatch):
    from runner.tasks.arrays_rows import Rows

    a = np.arange(1000 * 3, dtype=np.int16).reshape(1000, 3)
    np.save(tmp_path / "a.npy", a)
    stat = (tmp_path / "a.npy").stat()
    rows = Rows(tmp_path / "a.npy", 4, (stat.st_size, stat.st_mtime_ns))
    indices = np.array([999, 3, 4, 5, 3, 0, 512, 6])  # runs, repeats, both ends
    np.testing.assert_array_equal(rows.read(indices), a[indices])
    crowded = np.random.default_rng(0).integers(0, 50, 400)  # repeats: read once, gathered
    np.testing.assert_array_equal(rows.read(crowded), a[crowded])
    np.testing.assert_array_equal(rows.read(np.arange(1000)), a)  # one read

    def unreadable(fd, buffers, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", unreadable)
    with pytest.raises(RunnerError, match=rf"^{tmp_path / 'a.npy'}: cannot read rows from \d+ "
                                          rf"\(\[Errno 5\] Input/output error\)$"):
        rows.read(indices)
    with pytest.raises(RunnerError, match="changed during the run"):
        Rows(tmp_path / "a.npy", 1, (stat.st_size + 1, stat.st_mtime_ns))


def long_host_run(path: Path, tmp_path: Path):
    return start_cli(["task=arrays", f"task.path={path}", "task.feed=host", "task.batch_size=32",
                      "trainer.steps=1000000000", "trainer.log_every=500",
                      "trainer.checkpoint_every=500", "trainer.eval_every=100000",
                      "trainer.steps_per_dispatch=500", "trainer.progress_bar=false",
                      "hydra.run.dir=run"], tmp_path)


def stderr_once_refused(proc: subprocess.Popen, run_dir: Path, changed_at: int) -> str:
    """The stderr of ``long_host_run`` once it has ended, as it must at its next read after a
    change to its file (at step ``changed_at`` or later); a run that trains on well past that
    (blocks read before the change included) never refused the changed file."""
    ahead = 4 * 500  # dispatches read before the change, and the checkpoint seen late
    deadline = time.monotonic() + 300  # the wait's own bound: a run that neither ends nor trains
    while True:
        try:
            return proc.communicate(timeout=0.5)[1]
        except subprocess.TimeoutExpired:  # still running: how far?
            pass
        step = newest_step(run_dir)
        assert step <= changed_at + ahead, (f"the run trained on to step {step} (changed at "
                                            f"step {changed_at}): it never refused the file")
        assert time.monotonic() < deadline, f"the run neither ended nor trained past {step}"


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_file_changed_during_a_run_ends_it_in_one_line(digits, tmp_path, change):
    path = digits_copy(digits, tmp_path)
    proc = long_host_run(path, tmp_path)
    wait_past(proc, tmp_path / "run", 0)
    before = checkpoints(tmp_path / "run")
    x = path / "x_train.npy"
    if change == "truncate":
        os.truncate(x, x.stat().st_size // 2)
    else:  # the same size, other values
        rewrite_in_place(x)
    stderr = stderr_once_refused(proc, tmp_path / "run", newest_step(tmp_path / "run"))
    assert proc.returncode == 1
    line = stderr.strip().splitlines()[-1]
    assert re.match(rf"error: reading the training examples of steps \d+\.\.\d+: "
                    rf"{re.escape(str(x))}: (changed during the run|rows from \d+ cut short)",
                    line), stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and str(x) in metrics["reason"]
    after = checkpoints(tmp_path / "run")
    assert all(after[name] == data for name, data in before.items())


@dataclasses.dataclass(frozen=True)
class Faulty:
    """``task=arrays`` whose reader misbehaves from its ``after``-th dispatch block on."""

    base: Arrays
    fault: str
    after: int = 2

    def __post_init__(self):
        object.__setattr__(self, "blocks", [])

    def __getattr__(self, name):  # every other hook: the arrays task's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    feed = property(lambda self: "host")

    def read_examples(self, indices):
        examples = self.base.read_examples(indices)
        if len(indices) > 1:
            self.blocks.append(len(indices))
        if len(self.blocks) <= self.after:
            return examples
        if self.fault == "raise":
            raise ValueError("cannot decode example 7")
        if self.fault == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.fault == "shape":
            return {**examples, "x": examples["x"][:, :4]}
        return {**examples, "x": examples["x"].astype(np.float64)}  # dtype


@pytest.mark.parametrize("fault, message", [
    ("raise", "ValueError: cannot decode example 7|cannot decode example 7"),
    ("eio", r"Input/output error"),
    ("shape", r"returned x of shape \(3200, 4, 8\) uint8, expected 3200 x \(8, 8\) uint8"),
    ("dtype", r"returned x of shape \(3200, 8, 8\) float64, expected 3200 x \(8, 8\) uint8"),
])
def test_a_reader_that_fails_ends_the_run_in_one_line(digits, tmp_path, fault, message):
    cfg = compose_config(["task=arrays", f"task.path={digits}", "task.batch_size=32",
                          "trainer.steps=1000", "trainer.steps_per_dispatch=100",
                          "trainer.checkpoint_every=100", "trainer.log_every=100",
                          "trainer.eval_every=1000", "trainer.progress_bar=false"])
    parts = build_parts(cfg)
    faulty = Faulty(parts.task, fault)
    with pytest.raises(RunnerError, match=message) as info:
        run(cfg, tmp_path / "run", parts=Parts(faulty, parts.model, parts.optimizer))
    assert str(info.value).startswith("reading the training examples of steps 201..300: ")
    assert "\n" not in str(info.value)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["reason"] == str(info.value)
    assert sorted(checkpoints(tmp_path / "run")) == ["step_100.msgpack", "step_200.msgpack"]


@pytest.mark.slow
def test_two_processes_each_read_their_rows_and_match_the_device_feed(digits, tmp_path):
    """jax.distributed over 2 local CPU processes: each reads only its half of every batch;
    the result is the device-resident feed's, bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS")}
    common = ["task=arrays", f"task.path={digits}", *SHORT, "device=cpu",
              "device.distributed=true", "device.num_processes=2"]
    for feed in ("device", "host"):
        port = free_port()
        procs = [start_process(
            [sys.executable, "-m", "runner", *common, f"task.feed={feed}",
             f"hydra.run.dir={feed}", f"device.coordinator_address=127.0.0.1:{port}",
             f"device.process_id={i}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-3000:]
        if feed == "host":
            for i, (out, err) in enumerate(outputs):
                assert f"reads rows {64 * i}..{64 * (i + 1)} of each batch of 128" in out + err
    assert checkpoints(tmp_path / "host") == checkpoints(tmp_path / "device")
    assert json.loads((tmp_path / "host" / "metrics.json").read_text())["devices"][
        "processes"] == 2


FLAKY = """
import dataclasses, os

from runner.tasks.arrays import Arrays

BLOCKS = []


@dataclasses.dataclass(frozen=True)
class FailsOnOneProcess(Arrays):
    def read_examples(self, indices):
        if len(indices) > 1:
            BLOCKS.append(len(indices))
        if os.environ.get("FAIL_READS") and len(BLOCKS) > 3:
            raise OSError(5, "Input/output error")
        return super().read_examples(indices)
"""


@pytest.mark.slow
def test_a_read_failing_on_one_of_two_processes_stops_both_in_one_line(digits, tmp_path):
    """Each process reads its own rows: when one cannot, it trains that dispatch on zeros with
    the other (which would otherwise wait in the step's collectives until JAX's heartbeats
    abort it) and both stop together, in one line each."""
    (tmp_path / "flaky").mkdir()
    (tmp_path / "flaky" / "__init__.py").write_text(FLAKY)
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "flaky.yaml").write_text(
        "_target_: flaky.FailsOnOneProcess\npath: ???\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(tmp_path)
    port = free_port()
    procs = [start_process(
        [sys.executable, "-m", "runner", "--config-dir", "myconf", "task=flaky",
         f"task.path={digits}", "task.feed=host", "task.batch_size=32",
         "trainer.steps=1000000", "trainer.log_every=500", "trainer.checkpoint_every=500",
         "trainer.eval_every=1000000", "trainer.steps_per_dispatch=500",
         "trainer.progress_bar=false", "device=cpu", "device.distributed=true",
         "device.num_processes=2", f"device.process_id={i}",
         f"device.coordinator_address=127.0.0.1:{port}", "hydra.run.dir=run"],
        cwd=tmp_path, env={**env, **({"FAIL_READS": "1"} if i == 1 else {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errors
    for err in errors:
        assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    assert errors[1].strip().splitlines()[-1].startswith(
        "error: reading the training examples of steps "), errors[1][-2000:]
    assert "process 1 of this run failed" in errors[0].strip().splitlines()[-1], errors[0][-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["steps"] < 1000000


def test_a_fused_sweep_reads_each_block_once_for_its_members_of_one_seed(digits, tmp_path):
    """Fused (on the CPU: in turn on one compiled step) equals the basic launcher's runs, bit
    for bit, and the members of one seed share one reading thread."""
    args = ["task=arrays", f"task.path={digits}", "task.feed=host", "optimizer.lr=1e-3,1e-2",
            "trainer.steps=200", "trainer.log_every=100", "trainer.eval_every=200",
            "trainer.checkpoint_every=100", "trainer.progress_bar=false"]
    fused = run_cli(["-m", "hydra/launcher=fused", *args, "hydra.sweep.dir=fused"],
                    cwd=tmp_path)
    run_cli(["-m", "hydra/launcher=basic", *args, "hydra.sweep.dir=basic"], cwd=tmp_path)
    assert "examples read on the host for 2 run(s) by 1 reading thread(s)" in (fused.stdout
                                                                                 + fused.stderr)
    for job in ("0", "1"):
        assert checkpoints(tmp_path / "fused" / job) == checkpoints(tmp_path / "basic" / job)


def docs_example() -> str:
    """The reader of docs/data.md, as a user copies it."""
    text = (REPO / "docs" / "data.md").read_text()
    code = re.search(r"```python\n# myproj/pngs.py\n(.*?)```", text, re.S)
    return code.group(1)


@pytest.mark.slow
def test_the_docs_png_reader_trains_and_resumes_exactly(digits, tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "digits_png"
    for split in ("train", "eval"):
        x, y = (np.load(digits / f"{k}_{split}.npy") for k in ("x", "y"))
        for i, (image, label) in enumerate(zip(x[:600] * 15, y[:600])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    (tmp_path / "myproj" / "pngs.py").write_text(docs_example())
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "pngs.yaml").write_text(
        textwrap.dedent("_target_: myproj.pngs.PngFolder\nroot: ???\n"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("RUNNER_TRUST", "myproj")
    args = ["--config-dir", "myconf", "task=pngs", f"task.root={root}", "model=cnn_small",
            "trainer.log_every=50", "trainer.checkpoint_every=100", "trainer.eval_every=100",
            "trainer.progress_bar=false"]
    run_cli([*args, "trainer.steps=200", "hydra.run.dir=whole"], cwd=tmp_path)
    run_cli([*args, "trainer.steps=100", "hydra.run.dir=halves"], cwd=tmp_path)
    run_cli(["resume=halves", "trainer.steps=200"], cwd=tmp_path)
    assert checkpoints(tmp_path / "whole")["step_200.msgpack"] == checkpoints(
        tmp_path / "halves")["step_200.msgpack"]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["eval"]["accuracy"] > 0.7
    assert "examples read on the host" in (tmp_path / "whole" / "runner.log").read_text()
