"""AsyncPamApplication: async conversations, phases on threads of their own, cancellation."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings

import pytest

import pamphlet
from conftest import (
    readme_example,
    run_python,
    settled_thread_count,
    thread_count,
    wait_for_thread_count,
)
from pamphlet import AsyncPamApplication


class AsyncLogin(AsyncPamApplication):
    """Answers prompts from a list; records what it was told and on which thread."""

    def __init__(self, *args, answers=(), **kwargs):
        self.answers = list(answers)
        self.seen = []
        self.threads = set()
        super().__init__(*args, **kwargs)

    async def conversation(self, messages):
        self.threads.add(threading.get_ident())
        self.seen.extend(messages)
        await asyncio.sleep(0)  # a real await: the loop runs other tasks meanwhile
        return [self.answers.pop(0) if m.is_prompt else "" for m in messages]


class WaitsForever(AsyncPamApplication):
    """A user who never answers (until given ``answer``); records how its conversation ended."""

    def __init__(self, *args, **kwargs):
        self.asked = asyncio.Event()
        self.cancelled = False
        self.answer = None
        super().__init__(*args, **kwargs)

    async def conversation(self, messages):
        self.asked.set()
        if self.answer is not None:
            return [self.answer]
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def run(coroutine):
    return asyncio.run(coroutine)


def test_full_login_with_an_async_conversation(matrix):
    async def main():
        async with matrix.app(AsyncLogin, "bob", answers=["secret"]) as app:
            assert await app.authenticate() is None
            await app.acct_mgmt()
            await app.initialize_credentials()
            await app.open_session()
            environ = dict(app.environ)
        assert app.ended
        return app, environ

    app, environ = run(main())
    assert app.seen == ["Password: "]
    assert app.threads == {threading.get_ident()}  # the conversation ran on the loop
    assert environ["HOMEDIR"] == "/home/bob"
    assert "CRED" in environ


def test_wrong_password_raises(matrix):
    async def main():
        async with matrix.app(AsyncLogin, "bob", answers=["wrong"]) as app:
            with pytest.raises(pamphlet.AuthenticationError):
                await app.authenticate()

    run(main())


def test_phases_are_coroutines_and_the_loop_keeps_running(matrix):
    ticks = []

    class SlowUser(AsyncPamApplication):
        async def conversation(self, messages):
            await asyncio.sleep(0.05)
            return ["secret"]

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    async def main():
        tick = asyncio.create_task(ticker())
        async with matrix.app(SlowUser, "bob") as app:
            await app.authenticate()
        tick.cancel()

    run(main())
    assert len(ticks) > 3  # the loop ran other tasks while the phase waited


def test_async_generator_and_plain_generator_conversations(matrix):
    class AsyncGen(AsyncPamApplication):
        async def conversation(self, messages):
            for message in messages:
                yield "secret" if message.is_prompt else ""

    async def main():
        async with matrix.app(AsyncGen, "bob") as app:
            await app.authenticate()

    run(main())


def test_a_failing_conversation_fails_closed(matrix):
    class Broken(AsyncPamApplication):
        async def conversation(self, messages):
            raise LookupError("the user store is down")

    class TooFew(AsyncPamApplication):
        async def conversation(self, messages):
            return []

    async def main():
        for cls, cause in ((Broken, LookupError), (TooFew, ValueError)):
            async with matrix.app(cls, "bob") as app:
                with pytest.raises(pamphlet.ConversationError) as info:
                    await app.authenticate()
                assert isinstance(info.value.__cause__, cause)

    run(main())


def test_cancelling_the_awaiting_task_ends_the_conversation(matrix):
    baseline = settled_thread_count()

    async def main():
        app = matrix.app(WaitsForever, "bob")
        task = asyncio.create_task(app.authenticate())
        await app.asked.wait()
        assert thread_count() == baseline + 1  # the phase's thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert app.cancelled
        assert wait_for_thread_count(baseline) == baseline
        # the handle is still usable
        app.environ["AFTER"] = "cancel"
        assert app.environ["AFTER"] == "cancel"
        await app.end()
        assert app.ended

    run(main())


def test_timeouts_cancel_too(matrix):
    baseline = settled_thread_count()

    async def main():
        app = matrix.app(WaitsForever, "bob")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(app.authenticate(), 0.1)
        assert app.cancelled
        assert wait_for_thread_count(baseline) == baseline
        # and a new attempt on the same handle works
        app.answer = "secret"
        await app.authenticate()
        await app.end()

    run(main())


def test_end_while_a_phase_waits_aborts_it(matrix):
    baseline = settled_thread_count()

    async def main():
        app = matrix.app(WaitsForever, "bob")
        task = asyncio.create_task(app.authenticate())
        await app.asked.wait()
        await app.end()
        assert app.ended
        with pytest.raises(pamphlet.ConversationError) as info:
            await task
        assert isinstance(info.value.__cause__, pamphlet.ConversationAborted)
        with pytest.raises(pamphlet.HandleEndedError):
            await app.authenticate()

    run(main())
    assert wait_for_thread_count(baseline) == baseline


def test_a_second_phase_while_one_runs_is_refused(matrix):
    async def main():
        app = matrix.app(WaitsForever, "bob")
        task = asyncio.create_task(app.authenticate())
        await app.asked.wait()
        with pytest.raises(pamphlet.HandleBusyError):
            await app.open_session()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await app.end()

    run(main())


def test_items_and_environ_from_the_loop(matrix):
    class UsesItems(AsyncPamApplication):
        async def conversation(self, messages):
            # the phase waits for us: the handle is ours to use
            self.asked_for = self.user
            self.environ["ASKED"] = "yes"
            return ["secret"]

    async def main():
        async with matrix.app(UsesItems, "bob") as app:
            app.rhost = "client.example"
            await app.authenticate()
            assert app.asked_for == "bob"
            assert app.environ["ASKED"] == "yes"
            assert app.rhost == "client.example"

    run(main())


def test_items_while_a_phase_is_inside_libpam_raise_instead_of_blocking(make_service, libpam_gate):
    service = make_service(libpam_gate.line() + "\nauth required pam_permit.so")

    async def main():
        async with service.app(AsyncLogin, "bob") as app:
            task = asyncio.create_task(app.authenticate())
            await asyncio.get_running_loop().run_in_executor(None, libpam_gate.wait_entered)
            with pytest.raises(pamphlet.HandleBusyError):
                app.user  # noqa: B018
            with pytest.raises(pamphlet.HandleBusyError):
                dict(app.environ)
            libpam_gate.open()
            await task
            assert app.user == "bob"

    run(main())


FAILDELAY_STACK = (
    "auth required pam_faildelay.so delay={delay}\nauth required {{pam_matrix}} passdb={{passdb}}"
)


def test_failure_delay_is_awaited_on_the_loop_without_a_thread(make_service):
    service = make_service(FAILDELAY_STACK.format(delay=600_000), users={"bob": "secret"})
    baseline = settled_thread_count()

    async def main():
        app = service.app(AsyncLogin, "bob", answers=["wrong"])
        started = time.monotonic()
        task = asyncio.create_task(app.authenticate())
        while len(app.seen) == 0:
            await asyncio.sleep(0.001)
        # the phase's thread is gone while the task still waits out the delay
        while thread_count() > baseline:
            await asyncio.sleep(0.001)
        assert not task.done()
        with pytest.raises(pamphlet.AuthenticationError):
            await task
        elapsed = time.monotonic() - started
        await app.end()
        return elapsed

    elapsed = run(main())
    assert elapsed >= 0.25  # libpam's delay (randomized around 0.6 s) was honoured


def test_failure_delay_libpam_policy_sleeps_on_the_thread(make_service):
    service = make_service(FAILDELAY_STACK.format(delay=400_000), users={"bob": "secret"})
    baseline = settled_thread_count()

    async def main():
        app = service.app(AsyncLogin, "bob", answers=["wrong"], fail_delay="libpam")
        task = asyncio.create_task(app.authenticate())
        while len(app.seen) == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.1)
        threads_during_delay = thread_count()
        with pytest.raises(pamphlet.AuthenticationError):
            await task
        await app.end()
        return threads_during_delay

    assert run(main()) == baseline + 1


def test_failure_delay_policy_decides(make_service):
    service = make_service(FAILDELAY_STACK.format(delay=5_000_000), users={"bob": "secret"})
    calls = []

    def no_delay(status, delay_usec):
        calls.append((status, delay_usec))
        return 0

    async def main():
        for answer in ("secret", "wrong"):
            app = service.app(AsyncLogin, "bob", answers=[answer], fail_delay=no_delay)
            try:
                await app.authenticate()
            except pamphlet.AuthenticationError:
                pass
            await app.end()

    started = time.monotonic()
    run(main())
    assert time.monotonic() - started < 2.5  # neither libpam nor the loop slept 5 s
    assert [status for status, _ in calls] == [0, pamphlet.ReturnCode.AUTH_ERR]
    assert all(2_000_000 <= usec <= 8_000_000 for _, usec in calls)


def test_fail_delay_argument_is_checked(matrix):
    with pytest.raises(ValueError, match="fail_delay"):
        matrix.app(AsyncLogin, "bob", fail_delay="sometimes")


def test_get_user_returns_the_user(make_service):
    service = make_service("auth required pam_permit.so")

    async def main():
        async with service.app(AsyncLogin, None, answers=["carol"]) as app:
            assert await app.get_user("Who? ") == "carol"
            assert app.seen == ["Who? "]

    run(main())


def test_plain_with_is_refused_and_a_forgotten_app_is_ended(matrix):
    app = matrix.app(AsyncLogin, "bob")
    with pytest.raises(TypeError, match="async with"), app:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del app
        gc.collect()
    categories = {w.category for w in caught}
    assert ResourceWarning in categories
    assert RuntimeWarning not in categories  # no coroutine left un-awaited


def test_a_thousand_logins_waiting_at_once_all_finish(make_service):
    """More logins wait on their users at once than any executor has workers."""
    count = 1000
    service = make_service(users={f"user{i}": f"pw{i}" for i in range(count)})
    baseline = settled_thread_count()
    waiting = []
    everyone_waits = asyncio.Event()
    threads_while_all_wait = []

    class GatedLogin(AsyncPamApplication):
        async def conversation(self, messages):
            waiting.append(self)
            if len(waiting) == count:
                threads_while_all_wait.append(thread_count())
                everyone_waits.set()
            await everyone_waits.wait()
            index = int(self.user[4:])
            return [f"pw{index}" if index % 4 else "wrong" for _ in messages]

    async def login(index):
        async with service.app(GatedLogin, f"user{index}") as app:
            try:
                await app.authenticate()
                await app.account_management()
            except pamphlet.AuthenticationError:
                return False
            return True

    async def main():
        logins = asyncio.gather(*(login(i) for i in range(count)))
        return await asyncio.wait_for(logins, timeout=300)

    results = run(main())
    assert results == [bool(i % 4) for i in range(count)]
    # every login waited in its conversation with a thread of its own in libpam
    assert threads_while_all_wait[0] >= baseline + count
    assert wait_for_thread_count(baseline) == baseline


def test_readme_async_example():
    proc = run_python(readme_example("class QueueLogin("))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello alice")
    assert "'HOMEDIR': '/home/alice'" in proc.stdout


def test_a_refused_phase_leaves_end_able_to_wait_for_the_running_one(matrix):
    async def main():
        app = matrix.app(WaitsForever, "bob")
        task = asyncio.create_task(app.authenticate())
        await app.asked.wait()
        with pytest.raises(pamphlet.HandleBusyError):
            await app.account_management()
        await asyncio.wait_for(app.end(), timeout=30)
        with pytest.raises(pamphlet.ConversationError):
            await task

    run(main())
