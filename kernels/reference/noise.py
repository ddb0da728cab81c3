"""Seeded sampling on the host: Gumbel noise from a counter-based hash of (seed, token position, vocab
index), so a row's draw depends on nothing but its own seed and position (no generator state)."""

from __future__ import annotations

import numpy as np
import torch

from detserve.kernels import contract

_GOLDEN, _MIX1, _MIX2, _POSITION_STRIDE = (np.uint64(c) for c in (
    contract.GOLDEN, contract.MIX1, contract.MIX2, contract.POSITION_STRIDE))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_noise(seeds: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """Uniforms in (0, 1), float64 [S, vocab_size]: row i a pure function of (seeds[i], positions[i], index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(seeds.astype(np.uint64) ^ (positions.astype(np.uint64) * _POSITION_STRIDE))
        z = _splitmix64(base[:, None] + np.arange(vocab_size, dtype=np.uint64)[None, :] * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), float64 [S, vocab_size], for Gumbel-max sampling."""
    u = uniform_noise(seeds.cpu().numpy(), positions.cpu().numpy(), vocab_size)
    return torch.from_numpy(-np.log(-np.log(u)))


def gumbel_max(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The seeded draws from float64 logits [S, V] already divided by the temperature (and filtered):
    argmax(scaled + gumbel_noise(seed, position)) per row, first index on a tie; [S] int64."""
    return torch.argmax(scaled + gumbel_noise(seeds, positions, scaled.shape[-1]).to(scaled.device), dim=-1)


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Per row of logits [S, V]: the Gumbel-max draw from logits / T in float64, or argmax(logits)
    where T = 0 (first index on a tie). Returns [S] int64 on the logits' device.

    One argmax over all rows and one noise draw for the sampled ones: each row's result is exact
    (an argmax rounds nothing), so batching rows cannot change it.
    """
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)
    sampled = (temperatures != 0).nonzero()[:, 0]
    if len(sampled):
        scaled = logits[sampled].double() / temperatures[sampled, None]
        tokens[sampled] = gumbel_max(scaled, seeds[sampled], positions[sampled])
    return tokens
