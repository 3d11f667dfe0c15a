"""Build a Triton kernel for sm_90 on a machine without a GPU, and read what the compiler made of it.

Shared by the offline compile reports (``gemv_compile_report.py``, ``gemm_compile_report.py``,
``kv4_compile_report.py``): this machine's Triton and the ``cuobjdump`` bundled with it. The GPU machines
run Triton 3.6; a side venv with ``triton==3.6.0`` reproduces their code generation. Import this module
before ``TRITON_INTERPRET`` matters: it unsets it (an interpreted kernel has no cubin).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def build(fn: Any, const: dict[str, Any], pointers: dict[str, str], aligned: Iterable[str] = (),
          floats: Iterable[str] = (), **options: Any) -> Any:
    """``fn`` compiled for sm_90 with ``const`` as its constexprs; other arguments typed as ``pointers``
    names them, fp32 for ``floats``, i32 otherwise; ``aligned`` ones divisible by 16, as a real launch
    specialises them. ``options`` go to ``triton.compile`` (num_warps, num_stages, ...)."""
    floats, aligned = set(floats), set(aligned)
    sig = {a: "constexpr" if a in const else pointers.get(a, "fp32" if a in floats else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def cuobjdump(kernel: Any) -> tuple[str, str]:
    """(resource usage, SASS) of a built kernel."""
    tool = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return res, sass


def opcodes(sass: str) -> collections.Counter:
    """How often each SASS opcode (without its modifiers and predicate) occurs."""
    return collections.Counter(m.split(".")[0] for m in _OPCODE.findall(sass))


def resource(res: str, name: str) -> str:
    """One figure of the resource usage (``REG``, ``STACK``, ``SHARED``), '?' if absent."""
    found = re.search(rf"{name}:(\d+)", res)
    return found.group(1) if found else "?"
