# Two entry points, both self-contained on a fresh clone:
#   make demo   -> builds .venv and runs `ilora demo` on the embedded synthetic default
#   make test   -> builds .venv and runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Where torch comes from. Empty: pip's own configuration decides (CI's machines find the CPU build
# on local disk). On a machine whose pip reads PyPI, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# takes the CPU build instead of PyPI's multi-GB CUDA one.
TORCH_INDEX ?=

.PHONY: demo test venv clean

$(BIN)/ilora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned; the project's range (>=2.11,<2.14) is then already satisfied
	# and the second install pulls no other torch build.
	$(BIN)/pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $(BIN)/ilora

venv: $(BIN)/ilora

demo: venv
	$(BIN)/ilora demo

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
