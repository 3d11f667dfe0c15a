"""The model families a ruquant checkpoint is made of: architectures, dimensions, layer names.

All supported families share the Llama decoder layout (RMSNorm, rotary attention with
grouped KV heads, SwiGLU MLP) and the Hugging Face tensor names; they differ in q/k/v biases
and per-head q/k norms, recorded here so that neither the converter nor the validator
branches on an architecture name. ``model_dims`` reads the dimensions from config.json once,
each checked for type and range, for both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_ruquant.checkpoint.errors import CheckpointError, ExitCode

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Family:
    """What sets an architecture apart from plain Llama."""

    qkv_bias: bool  # q/k/v projections carry biases (unless config.json says otherwise)
    qk_norm: bool  # per-head RMSNorm on q and k (``self_attn.q_norm`` / ``k_norm`` tensors)


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family(qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": Family(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": Family(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": Family(qkv_bias=False, qk_norm=True),
}
# config.json ``model_type`` -> architecture, for configs without ``architectures``
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# The linear layers of a decoder layer, under their layer prefix (``model.layers.<i>.``).
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The linears each RMSNorm feeds: they read the residual stream (R1 on their input side) ...
NORM_READERS: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
READERS = (*NORM_READERS["input_layernorm"], *NORM_READERS["post_attention_layernorm"])
# ... and the linears that write it (R1 on their output side). These are also the layers
# vLLM splits along their input under tensor parallelism (row-parallel).
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
ROW_PARALLEL = tuple(w.rsplit(".", 1)[1] for w in WRITERS)


def short_name(prefix: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``down_proj``."""
    return prefix.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelDims:
    """The shape facts of a Llama-family decoder, read once from config.json."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    torch_dtype: str = "float32"

    @property
    def attention_size(self) -> int:
        """o_proj's input size (heads x head_dim; the hidden size in most models, not in Qwen3)."""
        return self.num_heads * self.head_dim

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def linear_prefixes(self, i: int) -> list[str]:
        p = self.layer_prefix(i)
        return [f"{p}.{n}" for n in LINEARS]

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a decoder linear by its last name."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_heads * hd, d), "k_proj": (self.num_kv_heads * hd, d),
            "v_proj": (self.num_kv_heads * hd, d), "o_proj": (d, self.num_heads * hd),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
        }[name]

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one decoder layer's linears (q, k, v, o, gate, up, down), biases and norms aside."""
        return sum(n * k for n, k in (self.linear_shape(short_name(s)) for s in LINEARS))


def _positive_int(cfg: dict[str, Any], key: str, arch: str, default: Any = None) -> int:
    """A required positive integer (JSON bools and floats are refused: HF and vLLM would either
    crash on them or silently truncate)."""
    v = cfg.get(key, default)
    if v is None:
        raise CheckpointError(f"{CONFIG_FILE} lacks {key!r}, which {arch} needs", ExitCode.BAD_INPUT)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(f"{CONFIG_FILE} has a malformed dimension: {key} must be a positive integer, "
                              f"got {v!r}", ExitCode.BAD_INPUT)
    return v


def model_dims(cfg: dict[str, Any]) -> ModelDims:
    """Dimensions from config.json (or its ``text_config``), with one ``CheckpointError`` otherwise:
    UNSUPPORTED for an architecture outside ``ARCHITECTURES``, BAD_INPUT for a missing or
    malformed value."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:
        cfg = {**text, "architectures": cfg.get("architectures")}
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{CONFIG_FILE} architectures must be a list of names, got {archs!r}",
                              ExitCode.BAD_INPUT)
    model_type = cfg.get("model_type")
    arch = archs[0] if archs else MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {arch or model_type!r}; supported: "
                              f"{', '.join(ARCHITECTURES)}", ExitCode.UNSUPPORTED)
    family = ARCHITECTURES[arch]
    heads = _positive_int(cfg, "num_attention_heads", arch)
    hidden = _positive_int(cfg, "hidden_size", arch)
    kv = _positive_int(cfg, "num_key_value_heads", arch, heads)
    if heads % kv:
        raise CheckpointError(f"{CONFIG_FILE} num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv}", ExitCode.BAD_INPUT)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{CONFIG_FILE} hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads} and no head_dim is given", ExitCode.BAD_INPUT)
        head_dim = hidden // heads
    head_dim = _positive_int({"head_dim": head_dim}, "head_dim", arch)
    inter = _positive_int(cfg, "intermediate_size", arch)
    layers = _positive_int(cfg, "num_hidden_layers", arch)
    vocab = _positive_int(cfg, "vocab_size", arch)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{CONFIG_FILE} tie_word_embeddings must be true or false, got {tie!r}",
                              ExitCode.BAD_INPUT)
    try:
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return ModelDims(
            architecture=arch, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
            num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            qkv_bias=bool(cfg.get("attention_bias", family.qkv_bias)),
            qk_norm=family.qk_norm,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{CONFIG_FILE} has a malformed setting: {e}", ExitCode.BAD_INPUT) from None
