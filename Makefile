# medray: `make demo` sets up and runs the embedded default; `make test` sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medray-installed

.PHONY: setup system-deps demo lint test test-fast bench bench-modalities proto clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned in every later call, so nothing upgrades it (see shared/STACK.md)
	$(BIN)/pip install -q torch==2.9.1 torchvision==0.24.1
	$(BIN)/pip install -q torch==2.9.1 torchvision==0.24.1 -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/medray demo

lint: $(STAMP)
	$(BIN)/ruff check medray tests benchmarks
	$(BIN)/ruff format --check medray tests benchmarks
	$(BIN)/mypy

# The tests' real PACS: Orthanc with its DICOMweb plugin, and the browser that opens the reports:
# Chromium, from Debian's packages (each skipped where present).
system-deps:
	@command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
	  { (apt-get update -q || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb; }
	@command -v chromium >/dev/null || \
	  { (apt-get update -q || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest tests -q --timeout=900 --durations=25

# medray/serve/proto/*_pb2.py(i) from the .proto, with the protoc of the grpcio that ray[serve] pins
# (in a throwaway venv: grpcio-tools is not a dependency of medray)
proto: $(STAMP)
	$(PY) -m venv /tmp/medray-protoc
	/tmp/medray-protoc/bin/pip install -q "grpcio-tools==$$($(BIN)/python -c 'import grpc; print(grpc.__version__)')"
	/tmp/medray-protoc/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. medray/serve/proto/embeddings.proto

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/embed_pipeline.py

bench-modalities: $(STAMP)
	$(BIN)/python benchmarks/modalities.py

clean:
	rm -rf .medray
