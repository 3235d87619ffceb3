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
# Labeled photos (ImageNet names) for accuracy-based choices; used when present, never committed.
LABELED_DIR  ?= $(wildcard ../shared/imagenet-sample-dev)

.PHONY: venv engines engines-quick bench-engines keys serve demo test loadtest bench clean evaluate

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Source model -> pruned -> CPU variant (+ TensorRT engines where TensorRT and a GPU exist).
engines: $(STAMP)
	$(PY) -m build_engines $(if $(LABELED_DIR),--labeled-dir $(LABELED_DIR)) \
	  $(if $(CALIB_DIR),--calib-dir $(CALIB_DIR)) $(if $(EVAL_DIR),--eval-dir $(EVAL_DIR))

# The plain export, installed only if no full build's variant is: what `make demo` waits for.
engines-quick: $(STAMP)
	$(PY) -m build_engines --quick

bench-engines: engines
	$(PY) -m build_engines.bench

keys: $(STAMP)
	$(PY) -m rtinfer.keyring init $(KEYRING)

# Security options of `make serve` (empty = off): API_KEY_FILE (inference needs the key),
# ADMIN_KEY_FILE (model repository, shared memory, statistics, trace, logging need it),
# TLS_CERT + TLS_KEY (gRPC over TLS), TLS_CLIENT_CA (mutual TLS). Audit checkpoints are
# signed with AUDIT_SIGNING_KEY (created on first use; AUDIT_SIGNING_KEY= to turn off).
API_KEY_FILE      ?=
ADMIN_KEY_FILE    ?=
TLS_CERT          ?=
TLS_KEY           ?=
TLS_CLIENT_CA     ?=
AUDIT_SIGNING_KEY ?= build/keys/audit-signing.pem

serve: engines keys
	$(if $(AUDIT_SIGNING_KEY),$(PY) -m rtinfer.checkpoint keygen $(AUDIT_SIGNING_KEY))
	$(PY) -m rtinfer.server --model-repository model_repository --keyring $(KEYRING) --audit-dir $(AUDIT_DIR) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	  $(if $(AUDIT_SIGNING_KEY),--audit-signing-key $(AUDIT_SIGNING_KEY)) \
	  $(if $(API_KEY_FILE),--api-key-file $(API_KEY_FILE)) $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) \
	  $(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(if $(TLS_CLIENT_CA),--tls-client-ca $(TLS_CLIENT_CA))

demo: engines-quick keys
	$(PY) -m clients.demo --keyring $(KEYRING) --audit-dir $(AUDIT_DIR)

test: engines
	$(PY) -m pytest -q

# Locust load test of the pipeline (own server on free loopback ports unless LOADTEST_TARGET
# gives "--grpc H:P --http H:P --metrics URL"), per-stage breakdown, SLO check (fails on a miss).
# STEP=1: rising users to find the knee. Reports in build/loadtest/.
USERS      ?= 8
SPAWN_RATE ?= 4
DURATION   ?= 60s
SLO        ?= loadtest/slo.toml
STEP       ?=
LOADTEST_TARGET ?=
LOADTEST_OUT    ?= build/loadtest
loadtest: engines keys
	$(PY) -m loadtest.run --keyring $(KEYRING) --out $(LOADTEST_OUT) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
	  --slo $(SLO) $(if $(STEP),--step) $(LOADTEST_TARGET)

# Side by side, one run: bare ONNX Runtime, the Triton pipeline (gRPC, HTTP), the FastAPI baseline.
# Reports in build/bench/ (bench.json, bench.md, bench.png).
BENCH_LEVELS  ?= 1,2,4,8,16
BENCH_SECONDS ?= 6
bench: engines keys
	$(PY) -m loadtest.bench --keyring $(KEYRING) --levels $(BENCH_LEVELS) --seconds $(BENCH_SECONDS)

clean:
	rm -rf build model_repository/*/1/*.onnx model_repository/*/1/*.plan model_repository/*/1/*.json
