"""Items and the PAM environment, seen from both sides: ours and the modules'."""

from __future__ import annotations

import time

import pytest

import pamphlet
from conftest import ScriptedApp
from pamphlet import Item
from pamphlet.testing import pam_wrapper_module

STRING_ITEMS = {
    "authtok_type": "PAM_AUTHTOK_TYPE",
    "rhost": "PAM_RHOST",
    "ruser": "PAM_RUSER",
    "service": "PAM_SERVICE",
    "tty": "PAM_TTY",
    "user": "PAM_USER",
    "user_prompt": "PAM_USER_PROMPT",
    "xdisplay": "PAM_XDISPLAY",
}


@pytest.fixture
def permit(make_service):
    return make_service("auth required pam_permit.so\nsession required pam_permit.so")


def test_items_reach_modules(make_service):
    # pam_get_items copies every item the module sees into the PAM environment.
    service = make_service(f"auth required {pam_wrapper_module('pam_get_items')}")
    with service.app(ScriptedApp, "bob") as app:
        values = {name: f"value of {name}" for name in STRING_ITEMS}
        values["service"] = service.name
        for name, value in values.items():
            setattr(app, name, value)
        app.authenticate()
        for name, variable in STRING_ITEMS.items():
            assert app.environ[variable] == values[name]
            assert getattr(app, name) == values[name]


def test_items_set_by_modules_are_read_back(make_service, monkeypatch):
    # pam_set_items sets items from the process environment.
    monkeypatch.setenv("PAM_RHOST", "from.module")
    monkeypatch.setenv("PAM_USER", "renamed")
    service = make_service(f"auth required {pam_wrapper_module('pam_set_items')}")
    with service.app(ScriptedApp, "bob") as app:
        assert app.rhost is None
        app.authenticate()
        assert app.rhost == "from.module"
        assert app.user == "renamed"


def test_pam_echo_expands_items(make_service):
    service = make_service("auth required pam_echo.so %u %H %t %s")
    with service.app(ScriptedApp, "bob") as app:
        app.rhost = "client.example"
        app.tty = "/dev/pts/7"
        app.authenticate()
    assert app.seen == [f"bob client.example /dev/pts/7 {service.name}"]


def test_items_default_to_none_and_can_be_cleared(permit):
    with permit.app(ScriptedApp, None) as app:
        for name in STRING_ITEMS:
            if name != "service":
                assert getattr(app, name) is None
        app.tty = "tty1"
        app.tty = None
        assert app.tty is None
        assert app.service == permit.name


def test_get_item_and_set_item_by_number(permit):
    with permit.app(ScriptedApp, "bob") as app:
        app.set_item(Item.RHOST, "h")
        assert app.get_item(Item.RHOST) == "h" == app.rhost


@pytest.mark.parametrize("item", [Item.AUTHTOK, Item.OLDAUTHTOK])
def test_authtok_items_are_refused_loudly(permit, item):
    with permit.app(ScriptedApp, "bob") as app:
        with pytest.raises(pamphlet.BadItem):
            app.set_item(item, "secret")
        with pytest.raises(pamphlet.BadItem):
            app.get_item(item)


def test_item_with_nul_or_wrong_type(permit):
    with permit.app(ScriptedApp, "bob") as app:
        with pytest.raises(ValueError, match="NUL"):
            app.rhost = "a\0b"
        with pytest.raises(TypeError):
            app.rhost = 42  # type: ignore[assignment]
        assert app.rhost is None


def test_nul_in_constructor_arguments(permit):
    with pytest.raises(ValueError):
        ScriptedApp(permit.name, "bo\0b", confdir=permit.confdir)
    with pytest.raises(ValueError):
        ScriptedApp("ser\0vice", "bob", confdir=permit.confdir)


def test_xauthdata_round_trip(permit):
    cookie = bytes(range(16)) + b"\0\xff"
    with permit.app(ScriptedApp, "bob") as app:
        assert app.xauthdata is None
        app.xauthdata = ("MIT-MAGIC-COOKIE-1", cookie)
        assert app.xauthdata == ("MIT-MAGIC-COOKIE-1", cookie)
        app.xauthdata = ("other", b"")
        assert app.xauthdata == ("other", b"")
        app.xauthdata = None
        assert app.xauthdata is None
        with pytest.raises(ValueError):
            app.xauthdata = ("a\0b", b"")


def test_non_utf8_bytes_round_trip(make_service, tmp_path):
    raw = b"caf\xe9 \xff\xfe"
    (tmp_path / "motd").write_bytes(raw + b"\n")
    service = make_service(f"auth required pam_echo.so file={tmp_path / 'motd'}")
    with service.app(ScriptedApp, "bob") as app:
        app.authenticate()
        assert app.seen[0].encode("utf-8", "surrogateescape") == raw
        app.rhost = app.seen[0]  # surrogates go back to libpam as the same bytes
        assert app.rhost == app.seen[0]
    with service.app(ScriptedApp, "bob", encoding="latin-1") as app:
        app.authenticate()
        assert app.seen[0] == "café ÿþ"


def test_unknown_encoding_fails_at_construction(permit):
    with pytest.raises(LookupError):
        ScriptedApp(permit.name, "bob", confdir=permit.confdir, encoding="no-such-codec")


# -- environ ------------------------------------------------------------------


def test_environ_is_a_mutable_mapping(permit):
    from collections.abc import MutableMapping

    with permit.app(ScriptedApp, "bob") as app:
        env = app.environ
        assert isinstance(env, MutableMapping)
        assert len(env) == 0 and list(env) == [] and dict(env) == {}
        env["LANG"] = "C.UTF-8"
        env.update(A="1", B="two = 2")
        assert env["B"] == "two = 2"
        assert sorted(env) == ["A", "B", "LANG"] and len(env) == 3
        assert "A" in env and "Z" not in env and 3 not in env
        assert env.get("Z") is None and env.get("A") == "1"
        assert env.pop("A") == "1"
        del env["B"]
        with pytest.raises(KeyError):
            del env["B"]
        with pytest.raises(KeyError):
            env["B"]
        assert env.copy() == {"LANG": "C.UTF-8"}
        env["LANG"] = ""
        assert env["LANG"] == ""
        env.clear()
        assert len(env) == 0


def test_environ_rejects_bad_names_and_values(permit):
    with permit.app(ScriptedApp, "bob") as app:
        for bad in ("", "A=B", "A\0B"):
            with pytest.raises(ValueError):
                app.environ[bad] = "x"
        with pytest.raises(ValueError):
            app.environ["A"] = "x\0y"
        with pytest.raises(TypeError):
            app.environ["A"] = 1  # type: ignore[assignment]


def test_pam_env_sets_variables(make_service, tmp_path):
    conf = tmp_path / "env.conf"
    conf.write_text("GREETING DEFAULT=hello\nWHO DEFAULT=@{PAM_USER}\n")
    empty = tmp_path / "environment"
    empty.write_text("")
    service = make_service(
        f"auth required pam_env.so conffile={conf} envfile={empty} readenv=1 user_readenv=0"
    )
    with service.app(ScriptedApp, "bob") as app:
        app.initialize_credentials()
        assert app.environ.copy() == {"GREETING": "hello", "WHO": "bob"}


# -- fail_delay ---------------------------------------------------------------


def test_fail_delay_replaces_libpam_sleep(make_service):
    service = make_service(
        "auth required pam_faildelay.so delay=2000000\nauth required pam_deny.so"
    )
    calls = []
    with service.app(ScriptedApp, "bob") as app:
        app.fail_delay = lambda status, usec: calls.append((status, usec))
        started = time.monotonic()
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()
        assert time.monotonic() - started < 1.5  # libpam did not sleep its 2 s
    assert len(calls) == 1
    status, usec = calls[0]
    assert status == pamphlet.ReturnCode.AUTH_ERR
    assert 1_000_000 <= usec <= 3_000_000


def test_fail_delay_none_restores_libpam_sleep(make_service):
    service = make_service("auth required pam_faildelay.so delay=200000\nauth required pam_deny.so")
    calls = []
    with service.app(ScriptedApp, "bob") as app:
        app.fail_delay = lambda status, usec: calls.append(status)
        app.fail_delay = None
        assert app.fail_delay is None
        started = time.monotonic()
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()
        assert time.monotonic() - started >= 0.1
    assert calls == []


def test_fail_delay_that_raises_fails_the_phase(make_service):
    service = make_service("auth required pam_faildelay.so delay=1000\nauth required pam_permit.so")

    def broken(status, usec):
        raise RuntimeError("delay policy broke")

    with service.app(ScriptedApp, "bob") as app:
        app.fail_delay = broken
        with pytest.raises(pamphlet.ConversationError) as info:
            app.authenticate()
    assert str(info.value.__cause__) == "delay policy broke"


def test_fail_delay_must_be_callable(permit):
    with permit.app(ScriptedApp, "bob") as app, pytest.raises(TypeError):
        app.fail_delay = 5  # type: ignore[assignment]
