"""JSON Schema validation of published ``data`` for a channel group (``data_schema`` / ``data_schema_file``).

The validator (``wsd.core.schema_validator``: the ``jsonschema`` library with bounded ``pattern``,
``patternProperties``, ``additionalProperties`` and ``uniqueItems``, and a time budget per validation) is imported
on first use, so a daemon or CLI whose config has no schema never loads ``jsonschema`` (~60 ms at every start).

Pure: no asyncio, sockets or logging.
"""

from __future__ import annotations

from typing import Any

from wsd.core.schema_limits import MAX_REASON_CHARS, OVER_BUDGET, VALIDATION_BUDGET_S

__all__ = ["MAX_REASON_CHARS", "OVER_BUDGET", "VALIDATION_BUDGET_S", "compile_schema"]  # and, on first use: DataSchema, SchemaError


def compile_schema(schema: Any) -> Any:
    """A compiled ``DataSchema``; ``SchemaError`` (its ``message`` and ``json_path`` say where) when invalid."""
    from wsd.core import schema_validator

    return schema_validator.compile_schema(schema)


def __getattr__(name: str) -> Any:  # DataSchema and SchemaError come from the validator, loaded on first use
    if name in ("DataSchema", "SchemaError"):
        from wsd.core import schema_validator

        return getattr(schema_validator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
