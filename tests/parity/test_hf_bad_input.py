"""Hostile and broken Hugging Face directories (../shared/RELIABILITY.md L1, L2, L3, L5, L6, L8, L9).

Every case starts from a valid tiny LLaMA directory and breaks one thing. Each must fail with one
line that names the file (an LlmkitError), never unpickle or import anything from the directory,
and never allocate the model before the checks pass.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.config import preset
from llmkit.errors import CheckpointError, ConfigError, LlmkitError, ModelFormatError
from llmkit.io.hf import save_hf
from llmkit.models.causal_lm import CausalLM
from hf_tiny import VOCAB, build_hf_model, train_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("valid_llama")
    build_hf_model("llama", directory, train_tokenizer())
    return directory


@pytest.fixture
def copy(valid, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(valid, target)
    return target


def edit_config(directory: Path, **changes) -> None:
    data = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    (directory / "config.json").write_text(json.dumps(data))  # NaN is written as the literal NaN


def refused(directory: Path, *needles: str, error: type = LlmkitError) -> str:
    with pytest.raises(error) as info:
        llmkit.load(directory)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


class Canary:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_only_directory_is_refused_and_never_unpickled(copy, tmp_path):
    canary = tmp_path / "CANARY"
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(Canary(canary)))
    msg = refused(copy, "pytorch_model.bin", "pickle", "safetensors", error=CheckpointError)
    assert "save_pretrained" in msg
    refused(copy / "pytorch_model.bin", "pickle")  # the file itself given as the model
    (copy / "config.json").unlink()  # no config at all: still refused by name
    refused(copy, "pytorch_model.bin", "pickle")
    assert not canary.exists()


@pytest.mark.parametrize("change, needles", [
    ({"hidden_size": ...}, ["config.json", "missing field 'hidden_size'"]),
    ({"model_type": "deberta"}, ["config.json", "unsupported model_type 'deberta'", "(supported: albert, bart, bert, big_bird, deberta-v2, gpt2, llama, longformer, mamba, mistral, openai-gpt, qwen2, roberta, rwkv, t5)"]),
    ({"num_hidden_layers": 0}, ["config.json", "num_hidden_layers"]),
    ({"num_hidden_layers": 5000}, ["config.json", "num_hidden_layers"]),
    ({"num_attention_heads": 0}, ["config.json", "num_attention_heads"]),
    ({"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": ...}, ["config.json", "not divisible"]),
    ({"num_key_value_heads": 3}, ["config.json", "num_key_value_heads=3"]),
    ({"vocab_size": 0}, ["config.json", "vocab_size"]),
    ({"vocab_size": "300"}, ["config.json", "vocab_size"]),
    ({"max_position_embeddings": 0}, ["config.json", "max_position_embeddings"]),
    ({"max_position_embeddings": 2**30}, ["config.json", "max_position_embeddings"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, ["config.json", "rope_theta"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ["config.json", "rope_theta"]),
    ({"rms_norm_eps": float("inf")}, ["config.json", "rms_norm_eps"]),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, ["config.json", "rope type 'longrope'"]),
    ({"hidden_act": "gelu"}, ["config.json", "hidden_act"]),
    # well-formed configs that disagree with the tensors
    ({"vocab_size": VOCAB + 1}, ["model.safetensors", "has shape (300, 64), config.json needs (301, 64)"]),
    ({"intermediate_size": 256}, ["model.safetensors", "mlp", "shape"]),
    ({"num_hidden_layers": 3}, ["/model: missing tensor model.layers.2"]),
])
def test_bad_config_is_one_line_naming_the_file(copy, change, needles):
    edit_config(copy, **change)
    refused(copy, *needles, error=ModelFormatError)


@pytest.mark.parametrize("sizes, needles", [
    # past ModelConfig's limits: refused when the config is read
    (dict(hidden_size=2**20, intermediate_size=2**20, num_attention_heads=2**10, num_key_value_heads=2**10),
     ["config.json", "d_model"]),
    # within them, but not the tensors' shapes: refused by the shape check, still before any allocation
    (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=16),
     ["model.safetensors", "shape"]),
])
def test_hostile_sizes_fail_before_allocating(copy, monkeypatch, sizes, needles):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the checks")

    edit_config(copy, **sizes)
    import llmkit.io.hf as hf

    monkeypatch.setattr(hf, "CausalLM", no_model)  # the real one may run only on the meta device
    refused(copy, *needles, error=ModelFormatError)


@pytest.mark.parametrize("payload", [
    struct.pack("<Q", 10**9) + b"{}",  # header length past the end of the file
    struct.pack("<Q", 12) + b"not json at all",  # header is not JSON
    b"",  # empty file
])
def test_corrupt_safetensors_header(copy, payload):
    (copy / "model.safetensors").write_bytes(payload)
    refused(copy, "model.safetensors", error=ModelFormatError)


def test_half_precision_loads_and_integer_weights_are_refused(copy):
    tensors = load_file(copy / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in tensors.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    embed = llmkit.load(copy).model.embeddings.embed.weight
    assert embed.dtype == torch.float32
    assert torch.equal(embed, tensors["model.embed_tokens.weight"].bfloat16().float())
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    refused(copy, "model.safetensors", "model.norm.weight has dtype I8", error=ModelFormatError)


def shard(directory: Path) -> dict[str, str]:
    """Split model.safetensors into two shards plus an index; return the weight map."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, directory / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    write_index(directory, weight_map)
    return weight_map


def write_index(directory: Path, weight_map: dict[str, str], raw: str | None = None) -> None:
    text = raw or json.dumps({"metadata": {}, "weight_map": weight_map})
    (directory / "model.safetensors.index.json").write_text(text)


def test_sharded_directory_loads_like_the_single_file(valid, copy):
    shard(copy)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(llmkit.load(copy).model(ids), llmkit.load(valid).model(ids))


@pytest.mark.parametrize("attack", ["missing_shard", "dotdot", "absolute", "two_shards_in_index",
                                    "tensor_in_two_shards", "symlink_escape"])
def test_sharded_index_hygiene(copy, tmp_path, attack):
    weight_map = shard(copy)
    first = next(iter(weight_map))
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(copy / weight_map[first], outside)
    if attack == "missing_shard":
        (copy / "model-00002-of-00002.safetensors").unlink()
    elif attack in ("dotdot", "absolute"):
        weight_map[first] = "../outside.safetensors" if attack == "dotdot" else str(outside)
        write_index(copy, weight_map)
    elif attack == "two_shards_in_index":  # the same tensor name twice in the JSON object
        body = json.dumps(weight_map)[1:-1]
        write_index(copy, weight_map, raw='{"weight_map": {%s, "%s": "model-00002-of-00002.safetensors"}}'
                                         % (body, first))
    elif attack == "tensor_in_two_shards":
        other = "model-00002-of-00002.safetensors"
        tensors = load_file(copy / other)
        tensors[first] = load_file(copy / weight_map[first])[first]
        save_file(tensors, copy / other, metadata={"format": "pt"})
    else:
        link = copy / "model-00002-of-00002.safetensors"
        link.unlink()
        link.symlink_to(outside)
    needle = {"missing_shard": "model-00002-of-00002.safetensors: no such file", "dotdot": "'../outside",
              "absolute": "is not a plain file name", "two_shards_in_index": "appears twice",
              "tensor_in_two_shards": "is also in", "symlink_escape": "outside the model directory"}[attack]
    refused(copy, needle, error=ModelFormatError)


def test_loading_never_unpickles(valid, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert llmkit.load(valid).model is not None


def test_auto_map_code_is_never_run(copy, tmp_path):
    canary = tmp_path / "CANARY"
    (copy / "evil.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    edit_config(copy, auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": {"AutoTokenizer": ["evil.T", None]}}))
    assert llmkit.load(copy).model is not None
    assert not canary.exists()


@pytest.mark.parametrize("file, change, needle", [
    ("generation_config.json", {"eos_token_id": 10**6}, "eos_token_id"),
    ("generation_config.json", {"eos_token_id": [1, -1]}, "eos_token_id"),
    ("generation_config.json", {"pad_token_id": VOCAB}, "pad_token_id"),
    ("tokenizer_config.json", {"eos_token": "<|not-a-token|>"}, "eos_token"),
    ("tokenizer_config.json", {"bos_token": 5}, "bos_token"),
])
def test_bad_tokenizer_metadata(copy, file, change, needle):
    data = json.loads((copy / file).read_text())
    (copy / file).write_text(json.dumps({**data, **change}))
    refused(copy, file, needle, error=ModelFormatError)


def test_missing_tokenizer_json(copy):
    (copy / "tokenizer.json").unlink()
    refused(copy, "tokenizer.json", error=ModelFormatError)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    tok = train_tokenizer()
    model = CausalLM(preset("gpt2-tiny", vocab_size=VOCAB, position="alibi"))
    with pytest.raises(ModelFormatError, match="position='alibi'"):
        save_hf(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    model = CausalLM(preset("llama-tiny", vocab_size=VOCAB, norm="layernorm"))
    with pytest.raises(ModelFormatError, match="norm='layernorm'"):
        save_hf(model, tok, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        save_hf(CausalLM(preset("llama-tiny", vocab_size=VOCAB)), tok, tmp_path / "full")


def test_cli_generate_exits_2_on_a_bad_directory(copy):
    edit_config(copy, num_hidden_layers=5000)
    script = Path(sys.executable).with_name("llmkit")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "llmkit.cli"]
    run = subprocess.run([*cmd, "generate", "--model", str(copy), "--prompt", "x"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "config.json" in run.stderr and "num_hidden_layers" in run.stderr
