"""Reliability: the conversation attacked from the application's side, threads,
interrupts and long runs.

- Fail closed, by property: hypothesis makes conversations that answer with
  every type, count and failure; pam_scripted accepts only the exact bytes.
  A login succeeds exactly when every answer was right, never otherwise.
- Threads: 16 threads, each with its own applications, right and wrong.
- Interrupts: SIGINT while the conversation waits on input().
- Soak: mixed transactions (good, wrong, raising, hostile, abandoned) with
  RSS, file descriptors and threads sampled: flat.

The long runs are marked ``slow`` (``python3 -m pytest -m slow``); a short
slice of each runs by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import pamphlet
from conftest import UNIX_STACK, ScriptedApp, run_python
from hostile_module import Call, read_record, script_text
from pamphlet.testing import TemporaryService
from test_unix import no_delay

ECHO_OFF, ECHO_ON, ERROR, INFO, RADIO = 1, 2, 3, 4, 5
PROMPTS = (ECHO_OFF, ECHO_ON, RADIO)

# -- fail closed, by property ------------------------------------------------


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt and friends without stopping pytest."""


def raise_(exc: BaseException) -> Any:
    raise exc


# How one answer is given. Each maker takes the expected bytes and returns the
# answer; ``right`` says whether a prompt answered so must log in.
@dataclass(frozen=True)
class AnswerKind:
    name: str
    right: bool
    # for non-prompts: is the type accepted (the answer itself is ignored)?
    fine_for_info: bool

    def make(self, expected: bytes) -> Any:
        text = expected.decode("utf-8", "surrogateescape")
        return {
            "str": lambda: text,
            "bytes": lambda: expected,
            "bytearray": lambda: bytearray(expected),
            "memoryview": lambda: memoryview(expected),
            "str_subclass": lambda: type("S", (str,), {})(text),
            "suffix": lambda: text + "x",
            "prefix": lambda: text[:-1] if text else "x",
            "nul_inside": lambda: text + "\0" + "tail",
            "nul_bytes": lambda: expected + b"\0tail",
            "none": lambda: None,
            "int": lambda: 7,
            "float": lambda: 1.5,
            "object": lambda: object(),
            "huge": lambda: "h" * 1_000_000,
            "lone_surrogate": lambda: text + "\ud800",
            "empty": lambda: "" if expected else "x",
        }[self.name]()


ANSWER_KINDS = [
    AnswerKind("str", True, True),
    AnswerKind("bytes", True, True),
    AnswerKind("bytearray", True, True),
    AnswerKind("memoryview", True, True),
    AnswerKind("str_subclass", True, True),
    AnswerKind("suffix", False, True),
    AnswerKind("prefix", False, True),
    AnswerKind("nul_inside", False, True),
    AnswerKind("nul_bytes", False, True),
    AnswerKind("none", False, True),
    AnswerKind("int", False, False),
    AnswerKind("float", False, False),
    AnswerKind("object", False, False),
    AnswerKind("huge", False, True),
    AnswerKind("lone_surrogate", False, False),  # unencodable even for info
    AnswerKind("empty", False, True),
]

CONTAINERS = ["list", "tuple", "generator", "iterator"]
FAILURES = [
    None,
    "raise_before",
    "raise_keyboard",
    "generator_raises",
    "too_few",
    "too_many",
    "returns_none",
    "returns_str",
    "returns_int",
]

# Texts that are both the prompt and the answer expected to it: C strings,
# so no NUL; non-UTF-8 bytes and long ones included.
secrets_ = st.one_of(
    st.binary(max_size=24).filter(lambda b: b"\0" not in b),
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12).map(
        lambda t: t.encode("utf-8", "surrogateescape")
    ),
    st.sampled_from([b"\xff\xfe\x80", b"caf\xe9", b"a" * 70_000]),
)
messages_ = st.lists(
    st.tuples(st.sampled_from([ECHO_OFF, ECHO_ON, ERROR, INFO, RADIO]), secrets_),
    min_size=1,
    max_size=4,
)


RIGHT_KINDS = [kind for kind in ANSWER_KINDS if kind.right]


@st.composite
def call_plans(draw: Any) -> dict[str, Any]:
    messages = draw(messages_)
    # Half the calls are careful (every answer of a right kind, no failure):
    # so plans that must log in are common, not a lucky draw.
    careful = draw(st.booleans())
    kinds = RIGHT_KINDS if careful else ANSWER_KINDS
    return {
        "messages": messages,
        "answers": [draw(st.sampled_from(kinds)) for _ in messages],
        "container": draw(st.sampled_from(CONTAINERS)),
        "failure": None if careful else draw(st.sampled_from(FAILURES)),
    }


def plan_is_right(plan: dict[str, Any]) -> bool:
    """The oracle: would a careful reading say this conversation logs in?"""
    if plan["failure"] is not None:
        return False
    for (style, _), kind in zip(plan["messages"], plan["answers"], strict=True):
        if style in PROMPTS and not kind.right:
            return False
        if style not in PROMPTS and not kind.fine_for_info:
            return False
    return True


def give_answers(plan: dict[str, Any]) -> Any:
    answers = [
        kind.make(text) for (_, text), kind in zip(plan["messages"], plan["answers"], strict=True)
    ]
    failure = plan["failure"]
    if failure == "raise_before":
        raise Boom("the conversation broke")
    if failure == "raise_keyboard":
        raise Interrupt()
    if failure == "too_few":
        answers = answers[:-1]
    elif failure == "too_many":
        answers = [*answers, "extra"]
    elif failure == "returns_none":
        return None
    elif failure == "returns_str":
        return "".join(a for a in answers if isinstance(a, str))
    elif failure == "returns_int":
        return len(answers)
    container = plan["container"]
    if failure == "generator_raises":

        def broken() -> Iterator[Any]:
            yield from answers[:-1]
            raise Boom("the generator broke")

        return broken()
    if container == "tuple":
        return tuple(answers)
    if container == "generator":
        return (answer for answer in answers)
    if container == "iterator":
        return iter(answers)
    return answers


class PlannedApp(pamphlet.PamApplication):
    plans: list[dict[str, Any]]

    def conversation(self, messages: list[pamphlet.Message]) -> Any:
        plan = self.plans[self.calls]
        self.calls += 1
        assert [(m.style, m.encode("utf-8", "surrogateescape")) for m in messages] == [
            (style, text) for style, text in plan["messages"]
        ]
        return give_answers(plan)


@pytest.fixture(scope="module")
def property_stack(scripted_module_path: str) -> Iterator[tuple[TemporaryService, str]]:
    """A service whose only say is pam_scripted's byte-exact check."""
    service = TemporaryService("account required pam_permit.so")
    script = os.path.join(service.confdir, "script")
    service.add_service(
        service.name,
        f"auth required {scripted_module_path} script={script}\naccount required pam_permit.so",
    )
    yield service, script
    service.cleanup()


def check_plans(property_stack: tuple[TemporaryService, str], plans: list[dict[str, Any]]) -> None:
    service, script = property_stack
    calls = [
        Call(
            plan["messages"],
            expect=[text if style in PROMPTS else None for style, text in plan["messages"]],
        )
        for plan in plans
    ]
    with open(script, "w", encoding="ascii") as file:
        file.write(script_text(calls))
    right = all(plan_is_right(plan) for plan in plans)
    if currently_in_test_context():
        event("must log in" if right else "must be refused")
    app = service.app(PlannedApp, "bob")
    app.plans, app.calls = plans, 0
    try:
        app.authenticate()
        outcome: Any = "success"
    except (pamphlet.PamError, Interrupt) as exc:
        outcome = exc
    finally:
        app.end()
    if right:
        assert outcome == "success", f"a right conversation was refused: {outcome!r}"
        assert app.calls == len(plans)
    else:
        assert outcome != "success", "a wrong or broken conversation logged in"
        # A failure inside the conversation comes out as ConversationError, a
        # wrong answer as the module's AuthenticationError, a BaseException as itself.
        assert isinstance(
            outcome, (pamphlet.ConversationError, pamphlet.AuthenticationError, Interrupt)
        ), repr(outcome)


PLANS = st.lists(call_plans(), min_size=1, max_size=3)
COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=300, derandomize=True, **COMMON)  # type: ignore[arg-type]
@given(plans=PLANS)
def test_only_right_answers_log_in(property_stack, plans):
    check_plans(property_stack, plans)


@pytest.mark.slow
@settings(max_examples=5000, **COMMON)  # type: ignore[arg-type]
@given(plans=PLANS)
def test_only_right_answers_log_in_long(property_stack, plans):
    check_plans(property_stack, plans)


def test_the_property_can_fail(property_stack):
    # Right plans log in and wrong ones do not, and an oracle that called a
    # wrong answer right would be caught: the property is not vacuous.
    password = b"s3cret"
    by_name = {kind.name: kind for kind in ANSWER_KINDS}
    good = {
        "messages": [(ECHO_OFF, password), (INFO, b"hi")],
        "answers": [by_name["str"], by_name["none"]],
        "container": "generator",
        "failure": None,
    }
    check_plans(property_stack, [good])
    one_off = dict(good, answers=[by_name["prefix"], by_name["none"]])
    check_plans(property_stack, [one_off])
    lying = AnswerKind("prefix", right=True, fine_for_info=True)
    with pytest.raises(AssertionError, match="refused"):
        check_plans(property_stack, [dict(good, answers=[lying, by_name["none"]])])


# -- threads -----------------------------------------------------------------


def run_threads(count: int, work: Any, seconds: float | None = None) -> list[str]:
    """Run ``work(index, errors)`` in ``count`` threads at once; their errors."""
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        try:
            barrier.wait()
            work(index, errors)
        except BaseException as exc:  # a thread must report, not vanish
            errors.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


def matrix_work(service: TemporaryService, rounds: int) -> Any:
    def work(index: int, errors: list[str]) -> None:
        user, password = f"user{index}", f"pw-{index}"
        for n in range(rounds):
            wrong = n % 3 == 2
            app = service.app(ScriptedApp, user, answers=["nope" if wrong else password])
            try:
                app.authenticate()
                app.account_management()
                app.open_session()
                if wrong:
                    errors.append(f"{user} logged in with a wrong password")
                elif app.environ.get("HOMEDIR") != f"/home/{user}":
                    errors.append(f"{user} got {dict(app.environ)!r}")
            except pamphlet.AuthenticationError:
                if not wrong:
                    errors.append(f"{user} refused with the right password")
            finally:
                app.end()

    return work


@pytest.fixture
def sixteen_users(make_service):
    return make_service(users={f"user{i}": f"pw-{i}" for i in range(16)})


def test_sixteen_threads_against_pam_matrix(sixteen_users):
    assert run_threads(16, matrix_work(sixteen_users, 30)) == []


@pytest.mark.slow
def test_sixteen_threads_against_pam_matrix_long(sixteen_users):
    assert run_threads(16, matrix_work(sixteen_users, 3000)) == []


@pytest.mark.root
def test_sixteen_threads_against_pam_unix(make_service, unix_user):
    name, password = unix_user
    service = make_service(UNIX_STACK)

    def work(index: int, errors: list[str]) -> None:
        for n in range(3):
            wrong = (index + n) % 2 == 1
            with service.app(ScriptedApp, name, answers=["nope" if wrong else password]) as app:
                no_delay(app)
                try:
                    app.authenticate()
                    app.account_management()
                    if wrong:
                        errors.append("pam_unix let a wrong password in")
                except pamphlet.AuthenticationError:
                    if not wrong:
                        errors.append("pam_unix refused the right password")

    assert run_threads(16, work) == []


# -- interrupts --------------------------------------------------------------

# A plain application, as a user would write it: input() in the conversation,
# the transaction in a with-block. pam_scripted's record shows pam_end ran.
INTERRUPTED_APP = """
import sys
import pamphlet
from pamphlet.testing import TemporaryService

class Login(pamphlet.PamApplication):
    def conversation(self, messages):
        return [input(m) if m.is_prompt else None for m in messages]

stack = sys.argv[1]
catch = sys.argv[2] == "catch"
with TemporaryService(stack) as service:
    try:
        with service.app(Login, "bob") as app:
            app.authenticate()
            print("LOGGED IN", flush=True)
    except KeyboardInterrupt:
        if not catch:
            raise
        print("interrupted", flush=True)
        sys.exit(130)
"""


@pytest.mark.parametrize("catch", ["catch", "propagate"])
def test_sigint_while_the_conversation_waits_on_input(scripted, catch):
    line, record_path = scripted.line([Call([(ECHO_OFF, b"Password: ")], expect=[b"pw"])])
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(INTERRUPTED_APP), line, catch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # input() writes the prompt, then blocks on the pipe we keep open.
        assert proc.stdout is not None
        prompt = proc.stdout.read(len("Password: "))
        assert prompt == "Password: "
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected_code = 130 if catch == "catch" else -signal.SIGINT
    assert proc.returncode == expected_code, err
    assert "LOGGED IN" not in out
    if catch == "catch":
        assert out.strip() == "interrupted"
    else:
        assert err.rstrip().endswith("KeyboardInterrupt")
    assert "Exception ignored" not in err and "Fatal" not in err
    record = read_record(record_path)
    assert record.ended == 1  # pam_end ran: the handle was ended
    assert [c.rc for c in record.calls] == [19]  # the module saw PAM_CONV_ERR


def test_sigint_while_the_cli_waits_for_an_answer(scripted):
    # tests/test_cli.py interrupts the command on a terminal; here its answers
    # come from a pipe, and pam_scripted's record shows the handle was ended.
    line, record_path = scripted.line([Call([(ECHO_OFF, b"Password: ")], expect=[b"pw"])])
    with TemporaryService(line) as service:
        command = ["-m", "pamphlet", "--confdir", service.confdir, service.name, "bob"]
        proc = subprocess.Popen(
            [sys.executable, *command, "authenticate"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            assert proc.stderr.read(len(b"Password: ")) == b"Password: "
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert b"pamphlet: interrupted" in err and b"Traceback" not in err
    assert b"successfully" not in out
    record = read_record(record_path)
    assert record.ended == 1
    assert [c.rc for c in record.calls] == [19]


# -- soak --------------------------------------------------------------------

# Mixed transactions in a child interpreter, with RSS, file descriptors and
# threads sampled after a warm-up; prints the samples as JSON.
SOAK = """
import gc, json, os, sys, warnings
import pamphlet
from pamphlet.testing import TemporaryService

warnings.simplefilter("ignore", ResourceWarning)  # the abandoned ones, on purpose
count, samples_wanted, hostile_line = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def status(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field):
                return int(line.split()[1])

class App(pamphlet.PamApplication):
    answer = "secret"
    def conversation(self, messages):
        if self.answer is None:
            raise RuntimeError("broken on purpose")
        return [self.answer if m.is_prompt else None for m in messages]

def one(n, matrix, hostile):
    kind = n % 6
    if kind == 4:
        app = App(hostile.name, "bob", confdir=hostile.confdir)
    else:
        app = App(matrix.name, "bob", confdir=matrix.confdir)
    app.answer = {1: "wrong", 2: None}.get(kind, "secret")
    try:
        app.authenticate()
        app.account_management()
        app.open_session()
        app.environ["SOAK"] = str(n)
    except pamphlet.PamError:
        pass
    if kind == 5:
        return  # abandoned mid-transaction: the garbage collector ends it
    app.end()

with TemporaryService(users={"bob": "secret"}) as matrix, \\
        TemporaryService(hostile_line + "\\naccount required pam_permit.so",
                         name="hostile") as hostile:
    for n in range(2000):
        one(n, matrix, hostile)
    gc.collect()
    samples = []
    step = max(1, count // samples_wanted)
    for n in range(count):
        one(n, matrix, hostile)
        if n % step == step - 1:
            gc.collect()
            samples.append({
                "n": n + 1,
                "rss_kib": status("VmRSS:"),
                "fds": len(os.listdir("/proc/self/fd")),
                "threads": status("Threads:"),
            })
print(json.dumps(samples))
"""


def soak(scripted: Any, count: int) -> list[dict[str, int]]:
    # The hostile service: a malformed call (num_msg above the maximum), then
    # a prompt; it must end in ConversationError every time.
    line, _ = scripted.line(
        [Call([(ECHO_OFF, b"Password: ")], rc=19, num_msg=33), Call([(ECHO_OFF, b"P: ")], rc=19)]
    )
    proc = run_python(SOAK, str(count), "20", line.replace("record=", "norecord="))
    assert proc.returncode == 0, proc.stderr
    samples: list[dict[str, int]] = json.loads(proc.stdout)
    return samples


def assert_flat(samples: list[dict[str, int]], rss_slack_kib: int) -> None:
    first, last = samples[0], samples[-1]
    assert all(s["fds"] == first["fds"] for s in samples), samples
    assert all(s["threads"] == first["threads"] for s in samples), samples
    assert last["rss_kib"] - first["rss_kib"] < rss_slack_kib, samples


def test_soak_slice(scripted):
    assert_flat(soak(scripted, 6000), rss_slack_kib=1024)


@pytest.mark.slow
def test_soak_100000_transactions(scripted):
    samples = soak(scripted, 100_000)
    print(json.dumps(samples))
    assert_flat(samples, rss_slack_kib=2048)


# -- soak through the threaded and async flavours ------------------------------

# Half the transactions answer; the other half are abandoned mid-conversation,
# the ways a server loses its client: end() while the phase waits, abort() and
# the object dropped (its finalizer ends it), the awaiting task cancelled.
FLAVOURED_SOAK = """
import asyncio, gc, json, os, sys, time, warnings
import pamphlet
from pamphlet.testing import TemporaryService

warnings.simplefilter("ignore", ResourceWarning)  # the dropped ones, on purpose
flavour, count, samples_wanted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def status(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field):
                return int(line.split()[1])

def threads(expected=1, seconds=5.0):
    # end() returns once the phase's thread has delivered its outcome (and,
    # threaded, has been joined), but the kernel drops the thread's task a
    # moment after its last bytecode: on a loaded machine up to 0.1 s later,
    # and no Python API before 3.13 can wait for that. So the count is read
    # once it is back to ``expected``; a leaked thread is still there when
    # the deadline passes.
    deadline = time.monotonic() + seconds
    while len(os.listdir("/proc/self/task")) > expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return len(os.listdir("/proc/self/task"))

def sample(n):
    gc.collect()
    return {"n": n, "rss_kib": status("VmRSS:"), "fds": len(os.listdir("/proc/self/fd")),
            "threads": threads()}

wrong = []

def threaded_one(n, service):
    app = pamphlet.ThreadedPamApplication(service.name, "bob", confdir=service.confdir)
    thread = app.authenticate()
    data = app.get_data(timeout=60)
    if not (isinstance(data, list) and data[0].is_prompt):
        wrong.append(f"{n}: asked {data!r}")
    way = n % 4
    if way == 0:
        app.set_input(["secret"])
        outcome = app.get_data(timeout=60)
        if outcome is not None:
            wrong.append(f"{n}: refused {outcome!r}")
        thread.join()
        app.end()
    elif way == 1:
        app.set_input(["wrong"])
        if not isinstance(app.get_data(timeout=60), pamphlet.AuthenticationError):
            wrong.append(f"{n}: a wrong password was not refused")
        thread.join()
        app.end()
    elif way == 2:
        app.end()  # the client went away: end() aborts the waiting conversation
        thread.join()
    else:
        app.abort()  # released, then dropped without end(): the finalizer ends it
        thread.join()
        if not isinstance(app.get_data(timeout=60), pamphlet.ConversationError):
            wrong.append(f"{n}: an aborted conversation did not fail")

class AsyncLogin(pamphlet.AsyncPamApplication):
    async def conversation(self, messages):
        self.asked.set()
        if self.answer is None:
            await asyncio.Event().wait()  # a client that never answers
        return [self.answer if m.is_prompt else None for m in messages]

async def async_one(n, service):
    app = AsyncLogin(service.name, "bob", confdir=service.confdir)
    app.asked = asyncio.Event()
    way = n % 4
    app.answer = {0: "secret", 1: "wrong"}.get(way)
    phase = asyncio.ensure_future(app.authenticate())
    try:
        if way == 0:
            await phase
        elif way == 1:
            try:
                await phase
                wrong.append(f"{n}: a wrong password was not refused")
            except pamphlet.AuthenticationError:
                pass
        elif way == 2:
            await app.asked.wait()
            phase.cancel()  # the task serving the client is cancelled
            try:
                await phase
            except asyncio.CancelledError:
                pass
        else:
            await app.asked.wait()
            await app.end()  # end() aborts the waiting conversation
            try:
                await phase
                wrong.append(f"{n}: an abandoned conversation logged in")
            except pamphlet.ConversationError:
                pass
    finally:
        await app.end()

async def run_async(service, count, step, samples):
    for n in range(count):
        await async_one(n, service)
        if n % step == step - 1:
            samples.append(sample(n + 1))

with TemporaryService(users={"bob": "secret"}) as service:
    warm = min(400, count)
    samples = []
    step = max(1, count // samples_wanted)
    if flavour == "threaded":
        for n in range(warm):
            threaded_one(n, service)
        for n in range(count):
            threaded_one(n, service)
            if n % step == step - 1:
                samples.append(sample(n + 1))
    else:
        asyncio.run(run_async(service, warm, warm + 1, []))
        asyncio.run(run_async(service, count, step, samples))
print(json.dumps({"samples": samples, "wrong": wrong[:20]}))
"""


def flavoured_soak(flavour: str, count: int) -> list[dict[str, int]]:
    proc = run_python(FLAVOURED_SOAK, flavour, str(count), "10")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["wrong"] == []
    samples: list[dict[str, int]] = result["samples"]
    return samples


@pytest.mark.parametrize("flavour", ["threaded", "async"])
def test_flavoured_soak_slice(flavour):
    assert_flat(flavoured_soak(flavour, 800), rss_slack_kib=1024)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["threaded", "async"])
def test_flavoured_soak_10000(flavour):
    samples = flavoured_soak(flavour, 10_000)
    print(json.dumps(samples))
    assert_flat(samples, rss_slack_kib=2048)
