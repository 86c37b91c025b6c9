"""``hydra/sweeper=runner``: registered in Hydra's ConfigStore when Hydra scans its plugins."""

from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RunnerSweeperConf:
    _target_: str = "hydra_plugins.runner_sweeper.runner_sweeper.RunnerSweeper"
    # The most jobs one batch launches (null: all of them in one batch), as hydra/sweeper=basic.
    max_batch_size: Optional[int] = None
    # Sweep overrides given in a config (key: "a,b,c"), before the command line's. Empty, not
    # null as in basic: `+hydra.sweeper.params={...}` on a command line adds to an empty dict,
    # where merging into a null one fails (an AttributeError in OmegaConf 2.3).
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="runner", node=RunnerSweeperConf,
                             provider="runner")
