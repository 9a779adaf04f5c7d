"""SGLang frontend-language program against a SPARSESPEC server (gen, select, fork).

    examples/launch_server.sh MODEL_DIR 30000 &
    python examples/frontend_program.py --url http://127.0.0.1:30000
"""

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    states = reasoning.run_batch([{"question": "What is 17 * 23?"},
                                  {"question": "If all A are B and all B are C, are all A C?"}])
    for state in states:
        print("kind:", state["kind"])
        print("answer:", repr(state["answer"]))


if __name__ == "__main__":
    main()
