//! bulkhead: a Kubernetes operator that provisions tenant isolation in every layer of a
//! multi-tenant platform and keeps proving it holds.

pub mod api;
pub mod cli;
pub mod controller;
pub mod layers;
pub mod telemetry;
pub mod tenant;

/// Selects the TLS crypto provider once per process: both `ring` (kube) and `aws-lc-rs` (the AWS
/// SDK) are linked, so rustls cannot pick one by itself.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
