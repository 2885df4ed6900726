"""Count the expensive steps of CrispEdit by wrapping the functions that do them (for tests and benchmarks)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def count_core_work() -> Iterator[Counter]:
    """Within the block, count capability collections, past-edit statistics collections and eigendecompositions.

    Keys: ``capability_collections`` (K-FAC over the capability corpus), ``edit_statistics_collections`` (K-FAC over
    past edits, CrispEdit-Seq) and ``eigh_calls`` (one per factor: 2 per layer for an A, S pair). The originals are
    put back on exit.
    """
    from crispedit_easyedit import editing, projector, state

    counter: Counter = Counter()
    patched = [(state, "collect_kfac_factors", "capability_collections"),
               (editing, "collect_kfac_factors", "edit_statistics_collections"),
               (projector, "stable_eigh", "eigh_calls")]
    originals = [getattr(module, name) for module, name, _ in patched]

    def counting(key: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter[key] += 1
            return real(*args, **kwargs)
        return wrapper

    for (module, name, key), real in zip(patched, originals):
        setattr(module, name, counting(key, real))
    try:
        yield counter
    finally:
        for (module, name, _), real in zip(patched, originals):
            setattr(module, name, real)
