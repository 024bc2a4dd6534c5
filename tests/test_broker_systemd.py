"""The shipped systemd unit lets every default phase work.

There is no systemd here, so the unit's filesystem protections are emulated:
the broker runs in a private mount namespace (``unshare -m``) where the paths
that the unit's ProtectSystem=, ProtectHome=, ReadOnlyPaths= and
ReadWritePaths= make read-only are read-only bind mounts. Then a password is
changed through it (chauthtok, a default phase, with the real pam_unix and a
throwaway user) under the shipped settings and under the old ones.
"""

from __future__ import annotations

import pathlib
import secrets
import subprocess
from collections.abc import Iterator

import pytest

import pamphlet
from broker_harness import Broker, public_dir, shadow_hash
from conftest import UNIX_STACK

pytestmark = pytest.mark.root

UNIT = pathlib.Path(__file__).parent.parent / "contrib" / "systemd" / "pamphlet-broker.service"
#: What the unit said before: ProtectSystem=full made /etc read-only.
OLD_SETTINGS = {"ProtectSystem": ["full"], "ProtectHome": ["read-only"]}

POLICY = """\
[[allow]]
users = ["root"]
services = ["unix"]
"""


def service_settings(text: str) -> dict[str, list[str]]:
    """The [Service] section's settings, each with its values in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def mounts(settings: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(read-only paths, writable paths under them), as systemd.exec(5) describes them."""
    protect_system = settings.get("ProtectSystem", ["no"])[-1]
    protect_home = settings.get("ProtectHome", ["no"])[-1]
    read_only: list[str] = []
    if protect_system == "strict":
        read_only.append("/")
    elif protect_system in ("yes", "true", "full"):
        read_only += ["/usr", "/boot", "/efi"]
        if protect_system == "full":
            read_only.append("/etc")
    elif protect_system not in ("no", "false"):
        raise AssertionError(f"ProtectSystem={protect_system} is not emulated here")
    if protect_home == "read-only":
        read_only += ["/home", "/root", "/run/user"]
    elif protect_home not in ("no", "false"):
        raise AssertionError(f"ProtectHome={protect_home} is not emulated here")
    for value in settings.get("ReadOnlyPaths", []):
        read_only += value.split()
    writable = [path for value in settings.get("ReadWritePaths", []) for path in value.split()]
    return read_only, [path.lstrip("-") for path in writable]


def namespace(settings: dict[str, list[str]]) -> list[str]:
    """A command prefix: run the rest in a mount namespace with the unit's protections."""
    read_only, writable = mounts(settings)
    script = "set -e\n"
    for path in read_only:
        script += (
            f"[ ! -e {path} ] || "
            f"{{ mount --bind {path} {path}; mount -o remount,bind,ro {path}; }}\n"
        )
    for path in writable:
        script += f"[ ! -e {path} ] || mount --bind {path} {path}\n"
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script + 'exec "$@"',
        "sh",
    ]


@pytest.fixture
def confdir() -> Iterator[pathlib.Path]:
    folder = public_dir("pamphlet-confdir-")
    (folder / "unix").write_text(UNIX_STACK)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def change_password(
    settings: dict[str, list[str]], confdir: pathlib.Path, user: str, old: str
) -> str:
    """Change ``user``'s password through a broker under ``settings``: 'ok' or the error."""
    broker = Broker(POLICY, str(confdir), wrapper=namespace(settings))
    try:
        pamphlet.change_password(
            user, old, "Nw-" + secrets.token_hex(8), "unix", broker=broker.socket
        )
        return "ok"
    except pamphlet.PamError as exc:
        return type(exc).__name__
    finally:
        broker.cleanup()


def test_the_units_protections_let_chauthtok_write_etc_shadow(confdir, unix_user):
    name, password = unix_user
    shipped = service_settings(UNIT.read_text())
    assert shipped["ProtectSystem"] and shipped["ProtectHome"]  # hardening is kept
    before = shadow_hash(name)
    assert change_password(OLD_SETTINGS, confdir, name, password) == "AuthTokenLockBusy"
    assert shadow_hash(name) == before
    assert change_password(shipped, confdir, name, password) == "ok"
    assert shadow_hash(name) != before


def test_the_emulation_makes_the_paths_read_only():
    """The namespace really is read-only where the settings say (the test above can fail)."""
    probe = [*namespace(OLD_SETTINGS), "sh", "-c", "touch /etc/.pamphlet-probe 2>&1; echo rc=$?"]
    proc = subprocess.run(probe, capture_output=True, text=True)
    pathlib.Path("/etc/.pamphlet-probe").unlink(missing_ok=True)
    assert "Read-only file system" in proc.stdout and "rc=1" in proc.stdout
