"""Preference stages: pairs rendered and masked like SFT, dpo's five losses against hand computations,
the LoRA reference as the disabled adapter, a rising margin, and a reward model that learns to rank."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.config import DataArguments
from lmforge.config.parser import parse_train_config
from lmforge.data.pipeline import build_datasets
from lmforge.train.preference import REFERENCE_FREE, LmforgeDPOTrainer, _dpo_config, _reference_model
from lmforge.train.recipe import build_model, prepare_tokenizer


def test_pairs_are_rendered_with_the_template_and_masked_like_sft(smol_tokenizer, data_dir):
    data = build_datasets(DataArguments(dataset="dpo_sharegpt_demo", dataset_dir=str(data_dir), template="auto",
                                        cutoff_len=1024), "dpo", 0, smol_tokenizer)
    row = data.train[0]  # a two-turn prompt
    pairs = json.loads((data_dir / "dpo_sharegpt_demo.json").read_text())[0]
    roles = {"human": "user", "gpt": "assistant"}
    prompt = [{"role": roles[t["from"]], "content": t["value"]} for t in pairs["conversations"]]
    for answer, ids in (("chosen", row["chosen_ids"]), ("rejected", row["rejected_ids"])):
        full = smol_tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": pairs[answer]["value"]}],
                                                  tokenize=False)
        expected = smol_tokenizer(full, add_special_tokens=False)["input_ids"]
        assert row["prompt_ids"] + ids == expected  # the answer ends with the turn's own "\n", as in sft
    assert smol_tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert smol_tokenizer.decode(row["chosen_ids"]) == pairs["chosen"]["value"] + "<|im_end|>\n"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are identical"),
    ({"prompt": "", "chosen": "A.", "rejected": "B."}, "empty prompt"),
    ({"prompt": "Hi", "chosen": "", "rejected": "B."}, "empty chosen response"),
])
def test_bad_pairs_name_the_line_and_can_be_skipped(tmp_path, smol_tokenizer, row, message):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    args = DataArguments(dataset=str(path), template="auto")
    with pytest.raises(Exception, match=f"pairs.jsonl:2.*{message}"):
        build_datasets(args, "dpo", 0, smol_tokenizer)
    args.skip_invalid_examples = True
    data = build_datasets(args, "dpo", 0, smol_tokenizer)
    assert len(data.train) == 1 and data.summary.extra["invalid_rows"] == 1


def test_a_missing_rejected_column_names_the_mapping(tmp_path, smol_tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!"}) + "\n")
    with pytest.raises(Exception, match="column 'rejected' \\(columns.rejected\\) not found"):
        build_datasets(DataArguments(dataset=str(path), template="auto"), "dpo", 0, smol_tokenizer)


def _trainer(tiny_llama_dir, data_dir, tmp_path, *extra):
    config = parse_train_config([
        "--stage", "dpo", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "dpo_demo", "--dataset_dir",
        str(data_dir), "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--save_strategy", "no", "--train_sampling_strategy", "sequential", "--output_dir", str(tmp_path), *extra])
    tokenizer = prepare_tokenizer(config)
    data = build_datasets(config.data, "dpo", 0, tokenizer)
    model = build_model(config, tokenizer)
    f = config.finetuning
    trainer = LmforgeDPOTrainer(model=model, ref_model=_reference_model(config, tokenizer), args=_dpo_config(config),
                                train_dataset=data.train, processing_class=tokenizer, pref_loss=f.pref_loss,
                                pref_ftx=f.pref_ftx, simpo_gamma=f.simpo_gamma)
    return trainer, model, f


def _sequence_logps(model, batch):
    """Sum and mean log-probability of each answer, [2B], from plain logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1) * mask
    return token.sum(1), token.sum(1) / mask.sum(1), mask.sum(1)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_each_pref_loss_matches_a_hand_computation(tiny_llama_dir, data_dir, tmp_path, loss):
    trainer, model, f = _trainer(tiny_llama_dir, data_dir, tmp_path, "--pref_loss", loss, "--pref_beta", "0.5",
                                 "--lora_rank", "8")
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # move the policy away from the reference (a new adapter equals the base)
            p.data.normal_(0, 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        sums, means, lengths = _sequence_logps(model, batch)
        with model.disable_adapter():
            ref_sums, _, _ = _sequence_logps(model, batch)
    beta = f.pref_beta
    (c_avg, r_avg), (c_len, r_len) = means.chunk(2), lengths.chunk(2)  # the sums enter through the ratios
    c_ratio, r_ratio = (sums - ref_sums).chunk(2)
    expected = {
        "sigmoid": lambda: -F.logsigmoid(beta * (c_ratio - r_ratio)),
        "hinge": lambda: torch.relu(1 - beta * (c_ratio - r_ratio)),
        "ipo": lambda: (c_ratio / c_len - r_ratio / r_len - 1 / (2 * beta)) ** 2,
        "orpo": lambda: -c_avg - beta * F.logsigmoid(
            (c_avg - r_avg) - (torch.log1p(-c_avg.exp()) - torch.log1p(-r_avg.exp()))),
        "simpo": lambda: -F.logsigmoid(beta * (c_avg - r_avg) - f.simpo_gamma),
    }[loss]().mean().item()
    print(f"{loss}: loss {got:.6f}, by hand {expected:.6f}")
    assert torch.isfinite(torch.tensor(got))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if loss in REFERENCE_FREE:
        assert trainer.ref_model is None


def test_dpo_with_lora_raises_the_margin_and_leaves_the_reference_untouched(tiny_llama_dir, data_dir, tmp_path):
    trainer, model, _ = _trainer(tiny_llama_dir, data_dir, tmp_path, "--max_steps", "24", "--learning_rate", "2e-2",
                                 "--lora_rank", "8",
                                 "--lr_scheduler_type", "constant")
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # no second copy, no ref adapter
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad(), model.disable_adapter():
        before = model(input_ids=batch["input_ids"]).logits
    trainer.train()
    margins = [r["rewards/margins"] for r in trainer.state.log_history if "rewards/margins" in r]
    print(f"dpo margins: first 3 {margins[:3]}, last 3 {margins[-3:]}")
    assert sum(margins[-6:]) / 6 > sum(margins[:3]) / 3 + 0.01 and sum(margins[-6:]) > 0
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)  # the reference is unchanged


def test_dpo_full_trains_against_a_frozen_reference_copy(tiny_llama_dir, data_dir, tmp_path):
    trainer, model, _ = _trainer(tiny_llama_dir, data_dir, tmp_path, "--finetuning_type", "full", "--max_steps", "2",
                                 "--learning_rate", "1e-3")
    reference = trainer.ref_model
    assert reference is not None and reference is not model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, start[n]) for n, p in reference.named_parameters())  # the reference never moves
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # the policy does


def test_rm_learns_to_rank_and_dpo_runs_from_the_cli(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "rm"
    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "dpo_demo", "--dataset_dir", str(data_dir),
              "--save_strategy", "no", "--logging_steps", "1"]
    assert main(["train", "--stage", "rm", *common, "--eval_dataset", "dpo_demo", "--finetuning_type", "full",
                 "--num_train_epochs", "8", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
                 "--output_dir", str(out)]) == 0
    results = json.loads((out / "all_results.json").read_text())
    print(f"rm: eval accuracy {results['eval_accuracy']:.3f}, margin {results['eval_margin']:.3f}")
    assert results["eval_accuracy"] > 0.9 and results["eval_margin"] > 0
    assert "perplexity" not in results and (out / "model.safetensors").is_file()
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    dpo = tmp_path / "dpo"
    assert main(["train", "--stage", "dpo", *common, "--max_steps", "2", "--lora_rank", "4",
                 "--output_dir", str(dpo)]) == 0
    assert (dpo / "adapter_model.safetensors").is_file() and not (dpo / "ref").exists()
    log = [json.loads(line) for line in (dpo / "trainer_log.jsonl").read_text().splitlines()]
    assert "rewards/margins" in log[0] and (dpo / "reward_margins.png").is_file()
