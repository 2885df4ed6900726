"""String metrics: SQuAD normalisation, exact match and whole-word "contains"."""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence

logger = logging.getLogger(__name__)


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", flags=re.IGNORECASE)

# ----------------------------------------------------------------------------------------------------------------
# String metrics
# ----------------------------------------------------------------------------------------------------------------
def squad_normalize(text: str) -> str:
    """Normalise an answer by the SQuAD rule.

    Args:
        text: Any string.

    Returns:
        ``text`` lower-cased, without ASCII punctuation, without the articles a/an/the, with runs of white space
        collapsed to one space and no leading or trailing white space.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_golds(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    golds = list(gold)
    if not golds:
        raise ValueError("gold must be a string or a non-empty sequence of strings, got an empty sequence")
    return golds


def exact_match(pred: str, gold: str | Sequence[str]) -> bool:
    """Whether the SQuAD-normalised prediction equals a SQuAD-normalised gold answer.

    Args:
        pred: The model's answer.
        gold: One acceptable answer or a sequence of acceptable answers (any one suffices).

    Returns:
        True when ``squad_normalize(pred) == squad_normalize(g)`` for some gold answer ``g``.
    """
    p = squad_normalize(pred)
    return any(p == squad_normalize(g) for g in _as_golds(gold))


def contains(pred: str, gold: str | Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs in the normalised prediction as a run of whole words.

    Args:
        pred: The model's answer.
        gold: One acceptable answer or a sequence of acceptable answers (any one suffices).

    Returns:
        True when ``" " + squad_normalize(g) + " "`` is a substring of ``" " + squad_normalize(pred) + " "`` for
        some gold answer ``g`` whose normalisation is not empty.
    """
    p = f" {squad_normalize(pred)} "
    for g in _as_golds(gold):
        ng = squad_normalize(g)
        if ng and f" {ng} " in p:
            return True
    return False
