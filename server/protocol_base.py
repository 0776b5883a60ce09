"""What every request model shares: strict parsing, and integers as JSON Schema counts them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _integral(value):
    """1.0 is an integer as JSON Schema counts (and as clients send it); 1.5 and "1" stay errors."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**constraints):  # noqa: N802 - a type
    """An integer request field within `constraints` (ge, le, ...); integral floats accepted (see `_integral`)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]

# A token id: the OpenAPI document gets its upper bound, the model's vocabulary, once the model is loaded.
TokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-token-id": True}), BeforeValidator(_integral)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
