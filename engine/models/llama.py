"""One plain Llama-family forward pass covering Llama/SmolLM2/Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Every op goes through `kernels`, so the same model runs batch-invariant or fast depending on the
kernel mode of the step. Projections are fused at load time (q|k|v and gate|up) so each layer
runs four matmuls instead of seven.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels
from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch


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


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = _param(c.hidden_size)
        self.qkv_proj = _param(q_size + 2 * kv_size, c.hidden_size)
        self.qkv_bias = _param(q_size + 2 * kv_size) if c.attention_bias else None
        self.q_norm = _param(c.head_dim) if c.qk_norm else None
        self.k_norm = _param(c.head_dim) if c.qk_norm else None
        self.o_proj = _param(c.hidden_size, q_size)
        self.post_attention_norm = _param(c.hidden_size)
        self.gate_up_proj = _param(2 * c.intermediate_size, c.hidden_size)
        self.down_proj = _param(c.hidden_size, c.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        c = self.config
        num_tokens = x.shape[0]
        h = kernels.rms_norm(x, self.input_norm, c.rms_norm_eps)
        qkv = kernels.linear(h, self.qkv_proj, self.qkv_bias)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = qkv[:, :q_size].reshape(num_tokens, c.num_heads, c.head_dim)
        k = qkv[:, q_size : q_size + kv_size].reshape(num_tokens, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size :].reshape(num_tokens, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q = kernels.rms_norm(q, self.q_norm, c.rms_norm_eps)
            k = kernels.rms_norm(k, self.k_norm, c.rms_norm_eps)
        q, k = kernels.rope(q, k, batch.positions, cos_sin)
        # Write first, then attend over the cache only: fresh and cached keys take one path.
        kernels.kv_store(k, v, k_cache, v_cache, batch.slot_mapping)
        attn = kernels.attention(q, k_cache, v_cache, batch.attention, c.head_dim**-0.5)
        h, x = kernels.add_rms_norm(kernels.linear(attn.reshape(num_tokens, q_size), self.o_proj), x,
                                    self.post_attention_norm, c.rms_norm_eps)
        return x + kernels.linear(kernels.silu_mul(kernels.linear(h, self.gate_up_proj)), self.down_proj)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = _param(config.hidden_size)
        self.lm_head = None if config.tie_word_embeddings else _param(config.vocab_size, config.hidden_size)
        self.register_buffer("cos_sin", rope_cos_sin_table(config, max_positions), persistent=False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states of the rows that predict a next token: [S, hidden]."""
        x = self.embed_tokens[batch.input_ids]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, batch, k_cache, v_cache, self.cos_sin)
        x = x[batch.logits_indices]
        return kernels.rms_norm(x, self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32 logits."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        return kernels.linear(hidden, weight).float()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up; every parameter must be set."""
        c = self.config
        state = {k.removeprefix("model."): v for k, v in state.items()}
        taken: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"weight {name} missing from checkpoint")
            taken.add(name)
            return state[name]

        with torch.no_grad():
            self.embed_tokens.copy_(take("embed_tokens.weight"))
            self.norm.copy_(take("norm.weight"))
            if self.lm_head is not None:
                self.lm_head.copy_(take("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                p = f"layers.{i}."
                attn = [take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
                layer.qkv_proj.copy_(torch.cat(attn))
                if layer.qkv_bias is not None:
                    layer.qkv_bias.copy_(torch.cat([take(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]))
                if c.qk_norm:
                    layer.q_norm.copy_(take(f"{p}self_attn.q_norm.weight"))
                    layer.k_norm.copy_(take(f"{p}self_attn.k_norm.weight"))
                layer.o_proj.copy_(take(f"{p}self_attn.o_proj.weight"))
                layer.input_norm.copy_(take(f"{p}input_layernorm.weight"))
                layer.post_attention_norm.copy_(take(f"{p}post_attention_layernorm.weight"))
                layer.gate_up_proj.copy_(torch.cat([take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")]))
                layer.down_proj.copy_(take(f"{p}mlp.down_proj.weight"))
        unused = set(state) - taken - {"lm_head.weight"}
        if unused:
            raise KeyError(f"checkpoint has weights this model does not use: {sorted(unused)[:5]}")

    def init_dummy_weights(self, seed: int) -> None:
        """Random weights of the real shapes (like vLLM's --load-format dummy), reproducible by seed."""
        generator = torch.Generator(device=self.embed_tokens.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() == 1 and "bias" not in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
