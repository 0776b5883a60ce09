"""The engine: `step()` is schedule → run → postprocess. `AsyncEngine` steps it on a thread of its own."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from model.loading import LoadedModel
from model.text.tokenizer import Tokenizer
from server.engine import grammar
from server.engine.block_pool import BlockPool
from server.engine.config import EngineConfig
from server.engine.exceptions import DeadlineExceeded, GrammarViolation, ParamError, PromptTooLong
from server.engine.output import OutputProcessor, RequestMetrics, RequestOutput, SequenceDelta, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence
from server.engine.speculation import SpeculationBudget, SpeculativeConfig, accepted_length
from server.worker.draft import check_draft, load_draft
from server.worker.runner import ModelRunner

log = logging.getLogger(__name__)


UNHEALTHY_AFTER_FAILURES = 3  # failed steps in a row


@dataclass
class EngineStats:
    running: int
    waiting: int
    slots_used: int
    num_slots: int
    tokens_in_cache: int
    cache_capacity_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_hit_tokens: int
    blocks_used: int = 0
    num_blocks: int = 0
    block_size: int = 0
    num_preemptions: int = 0
    prefix_caching: bool = True
    spec_drafts_total: int = 0             # speculative chunks verified
    spec_draft_tokens_total: int = 0       # tokens proposed in them
    spec_accepted_tokens_total: int = 0    # of which accepted
    spec_accepted_per_position: tuple[int, ...] = ()  # accepted at proposal position 0, 1, ...


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    seqs: list[Sequence]
    processors: dict[int, OutputProcessor]
    deadline: float | None = None  # time.monotonic() by which it must finish


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, parallel=None, draft: LoadedModel | None = None):
        """`parallel`: rank 0's side of a tensor-parallel group (server/worker/parallel.py), when the model is split.
        `draft`: the draft model of a `draft_model` speculative config, loaded from its `model` when not given."""
        self.config = config
        # Tests only: called with each batch before it runs, to make a step fail on purpose. Never set otherwise.
        self.fault_injector = None
        self.consecutive_failures = 0
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        speculation = config.speculation
        if speculation is not None and speculation.method == "draft_model":
            if draft is None:
                draft = load_draft(speculation.model, config, loaded)
            else:
                check_draft(draft, loaded)
        self.runner = ModelRunner.from_config(loaded.model, config, parallel=parallel, shard=loaded.model.shard,
                                              draft_model=draft.model if draft is not None else None)
        self.max_model_len = self.runner.max_model_len
        num_blocks = self.runner.cache.num_blocks
        budget = None
        if speculation is not None:  # the decode step holds at most max_num_seqs rows, proposals included
            speculation = dataclasses.replace(speculation, max_rows=min(speculation.max_rows, config.max_num_seqs))
            log.info("speculative decoding: %s", speculation)
            budget = self._speculation_budget(speculation, parallel)
        self.scheduler = Scheduler(config.max_num_seqs, BlockPool(num_blocks, config.block_size),
                                   config.max_num_batched_tokens, config.max_waiting,
                                   prefix_caching=config.enable_prefix_caching,
                                   max_waiting_tokens=config.max_waiting_tokens, speculation=speculation,
                                   max_model_len=self.max_model_len, budget=budget)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_drafts_total = self.spec_draft_tokens_total = self.spec_accepted_tokens_total = 0
        self.spec_accepted_per_position = [0] * (speculation.num_speculative_tokens if speculation else 0)

    def _speculation_budget(self, speculation: SpeculativeConfig, parallel) -> SpeculationBudget:
        """Proposal rows per step from the decode step's (and the draft's) measured cost; a split model's steps
        cannot be timed here alone (every rank runs them), so there proposals fill up to max_rows."""
        if parallel is not None:
            return SpeculationBudget(speculation)
        step = self.runner.decode_seconds(speculation.max_rows)
        draft = self.runner.draft.decode_seconds(speculation.max_rows) if self.runner.draft is not None else None
        log.info("speculation's budget: a decode step of 1 / %d rows takes %.2f / %.2f ms%s", len(step),
                 step[0] * 1e3, step[-1] * 1e3, "" if draft is None else
                 f", a draft step of 1 / {len(draft)} rows {draft[0] * 1e3:.2f} / {draft[-1] * 1e3:.2f} ms")
        return SpeculationBudget(speculation, step, draft)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Refuse a prompt the engine cannot run; reads only constants, so any thread may call it."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ParamError("the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ParamError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {len(prompt_ids)} tokens, leaving no room to generate", "prompt")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt_ids)
        vocab = self.model_config.vocab_size
        for param, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise ParamError(f"{param} token ids must be in [0, {vocab})", param)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = self.tokenizer.eos_token_ids
        seqs = [Sequence(request_id, i, list(prompt_ids), params, max_tokens, eos) for i in range(params.n)]
        if params.grammar is not None:  # one matcher per sample, so that n > 1 samples differ freely
            for seq in seqs:
                seq.matcher = grammar.matcher(params.grammar)
        for child in seqs[1:]:
            child.parent = seqs[0]
        self.scheduler.add(seqs)  # raises EngineOverloaded when the queue is full
        processors = {s.index: OutputProcessor(self.tokenizer, params, eos) for s in seqs}
        timeout = params.timeout if params.timeout is not None else self.config.request_timeout
        deadline = None if timeout is None else seqs[0].arrival_time + timeout
        self.requests[request_id] = _Request(request_id, list(prompt_ids), seqs, processors, deadline)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("abort")
            self.scheduler.free(seq)
        return self._final_output(request, [])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        expired = self._expire()
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return expired
        try:
            if self.fault_injector is not None:
                self.fault_injector(batch)
            for seq in batch.admitted:
                self.runner.start_sequence(seq)
            samples = self.runner.execute(batch)
        except Exception as e:  # the whole batch failed: fail its requests, keep serving others
            log.exception("forward pass failed; failing %d request(s)", len(batch.chunks))
            self.consecutive_failures += 1
            return expired + [self._fail(rid, e) for rid in {c.seq.request_id for c in batch.chunks}]
        self.consecutive_failures = 0
        budget = self.scheduler.budget
        if budget is not None and not any(c.proposed for c in batch.chunks) and any(c.decode for c in batch.chunks):
            budget.no_proposals()
        return expired + self._postprocess(batch, samples)

    @property
    def healthy(self) -> bool:
        """False once several steps in a row have failed: the engine is not recovering by itself, and an
        orchestrator should restart the process (/health answers 503)."""
        parallel = self.runner.parallel
        return self.consecutive_failures < UNHEALTHY_AFTER_FAILURES and (parallel is None or parallel.failure is None)

    def idle(self) -> None:
        """Called by the engine's thread while there is no work: a split model's heartbeat to its workers."""
        if self.runner.parallel is not None:
            self.runner.parallel.heartbeat()

    def close(self) -> None:
        """Called by the engine's thread as it stops: a split model's workers stop too."""
        if self.runner.parallel is not None:
            self.runner.parallel.close()

    def _expire(self) -> list[RequestOutput]:
        """Fail the requests past their deadline, freeing their cache blocks before anything is scheduled."""
        now = time.monotonic()
        late = [r for r in self.requests.values() if r.deadline is not None and now >= r.deadline]
        return [self._fail(r.request_id, DeadlineExceeded(
            f"the request ran past its deadline of {r.deadline - min(s.arrival_time for s in r.seqs):g} s "
            f"(--request-timeout or the X-Request-Timeout header)")) for r in late]

    def _postprocess(self, batch: ScheduledBatch, samples) -> list[RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        now = time.monotonic()
        sample_index = 0
        for chunk in batch.chunks:
            seq = chunk.seq
            if chunk.proposed:
                self._accept(chunk, outputs, now)
                continue
            self.scheduler.computed(seq, len(chunk.token_ids))
            if chunk.start < seq.num_prompt and not seq.num_preemptions:  # recomputation is not new prompt
                self.prompt_tokens_total += min(seq.num_prompt, chunk.start + len(chunk.token_ids)) - chunk.start
            if not chunk.samples:
                continue
            j, sample_index = sample_index, sample_index + 1
            request = self.requests.get(seq.request_id)
            if request is None or seq.finished:
                continue
            try:
                logprobs = None
                if seq.params.logprobs is not None:
                    top = list(zip(samples.top_token_ids[j], samples.top_logprobs[j]))
                    logprobs = [TokenLogprob(samples.token_ids[j], samples.logprobs[j], top)]
                delta = self._append_token(request, seq, samples.token_ids[j], logprobs, now)
            except GrammarViolation as e:  # the request's own constraints conflict: its error, not ours
                log.info("request %s ended: %s", seq.request_id, e)
                outputs[seq.request_id] = self._fail(seq.request_id, e)
                continue
            except Exception as e:  # a failure in one request's output handling fails that request alone
                log.exception("request %s failed", seq.request_id)
                outputs[seq.request_id] = self._fail(seq.request_id, e)
                continue
            out = outputs.setdefault(seq.request_id, RequestOutput(seq.request_id, request.prompt_ids))
            out.deltas.append(delta)
            if seq.prompt_logprobs is not None and len(seq.output_ids) == 1:
                out.prompt_logprobs = seq.prompt_logprobs
        for request_id, out in outputs.items():
            request = self.requests.get(request_id)
            if request is not None and all(s.finished for s in request.seqs):
                del self.requests[request_id]
                final = self._final_output(request, out.deltas)
                final.prompt_logprobs = out.prompt_logprobs
                outputs[request_id] = final
        return list(outputs.values())

    def _accept(self, chunk, outputs: dict[str, RequestOutput], now: float) -> None:
        """A verified speculative chunk: the longest prefix of proposals equal to the rows' greedy tokens, plus the
        greedy token after it, appended one by one as plain decoding would (stop strings, stop tokens and
        max_tokens end it where they would); the cache keeps the K/V of the newest token and accepted proposals."""
        seq, targets, proposals = chunk.seq, chunk.verified, chunk.token_ids[1:]
        accepted = accepted_length(proposals, targets)
        self.scheduler.budget.verified(len(proposals), accepted)
        self.spec_drafts_total += 1
        self.spec_draft_tokens_total += len(proposals)
        self.spec_accepted_tokens_total += accepted
        seq.num_draft_tokens += len(proposals)
        seq.num_accepted_tokens += accepted
        for i in range(accepted):
            self.spec_accepted_per_position[i] += 1
        request = self.requests.get(seq.request_id)
        if request is None or seq.finished:
            return
        deltas = []
        try:
            for j, token in enumerate(targets[:accepted + 1]):
                logprobs = None if chunk.verified_logprobs is None else [chunk.verified_logprobs[j]]
                deltas.append(self._append_token(request, seq, token, logprobs, now))
                if seq.finished:
                    break
        except Exception as e:  # as for one token (no grammar here, so no GrammarViolation)
            log.exception("request %s failed", seq.request_id)
            outputs[seq.request_id] = self._fail(seq.request_id, e)
            return
        if not seq.finished:
            self.scheduler.computed(seq, 1 + accepted)
        out = outputs.setdefault(seq.request_id, RequestOutput(seq.request_id, request.prompt_ids))
        logprobs = None if chunk.verified_logprobs is None else [lp for d in deltas for lp in d.logprobs]
        out.deltas.append(SequenceDelta(seq.index, "".join(d.text for d in deltas),
                                        [t for d in deltas for t in d.token_ids], logprobs, deltas[-1].finish_reason,
                                        deltas[-1].stop_reason))

    def _append_token(self, request: _Request, seq: Sequence, token: int, logprobs: list[TokenLogprob] | None,
                      now: float) -> SequenceDelta:
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise GrammarViolation(f"the output constraint allows no token after {len(seq.output_ids)} generated "
                                   "tokens (min_tokens may conflict with it)", seq.params.grammar_param)
        seq.output_ids.append(token)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        text, finish, stop = request.processors[seq.index].append(token, len(seq.output_ids), seq.max_tokens)
        if finish is None and seq.matcher is not None and seq.matcher.is_terminated():
            raise GrammarViolation("the output constraint is complete but the request asks for more tokens "
                                   "(min_tokens may conflict with it)", seq.params.grammar_param)
        if finish is not None:
            seq.finish(finish, stop)
            self.scheduler.free(seq)
        return SequenceDelta(seq.index, text, [token], logprobs, finish, stop)

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        request = self.requests.pop(request_id, None)
        if request is None:
            return RequestOutput(request_id, [], finished=True, error=error)
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("error")
                seq.error = error
            self.scheduler.free(seq)
        out = self._final_output(request, [])
        out.error = error
        return out

    @staticmethod
    def _final_output(request: _Request, deltas: list[SequenceDelta]) -> RequestOutput:
        seqs = request.seqs
        metrics = RequestMetrics(
            arrival_time=min(s.arrival_time for s in seqs),
            first_token_time=min((s.first_token_time for s in seqs if s.first_token_time), default=None),
            finish_time=max((s.finish_time for s in seqs if s.finish_time), default=None),
            num_prompt_tokens=len(request.prompt_ids),
            num_generated_tokens=sum(len(s.output_ids) for s in seqs),
            num_cached_tokens=seqs[0].num_cached_tokens or 0,
            num_draft_tokens=sum(s.num_draft_tokens for s in seqs),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in seqs),
        )
        return RequestOutput(request.request_id, request.prompt_ids, deltas, finished=True, metrics=metrics)

    def stats(self) -> EngineStats:
        running, blocks = self.scheduler.running, self.scheduler.blocks
        return EngineStats(
            running=len(running),
            waiting=len(self.scheduler.waiting),
            slots_used=self.scheduler.num_slots - self.scheduler.num_free_slots,
            num_slots=self.scheduler.num_slots,
            tokens_in_cache=sum(s.num_computed for s in running),
            cache_capacity_tokens=blocks.num_blocks * blocks.block_size,
            blocks_used=blocks.num_used,
            num_blocks=blocks.num_blocks,
            block_size=blocks.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            prefix_caching=self.config.enable_prefix_caching,
            spec_drafts_total=self.spec_drafts_total,
            spec_draft_tokens_total=self.spec_draft_tokens_total,
            spec_accepted_tokens_total=self.spec_accepted_tokens_total,
            spec_accepted_per_position=tuple(self.spec_accepted_per_position),
        )
