"""TensorBoard logging into the run's ``tb/`` directory (tensorboardX)."""

from pathlib import Path
from typing import Mapping

from tensorboardX import SummaryWriter


class TensorBoardLogger:
    """Scalars grouped by prefix (``train/loss``, ``eval/accuracy``, ``perf/...``) and text."""

    def __init__(self, log_dir: Path):
        self.writer = SummaryWriter(logdir=str(log_dir))

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: indent four spaces to keep it verbatim.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
