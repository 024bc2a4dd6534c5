"""Message: one thing the PAM stack says to the user, as a str with a style."""

from __future__ import annotations

from .constants import MessageStyle

__all__ = [
    "Message",
    "PAM_PROMPT_ECHO_OFF",
    "PAM_PROMPT_ECHO_ON",
    "PAM_ERROR_MSG",
    "PAM_TEXT_INFO",
    "PAM_RADIO_TYPE",
    "PAM_BINARY_PROMPT",
]

PAM_PROMPT_ECHO_OFF = MessageStyle.PROMPT_ECHO_OFF
PAM_PROMPT_ECHO_ON = MessageStyle.PROMPT_ECHO_ON
PAM_ERROR_MSG = MessageStyle.ERROR_MSG
PAM_TEXT_INFO = MessageStyle.TEXT_INFO
PAM_RADIO_TYPE = MessageStyle.RADIO_TYPE
PAM_BINARY_PROMPT = MessageStyle.BINARY_PROMPT

#: The styles that want an answer (package-internal: Message.is_prompt is the API).
PROMPT_STYLES = frozenset((PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_RADIO_TYPE))


class Message(str):
    """A conversation message: its text, plus the ``style`` PAM gave it.

    ``is_prompt`` messages want an answer; ``wants_password`` ones want it
    without echo. Info and error messages are answered with ``""``.

    ``Message(text, style)`` returns an instance of a private subclass per
    style, which holds ``style`` and the answers of the ``is_*`` questions as
    class attributes: a message is an immutable str like any other.
    """

    #: The :class:`~pamphlet.MessageStyle` PAM gave the message.
    style: MessageStyle
    #: The message asks a question and wants an answer.
    is_prompt: bool
    #: The answer is a secret: read it without echo.
    wants_password: bool
    #: An error to show the user.
    is_error: bool
    #: Information to show the user.
    is_info: bool

    def __new__(cls, text: str, style: int = PAM_TEXT_INFO) -> Message:
        kind = _KINDS.get(style)
        if kind is None:
            kind = _KINDS[MessageStyle(style)]  # ValueError for an unknown style
        return str.__new__(kind, text)

    def __repr__(self) -> str:
        return f"Message({str(self)!r}, {self.style.name})"

    def __reduce__(self) -> tuple[object, ...]:
        return (Message, (str(self), int(self.style)))


def _kind(style: MessageStyle) -> type[Message]:
    """The Message subclass of one style."""
    name = "".join(word.title() for word in style.name.split("_")) + "Message"
    namespace = {
        "__slots__": (),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A :class:`Message` of style {style.name}.",
        # str's own constructor: Message.__new__ has picked the class already.
        "__new__": str.__new__,
        "style": style,
        "is_prompt": style in PROMPT_STYLES,
        "wants_password": style == PAM_PROMPT_ECHO_OFF,
        "is_error": style == PAM_ERROR_MSG,
        "is_info": style == PAM_TEXT_INFO,
    }
    return type(name, (Message,), namespace)


#: style (an int or a MessageStyle, equal and of equal hash) -> its Message subclass.
_KINDS: dict[int, type[Message]] = {style: _kind(style) for style in MessageStyle}
