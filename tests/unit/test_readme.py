"""The README's promises: the two commands come first, and its config example is valid config."""
import pathlib
import re

import yaml

from deployments.config import parse_app_config

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make serve")
    assert first_block.splitlines()[1].startswith("make test")


def test_gpu_cluster_config_example_is_valid():
    section = README.split("## Real models on a GPU cluster", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    cfg = parse_app_config(yaml.safe_load(block)["args"])
    assert {m.kind for m in cfg.models} == {"chat", "embedding", "image"}
    assert cfg.ingress.auth.api_keys_env == "MODELHUB_API_KEYS"
