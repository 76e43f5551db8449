"""Turning chat messages into token ids, the one way every stage does it (generation, training, eval).

Prompts go through the tokenizer's chat template with the generation prompt appended; a response
is the template's rendering of the whole conversation minus the prompt's tokens, cut after the
last end-of-sequence token (so the model learns to stop, and nothing the template adds after the
stop is trained on). A tokenizer without a chat template gets this plain format:

    ### User:
    {content}

    ### Assistant:
    {response}<eos>
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Dict, List, Optional, Sequence, Union

from fastdadpo.base.errors import DataError

Message = Dict[str, str]
ROLES = ("system", "user", "assistant", "tool")
PLAIN_ROLE_HEADERS = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:",
                      "tool": "### Tool:"}


def as_messages(value: Union[str, Sequence[Message]], default_role: str, where: str, field: str,
                allow_empty: bool = False) -> List[Message]:
    """A string becomes one message of ``default_role``; a list must be ``{"role", "content"}`` dicts.
    ``allow_empty``: an empty string is a message with empty content (a model that stopped at once)."""
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(f"{where}: field {field!r} is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty string or a list of chat messages, "
                        f"got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field {field!r} message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field {field!r} message {i} has role {message['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field {field!r} message {i} content must be a string")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


# One rendering of a chat template takes microseconds; a template that loops without end (transformers'
# sandbox bounds each range(), not nested loops) would hang the run silently. Past this, an error.
TEMPLATE_SECONDS = 10.0


class _TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM after ``seconds`` (the main thread only; an earlier timer of someone else's, e.g.
    pytest-timeout's, is left alone when it would ring first, and restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, interval = signal.getitimer(signal.ITIMER_REAL)
    if pending and pending <= seconds:
        yield
        return

    def expire(signum, frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3), interval)


# A template is code shipped with a model: besides loops (bounded in time above), one expression can
# ask for a huge value at once ("x" * 10**10 is tens of GB before any timer can ring). Past these
# sizes a repetition or a power is refused while rendering.
MAX_TEMPLATE_REPEAT = 1 << 20  # items (characters) one "*" may produce
MAX_TEMPLATE_EXPONENT = 4096
MAX_TEMPLATE_INT_BITS = 1 << 20  # a number one "*" or "**" may produce (a megabit: far past any template's)


def _bound_template_expressions() -> None:
    """Render every chat template with transformers' own sandboxed environment, subclassed so that
    "*" and "**" check the size of what they make. transformers builds that environment inside its
    template compiler, from the class its module imported: the class there is replaced (once) and its
    cache of compiled templates emptied."""
    from jinja2.exceptions import SecurityError
    from transformers.utils import chat_template_utils as templates

    base = getattr(templates, "ImmutableSandboxedEnvironment", None)
    if base is None or getattr(base, "fastdadpo_bounded", False):
        return

    class BoundedEnvironment(base):
        fastdadpo_bounded = True
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            for items, count in ((left, right), (right, left)):
                if operator == "*" and isinstance(items, (str, list, tuple)) and isinstance(count, int) \
                        and len(items) * count > MAX_TEMPLATE_REPEAT:
                    raise SecurityError(f"it repeats a value of {len(items)} items {count} times, past "
                                        f"{MAX_TEMPLATE_REPEAT:,}")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_TEMPLATE_EXPONENT:
                raise SecurityError(f"it raises to the power {right}, past {MAX_TEMPLATE_EXPONENT}")
            # Each step small, the chain not: ((10**4096)**4096)**4096 is one C call of ~28 GB that no
            # timer interrupts. The result's size is known before it is made.
            if isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool):
                bits = left.bit_length() * abs(right) if operator == "**" else left.bit_length() + right.bit_length()
                if bits > MAX_TEMPLATE_INT_BITS:
                    raise SecurityError(f"it makes a number of about {bits:,} bits, past {MAX_TEMPLATE_INT_BITS:,}")
            return super().call_binop(context, operator, left, right)

    templates.ImmutableSandboxedEnvironment = BoundedEnvironment
    for name in ("_compile_jinja_template", "_cached_compile_jinja_template"):
        getattr(getattr(templates, name, None), "cache_clear", lambda: None)()


def _apply_template(tokenizer, messages, **kwargs):
    from jinja2 import TemplateError

    _bound_template_expressions()
    try:
        with _time_limit(TEMPLATE_SECONDS):
            return tokenizer.apply_chat_template(list(messages), tokenize=True, **kwargs)
    except TemplateError as exc:
        raise DataError(f"the tokenizer's chat template rejects these messages: {exc}") from None
    except _TemplateTimeout:
        raise DataError(f"the tokenizer's chat template took more than {TEMPLATE_SECONDS:g} s to render one "
                        f"conversation (a loop without end?); fix the template (chat_template.jinja)") from None
    except Exception as exc:  # noqa: BLE001: a template is code; whatever it raises is its fault
        raise DataError(f"the tokenizer's chat template fails on these messages ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); fix the template or the messages") from None


def _ids(encoded) -> List[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _plain(messages: Sequence[Message]) -> str:
    return "".join(f"{PLAIN_ROLE_HEADERS[m['role']]}\n{m['content']}\n\n" for m in messages)


def prompt_ids(tokenizer, messages: Sequence[Message]) -> List[int]:
    """Token ids of a prompt, ready for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return _ids(_apply_template(tokenizer, messages, add_generation_prompt=True))
    return tokenizer(_plain(messages) + PLAIN_ROLE_HEADERS["assistant"] + "\n", add_special_tokens=False)["input_ids"]


# Plain strings as raw text, no chat template, as TRL tokenizes its standard (not conversational)
# format: the prompt alone, and prompt + response + the eos token's text (unless the response ends
# with it) as one string, each with the tokenizer's own special tokens (a BOS where it adds one); the
# response is what follows the prompt's tokens (``common_prefix``: a merge across the boundary moves it).

def raw_prompt_ids(tokenizer, text: str) -> List[int]:
    return _ids(tokenizer(text))


def raw_sequence_ids(tokenizer, prompt: str, response: str) -> List[int]:
    eos = tokenizer.eos_token or ""
    return _ids(tokenizer(prompt + (response if response.endswith(eos) else response + eos)))


def common_prefix(ids: Sequence[int], other: Sequence[int]) -> int:
    length = 0
    while length < min(len(ids), len(other)) and ids[length] == other[length]:
        length += 1
    return length


def response_ids(tokenizer, prompt: Sequence[Message], response: Sequence[Message],
                 prompt_token_ids: Optional[List[int]] = None) -> List[int]:
    """Token ids of the assistant's response to ``prompt`` (ending with the eos token)."""
    eos = tokenizer.eos_token_id
    if prompt_token_ids is None:
        prompt_token_ids = prompt_ids(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        full = _ids(_apply_template(tokenizer, list(prompt) + list(response)))
        if full[:len(prompt_token_ids)] != prompt_token_ids:
            raise DataError("the tokenizer's chat template renders a prompt differently on its own and inside the "
                            "full conversation, so response tokens cannot be separated from the prompt")
        ids = full[len(prompt_token_ids):]
        if eos is not None and eos in ids:
            last = len(ids) - 1 - ids[::-1].index(eos)
            ids = ids[:last + 1]
        return ids
    text = "".join(m["content"] if i == 0 else f"\n\n{PLAIN_ROLE_HEADERS[m['role']]}\n{m['content']}"
                   for i, m in enumerate(response))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([eos] if eos is not None else [])
