"""JSON Schema validation of published ``data`` for a channel group (``data_schema`` / ``data_schema_file``).

A schema is checked and compiled once, when the config loads, with the ``jsonschema`` library: the
validator class is the one its ``$schema`` names (Draft 2020-12 when it names none), ``format`` is
asserted where the library can check it, and ``$ref`` resolves only inside the schema itself (an
empty registry: the daemon never fetches a schema over the network).

Validation checks shape only: it never rewrites data, and it does not HTML-escape anything.

Pure: no asyncio, sockets, time or logging.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.exceptions import SchemaError, best_match

__all__ = ["DataSchema", "MAX_REASON_CHARS", "SchemaError", "compile_schema"]

MAX_REASON_CHARS = 200  # a refusal's reason is cut here: it may quote the offending value


def _cut(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DataSchema:
    """One compiled schema; ``problem(data)`` is None for valid data, else ``(json_path, reason)``."""

    __slots__ = ("schema", "validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)  # SchemaError for a schema that is not valid against its meta-schema
        self.schema = schema
        self.validator = cls(schema, registry=referencing.Registry(), format_checker=cls.FORMAT_CHECKER)

    def problem(self, data: Any) -> tuple[str, str] | None:
        try:
            error = best_match(self.validator.iter_errors(data))
        except referencing.exceptions.Unresolvable as exc:  # a $ref outside the schema: refuse, say why
            return "$", _cut(f"the channel's schema has a $ref that cannot be resolved: {exc}")
        if error is None:
            return None
        reason = error.message
        if len(reason) > MAX_REASON_CHARS:  # the message quotes the value: name the failed keyword instead
            reason = f"fails {error.validator!r}: {_cut(repr(error.validator_value), 80)}"
        return _cut(error.json_path, 120), _cut(reason)


def compile_schema(schema: Any) -> DataSchema:
    """A compiled ``DataSchema``; SchemaError (its ``message`` and ``json_path`` say where) when invalid."""
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema is a JSON object, got {type(schema).__name__}")
    return DataSchema(schema)
