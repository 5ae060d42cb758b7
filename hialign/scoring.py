"""Response log-probs of preference pairs, by the fastest path that gives the plain path's values.

Three savings, each exact up to float rounding and each checked against the plain path once per
run (``PairScorer.verify``), falling back to it with a warning where a model does not allow one:

1. one prompt pass (``shared_prompt``): a pair is one sequence, its prompt computed once, and
   no token is padding;
2. frozen prefix (``prefix_cache``): layers below the lowest trainable one run once per pair;
3. head on response positions only (``head_logps``): no logits for prompt tokens, and none kept
   for backward.

Frozen layers keep no activations for backward whatever the path: nothing below the lowest
trainable layer requires grad, so autograd records no graph there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Sequence

import torch
from peft import PeftModel
from torch import nn

from hialign.head_logps import head_logps
from hialign.prefix_cache import DEFAULT_MAX_BYTES, FrozenPrefixCache, record_layer_inputs
from hialign.shared_prompt import attention_mask_for, pair_sequences

logger = logging.getLogger(__name__)

# Verification tolerance for summed log-probs of the same pair by two paths, in fp32.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-3
VERIFY_PAIRS = 1


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder stack and LM head, or None when logits need more than ``head(hidden)``."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    config = causal_lm.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head is followed by extra maths; use the model's own logits
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def collated_logps(model: nn.Module, input_ids, attention_mask, loss_mask, hidden=None):
    """(R,) summed response log-probs of collated rows (see ``dpo.response_logps``).

    ``hidden`` (R, T, H), when given, is the decoder's last hidden state for these rows.
    """
    target_mask = loss_mask[:, 1:]  # token t is predicted from position t-1
    targets = input_ids[:, 1:][target_mask]  # (M,)
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        token_logps = torch.log_softmax(logits[:, :-1][target_mask].float(), dim=-1)
        token_logps = token_logps.gather(-1, targets[:, None])[:, 0]
    else:
        decoder, head = parts
        if hidden is None:
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        token_logps = head_logps(hidden[:, :-1][target_mask], head, targets)  # (M,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    row_of_token = rows[:, None].expand_as(target_mask)[target_mask]
    sums = torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32)
    return sums.index_add(0, row_of_token, token_logps)


class PairScorer:
    """(B,) chosen and (B,) rejected log-probs of collated batches (``data.collate_pairs``).

    Args:
        model: the policy (a PEFT model) or the frozen base.
        share_prompt: compute each pair's prompt once (one sequence per pair, no padding).
        prefix_cache: skip the frozen layers below the trainable ones for pairs seen before;
            None (or a cache with nothing to skip) runs every layer.
    """

    def __init__(
        self,
        model: nn.Module,
        share_prompt: bool = True,
        prefix_cache: FrozenPrefixCache | None = None,
    ):
        self.model = model
        self.parts = decoder_and_head(model)
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        self.attn_implementation = getattr(causal_lm.config, "_attn_implementation", None)
        self.dtype = next(model.parameters()).dtype
        probe = torch.ones(1, 1, 1, dtype=torch.bool)
        supported = attention_mask_for(probe, self.attn_implementation, self.dtype) is not None
        self.share_prompt = share_prompt and self.parts is not None and supported
        if share_prompt and not self.share_prompt:
            logger.warning(
                "one prompt pass needs a plain LM head and SDPA or eager attention (found %s); "
                "scoring chosen and rejected rows separately",
                self.attn_implementation,
            )
        usable = prefix_cache is not None and prefix_cache.active and self.parts is not None
        self.prefix = prefix_cache if usable else None
        self.recorded: dict[int, dict] = {}  # layer -> {row key: (L, H) states entering it}
        self.recording: dict[int, torch.Tensor] | None = None  # set by ``record_prefixes``
        self.recorded_bytes = 0
        self.record_budget = 0

    @contextlib.contextmanager
    def record_prefixes(self, layers: Sequence[int], max_bytes: int = DEFAULT_MAX_BYTES):
        """Inside, pairs scored in one prompt pass leave the hidden states entering each of
        ``layers`` in ``self.recorded`` (up to ``max_bytes`` in all), keyed like the
        frozen-prefix cache's rows."""
        self.record_budget = max_bytes
        layers = [layer for layer in layers if layer > 0]
        for layer in layers:
            self.recorded.setdefault(layer, {})
        with record_layer_inputs(self.model, layers) as latest:
            self.recording = latest
            try:
                yield self.recorded
            finally:
                self.recording = None

    def describe(self) -> str:
        parts = ["one prompt pass" if self.share_prompt else "chosen/rejected rows"]
        if self.prefix is not None:
            parts.append(f"layers 0-{self.prefix.start - 1} cached")
        return ", ".join(parts)

    def __call__(
        self, batch: dict[str, torch.Tensor], keys: Sequence[Hashable] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of ``batch``; ``keys`` name its pairs for the prefix cache (None: no reuse)."""
        sequences = pair_sequences(batch) if self.share_prompt else None
        if sequences is not None:
            logps = self._shared_logps(sequences, keys)
        else:
            logps = self._collated_logps(batch, keys)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def _last_hidden(self, inputs: dict, row_keys, lengths: list[int]) -> torch.Tensor:
        """(R, L, H) final hidden states of the rows in ``inputs``, via the prefix cache."""
        decoder, _ = self.parts

        def run(rows: list[int] | None = None):
            chosen = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
            return decoder(**chosen, use_cache=False)

        if self.prefix is None:
            return run().last_hidden_state
        width = inputs["input_ids"].shape[1]
        if row_keys is None:  # nothing to reuse: capture and replay within this call
            start_states = self.prefix.capture(run)
        else:
            start_states = self.prefix.hidden_states(row_keys, lengths, width, run)
        with self.prefix.replaying(start_states):
            return run().last_hidden_state

    def _shared_logps(self, sequences, keys) -> torch.Tensor:
        """(2B,) log-probs, one forward per pair (no padding), one head call for all tokens."""
        hidden, targets, slots = [], [], []
        half = len(sequences)
        for i, seq in enumerate(sequences):
            mask = attention_mask_for(seq.allowed(), self.attn_implementation, self.dtype)
            inputs = dict(
                input_ids=seq.input_ids, attention_mask=mask, position_ids=seq.position_ids
            )
            row_keys = None if keys is None else [(keys[i], "pair")]
            last = self._last_hidden(inputs, row_keys, [seq.length])  # (1, L, H)
            if self.recording is not None and keys is not None:
                for layer, states in self.recorded.items():
                    row = self.recording[layer][0]
                    if self.recorded_bytes + row.nbytes <= self.record_budget:
                        states[row_keys[0]] = row.clone()
                        self.recorded_bytes += row.nbytes
            hidden.append(last[0, seq.source])
            targets.append(seq.targets)
            replies = seq.targets.shape[0] - seq.chosen_tokens
            slots += [i] * seq.chosen_tokens + [half + i] * replies
        token_logps = head_logps(torch.cat(hidden), self.parts[1], torch.cat(targets))
        slot = torch.tensor(slots, device=token_logps.device)
        sums = torch.zeros(2 * half, device=token_logps.device, dtype=torch.float32)
        return sums.index_add(0, slot, token_logps)

    def _collated_logps(self, batch, keys) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        hidden = None
        if self.prefix is not None:
            row_keys = None
            if keys is not None:
                row_keys = [(key, "chosen") for key in keys] + [(key, "rejected") for key in keys]
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
            hidden = self._last_hidden(inputs, row_keys, attention_mask.sum(1).tolist())
        return collated_logps(self.model, input_ids, attention_mask, batch["loss_mask"], hidden)

    def verify(self, batch: dict[str, torch.Tensor]) -> bool:
        """Check each enabled saving against the plain path on a few pairs of ``batch`` (fp32,
        no grad); switch off any that disagrees, with a warning. True if all agree."""
        half = batch["input_ids"].shape[0] // 2
        n = min(VERIFY_PAIRS, half)
        rows = list(range(n)) + list(range(half, half + n))
        sample = {k: v[rows] for k, v in batch.items()}
        share, prefix = self.share_prompt, self.prefix
        training = self.model.training
        self.model.eval()  # dropout would make two exact paths disagree
        with torch.no_grad(), torch.autocast(sample["input_ids"].device.type, enabled=False):
            plain = collated_logps(
                self.model, sample["input_ids"], sample["attention_mask"], sample["loss_mask"]
            )
            # Both savings at once first; only if that disagrees, find which one is at fault.
            both = share and prefix is not None
            if not (both and self._agrees(sample, plain, None, share, prefix)):
                if share and not self._agrees(sample, plain, "one prompt pass", True, None):
                    share = False
                if prefix is not None and not self._agrees(
                    sample, plain, "frozen-prefix cache", share, prefix
                ):
                    prefix = None
        self.model.train(training)
        ok = (share, prefix) == (self.share_prompt, self.prefix)
        self.share_prompt, self.prefix = share, prefix
        logger.info("pair scoring: %s (plain path agrees: %s)", self.describe(), ok)
        return ok

    def _agrees(self, sample, plain, name, share_prompt, prefix) -> bool:
        """Score ``sample`` with the given savings and compare with ``plain`` (R,); warn under
        ``name`` if they disagree (None: silently)."""
        saved = self.share_prompt, self.prefix
        self.share_prompt, self.prefix = share_prompt, prefix
        try:
            fast = torch.cat(self(sample))
            if torch.allclose(fast, plain, rtol=VERIFY_RTOL, atol=VERIFY_ATOL):
                return True
            error = f"log-probs differ by up to {(fast - plain).abs().max().item():.3g}"
        except Exception as err:  # an architecture this saving cannot drive
            error = f"{type(err).__name__}: {err}"
        finally:
            self.share_prompt, self.prefix = saved
        if name is not None:
            logger.warning("%s disagrees with the plain path (%s); not using it", name, error)
        return False
