"""Runs one sglang.Engine on the CPU and prints its outputs as JSON (a helper of test_cpu_engine.py,
not a test): a process of its own, so SGLang's spawned scheduler starts from a plain script.

    python tests/cpu_engine_run.py '{"engine": {...}, "prompts": [[...]], "max_new_tokens": 24}'
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import sglang as sgl

    spec = json.loads(sys.argv[1])
    engine = sgl.Engine(**spec["engine"])
    try:
        outs = engine.generate(input_ids=spec["prompts"], sampling_params={
            "temperature": 0, "max_new_tokens": spec["max_new_tokens"], "ignore_eos": True})
    finally:
        engine.shutdown()
    print("RESULT " + json.dumps([{"output_ids": o["output_ids"], "meta_info": o["meta_info"]} for o in outs]))


if __name__ == "__main__":
    main()
