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
import importlib
import importlib.resources
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runner.config.errors import ConfigError, RunnerError, first_line, set_by_runner

PRIMITIVES = (bool, int, float, str)
# Fields every flax.linen.Module has that are not configuration
MODULE_FIELDS = ("parent", "name")


def load_target(path: Any, key: str) -> Callable:
    """The object a ``_target_`` names, or a one-line error naming ``key``."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}._target_: missing (the class or function to build)")
    try:
        return import_object(path)
    except Exception as err:  # noqa: BLE001 (ImportError, AttributeError, a module's own)
        raise ConfigError(f"{key}._target_={path}: cannot import it ({first_line(err)})") \
            from None


def import_object(path: str) -> Any:
    """The object a dotted path names (its longest prefix that imports, then attributes), or
    Python's error for the missing part, or the module's own (hydra.utils.get_object would also
    log an error block of its own)."""
    parts, missing = path.split("."), None
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if end == 1 or not (name == err.name or name.startswith(f"{err.name}.")):
                raise  # a module the target's module imports is missing: that is the cause
            missing = missing or err  # not a module (an attribute?): try a shorter prefix
            continue
        if (end + 1 < len(parts) and not hasattr(obj, parts[end]) and missing is not None
                and missing.name == f"{name}.{parts[end]}"):
            raise missing from None  # pkg.nomod.Class: the module nomod is what is missing
        for attribute in parts[end:]:
            obj = getattr(obj, attribute)
        return obj
    raise AssertionError("unreachable: the one-part path's import raised")


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
        keys = ", ".join(sorted(takes - {"_target_"})) or "no keys"
        raise ConfigError(set_by_runner(f"{key}.{unknown[0]}", path) or
                          f"{key}.{unknown[0]}: unknown key; {path} takes: {keys}")
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
        return tuple(_built(v, f"{key}.{i}") for i, v in enumerate(value))
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


# ---- a user's options: every parameter of their target a key, as for runner's own -----------
SIGNATURES = "signature"  # conf/config.yaml: optional signature@model: model_${model}


def register_signatures(args: Sequence[str], groups: Mapping[str, Mapping[str, Any]]) -> None:
    """For each option of ``groups`` (group -> ``signature_schema`` keywords) in the config
    dirs the command line ``args`` add whose YAML names a ``_target_``: ConfigStore's
    ``signature/<group>_<option>``, every parameter of the target with its default, untyped
    (the job types the values: ``runner.config.schema.untyped``). So ``model.depth=3`` needs no ``+``
    and ``--cfg job`` lists every key, as for runner's options (whose YAMLs extend
    ``schema/<group>/<name>``). None where the target does not import: the job says why."""
    from hydra.core.config_store import ConfigStore

    from runner.config.schema import untyped

    dirs = config_dirs(args)
    for group, keywords in groups.items() if dirs else ():
        for option, target in user_options(dirs, group).items():
            try:
                schema = signature_schema(import_object(target), path=target, **keywords)
            except Exception:  # noqa: BLE001 (a user's module can raise anything on import)
                continue
            ConfigStore.instance().store(group=SIGNATURES, name=f"{group}_{option}",
                                         node=untyped(schema))


def config_dirs(args: Sequence[str]) -> List[Any]:
    """The existing config dirs a command line adds to runner's, in Hydra's search order: the
    last ``--config-dir`` (``-cd``), then ``hydra.searchpath``'s (``file://``, ``pkg://``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [value for flag, value in zip(args, args[1:]) if flag in ("--config-dir", "-cd")]
    given += [arg.split("=", 1)[1] for arg in args if arg.startswith(("--config-dir=", "-cd="))]
    entries = given[-1:]
    for arg in [arg for arg in args if arg.startswith("hydra.searchpath=")][:1]:
        try:
            value = OverridesParser.create().parse_overrides([arg])[0].value()
        except Exception:  # noqa: BLE001 (a bad override: Hydra reports it)
            value = None
        entries += value if isinstance(value, list) else []
    return [d for d in map(_config_dir, map(str, entries)) if d is not None]


def user_options(dirs: Sequence[Any], group: str) -> Dict[str, str]:
    """``{option: _target_}`` for ``group``'s YAMLs in ``dirs`` that name one; the first dir
    holding an option wins, and runner's own options (searched first) hide the user's."""
    found: Dict[str, str] = {}
    shipped = {f.name for f in _yamls(importlib.resources.files("runner.conf") / group)}
    for file in (f for d in dirs for f in _yamls(d / group) if f.name not in shipped):
        option, target = file.name[:-len(".yaml")], _target_of(file.read_text(), group)
        if target is not None:
            found.setdefault(option, target)
    return found


def _config_dir(entry: str) -> Optional[Any]:
    """A search path entry's directory (``file://dir``, a bare dir, ``pkg://package``)."""
    scheme, _, where = entry.rpartition("://")
    if scheme not in ("", "file", "pkg"):
        return None
    try:
        directory = Path(where) if scheme != "pkg" else importlib.resources.files(
            where.replace("/", ".").strip("."))  # Hydra's pkg://a/b is the package a.b
        return directory if directory.is_dir() else None
    except Exception:  # noqa: BLE001 (a package that does not import: Hydra says so)
        return None


def _yamls(directory: Any) -> List[Any]:
    files = directory.iterdir() if directory.is_dir() else ()
    return sorted((f for f in files if f.name.endswith(".yaml") and f.is_file()),
                  key=lambda f: f.name)


def _target_of(text: str, group: str) -> Optional[str]:
    """The ``_target_`` an option's YAML names (``<group>._target_`` in a ``# @package
    _global_`` one), if it names one as a plain string."""
    header = re.search(r"^#\s*@package\s+_global_\s*$", text, re.MULTILINE)
    try:
        target = OmegaConf.select(OmegaConf.create(text),
                                  f"{group}._target_" if header else "_target_")
    except Exception:  # noqa: BLE001 (a YAML Hydra cannot read either: Hydra reports it)
        return None
    return target if isinstance(target, str) and target else None
