"""Test session setup: no hub access, ever; passive OpenMP waiting."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Spinning OpenMP threads slow torch down many times over when other processes share the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_before_eval_cache(tmp_path_factory):
    """The jobs' before-evaluation cache in a folder of this test session, never the user's ~/.cache."""
    os.environ["CRISPEDIT_BEFORE_EVAL_CACHE"] = str(tmp_path_factory.mktemp("before_eval"))
    yield
