"""Bytes-and-time account of a saturated measurement: what each decode step (plain) or cycle
(SPARSESPEC) must read, the bandwidth ideal of that, and the measured time, per configuration.

Input: a ``bench_saturated.py`` result (one run or ``--merge``d runs of one workload). From the
window's mean running batch R, mean context per running request c, output tokens/s and (for
SPARSESPEC) tokens per cycle a (SGLang's ``spec_accept_length``, bonus included):

* plain, per step: weights W + R * c * kv bytes; measured step = R / (tokens/s);
* SPARSESPEC, per cycle of k + 1 passes: (k + 1) * W + R * c * kv (the verify reads every
  request's whole KV once) + k * R * (K + sinks + tail) * kv (each draft step reads the K tokens
  the selection policy picks at context c, the sinks and the tokens written since the verify,
  (k + 1) / 2 on average); measured cycle = R * a / (tokens/s).

W counts what a forward reads of the weights: every layer and the LM head (not the embedding
table, of which a forward reads one row per token). efficiency = ideal time / measured time at
``--bandwidth`` (the machine's copy bandwidth; the peak HBM figure where none was measured, and
the JSON says which). SPARSESPEC's per-cycle GPU phase times come from the ``sparsespec:*``
gauges the server exported in the window; host = measured cycle - their sum.

    python scripts/account.py benchmarks/results/saturated_paper_workload_h100.json \\
        --bandwidth 3.35e12 --bandwidth-source "H100 SXM peak HBM3 (not measured)" \\
        --out benchmarks/results/account_paper_workload_h100.json --markdown account.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.selection import SelectionPolicy

DTYPE_BYTES = 2  # bf16 weights and KV


def shape_bytes(shape: str) -> tuple[int, int]:
    """(weight bytes a forward reads, KV bytes per token) of a ``model_dirs`` shape."""
    from sparsespec_sglang.testing.model_dirs import SHAPES

    c = SHAPES[shape]
    h, layers, hd = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * c["intermediate_size"] + 2 * h + 2 * hd
    weights = (layers * per_layer + c["vocab_size"] * h + h) * DTYPE_BYTES
    return weights, 2 * layers * kv * DTYPE_BYTES


def _mean(window: dict, key: str) -> Optional[float]:
    value = window.get(key)
    return None if value is None else value["mean"]


def account_run(run: dict, weights: int, kv: int, bandwidth: float, k: int, config: SparseSpecConfig) -> dict:
    w = run["window"]
    r, c, tps = _mean(w, "running_requests"), _mean(w, "context_tokens_per_running_request"), w["output_tok_per_s"]
    out: dict[str, Any] = {"config": run["config"], "output_tok_per_s": tps, "running": r, "context": c}
    if run.get("forced_accept") is None:
        step_s = r / tps
        nbytes = weights + r * c * kv
        out.update(unit="step", tokens_per_unit=1.0, measured_ms=step_s * 1e3, weight_gb=weights / 1e9,
                   kv_gb=r * c * kv / 1e9, bytes_gb=nbytes / 1e9, ideal_ms=nbytes / bandwidth * 1e3)
    else:
        a = _mean(w, "spec_accept_length")
        sel = SelectionPolicy.of(config).num_selected(round(c))
        draft_tokens = sel + config.num_sink_tokens + (k + 1) / 2
        verify_kv, draft_kv = r * c * kv, k * r * draft_tokens * kv
        nbytes = (k + 1) * weights + verify_kv + draft_kv
        cycle_s = r * a / tps
        phases = {name.split(":", 1)[1].removesuffix("_gpu_ms_per_cycle"): v["mean"]
                  for name, v in w.items() if name.startswith("sparsespec:") and name.endswith("_gpu_ms_per_cycle")
                  and v is not None}
        if {"draft", "verify"} <= phases.keys():  # lockstep: the draft steps and the verify apart
            ideal = {"draft": (k * weights + draft_kv) / bandwidth * 1e3, "verify": (weights + verify_kv) / bandwidth * 1e3}
            out["phase_efficiency"] = {p: ideal[p] / phases[p] for p in ideal}
            out["phase_ideal_ms"] = ideal
        out.update(unit="cycle", tokens_per_unit=a, measured_ms=cycle_s * 1e3, weight_gb=(k + 1) * weights / 1e9,
                   kv_gb=(verify_kv + draft_kv) / 1e9, verify_kv_gb=verify_kv / 1e9, draft_kv_gb=draft_kv / 1e9,
                   selected_per_request=sel, bytes_gb=nbytes / 1e9, ideal_ms=nbytes / bandwidth * 1e3,
                   gpu_phase_ms=phases, host_and_gaps_ms=cycle_s * 1e3 - sum(phases.values()))
    out["efficiency"] = out["ideal_ms"] / out["measured_ms"]
    out["ideal_ms_per_token"] = out["ideal_ms"] / out["tokens_per_unit"]
    out["measured_ms_per_token"] = out["measured_ms"] / out["tokens_per_unit"]
    return out


def account(report: dict, bandwidth: float, bandwidth_source: str) -> dict:
    k = report["settings"]["k"]
    config = SparseSpecConfig()  # the configurations measured keep the default selection settings
    weights, kv = shape_bytes(report["shape"])
    runs = [account_run(r, weights, kv, bandwidth, k, config) for r in report["runs"]
            if "window" in r and "error" not in r]
    plain = [r for r in runs if r["unit"] == "step"]
    best = max(plain, key=lambda r: r["output_tok_per_s"]) if plain else None
    for r in runs:
        if best is not None and r is not best:
            # per request, the ideal speedup is the ratio of ideal time per token at the same batch
            r["measured_ratio_over_fastest_plain"] = r["output_tok_per_s"] / best["output_tok_per_s"]
            r["ideal_ratio_over_fastest_plain"] = (best["ideal_ms_per_token"] / best["running"]) / (
                r["ideal_ms_per_token"] / r["running"])
    return {"source": report.get("merged_from") or report.get("command"), "gpu": report["gpu"],
            "shape": report["shape"], "weight_bytes_per_forward": weights, "kv_bytes_per_token": kv,
            "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": bandwidth_source,
            "fastest_plain": best["config"] if best else None, "runs": runs}


def markdown(acc: dict) -> str:
    rows = ["| configuration | tok/s | vs fastest plain (ideal) | unit | R x context | GB read per unit "
            "(weights + KV) | ideal ms | measured ms | efficiency | GPU phases per cycle (ms) | host + gaps (ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in acc["runs"]:
        ratio = ("-" if "measured_ratio_over_fastest_plain" not in r else
                 f"{r['measured_ratio_over_fastest_plain']:.2f}x ({r['ideal_ratio_over_fastest_plain']:.2f}x)")
        eff = r.get("phase_efficiency", {})
        phases = ", ".join(f"{k} {v:.1f}" + (f" (ideal {r['phase_ideal_ms'][k]:.1f}, eff {eff[k]:.2f})" if k in eff else "")
                           for k, v in r.get("gpu_phase_ms", {}).items()) or "-"
        host = f"{r['host_and_gaps_ms']:.1f}" if "host_and_gaps_ms" in r else "-"
        rows.append(f"| {r['config']} | {r['output_tok_per_s']:.0f} | {ratio} | {r['unit']} "
                    f"({r['tokens_per_unit']:.2f} tok) | {r['running']:.1f} x {r['context']:.0f} | "
                    f"{r['bytes_gb']:.1f} ({r['weight_gb']:.1f} + {r['kv_gb']:.1f}) | {r['ideal_ms']:.1f} | "
                    f"{r['measured_ms']:.1f} | {r['efficiency']:.2f} | {phases} | {host} |")
    return "\n".join(rows) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="bench_saturated.py result JSON")
    ap.add_argument("--bandwidth", type=float, required=True, help="bytes/s the ideal is computed at")
    ap.add_argument("--bandwidth-source", required=True,
                    help="where --bandwidth comes from (a measured copy, or the peak figure)")
    ap.add_argument("--out", required=True, help="account JSON")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    if args.bandwidth <= 0:
        ap.error(f"--bandwidth must be > 0 bytes/s (got {args.bandwidth})")
    acc = account(json.loads(Path(args.result).read_text()), args.bandwidth, args.bandwidth_source)
    Path(args.out).write_text(json.dumps(acc, indent=1))
    table = markdown(acc)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
