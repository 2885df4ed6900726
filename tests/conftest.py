"""Test session setup: no hub access, ever; passive OpenMP waiting."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Spinning OpenMP threads slow torch down many times over when other processes share the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
