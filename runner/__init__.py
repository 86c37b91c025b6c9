"""runner: a declarative YAML experiment runner for JAX."""

from runner.schema import register_schemas

register_schemas()
