"""The conversation fails closed: whatever goes wrong on our side, PAM fails."""

from __future__ import annotations

import ctypes
import json

import pytest

import pamphlet
from conftest import ScriptedApp, run_python
from pamphlet import _libpam, conversation
from pamphlet.constants import PAM_MAX_NUM_MSG, ReturnCode
from pamphlet.testing import TemporaryService

# Each case runs in its own interpreter, where a crash would show as a dead
# process instead of taking pytest down. The password is "sec": a conversation
# whose answer were cut at a NUL ("sec\0ret") would log in.
CASE_SCRIPT = """
import json, sys
import pamphlet
from pamphlet.testing import TemporaryService

case = sys.argv[1]

def answers(messages):
    n = len(messages)
    if case == "raises":
        raise LookupError("broken conversation")
    if case == "too_few":
        return []
    if case == "too_many":
        return ["sec"] * (n + 1)
    if case == "returns_none":
        return None
    if case == "non_string":
        return [42] * n
    if case == "none_for_prompt":
        return [None] * n
    if case == "returns_str":
        return "sec"
    if case == "nul_in_str":
        return ["sec\\0ret"] * n
    if case == "nul_in_bytes":
        return [b"sec\\0ret"] * n
    if case == "generator_dies":
        def gen():
            raise RuntimeError("generator died")
            yield "sec"
        return gen()
    if case == "keyboard_interrupt":
        raise KeyboardInterrupt
    if case == "system_exit":
        raise SystemExit(3)
    if case == "right_bytes":
        return [b"sec"] * n
    raise AssertionError(case)

class App(pamphlet.PamApplication):
    def conversation(self, messages):
        return answers(messages)

# "optional" pam_matrix, then pam_permit: the stack itself succeeds even when
# pam_matrix fails, so only pamphlet can make this login fail.
stack = sys.argv[2]
with TemporaryService(stack, users={"bob": "sec"}) as service:
    app = service.app(App, "bob")
    try:
        app.authenticate()
        result = {"outcome": "success"}
    except BaseException as exc:
        cause = exc.__cause__
        result = {
            "outcome": type(exc).__name__,
            "message": str(exc),
            "cause": type(cause).__name__ if cause else None,
        }
    app.end()
print(json.dumps(result))
"""

STRICT = "auth required {pam_matrix} passdb={passdb}\naccount required pam_permit.so"
LENIENT = (
    "auth optional {pam_matrix} passdb={passdb}\nauth required pam_permit.so\n"
    "account required pam_permit.so"
)

FAILING_CASES = {
    "raises": "LookupError",
    "too_few": "ValueError",
    "too_many": "ValueError",
    "returns_none": "TypeError",
    "non_string": "TypeError",
    "none_for_prompt": "TypeError",
    "returns_str": "TypeError",
    "nul_in_str": "ValueError",
    "nul_in_bytes": "ValueError",
    "generator_dies": "RuntimeError",
}


def run_case(case: str, stack: str) -> dict[str, object]:
    proc = run_python(CASE_SCRIPT, case, stack)
    assert proc.returncode == 0, proc.stderr  # the interpreter did not die
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("stack", [STRICT, LENIENT], ids=["required", "optional-then-permit"])
@pytest.mark.parametrize("case", sorted(FAILING_CASES))
def test_conversation_mistake_fails_the_phase(case, stack):
    result = run_case(case, stack)
    assert result["outcome"] == "ConversationError"
    assert result["cause"] == FAILING_CASES[case]


def test_right_answer_as_bytes_logs_in():
    assert run_case("right_bytes", STRICT) == {"outcome": "success"}


def test_keyboard_interrupt_is_raised_as_is():
    assert run_case("keyboard_interrupt", STRICT)["outcome"] == "KeyboardInterrupt"


def test_system_exit_is_raised_as_is():
    assert run_case("system_exit", STRICT)["outcome"] == "SystemExit"


def test_first_failure_is_kept_and_no_more_calls_are_made(make_service):
    # pam_chatty calls the conversation once per message; after the first
    # failure the rest get PAM_CONV_ERR without reaching Python.
    service = make_service(f"auth required {_chatty()} num_lines=5 info")
    calls = []

    class App(pamphlet.PamApplication):
        def conversation(self, messages):
            calls.append(list(messages))
            raise ValueError(f"call {len(calls)}")

    with service.app(App, "bob") as app:
        with pytest.raises(pamphlet.ConversationError) as info:
            app.authenticate()
    assert len(calls) == 1
    assert str(info.value.__cause__) == "call 1"


def test_conversation_error_does_not_stick_to_the_next_phase(matrix):
    app = matrix.app(ScriptedApp, "bob", answers=[])
    with pytest.raises(pamphlet.ConversationError):
        app.authenticate()  # no answer left: IndexError inside
    app.answers = ["secret"]
    app.authenticate()
    app.end()


def test_default_conversation_refuses(matrix):
    with matrix.app(pamphlet.PamApplication, "bob") as app:
        with pytest.raises(pamphlet.ConversationError) as info:
            app.authenticate()
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_chatty_info_and_error_messages(make_service):
    service = make_service(f"auth required {_chatty()} num_lines=3 info error")
    with service.app(ScriptedApp, "bob") as app:
        app.authenticate()
    assert [(str(m), m.is_info, m.is_error) for m in app.seen] == [
        ("Authentication succeeded", True, False),
    ] * 3 + [("Authentication generated an error", False, True)] * 3


def test_non_prompt_answers_may_be_none(make_service):
    service = make_service(f"auth required {_chatty()} num_lines=3 info")

    class App(pamphlet.PamApplication):
        def conversation(self, messages):
            return [None for _ in messages]

    with service.app(App, "bob") as app:
        app.authenticate()


def _chatty() -> str:
    from pamphlet.testing import pam_wrapper_module

    return pam_wrapper_module("pam_chatty")


# -- what a buggy module could send: the callback called as libpam calls it --


@pytest.fixture(scope="module")
def permit_service():
    with TemporaryService("auth required pam_permit.so") as service:
        yield service


class _Owner(pamphlet.PamApplication):
    """A real application whose transaction is called as libpam would call it."""

    service: TemporaryService

    def __init__(self, answers=None):
        self.answers = answers
        self.seen = None
        super().__init__(self.service.name, "bob", confdir=self.service.confdir)

    def conversation(self, messages):
        self.seen = list(messages)
        return self.answers if self.answers is not None else ["ok"] * len(messages)

    @property
    def _conversation_error(self):
        return self._transaction._failure


@pytest.fixture(autouse=True)
def _owner_service(permit_service):
    _Owner.service = permit_service


def _call(owner, styles_texts, *, num_msg=None, null_msg=False, null_resp=False):
    key = conversation.register(owner._transaction)
    try:
        messages = [_libpam.PamMessage(style, text) for style, text in styles_texts]
        array = (ctypes.POINTER(_libpam.PamMessage) * max(1, len(messages)))(
            *[ctypes.pointer(m) for m in messages]
        )
        resp = ctypes.POINTER(_libpam.PamResponse)()
        msg_arg = (
            None
            if null_msg
            else ctypes.cast(array, ctypes.POINTER(ctypes.POINTER(_libpam.PamMessage)))
        )
        resp_arg = None if null_resp else ctypes.pointer(resp)
        code = conversation.CONVERSATION_CALLBACK(
            len(messages) if num_msg is None else num_msg, msg_arg, resp_arg, key
        )
        answers = None
        if resp:
            answers = [
                resp[i].resp and ctypes.string_at(resp[i].resp) for i in range(len(messages))
            ]
            _libpam.free_responses(ctypes.cast(resp, ctypes.c_void_p).value, len(messages))
        return code, answers
    finally:
        conversation.unregister(key)


def test_callback_answers_prompts_and_leaves_info_null():
    owner = _Owner(["pw", "ignored"])
    code, answers = _call(owner, [(1, b"Password: "), (4, b"hello")])
    assert code == ReturnCode.SUCCESS
    assert answers == [b"pw", None]
    assert owner.seen == ["Password: ", "hello"]


@pytest.mark.parametrize("num_msg", [0, -1, PAM_MAX_NUM_MSG + 1])
def test_callback_refuses_bad_message_counts(num_msg):
    owner = _Owner()
    code, answers = _call(owner, [(1, b"Password: ")], num_msg=num_msg)
    assert code == ReturnCode.CONV_ERR and answers is None
    assert owner.seen is None  # Python's conversation was never called
    assert isinstance(owner._conversation_error, conversation.ConversationProtocolError)


def test_callback_handles_max_messages():
    owner = _Owner()
    code, answers = _call(owner, [(2, b"q%d" % i) for i in range(PAM_MAX_NUM_MSG)])
    assert code == ReturnCode.SUCCESS and answers == [b"ok"] * PAM_MAX_NUM_MSG


@pytest.mark.parametrize(
    ("style", "said"),
    [(7, "sent a PAM_BINARY_PROMPT, which pamphlet does not answer"), (99, "unknown style 99")],
)
def test_callback_refuses_binary_prompt_and_unknown_style(style, said):
    owner = _Owner()
    code, _ = _call(owner, [(style, b"\x00\x00\x00\x05\x01")])
    assert code == ReturnCode.CONV_ERR
    assert owner.seen is None  # refused before the application is asked
    assert isinstance(owner._conversation_error, conversation.ConversationProtocolError)
    assert said in str(owner._conversation_error)


def test_callback_with_null_resp():
    owner = _Owner()
    code, _ = _call(owner, [(4, b"info only")], null_resp=True)
    assert code == ReturnCode.SUCCESS and owner.seen == ["info only"]
    owner = _Owner()
    code, _ = _call(owner, [(1, b"Password: ")], null_resp=True)
    assert code == ReturnCode.CONV_ERR


def test_callback_with_null_message_array_and_null_text():
    owner = _Owner()
    code, _ = _call(owner, [(1, b"x")], null_msg=True)
    assert code == ReturnCode.CONV_ERR
    owner = _Owner()
    code, answers = _call(owner, [(2, None)])
    assert code == ReturnCode.SUCCESS and owner.seen == [""] and answers == [b"ok"]


def test_callback_with_unknown_appdata():
    code = conversation.CONVERSATION_CALLBACK(1, None, None, 123456789)
    assert code == ReturnCode.CONV_ERR


def test_long_and_non_utf8_answers_are_not_truncated():
    long_answer = "x" * 100_000
    owner = _Owner([long_answer, "\udcff\udcfe"])
    code, answers = _call(owner, [(1, b"a"), (2, b"b")])
    assert code == ReturnCode.SUCCESS
    assert answers == [long_answer.encode(), b"\xff\xfe"]


def test_message_is_a_str_with_attributes():
    message = pamphlet.Message("Password: ", pamphlet.PAM_PROMPT_ECHO_OFF)
    assert isinstance(message, str) and message.rstrip() == "Password:"
    assert message.is_prompt and message.wants_password
    assert not message.is_error and not message.is_info
    assert pamphlet.Message("oops", pamphlet.PAM_ERROR_MSG).is_error
    assert pamphlet.Message("hi", pamphlet.PAM_TEXT_INFO).is_info
    assert repr(message) == "Message('Password: ', PROMPT_ECHO_OFF)"


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("mutation", ["pop", "clear", "append"])
def test_conversation_changing_the_message_list_fails_closed(mutation, count):
    # Answers are counted against what libpam sent, never against the list the
    # conversation was handed (which it may change): a short response array
    # would let the module read past its end.
    class Owner(_Owner):
        def conversation(self, messages):
            answers = ["pw"] * len(messages)
            if mutation == "pop":
                messages.pop()
                answers.pop()
            elif mutation == "clear":
                messages.clear()
                answers.clear()
            else:
                messages.append(pamphlet.Message("extra", pamphlet.PAM_PROMPT_ECHO_OFF))
                answers.append("pw")
            return answers

    owner = Owner()
    code, answers = _call(owner, [(1, b"one"), (1, b"two")][:count])
    assert code == ReturnCode.CONV_ERR and answers is None
    assert isinstance(owner._conversation_error, ValueError)
