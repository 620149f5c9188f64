"""The shadow comparison report leaves de-identified: built from a mirrored pair full of PII
(names under the context's name fields included), judged by a judge whose reasons hold an email
and a phone, and carrying a reason with PII, its HTML page and JSON hold no PII and no raw value.

The names are checked on what comes from the interactions; a reason is judge-written from the
de-identified pair, so it can hold pattern PII (an email, a phone) but not a context's name."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tasks.core.llm import LLMClient
from tasks.core.settings import Endpoint
from tasks.datasets.deid import find_pii
from tasks.shadow.compare import compare_variants
from tasks.shadow.report import write_report
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.unit.shadow.test_mirror_judge_deid import (
    CARD,
    EMAIL,
    NAMES,
    PHONE,
    RAW,
    mirrored_pair,
    occurs,
)

# The page's charts are PNG data URIs: not text, and a run of base64 can look like a phone.
IMAGES = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def judge_repeating_pii(request: dict) -> str:
    return json.dumps({"winner": "A", "reason": f"A answers ({EMAIL}, {PHONE}, {CARD})"})


@pytest.fixture(scope="module")
def report_text(make_engine, tmp_path_factory) -> str:
    """The written report.html (without its images) and report.json, as one text."""
    engine = make_engine("tuneloop_shadow_report_deid")
    deployment_id = mirrored_pair(engine, f"shadow-deid-{uuid.uuid4().hex[:8]}")
    with FakeOpenAIServer(responder=judge_repeating_pii) as judge:
        client = LLMClient([Endpoint(base_url=judge.base_url, model="fake-model")],
                           max_retries=0)
        report = compare_variants(deployment_id, min_samples=1, judge_client=client,
                                  engine=engine)
    assert report["pairwise"]["judged"] == 1
    # A text field in the report (what a verdict's reason would be) carries PII too.
    report["reasons"].append(f"the user wrote from {EMAIL} and {PHONE} about card {CARD}")
    page = write_report(report, tmp_path_factory.mktemp("report-deid"), log_to_mlflow=False,
                        engine=engine)
    assert "Decision:" in page.read_text(encoding="utf-8")
    return "\n".join(IMAGES.sub("", path.read_text(encoding="utf-8"))
                     for path in (page, page.parent / "report.json"))


def test_the_report_holds_no_pii_and_no_raw_value(report_text):
    assert find_pii(report_text, NAMES) == []
    assert not [raw for raw in RAW if occurs(raw, report_text)]


def test_the_report_keeps_the_reason_around_the_placeholders(report_text):
    assert re.search(r"wrote from \S+ and \S+ about card", report_text)


def test_the_report_holds_no_card_number(report_text):
    assert CARD not in report_text
