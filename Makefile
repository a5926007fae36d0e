# Two commands on a fresh machine: `make demo` and `make test` (each builds .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TT := $(BIN)/python -m tinytown

.PHONY: demo test test-slow test-clis bench lint clean browser screenshot

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider test_tinytown.py

# Debian's chromium and its driver, for the dashboard's browser test, where apt works
# (elsewhere that one test is skipped, saying why).
browser:
	@command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; }; } || \
		echo "make: could not install chromium here; the dashboard's browser test will be skipped"

# The README's dashboard.png, taken by the browser test.
screenshot: $(STAMP) browser
	TINYTOWN_SCREENSHOT=$(abspath dashboard.png) $(BIN)/python -m pytest -q -p no:cacheprovider \
		test_tinytown.py -k test_serve_dashboard_in_a_real_browser

# The fault and chaos tests (a few minutes): random SIGKILLs, Redis outages; and the long
# fuzz of every door (TT_FUZZ_CASES per door, default 400; TT_FUZZ_SEED for another draw).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow -s test_tinytown.py

# The real agent CLIs (opt-in: it needs npm), pinned to the versions the README lists,
# installed into .cache/clis and run against a scripted model server on 127.0.0.1.
CLIS := .cache/clis
CLI_PACKAGES := @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 @google/gemini-cli@0.61.0 \
	opencode-ai@1.18.33 @github/copilot@1.0.102

test-clis: $(STAMP)
	npm install --prefix $(CLIS) --no-audit --no-fund --loglevel=error $(CLI_PACKAGES)
	TINYTOWN_CLIS_BIN=$(abspath $(CLIS))/node_modules/.bin \
		$(BIN)/python -m pytest -q -p no:cacheprovider -m clis -rA test_tinytown.py

# A throwaway town (a git repository): three demo agents, tasks assigned and completed, one
# backlog task claimed by an idle agent; then two worktree agents whose changes land on
# main; status, then everything stopped.
demo: $(STAMP)
	@set -e; town=$$(mktemp -d); tt="$(TT) -t $$town"; git="git -C $$town -c user.name=demo -c user.email=demo@example.com"; \
	trap '$$tt stop >/dev/null 2>&1 || true; rm -rf "$$town"' EXIT; \
	echo "== tt init --name demo-town"; $$tt init --name demo-town; \
	$$git init -q -b main; $$git add -A; $$git commit -q -m "the demo town"; \
	for name in alice bob carol; do $$tt spawn $$name --cli demo --max-rounds 5; done; \
	echo "== tt assign"; \
	t1=$$($$tt assign alice "Write the README intro"); \
	t2=$$($$tt assign bob "Add a unit test for the parser"); \
	t3=$$($$tt backlog add "Fix the typo in the docs"); \
	$$tt task list; \
	echo "== tt task wait"; \
	for t in $$t1 $$t2 $$t3; do $$tt task wait $$t --timeout 60; done; \
	echo "== landing: two worktree agents, each change tested, then main moved"; \
	$$tt config land.test "test -d demo" >/dev/null; \
	for name in dora eli; do $$tt spawn $$name --cli demo --worktree --max-rounds 1; done; \
	$$tt assign dora "Write the changelog" >/dev/null; $$tt assign eli "Add the licence file" >/dev/null; \
	for name in dora eli; do $$tt wait $$name --timeout 60 >/dev/null; done; \
	echo "== tt changes"; $$tt changes; \
	echo "== tt land --all"; $$tt land --all; \
	echo "== git log main"; $$git log --oneline main; \
	echo "== tt status"; $$tt status; \
	echo "== tt history"; $$tt history -n 12; \
	echo "== tt stop"; $$tt stop

bench: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python bench_tinytown.py

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/python -m ruff check --select E,F,W,B --ignore E501,E701,B905 tinytown.py test_tinytown.py bench_tinytown.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache __pycache__
