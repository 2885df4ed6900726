"""Make EasyEdit importable and usable for CrispEdit on today's stack, touching as little as possible.

Two generations of EasyEdit exist (see the project notes on EasyEdit):

* ``"pypi"``: the PyPI package ``easyeditor==0.0.1.dev0`` (October 2023), installed with ``--no-deps``.
* ``"github-main"``: a checkout of EasyEdit's GitHub main on ``sys.path``; it normalises devices itself
  (``easyeditor/util/device.py``), which is also how it is recognised.

The generation is detected from the package *folder* (``importlib.util.find_spec`` on the top-level name only),
so detection never executes ``easyeditor/__init__.py`` (which, for the PyPI package, fails on today's stack).

What ``prepare_easyeditor()`` changes, and only for the PyPI generation:

1. **Multimodal modules that cannot import.** ``easyeditor/__init__`` star-imports everything, including BLIP-2 /
   MiniGPT-4 code that needs timm, fairscale, iopath, torchvision and OpenCV (and transformers 4.x APIs). Those
   modules are only used by EasyEdit's *multimodal* editor. Each of them is replaced in ``sys.modules`` by a stub
   *before* ``easyeditor`` is imported, when one of its third-party dependencies is missing
   (``importlib.util.find_spec``); if the import still fails inside one of them (a dependency is present but broken,
   e.g. a CUDA-built torchvision beside a CPU torch), the partial import is discarded and retried with all of them
   stubbed. Stubbed modules hand out placeholder classes that raise ``ImportError`` when used, so text editing works
   and multimodal editing fails loudly. The modules are listed in ``MULTIMODAL_MODULES``.
2. **Hard-coded CUDA devices, only when CUDA is not available.** The PyPI package builds device strings as
   ``f"cuda:{hparams.device}"`` (``BaseEditor.__init__``, ``edit``, ``batch_edit`` and ``edit_dataset``'s weight
   restore, the evaluators in ``evaluate/``, and the FT/ROME/MEMIT/... apply functions) and once ``.to("cuda")``
   (``util/perplexity.py``). On a machine without CUDA every such expression inside a function of an ``easyeditor``
   module is rewritten, in the function's own code object (``function.__code__`` is swapped, so every reference
   made by ``from ... import`` sees the change), into a call of ``easyeditor_device(index)``, which returns
   ``"cpu"`` (or ``"mps"``/``"cpu"`` when the index already names one). Nothing else in those functions changes,
   line numbers stay those of the installed source, and the list of rewritten functions is available from
   ``patched_functions()``. No global torch behaviour is altered.

With EasyEdit GitHub main, or when CUDA is available, ``prepare_easyeditor()`` only imports ``easyeditor``
(GitHub main accepts ``device: "cpu"`` natively; with CUDA the PyPI package runs as published, with integer
``device`` indices). ``prepare_easyeditor(neutralise_multimodal=True)`` forces step 1 for either generation, for
environments whose vision packages are broken (e.g. a CPU-only torch beside the PyPI torchvision wheel).

``ModelPair`` lets EasyEdit take an already loaded ``(model, tokenizer)`` as ``hparams.model_name``: both generations
unpack a non-string ``model_name`` into model and tokenizer, and their evaluators then call ``model_name.lower()``.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

Generation = Literal["pypi", "github-main"]
PYPI: Generation = "pypi"
GITHUB_MAIN: Generation = "github-main"

MULTIMODAL_MODULES: dict[str, tuple[str, ...]] = {
    "trainer.blip2_models": ("timm", "fairscale", "iopath", "torchvision"),
    "dataset.processor.randaugment": ("cv2",),
    "dataset.processor.blip_processors": ("torchvision", "cv2"),
    "dataset.processor.llavaov_processors": ("av", "cv2"),  # GitHub main only
    "dataset.processor.qwen2vl_processors": ("av", "cv2", "qwen_vl_utils"),  # GitHub main only
}
"""easyeditor submodules (relative names) used only by multimodal editing, with their third-party imports."""

_DEVICE_HELPER_NAME = "__crispedit_easyeditor_device__"
_STUB_MARK = "__crispedit_stub__"
_PATCHED_MARK = "__crispedit_device_patched__"

_state: dict[str, Any] = {"generation": None, "stubbed": [], "patched": []}


# ------------------------------------------------------------------------------------------------------ detection --
def easyeditor_location() -> Path | None:
    """The folder of the installed ``easyeditor`` package, found without importing it (None if absent)."""
    if "easyeditor" in sys.modules and getattr(sys.modules["easyeditor"], "__file__", None):
        return Path(sys.modules["easyeditor"].__file__).resolve().parent
    try:
        spec = importlib.util.find_spec("easyeditor")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def detect_generation() -> Generation | None:
    """``"github-main"`` if ``easyeditor/util/device.py`` exists, ``"pypi"`` if only the package exists, else None.

    Never imports ``easyeditor``.
    """
    root = easyeditor_location()
    if root is None:
        return None
    return GITHUB_MAIN if (root / "util" / "device.py").is_file() else PYPI


def easyeditor_available() -> bool:
    """Whether an ``easyeditor`` package is installed (without importing it)."""
    return easyeditor_location() is not None


# ------------------------------------------------------------------------------------------------------- devices --
def easyeditor_device(index: Any = None) -> str:
    """What the PyPI package's ``f"cuda:{index}"`` becomes on a machine without CUDA.

    Args:
        index: the value EasyEdit formatted after ``cuda:`` (usually ``hparams.device``: an int, a digit string,
            ``"cpu"``, a ``torch.device``); None for a bare ``"cuda"``.

    Returns:
        ``"cuda:{index}"`` (or ``"cuda"``) when CUDA is available; otherwise ``"mps"``/``"cpu"`` when the index
        already names that device, else ``"cpu"``.
    """
    if torch.cuda.is_available():
        return "cuda" if index is None else f"cuda:{index}"
    text = "" if index is None else str(index)
    if text == "mps" or text.startswith("mps:"):
        return text
    return "cpu"


class _CudaStringRewriter(ast.NodeTransformer):
    """Rewrites ``f"cuda:{x}"`` into ``helper(x)`` and ``.to("cuda")`` into ``.to(helper(None))``."""

    def __init__(self) -> None:
        self.count = 0

    def _helper(self, arg: ast.expr, like: ast.AST) -> ast.Call:
        self.count += 1
        call = ast.Call(func=ast.Name(id=_DEVICE_HELPER_NAME, ctx=ast.Load()), args=[arg], keywords=[])
        return ast.copy_location(call, like)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        values = node.values
        if (len(values) == 2 and isinstance(values[0], ast.Constant) and values[0].value == "cuda:"
                and isinstance(values[1], ast.FormattedValue) and values[1].conversion == -1
                and values[1].format_spec is None):
            return self._helper(self.visit(values[1].value), node)
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "to" and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cuda"):
            node.args[0] = self._helper(ast.Constant(value=None), node.args[0])
        return node


def _find_code(code: types.CodeType, name: str, path: tuple[str, ...]) -> types.CodeType | None:
    """The code object named ``name`` nested (through ``path`` class bodies) in ``code``."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if path and const.co_name == path[0]:
                found = _find_code(const, name, path[1:])
                if found is not None:
                    return found
            elif not path and const.co_name == name:
                return const
    return None


def _live_function(owner: Any, name: str) -> types.FunctionType | None:
    obj = owner.__dict__.get(name) if hasattr(owner, "__dict__") else None
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj if isinstance(obj, types.FunctionType) else None


def _patch_module_devices(module: types.ModuleType, root: Path) -> list[str]:
    """Rewrite the CUDA device strings of the functions and methods defined at the top of ``module``."""
    if module.__dict__.get(_PATCHED_MARK) or module.__dict__.get(_STUB_MARK):
        return []
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return []
    path = Path(file).resolve()
    if root not in path.parents:
        return []
    source = path.read_text(encoding="utf-8")
    module.__dict__[_PATCHED_MARK] = True
    if "cuda" not in source:
        return []
    tree = ast.parse(source, filename=str(path))
    targets: list[tuple[Any, ast.FunctionDef | ast.AsyncFunctionDef, tuple[str, ...]]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            targets.append((module, node, ()))
        elif isinstance(node, ast.ClassDef) and isinstance(module.__dict__.get(node.name), type):
            cls = module.__dict__[node.name]
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    targets.append((cls, sub, (node.name,)))
    patched = []
    for owner, node, class_path in targets:
        rewriter = _CudaStringRewriter()
        new_node = rewriter.visit(copy.deepcopy(node))
        if rewriter.count == 0:
            continue
        qualname = ".".join((module.__name__, *class_path, node.name))
        func = _live_function(owner, node.name)
        if func is None or func.__code__.co_filename != str(path) or func.__code__.co_name != node.name:
            logger.warning("easyeditor compat: %s is not a plain function defined in %s; its hard-coded CUDA "
                           "device was left as is", qualname, path)
            continue
        body: ast.stmt = new_node
        for cls_name in reversed(class_path):
            body = ast.ClassDef(name=cls_name, bases=[], keywords=[], body=[body], decorator_list=[])
        wrapper = ast.fix_missing_locations(ast.Module(body=[body], type_ignores=[]))
        new_code = _find_code(compile(wrapper, str(path), "exec"), node.name, class_path)
        if new_code is None or new_code.co_freevars != func.__code__.co_freevars:
            logger.warning("easyeditor compat: could not rebuild %s; its hard-coded CUDA device was left as is",
                           qualname)
            continue
        func.__code__ = new_code
        patched.append(qualname)
    if patched:
        module.__dict__[_DEVICE_HELPER_NAME] = easyeditor_device
    return patched


def _patch_loaded_devices(root: Path) -> list[str]:
    patched: list[str] = []
    for name in sorted(sys.modules):
        if name == "easyeditor" or name.startswith("easyeditor."):
            module = sys.modules.get(name)
            if isinstance(module, types.ModuleType):
                patched.extend(_patch_module_devices(module, root))
    return patched


# ---------------------------------------------------------------------------------------------------- multimodal --
class _StubModule(types.ModuleType):
    """A stand-in for an easyeditor multimodal module that cannot be imported here."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, f"crispedit_easyedit stub: {name} is disabled ({reason})")
        self.__dict__[_STUB_MARK] = True
        self.__dict__["__crispedit_reason__"] = reason
        self.__path__: list[str] = []  # a package: `from .stub.sub import X` fails with ModuleNotFoundError
        self.__all__: list[str] = []

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        module_name, reason = self.__name__, self.__dict__["__crispedit_reason__"]

        def _unavailable(*_args: Any, **_kwargs: Any) -> None:
            raise ImportError(f"{module_name}.{attr} is unavailable: crispedit_easyedit disabled {module_name} "
                              f"because {reason}; multimodal editing needs EasyEdit's vision dependencies")

        placeholder = type(attr, (), {"__init__": _unavailable, "__module__": module_name,
                                      "__doc__": f"Placeholder: {module_name} is disabled ({reason})."})
        self.__dict__[attr] = placeholder
        return placeholder


def _missing(packages: tuple[str, ...]) -> list[str]:
    out = []
    for pkg in packages:
        try:
            if importlib.util.find_spec(pkg) is None:
                out.append(pkg)
        except (ImportError, ValueError):
            out.append(pkg)
    return out


def _install_stubs(root: Path, force: bool) -> list[str]:
    stubbed = []
    for rel, deps in MULTIMODAL_MODULES.items():
        full = f"easyeditor.{rel}"
        rel_path = root.joinpath(*rel.split("."))
        if not (rel_path.with_suffix(".py").is_file() or (rel_path / "__init__.py").is_file()):
            continue
        existing = sys.modules.get(full)
        if existing is not None and existing.__dict__.get(_STUB_MARK):
            stubbed.append(full)
            continue
        missing = _missing(deps)
        if not force and not missing:
            continue
        reason = (f"its dependencies {', '.join(missing)} are not installed" if missing
                  else "its vision dependencies do not import in this environment")
        sys.modules[full] = _StubModule(full, reason)
        stubbed.append(full)
        logger.info("easyeditor compat: stubbed %s (%s)", full, reason)
    return stubbed


def _failed_in_multimodal(exc: BaseException, root: Path) -> bool:
    prefixes = [str(root.joinpath(*rel.split("."))) for rel in MULTIMODAL_MODULES]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if any(filename.startswith(prefix) for prefix in prefixes):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


def _purge_easyeditor() -> None:
    for name in [n for n in sys.modules if n == "easyeditor" or n.startswith("easyeditor.")]:
        if not sys.modules[name].__dict__.get(_STUB_MARK):
            del sys.modules[name]


def _import_with_stubs(root: Path, force: bool) -> list[str]:
    stubbed = _install_stubs(root, force=force)
    try:
        importlib.import_module("easyeditor")
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the known multimodal failure
        if force or not _failed_in_multimodal(exc, root):
            raise
        logger.info("easyeditor compat: import failed inside a multimodal module (%s: %s); retrying with all "
                    "multimodal modules stubbed", type(exc).__name__, exc)
        _purge_easyeditor()
        stubbed = _install_stubs(root, force=True)
        importlib.import_module("easyeditor")
    return stubbed


# -------------------------------------------------------------------------------------------------------- public --
def prepare_easyeditor_for_text() -> Generation:
    """:func:`prepare_easyeditor`; if the plain import fails inside a multimodal module (GitHub main beside a CPU
    torch, where timm/torchvision cannot install), import again with those modules stubbed, logged at INFO. Text
    editing and EasyEdit's evaluator never use them.

    Raises:
        ModuleNotFoundError / ImportError: as :func:`prepare_easyeditor`, for any other failure.
    """
    try:
        return prepare_easyeditor()
    except ImportError as err:
        root = easyeditor_location()
        if root is None or not _failed_in_multimodal(err, root):
            raise
        logger.info("easyeditor failed to import inside a multimodal module (%s: %s); importing it with the "
                    "multimodal modules stubbed", type(err).__name__, err)
        _purge_easyeditor()
        return prepare_easyeditor(neutralise_multimodal=True)


def prepare_easyeditor(neutralise_multimodal: bool | None = None) -> Generation:
    """Import ``easyeditor`` so that CrispEdit can be registered and run; idempotent.

    Args:
        neutralise_multimodal: None (default): stub multimodal modules only for the PyPI generation, and only those
            that cannot import. True: stub all of them for either generation. False: never stub.

    Returns:
        The generation found: ``"pypi"`` or ``"github-main"``.

    Raises:
        ModuleNotFoundError: ``easyeditor`` is not installed.
        ImportError: ``easyeditor`` fails to import for another reason (e.g. a missing text-editing dependency).
    """
    generation = detect_generation()
    root = easyeditor_location()
    if generation is None or root is None:
        raise ModuleNotFoundError(
            "easyeditor is not installed: install the PyPI package with `pip install --no-deps "
            "easyeditor==0.0.1.dev0` plus the `easyedit` extra, or put a checkout of EasyEdit's GitHub main on "
            "PYTHONPATH")
    stub = neutralise_multimodal if neutralise_multimodal is not None else (generation == PYPI)
    if "easyeditor" not in sys.modules:
        _purge_easyeditor()  # leftovers of an earlier failed import would be reused half-initialised
        if stub:
            _state["stubbed"] = _import_with_stubs(root, force=bool(neutralise_multimodal))
        else:
            importlib.import_module("easyeditor")
    if generation == PYPI and not torch.cuda.is_available():
        newly = _patch_loaded_devices(root)
        if newly:
            logger.info("easyeditor compat: CUDA unavailable; rewrote hard-coded 'cuda:' devices in %d "
                        "easyeditor functions", len(newly))
        _state["patched"].extend(newly)
    _state["generation"] = generation
    return generation


def stubbed_modules() -> list[str]:
    """Full names of the easyeditor modules replaced by stubs (empty unless stubs were needed)."""
    return list(_state["stubbed"])


def patched_functions() -> list[str]:
    """Qualified names of the easyeditor functions whose hard-coded CUDA devices were rewritten."""
    return list(_state["patched"])


class ModelPair(tuple):
    """An already loaded ``(model, tokenizer)`` to pass as ``hparams.model_name`` to EasyEdit.

    EasyEdit unpacks a non-string ``model_name`` into ``model, tok`` and later calls ``model_name.lower()`` in its
    evaluators to pick a metric by model family; ``lower()`` returns the lower-cased ``name``.

    Example:
        >>> pair = ModelPair(model, tok, name="llama-tiny")  # doctest: +SKIP
        >>> hparams.model_name = pair  # doctest: +SKIP
    """

    name: str

    def __new__(cls, model: Any, tokenizer: Any, name: str | None = None) -> ModelPair:
        obj = super().__new__(cls, (model, tokenizer))
        config = getattr(model, "config", None)
        obj.name = name or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "model"
        return obj

    def lower(self) -> str:
        """The lower-cased model name (what EasyEdit's evaluators match substrings against)."""
        return self.name.lower()

    def __repr__(self) -> str:
        return f"ModelPair(name={self.name!r}, model={type(self[0]).__name__}, tokenizer={type(self[1]).__name__})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ModelPair, (self[0], self[1], self.name))

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelPair:
        # Models are not copied when hparams are (EasyEdit never needs a second model).
        return self
