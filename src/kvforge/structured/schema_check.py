"""Fail-closed checks of JSON schemas before compilation: valid, supported, not too deep."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from kvforge.errors import InvalidRequestError

MAX_SCHEMA_DEPTH = 32

# Keywords the grammar engine cannot enforce: refusing is better than silently ignoring them.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$recursiveRef",
        "minProperties",
        "maxProperties",
    }
)
# Keywords whose value is a schema, a list of schemas or a name -> schema map.
_SUBSCHEMA = {"items", "additionalProperties", "additionalItems"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMA_MAPS = {"properties", "$defs", "definitions"}


def check_json_schema(schema: Any) -> None:
    """Raise InvalidRequestError naming the problem if ``schema`` cannot be enforced exactly."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError("a JSON schema must be an object", "json_schema")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(f"invalid JSON schema: {exc.message}", "json_schema") from exc
    _walk(schema, "#", 0)


def _walk(node: Any, path: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {path}", "json_schema"
        )
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in UNSUPPORTED_KEYWORDS:
            raise InvalidRequestError(
                f"JSON schema keyword {key!r} at {path} is not supported", "json_schema"
            )
        if key in _SUBSCHEMA:
            _walk(value, f"{path}/{key}", depth + 1)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, item in enumerate(value):
                _walk(item, f"{path}/{key}/{i}", depth + 1)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, item in value.items():
                _walk(item, f"{path}/{key}/{name}", depth + 1)
