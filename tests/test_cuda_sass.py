"""Checks of the built CUDA kernels' machine code (SASS) that need no GPU: the sm_90a cubins inside
effkern._C, read with the cuobjdump that Triton ships.

ptxas (12.8 to 13.0 seen) encodes a cp.async with .L2::cache_hint on sm_90 whose shared address
has a uniform part as ``LDGSTS [Rx+UR0], desc[UR1][...]``: the same instruction bits whichever
uniform registers it loaded the shared base and the policy into, so the copy reads two uniform
registers that nothing wrote (a wrong address or an illegal instruction at run time). The kernels
drop the hint on sm_90; no LDGSTS of theirs may take that form."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from effkern import _ext


def sm90_sass() -> str:
    if not (_ext.available() and _ext.built_with_cuda()):
        pytest.skip("needs effkern._C built with CUDA")
    try:
        import triton
    except ImportError:
        pytest.skip("needs Triton's cuobjdump")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip(f"no {cuobjdump}")
    archs = _ext.build_info().get("archs", "")
    if "9.0a" not in re.split(r"[;+]", archs):
        pytest.skip(f"effkern._C has no sm_90a code (built for {archs}: EFFKERN_CUDA_ARCH)")
    import effkern._C as ext
    # by the build's arch list, not by cuobjdump -lelf's cubin names: Triton 3.6's cuobjdump (12.8)
    # names a CUDA 13 sm_90a cubin "sm_90" there, yet dumps it for -arch sm_90a
    sass = subprocess.run([str(cuobjdump), "-sass", "-arch", "sm_90a", ext.__file__], check=True,
                          capture_output=True, text=True).stdout
    assert "Function : " in sass, f"built for {archs}, yet {cuobjdump} -sass -arch sm_90a finds no function"
    return sass


@pytest.mark.parametrize("kernel", ["int4", "sparse24"])
def test_no_async_copy_reads_an_unset_uniform_register_on_sm90(kernel):
    sass = sm90_sass()
    functions = re.split(r"\n\s*Function : ", sass)
    mine = "\n".join(f for f in functions if f"_{kernel}_cu_" in f.split("\n", 1)[0])  # the .cu in the mangled name
    copies = [line.strip() for line in mine.splitlines() if "LDGSTS" in line]
    assert copies, f"no LDGSTS in the sm_90a SASS of the {kernel} kernels"
    bad = [line for line in copies if re.search(r"LDGSTS\S*\s+\[R\d+(\.\w+)*\+UR\d+", line)]
    assert not bad, f"{len(bad)} of {len(copies)} LDGSTS with a uniform-register shared address, e.g. {bad[0]}"
