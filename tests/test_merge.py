"""Stage 4: merged model saves as plain safetensors and reloads with identical logits."""

import os

import torch
from transformers import AutoModelForCausalLM

from hialign.adapters import add_block_lora
from hialign.merge import merge_and_save, save_adapter
from hialign.partition import partition_layers
from tests.conftest import make_tiny_llama


def test_merged_model_reloads_with_identical_logits(tmp_path, tokenizer):
    model = make_tiny_llama(num_layers=3)
    peft_model, _ = add_block_lora(model, "global", partition_layers(3), rank=4)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    save_adapter(peft_model, tmp_path / "adapter")
    merged = merge_and_save(peft_model, tokenizer, tmp_path / "merged")

    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "merged").glob("*.bin"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert (tmp_path / "merged" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    adapter_file = tmp_path / "adapter" / "adapter_model.safetensors"
    assert adapter_file.stat().st_mode & 0o777 == 0o666 & ~mask
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
    assert torch.equal(reloaded_logits, merged_logits)
    torch.testing.assert_close(merged_logits, unmerged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmerged, make_tiny_llama(num_layers=3)(input_ids=ids).logits)


def test_a_crash_while_saving_leaves_no_folder_that_looks_finished(
    tmp_path, tokenizer, monkeypatch
):
    peft_model, _ = add_block_lora(make_tiny_llama(num_layers=3), "global", partition_layers(3))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    try:
        merge_and_save(peft_model, tokenizer, tmp_path / "merged")
    except KeyboardInterrupt:
        pass
    assert not (tmp_path / "merged").exists()
    monkeypatch.undo()
    peft_model, _ = add_block_lora(make_tiny_llama(num_layers=3), "global", partition_layers(3))
    merge_and_save(peft_model, tokenizer, tmp_path / "merged")  # cleans the partial folder
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
