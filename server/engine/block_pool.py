"""The KV cache's blocks as the scheduler sees them: reference counts, free blocks, and the prefix cache.

The runner allocates one pool of fixed-size blocks per layer at start-up; this module decides which block holds
what. A sequence holds a block table (its blocks in token order). Pure Python, no torch.

Prefix cache: a full block is known by its tokens and by the block before it, so a block stands for its whole
prefix. Each registered block gets a fresh id (`uid`); a block's key is (the uid of the block before it, its
tokens), so two blocks match only when their tokens and everything before them are equal. Keys are found by hash
in `hash_fn`'s buckets and then compared in full: a hash collision is a miss, never a wrong block. A block nobody
holds stays cached until it is needed for something else; blocks are then reused least recently released first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROOT = 0  # the "uid" before a sequence's first block


@dataclass(frozen=True)
class CachedBlock:
    block: int
    uid: int
    parent: int               # uid of the block before it (ROOT for a first block)
    tokens: tuple[int, ...]


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, hash_fn: Callable[[object], int] = hash):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs positive blocks and block size, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.hash_fn = hash_fn
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))        # hold nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unheld but cached, least recently released first
        self._cached: dict[int, list[CachedBlock]] = {}          # hash -> the cached blocks with that hash
        self._entry: list[CachedBlock | None] = [None] * num_blocks
        self._next_uid = ROOT + 1

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        return sum(len(bucket) for bucket in self._cached.values())

    def holders(self, block: int) -> int:
        """How many holds the block has (0: free, or cached and evictable)."""
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        """A block for one holder: a free one, else the least recently released cached one (forgotten)."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise RuntimeError("no KV cache block is available")
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop one hold; a block nobody holds stays cached (if registered) until it is reused."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} is released more often than it was held")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._entry[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def acquire(self, block: int) -> None:
        """One more hold on a cached block (a prefix hit)."""
        if self._refs[block] == 0:
            self._evictable.pop(block)
        self._refs[block] += 1

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> list[CachedBlock]:
        """The cached blocks that hold `tokens` from the start, block by block, at most `max_blocks`."""
        found, parent, size = [], ROOT, self.block_size
        for i in range(min(max_blocks, len(tokens) // size)):
            chunk = tuple(tokens[i * size:(i + 1) * size])
            entry = self._find(parent, chunk)
            if entry is None:
                break
            found.append(entry)
            parent = entry.uid
        return found

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Cache a full block that follows the block with uid `parent`; returns the uid its successor will name.
        When an equal block is cached already, this one stays unregistered and that one's uid is returned."""
        chunk = tuple(tokens)
        if len(chunk) != self.block_size:
            raise ValueError(f"only full blocks are cached ({len(chunk)} of {self.block_size} tokens)")
        existing = self._find(parent, chunk)
        if existing is not None:
            return existing.uid
        if self._entry[block] is not None:
            raise RuntimeError(f"block {block} is cached already")
        entry = CachedBlock(block, self._next_uid, parent, chunk)
        self._next_uid += 1
        self._entry[block] = entry
        self._cached.setdefault(self.hash_fn((parent, chunk)), []).append(entry)
        return entry.uid

    def _find(self, parent: int, chunk: tuple[int, ...]) -> CachedBlock | None:
        for entry in self._cached.get(self.hash_fn((parent, chunk)), ()):
            if entry.parent == parent and entry.tokens == chunk:  # the hash only finds the bucket
                return entry
        return None

    def _forget(self, block: int) -> None:
        entry = self._entry[block]
        self._entry[block] = None
        key = self.hash_fn((entry.parent, entry.tokens))
        bucket = self._cached[key]
        bucket.remove(entry)
        if not bucket:
            del self._cached[key]
