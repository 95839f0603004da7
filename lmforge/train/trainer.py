"""`transformers.Trainer` plus real-token throughput, padding and packing figures in every log."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from lmforge.data.collator import COUNT_KEYS, drop_redundant_mask
from lmforge.data.shard_reader import BlockOrder, TokenBlocks
from lmforge.errors import LmforgeError
from lmforge.train import checkpoints as ckpt
from lmforge.train.loss import capture_head_input, chunkable_head, linear_cross_entropy
from lmforge.train.stream_state import StreamPosition

LARGE_VOCAB = 32_000
# the masks that count real tokens in batches built by TRL's collators: whole sequences, else prompt + completion
MASK_KEYS = (("attention_mask", "KL_attention_mask"), ("prompt_mask", "completion_mask"))
logger = logging.getLogger(__name__)


def is_mixture_of_experts(model: torch.nn.Module) -> bool:
    """Whether the model routes tokens to experts (then DDP must look for unused parameters)."""
    config = getattr(model, "config", None)
    return any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts"))


class EngineMixin:
    """Every guarantee lmforge gives, for every trainer, whether it extends `transformers.Trainer` or a TRL
    trainer: checkpoints staged in output_dir/.staging with a manifest and renamed into place, rotation that
    never removes the resume source, the NaN/inf policy decided once for all processes, tokens/s and padding
    in every log, FSDP2 on CPU, engine-gathered weights saved without tied copies, and a log line naming
    the engine, and a streamed training set's position saved in each checkpoint (resumed without re-reading)."""

    def __init__(self, *args: Any, fingerprint: dict[str, Any] | None = None, nan_policy: str = "stop",
                 pack_size: int | None = None, **kwargs: Any):
        train_args, model = kwargs.get("args"), kwargs.get("model")
        if train_args is not None and train_args.ddp_find_unused_parameters is None:
            # set before Trainer.__init__ builds the DDP options from it. LoRA, freeze and full tuning use every
            # trainable parameter in each forward, so DDP's search for unused ones (transformers' default) is
            # an extra graph walk per step; mixture-of-experts layers can leave experts unrouted, so they keep it
            train_args.ddp_find_unused_parameters = is_mixture_of_experts(model)
        if (train_args is not None and isinstance(kwargs.get("train_dataset"), datasets.IterableDataset)
                and train_args.accelerator_config.dispatch_batches is None):
            # each process reads its own share of a stream: rank 0 fetching every process's batch and
            # concatenating them fails on batches padded to different lengths, and keeps no position per process
            train_args.accelerator_config.dispatch_batches = False
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint or {"config": ""}
        self.nan_policy = nan_policy
        self.pack_size = pack_size
        self.protected: set[str] = set()  # the checkpoint being resumed from: never rotated away
        self.guard = NonFiniteGuard(self)
        self.add_callback(self.guard)
        self.add_callback(EngineReport(self))
        self.stream_position = StreamPosition(self)
        self.add_callback(self.stream_position)
        self._counts: dict[str, Any] = {"real": 0, "positions": 0, "rows": 0}
        self._start = time.perf_counter()
        self._last_log = (self._start, {k: 0.0 for k in self._counts})

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate enables FSDP on accelerators only; torch's fully_shard itself runs on CPU with gloo
            from accelerate.utils import FullyShardedDataParallelPlugin

            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled and self.args.use_cpu):
            return super().save_model(output_dir, _internal_call)
        # FSDP2 on CPU: gathered tensors would alias buffers that fully_shard frees again, so gather copies
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        state_dict = {k: v.clone() for k, v in get_model_state_dict(self.model, options=options).items()}
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if state_dict is not None:  # gathered by an engine (DeepSpeed): tied weights arrive as separate copies
            state_dict = drop_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Save into output_dir/.staging, write a manifest, then rename the whole folder into place."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staged, final = run_dir / ckpt.STAGING / name, run_dir / name
        existing = ckpt.checkpoints(run_dir)
        needed = ckpt.folder_size(existing[-1]) if existing else 4 * sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        ckpt.ensure_disk_space(run_dir, int(needed * 1.1))
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left over from a run killed while saving
        self.accelerator.wait_for_everyone()
        output_dir, limit = self.args.output_dir, self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(run_dir / ckpt.STAGING), None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = output_dir, limit
        self.stream_position.save(staged, self.args.process_index, self.args.world_size)
        self.accelerator.wait_for_everyone()
        # transformers recorded the best checkpoint under .staging; point it (and its saved copy) at the final path
        best = self.state.best_model_checkpoint = ckpt.unstaged_path(self.state.best_model_checkpoint, run_dir)
        # Every process that saved (global rank 0; with save_on_each_node each node's local rank 0, as nodes may
        # not share a file system) finishes its node's copy, one node after another: on a shared file system
        # the first node's rename leaves nothing staged for the next.
        nodes, node = self._node_layout()
        for turn in range(nodes):
            if self.args.should_save and node == turn and staged.is_dir():
                self._finish_staged(staged, final, best, limit)
            self.accelerator.wait_for_everyone()

    def _node_layout(self) -> tuple[int, int]:
        """(nodes that save their own checkpoint, this process's node index)."""
        if not self.args.save_on_each_node:
            return 1, 0
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, self.args.world_size // per_node), self.args.process_index // per_node

    def _finish_staged(self, staged: Path, final: Path, best: str | None, limit: int | None) -> None:
        """Record the best checkpoint, write the manifest, rename the staged folder into place, rotate."""
        ckpt.record_best(staged, best)
        ckpt.write_manifest(staged, self.fingerprint, self.state.global_step)
        if final.exists():
            shutil.rmtree(final)  # a stale checkpoint of the same step from an earlier, abandoned run
        staged.rename(final)
        keep = self.protected | ({str(Path(best).resolve())} if best else set())  # never rotate the best away
        ckpt.rotate(final.parent, limit, keep)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (isinstance(dataset, TokenBlocks) and self.args.train_sampling_strategy == "random"
                and self.args.accelerator_config.use_seedable_sampler):
            return BlockOrder(len(dataset), self.args.data_seed)  # the same order, without a list per block
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> Any:
        """The Trainer's loader; for a stream whose position can be saved, its batches carry that position."""
        self.stream_position.attach(None)
        if not self.stream_position.trackable(self.train_dataset, self.args, self.accelerator.dispatch_batches):
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        if workers > 0:  # the workers hold the stream: torchdata's loader keeps their positions
            config = self.accelerator.dataloader_config
            config.use_stateful_dataloader = True
            try:
                loader = super().get_train_dataloader()
            finally:
                config.use_stateful_dataloader = False
            self.stream_position.attach(loader, workers)
            return loader
        collate = self.data_collator
        self.data_collator = self.stream_position.marking(collate)
        try:
            loader = super().get_train_dataloader()
        finally:
            self.data_collator = collate
        self.stream_position.attach(loader)
        return loader

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        """(epoch to start in, batches to skip in it): a stream resumes from its saved position, skipping none."""
        start = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                             resume_from_checkpoint, trial)
        if self.stream_position.source is None or self.args.ignore_data_skip:
            return start
        return self.stream_position.resume(resume_from_checkpoint, self.args.process_index, self.args.world_size,
                                           start)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        if self.stream_position.loader is not None:
            epoch_iterator = self.stream_position.marked(epoch_iterator)
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.stream_position.handed_out(batches)
        return batches, num_items

    def train(self, resume_from_checkpoint: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint:
            self.protected.add(str(Path(resume_from_checkpoint).resolve()))
        self._start = time.perf_counter()
        self._last_log = (self._start, dict(self._counts))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        drop_redundant_mask(inputs)
        if not model.training:
            return self._model_loss(model, inputs, return_outputs, num_items_in_batch)
        self._count_batch(inputs)
        result = self._model_loss(model, inputs, return_outputs, num_items_in_batch)
        self.guard.record_loss(result[0] if isinstance(result, tuple) else result)
        return result

    def _model_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        """The loss itself: the trainer's own (TRL's for its stages); LmforgeTrainer's may be chunked."""
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _count_batch(self, inputs: dict[str, Any]) -> None:
        """Real tokens, positions and rows of a training batch: lmforge's collators count what they built (the
        counts are removed before the forward); TRL's batches are counted from their attention masks."""
        if COUNT_KEYS[0] in inputs:
            self._add_counts(*(inputs.pop(k) for k in COUNT_KEYS))
            return
        keys = [k for k in MASK_KEYS[0] if k in inputs] or [k for k in MASK_KEYS[1] if k in inputs]
        masks = [inputs[k] for k in keys if isinstance(inputs[k], torch.Tensor) and inputs[k].dim() == 2]
        if masks:
            self._add_counts(sum(m.sum() for m in masks), sum(m.numel() for m in masks), masks[0].shape[0])

    def _add_counts(self, real: Any, positions: Any, rows: Any) -> None:
        """Accumulate without a host sync: device tensors are summed as tensors, read at the next log."""
        for key, value in (("real", real), ("positions", positions), ("rows", rows)):
            self._counts[key] = self._counts[key] + (value.sum() if isinstance(value, torch.Tensor) else value)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        for key in COUNT_KEYS:
            inputs.pop(key, None)
        drop_redundant_mask(inputs)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            since, before = self._last_log
            counts = {k: float(v) for k, v in self._counts.items()}
            real, positions = counts["real"] - before["real"], counts["positions"] - before["positions"]
            if positions:
                logs["tokens_per_second"] = round(real / max(now - since, 1e-9), 1)
                logs["padding_fraction"] = round(1 - real / positions, 4)
            rows = counts["rows"] - before["rows"]
            if self.pack_size and rows:
                logs["packing_efficiency"] = round(real / (rows * self.pack_size), 4)
            logs["elapsed_s"] = round(now - self._start, 2)
            for key, value in (("skipped_steps", self.guard.skipped), ("overflow_steps", self.guard.overflows)):
                if value:
                    logs[key] = value
            self._last_log = (now, counts)
        super().log(logs, start_time)


class LmforgeTrainer(EngineMixin, Trainer):
    """The pt/sft trainer: lmforge's guarantees plus the chunked loss (no [batch, seq, vocab] logits).

    Loss normalisation is the Trainer's own: with `num_items_in_batch` the loss is the mean over all
    loss tokens of the optimizer step, so gradient accumulation equals one larger batch.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_head = self._choose_loss_head()

    def _choose_loss_head(self) -> Any:
        """The head for chunked loss, or None for the model's own loss (see `loss_chunking`)."""
        mode = getattr(self.args, "loss_chunking", "off")
        if mode == "off" or self.args.use_liger_kernel or not self.model_accepts_loss_kwargs:
            return None
        if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled() or self.is_fsdp_enabled:
            # the head's weight is a shard outside its own forward, so the model computes its loss
            logger.info("loss: the model's own (chunked loss needs the whole head; ZeRO-3 and FSDP shard it)")
            return None
        head = chunkable_head(self.model)
        if head is None or (mode == "auto" and head.weight.shape[0] < LARGE_VOCAB):
            return None
        logger.info("loss: chunked linear cross-entropy (no [batch, seq, %d] logits)", head.weight.shape[0])
        return head

    def _model_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        if getattr(self, "loss_head", None) is None or not model.training or "labels" not in inputs:
            return super()._model_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        with capture_head_input(self.loss_head) as captured:
            outputs = model(**inputs, use_cache=False)
        loss = linear_cross_entropy(captured["hidden"], self.loss_head, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: the gradient all-reduce averages, the token count was summed
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


def drop_tied_copies(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict without second names of one shared parameter (lm_head tied to the embeddings),
    as `save_pretrained` writes it when it takes the parameters from the model itself."""
    seen: set[int] = set()
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            copies.add(name)
        seen.add(id(param))
    return {k: v for k, v in state_dict.items() if k not in copies}


class EngineReport(TrainerCallback):
    """Logs once which engine trains and on how many processes, from the prepared model itself."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        processes = self.trainer.accelerator.num_processes
        if processes == 1 or not state.is_world_process_zero:
            return
        if self.trainer.is_deepspeed_enabled:
            zero = self.trainer.accelerator.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            offload = [k[len("offload_"):] for k in ("offload_optimizer", "offload_param")
                       if (zero.get(k) or {}).get("device", "none") != "none"]
            engine = f"DeepSpeed ZeRO-{zero.get('stage', 0)}" + (f" (offload {', '.join(offload)})" if offload else "")
        elif self.trainer.is_fsdp_enabled:
            params = list(self.trainer.model.parameters())
            sharded = sum(type(p).__name__ == "DTensor" for p in params)  # FSDP2 turns each into a DTensor shard
            engine = f"FSDP{args.fsdp_config.get('version', 1)} ({sharded}/{len(params)} parameter tensors sharded)"
        else:
            engine = "DDP"
        logger.info("engine: %s on %d processes (%s)", engine, processes, torch.distributed.get_backend())


class NonFiniteGuard(TrainerCallback):
    """nan_policy, decided once per optimizer step for every process.

    Each micro-batch's loss is checked on the device (no host sync); before the update the flags and the
    gradients' finiteness are all-reduced, so every rank stops, or skips the update, together (a rank that
    left the step alone would hang the others in the next collective). Under fp16 the loss scaler owns
    overflowing gradients: it skips such steps itself, and they are counted as overflow_steps.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.losses: list[torch.Tensor] = []  # per micro-batch: 1 where the loss was not finite
        self.skipped = 0
        self.overflows = 0

    def record_loss(self, loss: torch.Tensor) -> None:
        """Note whether this micro-batch's loss is finite (a device tensor; read before the update)."""
        self.losses.append((~torch.isfinite(loss.detach())).any())

    def _gradients_bad(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        if self.trainer.accelerator.scaler is not None or not params:
            return None  # fp16: inf gradients are the scaler's to skip
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        # one fused max-|g| per dtype and device (not a kernel per tensor); it cannot overflow as an L2 norm
        # of finite fp16 values can, and a NaN anywhere makes it NaN
        return ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        params = [p for p in self.trainer.model.parameters() if p.grad is not None]
        losses, self.losses = self.losses, []
        device = args.device
        flags = torch.zeros(2, device=device)  # [a loss was not finite, a gradient was not finite]
        if losses:
            flags[0] = torch.stack(losses).any().to(device)
        grads_bad = self._gradients_bad(params)
        if grads_bad is not None:
            flags[1] = grads_bad.to(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_loss, bad_grads = flags.tolist()  # one host sync per optimizer step
        if not (bad_loss or bad_grads):
            return
        where = f"optimizer step {state.global_step + 1}"
        if bad_loss:
            local = [i + 1 for i, flag in enumerate(torch.stack(losses).tolist()) if flag] if losses else []
            what = f"non-finite loss at {where}" + (f", micro-batch {local[0]}" if local else " (another process)")
        else:
            what = f"non-finite gradients at {where}"
        if self.trainer.nan_policy == "stop":
            raise LmforgeError(f"{what}: stopped before the update; nothing new was saved and the last good "
                               "checkpoint is kept (set nan_policy: skip to skip such steps)")
        for p in params:
            p.grad = None  # the optimizer leaves every weight as it is
        self.skipped += 1
        logger.warning("%s: update skipped on every process (%d so far)", what, self.skipped)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.accelerator.scaler is not None and self.trainer.accelerator.optimizer_step_was_skipped:
            self.overflows += 1  # fp16 loss-scale overflow: normal, the scaler lowers the scale and goes on
