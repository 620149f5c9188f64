"""Personas: style weights, 20% without flaws, flaws drawn per message (50% primary, 20% each)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tasks.generate.personas import (
    PersonaAssignment,
    PersonaError,
    active_flaws,
    load_personas,
    persona_pool,
)

POOL = 10_000


@pytest.fixture(scope="module")
def template():
    return load_personas()


@pytest.fixture(scope="module")
def pool(template):
    return persona_pool(template, "default", POOL, seed=5)


def test_twenty_percent_of_personas_have_no_flaws(pool):
    flawless = sum(not p.has_flaws for p in pool)
    assert flawless / POOL == pytest.approx(0.20, abs=0.005)


def test_flawed_personas_have_a_primary_and_one_or_two_secondary_flaws(pool, template):
    for persona in pool[:2000]:
        if persona.has_flaws:
            assert persona.primary_flaw in template.flaw_patterns.primary
            assert 1 <= len(persona.secondary_flaws) <= 2
            assert set(persona.secondary_flaws) <= set(template.flaw_patterns.secondary)
        else:
            assert persona.primary_flaw is None and persona.secondary_flaws == []


def test_communication_styles_follow_their_weights(pool, template):
    counts = Counter(p.communication_style for p in pool)
    weights = template.style_weights()
    for style, weight in weights.items():
        assert counts[style] / POOL == pytest.approx(weight / sum(weights.values()), abs=0.005)


def test_primary_flaw_shows_in_half_of_messages_and_each_secondary_in_a_fifth(pool, template):
    persona = next(p for p in pool if len(p.secondary_flaws) == 2)
    rng = random.Random(9)
    draws = 20_000
    shown = Counter(flaw for _ in range(draws) for flaw in active_flaws(persona, template, rng))
    assert shown[persona.primary_flaw] / draws == pytest.approx(0.50, abs=0.015)
    for flaw in persona.secondary_flaws:
        assert shown[flaw] / draws == pytest.approx(0.20, abs=0.015)


def test_flaws_vary_between_messages_of_one_persona(pool, template):
    persona = next(p for p in pool if p.has_flaws)
    rng = random.Random(1)
    patterns = {tuple(active_flaws(persona, template, rng)) for _ in range(50)}
    assert len(patterns) > 1


def test_a_persona_without_flaws_never_shows_one(pool, template):
    persona = next(p for p in pool if not p.has_flaws)
    rng = random.Random(2)
    assert all(active_flaws(persona, template, rng) == [] for _ in range(200))


def test_persona_set_restricts_author_profiles(template):
    students = persona_pool(template, "students", 200, seed=1)
    assert {p.author_profile for p in students} <= {"first_year_student", "high_school_senior"}


def test_persona_ids_are_content_addressed_and_deterministic(template):
    a = persona_pool(template, "default", 30, seed=4)
    b = persona_pool(template, "default", 30, seed=4)
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.id for p in a] != [p.id for p in persona_pool(template, "default", 30, seed=8)]


def test_every_persona_of_the_pool_is_used_about_equally(template):
    assignment = PersonaAssignment(template, "default", 10, count=95, seed=3)
    uses = Counter(assignment.persona(i).id for i in range(95))
    assert len(uses) == 10 and max(uses.values()) - min(uses.values()) <= 1


def test_conversational_modes_follow_the_set_weights(template):
    assignment = PersonaAssignment(template, "default", 20, count=1000, seed=3)
    modes = Counter(assignment.mode(i) for i in range(1000))
    assert set(modes) == {"socratic", "existential", "supportive", "pragmatic", "playful"}
    assert modes["pragmatic"] / 1000 == pytest.approx(0.30, abs=0.002)


def test_unknown_persona_set_lists_the_valid_ones(template):
    with pytest.raises(PersonaError, match="unknown persona_set 'nurses'.*default.*students"):
        persona_pool(template, "nurses", 5, seed=1)
