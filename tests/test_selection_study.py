"""scripts/selection_study.py: per-prompt pairing, loop split and refusals, on hand-made reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import selection_study as S  # noqa: E402

sys.path.pop(0)


def _point(policy: str, per_prompt: list[float], min_selected: int = 64, lossless: bool = True) -> dict:
    return {"label": f"min_sel={min_selected}+policy={policy}", "policy": policy, "min_selected": min_selected,
            "temperature": 0.0, "lossless": lossless, "mean_accepted": sum(per_prompt) / len(per_prompt),
            "num_cycles": 10 * len(per_prompt), "mean_accepted_per_prompt": per_prompt,
            "by_position": [{"start": 0, "mean_accepted": 1.0}]}


def _report(points: list[dict], repetition: list[float]) -> dict:
    return {"prompts": [f"p{i}" for i in range(len(repetition))], "plain_repeated_4gram_share": repetition,
            "num_prompts": len(repetition), "prompt_lens": [100] * len(repetition), "max_new_tokens": 64,
            "model_type": "llama", "dtype": "float32", "device": "cpu", "prompt_source": {}, "results": points}


def test_paired_counts_and_loop_split():
    report = _report([_point("pillar", [5.0, 5.0, 4.0, 6.0]), _point("window", [4.0, 5.02, 6.0, 3.0]),
                      _point("hybrid:0.5", [9.0, 9.0, 9.0, 9.0], lossless=False)],
                     repetition=[0.1, 0.2, 0.9, 0.6])
    res = S.analyse(report, loop_threshold=0.5, tie=0.05)
    assert res["looping"] == [False, False, True, True]
    assert res["skipped_points"] == ["min_sel=64+policy=hybrid:0.5"]  # not lossless: left out
    floor = res["floors"]["64"]
    assert set(floor["policies"]) == {"pillar", "window"}
    w = floor["paired"]["window vs pillar (all)"]
    assert (w["wins"], w["ties"], w["losses"]) == (1, 1, 2) and w["n"] == 4
    assert w["mean_diff"] == pytest.approx((-1.0 + 0.02 + 2.0 - 3.0) / 4)
    assert floor["paired"]["window vs pillar (non-looping)"]["n"] == 2
    loop = floor["paired"]["window vs pillar (looping)"]
    assert (loop["wins"], loop["losses"]) == (1, 1)
    assert floor["policies"]["pillar"]["looping"]["mean_of_prompts"] == pytest.approx(5.0)
    assert floor["paired"]["pillar vs window (all)"]["losses"] == 1


def test_cli_writes_tables_and_refuses_old_files(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_report([_point("pillar", [5.0, 6.0]), _point("window", [4.0, 4.5])], [0.0, 0.0])))
    out, md = tmp_path / "a.json", tmp_path / "a.md"
    assert S.main([str(f), "--out", str(out), "--markdown", str(md)]) == 0
    assert "| window vs pillar (all) | 0 / 0 / 2 |" in md.read_text()
    assert json.loads(out.read_text())["files"]["r.json"]["floors"]["64"]["paired"]
    old = tmp_path / "old.json"
    report = _report([_point("pillar", [5.0])], [0.0])
    del report["plain_repeated_4gram_share"]
    old.write_text(json.dumps(report))
    assert S.main([str(old)]) == 2
    assert "plain_repeated_4gram_share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        S.main([str(f), "--loop-threshold", "0"])
