# `make demo` and `make test` set everything up on a fresh machine:
#   .venv       the project with the newest transformers (scripts/setup_env.sh)
#   .venv-vllm  vLLM for CPU, which pins an older transformers (scripts/setup_vllm_env.sh)
.PHONY: setup demo test test-fast bench clean

VENV_STAMP := .venv/.vlm_prune_installed
VLLM_STAMP := .venv-vllm/.vlm_prune_installed

$(VENV_STAMP): pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $(VENV_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt scripts/setup_vllm_env.sh
	bash scripts/setup_vllm_env.sh
	touch $(VLLM_STAMP)

setup: $(VENV_STAMP) $(VLLM_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/vlm-prune demo

test: $(VENV_STAMP) $(VLLM_STAMP)
	.venv/bin/python -m pytest -q

test-fast: $(VENV_STAMP)
	.venv/bin/python -m pytest -q -m "not slow"

bench: $(VENV_STAMP)
	.venv/bin/vlm-prune bench

clean:
	rm -rf .venv .venv-vllm build *.egg-info
