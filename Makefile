.PHONY: install test test-fast lint format bench
install:
	pip install -e '.[test]'
test:
	pytest
test-fast:
	pytest -m "not slow"
lint:
	ruff check . && ruff format --check . && mypy bridge
format:
	ruff format . && ruff check --fix .
bench:
	python bench/ingest_http.py
