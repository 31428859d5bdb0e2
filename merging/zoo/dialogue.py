"""Zoo v2's dialogue tasks: Seinfeld subtitles (`seinfeld-laugh-corpus`) and chatterbot's conversations
in eight languages (`chatterbot-corpus`); the shared helpers and the other sources are in sentences.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from merging.errors import ConfigError
from merging.zoo.sentences import SEP, TIME, _pairs_balanced, _rng
from merging.zoo.sources import TaskSource, _dedupe, package_dir

# ---------------------------------------------------------------------------------------------
# Seinfeld subtitles (seinfeld-laugh-corpus)


def seinfeld_segments(path: Path) -> list[tuple[str, str, bool]]:
    """Returns (speaker, text, laugh follows) per subtitle segment of one `.merged` episode file.

    The format: `# SPEAKER` lines, then segments as a start time, text lines and an end time; a laugh
    is `**LOL**` between two times.
    """
    segments: list[tuple[str, str, bool]] = []
    speaker, text = "", list[str]()
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("# "):
            speaker = line[2:].strip().upper()
        elif line == "**LOL**":
            if segments:
                segments[-1] = (segments[-1][0], segments[-1][1], True)
        elif TIME.match(line):
            if text:
                segments.append((speaker, " ".join(text), False))
                text = []
        else:
            text.append(line)
    if text:
        segments.append((speaker, " ".join(text), False))
    return segments


def _seinfeld_files() -> list[Path]:
    """Returns the corpus's episode files, or raises naming the package when there are none."""
    root = package_dir("seinfeld_laugh_corpus") / "the_corpus"
    files = sorted(root.glob("*.merged")) if root.is_dir() else []
    if not files:
        raise ConfigError(f"{root}: the installed `seinfeld-laugh-corpus` package has no *.merged episode files")
    return files


def seinfeld_laugh() -> TaskSource:
    """(previous subtitle line, line) → does the audience laugh right after the line (balanced by subsampling)."""
    files = _seinfeld_files()
    pairs = []
    for path in files:
        segments = seinfeld_segments(path)
        for (_, before, _), (_, line, laugh) in itertools.pairwise(segments):
            if len(line.split()) >= 3:
                pairs.append((before + SEP + line, int(laugh)))
    texts, labels = _dedupe(pairs)
    rng = _rng("seinfeld_laugh")
    keep = [i for i, y in enumerate(labels) if y == 1]
    keep += rng.sample([i for i, y in enumerate(labels) if y == 0], len(keep))
    keep.sort()
    return TaskSource(
        "seinfeld_laugh",
        [texts[i] for i in keep],
        [labels[i] for i in keep],
        ["no laugh", "laugh"],
        "seinfeld-laugh-corpus",
        "Seinfeld laugh corpus (Yad-Shalom & Goldberg, 2017): subtitles of 96 episodes with the laugh track's timing",
        "MIT (package); subtitle text as redistributed by the package",
        "the previous segment [SEP] a segment of 3+ words; label = a **LOL** mark follows it; the no-laugh "
        "class subsampled (seeded) to the laugh class's size",
        max_length=80,
    )


def dialogue_next_line() -> TaskSource:
    """(subtitle line, subtitle line) → does the second directly follow the first in the episode."""
    files = _seinfeld_files()
    rng = _rng("dialogue_next_line")
    anchors = []
    for path in files:
        lines = [t for _, t, _ in seinfeld_segments(path)]
        for i in range(0, len(lines) - 1, 3):
            if len(lines[i].split()) >= 3 and len(lines[i + 1].split()) >= 3:
                far = [k for k in rng.sample(range(len(lines)), min(8, len(lines))) if abs(k - i) > 20]
                if far:
                    anchors.append((lines[i], lines[i + 1], lines[far[0]]))
    texts, labels = _pairs_balanced(anchors, "dialogue_next_line")
    return TaskSource(
        "dialogue_next_line",
        texts,
        labels,
        ["elsewhere", "next line"],
        "seinfeld-laugh-corpus",
        "Seinfeld laugh corpus (Yad-Shalom & Goldberg, 2017): subtitles of 96 episodes aligned with speakers",
        "MIT (package); subtitle text as redistributed by the package",
        "every third subtitle segment i (3+ words) [SEP] segment i+1 or, by a seeded coin, a segment of the same "
        "episode more than 20 segments away",
        max_length=64,
    )


# ---------------------------------------------------------------------------------------------
# ChatterBot corpus


CHAT_LANGUAGES = ["english", "spanish", "italian", "portuguese", "dutch", "indonesian", "turkish", "german"]


def _chat_conversations(language: str) -> list[tuple[str, list[str]]]:
    """Returns (file stem, utterances) per conversation of one chatterbot-corpus language."""
    root = package_dir("chatterbot_corpus") / "data" / language
    if not root.is_dir():
        raise ConfigError(f"{root}: the installed `chatterbot-corpus` package has no `{language}` folder")
    out = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            utterances = [" ".join(str(u).split()) for u in conversation if isinstance(u, str | int | float)]
            out.append((path.stem, [u for u in utterances if u]))
    return out


def chat_language() -> TaskSource:
    """A chatbot utterance (3+ words) → which of eight languages it is in."""
    pairs = []
    for label, language in enumerate(CHAT_LANGUAGES):
        for _, utterances in _chat_conversations(language):
            pairs += [(u, label) for u in utterances if len(u.split()) >= 3]
    counts: dict[str, set[int]] = {}
    for text, label in pairs:
        counts.setdefault(text, set()).add(label)
    texts, labels = _dedupe([(t, y) for t, y in pairs if len(counts[t]) == 1])
    return TaskSource(
        "chat_language",
        texts,
        labels,
        CHAT_LANGUAGES,
        "chatterbot-corpus",
        "ChatterBot dialog corpus (Gunther Cox and contributors): conversations in 28 languages",
        "BSD-3-Clause",
        "utterances of 3+ words, deduplicated (a text found in two languages is dropped); label = the folder",
        max_length=48,
    )
