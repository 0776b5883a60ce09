"""A request's fields as the engine's `SamplingParams`, and its deadline from the X-Request-Timeout header."""

from __future__ import annotations

import re

from fastapi import Request

from server.engine.exceptions import ParamError
from server.engine.sampling_params import SamplingParams
from server.openai.errors import APIError
from server.openai.protocol.common import TOKEN_ID_KEY
from server.openai.protocol.sampling import SamplingFields


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The fields both endpoints share; `max_tokens` and the logprobs are each endpoint's to read."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(TOKEN_ID_KEY, key):
            raise ParamError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        bias[int(key)] = value
    if body.stream_options is not None and not body.stream:
        raise ParamError("stream_options is only allowed when stream is true", "stream_options")
    return SamplingParams(
        n=body.n, max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logit_bias=bias, seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


def request_timeout(raw: Request) -> float | None:
    """A per-request deadline from the X-Request-Timeout header (seconds), over the server's default."""
    value = raw.headers.get("x-request-timeout")
    if value is None:
        return None
    try:
        timeout = float(value)
    except ValueError:
        raise APIError(400, "the X-Request-Timeout header must be a number of seconds",
                       param="X-Request-Timeout") from None
    if not 0 < timeout <= 86400:
        raise APIError(400, "the X-Request-Timeout header must be between 0 and 86400 seconds",
                       param="X-Request-Timeout")
    return timeout
