"""Turning sampled tokens into text: incremental detokenisation, stop conditions, and the deltas callers see.

Streaming and non-streaming responses are both built from these deltas, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.text.detokenizer import IncrementalDetokenizer
from model.text.tokenizer import Tokenizer
from server.engine.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, most likely first


@dataclass
class SequenceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int = 0   # prompt tokens whose K/V came from the prefix cache
    num_draft_tokens: int = 0    # speculative proposals verified (every sample's)
    num_accepted_tokens: int = 0  # of which accepted

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.first_token_time is None or self.finish_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    deltas: list[SequenceDelta] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first token has none
    finished: bool = False
    error: BaseException | None = None
    metrics: RequestMetrics | None = None  # on the final output


class OutputProcessor:
    """Per sequence: detokenise, watch for EOS, stop tokens and stop strings, and hold back only the text
    that could still turn out to be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_ids: frozenset[int]):
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.text = ""          # everything decoded so far
        self.emitted = 0        # characters of `text` already handed out

    def append(self, token_id: int, num_generated: int, max_tokens: int) -> tuple[str, str | None, str | int | None]:
        """Take one sampled token; return (text delta, finish reason or None, stop reason)."""
        if token_id in self.stop_token_ids:
            return self._flush(), "stop", token_id
        if token_id in self.eos_token_ids:
            return self._flush(), "stop", None
        self.text += self.detokenizer.feed(token_id)
        if self.params.stop:
            found = self._find_stop()
            if found is not None:
                at, stop = found
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                delta = self.text[self.emitted:end]
                self.emitted = len(self.text)
                return delta, "stop", stop
        if num_generated >= max_tokens:
            return self._flush(), "length", None
        keep = len(self.text) - self._held_back()
        delta = self.text[self.emitted:keep]
        self.emitted = max(self.emitted, keep)
        return delta, None, None

    def _find_stop(self) -> tuple[int, str] | None:
        # A stop string never starts inside emitted text (it would have been held back), so search from there.
        best = None
        for stop in self.params.stop:
            at = self.text.find(stop, self.emitted)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the un-emitted text that is a proper prefix of a stop string."""
        pending = len(self.text) - self.emitted
        longest = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, pending), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _flush(self) -> str:
        self.text += self.detokenizer.flush()
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
