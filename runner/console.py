"""What a single run prints before it starts: the composed config as a tree."""

from omegaconf import DictConfig, OmegaConf

GROUPS = ("task", "model", "optimizer", "device", "trainer")


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config, one branch per group, rendered by rich (colours on a terminal)."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    rest = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in GROUPS}
    for name in GROUPS:
        branch = tree.add(f"[bold]{name}[/bold]")
        branch.add(Syntax(OmegaConf.to_yaml(cfg[name], resolve=True).rstrip(), "yaml"))
    if rest:
        tree.add(Syntax(OmegaConf.to_yaml(OmegaConf.create(rest)).rstrip(), "yaml"))
    rich_print(tree)
