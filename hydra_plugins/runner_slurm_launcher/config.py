"""``hydra/launcher=slurm`` and ``hydra/launcher=fused_slurm``: registered in Hydra's
ConfigStore when Hydra scans its plugins. Submitit's SLURM options, with defaults a CPU-only
cluster's small node accepts: no GPU unless asked (``hydra.launcher.gpus_per_node=1`` on a GPU
cluster), one CPU and 2 GB per task."""

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class RunnerSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.runner_slurm_launcher.slurm_launcher.RunnerSlurmLauncher"
    timeout_min: int = 240  # each job's time limit
    gpus_per_node: Optional[int] = None  # a GPU cluster: 1 (or more, with tasks_per_node)
    cpus_per_task: Optional[int] = 1
    mem_gb: Optional[int] = 2
    array_parallelism: int = 64  # at most this many jobs of the sweep at once
    setup: List[str] = field(default_factory=list)  # shell lines before each job (module load)


@dataclass
class FusedSlurmConf(RunnerSlurmConf):
    """Each fused group (the jobs the fused launcher would train as one program) is one SLURM
    job: one allocation and one compilation for its members."""

    _target_: str = "hydra_plugins.runner_slurm_launcher.slurm_launcher.FusedSlurmLauncher"
    max_members: Optional[int] = None  # the most jobs one program trains (null: no cap)


ConfigStore.instance().store(group="hydra/launcher", name="slurm", node=RunnerSlurmConf,
                             provider="runner")
ConfigStore.instance().store(group="hydra/launcher", name="fused_slurm", node=FusedSlurmConf,
                             provider="runner")
