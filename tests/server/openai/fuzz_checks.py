"""Schemathesis hooks for the fuzz test (loaded through SCHEMATHESIS_HOOKS): the one place where a schema-valid
request may still be refused.

Some fields carry a language of their own that OpenAPI cannot describe: a JSON Schema, a regular expression or an
EBNF grammar to enforce, a tool's parameter schema, and prompt lengths counted in tokens rather than characters;
and min_tokens may not exceed max_tokens, a relation JSON Schema cannot state. A 400 naming one of those fields
(or the context length) is the right answer to a schema-valid request, and
schemathesis' own `positive_data_acceptance` would call it a failure. This check is that check with exactly
those refusals allowed; every other 4xx for a schema-valid request still fails.
"""

from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

SEMANTIC_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_grammar", "guided_choice",
                   "response_format", "tools", "tool_choice")
# Relations between two numbers that JSON Schema cannot state: min_tokens at most max_tokens.
RELATIONS = ("min_tokens",)


def semantic_refusal(response) -> bool:
    """A 400 for what the schema cannot say: the context length, or a field written in another language."""
    if response.status_code != 400:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    param = error.get("param") or ""
    return (error.get("code") == "context_length_exceeded" or param.split(".")[0] in SEMANTIC_FIELDS
            or param in RELATIONS)


@schemathesis.check
def positive_data_acceptance_semantic(ctx, response, case):
    if semantic_refusal(response):
        return None
    return positive_data_acceptance(ctx, response, case)
