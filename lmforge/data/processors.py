"""Token ids and labels. sft: render, tokenize the whole text once, label by character spans, cut
whole turns at cutoff_len. pt: add BOS/EOS, concatenate, cut into blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from lmforge.data.templates import Rendered, Renderer

IGNORE_INDEX = -100


class Status(enum.IntEnum):
    """What cutoff_len did to an example; stored as its integer in the `_status` column."""

    KEPT = 0
    TRUNCATED = 1
    DROPPED = 2


@dataclass(frozen=True)
class MaskPolicy:
    """How SFT examples are cut (cutoff_len None: not at all) and which tokens are masked out of the loss."""
    cutoff_len: int | None
    train_on_prompt: bool = False
    mask_history: bool = False


def token_roles(rendered: Rendered, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per token: the turn it belongs to, and whether it lies in that turn's response.

    A token is a response token when any of its characters is: a token that straddles the prompt/
    response boundary is one the model has to produce.
    """
    n = len(rendered.text)
    char_turn = np.zeros(n + 1, dtype=np.int32)
    char_resp = np.zeros(n + 1, dtype=np.int32)
    for k, turn in enumerate(rendered.turns):
        char_turn[turn.start:] = k
        char_resp[turn.response_start:turn.response_end] = 1
    resp_prefix = np.concatenate([[0], np.cumsum(char_resp)])
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    in_response = (resp_prefix[np.maximum(ends, starts + 1).clip(max=n)] - resp_prefix[starts.clip(max=n)]) > 0
    return char_turn[starts.clip(max=n)], in_response


def cut_turns(turn_of: np.ndarray, in_response: np.ndarray, cutoff: int | None) -> tuple[int, int, Status]:
    """(tokens kept, last kept turn, status): whole turns from the start; else the first reply is cut."""
    n = len(turn_of)
    if cutoff is None or n <= cutoff:
        return n, int(turn_of[-1]) if n else 0, Status.KEPT
    ends = np.searchsorted(turn_of, np.arange(turn_of.max() + 1), side="right")  # token end of each turn
    fitting = np.nonzero(ends <= cutoff)[0]
    if len(fitting):
        last = int(fitting[-1])
        return int(ends[last]), last, Status.TRUNCATED
    first_response = np.nonzero(in_response & (turn_of == 0))[0]
    if len(first_response) and first_response[0] < cutoff:
        return cutoff, 0, Status.TRUNCATED
    return 0, 0, Status.DROPPED


def encode_conversation(rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]],
                        policy: MaskPolicy, eos_id: int | None = None) -> tuple[list[int], list[int], Status]:
    """(input_ids, labels, status) for one rendered conversation tokenized as a whole. With an efficient_eos
    template the token that opens each later prompt is labelled EOS (LLaMA-Factory's rule): the reply before
    it learns to stop there."""
    turn_of, in_response = token_roles(rendered, offsets)
    keep, last_turn, status = cut_turns(turn_of, in_response, policy.cutoff_len)
    if status == Status.DROPPED:
        return [], [], Status.DROPPED
    ids_kept = ids[:keep]
    if policy.train_on_prompt:
        trained = np.ones(keep, dtype=bool)
    else:
        trained = in_response[:keep].copy()
        if policy.mask_history:
            trained &= turn_of[:keep] == last_turn
    if not trained.any():
        return [], [], Status.DROPPED
    labels = np.where(trained, np.asarray(ids_kept, dtype=np.int64), IGNORE_INDEX)
    if rendered.eos_labels and eos_id is not None and not policy.train_on_prompt and not policy.mask_history:
        starts = np.fromiter((s for s, _ in offsets[:keep]), dtype=np.int64, count=keep)
        labels[np.isin(starts, rendered.eos_labels)] = eos_id
    return ids_kept, labels.tolist(), status


def encode_sft_batch(batch: dict[str, list[Any]], tokenizer: Any, template: Renderer,
                     policy: MaskPolicy) -> dict[str, list[Any]]:
    """Batched `datasets.map` function: `_system`, `_messages` -> input_ids, attention_mask, labels."""
    tools = batch.get("_tools") or [""] * len(batch["_system"])
    rendered = [template.render(s or "", m, t or "") for s, m, t in zip(batch["_system"], batch["_messages"], tools)]
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    eos_id = tokenizer.convert_tokens_to_ids(template.eos_token) if getattr(template, "eos_token", "") else None
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "attention_mask", "labels", "_status", "_loss_tokens")}
    for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids_kept, labels, status = encode_conversation(r, ids, offsets, policy, eos_id)
        out["input_ids"].append(ids_kept)
        out["attention_mask"].append([1] * len(ids_kept))
        out["labels"].append(labels)
        out["_status"].append(status)
        out["_loss_tokens"].append(sum(1 for x in labels if x != IGNORE_INDEX))
    return out


def pt_encoder(args: Any, tokenizer: Any) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Stage pt's batched tokenizer: blocks of cutoff_len, or whole documents when packing."""
    encode = encode_pt_documents if args.packing else encode_pt_batch
    return partial(encode, tokenizer=tokenizer, block_size=args.cutoff_len)


def sft_encoder(args: Any, tokenizer: Any) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Stage sft's batched tokenizer: conversations rendered with the template and masked by the policy."""
    from lmforge.data.templates import template_for

    policy = MaskPolicy(args.cutoff_len, args.train_on_prompt, args.mask_history)
    return partial(encode_sft_batch, tokenizer=tokenizer, template=template_for(args, tokenizer), policy=policy)


def encode_pt_batch(batch: dict[str, list[Any]], tokenizer: Any, block_size: int) -> dict[str, list[Any]]:
    """Batched map: documents -> BOS doc EOS, concatenated, cut into `block_size` blocks.

    The tail of each map batch shorter than a block is dropped, as in LLaMA-Factory and HF run_clm.
    """
    enc = tokenizer([t for t in batch["_text"] if t], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [tok for doc in enc for tok in (*bos, *doc, *eos)]
    usable = len(stream) // block_size * block_size
    blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
    out = {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}
    out["_status"] = [Status.KEPT] * len(blocks)
    out["_loss_tokens"] = [block_size] * len(blocks)
    return out


def encode_pt_documents(batch: dict[str, list[Any]], tokenizer: Any, block_size: int) -> dict[str, list[Any]]:
    """Batched map for pt with packing: BOS doc EOS per document, split into pieces of at most
    `block_size` tokens; documents are never joined here (packing isolates them later)."""
    enc = tokenizer([t for t in batch["_text"] if t], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = []
    for doc in enc:
        ids = [*bos, *doc, *eos]
        pieces += [ids[i:i + block_size] for i in range(0, len(ids), block_size) if len(ids[i:i + block_size]) > 1]
    return {"input_ids": pieces, "attention_mask": [[1] * len(p) for p in pieces], "labels": pieces,
            "_status": [Status.KEPT] * len(pieces), "_loss_tokens": [len(p) for p in pieces]}
