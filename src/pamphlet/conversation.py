"""The C side of the conversation: PAM's messages in, libc-allocated answers out.

One ctypes callback serves every handle; the ``appdata_ptr`` libpam passes
back is a key into ``_owners``, so no closure is created per handle. The
callback fails closed: any problem, on the module's side or in Python, is
recorded on the owner (so the phase raises it) and libpam gets PAM_CONV_ERR.
Nothing escapes into ctypes, which would print it and return 0, PAM_SUCCESS.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from . import _libpam
from .constants import PAM_MAX_NUM_MSG, ReturnCode
from .message import PAM_BINARY_PROMPT, PROMPT_STYLES, Message

__all__ = ["Conversant", "ConversationProtocolError", "register", "unregister"]

_SUCCESS = int(ReturnCode.SUCCESS)
_CONV_ERR = int(ReturnCode.CONV_ERR)
_BUF_ERR = int(ReturnCode.BUF_ERR)


class ConversationProtocolError(ValueError):
    """A module sent a conversation call that cannot be answered safely."""


class Conversant(Protocol):
    """What the callback needs from the object that owns a handle."""

    _encoding: str
    _conversation_error: BaseException | None

    def _answer(self, messages: list[Message]) -> Any: ...

    def _fail_delay_called(self, status: int, delay_usec: int) -> None: ...


# key -> a callable giving the owner: a weak reference, so that an
# application nobody ended can still be garbage-collected (its __del__ ends it).
_owners: dict[int, Callable[[], Conversant | None]] = {}
_keys = itertools.count(1)


def register(owner: Conversant) -> int:
    """A fresh appdata key under which the callbacks will find ``owner``."""
    key = next(_keys)
    _owners[key] = weakref.ref(owner)
    return key


def unregister(key: int) -> None:
    _owners.pop(key, None)


def reregister(key: int, owner: Conversant) -> None:
    """Point ``key`` at ``owner`` strongly: for a finalizer, whose weak
    references the cyclic collector has already cleared, until it unregisters."""
    _owners[key] = lambda: owner


def _owner(appdata: int | None) -> Conversant | None:
    lookup = _owners.get(appdata or 0)
    return None if lookup is None else lookup()


def encode_answers(messages: list[Message], answers: Any, encoding: str) -> list[bytes | None]:
    """Check the conversation's answers and turn them into C strings.

    Prompts need a str or bytes answer with no NUL; info and error messages
    may be answered with anything string-like or None, and get a NULL
    response either way.
    """
    if type(answers) is not list:  # a list, the usual answer, skips the ABC check
        if answers is None:
            raise TypeError(
                "the conversation returned None; it must return or yield one answer per message"
            )
        if isinstance(answers, (str, bytes)) or not isinstance(answers, Iterable):
            raise TypeError(
                "the conversation must return or yield one answer per message, "
                f"not {type(answers).__name__}"
            )
        answers = list(answers)
    if len(answers) != len(messages):
        raise ValueError(
            f"the conversation gave {len(answers)} answers to {len(messages)} messages"
        )
    encoded: list[bytes | None] = []
    for index, (message, answer) in enumerate(zip(messages, answers, strict=True)):
        is_prompt = message.style in PROMPT_STYLES  # is_prompt without a property frame
        if isinstance(answer, str):
            data = answer.encode(encoding, "surrogateescape")
        elif type(answer) is bytes:
            data = answer
        elif isinstance(answer, (bytes, bytearray, memoryview)):
            data = bytes(answer)
        elif answer is None and not is_prompt:
            encoded.append(None)
            continue
        else:
            raise TypeError(
                f"answer {index} to {message!r} must be str or bytes, not {type(answer).__name__}"
            )
        if not is_prompt:
            encoded.append(None)
            continue
        # An int test: bytes.__contains__ tries its argument as an int first,
        # and b"\0" would cost a TypeError raised and cleared inside CPython.
        if 0 in data:
            raise ValueError(
                f"answer {index} to {message!r} contains a NUL byte; PAM would "
                "see only the part before it"
            )
        encoded.append(data)
    return encoded


def _converse(owner: Conversant, num_msg: int, msg: Any, resp: Any) -> int:
    if num_msg <= 0 or num_msg > PAM_MAX_NUM_MSG:
        raise ConversationProtocolError(
            f"a module asked for a conversation of {num_msg} messages "
            f"(PAM allows 1 to {PAM_MAX_NUM_MSG})"
        )
    if not msg:
        raise ConversationProtocolError("a module passed a NULL message array")
    encoding = owner._encoding
    messages = []
    for style, text in _libpam.read_messages(num_msg, msg):
        if style == PAM_BINARY_PROMPT:
            raise ConversationProtocolError(
                "a module sent a PAM_BINARY_PROMPT, which pamphlet does not answer"
            )
        try:
            message = Message(text.decode(encoding, "surrogateescape"), style)
        except ValueError:
            raise ConversationProtocolError(
                f"a module sent a message of unknown style {style}"
            ) from None
        messages.append(message)
    # Linux-PAM modules (pam_matrix among them) pass resp == NULL when they
    # only show messages. A question with nowhere to put the answer is
    # refused before the user is asked: a typed secret would go nowhere.
    null_resp = not resp
    if null_resp and any(message.is_prompt for message in messages):
        raise ConversationProtocolError(
            "a module asked a question but gave no place for the answer"
        )
    encoded = encode_answers(messages, owner._answer(messages), encoding)
    if null_resp:
        return _SUCCESS
    if not _libpam.write_responses(resp, encoded):
        raise MemoryError("could not allocate the conversation's responses")
    return _SUCCESS


def _conversation_callback(num_msg: int, msg: Any, resp: Any, appdata: int | None) -> int:
    try:
        owner = _owner(appdata)
        if owner is None:
            return _CONV_ERR
        if owner._conversation_error is not None:
            # The conversation already failed in this phase: answer nothing
            # more, and keep the first error for the phase to raise.
            return _CONV_ERR
        try:
            return _converse(owner, num_msg, msg, resp)
        except MemoryError as exc:
            owner._conversation_error = exc
            return _BUF_ERR
        except BaseException as exc:
            owner._conversation_error = exc
            return _CONV_ERR
    except BaseException:  # pragma: no cover - last line of defence
        return _CONV_ERR


def _fail_delay_callback(status: int, delay_usec: int, appdata: int | None) -> None:
    try:
        owner = _owner(appdata)
        if owner is None:
            return
        try:
            owner._fail_delay_called(status, delay_usec)
        except BaseException as exc:
            if owner._conversation_error is None:
                owner._conversation_error = exc
    except BaseException:  # pragma: no cover - last line of defence
        return


CONVERSATION_CALLBACK = _libpam.CONV_FUNC(_conversation_callback)
FAIL_DELAY_CALLBACK = _libpam.FAIL_DELAY_FUNC(_fail_delay_callback)
