"""Behaviour of tinytown.py, against real redis-server processes (never a fake).

Sections mirror the module's.  Fixtures: `redis_url`, one throwaway server for the
session (unix socket); `town`, a fresh town on that server (REDIS_URL, unique name);
`managed_town`, a town that starts and owns its own server under .tt/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

import tinytown
from tinytown import (AgentAmbiguous, AgentNotFound, ConfigError, InvalidName, Message, Priority,
                      RedisServerError, Task, TaskNotFound, Town, main)

MODULE = Path(tinytown.__file__).resolve()


# Fixtures ####################################################################

@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """One redis-server for the session, on a unix socket, no persistence."""
    folder = tmp_path_factory.mktemp("redis")
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
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def town(tmp_path, redis_url, monkeypatch):
    """A fresh town on the session's server (REDIS_URL), torn down after the test."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TINYTOWN_TOWN", str(tmp_path))
    name = f"t-{uuid.uuid4().hex[:10]}"
    with Town.init(tmp_path, name, agent={"heartbeat_secs": 1}) as t:
        yield t
        for agent in t.list_agents():  # no loop outlives its test
            if agent.pid and not agent.terminal:
                t.kill_agent(agent.id)
        for agent in t.list_agents():
            if agent.pid:
                _wait_gone(int(agent.pid), 10)
        t.reset(force=True)


@pytest.fixture
def managed_town(tmp_path, monkeypatch):
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


def test_unknown_config_key_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "tinytown.toml"
    path.write_text('name = "x"\n\n[redis]\nuse_socket = true\nflavour = "cherry"\n')
    with pytest.raises(ConfigError, match=r"tinytown.toml:5: redis.flavour: unknown key"):
        tinytown.load_config(path)


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "tinytown.toml").write_text('name = "x"\n[redis\n')
    code, out, err = tt("status", town_path=tmp_path)
    assert code == 1
    assert "invalid TOML" in err and "line 2" in err and "Traceback" not in err


def test_bad_value_type_names_key_and_line(tmp_path):
    path = tmp_path / "tinytown.toml"
    path.write_text('name = "x"\nmax_agents = "many"\n')
    with pytest.raises(ConfigError, match=r":2: max_agents must be a whole number"):
        tinytown.load_config(path)


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


def test_redaction_of_urls_and_config():
    assert tinytown.redact_url("redis://user:s3cret@host:6379/0") == "redis://user:****@host:6379/0"
    assert tinytown.redact_url("rediss://:pw@h:1") == "rediss://:****@h:1"
    assert tinytown.redact_url("redis://host:6379") == "redis://host:6379"


def test_redis_url_env_is_shown_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://u:topsecret@127.0.0.1:1/0")
    Town.init  # noqa: B018 - the town below is created without starting anything
    (tmp_path / "tinytown.toml").write_text('name = "x"\n')
    code, _, err = tt("status", town_path=tmp_path)
    assert code == 1
    assert "topsecret" not in err and "u:****@127.0.0.1:1" in err


# Redis server ################################################################

def test_init_produces_the_seed_layout_and_a_running_server(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    proj = tmp_path / "demo"
    proj.mkdir()
    result = run_module("init", "--name", "demo-town", cwd=proj)
    assert result.returncode == 0, result.stderr
    try:
        assert sorted(p.name for p in proj.iterdir()) == [".gitignore", ".tt", "tinytown.toml"]
        runtime = proj / ".tt"
        assert {"redis.sock", "redis.pid", "redis.aof", "agents", "logs", "tasks"} <= {
            p.name for p in runtime.iterdir()}
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


def test_reinit_keeps_config_and_gitignore_line_is_not_duplicated(tmp_path, monkeypatch):
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


def test_invalid_town_names_are_refused(tmp_path):
    for bad in ("a:b", "../x", "*", "", "a b"):
        with pytest.raises(InvalidName):
            Town.init(tmp_path / "x", bad)
    assert not (tmp_path / "x" / "tinytown.toml").exists()


def test_folder_name_is_sanitised_into_the_town_name(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with Town.init(tmp_path / "My Project!") as town:
        assert town.name == "My-Project"


def test_connect_without_a_town_says_run_init(tmp_path):
    with pytest.raises(tinytown.TownNotFound, match="run `tt init`"):
        Town(tmp_path)
    code, _, err = tt("list", town_path=tmp_path)
    assert code == 1 and "no town at" in err


def test_connect_starts_a_stopped_server_and_data_survives(managed_town):
    root = managed_town.root
    managed_town.channel.redis.set("tt:managed:probe", "kept")
    managed_town.close()  # it started the server, so it stops it (SHUTDOWN SAVE)
    assert not managed_town.server.ping()
    with Town(root) as again:
        assert again.owns_server
        assert again.redis.get("tt:managed:probe") == "kept"


def test_ownership_only_the_starter_stops_the_server(managed_town):
    with Town(managed_town.root) as visitor:
        assert not visitor.owns_server
    assert managed_town.server.ping()  # the visitor left it running
    pid = managed_town.server.read_pid()
    managed_town.close()
    assert _wait_gone(pid, 10)


def test_with_block_leaves_nothing_running(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with Town.init(tmp_path, "x") as town:
        pid = town.server.read_pid()
        assert pid in redis_pids()
    assert _wait_gone(pid, 10)
    assert not serving(tmp_path)


def test_stale_socket_and_pid_file_are_recovered(managed_town):
    root, server = managed_town.root, managed_town.server
    managed_town.close()
    server.socket_path.touch()  # a leftover socket file nobody listens on
    (root / ".tt" / "redis.pid").write_text("999999\n")
    with Town(root) as again:
        assert again.owns_server and again.redis.ping()


def test_live_server_without_socket_is_stopped_before_a_new_one(managed_town):
    old_pid = managed_town.server.read_pid()
    managed_town.server.socket_path.unlink()  # the server lives but cannot be reached
    with Town(managed_town.root) as again:
        assert again.redis.ping()
        assert again.server.read_pid() != old_pid
    assert _wait_gone(old_pid, 10)
    managed_town._owns_server = False


def test_two_processes_connecting_at_once_start_one_server(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    Town.init(tmp_path, "race").close()
    procs = [subprocess.Popen([sys.executable, str(MODULE), "-t", str(tmp_path), "status", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    try:
        assert all(p.returncode == 0 for p in procs), results
        assert len({json.loads(out)["redis"]["pid"] for out, _ in results}) == 1
        assert len(serving(tmp_path)) == 1
    finally:
        run_module("stop", "-t", tmp_path)


def test_tcp_mode_with_password_keeps_it_off_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    import socket as socketlib
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"redis": {"use_socket": False, "port": port, "password": "hunter2-secret"}}
    with Town.init(tmp_path, "tcp", **options) as town:
        assert town.redis.ping()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "hunter2-secret" not in ps
        assert f"127.0.0.1:{port}" in ps
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        status = town.status()
        assert "hunter2" not in json.dumps(status)


def test_password_from_environment_overrides_config(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TINYTOWN_REDIS_PASSWORD", "from-env")
    with Town.init(tmp_path, "pw") as town:
        assert town.redis.config_get("requirepass")["requirepass"] == "from-env"


def test_explicit_url_never_starts_or_stops_a_server(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    with Town.init(tmp_path, "ext") as town:
        assert not town.server.managed and not town.owns_server
        assert not serving(tmp_path) and not (tmp_path / ".tt" / "redis.pid").exists()
        assert not town.server.stop()
    assert redis.Redis.from_url(redis_url).ping()


def test_unreachable_url_is_an_error_not_a_start(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    (tmp_path / "tinytown.toml").write_text('name = "x"\n')
    with pytest.raises(tinytown.RedisUnreachable, match="never starts"):
        Town(tmp_path)


def test_missing_redis_server_binary_is_a_clear_error(tmp_path, monkeypatch):
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


def test_too_old_redis_server_is_refused(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=5.0.7 sha=0 malloc=libc bits=64'\n")
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match="needs 6.2 or newer"):
        tinytown.redis_server_version(fake)


def test_long_project_path_uses_a_short_socket(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with Town.init(deep, "deep") as town:
        assert town.redis.ping()
        assert len(str(town.server.socket_path)) < 108
        assert (deep / ".tt" / "socket").read_text().strip() == str(town.server.socket_path)


# CLI #########################################################################

def test_usage_errors_exit_2_and_errors_exit_1_without_traceback(town):
    assert tt("frobnicate")[0] == 2
    code, _, err = tt("task", "show", "nope")
    assert code == 1 and err.startswith("tt: error: no unique task 'nope'") and "Traceback" not in err


def test_json_anywhere_prints_one_document(town):
    status = tt_json("status")
    assert status["town"] == town.name
    code, out, _ = tt("--json", "list")
    assert code == 0 and json.loads(out) == []
