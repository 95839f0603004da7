"""grpo (and ppo, which runs it): prompts rendered with the generation prompt, the mean reward rising on a
toy task, a reward model trained by stage rm scoring completions, and `lmforge score`."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.config import DataArguments
from lmforge.data.pipeline import build_datasets
from lmforge.train.rewards import RewardModelScorer

# a reward the tiny random model can learn within a few steps: with top_k 2 it picks between two tokens at
# each position, and the reward is the share of even token ids
TOY_REWARD = "def even_ids(completion_ids, **kwargs):\n" \
             "    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n"


def test_prompts_are_rendered_with_the_generation_prompt(smol_tokenizer, data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "rl_demo.jsonl").read_text().splitlines()]
    data = build_datasets(DataArguments(dataset="rl_demo", dataset_dir=str(data_dir), template="auto"), "grpo", 0,
                          smol_tokenizer)
    for row in data.train.select(range(3)):
        source = next(r for r in rows if r["prompt"] in row["prompt"])
        expected = smol_tokenizer.apply_chat_template([{"role": "user", "content": source["prompt"]}],
                                                      add_generation_prompt=True, tokenize=False)
        assert row["prompt"] == expected and row["answer"] == source["answer"]
        assert row["prompt_length"] == len(smol_tokenizer(expected, add_special_tokens=False)["input_ids"])
    path = tmp_path / "chat.jsonl"  # openai rows: a last assistant turn is the reference answer; other columns stay
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                "level": 1}) + "\n")
    row = build_datasets(DataArguments(dataset=str(path), template="auto"), "grpo", 0, smol_tokenizer).train[0]
    assert row["answer"] == "4" and row["level"] == 1 and row["prompt"].endswith("<|im_start|>assistant\n")
    assert "4" not in row["prompt"]
    path.write_text(json.dumps({"prompt": "6*7?", "answer": 42}) + "\n")  # numeric answers, as in math sets
    assert build_datasets(DataArguments(dataset=str(path), template="auto"), "grpo", 0,
                          smol_tokenizer).train[0]["answer"] == "42"


def test_grpo_raises_the_mean_reward_on_a_toy_task(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grpo"
    assert main(["train", "--stage", "grpo", "--model_name_or_path", str(tiny_llama_dir), "--finetuning_type", "full",
                 "--dataset", "rl_demo", "--dataset_dir", str(data_dir), "--reward_funcs", "toy_reward:even_ids",
                 "--num_generations", "4", "--max_new_tokens", "8", "--top_k", "2",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
                 "--max_steps", "6", "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in log if "reward" in r]
    print(f"grpo mean reward per step: {[round(r, 3) for r in rewards]}")
    assert len(rewards) == 6 and rewards[0] < 0.8 and sum(rewards[-3:]) / 3 > 0.9
    assert (out / "reward.png").is_file() and (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def reward_model(tiny_llama_dir, tmp_path_factory):
    from pathlib import Path

    data_dir = Path(__file__).parents[2] / "data"
    out = tmp_path_factory.mktemp("rm") / "rm"
    assert main(["train", "--stage", "rm", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "dpo_demo",
                 "--dataset_dir", str(data_dir), "--finetuning_type", "full", "--num_train_epochs", "8",
                 "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--save_strategy", "no",
                 "--output_dir", str(out)]) == 0
    return out


def test_score_ranks_chosen_over_rejected_as_in_training(reward_model, data_dir, tmp_path, smol_tokenizer):
    pairs = [json.loads(line) for line in (data_dir / "dpo_demo.jsonl").read_text().splitlines()]
    rows = [{"prompt": p["prompt"], "response": p[k]} for p in pairs for k in ("chosen", "rejected")]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--reward_model", str(reward_model), "--input", str(source)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "rows.scored.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "response")} for r in scored] == rows
    wins = sum(c["score"] > r["score"] for c, r in zip(scored[::2], scored[1::2]))
    print(f"score: chosen above rejected for {wins}/{len(pairs)} pairs")
    assert wins / len(pairs) > 0.9
    assert main(["score", "--reward_model", str(reward_model), "--input", str(source)]) == 2  # never overwrites
    # the scorer renders a pair exactly as rm training did: its score is the model's score of the trained sequence
    train = build_datasets(DataArguments(dataset="dpo_demo", dataset_dir=str(data_dir), template="auto"), "rm", 0,
                           smol_tokenizer).train[0]
    scorer = RewardModelScorer(str(reward_model), "auto")
    prompt = smol_tokenizer.decode(train["prompt_ids"])
    pair = next(p for p in pairs if p["prompt"] in prompt)
    ids = scorer.encode("", [{"role": "user", "content": pair["prompt"]}], pair["chosen"])
    assert ids == train["prompt_ids"] + train["chosen_ids"]
    with torch.no_grad():
        direct = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([ids]) == [pytest.approx(direct, abs=1e-6)]


def test_ppo_runs_grpo_with_a_lora_reward_model_and_builtins(reward_model, tiny_llama_dir, data_dir, tmp_path):
    lora_rm = tmp_path / "rm-lora"
    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset_dir", str(data_dir), "--save_strategy", "no",
              "--logging_steps", "1"]
    assert main(["train", "--stage", "rm", *common, "--dataset", "dpo_demo", "--max_steps", "2",
                 "--output_dir", str(lora_rm)]) == 0
    from safetensors.torch import load_file

    saved = {k: v for k, v in load_file(lora_rm / "adapter_model.safetensors").items() if "score" in k}
    assert len(saved) == 1  # the trained head travels with the adapter, and the scorer uses it
    assert torch.equal(RewardModelScorer(str(lora_rm), "auto").model.score.weight, next(iter(saved.values())))
    for rm in (reward_model, lora_rm):
        out = tmp_path / f"ppo-{rm.name}"
        assert main(["train", "--stage", "ppo", *common, "--dataset", "rl_demo", "--reward_model", str(rm),
                     "--reward_funcs", "exact_match,length", "--reward_weights", "1,1,0.5", "--num_generations", "2",
                     "--max_new_tokens", "4", "--per_device_train_batch_size", "4", "--max_steps", "2",
                     "--output_dir", str(out)]) == 0
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        assert {"rewards/reward_model/mean", "rewards/exact_match/mean", "rewards/length/mean"} <= log[0].keys()
        assert all(torch.isfinite(torch.tensor(r["reward"])) for r in log if "reward" in r)
        assert (out / "adapter_model.safetensors").is_file()
