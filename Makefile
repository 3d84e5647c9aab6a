# The two commands of the README. Both create what they need on first use.
.PHONY: run test

# The main job: a local GPU cluster, the operator, the examples Ready. Ctrl-C stops it all.
run:
	@scripts/bootstrap
	.venv/bin/modelyard dev up

# Everything CI checks: lint, types, import contracts, then every test tier.
test:
	@scripts/bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy
	PYTHONPATH=.import-root .venv/bin/lint-imports
	.venv/bin/python -m pytest
