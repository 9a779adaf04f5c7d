"""Real-weights speed: plain vs NGRAM vs SPARSESPEC through SGLang's own ``bench_offline_throughput``.

What a user sees on a trained model: natural acceptance (``SGLANG_SIMULATE_ACC_LEN`` is never set,
and removed from every run's environment), greedy decoding, the project's reasoning prompts
(``benchmarks/prompts/reasoning_prompts.jsonl``) rendered with the model's chat template, every
request generating exactly ``--output-len`` tokens (``ignore_eos``), the whole batch submitted at
once. One run per (configuration, batch size), each its own process, one after the other:

    python scripts/bench_real_weights.py --model-dir /path/to/smollm2-135m \\
        --configs plain,ngram,sparsespec --batches 64,128,256 --output-len 4096 \\
        --out results/speed_smollm2.json
    # one configuration per call, then one report with the ratios:
    python scripts/bench_real_weights.py --model-dir DIR --configs plain --out speed_plain.json
    python scripts/bench_real_weights.py --model-dir DIR --configs sparsespec --out speed_sparsespec.json
    python scripts/bench_real_weights.py --merge speed_plain.json speed_sparsespec.json --out speed.json

How the prompts reach the tool: for each batch size B this script writes a ShareGPT-format JSON
file of B conversations (the prompts in file order, repeated when B exceeds their number), whose
human turn is the prompt already rendered with the chat template (``testing.prompts.chat_prompt``)
and whose reply is the reference solution (unused: ``--sharegpt-output-len`` fixes the output
length). The tool's own ``--apply-chat-template`` is not used: it strips every occurrence of the
tokenizer's BOS string from the rendered prompt, and SmolLM2's BOS is ``<|im_start|>``, the
token that opens every chat turn. Each run is then

    python scripts/bench_real_weights.py tool --observe OBS.json -- \\
        --model-path DIR --dataset-name sharegpt --dataset-path dataset_B.json --num-prompts B \\
        --sharegpt-output-len L --seed 42 --result-filename result.jsonl \\
        --max-running-requests B --cuda-graph-max-bs-decode B --disable-prefill-cuda-graph \\
        [configuration flags] [--config-args NAME=... of this configuration] [--tool-args ...]

where ``tool`` loads SGLang's plugins first (``bench_offline_throughput`` builds its ``ServerArgs``
before the Engine would load them, so ``--speculative-algorithm SPARSESPEC`` would otherwise be
unknown at parse time; docs/benchmarking.md section 2), lets ``bench_serving``'s dataset registry
import without Hugging Face ``datasets`` (the stand-in of ``scripts/workload.py``, used where the
package is absent), and calls the tool's ``cli_main`` unchanged: its warm-up, its
``temperature 0`` requests with ``ignore_eos``, its timing and result. ``--observe`` only watches
the Engine from outside (wraps ``Engine.generate`` / ``Engine.get_server_info``, returns their
results untouched) to record what the tool does not print: accepted tokens per verify
(``sum(completion_tokens) / sum(spec_verify_ct)`` over the measured requests, bonus token
included; SGLang's per-request ``spec_accept_length`` is the same ratio per request) and the
engine's ``avg_spec_accept_length`` (since engine start: the tool's 16-token warm-up included).

``--max-running-requests B`` and ``--cuda-graph-max-bs-decode B`` go to every configuration, so
each runs the whole batch at once inside its decode CUDA graphs (SPARSESPEC alone would otherwise
cap the batch at 128); ``--disable-prefill-cuda-graph`` shortens the engine start for all alike.

Result: one JSON (rewritten after every run, so a run cut short keeps the finished ones) with the
commands, each run's numbers (the tool's own result dict: output tokens/s, total latency, ...),
``ratio`` per batch (``sparsespec/plain``, ``ngram/plain``: output tokens/s), the GPU, versions and
commit. A failed run is recorded with its log's tail, and the others still run.

Configurations (``--configs``; extra flags for one of them: ``--config-args NAME="FLAGS"``):

    plain         SGLang's defaults
    plain-triton  --attention-backend triton
    ngram         --attention-backend triton --speculative-algorithm NGRAM --speculative-num-draft-tokens 9
    sparsespec    --speculative-algorithm SPARSESPEC (every SPARSESPEC default)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package

from cli import ArgumentError, refuse  # noqa: E402

PROG = "bench_real_weights.py"
TOOL_MODULE = "sglang.benchmark.offline_throughput"  # SGLang 0.5.17 to 0.5.23 (the old path is gone in 0.5.23)
CONFIGS: dict[str, list[str]] = {
    "plain": [],
    "plain-triton": ["--attention-backend", "triton"],
    "plain-flashinfer": ["--attention-backend", "flashinfer"],
    "ngram": ["--attention-backend", "triton", "--speculative-algorithm", "NGRAM",
              "--speculative-num-draft-tokens", "9"],
    "sparsespec": ["--speculative-algorithm", "SPARSESPEC"],
    "sparsespec-adaptive": ["--speculative-algorithm", "SPARSESPEC", "--sparsespec-adaptive", "on"],
}
BASELINE = "plain"
DEFAULT_CONFIGS = ("plain", "ngram", "sparsespec")
DEFAULT_BATCHES = (64, 128, 256)
DEFAULT_OUTPUT_LEN = 4096
MIN_OUTPUT_LEN = 4  # the tool's ShareGPT loader refuses shorter fixed outputs
SEED = 42  # the tool's default: its shuffle of the dataset and its warm-up prompts
FORCED_ACCEPT_ENV = "SGLANG_SIMULATE_ACC_LEN"
# The tool's printed result table, for a run whose --result-filename was not written.
PRINTED_FIELDS = {
    "Successful requests:": "successful_requests",
    "Benchmark duration (s):": "total_latency",
    "Total input tokens:": "total_input_tokens",
    "Total generated tokens:": "total_output_tokens",
    "Last generation throughput (tok/s):": "last_gen_throughput",
    "Request throughput (req/s):": "request_throughput",
    "Input token throughput (tok/s):": "input_throughput",
    "Output token throughput (tok/s):": "output_throughput",
    "Total token throughput (tok/s):": "total_throughput",
}
INT_FIELDS = ("successful_requests", "total_input_tokens", "total_output_tokens")


# ---------------------------------------------------------------- the dataset


def render_prompts(records: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[dict]:
    """Each record's question as one user turn in the tokenizer's chat template."""
    from sparsespec_sglang.testing.prompts import chat_prompt

    return [{"id": r["id"], "prompt": chat_prompt(tokenizer, r["question"]),
             "reply": r.get("solution") or str(r.get("answer") or "")} for r in records]


def sharegpt_rows(rendered: Sequence[Mapping[str, str]], batch: int) -> list[dict]:
    """``batch`` ShareGPT conversations: the rendered prompts in order, repeated past their number
    (the copy index is appended to the id)."""
    if not rendered:
        raise ValueError("no prompts to write")
    rows = []
    for i in range(batch):
        r = rendered[i % len(rendered)]
        rows.append({"id": f"{r['id']}#{i // len(rendered)}",
                     "conversations": [{"from": "human", "value": r["prompt"]},
                                       {"from": "gpt", "value": r["reply"]}]})
    return rows


def write_dataset(rendered: Sequence[Mapping[str, str]], batch: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sharegpt_rows(rendered, batch), ensure_ascii=False))
    return path


def prompt_token_stats(rendered: Sequence[Mapping[str, str]], tokenizer: Any) -> dict:
    from sparsespec_sglang.testing.prompts import count_tokens

    lens = [count_tokens(tokenizer, r["prompt"]) for r in rendered]
    return {"unique_prompts": len(lens), "min": min(lens), "max": max(lens),
            "mean": round(statistics.fmean(lens), 1)}


# ---------------------------------------------------------------- commands


def tool_args(model_dir: str, dataset: Path, batch: int, output_len: int, result_file: Path,
              flags: Sequence[str]) -> list[str]:
    """``bench_offline_throughput``'s flags for one run (its own parser reads them)."""
    return ["--model-path", model_dir, "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
            "--num-prompts", str(batch), "--sharegpt-output-len", str(output_len), "--seed", str(SEED),
            "--result-filename", str(result_file), "--max-running-requests", str(batch),
            "--cuda-graph-max-bs-decode", str(batch), "--disable-prefill-cuda-graph", *flags]


def run_command(observe: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "tool", "--observe", str(observe), "--", *args]


def run_env(base: Mapping[str, str]) -> dict:
    """A run's environment: natural acceptance, so SGLang's forced acceptance is never inherited."""
    return {k: v for k, v in base.items() if k != FORCED_ACCEPT_ENV}


def config_flags(name: str, config_args: Mapping[str, Sequence[str]], tool_args: Sequence[str]) -> list[str]:
    """A configuration's flags, then its ``--config-args``, then the ``--tool-args`` of every run."""
    return [*CONFIGS[name], *config_args.get(name, ()), *tool_args]


# ---------------------------------------------------------------- results


def parse_result_file(path: Path) -> Optional[dict]:
    """The tool's result dict: the last line of its ``--result-filename`` (it appends)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def parse_printed_result(text: str) -> Optional[dict]:
    """The tool's printed result table (``Offline Throughput Benchmark Result``), as numbers."""
    start = text.rfind("Offline Throughput Benchmark Result")
    if start < 0:
        return None
    out: dict[str, Any] = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("Backend:"):
            out["backend"] = line.split(":", 1)[1].strip()
        for label, key in PRINTED_FIELDS.items():
            if line.startswith(label):
                value = float(line[len(label):].strip())
                out[key] = int(value) if key in INT_FIELDS else value
        if line.startswith("====="):
            break
    return out or None


def summarize_outputs(outputs: Any) -> dict:
    """One Engine.generate call's outputs: requests, tokens, speculative verifies and the accepted
    tokens per verify SGLang's per-request metrics imply (completion tokens / verifies, bonus
    included), retractions."""
    outs = outputs if isinstance(outputs, list) else [outputs]
    metas = [o.get("meta_info", {}) for o in outs if isinstance(o, dict)]
    tokens = sum(int(m.get("completion_tokens", 0)) for m in metas)
    verifies = sum(int(m.get("spec_verify_ct", 0) or 0) for m in metas)
    per_request = [m["spec_accept_length"] for m in metas if m.get("spec_accept_length") is not None]
    return {"requests": len(metas), "completion_tokens": tokens,
            "prompt_tokens": sum(int(m.get("prompt_tokens", 0)) for m in metas),
            "spec_verify_ct": verifies or None,
            "accept_length": tokens / verifies if verifies else None,
            "mean_request_accept_length": statistics.fmean(per_request) if per_request else None,
            "retractions": sum(int(m.get("num_retractions", 0) or 0) for m in metas)}


def run_numbers(result: Optional[Mapping[str, Any]], observed: Optional[Mapping[str, Any]], batch: int,
                output_len: int) -> dict:
    """The headline numbers of one run from the tool's result and the observation."""
    out: dict[str, Any] = {}
    if result:
        out["output_tok_per_s"] = result.get("output_throughput")
        out["total_latency_s"] = result.get("total_latency")
        out["total_output_tokens"] = result.get("total_output_tokens")
        out["complete"] = result.get("total_output_tokens") == batch * output_len
    calls = (observed or {}).get("generate_calls") or []
    if calls:
        measured = calls[-1]  # the tool's warm-up comes first, the measured batch last
        out["accept_length"] = measured["accept_length"]
        out["mean_request_accept_length"] = measured["mean_request_accept_length"]
        out["retractions"] = measured["retractions"]
    info = (observed or {}).get("server_info") or {}
    out["engine_avg_spec_accept_length"] = info.get("avg_spec_accept_length")
    return out


def add_ratios(report: dict) -> None:
    """``ratio[f"{config}/plain"][batch]``: output tokens/s over plain's (SGLang's default attention
    backend) at the same batch size, and ``ratio[f"{config}/fastest-plain"][batch]`` over the
    fastest plain configuration measured at that batch (named in ``fastest_plain``): the baseline a
    user would pick."""
    tput: dict[str, dict[int, float]] = {}
    for r in report["runs"]:
        if r.get("output_tok_per_s"):
            tput.setdefault(r["config"], {})[r["batch"]] = r["output_tok_per_s"]
    fastest: dict[int, str] = {}
    for name, by_batch in tput.items():
        if name.startswith(BASELINE):
            for b, v in by_batch.items():
                if b not in fastest or v > tput[fastest[b]][b]:
                    fastest[b] = name
    ratio = {}
    for name, by_batch in tput.items():
        if name.startswith(BASELINE):
            if name != BASELINE and tput.get(BASELINE):
                common = {str(b): v / tput[BASELINE][b] for b, v in sorted(by_batch.items()) if b in tput[BASELINE]}
                if common:
                    ratio[f"{name}/{BASELINE}"] = common
            continue
        for key, base_of in ((BASELINE, lambda b: BASELINE), ("fastest-plain", lambda b: fastest.get(b))):
            common = {str(b): v / tput[base_of(b)][b] for b, v in sorted(by_batch.items())
                      if base_of(b) in tput and b in tput[base_of(b)]}
            if common:
                ratio[f"{name}/{key}"] = common
    report["ratio"] = ratio
    report["fastest_plain"] = {str(b): n for b, n in sorted(fastest.items())}


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- one run


def run_one(name: str, batch: int, args: argparse.Namespace, dataset: Path, work: Path) -> dict:
    from bench_saturated import child_setup, stop

    tag = f"{name}_bs{batch}"
    result_file, observe, log = work / f"{tag}.result.jsonl", work / f"{tag}.observe.json", work / f"{tag}.log"
    for p in (result_file, observe):
        p.unlink(missing_ok=True)
    flags = config_flags(name, args.config_args, args.tool_args)
    cmd = run_command(observe, tool_args(args.model_dir, dataset, batch, args.output_len, result_file, flags))
    record: dict[str, Any] = {"config": name, "batch": batch, "flags": flags, "command": shlex.join(cmd),
                              "log": str(log)}
    print(f"[{tag}] command: {record['command']}", flush=True)
    t0 = time.monotonic()
    proc = None
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=run_env(os.environ),
                                    cwd=REPO, preexec_fn=child_setup)
            try:
                record["rc"] = proc.wait(timeout=args.run_timeout)
            except subprocess.TimeoutExpired:
                record["rc"] = None
                record["error"] = f"timed out after {args.run_timeout:.0f} s (--run-timeout)"
    finally:
        stop(proc, grace_s=20)
        record["wall_s"] = round(time.monotonic() - t0, 1)
    result = parse_result_file(result_file) or parse_printed_result(_tail(log, 60))
    observed = json.loads(observe.read_text()) if observe.is_file() else None
    record["result"] = result
    record.update(run_numbers(result, observed, batch, args.output_len))
    if observed:
        record["observed"] = observed
    if "error" not in record and (record["rc"] != 0 or not result):
        record["error"] = f"exited with {record['rc']}" + ("" if result else ", no result")
    if "error" in record:
        record["log_tail"] = _tail(log)
        print(f"[{tag}] FAILED: {record['error']}; log tail:\n{record['log_tail']}", flush=True)
    else:
        acc = record.get("accept_length")
        print(f"[{tag}] {record['output_tok_per_s']:.1f} output tok/s, {record['total_latency_s']:.1f} s, "
              f"{record['total_output_tokens']} tokens" + (f", accept length {acc:.2f}" if acc else "")
              + f" (wall {record['wall_s']:.0f} s)", flush=True)
    return record


# ---------------------------------------------------------------- the tool, in a run's process


def _observe_engine(path: Path) -> None:
    """Record every Engine.generate call's summary and the last server info into ``path``; the
    wrapped methods return their results unchanged."""
    from sparsespec_sglang import compat

    Engine = compat.Engine
    state: dict[str, Any] = {"forced_acceptance_env": os.environ.get(FORCED_ACCEPT_ENV),  # None: natural
                             "generate_calls": [], "server_info": None}
    generate, server_info = Engine.generate, Engine.get_server_info

    def dump() -> None:
        path.write_text(json.dumps(state, indent=1))

    def observed_generate(self: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(self, *a, **kw)
        state["generate_calls"].append({**summarize_outputs(out), "seconds": time.perf_counter() - t0})
        dump()
        return out

    def observed_server_info(self: Any, *a: Any, **kw: Any) -> Any:
        info = server_info(self, *a, **kw)
        if isinstance(info, dict):
            internal = (info.get("internal_states") or [{}])[0]
            state["server_info"] = {
                "avg_spec_accept_length": internal.get("avg_spec_accept_length"),
                "last_gen_throughput": internal.get("last_gen_throughput"),
                "max_total_num_tokens": info.get("max_total_num_tokens"),
                "attention_backend": info.get("attention_backend"),
                "speculative_algorithm": info.get("speculative_algorithm"),
                "speculative_num_steps": info.get("speculative_num_steps"),
                "speculative_num_draft_tokens": info.get("speculative_num_draft_tokens"),
                "max_running_requests": info.get("max_running_requests"),
                "version": info.get("version"),
            }
            dump()
        return info

    Engine.generate = observed_generate
    Engine.get_server_info = observed_server_info


def tool_main(argv: Sequence[str]) -> int:
    """``tool [--observe PATH] -- ARGS``: SGLang's ``bench_offline_throughput`` with ARGS, the plugins
    loaded first."""
    ap = argparse.ArgumentParser(prog=f"{PROG} tool")
    ap.add_argument("--observe", default=None, help="JSON the Engine observation is written to")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then bench_offline_throughput's flags")
    ns = ap.parse_args(argv)
    rest = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    import workload

    workload._allow_without_hf_datasets()  # bench_serving's dataset registry imports `datasets`
    from sparsespec_sglang import compat

    compat.load_plugins()
    if ns.observe:
        _observe_engine(Path(ns.observe))
    import importlib

    tool = importlib.import_module(TOOL_MODULE)
    sys.argv = [TOOL_MODULE, *rest]
    tool.cli_main()
    return 0


# ---------------------------------------------------------------- arguments


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise ArgumentError(f"--configs: unknown configuration {', '.join(bad)}; allowed: {', '.join(CONFIGS)}")
    if not names:
        raise ArgumentError(f"--configs: no configuration given; allowed: {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        raise ArgumentError(f"--configs: a configuration is named twice ({text})")
    return names


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ArgumentError(f"--batches: comma-separated positive integers, e.g. 64,128,256 (got {text!r})") from None
    if not values or any(v < 1 for v in values):
        raise ArgumentError(f"--batches: comma-separated positive integers, e.g. 64,128,256 (got {text!r})")
    if len(set(values)) != len(values):
        raise ArgumentError(f"--batches: a batch size is named twice ({text})")
    return values


def _config_args(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep:
            raise ArgumentError(f'--config-args: NAME="FLAGS" (got {item!r})')
        if name not in CONFIGS:
            raise ArgumentError(f"--config-args: unknown configuration {name}; allowed: {', '.join(CONFIGS)}")
        out.setdefault(name, []).extend(shlex.split(flags))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--model-dir", help="Hugging Face model directory (real weights)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma list, run in this order; allowed: {', '.join(CONFIGS)} (default: %(default)s)")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                    help="comma list of batch sizes: requests submitted at once (default: %(default)s)")
    ap.add_argument("--output-len", type=int, default=DEFAULT_OUTPUT_LEN,
                    help="tokens every request generates, ignore_eos (default: %(default)s)")
    ap.add_argument("--prompts", default=None,
                    help="prompt JSONL with id and question per line (default: the reasoning prompt set)")
    ap.add_argument("--tool-args", default="",
                    help="extra bench_offline_throughput flags for every configuration (Engine flags, or the tool's "
                         'own such as --skip-warmup), one quoted string: --tool-args="--mem-fraction-static 0.8"')
    ap.add_argument("--config-args", action="append", default=[], metavar='NAME="FLAGS"',
                    help="extra Engine flags for one configuration (repeatable)")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds one run may take (default: %(default)s)")
    ap.add_argument("--work-dir", default=None,
                    help="datasets, logs and the tool's result files (default: next to --out, <stem>_work)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="join the runs of earlier result files (same model, workload and GPU) into one report "
                         "with ratios; runs nothing")
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.merge is not None:
        missing = [p for p in args.merge if not Path(p).is_file()]
        if missing:
            raise ArgumentError(f"--merge: no such file {', '.join(missing)}")
        return args
    args.configs = _names(args.configs)
    args.batches = _batches(args.batches)
    args.config_args = _config_args(args.config_args)
    args.tool_args = shlex.split(args.tool_args)
    if args.model_dir is None:
        raise ArgumentError("--model-dir is required (a Hugging Face model directory)")
    if not (Path(args.model_dir) / "config.json").is_file():
        raise ArgumentError(f"--model-dir: no config.json in {args.model_dir}")
    if args.output_len < MIN_OUTPUT_LEN:
        raise ArgumentError(f"--output-len must be >= {MIN_OUTPUT_LEN} (bench_offline_throughput's "
                            f"ShareGPT loader refuses less; got {args.output_len})")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ArgumentError(f"--prompts: no such file {args.prompts}")
    if args.run_timeout <= 0:
        raise ArgumentError(f"--run-timeout must be > 0 (got {args.run_timeout})")
    return args


# ---------------------------------------------------------------- reports


def versions() -> dict:
    """provenance.versions() in a short process of its own (it asks torch for the GPU name, which
    would otherwise keep a CUDA context in this process for the whole benchmark)."""
    code = "import json; from sparsespec_sglang.testing import provenance; print(json.dumps(provenance.versions()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"versions unavailable: {e}"}


def merge(paths: Sequence[str]) -> dict:
    """One report from the runs of several result files, in order. Their model, workload and GPU
    must agree: a ratio between different workloads or cards means nothing."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths[1:], reports[1:]):
        for key in ("model", "workload", "gpu"):
            if r.get(key) != first.get(key):
                raise ArgumentError(f"--merge: {path} differs from {paths[0]} in {key!r}; only runs of one "
                                    "model, workload and GPU can be compared")
    report = {k: v for k, v in first.items() if k not in ("runs", "ratio", "command", "commit")}
    report["settings"] = [r.get("settings") for r in reports]  # each file's configurations and flags
    report["commands"] = [c for r in reports for c in (r.get("commands") or [r.get("command")])]
    report["commits"] = [r.get("commit") for r in reports]
    report["merged_from"] = [str(p) for p in paths]
    report["runs"] = [run for r in reports for run in r["runs"]]
    add_ratios(report)
    return report


def print_ratios(report: Mapping[str, Any]) -> None:
    for key, by_batch in report.get("ratio", {}).items():
        print(f"output tok/s {key}: " + ", ".join(f"bs {b}: {v:.3f}x" for b, v in by_batch.items()), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tool"]:
        return tool_main(argv[1:])
    try:
        args = parse_args(argv)
        if args.merge is not None:
            report = merge(args.merge)
            Path(args.out).write_text(json.dumps(report, indent=1))
            print_ratios(report)
            print(f"wrote {args.out}", flush=True)
            return 1 if any("error" in r for r in report["runs"]) else 0
    except ArgumentError as e:
        return refuse(PROG, e)

    from transformers import AutoTokenizer

    from sparsespec_sglang.testing.prompts import load_prompts

    if os.environ.get(FORCED_ACCEPT_ENV):
        print(f"note: {FORCED_ACCEPT_ENV} is set here and removed from every run (natural acceptance)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts_path = Path(args.prompts) if args.prompts else None
    rendered = render_prompts(load_prompts(prompts_path), tokenizer)
    datasets = {b: write_dataset(rendered, b, work / f"dataset_{b}.json") for b in args.batches}
    model_config = json.loads((Path(args.model_dir) / "config.json").read_text())
    ver = versions()
    report: dict[str, Any] = {
        "benchmark": "real-weights speed through SGLang's bench_offline_throughput",
        "tool": TOOL_MODULE,
        "command": shlex.join(["python", "scripts/bench_real_weights.py", *argv]),
        "commit": ver.get("commit"), "gpu": ver.get("gpu"), "versions": ver,
        "model": {"dir": str(args.model_dir), "architectures": model_config.get("architectures"),
                  "model_type": model_config.get("model_type"),
                  "dtype": model_config.get("dtype", model_config.get("torch_dtype")),
                  "name": Path(args.model_dir).resolve().name},
        "workload": {"prompts": str(prompts_path or "benchmarks/prompts/reasoning_prompts.jsonl"),
                     "chat_template": True, "output_len": args.output_len, "ignore_eos": True,
                     "temperature": 0.0, "forced_acceptance": None, "dataset": "sharegpt (fixed output length)",
                     "prompt_tokens": prompt_token_stats(rendered, tokenizer)},
        "settings": {"configs": args.configs, "batches": args.batches, "config_flags": {n: CONFIGS[n] for n in args.configs},
                     "config_args": args.config_args, "tool_args": args.tool_args,
                     "per_run_flags": "--max-running-requests B --cuda-graph-max-bs-decode B --disable-prefill-cuda-graph",
                     "run_timeout_s": args.run_timeout},
        "datasets": {str(b): str(p) for b, p in datasets.items()},
        "work_dir": str(work), "runs": [],
    }
    print(f"prompts: {json.dumps(report['workload']['prompt_tokens'])}; output {args.output_len} tokens; "
          f"configs {','.join(args.configs)}; batches {','.join(map(str, args.batches))}; GPU {report['gpu']}",
          flush=True)
    for name in args.configs:
        for batch in args.batches:
            try:
                record = run_one(name, batch, args, datasets[batch], work)
            except Exception as e:  # keep going: the other runs still count
                record = {"config": name, "batch": batch, "error": f"{type(e).__name__}: {e}"}
                print(f"[{name}_bs{batch}] FAILED: {record['error']}", flush=True)
            report["runs"].append(record)
            add_ratios(report)
            out.write_text(json.dumps(report, indent=1))
    print_ratios(report)
    print(f"wrote {out}", flush=True)
    return 1 if any("error" in r for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
