"""Chat formatting: the ChatML template slmkit's tokenizers carry, and where an assistant's turn ends.

ChatML (as SmolLM2 uses it, without its default system prompt) renders every message as
"<|im_start|>{role}\\n{content}<|im_end|>\\n"; the generation prompt opens an assistant turn. A reply ends at the
end-of-turn marker, which need not be the model's eos token, so every caller that decodes a chat reply stops at
`stop_strings(tokenizer)`. This module is the only place those markers are spelled out.
"""

from __future__ import annotations

TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + TURN_START + "' + message['role'] + '\n' + message['content'] + '" + TURN_END + "' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + TURN_START + "assistant\n' }}{% endif %}"
)


def stop_strings(tokenizer=None) -> list[str]:
    """Strings that end an assistant's turn: ChatML's end-of-turn marker, and the tokenizer's eos when it has one."""
    eos = getattr(tokenizer, "eos_token", None)
    return [TURN_END, *([eos] if eos and eos != TURN_END else [])]


def with_chat_stops(stop: list[str], tokenizer=None) -> list[str]:
    """`stop` with the end-of-turn strings added (each once, in order)."""
    return [*stop, *(s for s in stop_strings(tokenizer) if s not in stop)]
