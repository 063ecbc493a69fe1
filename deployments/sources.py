"""Resolve a model `source` string from the config into something a loader can open.

Forms: an HF repo id ('org/name'), a local directory, a path to a .gguf file,
'package:<pkg>/<relative path>' (a file or folder shipped inside an installed Python package,
found with importlib.util.find_spec without importing the package), and 'builtin:<name>'.
Must not import torch.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["hub", "dir", "gguf", "builtin"]
    path: str                       # repo id, directory, the folder holding a .gguf, or builtin name
    gguf_file: Optional[str] = None  # file name inside `path` for GGUF checkpoints


class SourceError(ValueError):
    """The source cannot be found; the message says where we looked."""


def resolve_source(source: str) -> ResolvedSource:
    if source.startswith("builtin:"):
        return ResolvedSource("builtin", source.removeprefix("builtin:"))
    if source.startswith("package:"):
        source = _package_path(source.removeprefix("package:"))
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise SourceError(f"GGUF file not found: {source}")
        return ResolvedSource("gguf", os.path.dirname(os.path.abspath(source)), os.path.basename(source))
    if os.path.isdir(source):
        return ResolvedSource("dir", os.path.abspath(source))
    if source.startswith(("/", ".", "~")):
        raise SourceError(f"local model path not found: {source}")
    return ResolvedSource("hub", source)


def _package_path(spec: str) -> str:
    package, _, rel = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"Python package {package!r} is not installed (source 'package:{spec}'); "
                          f"`make install` installs the default model wheels")
    return os.path.join(list(found.submodule_search_locations)[0], rel)
