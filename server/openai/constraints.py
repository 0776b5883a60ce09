"""Output constraints from a request's fields: `response_format`, vLLM's `structured_outputs` and its older
`guided_*` fields, each turned into a `GrammarSpec` that names the field it came from (a 400 naming it when the
constraint is invalid). Tool calls' grammar is in tool_calls.py."""

from __future__ import annotations

import json
from typing import Any

from server.engine.exceptions import ParamError
from server.engine.grammar import GrammarSpec, canonical
from server.openai.protocol.sampling import ResponseFormat, SamplingFields

# vLLM's options of its own grammar backends: accepted, nothing to do here.
BACKEND_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    if not isinstance(schema, (dict, bool)):
        raise ParamError("a JSON schema must be an object", param)
    check_schema(schema, param)
    return GrammarSpec("json_schema", canonical(schema), param)


def json_object_spec(param: str) -> GrammarSpec:
    return GrammarSpec("json_schema", canonical({"type": "object"}), param)


def regex_spec(pattern: Any, param: str) -> GrammarSpec:
    if not isinstance(pattern, str) or not pattern:
        raise ParamError("a regex must be a non-empty string", param)
    return GrammarSpec("regex", pattern, param)


def choice_spec(choices: Any, param: str) -> GrammarSpec:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ParamError("choice must be a non-empty list of non-empty strings", param)
    return GrammarSpec("grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices),
                       param)


def ebnf_spec(grammar: Any, param: str) -> GrammarSpec:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ParamError("grammar must be a non-empty EBNF string", param)
    return GrammarSpec("grammar", grammar, param)


def response_format_spec(fmt: ResponseFormat, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI's `response_format` (None for plain text)."""
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_spec(param)
    if fmt.json_schema is None:
        raise ParamError("response_format of type 'json_schema' needs a 'json_schema' field", param)
    schema = fmt.json_schema.schema_
    return json_schema_spec({} if schema is None else schema, f"{param}.json_schema.schema")


def structured_output_spec(key: str, value: Any, param: str) -> GrammarSpec | None:
    """One of vLLM's structured outputs (json, regex, choice, grammar, json_object) as given in `param`."""
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ParamError(f"the JSON schema is not valid JSON: {e}", param) from None
        return json_schema_spec(value, param)
    if key == "json_object":
        return json_object_spec(param) if value else None
    makers = {"regex": regex_spec, "choice": choice_spec, "grammar": ebnf_spec}
    if key not in makers:
        raise ParamError(f"unknown structured output {key!r}; use json, regex, choice or grammar", param)
    return makers[key](value, param)


def format_spec(body: SamplingFields) -> GrammarSpec | None:
    """The output format a request asks for, if any: at most one of `response_format`, a structured output, or
    a `guided_*` field."""
    specs = []
    if body.response_format is not None:
        specs.append(response_format_spec(body.response_format))
    outputs = body.structured_outputs.model_dump(exclude_none=True, by_alias=True) if body.structured_outputs else {}
    for key, value in outputs.items():
        if key not in BACKEND_OPTIONS:
            specs.append(structured_output_spec(key, value, f"structured_outputs.{key}"))
    for field, key in GUIDED.items():
        if getattr(body, field) is not None:
            specs.append(structured_output_spec(key, getattr(body, field), field))
    specs = [s for s in specs if s is not None]
    if len(specs) > 1:
        raise ParamError("ask for one output constraint at a time (response_format or one structured output)",
                         specs[1].param)
    return specs[0] if specs else None


def check_schema(schema: Any, param: str) -> None:
    """The schema is valid JSON Schema (checked with `jsonschema`'s metaschema when it is installed)."""
    try:
        import jsonschema
    except ImportError:  # the grammar compiler still refuses what it cannot read
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ParamError(f"invalid JSON schema: {e.message}" + (f" (at {where})" if where else ""), param) from None


