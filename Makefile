# The two commands of the README. Both install what they need first.
.PHONY: setup setup-test setup-docs demo test docs lint

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

setup-docs:
	bash scripts/setup.sh --docs

# Synthesise a corpus, distil a student from the shipped teacher, evaluate all (< 15 min on 2 cores).
demo: setup
	OMP_WAIT_POLICY=PASSIVE .venv/bin/speech-kd demo --out demo_run

# Lint, then the whole test suite (unit, doctests, integration) on 2 workers; the export tests may not skip here.
test: setup-test
	.venv/bin/ruff check speech_kd tests recipes scripts
	.venv/bin/ruff format --check speech_kd tests recipes scripts
	SPEECH_KD_REQUIRE_EXPORT=1 OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --doctest-modules speech_kd tests -q

# The API reference from the docstrings (Sphinx, warnings are errors) into docs/_build/html,
# and docs/cli.md from the argparse definitions.
docs: setup-docs
	COLUMNS=100 .venv/bin/python scripts/cli_reference.py
	rm -rf docs/api docs/_build
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"
