"""Grammar masks: the tokens a constrained row's grammar allows, applied to its logits before sampling."""

from __future__ import annotations

import xgrammar as xgr

from model.batch import upload


class FixedMask:
    """A matcher stand-in for one verify row of a speculating sequence: the mask its grammar gives at that row's
    position, computed beforehand (`verify_masks`)."""

    def __init__(self, row):
        self.row = row

    def fill_next_token_bitmask(self, bitmask, index: int) -> None:
        bitmask[index] = self.row


def verify_masks(matcher, proposals: list[int], vocab_size: int) -> list[FixedMask]:
    """The masks of a speculating sequence's 1 + len(proposals) verify rows: row j's is the grammar's after the
    sequence's tokens and proposals 0..j-1. The matcher is advanced through the proposals and rolled back to where
    it was. Past a proposal the grammar refuses (or after it ends), rows repeat the last mask: row j's choice then
    cannot equal that proposal, so no row after it is accepted."""
    bitmask = xgr.allocate_token_bitmask(1 + len(proposals), vocab_size)
    advanced = 0  # proposals the matcher has taken
    for j in range(1 + len(proposals)):
        live = j == advanced and not matcher.is_terminated()
        if live:
            matcher.fill_next_token_bitmask(bitmask, j)
        else:
            bitmask[j] = bitmask[j - 1]
        if live and j < len(proposals) and matcher.accept_token(proposals[j]):
            advanced += 1
    if advanced:
        matcher.rollback(advanced)
    return [FixedMask(bitmask[j].clone()) for j in range(1 + len(proposals))]


class MaskFiller:
    """Fills and applies token bitmasks for the constrained rows of a batch of logits."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits, matchers: list) -> None:
        """`matchers[i]` constrains row i of `logits` [B, V] (None: unconstrained); masks in place."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        if self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(self._bitmask, i)
        mask = upload(self._bitmask[:logits.shape[0]], logits.device)  # on CUDA: no wait for the step to finish
        xgr.apply_token_bitmask_inplace(logits, mask,
                                             vocab_size=self.vocab_size, indices=rows)
