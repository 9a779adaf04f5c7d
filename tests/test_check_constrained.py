"""scripts/check_constrained.py: its argument refusals, the equality and grammar checks on canned
outputs, and the check itself on SGLang's CPU engine (plain vs SPARSESPEC, grammar rows included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_constrained as cc  # noqa: E402

SCRIPT = ROOT / "scripts" / "check_constrained.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, needle", [
    (["--num-prompts", "3"], "--num-prompts: an even number >= 2"),
    (["--max-new-tokens", "8"], "--max-new-tokens: at least 64"),
    (["--grammar-backend", "foo"], "--grammar-backend: unknown foo; allowed: xgrammar, llguidance, outlines"),
    (["--shape", "huge"], "--shape: unknown huge; allowed: tiny, small"),
    (["--dtype", "int8"], "--dtype: unknown int8; allowed: bfloat16, float16, float32"),
    (["--model-dir", "/nonexistent"], "--model-dir: no config.json in /nonexistent"),
])
def test_bad_arguments_are_refused_in_one_line(extra, needle, tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"), *extra)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_batches_alternate_regex_and_schema_and_the_mixed_one_is_half_free():
    batches = cc.make_batches(8)
    assert [r.kind for r in batches["constrained"]] == ["regex", "json"] * 4
    assert [r.kind for r in batches["mixed"]] == ["none", "regex", "none", "json"] * 2
    free, regex, _, schema = batches["mixed"][:4]
    assert free.sampling_params(64) == {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}
    assert regex.sampling_params(64)["regex"] == cc.REGEXES[0][1] and "ignore_eos" not in regex.sampling_params(64)
    assert json.loads(schema.sampling_params(64)["json_schema"]) == cc.SCHEMAS[0][1]


def _out(ids, text, finish="stop"):
    return {"output_ids": ids, "text": text, "finish_reason": finish}


def _canned():
    """Two batches of canned outputs that pass: equal ids, texts that obey their grammars."""
    batches = cc.make_batches(4)
    texts = {"constrained": ["yes", '{"ok":false}', "555-1234", '{"name":"Ada","age":36}'],
             "mixed": ["free text", "maybe", "anything at all", '{"ok":true}']}
    plain = {n: [_out([i, 7, 9], t) for i, t in enumerate(ts)] for n, ts in texts.items()}
    spec = {n: [dict(o) for o in outs] for n, outs in plain.items()}
    return batches, plain, spec


def test_equal_outputs_that_obey_their_grammars_pass():
    batches, plain, spec = _canned()
    ok, line = cc.summarize(cc.check_batches(batches, plain, spec))
    assert ok and line.startswith("CONSTRAINED-EQUAL: 8 of 8 SPARSESPEC outputs equal plain's token for token; "
                                  "6 of 6 constrained requests obey their grammar in both runs")


def test_a_token_mismatch_fails_the_check():
    batches, plain, spec = _canned()
    spec["mixed"][0] = _out([0, 7, 8], "free text")  # an unconstrained row parts from plain at position 2
    verdicts = cc.check_batches(batches, plain, spec)
    ok, line = cc.summarize(verdicts)
    assert not ok and line.startswith("CONSTRAINED-MISMATCH: 7 of 8")
    assert verdicts["mixed"][0]["first_mismatch"] == 2 and not verdicts["mixed"][0]["ok"]
    spec["mixed"][0] = _out([0, 7], "free text")  # a prefix is not equal either
    assert cc.check_batches(batches, plain, spec)["mixed"][0]["first_mismatch"] == 2


@pytest.mark.parametrize("batch, i, text, why", [
    ("constrained", 0, "yes!", "does not match"),                       # regex not matched in full
    ("constrained", 1, '{"ok":false', "not JSON"),                      # cut short
    ("constrained", 3, '{"name":"Ada","age":360}', "violates the schema"),  # integer out of range
    ("mixed", 3, '{"ok":true,"x":1}', "violates the schema"),           # additionalProperties false
])
def test_a_grammar_violation_fails_the_check_even_when_both_runs_agree(batch, i, text, why):
    batches, plain, spec = _canned()
    plain[batch][i] = _out(plain[batch][i]["output_ids"], text, finish="length")
    spec[batch][i] = dict(plain[batch][i])
    verdicts = cc.check_batches(batches, plain, spec)
    v = verdicts[batch][i]
    assert v["equal"] and not v["spec_grammar_ok"] and why in v["spec_violation"] and not v["ok"]
    ok, line = cc.summarize(verdicts)
    assert not ok and "5 of 6 constrained requests obey" in line


def test_a_missing_output_is_an_error_not_a_pass():
    batches, plain, spec = _canned()
    spec["mixed"] = spec["mixed"][:3]
    with pytest.raises(ValueError, match="batch mixed: 4 requests, 4 plain and 3 SPARSESPEC outputs"):
        cc.check_batches(batches, plain, spec)


# SGLang's CPU engine runs grammar decoding with the llguidance backend (its torch bitmask op runs on
# a CPU; xgrammar's mask kernel is CUDA/Triton only in SGLang). The engine settings follow
# tests/test_cpu_engine.py; a tiny random-weight model and one short batch (each engine start alone
# takes ~30 s here).
# Without --enable-deterministic-inference (its batch-invariant kernels are CUDA ones): the CPU
# engine's float32 plain decode and SPARSESPEC's verify agree at these peaky logits, as in
# test_cpu_engine.py.
MAX_NEW = 14  # the shortest grammars' outputs ('{"ok":false}' is 12 byte tokens) and the end token


def cpu_batches() -> dict[str, list]:
    """One batch of a free row, the first regex and the first schema: the Triton interpreter makes every
    SPARSESPEC step take a fraction of a second, so the CPU run is one short batch."""
    batches = cc.make_batches(2)
    return {"mixed": [batches["mixed"][0], *batches["constrained"]]}


CPU_ENGINES = {"plain": {"attention_backend": "torch_native"},
               "sparsespec": {"speculative_algorithm": "SPARSESPEC", "speculative_num_steps": 4,
                              "sparsespec_min_selected": 8, "triton_attention_num_kv_splits": 1}}
CPU_RUN = textwrap.dedent("""
    import json, sys
    import check_constrained as cc
    from test_check_constrained import CPU_ENGINES, MAX_NEW, cpu_batches

    def main():
        common = dict(model_path=sys.argv[1], device="cpu", dtype="float32", disable_cuda_graph=True,
                      disable_overlap_schedule=True, max_total_tokens=4096, max_running_requests=4,
                      chunked_prefill_size=1024, mem_fraction_static=0.5, log_level="warning",
                      grammar_backend="llguidance", constrained_json_disable_any_whitespace=True,
                      disable_radix_cache=True)
        result = {name: cc.generate({**common, **engine}, cpu_batches(), MAX_NEW)
                  for name, engine in CPU_ENGINES.items()}
        print("RESULT " + json.dumps(result))

    if __name__ == "__main__":
        main()
""")


def test_grammar_rows_on_sglangs_cpu_engine_equal_plain_and_obey_their_grammars(tmp_path):
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model = str(make_model_dir(tmp_path / "tiny", "tiny", with_weights=True, dtype="float32"))
    runner = tmp_path / "run_constrained.py"  # a file, so SGLang's spawned scheduler re-imports a plain script
    runner.write_text(CPU_RUN)
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "TRITON_INTERPRET": "1", "SPARSESPEC_CPU_TEST": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "sgl_kernel_cpu"), str(ROOT / "scripts"),
                                          str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(runner), model], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    verdicts = cc.check_batches(cpu_batches(), result["plain"], result["sparsespec"])
    ok, line = cc.summarize(verdicts)
    assert ok, json.dumps(verdicts, indent=1)
    constrained = [v for vs in verdicts.values() for v in vs if v["kind"] != "none"]
    assert len(constrained) == 2 and all(v["spec_finish"] == "stop" for v in constrained)  # grammars completed
    # SPARSESPEC speculated on every request, grammar rows included.
    assert all((o["spec_verify_ct"] or 0) > 0 for outs in result["sparsespec"].values() for o in outs)
