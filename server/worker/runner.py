"""Owns the model, the KV cache and the sampler; turns a scheduled batch into one forward pass and samples."""

from __future__ import annotations

import logging
import threading

import torch

from model.batch import ForwardBatch, SequenceChunk, to_device
from model.kv_cache import KVCache
from model.loading import return_freed_memory
from model.llama import Llama
from model.parallel import Shard
from server.engine.config import EngineConfig
from server.engine.output import TokenLogprob
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.speculation import accepted_length
from server.worker import COMPILE_THREAD
from server.worker.cache_budget import cache_layout
from server.worker.decode import decode_rows, prepared_decode_step, time_decode_rows
from server.worker.draft import DraftProposer
from server.worker.grammar_masks import verify_masks
from server.worker.sampler import Sampler, SamplerOutput, SampleRow

log = logging.getLogger(__name__)


class ModelRunner:
    """`parallel`: rank 0's side of a tensor-parallel group (server/worker/parallel.py), to which each step's chunks
    are sent before the forward pass; None on one device and on the other ranks, which call `forward` with what
    rank 0 sent."""

    def __init__(self, model: Llama, num_slots: int, num_blocks: int, block_size: int, max_model_len: int,
                 device: torch.device | str, compile_decode: bool = False, seed: int | None = None,
                 parallel=None, background: bool = False):
        """`background`: compile the decode step on a thread of its own while steps run eagerly (CPU only: the
        compiled step gives the same bits as the eager one, so no output depends on when it took over)."""
        self.model = model
        self.parallel = parallel
        self.draft: DraftProposer | None = None  # a draft model proposing speculative tokens before each step
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        dtype = model.dtype
        self.cache = KVCache(model.layer_config, num_blocks, block_size, dtype=dtype, device=self.device)
        self.sampler = Sampler(num_slots, model.config.vocab_size, self.device, seed=seed)
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %s, %.1f MiB", num_blocks, block_size,
                 self.cache.num_tokens, dtype, self.cache.nbytes / 2**20)
        self.decode_step = None
        self.compiling: threading.Thread | None = None
        if compile_decode and background and self.device.type == "cpu":
            self.compiling = threading.Thread(target=self._prepare_decode_step, args=(num_slots,),
                                              name=COMPILE_THREAD, daemon=True)
            self.compiling.start()
            log.info("compiling the decode step in the background; decoding eagerly (the same outputs) until then")
        elif compile_decode:
            self._prepare_decode_step(num_slots)

    def _prepare_decode_step(self, num_slots: int) -> None:
        step = prepared_decode_step(self.model, self.cache, num_slots, self.max_model_len, self.device)
        return_freed_memory()  # what compiling freed (its graphs and buffers) back to the OS
        self.decode_step = step  # read once per step by forward(): the next step's decode rows run compiled

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for a decode step compiling in the background; whether the runner has a compiled step."""
        if self.compiling is not None:
            self.compiling.join(timeout)
        return self.decode_step is not None

    @classmethod
    def from_config(cls, model: Llama, config: EngineConfig, parallel=None, shard: Shard = Shard(),
                    draft_model: Llama | None = None) -> ModelRunner:
        """The runner the flags describe: the KV cache sized by them (the same block count on every rank, and in a
        draft model's cache)."""
        num_blocks, max_model_len = cache_layout(config, model, shard, draft_model)
        # Speculation's budget times the compiled step, a draft's step is compiled beside it and a split model's
        # ranks must agree: those compile before serving.
        background = (config.compile_in_background and config.speculation is None
                      and config.tensor_parallel_size == 1)
        runner = cls(model, config.max_num_seqs, num_blocks, config.block_size, max_model_len, config.device,
                     compile_decode=not config.enforce_eager, seed=config.seed, parallel=parallel,
                     background=background)
        if draft_model is not None:  # after the target's decode step, beside which the draft's is prepared
            runner.draft = DraftProposer(draft_model, num_blocks, config.block_size, config.max_num_seqs,
                                         max_model_len, config.max_num_batched_tokens, torch.device(config.device),
                                         compile_decode=not config.enforce_eager)
        return runner

    def decode_seconds(self, max_rows: int) -> list[float]:
        """A decode step's measured seconds by its rows, 1 .. max_rows (speculation's budget): before any request."""
        def run(rows):
            decode_rows(self.model, self.cache, self.decode_step, rows, self.device)
        return time_decode_rows(run, self.cache, max_rows, min(self.model.max_seq_len, self.max_model_len))

    def start_sequence(self, seq: Sequence) -> None:
        seq.generator = self.sampler.start_sequence(seq.slot, seq.prompt_ids, seq.params, seq.index)

    def execute(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Run the batch; return the samples of the chunks that end their sequence (in chunk order)."""
        if self.draft is not None:
            self.draft.propose(batch)
        chunks = []
        for c in batch.chunks:
            blocks = tuple(c.seq.block_table)
            if c.proposed:  # the newest token and its proposals: one decode row each, at successive positions
                chunks += [SequenceChunk(c.seq.slot, c.start + j, [t], decode=True, blocks=blocks)
                           for j, t in enumerate(c.token_ids)]
            else:
                chunks.append(SequenceChunk(c.seq.slot, c.start, c.token_ids,
                                            all_logits=self._wants_prompt_logprobs(c), decode=c.decode,
                                            blocks=blocks))
        if self.parallel is None:
            logits = self.forward(chunks)
        else:
            self._check_positions(chunks)  # before the other ranks start: a refused batch leaves them in step
            try:
                self.parallel.begin_step(chunks)
                logits = self.forward(chunks)
            except Exception as e:  # the other ranks may wait in a collective this rank never reaches
                self.parallel.fail(f"a tensor-parallel step failed on rank 0 ({type(e).__name__}: {e})")
                raise RuntimeError(f"the tensor-parallel group failed: {self.parallel.failure}") from e
            self.parallel.end_step()
        return self._sample(batch, chunks, logits)

    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Logits of the chunks' rows that need them, in chunk order (every rank of a split model runs this)."""
        step = self.decode_step  # once: a step compiled in the background may arrive during this one
        if step is None:
            logits = self.model(ForwardBatch.build(chunks, self.device, self.cache.block_size), self.cache)
        else:
            # Decode rows always run the compiled step, with or without prompt chunks beside them (which run
            # eagerly): a generated token's arithmetic never depends on what else is in the batch.
            num_decode = sum(c.decode for c in chunks)  # decode chunks lead
            parts = []
            if num_decode:
                self._check_positions(chunks)
                decode = chunks[:num_decode]
                parts.append(step.run([c.token_ids[0] for c in decode], [c.start for c in decode],
                                      [c.blocks for c in decode]))  # [B, vocab]
            if num_decode < len(chunks):
                prompt = ForwardBatch.build(chunks[num_decode:], self.device, self.cache.block_size)
                parts.append(self.model(prompt, self.cache))  # [M - B, vocab]
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return logits

    def _sample(self, batch: ScheduledBatch, chunks: list[SequenceChunk], logits: torch.Tensor
                ) -> SamplerOutput | None:
        sample_rows, rows, offset, i = [], [], 0, 0  # i: the scheduled chunk's first entry in `chunks`
        verifying = []  # speculative chunks through the sampler: (chunk, its first entry in `rows`, generator state)
        for scheduled in batch.chunks:
            if scheduled.proposed:
                n, seq = 1 + scheduled.proposed, scheduled.seq
                p = seq.params
                if (p.greedy and p.logprobs is None and not p.logit_bias and not p.min_tokens and not p.needs_penalties
                        and seq.matcher is None):
                    # each row's argmax, as the sampler takes it with nothing to apply before
                    scheduled.verified = logits[offset:offset + n].argmax(dim=-1).tolist()
                else:  # each row through the sampler as plain decoding samples that position (see _take_verified)
                    sampled = not p.greedy and seq.generator is not None
                    verifying.append((scheduled, len(rows), seq.generator.get_state() if sampled else None))
                    sample_rows += range(offset, offset + n)
                    masks = ([None] * n if seq.matcher is None else
                             verify_masks(seq.matcher, scheduled.token_ids[1:], self.sampler.vocab_size))
                    proposals = scheduled.token_ids[1:]
                    rows += [SampleRow(seq.slot, seq.params, seq.generator, len(seq.output_ids) + j,
                                       seq.eos_token_ids, masks[j], tuple(proposals[:j]), counted=False)
                             for j in range(n)]
                offset, i = offset + n, i + n
                continue
            chunk, i = chunks[i], i + 1
            n = len(chunk.token_ids) if chunk.all_logits else 1
            if chunk.all_logits:
                self._record_prompt_logprobs(scheduled.seq, chunk, logits[offset:offset + n])
            if scheduled.samples:
                seq = scheduled.seq
                sample_rows.append(offset + n - 1)
                rows.append(SampleRow(seq.slot, seq.params, seq.generator, len(seq.output_ids), seq.eos_token_ids,
                                      seq.matcher))
            offset += n
        if not rows:
            return None
        if sample_rows != list(range(logits.shape[0])):  # else every row samples, in order: no copy
            logits = logits.index_select(0, to_device(sample_rows, self.device))
        with torch.inference_mode():  # the forward's logits are inference tensors, which the sampler updates
            out = self.sampler.sample(logits, rows)
        return self._take_verified(out, verifying) if verifying else out

    def _take_verified(self, out: SamplerOutput, verifying: list) -> SamplerOutput | None:
        """The sampled verify rows' tokens become their chunks' `verified` and leave the output. Row j was sampled
        from its own logits with the noise plain decoding would draw at that position (a seeded sequence draws
        one block from its generator per sampled row), so the tokens the engine emits (the accepted proposals and
        the token after them) are the ones plain decoding would have sampled: a seeded generator is then set back
        to where it would be after drawing for those tokens alone."""
        taken = set()
        for scheduled, first, state in verifying:
            n = 1 + scheduled.proposed
            scheduled.verified = out.token_ids[first:first + n]
            if scheduled.seq.params.logprobs is not None:
                scheduled.verified_logprobs = [TokenLogprob(out.token_ids[j], out.logprobs[j],
                                                            list(zip(out.top_token_ids[j], out.top_logprobs[j])))
                                               for j in range(first, first + n)]
            taken.update(range(first, first + n))
            emitted = accepted_length(scheduled.token_ids[1:], scheduled.verified) + 1
            self.sampler.count(scheduled.seq.slot, scheduled.verified[:emitted])
            if state is not None:
                self.sampler.redraw(scheduled.seq.generator, state, emitted)
        keep = [j for j in range(len(out.token_ids)) if j not in taken]
        if not keep:
            return None
        return SamplerOutput(*([values[j] for j in keep] for values in (out.token_ids, out.logprobs,
                                                                        out.top_token_ids, out.top_logprobs)))

    def _check_positions(self, chunks: list[SequenceChunk]) -> None:
        """What the eager forward checks, for the compiled step (which cannot)."""
        limit = min(self.model.max_seq_len, self.max_model_len)
        if any(c.start + len(c.token_ids) - 1 >= limit for c in chunks):
            raise ValueError(f"a position is beyond the model's or the cache's maximum length ({limit})")

    @staticmethod
    def _wants_prompt_logprobs(chunk) -> bool:
        return chunk.seq.params.prompt_logprobs is not None and chunk.start < chunk.seq.num_prompt

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, chunk: SequenceChunk, logits: torch.Tensor) -> None:
        """Row i predicts the token after position start + i; keep those that are prompt tokens."""
        k = seq.params.prompt_logprobs
        targets = seq.prompt_ids[chunk.start + 1: chunk.end + 1]  # may be one short at the prompt's end
        logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
        top = logprobs.topk(k, dim=-1) if k else None
        chosen = chosen.tolist()
        top_ids, top_vals = (top.indices.tolist(), top.values.tolist()) if top else ([[]] * len(targets),) * 2
        if chunk.start == 0:
            seq.prompt_logprobs = [None]
        for token, lp, ids, vals in zip(targets, chosen, top_ids, top_vals):
            seq.prompt_logprobs.append(TokenLogprob(token, lp, list(zip(ids, vals))))
