"""Chat templates render like Hugging Face's, and untrusted ones stay inert and bounded (RELIABILITY L7)."""

import time

import jinja2
import pytest

from llmkit.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_chat

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_chatml_renders_like_plain_jinja():
    expected = jinja2.Environment().from_string(CHATML).render(messages=MESSAGES, add_generation_prompt=True)
    assert render_chat(CHATML, MESSAGES) == expected
    assert render_chat(CHATML, MESSAGES).endswith("<|im_start|>assistant\n")
    assert not render_chat(CHATML, MESSAGES, add_generation_prompt=False).endswith("assistant\n")


def test_default_template_uses_role_tokens():
    text = render_chat(DEFAULT_CHAT_TEMPLATE, MESSAGES)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"


def test_raise_exception_helper_is_a_clean_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="user first"):
        render_chat(template, MESSAGES)


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                                      ["hello"]])
def test_bad_messages_are_rejected(messages):
    with pytest.raises(ChatTemplateError, match="messages"):
        render_chat(CHATML, messages)


ESCAPES = [
    "{{ lipsum.__globals__['os'].popen('touch CANARY').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ '{0.__class__}'|attr('format')(messages) }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.append(1) }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_refused(template, tmp_path, monkeypatch):
    """Refused with an error, or rendered inert (the sandbox turns a forbidden attribute into an
    empty Undefined, as Hugging Face's environment does): never Python internals, never a side effect."""
    monkeypatch.chdir(tmp_path)
    try:
        text = render_chat(template, MESSAGES)
    except ChatTemplateError:
        text = ""
    assert not any(leak in text for leak in ("<class", "<function", "<module", "__globals__", "1]"))
    assert not (tmp_path / "CANARY").exists()
    assert MESSAGES == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


BOMBS = [
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ 2 ** 99999999 }}",
    "{% for a in 'x' * 900000 %}{% for b in 'y' * 900000 %}{% endfor %}{% endfor %}",  # no range: the clock
    "{% for a in range(99999) %}{{ 'z' * 99999 }}{% endfor %}",  # output cap
]


@pytest.mark.parametrize("template", BOMBS)
def test_work_bombs_abort_quickly(template):
    """Within 3 s of CPU (the render's deadline is 2 s); the wall-clock bound only catches a hang, so
    that a machine shared with other jobs does not fail the test."""
    started, cpu = time.monotonic(), time.process_time()
    with pytest.raises(ChatTemplateError):
        render_chat(template, MESSAGES)
    assert time.process_time() - cpu < 3.0 and time.monotonic() - started < 12.0


def test_time_cap_stops_loops_the_budgets_do_not_count(monkeypatch):
    """Nested loops over a string are not range-counted: the clock, read at every loop iteration, ends
    them with a one-line error."""
    import llmkit.tokenizer.chat as chat

    monkeypatch.setattr(chat, "MAX_SECONDS", 0.2)
    slow = "{% for a in messages[0]['content'] %}{% for b in messages[0]['content'] %}{% endfor %}{% endfor %}"
    started = time.process_time()
    with pytest.raises(ChatTemplateError, match="took longer than 0.2 s"):
        render_chat(slow, [{"role": "user", "content": "x" * 20_000}])
    assert time.process_time() - started < 5


def test_a_template_is_compiled_once_but_each_render_has_its_own_budget():
    """The compiled code is cached per template text; the range budget belongs to each render, so a
    template that spends 60% of it renders any number of times."""
    import llmkit.tokenizer.chat as chat

    heavy = "{% for i in range(" + str(chat.MAX_ITEMS * 6 // 10) + ") %}{% endfor %}{{ messages[-1]['content'] }}"
    hits = chat._compiled.cache_info().hits
    assert [render_chat(heavy, MESSAGES) for _ in range(3)] == ["2+2?"] * 3
    assert chat._compiled.cache_info().hits >= hits + 2
    for _ in range(2):  # a syntax error is not cached: the same one-line error every time
        with pytest.raises(ChatTemplateError, match="TemplateSyntaxError: Unexpected end of template"):
            render_chat("{% for m in messages %}", MESSAGES)
