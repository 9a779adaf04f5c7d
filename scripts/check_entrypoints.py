"""GPU check: the three entry points run against SPARSESPEC.

1. ``python -m sglang.launch_server ... --speculative-algorithm SPARSESPEC`` (examples/launch_server.sh),
   then the OpenAI-compatible API: completions and chat, each plain and streaming, and the
   Prometheus ``/metrics`` page;
2. ``examples/frontend_program.py`` (sgl.function with gen, select, fork) against that server;
3. ``examples/offline_batch.py`` (sglang.Engine).

    python scripts/check_entrypoints.py --out entrypoints.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


def _stream_text(resp: requests.Response, chat: bool) -> tuple[str, int]:
    text, chunks = "", 0
    for line in resp.iter_lines():
        if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text += (choice.get("delta", {}).get("content") or "") if chat else choice.get("text", "")
        chunks += 1
    return text, chunks


def check_http(url: str) -> dict:
    out = {}
    body = {"model": "default", "max_tokens": 32, "temperature": 0}
    r = requests.post(f"{url}/v1/completions", json={**body, "prompt": "Once upon a time"}, timeout=120)
    r.raise_for_status()
    out["completions"] = {"text": r.json()["choices"][0]["text"], "usage": r.json()["usage"]}
    r = requests.post(f"{url}/v1/completions", json={**body, "prompt": "Once upon a time",
                                                     "stream": True}, stream=True, timeout=120)
    text, chunks = _stream_text(r, chat=False)
    out["completions_stream"] = {"text": text, "chunks": chunks,
                                 "equals_non_stream": text == out["completions"]["text"]}
    messages = [{"role": "user", "content": "Count to five."}]
    r = requests.post(f"{url}/v1/chat/completions", json={**body, "messages": messages}, timeout=120)
    r.raise_for_status()
    out["chat"] = {"text": r.json()["choices"][0]["message"]["content"], "usage": r.json()["usage"]}
    r = requests.post(f"{url}/v1/chat/completions", json={**body, "messages": messages,
                                                          "stream": True}, stream=True, timeout=120)
    text, chunks = _stream_text(r, chat=True)
    out["chat_stream"] = {"text": text, "chunks": chunks,
                          "equals_non_stream": text == out["chat"]["text"]}
    r = requests.post(f"{url}/generate", json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 64, "temperature": 0}}, timeout=120)
    out["native_generate_meta"] = {k: v for k, v in r.json()["meta_info"].items() if k.startswith("spec_")}
    # Enough cycles for the worker's phase-time gauges (refreshed every 16 cycles) to be set.
    r = requests.post(f"{url}/generate", json={"text": ["Hello"] * 8, "sampling_params": {
        "max_new_tokens": 256, "temperature": 0, "ignore_eos": True}}, timeout=300)
    r.raise_for_status()
    metrics = [l for l in requests.get(f"{url}/metrics", timeout=30).text.splitlines()
               if not l.startswith("#")]
    out["metrics_spec_lines"] = [l for l in metrics if l.startswith("sglang:spec")][:12]
    out["metrics_sparsespec_lines"] = [l for l in metrics if l.startswith("sparsespec:")]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--extra", default="", help="extra server flags, space separated")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()

    from sparsespec_sglang.compat import wait_for_http_ready
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / "small", "small"))
    url = f"http://127.0.0.1:{args.port}"
    report: dict = {"command": " ".join(sys.argv)}
    log = open(Path(args.out).with_suffix(".server.log"), "w")
    server = subprocess.Popen(
        ["bash", str(ROOT / "examples/launch_server.sh"), model_dir, str(args.port),
         "--enable-metrics", "--mem-fraction-static", "0.4", *args.extra.split()],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    progress = tqdm(total=4, unit="check", desc="check_entrypoints", disable=args.quiet)
    try:
        progress.set_postfix_str("server starting")
        wait_for_http_ready(f"{url}/health", timeout=400, process=server)
        progress.update()
        progress.set_postfix_str("HTTP API")
        report["http"] = check_http(url)
        progress.update()
        progress.set_postfix_str("frontend program")
        fe = subprocess.run([sys.executable, str(ROOT / "examples/frontend_program.py"), "--url", url],
                            capture_output=True, text=True, timeout=300)
        report["frontend_program"] = {"returncode": fe.returncode, "stdout": fe.stdout[-2000:],
                                      "stderr": fe.stderr[-2000:]}
        progress.update()
    finally:
        server.terminate()
        server.wait(timeout=60)
    progress.set_postfix_str("offline Engine")
    ob = subprocess.run([sys.executable, str(ROOT / "examples/offline_batch.py"), "--model-path", model_dir,
                         "--num-prompts", "4", "--max-new-tokens", "64"],
                        capture_output=True, text=True, timeout=400)
    report["offline_batch"] = {"returncode": ob.returncode, "stdout": ob.stdout[-2000:],
                               "stderr": ob.stderr[-3000:]}
    progress.update()
    progress.close()
    Path(args.out).write_text(json.dumps(report, indent=1))
    ok = (report["frontend_program"]["returncode"] == 0 and ob.returncode == 0
          and len(report["http"]["metrics_sparsespec_lines"]) == 3)
    print(json.dumps(report, indent=1)[:6000])
    print("ENTRYPOINTS OK" if ok else "ENTRYPOINTS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
