"""Behaviour of tinytown.py, against real redis-server processes (never a fake).

Sections mirror the module's.  Fixtures: `redis_url`, one throwaway server for the
session (unix socket); `town`, a fresh town on that server (REDIS_URL, unique name);
`managed_town`, a town that starts and owns its own server under .tt/.
"""

from __future__ import annotations

import dataclasses
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
from tinytown import (AgentAmbiguous, AgentNotFound, ConfigError, InvalidName, InvalidTransition,
                      Message, Priority, RedisServerError, SpawnError, Task, TaskNotFound, Town,
                      main)

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
    sent = [w.send(text, priority=prio) for text, prio in [
        ("n1", "normal"), ("h1", "high"), ("l1", "low"), ("u1", "urgent"),
        ("n2", "normal"), ("h2", "high"), ("u2", "urgent")]]
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
    assert (stop, state) == ("", "starting")
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
    assert (failed.state, failed.result, failed.attempts) == ("failed", "failure 3", 3)
    assert failed.completed_at and town.channel.task_counts() == {"failed": 1}

    channel.take(w.id)  # e.g. a stop: give the messages back without counting an attempt
    assert channel.settle(w.id, set(), "stopping", count_attempt=False) == []
    assert [(m.id, m.attempts) for m in w.inbox()] == [(late.id, 2)]


# -- malformed messages --

MALFORMED = [
    b"not json at all", b"[1, 2]", b'{"type": "task"}', b'{"type": "task", "to": "x", "priority": "asap"}',
    b'{"type": "task", "to": "x", "attempts": "many"}',
    b"\xff\xfe\x00garbage", b'{"type": "task", "to": "x", "attempts": 1e400}', b"[" * 100_000,
    b'{"type": "task", "to": "x", "from": null}',
]
MALFORMED_IDS = ["text", "list", "no-to", "bad-priority", "bad-attempts", "not-utf8", "huge-attempts",
                 "deep", "null-from"]


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
    assert set(task) == {f.name for f in dataclasses.fields(tinytown.Task)}
    assert task["description"] == "write the docs" and task["tags"] == ["docs", "api"]
    assert (task["state"], task["assigned_to"], task["attempts"]) == ("assigned", w.id, 0)
    assert task["created_at"].endswith("Z") and task["completed_at"] is None
    assert town.task(task["id"][:8]).to_dict() == task

    [message] = w.inbox()
    assert (message.type, message.body["task_id"], message.from_) == ("task_assign", task["id"], "conductor")
    event = town.channel.events(1)[0]
    assert (event["event"], event["task"], event["agent"]) == ("task_assigned", task["id"], w.id)

    api_task = w.assign("second", priority="urgent")
    assert w.inbox()[0].body["task_id"] == api_task.id  # the urgent assignment is read first
    assert town.channel.task_counts() == {"assigned": 2}
    assert [t.id for t in town.tasks(agent="w1")] == [task["id"], api_task.id]


def test_assign_to_unknown_agent_leaves_nothing_behind(town):
    with pytest.raises(AgentNotFound):
        town.assign("ghost", "lost work")
    fail_cli("assign", "ghost", "lost work")
    assert town.tasks() == [] and town.channel.task_counts() == {}


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
    assert town.channel.task_counts() == {"assigned": 3, "cancelled": 1}


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
    load = town.channel._load_task_in
    raced = []

    def claim_in_between(client, task_id):  # a claim lands inside remove's WATCH window
        if not raced:
            raced.append(None)
            raced[0] = town.channel.claim(task.id, w.id)
        return load(client, task_id)
    monkeypatch.setattr(town.channel, "_load_task_in", claim_in_between)
    with pytest.raises(InvalidTransition, match="not in the backlog"):
        town.backlog_remove(task.id)
    assert raced[0].state == "assigned" and town.task(task.id).state == "assigned"


# -- completion --

def test_completing_a_terminal_task_changes_and_counts_nothing(town):
    w = worker(town)
    task = w.assign("do it")
    done = tt_json("task", "complete", task.id, "--result", "done")
    assert (done["state"], done["result"]) == ("completed", "done")
    snapshot = (town.task(task.id).to_dict(), town.channel.task_counts(), w.record().tasks_completed)
    assert snapshot[1:] == ({"completed": 1}, 1)

    for argv in (("complete", task.id, "--result", "again"), ("fail", task.id, "--error", "x"),
                 ("cancel", task.id)):
        assert tt_json("task", *argv)["state"] == "completed"
    assert town.complete_task(task.id, "api").result == "done"
    assert town.fail_task(task.id, "late").state == "completed"
    assert (town.task(task.id).to_dict(), town.channel.task_counts(),
            w.record().tasks_completed) == snapshot
    assert [e["event"] for e in town.channel.events(100) if e.get("task") == task.id] == [
        "task_assigned", "task_completed"]


def test_complete_fail_cancel_from_pending_leave_the_backlog_and_wait_reports(town):
    completed, failed, cancelled, open_ = (town.backlog_add(d).id for d in "abcd")
    assert tt_json("task", "complete", completed)["state"] == "completed"
    assert tt_json("task", "fail", failed, "--error", "broken")["result"] == "broken"
    assert tt_json("task", "cancel", cancelled)["state"] == "cancelled"
    assert [t.id for t in town.backlog()] == [open_]
    assert town.channel.task_counts() == {"completed": 1, "failed": 1, "cancelled": 1, "pending": 1}

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
    assert town.channel.task_counts() == {"completed": 1}
    assert w.record().tasks_completed == 1
    assert sum(e["event"] == "task_completed" for e in town.channel.events(100)) == 1


def test_racing_complete_and_fail_leave_exactly_one_terminal_state(town):
    task = town.backlog_add("raced")
    run_together(8, lambda i: (town.complete_task if i % 2 else town.fail_task)(task.id, "x"))
    counts = town.channel.task_counts()
    assert sum(counts.values()) == 1 and set(counts) == {town.task(task.id).state}


def test_concurrent_claims_of_one_backlog_task_have_one_winner(town):
    workers = [worker(town, f"w{i}") for i in range(8)]
    task = town.backlog_add("only one gets it")
    results = run_together(8, lambda i: town.claim(task.id, f"w{i}"))
    winners = [r for r in results if isinstance(r, tinytown.Task)]
    assert len(winners) == 1 and all(isinstance(r, InvalidTransition) for r in results if r not in winners)
    assert sum(w.inbox_len() for w in workers) == 1
    assert town.task(task.id).assigned_to == winners[0].assigned_to
    assert town.channel.task_counts() == {"assigned": 1} and town.backlog() == []


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
            assert tt_json("reset", "--force")["deleted"] == preview["would_delete"]
            assert list(town.redis.scan_iter(match=town.keys.prefix + "*")) == []
            assert other_keys() == before
            assert theirs.inbox_len() == 1 and other.channel.task_counts() == {"assigned": 1}
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
        with pytest.raises(SpawnError, match="restart"):
            worker(again, "w1")  # the name still belongs to the stopped agent


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
    assert (entry["name"], entry["state"], entry["dead"]) == ("w1", "starting", False)
    assert entry["pending"] == {"info": 1, "task_assign": 1, "query": 1}
    assert status["tasks"] == {"assigned": 1, "pending": 1}
    assert (status["backlog"], status["conductor_inbox"]) == (1, 1)

    town.channel.take(w.id, limit=2)
    assert tt_json("status")["agents"][0]["pending"] == {"processing": 2, "query": 1}

    events = tt_json("events", "--count", "3")
    assert [e["event"] for e in events] == ["message", "task_created", "message"]
    assert all(e["id"] and e["at"].endswith("Z") for e in events)
    assert events == town.channel.events(3)
    mine = tt_json("history", "-n", "50", "--agent", "w1")
    assert [e["event"] for e in mine] == ["agent_spawned", "task_assigned", "message", "message"]


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
