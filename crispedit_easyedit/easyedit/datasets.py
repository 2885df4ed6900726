"""Read benchmark records through EasyEdit's own dataset classes and convert them into CrispEdit requests.

This mirrors :func:`crispedit_easyedit.bench.data.load_requests`, but lets EasyEdit parse the files
(``ZsreDataset``, ``CounterFactDataset`` and, on EasyEdit's GitHub main, ``WikiBigEditDataset``), so users can check
that both paths give the same requests. EasyEdit is imported lazily inside the functions.

Differences of EasyEdit's readers that this module compensates for:

- ``ZsreDataset`` drops the ``subject`` field and silently skips records whose ``alt`` is empty; the subject is
  read back from the raw record (by ``case_id``) and the dropped records are counted as ``missing_target_new``.
  It also asserts that every ``loc`` contains ``"nq question: "``.
- ``CounterFactDataset`` reads only the counterfact-edit form; files in ROME's release form (``requested_rewrite``)
  are read with :func:`crispedit_easyedit.bench.data.load_requests` instead (logged at INFO).
- The embedded ``"factbook"`` set has no file: it always comes from :func:`crispedit_easyedit.bench.data.load_requests`.
- ``WikiBigEditDataset`` (GitHub main only) reads only the original release form (``update``, ``ans``, ...). For
  files in CrispEdit's 6-field form, or on the PyPI EasyEdit that has no such class, the records are read with
  :func:`crispedit_easyedit.bench.data.load_requests` instead (logged at INFO).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crispedit_easyedit.bench.data import (
    EMBEDDED_DATASET,
    RequestSet,
    _check_dataset,
    build_request_set,
    check_range,
    default_data_path,
    is_rome_counterfact_form,
    is_wikibigedit_release_form,
    load_requests,
    read_records,
    resolve_records_path,
)

logger = logging.getLogger(__name__)


def import_easyeditor() -> Any:
    """Import ``easyeditor``, applying ``crispedit_easyedit.easyedit.compat.prepare_easyeditor()`` first if present.

    Raises:
        ImportError: if EasyEdit cannot be imported (the message says how to install it).
    """
    try:
        compat = importlib.import_module("crispedit_easyedit.easyedit.compat")
    except ModuleNotFoundError as err:
        if err.name != "crispedit_easyedit.easyedit.compat":
            raise
        compat = None
    if compat is not None and hasattr(compat, "prepare_easyeditor"):
        compat.prepare_easyeditor()
    try:
        return importlib.import_module("easyeditor")
    except ImportError as err:
        raise ImportError(
            "EasyEdit (the 'easyeditor' package) could not be imported: "
            f"{type(err).__name__}: {err}. Install it (`pip install --no-deps easyeditor` plus its imports, see the "
            "'easyedit' extra) or clone zjunlp/EasyEdit and put it on PYTHONPATH."
        ) from err


def _quiet(factory: Any, *args: Any) -> Any:
    """Call an EasyEdit constructor, routing what it prints to this module's logger at DEBUG."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = factory(*args)
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("easyeditor: %s", line)
    return result


def _zsre_records(module: Any, file: Path, raw: list[Any], start: int, stop: int) -> tuple[list, dict[str, int]]:
    try:
        dataset = _quiet(module.ZsreDataset, str(file))
    except AssertionError as err:
        raise ValueError(
            f"EasyEdit's ZsreDataset rejected {file}: {err} (it needs 'nq question: ' in every 'loc')."
        ) from err
    items: list[tuple[int, dict[str, Any]]] = []
    for item in dataset:
        case_id = item["case_id"]
        if not start <= case_id < stop:
            continue
        source = raw[case_id] if isinstance(raw[case_id], Mapping) else {}
        # Re-express the EasyEdit item in ZsRE's own field names, adding back the subject EasyEdit drops.
        items.append((case_id, {
            "src": item["prompt"],
            "alt": item["target_new"],
            "answers": [item["ground_truth"]],
            "rephrase": item["rephrase_prompt"],
            "loc": item["locality_prompt"],
            "loc_ans": item["locality_ground_truth"],
            "subject": source.get("subject"),
        }))
    dropped = (stop - start) - len(items)  # ZsreDataset only drops records whose "alt" is empty
    return items, ({"missing_target_new": dropped} if dropped else {})


def _counterfact_records(module: Any, file: Path, start: int, stop: int) -> tuple[list, dict[str, int]]:
    dataset = _quiet(module.CounterFactDataset, str(file), stop)
    return [(i, dataset[i]) for i in range(start, stop)], {}


def _wikibigedit_records(module: Any, file: Path, start: int, stop: int) -> tuple[list, dict[str, int]]:
    dataset = _quiet(module.WikiBigEditDataset, str(file), stop)
    items = []
    for i in range(start, stop):
        item = dataset[i]
        # Back to the release field names that the core mapping reads.
        items.append((i, {
            "update": item["prompt"],
            "ans": item["target_new"],
            "ground_truth": item["ground_truth"],
            "rephrase": item["rephrase"],
            "subject": item["subject"],
            "personas": item["portability_personas"],
            "mhop": item["portability_hop"],
            "mhop_ans": item["portability_hop_ans"],
            "loc": item["locality"],
            "loc_ans": item["locality_ans"],
        }))
    return items, {}


def load_requests_with_easyedit(
    dataset: str,
    path: str | os.PathLike[str] | None = None,
    start: int = 0,
    count: int | None = None,
) -> RequestSet:
    """Like :func:`crispedit_easyedit.bench.data.load_requests`, but the records are parsed by EasyEdit's dataset classes.

    Args:
        dataset: ``"zsre"``, ``"counterfact"`` or ``"wikibigedit"``.
        path: The records file; default :func:`crispedit_easyedit.bench.data.default_data_path` ``(dataset)``.
        start: Index of the first record in the file.
        count: Number of records from ``start``; None reads to the end.

    Returns:
        A :class:`~crispedit_easyedit.bench.data.RequestSet` whose ``source`` starts with ``"easyeditor:"`` when EasyEdit
        parsed the records.

    Raises:
        ValueError: for an unknown dataset or an out-of-range ``start``/``count``.
        ImportError: if EasyEdit cannot be imported.
    """
    _check_dataset(dataset)
    if dataset == EMBEDDED_DATASET:
        logger.info("The embedded %r set is generated, not parsed: crispedit_easyedit.bench.data.load_requests.", dataset)
        return load_requests(dataset, path, start, count)
    file = resolve_records_path(path) if path is not None else default_data_path(dataset)
    raw = read_records(file)
    stop = check_range(len(raw), start, count, source=str(file))
    module = import_easyeditor()

    if dataset == "zsre":
        items, extra = _zsre_records(module, file, raw, start, stop)
    elif dataset == "counterfact":
        if any(isinstance(r, Mapping) and is_rome_counterfact_form(r) for r in raw[start:stop]):
            logger.info("Reading %s with crispedit_easyedit.bench.data.load_requests: CounterFactDataset reads only the "
                        "counterfact-edit form, not ROME's release form.", file)
            return load_requests(dataset, file, start, count)
        items, extra = _counterfact_records(module, file, start, stop)
    else:
        release_form = all(isinstance(r, Mapping) and is_wikibigedit_release_form(r) for r in raw[start:stop])
        if not hasattr(module, "WikiBigEditDataset") or not release_form:
            why = ("this EasyEdit has no WikiBigEditDataset" if not hasattr(module, "WikiBigEditDataset")
                   else "the file is not in WikiBigEdit's release form, the only form WikiBigEditDataset reads")
            logger.info("Reading %s with crispedit_easyedit.bench.data.load_requests: %s.", file, why)
            return load_requests(dataset, file, start, count)
        items, extra = _wikibigedit_records(module, file, start, stop)
    return build_request_set(dataset, items, f"easyeditor:{file}", start, stop, extra_skipped=extra)
