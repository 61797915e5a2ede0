#!/usr/bin/env python
"""Train the reference DCGANs on Digits-7to3 and save them with `save_pretrained` (safetensors).

Unconditional (all train images of the 7 source classes, no labels), as shipped in
`s2m_diffusers/demo/pretrained/digits7to3/gan`:

    python examples/train_gan.py --output_dir s2m_diffusers/demo/pretrained/digits7to3/gan

Class-conditional on the single-positive labels A, B, C (it models p(x | y_c = 1), the class-conditional proposal
of D_f), as shipped in `s2m_diffusers/demo/pretrained/digits7to3/gan_conditional`:

    python examples/train_gan.py --conditional --output_dir s2m_diffusers/demo/pretrained/digits7to3/gan_conditional

Training: non-saturating GAN loss, spectrally normalised discriminator, differentiable shift augmentation of real
and generated images (DiffAugment; the train split holds only 885 images), an exponential moving average of the
generator's weights, and at the end a recomputation of the generator's batch-norm statistics, so that in `eval()`
mode each image depends on its own latent only. With `--evaluator_path` (default: the shipped evaluator) the script
then samples `--num_eval_samples` images and prints the share of each attribute combination the evaluator sees.
`--evaluate_only` skips training and evaluates the saved generator.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from s2m_diffusers.demo import DATASETS, SEVEN_TARGETS, load_7to3
from s2m_diffusers.evaluation import (
    AttributeEvaluator,
    combination_shares,
    evaluator_attribute_probs,
    evaluator_features,
    frechet_distance,
    random_shift,
)
from s2m_diffusers.models.gan import DCGANDiscriminator, DCGANGenerator
from s2m_diffusers.utils import save_pretrained_atomically

# The trained models by dataset (Fashion's live in this checkout's benchmarks/pretrained/, not in the package).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from pretrained_roots import PRETRAINED_ROOTS  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="Digits-7to3 or Fashion-7to3")
    parser.add_argument("--conditional", action="store_true", help="Condition on the single-positive labels.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--latent_dim", type=int, default=32)
    parser.add_argument("--base_channels", type=int, default=32)
    parser.add_argument("--max_shift", type=int, default=2, help="DiffAugment shift in pixels (0: none).")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (results depend on it).")
    parser.add_argument(
        "--evaluator_path", type=str, default=None, help="default: the evaluator of --dataset's pretrained root"
    )
    parser.add_argument("--num_eval_samples", type=int, default=2000)
    parser.add_argument("--evaluate_only", action="store_true", help="Evaluate the generator in --output_dir.")
    args = parser.parse_args()
    if args.evaluator_path is None:
        args.evaluator_path = os.path.join(PRETRAINED_ROOTS[args.dataset], "evaluator")
    return args


@torch.no_grad()
def recompute_batch_norm_statistics(generator, num_batches, batch_size, class_probs, seed):
    """Replace the running batch-norm statistics by exact averages over fresh batches from the final weights."""
    batch_norms = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    rng = torch.Generator().manual_seed(seed)
    generator.train()
    for _ in range(num_batches):
        z = torch.randn(batch_size, generator.config.latent_dim, generator=rng)
        labels = None if class_probs is None else torch.multinomial(class_probs, batch_size, True, generator=rng)
        generator(z, labels)
    for m in batch_norms:
        m.momentum = 0.1
    generator.eval()


def train(args) -> None:
    accelerator = Accelerator()
    set_seed(args.seed)
    data = load_7to3(args.dataset).train()
    num_classes = len(data.attribute_names) if args.conditional else None

    generator = DCGANGenerator(
        latent_dim=args.latent_dim,
        sample_size=16,
        out_channels=1,
        base_channels=args.base_channels,
        num_classes=num_classes,
    )
    discriminator = DCGANDiscriminator(
        sample_size=16, in_channels=1, base_channels=args.base_channels, num_classes=num_classes
    )
    ema = EMAModel(generator.parameters(), decay=args.ema_decay)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.learning_rate, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=args.learning_rate, betas=(0.5, 0.999))
    dataset = TensorDataset(data.images, data.single_labels)
    dataloader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    generator, discriminator, optimizer_g, optimizer_d, dataloader = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d, dataloader
    )
    ema.to(accelerator.device)
    rng = torch.Generator().manual_seed(args.seed + 1)  # augmentation offsets

    def latents(n):
        return torch.randn(n, args.latent_dim, device=accelerator.device)

    progress = tqdm(range(args.num_steps), disable=not accelerator.is_main_process, desc="DCGAN")
    start, step = time.time(), 0
    while step < args.num_steps:
        for real, labels in dataloader:
            labels = labels if args.conditional else None  # fakes take the real batch's labels

            # Discriminator: real -> 1, generated -> 0 (both shifted by DiffAugment).
            with torch.no_grad():
                fake = generator(latents(len(real)), labels)
            logits_real = discriminator(random_shift(real, args.max_shift, rng), labels)
            logits_fake = discriminator(random_shift(fake, args.max_shift, rng), labels)
            loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
            optimizer_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            optimizer_d.step()

            # Generator: non-saturating loss through the same augmentation.
            fake = generator(latents(len(real)), labels)
            loss_g = F.softplus(-discriminator(random_shift(fake, args.max_shift, rng), labels)).mean()
            optimizer_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            optimizer_g.step()
            ema.step(generator.parameters())

            step += 1
            progress.update(1)
            progress.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
            if step >= args.num_steps:
                break
    progress.close()
    elapsed = time.time() - start

    if accelerator.is_main_process:
        generator = accelerator.unwrap_model(generator)
        ema.copy_to(generator.parameters())
        class_probs = None
        if args.conditional:
            class_probs = torch.tensor(data.label_counts, dtype=torch.float)
        recompute_batch_norm_statistics(generator.cpu(), 20, 256, class_probs, args.seed + 2)
        save_pretrained_atomically(generator, args.output_dir)
        print(f"Trained {args.num_steps} steps in {elapsed:.0f} s; saved to {args.output_dir}")


@torch.no_grad()
def evaluate(args) -> None:
    """Sample the saved generator and print the share of each combination the evaluator sees."""
    if not os.path.isdir(args.evaluator_path):
        print(f"No evaluator at {args.evaluator_path}; skipping the evaluation (train it with train_evaluator.py).")
        return
    generator = DCGANGenerator.from_pretrained(args.output_dir).eval()
    evaluator = AttributeEvaluator.from_pretrained(args.evaluator_path).eval()
    data = load_7to3(args.dataset).train()
    rng = torch.Generator().manual_seed(1234)
    n = args.num_eval_samples

    def report(title, images, real_images, real_classes):
        shares, low_confidence = combination_shares(evaluator, images)
        real_shares = torch.bincount(real_classes, minlength=7).float() / len(real_classes)
        print(f"{title}: low confidence {low_confidence:.3f}, no attribute {shares[7:].sum():.3f}")
        for k, target in enumerate(SEVEN_TARGETS):
            print(f"  {target:<12} generated {shares[k]:.3f}   real {real_shares[k]:.3f}")
        print(f"  smallest combination share: {shares[:7].min():.3f}")
        distance = frechet_distance(evaluator_features(evaluator, images), evaluator_features(evaluator, real_images))
        print(f"  Frechet distance (evaluator features) to the {len(real_images)} real train images: {distance:.3f}")

    if generator.config.num_classes is None:
        images = generator(torch.randn(n, generator.config.latent_dim, generator=rng))
        report(f"{n} samples", images, data.images, data.source_classes)
        return
    for c, name in enumerate(data.attribute_names):
        labels = torch.full((n,), c, dtype=torch.long)
        images = generator(torch.randn(n, generator.config.latent_dim, generator=rng), labels)
        has_c = (evaluator_attribute_probs(evaluator, images)[:, c] > 0.5).float().mean()
        print(f"class {name}: share of samples with attribute {name}: {has_c:.3f}")
        labelled_c = data.single_labels == c
        report(f"  {n} samples of class {name}", images, data.images[labelled_c], data.source_classes[labelled_c])


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.num_threads)
    if not args.evaluate_only:
        train(args)
    evaluate(args)
