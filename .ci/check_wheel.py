"""The installed wheel, as a user's SGLang sees it: the plugin entry point is declared, SGLang's own
plugin loader registers SPARSESPEC from it, and the CPU demo module is in it.

Run by .ci/run with the interpreter of a fresh environment that holds the wheel (not the clone) and
from outside the clone, so nothing is imported from the working tree.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution, entry_points
from pathlib import Path

GROUP, NAME, TARGET = "sglang.srt.plugins", "sparsespec", "sparsespec_sglang.plugin:register"


def main() -> int:
    dist = distribution("sparsespec-sglang")
    # An editable install records a direct_url.json pointing at the clone; a wheel install does not.
    if dist.read_text("direct_url.json") and '"editable": true' in dist.read_text("direct_url.json"):
        sys.exit("check_wheel: sparsespec-sglang is an editable install, not the wheel")
    found = [ep for ep in entry_points(group=GROUP) if ep.name == NAME]
    if [ep.value for ep in found] != [TARGET]:
        sys.exit(f"check_wheel: entry point {GROUP}:{NAME} should be {TARGET}, found {[ep.value for ep in found]}")

    import sparsespec_sglang

    where = Path(sparsespec_sglang.__file__).resolve()
    if not where.is_relative_to(Path(sys.prefix).resolve()):
        sys.exit(f"check_wheel: sparsespec_sglang imported from {where}, outside the environment {sys.prefix}")

    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    load_plugins()
    try:
        algo = SpeculativeAlgorithm.from_string("SPARSESPEC")
    except ValueError:
        # SGLang's loader logs a failing plugin and goes on: load it directly for the real error.
        found[0].load()()
        raise
    if algo.name != "SPARSESPEC":
        sys.exit(f"check_wheel: SPARSESPEC resolved to {algo!r}")

    demo = subprocess.run([sys.executable, "-m", "sparsespec_sglang.demo", "--help"], capture_output=True, text=True)
    if demo.returncode != 0 or "--max-new-tokens" not in demo.stdout:
        sys.exit(f"check_wheel: python -m sparsespec_sglang.demo --help failed: {demo.stderr.strip()[-500:]}")
    print(f"check_wheel: {dist.metadata['Name']} {dist.version} from {where.parent}: entry point {GROUP}:{NAME} "
          f"-> {TARGET}; SGLang's load_plugins() registered {algo.name}; the demo module is installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
