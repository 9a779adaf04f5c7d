"""PillarAttn Triton kernels, each next to its PyTorch reference."""

from .attention_common import pick_num_kv_splits, sm_count
from .sparse_decode import sparse_decode_attention, sparse_decode_attention_ref
from .topk_select import select_topk, select_topk_ref
from .verify_attention import verify_attention, verify_attention_with_scores, verify_attention_with_scores_ref

__all__ = [
    "pick_num_kv_splits",
    "select_topk",
    "select_topk_ref",
    "sm_count",
    "sparse_decode_attention",
    "sparse_decode_attention_ref",
    "verify_attention",
    "verify_attention_with_scores",
    "verify_attention_with_scores_ref",
]
