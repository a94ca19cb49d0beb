"""SentencePiece models, read without the sentencepiece library, encode exactly as sentencepiece does.

Models are trained here with the `sentencepiece` package (a dev extra) in the configurations real
checkpoints use: BPE with byte fallback and no whitespace cleanup (LLaMA-1/2, Mistral v0.1,
TinyLlama), and unigram with NFKC normalisation (T5)."""

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch

spm = pytest.importorskip("sentencepiece")

import llmkit  # noqa: E402
from llmkit.errors import ModelFormatError  # noqa: E402
from llmkit.tokenizer.sentencepiece import read_sentencepiece, sentencepiece_backend  # noqa: E402

PROBES = ["Hello world", "  leading and  double  spaces  ", "def f(x):\n    return x + 1\n", "naïve café über straße",
          "東京タワー 🙂 emoji and ☃", "ﬁ ligature, full-width ＡＢＣ１２３", "x" * 60, "", " ", "\t tab \n newline",
          "numbers 12345 and 3.14159", "Кириллица и “кавычки”", "mixed\u00a0nbsp\u3000ideographic space"]
CONFIGS = {
    "llama_bpe": dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                      byte_fallback=True, split_digits=True),
    "t5_unigram": dict(model_type="unigram", normalization_rule_name="nmt_nfkc", byte_fallback=False),
    "bpe_nfkc": dict(model_type="bpe", normalization_rule_name="nmt_nfkc", byte_fallback=True),
    "unigram_fallback": dict(model_type="unigram", normalization_rule_name="identity", byte_fallback=True),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:25]:
        lines += [line for line in path.read_text(encoding="utf-8", errors="ignore").splitlines() if line.strip()]
    lines += PROBES * 3
    file = tmp_path_factory.mktemp("spm") / "corpus.txt"
    file.write_text("\n".join(lines), encoding="utf-8")
    return file, random.Random(0).sample(lines, 250)


def train(corpus_file: Path, name: str, vocab_size: int = 700) -> Path:
    prefix = corpus_file.parent / name
    spm.SentencePieceTrainer.train(input=str(corpus_file), model_prefix=str(prefix), vocab_size=vocab_size,
                                   character_coverage=0.9995, minloglevel=2, **CONFIGS[name])
    return prefix.with_suffix(".model")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ids_and_text_equal_sentencepiece(corpus, name):
    corpus_file, sample = corpus
    model_file = train(corpus_file, name)
    reference = spm.SentencePieceProcessor(model_file=str(model_file))
    ours = sentencepiece_backend(read_sentencepiece(model_file))
    assert ours.get_vocab_size() == reference.get_piece_size()
    for text in PROBES + sample:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        if reference.unk_id() not in ids:  # sentencepiece writes an unknown piece as " ⁇ ", tokenizers as <unk>
            assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text


def test_hf_directory_with_only_tokenizer_model_loads(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    model_file = train(corpus[0], "llama_bpe")
    reference = spm.SentencePieceProcessor(model_file=str(model_file))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=reference.get_piece_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(model_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    lm = llmkit.load(tmp_path)
    text = "def f(x):\n    return x + 1"
    assert lm.prefix_ids == [1] and lm.eos_ids == [2]
    assert lm.tokenizer.encode(text) == reference.encode(text)
    ids = torch.tensor([lm.prefix_ids + lm.tokenizer.encode(text)])
    with torch.no_grad():
        # the same fp32 ops as transformers: 0.0 measured (AVX-512 / AVX2 / default)
        assert (lm.model(ids) - hf(ids).logits).abs().max() < 1e-4
    assert isinstance(lm.generate("def", max_new_tokens=4, temperature=0), str)


@pytest.mark.parametrize("blob, problem", [
    (b"", "no pieces"), (b"\x0a\xff\xff", "truncated varint"), (b"\x0a\x7f", "past the end"), (b"\x0b", "wire type 3"),
    (b"\x0a\x07\x0a\x05hello", "unknown piece"), (bytes(range(256)), "not a SentencePiece model"),
])
def test_malformed_model_is_refused_with_the_file_named(tmp_path, blob, problem):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError) as error:
        read_sentencepiece(path)
    assert str(error.value).startswith(str(path)) and problem in str(error.value)


def _message(*fields: tuple[int, int, bytes | int]) -> bytes:
    """Protobuf wire bytes for (field number, wire type, value) triples (values < 128 for varints)."""
    out = b""
    for number, wire, value in fields:
        out += bytes([number << 3 | wire])
        out += bytes([value]) if wire == 0 else bytes([len(value)]) + value
    return out


def test_corrupt_character_map_is_a_format_error(tmp_path):
    """Fuzzing finding (sentencepiece harness): tokenizers raised a bare Exception for a bad charsmap."""
    unk = _message((1, 2, b"<unk>"), (3, 0, 2))
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_message((1, 2, unk), (1, 2, _message((1, 2, b"a"))), (3, 2, _message((2, 2, b"\x01\x02\x03")))))
    model = read_sentencepiece(path)
    assert [p for p, _, _ in model.pieces] == ["<unk>", "a"]
    with pytest.raises(ModelFormatError, match="corrupt normaliser character map"):
        sentencepiece_backend(model)
