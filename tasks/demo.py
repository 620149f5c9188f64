"""The offline demo: the whole loop on embedded defaults, in one process, with progress output.

It calls the same stage functions the DAGs call, in the order the assets chain them:
generate → tag + judge → curate + gate → train (local LoRA) → register (MLflow, alias
challenger) → evaluate → shadow deploy → simulated traffic through the router → comparison report.
Everything is real: the LLM is SmolLM2-135M-Instruct behind the local OpenAI-compatible server,
embeddings are MiniLM, Postgres is embedded (or DATABASE_URL), MLflow is a local SQLite store (or
MLFLOW_TRACKING_URI). Reruns resume: ids are deterministic and finished steps are reused.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, Field

from tasks.core.settings import get_settings


class DemoFailed(RuntimeError):
    """A demo step could not continue; the message says which and what to do."""


class DemoConfig(BaseModel):
    conversations: int = Field(50, ge=5, description="conversations to generate")
    turns: int = Field(1, ge=1, le=6)
    seed: int = 42
    generation_max_tokens: int = Field(160, ge=8, description="user turns")
    assistant_max_tokens: int = Field(256, ge=8)
    train_steps: int = Field(10, ge=1)
    simulated_requests: int = Field(240, ge=10)
    simulated_users: int = Field(60, ge=2)
    shadow_share: float = Field(0.5, gt=0, le=1, description="canary share for the demo "
                                "(production default is 0.05; the demo wants both arms filled)")
    challenger_preference: float = 0.7
    champion_preference: float = 0.5
    min_samples: int = 30
    evaluate: bool = True
    judge_sample_rate: float = Field(0.1, gt=0, le=1, description="share of conversations the "
                                     "rubric judge grades (every tagger sees all of them)")
    eval_scenarios: int = Field(2, ge=1, description="evaluation scenarios (of the fixed set)")


def _say(message: str) -> None:
    print(f"[tuneloop demo] {message}", flush=True)


@contextmanager
def _step(name: str, timings: dict[str, float]):
    _say(f"{name} ...")
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    _say(f"{name} done in {timings[name]:.1f} s")


@contextmanager
def _model_server_process(max_batch_size: int = 16, startup_timeout_s: float = 600.0):
    """Run the model server in its own process (as in production): the demo's own work (client,
    embeddings, training) must not share a GIL with token generation. It reads its keys from the
    environment it inherits (never from its command line); readiness is the open /health."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "serving.model_server", "--host",
                             "127.0.0.1", "--port", str(port), "--max-batch-size",
                             str(max_batch_size), "--log-level", "warning"])
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise DemoFailed(f"the model server exited with code {proc.returncode}; "
                                 "run `python -m serving.model_server` to see why")
            try:
                urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DemoFailed("the model server did not become healthy in time") from None
                time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _use_endpoint(base_url: str) -> None:
    """Point every LLM role and the router's backends at the local model server, with its key:
    the two dev defaults are equal, but a server started with TUNELOOP_MODEL_SERVER_API_KEY of
    its own must still be reached by the demo's LLM clients (the router's backends read that
    setting themselves)."""
    os.environ["TUNELOOP_LLM_BASE_URL"] = base_url
    os.environ["TUNELOOP_LLM_API_KEY"] = get_settings().model_server_api_key.get_secret_value()
    os.environ["TUNELOOP_ROUTER_CHAMPION_BASE_URL"] = base_url
    get_settings.cache_clear()


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the model server and router the demo
    started are stopped by their context managers instead of being orphaned."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_demo(cfg: DemoConfig | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from tasks.core.db.engine import get_engine, migrate

    cfg = cfg or DemoConfig()
    _exit_cleanly_on_sigterm()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    settings = get_settings()
    summary: dict[str, Any] = {"data_dir": str(settings.data_dir)}

    with _step("database (migrations)", timings):
        engine = get_engine()
        migrate(engine)
        summary["database"] = engine.url.render_as_string(hide_password=True)
        _say(f"database: {summary['database']}")

    _say("starting the local model server (SmolLM2-135M-Instruct) ...")
    server_started = time.perf_counter()
    with _model_server_process() as base_url:
        timings["model server start"] = round(time.perf_counter() - server_started, 1)
        _use_endpoint(base_url)
        _say(f"model server: {base_url}")
        summary.update(_loop(cfg, timings, tqdm))

    summary["timings_s"] = timings
    summary["total_s"] = round(time.perf_counter() - started, 1)
    _print_summary(summary)
    return summary


def demo_generation_config(cfg: DemoConfig) -> Any:
    """Generation for the demo: one paragraph per turn (stop at a blank line), since SmolLM2
    otherwise rambles until max_tokens and the turn is recorded as truncated; one shard with 16
    in flight, which the model server decodes as one batch."""
    from tasks.generate import GenerationConfig

    return GenerationConfig(count=cfg.conversations, turns=cfg.turns, seed=cfg.seed,
                            max_tokens=cfg.generation_max_tokens,
                            assistant_max_tokens=cfg.assistant_max_tokens,
                            shard_size=cfg.conversations, user_stop=["\n\n"],
                            assistant_stop=["\n\n"], concurrency=16)


def demo_tagging_config(cfg: DemoConfig, batch_id: str) -> Any:
    """Tagging for the demo: emotion/topic/temporal on MiniLM, belief/hallucination heuristic,
    every tagger on every conversation; the rubric judge (a ~2.7k-token prompt each, combined
    mode, one attempt) grades a stable audit sample, which is what 2 CPU cores allow."""
    from tasks.tag.config import TaggingConfig

    base = TaggingConfig.from_params({"classifier_backend": "embedding", "retries": 2,
                                      "judges": ["judge"], "batch_id": batch_id})
    return TaggingConfig.model_validate({
        **base.model_dump(),
        "backends": {**base.backends, "belief": "heuristic", "hallucination": "heuristic"},
        "judge_mode": "combined", "max_in_flight": 16, "max_tokens": 256, "judge_retries": 1,
        "judge_sample_rate": cfg.judge_sample_rate,
    })


def _loop(cfg: DemoConfig, timings: dict[str, float], tqdm) -> dict[str, Any]:
    from tasks.curate.config import CurationConfig
    from tasks.curate.stage import curate
    from tasks.evaluate.stage import evaluate_registered
    from tasks.generate import run_generation
    from tasks.register.stage import register_training
    from tasks.shadow.stage import compare_and_report, deploy_registered
    from tasks.tag.stage import run_tagging
    from tasks.train.stage import (
        collect_training,
        prepare_training,
        resolve_dataset,
        run_local_training,
    )

    out: dict[str, Any] = {}
    with _step(f"generate {cfg.conversations} conversations", timings):
        gen_cfg = demo_generation_config(cfg)
        with tqdm(total=cfg.conversations, desc="generate", unit="conv") as bar:
            def progress(event: dict[str, Any]) -> None:
                bar.update(event.get("count", 1) if event.get("event") == "skipped" else 1)

            generated = run_generation(gen_cfg, progress=progress)
        out["generation"] = generated
        _say(f"batch {generated['batch_id']}: ok={generated['ok']} failed={generated['failed']} "
             f"duplicate={generated['duplicate']}")
        if not generated["ok"]:
            raise DemoFailed("no conversation was generated; check the model server log")

    with _step("tag + judge", timings):
        tag_cfg = demo_tagging_config(cfg, generated["batch_id"])
        with tqdm(desc="tag", unit="task") as bar:
            def tag_progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            tagged = run_tagging(tag_cfg, progress=tag_progress)
        out["tagging"] = tagged.get("stats", {})

    with _step("curate + Great Expectations gate", timings):
        curated = curate(CurationConfig(batch_id=generated["batch_id"],
                                        require_rubric_pass=False, min_rows=5))
        out["dataset"] = curated
        if not curated["gate_passed"]:
            raise DemoFailed(
                f"the gate blocked dataset {curated['dataset_id']}: "
                f"{', '.join(curated['failed_expectations'])} (Data Docs: "
                f"{curated.get('data_docs')}); training is skipped, as in the DAG")

    with _step(f"train LoRA adapter locally ({cfg.train_steps} steps)", timings):
        prepared = prepare_training(resolve_dataset(curated["dataset_id"]), {
            "backend": "local", "max_steps": cfg.train_steps,
            "base_model": "smollm2-135m-instruct",
            # One packed 1024-token bin per step (the YAML's 4 x 2 = 8 bins suits a GPU): a
            # few dozen rows fill ~5 bins, so the default 10 steps are ~2 epochs on 2 cores.
            "micro_batch_size": 1, "gradient_accumulation_steps": 1,
        })
        trained = run_local_training(prepared)
        out["training"] = trained["metrics"]

    with _step("register in MLflow (alias challenger)", timings):
        registered = register_training(prepared, collect_training(prepared))
        out["registered"] = registered

    if cfg.evaluate:
        with _step("evaluate base vs tuned (model card)", timings):
            from tasks.evaluate.judges import LlmEvalJudge

            judge = LlmEvalJudge.for_role("judge", retries=1, max_tokens=256)
            out["evaluation"] = evaluate_registered(registered, max_new_tokens=48,
                                                    max_val_rows=20, judge=judge,
                                                    max_scenarios=cfg.eval_scenarios)

    with _step("shadow deploy + simulated traffic", timings):
        deployment = deploy_registered(registered, mode="canary", share=cfg.shadow_share)
        out["deployment"] = deployment
        out["traffic"] = _simulate(cfg)

    with _step("shadow comparison report", timings):
        report = compare_and_report(deployment["deployment_id"], min_samples=cfg.min_samples)
        out["report"] = {k: report.get(k) for k in ("decision", "report_path", "report_uri",
                                                     "mlflow_run_id", "reason")}
    return out


def _simulate(cfg: DemoConfig) -> dict[str, Any]:
    from serving.router import running_router
    from serving.router_config import RouterConfig
    from tasks.shadow.simulate import simulate_traffic

    settings = get_settings()
    router_cfg = RouterConfig.from_settings(settings, deployment_ttl_s=0.5, alias_ttl_s=1.0)
    with running_router(router_cfg) as router:
        _say(f"router: {router.base_url}")
        return simulate_traffic(
            router.base_url, settings.router_api_key.get_secret_value(),
            users=cfg.simulated_users, requests=cfg.simulated_requests,
            preference={"champion": cfg.champion_preference,
                        "challenger": cfg.challenger_preference},
            seed=cfg.seed, concurrency=8, max_tokens=12,
        )


def _print_summary(summary: dict[str, Any]) -> None:
    from tasks.register.registry import get_alias_version, get_version_info

    dataset = summary.get("dataset", {})
    registered = summary.get("registered", {})
    name = registered.get("model_name", get_settings().registered_model_name)
    aliases = {alias: get_alias_version(name, alias) for alias in ("champion", "challenger")}

    def label(alias: str) -> str:
        version = aliases[alias]
        if version is None:
            return f"{alias}=unset"
        base = get_version_info(version, model_name=name)["is_base"]
        return f"{alias}=v{version}" + (" (the base model, no adapter)" if base else "")
    lines = [
        "",
        "=" * 72,
        f"tuneloop demo finished in {summary['total_s']:.0f} s",
        f"  database           {summary.get('database')}",
        f"  dataset snapshot   {dataset.get('dataset_id')}  {dataset.get('artifact_uri')}",
        f"  gate               passed={dataset.get('gate_passed')}  Data Docs: "
        f"{dataset.get('data_docs')}",
        f"  MLflow             {get_settings().resolved_mlflow_tracking_uri}",
        f"  model version      {name} v{registered.get('version')}  run {registered.get('run_id')}",
        f"  aliases            {label('challenger')}  {label('champion')}",
        f"  model card         {summary.get('evaluation', {}).get('card_path')}",
        f"  shadow report      {summary.get('report', {}).get('report_path')}",
        f"  decision           {summary.get('report', {}).get('decision')}",
        f"  step timings (s)   {summary.get('timings_s')}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
