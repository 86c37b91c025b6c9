"""runner's config groups. Importing this package (Hydra does, to read ``pkg://runner.conf``)
registers the schemas the YAML files extend: ``run_schema`` (runner's own keys,
``runner.config.schema``) and, for each built-in option below, ``schema/<group>/<name>``: every
parameter of its class or optax factory, with the code's defaults (``runner.config.targets``). So
``--cfg job`` lists every key, and ``task.num_train=500`` needs no ``+``. They are stored
untyped (keys and defaults): the job types and checks the values (``runner.config.schema.typed``,
``runner.config.targets.check``), where a sweep isolates a bad one. It also registers the
resolver ``--help`` lists the groups with (``runner.run.console.config_groups``)."""

from hydra.core.config_store import ConfigStore

from runner.config.schema import RunConf, untyped
from runner.config.targets import load_target, signature_schema
from runner.core.optim import SCHEMA as OPTIMIZER_SCHEMA
from runner.run.console import register_help_resolver

BUILT_IN = {
    "task": {"linear_fit": "runner.tasks.linear_fit.LinearFit",
             "cnn_random_images": "runner.tasks.cnn_random_images.CNNRandomImages",
             "arrays": "runner.tasks.arrays.Arrays"},
    "model": {"mlp": "runner.models.mlp.MLP", "cnn": "runner.models.cnn.CNN"},
    "optimizer": {"adam": "optax.adam", "adamw": "optax.adamw", "sgd": "optax.sgd",
                  "rmsprop": "optax.rmsprop", "chain": "runner.core.transforms.chain"},
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="run_schema", node=untyped(RunConf))
    for group, options in BUILT_IN.items():
        extra = OPTIMIZER_SCHEMA if group == "optimizer" else {}
        for name, path in options.items():
            schema = signature_schema(load_target(path, group), path=path, **extra)
            store.store(group=f"schema/{group}", name=name, node=untyped(schema))


register_schemas()
register_help_resolver()
