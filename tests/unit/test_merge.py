"""The export merge: layer by layer in float64, equal to peft's float64 merge rounded once (LoRA, DoRA, rsLoRA,
embeddings), never more than one layer in float64, a wrong merge refused, and an adapter whose weights did not
really load into the base model refused."""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.export.merge import merge_adapters

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


def load_base(model_dir, dtype=torch.float32, **config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **config)


@pytest.fixture()
def base(tiny_llama_dir):
    return load_base(tiny_llama_dir)


def save_adapter(model, out, trained: bool = True, **lora):
    """A rank-2 LoRA adapter (q_proj and v_proj unless `lora` says otherwise); `trained` gives lora_B (and DoRA's
    magnitudes) non-zero, seeded changes, as training would."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"]} | lora))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if trained and ("lora_B" in name or "lora_embedding_" in name):  # an embedding's lora_A starts at zero
            p.data.normal_(std=0.1)
        elif trained and "lora_magnitude_vector" in name:
            p.data.mul_(1 + 0.1 * torch.randn_like(p))
        elif trained and "modules_to_save" in name:
            p.data.add_(0.01 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    peft_model.unload()  # the base model without the LoRA layers, for the merge under test
    return out


def float64_merge(model_dir, adapter) -> dict[str, torch.Tensor]:
    """The reference: the whole base in float64 with peft's merge_and_unload."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_dir, torch.float64), adapter).merge_and_unload().state_dict()


def float64_logits(model, adapter=None) -> torch.Tensor:
    """Logits of a float64 copy of `model` (with `adapter`, unmerged) on fixed ids."""
    import copy

    from peft import PeftModel

    model = copy.deepcopy(model).double()
    model = PeftModel.from_pretrained(model, adapter) if adapter else model
    with torch.no_grad():
        return model(input_ids=torch.arange(5, 40).view(1, -1)).logits  # (1, T, V)


def assert_float64_merge_rounded_once(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_an_adapter_whose_keys_match_no_parameter_is_refused(base, tmp_path):
    adapter = save_adapter(base, tmp_path / "lora")
    weights = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("self_attn", "attention"): v for k, v in weights.items()}  # another model's names
    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(LmforgeError, match=f"{adapter}: adapter weight .*attention.* matches no parameter"):
        merge_adapters(base, [str(adapter)], 1e-6)


def test_an_adapter_whose_lora_b_are_all_zero_is_refused(base, tmp_path):
    adapter = save_adapter(base, tmp_path / "lora", trained=False)
    with pytest.raises(LmforgeError, match="all lora_B are zero.*0 steps"):
        merge_adapters(base, [str(adapter)], 1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_merge_is_the_float64_merge_rounded_once(base, tiny_llama_dir, tmp_path, variant):
    adapter = save_adapter(base, tmp_path / "lora", target_modules=LINEAR, **VARIANTS[variant])
    expected, plain = float64_logits(base, adapter), float64_logits(base)
    merged, diff = merge_adapters(base, [str(adapter)], 1e-6)
    assert not hasattr(merged, "peft_config") and {p.dtype for p in merged.parameters()} == {torch.float32}
    assert 0 < diff < 1e-12  # float64: a correct merge agrees to rounding
    assert_float64_merge_rounded_once(merged.state_dict(), float64_merge(tiny_llama_dir, adapter))
    # merged float32 weights, run in float64, give base+adapter's float64 logits to float32's rounding
    got = float64_logits(merged)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected - plain).abs().max() > 1e-2  # the adapter mattered


def test_an_embedding_lora_merges_and_a_tied_one_is_refused(tiny_llama_dir, tmp_path):
    """Merging into embeddings tied to the output layer would change the output layer too, which the adapter
    never did; untied, the embedding merges like a linear layer."""
    lora = {"target_modules": ["embed_tokens", "q_proj"]}
    tied = save_adapter(load_base(tiny_llama_dir), tmp_path / "tied", **lora)
    with pytest.raises(LmforgeError, match="embed_tokens: its LoRA weight is tied to .*lm_head.weight"):
        merge_adapters(load_base(tiny_llama_dir), [str(tied)], 1e-6)
    untied_dir = tmp_path / "untied-model"
    load_base(tiny_llama_dir, tie_word_embeddings=False).save_pretrained(untied_dir)  # lm_head: a random copy
    base = load_base(untied_dir)
    adapter = save_adapter(base, tmp_path / "untied", **lora)
    merged, diff = merge_adapters(base, [str(adapter)], 1e-6)
    assert diff < 1e-12
    assert_float64_merge_rounded_once(merged.state_dict(), float64_merge(untied_dir, adapter))
    assert not torch.equal(merged.model.embed_tokens.weight, load_base(untied_dir).model.embed_tokens.weight)


def test_trained_copies_of_tied_embeddings_export_untied(base, tiny_llama_dir, tmp_path):
    """modules_to_save (additional_target) gives embed_tokens and lm_head their own trained copies: the export
    keeps both and says they are no longer tied, or loaders would tie lm_head back to embed_tokens."""
    import json

    adapter = save_adapter(base, tmp_path / "lora", modules_to_save=["embed_tokens", "lm_head"])
    out = tmp_path / "merged"
    assert export(tiny_llama_dir, adapter, out) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    saved, reference = load_file(out / "model.safetensors"), float64_merge(tiny_llama_dir, adapter)
    assert sorted(saved) == sorted(reference)
    assert_float64_merge_rounded_once(saved, reference)
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])


@pytest.fixture()
def float64_census(monkeypatch):
    """Records, whenever peft merges a LoRA layer (not yet merged), the float64 parameters of the whole model
    and of that layer."""
    from peft.tuners import lora

    census, models = [], []
    for cls in (lora.Linear, lora.Embedding):
        def merge(self, *args, _merge=cls.merge, **kwargs):
            if not self.merged:
                float64 = sum(p.numel() for p in models[0].parameters() if p.dtype == torch.float64)
                census.append((float64, sum(p.numel() for p in self.parameters())))
            return _merge(self, *args, **kwargs)

        monkeypatch.setattr(cls, "merge", merge)
    return census, models


def test_only_the_layer_being_merged_is_float64(base, tmp_path, float64_census):
    census, models = float64_census
    adapter = save_adapter(base, tmp_path / "lora", target_modules=LINEAR, use_dora=True)
    total = sum(p.numel() for p in base.parameters())
    models.append(base)  # peft wraps the layers of `base` in place
    merge_adapters(base, [str(adapter)], 1e-6)
    assert len(census) == 2 * len(LINEAR)  # every layer of both blocks, one at a time
    assert all(float64 == layer for float64, layer in census), census
    assert max(float64 for float64, _ in census) < 0.05 * total, (census, total)
    assert {p.dtype for p in base.parameters()} == {torch.float32}


def export(model_dir, adapter, out, *extra):
    return main(["export", "--model_name_or_path", str(model_dir), "--adapter_name_or_path", str(adapter),
                 "--export_dir", str(out), *extra])


def test_a_wrong_merge_is_refused_and_nothing_written(base, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """An error of 1e-5 in one weight matrix: far below what float32 logits could tell from rounding."""
    from peft.tuners import lora

    adapter = save_adapter(base, tmp_path / "lora")
    merge = lora.Linear.merge

    def noisy_merge(self, *args, **kwargs):
        merge(self, *args, **kwargs)
        self.get_base_layer().weight.data += 1e-5 * torch.randn_like(self.get_base_layer().weight)

    monkeypatch.setattr(lora.Linear, "merge", noisy_merge)
    out = tmp_path / "merged"
    assert export(tiny_llama_dir, adapter, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmforge: error: base_model.model.model.layers.0.self_attn.q_proj: the merged layer's "
                              "output differs from base+adapter by ")
    assert err[-1].endswith("> check_tolerance 1e-06 (float64): the merge is wrong; nothing was written")
    assert not out.exists()


@pytest.fixture()
def bf16_model_dir(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "bf16"
    load_base(tiny_llama_dir, torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_a_bfloat16_base_exports_the_float64_merge_rounded_once(bf16_model_dir, tmp_path, capsys):
    adapter = save_adapter(load_base(bf16_model_dir), tmp_path / "lora", target_modules=LINEAR, use_dora=True)
    out = tmp_path / "merged"
    assert export(bf16_model_dir, adapter, out) == 0  # export_dtype auto: the checkpoint's bfloat16
    assert "exported to" in capsys.readouterr().out
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    reference = float64_merge(bf16_model_dir, adapter)
    assert_float64_merge_rounded_once(saved, reference)
    base = load_file(bf16_model_dir / "model.safetensors")
    assert not torch.equal(saved["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


def test_export_device_auto_without_a_gpu_merges_on_the_cpu(base, tiny_llama_dir, tmp_path, monkeypatch, caplog):
    adapter = save_adapter(base, tmp_path / "lora", use_rslora=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="lmforge.export.merge"):
        assert export(tiny_llama_dir, adapter, out, "--export_device", "auto") == 0
    assert "export_device auto: no CUDA GPU is visible, merging on the CPU" in caplog.text
    assert_float64_merge_rounded_once(load_file(out / "model.safetensors"), float64_merge(tiny_llama_dir, adapter))


@pytest.mark.gpu
def test_export_device_auto_merges_on_the_gpu(base, tiny_llama_dir, tmp_path, monkeypatch):
    from peft.tuners import lora

    adapter = save_adapter(base, tmp_path / "lora", target_modules=LINEAR, use_dora=True)
    devices, merge = [], lora.Linear.merge

    def recording_merge(self, *args, **kwargs):
        weight = self.get_base_layer().weight
        if not self.merged:  # peft's unload calls merge again, finding the layer merged
            devices.append((weight.device.type, weight.dtype))
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(lora.Linear, "merge", recording_merge)
    out = tmp_path / "merged"
    assert export(tiny_llama_dir, adapter, out, "--export_device", "auto") == 0
    assert devices == [("cuda", torch.float64)] * 2 * len(LINEAR)
    saved, reference = load_file(out / "model.safetensors"), float64_merge(tiny_llama_dir, adapter)
    for name, tensor in saved.items():  # cuBLAS may sum B @ A in another order: equal to float32's rounding
        torch.testing.assert_close(tensor, reference[name].float(), rtol=2e-7, atol=1e-8, msg=name)
