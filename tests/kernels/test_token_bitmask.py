"""kernels.apply_token_bitmask: the structured-output mask, bit t % 32 of word t // 32 per token t."""

from __future__ import annotations

import torch

from detserve import kernels


def test_mask_keeps_exactly_the_allowed_tokens_including_bit_31_and_a_partial_last_word() -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 1000  # 31.25 words: the last word's high bits have no token
    masks = torch.randint(-2**31, 2**31, (5, (vocab + 31) // 32), dtype=torch.int64, generator=g).to(torch.int32)
    masks[0, 0] = -2**31  # only bit 31 of the first word: token 31
    logits = torch.randn(5, vocab, generator=g)
    out = kernels.apply_token_bitmask(logits, masks)
    for row in range(5):
        words = [int(w) & 0xFFFFFFFF for w in masks[row]]
        allowed = torch.tensor([bool(words[t // 32] >> (t % 32) & 1) for t in range(vocab)])
        assert torch.equal(out[row][allowed], logits[row][allowed])
        assert torch.all(out[row][~allowed] == float("-inf"))
    assert out[0, :32].isfinite().tolist() == [t == 31 for t in range(32)]


def test_a_rows_mask_does_not_depend_on_the_other_rows() -> None:
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(-2**31, 2**31, (8, 40), dtype=torch.int64, generator=g).to(torch.int32)
    logits = torch.randn(8, 40 * 32, generator=g)
    together = kernels.apply_token_bitmask(logits, masks)
    for row in range(8):
        assert torch.equal(kernels.apply_token_bitmask(logits[row : row + 1], masks[row : row + 1])[0], together[row])
