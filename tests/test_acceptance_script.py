"""Runs scripts/acceptance.py on a tiny random model through a subprocess and checks the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "acceptance.py"


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acc")
    model_dir, out = tmp / "tiny", tmp / "results.json"
    proc = _run("--model-dir", model_dir, "--make-tiny", "--num-prompts", 2, "--prompt-len", 24,
                "--max-new-tokens", 24, "--k", "2,4", "--sparsity", "0.05,1.0", "--min-selected", 1,
                "--score-norm", "exact,draft", "--ignore-eos", "--check-lossless", "--bucket-size", 8,
                "--no-progress", "--out", out)
    return model_dir, json.loads(out.read_text()), proc


def test_greedy_sweep_json(greedy_run):
    model_dir, res, proc = greedy_run
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert "acceptance.py" in res["command"] and "--k" in res["argv"] and res["commit"]
    assert res["plain_tokens"] == [24, 24] and res["machine"]["torch_threads"] >= 1
    assert set(res["versions"]) >= {"python", "torch", "transformers", "sparsespec_sglang"}
    assert res["num_prompts"] == 2 and res["prompt_lens"] == [24, 24] and res["max_new_tokens"] == 24
    assert res["selection"]["first_cycle"] == "window" and res["selection"]["min_selected"] == 1
    assert [(r["k"], r["sparsity"], r["score_norm"]) for r in res["results"]] == [
        (k, s, n) for k in (2, 4) for s in (0.05, 1.0) for n in ("exact", "draft")]
    for r in res["results"]:
        k, hist, n = r["k"], r["acceptance_histogram"], r["num_cycles"]
        assert len(hist) == k + 1 and sum(hist) == n > 0
        mean = sum(i * c for i, c in enumerate(hist)) / n
        assert r["mean_accepted"] == pytest.approx(mean)
        assert r["mean_tokens_per_cycle"] == pytest.approx(mean + 1)
        assert r["acceptance_rate"] == pytest.approx(mean / k)
        assert r["generated_tokens"] == 2 * 24 and r["finish_reasons"] == ["length", "length"]
        assert r["lossless"] is True
        buckets = r["by_position"]
        assert sum(b["num_cycles"] for b in buckets) == n
        assert all(b["end"] - b["start"] == 8 and b["start"] < 24 for b in buckets)
        assert sum(b["mean_accepted"] * b["num_cycles"] for b in buckets) == pytest.approx(mean * n)
        if r["sparsity"] == 1.0:  # dense drafts: everything accepted
            assert hist[k] == n and r["mean_accepted"] == k
        else:  # heavily sparse drafts on a random model: far from all accepted
            assert r["mean_accepted"] < k / 2
    assert "mean accepted" in proc.stdout


def test_prompt_file_sampling_and_errors(greedy_run, tmp_path):
    model_dir = greedy_run[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 2?"}\n"Tell me a story."\n')
    out = tmp_path / "r.json"
    _run("--model-dir", model_dir, "--prompts", prompts, "--chat", "--max-new-tokens", 12, "--k", 3,
         "--sparsity", 0.1, "--temperature", 1.0, "--top-k", 20, "--no-progress", "--out", out)
    res = json.loads(out.read_text())
    assert res["num_prompts"] == 2 and res["sampling"]["temperature"] == 1.0
    # ChatML, one token per byte: "<|im_start|>user\n" (6) + content + "<|im_end|>\n" (2)
    # + "<|im_start|>assistant\n" (11).
    assert res["prompt_lens"] == [6 + len(s) + 2 + 11 for s in ("What is 2 + 2?", "Tell me a story.")]
    (r,) = res["results"]
    assert r["k"] == 3 and len(r["acceptance_histogram"]) == 4 and "lossless" not in r

    proc = _run("--model-dir", tmp_path / "missing", "--max-new-tokens", 4, "--out", out, check=False)
    assert proc.returncode != 0 and "--make-tiny" in proc.stderr


def test_points_policies_and_prompt_set(greedy_run, tmp_path):
    """--points with overrides and policies, on few-shot prompts from a prompt set."""
    model_dir = greedy_run[0]
    records = [{"id": f"q{i}", "task": "gsm_symbolic", "question": f"What is {i} + {i}?", "answer": str(2 * i),
                "solution": f"{i} + {i} = {2 * i}. The answer is {2 * i}."} for i in range(12)]
    prompt_set = tmp_path / "set.jsonl"
    prompt_set.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "points.json"
    proc = _run("--model-dir", model_dir, "--prompt-set", prompt_set, "--num-prompts", 2, "--few-shot-tokens", 200,
                "--max-new-tokens", 16, "--ignore-eos", "--min-selected", 2,
                "--points", "default,k=3+s=0.2,policy=window,policy=hybrid:0.5,policy=random:3,temperature=0.8",
                "--out", out)
    res = json.loads(out.read_text())
    assert res["prompts"] == ["q0", "q1"] and all(150 < n <= 200 for n in res["prompt_lens"])
    rows = {r["label"]: r for r in res["results"]}
    assert list(rows) == ["default", "k=3+s=0.2", "policy=window", "policy=hybrid:0.5", "policy=random:3",
                          "temperature=0.8"]
    assert (rows["default"]["k"], rows["default"]["policy"], rows["default"]["min_selected"]) == (8, "pillar", 2)
    assert (rows["k=3+s=0.2"]["k"], rows["k=3+s=0.2"]["sparsity"]) == (3, 0.2)
    assert rows["policy=random:3"]["policy"] == "random:3"
    assert all(rows[x]["lossless"] is True for x in list(rows)[:-1]) and "lossless" not in rows["temperature=0.8"]
    assert rows["temperature=0.8"]["temperature"] == 0.8
    assert "acceptance" in proc.stderr  # tqdm progress


@pytest.mark.parametrize("points,message", [("k=x", "k needs an integer"), ("bogus=1", "bad point 'bogus=1'"),
                                            ("policy=top", "bad selection policy 'top'")])
def test_bad_points_are_one_line_errors(tmp_path, points, message):
    proc = _run("--model-dir", tmp_path, "--max-new-tokens", 4, "--points", points, "--out", tmp_path / "o.json",
                check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_ofat_point_set():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import acceptance
    finally:
        sys.path.pop(0)
    args = acceptance.parse_args(["--model-dir", "x", "--max-new-tokens", "4", "--points", "ofat", "--out", "o"])
    pts = {p.label: p for p in args.point_list}
    assert pts["default"] == acceptance.Point("default", 8, 0.05, 64, 2048, 4, "exact", "sum", 0.0, "pillar")
    assert pts["min_sel=192"].min_selected == 192 and pts["score_norm=draft"].score_norm == "draft"
    assert {p.policy for p in pts.values()} == {"pillar", "window", "random", "inverted", "hybrid:0.25",
                                                 "hybrid:0.5", "hybrid:0.75"}
    assert len(pts) == 17


def test_repeated_ngram_share():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import acceptance
    finally:
        sys.path.pop(0)
    assert acceptance.repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    # period-2 loop: of the 7 4-grams only (1,2,1,2) and (2,1,2,1) are new
    assert acceptance.repeated_ngram_share([1, 2] * 5) == pytest.approx(5 / 7)
    assert acceptance.repeated_ngram_share([1, 2, 3]) == 0.0


def test_workers_give_the_same_results(greedy_run, tmp_path):
    """Prompts spread over worker processes: every per-prompt number equals the in-process run's,
    sampled points included (each prompt's generator is seeded from its index)."""
    model_dir = greedy_run[0]
    outs = {}
    for w in (1, 2):
        outs[w] = tmp_path / f"w{w}.json"
        _run("--model-dir", model_dir, "--num-prompts", 3, "--prompt-len", 40, "--max-new-tokens", 16,
             "--ignore-eos", "--min-selected", 2, "--points", "default,policy=window,temperature=0.8",
             "--workers", w, "--no-progress", "--out", outs[w])
    one, two = (json.loads(outs[w].read_text()) for w in (1, 2))
    assert two["workers"] == 2 and one["workers"] == 1
    assert len(one["plain_repeated_4gram_share"]) == 3 and one["plain_repeated_4gram_share"] == two["plain_repeated_4gram_share"]
    for a, b in zip(one["results"], two["results"]):
        assert a["mean_accepted_per_prompt"] == b["mean_accepted_per_prompt"], a["label"]
        assert a["acceptance_histogram"] == b["acceptance_histogram"] and a["by_position"] == b["by_position"]
    proc = _run("--model-dir", model_dir, "--max-new-tokens", 4, "--workers", 0, "--out", tmp_path / "x.json",
                check=False)
    assert proc.returncode == 2 and "--workers must be an integer >= 1" in proc.stderr
