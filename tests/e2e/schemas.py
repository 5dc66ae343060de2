"""Varied JSON schemas for the structured-output property tests (hand-written and Pydantic)."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str = Field(max_length=24)
    city: str = Field(max_length=16)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    address: Address


class Inventory(BaseModel):
    items: list[str] = Field(min_length=1, max_length=3)
    counts: list[int] = Field(max_length=3)
    color: Color


class Event(BaseModel):
    title: str = Field(min_length=3, max_length=20)
    kind: Literal["meeting", "call", "lunch"]
    attendees: list[Person] = Field(max_length=2)
    confirmed: bool


class Measurement(BaseModel):
    value: float = Field(ge=-100, le=100)
    unit: Literal["cm", "kg", "s"]
    note: str | None = Field(default=None, max_length=12)


def _short(kind: str = "string") -> dict[str, Any]:
    return {"type": "string", "maxLength": 12} if kind == "string" else {"type": kind}


HAND_WRITTEN: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 16}},
        "required": ["answer"],
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["n"],
    },
    {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["x"],
    },
    {"type": "object", "properties": {"c": {"enum": ["a", "b", "c"]}}, "required": ["c"]},
    {"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"]},
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 2,
        "maxItems": 4,
    },
    {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"],
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {
            "v": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 5},
                    {"type": "string", "maxLength": 6},
                ]
            }
        },
        "required": ["v"],
    },
    {
        "type": "object",
        "properties": {
            "pair": {
                "type": "array",
                "prefixItems": [
                    {"type": "string", "maxLength": 6},
                    {"type": "integer", "minimum": 0, "maximum": 9},
                ],
                "items": False,
            }
        },
        "required": ["pair"],
    },
    {
        "type": "object",
        "$defs": {
            "leaf": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 50}},
                "required": ["id"],
            }
        },
        "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
        "required": ["left", "right"],
    },
    {
        "type": "object",
        "properties": {
            "outer": {
                "type": "object",
                "properties": {
                    "inner": {
                        "type": "object",
                        "properties": {"deep": {"type": "boolean"}},
                        "required": ["deep"],
                    }
                },
                "required": ["inner"],
            }
        },
        "required": ["outer"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["x", "y", "z"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"maybe": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["maybe"],
    },
    {
        "type": "object",
        "properties": {"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["score"],
    },
    {
        "type": "object",
        "properties": {
            "a": _short(),
            "b": _short("boolean"),
            "c": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["a", "b", "c"],
        "additionalProperties": False,
    },
    {"type": "string", "maxLength": 10},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "boolean"},
    {"enum": ["north", "south", "east", "west"]},
]

PYDANTIC = [Address, Person, Inventory, Event, Measurement]


def all_schemas() -> list[dict[str, Any]]:
    """Hand-written schemas, Pydantic-generated ones, and generated record shapes."""
    schemas = list(HAND_WRITTEN) + [model.model_json_schema() for model in PYDANTIC]
    kinds = [
        ("string", {"maxLength": 10}),
        ("integer", {"minimum": 0, "maximum": 1000}),
        ("boolean", {}),
    ]
    for width in (2, 3, 4):
        properties = {
            f"field_{i}": {"type": kinds[(i + width) % 3][0], **kinds[(i + width) % 3][1]}
            for i in range(width)
        }
        schemas.append(
            {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            }
        )
    return schemas
