"""Runs one sglang.Engine on the CPU and prints its outputs as JSON (a helper of test_cpu_engine.py,
not a test): a process of its own, so SGLang's spawned scheduler starts from a plain script.
Request i arrives ``stagger_s * i`` seconds after the first, so later requests join a running batch.

    python tests/cpu_engine_run.py '{"engine": {...}, "prompts": [[...]], "max_new_tokens": 24, "stagger_s": 0}'
"""

from __future__ import annotations

import asyncio
import json
import sys


async def _generate(engine, spec: dict) -> list[dict]:
    params = {"temperature": 0, "max_new_tokens": spec["max_new_tokens"], "ignore_eos": True}

    async def one(i: int, prompt: list[int]) -> dict:
        await asyncio.sleep(i * spec.get("stagger_s", 0.0))
        return await engine.async_generate(input_ids=prompt, sampling_params=params)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(spec["prompts"]))))


def main() -> None:
    import sglang as sgl

    spec = json.loads(sys.argv[1])
    engine = sgl.Engine(**spec["engine"])
    try:
        outs = asyncio.run(_generate(engine, spec))
    finally:
        engine.shutdown()
    print("RESULT " + json.dumps([{"output_ids": o["output_ids"], "meta_info": o["meta_info"]} for o in outs]))


if __name__ == "__main__":
    main()
