"""Token selection: penalties and biases, greedy or seeded sampling, and logprobs.

Every row is processed on its own, with the same ops on the same [vocab] shape, so a request's
choice never depends on its batch. Random draws are Gumbel-max with noise from a counter-based
hash of (seed, token position, vocab index): no generator state is shared or advanced, so the
same seed gives the same tokens whatever else runs, and a preempted and recomputed request draws
exactly what it drew before.
"""

from __future__ import annotations

import numpy as np
import torch

import kernels
from engine.request import Request, TokenLogprob

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POSITION_STRIDE = np.uint64(0xD1B54A32D192ED03)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_noise(seed: int, position: int, vocab_size: int) -> np.ndarray:
    """Uniforms in (0, 1), float64, one per vocab index: a pure function of (seed, position, index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64) ^ (np.uint64(position) * _POSITION_STRIDE))
        z = _splitmix64(base + np.arange(vocab_size, dtype=np.uint64) * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    return torch.from_numpy(-np.log(-np.log(uniform_noise(seed, position, vocab_size))))


def apply_penalties_and_bias(logits: torch.Tensor, request: Request, eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Processed logits of one row [V] (a new tensor): logit_bias, min_tokens, and the three penalties."""
    p = request.params
    logits = logits.clone()
    vocab = logits.shape[0]
    if p.logit_bias:
        ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
        if len(ids):
            logits[ids] += torch.tensor([p.logit_bias[int(t)] for t in ids], dtype=logits.dtype)
    if request.num_output_tokens < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
        logits[torch.tensor([t for t in banned if 0 <= t < vocab], dtype=torch.long)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
        counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=vocab).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filtered(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """Temperature-scaled float64 logits with top-k, top-p and min-p exclusions set to -inf."""
    p = request.params
    scaled = logits.double() / p.temperature
    if p.top_k and p.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0 or p.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0.0:
            scaled = scaled.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True, stable=True)
            # keep a token if the mass strictly before it is below top_p (the top token always stays)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop = torch.zeros_like(scaled, dtype=torch.bool)
            drop[order] = mass_before >= p.top_p
            scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample(
    logits: torch.Tensor, requests: list[Request], eos_token_ids: tuple[int, ...]
) -> list[tuple[int, TokenLogprob | None]]:
    """Pick the next token for each row of logits [S, V] (row i belongs to requests[i])."""
    logits = logits.float().cpu()
    want_logprobs = any(r.params.logprobs is not None for r in requests)
    logprobs = kernels.log_softmax(logits) if want_logprobs else None
    results: list[tuple[int, TokenLogprob | None]] = []
    for i, request in enumerate(requests):
        row = apply_penalties_and_bias(logits[i], request, eos_token_ids)
        if request.params.greedy:
            token = int(torch.argmax(row))
        else:
            noise = gumbel_noise(request.seed, request.num_tokens, row.shape[0])
            token = int(torch.argmax(_filtered(row, request) + noise))
        entry = None
        if logprobs is not None and request.params.logprobs is not None:
            row_lp = logprobs[i]
            k = request.params.logprobs
            top = torch.topk(row_lp, k) if k else None
            entry = TokenLogprob(
                token_id=token,
                logprob=float(row_lp[token]),
                top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            )
        results.append((token, entry))
    return results
