"""``task=arrays`` read from the host (``task.feed=host``) against its training set kept on the
device (``task.feed=device``): the MLP's steps/s on digits and on a generated 2.2 GB dataset,
the feed's reading rate from evicted (cold) pages beside the train step's consumption, peak
anonymous memory, and the start-up (hash and statistics) of a first run and of its resume.

Every run is a whole ``python -m runner`` process in a fresh run dir, as a user runs it. Its
steps/s are the median of the ``perf/steps_per_sec`` it logs (windows between host syncs,
compilation left out); its memory is its ``RssAnon`` (``/proc/<pid>/status``) sampled every
``SAMPLE_S`` by this process. The arms take turns, ``FEED_ROUNDS`` rounds at most.
"""

import ctypes
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from runner.bench.process import process_flags
from runner.io.layout import RunPaths

FEED_ROUNDS = 3  # at most: a round is 12 processes, four of them scanning 2.2 GB
BIG, QUICK_BIG = 700_000, 8_192  # x_train examples of the generated dataset (2.2 GB; 26 MB)
SMALL = 2_048  # the baseline dataset: the generated one's features, few examples
FEATURES, CLASSES, EVAL, CHUNK, BATCH = 784, 10, 2_000, 50_000, 128
SAMPLE_S = 0.05
HOST_GOAL = 0.9  # host-fed steps/s against device-fed: the aim
MEMORY_GOAL_MIB = 1024  # host-fed peak RssAnon over the baseline: the aim
COLD_BLOCKS = 4  # dispatch blocks (100 steps of 128 examples) read per reading-rate figure
MIB = 2**20
TRAIN = ["task=arrays", f"task.batch_size={BATCH}", "model.activation=relu",
         "trainer.steps_per_dispatch=100",
         "trainer.log_images=false"]
# --quick: steps and log_every of the speed runs (two 100-step windows), steps of the cold run
QUICK_STEPS, QUICK_LOG_EVERY, QUICK_COLD_STEPS = 200, 100, 200


def bench_feed(repeats: int, *, quick: bool = False) -> dict:
    """The feed's figures (see the module doc) on digits and a generated dataset of ``BIG``
    examples (``QUICK_BIG`` and few steps when ``quick``)."""
    rounds = min(repeats, FEED_ROUNDS)
    steps, log_every = (QUICK_STEPS, QUICK_LOG_EVERY) if quick else (5000, 500)
    with tempfile.TemporaryDirectory() as tmp:
        root, runs = Path(tmp), iter(range(10**6))
        base = [*TRAIN, *process_flags(root, quick=quick)]
        train = [*base, f"trainer.steps={steps}", f"trainer.log_every={log_every}",
                 f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}"]
        start = time.perf_counter()
        big = write_dataset(root / "big", QUICK_BIG if quick else BIG)
        generated_s = time.perf_counter() - start
        small, digits = write_dataset(root / "small", SMALL), _digits_dir(root / "digits")

        def run(data: Path, feed: str, *args: str) -> "Sampled":
            where = root / f"run{next(runs)}"
            return run_sampled([f"task.path={data}", f"task.feed={feed}", *args,
                                f"hydra.run.dir={where}"], root, where)

        arms: Dict[str, List["Sampled"]] = {}
        cold: Dict[str, List[float]] = {}
        for _ in range(rounds):
            for name, data in (("digits", digits), ("big", big)):
                for feed in ("device", "host"):
                    arms.setdefault(f"{name}_{feed}", []).append(run(data, feed, *train))
            arms.setdefault("small_host", []).append(run(small, "host", *train))
            for name, data in (("small", small), ("big", big)):  # start-up: 100 steps
                arms.setdefault(f"{name}_first", []).append(run(data, "host", *base, *(
                    f"trainer.{k}=100" for k in ("steps", "log_every", "eval_every",
                                                 "checkpoint_every"))))
            for name in ("small", "big"):  # ... and its resume to 200 (the recorded hash)
                first = arms[f"{name}_first"][-1].run_dir
                arms.setdefault(f"{name}_resume", []).append(
                    run_sampled([f"resume={first}", "trainer.steps=200"], root, first))
            for key, value in cold_figures(big, arms["big_first"][-1].run_dir, root, start=200,
                                           steps=QUICK_COLD_STEPS if quick else 1000).items():
                cold.setdefault(key, []).append(value)
        return summarize(arms, cold, rounds=rounds, steps=steps, log_every=log_every,
                         generated_s=generated_s, dataset=big)


class Sampled:
    """A finished ``python -m runner`` process: wall seconds, peak RssAnon, its run dir."""

    def __init__(self, wall_s: float, peak_rss_anon: int, run_dir: Path):
        self.wall_s, self.peak_rss_anon, self.run_dir = wall_s, peak_rss_anon, run_dir

    def steps_per_s(self) -> float:
        """The median of the run's logged ``perf/steps_per_sec`` (its windows this time)."""
        text = RunPaths(self.run_dir).log.read_text()
        # a resumed run's log goes on after the first run's: its own windows are the last ones
        text = text.rsplit("resuming from", 1)[-1]
        rates = [float(v) for v in re.findall(r"perf/steps_per_sec=([0-9.e+-]+)", text)]
        if not rates:
            raise SystemExit(f"bench_feed: no perf/steps_per_sec in {self.run_dir}/runner.log")
        return statistics.median(rates)


def run_sampled(args: List[str], cwd: Path, run_dir: Path) -> Sampled:
    """Run ``python -m runner <args>`` with its RssAnon sampled every ``SAMPLE_S`` on a thread
    (the wall time is taken when the process ends, not at a sample)."""
    peak, done = [0], threading.Event()
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, text=True)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon(proc.pid))
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        if proc.returncode != 0:
            out.seek(0)
            raise SystemExit(f"python -m runner {' '.join(args)} failed:\n{out.read()[-3000:]}")
    return Sampled(wall, peak[0], run_dir)


def rss_anon(pid: int) -> int:
    """A process's resident anonymous memory in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else 0


def cold_figures(data: Path, run_dir: Path, cwd: Path, *, start: int,
                 steps: int) -> Dict[str, float]:
    """The feed's reader on warm and on evicted pages (examples/s, in this process), then the
    run of ``run_dir`` (at step ``start``) resumed for ``steps`` more steps on evicted pages
    (steps/s; a resume reuses the recorded hash: nothing reads the file whole first)."""
    figures = {"read_warm": reading_rate(data), "resident_before_read": evict(data),
               "read_cold": reading_rate(data), "resident_before_run": evict(data)}
    run = run_sampled([f"resume={run_dir}", f"trainer.steps={start + steps}",
                       "trainer.log_every=100", f"trainer.eval_every={steps}",
                       f"trainer.checkpoint_every={steps}"], cwd, run_dir)
    figures["run_steps_per_s"] = run.steps_per_s()
    figures["resident_after_run"] = resident_fraction(data / "x_train.npy")
    return figures


def reading_rate(data: Path, *, threads: int = 8, batch: int = BATCH, blocks: int = COLD_BLOCKS,
                 seed: Optional[int] = None) -> float:
    """Examples/s of the feed's reader (``runner.tasks.arrays_rows``): ``blocks`` dispatch
    blocks of 100 steps' random batches of ``x_train`` rows on ``threads`` threads (the
    labels are in memory)."""
    from runner.tasks.arrays_rows import Rows

    stat = os.stat(data / "x_train.npy")
    reader = Rows(data / "x_train.npy", threads, (stat.st_size, stat.st_mtime_ns))
    rng = np.random.default_rng(seed)
    indices = [rng.integers(0, reader.length, 100 * batch) for _ in range(blocks)]
    start = time.perf_counter()
    for block in indices:
        reader.read(block)
    return blocks * 100 * batch / (time.perf_counter() - start)


def evict(data: Path) -> Optional[float]:
    """Drop the ``.npy`` files' pages from the page cache; the share of x_train's pages still
    cached afterwards (``resident_fraction``)."""
    for path in data.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(data / "x_train.npy")


def resident_fraction(path: Path) -> Optional[float]:
    """The share of ``path``'s pages in the page cache (mincore(2) on a mapping of it, which
    reads nothing), or None where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (ctypes.c_ubyte * (-(-size // page)))()
            if libc.mincore(address, size, pages) != 0:
                return None
            return sum(p & 1 for p in pages) / len(pages)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def write_dataset(data: Path, n_train: int, *, n_eval: int = EVAL, seed: int = 0) -> Path:
    """A ``task=arrays`` directory of ``.npy`` files: x float32 ``[n, FEATURES]`` (its class's
    prototype plus noise), y int32 labels of ``CLASSES`` classes; written ``CHUNK`` rows at a
    time through a memory map (memory: one chunk) and synced to disk."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((CLASSES, FEATURES), dtype=np.float32)
    data.mkdir(parents=True)
    for split, n in (("train", n_train), ("eval", n_eval)):
        x = np.lib.format.open_memmap(data / f"x_{split}.npy", "w+", np.float32, (n, FEATURES))
        y = np.lib.format.open_memmap(data / f"y_{split}.npy", "w+", np.int32, (n,))
        for start in range(0, n, CHUNK):
            labels = rng.integers(0, CLASSES, min(CHUNK, n - start), dtype=np.int32)
            y[start:start + len(labels)] = labels
            x[start:start + len(labels)] = prototypes[labels] + 2 * rng.standard_normal(
                (len(labels), FEATURES), dtype=np.float32)
        x.flush()
        y.flush()
        del x, y
    evict(data)  # synced; the runs' own start-up reads it back (warm)
    return data


def _digits_dir(data: Path) -> Path:
    """scikit-learn's digits as a directory of ``.npy`` files, 80/20 (1,437 train examples)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y, n = digits.images.astype(np.float32), digits.target, int(0.8 * len(digits.target))
    data.mkdir(parents=True)
    for key, a in (("x_train", x[:n]), ("y_train", y[:n]), ("x_eval", x[n:]), ("y_eval", y[n:])):
        np.save(data / f"{key}.npy", a)
    return data


def summarize(arms: Dict[str, List[Sampled]], cold: Dict[str, List[float]], *, rounds: int,
              steps: int, log_every: int, generated_s: float, dataset: Path) -> dict:
    """The figures of ``bench_feed``'s runs: medians over the rounds."""
    rate = {k: statistics.median(s.steps_per_s() for s in v) for k, v in arms.items()
            if k.endswith(("_device", "_host"))}
    wall = {k: statistics.median(s.wall_s for s in v) for k, v in arms.items()}
    peak = {k: statistics.median(s.peak_rss_anon for s in v) / MIB for k, v in arms.items()}
    c = {k: statistics.median(v) if None not in v else None for k, v in cold.items()}
    batch = BATCH
    speed = {name: {"device_steps_per_s": rate[f"{name}_device"],
                    "host_steps_per_s": rate[f"{name}_host"],
                    "host_over_device": rate[f"{name}_host"] / rate[f"{name}_device"]}
             for name in ("digits", "big")}
    over = peak["big_host"] - peak["small_host"]
    return {
        "rounds": rounds, "steps": steps, "batch_size": batch, "steps_per_dispatch": 100,
        "log_every": log_every,
        "dataset": {"n_train": int(np.load(dataset / "y_train.npy", mmap_mode="r").shape[0]),
                    "features": FEATURES, "classes": CLASSES, "n_eval": EVAL,
                    "x_train_bytes": (dataset / "x_train.npy").stat().st_size,
                    "generated_s": generated_s},
        "steps_per_s": speed, "host_goal_over_device": HOST_GOAL,
        "host_goal_met": all(s["host_over_device"] >= HOST_GOAL for s in speed.values()),
        "cold": {"read_threads": 8, "resident_before_read": c["resident_before_read"],
                 "resident_before_run": c["resident_before_run"],
                 "resident_after_run": c["resident_after_run"],
                 "read_warm_examples_per_s": c["read_warm"],
                 "read_cold_examples_per_s": c["read_cold"],
                 "run_cold_steps_per_s": c["run_steps_per_s"],
                 "run_cold_examples_per_s": c["run_steps_per_s"] * batch,
                 "warm_consumption_examples_per_s": rate["big_host"] * batch,
                 "device_consumption_examples_per_s": rate["big_device"] * batch},
        "memory": {"baseline": f"peak RssAnon of the same host-fed command on {SMALL} examples",
                   "baseline_mib": peak["small_host"], "host_peak_mib": peak["big_host"],
                   "host_over_baseline_mib": over, "device_peak_mib": peak["big_device"],
                   "goal_mib": MEMORY_GOAL_MIB, "goal_met": over <= MEMORY_GOAL_MIB},
        "startup": {"small_first_s": wall["small_first"], "big_first_s": wall["big_first"],
                    "first_extra_s": wall["big_first"] - wall["small_first"],
                    "small_resume_s": wall["small_resume"], "big_resume_s": wall["big_resume"],
                    "resume_extra_s": wall["big_resume"] - wall["small_resume"]}}
