"""`make demo`: ask the base model who it is, teach it a new identity with LoRA SFT, ask again."""

from __future__ import annotations

import copy
import time
from typing import Any

from lmforge.config import GenerationArguments, ModelArguments, TrainConfig
from lmforge.serve.chat import ChatEngine, load_for_inference

QUESTIONS = ("Who are you?", "你是谁？")
UNSEEN = "Could you tell me what your name is and who built you?"


def ask(model_args: ModelArguments, template: str, questions: tuple[str, ...]) -> dict[str, str]:
    """Greedy one-turn answers, so the before/after comparison is repeatable."""
    tokenizer, model = load_for_inference(copy.deepcopy(model_args))
    engine = ChatEngine(tokenizer, model, GenerationArguments(template=template, temperature=0.0, max_new_tokens=48,
                                                              repetition_penalty=1.0))
    return {q: engine.reply([{"role": "user", "content": q}]).strip() for q in questions}


def _show(title: str, answers: dict[str, str]) -> None:
    print(f"\n=== {title} ===")
    for question, answer in answers.items():
        print(f"Q: {question}\nA: {answer}\n")


def run_demo(config: TrainConfig) -> dict[str, Any]:
    """Ask the base model, train LoRA SFT on the identity data, ask again, and print what changed."""
    from lmforge.train.recipe import run_stage

    start = time.perf_counter()
    template = config.data.template
    before = ask(config.model, template, QUESTIONS)
    _show("base model, before training", before)
    results = run_stage(config)
    out = config.training.output_dir
    trained_args = copy.deepcopy(config.model)
    trained_args.adapter_name_or_path = out
    after = ask(trained_args, template, (*QUESTIONS, UNSEEN))
    _show(f"after LoRA SFT on the identity data (name: {config.data.identity_name})", after)
    minutes = (time.perf_counter() - start) / 60
    print(f"Demo finished in {minutes:.1f} min: train_loss {results.get('train_loss', float('nan')):.3f}")
    print(f"Outputs: {out} (adapter, tokenizer, trainer_log.jsonl, training_loss.png, README.md)")
    print("Next:")
    print(f"  lmforge chat --adapter_name_or_path {out}")
    print(f"  lmforge export --adapter_name_or_path {out} --export_dir {out}-merged")
    print(f"  lmforge export --adapter_name_or_path {out} --export_dir {out}-gguf --export_format gguf "
          "--export_ollama true   # llama.cpp / Ollama")
    return {"before": before, "after": after, "results": results, "minutes": minutes}
