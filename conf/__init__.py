"""runner's config groups. Importing this package (Hydra does, to read ``pkg://conf``)
registers the dataclass schemas the YAML files extend (``- /schema/optimizer/adam@_here_``)."""

from runner.schema import register_schemas

register_schemas()
