"""Benchmark the PillarAttn kernels against SGLang's Triton attention kernels (GPU only).

Shapes: one Qwen3-8B attention layer (Hq 32, Hkv 8, head_dim 128, bf16), batch 1/32/128,
context 4K/16K/32K, sparsity s = 0.05. Per (batch, context) it measures

* decode: SGLang ``decode_attention_fwd`` over the full context (called like
  ``TritonAttnBackend.forward_decode``: flat kv_indptr/kv_indices, attn_logits/attn_lse
  buffers, per-request num_kv_splits from ``get_num_kv_splits_triton``, max 8 splits) vs
  ``sparse_decode_attention`` over 4 sinks + ceil(s * ctx) selected slots (random positions, a
  different set per KV head) + 4 dense draft tokens; speedup, speedup / (1/s), and achieved
  bandwidth = unique K+V bytes the kernel must read / time;
* verify (k+1 = 9 tokens per request): SGLang ``extend_attention_fwd`` (prefix from the pool,
  the 9 new tokens from contiguous k/v, causal), our ``verify_attention`` (same kernel without
  the score pass) and ``verify_attention_with_scores``; overhead of the score pass;
* top-K: ``select_topk`` on the verify's scores (candidates = the prefix, K = ceil(s * ctx)).

Each attention kernel is timed with the server's split rule (equal splits, ``pick_num_kv_splits``)
and with ``split_by_length`` (splits in proportion to each request's context); ``--spread F``
gives the requests of a batch unequal contexts, evenly spaced over (1 -/+ F) x the context.

Timing: each call is captured in a CUDA graph (no Python launch overhead in the numbers) and
replayed after a 256 MB write that evicts L2; the median over replays is reported. Working sets
smaller than L2 (50 MB on H100) can still partly hit in L2 within one call.

    python scripts/bench_kernels.py --out results/bench_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton
from tqdm import tqdm

from sparsespec_sglang.kernels.attention_common import pick_kv_split_grid, pick_num_kv_splits
from sparsespec_sglang.kernels.sparse_decode import sparse_decode_attention
from sparsespec_sglang.kernels.topk_select import select_topk
from sparsespec_sglang.kernels.verify_attention import verify_attention, verify_attention_with_scores
from sparsespec_sglang.selection import SelectionPolicy, sparsity_ppm

HQ, HKV, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"
NUM_SINK, DRAFT_TOKENS, VERIFY_TOKENS = 4, 4, 9
SGLANG_MAX_KV_SPLITS = 8  # server default --triton-attention-num-kv-splits


def _time_ms(fn: Callable[[], None], flush: torch.Tensor, budget_s: float = 0.25, max_iters: int = 50) -> float:
    fn()  # compile / warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (len(times) < max_iters and time.perf_counter() < deadline):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _sweep(fn: Callable[..., None], configs: list[dict], flush: torch.Tensor) -> list[dict]:
    """Time ``fn(**config)`` for each launch config; fastest first (failures at the end)."""
    rows = []
    for config in configs:
        kwargs = dict(config)
        try:
            rows.append({**kwargs, "ms": _time_ms(lambda: fn(**kwargs), flush, budget_s=0.1, max_iters=20)})
        except Exception as exc:  # e.g. out of shared memory for this shape
            rows.append({**kwargs, "error": str(exc)[:120]})
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def _paged_req_to_token(batch: int, ctx: int, page_size: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, ctx] slot ids: each request owns shuffled pages of page_size consecutive slots."""
    pages_per_req = math.ceil(ctx / page_size)
    pages = torch.randperm(batch * pages_per_req, generator=gen).view(batch, pages_per_req)
    slots = (pages[:, :, None] * page_size + torch.arange(page_size)).flatten(1)[:, :ctx]
    return slots.int().to(DEVICE)


def context_lengths(batch: int, ctx: int, spread: float) -> list[int]:
    """Each request's context: ``ctx`` for all with ``spread`` 0, else evenly spaced from
    (1 - spread) * ctx to (1 + spread) * ctx (mean ``ctx``), as in a running batch whose requests
    are at different points of long outputs (the paper's workload)."""
    if batch == 1 or spread == 0:
        return [ctx] * batch
    lo, hi = (1 - spread) * ctx, (1 + spread) * ctx
    return [max(VERIFY_TOKENS + NUM_SINK + DRAFT_TOKENS + 1, round(lo + (hi - lo) * b / (batch - 1)))
            for b in range(batch)]


def _flat(req_to_token: torch.Tensor, ends: list[int], starts: list[int] | None = None) -> torch.Tensor:
    """The slots of positions [starts[b], ends[b]) of every request, concatenated (kv_indices)."""
    starts = starts or [0] * len(ends)
    return torch.cat([req_to_token[b, s:e] for b, (s, e) in enumerate(zip(starts, ends))]).long()


def _indptr(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def _bench_case(batch: int, ctx: int, sparsity: float, page_size: int, kv, flush, num_sms, peak_tbps, gen,
                sweep_verify: bool = False, spread: float = 0.0):
    k_buffer, v_buffer = kv
    sm_scale = 1.0 / math.sqrt(HEAD_DIM)
    kv_bytes_per_token = HKV * 2 * HEAD_DIM * k_buffer.element_size()
    ctxs = context_lengths(batch, ctx, spread)
    req_to_token = _paged_req_to_token(batch, max(ctxs), page_size, gen)
    # Request b sits at pool row b: the kernels' whole-pool selection tables are then batch-sized.
    req_pool_indices = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(ctxs, dtype=torch.int32, device=DEVICE)
    result = {"batch": batch, "context": ctx, "spread": spread, "max_context": max(ctxs)}

    # ---- decode: SGLang full-context flash decoding vs sparse decode -------------------------
    from sparsespec_sglang.compat import decode_attention_fwd, get_num_kv_splits_triton

    try:
        from sgl_kernel.utils import is_arch_support_pdl

        use_pdl = bool(is_arch_support_pdl())
    except ImportError:
        use_pdl = False
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    o = torch.empty_like(q)
    kv_indptr = _indptr(ctxs)
    kv_indices = _flat(req_to_token, ctxs)
    attn_logits = torch.empty(batch, HQ, SGLANG_MAX_KV_SPLITS, HEAD_DIM, dtype=torch.float32, device=DEVICE)
    attn_lse = torch.empty(batch, HQ, SGLANG_MAX_KV_SPLITS, dtype=torch.float32, device=DEVICE)
    num_kv_splits = torch.empty(batch, dtype=torch.int32, device=DEVICE)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, seq_lens, batch, 1, HQ, HKV, SGLANG_MAX_KV_SPLITS, num_sms,
        MAX_NUM_SEQ=max(256, triton.next_power_of_2(batch)),
    )

    def sglang_decode():
        decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, attn_lse,
                             num_kv_splits, SGLANG_MAX_KV_SPLITS, sm_scale, 1.0, 1.0, use_pdl=use_pdl)

    policy = SelectionPolicy(sparsity_ppm(sparsity), min_selected=64, max_selected=4096, num_sink=NUM_SINK)
    n_sels = [policy.num_selected(c) for c in ctxs]
    n_sel = policy.num_selected(ctx)
    dense_start = seq_lens - DRAFT_TOKENS
    sel_indices = torch.zeros(batch, HKV, max(n_sels), dtype=torch.int32, device=DEVICE)
    for b, (c, n) in enumerate(zip(ctxs, n_sels)):  # random positions, a different set per KV head
        positions = torch.argsort(torch.rand(HKV, c - DRAFT_TOKENS - NUM_SINK, device=DEVICE), -1)[:, :n] + NUM_SINK
        sel_indices[b, :, :n] = req_to_token[b][positions]
    sel_lens = torch.tensor(n_sels, dtype=torch.int32, device=DEVICE)
    splits = pick_num_kv_splits(batch, HKV, num_sms)
    sparse_ws = (
        torch.empty(batch, HQ, splits, HEAD_DIM, dtype=torch.float32, device=DEVICE),
        torch.empty(batch, HQ, splits, dtype=torch.float32, device=DEVICE),
    )
    o_sparse = torch.empty_like(q)

    decode_args = dict(req_to_token=req_to_token, req_pool_indices=req_pool_indices, seq_lens=seq_lens,
                       dense_start=dense_start, sel_indices=sel_indices, sel_lens=sel_lens, num_sink=NUM_SINK,
                       sm_scale=sm_scale)

    def sparse_decode():  # the server's launch: equal splits for every row
        sparse_decode_attention(q, k_buffer, v_buffer, o_sparse, **decode_args, num_kv_splits=splits,
                                workspace=sparse_ws)

    def sparse_decode_by_length():  # splits in proportion to each row's attended tokens
        sparse_decode_attention(q, k_buffer, v_buffer, o_sparse, **decode_args, split_by_length=True)

    attended = NUM_SINK + sum(n_sels) / batch + DRAFT_TOKENS
    dense_ms = _time_ms(sglang_decode, flush)
    sparse_ms = _time_ms(sparse_decode, flush)
    sparse_by_length_ms = _time_ms(sparse_decode_by_length, flush)
    dense_bytes = sum(ctxs) * kv_bytes_per_token
    sparse_bytes = batch * attended * kv_bytes_per_token
    result["decode"] = {
        "selected": n_sel, "attended": attended, "equal_num_kv_splits": splits,
        "sglang_full_ms": dense_ms, "sparse_ms": sparse_ms, "sparse_split_by_length_ms": sparse_by_length_ms,
        "speedup": dense_ms / sparse_ms, "ideal_speedup": ctx / attended,
        "speedup_over_ideal": (dense_ms / sparse_ms) / (ctx / attended),
        "sglang_kv_bytes": dense_bytes, "sparse_kv_bytes": sparse_bytes,
        "sglang_TBps": dense_bytes / dense_ms / 1e9, "sparse_TBps": sparse_bytes / sparse_ms / 1e9,
        "sglang_bw_fraction": dense_bytes / dense_ms / 1e9 / peak_tbps,
        "sparse_bw_fraction": sparse_bytes / sparse_ms / 1e9 / peak_tbps,
    }
    del attn_logits, attn_lse, kv_indices

    # ---- verify: SGLang extend vs ours without / with the score pass ---------------------------
    from sparsespec_sglang.compat import extend_attention_fwd

    prefixes = [c - VERIFY_TOKENS for c in ctxs]
    prefix = ctx - VERIFY_TOKENS
    tokens = batch * VERIFY_TOKENS
    qv = torch.randn(tokens, HQ, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    ov = torch.empty_like(qv)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=DEVICE)
    extend_lens = torch.full((batch,), VERIFY_TOKENS, dtype=torch.int32, device=DEVICE)
    qo_indptr = torch.arange(0, tokens + 1, VERIFY_TOKENS, dtype=torch.int32, device=DEVICE)
    new_slots = _flat(req_to_token, ctxs, prefixes)
    k_extend, v_extend = k_buffer[new_slots].contiguous(), v_buffer[new_slots].contiguous()
    prefix_indptr = _indptr(prefixes)
    prefix_indices = _flat(req_to_token, prefixes)
    scores = torch.zeros(batch, HKV, max(ctxs), dtype=torch.float32, device=DEVICE)

    def sglang_verify():
        extend_attention_fwd(qv, k_extend, v_extend, ov, k_buffer, v_buffer, qo_indptr, prefix_indptr,
                             prefix_indices, None, True, None, VERIFY_TOKENS, 1.0, 1.0, sm_scale)

    layout = dict(req_to_token=req_to_token, req_pool_indices=req_pool_indices, prefix_lens=prefix_lens,
                  extend_lens=extend_lens, qo_indptr=qo_indptr, sm_scale=sm_scale)

    def plain_verify():
        verify_attention(qv, k_buffer, v_buffer, ov, **layout)

    def scored_verify():
        verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum")

    # Draft-normalised scores read their row normaliser from a ring the drafts fill.
    score_lse = torch.full((batch, HQ, VERIFY_TOKENS), math.log(ctx), dtype=torch.float32, device=DEVICE)

    def fused_verify():
        verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum",
                                     score_lse=score_lse)

    # The same kernels with each request's splits in proportion to its context, beside the
    # server's launch (equal splits, pick_num_kv_splits).
    def scored_by_length():
        verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum",
                                     split_by_length=True)

    def fused_by_length():
        verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum",
                                     score_lse=score_lse, split_by_length=True)

    ext_ms = _time_ms(sglang_verify, flush)
    expected = ov.float().clone()
    plain_ms = _time_ms(plain_verify, flush)
    max_diff = (ov.float() - expected).abs().max().item()  # same attention, two kernels
    scored_ms = _time_ms(scored_verify, flush)
    fused_ms = _time_ms(fused_verify, flush)
    plain_by_length_ms = _time_ms(lambda: verify_attention(qv, k_buffer, v_buffer, ov, **layout,
                                                           split_by_length=True), flush)
    scored_by_length_ms = _time_ms(scored_by_length, flush)
    fused_by_length_ms = _time_ms(fused_by_length, flush)
    sweep = {}
    if sweep_verify:
        def plain_with(num_kv_splits=None, **launch):
            verify_attention(qv, k_buffer, v_buffer, ov, **layout, num_kv_splits=num_kv_splits, **launch)

        def fused_with(**launch):
            verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum",
                                         score_lse=score_lse, **launch)

        def exact_with(**launch):
            verify_attention_with_scores(qv, k_buffer, v_buffer, ov, **layout, scores=scores, aggregation="sum",
                                         **launch)

        def sparse_with(**launch):
            sparse_decode_attention(q, k_buffer, v_buffer, o_sparse, **decode_args, num_kv_splits=splits,
                                    workspace=sparse_ws, **launch)

        shapes = [dict(block_n=n, num_warps=w, num_stages=st) for n in (32, 64) for w in (4, 8) for st in (2, 3, 4)]
        sweep["verify_plain"] = _sweep(plain_with, [dict(num_kv_splits=x, **c) for x in (1, 2) for c in shapes
                                                    if c["num_warps"] == 4], flush)
        sweep["verify_draft_normalised"] = _sweep(
            fused_with, [dict(num_kv_splits=x, **c) for x in (1, 2, 3, 4, 6) for c in shapes
                         if c["num_warps"] == 4], flush)
        sweep["verify_exact_score_pass"] = _sweep(
            exact_with, [dict(score_pass_warps=w, score_pass_stages=st) for w in (4, 8) for st in (2, 3, 4)], flush)
        sweep["sparse_decode"] = _sweep(sparse_with, shapes, flush)
        for name, rows in sweep.items():
            tqdm.write(f"  sweep {name} B={batch} ctx={ctx}: best {rows[0] if rows else None}")
    plain_bytes = sum(ctxs) * kv_bytes_per_token
    scored_bytes = plain_bytes + sum(ctxs) * (HKV * HEAD_DIM * k_buffer.element_size() + HKV * 4)
    result["verify"] = {
        "tokens_per_request": VERIFY_TOKENS, "max_abs_diff_plain_vs_sglang": max_diff,
        "sglang_extend_ms": ext_ms, "plain_ms": plain_ms, "with_scores_ms": scored_ms,
        "score_overhead_vs_plain_pct": 100 * (scored_ms / plain_ms - 1),
        "score_overhead_vs_sglang_pct": 100 * (scored_ms / ext_ms - 1),
        "with_draft_normalised_scores_ms": fused_ms,
        "draft_normalised_overhead_vs_plain_pct": 100 * (fused_ms / plain_ms - 1),
        "num_kv_splits": pick_num_kv_splits(batch, HKV, num_sms),
        "split_by_length": {"grid": pick_kv_split_grid(batch, HKV, num_sms)[0], "plain_ms": plain_by_length_ms,
                            "with_scores_ms": scored_by_length_ms,
                            "with_draft_normalised_scores_ms": fused_by_length_ms},
        "launch_sweep": sweep,
        "plain_bytes": plain_bytes, "with_scores_bytes": scored_bytes,
        "plain_TBps": plain_bytes / plain_ms / 1e9, "with_scores_TBps": scored_bytes / scored_ms / 1e9,
        "sglang_extend_TBps": plain_bytes / ext_ms / 1e9,
    }
    del k_extend, v_extend, prefix_indices

    # ---- top-K on the verify's scores ---------------------------------------------------------
    out_indices = torch.empty(batch, HKV, 4096, dtype=torch.int32, device=DEVICE)
    out_lens = torch.empty(batch, dtype=torch.int32, device=DEVICE)

    def topk():
        select_topk(scores, policy, req_to_token=req_to_token, req_pool_indices=req_pool_indices,
                    seq_lens=seq_lens, cand_end=prefix_lens, out_indices=out_indices, out_lens=out_lens)

    topk_ms = _time_ms(topk, flush)
    result["topk"] = {
        "ms": topk_ms, "K": n_sel, "K_max": max(n_sels), "candidates": prefix - NUM_SINK,
        "pct_of_verify_with_scores": 100 * topk_ms / scored_ms,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--sparsity", type=float, default=0.05)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--sweep-verify", action="store_true",
                        help="also time the verify kernel over its launch shapes (splits, BLOCK_N, warps, stages)")
    parser.add_argument("--peak-tbps", type=float, default=None,
                        help="HBM peak for the bandwidth fraction (default: 4.8 on H200, else 3.35)")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="contexts of one batch evenly spaced over (1 -/+ SPREAD) x context (mean: the "
                             "context); 0: all equal")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "bench_kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)\n")

    props = torch.cuda.get_device_properties(0)
    peak_tbps = args.peak_tbps or (4.8 if "H200" in props.name else 3.35)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=DEVICE)

    # One KV layer big enough for the largest case; every case maps its requests into it.
    def pool_tokens(b: int, c: int) -> int:
        return b * math.ceil(max(context_lengths(b, c, args.spread)) / args.page_size) * args.page_size

    max_tokens = max(pool_tokens(b, c) for b in batches for c in contexts)
    free, _ = torch.cuda.mem_get_info()
    kv_bytes = max_tokens * HKV * HEAD_DIM * 2 * 2
    while kv_bytes > 0.6 * free:  # drop the biggest cases that cannot fit
        max_tokens //= 2
        kv_bytes //= 2
    k_buffer = torch.randn(max_tokens, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_buffer = torch.randn(max_tokens, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE)

    cases, skipped = [], []
    t0 = time.time()
    grid = [(b, c) for b in batches for c in contexts]
    for batch, ctx in tqdm(grid, unit="shape", desc="bench_kernels", disable=args.quiet):
        if pool_tokens(batch, ctx) > max_tokens:
            skipped.append({"batch": batch, "context": ctx, "reason": "KV pool does not fit"})
            continue
        try:
            res = _bench_case(batch, ctx, args.sparsity, args.page_size, (k_buffer, v_buffer), flush,
                              props.multi_processor_count, peak_tbps, gen, args.sweep_verify, args.spread)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append({"batch": batch, "context": ctx, "reason": "out of memory"})
            continue
        cases.append(res)
        d, v, t = res["decode"], res["verify"], res["topk"]
        tqdm.write(f"B={batch:4d} ctx={ctx:6d} | decode sglang {d['sglang_full_ms']:.3f} ms sparse {d['sparse_ms']:.3f} ms "
                   f"(by length {d['sparse_split_by_length_ms']:.3f}) "
                   f"x{d['speedup']:.1f} (ideal x{d['ideal_speedup']:.1f}) | verify ext {v['sglang_extend_ms']:.3f} "
                   f"plain {v['plain_ms']:.3f} +scores {v['with_scores_ms']:.3f} ms "
                   f"(+{v['score_overhead_vs_plain_pct']:.0f}%) draft-normalised {v['with_draft_normalised_scores_ms']:.3f} ms "
                   f"(+{v['draft_normalised_overhead_vs_plain_pct']:.0f}%) | by length: plain {v['split_by_length']['plain_ms']:.3f} "
                   f"+scores {v['split_by_length']['with_scores_ms']:.3f} "
                   f"draft-normalised {v['split_by_length']['with_draft_normalised_scores_ms']:.3f} | topk {t['ms']:.3f} ms")

    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "gpu": props.name, "num_sms": props.multi_processor_count, "peak_hbm_TBps": peak_tbps,
        "torch": torch.__version__, "triton": triton.__version__, "sglang": getattr(sys.modules.get("sglang"), "__version__", None),
        "model_shapes": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": HEAD_DIM, "dtype": str(DTYPE)},
        "sparsity": args.sparsity, "spread": args.spread, "page_size": args.page_size, "num_sink": NUM_SINK,
        "draft_tokens_in_dense_tail": DRAFT_TOKENS, "verify_tokens_per_request": VERIFY_TOKENS,
        "timing": "CUDA-graph replay after a 256 MB L2-evicting write, median",
        "plain_verify_baseline": "sglang extend_attention_fwd (causal, prefix via kv_indices, new tokens contiguous)"
                                 " and our verify_attention (verify_attention_with_scores minus the score pass)",
        "cases": cases, "skipped": skipped, "wall_s": time.time() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
