"""The base of every typed config section: strict pydantic models with one-line errors.

Every component owns a :class:`Section` subclass next to its code (``rollout/server.py``'s
``ServerConfig``, ``models/config.py``'s ``ParallelConfig`` ...); ``drpo_megatron/config.py``
assembles them into the run-config tree.  A section is strict: unknown keys, wrong types
(``delta: "12.5"``, ``max_steps: 2.5``) and non-finite numbers (``lr: .inf``) are refused, and
closed choices are ``Literal`` types defined next to the code that implements them.  Each field's
docstring (the string literal under it) is its documentation: ``drpo config show`` prints it.

This module is the bottom layer of the config: it imports nothing from the package.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from drpo_megatron.errors import InputError


class ConfigError(InputError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class Section(BaseModel):
    """A config section: strict types, no unknown keys, finite numbers, documented fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, validate_default=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML-writable) values of every field, nested sections as mappings."""
        return self.model_dump(mode="python")


# ---------------------------------------------------------------------------- error messages
_TYPE_WORDS = {
    "float_type": "expected a number", "float_parsing": "expected a number",
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list",
    "tuple_type": "expected a list", "dict_type": "expected a mapping",
    "finite_number": "must be a finite number (not nan or inf)",
}
_BOUND_WORDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
                "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}
_MISSING = object()


def _path(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif not str(item).startswith(("function-", "literal[", "union[")) and \
                item not in ("str", "int", "float", "bool", "list", "dict", "none"):
            parts.append(str(item))
    return ".".join(parts)


def _lookup(data: Any, loc: tuple) -> Any:
    for item in loc:
        if isinstance(data, dict) and item in data:
            data = data[item]
        elif isinstance(data, list) and isinstance(item, int) and item < len(data):
            data = data[item]
        else:
            return data if not isinstance(data, (dict, list)) else _MISSING
    return data


def _field(model: type[BaseModel] | None, loc: tuple):
    """The pydantic FieldInfo at ``loc`` (None when ``loc`` leaves the sections)."""
    field = None
    for item in loc:
        if model is None or not isinstance(item, str):
            return None
        field = model.model_fields.get(item)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return field


def _example(model: type[BaseModel] | None, loc: tuple, kind: str) -> str:
    """``; write e.g. <leaf>: <default>`` for a type error (the default is a valid example)."""
    leaf = next((str(i) for i in reversed(loc) if isinstance(i, str)), "")
    field = _field(model, loc)
    if field is not None and not field.is_required():
        default = field.get_default(call_default_factory=True)
        if default is not None and not isinstance(default, BaseModel):
            shown = yaml.safe_dump(default, default_flow_style=True).strip()
            return f"; write e.g. {leaf}: {shown.removesuffix('...').strip()}"
    generic = {"int": "1", "float": "1.0", "bool": "true", "string": '"text"', "list": "[]"}
    for word, ex in generic.items():
        if kind.startswith(word):
            return f"; write e.g. {leaf}: {ex}"
    return ""


def _valid_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (for an unknown-key message)."""
    for item in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(item))
        if field is None:
            return sorted(model.model_fields)
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def format_validation_error(err: ValidationError, data: Any, model: type[BaseModel] | None = None,
                            prefix: str = "") -> str:
    """One line per problem: ``<field>=<value>: <what is wrong>; <fix>``."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _path(prefix, loc)
        kind = e["type"]
        value = e.get("input", _lookup(data, loc))
        if kind == "extra_forbidden":
            keys = _valid_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"unknown config key {path!r}; {hint}valid keys here: {keys}")
        elif kind in ("model_type", "model_attributes_type", "dataclass_type"):
            lines.append(f"{path}: expected a mapping of fields, got {value!r}; write it as a "
                         "YAML mapping")
        elif kind == "finite_number":
            lines.append(f"{path}={value!r}: {_TYPE_WORDS[kind]}{_example(model, loc, kind)}")
        elif kind in _TYPE_WORDS:
            lines.append(f"{path}={value!r}: {_TYPE_WORDS[kind]}{_example(model, loc, kind)}")
        elif kind == "literal_error":
            lines.append(f"{path}={value!r}: choose one of {e['ctx']['expected']}")
        elif kind in _BOUND_WORDS:
            key, op = _BOUND_WORDS[kind]
            lines.append(f"{path}={value!r} must be {op} {e['ctx'][key]}")
        elif kind == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(msg if msg.startswith(path.split(".")[0]) or not path
                         else f"{path}={value!r}: {msg}")
        else:
            lines.append(f"{path}={value!r}: {e['msg']}")
    return "\n".join(dict.fromkeys(lines))


def build_section(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """``model`` validated from ``data``; a :class:`ConfigError` with readable lines otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or model.__name__}: expected a mapping, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, data, model, prefix)) from None


# ---------------------------------------------------------------------------- YAML
class StrictYAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (the second ``rollout:`` section would
    silently replace the first) and reads ``1e-4`` / ``3E+2`` as numbers, as YAML 1.2 does
    (PyYAML follows YAML 1.1, where a float needs a dot, so ``lr: 1e-4`` was a string)."""


def _no_duplicates(loader: StrictYAMLLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}, again on line "
                f"{key_node.start_mark.line + 1}): keep one; the second would silently replace "
                "the first", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictYAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
StrictYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML with :class:`StrictYAMLLoader`."""
    return yaml.load(text, Loader=StrictYAMLLoader)  # noqa: S506 - a SafeLoader subclass
