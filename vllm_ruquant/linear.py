"""``RUQuantLinearMethod``: ruquant weights inside vLLM's linear layers.

vLLM creates every linear layer (plain, QKV-merged, gate/up-merged, row-parallel) and then
asks the layer's quant method to declare its parameters (``create_weights``), fills them
from the checkpoint through the parameters' weight loaders, lets the method repack them
(``process_weights_after_loading``) and calls ``apply`` in the forward pass.

Parameters use vLLM's ``*vLLMParameter`` classes (weight loader v2), whose ``input_dim`` /
``output_dim`` tell vLLM how to slice each checkpoint tensor for a tensor-parallel rank
and where each merged shard (q/k/v, gate/up) goes. The checkpoint layout is
``format.py``'s; the layout a backend runs on is the backend's business (``ops.py``).
"""

from __future__ import annotations

import torch

from vllm_ruquant import compat, ops
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format
from vllm_ruquant.checkpoint.models import ROW_PARALLEL, short_name
from vllm_ruquant.linear_backend import LinearBackend, LinearSpec
from vllm_ruquant.logs import log_once

logger = compat.plugin_logger(__name__)

# Prepared tensors live on the layer under this prefix so they cannot clash with vLLM's.
PREPARED_PREFIX = "ruquant_"


class RUQuantLinearMethod(compat.LinearMethodBase):
    """Packed int4/int8 weights + fp32 scales, run through the backend ``ops`` selects."""

    def __init__(self, quant_config: compat.QuantizationConfig, prefix: str) -> None:
        self.quant_config = quant_config
        self.fmt: format.RUQuantFormat = quant_config.fmt
        self.prefix = prefix
        self.rotation_spec = self.fmt.rotation_for(prefix)

    # ---------------------------------------------------------------- create_weights

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        """Declare ``qweight``, ``weight_scale`` and (block-diagonal) ``online_rotation``."""
        weight_loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        bits, g = self.fmt.weight.bits, self.fmt.weight.group_size
        self._check_shapes(k, input_size, layer)
        rot = self.rotation_spec
        if rot is not None and rot.padded_from is not None:
            k = rot.size  # dimension expansion: the weight reads the zero-padded, rotated input

        layer.register_parameter(format.QWEIGHT, _qweight_param(n, k, bits, weight_loader))
        layer.register_parameter(format.WEIGHT_SCALE, _scale_param(n, k, g, weight_loader))
        if rot is not None and rot.kind == "block_diagonal":
            assert rot.block_size is not None
            blocks = torch.empty(rot.size // rot.block_size, rot.block_size, rot.block_size,
                                 dtype=torch.float32)
            blocks = blocks[: k // rot.block_size]  # this rank's blocks (all of them at TP=1)
            # sharded along the block axis like the input columns of a row-parallel layer
            layer.register_parameter(
                format.ONLINE_ROTATION,
                compat.ModelWeightParameter(data=blocks.contiguous(), input_dim=0, output_dim=1,
                                            weight_loader=weight_loader),
            )
        layer.ruquant_in_features = k
        layer.ruquant_out_features = n

    def _check_shapes(self, k: int, input_size: int, layer: torch.nn.Module) -> None:
        """Errors a checkpoint/model mismatch or an unsupported sharding would cause later, now."""
        g = self.fmt.weight.group_size
        if g != -1 and k % g:
            raise ValueError(
                f"ruquant: {self.prefix}: weight.group_size {g} does not divide the layer's "
                f"input size {k} on this tensor-parallel rank"
            )
        if self.fmt.weight.bits == 4 and k % 2:
            raise ValueError(f"ruquant: {self.prefix}: int4 packing needs an even input size, got {k}")
        tp = compat.tensor_parallel_world_size()
        if tp != self.fmt.tp_size and not self.fmt.weight_only and short_name(self.prefix) in ROW_PARALLEL:
            raise ValueError(
                f"ruquant: this checkpoint was converted for --tensor-parallel-size {self.fmt.tp_size} "
                f"(row-parallel activations are quantized per shard), but vLLM runs with {tp}; serve it "
                f"with --tensor-parallel-size {self.fmt.tp_size} or re-convert with "
                f"`ruquant-convert --tp-size {tp}`"
            )
        rot = self.rotation_spec
        if rot is None:
            return
        if rot.in_features != input_size:
            raise ValueError(
                f"ruquant: {self.prefix}: online rotation input size {rot.in_features} != layer input size "
                f"{input_size}"
            )
        if rot.padded_from is not None:
            if k != input_size:
                raise NotImplementedError(
                    f"ruquant: {self.prefix}: a dimension-expanded rotation ({rot.padded_from} padded to "
                    f"{rot.size}) reads the whole input; serve with --tensor-parallel-size 1")
            return
        block = rot.block_size if rot.block_size is not None else rot.size
        if k % block:
            raise NotImplementedError(
                f"ruquant: {self.prefix} has an online {rot.kind} rotation over blocks of {block}, but its "
                f"input is sharded into pieces of {k} across {tp} tensor-parallel ranks; re-convert "
                f"with `ruquant-convert --tp-size {tp}` (rotations then act within a shard)"
            )

    # ------------------------------------------------------ after loading / forward

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Hand the loaded tensors to the backend once; keep what it prepares on the layer."""
        qweight = getattr(layer, format.QWEIGHT)
        spec = LinearSpec(
            in_features=layer.ruquant_in_features,
            out_features=layer.ruquant_out_features,
            weight_bits=self.fmt.weight.bits,
            group_size=self.fmt.weight.group_size,
            act_bits=self.fmt.activation.bits,
            clip_ratio=self.fmt.activation.clip_ratio,
            rotation=self._online_rotation(layer),
        )
        backend = ops.select_backend(qweight.device)
        if backend.name != "reference" and spec.rotation is not None and spec.rotation.block_size is not None:
            raise NotImplementedError(
                f"ruquant: {self.prefix}: a per-shard Hadamard ({spec.rotation.block_size} of {spec.in_features}) "
                f"has no GPU kernel yet; serve with --tensor-parallel-size {self.fmt.tp_size} (the size the "
                "checkpoint was converted for), where each rank's rotation is a plain Hadamard")
        prepared = backend.prepare(spec, qweight.data, getattr(layer, format.WEIGHT_SCALE).data)
        # The checkpoint tensors are consumed; the prepared ones replace them.
        delattr(layer, format.QWEIGHT)
        delattr(layer, format.WEIGHT_SCALE)
        attach_prepared(layer, backend, spec, prepared)
        backend.warm_up(spec, prepared, max_tokens=compat.max_batched_tokens(), dtype=compat.model_dtype(),
                        bias=getattr(layer, "bias", None))
        log_once(logger, f"backend:{backend.name}",
                 f"ruquant: linear layers run on the {backend.name!r} backend ({self.fmt_summary()})")

    def _online_rotation(self, layer: torch.nn.Module) -> ref.OnlineRotation | None:
        rot = self.rotation_spec
        if rot is None:
            return None
        k = layer.ruquant_in_features  # this rank's share of the (padded) input
        if rot.kind == "hadamard":
            block = rot.block_size if rot.block_size is not None else rot.size
            return ref.OnlineRotation("hadamard", k, block_size=block if block < k else None,
                                      padded_from=rot.padded_from)
        return ref.OnlineRotation("block_diagonal", k, blocks=getattr(layer, format.ONLINE_ROTATION))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # through a registered op, so torch.compile / CUDA graphs see one opaque call
        weights = [getattr(layer, PREPARED_PREFIX + k) for k in layer.ruquant_prepared_keys]
        if layer.ruquant_graph_quant and torch.compiler.is_compiling():
            # compiled: the quantization as torch ops, for Inductor to fuse into the op before (ops.py)
            spec = layer.ruquant_spec
            q, scale = ref.quantize_activation(x, spec.act_bits, spec.clip_ratio, layer.ruquant_qmax)
            return ops.int_linear_op(q, scale, weights, bias, layer.ruquant_kind_id, x.dtype)
        return ops.linear_op(x, weights, bias, layer.ruquant_kind_id)

    def fmt_summary(self) -> str:
        return f"{self.fmt.scheme}, group_size {self.fmt.weight.group_size}"


compat.register_weight_loader_v2_supported_method(RUQuantLinearMethod)


def attach_prepared(layer: torch.nn.Module, backend: LinearBackend, spec: LinearSpec,
                    prepared: dict[str, torch.Tensor]) -> None:
    """Leave on ``layer`` what ``RUQuantLinearMethod.apply`` reads: the backend's prepared tensors as
    parameters (visible to torch.compile, CUDA graphs and vLLM's device moves), the spec, the op's
    layer kind, and whether the compiled model quantizes the activations in the graph."""
    for key, t in prepared.items():
        layer.register_parameter(PREPARED_PREFIX + key, torch.nn.Parameter(t, requires_grad=False))
    layer.ruquant_prepared_keys = tuple(prepared)
    layer.ruquant_spec = spec
    layer.ruquant_backend = backend
    layer.ruquant_graph_quant = backend.quantizes_in_graph(spec)
    if layer.ruquant_graph_quant:  # a tensor, not a constant Inductor would turn into a reciprocal
        device = next(iter(prepared.values())).device
        layer.register_buffer("ruquant_qmax", torch.tensor(float(ref.qmax_for(spec.act_bits)), device=device),
                              persistent=False)
    params = {k: getattr(layer, PREPARED_PREFIX + k) for k in prepared}
    layer.ruquant_kind_id = ops.register_layer(backend, spec, params)


def _qweight_param(n: int, k: int, bits: int, weight_loader) -> torch.nn.Parameter:
    """uint8 (N, K/2) for 4 bits (packed along the input dim), int8 (N, K) otherwise.

    ``input_dim=1`` is the packed dim: a row-parallel rank's slice of the packed tensor is
    the packed slice of its input columns, since the pairs never straddle ranks (K/tp even).
    """
    if bits == 4:
        return compat.PackedvLLMParameter(
            data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=2, weight_loader=weight_loader,
        )
    return compat.ModelWeightParameter(
        data=torch.empty(n, k, dtype=torch.int8), input_dim=1, output_dim=0, weight_loader=weight_loader
    )


def _scale_param(n: int, k: int, group_size: int, weight_loader) -> torch.nn.Parameter:
    """fp32 (N, G). Per-channel scales are whole on every row-parallel rank (no input dim);
    per-group scales shard with the input columns they scale."""
    if group_size == -1:
        return compat.ChannelQuantScaleParameter(
            data=torch.empty(n, 1, dtype=torch.float32), output_dim=0, weight_loader=weight_loader
        )
    return compat.GroupQuantScaleParameter(
        data=torch.empty(n, k // group_size, dtype=torch.float32), input_dim=1, output_dim=0,
        weight_loader=weight_loader,
    )
