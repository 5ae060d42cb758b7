"""Where hialign's DPO step spends its time: torch.profiler over steps with a warm prefix cache.

    python bench/profile_engine.py --strategy global --precision bf16 [--steps 4] [--threads 1]

Trains one epoch over the first ``--pairs`` pairs (filling the frozen-prefix cache), then
profiles ``--steps`` more steps, as in epoch 2 of the speed benchmark. Prints the top operators
by self CPU time and the matmul FLOPs the profiler counted, as GFLOP/s achieved; writes the same
to ``bench/results/profile_<strategy>_<precision>.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from workload import Workload, _autocast, _load_pairs, _seeded_lora, _settings  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="global")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-share-prompt", action="store_true", help="chosen/rejected rows")
    parser.add_argument("--no-frozen-prefix", action="store_true", help="run every layer")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hialign.dpo import _frozen_weights_in_autocast_dtype, _policy_scorer, dpo_loss
    from hialign.modeling import load_model
    from hialign.tokenization import collate_pairs

    work = Workload("hialign", args.strategy, args.precision, pairs=args.pairs)
    model, tokenizer, _ = load_model(None)
    pairs = _load_pairs(work, tokenizer)
    peft_model, _ = _seeded_lora(model, work)
    settings, autocast = _settings(work), _autocast(args.precision)
    settings.share_prompt = not args.no_share_prompt
    settings.frozen_prefix = not args.no_frozen_prefix
    scorer = _policy_scorer(peft_model, settings)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], 1e-4)
    batches = [list(range(i, i + 4)) for i in range(0, len(pairs), 4)]

    def step(indices):
        batch = collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id)
        with autocast():
            chosen, rejected = scorer(batch, keys=indices)
        losses, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), 0.1)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_layer = scorer.prefix.start if scorer.prefix is not None else 0
    with _frozen_weights_in_autocast_dtype(peft_model, autocast, first_layer):  # as train_dpo
        for indices in batches:  # epoch 1: fills the frozen-prefix cache
            step(indices)
        timed = batches[: args.steps]
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for indices in timed:
                step(indices)
        seconds = time.perf_counter() - start
    averages = prof.key_averages()
    flops = sum(e.flops for e in averages if e.flops)
    table = averages.table(sort_by="self_cpu_time_total", row_limit=args.rows)
    header = (
        f"{args.strategy} {args.precision}, threads {torch.get_num_threads()}: "
        f"{len(timed)} steps x 4 pairs in {seconds:.2f} s under the profiler "
        f"({seconds / len(timed) / 4:.3f} s/pair); {scorer.describe()}\n"
        f"matmul FLOPs counted: {flops / 1e9:.0f} GFLOP = "
        f"{flops / 1e9 / seconds:.1f} GFLOP/s achieved\n"
    )
    text = header + table
    variant = "".join(
        suffix
        for flag, suffix in ((args.no_share_prompt, "_rows"), (args.no_frozen_prefix, "_noprefix"))
        if flag
    )
    out = HERE / "results" / f"profile_{args.strategy}_{args.precision}{variant}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
