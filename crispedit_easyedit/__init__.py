"""CrispEdit for EasyEdit: low-curvature projected fine-tuning of LLM weights.

The curvature core (``curvature``, ``projector``, ``optim``, ``editing``, ``state``) never imports EasyEdit. The
adapter in ``crispedit_easyedit.easyedit`` registers the method with EasyEdit when EasyEdit is importable.

The public API is re-exported lazily (importing the package imports neither torch nor EasyEdit):
    CrispEditHyperParams: the validated hyperparameters (``hparams``).
    apply_crispedit: Algorithm 1 / CrispEdit-Seq on (model, tokenizer, requests, hparams) (``editing``).
    capability_curvature: the cached capability curvature and eigenbases a model's edits use (``state``).
    edit_state, reset_edit_state, save_edit_state, load_edit_state: the per-model edit state (``state``).
    CurvatureError, NonFiniteError: what bad factors and a diverged edit raise (``checks``).
    apply_crispedit_to_model: EasyEdit's apply function (``easyedit.apply``).
    register_with_easyedit: register "CrispEdit" in EasyEdit's ALG_DICT (``easyedit.register``; importing
        ``crispedit_easyedit.easyedit`` also registers, as a convenience).

The experiment side (offline models and data, evaluation, the main job and CLI, the side-by-side harness) lives in
``crispedit_easyedit.bench``; the core never imports it.
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CrispEditHyperParams": "hparams",
    "apply_crispedit": "editing",
    "capability_curvature": "state",
    "edit_state": "state",
    "reset_edit_state": "state",
    "save_edit_state": "state",
    "load_edit_state": "state",
    "CurvatureError": "checks",
    "NonFiniteError": "checks",
    "apply_crispedit_to_model": "easyedit.apply",
    "register_with_easyedit": "easyedit",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, "register" if name == "register_with_easyedit" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
