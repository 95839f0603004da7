"""The Train tab's data preview: a few rows rendered and tokenized exactly as training would (the data doctor's
code), with the tokens that carry loss marked, as HTML."""

from __future__ import annotations

import copy
import html
from typing import Any

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError

Pieces = list[tuple[bool, str]]  # (carries loss, text) in order
MARK = '<mark style="background:#bbf7d0;color:#14532d;border-radius:3px">'


def preview_examples(config: TrainConfig, rows: int = 3) -> list[Pieces]:
    """The first `rows` examples of the configured data, cut into trained and untrained pieces."""
    from lmforge.data.doctor import trained_runs
    from lmforge.data.pipeline import LoadReport, load_conversations
    from lmforge.model.loader import load_tokenizer
    from lmforge.stages import STAGES

    stage = config.finetuning.stage
    if not config.finetuning.spec.doctor:
        covered = " and ".join(name for name, spec in STAGES.items() if spec.doctor)
        raise LmforgeError(f"the preview covers stage {covered} (as `lmforge data check`); stage {stage} is not")
    if not config.data.dataset:
        raise LmforgeError("pick a dataset to preview")
    args = copy.copy(config.data)
    args.max_samples, args.skip_invalid_examples, args.streaming = rows, True, False
    tokenizer = load_tokenizer(config.model)
    ds = load_conversations(args.dataset, args, stage, config.training.seed, None, LoadReport())
    ds = ds.select(range(min(rows, len(ds))))
    if config.finetuning.spec.template:
        encoded = _encode_sft(ds, args, tokenizer)
    else:
        encoded = _encode_pt(ds, tokenizer)
    return [trained_runs(tokenizer, ids, labels) for ids, labels in encoded]


def _encode_sft(ds: Any, args: Any, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    from lmforge.data.processors import MaskPolicy, Status, encode_sft_batch
    from lmforge.data.templates import template_for

    template = template_for(args, tokenizer)
    policy = MaskPolicy(args.cutoff_len, args.train_on_prompt, args.mask_history)
    out = encode_sft_batch({"_system": ds["_system"], "_messages": ds["_messages"]}, tokenizer, template, policy)
    return [(ids, labels) for ids, labels, status in zip(out["input_ids"], out["labels"], out["_status"])
            if status != Status.DROPPED]


def _encode_pt(ds: Any, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Stage pt takes loss on every token of BOS text EOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = tokenizer([t for t in ds["_text"] if t], add_special_tokens=False)["input_ids"]
    return [(bos + doc + eos, bos + doc + eos) for doc in docs]


def pieces_html(pieces: Pieces) -> str:
    """One example as preformatted HTML with the trained pieces marked."""
    body = "".join(f"{MARK}{html.escape(text)}</mark>" if trained else html.escape(text) for trained, text in pieces)
    return f'<pre style="white-space:pre-wrap;word-break:break-word;margin:0 0 12px 0">{body}</pre>'


def preview_html(examples: list[Pieces]) -> str:
    """Every example, with a legend; marked text is what the loss is taken on."""
    if not examples:
        return "<p>no rows to show (every row was invalid or dropped by cutoff_len)</p>"
    legend = f"<p>{len(examples)} example(s) as training sees them; {MARK}marked</mark> tokens carry the loss.</p>"
    return legend + "".join(pieces_html(p) for p in examples)


def error_html(message: str) -> str:
    """A one-line error in place of the preview."""
    return f'<p style="color:#b91c1c">{html.escape(message)}</p>'
