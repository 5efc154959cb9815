//! Network layer: NetworkPolicies in the organization's namespace.

pub mod assess;
pub mod plan;
pub mod reach;

use std::sync::Arc;

use async_trait::async_trait;

use super::{BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Repair, Tenant, Verification};

/// Builds the network layer for a platform.
pub async fn build(env: &BuildEnv<'_>) -> LayerSlot {
    Ok(Arc::new(NetworkLayer { client: env.client.clone() }))
}

/// Keeps other organizations' traffic out of the organization's namespace.
pub struct NetworkLayer {
    #[allow(dead_code)]
    client: kube::Client,
}

#[async_trait]
impl Layer for NetworkLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Network
    }

    async fn ensure(&self, _tenant: &Tenant, _creds: &mut Credentials) -> Result<Vec<Repair>, LayerError> {
        Ok(Vec::new())
    }

    async fn verify(&self, _tenant: &Tenant, _creds: &Credentials) -> Result<Verification, LayerError> {
        Ok(Verification { findings: vec!["NetworkPolicies are not provisioned yet".to_owned()], probes: Vec::new() })
    }

    async fn cleanup(&self, _tenant: &Tenant) -> Result<(), LayerError> {
        Ok(())
    }
}
