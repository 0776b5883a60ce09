"""POST /v1/completions: prompts in, text out, as a full response or a stream of server-sent events."""

from __future__ import annotations

from server.engine.exceptions import ParamError
from server.engine.output import RequestOutput, TokenLogprob
from server.openai.constraints import format_spec
from server.openai.errors import APIError
from server.openai.protocol.completions import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                                CompletionResponse)
from server.openai.sampling import sampling_params
from server.openai.serving.base import ChunkWriter, Finished, Prepared, Serving


class CompletionServing(Serving):
    id_prefix = "cmpl-"

    def prepare(self, body: CompletionRequest) -> Prepared:
        """Prompts → token ids, the format → a grammar, the fields → sampling parameters."""
        prompts = self.prompts(body.prompt)
        spec = format_spec(body)
        if body.best_of is not None and body.best_of != body.n:
            raise ParamError("best_of is not supported (only best_of equal to n)", "best_of")
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        return Prepared(prompts, sampling_params(body, body.max_tokens, body.logprobs, prompt_logprobs), spec)

    def prompts(self, prompt) -> list[list[int]]:
        """A string, a list of strings, a list of token ids or a list of such lists, as token id lists."""
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "the prompt is empty", param="prompt")
        out = [self.tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in items]
        for ids in out:
            self.check_prompt(ids)
        return out

    def response(self, body: CompletionRequest, prepared: Prepared, finished: Finished, request_id: str,
                 created: int) -> dict:
        out = []
        n = prepared.params.n
        for index, c in sorted(finished.choices.items()):
            prompt_i = index // n
            text, logprobs = c.text, None
            if body.echo:
                text = self.tokenizer.decode(prepared.prompts[prompt_i]) + text
            if body.logprobs is not None:
                logprobs = CompletionLogprobs()
                if body.echo:
                    self.add_logprobs(logprobs, finished.prompt_logprobs.get(prompt_i, []), prepared.prompts[prompt_i])
                self.add_logprobs(logprobs, c.logprobs, None)
            out.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=self.model_name, choices=out,
                                  usage=finished.usage).model_dump()

    def writer(self, body: CompletionRequest, prepared: Prepared, request_id: str, created: int) -> ChunkWriter:
        return CompletionChunks(self, body, prepared, request_id, created)

    def add_logprobs(self, into: CompletionLogprobs, entries: list[TokenLogprob | None],
                     prompt_ids: list[int] | None) -> None:
        """Logprobs in the completions API's shape: tokens, their logprobs, alternatives and text offsets."""
        offset = (into.text_offset[-1] + len(into.tokens[-1])) if into.tokens else 0
        for i, entry in enumerate(entries):
            token_id = entry.token_id if entry is not None else prompt_ids[i]
            token = self.token_text(token_id)
            into.tokens.append(token)
            into.text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has nothing before it to predict it
                into.token_logprobs.append(None)
                into.top_logprobs.append(None)
                continue
            into.token_logprobs.append(entry.logprob)
            into.top_logprobs.append({self.token_text(t): lp for t, lp in entry.top})


class CompletionChunks(ChunkWriter):
    """A stream's chunks: a response of one choice each; echo and prompt logprobs on a choice's first chunk."""

    chunk_type = CompletionResponse

    def __init__(self, *args):
        super().__init__(*args)
        self.started: set[int] = set()
        self.prompt_logprobs: dict[int, list] = {}  # per prompt; forked samples share their first sample's

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[str]:
        body, prompt = self.body, self.prepared.prompts[prompt_index]
        if out.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(prompt_index, out.prompt_logprobs)
        chunks = []
        for d in out.deltas:
            index = prompt_index * body.n + d.index
            text = d.text
            logprobs = CompletionLogprobs() if body.logprobs is not None else None
            if index not in self.started:
                self.started.add(index)
                if body.echo:
                    text = self.serving.tokenizer.decode(prompt) + text
                    if logprobs is not None:
                        self.serving.add_logprobs(logprobs, self.prompt_logprobs.get(prompt_index, []), prompt)
            if logprobs is not None:
                self.serving.add_logprobs(logprobs, d.logprobs or [], None)
            if not text and not d.finish_reason and logprobs is None:
                continue
            chunks.append(self.chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                        finish_reason=d.finish_reason, stop_reason=d.stop_reason)]))
        return chunks
