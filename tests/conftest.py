"""Shared test setup: offline, and caches in a temporary folder so a test run writes nothing outside it."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="s2m-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
