"""The C side of the conversation: PAM's messages in, libc-allocated answers out.

One ctypes callback serves every handle; the ``appdata_ptr`` libpam passes
back is a key into ``_conversants``, so no closure is created per handle. The
callback fails closed: any problem, on the module's side or in Python, is
handed to the conversant (so the phase raises it) and libpam gets
PAM_CONV_ERR. Nothing escapes into ctypes, which would print it and hand
libpam an undefined return code.

``encode_answers`` is the one place where a conversation's answers are
checked and turned into the bytes a module will see, for every transport.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import _libpam
from .constants import PAM_MAX_NUM_MSG, ReturnCode
from .errors import pam_error
from .message import _KINDS, PAM_BINARY_PROMPT, Message

if TYPE_CHECKING:
    from ._transaction import Conversant

__all__ = ["ConversationProtocolError", "encode_answers", "open_in_process", "start_in_process"]

# Each style pamphlet answers, to its Message subclass (which takes the text alone).
_ANSWERED_KINDS = {int(style): kind for style, kind in _KINDS.items() if style != PAM_BINARY_PROMPT}
_SUCCESS = int(ReturnCode.SUCCESS)
_CONV_ERR = int(ReturnCode.CONV_ERR)
_BUF_ERR = int(ReturnCode.BUF_ERR)


class ConversationProtocolError(ValueError):
    """A module sent a conversation call that cannot be answered safely."""


def make_messages(raw: Iterable[tuple[int, bytes]], encoding: str) -> list[Message]:
    """Messages from (style, text) pairs; a style pamphlet does not answer is refused.

    PAM_BINARY_PROMPT (Linux-PAM's length-prefixed packets) is refused like
    any style PAM does not define.
    """
    messages = []
    for style, text in raw:
        kind = _ANSWERED_KINDS.get(style)
        if kind is None:
            if style == PAM_BINARY_PROMPT:
                raise ConversationProtocolError(
                    "a module sent a PAM_BINARY_PROMPT, which pamphlet does not answer"
                )
            raise ConversationProtocolError(f"a module sent a message of unknown style {style}")
        messages.append(kind(text.decode(encoding, "surrogateescape")))
    return messages


def encode_answers(messages: Sequence[Message], answers: Any, encoding: str) -> list[bytes | None]:
    """Check the conversation's answers and turn them into C strings.

    One answer per message. Prompts need a str or bytes answer with no NUL,
    never truncated; info and error messages may be answered with anything
    string-like or None, and get a NULL response either way (checked all the
    same: a wrong type is a bug to report).
    """
    if answers is None or isinstance(answers, (str, bytes)):
        raise TypeError(
            "the conversation must return or yield one answer per message, "
            f"not {type(answers).__name__}"
        )
    try:
        checked = list(answers)
    except TypeError:
        raise TypeError(
            "the conversation must return or yield one answer per message, "
            f"not {type(answers).__name__}"
        ) from None
    if len(checked) != len(messages):
        raise ValueError(
            f"the conversation gave {len(checked)} answers to {len(messages)} messages"
        )
    encoded: list[bytes | None] = []
    for index, answer in enumerate(checked):
        message = messages[index]
        if answer is None and not message.is_prompt:
            encoded.append(None)
            continue
        # Exact bytes, whatever subclass came in: str.encode and the buffer
        # protocol cannot be overridden, so the NUL test below sees what PAM will.
        if isinstance(answer, str):
            data = str.encode(answer, encoding, "surrogateescape")
        elif isinstance(answer, (bytes, bytearray, memoryview)):
            data = bytes(memoryview(answer))
        else:
            raise TypeError(
                f"answer {index} to {message!r} must be str or bytes, not {type(answer).__name__}"
            )
        if not message.is_prompt:
            encoded.append(None)
        elif 0 in data:  # the byte value NUL
            raise ValueError(
                f"answer {index} to {message!r} contains a NUL byte; PAM would "
                "see only the part before it"
            )
        else:
            encoded.append(data)
    return encoded


# key -> the conversant, weakly: an application nobody ended can still be
# garbage-collected (its finalizer ends the handle).
_conversants: dict[int, weakref.ref[Conversant]] = {}
_keys = itertools.count(1)


def _conversant(appdata: int | None) -> Conversant | None:
    reference = _conversants.get(appdata or 0)
    return None if reference is None else reference()


def _conversation_callback(
    num_msg: int, msg: int | None, resp: int | None, appdata: int | None
) -> int:
    # A signal that arrives as libpam calls in is held by _transaction's
    # deferring handler until the conversant takes it: nothing reaches ctypes here.
    conversant = None
    try:
        reference = _conversants.get(appdata or 0)
        conversant = None if reference is None else reference()
        if conversant is None:
            return _CONV_ERR
        if num_msg <= 0 or num_msg > PAM_MAX_NUM_MSG:
            raise ConversationProtocolError(
                f"a module asked for a conversation of {num_msg} messages "
                f"(PAM allows 1 to {PAM_MAX_NUM_MSG})"
            )
        if not msg:
            raise ConversationProtocolError("a module passed a NULL message array")
        messages = make_messages(_libpam.read_messages(num_msg, msg), conversant.encoding)
        if not resp and any(message.is_prompt for message in messages):
            # Linux-PAM modules (pam_matrix among them) pass resp == NULL when
            # they only show messages. A question with nowhere to put the
            # answer is refused before the user is asked.
            raise ConversationProtocolError(
                "a module asked a question but gave no place for the answer"
            )
        answers = conversant.converse(messages)
        if resp and not _libpam.write_responses(resp, answers):
            raise MemoryError("could not allocate the conversation's responses")
        return _SUCCESS
    except BaseException as exc:
        try:
            if conversant is not None:
                conversant.fail(exc)
            return _BUF_ERR if isinstance(exc, MemoryError) else _CONV_ERR
        except BaseException:  # pragma: no cover - last line of defence
            return _CONV_ERR


def _fail_delay_callback(status: int, delay_usec: int, appdata: int | None) -> None:
    try:
        conversant = _conversant(appdata)
        if conversant is None:
            return
        try:
            conversant.fail_delay(status, delay_usec)
        except BaseException as exc:
            conversant.fail(exc)
    except BaseException:  # pragma: no cover - last line of defence
        return


CONVERSATION_CALLBACK = _libpam.CONV_FUNC(_conversation_callback)
FAIL_DELAY_CALLBACK = _libpam.FAIL_DELAY_FUNC(_fail_delay_callback)


def register(conversant: Conversant) -> int:
    """A fresh appdata key under which the callbacks will find ``conversant``."""
    key = next(_keys)
    _conversants[key] = weakref.ref(conversant)
    return key


def unregister(key: int) -> None:
    _conversants.pop(key, None)


def open_in_process(
    confdir: bytes | None, service: bytes, user: bytes | None, conversant: Conversant
) -> _libpam.Handle:
    """The in-process transport (a StartTransport once ``confdir`` is bound):
    the handle, or the PamError of pam_start's code."""
    code, handle = start_in_process(service, user, confdir, conversant)
    if handle is None:
        raise pam_error(code, f"pam_start failed: {_libpam.strerror(_libpam.NULL_HANDLE, code)}")
    return handle


def start_in_process(
    service: bytes, user: bytes | None, confdir: bytes | None, conversant: Conversant
) -> tuple[int, _libpam.Handle | None]:
    """Start libpam in this process with ``conversant`` answering its conversation."""
    key = register(conversant)
    release = functools.partial(_conversants.pop, key, None)  # unregister, without a frame
    try:
        code, handle = _libpam.Handle.start(
            service, user, confdir, CONVERSATION_CALLBACK, FAIL_DELAY_CALLBACK, key, release
        )
    except BaseException:
        release()
        raise
    if handle is None:
        release()
    return code, handle
