"""Compile Triton kernels for CUDA GPUs without one (Triton's own ptxas), for the tests.

Reads a JSON object {name: request} on stdin and writes {name: {"ptx": ..., "shared": bytes}}
on stdout; a request is {"kernel": "module:function", "types": {argument: "*bf16" | "i32" | ...},
"constexprs": {argument: value}, "cc": 90, "num_warps": 4, "num_stages": 3}. Run without
TRITON_INTERPRET (the interpreter's kernels cannot be compiled); see the compile_for_gpu fixture.
"""

import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_one(kernel: str, types: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int) -> dict:
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    signature = {arg: "constexpr" if arg in constexprs else types[arg] for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(arg),): value for arg, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return {"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared}


if __name__ == "__main__":
    requests = json.load(sys.stdin)
    json.dump({name: compile_one(**request) for name, request in requests.items()}, sys.stdout)
