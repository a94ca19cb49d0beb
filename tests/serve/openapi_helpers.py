"""Hypothesis strategies and a validator built from the server's OpenAPI document (llmkit/serve/openapi.py),
for tests/serve/test_openapi.py's schema fuzzing (RELIABILITY.md S5).

`Schemas(document)` knows the part of JSON Schema the document uses and refuses any keyword it does not
implement, so the document cannot say something the fuzzing silently ignores:

    errors(value, schema)      what is wrong with `value` ([] when it is valid)
    values(schema)             positive: values valid by `schema` (generated, then checked by `errors`)
    violations(schema)         negative: values that break `schema`, one part at a time where it is an object
                               (one field wrong, a required one missing, an unknown one added), each checked
                               by `errors` to be invalid indeed
"""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import strategies as st

KEYWORDS = {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "minItems",
            "maxItems", "items", "properties", "required", "additionalProperties", "maxProperties", "anyOf",
            "dependentSchemas", "$ref", "description"}
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates: those are raw-body cases
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=8)
TYPES = {"null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
         "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
         "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
         "string": lambda v: isinstance(v, str), "array": lambda v: isinstance(v, list),
         "object": lambda v: isinstance(v, dict)}


def same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1.0 is 1."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class Schemas:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    # ---- checking ------------------------------------------------------------------------------------

    def assert_known(self, schema: dict[str, Any], where: str = "$") -> None:
        """Every keyword of `schema` and of all the schemas inside it is one this module implements."""
        unknown = set(schema) - KEYWORDS
        assert not unknown, f"the document uses {sorted(unknown)} at {where}, which the fuzzing does not implement"
        if "$ref" in schema:
            self.resolve(schema)  # raises if it points nowhere
        inner = [*schema.get("properties", {}).items(), *schema.get("dependentSchemas", {}).items()]
        inner += [(f"anyOf[{i}]", s) for i, s in enumerate(schema.get("anyOf", ()))]
        if "items" in schema:
            inner.append(("items", schema["items"]))
        if isinstance(schema.get("additionalProperties"), dict):
            inner.append(("additionalProperties", schema["additionalProperties"]))
        for name, sub in inner:
            self.assert_known(sub, f"{where}.{name}")

    def errors(self, value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
        schema = self.resolve(schema)
        unknown = set(schema) - KEYWORDS
        assert not unknown, f"the document uses {sorted(unknown)} at {where}, which this validator does not implement"
        out: list[str] = []
        kinds = schema.get("type")
        if kinds is not None and not any(TYPES[k](value) for k in ([kinds] if isinstance(kinds, str) else kinds)):
            return [f"{where}: not of type {kinds}"]
        if "const" in schema and not same(value, schema["const"]):
            out.append(f"{where}: not {schema['const']!r}")
        if "enum" in schema and not any(same(value, e) for e in schema["enum"]):
            out.append(f"{where}: not one of {schema['enum']}")
        if TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                out.append(f"{where}: below {schema['minimum']}")
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                out.append(f"{where}: not above {schema['exclusiveMinimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                out.append(f"{where}: above {schema['maximum']}")
        if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            out.append(f"{where}: length {len(value)}")
        if isinstance(value, list):
            if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
                out.append(f"{where}: {len(value)} items")
            if "items" in schema:
                for i, item in enumerate(value):
                    out += self.errors(item, schema["items"], f"{where}[{i}]")
        if isinstance(value, dict):
            out += self._object_errors(value, schema, where)
        if "anyOf" in schema and all(self.errors(value, s, where) for s in schema["anyOf"]):
            out.append(f"{where}: matches none of anyOf")
        return out

    def _object_errors(self, value: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
        out = [f"{where}: {name} is required" for name in schema.get("required", ()) if name not in value]
        if len(value) > schema.get("maxProperties", math.inf):
            out.append(f"{where}: too many properties")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                out += self.errors(item, properties[name], f"{where}.{name}")
            elif extra is False:
                out.append(f"{where}: unknown property {name!r}")
            elif isinstance(extra, dict):
                out += self.errors(item, extra, f"{where}.{name}")
        for name, dependent in schema.get("dependentSchemas", {}).items():
            if name in value:
                out += self.errors(value, dependent, where)
        return out

    def valid(self, value: Any, schema: dict[str, Any]) -> bool:
        return not self.errors(value, schema)

    # ---- positive ------------------------------------------------------------------------------------

    def values(self, schema: dict[str, Any]) -> st.SearchStrategy:
        return self._values(schema).filter(lambda v: self.valid(v, schema))

    def _values(self, schema: dict[str, Any]) -> st.SearchStrategy:
        schema = self.resolve(schema)
        if "const" in schema:
            return st.just(copy.deepcopy(schema["const"]))
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "anyOf" in schema:
            return st.one_of([self._values(s) for s in schema["anyOf"]])
        kinds = schema.get("type")
        if kinds is None:
            return ANY_JSON
        if isinstance(kinds, list):
            return st.one_of([self._values({**schema, "type": k}) for k in kinds])
        low, high = schema.get("minimum"), schema.get("maximum")
        if kinds == "integer":
            return st.integers(low, high)
        if kinds == "number":
            low = schema.get("exclusiveMinimum", low)
            floats = st.floats(low, high, exclude_min="exclusiveMinimum" in schema, allow_nan=False,
                               allow_infinity=False)
            whole = st.integers(math.ceil(low) if low is not None else None, math.floor(high) if high is not None
                                else None)
            return floats | whole
        if kinds == "string":
            return st.text(st.characters(codec="utf-8"), min_size=schema.get("minLength", 0),
                           max_size=min(schema.get("maxLength", 20), 20))
        if kinds == "array":
            items = self._values(schema.get("items", {}))
            low_items = schema.get("minItems", 0)
            return st.lists(items, min_size=low_items, max_size=min(schema.get("maxItems", 3), max(3, low_items)))
        if kinds == "object":
            if schema.get("maxProperties") == 0:
                return st.just({})
            properties = {k: self._values(v) for k, v in schema.get("properties", {}).items()}
            required = set(schema.get("required", ()))
            return st.fixed_dictionaries({k: v for k, v in properties.items() if k in required},
                                         optional={k: v for k, v in properties.items() if k not in required})
        return st.booleans() if kinds == "boolean" else st.none()

    # ---- negative ------------------------------------------------------------------------------------

    def violations(self, schema: dict[str, Any]) -> st.SearchStrategy:
        return self._violations(schema).filter(lambda v: not self.valid(v, schema))

    def _violations(self, schema: dict[str, Any]) -> st.SearchStrategy:
        schema = self.resolve(schema)
        wrong = [ANY_JSON]
        if "anyOf" in schema:
            wrong += [self._violations(s) for s in schema["anyOf"]]
        kinds = schema.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds or []
        for bound, step in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1)):
            if bound in schema:
                edge = schema[bound]
                wrong.append(st.sampled_from([edge + step, edge + step * 0.5, edge + step * 2**64]))
        if "minLength" in schema and schema["minLength"] > 0:
            wrong.append(st.just(""))
        if "maxLength" in schema:
            wrong.append(st.text(min_size=schema["maxLength"] + 1, max_size=schema["maxLength"] + 3,
                                 alphabet="ab"))
        if "array" in kinds or "items" in schema:
            items = self.resolve(schema.get("items", {}))
            wrong.append(st.lists(self._violations(items), min_size=1, max_size=2))
            if "maxItems" in schema:
                wrong.append(st.lists(self._values(items), min_size=schema["maxItems"] + 1,
                                      max_size=schema["maxItems"] + 2))
            if schema.get("minItems", 0) > 0:
                wrong.append(st.just([]))
        if "object" in kinds and "properties" in schema:
            wrong.append(self._object_violations(schema))
        return st.one_of(wrong)

    def _object_violations(self, schema: dict[str, Any]) -> st.SearchStrategy:
        """A valid object with one thing wrong: a field's value, a required field missing, an unknown one."""
        valid = self._values(schema)
        names = sorted(schema["properties"])
        one_field = st.tuples(valid, st.sampled_from(names)).flatmap(
            lambda pair: self._violations(schema["properties"][pair[1]]).map(lambda bad: {**pair[0], pair[1]: bad}))
        options = [one_field]
        if schema.get("required"):
            options.append(st.tuples(valid, st.sampled_from(schema["required"])).map(
                lambda pair: {k: v for k, v in pair[0].items() if k != pair[1]}))
        if schema.get("additionalProperties") is False:
            options.append(st.tuples(valid, TEXT.filter(lambda n: n not in schema["properties"]), ANY_JSON).map(
                lambda t: {**t[0], t[1]: t[2]}))
        return st.one_of(options)


# One value of each JSON type and the usual edges: put in every field of a valid body in turn, each that
# the document says is wrong must be refused (a bool where 1 is wanted, an array where a string is, ...).
CONFUSIONS = [None, True, False, 0, 1, -1, 2**64, 0.5, -1e300, "", "x", [], [1], ["x"], {}, {"a": 1}]


def mutations(schemas: Schemas, schema: dict[str, Any], value: Any) -> list[Any]:
    """Copies of `value` with one field (at any depth the value reaches) replaced by each of CONFUSIONS
    that makes it invalid by `schema`; for the systematic negative cases."""
    out = [m for m in _mutations(schemas, schema, value) if not schemas.valid(m, schema)]
    return out


def _mutations(schemas: Schemas, schema: dict[str, Any], value: Any) -> list[Any]:
    schema = schemas.resolve(schema)
    if "anyOf" in schema:  # follow the branch the value takes
        schema = next((schemas.resolve(s) for s in schema["anyOf"] if schemas.valid(value, s)), schema)
    out: list[Any] = []
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            out += [{**value, name: copy.deepcopy(c)} for c in CONFUSIONS]
            if name in value:
                out += [{**value, name: m} for m in _mutations(schemas, sub, value[name])]
    elif isinstance(value, list) and value and "items" in schema:
        out += [[m, *value[1:]] for m in _mutations(schemas, schema["items"], value[0])]
    return out
