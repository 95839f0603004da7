"""GGUF export: the metadata and tensors written, the Ollama Modelfile, and bad input as one-line errors."""

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config import ExportArguments
from lmforge.data.templates import load_catalogue
from lmforge.errors import LmforgeError
from lmforge.export.gguf import permute_rotary
from lmforge.export.ollama import go_template, modelfile_text, training_template

RANGE = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"


def export(model_dir, out, *extra):
    return main(["export", "--model_name_or_path", str(model_dir), "--export_dir", str(out),
                 "--export_format", "gguf", *extra])


def read_gguf(out):
    """(metadata, {tensor name: (GGML type name, torch-order shape)}) through transformers' fast reader
    (gguf's GGUFReader takes ~15 s here to parse 49k tokens)."""
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    (path,) = out.glob("*.gguf")
    fields, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tensors = {t.name: (GGMLQuantizationType(t.ggml_type).name, t.shape) for t in GgufHeader.from_file(str(path)).tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def f16_export(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny"
    assert export(tiny_llama_dir, out, "--export_ollama", "true") == 0
    return out


def test_metadata_states_the_architecture_and_the_tokenizer(f16_export, smol_tokenizer):
    fields, tensors = read_gguf(f16_export)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1  # MOSTLY_F16
    shape = {k: fields[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                               "feed_forward_length", "attention.head_count",
                                               "attention.head_count_kv", "rope.dimension_count", "vocab_size")}
    assert shape == {"context_length": 1024, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
                     "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8,
                     "vocab_size": len(smol_tokenizer)}
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == smol_tokenizer.convert_ids_to_tokens(list(range(len(smol_tokenizer))))
    assert len(fields["tokenizer.ggml.merges"]) == 48900
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == smol_tokenizer.chat_template


def test_tensors_are_named_by_gguf_and_norms_stay_f32(f16_export):
    _, tensors = read_gguf(f16_export)
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"}
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in (0, 1) for n in per_block}
    assert set(tensors) == expected  # tied embeddings: no output.weight
    types = {name: t[0] for name, t in tensors.items()}
    assert {types[n] for n in expected if "norm" in n} == {"F32"}
    assert {types[n] for n in expected if "norm" not in n} == {"F16"}
    assert tensors["blk.0.attn_k.weight"][1] == (16, 32)  # (kv heads * head_dim, hidden)


def test_q4_0_keeps_the_output_projection_at_q8_0(tiny_llama_dir, tmp_path):
    assert export(tiny_llama_dir, tmp_path / "q4", "--gguf_type", "q4_0") == 0
    fields, tensors = read_gguf(tmp_path / "q4")
    assert fields["general.file_type"] == 2  # MOSTLY_Q4_0
    assert tensors["token_embd.weight"][0] == "Q8_0"  # tied: it is also the output projection
    assert tensors["blk.1.ffn_down.weight"][0] == "Q4_0"
    assert not list((tmp_path / "q4").glob(".*"))  # no temporary file left behind


def test_token_types_mark_special_tokens_as_control(smol_tokenizer):
    from lmforge.export.gguf_vocab import CONTROL, NORMAL, UNUSED, build_vocab

    vocab = build_vocab(smol_tokenizer, len(smol_tokenizer) + 2)  # an embedding padded by two rows
    assert vocab.types[:17] == [CONTROL] * 17 and vocab.types[100] == NORMAL
    assert vocab.tokens[-2:] == [f"[PAD{len(smol_tokenizer)}]", f"[PAD{len(smol_tokenizer) + 1}]"]
    assert vocab.types[-2:] == [UNUSED, UNUSED]


def test_q_and_k_rows_are_permuted_the_way_transformers_reads_them_back():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.random.default_rng(0).standard_normal((4 * 8, 32)).astype(np.float32)  # (heads * head_dim, in)
    permuted = permute_rotary(weights, 4)
    assert not np.array_equal(permuted, weights)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    assert np.array_equal(processor.process(permuted, "blk.0.attn_q.weight").weights, weights)


CHATML_MODELFILE = (
    'FROM ./m.gguf\nTEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}' + RANGE
    + '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
    '{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}<|im_end|>\n'
    '{{ end }}{{ end }}{{ end }}"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n'
)
LLAMA3_MODELFILE = (
    'FROM ./m.gguf\nTEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}'
    '<|eot_id|>{{ end }}' + RANGE + '{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n'
    '{{ .Content }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    '{{ else if eq .Role "assistant" }}{{ .Content }}'
    '{{ if not $last }}<|eot_id|>{{ end }}{{ end }}{{ end }}"""\nPARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|eom_id|>"\n'
)


def test_modelfile_for_chatml(smol_tokenizer):
    assert modelfile_text("m.gguf", load_catalogue()["chatml"], smol_tokenizer, add_bos=False) == CHATML_MODELFILE


def test_modelfile_for_llama3_leaves_bos_to_llama_cpp(llama3_tokenizer):
    spec = load_catalogue()["llama3"]
    assert modelfile_text("m.gguf", spec, llama3_tokenizer, add_bos=True) == LLAMA3_MODELFILE
    assert go_template(spec, "<|begin_of_text|>", "<|eot_id|>", add_bos=False).startswith("<|begin_of_text|>{{ if")


def test_modelfile_puts_a_system_prompt_inside_the_first_user_turn_for_mistral():
    text = go_template(load_catalogue()["mistral"], "<s>", "</s>", add_bos=True)
    assert text == ('{{ $system := .System }}' + RANGE + '{{ if eq .Role "user" }}[INST] {{ if $system }}'
                    '{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}[/INST]'
                    '{{ else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}</s>{{ end }}{{ end }}{{ end }}')


def test_the_written_modelfile_has_the_default_system_prompt(f16_export):
    text = (f16_export / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-f16.gguf\nTEMPLATE \"\"\"{{ if .System }}<|im_start|>system\n")
    assert text.endswith('PARAMETER stop "<|im_end|>"\n'
                         'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n')


def test_the_training_template_is_found_from_the_tokenizers_chat_template(smol_tokenizer, llama3_tokenizer):
    assert training_template(smol_tokenizer, None).name == "smollm2"
    assert training_template(llama3_tokenizer, "auto").name == "llama3"
    assert training_template(llama3_tokenizer, "chatml").name == "chatml"


def test_an_unknown_chat_template_is_refused_for_ollama(smol_tokenizer):
    tok = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(LmforgeError, match="none of the catalogue's.*set --template"):
        training_template(tok, None)


@pytest.mark.parametrize("options, message", [
    ({"gguf_type": "q8_0"}, "gguf_type applies to GGUF files: add --export_format gguf"),
    ({"export_ollama": True}, "export_ollama applies to GGUF files"),
    ({"export_format": "gguf", "export_dtype": "float16"}, "for gguf choose the type with gguf_type"),
])
def test_options_that_need_gguf_are_refused_without_it(options, message):
    with pytest.raises(LmforgeError, match=message):
        ExportArguments(export_dir="x", **options)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("lmforge: error: ")
    return err


def test_an_unknown_type_names_the_supported_ones(tiny_llama_dir, tmp_path, capsys):
    assert export(tiny_llama_dir, tmp_path / "out", "--gguf_type", "q4_K") == 2
    assert "gguf_type' expects {f32,f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0}" in one_line_error(capsys)


def test_an_unknown_architecture_is_refused_before_loading_weights(smol_tokenizer, tmp_path, capsys):
    from transformers import AutoConfig

    folder = tmp_path / "gemma"  # a config and a tokenizer, no weights: refused before they would be loaded
    AutoConfig.for_model("gemma", vocab_size=len(smol_tokenizer), hidden_size=32, num_hidden_layers=2).save_pretrained(
        folder)
    smol_tokenizer.save_pretrained(folder)
    assert export(folder, tmp_path / "out") == 2
    assert "GGUF export supports the architectures llama, mistral, qwen2, qwen3" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_4_bit_base_and_a_busy_folder_are_refused(tiny_llama_dir, tmp_path, capsys):
    assert export(tiny_llama_dir, tmp_path / "out", "--quantization_bit", "4") == 2
    assert "cannot merge into a 4-bit base: remove quantization_bit" in one_line_error(capsys)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.gguf").write_text("keep")
    assert export(tiny_llama_dir, busy) == 2
    assert "is not empty" in one_line_error(capsys) and (busy / "mine.gguf").read_text() == "keep"


def test_a_config_transformers_would_read_back_differently_is_refused(smol_tokenizer_dir, tmp_path, capsys):
    """Qwen3 files state no head_dim that transformers reads: it would build 128-wide heads instead of 8."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    config = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, head_dim=8,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    assert export(tmp_path / "qwen3", tmp_path / "out") == 2
    assert "would read head_dim = 128 back from the GGUF file, but the qwen3 model has 8" in one_line_error(capsys)
    assert not [p for p in (tmp_path / "out").iterdir()]  # neither the file nor a partial one
