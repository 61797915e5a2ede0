"""Worlds for the tests and the benchmarks, whose every quantity is known; the library never imports them.

- `toy`: an analytic 2-d problem with closed-form densities and exact heads ([`toy.ToyProblem`]), for exactness tests.
- `shapes`: a constructed image generator whose attributes are read from its pixels ([`shapes.ShapesGenerator`]), for
  benchmarks with 1 to n attributes.
- `pipelines`: a pixel-space DDIM pipeline called as diffusers' text-to-image pipelines are (``latents=``, step
  callback, ``interrupt``), to run a trained UNet through the wrapped-pipeline path
  ([`pipelines.LatentsDDIMPipeline`]).
"""
