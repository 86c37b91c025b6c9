"""What a run prints before it starts (its dir, its overrides, where its whole config is) and
the config groups ``--help`` lists."""

import os
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from runner.config.targets import SIGNATURES
from runner.io.layout import RunPaths

# The groups a start line names (and, when chosen, the optional ones after them).
MAIN_GROUPS = ("task", "model", "optimizer", "device", "experiment", "hparams_search", "debug")
# Groups --help leaves out: Hydra's own (--hydra-help lists them), and the schemas runner's
# options extend (conf/__init__.py: schema/<group>/<name>; a user's option's: signature/...).
INTERNAL_GROUPS = ("hydra", "schema", SIGNATURES)
HELP_RESOLVER = "runner.config_groups"  # conf/hydra/help/runner.yaml: ${runner.config_groups:}


def shown_path(path: Path) -> str:
    """``path`` relative to the working dir when it is below it, else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def print_start(run_dir: Path, overrides: Sequence[str],
                choices: Optional[Mapping[str, Optional[str]]] = None) -> None:
    """A run's first lines: its dir and group options, the command line's overrides, and where
    every key's value is (``.hydra/config.yaml``, written once the dir is the run's)."""
    shown = shown_path(run_dir)
    picked = " ".join(f"{group}={(choices or {})[group]}" for group in MAIN_GROUPS
                      if (choices or {}).get(group) is not None)
    print(f"run dir: {shown}  {picked}".rstrip())
    print(f"overrides: {' '.join(overrides) if overrides else 'none (the defaults)'}")
    print(f"every key: {os.path.join(shown, RunPaths.HYDRA, 'config.yaml')} "
          f"(or the same command with --cfg job)", flush=True)


def config_groups() -> str:
    """The groups a user picks from, each with its options (``model: cnn, cnn_small, ...``),
    from Hydra's config search path (runner's and the user's config dirs), as Hydra's
    ``$APP_CONFIG_GROUPS`` lists them but without ``INTERNAL_GROUPS``."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return "\n".join(f"{group}: {', '.join(sorted(loader.get_group_options(group)))}"
                     for group in sorted(_groups(loader, "")))


def _groups(loader, parent: str) -> Iterator[str]:
    """The groups under ``parent`` holding configs, nested ones too (``a/b``)."""
    from hydra.core.object_type import ObjectType

    for name in loader.list_groups(parent):
        group = f"{parent}/{name}" if parent else name
        if group.split("/")[0] in INTERNAL_GROUPS:
            continue
        if loader.get_group_options(group, ObjectType.CONFIG):
            yield group
        yield from _groups(loader, group)


def register_help_resolver() -> None:
    """``${runner.config_groups:}`` (``config_groups``) for ``--help``'s template; once."""
    if not OmegaConf.has_resolver(HELP_RESOLVER):
        OmegaConf.register_new_resolver(HELP_RESOLVER, config_groups)
