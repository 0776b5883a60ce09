"""Our chat template rendering against transformers' `apply_chat_template(..., tokenize=False)`."""

from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from model.paths import default_gguf_path
from model.text.chat_template import LLAMA3_CHAT_TEMPLATE, ChatTemplate, render_chat

LLAMA3_1_INSTRUCT = (Path(__file__).resolve().parents[1] / "data" / "llama3_1_instruct.jinja").read_text()
# Meta-Llama-3-8B-Instruct's template, the turn format our fallback writes.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SYSTEM = {"role": "system", "content": "  You are terse. Quote \"JSON\" & <tags> as-is.\n"}
CHAT = [
    {"role": "user", "content": "Hi! What's 2 × 131,072? 🤗"},
    {"role": "assistant", "content": "262,144.\n\n"},
    {"role": "user", "content": "  And in 日本語?  "},
]
CHATS = {"with system": [SYSTEM, *CHAT], "without system": CHAT, "single user": CHAT[:1]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [
    SYSTEM, CHAT[0],
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temperature": 21}'},
]


@pytest.fixture(scope="module")
def smollm2_template():
    return gguf.GGUFReader(default_gguf_path()).fields["tokenizer.chat_template"].contents()


def transformers_render(template, messages, *, bos_token, eos_token, **kwargs) -> str:
    # The vocabulary plays no part in rendering, so an empty one keeps this fast.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.BPE()), bos_token=bos_token,
                                        eos_token=eos_token)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_smollm2_template(smollm2_template, chat, add_generation_prompt):
    tokens = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    ours = render_chat(smollm2_template, chat, add_generation_prompt=add_generation_prompt, **tokens)
    assert ours == transformers_render(smollm2_template, chat, add_generation_prompt=add_generation_prompt, **tokens)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_llama3_1_template(chat, add_generation_prompt):
    ours = render_chat(LLAMA3_1_INSTRUCT, chat, add_generation_prompt=add_generation_prompt, **LLAMA3_TOKENS)
    theirs = transformers_render(LLAMA3_1_INSTRUCT, chat, add_generation_prompt=add_generation_prompt,
                                 **LLAMA3_TOKENS)
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")


@pytest.mark.parametrize("kwargs", [
    {"tools": TOOLS},
    {"tools": TOOLS, "tools_in_user_message": False, "date_string": "01 Jan 2025"},
    {"builtin_tools": ["brave_search", "code_interpreter"]},
], ids=["tools in user message", "tools in system", "builtin tools"])
def test_llama3_1_template_with_tools(kwargs):
    ours = render_chat(LLAMA3_1_INSTRUCT, TOOL_CHAT, **LLAMA3_TOKENS, **kwargs)
    assert ours == transformers_render(LLAMA3_1_INSTRUCT, TOOL_CHAT, add_generation_prompt=True, **LLAMA3_TOKENS,
                                       **kwargs)
    assert '"parameters": {"city": "Zürich"}' in ours  # tojson keeps non-ASCII and does not escape HTML


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_fallback_is_llama3_instruct(chat, add_generation_prompt):
    ours = render_chat(None, chat, add_generation_prompt=add_generation_prompt, **LLAMA3_TOKENS)
    kwargs = {"add_generation_prompt": add_generation_prompt, **LLAMA3_TOKENS}
    assert ours == transformers_render(LLAMA3_CHAT_TEMPLATE, chat, **kwargs)
    assert ours == transformers_render(LLAMA3_INSTRUCT, chat, **kwargs)


def test_helpers_match_transformers():
    template = ("{{ strftime_now('%Y-%m-%d') }}|{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
                "{% generation %}{{ extra }}{% endgeneration %}|{{ bos_token }}{{ eos_token }}|{{ tools }}")
    chat = [{"role": "user", "content": "<b>&'\"é"}, {"role": "assistant", "content": "x", "name": None}]
    ours = render_chat(template, chat, bos_token="<s>", eos_token="</s>", extra=[1, "two"])
    assert ours == transformers_render(template, chat, bos_token="<s>", eos_token="</s>", extra=[1, "two"])


def test_block_whitespace_matches_transformers():
    # Without trim_blocks and lstrip_blocks each block tag would leave its newline and indentation behind.
    template = ("{% for message in messages %}\n    {% if message.role == 'user' %}\nUser: {{ message.content }}\n"
                "    {% else %}\nBot: {{ message.content }}\n    {% endif %}\n{% endfor %}\n")
    ours = render_chat(template, CHAT, bos_token="<s>", eos_token="</s>")
    assert ours == transformers_render(template, CHAT, bos_token="<s>", eos_token="</s>")
    assert ours.startswith("User: Hi!")


def test_missing_special_tokens_render_empty():
    assert render_chat("[{{ bos_token }}]", [], bos_token=None, eos_token=None) == "[]"


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}", "does not compile"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ messages.append(1) }}", "chat template failed"),  # the sandbox keeps the messages immutable
    ("{{ messages[0]['content'] + 1 }}", "chat template failed"),
])
def test_template_errors_are_value_errors(template, message):
    with pytest.raises(ValueError, match=message):
        render_chat(template, CHAT, bos_token="", eos_token="")


def test_compiled_template_renders_repeatedly():
    template = ChatTemplate(LLAMA3_CHAT_TEMPLATE)
    assert template.render(CHAT, **LLAMA3_TOKENS) == template.render(CHAT, **LLAMA3_TOKENS)
    with pytest.raises(ValueError, match="mappings"):
        template.render(["hi"], **LLAMA3_TOKENS)
