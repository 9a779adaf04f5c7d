"""A toy target model for CPU tests of the schedules and the worker (not a test module).

The target's next token is a fixed function of (token, position); a draft row (a sparse draft
step, or a row before a unified pass's verify rows) gets that token or, at some positions, a
wrong one, so drafts are rejected at ragged points, unless it attends to its whole context (a
dense row: exact). Only SGLang's model forward, its CUDA-only
acceptance kernel and its CUDA/sgl_kernel cache-location op are replaced; schedules, worker,
PillarState and the plans the forward batches carry are the real ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sparsespec_sglang.attention import SparseSpecAttnBackend, plan_of
from sparsespec_sglang.config import CONFIG_ATTR, SERVER_ARGS_ATTR, SparseSpecConfig
from sparsespec_sglang.forward_plan import PlanKind

VOCAB = 97


def toy_req(row: int, **fields) -> SimpleNamespace:
    """A scheduled request as the schedules read it: its req_to_token row where the installed SGLang
    keeps it (``Req.req_pool_idx``, or ``Req.kv.req_pool_idx`` from 0.5.19)."""
    return SimpleNamespace(req_pool_idx=row, kv=SimpleNamespace(req_pool_idx=row), **fields)


def sparsespec_record(k: int, values: dict) -> SimpleNamespace:
    """A resolved SPARSESPEC server record as the worker receives it: SGLang's fields, the
    ``--sparsespec-*`` values and the SparseSpecConfig validation attached to it."""
    return SimpleNamespace(speculative_algorithm="SPARSESPEC", speculative_num_steps=k,
                           **{SERVER_ARGS_ATTR: values, CONFIG_ATTR: SparseSpecConfig.from_values(k, values)})


def target_next(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (token * 31 + pos * 7 + 3) % VOCAB


def target_sequence(last_prompt_token: int, prompt_len: int, n: int) -> list[int]:
    """The target's own greedy continuation of a prompt ending in ``last_prompt_token``."""
    seq = [int(target_next(torch.tensor(last_prompt_token), torch.tensor(prompt_len - 1)))]
    for p in range(prompt_len, prompt_len + n - 1):
        seq.append(int(target_next(torch.tensor(seq[-1]), torch.tensor(p))))
    return seq


def _logits(tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.long(), VOCAB).float()


class ToyBackend(SparseSpecAttnBackend):
    """The real backend (``attach``) without SGLang's constructor."""

    def __init__(self) -> None:  # noqa: D107 -- no TritonAttnBackend: no model runner on CPU
        self.state = None


class ToyModelRunner:
    """``model_runner.forward`` over single-token DECODE rows, on the plan the batch carries."""

    def __init__(self, backend: ToyBackend, device: str = "cpu") -> None:
        self.backend = backend
        self.device = device
        self.forwards: list[tuple[PlanKind, int]] = []  # (plan kind, rows) per forward
        self.draft_inputs: list[tuple[list[int], list[int]]] = []  # per draft forward: (dense_start, sel_lens)
        # per unified pass: the attention plan of each row next to its request's PillarState then,
        # as (pool row, is draft row, row dense_start, row sel_lens, state dense_start, state sel_lens)
        self.pass_rows: list[list[tuple[int, bool, int, int, int, int]]] = []
        self.state = None  # the PillarState the pass rows are compared with (set by a test)
        self.written: list[tuple[list[int], list[int]]] = []  # per forward: (pool rows, KV positions written)
        # The shape the adaptive policy's pass-cost prior reads (unified.model_shape_prior).
        self.model = torch.nn.Linear(8, 8)
        self.token_to_kv_pool = SimpleNamespace(layer_num=2, head_num=2, head_dim=8, v_head_dim=8,
                                                store_dtype=torch.float32)

    def forward(self, fb):
        plan = plan_of(fb)
        assert fb.forward_mode.is_decode()
        pos = fb.seq_lens - 1
        nxt = target_next(fb.input_ids, pos)
        n = len(nxt)
        self.written.append((fb.req_pool_indices[:n].tolist(), pos.tolist()))
        if plan is None:  # a plain decode forward (a unified step whose requests are all dense)
            assert fb.spec_info is None and fb.seq_lens_sum is None  # SGLang sizes from the device lengths
            self.forwards.append((None, n))
            return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=_logits(nxt)))
        if plan.kind is PlanKind.SPARSE_DRAFT:
            draft_rows = n
            self.draft_inputs.append((plan.draft.dense_start[:n].tolist(), plan.draft.sel_lens[:n].tolist()))
        else:
            draft_rows = int(plan.rows.qo_indptr[0])
            if self.state is not None:
                pool = fb.req_pool_indices[:n].tolist()
                self.pass_rows.append([
                    (p, i < draft_rows, int(plan.rows.dense_start[i]), int(plan.rows.sel_lens[i]),
                     int(self.state.dense_start[p]), int(self.state.sel_lens[p])) for i, p in enumerate(pool)])
        # A row that attends to its whole context (dense from 0, no selection: a dense row of
        # adaptive speculation) is exact; other draft rows are wrong at some positions.
        full = (plan.draft.dense_start[:n] if plan.kind is PlanKind.SPARSE_DRAFT else plan.rows.dense_start[:n]) == 0
        full &= (plan.draft.sel_lens[:n] if plan.kind is PlanKind.SPARSE_DRAFT else plan.rows.sel_lens[:n]) == 0
        wrong = (torch.arange(n) < draft_rows) & (pos % 5 == 2) & ~full
        nxt = torch.where(wrong, (nxt + 1) % VOCAB, nxt)
        self.forwards.append((plan.kind, n))
        return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=_logits(nxt)))


class ToyTargetWorker:
    """SGLang's TpModelWorker: prefill (EXTEND) and the lockstep verify (TARGET_VERIFY)."""

    def __init__(self, model_runner: ToyModelRunner, req_to_token: torch.Tensor) -> None:
        self.model_runner = model_runner
        self.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
        self.verifies: list[int] = []  # batch size per verify

    def get_memory_pool(self):
        return self.req_to_token_pool, None

    def forward_batch_generation(self, batch, is_verify: bool = False):
        if is_verify:
            assert batch.forward_mode == ForwardMode.TARGET_VERIFY and is_verify
            info = batch.spec_info
            assert plan_of(batch) is None  # SGLang's own verify input
            self.verifies.append(len(batch.reqs))
            logits = _logits(target_next(batch.input_ids, info.positions))
            return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits),
                                   can_run_cuda_graph=False)
        assert batch.forward_mode.is_extend()
        first = target_next(batch.input_ids_last, batch.seq_lens - 1)
        return SimpleNamespace(logits_output=None, next_token_ids=first, can_run_cuda_graph=False)


def greedy_chain_accept(verify_input, batch, logits_output, grammar_mask=None, sampling_backend=None):
    """SGLang's greedy chain acceptance (``verify_tree_greedy``, CUDA-only) in PyTorch."""
    assert grammar_mask is None
    w = verify_input.draft_token_num
    cand = verify_input.draft_token.view(-1, w)
    target = logits_output.next_token_logits.argmax(-1).view(-1, w)
    nxt = verify_input.retrieve_next_token
    nv = cand.shape[0]
    predict = torch.zeros(nv * w, dtype=torch.int32)
    accept_index = torch.full((nv, w), -1, dtype=torch.int32)
    lens = torch.zeros(nv, dtype=torch.int32)
    for v in range(nv):
        j = 0
        while True:
            accept_index[v, j] = v * w + j
            predict[v * w + j] = target[v, j]
            if nxt[v, j] < 0 or cand[v, j + 1] != target[v, j]:
                break
            j += 1
        lens[v] = j + 1
    return predict, lens, accept_index


def extend_cache_locs(req_pool_indices, req_to_token, start_offset, end_offset, batch_size,
                      draft_token_num, device):
    """SGLang's ``assign_extend_cache_locs_func`` (Triton or sgl_kernel) in PyTorch."""
    pos = start_offset.unsqueeze(1) + torch.arange(draft_token_num)
    return req_to_token[req_pool_indices.unsqueeze(1), pos].flatten().to(torch.int64)


def forward_batch_of(batch, *_args, **_kwargs):
    """``ForwardBatch.init_new``: the fields the toy runner reads."""
    return SimpleNamespace(input_ids=batch.input_ids, seq_lens=batch.seq_lens,
                           forward_mode=batch.forward_mode, req_pool_indices=batch.req_pool_indices,
                           spec_info=batch.spec_info, seq_lens_sum=batch.seq_lens_sum)


def patch_sglang(monkeypatch) -> None:
    """Replace the CUDA-only SGLang pieces the schedules call (see the module docstring)."""
    monkeypatch.setattr("sparsespec_sglang.acceptance.sample_like_plain", greedy_chain_accept)
    for module in ("lockstep", "unified"):
        monkeypatch.setattr(f"sparsespec_sglang.{module}.ForwardBatch",
                            SimpleNamespace(init_new=forward_batch_of))
    monkeypatch.setattr("sparsespec_sglang.lockstep.assign_extend_cache_locs_func", extend_cache_locs)
