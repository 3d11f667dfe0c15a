"""The offline ruquant converter: HF checkpoint -> rotated, quantized ruquant checkpoint.

Never imported by ``vllm_ruquant``; it imports ``vllm_ruquant.checkpoint`` (the format,
model families, exit codes, shard checksums) and ``vllm_ruquant.reference`` so that
conversion and serving share one definition of the checkpoint and of every op.
"""
