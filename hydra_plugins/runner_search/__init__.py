"""``hydra/sweeper=search``: runner's Optuna search (``search_sweeper.SearchSweeper``), with the
keys of hydra-optuna-sweeper, a pruner that stops trials at their evals, and a study that lives
in the sweep dir and survives a kill (``docs/search.md``)."""
