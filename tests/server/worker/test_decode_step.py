"""What the prepared decode steps share: the decode table and the ladder lookup."""

from __future__ import annotations

from server.worker.decode.step import DecodeStep, decode_table

BLOCK = 16


def test_decode_table_pads_with_length_zero():
    rows = decode_table([11, 12], [0, 33], [(5,), (7, 8, 9, 10)], size=4, block_size=BLOCK)
    assert rows.tolist() == [[11, 0, 1, 5, 0, 0],
                             [12, 33, 34, 7, 8, 9],  # position 33 is in the third block: 3 blocks, not 4
                             [0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0]]


def test_size_for_is_the_smallest_prepared_size_that_holds_the_batch():
    step = DecodeStep(model=None, cache=None, max_batch=20, device=None, sizes=[8, 1, 20, 4, 2, 16])
    assert [step.size_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert step.size_for(21) is None
