"""The benchmark's workload and its two engines, each run in a fresh process by ``dpo_speed``.

Both engines get the same SmolLM2, the same token ids (hialign's tokenisation, handed to TRL
as pre-tokenised rows), the same LoRA initial weights (rank, alpha, targets), the same data order
(hialign's seeded micro-batches, imposed on TRL through its sampler), AdamW with the same linear
schedule, no gradient clipping, and the same precision (fp32, or bf16 autocast on fp32 weights).
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HH_TEST = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


@dataclass
class Workload:
    engine: str  # hialign | trl | trl-precompute
    strategy: str  # full | global | any hialign strategy
    precision: str  # fp32 | bf16
    pairs: int = 64
    batch_size: int = 4
    max_length: int = 256
    epochs: int = 2
    beta: float = 0.1
    learning_rate: float = 5e-4
    warmup_steps: int = 2
    lora_rank: int = 8
    lora_alpha: int = 16
    seed: int = 42
    threads: int = 0  # 0 = torch's default
    data: str = str(HH_TEST)


@dataclass
class Result:
    workload: dict
    reference_s: float = 0.0  # reference log-probs computed before training (0 for plain TRL)
    epoch_s: list[float] = field(default_factory=list)  # wall seconds of each epoch
    epoch_cpu_s: list[float] = field(default_factory=list)  # process CPU seconds of each epoch
    epoch_loss: list[float] = field(default_factory=list)  # mean training loss of each epoch
    step_loss: list[float] = field(default_factory=list)
    # DPO loss over all pairs of the adapter as it stands after each epoch, computed afterwards
    # in fp32 by one evaluator for every engine (``_evaluate_snapshots``): the trained result,
    # free of the training precision's rounding of the loss itself.
    eval_loss: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    load_avg: list[float] = field(default_factory=list)  # 1-minute load average, start and end
    notes: list[str] = field(default_factory=list)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _autocast(precision: str):
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _load_pairs(work: Workload, tokenizer):
    """The first ``work.pairs`` hh-rlhf pairs that fit ``max_length`` (hialign's tokenisation)."""
    from hialign.data import load_preferences, tokenize_pairs

    data = load_preferences(work.data)
    tokenized, _ = tokenize_pairs(tokenizer, data.pairs[: work.pairs * 2], work.max_length)
    if len(tokenized) < work.pairs:
        raise ValueError(f"only {len(tokenized)} pairs fit max length {work.max_length}")
    return tokenized[: work.pairs]


def _settings(work: Workload):
    from hialign.dpo import TrainSettings

    return TrainSettings(
        beta=work.beta,
        learning_rate=work.learning_rate,
        warmup_steps=work.warmup_steps,
        batch_size=work.batch_size,
        epochs=work.epochs,
        seed=work.seed,
    )


def _seeded_lora(model, work: Workload):
    """hialign's LoRA for ``work.strategy`` on ``model``, initialised from ``work.seed``."""
    from hialign.adapters import add_block_lora
    from hialign.partition import find_decoder_layers, partition_layers

    blocks = partition_layers(len(find_decoder_layers(model)[1]))
    torch.manual_seed(work.seed)
    return add_block_lora(model, work.strategy, blocks, work.lora_rank, work.lora_alpha, 0.0)


def _lora_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def _evaluate_snapshots(peft_model, tokenizer, pairs, snapshots, work: Workload) -> list[float]:
    """fp32 DPO loss over ``pairs`` for each LoRA snapshot, against the fp32 reference (the
    adapter-disabled base). The same code measures every engine; it runs after training, so
    no timing includes it."""
    from hialign.dpo import compute_logps, dpo_loss
    from hialign.tokenization import collate_pairs

    batches = [
        collate_pairs(pairs[i : i + work.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(pairs), work.batch_size)
    ]
    fp32 = contextlib.nullcontext
    live = dict(peft_model.named_parameters())
    with peft_model.disable_adapter():
        reference = compute_logps(peft_model, batches, fp32, desc="fp32 reference")
    losses = []
    with torch.no_grad():
        for snapshot in snapshots:
            for name, value in snapshot.items():
                live[name].copy_(value)
            policy = compute_logps(peft_model, batches, fp32, desc="fp32 evaluation")
            loss, _, _ = dpo_loss(
                policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], work.beta
            )
            losses.append(float(loss.double().mean()))
    return losses


def _lowest_layer(model, strategy: str) -> int:
    from hialign.partition import find_decoder_layers, parse_strategy, partition_layers

    blocks = partition_layers(len(find_decoder_layers(model)[1]))
    return parse_strategy(strategy, blocks)[0]


def run_hialign(work: Workload, result: Result) -> None:
    from accelerate import Accelerator

    from hialign.dpo import compute_logps, micro_batches, train_dpo
    from hialign.modeling import load_model
    from hialign.tokenization import collate_pairs

    model, tokenizer, _ = load_model(None)
    pairs = _load_pairs(work, tokenizer)
    settings = _settings(work)
    autocast = _autocast(work.precision)

    def make_batch(indices):
        return collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id)

    # As the experiment runner does: one reference pass, which also keeps the hidden states
    # entering the strategy's lowest trained layer for its frozen-prefix cache.
    start = _clock()
    batches = [
        make_batch(list(range(i, min(i + work.batch_size, len(pairs)))))
        for i in range(0, len(pairs), work.batch_size)
    ]
    states = {_lowest_layer(model, work.strategy): {}}
    reference = compute_logps(model, batches, autocast, prefix_states=states)
    result.reference_s = time.perf_counter() - start[0]

    peft_model, _ = _seeded_lora(model, work)
    steps_per_epoch = len(list(micro_batches(len(pairs), settings))) // work.epochs
    marks, snapshots = [], []
    calls = iter(range(10**9))

    def timed_make_batch(indices):
        call = next(calls)
        if call % steps_per_epoch == 0:
            if call:  # the previous epoch's last optimizer step is done
                snapshots.append(_lora_snapshot(peft_model))
            marks.append(_clock())  # the first batch of an epoch
        return make_batch(indices)

    history = train_dpo(
        peft_model,
        timed_make_batch,
        reference,
        settings,
        Accelerator(cpu=True),
        autocast,
        prefix_states=states,
    )
    marks.append(_clock())
    snapshots.append(_lora_snapshot(peft_model))
    _fill_epochs(result, marks, [h["loss"] for h in history], steps_per_epoch)
    result.eval_loss = _evaluate_snapshots(peft_model, tokenizer, pairs, snapshots, work)


def _fill_epochs(result: Result, marks, step_losses, steps_per_epoch) -> None:
    result.epoch_s = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    result.epoch_cpu_s = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    result.step_loss = list(step_losses)
    result.epoch_loss = [
        sum(step_losses[i : i + steps_per_epoch]) / steps_per_epoch
        for i in range(0, len(step_losses), steps_per_epoch)
    ]


def trl_trainer(work: Workload, model, tokenizer, pairs, order=None, callbacks=()):
    """TRL's DPOTrainer on hialign's token ids, with hialign's initial LoRA weights and, when
    ``order`` is given, hialign's data order (epoch e visits ``order[e * N:(e + 1) * N]``)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hialign.adapters import lora_config

    # The LoRA initial weights hialign uses, then the bare base model back for TRL to wrap.
    peft_model, summary = _seeded_lora(model, work)
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    model = peft_model.unload()

    class HialignOrder(torch.utils.data.Sampler):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = int(epoch)

        def __len__(self):
            return len(pairs)

        def __iter__(self):
            return iter(order[self.epoch * len(pairs) : (self.epoch + 1) * len(pairs)])

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already hialign's token ids, already within max_length

        def _get_train_sampler(self, train_dataset=None):
            return HialignOrder() if order is not None else super()._get_train_sampler()

    rows = [
        {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
         "rejected_ids": list(p.rejected_ids)}
        for p in pairs
    ]  # fmt: skip
    args = DPOConfig(
        output_dir=str(Path("/tmp") / f"hialign-bench-trl-{time.time_ns()}"),
        per_device_train_batch_size=work.batch_size,
        num_train_epochs=work.epochs,
        learning_rate=work.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=work.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=0.0,  # hialign does not clip
        optim="adamw_torch",
        beta=work.beta,
        loss_type=["sigmoid"],
        bf16=work.precision == "bf16",
        activation_checkpointing=False,  # TRL's default is on: slower, saves memory
        max_length=work.max_length,
        precompute_ref_log_probs=work.engine == "trl-precompute",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=work.seed,
    )
    trainer = PreTokenizedDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(summary.modules, work.lora_rank, work.lora_alpha, 0.0),
        callbacks=list(callbacks),
    )
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.copy_(initial[name])
    return trainer


def run_trl(work: Workload, result: Result) -> None:
    from transformers import TrainerCallback

    from hialign.dpo import micro_batches
    from hialign.modeling import load_model

    model, tokenizer, _ = load_model(None)
    pairs = _load_pairs(work, tokenizer)
    order = [i for _, batch in micro_batches(len(pairs), _settings(work)) for i in batch]
    steps_per_epoch = len(order) // work.epochs // work.batch_size
    marks, losses, snapshots = [], [], []

    class Timer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            marks.append(_clock())

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(_lora_snapshot(model))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    start = _clock()  # building the trainer includes TRL's reference precompute, if on
    trainer = trl_trainer(work, model, tokenizer, pairs, order, [Timer()])
    result.reference_s = time.perf_counter() - start[0] if work.engine == "trl-precompute" else 0
    trainer.train()
    marks.append(_clock())
    _fill_epochs(result, marks, losses, steps_per_epoch)
    model = trainer.model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        result.notes.append("TRL left non-fp32 weights; evaluated in fp32 copies")
        model = model.float()
    result.eval_loss = _evaluate_snapshots(model, tokenizer, pairs, snapshots, work)


def run(work: Workload) -> Result:
    """Run one workload in this process; return its timings, losses and peak memory."""
    import os

    if work.threads:
        torch.set_num_threads(work.threads)
    result = Result(workload=asdict(work), load_avg=[os.getloadavg()[0]])
    if work.engine == "hialign":
        run_hialign(work, result)
    elif work.engine in ("trl", "trl-precompute"):
        run_trl(work, result)
    else:
        raise ValueError(f"unknown engine {work.engine!r}")
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.load_avg.append(os.getloadavg()[0])
    return result
