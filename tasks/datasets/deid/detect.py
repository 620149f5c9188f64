"""The one PII detector: Presidio's checksummed recognizers plus tuneloop's, run with prefilters.

`find_pii` is what the scrubber, the gate's "no PII" expectation, the file scan and `tuneloop
scrub --report` all call, so they cannot disagree about what PII is.

Presidio supplies the recognizers that validate what they find: credit cards (Luhn), IBANs
(mod-97), IPv4/IPv6 (`ipaddress`), phone numbers (Google's `phonenumbers`, VALID leniency, for
US/GB/DE/FR/IN/BR), US SSNs, UK NINOs, Aadhaar numbers (Verhoeff) and Indian PANs. tuneloop adds
emails, secrets, secret-bearing URLs, dates of birth, street addresses and names
(`tasks.datasets.deid.recognizers`, `.names`). When `TUNELOOP_DEID_SPACY_MODEL` names an
installed spaCy model (a package such as ``en_core_web_sm`` or a model folder), Presidio's spaCy
NER adds the PERSON entities it finds; the offline default needs no model.

The detectors run over the `DetectionView` (NFKC-folded, invisible characters dropped) and are
not run through Presidio's `AnalyzerEngine`: each recognizer is guarded by a cheap trigger (no
``@`` → no email search; fewer than 7 digits → no phone search), weak patterns count only with a
context word nearby, and overlapping findings are merged in one sorted sweep — which keeps the
whole pass linear in the text and ~10x faster than the engine's tokenise-everything pipeline.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from tasks.datasets.deid.view import DetectionView

_EPOCH = re.compile(r"1[5-9]\d{8}|1[5-9]\d{11}")
_DATE_LIKE = re.compile(r"\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{4}[./-]\d{1,2}[./-]\d{1,2}")
# Card numbers by issuer prefix (Visa, Mastercard incl. 2-series, Amex, Discover), 13-19 digits
# with optional single spaces or dashes; the Luhn check is Presidio's.
_CARD = (r"(?<![\w-])(?:(?:4\d|5[1-5]|2[2-7]|6[05])(?:[ -]?\d){11,17}|3[47](?:[ -]?\d){13})"
         r"(?!\w)")

# Every category, in the order a tie between two equally long overlapping findings is settled.
CATEGORIES: tuple[str, ...] = (
    "SECRET", "URL", "EMAIL", "CREDIT_CARD", "IBAN", "US_SSN", "UK_NINO", "IN_AADHAAR",
    "IN_PAN", "IP_ADDRESS", "DATE_OF_BIRTH", "PHONE", "ADDRESS", "PERSON",
)
_PRIORITY = {category: rank for rank, category in enumerate(CATEGORIES)}
# Presidio's entity names → tuneloop's categories.
_PRESIDIO_NAMES = {"PHONE_NUMBER": "PHONE", "IBAN_CODE": "IBAN", "EMAIL_ADDRESS": "EMAIL"}


@dataclass(frozen=True)
class PiiMatch:
    """One PII occurrence in the original text: its category, span and the matched text."""

    kind: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class _Source:
    recognizer: Any
    trigger: re.Pattern[str] | None = None
    # (score, text, start, end) -> kept?  None: every result the recognizer returns is kept.
    accept: Callable[[float, str, int, int], bool] | None = None


def _digits(text: str) -> int:
    return sum(char.isdigit() for char in text)


def _near(words: Sequence[str], before: int = 60, after: int = 30
          ) -> Callable[[str, int, int], bool]:
    def has_context(text: str, start: int, end: int) -> bool:
        window = text[max(0, start - before):end + after].lower()
        return any(word in window for word in words)
    return has_context


def _sources(spacy_model: str | None) -> list[_Source]:
    # Presidio logs one INFO line per recognizer it loads and the torch device it found.
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        InAadhaarRecognizer,
        InPanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UkNinoRecognizer,
        UsSsnRecognizer,
    )

    from tasks.datasets.deid import recognizers as ours
    from tasks.datasets.deid.names import NameRecognizer

    ssn_context = _near(("ssn", "social security", "social sec", "sozialversicherung"),
                        after=60)
    aadhaar_context = _near(("aadhaar", "aadhar", "uidai", "aadhaar number"))
    pan_context = _near(("pan", "permanent account"))
    phone_context = _near(("call", "phone", "mobile", "cell", "tel", "ring", "text me", "sms",
                           "whatsapp", "reach me", "contact", "number", "handy", "nummer",
                           "portable", "numéro", "celular", "zap", "fone", "ligar", "appel"))
    sources = [
        _Source(ours.SecretRecognizer()),
        _Source(ours.SecretUrlRecognizer()),
        _Source(ours.EmailRecognizer()),
        # Presidio's Luhn check on tuneloop's pattern: any 4-4-4-4 / 4-6-5 / 4-4-5 grouping.
        _Source(CreditCardRecognizer(patterns=[Pattern("card", _CARD, 0.3)]),
                re.compile(r"\d(?:[ -]?\d){12}")),
        _Source(IbanRecognizer(), re.compile(r"[A-Z]{2}\d{2}")),
        # "123-45-6789" counts alone; a bare 9-digit run only next to "SSN"/"social security".
        _Source(UsSsnRecognizer(), re.compile(r"\d{3}\D?\d{2}\D?\d{4}"),
                lambda score, text, s, e: score >= 0.5 or ssn_context(text, s, e)),
        _Source(UkNinoRecognizer(), re.compile(r"\d\d ?\d\d ?\d\d ?[A-Da-d]")),
        # 12 digits pass Verhoeff one time in ten: grouped 4-4-4 or next to "Aadhaar" only.
        _Source(InAadhaarRecognizer(), re.compile(r"[2-9]\d{3}\D?\d{4}\D?\d{4}"),
                lambda score, text, s, e: aadhaar_context(text, s, e)
                or re.fullmatch(r"\d{4} \d{4} \d{4}", text[s:e]) is not None),
        # Presidio's third PAN pattern ("PAN (Low)", two `.*?` lookaheads) is quadratic on long
        # lines (a 900 KB JSONL scan timed out after 60 s): only its High and Medium patterns.
        _Source(InPanRecognizer(patterns=InPanRecognizer.PATTERNS[:2]),
                re.compile(r"[A-Za-z]{5}\d{4}[A-Za-z]"),
                lambda score, text, s, e: (score >= 0.5 and text[s:e].isupper())
                or (score >= 0.1 and pan_context(text, s, e))),
        _Source(IpRecognizer(), re.compile(r"\d\.\d|[0-9A-Fa-f]:[0-9A-Fa-f]*:")),
        _Source(ours.DateOfBirthRecognizer()),
        # At least 7 digits (phonenumbers finds 5-digit German numbers in "[16940]"); a bare digit
        # run is a phone next to a phone word, or when it has a phone's length and does not
        # read as an epoch timestamp (1[5-9] + 8 or 11 digits: 2017-2033).
        _Source(PhoneRecognizer(supported_regions=("US", "GB", "DE", "FR", "IN", "BR")),
                re.compile(r"\d(?:\D{0,3}\d){6}"),
                lambda score, text, s, e: _digits(text[s:e]) >= 7
                and not _DATE_LIKE.fullmatch(text[s:e]) and (
                    not text[s:e].isdigit() or phone_context(text, s, e)
                    or (10 <= e - s <= 11 and not _EPOCH.fullmatch(text[s:e])))),
        _Source(ours.AddressRecognizer()),
        _Source(NameRecognizer()),
    ]
    if spacy_model:
        sources.append(_Source(_SpacyPersons(spacy_model)))
    return sources


class _SpacyPersons:
    """Presidio's spaCy NER (SpacyNlpEngine + SpacyRecognizer), PERSON entities only."""

    def __init__(self, model: str):
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer

        try:
            self.engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
            self.engine.load()
        except OSError as exc:
            raise ValueError(
                f"TUNELOOP_DEID_SPACY_MODEL={model!r} cannot be loaded ({exc}); install the "
                "model (e.g. `pip install en_core_web_sm-3.8.0-py3-none-any.whl`) or unset the "
                "variable to use the offline name recognizers alone") from exc
        self.recognizer = SpacyRecognizer(supported_entities=["PERSON"])

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[Any]:
        artifacts = self.engine.process_text(text, "en")
        return self.recognizer.analyze(text, ["PERSON"], artifacts)


@cache
def _detector(spacy_model: str | None) -> list[_Source]:
    sources = _sources(spacy_model)
    # Presidio imports spaCy and transformers (and torch): millions of long-lived objects that
    # every full garbage collection would walk again, which made scrubbing a 100 KB text with
    # 11k names 1.5x slower than linear. Freeze them (once) into the permanent generation.
    gc.collect()
    gc.freeze()
    return sources


def _spacy_model() -> str | None:
    from tasks.core.settings import get_settings

    return get_settings().deid_spacy_model


def _raw_spans(text: str, names: frozenset[str]) -> list[tuple[int, int, str]]:
    """(start, end, category) for every finding in `text` (a view), overlaps included."""
    from tasks.datasets.deid.lexicon import known_name_spans

    spans: list[tuple[int, int, str]] = [(s, e, "PERSON") for s, e in
                                         known_name_spans(text, names)]
    for source in _detector(_spacy_model()):
        if source.trigger is not None and not source.trigger.search(text):
            continue
        for result in source.recognizer.analyze(text, []):
            start, end = result.start, result.end
            if source.accept is not None and not source.accept(result.score, text, start, end):
                continue
            category = _PRESIDIO_NAMES.get(result.entity_type, result.entity_type)
            spans.append((start, end, category))
    return spans


def _merge(spans: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping findings become one span (their union), named after the longest of them (a
    URL that carries a token is a URL), ties settled by `CATEGORIES` order."""
    merged: list[list[Any]] = []  # [start, end, category, rank of the naming member]
    for start, end, category in sorted(spans):
        rank = (-(end - start), _PRIORITY[category])
        if merged and start < merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], end)
            if rank < last[3]:
                last[2], last[3] = category, rank
        else:
            merged.append([start, end, category, rank])
    return [(s, e, c) for s, e, c, _ in merged]


def find_pii(text: str, names: Iterable[str] = ()) -> list[PiiMatch]:
    """All PII in `text`: non-overlapping matches in order, each with its category.

    `names` adds person names known from structured fields (whole words, as written,
    Title-cased or UPPER-cased).
    """
    if not text:
        return []
    view = DetectionView(text)
    found = []
    for start, end, category in _merge(_raw_spans(view.text, frozenset(names))):
        start, end = view.span(start, end)
        found.append(PiiMatch(category, start, end, text[start:end]))
    return found


def has_pii(text: str, names: Iterable[str] = ()) -> bool:
    """Whether `text` contains any PII."""
    return bool(find_pii(text, names))


def pii_categories(text: str, names: Iterable[str] = ()) -> list[str]:
    """The sorted categories of PII in `text` (never the values): what the gate reports."""
    return sorted({match.kind for match in find_pii(text, names)})
