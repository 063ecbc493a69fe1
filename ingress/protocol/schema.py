"""JSON Schema checks for the schemas requests carry (tools' parameters, response_format,
structured_outputs): valid against their own draft's meta-schema (the jsonschema library), and with
`strict`, made only of keywords the decoding grammar enforces."""
from __future__ import annotations

from typing import Any, Optional

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from deployments.errors import InvalidRequestError

# Keywords the decoding grammar (xgrammar) does not enforce; OpenAI's strict mode rejects the same.
_UNENFORCED = ("allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "uniqueItems")
_SUBSCHEMA = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties",
              "unevaluatedItems", "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems", "allOf", "oneOf")


def check_json_schema(schema: dict[str, Any], param: str, what: str, strict: bool,
                      code: str = "invalid_value") -> None:
    """A 400 naming `param` unless `schema` is valid JSON Schema (its own draft's meta-schema); with
    `strict`, also unless the grammar can enforce all of it."""
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequestError(f"Invalid schema for {what}: {exc.message}" + (f" (at '{where}')" if where else ""),
                                  param=param, code=code) from None
    if strict:
        bad = _unenforced_keyword(schema)
        if bad is not None:
            raise InvalidRequestError(f"Invalid schema for {what}: '{bad}' is not supported with strict: true.",
                                      param=param, code=code)


def _unenforced_keyword(schema: Any) -> Optional[str]:
    if not isinstance(schema, dict):
        return None
    found = next((k for k in _UNENFORCED if k in schema), None)
    subs = [schema.get(k) for k in _SUBSCHEMA]
    subs += [s for k in _SUBSCHEMA_MAPS if isinstance(schema.get(k), dict) for s in schema[k].values()]
    subs += [s for k in _SUBSCHEMA_LISTS if isinstance(schema.get(k), list) for s in schema[k]]
    return found or next((f for f in map(_unenforced_keyword, subs) if f is not None), None)
