//! `IsolationPlatform`: the shared backends that organizations are isolated within.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// The shared backends (PostgreSQL, S3, Redis, the cluster network) in which organizations are
/// isolated. Usually one, named `default`. A section left out means that layer is not managed.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bulkhead.dev",
    version = "v1alpha1",
    kind = "IsolationPlatform",
    plural = "isolationplatforms",
    singular = "isolationplatform",
    shortname = "platform",
    category = "bulkhead",
    status = "IsolationPlatformStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Coverage","type":"string","jsonPath":".status.database.coverage"}"#,
    printcolumn = r#"{"name":"Orgs","type":"integer","jsonPath":".status.organizations.total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IsolationPlatformSpec {
    /// PostgreSQL Row-Level Security for every table that carries the tenant column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabasePlatform>,
    /// S3 prefix isolation, enforced by IAM and a bucket-policy guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StoragePlatform>,
    /// Redis ACL users limited to each organization's key and channel prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePlatform>,
    /// Namespaces and NetworkPolicies.
    #[serde(default)]
    pub network: NetworkPlatform,
    /// How often isolation is re-verified with real cross-tenant probes.
    #[serde(default)]
    pub verification: Verification,
}

/// Reference to one key of a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret; defaults to the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How a database session proves which organization it belongs to.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// The session's login role maps to its organization through a table tenants cannot write.
    #[default]
    Role,
    /// A transaction-local setting (`SET LOCAL`), for pooled applications behind PgBouncer.
    Setting,
    /// The org claim of `request.jwt.claims`, for Supabase and PostgREST.
    Jwt,
}

/// TLS to PostgreSQL, for the operator's connections and in each tenant's `DATABASE_URL`
/// (libpq's `sslmode` values): `disable`, `require` (encrypted, the certificate is not
/// checked), `verify-ca` (the certificate chains to the CA; the host name is not checked) or
/// `verify-full` (chain and host name). Unset: the admin URL's `sslmode`, else `disable`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PgSslMode {
    /// Plain TCP.
    Disable,
    /// TLS; the server's certificate is not verified (protects against eavesdropping only).
    Require,
    /// TLS; the certificate must chain to the CA. The host name is not checked.
    VerifyCa,
    /// TLS; the certificate must chain to the CA and name the host connected to.
    VerifyFull,
}

/// PostgreSQL settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabasePlatform {
    /// Secret key holding the admin connection URL (`postgres://user:password@host:port/db`).
    pub admin_url_secret_ref: SecretKeySelector,
    /// TLS to PostgreSQL, for the operator's connections and in each tenant's `DATABASE_URL`:
    /// `disable`, `require` (encrypted, the certificate is not checked), `verify-ca` (the
    /// certificate chains to the CA; the host name is not checked) or `verify-full` (chain and
    /// host name). Unset: the admin URL's `sslmode`, else `disable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_mode: Option<PgSslMode>,
    /// Secret key holding the PEM CA bundle that `verify-ca` and `verify-full` trust (without
    /// it, the public web roots). Copied into each tenant's Secret as `DATABASE_CA_CERT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeySelector>,
    /// Host and port that tenants' workloads use, when it differs from the admin URL's
    /// (e.g. a Service or a PgBouncer). Format `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_endpoint: Option<String>,
    /// Schemas whose tables are governed.
    #[serde(default = "default_schemas")]
    #[schemars(length(min = 1, max = 32))]
    pub schemas: Vec<String>,
    /// Column that carries the organization id.
    #[serde(default = "default_tenant_column")]
    pub tenant_column: String,
    /// Schema that holds the operator's own objects (role mapping, identity function helpers).
    #[serde(default = "default_operator_schema")]
    pub operator_schema: String,
    /// Schema-qualified name of the identity function used in every policy.
    #[serde(default = "default_identity_function")]
    pub identity_function: String,
    /// Table, in the first governed schema, with one row per organization.
    #[serde(default = "default_registry_table")]
    pub registry_table: String,
    /// How a session's organization is established.
    #[serde(default)]
    pub identity_mode: IdentityMode,
    /// Setting read in `setting` mode.
    #[serde(default = "default_setting_name")]
    pub setting_name: String,
    /// Claim of `request.jwt.claims` read in `jwt` mode.
    #[serde(default = "default_jwt_claim")]
    pub jwt_claim: String,
    /// Group role that holds the table privileges; every organization's login role joins it.
    #[serde(default = "default_group_role")]
    pub group_role: String,
    /// Per-table exceptions to the standard policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<TableOverride>,
    /// Tables in governed schemas without the tenant column that are shared on purpose and are
    /// not reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_tables: Vec<String>,
    /// Create a missing index leading with the tenant column (`CREATE INDEX CONCURRENTLY`)
    /// instead of reporting it.
    #[serde(default)]
    pub create_indexes: bool,
    /// Prefix of each organization's login role; the org id follows (hashed when too long).
    #[serde(default = "default_role_prefix")]
    #[schemars(length(min = 1, max = 30))]
    pub role_prefix: String,
    /// Table (in a governed schema) holding vector embeddings; probed with a similarity search
    /// when it exists.
    #[serde(default = "default_embeddings_table")]
    pub embeddings_table: String,
    /// Float-array column of `embeddingsTable` that the similarity probe ranks by.
    #[serde(default = "default_embedding_column")]
    pub embedding_column: String,
    /// Bounds on what one organization's sessions can do to the others, set on every
    /// organization's login role and checked by the audit.
    #[serde(default)]
    pub tenant_limits: TenantLimits,
}

/// Per-login-role bounds: timeouts, connection slots, and how long a table lock may be held.
/// The timeouts are the role's defaults, which a session may change for itself; the hard bounds
/// are `connectionLimit` and `lockHoldSeconds`, which no tenant session can lift.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    /// `statement_timeout` of each organization's login role, in seconds (a default for its
    /// sessions).
    #[serde(default = "default_statement_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    #[schemars(extend("format" = "int64"))]
    pub statement_timeout_seconds: u32,
    /// `idle_in_transaction_session_timeout` of each login role, in seconds: an idle open
    /// transaction (and the locks it holds) ends after this long.
    #[serde(default = "default_idle_in_transaction_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    #[schemars(extend("format" = "int64"))]
    pub idle_in_transaction_timeout_seconds: u32,
    /// `lock_timeout` of each login role, in seconds: how long a tenant statement waits for a lock.
    #[serde(default = "default_tenant_lock_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    #[schemars(extend("format" = "int64"))]
    pub lock_timeout_seconds: u32,
    /// `transaction_timeout` of each login role, in seconds; applied on PostgreSQL 17 and later
    /// only (older servers lack the setting; the lock-hold bound covers them).
    #[serde(default = "default_transaction_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    #[schemars(extend("format" = "int64"))]
    pub transaction_timeout_seconds: u32,
    /// `CONNECTION LIMIT` of each login role: one organization cannot take every slot.
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = 1, max = 10000))]
    #[schemars(extend("format" = "int64"))]
    pub connection_limit: u32,
    /// Longest time, in seconds, an organization's transaction may hold a table lock stronger
    /// than ROW EXCLUSIVE (e.g. `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`) on a relation of a
    /// governed schema before the operator ends its session. Checked every second.
    #[serde(default = "default_lock_hold")]
    #[schemars(range(min = 1, max = 3600))]
    #[schemars(extend("format" = "int64"))]
    pub lock_hold_seconds: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            statement_timeout_seconds: default_statement_timeout(),
            idle_in_transaction_timeout_seconds: default_idle_in_transaction_timeout(),
            lock_timeout_seconds: default_tenant_lock_timeout(),
            transaction_timeout_seconds: default_transaction_timeout(),
            connection_limit: default_connection_limit(),
            lock_hold_seconds: default_lock_hold(),
        }
    }
}

fn default_statement_timeout() -> u32 {
    30
}
fn default_idle_in_transaction_timeout() -> u32 {
    60
}
fn default_tenant_lock_timeout() -> u32 {
    10
}
fn default_transaction_timeout() -> u32 {
    300
}
fn default_connection_limit() -> u32 {
    20
}
fn default_lock_hold() -> u32 {
    5
}

fn default_role_prefix() -> String {
    "bulkhead_org_".to_owned()
}
fn default_embeddings_table() -> String {
    "embeddings".to_owned()
}
fn default_embedding_column() -> String {
    "embedding".to_owned()
}

/// A per-table exception: rows matching `column = value` are readable by every organization
/// and writable by none.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableOverride {
    /// Table name (unqualified, in a governed schema).
    pub table: String,
    /// Column that marks shared rows, e.g. `scope`.
    pub shared_read_column: String,
    /// Value that marks shared rows, e.g. `system`.
    pub shared_read_value: String,
}

fn default_schemas() -> Vec<String> {
    vec!["public".to_owned()]
}
fn default_tenant_column() -> String {
    "org_id".to_owned()
}
fn default_operator_schema() -> String {
    "bulkhead".to_owned()
}
fn default_identity_function() -> String {
    "auth.org_id".to_owned()
}
fn default_registry_table() -> String {
    "organizations".to_owned()
}
fn default_setting_name() -> String {
    "bulkhead.org_id".to_owned()
}
fn default_jwt_claim() -> String {
    "org_id".to_owned()
}
fn default_group_role() -> String {
    "bulkhead_tenant".to_owned()
}

/// How per-organization S3 access is granted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// One IAM user and access key per organization (AWS, SeaweedFS, Ceph).
    #[default]
    User,
    /// One IAM role per organization, assumed by the organization's ServiceAccount.
    Role,
    /// One shared tenant role assumed with session tag `org_id`; no per-organization IAM object.
    Abac,
    /// No per-organization IAM object: the operator assumes one existing role (`sessionRoleArn`)
    /// per organization with a session policy scoped to its prefix, and writes the temporary
    /// credentials into the credentials Secret, replacing them before they expire.
    Session,
}

/// S3 settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePlatform {
    /// S3 endpoint URL; empty means AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// IAM (and STS) endpoint URL when it differs from `endpoint`; empty means AWS, or `endpoint`
    /// when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_endpoint: Option<String>,
    /// Region.
    #[serde(default = "default_region")]
    pub region: String,
    /// The shared bucket.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Secret holding the admin access key id (key `accessKeyId`) and secret (key `secretAccessKey`).
    pub admin_secret_ref: SecretName,
    /// Prefix of each organization's objects; must contain `{orgId}` and end with `/`.
    #[serde(default = "default_prefix_template")]
    pub prefix_template: String,
    /// Use path-style addressing (S3-compatible servers).
    #[serde(default)]
    pub force_path_style: bool,
    /// How access is granted.
    #[serde(default)]
    pub mode: StorageMode,
    /// AWS account id used in ARNs.
    #[serde(default = "default_account_id")]
    pub account_id: String,
    /// IAM path under which tenant principals are created.
    #[serde(default = "default_iam_path")]
    pub iam_path: String,
    /// OIDC issuer (host/path, no scheme) trusted by per-organization roles in `role` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_issuer: Option<String>,
    /// ServiceAccount (in the organization's namespace) that assumes the organization's role in
    /// `role` mode.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Name of the one shared tenant role in `abac` mode.
    #[serde(default = "default_shared_role_name")]
    pub shared_role_name: String,
    /// Principals (ARNs) allowed to assume the shared `abac` role with an `org_id` session tag,
    /// besides the operator itself (which assumes it for probes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abac_trusted_principals: Vec<String>,
    /// The existing role every organization's session is assumed from in `session` mode
    /// (`arn:aws:iam::{account}:role/{name}`). Its trust policy must let the operator assume it
    /// (and, with the `pathCondition` guard, tag the session: `sts:TagSession`); its permissions
    /// must include the object actions and `s3:ListBucket` on the bucket. bulkhead never changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_role_arn: Option<String>,
    /// Lifetime of each organization's session in `session` mode (AssumeRole `DurationSeconds`):
    /// 900 to 43200, and at most the role's maximum session duration.
    #[serde(default = "default_session_duration")]
    #[schemars(range(min = 900, max = 43200))]
    #[schemars(extend("format" = "int64"))]
    pub session_duration_seconds: u32,
    /// How long before a session expires its replacement is written into the credentials Secret,
    /// in `session` mode: the time consumers have to re-read the Secret. At least 60 and at
    /// most `sessionDurationSeconds` - 60; empty means half of `sessionDurationSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 43140))]
    #[schemars(extend("format" = "int64"))]
    pub session_refresh_before_seconds: Option<u32>,
    /// How the bucket-policy guard names tenant principals; empty picks `pathCondition` on AWS
    /// (no endpoint) and `allUsers` on S3-compatible servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard_style: Option<GuardStyle>,
    /// IAM user names the `allUsers` guard never applies to (other services sharing the server);
    /// the operator's own user is always exempt. No organization may use one of these names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guard_exempt_users: Vec<String>,
}

/// How the bucket-policy guard selects the principals it applies to.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GuardStyle {
    /// `Principal: "*"` with an `aws:PrincipalArn` condition on the tenant IAM path (AWS, which
    /// allows no wildcard inside a Principal ARN).
    PathCondition,
    /// `Principal` naming every IAM user of the account, minus `guardExemptUsers` and the operator
    /// (servers that ignore IAM paths and `aws:PrincipalArn`, such as SeaweedFS).
    AllUsers,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_prefix_template() -> String {
    "{orgId}/".to_owned()
}
fn default_account_id() -> String {
    "000000000000".to_owned()
}
fn default_iam_path() -> String {
    "/bulkhead/".to_owned()
}
fn default_service_account() -> String {
    "default".to_owned()
}
fn default_shared_role_name() -> String {
    "bulkhead-tenant".to_owned()
}
fn default_session_duration() -> u32 {
    3600
}

/// A whole Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretName {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret; defaults to the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Redis settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePlatform {
    /// Secret key holding the admin URL (`redis://user:password@host:port`, or `rediss://` for TLS).
    /// Further nodes of the same deployment are listed in `nodes` or discovered.
    pub admin_url_secret_ref: SecretKeySelector,
    /// Secret key holding the PEM CA bundle that signs the servers' certificates, for a
    /// `rediss://` admin URL. Without it the system's root CAs are trusted. Connections of the
    /// operator and its probes verify the server name against it; organizations receive the same
    /// bundle in `REDIS_CA_CERT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeySelector>,
    /// Further nodes (`host:port`) on which ACLs are applied and verified: replicas or cluster nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Discover further nodes with `ROLE` and `CLUSTER NODES`.
    #[serde(default)]
    pub discover_nodes: bool,
    /// Host and port that tenants' workloads use, when it differs from the admin URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_endpoint: Option<String>,
    /// Key prefix of each organization; must contain `{orgId}` once, followed by a character an
    /// org id cannot hold (e.g. `:`), and no glob characters.
    #[serde(default = "default_key_prefix")]
    #[schemars(pattern(CACHE_PREFIX_PATTERN), length(min = 8, max = 72))]
    pub key_prefix: String,
    /// Pub/sub channel prefix of each organization; same rules as `keyPrefix`.
    #[serde(default = "default_key_prefix")]
    #[schemars(pattern(CACHE_PREFIX_PATTERN), length(min = 8, max = 72))]
    pub channel_prefix: String,
    /// Prefix of the ACL user names bulkhead owns; user names are this prefix plus the org id.
    #[serde(default = "default_user_prefix")]
    #[schemars(pattern(r"^[A-Za-z0-9._-]{1,64}$"))]
    pub user_prefix: String,
    /// Allow `EVAL`/`FCALL` (still limited to the organization's keys).
    #[serde(default)]
    pub allow_scripting: bool,
    /// Persist users with `ACL SAVE` after changes (the server must run with an `aclfile`).
    #[serde(default)]
    pub acl_file: bool,
}

/// A cache key or channel prefix template: safe characters, `{orgId}` once, then a character no
/// org id holds so one organization's pattern never matches another's keys.
const CACHE_PREFIX_PATTERN: &str =
    r"^[A-Za-z0-9:._/|@#=-]*\{orgId\}[A-Z:._/|@#=][A-Za-z0-9:._/|@#=-]*$";

fn default_key_prefix() -> String {
    "org:{orgId}:".to_owned()
}
fn default_user_prefix() -> String {
    "bulkhead-org-".to_owned()
}

/// Whether organizations get namespaces of their own or share workload namespaces.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    /// One namespace per organization.
    #[default]
    Namespace,
    /// Organizations share namespaces; pods carry the `bulkhead.dev/org-id` label.
    SharedNamespace,
}

/// Network settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPlatform {
    /// Name of each organization's namespace; `{orgId}` is replaced.
    #[serde(default = "default_namespace_template")]
    pub namespace_template: String,
    /// Namespace per organization, or shared namespaces with labelled pods.
    #[serde(default)]
    pub mode: NetworkMode,
    /// In `sharedNamespace` mode, the namespaces whose pods organizations share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_namespaces: Vec<String>,
    /// Namespaces (by name) allowed to send traffic into every organization, e.g. the API gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_namespaces: Vec<String>,
    /// Namespace of the cluster DNS.
    #[serde(default = "default_dns_namespace")]
    pub dns_namespace: String,
    /// The platform's backends that organizations may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressTarget>,
    /// CIDRs from which the cluster assigns pod addresses. The reachability check treats any
    /// `ipBlock` overlapping them as reaching other organizations' pods, and egress CIDR targets
    /// that contain them get them as `except`.
    #[serde(default = "default_pod_cidrs")]
    pub pod_cidrs: Vec<String>,
    /// Real packets beside the policy evaluator, for clusters whose CNI enforces NetworkPolicy:
    /// a canary Pod in each organization's namespace, and a short-lived probe Pod that tries TCP
    /// to another organization's canary, its own canary, DNS and the platform's egress targets.
    /// Needs `mode: namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_probe: Option<TrafficProbe>,
}

/// How the network layer sends real packets. The image's entrypoint is `bulkhead-netprobe`
/// (roles `listen` for canaries, `connect` for probes); it runs as user 65534 under the
/// `restricted` Pod Security profile.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficProbe {
    /// Image holding `bulkhead-netprobe`, e.g. `ghcr.io/example/bulkhead-netprobe:0.1.0`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// `Always`, `IfNotPresent` (default) or `Never`.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// TCP port each canary listens on (1024-65535: the canary runs without privileges).
    #[serde(default = "default_canary_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub canary_port: i32,
    /// Milliseconds a probe waits before its first packet, so that the policy enforcer has
    /// learned the new Pod's address.
    #[serde(default = "default_settle_millis")]
    #[schemars(range(max = 30000))]
    pub settle_millis: u32,
    /// Milliseconds each connection attempt may take.
    #[serde(default = "default_connect_timeout_millis")]
    #[schemars(range(min = 100, max = 30000))]
    pub connect_timeout_millis: u32,
    /// Labels of the cluster DNS Pods in `dnsNamespace`; the probe tries TCP 53 on one of them.
    #[serde(default = "default_dns_pod_labels")]
    pub dns_pod_labels: std::collections::BTreeMap<String, String>,
}

fn default_pull_policy() -> String {
    "IfNotPresent".to_owned()
}
fn default_canary_port() -> i32 {
    8080
}
fn default_settle_millis() -> u32 {
    2000
}
fn default_connect_timeout_millis() -> u32 {
    1500
}
fn default_dns_pod_labels() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([("k8s-app".to_owned(), "kube-dns".to_owned())])
}

impl Default for NetworkPlatform {
    fn default() -> Self {
        Self {
            namespace_template: default_namespace_template(),
            mode: NetworkMode::default(),
            shared_namespaces: Vec::new(),
            ingress_namespaces: Vec::new(),
            dns_namespace: default_dns_namespace(),
            egress: Vec::new(),
            pod_cidrs: default_pod_cidrs(),
            traffic_probe: None,
        }
    }
}

fn default_namespace_template() -> String {
    "org-{orgId}".to_owned()
}
fn default_dns_namespace() -> String {
    "kube-system".to_owned()
}
fn default_pod_cidrs() -> Vec<String> {
    vec!["10.0.0.0/8".to_owned()]
}

/// A backend organizations may reach: by namespace and pod labels, or by CIDR.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressTarget {
    /// Short name, e.g. `postgres`.
    pub name: String,
    /// Namespace of the backend's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels of the backend's pods.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pod_labels: std::collections::BTreeMap<String, String>,
    /// CIDR of the backend, for backends outside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// TCP ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i32>,
}

/// Verification settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// Seconds between verification passes for each organization.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 10, max = 86400))]
    #[schemars(extend("format" = "int64"))]
    pub interval_seconds: u32,
}

impl Default for Verification {
    fn default() -> Self {
        Self {
            interval_seconds: default_interval(),
        }
    }
}

fn default_interval() -> u32 {
    300
}

/// Platform-wide health.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IsolationPlatformStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, and one `<Layer>Reachable` condition per configured backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Row-Level Security coverage audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseAudit>,
    /// The bucket-policy guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageAudit>,
    /// Organizations on this platform by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organizations: Option<OrganizationCounts>,
}

/// Result of the database audit.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseAudit {
    /// Governed tables / tables found with the tenant column, e.g. `10/10`.
    pub coverage: String,
    /// Tables with the tenant column whose isolation is complete.
    #[schemars(extend("format" = "int64"))]
    pub governed_tables: u32,
    /// Tables with the tenant column.
    #[schemars(extend("format" = "int64"))]
    pub tables_found: u32,
    /// Findings, in words; warnings start with `warning: `.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// How many findings are breaches (isolation does not hold); the rest are warnings.
    #[serde(default)]
    #[schemars(extend("format" = "int64"))]
    pub breaches: u32,
}

/// State of the bucket-policy guard.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageAudit {
    /// Whether the guard statement is present and as planned.
    pub guard_in_place: bool,
    /// Size of the bucket policy in bytes.
    #[schemars(extend("format" = "int64"))]
    pub policy_bytes: u32,
}

/// Organizations by state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationCounts {
    /// All organizations referring to this platform.
    #[schemars(extend("format" = "int64"))]
    pub total: u32,
    /// Those whose `Ready` condition is True.
    #[schemars(extend("format" = "int64"))]
    pub ready: u32,
}
