"""The experiment runner: partition -> adapters -> DPO -> merge -> generate -> judge -> stats
-> report, for the base model and every strategy. It only wires the stages together.

Every finished stage leaves its output in the run folder (adapters, training logs, generations,
judge cache); re-running the same command skips what is done, so a crash loses little.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from hialign.adapters import add_block_lora
from hialign.config import RunConfig
from hialign.dpo import TrainSettings, compute_logps, train_dpo
from hialign.generate import DecodingSettings, generate_answers
from hialign.merge import merge_and_save, save_adapter
from hialign.modeling import load_model
from hialign.partition import (
    FULL,
    attention_modules,
    blocks_from_spans,
    find_decoder_layers,
    format_block_map,
    partition_layers,
)
from hialign.reference import cached_reference_logps, reference_key
from hialign.results import BASE_GROUP, assemble_results, group_name, judge_groups

logger = logging.getLogger(__name__)


def plan_comparisons(strategies: list[str]) -> list[tuple[str, str, str]]:
    """(name, group A, group B): each block strategy vs Full-DPO, and Full-DPO vs Base."""
    anchor = group_name(FULL) if FULL in strategies else BASE_GROUP
    pairs = [(group_name(s), anchor) for s in strategies if s != FULL]
    if FULL in strategies:
        pairs.append((group_name(FULL), BASE_GROUP))
    return [(f"{a} vs. {b}", a, b) for a, b in pairs]


def _autocast_factory(precision: str, device: torch.device):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(path)


def _add_file_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run_experiment(config: RunConfig) -> dict:
    """Run the whole experiment of ``config``; return the results dict (also results.json)."""
    from accelerate import Accelerator

    from hialign.data import collate_pairs, load_preferences, split_train_eval, tokenize_pairs

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = _add_file_log(out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    try:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

        # Data first: --strict must fail on a malformed row before any model is loaded.
        data = load_preferences(config.data, strict=config.strict, split=config.data_split)
        train_pairs, eval_pairs = split_train_eval(
            data.pairs, config.train_pairs, config.eval_prompts, config.seed
        )
        timings["data"] = time.perf_counter() - clock

        accelerator = Accelerator()
        autocast = _autocast_factory(config.precision, accelerator.device)
        base, tokenizer, resolved = load_model(config.model)
        base.to(accelerator.device)
        projections, layer_path = attention_modules(base)
        num_layers = len(find_decoder_layers(base)[1])
        blocks = (
            blocks_from_spans(config.blocks, num_layers)
            if config.blocks
            else partition_layers(num_layers, config.num_blocks)
        )
        logger.info(
            "%s: %d layers; blocks:\n%s",
            resolved.display_name,
            num_layers,
            format_block_map(blocks),
        )

        tokenized, too_long = tokenize_pairs(
            tokenizer, train_pairs, config.max_length, config.min_response_tokens
        )
        if not tokenized:
            raise ValueError(f"no training pair fits --max-length {config.max_length}")
        strategies = config.strategy_list()
        comparisons = plan_comparisons(strategies)
        settings = TrainSettings(
            beta=config.beta,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            epochs=config.epochs,
            max_steps=config.max_steps,
            seed=config.seed,
        )
        steps = settings.total_steps(len(tokenized))
        judge_calls = len(comparisons) * len(eval_pairs) * 2
        logger.info(
            "plan: %d train pairs (%d dropped as too long), %d strategies x %d steps, "
            "%d eval prompts x %d groups = %d answers, %d comparisons x %d prompts x 2 orders = "
            "%d judge calls (4 dimensions each)",
            len(tokenized),
            len(too_long),
            len(strategies),
            steps,
            len(eval_pairs),
            len(strategies) + 1,
            len(eval_pairs) * (len(strategies) + 1),
            len(comparisons),
            len(eval_pairs),
            judge_calls,
        )

        def make_batch(indices: list[int]) -> dict[str, torch.Tensor]:
            return collate_pairs([tokenized[i] for i in indices], tokenizer.pad_token_id)

        # Reference log-probs of the frozen base: once for all strategies (and re-runs).
        clock = time.perf_counter()
        ref_batches = [
            make_batch(list(range(i, min(i + config.batch_size, len(tokenized)))))
            for i in range(0, len(tokenized), config.batch_size)
        ]
        key = reference_key(
            resolved.path,
            [[t.prompt_ids, t.chosen_ids, t.rejected_ids] for t in tokenized],
            config.precision,
        )
        device_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in ref_batches]
        reference, _ = cached_reference_logps(
            key, lambda: compute_logps(base, device_batches, autocast)
        )
        timings["reference"] = time.perf_counter() - clock

        decoding = DecodingSettings(
            max_new_tokens=config.max_new_tokens,
            batch_size=config.gen_batch_size,
            do_sample=config.do_sample,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed,
        )
        eval_prompts = [list(p.prompt) for p in eval_pairs]
        answers = {
            BASE_GROUP: _generate_group(
                out, BASE_GROUP, base, tokenizer, eval_prompts, decoding, autocast, timings
            )
        }

        training: dict[str, dict] = {}
        for strategy in strategies:
            result, group_answers = _train_strategy(
                strategy,
                config,
                resolved,
                tokenizer,
                blocks,
                make_batch,
                reference,
                settings,
                accelerator,
                autocast,
                eval_prompts,
                decoding,
                out,
                timings,
            )
            training[strategy] = result
            answers[group_name(strategy)] = group_answers
            accelerator.free_memory()  # drop the finished strategy's model and optimiser

        judged = judge_groups(
            config, out, base, tokenizer, resolved, eval_pairs, answers, comparisons, timings
        )
        results = assemble_results(
            config,
            resolved,
            num_layers,
            projections,
            blocks,
            strategies,
            data,
            train_pairs,
            eval_pairs,
            too_long,
            training,
            decoding,
            judged,
            comparisons,
            timings,
        )
        _write_json(out / "results.json", results)
        from hialign.report import write_report

        report = write_report(results, out)
        logger.info("report written to %s", report)
        return results
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _generate_group(out, group, model, tokenizer, prompts, decoding, autocast, timings) -> list:
    """Answers of one group, read back from its JSONL when a previous run finished them."""
    path = out / "generations" / f"{group.replace(' ', '_')}.jsonl"
    settings = asdict(decoding)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) == len(prompts) and all(
            r["prompt"] == p and r["decoding"] == settings for r, p in zip(rows, prompts)
        ):
            logger.info("%s: reusing %d answers from %s", group, len(rows), path)
            return [r["answer"] for r in rows]
    clock = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, decoding, autocast, desc=group)
    path.parent.mkdir(exist_ok=True)
    with open(path.with_suffix(".tmp"), "w") as f:
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            row = dict(index=i, group=group, prompt=prompt, answer=answer, decoding=settings)
            f.write(json.dumps(row) + "\n")
    path.with_suffix(".tmp").rename(path)
    timings[f"generate {group}"] = time.perf_counter() - clock
    return answers


def _train_strategy(
    strategy,
    config,
    resolved,
    tokenizer,
    blocks,
    make_batch,
    reference,
    settings,
    accelerator,
    autocast,
    prompts,
    decoding,
    out,
    timings,
):
    """Train (or reload) one strategy's adapter, merge it, and answer the eval prompts."""
    from peft import PeftModel

    folder = out / "strategies" / strategy
    log_path = folder / "training.json"
    model, _, _ = load_model(resolved.path)  # a fresh base: merging modifies weights in place
    model.to(accelerator.device)
    clock = time.perf_counter()
    if log_path.is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        logger.info("%s: reusing the trained adapter in %s", strategy, folder / "adapter")
        result = json.loads(log_path.read_text())
        peft_model = PeftModel.from_pretrained(model, folder / "adapter")
    else:
        peft_model, summary = add_block_lora(
            model, strategy, blocks, config.lora_rank, config.lora_alpha, config.lora_dropout
        )
        torch.manual_seed(config.seed)
        history = train_dpo(
            peft_model,
            make_batch,
            reference,
            settings,
            accelerator,
            autocast,
            desc=f"DPO {strategy}",
        )
        peft_model = accelerator.unwrap_model(peft_model)
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(peft_model, folder / "adapter")
        result = _training_summary(summary, history, time.perf_counter() - clock)
        _write_json(log_path, result)
        timings[f"train {strategy}"] = time.perf_counter() - clock
        logger.info(
            "%s: %d steps, loss %.4f -> %.4f, reward accuracy %.2f, margin %.3f (%.0f s)",
            strategy,
            result["steps"],
            result["first_loss"],
            result["final_loss"],
            result["final_reward_accuracy"],
            result["final_margin"],
            result["seconds"],
        )
    merged_dir = folder / "merged" if config.save_merged else None
    if merged_dir is not None and (merged_dir / "config.json").is_file():
        merged_dir = None  # saved by an earlier run
    merged = merge_and_save(peft_model, tokenizer, merged_dir)
    answers = _generate_group(
        out, group_name(strategy), merged, tokenizer, prompts, decoding, autocast, timings
    )
    return result, answers


def _training_summary(summary, history: list[dict], seconds: float) -> dict:
    tail = history[-max(1, len(history) // 10) :]  # last 10% of steps

    def mean(key):
        return sum(h[key] for h in tail) / len(tail)

    return dict(
        layers=summary.layers,
        lora_modules=len(summary.modules),
        modules=summary.modules,
        trainable_params=summary.trainable_params,
        steps=len(history),
        seconds=seconds,
        first_loss=history[0]["loss"],
        final_loss=mean("loss"),
        final_reward_accuracy=mean("reward_accuracy"),
        final_margin=mean("reward_margin"),
        history=history,
    )
