"""TRL's DPOTrainer as an oracle: same model, same batch -> same loss and log-probs as hialign."""

import pytest
import torch

from hialign.adapters import lora_config
from hialign.data import load_preferences
from hialign.dpo import dpo_loss, response_logps
from hialign.partition import find_decoder_layers, target_module_names
from hialign.scoring import PairScorer
from tests.conftest import make_tiny_llama

BETA = 0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: small ops stall on a thread barrier when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conversational_rows(hh_path, n, max_chars=500):
    """The first ``n`` short hh-rlhf pairs as TRL's conversational prompt/chosen/rejected rows
    (short, so that neither side truncates: TRL keeps the start, hialign drops early turns)."""
    pairs = [
        pair
        for pair in load_preferences(str(hh_path)).pairs[:200]
        if sum(len(m["content"]) for m in pair.prompt) + len(pair.chosen + pair.rejected)
        < max_chars
    ][:n]
    return [
        {
            "prompt": [dict(m) for m in pair.prompt],
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
        for pair in pairs
    ]


def _trl_trainer(model, tokenizer, rows, tmp_path):
    """A TRL DPOTrainer in fp32 whose reference is the adapter-disabled base (LoRA on the top
    half of the layers), with LoRA B set non-zero so that policy and reference differ."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    num_layers = len(find_decoder_layers(model)[1])
    targets = target_module_names(model, list(range(num_layers // 2, num_layers)))
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        beta=BETA,
        loss_type=["sigmoid"],
        bf16=False,
        activation_checkpointing=False,
        max_length=None,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(targets, rank=8, alpha=16, dropout=0.0),
    )
    torch.manual_seed(1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return trainer


def _trl_row_logps(trainer, batch):
    """(2B,) policy log-probs of each row, computed the way TRL's loss computes them."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = trainer.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    return outputs.log_probs.sum(1)


def _compare_with_trl(model, tokenizer, hh_path, tmp_path, n_pairs):
    rows = _conversational_rows(hh_path, n_pairs)
    trainer = _trl_trainer(model, tokenizer, rows, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)])
    peft_model = trainer.model
    peft_model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(peft_model, batch)
        trl_policy = _trl_row_logps(trainer, batch)
        trl_ref = torch.cat(trainer.compute_ref_log_probs(peft_model, batch))

        args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
        policy = response_logps(peft_model, *args)
        with peft_model.disable_adapter():
            ref = response_logps(peft_model, *args)
        ours = {"input_ids": args[0], "attention_mask": args[1], "loss_mask": args[2]}
        shared = torch.cat(PairScorer(peft_model, share_prompt=True)(ours))

    losses, _, _ = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta=BETA)
    assert abs(trl_loss.item() - losses.mean().item()) < 1e-4
    assert abs(trl_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # not trivial
    torch.testing.assert_close(policy, trl_policy, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ref, trl_ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(shared, trl_policy, rtol=1e-5, atol=1e-3)
    assert (policy - ref).abs().max() > 0.1  # the adapters change the log-probs


def test_loss_and_row_logps_match_trl_dpo_trainer_on_tiny_llama(tokenizer, hh_path, tmp_path):
    model = make_tiny_llama(num_layers=4)
    _compare_with_trl(model, tokenizer, hh_path, tmp_path, n_pairs=3)


@pytest.mark.slow
def test_loss_and_row_logps_match_trl_dpo_trainer_on_smollm2(
    smollm2_path, tokenizer, hh_path, tmp_path
):
    from hialign.modeling import load_model

    model, _, _ = load_model(smollm2_path)
    _compare_with_trl(model, tokenizer, hh_path, tmp_path, n_pairs=2)
