"""SparseSpec: sparse self-speculative decoding for SGLang (PillarAttn)."""

__version__ = "0.1.0"
