"""Helpers for the vLLM plugin tests: a converter-free ruquant checkpoint writer and a
plain-torch simulated-quantized forward.

Both exist so the plugin can be tested on its own, independent of ``convert/``:

* ``write_ruquant_checkpoint`` quantizes every decoder linear of an HF model dir with
  ``reference.quantize_weight`` + ``pack_weight`` and writes tensor names and the
  ``quantization_config`` through ``format.py``. Nothing is folded or rotated offline,
  except that an online input rotation Q of ``down_proj`` is absorbed into its weight
  (stored as ``W Q``) so the checkpoint computes the original function.
* ``simulated_quantized_logits`` (the test oracle; replace with ``convert/evaluate.py``'s
  forward once it exists) runs a Llama/Qwen2/Mistral forward in fp32 torch where every
  quantized linear is ``reference.quantized_linear`` -- the same op vLLM's CPU path runs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import LINEARS


def random_block_rotation(size: int, block: int, seed: int = 0) -> torch.Tensor:
    """Random orthogonal blocks (nb, b, b) fp32, via QR of Gaussian matrices."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size // block, block, block, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.float().contiguous()


def write_ruquant_checkpoint(src: str | Path, dst: str | Path, fmt: fmt_mod.RUQuantFormat,
                             *, rotation_seed: int = 0) -> Path:
    """Quantize ``src`` (an HF model dir) into a ruquant checkpoint at ``dst`` (RTN, no folding)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(LINEARS) and not fmt.is_ignored(prefix):
            out.update(_quantize_linear(prefix, t, fmt, rotation_seed))
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = fmt.to_dict()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _quantize_linear(prefix: str, w: torch.Tensor, fmt: fmt_mod.RUQuantFormat,
                     rotation_seed: int) -> dict[str, torch.Tensor]:
    w = w.float()
    tensors: dict[str, torch.Tensor] = {}
    rot = fmt.rotation_for(prefix)
    if rot is not None:
        blocks = None
        if rot.kind == "block_diagonal":
            assert rot.block_size is not None
            # each layer its own blocks, so serving one layer with another's would show
            layer = int(prefix.split(".layers.")[1].split(".")[0]) if ".layers." in prefix else 0
            blocks = random_block_rotation(rot.size, rot.block_size, rotation_seed + 1000 * layer)
            tensors[fmt_mod.tensor_name(prefix, fmt_mod.ONLINE_ROTATION)] = blocks
        q_mat = ref.OnlineRotation(rot.kind, rot.size, blocks).matrix()
        w = w @ q_mat  # (x Q)(W Q)^T = x W^T
    q, scale = ref.quantize_weight(w, fmt.weight.bits, fmt.weight.group_size)
    tensors[fmt_mod.tensor_name(prefix, fmt_mod.QWEIGHT)] = ref.pack_weight(q, fmt.weight.bits)
    tensors[fmt_mod.tensor_name(prefix, fmt_mod.WEIGHT_SCALE)] = scale.contiguous()
    return tensors


# ----------------------------------------------------------------- simulated forward


class SimulatedQuantizedModel:
    """The converter's simulated-quantized forward (``convert/evaluate.py``), plus greedy decoding.

    One implementation of the simulation serves the converter's perplexity, its calibration
    and these tests, so "served == simulated" is checked against what the converter reports.
    """

    def __init__(self, ckpt: str | Path) -> None:
        from convert.evaluate import Evaluator, LoadedModel

        self.ev = Evaluator(LoadedModel.open(Path(ckpt)), torch.device("cpu"))

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, vocab) fp32 for one sequence."""
        return self.ev.logits(torch.tensor([token_ids]))[0].float()

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[len(prompt_ids):]


def simulated_quantized_logits(ckpt: str | Path, token_ids: list[int]) -> torch.Tensor:
    """Logits of the simulated-quantized model (fp32); the oracle vLLM must match."""
    return SimulatedQuantizedModel(ckpt).logits(token_ids)


# ------------------------------------------------------------------- vLLM engines

ENGINE_ENV = {
    # One process: the engine core runs in the test process (no spawn, ~10 s faster);
    # the plugin is registered by vLLM's entry-point loading, or by register() below.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # GPU: IEEE fp32 in every Triton dot (vLLM's attention kernels included) instead of TF32,
    # so a float32 engine computes what the fp32 simulation does (see test_gpu_vllm.py)
    "TRITON_F32_DEFAULT": "ieee",
}


@contextlib.contextmanager
def in_process_llm(model: str | Path, env: dict[str, str] | None = None, **kwargs):
    """A ``vllm.LLM`` in this process, torn down fully afterwards (so a next one can start).

    vLLM caches its env variables once an engine starts and keeps the distributed group
    alive; both are undone on exit so later tests see a clean process. ``env`` adds to (or
    overrides) ``ENGINE_ENV`` for this engine only. With ``tensor_parallel_size > 1`` the
    engine core still runs here, its workers in processes of their own (vLLM's
    multiprocessing executor), which the teardown stops.
    """
    import vllm_ruquant

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**ENGINE_ENV, **(env or {})}.items():
            mp.setenv(k, v)
        vllm_ruquant.register()
        from vllm import LLM

        defaults = dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0,
                        max_num_seqs=4)
        llm = None
        try:  # a refused start leaves a half-built engine to clean up as well
            llm = LLM(model=str(model), **{**defaults, **kwargs})
            yield llm
        finally:
            if llm is not None:
                # vLLM gc.freeze()s the engine at start-up, so dropping the last reference
                # never runs its finalizer: shut it down explicitly (TP > 1: stops the workers)
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            import vllm.envs as envs

            if hasattr(envs, "disable_envs_cache"):
                envs.disable_envs_cache()


def check_against_simulation(llm, ckpt: str | Path, prompts: list[list[int]], n_tokens: int = 32,
                             noise_atol: float = 1e-4, flip_atol: float = 0.05,
                             max_flip_fraction: float = 0.1, greedy: bool = True) -> None:
    """Greedy tokens identical to the simulated forward's, and logprobs equal up to float noise.

    Tolerance: both sides run the same integer ops on the same integers; what differs is
    fp32 rounding in vLLM's own kernels (RMSNorm, RoPE, attention, SiLU) against plain
    torch, ~1e-6 relative, so almost every position agrees to ``noise_atol`` (measured:
    ~2e-6). Rarely that noise moves one activation across a rounding boundary of the
    dynamic quantizer, changing one integer by one step and that position's logprobs by
    up to ~1e-2 (measured: 8e-3 at 1 of 88 positions, w4a8). So: at most
    ``max_flip_fraction`` of positions may exceed ``noise_atol``, and none ``flip_atol``.
    A real mismatch (wrong shard, scale, packing or rotation) gives errors of order one
    at nearly every position. ``greedy=False`` skips the greedy-token identity and compares
    logprobs teacher-forced on the served tokens (for paths whose own rounding is coarser).
    """
    from vllm import SamplingParams

    sim = SimulatedQuantizedModel(ckpt)
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True,
                        prompt_logprobs=3, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    errors: list[float] = []
    diverged: list[str] = []
    for k, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        tokens = list(out.outputs[0].token_ids)
        want = sim.greedy(prompt, n_tokens)  # compared always, asserted only with greedy=True
        if tokens != want:
            first = next(j for j, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b)
            diverged.append(f"prompt {k} at token {first} of {n_tokens}")
        ref_lp = sim.logits(prompt + tokens).log_softmax(-1)
        # prompt_logprobs[i]: distribution at position i given tokens < i (row i - 1)
        rows = [(i - 1, lps) for i, lps in enumerate(out.prompt_logprobs) if i > 0]
        rows += [(len(prompt) - 1 + j, lps) for j, lps in enumerate(out.outputs[0].logprobs)]
        for r, lps in rows:
            errors.append(max(abs(lp.logprob - ref_lp[r, tid].item()) for tid, lp in lps.items()))
    flips = [e for e in errors if e > noise_atol]
    # one line whatever happens: on the GPU machine this is the evidence that comes back
    print(f"served vs simulation: {len(errors)} positions teacher-forced, median error "
          f"{sorted(errors)[len(errors) // 2]:.2e}, {len(flips)} above {noise_atol}, worst "
          f"{[float(f'{e:.2e}') for e in sorted(errors)[-5:]]}; greedy "
          f"{'identical' if not diverged else 'diverged: ' + ', '.join(diverged)}"
          f"{'' if greedy else ' (not asserted)'}")
    assert not (greedy and diverged), f"greedy tokens differ from the simulation: {', '.join(diverged)}"
    assert max(errors) < flip_atol, f"logprobs differ from the simulation by {max(errors):.3g}"
    assert len(flips) <= max_flip_fraction * len(errors), (
        f"{len(flips)} of {len(errors)} positions differ from the simulation by > {noise_atol}: "
        f"{sorted(flips)[-5:]}"
    )
