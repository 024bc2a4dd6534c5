"""20,000 full transactions in one process: RSS and file descriptors stay flat."""

from __future__ import annotations

import json

from conftest import run_python

LEAK_SCRIPT = """
import json, os, sys
import pamphlet
from pamphlet.testing import TemporaryService

def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

class App(pamphlet.PamApplication):
    def conversation(self, messages):
        return ["secret" if m.is_prompt else "" for m in messages]

def transactions(count):
    for _ in range(count):
        app = App(service.name, "bob", confdir=service.confdir)
        app.authenticate()
        app.account_management()
        app.open_session()
        app.close_session()
        app.end()

with TemporaryService(users={"bob": "secret"}) as service:
    transactions(2000)  # warm up: allocator arenas, caches
    fds = sorted(os.listdir("/proc/self/fd"))
    before = rss_kib()
    transactions(int(sys.argv[1]))
    after = rss_kib()
    fds_after = sorted(os.listdir("/proc/self/fd"))
print(json.dumps({"before": before, "after": after, "fds": fds, "fds_after": fds_after}))
"""


def test_20000_transactions_do_not_leak():
    proc = run_python(LEAK_SCRIPT, "20000")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["after"] - result["before"] < 2048, result  # KiB
    assert result["fds_after"] == result["fds"]
