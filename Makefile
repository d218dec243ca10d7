# Two commands for a fresh machine (both create .venv themselves):
#   make quickstart   install everything, then run the main job on the built-in digits
#                     (1 to 10 minutes on 2 cores after the install; make quickstart EPOCHS=30 for a shorter run)
#   make test         install everything, then run the test suite
PY ?= python3
# Where torch comes from. Empty: pip's own configuration. On a machine whose pip does not offer a
# CPU-only torch, a plain `pip install torch==2.13.0` fetches the multi-GB CUDA build; to get the
# CPU build there: make TORCH_INDEX=https://download.pytorch.org/whl/cpu quickstart
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint proto clean

$(STAMP): pyproject.toml
	@echo "install [1/3]: creating $(VENV) (first run only; about 1-3 minutes in all)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "install [2/3]: torch 2.13.0$(if $(TORCH_INDEX), from $(TORCH_INDEX))"
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build (see TORCH_INDEX above).
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "install [3/3]: zspace and its dependencies (ONNX Runtime, FAISS, gRPC, ...)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/zspace quickstart $(if $(EPOCHS),--epochs $(EPOCHS))

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Regenerate zspace/v1 and zspace/kserve from proto/ (the committed generated code; a test fails on drift).
# grpcio-tools is pinned (dev extra) to 1.75.1: its protobuf 6.31 gencode imports under protobuf 6 and 7.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
	  proto/zspace/v1/zspace.proto proto/zspace/kserve/grpc_service.proto

clean:
	rm -rf $(VENV) runs models indexes
