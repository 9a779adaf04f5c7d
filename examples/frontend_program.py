"""SGLang frontend-language program against a SPARSESPEC server (gen, select, fork).

    examples/launch_server.sh smollm2-135m 30000 &     # on a CUDA GPU host
    python examples/frontend_program.py --url http://127.0.0.1:30000
"""

import argparse
import sys

import requests
import sglang as sgl


@sgl.function
def reasoning(s, question):
    s += "Question: " + question + "\n"
    s += "Kind: " + sgl.select("kind", choices=["arithmetic", "logic", "trivia"]) + "\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Approach {i + 1}: " + sgl.gen("approach", max_tokens=48, temperature=0.0) + "\n"
    s += "Approaches:\n" + "".join(f["approach"] + "\n" for f in forks)
    s += "Answer: " + sgl.gen("answer", max_tokens=64, temperature=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    try:
        requests.get(f"{args.url}/health", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        print(f"frontend_program.py: no healthy SGLang server at {args.url} ({type(exc).__name__}); start one "
              "with examples/launch_server.sh on a CUDA GPU host", file=sys.stderr)
        return 1
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    states = reasoning.run_batch([{"question": "What is 17 * 23?"},
                                  {"question": "If all A are B and all B are C, are all A C?"}])
    for state in states:
        print("kind:", state["kind"])
        print("answer:", repr(state["answer"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
