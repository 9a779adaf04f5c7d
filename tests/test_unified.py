"""UnifiedRunner (issue 5) on the CPU: k + 1 mixed passes per step emit exactly the target's tokens.

A toy "model" stands in for SGLang's model runner: the target's next token is a fixed function
of (token, position), and a draft row (a row before the pass's verify rows) gets that token or,
at some positions, a wrong one, so drafts are rejected at ragged points. Requests join with
ragged prompts, finish at ragged lengths and leave between steps; every request's emitted
tokens must equal the target's own greedy sequence, and every step must verify every request
once. Only the forward and SGLang's greedy acceptance kernel (CUDA-only) are replaced; the
runner's planning, row layout, draft bookkeeping across steps and acceptance tail are real.
"""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.unified import PassLayout, UnifiedRunner

VOCAB = 97


def target_next(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (token * 31 + pos * 7 + 3) % VOCAB


class ToyRunner:
    """``model_runner.forward`` over the single-token rows the unified pass builds."""

    def __init__(self, backend):
        self.backend = backend
        self.passes: list[tuple[int, int]] = []  # (rows, verifying requests)

    def forward(self, fb):
        pos = fb.seq_lens - 1
        nxt = target_next(fb.input_ids, pos)
        rows = self.backend.rows
        draft_rows = int(rows.qo_indptr[0])
        wrong = (torch.arange(len(nxt)) < draft_rows) & (pos % 5 == 2)
        nxt = torch.where(wrong, (nxt + 1) % VOCAB, nxt)
        self.passes.append((len(nxt), rows.num_verify))
        logits = torch.nn.functional.one_hot(nxt, VOCAB).float()
        return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits))


class ToyBackend:
    def __init__(self):
        self.rows = None

    @contextlib.contextmanager
    def mixed_pass(self, rows):
        self.rows = rows
        yield


def greedy_chain_accept(verify_input, batch, logits_output):
    """SGLang's greedy chain acceptance (``verify_tree_greedy``) in PyTorch."""
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


def test_layout_rows_and_chains():
    from sparsespec_sglang.phases import PassPlan

    layout = PassLayout.from_plan(PassPlan(verify={7: 2, 9: 3}, draft={5: 0, 6: 3}),
                                  {5: 0, 6: 1, 7: 2, 9: 3})
    assert layout.row_batch == [0, 1, 2, 2, 2, 3, 3, 3, 3]
    assert layout.row_index == [0, 3, 0, 1, 2, 0, 1, 2, 3]
    assert layout.num_draft == 2 and layout.qo_indptr() == [2, 5, 9]
    assert layout.chain_gather(4) == [2, 3, 4, 4, 5, 6, 7, 8]
    assert layout.chain_next(4) == [1, 2, -1, -1, 1, 2, 3, -1]


@pytest.mark.parametrize("k, sampled", [(3, False), (8, False), (8, True)])
def test_unified_steps_emit_the_target_sequence(k, sampled, monkeypatch, caplog):
    """``sampled``: a non-greedy batch, whose per-request sampling tensors the acceptance of a
    pass must see for exactly its verifying requests, in their order (temperature = pool row)."""
    caplog.set_level("INFO", logger="sparsespec_sglang.unified")
    monkeypatch.setattr("sparsespec_sglang.unified.LOG_EVERY", 20)
    rng = random.Random(k)
    config = SparseSpecConfig(num_draft_steps=k, schedule="unified")
    num_rows, max_ctx = 24, 2048
    req_to_token = torch.arange(num_rows * max_ctx, dtype=torch.int32).view(num_rows, max_ctx)
    state = PillarState(config, 2, 4, 2, req_to_token)
    backend = ToyBackend()
    model = ToyRunner(backend)
    checked = []

    def accept(verify_input, batch, logits_output):
        info = batch.sampling_info
        if sampled:
            nv = verify_input.draft_token.shape[0] // verify_input.draft_token_num
            assert torch.equal(info.temperatures.view(-1), backend.rows.verify_rows[:nv].float())
            assert torch.equal(info.top_ks, backend.rows.verify_rows[:nv] * 2)
            assert info.scalar.dim() == 0
            checked.append(nv)
        return greedy_chain_accept(verify_input, batch, logits_output)

    runner = UnifiedRunner(k, state, backend, model, accept, delayed_verification=True)
    monkeypatch.setattr("sparsespec_sglang.unified.ForwardBatch", SimpleNamespace(
        init_new=lambda batch, *_a, **_k: SimpleNamespace(input_ids=batch.input_ids,
                                                          seq_lens=batch.seq_lens)))

    free, live, expected, emitted, next_id = list(range(1, num_rows)), {}, {}, {}, 0
    for step in range(80):
        # Finished requests leave; new ones are prefilled (prompt + first token) and join.
        for rid in [r for r, req in live.items() if len(emitted[r]) >= req.max_new]:
            free.append(live.pop(rid).req_pool_idx)
        while free and len(live) < 12 and rng.random() < 0.5:
            row = free.pop(rng.randrange(len(free)))
            prompt_len = rng.randint(5, 40)
            last = rng.randrange(VOCAB)
            first = int(target_next(torch.tensor(last), torch.tensor(prompt_len - 1)))
            seq = [first]
            for p in range(prompt_len, prompt_len + 200):
                seq.append(int(target_next(torch.tensor(seq[-1]), torch.tensor(p))))
            expected[next_id], emitted[next_id] = seq, [first]
            live[next_id] = SimpleNamespace(req_pool_idx=row, seq_len=prompt_len,
                                            max_new=rng.randint(10, 120))
            state.pending[row] = first
            state.dense_start[row] = prompt_len
            runner.forget([row])
            next_id += 1
        if not live:
            continue
        order = list(live)
        rng.shuffle(order)  # SGLang reorders and filters the batch between steps
        reqs = [live[r] for r in order]
        batch = SimpleNamespace(
            reqs=reqs, req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs]),
            seq_lens=torch.tensor([r.seq_len for r in reqs]),
            seq_lens_cpu=torch.tensor([r.seq_len for r in reqs]),
            seq_lens_sum=None, forward_mode=None, input_ids=None, out_cache_loc=None,
            spec_info=None, return_logprob=False,
            sampling_info=SimpleNamespace(is_all_greedy=not sampled, acc_additive_penalties=None,
                                          acc_scaling_penalties=None, logit_bias=None))
        if sampled:
            rows = batch.req_pool_indices.to(torch.int32)
            batch.sampling_info.temperatures = rows.float().view(-1, 1)
            batch.sampling_info.top_ks = rows * 2
            batch.sampling_info.scalar = torch.tensor(1.0)
        model.passes.clear()
        tokens, lens, new_seq_lens, _ = runner.step(batch)
        assert len(model.passes) == k + 1
        tokens = tokens.view(len(reqs), k + 1)
        assert torch.all((lens >= 1) & (lens <= k + 1)), lens  # every request verified once
        for i, rid in enumerate(order):
            n = int(lens[i])
            emitted[rid] += tokens[i, :n].tolist()
            assert int(new_seq_lens[i]) == live[rid].seq_len + n
            live[rid].seq_len += n
            got = emitted[rid]
            assert got == expected[rid][:len(got)], f"step {step} request {rid}"
    assert next_id > 20 and sum(len(e) for e in emitted.values()) > 1000
    assert not sampled or sum(checked) > 500
    # Drafts were rejected at times, and accepted runs longer than one token happened too.
    assert any(len(e) > 0 for e in emitted.values())
    # Pass sizes are logged, with the full-batch figure the max/min ratio is about.
    lines = [r.getMessage() for r in caplog.records if "tokens per pass" in r.getMessage()]
    assert len(lines) >= 3 and all("of the full batch" in line for line in lines)
    assert any("steady passes of the full batch" in line for line in lines)
