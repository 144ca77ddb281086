# Treaty's developer tasks. `make test` is the test command CI runs (through .ci/run).
GO      ?= go
GOBIN   ?= $(shell $(GO) env GOPATH)/bin
# Core packages run under the race detector; the rest (long broker and benchmark tests) without.
CORE    := ./pkg/... ./sdk/... ./internal/engine/... ./internal/store/... ./internal/invoke/... \
           ./internal/app/... ./internal/migrate/... ./internal/server/... ./internal/cli/...
export TREATY_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable

.PHONY: test test-core test-rest lint generate tools bench bench-saga bench-outbox build fuzz

build:
	$(GO) build ./...

test: lint test-core test-rest

test-core:
	$(GO) test -count=1 -race -timeout 15m $(CORE)

test-rest:
	$(GO) test -count=1 -timeout 15m $$($(GO) list ./... | grep -v -E '/(pkg|sdk|internal/(engine|store|invoke|app|migrate|server|cli))(/|$$)')

# A short run of the request-validation fuzzer (FUZZTIME=5m for longer). Its seed corpus,
# internal/server/testdata/fuzz/FuzzSubmitSaga, runs with every `go test` of the package; add any
# input the fuzzer finds failing there.
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzSubmitSaga$$' -fuzztime $(FUZZTIME) ./internal/server/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Regenerate api/ (Go code, and treaty.binpb: descriptors with comments for reflection) and the
# travel-booking example's services from the .proto files with buf and the Go plugins (installed
# by `make tools`). The example has its own buf.yaml and buf.gen.yaml.
generate: tools
	PATH="$(GOBIN):$$PATH" buf generate
	# The API's descriptors with source info (comments), embedded for gRPC reflection.
	PATH="$(GOBIN):$$PATH" buf build -o api/treaty/v1/treaty.binpb
	cd examples/travel-booking && PATH="$(GOBIN):$$PATH" buf generate

tools:
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
	$(GO) install github.com/bufbuild/buf/cmd/buf@v1.75.0

bench: bench-saga bench-outbox

bench-saga:
	$(GO) run ./cmd/treaty-bench saga --steps 3 --concurrency 32 --duration 20s --db "$(TREATY_TEST_DATABASE_URL)"

bench-outbox:
	$(GO) run ./cmd/treaty-bench outbox --messages 200000 --keys 1000 --relays 1 --db "$(TREATY_TEST_DATABASE_URL)"
