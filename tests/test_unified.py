"""UnifiedSchedule on the CPU: k + 1 mixed passes per step emit exactly the target's tokens.

The toy model of toy_model.py stands in for SGLang's model runner: the next token is a fixed function
of (token, position), and a draft row (a row before the pass's verify rows) gets that token or,
at some positions, a wrong one, so drafts are rejected at ragged points. Requests join with
ragged prompts, finish at ragged lengths and leave between steps; every request's emitted
tokens must equal the target's own greedy sequence, and every step must verify every request
once. Only the forward and SGLang's greedy acceptance kernel (CUDA-only) are replaced; the
runner's planning, row layout, draft bookkeeping across steps and acceptance tail are real.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.forward_plan import PlanKind
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.schedule import ScheduleContext
from sparsespec_sglang.unified import PassLayout, UnifiedSchedule
from toy_model import VOCAB, ToyBackend, ToyModelRunner, greedy_chain_accept, patch_sglang, target_next, toy_req


def test_layout_rows_and_chains():
    from sparsespec_sglang.phases import PassRoles

    layout = PassLayout.of(PassRoles(verify={7: 2, 9: 3}, draft={5: 0, 6: 3}),
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
    state = PillarState(config, 2, 4, 2, req_to_token,
                        group_scores=UnifiedSchedule.group_scores(k, num_rows))
    backend = ToyBackend()
    model = ToyModelRunner(backend)
    model.state = state
    checked = []
    patch_sglang(monkeypatch)

    def accept(verify_input, batch, logits_output, grammar_mask, sampling_backend):
        info = batch.sampling_info
        assert grammar_mask is None and sampling_backend == "flashinfer"
        if sampled:
            nv = verify_input.draft_token.shape[0] // verify_input.draft_token_num
            rows = runner.rows  # the inputs of the pass just run
            assert torch.equal(info.temperatures.view(-1), rows.verify_rows[:nv].float())
            assert torch.equal(info.top_ks, rows.verify_rows[:nv] * 2)
            assert info.scalar.dim() == 0
            checked.append(nv)
        return greedy_chain_accept(verify_input, batch, logits_output)

    monkeypatch.setattr("sparsespec_sglang.acceptance.sample_like_plain", accept)
    ctx = ScheduleContext(k=k, state=state, backend=backend, model_runner=model, target_worker=None,
                          sampling_backend="flashinfer", delayed_verification=True)
    runner = UnifiedSchedule(ctx)

    free, live, expected, emitted, next_id = list(range(1, num_rows)), {}, {}, {}, 0
    all_lens: list[int] = []
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
            live[next_id] = toy_req(row, seq_len=prompt_len,
                                            max_new=rng.randint(10, 120))
            state.init_window(torch.tensor([row]), torch.tensor([prompt_len]))
            state.set_pending(torch.tensor([row]), torch.tensor([first]))
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
        model.forwards.clear()
        result = runner.step(batch, [r.req_pool_idx for r in reqs])
        tokens, lens, new_seq_lens = result.accept_tokens, result.accept_lens, result.new_seq_lens
        assert [kind for kind, _ in model.forwards] == [PlanKind.UNIFIED_PASS] * (k + 1)
        all_lens += lens.tolist()
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
    # Drafts were rejected at times (a 1-token step), and the longest chains were accepted too:
    # k + 1 tokens, or 4 drafts + the bonus where every 5th position's draft is wrong.
    assert min(all_lens) == 1 and max(all_lens) == min(k + 1, 5)
    # Every draft row attends through its request's PillarAttn selection (its K selected slots,
    # then the dense tail from its last verify); verify rows read densely, selecting nothing.
    rows = [r for pass_rows in model.pass_rows for r in pass_rows]
    drafts = [r for r in rows if r[1]]
    assert len(drafts) > 1000 and all(r[5] > 0 for r in drafts)
    assert all(r[2:4] == r[4:6] for r in drafts)
    assert all(r[3] == 0 for r in rows if not r[1])
    assert 1.5 < sum(all_lens) / len(all_lens) < k
    # Pass sizes are logged, with the full batch's max/min ratio: how flat the passes stay.
    lines = [r.getMessage() for r in caplog.records if "tokens per pass" in r.getMessage()]
    assert len(lines) >= 3 and all("of the full batch" in line for line in lines)
    assert any("steady passes of the full batch" in line for line in lines)
