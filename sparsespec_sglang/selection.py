"""PillarAttn's selection policy: how many KV tokens a draft step attends to, and which compete.

Defined here for every implementation (PillarState's first-step window, the PyTorch reference,
and the top-K kernel, which reads a :class:`SelectionPolicy`'s numbers), because three float
versions of ``ceil(s * len)`` disagreed at the edge: 0.07 * 100 is 7.000000000000001 in float64
(ceil 8) and 7.0 in fp32 (ceil 7). Here the sparsity is carried as an integer number of parts per
million, so K is integer arithmetic that the host, torch and Triton compute identically. The
Triton form of the K and R formulas sits in ``kernels/topk_select.py`` (the kernels import nothing
from this package); tests/test_selection.py checks the three forms against each other. This module
imports neither torch nor Triton, so validating the configuration loads neither:

    K = min(clamp(ceil(ppm * context_len / 10^6), min_selected, max_selected), #candidates)

* ``context_len``: tokens in the cache when the selection is made (after a verify: the
  committed prefix + the k + 1 verify tokens; after prefill: the prompt length L).
* candidates: positions ``[num_sink, cand_end)``; sinks are always attended separately, and
  positions from ``cand_end`` on are the drafts' dense tail. After a verify ``cand_end`` is the
  verify window's start; after prefill it is L.
* first step after prefill (no verify scores yet): the K most recent candidates
  ``[L - K, L)``, the positions the prefill's last queries attend to most in practice
  (:meth:`SelectionPolicy.first_window`).
* verify scores are pooled over verify queries and GQA query heads by ``sum`` or ``max``.
* which K (``--sparsespec-selection``): ``pillar`` takes the K best-scored candidates;
  ``hybrid:F`` takes the ``R = round(F * K)`` most recent candidates ``[cand_end - R, cand_end)``
  and the K - R best-scored of the older ones ``[num_sink, cand_end - R)``; ``window`` is
  ``hybrid:1`` (StreamingLLM's sinks + recent window). The recent part is contiguous with the
  drafts' dense tail, so an implementation starts the dense tail R positions earlier instead of
  listing those positions; F is carried in parts per million and rounded half up, like K.
* when (unified schedule): the top-K of a group of :data:`TOPK_LAYER_GROUP` layers runs as one
  launch at the group's last layer (:func:`layer_group`), the same selection as layer by layer.

One :class:`SelectionPolicy` is built per server (``PillarState.selection``, from the
configuration and the selection table's width); every implementation reads that one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # num_selected_tensor uses its argument's own methods: no torch import,
    import torch  # so config validation (and the plugin's entry module) never loads torch

PPM = 1_000_000  # sparsity resolution: parts per million
AGGREGATIONS = ("sum", "max")
TOPK_LAYER_GROUP = 6  # layers whose top-K a unified pass selects in one launch


def layer_group(layer: int, group_size: int, num_layers: int) -> range:
    """The layers whose verify scores one top-K launch selects from, ``layer`` among them: groups
    of ``group_size`` consecutive layers from layer 0 (the last one possibly shorter)."""
    first = layer - layer % group_size
    return range(first, min(first + group_size, num_layers))


def sparsity_ppm(sparsity: float) -> int:
    """``sparsity`` as the nearest whole number of parts per million, in [1, 10^6]."""
    ppm = round(float(sparsity) * PPM)
    if not 1 <= ppm <= PPM:
        raise ValueError(f"sparsity must be in [{1 / PPM}, 1] (got {sparsity!r})")
    return ppm


def recent_share_ppm(selection: str) -> int:
    """The share of K taken as the most recent candidates, in parts per million: ``pillar`` 0,
    ``window`` 10^6, ``hybrid:F`` round(F * 10^6) for F in [0, 1]. ValueError otherwise."""
    name, colon, arg = str(selection).strip().partition(":")
    if name == "pillar" and not colon:
        return 0
    if name == "window" and not colon:
        return PPM
    if name == "hybrid" and colon:
        try:
            share = float(arg)
        except ValueError:
            share = -1.0
        if 0.0 <= share <= 1.0:
            return round(share * PPM)
    raise ValueError(f"selection must be pillar, window or hybrid:F with F in [0, 1] (got {selection!r})")


def num_recent(k: int, recent_ppm: int) -> int:
    """How many of a request's K selected positions are the most recent candidates."""
    return (k * recent_ppm + PPM // 2) // PPM


@dataclass(frozen=True)
class SelectionPolicy:
    """The numbers that fix K, the candidate range and how much of K is the recent window
    (``min_selected <= max_selected``; ``recent_ppm`` 0 is PillarAttn)."""

    sparsity_ppm: int
    min_selected: int
    max_selected: int
    num_sink: int
    recent_ppm: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.sparsity_ppm <= PPM and 0 <= self.min_selected <= self.max_selected
                and self.num_sink >= 0 and 0 <= self.recent_ppm <= PPM):
            raise ValueError(f"invalid selection policy {self}")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def of(config: Any, table_width: int | None = None) -> "SelectionPolicy":
        """The policy of a SparseSpecConfig; ``table_width`` (selection slots per row) lowers
        the cap, and the floor with it, so K always fits the table."""
        cap = config.max_selected if table_width is None else min(config.max_selected, table_width)
        return SelectionPolicy(sparsity_ppm(config.sparsity), min(config.min_selected, cap), cap,
                               config.num_sink_tokens, recent_share_ppm(config.selection))

    def num_candidates(self, cand_end: int) -> int:
        return max(cand_end - self.num_sink, 0)

    def num_selected(self, context_len: int, cand_end: int | None = None) -> int:
        """K for one request (host integers); ``cand_end`` None: no candidate limit."""
        want = (context_len * self.sparsity_ppm + PPM - 1) // PPM
        k = min(max(want, self.min_selected), self.max_selected)
        return k if cand_end is None else min(k, self.num_candidates(cand_end))

    def num_selected_tensor(self, context_lens: torch.Tensor,
                            cand_end: torch.Tensor | None = None) -> torch.Tensor:
        """K per request, int32, computed on ``context_lens``'s device (no host sync)."""
        want = (context_lens.long() * self.sparsity_ppm + PPM - 1) // PPM
        k = want.clamp(min=self.min_selected, max=self.max_selected)
        if cand_end is not None:
            k = k.minimum((cand_end.long() - self.num_sink).clamp(min=0))
        return k.int()

    def num_recent(self, k: int) -> int:
        """Of K selected positions, how many are the most recent candidates."""
        return num_recent(k, self.recent_ppm)

    def window_positions(self, prompt_len: int) -> range:
        """First step after prefill: the K most recent candidates of a prompt of ``prompt_len``."""
        k = self.num_selected(prompt_len, cand_end=prompt_len)
        return range(prompt_len - k, prompt_len)

    def first_window(self, prompt_lens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`window_positions` of every prompt, on ``prompt_lens``'s device: positions
        ``[B, width]`` (0 past a row's K) and each row's K ``[B]`` int32."""
        lens = prompt_lens.int()
        k = self.num_selected_tensor(lens, cand_end=lens)
        j = lens.new_ones((1, width)).cumsum(1) - 1  # 0 .. width - 1, without importing torch
        pos = (lens - k).unsqueeze(1) + j
        return pos.where(j < k.unsqueeze(1), 0), k
