"""Generation prompts: Jinja2 files under include/prompts/generation/, versioned by content hash.

Five templates, one per prompt (seed 000/001/002):

- ``persona_question`` — the opening user message from an author profile, conversational mode,
  taxonomy cell and the flaws active in that message;
- ``document_scenario`` — a ~500–1000 word memo/email/report plus the person's request (seed 002);
- ``user_simulator`` — every later user message, in character, reacting to the transcript;
- ``assistant`` — the generator's system message: the baked system prompt plus length matching
  (1.0–1.5× the user's words, hard limit 2×), tentative language, at most two questions and an
  anti-pattern phrase list;
- ``system_prompt`` — the system prompt stored with (and baked into) every training row.

Templates are loaded by a path built from the package location and rendered with StrictUndefined,
so a missing variable fails loudly instead of leaving a hole in a prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from tasks.core.ids import content_hash
from tasks.core.paths import PROMPTS_DIR
from tasks.generate.personas import Persona, PersonaTemplate, describe_persona, flaw_description
from tasks.generate.taxonomy import EDGE_CASE_DIMENSION, NO_EDGE_CASE, Taxonomy

TEMPLATES = {
    "system_prompt": "generation/system_prompt.jinja2",
    "persona_question": "generation/persona_question.jinja2",
    "document_scenario": "generation/document_scenario.jinja2",
    "user_simulator": "generation/user_simulator.jinja2",
    "assistant": "generation/assistant.jinja2",
}
DEFAULT_ASSISTANT_NAME = "Tune"
# Length matching is computed on at most this many user words: a 900-word memo asks for a
# focused reply, not a 1,800-word essay.
LENGTH_BASIS_CAP_WORDS = 250
MIN_TARGET_WORDS = 12


class PromptError(ValueError):
    """A generation template is missing or needs a variable the caller did not pass."""

    def __init__(self, template: str, problem: str) -> None:
        self.template = template
        self.problem = problem
        super().__init__(f"prompt template {template}: {problem}")


@functools.lru_cache(maxsize=4)
def _environment(prompts_dir: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(prompts_dir),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        autoescape=False,
    )


class PromptLibrary:
    """Renders the generation templates and reports their content hashes for provenance."""

    def __init__(self, prompts_dir: Path | str = PROMPTS_DIR) -> None:
        self.prompts_dir = str(prompts_dir)
        self.env = _environment(self.prompts_dir)

    def source(self, key: str) -> str:
        name = TEMPLATES[key]
        path = Path(self.prompts_dir) / name
        if not path.is_file():
            raise PromptError(name, f"not found under {self.prompts_dir}")
        return path.read_text()

    def template_hashes(self) -> dict[str, str]:
        """{template file name: sha256 of its source} for every generation template."""
        return {TEMPLATES[key]: content_hash(self.source(key)) for key in TEMPLATES}

    def render(self, key: str, **context: Any) -> str:
        name = TEMPLATES[key]
        try:
            return self.env.get_template(name).render(**context).strip()
        except jinja2.TemplateNotFound:
            raise PromptError(name, f"not found under {self.prompts_dir}") from None
        except jinja2.UndefinedError as exc:
            raise PromptError(name, f"{exc}; pass it in the render context") from None

    # ---- the five prompts -------------------------------------------------------------------
    def system_prompt(self, domain: str, assistant_name: str = DEFAULT_ASSISTANT_NAME) -> str:
        return self.render("system_prompt", domain=domain, assistant_name=assistant_name)

    def persona_question(self, context: Mapping[str, Any]) -> str:
        return self.render("persona_question", **context)

    def document_scenario(self, context: Mapping[str, Any], *, doc_type: Mapping[str, str],
                          min_words: int, max_words: int) -> str:
        return self.render("document_scenario", **context, doc_type=doc_type,
                           min_words=min_words, max_words=max_words)

    def user_simulator(self, context: Mapping[str, Any],
                       transcript: Sequence[Mapping[str, str]]) -> str:
        return self.render("user_simulator", **context, transcript=list(transcript))

    def assistant(self, *, system_prompt: str, last_user_message: str,
                  edge_case: Mapping[str, str] | None) -> str:
        return self.render("assistant", system_prompt=system_prompt, edge_case=edge_case,
                           **length_targets(last_user_message))


def word_count(text: str) -> int:
    return len(text.split())


def length_targets(user_text: str) -> dict[str, int]:
    """Assistant length matching: 1.0–1.5× the user's words, never over 2× (with small floors)."""
    words = word_count(user_text)
    basis = min(words, LENGTH_BASIS_CAP_WORDS)
    return {
        "user_words": words,
        "target_min_words": max(basis, MIN_TARGET_WORDS),
        "target_max_words": max(round(basis * 1.5), round(MIN_TARGET_WORDS * 1.5)),
        "hard_limit_words": max(basis * 2, MIN_TARGET_WORDS * 2),
    }


def item_context(
    *,
    taxonomy: Taxonomy,
    personas: PersonaTemplate,
    persona: Persona,
    cell: Mapping[str, str],
    mode: str,
    flaws: Sequence[str],
) -> dict[str, Any]:
    """The render context shared by the user-side prompts for one item and one message."""
    dims = taxonomy.dimensions

    def described(dimension: str) -> dict[str, str]:
        value = cell.get(dimension, "")
        if dimension in dims and value in dims[dimension].values:
            return {"name": value, "description": dims[dimension].values[value].description}
        return {"name": value, "description": value.replace("_", " ")}

    edge_name = cell.get(EDGE_CASE_DIMENSION, NO_EDGE_CASE)
    return {
        "persona": describe_persona(persona, personas),
        "cell": dict(cell),
        "topic": described("topic"),
        "verbosity": described("verbosity"),
        "tone": described("tone"),
        "difficulty": described("difficulty"),
        "life_context": described("life_context"),
        "mode": {"name": mode, "description": personas.conversational_modes[mode].description},
        "edge_case": edge_case_context(taxonomy, edge_name),
        "flaws": [{"name": f, "description": flaw_description(personas, f)} for f in flaws],
    }


def edge_case_context(taxonomy: Taxonomy, name: str) -> dict[str, str] | None:
    if name == NO_EDGE_CASE or name not in taxonomy.edge_cases.categories:
        return None
    category = taxonomy.edge_cases.categories[name]
    return {"name": name, "description": category.description, "handling": category.handling}
