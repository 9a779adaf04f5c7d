"""sparsespec_sglang.demo: the README's CPU demo. Its verdict and histogram, its one-line errors, and
one short run on the real model (both texts, the verdict, the histogram, the plot, the total time)."""

from __future__ import annotations

import pytest
import torch

from sparsespec_sglang import demo


def test_first_difference_and_verdict():
    decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    assert demo.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert demo.verdict([1, 2, 3], [1, 2, 3], decode) == "verdict: identical: all 3 tokens equal plain decoding's"
    assert demo.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert demo.verdict([1, 2, 3], [1, 5, 3], decode) == (
        "verdict: DIFFERENT: first difference at token 2 of 3 (plain 'c', SPARSESPEC 'f')")
    assert demo.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped earlier
    assert demo.verdict([1, 2], [1, 2, 3], decode).endswith("(plain (ended), SPARSESPEC 'd')")


def test_histogram_has_one_line_per_accepted_count():
    lines = demo.histogram([8, 8, 3, 0], k=8)
    assert len(lines) == 9
    assert lines[8] == "  8 | 2 " + "#" * demo.BAR_WIDTH
    assert lines[3] == "  3 | 1 " + "#" * (demo.BAR_WIDTH // 2)
    assert lines[5] == "  5 | 0"


def test_every_option_has_help_with_its_default():
    for action in demo.build_parser()._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings


@pytest.mark.parametrize("argv, message", [
    (["--sparsespec-sparsity", "0"], "error: SPARSESPEC: --sparsespec-sparsity must be a number in [1e-06, 1] (got 0.0)"),
    (["--speculative-num-steps", "0"], "error: SPARSESPEC: --speculative-num-steps must be an integer in [1, 32] (got 0)"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be an integer >= 1 (got 0)"),
])
def test_a_bad_value_is_one_line_before_anything_loads(capsys, argv, message):
    assert demo.main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_short_run_on_the_real_model(capsys, tmp_path):
    plot = tmp_path / "acceptance.png"
    threads = torch.get_num_threads()
    try:
        rc = demo.main(["--few-shot-tokens", "400", "--max-new-tokens", "24", "--threads", "1",
                        "--plot", str(plot)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "plain greedy decoding (" in out and "SPARSESPEC (" in out
    assert "verdict: identical: all " in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("drafts accepted per cycle (of 8)"))
    assert [line.split("|")[0].strip() for line in lines[start + 1:start + 10]] == [str(m) for m in range(9)]
    assert lines[-1].startswith("time: load the model") and " total " in lines[-1]
    assert plot.stat().st_size > 0
