# Every target sets up its environment first (idempotent: a no-op once built).
PY := .venv/bin/python

.PHONY: venv demo test test-fast bench figures clean
venv:
	@bash scripts/ensure_venv.sh

demo: venv
	.venv/bin/attnmed reproduce

test: venv
	$(PY) -m pytest -m "slow or not slow"

test-fast: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/attention_scaling.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/recorder_overhead.py

figures: demo

clean:
	rm -rf .venv build *.egg-info
