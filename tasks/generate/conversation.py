"""Multi-turn generation of one conversation: the batch plan, the item spec, the turn loop.

`BatchPlan` turns a `GenerationConfig` into items: item i gets a taxonomy cell, a persona from the
batch's pool, a conversational mode, a scenario (question or document) and a deterministic id
``stable_id(batch_id, cell_key, i)``. `ConversationGenerator.generate(item)` runs N turns: the
user side (role ``user_sim``: persona question, document scenario or user simulator) then the
assistant (role ``generator``); the two roles may be different endpoints and models. Every turn
is post-processed; an LLM failure, an empty, truncated or looping turn ends the conversation as
a recorded failure (with the turns so far and the reason). The result is the `conversations` row,
provenance included: batch, persona, cell, template hashes, endpoints/models/params, seed,
timings and token usage per role.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from tasks.core.ids import content_hash, stable_id
from tasks.core.settings import Settings
from tasks.generate.config import GenerationConfig
from tasks.generate.personas import (
    Persona,
    PersonaAssignment,
    active_flaws,
    load_personas,
    mode_targets,
    stratified_flags,
)
from tasks.generate.postprocess import clean_turn, turn_problem
from tasks.generate.prompts import PromptLibrary, edge_case_context, item_context, word_count
from tasks.generate.taxonomy import (
    EDGE_CASE_DIMENSION,
    NO_EDGE_CASE,
    cell_key,
    cell_plan,
    load_taxonomy,
    seed_for,
    stratified_choices,
)

SCENARIO_QUESTION = "question"
SCENARIO_DOCUMENT = "document"
USER_ROLE = "user_sim"
ASSISTANT_ROLE = "generator"
# A generated document shorter than this share of min_words did not follow the brief.
MIN_DOCUMENT_SHARE = 0.5


@dataclass(frozen=True)
class ItemSpec:
    """Everything decided about item `index` before any LLM call."""

    index: int
    id: str
    cell: dict[str, str]
    persona: Persona
    mode: str
    scenario: str
    doc_type: str | None
    seed: int

    @property
    def is_edge_case(self) -> bool:
        return self.cell.get(EDGE_CASE_DIMENSION, NO_EDGE_CASE) != NO_EDGE_CASE


class BatchPlan:
    """The deterministic plan of a batch: items, personas, prompts and coverage targets."""

    def __init__(self, cfg: GenerationConfig, *, settings: Settings | None = None,
                 batch_id: str | None = None) -> None:
        self.cfg = cfg
        self.batch_id = batch_id or cfg.batch_id(settings)
        self.taxonomy = load_taxonomy(cfg.taxonomy_path)
        self.personas = load_personas(cfg.personas_path)
        self.prompts = PromptLibrary()
        self.template_hashes = self.prompts.template_hashes()
        self.system_prompt = self.prompts.system_prompt(self.taxonomy.domain, cfg.assistant_name)
        self.cells = cell_plan(self.taxonomy, cfg.count, cfg.seed, cfg.edge_case_share)
        # A pool no larger than the batch, so its stratified styles/flaws carry over to items.
        self.assignment = PersonaAssignment(self.personas, cfg.persona_set,
                                            min(cfg.persona_pool_size, cfg.count), cfg.count,
                                            cfg.seed)
        self._documents = stratified_flags(cfg.document_share, cfg.count,
                                           seed_for("document", cfg.seed))
        scenarios = self.taxonomy.document_scenarios
        self._doc_types = (
            stratified_choices({k: v.weight for k, v in scenarios.doc_types.items()}, cfg.count,
                               seed_for("doc_type", cfg.seed))
            if scenarios is not None and cfg.document_share > 0 else []
        )

    def item(self, index: int) -> ItemSpec:
        cell = self.cells.cell(index)
        mode = self.assignment.mode(index)
        document = self._documents[index] and bool(self._doc_types)
        doc_type = self._doc_types[index] if document else None
        full_cell = {**cell, "mode": mode,
                     "scenario": SCENARIO_DOCUMENT if document else SCENARIO_QUESTION}
        if doc_type:
            full_cell["doc_type"] = doc_type
        return ItemSpec(
            index=index,
            id=stable_id(self.batch_id, cell_key(full_cell), index),
            cell=full_cell,
            persona=self.assignment.persona(index),
            mode=mode,
            scenario=full_cell["scenario"],
            doc_type=doc_type,
            seed=seed_for(self.batch_id, "item", index),
        )

    def items(self, start: int, stop: int) -> list[ItemSpec]:
        return [self.item(i) for i in range(max(start, 0), min(stop, self.cfg.count))]

    def targets(self) -> dict[str, dict[str, float]]:
        """Target shares for the coverage report: taxonomy + mode, scenario, persona style/author."""
        targets = self.taxonomy.targets(self.cfg.edge_case_share)
        targets["mode"] = mode_targets(self.personas, self.cfg.persona_set)
        share = self.cfg.document_share if self.taxonomy.document_scenarios else 0.0
        targets["scenario"] = {SCENARIO_QUESTION: 1.0 - share, SCENARIO_DOCUMENT: share}
        styles = self.personas.style_weights()
        targets["communication_style"] = {k: v / sum(styles.values()) for k, v in styles.items()}
        authors = self.personas.author_weights(self.cfg.persona_set)
        targets["author_profile"] = {k: v / sum(authors.values()) for k, v in authors.items()}
        return targets


@dataclass
class _Trace:
    """What a conversation's calls cost and took, accumulated turn by turn."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, role: str, turn: int, result: Any) -> None:
        self.calls.append({
            "turn": turn, "role": role, "latency_s": round(float(result.latency_s), 4),
            "attempts": result.attempts, "cached": result.cached,
            "finish_reason": result.finish_reason,
        })
        usage = self.usage.setdefault(role, {"prompt_tokens": 0, "completion_tokens": 0,
                                             "total_tokens": 0, "calls": 0})
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[key] += int(result.usage.get(key, 0))
        usage["calls"] += 1
        self.endpoints[role] = {"endpoint": result.endpoint, "model": result.model}

    def token_usage(self) -> dict[str, Any]:
        total = {key: sum(u[key] for u in self.usage.values())
                 for key in ("prompt_tokens", "completion_tokens", "total_tokens", "calls")}
        return {**total, "by_role": self.usage}


class ConversationGenerator:
    """Runs the turn loop for items of one plan with a user-side and an assistant-side client."""

    def __init__(self, plan: BatchPlan, *, user_client: Any, assistant_client: Any,
                 use_cache: bool = True, settings: Settings | None = None) -> None:
        self.plan = plan
        self.cfg = plan.cfg
        self.user_client = user_client
        self.assistant_client = assistant_client
        self.use_cache = use_cache
        self.user_endpoint = self.cfg.endpoint(USER_ROLE, settings)
        self.assistant_endpoint = self.cfg.endpoint(ASSISTANT_ROLE, settings)

    def _params(self, role: str, max_tokens: int) -> dict[str, Any]:
        endpoint = self.user_endpoint if role == USER_ROLE else self.assistant_endpoint
        params = {"endpoint": endpoint.label(), "model": endpoint.model,
                  "temperature": self.cfg.temperature, "max_tokens": max_tokens}
        if self.cfg.top_p is not None:
            params["top_p"] = self.cfg.top_p
        stop = self.cfg.user_stop if role == USER_ROLE else self.cfg.assistant_stop
        if stop:
            params["stop"] = list(stop)
        return params

    @property
    def _assistant_max_tokens(self) -> int:
        return self.cfg.assistant_max_tokens or self.cfg.max_tokens

    async def _call(self, client: Any, messages: list[dict[str, str]], *, seed: int,
                    max_tokens: int, stop: list[str] | None = None) -> Any:
        return await client.chat(
            messages, temperature=self.cfg.temperature, max_tokens=max_tokens, stop=stop,
            top_p=self.cfg.top_p, seed=seed % (2**31), allow_truncated=True,
            use_cache=self.use_cache,
        )

    async def generate(self, item: ItemSpec, attempt: int = 0) -> dict[str, Any]:
        """The `conversations` row for `item` (status ok or failed), never raising for LLM trouble.

        `attempt` > 0 regenerates an item stored as failed: the call seeds change with it, so
        neither the response cache nor a seeded server hands back the same failed reply.
        """
        plan = self.plan

        def call_seed(turn: int, side: int) -> int:
            if attempt == 0:
                return item.seed + 2 * turn + side
            return seed_for(item.seed, "attempt", attempt, turn, side)

        started = time.perf_counter()
        trace = _Trace()
        messages: list[dict[str, str]] = []
        flaws_by_turn: list[list[str]] = []
        length_ratios: list[float | None] = []
        failure: str | None = None
        first_name = item.persona.name.split(",")[0]
        edge_case = edge_case_context(plan.taxonomy, item.cell.get(EDGE_CASE_DIMENSION, ""))
        used = {"system_prompt", "assistant",
                "document_scenario" if item.scenario == SCENARIO_DOCUMENT else "persona_question"}
        if self.cfg.turns > 1:
            used.add("user_simulator")

        for turn in range(self.cfg.turns):
            # ---- the user side ----------------------------------------------------------------
            flaws = active_flaws(item.persona, plan.personas,
                                 random.Random(seed_for(item.seed, "flaws", turn)))
            flaws_by_turn.append(flaws)
            context = item_context(taxonomy=plan.taxonomy, personas=plan.personas,
                                   persona=item.persona, cell=item.cell, mode=item.mode,
                                   flaws=flaws)
            max_tokens = self.cfg.max_tokens
            if turn == 0 and item.scenario == SCENARIO_DOCUMENT:
                scenarios = plan.taxonomy.document_scenarios
                assert scenarios is not None and item.doc_type is not None
                doc_type = {"name": item.doc_type,
                            "description": scenarios.doc_types[item.doc_type].description}
                prompt = plan.prompts.document_scenario(
                    context, doc_type=doc_type, min_words=scenarios.min_words,
                    max_words=scenarios.max_words)
                max_tokens = self.cfg.document_max_tokens
            elif turn == 0:
                prompt = plan.prompts.persona_question(context)
            else:
                prompt = plan.prompts.user_simulator(context, messages)
            is_document = turn == 0 and item.scenario == SCENARIO_DOCUMENT
            result = await self._call(self.user_client, [{"role": "user", "content": prompt}],
                                      seed=call_seed(turn, 0), max_tokens=max_tokens,
                                      stop=None if is_document else (self.cfg.user_stop or None))
            trace.record(USER_ROLE, turn, result)
            failure = self._problem(result, "user", turn, messages, first_name)
            user_text = clean_turn(result.text, "user", persona_name=first_name)
            if failure is None and turn == 0 and item.scenario == SCENARIO_DOCUMENT:
                scenarios = plan.taxonomy.document_scenarios
                assert scenarios is not None
                minimum = int(scenarios.min_words * MIN_DOCUMENT_SHARE)
                if word_count(user_text) < minimum:
                    failure = (f"turn {turn + 1} user: document too short "
                               f"({word_count(user_text)} words; asked for "
                               f"{scenarios.min_words}-{scenarios.max_words})")
            if failure is not None:
                if user_text:
                    messages.append({"role": "user", "content": user_text})
                break
            messages.append({"role": "user", "content": user_text})

            # ---- the assistant ----------------------------------------------------------------
            system = plan.prompts.assistant(system_prompt=plan.system_prompt,
                                            last_user_message=user_text, edge_case=edge_case)
            result = await self._call(self.assistant_client,
                                      [{"role": "system", "content": system}, *messages],
                                      seed=call_seed(turn, 1),
                                      max_tokens=self._assistant_max_tokens,
                                      stop=self.cfg.assistant_stop or None)
            trace.record(ASSISTANT_ROLE, turn, result)
            failure = self._problem(result, "assistant", turn, messages, first_name)
            reply = clean_turn(result.text, "assistant", persona_name=first_name)
            if reply:
                messages.append({"role": "assistant", "content": reply})
                user_words = word_count(user_text)
                length_ratios.append(round(word_count(reply) / user_words, 3)
                                     if user_words else None)
            if failure is not None:
                break

        generator = trace.endpoints.get(ASSISTANT_ROLE, {})  # what answered, fallback included
        return {
            "id": item.id,
            "batch_id": plan.batch_id,
            "item_index": item.index,
            "persona_id": item.persona.id,
            "taxonomy_cell": item.cell,
            "is_edge_case": item.is_edge_case,
            "system_prompt": plan.system_prompt,
            "messages": messages,
            "status": "failed" if failure else "ok",
            "failure_reason": failure,
            "model": generator.get("model", self.assistant_endpoint.model),
            "endpoint": generator.get("endpoint", self.assistant_endpoint.label()),
            "params": {
                "turns": self.cfg.turns,
                "attempt": attempt,
                "scenario": item.scenario,
                "mode": item.mode,
                "doc_type": item.doc_type,
                "persona": {
                    "name": item.persona.name,
                    "author_profile": item.persona.author_profile,
                    "communication_style": item.persona.communication_style,
                    "primary_flaw": item.persona.primary_flaw,
                    "secondary_flaws": item.persona.secondary_flaws,
                },
                "flaws_by_turn": flaws_by_turn,
                "length_ratios": length_ratios,
                USER_ROLE: {**self._params(USER_ROLE, self.cfg.max_tokens),
                            **trace.endpoints.get(USER_ROLE, {})},
                ASSISTANT_ROLE: {**self._params(ASSISTANT_ROLE, self._assistant_max_tokens),
                                 **trace.endpoints.get(ASSISTANT_ROLE, {})},
                "document_max_tokens": self.cfg.document_max_tokens,
                "batch_seed": self.cfg.seed,
            },
            "template_hashes": {name: h for name, h in plan.template_hashes.items()
                                if name.rsplit("/", 1)[-1].removesuffix(".jinja2") in used},
            "seed": item.seed,
            "token_usage": trace.token_usage(),
            "timings": {"total_s": round(time.perf_counter() - started, 4),
                        "calls": trace.calls},
            "content_hash": content_hash(messages),
        }

    @staticmethod
    def _problem(result: Any, role: str, turn: int, earlier: list[dict[str, str]],
                 first_name: str) -> str | None:
        where = f"turn {turn + 1} {role}"
        if not result.ok:
            return f"{where}: llm call failed after {result.attempts} attempt(s): {result.error}"
        text = clean_turn(result.text, role, persona_name=first_name)
        problem = turn_problem(text, finish_reason=result.finish_reason, earlier=earlier,
                               role=role)
        return f"{where}: {problem}" if problem else None
