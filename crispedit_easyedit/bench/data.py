"""Benchmark records (ZsRE, CounterFact, WikiBigEdit, and the embedded Factbook set) -> EasyEdit edit requests.

Every request is a dict in EasyEdit's request layout::

    {
        "case_id": int,                 # index of the record in its file (CounterFact: its own case_id)
        "prompt": str,
        "target_new": str,
        "ground_truth": str | None,     # None only for WikiBigEdit records that carry none
        "rephrase_prompt": str,         # omitted when the record has none (or only the placeholder)
        "subject": str,                 # omitted when missing or not a substring of the prompt
        "locality": {"neighborhood": {"prompt": str, "ground_truth": str}},   # {} when the record has none
        "portability": {...},           # WikiBigEdit release form: "personas" / "mhop"; else {}
        "loc_prompt": str,              # locality prompt + " " + its answer, as EasyEdit main's WISE/GRACE use it
    }

Field mapping:

- ZsRE (MEND files): prompt = ``src``, target_new = ``alt``, ground_truth = ``answers[0]``, rephrase_prompt =
  ``rephrase``, locality = ``loc`` without its leading ``"nq question: "`` / ``loc_ans``, subject = ``subject``.
- CounterFact, either EasyEdit's "counterfact-edit" form with the EasyEdit names ``prompt, target_new,
  ground_truth, rephrase_prompt, subject, locality_prompt, locality_ground_truth``, or the ROME/MEMIT release form
  (``counterfact.json``, ``multi_counterfact.json``): prompt = ``requested_rewrite.prompt`` with ``{}`` replaced by
  ``requested_rewrite.subject``, target_new / ground_truth = ``requested_rewrite.target_new.str`` /
  ``target_true.str``, rephrase_prompt = ``paraphrase_prompts[0]``, locality = ``neighborhood_prompts[0]`` with the
  true target as its answer (neighbours share the subject's true object). The form is detected per record.
- WikiBigEdit, either CrispEdit's 6-field form (``prompt, target_new, subject, rephrase_prompt, locality_prompt,
  locality_ground_truth``, optional ``ground_truth``) or the original release form as EasyEdit main's
  ``WikiBigEditDataset`` reads it: prompt = ``update``, target_new = ``ans``, rephrase_prompt = ``rephrase``,
  locality = ``loc`` / ``loc_ans``, portability ``personas`` (prompt ``personas``, answer ``ans``) and ``mhop``
  (prompt ``mhop``, answer ``mhop_ans``), optional ``ground_truth``. The form is detected per record.

Records lacking a required field (prompt, target_new, and ground_truth for ZsRE and CounterFact) are skipped and
counted per reason in :attr:`RequestSet.skipped`; missing optional fields are counted in
:attr:`RequestSet.missing`. The literal rephrase placeholder ``"Reformulated Question:"`` counts as a missing
rephrase. All strings are stripped of surrounding whitespace.

Files are ``.json`` lists or ``.jsonl`` lines, given by path or as ``"hf:<owner>/<name>[:<file>]"`` (a file of a
hub dataset repository, fetched by ``huggingface_hub``; needs internet the first time). The dataset ``"factbook"``
is generated, not read (:mod:`crispedit_easyedit.bench.factbook_edits`); :func:`default_dataset` says which dataset is
used when none is named.

This module never imports EasyEdit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("factbook", "zsre", "counterfact", "wikibigedit")
#: The embedded edit set (:mod:`crispedit_easyedit.bench.factbook_edits`): generated, never read from a file.
EMBEDDED_DATASET = "factbook"
#: Benchmarks read from files.
FILE_DATASETS: tuple[str, ...] = ("zsre", "counterfact", "wikibigedit")
#: File names of the records that :func:`default_data_path` looks for.
DEFAULT_FILES: dict[str, str] = {
    "zsre": "zsre_eval.json",
    "counterfact": "counterfact.json",
    "wikibigedit": "wikibigedit.json",
}
DATA_DIR_ENV = "CRISPEDIT_DATA_DIR"
REPHRASE_PLACEHOLDER = "Reformulated Question:"
LOCALITY_KEY = "neighborhood"
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", re.IGNORECASE)


@dataclass
class RequestSet:
    """Edit requests read from a benchmark file.

    Attributes:
        requests: EasyEdit request dicts (see the module docstring), in file order.
        skipped: Number of records skipped, per reason (e.g. ``{"missing_target_new": 2}``).
        source: Where the records came from (a path, or a description).
        dataset: ``"zsre"``, ``"counterfact"`` or ``"wikibigedit"``.
        start: Index of the first record read.
        stop: One past the index of the last record read.
        missing: Number of kept requests that lack an optional field, per field (e.g. ``{"rephrase_prompt": 3}``).
    """

    requests: list[dict[str, Any]]
    skipped: dict[str, int]
    source: str
    dataset: str = ""
    start: int = 0
    stop: int = 0
    missing: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.requests)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.requests[index]

    @property
    def n_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())


# --------------------------------------------------------------------------------------------------------------------
# Building one request (shared with the EasyEdit adapter so both paths agree)
# --------------------------------------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A stripped non-empty string, or None for missing / empty / non-string values."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def strip_nq_prefix(prompt: str) -> str:
    """Remove ZsRE's leading ``"nq question: "`` from a locality prompt."""
    return _NQ_PREFIX.sub("", prompt, count=1)


def _locality_text(value: Any) -> str | None:
    """A locality prompt as requests carry it: stripped, ZsRE's "nq question: " removed; None when empty."""
    text = _text(value)
    return None if text is None else _text(strip_nq_prefix(text))


def make_request(
    *,
    case_id: int,
    prompt: Any,
    target_new: Any,
    ground_truth: Any,
    ground_truth_required: bool,
    rephrase_prompt: Any = None,
    subject: Any = None,
    locality_prompt: Any = None,
    locality_ground_truth: Any = None,
    portability: Mapping[str, tuple[Any, Any]] | None = None,
) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """Validate raw field values and build one EasyEdit request.

    Args:
        case_id: Record identifier stored in the request.
        prompt, target_new, ground_truth, rephrase_prompt, subject, locality_prompt, locality_ground_truth: Raw
            values (stripped; empty or non-string values count as missing).
        ground_truth_required: Skip the record when ground_truth is missing (else store None).
        portability: ``{key: (prompt, answer)}``; pairs with a missing member are left out.

    Returns:
        ``(request, None, missing_optional_fields)`` or ``(None, skip_reason, [])``.
    """
    prompt_s, target_s, truth_s = _text(prompt), _text(target_new), _text(ground_truth)
    if prompt_s is None:
        return None, "missing_prompt", []
    if target_s is None:
        return None, "missing_target_new", []
    if truth_s is None and ground_truth_required:
        return None, "missing_ground_truth", []

    missing: list[str] = []
    request: dict[str, Any] = {
        "case_id": case_id,
        "prompt": prompt_s,
        "target_new": target_s,
        "ground_truth": truth_s,
    }
    if truth_s is None:
        missing.append("ground_truth")

    rephrase_s = _text(rephrase_prompt)
    if rephrase_s is None or rephrase_s == REPHRASE_PLACEHOLDER:
        missing.append("rephrase_prompt")
    else:
        request["rephrase_prompt"] = rephrase_s

    subject_s = _text(subject)
    if subject_s is None or subject_s not in prompt_s:
        missing.append("subject")
    else:
        request["subject"] = subject_s

    loc_prompt_s, loc_answer_s = _locality_text(locality_prompt), _text(locality_ground_truth)
    if loc_prompt_s is None or loc_answer_s is None:
        missing.append("locality")
        request["locality"] = {}
    else:
        request["locality"] = {LOCALITY_KEY: {"prompt": loc_prompt_s, "ground_truth": loc_answer_s}}
        request["loc_prompt"] = f"{loc_prompt_s} {loc_answer_s}"

    request["portability"] = {}
    for key, (port_prompt, port_answer) in (portability or {}).items():
        port_prompt_s, port_answer_s = _text(port_prompt), _text(port_answer)
        if port_prompt_s is None or port_answer_s is None:
            missing.append(f"portability.{key}")
        else:
            request["portability"][key] = {"prompt": port_prompt_s, "ground_truth": port_answer_s}
    return request, None, missing


def _first(value: Any) -> Any:
    """The first element of a non-empty list (None for an empty or missing one); other values unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[0] if value else None
    return value


def _zsre_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prompt": record.get("src"),
        "target_new": record.get("alt"),
        "ground_truth": _first(record.get("answers")),
        "ground_truth_required": True,
        "rephrase_prompt": record.get("rephrase"),
        "subject": record.get("subject"),
        "locality_prompt": record.get("loc"),
        "locality_ground_truth": record.get("loc_ans"),
    }


def is_rome_counterfact_form(record: Mapping[str, Any]) -> bool:
    """Whether a CounterFact record uses the ROME/MEMIT release fields (``requested_rewrite``, ...)."""
    return isinstance(record.get("requested_rewrite"), Mapping)


def _rome_counterfact_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    rewrite = record["requested_rewrite"]
    template, subject = rewrite.get("prompt"), rewrite.get("subject")
    prompt = template.replace("{}", subject) if isinstance(template, str) and isinstance(subject, str) else None
    truth = (rewrite.get("target_true") or {}).get("str")
    return {
        "prompt": prompt,
        "target_new": (rewrite.get("target_new") or {}).get("str"),
        "ground_truth": truth,
        "ground_truth_required": True,
        "rephrase_prompt": _first(record.get("paraphrase_prompts")),
        "subject": subject,
        "locality_prompt": _first(record.get("neighborhood_prompts")),
        "locality_ground_truth": truth,
    }


def _counterfact_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    if is_rome_counterfact_form(record):
        return _rome_counterfact_fields(record)
    return {
        "prompt": record.get("prompt"),
        "target_new": record.get("target_new"),
        "ground_truth": record.get("ground_truth"),
        "ground_truth_required": True,
        "rephrase_prompt": record.get("rephrase_prompt"),
        "subject": record.get("subject"),
        "locality_prompt": record.get("locality_prompt"),
        "locality_ground_truth": record.get("locality_ground_truth"),
    }


def is_wikibigedit_release_form(record: Mapping[str, Any]) -> bool:
    """Whether a WikiBigEdit record uses the original release fields (``update``, ``ans``, ...)."""
    return "update" in record or "ans" in record


def _wikibigedit_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    if is_wikibigedit_release_form(record):
        return {
            "prompt": record.get("update"),
            "target_new": record.get("ans"),
            "ground_truth": record.get("ground_truth"),
            "ground_truth_required": False,
            "rephrase_prompt": record.get("rephrase"),
            "subject": record.get("subject"),
            "locality_prompt": record.get("loc"),
            "locality_ground_truth": record.get("loc_ans"),
            "portability": {
                "personas": (record.get("personas"), record.get("ans")),
                "mhop": (record.get("mhop"), record.get("mhop_ans")),
            },
        }
    fields = _counterfact_fields(record)
    fields["ground_truth_required"] = False
    return fields


_FIELD_MAPPERS = {"zsre": _zsre_fields, "counterfact": _counterfact_fields, "wikibigedit": _wikibigedit_fields}


def locality_prompt(dataset: str, record: Mapping[str, Any]) -> str | None:
    """The locality prompt a request of ``record`` carries (ZsRE's ``loc`` without "nq question: ", CounterFact's
    neighbourhood prompt, ...), whether or not the record's other fields make a valid request; None when absent."""
    _check_dataset(dataset)
    return _locality_text(_FIELD_MAPPERS[dataset](record).get("locality_prompt"))


def record_to_request(
    dataset: str, record: Mapping[str, Any], index: int
) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """Map one raw benchmark record to a request; see :func:`make_request` for the return value."""
    _check_dataset(dataset)
    if not isinstance(record, Mapping):
        return None, "not_an_object", []
    case_id = record.get("case_id", index) if dataset == "counterfact" else index
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        case_id = index
    return make_request(case_id=case_id, **_FIELD_MAPPERS[dataset](record))


# --------------------------------------------------------------------------------------------------------------------
# Files and ranges
# --------------------------------------------------------------------------------------------------------------------


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; valid choices: {list(DATASETS)}.")


def default_dataset(data_path: str | os.PathLike[str] | None = None) -> str:
    """The dataset used when none is named.

    ``"zsre"`` when a benchmark file is configured (``data_path`` given, or ``$CRISPEDIT_DATA_DIR`` set and not
    empty), as before the embedded set existed; otherwise ``"factbook"``, the embedded edit set, which needs no file.
    A sibling ``../shared/data`` folder alone does not count as configuring one: the same command edits the same
    records on every machine.
    """
    if data_path is not None or os.environ.get(DATA_DIR_ENV):
        return "zsre"
    return EMBEDDED_DATASET


HF_PREFIX = "hf:"
_RECORD_SUFFIXES = (".json", ".jsonl")


def resolve_records_path(path: str | os.PathLike[str]) -> Path:
    """A local records file for a path or a hub dataset spec.

    ``"hf:<owner>/<name>:<file>"`` downloads ``<file>`` (a ``.json`` or ``.jsonl`` file as the dataset repository
    publishes it) with ``huggingface_hub.hf_hub_download`` into the hub cache, or takes it from that cache when
    offline (``HF_HUB_OFFLINE=1``); ``"hf:<owner>/<name>"`` does the same when the repository holds exactly one such
    file (listing it needs internet). Anything else is a local path.

    Raises:
        ValueError: for a spec without a repository, a file that is not ``.json``/``.jsonl``, or a repository that
            does not hold exactly one records file (naming those it holds).
        FileNotFoundError: when the file cannot be fetched (no internet, not cached, no such repository or file).
    """
    text = os.fspath(path)
    if not text.startswith(HF_PREFIX):
        return Path(text)
    repo, _, filename = text[len(HF_PREFIX):].partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{text!r} names no hub dataset; valid form: 'hf:<owner>/<name>[:<file>.json|.jsonl]'.")
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if not filename:
            files = [f for f in list_repo_files(repo, repo_type="dataset") if f.lower().endswith(_RECORD_SUFFIXES)]
            if len(files) != 1:
                raise ValueError(f"hub dataset {repo!r} holds {len(files)} .json/.jsonl files {files[:20]}; name "
                                 f"one: 'hf:{repo}:<file>'.")
            filename = files[0]
        if not filename.lower().endswith(_RECORD_SUFFIXES):
            raise ValueError(f"{text!r}: the records file must end in .json or .jsonl, got {filename!r}.")
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except ValueError:
        raise
    except Exception as err:  # the hub's errors: offline, not cached, unknown repository or file, HTTP errors
        raise FileNotFoundError(
            f"could not get {filename or 'the records file'!r} of hub dataset {repo!r} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}). Without internet, pass a local file with --data-path or set "
            f"{DATA_DIR_ENV}."
        ) from err


def read_records(path: str | os.PathLike[str]) -> list[Any]:
    """Read benchmark records from a JSON list (``.json``) or JSON lines (``.jsonl``) file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Benchmark file {str(path)!r} is a folder; give a .json or .jsonl records file.")
    if not path.is_file():
        raise FileNotFoundError(f"Benchmark file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
        return records
    try:
        with path.open(encoding="utf-8") as handle:
            records = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON (truncated or damaged?): {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(records).__name__}.")
    return records


def check_range(n_records: int, start: int, count: int | None, source: str = "the file") -> int:
    """Validate ``start``/``count`` against ``n_records`` and return the stop index.

    Raises:
        ValueError: naming the valid range.
    """
    if not isinstance(start, int) or not 0 <= start < n_records:
        raise ValueError(f"start={start!r} is out of range for {source} with {n_records} records; "
                         f"valid: 0 <= start <= {n_records - 1}.")
    if count is None:
        return n_records
    if not isinstance(count, int) or not 1 <= count <= n_records - start:
        raise ValueError(f"count={count!r} is out of range for start={start} in {source} with {n_records} records; "
                         f"valid: 1 <= count <= {n_records - start} (or None for all remaining records).")
    return start + count


def build_request_set(
    dataset: str,
    indexed_records: Sequence[tuple[int, Mapping[str, Any]]],
    source: str,
    start: int,
    stop: int,
    extra_skipped: Mapping[str, int] | None = None,
) -> RequestSet:
    """Convert ``(index, record)`` pairs into a :class:`RequestSet`, counting skips and missing fields."""
    requests: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter(extra_skipped or {})
    missing: Counter[str] = Counter()
    for index, record in indexed_records:
        request, reason, missing_fields = record_to_request(dataset, record, index)
        if request is None:
            skipped[reason or "invalid"] += 1
        else:
            requests.append(request)
            missing.update(missing_fields)
    result = RequestSet(requests=requests, skipped=dict(skipped), source=source, dataset=dataset, start=start,
                        stop=stop, missing=dict(missing))
    if result.skipped:
        logger.warning("%s records %d-%d: skipped %d records %s.", source, start, stop - 1, result.n_skipped,
                       result.skipped)
    if result.missing:
        logger.info("%s records %d-%d: requests lacking optional fields: %s.", source, start, stop - 1,
                    result.missing)
    return result


def load_requests(
    dataset: str,
    path: str | os.PathLike[str] | None = None,
    start: int = 0,
    count: int | None = None,
) -> RequestSet:
    """Load edit requests of a benchmark.

    Args:
        dataset: ``"factbook"`` (the embedded set, :mod:`crispedit_easyedit.bench.factbook_edits`, default seed; it takes
            no path), ``"zsre"``, ``"counterfact"`` or ``"wikibigedit"``.
        path: A ``.json`` list or ``.jsonl`` file of records, or ``"hf:<owner>/<name>[:<file>]"`` (see
            :func:`resolve_records_path`); default :func:`default_data_path` ``(dataset)``.
        start: Index of the first record in the file (records, not requests: skipped records still count).
        count: Number of records to read from ``start``; None reads to the end.

    Returns:
        A :class:`RequestSet`; its ``source`` is the path or hub spec as given (or the embedded set's description).

    Raises:
        ValueError: for an unknown dataset, a path given with ``"factbook"`` or an out-of-range ``start``/``count``
            (naming the valid range).
        FileNotFoundError: if the file does not exist or cannot be fetched from the hub.
    """
    _check_dataset(dataset)
    if dataset == EMBEDDED_DATASET:
        if path is not None:
            raise ValueError(f"dataset {EMBEDDED_DATASET!r} is the embedded edit set and reads no file (got "
                             f"{os.fspath(path)!r}); name the file's benchmark instead, one of {list(FILE_DATASETS)}.")
        from .factbook_edits import factbook_edits

        return factbook_edits(start=start, count=count)
    source = os.fspath(path) if path is not None else None
    file = resolve_records_path(path) if path is not None else default_data_path(dataset)
    source = source or str(file)
    records = read_records(file)
    stop = check_range(len(records), start, count, source=source)
    return build_request_set(dataset, [(i, records[i]) for i in range(start, stop)], source, start, stop)


def _repository_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def default_data_path(dataset: str) -> Path:
    """The default records file of ``dataset``.

    Looks for :data:`DEFAULT_FILES` ``[dataset]`` in ``$CRISPEDIT_DATA_DIR``, then in ``../shared/data`` relative to
    the git repository that contains the current working directory (or to the working directory itself).

    Raises:
        ValueError: for an unknown dataset.
        FileNotFoundError: naming every place tried and how to fix it.
    """
    _check_dataset(dataset)
    if dataset == EMBEDDED_DATASET:
        raise ValueError(f"dataset {EMBEDDED_DATASET!r} is the embedded edit set and has no file; files exist for "
                         f"{list(FILE_DATASETS)}.")
    name = DEFAULT_FILES[dataset]
    candidates: list[Path] = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        candidates.append(Path(env).expanduser() / name)
    cwd = Path.cwd()
    root = _repository_root(cwd)
    for base in ([root] if root is not None else []) + [cwd]:
        candidate = base.parent / "shared" / "data" / name
        if candidate not in candidates:
            candidates.append(candidate)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"No {dataset} records found (looked for {tried}). Pass the file path explicitly, or set "
        f"{DATA_DIR_ENV} to a folder containing {name}."
    )
