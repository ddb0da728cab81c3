"""Token selection: penalties and biases, greedy or seeded sampling, and logprobs.

Every row is processed on its own, with the same ops on the same [vocab] shape, so a request's
choice never depends on its batch. Random draws are Gumbel-max with noise from a counter-based
hash of (seed, token position, vocab index): no generator state is shared or advanced, so the
same seed gives the same tokens whatever else runs, and a preempted and recomputed request draws
exactly what it drew before.

Rows that only need greedy or temperature sampling (the common case) are sampled where the logits
are, in one `kernels.sample_tokens` call; on a GPU only their token ids reach the host. A row with
penalties, a logit bias, a min_tokens ban or a top-k/top-p/min-p filter is processed on the host,
one row at a time. Logprobs are computed on the device for the rows that ask for them.
"""

from __future__ import annotations

import torch

from detserve import kernels
from detserve.engine.request import Request, TokenLogprob


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


def _needs_host(request: Request) -> bool:
    """Whether the row needs the per-row host path: anything beyond logits / temperature."""
    p = request.params
    return bool(
        p.logit_bias
        or request.num_output_tokens < p.min_tokens
        or p.repetition_penalty != 1.0
        or ((p.presence_penalty or p.frequency_penalty) and request.output_token_ids)
        or (not p.greedy and (p.top_k or p.top_p < 1.0 or p.min_p > 0.0))
    )


def _sample_on_host(logits: torch.Tensor, request: Request, eos_token_ids: tuple[int, ...]) -> int:
    row = apply_penalties_and_bias(logits, request, eos_token_ids)
    if request.params.greedy:
        return int(torch.argmax(row))
    seed, position = torch.tensor([request.seed]), torch.tensor([request.num_tokens])
    return int(kernels.gumbel_max(_filtered(row, request)[None], seed, position)[0])


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Row i of logits [R, V] (float32): token i's logprob and the top `tops[i]` alternatives.

    Each row's log-softmax is computed on its own (row-invariant), so the logprob a sampled token
    reports and the one scoring it as a prompt token reads are the same bits. Top-k lists are
    ordered by logprob, then token id, so ties read the same on every device.
    """
    device = logits.device
    logprobs = kernels.log_softmax(logits)  # [R, V] float32
    chosen_values = logprobs.gather(1, torch.tensor(tokens, device=device)[:, None])  # [R, 1]
    chosen = chosen_values[:, 0].tolist()
    ranks = ((logprobs > chosen_values).sum(-1) + 1).tolist()
    max_k = max(tops, default=0)
    if max_k:
        top_values, top_ids = (t.tolist() for t in torch.topk(logprobs, max_k))
    else:
        top_values = top_ids = [[] for _ in tokens]
    entries = []
    for token, logprob, rank, values, ids, k in zip(tokens, chosen, ranks, top_values, top_ids, tops):
        # a structured output's disallowed tokens have logprob -inf: not alternatives, and not JSON
        top = sorted(((i, v) for i, v in zip(ids, values) if v != float("-inf")), key=lambda pair: (-pair[1], pair[0]))
        entries.append(TokenLogprob(token_id=token, logprob=logprob, top=top[:k], rank=rank))
    return entries


def sample(
    logits: torch.Tensor, requests: list[Request], eos_token_ids: tuple[int, ...]
) -> list[tuple[int, TokenLogprob | None]]:
    """Pick the next token for each row of logits [S, V] (row i belongs to requests[i])."""
    logits = logits.float()
    device = logits.device
    constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
    if constrained:  # before everything else: penalties, sampling and logprobs all see the masked logits
        rows = torch.tensor(constrained, device=device)
        masks = torch.stack([requests[i].grammar.bitmask() for i in constrained]).to(device)
        logits = logits.index_put((rows,), kernels.apply_token_bitmask(logits[rows], masks))
    tokens = [0] * len(requests)
    needs_host = [_needs_host(r) for r in requests]
    on_device = [i for i, host in enumerate(needs_host) if not host]
    if on_device:
        picked = kernels.sample_tokens(
            logits if len(on_device) == len(requests) else logits[torch.tensor(on_device, device=device)],
            torch.tensor([requests[i].params.temperature for i in on_device], dtype=torch.float64, device=device),
            torch.tensor([requests[i].seed for i in on_device], dtype=torch.int64, device=device),
            torch.tensor([requests[i].num_tokens for i in on_device], dtype=torch.int64, device=device),
        )
        for i, token in zip(on_device, picked.tolist()):
            tokens[i] = token
    on_host = [i for i, host in enumerate(needs_host) if host]
    if on_host:
        host_rows = logits[torch.tensor(on_host, device=device)].cpu()
        for i, row in zip(on_host, host_rows):
            tokens[i] = _sample_on_host(row, requests[i], eos_token_ids)
    results: list[tuple[int, TokenLogprob | None]] = [(token, None) for token in tokens]
    wanting = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if wanting:
        entries = token_logprobs(logits[torch.tensor(wanting, device=device)], [tokens[i] for i in wanting],
                                 [requests[i].params.logprobs for i in wanting])
        for i, entry in zip(wanting, entries):
            results[i] = (tokens[i], entry)
    return results
