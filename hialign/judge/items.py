"""What the judge reads and writes: pairs to compare, per-order verdicts and combined results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

DIMENSIONS = ("grammar_fluency", "coherence_logic", "factuality", "relevance_instruction")

# Verdicts about the original pair (response_a vs response_b) and labels as shown to the judge.
VERDICTS = ("a", "b", "tie", "invalid")
SHOWN_LABELS = ("A", "B", "tie")
INVALID = "invalid"

# Order "ab" shows response_a as "A"; order "ba" swaps the two so response_b is shown first.
ORDERS = ("ab", "ba")


@dataclass
class JudgeItem:
    """One pair to judge: two responses to the same prompt (a string or chat messages)."""

    id: str
    prompt: str | list[dict]
    response_a: str
    response_b: str


@dataclass
class OrderVerdict:
    """The judge's answer for one presentation order, per dimension.

    ``shown`` holds "A" | "B" | "tie" | "invalid" as the judge saw the labels; ``verdicts`` maps
    them back onto the original pair ("a" | "b" | "tie" | "invalid").
    """

    order: str
    shown: dict[str, str]
    verdicts: dict[str, str] = field(default_factory=dict)
    source: str = ""  # "http" | "local" | "cache"
    attempts: int = 1  # judge asks for this order (1 + parse re-asks)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detail: dict = field(default_factory=dict)  # backend extras: log-probs, invalid reasons

    def to_json(self) -> dict:
        row = asdict(self)
        row["first_shown"] = "response_a" if self.order == "ab" else "response_b"
        return row


@dataclass
class JudgeResult:
    """The combined verdict per dimension for one pair, with the raw verdicts of both orders."""

    id: str
    verdicts: dict[str, str]
    orders: list[dict]
    judge: str

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "verdicts": self.verdicts,
            "orders": self.orders,
            "judge": self.judge,
        }


class PairsFormatError(ValueError):
    """A pairs file row breaks the format; the message names file, line and field."""


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise PairsFormatError(f"{where}: field 'prompt' must be a string or a list of messages")
    for i, message in enumerate(prompt):
        ok = isinstance(message, dict) and isinstance(message.get("content"), str)
        if not ok or not isinstance(message.get("role"), str):
            raise PairsFormatError(
                f"{where}: field 'prompt' message {i} needs string 'role' and 'content'"
            )


def item_from_row(row: dict, where: str) -> JudgeItem:
    """Validate one decoded JSONL row; ``where`` ("file:line") prefixes every error."""
    if not isinstance(row, dict):
        raise PairsFormatError(f"{where}: expected a JSON object")
    for name in ("id", "prompt", "response_a", "response_b"):
        if name not in row:
            raise PairsFormatError(f"{where}: missing field '{name}'")
    if not isinstance(row["id"], str) or not row["id"]:
        raise PairsFormatError(f"{where}: field 'id' must be a non-empty string")
    _check_prompt(row["prompt"], where)
    for name in ("response_a", "response_b"):
        if not isinstance(row[name], str):
            raise PairsFormatError(f"{where}: field '{name}' must be a string")
    return JudgeItem(row["id"], row["prompt"], row["response_a"], row["response_b"])


def read_pairs(path: str | Path) -> list[JudgeItem]:
    """Read a pairs JSONL file; blank lines are skipped, duplicate ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")

    items: list[JudgeItem] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairsFormatError(f"{where}: not valid JSON ({err.msg})") from None
            item = item_from_row(row, where)
            if item.id in seen:
                raise PairsFormatError(
                    f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})"
                )
            seen[item.id] = number
            items.append(item)
    return items
