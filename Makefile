# The two commands of the README. Both install what they need first.
.PHONY: setup setup-test demo test lint

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

# Synthesise a corpus, distil a student from the shipped teacher, evaluate all (< 15 min on 2 cores).
demo: setup
	OMP_WAIT_POLICY=PASSIVE .venv/bin/speech-kd demo --out demo_run

# Lint, then the whole test suite (unit, doctests, integration) on 2 workers.
test: setup-test
	.venv/bin/ruff check speech_kd tests recipes
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --doctest-modules speech_kd tests -q
