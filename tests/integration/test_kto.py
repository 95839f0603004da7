"""kto: labelled single responses rendered and masked like SFT, the KTO loss against a hand computation,
the LoRA reference as the disabled adapter, and a run from the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.config import DataArguments
from lmforge.config.parser import parse_train_config
from lmforge.data.pipeline import build_datasets
from lmforge.train.preference import LmforgeKTOTrainer, _kto_config
from lmforge.train.recipe import build_model, prepare_tokenizer


def test_rows_are_rendered_and_masked_like_sft(smol_tokenizer, data_dir):
    rows = [json.loads(line) for line in (data_dir / "kto_demo.jsonl").read_text().splitlines()]
    data = build_datasets(DataArguments(dataset="kto_demo", dataset_dir=str(data_dir), template="auto"), "kto", 0,
                          smol_tokenizer)
    assert sorted(data.train["label"]) == sorted(r["label"] for r in rows) and len(set(data.train["label"])) == 2
    for row in data.train.select(range(3)):
        source = next(r for r in rows if smol_tokenizer.decode(row["completion_ids"]) == r["completion"] + "<|im_end|>\n")
        messages = [{"role": "user", "content": source["prompt"]}, {"role": "assistant", "content": source["completion"]}]
        expected = smol_tokenizer(smol_tokenizer.apply_chat_template(messages, tokenize=False),
                                  add_special_tokens=False)["input_ids"]
        assert row["prompt_ids"] + row["completion_ids"] == expected  # with the turn's own "\n", as in sft
        assert row["label"] == source["label"]
    sharegpt = build_datasets(DataArguments(dataset="kto_sharegpt_demo", dataset_dir=str(data_dir), template="auto"),
                              "kto", 0, smol_tokenizer)
    assert len(sharegpt.train) == 12 and sum(sharegpt.train["label"]) == 8  # LLaMA-Factory's kto_tag column


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "completion": "Hello!", "label": "maybe"}, "'label' must be true or false"),
    ({"prompt": "Hi", "completion": " ", "label": True}, "empty completion"),
    ({"prompt": "", "completion": "Hello!", "label": True}, "empty prompt"),
])
def test_bad_rows_name_the_line(tmp_path, smol_tokenizer, row, message):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": "true"}) + "\n" + json.dumps(row))
    with pytest.raises(Exception, match=f"kto.jsonl:2.*{message}"):
        build_datasets(DataArguments(dataset=str(path), template="auto"), "kto", 0, smol_tokenizer)
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!"}) + "\n")
    with pytest.raises(Exception, match="column 'kto_tag' \\(columns.kto_tag\\) not found"):
        build_datasets(DataArguments(dataset=str(path), template="auto"), "kto", 0, smol_tokenizer)


def _trainer(tiny_llama_dir, data_dir, tmp_path, *extra):
    config = parse_train_config([
        "--stage", "kto", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "kto_demo", "--dataset_dir",
        str(data_dir), "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--output_dir", str(tmp_path), *extra])
    tokenizer = prepare_tokenizer(config)
    data = build_datasets(config.data, "kto", 0, tokenizer)
    model = build_model(config, tokenizer)
    trainer = LmforgeKTOTrainer(model=model, args=_kto_config(config), train_dataset=data.train,
                                processing_class=tokenizer)
    return trainer, model, config.finetuning


def _logps(model, ids, mask, completion):
    """Summed log-probability of the completion tokens, [B]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    token = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * completion[:, 1:]).sum(1)


def test_kto_loss_matches_a_hand_computation(tiny_llama_dir, data_dir, tmp_path):
    trainer, model, f = _trainer(tiny_llama_dir, data_dir, tmp_path, "--pref_beta", "0.5",
                                 "--kto_chosen_weight", "1.0", "--kto_rejected_weight", "1.5")
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # the adapter disabled: no copy
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # move the policy away from the reference
            p.data.normal_(0, 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert 0 < batch["label"].sum() < 4  # both kinds in the batch
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        policy = _logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        policy_kl = _logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        with model.disable_adapter():
            ref = _logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref_kl = _logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    beta, label = f.pref_beta, batch["label"]
    kl = (policy_kl - ref_kl).mean().clamp(min=0)
    ratio = policy - ref
    losses = torch.cat([f.kto_chosen_weight * (1 - torch.sigmoid(beta * (ratio[label] - kl))),
                        f.kto_rejected_weight * (1 - torch.sigmoid(beta * (kl - ratio[~label])))])
    expected = losses.mean().item()
    print(f"kto: loss {got:.6f}, by hand {expected:.6f}, kl {kl.item():.4f}")
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5) and abs(got - 0.5) > 1e-3


def test_kto_raises_the_margin_from_the_cli(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "kto"
    assert main(["train", "--stage", "kto", "--model_name_or_path", str(tiny_llama_dir), "--dataset",
                 "kto_demo,kto_sharegpt_demo", "--dataset_dir", str(data_dir), "--per_device_train_batch_size", "4",
                 "--learning_rate", "2e-2", "--lr_scheduler_type", "constant", "--max_steps", "18",
                 "--pref_beta", "0.5", "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in log if "rewards/margins" in r]
    print(f"kto margins: first 3 {margins[:3]}, last 3 {margins[-3:]}")
    assert len(margins) >= 12 and sum(margins[-6:]) / 6 > sum(margins[:3]) / 3 + 0.05
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert (out / "reward_margins.png").is_file() and "kl" in log[0]
