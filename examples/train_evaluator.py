#!/usr/bin/env python
"""Train the Digits-7to3 evaluator: the classifier that scores S2M's returned images.

As shipped in `s2m_diffusers/demo/pretrained/digits7to3/evaluator`:

    python examples/train_evaluator.py --output_dir s2m_diffusers/demo/pretrained/digits7to3/evaluator

The evaluator is an `AttributeEvaluator` trained on the **heldout** split of Digits-7to3 (never seen by the
generators or the heads) with each image's full attribute set, i.e. its combination: 7 classes, one per source class.
An 8th class, the empty set, is trained on half of scikit-learn's digits 7, 8 and 9 (outside the 7to3 universe), so
that generated images that are no combination at all are flagged rather than forced into one (`--no_none_class`
drops it). Training uses random shifts of up to `--max_shift` pixels.

At the end the script prints the accuracy on real images the evaluator never saw: the whole `train` split of
Digits-7to3 (885 images), and the held-back half of the digits 7, 8, 9 (which it should call "no attribute").
"""

import argparse
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from s2m_diffusers.demo import (
    ATTRIBUTE_NAMES,
    DATASETS,
    SEVEN_TARGET_LITERALS,
    SEVEN_TARGETS,
    SOURCE_CLASS_ATTRIBUTES,
    load_7to3,
    load_without_attributes,
)
from s2m_diffusers.evaluation import AttributeEvaluator, evaluator_class_probs, random_shift, target_accuracy
from s2m_diffusers.utils import save_pretrained_atomically


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="Digits-7to3 or Fashion-7to3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--max_shift", type=int, default=2)
    parser.add_argument("--base_channels", type=int, default=32)
    parser.add_argument("--no_none_class", action="store_true", help="Train the 7 combinations only.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (results depend on it).")
    return parser.parse_args()


def main(args) -> None:
    accelerator = Accelerator()
    set_seed(args.seed)
    data = load_7to3(args.dataset)
    heldout, unseen = data.heldout(), data.train()

    # Training set: the heldout split with its combination (= source class), plus the "no attribute" class.
    images, classes = heldout.images, heldout.source_classes
    class_attributes = list(SOURCE_CLASS_ATTRIBUTES)
    none_train = none_test = None
    if not args.no_none_class:
        none_images = load_without_attributes(args.dataset)
        order = torch.randperm(len(none_images), generator=torch.Generator().manual_seed(args.seed))
        none_train, none_test = none_images[order[: len(order) // 2]], none_images[order[len(order) // 2 :]]
        images = torch.cat([images, none_train])
        classes = torch.cat([classes, torch.full((len(none_train),), len(class_attributes))])
        class_attributes.append(())

    model = AttributeEvaluator(ATTRIBUTE_NAMES, class_attributes, base_channels=args.base_channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.num_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    images, classes = images.to(accelerator.device), classes.to(accelerator.device)
    rng = torch.Generator().manual_seed(args.seed)  # batches and shifts

    model.train()
    start = time.time()
    for _ in tqdm(range(args.num_steps), disable=not accelerator.is_main_process, desc="evaluator"):
        batch = torch.randint(0, len(images), (args.batch_size,), generator=rng).to(accelerator.device)
        logits = model(random_shift(images[batch], args.max_shift, rng))
        loss = F.cross_entropy(logits, classes[batch])
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
    elapsed = time.time() - start

    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model).cpu().eval()
    save_pretrained_atomically(model, args.output_dir)
    print(f"Trained {args.num_steps} steps in {elapsed:.0f} s on {len(images)} images; saved to {args.output_dir}")

    # Accuracy on real images the evaluator never saw.
    probs = evaluator_class_probs(model, unseen.images)
    correct = probs.argmax(dim=1) == unseen.source_classes
    print(f"combination accuracy on the unseen train split ({len(unseen)} images): {correct.float().mean():.4f}")
    print(f"  low confidence (< 0.5): {(probs.max(dim=1).values < 0.5).float().mean():.4f}")
    for k, (target, (present, absent)) in enumerate(zip(SEVEN_TARGETS, SEVEN_TARGET_LITERALS)):
        members = unseen.images[unseen.source_classes == k]
        print(
            f"  target {target:<12} accuracy on its {len(members)} images: "
            f"{target_accuracy(model, members, present, absent):.4f}"
        )
    own = evaluator_class_probs(model, heldout.images).argmax(dim=1) == heldout.source_classes
    print(f"combination accuracy on its own training images (heldout split): {own.float().mean():.4f}")
    if none_test is not None:
        called_none = evaluator_class_probs(model, none_test).argmax(dim=1) == len(class_attributes) - 1
        share = called_none.float().mean()
        print(f"unseen images outside the universe called 'no attribute': {share:.4f} of {len(none_test)}")


if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.num_threads)
    main(args)
