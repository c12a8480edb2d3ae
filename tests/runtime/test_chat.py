"""Chat templates rendered without transformers give what transformers' apply_chat_template gives,
and a template's own refusals (raise_exception) and unsafe attribute access are clear errors."""

from __future__ import annotations

import pytest

from toolkit.errors import ToolkitError
from toolkit.runtime.chat import render_chat

transformers = pytest.importorskip("transformers", reason="the comparison is with transformers' own rendering")

# The shapes real templates take: ChatML (Qwen), Llama 3 (bos_token, loop.first, trimmed blocks, a
# system default), Mistral's (raise_exception on alternation), Zephyr's (tojson of a value, loopcontrols).
TEMPLATES = {
    "chatml": None,  # models/hf_causal.py's own
    "llama3": ("{{ bos_token }}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>{% endif %}"
               "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "zephyr": ("{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
               "<|{{ message['role'] }}|>\n{{ message['content'] | tojson }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Héllo \"there\"  "},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Return the value of x."}]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_template_renders_as_transformers_renders_it(name):
    from models.hf_causal import CHAT_TEMPLATE, causal_lm

    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm("llama"))
    tokenizer.chat_template = TEMPLATES[name] or CHAT_TEMPLATE
    messages = MESSAGES[1:] if name == "mistral" else MESSAGES
    for generation_prompt in (True, False):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        got = render_chat(tokenizer.chat_template, messages, add_generation_prompt=generation_prompt,
                          special_tokens={"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token})
        assert got == want


def test_refusals_and_sandbox_escapes_are_clear_errors():
    with pytest.raises(ToolkitError, match="refuses these messages: Conversation roles must alternate"):
        render_chat(TEMPLATES["mistral"], [{"role": "assistant", "content": "x"}])
    with pytest.raises(ToolkitError, match="refuses these messages"):  # the sandbox: no attribute walks to Python's insides
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", MESSAGES)
    with pytest.raises(ToolkitError, match="not valid Jinja"):
        render_chat("{% for %}", MESSAGES)
