"""Reading a verdict from a judge's reply, reasoning judges included.

The verdict comes from the final answer only: thinking inside ``<think>…</think>`` (or a separate
``reasoning_content`` field, which is never read) may quote or weigh verdicts before settling.
Within the final answer the last well-formed verdict object wins over anything quoted earlier.
Without a complete JSON object, "dimension: verdict" lines are read tolerantly, last one wins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from hialign.judge.items import DIMENSIONS, INVALID

_THINK_CLOSE = re.compile(r"</(think|thinking|reasoning)>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<(think|thinking|reasoning)>", re.IGNORECASE)

# Key spellings a judge may use for each dimension, matched after lower-casing.
_KEY_PATTERNS = {
    "grammar_fluency": r"grammar|fluency",
    "coherence_logic": r"coheren|logic",
    "factuality": r"factual|facts?\b|accura",
    "relevance_instruction": r"relevan|instruction",
}
_VALUE_WORDS = r"response[\s_]*[ab]|answer[\s_]*[ab]|assistant[\s_]*[ab]|[ab]|tie|equal|draw|same"
_LINE_PATTERN = re.compile(
    r"(?P<key>[a-z][a-z &_/-]{1,60}?)\s*[\"'*]*\s*[:=]\s*[\"'*\s]*(?P<value>"
    + _VALUE_WORDS
    + r")\b",
    re.IGNORECASE,
)


@dataclass
class ParsedVerdict:
    """Verdict per dimension as shown ("A" | "B" | "tie" | "invalid"), and how it was read."""

    shown: dict[str, str] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, INVALID))
    method: str = "none"  # "json" | "tolerant" | "none"
    reason: str | None = None

    @property
    def complete(self) -> bool:
        return INVALID not in self.shown.values()


def final_answer(content: str | None) -> str:
    """The part of a reply after any thinking; empty when the thinking never closed."""
    if not content:
        return ""
    closes = list(_THINK_CLOSE.finditer(content))
    if closes:
        return content[closes[-1].end() :].strip()
    if _THINK_OPEN.search(content):
        return ""  # cut off while still thinking: there is no final answer
    return content.strip()


def normalise_label(value) -> str | None:
    """Map "A", "Response B", "tie", "equal", ... onto "A" | "B" | "tie"; None if unknown."""
    if isinstance(value, dict):
        for key in ("verdict", "winner", "better", "answer", "choice"):
            if key in value:
                return normalise_label(value[key])
        return None
    if not isinstance(value, str):
        return None
    text = re.sub(r"[\s\"'*.`]+", " ", value).strip().lower()
    text = re.sub(r"\s+is\s+better$", "", text)
    match = re.fullmatch(r"(?:(?:response|answer|assistant)[\s_]*)?([ab])", text)
    if match:
        return match.group(1).upper()
    if text in ("tie", "equal", "draw", "same", "neither", "both", "tied", "both equal"):
        return "tie"
    return None


def dimension_of(key: str) -> str | None:
    """Which dimension a key written by the judge names, or None."""
    lowered = key.lower()
    if lowered in DIMENSIONS:
        return lowered
    hits = [dim for dim, pattern in _KEY_PATTERNS.items() if re.search(pattern, lowered)]
    return hits[0] if len(hits) == 1 else None


def _json_objects(text: str) -> list[dict]:
    """Every JSON object embedded in ``text``, in order of appearance (outermost only)."""
    decoder = json.JSONDecoder()
    found, position = [], 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return found
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(value, dict):
            found.append(value)
        position = end


def verdict_from_object(obj: dict) -> dict[str, str] | None:
    """The four dimension labels from one JSON object, or None unless all four are readable."""
    labels: dict[str, str] = {}
    for key, value in obj.items():
        dim = dimension_of(str(key))
        label = normalise_label(value)
        if dim is not None and label is not None:
            labels[dim] = label
    if set(labels) != set(DIMENSIONS):
        nested = [v for v in obj.values() if isinstance(v, dict)]
        for inner in reversed(nested):  # e.g. {"verdicts": {...}}
            found = verdict_from_object(inner)
            if found:
                return found
        return None
    return labels


def _tolerant_lines(text: str) -> dict[str, str]:
    """Dimension labels from "key: value" text; for each dimension the last mention wins."""
    labels: dict[str, str] = {}
    for match in _LINE_PATTERN.finditer(text):
        dim = dimension_of(match.group("key"))
        label = normalise_label(match.group("value"))
        if dim is not None and label is not None:
            labels[dim] = label
    return labels


def parse_verdict(content: str | None) -> ParsedVerdict:
    """Read the four verdicts from a reply's content (thinking is skipped, last verdict wins)."""
    answer = final_answer(content)
    if not answer:
        return ParsedVerdict(reason="no final answer after the thinking")

    for obj in reversed(_json_objects(answer)):
        labels = verdict_from_object(obj)
        if labels:
            return ParsedVerdict(shown=labels, method="json")

    labels = _tolerant_lines(answer)
    parsed = ParsedVerdict(method="tolerant" if labels else "none")
    parsed.shown.update(labels)
    if not parsed.complete:
        missing = [dim for dim in DIMENSIONS if parsed.shown[dim] == INVALID]
        parsed.reason = f"no verdict for {', '.join(missing)} in: {answer[:120]!r}"
    return parsed
