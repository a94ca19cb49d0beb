"""Quantised models saved and loaded back (llmkit/quant/saved.py via llmkit.load): the same logits,
bit for bit; no full-precision copy of a quantised layer on disk; damaged files refused in one line."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.api import LanguageModel
from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ConfigError, LlmkitError, ModelFormatError
from llmkit.layers.quantized import KERNEL_MAX_ROWS, Int4Linear, Int8Linear
from llmkit.models.build import build_model
from llmkit.quant.apply import quantize_model
from llmkit.quant.saved import refuse_export, save_quantized
from llmkit.quant.scheme import QuantScheme
from llmkit.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog while the model counts tokens and bytes. " * 40
SCHEMES = {
    "int8 rtn per channel": QuantScheme.create("rtn", 8, None, None),
    "int4 rtn g32 asymmetric": QuantScheme.create("rtn", 4, 32, False),
    "int4 rtn g128 symmetric": QuantScheme.create("rtn", 4, 128, True),
    "int4 gptq g64": QuantScheme.create("gptq", 4, 64, False),
    "int4 awq g32": QuantScheme.create("awq", 4, 32, True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], 300)


def language_model(tokenizer, tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=tokenizer.vocab_size, max_seq_len=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
               norm="rmsnorm", mlp="swiglu", position="rope", bias=False, init_std=0.1, d_ff=256)
    return LanguageModel(build_model(ModelConfig(**{**cfg, **overrides})).eval(), tokenizer, tmp_path)


def ids(rows, length, seed):
    return torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SCHEMES)
def test_saved_and_reloaded_quantised_model_gives_identical_logits(name, tokenizer, tmp_path):
    assert 3 * 60 > KERNEL_MAX_ROWS >= 20
    lm = language_model(tokenizer, tmp_path)
    scheme = SCHEMES[name]
    report = quantize_model(lm.model, scheme, calibration=None if scheme.method == "rtn" else ids(4, 48, 1))
    assert report.quantized == 2 * 4 + 1 and not report.kept  # qkv, o, gate_up, down per block, and the head
    assert isinstance(lm.model.lm_head, Int8Linear if scheme.bits == 8 else Int4Linear)
    out = save_quantized(lm, tmp_path / "q")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # readable as the umask allows, not mkdtemp's 0700
    loaded = llmkit.load(out)
    assert loaded.model.quantization == scheme
    saved = load_file(out / "model.safetensors")
    assert not any(k.endswith("_proj.weight") or k == "lm_head.weight" for k in saved)  # codes only
    for rows, length in ((1, 20), (3, 60)):  # 20 rows: the int4 kernel; 180 > KERNEL_MAX_ROWS: dequantised
        x = ids(rows, length, 2)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), lm.model(x))
    assert loaded.generate("the quick", max_new_tokens=6, temperature=0) == lm.generate("the quick", max_new_tokens=6,
                                                                                          temperature=0)


def test_int4_is_an_eighth_of_the_fp32_bytes_plus_the_scales(tokenizer, tmp_path):
    lm = language_model(tokenizer, tmp_path, tie_embeddings=False)
    linear_weights = sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
    quantize_model(lm.model, QuantScheme.create("rtn", 4, 128, False))
    saved = load_file(save_quantized(lm, tmp_path / "q") / "model.safetensors")
    codes = sum(v.numel() for k, v in saved.items() if k.endswith("packed_codes"))
    scales = sum(v.numel() for k, v in saved.items() if k.endswith((".scale", ".offset")))
    assert codes == linear_weights // 2 and scales == 2 * linear_weights // 128


def test_layers_the_group_does_not_divide_stay_in_full_precision(tokenizer, tmp_path):
    lm = language_model(tokenizer, tmp_path, d_ff=96 * 2)  # down_proj's in_features 192: not a multiple of 128
    report = quantize_model(lm.model, QuantScheme.create("rtn", 4, 128, False))
    assert report.kept == ["stack.blocks.0.mlp.down_proj", "stack.blocks.1.mlp.down_proj"]
    loaded = llmkit.load(save_quantized(lm, tmp_path / "q"))
    x = ids(1, 30, 3)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), lm.model(x))


def test_a_quantised_model_is_neither_exported_nor_quantised_again(tokenizer, tmp_path):
    lm = language_model(tokenizer, tmp_path)
    quantize_model(lm.model, QuantScheme.create("rtn", 8, None, None))
    with pytest.raises(ModelFormatError, match="int8 rtn per channel"):
        refuse_export(lm.model, "q")
    loaded = llmkit.load(save_quantized(lm, tmp_path / "q"))
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_model(loaded.model, QuantScheme.create("rtn", 4, 32, False))


@pytest.fixture
def saved_dir(tokenizer, tmp_path):
    lm = language_model(tokenizer, tmp_path)
    quantize_model(lm.model, QuantScheme.create("rtn", 4, 32, False))
    return save_quantized(lm, tmp_path / "q")


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


DAMAGE = {
    "codes of the wrong shape": lambda t: t.update({"lm_head.packed_codes": t["lm_head.packed_codes"][:, :-1].contiguous()}),
    "codes stored as floats": lambda t: t.update({"lm_head.packed_codes": t["lm_head.packed_codes"].float()}),
    "a scale missing": lambda t: t.pop("stack.blocks.0.attn.o_proj.scale"),
    "scales that do not divide the row": lambda t: t.update(
        {"lm_head.scale": torch.ones(t["lm_head.scale"].shape[0], 3, dtype=torch.bfloat16),
         "lm_head.offset": torch.ones(t["lm_head.scale"].shape[0], 3, dtype=torch.bfloat16)}),
    "codes for a module that is not a linear layer": lambda t: t.update(
        {"stack.blocks.0.norm1.packed_codes": torch.zeros(4, 4, dtype=torch.uint8)}),
    "an unexpected tensor": lambda t: t.update({"extra.weight": torch.zeros(2)}),
    "a NaN scale": lambda t: t["lm_head.scale"].view(-1).__setitem__(0, float("nan")),
    "a bias of the wrong length": lambda t: t.update({"stack.blocks.0.attn.o_proj.bias": torch.zeros(3)}),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_quantised_tensors_are_refused_in_one_line(case, saved_dir):
    _rewrite(saved_dir, DAMAGE[case])
    with pytest.raises(CheckpointError) as exc:
        llmkit.load(saved_dir)
    assert "\n" not in str(exc.value) and "model.safetensors" in str(exc.value)


@pytest.mark.parametrize("scheme", [{"method": "rtn", "bits": 3}, {"method": "hqq"}, {"bits": 8, "symmetric": False},
                                    {"group_size": -4}, {"colour": "red"}, "int4"])
def test_a_bad_scheme_in_config_is_refused_in_one_line(scheme, saved_dir):
    meta = json.loads((saved_dir / "config.json").read_text())
    meta["quantization"] = scheme
    (saved_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as exc:
        llmkit.load(saved_dir)
    assert "\n" not in str(exc.value) and "quantization" in str(exc.value)


def test_saving_over_a_directory_with_files_is_refused_and_leaves_it_alone(tokenizer, tmp_path):
    lm = language_model(tokenizer, tmp_path)
    quantize_model(lm.model, QuantScheme.create("rtn", 4, 32, False))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LlmkitError, match="already exists and is not empty"):
        save_quantized(lm, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    shutil.rmtree(tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == []  # and no temporary directory was left either
