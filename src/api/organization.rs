//! `Organization`: one tenant of the platform, and the isolation bulkhead keeps for it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// One customer organization. bulkhead creates its isolation in every layer and keeps proving
/// it holds with real cross-tenant attempts.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "Organization",
    plural = "organizations",
    singular = "organization",
    shortname = "org",
    category = "bulkhead",
    status = "OrganizationStatus",
    printcolumn = r#"{"name":"OrgID","type":"string","jsonPath":".spec.orgId"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Verified","type":"string","jsonPath":".status.conditions[?(@.type==\"IsolationVerified\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(self.spec.orgId) || self.metadata.name == self.spec.orgId").message("metadata.name must equal spec.orgId: an orgId belongs to exactly one Organization")
)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationSpec {
    /// The organization's id: the value of `org_id` in the database, the S3 prefix, the Redis key
    /// prefix and the namespace label. 1-63 characters of lowercase letters, digits and `-`,
    /// starting and ending with a letter or digit. Immutable once set, and equal to
    /// `metadata.name`, so that no two Organizations can claim the same orgId.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("orgId must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (no glob characters, quotes, slashes or spaces)"),
        validation = Rule::new("self != 'bulkhead-sentinel'").message("orgId 'bulkhead-sentinel' is reserved for the operator's canaries"),
        validation = Rule::new("self == oldSelf").message("orgId is immutable")
    )]
    pub org_id: String,

    /// Human-readable name, stored in the organization registry. Any text up to 256 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,

    /// Name of the `IsolationPlatform` whose backends this organization lives in.
    #[serde(default = "default_platform_ref")]
    #[schemars(length(min = 1, max = 253))]
    pub platform_ref: String,

    /// Database layer: PostgreSQL Row-Level Security and the organization's login role.
    #[serde(default)]
    pub database: LayerSwitch,

    /// Object storage layer: the organization's S3 prefix and its credentials.
    #[serde(default)]
    pub storage: LayerSwitch,

    /// Cache layer: the organization's Redis ACL user.
    #[serde(default)]
    pub cache: LayerSwitch,

    /// Network layer: the organization's namespace, NetworkPolicies and optional quotas.
    #[serde(default)]
    pub network: NetworkOverrides,

    /// What happens to the organization's data when this resource is deleted. Credentials and
    /// identities are always removed; `Retain` keeps rows, objects and keys, `Delete` removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Bring-your-own-key AI provider keys, copied only into this organization's credentials Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ai_providers: Vec<AiProviderRef>,
}

fn default_platform_ref() -> String {
    "default".to_owned()
}

/// Turns one isolation layer on or off for this organization.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayerSwitch {
    /// Whether bulkhead provisions and verifies this layer for the organization.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

impl Default for LayerSwitch {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn enabled() -> bool {
    true
}

/// Network layer switch and per-organization resource limits for its namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkOverrides {
    /// Whether bulkhead provisions and verifies NetworkPolicies for the organization.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Optional ResourceQuota spec applied in the organization's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_quota: Option<k8s_openapi::api::core::v1::ResourceQuotaSpec>,
    /// Optional LimitRange spec applied in the organization's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_range: Option<k8s_openapi::api::core::v1::LimitRangeSpec>,
}

impl Default for NetworkOverrides {
    fn default() -> Self {
        Self {
            enabled: true,
            resource_quota: None,
            limit_range: None,
        }
    }
}

/// What happens to an organization's data when the Organization is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Remove credentials and identities; keep rows, objects and keys.
    #[default]
    Retain,
    /// Remove credentials and identities, then every row, object and key of the organization.
    Delete,
}

/// One bring-your-own-key AI provider.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AiProviderRef {
    /// Provider name, e.g. `anthropic`, `openai`, `google`. Becomes the key `AI_<NAME>_API_KEY`.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z][a-z0-9-]*$"))]
    pub name: String,
    /// Secret in the operator's namespace that holds the key.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What bulkhead observed and proved about the organization's isolation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationStatus {
    /// The `metadata.generation` that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `DatabaseIsolated`, `StorageIsolated`, `CacheIsolated`, `NetworkIsolated`,
    /// `IsolationVerified`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The organization's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the Secret, in the organization's namespace, that holds its credentials. Never
    /// the credentials themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// When the temporary credentials in that Secret (storage `session` mode) are next replaced:
    /// the next pass runs by then, after an operator restart too. Never the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_renew_time: Option<Time>,
    /// External identities derived from `orgId`, recorded before they are created so that
    /// cleanup works after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<OrganizationIdentities>,
    /// Per-layer detail: isolated, verified, last probe, the failing checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerDetail>,
    /// The value of the `bulkhead.dev/rotate` annotation whose rotation was last carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
    /// AI providers configured for the organization (names only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ai_providers: Vec<String>,
    /// UID of the deleted Organization whose retained data this one took over, after the
    /// `bulkhead.dev/adopt-from` annotation asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<String>,
}

/// Identities that bulkhead creates for the organization in external systems.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationIdentities {
    /// PostgreSQL login role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_role: Option<String>,
    /// IAM user (mode `user`) or role (mode `role`) name, or the session (mode `session`,
    /// `assumed-role/{role}/{orgId}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_principal: Option<String>,
    /// Redis ACL user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_user: Option<String>,
}

/// The state of one isolation layer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayerDetail {
    /// `database`, `storage`, `cache` or `network`.
    pub layer: String,
    /// Whether the layer's isolation is in place as planned.
    pub isolated: bool,
    /// Whether every cross-tenant probe of the last pass was refused.
    pub verified: bool,
    /// When the probes last ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
    /// Probes that behaved as isolation requires in the last pass.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub probes_passed: u32,
    /// Probes that did not.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub probes_failed: u32,
    /// The failing checks and findings, in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    /// Network layer with `trafficProbe`: every connection tried with real packets in the last
    /// pass, beside the policy evaluator's verdict for the same path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficPath>,
}

/// One connection tried with real packets.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPath {
    /// The path in words, e.g. `to beta's canary`.
    pub path: String,
    /// `namespace/pod address:port`.
    pub destination: String,
    /// The policy evaluator's verdict for this path: `allows`, `refuses`, or `changed during
    /// the probe` (the policies of a namespace on the path changed while the packet was sent;
    /// such a path counts neither way towards `NetworkPolicyEnforced`).
    pub policy: String,
    /// What the packet did: `open`, `refused`, `timeout`, `unreachable`, `denied` or `error`.
    pub packet: String,
    /// Whether the packet did what the policies say.
    pub agrees: bool,
}
