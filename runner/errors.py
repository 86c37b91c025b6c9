"""Errors meant for people: each carries a one-line message naming the key or file at fault."""


class RunnerError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits non-zero."""


class ConfigError(RunnerError):
    """A config value that composes but is not valid (out of range, inconsistent)."""


def describe_error(err: BaseException) -> "str | None":
    """One line for an error the user can fix (a RunnerError, or a Hydra/OmegaConf config
    error anywhere in the exception's chain); None for anything else (a bug: show it all)."""
    from hydra.errors import (ConfigCompositionException, InstantiationException,
                              MissingConfigException, OverrideParseException)
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, RunnerError):
            return str(e)
    for e in chain:
        if isinstance(e, MissingConfigException):
            group, _, name = (e.missing_cfg_file or "").rpartition("/")
            if group and e.options:
                return f"{group}={name}: no such option; available: {', '.join(e.options)}"
            return _first_line(e)
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and getattr(e, "full_key", None):
            valid = _valid_keys(e)
            return (f"{e.full_key}: unknown key" + (f"; valid keys: {valid}" if valid else "")
                    + " (use +key=value to add a new one)")
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return f"{e.full_key}: {_first_line(e)}"
    for e in chain:
        if isinstance(e, OverrideParseException):
            return f"cannot parse override '{e.override}': {_first_line(e)}"
        if isinstance(e, (ConfigCompositionException,
                          InstantiationException, OmegaConfBaseException)):
            return _first_line(e)
    return None


def _first_line(err: BaseException) -> str:
    text = getattr(err, "msg", None) or str(err)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _valid_keys(err: BaseException) -> str:
    import dataclasses

    schema = getattr(err, "object_type", None)
    if schema is not None and dataclasses.is_dataclass(schema):
        return ", ".join(f.name for f in dataclasses.fields(schema) if f.name != "_target_")
    return ""
