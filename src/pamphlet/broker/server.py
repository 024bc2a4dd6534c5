"""The root side of the broker: the listener, the policy gate, the workers.

One single-threaded process listens on a Unix socket. For each connection it
asks the kernel who the peer is (SO_PEERCRED), reads the start frame without
blocking, checks the policy, the rule's ``max_in_flight`` and the throttle,
and forks a worker (:mod:`pamphlet.broker.worker`) that runs this one PAM
transaction in a process of its own. The broker writes one audit line per
connection, counts failed authentications (:mod:`pamphlet.broker.throttle`),
kills workers past their deadline (:mod:`pamphlet.broker.watchdog`), reloads
its policy on SIGHUP, and on SIGTERM (or SIGINT) stops accepting, ends every
transaction cleanly and reaps every worker. A failure in handling one
connection or worker is audited and costs only that one: the loop goes on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import gc
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ..constants import ReturnCode
from . import protocol, worker
from .audit import Audit, RefusalSummary
from .credentials import become_setuid_program, make_undumpable
from .listener import bind, systemd_listener
from .policy import Peer, Policy, PolicyError, Rule, load
from .protocol import MAX_REPLY_FRAME, MAX_REQUEST_FRAME, FrameBuffer, ProtocolViolation
from .throttle import FailureCounter, Reservation
from .tokens import Tokens
from .watchdog import Deadline, Deadlines

__all__ = ["Broker", "Audit", "FailureCounter", "main"]

#: How long a stopping broker waits for its workers before SIGKILL.
STOP_GRACE = 10.0
#: Workers forked ahead, waiting for a connection: the fork is then paid
#: between logins, not during one.
SPARES = 2


@dataclasses.dataclass(eq=False)
class _Pending:
    conn: socket.socket
    peer: Peer
    deadline: float
    buffer: FrameBuffer


@dataclasses.dataclass(eq=False)
class _Spare:
    """A worker forked ahead, waiting for its connection."""

    pid: int
    control: socket.socket
    deadline: Deadline


@dataclasses.dataclass(eq=False)
class _Worker:
    pid: int
    control: socket.socket
    peer: Peer
    rule: Rule  # the rule that admitted it, kept across a policy reload
    service: str
    user: str | None
    buffer: FrameBuffer
    deadline: Deadline
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    eof: bool = False
    detached: str | None = None  # the id of its live resume token, while detached
    reservation: Reservation | None = None  # its authenticate's places in the throttle
    overdue: bool = False  # killed by the broker for missing its deadline
    stopped: bool = False  # killed by the broker because something stopped it


#: Seconds between two looks at the workers' deadlines.
SWEEP_INTERVAL = 1.0


class Broker:
    """The broker process. ``serve()`` runs until SIGTERM or SIGINT; SIGHUP reloads."""

    def __init__(
        self,
        policy: Policy,
        listener: socket.socket,
        *,
        confdir: str | None = None,
        audit: Audit | None = None,
        socket_path: str | None = None,
        spares: int = SPARES,
        policy_path: str | None = None,
    ) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.listener = listener
        self.confdir = None if confdir is None else os.fsencode(confdir)
        self.audit = audit or Audit()
        self.unknown_peers = RefusalSummary(self.audit)
        self.socket_path = socket_path
        self.failures = FailureCounter(policy.throttle)
        self.pending: dict[socket.socket, _Pending] = {}
        self.workers: dict[int, _Worker] = {}
        # Running transactions per rule, and per (rule, peer uid): the fair shares.
        self.in_flight: collections.Counter[Rule] = collections.Counter()
        self.in_flight_by_uid: collections.Counter[tuple[Rule, int]] = collections.Counter()
        self.pending_by_uid: collections.Counter[int] = collections.Counter()
        self.stopping = False
        self.reload_requested = False
        self.served = 0
        self.spares: list[_Spare] = []
        self.spare_count = spares
        self.retiring: set[int] = set()  # spares of a policy that was replaced
        self._peer_cache: dict[tuple[int, int], tuple[float, Peer]] = {}
        self.tokens: Tokens[_Worker] = Tokens()  # of detached transactions
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_sweep = 0.0
        self.deadlines = Deadlines()

    # -- the loop -------------------------------------------------------------------

    def serve(self, signals_before: Sequence[int] = ()) -> None:
        """Run until SIGTERM or SIGINT. ``signals_before``: those that came
        after the socket was bound and before this (main() notes them)."""
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        previous = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        handlers = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)
        }
        for signum in signals_before:
            self._on_signal(signum, None)
        make_undumpable()  # the broker and, inherited, every worker
        gc.collect()
        gc.freeze()  # what the broker holds now is never scanned again in a worker
        try:
            self._replenish()
            while not self.stopping:
                self._turn()
            self._stop()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous)
            self.selector.close()
            for fd in (self._wake_r, self._wake_w):
                protocol.close_quietly(fd)
            if self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_requested = True

    def _turn(self) -> None:
        """One pass of the loop. Whatever fails in handling one connection or
        worker is contained: audited, that one is dropped, the loop goes on."""
        now = time.monotonic()
        deadlines = [p.deadline for p in self.pending.values()]
        if self.tokens.live:
            deadlines += self.tokens.deadlines()
        if self.workers:
            deadlines.append(self._next_sweep)
        next_flush = self.unknown_peers.next_flush
        if next_flush is not None:
            deadlines.append(next_flush)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in self.selector.select(timeout):
            self._contained(self._dispatch, key.data)
        self._contained(self._reap, None)
        if self.reload_requested:
            self.reload_requested = False
            self._contained(self._reload, None)
        now = time.monotonic()
        if self.pending:
            for pending in [p for p in self.pending.values() if p.deadline <= now]:
                self._contained(self._time_out_pending, pending)
        if self.tokens.live:
            for token_id in self.tokens.past(now):
                self._contained(self._expire, token_id)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._contained(self._sweep, now)
        if next_flush is not None and now >= next_flush:
            self._contained(self.unknown_peers.flush, now)

    def _dispatch(self, what: Any) -> None:
        if what == "listener":
            self._accept()
        elif what == "wake":
            _drain(self._wake_r)
        elif isinstance(what, _Pending):
            self._read_pending(what)
        elif isinstance(what, _Worker):
            self._read_control(what)

    def _contained(self, action: Callable[[Any], Any], subject: Any) -> None:
        """Run ``action(subject)``; a failure is audited and costs only its subject."""
        try:
            action(subject)
        except Exception as exc:  # the loop must outlive any one failure
            where = getattr(action, "__name__", "loop")
            self.audit.log(
                event="internal-error",
                where=where,
                error=f"{type(exc).__name__}: {exc}",
                at=_innermost(exc),
            )
            try:
                self._abandon(subject)
            except Exception as again:
                self.audit.log(event="internal-error", where="abandon", error=repr(again))

    def _abandon(self, subject: Any) -> None:
        """After a failure in handling ``subject``: let go of it, fail closed."""
        if isinstance(subject, _Pending):
            if subject.conn in self.pending:
                self._forget_pending(subject)
            _send_quietly(subject.conn, {"op": "error", "message": "the broker failed"})
            subject.conn.close()
        elif isinstance(subject, _Worker):
            _kill(subject.pid, signal.SIGKILL)  # reaped and accounted by _reap
        elif isinstance(subject, str) and subject in self.tokens.live:
            self._expire(subject)

    def _sweep(self, now: float) -> None:
        """Kill the workers past their deadline (stopped by their peer, or hung)."""
        for record in self.workers.values():
            if not record.overdue and record.deadline.overdue(now):
                record.overdue = True
                _kill(record.pid, signal.SIGKILL)

    def _reload(self, _: Any = None) -> None:
        """SIGHUP: read the policy again. A bad one keeps the old, with an audit line.

        Running transactions keep the rule that admitted them; the spares,
        forked with the old policy, are replaced.
        """
        if self.policy_path is None:
            self.audit.log(event="reload-failed", reason="the policy was not read from a file")
            return
        try:
            policy = load(self.policy_path)
        except PolicyError as exc:
            self.audit.log(event="reload-failed", policy=self.policy_path, reason=str(exc))
            return
        self.policy = policy
        self.failures.settings = policy.throttle
        for spare in self.spares:
            self.retiring.add(spare.pid)
            _kill(spare.pid, signal.SIGTERM)
            spare.control.close()
            self.deadlines.give_back(spare.deadline)  # a spare never writes its slot
        self.spares = []
        self._replenish()
        self.audit.log(event="reloaded", policy=self.policy_path, rules=len(policy.rules))

    # -- connections before their start frame --------------------------------------

    def _peer(self, conn: socket.socket) -> Peer:
        pid, uid, gid = protocol.peer_credentials(conn)
        now = time.monotonic()
        cached = self._peer_cache.get((uid, gid))
        if cached is None or now - cached[0] > 5:
            peer = Peer.from_credentials(pid, uid, gid)
            if len(self._peer_cache) > 1024:
                self._peer_cache.clear()
            self._peer_cache[(uid, gid)] = (now, peer)
        else:
            peer = cached[1]
        return dataclasses.replace(peer, pid=pid)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.audit.log(event="accept-failed", error=exc.strerror)
                    return
                raise
            conn.setblocking(False)
            try:
                peer = self._peer(conn)
            except OSError:
                conn.close()
                continue
            if not self.policy.rules_for(peer):
                text = f"no rule of the broker's policy allows user {peer.user!r} or its groups"
                _send_quietly(conn, {"op": "refused", "kind": "peer", "message": text})
                conn.close()
                # Anybody can connect: their refusals are summarized, not a line each.
                self.unknown_peers.refused(
                    time.monotonic(),
                    peer.uid,
                    peer_pid=peer.pid,
                    outcome="refused:peer",
                    reason=text,
                )
                continue
            if self.pending_by_uid[peer.uid] >= self.policy.limits.max_pending_per_peer:
                self._refuse(
                    conn,
                    peer,
                    None,
                    None,
                    "busy",
                    "too many connections from this peer waiting to start",
                )
                continue
            pending = _Pending(
                conn,
                peer,
                time.monotonic() + self.policy.limits.start_timeout,
                FrameBuffer(MAX_REQUEST_FRAME),
            )
            self.pending[conn] = pending
            self.pending_by_uid[peer.uid] += 1
            self.selector.register(conn, selectors.EVENT_READ, pending)

    def _forget_pending(self, pending: _Pending) -> None:
        del self.pending[pending.conn]
        self.pending_by_uid[pending.peer.uid] -= 1
        if not self.pending_by_uid[pending.peer.uid]:
            del self.pending_by_uid[pending.peer.uid]
        self.selector.unregister(pending.conn)

    def _time_out_pending(self, pending: _Pending) -> None:
        self._drop_pending(pending, "timeout", "no start frame within the start timeout")

    def _drop_pending(self, pending: _Pending, outcome: str, text: str) -> None:
        self._forget_pending(pending)
        _send_quietly(pending.conn, {"op": "error", "message": text})
        pending.conn.close()
        peer = pending.peer
        self.audit.log(peer_uid=peer.uid, peer_pid=peer.pid, outcome=outcome, reason=text)

    def _read_pending(self, pending: _Pending) -> None:
        try:
            data = pending.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_pending(pending, "disconnect", "closed before its start frame")
            return
        try:
            frames = pending.buffer.feed(data)
        except ProtocolViolation as exc:
            self._drop_pending(pending, "protocol-error", str(exc))
            return
        if not frames:
            return
        if len(frames) > 1 or pending.buffer.pending:
            self._drop_pending(pending, "protocol-error", "data after the start frame")
            return
        try:
            self._start(pending, frames[0])
        except ProtocolViolation as exc:
            if pending.conn in self.pending:
                self._drop_pending(pending, "protocol-error", str(exc))

    def _refuse(
        self,
        conn: socket.socket,
        peer: Peer,
        service: str | None,
        user: str | None,
        kind: str,
        text: str,
    ) -> None:
        _send_quietly(conn, {"op": "refused", "kind": kind, "message": text})
        conn.close()
        self.audit.log(
            peer_uid=peer.uid,
            peer_pid=peer.pid,
            service=service,
            user=user,
            outcome=f"refused:{kind}",
            reason=text,
        )

    def _start(self, pending: _Pending, frame: dict[str, Any]) -> None:
        peer = pending.peer
        if frame.get("op") == "resume":
            self._resume(pending, frame)
            return
        if frame.get("op") != "start":
            raise ProtocolViolation("the first frame must be a start frame")
        if frame.get("v") != protocol.VERSION:
            raise ProtocolViolation(
                f"protocol version {frame.get('v')!r} is not supported "
                f"(this broker speaks {protocol.VERSION})"
            )
        if "confdir" in frame:
            self._forget_pending(pending)
            self._refuse(
                pending.conn,
                peer,
                None,
                None,
                "confdir",
                "a client cannot choose the confdir; the broker's own is used",
            )
            return
        if set(frame) != {"op", "v", "service", "user"}:
            raise ProtocolViolation("the start frame has fields other than service and user")
        raw_service = protocol.unb64(frame["service"], "the service", 256)
        raw_user = protocol.unb64(frame["user"], "the user")
        if raw_service is None:
            raise ProtocolViolation("the service is null")
        service = raw_service.decode("utf-8", "surrogateescape")
        user = None if raw_user is None else raw_user.decode("utf-8", "surrogateescape")
        self._forget_pending(pending)
        conn = pending.conn
        rule = None if "/" in service else self.policy.rule_for(peer, service)
        if rule is None:
            self._refuse(
                conn,
                peer,
                service,
                user,
                "service",
                f"the broker's policy does not let this peer use service {service!r}",
            )
            return
        busy = self._share_refusal(rule, peer.uid)
        if busy is not None:
            self._refuse(conn, peer, service, user, "busy", busy)
            return
        refusal, _ = self.failures.check(peer.uid, user, time.monotonic())
        if refusal is not None:
            self._refuse(conn, peer, service, user, "throttled", refusal)
            return
        self._fork(conn, peer, rule, service, user, raw_service, raw_user)

    def _share_refusal(self, rule: Rule, uid: int) -> str | None:
        """Why a new transaction of ``uid`` under ``rule`` must wait, if it must."""
        mine = self.in_flight_by_uid[(rule, uid)]
        if mine >= rule.max_in_flight:
            return (
                f"this peer has {mine} transactions of {rule.describe()} running "
                "(its max_in_flight per peer uid)"
            )
        everyone = self.in_flight[rule]
        if everyone >= rule.max_in_flight_total:
            return (
                f"{everyone} transactions of {rule.describe()} are running "
                "(its max_in_flight_total)"
            )
        return None

    # -- workers ---------------------------------------------------------------------

    def _fork(
        self,
        conn: socket.socket,
        peer: Peer,
        rule: Rule,
        service: str,
        user: str | None,
        raw_service: bytes,
        raw_user: bytes | None,
    ) -> None:
        """Hand ``conn`` to a spare worker (forked now if none is waiting)."""
        if not self.spares:
            self._spawn_spare()
        if not self.spares:
            self._refuse(conn, peer, service, user, "busy", "cannot start a worker")
            return
        spare = self.spares.pop(0)
        pid, control = spare.pid, spare.control
        assignment = protocol.encode_frame(
            {
                "op": "assign",
                "rule": rule.index,
                "service": protocol.b64(raw_service),
                "user": protocol.b64(raw_user),
                "uid": peer.uid,
                "gid": peer.gid,
            }
        )
        try:
            socket.send_fds(control, [assignment], [conn.fileno()])
        except OSError as exc:
            _kill(pid, signal.SIGKILL)
            control.close()
            self.deadlines.give_back(spare.deadline)
            self.retiring.add(pid)
            self._refuse(conn, peer, service, user, "busy", f"cannot start a worker: {exc}")
            return
        conn.close()
        control.setblocking(False)
        record = _Worker(
            pid, control, peer, rule, service, user, FrameBuffer(MAX_REPLY_FRAME), spare.deadline
        )
        self.workers[pid] = record
        self.in_flight[rule] += 1
        self.in_flight_by_uid[(rule, peer.uid)] += 1
        self.served += 1
        self.selector.register(control, selectors.EVENT_READ, record)
        self._replenish()

    def _replenish(self) -> None:
        while len(self.spares) < self.spare_count and not self.stopping:
            if not self._spawn_spare():
                return

    def _spawn_spare(self) -> bool:
        deadline = self.deadlines.take()
        if deadline is None:
            self.audit.log(event="fork-failed", error=f"{len(self.workers)} workers exist already")
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # SIGTERM stays blocked across the fork until the new worker has its
        # own handler: a stop that comes in between is delivered, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            ours.close()
            theirs.close()
            self.deadlines.give_back(deadline)
            self.audit.log(event="fork-failed", error=exc.strerror)
            return False
        if pid == 0:  # a spare worker
            status = 0
            try:
                ours.close()
                wake = self._become_worker()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                self._serve_as_spare(theirs, wake, deadline)
            except BaseException:
                status = 70
                try:
                    traceback.print_exc()
                    sys.stderr.flush()
                except BaseException:
                    pass
            finally:
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        theirs.close()
        self.spares.append(_Spare(pid, ours, deadline))
        return True

    def _serve_as_spare(self, control: socket.socket, wake: int, deadline: Deadline) -> None:
        """Wait for a connection from the broker, then serve its transaction."""
        ready, _, _ = select.select([control.fileno(), wake], [], [])
        if wake in ready:
            return
        data, fds, _, _ = socket.recv_fds(control, 65536, 1)
        if len(fds) != 1:
            return  # the broker is gone
        conn = socket.socket(fileno=fds[0])
        frames = FrameBuffer(MAX_REPLY_FRAME).feed(data)
        (assignment,) = frames
        raw_service = protocol.unb64(assignment["service"], "service", 256)
        raw_user = protocol.unb64(assignment["user"], "user")
        assert raw_service is not None
        rule = self.policy.rules[assignment["rule"]]
        become_setuid_program(assignment["uid"], assignment["gid"])
        worker.run(
            conn,
            control,
            rule,
            self.policy.limits,
            raw_service,
            raw_user,
            self.confdir,
            wake,
            deadline,
        )

    def _become_worker(self) -> int:
        """In a fresh fork: drop what belongs to the broker, take SIGTERM as 'end'."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self.listener.close()
        for other in self.pending:
            other.close()
        for record in self.workers.values():
            record.control.close()
        for spare in self.spares:
            spare.control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the broker's business
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _ignore_signal)
        return wake_r

    def _read_control(self, record: _Worker) -> None:
        while True:
            try:
                data = record.control.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                record.eof = True
                self.selector.unregister(record.control)
                return
            try:
                frames = record.buffer.feed(data)
            except ProtocolViolation:
                os.kill(record.pid, signal.SIGKILL)
                record.eof = True
                self.selector.unregister(record.control)
                return
            for frame in frames:
                self._from_worker(record, frame)

    def _from_worker(self, record: _Worker, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        now = time.monotonic()
        user = frame.get("user")
        user = user if isinstance(user, str) else None
        if op == "may_authenticate":
            rhost = frame.get("rhost")
            refusal, delay, record.reservation = self.failures.reserve(
                record.reservation,
                record.peer.uid,
                user,
                rhost if isinstance(rhost, str) else None,
                now,
            )
            reply = {"refuse": refusal} if refusal else {"delay": delay}
            _send_quietly(record.control, reply)
        elif op == "result":
            code = frame.get("code")
            reservation, record.reservation = record.reservation, None
            if reservation is None:  # fail closed: a result never asked for still counts
                reservation = Reservation(record.peer.uid)
            if code is None:  # refused before any guess: the places go back uncounted
                self.failures.release(reservation)
            else:
                self.failures.settle(reservation, code if isinstance(code, int) else -1, now, user)
        elif op == "summary":
            record.summary = frame
        elif op == "detach":
            _send_quietly(record.control, self._detach(record))

    def _reap(self, _: Any = None) -> None:
        while self.workers or self.spares or self.retiring:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status):
                # Its peer may signal it (real uid = the peer's), and a stopped
                # worker holds what it holds (a slot, /etc/.pwd.lock in
                # chauthtok, a module's lock) until killed: kill it now, not
                # at a deadline it may not have set yet.
                stopped = self.workers.get(pid)
                if stopped is not None:
                    stopped.stopped = True
                _kill(pid, signal.SIGKILL)
                continue
            record = self.workers.pop(pid, None)
            if record is not None:
                self._finish(record, status)
            else:
                self._forget_spare(pid)

    def _forget_spare(self, pid: int) -> None:
        self.retiring.discard(pid)
        for spare in self.spares:
            if spare.pid == pid:
                self.spares.remove(spare)
                spare.control.close()
                self.deadlines.give_back(spare.deadline)
                return

    def _finish(self, record: _Worker, status: int) -> None:
        # The accounting first: whatever fails after it, the slot is free.
        self.in_flight[record.rule] -= 1
        if self.in_flight[record.rule] <= 0:
            del self.in_flight[record.rule]
        share = (record.rule, record.peer.uid)
        self.in_flight_by_uid[share] -= 1
        if self.in_flight_by_uid[share] <= 0:
            del self.in_flight_by_uid[share]
        try:
            if not record.eof:
                self._read_control(record)
                if not record.eof:
                    self.selector.unregister(record.control)
        finally:
            record.control.close()
            self.deadlines.give_back(record.deadline)
            if record.reservation is not None:
                # Died before it reported the outcome: a failure (the peer can
                # kill its own worker, and must not take back a guess that way).
                reservation, record.reservation = record.reservation, None
                self.failures.settle(reservation, -1, time.monotonic(), None)
            if record.detached is not None:  # died while detached: its token dies with it
                self._retire(record.detached, "expired")
        if os.WIFSIGNALED(status):
            ended = f"signal {_signal_name(os.WTERMSIG(status))}"
        else:
            ended = f"exit {os.WEXITSTATUS(status)}"
        summary = record.summary
        phases = summary.get("phases") or []
        refusals = summary.get("refusals") or []
        if not summary:
            outcome = "worker-died"
        elif summary.get("outcome"):
            outcome = str(summary["outcome"])
        elif refusals:
            outcome = "refused:" + ",".join(str(r) for r in refusals)
        elif phases and _succeeded([str(p) for p in phases]):
            outcome = "success"
        elif phases:
            outcome = "failure"
        else:
            outcome = "nothing-run"
        peer = record.peer
        self.audit.log(
            peer_uid=peer.uid,
            peer_pid=peer.pid,
            service=record.service,
            user=summary.get("user", record.user),
            rhost=summary.get("rhost"),
            phases=[str(p) for p in phases],
            outcome=outcome,
            end="stopped: killed by the broker"
            if record.stopped
            else "overdue: killed at its deadline"
            if record.overdue
            else summary.get("end", "worker died"),
            worker=f"{record.pid}:{ended}",
            **({"reason": summary["reason"]} if summary.get("reason") else {}),
        )

    # -- detach and resume (docs/guide/protocol.md, "Detach and resume") -------------

    def _detach(self, record: _Worker) -> dict[str, Any]:
        """A worker's client detaches: issue the token its resume must present
        (:mod:`pamphlet.broker.tokens`): good once, for a process of the same
        uid, before the detach timeout."""
        timeout = self.policy.limits.detach_timeout
        if timeout <= 0 or record.detached is not None or self.stopping:
            return {"refuse": "detaching is not allowed now"}
        token_id, token = self.tokens.issue(record, time.monotonic() + timeout)
        record.detached = token_id
        self._audit_resume(record, record.peer, "detached", token_id)
        return {"token": token}

    def _retire(self, token_id: str, reason: str) -> None:
        record = self.tokens.retire(token_id, reason)
        if record is not None:
            record.detached = None

    def _expire(self, token_id: str) -> None:
        """No resume in time: the worker ends the transaction."""
        record = self.tokens.retire(token_id, "expired")
        if record is None:
            return
        record.detached = None
        _send_quietly(record.control, {"op": "expire"})
        self._audit_resume(record, record.peer, "detach-expired", token_id)

    def _audit_resume(
        self, record: _Worker, peer: Peer, outcome: str, token_id: str | None, reason: str = ""
    ) -> None:
        fields: dict[str, Any] = {
            "peer_uid": peer.uid,
            "peer_pid": peer.pid,
            "service": record.service if record is not None else None,
            "user": record.user if record is not None else None,
            "outcome": outcome,
            "token": token_id,
        }
        if record is not None:
            fields["worker"] = record.pid
        if reason:
            fields["reason"] = reason
        self.audit.log(**fields)

    def _refuse_resume(
        self,
        conn: socket.socket,
        peer: Peer,
        record: _Worker | None,
        kind: str,
        token_id: str | None,
        text: str,
    ) -> None:
        _send_quietly(conn, {"op": "refused", "kind": kind, "message": text})
        conn.close()
        fields: dict[str, Any] = {
            "peer_uid": peer.uid,
            "peer_pid": peer.pid,
            "service": None if record is None else record.service,
            "user": None if record is None else record.user,
            "outcome": f"refused:{kind}",
            "token": token_id,
            "reason": text,
        }
        if record is not None:
            fields["worker"] = record.pid
        self.audit.log(**fields)

    def _resume(self, pending: _Pending, frame: dict[str, Any]) -> None:
        """A new connection presents a token: hand it to the detached worker."""
        if frame.get("v") != protocol.VERSION:
            raise ProtocolViolation(
                f"protocol version {frame.get('v')!r} is not supported "
                f"(this broker speaks {protocol.VERSION})"
            )
        if set(frame) != {"op", "v", "token"}:
            raise ProtocolViolation("the resume frame has fields other than the token")
        token = frame["token"]
        if not isinstance(token, str) or len(token) > 128 or not token.isascii():
            raise ProtocolViolation("the token is not a string of at most 128 ASCII characters")
        self._forget_pending(pending)
        conn, peer = pending.conn, pending.peer
        found = self.tokens.look_up(token, time.monotonic())
        token_id, record = found.token_id, found.holder
        if record is None:
            kind = found.refusal or "token-invalid"
            self._refuse_resume(conn, peer, None, kind, token_id, _TOKEN_REFUSALS[kind])
            return
        assert token_id is not None
        if found.refusal is not None:  # live, but past its deadline
            self._expire(token_id)
            self._refuse_resume(
                conn,
                peer,
                record,
                "token-expired",
                token_id,
                "this token expired: its transaction has ended",
            )
            return
        if peer.uid != record.peer.uid:
            # The secret reached another user: it is burnt, and the transaction
            # it would have resumed ends (fail closed).
            self._expire(token_id)
            self._refuse_resume(
                conn,
                peer,
                record,
                "token-peer",
                token_id,
                "this token belongs to another user's transaction; that transaction has ended",
            )
            return
        self._retire(token_id, "used")
        try:
            socket.send_fds(
                record.control, [protocol.encode_frame({"op": "resume"})], [conn.fileno()]
            )
        except OSError as exc:
            _kill(record.pid, signal.SIGKILL)
            self._refuse_resume(
                conn, peer, record, "busy", token_id, f"cannot reach the transaction: {exc}"
            )
            return
        conn.close()
        record.peer = peer  # the same uid; the audit names the process that resumed
        self._audit_resume(record, peer, "resumed", token_id)

    def _stop(self) -> None:
        """End every transaction: refuse the waiting, SIGTERM the workers, reap."""
        self.selector.unregister(self.listener)
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            self.socket_path = None
            # No new connection can reach the listener now; the ones already in
            # its backlog get the same answer as those waiting to start. (Under
            # socket activation the backlog is systemd's, kept for the next start.)
            self._answer_backlog()
        self.listener.close()
        for pending in list(self.pending.values()):
            self._drop_pending(pending, "shutdown", "the broker is shutting down")
        for spare in self.spares:
            _kill(spare.pid, signal.SIGTERM)
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
            _kill(pid, signal.SIGCONT)  # one its peer stopped gets to end cleanly too
        deadline = time.monotonic() + STOP_GRACE
        while (self.workers or self.spares or self.retiring) and time.monotonic() < deadline:
            for key, _ in self.selector.select(0.05):
                if isinstance(key.data, _Worker):
                    self._contained(self._read_control, key.data)
                elif key.data == "wake":
                    _drain(self._wake_r)
            self._contained(self._reap, None)
        for pid in [*self.workers, *(spare.pid for spare in self.spares), *self.retiring]:
            _kill(pid, signal.SIGKILL)
        while self.workers or self.spares or self.retiring:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            record = self.workers.pop(pid, None)
            if record is not None:
                self._finish(record, status)
            else:
                self._forget_spare(pid)
        self.unknown_peers.flush(time.monotonic())
        self.audit.log(event="stopped", served=self.served)

    def _answer_backlog(self) -> None:
        answered = 0
        while answered < 65536:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                break
            _send_quietly(conn, {"op": "error", "message": "the broker is shutting down"})
            conn.close()
            answered += 1
        if answered:
            self.audit.log(event="backlog-answered", outcome="shutdown", connections=answered)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_TOKEN_REFUSALS = {
    "token-used": "this token was used already: a token is good once",
    "token-expired": "this token expired: its transaction has ended",
    "token-invalid": "no detached transaction has this token",
}


def _succeeded(phases: list[str]) -> bool:
    """Whether a transaction's phases ("name:code") add up to a success.

    An expired password (acct_mgmt's PAM_NEW_AUTHTOK_REQD) counts as passed
    once a later chauthtok changed it, as login and sshd let the user in then.
    """
    for index, entry in enumerate(phases):
        name, _, code = entry.rpartition(":")
        if code == "0":
            continue
        if (
            name == "acct_mgmt"
            and code == str(int(ReturnCode.NEW_AUTHTOK_REQD))
            and "chauthtok:0" in phases[index + 1 :]
        ):
            continue
        return False
    return True


def _ignore_signal(signum: int, frame: Any) -> None:
    """A worker's SIGTERM: the wake-up descriptor carries it to the worker's waits."""


def _signal_name(signum: int) -> str:
    """SIGSEGV, SIGRTMIN+6, or the number: any signal can end a worker."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        pass
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return str(signum)


def _innermost(exc: BaseException) -> str:
    """file:line where ``exc`` was raised, for the audit line."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "-"
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _send_quietly(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.send(protocol.encode_frame(message))
    except OSError:
        pass


# -- the command ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pamphlet broker",
        description=(
            "Run PAM transactions for unprivileged clients, one worker process per "
            "login, as the policy allows. Runs in the foreground, as root."
        ),
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the Unix socket to listen on (not needed under systemd socket activation)",
    )
    parser.add_argument("--policy", metavar="FILE", required=True, help="the TOML policy file")
    parser.add_argument(
        "--socket-mode",
        metavar="MODE",
        default="0666",
        help="the socket's permissions, octal (default 0666: the policy is the gate)",
    )
    parser.add_argument("--socket-group", metavar="GROUP", help="the socket's group")
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        help="read service files from DIR instead of /etc/pam.d (for every client)",
    )
    parser.add_argument(
        "--audit",
        choices=("auto", "syslog", "stderr"),
        default="auto",
        help="where the audit lines go (default: syslog when /dev/log exists, else stderr)",
    )
    parser.add_argument(
        "--spares",
        metavar="N",
        type=int,
        default=SPARES,
        help=f"workers forked ahead of logins (default {SPARES})",
    )
    parser.add_argument("--check", action="store_true", help="read and check the policy, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``pamphlet broker ...``; returns the exit status."""
    arguments = _parser().parse_args(argv)
    try:
        policy = load(arguments.policy)
    except PolicyError as exc:
        print(f"pamphlet broker: {exc}", file=sys.stderr)
        return 2
    from ..doctor import broker_stack_warnings

    stack_warnings = broker_stack_warnings(
        (service for rule in policy.rules for service in rule.services), arguments.confdir
    )
    if arguments.check:
        print(f"pamphlet broker: {arguments.policy}: {len(policy.rules)} rules, OK")
        for warning in stack_warnings:
            print(f"pamphlet broker: warning: {warning}")
        for text in policy.throttle.warnings():
            print(f"pamphlet broker: warning: {arguments.policy}: {text}")
        return 0
    try:
        mode = int(arguments.socket_mode, 8)
    except ValueError:
        print(
            f"pamphlet broker: --socket-mode {arguments.socket_mode!r} is not octal",
            file=sys.stderr,
        )
        return 2
    if arguments.confdir is not None and not os.path.isdir(arguments.confdir):
        print(
            f"pamphlet broker: --confdir {arguments.confdir!r} is not a directory", file=sys.stderr
        )
        return 2
    # From the moment the socket can exist, a stop or reload is noted, not
    # fatal: SIGTERM's default action would leave the socket behind (a
    # service manager may stop the broker as soon as it starts).
    signals_before: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: signals_before.append(number))
    listener = systemd_listener()
    path = None
    if listener is None:
        if arguments.socket is None:
            print(
                "pamphlet broker: --socket PATH is needed (or systemd socket activation)",
                file=sys.stderr,
            )
            return 2
        if os.geteuid() != 0:
            print(
                "pamphlet broker: warning: not running as root; PAM stacks will only "
                "verify this user's own password",
                file=sys.stderr,
            )
        path = os.path.abspath(arguments.socket)
        listener = bind(path, mode, arguments.socket_group)
    broker = Broker(
        policy,
        listener,
        confdir=arguments.confdir,
        audit=Audit(arguments.audit),
        socket_path=path,
        spares=max(0, arguments.spares),
        policy_path=arguments.policy,
    )
    for warning in stack_warnings:  # modules that trust the caller, not the user's answer
        print(f"pamphlet broker: warning: {warning}", file=sys.stderr)
        line = warning.line
        broker.audit.log(
            event="stack-warning",
            service=warning.service,
            file=line.file,
            line=line.number,
            module=line.module,
            reason=warning.reason,
        )
    for text in policy.throttle.warnings():
        print(f"pamphlet broker: warning: {arguments.policy}: {text}", file=sys.stderr)
        broker.audit.log(event="policy-warning", policy=arguments.policy, reason=text)
    print(
        f"pamphlet broker: listening on {path or 'the socket systemd passed'}",
        file=sys.stderr,
        flush=True,
    )
    broker.serve(signals_before)
    return 0
