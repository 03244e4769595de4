"""Compile Triton kernels for CUDA GPUs without one (Triton's own ptxas), for the tests.

Reads a JSON object {name: request} on stdin and writes {name: {"ptx": ..., "shared": bytes,
"triton": the compiling Triton's version}} on stdout; a request is {"kernel": "module:function", "types": {argument: "*bf16" | "i32" | ...},
"constexprs": {argument: value}, "cc": 90, "num_warps": 4, "num_stages": 3}, optionally
"spills": true to add "spill_bytes" (ptxas -v's register spill stores) and "divisible": [the
arguments a launch would specialize as multiples of 16]. Run without
TRITON_INTERPRET (the interpreter's kernels cannot be compiled); see the compile_for_gpu fixture.
"""

import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def spill_bytes(ptx: str, cc: int) -> int:
    """Bytes of register spill stores ptxas (Triton's own) reports for this PTX: local-memory
    traffic in a kernel's inner loop, a cost the compiled code alone shows."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        done = subprocess.run([get_ptxas(cc).path, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr))


def compile_one(kernel: str, types: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int,
                spills: bool = False, divisible: tuple = ()) -> dict:
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constexprs else types[arg] for arg in fn.arg_names}
    # ``divisible``: arguments a launch specializes as multiples of 16 (16-byte aligned pointers,
    # sizes, strides): with them, and unit strides given among the constexprs (a launch
    # specializes an integer argument equal to 1 away), the code is what an aligned, contiguous
    # launch runs (vectorized, asynchronous copies); without, loads are element by element
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(arg),): value for arg, value in constexprs.items()},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    result = {"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared, "triton": triton.__version__}
    if spills:
        result["spill_bytes"] = spill_bytes(result["ptx"], cc)
    return result


if __name__ == "__main__":
    requests = json.load(sys.stdin)
    json.dump({name: compile_one(**request) for name, request in requests.items()}, sys.stdout)
