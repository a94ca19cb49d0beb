"""Hostile model files and generation flags given to real `python -m llmkit` processes (issue 18,
classes 1, 3, 6 and 7): chat-template bombs in GGUF metadata, tokenizer_config.json and
chat_template.jinja; a backtracking tokenizer.json regex; invalid UTF-8 in --prompt, the chat question
and --system; sampling flags past their ranges; NaN and infinite weights in GGUF and safetensors.

Every process must exit 2 with exactly one stderr line `error: ...` naming the problem, print no
traceback, and run under an address-space limit of MEMORY_LIMIT and a CPU-time limit of TIME_LIMIT
seconds (RLIMIT_AS and RLIMIT_CPU, set in the child before llmkit is imported): a template that
allocated gigabytes, a MemoryError, or a run past the limit (killed by SIGXCPU) fails the test.
CPU seconds rather than wall clock, so that a machine shared with other jobs does not fail it; a
hang (no CPU used) is caught by the WALL_LIMIT timeout.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from post_training_helpers import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from gguf_tiny import write_gguf  # noqa: E402

from bounded_llmkit import run_bounded  # noqa: E402

TIME_LIMIT = 30  # CPU seconds per process (importing torch is ~2 s; a template render stops at 2 s)
WALL_LIMIT = 300  # seconds: a hang detector only
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS per process; these runs peak near 300 MB resident
NOT_UTF8 = "caf\udce9 \udcff"  # the bytes b"caf\xe9 \xff" (Latin-1, not UTF-8) as Python's argv holds them
TEMPLATES = {
    "center": "{{ 'x'|center(2000000000) }}",
    "shared list": "{% set s = 'x' * 1000000 %}{{ ([s] * 1000000)|length }}",
}
TEMPLATES_ELSEWHERE = {  # the library's own test renders every bomb; these two more reach it from files
    "printf": "{{ '%0999999999d' % 1 }}",
    "str method": "{% for m in messages %}{{ m.content.ljust(10**10) }}{% endfor %}",
}
GGUF = dict(d=32, heads=2, kv_heads=1, ff=64, context=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import llmkit
    from llmkit.io.hf import save_hf

    root = tmp_path_factory.mktemp("models")
    lm = llmkit.load(save_tiny_model(root / "run"))
    hf = save_hf(lm.model, lm.tokenizer, root / "hf", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids)
    return {"hf": hf, "gguf": write_gguf(root / "tiny.gguf", **GGUF) and root / "tiny.gguf"}


def hf_copy(models: dict[str, Path], case: Path) -> Path:
    directory = case / "model"
    shutil.copytree(models["hf"], directory)
    return directory


def hf_template(where: str, template: str) -> Callable:
    def build(models: dict[str, Path], case: Path) -> Path:
        directory = hf_copy(models, case)
        if where == "chat_template.jinja":
            (directory / where).write_text(template, encoding="utf-8")
        else:
            config = json.loads((directory / where).read_text(encoding="utf-8"))
            (directory / where).write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
        return directory
    return build


def gguf_template(template: str) -> Callable:
    return lambda m, c: write_gguf(c / "t.gguf", meta={"tokenizer.chat_template": template}, **GGUF) and c / "t.gguf"


def hf_regex(models: dict[str, Path], case: Path) -> Path:
    directory = hf_copy(models, case)
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(\w+\s?)*$"}, "behavior": "Isolated", "invert": False},
        data["pre_tokenizer"]]}
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def hf_weight(value: float) -> Callable:
    def build(models: dict[str, Path], case: Path) -> Path:
        from safetensors.torch import load_file, save_file

        directory = hf_copy(models, case)
        tensors = load_file(directory / "model.safetensors")
        tensors["model.norm.weight"][1] = value
        save_file(tensors, directory / "model.safetensors")
        return directory
    return build


def gguf_weight(value: float) -> Callable:
    def build(models: dict[str, Path], case: Path) -> Path:
        weights = write_gguf(case / "ok.gguf", **GGUF)
        bad = weights["blk.0.ffn_down.weight"].copy()
        bad[0, 5] = value
        write_gguf(case / "bad.gguf", tensors={"blk.0.ffn_down.weight": bad}, **GGUF)
        return case / "bad.gguf"
    return build


FAST = ["--dtype", "fp32", "--threads", "1"]  # no precision probe: the run is only the input's own cost


def chat(build: Callable, *extra: str, question: str = "hi") -> Callable:
    return lambda m, c: ["chat", "--model", build(m, c), question, "--max-new-tokens", "2", *FAST, *extra]


def generate(build: Callable, *extra: str, prompt: str = "hi") -> Callable:
    return lambda m, c: ["generate", "--model", build(m, c), "--prompt", prompt, "--max-new-tokens", "2", *FAST,
                         *extra]


HF = lambda m, c: m["hf"]  # noqa: E731
# name → (models, case folder) → argv; and the text the one error line must contain
CASES: dict[str, tuple[Callable, str]] = {
    **{f"gguf_template_{k}": (chat(gguf_template(t)), "chat template") for k, t in TEMPLATES.items()},
    **{f"hf_tokenizer_config_template_{k}": (chat(hf_template("tokenizer_config.json", t)), "chat template")
       for k, t in TEMPLATES.items()},
    **{f"hf_chat_template_jinja_{k}": (chat(hf_template("chat_template.jinja", t)), "chat template")
       for k, t in TEMPLATES.items()},
    **{f"gguf_template_{k}": (chat(gguf_template(t)), "chat template") for k, t in TEMPLATES_ELSEWHERE.items()},
    "hf_tokenizer_backtracking_regex": (generate(hf_regex), "repeats a group"),
    "generate_prompt_not_utf8": (generate(HF, prompt=NOT_UTF8), "--prompt: byte 0xe9 is not valid UTF-8"),
    "generate_stop_not_utf8": (generate(HF, "--stop", NOT_UTF8), "--stop"),
    "chat_question_not_utf8": (chat(HF, question=NOT_UTF8), "the question"),
    "chat_system_not_utf8": (chat(HF, "--system", NOT_UTF8), "--system"),
    "generate_repetition_penalty_tiny": (generate(HF, "--repetition-penalty", "1e-300"), "repetition_penalty"),
    "generate_repetition_penalty_huge": (generate(HF, "--repetition-penalty", "1e300"), "repetition_penalty"),
    "generate_temperature_negative": (generate(HF, "--temperature=-1e-45"), "temperature"),
    "generate_temperature_huge": (generate(HF, "--temperature", "1e39"), "temperature"),
    "generate_top_p_zero": (generate(HF, "--top-p", "0"), "top_p"),
    "generate_min_p_over_one": (generate(HF, "--min-p", "1.5"), "min_p"),
    "chat_presence_penalty": (chat(HF, "--presence-penalty", "3"), "presence_penalty"),
    # named as llmkit calls the tensor (the final norm), after the Hugging Face names are mapped
    "hf_weight_nan": (generate(hf_weight(math.nan)), "model: tensor stack.final_norm.weight holds NaN or infinite"),
    "hf_weight_inf": (generate(hf_weight(-math.inf)), "model: tensor stack.final_norm.weight holds NaN"),
    "gguf_weight_nan": (generate(gguf_weight(math.nan)), "bad.gguf: tensor blk.0.ffn_down.weight holds NaN"),
    "gguf_weight_inf": (chat(gguf_weight(math.inf)), "bad.gguf: tensor blk.0.ffn_down.weight holds NaN or infinite"),
}
# Extreme values inside the ranges must generate: exit 0 and text on stdout.
WORKING = {
    "temperature_subnormal": ["--temperature", "1e-45"],
    "top_p_tiny": ["--top-p", "1e-300", "--temperature", "100"],
    "penalties_at_bounds": ["--repetition-penalty", "1000", "--presence-penalty", "-2", "--frequency-penalty", "2",
                            "--temperature", "0.5"],
    "min_p_one_top_k_huge": ["--min-p", "1", "--top-k", "4000000", "--temperature", "2"],
}


def run(argv: list, cwd: Path) -> dict:
    r = run_bounded(argv, cwd, memory=MEMORY_LIMIT, cpu_s=TIME_LIMIT, wall_s=WALL_LIMIT)
    return dict(rc=r.rc, stdout=r.stdout, stderr=r.stderr, argv=r.argv)


@pytest.fixture(scope="module")
def results(models, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile_models")

    def one(name: str) -> dict:
        case = root / name
        case.mkdir()
        argv = CASES[name][0](models, case) if name in CASES else \
            ["generate", "--model", models["hf"], "--prompt", "hi", "--max-new-tokens", "3", *FAST, *WORKING[name]]
        return run(argv, case)

    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(one, name) for name in [*CASES, *WORKING]}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_model_or_flag_is_one_error_line_and_exit_2(results, name):
    r = results[name]
    assert r["rc"] is not None, f"still running after {WALL_LIMIT} s: {r['argv']}"
    lines = r["stderr"].strip().splitlines()
    # generate prints one runtime line first (device, precision) once the model has loaded
    errors = [line for line in lines if line.startswith("error: ")]
    assert r["rc"] == 2 and len(errors) == 1 and lines[-1] == errors[0], r["stderr"][-2000:]
    assert len(lines) <= 2 and "Traceback" not in r["stderr"] and "MemoryError" not in r["stderr"], r["stderr"]
    assert CASES[name][1] in errors[0], errors[0]


@pytest.mark.parametrize("name", list(WORKING))
def test_extreme_settings_inside_the_ranges_generate(results, name):
    r = results[name]
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert r["stdout"].startswith("hi") and "error" not in r["stderr"]
