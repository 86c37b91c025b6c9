"""runner: a declarative YAML experiment runner for JAX.

The config schemas are registered by the ``conf`` package, when Hydra loads it; importing
``runner`` itself stays light (no Hydra), e.g. for a task module in a figure worker.
"""
