"""The experiment runner: partition -> adapters -> DPO -> merge -> generate -> judge -> stats
-> report, for the base model and every strategy. It only wires the stages together.

Every finished stage leaves its output in the run folder (adapters, training logs, generations,
judge cache); re-running the same command skips what is done, so a crash loses little.
Across several processes (``accelerate launch``) every process trains its share of each batch;
merging, generation, judging and the report run on the main process only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
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
    parse_strategy,
    partition_layers,
)
from hialign.reference import cached_reference_logps, model_fingerprint, reference_key
from hialign.results import BASE_GROUP, assemble_results, group_name, judge_groups

logger = logging.getLogger(__name__)


def plan_comparisons(strategies: list[str]) -> list[tuple[str, str, str]]:
    """(name, group A, group B): each block strategy vs Full-DPO, and Full-DPO vs Base."""
    anchor = group_name(FULL) if FULL in strategies else BASE_GROUP
    pairs = [(group_name(s), anchor) for s in strategies if s != FULL]
    if FULL in strategies:
        pairs.append((group_name(FULL), BASE_GROUP))
    return [(f"{a} vs. {b}", a, b) for a, b in pairs]


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument context-manager factory: bf16 autocast, or a no-op for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def write_json(path: Path, data) -> None:
    """Write JSON atomically, so a crash never leaves a half-written file to resume from."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(path)


def run_experiment(config: RunConfig) -> dict:
    """Run the whole experiment of ``config``; return the results dict (also results.json)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    # run.log keeps hialign's INFO lines (plan, blocks, losses) even when the caller's logging
    # is configured for warnings only (a library call, a test runner).
    ours = logging.getLogger("hialign")
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    try:
        return Experiment(config, out).run()
    except BaseException as err:  # interrupts too: run.log says how and where the run stopped
        record = logging.LogRecord(
            logger.name, logging.ERROR, __file__, 0, "run stopped: %s: %s",
            (type(err).__name__, str(err) or "interrupted; re-run the same command to resume"),
            sys.exc_info(),
        )  # fmt: skip
        handler.handle(record)  # the file only: the CLI prints its own one-line error
        raise
    finally:
        ours.setLevel(level)
        logging.getLogger().removeHandler(handler)
        handler.close()


class Experiment:
    """State shared by the stages of one run; each method is one stage."""

    def __init__(self, config: RunConfig, out: Path):
        self.config, self.out = config, out
        self.timings: dict[str, float] = {}
        self.answers: dict[str, list[str]] = {}
        self.training: dict[str, dict] = {}
        self.reused: list[str] = []  # stages taken from an earlier run or the cache

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 2)

    def run(self) -> dict:
        from accelerate import Accelerator

        config = self.config
        self.load_data()  # first: --strict fails on a malformed row before any model loads

        self.accelerator = Accelerator()
        self.main = self.accelerator.is_main_process
        self.autocast = autocast_factory(config.precision, self.accelerator.device)
        self.base, self.tokenizer, self.resolved = load_model(config.model)
        self.base.to(self.accelerator.device)
        self.partition()
        self.tokenize()
        self.log_plan()
        # Written once data, model and blocks are known to be valid, so a run that fails on its
        # inputs leaves an earlier run's config.yaml (matching its report) untouched.
        self.write_config()
        self.reference = self.reference_logps()

        self.decoding = DecodingSettings(
            max_new_tokens=config.max_new_tokens, batch_size=config.gen_batch_size,
            do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p,
            seed=config.seed,
        )  # fmt: skip
        self.generate(BASE_GROUP, self.base, model_fingerprint(self.resolved.path))
        for done, strategy in enumerate(self.strategies, 1):
            self.train_strategy(strategy)
            still = {parse_strategy(s, self.blocks)[0] for s in self.strategies[done:]}
            for layer in set(self.prefix_states) - still:
                del self.prefix_states[layer]  # no later strategy starts there: free the memory
            self.accelerator.free_memory()  # drop the finished strategy's model and optimiser
        self.accelerator.wait_for_everyone()
        if not self.main:
            return {}
        return self.evaluate()

    def write_config(self) -> None:
        """config.yaml of this run. When the folder holds an earlier run with other settings,
        its report, results, judgements and figures are first moved aside (``*.previous*``),
        so that a run stopped half-way never leaves a report that contradicts config.yaml."""
        path, text = (
            self.out / "config.yaml",
            yaml.safe_dump(self.config.to_dict(), sort_keys=False),
        )
        if self.main and path.is_file() and path.read_text() != text:
            moved = []
            for name in ("report.md", "results.json", "judgements.jsonl", "figures", "config.yaml"):
                old = self.out / name
                if old.exists():
                    stem, dot, suffix = name.partition(".")
                    target = self.out / (f"{stem}.previous{dot}{suffix}")
                    if target.is_dir():
                        shutil.rmtree(target)
                    old.replace(target)
                    moved.append(target.name)
            logger.warning(
                "settings differ from the earlier run in %s: moved its %s aside until this run "
                "writes its own", self.out, ", ".join(moved),
            )  # fmt: skip
        if self.main:
            path.write_text(text)

    def load_data(self) -> None:
        from hialign.data import load_preferences, split_train_eval

        start, config = time.perf_counter(), self.config
        self.data = load_preferences(config.data, strict=config.strict, split=config.data_split)
        self.train_pairs, self.eval_pairs = split_train_eval(
            self.data.pairs, config.train_pairs, config.eval_prompts, config.seed
        )
        self.eval_prompts = [list(p.prompt) for p in self.eval_pairs]
        self._timed("data", start)

    def partition(self) -> None:
        self.projections, _ = attention_modules(self.base)
        self.num_layers = len(find_decoder_layers(self.base)[1])
        spec = self.config.blocks
        if spec == "auto":  # from the gradient-concentration probe's per-layer profile
            from hialign.segmentation import auto_blocks

            self.blocks = auto_blocks(
                self.base, self.tokenizer, self.train_pairs, self.config.num_blocks,
                max_length=self.config.max_length, beta=self.config.beta,
                seed=self.config.seed, autocast=self.autocast,
            )  # fmt: skip
        elif spec:
            self.blocks = blocks_from_spans(spec, self.num_layers)
        else:
            self.blocks = partition_layers(self.num_layers, self.config.num_blocks)
        logger.info(
            "%s: %d layers; blocks:\n%s",
            self.resolved.display_name, self.num_layers, format_block_map(self.blocks),
        )  # fmt: skip

    def tokenize(self) -> None:
        from hialign.data import tokenize_pairs

        config = self.config
        self.tokenized, self.too_long = tokenize_pairs(
            self.tokenizer, self.train_pairs, config.max_length, config.min_response_tokens
        )
        if not self.tokenized:
            raise ValueError(f"no training pair fits --max-length {config.max_length}")
        if self.too_long:
            logger.warning(
                "%d of %d training pairs do not fit --max-length %d and were dropped; training on "
                "%d (raise --max-length, or --train-pairs to compensate)",
                len(self.too_long), len(self.train_pairs), config.max_length, len(self.tokenized),
            )  # fmt: skip
        self.fit_eval_prompts()
        self.strategies = config.strategy_list()
        self.comparisons = plan_comparisons(self.strategies)
        self.settings = TrainSettings(
            beta=config.beta, learning_rate=config.learning_rate,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
            batch_size=config.batch_size, grad_accum=config.grad_accum, epochs=config.epochs,
            max_steps=config.max_steps, seed=config.seed,
        )  # fmt: skip

    def fit_eval_prompts(self) -> None:
        """Held-out prompts must leave room for the answer in the model's context window: the
        earliest exchanges of a longer prompt are dropped (training's rule), with a warning.
        The judge still sees the whole conversation."""
        from hialign.tokenization import fit_prompt

        context = getattr(self.base.config, "max_position_embeddings", None)
        if not context:
            return
        room = context - self.config.max_new_tokens
        if room < 1:
            raise ValueError(
                f"--max-new-tokens {self.config.max_new_tokens} leaves no room for a prompt in "
                f"the model's {context}-token context"
            )
        fitted = [fit_prompt(self.tokenizer, p, room) for p in self.eval_prompts]
        cut = sum(1 for _, dropped in fitted if dropped)
        if cut:
            logger.warning(
                "%d held-out prompts are longer than the model's context (%d tokens) leaves "
                "room for with %d new tokens: their earliest exchanges were dropped",
                cut, context, self.config.max_new_tokens,
            )  # fmt: skip
        self.eval_prompts = [messages for messages, _ in fitted]

    def log_plan(self) -> None:
        n_prompts, n_groups = len(self.eval_pairs), len(self.strategies) + 1
        calls = len(self.comparisons) * n_prompts * 2
        logger.info(
            "plan:\n  train: %d pairs (%d dropped as too long), strategies %s, %d steps each "
            "(batch %d x accumulation %d, max length %d, %s)\n  generate: %d held-out prompts x "
            "%d groups = %d answers (max %d new tokens)\n  judge: %d comparisons x %d prompts x "
            "2 orders = %d calls, 4 dimensions each",
            len(self.tokenized), len(self.too_long), ", ".join(self.strategies),
            self.settings.total_steps(len(self.tokenized)), self.config.batch_size,
            self.config.grad_accum, self.config.max_length, self.config.precision, n_prompts,
            n_groups, n_prompts * n_groups, self.config.max_new_tokens, len(self.comparisons),
            n_prompts, calls,
        )  # fmt: skip

    def make_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        from hialign.data import collate_pairs

        batch = [self.tokenized[i] for i in indices]
        return collate_pairs(batch, self.tokenizer.pad_token_id)

    def reference_logps(self) -> torch.Tensor:
        """Log-probs of the frozen base, once for every strategy (and cached for re-runs)."""
        start, size, n = time.perf_counter(), self.config.batch_size, len(self.tokenized)
        key = reference_key(
            self.resolved.path,
            [[t.prompt_ids, t.chosen_ids, t.rejected_ids] for t in self.tokenized],
            self.config.precision,
            self.config.max_length,
        )
        self.reference_id = key
        device = self.accelerator.device

        def compute() -> torch.Tensor:
            batches = [
                {
                    k: v.to(device)
                    for k, v in self.make_batch(list(range(i, min(i + size, n)))).items()
                }
                for i in range(0, n, size)
            ]
            # The same pass keeps the hidden states entering each strategy's lowest trained
            # layer: the frozen-prefix cache then skips layers below it from the first epoch.
            return compute_logps(self.base, batches, self.autocast, prefix_states=states)

        lowest = {parse_strategy(s, self.blocks)[0] for s in self.strategies}
        states: dict[int, dict] = {layer: {} for layer in sorted(lowest) if layer > 0}
        reference, cached = cached_reference_logps(key, compute)
        if cached:
            self.reused.append("reference log-probs (cache)")
        # From the cache there was no pass: each strategy's first epoch captures its own.
        self.prefix_states = {} if cached else states
        self._timed("reference", start)
        return reference

    def strategy_fingerprint(self, strategy: str) -> str:
        """Hash of everything a strategy's adapter depends on: reusing a trained adapter is only
        safe when model, data, tokenisation, blocks, LoRA and training settings are unchanged."""
        config = self.config
        spec = dict(
            reference=self.reference_id, strategy=strategy,
            layers=parse_strategy(strategy, self.blocks),
            lora=[config.lora_rank, config.lora_alpha, config.lora_dropout],
            train=asdict(self.settings), precision=config.precision,
        )  # fmt: skip
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def generate(self, group: str, model, model_key: str) -> None:
        """Answers of one group, read back from its JSONL when a previous run produced them with
        the same model (``model_key``), prompts and decoding settings."""
        if not self.main:
            return
        path = self.out / "generations" / f"{group.replace(' ', '_')}.jsonl"
        settings = asdict(self.decoding)
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(rows) == len(self.eval_prompts) and all(
                r["prompt"] == p and r["decoding"] == settings and r.get("model_key") == model_key
                for r, p in zip(rows, self.eval_prompts)
            ):
                logger.info("%s: reusing %d answers from %s", group, len(rows), path)
                self.reused.append(f"generate {group}")
                self.answers[group] = [r["answer"] for r in rows]
                return
        start = time.perf_counter()
        answers = generate_answers(
            model, self.tokenizer, self.eval_prompts, self.decoding, self.autocast, desc=group
        )
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i, (prompt, answer) in enumerate(zip(self.eval_prompts, answers)):
                row = dict(
                    index=i, group=group, prompt=prompt, answer=answer, decoding=settings,
                    model_key=model_key,
                )  # fmt: skip
                f.write(json.dumps(row) + "\n")
        tmp.rename(path)
        self.answers[group] = answers
        self._timed(f"generate {group}", start)

    def train_strategy(self, strategy: str) -> None:
        """Train (or reload) one strategy's adapter, merge it, and answer the eval prompts."""
        from peft import PeftModel

        config, folder = self.config, self.out / "strategies" / strategy
        log_path = folder / "training.json"
        model, _, _ = load_model(self.resolved.path)  # fresh base: merging changes weights
        model.to(self.accelerator.device)
        start = time.perf_counter()
        fingerprint = self.strategy_fingerprint(strategy)
        previous = json.loads(log_path.read_text()) if log_path.is_file() else None
        if previous is not None and previous.get("fingerprint") != fingerprint and self.main:
            logger.warning(
                "%s: settings, blocks, model or data changed since the adapter in %s was trained; "
                "retraining", strategy, folder,
            )  # fmt: skip
            shutil.rmtree(folder)
            previous = None
        if previous is not None and (folder / "adapter" / "adapter_config.json").is_file():
            logger.info("%s: reusing the trained adapter in %s", strategy, folder / "adapter")
            self.reused.append(f"train {strategy}")
            result = previous
            peft_model = PeftModel.from_pretrained(model, folder / "adapter")
        else:
            # Seeded first: LoRA's random A matrices, dropout and batch order all follow --seed,
            # whatever ran before (a resumed run skips the stages that would move the RNG).
            torch.manual_seed(config.seed)
            peft_model, summary = add_block_lora(
                model, strategy, self.blocks, config.lora_rank, config.lora_alpha,
                config.lora_dropout,
            )  # fmt: skip
            history = train_dpo(
                peft_model, self.make_batch, self.reference, self.settings, self.accelerator,
                self.autocast, desc=f"DPO {strategy}", prefix_states=self.prefix_states,
            )  # fmt: skip
            peft_model = self.accelerator.unwrap_model(peft_model)
            result = training_summary(summary, history, time.perf_counter() - start)
            result["fingerprint"] = fingerprint
            if self.main:
                save_adapter(peft_model, folder / "adapter")
                write_json(log_path, result)
            self._timed(f"train {strategy}", start)
            logger.info(
                "%s: %d steps, loss %.4f -> %.4f, reward accuracy %.2f, margin %.3f (%.0f s)",
                strategy, result["steps"], result["first_loss"], result["final_loss"],
                result["final_reward_accuracy"], result["final_margin"], result["seconds"],
            )  # fmt: skip
        self.training[strategy] = result
        if not self.main:
            return
        merged_dir = folder / "merged" if config.save_merged else None
        if merged_dir is not None and merged_dir.is_dir():
            merged_dir = None  # saved by an earlier run (the folder appears only when complete)
        merged = merge_and_save(peft_model, self.tokenizer, merged_dir)
        self.generate(group_name(strategy), merged, fingerprint)

    def evaluate(self) -> dict:
        """Judge, count, compute statistics, and write results.json and the report."""
        from hialign.report import write_report

        judged = judge_groups(
            self.config, self.out, self.base, self.tokenizer, self.resolved, self.eval_pairs,
            self.answers, self.comparisons, self.timings,
        )  # fmt: skip
        results = assemble_results(
            self.config, self.resolved, self.num_layers, self.projections, self.blocks,
            self.strategies, self.data, self.train_pairs, self.eval_pairs, self.too_long,
            self.training, self.decoding, judged, self.comparisons, self.timings,
        )  # fmt: skip
        results["reused"] = self.reused
        write_json(self.out / "results.json", results)
        report = write_report(results, self.out)
        logger.info("report written to %s", report)
        return results


def training_summary(summary, history: list[dict], seconds: float) -> dict:
    """What results.json keeps of a strategy's training: targets, curve and end metrics."""
    tail = history[-max(1, len(history) // 10) :]  # last 10% of steps

    def mean(key: str) -> float:
        return sum(h[key] for h in tail) / len(tail)

    return dict(
        layers=summary.layers, lora_modules=len(summary.modules), modules=summary.modules,
        trainable_params=summary.trainable_params, steps=len(history), seconds=seconds,
        first_loss=history[0]["loss"], final_loss=mean("loss"),
        final_reward_accuracy=mean("reward_accuracy"), final_margin=mean("reward_margin"),
        history=history,
    )  # fmt: skip
