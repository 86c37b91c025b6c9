"""``hydra/sweeper=runner``: Hydra's basic sweep that checks each batch with one composition per
kind of job instead of one per job (``runner_sweeper.RunnerSweeper``)."""
