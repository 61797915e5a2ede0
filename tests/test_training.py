import json
import os

import pytest
import torch
from PIL import Image

from s2m_diffusers.calibration import expected_calibration_error, fit_temperature, head_metrics, nll
from s2m_diffusers.data import SinglePositiveDataset, prepare_images
from s2m_diffusers.priors import estimate_log_gamma, estimate_priors
from s2m_diffusers.training import augment_images, sample_bank, train_heads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = {"cnn_channels": [8], "num_heldout_samples": 16, "progress": False, "batch_size": 8}


def _data(n: int = 48) -> SinglePositiveDataset:
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(n) % 3
    images[:, :, :3, :3] = (labels.float() - 1).view(-1, 1, 1, 1)
    return SinglePositiveDataset(images, labels, ["a", "b", "c"])


class CountingProposal:
    """Uniform noise in [-0.8, 0.8]; counts calls; optionally class-conditional."""

    def __init__(self, conditional: bool = False):
        self.calls, self.conditional = 0, conditional

    def __call__(self, n, generator):
        self.calls += 1
        images = torch.rand(n, 1, 8, 8, generator=generator) * 1.6 - 0.8
        if self.conditional:
            return images, torch.randint(3, (n,), generator=generator)
        return images


def test_calibration_lowers_nll_on_an_overconfident_case():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator).squeeze(1)
    overconfident = 4.0 * true_logits
    temperature = fit_temperature(overconfident, labels)
    assert 3.3 < temperature < 4.7
    metrics = head_metrics(overconfident, labels, temperature)
    assert metrics["nll_after"] < metrics["nll_before"] - 0.3
    assert metrics["ece_after"] < 0.5 * metrics["ece_before"]
    # Binary case with weights (as D_v: real and generated weighted equally).
    z = torch.randn(3000, generator=generator) * 2
    y = torch.bernoulli(torch.sigmoid(z), generator=generator).long()
    w = torch.where(y == 1, 2.0, 1.0)
    t = fit_temperature(3 * z, y, w)
    assert nll(3 * z / t, y, w) < nll(3 * z, y, w)


def test_ece_of_perfect_calibration_is_small_and_of_a_wrong_one_large():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(20000, generator=generator) * 2
    y = torch.bernoulli(torch.sigmoid(z), generator=generator).long()
    assert expected_calibration_error(z, y) < 0.02
    assert expected_calibration_error(5 * z, y) > 0.1


def test_estimate_priors_recovers_gamma_ratios():
    # Images holding {a, b}, {b, c} or {a, b, c}; exact D_r(c|x) = gamma_c^-1 / sum over S(x) of gamma^-1.
    gamma = torch.tensor([1.0, 2.0, 0.5])
    sets = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.bool).repeat(10, 1)
    weights = torch.where(sets, 1 / gamma, torch.zeros(()))
    dr = weights / weights.sum(1, keepdim=True)
    log_gamma, report = estimate_log_gamma(dr.clamp_min(1e-9).log())
    torch.testing.assert_close(log_gamma - log_gamma.mean(), gamma.log() - gamma.log().mean(), atol=1e-5, rtol=0)
    assert report["identified"] == [True, True, True] and report["residual_rms"] < 1e-6
    priors, _ = estimate_priors(dr.clamp_min(1e-9).log(), [10, 20, 30])
    ratios = torch.tensor(priors) / torch.tensor([10.0, 20.0, 30.0])
    torch.testing.assert_close(ratios / ratios[0], gamma / gamma[0], atol=1e-5, rtol=0)
    # An attribute never sharing mass with another is not identified and keeps gamma = 1.
    sharp = torch.eye(3)[torch.arange(30) % 3] * 0.98 + 0.01
    _, report = estimate_log_gamma(sharp.log())
    assert report["identified"] == [False, False, False]


def test_augment_images_keeps_shape_and_range():
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    out = augment_images(images, ("shift", "flip", "noise", "blur", "contrast"), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="Unknown augmentations"):
        augment_images(images, ("rotate",), torch.Generator())


def test_train_heads_is_reproducible_and_reports_metrics():
    data = _data()
    heads1, metrics = train_heads(data, CountingProposal(), num_steps=4, eval_steps=2, **SMALL)
    heads2, _ = train_heads(data, CountingProposal(), num_steps=4, eval_steps=2, **SMALL)
    for (k, a), b in zip(heads1.state_dict().items(), heads2.state_dict().values()):
        # Temperatures of 4-step heads sit on a flat NLL (logits near 0): compare the trained weights.
        assert k.endswith("_temperature") or torch.equal(a, b), k
    for h in ("dv", "dr"):
        for key in ("accuracy", "nll_before", "nll_after", "ece_before", "ece_after", "temperature", "best_step"):
            assert f"{h}_{key}" in metrics
        assert metrics[f"{h}_nll_after"] <= metrics[f"{h}_nll_before"] + 1e-9
    assert "df_accuracy" not in metrics and len(metrics["priors"]) == 3 and "priors_report" in metrics
    heads3, _ = train_heads(data, CountingProposal(), num_steps=4, eval_steps=2, seed=1, **SMALL)
    assert not torch.equal(heads3.dr_head.weight, heads1.dr_head.weight)


def test_user_priors_and_margin_are_stored():
    heads, metrics = train_heads(
        _data(), CountingProposal(), num_steps=1, priors=[0.2, 0.3, 0.5], negation_margin=5.0, **SMALL
    )
    assert heads.priors == [0.2, 0.3, 0.5] and metrics["priors"] == [0.2, 0.3, 0.5] and heads.negation_margin == 5.0


def test_conditional_proposal_trains_df():
    heads, metrics = train_heads(_data(), CountingProposal(conditional=True), num_steps=2, **SMALL)
    assert heads.conditional and "df_ece_after" in metrics
    assert sum(heads.config.proposal_class_probs) == pytest.approx(1.0)


def test_resume_continues_from_the_saved_step(tmp_path):
    data = _data()
    full, _ = train_heads(
        data, CountingProposal(), num_steps=6, eval_steps=2, output_dir=tmp_path / "a", checkpointing_steps=3, **SMALL
    )
    assert sorted(os.listdir(tmp_path / "a")).count("checkpoint-3") == 1
    state = json.loads((tmp_path / "a" / "checkpoint-3" / "s2m_training_state.json").read_text())
    assert state["step"] == 3

    first = CountingProposal()
    train_heads(data, first, num_steps=3, eval_steps=2, output_dir=tmp_path / "b", checkpointing_steps=3, **SMALL)
    second = CountingProposal()
    resumed, metrics = train_heads(
        data,
        second,
        num_steps=6,
        eval_steps=2,
        output_dir=tmp_path / "b",
        resume_from_checkpoint="latest",
        checkpointing_steps=3,
        **SMALL,
    )
    assert metrics["steps"] == 6
    assert second.calls == 1 + 3  # the held-out draw and steps 4..6 only
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        if not k.endswith("_temperature"):  # see above
            torch.testing.assert_close(a, b, msg=k)
    assert (tmp_path / "b" / "checkpoint-6").is_dir()
    assert (tmp_path / "b" / "config.json").exists() and (tmp_path / "b" / "metrics.json").exists()
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        train_heads(
            data, CountingProposal(), num_steps=2, output_dir=tmp_path / "c", resume_from_checkpoint="latest", **SMALL
        )


def test_folder_of_generated_samples_as_proposal(tmp_path):
    for i in range(10):
        Image.new("L", (8, 8), 20 * i).save(tmp_path / f"{i}.png")
    heads, metrics = train_heads(_data(), tmp_path, num_steps=2, **SMALL)
    assert metrics["steps"] == 2 and not heads.conditional


def test_gradient_accumulation_and_mixed_precision_pass_through():
    from accelerate.state import AcceleratorState

    # accelerate fixes the precision once per process: reset its state around this test.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        heads, metrics = train_heads(
            _data(), CountingProposal(), num_steps=2, gradient_accumulation_steps=2, mixed_precision="bf16", **SMALL
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert metrics["steps"] == 2


def test_bad_proposals_are_errors():
    with pytest.raises(ValueError, match=r"expected images \(16, 1, 8, 8\)"):
        train_heads(_data(), lambda n, g: torch.zeros(n, 3, 8, 8), num_steps=1, **SMALL)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        train_heads(_data(), lambda n, g: torch.full((n, 1, 8, 8), 255.0), num_steps=1, **SMALL)
    with pytest.raises(ValueError, match="must lie in \\[0, 2\\]"):
        train_heads(_data(), lambda n, g: (torch.zeros(n, 1, 8, 8), torch.full((n,), 7)), num_steps=1, **SMALL)


def test_dv_auxiliary_classifier_trains_dv_backbone_only_in_training():
    heads, _ = train_heads(_data(), CountingProposal(), num_steps=3, dv_auxiliary_classifier=True, **SMALL)
    assert heads.dv_aux_head is not None and heads.dv_aux_head.weight.shape == (3, 8)
    assert set(heads.raw_logits(_data().images[:2], heads=["dv_aux"])) == {"dv_aux"}
    assert heads(_data().images[:2]).df_log_probs is None  # forward is unchanged
    with pytest.raises(ValueError, match="does not exist"):
        heads.raw_logits(_data().images[:2], heads=["df"])


def test_larger_proposal_images_are_downscaled_to_the_data_size():
    """A large generator: the heads are trained (and later sample) on downscaled copies of its images."""
    seen = []

    def large(n, generator):
        images = torch.rand(n, 1, 16, 16, generator=generator) * 1.6 - 0.8
        seen.append(images.shape[-1])
        return images

    heads, metrics = train_heads(_data(), large, num_steps=2, **SMALL)
    assert set(seen) == {16} and heads.config.sample_size == 8 and metrics["steps"] == 2
    with pytest.raises(ValueError, match=r"larger images with the same channels are downscaled"):
        train_heads(_data(), lambda n, g: torch.zeros(n, 1, 4, 4), num_steps=1, **SMALL)


class Killed(RuntimeError):
    pass


class KilledProposal(CountingProposal):
    """A run that dies at its `kill_at`-th proposal draw (the first is the held-out draw, then one per step)."""

    def __init__(self, kill_at: int):
        super().__init__()
        self.kill_at = kill_at

    def __call__(self, n, generator):
        if self.calls + 1 == self.kill_at:
            raise Killed(f"killed at draw {self.kill_at}")
        return super().__call__(n, generator)


def test_a_killed_run_with_a_learning_rate_schedule_resumes_exactly(tmp_path):
    data = _data()
    settings = {"num_steps": 6, "eval_steps": 2, "checkpointing_steps": 3, "lr_scheduler": "cosine", **SMALL}
    settings["lr_warmup_steps"] = 2
    full, _ = train_heads(data, CountingProposal(), output_dir=tmp_path / "a", **settings)
    constant, _ = train_heads(data, CountingProposal(), num_steps=6, eval_steps=2, **SMALL)
    assert not torch.equal(full.dr_head.weight, constant.dr_head.weight)  # the schedule changes the run

    with pytest.raises(Killed):  # dies in step 5, after checkpoint-3
        train_heads(data, KilledProposal(kill_at=1 + 5), output_dir=tmp_path / "b", **settings)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3"]
    saved_schedule = torch.load(tmp_path / "b" / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert saved_schedule["last_epoch"] == 3  # the schedule is saved with the checkpoint
    resumed, metrics = train_heads(
        data, CountingProposal(), output_dir=tmp_path / "b", resume_from_checkpoint="latest", **settings
    )
    assert metrics["steps"] == 6
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        if not k.endswith("_temperature"):  # see test_train_heads_is_reproducible_and_reports_metrics
            torch.testing.assert_close(a, b, msg=k, rtol=0, atol=0)

    # a decaying schedule depends on the number of steps: resuming it with another number is refused
    with pytest.raises(ValueError, match=r"training\.lr_num_training_steps: 6 in the checkpoint, 8 now"):
        train_heads(
            data,
            CountingProposal(),
            output_dir=tmp_path / "b",
            resume_from_checkpoint="latest",
            **{**settings, "num_steps": 8},
        )


def test_learning_rate_schedule_is_logged_to_the_tracker_in_logging_dir(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    import s2m_diffusers.training as training

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True

        def __init__(self):
            super().__init__()
            self.logs = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

    logging_dirs = []

    class RecordingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            logging_dirs.append(self.logging_dir)

    monkeypatch.setattr(training, "Accelerator", RecordingAccelerator)
    recorder = Recorder()
    train_heads(
        _data(),
        CountingProposal(),
        num_steps=4,
        eval_steps=4,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        report_to=recorder,
        output_dir=tmp_path,
        logging_dir="logs",
        **SMALL,
    )
    # linear warm-up over 2 steps, then linear decay to 0 at step 4 (the rate after each step)
    assert [logs["lr"] for step, logs in recorder.logs if "lr" in logs] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    assert logging_dirs == [os.path.join(str(tmp_path), "logs")]
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        train_heads(_data(), CountingProposal(), num_steps=1, lr_scheduler="cosin", **SMALL)
    with pytest.raises(ValueError, match="has no effect with lr_scheduler='constant'; use 'constant_with_warmup'"):
        train_heads(_data(), CountingProposal(), num_steps=1, lr_warmup_steps=5, **SMALL)


# ----- the sample bank: drawn once, with a progress bar, shared by the processes ------------------------------------


def _bank_proposals():
    """A tiny DDIM proposal (micro-batches of 3), a class-conditional GAN (micro-batches of 3), a plain callable."""
    from diffusers import DDPMScheduler, UNet2DModel

    from s2m_diffusers.models.gan import DCGANGenerator
    from s2m_diffusers.proposals import DDIMProposal, GeneratorProposal

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
    )
    gan = DCGANGenerator(latent_dim=8, sample_size=8, out_channels=1, base_channels=8, num_classes=3)
    return {
        "ddim": DDIMProposal(unet, DDPMScheduler(), num_inference_steps=2, micro_batch_size=3),
        "gan": GeneratorProposal(gan, micro_batch_size=3),
        "callable": CountingProposal(conditional=True),
    }


def _as_pair(drawn):
    return drawn if isinstance(drawn, tuple) else (drawn, None)


@pytest.mark.parametrize("kind", ["ddim", "gan", "callable"])
def test_sample_bank_keeps_the_proposals_random_stream_with_and_without_a_progress_bar(kind):
    proposal = _bank_proposals()[kind]
    # what `sample_bank` drew before it had a progress bar: one call of the proposal, then the heads' format
    images, labels = _as_pair(proposal(8, torch.Generator().manual_seed(1 + 12345)))
    expected = prepare_images(images, 4, 1)
    for progress in (True, False):
        bank = sample_bank(proposal, 8, seed=1, sample_size=4, in_channels=1, progress=progress)
        assert torch.equal(bank.images, expected)
        assert (bank.class_labels is None) == (labels is None)
        assert labels is None or torch.equal(bank.class_labels, labels)
    plain = sample_bank(proposal, 8, seed=1, progress=False)  # no downscaling
    assert torch.equal(plain.images, images)


def test_sample_bank_progress_bar_counts_the_images(capsys):
    sample_bank(_bank_proposals()["gan"], 8, seed=1, progress=True)
    assert "drawing the sample bank" in capsys.readouterr().err
    sample_bank(_bank_proposals()["gan"], 8, seed=1, progress=False)
    assert "drawing the sample bank" not in capsys.readouterr().err


def _bank_worker(folder: str) -> None:
    from accelerate.state import AcceleratorState

    from s2m_diffusers.distributed import get_state

    AcceleratorState._reset_state(reset_partial_state=True)  # the forked process inherits one process's state
    state = get_state()
    torch.set_num_threads(1)
    proposals = _bank_proposals()
    gan_calls = []
    proposals["gan"].model.register_forward_hook(lambda module, args, output: gan_calls.append(len(output)))
    tensors = {}
    for kind, proposal in proposals.items():
        bank = sample_bank(proposal, 8, seed=1, sample_size=4, in_channels=1, progress=False)
        tensors[f"{kind}_images"] = bank.images
        if bank.class_labels is not None:
            tensors[f"{kind}_labels"] = bank.class_labels
    tensors["callable_calls"] = torch.tensor([proposals["callable"].calls])
    tensors["gan_calls"] = torch.tensor(gan_calls)  # the micro-batches this process generated
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, f"bank{state.process_index}.st"))


def test_sample_bank_is_drawn_once_and_shared_by_two_processes(tmp_path):
    from accelerate import debug_launcher
    from safetensors.torch import load_file

    # 8 images in micro-batches of 3: process 0 draws micro-batches 0 and 2, process 1 micro-batch 1 (and no rows in
    # the last round)
    debug_launcher(_bank_worker, args=(str(tmp_path),), num_processes=2)
    banks = [load_file(str(tmp_path / f"bank{rank}.st")) for rank in range(2)]
    for key in banks[0]:
        if not key.endswith("_calls"):
            assert torch.equal(banks[0][key], banks[1][key]), key  # every process holds the same bank ...
    # ... the one a single process draws
    for kind, proposal in _bank_proposals().items():
        single = sample_bank(proposal, 8, seed=1, sample_size=4, in_channels=1, progress=False)
        assert torch.allclose(banks[0][f"{kind}_images"], single.images, atol=1e-6), kind
        labels = banks[0].get(f"{kind}_labels")
        assert (labels is None) == (single.class_labels is None), kind
        assert labels is None or torch.equal(labels, single.class_labels), kind
    assert banks[0]["gan_calls"].tolist() == [3, 2] and banks[1]["gan_calls"].tolist() == [3]  # each drew its share
    # a plain callable runs on the main process only
    assert [int(b["callable_calls"]) for b in banks] == [1, 0]
