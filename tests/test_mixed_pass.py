"""The backend's unified-pass layer (``SparseSpecAttnBackend._forward_mixed``) on the CPU.

The kernels run in the Triton interpreter; SGLang's backend constructor (which needs a model
runner) is skipped, the layer method runs on a pass of 3 drafting requests and 2 verifying
ones over 3 layers. Selecting the top-K of a group of layers in one launch must give exactly the
tables and outputs of selecting layer by layer, including when a pass verifies more requests
than the group buffer holds (the per-layer fallback).
"""

from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsespec_sglang.attention import SparseSpecAttnBackend, graph_verify_splits  # noqa: E402
from sparsespec_sglang.config import SparseSpecConfig  # noqa: E402
from sparsespec_sglang.kernels.attention_common import PROGRAMS_PER_SM, pick_num_kv_splits  # noqa: E402
from sparsespec_sglang.kernels.sparse_decode import sparse_decode_attention  # noqa: E402
from sparsespec_sglang.kernels.verify_attention import verify_attention_with_scores  # noqa: E402
from sparsespec_sglang.forward_plan import ForwardPlan, MixedRows  # noqa: E402
from sparsespec_sglang.pillar import PillarState  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS, HQ, HKV, D, K = 3, 4, 2, 16, 3


def _ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _run_pass(keep_group: tuple[int, int] | None, score_norm: str, streams=None, dense_first: bool = False):
    """``dense_first``: the first request decodes densely (adaptive speculation): its row reads
    from position 0 with no selection."""
    gen = torch.Generator().manual_seed(0)
    config = SparseSpecConfig(num_draft_steps=K, sparsity=0.2, min_selected=2, max_selected=16,
                              num_sink_tokens=2, score_norm=score_norm)
    num_rows, ctx = 8, 96
    req_to_token = (torch.randperm(num_rows * ctx, generator=gen) + 1).int().view(num_rows, ctx)
    state = PillarState(config, LAYERS, HQ, HKV, req_to_token.to(DEVICE), group_scores=keep_group)
    if state.draft_lse is not None:
        state.draft_lse.copy_(torch.rand(state.draft_lse.shape, generator=gen) + 3.0)
    num_slots = num_rows * ctx + 1
    k_buf = [torch.randn(num_slots, HKV, D, generator=gen).to(DEVICE) for _ in range(LAYERS)]
    v_buf = [torch.randn(num_slots, HKV, D, generator=gen).to(DEVICE) for _ in range(LAYERS)]

    # Drafting requests at pool rows 1, 4, 6 (one row each); verifying ones at rows 2 and 5 with
    # chains of 3 and 4 tokens after prefixes of 50 and 70.
    draft_pool, draft_len = [1, 4, 6], [40, 61, 33]
    verify_pool, prefix, lens = [2, 5], [50, 70], [3, 4]
    row_pool = draft_pool + [2] * 3 + [5] * 4
    seq_lens = draft_len + [51, 52, 53] + [71, 72, 73, 74]
    t = len(row_pool)
    rows = MixedRows.allocate(K + 1, 32, DEVICE)
    rows.dense_start[:t] = _ints([n - 2 for n in draft_len] + seq_lens[3:])
    if dense_first:
        rows.dense_start[0] = 0
    rows.sel_lens[:t] = 0
    rows.ring_rows[:t] = _ints(draft_pool + [0] * 7)
    rows.verify_rows[:2], rows.verify_prefix[:2] = _ints(verify_pool), _ints(prefix)
    rows.verify_lens[:2], rows.verify_end[:2] = _ints(lens), _ints([p + n for p, n in zip(prefix, lens)])
    rows.qo_indptr[:3] = _ints([3, 6, 10])
    rows.num_verify = 2

    backend = object.__new__(SparseSpecAttnBackend)
    backend.state, backend._num_sms = state, 4
    backend.make_streams(DEVICE)
    if streams is not None:  # a recorder of the streams' ordering (see StreamLog)
        backend._streams = streams
        backend._verify_stream, backend._topk_stream = streams.Stream("verify"), streams.Stream("topk")
    backend.token_to_kv_pool = SimpleNamespace(head_num=HKV, get_key_buffer=lambda i: k_buf[i],
                                               get_value_buffer=lambda i: v_buf[i])
    forward_batch = SimpleNamespace(req_pool_indices=_ints(row_pool), seq_lens=_ints(seq_lens),
                                    spec_info=ForwardPlan.unified_pass(rows))
    outs, inputs = [], []
    for lid in range(LAYERS):
        q = torch.randn(t, HQ * D, generator=gen).to(DEVICE)
        layer = SimpleNamespace(layer_id=lid, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D,
                                scaling=1.0 / math.sqrt(D), logit_capping_method="tanh", logit_cap=0.0)
        inputs.append((q.view(t, HQ, D), k_buf[lid], v_buf[lid], layer.scaling))
        if streams is not None:
            streams.layer = lid
        outs.append(backend.forward_decode(q, None, None, layer, forward_batch, save_kv_cache=False))
    pass_ = SimpleNamespace(rows=rows, forward_batch=forward_batch, inputs=inputs, num_draft=3)
    return torch.stack(outs), state, pass_


def test_grouped_topk_equals_per_layer_selection():
    for score_norm in ("exact", "draft"):
        out, state, _ = _run_pass(None, score_norm)
        assert torch.all(state.sel_lens[[2, 5]] > 0)
        picked = [state.sel_indices[:, r, :, :int(state.sel_lens[r])] for r in (2, 5)]
        assert not torch.equal(picked[0][0], picked[0][1])  # layers select differently
        # groups {0, 1} and {2}, and a buffer too small for this pass's 2 verifies (fallback)
        for keep in ((2, 4), (LAYERS, 2), (2, 1)):
            out_g, state_g, _ = _run_pass(keep, score_norm)
            torch.testing.assert_close(out_g, out, rtol=0, atol=0)
            assert torch.equal(state_g.sel_lens, state.sel_lens), keep
            assert torch.equal(state_g.sel_indices, state.sel_indices), keep
            assert bool(state_g.group_scores.any()) == (keep[1] >= 2)


def test_verify_rows_come_from_the_verify_kernel_and_draft_rows_from_the_sparse_decode():
    """The two kernels of a unified pass run on separate streams and write disjoint rows: the
    verify rows equal the verify kernel's output alone, the draft rows the sparse decode's
    (which would otherwise overwrite the verify rows with a sinks-only read)."""
    out, state, p = _run_pass((2, 4), "exact")
    rows, fb, d = p.rows, p.forward_batch, p.num_draft
    for lid, (q, k_buf, v_buf, scale) in enumerate(p.inputs):
        verify_out = torch.full((q.shape[0], HQ, D), 7.0, device=DEVICE)
        verify_attention_with_scores(
            q, k_buf, v_buf, verify_out, req_to_token=state.req_to_token, req_pool_indices=rows.verify_rows[:2],
            prefix_lens=rows.verify_prefix[:2], extend_lens=rows.verify_lens[:2], qo_indptr=rows.qo_indptr[:3],
            scores=torch.zeros(2, HKV, state.req_to_token.shape[1], device=DEVICE), sm_scale=scale,
            aggregation="sum", num_kv_splits=1)
        decode_out = torch.full((d, HQ, D), 7.0, device=DEVICE)
        sparse_decode_attention(
            q[:d], k_buf, v_buf, decode_out, req_to_token=state.req_to_token,
            req_pool_indices=fb.req_pool_indices[:d], seq_lens=fb.seq_lens[:d],
            dense_start=rows.dense_start[:d], sel_indices=state.sel_indices[lid], sel_lens=rows.sel_lens[:d],
            num_sink=state.config.num_sink_tokens, sm_scale=scale, num_kv_splits=1)
        got = out[lid].view(-1, HQ, D)
        torch.testing.assert_close(got[d:], verify_out[d:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[:d], decode_out, rtol=1e-5, atol=1e-5)


class _LoggedStream:
    def __init__(self, log: "StreamLog", name: str):
        self.log, self.name = log, name

    def wait_stream(self, other: "_LoggedStream") -> None:
        mine = self.log.clock[self.name]
        for stream, count in self.log.clock[other.name].items():
            mine[stream] = max(mine.get(stream, 0), count)


class StreamLog:
    """Stands in for ``torch.cuda``'s stream API and orders the pass's kernels with vector clocks:
    ``happens_before(a, b)`` holds when the recorded waits make kernel ``a`` finish before ``b``
    starts on a GPU, whatever the streams' relative speed."""

    def __init__(self):
        self.clock: dict[str, dict[str, int]] = {}
        self.streams: dict[str, _LoggedStream] = {}
        self.Stream("main")
        self.current, self.layer, self.ops = "main", None, []

    def Stream(self, name: str) -> _LoggedStream:  # noqa: N802 (torch's spelling)
        self.clock[name] = {}
        self.streams[name] = _LoggedStream(self, name)
        return self.streams[name]

    def current_stream(self) -> _LoggedStream:
        return self.streams[self.current]

    @contextlib.contextmanager
    def stream(self, stream: _LoggedStream):
        saved, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = saved

    def op(self, name: str) -> None:
        clock = self.clock[self.current]
        clock[self.current] = clock.get(self.current, 0) + 1
        self.ops.append((name, self.layer, self.current, dict(clock)))

    def find(self, name: str, layer) -> tuple:
        return next(op for op in self.ops if op[0] == name and op[1] == layer)

    @staticmethod
    def happens_before(a: tuple, b: tuple) -> bool:
        return a[3][a[2]] <= b[3].get(a[2], 0)


def test_the_streams_of_a_pass_order_every_conflicting_kernel(monkeypatch):
    """Layers 0, 1 form a top-K group, layer 2 is the last (its own group). The verify of a layer
    runs beside its sparse decode (neither waits for the other), is finished before the next
    layer's kernels on the forward's stream, the group's top-K is finished before the next
    group's verify overwrites the score buffer, and every kernel is before the pass's end."""
    import sparsespec_sglang.attention as attention

    log = StreamLog()
    for name in ("verify_attention_with_scores", "select_topk", "sparse_decode_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name,
                            lambda *a, _real=real, _name=name, **k: (log.op(_name), _real(*a, **k))[1])
    _run_pass((2, 4), "exact", streams=log)
    log.layer = "end"
    log.op("end")
    verify = [log.find("verify_attention_with_scores", lid) for lid in range(LAYERS)]
    decode = [log.find("sparse_decode_attention", lid) for lid in range(LAYERS)]
    topk = [op for op in log.ops if op[0] == "select_topk"]
    hb, end = StreamLog.happens_before, log.ops[-1]
    assert [op[1] for op in topk] == [1, 2] and topk[0][2] == "topk" and topk[1][2] == "verify"
    for lid in range(LAYERS):
        assert verify[lid][2] == "verify" and decode[lid][2] == "main"
        assert not hb(verify[lid], decode[lid]) and not hb(decode[lid], verify[lid])  # concurrent
        if lid + 1 < LAYERS:
            assert hb(verify[lid], decode[lid + 1]) and hb(verify[lid], verify[lid + 1])
    assert hb(topk[0], verify[2])  # group 0's scores are read before layer 2 overwrites slot 0
    assert all(hb(op, end) for op in log.ops[:-1])


def test_a_dense_row_attends_to_its_whole_context_exactly():
    """A dense row of a unified pass (dense start 0, no selection) is a plain decode step's
    attention: softmax over every one of its context's slots, the sinks counted once; the pass's
    other rows are unchanged."""
    out, state, p = _run_pass((2, 4), "exact", dense_first=True)
    base, _, _ = _run_pass((2, 4), "exact")
    fb = p.forward_batch
    pool, n = int(fb.req_pool_indices[0]), int(fb.seq_lens[0])
    slots = state.req_to_token[pool, :n].long()
    for lid, (q, k_buf, v_buf, scale) in enumerate(p.inputs):
        k, v = k_buf[slots], v_buf[slots]  # [n, Hkv, D]
        g = HQ // HKV
        qk = torch.einsum("hd,nhd->hn", q[0], k.repeat_interleave(g, dim=1)) * scale
        want = torch.einsum("hn,nhd->hd", qk.softmax(-1), v.repeat_interleave(g, dim=1))
        got = out[lid].view(-1, HQ, D)
        torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1:], base[lid].view(-1, HQ, D)[1:], rtol=0, atol=0)
    assert not torch.allclose(out[0].view(-1, HQ, D)[0], base[0].view(-1, HQ, D)[0])


def test_a_graphs_verify_splits_leave_room_for_more_real_entries_than_half():
    """A captured pass's verify split count: about half of its entries are real, a varying number.
    H100 (132 SMs, 8 KV heads): 9 entries, 4-6 real, give 5 splits (one round up to 6 real; the
    exact-count rule for 4 would pick 8, a second round for 5 or 6). In general: one round of
    programs (2 per SM) for half of the entries, and never fewer splits than the exact-count rule
    gives for all of them."""
    assert graph_verify_splits(9, 8, 132) == 5
    for num_sms in (78, 132, 148):
        for heads in (2, 8):
            for entries in range(2, 120):
                splits = graph_verify_splits(entries, heads, num_sms)
                assert splits == 1 or (entries // 2) * heads * splits <= PROGRAMS_PER_SM * num_sms
                assert splits >= pick_num_kv_splits(entries, heads, num_sms)
