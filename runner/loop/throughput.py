"""The performance figures: steps per second between a host loop's syncs (``runner.loop.host``),
compilation left out, and the devices' peak FLOP/s that ``perf/mfu`` divides by."""

import re
import time
from typing import Optional

import jax

from runner.config.schema import Precision


class Throughput:
    """Steps per second between host syncs. The first window starts once the compiling
    dispatch is done; a window ends when a fetch waits for the device."""

    def __init__(self):
        self.start, self.steps, self.compiled = time.perf_counter(), 0, False

    def dispatched(self, steps: int, outputs, *, excluded: float) -> None:
        """A dispatch of ``steps`` steps; ``excluded`` seconds of it were no step's."""
        self.start += excluded
        if self.compiled:
            self.steps += steps
        else:  # keep compilation out of steps/s: wait for it, start timing after
            jax.block_until_ready(outputs)

    def rate(self) -> Optional[float]:
        return self.steps / (time.perf_counter() - self.start) if self.steps else None

    def restart(self, *, synced: bool) -> None:
        """After a dispatch: the next window starts (host work ended this one) if it synced."""
        if not self.compiled or synced:
            self.compiled, self.start, self.steps = True, time.perf_counter(), 0


# Dense peak FLOP/s per chip for (bf16, TF32, fp32) matmuls, by device_kind substring (first
# match wins). TPUs run float32 matmuls as bf16 passes at default precision.
PEAK_FLOPS = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100", (989e12, 494e12, 67e12)),
    ("H200", (989e12, 494e12, 67e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L4", (121e12, 60e12, 30e12)),
    ("TPU v4", (275e12, 275e12, 275e12)),
    ("TPU v5 lite", (197e12, 197e12, 197e12)),
    ("TPU v5p", (459e12, 459e12, 459e12)),
    ("TPU v5", (459e12, 459e12, 459e12)),
    ("TPU v6 lite", (918e12, 918e12, 918e12)),
)


def peak_flops(device_kind: str, precision: Precision,
               matmul_precision: Optional[str] = None) -> Optional[float]:
    """The device's dense peak FLOP/s for this compute precision, or None when unknown (CPUs,
    unlisted accelerators). float32 at default matmul precision counts as TF32 on GPUs."""
    for name, (bf16, tf32, fp32) in PEAK_FLOPS:
        if re.search(rf"\b{name}\b", device_kind):
            if Precision(precision) == Precision.bf16:
                return bf16
            return fp32 if matmul_precision == "highest" else tf32
    return None
