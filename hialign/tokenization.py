"""Tokenise preference pairs through the model's chat template, fit them to a length, batch them.

Prompt ids are the chat template applied to the prompt with ``add_generation_prompt=True`` (for
SmolLM2's ChatML: default system turn, the dialogue, then ``<|im_start|>assistant\\n``). Response
ids are the ids of prompt + reply rendered through the same template, minus the prompt's ids,
up to and including the end-of-turn token (``<|im_end|>``; the template's whitespace after it is
dropped). The prompt ids must be a prefix of the full ids; a template that breaks that raises
``ChatTemplateError`` rather than silently mis-masking.

Truncation rule (prompt + the longer response must fit ``max_length``):
    1. Drop whole turns from the start of the prompt, one exchange at a time so the prompt still
       opens with a user turn; a leading system message is kept, and so are the final user turn
       and the generation marker after it (prompt tokens are never cut).
    2. If the final user turn alone still leaves no room, cut each response from the right to
       the room left (a cut response loses its end-of-turn token).
    3. If that room is under ``min_response_tokens``, the pair is skipped as "too long"; so is a
       pair whose two responses become identical when cut ("identical after truncation").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from hialign.data import PreferencePair, SkippedRow

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template does not render prompts as prefixes."""


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair: the shared prompt and the two responses."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str


@dataclass(frozen=True)
class _Fitted:
    pair: TokenizedPair
    turns_dropped: int
    truncated: bool


def _template_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} has no chat template; hialign needs a chat model"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # The template writes any BOS itself; letting the tokenizer add one would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_ids(
    tokenizer, prompt: Sequence[dict], prompt_ids: list[int], reply: str
) -> list[int]:
    """Ids of ``reply`` as the template renders it after ``prompt``, ending at its end-of-turn."""
    full = _template_ids(tokenizer, [*prompt, {"role": "assistant", "content": reply}], False)
    if full[: len(prompt_ids)] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), len(full))
        raise ChatTemplateError(
            f"the chat template renders the prompt differently once a reply follows it "
            f"(ids differ at position {at}), so response tokens cannot be located"
        )

    response = full[len(prompt_ids) :]
    while response and not tokenizer.decode(response[-1:]).strip():
        response.pop()  # ChatML's "\n" after <|im_end|>: never generated, so never trained on
    if response and response[-1] not in tokenizer.all_special_ids:
        # A template that closes the turn with no special token: end it with EOS so the
        # policy still learns to stop.
        if tokenizer.eos_token_id is not None:
            response.append(tokenizer.eos_token_id)
    return response


def _drop_first_exchange(turns: list[dict]) -> list[dict]:
    """Remove the earliest turn, then any turns up to the next user turn."""
    rest = turns[1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest


def fit_prompt(tokenizer, prompt: Sequence[dict], max_tokens: int) -> tuple[list[dict], int]:
    """Drop a prompt's earliest exchanges (the training rule) until it renders, with its
    generation marker, in at most ``max_tokens``; returns the messages and how many turns went.
    A system message and the last user turn are always kept, even if still too long."""
    head = [m for m in prompt[:1] if m["role"] == "system"]
    turns, dropped = list(prompt[len(head) :]), 0
    while len(_template_ids(tokenizer, head + turns, True)) > max_tokens:
        shorter = _drop_first_exchange(turns)
        if not shorter:
            break
        dropped += len(turns) - len(shorter)
        turns = shorter
    return head + turns, dropped


def _fit(tokenizer, pair: PreferencePair, max_length: int, min_response_tokens: int):
    """Apply the module's truncation rule; returns ``_Fitted`` or a skip reason."""
    head = [m for m in pair.prompt[:1] if m["role"] == "system"]
    turns = list(pair.prompt[len(head) :])
    turns_dropped = 0
    while True:
        prompt_ids = _template_ids(tokenizer, head + turns, True)
        chosen = _response_ids(tokenizer, head + turns, prompt_ids, pair.chosen)
        rejected = _response_ids(tokenizer, head + turns, prompt_ids, pair.rejected)
        fits = len(prompt_ids) + max(len(chosen), len(rejected)) <= max_length
        shorter = _drop_first_exchange(turns)
        if fits or not shorter:
            break
        turns_dropped += len(turns) - len(shorter)
        turns = shorter

    room = max_length - len(prompt_ids)
    if not fits:
        if room < min_response_tokens:
            return "too long"
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            return "identical after truncation"
    tokenized = TokenizedPair(tuple(prompt_ids), tuple(chosen), tuple(rejected), pair.source)
    return _Fitted(tokenized, turns_dropped, truncated=not fits)


def tokenize_pair(
    tokenizer, pair: PreferencePair, max_length: int, min_response_tokens: int = 8
) -> TokenizedPair | str:
    """Token ids of ``pair`` fitted to ``max_length`` by the module's rule, or a skip reason."""
    fitted = _fit(tokenizer, pair, max_length, min_response_tokens)
    return fitted if isinstance(fitted, str) else fitted.pair


def tokenize_pairs(
    tokenizer,
    pairs: Sequence[PreferencePair],
    max_length: int,
    min_response_tokens: int = 8,
) -> tuple[list[TokenizedPair], list[SkippedRow]]:
    """Tokenise every pair; pairs that cannot fit are returned as ``SkippedRow`` and logged."""
    kept: list[TokenizedPair] = []
    skipped: list[SkippedRow] = []
    shortened = truncated = 0
    for pair in tqdm(pairs, desc="tokenising", unit="pair", disable=None, leave=False):
        fitted = _fit(tokenizer, pair, max_length, min_response_tokens)
        if isinstance(fitted, str):
            logger.warning("%s: skipped, %s (max_length %d)", pair.source, fitted, max_length)
            skipped.append(SkippedRow(pair.source, fitted))
            continue
        kept.append(fitted.pair)
        shortened += fitted.turns_dropped > 0
        truncated += fitted.truncated

    reasons = Counter(row.reason for row in skipped)
    logger.info(
        "tokenised %d pairs (max_length %d): %d kept, %d with earliest turns dropped, "
        "%d with responses cut, %d skipped%s",
        len(pairs),
        max_length,
        len(kept),
        shortened,
        truncated,
        len(skipped),
        f" ({', '.join(f'{r} {n}' for r, n in reasons.items())})" if skipped else "",
    )
    return kept, skipped


def collate_pairs(batch: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack a batch into right-padded tensors for one policy/reference forward pass.

    Returns, with B = len(batch) and T = the longest prompt + response:
        input_ids (2B, T) long: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected.
        attention_mask (2B, T) long: 1 on real tokens, 0 on padding.
        loss_mask (2B, T) bool: True where input_ids[t] is a response token (its log-prob comes
            from the logits at t - 1); False on prompt and padding.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sequences = [(p.prompt_ids, p.chosen_ids) for p in batch]
    sequences += [(p.prompt_ids, p.rejected_ids) for p in batch]
    width = max(len(prompt) + len(response) for prompt, response in sequences)

    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :end] = 1
        loss_mask[row, len(prompt) : end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
