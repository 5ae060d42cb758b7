"""Why bf16 losses of two exact engines drift apart: the first DPO gradient, fp32 vs bf16.

    python bench/bf16_gradients.py [--strategy global] [--threads 1]

On the benchmark's first batch, at the initial LoRA weights, both engines compute the DPO loss
gradient of the LoRA weights in fp32 and under bf16 autocast. Taking hialign's fp32 gradient as
the truth, it reports each gradient's relative error, cosine and the share of weights whose
gradient sign matches: AdamW's first update is lr * g / (|g| + eps), i.e. lr * sign(g), so a sign
that bf16 rounding flips is a full-size step in the other direction. Writes
``bench/results/bf16_gradients.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from workload import (  # noqa: E402
    Workload,
    _autocast,
    _load_pairs,
    _lowest_layer,
    _seeded_lora,
    _settings,
    trl_trainer,
)


def hialign_gradient(work: Workload, indices: list[int]) -> dict[str, torch.Tensor]:
    from hialign.dpo import _policy_scorer, compute_logps, dpo_loss
    from hialign.modeling import load_model
    from hialign.tokenization import collate_pairs

    model, tokenizer, _ = load_model(None)
    pairs = _load_pairs(work, tokenizer)
    batch = collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id)
    autocast = _autocast(work.precision)
    states = {_lowest_layer(model, work.strategy): {}}
    reference = compute_logps(model, [batch], autocast, prefix_states=states)
    keyed = {layer: {(indices[k], kind): v for (k, kind), v in rows.items()}
             for layer, rows in states.items()}  # fmt: skip
    peft_model, _ = _seeded_lora(model, work)
    peft_model.train()
    scorer = _policy_scorer(peft_model, _settings(work), keyed)
    with autocast():
        chosen, rejected = scorer(batch, keys=indices)
    losses, _, _ = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], work.beta)
    losses.mean().backward()
    return {n: p.grad.float().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def trl_gradient(work: Workload, indices: list[int]) -> dict[str, torch.Tensor]:
    from hialign.modeling import load_model

    model, tokenizer, _ = load_model(None)
    pairs = _load_pairs(work, tokenizer)
    trainer = trl_trainer(work, model, tokenizer, pairs)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    trainer.model.train()
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return {
        n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }


def compare(grads: dict, truth: dict) -> dict[str, float]:
    g = torch.cat([grads[n].flatten() for n in sorted(truth)])
    t = torch.cat([truth[n].flatten() for n in sorted(truth)])
    live = t != 0  # LoRA A has a zero gradient while B = 0
    return dict(
        relative_error=((g - t).norm() / t.norm()).item(),
        cosine=torch.nn.functional.cosine_similarity(g, t, dim=0).item(),
        sign_agreement=(torch.sign(g[live]) == torch.sign(t[live])).float().mean().item(),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="global")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hialign.dpo import micro_batches

    base = Workload("hialign", args.strategy, "fp32")
    indices = next(iter(micro_batches(base.pairs, _settings(base))))[1]
    grads = {}
    for precision in ("fp32", "bf16"):
        work = Workload("hialign", args.strategy, precision)
        grads[f"hialign {precision}"] = hialign_gradient(work, indices)
        grads[f"TRL {precision}"] = trl_gradient(work, indices)
    truth = grads["hialign fp32"]
    lines = [
        f"First DPO gradient of the LoRA weights ({args.strategy}, pairs {indices}), against "
        "hialign's fp32 gradient:\n",
        "| engine | relative error | cosine | sign agreement |",
        "|---|---|---|---|",
    ]
    for name, g in grads.items():
        c = compare(g, truth)
        lines.append(
            f"| {name} | {c['relative_error']:.2e} | {c['cosine']:.6f} | "
            f"{100 * c['sign_agreement']:.2f}% |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"bf16_gradients_{args.strategy}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
