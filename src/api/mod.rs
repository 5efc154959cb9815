//! The custom resources: `Organization` (one tenant) and `IsolationPlatform` (the shared backends).

pub mod condition;
pub mod organization;
pub mod platform;

pub use condition::{Condition, ConditionStatus};
pub use organization::{
    AiProviderRef, DeletionPolicy, LayerDetail, Organization, OrganizationIdentities,
    OrganizationSpec, OrganizationStatus, TrafficPath,
};
pub use platform::{IsolationPlatform, IsolationPlatformSpec, IsolationPlatformStatus};

/// API group of every bulkhead resource.
pub const GROUP: &str = "bulkhead.dev";
/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "bulkhead";
/// Finalizer guarding external state (roles, IAM objects, ACL users).
pub const FINALIZER: &str = "bulkhead.dev/cleanup";
/// Label carrying the tenant's org id on everything the operator creates.
pub const ORG_ID_LABEL: &str = "bulkhead.dev/org-id";
/// Label naming the Organization object that owns a Kubernetes object.
pub const ORGANIZATION_LABEL: &str = "bulkhead.dev/organization";
/// `app.kubernetes.io/managed-by` value on everything the operator creates.
pub const MANAGED_BY: &str = "bulkhead";
/// Annotation whose new value asks for every layer's credentials to be rotated.
pub const ROTATE_ANNOTATION: &str = "bulkhead.dev/rotate";
/// Annotation naming the UID of a deleted Organization whose retained data (same orgId) this
/// Organization takes over. Without it, state owned by another UID is refused.
pub const ADOPT_ANNOTATION: &str = "bulkhead.dev/adopt-from";
/// Label that makes a Secret in the operator's namespace eligible as a BYOK source, and only for
/// the organization whose orgId it names.
pub const BYOK_LABEL: &str = "bulkhead.dev/byok-org";

/// Every CRD this crate defines, in a stable order.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![IsolationPlatform::crd(), Organization::crd()]
}

/// The CRDs as one multi-document YAML stream, exactly as committed under `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
