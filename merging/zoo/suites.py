"""The zoo's task suites: which tasks are merged and which stay out-of-domain, and every task's builder.

`sentences` (zoo v2, the default): sentence-level and pair tasks from five packages plus one
word-level task, chosen by the rule in `benchmarks/zoo_candidates.py` (fine-tuning beats the base's
linear probe on validation by 5+ points; when fewer than six pass, the next by validation margin).
`lexicon` (zoo v1): single words from lexicons; kept so its numbers can be reproduced.
"""

from __future__ import annotations

from collections.abc import Callable

from merging.errors import ConfigError
from merging.zoo import dialogue, sentences
from merging.zoo.sources import LEXICON_BUILDERS, TaskSource

SENTENCE_BUILDERS: dict[str, Callable[[], TaskSource]] = {
    "movie_review": sentences.movie_review,
    "tweet_sentiment": sentences.tweet_sentiment,
    "headline_match": sentences.headline_match,
    "dialogue_next_line": dialogue.dialogue_next_line,
    "speech_continuation": sentences.speech_continuation,
    "review_same_movie": sentences.review_same_movie,
    "seinfeld_laugh": dialogue.seinfeld_laugh,
    "news_same_article": sentences.news_same_article,
    "bbc_topic": sentences.bbc_topic,
    "convention_party": sentences.convention_party,
    "debate_party": sentences.debate_party,
    "chat_language": dialogue.chat_language,
}
BUILDERS: dict[str, Callable[[], TaskSource]] = {**LEXICON_BUILDERS, **SENTENCE_BUILDERS}

# suite → size → (merge tasks, out-of-domain tasks)
SUITES: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "sentences": {
        "ci": (["tweet_sentiment", "headline_match", "language_id"], ["bbc_topic", "convention_party"]),
        "full": (
            [
                "movie_review",
                "tweet_sentiment",
                "headline_match",
                "review_same_movie",
                "language_id",
                "dialogue_next_line",
            ],
            ["bbc_topic", "convention_party"],
        ),
    },
    "lexicon": {
        size: (
            ["vader_intensity", "afinn_intensity", "nrc_emotion", "name_gender", "language_id"],
            ["news_topic", "textblob_subjectivity"],
        )
        for size in ("ci", "full")
    },
}
DEFAULT_SUITE = "sentences"


def suite_tasks(suite: str, size: str) -> tuple[list[str], list[str]]:
    """Returns (merge tasks, out-of-domain tasks) of a suite at a size, or raises naming the choices."""
    if suite not in SUITES:
        raise ConfigError(f"zoo suite must be one of {sorted(SUITES)}, not {suite!r}")
    if size not in SUITES[suite]:
        raise ConfigError(f"zoo size must be one of {sorted(SUITES[suite])}, not {size!r}")
    return SUITES[suite][size]
