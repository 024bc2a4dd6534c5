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
_STYLES = {int(style): style for style in MessageStyle}


class Message(str):
    """A conversation message: its text, plus the ``style`` PAM gave it.

    ``is_prompt`` messages want an answer; ``wants_password`` ones want it
    without echo. Info and error messages are answered with ``""``.
    """

    style: MessageStyle

    def __new__(cls, text: str, style: int = PAM_TEXT_INFO) -> Message:
        self = str.__new__(cls, text)
        # A dict lookup: calling the enum costs several Python frames per message.
        known = _STYLES.get(style) if type(style) is int else None
        self.style = MessageStyle(style) if known is None else known
        return self

    @property
    def is_prompt(self) -> bool:
        """The message asks a question and wants an answer."""
        return self.style in PROMPT_STYLES

    @property
    def wants_password(self) -> bool:
        """The answer is a secret: read it without echo."""
        return self.style == PAM_PROMPT_ECHO_OFF

    @property
    def is_error(self) -> bool:
        return self.style == PAM_ERROR_MSG

    @property
    def is_info(self) -> bool:
        return self.style == PAM_TEXT_INFO

    def __repr__(self) -> str:
        return f"Message({str(self)!r}, {self.style.name})"

    def __reduce__(self) -> tuple[object, ...]:
        return (Message, (str(self), int(self.style)))
