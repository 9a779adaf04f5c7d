"""GPU check: with sampling, SPARSESPEC output follows the same distribution as plain SGLang.

Greedy equality (check_lossless.py) does not cover temperature > 0, where losslessness means
the target distribution is preserved: drafts are the sparse model's argmax and SGLang's
``eagle_sample`` accepts a draft d with probability p(d) and otherwise samples from p with d
removed. This script draws many samples of the first few output tokens of the same prompts
(at T 1.0, at T 0.7 with top-p and top-k, at T 0.8 with min-p) from a plain engine and from
SPARSESPEC engines (sparse drafts, mostly rejected on random weights: the residual path; dense
drafts, mostly accepted: the acceptance path) and compares, for every
prompt, output position and sampling setting, the token counts with a chi-square test of
homogeneity. Verdict: no p-value below ``--alpha`` / number of tests (Bonferroni).

    python scripts/check_sampling.py --out sampling.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from scipy.stats import chi2_contingency
from tqdm import tqdm

SETTINGS = {  # name -> sampling params (besides max_new_tokens)
    "t1.0": {"temperature": 1.0},
    "t0.7-p0.9-k20": {"temperature": 0.7, "top_p": 0.9, "top_k": 20},
    "t0.8-minp0.1": {"temperature": 0.8, "min_p": 0.1},
}


def homogeneity_pvalue(a: Counter, b: Counter, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that two samples of categories share one distribution.

    Categories whose pooled expected count is below ``min_expected`` in either sample are
    merged into one, so the chi-square approximation holds."""
    n_a, n_b = sum(a.values()), sum(b.values())
    total = n_a + n_b
    cells: list[tuple[int, int]] = []
    rare_a = rare_b = 0
    for cat in set(a) | set(b):
        pooled = a[cat] + b[cat]
        if min(n_a, n_b) * pooled / total < min_expected:
            rare_a, rare_b = rare_a + a[cat], rare_b + b[cat]
        else:
            cells.append((a[cat], b[cat]))
    if rare_a + rare_b:
        cells.append((rare_a, rare_b))
    if len(cells) < 2:
        return 1.0
    # Pearson's statistic on the 2 x categories table; no Yates correction (it would make
    # the 2 x 2 case conservative and differ from the test on larger tables).
    return float(chi2_contingency(list(zip(*cells)), correction=False).pvalue)


def _samples(model_dir: str, args: argparse.Namespace, prompts: list[list[int]], progress: tqdm,
             **kwargs) -> dict:
    """{setting: [prompt][position] -> Counter of token ids}; one progress step per (setting, prompt)."""
    import sglang as sgl

    engine = sgl.Engine(model_path=model_dir, dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.3, disable_prefill_cuda_graph=True, log_level="warning",
                        cuda_graph_max_bs_decode=64, max_running_requests=128, **kwargs)
    out: dict = {}
    try:
        for name, params in SETTINGS.items():
            sampling = {**params, "max_new_tokens": args.positions, "ignore_eos": True}
            counts = []
            for prompt in prompts:
                outs = engine.generate(input_ids=[prompt] * args.samples, sampling_params=sampling)
                counts.append([Counter(o["output_ids"][t] for o in outs) for t in range(args.positions)])
                progress.update()
            out[name] = counts
    finally:
        engine.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2000, help="samples per prompt and setting")
    ap.add_argument("--positions", type=int, default=4, help="output positions compared (the first is prefill's)")
    ap.add_argument("--alpha", type=float, default=1e-3, help="family-wise significance level")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.exit(2, "check_sampling.py: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)\n")

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape,
                                   with_weights=True, dtype="bfloat16"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))] for _ in range(args.num_prompts)]

    runs = {"sparsespec-s0.05": dict(sparsespec_sparsity=0.05), "sparsespec-dense": dict(sparsespec_sparsity=1.0)}
    progress = tqdm(total=(1 + len(runs)) * len(SETTINGS) * len(prompts), unit="batch",
                    desc=f"check_sampling ({args.samples} samples each)", disable=args.quiet)
    base = _samples(model_dir, args, prompts, progress, attention_backend="triton")
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "shape": args.shape,
              "samples": args.samples, "settings": SETTINGS, "runs": {}}
    pvalues = []
    for run, extra in runs.items():
        spec = _samples(model_dir, args, prompts, progress, speculative_algorithm="SPARSESPEC",
                        speculative_num_steps=8, **extra)
        rows = []
        for setting in SETTINGS:
            for i in range(len(prompts)):
                for t in range(args.positions):
                    p = homogeneity_pvalue(base[setting][i][t], spec[setting][i][t])
                    pvalues.append(p)
                    rows.append({"setting": setting, "prompt": i, "position": t, "pvalue": p,
                                 "distinct_tokens": len(base[setting][i][t] | spec[setting][i][t])})
        report["runs"][run] = {"min_pvalue": min(r["pvalue"] for r in rows), "tests": rows}
        tqdm.write(f"{run} min p-value {report['runs'][run]['min_pvalue']:.3g}")
    progress.close()
    threshold = args.alpha / len(pvalues)
    report["bonferroni_threshold"] = threshold
    # Power: the same test must tell plain decoding's two settings apart at the first
    # speculative position, or "no difference found" means nothing.
    first, second = list(SETTINGS)[:2]
    position = min(1, args.positions - 1)
    report["power_check_pvalue"] = homogeneity_pvalue(base[first][0][position], base[second][0][position])
    report["preserved"] = min(pvalues) >= threshold and report["power_check_pvalue"] < threshold
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("DISTRIBUTION-PRESERVED" if report["preserved"] else "DISTRIBUTION-DIFFERS", flush=True)
    return 0 if report["preserved"] else 1


if __name__ == "__main__":
    sys.exit(main())
