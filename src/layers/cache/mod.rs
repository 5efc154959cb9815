//! Cache layer: one Redis ACL user per organization, limited to the organization's key and
//! channel prefix and to a deny-by-default command profile without keyspace-wide or dangerous
//! commands.
//!
//! Ownership: an owner record `bulkhead:owner:{orgId}` (outside every organization's patterns)
//! holds the owning Organization's UID; `ensure` refuses an org id another UID owns unless the
//! Organization adopts it explicitly, and `cleanup`/`retire` act only on what the UID owns.
//!
//! Drift is read per user with `ACL GETUSER` (never `ACL LIST`); users are persisted with
//! `ACL SAVE` only when the platform says the server runs with an aclfile, debounced so one batch
//! of changes costs one save. ACLs are per node, so every step runs on every known node.

pub mod probes;
pub mod rules;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
    Value,
};
use tokio::sync::Notify;

use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Repair, Tenant, Verification,
};
use crate::api::DeletionPolicy;
use crate::api::platform::CachePlatform;
use crate::tenant::OrgId;
use rules::{AclPlan, AclUser, CacheRules, Drift, RuleError};

/// Secret keys this layer writes.
pub const KEY_URL: &str = "REDIS_URL";
pub const KEY_USERNAME: &str = "REDIS_USERNAME";
pub const KEY_PASSWORD: &str = "REDIS_PASSWORD";
pub const KEY_KEY_PREFIX: &str = "REDIS_KEY_PREFIX";
pub const KEY_CHANNEL_PREFIX: &str = "REDIS_CHANNEL_PREFIX";
/// The PEM CA bundle that signs the servers' certificates (only with `caSecretRef`).
pub const KEY_CA_CERT: &str = "REDIS_CA_CERT";

/// Length of generated passwords (alphanumeric, ~238 bits).
const PASSWORD_LEN: usize = 40;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: the first `ACL SAVE` after a bulk change can block a large server for seconds.
const ADMIN_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// A change is saved once no further change arrived for this long...
const ACL_SAVE_QUIET: Duration = Duration::from_secs(3);
/// ...or at the latest this long after the first unsaved change.
const ACL_SAVE_MAX_DELAY: Duration = Duration::from_secs(30);
/// Keys unlinked per `UNLINK` during `Delete` cleanup.
const UNLINK_BATCH: usize = 500;
/// Annotation that names the Organization UID whose retained data may be taken over.
const ADOPT_ANNOTATION: &str = "bulkhead.dev/adopt-from";
/// Replaces the owner record only if it still names the expected owner (compare-and-set).
const OWNER_CAS_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0";
/// Deletes the owner record only if it still names the expected owner.
const OWNER_DEL_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) end return 0";
/// Every Secret key this layer writes, removed by `retire`.
const KEYS_WRITTEN: [&str; 6] = [
    KEY_URL,
    KEY_USERNAME,
    KEY_PASSWORD,
    KEY_KEY_PREFIX,
    KEY_CHANNEL_PREFIX,
    KEY_CA_CERT,
];

/// Who owns an org id in this backend, according to its owner record.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    /// The record names this Organization's UID.
    Me,
    /// The record names another Organization's UID.
    Other(String),
    /// No record.
    Nobody,
}

impl From<RuleError> for LayerError {
    fn from(e: RuleError) -> Self {
        match e {
            RuleError::BadOrgId(..) | RuleError::PrefixCoversOwnerRecords { .. } => {
                LayerError::Refused(e.to_string())
            }
            _ => LayerError::Config(e.to_string()),
        }
    }
}

/// Builds the cache layer for a platform: reads the admin URL Secret and connects.
pub async fn build(env: &BuildEnv<'_>) -> LayerSlot {
    let Some(spec) = env.platform.spec.cache.as_ref() else {
        return Err(LayerError::Config(
            "the platform has no cache section".to_owned(),
        ));
    };
    let url = env.secret_key(&spec.admin_url_secret_ref).await?;
    let ca = match &spec.ca_secret_ref {
        Some(sel) => Some(env.secret_key(sel).await?),
        None => None,
    };
    let layer = CacheLayer::connect_with_ca(spec, &url, ca.as_deref()).await?;
    Ok(Arc::new(layer))
}

/// The cache layer for one platform.
#[derive(Clone)]
pub struct CacheLayer {
    inner: Arc<Inner>,
}

struct Inner {
    spec: CachePlatform,
    rules: CacheRules,
    admin: ConnectionInfo,
    tls: bool,
    /// The admin address with the trusted roots when the platform names a CA (`None`: the
    /// system's roots); other nodes' addresses take its TLS settings.
    tls_template: Option<ConnectionAddr>,
    /// The CA bundle handed to organizations in `REDIS_CA_CERT`.
    ca_pem: Option<String>,
    /// `host:port` of the admin URL: the primary, where data (canaries, cleanup) is written.
    primary: String,
    db: i64,
    /// Every node ACLs are applied on, the primary first.
    nodes: Mutex<Vec<String>>,
    conns: Mutex<BTreeMap<String, MultiplexedConnection>>,
    /// Per node: the server's own description of the command profile (the reference user).
    reference: Mutex<BTreeMap<String, AclUser>>,
    saves: Arc<SaveState>,
    /// `CLUSTER NODES` answered: keys live on several primaries.
    cluster: AtomicBool,
}

/// Debounced `ACL SAVE` state shared with the background saver.
#[derive(Default)]
struct SaveState {
    dirty: AtomicBool,
    changes: AtomicU64,
    wake: Notify,
}

fn unreachable(node: &str, e: &redis::RedisError) -> LayerError {
    LayerError::Unreachable(format!("redis {node}: {}", safe_error(e)))
}

/// Connection failures in words. TLS failures (an untrusted certificate, a name mismatch, a
/// server that does not speak TLS) are told as such; the I/O error text names no credentials.
fn connect_failed(node: &str, tls: bool, e: &redis::RedisError) -> LayerError {
    if tls && e.is_io_error() {
        let text: String = e.to_string().chars().take(300).collect();
        let lower = text.to_ascii_lowercase();
        let hint = if lower.contains("certificate") || lower.contains("unknownissuer") {
            " (the server's certificate is not trusted: check the CA in the cache section's caSecretRef)"
        } else if lower.contains("corrupt")
            || lower.contains("invalidcontenttype")
            || lower.contains("handshake")
            || lower.contains("timed out")
        {
            " (no TLS handshake: does this port serve TLS?)"
        } else {
            ""
        };
        return LayerError::Unreachable(format!(
            "redis {node}: TLS connection failed: {text}{hint}"
        ));
    }
    unreachable(node, e)
}

fn backend(node: &str, what: &str, e: &redis::RedisError) -> LayerError {
    LayerError::Backend(format!("redis {node}: {what}: {}", safe_error(e)))
}

/// A Redis error in words; server replies and I/O errors never carry credentials.
fn safe_error(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => format!("{:?}", e.kind()).chars().take(200).collect(),
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn node_addr(
    tls: bool,
    tls_template: Option<&ConnectionAddr>,
    node: &str,
) -> Result<ConnectionAddr, LayerError> {
    let (host, port) = node
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| LayerError::Config(format!("cache node {node:?} is not host:port")))?;
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: match tls_template {
                Some(ConnectionAddr::TcpTls { tls_params, .. }) => tls_params.clone(),
                _ => None,
            },
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    })
}

fn addr_string(addr: &ConnectionAddr) -> Option<(String, bool)> {
    match addr {
        ConnectionAddr::Tcp(h, p) => Some((join_host_port(h, *p), false)),
        ConnectionAddr::TcpTls { host, port, .. } => Some((join_host_port(host, *port), true)),
        _ => None,
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl CacheLayer {
    /// Validates the platform's cache settings (before any Redis call), then connects to the
    /// admin URL and discovers further nodes when asked to.
    pub async fn connect(spec: &CachePlatform, admin_url: &str) -> Result<CacheLayer, LayerError> {
        Self::connect_with_ca(spec, admin_url, None).await
    }

    /// [`CacheLayer::connect`] trusting the PEM bundle `ca_pem` (the platform's `caSecretRef`)
    /// instead of the system's roots; it requires a `rediss://` admin URL.
    pub async fn connect_with_ca(
        spec: &CachePlatform,
        admin_url: &str,
        ca_pem: Option<&str>,
    ) -> Result<CacheLayer, LayerError> {
        let rules = CacheRules::from_spec(spec)?;
        let tenant_endpoint = spec.tenant_endpoint.as_deref();
        if let Some(ep) = tenant_endpoint {
            node_addr(false, None, ep)?;
        }
        for n in &spec.nodes {
            node_addr(false, None, n)?;
        }
        if admin_url.starts_with("rediss://") {
            install_tls_provider();
        }
        let admin = admin_url.into_connection_info().map_err(|_| {
            LayerError::Config(
                "the cache admin URL does not parse as a redis:// or rediss:// URL".into(),
            )
        })?;
        let (primary, tls) = addr_string(admin.addr()).ok_or_else(|| {
            LayerError::Config("the cache admin URL must name a TCP host, not a socket".into())
        })?;
        let db = admin.redis_settings().db();
        let tls_template = match ca_pem {
            None => None,
            Some(_) if !tls => {
                return Err(LayerError::Config(
                    "the cache section names a CA (caSecretRef) but the admin URL is not rediss://"
                        .into(),
                ));
            }
            Some(pem) => Some(tls_addr_for(&admin, pem)?),
        };
        let mut nodes = vec![primary.clone()];
        for n in &spec.nodes {
            if !nodes.contains(n) {
                nodes.push(n.clone());
            }
        }
        let inner = Arc::new(Inner {
            spec: spec.clone(),
            rules,
            admin,
            tls,
            tls_template,
            ca_pem: ca_pem.map(str::to_owned),
            primary,
            db,
            nodes: Mutex::new(nodes),
            conns: Mutex::new(BTreeMap::new()),
            reference: Mutex::new(BTreeMap::new()),
            saves: Arc::new(SaveState::default()),
            cluster: AtomicBool::new(false),
        });
        let layer = CacheLayer { inner };
        let primary = layer.inner.primary.clone();
        layer.admin_conn(&primary).await?;
        if spec.discover_nodes {
            layer.discover().await?;
        }
        if spec.acl_file {
            spawn_saver(Arc::downgrade(&layer.inner), layer.inner.saves.clone());
        }
        Ok(layer)
    }

    pub fn rules(&self) -> &CacheRules {
        &self.inner.rules
    }

    /// The nodes ACLs are applied on, the primary first.
    pub fn nodes(&self) -> Vec<String> {
        self.inner
            .nodes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// The plan for a raw org id, validated here again so a bad id never reaches Redis.
    pub fn plan_for(&self, raw_org: &str, password: &str) -> Result<AclPlan, LayerError> {
        let org = rules::checked_org(raw_org)?;
        Ok(self
            .inner
            .rules
            .plan(&org, &rules::password_sha256(password))?)
    }

    /// How many ACL changes were made since this layer was built (for tests and metrics).
    pub fn acl_changes(&self) -> u64 {
        self.inner.saves.changes.load(Ordering::Relaxed)
    }

    /// The address of `node` with the admin URL's scheme and the platform's trusted roots.
    fn node_addr(&self, node: &str) -> Result<ConnectionAddr, LayerError> {
        node_addr(self.inner.tls, self.inner.tls_template.as_ref(), node)
    }

    async fn admin_conn(&self, node: &str) -> Result<MultiplexedConnection, LayerError> {
        if let Some(c) = self
            .inner
            .conns
            .lock()
            .ok()
            .and_then(|m| m.get(node).cloned())
        {
            return Ok(c);
        }
        let info = self.inner.admin.clone().set_addr(self.node_addr(node)?);
        let client = redis::Client::open(info).map_err(|e| unreachable(node, &e))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(ADMIN_RESPONSE_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| connect_failed(node, self.inner.tls, &e))?;
        if let Ok(mut m) = self.inner.conns.lock() {
            m.insert(node.to_owned(), conn.clone());
        }
        Ok(conn)
    }

    /// Runs one admin command on `node`; a broken connection is dropped so the next call reconnects.
    async fn admin_cmd(
        &self,
        node: &str,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<Value, LayerError> {
        let mut target = node.to_owned();
        let mut reconnected = false;
        let mut redirected = false;
        loop {
            let mut conn = self.admin_conn(&target).await?;
            match cmd.query_async::<Value>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    if let Ok(mut m) = self.inner.conns.lock() {
                        m.remove(&target);
                    }
                    // A node that restarted since the last pass: reconnect once (every admin
                    // command the layer sends may run twice).
                    if !reconnected {
                        reconnected = true;
                        continue;
                    }
                    return Err(unreachable(&target, &e));
                }
                Err(e) => {
                    // A cluster key whose slot another primary serves: follow MOVED once.
                    if let Some((to, _slot)) = e.redirect_node().filter(|_| !redirected) {
                        let to = to.to_owned();
                        self.node_addr(&to)?;
                        redirected = true;
                        target = to;
                        continue;
                    }
                    return Err(backend(&target, what, &e));
                }
            }
        }
    }

    /// Adds replicas (`ROLE`) and cluster nodes (`CLUSTER NODES`) of the primary to the node list.
    pub async fn discover(&self) -> Result<Vec<String>, LayerError> {
        let primary = self.inner.primary.clone();
        let role = self
            .admin_cmd(&primary, "ROLE", &redis::cmd("ROLE"))
            .await?;
        let mut found = rules::parse_role_replicas(&role);
        // Fails with an error when cluster mode is off; that only means there is nothing to add.
        if let Ok(v) = self
            .admin_cmd(
                &primary,
                "CLUSTER NODES",
                redis::cmd("CLUSTER").arg("NODES"),
            )
            .await
        {
            let text = match &v {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::VerbatimString { text, .. } => text.clone(),
                _ => String::new(),
            };
            let cluster = rules::parse_cluster_nodes(&text);
            if !cluster.is_empty() {
                self.inner.cluster.store(true, Ordering::Relaxed);
            }
            found.extend(cluster);
        }
        for n in &found {
            self.node_addr(n)?;
        }
        if let Ok(mut nodes) = self.inner.nodes.lock() {
            for n in &found {
                if !nodes.contains(n) {
                    nodes.push(n.clone());
                }
            }
        }
        Ok(found)
    }

    /// Writes the reference user on `node` and records the server's description of the profile.
    async fn refresh_reference(&self, node: &str) -> Result<AclUser, LayerError> {
        let plan = self.inner.rules.reference_plan()?;
        self.setuser(node, &plan).await?;
        let user = self.getuser(node, &plan.user).await?.ok_or_else(|| {
            LayerError::Backend(format!(
                "redis {node}: reference ACL user vanished right after ACL SETUSER"
            ))
        })?;
        if let Ok(mut r) = self.inner.reference.lock() {
            r.insert(node.to_owned(), user.clone());
        }
        Ok(user)
    }

    /// The reference user of every node: the one found is kept when the fingerprint key names
    /// the current profile and the user still has the reference's shape; otherwise it is
    /// written, and the fingerprint after every node has it.
    async fn prepare_references(&self) -> Result<(), LayerError> {
        let plan = self.inner.rules.reference_plan()?;
        let fingerprint = rules::reference_fingerprint(&plan);
        let key = self.inner.rules.reference_key()?;
        let primary = self.inner.primary.clone();
        let recorded = self
            .admin_cmd(
                &primary,
                "GET reference fingerprint",
                redis::cmd("GET").arg(&key),
            )
            .await?;
        let recorded = match recorded {
            Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        };
        for node in self.nodes() {
            match self.getuser(&node, &plan.user).await? {
                Some(user) if rules::reference_is_current(&plan, &user, recorded.as_deref()) => {
                    if let Ok(mut r) = self.inner.reference.lock() {
                        r.insert(node.clone(), user);
                    }
                }
                _ => {
                    self.refresh_reference(&node).await?;
                }
            }
        }
        if recorded.as_deref() != Some(fingerprint.as_str()) {
            self.admin_cmd(
                &primary,
                "SET reference fingerprint",
                redis::cmd("SET").arg(&key).arg(&fingerprint),
            )
            .await?;
        }
        Ok(())
    }

    async fn reference(&self, node: &str) -> Result<AclUser, LayerError> {
        if let Some(u) = self
            .inner
            .reference
            .lock()
            .ok()
            .and_then(|r| r.get(node).cloned())
        {
            return Ok(u);
        }
        self.refresh_reference(node).await
    }

    async fn getuser(&self, node: &str, user: &str) -> Result<Option<AclUser>, LayerError> {
        let v = self
            .admin_cmd(
                node,
                "ACL GETUSER",
                redis::cmd("ACL").arg("GETUSER").arg(user),
            )
            .await?;
        rules::parse_getuser(&v).map_err(|e| LayerError::Backend(format!("redis {node}: {e}")))
    }

    async fn setuser(&self, node: &str, plan: &AclPlan) -> Result<(), LayerError> {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&plan.user);
        for rule in plan.setuser_rules() {
            cmd.arg(rule);
        }
        self.admin_cmd(node, "ACL SETUSER", &cmd).await?;
        self.mark_dirty();
        Ok(())
    }

    /// Disconnects every client authenticated as `user` on `node`.
    async fn kill_clients(&self, node: &str, user: &str) -> Result<(), LayerError> {
        match self
            .admin_cmd(
                node,
                "CLIENT KILL",
                redis::cmd("CLIENT").arg("KILL").arg("USER").arg(user),
            )
            .await
        {
            Ok(_) => Ok(()),
            // "No such user": nothing to disconnect.
            Err(LayerError::Backend(m)) if m.contains("No such user") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mark_dirty(&self) {
        self.inner.saves.changes.fetch_add(1, Ordering::Relaxed);
        if self.inner.spec.acl_file {
            self.inner.saves.dirty.store(true, Ordering::Release);
            self.inner.saves.wake.notify_one();
        }
    }

    /// Saves the ACLs now on every node if there are unsaved changes (`aclFile` only). The
    /// background saver calls this after a quiet period; shutdown may call it directly.
    pub async fn persist_acl(&self) -> Result<bool, LayerError> {
        if !self.inner.spec.acl_file || !self.inner.saves.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        for node in self.nodes() {
            if let Err(e) = self
                .admin_cmd(&node, "ACL SAVE", redis::cmd("ACL").arg("SAVE"))
                .await
            {
                self.inner.saves.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(true)
    }

    /// The organization's password: the one in its credentials unless rotating or absent.
    fn password(tenant: &Tenant, creds: &Credentials) -> (String, bool) {
        match creds.get(KEY_PASSWORD).filter(|p| !p.is_empty()) {
            Some(p) if !tenant.rotate => (p.to_owned(), false),
            _ => (super::random_secret(PASSWORD_LEN), true),
        }
    }

    fn tenant_url(&self, user: &str, password: &str) -> String {
        let endpoint = self
            .inner
            .spec
            .tenant_endpoint
            .clone()
            .unwrap_or_else(|| self.inner.primary.clone());
        rules::tenant_url(self.inner.tls, user, password, &endpoint, self.inner.db)
    }

    /// Connection settings for the organization's own user on `node`.
    fn tenant_info(
        &self,
        node: &str,
        user: &str,
        password: &str,
    ) -> Result<ConnectionInfo, LayerError> {
        let settings = self
            .inner
            .admin
            .redis_settings()
            .clone()
            .set_username(user)
            .set_password(password)
            .set_skip_set_lib_name();
        Ok(self
            .inner
            .admin
            .clone()
            .set_addr(self.node_addr(node)?)
            .set_redis_settings(settings))
    }

    /// The owner record of `org` compared with `uid`.
    async fn owner(&self, org: &OrgId, uid: &str) -> Result<Owner, LayerError> {
        let key = self.inner.rules.owner_record_key(org)?;
        let primary = self.inner.primary.clone();
        let v = self
            .admin_cmd(&primary, "GET owner record", redis::cmd("GET").arg(&key))
            .await?;
        Ok(match v {
            Value::Nil => Owner::Nobody,
            Value::BulkString(b) if b == uid.as_bytes() => Owner::Me,
            Value::BulkString(b) => Owner::Other(String::from_utf8_lossy(&b).into_owned()),
            _ => {
                return Err(LayerError::Backend(format!(
                    "redis {primary}: owner record {key} is not a string"
                )));
            }
        })
    }

    /// Whether `org` has any state here: its ACL user on any node, or any key under its prefix.
    async fn has_state(&self, org: &OrgId) -> Result<bool, LayerError> {
        let user = self.inner.rules.user_name(org);
        for node in self.nodes() {
            if self.getuser(&node, &user).await?.is_some() {
                return Ok(true);
            }
        }
        let primary = self.inner.primary.clone();
        let canary = self.inner.rules.canary_key(org)?;
        let exists = self
            .admin_cmd(&primary, "EXISTS", redis::cmd("EXISTS").arg(&canary))
            .await?;
        if matches!(exists, Value::Int(n) if n > 0) {
            return Ok(true);
        }
        Ok(!self.scan_keys(org, Some(1)).await?.is_empty())
    }

    /// Records `uid` as the owner of `org` before anything is created, or refuses when the org
    /// id belongs to another Organization (or has state nobody recorded) and `tenant.adopt_from`
    /// does not name it.
    /// Records `tenant` as the owner of `org`'s Redis state, or refuses. `known_password` is the
    /// password the Organization's own credentials Secret already held: state without an owner
    /// record whose ACL user accepts exactly that password was made for this Organization (the
    /// record, kept in Redis data, was lost in a restart that kept the aclfile), and is
    /// recorded again without an annotation. Anyone else would have to know the password.
    async fn claim(
        &self,
        tenant: &Tenant,
        org: &OrgId,
        known_password: Option<&str>,
    ) -> Result<Vec<Repair>, LayerError> {
        let uid = tenant.owner.uid.as_str();
        if uid.is_empty() {
            return Err(LayerError::Refused(format!(
                "cache: Organization for orgId {org} has no UID to record as owner"
            )));
        }
        let key = self.inner.rules.owner_record_key(org)?;
        let primary = self.inner.primary.clone();
        // Twice at most: a concurrent claim can change the record between the read and the write.
        for _ in 0..2 {
            match self.owner(org, uid).await? {
                Owner::Me => return Ok(Vec::new()),
                Owner::Other(other) => {
                    if tenant.adopt_from.as_deref() != Some(other.as_str()) {
                        return Err(LayerError::Refused(format!(
                            "cache: orgId {org} is owned by Organization UID {other} (owner record {key}); it is not adopted. To take over its retained data, set the annotation {ADOPT_ANNOTATION}: {other}"
                        )));
                    }
                    let swapped = self
                        .admin_cmd(
                            &primary,
                            "re-record owner",
                            redis::cmd("EVAL")
                                .arg(OWNER_CAS_SCRIPT)
                                .arg(1)
                                .arg(&key)
                                .arg(&other)
                                .arg(uid),
                        )
                        .await?;
                    if swapped == Value::Int(1) {
                        return Ok(vec![Repair(format!(
                            "cache: re-attached retained data of Organization UID {other}"
                        ))]);
                    }
                }
                Owner::Nobody => {
                    let mut proven = false;
                    let legacy = if self.has_state(org).await? {
                        proven = self.password_proves(org, known_password).await?;
                        if !proven && tenant.adopt_from.as_deref() != Some(rules::ADOPT_LEGACY) {
                            return Err(LayerError::Refused(format!(
                                "cache: orgId {org} already has Redis state (ACL user {} or keys under {}) with no recorded owner; it is not adopted. To take it over, set the annotation {ADOPT_ANNOTATION}: {}",
                                self.inner.rules.user_name(org),
                                self.inner.rules.key_prefix(org)?,
                                rules::ADOPT_LEGACY
                            )));
                        }
                        true
                    } else {
                        false
                    };
                    let set = self
                        .admin_cmd(
                            &primary,
                            "record owner",
                            redis::cmd("SET").arg(&key).arg(uid).arg("NX"),
                        )
                        .await?;
                    if set == Value::Okay {
                        return Ok(if proven {
                            vec![Repair(format!(
                                "cache: the owner record of orgId {org} was lost (Redis kept its ACLs but not its data); the ACL user accepts this Organization's password, so it was recorded again"
                            ))]
                        } else if legacy {
                            vec![Repair(format!(
                                "cache: re-attached retained data of Organization UID {}",
                                rules::ADOPT_LEGACY
                            ))]
                        } else {
                            Vec::new()
                        });
                    }
                }
            }
        }
        Err(LayerError::Backend(format!(
            "redis {primary}: the owner record {key} changed concurrently; retrying"
        )))
    }

    /// Whether `org`'s ACL user, on the primary, accepts `password` and no other one.
    async fn password_proves(
        &self,
        org: &OrgId,
        password: Option<&str>,
    ) -> Result<bool, LayerError> {
        let Some(password) = password.filter(|p| !p.is_empty()) else {
            return Ok(false);
        };
        let primary = self.inner.primary.clone();
        let user = self
            .getuser(&primary, &self.inner.rules.user_name(org))
            .await?;
        Ok(user.is_some_and(|u| {
            u.passwords == std::collections::BTreeSet::from([rules::password_sha256(password)])
        }))
    }

    /// Whether `tenant` may remove `org`'s state: the record names its UID, or nothing is
    /// recorded and it explicitly adopts legacy state.
    async fn owns(&self, tenant: &Tenant, org: &OrgId) -> Result<bool, LayerError> {
        Ok(match self.owner(org, &tenant.owner.uid).await? {
            Owner::Me => !tenant.owner.uid.is_empty(),
            Owner::Other(_) => false,
            Owner::Nobody => tenant.adopt_from.as_deref() == Some(rules::ADOPT_LEGACY),
        })
    }

    /// Disconnects every client of `user` on every node the layer knows.
    async fn kill_everywhere(&self, user: &str) -> Result<(), LayerError> {
        for node in self.nodes() {
            self.kill_clients(&node, user).await?;
        }
        Ok(())
    }

    /// Deletes `user` on every node; returns the nodes where it existed.
    async fn delete_user_everywhere(&self, user: &str) -> Result<Vec<String>, LayerError> {
        let mut removed = Vec::new();
        for node in self.nodes() {
            // DELUSER also disconnects the user's clients.
            let deleted = self
                .admin_cmd(
                    &node,
                    "ACL DELUSER",
                    redis::cmd("ACL").arg("DELUSER").arg(user),
                )
                .await?;
            if matches!(deleted, Value::Int(n) if n > 0) {
                self.mark_dirty();
                removed.push(node);
            }
        }
        Ok(removed)
    }

    /// Sets `org`'s canary key as admin on the primary, unless it already holds the value.
    async fn write_canary(&self, org: &OrgId) -> Result<(), LayerError> {
        let key = self.inner.rules.canary_key(org)?;
        let primary = self.inner.primary.clone();
        let current = self
            .admin_cmd(&primary, "GET canary", redis::cmd("GET").arg(&key))
            .await?;
        if matches!(&current, Value::BulkString(b) if b.as_slice() == rules::CANARY_VALUE.as_bytes())
        {
            return Ok(());
        }
        self.admin_cmd(
            &primary,
            "SET canary",
            redis::cmd("SET").arg(&key).arg(rules::CANARY_VALUE),
        )
        .await?;
        Ok(())
    }

    /// The nodes whose keys a `SCAN` must cover: every node of a cluster (each primary serves
    /// its own slots), else the primary.
    fn scan_nodes(&self) -> Vec<String> {
        if self.inner.cluster.load(Ordering::Relaxed) {
            self.nodes()
        } else {
            vec![self.inner.primary.clone()]
        }
    }

    /// One `SCAN … MATCH pattern COUNT 1000` page on `node`: the next cursor and the keys.
    async fn scan_page(
        &self,
        node: &str,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), LayerError> {
        let primary = node;
        let reply = self
            .admin_cmd(
                primary,
                "SCAN",
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        parse_scan(&reply)
            .ok_or_else(|| LayerError::Backend(format!("redis {primary}: unexpected SCAN reply")))
    }

    /// Up to `limit` keys under `org`'s prefix (all when `None`), with `SCAN MATCH` on the
    /// primary (on every node of a cluster).
    async fn scan_keys(
        &self,
        org: &OrgId,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>, LayerError> {
        let pattern = self.inner.rules.scan_pattern(org)?;
        let mut found = Vec::new();
        for node in self.scan_nodes() {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self.scan_page(&node, &pattern, cursor).await?;
                found.extend(keys);
                if limit.is_some_and(|l| found.len() >= l) {
                    return Ok(found);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
    }

    /// Deletes every key under `org`'s prefix on the primary with `SCAN MATCH` and batched `UNLINK`.
    /// Returns the number of keys unlinked.
    pub async fn delete_keys(&self, org: &OrgId) -> Result<u64, LayerError> {
        if self.inner.cluster.load(Ordering::Relaxed) {
            return self.delete_keys_cluster(org).await;
        }
        let pattern = self.inner.rules.scan_pattern(org)?;
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        let mut pending: Vec<Vec<u8>> = Vec::new();
        loop {
            let (next, keys) = self
                .scan_page(&self.inner.primary, &pattern, cursor)
                .await?;
            pending.extend(keys);
            while pending.len() >= UNLINK_BATCH || (next == 0 && !pending.is_empty()) {
                let batch: Vec<Vec<u8>> =
                    pending.drain(..pending.len().min(UNLINK_BATCH)).collect();
                let mut cmd = redis::cmd("UNLINK");
                for k in &batch {
                    cmd.arg(k.as_slice());
                }
                if let Value::Int(n) = self.admin_cmd(&self.inner.primary, "UNLINK", &cmd).await? {
                    removed += u64::try_from(n).unwrap_or(0);
                }
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

/// The admin address with TLS settings that trust exactly the certificates in `pem`.
fn tls_addr_for(admin: &ConnectionInfo, pem: &str) -> Result<ConnectionAddr, LayerError> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(LayerError::Config(
            "the cache CA (caSecretRef) holds no PEM certificate".into(),
        ));
    }
    let client = redis::Client::build_with_tls(
        admin.clone(),
        TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.as_bytes().to_vec()),
        },
    )
    .map_err(|e| {
        LayerError::Config(format!(
            "the cache CA (caSecretRef) is not a usable PEM bundle: {}",
            safe_error(&e)
        ))
    })?;
    match client.get_connection_info().addr() {
        a @ ConnectionAddr::TcpTls {
            tls_params: Some(_),
            ..
        } => Ok(a.clone()),
        _ => Err(LayerError::Config(
            "the cache CA (caSecretRef) needs a rediss:// admin URL".into(),
        )),
    }
}

impl CacheLayer {
    /// [`CacheLayer::delete_keys`] on a cluster: `SCAN` on every node, one `UNLINK` per key (keys
    /// of one organization span slots; a replica's `MOVED` leads to the key's primary, and a key
    /// seen on a primary and its replica is counted once).
    async fn delete_keys_cluster(&self, org: &OrgId) -> Result<u64, LayerError> {
        let pattern = self.inner.rules.scan_pattern(org)?;
        let mut removed = 0u64;
        for node in self.nodes() {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self.scan_page(&node, &pattern, cursor).await?;
                for k in &keys {
                    if let Value::Int(n) = self
                        .admin_cmd(&node, "UNLINK", redis::cmd("UNLINK").arg(k.as_slice()))
                        .await?
                    {
                        removed += u64::try_from(n).unwrap_or(0);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }
}

fn parse_scan(v: &Value) -> Option<(u64, Vec<Vec<u8>>)> {
    let Value::Array(parts) = v else { return None };
    let cursor = match parts.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok()?,
        Value::SimpleString(s) => s.parse().ok()?,
        Value::Int(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let keys = match parts.get(1)? {
        Value::Array(k) => k
            .iter()
            .filter_map(|k| match k {
                Value::BulkString(b) => Some(b.clone()),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    Some((cursor, keys))
}

/// Runs `ACL SAVE` once per batch of changes: after a quiet period, or at the latest after a
/// maximum delay. Ends when the layer is dropped.
fn spawn_saver(layer: Weak<Inner>, state: Arc<SaveState>) {
    tokio::spawn(async move {
        loop {
            // Wake up now and then to notice the layer was dropped.
            if tokio::time::timeout(Duration::from_secs(30), state.wake.notified())
                .await
                .is_err()
            {
                if layer.strong_count() == 0 {
                    return;
                }
                continue;
            }
            let started = tokio::time::Instant::now();
            let mut seen = state.changes.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(ACL_SAVE_QUIET).await;
                let now = state.changes.load(Ordering::Relaxed);
                if now == seen || started.elapsed() >= ACL_SAVE_MAX_DELAY {
                    break;
                }
                seen = now;
            }
            let Some(inner) = layer.upgrade() else { return };
            let layer_now = CacheLayer { inner };
            if let Err(e) = layer_now.persist_acl().await {
                tracing::warn!(error = %e, "ACL SAVE failed; retrying with the next change");
            }
        }
    });
}

/// rustls needs one process-wide crypto provider when more than one is compiled in (ring and
/// aws-lc-rs both are); an already installed provider is kept.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[async_trait]
impl Layer for CacheLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Cache
    }

    /// Discovers nodes, makes sure of the reference user on each, and of the sentinel's canary.
    /// Nothing is written where both are already as planned (a restart writes nothing).
    async fn prepare(&self) -> Result<Vec<Repair>, LayerError> {
        if self.inner.spec.discover_nodes {
            self.discover().await?;
        }
        self.prepare_references().await?;
        self.write_canary(&OrgId::sentinel()).await?;
        Ok(Vec::new())
    }

    async fn ensure(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = rules::checked_org(tenant.org_id.as_str())?;
        let had_password = creds.get(KEY_PASSWORD).is_some_and(|p| !p.is_empty());
        let (password, new_password) = Self::password(tenant, creds);
        let plan = self
            .inner
            .rules
            .plan(&org, &rules::password_sha256(&password))?;
        let key_prefix = self.inner.rules.key_prefix(&org)?;
        let channel_prefix = self.inner.rules.channel_prefix(&org)?;
        // Ownership first: nothing is written for an org id another Organization owns.
        let known = creds.get(KEY_PASSWORD).map(str::to_owned);
        let mut repairs = self.claim(tenant, &org, known.as_deref()).await?;
        for node in self.nodes() {
            let mut reference = self.reference(&node).await?;
            let actual = self.getuser(&node, &plan.user).await?;
            let mut drift = rules::diff(&plan, actual.as_ref(), &reference);
            if drift.iter().any(|d| matches!(d, Drift::Commands { .. })) {
                // Either the user drifted or the reference did (it is kept across restarts):
                // write the reference again and judge once more before repairing.
                reference = self.refresh_reference(&node).await?;
                drift = rules::diff(&plan, actual.as_ref(), &reference);
            }
            if drift.is_empty() {
                continue;
            }
            self.setuser(&node, &plan).await?;
            let foreign_password = drift.contains(&Drift::Password) && !new_password;
            if foreign_password || drift.iter().any(|d| matches!(d, Drift::Flags { .. })) {
                // Someone else set a password or `nopass`: evict whoever logged in with it.
                self.kill_clients(&node, &plan.user).await?;
            }
            for d in drift {
                let expected = match d {
                    Drift::Missing => !had_password,
                    Drift::Password => new_password,
                    _ => false,
                };
                if !expected {
                    repairs.push(Repair(format!(
                        "cache: ACL user {} on {node}: {d}; restored",
                        plan.user
                    )));
                }
            }
        }
        if tenant.rotate {
            // Every node has the new password now: end the sessions the old one opened.
            self.kill_everywhere(&plan.user).await?;
        }
        self.write_canary(&org).await?;
        creds.set(KEY_URL, self.tenant_url(&plan.user, &password));
        creds.set(KEY_USERNAME, plan.user.clone());
        creds.set(KEY_PASSWORD, password);
        creds.set(KEY_KEY_PREFIX, key_prefix);
        creds.set(KEY_CHANNEL_PREFIX, channel_prefix);
        match &self.inner.ca_pem {
            Some(pem) => creds.set(KEY_CA_CERT, pem.clone()),
            None => creds.remove(KEY_CA_CERT),
        }
        Ok(repairs)
    }

    async fn verify(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Verification, LayerError> {
        let org = rules::checked_org(tenant.org_id.as_str())?;
        let mut peers = Vec::new();
        for p in &tenant.peers {
            peers.push(rules::checked_org(p.as_str())?);
        }
        let mut v = Verification::default();
        let Some(password) = creds.get(KEY_PASSWORD).filter(|p| !p.is_empty()) else {
            v.findings.push(
                "cache: the credentials hold no REDIS_PASSWORD; the ACL user is not provisioned"
                    .into(),
            );
            return Ok(v);
        };
        let plan = self
            .inner
            .rules
            .plan(&org, &rules::password_sha256(password))?;
        // A caller without the Organization's UID (a read-only audit) cannot judge ownership.
        let owner = if tenant.owner.uid.is_empty() {
            Owner::Me
        } else {
            self.owner(&org, &tenant.owner.uid).await?
        };
        match owner {
            Owner::Me => {}
            Owner::Other(other) => v.findings.push(format!(
                "cache: the owner record of orgId {org} names Organization UID {other}, not this Organization"
            )),
            Owner::Nobody => v.findings.push(format!(
                "cache: orgId {org} has no owner record; the next pass records this Organization"
            )),
        }
        let nodes = self.nodes();
        for node in &nodes {
            let reference = self.reference(node).await?;
            let actual = self.getuser(node, &plan.user).await?;
            for d in rules::diff(&plan, actual.as_ref(), &reference) {
                v.findings
                    .push(format!("cache: ACL user {} on {node}: {d}", plan.user));
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            let info = self.tenant_info(node, &plan.user, password)?;
            let target = probes::Target {
                rules: &self.inner.rules,
                org: &org,
                peers: &peers,
                node,
                primary: i == 0,
            };
            v.probes.extend(probes::run(&target, info).await);
        }
        Ok(v)
    }

    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError> {
        let org = rules::checked_org(tenant.org_id.as_str())?;
        if !self.owns(tenant, &org).await? {
            // Another Organization's (or nobody's) state: this one removes nothing.
            return Ok(());
        }
        let user = self.inner.rules.user_name(&org);
        match tenant.deletion_policy {
            DeletionPolicy::Retain => {
                for node in self.nodes() {
                    if self.getuser(&node, &user).await?.is_some() {
                        self.admin_cmd(
                            &node,
                            "ACL SETUSER",
                            redis::cmd("ACL")
                                .arg("SETUSER")
                                .arg(&user)
                                .arg("off")
                                .arg("resetpass"),
                        )
                        .await?;
                        self.mark_dirty();
                        // `off` does not end sessions that are already authenticated.
                        self.kill_clients(&node, &user).await?;
                    }
                }
                // The owner record stays with the retained keys: only an explicit adopt-from
                // hands them to another Organization.
            }
            DeletionPolicy::Delete => {
                self.delete_user_everywhere(&user).await?;
                self.delete_keys(&org).await?;
                // Last, so an interrupted cleanup is retried by the same owner.
                let key = self.inner.rules.owner_record_key(&org)?;
                let primary = self.inner.primary.clone();
                self.admin_cmd(
                    &primary,
                    "delete owner record",
                    redis::cmd("EVAL")
                        .arg(OWNER_DEL_SCRIPT)
                        .arg(1)
                        .arg(&key)
                        .arg(&tenant.owner.uid),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn retire(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = rules::checked_org(tenant.org_id.as_str())?;
        let mut repairs = Vec::new();
        if self.owns(tenant, &org).await? {
            let user = self.inner.rules.user_name(&org);
            for node in self.delete_user_everywhere(&user).await? {
                repairs.push(Repair(format!(
                    "cache: ACL user {user} on {node} removed (cache switched off; keys kept)"
                )));
            }
        }
        // The Organization's own Secret: its cache keys go whether or not it owned a user.
        let present: Vec<&str> = KEYS_WRITTEN
            .iter()
            .copied()
            .filter(|k| creds.get(k).is_some())
            .collect();
        if !present.is_empty() {
            for k in &present {
                creds.remove(k);
            }
            repairs.push(Repair(format!(
                "cache: removed {} from the credentials (cache switched off)",
                present.join(", ")
            )));
        }
        Ok(repairs)
    }

    fn identity(&self, org: &OrgId) -> Option<String> {
        Some(self.inner.rules.user_name(org))
    }
}
