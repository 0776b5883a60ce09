"""Per-request limits an operator can lower (`--limit NAME=VALUE`), each refused with a 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from server.engine.exceptions import ParamError


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 8 * 2**20   # request body size (a 413 beyond it)
    n: int = 128                  # samples per prompt
    max_tokens: int = 1 << 30     # tokens a request may ask for; lowered, also what one asking none gets
    stop: int = 16                # stop strings
    stop_length: int = 256        # characters in one stop string
    logit_bias: int = 300         # logit_bias entries
    prompts: int = 128            # prompts in one completions request
    messages: int = 1024          # messages in one chat request

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def parse(cls, items: list[str] | dict | None) -> Limits:
        """`NAME=VALUE` pairs, as given to --limit (or a mapping of names to values, as a preset gives them)."""
        pairs = items.items() if isinstance(items, dict) else (str(item).partition("=")[::2] for item in items or [])
        limits, names = cls(), set(cls.names())
        for name, value in pairs:
            name = str(name).strip().replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown limit {name!r}; choose from {', '.join(sorted(names))}")
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"the limit {name} must be a whole number, got {value!r}") from None
            if number < 1:
                raise ValueError(f"the limit {name} must be at least 1, got {number}")
            limits = replace(limits, **{name: number})
        return limits

    def check(self, body) -> None:
        """The request body's fields within the limits (each checked only where the body has the field)."""
        def over(value: int, limit: int, param: str, what: str) -> None:
            if value > limit:
                raise ParamError(f"{what} is limited to {limit} on this server, got {value}", param)

        over(getattr(body, "n", 1), self.n, "n", "n")
        asked = False
        for param in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = getattr(body, param, None)
            if value is None:
                continue
            asked = asked or param in body.model_fields_set
            if param not in body.model_fields_set:  # a default (completions' 16) is lowered, not refused
                setattr(body, param, min(value, self.max_tokens))
            else:
                over(value, self.max_tokens, param, param)
        if not asked and self.max_tokens < Limits.max_tokens:  # a lowered limit bounds requests that ask nothing
            for param in ("max_tokens", "max_output_tokens"):
                if param in type(body).model_fields and getattr(body, param) is None:
                    setattr(body, param, self.max_tokens)
        stop = getattr(body, "stop", None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        over(len(stops), self.stop, "stop", "the number of stop strings")
        for stop in stops:
            over(len(stop), self.stop_length, "stop", "the length of a stop string")
        over(len(getattr(body, "logit_bias", None) or {}), self.logit_bias, "logit_bias",
             "the number of logit_bias entries")
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            over(len(prompt), self.prompts, "prompt", "the number of prompts")
        messages = getattr(body, "messages", None)
        if messages is not None:
            over(len(messages), self.messages, "messages", "the number of messages")
        items = getattr(body, "input", None)
        if isinstance(items, list):
            over(len(items), self.messages, "input", "the number of input items")
