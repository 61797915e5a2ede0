#!/usr/bin/env python
"""Train S2M heads from Python: the library calls under `s2m train-heads`, in one straight script.

`s2m train-heads` is the training tool: every option (mixed precision, checkpoints and resume, a learning-rate
schedule, trackers, a `datasets` dataset, a transformers backbone, the Hub) is in `s2m train-heads --help`. Read this
script to see what it does, or copy it when your generator is not a saved diffusers folder: `train_heads` takes any
callable `proposal(n, generator) -> images (n, C, S, S) in [-1, 1]`.

```sh
python examples/train_heads.py --pretrained_model_name_or_path my-gan/ --train_data_dir data/ --output_dir my-s2m
accelerate launch examples/train_heads.py ...   # the same, data parallel: every process trains, the main one saves
```
"""

import argparse

from accelerate import PartialState

from s2m_diffusers import S2MPipeline
from s2m_diffusers.data import SinglePositiveDataset
from s2m_diffusers.hub import generator_image_shape, load_generator_folder
from s2m_diffusers.proposals import DDIMProposal, GeneratorProposal
from s2m_diffusers.training import sample_bank, train_heads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="a GAN or diffusers pipeline folder")
    parser.add_argument("--train_data_dir", required=True, help="folder with one sub-folder of images per attribute")
    parser.add_argument("--output_dir", required=True, help="where the S2M pipeline is written")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # 1. The generator as a proposal: noise in, images in [-1, 1] out. A diffusion model runs as deterministic DDIM,
    #    and since each of its samples costs a whole denoising run, the heads train on a bank drawn once.
    kind, components = load_generator_folder(args.pretrained_model_name_or_path)
    size, channels = generator_image_shape(kind, components)
    if kind == "ddim":
        proposal = DDIMProposal(components["unet"], components["scheduler"], num_inference_steps=25)
        proposal = sample_bank(proposal, 4096, seed=args.seed)
    else:
        proposal = GeneratorProposal(components["gan"])

    # 2. Single-positive data in the generator's format: (N, C, S, S) in [-1, 1] and one label per image.
    data = SinglePositiveDataset.from_folder(args.train_data_dir, size, channels)

    # 3. Train and calibrate D_v and D_r (accelerate takes the devices and processes); every process returns the
    #    same heads and metrics.
    heads, metrics = train_heads(
        data,
        proposal,
        num_steps=args.max_train_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        seed=args.seed,
    )

    # 4. Generator + heads = an S2M pipeline; the main process writes it.
    if PartialState().is_main_process:
        S2MPipeline(heads=heads, **components).save_pretrained(args.output_dir)
        print(f"D_v accuracy {metrics['dv_accuracy']:.3f}, D_r accuracy {metrics['dr_accuracy']:.3f}")
        print(f"wrote {args.output_dir}: s2m sample --pipeline {args.output_dir} --target '...' --output samples/")
    return metrics


if __name__ == "__main__":
    main()
