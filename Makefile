# `make demo` and `make test` set everything up on a fresh machine (a .venv in the repo root).
.PHONY: setup demo test bench clean

VENV_STAMP := .venv/.vlm_prune_installed

$(VENV_STAMP): pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/vlm-prune demo

test: $(VENV_STAMP)
	.venv/bin/python -m pytest -q

bench: $(VENV_STAMP)
	.venv/bin/vlm-prune bench

clean:
	rm -rf .venv build *.egg-info
