//! Database layer: PostgreSQL Row-Level Security that the database itself enforces.
//!
//! `prepare` installs the platform objects (identity function, role mapping, group role,
//! registry) and one policy per governed table; `ensure` gives each organization a login role;
//! `verify` audits the catalog and attacks other organizations' canaries as that role.

pub mod audit;
pub mod catalog;
pub mod connect;
pub mod drift;
pub mod expr;
pub mod ident;
pub mod owner;
pub mod plan;
pub mod probe;
pub mod reaper;
pub mod settings;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, GenericClient};

use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Probe, Repair, Tenant,
    Verification,
};
use crate::api::DeletionPolicy;
use crate::api::platform::{DatabaseAudit, DatabasePlatform, IsolationPlatformStatus};
use crate::tenant::OrgId;
use audit::{AuditReport, Severity};
use catalog::{Catalog, TableState};
use connect::{CaBundle, Connector, KEY_CA_CERT};
use ident::{quote_ident, role_name};
use owner::Claim;
use settings::Settings;

/// Secret keys this layer writes.
pub const KEY_URL: &str = "DATABASE_URL";
pub const KEY_USER: &str = "DATABASE_USER";
pub const KEY_PASSWORD: &str = "DATABASE_PASSWORD";

/// Admin connections kept per platform.
const POOL_SIZE: usize = 4;
/// How long one audit serves `verify` calls before the catalog is read again.
const DEFAULT_AUDIT_TTL: Duration = Duration::from_secs(15);
/// Rows deleted per statement when an organization is deleted.
const DELETE_BATCH: i64 = 5_000;
/// Peers attacked per verification.
const MAX_PEERS: usize = 4;
/// How long an admin statement waits for a lock (a tenant's, or another pass's) before the pass
/// gives up and retries later: no pass can hang, and a DDL waiting in the lock queue blocks
/// tenants' queries behind it for at most this long.
pub const ADMIN_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin statement may run (index builds lift it for themselves).
pub const ADMIN_STATEMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Characters escaped in URL user info and path segments.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Describes a PostgreSQL error without the statement (statements may carry a verifier).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn backend(e: tokio_postgres::Error) -> LayerError {
    if e.as_db_error().is_none() && e.is_closed() {
        return LayerError::Unreachable(describe(&e));
    }
    match e.code() {
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => LayerError::Backend(format!(
            "gave up after waiting {}s for a lock held by another session; the next pass retries: {}",
            ADMIN_LOCK_TIMEOUT.as_secs(),
            describe(&e)
        )),
        Some(c) if *c == SqlState::QUERY_CANCELED => LayerError::Backend(format!(
            "an admin statement ran past its {}s timeout; the next pass retries: {}",
            ADMIN_STATEMENT_TIMEOUT.as_secs(),
            describe(&e)
        )),
        _ => LayerError::Backend(describe(&e)),
    }
}

/// A failed `prepare` attempt that keeps the SQLSTATE, so a race can be told apart by its code.
struct Attempt {
    error: LayerError,
    code: Option<SqlState>,
}

impl From<LayerError> for Attempt {
    fn from(error: LayerError) -> Self {
        Self { error, code: None }
    }
}

fn attempt(e: tokio_postgres::Error) -> Attempt {
    Attempt {
        code: e.code().cloned(),
        error: backend(e),
    }
}

/// Another database of the cluster (or another replica) created the same cluster-wide role,
/// schema or table at the same time: the statement failed on the other's object; retry once.
fn is_race(code: Option<&SqlState>) -> bool {
    code.is_some_and(|c| {
        *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// A small bounded pool of admin connections; broken ones are dropped and replaced.
struct AdminPool {
    config: Config,
    connector: Connector,
    idle: std::sync::Mutex<Vec<Client>>,
    permits: Semaphore,
}

struct Pooled<'a> {
    client: Option<Client>,
    pool: &'a AdminPool,
    _permit: SemaphorePermit<'a>,
}

impl Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("client present until drop")
    }
}
impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until drop")
    }
}
impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(c);
        }
    }
}

async fn open(config: &Config, connector: &Connector) -> Result<Client, LayerError> {
    let (client, _task) = connector
        .connect(config)
        .await
        .map_err(LayerError::Unreachable)?;
    Ok(client)
}

impl AdminPool {
    fn new(config: Config, connector: Connector) -> Self {
        Self {
            config,
            connector,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Semaphore::new(POOL_SIZE),
        }
    }

    async fn get(&self) -> Result<Pooled<'_>, LayerError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LayerError::Unreachable("pool closed".into()))?;
        let reused = {
            let mut idle = self
                .idle
                .lock()
                .map_err(|_| LayerError::Backend("pool poisoned".into()))?;
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let client = match reused {
            Some(c) => c,
            None => open(&self.config, &self.connector).await?,
        };
        Ok(Pooled {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

/// A catalog snapshot and its audit.
#[derive(Clone, Debug)]
pub struct AuditSnapshot {
    pub catalog: Catalog,
    pub report: AuditReport,
}

/// The database layer of one platform.
pub struct DatabaseLayer {
    settings: Settings,
    pool: AdminPool,
    /// Where tenants' workloads connect (`host:port`).
    tenant_host_port: String,
    dbname: String,
    audit_ttl: Duration,
    audit_cache: tokio::sync::Mutex<Option<(Instant, Arc<AuditSnapshot>)>>,
    /// `server_version_num`, which decides the role settings that exist.
    server_version: i32,
    /// The lock-hold reaper of this platform; stopped when the layer is dropped.
    reaper: tokio::task::AbortHandle,
    /// The drift listener of this platform (none until started); stopped when the layer is dropped.
    listener: Option<tokio::task::AbortHandle>,
}

impl Drop for DatabaseLayer {
    fn drop(&mut self) {
        self.reaper.abort();
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

impl std::fmt::Debug for DatabaseLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseLayer")
            .field("db", &self.dbname)
            .finish_non_exhaustive()
    }
}

/// The admin URL, parsed, with the TLS parameters of its query (which tokio-postgres does not
/// know) taken out.
fn parse_admin_url(url: &str) -> Result<(Config, connect::UrlTls), LayerError> {
    let tls = connect::split_url_tls(url);
    let config = parse_plain_admin_url(&tls.url)?;
    Ok((config, tls))
}

fn parse_plain_admin_url(url: &str) -> Result<Config, LayerError> {
    // The parser's message may quote the URL, and the URL holds the admin password.
    let mut config: Config = url.parse().map_err(|_| {
        LayerError::Config("database: the admin URL is not a valid PostgreSQL URL".into())
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("bulkhead");
    config.options(admin_options(config.get_options()));
    Ok(config)
}

/// Session options of every admin connection, after the URL's own: a search_path holding only
/// the system catalog (no tenant function or operator can shadow a name the operator uses) and
/// the admin timeouts.
fn admin_options(from_url: Option<&str>) -> String {
    let ours = format!(
        "-c search_path=pg_catalog,pg_temp -c lock_timeout={} -c statement_timeout={}",
        ADMIN_LOCK_TIMEOUT.as_millis(),
        ADMIN_STATEMENT_TIMEOUT.as_millis()
    );
    match from_url {
        Some(o) if !o.trim().is_empty() => format!("{o} {ours}"),
        _ => ours,
    }
}

fn host_port(config: &Config) -> Option<String> {
    let host = match config.get_hosts().first()? {
        Host::Tcp(h) if h.contains(':') => format!("[{h}]"),
        Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Some(format!("{host}:{port}"))
}

/// The organization's connection URL; user, password and database are percent-encoded.
/// `query` carries the TLS mode (see [`connect::tenant_url_query`]).
pub fn tenant_url(
    host_port: &str,
    dbname: &str,
    user: &str,
    password: &str,
    query: &str,
) -> String {
    format!(
        "postgres://{}:{}@{host_port}/{}{query}",
        utf8_percent_encode(user, URL_COMPONENT),
        utf8_percent_encode(password, URL_COMPONENT),
        utf8_percent_encode(dbname, URL_COMPONENT)
    )
}

/// The connector for a platform: `sslMode` (else the URL's `sslmode`), and the CA from
/// `caSecretRef` (else the file the URL's `sslrootcert` names, for the CLI).
async fn connector_for(
    spec: &DatabasePlatform,
    url_tls: &connect::UrlTls,
    ca: Option<CaBundle>,
) -> Result<Connector, LayerError> {
    let mode = connect::effective_mode(spec.ssl_mode, url_tls.sslmode.as_deref())?;
    let ca = match (ca, &url_tls.sslrootcert) {
        (Some(ca), _) => Some(ca),
        (None, Some(path)) if path != "system" => Some(CaBundle {
            pem: tokio::fs::read_to_string(path).await.map_err(|e| {
                LayerError::Config(format!("database: cannot read sslrootcert {path}: {e}"))
            })?,
            source: format!("file {path}"),
        }),
        _ => None,
    };
    Connector::new(mode, ca.as_ref())
}

impl DatabaseLayer {
    /// Validates the spec, connects as admin and checks that the admin can do its work.
    pub async fn connect(spec: &DatabasePlatform, admin_url: &str) -> Result<Self, LayerError> {
        Self::connect_with_ca(spec, admin_url, None).await
    }

    /// [`Self::connect`] with the CA bundle that `caSecretRef` names, read by the caller.
    pub async fn connect_with_ca(
        spec: &DatabasePlatform,
        admin_url: &str,
        ca: Option<CaBundle>,
    ) -> Result<Self, LayerError> {
        let settings = Settings::from_spec(spec)?;
        let (config, url_tls) = parse_admin_url(admin_url)?;
        let connector = connector_for(spec, &url_tls, ca).await?;
        let tenant_host_port = match &settings.tenant_endpoint {
            Some(ep) => ep.clone(),
            None => host_port(&config).ok_or_else(|| {
                LayerError::Config(
                    "database: tenantEndpoint is required when the admin URL is not host:port"
                        .into(),
                )
            })?,
        };
        let client = open(&config, &connector).await?;
        let row = client
            .query_one(
                "SELECT r.rolsuper OR r.rolbypassrls, r.rolsuper OR r.rolcreaterole,
                        pg_catalog.current_database()::pg_catalog.text,
                        pg_catalog.current_setting('server_version_num')::pg_catalog.int4
                 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER",
                &[],
            )
            .await
            .map_err(backend)?;
        let (bypass, create_role, dbname, server_version): (bool, bool, String, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !bypass || !create_role {
            return Err(LayerError::Config(
                "database: the admin role needs BYPASSRLS (or SUPERUSER) and CREATEROLE".into(),
            ));
        }
        let reaper = reaper::spawn(config.clone(), connector.clone(), &settings);
        let pool = AdminPool::new(config, connector);
        if let Ok(mut idle) = pool.idle.lock() {
            idle.push(client);
        }
        Ok(Self {
            settings,
            pool,
            tenant_host_port,
            dbname,
            audit_ttl: DEFAULT_AUDIT_TTL,
            audit_cache: tokio::sync::Mutex::new(None),
            server_version,
            reaper,
            listener: None,
        })
    }

    /// Starts the drift listener: each notification of the event triggers (see [`drift`])
    /// sends `platform` to `tx`.
    pub fn with_drift_listener(
        mut self,
        platform: String,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Self {
        if let Some(old) = self.listener.take() {
            old.abort();
        }
        self.listener = Some(drift::spawn_listener(
            self.pool.config.clone(),
            self.pool.connector.clone(),
            platform,
            tx,
        ));
        self
    }

    /// How long an audit is reused by `verify` (zero: every call reads the catalog).
    pub fn with_audit_ttl(mut self, ttl: Duration) -> Self {
        self.audit_ttl = ttl;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `server_version_num` of the server.
    pub fn server_version(&self) -> i32 {
        self.server_version
    }

    /// Findings of the current audit, typed: breaches and warnings stay apart.
    pub async fn findings(&self) -> Result<Vec<audit::Finding>, LayerError> {
        Ok(self.audit().await?.report.findings.clone())
    }

    /// The login role of an organization.
    pub fn role_of(&self, org: &OrgId) -> String {
        role_name(&self.settings.role_prefix, org)
    }

    async fn invalidate_audit(&self) {
        *self.audit_cache.lock().await = None;
    }

    /// The catalog snapshot and its audit, reused for `audit_ttl`.
    pub async fn audit(&self) -> Result<Arc<AuditSnapshot>, LayerError> {
        let mut cache = self.audit_cache.lock().await;
        if let Some((at, report)) = cache.as_ref()
            && at.elapsed() < self.audit_ttl
        {
            return Ok(report.clone());
        }
        let mut client = self.pool.get().await?;
        let fresh = Arc::new(read_and_audit(&mut client, &self.settings).await?);
        *cache = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    /// Governed tables of the last audit, whatever its age (canaries only), or of a fresh one.
    async fn governed_tables(&self) -> Result<Vec<TableState>, LayerError> {
        let cached = self
            .audit_cache
            .lock()
            .await
            .as_ref()
            .map(|(_, a)| a.clone());
        let snapshot = match cached {
            Some(a) => a,
            None => self.audit().await?,
        };
        Ok(snapshot.catalog.governable_tables().cloned().collect())
    }

    async fn prepare_once(&self) -> Result<Vec<Repair>, Attempt> {
        let s = &self.settings;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(attempt)?;
        let has_locks: bool = tx
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[&s.locks.to_string()],
            )
            .await
            .map_err(attempt)?
            .get(0);
        if !has_locks {
            for stmt in plan::locks_table(s) {
                tx.batch_execute(&stmt).await.map_err(attempt)?;
            }
        }
        take_lock(&tx, s, "prepare").await.map_err(attempt)?;
        let cat = catalog::read(&tx, s).await?;
        let boot = plan::bootstrap(s, &cat);
        for stmt in &boot.statements {
            tx.batch_execute(stmt).await.map_err(attempt)?;
        }
        let cat = if boot.statements.is_empty() {
            cat
        } else {
            catalog::read(&tx, s).await?
        };
        let installed = drift::install(&tx, s).await.map_err(attempt)?;
        let gov = plan::govern_tables(s, &cat);
        for stmt in &gov.statements {
            tx.batch_execute(stmt).await.map_err(attempt)?;
        }
        let sentinel = OrgId::sentinel();
        upsert_registry(&tx, s, &sentinel, "bulkhead sentinel").await?;
        let tables: Vec<TableState> = cat.governable_tables().cloned().collect();
        plant_canaries(&tx, s, &tables, sentinel.as_str()).await?;
        tx.commit().await.map_err(attempt)?;
        if !gov.concurrent.is_empty() {
            // An index build may take long on a big table; it still gives up on a held lock.
            client
                .batch_execute("SET statement_timeout = 0")
                .await
                .map_err(attempt)?;
            let built = async {
                for stmt in &gov.concurrent {
                    client.batch_execute(stmt).await?;
                }
                Ok::<(), tokio_postgres::Error>(())
            }
            .await;
            client
                .batch_execute("RESET statement_timeout")
                .await
                .map_err(attempt)?;
            built.map_err(attempt)?;
        }
        let mut repairs = boot.repairs;
        repairs.extend(installed.repairs.into_iter().map(Repair));
        repairs.extend(gov.repairs);
        Ok(repairs)
    }

    async fn admin_targets(
        &self,
        tenant: &Tenant,
        tables: &[TableState],
    ) -> Result<probe::Targets, LayerError> {
        let s = &self.settings;
        let client = self.pool.get().await?;
        let me = tenant.org_id.as_str();
        let mut own_rows_in = Vec::new();
        for t in tables {
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {}.{} WHERE {} OPERATOR(pg_catalog.=) $1::pg_catalog.text)",
                quote_ident(&t.schema),
                quote_ident(&t.name),
                s.tenant_column
            );
            if client
                .query_one(&sql, &[&me])
                .await
                .map_err(backend)?
                .get::<_, bool>(0)
            {
                own_rows_in.push(t.qualified());
            }
        }
        let peers: Vec<String> = tenant
            .peers
            .iter()
            .filter(|p| **p != tenant.org_id)
            .take(MAX_PEERS)
            .map(|p| p.as_str().to_owned())
            .collect();
        let role = self.role_of(&tenant.org_id);
        let mut candidates: Vec<String> = tenant
            .peers
            .iter()
            .filter(|p| !p.is_sentinel() && **p != tenant.org_id)
            .take(MAX_PEERS)
            .map(|p| self.role_of(p))
            .collect();
        candidates.extend(tables.iter().map(|t| t.owner.clone()));
        let existing: Vec<String> = client
            .query(
                "SELECT r.rolname::pg_catalog.text FROM pg_catalog.pg_roles r
                 WHERE r.rolname OPERATOR(pg_catalog.=) ANY($1::pg_catalog.name[])
                   AND r.rolname OPERATOR(pg_catalog.<>) $2::pg_catalog.name ORDER BY 1",
                &[&candidates, &role],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(probe::Targets {
            org: me.to_owned(),
            role,
            peers,
            foreign_roles: existing,
            tables: tables.to_vec(),
            own_rows_in,
        })
    }

    fn tenant_config(&self, user: &str, password: &str) -> Config {
        let mut c = self.pool.config.clone();
        c.user(user)
            .password(password)
            .application_name("bulkhead-probe")
            .options("-c statement_timeout=15000");
        c
    }

    async fn delete_rows(&self, org: &OrgId) -> Result<(), LayerError> {
        let s = &self.settings;
        let client = self.pool.get().await?;
        let tables: Vec<TableState> = {
            let mut c = client;
            let tx = c.transaction().await.map_err(backend)?;
            let cat = catalog::read(&tx, s).await?;
            tx.rollback().await.map_err(backend)?;
            cat.governable_tables().cloned().collect()
        };
        let client = self.pool.get().await?;
        let mut pending: Vec<&TableState> = tables.iter().collect();
        // Foreign keys between governed tables decide the order: retry a refused table after the others.
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            let mut blocked = Vec::new();
            let mut last_err = None;
            for t in pending {
                let sql = plan::delete_batch(s, t, DELETE_BATCH);
                loop {
                    match client.execute(&sql, &[&org.as_str()]).await {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                            last_err = Some(describe(&e));
                            blocked.push(t);
                            break;
                        }
                        Err(e) => return Err(backend(e)),
                    }
                }
            }
            if !blocked.is_empty() && rounds > tables.len() {
                return Err(LayerError::Backend(format!(
                    "rows of {org} could not be deleted: {}",
                    last_err.unwrap_or_default()
                )));
            }
            pending = blocked;
        }
        Ok(())
    }
}

/// Reads the catalog in a transaction that is rolled back (the policy shapes use temp tables).
async fn read_and_audit(client: &mut Client, s: &Settings) -> Result<AuditSnapshot, LayerError> {
    let tx = client.transaction().await.map_err(backend)?;
    let cat = catalog::read(&tx, s).await?;
    tx.rollback().await.map_err(backend)?;
    let report = audit::audit(s, &cat);
    Ok(AuditSnapshot {
        catalog: cat,
        report,
    })
}

/// The registry upsert: the org id and display name are bound as `$1` and `$2`, never pasted.
pub fn registry_upsert_sql(s: &Settings) -> String {
    format!(
        "INSERT INTO {reg} AS r (id, display_name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, updated_at = pg_catalog.now()
         WHERE NOT (r.display_name OPERATOR(pg_catalog.=) EXCLUDED.display_name)",
        reg = s.registry
    )
}

async fn upsert_registry(
    c: &impl GenericClient,
    s: &Settings,
    org: &OrgId,
    display: &str,
) -> Result<(), LayerError> {
    let sql = registry_upsert_sql(s);
    c.execute(&sql, &[&org.as_str(), &display])
        .await
        .map_err(backend)?;
    Ok(())
}

/// Takes the operator's lock `name` for the rest of the transaction: a row lock in the
/// operator's lock table, on which no tenant role has any privilege (advisory locks are open to
/// every role). Waits at most the admin lock timeout.
async fn take_lock(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Settings,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {} (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            s.locks
        ),
        &[&name],
    )
    .await?;
    tx.query_one(
        &format!(
            "SELECT 1 FROM {} l WHERE l.name OPERATOR(pg_catalog.=) $1::pg_catalog.text FOR UPDATE",
            s.locks
        ),
        &[&name],
    )
    .await?;
    Ok(())
}

/// The OID of a role, if it exists. Sessions are ended by OID: once a role is dropped, its
/// surviving sessions no longer show its name.
async fn role_oid(c: &impl GenericClient, role: &str) -> Result<Option<u32>, LayerError> {
    Ok(c.query_opt(
        "SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name",
        &[&role],
    )
    .await
    .map_err(backend)?
    .map(|r| r.get(0)))
}

/// Ends every session of a login role (other than the caller's); returns how many.
async fn end_sessions(c: &impl GenericClient, oid: Option<u32>) -> Result<u64, LayerError> {
    let Some(oid) = oid else { return Ok(0) };
    let rows = c
        .query(
            "SELECT pg_catalog.pg_terminate_backend(a.pid) FROM pg_catalog.pg_stat_activity a
             WHERE a.usesysid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
               AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
            &[&oid],
        )
        .await
        .map_err(backend)?;
    Ok(rows.len() as u64)
}

/// What the mapping records about the orgId (and its role name), and whether the role exists.
async fn recorded_owner(
    c: &impl GenericClient,
    s: &Settings,
    org: &OrgId,
    role: &str,
    uid: &str,
) -> Result<owner::Recorded, LayerError> {
    let rows = catalog::read_claims(c, s, org.as_str(), role).await?;
    let role_exists: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name)",
            &[&role],
        )
        .await
        .map_err(backend)?
        .get(0);
    let owners: Vec<Option<String>> = rows.into_iter().map(|(_, o)| o).collect();
    Ok(owner::recorded(&owners, role_exists, uid))
}

/// Whether a relation is owned by a tenant role or the group: its owner would run any trigger
/// of its own making as the admin, so the operator never writes through it.
async fn tenant_owned(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Settings,
    t: &TableState,
) -> Result<bool, LayerError> {
    Ok(tx
        .query_one(
            "SELECT COALESCE(pg_catalog.bool_or(c.relowner OPERATOR(pg_catalog.=) g.oid
                        OR c.relowner OPERATOR(pg_catalog.=) ANY (ARRAY(
                             SELECT m.member FROM pg_catalog.pg_auth_members m
                             WHERE m.roleid OPERATOR(pg_catalog.=) g.oid))), false)
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
             JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $3::pg_catalog.name
             WHERE n.nspname OPERATOR(pg_catalog.=) $1::pg_catalog.name
               AND c.relname OPERATOR(pg_catalog.=) $2::pg_catalog.name",
            &[&t.schema, &t.name, &s.group_role.as_str()],
        )
        .await
        .map_err(backend)?
        .get(0))
}

/// Inserts one canary row per governed table for `org` where it has no row yet. Tables whose
/// other columns need values the operator cannot invent are left without a canary, and so are
/// tables a tenant owns (the audit reports those).
async fn plant_canaries(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Settings,
    tables: &[TableState],
    org: &str,
) -> Result<(), LayerError> {
    for t in tables {
        let tbl = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        let col = &s.tenant_column;
        if tenant_owned(tx, s, t).await? {
            tracing::warn!(table = %t.qualified(), "owned by a tenant role; no canary written through it");
            continue;
        }
        let exists: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {tbl} WHERE {col} OPERATOR(pg_catalog.=) $1::pg_catalog.text)"
                ),
                &[&org],
            )
            .await
            .map_err(backend)?
            .get(0);
        if exists {
            continue;
        }
        let is_vectors =
            t.name == s.embeddings_table.as_str() && t.has_column(s.embedding_column.as_str());
        tx.batch_execute("SAVEPOINT bulkhead_canary")
            .await
            .map_err(backend)?;
        let res = if is_vectors {
            let v: Vec<f64> = probe::CANARY_VECTOR.to_vec();
            tx.execute(
                &format!(
                    "INSERT INTO {tbl} ({col}, {}) VALUES ($1, $2)",
                    s.embedding_column
                ),
                &[&org, &v],
            )
            .await
        } else {
            tx.execute(&format!("INSERT INTO {tbl} ({col}) VALUES ($1)"), &[&org])
                .await
        };
        match res {
            Ok(_) => tx
                .batch_execute("RELEASE SAVEPOINT bulkhead_canary")
                .await
                .map_err(backend)?,
            Err(e) => {
                tracing::debug!(table = %t.qualified(), error = %describe(&e), "no canary");
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT bulkhead_canary; RELEASE SAVEPOINT bulkhead_canary",
                )
                .await
                .map_err(backend)?;
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Layer for DatabaseLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Database
    }

    async fn prepare(&self) -> Result<Vec<Repair>, LayerError> {
        let out = match self.prepare_once().await {
            Err(a) if is_race(a.code.as_ref()) => self.prepare_once().await,
            other => other,
        };
        self.invalidate_audit().await;
        out.map_err(|a| a.error)
    }

    async fn ensure(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let s = &self.settings;
        let org = &tenant.org_id;
        let uid = tenant.owner.uid.as_str();
        let role = self.role_of(org);
        // Before taking a connection: the audit may need one of its own.
        let cat_tables = self.governed_tables().await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        take_lock(&tx, s, &format!("org:{org}"))
            .await
            .map_err(backend)?;
        let mut repairs = Vec::new();
        let recorded = recorded_owner(&tx, s, org, &role, uid).await?;
        match owner::claim(&recorded, uid, tenant.adopt_from.as_deref()) {
            Claim::Foreign { other } => {
                return Err(LayerError::Refused(owner::refusal(
                    org.as_str(),
                    other.as_deref(),
                )));
            }
            Claim::Adopt { from } => repairs.push(Repair(format!(
                "re-attached retained data of Organization UID {from}"
            ))),
            Claim::Free | Claim::Owned => {}
        }
        let existing = catalog::read_role(&tx, s, &role).await?;
        let kept = creds
            .get(KEY_PASSWORD)
            .filter(|p| !p.is_empty() && !tenant.rotate)
            .map(str::to_owned);
        let (password, set_password) = match (kept, &existing) {
            (Some(pw), Some(_)) => (pw, false),
            (Some(pw), None) => (pw, true),
            (None, _) => (super::random_secret(32), true),
        };
        // Only a SCRAM verifier reaches the server, so the plaintext never lands in its logs.
        let verifier =
            set_password.then(|| postgres_protocol::password::scram_sha_256(password.as_bytes()));
        let p = plan::tenant_role(
            s,
            &role,
            existing.as_ref(),
            verifier.as_deref(),
            self.server_version,
        );
        for stmt in &p.statements {
            tx.batch_execute(stmt).await.map_err(backend)?;
        }
        repairs.extend(p.repairs);
        let mapped = existing.as_ref().and_then(|r| r.org_id.clone());
        let stale = tx
            .execute(
                &format!(
                    "DELETE FROM {} m WHERE m.org_id OPERATOR(pg_catalog.=) $1::pg_catalog.text
                       AND m.role_name OPERATOR(pg_catalog.<>) $2::pg_catalog.text",
                    s.mapping
                ),
                &[&org.as_str(), &role],
            )
            .await
            .map_err(backend)?;
        let recorded_uid = existing.as_ref().and_then(|r| r.owner_uid.as_deref());
        if mapped.as_deref() != Some(org.as_str()) || recorded_uid != Some(uid) || stale > 0 {
            tx.execute(
                &format!(
                    "INSERT INTO {} (role_name, org_id, {owner}) VALUES ($1, $2, $3)
                     ON CONFLICT (role_name) DO UPDATE SET org_id = EXCLUDED.org_id, {owner} = EXCLUDED.{owner}",
                    s.mapping,
                    owner = catalog::OWNER_COLUMN
                ),
                &[&role, &org.as_str(), &uid],
            )
            .await
            .map_err(backend)?;
            if mapped.as_deref() != Some(org.as_str()) && (existing.is_some() || stale > 0) {
                let was = mapped
                    .map(|m| format!("mapped to {m:?}"))
                    .unwrap_or_else(|| "unmapped".into());
                repairs.push(Repair(format!("role {role} was {was}; mapped to {org}")));
            }
        }
        upsert_registry(&tx, s, org, &tenant.display_name).await?;
        plant_canaries(&tx, s, &cat_tables, org.as_str()).await?;
        tx.commit().await.map_err(backend)?;
        if set_password && existing.is_some() {
            // The old password is gone; so are the sessions it opened.
            let ended = end_sessions(&*client, role_oid(&*client, &role).await?).await?;
            if ended > 0 {
                tracing::info!(role = %role, sessions = ended, "ended the sessions of the replaced credential");
            }
        }

        creds.set(KEY_USER, role.clone());
        let connector = &self.pool.connector;
        creds.set(
            KEY_URL,
            tenant_url(
                &self.tenant_host_port,
                &self.dbname,
                &role,
                &password,
                &connect::tenant_url_query(connector.mode()),
            ),
        );
        match connector.tenant_ca() {
            Some(pem) => creds.set(KEY_CA_CERT, pem.to_owned()),
            None => creds.remove(KEY_CA_CERT),
        }
        creds.set(KEY_PASSWORD, password);
        Ok(repairs)
    }

    async fn verify(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Verification, LayerError> {
        let report = self.audit().await?;
        let (cat, audit) = (&report.catalog, &report.report);
        let mut v = Verification {
            findings: audit.breaches().map(|f| f.text()).collect(),
            probes: Vec::new(),
            traffic: None,
        };
        let role = self.role_of(&tenant.org_id);
        let Some(password) = creds.get(KEY_PASSWORD) else {
            v.probes.push(Probe::new(
                format!("log in as {role}"),
                false,
                "no database password in the credentials",
            ));
            return Ok(v);
        };
        let tables: Vec<TableState> = cat.governable_tables().cloned().collect();
        let targets = self.admin_targets(tenant, &tables).await?;
        let tls = match self.pool.connector.mode() {
            connect::SslMode::Disable => String::new(),
            m => format!(" over TLS ({})", m.as_str()),
        };
        match self
            .pool
            .connector
            .connect(&self.tenant_config(&role, password))
            .await
        {
            Err(e) => v
                .probes
                .push(Probe::new(format!("log in as {role}"), false, e)),
            Ok((mut client, task)) => {
                v.probes.push(Probe::new(
                    format!("log in as {role}"),
                    true,
                    format!("logged in with the organization's password{tls}"),
                ));
                v.probes
                    .extend(probe::run(&mut client, &self.settings, &targets).await);
                drop(client);
                let _ = task.await;
            }
        }
        Ok(v)
    }

    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError> {
        let s = &self.settings;
        let org = &tenant.org_id;
        let role = self.role_of(org);
        {
            let client = self.pool.get().await?;
            let recorded = recorded_owner(&*client, s, org, &role, &tenant.owner.uid).await?;
            match owner::claim(&recorded, &tenant.owner.uid, tenant.adopt_from.as_deref()) {
                Claim::Owned | Claim::Adopt { .. } => {}
                Claim::Free | Claim::Foreign { .. } => {
                    // Never owned here: another Organization's role, rows and mapping stay.
                    tracing::info!(org = %org, "cleanup: the database holds nothing this Organization owns");
                    return Ok(());
                }
            }
        }
        if tenant.deletion_policy == DeletionPolicy::Delete {
            self.delete_rows(org).await?;
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        take_lock(&tx, s, &format!("org:{org}"))
            .await
            .map_err(backend)?;
        let oid = role_oid(&tx, &role).await?;
        let exists = oid.is_some();
        if exists {
            tx.execute(&format!("ALTER ROLE {} NOLOGIN", quote_ident(&role)), &[])
                .await
                .map_err(backend)?;
        }
        if tenant.deletion_policy == DeletionPolicy::Delete {
            if exists {
                tx.execute(&format!("DROP ROLE {}", quote_ident(&role)), &[])
                    .await
                    .map_err(backend)?;
            }
            tx.execute(
                &format!(
                    "DELETE FROM {} m WHERE m.role_name OPERATOR(pg_catalog.=) $1::pg_catalog.text
                       OR m.org_id OPERATOR(pg_catalog.=) $2::pg_catalog.text",
                    s.mapping
                ),
                &[&role, &org.as_str()],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                &format!(
                    "DELETE FROM {} r WHERE r.id OPERATOR(pg_catalog.=) $1::pg_catalog.text",
                    s.registry
                ),
                &[&org.as_str()],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        // Sessions opened before NOLOGIN would keep working; end them.
        end_sessions(&*client, oid).await?;
        self.invalidate_audit().await;
        Ok(())
    }

    async fn retire(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let s = &self.settings;
        let org = &tenant.org_id;
        let role = self.role_of(org);
        for key in [KEY_URL, KEY_USER, KEY_PASSWORD, KEY_CA_CERT] {
            creds.remove(key);
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        take_lock(&tx, s, &format!("org:{org}"))
            .await
            .map_err(backend)?;
        let recorded = recorded_owner(&tx, s, org, &role, &tenant.owner.uid).await?;
        let owned = matches!(
            owner::claim(&recorded, &tenant.owner.uid, tenant.adopt_from.as_deref()),
            Claim::Owned | Claim::Adopt { .. }
        );
        let oid = role_oid(&tx, &role).await?;
        if !owned || oid.is_none() {
            tx.rollback().await.map_err(backend)?;
            return Ok(Vec::new());
        }
        let r = quote_ident(&role);
        tx.batch_execute(&format!("ALTER ROLE {r} NOLOGIN"))
            .await
            .map_err(backend)?;
        // The mapping row stays: it records who owns the retained rows.
        tx.batch_execute("SAVEPOINT bulkhead_retire")
            .await
            .map_err(backend)?;
        let dropped = match tx.batch_execute(&format!("DROP ROLE {r}")).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(role = %role, error = %describe(&e), "role kept without login");
                tx.batch_execute(&format!(
                    "ROLLBACK TO SAVEPOINT bulkhead_retire; REVOKE {} FROM {r}",
                    s.group_role
                ))
                .await
                .map_err(backend)?;
                false
            }
        };
        tx.commit().await.map_err(backend)?;
        end_sessions(&*client, oid).await?;
        self.invalidate_audit().await;
        Ok(vec![Repair(if dropped {
            format!("dropped login role {role} (the database layer is off); its rows are kept")
        } else {
            format!(
                "login role {role} can no longer log in and left {} (it still owns objects); its rows are kept",
                s.group_role.as_str()
            )
        })])
    }

    fn identity(&self, org: &OrgId) -> Option<String> {
        Some(self.role_of(org))
    }

    async fn platform_status(
        &self,
        status: &mut IsolationPlatformStatus,
    ) -> Result<(), LayerError> {
        let report = self.audit().await?;
        let a = &report.report;
        status.database = Some(DatabaseAudit {
            coverage: a.coverage(),
            governed_tables: a.governed_tables,
            tables_found: a.tables_found,
            findings: a
                .findings
                .iter()
                .map(|f| match f.severity {
                    Severity::Breach => f.text(),
                    Severity::Warning => format!("warning: {}", f.text()),
                })
                .collect(),
            breaches: u32::try_from(a.breaches().count()).unwrap_or(u32::MAX),
        });
        Ok(())
    }
}

/// Builds the database layer for a platform.
pub async fn build(env: &BuildEnv<'_>) -> LayerSlot {
    let spec = env
        .platform
        .spec
        .database
        .as_ref()
        .ok_or_else(|| LayerError::Config("the platform has no database section".into()))?;
    let url = env.secret_key(&spec.admin_url_secret_ref).await?;
    let ca = match &spec.ca_secret_ref {
        Some(sel) => Some(CaBundle {
            pem: env.secret_key(sel).await?,
            source: format!(
                "Secret {}/{} key {}",
                sel.namespace.as_deref().unwrap_or(env.operator_namespace),
                sel.name,
                sel.key
            ),
        }),
        None => None,
    };
    let mut layer = DatabaseLayer::connect_with_ca(spec, &url, ca).await?;
    if let Some(tx) = &env.drift {
        layer = layer.with_drift_listener(kube::ResourceExt::name_any(env.platform), tx.clone());
    }
    Ok(Arc::new(layer))
}

/// `bulkhead audit`: runs the audit against `url` and returns what to print and whether
/// anything was found (the command then exits non-zero).
pub async fn run_audit_cli(
    url: &str,
    spec: &DatabasePlatform,
    json: bool,
) -> Result<(String, bool), LayerError> {
    let s = Settings::from_spec(spec)?;
    let (config, url_tls) = parse_admin_url(url)?;
    let connector = connector_for(spec, &url_tls, None).await?;
    let mut client = open(&config, &connector).await?;
    let report = read_and_audit(&mut client, &s).await?.report;
    let found = !report.findings.is_empty();
    let out = if json {
        let value = serde_json::json!({
            "coverage": report.coverage(),
            "tablesFound": report.tables_found,
            "governedTables": report.governed_tables,
            "findings": report.findings,
        });
        serde_json::to_string_pretty(&value).map_err(|e| LayerError::Backend(e.to_string()))? + "\n"
    } else {
        audit::render_table(&report)
    };
    Ok((out, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_urls_are_percent_encoded() {
        assert_eq!(
            tenant_url("db.example:5432", "app", "bulkhead_org_acme-1", "Ab9", ""),
            "postgres://bulkhead_org_acme-1:Ab9@db.example:5432/app"
        );
        assert_eq!(
            tenant_url("h:1", "my db", "u@x", "p:/?#", ""),
            "postgres://u%40x:p%3A%2F%3F%23@h:1/my%20db"
        );
        assert_eq!(
            tenant_url(
                "h:1",
                "db",
                "u",
                "p",
                &connect::tenant_url_query(connect::SslMode::VerifyFull)
            ),
            "postgres://u:p@h:1/db?sslmode=verify-full"
        );
    }

    #[test]
    fn admin_url_errors_never_echo_the_url() {
        let err = parse_admin_url("postgres://admin:hunter2@host:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let (c, _) = parse_admin_url("postgres://admin:pw@127.0.0.1:5433/app").unwrap();
        assert_eq!(host_port(&c).as_deref(), Some("127.0.0.1:5433"));
        let (c, tls) =
            parse_admin_url("postgres://admin:pw@127.0.0.1:5433/app?sslmode=verify-full").unwrap();
        assert_eq!(host_port(&c).as_deref(), Some("127.0.0.1:5433"));
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        let (c, _) = parse_admin_url("postgres://admin:pw@[::1]:5433/app").unwrap();
        assert_eq!(host_port(&c).as_deref(), Some("[::1]:5433"));
    }

    #[test]
    fn races_are_told_by_their_sqlstate() {
        assert!(is_race(Some(&SqlState::DUPLICATE_OBJECT)));
        assert!(is_race(Some(&SqlState::UNIQUE_VIOLATION)));
        assert!(is_race(Some(&SqlState::T_R_SERIALIZATION_FAILURE)));
        assert!(!is_race(Some(&SqlState::INSUFFICIENT_PRIVILEGE)));
        assert!(!is_race(None));
        // A message that merely quotes a race's code is not a race.
        let a = Attempt::from(LayerError::Backend(
            "role \"x\" already exists (SQLSTATE 42710)".into(),
        ));
        assert!(!is_race(a.code.as_ref()));
    }

    #[test]
    fn admin_sessions_pin_the_search_path_and_the_timeouts() {
        let o = admin_options(None);
        assert_eq!(
            o,
            "-c search_path=pg_catalog,pg_temp -c lock_timeout=5000 -c statement_timeout=120000"
        );
        assert!(
            admin_options(Some("-c work_mem=64MB")).starts_with("-c work_mem=64MB -c search_path")
        );
        let (c, _) = parse_admin_url("postgres://admin:pw@127.0.0.1:5433/app").unwrap();
        assert_eq!(c.get_options(), Some(o.as_str()));
    }
}
