"""One plain Llama-family forward pass covering Llama/SmolLM2/Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm)
and the mixture-of-experts models built on it (Qwen3-MoE, Mixtral, OLMoE: `moe.py`).

Every op goes through `kernels`, so the same model runs batch-invariant or fast depending on the
kernel mode of the step. Projections are fused at load time (q|k|v and gate|up) so each layer
runs four matmuls instead of seven. A projection's weight is a float tensor or a packed 4/8-bit
weight (`kernels.quantized`); `kernels.linear` takes either.

The model is one rank's shard of a tensor-parallel group (`engine/parallel.py`; alone, the whole
model): its heads, its MLP columns, its vocabulary rows, and o and down as K-splits whose partials
`TensorParallel.row_linear` folds in a fixed order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from detserve import kernels
from detserve.engine.config import ModelConfig
from detserve.engine.forward_batch import ForwardBatch
from detserve.engine.models.moe import SparseMoE
from detserve.engine.parallel import Layout, TensorParallel
from detserve.kernels import PackedWeight, QuantizedWeight

Weight = torch.Tensor | PackedWeight  # what a projection multiplies by


def rope_cos_sin_table(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] table of cos | sin halves, computed once in float64 for accuracy."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is not None:
        kind = scaling["rope_type"]
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        else:
            raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    positions = torch.arange(max_positions, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)  # [P, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short kept, smooth between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def check_shardable(config: ModelConfig, layout: Layout) -> None:
    """What tensor parallelism does not split (yet), refused by name before anything loads."""
    if layout.size == 1:
        return
    if config.qk_norm == "full":
        raise ValueError("a q/k norm over all heads (OLMoE's) does not split over ranks: use --tensor-parallel-size 1")
    layout.part(config.num_heads, "attention heads")
    layout.part(config.num_kv_heads, "key/value heads")
    layout.part(config.intermediate_size, "MLP columns")
    if config.moe is not None:
        layout.part(config.moe.intermediate_size, "expert MLP columns")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, tp: TensorParallel) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        c = config
        self.num_heads = c.num_heads // tp.layout.size  # this rank's
        self.num_kv_heads = c.num_kv_heads // tp.layout.size
        q_size, kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.input_norm = _param(c.hidden_size)
        self.qkv_bias = _param(q_size + 2 * kv_size) if c.attention_bias else None
        norm_sizes = {"head": (c.head_dim, c.head_dim), "full": (q_size, kv_size)}.get(c.qk_norm)
        self.q_norm = _param(norm_sizes[0]) if norm_sizes else None
        self.k_norm = _param(norm_sizes[1]) if norm_sizes else None
        self.post_attention_norm = _param(c.hidden_size)
        self.moe = SparseMoE(c.moe, tp) if c.is_sparse(index) else None
        # set by LlamaModel.load_weights
        self.qkv_proj: Weight  # this rank's q, k and v heads
        self.o_proj: list[Weight]  # this rank's K-splits (row-parallel)
        self.gate_up_proj: Weight  # the dense MLP's, this rank's columns (a layer with `moe` has none)
        self.down_proj: list[Weight]  # K-splits, as o_proj

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous layer's output (the embedding for the first layer)
        residual: torch.Tensor | None,  # [T, hidden]: the residual stream before x is added (None: first layer)
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        rotary: kernels.RotaryInputs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream it adds to): the next layer adds them inside its
        input norm (`add_rms_norm`), so a residual add is never an op of its own.

        Each op writes the dtype the matmul after it reads (`matmul_input_dtype`: the C ops write
        the integer kernels' bfloat16 themselves); a matmul's bfloat16 result reaches the residual
        adds as it is, and they add in the residual stream's dtype."""
        c, eps = self.config, self.config.rms_norm_eps
        num_tokens = x.shape[0]
        qkv_input = kernels.matmul_input_dtype(self.qkv_proj)
        if residual is None:
            h, residual = kernels.rms_norm(x, self.input_norm, eps, qkv_input), x
        else:
            h, residual = kernels.add_rms_norm(x, residual, self.input_norm, eps, qkv_input)
        # q/k norms and clipping read the stream's dtype; plain q, k and v reach attention as the matmul wrote them
        qkv_dtype = residual.dtype if c.qk_norm != "none" or c.clip_qkv is not None else None
        q, k, v = self._qkv(kernels.linear(h, self.qkv_proj, self.qkv_bias, out_dtype=qkv_dtype))
        # Writes the K/V first, then attends over the cache only: fresh and cached keys take one path.
        attn = kernels.rope_store_attention(q, k, v, rotary, k_cache, v_cache, batch.slot_mapping,
                                            batch.attention_plan, c.head_dim**-0.5,
                                            self.tp.row_input_dtype(self.o_proj) or residual.dtype)
        mlp_input = None if self.moe is not None else kernels.matmul_input_dtype(self.gate_up_proj)
        h, residual = kernels.add_rms_norm(self.tp.row_linear(attn.reshape(num_tokens, -1), self.o_proj), residual,
                                           self.post_attention_norm, eps, mlp_input)
        if self.moe is not None:
            return self.moe(h), residual
        up = kernels.silu_mul(kernels.linear(h, self.gate_up_proj), self.tp.row_input_dtype(self.down_proj))
        return self.tp.row_linear(up, self.down_proj), residual

    def mlp_weights(self) -> tuple[Weight, Weight]:
        """The MLP's gate|up and down weights (an MoE layer's first expert's: all are alike)."""
        if self.moe is not None:
            return self.moe.gate_up_proj[0], self.moe.down_proj[0][0]
        return self.gate_up_proj, self.down_proj[0]

    def _qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, Hkv, D] from the fused projection: q/k normed per head (Qwen3) or
        over the whole projection (OLMoE), then clamped (OLMoE's clip_qkv), as the config says."""
        c, num_heads, num_kv_heads = self.config, self.num_heads, self.num_kv_heads
        num_tokens = qkv.shape[0]
        q_size, kv_size = num_heads * c.head_dim, num_kv_heads * c.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=1)
        if c.qk_norm == "full":  # contiguous: the GPU's row kernel reads whole rows
            q = kernels.rms_norm(q.contiguous(), self.q_norm, c.rms_norm_eps)
            k = kernels.rms_norm(k.contiguous(), self.k_norm, c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_tokens, num_heads, c.head_dim)
        k = k.reshape(num_tokens, num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = kernels.rms_norm(q, self.q_norm, c.rms_norm_eps), kernels.rms_norm(k, self.k_norm, c.rms_norm_eps)
        return q, k, v.reshape(num_tokens, num_kv_heads, c.head_dim)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel | None = None) -> None:
        """`tp`: the tensor-parallel group this model is one shard of (default: alone, the whole model)."""
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel(Layout())
        check_shardable(config, self.tp.layout)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.tp) for i in range(config.num_layers))
        self.norm = _param(config.hidden_size)
        self.register_buffer("cos_sin", rope_cos_sin_table(config, max_positions), persistent=False)
        self.vocab_start, self.vocab_end = self.tp.layout.vocab_part(config.vocab_size)  # this rank's rows
        # set by load_weights: the embedding table (float, or quantized rows dequantized on lookup)
        self.embed_tokens: torch.Tensor | QuantizedWeight
        self.lm_head: Weight
        self.c_layers: kernels.DenseLayers | None = None  # the decoder layers as one C call, where they can be

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] in the model's dtype."""
        return self.tp.embed(input_ids, self._lookup, self.vocab_start, self.vocab_end)

    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's embedding table."""
        if isinstance(self.embed_tokens, QuantizedWeight):
            return self.embed_tokens.rows(rows).to(self.norm.dtype)
        return self.embed_tokens[rows]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states of the rows in `batch.logits_indices` (those that sample, then those scored).

        The decoder layers and the final norm run as one C call where that is what this model is
        (`c_layers`) and the step plans the C attention; else layer by layer, op by op: the same
        bits either way."""
        x = self.embed(batch.input_ids)
        if self.c_layers is not None and isinstance(batch.attention_plan, kernels.NativePlan):
            return self.c_layers(x, kv_caches, batch.positions, batch.slot_mapping, batch.attention_plan,
                                 batch.logits_indices)
        rotary, residual = kernels.RotaryInputs.of(batch.positions, self.cos_sin), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, batch, k_cache, v_cache, rotary)
        rows = batch.logits_indices
        return kernels.add_rms_norm(x[rows], residual[rows], self.norm, self.config.rms_norm_eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> [S, vocab] float32 logits, on the first rank (None on the others)."""
        return self.tp.gather_logits(kernels.linear(hidden, self.lm_head).float(), self.config.vocab_size)

    def load_weights(self, state: dict[str, torch.Tensor | QuantizedWeight]) -> None:
        """Take Hugging Face-named weights, fusing q/k/v and gate/up, keeping this rank's shard of
        each; every weight must be set (an MoE layer's experts named as `weights.unify_expert_names`
        names them).

        Float weights move to the model's device and dtype; quantized ones are packed for the CPU.
        `state` is emptied as it is read, so that a weight fused or stacked here is not held twice
        (a float MoE's experts would otherwise need twice their size at load); the tied embedding
        is the one weight read twice, from the value taken.
        """
        c = self.config
        state, given = {k.removeprefix("model."): v for k, v in state.items()}, state
        given.clear()
        loader = _Loader(state, self.norm, self.tp.layout)
        vocab = (self.vocab_start, self.vocab_end)
        with torch.no_grad():
            embedding = loader.take("embed_tokens.weight")
            self.embed_tokens = _outputs(embedding, *vocab)
            head = embedding if c.tie_word_embeddings else loader.take("lm_head.weight")
            self.lm_head = _pack(_outputs(_kernel_form(head), *vocab), whole_columns=head.shape[0])
            self.norm.copy_(loader.take("norm.weight"))
            for i, layer in enumerate(self.layers):
                _load_layer(layer, f"layers.{i}.", loader)
        unused = set(loader.state) - {"lm_head.weight"}  # a tied checkpoint may hold a copy
        if unused:
            raise KeyError(f"checkpoint has weights this model does not use: {sorted(unused)[:5]}")
        self.c_layers = self._c_layers()

    def _c_layers(self) -> kernels.DenseLayers | None:
        """The decoder layers and final norm as one C call, where it computes this model: one rank, dense
        layers of plain attention (a q|k|v bias, but no q/k norm or clipping), and every projection
        a single 4-bit weight of the C matmul. None: the layers run op by op."""
        c, layers = self.config, self.layers
        if self.tp.group is not None or c.qk_norm != "none" or c.clip_qkv is not None:
            return None
        if any(layer.moe is not None or len(layer.o_proj) != 1 or len(layer.down_proj) != 1 for layer in layers):
            return None
        weights = [[layer.qkv_proj, layer.o_proj[0], layer.gate_up_proj, layer.down_proj[0]] for layer in layers]
        if not all(isinstance(w, PackedWeight) and w.layout == "native" and w.bits == 4 for ws in weights for w in ws):
            return None
        return kernels.DenseLayers(
            [kernels.DenseLayer(layer.input_norm, layer.post_attention_norm, layer.qkv_bias,
                                *((w.data, w.scales) for w in ws)) for layer, ws in zip(layers, weights)],
            layers[0].num_heads, layers[0].num_kv_heads, c.head_dim, c.rms_norm_eps, self.norm.detach(),
            self.cos_sin)


class _Loader:
    """Hands out a checkpoint's weights by name, as the model's device and dtype want them, each
    once: a weight leaves the state as it is taken (so none is held twice once fused or stacked),
    and one left over is a checkpoint this model misreads. `columns` and `input_splits` cut this
    rank's shard (`layout`) from the whole weight."""

    def __init__(self, state: dict[str, torch.Tensor | QuantizedWeight], like: torch.Tensor, layout: Layout) -> None:
        self.state = state
        self.like = like
        self.layout = layout

    def take(self, name: str) -> torch.Tensor | QuantizedWeight:
        if name not in self.state:
            raise KeyError(f"weight {name} missing from checkpoint")
        value = self.state.pop(name)
        return value if isinstance(value, QuantizedWeight) else value.to(self.like.device, self.like.dtype)

    def fused(self, *names: str) -> Weight:
        """The weights `names` stacked along their outputs (one matmul for q|k|v or gate|up)."""
        return _pack(_cat([self.take(n) for n in names]))

    def columns(self, names: list[str], what: list[str]) -> Weight:
        """The weights `names` fused along their outputs, each cut to this rank's equal share of its
        outputs (`what` names them in errors). The kernel form is that of the whole fused weight, so
        that every TP size reads the same integers."""
        parts = [self.take(n) for n in names]
        whole, offset, rows = _kernel_form(_cat(parts)), 0, []
        for part, name in zip(parts, what, strict=True):
            start, end = self.layout.part(part.shape[0], name)
            rows.append(_outputs(whole, offset + start, offset + end))
            offset += part.shape[0]
        return _pack(_cat(rows), shard=True, whole_columns=whole.shape[0])

    def input_splits(self, name: str) -> list[Weight]:
        """Weight `name` as this rank's K-splits (`Layout.input_splits`), each packed on its own."""
        whole = _kernel_form(self.take(name))
        return [_pack(_inputs(whole, start, end), shard=True)
                for start, end in self.layout.input_splits(whole.shape[1], name)]

    def vector(self, names: list[str]) -> torch.Tensor:
        """Per-output vectors (biases) of `names`, each cut to this rank's share, concatenated."""
        parts = []
        for name in names:
            value = self.take(name)
            parts.append(value[slice(*self.layout.part(value.shape[0], name))])
        return torch.cat(parts)


def _cat(parts: list[torch.Tensor | QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    if isinstance(parts[0], QuantizedWeight):
        return QuantizedWeight.cat(parts) if len(parts) > 1 else parts[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _kernel_form(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    return weight.kernel_form() if isinstance(weight, QuantizedWeight) else weight


def _outputs(weight: torch.Tensor | QuantizedWeight, start: int, end: int) -> torch.Tensor | QuantizedWeight:
    """Output rows start..end-1 of a weight (zeros past its last row: a padded vocabulary shard)."""
    if isinstance(weight, QuantizedWeight):
        return weight.outputs(start, end)
    if start == 0 and end == weight.shape[0]:
        return weight
    part = weight[start:end]
    missing = end - start - part.shape[0]
    return torch.cat([part, part.new_zeros((missing, *part.shape[1:]))]) if missing else part.contiguous()


def _inputs(weight: torch.Tensor | QuantizedWeight, start: int, end: int) -> torch.Tensor | QuantizedWeight:
    if isinstance(weight, QuantizedWeight):
        return weight.inputs(start, end)
    return weight if start == 0 and end == weight.shape[1] else weight[:, start:end].contiguous()


def _pack(weight: torch.Tensor | QuantizedWeight, shard: bool = False, whole_columns: int | None = None) -> Weight:
    """A weight as the matmul reads it (quantized ones packed). A `shard` must already be in the
    kernel form its whole weight took: one the 4-bit kernel cannot take is refused, not requantized.
    A float column shard of a weight with `whole_columns` outputs is marked as one
    (`kernels.column_shard`)."""
    if not isinstance(weight, QuantizedWeight):
        return weight if whole_columns is None else kernels.column_shard(weight, whole_columns)
    if shard and weight.kernel_form() is not weight:
        raise ValueError(f"a {list(weight.shape)} shard does not fit the 4-bit kernel (it packs outputs 16 at "
                         "a time, inputs by group): choose another --tensor-parallel-size or --tp-invariant-splits")
    return weight.pack()


def _load_layer(layer: DecoderLayer, p: str, loader: _Loader) -> None:
    attn = f"{p}self_attn."
    layer.qkv_proj = loader.columns([f"{attn}{n}_proj.weight" for n in "qkv"],
                                    ["attention heads", "key/value heads", "key/value heads"])
    if layer.qkv_bias is not None:
        layer.qkv_bias.copy_(loader.vector([f"{attn}{n}_proj.bias" for n in "qkv"]))
    if layer.q_norm is not None:
        layer.q_norm.copy_(loader.take(f"{attn}q_norm.weight"))
        layer.k_norm.copy_(loader.take(f"{attn}k_norm.weight"))
    layer.o_proj = loader.input_splits(f"{attn}o_proj.weight")
    layer.input_norm.copy_(loader.take(f"{p}input_layernorm.weight"))
    layer.post_attention_norm.copy_(loader.take(f"{p}post_attention_layernorm.weight"))
    if layer.moe is None:
        layer.gate_up_proj = loader.columns([f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"],
                                            ["MLP columns", "MLP columns"])
        layer.down_proj = loader.input_splits(f"{p}mlp.down_proj.weight")
        return
    layer.moe.router = loader.fused(f"{p}mlp.gate.weight")
    experts = [f"{p}mlp.experts.{e}." for e in range(layer.moe.config.num_experts)]
    layer.moe.gate_up_proj = _stacked([loader.columns([f"{e}gate_proj.weight", f"{e}up_proj.weight"],
                                                      ["expert MLP columns"] * 2) for e in experts])
    downs = [loader.input_splits(f"{e}down_proj.weight") for e in experts]  # [expert][split]
    layer.moe.down_proj = [_stacked(list(split)) for split in zip(*downs)]


def _stacked(weights: list[Weight]) -> torch.Tensor | list[PackedWeight]:
    """Float expert weights as one [E, N, K] tensor (what the grouped GPU kernel reads; still marked
    a column shard if they were); packed ones stay a list (each in the CPU kernel's own layout)."""
    if not isinstance(weights[0], torch.Tensor):
        return weights
    stacked = torch.stack(weights)
    whole = getattr(weights[0], "whole_columns", None)
    return stacked if whole is None else kernels.column_shard(stacked, whole)


def dummy_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random Hugging Face-named weights of the real shapes (vLLM's --load-format dummy), by seed.

    Created on the default device and dtype; norms are ones, everything else N(0, 0.02).
    """
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes |= _layer_shapes(c, i, f"model.layers.{i}.")
    generator = torch.Generator(device=torch.get_default_device()).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and not name.endswith("bias"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    return state


def _layer_shapes(c: ModelConfig, i: int, p: str) -> dict[str, tuple[int, ...]]:
    """Layer `i`'s weight shapes by Hugging Face name (an MoE layer's experts named one by one)."""
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {
        f"{p}input_layernorm.weight": (c.hidden_size,),
        f"{p}post_attention_layernorm.weight": (c.hidden_size,),
        f"{p}self_attn.q_proj.weight": (q_size, c.hidden_size),
        f"{p}self_attn.k_proj.weight": (kv_size, c.hidden_size),
        f"{p}self_attn.v_proj.weight": (kv_size, c.hidden_size),
        f"{p}self_attn.o_proj.weight": (c.hidden_size, q_size),
    }
    if c.is_sparse(i):
        size = c.moe.intermediate_size
        shapes[f"{p}mlp.gate.weight"] = (c.moe.num_experts, c.hidden_size)
        for e in range(c.moe.num_experts):
            shapes |= {f"{p}mlp.experts.{e}.gate_proj.weight": (size, c.hidden_size),
                       f"{p}mlp.experts.{e}.up_proj.weight": (size, c.hidden_size),
                       f"{p}mlp.experts.{e}.down_proj.weight": (c.hidden_size, size)}
    else:
        shapes |= {f"{p}mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}mlp.down_proj.weight": (c.hidden_size, c.intermediate_size)}
    if c.attention_bias:
        shapes |= {f"{p}self_attn.{n}_proj.bias": (size,) for n, size in (("q", q_size), ("k", kv_size), ("v", kv_size))}
    norm = {"head": (c.head_dim, c.head_dim), "full": (q_size, kv_size)}.get(c.qk_norm)
    if norm:
        shapes |= {f"{p}self_attn.q_norm.weight": (norm[0],), f"{p}self_attn.k_norm.weight": (norm[1],)}
    return shapes
