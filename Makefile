# Two entry points, both self-contained on a fresh clone:
#   make demo   -> builds .venv and runs `ilora demo` on the embedded synthetic default
#   make test   -> builds .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/ilora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build that lies on local disk; the project's
	# range (>=2.11,<2.14) is then already satisfied and pip pulls no CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(BIN)/ilora

venv: $(BIN)/ilora

demo: venv
	$(BIN)/ilora demo

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
