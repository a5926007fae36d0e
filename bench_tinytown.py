"""Performance targets of SPEC section 10, each a ratio against a raw baseline, and the
cost curves (Redis commands and wall time per operation as the town grows).

Every figure is the median of several repetitions, measured in the same run on the
same machine and Redis as its baseline.  Prints tables and writes bench_results.json.
`python bench_tinytown.py [--quick] [--only P1,P2,C1,C2,C3,G,S]`; TINYTOWN_BENCH_QUICK=1 is
--quick (smaller sizes, shorter windows: not the figures the targets are judged on).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import redis

import tinytown
from tinytown import Message, Task, Town

MODULE = str(Path(tinytown.__file__).resolve())
REPEATS = 5


def median_of(fn, repeats=REPEATS):
    return statistics.median(fn() for _ in range(repeats))


def _timed_ms(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def paired(ours, raw, repeats=REPEATS):
    """Medians of both, measured alternately, so a noisy neighbour hits both alike."""
    samples = [(ours(), raw()) for _ in range(repeats)]
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.root = Path(tempfile.mkdtemp(prefix="tt-bench-"))
        os.environ.pop("REDIS_URL", None)
        self.town = Town.init(self.root / "town", "bench", max_agents=100, agent={"heartbeat_secs": 5})
        self.client = self.town.redis
        self.results: list[dict] = []
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            print("note: PYTHONDONTWRITEBYTECODE is set: every process compiles tinytown.py anew"
                  " (`make bench` unsets it)")

    def close(self):
        self.town.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def record(self, pid, what, value, baseline, target, unit="ms", note=""):
        ratio = value / baseline if baseline else float("nan")
        self.results.append({"id": pid, "what": what, "value": round(value, 4),
                             "baseline": round(baseline, 4), "unit": unit, "ratio": round(ratio, 2),
                             "target": target, "met": ratio <= target, "note": note})
        print(f"{pid:<3} {what:<58} {value:>9.3f} {unit:<3} vs {baseline:>9.3f} {unit:<3}"
              f" = {ratio:5.2f}x (target <= {target}x) {'ok' if ratio <= target else 'MISSED'}"
              f"{'  ' + note if note else ''}", flush=True)

    # P1 ----------------------------------------------------------------------
    def p1_round_trip(self):
        n = 500 if self.quick else 2000
        channel = self.town.channel
        agent = self.town.spawn_agent("p1", "demo", start=False)
        blob = Message(type="task", to=agent.id, body={"description": "x" * 100}).to_json()

        def raw():
            start = time.perf_counter()
            for _ in range(n):
                self.client.rpush("bench:raw", blob)
                self.client.blpop(["bench:raw"], timeout=1)
            return (time.perf_counter() - start) / n * 1000

        def ours():
            start = time.perf_counter()
            for _ in range(n):
                channel.send(Message(type="task", to=agent.id, body={"description": "x" * 100}))
                channel.receive(agent.id, timeout=1)
            return (time.perf_counter() - start) / n * 1000

        self.record("P1", "send -> receive round trip (Channel vs RPUSH+BLPOP)",
                    *paired(ours, raw, 7), 1.5)

    # P2 ----------------------------------------------------------------------
    def p2_wake_up(self):
        n = 20 if self.quick else 50
        # Baseline: a child process answering BLPOP ping-pong; one-way = round trip / 2.
        child = subprocess.Popen([sys.executable, "-c", (
            "import redis,sys\n"
            f"r = redis.Redis(unix_socket_path={str(self.town.server.socket_path)!r})\n"
            "while True:\n"
            "    _, v = r.blpop(['bench:ping'])\n"
            "    if v == b'quit': break\n"
            "    r.rpush('bench:pong', v)\n")])

        def raw():
            start = time.perf_counter()
            for _ in range(n):
                self.client.rpush("bench:ping", "x")
                self.client.blpop(["bench:pong"], timeout=5)
            return (time.perf_counter() - start) / n / 2 * 1000

        baseline = median_of(raw)
        self.client.rpush("bench:ping", "quit")
        child.wait(10)

        config_path = self.town.root / "tinytown.toml"
        tinytown.set_config_value(config_path, "agent_clis.noop.command", "true")
        tinytown.set_config_value(config_path, "agent.max_rounds", 100000)
        town = Town(self.town.root)
        agent = town.spawn_agent("p2", "noop")
        self._wait_state(town, agent.id, "idle")
        observed = []
        value = median_of(lambda: self._wake_up_ms(town, agent.id, n, observed), 3)
        town.kill_agent(agent.id)
        town.wait_agent(agent.id, 30)
        town.release()
        town.close()
        self.record("P2", "wake-up: send -> idle loop's round starts (vs BLPOP one-way)",
                    value, baseline, 3.0,
                    note=f"seen by another client's XREAD after {statistics.median(observed):.2f} ms")

    def _wake_up_ms(self, town, agent_id, n, observed):
        """Median ms from a send to the idle loop's round starting.  The round starts when the
        loop's take marks it `working`; that event carries the loop's own timestamp (same
        clock), so the XREAD that sees it is not counted."""
        samples = []
        for _ in range(n):
            self._wait_state(town, agent_id, "idle")
            after = town.channel.last_event_id()
            sent_at = time.time()
            start = time.perf_counter()
            town.channel.send(Message(type="task", to=agent_id, body={"description": "go"}))
            while True:
                reply = town.redis.xread({town.keys.events: after}, block=5000)
                entries = reply[0][1] if reply else []
                after = entries[-1][0] if entries else after
                working = [e for _, e in entries if e.get("event") == "agent_working"]
                if working:
                    observed.append((time.perf_counter() - start) * 1000)
                    at = datetime.fromisoformat(working[0]["at"].replace("Z", "+00:00"))
                    samples.append((at.timestamp() - sent_at) * 1000)
                    break
        return statistics.median(samples)

    def _wait_state(self, town, agent_id, state, timeout=30):
        deadline = time.monotonic() + timeout
        while town.channel.get_agent(agent_id).state != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent never became {state}")
            time.sleep(0.005)

    # P3 ----------------------------------------------------------------------
    def p3_list(self):
        for i in range(10):
            self.town.spawn_agent(f"p3-{i}", "demo", start=False)

        def timed(argv):
            def once():
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                return (time.perf_counter() - start) * 1000
            once()  # warm the page cache
            return once

        ours = timed([sys.executable, "-m", "tinytown", "-t", str(self.town.root), "list"])  # as `tt`
        baseline = timed([sys.executable, "-c", "import redis"])
        self.record("P3", "`tt list` wall time, 10 agents (vs python -c 'import redis')",
                    *paired(ours, baseline, 9), 1.25)

    # P4 ----------------------------------------------------------------------
    def p4_status(self):
        agents_n, tasks_n = (200, 20_000) if self.quick else (1000, 100_000)
        keys = tinytown.Keys("big")
        pipe = self.client.pipeline(transaction=False)
        ids = []
        for i in range(agents_n):
            agent = tinytown.Agent(id=str(uuid.uuid4()), name=f"a{i}", state="idle", cli="demo",
                                   created_at=tinytown._now())
            ids.append(agent.id)
            pipe.hset(keys.agent(agent.id), mapping=tinytown._to_hash(agent))
            pipe.hset(keys.agents, agent.name, agent.id)
        for i in range(tasks_n):
            task = Task(description=f"task {i}", state="completed", assigned_to=ids[i % agents_n])
            pipe.hset(keys.task(task.id), mapping=tinytown._to_hash(task))
            pipe.zadd(keys.tasks, {task.id: i})
            if i % 5000 == 0:
                pipe.execute()
        pipe.hset(keys.task_counts, "completed", tasks_n)
        pipe.execute()
        root = self.root / "big"
        root.mkdir()
        (root / "tinytown.toml").write_text('name = "big"\n')
        url = f"unix://{self.town.server.socket_path}"
        env = {**os.environ, "REDIS_URL": url}

        def raw():
            start = time.perf_counter()
            client = redis.Redis(unix_socket_path=str(self.town.server.socket_path), decode_responses=True)
            names = client.hgetall(keys.agents)
            pipe = client.pipeline(transaction=False)
            for agent_id in names.values():
                pipe.hgetall(keys.agent(agent_id))
            json.dumps(pipe.execute())
            return (time.perf_counter() - start) * 1000

        def ours():
            os.environ["REDIS_URL"] = url
            try:
                start = time.perf_counter()
                with Town(root) as town:
                    json.dumps(town.status(), default=str)
                return (time.perf_counter() - start) * 1000
            finally:
                os.environ.pop("REDIS_URL")

        value, baseline = median_of(ours), median_of(raw)
        wall = median_of(lambda: self._wall([sys.executable, MODULE, "-t", str(root), "status", "--json"], env), 3)
        self.record("P4", f"status, {agents_n} agents + {tasks_n} tasks (vs raw pipelined fetch)",
                    value, baseline, 3.0, note=f"`tt status --json` wall {wall:.0f} ms")

    @staticmethod
    def _wall(argv, env):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        return (time.perf_counter() - start) * 1000

    # P5 ----------------------------------------------------------------------
    def p5_idle_commands(self):
        seconds = 20 if self.quick else 60
        folder = self.root / "p5"
        with Town.init(folder, "p5", agent={"heartbeat_secs": 5}) as town:  # its own server
            agent = town.spawn_agent("idle", "demo")
            self._wait_state(town, agent.id, "idle")
            time.sleep(1)
            town.redis.config_resetstat()
            time.sleep(seconds)
            stats = town.redis.info("commandstats")
            calls = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))
            per_minute = calls * 60 / seconds
            town.kill_agent(agent.id)
        # The anchor polls several times a second: call that 3/s = 180 a minute.
        self.record("P5", f"Redis commands of one idle loop per minute (measured {seconds}s)",
                    per_minute, 30, 1.0, unit="cmd", note="baseline = the 30/min budget")

    # P6 ----------------------------------------------------------------------
    def p6_drain(self):
        agents_n, tasks_n = 8, (200 if self.quick else 2000)
        folder = self.root / "p6"
        with Town.init(folder, "p6", max_agents=10, agent={"max_rounds": 100000}) as town:
            # Bare cost: the demo CLI itself on a one-task prompt, outside any loop.
            env = {**os.environ, "TINYTOWN_TOWN": str(folder), "TINYTOWN_AGENT_NAME": "bare"}

            def bare():
                task = town.task_store.create(Task(description="bare task"))  # in no queue
                prompt = tinytown.build_prompt(town, tinytown.Agent(id="x", name="bare"), [
                    Message(type="task_assign", to="x", body={"task_id": task.id, "description": "bare"})], 1)
                start = time.perf_counter()
                subprocess.run([sys.executable, MODULE, "demo-agent"], input=prompt.encode(),
                               env=env, check=True, stdout=subprocess.DEVNULL)
                return (time.perf_counter() - start) * 1000

            bare_ms = median_of(bare)
            for i in range(tasks_n):
                town.backlog_add(f"job {i}")
            start = time.perf_counter()
            for i in range(agents_n):
                town.spawn_agent(f"w{i}", "demo")
            while town.task_store.task_counts().get("completed", 0) < tasks_n + REPEATS:
                town.redis.blpop(["bench:never"], timeout=0.5)
            wall = time.perf_counter() - start
            rounds = sum(a.rounds_completed for a in town.list_agents())
        # 8 loops share 2 cores: per round, the machine spent wall * cores / rounds.
        cores = os.cpu_count() or 1
        per_round = wall * 1000 * min(cores, agents_n) / rounds
        self.record("P6", f"{agents_n} demo agents drain {tasks_n} tasks: cost per round",
                    per_round, bare_ms, 2.0,
                    note=f"{rounds} rounds in {wall:.1f}s; baseline = the demo CLI run alone")

    # P7 ----------------------------------------------------------------------
    def _bare_redis_start(self):
        """ms from starting a bare redis-server (our persistence settings) to its first PING."""
        folder = Path(tempfile.mkdtemp(dir=self.root))
        sock = folder / "r.sock"
        start = time.perf_counter()
        subprocess.run([str(tinytown.find_redis_server()), "-"], stdout=subprocess.DEVNULL, input=(
            f"daemonize yes\nport 0\nunixsocket {sock}\ndir {folder}\npidfile {folder}/r.pid\n"
            f"logfile {folder}/r.log\nappendonly yes\nappendfsync everysec\nsave \"\"\n"),
            text=True, check=True)
        client = redis.Redis(unix_socket_path=str(sock))
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.002)
        elapsed = (time.perf_counter() - start) * 1000
        pid = int((folder / "r.pid").read_text())
        client.shutdown(nosave=True)
        tinytown._wait_for_exit(pid, 10)  # as Town.close() does: no server dies during the next run
        return elapsed

    def p7_init(self):
        bare = self._bare_redis_start

        def ours():
            folder = Path(tempfile.mkdtemp(dir=self.root))
            start = time.perf_counter()
            town = Town.init(folder, "p7")
            elapsed = (time.perf_counter() - start) * 1000
            town.close()
            return elapsed

        self.record("P7", "Town.init to ready (vs bare redis-server start-to-PING)",
                    *paired(ours, bare, 7), 1.5)

    # H1 ----------------------------------------------------------------------
    def h1_heal(self):
        """A managed redis-server SIGKILLed (as the OOM killer would) under an idle demo
        agent: its loop starts one again; ms from the kill to the new server's PING."""
        town = Town.init(Path(tempfile.mkdtemp(dir=self.root)), "h1")
        agent = town.spawn_agent("w1", "demo")
        self._wait_state(town, agent.id, "idle")
        server = town.server

        def ours():
            time.sleep(0.3)  # the loop back in its BLPOP
            old = server.read_pid()
            start = time.perf_counter()
            os.kill(old, 9)
            while not (server.read_pid() not in (None, old) and server.ping(loaded=True)):
                time.sleep(0.0005)
            return (time.perf_counter() - start) * 1000

        try:
            self.record("H1", "crashed Redis answers again, started by its loop",
                        *paired(ours, self._bare_redis_start), 3.0, note="vs a bare start-to-PING")
            alive = town.agent("w1").record()
            assert alive.alive and alive.state == "idle", alive
        finally:
            town.kill_agent("w1")
            town.close()

    # P8 ----------------------------------------------------------------------
    def p8_rss(self):
        def rss_kb(pid):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
            return 0

        bare = subprocess.Popen([sys.executable, "-c", (
            "import redis, time\n"
            f"r = redis.Redis(unix_socket_path={str(self.town.server.socket_path)!r}); r.ping()\n"
            "time.sleep(30)\n")])
        agent = self.town.spawn_agent("p8", "demo")
        self._wait_state(self.town, agent.id, "idle")
        time.sleep(1)
        pid = int(self.town.channel.get_agent(agent.id).pid)
        ours, baseline = rss_kb(pid) / 1024, rss_kb(bare.pid) / 1024
        bare.kill()
        bare.wait()
        self.town.kill_agent(agent.id)
        self.record("P8", "RSS of one idle agent loop (vs python + redis idle)", ours, baseline,
                    1.3, unit="MiB")


    # Cost curves -------------------------------------------------------------
    def _commands(self, client):
        return sum(v["calls"] for v in client.info("commandstats").values())

    def _cost(self, client, action, repeats=7):
        """(Redis commands, wall ms) of one `action()`: medians, the INFO calls left out."""
        action()  # scripts loaded, caches warm
        commands, times = [], []
        for _ in range(repeats):
            before = self._commands(client)
            start = time.perf_counter()
            action()
            times.append((time.perf_counter() - start) * 1000)
            commands.append(self._commands(client) - before - 1)
        return statistics.median(commands), statistics.median(times)

    def _populate(self, town, tasks_n, agents_n):
        """A town of `agents_n` idle agents (role `worker`, 3 messages in each inbox) and
        `tasks_n` tasks: 90% in the backlog tagged for another role, the rest assigned and
        finished."""
        pipe = town.redis.pipeline(transaction=False)
        ids = []
        for i in range(agents_n):
            agent = tinytown.Agent(id=str(uuid.uuid4()), name=f"a{i}", role="worker", state="idle",
                                   cli="demo", created_at=tinytown._now())
            ids.append(agent.id)
            pipe.hset(town.keys.agent(agent.id), mapping=tinytown._to_hash(agent))
            pipe.hset(town.keys.agents, agent.name, agent.id)
            pipe.sadd(town.keys.role("worker"), agent.id)
            pipe.set(town.keys.alive(agent.id), "bench@nowhere")
            for j in range(3):
                town.channel._push(pipe, Message(type="info", to=agent.id, body={"summary": f"note {j}"}))
        pipe.execute()
        pipe = town.redis.pipeline(transaction=False)
        for i in range(tasks_n):
            if i % 10:
                town.task_store.queue_create(pipe, Task(description=f"ops job {i}", tags=["ops"]), backlog=True)
            else:
                task = Task(description=f"done {i}", state="completed", assigned_to=ids[i % agents_n])
                town.task_store.queue_create(pipe, task, backlog=False)
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()
        return ids

    def cost_curves(self):
        """C1: each hot operation's Redis commands and wall time over a grid of town sizes."""
        task_sizes, agent_sizes = (1_000, 10_000, 100_000), (10, 100, 1_000)
        if self.quick:
            task_sizes, agent_sizes = (1_000, 10_000), (10, 100)
        folder = self.root / "curves"
        ops = ("claim", "assign", "send", "task current", "status --json", "list", "scaling")
        grid = {}
        with Town.init(folder, "curves", max_agents=100_000) as town:
            for tasks_n in task_sizes:
                for agents_n in agent_sizes:
                    town.reset(force=True)
                    self._populate(town, tasks_n, agents_n)
                    grid[tasks_n, agents_n] = row = self._measure_ops(town, folder, agents_n)
                    print(f"C1  {tasks_n:>7,} tasks {agents_n:>5,} agents  " + "  ".join(
                        f"{op} {row[op]['commands']:g} cmd {row[op]['ms']:.2f} ms" for op in ops), flush=True)
            town.reset(force=True)
        small, large = (task_sizes[0], agent_sizes[0]), (task_sizes[-1], agent_sizes[-1])
        for op in ops:
            listing = op in ("status --json", "list", "scaling")  # they read every agent: O(agents) by nature
            if listing:  # tasks grow at a fixed agent count; agents grow: cost per agent shown
                by_tasks = [grid[t, a][op] for a in agent_sizes for t in (task_sizes[0], task_sizes[-1])]
                growth_cmd = max(by_tasks[i + 1]["commands"] / by_tasks[i]["commands"] for i in range(0, len(by_tasks), 2))
                growth_ms = max(by_tasks[i + 1]["ms"] / by_tasks[i]["ms"] for i in range(0, len(by_tasks), 2))
                per_agent = [grid[t, a][op]["ms"] / a for t in task_sizes for a in agent_sizes]
                note = (f"vs tasks at a fixed agent count; per listed agent {min(per_agent):.3f}"
                        f"-{max(per_agent):.3f} ms")
            else:
                growth_cmd = grid[large][op]["commands"] / grid[small][op]["commands"]
                growth_ms = grid[large][op]["ms"] / grid[small][op]["ms"]
                note = ""
            met = growth_cmd < 1.5 and growth_ms < 1.5
            self.results.append({"id": "C1", "what": op,
                                 "curve": {f"{t} tasks, {a} agents": grid[t, a][op] for t, a in grid},
                                 "growth_commands": round(growth_cmd, 2), "growth_ms": round(growth_ms, 2),
                                 "target": 1.5, "met": met, "note": note})
            print(f"C1  {op:<14} growth smallest -> largest: commands {growth_cmd:.2f}x, wall"
                  f" {growth_ms:.2f}x (target < 1.5x) {'ok' if met else 'MISSED'}  {note}", flush=True)

    def _measure_ops(self, town, folder, agents_n):
        dev = town.spawn_agent("dev", "demo", role="dev", start=False)
        town.channel.set_agent_state(dev.id, "idle")
        target = f"a{agents_n // 2}"

        def cli(*argv):
            with contextlib.redirect_stdout(io.StringIO()):
                assert tinytown.main(["-t", str(folder), *argv, "--json"]) == 0
        actions = {
            "assign": lambda: town.assign(target, "more work"),
            "send": lambda: town.send(target, "hello"),
            "task current": lambda: cli("task", "current", target),
            "status --json": lambda: cli("status"),
            "list": lambda: cli("list"),
            "scaling": town.scaling,  # what an autoscaler polls (/api/v1/scaling)
        }
        row = {}
        commands, ms = self._claim_cost(town, dev.id)  # the backlog_add behind it is not its cost
        row["claim"] = {"commands": commands, "ms": round(ms, 3)}
        for op, action in actions.items():
            commands, ms = self._cost(town.redis, action)
            row[op] = {"commands": commands, "ms": round(ms, 3)}
        return row

    def _claim_cost(self, town, agent_id, repeats=7):
        for _ in range(repeats + 1):
            town.backlog_add("for dev", tags=["dev"])
        town.task_store.claim(None, agent_id)
        commands, times = [], []
        for _ in range(repeats):
            before = self._commands(town.redis)
            start = time.perf_counter()
            assert town.task_store.claim(None, agent_id, sender=agent_id)
            times.append((time.perf_counter() - start) * 1000)
            commands.append(self._commands(town.redis) - before - 1)
        return statistics.median(commands), statistics.median(times)

    def p6_curve(self):
        """C2: P6's per-round cost with 1 / 4 / 8 / 16 demo agents."""
        tasks_n = 60 if self.quick else 400
        rows = []
        for agents_n in (1, 4, 8, 16):
            folder = self.root / f"c2-{agents_n}"
            with Town.init(folder, f"c2-{agents_n}", max_agents=20, agent={"max_rounds": 100000}) as town:
                for i in range(tasks_n):
                    town.backlog_add(f"job {i}")
                start = time.perf_counter()
                for i in range(agents_n):
                    town.spawn_agent(f"w{i}", "demo")
                while town.task_store.task_counts().get("completed", 0) < tasks_n:
                    town.redis.blpop(["bench:never"], timeout=0.5)
                wall = time.perf_counter() - start
                rounds = sum(a.rounds_completed for a in town.list_agents())
                for agent in town.list_agents():
                    town.kill_agent(agent.id)
                per_round = wall * 1000 * min(os.cpu_count() or 1, agents_n) / rounds
                rows.append({"agents": agents_n, "rounds": rounds, "wall_s": round(wall, 1),
                             "ms_per_round": round(per_round, 1)})
                print(f"C2  {agents_n:>2} demo agents drain {tasks_n} tasks: {rounds} rounds in {wall:.1f}s,"
                      f" {per_round:.0f} ms of machine time per round", flush=True)
        growth = rows[-1]["ms_per_round"] / rows[0]["ms_per_round"]
        self.results.append({"id": "C2", "what": "P6 per-round cost by agents", "curve": rows,
                             "growth": round(growth, 2), "target": 1.5, "met": growth < 1.5})
        print(f"C2  per-round cost growth 1 -> 16 agents: {growth:.2f}x (target < 1.5x)"
              f" {'ok' if growth < 1.5 else 'MISSED'}", flush=True)

    def idle_loops(self):
        """C3: total RSS and CPU of 10 / 50 / 100 idle agent loops over 60 s."""
        seconds = float(os.environ.get("TINYTOWN_BENCH_IDLE_SECS") or (15 if self.quick else 60))
        ticks = os.sysconf("SC_CLK_TCK")
        rows = []
        for loops in (10, 50, 100):
            folder = self.root / f"c3-{loops}"
            with Town.init(folder, f"c3-{loops}", max_agents=200, agent={"heartbeat_secs": 5}) as town:
                agents = [town.spawn_agent(f"idle{i}", "demo") for i in range(loops)]
                for agent in agents:
                    self._wait_state(town, agent.id, "idle", timeout=120)
                time.sleep(2)  # start-up settled
                pids = [int(town.channel.get_agent(a.id).pid) for a in agents]

                def cpu_ticks(pids=pids):
                    total = 0
                    for pid in pids:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        total += int(fields[11]) + int(fields[12])  # utime + stime
                    return total
                before = cpu_ticks()
                time.sleep(seconds)
                cpu_share = (cpu_ticks() - before) / ticks / seconds * 100
                rss = sum(int(line.split()[1]) for pid in pids
                          for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:")) / 1024
                for agent in agents:
                    town.kill_agent(agent.id)
                for pid in pids:
                    tinytown._wait_for_exit(pid, 30)
            rows.append({"loops": loops, "rss_mib": round(rss, 1), "cpu_percent_of_a_core": round(cpu_share, 3)})
            print(f"C3  {loops:>3} idle loops over {seconds:g}s: RSS {rss:.0f} MiB in all"
                  f" ({rss / loops:.1f} each), CPU {cpu_share:.3f}% of one core", flush=True)
        met = rows[-1]["cpu_percent_of_a_core"] < 1.0
        self.results.append({"id": "C3", "what": "idle loops: total RSS and CPU", "curve": rows,
                             "seconds": seconds, "target": "100 loops < 1% of a core", "met": met})
        print(f"C3  100 idle loops: {rows[-1]['cpu_percent_of_a_core']:.3f}% of a core (target < 1%)"
              f" {'ok' if met else 'MISSED'}", flush=True)


    # G1, G2: the task graph ------------------------------------------------------
    def graph_costs(self):
        """G1: `tt sync push` of 10,000 entries, first and unchanged second push; G2: failing
        the head of a 100,000-task chain.  Each with its longest script (SLOWLOG) and the
        worst PING latency another client saw meanwhile."""
        entries = 2_000 if self.quick else 10_000
        chain = 20_000 if self.quick else 100_000
        with Town.init(self.root / "graph", "graph", max_agents=10) as town:
            town.spawn_agent("w1", "demo", start=False)
            path = town.root / "tasks.toml"
            path.write_text("".join(f'[[task]]\nid = "e{i}"\ndescription = "entry {i}"\nagent = "w1"\n'
                                    + (f'after = ["e{i - 1}"]\n' if i % 10 else "") + "\n" for i in range(entries)))
            rows = [("G1", f"sync push of {entries:,} entries, first", lambda: tinytown.sync_push(town, path)),
                    ("G1", f"sync push of {entries:,} entries, unchanged", lambda: tinytown.sync_push(town, path))]
            head = Task(description="head")

            def make_chain():
                pipe = town.redis.pipeline(transaction=False)
                town.task_store.queue_create(pipe, head, backlog=True)
                previous = head.id
                for i in range(chain):
                    task = Task(description=f"link {i}", after=[previous])
                    town.task_store.queue_create(pipe, task, backlog=True)
                    previous = task.id
                    if i % 5000 == 4999:
                        pipe.execute()
                pipe.execute()
            rows.append(("G2", f"fail the head of a {chain:,}-task chain",
                         lambda: (make_chain(), self._timed_with_pings(town, lambda: town.fail_task(head.id, "no")))))
            for gid, what, action in rows:
                if gid == "G2":
                    _, (seconds, longest, worst_ping) = action()
                else:
                    seconds, longest, worst_ping = self._timed_with_pings(town, action)
                self.results.append({"id": gid, "what": what, "seconds": round(seconds, 3),
                                     "longest_script_ms": round(longest, 2), "worst_ping_ms": round(worst_ping, 2)})
                print(f"{gid}  {what:<48} {seconds * 1000:>9.1f} ms; longest script {longest:7.2f} ms;"
                      f" worst PING meanwhile {worst_ping:7.2f} ms", flush=True)
            assert town.task_store.task_counts().get("failed", 0) == chain + 1

    def _timed_with_pings(self, town, action):
        """(seconds, the longest script in ms, the worst PING round trip in ms) of action()."""
        town.redis.config_set("slowlog-log-slower-than", 0)
        town.redis.config_set("slowlog-max-len", 100_000)
        town.redis.slowlog_reset()
        # Another client in a process of its own (a thread here would wait for our GIL):
        # PINGs until its stdin closes, then prints its worst round trip.
        pinger = subprocess.Popen([sys.executable, "-c", (
            "import redis, sys, threading, time\n"
            f"r = redis.Redis(unix_socket_path={str(town.server.socket_path)!r})\n"
            "done = threading.Event()\n"
            "threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()\n"
            "worst = 0.0\n"
            "while not done.is_set():\n"
            "    start = time.perf_counter()\n"
            "    try:\n"
            "        r.ping()\n"
            "    except redis.ResponseError:\n"
            "        pass  # BUSY: a script ran past lua-time-limit\n"
            "    worst = max(worst, time.perf_counter() - start)\n"
            "print(worst * 1000)\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # (it is connected and pinging)
        start = time.perf_counter()
        try:
            action()
        finally:
            seconds = time.perf_counter() - start
            worst = float(pinger.communicate("", timeout=60)[0])
        scripts = [entry["duration"] / 1000 for entry in town.redis.slowlog_get(100_000)
                   if str(entry["command"][:7]).upper().startswith(("EVALSHA", "B'EVALSH", "EVAL"))]
        town.redis.config_set("slowlog-log-slower-than", 10_000)
        return seconds, max(scripts, default=0.0), worst


    # S1-S3: tt serve ------------------------------------------------------------
    def beyond_one_server(self):
        """P1 and P2 with the town on one server over TCP, on a Redis Cluster and behind
        Sentinel (issue 19): each row against the one server's."""
        topologies = _Topologies(self.root / "topologies")
        n1, n2 = (300, 15) if self.quick else (1000, 40)
        try:
            rows = {}
            for label, redis_table in topologies.configs.items():
                name = f"b{len(rows)}"
                Town.init(self.root / name, name, redis=redis_table, max_agents=10,
                          agent={"heartbeat_secs": 5, "max_rounds": 100000}).close()
                tinytown.set_config_value(self.root / name / "tinytown.toml", "agent_clis.noop.command", "true")
                town = Town(self.root / name)
                agent = town.spawn_agent("sink", "demo", start=False)

                def round_trip(town=town, agent=agent):
                    start = time.perf_counter()
                    for _ in range(n1):
                        town.channel.send(Message(type="task", to=agent.id, body={"description": "x" * 100}))
                        town.channel.receive(agent.id, timeout=1)
                    return (time.perf_counter() - start) / n1 * 1000
                p1 = median_of(round_trip, 5)
                loop = town.spawn_agent("p2", "noop")
                self._wait_state(town, loop.id, "idle")
                p2 = median_of(lambda town=town, loop=loop: self._wake_up_ms(town, loop.id, n2, []), 3)
                if redis_table.get("wait_replicas"):  # what an acknowledged write costs more
                    p1 = median_of(lambda town=town: _timed_ms(town.confirm_replicated), 200)
                    p2 = median_of(lambda town=town: _timed_ms(town.redis.ping), 200)
                rows[label] = (p1, p2)
                town.kill_agent(loop.id)
                town.wait_agent(loop.id, 30)
                town.reset(force=True)
                town.close()
            base_p1, base_p2 = rows["one server (TCP)"]
            for label, (p1, p2) in rows.items():
                if "wait_replicas" in label:  # (p2 is a PING round trip there)
                    self.record("B3", "wait_replicas = 1: barrier + WAIT after a write (vs a PING)", p1,
                                p2, 10.0, note="no target: the price of the guarantee, per acknowledged write")
                    continue
                self.record("B1", f"P1 round trip, {label}", p1, base_p1, 3.0)
                self.record("B2", f"P2 wake-up, {label}", p2, base_p2, 3.0)
        finally:
            topologies.close()

    def serve_costs(self):
        """S1: GET /api/v1/status with 100 agents (p50, p99) over a kept connection; S2: an
        event's latency from XADD to an SSE client (p50); S3: a /metrics scrape at 1,000
        agents and 100,000 tasks."""
        import http.client
        requests_n, events_n = (100, 50) if self.quick else (500, 200)
        agents_n, tasks_n = (200, 20_000) if self.quick else (1_000, 100_000)
        with Town.init(self.root / "serve", "serve", max_agents=agents_n + 10) as town:
            for i in range(100):
                town.spawn_agent(f"s{i}", "demo", start=False)
            with self._serving(town) as (host, port):
                connection = http.client.HTTPConnection(host, port, timeout=60)
                samples = []
                for _ in range(requests_n):
                    start = time.perf_counter()
                    connection.request("GET", "/api/v1/status")
                    response = connection.getresponse()
                    assert response.status == 200 and len(json.loads(response.read())["agents"]) == 100
                    samples.append((time.perf_counter() - start) * 1000)
                self._serve_row("S1", "GET /api/v1/status, 100 agents", samples)

                stream = http.client.HTTPConnection(host, port, timeout=60)
                stream.request("GET", "/api/v1/events/stream")
                events = stream.getresponse()
                samples = []
                for i in range(events_n):
                    start = time.perf_counter()
                    town.send("s0", f"event {i}")
                    while not events.fp.readline().startswith(b"data: "):
                        pass
                    samples.append((time.perf_counter() - start) * 1000)
                stream.close()
                self._serve_row("S2", "event to SSE client (XADD -> data line read)", samples)

                for i in range(100, agents_n):
                    town.spawn_agent(f"s{i}", "demo", start=False)
                pipe = town.redis.pipeline(transaction=False)
                for i in range(tasks_n):
                    town.task_store.queue_create(pipe, Task(description=f"task {i}"), backlog=True)
                    if i % 5000 == 4999:
                        pipe.execute()
                pipe.execute()
                samples = []  # (a new connection: the reaper closed the one idle meanwhile)
                connection = http.client.HTTPConnection(host, port, timeout=60)
                for _ in range(5 if self.quick else 15):
                    start = time.perf_counter()
                    connection.request("GET", "/metrics")
                    text = connection.getresponse().read().decode()
                    samples.append((time.perf_counter() - start) * 1000)
                assert f'tinytown_tasks{{state="pending"}} {tasks_n}' in text
                self._serve_row("S3", f"GET /metrics, {agents_n:,} agents, {tasks_n:,} tasks", samples)
            town.reset(force=True)

    @contextlib.contextmanager
    def _serving(self, town):
        """A `tt serve` process for `town`: its (host, port)."""
        proc = subprocess.Popen([sys.executable, MODULE, "-t", str(town.root), "serve", "--port", "0"],
                                stderr=subprocess.PIPE, text=True)
        try:
            address = proc.stderr.readline().split("http://")[1].split("/")[0]
            host, port = address.rsplit(":", 1)
            yield host, int(port)
        finally:
            proc.terminate()
            proc.wait(10)

    def _serve_row(self, sid, what, samples_ms):
        ordered = sorted(samples_ms)
        p50, p99 = statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        self.results.append({"id": sid, "what": what, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                             "samples": len(ordered)})
        print(f"{sid}  {what:<58} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  ({len(ordered)} samples)", flush=True)


def _redis_on(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:port, answering."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(tinytown.find_redis_server()), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _free_port(spread: int = 0) -> int:
    """A free TCP port (and port + spread free too: a cluster node's bus)."""
    while True:
        port = random.randrange(20000, 45000)
        try:
            for candidate in {port, port + spread}:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
            return port
        except OSError:
            continue


class _Topologies:
    """One server over TCP, a three-master Redis Cluster, and a master + replica behind three
    sentinels, all on 127.0.0.1: the `[redis]` table of a town on each."""

    def __init__(self, root: Path):
        self.procs: list[subprocess.Popen] = []
        single = _free_port()
        self.procs.append(_redis_on(root / "single", single))
        ports = [_free_port(10000) for _ in range(3)]
        self.procs += [_redis_on(root / f"node{port}", port, "--cluster-enabled", "yes",
                                 "--cluster-config-file", "nodes.conf") for port in ports]
        nodes = [redis.Redis(port=port, decode_responses=True) for port in ports]
        for node, (low, high) in zip(nodes, ((0, 5460), (5461, 10922), (10923, 16383))):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(low, high + 1))
        for node in nodes[1:]:
            node.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        while not all(node.cluster("info")["cluster_state"] == "ok" and len(node.cluster("nodes")) == 3
                      for node in nodes):
            time.sleep(0.1)
        self.configs = {"one server (TCP)": {"url": f"redis://127.0.0.1:{single}"},
                        "Redis Cluster (3 masters)": {"url": f"redis://127.0.0.1:{ports[0]}", "cluster": True}}
        if shutil.which("redis-sentinel"):
            master, replica = _free_port(), _free_port()
            self.procs.append(_redis_on(root / "master", master))
            self.procs.append(_redis_on(root / "replica", replica, "--replicaof", "127.0.0.1", str(master)))
            sentinels = [_free_port() for _ in range(3)]
            for port in sentinels:
                conf = root / f"sentinel-{port}.conf"
                conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                                f"sentinel monitor tt 127.0.0.1 {master} 2\n")
                self.procs.append(subprocess.Popen([shutil.which("redis-sentinel"), str(conf)],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            while redis.Redis(port=replica, decode_responses=True).info("replication").get(
                    "master_link_status") != "up":
                time.sleep(0.1)
            for port in sentinels:
                while True:
                    try:
                        redis.Redis(port=port).ping()
                        break
                    except redis.ConnectionError:
                        time.sleep(0.05)
            self.configs["behind Sentinel (1 replica)"] = {
                "sentinels": [f"127.0.0.1:{port}" for port in sentinels], "master": "tt"}
            self.configs["behind Sentinel, wait_replicas = 1"] = {
                **self.configs["behind Sentinel (1 replica)"], "wait_replicas": 1}

    def close(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter windows")
    parser.add_argument("--only", help="comma-separated ids, e.g. P1,P3")
    parser.add_argument("--out", default="bench_results.json")
    args = parser.parse_args()
    args.quick = args.quick or bool(os.environ.get("TINYTOWN_BENCH_QUICK"))
    chosen = set((args.only or "P1,P2,P3,P4,P5,P6,P7,P8,H1,C1,C2,C3,G,S,B").upper().split(","))
    bench = Bench(args.quick)
    steps = {"P1": bench.p1_round_trip, "P2": bench.p2_wake_up, "P3": bench.p3_list,
             "P4": bench.p4_status, "P5": bench.p5_idle_commands, "P6": bench.p6_drain,
             "P7": bench.p7_init, "P8": bench.p8_rss, "H1": bench.h1_heal, "C1": bench.cost_curves,
             "C2": bench.p6_curve, "C3": bench.idle_loops, "G": bench.graph_costs,
             "S": bench.serve_costs, "B": bench.beyond_one_server}
    try:
        for key, step in steps.items():
            if key in chosen:
                step()
    finally:
        bench.close()
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}",
              "redis": ".".join(map(str, tinytown.redis_server_version(tinytown.find_redis_server()))),
              "quick": args.quick, "results": bench.results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
