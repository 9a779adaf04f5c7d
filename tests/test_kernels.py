"""PillarAttn Triton kernels vs their PyTorch references.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1) at small shapes;
with CUDA the same tests run compiled on the GPU, and the `gpu`-marked tests repeat them at
Qwen3-8B sizes (B 32, ctx 4K, Hq 32, Hkv 8, D 128, bf16).

The KV pool used everywhere is adversarial: request rows of req_to_token are shuffled, pages
are shuffled (page size 1 or 16, so slot ids are non-contiguous), and slot 0 is a "poison" slot
with huge K/V that no valid mapping uses but every padding entry points to; a kernel that reads
past a length picks it up and fails the comparison.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402

import importlib  # noqa: E402

import triton  # noqa: E402

# The module (kernels/__init__ re-exports functions under some of the modules' names).
attention_common = importlib.import_module("sparsespec_sglang.kernels.attention_common")

from sparsespec_sglang.kernels.attention_common import (  # noqa: E402
    MAX_KV_SPLITS, MIN_CHUNK, PROGRAMS_PER_SM, SPLIT_ROUNDS, SPLIT_SKEW, kv_split_range, pick_kv_split_grid,
    pick_num_kv_splits,
)
from sparsespec_sglang.kernels.sparse_decode import (  # noqa: E402
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from sparsespec_sglang.kernels.topk_select import select_topk, select_topk_ref  # noqa: E402
from sparsespec_sglang.kernels.verify_attention import (  # noqa: E402
    verify_attention,
    verify_attention_with_scores,
    verify_attention_with_scores_ref,
)
from sparsespec_sglang.selection import SelectionPolicy, sparsity_ppm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernels_are_leaves_of_the_package():
    """Every module under kernels/ imports only torch, Triton, the standard library and its
    siblings: the caller hands it plain numbers (a SelectionPolicy's fields, an aggregation name)."""
    import ast
    import pathlib

    import sparsespec_sglang.kernels as kernels

    root = pathlib.Path(kernels.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] == "sparsespec_sglang" for n in names), f"{path.name} imports {names}"


def test_the_kernels_pool_scores_every_configurable_way():
    from sparsespec_sglang.kernels.verify_attention import AGGREGATIONS as KERNEL_AGGREGATIONS
    from sparsespec_sglang.selection import AGGREGATIONS

    assert KERNEL_AGGREGATIONS == AGGREGATIONS
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if INTERPRET:
    # The Triton interpreter multiplies bfloat16 dot operands as their raw uint16 bits
    # (triton 3.x InterpreterBuilder.create_dot); upcast them to float32 first. Compiled
    # kernels are unaffected.
    from triton.runtime import interpreter as _interp

    _create_dot = _interp.InterpreterBuilder.create_dot

    def _create_dot_bf16_safe(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = _interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return _interp.TensorHandle(data, tl.float32)

        return _create_dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = _create_dot_bf16_safe


def _tol(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.float16:
        return dict(atol=3e-3, rtol=3e-3)
    # fp32 on the GPU goes through TF32 tensor cores.
    return dict(atol=2e-2, rtol=2e-2) if DEVICE.type == "cuda" else dict(atol=1e-5, rtol=1e-5)


def _score_tol(dtype: torch.dtype) -> dict:
    """Scores come from the same fp32-accumulated logits in kernel and reference (only `out`
    sees the low-precision P @ V), except fp32 on the GPU, where the kernel's dot is TF32."""
    if DEVICE.type != "cuda":
        return dict(atol=1e-5, rtol=1e-3)
    return dict(atol=5e-3, rtol=1e-2) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-3)


class Pool:
    """One layer of a paged MHATokenToKVPool plus a req_to_token table for a batch."""

    def __init__(self, lens, page_size, num_kv_heads, head_dim, dtype, seed, v_dim=None, pad_cols=8):
        gen = torch.Generator().manual_seed(seed)
        batch = len(lens)
        pages = [math.ceil(n / page_size) for n in lens]
        # Page 0 holds the poison slot 0; the others are handed out in a random order.
        page_ids = torch.randperm(sum(pages) + 3, generator=gen) + 1
        num_rows = batch + 3
        self.req_to_token = torch.zeros(num_rows, max(lens) + pad_cols, dtype=torch.int32)
        self.req_pool_indices = torch.randperm(num_rows, generator=gen)[:batch].int()
        used = 0
        for b, n in enumerate(lens):
            mine = page_ids[used: used + pages[b]]
            used += pages[b]
            slots = (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
            self.req_to_token[self.req_pool_indices[b], :n] = slots.int()
        num_slots = (len(page_ids) + 1) * page_size
        v_dim = v_dim or head_dim
        self.k = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
        self.v = torch.randn(num_slots, num_kv_heads, v_dim, generator=gen)
        self.k[0], self.v[0] = 30.0, 1e3
        self.k, self.v = self.k.to(DEVICE, dtype), self.v.to(DEVICE, dtype)
        self.rows_cpu = self.req_to_token[self.req_pool_indices.long()]  # [B, ctx] host copy
        self.req_to_token = self.req_to_token.to(DEVICE)
        self.req_pool_indices = self.req_pool_indices.to(DEVICE)
        self.gen = gen

    def slot(self, b: int, pos: int) -> int:
        return int(self.rows_cpu[b, pos])


def _ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# --------------------------------------------------------------------------------------------
# sparse decode
# --------------------------------------------------------------------------------------------


def _decode_case(seq_lens, dense_start, sel_counts, num_sink, group, num_kv_heads=2, head_dim=64,
                 page_size=1, dtype=torch.float32, seed=0, max_sel=None):
    """Pool + query + per-head random selections from the positions between sinks and dense."""
    pool = Pool(seq_lens, page_size, num_kv_heads, head_dim, dtype, seed)
    batch = len(seq_lens)
    max_sel = max_sel or max(max(sel_counts), 1) + 3
    sel = torch.zeros(batch, num_kv_heads, max_sel, dtype=torch.int32)  # padding -> poison slot 0
    sel_lens = []
    for b in range(batch):
        lo = min(num_sink, dense_start[b])
        n = min(sel_counts[b], dense_start[b] - lo)
        sel_lens.append(n)
        for h in range(num_kv_heads):
            pos = torch.randperm(dense_start[b] - lo, generator=pool.gen)[:n] + lo
            sel[b, h, :n] = pool.rows_cpu[b, pos]
    q = torch.randn(batch, group * num_kv_heads, head_dim, generator=pool.gen).to(DEVICE, dtype)
    return pool, q, sel.to(DEVICE), _ints(sel_lens)


def _by_row(pool, sel):
    """The selection as a whole-pool table: request b's entries at row req_pool_indices[b], every
    other row pointing at the poison slot 0 (reading a wrong row fails the comparison)."""
    table = torch.zeros(pool.req_to_token.shape[0], *sel.shape[1:], dtype=sel.dtype, device=DEVICE)
    table[pool.req_pool_indices.long()] = sel
    return table


def _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, splits, logit_cap=0.0,
                extra_rows=1, extra_splits=2, split_by_length=False):
    """Kernel vs reference; outputs and workspace are views into larger sentinel buffers.
    ``split_by_length``: splits by each row's share of the batch's tokens, ``splits`` is its grid."""
    batch, hq, _ = q.shape
    dv = pool.v.shape[-1]
    out_big = torch.full((batch + extra_rows, hq, dv), 7.0, dtype=q.dtype, device=DEVICE)
    logits = torch.full((batch + extra_rows, hq, splits + extra_splits, dv), 5.0, device=DEVICE)
    lse_ws = torch.full((batch + extra_rows, hq, splits + extra_splits), 5.0, device=DEVICE)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                dense_start=_ints(dense_start), sel_indices=sel, sel_lens=sel_lens, num_sink=num_sink,
                sm_scale=sm_scale, logit_cap=logit_cap)
    kernel_args = {**args, "sel_indices": _by_row(pool, sel)}  # the reference reads batch order
    ring = torch.full((batch + extra_rows, hq, 5), -3.0, device=DEVICE)
    lse = sparse_decode_attention(q, pool.k, pool.v, out_big[:batch], **kernel_args,
                                  num_kv_splits=None if split_by_length else splits,
                                  split_by_length=split_by_length,
                                  workspace=(logits, lse_ws), lse_ring=ring)
    ref_out = torch.empty(batch, hq, dv, dtype=q.dtype, device=DEVICE)
    ref_lse = sparse_decode_attention_ref(q, pool.k, pool.v, ref_out, **args)
    assert lse.shape == (batch, hq)
    # The lse ring holds each row's lse at (seq_len - 1) % 5 and nothing else.
    expect = torch.full_like(ring, -3.0)
    for b, n in enumerate(seq_lens):
        expect[b, :, (n - 1) % 5] = lse[b]
    assert torch.equal(ring, expect)
    assert torch.all(out_big[batch:] == 7.0), "rows past the batch were written"
    assert torch.all(logits[batch:] == 5.0) and torch.all(logits[:, :, splits:] == 5.0)
    assert torch.all(lse_ws[batch:] == 5.0) and torch.all(lse_ws[:, :, splits:] == 5.0)
    return out_big[:batch], lse, ref_out, ref_lse


@pytest.mark.parametrize(
    "group,page_size,num_sink,dtype,splits",
    [
        (1, 1, 0, torch.float32, 1),
        (4, 16, 4, torch.float32, 3),
        (8, 1, 4, torch.float16, 4),
        (3, 1, 0, torch.bfloat16, 8),  # group 3: SmolLM2-135M (9 query / 3 KV heads), not a power of 2
        (8, 16, 0, torch.float32, 2),
        (1, 16, 4, torch.bfloat16, 3),
    ],
)
def test_sparse_decode_matches_ref(group, page_size, num_sink, dtype, splits):
    seq_lens = [150, 61, 9, 240]
    dense_start = [141, 40, 2, 232]  # request 2: fewer positions than sinks, nothing selectable
    sel_counts = [40, 0, 5, 77]  # request 1: empty selection
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, num_sink, group,
                                          page_size=page_size, dtype=dtype, seed=group + page_size)
    out, lse, ref_out, ref_lse = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, splits)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **_tol(dtype))


def test_sparse_decode_splits_follow_each_rows_attended_tokens(monkeypatch):
    """``split_by_length``: a row's KV split count follows how many tokens it attends to (a dense
    row of a unified pass, dense_start 0, reads its whole context). A small target gives the rows
    here 4, 1, 1 and 2 splits of a 4-split grid: empty programs and unequal merges."""
    monkeypatch.setattr(attention_common, "pick_kv_split_grid", lambda batch, heads, sms: (4, 16))
    seq_lens, dense_start, sel_counts = [1100, 300, 40, 700], [0, 290, 30, 500], [0, 100, 5, 200]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, 4, 2, seed=11)
    out, lse, ref_out, ref_lse = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, 4, 4,
                                             split_by_length=True)
    torch.testing.assert_close(out, ref_out, **_tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, **_tol(torch.float32))


def test_sparse_decode_head_dim_128_and_logit_cap():
    seq_lens, dense_start, sel_counts = [200, 33], [190, 25], [60, 20]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, 4, 4, num_kv_heads=2,
                                          head_dim=128, page_size=16, dtype=torch.float16, seed=3)
    q = q * 4  # large logits so the cap matters
    out, lse, ref_out, ref_lse = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, 4, 4,
                                             logit_cap=5.0)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.float16))
    torch.testing.assert_close(lse, ref_lse, **_tol(torch.float16))


def _dense_attention(q, k, v, sm_scale):
    """softmax(q k^T) v for q [Hq, D], k/v [N, Hkv, D] in float32 (GQA by repetition)."""
    group = q.shape[0] // k.shape[1]
    k = k.float().repeat_interleave(group, 1)
    v = v.float().repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q.float(), k) * sm_scale, -1)
    return torch.einsum("hn,nhd->hd", p, v)


def test_sparse_decode_full_selection_equals_dense_attention():
    """Selecting every position between the sinks and the dense tail is plain full attention."""
    seq_lens, dense_start, num_sink = [120, 47], [111, 40], 4
    pool, q, _, _ = _decode_case(seq_lens, dense_start, [0, 0], num_sink, 4, page_size=16, seed=5)
    max_sel = max(dense_start) - num_sink
    sel = torch.zeros(2, 2, max_sel, dtype=torch.int32, device=DEVICE)
    for b in range(2):
        middle = torch.tensor([pool.slot(b, p) for p in range(num_sink, dense_start[b])], dtype=torch.int32)
        sel[b, :, : len(middle)] = middle.flip(0).to(DEVICE)  # order inside the list is irrelevant
    sel_lens = _ints([d - num_sink for d in dense_start])
    out, _, _, _ = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 3)
    for b in range(2):
        slots = pool.req_to_token[pool.req_pool_indices[b], : seq_lens[b]].long()
        want = _dense_attention(q[b], pool.k[slots], pool.v[slots], 1.0 / math.sqrt(q.shape[-1]))
        torch.testing.assert_close(out[b].float(), want, **_tol(torch.float32))


def test_sparse_decode_reads_exactly_the_attended_set():
    seq_lens, dense_start, sel_counts, num_sink = [150, 90], [140, 80], [10, 10], 4
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, num_sink, 4, seed=7)
    base, _, _, _ = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 3)

    chosen = {int(s) for s in sel[0, 0, :10]}
    unused = next(p for p in range(num_sink, dense_start[0]) if pool.slot(0, p) not in chosen
                  and pool.slot(0, p) not in {int(s) for s in sel[0, 1, :10]})
    pool.k[pool.slot(0, unused)] += 3.0  # not attended by anyone: output must not move
    same, _, _, _ = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 3)
    assert torch.equal(same, base)

    pool.k[int(sel[0, 1, 3]), 1] += 3.0  # selected by request 0, KV head 1 only
    moved, _, _, _ = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 3)
    assert not torch.allclose(moved[0, 4:], base[0, 4:])  # query heads 4..7 use KV head 1
    assert torch.equal(moved[0, :4], base[0, :4]) and torch.equal(moved[1], base[1])


# --------------------------------------------------------------------------------------------
# verify attention with scores
# --------------------------------------------------------------------------------------------


def _verify_case(prefix_lens, extend_lens, group, num_kv_heads=2, head_dim=64, page_size=1,
                 dtype=torch.float32, seed=0):
    lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = Pool(lens, page_size, num_kv_heads, head_dim, dtype, seed)
    qo = [0]
    for e in extend_lens:
        qo.append(qo[-1] + e)
    q = torch.randn(qo[-1], group * num_kv_heads, head_dim, generator=pool.gen).to(DEVICE, dtype)
    return pool, q, _ints(qo)


def _verify_layout(pool, prefix_lens, extend_lens, qo, rows=None) -> dict:
    return dict(req_to_token=pool.req_to_token,
                req_pool_indices=pool.req_pool_indices if rows is None else rows,
                prefix_lens=_ints(prefix_lens), extend_lens=_ints(extend_lens), qo_indptr=qo)


def _run_verify(pool, q, prefix_lens, extend_lens, qo, aggregation, splits, logit_cap=0.0, extra_rows=2,
                score_lse=None, split_by_length=False):
    """Kernel vs reference; out and scores start as sentinels so untouched entries can be checked."""
    tokens, hq, _ = q.shape
    batch, num_kv_heads = len(prefix_lens), pool.k.shape[1]
    ctx = pool.req_to_token.shape[1]
    out_big = torch.full((tokens + extra_rows, hq, pool.v.shape[-1]), 7.0, dtype=q.dtype, device=DEVICE)
    scores = torch.full((batch, num_kv_heads, ctx), -1.0, device=DEVICE)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    args = _verify_layout(pool, prefix_lens, extend_lens, qo)
    verify_attention_with_scores(q, pool.k, pool.v, out_big[:tokens], **args, scores=scores, sm_scale=sm_scale,
                                 aggregation=aggregation, logit_cap=logit_cap, num_kv_splits=splits,
                                 score_lse=score_lse, split_by_length=split_by_length)
    ref_out = torch.empty_like(out_big[:tokens])
    ref_scores = torch.full_like(scores, -1.0)
    verify_attention_with_scores_ref(q, pool.k, pool.v, ref_out, **args, scores=ref_scores, sm_scale=sm_scale,
                                     aggregation=aggregation, logit_cap=logit_cap, score_lse=score_lse)
    assert torch.all(out_big[tokens:] == 7.0), "rows past the verify tokens were written"
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        assert torch.all(scores[b, :, p + e:] == -1.0), "scores past the request length were written"
        assert torch.all(scores[b, :, : p + e] >= 0)
    return out_big[:tokens], scores, ref_out, ref_scores


def _ring_lse(prefix_lens, num_q_heads, ring, seed):
    """Plausible per-row normalisers (about log(context)) in a ring of ``ring`` positions."""
    gen = torch.Generator().manual_seed(seed)
    lse = torch.rand(len(prefix_lens), num_q_heads, ring, generator=gen) * 2
    lse += torch.tensor([math.log(p + 1) for p in prefix_lens])[:, None, None]
    return lse.to(DEVICE)


@pytest.mark.parametrize("draft_normalised", [False, True], ids=["exact", "draft"])
@pytest.mark.parametrize(
    "group,page_size,dtype,aggregation,splits",
    [
        (1, 1, torch.float32, "sum", 1),
        (4, 16, torch.float32, "max", 3),
        (8, 1, torch.float32, "sum", 2),
        (7, 1, torch.bfloat16, "sum", None),  # group 7: Qwen2.5-0.5B (14 query / 2 KV heads)
        (8, 16, torch.float16, "max", 1),
        (1, 16, torch.bfloat16, "max", 4),
    ],
)
def test_verify_matches_ref(group, page_size, dtype, aggregation, splits, draft_normalised):
    prefix_lens, extend_lens = [150, 7, 230, 40], [9, 9, 3, 20]  # ragged; request 3 needs 2 row blocks
    pool, q, qo = _verify_case(prefix_lens, extend_lens, group, page_size=page_size, dtype=dtype,
                               seed=group * 10 + page_size)
    score_lse = _ring_lse(prefix_lens, q.shape[1], 9, seed=group) if draft_normalised else None
    out, scores, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, extend_lens, qo, aggregation, splits,
                                                   score_lse=score_lse)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(dtype))
    torch.testing.assert_close(scores, ref_scores, **_score_tol(dtype))


@pytest.mark.parametrize("draft_normalised", [False, True], ids=["exact", "draft"])
def test_verify_splits_follow_each_requests_context(monkeypatch, draft_normalised):
    """``split_by_length``: each request's KV split count follows its context (the grid is an
    upper bound, counts come from the batch's lengths on the device). A small target makes the
    requests here take 4, 2 and 3 splits of a 4-split grid, so empty programs, ragged chunks and
    the merge of unequal counts are all exercised."""
    monkeypatch.setattr(attention_common, "pick_kv_split_grid", lambda batch, heads, sms: (4, 16))
    prefix_lens, extend_lens = [1200, 251, 597], [9, 9, 3]
    pool, q, qo = _verify_case(prefix_lens, extend_lens, group=2, seed=5)
    score_lse = _ring_lse(prefix_lens, q.shape[1], 9, seed=5) if draft_normalised else None
    out, scores, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", None,
                                                   score_lse=score_lse, split_by_length=True)
    torch.testing.assert_close(out, ref_out, **_tol(torch.float32))
    torch.testing.assert_close(scores, ref_scores, **_score_tol(torch.float32))


@triton.jit
def _split_ranges_kernel(Work, Out, batch, num_kv_splits, target_programs, num_kv_heads,
                         BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BY_LENGTH: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK_B)
    batch_work = tl.sum(tl.load(Work + offs, mask=offs < batch, other=0), 0)
    start, end = kv_split_range(tl.load(Work + b), batch_work, split, num_kv_splits, target_programs,
                                num_kv_heads, BLOCK_N, BY_LENGTH)
    tl.store(Out + (b * num_kv_splits + split) * 2, start)
    tl.store(Out + (b * num_kv_splits + split) * 2 + 1, end)


def _split_ranges(work: list[int], grid: int, target: int, heads: int, block_n: int = 64) -> torch.Tensor:
    out = torch.empty(len(work), grid, 2, dtype=torch.int32, device=DEVICE)
    _split_ranges_kernel[(len(work), grid)](_ints(work), out, len(work), grid, target, heads,
                                            BLOCK_N=block_n, BLOCK_B=triton.next_power_of_2(len(work)),
                                            BY_LENGTH=target > 0)
    return out.cpu()


def test_kv_split_ranges_cut_long_requests_into_more_chunks():
    """Every row's non-empty ranges tile [0, work) in order; with a target, chunks are about the
    same size across the batch (a longer request gets more splits, up to the grid) and
    never below MIN_CHUNK; without one, every row gets the grid's count."""
    work = [8192, 1024, 4096, 300, 0, 65536]
    grid, target, heads = 16, 64, 2
    ranges = _split_ranges(work, grid, target, heads)
    chunk = max(MIN_CHUNK, -(-sum(work) * heads // target))
    counts = []
    for w, row in zip(work, ranges.tolist()):
        spans = [(a, e) for a, e in row if a < e]
        assert [a for a, _ in spans] == [0] + [e for _, e in spans[:-1]] if w else spans == []
        assert (spans[-1][1] if spans else 0) == w
        assert all(a % 64 == 0 for a, _ in spans)
        counts.append(len(spans))
        assert len(spans) == min(grid, max(1, -(-w // chunk))) or w == 0
    assert counts[3] == counts[1] == 1 < counts[2] < counts[0] < counts[5] == grid  # by length, capped
    equal = _split_ranges(work, 3, 0, heads)
    for w, row in zip(work, equal.tolist()):
        assert sum(e - a for a, e in row if a < e) == w
        assert len([1 for a, e in row if a < e]) == (min(3, -(-w // 64)) if w < 3 * 64 else 3)


def test_proportional_split_grid_leaves_room_for_long_requests():
    """The grid of a length-proportional launch: SPLIT_ROUNDS rounds of programs in all, room
    for a request SPLIT_SKEW times the mean, never past MAX_KV_SPLITS."""
    assert pick_kv_split_grid(40, 8, 132) == (14, SPLIT_ROUNDS * PROGRAMS_PER_SM * 132)
    for num_sms in (1, 78, 132):
        for heads in (1, 8):
            for batch in range(1, 300):
                grid, target = pick_kv_split_grid(batch, heads, num_sms)
                assert target == SPLIT_ROUNDS * PROGRAMS_PER_SM * num_sms
                assert 1 <= grid <= MAX_KV_SPLITS
                assert grid == MAX_KV_SPLITS or grid * batch * heads >= SPLIT_SKEW * target
                assert grid == 1 or (grid - 1) * batch * heads < SPLIT_SKEW * target


@pytest.mark.parametrize("splits", [1, 3])
def test_verify_in_a_unified_pass_leaves_draft_rows_alone(splits):
    """A unified pass: draft rows first, then the verify rows; padding requests have no tokens.

    Rows before qo_indptr[0] (the drafts) and after qo_indptr[B] are not written, and the verify
    rows and scores equal the plain layout's."""
    prefix_lens, extend_lens = [150, 7, 230], [9, 4, 9]
    pool, q, qo = _verify_case(prefix_lens, extend_lens, 4, page_size=1, seed=11)
    _, _, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", splits)
    drafts, tail = 5, 3
    hq, d = q.shape[1:]
    q_mixed = torch.cat([torch.randn(drafts, hq, d, device=DEVICE), q,
                         torch.randn(tail, hq, d, device=DEVICE)])
    out = torch.full((q_mixed.shape[0], hq, pool.v.shape[-1]), 7.0, device=DEVICE)
    padded = 2  # requests with no tokens (a CUDA graph's spare verify entries): pool row 0
    rows = torch.cat([pool.req_pool_indices, torch.zeros(padded, dtype=torch.int32, device=DEVICE)])
    qo_mixed = torch.cat([qo + drafts, torch.full((padded,), int(qo[-1]) + drafts, dtype=torch.int32,
                                                   device=DEVICE)])
    scores = torch.full((3 + padded, pool.k.shape[1], pool.req_to_token.shape[1]), -1.0, device=DEVICE)
    verify_attention_with_scores(
        q_mixed, pool.k, pool.v, out,
        **_verify_layout(pool, prefix_lens + [0] * padded, extend_lens + [0] * padded, qo_mixed, rows=rows),
        scores=scores, sm_scale=1.0 / math.sqrt(d), aggregation="sum", num_kv_splits=splits)
    assert torch.all(out[:drafts] == 7.0) and torch.all(out[drafts + len(q):] == 7.0)
    torch.testing.assert_close(out[drafts:drafts + len(q)], ref_out, **_tol(torch.float32))
    torch.testing.assert_close(scores[:3], ref_scores, **_score_tol(torch.float32))
    assert torch.all(scores[3:] == -1.0)


@pytest.mark.parametrize("splits", [1, 2])  # 1: stage 1 writes the ring, no reduce launch
def test_lse_ring_keyed_by_pool_row(splits):
    """A unified pass keys the draft lse ring by pool row: the sparse decode writes row
    ``ring_rows[b]`` and the fused verify score dump reads ``score_lse_rows[b]``, giving what the
    batch-ordered ring gives."""
    seq_lens, dense_start, sel_counts = [300, 41, 170], [280, 33, 150], [20, 3, 11]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, 4, 4, seed=3)
    hq, ring_w = q.shape[1], 5
    out = torch.empty(3, hq, pool.v.shape[-1], device=DEVICE)
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                dense_start=_ints(dense_start), sel_indices=_by_row(pool, sel), sel_lens=sel_lens, num_sink=4,
                sm_scale=0.125)
    by_batch = torch.full((3, hq, ring_w), -3.0, device=DEVICE)
    sparse_decode_attention(q, pool.k, pool.v, out, **args, num_kv_splits=splits, lse_ring=by_batch)
    rows = _ints([6, 1, 4])
    by_row = torch.full((8, hq, ring_w), -3.0, device=DEVICE)
    sparse_decode_attention(q, pool.k, pool.v, out, **args, num_kv_splits=splits, lse_ring=by_row, ring_rows=rows)
    assert torch.equal(by_row[rows.long()], by_batch)
    untouched = [r for r in range(8) if r not in (6, 1, 4)]
    assert torch.all(by_row[untouched] == -3.0)

    prefix_lens, extend_lens = [150, 7, 230], [5, 5, 3]
    vpool, vq, qo = _verify_case(prefix_lens, extend_lens, 4, seed=9)
    lse = _ring_lse(prefix_lens, vq.shape[1], ring_w, seed=2)
    _, expect, _, _ = _run_verify(vpool, vq, prefix_lens, extend_lens, qo, "sum", 2, score_lse=lse)
    ring = torch.zeros(8, vq.shape[1], ring_w, device=DEVICE)
    ring[rows.long()] = lse
    scores = torch.full_like(expect, -1.0)
    verify_attention_with_scores(
        vq, vpool.k, vpool.v, torch.empty(vq.shape[0], vq.shape[1], vpool.v.shape[-1], device=DEVICE),
        **_verify_layout(vpool, prefix_lens, extend_lens, qo), scores=scores, sm_scale=1.0 / math.sqrt(vq.shape[-1]),
        aggregation="sum", num_kv_splits=2, score_lse=ring, score_lse_rows=rows)
    torch.testing.assert_close(scores, expect)


@pytest.mark.parametrize("splits", [1, 2])  # 1: stage 1 writes the output, 2: the reduce does
def test_sparse_decode_leaves_the_skipped_rows_alone(splits):
    """``skip_rows = (indptr, n)``: rows ``indptr[0] <= b < indptr[n]`` (a unified pass's verify
    rows, written concurrently by the verify kernel) get no output, lse or ring entry; the
    other rows are what a launch without the skip gives."""
    seq_lens, dense_start, sel_counts = [300, 41, 170, 90, 120], [280, 33, 150, 80, 100], [20, 3, 11, 5, 9]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, 4, 4, seed=5)
    hq, ring_w = q.shape[1], 5
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                dense_start=_ints(dense_start), sel_indices=_by_row(pool, sel), sel_lens=sel_lens, num_sink=4,
                sm_scale=0.125)
    outs, rings = [], []
    for skip in (None, (_ints([1, 2, 3, 5]), 2)):  # rows 1 and 2 skipped, 0, 3 and 4 computed
        out = torch.full((5, hq, pool.v.shape[-1]), 7.0, device=DEVICE)
        ring = torch.full((5, hq, ring_w), -3.0, device=DEVICE)
        sparse_decode_attention(q, pool.k, pool.v, out, **args, num_kv_splits=splits, lse_ring=ring,
                                skip_rows=skip)
        outs.append(out)
        rings.append(ring)
    kept = [0, 3, 4]
    assert torch.equal(outs[1][kept], outs[0][kept]) and torch.equal(rings[1][kept], rings[0][kept])
    assert torch.all(outs[1][1:3] == 7.0) and torch.all(rings[1][1:3] == -3.0)
    assert not torch.all(outs[0][1:3] == 7.0)


def test_verify_draft_normalised_with_the_true_lse_is_exact():
    """One verify token whose ring slot holds its own final lse: both score modes agree."""
    prefix_lens, extend_lens = [120, 33, 64], [1, 1, 1]
    pool, q, qo = _verify_case(prefix_lens, extend_lens, 4, page_size=16, seed=5)
    _, exact, _, _ = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2)
    out = torch.empty_like(q)
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    args = _verify_layout(pool, prefix_lens, extend_lens, qo)
    true_lse = verify_attention(q, pool.k, pool.v, out, **args, sm_scale=sm_scale)  # [B, Hq]: one row each
    ring = 9
    score_lse = torch.zeros(len(prefix_lens), q.shape[1], ring, device=DEVICE)
    for b, p in enumerate(prefix_lens):
        score_lse[b, :, p % ring] = true_lse[b]
    _, fused, _, _ = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2, score_lse=score_lse)
    torch.testing.assert_close(fused, exact, rtol=1e-4, atol=1e-6)


def test_verify_head_dim_128_logit_cap():
    prefix_lens, extend_lens = [100, 31], [9, 5]
    pool, q, qo = _verify_case(prefix_lens, extend_lens, 4, head_dim=128, page_size=16,
                               dtype=torch.float16, seed=11)
    q = q * 4
    out, scores, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2, logit_cap=5.0)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.float16))
    torch.testing.assert_close(scores, ref_scores, **_score_tol(torch.float16))


def test_verify_sum_scores_are_probability_mass():
    """Every (query, query head) row is a distribution, so a KV head's summed scores = G * (k+1)."""
    prefix_lens, extend_lens, group = [80, 33], [9, 4], 4
    pool, q, qo = _verify_case(prefix_lens, extend_lens, group, seed=13)
    _, scores, _, _ = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2)
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        torch.testing.assert_close(scores[b, :, : p + e].sum(-1), torch.full((2,), float(group * e), device=DEVICE),
                                   atol=1e-3, rtol=1e-4)
        # The last verify token is seen only by the last query.
        assert torch.all(scores[b, :, p + e - 1] <= group + 1e-5)


def test_verify_scores_follow_the_keys():
    prefix_lens, extend_lens = [60, 50], [9, 9]
    pool, q, qo = _verify_case(prefix_lens, extend_lens, 4, seed=17)
    _, base, _, _ = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2)
    # Make position 23 of request 0 align with every query of KV head 1.
    hot = pool.slot(0, 23)
    pool.k[hot, 1] = q[:9, 4:8].float().mean((0, 1)).to(pool.k.dtype) * 20
    _, moved, _, _ = _run_verify(pool, q, prefix_lens, extend_lens, qo, "sum", 2)
    assert moved[0, 1, 23] > base[0, 1, 23] + 1.0
    assert torch.equal(moved[0, 0], base[0, 0]) and torch.equal(moved[1], base[1])


# --------------------------------------------------------------------------------------------
# top-K selection
# --------------------------------------------------------------------------------------------


def _topk_case(seq_lens, cand_end, num_kv_heads=3, page_size=1, seed=0):
    pool = Pool(seq_lens, page_size, num_kv_heads, 16, torch.float32, seed)
    batch = len(seq_lens)
    ctx = pool.req_to_token.shape[1]
    scores = torch.rand(batch, num_kv_heads, ctx, generator=pool.gen)
    scores[0, 0, 20:60] = 0.25  # a long run of ties
    scores[-1] = (scores[-1] * 8).floor() / 8  # few distinct values -> ties at the threshold
    scores[1, 1, 5:30] = 0.0
    return pool, scores.to(DEVICE)


def _pool_tables(pool, num_kv_heads: int, max_sel: int):
    """Whole-pool selection tables as the backend passes them (every entry -5)."""
    rows = pool.req_to_token.shape[0]
    fill = lambda *shape: torch.full(shape, -5, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return fill(rows, num_kv_heads, max_sel), fill(rows), fill(rows)


def _run_topk(pool, scores, seq_lens, cand_end, num_sink, sparsity, min_sel, max_sel):
    """Kernel and reference write whole-pool tables at each request's row; returns both
    selections gathered into batch order."""
    num_kv_heads = scores.shape[1]
    policy = SelectionPolicy(sparsity_ppm(sparsity), min_sel, max_sel, num_sink)
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                cand_end=_ints(cand_end))
    table, table_lens, _ = _pool_tables(pool, num_kv_heads, max_sel)
    select_topk(scores, policy, **args, out_indices=table, out_lens=table_lens)
    ref_table, ref_lens, _ = _pool_tables(pool, num_kv_heads, max_sel)
    select_topk_ref(scores, policy, **args, out_indices=ref_table, out_lens=ref_lens)
    rows = pool.req_pool_indices.long()
    out, lens = table[rows], table_lens[rows]
    for b in range(len(seq_lens)):
        assert torch.all(out[b, :, int(lens[b]):] == -5), "entries past K were written"
    others = torch.ones(table.shape[0], dtype=torch.bool, device=DEVICE)
    others[rows] = False  # only the batch's rows are written
    assert torch.all(table[others] == -5) and torch.all(table_lens[others] == -5)
    assert torch.all(ref_table[others] == -5) and torch.all(ref_lens[others] == -5)
    return out, lens, ref_table[rows], ref_lens[rows]


@pytest.mark.parametrize(
    "num_sink,sparsity,min_sel,max_sel,page_size",
    [
        (4, 0.05, 8, 64, 1),  # floor dominates
        (0, 0.3, 4, 64, 16),
        (4, 0.5, 0, 40, 16),  # cap dominates
        (0, 1.0, 0, 300, 1),  # K >= candidates: clamped, take all
        (4, 0.05, 0, 0, 1),  # K = 0
    ],
)
def test_topk_matches_ref(num_sink, sparsity, min_sel, max_sel, page_size):
    seq_lens, cand_end = [300, 120, 45, 290], [291, 111, 3, 290]  # request 2: no candidates
    pool, scores = _topk_case(seq_lens, cand_end, page_size=page_size, seed=page_size)
    out, lens, ref_out, ref_lens = _run_topk(pool, scores, seq_lens, cand_end, num_sink, sparsity, min_sel,
                                             max_sel)
    assert torch.equal(lens, ref_lens)
    assert torch.equal(out, ref_out)
    for b in range(len(seq_lens)):  # independent check of the selected values with torch.topk
        k = int(lens[b])
        n_cand = max(cand_end[b] - num_sink, 0)
        assert k == min(max(math.ceil(sparsity * seq_lens[b] - 1e-6), min_sel), max_sel, n_cand)
        if k == 0:
            continue
        row = pool.req_to_token[pool.req_pool_indices[b]].long()
        pos_of = {int(row[p]): p for p in range(num_sink, cand_end[b])}
        for h in range(scores.shape[1]):
            picked = sorted(pos_of[int(s)] for s in out[b, h, :k])
            assert picked == sorted(set(picked)), "duplicate selection"
            want = torch.topk(scores[b, h, num_sink: cand_end[b]], k).values
            torch.testing.assert_close(scores[b, h, picked].sort().values, want.sort().values)


@pytest.mark.parametrize("selection", ["hybrid:0.25", "hybrid:0.5", "hybrid:0.75", "window"])
def test_topk_hybrid_leaves_the_recent_part_to_the_dense_tail(selection):
    """A recent share (hybrid / window): R = num_recent(K) goes to out_recent, the K - R best of
    the candidates before cand_end - R are listed (kernel == reference), and R + listed = K."""
    from sparsespec_sglang.selection import recent_share_ppm

    seq_lens, cand_end, num_sink = [300, 120, 45, 290, 60], [291, 111, 3, 290, 14], 4
    pool, scores = _topk_case(seq_lens, cand_end, seed=3)
    scores[3, :, 270:290] = 9.0  # the best scores sit in the recent part: the top-K must not take them
    policy = SelectionPolicy(sparsity_ppm(0.1), 7, 48, num_sink, recent_share_ppm(selection))
    batch, heads = len(seq_lens), scores.shape[1]
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                cand_end=_ints(cand_end))
    outs = []
    rows = pool.req_pool_indices.long()
    for fn in (select_topk, select_topk_ref):
        out, lens, recent = _pool_tables(pool, heads, 48)
        fn(scores, policy, **args, out_indices=out, out_lens=lens, out_recent=recent)
        outs.append((out[rows], lens[rows], recent[rows]))
    (out, lens, recent), (ref_out, ref_lens, ref_recent) = outs
    assert torch.equal(out, ref_out) and torch.equal(lens, ref_lens) and torch.equal(recent, ref_recent)
    for b in range(batch):
        k = policy.num_selected(seq_lens[b], cand_end[b])
        r = int(recent[b])
        assert r == policy.num_recent(k) and int(lens[b]) == k - r
        row = pool.req_to_token[pool.req_pool_indices[b]]
        older = {int(row[p]) for p in range(num_sink, cand_end[b] - r)}
        assert set(out[b, :, : k - r].flatten().tolist()) <= older  # nothing from the recent part
        for h in range(heads):
            want = torch.topk(scores[b, h, num_sink: cand_end[b] - r], k - r).values if k > r else None
            if want is not None:
                pos = [int((row == s).nonzero()[0]) for s in out[b, h, : k - r].tolist()]
                torch.testing.assert_close(scores[b, h, pos].sort().values, want.sort().values)
    if selection == "window":
        assert torch.all(lens == 0)
    with pytest.raises(AssertionError, match="out_recent"):
        select_topk(scores, policy, **args, out_indices=out, out_lens=lens)


def test_topk_over_a_group_of_layers_equals_one_launch_per_layer():
    """Unified passes select for several layers in one launch (layer-strided views of larger
    tables, as the backend passes them): each layer's table equals its own single-layer launch."""
    seq_lens, cand_end = [300, 120, 45, 290], [291, 111, 3, 290]
    pool, base = _topk_case(seq_lens, cand_end, page_size=16, seed=7)
    layers, rows = 3, pool.req_to_token.shape[0]
    scores_all = torch.stack([base.roll(i * 17, dims=-1) for i in range(layers + 1)])  # [L+1, B, H, ctx]
    policy = SelectionPolicy(sparsity_ppm(0.1), 4, 48, 4)
    args = dict(req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                cand_end=_ints(cand_end))
    tables = torch.full((layers + 2, rows, base.shape[1], 64), -5, dtype=torch.int32, device=DEVICE)
    lens = torch.full((rows,), -5, dtype=torch.int32, device=DEVICE)
    select_topk(scores_all[:layers], policy, **args, out_indices=tables[1:layers + 1, :, :, :48], out_lens=lens)
    assert torch.all(tables[0] == -5) and torch.all(tables[layers + 1] == -5)  # neighbours untouched
    for i in range(layers):
        one = torch.full((rows, base.shape[1], 48), -5, dtype=torch.int32, device=DEVICE)
        one_lens = torch.full_like(lens, -5)
        select_topk(scores_all[i], policy, **args, out_indices=one, out_lens=one_lens)
        assert torch.equal(tables[i + 1, :, :, :48], one) and torch.equal(lens, one_lens)
    assert not torch.equal(tables[1], tables[2])  # the layers' scores differ, so do the picks


def test_topk_ties_prefer_lower_positions():
    pool = Pool([200], 1, 1, 16, torch.float32, 4)
    scores = torch.full((1, 1, pool.req_to_token.shape[1]), 0.5, device=DEVICE)
    scores[0, 0, 150] = 0.9
    out, lens, _, _ = _run_topk(pool, scores, [200], [200], 4, 0.05, 0, 64)
    want = [pool.slot(0, 150)] + [pool.slot(0, p) for p in range(4, 13)]
    assert int(lens[0]) == 10 and sorted(out[0, 0].tolist()[:10]) == sorted(want)


def test_topk_packed_counters_at_their_limit(monkeypatch):
    """Byte counters are folded every 255 blocks: fill them to exactly 255 and wrap into a 2nd chunk."""
    from sparsespec_sglang.kernels import topk_select

    block = 16
    monkeypatch.setattr(topk_select, "_BLOCK", block)
    n = block * 255 + 3 * block + 5  # two flush chunks, the second one ragged
    pool = Pool([n], 1, 1, 16, torch.float32, 6)
    scores = torch.full((1, 2, pool.req_to_token.shape[1]), 0.75)  # every lane hits one byte 255 times
    scores[0, 1, : n // 2] = 0.5  # second head: two values, threshold sits in the larger group
    scores[0, :, 100] = 2.0
    out, lens, ref_out, ref_lens = _run_topk(pool, scores.to(DEVICE), [n], [n], 0, 0.6, 0, n)
    assert torch.equal(lens, ref_lens) and torch.equal(out, ref_out)


def test_topk_follows_the_scores():
    seq_lens, cand_end, num_sink = [200, 150], [190, 150], 4
    pool, scores = _topk_case(seq_lens, cand_end, seed=9)
    base, lens, _, _ = _run_topk(pool, scores, seq_lens, cand_end, num_sink, 0.1, 0, 64)
    ignored = scores.clone()
    ignored[0, 2, :num_sink] = 9.0  # sinks and positions past cand_end are not candidates
    ignored[0, 2, cand_end[0]:seq_lens[0]] = 9.0
    same, _, _, _ = _run_topk(pool, ignored, seq_lens, cand_end, num_sink, 0.1, 0, 64)
    assert torch.equal(same, base)
    loser = next(p for p in range(num_sink, cand_end[0]) if pool.slot(0, p) not in base[0, 2, :20].tolist())
    promoted = scores.clone()
    promoted[0, 2, loser] = 9.0
    moved, _, _, _ = _run_topk(pool, promoted, seq_lens, cand_end, num_sink, 0.1, 0, 64)
    assert pool.slot(0, loser) in moved[0, 2, : int(lens[0])].tolist()
    assert torch.equal(moved[1], base[1]) and torch.equal(moved[0, :2], base[0, :2])


# --------------------------------------------------------------------------------------------
# the three together: verify -> top-K -> sparse draft decode
# --------------------------------------------------------------------------------------------


def test_cycle_with_full_budget_is_dense_attention():
    """With a budget covering every candidate, a draft step after a verify is exact attention."""
    prefix_lens, k1, num_sink, group = [70, 130], 9, 4, 4
    pool, q_verify, qo = _verify_case(prefix_lens, [k1, k1], group, page_size=16, seed=21)
    scores = torch.zeros(2, 2, pool.req_to_token.shape[1], device=DEVICE)
    out = torch.empty_like(q_verify)
    sm_scale = 1.0 / math.sqrt(q_verify.shape[-1])
    verify_attention_with_scores(q_verify, pool.k, pool.v, out, **_verify_layout(pool, prefix_lens, [k1, k1], qo),
                                 scores=scores, sm_scale=sm_scale)
    # Next draft token sits after the accepted prefix + 3 tokens; candidates are the verified prefix.
    seq_lens = [p + 3 for p in prefix_lens]
    max_sel = 200
    sel, table_lens, _ = _pool_tables(pool, 2, max_sel)  # by pool row, as the backend keeps them
    select_topk(scores, SelectionPolicy(sparsity_ppm(1.0), 0, max_sel, num_sink), req_to_token=pool.req_to_token,
                req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens), cand_end=_ints(prefix_lens),
                out_indices=sel, out_lens=table_lens)
    sel_lens = table_lens[pool.req_pool_indices.long()]
    assert sel_lens.tolist() == [p - num_sink for p in prefix_lens]
    q = torch.randn(2, 2 * group, 64, generator=pool.gen).to(DEVICE)
    dec = torch.empty_like(q)
    sparse_decode_attention(q, pool.k, pool.v, dec, req_to_token=pool.req_to_token,
                            req_pool_indices=pool.req_pool_indices, seq_lens=_ints(seq_lens),
                            dense_start=_ints(prefix_lens), sel_indices=sel, sel_lens=sel_lens, num_sink=num_sink,
                            sm_scale=sm_scale, num_kv_splits=4)
    for b in range(2):
        slots = pool.req_to_token[pool.req_pool_indices[b], : seq_lens[b]].long()
        torch.testing.assert_close(dec[b], _dense_attention(q[b], pool.k[slots], pool.v[slots], sm_scale),
                                   **_tol(torch.float32))


# --------------------------------------------------------------------------------------------
# GPU, real sizes (Qwen3-8B attention: Hq 32, Hkv 8, D 128, bf16)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_sparse_decode_real_size(page_size):
    batch, ctx, num_sink = 32, 4096, 4
    gen = torch.Generator().manual_seed(page_size)
    seq_lens = (ctx - torch.randint(0, 512, (batch,), generator=gen)).tolist()
    dense_start = [s - 1 - int(torch.randint(0, 8, (1,), generator=gen)) for s in seq_lens]
    sel_counts = [math.ceil(0.05 * s) for s in seq_lens]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, num_sink, 4, num_kv_heads=8,
                                          head_dim=128, page_size=page_size, dtype=torch.bfloat16, seed=page_size)
    out, lse, ref_out, ref_lse = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 8)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.bfloat16))
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("aggregation", ["sum", "max"])
def test_gpu_verify_real_size(aggregation):
    batch, ctx = 32, 4096
    gen = torch.Generator().manual_seed(1)
    prefix_lens = (ctx - 9 - torch.randint(0, 512, (batch,), generator=gen)).tolist()
    pool, q, qo = _verify_case(prefix_lens, [9] * batch, 4, num_kv_heads=8, head_dim=128, page_size=16,
                               dtype=torch.bfloat16, seed=2)
    out, scores, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, [9] * batch, qo, aggregation, None)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.bfloat16))
    torch.testing.assert_close(scores, ref_scores, **_score_tol(torch.bfloat16))


@pytest.mark.gpu
@gpu
def test_gpu_split_by_length_at_real_size_with_unequal_contexts():
    """``split_by_length`` on the GPU: 32 requests from 512 to 16K tokens (the grid's 16 splits,
    counts from 1 to 16), sparse decode and exact verify against their references."""
    batch, num_sink = 32, 4
    seq_lens = [512 + (16384 - 512) * b // (batch - 1) for b in range(batch)]
    dense_start = [s - 3 for s in seq_lens]
    sel_counts = [math.ceil(0.05 * s) for s in seq_lens]
    pool, q, sel, sel_lens = _decode_case(seq_lens, dense_start, sel_counts, num_sink, 4, num_kv_heads=8,
                                          head_dim=128, page_size=16, dtype=torch.bfloat16, seed=4)
    out, lse, ref_out, ref_lse = _run_decode(pool, q, seq_lens, dense_start, sel, sel_lens, num_sink, 16,
                                             split_by_length=True)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.bfloat16))
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
    prefix_lens = [s - 9 for s in seq_lens]
    pool, q, qo = _verify_case(prefix_lens, [9] * batch, 4, num_kv_heads=8, head_dim=128, page_size=16,
                               dtype=torch.bfloat16, seed=5)
    out, scores, ref_out, ref_scores = _run_verify(pool, q, prefix_lens, [9] * batch, qo, "sum", None,
                                                   split_by_length=True)
    torch.testing.assert_close(out.float(), ref_out.float(), **_tol(torch.bfloat16))
    torch.testing.assert_close(scores, ref_scores, **_score_tol(torch.bfloat16))


@pytest.mark.gpu
@gpu
def test_gpu_topk_real_size():
    batch, ctx, num_sink = 32, 4096, 4
    gen = torch.Generator().manual_seed(3)
    seq_lens = (ctx - torch.randint(0, 512, (batch,), generator=gen)).tolist()
    cand_end = [s - 9 for s in seq_lens]
    pool = Pool(seq_lens, 16, 8, 16, torch.float32, 3)
    # Softmax-like scores: many tiny values sharing exponents, a few large ones.
    scores = torch.softmax(torch.randn(batch, 8, pool.req_to_token.shape[1], generator=gen) * 3, -1).to(DEVICE)
    out, lens, ref_out, ref_lens = _run_topk(pool, scores, seq_lens, cand_end, num_sink, 0.05, 64, 4096)
    assert torch.equal(lens, ref_lens) and torch.equal(out, ref_out)


def test_split_count_is_the_most_that_runs_in_one_round():
    """The split count of the attention kernels: the H100 sweeps' fastest counts (132 SMs, 8 KV
    heads; verifying requests -> splits), and in general as many programs as run at once, never
    one split more (a second round as long as the first)."""
    fastest_on_h100 = {8: 4, 14: 2, 28: 1, 128: 1, 504: 1}
    assert {b: pick_num_kv_splits(b, 8, 132) for b in fastest_on_h100} == fastest_on_h100
    for num_sms in (1, 78, 132, 148):
        slots = PROGRAMS_PER_SM * num_sms
        for heads in (1, 2, 8):
            for batch in range(1, 300):
                splits = pick_num_kv_splits(batch, heads, num_sms)
                assert 1 <= splits <= 16
                assert splits == 1 or batch * heads * splits <= slots
                assert splits == 16 or batch * heads * (splits + 1) > slots
