"""The README's headline table and docs/results.md's non-default table match benchmarks/results/."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import readme_table  # noqa: E402


def test_published_tables_match_the_result_files():
    assert readme_table.main(["--check"]) == 0, "run: python scripts/readme_table.py"


def test_a_changed_result_file_makes_the_check_fail(tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(readme_table.RESULTS, results, ignore=shutil.ignore_patterns("*.gz", "*.txt", "*.log"))
    name = next(e.json for e in readme_table.DEFAULT if e.json and "points" in json.loads((results / e.json).read_text()))
    report = json.loads((results / name).read_text())
    for p in report["points"]:
        if p["run"].startswith("plain"):  # the baseline is one of the plain runs
            p["output_tok_per_s"] *= 1.1
    (results / name).write_text(json.dumps(report))
    monkeypatch.setattr(readme_table, "RESULTS", results)
    assert readme_table.main(["--check"]) == 1


def test_a_saturated_row_is_over_the_faster_plain_backend_and_excludes_errored_runs(tmp_path, monkeypatch):
    """A bench_saturated file's default row divides by the faster of its plain runs; a run that
    errored is not a point (a faster errored plain run must not become the baseline)."""
    results = tmp_path / "results"
    results.mkdir()
    runs = [{"config": "plain", "forced_accept": None, "window": {"output_tok_per_s": 1000.0}},
            {"config": "plain-flashinfer", "forced_accept": None, "window": {"output_tok_per_s": 1250.0}},
            {"config": "plain-flashinfer", "forced_accept": None, "window": {"output_tok_per_s": 9999.0},
             "error": "server exited with -9"},
            {"config": "sparsespec", "forced_accept": 7.0, "window": {"output_tok_per_s": 2500.0}}]
    (results / "sat.json").write_text(json.dumps({"mode": "steady-state", "runs": runs, "commands": ["a", "b"]}))
    monkeypatch.setattr(readme_table, "RESULTS", results)
    m = readme_table.measure(readme_table.Entry("x", "sat.json", "sparsespec", readme_table.FASTEST_PLAIN))
    assert (m["ratio"], m["baseline"]) == (2.0, "plain-flashinfer")
    table = readme_table.render_default([readme_table.Entry("x", "sat.json", "sparsespec", readme_table.FASTEST_PLAIN)])
    assert "**2.00x**" in table


def test_readme_table_refuses_a_non_default_configuration():
    entry = readme_table.Entry("x", "bench_b128_4k_plain_vs_draftnorm_h100.json", "sparsespec-draftnorm")
    with pytest.raises(ValueError, match="not the default configuration"):
        readme_table.render_default([entry])


def test_ratio_is_within_one_file_and_one_shape():
    grid = readme_table.Entry("x", "bench_batches_b32_64_128_2k_h100.json", "sparsespec-draftnorm")
    with pytest.raises(ValueError, match="3 points"):  # three batch sizes: the entry must pick one
        readme_table.measure(grid)
    m = readme_table.measure(readme_table.Entry("x", grid.json, grid.run, batch=64))
    assert m["base_tok_s"] == pytest.approx(4612.0, abs=1) and m["ratio"] == pytest.approx(5203.5 / 4612.0, rel=1e-3)


def test_replace_table_keeps_the_text_around_the_markers():
    start, end = readme_table._markers("default")
    text = f"intro\n{start}\nold\n{end}\noutro\n"
    assert readme_table.replace_table(text, "default", "new") == f"intro\n{start}\nnew\n{end}\noutro\n"
    with pytest.raises(ValueError, match="exactly one"):
        readme_table.replace_table("no markers", "default", "new")


def test_readme_flag_table_lists_exactly_the_plugin_flags():
    import re

    from sparsespec_sglang.config import OPTIONS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Flags"):text.index("## Limitations")]
    in_table = set(re.findall(r"^\| `(--sparsespec-[a-z-]+)`", section, flags=re.M))
    assert in_table == {o.flag for o in OPTIONS}
