"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral, OLMoE), with no batch in its bits.

A batch reaches an MoE layer's bits in three places. A capacity limit makes tokens of different
requests compete for an expert's slots; there is none here, and no token is ever dropped. An
expert's matmul has as many rows as tokens chose that expert, and that count depends on the whole
batch; the experts run on `kernels.grouped_linear`, whose invariant mode computes a row the same
way whatever the number of rows (on CPU: fixed-size row calls per expert for float weights, the
row-invariant integer kernels for packed ones; on the GPU: one launch of the grouped Triton
matmul, each row bitwise what the pinned-tiling matmul gives it alone). And the combine
could follow arrival order; here a token's expert outputs are added in expert-index order, in
float32, onto zeros, so its sum is the same sequence of adds in any company. The routing itself
(`kernels.route_experts`) is row-local, with ties broken by expert index.
"""

from __future__ import annotations

import torch
from torch import nn

from detserve import kernels
from detserve.engine.config import MoEConfig
from detserve.engine.parallel import Layout, TensorParallel
from detserve.kernels import PackedWeight

Weight = torch.Tensor | PackedWeight


class SparseMoE(nn.Module):
    def __init__(self, config: MoEConfig, tp: TensorParallel | None = None) -> None:
        """`tp` (default: alone): under tensor parallelism each rank holds every expert's share of its MLP columns,
        the down projections as K-splits folded like a dense layer's (`TensorParallel`)."""
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel(Layout())
        # set by LlamaModel.load_weights: the router [E, hidden] (whole on every rank), the experts'
        # gate|up [E, 2I, hidden] weights, stacked when float, a list of packed weights when
        # quantized, and their down [E, hidden, I] weights as this rank's K-splits, each like gate|up
        self.router: Weight
        self.gate_up_proj: torch.Tensor | list[PackedWeight]
        self.down_proj: list[torch.Tensor | list[PackedWeight]]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden] in h's dtype: each token's experts' MLPs, weighted and summed."""
        c = self.config
        num_tokens, top_k = h.shape[0], c.top_k
        weights, experts = kernels.route_experts(kernels.linear(h, self.router), top_k, c.normalize_top_k)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # the (token, rank) pairs by expert, tokens ascending within one
        counts = torch.bincount(flat, minlength=c.num_experts).tolist()
        up = kernels.grouped_linear(h[order // top_k], self.gate_up_proj, counts)
        y = self.tp.row_grouped_linear(kernels.silu_mul(up), self.down_proj, counts).float()
        place = torch.empty_like(order)
        place[order] = torch.arange(order.numel(), device=order.device)  # y's row of each (token, rank)
        contributions = y[place].view(num_tokens, top_k, -1) * weights[..., None]
        by_expert = experts.argsort(dim=1, stable=True)  # each token's ranks in expert-index order
        ordered = contributions.gather(1, by_expert[..., None].expand(-1, -1, contributions.shape[-1]))
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for j in range(top_k):  # one add per token and expert, in expert-index order, from zero
            out = out + ordered[:, j]
        return out.to(h.dtype)
