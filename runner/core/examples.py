"""A ``HostExamples`` task's examples as runner reads them: the reference example every read
is checked against, and the whole training set for a run that keeps it on the device."""

from typing import Any, Dict, Optional

import numpy as np

from runner.config.errors import ConfigError
from runner.tasks.base import Batch, HostExamples

READ_ALL_BYTES = 64 << 20  # the training set is read in chunks of this size


def probe(task: HostExamples) -> Dict[str, np.ndarray]:
    """The first training example as the task reads it: the reference every block's shapes
    and dtypes are checked against."""
    examples = task.read_examples(np.arange(1, dtype=np.int64))
    check_structure(examples, 1, None, what="read_examples([0])")
    return examples


def read_all(task: HostExamples) -> Batch:
    """Every training example, read in chunks into one host array per key (feed=device)."""
    n, first = task.train_examples, probe(task)
    per_example = max(1, sum(a.nbytes for a in first.values()))
    out = {k: np.empty((n, *a.shape[1:]), a.dtype) for k, a in first.items()}
    step = max(1, READ_ALL_BYTES // per_example)
    for start in range(0, n, step):
        indices = np.arange(start, min(start + step, n), dtype=np.int64)
        chunk = task.read_examples(indices)
        check_structure(chunk, len(indices), first, what=f"examples {start}..")
        for k in out:
            out[k][start:start + len(indices)] = chunk[k]
    return out


def check_structure(examples: Any, n: int, reference: Optional[Dict[str, np.ndarray]], *,
                     what: str) -> None:
    """``examples``: host arrays of ``n`` examples, shaped and typed as ``reference``'s."""
    if not isinstance(examples, dict) or not examples or not all(
            isinstance(a, np.ndarray) for a in examples.values()):
        raise ConfigError(f"task's {what} returned {type(examples).__name__}; it must return a "
                          f"dict of NumPy arrays")
    for name, a in examples.items():
        ref = None if reference is None else reference.get(name)
        if len(a) != n or (reference is not None and (
                ref is None or a.shape[1:] != ref.shape[1:] or a.dtype != ref.dtype)):
            want = (f"{n} examples" if ref is None else
                    f"{n} x {ref.shape[1:]} {ref.dtype}")
            raise ConfigError(f"task's {what} returned {name} of shape {a.shape} {a.dtype}, "
                              f"expected {want}")
    if reference is not None and set(examples) != set(reference):
        raise ConfigError(f"task's {what} returned keys {sorted(examples)}, expected "
                          f"{sorted(reference)}")

