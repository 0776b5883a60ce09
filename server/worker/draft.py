"""Draft-model proposals for speculative decoding (server/engine/speculation.py): a smaller model with the target's
vocabulary proposes its greedy tokens, batched over the sequences that speculate this step, just before the step
verifies them.

Its KV cache has as many blocks as the target's and is read through the same block tables, so the scheduler's
blocks (prefix caching, preemption, freeing) serve both models. The draft's K/V only ever shape proposals, never
outputs (each proposal is verified by the target), so it is kept lazily: a sequence records how many of its
tokens the draft has computed (`Sequence.num_draft_computed`, reset when the sequence loses its blocks), and a
step first computes what the draft has not seen — a new sequence's prompt (prompt-sized chunks, eagerly), the
last proposal after a run of k accepted ones (a decode row) — then runs the newest token and each proposal as
one decode row per sequence, through the draft's own prepared decode step. Of the rows a step wrote, those past
the tokens the target accepted are overwritten later, as the target's own rejected rows are.
"""

from __future__ import annotations

import logging

import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.llama import Llama
from model.loading import LoadedModel
from server.engine.config import EngineConfig
from server.engine.scheduler import ScheduledBatch, ScheduledChunk
from server.worker.decode import decode_rows, prepared_decode_step, time_decode_rows

log = logging.getLogger(__name__)


class DraftProposer:
    def __init__(self, model: Llama, num_blocks: int, block_size: int, max_batch: int, max_model_len: int,
                 max_num_batched_tokens: int, device: torch.device, compile_decode: bool):
        self.model = model
        self.device = device
        self.max_batch = max_batch
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_len = min(model.max_seq_len, max_model_len)
        self.cache = KVCache(model.layer_config, num_blocks, block_size, dtype=model.dtype, device=device)
        log.info("draft model's KV cache: %d blocks x %d tokens, %s, %.1f MiB", num_blocks, block_size, model.dtype,
                 self.cache.nbytes / 2**20)
        self.decode_step = None
        if compile_decode:
            # after the target's step, which stays in use beside it
            self.decode_step = prepared_decode_step(model, self.cache, max_batch, max_model_len, device, beside=True)

    def decode_seconds(self, max_rows: int) -> list[float]:
        """A draft decode step's measured seconds by its rows, 1 .. max_rows (speculation's budget)."""
        return time_decode_rows(self._decode, self.cache, max_rows, self.max_len)

    def propose(self, batch: ScheduledBatch) -> None:
        """Each chunk with `drafts` to make gets that many proposals after its newest token (in `token_ids`,
        counted in `proposed`)."""
        chunks = [c for c in batch.chunks if c.drafts]
        if not chunks:
            return
        rows = self._catch_up(chunks)  # decode rows of generated tokens the draft has not computed yet
        drafted: list[list[int]] = [[] for _ in chunks]
        for j in range(max(c.drafts for c in chunks)):
            active = [i for i, c in enumerate(chunks) if c.drafts > j]
            ends = []  # each active sequence's row whose choice is its next proposal
            for i in active:
                c = chunks[i]
                rows.append((c.token_ids[0] if j == 0 else drafted[i][-1], c.start + j, tuple(c.seq.block_table)))
                ends.append(len(rows) - 1)
            choices = self._decode(rows)
            for i, row in zip(active, ends):
                drafted[i].append(choices[row])
            rows = []
        for c, proposals in zip(chunks, drafted):
            c.token_ids = c.token_ids + proposals
            c.proposed = len(proposals)
            c.seq.num_draft_computed = c.start + len(proposals)  # its K/V rows: the newest token and proposals[:-1]

    def _catch_up(self, chunks: list[ScheduledChunk]) -> list[tuple[int, int, tuple[int, ...]]]:
        """Compute the prompt tokens the draft has not seen (prompt-sized forward passes), and return the generated
        ones as decode rows (token, position, blocks) to run before the newest tokens'."""
        pending, rows = [], []
        for c in chunks:
            seq = c.seq
            done = min(seq.num_draft_computed, c.start)
            blocks = tuple(seq.block_table)
            if done < seq.num_prompt:
                end = min(c.start, seq.num_prompt)
                pending.append(SequenceChunk(seq.slot, done, seq.tokens(done, end), decode=False, blocks=blocks))
                done = end
            rows += [(token, done + i, blocks) for i, token in enumerate(seq.tokens(done, c.start))]
        while pending:  # at most max_num_batched_tokens a pass, as the target's prefill
            budget, step, rest = self.max_num_batched_tokens, [], []
            for p in pending:
                n = min(budget, len(p.token_ids))
                if n:
                    step.append(SequenceChunk(p.slot, p.start, p.token_ids[:n], decode=False, blocks=p.blocks))
                    budget -= n
                if n < len(p.token_ids):
                    rest.append(SequenceChunk(p.slot, p.start + n, p.token_ids[n:], decode=False, blocks=p.blocks))
            self.model(ForwardBatch.build(step, self.device, self.cache.block_size), self.cache)
            pending = rest
        return rows

    def _decode(self, rows: list[tuple[int, int, tuple[int, ...]]]) -> list[int]:
        """The draft's greedy choice after each decode row, rows of one sequence at successive positions included
        (the attention op writes every row's K/V before any row attends)."""
        choices = []
        for i in range(0, len(rows), self.max_batch):
            logits = decode_rows(self.model, self.cache, self.decode_step, rows[i:i + self.max_batch], self.device)
            choices += logits.argmax(dim=-1).tolist()
        return choices


# Texts both tokenizers must cut into the same ids: words, code, digits, whitespace runs and non-Latin scripts.
PROBES = ("The quick brown fox jumps over the lazy dog. 1234567890",
          "def f(x):\n\treturn {'a': [x, -3.5e7]}  # ok\n\n",
          "Grüße, ça va? Привет, мир! 東京は晴れです。 مرحبا 🙂")


def check_draft(draft: LoadedModel, target: LoadedModel) -> None:
    """Refuse a draft whose token ids mean something else than the target's: another vocabulary size, or a
    tokenizer that cuts the same text differently."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model {draft.source} has a vocabulary of {draft.config.vocab_size} tokens, the "
                         f"target {target.source} {target.config.vocab_size}: a draft must share the target's "
                         "vocabulary")
    for text in PROBES:
        if draft.tokenizer.encode(text) != target.tokenizer.encode(text):
            raise ValueError(f"the draft model {draft.source} tokenizes text differently from the target "
                             f"{target.source} (e.g. {text!r}): a draft must share the target's vocabulary")


def load_draft(source: str, config: EngineConfig, target: LoadedModel) -> LoadedModel:
    """The draft model of `--speculative-config`, loaded as the target is (device, dtype, quantization) and checked
    against it."""
    from model.loading import load

    draft = load(source, device=config.device, dtype=config.torch_dtype, max_seq_len=config.max_model_len,
                 quantization=config.quantization)
    check_draft(draft, target)
    log.info("draft model %s loaded (%.0fM parameters, quantization %s) in %.2f s", draft.source,
             draft.config.num_params / 1e6, draft.quantization, draft.load_seconds)
    return draft
