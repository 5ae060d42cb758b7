"""Stage 5 — generation: every group answers the same held-out prompts, same decoding settings.

Prompts are batched with left padding (so every row's last token is the generation marker) and
sorted by length to waste little compute on padding; answers come back in the input order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class DecodingSettings:
    max_new_tokens: int = 96
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 42

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # unset sampling knobs a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    settings: DecodingSettings,
    autocast,
    desc: str = "generate",
) -> list[str]:
    """Answer each chat-message prompt; returns decoded replies without special tokens."""
    model.eval()
    encoded = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True)
        for p in prompts
    ]
    encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    stop_ids = _stop_token_ids(tokenizer)
    torch.manual_seed(settings.seed)

    for start in tqdm(range(0, len(order), settings.batch_size), desc=desc, unit="batch"):
        rows = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention_mask[r, width - len(ids) :] = 1
        device = model.device
        with autocast():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
                use_cache=True,
                **settings.generate_kwargs(),
            )
        for r, i in enumerate(rows):
            answers[i] = tokenizer.decode(output[r, width:], skip_special_tokens=True).strip()
    return answers


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the chat template's end-of-turn token when it has one (ChatML's <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)
