"""A GGUF file's weights as they are stored: Q4_0, Q4_1 and Q8_0 blocks stay integers.

Each block holds 32 consecutive inputs of one output row. Q4_1 stores `d * q + m` (q in 0..15),
Q4_0 `d * (q - 8)`, Q8_0 `d * q` (q in -127..127), with d and m float16. The CPU's 4-bit kernel
computes `(q - 8) * scale + zero` per group of 32, so a Q4_x block converts exactly
(scale = d, zero = m + 8d); Q8_0 keeps its per-block scales here, exactly. Any other tensor type
is dequantized with the `gguf` package's own code. Names come back as Hugging Face's, and the
q/k rows that llama.cpp's converter permutes for its rotary layout are put back in HF order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detserve.kernels import QuantizedWeight

_BLOCK = 32

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"GGUF tensor {gguf_name} has no Hugging Face name here")


def read_weights(path: Path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor of the GGUF file, keyed by Hugging Face names; Q4_0/Q4_1/Q8_0 as QuantizedWeight."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    num_heads = _field(reader, f"{arch}.attention.head_count")
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or num_heads
    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == Q.Q4_1:
            value = _q4(data, with_min=True)
        elif t.tensor_type == Q.Q4_0:
            value = _q4(data, with_min=False)
        elif t.tensor_type == Q.Q8_0:
            value = _q8_0(data)
        else:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
            value = torch.from_numpy(dequantize(data, t.tensor_type).astype(np.float32).reshape(shape))
        name = hf_name(t.name)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _unpermute(value, num_heads if "q_proj" in name else num_kv_heads)
        state[name] = value
    return state


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """uint8 [N, row_bytes] -> [N, K / 32, block_bytes]."""
    return data.reshape(data.shape[0], -1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The float16 at `offset` of each block, as float32 [N, K / 32]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0].astype(np.float32))


def _q4(data: np.ndarray, with_min: bool) -> QuantizedWeight:
    header = 4 if with_min else 2
    blocks = _blocks(data, header + _BLOCK // 2)
    packed = blocks[..., header:]
    q = np.concatenate([packed & 0xF, packed >> 4], axis=-1)  # low nibbles are inputs 0..15, high 16..31
    d = _f16(blocks, 0)
    zero = _f16(blocks, 2) + 8 * d if with_min else torch.zeros_like(d)
    return QuantizedWeight(4, torch.from_numpy(q.reshape(q.shape[0], -1)), d, zero, _BLOCK)


def _q8_0(data: np.ndarray) -> QuantizedWeight:
    blocks = _blocks(data, 2 + _BLOCK)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return QuantizedWeight(8, torch.from_numpy(q.reshape(q.shape[0], -1)), _f16(blocks, 0), None, _BLOCK)


def _unpermute(value: torch.Tensor | QuantizedWeight, heads: int) -> torch.Tensor | QuantizedWeight:
    """Undo llama.cpp's row order for q/k (each head's two rotary halves interleaved)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    if isinstance(value, torch.Tensor):
        return rows(value)
    zeros = None if value.zeros is None else rows(value.zeros)
    return QuantizedWeight(value.bits, rows(value.qweight), rows(value.scales), zeros, value.group_size)
