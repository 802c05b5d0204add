# Every target sets up its environment first (idempotent: a no-op once built).
PY := .venv/bin/python

.PHONY: venv demo paper-grid lint format test test-fast bench figures figures-paper-grid clean
venv:
	@bash scripts/ensure_venv.sh

# The demo writes its figures and REPORT.md into its run folder under runs/ (printed at the end); figures/
# holds the committed reference run and is rewritten only by `make figures`.
demo: venv
	@echo "attnmed demo: writing into runs/ (figures/ holds the committed reference run; 'make figures' remakes it)"
	.venv/bin/attnmed reproduce

# ruff's formatter and linter, configured in pyproject.toml; `make format` applies what `make lint` asks for.
lint: venv
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: venv
	$(PY) -m pytest -m "slow or not slow"

test-fast: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/attention_scaling.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/recorder_overhead.py

figures: venv
	.venv/bin/attnmed reproduce --figures figures

# The study on the paper's 16×16 token grid on the textures (5 training seeds of the claims family, about 80 minutes on
# 2 idle cores; well under the 150-minute budget); figures/paper-grid holds its reference run.
paper-grid: venv
	.venv/bin/attnmed reproduce --preset paper-grid

figures-paper-grid: venv
	.venv/bin/attnmed reproduce --preset paper-grid --figures figures/paper-grid

clean:
	rm -rf .venv build *.egg-info
