"""A local judge with no network: a Hugging Face causal LM read through next-token log-probs.

For each pair and order the model reads the fenced conversation and responses once (the shared
prefix), then one short question per dimension. The verdict is whichever of " A", " B", " tie"
gets the highest next-token log-probability, so it cannot fail to parse. The prefix's key/value
cache is computed once and repeated for the four questions, about a quarter of the naive
compute. Long texts are cut to a documented token cap (``LocalJudgeSettings``), and sentences
addressed to the judge are cut from responses (see ``injection``): a small model cannot be
told to treat them as data.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from hialign.judge.base import DoneCallback, Judge, JudgeCall
from hialign.judge.cache import JudgeCache
from hialign.judge.injection import strip_judge_directed
from hialign.judge.items import DIMENSIONS, JudgeItem, OrderVerdict
from hialign.judge.prompts import (
    LOCAL_ANSWER_LEAD,
    LOCAL_OPTIONS,
    LOCAL_SYSTEM_PROMPT,
    LOCAL_TEMPLATE_VERSION,
    local_data_blocks,
    local_question,
    pair_nonce,
    render_conversation,
    shown_responses,
)

logger = logging.getLogger(__name__)

_SENTINEL = "\x00QUESTION\x00"
_WEAK_BELOW_PARAMS = 7e9


@dataclass
class LocalJudgeSettings:
    """Knobs of the log-probability judge; all of them are part of the cache key."""

    max_prompt_tokens: int = 192  # the conversation keeps its last N tokens (latest turns matter)
    max_response_tokens: int = 192  # each response keeps its first N tokens
    batch_size: int = 8  # pairs-in-one-order per forward pass (x4 rows in the question pass)
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 where the chip has it
    # CPU threads while scoring; None keeps torch's setting. On cores shared with other busy
    # processes, 1 can be far faster: 16 calls took 3 s on 1 thread and 56 s on 2 here, the
    # second thread spinning at a barrier while a neighbour held the other core.
    threads: int | None = None


def resolve_precision(requested: str, model) -> str:
    """Pick the compute precision: bf16 autocast roughly doubles CPU speed where supported."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {requested!r}")
    if requested != "auto":
        return requested
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32:
        return "fp32"  # already half precision: run it as loaded
    if parameter.device.type == "cuda":
        return "bf16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def _truncate(tokenizer, text: str, limit: int, keep: str) -> str:
    """Cut ``text`` to ``limit`` tokens, keeping its start or its end, and mark the cut."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= limit:
        return text
    if keep == "start":
        return tokenizer.decode(ids[:limit]) + " [...]"
    return "[...] " + tokenizer.decode(ids[-limit:])


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(rows), longest): padding on the left, mask 1 on real tokens."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, width - len(row) :] = 1
    return ids, mask


class LocalJudge(Judge):
    """Log-probability judge on a loaded model; verdicts are always one of A, B, tie."""

    kind = "local"
    template_version = LOCAL_TEMPLATE_VERSION

    def __init__(
        self,
        model,
        tokenizer,
        display_name: str,
        *,
        cache: JudgeCache | None = None,
        settings: LocalJudgeSettings | None = None,
    ):
        super().__init__(name=f"local:{display_name}", model=display_name, cache=cache)
        self.hf_model = model
        self.tokenizer = tokenizer
        self.settings = settings or LocalJudgeSettings()
        self.num_params = sum(p.numel() for p in model.parameters())
        self.precision = resolve_precision(self.settings.precision, model)
        self.device = next(model.parameters()).device
        self.option_ids = self._option_token_ids()
        self.question_ids = self._question_ids()
        # transformers 5 renamed the forward argument ``past_key_values`` to ``cache``.
        accepted = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"

    def decoding(self) -> dict:
        return {
            "method": "next-token-logprob",
            "options": LOCAL_OPTIONS,
            "max_prompt_tokens": self.settings.max_prompt_tokens,
            "max_response_tokens": self.settings.max_response_tokens,
            "precision": self.precision,
        }

    def warning(self) -> str | None:
        if self.num_params >= _WEAK_BELOW_PARAMS:
            return None
        return (
            f"the local judge {self.model} has only {self.num_params / 1e6:.0f} M parameters: "
            "a judge this small is weak, close to chance and strongly position-biased, so its "
            "verdicts are a smoke test of the pipeline, not evidence; use --judge-url with a "
            "strong model for real results"
        )

    # -- prompt pieces ---------------------------------------------------------------------------

    def _option_token_ids(self) -> dict[str, int]:
        """First token of each option; the options are told apart by it, so it must differ."""
        ids = {}
        for label, text in LOCAL_OPTIONS.items():
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            if len(tokens) > 1:
                logger.debug("option %r is %d tokens; scoring its first", text, len(tokens))
            ids[label] = tokens[0]
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"the judge tokenizer cannot tell the options {LOCAL_OPTIONS} apart")
        return ids

    def _render(self, user: str) -> tuple[str, str]:
        """(before, after): the chat-formatted text on each side of the question slot."""
        messages = [
            {"role": "system", "content": LOCAL_SYSTEM_PROMPT},
            {"role": "user", "content": user + _SENTINEL},
        ]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:  # a base model: a plain transcript
            text = f"{LOCAL_SYSTEM_PROMPT}\n\n{user}{_SENTINEL}\n\n"
        before, after = text.split(_SENTINEL)
        return before, after

    def _question_ids(self) -> list[list[int]]:
        """Per dimension: the question, the end of the user turn and the answer lead."""
        _, after = self._render("")
        return [
            self.tokenizer.encode(
                local_question(dim) + after + LOCAL_ANSWER_LEAD, add_special_tokens=False
            )
            for dim in DIMENSIONS
        ]

    def prefix_ids(self, call: JudgeCall) -> tuple[list[int], int]:
        """Token ids of the shared part, and how many judge-directed sentences were cut."""
        item, caps = call.item, self.settings
        response_a, removed_a = strip_judge_directed(item.response_a)
        response_b, removed_b = strip_judge_directed(item.response_b)
        # The nonce follows the texts as shown, so a cut response reads exactly like a clean one.
        nonce = pair_nonce(item.prompt, response_a, response_b)
        conversation = render_conversation(item.prompt)
        conversation = _truncate(self.tokenizer, conversation, caps.max_prompt_tokens, "end")
        shown = JudgeItem(item.id, item.prompt, response_a, response_b)
        first, second = (
            _truncate(self.tokenizer, text, caps.max_response_tokens, "start")
            for text in shown_responses(shown, call.order)
        )
        before, _ = self._render(local_data_blocks(nonce, conversation, first, second) + "\n")
        return self.tokenizer.encode(before, add_special_tokens=False), removed_a + removed_b

    # -- scoring ---------------------------------------------------------------------------------

    def option_logprobs(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Log-probs of the options after each prefix followed by each dimension's question.

        Returns (len(prefixes), len(DIMENSIONS), len(LOCAL_OPTIONS)), normalised over options.
        """
        model, pad = self.hf_model, self.tokenizer.pad_token_id or 0
        questions = len(self.question_ids)

        # Pass 1: the prefixes, left-padded; only their key/value cache is kept.
        ids, mask = _left_pad(prefixes, pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.batch_repeat_interleave(questions)  # (B, ...) -> (B * questions, ...)

        # Pass 2: every question after every prefix, left-padded as well. The padding then sits
        # between prefix and question, masked out; positions continue from each prefix's length.
        # Row r holds prefix r // questions and question r % questions, as the repeated cache.
        qids, qmask = _left_pad(self.question_ids * len(prefixes), pad)
        lengths = mask.sum(-1).repeat_interleave(questions)[:, None]
        qpositions = lengths + (qmask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([mask.repeat_interleave(questions, dim=0), qmask], dim=-1)
        out = model(
            input_ids=qids.to(self.device),
            attention_mask=full_mask.to(self.device),
            position_ids=qpositions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: cache},
        )
        options = torch.tensor(list(self.option_ids.values()), device=out.logits.device)
        logits = out.logits[:, -1, :].float()[:, options]
        return torch.log_softmax(logits, dim=-1).view(len(prefixes), questions, len(options))

    def _verdict(self, call: JudgeCall, scores: torch.Tensor, tokens: int, removed: int):
        """An order verdict from (dimensions, options) log-probs: the likeliest option wins."""
        labels = list(self.option_ids)
        shown = {dim: labels[int(scores[d].argmax())] for d, dim in enumerate(DIMENSIONS)}
        logprobs = {
            dim: {label: round(float(scores[d, k]), 4) for k, label in enumerate(labels)}
            for d, dim in enumerate(DIMENSIONS)
        }
        detail = {"logprobs": logprobs, "judge_directed_removed": removed}
        return OrderVerdict(
            order=call.order, shown=shown, source="local", prompt_tokens=tokens, detail=detail
        )

    def _run_calls(self, calls: list[JudgeCall], done: DoneCallback) -> None:
        prepared = [self.prefix_ids(call) for call in calls]
        question_tokens = sum(len(q) for q in self.question_ids)
        # Longest first, so each batch holds similar lengths and little padding.
        ranked = sorted(range(len(calls)), key=lambda i: -len(prepared[i][0]))
        size = self.settings.batch_size
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        was_training, threads = self.hf_model.training, torch.get_num_threads()
        self.hf_model.eval()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        try:
            with torch.inference_mode(), autocast:
                for start in range(0, len(ranked), size):
                    batch = ranked[start : start + size]
                    scores = self.option_logprobs([prepared[i][0] for i in batch])
                    for row, index in enumerate(batch):
                        prefix, removed = prepared[index]
                        tokens = len(prefix) + question_tokens
                        done(
                            calls[index], self._verdict(calls[index], scores[row], tokens, removed)
                        )
        finally:
            self.hf_model.train(was_training)
            torch.set_num_threads(threads)
