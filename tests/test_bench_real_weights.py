"""scripts/bench_real_weights.py on CPU: the ShareGPT dataset file as SGLang's own loader reads it,
the run commands as the tool's own parser (and SGLang's resolution) reads them, the tool's import
without Hugging Face ``datasets``, result parsing, ratios, argument refusals, merging, a failed
run's record, and one end-to-end run through ``bench_offline_throughput`` in SGLang's CPU engine
(tiny random model, plain and SPARSESPEC, batch 2, 8 output tokens)."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench_real_weights as brw  # noqa: E402

from sparsespec_sglang.config import CPU_TEST_ENV  # noqa: E402

RECORDS = [{"id": f"q-{i}", "question": f"What is {i} + {i}? Explain step by step.", "answer": str(2 * i),
            "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(3)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("m") / "tiny", "tiny", with_weights=False))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- the dataset


def test_dataset_rows_repeat_the_rendered_prompts_in_order(tokenizer):
    rendered = brw.render_prompts(RECORDS, tokenizer)
    assert rendered[0]["prompt"].startswith("<|im_start|>") and RECORDS[0]["question"] in rendered[0]["prompt"]
    assert rendered[0]["prompt"].rstrip().endswith("assistant")  # ready for the answer
    rows = brw.sharegpt_rows(rendered, 7)
    assert [r["id"] for r in rows] == ["q-0#0", "q-1#0", "q-2#0", "q-0#1", "q-1#1", "q-2#1", "q-0#2"]
    assert [r["conversations"][0]["value"] for r in rows[:4]] == [x["prompt"] for x in rendered] + [rendered[0]["prompt"]]
    assert rows[1]["conversations"] == [{"from": "human", "value": rendered[1]["prompt"]},
                                        {"from": "gpt", "value": RECORDS[1]["solution"]}]
    with pytest.raises(ValueError):
        brw.sharegpt_rows([], 2)


def test_the_tools_own_sharegpt_loader_reads_the_file_with_fixed_output_length(tmp_path, tokenizer):
    """What bench_offline_throughput does with the file: its ShareGPT loader (every row, the prompt
    text unchanged, the fixed output length) and its warm-up sampler (prompts from the same file)."""
    from sglang.benchmark.datasets.random import sample_random_requests
    from sglang.benchmark.datasets.sharegpt import sample_sharegpt_requests

    rendered = brw.render_prompts(RECORDS, tokenizer)
    path = brw.write_dataset(rendered, 5, tmp_path / "d" / "dataset_5.json")
    random.seed(brw.SEED)
    rows = sample_sharegpt_requests(dataset_path=str(path), num_requests=5, tokenizer=tokenizer, fixed_output_len=4096)
    assert len(rows) == 5 and all(r.output_len == 4096 for r in rows)
    assert sorted(r.prompt for r in rows) == sorted(brw.sharegpt_rows(rendered, 5)[i]["conversations"][0]["value"]
                                                    for i in range(5))
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt)) for r in rows)
    warm = sample_random_requests(input_len=256, output_len=16, num_prompts=2, range_ratio=1.0,
                                  tokenizer=tokenizer, dataset_path=str(path))
    assert len(warm) == 2 and all(r.output_len == 16 for r in warm)
    stats = brw.prompt_token_stats(rendered, tokenizer)
    assert stats["unique_prompts"] == 3 and stats["min"] <= stats["mean"] <= stats["max"]


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def tool_parser():
    from sglang.benchmark.offline_throughput import BenchArgs
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    BenchArgs.add_cli_args(parser)
    return parser


@pytest.mark.parametrize("name", brw.CONFIGS)
def test_every_run_parses_with_the_tools_own_parser(tool_parser, tiny_model_dir, tmp_path, name):
    flags = brw.config_flags(name, {"plain": ["--attention-backend", "torch_native"]}, ["--skip-warmup"])
    args = brw.tool_args(tiny_model_dir, tmp_path / "dataset_256.json", 256, 4096, tmp_path / "r.jsonl", flags)
    cmd = brw.run_command(tmp_path / "obs.json", args)
    assert cmd[:3] == [sys.executable, str(REPO / "scripts" / "bench_real_weights.py"), "tool"]
    assert cmd[3:6] == ["--observe", str(tmp_path / "obs.json"), "--"]
    ns = tool_parser.parse_args(cmd[6:])
    assert ns.dataset_name == "sharegpt" and ns.dataset_path == str(tmp_path / "dataset_256.json")
    assert ns.num_prompts == 256 and ns.sharegpt_output_len == 4096 and not ns.disable_ignore_eos
    assert not ns.apply_chat_template and ns.skip_warmup and ns.seed == brw.SEED
    assert ns.max_running_requests == 256 and ns.cuda_graph_max_bs_decode == 256 and ns.disable_prefill_cuda_graph
    spec = {"ngram": "NGRAM", "sparsespec": "SPARSESPEC", "sparsespec-adaptive": "SPARSESPEC"}.get(name)
    assert ns.speculative_algorithm == spec
    assert ns.attention_backend == {"plain": "torch_native", "plain-triton": "triton", "plain-flashinfer": "flashinfer",
                                    "ngram": "triton"}.get(name)
    # SGLang's and the plugin's resolution keep the whole batch running at once (SPARSESPEC's own
    # default would cap it at 128) and NGRAM's 9 draft tokens.
    from sglang.srt.server_args import ServerArgs

    from sparsespec_sglang.compat import resolve_server_args, resolved_view

    sa = ServerArgs.from_cli_args(tool_parser.parse_args(cmd[6:] + ["--device", "cpu"]))
    resolve_server_args(sa)
    resolved = resolved_view(sa)
    assert resolved.max_running_requests == 256
    assert resolved.speculative_num_draft_tokens == (None if spec is None else 9)


def test_runs_never_inherit_forced_acceptance():
    env = brw.run_env({"SGLANG_SIMULATE_ACC_LEN": "7", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


def test_the_tool_imports_without_hf_datasets_and_loads_the_plugin_first():
    """``tool`` where ``datasets`` cannot be imported (as on a host without it): the tool's CLI parses
    (its help lists the plugin's flags, so the plugins were loaded before its parser was built)."""
    code = ("import sys; sys.modules['datasets'] = None; sys.path.insert(0, 'scripts'); "
            "import bench_real_weights as b; sys.exit(b.main(['tool', '--', '--help']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--sharegpt-output-len" in proc.stdout and "--sparsespec-schedule" in proc.stdout


# ---------------------------------------------------------------- results

PRINTED = """
noise
====== Offline Throughput Benchmark Result =======
Backend:                                 engine
Successful requests:                     64
Benchmark duration (s):                  20.50
Total input tokens:                      15450
Total generated tokens:                  262144
Last generation throughput (tok/s):      13000.25
Request throughput (req/s):              3.12
Input token throughput (tok/s):          753.66
Output token throughput (tok/s):         12787.51
Total token throughput (tok/s):          13541.17
==================================================
"""


def test_parse_printed_result():
    r = brw.parse_printed_result(PRINTED)
    assert r == {"backend": "engine", "successful_requests": 64, "total_latency": 20.5, "total_input_tokens": 15450,
                 "total_output_tokens": 262144, "last_gen_throughput": 13000.25, "request_throughput": 3.12,
                 "input_throughput": 753.66, "output_throughput": 12787.51, "total_throughput": 13541.17}
    assert brw.parse_printed_result("no table here") is None


def test_parse_result_file_takes_the_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert brw.parse_result_file(path) is None
    path.write_text(json.dumps({"output_throughput": 1.0}) + "\n" + json.dumps({"output_throughput": 2.0}) + "\n")
    assert brw.parse_result_file(path) == {"output_throughput": 2.0}


def _out(tokens: int, verifies: int | None = None, retractions: int = 0) -> dict:
    meta = {"completion_tokens": tokens, "prompt_tokens": 10, "num_retractions": retractions}
    if verifies:
        meta.update(spec_verify_ct=verifies, spec_accept_length=tokens / verifies)
    return {"text": "", "meta_info": meta}


def test_summarize_outputs_and_run_numbers():
    plain = brw.summarize_outputs([_out(8), _out(8)])
    assert plain["requests"] == 2 and plain["completion_tokens"] == 16 and plain["accept_length"] is None
    spec = brw.summarize_outputs([_out(8, 2), _out(8, 6, retractions=1)])
    assert spec["accept_length"] == 16 / 8 and spec["mean_request_accept_length"] == (4 + 8 / 6) / 2
    assert spec["retractions"] == 1 and spec["spec_verify_ct"] == 8
    assert brw.summarize_outputs(_out(4, 2))["requests"] == 1  # a single prompt's dict
    result = {"output_throughput": 100.0, "total_latency": 0.16, "total_output_tokens": 16}
    observed = {"generate_calls": [brw.summarize_outputs([_out(16, 16)] * 2), spec],  # warm-up first
                "server_info": {"avg_spec_accept_length": 1.9}}
    n = brw.run_numbers(result, observed, batch=2, output_len=8)
    assert n == {"output_tok_per_s": 100.0, "total_latency_s": 0.16, "total_output_tokens": 16, "complete": True,
                 "accept_length": 2.0, "mean_request_accept_length": spec["mean_request_accept_length"],
                 "retractions": 1, "engine_avg_spec_accept_length": 1.9}
    assert brw.run_numbers(result, None, batch=4, output_len=8)["complete"] is False


def test_ratios_per_batch_over_plain():
    report = {"runs": [{"config": "plain", "batch": 64, "output_tok_per_s": 1000.0},
                       {"config": "plain", "batch": 128, "output_tok_per_s": 2000.0},
                       {"config": "ngram", "batch": 64, "output_tok_per_s": 1500.0},
                       {"config": "sparsespec", "batch": 64, "output_tok_per_s": 500.0},
                       {"config": "sparsespec", "batch": 128, "output_tok_per_s": 3000.0},
                       {"config": "sparsespec", "batch": 256, "output_tok_per_s": 4000.0},  # no plain at 256
                       {"config": "ngram", "batch": 128, "error": "exited with 1"}]}
    brw.add_ratios(report)
    assert report["ratio"] == {"ngram/plain": {"64": 1.5}, "ngram/fastest-plain": {"64": 1.5},
                               "sparsespec/plain": {"64": 0.5, "128": 1.5},
                               "sparsespec/fastest-plain": {"64": 0.5, "128": 1.5}}
    # A faster plain backend at one batch becomes that batch's baseline.
    report["runs"].append({"config": "plain-triton", "batch": 128, "output_tok_per_s": 3000.0})
    brw.add_ratios(report)
    assert report["fastest_plain"] == {"64": "plain", "128": "plain-triton"}
    assert report["ratio"]["sparsespec/fastest-plain"] == {"64": 0.5, "128": 1.0}
    assert report["ratio"]["sparsespec/plain"] == {"64": 0.5, "128": 1.5}
    assert report["ratio"]["plain-triton/plain"] == {"128": 1.5}
    only = {"runs": [{"config": "sparsespec", "batch": 64, "output_tok_per_s": 1.0}]}
    brw.add_ratios(only)
    assert only["ratio"] == {}


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv,message", [
    (["--configs", "plain,eagle"], "--configs: unknown configuration eagle; allowed: plain, plain-triton, plain-flashinfer, ngram, sparsespec, sparsespec-adaptive"),
    (["--configs", ","], "--configs: no configuration given; allowed:"),
    (["--configs", "plain,plain"], "--configs: a configuration is named twice"),
    (["--batches", "64,x"], "--batches: comma-separated positive integers"),
    (["--batches", "0"], "--batches: comma-separated positive integers"),
    (["--output-len", "2"], "--output-len must be >= 4"),
    (["--config-args", "eagle=--foo"], "--config-args: unknown configuration eagle; allowed:"),
    (["--config-args", "plain"], '--config-args: NAME="FLAGS"'),
    (["--prompts", "/nonexistent.jsonl"], "--prompts: no such file /nonexistent.jsonl"),
    (["--run-timeout", "0"], "--run-timeout must be > 0"),
])
def test_bad_arguments_give_one_line_errors(capsys, tiny_model_dir, argv, message):
    assert brw.main(["--model-dir", tiny_model_dir, "--out", "x.json", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_real_weights.py: error: ") and message in err, err


def test_missing_model_dir_is_refused(capsys, tmp_path):
    assert brw.main(["--out", "x.json"]) == 2
    assert "--model-dir is required" in capsys.readouterr().err
    assert brw.main(["--model-dir", str(tmp_path), "--out", "x.json"]) == 2
    assert f"--model-dir: no config.json in {tmp_path}" in capsys.readouterr().err


# ---------------------------------------------------------------- the report


def test_report_json_with_fake_runs(tmp_path, tiny_model_dir, monkeypatch):
    tput = {("plain", 2): 100.0, ("plain", 4): 180.0, ("sparsespec", 2): 150.0}
    calls = []

    def fake_run(name, batch, args, dataset, work):
        calls.append((name, batch))
        assert json.loads(Path(dataset).read_text())[0]["conversations"][0]["value"].startswith("<|im_start|>")
        assert len(json.loads(Path(dataset).read_text())) == batch
        if (name, batch) not in tput:
            return {"config": name, "batch": batch, "error": "exited with 1", "log_tail": "boom"}
        return {"config": name, "batch": batch, "output_tok_per_s": tput[(name, batch)]}

    monkeypatch.setattr(brw, "run_one", fake_run)
    monkeypatch.setattr(brw, "versions", lambda: {"commit": "abc", "gpu": "Fake GPU", "sglang": "0.5.17"})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "res" / "speed.json"
    rc = brw.main(["--model-dir", tiny_model_dir, "--configs", "plain,sparsespec", "--batches", "2,4",
                   "--output-len", "8", "--prompts", str(prompts), "--out", str(out)])
    assert rc == 1  # one run failed, the others were kept
    assert calls == [("plain", 2), ("plain", 4), ("sparsespec", 2), ("sparsespec", 4)]
    report = json.loads(out.read_text())
    assert report["ratio"] == {"sparsespec/plain": {"2": 1.5}, "sparsespec/fastest-plain": {"2": 1.5}}
    assert report["gpu"] == "Fake GPU" and report["commit"] == "abc" and report["versions"]["sglang"] == "0.5.17"
    assert report["workload"]["output_len"] == 8 and report["workload"]["forced_acceptance"] is None
    assert report["workload"]["prompt_tokens"]["unique_prompts"] == 3
    assert report["command"].startswith("python scripts/bench_real_weights.py --model-dir")
    assert report["runs"][-1]["log_tail"] == "boom"
    assert Path(report["datasets"]["4"]).parent == tmp_path / "res" / "speed_work"

    # Merging: a report of another GPU is refused; one of the same joins with its ratios.
    other = dict(report, runs=[{"config": "sparsespec", "batch": 4, "output_tok_per_s": 360.0}],
                 command="python scripts/bench_real_weights.py --configs sparsespec", commit="def")
    (tmp_path / "b.json").write_text(json.dumps(other))
    (tmp_path / "c.json").write_text(json.dumps(dict(other, gpu="Other GPU")))
    merged_path = tmp_path / "merged.json"
    assert brw.main(["--merge", str(out), str(tmp_path / "b.json"), "--out", str(merged_path)]) == 1
    merged = json.loads(merged_path.read_text())
    assert merged["ratio"]["sparsespec/plain"] == {"2": 1.5, "4": 2.0} and merged["commits"] == ["abc", "def"]
    assert len(merged["commands"]) == 2 and len(merged["runs"]) == 5
    assert brw.main(["--merge", str(out), str(tmp_path / "c.json"), "--out", str(merged_path)]) == 2


def test_a_failed_run_keeps_its_record_and_log_tail(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(brw, "run_command",
                        lambda observe, args: [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"])
    args = brw.parse_args(["--model-dir", tiny_model_dir, "--out", str(tmp_path / "x.json")])
    rec = brw.run_one("plain", 64, args, tmp_path / "dataset_64.json", tmp_path)
    assert rec["rc"] == 3 and rec["error"] == "exited with 3, no result" and "bad flag" in rec["log_tail"]
    assert rec["config"] == "plain" and rec["batch"] == 64 and "wall_s" in rec


# ---------------------------------------------------------------- end to end on the CPU engine


def test_end_to_end_through_bench_offline_throughput_on_the_cpu_engine(tmp_path):
    """The script as a user runs it, through SGLang's own tool in SGLang's CPU engine (the plugin's
    test mode; SPARSESPEC's kernels in the Triton interpreter): a tiny random model, batch 2, 8
    output tokens, plain (torch_native attention) then SPARSESPEC (k = 2, to keep the interpreter
    short); the tool's warm-up is skipped. ~1 minute on 2 cores."""
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(tmp_path / "tiny", "tiny", with_weights=True))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "speed.json"
    cpu = ("--device cpu --dtype float32 --disable-cuda-graph --disable-overlap-schedule --max-total-tokens 2048 "
           "--mem-fraction-static 0.5 --chunked-prefill-size 1024 --skip-warmup")
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "TRITON_INTERPRET": "1", CPU_TEST_ENV: "1",
           "SGLANG_SIMULATE_ACC_LEN": "3",  # must not reach the runs
           "PYTHONPATH": os.pathsep.join([str(HERE / "sgl_kernel_cpu"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_real_weights.py"), "--model-dir", model_dir,
           "--configs", "plain,sparsespec", "--batches", "2", "--output-len", "8", "--prompts", str(prompts),
           "--out", str(out), f"--tool-args={cpu}", "--config-args", "plain=--attention-backend torch_native",
           "--config-args", "sparsespec=--speculative-num-steps 2", "--run-timeout", "300"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    plain, spec = report["runs"]
    for run in (plain, spec):
        assert "error" not in run and run["rc"] == 0 and run["complete"], run
        assert run["result"]["total_output_tokens"] == 16 and run["result"]["successful_requests"] == 2
        assert run["output_tok_per_s"] > 0 and run["observed"]["generate_calls"][-1]["requests"] == 2
    assert plain["accept_length"] is None and plain["observed"]["server_info"]["speculative_algorithm"] is None
    info = spec["observed"]["server_info"]
    assert info["speculative_algorithm"] == "SPARSESPEC" and info["attention_backend"] == "sparsespec"
    assert info["max_running_requests"] == 2 and info["speculative_num_steps"] == 2
    # Natural acceptance: the forced acceptance set in this process never reached the runs.
    assert plain["observed"]["forced_acceptance_env"] is None and spec["observed"]["forced_acceptance_env"] is None
    assert 1.0 <= spec["accept_length"] <= 3.0  # tokens per verify, bonus included: [1, k + 1]
    assert set(report["ratio"]) == {"sparsespec/plain", "sparsespec/fastest-plain"} and "2" in report["ratio"]["sparsespec/plain"]
    assert "output tok/s sparsespec/plain: bs 2:" in proc.stdout
