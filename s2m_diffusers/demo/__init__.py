"""The Digits-7to3 demo (`s2m demo`) and the 7to3 worlds of the benchmarks; the library never imports it.

- `run`: [`run_demo`] and its steps, the shipped pipelines ([`load_demo_pipeline`]) and head training
  ([`train_demo_heads`]).
- `seven_to_three`: the 7to3 construction (7 source classes as the 7 combinations of A, B, C) on scikit-learn's
  digits and on Fashion-MNIST.
- `pretrained/digits7to3/`: the shipped weights ([`DIGITS_7TO3_PRETRAINED`]).

Examples:

```py
>>> from s2m_diffusers.demo import run_demo
>>> report = run_demo("s2m-demo", num_images=8, seed=0)  # doctest: +SKIP
>>> report["paths"]["pipelines"]["gan"]  # doctest: +SKIP
's2m-demo/pipelines/gan'
```
"""

from .run import (
    DDIM_STEPS,
    GENERATOR_KINDS,
    GENERATORS,
    MICRO_BATCH_SIZE,
    demo_settings,
    digits_train_data,
    load_demo_pipeline,
    load_evaluator,
    load_generator,
    load_pipelines,
    make_grid,
    report_markdown,
    retrain_heads,
    run_demo,
    sample_combinations,
    save_pipelines,
    score_rows,
    summarize,
    train_demo_heads,
    training_proposal,
    write_grid,
)
from .seven_to_three import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_TABLE,
    DATASETS,
    DIGITS_7TO3_PRETRAINED,
    FASHION_MNIST_ENV,
    SEVEN_TARGET_LITERALS,
    SEVEN_TARGETS,
    SOURCE_CLASS_ATTRIBUTES,
    SevenToThree,
    combination_index,
    fashion_mnist_root,
    load_7to3,
    load_digits_7to3,
    load_digits_without_attributes,
    load_fashion_7to3,
    load_fashion_without_attributes,
    load_without_attributes,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "ATTRIBUTE_TABLE",
    "DATASETS",
    "DDIM_STEPS",
    "DIGITS_7TO3_PRETRAINED",
    "FASHION_MNIST_ENV",
    "GENERATORS",
    "GENERATOR_KINDS",
    "MICRO_BATCH_SIZE",
    "SEVEN_TARGETS",
    "SEVEN_TARGET_LITERALS",
    "SOURCE_CLASS_ATTRIBUTES",
    "SevenToThree",
    "combination_index",
    "demo_settings",
    "digits_train_data",
    "fashion_mnist_root",
    "load_7to3",
    "load_demo_pipeline",
    "load_digits_7to3",
    "load_digits_without_attributes",
    "load_evaluator",
    "load_fashion_7to3",
    "load_fashion_without_attributes",
    "load_generator",
    "load_pipelines",
    "load_without_attributes",
    "make_grid",
    "report_markdown",
    "retrain_heads",
    "run_demo",
    "sample_combinations",
    "save_pipelines",
    "score_rows",
    "summarize",
    "train_demo_heads",
    "training_proposal",
    "write_grid",
]
