"""The ruquant checkpoint contract, shared by the converter (``convert/``) and the plugin.

One definition of what a ruquant checkpoint is, importable without vLLM (the converter and
``ruquant-validate`` run where vLLM is not installed; an import-linter contract checks it):

* ``format``   -- the ``quantization_config`` schema, tensor names and packing (``RUQuantFormat``);
* ``models``   -- the supported architectures, their dimensions and linear-layer names;
* ``shards``   -- safetensors headers, the shard index and sha256 checksums;
* ``validate`` -- the checks a checkpoint directory must pass before vLLM loads it;
* ``errors``   -- the one exit-code table of every ruquant command.
"""
