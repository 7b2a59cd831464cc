# The README's two commands: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bundled install provision images general

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[edge,edge-sd,hub,general,bench,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedge-hub demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The OS tools the tests drive for real (Mosquitto, Prometheus, a compose client, podman with runc and
# debootstrap, openssl): installed as root when missing, else named with the command that installs them.
provision:
	bash tools/provision.sh

test: provision lint
	$(BIN)/python -m pytest -q

# fedge-edge and fedge-hub (CPU) images, with podman or Docker: tools/images.sh [edge] [hub-cpu] [hub-cuda]
images:
	bash tools/images.sh

bench-quick: $(STAMP)
	$(BIN)/python -m bench.encode
	$(BIN)/python -m bench.fgl --quick

bench: $(STAMP)
	$(BIN)/python -m bench.encode
	$(BIN)/python -m bench.fgl

# Rebuild the committed foundation models (digits about 12 min, mnist about 25 min on 2 cores).
bundled: $(STAMP)
	$(BIN)/fedge-hub foundation train --dataset digits --out bundled/digits
	$(BIN)/fedge-hub foundation train --dataset mnist --out bundled/mnist

# The general edge encoder bundle (docs/general-encoder.md), built outside the repository (about 20 s on 2 cores).
GENERAL_OUT ?= $(HOME)/.cache/fedge/bundles/general
general: $(STAMP)
	$(BIN)/python -m hub.foundation.general --out $(GENERAL_OUT)
