"""The block pool and the scheduler on blocks, without a model: allocation, reference counts, the prefix cache
(collisions included), eviction order, preemption and resumption."""

import pytest

from server.engine.block_pool import ROOT, BlockPool
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, Status


def test_allocation_and_release_count_holders():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted([a, b, c]) == [0, 1, 2] and pool.num_available == 0 and pool.num_used == 3
    with pytest.raises(RuntimeError, match="no KV cache block"):
        pool.allocate()
    pool.release(b)
    assert pool.num_available == 1 and pool.allocate() == b
    pool.release(a)
    with pytest.raises(RuntimeError, match="more often"):
        pool.release(a)


def test_a_cached_block_is_shared_by_reference_and_freed_by_the_last_holder():
    pool = BlockPool(4, 2)
    block = pool.allocate()
    uid = pool.register(block, ROOT, [5, 6])
    [hit] = pool.lookup([5, 6, 7], max_blocks=4)
    assert (hit.block, hit.uid) == (block, uid)
    pool.acquire(block)  # a second sequence maps it
    assert pool.holders(block) == 2
    pool.release(block)
    assert pool.num_used == 1  # still held by one
    pool.release(block)
    assert pool.num_used == 0 and pool.num_available == 4
    assert pool.lookup([5, 6], 1)[0].block == block  # unheld but still cached
    pool.acquire(block)  # a hit on an unheld cached block takes it out of the evictable set
    assert pool.num_available == 3 and pool.holders(block) == 1


def test_blocks_match_only_with_everything_before_them():
    pool = BlockPool(8, 2)
    first, second = pool.allocate(), pool.allocate()
    u1 = pool.register(first, ROOT, [1, 2])
    pool.register(second, u1, [3, 4])
    assert [e.block for e in pool.lookup([1, 2, 3, 4], 8)] == [first, second]
    assert pool.lookup([9, 9, 3, 4], 8) == []  # same second block, different prefix
    assert [e.block for e in pool.lookup([1, 2, 3, 5], 8)] == [first]
    assert len(pool.lookup([1, 2, 3, 4], 1)) == 1  # at most max_blocks


def test_hash_collisions_are_misses_not_wrong_blocks():
    pool = BlockPool(8, 2, hash_fn=lambda key: 42)  # every key in one bucket
    a, b = pool.allocate(), pool.allocate()
    ua = pool.register(a, ROOT, [1, 2])
    ub = pool.register(b, ROOT, [3, 4])
    assert ua != ub
    assert pool.lookup([1, 2], 1)[0].block == a and pool.lookup([3, 4], 1)[0].block == b
    assert pool.lookup([5, 6], 1) == []
    c = pool.allocate()
    pool.register(c, ua, [3, 4])  # the same tokens after a different block: another entry
    assert [e.block for e in pool.lookup([1, 2, 3, 4], 2)] == [a, c]


def test_an_equal_block_is_not_cached_twice():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    ua = pool.register(a, ROOT, [1, 2])
    assert pool.register(b, ROOT, [1, 2]) == ua  # b stays unregistered and its successor names a
    pool.release(b)
    assert pool.num_cached == 1 and pool.lookup([1, 2], 1)[0].block == a


def test_eviction_takes_free_blocks_first_then_the_least_recently_released():
    pool = BlockPool(3, 2)
    blocks = [pool.allocate() for _ in range(3)]
    for i, block in enumerate(blocks):
        pool.register(block, ROOT, [i, i])
    pool.release(blocks[1])
    pool.release(blocks[0])
    pool.release(blocks[2])
    assert pool.allocate() == blocks[1]  # released first, evicted first
    assert pool.lookup([1, 1], 1) == []  # and forgotten
    assert pool.lookup([0, 0], 1)[0].block == blocks[0]
    plain = BlockPool(2, 2)
    x, y = plain.allocate(), plain.allocate()
    plain.register(x, ROOT, [7, 7])
    plain.release(x)
    plain.release(y)
    assert plain.allocate() == y  # a block holding nothing cached goes before a cached one


def sequence(rid: str, prompt: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(rid, 0, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), max_tokens, frozenset())


def step(scheduler: Scheduler, sampled: int = 1):
    """One scheduled step, as the engine runs it: tokens computed, and a token appended where one is sampled."""
    batch = scheduler.schedule()
    for chunk in batch.chunks:
        scheduler.computed(chunk.seq, len(chunk.token_ids))
        if chunk.samples:
            chunk.seq.output_ids.append(sampled)
    return batch


def test_a_decode_without_blocks_preempts_the_newest_which_resumes_by_replaying():
    scheduler = Scheduler(4, BlockPool(4, 4), max_num_batched_tokens=64, max_waiting=10)
    old, new = sequence("old", list(range(1, 8))), sequence("new", list(range(11, 18)))
    scheduler.add([old, new])
    step(scheduler)  # both prefill 7 tokens: 2 blocks each, the pool is full
    assert scheduler.blocks.num_available == 0
    step(scheduler)  # both decode position 7, still in their second block
    batch = step(scheduler)  # old needs a third block for position 8: the newest is preempted
    assert batch.preempted == [new] and new.status is Status.WAITING and scheduler.waiting[0] is new
    assert [c.seq for c in batch.chunks] == [old] and new.num_computed == 0 and not new.block_table
    assert new.slot is not None  # it keeps its sampler row
    outputs_before = list(new.output_ids)
    scheduler.free(old)
    old.status = Status.FINISHED
    batch = step(scheduler)  # resumed: its prompt's full block is cached, the rest of the prompt prefills
    assert [c.seq for c in batch.chunks] == [new] and batch.chunks[0].start == 4
    assert batch.chunks[0].token_ids == new.prompt_ids[4:] and not batch.chunks[0].samples
    replays = []
    while not replays or not replays[-1][2]:  # then each generated token again, one per step, as a decode
        [chunk] = step(scheduler).chunks
        replays.append((chunk.decode, chunk.token_ids, chunk.samples))
    assert replays[:-1] == [(True, [t], False) for t in outputs_before[:-1]]
    assert replays[-1] == (True, outputs_before[-1:], True)  # the last one samples the next token
    assert scheduler.num_preemptions == 1


def test_sequences_that_cannot_all_fit_take_turns_rather_than_stall():
    """Two sequences of 12 prompt + 4 output tokens, a pool of 16 tokens: each step runs something, and both
    finish (one at a time, through preemption)."""
    scheduler = Scheduler(4, BlockPool(4, 4), max_num_batched_tokens=8, max_waiting=10)
    a, b = sequence("a", list(range(1, 13))), sequence("b", list(range(21, 33)))
    scheduler.add([a, b])
    for _ in range(40):
        if not scheduler.has_work():
            break
        batch = step(scheduler)
        assert batch.chunks, "a step with nothing to run"
        assert scheduler.blocks.num_used <= 4
        for s in (a, b):
            if len(s.output_ids) == 4 and s.status is Status.RUNNING:
                scheduler.free(s)
                s.status = Status.FINISHED
    assert a.finished and b.finished and scheduler.num_preemptions >= 1


def test_freeing_returns_every_block_and_slot():
    scheduler = Scheduler(2, BlockPool(8, 4), max_num_batched_tokens=64, max_waiting=10)
    seqs = [sequence(str(i), list(range(1, 10))) for i in range(2)]
    scheduler.add(seqs)
    step(scheduler)
    step(scheduler)
    for s in seqs:
        scheduler.free(s)
        scheduler.free(s)  # twice is harmless
    assert scheduler.blocks.num_used == 0 and scheduler.num_free_slots == 2
