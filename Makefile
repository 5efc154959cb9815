# bulkhead: the two commands are `make demo` (the operator on the local testbed) and `make test`.
.PHONY: demo test up down crds lint bench scale build

demo:
	scripts/demo

test:
	scripts/test

build:
	cargo build --locked

up:
	testbed/up

down:
	testbed/operator stop
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

scale:
	scripts/scale
