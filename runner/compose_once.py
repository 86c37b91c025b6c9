"""Compose a single run's config once, where Hydra 1.3 composes it twice.

``@hydra.main`` first composes the whole config only to read ``hydra.mode`` (``Hydra.get_mode``,
in multirun mode, sweep overrides unchecked), then composes it again to run the job: each
composition of this project's config costs ~0.1 s, a twentieth of the default run. Within
``compose_once()``, that first composition is done as the run's own (run mode, overrides
checked) and kept; the run's composition then takes it instead of composing again. When the
config leaves ``hydra.mode`` unset, Hydra asks for the run with one more override,
``hydra.mode=RUN``; it is applied to the kept config as Hydra applies it (the value, and the
override recorded last in ``hydra.overrides.hydra``). Anything else — a composition error,
other overrides, a multirun — goes to Hydra's own code unchanged, and after the second
composition Hydra's own code is back in place. Only for Hydra 1.3 (whose internals this
follows); with another version, ``compose_once()`` changes nothing.
"""

import contextlib
from typing import Iterator, List, Optional

import hydra
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.types import RunMode
from omegaconf import DictConfig

MODE_RUN = "hydra.mode=RUN"  # what Hydra adds for a run whose config leaves hydra.mode unset


@contextlib.contextmanager
def compose_once() -> Iterator[None]:
    """Within this context, a single run's config is composed once (see the module doc)."""
    original = ConfigLoaderImpl.load_configuration
    if not hydra.__version__.startswith("1.3."):
        yield
        return
    kept: List = []  # (config_name, overrides, cfg) of the mode lookup, for the run's

    def load_configuration(self, config_name: Optional[str], overrides: List[str],
                           run_mode: RunMode, from_shell: bool = True,
                           validate_sweep_overrides: bool = True) -> DictConfig:
        if not kept and run_mode == RunMode.MULTIRUN and not validate_sweep_overrides:
            # Hydra.get_mode: compose as the run will, and keep the result for it
            try:
                cfg = original(self, config_name, list(overrides), RunMode.RUN, from_shell)
            except Exception:  # noqa: BLE001 (Hydra's own composition reports it, as before)
                ConfigLoaderImpl.load_configuration = original
                return original(self, config_name, overrides, run_mode, from_shell,
                                validate_sweep_overrides)
            kept.append((config_name, list(overrides), cfg))
            return cfg  # get_mode reads cfg.hydra.mode
        ConfigLoaderImpl.load_configuration = original  # one composition saved at most
        if kept and run_mode == RunMode.RUN and validate_sweep_overrides and from_shell:
            name, before, cfg = kept.pop()
            added = list(overrides[len(before):])
            if (name == config_name and list(overrides[:len(before)]) == before
                    and added in ([], [MODE_RUN])):
                if added:
                    cfg.hydra.mode = RunMode.RUN
                    cfg.hydra.overrides.hydra.append(MODE_RUN)
                return cfg
        return original(self, config_name, overrides, run_mode, from_shell,
                        validate_sweep_overrides)

    ConfigLoaderImpl.load_configuration = load_configuration
    try:
        yield
    finally:
        ConfigLoaderImpl.load_configuration = original
