"""Labelling reaction signals (`tasks.signals.stage` builds the datasets from the labels).

Which interactions are signals at all (served to the user — by the router, or in an operator's
imported log marked as such —, not erased or purged), their
positive/negative label from the reaction windows, and the two screens applied before any text is
read: the served-history check (no forged assistant turns) and the per-user cap. The rules are in
the `tasks.signals.stage` module docstring.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import and_, bindparam, case, func, null, or_, select, text
from sqlalchemy.orm import Session

from tasks.core.db.models import Dataset, DatasetItem, Interaction, Reaction, UserErasure
from tasks.core.ids import stable_id
from tasks.signals.config import SignalConfig, SignalConfigError

Label = Literal["positive", "negative"]
# The variants whose answers users were shown: the only signals, and the only answers an
# assistant turn of a later request is verified against (a mirror answer was never shown).
SERVED_VARIANTS = ("champion", "challenger")
# The roles whose messages a client writes itself; any other message of a request's history
# claims to be the router's answer and must match one it served.
CLIENT_ROLES = ("system", "developer", "user", "tool", "function")
QUERY_CHUNK = 5000  # ids per IN (...) statement
# An operator-imported log (`tuneloop import-reactions`, tasks.signals.importing) is a trusted
# source of shown answers too, but only a row marked as imported three ways counts: the variant,
# context {"source": "import"} and a client id "import:<source>". The router writes none of them
# (its variants are champion/challenger/mirror, its context has no "source" key, and a client
# name cannot hold ":"), so no client can pass its own text off as imported.
IMPORTED_VARIANT = "imported"
IMPORT_SOURCE = "import"
IMPORT_CLIENT_PREFIX = "import:"


def classify_reaction(reaction: str, dwell_ms: int, cfg: SignalConfig) -> Label | None:
    """positive / negative / None for one reaction (the seed's windows, configurable)."""
    if reaction == cfg.positive_reaction and cfg.done_min_ms <= dwell_ms <= cfg.done_max_ms:
        return "positive"
    if reaction == cfg.negative_reaction and dwell_ms < cfg.dismiss_max_ms:
        return "negative"
    return None


# ---- labelling ---------------------------------------------------------------------------------
@dataclass
class Labels:
    """Interaction ids per label, plus what was left out."""

    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    conflicting: list[str] = field(default_factory=list)
    reactions_seen: int = 0
    outside_windows: int = 0
    dwell: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # Reactions never read as signals, by why (the rules: tasks.signals.stage docstring).
    not_served: int = 0
    text_purged: int = 0
    erased: int = 0
    # Labelled interactions dropped: an assistant turn the router did not serve, the user's cap.
    unverified_history: int = 0
    capped_per_user: int = 0

    def counts(self) -> dict[str, int]:
        return {"positive": len(self.positive), "negative": len(self.negative),
                "conflicting": len(self.conflicting), "reactions": self.reactions_seen,
                "reactions_outside_windows": self.outside_windows,
                "reactions_not_served": self.not_served,
                "reactions_text_purged": self.text_purged, "reactions_erased": self.erased,
                "unverified_history": self.unverified_history,
                "capped_per_user": self.capped_per_user}


def _dataset_interactions(session: Session, dataset_id: str) -> set[str]:
    if session.get(Dataset, dataset_id) is None:
        raise SignalConfigError(f"since_dataset_id {dataset_id!r} is not a dataset; use an id "
                                "from the datasets table or leave it empty for all signals")
    stmt = select(DatasetItem.interaction_id).where(DatasetItem.dataset_id == dataset_id,
                                                    DatasetItem.interaction_id.is_not(None))
    return set(session.scalars(stmt))


def imported_row():
    """The SQL test for an interaction marked as imported from an operator's log (all three
    marks; a NULL anywhere is no mark)."""
    return and_(Interaction.variant == IMPORTED_VARIANT,
                Interaction.context["source"].astext == IMPORT_SOURCE,
                Interaction.client_id.startswith(IMPORT_CLIENT_PREFIX, autoescape=True))


def _exclusion():
    """Why an interaction is never a signal (NULL: it may be one), as a SQL expression over
    interactions LEFT JOIN user_erasures. Served is shown positively (fail-closed: a test that
    is NULL falls through to "not_served")."""
    return case(
        # Erased, or sent by an erased user before the erasure was requested (a row written
        # late, e.g. replayed from the router's outage spool, still belongs to the erasure).
        (or_(Interaction.erased_at.is_not(None),
             Interaction.created_at < UserErasure.requested_at), "erased"),
        (Interaction.text_purged_at.is_not(None), "text_purged"),
        (Interaction.status != "ok", "not_served"),
        (Interaction.variant.in_(SERVED_VARIANTS), null()),
        (imported_row(), null()),
        else_="not_served")


def label_interactions(session: Session, cfg: SignalConfig,
                       since_dataset_id: str | None = None) -> Labels:
    """Classify every served interaction with a positive/negative-type reaction, then drop the
    examples with an unverified assistant turn and those over the per-user cap."""
    # Anonymous requests get a random user_hash each, so the cap counts them per API client:
    # otherwise one client could send any number of anonymous examples.
    contributor = case(
        (Interaction.context["anonymous"].as_boolean().is_(True),
         func.concat("anon:", func.coalesce(Interaction.client_id, ""))),
        else_=Interaction.user_hash)
    stmt = (select(Reaction.interaction_id, Reaction.reaction, Reaction.dwell_ms,
                   contributor.label("contributor"), _exclusion().label("excluded"))
            .join(Interaction, Interaction.id == Reaction.interaction_id)
            .outerjoin(UserErasure, UserErasure.user_hash == Interaction.user_hash)
            .where(Reaction.reaction.in_([cfg.positive_reaction, cfg.negative_reaction])))
    if cfg.model_name:
        stmt = stmt.where(Interaction.model_name == cfg.model_name)
    seen = _dataset_interactions(session, since_dataset_id) if since_dataset_id else set()
    per_interaction: dict[str, set[str]] = defaultdict(set)
    user_of: dict[str, str] = {}
    labels = Labels()
    for interaction_id, reaction, dwell_ms, contributor_id, excluded in session.execute(stmt):
        if interaction_id in seen:
            continue
        if excluded is not None:
            setattr(labels, excluded, getattr(labels, excluded) + 1)
            continue
        labels.reactions_seen += 1
        labels.dwell[reaction].append(int(dwell_ms))
        label = classify_reaction(reaction, int(dwell_ms), cfg)
        if label is not None:
            per_interaction[interaction_id].add(label)
            user_of[interaction_id] = contributor_id
        else:
            labels.outside_windows += 1
    for interaction_id in sorted(per_interaction):
        found = per_interaction[interaction_id]
        if len(found) > 1:
            labels.conflicting.append(interaction_id)
        elif "positive" in found:
            labels.positive.append(interaction_id)
        else:
            labels.negative.append(interaction_id)
    unverified = unverified_history(session, [*labels.positive, *labels.negative])
    labels.unverified_history = _drop(labels, unverified)
    capped = over_user_cap({i: user_of[i] for i in (*labels.positive, *labels.negative)},
                           cfg.max_examples_per_user)
    labels.capped_per_user = _drop(labels, capped)
    return labels


def _drop(labels: Labels, ids: set[str]) -> int:
    before = len(labels.positive) + len(labels.negative)
    labels.positive = [i for i in labels.positive if i not in ids]
    labels.negative = [i for i in labels.negative if i not in ids]
    return before - len(labels.positive) - len(labels.negative)


# One statement per chunk of interactions (no query per message): each message of a history in a
# role a client does not author is an assistant turn, verified when its content is a string whose
# md5 is the response_md5 (index ix_interactions_user_response) of an answer served earlier to
# the same user — through the same API client when the interaction names one — and still held.
_UNVERIFIED_SQL = text("""
SELECT DISTINCT i.id
FROM interactions i
CROSS JOIN LATERAL jsonb_array_elements(
    CASE WHEN jsonb_typeof(i.request_messages) = 'array' THEN i.request_messages
         ELSE '[]'::jsonb END) AS m(message)
WHERE i.id IN :ids
  AND lower(btrim(coalesce(m.message ->> 'role', 'user'))) NOT IN :client_roles
  AND (coalesce(jsonb_typeof(m.message -> 'content'), '') <> 'string'
       OR NOT EXISTS (
         SELECT 1 FROM interactions s
         WHERE s.user_hash = i.user_hash
           AND s.response_md5 = md5(m.message ->> 'content')
           AND s.variant IN :served AND s.status = 'ok'
           AND s.created_at < i.created_at
           AND s.erased_at IS NULL AND s.text_purged_at IS NULL
           AND (i.client_id IS NULL OR s.client_id = i.client_id)))
""").bindparams(bindparam("ids", expanding=True), bindparam("client_roles", expanding=True),
                bindparam("served", expanding=True))


def unverified_history(session: Session, interaction_ids: Sequence[str]) -> set[str]:
    """The interactions whose request history holds an assistant turn the router did not
    serve to that user (forged, edited, or a mirror/failed/purged answer)."""
    ids = sorted(set(interaction_ids))
    found: set[str] = set()
    for start in range(0, len(ids), QUERY_CHUNK):
        found.update(session.scalars(_UNVERIFIED_SQL, {
            "ids": ids[start:start + QUERY_CHUNK], "client_roles": list(CLIENT_ROLES),
            "served": list(SERVED_VARIANTS)}))
    return found


def over_user_cap(user_of: dict[str, str], cap: int) -> set[str]:
    """The interactions beyond each contributor's first `cap` (0: none) — a contributor is a
    hashed user, or one API client's anonymous traffic — in a stable hash order of the
    interaction ids: the same examples stay whatever else is in the dataset."""
    if cap <= 0:
        return set()
    by_user: dict[str, list[str]] = defaultdict(list)
    for interaction_id, user_hash in user_of.items():
        by_user[user_hash].append(interaction_id)
    dropped: set[str] = set()
    for ids in by_user.values():
        if len(ids) > cap:
            ids.sort(key=lambda i: (stable_id("per-user-cap", i), i))
            dropped.update(ids[cap:])
    return dropped
