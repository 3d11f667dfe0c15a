"""``ruquant-convert``: command line of the converter (arguments, progress, exit codes).

    ruquant-convert MODEL_DIR OUT_DIR [--scheme w4a4] [--rotation hadamard] [--weight-quantizer gptq]

Every error a user can cause ends in one line on stderr and a distinct exit code (the one
table of ``vllm_ruquant.checkpoint.errors.ExitCode``); the output directory appears only
when conversion succeeds. The scheme flags are parsed once, into ``ConvertOptions.fmt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from convert import distill, scale_tuning
from convert.errors import ConvertError, ExitCode
from convert.model_io import read_source
from convert.pipeline import ConvertOptions, convert
from convert.quantizers import available_quantizers
from convert.recipes import DEFAULT_RECIPE, Recipe, recipe_for, schemes_where
from convert.rotations import available_rotations
from vllm_ruquant.checkpoint.errors import RUQuantError
from vllm_ruquant.checkpoint.format import SCHEMES, FormatError
from vllm_ruquant.checkpoint.models import LINEARS
from vllm_ruquant.hadamard import factor_size, is_hadamard_size


def default_clip(scheme: str, act_clip_ratio: float = 1.0) -> str:
    """``--clip auto``: the scheme's default, unless an activation clip ratio was given (GBS would replace it)."""
    return recipe_for(scheme).clip if act_clip_ratio == 1.0 else "none"


def _defaults_help(field: str, show_value: bool = False) -> str:
    """Where a flag's default is on, from ``DEFAULT_RECIPE`` (so the help never drifts from the recipe)."""
    on = schemes_where(field)
    if not on:
        return "none"
    return ", ".join(f"{getattr(DEFAULT_RECIPE[k], field)} at {k}" if show_value else k for k in on)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ruquant-convert",
        description="Convert a Hugging Face Llama/Mistral/Qwen2/Qwen3 checkpoint into a rotated, "
                    "quantized ruquant checkpoint that `vllm serve OUT --quantization ruquant` serves.")
    ap.add_argument("model_dir", type=Path, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("out_dir", type=Path, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--scheme", default="w4a4", help=f"one of {', '.join(SCHEMES)} (default w4a4)")
    ap.add_argument("--rotation", "--transform", dest="rotation", default=None,
                    help="rotation (transform) method (default: "
                         + "".join(f"{DEFAULT_RECIPE[k].rotation} at {k}, " for k in schemes_where("rotation"))
                         + f"{Recipe().rotation})")
    ap.add_argument("--weight-quantizer", default="gptq", help="weight quantizer (default gptq)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="weight group size; -1 = per output channel (default: the scheme's measured default, "
                         f"{_defaults_help('group_size', show_value=True)}, where it divides every linear "
                         "input; -1 otherwise)")
    ap.add_argument("--act-clip-ratio", type=float, default=1.0, help="activation clip ratio in (0, 1]")
    ap.add_argument("--calib-text", type=Path, default=None,
                    help="UTF-8 calibration text (default: CPython's bundled pydoc documentation)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    # --- quantizer / clipping options (convert/clip.py, convert/quantizers/{septq,lrq}.py)
    ap.add_argument("--clip", default="auto", choices=["auto", "none", "gbs"],
                    help="gbs: gradual binary search of clip ratios (weights per channel, one global "
                         "activation ratio, KV ratios reported); auto (default): the scheme's measured "
                         f"default ({_defaults_help('clip', show_value=True)}; none elsewhere)")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                    help="GPTQ: quantize input columns in decreasing order of the Hessian diagonal (default: "
                         "the scheme's measured default, on for "
                         f"{_defaults_help('act_order')})")
    ap.add_argument("--full-range", action=argparse.BooleanOptionalAction, default=None,
                    help="weight scales take the sign that puts each group's largest weight on the grid's extra "
                         "negative level (-8 at 4 bits): steps 8/7 finer, served as is (default: on for "
                         f"{_defaults_help('full_range')})")
    ap.add_argument("--lrq-rank", type=int, default=4, help="rank of LRQ's weight-scaling matrix (default 4)")
    ap.add_argument("--lrq-steps", type=int, default=200, help="Adam steps per linear for LRQ (default 200)")
    ap.add_argument("--septq-fraction", type=float, default=0.02,
                    help="share of weights SEPTQ's static mask marks important (default 0.02)")
    ap.add_argument("--tune-scales", type=int, default=None, metavar="STEPS",
                    help="after quantization, train the weight scales (integers frozen) end to end against the fp "
                         "model for STEPS Adam steps; 0: off (default: the scheme's measured default, "
                         f"{_defaults_help('tune_scales', show_value=True)}; off elsewhere)")
    ap.add_argument("--tune-norms", action=argparse.BooleanOptionalAction, default=None,
                    help="with --tune-scales: train each layer's two RMSNorm weights too (default: on for "
                         f"{_defaults_help('tune_norms')})")
    ap.add_argument("--dimension-expansion", action="store_true",
                    help="GBS+DE: where down_proj's input size has no Hadamard, zero-pad it to the next size "
                         "that has one and rotate there (the stored down_proj weight gets the padded width)")
    ap.add_argument("--finetune", action="store_true",
                    help="the rotation's fine-tuned variant (ruquant: longer stage 2 with more reflections)")
    ap.add_argument("--tp-size", type=int, default=1,
                    help="tensor-parallel size the checkpoint will be served with (vLLM --tensor-parallel-size); "
                         "row-parallel activations are quantized per shard and R4 acts within a shard")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted conversion (Ctrl-C, kill) from its last finished layer")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (layers, sites, rotation sizes, memory) and write nothing")
    return ap


def _quantizer_options(args: argparse.Namespace) -> dict:
    """Options of the chosen weight quantizer from its flags (only non-default ones are recorded)."""
    if args.lrq_rank < 1 or args.lrq_steps < 0 or not 0.0 <= args.septq_fraction <= 1.0:
        raise ConvertError("--lrq-rank must be >= 1, --lrq-steps >= 0 and --septq-fraction in [0, 1]",
                           ExitCode.BAD_INPUT)
    if args.weight_quantizer == "lrq":
        return {"rank": args.lrq_rank, "steps": args.lrq_steps}
    if args.weight_quantizer == "septq":
        return {"fraction": args.septq_fraction}
    if args.weight_quantizer == "gptq":
        act_order = recipe_for(args.scheme).act_order if args.act_order is None else args.act_order
        return {"act_order": True} if act_order else {}
    return {}


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """The recipe the flags ask for; ``FormatError`` for a scheme / group size / clip ratio that
    makes no format (parsed here, once: the conversion carries ``opts.fmt``)."""
    recipe = recipe_for(args.scheme)
    rotation = args.rotation or recipe.rotation
    if rotation not in available_rotations():
        raise ConvertError(f"unknown rotation {rotation!r}; choose one of "
                           f"{', '.join(available_rotations())}", ExitCode.UNSUPPORTED)
    if args.weight_quantizer not in available_quantizers():
        raise ConvertError(f"unknown weight quantizer {args.weight_quantizer!r}; choose one of "
                           f"{', '.join(available_quantizers())}", ExitCode.UNSUPPORTED)
    tune_scales = recipe.tune_scales if args.tune_scales is None else args.tune_scales
    if tune_scales < 0:
        raise ConvertError("--tune-scales must be >= 0", ExitCode.BAD_INPUT)
    if args.calib_samples < 1 or args.calib_seq_len < 8:
        raise ConvertError("--calib-samples must be >= 1 and --calib-seq-len >= 8", ExitCode.BAD_INPUT)
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ConvertError(f"--device must be auto, cpu or cuda[:N], got {args.device!r}", ExitCode.BAD_INPUT)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConvertError("--device cuda given but no CUDA GPU is available", ExitCode.UNSUPPORTED)
    group_size = args.group_size
    if group_size is None:  # the scheme's group size, if it has one, fits the model's dimensions
        group_size = -1 if recipe.group_size == -1 or args.dimension_expansion else recipe.group_size_for(
            read_source(args.model_dir)[1], args.tp_size)
    opts = ConvertOptions(
        scheme=args.scheme, rotation=rotation, weight_quantizer=args.weight_quantizer,
        group_size=group_size, act_clip_ratio=args.act_clip_ratio, calib_text=args.calib_text,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=args.device, resume=args.resume, tp_size=args.tp_size, finetune=args.finetune,
        clip=default_clip(args.scheme, args.act_clip_ratio) if args.clip == "auto" else args.clip,
        dimension_expansion=args.dimension_expansion, quantizer_options=_quantizer_options(args),
        tune_scales=tune_scales,
        full_range=recipe.full_range if args.full_range is None else args.full_range,
        tune_norms=recipe.tune_norms if args.tune_norms is None else args.tune_norms,
    )
    opts.fmt  # noqa: B018 (parse and validate the scheme flags now, before any model is read)
    return opts


def dry_run_plan(model_dir: Path, opts: ConvertOptions) -> str:
    """What a conversion would do, from config.json alone: no weights read, nothing written."""
    _, dims = read_source(model_dir)
    fmt = opts.fmt
    d, f = dims.hidden_size, dims.intermediate_size
    per_layer = dims.linear_params_per_layer
    calib = opts.calib_samples * opts.calib_seq_len
    mem = (per_layer * (8 + 4) + 2 * calib * d * 4 + max(d, f) ** 2 * 8) / 2**30
    if is_hadamard_size(f):
        r4 = f"hadamard {f} = {'x'.join(map(str, factor_size(f)))}"
    elif opts.dimension_expansion:
        from convert.dimension_expansion import expanded_size

        m = expanded_size(f)
        r4 = f"hadamard {m} = {'x'.join(map(str, factor_size(m)))}, input zero-padded from {f} (dimension expansion)"
    else:
        r4 = "none (no Hadamard size; --dimension-expansion pads it to one)"
    lines = [
        f"model      {dims.architecture}: {dims.num_layers} layers, hidden {d}, intermediate {f}, "
        f"heads {dims.num_heads}/{dims.num_kv_heads} x {dims.head_dim}, vocab {dims.vocab_size}",
        f"scheme     {fmt.scheme}: weights {fmt.weight.bits}-bit (group {fmt.weight.group_size}), activations "
        f"{fmt.activation.bits}-bit, kv {fmt.kv_cache.bits}-bit",
        f"rotation   {opts.rotation}: R1 {d}x{d} (offline), R2 {dims.head_dim}x{dims.head_dim} per head (offline), "
        f"R4 down_proj online: {r4}",
        f"quantizer  {opts.weight_quantizer} on {calib} calibration tokens "
        f"({opts.calib_samples} x {opts.calib_seq_len}), "
        f"{'full-range (signed) scales' if opts.full_range else 'symmetric scales'}",
        f"sites      {len(LINEARS)} linears x {dims.num_layers} layers = {len(LINEARS) * dims.num_layers} "
        "quantized linears, "
        f"{per_layer * dims.num_layers / 1e9:.2f} B weights",
        f"memory     ~{mem:.2f} GiB peak working set (one layer in fp64+fp32, calibration states, one Hessian)",
        f"tuning     {opts.tune_scales} steps of end-to-end weight-scale "
        f"{'and layer-norm ' if opts.tune_norms else ''}tuning after GPTQ, ~"
        f"{distill.training_bytes(dims, calib, scale_tuning.BATCH * opts.calib_seq_len) / 2**30:.2f} GiB "
        "(the whole model in fp32)" if opts.tune_scales else "tuning     none (--tune-scales 0)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        opts = options_from_args(args)
        if args.dry_run:
            print(dry_run_plan(args.model_dir.resolve(), opts))
            return 0
        report = convert(args.model_dir.resolve(), args.out_dir.resolve(), opts, overwrite=args.overwrite)
    except RUQuantError as e:  # ConvertError, or a CheckpointError about the source model
        print(f"ruquant-convert: error: {e}", file=sys.stderr)
        return int(e.code)
    except FormatError as e:
        print(f"ruquant-convert: error: {e}", file=sys.stderr)
        return int(ExitCode.UNSUPPORTED)
    except KeyboardInterrupt:
        print("ruquant-convert: interrupted; no output was written (run again with --resume to continue)",
              file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except OSError as e:  # disk full, permissions, ... anywhere outside the writer's own checks
        print(f"ruquant-convert: error: {e}", file=sys.stderr)
        return int(ExitCode.IO_ERROR)
    except MemoryError:
        print("ruquant-convert: error: out of memory (lower --calib-samples/--calib-seq-len)", file=sys.stderr)
        return int(ExitCode.IO_ERROR)
    errs = [layer["output_rel_error"] for layer in report["layers"]]
    worst = max(range(len(errs)), key=errs.__getitem__) if errs else None
    print(f"wrote {args.out_dir} ({opts.fmt.weight.bits}-bit weights, {opts.fmt.activation.bits}-bit activations) "
          f"in {time.perf_counter() - t0:.1f} s")
    if worst is not None:
        print(f"layer output error: mean {sum(errs) / len(errs):.4f}, worst {errs[worst]:.4f} (layer {worst}); "
              f"details in {args.out_dir / 'ruquant_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

