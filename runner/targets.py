"""Config groups whose ``_target_`` names a class or factory (``task``, ``model``, the
optimizer's optax factory): their schema is the target's own signature.

``signature_schema(target)`` turns the parameters of a class (a task dataclass, a flax module)
or function (an optax factory) into a typed dataclass: a parameter's type is its annotation
where OmegaConf can check it (``int``, ``float``, ``Optional[str]``, ``Sequence[int]``, enums,
dataclasses), else the type of its default; its default is the target's own. So a default lives
once, in the code, and a user's class gets the same checks as the built-ins: ``check`` merges a
composed group onto its target's schema (types, unknown keys; one line naming the key), and
``build`` calls the target (ranges: the target's own ``__post_init__`` checks).

Lists become tuples, so built tasks and models are hashable and compare by value: the jitted
steps take them as static arguments, and sweep jobs with equal configs share one compilation.
"""

import collections.abc
import dataclasses
import enum
import inspect
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import flax.linen as nn
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runner.errors import ConfigError, RunnerError, first_line

PRIMITIVES = (bool, int, float, str)
# Fields every flax.linen.Module has that are not configuration
MODULE_FIELDS = ("parent", "name")


def load_target(path: Any, key: str) -> Callable:
    """The object a ``_target_`` names, or a one-line error naming ``key``."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}._target_: missing (the class or function to build)")
    try:
        return get_object(path)
    except Exception as err:  # noqa: BLE001 (ImportError, AttributeError, ValueError...)
        cause = err.__cause__ or err
        raise ConfigError(f"{key}._target_={path}: cannot import it ({first_line(cause)})") \
            from None


def parameters(target: Callable, skip=()) -> Dict[str, inspect.Parameter]:
    """The keyword parameters a config may set (``**kwargs`` and ``*args`` excluded)."""
    try:
        signature = inspect.signature(target, eval_str=True)
    except (NameError, TypeError):  # an annotation that does not evaluate: the raw strings
        signature = inspect.signature(target)
    if isinstance(target, type) and issubclass(target, nn.Module):
        skip = (*skip, *MODULE_FIELDS)
    return {name: p for name, p in signature.parameters.items()
            if name not in skip
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)}


def signature_schema(target: Callable, *, path: str, skip=(), base: type = object) -> type:
    """A dataclass of ``target``'s keyword parameters (see the module doc), with ``_target_``
    = ``path``; ``base``'s fields come first (an optimizer's common keys). A parameter whose
    default a config cannot hold (a function, an array) is left out: its default applies."""
    fields: List[Tuple[str, Any, Any]] = []
    for name, p in parameters(target, skip).items():
        default = MISSING if p.default is p.empty else _config_value(p.default)
        if default is _UNREPRESENTABLE:
            continue
        kind = _checked_type(p.annotation, p.default)
        if dataclasses.is_dataclass(default):
            nested = type(default)
            kind = signature_schema(nested, path=f"{nested.__module__}.{nested.__qualname__}")
            default = kind(**{f.name: getattr(default, f.name)
                              for f in dataclasses.fields(nested)})
        fields.append((name, kind, _field(default)))
    fields.insert(0, ("_target_", str, dataclasses.field(default=path)))
    return dataclasses.make_dataclass(f"{getattr(target, '__name__', 'Target')}Conf", fields,
                                      bases=(base,) if base is not object else ())


def check(cfg: DictConfig, key: str, *, skip=(), base: type = object) -> DictConfig:
    """``cfg`` (the composed ``key`` group) typed by its target's schema: a value of the wrong
    type or a key the target does not take is a one-line ConfigError naming it."""
    path = cfg.get("_target_")
    target = load_target(path, key)
    schema = signature_schema(target, path=path, skip=skip, base=base)
    known = {f.name for f in dataclasses.fields(schema)}
    takes = set(parameters(target, skip)) | known
    unknown = [k for k in cfg if k not in takes]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; {path} takes: "
                          f"{', '.join(sorted(takes - {'_target_'}))}")
    given = OmegaConf.to_container(cfg, resolve=True)  # untyped: the schema types it anew
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema),
                                {k: v for k, v in given.items() if k in known})
    except ConfigKeyError as err:  # a key of a nested config (model.kernel_init.nme)
        raise ConfigError(f"{key}.{err.full_key}: unknown key") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{'.'.join(filter(None, (key, err.full_key)))}: "
                          f"{first_line(err)}") from None
    with open_dict(typed):  # parameters whose default no config holds: as given, untyped
        for k in (takes - known) & set(given):
            typed[k] = given[k]
    return typed


def build(cfg: Union[DictConfig, Dict[str, Any]], key: str, **fill: Any) -> Any:
    """Call ``cfg``'s target with its values (lists as tuples; nested ``_target_`` configs
    built too), a value missing from the config left to the target's default. ``fill`` gives
    values for parameters the config leaves null (a model's ``out_features`` from the task).
    An error the target raises becomes one line naming ``key`` and the target."""
    values = dict(cfg) if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    path = values.pop("_target_")
    target = load_target(path, key)
    takes = parameters(target)
    kwargs = {k: _built(v, f"{key}.{k}") for k, v in values.items() if v != MISSING}
    kwargs.update({k: v for k, v in fill.items() if k in takes and kwargs.get(k) is None})
    missing = [k for k, p in takes.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: required by {path} (no default); set it")
    try:
        return target(**kwargs)
    except RunnerError:
        raise
    except Exception as err:  # noqa: BLE001 (whatever a user's class raises for bad values)
        raise ConfigError(f"{key} ({path}): {first_line(err)}") from err


def _built(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if "_target_" in value:
            return build(value, key)
        return {k: _built(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_built(v, key) for v in value)
    return value


_UNREPRESENTABLE = object()


def _config_value(default: Any) -> Any:
    """``default`` as a config can hold it, or ``_UNREPRESENTABLE``."""
    if default is None or isinstance(default, (*PRIMITIVES, enum.Enum)):
        return default
    if isinstance(default, (tuple, list)) and all(isinstance(v, PRIMITIVES) for v in default):
        return list(default)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return default
    return _UNREPRESENTABLE


def _checked_type(annotation: Any, default: Any) -> Any:
    """The type OmegaConf checks for a parameter: its annotation where supported, else the
    type of its default (optax annotates with ``ArrayLike``), else ``Any``."""
    kind = _supported(annotation)
    if kind is not None:
        return Optional[kind] if default is None else kind
    for simple in PRIMITIVES:  # bool first: a bool is an int too
        if isinstance(default, simple):
            return simple
    if isinstance(default, (tuple, list)) and default:
        item = _checked_type(inspect.Parameter.empty, default[0])
        return List[item] if all(isinstance(v, item) for v in default) else Any
    return Any


def _supported(annotation: Any) -> Optional[Any]:
    if annotation in PRIMITIVES or (isinstance(annotation, type)
                                    and issubclass(annotation, enum.Enum)):
        return annotation
    if dataclasses.is_dataclass(annotation):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        inner = _supported(next(a for a in args if a is not type(None)))
        return Optional[inner] if inner is not None else None
    sequences = (list, tuple, collections.abc.Sequence)
    if origin in sequences and args and (len(args) == 1 or args[1] is Ellipsis):
        inner = _supported(args[0])
        return List[inner] if inner in PRIMITIVES else None
    return None


def _field(default: Any) -> Any:
    if isinstance(default, list) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default)
    return dataclasses.field(default=default)
