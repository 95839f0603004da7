"""Reward sources for grpo: a reward model trained with stage rm, built-in functions, and `module:function`.

Every source is a callable in TRL's convention: keyword lists `prompts`, `completions`, `completion_ids`
and one list per data column (here `answer`, `_system`, `_messages`, `prompt_length` and the columns the
format kept) -> one float per completion (None: not applicable to that row).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.config import ModelArguments, RLArguments
from lmforge.data.pairwise import answer_tokens
from lmforge.data.templates import get_template
from lmforge.errors import LmforgeError
from lmforge.model.adapters import fill_base_model, load_merged

RewardFunc = Callable[..., list[float | None]]
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def normalise(text: str) -> str:
    """Collapse whitespace and case, so answers compare by content."""
    return " ".join(text.split()).casefold()


def extract_answer(completion: str) -> str:
    """The last <answer>...</answer> part of a completion, or the whole completion."""
    tagged = ANSWER_TAG.findall(completion)
    return tagged[-1] if tagged else completion


def exact_match(completions: list[str], answer: list[str] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's answer equals the row's `answer` (case and spacing ignored), else 0.0;
    None for rows without an answer."""
    answers = answer or [""] * len(completions)
    return [float(normalise(extract_answer(c)) == normalise(a)) if a else None for c, a in zip(completions, answers)]


class FormatReward:
    """1.0 when the whole completion matches `pattern` (dot matches newlines), else 0.0."""

    __name__ = "format"

    def __init__(self, pattern: str):
        try:
            self.regex = re.compile(pattern, re.S)
        except re.error as err:
            raise LmforgeError(f"reward_format_regex {pattern!r} is not a valid regular expression: {err}") from None

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        return [float(self.regex.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(max_new_tokens: int) -> RewardFunc:
    """DAPO's soft overlong penalty (TRL's): 0 up to 3/4 of max_new_tokens, then down to -1 at the limit."""
    from trl.rewards import get_soft_overlong_punishment

    reward = get_soft_overlong_punishment(max_new_tokens, max(1, max_new_tokens // 4))
    reward.__name__ = "length"
    return reward


def import_function(spec: str) -> RewardFunc:
    """`module:function` (importable from the working directory or the Python path) or `file.py:function`."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise LmforgeError(f"reward_funcs: '{spec}' must be module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise LmforgeError(f"reward_funcs: file {module_name} not found")
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise LmforgeError(f"reward_funcs: cannot import {module_name} ({err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise LmforgeError(f"reward_funcs: {module_name} has no function '{name}'")
    return function


class RewardModelScorer:
    """A reward model (stage rm's output_dir: full model or LoRA adapter) scoring prompt + completion rendered
    with the chat template exactly as its training pairs were: the prompt turns, then the completion as the
    assistant's turn, up to the end of that turn."""

    __name__ = "reward_model"

    def __init__(self, path: str, template: str, device: Any = "cpu", batch_size: int = 8):
        self.tokenizer, self.model = load_merged(reward_model_args(path), reward_head=True)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # the score is read at the last non-pad token
        self.model.to(device).requires_grad_(False)
        self.template = get_template(template, self.tokenizer)
        self.device, self.batch_size = device, batch_size

    def encode(self, system: str, messages: list[dict[str, str]], completion: str) -> list[int]:
        ids, _, end = answer_tokens(self.template, self.tokenizer, system or "", messages, completion)
        return ids[:end]

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> list[float]:
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(chunk):
                ids[i, :len(seq)], mask[i, :len(seq)] = torch.as_tensor(seq), 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits  # (B, 1)
            scores += logits[:, 0].float().tolist()
        return scores

    def __call__(self, completions: list[str], _system: list[str], _messages: list[list[dict[str, str]]],
                 **kwargs: Any) -> list[float]:
        return self.score([self.encode(s, m, c) for s, m, c in zip(_system, _messages, completions)])


def reward_model_args(path: str) -> ModelArguments:
    """Model arguments that load an rm output_dir: its LoRA adapter on the recorded base, or the full model."""
    if not Path(path).is_dir():
        raise LmforgeError(f"reward model {path} is not a folder: give the output_dir of an rm run")
    if (Path(path) / "adapter_config.json").is_file():
        args = ModelArguments(adapter_name_or_path=path)
        fill_base_model(args)
        return args
    return ModelArguments(model_name_or_path=path)


def build_reward_funcs(rl: RLArguments, template: str, device: Any = "cpu") -> list[RewardFunc]:
    """Every reward source in order: reward_model first, then reward_funcs."""
    funcs: list[RewardFunc] = [RewardModelScorer(rl.reward_model, template, device)] if rl.reward_model else []
    builtins: dict[str, Callable[[], RewardFunc]] = {
        "exact_match": lambda: exact_match,
        "format": lambda: FormatReward(rl.reward_format_regex),
        "length": lambda: length_penalty(rl.max_new_tokens),
    }
    for name in rl.functions:
        funcs.append(builtins[name]() if name in builtins else import_function(name))
    return funcs
