"""Shared fixtures: a stack writer and a signing key, both in the test's tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vigo.crypto.keys import generate_keypair, load_private_key, load_public_key

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_STACK = REPO / "examples" / "stack"


def write_stack(root: Path, policies: dict[str, Any], templates: dict[str, str] | None = None,
                files: dict[str, bytes] | None = None) -> Path:
    """Write a stack folder: ``policies`` maps file name -> YAML data (or raw text)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, doc in policies.items():
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        (root / name).write_text(text)
    for name, text in (templates or {}).items():
        path = root / "templates" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, data in (files or {}).items():
        path = root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def keypair(tmp_path: Path):
    private, public = generate_keypair(tmp_path / "signing.key")
    return load_private_key(private), load_public_key(public), private, public
