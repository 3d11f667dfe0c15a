"""Which Hugging Face architectures the converter understands, and their dimensions.

All supported families share the Llama decoder layout (RMSNorm, rotary attention with
grouped KV heads, SwiGLU MLP); they differ in biases and norms, recorded here so that
the rest of the converter never branches on the architecture name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ConvertError, ExitCode

# architecture name -> (q/k/v bias, per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelDims:
    """The shape facts the converter needs, read once from config.json."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def linear_prefixes(self, i: int) -> list[str]:
        p = self.layer_prefix(i)
        return [f"{p}.self_attn.{n}" for n in ATTN_LINEARS] + [f"{p}.mlp.{n}" for n in MLP_LINEARS]

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a linear by its last name."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_heads * hd, d),
            "k_proj": (self.num_kv_heads * hd, d),
            "v_proj": (self.num_kv_heads * hd, d),
            "o_proj": (d, self.num_heads * hd),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }[name]


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConvertError(f"model directory {model_dir} does not exist", ExitCode.BAD_INPUT)
    if not path.is_file():
        raise ConvertError(f"{model_dir} has no config.json: not a Hugging Face model directory",
                           ExitCode.BAD_INPUT)
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}", ExitCode.BAD_INPUT) from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path} must hold a JSON object, got {type(cfg).__name__}", ExitCode.BAD_INPUT)
    return cfg


def model_dims(cfg: dict[str, Any]) -> ModelDims:
    """Validate the architecture and extract dimensions, with one clear error otherwise."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "<unknown>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            ExitCode.UNSUPPORTED,
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"the model is already quantized ({method}); convert a 16/32-bit checkpoint",
                           ExitCode.UNSUPPORTED)
    qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return ModelDims(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", qkv_bias)),
            qk_norm=qk_norm,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise ConvertError(f"config.json lacks {e.args[0]!r}, which {arch} needs", ExitCode.BAD_INPUT) from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConvertError(f"config.json has a malformed dimension or setting: {e}", ExitCode.BAD_INPUT) from None
