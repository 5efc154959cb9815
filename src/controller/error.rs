//! Errors of one reconcile. The variant's label is the metric label and Event reason.

use crate::layers::{ErrorClass, LayerError, LayerKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Layer(#[from] LayerError),
    #[error("cleanup of the {layer} layer failed: {source}")]
    Cleanup {
        layer: LayerKind,
        source: LayerError,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesError",
            Self::Layer(e) => e.reason(),
            Self::Cleanup { .. } => "CleanupFailed",
        }
    }

    /// Whether retrying can help, as the error's class says.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Kube(_) => ErrorClass::Transient,
            Self::Layer(e) | Self::Cleanup { source: e, .. } => e.class(),
        }
    }
}
