"""The JSON Schema validator behind ``wsd.core.schema`` (imported only when a channel group has a schema).

A schema is checked and compiled once, when the config loads, with the ``jsonschema`` library: the
validator class is the one its ``$schema`` names (Draft 2020-12 when it names none), ``format`` is
asserted where the library can check it, and ``$ref`` resolves only inside the schema itself (an
empty registry: the daemon never fetches a schema over the network).

Validation runs on the event loop, so its cost is bounded whatever the data: one validation may take
at most ``VALIDATION_BUDGET_S``. The library's keywords are used as they are, with four exceptions
swapped in through ``jsonschema.validators.extend``: ``pattern``, ``patternProperties`` and
``additionalProperties`` match with the ``regex`` library under a timeout (Python's ``re`` cannot be
interrupted, and a pattern like ``^(a+)+$`` backtracks for seconds on 30 characters), and
``uniqueItems`` compares by hashing (the library's comparison is quadratic for objects: seconds on
64 KiB). Every other keyword that can lead to more work (``properties``, ``items``, ``$ref``, ``allOf``,
...) checks the deadline before it runs; leaf keywords (``type``, ``minLength``, ``format``, ...) run
as they are, so one of them may finish past it. ``unevaluatedProperties`` together
with ``patternProperties`` is refused at load: the library matches those patterns with ``re``.
Data nested deeper than the interpreter's recursion limit allows is refused, not crashed on.

Validation checks shape only: it never rewrites data, and it does not HTML-escape anything.

Pure: no asyncio, sockets or logging (it reads a monotonic clock for its budget).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from wsd.core.schema_limits import MAX_REASON_CHARS, OVER_BUDGET, VALIDATION_BUDGET_S

__all__ = ["DataSchema", "MAX_REASON_CHARS", "OVER_BUDGET", "SchemaError", "VALIDATION_BUDGET_S", "compile_schema"]
_perf = time.perf_counter


def _cut(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _OverBudget(Exception):
    """Raised inside a validation that ran past its deadline."""


# Keywords that look at one value and never descend: the deadline is checked by the keywords that lead
# to them (properties, items, $ref, allOf, ...), which is every path to more work.
_LEAF = frozenset({"type", "required", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "minProperties", "maxProperties",
                   "format", "dependentRequired", "divisibleBy"})


def _hashable(x: Any) -> Any:
    """A hashable form of JSON ``x`` under JSON Schema equality (1 == 1.0, true != 1, key order ignored)."""
    if isinstance(x, bool) or x is None:
        return ("b", x)
    if isinstance(x, (int, float)):
        return ("n", x)
    if isinstance(x, str):
        return ("s", x)
    if isinstance(x, (list, tuple)):
        return ("l", tuple(_hashable(i) for i in x))
    if isinstance(x, dict):
        return ("d", frozenset((k, _hashable(v)) for k, v in x.items()))
    return ("o", repr(x))


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every object inside a schema (sub-schemas and plain values alike)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            yield n
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


def _check_refs(schema: dict[str, Any]) -> None:
    """SchemaError for a ``$ref`` that cannot be resolved inside the schema (a URL, a file, a typo).

    Checked at load so a careless ref fails ``wsd config check`` instead of every publication. Refs
    are looked up from the root, so a schema with nested ``$id``s (bases of their own) is left to
    validation time, which refuses the publication with the same reason.
    """
    objs = list(_walk(schema))
    if any(isinstance(o.get("$id"), str) or isinstance(o.get("id"), str) for o in objs if o is not schema):
        return
    spec = referencing.jsonschema.specification_with(
        schema.get("$schema") or "https://json-schema.org/draft/2020-12/schema",
        default=referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().resolver_with_root(spec.create_resource(schema))
    for o in objs:
        ref = o.get("$ref")
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise SchemaError(f"$ref {_cut(ref, 80)!r} does not resolve inside the schema (the daemon "
                                  "never fetches a schema from a URL or a file)") from None


class DataSchema:
    """One compiled schema; ``problem(data)`` is None for valid data, else ``(json_path, reason)``."""

    __slots__ = ("_deadline", "_patterns", "schema", "validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        base.check_schema(schema)  # SchemaError for a schema that is not valid against its meta-schema
        objs = list(_walk(schema))
        if any("unevaluatedProperties" in o for o in objs) and any("patternProperties" in o for o in objs):
            raise SchemaError("unevaluatedProperties together with patternProperties is not supported: their "
                              "pattern matching could not be bounded in time (use additionalProperties)")
        _check_refs(schema)
        self.schema = schema
        self._deadline = 0.0
        self._patterns: dict[str, Any] = {}  # compiled once; every pattern comes from the schema itself
        keywords: dict[str, Any] = {name: fn if name in _LEAF else self._bounded(fn)
                                    for name, fn in base.VALIDATORS.items()}
        own = {"pattern": self._pattern, "patternProperties": self._pattern_properties,
               "additionalProperties": self._additional_properties, "uniqueItems": self._unique_items}
        keywords.update({name: fn for name, fn in own.items() if name in base.VALIDATORS})
        cls = jsonschema.validators.extend(base, keywords)
        self.validator = cls(schema, registry=referencing.Registry(), format_checker=base.FORMAT_CHECKER)

    def problem(self, data: Any) -> tuple[str, str] | None:
        """Where and why ``data`` fails the schema (the reason may quote a value of ``data``), or None."""
        found = self.problem_quoted_and_not(data)
        return None if found is None else found[:2]

    def problem_quoted_and_not(self, data: Any) -> tuple[str, str, str] | None:
        """Like ``problem``, with a third reason that never quotes ``data``: the failed keyword and its value
        in the schema (what may be recorded for an encrypted group, whose plaintext must not be kept)."""
        self._deadline = _perf() + VALIDATION_BUDGET_S
        try:
            error = best_match(self.validator.iter_errors(data))
        except referencing.exceptions.Unresolvable as exc:  # a $ref outside the schema: refuse, say why
            reason = _cut(f"the channel's schema has a $ref that cannot be resolved: {exc}")
            return "$", reason, reason
        except _OverBudget:
            return "$", OVER_BUDGET, OVER_BUDGET
        except RecursionError:
            reason = "the data is nested too deeply to validate"
            return "$", reason, reason
        except SchemaError as exc:
            return "$", _cut(exc.message), _cut(exc.message)
        if error is None:
            return None
        keyword = _cut(f"fails {error.validator!r}: {_cut(repr(error.validator_value), 80)}")
        reason = error.message
        if len(reason) > MAX_REASON_CHARS:  # the message quotes the value: name the failed keyword instead
            reason = keyword
        return _cut(error.json_path, 120), _cut(reason), keyword

    # -- keywords: each checks the deadline first --------------------------------------------------------
    def _bounded(self, fn: Any) -> Any:
        def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
            if _perf() > self._deadline:
                raise _OverBudget
            return fn(validator, value, instance, schema)
        return keyword

    def _search(self, pattern: str, text: str) -> bool:
        """``re.search`` semantics under the validation's remaining budget."""
        left = self._deadline - _perf()
        if left <= 0:
            raise _OverBudget
        compiled = self._patterns.get(pattern)
        try:
            if compiled is None:
                compiled = self._patterns[pattern] = regex.compile(pattern)
            return compiled.search(text, timeout=left) is not None
        except TimeoutError:
            raise _OverBudget from None
        except regex.error as exc:  # accepted by re at load, not by regex: say so rather than fail inside
            raise SchemaError(f"the schema's pattern {_cut(pattern, 60)!r} cannot be used: {exc}") from None

    def _pattern(self, validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if validator.is_type(instance, "string") and not self._search(patrn, instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    def _pattern_properties(self, validator: Any, pp: dict[str, Any], instance: Any, schema: Any
                            ) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        for pattern, subschema in pp.items():
            for k, v in instance.items():
                if self._search(pattern, k):
                    yield from validator.descend(v, subschema, path=k, schema_path=pattern)

    def _additional_properties(self, validator: Any, ap: Any, instance: Any, schema: Any
                               ) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        properties = schema.get("properties", {})
        patterns = "|".join(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in properties and not (patterns and self._search(patterns, k))]
        if validator.is_type(ap, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], ap, path=extra)
        elif not ap and extras:
            names = ", ".join(repr(e) for e in sorted(extras))
            if "patternProperties" in schema:
                verb = "does" if len(extras) == 1 else "do"
                pats = ", ".join(repr(p) for p in sorted(schema["patternProperties"]))
                yield ValidationError(f"{names} {verb} not match any of the regexes: {pats}")
            else:
                verb = "was" if len(extras) == 1 else "were"
                yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")

    def _unique_items(self, validator: Any, ui: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if _perf() > self._deadline:
            raise _OverBudget
        if ui and validator.is_type(instance, "array"):
            keys = [_hashable(i) for i in instance]
            if len(set(keys)) != len(keys):
                yield ValidationError(f"{instance!r} has non-unique elements")


def compile_schema(schema: Any) -> DataSchema:
    """A compiled ``DataSchema``; SchemaError (its ``message`` and ``json_path`` say where) when invalid."""
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema is a JSON object, got {type(schema).__name__}")
    return DataSchema(schema)
