"""Convert a merged Hugging Face Llama 3 checkpoint into one GGUF file for llama.cpp and Ollama.

Only `LlamaForCausalLM` with a Llama 3 / 3.1 tokenizer is converted; anything else fails with an
error naming what is unsupported, because a GGUF that loads but computes or tokenizes differently
is worse than none. Tensors are streamed one at a time, so an 8B model needs no 16 GB of RAM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainjob.gguf_vocab import UnsupportedModelError, add_vocab, read_llama3_vocab

SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"
ARCH = "llama"

# Output types the gguf package can produce by itself (its quants module quantizes these; the
# k-quants such as q4_k_m need llama.cpp's own `llama-quantize`).
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# Keys whose tensors llama.cpp's Llama graph does not use (buffers some versions saved).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class LlamaShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_llama3: dict | None  # Llama 3.1's long-context scaling parameters, when present
    tied_embeddings: bool  # Llama 3.2 1B/3B: the output projection is the embedding


def write_gguf(model_dir, out_path, quant: str = "f16", name: str | None = None) -> Path:
    """Write `model_dir` (config.json, *.safetensors, tokenizer files) as a GGUF of type `quant`."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    shape = read_llama_shape(model_dir)
    vocab = read_llama3_vocab(model_dir, shape.vocab_size)
    tensors = list(_plan_tensors(model_dir, shape, quant))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    try:
        _add_model_keys(writer, shape, quant, name or model_dir.name)
        add_vocab(writer, vocab)
        for t in tensors:
            writer.add_tensor_info(t.gguf_name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = _convert(t.load(), t.qtype)
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.gguf_name}: converted to {data.nbytes} bytes, expected {t.nbytes}")
            writer.write_tensor_data(data)
    finally:
        writer.close()
    # Written under a temporary name so an interrupted export never leaves a truncated model behind.
    partial.replace(out_path)
    return out_path


def read_llama_shape(model_dir: Path) -> LlamaShape:
    """Read config.json and refuse what this converter does not handle."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"{model_dir} has no config.json: is it a saved (merged) model?")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if architectures != [SUPPORTED_ARCHITECTURE] or config.get("model_type") != "llama":
        raise UnsupportedModelError(
            f"{model_dir}: architecture {', '.join(map(str, architectures))} "
            f"(model_type {config.get('model_type')!r}) is not supported; "
            f"GGUF export handles {SUPPORTED_ARCHITECTURE} (Llama 3 / 3.1) only"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UnsupportedModelError(f"{model_dir}: Llama with attention/MLP biases is not supported")
    if config.get("quantization_config"):
        raise UnsupportedModelError(
            f"{model_dir} holds quantized weights ({config['quantization_config'].get('quant_method')}); "
            "export the merged 16-bit model"
        )
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return LlamaShape(
        layers=config["num_hidden_layers"],
        hidden=hidden,
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate=config["intermediate_size"],
        context=config.get("max_position_embeddings", 8192),
        vocab_size=config["vocab_size"],
        rms_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(config),
        rope_llama3=_rope_llama3(config, model_dir),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_theta(config: dict) -> float:
    # transformers 5 nests it in rope_parameters; older configs keep it at the top level.
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _rope_llama3(config: dict, model_dir: Path) -> dict | None:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        return params
    raise UnsupportedModelError(
        f"{model_dir}: RoPE scaling {rope_type!r} is not supported (only Llama 3.1's)"
    )


def _add_model_keys(writer, shape: LlamaShape, quant: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_file_type(_FILE_TYPES[quant](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


_FILE_TYPES = {
    "f32": lambda g: g.LlamaFileType.ALL_F32,
    "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
    "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
    "q5_1": lambda g: g.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": lambda g: g.LlamaFileType.MOSTLY_Q5_0,
    "q4_1": lambda g: g.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0,
}


@dataclass
class _PlannedTensor:
    gguf_name: str
    qtype: int  # gguf.GGMLQuantizationType
    byte_shape: tuple[int, ...]
    nbytes: int
    load: object  # () -> float32 ndarray, already in llama.cpp's layout


def _plan_tensors(model_dir: Path, shape: LlamaShape, quant: str) -> Iterator[_PlannedTensor]:
    """Decide each tensor's GGUF name and type from the safetensors headers, without loading data."""
    import gguf

    if shape.rope_llama3 is not None:
        factors = llama3_rope_factors(shape.rope_llama3, shape.rope_theta, shape.head_dim)
        yield _planned("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)
    seen = set()
    for hf_name, file, tensor_shape in _safetensors_index(model_dir):
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or "lora_" in hf_name:
            raise UnsupportedModelError(
                f"{model_dir}: tensor {hf_name!r} has no place in a Llama GGUF"
                + (" (LoRA weights: export the merged model, not the adapter)" if "lora_" in hf_name else "")
            )
        seen.add(gguf_name)
        qtype = _tensor_type(gguf_name, tensor_shape, quant)
        yield _planned(gguf_name, tuple(tensor_shape), qtype, _loader(file, hf_name, gguf_name, shape))

    # Without output.weight llama.cpp reuses the embedding: right only for tied models.
    required = {"token_embd.weight", "output_norm.weight"} | (
        set() if shape.tied_embeddings else {"output.weight"}
    )
    missing = required - seen
    if missing:
        raise UnsupportedModelError(f"{model_dir}: the checkpoint lacks {', '.join(sorted(missing))}")


def _planned(name, tensor_shape, qtype, load) -> _PlannedTensor:
    from gguf.quants import quant_shape_to_byte_shape

    byte_shape = quant_shape_to_byte_shape(tuple(tensor_shape), qtype)
    return _PlannedTensor(name, qtype, byte_shape, math.prod(byte_shape), load)


def _tensor_type(gguf_name: str, tensor_shape, quant: str) -> int:
    import gguf

    Q = gguf.GGMLQuantizationType
    # Norm weights and other vectors stay f32, as llama.cpp's own converter keeps them.
    if len(tensor_shape) < 2 or quant == "f32":
        return Q.F32
    qtype = Q[quant.upper()]
    # The output projection decides every token: in the 4/5-bit files it stays at 8 bits
    # (llama.cpp's quantizer would use q6_K there, which the gguf package cannot produce).
    if gguf_name == "output.weight" and quant.startswith(("q4", "q5")):
        qtype = Q.Q8_0
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if tensor_shape[-1] % block_size:
        return Q.F16  # rows that do not split into whole blocks cannot be quantized
    return qtype


def _convert(data: np.ndarray, qtype: int) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        array = data.astype(np.float32)
    elif qtype == Q.F16:
        array = data.astype(np.float16)
    else:
        array = quantize(data.astype(np.float32), Q(qtype))
    return np.ascontiguousarray(array).view(np.uint8)


def _loader(file: Path, hf_name: str, gguf_name: str, shape: LlamaShape):
    def load() -> np.ndarray:
        from safetensors import safe_open

        # torch reads bf16 checkpoints, which numpy cannot.
        with safe_open(file, framework="pt") as f:
            data = f.get_tensor(hf_name).float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            return rope_interleave(data, shape.heads)
        if gguf_name.endswith("attn_k.weight"):
            return rope_interleave(data, shape.kv_heads)
        return data

    return load


def rope_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face rotates dimension i of each head with dimension i + head_dim/2 ("rotate half");
    llama.cpp's Llama rotates adjacent pairs (2i, 2i+1). Interleaving each head's two halves makes
    llama.cpp's rotation compute exactly what the Hugging Face model computes.
    """
    rows = weight.shape[0]
    head_dim = rows // heads
    halves = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(params: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors, stored as the `rope_freqs` tensor.

    The gguf package has no helper for this: llama.cpp divides each rotary frequency by these
    factors, which reproduces the "llama3" frequency scaling Hugging Face applies at load time.
    """
    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    original = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    divisors = np.where(
        wavelen < original / high,
        1.0,
        np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return divisors.astype(np.float32)


def _safetensors_index(model_dir: Path) -> Iterator[tuple[str, Path, list[int]]]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        paths = [model_dir / f for f in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise UnsupportedModelError(
            f"{model_dir} has no *.safetensors weights (save the merged model with safe_serialization=True)"
        )
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, path, list(f.get_slice(key).get_shape())
