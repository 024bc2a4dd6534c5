"""pam_scripted, our own test module: build it, script it, read what it saw.

pam_wrapper's modules only send well-formed conversations. pam_scripted
(``tests/hostile/pam_scripted.c``) sends exactly the calls a script names,
malformed ones included, checks the answers byte for byte and records what it
received. The benchmarks use it too, for many messages in one call.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence

SOURCE = pathlib.Path(__file__).parent / "hostile" / "pam_scripted.c"

# A text is bytes, or None for a NULL pointer.
Text = bytes | None


class CompilerMissingError(RuntimeError):
    """gcc or libpam's headers (libpam0g-dev) are missing."""


def build(directory: str | os.PathLike[str]) -> str:
    """Compile pam_scripted.so into ``directory``; returns its path."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise CompilerMissingError(
            f"{compiler} is needed to build {SOURCE.name}: apt-get install gcc"
        )
    output = os.path.join(directory, "pam_scripted.so")
    command = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"]
    proc = subprocess.run(
        [*command, "-o", output, str(SOURCE), "-lpam"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise CompilerMissingError(
            f"building {SOURCE.name} failed (libpam0g-dev installed?):\n{proc.stderr}"
        )
    return output


def spell(text: Text) -> str:
    """A text as the script spells it."""
    if text is None:
        return "null"
    if len(text) > 64 and len(set(text)) == 1:
        return f"rep:{len(text)}:{text[0]:02x}"
    return "hex:" + text.hex()


@dataclasses.dataclass
class Call:
    """One conversation call for the script to send."""

    messages: Sequence[tuple[int, Text]]
    #: the answers the module insists on (None: no answer); None checks nothing
    expect: Sequence[Text] | None = None
    #: the return code the module expects from the conversation
    rc: int = 0
    num_msg: int | None = None
    null_msg: bool = False
    null_resp: bool = False

    def lines(self) -> list[str]:
        out = [f"msg {style} {spell(text)}" for style, text in self.messages]
        options = [f"rc={self.rc}"]
        if self.num_msg is not None:
            options.append(f"num={self.num_msg}")
        if self.null_msg:
            options.append("nullmsg")
        if self.null_resp:
            options.append("nullresp")
        out.append("call " + " ".join(options))
        for index, answer in enumerate(self.expect or ()):
            out.append(f"expect {index} {spell(answer)}")
        return out


def script_text(calls: Iterable[Call], returns: int = 0, *, crash: bool = False) -> str:
    lines = [line for call in calls for line in call.lines()]
    if crash:
        lines.append("crash")  # abort(): the process running the stack dies
    lines.append(f"return {returns}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Received:
    """What the module saw of one call: the code and the answers."""

    num_msg: int
    rc: int
    resp_set: bool
    answers: list[tuple[Text, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Record:
    calls: list[Received]
    mismatches: list[str]
    results: list[int]
    ended: int  # how many times pam_end ran the module's cleanup
    #: the status pam_end passed each time
    end_status: list[int] = dataclasses.field(default_factory=list)
    #: the flags of each service function call
    flags: list[int] = dataclasses.field(default_factory=list)


def read_record(path: str | os.PathLike[str]) -> Record:
    record = Record([], [], [], 0)
    if not os.path.exists(path):
        return record
    with open(path, encoding="ascii") as file:
        for line in file:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "call":
                num, rc, resp = rest.split()
                record.calls.append(Received(int(num), int(rc), resp == "resp=set"))
            elif kind == "answer":
                _, text, retcode = rest.split()
                answer = None if text == "null" else bytes.fromhex(text[len("hex:") :])
                record.calls[-1].answers.append((answer, int(retcode)))
            elif kind == "mismatch":
                record.mismatches.append(rest)
            elif kind == "result":
                record.results.append(int(rest))
            elif kind == "end":
                record.ended += 1
                record.end_status.append(int(rest))
            elif kind == "flags":
                record.flags.append(int(rest))
    return record


class ScriptedModule:
    """Scripts for one built pam_scripted.so, each with its own record file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = tempfile.mkdtemp(prefix="pam-scripted-")
        self._count = 0

    def line(
        self,
        calls: Iterable[Call],
        *,
        returns: int = 0,
        kind: str = "auth",
        control: str = "required",
        crash: bool = False,
    ) -> tuple[str, str]:
        """A stack line running ``calls``, and the path of its record file."""
        self._count += 1
        script = os.path.join(self.directory, f"script{self._count}")
        record = os.path.join(self.directory, f"record{self._count}")
        with open(script, "w", encoding="ascii") as file:
            file.write(script_text(calls, returns, crash=crash))
        return f"{kind} {control} {self.path} script={script} record={record}", record

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
