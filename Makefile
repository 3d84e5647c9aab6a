# The README's two commands are `make run` and `make test`; both create what they need
# first: scripts/bootstrap (Debian packages, .venv), then scripts/prepare.py (the pinned
# Kubernetes, Helm and Prometheus builds, with progress, before any test's timeout runs).
# The other targets are for development (docs/development.md).
.PHONY: run test check bench generate prepare

# The main job: a local GPU cluster, the operator, the examples Ready. Ctrl-C stops it all.
run:
	@scripts/bootstrap
	@.venv/bin/python scripts/prepare.py cluster
	.venv/bin/modelyard dev up

# Everything CI checks: lint, types, import contracts, then every test tier, on two
# pytest-xdist workers: most tests wait on a control loop, so two keep both cores busy
# (tests/conftest.py groups what must share a worker and hands out the longest first).
test:
	@scripts/bootstrap
	@.venv/bin/python scripts/prepare.py
	.venv/bin/ruff check .
	.venv/bin/mypy
	PYTHONPATH=.import-root .venv/bin/lint-imports
	.venv/bin/python -m pytest -n 2

# The fast loop (about a minute): lint, types, import contracts and the unit tests.
check:
	@scripts/bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy
	PYTHONPATH=.import-root .venv/bin/lint-imports
	.venv/bin/python -m pytest tests/unit -q

# Only the slow builds that `make test` does first (nothing is run).
prepare:
	@scripts/bootstrap
	@.venv/bin/python scripts/prepare.py

# The benchmarks (about 30 minutes on 2 cores; they assert nothing): the serving runtime
# against the raw PyTorch limit and its peers, then autoscaling and the cold start on the
# local cluster. Results go to bench/results/.
bench:
	@scripts/bootstrap
	@.venv/bin/python scripts/prepare.py cluster
	.venv/bin/python -m bench.runtime
	.venv/bin/python -m bench.autoscale

# Regenerate the generated files from their sources (the unit tests fail while they drift):
# the CRD (crds/ and the chart's copy) from the pydantic models, and docs/reference.md.
generate:
	@scripts/bootstrap
	.venv/bin/python -m modelyard.operator.crd
	.venv/bin/python -m modelyard.operator.reference
