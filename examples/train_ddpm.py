#!/usr/bin/env python
"""Train a small DDPM (`diffusers.UNet2DModel`) on Digits-7to3 and save it as a `DDPMPipeline` folder.

As shipped in `s2m_diffusers/demo/pretrained/digits7to3/ddpm`:

    python examples/train_ddpm.py --output_dir s2m_diffusers/demo/pretrained/digits7to3/ddpm

Follows diffusers' `examples/unconditional_image_generation/train_unconditional.py`: epsilon prediction, MSE loss,
AdamW with warmup and cosine decay, gradient clipping, an EMA of the weights (saved instead of the raw weights).
The scheduler is saved with `clip_sample=False` so that DDIM with eta = 0 is a clean deterministic map from the
initial noise to the image (and DDIM inversion round-trips). The timestep spacing stays diffusers' default
`"leading"` (25 DDIM steps start at t = 960): with the cosine schedule the last timestep has alpha_bar ~ 0, where
"trailing" spacing makes the first epsilon -> x_0 step blow up (the samples were noise). Load it offline with
`DDPMPipeline.from_pretrained(output_dir)` and sample with `DDIMScheduler.from_config(pipe.scheduler.config)`.

With `--evaluator_path` (default: the shipped evaluator) the script then samples `--num_eval_samples` images with
DDIM (eta = 0, `--num_inference_steps`) and prints the share of each attribute combination the evaluator sees.
`--evaluate_only` skips training and evaluates the saved pipeline.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from s2m_diffusers.demo import DATASETS, SEVEN_TARGETS, load_7to3
from s2m_diffusers.evaluation import AttributeEvaluator, combination_shares, evaluator_features, frechet_distance
from s2m_diffusers.proposals import DDIMProposal
from s2m_diffusers.utils import save_pretrained_atomically

# The trained models by dataset (Fashion's live in this checkout's benchmarks/pretrained/, not in the package).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="Digits-7to3 or Fashion-7to3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_steps", type=int, default=2500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--num_train_timesteps", type=int, default=1000)
    parser.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2")
    parser.add_argument("--ema_max_decay", type=float, default=0.999)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (results depend on it).")
    parser.add_argument(
        "--evaluator_path", type=str, default=None, help="default: the evaluator of --dataset's pretrained root"
    )
    parser.add_argument("--num_eval_samples", type=int, default=2000)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--evaluate_only", action="store_true", help="Evaluate the pipeline in --output_dir.")
    args = parser.parse_args()
    if args.evaluator_path is None:
        args.evaluator_path = os.path.join(PRETRAINED_ROOTS[args.dataset], "evaluator")
    return args


def train(args) -> None:
    accelerator = Accelerator()
    set_seed(args.seed)
    data = load_7to3(args.dataset).train()

    n_blocks = len(args.block_out_channels)
    model = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=args.layers_per_block,
        block_out_channels=tuple(args.block_out_channels),
        down_block_types=("DownBlock2D",) * n_blocks,
        up_block_types=("UpBlock2D",) * n_blocks,
        norm_num_groups=8,
    )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=1.0,
        power=3 / 4,
        model_cls=UNet2DModel,
        model_config=model.config,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
    )
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.num_steps
    )
    dataloader = DataLoader(
        TensorDataset(data.images),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    ema.to(accelerator.device)

    progress = tqdm(range(args.num_steps), disable=not accelerator.is_main_process, desc="DDPM")
    start, step = time.time(), 0
    while step < args.num_steps:
        for (clean,) in dataloader:
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, args.num_train_timesteps, (len(clean),), device=clean.device).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # forward diffusion q(x_t | x_0)

            loss = F.mse_loss(model(noisy, timesteps).sample, noise)  # epsilon prediction
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(model.parameters())

            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", ema_decay=f"{ema.cur_decay_value:.4f}")
            if step >= args.num_steps:
                break
    progress.close()
    elapsed = time.time() - start

    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        ema.copy_to(unet.parameters())
        save_pretrained_atomically(DDPMPipeline(unet=unet, scheduler=noise_scheduler), args.output_dir)
        print(f"Trained {args.num_steps} steps in {elapsed:.0f} s; saved to {args.output_dir}")


def evaluate(args) -> None:
    """Sample the saved pipeline with DDIM and print the share of each combination the evaluator sees."""
    if not os.path.isdir(args.evaluator_path):
        print(f"No evaluator at {args.evaluator_path}; skipping the evaluation (train it with train_evaluator.py).")
        return
    pipeline = DDPMPipeline.from_pretrained(args.output_dir)
    proposal = DDIMProposal(pipeline.unet, pipeline.scheduler, args.num_inference_steps, micro_batch_size=250)
    evaluator = AttributeEvaluator.from_pretrained(args.evaluator_path).eval()
    data = load_7to3(args.dataset).train()
    real_shares = torch.bincount(data.source_classes, minlength=7).float() / len(data)

    noise = torch.randn(args.num_eval_samples, 1, 16, 16, generator=torch.Generator().manual_seed(1234))
    start = time.time()
    with torch.no_grad():
        images = proposal.generate(noise)  # deterministic DDIM (eta = 0), clamped to [-1, 1]
    elapsed = time.time() - start
    shares, low_confidence = combination_shares(evaluator, images)
    print(
        f"{len(images)} DDIM samples ({args.num_inference_steps} steps, eta 0) in {elapsed:.0f} s; "
        f"low confidence {low_confidence:.3f}, no attribute {shares[7:].sum():.3f}"
    )
    for k, target in enumerate(SEVEN_TARGETS):
        print(f"  {target:<12} generated {shares[k]:.3f}   real {real_shares[k]:.3f}")
    print(f"smallest combination share: {shares[:7].min():.3f}")
    distance = frechet_distance(evaluator_features(evaluator, images), evaluator_features(evaluator, data.images))
    print(f"Frechet distance (evaluator features) to the {len(data)} real train images: {distance:.3f}")


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.num_threads)
    if not args.evaluate_only:
        train(args)
    evaluate(args)
