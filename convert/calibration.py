"""Calibration and evaluation token streams from text files.

The default calibration text is the English reference documentation that ships inside
every CPython (``pydoc_data.topics``, ~800 KB of prose about the language): real text,
available on every machine, with no download. Users pass their own with ``--calib-text``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from convert.errors import ConvertError, ExitCode


def default_calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: Path | None) -> str:
    if path is None:
        return default_calibration_text()
    if not path.is_file():
        raise ConvertError(f"calibration/evaluation text {path} does not exist", ExitCode.BAD_INPUT)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConvertError(f"{path} is not UTF-8 text", ExitCode.BAD_INPUT) from None


def load_tokenizer(model_dir: Path):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise ConvertError(f"cannot load the tokenizer of {model_dir}: {e}", ExitCode.BAD_INPUT) from None


def token_stream(model_dir: Path, text: str) -> torch.Tensor:
    # verbose=False: the text is one long sequence on purpose (cut into windows below); the
    # "longer than the maximum sequence length" warning would only confuse the user
    tok = load_tokenizer(model_dir)
    return tok(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]


def calibration_batches(model_dir: Path, text_path: Path | None, num_samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """``(num_samples, seq_len)`` token windows drawn (seeded) from the text."""
    need = seq_len * num_samples
    # tokenise a generous prefix only (~4 chars per token, 8x margin): large corpora stay cheap
    ids = token_stream(model_dir, read_text(text_path)[: need * 32])
    if ids.numel() < need:
        raise ConvertError(
            f"calibration text too short: {ids.numel()} tokens, need {need} "
            f"({num_samples} samples x {seq_len}); give a longer --calib-text or lower "
            f"--calib-samples/--calib-seq-len", ExitCode.BAD_INPUT)
    g = torch.Generator().manual_seed(seed)
    # non-overlapping windows, a random subset in a random order
    windows = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    pick = torch.randperm(windows.shape[0], generator=g)[:num_samples]
    return windows[pick].clone()
