"""end() is a state every entry point respects: nothing slips past it.

The race of issue 17, against a real pam_matrix stack, 200 times per flavour:
a phase waits in authenticate's prompt, one thread (or task) ends the handle
while another calls account_management() in a loop. Before end() began,
account_management() is refused because authenticate holds the handle; from
the moment end() begins it is refused with ConversationStateError, then
HandleEndedError. So it never succeeds: a success is a phase that ran on a
handle being ended.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pamphlet
from pamphlet import (
    ConversationError,
    ConversationStateError,
    HandleBusyError,
    HandleEndedError,
)

RUNS = 200


def outcome_of(call) -> str:
    try:
        call()
    except HandleBusyError:
        return "busy"
    except ConversationStateError:
        return "being ended"
    except HandleEndedError:
        return "ended"
    return "success"


def loop_until_ended(call, outcomes: list[str], looping: threading.Event) -> None:
    while True:
        outcome = outcome_of(call)
        outcomes.append(outcome)
        looping.set()
        if outcome in ("ended", "success"):
            return
        time.sleep(0)  # let the others run


def test_threaded_end_while_another_thread_loops_account_management(matrix):
    seen: Counter[str] = Counter()
    for run in range(RUNS):
        app = pamphlet.ThreadedPamApplication(matrix.name, "bob", confdir=matrix.confdir)
        phase = app.authenticate()
        assert app.get_data(timeout=30) == ["Password: "]  # waiting in the prompt
        outcomes: list[str] = []
        looping = threading.Event()
        looper = threading.Thread(
            target=loop_until_ended, args=(app.account_management, outcomes, looping)
        )
        looper.start()
        assert looping.wait(30)
        ender = threading.Thread(target=app.end)
        ender.start()
        ender.join(30)
        looper.join(30)
        phase.join(30)
        assert not (ender.is_alive() or looper.is_alive() or phase.is_alive())
        assert app.ended
        assert "success" not in outcomes, f"run {run}: {outcomes}"
        assert isinstance(app.get_data(timeout=30), ConversationError)  # the prompt was aborted
        seen.update(outcomes)
    # The loop ran on both sides of end(): refused while authenticate held the
    # handle, and refused while the handle was being ended.
    assert seen["busy"] and seen["ended"] == RUNS
    assert seen["being ended"], seen


class WaitsInThePrompt(pamphlet.PamApplication):
    """Answers the prompt only once end() has begun (an item call is then refused)."""

    asked: threading.Event

    def conversation(self, messages):
        self.asked.set()
        while True:
            try:
                _ = self.rhost
            except ConversationStateError:
                return ["secret" if message.is_prompt else "" for message in messages]
            time.sleep(0.0002)


def test_plain_end_while_another_thread_loops_account_management(matrix):
    seen: Counter[str] = Counter()
    for run in range(RUNS):
        app = WaitsInThePrompt(matrix.name, "bob", confdir=matrix.confdir)
        app.asked = threading.Event()
        authenticated: list[str] = []
        phase = threading.Thread(
            target=lambda app=app, authenticated=authenticated: authenticated.append(
                outcome_of(app.authenticate)
            )
        )
        phase.start()
        assert app.asked.wait(30)
        outcomes: list[str] = []
        looping = threading.Event()
        looper = threading.Thread(
            target=loop_until_ended, args=(app.account_management, outcomes, looping)
        )
        looper.start()
        ender = threading.Thread(target=app.end)
        ender.start()
        for thread in (phase, looper, ender):
            thread.join(30)
            assert not thread.is_alive()
        assert app.ended
        # authenticate began before end(): it finishes; nothing that began after does
        assert authenticated == ["success"]
        assert "success" not in outcomes, f"run {run}: {outcomes}"
        seen.update(outcomes)
    assert seen["ended"] == RUNS


class AsyncWaitsInThePrompt(pamphlet.AsyncPamApplication):
    async def conversation(self, messages):
        self.asked.set()
        await asyncio.Event().wait()  # a client that never answers
        return []


def test_async_end_while_another_task_and_thread_loop_account_management(matrix):
    seen: Counter[str] = Counter()

    def from_another_thread(app, outcomes, looping):
        # its own event loop: an async phase may be awaited on any loop
        def call():
            asyncio.run(app.account_management())

        loop_until_ended(call, outcomes, looping)

    async def on_the_loop(app, outcomes):
        while True:
            try:
                await app.account_management()
                outcomes.append("success")
                return
            except HandleBusyError:
                outcomes.append("busy")
            except ConversationStateError:
                outcomes.append("being ended")
            except HandleEndedError:
                outcomes.append("ended")
                return
            await asyncio.sleep(0)

    async def one(run):
        app = AsyncWaitsInThePrompt(matrix.name, "bob", confdir=matrix.confdir)
        app.asked = asyncio.Event()
        authenticate = asyncio.ensure_future(app.authenticate())
        await app.asked.wait()
        outcomes: list[str] = []
        looping = threading.Event()
        looper = threading.Thread(target=from_another_thread, args=(app, outcomes, looping))
        looper.start()
        task = asyncio.ensure_future(on_the_loop(app, outcomes))
        await asyncio.sleep(0)
        await app.end()
        await task
        await asyncio.get_running_loop().run_in_executor(None, looper.join, 30)
        assert not looper.is_alive()
        try:
            await authenticate
            raise AssertionError("an aborted prompt logged in")
        except ConversationError:
            pass
        assert app.ended
        assert "success" not in outcomes, f"run {run}: {outcomes}"
        seen.update(outcomes)

    async def main():
        for run in range(RUNS):
            await one(run)

    asyncio.run(main())
    assert seen["busy"] and seen["ended"] >= RUNS
