# The bulkhead operator image: the chart's default image (charts/bulkhead/values.yaml) is built
# from this file.
#
#   docker build -t ghcr.io/bulkhead-dev/bulkhead:0.1.0 .
#
# Build stage: the release binary, with the locked dependency versions.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin bulkhead \
 && cp target/release/bulkhead /bulkhead

# Runtime stage: glibc and CA certificates, no shell, no package manager, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /bulkhead /bulkhead
USER nonroot
EXPOSE 8080
ENTRYPOINT ["/bulkhead"]
CMD ["run"]
