"""EasyEdit's apply contract for CrispEdit: ``apply_crispedit_to_model``.

EasyEdit calls ``ALG_DICT[alg_name](model, tok, requests, hparams, copy=False, return_orig_weights=True,
keep_original_weight=..., **kwargs)`` and restores the weights it gets back. The two generations differ
(../shared/EASYEDIT.md):

* PyPI ``easyeditor`` passes the user's ``keep_original_weight`` and restores whatever dict it receives; its own
  FT returns ``{}`` unless ``keep_original_weight`` is True, so by default edits accumulate. We do the same.
* EasyEdit's GitHub main always passes ``keep_original_weight=False, return_orig_weights=True`` and decides itself
  (``restore_after_edit``, ``sequential_edit``) whether to copy the originals back: we always return them.
"""

from __future__ import annotations

import copy as copy_module
import logging
from typing import Any, Sequence

import torch

from ..editing import apply_crispedit, edit_targets

logger = logging.getLogger(__name__)


def _returns_originals(return_orig_weights: bool, keep_original_weight: bool) -> bool:
    if not return_orig_weights:
        return False
    from .registry import generation

    return keep_original_weight or generation() != "pypi"


def apply_crispedit_to_model(model: Any, tok: Any, requests: Sequence[dict], hparams: Any, copy: bool = False,
                             return_orig_weights: bool = False, keep_original_weight: bool = False,
                             **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Edit ``model`` with CrispEdit: one Algorithm 1 over ``requests`` (in chunks of ``hparams.chunk_size`` for
    CrispEdit-Seq), continuing the sequence of earlier calls when EasyEdit kept their weights.

    EasyEdit calls this once per chunk of ``hparams.batch_size`` requests. The model's edit state
    (:mod:`crispedit_easyedit.state`) reuses the capability curvature and eigenbases computed at the base weights,
    and tells a call whose weights EasyEdit restored (a fresh Algorithm 1) from one whose weights it kept
    (``sequential_edit=True`` on GitHub main, the default on PyPI: the earlier edits are protected too).

    Args:
        model: the causal LM (edited in place unless ``copy``).
        tok: its tokenizer.
        requests: EasyEdit request dicts (``prompt``, ``target_new``, ...).
        hparams: CrispEditHyperParams.
        copy: edit a deep copy and leave ``model`` untouched.
        return_orig_weights: return the original values of the edited weights (see the module docstring for how
            each EasyEdit generation uses them).
        keep_original_weight: PyPI EasyEdit's flag: restore the weights after evaluation.
        **kwargs: ignored (EasyEdit passes e.g. ``train_ds``).

    Returns:
        (edited model, {parameter path: original tensor}) or (edited model, {}).
    """
    if kwargs:
        logger.debug("ignoring EasyEdit keyword arguments %s", sorted(kwargs))
    if copy:
        model = copy_module.deepcopy(model)
    wanted = _returns_originals(return_orig_weights, keep_original_weight)
    originals = {t.name: t.param.detach().clone() for t in edit_targets(model, hparams)} if wanted else {}
    apply_crispedit(model, tok, list(requests), hparams)
    return model, originals
