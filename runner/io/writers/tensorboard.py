"""``logger=tensorboard`` (the default): TensorBoard event files in the run's ``tb/``."""

from runner.io.layout import RunPaths
from runner.io.tb_logger import TensorBoardLogger
from runner.io.writers.base import RunInfo


class TensorBoardWriter(TensorBoardLogger):
    """Scalars, text, images, histograms and the HParams row (``TensorBoardLogger``) of the run
    ``run`` into its ``tb/``. A resumed run's events purge those the interrupted attempt wrote
    after its checkpoint: TensorBoard drops this run's earlier events at steps from
    ``start_step + 1`` on."""

    run_files = (RunPaths.TB,)

    def __init__(self, *, run: RunInfo):
        super().__init__(RunPaths(run.dir).tb,
                         purge_step=run.start_step + 1 if run.start_step else None)
