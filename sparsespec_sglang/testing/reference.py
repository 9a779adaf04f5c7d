"""PyTorch reference implementation of SparseSpec (PillarAttn sparse self-speculation).

This module is the oracle for the Triton kernels and the SGLang worker, and the tool that
measures acceptance on real weights. It favours clarity over speed: one request at a time
(batch size 1), a Hugging Face causal LM (Qwen3 / Qwen2 / Llama style) whose attention is
routed through one custom function registered with transformers' `AttentionInterface`,
and a `DynamicCache` that is cropped to drop KV.

Request state and one cycle
---------------------------
* Committed tokens; the last committed token is *pending* at position P (no KV yet).
  The cache holds full-attention KV for positions [0, P).
* Prefill: full forward over the prompt (length L); the first token (argmax, or sampled)
  becomes pending at P = L.
* Draft (k steps): step j feeds the current token (the pending token, then the previous
  draft) at position P + j - 1 with SPARSE attention in every layer. For layer l and KV
  head h the query attends to
      (a) sink positions      [0, min(num_sink, dense_start))
      (b) selected positions  sel[l][h]                (top-K, all < dense_start)
      (c) the dense window    [dense_start, current position]
  The step's KV is written to the cache. Output d_j = argmax (or a sample of q_j).
* Verify: crop the cache back to P (drop the sparse-computed draft KV) and feed
  [pending, d_1..d_k] at positions [P, P+k] with FULL causal attention -> p_0..p_k.
  Greedy: m = longest prefix with d_j == argmax p_{j-1}; bonus = argmax p_m.
  Sampling: standard speculative sampling (`speculative_accept`).
  Commit d_1..d_m, bonus (new pending at P+m+1), crop the cache to [0, P+m].
* Following a given trajectory (`follow_tokens`, greedy only; to measure acceptance along another
  implementation's output, e.g. SGLang's bf16 tokens): the first token and every verify commit
  the trajectory's tokens instead of the target's argmax, i.e. m = longest prefix with
  d_j == t_{j} (the trajectory's next tokens), bonus = the trajectory token after them. Drafting,
  verify scores, selection, cache and cycle boundaries then follow that trajectory exactly as an
  implementation that produced it would have. The request stops at the trajectory's end (the
  last cycle's m counts only drafts the trajectory covers).
  EOS / max_new_tokens stop the request mid-cycle; nothing past them is emitted.
* Selection (PillarAttn): the verify forward also yields, per layer and KV head,
  scores[p] = AGG over (verify query rows, query heads of the GQA group) of the softmax
  probability exp(s - row_lse) of key p; AGG is "sum" (default) or "max". For the next
  cycle dense_start = P (the verify window start), candidates = [num_sink, P),
  K = min(clamp(ceil(sparsity * context_len), min_selected, max_selected), #candidates)
  with context_len = P + k + 1 (tokens in cache during the verify pass: the GPU path picks
  the selection inside the verify forward, before acceptance is known), selection = top-K
  candidates by score, ties toward the lower position, returned sorted ascending.
* Score normaliser (`score_norm`): "exact" uses each verify row's own lse as above; "draft"
  uses, for verify row i, the lse that draft step min(i, k-1) computed over its sparse set
  (the same query token; the bonus row reuses the last draft's), i.e.
  scores[p] = AGG exp(s - draft_lse), the exponent capped at 60 as in the Triton kernel.
* Draft selection (`DraftSelection`, for acceptance studies): "pillar" is the above; the
  baselines "window", "random", "inverted" and "hybrid" pick other positions at the same K;
  "auto" is a hybrid whose recent share each request picks from its own verifies (`AutoSplit`;
  reference only, not in the SGLang server path).
* First cycle after prefill ("window" choice): dense_start = L, selection = the K most
  recent candidates [max(num_sink, L - K), L) with K computed for context_len = L.

`ceil(sparsity * context_len)` is integer arithmetic on the sparsity in parts per million
(`num_selected`, from `sparsespec_sglang.selection`, shared with the kernel), so 0.07 * 100 gives 7.

Speed: the GQA group is folded into the query rows (no K/V copies per query head); a prompt's
prefill can be computed once (`prefill`) and reused; and greedy drafts, given a guess of the
output (`target_tokens`, else `follow_tokens`), come from teacher-forced sparse forwards over several draft positions
at once (`_greedy_drafts`): same drafts, KV and scores as step-by-step drafting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.selection import PPM, num_recent

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SparseSpecConfig",
    "resolve_config",
    "register_attention",
    "prepare_model",
    "load_model",
    "num_selected",
    "aggregate_scores",
    "select_topk",
    "window_selection",
    "DraftSelection",
    "AutoSplit",
    "captured_mass",
    "draft_key_mask",
    "pillar_attention",
    "sampling_probs",
    "greedy_accept",
    "acceptance_probabilities",
    "residual_distribution",
    "speculative_accept",
    "CycleStats",
    "GenerationOutput",
    "eos_token_ids",
    "SpecOutput",
    "Prefill",
    "prefill",
    "plain_generate",
    "sparsespec_generate",
]

ATTN_IMPLEMENTATION = "sparsespec_reference"


# ----------------------------------------------------------------------------- config


_ALIASES = {
    "k": "num_draft_steps",
    "min_sel": "min_selected",
    "max_sel": "max_selected",
    "num_sink": "num_sink_tokens",
}


def resolve_config(config: Any = None, **overrides) -> SparseSpecConfig:
    """Build a `SparseSpecConfig` from a duck-typed object and/or keywords.

    `config` may be None, a SparseSpecConfig, or any object with some of the attributes
    num_draft_steps, sparsity, min_selected, max_selected, num_sink_tokens, aggregation
    (e.g. `SparseSpecConfig`). Keywords override it; the short aliases k, min_sel,
    max_sel, num_sink are accepted. Unknown keywords raise TypeError.
    """
    names = [f.name for f in fields(SparseSpecConfig)]
    values: dict[str, Any] = {}
    if config is not None:
        for n in names:
            if hasattr(config, n):
                values[n] = getattr(config, n)
    for key, val in overrides.items():
        name = _ALIASES.get(key, key)
        if name not in names:
            raise TypeError(f"unknown SparseSpec option {key!r}")
        if val is not None:
            values[name] = val
    return SparseSpecConfig(**values)


# ----------------------------------------------------------------------------- selection


def num_selected(context_len: int, num_candidates: int, cfg: SparseSpecConfig) -> int:
    """K = min(clamp(ceil(sparsity * context_len), min_selected, max_selected), #candidates),
    as ``sparsespec_sglang.selection`` defines it for every implementation."""
    from sparsespec_sglang.selection import SelectionPolicy

    return min(SelectionPolicy.of(cfg).num_selected(context_len), max(num_candidates, 0))


def aggregate_scores(probs: torch.Tensor, num_kv_heads: int, aggregation: str = "sum") -> torch.Tensor:
    """Per-KV-head scores from verify attention probabilities.

    probs: [num_q_heads, q_len, kv_len] softmax rows (float32). Query head h belongs to KV
    head h // (num_q_heads // num_kv_heads) (the `repeat_kv` grouping). Returns
    [num_kv_heads, kv_len]: AGG over the group's heads and all query rows.
    """
    hq, q_len, kv_len = probs.shape
    g = probs.view(num_kv_heads, hq // num_kv_heads, q_len, kv_len)
    if aggregation == "sum":
        return g.sum(dim=(1, 2))
    if aggregation == "max":
        return g.amax(dim=(1, 2))
    raise ValueError(f"unknown aggregation {aggregation!r}")


def select_topk(scores: torch.Tensor, num_sink: int, candidate_end: int, k: int) -> torch.Tensor:
    """Top-k candidate positions in [num_sink, candidate_end) per (layer, kv head).

    scores: [..., T] with T >= candidate_end. Ties go to the lower position. Returns int64
    [..., k], each row sorted ascending.
    """
    lead = scores.shape[:-1]
    start = min(num_sink, candidate_end)
    cand = scores[..., start:candidate_end].float()
    k = min(k, cand.shape[-1])
    if k <= 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=scores.device)
    # Stable descending sort keeps equal scores in ascending position order.
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order + start, dim=-1).values


def window_selection(num_layers: int, num_kv_heads: int, prompt_len: int, num_sink: int, k: int,
                     device=None) -> torch.Tensor:
    """First-cycle selection ("window"): the k most recent candidates [max(num_sink, L-k), L)."""
    start = max(num_sink, prompt_len - k)
    pos = torch.arange(start, prompt_len, dtype=torch.long, device=device)
    return pos.expand(num_layers, num_kv_heads, pos.numel()).clone()


@dataclass(frozen=True)
class DraftSelection:
    """Which candidate positions a cycle's drafts attend to, at the same per-head budget K.

    pillar    top-K by the last verify's scores (PillarAttn, the default)
    window    the K most recent candidates (StreamingLLM / MagicDec: sinks + recent window)
    random    K uniform candidates per (layer, KV head), drawn from a generator seeded `seed`
    inverted  the K lowest-scored candidates (a deliberately broken selection, for tests)
    hybrid    the round(recent_fraction * K) most recent candidates + the top rest by score
    auto      hybrid with a recent fraction chosen per request and cycle from its own verify
              scores (`AutoSplit`, which `select` needs as `split`; reference only)
    Sinks and the tokens written since the last verify are attended under every policy, and
    the first cycle after prefill uses the window for all of them (no verify scores yet).
    Text form (`parse`): "pillar", "window", "random", "random:SEED", "inverted", "hybrid:F", "auto".
    """

    name: str = "pillar"
    recent_fraction: float = 0.5
    seed: int = 0

    NAMES = ("pillar", "window", "random", "inverted", "hybrid", "auto")

    def __post_init__(self) -> None:
        if self.name not in self.NAMES:
            raise ValueError(f"selection policy must be one of {', '.join(self.NAMES)} (got {self.name!r})")
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"hybrid recent fraction must be in [0, 1] (got {self.recent_fraction!r})")

    @classmethod
    def parse(cls, text: "str | DraftSelection") -> "DraftSelection":
        if isinstance(text, DraftSelection):
            return text
        name, colon, arg = str(text).strip().partition(":")
        usage = "use pillar, window, random[:SEED], inverted, hybrid[:F] with F in [0, 1], or auto"
        if name not in cls.NAMES or (colon and name not in ("hybrid", "random")):
            raise ValueError(f"bad selection policy {text!r}: {usage}")
        try:
            if name == "hybrid":
                return cls(name, recent_fraction=float(arg) if colon else 0.5)
            if name == "random":
                return cls(name, seed=int(arg) if colon else 0)
        except ValueError:
            raise ValueError(f"bad selection policy {text!r}: {usage}") from None
        return cls(name)

    @property
    def label(self) -> str:
        if self.name == "hybrid":
            return f"hybrid:{self.recent_fraction:g}"
        if self.name == "random" and self.seed:
            return f"random:{self.seed}"
        return self.name

    def select(self, scores: torch.Tensor, num_sink: int, candidate_end: int, k: int,
               generator: torch.Generator | None = None, split: "AutoSplit | None" = None) -> torch.Tensor:
        """[..., k] positions in [num_sink, candidate_end), each row sorted ascending.

        scores: verify scores [..., T] (T >= candidate_end); `generator` drives `random`;
        `split` is the request's `AutoSplit` (`auto` only): this call advances it by one verify.
        """
        start = min(num_sink, candidate_end)
        k = max(0, min(k, candidate_end - start))
        lead = scores.shape[:-1]
        if self.name == "auto":
            if split is None:
                raise ValueError("the auto selection needs the request's AutoSplit (split=)")
            fraction = split.update(scores, num_sink, candidate_end, k)
            return DraftSelection("hybrid", recent_fraction=fraction).select(scores, num_sink, candidate_end, k)
        if self.name == "pillar":
            return select_topk(scores, num_sink, candidate_end, k)
        if self.name == "inverted":
            return select_topk(-scores, num_sink, candidate_end, k)
        if self.name == "window":
            return _recent(lead, candidate_end - k, candidate_end, scores.device)
        if self.name == "random":
            noise = torch.rand(*lead, candidate_end - start, generator=generator).to(scores.device)
            return torch.sort(noise.topk(k, dim=-1).indices + start, dim=-1).values
        # hybrid: a recent window, then the best-scored of the older candidates (the recent
        # count rounds as the GPU path's does: sparsespec_sglang.selection.num_recent).
        w = num_recent(k, round(self.recent_fraction * PPM))
        recent = _recent(lead, candidate_end - w, candidate_end, scores.device)
        older = select_topk(scores, num_sink, candidate_end - w, k - w)
        return torch.sort(torch.cat([older, recent], dim=-1), dim=-1).values


def _recent(lead: torch.Size, start: int, end: int, device) -> torch.Tensor:
    pos = torch.arange(start, end, dtype=torch.long, device=device)
    return pos.expand(*lead, pos.numel()).clone()


def captured_mass(scores: torch.Tensor, selection: torch.Tensor, num_sink: int, candidate_end: int) -> float:
    """Share of `scores`' mass over the candidates [num_sink, candidate_end) that falls on
    `selection` ([..., K] positions in that range), summed over every (layer, KV head)."""
    start = min(num_sink, candidate_end)
    total = float(scores[..., start:candidate_end].sum())
    if total <= 0.0 or selection.shape[-1] == 0:
        return 0.0
    return float(scores.gather(-1, selection.to(scores.device)).sum()) / total


AUTO_FRACTIONS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class AutoSplit:
    """One request's state for the `auto` selection: which recent fraction F of the K selected
    positions (the rest: top by verify score, as `hybrid:F`) to use next.

    No fixed F wins on every model (SmolLM2-135M prefers F 0.75, Qwen2.5-Coder-0.5B F 0, i.e.
    PillarAttn), so each request measures it. At each verify t (scores S_t), for every F in
    `fractions` it takes the positions hybrid:F would have picked from the previous verify's
    scores S_{t-1} (same candidate end and K as then) and the share of S_t's mass over those
    candidates that falls on them (`captured_mass`): how much of what the target attended to
    next that selection would have covered. An exponential moving average per F (weight
    `weight` on the newest; the first measurement starts it) smooths cycle-to-cycle noise; the F
    with the largest average is used for the next selection, ties to the smaller F (the one
    closer to PillarAttn, the project's default). The first verify has nothing to look back on
    and uses `first`: 0.5, the middle of the grid, so the worst miss before evidence arrives is
    half the grid either way.
    """

    fractions: tuple[float, ...] = AUTO_FRACTIONS
    weight: float = 0.3
    first: float = 0.5
    ema: list[float] | None = None  # per entry of `fractions`; None until two verifies were seen
    fraction: float | None = None  # the F chosen at the last verify
    # The last verify's scores [..., T], candidate end and (clamped) K.
    previous: tuple[torch.Tensor, int, int] | None = None

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 <= f <= 1.0 for f in self.fractions) \
                or list(self.fractions) != sorted(set(self.fractions)):
            raise ValueError(f"auto fractions must be distinct, ascending, in [0, 1] (got {self.fractions!r})")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"auto EMA weight must be in (0, 1] (got {self.weight!r})")
        if not 0.0 <= self.first <= 1.0:
            raise ValueError(f"auto first fraction must be in [0, 1] (got {self.first!r})")

    def update(self, scores: torch.Tensor, num_sink: int, candidate_end: int, k: int) -> float:
        """Take verify scores [..., T] (selection over [num_sink, candidate_end), K = k) and
        return the F for the selection made from them."""
        scores = scores.detach().float()
        if self.previous is None:
            self.fraction = self.first
        else:
            prev, prev_end, prev_k = self.previous
            captured = [captured_mass(scores, DraftSelection("hybrid", recent_fraction=f).select(
                prev, num_sink, prev_end, prev_k), num_sink, prev_end) for f in self.fractions]
            if self.ema is None:
                self.ema = captured
            else:
                self.ema = [(1.0 - self.weight) * e + self.weight * c for e, c in zip(self.ema, captured)]
            best = 0
            for i, e in enumerate(self.ema):
                if e > self.ema[best]:  # strict: ties keep the smaller F
                    best = i
            self.fraction = self.fractions[best]
        self.previous = (scores, candidate_end, k)
        return self.fraction


def draft_key_mask(kv_len: int, num_sink: int, dense_start: int, selection: torch.Tensor) -> torch.Tensor:
    """Keys a draft query may attend to, per KV head (before the causal limit).

    selection: [num_kv_heads, K] positions. Returns bool [num_kv_heads, kv_len]:
    sink [0, min(num_sink, dense_start)) | selection | [dense_start, kv_len).
    """
    hkv = selection.shape[0]
    mask = torch.zeros(hkv, kv_len, dtype=torch.bool, device=selection.device)
    mask[:, : min(num_sink, dense_start, kv_len)] = True
    mask[:, dense_start:] = True
    if selection.numel():
        mask.scatter_(1, selection.to(mask.device), True)
    return mask


# ----------------------------------------------------------------------------- attention


@dataclass
class _AttnState:
    """Per-forward instructions for `pillar_attention` (passed as a model kwarg)."""

    mode: str = "full"  # "full" | "draft" | "verify"
    num_sink: int = 0
    dense_start: int = 0
    selection: torch.Tensor | None = None  # [num_layers, num_kv_heads, K] (draft)
    aggregation: str = "sum"
    scores: dict = field(default_factory=dict)  # layer -> [num_kv_heads, kv_len] (verify)
    # Draft steps append each layer's row lse [Hq] here (one entry per draft query row); a
    # verify given these normalises row i by entry min(i, len - 1) instead of its own lse
    # (score_norm "draft").
    row_lse: dict | None = None  # layer -> list of [Hq] tensors
    # Draft: per-layer additive bias [Hkv, 1, dense_start] (0 = attended, -inf = skipped) over
    # the keys before the dense window, built once per cycle from `selection`.
    bias: dict = field(default_factory=dict)

    def draft_bias(self, layer: int, device) -> torch.Tensor:
        if layer not in self.bias:
            sel = self.selection[layer]
            allowed = draft_key_mask(self.dense_start, self.num_sink, self.dense_start, sel.to(device))
            b = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
            self.bias[layer] = b.masked_fill_(~allowed, float("-inf"))[:, None, :]
        return self.bias[layer]


def pillar_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     sparsespec_state: _AttnState | None = None, **kwargs):
    """Attention function for transformers' AttentionInterface.

    query [1, Hq, q_len, D]; key/value [1, Hkv, kv_len, D] = the whole cache after this
    step's update; the queries are the last q_len positions. The (absent) transformers
    mask is ignored: the causal / sparse mask is built here from positions alone.
    Math mirrors transformers' eager attention (matmul in the input dtype, float32 softmax),
    with the GQA group folded into the query rows ([Hkv, group * q_len, D]) instead of
    repeating K/V per query head. A prefill from an empty cache (full mode, q_len == kv_len)
    goes through SDPA: nothing is read from its probabilities.
    """
    if query.shape[0] != 1:
        raise ValueError("the reference runs one request at a time (batch size 1)")
    st = sparsespec_state or _AttnState()
    hq, q_len, dim = query.shape[1], query.shape[2], query.shape[3]
    hkv, kv_len = key.shape[1], key.shape[2]
    group = hq // hkv
    if scaling is None:
        scaling = dim ** -0.5
    if st.mode == "full" and q_len == kv_len and q_len > 1:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    # Query head h belongs to KV head h // group (the repeat_kv grouping).
    q = query[0].reshape(hkv, group * q_len, dim)
    logits = (torch.matmul(q, key[0].transpose(-1, -2)) * scaling).view(hkv, group, q_len, kv_len)
    if st.mode == "draft":
        ds = st.dense_start
        logits[..., :ds] += st.draft_bias(module.layer_idx, logits.device)[:, None].to(logits.dtype)
    if q_len > 1:  # causal limit inside the last q_len keys (every earlier key is visible)
        tail = torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).triu(1)
        logits[..., kv_len - q_len:].masked_fill_(tail, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # = exp(s - row_lse)
    if st.mode == "draft" and st.row_lse is not None:
        lse = torch.logsumexp(logits.float(), dim=-1).reshape(hq, q_len)
        st.row_lse.setdefault(module.layer_idx, []).extend(lse.unbind(1))
    if st.mode == "verify":
        scored = probs.view(hq, q_len, kv_len)
        if st.row_lse is not None:
            drafts = torch.stack(st.row_lse[module.layer_idx], dim=1)  # [Hq, k]
            rows = torch.arange(q_len, device=query.device).clamp(max=drafts.shape[1] - 1)
            scored = torch.exp((logits.float().view(hq, q_len, kv_len) - drafts[:, rows, None]).clamp(max=60.0))
        st.scores[module.layer_idx] = aggregate_scores(scored, hkv, st.aggregation)
    out = torch.matmul(probs.to(query.dtype).view(hkv, group * q_len, kv_len), value[0])
    out = out.view(hq, q_len, dim)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), probs.view(1, hq, q_len, kv_len)


def register_attention() -> None:
    """Register `pillar_attention` under ATTN_IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, pillar_attention)


def prepare_model(model):
    """Route `model`'s attention through `pillar_attention` (in place) and set eval mode."""
    register_attention()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model.eval()


def load_model(model_dir, device: str = "cpu", dtype: str = "float32"):
    """AutoModelForCausalLM.from_pretrained(model_dir) with the reference attention."""
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=ATTN_IMPLEMENTATION
    )
    return prepare_model(model.to(device))


@torch.no_grad()
def _forward(model, cache, token_ids: Sequence[int], start_pos: int, state: _AttnState,
             last_only: bool = False) -> torch.Tensor:
    """Run tokens at positions [start_pos, start_pos + n); returns float32 logits [n, V]
    ([1, V] with last_only: a long prefill skips the LM head on every other row)."""
    if cache.get_seq_length() != start_pos:
        raise AssertionError(f"cache holds {cache.get_seq_length()} positions, expected {start_pos}")
    dev = model.device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=dev)
    pos = torch.arange(start_pos, start_pos + len(token_ids), device=dev)[None]
    out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                sparsespec_state=state, logits_to_keep=1 if last_only else 0)
    return out.logits[0].float()


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# ----------------------------------------------------------------------------- sampling


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution: softmax(logits / T), then top-k, then top-p, renormalised.

    Applied identically to target (p) and draft (q) logits. top_k <= 0 or >= V: off
    (tokens tied with the k-th largest logit are all kept).
    top_p keeps the smallest descending-probability prefix whose mass reaches top_p
    (SGLang's rule: drop tokens whose preceding cumulative mass already exceeds top_p).
    """
    if temperature <= 0:
        raise ValueError("sampling_probs needs temperature > 0 (temperature 0 means greedy)")
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample(dist: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(dist.float().cpu(), 1, generator=generator).item())


def greedy_accept(target_logits: torch.Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """target_logits [k+1, V] (p_0..p_k). Returns (m, bonus): m = longest prefix with
    d_j == argmax p_{j-1}; bonus = argmax p_m."""
    return _follow_accept(drafts, target_logits.argmax(dim=-1).tolist())


def acceptance_probabilities(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int]) -> torch.Tensor:
    """min(1, p_{j-1}(d_j) / q_j(d_j)) for j = 1..k. p: [k+1, V], q: [k, V]."""
    d = torch.as_tensor(list(drafts), dtype=torch.long, device=p.device)
    j = torch.arange(len(drafts), device=p.device)
    pd, qd = p[j, d].double(), q[j, d].double()
    ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-300), torch.ones_like(pd))
    return ratio.clamp(max=1.0)


def residual_distribution(p_row: torch.Tensor, q_row: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)); falls back to p if that is all zero (only when p == q)."""
    r = (p_row.double() - q_row.double()).clamp_min(0.0)
    s = r.sum()
    return (r / s).to(p_row.dtype) if s > 0 else p_row


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                       uniforms: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Speculative-sampling decision with explicit randomness (pure function).

    p: [k+1, V] target distributions, q: [k, V] draft distributions, drafts d_1..d_k,
    uniforms: k values in [0, 1). d_j is accepted iff u_j < min(1, p_{j-1}(d_j)/q_j(d_j)),
    stopping at the first rejection. Returns (m, dist): m accepted drafts and the
    distribution of the next token: normalize(max(p_{m} - q_{m+1}, 0)) after a rejection
    at draft m+1, or p_k if all k were accepted.
    """
    acc = acceptance_probabilities(p, q, drafts)
    for j in range(len(drafts)):
        if not float(uniforms[j]) < float(acc[j]):
            return j, residual_distribution(p[j], q[j])
    return len(drafts), p[len(drafts)]


# ----------------------------------------------------------------------------- generation


@dataclass
class CycleStats:
    position: int  # P: position of the pending token when the cycle started
    output_offset: int  # P - prompt_len: index of the pending token in the output
    num_drafts: int  # k
    accepted: int  # m (drafts accepted by verification)
    committed: int  # tokens appended to the output this cycle (m + 1 unless stopped)
    dense_start: int
    num_selected: int  # K
    drafts: list[int]
    bonus: int | None  # None only when a followed trajectory ended before it
    selection: torch.Tensor | None = None  # [layers, kv_heads, K] (trace=True)
    scores: torch.Tensor | None = None  # verify scores [layers, kv_heads, P+k+1] (trace=True)
    # `auto` only: the recent fraction this cycle's selection used (None: another policy, or
    # the first cycle, whose window comes before any verify scores).
    recent_fraction: float | None = None

    @property
    def tokens_per_cycle(self) -> int:
        return self.accepted + 1


@dataclass
class GenerationOutput:
    tokens: list[int]  # generated ids (includes the EOS token if it stopped on one)
    finish_reason: str  # "stop" (EOS) | "length"


@dataclass
class SpecOutput(GenerationOutput):
    prompt_len: int = 0
    cycles: list[CycleStats] = field(default_factory=list)
    config: SparseSpecConfig | None = None

    @property
    def accepted_counts(self) -> list[int]:
        return [c.accepted for c in self.cycles]

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_counts) / len(self.cycles) if self.cycles else 0.0


def eos_token_ids(model, eos_token_id=None) -> set[int]:
    """Stop ids: eos_token_id (int or list) or, if None, the model's generation_config / config eos."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(int(e) for e in eos_token_id)


def _pick(logits_row, temperature, top_k, top_p, generator) -> int:
    if temperature <= 0:
        return int(logits_row.argmax())
    return _sample(sampling_probs(logits_row, temperature, top_k, top_p), generator)


@dataclass
class Prefill:
    """A prompt's full-attention KV and last-row logits, reusable by many generations of the
    same prompt (an acceptance sweep runs every config on the same prompts)."""

    prompt: list[int]
    cache: Any
    last_logits: torch.Tensor  # [V] float32

    def fresh_cache(self):
        return copy.deepcopy(self.cache)


@torch.no_grad()
def prefill(model, prompt_ids: Sequence[int]) -> Prefill:
    """Full-attention prefill of the prompt (no LM head except on the last row)."""
    prepare_model(model)
    prompt = list(prompt_ids)
    cache = _new_cache(model)
    logits = _forward(model, cache, prompt, 0, _AttnState(), last_only=True)
    return Prefill(prompt, cache, logits[-1])


def _start(model, prompt: list[int], pre: Prefill | None):
    if pre is None:
        pre = prefill(model, prompt)
    elif pre.prompt != prompt:
        raise ValueError("the Prefill given is for another prompt")
    return pre.fresh_cache(), pre.last_logits


@torch.no_grad()
def plain_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_token_id=None,
                   temperature: float = 0.0, top_k: int = -1, top_p: float = 1.0,
                   generator: torch.Generator | None = None, ignore_eos: bool = False,
                   prefilled: Prefill | None = None) -> GenerationOutput:
    """Plain autoregressive decoding with the same attention function and cache type.

    eos_token_id: int, list, or None (model's generation_config / config eos). prefilled: this
    prompt's `prefill` (its cache is copied, not consumed).
    """
    prepare_model(model)
    eos = set() if ignore_eos else eos_token_ids(model, eos_token_id)
    prompt = list(prompt_ids)
    out: list[int] = []
    if max_new_tokens <= 0:
        return GenerationOutput(out, "length")
    cache, last = _start(model, prompt, prefilled)
    pos = len(prompt)
    while True:
        tok = _pick(last, temperature, top_k, top_p, generator)
        out.append(tok)
        if tok in eos:
            return GenerationOutput(out, "stop")
        if len(out) >= max_new_tokens:
            return GenerationOutput(out, "length")
        last = _forward(model, cache, [tok], pos, _AttnState())[-1]
        pos += 1


def _greedy_drafts(model, cache, pending: int, P: int, k: int, state: _AttnState,
                   guess: Sequence[int]) -> list[int]:
    """The k greedy drafts of a cycle, exactly as k sequential single-token draft steps give them.

    Each forward feeds the last known draft (first the pending token) plus guessed next drafts:
    row j sees the same inputs, sparse mask and KV as the sequential step would, as long as every
    guessed input before it equals the draft the sequential steps would have fed. Rows up to the
    first wrong guess are kept (their KV and draft lse too); the predictions of the rows after it
    become the next forward's guesses (Jacobi iteration). The first guesses are `guess`, normally
    the target's own greedy continuation. Every forward fixes at least one draft, so this never
    needs more forwards than drafting step by step, and it needs one when all guesses are right.
    """
    drafts: list[int] = []
    cur, guess = pending, list(guess)
    while len(drafts) < k:
        j = len(drafts)
        inputs = [cur] + guess[: k - 1 - j]
        preds = _forward(model, cache, inputs, P + j, state).argmax(dim=-1).tolist()
        n = 1  # rows 0..n-1 had the sequential inputs
        while n < len(preds) and preds[n - 1] == inputs[n]:
            n += 1
        drafts += preds[:n]
        cache.crop(P + j + n)
        if state.row_lse is not None:
            for rows in state.row_lse.values():
                del rows[j + n:]
        cur, guess = drafts[-1], preds[n:]
    return drafts


def _follow_accept(drafts: Sequence[int], trajectory: Sequence[int]) -> tuple[int, int | None]:
    """Greedy acceptance against a trajectory (its tokens after the pending one; for
    `greedy_accept` the target's k + 1 argmaxes): m = longest prefix of the drafts equal to it,
    bonus = its next token (None if it ends there)."""
    m = 0
    while m < len(drafts) and m < len(trajectory) and drafts[m] == trajectory[m]:
        m += 1
    return m, (trajectory[m] if m < len(trajectory) else None)


@torch.no_grad()
def sparsespec_generate(model, prompt_ids: Sequence[int], max_new_tokens: int, config: Any = None, *,
                        eos_token_id=None, temperature: float = 0.0, top_k: int = -1, top_p: float = 1.0,
                        generator: torch.Generator | None = None, ignore_eos: bool = False,
                        trace: bool = False, policy: "str | DraftSelection | None" = None,
                        target_tokens: Sequence[int] | None = None, prefilled: Prefill | None = None,
                        follow_tokens: Sequence[int] | None = None, **config_overrides) -> SpecOutput:
    """SparseSpec decoding of one request (see the module docstring for the algorithm).

    config: SparseSpecConfig or an object with its attribute names; config_overrides: num_draft_steps
    (k), sparsity, min_selected (min_sel), max_selected (max_sel), num_sink_tokens
    (num_sink), aggregation, score_norm. temperature 0 = greedy (lossless: identical ids to
    `plain_generate`); > 0 = speculative sampling with the same top_k / top_p filters on
    the target and draft distributions. trace=True keeps each cycle's selection and
    verify scores in its CycleStats. policy: the `DraftSelection` (or its text form); None: the
    config's ``selection`` (pillar, window or hybrid:F, as ``--sparsespec-selection``); "auto"
    keeps a fresh `AutoSplit` for this request and records each cycle's F in its CycleStats.
    target_tokens (greedy only): the expected output, e.g. `plain_generate`'s, used by
    `_greedy_drafts` to draft a cycle in as few forwards as its guesses allow (one if all are
    right). Any guess gives the same drafts, KV and scores; only the speed depends on it.
    prefilled: this prompt's `prefill`, reused instead of recomputed.
    follow_tokens (greedy only): commit this trajectory instead of the target's argmax (see
    the module docstring); acceptance is counted against it and the request stops at its end
    (or earlier at max_new_tokens / EOS). It is also the drafting guess when target_tokens is None.
    """
    cfg = resolve_config(config, **config_overrides)
    pol = DraftSelection.parse(cfg.selection if policy is None else policy)
    prepare_model(model)
    eos = set() if ignore_eos else eos_token_ids(model, eos_token_id)
    greedy = temperature <= 0
    follow = None if follow_tokens is None else [int(t) for t in follow_tokens]
    if follow is not None and not greedy:
        raise ValueError(f"follow_tokens needs greedy decoding (temperature 0), got temperature={temperature}")
    guide = target_tokens if target_tokens is not None else follow
    k, num_sink = cfg.num_draft_steps, cfg.num_sink_tokens
    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    dev = model.device
    policy_rng = torch.Generator().manual_seed(pol.seed)
    split = AutoSplit() if pol.name == "auto" else None  # per request: auto learns from its own verifies
    fraction: float | None = None

    prompt = list(prompt_ids)
    L = len(prompt)
    result = SpecOutput(tokens=[], finish_reason="length", prompt_len=L, config=cfg)
    budget = max_new_tokens if follow is None else min(max_new_tokens, len(follow))
    if budget <= 0:
        return result
    out = result.tokens

    def commit(tok: int) -> bool:
        """Append tok; True if the request is finished."""
        out.append(tok)
        if tok in eos:
            result.finish_reason = "stop"
            return True
        return len(out) >= budget

    # Prefill (full attention); the first token becomes pending at position L.
    cache, last = _start(model, prompt, prefilled)
    pending = follow[0] if follow is not None else _pick(last, temperature, top_k, top_p, generator)
    if commit(pending):
        return result
    P = L

    # First cycle: "window" selection over the prompt.
    n_sel = num_selected(L, max(0, L - num_sink), cfg)
    dense_start = L
    selection = window_selection(n_layers, n_kv, L, num_sink, n_sel, device=dev)

    while True:
        # ---- draft: k sparse steps, each writing (sparse-computed) KV at P + j.
        draft_state = _AttnState("draft", num_sink=num_sink, dense_start=dense_start, selection=selection,
                                 row_lse={} if cfg.score_norm == "draft" else None)
        q_rows = []
        if greedy:
            guess = guide[P - L + 1:] if guide is not None else []
            drafts = _greedy_drafts(model, cache, pending, P, k, draft_state, guess)
        else:
            drafts, cur = [], pending
            for j in range(k):
                q = sampling_probs(_forward(model, cache, [cur], P + j, draft_state)[-1], temperature, top_k, top_p)
                q_rows.append(q)
                cur = _sample(q, generator)
                drafts.append(cur)

        # ---- verify: drop draft KV, recompute [pending, d_1..d_k] with full attention.
        cache.crop(P)
        vstate = _AttnState("verify", aggregation=cfg.aggregation, row_lse=draft_state.row_lse)
        tlogits = _forward(model, cache, [pending] + drafts, P, vstate)  # p_0..p_k
        if follow is not None:
            m, bonus = _follow_accept(drafts, follow[P - L + 1:])
        elif greedy:
            m, bonus = greedy_accept(tlogits, drafts)
        else:
            p = sampling_probs(tlogits, temperature, top_k, top_p)
            u = torch.rand(k, generator=generator, dtype=torch.float64)
            m, nxt = speculative_accept(p, torch.stack(q_rows), drafts, u)
            bonus = _sample(nxt, generator)

        stats = CycleStats(position=P, output_offset=P - L, num_drafts=k, accepted=m, committed=0,
                           dense_start=dense_start, num_selected=int(selection.shape[-1]),
                           drafts=drafts, bonus=bonus, recent_fraction=fraction)
        if trace:
            stats.selection = selection.cpu()
            stats.scores = torch.stack([vstate.scores[i] for i in range(n_layers)]).cpu()
        result.cycles.append(stats)

        done = False
        for tok in drafts[:m] + [bonus]:
            stats.committed += 1
            if commit(tok):
                done = True
                break
        if done:
            return result

        # Keep positions [0, P + m]; the bonus is the new pending token at P + m + 1.
        cache.crop(P + m + 1)
        scores = torch.stack([vstate.scores[i] for i in range(n_layers)])  # [L, Hkv, P+k+1]
        n_sel = num_selected(scores.shape[-1], max(0, P - num_sink), cfg)
        selection = pol.select(scores, num_sink, P, n_sel, policy_rng, split=split)
        fraction = None if split is None else split.fraction
        dense_start = P
        P, pending = P + m + 1, bonus
