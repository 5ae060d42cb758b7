"""One prompt pass: chosen and rejected share their prompt, so each pair is one sequence.

A collated batch holds every pair twice (prompt + chosen, prompt + rejected), so the prompt goes
through the model twice. Here each pair becomes one sequence ``[prompt | chosen | rejected]``
with position ids that restart the rejected reply right after the prompt and an attention mask
in which rejected tokens see the prompt and themselves but not the chosen reply. Every token then
sees exactly the context it sees in its own collated row, so the log-probs are the same up to
float rounding, while the prompt is computed once: the KV-cache reuse of the prompt, done inside
one forward pass, which keeps the backward through the prompt shared as well.

Each pair is its own forward (batch of one), so no token is padding: matmuls run as fast here
with 100 rows as with 1,000 (measured on this CPU), and attention costs the sum of the squared
pair lengths instead of rows x the longest squared. On hh-rlhf with SmolLM2's template (64 pairs,
max length 256) a pair is 188 tokens on average; collated batches of 4 spend 437 per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PairSequence:
    """One pair as ``[prompt | chosen | rejected]``, length L = P + C + R.

    input_ids: (1, L). position_ids: (1, L); the rejected reply starts at P, like the chosen.
    segments: (L,) PROMPT / CHOSEN / REJECTED. source: (C + R,) position whose hidden state
    predicts each reply token, chosen tokens first. targets: (C + R,) those tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    chosen_tokens: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def allowed(self) -> torch.Tensor:
        """(1, L, L) bool: may query position q attend to key position k. Causal, and never
        from one reply into the other."""
        seg = self.segments
        index = torch.arange(seg.shape[0], device=seg.device)
        causal = index[:, None] >= index[None, :]
        same = seg[:, None] == seg[None, :]
        return (causal & (same | (seg == PROMPT)[None, :]))[None]


def _pair_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]] | None:
    """(prompt, chosen, rejected) lengths of each pair, or None when the rows do not share a
    prompt, are not right-padded, or their response is not one contiguous run after it."""
    input_ids, attention, loss_mask = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["loss_mask"],
    )
    rows = input_ids.shape[0]
    if rows % 2:
        return None
    half = rows // 2
    lengths = attention.sum(1).tolist()
    scored = loss_mask.sum(1).tolist()
    starts = [int(row.nonzero()[0]) if row.any() else -1 for row in loss_mask]
    for i in range(rows):
        end, start = lengths[i], starts[i]
        if start < 1 or scored[i] != end - start or not bool(attention[i, :end].all()):
            return None
        if not bool(loss_mask[i, start:end].all()):
            return None
    spans = []
    for i in range(half):
        prompt = starts[i]
        if starts[half + i] != prompt or not torch.equal(
            input_ids[i, :prompt], input_ids[half + i, :prompt]
        ):
            return None
        spans.append((prompt, lengths[i] - prompt, lengths[half + i] - prompt))
    return spans


def pair_sequences(batch: dict[str, torch.Tensor]) -> list[PairSequence] | None:
    """Each pair of a collated batch (``data.collate_pairs``: chosen rows, then rejected rows)
    as one sequence; None when its rows do not share prompts (score it as it is)."""
    spans = _pair_spans(batch)
    if spans is None:
        return None
    input_ids, half = batch["input_ids"], len(spans)
    device = input_ids.device
    out = []
    for i, (p, c, r) in enumerate(spans):
        chosen, rejected = input_ids[i, p : p + c], input_ids[half + i, p : p + r]
        positions = torch.cat([torch.arange(p + c), torch.arange(p, p + r)]).to(device)
        segments = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * r, device=device)
        # Reply token j sits at p + j and is predicted at p + j - 1, except that the first token
        # of both replies is predicted at the prompt's last position, used twice.
        source = torch.cat(
            [
                torch.arange(p - 1, p + c - 1),
                torch.tensor([p - 1]),
                torch.arange(p + c, p + c + r - 1),
            ]
        ).to(device)
        out.append(
            PairSequence(
                input_ids=torch.cat([input_ids[i, :p], chosen, rejected])[None],
                position_ids=positions[None],
                segments=segments,
                source=source,
                targets=torch.cat([chosen, rejected]),
                chosen_tokens=c,
            )
        )
    return out


def attention_mask_for(allowed: torch.Tensor, attn_implementation: str | None, dtype):
    """The 4-D mask (B, 1, L, L) in the form the model's attention takes, or None if it takes
    no custom 4-D mask.

    Transformers hands a 4-D mask to the attention as it is: SDPA wants booleans (True = attend),
    eager attention adds it to the scores, so it wants 0 / a large negative number. Other
    implementations (flash, flex) get None and the caller keeps the collated layout.
    """
    mask = allowed[:, None]
    if attn_implementation in (None, "sdpa"):
        return mask
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return None
