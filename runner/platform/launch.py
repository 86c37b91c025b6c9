"""This process's rank among the processes a launcher started (SLURM, Open MPI, PMI), read
from the environment: light enough for ``python -m runner`` to use before it imports JAX."""

import os
from typing import Optional

RANK_VARIABLES = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launcher_rank() -> Optional[int]:
    """The first rank variable set, or None outside such a launcher."""
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return None
