"""POST /v1/completions: prompts in, text out, as a full response or a stream of server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.errors import APIError
from server.output import TokenLogprob
from server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage,
                             new_id, now)
from server.serving import Serving, sse


class CompletionServing(Serving):
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

    async def create(self, body: CompletionRequest, raw: Request):
        self.check_model(body.model)
        params = body.to_sampling_params()
        self.request_timeout(params, raw)
        prompts = self.prompts(body.prompt)
        await self.constrain(params, body.grammar_spec())
        request_id, created = new_id("cmpl"), now()
        stream = self.run(prompts, params, request_id)
        if body.stream:
            stream = await self.first_then_rest(stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(body, prompts, stream, request_id, created, include_usage),
                                     media_type="text/event-stream")
        choices, prompt_logprobs = await self.collect(raw, stream, params.n)
        out = []
        for index in sorted(choices):
            c = choices[index]
            prompt_i = index // params.n
            text, logprobs = c.text, None
            if body.echo:
                text = self.echo_text(prompts[prompt_i]) + text
            if body.logprobs is not None:
                logprobs = CompletionLogprobs()
                if body.echo:
                    self._add_logprobs(logprobs, prompt_logprobs.get(prompt_i, []), prompts[prompt_i])
                self._add_logprobs(logprobs, c.logprobs, None)
            out.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        prompt_tokens = sum(len(p) for p in prompts)
        response = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=out,
                                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))
        return JSONResponse(response.model_dump())

    def echo_text(self, prompt_ids: list[int]) -> str:
        return self.tokenizer.decode(prompt_ids)

    def _add_logprobs(self, into: CompletionLogprobs, entries: list[TokenLogprob | None],
                      prompt_ids: list[int] | None) -> None:
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

    async def _events(self, body: CompletionRequest, prompts: list[list[int]], stream: AsyncIterator,
                      request_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        n = body.n
        started: set[int] = set()
        prompt_logprobs: dict[int, list] = {}  # per prompt; forked samples share their first sample's
        completion_tokens = 0
        try:
            async for prompt_i, out in stream:
                if out.prompt_logprobs is not None:
                    prompt_logprobs.setdefault(prompt_i, out.prompt_logprobs)
                for d in out.deltas:
                    index = prompt_i * n + d.index
                    completion_tokens += len(d.token_ids)
                    text, logprobs = d.text, None
                    if body.logprobs is not None:
                        logprobs = CompletionLogprobs()
                    if index not in started:
                        started.add(index)
                        if body.echo:
                            text = self.echo_text(prompts[prompt_i]) + text
                            if logprobs is not None:
                                self._add_logprobs(logprobs, prompt_logprobs.get(prompt_i, []), prompts[prompt_i])
                    if logprobs is not None:
                        self._add_logprobs(logprobs, d.logprobs or [], None)
                    if not text and not d.finish_reason and logprobs is None:
                        continue
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=d.finish_reason, stop_reason=d.stop_reason)
                    chunk = CompletionResponse(id=request_id, created=created, model=self.model_name,
                                               choices=[choice])
                    yield sse(chunk.model_dump(exclude={"usage"} if not include_usage else set()))
            if include_usage:
                prompt_tokens = sum(len(p) for p in prompts)
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)
                chunk = CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                           usage=usage)
                yield sse(chunk.model_dump())
        except Exception as e:  # headers are gone: report in-band, as OpenAI-compatible servers do
            yield self.error_event(e)
        yield sse("[DONE]")
