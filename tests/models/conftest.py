"""A small text corpus the language-model tests train on."""

from __future__ import annotations

import json

import pytest

DOCS = [f"Chapter {i}. " + " ".join(f"the {w} of {i}" for w in ("river", "hill", "town", "road")) for i in range(300)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    return str(path)
