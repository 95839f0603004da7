"""QLoRA and 8-bit LoRA through bitsandbytes on this CPU: the base stays quantized and unchanged,
only the LoRA weights learn, the loss falls; export refuses a quantized base."""

import pytest
import torch

from lmforge.cli import main
from lmforge.config.parser import parse_train_config
from lmforge.data.pipeline import get_datasets
from lmforge.train.causal_lm import build_trainer
from lmforge.train.recipe import build_model, prepare_tokenizer

bnb = pytest.importorskip("bitsandbytes")


def quantized_weights(model, bits):
    """Each quantized layer's weight as the float values it stands for."""
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
    if bits == 4:
        return {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().clone()
                for n, m in layers.items()}, layers
    return {n: m.weight.data.clone() for n, m in layers.items()}, layers


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_stays_frozen_while_lora_learns(tiny_llama64_dir, tmp_path, data_dir, bits):
    config = parse_train_config([
        "--model_name_or_path", str(tiny_llama64_dir), "--dataset", "alpaca_demo", "--dataset_dir", str(data_dir),
        "--max_samples", "4", "--quantization_bit", str(bits), "--finetuning_type", "lora", "--lora_rank", "8",
        "--per_device_train_batch_size", "4", "--max_steps", "20", "--learning_rate", "0.2",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no",
        "--output_dir", str(tmp_path / "out"), *(["--bf16", "true"] if bits == 4 else [])])
    tokenizer = prepare_tokenizer(config)
    data = get_datasets(config.data, "sft", 0, tokenizer)
    model = build_model(config, tokenizer)
    before, layers = quantized_weights(model, bits)
    assert len(layers) == 14  # q, k, v, o, gate, up, down in 2 blocks
    if bits == 4:
        first = next(iter(layers.values())).weight
        assert first.dtype == torch.uint8 and first.quant_state.quant_type == "nf4"
        assert first.quant_state.nested  # double quantization
        assert next(iter(layers.values())).compute_dtype == torch.bfloat16
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer = build_trainer(config, tokenizer, data, model, "test")
    trainer.train()
    after, _ = quantized_weights(model, bits)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the quantized base did not move
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), lora[n])]
    assert sorted(moved) == sorted(lora)  # every LoRA matrix learned
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"{bits}-bit LoRA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    # a random tiny model's frozen head and norms bound how far its logits can move: ~0.2 nats in 20 steps
    assert losses[-1] < losses[0] - 0.15 and sum(losses[-5:]) < sum(losses[:5]) - 0.5, losses


def test_export_refuses_a_quantized_base_and_merges_into_the_full_precision_one(tiny_llama64_dir, tmp_path,
                                                                                 data_dir, capsys):
    adapter = tmp_path / "qlora"
    assert main(["train", "--model_name_or_path", str(tiny_llama64_dir), "--dataset", "alpaca_demo", "--dataset_dir",
                 str(data_dir), "--max_samples", "4", "--quantization_bit", "4", "--lora_rank", "4", "--max_steps",
                 "2", "--save_strategy", "no", "--output_dir", str(adapter)]) == 0
    refused = tmp_path / "refused"
    assert main(["export", "--adapter_name_or_path", str(adapter), "--quantization_bit", "4",
                 "--export_dir", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "cannot merge into a 4-bit base" in err and "remove quantization_bit" in err
    assert not refused.exists()
    merged = tmp_path / "merged"
    assert main(["export", "--adapter_name_or_path", str(adapter), "--export_dir", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()
