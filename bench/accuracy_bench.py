"""Accuracy of the fast CPU configuration against the float32 reference on the same weights.

    python bench/accuracy_bench.py [--model PATH] [--tokens-per-text 600] [--enforce-eager]

The reference is the model with dense float32 weights (`--dtype float32 --quantization none`), run over each
text in one teacher-forced pass. The fast configuration (bfloat16, `--quantization auto`) is measured on both of
its paths: prompt tokens (one prefill pass) and generated tokens (one compiled decode step per token, as when
serving), both on the packed weights as stored. Pass several GGUF files to `--model` for one table each. Figures: top-1 agreement (the same next token) and mean
KL divergence KL(reference || fast) over every position, per text and overall. The texts are varied and ship
with Python itself or this repository: prose and legal text, Markdown, source code, a chat transcript.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import load
from model.text.chat_template import render_chat
from server.worker.decode.compiled import CompiledDecode

ROOT = Path(__file__).resolve().parent.parent


def python_license() -> str:
    """LICENSE.txt of the Python installation running this script (history in prose, then legal text)."""
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return (lib / "LICENSE.txt").read_text() if (lib / "LICENSE.txt").is_file() else inspect.getdoc(inspect)


def texts(tokenizer) -> dict[str, str]:
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "How do I keep bread fresh for longer?"},
            {"role": "assistant", "content": "Store it in a paper bag at room temperature, away from sunlight. "
             "For more than two days, slice it and freeze it; toast slices straight from the freezer."},
            {"role": "user", "content": "And what about tortillas, or bagels, or a sourdough loaf?"}]
    return {
        "Python's history and license (prose, legal)": python_license(),
        "README (Markdown, shell, JSON)": (ROOT / "README.md").read_text(),
        "textwrap.py (Python source)": Path(inspect.getfile(textwrap)).read_text(),
        "json module (docstring with examples)": json.__doc__,
        "chat transcript (template)": render_chat(tokenizer.chat_template, chat * 3, bos_token=None,
                                                  eos_token=None, add_generation_prompt=True),
    }


def compare(reference: torch.Tensor, fast: torch.Tensor) -> tuple[int, float]:
    """Matching top-1 choices and the summed KL(reference || fast), over rows of logits [T, vocab]."""
    agree = int((reference.argmax(-1) == fast.argmax(-1)).sum())
    kl = F.kl_div(fast.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum")
    return agree, float(kl)


def prefill_logits(model, config, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    cache = KVCache(config, 1, len(ids) + 1, dtype=dtype)
    return model(ForwardBatch.build([SequenceChunk(0, 0, ids, all_logits=True)]), cache).float()


class DecodePath:
    """The fast model's generated-token path: one decode step per token over a cache of its own, compiled once."""

    def __init__(self, model, config, max_len: int, compiled: bool):
        self.model = model
        self.cache = KVCache(config, 1, max_len, dtype=torch.bfloat16)
        self.step = CompiledDecode(model, self.cache, 1, torch.device("cpu")) if compiled else None
        if self.step is not None and not self.step.prepare():
            self.step = None

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's logits: the first token as a prompt, then one decode step per token."""
        rows = [self.model(ForwardBatch.build([SequenceChunk(0, 0, ids[:1])]), self.cache)]
        for position in range(1, len(ids)):
            if self.step is not None:
                rows.append(self.step.run([ids[position]], [position], [(0,)]))
            else:
                chunk = SequenceChunk(0, position, ids[position:position + 1], decode=True)
                rows.append(self.model(ForwardBatch.build([chunk]), self.cache))
        return torch.cat(rows).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=[None], help="model files (default: the embedded model)")
    parser.add_argument("--tokens-per-text", type=int, default=600)
    parser.add_argument("--enforce-eager", action="store_true", help="decode eagerly instead of compiled")
    args = parser.parse_args()
    for source in args.model:
        measure(source, args.tokens_per_text, args.enforce_eager)


def measure(source: str | None, tokens_per_text: int, enforce_eager: bool) -> None:
    reference = load(source, dtype=torch.float32, quantization="none")
    fast = load(source, dtype=torch.bfloat16, quantization="auto")
    decode_path = DecodePath(fast.model, fast.config, tokens_per_text + 1, not enforce_eager)
    print(f"{reference.source}: reference float32 dense; fast bfloat16 with quantization {fast.quantization}, "
          f"decode {'eager' if decode_path.step is None else 'compiled'}")
    totals = {"prompt": [0, 0.0], "decode": [0, 0.0]}
    count = 0
    print(f"{'text':<44} {'tokens':>6} {'prompt top-1':>12} {'prompt KL':>10} {'decode top-1':>12} {'decode KL':>10}")
    for name, text in texts(reference.tokenizer).items():
        ids = reference.tokenizer.encode(text, allow_special=True)[:tokens_per_text]
        start = time.perf_counter()
        ref = prefill_logits(reference.model, reference.config, ids, torch.float32)
        prompt = compare(ref, prefill_logits(fast.model, fast.config, ids, torch.bfloat16))
        decode = compare(ref, decode_path.logits(ids))
        for key, (agree, kl) in (("prompt", prompt), ("decode", decode)):
            totals[key][0] += agree
            totals[key][1] += kl
        count += len(ids)
        print(f"{name:<44} {len(ids):>6} {prompt[0] / len(ids):>12.2%} {prompt[1] / len(ids):>10.5f} "
              f"{decode[0] / len(ids):>12.2%} {decode[1] / len(ids):>10.5f}   ({time.perf_counter() - start:.0f} s)")
    print(f"{'all':<44} {count:>6} {totals['prompt'][0] / count:>12.2%} {totals['prompt'][1] / count:>10.5f} "
          f"{totals['decode'][0] / count:>12.2%} {totals['decode'][1] / count:>10.5f}")


if __name__ == "__main__":
    main()
