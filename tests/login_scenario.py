"""One login, as a server would run it, in a process of its own; prints a JSON report.

    python login_scenario.py '{"service": ..., "confdir": ..., "user": ..., ...}'

tests/test_process.py runs it in a private mount namespace (unshare), where
/etc/security/group.conf is the test's own: pam_group has no option to read
another file. The report: which phases failed, and the run's outcome.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pamphlet
from pamphlet.process import LoginRefused, UserSession, run_as_user


class Login(pamphlet.PamApplication):
    def __init__(self, *args, password: str, **kwargs):
        self.password = password
        self.said: list[str] = []
        super().__init__(*args, **kwargs)

    def conversation(self, messages):
        self.said.extend(str(m) for m in messages if not m.is_prompt)
        return [self.password if m.is_prompt else "" for m in messages]


def main() -> None:
    orders = json.loads(sys.argv[1])
    report: dict = {"failed": {}, "refused": None}
    # Descriptors a careless server leaves inheritable: none may reach the child.
    leaks = [os.open(orders["confdir"], os.O_RDONLY), socket.socket()]
    os.set_inheritable(leaks[0], True)
    leaks[1].set_inheritable(True)
    with Login(
        orders["service"], orders["user"], confdir=orders["confdir"], password=orders["password"]
    ) as app:
        app.tty = orders.get("tty", "pamphlet-test")
        for phase in orders.get("phases", ["authenticate", "acct_mgmt"]):
            try:
                getattr(app, phase)()
            except pamphlet.PamError as error:
                report["failed"][phase] = type(error).__name__
        try:
            if orders.get("session_api"):
                with UserSession(app, session_only=orders.get("session_only", False)) as session:
                    process = session.popen(orders["command"], stdout=subprocess.PIPE, text=True)
                    stdout, _ = process.communicate()
                    report.update(cwd=process.cwd, pid=process.pid)
                result = subprocess.CompletedProcess(process.args, process.returncode, stdout)
            else:
                result = run_as_user(
                    app,
                    orders["command"],
                    session_only=orders.get("session_only", False),
                    stdout=subprocess.PIPE,
                    text=True,
                )
        except LoginRefused as refused:
            report["refused"] = [type(refused).__name__, str(refused)]
        except pamphlet.PamError as error:
            report["failed"]["session"] = type(error).__name__
        else:
            report.update(returncode=result.returncode, stdout=result.stdout)
        report["said"] = app.said
        report["server_groups"] = os.getgroups()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
