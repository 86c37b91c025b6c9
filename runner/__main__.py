"""``python -m runner [overrides]``: see ``runner.cli``."""

if __name__ == "__main__":  # not when a spawned process imports this module as its main
    # First, before the seconds of imports: a Ctrl-C or SIGTERM from here on stops the run.
    from runner.platform.preemption import catch_stop_signals

    catch_stop_signals()
    from runner.cli import cli

    cli()
