"""Run configuration: one dataclass with defaults and help text, loadable from YAML, overridable
on the command line. The defaults are sized to finish on a 2-core CPU in well under 45 minutes;
every size flag scales up for GPU users.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

DEFAULT_STRATEGIES = "full,local,mid,global"


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunConfig:
    """Everything ``hialign run`` needs. Field names are the YAML keys and the CLI flags."""

    data: str = _opt(None, "preference data: .jsonl[.gz] file, folder of them, or hub id")
    out: str = _opt(None, "output folder (re-running resumes finished stages)")
    model: str | None = _opt(None, "embedded SmolLM2 (default), a .gguf file, a folder or hub id")
    data_split: str = _opt("test", "split to read when --data is a hub id")
    strict: bool = _opt(False, "stop at the first malformed row instead of skipping it")

    strategies: str = _opt(DEFAULT_STRATEGIES, "comma list: full, local, mid, global, a+b unions")
    num_blocks: int = _opt(3, "contiguous blocks the layers are split into")
    blocks: str | None = _opt(
        None, "0-9,10-19,20-29 (explicit) or auto (from the gradient probe); default: equal thirds"
    )

    train_pairs: int = _opt(128, "preference pairs used for training")
    eval_prompts: int = _opt(40, "held-out prompts every group answers and the judge compares")
    max_length: int = _opt(256, "max tokens of prompt + response in training")
    min_response_tokens: int = _opt(8, "pairs leaving fewer response tokens are dropped")

    beta: float = _opt(0.1, "DPO temperature beta")
    learning_rate: float = _opt(5e-4, "AdamW learning rate for the LoRA parameters")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(0, "linear learning-rate warm-up steps")
    lora_rank: int = _opt(8, "LoRA rank r")
    lora_alpha: int = _opt(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout (0 keeps the first step's loss exactly log 2)")
    batch_size: int = _opt(4, "pairs per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimiser step")
    epochs: int = _opt(1, "passes over the training pairs")
    max_steps: int = _opt(0, "stop after this many optimiser steps (0 = no limit)")
    seed: int = _opt(42, "seed for data split, order and initialisation")
    precision: str = _opt("bf16", "bf16 (autocast) or fp32", choices=("bf16", "fp32"))

    max_new_tokens: int = _opt(96, "generation length per answer")
    gen_batch_size: int = _opt(8, "prompts per generation batch (left padded)")
    do_sample: bool = _opt(False, "sample instead of greedy decoding")
    temperature: float = _opt(0.7, "sampling temperature (only with --do-sample)")
    top_p: float = _opt(0.95, "nucleus sampling p (only with --do-sample)")

    judge_url: str | None = _opt(None, "OpenAI-compatible base URL; none = local judge")
    judge_model: str | None = _opt(None, "judge model name at the endpoint, or local model spec")
    judge_api_key_env: str = _opt("HIALIGN_JUDGE_API_KEY", "env var holding the judge API key")
    judge_concurrency: int = _opt(4, "judge requests in flight")
    judge_max_retries: int = _opt(5, "HTTP retries per judge call")
    judge_parse_retries: int = _opt(2, "re-asks when the judge's answer cannot be parsed")
    judge_timeout: float = _opt(120.0, "seconds per judge HTTP request")
    judge_max_tokens: int = _opt(4096, "completion cap per judge request (room to think)")
    judge_prices: str | None = _opt(None, "PROMPT,COMPLETION cost per million judge tokens")

    save_merged: bool = _opt(True, "save each merged model (safetensors) next to its adapter")

    def validate(self) -> None:
        """Check every value before anything is loaded; errors name the flag at fault."""
        for f in fields(self):
            value = _coerce_number(getattr(self, f.name), f.type)
            setattr(self, f.name, value)
            _check_type(f.name, value, f.type)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {list(choices)}, got {value!r}")
        if not self.data:
            raise ValueError("--data is required")
        if not self.out:
            raise ValueError("--out is required")
        positive = ("train_pairs", "eval_prompts", "max_length", "batch_size", "grad_accum")
        positive += ("epochs", "lora_rank", "max_new_tokens", "gen_batch_size")
        for name in positive + ("judge_concurrency", "judge_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        non_negative = ("max_steps", "warmup_steps", "weight_decay", "min_response_tokens")
        for name in non_negative + ("judge_max_retries", "judge_parse_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("beta", "learning_rate", "temperature", "judge_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_blocks < 1:
            raise ValueError(f"--num-blocks must be >= 1, got {self.num_blocks}")
        self.check_strategies()

    def block_names(self) -> list[str]:
        """Names the blocks will have: local/mid/global for 3 blocks, block0.. otherwise."""
        if self.blocks and self.blocks != "auto":
            count = len(self.blocks.split(","))
        else:
            count = self.num_blocks
        return ["local", "mid", "global"] if count == 3 else [f"block{i}" for i in range(count)]

    def check_strategies(self) -> None:
        """Strategies must name ``full`` or known blocks (``a+b`` unions of blocks)."""
        names = self.block_names()
        strategies = self.strategy_list()
        if not strategies:
            raise ValueError("--strategies is empty; e.g. full,local,mid,global")
        for strategy in strategies:
            parts = strategy.split("+")
            if strategy == "full":
                continue
            if "full" in parts:
                raise ValueError(f"strategy {strategy!r}: 'full' cannot be part of a union")
            repeated = [p for i, p in enumerate(parts) if p in parts[:i]]
            if repeated:
                raise ValueError(f"strategy {strategy!r} names block {repeated[0]!r} twice")
            unknown = [p for p in parts if p not in names]
            if unknown:
                raise ValueError(
                    f"strategy {strategy!r}: unknown block {unknown[0]!r}; with these blocks the "
                    f"choices are full, {', '.join(names)} or '+'-unions of blocks"
                )
        if len(set(strategies)) != len(strategies):
            raise ValueError(f"--strategies lists a strategy twice: {self.strategies}")

    def strategy_list(self) -> list[str]:
        return [s.strip() for s in self.strategies.split(",") if s.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce_number(value, annotation: str):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; a float field takes it as the number it
    plainly is. Anything else is left for ``_check_type`` to judge."""
    if str(annotation).split("|")[0].strip() == "float" and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _check_type(name: str, value, annotation: str) -> None:
    """Reject YAML values of the wrong type (e.g. ``train_pairs: eight``) with a clear message."""
    optional = "None" in str(annotation)
    if value is None:
        if optional or name in ("data", "out"):
            return
        raise ValueError(f"{_flag(name)} must not be empty")
    kind = str(annotation).split("|")[0].strip()
    expected = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}[kind]
    wrong_bool = isinstance(value, bool) and kind in ("int", "float")
    if not isinstance(value, expected) or wrong_bool:
        raise ValueError(f"{_flag(name)} must be {kind}, got {value!r} ({type(value).__name__})")


SMOKE = dict(
    train_pairs=8,
    eval_prompts=3,
    max_length=128,
    batch_size=2,
    max_steps=2,
    max_new_tokens=16,
    gen_batch_size=4,
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--train-pairs``), plus ``--config`` and ``--smoke``."""
    parser.add_argument("--config", default=None, help="YAML file with RunConfig keys")
    parser.add_argument("--smoke", action="store_true", help=f"tiny preset for tests: {SMOKE}")
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default else "")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(
            flag, type=kind, default=None, help=help_text, choices=f.metadata.get("choices")
        )


def load_yaml_config(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of RunConfig keys")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    smoke = data.pop("smoke", False)
    if smoke is True:  # the --smoke preset, overridden by the file's other keys
        data = {**SMOKE, **data}
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known keys are {sorted(known)}")
    return data


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < --smoke preset < YAML file < explicit flags."""
    values: dict = {}
    if args.smoke:
        values.update(SMOKE)
    if args.config:
        values.update(load_yaml_config(args.config))
    for f in fields(RunConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    config = RunConfig(**values)
    config.validate()
    return config
