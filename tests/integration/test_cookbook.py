"""Runs every snippet of docs/cookbook.md, as written, against the real app (only the address
changes): each must exit 0 and print an answer."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

COOKBOOK = pathlib.Path(__file__).resolve().parents[2] / "docs" / "cookbook.md"
DOC_ORIGIN = "http://127.0.0.1:8000"


def snippets() -> list[tuple[str, str, str]]:
    """(section, language, code) for every fenced block, in order."""
    out, section = [], ""
    for block in re.split(r"^(## .*)$", COOKBOOK.read_text(), flags=re.M):
        if block.startswith("## "):
            section = block[3:].strip()
            continue
        out += [(section, lang, code) for lang, code in re.findall(r"```(python|bash)\n(.*?)```", block, re.S)]
    return out


SNIPPETS = snippets()


def test_the_cookbook_covers_every_client():
    sections = {s for s, _, _ in SNIPPETS}
    assert sections == {"openai SDK: sync", "openai SDK: async", "openai SDK: streaming", "curl", "LangChain",
                        "LlamaIndex", "instructor"}
    assert all(DOC_ORIGIN in code for _, _, code in SNIPPETS)


@pytest.mark.parametrize("section,lang,code", SNIPPETS, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(SNIPPETS)])
def test_snippet_runs(section, lang, code, server_url):
    code = code.replace(DOC_ORIGIN, server_url.removesuffix("/v1"))
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), f"{section}: printed nothing"
    if lang == "bash":
        assert '"error"' not in done.stdout, done.stdout
