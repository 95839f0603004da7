"""Vocabulary safety: a template whose markers the tokenizer would split (llama3 on SmolLM2's ChatML tokenizer)
stops with one line, or with resize_vocab adds them as special tokens, grows the embeddings (new rows at the
mean) and trains them."""

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.cli import main
from lmforge.model.loader import grow_embeddings

ROOT = Path(__file__).resolve().parents[2]
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def train(tmp_path, model_dir, *extra):
    return main(["train", "--model_name_or_path", str(model_dir), "--dataset", "alpaca_demo", "--dataset_dir",
                 str(ROOT / "data"), "--template", "llama3", "--output_dir", str(tmp_path / "out"), "--max_steps",
                 "2", "--save_strategy", "no", "--report_to", "none", "--max_samples", "8", *extra])


def test_split_markers_stop_the_run_in_one_line(tmp_path, tiny_llama_dir, capsys):
    assert train(tmp_path, tiny_llama_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmforge: error: template llama3: <|start_header_id|>, <|end_header_id|>, <|eot_id|>")
    assert "set resize_vocab: true" in err[-1]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_resize_vocab_adds_the_markers_and_trains_their_rows(tmp_path, tiny_llama_dir):
    assert train(tmp_path, tiny_llama_dir, "--resize_vocab", "true", "--learning_rate", "1e-2") == 0
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert len(tokenizer) == len(base) + len(MARKERS)
    assert all(len(tokenizer(m, add_special_tokens=False)["input_ids"]) == 1 for m in MARKERS)
    weights = load_file(out / "adapter_model.safetensors")
    embed = next(v for k, v in weights.items() if "embed_tokens" in k)
    assert embed.shape[0] == len(tokenizer)  # the grown embeddings are saved with the adapter
    old = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight
    assert not torch.allclose(embed[-len(MARKERS):], old.mean(dim=0).expand(len(MARKERS), -1))  # they learned


def test_new_rows_start_at_the_mean_embedding(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    grow_embeddings(model, old.shape[0] + 3)
    new = model.get_input_embeddings().weight
    assert torch.equal(new[:old.shape[0]], old)
    assert torch.allclose(new[old.shape[0]:], old.mean(dim=0).expand(3, -1))
