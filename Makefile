.PHONY: demo test setup

# Install into .venv and run the embedded demo: SCALE under DeepSpeed ZeRO-3, 2 CPU ranks.
demo:
	scripts/setup.sh
	scripts/demo.sh

# Install the test extras and run the whole suite.
test:
	scripts/setup.sh test
	.venv/bin/python -m pytest -q tests

setup:
	scripts/setup.sh test
