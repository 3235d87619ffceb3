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
# Distillation steps for the pruned student (docs/engines.md "Distillation and far pruning"); empty = off, e.g. DISTILL_STEPS=40.
DISTILL_STEPS ?=
# Its teacher: lite0 (the FP32 original, default) or lite2 (EfficientNet-Lite2, the cascade's big model).
DISTILL_TEACHER ?=
# The pruning curve's points: FLOPs reductions (sensitivity plans), e.g. 0.05,0.1,0.2,0.3 (the build's
# default when empty), and uniform fractions of each block's expanded channels kept (none by default).
DISTILL_FLOPS ?=
DISTILL_KEEP ?=
# Quantization-aware training steps per flavour (docs/engines.md "Quantization-aware training"); empty = the
# build's default, 0 = off.
QAT_STEPS ?=

.PHONY: help venv engines engines-quick bench-engines keys haproxy prometheus redis serve serve-direct demo test \
        test-unit lint loadtest bench bench-gateway bench-fleet clean evaluate observe serve-edge-cloud cascade-curve \
        protobuf-oracle fuzz-gateway test-distill
.DEFAULT_GOAL := help

# One line per target, from the `## ` comment on its rule's line.
help: ## this list (the default goal)
	@grep -E '^[a-zA-Z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

venv: $(STAMP) ## the Python environment in .venv (requirements.txt, from the system Python 3.11)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Source model -> pruned -> CPU variant (+ TensorRT engines where TensorRT and a GPU exist). Only this and
# `make test` run the full build; the other targets serve what is installed (engines-quick).
engines: $(STAMP) ## the full build: prune, quantize, measure, install the best variant, the cascade's big model (~25 min)
	$(PY) -m build_engines $(if $(LABELED_DIR),--labeled-dir $(LABELED_DIR)) \
	  $(if $(DISTILL_STEPS),--distill-steps $(DISTILL_STEPS)) $(if $(DISTILL_TEACHER),--distill-teacher $(DISTILL_TEACHER)) \
	  $(if $(DISTILL_FLOPS),--distill-flops $(DISTILL_FLOPS)) $(if $(DISTILL_KEEP),--distill-keep $(DISTILL_KEEP)) $(if $(QAT_STEPS),--qat-steps $(QAT_STEPS)) \
	  $(if $(CALIB_DIR),--calib-dir $(CALIB_DIR)) $(if $(EVAL_DIR),--eval-dir $(EVAL_DIR))

# The plain export, installed only if no intact variant is (a full build's is kept): what `make demo` and the
# serving targets wait for. It says which variant is served and how to build a better one (build_engines.installed).
engines-quick: $(STAMP) ## install the plain FP32 export unless a variant is installed (~1 min); say which is served
	$(PY) -m build_engines --quick

# Measures what `make engines` built (and says so when it has not run); builds nothing.
bench-engines: $(STAMP) ## the full build's original vs pruned vs installed variant, side by side
	$(PY) -m build_engines.bench

keys: $(STAMP) ## a keyring for sealed requests (KEYRING, build/keys/keyring.json)
	$(PY) -m rtinfer.keyring init $(KEYRING)

# The gateway (deploy/gateway/, HAProxy 2.6+ with Lua): installed with apt-get when missing
# and we are root, otherwise make stops and says how to install it.
haproxy: ## check HAProxy 2.6+ with Lua (apt-get install when root)
	@deploy/gateway/require-haproxy.sh

# Monitoring (deploy/prometheus/): Prometheus 2.x and promtool, installed with apt-get when missing
# and we are root, otherwise make stops and says how to install them.
prometheus: ## check Prometheus 2.x and promtool (apt-get install when root)
	@deploy/prometheus/require-prometheus.sh

# The fleet's shared replay store (deploy/redis/, docs/scaling.md): redis-server 7, installed with
# apt-get when missing and we are root, otherwise make stops and says how to install it. One box
# (make demo, make serve) needs none: its replay store is SQLite.
redis: ## check redis-server 7 (apt-get install when root)
	@deploy/redis/require-redis.sh

# Security options of `make serve` (empty = off): API_KEY_FILE (inference needs the key),
# ADMIN_KEY_FILE (model repository, shared memory, statistics, trace, logging need it),
# TLS_CERT + TLS_KEY (TLS on the gateway's HTTP and gRPC ports; serve-direct: gRPC only),
# TLS_CLIENT_CA (mutual TLS), RATE_LIMIT (requests per 10 s per client address, gateway only).
# Audit checkpoints are signed with AUDIT_SIGNING_KEY (created on first use; AUDIT_SIGNING_KEY= to turn off).
API_KEY_FILE      ?=
ADMIN_KEY_FILE    ?=
TLS_CERT          ?=
TLS_KEY           ?=
TLS_CLIENT_CA     ?=
RATE_LIMIT        ?=
AUDIT_SIGNING_KEY ?= build/keys/audit-signing.pem
# The gateway listens on GATEWAY_HOST:HTTP_PORT/GRPC_PORT/METRICS_PORT (0.0.0.0 for all
# interfaces); Triton listens on 127.0.0.1 only, on the TRITON_*_PORT behind it.
GATEWAY_HOST        ?= 127.0.0.1
TRITON_HTTP_PORT    ?= 18000
TRITON_GRPC_PORT    ?= 18001
TRITON_METRICS_PORT ?= 18002
SERVE_COMMON = --model-repository model_repository --keyring $(KEYRING) --audit-dir $(AUDIT_DIR) \
	  $(if $(AUDIT_SIGNING_KEY),--audit-signing-key $(AUDIT_SIGNING_KEY)) \
	  $(if $(API_KEY_FILE),--api-key-file $(API_KEY_FILE)) $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) \
	  $(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(if $(TLS_CLIENT_CA),--tls-client-ca $(TLS_CLIENT_CA))

# REPLICAS=N (N > 1, docs/scaling.md): N Triton replicas behind the gateway, balanced per request, ids
# r1..rN on TRITON_*_PORT + 10 (i - 1), audit directories $(FLEET_AUDIT_DIR)/<id> (verify the fleet with
# python -m rtinfer.audit verify $(FLEET_AUDIT_DIR)), one Redis in build/redis started with them as the
# shared replay store (installed by `make redis` when missing). REPLICAS=1: one Triton, SQLite, no Redis.
# kill -HUP <pid of python -m rtinfer.launch.gateway>: rolling restart (each replica drained, restarted, re-enabled).
REPLICAS        ?= 1
FLEET_AUDIT_DIR ?= build/audit-fleet
FLEET = $(filter-out 0 1,$(REPLICAS))

# The gateway in front of Triton: only the pipelines are reachable, on both protocols. It serves the installed
# variant (make engines-quick says which), and the cascade once `make engines` has built its big model.
serve: engines-quick keys haproxy $(if $(FLEET),redis) ## the gateway in front of Triton, serving what is installed (REPLICAS=N: a fleet)
	$(if $(AUDIT_SIGNING_KEY),$(PY) -m rtinfer.checkpoint keygen $(AUDIT_SIGNING_KEY))
	models=$$($(PY) -m build_engines.installed --models) && \
	$(PY) -m rtinfer.launch.gateway $(SERVE_COMMON) --host $(GATEWAY_HOST) --model $$models \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	  --triton-http-port $(TRITON_HTTP_PORT) --triton-grpc-port $(TRITON_GRPC_PORT) \
	  --triton-metrics-port $(TRITON_METRICS_PORT) $(if $(RATE_LIMIT),--rate-limit $(RATE_LIMIT)) \
	  --replicas $(REPLICAS) $(if $(FLEET),--audit-dir $(FLEET_AUDIT_DIR))

# Development only: the embedded server without the gateway (every loaded model reachable).
serve-direct: engines-quick keys ## Triton without the gateway, every loaded model reachable (development only)
	$(if $(AUDIT_SIGNING_KEY),$(PY) -m rtinfer.checkpoint keygen $(AUDIT_SIGNING_KEY))
	$(PY) -m rtinfer.launch.server $(SERVE_COMMON) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: engines-quick keys ## start the server, classify two sample photos over gRPC and HTTP, verify the audit trail
	$(PY) -m clients.demo --keyring $(KEYRING) --audit-dir $(AUDIT_DIR)

# The C++ protobuf parser the gateway's reader is proved against (tests/test_gateway_differential.py).
protobuf-oracle: ## check the C++ protobuf toolchain the gateway's differential test needs
	@tests/oracle/require-toolchain.sh

# The full suite, as CI runs it (.ci/run): lint, the full build, then every test but `distill`.
test: lint engines haproxy prometheus redis protobuf-oracle ## lint, the full build, every test (what CI runs)
	$(PY) -m pytest -q

# The inner loop: the tests that need no build and no server (not marked `integration`: tests/conftest.py marks
# them from their source), in under 3 minutes on 2 cores.
test-unit: $(STAMP) haproxy prometheus redis protobuf-oracle ## the tests that need no build and no server (< 3 min)
	$(PY) -m pytest -q -m "not integration and not distill"

# ruff, pinned in requirements.txt, configured in pyproject.toml [tool.ruff].
lint: $(STAMP) ## ruff check
	$(PY) -m ruff check .

# The build's distillation against its recorded figures (tests marked `distill`, which make test leaves out:
# distillation is off by default): builds with DISTILL_STEPS (40 unless set), then runs them.
test-distill: $(STAMP) ## build with distillation (DISTILL_STEPS, 40 unless set), then check it
	$(MAKE) engines DISTILL_STEPS=$(or $(DISTILL_STEPS),40)
	$(PY) -m pytest -q -m distill

# The gateway's differential test, longer and from a new seed each time (make test runs 20,000 cases
# from a fixed one): FUZZ_CASES generated gRPC messages against C++ and Python protobuf.
FUZZ_CASES ?= 500000
fuzz-gateway: $(STAMP) protobuf-oracle ## the gateway's differential test, FUZZ_CASES cases from a new seed
	GATEWAY_DIFF_CASES=$(FUZZ_CASES) GATEWAY_DIFF_SEED=$${GATEWAY_DIFF_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')} \
	  $(PY) -m pytest -q tests/test_gateway_differential.py -k agrees

# The cascade (docs/cascade.md "Remote cloud"): an edge and a cloud Triton on loopback (cloud: gRPC + TLS, its own
# inference key, the edge's service key in its keyring); the edge's gRPC/HTTP on GRPC_PORT/HTTP_PORT.
serve-edge-cloud: engines-quick keys ## an edge and a cloud Triton on loopback (the cascade: needs `make engines`)
	$(PY) -m build_engines.installed --require-cascade
	$(PY) -m rtinfer.launch.edge_cloud --keyring $(KEYRING) --edge-grpc-port $(GRPC_PORT) --edge-http-port $(HTTP_PORT)

# The cascade's trade-off on the labeled photos: top-1, share escalated (offline, every threshold) and
# latency through a real server (a few thresholds); chooses the threshold on the choose split.
# Writes build/cascade/cascade_curve.{json,md,png}.
cascade-curve: engines-quick ## the cascade's top-1 vs share escalated vs latency (needs `make engines`, LABELED_DIR)
	$(if $(LABELED_DIR),,$(error LABELED_DIR is empty: point it at labeled photos (<wnid>_*.JPEG)))
	$(PY) -m build_engines.installed --require-cascade
	$(PY) -m clients.cascade_curve --data $(LABELED_DIR)

# Accuracy of the served pipeline, end to end (sealed requests through a server of its own), on the
# labeled photos' confirm split, next to the original FP32 model offline. Writes build/accuracy/served.json.
evaluate: engines-quick keys ## served top-1, end to end, next to the FP32 model offline (LABELED_DIR)
	$(if $(LABELED_DIR),,$(error LABELED_DIR is empty: point it at labeled photos (<wnid>_*.JPEG)))
	$(PY) -m clients.evaluate --data $(LABELED_DIR) --split confirm --keyring $(KEYRING) \
	  --reference build/engines/source/model.onnx

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
loadtest: engines-quick keys ## Locust against the pipeline, per-stage breakdown, SLO check
	$(PY) -m loadtest.run --keyring $(KEYRING) --out $(LOADTEST_OUT) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
	  --slo $(SLO) $(if $(STEP),--step) $(LOADTEST_TARGET)

# Side by side, one run: bare ONNX Runtime, the Triton pipeline through the gateway (gRPC, HTTP), the
# FastAPI baseline; one client's p50/p99 and the breakdown of one request. Reports in build/bench/
# (bench.json, bench.md, bench.png, breakdown.png); docs/performance.md "Benchmark" is regenerated from it.
BENCH_LEVELS  ?= 1,2,4,8,16
BENCH_SECONDS ?= 6
bench: engines-quick keys haproxy ## bare ONNX Runtime vs the pipeline through the gateway vs FastAPI, one run
	$(PY) -m loadtest.bench --keyring $(KEYRING) --levels $(BENCH_LEVELS) --seconds $(BENCH_SECONDS) --doc

# NVIDIA's perf_analyzer (tritonclient 2.50.0's, unpacked from pinned wheels by deploy/perf_analyzer/) through the
# gateway over HTTP, against its own Triton and gateway on free loopback ports: PA_REQUESTS requests per level of
# PA_CONCURRENCY, each with its own sealed envelope; PA_ENVELOPES fewer than the requests stops it before perf_analyzer
# would replay one. JSON, table and CSV in build/perf_analyzer/ (docs/performance.md "perf_analyzer").
PA_CONCURRENCY ?= 1,2
PA_REQUESTS    ?= 500
PA_ENVELOPES   ?=
.PHONY: perf-analyzer
perf-analyzer: engines-quick keys haproxy ## NVIDIA's perf_analyzer through the gateway (HTTP), one sealed envelope per request
	$(PY) -m loadtest.perf_analyzer --keyring $(KEYRING) --concurrency $(PA_CONCURRENCY) --requests $(PA_REQUESTS) \
	  $(if $(PA_ENVELOPES),--envelopes $(PA_ENVELOPES))

# Monitoring, for real (docs/monitoring.md "make observe"): Triton + gateway + Prometheus (rules time-compressed) on
# loopback, clean Locust load, a valid surge, then injected abuse; prints the alerts that fired and
# writes $(OBSERVE_OUT)/alerts.json and observe.png. Fails when an expected alert did not fire or
# one fired on clean traffic. OBSERVE_ARGS: e.g. --clean-s 30 --surge-s 0 --attack-s 30 (see --help).
OBSERVE_OUT  ?= build/observe
OBSERVE_ARGS ?=
observe: engines-quick haproxy prometheus ## Triton + gateway + Prometheus under clean load, a surge, then abuse
	$(PY) -m rtinfer.launch.observe --out $(OBSERVE_OUT) $(OBSERVE_ARGS)

# The fleet's costs (docs/scaling.md "Measured"), one run: one client's p50 with the Redis replay store vs
# SQLite (two servers, requests interleaved), and saturated throughput through the gateway with 1 vs 2
# replicas (alternating rounds of BENCH_FLEET_SECONDS). JSON, table and plot in build/bench-fleet/.
BENCH_FLEET_REQUESTS ?= 300
BENCH_FLEET_SECONDS  ?= 15
BENCH_FLEET_ROUNDS   ?= 2
BENCH_FLEET_CLIENTS  ?= 8
bench-fleet: engines-quick keys haproxy redis ## the fleet's costs: Redis vs SQLite p50, 1 vs 2 replicas
	$(PY) -m loadtest.fleet_bench --keyring $(KEYRING) --requests $(BENCH_FLEET_REQUESTS) \
	  --seconds $(BENCH_FLEET_SECONDS) --rounds $(BENCH_FLEET_ROUNDS) --clients $(BENCH_FLEET_CLIENTS) --out build/bench-fleet

# One client's latency through the gateway vs straight to Triton (interleaved), gRPC and HTTP.
GATEWAY_REQUESTS ?= 300
bench-gateway: engines-quick keys haproxy ## one client's latency through the gateway vs straight to Triton
	$(PY) -m loadtest.gateway_overhead --keyring $(KEYRING) --requests $(GATEWAY_REQUESTS)

clean: ## remove build/ and what the builds installed in model_repository/
	rm -rf build model_repository/*/1/*.onnx model_repository/*/1/*.plan model_repository/*/1/*.json
