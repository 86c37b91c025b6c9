"""``hydra/launcher=fused``: registered in Hydra's ConfigStore when Hydra scans its plugins."""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.runner_fused_launcher.fused_launcher.FusedLauncher"
    # The most jobs one program trains together (null: no cap); larger groups are split.
    # A search's group has min(hydra.sweeper.n_jobs, max_members) slots.
    max_members: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="runner")
