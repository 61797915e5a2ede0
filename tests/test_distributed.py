"""Several processes (2 CPU processes, gloo): head training and sampling under accelerate, and what a seed
reproduces across process counts.

`accelerate.debug_launcher` forks the processes; each runs a module-level function below, which writes what it got to
files that the test then reads. One test starts the real command line (`accelerate launch ... -m s2m_diffusers.cli`).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from test_pipeline import FAST, ExactHeads, QuadrantGenerator, gan_pipeline, quadrant_attributes, seeded
from test_training import CountingProposal, _data

from s2m_diffusers.distributed import gather_rows, get_state, image_share, process_generator
from s2m_diffusers.pipeline_s2m import S2MPipeline
from s2m_diffusers.sampling import BudgetExhaustedError
from s2m_diffusers.training import train_heads

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:S2M sampling")  # a few images: the diagnostics may warn
TARGET = "A & ~B"


def _fresh_state():
    """The forked process inherits the parent's accelerate state (one process): start from scratch."""
    AcceleratorState._reset_state(reset_partial_state=True)
    state = get_state()
    torch.set_num_threads(1)  # after the state: accelerate sets the threads of CPU processes from the core count
    return state


def exact_pipeline() -> S2MPipeline:
    pipe = S2MPipeline(heads=ExactHeads(), gan=QuadrantGenerator())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----- what each process runs ---------------------------------------------------------------------------------------


def _train_worker(folder: str, conditional: bool) -> None:
    state = _fresh_state()
    heads, metrics = train_heads(
        _data(),
        CountingProposal(conditional=conditional),
        output_dir=os.path.join(folder, "out"),
        num_steps=4,
        eval_steps=2,
        checkpointing_steps=2,
        cnn_channels=[8],
        num_heldout_samples=16,
        progress=False,
        batch_size=8,
    )
    rank = state.process_index
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, os.path.join(folder, f"heads{rank}.st"))
    record = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "train_time_s"}
    record.update(
        num_processes=state.num_processes,
        proposal_class_probs=heads.config.proposal_class_probs,
    )
    with open(os.path.join(folder, f"metrics{rank}.json"), "w") as f:
        json.dump(record, f)


def _sample_worker(folder: str) -> None:
    state = _fresh_state()
    pipe = exact_pipeline()
    rank = state.process_index
    out = pipe(TARGET, num_images=5, generator=seeded(0), output_type="pt", distributed=True, **FAST)
    listed = pipe(
        TARGET,
        num_images=3,
        generator=[seeded(10 + i) for i in range(3)],
        output_type="pt",
        distributed=True,
        **FAST,
    )
    one = pipe(TARGET, num_images=1, generator=seeded(2), output_type="pt", distributed=True, **FAST)  # 1 idle
    tensors = {
        "one": one.latents,
        "images": out.images,
        "latents": out.latents,
        "on_target": out.on_target.to(torch.uint8),
        "listed": listed.latents,
        "gathered": gather_rows(torch.full((rank + 1, 2), float(rank)), state),  # uneven rows per process
        "gathered_bool": gather_rows(torch.ones(0 if rank else 2, dtype=torch.bool), state),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, f"sample{rank}.st"))
    try:  # a budget below the 4 images asked for: every process raises (none waits forever)
        pipe(TARGET, num_images=4, generator=seeded(0), distributed=True, max_proposals=3, **FAST)
        budget = "returned"
    except BudgetExhaustedError as err:
        budget = str(err)
    stats = out.stats
    with open(os.path.join(folder, f"stats{rank}.json"), "w") as f:
        json.dump({"stats": stats, "budget": budget, "share": list(image_share(5, state))}, f)


# ----- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two forked processes training (about 5 s each)
@pytest.mark.parametrize("conditional", [False, True])
def test_two_process_training_agrees_and_writes_once(tmp_path, conditional):
    debug_launcher(_train_worker, args=(str(tmp_path), conditional), num_processes=2)
    metrics = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in range(2)]
    assert metrics[0]["num_processes"] == metrics[1]["num_processes"] == 2
    assert metrics[0] == metrics[1]  # every process returns the same metrics ...
    a, b = load_file(str(tmp_path / "heads0.st")), load_file(str(tmp_path / "heads1.st"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # ... and the same heads
    for key in ("dv_accuracy", "dv_nll_after", "dr_nll_after", "dr_temperature"):
        assert torch.isfinite(torch.tensor(metrics[0][key])), key
    assert metrics[0]["steps"] == 4
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(
        ["checkpoint-2", "checkpoint-4", "config.json", "diffusion_pytorch_model.safetensors", "metrics.json"]
    )
    # one training state, and one random state per process, in each checkpoint
    files = os.listdir(out / "checkpoint-2")
    assert "s2m_training_state.json" in files and {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
    if conditional:  # the class counts of both processes are summed: 4 steps x 2 processes x 4 + 16 held out
        saved = json.loads((out / "checkpoint-4" / "s2m_training_state.json").read_text())
        assert sum(saved["fake_class_counts"]) == 4 * 2 * 4
        probs = metrics[0]["proposal_class_probs"]
        assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-9


def test_two_process_sampling_gathers_every_image_and_sums_the_statistics(tmp_path):
    debug_launcher(_sample_worker, args=(str(tmp_path),), num_processes=2)
    results = [load_file(str(tmp_path / f"sample{r}.st")) for r in range(2)]
    records = [json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(2)]
    assert [r["share"] for r in records] == [[0, 1, 2], [3, 4]]
    # every process returns the whole, gathered output
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    out = results[0]
    assert out["images"].shape == (5, 1, 8, 8) and out["latents"].shape == (5, 4) and out["on_target"].all()
    present = quadrant_attributes(out["images"] * 2 - 1)
    assert (present[:, 0] & ~present[:, 1]).all()  # exact heads: every image is on target
    assert torch.equal(out["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(out["gathered_bool"], torch.ones(2, dtype=torch.bool))

    # Each process's images are a plain run with its derived generator on its block of images.
    pipe = exact_pipeline()
    parts = []
    for rank, n in ((0, 3), (1, 2)):
        g = process_generator(seeded(0), SimpleNamespace(num_processes=2, process_index=rank))
        parts.append(pipe(TARGET, num_images=n, generator=g, output_type="pt", **FAST))
    assert torch.equal(out["latents"], torch.cat([p.latents for p in parts]))
    stats = records[0]["stats"]
    assert json.dumps(stats) == json.dumps(records[1]["stats"])  # as text: the diagnostics hold NaNs
    assert stats["num_processes"] == 2 and stats["num_images"] == 5 and stats["on_target_images"] == 5
    for key in ("proposals", "accepted", "rounds", "budget_spent"):
        assert stats[key] == sum(p.stats[key] for p in parts), key
    assert stats["proposals_per_image"] == pytest.approx(stats["proposals"] / 5)
    # each process ran its own pool and chains: the record holds both runs, the diagnostics both runs' warnings
    assert [run["num_chains"] for run in stats["chains"]["runs"]] == [p.stats["chains"]["num_chains"] for p in parts]
    assert stats["chains"]["moves"] == sum(p.stats["chains"]["moves"] for p in parts)
    assert len(stats["diagnostics"]["runs"]) == 2 and stats["warnings"] == stats["diagnostics"]["warnings"]
    assert stats["seconds_total"] == pytest.approx(
        stats["seconds_generator"] + stats["seconds_heads"] + stats["seconds_sampler"]
    )
    # More processes than images: process 1 has nothing to do and still takes part.
    g = process_generator(seeded(2), SimpleNamespace(num_processes=2, process_index=0))
    assert torch.equal(out["one"], pipe(TARGET, num_images=1, generator=g, output_type="pt", **FAST).latents)
    # A list of per-image generators gives the same images whatever the number of processes.
    single = pipe(TARGET, num_images=3, generator=[seeded(10 + i) for i in range(3)], output_type="pt", **FAST)
    assert torch.equal(out["listed"], single.latents)
    # The budget ran out on a process: both raised, with the totals.
    for r in records:
        assert r["budget"].startswith("The proposal budget of 3 ran out"), r["budget"]


def test_one_process_distributed_call_equals_the_plain_call():
    pipe = exact_pipeline()
    plain = pipe(TARGET, num_images=3, generator=seeded(3), output_type="pt", **FAST)
    spread = pipe(TARGET, num_images=3, generator=seeded(3), output_type="pt", distributed=True, **FAST)
    assert torch.equal(plain.latents, spread.latents) and spread.stats["num_processes"] == 1
    assert spread.stats["proposals"] == plain.stats["proposals"] and spread.stats["chains"] == plain.stats["chains"]


def test_process_generator_differs_per_process_and_is_reproducible():
    draws = {}
    for rank in range(3):
        g = process_generator(seeded(5), SimpleNamespace(num_processes=3, process_index=rank))
        draws[rank] = torch.rand(4, generator=g)
        again = process_generator(seeded(5), SimpleNamespace(num_processes=3, process_index=rank))
        assert torch.equal(draws[rank], torch.rand(4, generator=again))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    one = seeded(5)
    assert process_generator(one, SimpleNamespace(num_processes=1, process_index=0)) is one


@pytest.mark.slow  # `accelerate launch`: two fresh interpreters
def test_sample_command_under_accelerate_launch(tmp_path):
    folder = tmp_path / "s2m"
    gan_pipeline().save_pretrained(folder)  # classes of the library, which the launched processes can load
    out = tmp_path / "images"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", "0", "-m", "s2m_diffusers.cli", "sample", "--pipeline", str(folder)]
    command += ["--target", TARGET, "--num-images", "5", "--output", str(out), "--quiet"]
    command += ["--negation-margin", "1", "--seed", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 5 images") == 1  # the main process reports and writes
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["num_images"] == 5 and all(stats["on_target"])
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png"] + [
        "grid.png",
        "latents.safetensors",
        "stats.json",
    ]
    assert load_file(str(out / "latents.safetensors"))["latents"].shape == (5, 8)
