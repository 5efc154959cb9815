//! Shared set-up for tests that run against the local testbed (`testbed/up`).
#![allow(dead_code)]

pub mod admin;
pub mod org;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The testbed's endpoints, read from the env file that `testbed/up` writes.
#[derive(Debug, Clone)]
pub struct Testbed {
    vars: BTreeMap<String, String>,
}

impl Testbed {
    /// Loads the testbed's env file and exports it into this process (so kube's `Config::infer`
    /// finds the KUBECONFIG). Panics with a clear message when the testbed is not up: tests
    /// against real components never pass silently without them.
    pub fn get() -> &'static Testbed {
        static TESTBED: OnceLock<Testbed> = OnceLock::new();
        TESTBED.get_or_init(|| {
            bulkhead::install_crypto_provider();
            let path = std::env::var_os("BULKHEAD_TESTBED_ENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let dir = std::env::var_os("BULKHEAD_TESTBED_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/tmp/bulkhead-testbed"));
                    dir.join("env")
                });
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "testbed env file {} unreadable ({e}); start the testbed with `testbed/up`",
                    path.display()
                )
            });
            let mut vars = BTreeMap::new();
            for line in text.lines() {
                let line = line.trim();
                let Some(rest) = line.strip_prefix("export ") else {
                    continue;
                };
                let Some((k, v)) = rest.split_once('=') else {
                    continue;
                };
                let v = v.trim_matches(|c| c == '\'' || c == '"').to_owned();
                vars.insert(k.to_owned(), v);
            }
            for (k, v) in &vars {
                if k != "PATH" {
                    // SAFETY: runs once, before any test thread reads the environment through us.
                    unsafe { std::env::set_var(k, v) };
                }
            }
            Testbed { vars }
        })
    }

    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("testbed env has no {key}"))
    }

    pub fn pg_admin_url(&self) -> &str {
        self.var("BULKHEAD_PG_ADMIN_URL")
    }
    pub fn redis_admin_url(&self) -> &str {
        self.var("BULKHEAD_REDIS_ADMIN_URL")
    }
    pub fn s3_endpoint(&self) -> &str {
        self.var("BULKHEAD_S3_ENDPOINT")
    }
    pub fn s3_access_key(&self) -> &str {
        self.var("BULKHEAD_S3_ACCESS_KEY")
    }
    pub fn s3_secret_key(&self) -> &str {
        self.var("BULKHEAD_S3_SECRET_KEY")
    }
    pub fn moto_endpoint(&self) -> &str {
        self.var("BULKHEAD_MOTO_ENDPOINT")
    }
    pub fn kubeconfig(&self) -> &str {
        self.var("KUBECONFIG")
    }
    /// Directory of the testbed's kubectl and helm.
    pub fn k8s_bin(&self) -> &str {
        self.var("BULKHEAD_K8S_BIN")
    }

    /// A kube client for the testbed's API server, as its admin.
    pub async fn kube(&self) -> kube::Client {
        let _ = self;
        kube::Client::try_default()
            .await
            .expect("kube client for the testbed")
    }
}

/// A name unique to this test run, so tests sharing one testbed never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id() % 100_000)
}

/// Applies the crate's CRDs to the testbed's API server and waits until they are established.
pub async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in bulkhead::api::crds() {
        let name = crd.metadata.name.clone().expect("crd name");
        api.patch(
            &name,
            &PatchParams::apply("bulkhead-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply crd");
        wait_for(
            &format!("CRD {name} established"),
            std::time::Duration::from_secs(60),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let c = api.get(&name).await.ok()?;
                    let established = c
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            },
        )
        .await;
    }
}

/// Polls `check` every 250 ms until it yields a value; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Creates a namespace (idempotent).
pub async fn ensure_namespace(client: &kube::Client, name: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name }
    }))
    .expect("namespace");
    api.patch(
        name,
        &PatchParams::apply("bulkhead-tests").force(),
        &Patch::Apply(&ns),
    )
    .await
    .expect("apply namespace");
}

/// Creates or replaces a Secret with string data.
pub async fn put_secret(client: &kube::Client, namespace: &str, name: &str, data: &[(&str, &str)]) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let string_data: BTreeMap<String, String> = data
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "stringData": string_data,
    }))
    .expect("secret");
    api.patch(
        name,
        &PatchParams::apply("bulkhead-tests").force(),
        &Patch::Apply(&secret),
    )
    .await
    .expect("apply secret");
}

/// A running `bulkhead run` process for one platform; killed when dropped. Its log is kept in a
/// file so tests can search it (e.g. for leaked credentials).
pub struct Operator {
    child: std::process::Child,
    pub log_path: PathBuf,
}

impl Operator {
    /// Starts the operator binary of this crate, handling only `platform`, with `namespace` as its
    /// own namespace.
    pub fn start(platform: &str, namespace: &str) -> Operator {
        Self::start_with(platform, namespace, &[])
    }

    pub fn start_with(platform: &str, namespace: &str, extra_args: &[&str]) -> Operator {
        Self::start_with_kubeconfig(platform, namespace, extra_args, Testbed::get().kubeconfig())
    }

    /// Like [`Operator::start_with`], authenticated by `kubeconfig` instead of the testbed's admin
    /// (e.g. as the Helm chart's ServiceAccount).
    pub fn start_with_kubeconfig(
        platform: &str,
        namespace: &str,
        extra_args: &[&str],
        kubeconfig: impl AsRef<std::ffi::OsStr>,
    ) -> Operator {
        let dir = std::env::temp_dir().join("bulkhead-test-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log_path = dir.join(format!("{}.log", unique(platform)));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("run")
            .args([
                "--platform",
                platform,
                "--namespace",
                namespace,
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig.as_ref())
            .env(
                "RUST_LOG",
                std::env::var("BULKHEAD_TEST_OPERATOR_LOG")
                    .unwrap_or_else(|_| "info,bulkhead=debug,kube=warn".to_owned()),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the operator");
        Operator { child, log_path }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Operator {
    /// Base URL of the operator's /metrics, /healthz and /readyz, read from its log.
    pub async fn http_base(&self) -> String {
        wait_for(
            "the operator's HTTP address in its log",
            std::time::Duration::from_secs(30),
            || {
                let log = self.log();
                async move {
                    let line = log.lines().find(|l| l.contains("serving /metrics"))?;
                    let addr = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))?;
                    Some(format!("http://{}", addr.trim_matches('"')))
                }
            },
        )
        .await
    }
}

/// Waits until the object `name` no longer exists (its finalizers have run).
pub async fn wait_gone<K>(api: &kube::Api<K>, name: &str, timeout: std::time::Duration)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} gone"), timeout, || {
        let api = api.clone();
        let name = name.to_owned();
        async move { api.get_opt(&name).await.ok()?.is_none().then_some(()) }
    })
    .await
}

/// One row of an adversarial suite: what was tried, what isolation requires, what the backend
/// or the operator did. Printed so that `cargo test -- --nocapture` shows the whole table.
pub fn attempt_row(attempt: &str, expected: &str, observed: &str) {
    println!("| {attempt} | {expected} | {observed} |");
}

/// Opens a PostgreSQL connection and drives it in the background.
pub async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// A platform with every layer on the testbed: a database of its own with the application's
/// tables, the admin Secrets in the operator's namespace, and the IsolationPlatform itself.
pub struct FullPlatform {
    pub name: String,
    pub operator_ns: String,
    pub db_url: String,
    pub bucket: String,
}

impl FullPlatform {
    /// Creates it under `tag` (unique per test). Secrets: `pg` (key `url`), `redis` (key `url`),
    /// `s3` (`accessKeyId`, `secretAccessKey`).
    pub async fn create(client: &kube::Client, tag: &str, interval_seconds: u32) -> FullPlatform {
        use bulkhead::api::IsolationPlatform;
        use kube::api::{Api, PostParams};
        let tb = Testbed::get();
        let operator_ns = format!("{tag}-op");
        ensure_namespace(client, &operator_ns).await;
        let dbname = tag.replace('-', "_");
        let admin = pg_connect(tb.pg_admin_url()).await.expect("admin");
        admin
            .batch_execute(&format!("CREATE DATABASE {dbname}"))
            .await
            .expect("create database");
        let (base, _) = tb.pg_admin_url().rsplit_once('/').expect("database url");
        let db_url = format!("{base}/{dbname}");
        pg_connect(&db_url)
            .await
            .expect("connect")
            .batch_execute(include_str!("../../examples/schema.sql"))
            .await
            .expect("schema");
        put_secret(client, &operator_ns, "pg", &[("url", &db_url)]).await;
        put_secret(
            client,
            &operator_ns,
            "redis",
            &[("url", tb.redis_admin_url())],
        )
        .await;
        put_secret(
            client,
            &operator_ns,
            "s3",
            &[
                ("accessKeyId", tb.s3_access_key()),
                ("secretAccessKey", tb.s3_secret_key()),
            ],
        )
        .await;
        let p: IsolationPlatform = serde_json::from_value(serde_json::json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform", "metadata": { "name": tag },
            "spec": {
                "database": {
                    "adminUrlSecretRef": { "name": "pg", "key": "url" },
                    "groupRole": format!("{dbname}_tenant"),
                    "overrides": [{ "table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "system" }]
                },
                "storage": { "endpoint": tb.s3_endpoint(), "bucket": tag, "forcePathStyle": true, "adminSecretRef": { "name": "s3" } },
                "cache": { "adminUrlSecretRef": { "name": "redis", "key": "url" } },
                "network": { "namespaceTemplate": format!("{tag}-{{orgId}}") },
                "verification": { "intervalSeconds": interval_seconds }
            }
        }))
        .expect("platform");
        Api::<IsolationPlatform>::all(client.clone())
            .create(&PostParams::default(), &p)
            .await
            .expect("create platform");
        FullPlatform {
            name: tag.to_owned(),
            operator_ns,
            db_url,
            bucket: tag.to_owned(),
        }
    }
}

/// Creates or replaces a BYOK source Secret in the operator's namespace, marked for `org_id`.
pub async fn put_byok_source(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    org_id: &str,
    data: &[(&str, &str)],
) {
    put_secret(client, namespace, name, data).await;
    label_secret(client, namespace, name, bulkhead::api::BYOK_LABEL, org_id).await;
}

/// Sets one label on an existing Secret.
pub async fn label_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
    value: &str,
) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "metadata": { "labels": { key: value } } })),
    )
    .await
    .expect("label secret");
}

/// A PostgreSQL database of a test's own on the testbed, and the roles the test creates (named
/// with `role_prefix`, `group` or `bhx{tag}`). Dropped with every such role by `finish`, or by
/// `Drop` when a failed assertion unwinds past it, so no test leaks a database or a
/// cluster-wide role.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub server_url: String,
    pub role_prefix: String,
    pub group: String,
    pub tag: String,
    finished: bool,
}

impl TestDb {
    /// Creates the database `bh_{kind}{tag}` and runs `seed` in it.
    pub async fn create(kind: &str, seed: &str) -> TestDb {
        let tag = unique(kind).replace('-', "_");
        let name = format!("bh_{kind}{tag}");
        let server_url = Testbed::get().pg_admin_url().to_owned();
        pg_connect(&server_url)
            .await
            .expect("connect")
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        let db = TestDb {
            url: with_database(&server_url, &name),
            server_url,
            role_prefix: format!("bh{kind}{tag}_"),
            group: format!("bh{kind}g{tag}"),
            tag,
            name,
            finished: false,
        };
        db.admin().await.batch_execute(seed).await.expect("seed");
        db
    }

    /// An admin connection to the test's database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await.expect("connect")
    }

    /// An org id unique to this test.
    pub fn org(&self, name: &str) -> bulkhead::tenant::OrgId {
        bulkhead::tenant::OrgId::parse(&format!("{name}{}", self.tag.replace('_', "-")))
            .expect("org id")
    }

    /// Drops the database and every role the test created.
    pub async fn finish(mut self) {
        self.finished = true;
        self.drop_all().await;
    }

    async fn drop_all(&self) {
        let admin = pg_connect(&self.server_url).await.expect("connect");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop db");
        let rows = admin
            .query(
                "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) OR rolname = $2 OR starts_with(rolname, $3)",
                &[&self.role_prefix, &self.group, &format!("bhx{}", self.tag)],
            )
            .await
            .expect("list roles");
        for r in rows {
            let name: String = r.get(0);
            admin
                .batch_execute(&format!(
                    "DROP ROLE IF EXISTS \"{}\"",
                    name.replace('"', "\"\"")
                ))
                .await
                .expect("drop role");
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Unwinding from a failed assertion: clean up on a runtime of its own, off this thread.
        let db = TestDb {
            name: self.name.clone(),
            url: self.url.clone(),
            server_url: self.server_url.clone(),
            role_prefix: self.role_prefix.clone(),
            group: self.group.clone(),
            tag: self.tag.clone(),
            finished: true,
        };
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(db.drop_all());
            }
        })
        .join();
    }
}

/// `url` with its database path replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (server, _) = base
        .rsplit_once('/')
        .expect("admin URL has a database path");
    format!("{server}/{db}{query}")
}

/// A `Tenant` as the controller would hand it to a layer: org id `org`, owned by the
/// Organization with UID `uid`, whose probes attack the sentinel and then `peers`.
pub fn tenant_of(
    org: &bulkhead::tenant::OrgId,
    uid: &str,
    peers: &[&bulkhead::tenant::OrgId],
    policy: bulkhead::api::DeletionPolicy,
) -> bulkhead::layers::Tenant {
    use bulkhead::tenant::OrgId;
    bulkhead::layers::Tenant {
        name: org.to_string(),
        org_id: org.clone(),
        display_name: org.to_string(),
        namespace: format!("org-{org}"),
        deletion_policy: policy,
        rotate: false,
        peers: std::iter::once(OrgId::sentinel())
            .chain(peers.iter().map(|p| (*p).clone()))
            .collect(),
        owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "bulkhead.dev/v1alpha1".into(),
            kind: "Organization".into(),
            name: org.to_string(),
            uid: uid.to_owned(),
            ..Default::default()
        },
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

/// The cache platform section the cache tests share: the testbed's Redis, default prefixes.
pub fn cache_spec() -> bulkhead::api::platform::CachePlatform {
    use bulkhead::api::platform::{CachePlatform, SecretKeySelector};
    CachePlatform {
        admin_url_secret_ref: SecretKeySelector {
            name: "redis-admin".into(),
            namespace: None,
            key: "url".into(),
        },
        ca_secret_ref: None,
        nodes: vec![],
        discover_nodes: false,
        tenant_endpoint: None,
        key_prefix: "org:{orgId}:".into(),
        channel_prefix: "org:{orgId}:".into(),
        user_prefix: "bulkhead-org-".into(),
        allow_scripting: false,
        acl_file: false,
    }
}
