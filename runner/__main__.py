"""``python -m runner [overrides]``: see ``runner.cli``."""

if __name__ == "__main__":  # not when a spawned process imports this module as its main
    from runner.cli import cli

    cli()
