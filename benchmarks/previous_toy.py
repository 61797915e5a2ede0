"""The previous default sampler on the analytic toy: run by `bench_toy.py` inside the previous checkout.

`bench_toy.py` runs this file with ``PYTHONPATH`` the checkout of `common.PREVIOUS_COMMIT` (e5ce922), so that
``s2m_diffusers`` is the old package: its `sample_s2m` at its defaults (sequential latent refitting over the
target's stages, the worst-case bound, 8 samples per chain), called as that commit's `benchmarks/bench_toy.py` calls
it (its method ``ours``: ``sample_s2m(problem.stage_evaluates(target), prior, n, generator=g)``). It imports nothing
from the current package and scores nothing: it writes every call's samples and generator calls as JSON, which
`bench_toy.py` scores with the current package, as it scores the other methods.

    PYTHONPATH=<checkout> python previous_toy.py --targets "A & B" --num-samples 1000 --repeats 3 --calls 150 \\
        --call-size 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from s2m_diffusers.densities import StandardNormal
from s2m_diffusers.sampling import sample_s2m
from s2m_diffusers.testing.toy import ToyProblem


def call(problem: ToyProblem, target: str, n: int, seed: int) -> dict:
    """One call of the old default for ``n`` samples: the samples, its generator calls, its seconds."""
    start = time.perf_counter()
    result = sample_s2m(
        problem.stage_evaluates(target), StandardNormal((2,)), n, generator=torch.Generator().manual_seed(seed)
    )
    seconds = time.perf_counter() - start
    return {"x": result.x.double().tolist(), "proposals": int(result.stats.proposals), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--num-samples", type=int, default=1000, help="samples of each repeat")
    parser.add_argument("--repeats", type=int, default=3, help="calls of --num-samples, seeds 0, 1, ...")
    parser.add_argument("--calls", type=int, default=150, help="independent calls for the exactness test")
    parser.add_argument("--call-size", type=int, default=100, help="samples of each of those calls")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = ToyProblem()
    out = {}
    for target in args.targets:
        repeats = [call(problem, target, args.num_samples, r) for r in range(args.repeats)]
        calls = [call(problem, target, args.call_size, r) for r in range(args.calls)]  # seeds as `calls_test`
        out[target] = {"repeats": repeats, "calls": calls}
        seconds = sum(c["seconds"] for c in repeats + calls)
        print(f"previous {target}: {len(repeats)} repeats and {len(calls)} calls in {seconds:.1f} s", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
