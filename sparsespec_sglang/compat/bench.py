"""SGLang internals the scripts use: bench_serving, its datasets, kernels for the kernel benchmark.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature (see the package docstring).
"""

from __future__ import annotations

LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "DatasetRow": (("0.5.17", "sglang.benchmark.datasets:DatasetRow"),),
    "bench_serving": (("0.5.17", "sglang.benchmark.serving:"),),
    "set_ulimit": (("0.5.17", "sglang.benchmark.utils:set_ulimit"),),
    "wait_for_http_ready": (("0.5.17", "sglang.utils:wait_for_http_ready"),),
    "decode_attention_fwd": (("0.5.17", "sglang.kernels.ops.attention.decode_attention:decode_attention_fwd"),),
    "get_num_kv_splits_triton": (("0.5.17", "sglang.kernels.ops.attention.metadata:get_num_kv_splits_triton"),),
    "extend_attention_fwd": (("0.5.17", "sglang.kernels.ops.attention.extend_attention:extend_attention_fwd"),),
}

ADAPTERS: tuple[str, ...] = ()
