"""Hostile chat templates (issue 18, class 1): every way a template can build a value is bounded.

Each bomb below builds a value in C that no signal or clock could interrupt (a string filter with a
huge width, a str method, an operator, `~`, a literal, a repeat, a format spec, a big integer, a
shared element repeated so that `in` or `sort` scan far more than memory holds...). Each must end in a
one-line ChatTemplateError within TIME_LIMIT seconds of CPU time, and all of them together must
render under an address-space limit (RLIMIT_AS) of MEMORY_LIMIT in a child process, so a MemoryError
or an allocation of gigabytes fails the test. Real templates must render exactly as plain Jinja does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.tokenizer.chat import ChatTemplateError, render_chat

TIME_LIMIT = 3.0  # CPU seconds; the render's own deadline is MAX_SECONDS = 2 s of wall clock
WALL_LIMIT = 12.0  # a hang detector that a machine shared with other jobs does not trip
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of the child that renders every bomb (it starts near 60 MB)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
S = "{% set s = 'x' * 1000000 %}"  # the largest single string a template may build

BOMBS = {
    "center filter": "{{ 'x'|center(2000000000) }}",
    "center filter 10**11": "{{ 'x'|center(10**11) }}",
    "str.center": "{{ 'x'.center(10**9) }}",
    "str.ljust": "{{ 'x'.ljust(10**9) }}",
    "str.rjust": "{{ 'x'.rjust(10**9) }}",
    "str.zfill": "{{ 'x'.zfill(10**9) }}",
    "str.expandtabs": "{{ ('\t' * 1000).expandtabs(10**7) }}",
    "str.replace": "{{ ('a' * 1000).replace('a', 'b' * 100000) }}",
    "str.replace empty": "{{ ('a' * 100000).replace('', 'bbbbbbbbbbbbbbbbbbbb') }}",
    "str.join": "{{ ('y' * 100000).join('x' * 1000) }}",
    "str.format width": "{{ '{:>1000000000}'.format(1) }}",
    "str.format nested": "{{ '{0:{1}}'.format(1, 10**9) }}",
    "str.format many": "{{ ('{0:>900000}' * 100).format(1) }}",
    "str.translate": "{{ ('a' * 100).translate({97: 'x' * 100000}) }}",
    "int.to_bytes": "{{ (1).to_bytes(10**10, 'big') }}",
    "printf %": "{{ '%0999999999d' % 1 }}",
    "printf * width": "{{ '%*d' % (10**9, 1) }}",
    "format filter": "{{ '%0999999999d'|format(1) }}",
    "indent filter": "{{ ('x\n' * 1000)|indent(10**6) }}",
    "indent by string": "{{ ('x\n' * 1000)|indent('y' * 100000) }}",
    "wordwrap filter": "{{ ('x ' * 100000)|wordwrap(1, wrapstring='y' * 1000) }}",
    "replace filter": "{{ ('a' * 1000)|replace('a', 'b' * 100000) }}",
    "join filter": "{{ range(1000)|join('y' * 100000) }}",
    "truncate end": "{{ 'x'|truncate(1, end='y' * 10) * 10**8 }}",
    "escape filter": S + "{{ s|escape }}",
    "urlize filter": "{{ ('a.com ' * 100000)|urlize }}",
    "tojson indent": "{{ range(1000)|list|tojson(indent=10**6) }}",
    "pprint filter": "{{ range(100000)|list|pprint }}",
    "string of a list": "{{ (range(900000)|list)|string }}",
    "batch fill": "{{ range(10)|batch(10**9, 'x')|list }}",
    "slice": "{{ range(1000)|slice(10**9)|list }}",
    "sum of lists": "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}",
    "map center": "{{ range(100)|map('center', 999999)|list }}",
    "repeat a string": "{{ 'a' * 10**9 }}",
    "repeat a list": S + "{{ [s] * 1000000 }}",
    "repeat a shared string": S + "{% set l = [s] * 64 %}{{ ('y' * 1000000) in l }}",
    "list literal": S + "{{ [s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s] }}",
    "dict literal": S + "{{ {'a': s, 'b': s, 'c': s, 'd': s, 'e': s, 'f': s, 'g': s, 'h': s, 'i': s, 'j': s, "
                        "'k': s, 'l': s, 'm': s, 'n': s, 'o': s, 'p': s, 'q': s} }}",
    "dict.fromkeys": "{{ {}.fromkeys(range(100000), 'x' * 1000) }}",
    "concatenation ~": S + "{{ s ~ s ~ s }}",
    "concatenation +": S + "{{ s + s }}",
    "list +": "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "strings in a loop": "{% for i in range(1000) %}{% set t = 'x' * 1000000 %}{% endfor %}",
    "text in a set block": "{% set t %}{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}{% endset %}",
    "macro doubling": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}xx{% endif %}{% endmacro %}"
                      "{{ f(30) }}",
    "big integer *": "{% set ns = namespace(x=2**64) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                     "{% endfor %}",
    "big integer **": "{{ 2 ** 99999999 }}",
    "lipsum": "{{ lipsum(10**7) }}",
    "deep nesting": "{% set ns = namespace(x=[]) %}{% for i in range(500) %}{% set ns.x = [ns.x] %}{% endfor %}"
                    "{{ ns.x }}",
    "nested range loops": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "nested string loops": "{% for a in 'x' * 900000 %}{% for b in 'y' * 900000 %}{% endfor %}{% endfor %}",
    "output cap": "{% for a in range(99999) %}{{ 'z' * 99999 }}{% endfor %}",
    "divide by zero": "{{ 1 // 0 }}",
    "overflow": "{{ 10.0 ** 400 }}",
}


@pytest.mark.parametrize("template", list(BOMBS.values()), ids=list(BOMBS))
def test_template_bombs_end_in_one_line_within_the_time_limit(template):
    started, cpu = time.monotonic(), time.process_time()
    with pytest.raises(ChatTemplateError) as caught:
        render_chat(template, MESSAGES)
    assert time.process_time() - cpu < TIME_LIMIT and time.monotonic() - started < WALL_LIMIT
    message = str(caught.value)
    assert "\n" not in message and "MemoryError" not in message


def test_every_bomb_stays_under_the_memory_limit():
    """All bombs, rendered in one child whose address space is capped: none may need gigabytes."""
    script = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
        "from llmkit.tokenizer.chat import ChatTemplateError, render_chat\n"
        "results = {}\n"
        "for name, template in json.loads(sys.stdin.read()).items():\n"
        "    try:\n"
        f"        render_chat(template, {MESSAGES!r}); results[name] = 'rendered'\n"
        "    except ChatTemplateError as exc:\n"
        "        results[name] = str(exc)\n"
        "print(json.dumps(results))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(BOMBS), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert set(results) == set(BOMBS)
    assert not [n for n, r in results.items() if r == "rendered" or "MemoryError" in r], results


# Templates in the styles real models ship (ChatML as SmolLM2's and Qwen's; Llama 3; Mistral's
# alternation check; a tool-calling one with tojson, namespace, macros and loop.last).
REAL = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
              "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
              "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
              "{{ content }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
               "{% for message in rest %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '')"
               " + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
               "{% endfor %}",
    "tools": "{%- macro render(m) -%}{{ m.role|upper }}: {{ m.content|trim }}{%- endmacro -%}"
             "{%- set ns = namespace(system='', n=0) -%}"
             "{%- for m in messages if m.role == 'system' %}{% set ns.system = ns.system ~ m.content %}{% endfor -%}"
             "{{ {'system': ns.system, 'tools': [{'name': 'add', 'args': ['a', 'b']}]}|tojson(indent=2) }}\n"
             "{%- for m in messages|rejectattr('role', 'equalto', 'system') %}{% set ns.n = ns.n + 1 %}"
             "{{ render(m) }}{{ '\\n' if not loop.last }}{% endfor %}"
             "{{ '\\n%d turns, %s' % (ns.n, messages|map(attribute='role')|unique|sort|join(',')) }}"
             "{{ ('%-8s|' | format('end')).center(20, '*') }}{{ '{0}/{1}'.format(ns.n, messages|length) }}",
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_templates_render_as_plain_jinja_does(name):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(jinja2.TemplateError(message))
    for messages in (MESSAGES, MESSAGES[1:2], [{"role": "user", "content": "é 🙂 " * 5000}]):
        for prompt in (True, False):
            expected = env.from_string(REAL[name]).render(messages=messages, add_generation_prompt=prompt,
                                                          bos_token="<s>", eos_token="</s>")
            assert render_chat(REAL[name], messages, add_generation_prompt=prompt, bos_token="<s>",
                               eos_token="</s>") == expected


def test_messages_larger_than_any_prompt_are_refused():
    with pytest.raises(ChatTemplateError, match="messages hold more than"):
        render_chat(REAL["chatml"], [{"role": "user", "content": "x" * 1_000_001}])


def test_a_template_larger_than_any_real_one_is_refused():
    with pytest.raises(ChatTemplateError, match="at most"):
        render_chat("x" * 10_000_000, MESSAGES)
