"""chat (one-shot, streaming, REPL) and export (merge checked, refusal to overwrite) on tiny models."""

import io
import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import GenerationArguments, ModelArguments
from lmforge.data.templates import get_template
from lmforge.serve.chat import ChatEngine, load_for_inference, run_repl

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Tell me about bonds."}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter trained 3 steps with a large learning rate, so merging changes the logits."""
    out = tmp_path_factory.mktemp("adapter") / "lora"
    assert main(["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "alpaca_demo", "--dataset_dir",
                 str(ROOT / "data"), "--template", "chatml", "--max_steps", "3", "--learning_rate", "5e-2",
                 "--lora_rank", "4", "--output_dir", str(out), "--save_strategy", "no"]) == 0
    return out


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    tokenizer, model = load_for_inference(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    return ChatEngine(tokenizer, model, GenerationArguments(max_new_tokens=12, repetition_penalty=1.0))


def test_prompt_is_rendered_by_the_training_template(engine):
    ids = engine._inputs(MESSAGES)["input_ids"][0].tolist()
    expected = get_template("auto", engine.tokenizer).render_prompt("", MESSAGES)
    assert engine.tokenizer.decode(ids) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_streaming_yields_pieces_that_add_up_to_the_reply(engine):
    pieces = list(engine.stream(MESSAGES))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.reply(MESSAGES)  # greedy: the same text both ways


def test_one_shot_query_prints_only_the_answer(tiny_llama_dir, engine, capsys):
    assert main(["chat", "--model_name_or_path", str(tiny_llama_dir), "--query", "Tell me about bonds.",
                 "--max_new_tokens", "12", "--repetition_penalty", "1.0"]) == 0
    assert capsys.readouterr().out.strip() == engine.reply(MESSAGES).strip()


class RecordingEngine:
    tools = ""

    def __init__(self):
        self.calls = []

    def stream(self, messages):
        self.calls.append([m["content"] for m in messages])
        yield "ok"


def test_repl_keeps_history_and_understands_clear_and_exit():
    engine, out = RecordingEngine(), io.StringIO()
    run_repl(engine, io.StringIO("hi\nmore\nclear\nagain\nexit\nnever\n"), out)
    assert engine.calls == [["hi"], ["hi", "ok", "more"], ["again"]]
    assert "History cleared." in out.getvalue()


def test_export_merges_exactly_and_loads_with_plain_transformers(tiny_llama_dir, adapter_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", "--adapter_name_or_path", str(adapter_dir), "--export_dir", str(out)]) == 0
    assert "max |layer output difference| vs base+adapter (float64)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.arange(5, 40).view(1, -1)  # (1, T)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        reference = PeftModel.from_pretrained(base, adapter_dir)  # injects the adapter into `base` in place
        expected, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (expected - plain).abs().max() > 1e-2  # the adapter mattered
    assert "{%- if messages" in AutoTokenizer.from_pretrained(out).chat_template  # chatml, as trained
    assert "Trained with lmforge" in (out / "README.md").read_text()
    # and it chats
    assert main(["chat", "--model_name_or_path", str(out), "--query", "hi", "--max_new_tokens", "4"]) == 0


def test_export_refuses_a_non_empty_dir_and_a_non_adapter(adapter_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", "--adapter_name_or_path", str(adapter_dir), "--export_dir", str(out)]) == 2
    assert "export_dir" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert main(["export", "--adapter_name_or_path", str(tmp_path), "--export_dir", str(tmp_path / "x")]) == 2
    assert "is not a LoRA adapter" in capsys.readouterr().err


def test_export_shards_by_export_size(tiny_llama_dir, tmp_path):
    out = tmp_path / "sharded"
    assert main(["export", "--model_name_or_path", str(tiny_llama_dir), "--export_dir", str(out),
                 "--export_size", "0.002"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    from lmforge.config import parse_train_config
    from lmforge.demo import QUESTIONS, UNSEEN, run_demo

    config = parse_train_config([str(ROOT / "examples" / "demo_identity.yaml"), "--model_name_or_path",
                                 str(tiny_llama_dir), "--max_steps", "2", "--logging_steps", "1",
                                 "--output_dir", str(tmp_path / "demo")])
    result = run_demo(config)
    assert set(result["before"]) == set(QUESTIONS) and set(result["after"]) == {*QUESTIONS, UNSEEN}
    text = capsys.readouterr().out
    assert "base model, before training" in text and "lmforge chat --adapter_name_or_path" in text
    assert (tmp_path / "demo" / "training_loss.png").is_file()


def test_export_refuses_an_adapter_whose_weights_do_not_load(adapter_dir, tmp_path, capsys):
    """peft only warns about unmatched keys and leaves lora_B at zero: the base would be exported unchanged."""
    import shutil

    from safetensors.torch import load_file, save_file

    wrong = Path(shutil.copytree(adapter_dir, tmp_path / "wrong"))
    weights = load_file(wrong / "adapter_model.safetensors")
    save_file({k.replace("layers", "blocks"): v for k, v in weights.items()}, wrong / "adapter_model.safetensors")
    out = tmp_path / "merged"
    assert main(["export", "--adapter_name_or_path", str(wrong), "--export_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{wrong}: adapter weight" in err and "blocks" in err and "matches no parameter" in err
    assert not out.exists()
