# bulkhead: the two commands are `make demo` (the operator on the local testbed) and `make test`.
.PHONY: demo test up down crds lint bench build

demo:
	scripts/demo

test:
	scripts/test

build:
	cargo build --locked

up:
	testbed/up

down:
	@pidfile=$${BULKHEAD_TESTBED_DIR:-/tmp/bulkhead-testbed}/pids/operator.pid; \
	if [ -f $$pidfile ] && kill $$(cat $$pidfile) 2>/dev/null; then echo "operator stopped"; fi; \
	rm -f $$pidfile
	testbed/down

crds:
	cargo run --quiet --locked -- crd > crds/bulkhead.dev.yaml
	cp crds/bulkhead.dev.yaml charts/bulkhead/crds/bulkhead.dev.yaml

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

bench:
	cargo bench --bench network
	. "$$(testbed/up)" && cargo bench --bench database && cargo bench --bench cache && cargo bench --bench storage
