"""Backend choice for ``auto`` on CUDA, from benchmark measurements kept in the repo.

``python -m bench <op> --write-policy`` records, per GPU name, which effkern backend was
faster at each measured (dtype, approximate, M, N, K). For a new shape, ``auto`` takes
the winner of the nearest measured shape of the same dtype, distance being the sum of
|log2| ratios of M, N and K (a GEMM's behaviour changes with the order of magnitude of
each side, not its exact value). No measurement for this GPU or dtype -> None, and the
op falls back to its own default.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

POLICY_DIR = Path(__file__).with_name("policies")


@functools.lru_cache(maxsize=None)
def _entries(op: str, device_name: str) -> tuple[dict, ...]:
    path = POLICY_DIR / f"{op}.json"
    if not path.exists():
        return ()
    devices = json.loads(path.read_text()).get("devices", {})
    return tuple(devices.get(device_name, {}).get("entries", ()))


def choose(op: str, mode: str, device_name: str, dtype: str, M: int, N: int, K: int, **match) -> str | None:
    """The recorded winner ("triton"/"cuda") for ``mode`` ("fwd", "bwd", "fwd_bwd") nearest to (M, N, K)."""
    candidates = [
        e for e in _entries(op, device_name)
        if e.get("dtype") == dtype and mode in e and all(e.get(k) == v for k, v in match.items())
    ]
    if not candidates:
        return None

    def distance(e: dict) -> float:
        return sum(abs(math.log2(max(a, 1) / max(e[k], 1))) for k, a in (("M", M), ("N", N), ("K", K)))

    return min(candidates, key=distance)[mode]
