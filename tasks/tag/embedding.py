"""Embedding backend for the classification taggers (emotion, topic, temporal): zero-shot MiniLM.

Each label in include/rubrics/labels.yaml is a prototype: the normalised mean embedding of its
descriptions. A message's label distribution is softmax(cosine(message, prototypes) / T), where
the temperature T is fitted per tagger on the labelled `calibration` sentences of labels.yaml by
minimising negative log-likelihood (temperature scaling; Guo et al. 2017). Raw cosines of MiniLM
sit in a narrow band (~0.0-0.6), so T=1 would give near-uniform "probabilities"; the fitted T makes
the top probability track the observed accuracy. A conversation's distribution is the
length-weighted mixture of its messages' distributions, so a worried user and a reassuring
assistant show up as two tones. Every output carries `"method"` and the calibration report.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tasks.core.ids import content_hash
from tasks.tag.taggers import BaseTagger, ConversationInput, load_labels

log = logging.getLogger(__name__)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Bump when the classification procedure changes: it is part of the taggers' versions.
METHOD_VERSION = "prototype-mean/message-mixture/temperature-scaling/v1"
MAX_TONES = 3
MAX_TOPICS = 3
SECONDARY_LABEL_RATIO = 0.5  # a second label is reported when p >= ratio * top p
MESSAGE_WEIGHT_CAP_WORDS = 50


@dataclass(frozen=True)
class LabelSpace:
    """Prototypes for one tagger's labels plus the fitted temperature and its report."""

    section: str
    names: list[str]
    prototypes: np.ndarray  # (n_labels, dim), L2-normalised
    temperature: float
    calibration: dict[str, Any]
    subtopics: dict[str, tuple[list[str], np.ndarray]]

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        return softmax(vectors @ self.prototypes.T / self.temperature)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def fit_temperature(similarities: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Temperature minimising the NLL of softmax(similarities / T) on labelled examples.

    Returns T and a report: NLL and expected calibration error before (T=1) and after, accuracy.
    """
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(targets))

    def nll(temperature: float) -> float:
        probs = softmax(similarities / temperature)
        return float(-np.log(np.clip(probs[rows, targets], 1e-12, None)).mean())

    found = minimize_scalar(lambda log_t: nll(math.exp(log_t)),
                            bounds=(math.log(1e-3), math.log(10.0)), method="bounded")
    temperature = float(math.exp(found.x))
    probs = softmax(similarities / temperature)
    report = {
        "method": "temperature-scaling (NLL on labelled calibration sentences)",
        "temperature": round(temperature, 5),
        "examples": int(len(targets)),
        "accuracy": round(float((probs.argmax(axis=1) == targets).mean()), 4),
        "nll_at_t1": round(nll(1.0), 4),
        "nll": round(nll(temperature), 4),
        "ece_at_t1": round(expected_calibration_error(softmax(similarities), targets), 4),
        "ece": round(expected_calibration_error(probs, targets), 4),
    }
    return temperature, report


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 5) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        mask = (confidence > low) & (confidence <= high)
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(error)


def _embed(texts: list[str]) -> np.ndarray:
    from tasks.core.embeddings import embed

    return embed(texts)


@functools.lru_cache(maxsize=8)
def _label_space(section: str, section_hash: str) -> LabelSpace:
    spec = load_labels()[section]
    labels: dict[str, list[str]] = spec["labels"]
    names = list(labels)
    calibration = spec.get("calibration") or []
    if len(calibration) < len(names):
        raise ValueError(
            f"labels.yaml section {section!r} has {len(calibration)} calibration examples; give "
            f"at least one per label ({len(names)}) to fit the confidence temperature"
        )
    unknown = sorted({c["label"] for c in calibration} - set(names))
    if unknown:
        raise ValueError(f"labels.yaml {section}.calibration uses unknown labels {unknown}; "
                         f"use some of {names}")
    # One embedding call for every text of the section: per-call overhead dominates otherwise.
    texts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}

    def add(key: str, items: list[str]) -> None:
        spans[key] = (len(texts), len(texts) + len(items))
        texts.extend(items)

    for name in names:
        add(f"label:{name}", list(labels[name]))
    sub_specs = spec.get("subtopics") or {}
    for label, subs in sub_specs.items():
        add(f"sub:{label}", [f"{n}: {subs[n]}" for n in subs])
    add("calibration", [c["text"] for c in calibration])
    matrix = _embed(texts)

    def rows(key: str) -> np.ndarray:
        start, end = spans[key]
        return matrix[start:end]

    prototypes = np.stack([_normalise(rows(f"label:{n}").mean(axis=0)) for n in names])
    subtopics = {label: (list(subs), rows(f"sub:{label}")) for label, subs in sub_specs.items()}
    vectors = rows("calibration")
    targets = np.array([names.index(c["label"]) for c in calibration])
    temperature, report = fit_temperature(vectors @ prototypes.T, targets)
    log.info("embedding tagger %s: T=%.4f calibration accuracy=%.2f nll %.3f→%.3f", section,
             temperature, report["accuracy"], report["nll_at_t1"], report["nll"])
    return LabelSpace(section, names, prototypes, temperature, report, subtopics)


def label_space(section: str) -> LabelSpace:
    """The (cached) label space for a labels.yaml section; refitted when the file changes."""
    return _label_space(section, content_hash(load_labels()[section]))


@dataclass
class EmbeddedConversation:
    """Per-message vectors and weights of one conversation (shared by the three taggers)."""

    vectors: np.ndarray  # (n_messages, dim)
    weights: np.ndarray  # (n_messages,), sums to 1

    @property
    def mean_vector(self) -> np.ndarray:
        return _normalise((self.vectors * self.weights[:, None]).sum(axis=0))


def embed_conversations(conversations: list[ConversationInput]) -> list[EmbeddedConversation]:
    """One embedding call for all messages of all conversations."""
    texts: list[str] = []
    spans: list[tuple[int, int, list[float]]] = []
    for conv in conversations:
        start = len(texts)
        weights: list[float] = []
        for message in conv.messages:
            content = message["content"].strip()
            if content:
                texts.append(content)
                weights.append(float(min(len(content.split()), MESSAGE_WEIGHT_CAP_WORDS)) or 1.0)
        if len(texts) == start:  # an empty conversation still gets a (neutral) vector
            texts.append("(empty)")
            weights.append(1.0)
        spans.append((start, len(texts), weights))
    vectors = _embed(texts)
    out = []
    for start, end, weights in spans:
        w = np.asarray(weights, dtype=np.float64)
        out.append(EmbeddedConversation(vectors[start:end], w / w.sum()))
    return out


class EmbeddingTagger(BaseTagger):
    """Mixin over a tagger class: same name and schema, outputs from label similarity."""

    section: ClassVar[str]

    def __init__(self, backend: str = "embedding", model: str = EMBEDDING_MODEL) -> None:
        super().__init__(backend="embedding", model=EMBEDDING_MODEL)

    @classmethod
    def wrap(cls, tagger_cls: type[BaseTagger]) -> EmbeddingTagger:
        if "embedding" not in tagger_cls.backends:
            raise ValueError(f"tagger {tagger_cls.name!r} has no embedding backend")
        combined = type(f"Embedding{tagger_cls.__name__}", (cls, tagger_cls),
                        {"section": tagger_cls.name})
        return combined()

    @property
    def method(self) -> str:
        return f"embedding:{EMBEDDING_MODEL}"

    def definition(self) -> dict[str, Any]:
        return {
            "tagger": self.name,
            "backend": "embedding",
            "schema": self.output_schema.model_json_schema(),
            "labels": load_labels()[self.section],
            "method": METHOD_VERSION,
        }

    def format_input(self, conversation: ConversationInput) -> list[dict[str, str]]:
        raise NotImplementedError("the embedding backend sends no prompt; use tag_embedded()")

    def tag_embedded(self, embedded: EmbeddedConversation) -> dict[str, Any]:
        space = label_space(self.section)
        mixture = (space.probabilities(embedded.vectors) * embedded.weights[:, None]).sum(axis=0)
        order = np.argsort(-mixture)
        top = float(mixture[order[0]])
        ranked = [space.names[i] for i in order]
        data: dict[str, Any]
        if self.name == "emotion":
            tones = [space.names[i] for i in order[:MAX_TONES]
                     if mixture[i] >= SECONDARY_LABEL_RATIO * top]
            data = {"tones": tones, "confidence": round(top, 4)}
        elif self.name == "topic":
            topics = [space.names[i] for i in order[:MAX_TOPICS]
                      if mixture[i] >= SECONDARY_LABEL_RATIO * top]
            mean = embedded.mean_vector
            subtopics = []
            for topic in topics:
                if topic in space.subtopics:
                    names, vectors = space.subtopics[topic]
                    subtopics.append(names[int(np.argmax(vectors @ mean))])
            data = {"topics": topics, "subtopics": subtopics, "confidence": round(top, 4)}
        elif self.name == "temporal":
            data = {"focus": ranked[0], "confidence": round(top, 4)}
        else:  # pragma: no cover - guarded by backends
            raise ValueError(f"no embedding classification for tagger {self.name!r}")
        output = self.validate(data)
        output["scores"] = {space.names[i]: round(float(mixture[i]), 4) for i in order}
        output["calibration"] = space.calibration
        return output

    def tag_many(self, conversations: list[ConversationInput]) -> list[dict[str, Any]]:
        return [self.tag_embedded(e) for e in embed_conversations(conversations)]
