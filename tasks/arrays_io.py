"""Reading and checking ``task=arrays`` files: an ``.npz`` with ``x_train``, ``y_train``,
``x_eval``, ``y_eval``, or a directory of those four ``.npy`` files (memory-mapped: only the
headers and labels are read whole). Every problem is one ConfigError naming ``task.path`` and
the array at fault. The inputs' contents (SHA-256, standardization statistics, finiteness) are
one chunked pass, ``scan``; ``Rows`` reads examples of a ``.npy`` file by index
(``runner.tasks.arrays_rows``)."""

import dataclasses
import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from runner.config.errors import ConfigError

CHUNK_BYTES = 64 << 20  # the scan's working set: a chunk of rows, in float64

KEYS = ("x_train", "y_train", "x_eval", "y_eval")
KINDS = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class ArraysInfo:
    """What a task needs to know of its file before reading it whole: hashable, so it is part
    of the task as the compiled steps' static argument."""

    path: str  # absolute
    kind: str
    num_classes: Optional[int]  # classification
    n_train: int
    n_eval: int
    x_shape: Tuple[int, ...]  # one example's shape (a channel axis added to [N, H, W] images)
    y_dim: int  # regression targets per example
    y_mean: Tuple[float, ...] = (0.0,)  # regression targets are scaled by these
    y_std: Tuple[float, ...] = (1.0,)


def resolve(path: str) -> Path:
    """``task.path`` against the directory the command was started in (Hydra's original
    working directory, also when ``hydra.job.chdir=true`` moved the job into its run dir)."""
    from hydra.core.hydra_config import HydraConfig

    start = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
    return (start / Path(path).expanduser()).absolute()


def read(path: Path, given: str) -> Dict[str, np.ndarray]:
    """The four arrays of ``path`` (``given``: the path as configured, for messages)."""
    key = f"task.path={given}"
    if not path.exists():
        raise ConfigError(f"{key}: no such file or directory ({path})")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.npy"))
        missing = [k for k in KEYS if f"{k}.npy" not in found]
        if missing:
            raise ConfigError(f"{key}: no {missing[0]}.npy in the directory; found: "
                              f"{', '.join(found) or 'no .npy file'}")
        return {k: _load(path / f"{k}.npy", key, mmap_mode="r") for k in KEYS}
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of named arrays")
        with npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise ConfigError(f"{key}: no array {missing[0]}; found: "
                                  f"{', '.join(npz.files) or 'none'} (needs {', '.join(KEYS)})")
            return {k: npz[k] for k in KEYS}
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{key}: not an .npz file or a directory of .npy files "
                          f"({_reason(err)})") from None


def _load(path: Path, key: str, **kwargs) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError(f"{key}: cannot read {path.name} ({_reason(err)})") from None


def files(path: Path) -> List[Path]:
    """The file, or the directory's four ``.npy`` files in order."""
    return [path / f"{k}.npy" for k in KEYS] if path.is_dir() else [path]


def stamp(path: Path) -> Dict[str, List[int]]:
    """Each file's size and modification time (ns): what a resume compares before it trusts
    a recorded hash."""
    stats = [os.stat(f) for f in files(path)]
    return {"bytes": [s.st_size for s in stats], "mtime_ns": [s.st_mtime_ns for s in stats]}


def sha256(path: Path) -> str:
    """SHA-256 of the file, or of the directory's four ``.npy`` files in order."""
    digest = hashlib.sha256()
    for part in files(path):
        _hash_file(part, digest)
    return digest.hexdigest()


def scan(arrays: Dict[str, np.ndarray], path: Path, given: str, standardize: bool,
         x_shape: Tuple[int, ...]) -> Dict[str, Any]:
    """One chunked pass over the inputs: every value finite, the per-feature mean and std of
    ``x_train`` (with ``standardize``; else 0 and 1), the files' stamp and SHA-256. A
    directory's ``x_train.npy`` is read once: each chunk's bytes are hashed and its rows
    checked and counted. Memory: a chunk, whatever the file's size."""
    key, digest = f"task.path={given}", hashlib.sha256()
    before = stamp(path)  # what the hash and statistics describe, unless it changes meanwhile
    moments = Moments(int(np.prod(x_shape)))
    chunks = (_file_chunks(path / "x_train.npy", digest) if path.is_dir()
              else _chunks(arrays["x_train"]))
    for start, chunk in chunks:
        _check_finite(chunk, key, "x_train", start)
        if standardize:
            moments.add(chunk)
    for part in files(path)[1:] if path.is_dir() else files(path):
        _hash_file(part, digest)
    for start, chunk in _chunks(arrays["x_eval"]):
        _check_finite(chunk, key, "x_eval", start)
    mean, std = moments.result()
    if stamp(path) != before:
        raise ConfigError(f"{key}: {path} changed while it was read; start the run once it is "
                          f"written")
    return {**before, "sha256": digest.hexdigest(), "x_mean": mean.reshape(x_shape),
            "x_std": std.reshape(x_shape)}


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)


def _rows_per_chunk(row_shape: Tuple[int, ...]) -> int:
    return max(1, CHUNK_BYTES // max(1, 8 * int(np.prod(row_shape))))


def _chunks(a: np.ndarray):
    rows = _rows_per_chunk(a.shape[1:])
    for start in range(0, len(a), rows):
        yield start, np.asarray(a[start:start + rows])


class NpyLayout(NamedTuple):
    """Where a C-ordered ``.npy`` file keeps its rows (examples)."""

    length: int
    row_shape: Tuple[int, ...]
    dtype: np.dtype
    offset: int  # the header's bytes: the first row starts here
    row_bytes: int


def npy_layout(f) -> NpyLayout:
    """The layout of the ``.npy`` file open as ``f`` (read from its header)."""
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    row_shape = tuple(shape[1:])
    return NpyLayout(shape[0], row_shape, dtype, f.tell(),
                     int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)


def _file_chunks(path: Path, digest):
    """A ``.npy`` file's rows in chunks, read once: every byte goes to ``digest`` too."""
    with open(path, "rb") as f:
        layout = npy_layout(f)
        f.seek(0)
        digest.update(f.read(layout.offset))
        n, rows = layout.length, _rows_per_chunk(layout.row_shape)
        # hashlib releases the GIL on large buffers: a chunk is hashed on another thread while
        # this one checks and counts it
        with ThreadPoolExecutor(1) as hasher:
            hashed = None
            for start in range(0, n, rows):
                block = f.read(min(rows, n - start) * layout.row_bytes)
                if hashed is not None:
                    hashed.result()
                hashed = hasher.submit(digest.update, block)
                yield start, np.frombuffer(block, layout.dtype).reshape(-1, *layout.row_shape)
            if hashed is not None:
                hashed.result()
        for rest in iter(lambda: f.read(8 << 20), b""):
            digest.update(rest)


def _check_finite(chunk: np.ndarray, key: str, name: str, start: int = 0) -> None:
    """No NaN or Inf in ``chunk`` (rows ``start`` on of array ``name``)."""
    # The sum is NaN or Inf where a value is (or where it overflows: then look closer)
    if not np.issubdtype(chunk.dtype, np.inexact) or np.isfinite(chunk.sum(dtype=np.float64)):
        return
    bad = np.argwhere(~np.isfinite(chunk))
    if len(bad):
        index = (start + int(bad[0][0]), *(int(i) for i in bad[0][1:]))
        value = chunk[tuple(int(i) for i in bad[0])]
        raise ConfigError(f"{key}: {name} holds {value} at index "
                          f"{index if len(index) > 1 else index[0]}")


class Moments:
    """Per-feature mean and std over examples added chunk by chunk: each chunk's own in
    float32 (with float64 sums), combined in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, features: int):
        self.count, self.mean, self.m2 = 0, np.zeros(features), np.zeros(features)

    def add(self, chunk: np.ndarray) -> None:
        chunk = chunk.reshape(len(chunk), -1).astype(np.float32, copy=False)
        n, chunk_mean = len(chunk), chunk.mean(0, dtype=np.float64)
        chunk_m2 = np.square(chunk - chunk_mean.astype(np.float32)).sum(0, dtype=np.float64)
        delta, total = chunk_mean - self.mean, self.count + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + chunk_m2 + delta ** 2 * self.count * n / total
        self.count = total

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and std as float32 (a constant feature keeps std 1; none added: 0 and 1)."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return self.mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32)


def chunked_stats(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of ``a``'s examples, chunk by chunk (``Moments``)."""
    moments = Moments(int(np.prod(a.shape[1:])))
    for _, chunk in _chunks(a):
        moments.add(chunk)
    return moments.result()


def check(arrays: Dict[str, np.ndarray], *, path: Path, given: str, kind: Optional[str],
          num_classes: Optional[int]) -> ArraysInfo:
    """Check the arrays (see the module doc) and describe them."""
    key = f"task.path={given}"
    for name in KEYS:
        a = arrays[name]
        if a.ndim == 0 or not len(a):
            raise ConfigError(f"{key}: {name} is empty (shape {a.shape})")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ConfigError(f"{key}: {name} has dtype {a.dtype}; numbers are needed")
        if name.startswith("y"):  # labels here; the inputs in ``scan``'s one pass
            for start, chunk in _chunks(a):
                _check_finite(chunk, key, name, start)
    for split in ("train", "eval"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ConfigError(f"{key}: x_{split} has {len(x)} examples but y_{split} has "
                              f"{len(y)}")
    x_shape = example_shape(arrays["x_train"].shape)
    if example_shape(arrays["x_eval"].shape) != x_shape:
        raise ConfigError(f"{key}: x_eval's examples have shape {arrays['x_eval'].shape[1:]}, "
                          f"x_train's {arrays['x_train'].shape[1:]}")
    kind = kind or ("classification" if np.issubdtype(arrays["y_train"].dtype, np.integer)
                    or arrays["y_train"].dtype == bool else "regression")
    info = dict(path=str(path), kind=kind, n_train=len(arrays["y_train"]),
                n_eval=len(arrays["y_eval"]), x_shape=x_shape)
    if kind == "classification":
        return ArraysInfo(**info, num_classes=_classes(arrays, key, num_classes), y_dim=1)
    y_dims = {arrays[k].shape[1:] for k in ("y_train", "y_eval")}
    if len(y_dims) > 1 or any(len(d) > 1 for d in y_dims):
        raise ConfigError(f"{key}: regression targets must be [N] or [N, D] with one D; got "
                          f"y_train {arrays['y_train'].shape}, y_eval {arrays['y_eval'].shape}")
    return ArraysInfo(**info, num_classes=None, y_dim=int(np.prod(y_dims.pop())))


def example_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """One example's shape as the model gets it: [N] -> (1,), [N, H, W] -> (H, W, 1)."""
    features = tuple(int(n) for n in shape[1:])
    if not features:
        return (1,)
    return (*features, 1) if len(features) == 2 else features


def _classes(arrays: Dict[str, np.ndarray], key: str, num_classes: Optional[int]) -> int:
    """The class count; labels must be whole numbers in [0, num_classes)."""
    for name in ("y_train", "y_eval"):
        y = arrays[name]
        if y.ndim != 1:
            raise ConfigError(f"{key}: {name} has shape {y.shape}; classification labels are "
                              f"[N] class indices")
        if np.issubdtype(y.dtype, np.inexact) and not np.all(y == np.round(y)):
            index = int(np.flatnonzero(y != np.round(y))[0])
            raise ConfigError(f"{key}: {name} holds the label {y[index]} at index {index}, not "
                              f"a whole number (task.kind=classification)")
        if y.min() < 0:
            index = int(np.argmin(y))
            raise ConfigError(f"{key}: {name} holds the label {y[index]} at index {index}; "
                              f"labels are class indices from 0")
    top = int(max(arrays["y_train"].max(), arrays["y_eval"].max()))
    if num_classes is None:
        return max(top + 1, 2)
    if top >= num_classes:
        name = "y_train" if arrays["y_train"].max() >= num_classes else "y_eval"
        index = int(np.argmax(arrays[name]))
        raise ConfigError(f"{key}: {name} holds the label {arrays[name][index]} at index "
                          f"{index}, not below task.num_classes={num_classes}")
    return num_classes


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
