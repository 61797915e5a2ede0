"""What the benchmarks share: the official recipe's weights, the previous sampler's checkout, formatting.

- The official recipe (`official_evaluate`, `OFFICIAL_STEPS`, the hand-set gammas and ``D_r`` temperatures): the
  weights of the official S2M code, used by `bench_7to3.py`, `bench_scaling.py` and `bench_reading.py`.
- The previous default sampler (`previous_checkout`, `run_previous`): the sampler before issue 27 (latent refitting,
  the worst-case bound) is run from its own commit, `PREVIOUS_COMMIT`, checked out once as a detached git worktree in
  `benchmarks/.previous/<commit>/` (git-ignored). Its own benchmark scripts run there in a subprocess, with
  ``PYTHONPATH`` the worktree and the worktree as working directory, so that they import the old package (and its
  `benchmarks/pretrained_roots.py`); their JSON rows come back to the caller.
- Formatting: `fmt`, `mean`, `spread` (mean ± sd over seeds), `verdict`, `short_warning`.
- `earlier_rows`: the baselines' rows of an earlier run's JSON (``--baselines-from``), for a run of our sampler alone
  whose tables still show them side by side; each such row is marked with its file (``"from"``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from s2m_diffusers.maths import log_p_data, log_weight
from s2m_diffusers.targets import Target

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ----------------------------------------------------------------------------------------------------------------
# The official recipe

# The official code's D_r temperature by the number of present attributes of the target.
OFFICIAL_TEMPERATURES = {1: 1.2, 2: 1.0, 3: 0.2}
OFFICIAL_GAMMA_PRESENT, OFFICIAL_GAMMA_ABSENT = 0.1, 1.0
# IMH steps of each chain: 201 generator calls per returned image.
OFFICIAL_STEPS = 200


def official_evaluate(heads, proposal, target: Target, micro_batch_size: int = 256, many: float | None = None):
    """``evaluate(z) -> (x, log_w)`` with the official recipe's weights (hand-set gammas, temperature, margin 1).

    Args:
        heads (`S2MHeads`): the heads.
        proposal (`ProposalAdapter`): an unconditional proposal (`pipe.get_proposal()`, `GeneratorProposal`).
        target (`Target`): a conjunction over the heads' attributes.
        micro_batch_size (`int`, defaults to 256): latents per generator and heads call.
        many (`float`, *optional*): the temperature for more than 3 present attributes, which the official
            scripts do not have (an error when `None`).

    Returns:
        `Callable`: the evaluate function of `sample_official`; images in [-1, 1].
    """
    names = list(heads.config.attribute_names)
    present = set(target.present)
    gammas = torch.tensor(
        [OFFICIAL_GAMMA_PRESENT if n in present else OFFICIAL_GAMMA_ABSENT for n in names], dtype=torch.float64
    )
    log_data = log_p_data(heads.config.label_counts, len(names))
    log_priors = gammas.log() + log_data
    temperature = OFFICIAL_TEMPERATURES.get(len(present), many)
    if temperature is None:
        raise ValueError(f"The official recipe has temperatures for 1-3 present attributes; {target} has {present}.")

    @torch.no_grad()
    def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, weights = [], []
        for chunk in z.split(micro_batch_size):
            x = proposal.generate(chunk)
            out = heads(x)
            images.append(x)
            weights.append(
                log_weight(
                    target,
                    out.dr_log_probs,
                    out.dv_logit,
                    log_data,
                    log_priors,
                    negation_margin=1.0,
                    dr_temperature=temperature,
                )
            )
        return torch.cat(images), torch.cat(weights)

    return evaluate


# ----------------------------------------------------------------------------------------------------------------
# The previous default sampler, from its own commit

# The last commit whose default sampler refitted the latent prior (issue 27 replaced it by local chains).
PREVIOUS_COMMIT = "e5ce922"
PREVIOUS_ROOT = os.path.join(HERE, ".previous")  # git-ignored (benchmarks/.gitignore)


def previous_checkout(commit: str = PREVIOUS_COMMIT) -> str:
    """The folder of a detached git worktree of ``commit`` (`benchmarks/.previous/<commit>/`), made on first use;
    several benchmarks starting at once take turns through a lock file."""
    import fcntl

    path = os.path.join(PREVIOUS_ROOT, commit.replace("/", "_"))
    os.makedirs(PREVIOUS_ROOT, exist_ok=True)
    with open(os.path.join(PREVIOUS_ROOT, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(os.path.join(path, "s2m_diffusers")):
            if os.path.exists(path):
                raise RuntimeError(
                    f"{path} exists but holds no checkout: remove it and run `git worktree prune`, then try again."
                )
            subprocess.run(
                ["git", "-C", REPO, "worktree", "add", "--detach", path, commit],
                check=True,
                capture_output=True,
                text=True,
            )
    return path


def run_previous(
    argv: Sequence[str],
    commit: str = PREVIOUS_COMMIT,
    show: Callable[[str], bool] | None = None,
    output_flag: str = "--json",
    read: Callable[[str], Any] | None = None,
) -> Any:
    """Run ``python argv`` in the previous checkout (``argv[0]``, a script, relative to the worktree or absolute) with
    ``output_flag PATH`` appended, and return what it wrote there: JSON, or what ``read(PATH)`` returns.

    The subprocess imports the old package: ``PYTHONPATH`` is the worktree, and so is its working directory. Its
    standard output lines for which ``show(line)`` holds are printed as they come (its progress rows), prefixed with
    the commit; on failure its standard error's end is in the raised `RuntimeError`.
    """
    path = previous_checkout(commit)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "stderr.txt")
        with open(err, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, *argv, output_flag, out],
                cwd=path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            for line in proc.stdout:
                if show is not None and show(line):
                    print(f"  [{commit}] {line.rstrip()}", flush=True)
            code = proc.wait()
        if code != 0 or not os.path.isfile(out):
            with open(err) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"The previous sampler ({commit}: {' '.join(argv)}) failed with code {code}:\n{tail}")
        if read is not None:
            return read(out)
        with open(out) as f:
            return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def sample_quietly(pipe, target: str, num_images: int, generator: torch.Generator, **settings: Any):
    """``pipe(target, ...)`` returning tensors and allowing a partial result, with the sampler's diagnostic warnings
    silenced: the benchmarks record them in their rows instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="S2M sampling")
        return pipe(
            target, num_images=num_images, generator=generator, output_type="pt", allow_partial=True, **settings
        )


def earlier_rows(path: str, keep: Callable[[dict], bool], num_images: int, what: str) -> list[dict]:
    """The rows of the JSON file ``path`` that ``keep`` selects, each marked ``"from": <file name>``; raises where
    one was asked for another number of images than ``num_images``. ``what`` names them in the printed line."""
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    rows = [{**r, "from": os.path.basename(path)} for r in earlier if keep(r)]
    if any(r["num_images_asked"] != num_images for r in rows):
        raise ValueError(f"{path} holds rows of another --num-images than {num_images}.")
    print(f"{what} rows from {path} ({len(rows)} rows)", flush=True)
    return rows


def short_warning(warning: str) -> str:
    """A sampler warning's figures without its explanation (nested R-hat's is the same text on every call)."""
    return warning.split(" is above the authors' threshold")[0]


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (whole numbers from ``10^digits`` on); `-` for `None`, nan or
    infinity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 10**digits:  # no exponent for counts
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def mean(values: Sequence[float | None]) -> float:
    """The mean of the values that are not `None` (nan when there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def spread(values: Sequence[float | None], digits: int = 3) -> str:
    """`mean` or `mean ± sd` (over seeds) of the values that are not `None`; `-` when there are none."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return fmt(mean(values), digits)
    m = mean(values)
    if not math.isfinite(m):
        return fmt(m, digits)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt(m, digits)} ± {fmt(sd, 2)}"


def verdict(met: bool | None) -> str:
    """``met``, ``NOT met``, or ``n/a`` (`None`: the run lacks the cells the goal needs)."""
    return "n/a" if met is None else ("met" if met else "**NOT met**")
