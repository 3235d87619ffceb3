# Entry points. Everything runs from .venv, created from the system Python 3.11
# (the Triton Python-backend stub links the system libpython3.11; a venv made from
# another 3.11 build breaks `import ssl` inside models).
SYSTEM_PYTHON ?= /usr/bin/python3.11
VENV          := .venv
PY            := $(VENV)/bin/python
STAMP         := $(VENV)/.installed

HTTP_PORT    ?= 8000
GRPC_PORT    ?= 8001
METRICS_PORT ?= 8002
KEYRING      ?= build/keys/keyring.json
AUDIT_DIR    ?= build/audit
CALIB_DIR    ?=
EVAL_DIR     ?=

.PHONY: venv engines bench-engines keys serve demo test loadtest bench clean

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Source model -> pruned -> CPU variant (+ TensorRT engines where TensorRT and a GPU exist).
engines: $(STAMP)
	$(PY) -m build_engines $(if $(CALIB_DIR),--calib-dir $(CALIB_DIR)) $(if $(EVAL_DIR),--eval-dir $(EVAL_DIR))

bench-engines: engines
	$(PY) -m build_engines.bench

keys: $(STAMP)
	$(PY) -m rtinfer.keyring init $(KEYRING)

serve: engines keys
	$(PY) -m rtinfer.server --model-repository model_repository --keyring $(KEYRING) --audit-dir $(AUDIT_DIR) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: engines keys
	$(PY) -m clients.demo --keyring $(KEYRING) --audit-dir $(AUDIT_DIR)

test: engines
	$(PY) -m pytest -q

clean:
	rm -rf build model_repository/*/1/*.onnx model_repository/*/1/*.plan model_repository/*/1/*.json
