#!/usr/bin/env python3
"""SSH_ASKPASS for the tests: answers the real ssh client's prompts in order.

ssh runs it once per prompt, with the prompt as argv[1] and no terminal. It
appends the prompt to $ASKPASS_LOG (one JSON string a line) and prints the
next answer of $ASKPASS_ANSWERS (a JSON list). The answer "<hang up>" makes it
wait for the file $ASKPASS_LOG.hangup, then kill its ssh: a client that goes
away in the middle of a login.
"""

import json
import os
import signal
import sys
import time

log_path = os.environ["ASKPASS_LOG"]
answers = json.loads(os.environ["ASKPASS_ANSWERS"])
with open(log_path, "a+", encoding="utf-8") as log:
    log.seek(0)
    count = len(log.read().splitlines())
    log.write(json.dumps(sys.argv[1] if len(sys.argv) > 1 else "") + "\n")
answer = answers[count] if count < len(answers) else ""
if answer == "<hang up>":
    deadline = time.monotonic() + 60
    while not os.path.exists(log_path + ".hangup") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
print(answer)
