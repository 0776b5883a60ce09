"""Grammar masks: the tokens a constrained row's grammar allows, applied to its logits before sampling."""

from __future__ import annotations

import xgrammar as xgr

from model.batch import upload


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
