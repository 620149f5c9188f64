"""The offline demo's profile: every stage config it builds validates, and bad knobs say the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from tasks.demo import DemoConfig, demo_generation_config, demo_tagging_config


def test_demo_defaults_build_valid_stage_configs():
    cfg = DemoConfig()
    assert cfg.conversations == 50
    gen = demo_generation_config(cfg)
    assert gen.count == 50 and gen.shard_size == 50 and gen.concurrency == 16
    assert gen.user_stop == ["\n\n"] and gen.assistant_stop == ["\n\n"]
    assert gen.assistant_max_tokens == cfg.assistant_max_tokens
    tag = demo_tagging_config(cfg, "batch-1")
    assert tag.batch_ids == ["batch-1"] and tag.judges == ["judge"]
    assert tag.backends["belief"] == "heuristic" and tag.backends["hallucination"] == "heuristic"
    assert tag.judge_mode == "combined" and tag.judge_sample_rate == cfg.judge_sample_rate


@pytest.mark.parametrize(("field", "value"), [
    ("conversations", 2), ("judge_sample_rate", 0.0), ("judge_sample_rate", 1.5),
    ("eval_scenarios", 0), ("shadow_share", 0.0),
])
def test_out_of_range_demo_knobs_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        DemoConfig(**{field: value})


def test_sigterm_unwinds_the_demo_so_its_servers_are_stopped(tmp_path):
    """kill / a CI timeout runs the demo's `finally` blocks (model server, router) like Ctrl-C."""
    marker = tmp_path / "cleaned"
    script = textwrap.dedent(f"""
        import time
        from tasks.demo import _exit_cleanly_on_sigterm
        _exit_cleanly_on_sigterm()
        try:
            print("ready", flush=True)
            time.sleep(60)
        finally:
            open({str(marker)!r}, "w").write("yes")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "yes"


def test_summary_says_which_alias_is_the_base_model(monkeypatch, capsys):
    """A fresh registry registers the base model after the first adapter (champion=v2), so the
    summary names it instead of leaving a higher champion version unexplained."""
    import tasks.register.registry as register
    from tasks.demo import _print_summary

    monkeypatch.setattr(register, "get_alias_version",
                        lambda name, alias: {"champion": "2", "challenger": "1"}[alias])
    monkeypatch.setattr(register, "get_version_info",
                        lambda version, model_name=None: {"is_base": version == "2"})
    _print_summary({"total_s": 1.0, "registered": {"model_name": "m", "version": "1"}})
    line = next(x for x in capsys.readouterr().out.splitlines() if "aliases" in x)
    assert line.split(None, 1)[1] == "challenger=v1  champion=v2 (the base model, no adapter)"
