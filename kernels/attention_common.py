"""Pieces shared by the attention kernels (sparse decode and verify).

Both are flash-decoding style: with several KV splits, each split writes an fp32 partial output
and its log-sum-exp, and a second kernel merges the splits of every row (``merge_splits``).
How many splits a launch gets is a host-side, shape-only choice from the GPU's SM count, so the
launch grid is fixed and a call can be captured in a CUDA graph: either every request gets the
same count (``pick_num_kv_splits``), or the grid is an upper bound and each request's count
follows its share of the batch's KV tokens, computed on the device (``pick_kv_split_grid`` and
``kv_split_range``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh for the logit cap (``cap * tanh(s / cap)``); triton.language has no portable one."""
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def merge_splits(part_out, part_lse, stride_split, num_splits, offs_dv, mask_dv,
                 BLOCK_DV: tl.constexpr):
    """Merges one row's split partials: ``part_out + s * stride_split`` holds split s's
    normalised output (fp32, ``offs_dv`` wide) and ``part_lse + s`` its lse; a split whose lse is
    -inf saw nothing and is skipped. Returns (output fp32 [BLOCK_DV], the row's lse)."""
    e_max = -float("inf")
    e_sum = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(part_lse + s)
        if lse_s > float("-inf"):
            part = tl.load(part_out + s * stride_split + offs_dv, mask=mask_dv, other=0.0)
            n_e_max = tl.maximum(e_max, lse_s)
            old_scale = tl.exp(e_max - n_e_max)
            w = tl.exp(lse_s - n_e_max)
            acc = acc * old_scale + w * part
            e_sum = e_sum * old_scale + w
            e_max = n_e_max
    return acc / tl.where(e_sum > 0, e_sum, 1.0), e_max + tl.log(e_sum)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA, where kernels run interpreted)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Programs of the split kernels that run on one SM at once (their registers and shared memory
# at the launch shapes used).
PROGRAMS_PER_SM = 2
MAX_KV_SPLITS = 16  # the most KV splits any launch gets


# Length-proportional splits: a launch aims at this many rounds of programs, so that chunks are
# small next to a round and a long request's programs end with the rest (list scheduling: the
# launch takes at most the work / slots plus one chunk) ...
SPLIT_ROUNDS = 4
# ... and its grid leaves room for a request this many times the batch's mean context.
SPLIT_SKEW = 4
# Fewest KV tokens a program walks (its query load and partials amortise over them).
MIN_CHUNK = tl.constexpr(256)


@triton.jit
def batch_sum(A, B, batch, BLOCK_B: tl.constexpr):
    """sum(A[:batch] + B[:batch]) (int32 vectors): the batch's KV tokens, read by every program."""
    offs = tl.arange(0, BLOCK_B)
    mask = offs < batch
    return tl.sum(tl.load(A + offs, mask=mask, other=0) + tl.load(B + offs, mask=mask, other=0), 0)


@triton.jit
def kv_split_range(work, batch_work, split, num_kv_splits, target_programs, num_kv_heads,
                   BLOCK_N: tl.constexpr, BY_LENGTH: tl.constexpr):
    """[start, end) of KV split ``split`` of a row that walks ``work`` tokens.

    Without BY_LENGTH every row is cut into ``num_kv_splits`` equal chunks (``batch_work`` and
    ``target_programs`` unused). With it chunks are about ``batch_work * num_kv_heads /
    target_programs`` tokens (at least MIN_CHUNK) in every row of the batch, so a row gets splits
    in proportion to its length, at most ``num_kv_splits`` (the grid); the programs past a row's
    count get an empty range. Chunks are whole BLOCK_N blocks."""
    if BY_LENGTH:
        target = tl.maximum(tl.cdiv(batch_work * num_kv_heads, target_programs), MIN_CHUNK)
        splits = tl.minimum(tl.maximum(tl.cdiv(work, target), 1), num_kv_splits)
    else:
        splits = num_kv_splits
    chunk = tl.cdiv(tl.cdiv(work, splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, work)


def pick_kv_split_grid(batch_size: int, num_kv_heads: int, num_sms: int) -> tuple[int, int]:
    """(grid splits, target programs) of a length-proportional launch (``kv_split_range``).

    A batch's contexts differ (the paper's workload: outputs of 1K-32K tokens), and with equal
    split counts the longest request's programs set the launch's time. Here the chunk size is
    the same across the batch, about SPLIT_ROUNDS rounds of programs in all, and the grid has
    room for a request SPLIT_SKEW times the mean to get its share (at most MAX_KV_SPLITS)."""
    target = SPLIT_ROUNDS * PROGRAMS_PER_SM * num_sms
    rows = max(1, batch_size * num_kv_heads)
    return max(1, min(MAX_KV_SPLITS, -(-SPLIT_SKEW * target // rows))), target


def pick_split_launch(num_kv_splits: int | None, split_by_length: bool, batch_size: int, num_kv_heads: int,
                      device: torch.device) -> tuple[int, int]:
    """(grid splits, target programs) of a launch. ``split_by_length``: each request gets splits
    in proportion to its KV tokens (``pick_kv_split_grid`` bounds them). Otherwise every request
    gets ``num_kv_splits`` equal splits (None: ``pick_num_kv_splits``) and the target is 0."""
    if split_by_length:
        assert num_kv_splits is None, "split_by_length chooses the split counts itself"
        return pick_kv_split_grid(batch_size, num_kv_heads, sm_count(device))
    if num_kv_splits is None:
        num_kv_splits = pick_num_kv_splits(batch_size, num_kv_heads, sm_count(device))
    return num_kv_splits, 0


def pick_num_kv_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """A host-side split count (shape-only, no sync): the most splits whose programs, one per
    (request, KV head, split), all run at once, :data:`PROGRAMS_PER_SM` to an SM.

    Rounding down matters. One program too many starts a second round as long as the first: on
    an H100 (132 SMs, 8 KV heads) 8 verifying requests ran in 0.13 ms with 4 splits (256 programs)
    and 0.19 ms with 5 (320); 14 requests were fastest with 2 splits, 28 with 1
    (``scripts/bench_kernels.py --sweep-verify``; docs/kernels.md).
    """
    return max(1, min(MAX_KV_SPLITS, PROGRAMS_PER_SM * num_sms // max(1, batch_size * num_kv_heads)))
