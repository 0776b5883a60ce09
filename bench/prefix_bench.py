"""Time to first token with and without prefix reuse: several questions about one long document.

    python bench/prefix_bench.py [--model PATH] [--doc-words 900] [--questions 4]

Each question is a separate request whose prompt is the same document followed by the question; requests run
one after another, as in a conversation about one document. Both settings run in one process.
"""

from __future__ import annotations

import argparse
import random
import time

from model.loading import load
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--doc-words", type=int, default=900)
    parser.add_argument("--questions", type=int, default=4)
    args = parser.parse_args()

    loaded = load(args.model)
    tok = loaded.tokenizer
    rng = random.Random(0)
    words = ["river", "stone", "light", "market", "winter", "engine", "garden", "paper"]
    doc = tok.encode(" ".join(rng.choice(words) for _ in range(args.doc_words)))
    questions = [tok.encode(f"\nQuestion {i}: which word appears most often?") for i in range(args.questions)]
    for enabled in (False, True):
        engine = LLMEngine(loaded, EngineConfig(model=args.model, max_model_len=len(doc) + 64, max_num_seqs=4,
                                                enable_prefix_caching=enabled))
        engine.runner.wait_compiled()  # timed on the compiled step, not beside its compiler
        ttfts = []
        for i, question in enumerate(questions):
            engine.add_request(str(i), doc + question, SamplingParams(temperature=0.0, max_tokens=1))
            start = time.perf_counter()
            while engine.has_work():
                engine.step()
            ttfts.append(time.perf_counter() - start)
        print(f"prefix caching {'on ' if enabled else 'off'}: prompts of {len(doc) + len(questions[0])} tokens, "
              f"time to first token per request (s): {' '.join(f'{t:.2f}' for t in ttfts)}")


if __name__ == "__main__":
    main()
