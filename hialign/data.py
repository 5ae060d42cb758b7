"""Preference data: read hh-rlhf transcripts or prompt/chosen/rejected rows into checked pairs.

Every row read becomes a ``PreferencePair`` or a ``SkippedRow`` with a reason from a fixed
vocabulary (quoted below); by default a skip is logged as ``file:line: reason`` and counted, with
``strict=True`` the first one raises ``MalformedRowError``. Nothing is dropped silently.

Row formats
    (a) hh-rlhf: ``{"chosen": transcript, "rejected": transcript}``, a transcript being turns
        delimited by ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``.
    (b) ``{"prompt", "chosen", "rejected"}``: prompt is a string (one user turn) or a list of
        ``{"role", "content"}`` messages; chosen/rejected are strings or message lists, of which
        the final assistant message is the reply. A row with a ``"prompt"`` key is format (b).

Rules, checked in this order
    - Whitespace-only lines are not rows (neither counted nor skipped). A line that is not JSON
      (or not UTF-8) is "bad json"; JSON that is not an object is "not an object".
    - "missing key 'chosen'" / "missing key 'rejected'"; a value of the wrong kind (say a number)
      is "wrong type for 'chosen'" (or 'rejected', 'prompt'); a message that is not a
      ``{"role", "content"}`` object with a user/assistant/system role and text content is
      "bad message".
    - Transcripts are split at the delimiters (text before the first one, or no delimiter at
      all, is "not a transcript") and each turn is stripped of surrounding whitespace. The last
      turn must be the assistant's ("no assistant turn"): it is the reply, every turn before it
      is the prompt. "empty reply" when either reply is empty; "diverging prompts" when the
      two transcripts' prompts differ in any turn. In harmless-base test this is always a reply
      split over two "Assistant:" markers on one side only (lines 1255, 1689, 1951, 1953, 2037).
    - In the prompt, consecutive turns of one speaker are merged into one message joined by a
      blank line (hh-rlhf sometimes has two "Assistant:" turns in a row, e.g. test line 764,
      and some chat templates, Gemma's or Llama 2's, reject repeated roles). The prompt must
      then end with a user turn ("no user turn"); for format (b) too.
    - Turn markers glued into a reply. In a transcript, "Human:" / "Assistant:" *is* the turn
      delimiter, so a reply that contains one (case-sensitive, as a whole word, anywhere: at its
      start as in ``"Assistant: Human: ..."``, after a sentence without the blank line, or quoted)
      carries a second speaker's turn that DPO would train the policy to write. Such a row is
      skipped as "human turn inside reply" (or "assistant turn inside reply"). The same markers
      in earlier turns are kept verbatim: they are shared context, masked out of the loss.
      Format (b) replies are separate fields, so their text is taken as it is.
    - "identical replies" when chosen equals rejected: no preference signal.

The tokenisation names (``TokenizedPair``, ``tokenize_pair``, ``tokenize_pairs``,
``collate_pairs``) live in ``hialign.tokenization`` and can also be imported from here.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
ROLES = ("user", "assistant", "system")
SPEAKERS = {"Human": "user", "Assistant": "assistant"}
LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}
TURN_DELIMITER = re.compile(r"\n\n(Human|Assistant):")
MARKER_IN_REPLY = re.compile(r"\b(Human|Assistant):")
# A hub id is "name" or "owner/name"; anything else that does not exist is a missing path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: a chat prompt ending with a user turn, and two final assistant replies."""

    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not turned into a pair, with where it came from and why."""

    source: str
    reason: str


class MalformedRowError(ValueError):
    """A row breaks the format (raised in strict mode); names the file, the line and the reason."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class DataSourceError(OSError):
    """The data spec names no readable file, folder or reachable hub dataset."""


@dataclass
class PreferenceData:
    """The pairs read from a data spec, the rows skipped, and how many rows were read."""

    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    rows_read: int = 0

    def skip_counts(self) -> dict[str, int]:
        """Skipped rows per reason, most frequent first."""
        counts = Counter(row.reason for row in self.skipped)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


class _Skip(Exception):
    """Internal: the row being parsed breaks a rule; carries the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_preferences(spec: str, strict: bool = False, split: str = "test") -> PreferenceData:
    """Read preference pairs from a ``.jsonl``/``.jsonl.gz`` file, a folder of them, or a hub id.

    A folder contributes every ``*.jsonl`` and ``*.jsonl.gz`` in it, sorted by name. Anything
    that is not a local path is loaded with ``datasets.load_dataset(spec, split=split)``.
    Malformed rows are skipped and logged, or raise ``MalformedRowError`` when ``strict``.
    """
    data = PreferenceData()
    for path, line, row in _rows(spec, split):
        data.rows_read += 1
        try:
            data.pairs.append(_parse_row(row, source=f"{Path(path).name}:{line}"))
        except _Skip as skip:
            if strict:
                raise MalformedRowError(path, line, skip.reason) from None
            logger.warning("%s:%d: skipped, %s", path, line, skip.reason)
            data.skipped.append(SkippedRow(f"{Path(path).name}:{line}", skip.reason))

    counts = ", ".join(f"{reason} {n}" for reason, n in data.skip_counts().items())
    logger.info(
        "read %d rows from %s: %d pairs, %d skipped%s",
        data.rows_read,
        spec,
        len(data.pairs),
        len(data.skipped),
        f" ({counts})" if counts else "",
    )
    return data


def _rows(spec: str, split: str) -> Iterator[tuple[str, int, object]]:
    """Yield ``(path, 1-based line, parsed JSON or _Skip)`` for every row the spec names."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        if not files:
            raise DataSourceError(f"{path} is a folder but holds no *.jsonl or *.jsonl.gz files")
        for file in files:
            yield from _file_rows(file)
    elif path.is_file():
        if not path.name.endswith(JSONL_SUFFIXES):
            raise DataSourceError(f"{path}: expected a .jsonl or .jsonl.gz file")
        yield from _file_rows(path)
    elif HUB_ID.fullmatch(spec) and not spec.endswith((".json", ".jsonl", ".gz")):
        yield from _hub_rows(spec, split)
    else:
        raise DataSourceError(f"no such file or folder: {path}")


def _file_rows(path: Path) -> Iterator[tuple[str, int, object]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    # JSON may escape a lone UTF-16 surrogate (\ud800) that no tokenizer takes.
                    json.dumps(row, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    row = _Skip("invalid unicode")
                except ValueError:  # also UnicodeDecodeError
                    row = _Skip("bad json")
                yield str(path), line_number, row
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a cut or mislabelled archive
        raise DataSourceError(
            f"{path}: unreadable gzip after line {line_number} ({err}); the file is truncated "
            "or not gzip-compressed"
        ) from None


def _hub_rows(spec: str, split: str) -> Iterator[tuple[str, int, object]]:
    import datasets  # imported here: slow, and only hub ids need it

    try:
        dataset = datasets.load_dataset(spec, split=split)
    except Exception as err:  # the hub raises many types; all mean "could not get it"
        raise DataSourceError(
            f"{spec!r} is not a local file or folder, so it was read as a Hugging Face hub "
            f"dataset, which failed (this needs network access to the hub; without one set "
            f"HF_HUB_OFFLINE=1 to fail at once): {err}"
        ) from err
    for index, row in enumerate(dataset, start=1):
        yield f"{spec}[{split}]", index, row


def _parse_row(row: object, source: str) -> PreferencePair:
    """Turn one decoded row (either format) into a pair; raises ``_Skip`` with the reason."""
    if isinstance(row, _Skip):
        raise row
    if not isinstance(row, dict):
        raise _Skip("not an object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _Skip(f"missing key {key!r}")

    if "prompt" in row:
        prompt = _prompt_messages(row["prompt"])
        chosen = _reply(row["chosen"], "chosen")
        rejected = _reply(row["rejected"], "rejected")
        _check_replies(chosen, rejected)
        return PreferencePair(prompt, chosen, rejected, source)

    prompt, chosen = _split_transcript(row["chosen"], "chosen")
    other_prompt, rejected = _split_transcript(row["rejected"], "rejected")
    if not chosen or not rejected:
        raise _Skip("empty reply")
    if prompt != other_prompt:
        raise _Skip("diverging prompts")
    prompt = _merge_turns(prompt)
    for reply in (chosen, rejected):
        marker = MARKER_IN_REPLY.search(reply)
        if marker:
            raise _Skip(f"{marker.group(1).lower()} turn inside reply")
    _check_replies(chosen, rejected)
    return PreferencePair(prompt, chosen, rejected, source)


def _split_transcript(text: object, key: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """hh-rlhf transcript -> ((role, text) turns before the last one, final assistant reply)."""
    if not isinstance(text, str):
        raise _Skip(f"wrong type for {key!r}")
    before, *parts = TURN_DELIMITER.split(text)
    if before.strip() or not parts:
        raise _Skip("not a transcript")

    turns = [
        (SPEAKERS[speaker], content.strip()) for speaker, content in zip(parts[::2], parts[1::2])
    ]
    if turns[-1][0] != "assistant":
        raise _Skip("no assistant turn")
    return tuple(turns[:-1]), turns[-1][1]


def _merge_turns(turns: Sequence[tuple[str, str]]) -> tuple[dict, ...]:
    """(role, text) turns -> chat messages, a run of one speaker's turns joined by blank lines."""
    messages: list[dict] = []
    for role, content in turns:
        if messages and messages[-1]["role"] == role:
            merged = "\n\n".join(s for s in (messages[-1]["content"], content) if s)
            messages[-1] = {"role": role, "content": merged}
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise _Skip("no user turn")
    if not messages[-1]["content"]:
        raise _Skip("empty prompt")
    return tuple(messages)


def _message(value: object) -> dict:
    if not isinstance(value, dict) or value.get("role") not in ROLES:
        raise _Skip("bad message")
    if not isinstance(value.get("content"), str):
        raise _Skip("bad message")
    return {"role": value["role"], "content": value["content"].strip()}


def _prompt_messages(value: object) -> tuple[dict, ...]:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value.strip()}]
    elif isinstance(value, list):
        messages = [_message(item) for item in value]
    else:
        raise _Skip("wrong type for 'prompt'")
    if not messages or messages[-1]["role"] != "user":
        raise _Skip("no user turn")
    if not messages[-1]["content"]:
        raise _Skip("empty prompt")
    return tuple(messages)


def _reply(value: object, key: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if not isinstance(value, list):
        raise _Skip(f"wrong type for {key!r}")
    messages = [_message(item) for item in value]
    if not messages or messages[-1]["role"] != "assistant":
        raise _Skip("no assistant turn")
    return messages[-1]["content"]


def _check_replies(chosen: str, rejected: str) -> None:
    if not chosen or not rejected:
        raise _Skip("empty reply")
    if chosen == rejected:
        raise _Skip("identical replies")


def split_train_eval(
    pairs: Sequence[PreferencePair], n_train: int, n_eval: int, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Draw ``n_train`` training pairs and ``n_eval`` held-out pairs, deterministically.

    Pairs are grouped by prompt text (all turns); the groups are shuffled with ``seed``, the
    first ``n_eval`` groups give one eval pair each (so eval prompts are unique), and training
    draws only from the other groups, so no eval prompt, nor a duplicate of it, is trained on.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    groups: dict[str, list[PreferencePair]] = {}
    for pair in pairs:  # the rendered text names every turn and its speaker
        groups.setdefault(render_prompt(pair), []).append(pair)

    rng = random.Random(seed)
    order = list(groups.values())
    rng.shuffle(order)
    if n_eval > len(order):
        raise ValueError(
            f"asked for {n_eval} held-out prompts but the data has only {len(order)} "
            f"distinct prompts ({len(pairs)} pairs)"
        )

    eval_pairs = [group[0] for group in order[:n_eval]]
    train_pool = [pair for group in order[n_eval:] for pair in group]
    if n_train > len(train_pool):
        raise ValueError(
            f"asked for {n_train} training pairs but only {len(train_pool)} of the "
            f"{len(pairs)} pairs remain after holding out {n_eval} prompts"
        )
    rng.shuffle(train_pool)
    logger.info(
        "split %d pairs (%d distinct prompts, seed %d): %d train, %d eval",
        len(pairs),
        len(order),
        seed,
        n_train,
        n_eval,
    )
    return train_pool[:n_train], eval_pairs


def render_prompt(pair_or_messages: PreferencePair | Sequence[dict]) -> str:
    """Plain-text dialogue (``Human: ...\\n\\nAssistant: ...``) for judges and reports."""
    messages = (
        pair_or_messages.prompt
        if isinstance(pair_or_messages, PreferencePair)
        else pair_or_messages
    )
    return "\n\n".join(f"{LABELS[m['role']]}: {m['content']}" for m in messages)


_TOKENIZATION_NAMES = ("TokenizedPair", "tokenize_pair", "tokenize_pairs", "collate_pairs")


def __getattr__(name: str):
    # Lazy re-export: hialign.tokenization imports this module, so a top-level import would cycle.
    if name in _TOKENIZATION_NAMES:
        from hialign import tokenization

        return getattr(tokenization, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
