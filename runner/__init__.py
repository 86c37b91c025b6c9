"""runner: a declarative YAML experiment runner for JAX (``python -m runner``).

Importing ``runner`` itself stays light (no Hydra, no JAX): the config schemas are registered
by ``runner.conf`` when Hydra loads it.
"""
