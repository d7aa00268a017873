# The two commands of the README:  make run  (the app + the sandbox portal)  and  make test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
SANDBOX_PORT ?= 8100
SANDBOX_OAUTH_PORT ?= 8101
# The sandbox's own app credentials: they exist only inside the fake portal on this machine.
SANDBOX_CLIENT_ID := app.sandbox000000001.00000001
SANDBOX_CLIENT_SECRET := sandbox-client-secret-not-a-real-one
# The sandbox portal is the same portal at every start, so db.sqlite3 keeps one row for it: a
# fixed, made-up member_id, and in SANDBOX_STATE (gitignored) its application_token and the
# tokens it issued, so those the app stored still work after a restart.
SANDBOX_MEMBER_ID := 5a4db0c5000000000000000000000001
SANDBOX_STATE := .sandbox-portal.json

.PHONY: run test install install-dev install-bench env lint lock bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Installs are exact: requirements/*.txt lock what pyproject.toml's ranges resolved to when the
# tests last passed. `make lock` writes them again after a dependency changes.
install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/base.txt
	$(BIN)/pip install --quiet --no-deps -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .

LOCK_VENV := .venv-lock
LOCK := $(LOCK_VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || \
		{ $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet pip-tools; }
	$(LOCK) --output-file requirements/base.txt pyproject.toml
	$(LOCK) --extra dev --output-file requirements/dev.txt pyproject.toml

# A .env with a fresh secret key for local runs; an existing .env is never touched.
env: $(BIN)/python
	@if [ ! -f .env ]; then \
		{ echo "# Written by 'make run' for local use. See .env.example for every variable."; \
		  echo "DJANGO_DEBUG=true"; \
		  echo "DJANGO_SECRET_KEY=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(50))')"; \
		} > .env; echo "Wrote .env with a fresh DJANGO_SECRET_KEY"; fi

run: install env
	$(BIN)/python manage.py migrate --noinput
	@if [ -n "$$B24_CLIENT_ID" ] || grep -qE '^B24_CLIENT_ID=.+' .env; then \
		echo "B24_CLIENT_ID is set: serving real Bitrix24 portals on http://localhost:$(PORT)/"; \
		exec $(BIN)/python manage.py runserver $(PORT); \
	fi; \
	export B24_CLIENT_ID=$(SANDBOX_CLIENT_ID) B24_CLIENT_SECRET=$(SANDBOX_CLIENT_SECRET) \
		B24_OAUTH_SERVERS=http://127.0.0.1:$(SANDBOX_OAUTH_PORT) B24_ALLOW_PRIVATE_PORTALS=true \
		B24_APP_URL=http://localhost:$(PORT); \
	$(BIN)/python -m tests.fakeportal --app-url http://localhost:$(PORT) \
		--port $(SANDBOX_PORT) --oauth-port $(SANDBOX_OAUTH_PORT) \
		--client-id $$B24_CLIENT_ID --client-secret $$B24_CLIENT_SECRET \
		--member-id $(SANDBOX_MEMBER_ID) --state $(SANDBOX_STATE) & sandbox=$$!; \
	trap 'kill $$sandbox 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python manage.py runserver $(PORT)

# The suite runs in parallel (TEST_WORKERS pytest-xdist workers: most tests wait on sockets and
# timers, not on the CPU), then the few tests marked `alone` run by themselves: they measure
# pacing or latency in real time, which other tests' load would move. Exit status 5 is "no test
# selected" (PYTEST_ARGS naming files without such tests).
TEST_WORKERS ?= 4
test: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk 2 -m "not alone" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m alone $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install-bench: install-dev
	$(BIN)/pip install --quiet -c requirements/dev.txt -e '.[dev,bench]'

bench: install-bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache staticfiles *.egg-info
