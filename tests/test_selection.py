"""One selection policy: every implementation of K agrees with sparsespec_sglang.selection.

K = min(clamp(ceil(s * len), min_selected, max_selected), #candidates) is computed by the host
(the policy itself and the reference oracle), by torch on the device (PillarState's first-cycle
window) and inside the top-K Triton kernel (its own jit copy of the integer formulas: the kernels
import nothing from the package). Before the policy was shared they disagreed at
non-power-of-two sparsities (0.07 * 100: 8 in float64, 7 in fp32); here all of them are compared
over a grid of sparsities and lengths, against exact rational arithmetic.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparsespec_sglang.config import SparseSpecArgsError, SparseSpecConfig  # noqa: E402
from sparsespec_sglang.kernels.topk_select import num_recent_device, num_selected_device, select_topk  # noqa: E402
from sparsespec_sglang.pillar import PillarState  # noqa: E402
from sparsespec_sglang.selection import (  # noqa: E402
    PPM, SelectionPolicy, num_recent, recent_share_ppm, sparsity_ppm,
)
from sparsespec_sglang.testing import reference as R  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPARSITIES = [0.07, 0.03, 0.05, 0.1, 0.13, 1 / 3, 0.25, 0.001, 0.999999, 1.0]
LENGTHS = [0, 1, 2, 3, 7, 33, 99, 100, 101, 299, 300, 301, 1000, 4096, 12345, 131071, 10**6 + 1, 2**31 - 1]


def _exact(s: float, length: int) -> int:
    """ceil(s * length) in rational arithmetic, s read as its decimal (0.07 is 7/100)."""
    return math.ceil(Fraction(sparsity_ppm(s), PPM) * length)


@triton.jit
def _probe_kernel(Lens, Cand, Out, sparsity_ppm, min_sel, max_sel, num_sink, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    n = tl.load(Lens + offs)
    c = tl.load(Cand + offs)
    tl.store(Out + offs, num_selected_device(n, c, sparsity_ppm, min_sel, max_sel, num_sink))


@triton.jit
def _recent_probe(Out, k, ppm):
    tl.store(Out, num_recent_device(tl.full([], k, tl.int32), ppm))


def _device_k(policy: SelectionPolicy, lens: list[int], cand: list[int]) -> list[int]:
    """K of each (length, candidate end) as the top-K kernel computes it (same jit function)."""
    block = triton.next_power_of_2(len(lens))
    pad = block - len(lens)
    lens_t = torch.tensor(lens + [0] * pad, dtype=torch.int32, device=DEVICE)
    cand_t = torch.tensor(cand + [0] * pad, dtype=torch.int32, device=DEVICE)
    out = torch.full((block,), -1, dtype=torch.int32, device=DEVICE)
    _probe_kernel[(1,)](lens_t, cand_t, out, policy.sparsity_ppm, policy.min_selected, policy.max_selected,
                        policy.num_sink, BLOCK=block)
    return out[: len(lens)].tolist()


def test_decimal_sparsities_are_exact_parts_per_million():
    assert sparsity_ppm(0.07) == 70_000 and sparsity_ppm(0.13) == 130_000 and sparsity_ppm(1 / 3) == 333_333
    assert SelectionPolicy(sparsity_ppm(0.07), 0, 10**9, 0).num_selected(100) == 7
    for bad in (0.0, 4e-7, 1.0000006, -0.1):
        with pytest.raises(ValueError, match="sparsity must be in"):
            sparsity_ppm(bad)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s={s:.6g}")
def test_every_implementation_gives_the_same_k(sparsity):
    """Unclamped (floor 0, no cap, every position a candidate): policy, torch, the kernel's jit
    function, the reference oracle and PillarState all give the exact ceil."""
    big = 2**31 - 1
    policy = SelectionPolicy(sparsity_ppm(sparsity), 0, big, 0)
    want = [_exact(sparsity, n) for n in LENGTHS]
    assert [policy.num_selected(n) for n in LENGTHS] == want
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    assert policy.num_selected_tensor(lens).tolist() == want
    assert _device_k(policy, LENGTHS, [big] * len(LENGTHS)) == want
    cfg = SparseSpecConfig(sparsity=sparsity, min_selected=0, max_selected=big, num_sink_tokens=0)
    assert [R.num_selected(n, big, cfg) for n in LENGTHS] == want
    width = 1 << 17
    state = PillarState(cfg, num_layers=1, num_q_heads=1, num_kv_heads=1,
                        req_to_token=torch.zeros((1, width), dtype=torch.int32))
    # PillarState caps K at its table width (max_ctx): the cap is the only difference.
    assert state.num_selected(lens).tolist() == [min(k, width) for k in want]


@pytest.mark.parametrize("sparsity", [0.07, 0.13, 1 / 3])
def test_clamps_and_candidates_agree(sparsity):
    """Floor, cap and the candidate limit [num_sink, cand_end), host vs torch vs kernel vs reference."""
    policy = SelectionPolicy(sparsity_ppm(sparsity), 5, 40, 4)
    cases = [(n, c) for n in (0, 1, 50, 100, 101, 299, 300, 1000) for c in (0, 3, 4, 9, 30, 60, n)]
    lens, cand = [n for n, _ in cases], [c for _, c in cases]
    want = [min(max(_exact(sparsity, n), 5), 40, max(c - 4, 0)) for n, c in cases]
    assert [policy.num_selected(n, c) for n, c in cases] == want
    assert policy.num_selected_tensor(torch.tensor(lens), torch.tensor(cand)).tolist() == want
    assert _device_k(policy, lens, cand) == want
    cfg = SparseSpecConfig(sparsity=sparsity, min_selected=5, max_selected=40, num_sink_tokens=4)
    assert [R.num_selected(n, max(c - 4, 0), cfg) for n, c in cases] == want


@pytest.mark.parametrize("sparsity", [0.07, 0.03, 0.13, 1 / 3])
def test_the_topk_kernel_selects_k_entries(sparsity):
    """The real top-K launch writes K = the policy's K (out_lens) and exactly K slots per head."""
    lens = [100, 101, 233, 300, 299, 57]
    cand = [n - 9 for n in lens]
    policy = SelectionPolicy(sparsity_ppm(sparsity), 0, 128, 4)
    rows = len(lens) + 1
    req_to_token = (torch.arange(rows * 320, dtype=torch.int32).view(rows, 320) + 1).to(DEVICE)
    scores = torch.rand(len(lens), 2, 320, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = torch.full((rows, 2, 128), -5, dtype=torch.int32, device=DEVICE)  # by pool row (1..)
    out_lens = torch.full((rows,), -5, dtype=torch.int32, device=DEVICE)
    select_topk(scores, policy, req_to_token=req_to_token,
                req_pool_indices=torch.arange(1, rows, dtype=torch.int32, device=DEVICE),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                cand_end=torch.tensor(cand, dtype=torch.int32, device=DEVICE), out_indices=out, out_lens=out_lens)
    want = [policy.num_selected(n, c) for n, c in zip(lens, cand)]
    assert out_lens.tolist() == [-5] + want
    if sparsity == 0.07:
        assert want[0] == 7  # the case float64 rounded to 8
    for b, k in enumerate(want):
        assert torch.all(out[b + 1, :, :k] > 0) and torch.all(out[b + 1, :, k:] == -5)


@pytest.mark.parametrize("prompt_len", [3, 5, 20, 40, 100])
def test_first_cycle_window_is_the_policy_window(prompt_len):
    """PillarState.init_window selects exactly policy.window_positions(L), sinks excluded."""
    cfg = SparseSpecConfig(sparsity=0.13, min_selected=2, max_selected=8, num_sink_tokens=2)
    req_to_token = torch.arange(3 * 128, dtype=torch.int32).view(3, 128).flip(1).contiguous()
    state = PillarState(cfg, num_layers=2, num_q_heads=2, num_kv_heads=1, req_to_token=req_to_token)
    state.init_window(torch.tensor([1]), torch.tensor([prompt_len]))
    positions = SelectionPolicy.of(cfg, state.max_sel).window_positions(prompt_len)
    assert positions.start >= cfg.num_sink_tokens and positions.stop == prompt_len
    k = int(state.sel_lens[1])
    assert k == len(positions)
    assert state.sel_indices[:, 1, :, :k].tolist() == [[req_to_token[1, list(positions)].tolist()]] * 2


def test_config_refuses_a_sparsity_below_one_part_per_million():
    with pytest.raises(SparseSpecArgsError, match=r"--sparsespec-sparsity must be a number in \[1e-06, 1\]"):
        SparseSpecConfig(sparsity=4e-7)
    assert SparseSpecConfig(sparsity=1e-6).sparsity == 1e-6


def test_policy_of_a_config_fits_the_table():
    cfg = SparseSpecConfig(sparsity=0.05, min_selected=64, max_selected=2048, num_sink_tokens=4)
    assert SelectionPolicy.of(cfg) == SelectionPolicy(50_000, 64, 2048, 4)
    assert SelectionPolicy.of(cfg, 48) == SelectionPolicy(50_000, 48, 48, 4)  # floor lowered with the cap
    with pytest.raises(ValueError):
        SelectionPolicy(50_000, 65, 64, 4)


@pytest.mark.parametrize("text,ppm", [("pillar", 0), ("window", PPM), ("hybrid:0.75", 750_000),
                                      ("hybrid:0", 0), ("hybrid:1", PPM), (" hybrid:0.5 ", 500_000)])
def test_selection_forms(text, ppm):
    assert recent_share_ppm(text) == ppm
    assert SelectionPolicy.of(SparseSpecConfig(selection=text.strip())).recent_ppm == ppm


@pytest.mark.parametrize("bad", ["hybrid", "hybrid:x", "hybrid:1.5", "hybrid:-0.1", "window:0.5", "top", ""])
def test_config_refuses_a_bad_selection_in_one_line(bad):
    with pytest.raises(SparseSpecArgsError) as e:
        SparseSpecConfig(selection=bad)
    msg = str(e.value)
    assert "--sparsespec-selection" in msg and "pillar, window or hybrid:F" in msg and "\n" not in msg


@pytest.mark.parametrize("k", range(0, 40))
def test_recent_count_rounds_half_up_everywhere(k):
    """The host, Triton and the reference split K the same way (half up: 0.5 * 5 -> 3, where
    Python's round would give 2)."""
    for f in (0.25, 0.5, 0.75, 1.0):
        ppm = round(f * PPM)
        want = math.floor(Fraction(k) * Fraction(ppm, PPM) + Fraction(1, 2))
        out = torch.zeros(1, dtype=torch.int32)
        _recent_probe[(1,)](out, k, ppm)
        n = k + 10  # candidates [0, n), scores falling with position: the best are the oldest
        scores = torch.arange(n, 0, -1, dtype=torch.float32).expand(1, 1, n)
        picked = R.DraftSelection.parse(f"hybrid:{f}").select(scores, 0, n, k)[0, 0].tolist()
        assert num_recent(k, ppm) == int(out[0]) == want
        assert picked == list(range(k - want)) + list(range(n - want, n))


def test_layer_groups_cover_every_layer_once_in_order():
    """The grouped top-K's layer groups (one launch each): consecutive, from layer 0, the last
    one shorter; every layer of a group names the same group."""
    from sparsespec_sglang.selection import TOPK_LAYER_GROUP, layer_group

    for size, layers in ((TOPK_LAYER_GROUP, 28), (2, 3), (4, 4), (1, 5), (6, 3)):
        groups = [layer_group(lid, size, layers) for lid in range(layers)]
        assert all(lid in g for lid, g in enumerate(groups))
        distinct = list(dict.fromkeys(groups))
        assert [lid for g in distinct for lid in g] == list(range(layers))
        assert all(len(g) == min(size, layers) for g in distinct[:-1]) and 1 <= len(distinct[-1]) <= size
