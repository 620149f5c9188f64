# The two commands of the README. Both set up the environment first (idempotent).
.PHONY: demo test bootstrap lint
PY := .venv/bin/python

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/tuneloop demo

test: bootstrap
	bash scripts/test.sh

lint: bootstrap
	.venv/bin/ruff check dags plugins tasks serving tests bench
