"""GPU check: grammar-constrained decoding under SPARSESPEC equals plain SGLang's, token for token, and
every output obeys its grammar.

Why: SGLang users report that constrained decoding (regex, JSON schema) interacts badly with
speculative decoding. SPARSESPEC's drafts ignore the grammar and its verify applies the grammar's
vocabulary mask to the target logits (a batch with a grammar takes the lockstep path), so the
accepted tokens must be exactly what plain decoding picks under the same mask.

Two ``sglang.Engine`` runs on the same prompts, one after the other: plain (Triton attention) and
``--speculative-algorithm SPARSESPEC``, both with ``--enable-deterministic-inference`` (SGLang's
batch-invariant kernels: plain and SPARSESPEC then decode bit-identically, so any difference is a
bug, not a rounding tie) and the radix cache off (SGLang turns it off for SPARSESPEC there). Each
engine runs two batches of ``--num-prompts`` greedy requests of at most ``--max-new-tokens``:

* ``constrained``: every request has a grammar, alternately a ``regex`` and a ``json_schema``;
* ``mixed``: every other request is unconstrained (``ignore_eos``), the others as above, so
  constrained and free rows share the batch.

The grammars are bounded (alternatives, counted repeats, enums, short strings) and JSON is generated
without free whitespace (``constrained_json_disable_any_whitespace``), so a model with random weights
reaches the end of each grammar within the token budget. Checked per request: SPARSESPEC's output
ids equal plain's (the first differing position otherwise), and both outputs' text fully matches the
regex (``re.fullmatch``) or parses as JSON valid against the schema (``jsonschema``). The JSON lists
every request's verdict; the last line printed is the summary. Exit status 1 on any mismatch or
grammar violation.

    python scripts/check_constrained.py --out constrained.json                   # random-weight "small" model
    python scripts/check_constrained.py --model-dir /path/to/model --out constrained_real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package

from cli import ArgumentError, OneLineParser, refuse  # noqa: E402

PROG = "check_constrained.py"
GRAMMAR_BACKENDS = ("xgrammar", "llguidance", "outlines")
# (prompt, regex): bounded patterns a random-weight model completes within a few tokens.
REGEXES: tuple[tuple[str, str], ...] = (
    ("Is the sky green? Answer yes, no or maybe.", r"(yes|no|maybe)"),
    ("Give a phone number.", r"[0-9]{3}-[0-9]{4}"),
    ("Name a pet with its colour.", r"(red|green|blue) (cat|dog)s?"),
    ("Give a date in ISO format.", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("Name a city.", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?"),
)
# (prompt, JSON schema): enums, bounded integers, patterned strings (no escapes), short arrays.
SCHEMAS: tuple[tuple[str, dict], ...] = (
    ("Is water wet? Answer as JSON.",
     {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}),
    ("Describe a person as JSON.",
     {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 99}},
      "required": ["name", "age"], "additionalProperties": False}),
    ("List up to three colours as JSON.",
     {"type": "object", "properties": {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                   "minItems": 1, "maxItems": 3},
                                       "done": {"type": "boolean"}},
      "required": ["colours", "done"], "additionalProperties": False}),
)
FREE_PROMPT = "Write a short story about a lighthouse."


# ---------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Request:
    """One request: ``kind`` is ``regex``, ``json`` or ``none``; ``grammar`` the regex or the schema's JSON."""

    prompt: str
    kind: str
    grammar: Optional[str] = None

    def sampling_params(self, max_new_tokens: int) -> dict:
        params: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
        if self.kind == "regex":
            params["regex"] = self.grammar
        elif self.kind == "json":
            params["json_schema"] = self.grammar
        else:  # a free row decodes its whole budget, so it stays in the batch next to the grammar rows
            params["ignore_eos"] = True
        return params


def _constrained(j: int) -> Request:
    """The j-th constrained request: regexes and schemas alternate, each list cycled."""
    if j % 2 == 0:
        prompt, regex = REGEXES[(j // 2) % len(REGEXES)]
        return Request(prompt, "regex", regex)
    prompt, schema = SCHEMAS[(j // 2) % len(SCHEMAS)]
    return Request(prompt, "json", json.dumps(schema))


def make_batches(num_prompts: int) -> dict[str, list[Request]]:
    """``constrained``: every request has a grammar; ``mixed``: every other one has none."""
    return {"constrained": [_constrained(i) for i in range(num_prompts)],
            "mixed": [Request(f"{FREE_PROMPT} ({i // 2})", "none") if i % 2 == 0 else _constrained(i // 2)
                      for i in range(num_prompts)]}


# ---------------------------------------------------------------- checks


def grammar_check(req: Request, text: str) -> Optional[str]:
    """None if ``text`` obeys the request's grammar, else why not."""
    if req.kind == "regex":
        return None if re.fullmatch(req.grammar, text) else f"does not match {req.grammar!r}"
    if req.kind == "json":
        import jsonschema

        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not JSON ({e.msg} at {e.pos})"
        try:
            jsonschema.validate(value, json.loads(req.grammar))
        except jsonschema.ValidationError as e:
            return f"violates the schema: {e.message}"
    return None


def check_request(req: Request, plain: Mapping[str, Any], spec: Mapping[str, Any]) -> dict:
    """One request's verdict: SPARSESPEC's ids equal plain's, and both texts obey the grammar."""
    a, b = list(plain["output_ids"]), list(spec["output_ids"])
    first = None if a == b else next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    plain_violation, spec_violation = grammar_check(req, plain["text"]), grammar_check(req, spec["text"])
    return {"kind": req.kind, "grammar": req.grammar, "equal": first is None, "first_mismatch": first,
            "len_plain": len(a), "len_spec": len(b), "plain_grammar_ok": plain_violation is None,
            "spec_grammar_ok": spec_violation is None, "plain_violation": plain_violation,
            "spec_violation": spec_violation, "plain_finish": plain.get("finish_reason"),
            "spec_finish": spec.get("finish_reason"), "spec_text": spec["text"],
            "ok": first is None and plain_violation is None and spec_violation is None}


def check_batches(batches: Mapping[str, Sequence[Request]], plain: Mapping[str, Sequence[Mapping]],
                  spec: Mapping[str, Sequence[Mapping]]) -> dict[str, list[dict]]:
    """Every request's verdict, per batch (an output missing on either side is an error, not a pass)."""
    out = {}
    for name, reqs in batches.items():
        if len(plain[name]) != len(reqs) or len(spec[name]) != len(reqs):
            raise ValueError(f"batch {name}: {len(reqs)} requests, {len(plain[name])} plain and "
                             f"{len(spec[name])} SPARSESPEC outputs")
        out[name] = [check_request(r, p, s) for r, p, s in zip(reqs, plain[name], spec[name])]
    return out


def summarize(verdicts: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[bool, str]:
    """(every request passed, the one-line summary)."""
    rows = [v for vs in verdicts.values() for v in vs]
    constrained = [v for v in rows if v["kind"] != "none"]
    equal = sum(v["equal"] for v in rows)
    obey = sum(v["plain_grammar_ok"] and v["spec_grammar_ok"] for v in constrained)
    ok = all(v["ok"] for v in rows) and bool(rows)
    line = (f"{'CONSTRAINED-EQUAL' if ok else 'CONSTRAINED-MISMATCH'}: {equal} of {len(rows)} SPARSESPEC outputs "
            f"equal plain's token for token; {obey} of {len(constrained)} constrained requests obey their grammar "
            f"in both runs ({', '.join(f'{n}: {len(vs)}' for n, vs in verdicts.items())})")
    return ok, line


# ---------------------------------------------------------------- engines


def generate(engine_kwargs: Mapping[str, Any], batches: Mapping[str, Sequence[Request]],
             max_new_tokens: int) -> dict[str, list[dict]]:
    """One ``sglang.Engine`` over every batch in turn; per request its ids, text and finish reason."""
    import sglang as sgl

    engine = sgl.Engine(**engine_kwargs)
    try:
        out = {}
        for name, reqs in batches.items():
            outs = engine.generate(prompt=[r.prompt for r in reqs],
                                   sampling_params=[r.sampling_params(max_new_tokens) for r in reqs])
            out[name] = [{"output_ids": o["output_ids"], "text": o["text"],
                          "finish_reason": (o["meta_info"].get("finish_reason") or {}).get("type"),
                          "spec_verify_ct": o["meta_info"].get("spec_verify_ct")} for o in outs]
        return out
    finally:
        engine.shutdown()


def engine_kwargs(model_dir: str, args: argparse.Namespace, speculative: bool) -> dict:
    """Plain (Triton) or SPARSESPEC (its defaults); the rest alike for both."""
    kwargs: dict[str, Any] = dict(
        model_path=model_dir, dtype=args.dtype, mem_fraction_static=args.mem_fraction, log_level="warning",
        enable_deterministic_inference=True, disable_radix_cache=True, disable_prefill_cuda_graph=True,
        max_running_requests=args.num_prompts, cuda_graph_max_bs_decode=args.num_prompts,
        # Bounded JSON: free whitespace would let a random-weight model pad until the budget runs out.
        constrained_json_disable_any_whitespace=True)
    if args.grammar_backend:
        kwargs["grammar_backend"] = args.grammar_backend
    if speculative:
        kwargs["speculative_algorithm"] = "SPARSESPEC"
    else:
        kwargs["attention_backend"] = "triton"
    return kwargs


# ---------------------------------------------------------------- arguments, main


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--model-dir", default=None, help="a model directory (default: random weights of --shape)")
    ap.add_argument("--shape", default="small",
                    help="sparsespec_sglang.testing.model_dirs shape of the random-weight model (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (default: %(default)s)")
    ap.add_argument("--num-prompts", type=int, default=16, help="requests per batch, even (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="token budget per request (default: %(default)s)")
    ap.add_argument("--grammar-backend", default=None,
                    help=f"SGLang's --grammar-backend, one of {', '.join(GRAMMAR_BACKENDS)} (default: SGLang's)")
    ap.add_argument("--mem-fraction", type=float, default=0.3, help="--mem-fraction-static (default: %(default)s)")
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        raise ArgumentError(f"--model-dir: no config.json in {args.model_dir} (a model directory)")
    if args.model_dir is None:
        from sparsespec_sglang.testing.model_dirs import SHAPES

        if args.shape not in SHAPES:
            raise ArgumentError(f"--shape: unknown {args.shape}; allowed: {', '.join(SHAPES)}")
    if args.dtype not in ("bfloat16", "float16", "float32"):
        raise ArgumentError(f"--dtype: unknown {args.dtype}; allowed: bfloat16, float16, float32")
    if args.num_prompts < 2 or args.num_prompts % 2:
        raise ArgumentError(f"--num-prompts: an even number >= 2, half of the mixed batch is unconstrained "
                            f"(got {args.num_prompts})")
    if args.max_new_tokens < 64:
        raise ArgumentError(f"--max-new-tokens: at least 64, the longest grammar output takes up to 55 bytes "
                            f"(got {args.max_new_tokens})")
    if args.grammar_backend is not None and args.grammar_backend not in GRAMMAR_BACKENDS:
        raise ArgumentError(f"--grammar-backend: unknown {args.grammar_backend}; "
                            f"allowed: {', '.join(GRAMMAR_BACKENDS)}")
    if not 0 < args.mem_fraction < 1:
        raise ArgumentError(f"--mem-fraction: a fraction in (0, 1) (got {args.mem_fraction})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ArgumentError as e:
        return refuse(PROG, e)
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)", file=sys.stderr)
        return 2
    import bench_saturated

    from sparsespec_sglang.testing import provenance

    model_dir = args.model_dir
    if model_dir is None:
        from sparsespec_sglang.testing.model_dirs import make_model_dir

        model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape, with_weights=True,
                                       dtype=args.dtype))
    batches = make_batches(args.num_prompts)
    kwargs = {name: engine_kwargs(model_dir, args, speculative=name == "sparsespec")
              for name in ("plain", "sparsespec")}
    outputs = {}
    for name, kw in kwargs.items():
        print(f"[{name}] {len(batches)} batches of {args.num_prompts} requests", flush=True)
        outputs[name] = generate(kw, batches, args.max_new_tokens)
    verdicts = check_batches(batches, outputs["plain"], outputs["sparsespec"])
    ok, line = summarize(verdicts)
    spec_verifies = [o.get("spec_verify_ct") or 0 for outs in outputs["sparsespec"].values() for o in outs]
    report = {"command": " ".join(["python", "scripts/" + PROG, *argv]), "commit": provenance.commit(),
              "gpu": torch.cuda.get_device_name(), "versions": bench_saturated.versions(),
              "model": {"dir": args.model_dir, "shape": None if args.model_dir else args.shape, "dtype": args.dtype},
              "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
              "engine_kwargs": kwargs, "sparsespec_verify_calls": sum(spec_verifies),
              "ok": ok, "summary": line, "verdicts": verdicts}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, vs in verdicts.items():
        for i, v in enumerate(vs):
            if not v["ok"]:
                print(f"[{name} #{i}] {v['kind']}: equal {v['equal']} (first mismatch {v['first_mismatch']}), "
                      f"plain {v['plain_violation'] or 'obeys'}, SPARSESPEC {v['spec_violation'] or 'obeys'}",
                      flush=True)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
