"""LLaMA-Factory's options in lmforge: every option of LLaMA-Factory 0.9.5's train, chat, export and eval
arguments is one of lmforge's own (same name, same meaning), an ALIASES entry, or an entry of LF_OPTIONS:
renamed, accepted where its value is what lmforge does anyway, or refused with the reason.
`python -m lmforge.config.llamafactory --lf-table` writes docs/llamafactory_options.md from these tables;
tests/unit/test_lf_options.py keeps all three in step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import yaml

from lmforge.config.parser import (
    ALIASES,
    API_GROUPS,
    CHAT_GROUPS,
    DOCTOR_GROUPS,
    EVAL_GROUPS,
    EXPORT_GROUPS,
    GROUPS,
    all_option_names,
)
from lmforge.errors import LmforgeError

ANY = "*"  # the rule for every command that has none of its own
COMMANDS: dict[str, tuple[type, ...]] = {"train": GROUPS, "chat": CHAT_GROUPS, "api": API_GROUPS,
                                         "export": EXPORT_GROUPS, "eval": EVAL_GROUPS}
# transformers' fields lmforge inherits but nothing acts on: their LF_OPTIONS rule applies although they are known
UNHONOURED = frozenset({"do_train", "do_eval", "do_predict", "disable_tqdm"})
LF_INVENTORY: dict[str, str] = {  # LLaMA-Factory 0.9.5's dataclass fields, by its argument group
    "model": """model_name_or_path adapter_name_or_path adapter_folder cache_dir use_fast_tokenizer resize_vocab
        split_special_tokens add_tokens add_special_tokens new_special_tokens_config init_special_tokens model_revision
        low_cpu_mem_usage rope_scaling flash_attn shift_attn mixture_of_depths use_unsloth use_unsloth_gc
        enable_liger_kernel moe_aux_loss_coef disable_gradient_checkpointing use_reentrant_gc upcast_layernorm
        upcast_lmhead_output train_from_scratch infer_backend offload_folder use_kv_cache use_v1_kernels infer_dtype
        hf_hub_token ms_hub_token om_hub_token print_param_status trust_remote_code quantization_method
        quantization_bit quantization_type double_quantization quantization_device_map image_max_pixels
        image_min_pixels image_do_pan_and_scan crop_to_patches video_max_pixels video_min_pixels video_fps
        video_maxlen use_audio_in_video audio_sampling_rate export_dir export_size export_device
        export_quantization_bit export_quantization_dataset export_quantization_nsamples export_quantization_maxlen
        export_legacy_format export_hub_model_id use_kt kt_weight_path kt_expert_checkpoint_path kt_use_lora_experts
        kt_lora_expert_num kt_lora_expert_intermediate_size vllm_maxlen vllm_gpu_util vllm_enforce_eager
        vllm_max_lora_rank vllm_config sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config
        sglang_lora_backend""",
    "data": """template dataset eval_dataset dataset_dir media_dir cutoff_len train_on_prompt mask_history streaming
        buffer_size mix_strategy interleave_probs overwrite_cache preprocessing_batch_size preprocessing_num_workers
        max_samples eval_num_beams ignore_pad_token_for_loss val_size eval_on_each_dataset packing neat_packing
        tool_format default_system enable_thinking preserve_thinking tokenized_path data_shared_file_system""",
    "finetuning": """freeze_trainable_layers freeze_trainable_modules freeze_extra_modules additional_target
        module_dropout oft_rank oft_block_size oft_target create_new_adapter lora_alpha lora_dropout lora_rank
        lora_target loraplus_lr_ratio loraplus_lr_embedding use_rslora use_dora pissa_init pissa_iter pissa_convert
        pref_beta pref_ftx pref_bco_weight pref_loss dpo_label_smoothing kto_chosen_weight kto_rejected_weight
        simpo_gamma ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards ref_model
        ref_model_adapters ref_model_quantization_bit reward_model reward_model_adapters reward_model_quantization_bit
        reward_model_type ld_alpha use_galore galore_target galore_rank galore_update_interval galore_scale
        galore_proj_type galore_layerwise use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale
        apollo_proj apollo_proj_type apollo_scale_type apollo_layerwise apollo_scale_front use_badam badam_mode
        badam_start_block badam_switch_mode badam_switch_interval badam_update_ratio badam_mask_mode badam_verbose
        use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key swanlab_logdir
        swanlab_lark_webhook_url swanlab_lark_secret pure_bf16 stage finetuning_type use_llama_pro use_adam_mini
        use_mca use_hyper_parallel hyper_parallel_args use_muon use_dft_loss use_asft_loss asft_alpha use_eaft_loss
        eaft_alpha freeze_vision_tower freeze_multi_modal_projector freeze_language_model compute_accuracy
        disable_shuffling early_stopping_steps plot_loss include_effective_tokens_per_second""",
    "generating": """do_sample temperature top_p top_k num_beams max_length max_new_tokens repetition_penalty
        length_penalty skip_special_tokens""",
    "evaluation": "task task_dir batch_size seed lang n_shot save_dir download_mode",
    "training": """output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type
        lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
        optim_target_modules gradient_accumulation_steps average_tokens_across_devices max_grad_norm
        label_smoothing_factor bf16 fp16 bf16_full_eval fp16_full_eval tf32 gradient_checkpointing
        gradient_checkpointing_kwargs torch_compile torch_compile_backend torch_compile_mode use_liger_kernel
        liger_kernel_config use_cache neftune_noise_alpha torch_empty_cache_steps auto_find_batch_size
        logging_strategy logging_steps logging_first_step log_on_each_node logging_nan_inf_filter
        include_num_input_tokens_seen log_level log_level_replica disable_tqdm report_to run_name project
        trackio_space_id trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay
        per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
        eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps
        save_on_each_node save_total_limit enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id
        hub_strategy hub_always_push hub_revision load_best_model_at_end metric_for_best_model greater_is_better
        ignore_data_skip restore_callback_states_from_checkpoint full_determinism data_seed use_cpu
        accelerator_config parallelism_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory
        dataloader_persistent_workers dataloader_prefetch_factor remove_unused_columns label_names
        train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers
        ddp_static_graph ddp_backend ddp_timeout fsdp fsdp_config deepspeed debug skip_memory_metrics do_train do_eval
        do_predict resume_from_checkpoint warmup_ratio logging_dir local_rank sortish_sampler predict_with_generate
        generation_max_length generation_num_beams generation_config ray_num_workers ray_init_kwargs master_addr
        master_port fp8 fp8_backend fp8_enable_fsdp_float8_all_gather enable_torch_profiler profiler_output_dir
        profiler_wait_steps profiler_warmup_steps profiler_active_steps profiler_repeat profiler_record_shapes
        profiler_profile_memory profiler_with_stack profile_modules overwrite_output_dir""",
}
Accepts = Union[tuple[Any, ...], Callable[[Any, dict[str, Any]], bool]]


@dataclass(frozen=True)
class LfRule:
    """What one command does with a LLaMA-Factory option: a value `accepts` admits is what lmforge does anyway and is
    dropped; with `rename` the value passes on as that lmforge option (through `values` when given, where a value
    missing is refused); any other value is refused with `reason` (why, and what to use instead)."""

    reason: str
    accepts: Accepts = ()
    rename: str | None = None
    values: dict[Any, Any] | None = None

    def accepted(self, value: Any, raw: dict[str, Any]) -> bool:
        if callable(self.accepts):
            return self.accepts(value, raw)
        return _hashable(value) and value in self.accepts

    def renamed(self, value: Any, original: Any) -> tuple[bool, Any]:
        """(whether the value passes on as `rename`, the value it passes on with)."""
        if self.rename is None:
            return False, None
        if self.values is None:
            return True, original
        return (True, self.values[value]) if _hashable(value) and value in self.values else (False, None)


@dataclass(frozen=True)
class LfOption:
    """A LLaMA-Factory option lmforge does not declare under that name (in some command): its LLaMA-Factory
    argument group and a rule per command (ANY: the others)."""

    group: str
    rules: dict[str, LfRule]
    status: str = "refused"  # implemented (same meaning, other values refused) | alias | refused

    def rule(self, command: str | None) -> LfRule:
        return self.rules.get(command or ANY, self.rules[ANY])


def _listing(names: Any) -> str:
    """a, b and c."""
    names = list(names)
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _yaml(value: Any) -> str:
    """A value as YAML writes it: true, null, 0.7."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _hashable(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _plain(value: Any) -> Any:
    """A YAML or command-line value as YAML reads it ('true' -> True, '1e-6' -> 1e-06), to compare with defaults."""
    if not isinstance(value, str):
        return value
    try:
        value = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _refused(group: str, reason: str, **defaults: Any) -> dict[str, LfOption]:
    """Features lmforge does not have: LLaMA-Factory's default, which leaves the feature off, is accepted."""
    return {name: LfOption(group, {ANY: LfRule(reason, (default,))}) for name, default in defaults.items()}


def _renamed(group: str, rename: str, default: Any, commands: tuple[str, ...] = ("train",),
             values: dict[Any, Any] | None = None, accepts: tuple[Any, ...] = (), reason: str = "") -> LfOption:
    """An option lmforge has as `rename` in `commands` (values translated by `values`); elsewhere it means nothing,
    so only LLaMA-Factory's default is accepted there."""
    here = LfRule(reason or f"use {rename}", accepts, rename, values)
    elsewhere = LfRule(f"it applies to lmforge {_listing(commands)}", (default,))
    return LfOption(group, {**dict.fromkeys(commands, here), ANY: elsewhere}, "alias")


def _has_eval_rows(raw: dict[str, Any]) -> bool:
    val_size = _plain(raw.get("val_size", 0))
    return bool(raw.get("eval_dataset")) or (isinstance(val_size, (int, float)) and val_size > 0)


def _evaluates(value: Any, raw: dict[str, Any]) -> bool:
    """true with eval rows (val_size or eval_dataset), false without: train evaluates exactly when it has them."""
    return isinstance(value, bool) and value == _has_eval_rows(raw)


def _samples(value: Any, raw: dict[str, Any]) -> bool:
    """true with temperature > 0 (lmforge's default temperature 0 decodes greedily)."""
    temperature = _plain(raw.get("temperature", 0))
    return value is True and isinstance(temperature, (int, float)) and temperature > 0


def _not_streaming(value: Any, raw: dict[str, Any]) -> bool:
    """any value without streaming (it only shuffles a stream)."""
    return _plain(raw.get("streaming", False)) is not True


def _adapter_kind(value: Any, raw: dict[str, Any]) -> bool:
    """lora; full or freeze without adapter_name_or_path (model_name_or_path is then the trained model)."""
    return value == "lora" or (value in ("full", "freeze") and not raw.get("adapter_name_or_path"))


INFERENCE = ("chat", "api", "export", "eval")
SAMPLING = LfRule("do_sample: true needs temperature > 0 in lmforge, whose default temperature 0 decodes greedily: "
                  "set temperature (LLaMA-Factory's default is 0.95)", _samples, "temperature", {False: 0.0})
GPTQ = "GPTQ export is not supported: export_format: gguf with gguf_type q8_0 or q4_0 writes a quantized model"
MULTIMODAL = "multimodal training is not supported yet: lmforge trains on text"
KTRANSFORMERS = "KTransformers is not supported: lmforge trains and generates with transformers"
ENGINES = "it applies to infer_backend vllm or sglang, which lmforge does not have (infer_backend: huggingface)"
OPTIMIZERS = "is not supported: choose a transformers optimizer with optim (e.g. adamw_torch)"
LF_OPTIONS: dict[str, LfOption] = {
    "do_train": LfOption("training", {"train": LfRule(
        "lmforge train always trains: to score a trained model run `lmforge eval`, to only tokenize `lmforge "
        "preprocess`", (True,)), ANY: LfRule("it applies to lmforge train", (False,))}, "implemented"),
    "do_eval": LfOption("training", {"train": LfRule(
        "lmforge train evaluates exactly when it has eval rows: do_eval: true needs val_size or eval_dataset, "
        "do_eval: false neither", _evaluates), ANY: LfRule("it applies to lmforge train", (False,))}, "implemented"),
    "do_predict": LfOption("training", {ANY: LfRule(
        "for replies to the eval rows after training set predict_with_generate: true; for a trained model run "
        "`lmforge eval --eval_task generation`", (False,))}, "refused"),
    "disable_tqdm": LfOption("training", {ANY: LfRule(
        "lmforge always shows its progress bar (steps, loss, tokens/s)", (False, None))}),
    "finetuning_type": LfOption("finetuning", {**dict.fromkeys(INFERENCE, LfRule(
        "adapter_name_or_path holds LoRA adapters: finetuning_type full or freeze goes without one", _adapter_kind)),
        ANY: LfRule("it applies to lmforge train", ("lora",))}, "implemented"),
    "infer_backend": LfOption("model", {ANY: LfRule(
        "lmforge generates with transformers only (infer_backend: huggingface); for vLLM or SGLang speed, "
        "`lmforge export` the model and serve export_dir with that engine", ("huggingface",))}, "implemented"),
    "infer_dtype": LfOption("model", {"export": LfRule("use export_dtype", (), "export_dtype"),
                                      "eval": LfRule("use torch_dtype", (), "torch_dtype"),
                                      ANY: LfRule("it is the dtype of generation (chat, api, eval, export); "
                                                  "training loads weights in torch_dtype", ("auto",))}, "alias"),
    "do_sample": LfOption("generating", {"chat": SAMPLING, "api": SAMPLING, "eval": SAMPLING, ANY: LfRule(
        "predict_with_generate decodes greedily: for sampled replies run `lmforge eval --eval_task generation` with "
        "temperature", (False,))}, "alias"),
    "top_k": LfOption("generating", {"eval": LfRule(
        "lmforge eval samples with temperature and top_p, without a top-k cut (top_k: 0)", (0,)),
        ANY: LfRule("it applies to lmforge chat, api and train's grpo", (50,))}, "implemented"),
    "save_dir": LfOption("evaluation", {"eval": LfRule("use output_dir", (), "output_dir"),
                                        ANY: LfRule("it is lmforge eval's output_dir", (None,))}, "alias"),
    "buffer_size": LfOption("data", {ANY: LfRule(
        "lmforge streams rows in file order, without a shuffle buffer: shuffle the files beforehand",
        _not_streaming)}, "refused"),
    "reward_model_type": LfOption("finetuning", {ANY: LfRule(
        "reward_model is an rm run's output_dir (full model or LoRA adapter); for API rewards use reward_funcs "
        "module:function", ("lora", "full"))}, "implemented"),
    # lmforge logs tokens_per_second (real tokens) in every log line, whatever the value
    "include_effective_tokens_per_second": LfOption("finetuning", {ANY: LfRule("", (False, True))}, "implemented"),
    "flash_attn": _renamed(
        "model", "attn_implementation", "auto", ("train", *INFERENCE), accepts=("auto",),
        values={"sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"},
        reason="FlashAttention 3 is not supported: use flash_attn: fa2 (attn_implementation: flash_attention_2)"),
    "disable_gradient_checkpointing": _renamed("model", "gradient_checkpointing", False,
                                               values={True: False, False: True}),
    "use_reentrant_gc": _renamed("model", "gradient_checkpointing_kwargs", True,
                                 values={b: {"use_reentrant": b} for b in (True, False)}),
    "disable_shuffling": _renamed("finetuning", "train_sampling_strategy", False, values={True: "sequential"},
                                  accepts=(False,)),
    **_refused("model", "adapters load from adapter_name_or_path", adapter_folder=None),
    **_refused("model", "lmforge reads local folders and model aliases: set HF_HOME to move the Hugging Face cache",
               cache_dir=None),
    **_refused("model", "lmforge loads the fast (tokenizers) tokenizer", use_fast_tokenizer=True),
    **_refused("model", "special tokens are always kept whole", split_special_tokens=False),
    **_refused("model", "adding tokens to the vocabulary is not supported (resize_vocab: true adds a template's "
               "missing markers)", add_tokens=None, add_special_tokens=None, new_special_tokens_config=None,
               init_special_tokens="noise_init"),
    **_refused("model", "lmforge loads the files in model_name_or_path: download that revision into a folder",
               model_revision="main"),
    **_refused("model", "transformers always loads with low memory use", low_cpu_mem_usage=True),
    **_refused("model", "RoPE scaling of a pretrained model is not supported: keep cutoff_len within its "
               "max_position_embeddings", rope_scaling=None),
    **_refused("model", "LongLoRA's shift short attention is not supported", shift_attn=False),
    **_refused("model", "mixture-of-depths is not supported", mixture_of_depths=None),
    **_refused("model", "unsloth is not supported: use_liger_kernel: true fuses kernels, gradient_checkpointing: true "
               "saves memory", use_unsloth=False, use_unsloth_gc=False),
    **_refused("model", "the router loss weight is the model config's own", moe_aux_loss_coef=None),
    **_refused("model", "upcasting is not an option (QLoRA keeps norms in float32 itself)", upcast_layernorm=False,
               upcast_lmhead_output=False),
    **_refused("model", "lmforge does not offload weights to disk", offload_folder="offload"),
    **_refused("model", "generation always uses the KV cache", use_kv_cache=True),
    **_refused("model", "LLaMA-Factory's v1 kernels are not part of lmforge: use_liger_kernel: true fuses kernels",
               use_v1_kernels=False),
    **_refused("model", "set the HF_TOKEN environment variable instead (a token does not belong in a config file)",
               hf_hub_token=None),
    **_refused("model", "the ModelScope and Modelers hubs are not supported: download the model into a folder",
               ms_hub_token=None, om_hub_token=None),
    **_refused("model", "lmforge logs the total and trainable parameter counts, not each parameter",
               print_param_status=False),
    **_refused("model", "lmforge quantizes with bitsandbytes only", quantization_method="bnb"),
    **_refused("model", "quantized models load on one device: use device: cuda", quantization_device_map=None),
    **_refused("model", MULTIMODAL, image_max_pixels=589824, image_min_pixels=1024, image_do_pan_and_scan=False,
               crop_to_patches=False, video_max_pixels=65536, video_min_pixels=256, video_fps=2.0, video_maxlen=128,
               use_audio_in_video=False, audio_sampling_rate=16000),
    **_refused("model", GPTQ, export_quantization_bit=None, export_quantization_dataset=None,
               export_quantization_nsamples=128, export_quantization_maxlen=1024),
    **_refused("model", "lmforge writes safetensors only (.bin files are pickles, which can run code when loaded)",
               export_legacy_format=False),
    **_refused("model", "lmforge does not upload: push export_dir with huggingface_hub (`hf upload REPO DIR`)",
               export_hub_model_id=None),
    **_refused("model", KTRANSFORMERS, use_kt=False, kt_weight_path=None, kt_expert_checkpoint_path=None,
               kt_use_lora_experts=None, kt_lora_expert_num=None, kt_lora_expert_intermediate_size=None),
    **_refused("model", ENGINES, vllm_maxlen=4096, vllm_gpu_util=0.7, vllm_enforce_eager=False,
               vllm_max_lora_rank=32, vllm_config=None, sglang_maxlen=4096, sglang_mem_fraction=0.7,
               sglang_tp_size=-1, sglang_config=None, sglang_lora_backend="triton"),
    **_refused("data", MULTIMODAL, media_dir=None),
    **_refused("data", "lmforge tokenizes in batches of its own (the result does not depend on them)",
               preprocessing_batch_size=1000),
    **_refused("data", "beam search is not supported", eval_num_beams=None),
    **_refused("data", "padding never takes loss in lmforge", ignore_pad_token_for_loss=True),
    **_refused("data", "eval_dataset is evaluated as one set", eval_on_each_dataset=False),
    **_refused("data", "each node's first process tokenizes into the cache", data_shared_file_system=False),
    **_refused("finetuning", "OFT is not supported: finetuning_type lora, freeze or full", module_dropout=0.0,
               oft_rank=0, oft_block_size=32, oft_target="all"),
    **_refused("finetuning", "the last adapter_name_or_path keeps training: for a new adapter, `lmforge export` the "
               "merged model and train on export_dir", create_new_adapter=False),
    **_refused("finetuning", "LoRA+ is not supported", loraplus_lr_ratio=None, loraplus_lr_embedding=1e-6),
    **_refused("finetuning", "PiSSA initialisation is not supported", pissa_init=False, pissa_iter=16,
               pissa_convert=False),
    **_refused("finetuning", "this DPO variant is not supported: pref_loss sigmoid, ipo, hinge, orpo or simpo",
               pref_bco_weight=0.0, dpo_label_smoothing=0.0, ld_alpha=None),
    **_refused("finetuning", "lmforge's stage ppo runs GRPO (see num_generations, kl_beta)", ppo_buffer_size=1,
               ppo_epochs=4, ppo_score_norm=False, ppo_target=6.0, ppo_whiten_rewards=False),
    **_refused("finetuning", "the reference model is the starting model (the LoRA adapter disabled, or a frozen "
               "copy)", ref_model=None, ref_model_adapters=None, ref_model_quantization_bit=None),
    **_refused("finetuning", "reward_model is an rm run's output_dir (an adapter loads with its base, unquantized)",
               reward_model_adapters=None, reward_model_quantization_bit=None),
    **_refused("finetuning", f"GaLore {OPTIMIZERS}", use_galore=False, galore_target="all", galore_rank=16,
               galore_update_interval=200, galore_scale=2.0, galore_proj_type="std", galore_layerwise=False),
    **_refused("finetuning", f"APOLLO {OPTIMIZERS}", use_apollo=False, apollo_target="all", apollo_rank=16,
               apollo_update_interval=200, apollo_scale=32.0, apollo_proj="random", apollo_proj_type="std",
               apollo_scale_type="channel", apollo_layerwise=False, apollo_scale_front=False),
    **_refused("finetuning", f"BAdam {OPTIMIZERS}", use_badam=False, badam_mode="layer", badam_start_block=None,
               badam_switch_mode="ascending", badam_switch_interval=50, badam_update_ratio=0.05,
               badam_mask_mode="adjacent", badam_verbose=0),
    **_refused("finetuning", f"Adam-mini and Muon {OPTIMIZERS}", use_adam_mini=False, use_muon=False),
    **_refused("finetuning", "use report_to: swanlab with the SWANLAB_PROJECT, SWANLAB_MODE, SWANLAB_LOG_DIR and "
               "SWANLAB_API_KEY environment variables", use_swanlab=False, swanlab_project="llamafactory",
               swanlab_workspace=None, swanlab_run_name=None, swanlab_mode="cloud", swanlab_api_key=None,
               swanlab_logdir=None, swanlab_lark_webhook_url=None, swanlab_lark_secret=None),
    **_refused("finetuning", "pure bf16 training (without autocast) is not supported: use bf16: true",
               pure_bf16=False),
    **_refused("finetuning", "LLaMA Pro's block expansion is not supported (finetuning_type freeze trains chosen "
               "blocks)", use_llama_pro=False),
    **_refused("finetuning", "Megatron and HyperParallel are not supported: use fsdp or deepspeed", use_mca=False,
               use_hyper_parallel=False, hyper_parallel_args=None),
    **_refused("finetuning", "DFT, ASFT and EAFT losses are not supported: sft trains with cross-entropy",
               use_dft_loss=False, use_asft_loss=False, asft_alpha=0.1, use_eaft_loss=False, eaft_alpha=1.0),
    **_refused("finetuning", MULTIMODAL, freeze_vision_tower=True, freeze_multi_modal_projector=True,
               freeze_language_model=False),
    **_refused("finetuning", "token accuracy is not computed: eval reports eval_loss and perplexity, and `lmforge "
               "eval --eval_task generation` scores replies", compute_accuracy=False),
    **_refused("finetuning", "early stopping is not supported: set max_steps, or keep the best checkpoint with "
               "load_best_model_at_end", early_stopping_steps=None),
    **_refused("generating", "beam search is not supported: sample with temperature, top_p and top_k", num_beams=1,
               length_penalty=1.0),
    **_refused("generating", "use max_new_tokens", max_length=1024),
    **_refused("generating", "replies are always decoded without special tokens", skip_special_tokens=True),
    **_refused("evaluation", "benchmarks are read from task_dir, never downloaded",
               download_mode="reuse_dataset_if_exists"),
    **_refused("training", "transformers 5 has no logging_dir: TensorBoard writes under output_dir/runs, or where "
               "the TENSORBOARD_LOGGING_DIR environment variable says", logging_dir=None),
    **_refused("training", "use train_sampling_strategy (group_by_length batches rows of similar length)",
               sortish_sampler=False),
    **_refused("training", "predict_with_generate decodes greedily up to max_new_tokens", generation_max_length=None,
               generation_num_beams=None, generation_config=None),
    **_refused("training", "Ray is not supported: lmforge launches its processes itself (nproc_per_node, nnodes)",
               ray_num_workers=1, ray_init_kwargs=None),
    **_refused("training", "FP8 training is not supported: use bf16: true", fp8=False, fp8_backend="auto",
               fp8_enable_fsdp_float8_all_gather=False),
    **_refused("training", "profiling is not built in: run a few steps under torch.profiler yourself",
               enable_torch_profiler=False, profiler_output_dir=None, profiler_wait_steps=1, profiler_warmup_steps=1,
               profiler_active_steps=1, profiler_repeat=1, profiler_record_shapes=True, profiler_profile_memory=True,
               profiler_with_stack=True, profile_modules=None),
}

# What a LLaMA-Factory user should know about options lmforge implements under the same name.
LF_NOTES: dict[str, str] = {
    "packing": "packed examples never attend to each other (LLaMA-Factory's do unless neat_packing)",
    "template": "unset, lmforge renders with the tokenizer's own chat template (template: auto)",
    "stage": "ppo runs lmforge's GRPO",
    "temperature": "chat, api and eval decode greedily unless it is set above 0 (LLaMA-Factory's default is 0.95)",
    "top_p": "lmforge's defaults differ from LLaMA-Factory's 0.7: see `lmforge chat --help`",
    "max_new_tokens": "lmforge's defaults differ from LLaMA-Factory's 1024: see `lmforge chat --help`",
    "repetition_penalty": "lmforge chat's default differs from LLaMA-Factory's 1.0: see `lmforge chat --help`",
    "plot_loss": "on by default",
    "quantization_bit": "4 or 8, through bitsandbytes",
}


def command_of(groups: tuple[type, ...]) -> str | None:
    """The command that reads `groups` (data check reads a train config), or None (score, webui)."""
    if groups == DOCTOR_GROUPS:
        return "train"
    return next((name for name, owned in COMMANDS.items() if owned == groups), None)


def apply_lf_options(raw: dict[str, Any], groups: tuple[type, ...]) -> dict[str, Any]:
    """`raw` with LLaMA-Factory's options translated for the command that reads `groups`: renamed to lmforge's
    option, dropped where the value is what lmforge does anyway, or refused in one line that says why."""
    command, known = command_of(groups), all_option_names(groups)
    out = dict(raw)
    for key, value in raw.items():
        option = LF_OPTIONS.get(key)
        if option is None or (key in known and key not in UNHONOURED):
            continue
        rule, plain = option.rule(command), _plain(out.pop(key))
        if rule.accepted(plain, out):
            continue
        passes, new = rule.renamed(plain, value)
        if not passes:
            where = f" by lmforge {command}" if command else ""
            raise LmforgeError(f"option '{key}: {_yaml(value)}' (LLaMA-Factory) is not supported{where}: {rule.reason}")
        if rule.rename in out and _plain(out[rule.rename]) != _plain(new):
            raise LmforgeError(f"{key}: {_yaml(value)} and {rule.rename}: {_yaml(out[rule.rename])} disagree: set only "
                               f"{rule.rename}")
        out[rule.rename] = new
    return out


def lf_table() -> str:
    """docs/llamafactory_options.md: every LLaMA-Factory option and what lmforge does with it."""
    lines = [LF_TABLE_HEADER, "| option | LF group | lmforge | note |", "|---|---|---|---|"]
    counts: dict[str, int] = {}
    for group, names in LF_INVENTORY.items():
        for name in names.split():
            status, note = _lf_row(name)
            counts[status] = counts.get(status, 0) + 1
            lines.append(f"| `{name}` | {group} | {status} | {note} |")
    total = sum(counts.values())
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return "\n".join([*lines, "", f"{total} options: {summary}.", ""])


LF_TABLE_HEADER = """# LLaMA-Factory's options in lmforge

Generated by `python -m lmforge.config.llamafactory --lf-table > docs/llamafactory_options.md` from the tables in
`lmforge/config/llamafactory.py`; `tests/unit/test_lf_options.py` fails when this file is out of date.

Every option of LLaMA-Factory 0.9.5's train, chat/api, export and eval arguments (its model, data, fine-tuning,
generating and evaluation arguments and its training arguments, transformers' included) is either
**implemented** (an lmforge option of the same name and meaning), an **alias** (read as the lmforge option named),
or **refused** with a one-line error that says why and what to use instead. A refused option is accepted only at
the value listed, which is what lmforge does anyway (LLaMA-Factory's default, where it leaves a feature off).
No option is accepted and ignored.
"""


def commands_knowing(name: str) -> list[str]:
    """The lmforge commands that have an option of this name."""
    return [command for command, groups in COMMANDS.items() if name in all_option_names(groups)]


def _describe_rule(rule: LfRule) -> str:
    if callable(rule.accepts):
        accepted = f"accepted {(rule.accepts.__doc__ or '').strip().rstrip('.')}"
    else:
        accepted = f"accepted: {', '.join(f'`{_yaml(v)}`' for v in rule.accepts)}" if rule.accepts else ""
    refused = f"otherwise refused: {rule.reason}" if rule.reason and (not rule.rename or rule.values) else ""
    if rule.rename:
        mapping = "" if rule.values is None else " (" + ", ".join(
            f"{_yaml(k)} → {_yaml(v)}" for k, v in rule.values.items()) + ")"
        parts = [f"read as `{rule.rename}`{mapping}", accepted, refused]
    else:
        parts = [accepted, refused]
    return "; ".join(p for p in parts if p)


def _lf_row(name: str) -> tuple[str, str]:
    """(implemented | alias | refused, what lmforge does) for one LLaMA-Factory option."""
    if name in ALIASES:
        return "alias", f"read as `{ALIASES[name]}`"
    own = [] if name in UNHONOURED else commands_knowing(name)
    option = LF_OPTIONS.get(name)
    if option is None:
        note = f"; {LF_NOTES[name]}" if name in LF_NOTES else ""
        return ("implemented", f"lmforge {', '.join(own)}{note}") if own else ("missing", "")
    notes = [f"{', '.join(own)}: lmforge's own option"] if own else []
    scopes: dict[int, list[str]] = {}  # one note per distinct rule, naming the commands it covers
    for command, rule in option.rules.items():
        if command not in own:
            scopes.setdefault(id(rule), []).append("other commands" if command == ANY else command)
    rules = {id(rule): rule for rule in option.rules.values()}
    for key, commands in scopes.items():
        text = _describe_rule(rules[key])
        notes.append(f"{', '.join(commands)}: {text}" if own or len(scopes) > 1 else text)
    return option.status, "; ".join(notes).replace("|", "\\|")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--lf-table"]:
        sys.exit("usage: python -m lmforge.config.llamafactory --lf-table > docs/llamafactory_options.md")
    from lmforge.config import llamafactory  # the imported module, whose tables the rest of lmforge reads

    sys.stdout.write(llamafactory.lf_table())
