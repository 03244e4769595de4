"""python -m bench report: the README performance table, generated from bench/results/*/*.json.

Only GPU results go in (CPU timings are of Triton's interpreter and mean nothing). One row per
measured case: the fastest effkern backend, its rate, and its speedup over each baseline.
The table replaces the text between the README markers; without them it is printed.
"""

from __future__ import annotations

import json
import sys

from .harness import DEFAULT_RESULTS, REPO, fmt, markdown

BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def _best_rows(doc: dict) -> list[dict]:
    """Per case, the fastest correct effkern row; the fastest of any status only where none
    is correct (its ok column then says so): a wrong kernel's speed is no result."""
    best: dict = {}
    for r in doc["rows"]:
        if r["provider"].startswith("effkern-") and "ms" in r:
            key = (r["mode"], tuple(r["params"].items()))
            rank = (r["status"] != "ok", r["ms"])
            if key not in best or rank < (best[key]["status"] != "ok", best[key]["ms"]):
                best[key] = r
    return list(best.values())


def section(doc: dict, path) -> str:
    c = doc["ceilings"]
    labels = list(doc["baselines"].values())
    rows = _best_rows(doc)
    params = list(rows[0]["params"]) if rows else []
    header = ["mode", *params, "fastest effkern", "ms", "TFLOP/s", "% GEMM", "GB/s", "% floor", *labels, "ok"]
    body = [[r["mode"], *(fmt(r["params"][p]) for p in params), r["provider"].removeprefix("effkern-"),
             fmt(r["ms"], 4), fmt(r["tflops"]), fmt(r["pct_gemm"], 2), fmt(r.get("gbps")), fmt(r["pct_floor"], 2),
             *(fmt(r["speedup"].get(lb)) for lb in labels), r["status"]] for r in rows]
    failed = sum(r["status"] in ("FAIL", "ERROR") for r in doc["rows"])
    int8 = f"int8 GEMM {fmt(c['int8_tops'])} TOPS, " if "int8_tops" in c else ""  # older results lack it
    return (f"#### `{doc['op']}` on {doc['device']}\n\n"
            f"{doc['date'][:10]}, torch {doc['torch']}, triton {doc['triton']}; measured ceilings: "
            f"GEMM {fmt(c['gemm_tflops'])} TFLOP/s, {int8}copy {fmt(c['copy_gbps'])} GB/s. "
            f"Command: `{doc['command']}`. All rows: `{path.relative_to(REPO)}`"
            f"{f' ({failed} rows FAIL or ERROR)' if failed else ''}.\n\n" + markdown(header, body))


def build() -> str:
    docs = []
    for path in sorted(DEFAULT_RESULTS.glob("*/*.json")):
        doc = json.loads(path.read_text())
        if doc.get("device_type") == "cuda" and "rows" in doc:
            docs.append((doc, path))
    if not docs:
        return "_No GPU results yet: run `bench/gpu_check.sh` on a GPU machine._\n"
    return "\n".join(section(doc, path) for doc, path in docs)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m bench report", file=sys.stderr)
        return 2
    table = build()
    readme = REPO / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if BEGIN not in text or END not in text:
        print(f"{readme} has no {BEGIN} ... {END} markers; the table:\n")
        print(table)
        return 0
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    print(f"updated {readme}")
    return 0
