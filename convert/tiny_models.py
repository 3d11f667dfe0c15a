"""Tiny Hugging Face model directories with random weights, built locally (tests, examples,
benchmarks), and the configs of the model shapes benchmarks synthesise.

No model hub is reachable, so every test that needs a model builds one here: a small
byte-level BPE tokenizer trained on a few sentences (so any text, including chat
templates, tokenizes) and a 2-layer Llama / Qwen2 / Mistral with random weights that
``transformers`` and vLLM load as they would a real checkpoint.

The weights are drawn directly with a seeded ``torch.Generator`` (not through
``transformers``' initialisers, which change between versions), with a scale that gives
well separated logits (so greedy decoding is stable against rounding noise) and RMSNorm
gammas away from one (so RMSNorm folding is actually exercised).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Dimensions chosen so vLLM's CPU attention accepts the head size (multiples of 32).
HIDDEN_SIZE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
NUM_LAYERS = 2
MAX_POSITIONS = 512

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A rotated four bit model keeps most of its accuracy.",
    "Hello world, this is a tiny tokenizer for tests.",
    "Large language models are served with vLLM on GPUs and CPUs.",
    "Quantization maps floating point numbers to small integers.",
    "user assistant system: what is the capital of France? Paris is the capital.",
    "One two three four five six seven eight nine ten.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too!",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> int:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) to ``out_dir``.

    Byte-level BPE so that every string (chat roles, digits, unicode) encodes without an
    unknown token, and decoding any id sequence yields text. Returns the vocabulary size
    (which ``make_tiny_llama`` uses as the model's ``vocab_size``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, UNK, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "model_max_length": MAX_POSITIONS,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tok.get_vocab_size()


def tiny_llama_config(
    *,
    vocab_size: int,
    intermediate_size: int = 256,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
) -> dict:
    """The config.json of a tiny model of family ``arch`` (llama | qwen2 | mistral)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=NUM_LAYERS)
    elif arch == "mistral":
        cfg.update(sliding_window=None)
    return cfg


def tiny_llama_weights(
    cfg: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names for the model ``cfg`` describes.

    Linear weights ~ N(0, 1/fan_in) (unit-variance outputs, so activations neither vanish
    nor explode through the layers); the lm_head is scaled up so logits spread over a few
    units and greedy choices have clear margins; norms are 1 + U(-0.3, 0.3); Qwen2 gets
    q/k/v biases.
    """
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def lin(n: int, k: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(n, k, generator=g) * (gain / math.sqrt(k))

    def norm(n: int) -> torch.Tensor:
        return 1.0 + (torch.rand(n, generator=g) - 0.5) * 0.6

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[f"{p}.self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[f"{p}.self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[f"{p}.self_attn.o_proj.weight"] = lin(h, nh * hd)
        if cfg["model_type"] == "qwen2":
            for name, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[f"{p}.self_attn.{name}_proj.bias"] = torch.randn(n, generator=g) * 0.1
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        w[f"{p}.mlp.gate_proj.weight"] = lin(inter, h)
        w[f"{p}.mlp.up_proj.weight"] = lin(inter, h)
        w[f"{p}.mlp.down_proj.weight"] = lin(h, inter)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = lin(v, h, gain=4.0)
    return {k: t.to(dtype).contiguous() for k, t in w.items()}


def make_tiny_llama(
    out_dir: str | Path,
    *,
    intermediate_size: int = 256,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a complete HF model dir (config, safetensors, tokenizer) with random weights.

    ``intermediate_size`` may be any even size, e.g. ``172 * 2`` for a non-power-of-two
    Hadamard. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tiny_tokenizer(out)
    cfg = tiny_llama_config(vocab_size=vocab, intermediate_size=intermediate_size, arch=arch, dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(tiny_llama_weights(cfg, seed=seed, dtype=dtype), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def train_tiny_llama(model_dir: str | Path, *, steps: int = 100, seed: int = 0) -> Path:
    """Train a ``make_tiny_llama`` model in place on a fixed random bigram map (token -> next).

    Why: a random-weight model's greedy choices are near ties (top-2 logit margin ~0.03 over
    32 tokens), so float noise alone -- another kernel's summation order moving one value
    across a 4-bit rounding boundary -- flips them, and "greedy identical" tests nothing but
    luck. After 100 Adam steps the map is learned (loss ~3e-4) and the margins are 4-7 even
    at w4a4kv4; measured on the CPU, 1e-4 relative noise on the norm weights then changes no
    greedy token in 12 of 12 (prompt, draw) pairs, against 9 of 12 for the random model.
    Attention still feeds every logit, so a wrong KV path moves the teacher-forced logprobs.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    out = Path(model_dir)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    cls = Qwen2ForCausalLM if arch.startswith("Qwen2") else LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls.from_pretrained(str(out), torch_dtype=torch.float32)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        seq = [torch.randint(0, vocab, (32, 1), generator=gen)]
        for _ in range(63):
            seq.append(successor[seq[-1]])
        ids = torch.cat(seq, 1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------- benchmark shapes (no weights)

# config.json dimensions of the models benchmarks synthesise (weights: vLLM --load-format dummy,
# or seeded random tensors in benchmarks/ruquant_stage1.py)
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Llama-3-70B's proportions at a quarter of its widths (every layer matrix and Hessian 1/16): the
    # converter's per-layer working set measured on a CPU (benchmarks/convert_scale.py --device cpu)
    "llama3-70b-quarter": dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=80,
                               num_attention_heads=16, num_key_value_heads=2, vocab_size=32768,
                               rope_theta=500000.0, max_position_embeddings=8192),
    # a smoke-test shape that starts in seconds (CPU tests, quick GPU checks); the vocabulary covers
    # the token ids `vllm bench latency` draws (below 10000)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=10240, rope_theta=10000.0, max_position_embeddings=4096),
}


def llama_config(shape: dict[str, Any]) -> dict[str, Any]:
    """The HF config.json of a Llama model of ``shape`` (no quantization)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, **shape,
    }
