"""Loading a RunConfig: YAML recipes (with ``_base_``), dotted overrides, one-line errors,
the resolved config written back (``save_config``) and ``--print-config`` for every launch script."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from pydantic import ValidationError

from mapet_ds.config.schema import ConfigError, RunConfig


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _get(data: Any, loc: Sequence[Any]) -> Any:
    for p in loc:
        if isinstance(data, dict) and p in data:
            data = data[p]
        elif isinstance(data, (list, tuple)) and isinstance(p, int) and p < len(data):
            data = data[p]
        else:
            return None
    return data


def format_validation_error(err: ValidationError, data: Any, source: str = "config") -> str:
    """One line per problem: ``<source>: <field>=<value>: <what is allowed>``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        field = _loc(loc)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            section = _loc(loc[:-1])
            model: Any = RunConfig
            for p in loc[:-1]:
                model = model.model_fields[p].annotation
            allowed = ", ".join(model.model_fields)
            lines.append(
                f"{source}: unknown key '{field}'"
                + (f" in section '{section}'" if section else "")
                + f" (allowed: {allowed})"
            )
            continue
        if e["type"] == "literal_error":
            msg = "must be one of " + msg.split("Input should be ", 1)[-1]
        value = e.get("input") if loc and e["type"] != "missing" else None
        if field:
            shown = _get(data, loc) if value is None else value
            if isinstance(shown, dict):
                lines.append(f"{source}: {field}: {msg}")
            else:
                lines.append(f"{source}: {field}={shown!r}: {msg}")
        else:
            lines.append(f"{source}: {msg}")
    return "; ".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected 'section.key=value', e.g. model.drop_path=0.2")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be 'section.key', e.g. optim.lr=1e-3")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return data


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, source)) from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe; ``_base_: other.yaml`` (relative to this file) is merged underneath."""
    if not p.is_file():
        where = f" (named by _base_ in {seen[-1]})" if seen else ""
        raise ConfigError(f"config file {p} does not exist{where} (see launch/recipes/ for recipes)")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: _base_ chain loops back to itself")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model:, data:, ...)")
    base = data.pop("_base_", None)
    if base is not None:
        data = _deep_merge(_read_yaml(p.parent / base, seen + (p.resolve(),)), data)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe (or defaults when None), apply dotted overrides, validate."""
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML (atomically); load_config reads it back equal."""
    from mapet_ds.safe_io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------
# --print-config (every launch script)

PRINT_CONFIG_HELP = ("print the fully resolved config (recipe + _base_ + overrides + defaults) as YAML and exit; "
                     "reads no data and touches no device")


def config_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (what save_config writes; load_config reads it back equal)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--print-config`` is answered inside ``parse_args``.

    The namespace's ``config`` (a recipe path or None) and ``overrides`` (dotted strings)
    are resolved with ``load_config`` and printed as YAML; the process exits 0, or 2 with
    one ``error:`` line for a bad config, before the script builds anything. Launch scripts
    get it through ``engine.cli.job_parser``. ``default_config(namespace)`` names the
    config to use when ``--config`` is not given (e.g. a run's config.yaml).
    """

    def __init__(self, *args: Any, default_config: Optional[Callable[[argparse.Namespace], Optional[str]]] = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._default_config = default_config
        self.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)

    def parse_known_args(self, args=None, namespace=None):  # argparse's parse_args calls this one
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "print_config", False):
            try:
                path = getattr(ns, "config", None)
                if path is None and self._default_config is not None:
                    path = self._default_config(ns)
                cfg = load_config(path, getattr(ns, "overrides", None) or ())
            except ConfigError as err:
                self.exit(2, f"error: {err}\n")
            sys.stdout.write(config_yaml(cfg))
            sys.stdout.flush()
            self.exit(0)
        return ns, rest
