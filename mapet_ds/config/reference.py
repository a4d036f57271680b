"""The config reference (mapet_ds/docs/CONFIG.md), generated from the schema's field descriptions."""

from __future__ import annotations

from typing import Any, Literal

import yaml

from mapet_ds.config.schema import RunConfig

REFERENCE_COMMAND = "python -m mapet_ds.config --reference > mapet_ds/docs/CONFIG.md"


def _type_name(annotation: Any) -> str:
    from typing import Union, get_args, get_origin

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else text + ".0"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_reference() -> str:
    """Every config field as a markdown table (field, type, default, description); the
    content of mapet_ds/docs/CONFIG.md."""
    lines = ["# Config reference", "",
             f"Generated from `mapet_ds/config/schema.py` by `{REFERENCE_COMMAND}`; do not edit by hand",
             "(tests/test_config_reference.py checks it is current). Set a field in a recipe",
             "(`section:` then `key: value`) or on the command line as `section.key=value`;",
             "`--print-config` on any launch script shows the resolved values.", ""]
    for section, info in RunConfig.model_fields.items():
        model = info.annotation
        lines += [f"## `{section}`: {info.description}", "", "| field | type | default | description |",
                  "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            cell = [f"`{section}.{name}`", _type_name(f.annotation), f"`{_default(f.get_default())}`",
                    f.description or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cell) + " |")
        lines.append("")
    return "\n".join(lines)
