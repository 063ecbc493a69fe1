"""docs/configuration.md is generated from deployments/config.py and must not go stale."""
import pathlib

from deployments.config import AppConfig, LLMEngineConfig
from deployments.config_docs import render

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_md_is_current():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m deployments.config_docs > docs/configuration.md`")


def test_every_key_and_its_description_is_in_the_reference():
    text = render()
    for name, field in LLMEngineConfig.model_fields.items():
        assert f"| `{name}` |" in text and field.description.split(".")[0] in text
    assert "| `models` |" in text and "| `ingress` |" in text and "`kind: rerank`" in text
    assert set(AppConfig.model_fields) == {"models", "ingress"}
