"""Structure-aware fuzzing of what a model file can make llmkit run: chat templates and tokenizer.json
regular expressions (issue 18, classes 1 and 3). Registered in fuzz_harnesses.HARNESSES.

Byte mutation of a few seeds rarely yields a template that parses, so the seeds themselves are
generated: random Jinja expressions built from the operations that can build large values (string
filters with large widths, str methods, operators, literals, loops, macros, format specs), then
mutated with a dictionary of the same fragments. The tokenizer seeds are tokenizer.json files whose
Split pre-tokenizer and Replace normalizer carry real and hostile patterns, mutated with regex pieces.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BIG = ["10**9", "2000000000", "999999", "10**6", "2**31", "-1", "0", "3", "10**100"]
ATOMS = ["'x'", "'ab\\t'", "s", "messages", "messages[0]['content']", "range(5)", "range(10**6)", "[s, s]",
         "{'a': s}", "ns.x", "2**64", "1.5", "'%s-%d'", "'{0:{1}}'", "(1, 2)", "bos_token", "loop", "none", "lipsum"]
FILTERS = ["center({n})", "indent({n})", "indent('y' * {n})", "wordwrap(1)", "replace('', 'xx')", "replace('x', s)",
           "join(s)", "format(1, 2)", "truncate({n}, end=s)", "tojson(indent={n})", "pprint", "string", "list",
           "batch({n}, 'x')", "slice({n})", "sum(start=[])", "map('center', {n})", "map('string')", "unique",
           "sort", "dictsort", "reverse", "urlize", "escape", "xmlattr", "upper", "title", "trim", "length",
           "first", "int", "float", "abs", "round({n})", "selectattr('role')", "groupby('role')", "attr('x')"]
METHODS = ["center({n})", "ljust({n})", "rjust({n})", "zfill({n})", "expandtabs({n})", "replace('', s)",
           "join(s)", "format({n})", "format_map(s)", "translate({{120: s}})", "split()", "to_bytes({n}, 'big')",
           "fromkeys(range({n}), s)", "encode()", "count('x')", "upper()", "__class__", "mro()"]
OPS = ["*", "+", "~", "%", "**", "//", "-", "in", "==", "<"]
STATEMENTS = [
    "{{% set s = {e} %}}", "{{{{ {e} }}}}", "{{% for i in {e} %}}{{{{ {e} }}}}{{% endfor %}}",
    "{{% if {e} %}}{{{{ {e} }}}}{{% else %}}x{{% endif %}}", "{{% set ns.x = {e} %}}",
    "{{% macro f(n) %}}{{{{ f(n - 1) }}}}{{{{ {e} }}}}{{% endmacro %}}{{{{ f(20) }}}}",
    "{{% filter {f} %}}{{{{ {e} }}}}{{% endfilter %}}", "{{% set t %}}{{{{ {e} }}}}{{% endset %}}{{{{ t ~ t }}}}",
]
TEMPLATE_TOKENS = [t.encode() for t in (
    "{{ ", " }}", "{% for a in range(10**6) %}", "{% endfor %}", "|center(2000000000)", ".ljust(10**9)", " * 10**9",
    " ~ s ~ s", "[s, s, s, s]", "|tojson(indent=10**6)", "'%0999999999d' % 1", "{% set s = 'x' * 1000000 %}",
    "|map('center', 999999)|list", "|batch(10**9, 'x')", "(1).to_bytes(10**10, 'big')", "lipsum(10**7)",
    "namespace(x=2**64)", "|pprint", "|string", ".__class__", "|attr('__globals__')", "loop.cycle(", "(", ")",
    "{% filter upper %}", "{% endfilter %}", ".replace('', 'xx')", ".expandtabs(10**7)", ".format(", "|sum(start=[])",
    "{% macro f(n) %}{{ f(n-1) }}{{ f(n-1) }}{% endmacro %}{{ f(30) }}", "{%", "%}", "'", "|", ".", ",", "10**9")]


def expression(rng: random.Random, depth: int = 0) -> str:
    expr = rng.choice(ATOMS)
    for _ in range(rng.randint(0, 3 - min(depth, 2))):
        kind = rng.randrange(3)
        n = rng.choice(BIG)
        if kind == 0:
            expr = f"({expr})|{rng.choice(FILTERS).format(n=n)}"
        elif kind == 1:
            expr = f"({expr}).{rng.choice(METHODS).format(n=n)}"
        else:
            other = expression(rng, depth + 1) if depth < 2 else rng.choice(ATOMS)
            expr = f"({expr}) {rng.choice(OPS)} ({other})"
    return expr


def random_template(rng: random.Random) -> str:
    parts = ["{% set s = 'x' * " + rng.choice(["10", "1000", "1000000"]) + " %}",
             "{% set ns = namespace(x=" + rng.choice(["[]", "'x'", "2**64", "s"]) + ") %}"]
    for _ in range(rng.randint(1, 4)):
        parts.append(rng.choice(STATEMENTS).format(e=expression(rng), f=rng.choice(FILTERS).format(n=rng.choice(BIG))))
    return "".join(parts)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {{ there }} 🙂"},
            {"role": "assistant", "content": "hello"}]


def template_seeds(_: Path) -> list[bytes]:
    rng = random.Random(18)
    return [random_template(rng).encode() for _ in range(400)]


def template_target(data: bytes, _: Path) -> object:
    from llmkit.tokenizer.chat import render_chat

    return render_chat(data.decode("utf-8", errors="replace"), MESSAGES, bos_token="<s>", eos_token="</s>")


PATTERNS = [
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(a+)+b", r"(a|aa)+$", r"\s*\s*\s*\s*\s*!",  # refused by the scan; by a probe; accepted
]
REGEX_TOKENS = [json.dumps(t)[1:-1].encode() for t in (
    "(a+)+", "(\\w+\\s?)*", "\\s*", "{1,3}", "{2,}", "{0,1000}", "(?i:", "\\p{L}", "[^\\s]", "|", "*", "+", "?", "(",
    ")", "*+", "++", "(?:", "(?=", "(?!", ".*", "\\", "[", "]", "$", "^", "(?>", "\\1")]


def tokenizer_seeds(_: Path) -> list[bytes]:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world, the tokenizer reads bytes", "aaaa bbbb 1234 \n\n"] * 4, vocab_size=300,
                          min_frequency=1)
    base = json.loads(tok.backend.to_str())
    seeds = []
    for pattern in PATTERNS:
        data = dict(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            base["pre_tokenizer"]]})
        seeds.append(json.dumps(data).encode())
        data = dict(base, normalizer={"type": "Replace", "pattern": {"Regex": pattern}, "content": "x"})
        seeds.append(json.dumps(data).encode())
    return seeds


def tokenizer_target(data: bytes, scratch: Path) -> object:
    from llmkit.tokenizer import Tokenizer

    path = scratch / "tokenizer.json"
    path.write_bytes(data)
    tok = Tokenizer.load(path)
    return [tok.decode(tok.encode(text)) for text in ("a" * 30 + "b", "héllo wörld 🙂 " * 20, " " * 200 + "x")]
