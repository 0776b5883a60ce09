"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.exceptions import ParamError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16          # None: up to the end of the context
    temperature: float = 1.0             # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None          # None: none; k: the chosen token's and the top k alternatives'
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: Any = None                  # a compiled grammar (server/structured.py) every sample must follow
    grammar_param: str | None = None     # the request field the grammar came from, for errors
    timeout: float | None = None         # seconds from arrival; None: the server's --request-timeout

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (1 <= self.n <= 128, "n", "n must be between 1 and 128"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "temperature", "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "top_k must be -1 (disabled) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be between 0 and 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             "frequency_penalty must be between -2 and 2"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "repetition_penalty must be in (0, 2]"),
            (all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias",
             "logit_bias values must be between -100 and 100"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}"),
            (len(self.stop) <= 16, "stop", "at most 16 stop sequences"),
            (self.timeout is None or 0 < self.timeout <= 86400, "X-Request-Timeout",
             "the request timeout must be between 0 and 86400 seconds"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise ParamError(message, param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
