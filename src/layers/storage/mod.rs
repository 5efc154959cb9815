//! Storage layer: each organization owns the prefix `{orgId}/` of one shared bucket. Access is
//! granted by IAM (a user, a role, one shared tag-scoped role, or a session of one shared role
//! scoped by a session policy, per mode) and fenced by Deny statements in the bucket policy whose
//! size does not depend on the number of organizations.

pub mod diff;
mod iam;
mod owner;
pub mod policy;
mod probe;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use tokio::sync::OnceCell;

use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Repair, Tenant, Verification,
};
use crate::api::platform::{GuardStyle, StorageAudit, StorageMode, StoragePlatform};
use crate::tenant::{OrgId, render_template};
use policy::{BucketGuard, BucketPolicy, GuardState, SessionRole};

/// Secret keys this layer writes.
pub const KEY_BUCKET: &str = "S3_BUCKET";
pub const KEY_PREFIX: &str = "S3_PREFIX";
pub const KEY_ENDPOINT: &str = "S3_ENDPOINT";
pub const KEY_REGION: &str = "S3_REGION";
pub const KEY_FORCE_PATH_STYLE: &str = "S3_FORCE_PATH_STYLE";
pub const KEY_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const KEY_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const KEY_ROLE_ARN: &str = "AWS_ROLE_ARN";
pub const KEY_SESSION_TAG: &str = "S3_SESSION_TAG_ORG_ID";
/// The session token of temporary credentials (`session` mode).
pub const KEY_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// When the temporary credentials expire, RFC 3339 in UTC (`session` mode). The name is the one
/// `aws configure export-credentials --format env` uses.
pub const KEY_CREDENTIAL_EXPIRATION: &str = "AWS_CREDENTIAL_EXPIRATION";
/// Every Secret key this layer writes.
pub const CREDENTIAL_KEYS: [&str; 11] = [
    KEY_BUCKET,
    KEY_PREFIX,
    KEY_ENDPOINT,
    KEY_REGION,
    KEY_FORCE_PATH_STYLE,
    KEY_ACCESS_KEY_ID,
    KEY_SECRET_ACCESS_KEY,
    KEY_ROLE_ARN,
    KEY_SESSION_TAG,
    KEY_SESSION_TOKEN,
    KEY_CREDENTIAL_EXPIRATION,
];

/// Name of the canary object under every organization's prefix (and the sentinel's).
pub const CANARY_KEY: &str = "bulkhead-canary";

/// The content of an organization's canary object.
pub fn canary_body(org: &OrgId) -> String {
    format!("bulkhead canary of {org}; any other organization must be refused access to it\n")
}

/// Builds the storage layer for a platform from its spec and admin Secret.
pub async fn build(env: &BuildEnv<'_>) -> LayerSlot {
    let spec = env
        .platform
        .spec
        .storage
        .as_ref()
        .ok_or_else(|| LayerError::Config("the platform has no storage section".to_owned()))?;
    let secret = env.secret(&spec.admin_secret_ref).await?;
    let key = |k: &str| {
        secret.get(k).cloned().ok_or_else(|| {
            LayerError::Config(format!(
                "Secret {} has no key {k:?}",
                spec.admin_secret_ref.name
            ))
        })
    };
    let layer = StorageLayer::connect(spec, &key("accessKeyId")?, &key("secretAccessKey")?)?;
    Ok(Arc::new(layer))
}

/// Counts API calls made through a client (one per operation, retries not counted twice).
#[derive(Clone, Debug, Default)]
pub struct CallCounter(Arc<AtomicU64>);

impl CallCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl aws_sdk_s3::config::Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }
    fn read_before_execution(
        &self,
        _context: &aws_sdk_s3::config::interceptors::BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The operator's own identity on the S3/IAM server.
#[derive(Clone, Debug)]
struct Operator {
    arn: String,
    /// IAM user name, when the operator is an IAM user.
    user: Option<String>,
}

/// Builds an IAM or STS client: the two crates share one builder API but no types.
macro_rules! query_client {
    ($sdk:ident, $conn:expr, $creds:expr) => {{
        let mut b = $sdk::config::Builder::new()
            .behavior_version($sdk::config::BehaviorVersion::latest())
            .region($sdk::config::Region::new($conn.region.clone()))
            .credentials_provider($creds)
            .timeout_config(Self::timeouts())
            .interceptor($conn.calls.clone());
        if let Some(ep) = &$conn.iam_endpoint {
            b = b.endpoint_url(ep);
        }
        $sdk::Client::from_conf(b.build())
    }};
}

/// Endpoint, region and addressing of the S3 and IAM servers, shared by admin and tenant clients.
#[derive(Clone, Debug)]
struct Connection {
    s3_endpoint: Option<String>,
    iam_endpoint: Option<String>,
    region: String,
    force_path_style: bool,
    calls: CallCounter,
}

impl Connection {
    fn timeouts() -> aws_sdk_s3::config::timeout::TimeoutConfig {
        aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(60))
            .build()
    }

    fn s3(&self, creds: AwsCredentials) -> aws_sdk_s3::Client {
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .credentials_provider(creds)
            .force_path_style(self.force_path_style)
            .timeout_config(Self::timeouts())
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .interceptor(self.calls.clone());
        if let Some(ep) = &self.s3_endpoint {
            b = b.endpoint_url(ep);
        }
        aws_sdk_s3::Client::from_conf(b.build())
    }

    fn iam(&self, creds: AwsCredentials) -> aws_sdk_iam::Client {
        query_client!(aws_sdk_iam, self, creds)
    }

    fn sts(&self, creds: AwsCredentials) -> aws_sdk_sts::Client {
        query_client!(aws_sdk_sts, self, creds)
    }
}

/// S3 prefix isolation for one platform.
pub struct StorageLayer {
    spec: StoragePlatform,
    style: GuardStyle,
    conn: Connection,
    s3: aws_sdk_s3::Client,
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
    operator: OnceCell<Operator>,
    /// The role of `session` mode.
    session: Option<SessionRole>,
    /// Session lifetime and refresh (`session` mode; the defaults otherwise).
    timing: session::Timing,
}

impl std::fmt::Debug for StorageLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageLayer")
            .field("bucket", &self.spec.bucket)
            .field("mode", &self.spec.mode)
            .finish()
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// An org id whose rendered prefix would overlap the owner records' namespace, if any. Such an
/// id spells a start of the namespace's remainder, so only those few candidates are checked.
fn owner_overlap(template: &str) -> Option<String> {
    let (before, after) = template.split_once("{orgId}")?;
    let rest = owner::OWNER_MARKERS.strip_prefix(before)?;
    let run: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .collect();
    (1..=run.len())
        .map(|n| &run[..n])
        .filter(|id| !id.starts_with('-') && !id.ends_with('-'))
        .find(|id| {
            let prefix = format!("{before}{id}{after}");
            prefix.starts_with(owner::OWNER_MARKERS) || owner::OWNER_MARKERS.starts_with(&prefix)
        })
        .map(str::to_owned)
}

/// Validates the platform's storage section.
pub fn validate(spec: &StoragePlatform) -> Result<(), LayerError> {
    let bucket = &spec.bucket;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(LayerError::Config(format!(
            "bucket {bucket:?} is not a valid S3 bucket name"
        )));
    }
    policy::validate_prefix_template(&spec.prefix_template).map_err(LayerError::Config)?;
    if spec.prefix_template.starts_with(owner::OWNER_MARKERS) {
        return Err(LayerError::Config(format!(
            "prefixTemplate {:?} may not start with {}, where owner records live",
            spec.prefix_template,
            owner::OWNER_MARKERS
        )));
    }
    if let Some(org) = owner_overlap(&spec.prefix_template) {
        return Err(LayerError::Config(format!(
            "prefixTemplate {:?} renders org id {org:?} as a prefix overlapping {}, where owner records live",
            spec.prefix_template,
            owner::OWNER_MARKERS
        )));
    }
    if !(spec.iam_path.starts_with('/') && spec.iam_path.ends_with('/'))
        || spec
            .iam_path
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.')))
    {
        return Err(LayerError::Config(format!(
            "iamPath {:?} must start and end with '/' and hold only letters, digits, '-', '_', '.'",
            spec.iam_path
        )));
    }
    if spec.account_id.is_empty() || !spec.account_id.chars().all(|c| c.is_ascii_digit()) {
        return Err(LayerError::Config(format!(
            "accountId {:?} must be digits",
            spec.account_id
        )));
    }
    if spec.mode == StorageMode::Role && non_empty(&spec.oidc_issuer).is_none() {
        return Err(LayerError::Config("mode role needs oidcIssuer".to_owned()));
    }
    if spec.mode == StorageMode::Abac
        && (spec.shared_role_name.is_empty() || spec.shared_role_name.len() > 64)
    {
        return Err(LayerError::Config(
            "sharedRoleName must be 1-64 characters".to_owned(),
        ));
    }
    if spec.mode == StorageMode::Session {
        session_role(spec)?;
        session::Timing::of(spec).map_err(LayerError::Config)?;
        session::check_policy_size(&spec.bucket, &spec.prefix_template)
            .map_err(LayerError::Config)?;
    }
    Ok(())
}

/// The role of `session` mode, parsed; `None` in other modes.
fn session_role(spec: &StoragePlatform) -> Result<Option<SessionRole>, LayerError> {
    if spec.mode != StorageMode::Session {
        return Ok(None);
    }
    let arn = non_empty(&spec.session_role_arn)
        .ok_or_else(|| LayerError::Config("mode session needs sessionRoleArn".to_owned()))?;
    SessionRole::parse(&arn)
        .map(Some)
        .map_err(LayerError::Config)
}

impl StorageLayer {
    /// Builds the layer with static admin credentials (no environment or instance-metadata
    /// lookups). Makes no request: the backend is first contacted by `prepare`.
    pub fn connect(
        spec: &StoragePlatform,
        access_key: &str,
        secret_key: &str,
    ) -> Result<Self, LayerError> {
        validate(spec)?;
        if access_key.is_empty() || secret_key.is_empty() {
            return Err(LayerError::Config(
                "the storage admin credentials are empty".to_owned(),
            ));
        }
        let s3_endpoint = non_empty(&spec.endpoint);
        let conn = Connection {
            iam_endpoint: non_empty(&spec.iam_endpoint).or_else(|| s3_endpoint.clone()),
            s3_endpoint: s3_endpoint.clone(),
            region: spec.region.clone(),
            force_path_style: spec.force_path_style,
            calls: CallCounter::default(),
        };
        let creds =
            AwsCredentials::new(access_key, secret_key, None, None, "bulkhead-storage-admin");
        let style = spec.guard_style.unwrap_or(if s3_endpoint.is_some() {
            GuardStyle::AllUsers
        } else {
            GuardStyle::PathCondition
        });
        let timing = if spec.mode == StorageMode::Session {
            session::Timing::of(spec).map_err(LayerError::Config)?
        } else {
            session::Timing {
                duration_seconds: session::MIN_DURATION_SECONDS,
                refresh_before_seconds: session::MIN_DURATION_SECONDS / 2,
            }
        };
        Ok(Self {
            spec: spec.clone(),
            style,
            s3: conn.s3(creds.clone()),
            iam: conn.iam(creds.clone()),
            sts: conn.sts(creds),
            conn,
            operator: OnceCell::new(),
            session: session_role(spec)?,
            timing,
        })
    }

    /// API calls made so far by this layer (admin and probes).
    pub fn api_calls(&self) -> u64 {
        self.conn.calls.get()
    }

    pub fn spec(&self) -> &StoragePlatform {
        &self.spec
    }

    /// The prefix an organization owns.
    pub fn prefix(&self, org: &OrgId) -> String {
        render_template(&self.spec.prefix_template, org)
    }

    /// The key of an organization's canary object.
    pub fn canary_key(&self, org: &OrgId) -> String {
        format!("{}{CANARY_KEY}", self.prefix(org))
    }

    async fn operator(&self) -> Result<&Operator, LayerError> {
        self.operator
            .get_or_try_init(|| async {
                let out = call("GetCallerIdentity", self.sts.get_caller_identity().send()).await?;
                let arn = out.arn().unwrap_or_default().to_owned();
                let user = arn
                    .split_once(":user/")
                    .map(|(_, rest)| rest.rsplit('/').next().unwrap_or(rest).to_owned());
                Ok::<_, LayerError>(Operator { arn, user })
            })
            .await
    }

    /// The planned guard.
    async fn guard(&self) -> Result<BucketGuard, LayerError> {
        let mut exempt = self.spec.guard_exempt_users.clone();
        if self.style == GuardStyle::AllUsers {
            let op = self.operator().await?;
            match &op.user {
                Some(u) => exempt.push(u.clone()),
                None => {
                    return Err(LayerError::Config(format!(
                        "guardStyle allUsers needs the operator to be an IAM user (it is {:?}), or it would lock itself out",
                        op.arn
                    )));
                }
            }
        }
        Ok(BucketGuard {
            style: self.style,
            account_id: self.spec.account_id.clone(),
            bucket: self.spec.bucket.clone(),
            prefix_template: self.spec.prefix_template.clone(),
            iam_path: self.spec.iam_path.clone(),
            by_tag: matches!(self.spec.mode, StorageMode::Role | StorageMode::Abac),
            exempt_users: exempt,
            sessions: self.session.clone(),
        })
    }

    /// The bucket policy text, `None` when the bucket has none.
    async fn bucket_policy_text(&self) -> Result<Option<String>, LayerError> {
        let req = self.s3.get_bucket_policy().bucket(&self.spec.bucket).send();
        let out = call_opt("GetBucketPolicy", "NoSuchBucketPolicy", req).await?;
        Ok(out.and_then(|o| o.policy().map(str::to_owned)))
    }

    /// State of the guard and the policy's size in bytes.
    pub async fn guard_state(&self) -> Result<(GuardState, usize), LayerError> {
        let text = self.bucket_policy_text().await?;
        let policy = BucketPolicy::parse(text.as_deref()).map_err(LayerError::Backend)?;
        let planned = self.guard().await?.statement_values();
        Ok((
            policy.guard_state(&planned),
            text.map(|t| t.len()).unwrap_or(0),
        ))
    }

    /// The raw bucket policy (tests and benchmarks read its size and foreign statements).
    pub async fn bucket_policy(&self) -> Result<Option<String>, LayerError> {
        self.bucket_policy_text().await
    }

    async fn ensure_bucket(&self) -> Result<Vec<Repair>, LayerError> {
        let bucket = &self.spec.bucket;
        match self.s3.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(Vec::new()),
            Err(e) => {
                let err = api_error("HeadBucket", &e);
                if err.status != Some(404) {
                    return Err(err.into_layer());
                }
                let mut req = self.s3.create_bucket().bucket(bucket);
                if self.spec.region != "us-east-1" && self.conn.s3_endpoint.is_none() {
                    req = req.create_bucket_configuration(
                        aws_sdk_s3::types::CreateBucketConfiguration::builder()
                            .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                                self.spec.region.as_str(),
                            ))
                            .build(),
                    );
                }
                match req.send().await {
                    Ok(_) => Ok(vec![Repair(format!("bucket {bucket} created"))]),
                    Err(e) => {
                        let err = api_error("CreateBucket", &e);
                        // A concurrent prepare created it first.
                        if matches!(
                            err.code.as_deref(),
                            Some("BucketAlreadyOwnedByYou") | Some("BucketAlreadyExists")
                        ) {
                            Ok(Vec::new())
                        } else {
                            Err(err.into_layer())
                        }
                    }
                }
            }
        }
    }

    /// Puts the guard statement in place, leaving every other statement as it is.
    async fn ensure_guard(&self) -> Result<Vec<Repair>, LayerError> {
        let guard = self.guard().await?;
        let existing = self.bucket_policy_text().await?;
        let (state, write) = policy::merge_guard(existing.as_deref(), &guard).map_err(|e| {
            LayerError::Backend(format!(
                "the bucket policy of {} cannot be read, so it is left alone: {e}",
                self.spec.bucket
            ))
        })?;
        let Some(text) = write else {
            return Ok(Vec::new());
        };
        let req = self.s3.put_bucket_policy().bucket(&self.spec.bucket);
        call("PutBucketPolicy", req.policy(text).send()).await?;
        let what = match state {
            GuardState::Missing => "bucket-policy guard statement was missing; installed",
            _ => "bucket-policy guard statement was edited; restored",
        };
        Ok(vec![Repair(what.to_owned())])
    }

    async fn put_canary(&self, org: &OrgId) -> Result<(), LayerError> {
        let body = canary_body(org);
        let req = self.s3.put_object().bucket(&self.spec.bucket);
        let req = req.key(self.canary_key(org));
        call(
            "PutObject canary",
            req.body(ByteStream::from(body.into_bytes())).send(),
        )
        .await?;
        Ok(())
    }

    /// Writes the Secret keys common to every mode.
    fn write_location(&self, tenant: &Tenant, creds: &mut Credentials) {
        creds.set(KEY_BUCKET, self.spec.bucket.clone());
        creds.set(KEY_PREFIX, self.prefix(&tenant.org_id));
        creds.set(KEY_REGION, self.spec.region.clone());
        creds.set(KEY_FORCE_PATH_STYLE, self.spec.force_path_style.to_string());
        match &self.conn.s3_endpoint {
            Some(ep) => creds.set(KEY_ENDPOINT, ep.clone()),
            None => creds.remove(KEY_ENDPOINT),
        }
    }

    /// One page of the objects under `prefix`, from its start.
    async fn list_prefix(
        &self,
        prefix: &str,
        max: i32,
    ) -> Result<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output, LayerError> {
        let req = self.s3.list_objects_v2().bucket(&self.spec.bucket);
        call("ListObjectsV2", req.prefix(prefix).max_keys(max).send()).await
    }

    /// Deletes one object (absent is fine: S3 answers success).
    async fn delete_object(&self, op: &'static str, key: &str) -> Result<(), LayerError> {
        let req = self.s3.delete_object().bucket(&self.spec.bucket);
        call(op, req.key(key).send()).await?;
        Ok(())
    }

    /// Deletes every object under an organization's prefix: listed page by page, deleted in
    /// batches of at most 1,000 keys. Returns the number of objects deleted.
    pub async fn delete_prefix(&self, org: &OrgId) -> Result<u64, LayerError> {
        const MAX_PAGES: usize = 1_000_000;
        let prefix = self.prefix(org);
        let mut deleted = 0u64;
        for _ in 0..MAX_PAGES {
            // Always list from the start: the previous page is gone.
            let page = self.list_prefix(&prefix, 1000).await?;
            let keys: Vec<String> = page
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned))
                .collect();
            if keys.is_empty() {
                return Ok(deleted);
            }
            for batch in keys.chunks(1000) {
                let objects = batch
                    .iter()
                    .map(|k| {
                        aws_sdk_s3::types::ObjectIdentifier::builder()
                            .key(k)
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| LayerError::Backend(format!("DeleteObjects request: {e}")))?;
                let delete = aws_sdk_s3::types::Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| LayerError::Backend(format!("DeleteObjects request: {e}")))?;
                let req = self.s3.delete_objects().bucket(&self.spec.bucket);
                let out = call("DeleteObjects", req.delete(delete).send()).await?;
                if let Some(err) = out.errors().first() {
                    return Err(LayerError::Backend(format!(
                        "DeleteObjects under {prefix}: {} object(s) not deleted, first: {} {}",
                        out.errors().len(),
                        err.code().unwrap_or("?"),
                        err.message().unwrap_or("")
                    )));
                }
                deleted += batch.len() as u64;
            }
        }
        Err(LayerError::Backend(format!(
            "more than {MAX_PAGES} pages of objects under {prefix}"
        )))
    }
}

#[async_trait]
impl Layer for StorageLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Storage
    }

    async fn prepare(&self) -> Result<Vec<Repair>, LayerError> {
        let mut repairs = self.ensure_bucket().await?;
        repairs.extend(self.ensure_guard().await?);
        if self.spec.mode == StorageMode::Abac {
            repairs.extend(self.ensure_shared_role().await?);
        }
        self.put_canary(&OrgId::sentinel()).await?;
        Ok(repairs)
    }

    async fn ensure(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        self.check_not_exempt(&tenant.org_id).await?;
        // Every refusal is decided before anything is written.
        let data = self.claim_prefix(tenant).await?;
        let principal = self.claim_principal(tenant).await?;
        let mut repairs = self.record_prefix_owner(tenant, &data).await?;
        repairs.extend(self.converge_principal(tenant, creds, principal).await?);
        self.write_location(tenant, creds);
        self.put_canary(&tenant.org_id).await?;
        Ok(repairs)
    }

    async fn verify(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Verification, LayerError> {
        let mut findings = Vec::new();
        let (state, _) = self.guard_state().await?;
        findings.extend(state.finding());
        findings.extend(self.audit_org(tenant, creds).await?);
        let client = self.tenant_client(tenant, creds).await?;
        let probes = self.probes(tenant, &client).await;
        Ok(Verification {
            findings,
            probes,
            traffic: None,
        })
    }

    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError> {
        if self.exempt(&tenant.org_id).await? {
            return Ok(());
        }
        let owned = self.owns_prefix(tenant).await?;
        if owned && tenant.deletion_policy == crate::api::DeletionPolicy::Delete {
            self.delete_prefix(&tenant.org_id).await?;
        } else if owned {
            // Keep the organization's objects; only the operator's canary goes.
            let key = self.canary_key(&tenant.org_id);
            self.delete_object("DeleteObject canary", &key).await?;
        }
        self.remove_principal(tenant).await?;
        // Last, so that a cleanup cut short is retried as the owner; Retain keeps the record.
        if owned && tenant.deletion_policy == crate::api::DeletionPolicy::Delete {
            self.forget_prefix_owner(&tenant.org_id).await?;
        }
        Ok(())
    }

    async fn retire(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let repairs = if self.exempt(&tenant.org_id).await? {
            Vec::new()
        } else {
            self.remove_principal(tenant).await?
        };
        for key in CREDENTIAL_KEYS {
            creds.remove(key);
        }
        Ok(repairs)
    }

    fn identity(&self, org: &OrgId) -> Option<String> {
        match self.spec.mode {
            StorageMode::User | StorageMode::Role => Some(iam::principal_name(org)),
            StorageMode::Abac => None,
            StorageMode::Session => self.session_identity(org),
        }
    }

    fn renew_by(&self, creds: &Credentials) -> Option<k8s_openapi::jiff::Timestamp> {
        self.session_renew_by(creds)
    }

    async fn platform_status(
        &self,
        status: &mut crate::api::IsolationPlatformStatus,
    ) -> Result<(), LayerError> {
        let (state, bytes) = self.guard_state().await?;
        status.storage = Some(StorageAudit {
            guard_in_place: state == GuardState::InPlace,
            policy_bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        });
        Ok(())
    }
}

/// An API failure, reduced to what may be shown: operation, error code, HTTP status, message.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub op: &'static str,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
    /// No answer at all (connection refused, timeout).
    pub unreachable: bool,
}

impl ApiError {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// An explicit refusal by the server's access control.
    pub fn is_access_denied(&self) -> bool {
        self.is("AccessDenied") || (self.code.is_none() && self.status == Some(403))
    }

    pub fn describe(&self) -> String {
        let mut s = String::from(self.op);
        if let Some(c) = &self.code {
            s.push_str(": ");
            s.push_str(c);
        }
        if let Some(st) = self.status {
            s.push_str(&format!(" (HTTP {st})"));
        }
        if !self.message.is_empty() {
            s.push_str(": ");
            s.push_str(&self.message);
        }
        s
    }

    pub fn into_layer(self) -> LayerError {
        if self.unreachable {
            LayerError::Unreachable(self.describe())
        } else {
            LayerError::Backend(self.describe())
        }
    }
}

/// Sends one SDK request; its failure becomes a [`LayerError`] naming `op`.
pub(crate) async fn call<T, E>(
    op: &'static str,
    req: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
) -> Result<T, LayerError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    req.await.map_err(|e| api_error(op, &e).into_layer())
}

/// Like [`call`], with the error code `absent` meaning "not there": `None`.
pub(crate) async fn call_opt<T, E>(
    op: &'static str,
    absent: &str,
    req: impl std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
) -> Result<Option<T>, LayerError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match req.await {
        Ok(out) => Ok(Some(out)),
        Err(e) => {
            let err = api_error(op, &e);
            if err.is(absent) {
                Ok(None)
            } else {
                Err(err.into_layer())
            }
        }
    }
}

pub(crate) fn api_error<E>(op: &'static str, e: &SdkError<E, HttpResponse>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let unreachable = matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_));
    let message = match e {
        SdkError::ServiceError(_) => e.message().unwrap_or_default().to_owned(),
        // Connection-level errors carry no server text; their chain names the cause.
        other => aws_smithy_types::error::display::DisplayErrorContext(other).to_string(),
    };
    ApiError {
        op,
        code: e.code().map(str::to_owned),
        status: e.raw_response().map(|r| r.status().as_u16()),
        message,
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(template: &str) -> StoragePlatform {
        serde_json::from_value(serde_json::json!({
            "bucket": "files",
            "adminSecretRef": {"name": "s3"},
            "prefixTemplate": template,
        }))
        .unwrap()
    }

    #[test]
    fn templates_that_render_over_the_owner_records_are_refused() {
        // Shrunk counterexamples of the storage property test: org "bulkhead" would own
        // `.bulkhead/`, org "owners" `.bulkhead/owners/`.
        for (bad, org) in [
            (".{orgId}/", "bulkhead"),
            (".bulkhead/{orgId}/", "owners"),
            (".bulkhead/own{orgId}/", "ers"),
            (".bulkhead/{orgId}s/", "owner"),
        ] {
            let err = validate(&spec(bad)).unwrap_err().to_string();
            assert!(err.contains(&format!("{org:?}")), "{bad}: {err}");
        }
        for ok in [
            "{orgId}/",
            "tenants/{orgId}/",
            ".{orgId}-x/",
            "bulkhead/{orgId}/",
            ".bulkhead/x{orgId}/",
        ] {
            assert!(validate(&spec(ok)).is_ok(), "{ok}");
        }
    }
}
