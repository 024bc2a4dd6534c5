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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from . import _libpam
from .constants import PAM_MAX_NUM_MSG, ReturnCode
from .message import _KINDS, PAM_BINARY_PROMPT, Message

__all__ = ["Conversant", "ConversationProtocolError", "register", "unregister"]

_SUCCESS = int(ReturnCode.SUCCESS)
_CONV_ERR = int(ReturnCode.CONV_ERR)
_BUF_ERR = int(ReturnCode.BUF_ERR)
# The styles pamphlet answers, each to its Message subclass: BINARY_PROMPT is
# refused, like any style PAM does not define.
# Message subclasses are made with str's own constructor: the style is the class.
_new_str = str.__new__
_read_message = _libpam.read_message
_write_response = _libpam.write_response
_CONVERSED_KINDS = {
    int(style): kind for style, kind in _KINDS.items() if style != PAM_BINARY_PROMPT
}


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


def _answer_list(answers: Any, count: int) -> list[Any]:
    """The conversation's return value as a list of ``count`` answers."""
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
    if len(answers) != count:
        raise ValueError(f"the conversation gave {len(answers)} answers to {count} messages")
    checked: list[Any] = answers
    return checked


def _encode_answer(index: int, message: Message, answer: Any, encoding: str) -> bytes | None:
    """One answer as the C string PAM will see: a prompt's never truncated,
    anything else's NULL (checked all the same: a wrong type is a bug to report)."""
    kind = type(answer)
    data: bytes
    if kind is str:
        data = answer.encode(encoding, "surrogateescape")
    elif kind is bytes:
        data = answer
    elif answer is None and not message.is_prompt:
        return None
    elif isinstance(answer, str):
        data = answer.encode(encoding, "surrogateescape")
    elif isinstance(answer, (bytes, bytearray, memoryview)):
        data = bytes(answer)
    else:
        raise TypeError(f"answer {index} to {message!r} must be str or bytes, not {kind.__name__}")
    if not message.is_prompt:
        return None
    # An int test: bytes.__contains__ tries its argument as an int first,
    # and b"\0" would cost a TypeError raised and cleared inside CPython.
    if 0 in data:
        raise ValueError(
            f"answer {index} to {message!r} contains a NUL byte; PAM would "
            "see only the part before it"
        )
    return data


def encode_answers(messages: Sequence[Message], answers: Any, encoding: str) -> list[bytes | None]:
    """Check the conversation's answers and turn them into C strings.

    Prompts need a str or bytes answer with no NUL; info and error messages
    may be answered with anything string-like or None, and get a NULL
    response either way.
    """
    answers = _answer_list(answers, len(messages))
    return [
        _encode_answer(index, message, answers[index], encoding)
        for index, message in enumerate(messages)
    ]


def _style_error(style: int) -> ConversationProtocolError:
    if style == PAM_BINARY_PROMPT:
        return ConversationProtocolError(
            "a module sent a PAM_BINARY_PROMPT, which pamphlet does not answer"
        )
    return ConversationProtocolError(f"a module sent a message of unknown style {style}")


def _message(style: int, text: bytes, encoding: str) -> Message:
    kind = _CONVERSED_KINDS.get(style)
    if kind is None:
        raise _style_error(style)
    return _new_str(kind, text.decode(encoding, "surrogateescape"))


def _no_place_for_the_answer() -> ConversationProtocolError:
    # Linux-PAM modules (pam_matrix among them) pass resp == NULL when they
    # only show messages. A question with nowhere to put the answer is
    # refused before the user is asked: a typed secret would go nowhere.
    return ConversationProtocolError("a module asked a question but gave no place for the answer")


def _converse(owner: Conversant, num_msg: int, msg: Any, resp: Any) -> int:
    if num_msg <= 0 or num_msg > PAM_MAX_NUM_MSG:
        raise ConversationProtocolError(
            f"a module asked for a conversation of {num_msg} messages "
            f"(PAM allows 1 to {PAM_MAX_NUM_MSG})"
        )
    if not msg:
        raise ConversationProtocolError("a module passed a NULL message array")
    encoding = owner._encoding
    messages = [
        _message(style, text, encoding) for style, text in _libpam.read_messages(num_msg, msg)
    ]
    if not resp and any(message.is_prompt for message in messages):
        raise _no_place_for_the_answer()
    # The conversation gets the list and may change it; the answers are
    # checked against our own copy: one response per message sent, never fewer.
    asked = tuple(messages)
    encoded = encode_answers(asked, owner._answer(messages), encoding)
    if resp and not _libpam.write_responses(resp, encoded):
        raise MemoryError("could not allocate the conversation's responses")
    return _SUCCESS


def _conversation_callback(num_msg: int, msg: Any, resp: Any, appdata: int | None) -> int:
    try:
        lookup = _owners.get(appdata)  # type: ignore[arg-type]
        owner = None if lookup is None else lookup()
        if owner is None:
            return _CONV_ERR
        if owner._conversation_error is not None:
            # The conversation already failed in this phase: answer nothing
            # more, and keep the first error for the phase to raise.
            return _CONV_ERR
        try:
            if num_msg != 1 or not msg:
                return _converse(owner, num_msg, msg, resp)
            # One message, as most modules send (pam_prompt, pam_info): the
            # same steps as _converse, inline, with no lists of our own.
            encoding = owner._encoding
            style, text = _read_message(msg)
            kind = _CONVERSED_KINDS.get(style)
            if kind is None:
                raise _style_error(style)
            message = _new_str(kind, text.decode(encoding, "surrogateescape"))
            if not resp and message.is_prompt:
                raise _no_place_for_the_answer()
            answers = owner._answer([message])
            if type(answers) is not list or len(answers) != 1:
                answers = _answer_list(answers, 1)
            answer = answers[0]
            if answer is None and not message.is_prompt:
                data = None  # an info or error message, answered with nothing
            else:
                data = _encode_answer(0, message, answer, encoding)
            if resp and not _write_response(resp, data):
                raise MemoryError("could not allocate the conversation's responses")
            return _SUCCESS
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
