"""THE ruquant checkpoint format (version 1): the one place that defines it.

The converter writes through this module and the vLLM plugin reads through it; nothing
else knows tensor names, dtypes or the config schema. A scheme is parsed once into a
``RUQuantFormat`` on each side -- ``scheme_format`` from the converter's flags,
``parse_format`` from a checkpoint's config -- and that object travels whole.

A ruquant checkpoint is a Hugging Face model directory whose ``config.json`` carries::

    "quantization_config": {
      "quant_method": "ruquant",
      "format_version": 1,
      "weight":     {"bits": 4, "group_size": -1, "symmetric": true},
      "activation": {"bits": 4, "clip_ratio": 1.0},          # bits 16 = weight-only
      "kv_cache":   {"bits": 16, "value_rotation": "online"},   # see KVCacheSpec
      "online_rotations": {"down_proj": {"kind": "hadamard", "size": 14336}},  # and/or o_proj
      "ignore": ["lm_head"],
      "converter": {...provenance, free-form...}
    }

Every quantized linear ``<prefix>`` (e.g. ``model.layers.0.self_attn.q_proj``) stores:

* ``<prefix>.qweight``      -- 4 bits: uint8 ``(N, K/2)``, two values per byte along K,
  element 2i in the low nibble (see ``reference.pack_int4``); other bits: int8 ``(N, K)``.
* ``<prefix>.weight_scale`` -- float32 ``(N, G)``; G = 1 per channel, K/group_size per group; the
  weight is ``q * scale`` with ``q`` in ``[-2^(bits-1), 2^(bits-1) - 1]``. Scales may be negative (the
  converter's ``--full-range`` grid, ``reference.weight_scale``); loaders must not assume a sign.
* ``<prefix>.bias``         -- optional, in the model dtype.
* ``<prefix>.online_rotation`` -- float32 ``(nb, b, b)``, only for a ``block_diagonal``
  online rotation of that layer's input (every layer has its own: RUQuant's per-layer blocks).

Everything else (embeddings, norms, lm_head) keeps its Hugging Face name and dtype.
RMSNorm weights are folded into the following linears and written as ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_ruquant.checkpoint.models import ROW_PARALLEL, short_name
from vllm_ruquant.hadamard import SUPPORTED_FACTORS, is_hadamard_size

QUANT_METHOD = "ruquant"
FORMAT_VERSION = 1

QWEIGHT = "qweight"
WEIGHT_SCALE = "weight_scale"
BIAS = "bias"
ONLINE_ROTATION = "online_rotation"

WEIGHT_BITS = (3, 4, 6, 8)
ACTIVATION_BITS = (3, 4, 6, 8, 16)
KV_BITS = (3, 4, 8, 16)
KV_VALUE_ROTATIONS = ("online", "offline")
ROTATION_KINDS = ("hadamard", "block_diagonal")
# linear layers (by their last name) that may carry an online input rotation: down_proj (R4, or
# RUQuant's blocks) and o_proj (``ruquant-online-o``'s per-layer blocks; R2 mixes within a head
# only, so o_proj's input has no rotation across heads otherwise). Both are row-parallel: a
# rotation acts within a tensor-parallel shard of the input.
ROTATABLE_SITES = ("down_proj", "o_proj")

# The named recipes a user picks on the command line: weight bits, activation bits, kv bits.
SCHEMES: dict[str, tuple[int, int, int]] = {
    "w4a16": (4, 16, 16),
    "w4a8": (4, 8, 16),
    "w4a4": (4, 4, 16),
    "w4a4kv4": (4, 4, 4),
    "w4a8kv4": (4, 8, 4),
    "w8a8": (8, 8, 16),
    "w6a6": (6, 6, 16),
    "w3a3kv3": (3, 3, 3),  # GBS+DE's scheme: use with --clip gbs (3-bit values stored as int8)
}


class FormatError(ValueError):
    """A ruquant checkpoint or config is malformed; the message says what and where."""


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True


@dataclass(frozen=True)
class ActivationSpec:
    bits: int = 4  # 16: no activation quantization (weight-only scheme)
    clip_ratio: float = 1.0


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache the model was calibrated for (arithmetic: ``reference.simulate_kv_cache``).

    bits 4 is served as vLLM's ``int4_per_token_head`` cache: per (token, head) asymmetric
    4-bit, keys and queries rotated online by a randomized Hadamard over head_dim.
    ``value_rotation`` says where V's rotation lives: ``"offline"`` -- the converter folded
    a per-head orthogonal R2 into v_proj / o_proj, so serving quantizes V as it comes;
    ``"online"`` -- serving rotates V on write and un-rotates the attention output.
    bits 3 and 8 are simulation-only.
    """

    bits: int = 16
    value_rotation: str = "online"


@dataclass(frozen=True)
class RotationSpec:
    kind: str  # "hadamard" | "block_diagonal"
    size: int
    # block_diagonal: the dense block size; hadamard: optional, I (x) H_block_size, one Hadamard
    # per tensor-parallel shard (written by ``ruquant-convert --tp-size``)
    block_size: int | None = None
    # hadamard only (``ruquant-convert --dimension-expansion``): the layer's input has
    # ``padded_from`` features and no Hadamard of that size exists, so the input is zero-padded
    # to ``size`` and rotated there; the layer's ``qweight`` then has ``size`` input columns
    padded_from: int | None = None

    @property
    def in_features(self) -> int:
        """The layer input size the rotation reads (``size`` unless it zero-pads)."""
        return self.padded_from if self.padded_from is not None else self.size


@dataclass(frozen=True)
class RUQuantFormat:
    """The parsed, validated ``quantization_config`` of a ruquant checkpoint."""

    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    online_rotations: dict[str, RotationSpec] = field(default_factory=dict)
    ignore: tuple[str, ...] = ("lm_head",)
    converter: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The tensor-parallel size the checkpoint was converted for. Row-parallel layers
    # (o_proj, down_proj) quantize their activations per shard (each rank scales its own
    # slice of K) and online rotations act within a shard, so serving at another TP size
    # would compute a different model than the converter calibrated: the loader refuses it.
    tp_size: int = 1

    # ------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight": dataclasses.asdict(self.weight),
            "activation": dataclasses.asdict(self.activation),
            "kv_cache": dataclasses.asdict(self.kv_cache),
            "online_rotations": {
                site: {k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                for site, r in self.online_rotations.items()
            },
            "ignore": list(self.ignore),
            "converter": dict(self.converter),
            "tp_size": self.tp_size,
        }

    @classmethod
    def from_dict(cls, cfg: Any) -> RUQuantFormat:
        """Parse and validate; every problem becomes one ``FormatError`` with its key path."""
        if not isinstance(cfg, dict):
            raise FormatError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
        if cfg.get("quant_method") != QUANT_METHOD:
            raise FormatError(
                f"quantization_config.quant_method is {cfg.get('quant_method')!r}, expected {QUANT_METHOD!r}"
            )
        version = cfg.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # true / 1.0 are not 1
            raise FormatError(
                f"quantization_config.format_version is {version!r}; this vllm-ruquant reads "
                f"version {FORMAT_VERSION} (re-convert the model or upgrade vllm-ruquant)"
            )
        known = {"quant_method", "format_version", "weight", "activation", "kv_cache",
                 "online_rotations", "ignore", "converter", "tp_size"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise FormatError(f"quantization_config has unknown keys {unknown}")
        weight = _section(cfg, "weight", WeightSpec)
        activation = _section(cfg, "activation", ActivationSpec)
        kv = _section(cfg, "kv_cache", KVCacheSpec)
        rots_raw = cfg.get("online_rotations", {})
        if not isinstance(rots_raw, dict):
            raise FormatError("quantization_config.online_rotations must be an object")
        rots = {site: _section(rots_raw, site, RotationSpec, path="online_rotations.")
                for site in rots_raw}
        ignore = cfg.get("ignore", ["lm_head"])
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise FormatError("quantization_config.ignore must be a list of module names")
        converter = cfg.get("converter", {})
        if not isinstance(converter, dict):
            raise FormatError("quantization_config.converter must be an object")
        tp = cfg.get("tp_size", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise FormatError(f"quantization_config.tp_size must be a positive integer, got {tp!r}")
        fmt = cls(weight, activation, kv, rots, tuple(ignore), converter, version, tp)
        fmt.validate()
        return fmt

    # ------------------------------------------------------------------------ checks

    def validate(self) -> None:
        w, a, kv = self.weight, self.activation, self.kv_cache
        _check(w.bits in WEIGHT_BITS, f"weight.bits must be one of {WEIGHT_BITS}, got {w.bits}")
        _check(w.group_size == -1 or (w.group_size > 0 and w.group_size % 2 == 0),
               f"weight.group_size must be -1 or a positive even number, got {w.group_size}")
        _check(w.symmetric is True,
               "weight.symmetric=false (zero points) is not supported by format version 1")
        _check(a.bits in ACTIVATION_BITS, f"activation.bits must be one of {ACTIVATION_BITS}, got {a.bits}")
        _check(0.0 < a.clip_ratio <= 1.0, f"activation.clip_ratio must be in (0, 1], got {a.clip_ratio}")
        _check(kv.bits in KV_BITS, f"kv_cache.bits must be one of {KV_BITS}, got {kv.bits}")
        _check(kv.value_rotation in KV_VALUE_ROTATIONS,
               f"kv_cache.value_rotation must be one of {KV_VALUE_ROTATIONS}, got {kv.value_rotation!r}")
        for site, r in self.online_rotations.items():
            where = f"online_rotations.{site}"
            _check(site in ROTATABLE_SITES, f"{where}: online rotations are supported on {ROTATABLE_SITES}")
            _check(r.kind in ROTATION_KINDS, f"{where}.kind must be one of {ROTATION_KINDS}, got {r.kind!r}")
            _check(r.size > 0, f"{where}.size must be positive, got {r.size}")
            if r.padded_from is not None:
                _check(r.kind == "hadamard", f"{where}.padded_from is for kind 'hadamard' only")
                _check(0 < r.padded_from < r.size,
                       f"{where}.padded_from must be in (0, size {r.size}), got {r.padded_from}")
                _check(r.block_size is None and self.tp_size == 1,
                       f"{where}.padded_from (dimension expansion) needs tp_size 1 and no block_size")
            if r.kind == "hadamard":
                b = r.block_size if r.block_size is not None else r.size
                _check(isinstance(b, int) and b > 0 and r.size % b == 0,
                       f"{where}.block_size must divide size {r.size}, got {b}")
                _check(is_hadamard_size(b), f"{where}: no Hadamard rotation of size {b}")
            else:
                b = r.block_size
                _check(isinstance(b, int) and b > 0 and r.size % b == 0,
                       f"{where}.block_size must divide size {r.size}, got {b}")

    def check_model(self, hidden_size: int, intermediate_size: int, attention_size: int | None = None) -> None:
        """Shapes the config implies must match the model's dimensions (``attention_size``: o_proj's
        input, heads x head_dim; the hidden size where the model does not say otherwise)."""
        attention_size = hidden_size if attention_size is None else attention_size
        sizes = {"down_proj": intermediate_size, "o_proj": attention_size}
        for site, r in self.online_rotations.items():
            what = "padded_from" if r.padded_from is not None else "size"
            _check(r.in_features == sizes[site],
                   f"online_rotations.{site}.{what} is {r.in_features} but the model's input size of "
                   f"{site} is {sizes[site]}")
        g = self.weight.group_size
        if g != -1:
            for name, k in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("heads x head_dim", attention_size)):
                _check(k % g == 0, f"weight.group_size {g} does not divide {name} {k}")
            for site, r in self.online_rotations.items():
                _check(r.padded_from is None or r.size % g == 0,
                       f"weight.group_size {g} does not divide the padded input size {r.size} of {site}")

    # ------------------------------------------------------------------ conveniences

    @property
    def weight_only(self) -> bool:
        return self.activation.bits >= 16

    @property
    def scheme(self) -> str:
        """The scheme's name as ``SCHEMES`` spells it (``w4a4kv4``; ``a16`` for weight-only)."""
        kv = f"kv{self.kv_cache.bits}" if self.kv_cache.bits < 16 else ""
        return f"w{self.weight.bits}a{self.activation.bits}{kv}"

    def act_shards(self, prefix: str) -> int:
        """Activation-quantization shards of a layer: ``tp_size`` for row-parallel layers."""
        return self.tp_size if short_name(prefix) in ROW_PARALLEL else 1

    def is_ignored(self, prefix: str) -> bool:
        return any(prefix == i or prefix.endswith("." + i) for i in self.ignore)

    def rotation_for(self, prefix: str) -> RotationSpec | None:
        return self.online_rotations.get(short_name(prefix))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FormatError(f"invalid ruquant quantization_config: {message}")


def _section(cfg: dict, key: str, spec_cls: type, path: str = "") -> Any:
    raw = cfg.get(key, {})
    if not isinstance(raw, dict):
        raise FormatError(f"quantization_config.{path}{key} must be an object")
    names = {f.name: f for f in dataclasses.fields(spec_cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise FormatError(f"quantization_config.{path}{key} has unknown keys {unknown}")
    for k, v in raw.items():
        want = names[k].type
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "bool": isinstance(v, bool),
            "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            "str": isinstance(v, str),
            "int | None": v is None or (isinstance(v, int) and not isinstance(v, bool)),
        }.get(str(want), True)
        if not ok:
            raise FormatError(f"quantization_config.{path}{key}.{k} must be {want}, got {v!r}")
    try:
        return spec_cls(**raw)
    except TypeError as e:  # a required field is missing
        raise FormatError(f"quantization_config.{path}{key}: {e}") from None


def scheme_format(scheme: str, *, group_size: int = -1, clip_ratio: float = 1.0,
                  **overrides: Any) -> RUQuantFormat:
    """The validated format a named scheme (``w4a4kv4`` ...) produces, before rotations are added:
    what the converter's ``--scheme``, ``--group-size`` and ``--act-clip-ratio`` mean."""
    if scheme not in SCHEMES:
        raise FormatError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    wb, ab, kvb = SCHEMES[scheme]
    fields = {"weight": WeightSpec(bits=wb, group_size=group_size),
              "activation": ActivationSpec(bits=ab, clip_ratio=clip_ratio), "kv_cache": KVCacheSpec(bits=kvb)}
    fmt = RUQuantFormat(**{**fields, **overrides})
    fmt.validate()
    return fmt


def _prescreen_rotation_sizes(qc: Any) -> None:
    """Refuse Hadamard sizes whose dense factor is not one of ``hadamard.SUPPORTED_FACTORS``
    *before* ``RUQuantFormat.from_dict`` tries to construct them.

    Why: ``from_dict`` checks a size by building its Hadamard factor (``factor_size``), which
    for an adversarial size (say 4 * a large prime + 4) runs a trial-division loop linear in
    the size and may build and self-check a dense matrix of that order: a hang or an OOM
    from one edited number in config.json. Real models' sizes (11008, 14336, 18944, ...) are
    ``m * 2^k`` with ``m`` a supported factor, which the factor search reaches quickly.
    Anything malformed is left for ``from_dict`` to report.
    """
    rots = qc.get("online_rotations") if isinstance(qc, dict) else None
    if not isinstance(rots, dict):
        return
    for site, r in rots.items():
        if not isinstance(r, dict) or r.get("kind") != "hadamard":
            continue
        # a per-shard Hadamard (``--tp-size``) builds its block_size, not its size
        block = r.get("block_size")
        n = block if block is not None else r.get("size")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            continue
        p = n & -n
        if n == p or any(n % m == 0 and (n // m) & (n // m - 1) == 0 for m in SUPPORTED_FACTORS):
            continue
        _check(False, f"online_rotations.{site}: no Hadamard rotation of size {n} (sizes are 2^k or m*2^k "
                      f"with m in {', '.join(map(str, SUPPORTED_FACTORS))})")


_PARSED: dict[str, RUQuantFormat] = {}


def parse_format(qc: Any) -> RUQuantFormat:
    """A checkpoint's ``quantization_config`` parsed and validated (``FormatError`` otherwise).

    In a serving process vLLM hands the same config to ``RUQuantConfig``, to the KV-cache
    dtype resolver and (from config.json) to the validator: it is parsed once, the first
    time, and the same object is returned after that (keyed by its canonical JSON).
    """
    try:
        key = json.dumps(qc, sort_keys=True)
    except (TypeError, ValueError):  # not JSON data: from_dict says what is wrong with it
        key = None
    if key is not None and key in _PARSED:
        return _PARSED[key]
    _prescreen_rotation_sizes(qc)
    fmt = RUQuantFormat.from_dict(qc)
    if key is not None:
        if len(_PARSED) >= 16:
            _PARSED.clear()
        _PARSED[key] = fmt
    return fmt


# ---------------------------------------------------------------------- tensor names


def tensor_name(prefix: str, kind: str) -> str:
    return f"{prefix}.{kind}"


def linear_tensor_shapes(fmt: RUQuantFormat, out_features: int, in_features: int,
                         rotation: RotationSpec | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected (shape, dtype name) of every tensor of one quantized linear layer.

    ``in_features`` is the layer's input size; a dimension-expanded rotation
    (``padded_from``) makes the stored weight ``rotation.size`` columns wide.
    """
    if rotation is not None and rotation.padded_from is not None:
        in_features = rotation.size
    bits, g = fmt.weight.bits, fmt.weight.group_size
    groups = 1 if g == -1 else in_features // g
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        QWEIGHT: ((out_features, in_features // 2), "uint8") if bits == 4
        else ((out_features, in_features), "int8"),
        WEIGHT_SCALE: ((out_features, groups), "float32"),
    }
    if rotation is not None and rotation.kind == "block_diagonal":
        b = rotation.block_size
        assert b is not None
        shapes[ONLINE_ROTATION] = ((rotation.size // b, b, b), "float32")
    return shapes


def online_rotation(spec: RotationSpec, blocks: Any = None) -> Any:
    """The executable ``reference.OnlineRotation`` for a spec (+ its stored blocks)."""
    from vllm_ruquant.reference import OnlineRotation

    if spec.kind == "block_diagonal" and blocks is None:
        raise FormatError(f"block_diagonal online rotation of size {spec.size} needs its "
                          f"'{ONLINE_ROTATION}' tensor")
    if spec.kind == "block_diagonal":
        return OnlineRotation(spec.kind, spec.size, blocks)
    return OnlineRotation(spec.kind, spec.size, block_size=spec.block_size, padded_from=spec.padded_from)
