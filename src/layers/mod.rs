//! Isolation layers. Each is one module behind the [`Layer`] trait: `ensure` converges the
//! organization's isolation, `verify` audits it and attacks it with the organization's own
//! credentials, `cleanup` removes it according to the deletion policy.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::api::DeletionPolicy;
use crate::tenant::OrgId;

pub mod cache;
pub mod database;
pub mod network;
pub mod storage;

use std::sync::Arc;

use crate::api::platform::{IsolationPlatform, SecretKeySelector, SecretName};

/// The isolation layers, in the order their conditions are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerKind {
    Database,
    Storage,
    Cache,
    Network,
}

impl LayerKind {
    pub const ALL: [LayerKind; 4] = [Self::Database, Self::Storage, Self::Cache, Self::Network];

    /// Lowercase name used in status, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Storage => "storage",
            Self::Cache => "cache",
            Self::Network => "network",
        }
    }

    /// The Organization condition this layer drives.
    pub fn condition_type(self) -> &'static str {
        match self {
            Self::Database => "DatabaseIsolated",
            Self::Storage => "StorageIsolated",
            Self::Cache => "CacheIsolated",
            Self::Network => "NetworkIsolated",
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a layer needs to know about the organization it works on.
#[derive(Clone, Debug)]
pub struct Tenant {
    /// Name of the Organization object.
    pub name: String,
    pub org_id: OrgId,
    pub display_name: String,
    /// Namespace where the organization's workloads and credentials Secret live.
    pub namespace: String,
    pub deletion_policy: DeletionPolicy,
    /// Replace every credential this pass (the rotate annotation changed).
    pub rotate: bool,
    /// Organizations whose canaries the probes attack: the sentinel first, then real peers.
    pub peers: Vec<OrgId>,
    /// Owner reference pointing at the Organization, for objects the operator creates. Its `uid`
    /// is the owner that every external identity records (registry row, IAM tags, the cache's
    /// owner record): `ensure`, `retire` and `cleanup` act only on what this UID owns.
    pub owner: OwnerReference,
    /// UID of an earlier, deleted Organization whose retained data this one may take over (the
    /// `bulkhead.dev/adopt-from` annotation). Without it, state owned by another UID is refused.
    pub adopt_from: Option<String>,
    /// ResourceQuota for the organization's namespace, from its spec.
    pub resource_quota: Option<k8s_openapi::api::core::v1::ResourceQuotaSpec>,
    /// LimitRange for the organization's namespace, from its spec.
    pub limit_range: Option<k8s_openapi::api::core::v1::LimitRangeSpec>,
}

/// The organization's credentials Secret content, keyed by the documented Secret keys. Each
/// layer reads its previous values (to keep passwords stable) and writes its new ones.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, String>);

impl Credentials {
    pub fn new(entries: BTreeMap<String, String>) -> Self {
        Self(entries)
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }
    pub fn remove(&mut self, key: &str) {
        self.0.remove(key);
    }
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }
    pub fn into_entries(self) -> BTreeMap<String, String> {
        self.0
    }
}

impl fmt::Debug for Credentials {
    // Keys only: credential values never reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Result of one cross-tenant attempt or own-access check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// What was tried, e.g. `GET org:other:canary as acme`.
    pub name: String,
    /// Whether the backend behaved as isolation requires (a refusal for a cross-tenant attempt,
    /// success for the organization's own data).
    pub passed: bool,
    /// What the backend answered, in words. Never holds credentials.
    pub detail: String,
}

impl Probe {
    pub fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// Outcome of `verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Audit findings: the isolation is not as planned (missing RLS, widened policy, ...).
    pub findings: Vec<String>,
    /// Active probes.
    pub probes: Vec<Probe>,
    /// Network layer with traffic probes: the real packets, beside the evaluator's verdicts.
    pub traffic: Option<network::traffic::Traffic>,
}

impl Verification {
    /// Isolation is in place as planned.
    pub fn isolated(&self) -> bool {
        self.findings.is_empty()
    }
    /// Every probe behaved as isolation requires, and at least one ran.
    pub fn verified(&self) -> bool {
        !self.probes.is_empty() && self.probes.iter().all(|p| p.passed)
    }
    /// The failing checks in words, findings first.
    pub fn failures(&self) -> Vec<String> {
        self.findings
            .iter()
            .cloned()
            .chain(
                self.probes
                    .iter()
                    .filter(|p| !p.passed)
                    .map(|p| format!("{}: {}", p.name, p.detail)),
            )
            .collect()
    }
}

/// A drift that `ensure` found and repaired; each becomes an Event and a metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair(pub String);

/// Why a layer could not do its work. The category is the condition reason and the metric label.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The platform's configuration for this layer is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The backend could not be reached.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The backend refused or failed an operation.
    #[error("backend error: {0}")]
    Backend(String),
    /// The Kubernetes API failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The organization's spec cannot be provisioned (e.g. a namespace owned by someone else).
    #[error("refused: {0}")]
    Refused(String),
}

/// How the controller treats an error: retry with backoff, or wait for a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The backend or the API may answer next time: back off and retry.
    Transient,
    /// The platform's configuration is unusable: retrying cannot help until it changes.
    Configuration,
    /// The organization's spec or the backend's state forbids the work (owned by another
    /// Organization, say): a person has to act.
    Refused,
}

impl LayerError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable(_) | Self::Backend(_) | Self::Kube(_) => ErrorClass::Transient,
            Self::Config(_) => ErrorClass::Configuration,
            Self::Refused(_) => ErrorClass::Refused,
        }
    }

    /// CamelCase reason for conditions and Events; also the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) => "ConfigurationError",
            Self::Unreachable(_) => "BackendUnreachable",
            Self::Backend(_) => "BackendError",
            Self::Kube(_) => "KubernetesError",
            Self::Refused(_) => "Refused",
        }
    }
}

/// One isolation layer for one platform.
#[async_trait]
pub trait Layer: Send + Sync {
    fn kind(&self) -> LayerKind;

    /// Platform-level setup shared by every organization (schema, policies, bucket guard).
    /// Idempotent; run before the first organization and again at each platform pass.
    async fn prepare(&self) -> Result<Vec<Repair>, LayerError> {
        Ok(Vec::new())
    }

    /// Creates or repairs the organization's isolation and writes its credentials into `creds`.
    async fn ensure(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError>;

    /// Audits the organization's isolation and probes it with the organization's own credentials.
    /// Never modifies tenant data other than the layer's own canaries.
    async fn verify(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Verification, LayerError>;

    /// Removes the organization's identities, and its data when the deletion policy says so.
    /// Touches only what `tenant.owner.uid` owns: an Organization that never owned anything in
    /// this layer removes nothing.
    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError>;

    /// The layer was switched off for the organization: removes its identity (login role, IAM
    /// principal, ACL user) and drops its keys from `creds`, keeping the data (the deletion
    /// policy governs data when the Organization is deleted). Touches only what
    /// `tenant.owner.uid` owns. Idempotent.
    async fn retire(
        &self,
        _tenant: &Tenant,
        _creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        Ok(Vec::new())
    }

    /// The external identity this layer creates for `org` (role, IAM user, ACL user), recorded in
    /// status before it is created so that cleanup works after a crash.
    fn identity(&self, _org: &OrgId) -> Option<String> {
        None
    }

    /// When the temporary credentials this layer wrote into `creds` must be replaced: the next
    /// pass has to run by then. `None` for credentials that do not expire.
    fn renew_by(&self, _creds: &Credentials) -> Option<k8s_openapi::jiff::Timestamp> {
        None
    }

    /// Fills this layer's part of the platform's status (audit coverage, guard state).
    async fn platform_status(
        &self,
        _status: &mut crate::api::IsolationPlatformStatus,
    ) -> Result<(), LayerError> {
        Ok(())
    }
}

/// What a layer's constructor gets: the platform, and access to the Secrets it refers to.
pub struct BuildEnv<'a> {
    pub client: kube::Client,
    /// Namespace of the operator; Secret refs without a namespace point here.
    pub operator_namespace: &'a str,
    pub platform: &'a IsolationPlatform,
    /// Where layers report drift they were told about (the platform's name); the platform then
    /// gets a pass at once. None: no listener is started.
    pub drift: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl BuildEnv<'_> {
    /// Reads one key of a Secret, as text.
    pub async fn secret_key(&self, sel: &SecretKeySelector) -> Result<String, LayerError> {
        let data = self
            .secret_data(sel.namespace.as_deref(), &sel.name)
            .await?;
        data.get(&sel.key).cloned().ok_or_else(|| {
            LayerError::Config(format!(
                "Secret {}/{} has no key {:?}",
                self.ns(sel.namespace.as_deref()),
                sel.name,
                sel.key
            ))
        })
    }

    /// Reads a whole Secret, as text values.
    pub async fn secret(&self, sel: &SecretName) -> Result<BTreeMap<String, String>, LayerError> {
        self.secret_data(sel.namespace.as_deref(), &sel.name).await
    }

    fn ns<'b>(&'b self, ns: Option<&'b str>) -> &'b str {
        ns.unwrap_or(self.operator_namespace)
    }

    async fn secret_data(
        &self,
        ns: Option<&str>,
        name: &str,
    ) -> Result<BTreeMap<String, String>, LayerError> {
        let ns = self.ns(ns);
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), ns);
        let secret = api
            .get_opt(name)
            .await?
            .ok_or_else(|| LayerError::Config(format!("Secret {ns}/{name} not found")))?;
        let mut out = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            let text = String::from_utf8(v.0).map_err(|_| {
                LayerError::Config(format!("Secret {ns}/{name} key {k:?} is not UTF-8"))
            })?;
            out.insert(k, text);
        }
        Ok(out)
    }
}

/// A layer as the platform runtime holds it: built, or the reason it could not be.
pub type LayerSlot = Result<Arc<dyn Layer>, LayerError>;

/// Builds every layer the platform configures. A layer whose section is absent is left out;
/// one whose backend cannot be set up is kept as an error so it reports its own condition.
pub async fn build_all(env: &BuildEnv<'_>) -> BTreeMap<LayerKind, LayerSlot> {
    let spec = &env.platform.spec;
    let mut out = BTreeMap::new();
    if spec.database.is_some() {
        out.insert(LayerKind::Database, database::build(env).await);
    }
    if spec.storage.is_some() {
        out.insert(LayerKind::Storage, storage::build(env).await);
    }
    if spec.cache.is_some() {
        out.insert(LayerKind::Cache, cache::build(env).await);
    }
    out.insert(LayerKind::Network, network::build(env).await);
    out
}

/// Generates a random secret of `len` URL-safe characters from the OS generator.
pub fn random_secret(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_never_prints_values() {
        let mut c = Credentials::default();
        c.set("REDIS_PASSWORD", "hunter2-secret");
        let shown = format!("{c:?}");
        assert!(shown.contains("REDIS_PASSWORD"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn verification_needs_probes_and_no_findings() {
        let mut v = Verification::default();
        assert!(v.isolated());
        assert!(!v.verified(), "no probe ran, nothing is verified");
        v.probes.push(Probe::new("GET other", true, "NOPERM"));
        assert!(v.verified());
        v.probes.push(Probe::new("SET other", false, "OK"));
        assert!(!v.verified());
        v.findings.push("RLS disabled on messages".into());
        assert!(!v.isolated());
        assert_eq!(
            v.failures(),
            vec![
                "RLS disabled on messages".to_owned(),
                "SET other: OK".to_owned()
            ]
        );
    }

    #[test]
    fn random_secrets_differ_and_have_the_length() {
        let a = random_secret(32);
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_secret(32));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
