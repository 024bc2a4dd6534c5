"""What a buggy or hostile module can send, through the real libpam.

pam_scripted sends each conversation call below; every well-formed one must
be answered byte for byte, every malformed one must end in a clean
PAM_CONV_ERR with ``*resp`` left NULL and a ConversationError from the phase,
never a crash, a double free or a leak. The cases run in child interpreters,
where a crash is a dead process instead of a dead pytest, and once more
under glibc's malloc checker and under valgrind.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from conftest import run_python
from hostile_module import Call, read_record
from pamphlet.constants import PAM_MAX_NUM_MSG

ECHO_OFF, ECHO_ON, ERROR, INFO, RADIO, BINARY = 1, 2, 3, 4, 5, 7
CONV_ERR = 19

# The child's conversation echoes: a prompt with text T is answered "re:" + T
# (so non-UTF-8 texts must round-trip to the byte), other messages get None.
RUNNER = """
import json, sys
import pamphlet
from pamphlet.testing import TemporaryService

class Echo(pamphlet.PamApplication):
    def conversation(self, messages):
        self.seen.append([[int(m.style), m.encode(self.encoding, "surrogateescape").hex()]
                          for m in messages])
        return ["re:" + m if m.is_prompt else None for m in messages]

results = {}
for name, stack, encoding in json.loads(sys.argv[1]):
    with TemporaryService(stack) as service:
        app = service.app(Echo, "bob", encoding=encoding)
        app.seen = []
        try:
            app.authenticate()
            outcome, cause = "success", None
        except pamphlet.PamError as exc:
            outcome = type(exc).__name__
            cause = type(exc.__cause__).__name__ if exc.__cause__ else None
        app.end()
        results[name] = {"outcome": outcome, "cause": cause, "seen": app.seen}
print(json.dumps(results))
"""


def echo(text: bytes | None) -> bytes:
    return b"re:" + (text or b"")


def answered(*messages: tuple[int, bytes | None], **options: Any) -> Call:
    """A call the application must answer: prompts echoed, the rest NULL."""
    expect = [
        echo(text) if style in (ECHO_OFF, ECHO_ON, RADIO) else None for style, text in messages
    ]
    return Call(messages, expect=expect, **options)


def refused(*messages: tuple[int, bytes | None], **options: Any) -> Call:
    """A malformed call: PAM_CONV_ERR, *resp left NULL."""
    return Call(messages, rc=CONV_ERR, **options)


PASSWORD = (ECHO_OFF, b"Password: ")
LONG_TEXT = b"\xe2\x82\xac" * 40_000  # 120,000 bytes of euro signs

# name: (calls, encoding); each case's module returns PAM_SUCCESS when every
# check held, so the phase's outcome is the application's doing alone.
WELL_FORMED = {
    "every_style_in_one_call": [
        answered(PASSWORD, (ECHO_ON, b"Login: "), (ERROR, b"oops"), (INFO, b"hi"), (RADIO, b"y/n"))
    ],
    "empty_and_null_texts": [answered((ECHO_ON, b""), (ECHO_OFF, None), (INFO, None), (INFO, b""))],
    "non_utf8_texts": [answered((ECHO_ON, b"\xff\xfe caf\xe9 \x80: "), (INFO, b"\xc3\x28"))],
    "long_text_and_answer": [answered((ECHO_ON, LONG_TEXT), (INFO, b"x" * 100_000))],
    "max_messages_in_one_call": [
        answered(*[(ECHO_ON if i % 2 else INFO, b"m%d" % i) for i in range(PAM_MAX_NUM_MSG)])
    ],
    "info_only_with_null_resp": [Call([(INFO, b"hello"), (ERROR, b"err")], null_resp=True)],
    "several_calls": [
        answered(PASSWORD),
        answered((INFO, b"a"), (ECHO_ON, b"b")),
        answered(PASSWORD),
    ],
}
WELL_FORMED_ENCODINGS = {"non_utf8_texts_latin1": ("non_utf8_texts", "latin-1")}

MALFORMED = {
    "num_msg_zero": [refused(PASSWORD, num_msg=0)],
    "num_msg_negative": [refused(PASSWORD, num_msg=-1)],
    "num_msg_above_max": [refused(PASSWORD, num_msg=PAM_MAX_NUM_MSG + 1)],
    "num_msg_huge": [refused(PASSWORD, num_msg=1000)],
    "binary_prompt": [refused((BINARY, b"\x00\x00\x00\x09\x01data"))],
    "style_zero": [refused((0, b"zero"))],
    "style_six": [refused((6, b"six"))],
    "style_negative": [refused((-1, b"minus"))],
    "style_huge": [refused((1 << 30, b"huge"))],
    "bad_style_after_good_ones": [refused(PASSWORD, (INFO, b"fine"), (99, b"bad"))],
    "null_message_array": [refused(PASSWORD, null_msg=True)],
    "prompt_with_null_resp": [refused(PASSWORD, null_resp=True)],
    # After the first failure, later calls of the phase fail too.
    "good_call_after_bad_one": [refused((0, b"bad")), refused(PASSWORD)],
    "bad_call_after_good_one": [answered(PASSWORD), refused((BINARY, b"\x00"))],
}

# The conversation must not even be asked: the user would type a secret
# that could never be delivered.
NEVER_ASKED = set(MALFORMED) - {"bad_call_after_good_one"}


def _cases(scripted: Any, names: list[str]) -> tuple[list[Any], dict[str, str]]:
    jobs, records = [], {}
    for name in names:
        if name in WELL_FORMED_ENCODINGS:
            base, encoding = WELL_FORMED_ENCODINGS[name]
            calls = WELL_FORMED[base]
        else:
            calls, encoding = {**WELL_FORMED, **MALFORMED}[name], "utf-8"
        line, record = scripted.line(calls)
        jobs.append((name, line + "\naccount required pam_permit.so", encoding))
        records[name] = record
    return jobs, records


ALL_CASES = sorted([*WELL_FORMED, *WELL_FORMED_ENCODINGS, *MALFORMED])


def run_cases(scripted: Any, names: list[str], **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    jobs, records = _cases(scripted, names)
    proc = run_python(RUNNER, json.dumps(jobs), **kwargs)
    return proc, {name: read_record(path) for name, path in records.items()}


@pytest.fixture(scope="module")
def outcomes(scripted_module_path: str) -> dict[str, Any]:
    """Every case, run once in one child interpreter."""
    from hostile_module import ScriptedModule

    module = ScriptedModule(scripted_module_path)
    try:
        proc, records = run_cases(module, ALL_CASES)
        assert proc.returncode == 0, proc.stderr  # the interpreter did not die
        results = json.loads(proc.stdout)
        return {name: (results[name], records[name]) for name in ALL_CASES}
    finally:
        module.cleanup()


@pytest.mark.parametrize("name", sorted([*WELL_FORMED, *WELL_FORMED_ENCODINGS]))
def test_well_formed_calls_are_answered_to_the_byte(outcomes, name):
    result, record = outcomes[name]
    assert record.mismatches == []
    assert result["outcome"] == "success"
    assert record.results == [0] and record.ended == 1
    base = WELL_FORMED_ENCODINGS.get(name, (name,))[0]
    sent = [
        [[style, (text or b"").hex()] for style, text in call.messages]
        for call in WELL_FORMED[base]
    ]
    assert result["seen"] == sent


def test_every_style_arrives_as_a_message_with_its_style(outcomes):
    result, record = outcomes["every_style_in_one_call"]
    assert [style for style, _ in result["seen"][0]] == [ECHO_OFF, ECHO_ON, ERROR, INFO, RADIO]
    (call,) = record.calls
    assert call.rc == 0 and call.resp_set
    assert call.answers == [
        (b"re:Password: ", 0),
        (b"re:Login: ", 0),
        (None, 0),
        (None, 0),
        (b"re:y/n", 0),
    ]


def test_null_resp_for_info_only_is_left_alone(outcomes):
    _, record = outcomes["info_only_with_null_resp"]
    assert [(c.rc, c.resp_set) for c in record.calls] == [(0, False)]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_calls_fail_closed(outcomes, name):
    result, record = outcomes[name]
    assert result["outcome"] == "ConversationError"
    assert result["cause"] == "ConversationProtocolError"
    # The module saw PAM_CONV_ERR with *resp left NULL for every refused call
    # (its own checks), then returned PAM_SUCCESS: the stack would have let
    # the user in, the application did not.
    assert record.mismatches == []
    assert record.results == [0] and record.ended == 1
    refused_calls = [c for c in record.calls if c.rc != 0]
    assert refused_calls and all(c.rc == CONV_ERR and not c.resp_set for c in refused_calls)
    if name in NEVER_ASKED:
        assert result["seen"] == []


def test_a_failed_call_is_not_answered_after_a_good_one(outcomes):
    result, record = outcomes["bad_call_after_good_one"]
    assert [c.rc for c in record.calls] == [0, CONV_ERR]
    assert record.calls[0].answers == [(b"re:Password: ", 0)]
    assert len(result["seen"]) == 1


def test_wrong_answer_is_caught_by_the_module(scripted, make_service):
    # The module's own check can fail: a test with it is not vacuous.
    line, record_path = scripted.line([Call([PASSWORD], expect=[b"something else"])])
    proc = run_python(RUNNER, json.dumps([("wrong", line, "utf-8")]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["wrong"]["outcome"] == "AuthenticationError"
    assert read_record(record_path).mismatches == ["answer 0"]


def _library(name: str, package: str) -> str:
    for pattern in (f"/usr/lib/*/{name}", f"/lib/*/{name}", f"/usr/lib/{name}"):
        found = glob.glob(pattern)
        if found:
            return found[0]
    pytest.fail(f"{name} is missing: apt-get install {package}")


def _expect_all_cases(proc: Any, records: dict[str, Any]) -> None:
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout)
    for name in records:
        expected = "ConversationError" if name in MALFORMED else "success"
        assert results[name]["outcome"] == expected, name
        assert records[name].mismatches == [], name


# libpam and the module free our answers with the free() the dynamic linker
# bound them to. With an allocator preloaded, as servers often run, pamphlet's
# calloc must be that allocator's too, or the first answer is a crash.
# (glibc's own checker, libc_malloc_debug with MALLOC_CHECK_=3, cannot stand
# in here: it exports calloc only under a non-default symbol version, so
# dlsym, and so ctypes, still finds libc's.)
def test_all_cases_with_jemalloc_preloaded(scripted):
    env = dict(
        os.environ,
        LD_PRELOAD=_library("libjemalloc.so.2", "libjemalloc2"),
        MALLOC_CONF="junk:true,abort_conf:true",
        PYTHONMALLOC="malloc",
    )
    _expect_all_cases(*run_cases(scripted, ALL_CASES, env=env))


def test_all_cases_under_glibc_heap_checks(scripted):
    # No tcache: a double free reaches glibc's own consistency checks, which
    # abort; freed memory is overwritten, so a use after free reads garbage.
    tunables = "glibc.malloc.tcache_count=0:glibc.malloc.perturb=165"
    env = dict(os.environ, GLIBC_TUNABLES=tunables, PYTHONMALLOC="malloc")
    _expect_all_cases(*run_cases(scripted, ALL_CASES, env=env))


VALGRIND_SLICE = [
    "every_style_in_one_call",
    "non_utf8_texts",
    "num_msg_above_max",
    "binary_prompt",
    "prompt_with_null_resp",
    "bad_call_after_good_one",
]


def test_a_slice_under_valgrind(scripted):
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.fail("valgrind is needed: apt-get install valgrind")
    # Any invalid read, write or free in the conversation path exits 99.
    # Leaks are counted from what pamphlet allocates: the responses.
    command = [
        valgrind,
        "--error-exitcode=99",
        "--errors-for-leak-kinds=definite",
        "--leak-check=full",
        "--show-leak-kinds=definite",
        # Uninitialised-value reports come from CPython's own start-up
        # (int.from_bytes during imports), not from this path.
        "--undef-value-errors=no",
        sys.executable,
    ]
    jobs, records = _cases(scripted, VALGRIND_SLICE)
    proc = subprocess.run(
        [*command, "-c", textwrap.dedent(RUNNER), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONMALLOC="malloc"),
    )
    _expect_all_cases(proc, {name: read_record(path) for name, path in records.items()})
    assert "definitely lost: 0 bytes" in proc.stderr or "no leaks are possible" in proc.stderr
