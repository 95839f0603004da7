"""`lmforge COMMAND [CONFIG.yaml] [--key value ...]`: the one entry point."""

from __future__ import annotations

import difflib
import sys
from typing import Callable

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.launch import enable_faulthandler, exit_rank, left_process_group, setup_logging

USAGE = f"""lmforge {__version__}: train causal language models from one YAML.

usage: lmforge COMMAND [CONFIG.yaml] [--key value ...]

commands:
  train        train a model (stage pt, sft, rm, dpo, kto or grpo): lmforge train examples/sft_lora.yaml
  preprocess   tokenize the data exactly as train would and save it to tokenized_path
  chat         chat with a model (streamed), or answer one --query
  api          serve a model over an OpenAI-compatible HTTP API (needs: pip install 'lmforge[serve]')
  webui        train, chat and export in the browser (Gradio, as LLaMA Board; needs: pip install 'lmforge[serve]')
  export       merge LoRA adapters into the base and write a standalone model
  score        score (prompt, response) rows with a reward model trained by stage rm
  eval         perplexity, generation scores, multiple-choice benchmarks (MMLU, C-Eval, CMMLU), lm-eval tasks
  demo         teach the embedded SmolLM2 a new identity and show before/after answers
  data check   the data doctor: invalid rows, lengths, truncation, and exactly which tokens are trained
  templates    list the chat templates of the catalogue
  models       list the model aliases that resolve offline
  env          versions, devices and memory, for bug reports
  version      print the version

Values given on the command line override the YAML; the YAML is optional.
`lmforge train --help` lists every option with its type, default and meaning.
"""


def cmd_train(argv: list[str]) -> int | None:
    """Train a causal LM: stage pt (raw text), sft (conversations), rm (reward model), dpo (preference
    pairs), kto (labelled responses) or grpo (RL on prompts with rewards), full, freeze or LoRA (QLoRA
    with quantization_bit). With
    nproc_per_node / nnodes (or FORCE_TORCHRUN=1) it re-launches itself through torchrun."""
    from lmforge import allocator
    from lmforge.config import parse_train_config
    from lmforge.launch import launch_settings, leave_process_group, relaunch
    from lmforge.train.recipe import run_stage

    config = parse_train_config(argv)
    settings = launch_settings(config)
    if settings is not None:
        return relaunch(settings, argv)
    allocator.report(config.launch.host_allocator, config.training.release_host_memory)
    if config.training.use_cpu and config.training.release_host_memory:
        from lmforge.train.host_memory import release_freed_memory

        release_freed_memory()
    try:
        run_stage(config)
    finally:
        leave_process_group()
    return None


def cmd_preprocess(argv: list[str]) -> None:
    """Load, render, tokenize and mask the data exactly as `train` would, and save it to
    tokenized_path (datasets.save_to_disk: input_ids, attention_mask, labels; -100 = no loss). Stage pt writes
    token shards instead (flat uint16/uint32 files that `train` memory-maps; see lmforge/data/shards.py) on
    preprocessing_num_workers processes; run again, it finishes an interrupted run and skips what is done."""
    from pathlib import Path

    from lmforge.config.sources import merge_sources
    from lmforge.data import shard_cache

    _, raw = merge_sources(argv)
    done = shard_cache.up_to_date(raw)
    if done is not None:  # the same command found the same files: nothing to import, nothing to do
        print(f"saved to {raw['tokenized_path']}: {done}")
        return

    from lmforge.config import parse_train_config
    from lmforge.data import pipeline
    from lmforge.train.recipe import prepare_tokenizer

    config = parse_train_config(argv)
    if not config.data.tokenized_path:
        raise LmforgeError("preprocess needs tokenized_path: where to save the tokenized data")
    if config.data.streaming:
        raise LmforgeError("preprocess cannot save streamed data: set streaming: false")
    path = Path(config.data.tokenized_path)
    pipeline.check_tokenized_path(path)
    tokenizer = prepare_tokenizer(config)
    specs = pipeline.shard_specs(config.data, config.finetuning.stage)
    if specs is not None:
        report = pipeline.write_token_shards(config.data, specs, tokenizer)
        shard_cache.remember(path, raw, pipeline.shard_dependencies(config.model, config.data))
        print(f"saved to {path}: {report.describe()}")
        return
    data = pipeline.build_datasets(config.data, config.finetuning.stage, config.training.seed, tokenizer)
    pipeline.save_prepared(data, path)
    print(f"saved to {path}: {data.summary.describe()}")


def cmd_chat(argv: list[str]) -> None:
    """Chat with a model in the terminal (streamed replies, history kept; `clear`, `exit`), or answer
    one --query and exit. With no model given it uses the embedded smollm2-135m-instruct."""
    from lmforge.config.parser import CHAT_GROUPS, build_groups, merge_sources
    from lmforge.serve.chat import ChatEngine, calls_as_json, load_for_inference, read_tools_file, run_repl

    _, raw = merge_sources(argv)
    model_args, gen = build_groups(raw, CHAT_GROUPS)
    if gen.tools:
        read_tools_file(gen.tools)  # a bad file fails before the model loads
    tokenizer, model = load_for_inference(model_args, gen.device, gen.infer_dtype)
    engine = ChatEngine(tokenizer, model, gen)
    if gen.query is not None:
        reply = engine.reply([{"role": "user", "content": gen.query}]).strip()
        calls = engine.tool_calls(reply) if engine.tools else None
        print(calls_as_json(calls) if calls else reply)
        return
    run_repl(engine)


def cmd_api(argv: list[str]) -> None:
    """Serve a model (loaded as `lmforge chat` loads it) over an OpenAI-compatible HTTP API on 127.0.0.1:8000:
    /v1/chat/completions (streamed or not), /v1/completions, /v1/models, /health."""
    from lmforge.config.parser import API_GROUPS, build_groups, merge_sources

    try:
        from lmforge.serve.api import run_api
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise LmforgeError(f"lmforge api needs {err.name}: pip install 'lmforge[serve]'") from None
    _, raw = merge_sources(argv)
    run_api(*build_groups(raw, API_GROUPS))


def cmd_webui(argv: list[str]) -> None:
    """Open the training page on http://127.0.0.1:7860: pick model, stage, method and datasets, preview the
    rendered data, start `lmforge train` and watch its log and loss curve, chat with the result, merge or
    export it. A YAML given here fills the Train tab: lmforge webui examples/sft_lora.yaml"""
    from lmforge.config.parser import merge_sources

    try:
        from lmforge.webui.app import run_webui
    except ModuleNotFoundError as err:
        if err.name not in ("gradio", "gradio_client", "pandas"):
            raise
        raise LmforgeError(f"lmforge webui needs {err.name}: pip install 'lmforge[serve]'") from None
    config_path, raw = merge_sources(argv)
    run_webui(raw, config_path)


def cmd_export(argv: list[str]) -> None:
    """Merge LoRA adapters into the base model and write a standalone Hugging Face directory
    (sharded safetensors, tokenizer with chat template, model card), merged one LoRA layer at a time in
    float64 and each merged layer checked against the layer with its adapter; or, with --export_format gguf, one .gguf file
    (gguf_type f16, bf16, f32, q8_0, q5/q4) for llama.cpp, with an Ollama Modelfile (--export_ollama true)."""
    from lmforge.config.parser import EXPORT_GROUPS, build_groups, merge_sources
    from lmforge.export.merge import run_export

    _, raw = merge_sources(argv)
    model_args, export_args = build_groups(raw, EXPORT_GROUPS)
    result = run_export(model_args, export_args)
    merged = (f"merged {len(result['merged_adapters'])} adapter(s), max |layer output difference| vs "
              f"base+adapter (float64) {result['max_abs_layer_diff']:.2e}")
    if result["export_format"] == "hf":
        print(f"exported to {export_args.export_dir} ({result['export_dtype']}); {merged}")
        return
    print(f"wrote {result['gguf_file']} ({result['gguf_type']}, {result['size_mb']:.1f} MB); {merged}")
    if not result["tokenizer_round_trip"]:
        print("note: transformers reads this file's tokenizer back differently (see the warning above)")
    if result["modelfile"]:
        print(f"wrote {result['modelfile']}: ollama create NAME -f {result['modelfile']}")


def cmd_score(argv: list[str]) -> None:
    """Score (prompt, response) rows with a reward model trained by stage rm; writes each row with its
    `score` (higher = preferred) to --output: lmforge score --reward_model saves/rm --input rows.jsonl"""
    from lmforge.config.parser import SCORE_GROUPS, build_groups, merge_sources
    from lmforge.serve.score import run_score

    _, raw = merge_sources(argv)
    (args,) = build_groups(raw, SCORE_GROUPS)
    target = run_score(args)
    print(f"scores written to {target}")


def cmd_eval(argv: list[str]) -> None:
    """Measure a model (base, adapter, .gguf or alias): perplexity on the eval rows (as train's eval_loss),
    generation scored by exact match, BLEU-4 and ROUGE, multiple-choice benchmarks from local files (0-5 shot),
    lm-evaluation-harness tasks; results in output_dir/eval_results.json:
    lmforge eval examples/eval.yaml"""
    from lmforge.eval.runner import parse_eval_config, run_eval

    run_eval(*parse_eval_config(argv))


def cmd_demo(argv: list[str]) -> None:
    """Ask the base model who it is, train LoRA SFT on the built-in identity data, ask again:
    lmforge demo examples/demo_identity.yaml"""
    from lmforge.config import parse_train_config
    from lmforge.demo import run_demo

    run_demo(parse_train_config(argv))


def cmd_data(argv: list[str]) -> None:
    """lmforge data check CONFIG.yaml: rows per dataset, invalid rows (file:line), duplicates, length
    statistics and histogram, what cutoff_len truncates or drops, the share of tokens that carry
    loss, and rendered examples with the trained tokens marked."""
    from lmforge.config.parser import DOCTOR_GROUPS, TrainConfig, build_groups, merge_sources
    from lmforge.data.doctor import run_data_check
    from lmforge.data.templates import template_for
    from lmforge.model.loader import load_tokenizer

    if not argv or argv[0] != "check":
        raise LmforgeError("usage: lmforge data check CONFIG.yaml [--key value ...]")
    config_path, raw = merge_sources(argv[1:])
    model, data, finetuning, training, launch, rl, doctor = build_groups(raw, DOCTOR_GROUPS)
    config = TrainConfig(model, data, finetuning, training, launch, rl, explicit=dict(raw), config_path=config_path)
    tokenizer = load_tokenizer(model)
    original = tokenizer.chat_template
    if finetuning.spec.template:
        template_for(data, tokenizer)  # an unknown template fails here, before any work
    run_data_check(config, doctor, tokenizer, original)


def cmd_templates(argv: list[str]) -> None:
    """List the chat templates of the catalogue: what each renders and where its parity was checked."""
    from lmforge.data.templates import load_catalogue

    catalogue = load_catalogue()
    if argv and argv[0] in catalogue:  # one template in full
        spec = catalogue[argv[0]]
        for key, value in vars(spec).items():
            if value not in ("", None, ()) and key != "name":
                print(f"{key}: {value!r}")
        return
    print(f"{len(catalogue) + 1} templates (`lmforge templates NAME` shows one in full)")
    print(f"{'name':<26} {'kind':<16} features / parity checked against")
    print(f"{'auto':<26} {'tokenizer':<16} the tokenizer's own chat_template (default)")
    for name, spec in catalogue.items():
        checked = ["LLaMA-Factory 0.9.5" if spec.source == "llamafactory" else "lmforge"]
        if spec.official:
            checked.append(f"official: {spec.official}")
        print(f"{name:<26} {spec.kind:<16} {', '.join(spec.features)} / {'; '.join(checked)}")


def cmd_models(argv: list[str]) -> None:
    """List the model aliases that resolve offline."""
    from lmforge.model.loader import load_aliases

    for name, entry in load_aliases().items():
        print(f"{name}: {entry['description']} (needs: {entry['install']})")


def cmd_env(argv: list[str]) -> None:
    """Print the versions of Python, torch (and CUDA), the HF libraries and the optional engines,
    and the devices with their memory: paste it into a bug report."""
    from lmforge.env import environment_report

    print(environment_report())


def cmd_version(argv: list[str]) -> None:
    """Print the version."""
    print(__version__)


def _groups(name: str) -> tuple[type, ...]:
    from lmforge.config import parser

    return getattr(parser, name)


# command -> (function, name of its option groups in lmforge.config.parser, or None)
COMMAND_TABLE: dict[str, tuple[Callable[[list[str]], int | None], str | None]] = {
    "train": (cmd_train, "GROUPS"), "preprocess": (cmd_preprocess, "GROUPS"), "chat": (cmd_chat, "CHAT_GROUPS"),
    "api": (cmd_api, "API_GROUPS"), "webui": (cmd_webui, "WEBUI_GROUPS"),
    "export": (cmd_export, "EXPORT_GROUPS"), "score": (cmd_score, "SCORE_GROUPS"), "demo": (cmd_demo, "GROUPS"),
    "eval": (cmd_eval, "EVAL_GROUPS"),
    "data": (cmd_data, "DOCTOR_GROUPS"), "templates": (cmd_templates, None), "models": (cmd_models, None),
    "env": (cmd_env, None), "version": (cmd_version, None),
}
COMMANDS = {name: fn for name, (fn, _) in COMMAND_TABLE.items()}


def command_groups(name: str) -> tuple[type, ...]:
    """The option dataclasses a command reads (for --help)."""
    groups = COMMAND_TABLE[name][1] if name in COMMAND_TABLE else None
    return _groups(groups) if groups else ()


def command_help(name: str) -> str:
    """The --help text of one command: its usage, its docstring and the options it reads."""
    from lmforge.config.parser import format_help

    head = f"usage: lmforge {name} [CONFIG.yaml] [--key value ...]\n\n{COMMANDS[name].__doc__ or ''}"
    groups = command_groups(name)
    if groups:
        return head + "\noptions (YAML keys; --key value on the command line overrides the YAML):" + format_help(groups)
    return head


def drop_launcher_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher adds --local_rank=N to every process; LOCAL_RANK in the environment says the same."""
    return [a for a in argv if not a.startswith("--local_rank=")]


def main(argv: list[str] | None = None) -> int:
    """Run one lmforge command; returns its exit code (2 for bad input, 128 + N when stopped by signal N)."""
    enable_faulthandler()
    argv_given = argv
    argv = drop_launcher_rank(sys.argv[1:] if argv is None else list(argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"lmforge: error: unknown command '{name}'{hint} (see lmforge --help)", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(command_help(name))
        return 0
    if argv_given is None and name == "train":  # started as a command: the allocator can still be chosen
        preload_allocator(rest)
    setup_logging()
    code = _run_command(name, rest)
    if left_process_group():
        exit_rank(code)
    return code


def preload_allocator(rest: list[str]) -> None:
    """Re-execute `lmforge train` with jemalloc or tcmalloc preloaded when host_allocator says so (see
    lmforge/allocator.py); options that do not parse are left for the command to report."""
    from lmforge.allocator import reexec_with_allocator
    from lmforge.config.sources import merge_sources

    try:
        _, raw = merge_sources(rest)
    except LmforgeError:
        return
    reexec_with_allocator(raw, ["train", *rest])


def _run_command(name: str, rest: list[str]) -> int:
    try:
        code = COMMANDS[name](rest)
    except LmforgeError as err:
        stopped = getattr(err, "signum", None)
        print(f"lmforge: {'' if stopped else 'error: '}{err}", file=sys.stderr)
        return 128 + stopped if stopped else 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
