# Tessera: `make run` starts the whole grid on this machine, `make test` runs
# every module's tests. See README.md.

MODULES  := pkg schemas services/registry services/planner services/router services/executor services/settlement .
SERVICES := registry planner router executor settlement
GO       ?= go
BIN      := bin

.PHONY: all build run demo test bench fuzz chaos vet clean

all: build

## build: every binary into bin/ (one per service, and the tessera CLI)
build:
	@mkdir -p $(BIN)
	@for s in $(SERVICES); do \
		(cd services/$$s && $(GO) build -o ../../$(BIN)/tessera-$$s ./cmd/tessera-$$s) || exit 1; \
	done
	$(GO) build -o $(BIN)/tessera ./cmd/tessera
	$(GO) build -o $(BIN)/tessera-accounts ./deploy/cmd/tessera-accounts
	@ls $(BIN)

## run: set up (modules, ClickHouse), start the grid, demo completion, then serve on 127.0.0.1:8080
run: build
	scripts/run.sh

## demo: as run, but exit 0 after the demo completion and usage printout
demo: build
	scripts/run.sh --demo

## test: every module's tests with -race (ClickHouse-backed ones included)
test:
	scripts/clickhouse.sh ensure
	@for m in $(MODULES); do \
		echo "== go test $$m"; \
		(cd $$m && $(GO) test -race -count=1 ./...) || exit 1; \
	done

## chaos: the fault test alone, verbose: a 3-server NATS cluster, every service as a
## process, ClickHouse; kills a NATS server, an executor and settlement under load
## and prints what it killed and verified (it also runs in make test)
chaos:
	scripts/clickhouse.sh ensure
	$(GO) test ./e2e/chaos -run TestChaos -count=1 -v

## vet: go vet in every module
vet:
	@for m in $(MODULES); do (cd $$m && $(GO) vet ./...) || exit 1; done

## bench: benchmarks; figures go to bench/results.json (see BENCHMARKS.md)
bench: build
	scripts/bench.sh

## fuzz: a short run of every fuzz target (FUZZTIME each, default 30s)
fuzz:
	scripts/fuzz.sh

clean:
	rm -rf $(BIN) var
