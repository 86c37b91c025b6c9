"""Checkpoints: atomic flax.serialization round trip; bad files give a one-line error."""

import contextlib
import errno
import resource
import signal

import jax
import numpy as np
import pytest
from flax import serialization

from conftest import start
from runner.io.checkpoint import (checkpoint_path, load_checkpoint, restore_latest,
                               save_checkpoint)
from runner.config.errors import RunnerError
from runner.core.steps import train_steps


def make_state(seed=0):
    (task, _, optimizer), (state, *_) = start(seed=seed)
    return state, task, optimizer.tx


def test_round_trip_restores_every_leaf(tmp_path):
    state, task, _ = make_state()
    data = task.make_data(jax.random.PRNGKey(1))
    state, _ = train_steps(state, data, jax.random.PRNGKey(2), task=task,
                           steps_per_dispatch=3)
    path = save_checkpoint(tmp_path, state, step=3)
    assert path == checkpoint_path(tmp_path, 3) and path.name == "step_3.msgpack"
    assert [p.name for p in tmp_path.iterdir()] == ["step_3.msgpack"]  # no temp file left
    template, _, _ = make_state(seed=5)
    restored = load_checkpoint(path, template)
    assert int(restored.step) == 3
    leaves = jax.tree.leaves((state.params, state.opt_state))
    restored_leaves = jax.tree.leaves((restored.params, restored.opt_state))
    assert len(leaves) == len(restored_leaves)
    for a, b in zip(leaves, restored_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@contextlib.contextmanager
def disk_full_after(nbytes: int):
    """Inside, a write that would make any file longer than ``nbytes`` writes up to there and
    then fails (EFBIG), as on a disk that fills up mid-write: the process's file-size limit,
    with SIGXFSZ (which would kill the process) ignored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_that_fails_part_way_leaves_the_previous_checkpoints(tmp_path):
    """A save that fails half-way (the disk fills up) raises, and leaves every file under a
    final name as it was: the previous step file and best.msgpack load as before, and no
    partial step_2.msgpack exists (resume would otherwise have to skip a torn file)."""
    old, _, _ = make_state()
    new = old.replace(step=old.step + 2, params=jax.tree.map(lambda p: p + 1, old.params))
    save_checkpoint(tmp_path, old, step=0)
    save_checkpoint(tmp_path, old, step=0, name="best")  # overwritten in place by each best
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["best.msgpack", "step_0.msgpack"]
    with disk_full_after(len(serialization.to_bytes(new)) // 2):
        for name in (None, "best"):
            with pytest.raises(Exception) as failed:
                save_checkpoint(tmp_path, new, step=2, name=name)
            chain = [failed.value, failed.value.__cause__, failed.value.__context__]
            assert any(isinstance(e, OSError) and e.errno == errno.EFBIG for e in chain), chain
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        sorted(before)  # no partial step_2.msgpack; temporary files start with "."
    for name, data in before.items():
        unchanged = (tmp_path / name).read_bytes() == data
        assert unchanged, f"{name} was overwritten part-way"
        restored = load_checkpoint(tmp_path / name, make_state(seed=3)[0])
        assert int(restored.step) == 0
        np.testing.assert_array_equal(restored.params["Dense_0"]["kernel"],
                                      old.params["Dense_0"]["kernel"])
    restored, path = restore_latest(tmp_path, make_state(seed=3)[0])
    assert path == tmp_path / "step_0.msgpack" and int(restored.step) == 0


def test_overwrite_is_atomic_and_complete(tmp_path):
    """Overwriting a file: a write that fails part-way (the disk fills up) leaves the old
    bytes under the name, whole, and no other file (a temporary one included); a write in
    place would have truncated it. A write that succeeds leaves the new state, alone."""
    state, _, _ = make_state()
    path = save_checkpoint(tmp_path, state, step=0)
    old = path.read_bytes()
    new = state.replace(params=jax.tree.map(lambda p: p + 1, state.params))
    assert len(serialization.to_bytes(new)) == len(old)  # the same size: only atomicity tells
    with disk_full_after(len(old) // 2):
        with pytest.raises(Exception) as failed:
            save_checkpoint(tmp_path, new, step=0)
    chain = [failed.value, failed.value.__cause__, failed.value.__context__]
    assert any(isinstance(e, OSError) and e.errno == errno.EFBIG for e in chain), chain
    assert [p.name for p in tmp_path.iterdir()] == ["step_0.msgpack"]
    assert path.read_bytes() == old, "the old checkpoint was overwritten part-way"
    assert save_checkpoint(tmp_path, new, step=0) == path
    assert [p.name for p in tmp_path.iterdir()] == ["step_0.msgpack"]
    restored = load_checkpoint(path, make_state()[0])
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_bad_bytes_name_the_file(tmp_path, content):
    path = tmp_path / "step_1.msgpack"
    path.write_bytes(content)
    with pytest.raises(RunnerError, match="step_1.msgpack"):
        load_checkpoint(path, make_state()[0])


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(RunnerError, match="nope.msgpack: cannot read"):
        load_checkpoint(tmp_path / "nope.msgpack", make_state()[0])


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    other = start(["model.features=[4]"])[1].state
    path = save_checkpoint(tmp_path, other, step=1)
    # flax's from_bytes alone would restore the (4,)-wide arrays silently
    with pytest.raises(RunnerError, match=r"does not match.*Dense_0.*\[4\].*\[128\]"):
        load_checkpoint(path, make_state()[0])


def test_truncated_file_and_other_optimizer_and_wrong_step_are_rejected(tmp_path):
    state, _, _ = make_state()
    path = save_checkpoint(tmp_path, state, step=0)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(RunnerError, match="step_0.msgpack: does not match"):
        load_checkpoint(path, make_state()[0])

    sgd = start(["optimizer=sgd"])[1].state  # same model, another optimizer state
    other = save_checkpoint(tmp_path, sgd, step=0, name="sgd")
    with pytest.raises(RunnerError, match="sgd.msgpack: does not match"):
        load_checkpoint(other, make_state()[0])

    renamed = tmp_path / "step_7.msgpack"
    renamed.write_bytes(full)
    with pytest.raises(RunnerError, match="step_7.msgpack: holds step 0, not 7"):
        load_checkpoint(renamed, make_state()[0])


def test_restore_latest_skips_invalid_files(tmp_path):
    state, _, _ = make_state()
    save_checkpoint(tmp_path, state, step=0)
    (tmp_path / "step_5.msgpack").write_bytes(b"")
    (tmp_path / ".step_9.msgpack.tmp").write_bytes(b"partial")
    restored, path = restore_latest(tmp_path, make_state(seed=3)[0])
    assert path.name == "step_0.msgpack" and int(restored.step) == 0
    assert restore_latest(tmp_path / "none", state) == (None, None)
