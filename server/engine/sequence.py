"""One generated sequence: its tokens, its KV cache blocks, its progress and why it ended."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request with n samples is n sequences; samples after the first fork from the first one's prompt."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int                      # already capped by what is left of the context
    eos_token_ids: frozenset[int]
    parent: Sequence | None = None       # the sample whose prompt KV this one copies
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None              # its row in the sampler's state, held from admission to the end
    block_table: list[int] = field(default_factory=list)  # its KV cache blocks, in token order
    block_uids: list[int] = field(default_factory=list)   # prefix-cache ids of its leading full blocks
    num_computed: int = 0                # tokens whose K/V are in the cache
    num_draft_computed: int = 0          # tokens whose K/V are in a draft model's cache (its proposals' included)
    num_cached_tokens: int | None = None # prompt tokens found in the prefix cache when first admitted
    num_preemptions: int = 0
    num_draft_tokens: int = 0            # speculative proposals verified for it
    num_accepted_tokens: int = 0         # of which accepted
    status: Status = Status.WAITING
    finish_reason: str | None = None     # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None # the stop string or stop token that ended it
    error: BaseException | None = None
    generator: torch.Generator | None = None
    matcher: Any = None                  # its grammar's matcher, when the output is constrained
    prompt_logprobs: list | None = None  # filled while prefilling when params.prompt_logprobs is set
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the rest."""
        p = self.num_prompt
        if start >= p:
            return self.output_ids[start - p:end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()
