"""The CUDA decode attention kernel (model/triton_decode.py) against attention spelled out in float64.

On a machine without a GPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), on CUDA
as compiled; either way the same kernel source is checked: the new K/V land in their block and row and nowhere
else, every output row is written, padding rows give zeros.
"""

import pytest
import torch

from model.kernels.triton_decode import available, paged_decode_attention, split_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not available(DEVICE):
    pytest.skip("Triton cannot run here (not installed, or no GPU and no interpreter)", allow_module_level=True)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, by the operands' dtype


def random_tables(lengths: list[int], block_size: int, width: int, num_blocks: int, gen) -> torch.Tensor:
    """[len(lengths), width]: each row's length, then its blocks, shuffled and disjoint from the other rows'."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, length in enumerate(lengths):
        n = -(-length // block_size)
        tables[b, 0] = length
        tables[b, 1:1 + n] = torch.tensor(order[:n], dtype=torch.long)
        order = order[n:]
    return tables


def expected(q, k, v, k_cache, v_cache, tables):
    """Caches after the writes, and the output, in float64 on the CPU."""
    k_cache, v_cache = k_cache.cpu().clone(), v_cache.cpu().clone()
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b, row in enumerate(tables.cpu().tolist()):
        length = row[0]
        if length == 0:
            continue
        block, offset = row[1 + (length - 1) // S], (length - 1) % S
        k_cache[block, :, offset], v_cache[block, :, offset] = k[b].cpu(), v[b].cpu()
        blocks = row[1:1 + -(-length // S)]
        keys = k_cache[blocks].transpose(0, 1).reshape(Hkv, -1, D)[:, :length].double()  # [Hkv, L, D]
        values = v_cache[blocks].transpose(0, 1).reshape(Hkv, -1, D)[:, :length].double()
        keys, values = keys.repeat_interleave(H // Hkv, 0), values.repeat_interleave(H // Hkv, 0)
        scores = (q[b].cpu().double()[:, None, :] @ keys.transpose(1, 2))[:, 0] / D ** 0.5  # [H, L]
        out[b] = (scores.softmax(-1)[:, None, :] @ values)[:, 0]
    return out, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 64, 16), (9, 3, 32, 32), (8, 8, 128, 16),
                                                                  (32, 8, 64, 16)])
def test_kernel_matches_float64_attention(dtype, heads, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + block_size)
    S, num_blocks = block_size, 48
    lengths = [1, S, S + 1, 0, 150, 3 * S - 1, 0]  # padding rows anywhere: each row stands alone
    B, width = len(lengths), 1 + -(-max(lengths) // S) + 2  # a table wider than any row needs
    tables = random_tables(lengths, S, width, num_blocks, gen)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rand(B, heads, head_dim), rand(B, kv_heads, head_dim), rand(B, kv_heads, head_dim)
    k_cache, v_cache = rand(num_blocks, kv_heads, S, head_dim), rand(num_blocks, kv_heads, S, head_dim)
    want, want_k, want_v = expected(q, k, v, k_cache, v_cache, tables)
    got = paged_decode_attention(q, k, v, k_cache, v_cache, tables.to(DEVICE))

    assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v)  # those rows, nothing else
    got = got.cpu().double()
    assert not got.isnan().any()
    for b, length in enumerate(lengths):
        if length == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))
        else:
            error = (got[b] - want[b]).norm() / want[b].norm()
            assert error < TOLERANCE[dtype], (b, length, float(error))


def test_kernel_reads_query_and_new_rows_through_strides():
    """q, k and v as the model makes them: views into one fused projection, not contiguous tensors."""
    gen = torch.Generator().manual_seed(7)
    B, H, Hkv, D, S = 3, 8, 2, 32, 16
    fused = torch.randn(B, (H + 2 * Hkv) * D, generator=gen).to(DEVICE)
    q, k, v = (t.view(B, -1, D) for t in fused.split([H * D, Hkv * D, Hkv * D], dim=-1))
    k_cache, v_cache = (torch.randn(8, Hkv, S, D, generator=gen).to(DEVICE) for _ in range(2))
    tables = torch.tensor([[5, 3, 0], [20, 1, 6], [17, 2, 7]])
    want, want_k, want_v = expected(q, k, v, k_cache, v_cache, tables)
    got = paged_decode_attention(q, k, v, k_cache, v_cache, tables.to(DEVICE))
    assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v)
    assert (got.cpu().double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences_split_and_merge(dtype):
    """Block tables wide enough for 4,352 tokens: 32 splits of 256 tokens per (sequence, KV head), most of them
    empty for the short rows, merged into one output; the split boundaries fall inside blocks and rows."""
    gen = torch.Generator().manual_seed(11)
    H, Hkv, D, S = 8, 2, 64, 16
    width = 1 + 4352 // S
    lengths = [4300, 1, 0, 257, 2000]
    assert split_size((width - 1) * S) == 256
    num_blocks = sum(-(-n // S) for n in lengths) + 4
    tables = random_tables(lengths, S, width, num_blocks, gen)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rand(len(lengths), H, D), rand(len(lengths), Hkv, D), rand(len(lengths), Hkv, D)
    k_cache, v_cache = rand(num_blocks, Hkv, S, D), rand(num_blocks, Hkv, S, D)
    want, want_k, want_v = expected(q, k, v, k_cache, v_cache, tables)
    got = paged_decode_attention(q, k, v, k_cache, v_cache, tables.to(DEVICE)).cpu().double()
    assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    for b in (0, 1, 3, 4):
        assert (got[b] - want[b]).norm() / want[b].norm() < TOLERANCE[dtype], b


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_successive_positions_of_one_sequence_in_one_call_equal_one_call_each(dtype, order):
    """A speculative step's verify rows: positions p .. p + 4 of one sequence (crossing a block boundary) beside
    another sequence's row, in either order. Every row's new K/V is written before any row attends, so each row
    sees the rows for earlier positions, bit for bit as five calls of one position each; the caches end equal."""
    gen = torch.Generator().manual_seed(5)
    H, Hkv, D, S, num_blocks = 8, 2, 64, 16, 12
    table, other = [3, 7, 1], [9, 4]
    p, n = 14, 5
    width = 1 + len(table) + 1  # one width for every call: the split size depends on it

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    rows = [(p + 1 + i, table) for i in range(n)]
    rows = (rows if order == "ascending" else rows[::-1]) + [(20, other)]
    tables = torch.tensor([[length, *blocks] + [0] * (width - 1 - len(blocks)) for length, blocks in rows])
    q, k, v = rand(n + 1, H, D), rand(n + 1, Hkv, D), rand(n + 1, Hkv, D)
    caches = rand(num_blocks, Hkv, S, D), rand(num_blocks, Hkv, S, D)

    together_caches = [c.clone() for c in caches]
    together = paged_decode_attention(q, k, v, *together_caches, tables.to(DEVICE))
    alone_caches = [c.clone() for c in caches]
    for i in sorted(range(n + 1), key=lambda i: rows[i][0] if rows[i][1] is table else 0):  # a position a call
        alone = paged_decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], *alone_caches, tables[i:i + 1].to(DEVICE))
        assert torch.equal(together[i], alone[0]), i
    assert all(torch.equal(a, b) for a, b in zip(together_caches, alone_caches))
