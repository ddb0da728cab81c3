"""Configuration: what the model is (ModelConfig) and how the engine runs it (EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                           "Qwen3MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM")

_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

QKNorm = Literal["none", "head", "full"]
"""RMSNorm on q and k before RoPE: none, each head on its own (Qwen3), or the whole projection (OLMoE)."""

_QK_NORM = {"Qwen3ForCausalLM": "head", "Qwen3MoeForCausalLM": "head", "OlmoeForCausalLM": "full"}

QUANTIZATIONS = ("auto", "none", "int8", "int4")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field that is also a `detserve serve` option: the one place it is declared.

    `help` is its --help text; `cli` may give `flag` (a name other than the field's), `choices`, or
    `words` (the flag's words mapped to field values, e.g. on/off for a bool). The option's default
    is the field's, or $DETSERVE_<FLAG> when set (see server/cli.py).
    """
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v projections
    qk_norm: QKNorm
    eos_token_ids: tuple[int, ...]
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to +-clip_qkv
    sliding_window: int | None = None  # Mistral/Mixtral: each query sees at most this many keys
    moe: "MoEConfig | None" = None  # a sparse mixture-of-experts MLP (in the layers it names)

    def __post_init__(self) -> None:
        _check_architecture(self.architecture)
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.moe is not None and not 1 <= self.moe.top_k <= self.moe.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.moe.num_experts}], not {self.moe.top_k}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""), "unknown")])[0]
        _check_architecture(arch)  # before reading fields another architecture may name otherwise
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=_QK_NORM.get(arch, "none"),
            eos_token_ids=eos_ids,
            clip_qkv=hf.get("clip_qkv"),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            moe=MoEConfig.from_hf(hf, arch),
        )

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer`'s MLP is the mixture of experts (else the dense one)."""
        return self.moe is not None and layer not in self.moe.dense_layers


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP: each token goes to the `top_k` of `num_experts` experts its
    router scores highest (no capacity limit, no token dropped), their outputs weighted by the
    router's probabilities (renormalized over the chosen ones when `normalize_top_k`)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    normalize_top_k: bool
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense (Qwen3-MoE's mlp_only_layers, sparse step)

    @classmethod
    def from_hf(cls, hf: dict, arch: str) -> "MoEConfig | None":
        if arch not in ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen3MoeForCausalLM"):
            return None
        num_experts = hf.get("num_experts") or hf["num_local_experts"]  # transformers 5 writes the latter
        normalize = arch == "MixtralForCausalLM" or bool(hf.get("norm_topk_prob", False))  # Mixtral always does
        if arch != "Qwen3MoeForCausalLM":
            return cls(num_experts, hf["num_experts_per_tok"], hf["intermediate_size"], normalize)
        step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(hf["num_hidden_layers"]) if i in dense_only or (i + 1) % step)
        return cls(num_experts, hf["num_experts_per_tok"], hf["moe_intermediate_size"], normalize, dense)


def _check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture}; supported: {SUPPORTED_ARCHITECTURES}")


def _rope_scaling(hf: dict) -> dict | None:
    """The rope scaling dict, if it changes anything ("default" does not)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return None if kind == "default" else dict(scaling, rope_type=kind)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: where, in what precision, with how much KV cache and batching."""

    model: str | None = option(None, "Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M)")
    load_format: Literal["auto", "dummy"] = option("auto", "dummy = random weights, for testing")
    device: str = option("auto", "auto | cpu | cuda[:N]")
    dtype: str = option("auto", "auto = float32 on CPU, bfloat16 on GPU", choices=("auto", *_DTYPES))
    quantization: str = option(
        "auto", "auto = as stored (a GGUF's Q4_0/Q4_1/Q8_0 blocks run on the CPU's 4/8-bit kernels; float on a "
        "GPU); none = float weights; int8/int4 = quantize a float checkpoint's linear weights at load, once, "
        "cached on disk (CPU only)", choices=QUANTIZATIONS)
    default_deterministic: bool = option(
        True, "whether requests that do not say otherwise get bitwise-reproducible answers",
        flag="determinism", words={"on": True, "off": False})
    block_size: int = option(16, "tokens per KV cache block")
    kv_cache_tokens: int = option(16384, "KV cache size in tokens")
    max_num_seqs: int = option(64, "most requests running at once")
    max_num_batched_tokens: int = option(512, "token budget of one step")
    max_model_len: int | None = option(None, "context window (default: the model's)")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of a prompt prefix seen before")
    enforce_eager: bool = option(
        False, "run every step eagerly: no CUDA graphs for decode steps (graphs need a CUDA device, one rank "
        "and a dense model; elsewhere steps are eager anyway)")
    cpu_kernels: Literal["auto", "native", "torch"] = option(
        "auto", "the CPU's norms, RoPE, SiLU and attention: native = compiled C, one call per op (built with "
        "the system's C compiler on first use, cached; float32 models), torch = torch ops (slower, other bits), "
        "auto = native where it builds", choices=("auto", "native", "torch"))
    seed: int = option(0, "seed of the random weights of --load-format dummy")
    served_model_name: str | None = option(None, "the model id clients send (default: from the model's file name)")
    tensor_parallel_size: int = option(
        1, "ranks the model is split over, one process each (gloo on CPU, NCCL on CUDA); under torchrun "
        "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the launcher starts them, else this server does")
    tp_invariant_splits: int | None = option(
        None, "S: every row-parallel matmul sums S fixed K-splits, so deterministic answers are equal at every "
        "tensor-parallel size dividing S (default: the tensor-parallel size, the fewest)")

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, not {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {self.quantization!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, not {self.dtype!r}")
        for name in ("block_size", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size", "tp_invariant_splits"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        if self.invariant_splits % self.tensor_parallel_size:
            raise ValueError(f"tp_invariant_splits ({self.invariant_splits}) must be a multiple of "
                             f"tensor_parallel_size ({self.tensor_parallel_size})")

    @property
    def invariant_splits(self) -> int:
        """S, the K-splits of every row-parallel matmul (`engine/parallel.py`)."""
        return self.tp_invariant_splits or self.tensor_parallel_size

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds: kv_cache_tokens rounded down to whole blocks."""
        return self.num_kv_blocks * self.block_size

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_quantization(self) -> str:
        """The quantization to load with. The 4/8-bit kernels are the CPU's: on a GPU, `auto` means
        float weights, and asking for int4/int8 is an error."""
        if self.torch_device().type == "cpu":
            return self.quantization
        if self.quantization in ("int4", "int8"):
            raise ValueError(f"--quantization {self.quantization} runs on CPU only; use none or auto on a GPU")
        return "none"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.torch_device().type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]
