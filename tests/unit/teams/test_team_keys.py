"""Run-time API keys: stored hashed, shown once, revoked or rotated on every gateway replica within a second."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time

import pytest

from scheduler.api.auth import KeyStore
from scheduler.api.errors import ApiError
from scheduler.config import ApiKeyConfig, WattlaneConfig
from scheduler.teams.keys import KEY_CACHE_SECONDS, MISS_RECHECK_SECONDS, KeyCache, KeyError_, KeyRegistry, hash_key
from scheduler.teams.store import TeamsStore

CONFIG = WattlaneConfig.model_validate({
    "models": [{"id": "m", "kind": "chat", "engine": "simulated", "devices": []}],
    "teams": [{"name": "search", "limits": {"requests_per_minute": 100}}],
})


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_a_key_is_stored_only_as_its_hash(tmp_path):
    registry = KeyRegistry(TeamsStore(tmp_path))
    record, secret = registry.create(key_id="ci-bot", role="client", team="search")
    assert secret.startswith("wl-") and len(secret) > 40
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the database and its WAL
    assert secret.encode() not in raw
    assert hash_key(secret).encode() in raw
    assert "key" not in record.public() and "key_sha256" not in record.public()


def test_a_key_created_on_another_replica_works_there_without_waiting_for_the_cache(tmp_path):
    """A client uses a key the moment it is handed out; the replica it reaches may have read the keys just
    before (it was refused with 401 for up to KEY_CACHE_SECONDS)."""
    cli, replica = KeyRegistry(TeamsStore(tmp_path)), TeamsStore(tmp_path)
    store = KeyStore([], runtime=KeyCache(replica), config=CONFIG)
    _, first = cli.create(key_id="first")
    time.sleep(KEY_CACHE_SECONDS)
    store.authenticate(bearer(first))  # the replica has just read the keys
    _, second = cli.create(key_id="second")
    time.sleep(MISS_RECHECK_SECONDS)
    assert store.authenticate(bearer(second)).key_id == "second"


def test_revocation_reaches_another_replica_within_a_second(tmp_path):
    # two gateway replicas: two processes' caches over one file (each its own connection)
    cli, replica_a, replica_b = KeyRegistry(TeamsStore(tmp_path)), TeamsStore(tmp_path), TeamsStore(tmp_path)
    store_a = KeyStore([], runtime=KeyCache(replica_a), config=CONFIG)
    store_b = KeyStore([], runtime=KeyCache(replica_b), config=CONFIG)
    _, secret = cli.create(key_id="ci-bot", team="search")
    time.sleep(KEY_CACHE_SECONDS)
    for store in (store_a, store_b):
        p = store.authenticate(bearer(secret))
        assert (p.key_id, p.role, p.team) == ("ci-bot", "client", "search")
        assert p.quota is not None and p.quota.subjects[0].name == "team:search"
    cli.revoke("ci-bot")
    revoked_s = time.monotonic()
    refused = set()
    while len(refused) < 2 and time.monotonic() - revoked_s < 1.0:
        for name, store in (("a", store_a), ("b", store_b)):
            try:
                store.authenticate(bearer(secret))
            except ApiError as exc:
                assert exc.status == 401
                refused.add(name)
        time.sleep(0.01)
    assert refused == {"a", "b"}, f"still accepted after {time.monotonic() - revoked_s:.2f} s"


def test_rotation_keeps_the_id_and_refuses_the_old_secret(tmp_path):
    registry = KeyRegistry(TeamsStore(tmp_path))
    store = KeyStore([], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    _, old = registry.create(key_id="ci-bot", role="reader")
    record, new = registry.rotate("ci-bot")
    assert new != old and record.key_id == "ci-bot" and record.role == "reader"
    assert store.authenticate(bearer(new)).key_id == "ci-bot"
    with pytest.raises(ApiError) as exc:
        store.authenticate(bearer(old))
    assert exc.value.status == 401


def test_an_expired_key_is_refused(tmp_path):
    registry = KeyRegistry(TeamsStore(tmp_path))
    store = KeyStore([], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    _, secret = registry.create(key_id="short", expires_unix_s=time.time() + 0.3)
    assert store.authenticate(bearer(secret)).key_id == "short"
    time.sleep(0.35)
    with pytest.raises(ApiError):
        store.authenticate(bearer(secret))
    assert registry.get("short").public()["status"] == "expired"


def test_the_first_run_time_key_turns_anonymous_access_off_and_revoking_it_does_not_turn_it_on(tmp_path):
    store = KeyStore([], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    assert store.authenticate(None).key_id == "anonymous"
    registry = KeyRegistry(TeamsStore(tmp_path))
    _, secret = registry.create(key_id="first")
    registry.revoke("first")
    for authorization in (None, bearer(secret)):
        with pytest.raises(ApiError) as exc:
            store.authenticate(authorization)
        assert exc.value.status == 401


def test_config_keys_and_run_time_keys_work_side_by_side_and_ids_never_collide(tmp_path):
    cfg_key = ApiKeyConfig(id="ops", key_sha256=hash_key("config-secret"), role="operator")
    registry = KeyRegistry(TeamsStore(tmp_path), {"ops"})
    store = KeyStore([cfg_key], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    _, secret = registry.create(key_id="bot")
    assert store.authenticate(bearer("config-secret")).key_id == "ops"
    assert store.authenticate(bearer(secret)).key_id == "bot"
    for action in (lambda: registry.create(key_id="ops"), lambda: registry.revoke("ops"), lambda: registry.create(key_id="bot")):
        with pytest.raises(KeyError_) as exc:
            action()
        assert exc.value.status == 409
    with pytest.raises(KeyError_) as exc:
        registry.revoke("nobody")
    assert exc.value.status == 404


def test_a_key_changed_by_hand_to_invalid_limits_is_refused_not_run_unlimited(tmp_path):
    registry = KeyRegistry(TeamsStore(tmp_path))
    store = KeyStore([], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    _, secret = registry.create(key_id="bot", limits={"requests_per_minute": 5})
    with sqlite3.connect(tmp_path / "teams.sqlite3") as conn:
        conn.execute("UPDATE api_keys SET limits_json = '{\"requests_per_minute\": -1}'")
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")
    with pytest.raises(ApiError) as exc:
        store.authenticate(bearer(secret))
    assert exc.value.status == 403 and "requests_per_minute" in exc.value.message


def test_the_cli_creates_lists_rotates_and_revokes_on_the_state_directory(tmp_path):
    from typer.testing import CliRunner

    from scheduler.cli import _register_all, app

    _register_all()
    runner = CliRunner()

    def run(*args: str):
        r = runner.invoke(app, ["keys", *args, "--state-dir", str(tmp_path)])
        return r.exit_code, r.stdout + (r.stderr if r.stderr_bytes else "")

    code, text = run("create", "--id", "ci", "--rpm", "60", "--budget", "energy_joules=5e5/day", "--json")
    assert code == 0, text
    created = json.loads(text)
    assert created["limits"] == {"requests_per_minute": 60}
    assert created["budgets"] == [{"energy_joules": 5e5, "period": "day"}]
    store = KeyStore([], runtime=KeyCache(TeamsStore(tmp_path), ttl_seconds=0), config=CONFIG)
    assert store.authenticate(bearer(created["key"])).quota.subjects[0].name == "key:ci"
    code, text = run("rotate", "ci", "--json")
    assert code == 0 and json.loads(text)["key"] != created["key"]
    code, text = run("list", "--json")
    assert [(k["id"], k["status"]) for k in json.loads(text)] == [("ci", "active")] and created["key"] not in text
    assert run("revoke", "ci")[0] == 0
    assert json.loads(run("list", "--json")[1])[0]["status"] == "revoked"
    for bad in (["create", "--budget", "joules=5"], ["create", "--team", "bad team"], ["revoke", "nobody"],
                ["create", "--rpm", "0"]):
        code, text = run(*bad)
        assert code == 1 and "error:" in text, (bad, text)


def keys_cli(*args: str) -> tuple[int, str]:
    """`wattlane keys ARGS`: the exit code and what it printed (stdout and stderr, the console's wrapping undone)."""
    from typer.testing import CliRunner

    from scheduler.cli import _register_all, app

    _register_all()
    r = CliRunner().invoke(app, ["keys", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # never a traceback
    return r.exit_code, " ".join((r.stdout + (r.stderr if r.stderr_bytes else "")).split())


@pytest.mark.parametrize("days", ["nan", "inf", "1e300", "0"])
def test_an_expiry_that_is_not_a_finite_date_is_refused_before_anything_is_stored(tmp_path, days):
    """inf and 1e300 were stored and then crashed every `keys list` (OverflowError); nan was stored as no expiry."""
    code, text = keys_cli("create", "--id", "odd", "--expires-in-days", days, "--state-dir", str(tmp_path))
    assert code == 1 and "--expires-in-days must be a number of days greater than 0" in text, text
    assert not (tmp_path / "teams.sqlite3").exists()


@pytest.mark.parametrize("expires_unix_s", [float("nan"), float("inf"), 1e300])
def test_the_registry_refuses_an_expiry_no_listing_could_show(tmp_path, expires_unix_s):
    registry = KeyRegistry(TeamsStore(tmp_path))
    with pytest.raises(KeyError_, match="no later than 9999-12-31") as caught:
        registry.create(key_id="odd", expires_unix_s=expires_unix_s)
    assert caught.value.param == "expires_at" and registry.list() == []


def test_keys_list_shows_a_store_whose_expiry_an_older_version_wrote_out_of_range(tmp_path):
    KeyRegistry(TeamsStore(tmp_path)).create(key_id="far")
    with TeamsStore(tmp_path).write() as conn:  # as an older version stored --expires-in-days 1e300
        conn.execute("UPDATE api_keys SET expires_unix_s = 1e300 WHERE key_id = 'far'")
    code, text = keys_cli("list", "--state-dir", str(tmp_path))
    assert code == 0 and "far" in text and "1e+300" in text, text


def foreign_files(tmp_path):
    """Files in a teams.sqlite3's place that are no teams database, and what the error says of each."""
    def sqlite_with(*statements: str):
        def make(path):
            with contextlib.closing(sqlite3.connect(path)) as conn:
                for stmt in statements:
                    conn.execute(stmt)
                conn.commit()
        return make

    return [
        (lambda p: p.write_bytes(b"not a database at all\n" * 10), "file is not a database"),
        (lambda p: p.mkdir(), "is a folder"),
        (sqlite_with("CREATE TABLE notes (body TEXT)"), "it has no api_keys or meta table (tables: notes)"),
        (sqlite_with("CREATE TABLE api_keys (id TEXT, secret TEXT)", "CREATE TABLE meta (name TEXT, value INTEGER)"),
         "its api_keys table has another layout"),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("command", [["list"], ["create", "--id", "x"], ["revoke", "x"], ["rotate", "x"]])
def test_keys_on_a_file_that_is_no_teams_database_is_a_clear_error_and_leaves_it_as_it_was(tmp_path, case, command):
    """These were tracebacks (file is not a database, unable to open database file, no such column: key_id), and
    another program's database got our tables added."""
    make, words = foreign_files(tmp_path)[case]
    path = tmp_path / "teams.sqlite3"
    make(path)
    before = sorted(p.name for p in tmp_path.iterdir()), path.is_file() and path.read_bytes()
    code, text = keys_cli(*command, "--state-dir", str(tmp_path))
    assert code == 2 and f"{path} is" in text and words in text, text
    assert (sorted(p.name for p in tmp_path.iterdir()), path.is_file() and path.read_bytes()) == before


def test_an_empty_teams_file_is_initialised_and_the_gateways_store_still_creates_its_own(tmp_path):
    (tmp_path / "teams.sqlite3").write_bytes(b"")
    KeyRegistry(TeamsStore(tmp_path)).create(key_id="a")
    fresh = tmp_path / "new" / "state"
    assert KeyRegistry(TeamsStore(fresh)).list() == [] and (fresh / "teams.sqlite3").is_file()
    TeamsStore(tmp_path)  # opening our own store again passes the check
    assert [k.key_id for k in KeyRegistry(TeamsStore(tmp_path)).list()] == ["a"]


def test_keys_list_creates_no_state(tmp_path):
    """`keys list --state-dir <typo>` made the folders and a database and answered "no keys"."""
    typo = tmp_path / "typo" / "deeper"
    code, text = keys_cli("list", "--state-dir", str(typo))
    assert code == 2 and f"there is no Wattlane state at {typo}" in text, text
    assert not (tmp_path / "typo").exists()
    for command in (["revoke", "x"], ["rotate", "x"]):
        assert keys_cli(*command, "--state-dir", str(typo))[0] == 2 and not (tmp_path / "typo").exists()
    # a state directory without a teams database yet: the config's keys, no run-time ones, and nothing made
    code, text = keys_cli("list", "--json", "--state-dir", str(tmp_path))
    assert code == 0 and json.loads(text) == [] and list(tmp_path.iterdir()) == [], text
