"""Do ``ruquant-online``'s per-site blocks carry over to another text? (issue 24 item 1)

Fits the stage-1 blocks of ``convert/rotations/ruquant_online.py`` exactly as the converter does
(the fp model's inputs of each linear on the calibration text, in the Hadamard basis, the last
quarter of the sequences held out for the choice) for the chosen layers, then prints the per-token
4-bit quantization MSE (the served quantizer, no clipping) of identity and of the chosen blocks on
the held-out calibration sequences and on the first tokens of a second text.

    OMP_NUM_THREADS=1 python benchmarks/online_blocks_transfer.py MODEL_DIR --calib-text lee_calib.txt \\
        --other-text wiki_eval.txt [--layers 2,5,15,25,29] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from convert import calibration
from convert.pipeline import Converter, ConvertOptions
from convert.rotations import ruquant_online as ro
from convert.rotations.hadamard import HadamardRotation
from vllm_ruquant import reference as ref


def rel_mse(x: torch.Tensor, bits: int = 4) -> float:
    y = ref.fake_quantize_activation(x.float(), bits, 1.0).double()
    return float(((y - x) ** 2).sum() / (x**2).sum().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--calib-text", type=Path, required=True)
    ap.add_argument("--other-text", type=Path, required=True)
    ap.add_argument("--layers", default="2,5,15,25,29")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256, help="calibration windows; the other text: 8 of them")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    opts = ConvertOptions(scheme="w4a4kv4", rotation="ruquant-online", calib_text=args.calib_text,
                          calib_samples=args.calib_samples, calib_seq_len=args.seq_len, seed=args.seed, device="cpu")
    conv = Converter(args.model_dir, opts)
    tokens = calibration.calibration_batches(args.model_dir, args.calib_text, args.calib_samples, args.seq_len,
                                             args.seed)
    ctx = conv._context(tokens)
    base = HadamardRotation().plan(ctx)  # the Hadamard signs ruquant-online draws under this seed
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = ro.linear_inputs(ctx)
    other_ids = calibration.token_stream(args.model_dir, calibration.read_text(args.other_text))[: 8 * args.seq_len]
    other = ro.linear_inputs(Converter(args.model_dir, opts)._context(other_ids.reshape(8, args.seq_len)))
    rows = []
    for i in [int(s) for s in args.layers.split(",") if s]:
        n_seq, seq = calib[i]["qkv"].shape[:2]
        n_fit = (n_seq - max(1, round(ro.HOLDOUT * n_seq))) * seq
        ov = ro.served_basis(other[i], base, i, ctx.dims.head_dim)
        for site, v in ro.served_basis(calib[i], base, i, ctx.dims.head_dim).items():
            m, facts = ro.fit_site(v, n_fit, 4, ro.STAGE1, gen)
            o = ov[site]
            e = facts["held_out_row_mse"]
            row = {"layer": i, "site": site, "choice": facts["choice"], "calib_held_identity": e["identity"],
                   "calib_held_chosen": e[facts["choice"]], "other_identity": rel_mse(o),
                   "other_chosen": rel_mse(ro.block_apply(o, m) if m is not None else o)}
            rows.append(row)
            print(f"layer {i:2d} {site:7s} {row['choice']:22s} held-out calibration {row['calib_held_identity']:.4f}"
                  f" -> {row['calib_held_chosen']:.4f}   other text {row['other_identity']:.4f} -> "
                  f"{row['other_chosen']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model_dir), "calib_text": str(args.calib_text),
                                         "other_text": str(args.other_text), "seed": args.seed, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
