//! Database layer: PostgreSQL Row-Level Security that the database itself enforces.
//!
//! `prepare` installs the platform objects (identity function, role mapping, group role,
//! registry) and one policy per governed table; `ensure` gives each organization a login role;
//! `verify` audits the catalog and attacks other organizations' canaries as that role.

pub mod audit;
pub mod catalog;
pub mod ident;
pub mod plan;
pub mod probe;
pub mod settings;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, GenericClient, NoTls};

use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Probe, Repair, Tenant,
    Verification,
};
use crate::api::DeletionPolicy;
use crate::api::platform::{DatabaseAudit, DatabasePlatform, IsolationPlatformStatus};
use crate::tenant::OrgId;
use audit::{AuditReport, Severity};
use catalog::{Catalog, TableState};
use ident::{lock_key, quote_ident, role_name};
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
        LayerError::Unreachable(describe(&e))
    } else {
        LayerError::Backend(describe(&e))
    }
}

/// A small bounded pool of admin connections; broken ones are dropped and replaced.
struct AdminPool {
    config: Config,
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

async fn open(config: &Config) -> Result<Client, LayerError> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| LayerError::Unreachable(describe(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %describe(&e), "postgres connection ended");
        }
    });
    Ok(client)
}

impl AdminPool {
    fn new(config: Config) -> Self {
        Self {
            config,
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
            None => open(&self.config).await?,
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
}

impl std::fmt::Debug for DatabaseLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseLayer")
            .field("db", &self.dbname)
            .finish_non_exhaustive()
    }
}

fn parse_admin_url(url: &str) -> Result<Config, LayerError> {
    // The parser's message may quote the URL, and the URL holds the admin password.
    let mut config: Config = url.parse().map_err(|_| {
        LayerError::Config("database: the admin URL is not a valid PostgreSQL URL".into())
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("bulkhead");
    Ok(config)
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
pub fn tenant_url(host_port: &str, dbname: &str, user: &str, password: &str) -> String {
    format!(
        "postgres://{}:{}@{host_port}/{}",
        utf8_percent_encode(user, URL_COMPONENT),
        utf8_percent_encode(password, URL_COMPONENT),
        utf8_percent_encode(dbname, URL_COMPONENT)
    )
}

impl DatabaseLayer {
    /// Validates the spec, connects as admin and checks that the admin can do its work.
    pub async fn connect(spec: &DatabasePlatform, admin_url: &str) -> Result<Self, LayerError> {
        let settings = Settings::from_spec(spec)?;
        let config = parse_admin_url(admin_url)?;
        let tenant_host_port = match &settings.tenant_endpoint {
            Some(ep) => ep.clone(),
            None => host_port(&config).ok_or_else(|| {
                LayerError::Config(
                    "database: tenantEndpoint is required when the admin URL is not host:port"
                        .into(),
                )
            })?,
        };
        let client = open(&config).await?;
        let row = client
            .query_one(
                "SELECT rolsuper OR rolbypassrls, rolsuper OR rolcreaterole, current_database()::text
                 FROM pg_catalog.pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(backend)?;
        let (bypass, create_role, dbname): (bool, bool, String) =
            (row.get(0), row.get(1), row.get(2));
        if !bypass || !create_role {
            return Err(LayerError::Config(
                "database: the admin role needs BYPASSRLS (or SUPERUSER) and CREATEROLE".into(),
            ));
        }
        let pool = AdminPool::new(config);
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
        })
    }

    /// How long an audit is reused by `verify` (zero: every call reads the catalog).
    pub fn with_audit_ttl(mut self, ttl: Duration) -> Self {
        self.audit_ttl = ttl;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
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

    async fn prepare_once(&self) -> Result<Vec<Repair>, LayerError> {
        let s = &self.settings;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.batch_execute("SET LOCAL lock_timeout = '10s'; SET LOCAL statement_timeout = '300s'")
            .await
            .map_err(backend)?;
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            &[&lock_key("bulkhead:prepare")],
        )
        .await
        .map_err(backend)?;
        let cat = catalog::read(&tx, s).await?;
        let boot = plan::bootstrap(s, &cat);
        for stmt in &boot.statements {
            tx.batch_execute(stmt).await.map_err(backend)?;
        }
        let cat = if boot.statements.is_empty() {
            cat
        } else {
            catalog::read(&tx, s).await?
        };
        let gov = plan::govern_tables(s, &cat);
        for stmt in &gov.statements {
            tx.batch_execute(stmt).await.map_err(backend)?;
        }
        let sentinel = OrgId::sentinel();
        upsert_registry(&tx, s, &sentinel, "bulkhead sentinel").await?;
        let tables: Vec<TableState> = cat.governable_tables().cloned().collect();
        plant_canaries(&tx, s, &tables, sentinel.as_str()).await?;
        tx.commit().await.map_err(backend)?;
        for stmt in &gov.concurrent {
            client.batch_execute(stmt).await.map_err(backend)?;
        }
        let mut repairs = boot.repairs;
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
                "SELECT EXISTS (SELECT 1 FROM {}.{} WHERE {} = $1)",
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
                "SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolname = ANY($1) AND rolname <> $2 ORDER BY 1",
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

async fn upsert_registry(
    c: &impl GenericClient,
    s: &Settings,
    org: &OrgId,
    display: &str,
) -> Result<(), LayerError> {
    let sql = format!(
        "INSERT INTO {reg} AS r (id, display_name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, updated_at = now()
         WHERE r.display_name IS DISTINCT FROM EXCLUDED.display_name",
        reg = s.registry
    );
    c.execute(&sql, &[&org.as_str(), &display])
        .await
        .map_err(backend)?;
    Ok(())
}

/// Inserts one canary row per governed table for `org` where it has no row yet. Tables whose
/// other columns need values the operator cannot invent are left without a canary.
async fn plant_canaries(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Settings,
    tables: &[TableState],
    org: &str,
) -> Result<(), LayerError> {
    for t in tables {
        let tbl = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        let col = &s.tenant_column;
        let exists: bool = tx
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {tbl} WHERE {col} = $1)"),
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

fn is_race(e: &LayerError) -> bool {
    // Another database of the cluster created the (cluster-wide) group role at the same time.
    matches!(e, LayerError::Backend(m) if m.contains("SQLSTATE 42710") || m.contains("SQLSTATE 23505") || m.contains("SQLSTATE 40001"))
}

#[async_trait]
impl Layer for DatabaseLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Database
    }

    async fn prepare(&self) -> Result<Vec<Repair>, LayerError> {
        let out = match self.prepare_once().await {
            Err(e) if is_race(&e) => self.prepare_once().await,
            other => other,
        };
        self.invalidate_audit().await;
        out
    }

    async fn ensure(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let s = &self.settings;
        let org = &tenant.org_id;
        let role = self.role_of(org);
        // Before taking a connection: the audit may need one of its own.
        let cat_tables = self.governed_tables().await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1)",
            &[&lock_key(&format!("bulkhead:org:{org}"))],
        )
        .await
        .map_err(backend)?;
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
        let mut p = plan::tenant_role(s, &role, existing.as_ref(), verifier.as_deref());
        for stmt in &p.statements {
            tx.batch_execute(stmt).await.map_err(backend)?;
        }
        match existing.as_ref().and_then(|r| r.org_id.clone()) {
            Some(mapped) if mapped == org.as_str() => {}
            mapped => {
                let sql = format!(
                    "DELETE FROM {} WHERE org_id = $1 AND role_name <> $2",
                    s.mapping
                );
                let stale = tx
                    .execute(&sql, &[&org.as_str(), &role])
                    .await
                    .map_err(backend)?;
                let sql = format!(
                    "INSERT INTO {} (role_name, org_id) VALUES ($1, $2)
                     ON CONFLICT (role_name) DO UPDATE SET org_id = EXCLUDED.org_id",
                    s.mapping
                );
                tx.execute(&sql, &[&role, &org.as_str()])
                    .await
                    .map_err(backend)?;
                if existing.is_some() || stale > 0 {
                    let was = mapped
                        .map(|m| format!("mapped to {m:?}"))
                        .unwrap_or_else(|| "unmapped".into());
                    p.repairs
                        .push(Repair(format!("role {role} was {was}; mapped to {org}")));
                }
            }
        }
        upsert_registry(&tx, s, org, &tenant.display_name).await?;
        plant_canaries(&tx, s, &cat_tables, org.as_str()).await?;
        tx.commit().await.map_err(backend)?;

        creds.set(KEY_USER, role.clone());
        creds.set(
            KEY_URL,
            tenant_url(&self.tenant_host_port, &self.dbname, &role, &password),
        );
        creds.set(KEY_PASSWORD, password);
        Ok(p.repairs)
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
        match self.tenant_config(&role, password).connect(NoTls).await {
            Err(e) => v
                .probes
                .push(Probe::new(format!("log in as {role}"), false, describe(&e))),
            Ok((mut client, conn)) => {
                let task = tokio::spawn(conn);
                v.probes.push(Probe::new(
                    format!("log in as {role}"),
                    true,
                    "logged in with the organization's password",
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
        if tenant.deletion_policy == DeletionPolicy::Delete {
            self.delete_rows(org).await?;
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
                &[&role],
            )
            .await
            .map_err(backend)?
            .get(0);
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
                    "DELETE FROM {} WHERE role_name = $1 OR org_id = $2",
                    s.mapping
                ),
                &[&role, &org.as_str()],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                &format!("DELETE FROM {} WHERE id = $1", s.registry),
                &[&org.as_str()],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        // Sessions opened before NOLOGIN would keep working; end them.
        client
            .execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
                 WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
                &[&role],
            )
            .await
            .map_err(backend)?;
        Ok(())
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
    let layer = DatabaseLayer::connect(spec, &url).await?;
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
    let config = parse_admin_url(url)?;
    let mut client = open(&config).await?;
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
            tenant_url("db.example:5432", "app", "bulkhead_org_acme-1", "Ab9"),
            "postgres://bulkhead_org_acme-1:Ab9@db.example:5432/app"
        );
        assert_eq!(
            tenant_url("h:1", "my db", "u@x", "p:/?#"),
            "postgres://u%40x:p%3A%2F%3F%23@h:1/my%20db"
        );
    }

    #[test]
    fn admin_url_errors_never_echo_the_url() {
        let err = parse_admin_url("postgres://admin:hunter2@host:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let c = parse_admin_url("postgres://admin:pw@127.0.0.1:5433/app").unwrap();
        assert_eq!(host_port(&c).as_deref(), Some("127.0.0.1:5433"));
        let c = parse_admin_url("postgres://admin:pw@[::1]:5433/app").unwrap();
        assert_eq!(host_port(&c).as_deref(), Some("[::1]:5433"));
    }

    #[test]
    fn db_error_descriptions_carry_no_statement() {
        // Only the server's message and code are shown; the statement (which may hold a
        // verifier) never is. Checked structurally: describe() has no access to the SQL.
        assert!(is_race(&LayerError::Backend(
            "role \"x\" already exists (SQLSTATE 42710)".into()
        )));
        assert!(!is_race(&LayerError::Backend(
            "permission denied (SQLSTATE 42501)".into()
        )));
    }
}
