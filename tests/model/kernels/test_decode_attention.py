"""The CPU decode-attention kernel (model/kernels/decode_attention.c) on its own: against attention in float64 over
the paged cache, and several successive positions of one sequence in one call against one call per position (what
verifying several proposed tokens in one step needs)."""

from __future__ import annotations

import pytest
import torch

from model.kernels.cpu import decode_attention_kernel

BLOCKS, HKV, G, D, S = 24, 2, 3, 64, 16

pytestmark = pytest.mark.skipif(decode_attention_kernel(torch.bfloat16) is None,
                                reason="the decode-attention kernel needs a C compiler")


def setup(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(BLOCKS, HKV, S, D, generator=gen).to(dtype) for _ in range(2)]
    return gen, caches


def host_rows(rows: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
    width = 1 + max(len(t) for _, t in rows)
    return torch.tensor([[n, *t] + [0] * (width - 1 - len(t)) for n, t in rows], dtype=torch.long)


def reference(q, k_cache, v_cache, length, table):
    """float64 softmax(q K^T / sqrt(D)) V over the sequence's first `length` tokens. q [HKV, G, D]."""
    keys = torch.cat([k_cache[b] for b in table], dim=1)[:, :length].double()  # [HKV, L, D]
    values = torch.cat([v_cache[b] for b in table], dim=1)[:, :length].double()
    scores = torch.einsum("hgd,hld->hgl", q.double(), keys) / D ** 0.5
    return torch.einsum("hgl,hld->hgd", scores.softmax(-1), values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_kernel_matches_float64_attention_and_writes_the_new_rows(dtype):
    kernel = decode_attention_kernel(dtype)
    gen, (k_cache, v_cache) = setup(dtype)
    rows = [(1, (5,)), (17, (3, 9)), (40, (0, 7, 11)), (0, ())]  # a padding row last
    B = len(rows)
    q = torch.randn(B, HKV, G, D, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(B, HKV, D, generator=gen).to(dtype) for _ in range(2))
    out = kernel(q, k_new, v_new, k_cache, v_cache, host_rows(rows))
    for b, (length, table) in enumerate(rows):
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        block, row = table[(length - 1) // S], (length - 1) % S
        assert torch.equal(k_cache[block, :, row], k_new[b]) and torch.equal(v_cache[block, :, row], v_new[b])
        expected = reference(q[b], k_cache, v_cache, length, table)
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_successive_positions_of_one_sequence_in_one_call_equal_one_call_each(dtype, order):
    """Rows for positions p .. p + 4 of one sequence (beside another sequence's row), in either order: each row
    attends to the new tokens of the rows for earlier positions, bit for bit as five calls of one position each, and
    the caches end equal."""
    kernel = decode_attention_kernel(dtype)
    gen, caches = setup(dtype, seed=1)
    table, other = (2, 4, 6), (8, 10)
    p, n = 14, 5  # positions 14 .. 18 cross a block boundary
    q = torch.randn(n + 1, HKV, G, D, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(n + 1, HKV, D, generator=gen).to(dtype) for _ in range(2))
    rows = [(p + 1 + i, table) for i in range(n)]
    rows = (rows if order == "ascending" else rows[::-1]) + [(20, other)]

    together_caches = [c.clone() for c in caches]
    together = kernel(q, k_new, v_new, *together_caches, host_rows(rows))
    alone_caches = [c.clone() for c in caches]
    for i in sorted(range(n + 1), key=lambda i: rows[i][0] if rows[i][1] == table else 0):  # one step a position
        alone = kernel(q[i:i + 1], k_new[i:i + 1], v_new[i:i + 1], *alone_caches, host_rows([rows[i]]))
        assert torch.equal(together[i], alone[0]), i
    assert all(torch.equal(a, b) for a, b in zip(together_caches, alone_caches))
