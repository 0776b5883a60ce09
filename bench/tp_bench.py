"""Tensor parallelism's cost on CPU: the decode step at batch 1 and 16 on one rank and split over N (gloo), and the
collectives a split step runs, timed alone.

    python bench/tp_bench.py [--tp 3] [--model PATH] [--steps 200] [--enforce-eager]

Each configuration runs in its own processes (N ranks started with torchrun's variables), one after another, in
the order 1, N, 1, N: compare the ratios within one run. A split step runs 2 L + 1 all-reduces of [B, hidden]
float32 (the embedding, each layer's attention and feed-forward outputs) and one all-gather of [B, vocab / N]
float32 logits. The default model (9 heads) splits over 3 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16)


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from model.batch import SequenceChunk
    from model.loading import load
    from model.parallel import Shard
    from server.worker.runner import ModelRunner

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    shard = Shard(rank, world)
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    loaded = load(args.model, dtype=torch.bfloat16, quantization="auto", max_seq_len=512, shard=shard)
    model = loaded.model
    runner = ModelRunner(model, max(BATCHES), 16 * 33, 16, 512, "cpu", compile_decode=not args.enforce_eager)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    result = {}
    for batch in BATCHES:
        chunks = [SequenceChunk(i, 128, [100 + i], decode=True, blocks=tuple(range(33 * i, 33 * i + 9)))
                  for i in range(batch)]
        for _ in range(10):
            runner.forward(chunks)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            runner.forward(chunks)
        step = (time.perf_counter() - start) / args.steps
        comm = 0.0
        if world > 1:
            x = torch.zeros(batch, hidden)
            logits = torch.zeros(batch, -(-model.config.vocab_size // world))
            gathered = torch.empty(world * batch, logits.shape[1])
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                for _ in range(2 * layers + 1):
                    dist.all_reduce(x)
                dist.all_gather_single(gathered, logits)
            comm = (time.perf_counter() - start) / args.steps
        result[batch] = {"step_ms": step * 1e3, "collectives_ms": comm * 1e3, "collectives": 2 * layers + 2 if world > 1 else 0}
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args, port: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        base = [sys.executable, __file__, "--rank-main", "--out", str(out), "--steps", str(args.steps)]
        base += ["--model", args.model] if args.model else []
        base += ["--enforce-eager"] if args.enforce_eager else []
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        procs = [subprocess.Popen(base, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(world)]
        if any(p.wait() for p in procs):
            raise SystemExit("a rank failed")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    rows = []
    for i, world in enumerate([1, args.tp, 1, args.tp]):
        result = run(world, args, 29600 + i)
        rows += [(world, int(batch), r) for batch, r in result.items()]
    print(f"{'ranks':>5} {'batch':>5} {'step ms':>8} {'collectives':>11} {'their ms':>8}")
    for world, batch, r in rows:
        print(f"{world:>5} {batch:>5} {r['step_ms']:>8.2f} {r['collectives']:>11} {r['collectives_ms']:>8.2f}")


if __name__ == "__main__":
    main()
