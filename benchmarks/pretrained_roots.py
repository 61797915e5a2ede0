"""Where the benchmarks find the trained 7to3 models, by dataset.

Digits-7to3's models ship inside the package (`s2m_diffusers.demo.DIGITS_7TO3_PRETRAINED`). Fashion-7to3's are
trained by the example scripts into this checkout's `benchmarks/pretrained/fashion7to3/` (`gan/`, `gan_conditional/`,
`ddpm/`, `evaluator/`, `heads_*`; the commands are in `benchmarks/RESULTS.md`): they are not part of the package.
"""

import os

from s2m_diffusers.demo import DIGITS_7TO3_PRETRAINED

FASHION_7TO3_PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "fashion7to3")

PRETRAINED_ROOTS: dict[str, str] = {"digits": DIGITS_7TO3_PRETRAINED, "fashion": FASHION_7TO3_PRETRAINED}
