//! Scale harness: `scripts/scale` (testbed, release build, this bench, table into a file).
//!
//! Runs the operator binary (`BULKHEAD_BIN`, else the one `cargo bench` builds with release
//! settings) through `testbed/operator` against the local testbed, with the database, cache and
//! network layers on (storage as `BULKHEAD_SCALE_STORAGE` says), and measures in one run:
//!
//! - the time for N Organizations (`BULKHEAD_SCALE_SIZES`, default `100,1000`) created at once
//!   to reach Ready, and passes per Organization from creation to Ready (operator log lines and
//!   `bulkhead_reconciles_total{kind="organization"}`);
//! - the floor: a minimal client in this file that issues the same backend writes directly
//!   (PostgreSQL role, grants, settings, mapping, registry and canary rows; Redis ACL SETUSER,
//!   owner record and canary; the storage mode's S3/IAM/STS writes; Namespace, NetworkPolicies
//!   and Secret), with the operator's concurrency, and the ratio;
//! - apply→Ready latency at a steady rate (`BULKHEAD_SCALE_RATE`, default 10 per second, for
//!   `BULKHEAD_SCALE_RATE_SECONDS`, default 30);
//! - operator RSS at 0, at each size, and at `BULKHEAD_SCALE_RSS_ORGS` (default 10,000; the
//!   Organizations beyond the largest size have the network layer only; 0 skips it);
//! - a restart with nothing changed at the largest size: backend writes and time until idle
//!   (with storage on, every object's ETag and LastModified; in `session` mode the credentials
//!   Secrets too, which every new session would rewrite);
//! - the CPU seconds of one verification sweep (one pass per Organization) at each size.
//!
//! `BULKHEAD_SCALE_STORAGE` picks the storage layer: `off` (default), `user` (the testbed's
//! SeaweedFS, whose IAM store slows down past ~100 users: see the Storage section of
//! `BENCHMARKS.md`) or `session` (the testbed's SeaweedFS with its STS role,
//! `BULKHEAD_S3_SESSION_ROLE_ARN`: one `AssumeRole` per organization and nothing in IAM, so it
//! scales to 1,000). moto is not offered: it evaluates no policy variables or conditions, so its
//! probe answers fail and no Organization gets Ready there. `BULKHEAD_SCALE_CONCURRENCY`
//! (default 8, the operator's default) is the operator's `--concurrency` and the floor's. The
//! table is printed and written to `BULKHEAD_SCALE_OUT` (default `scale.md` in
//! `CARGO_TARGET_DIR`, else in `target/`); `BULKHEAD_SCALE_RECORD=NAME` also puts it in
//! `BENCHMARKS.md` between `<!-- scale-table NAME -->` and `<!-- /scale-table NAME -->`, and
//! adds that block, under its heading, at the end of the Scale section when it is not there yet
//! (for the names of [`RECORDS`]).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead::api::platform::CachePlatform;
use bulkhead::api::{DeletionPolicy, IsolationPlatform, Organization};
use bulkhead::controller::workspace::CREDENTIALS_SECRET;
use bulkhead::layers::Tenant;
use bulkhead::layers::cache::rules::{self as cache_rules, CacheRules};
use bulkhead::layers::database::ident::{quote_ident, quote_literal};
use bulkhead::layers::network::plan as net_plan;
use bulkhead::layers::storage::{self, StorageLayer, policy as storage_policy, session};
use bulkhead::tenant::OrgId;
use common::Testbed;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const RUN_LABEL: &str = "scale.bulkhead.dev/run";
const FLOOR_LABEL: &str = "scale.bulkhead.dev/floor";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageChoice {
    /// `user` mode on the testbed's SeaweedFS: enforced for real, slows down past ~100 users.
    User,
    /// `session` mode on the testbed's SeaweedFS with its STS role: nothing in IAM.
    Session,
    Off,
}

impl StorageChoice {
    fn from_env() -> Self {
        match std::env::var("BULKHEAD_SCALE_STORAGE").as_deref() {
            Ok("user") => Self::User,
            Ok("session") => Self::Session,
            Ok("off") | Err(_) => Self::Off,
            Ok(other) => panic!("BULKHEAD_SCALE_STORAGE={other}: use off, user or session"),
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Self::User => "on, `user` mode on the testbed's SeaweedFS",
            Self::Session => {
                "on, `session` mode on the testbed's SeaweedFS (its STS role, default session duration)"
            }
            Self::Off => "off (database, cache and network layers on)",
        }
    }

    /// The platform's `storage` section for `bucket`, with the admin Secret `s3`; `None` when off.
    fn spec(self, bucket: &str) -> Option<serde_json::Value> {
        let tb = Testbed::get();
        let mut spec = json!({
            "endpoint": tb.s3_endpoint(), "bucket": bucket, "forcePathStyle": true,
            "adminSecretRef": { "name": "s3" },
        });
        match self {
            Self::Off => return None,
            Self::User => {}
            Self::Session => {
                // The session duration and refresh are left to their defaults.
                spec["mode"] = json!("session");
                spec["sessionRoleArn"] = json!(session_role_arn());
            }
        }
        Some(spec)
    }
}

/// The role the testbed's SeaweedFS defines for `session` mode (`testbed/lib/seaweed_sts.sh`).
fn session_role_arn() -> String {
    let tb = Testbed::get();
    std::env::var("BULKHEAD_S3_SESSION_ROLE_ARN").unwrap_or_else(|_| {
        panic!(
            "the testbed env file {} has no BULKHEAD_S3_SESSION_ROLE_ARN: its SeaweedFS runs without the session role (testbed/lib/seaweed_sts.sh); run testbed/up again",
            tb.var("BULKHEAD_TESTBED_DIR")
        )
    })
}

struct Config {
    sizes: Vec<usize>,
    rate: f64,
    rate_seconds: u64,
    rss_orgs: usize,
    concurrency: usize,
    storage: StorageChoice,
    timeout: Duration,
    /// Run the floor before the operator at each size (it runs after by default).
    floor_first: bool,
    out: PathBuf,
}

impl Config {
    fn from_env(root: &Path) -> Self {
        let sizes: Vec<usize> = std::env::var("BULKHEAD_SCALE_SIZES")
            .unwrap_or_else(|_| "100,1000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .filter(|n| *n > 0)
            .collect();
        assert!(!sizes.is_empty(), "BULKHEAD_SCALE_SIZES names no size");
        Self {
            sizes,
            rate: env_or("BULKHEAD_SCALE_RATE", 10.0),
            rate_seconds: env_or("BULKHEAD_SCALE_RATE_SECONDS", 30),
            rss_orgs: env_or("BULKHEAD_SCALE_RSS_ORGS", 10_000),
            concurrency: env_or("BULKHEAD_SCALE_CONCURRENCY", 8),
            storage: StorageChoice::from_env(),
            timeout: Duration::from_secs(env_or("BULKHEAD_SCALE_TIMEOUT", 2400)),
            floor_first: env_or("BULKHEAD_SCALE_FLOOR_FIRST", 0) == 1,
            out: std::env::var_os("BULKHEAD_SCALE_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::var_os("CARGO_TARGET_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| root.join("target"))
                        .join("scale.md")
                }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process, through testbed/operator.

struct Operator {
    pid: u32,
    metrics_url: String,
    log: PathBuf,
}

fn testbed_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/bulkhead-testbed"))
}

fn operator_bin() -> String {
    std::env::var("BULKHEAD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_bulkhead").to_owned())
}

/// (Re)starts the operator for `platform` and returns its pid, /metrics URL and log.
fn start_operator(root: &Path, platform: &str, namespace: &str, concurrency: usize) -> Operator {
    let status = std::process::Command::new(root.join("testbed/operator"))
        .args([
            "restart",
            "--platform",
            platform,
            "--namespace",
            namespace,
            "--concurrency",
            &concurrency.to_string(),
        ])
        .env("BULKHEAD_BIN", operator_bin())
        .env("RUST_LOG", "info,kube=warn")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run testbed/operator");
    assert!(status.success(), "testbed/operator restart failed");
    let text = std::fs::read_to_string(testbed_dir().join("operator.env")).expect("operator.env");
    let var = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {k}=")))
            .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
            .unwrap_or_else(|| panic!("operator.env has no {k}"))
    };
    Operator {
        pid: var("BULKHEAD_OPERATOR_PID").parse().expect("pid"),
        metrics_url: var("BULKHEAD_OPERATOR_METRICS_URL"),
        log: PathBuf::from(var("BULKHEAD_OPERATOR_LOG")),
    }
}

fn stop_operator(root: &Path) {
    let _ = std::process::Command::new(root.join("testbed/operator"))
        .arg("stop")
        .stdout(std::process::Stdio::null())
        .status();
}

impl Operator {
    fn rss_mb(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("status");
        let kb: f64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb / 1024.0
    }

    /// utime + stime in seconds.
    fn cpu_seconds(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &s[s.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
        let ticks: f64 =
            f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
        ticks / clock_ticks()
    }

    async fn metrics(&self) -> String {
        reqwest::get(&self.metrics_url)
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("metrics text")
    }

    async fn org_reconciles(&self) -> f64 {
        metric(
            &self.metrics().await,
            "bulkhead_reconciles_total{kind=\"organization\"}",
        )
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The log from byte `from` on.
    fn log_since(&self, from: u64) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&bytes[(from as usize).min(bytes.len())..]).into_owned()
    }

    async fn ready(&self) -> bool {
        let url = self.metrics_url.replace("/metrics", "/readyz");
        matches!(reqwest::get(url).await, Ok(r) if r.status().is_success())
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("CLK_TCK")
    })
}

/// Fields 14-17 of `/proc/PID/stat` (utime, stime, cutime, cstime) in seconds.
fn proc_times(pid: u32) -> Option<[f64; 4]> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v / clock_ticks())
    };
    Some([t(11)?, t(12)?, t(13)?, t(14)?])
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds used so far by each testbed component: the process, its live children and the
/// children it has reaped (PostgreSQL's backends, including those already gone).
fn component_cpu() -> BTreeMap<String, f64> {
    let dir = testbed_dir().join("pids");
    let mut out = BTreeMap::new();
    let children: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, parent_of(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    for name in [
        "postgres",
        "redis",
        "kube-apiserver",
        "etcd",
        "kube-controller-manager",
        "seaweedfs",
    ] {
        let Some(pid) = std::fs::read_to_string(dir.join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let Some([u, s, cu, cs]) = proc_times(pid) else {
            continue;
        };
        let live: f64 = children
            .iter()
            .filter(|(_, parent)| *parent == pid)
            .filter_map(|(c, _)| proc_times(*c))
            .map(|t| t[0] + t[1])
            .sum();
        out.insert(name.to_owned(), u + s + cu + cs + live);
    }
    out
}

/// CPU seconds per process, largest first.
type CpuByProcess = Vec<(String, f64)>;

/// `after - before` per component, largest first, as "name 12.3".
fn cpu_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut d: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v >= 0.05)
        .collect();
    d.sort_by(|a, b| b.1.total_cmp(&a.1));
    d
}

fn cpu_cell(d: &[(String, f64)]) -> String {
    d.iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value of the sample `series` (name and labels exactly as exposed); 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Per-organization count of the operator's "reconciled" lines in `log` (one per pass).
fn passes_in(log: &str, names: &[String]) -> Vec<usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in log.lines().filter(|l| l.contains(" reconciled ")) {
        if let Some(name) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("organization="))
        {
            *counts.entry(name.trim_matches('"')).or_default() += 1;
        }
    }
    names
        .iter()
        .map(|n| counts.get(n.as_str()).copied().unwrap_or(0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Readiness, as seen through one watch.

#[derive(Clone, Default)]
struct ReadySeen(Arc<Mutex<HashMap<String, Instant>>>);

impl ReadySeen {
    fn start(client: kube::Client, run: &str) -> Self {
        let seen = ReadySeen::default();
        let api: Api<Organization> = Api::all(client);
        let cfg = watcher::Config::default().labels(&format!("{RUN_LABEL}={run}"));
        let s = seen.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, cfg)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = stream.next().await {
                let Ok(o) = ev else { continue };
                if common::org::is_true(&o, "Ready") {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    s.0.lock().unwrap().entry(name).or_insert_with(Instant::now);
                }
            }
        });
        seen
    }

    fn get(&self, name: &str) -> Option<Instant> {
        self.0.lock().unwrap().get(name).copied()
    }

    /// Waits until every one of `names` was seen Ready, or `timeout`; returns how many were.
    async fn wait(&self, names: &[String], timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let n = names.iter().filter(|n| self.get(n).is_some()).count();
            if n == names.len() || start.elapsed() > timeout {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The platform under test.

struct Platform {
    name: String,
    operator_ns: String,
    db_name: String,
    bucket: String,
}

fn s3_keys(tb: &Testbed) -> (&str, &str) {
    (tb.s3_access_key(), tb.s3_secret_key())
}

fn s3_client(tb: &Testbed) -> aws_sdk_s3::Client {
    let (k, s) = s3_keys(tb);
    let creds = aws_sdk_s3::config::Credentials::new(k, s, None, None, "scale");
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .endpoint_url(tb.s3_endpoint())
            .force_path_style(true)
            .build(),
    )
}

fn sts_client(tb: &Testbed) -> aws_sdk_sts::Client {
    let (k, s) = s3_keys(tb);
    let creds = aws_sdk_sts::config::Credentials::new(k, s, None, None, "scale");
    aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::new()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .endpoint_url(tb.s3_endpoint())
            .build(),
    )
}

fn iam_client(tb: &Testbed) -> aws_sdk_iam::Client {
    let (k, s) = s3_keys(tb);
    let creds = aws_sdk_iam::config::Credentials::new(k, s, None, None, "scale");
    aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::config::Builder::new()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .endpoint_url(tb.s3_endpoint())
            .build(),
    )
}

async fn create_platform(
    client: &kube::Client,
    tag: &str,
    storage: StorageChoice,
    interval: u32,
) -> Platform {
    let tb = Testbed::get();
    let operator_ns = format!("{tag}-op");
    common::ensure_namespace(client, &operator_ns).await;
    let db_name = tag.replace('-', "_");
    let admin = common::pg_connect(tb.pg_admin_url())
        .await
        .expect("pg admin");
    admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db_name)))
        .await
        .expect("create database");
    let db_url = common::with_database(tb.pg_admin_url(), &db_name);
    common::pg_connect(&db_url)
        .await
        .expect("connect")
        .batch_execute(include_str!("../examples/schema.sql"))
        .await
        .expect("schema");
    common::put_secret(client, &operator_ns, "pg", &[("url", &db_url)]).await;
    common::put_secret(
        client,
        &operator_ns,
        "redis",
        &[("url", tb.redis_admin_url())],
    )
    .await;
    let (mk, ms) = s3_keys(tb);
    common::put_secret(
        client,
        &operator_ns,
        "s3",
        &[("accessKeyId", mk), ("secretAccessKey", ms)],
    )
    .await;
    let bucket = tag.to_owned();
    let network = json!({ "namespaceTemplate": format!("{tag}-{{orgId}}") });
    let mut spec = json!({
        "database": {
            "adminUrlSecretRef": { "name": "pg", "key": "url" },
            "groupRole": format!("{db_name}_tenant"),
            "overrides": [{ "table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "system" }]
        },
        "cache": { "adminUrlSecretRef": { "name": "redis", "key": "url" }, "userPrefix": format!("{tag}-") },
        "network": network,
        "verification": { "intervalSeconds": interval }
    });
    if let Some(storage) = storage.spec(&bucket) {
        spec["storage"] = storage;
    }
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": tag }, "spec": spec
    }))
    .expect("platform");
    Api::<IsolationPlatform>::all(client.clone())
        .create(&PostParams::default(), &p)
        .await
        .expect("create platform");
    Platform {
        name: tag.to_owned(),
        operator_ns,
        db_name,
        bucket,
    }
}

fn organization(run: &str, platform: &str, name: &str, all_layers: bool) -> Organization {
    let mut spec = json!({ "orgId": name, "platformRef": platform, "deletionPolicy": "Retain" });
    if !all_layers {
        for layer in ["database", "storage", "cache"] {
            spec[layer] = json!({ "enabled": false });
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": { "name": name, "labels": { RUN_LABEL: run } },
        "spec": spec
    }))
    .expect("organization")
}

/// Creates `names` (16 requests in flight); returns each one's apply instant (before its POST).
async fn create_orgs(
    api: &Api<Organization>,
    run: &str,
    platform: &str,
    names: &[String],
    all_layers: bool,
) -> HashMap<String, Instant> {
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            let o = organization(run, platform, &name, all_layers);
            async move {
                let t = Instant::now();
                api.create(&PostParams::default(), &o)
                    .await
                    .expect("create organization");
                (name, t)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// The floor: the same backend writes, issued directly.

struct Floor {
    tag: String,
    pg_url: String,
    group: String,
    tables: Vec<(String, String)>,
    redis: redis::aio::MultiplexedConnection,
    rules: CacheRules,
    s3: aws_sdk_s3::Client,
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
    bucket: String,
    storage: StorageChoice,
    /// `session` mode's settings, as the operator derives them from the platform's spec.
    session: Option<SessionFloor>,
    kube: kube::Client,
    network: net_plan::NetworkConfig,
}

/// The floor's `session` mode: the layer built from the same spec as the platform's (it makes no
/// request; it names the prefix, the owner record and the canary), the role and the session
/// duration.
struct SessionFloor {
    layer: StorageLayer,
    role_arn: String,
    duration_seconds: i32,
}

/// What one organization's storage writes left, and the keys they put into its credentials
/// Secret.
#[derive(Default)]
struct FloorStorage {
    objects: Vec<String>,
    /// `user` mode: the IAM user and its policy's ARN, for the cleanup.
    iam_user: Option<String>,
    creds: BTreeMap<String, String>,
}

/// What one floor organization left behind, for the cleanup.
struct FloorOrg {
    role: String,
    acl_user: String,
    namespace: String,
    objects: Vec<String>,
    iam_user: Option<String>,
}

impl Floor {
    async fn setup(tag: &str, storage: StorageChoice, kube: kube::Client) -> Floor {
        let tb = Testbed::get();
        let admin = common::pg_connect(tb.pg_admin_url())
            .await
            .expect("pg admin");
        let db = tag.replace('-', "_");
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db)))
            .await
            .expect("floor database");
        let group = format!("{db}_g");
        admin
            .batch_execute(&format!("CREATE ROLE {} NOLOGIN", quote_ident(&group)))
            .await
            .expect("floor group");
        let pg_url = common::with_database(tb.pg_admin_url(), &db);
        let c = common::pg_connect(&pg_url).await.expect("floor db");
        c.batch_execute(include_str!("../examples/schema.sql"))
            .await
            .expect("schema");
        c.batch_execute(
            "CREATE SCHEMA floor;
             CREATE TABLE floor.tenant_roles (role_name text PRIMARY KEY, org_id text NOT NULL, owner_uid text);
             CREATE TABLE floor.registry (id text PRIMARY KEY, display_name text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .expect("floor tables");
        let tables = c
            .query(
                "SELECT table_schema::text, table_name::text FROM information_schema.columns
                  WHERE column_name = 'org_id' AND table_schema = 'public' ORDER BY 2",
                &[],
            )
            .await
            .expect("tables")
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let redis = redis::Client::open(tb.redis_admin_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let cache_spec = CachePlatform {
            user_prefix: format!("{tag}-"),
            ..common::cache_spec()
        };
        let rules = CacheRules::from_spec(&cache_spec).expect("cache rules");
        let s3 = s3_client(tb);
        let bucket = tag.to_owned();
        if storage != StorageChoice::Off {
            s3.create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .expect("floor bucket");
        }
        let session = (storage == StorageChoice::Session).then(|| {
            let spec: bulkhead::api::platform::StoragePlatform =
                serde_json::from_value(storage.spec(&bucket).expect("storage on"))
                    .expect("storage spec");
            let timing = session::Timing::of(&spec).expect("session timing");
            SessionFloor {
                layer: StorageLayer::connect(&spec, tb.s3_access_key(), tb.s3_secret_key())
                    .expect("storage layer"),
                role_arn: spec.session_role_arn.clone().expect("sessionRoleArn"),
                duration_seconds: i32::try_from(timing.duration_seconds).expect("session duration"),
            }
        });
        let network = net_plan::validate(
            &serde_json::from_value(json!({ "namespaceTemplate": format!("{tag}-{{orgId}}") }))
                .expect("network spec"),
        )
        .expect("network config");
        Floor {
            tag: tag.to_owned(),
            pg_url,
            group,
            tables,
            redis,
            rules,
            s3,
            iam: iam_client(tb),
            sts: sts_client(tb),
            bucket,
            storage,
            session,
            kube,
            network,
        }
    }

    fn tenant(&self, org: &OrgId) -> Tenant {
        Tenant {
            name: org.to_string(),
            org_id: org.clone(),
            display_name: org.to_string(),
            namespace: format!("{}-{org}", self.tag),
            deletion_policy: DeletionPolicy::Retain,
            rotate: false,
            peers: vec![OrgId::sentinel()],
            owner: Default::default(),
            adopt_from: None,
            resource_quota: None,
            limit_range: None,
        }
    }

    /// One organization's writes on PostgreSQL, in one transaction on `pg`.
    async fn pg(&self, pg: &mut tokio_postgres::Client, org: &OrgId, uid: &str) -> String {
        let role = format!(
            "{}_{}",
            self.tag.replace('-', "_"),
            org.as_str().replace('-', "_")
        );
        let password = bulkhead::layers::random_secret(32);
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let r = quote_ident(&role);
        let tx = pg.transaction().await.expect("tx");
        let mut ddl = vec![
            format!(
                "CREATE ROLE {r} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT CONNECTION LIMIT 20 PASSWORD {}",
                quote_literal(&verifier)
            ),
            format!("GRANT {} TO {r}", quote_ident(&self.group)),
        ];
        for (name, value) in [
            ("statement_timeout", "30000"),
            ("idle_in_transaction_session_timeout", "60000"),
            ("lock_timeout", "10000"),
        ] {
            ddl.push(format!("ALTER ROLE {r} SET {name} = {value}"));
        }
        for stmt in &ddl {
            tx.batch_execute(stmt).await.expect("role statement");
        }
        tx.execute(
            "INSERT INTO floor.tenant_roles (role_name, org_id, owner_uid) VALUES ($1, $2, $3)",
            &[&role, &org.as_str(), &uid],
        )
        .await
        .expect("mapping row");
        tx.execute(
            "INSERT INTO floor.registry (id, display_name) VALUES ($1, $2)",
            &[&org.as_str(), &org.as_str()],
        )
        .await
        .expect("registry row");
        for (schema, table) in &self.tables {
            tx.execute(
                &format!(
                    "INSERT INTO {}.{} (org_id) VALUES ($1)",
                    quote_ident(schema),
                    quote_ident(table)
                ),
                &[&org.as_str()],
            )
            .await
            .expect("canary row");
        }
        tx.commit().await.expect("commit");
        role
    }

    async fn cache(&self, org: &OrgId, uid: &str) -> String {
        let mut con = self.redis.clone();
        let password = bulkhead::layers::random_secret(32);
        let plan = self
            .rules
            .plan(org, &cache_rules::password_sha256(&password))
            .expect("acl plan");
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&plan.user);
        for rule in plan.setuser_rules() {
            cmd.arg(rule);
        }
        let _: () = cmd.query_async(&mut con).await.expect("ACL SETUSER");
        let record = self.rules.owner_record_key(org).expect("owner key");
        let _: Option<String> = redis::cmd("SET")
            .arg(&record)
            .arg(uid)
            .arg("NX")
            .query_async(&mut con)
            .await
            .expect("owner record");
        let canary = self.rules.canary_key(org).expect("canary key");
        let _: () = redis::cmd("SET")
            .arg(&canary)
            .arg(cache_rules::CANARY_VALUE)
            .query_async(&mut con)
            .await
            .expect("canary");
        plan.user
    }

    /// The storage mode's writes for a new organization.
    async fn storage(&self, org: &OrgId, uid: &str) -> FloorStorage {
        match self.storage {
            StorageChoice::Off => FloorStorage::default(),
            StorageChoice::User => self.storage_user(org, uid).await,
            StorageChoice::Session => self.storage_session(org, uid).await,
        }
    }

    async fn put_object(&self, key: &str, body: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .expect("PutObject");
    }

    /// `session` mode's writes, in the operator's order: the owner record; `AssumeRole` of the
    /// role with the organization's session policy, its orgId as the session name and the
    /// platform's session duration; the canary. The session goes into the credentials Secret.
    async fn storage_session(&self, org: &OrgId, uid: &str) -> FloorStorage {
        let s = self.session.as_ref().expect("session mode's settings");
        let record = s.layer.owner_record_key(org);
        self.put_object(
            &record,
            StorageLayer::owner_record_body(org, uid).expect("owner record"),
        )
        .await;
        let policy = storage_policy::session_policy(&self.bucket, &s.layer.prefix(org));
        // The testbed's guard style is allUsers (an endpoint is set): no session tag.
        let out = self
            .sts
            .assume_role()
            .role_arn(&s.role_arn)
            .role_session_name(session::session_name(org).expect("session name"))
            .duration_seconds(s.duration_seconds)
            .policy(policy.to_json())
            .send()
            .await
            .expect("AssumeRole");
        let c = out.credentials().expect("AssumeRole credentials");
        let expiry = Timestamp::from_second(c.expiration().secs()).expect("session expiry");
        let canary = s.layer.canary_key(org);
        self.put_object(&canary, storage::canary_body(org).into_bytes())
            .await;
        FloorStorage {
            objects: vec![record, canary],
            iam_user: None,
            creds: BTreeMap::from([
                (
                    storage::KEY_ACCESS_KEY_ID.to_owned(),
                    c.access_key_id().to_owned(),
                ),
                (
                    storage::KEY_SECRET_ACCESS_KEY.to_owned(),
                    c.secret_access_key().to_owned(),
                ),
                (
                    storage::KEY_SESSION_TOKEN.to_owned(),
                    c.session_token().to_owned(),
                ),
                (
                    storage::KEY_CREDENTIAL_EXPIRATION.to_owned(),
                    expiry.to_string(),
                ),
            ]),
        }
    }

    /// `user` mode's writes: IAM user, tag, managed policy, attachment, access key; owner
    /// record and canary objects.
    async fn storage_user(&self, org: &OrgId, uid: &str) -> FloorStorage {
        let name = org.to_string();
        let policy = json!({
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                    "Resource": [format!("arn:aws:s3:::{}/{org}/*", self.bucket)]
                },
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket"],
                    "Resource": [format!("arn:aws:s3:::{}", self.bucket)],
                    "Condition": { "StringLike": { "s3:prefix": [format!("{org}/*")] } }
                }
            ]
        });
        self.iam
            .create_user()
            .user_name(&name)
            .send()
            .await
            .expect("CreateUser");
        self.iam
            .tag_user()
            .user_name(&name)
            .tags(
                aws_sdk_iam::types::Tag::builder()
                    .key("org_id")
                    .value(org.as_str())
                    .build()
                    .expect("tag"),
            )
            .send()
            .await
            .expect("TagUser");
        let created = self
            .iam
            .create_policy()
            .policy_name(format!("{}-{org}", self.tag))
            .policy_document(policy.to_string())
            .send()
            .await
            .expect("CreatePolicy");
        let arn = created
            .policy()
            .and_then(|p| p.arn())
            .expect("policy ARN")
            .to_owned();
        self.iam
            .attach_user_policy()
            .user_name(&name)
            .policy_arn(&arn)
            .send()
            .await
            .expect("AttachUserPolicy");
        let key = self
            .iam
            .create_access_key()
            .user_name(&name)
            .send()
            .await
            .expect("CreateAccessKey");
        let key = key.access_key().expect("access key");
        let record = format!("floor-owners/{org}");
        let canary = format!("{org}/bulkhead-canary");
        for (key, body) in [
            (&record, uid.to_owned()),
            (&canary, format!("canary of {org}\n")),
        ] {
            self.put_object(key, body.into_bytes()).await;
        }
        FloorStorage {
            objects: vec![record, canary],
            iam_user: Some(format!("{name}\n{arn}")),
            creds: BTreeMap::from([
                (
                    storage::KEY_ACCESS_KEY_ID.to_owned(),
                    key.access_key_id().to_owned(),
                ),
                (
                    storage::KEY_SECRET_ACCESS_KEY.to_owned(),
                    key.secret_access_key().to_owned(),
                ),
            ]),
        }
    }

    async fn kube(&self, org: &OrgId, creds: BTreeMap<String, String>) -> String {
        let t = self.tenant(org);
        let ns_name = t.namespace.clone();
        let labels = BTreeMap::from([(FLOOR_LABEL.to_owned(), self.tag.clone())]);
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(ns_name.clone()),
                labels: Some(labels.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.kube.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
        let nps: Api<NetworkPolicy> = Api::namespaced(self.kube.clone(), &ns_name);
        for mut np in net_plan::plan(&self.network, &t).policies {
            np.metadata.owner_references = None;
            np.metadata.labels = Some(labels.clone());
            np.metadata.namespace = Some(ns_name.clone());
            nps.create(&PostParams::default(), &np)
                .await
                .expect("network policy");
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(CREDENTIALS_SECRET.into()),
                namespace: Some(ns_name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            data: Some(
                creds
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.kube.clone(), &ns_name)
            .create(&PostParams::default(), &secret)
            .await
            .expect("secret");
        ns_name
    }

    /// Provisions `n` organizations with `concurrency` workers (each with its own PostgreSQL
    /// connection; the layers of one organization in parallel, as the operator's pass does).
    async fn run(
        &self,
        phase: &str,
        n: usize,
        concurrency: usize,
    ) -> (Duration, Vec<(String, f64)>, Vec<FloorOrg>) {
        let mut conns = Vec::new();
        for _ in 0..concurrency {
            conns.push(common::pg_connect(&self.pg_url).await.expect("floor pg"));
        }
        let pool = Arc::new(tokio::sync::Mutex::new(conns));
        let cpu0 = component_cpu();
        let start = Instant::now();
        let out: Vec<FloorOrg> = futures::stream::iter(0..n)
            .map(|i| {
                let pool = pool.clone();
                async move {
                    let org = OrgId::parse(&format!("f{phase}-{i}")).expect("org id");
                    let uid = format!("floor-uid-{phase}-{i}");
                    let mut pg = pool.lock().await.pop().expect("a connection per worker");
                    let (role, acl_user, storage) = tokio::join!(
                        self.pg(&mut pg, &org, &uid),
                        self.cache(&org, &uid),
                        self.storage(&org, &uid)
                    );
                    pool.lock().await.push(pg);
                    let bucket = (self.storage != StorageChoice::Off).then_some(&*self.bucket);
                    let creds = floor_credentials(&org, &role, &acl_user, bucket, storage.creds);
                    let namespace = self.kube(&org, creds).await;
                    FloorOrg {
                        role,
                        acl_user,
                        namespace,
                        objects: storage.objects,
                        iam_user: storage.iam_user,
                    }
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let elapsed = start.elapsed();
        (elapsed, cpu_delta(&cpu0, &component_cpu()), out)
    }

    /// Removes what `run` wrote (the namespaces go in the background).
    async fn cleanup(&self, orgs: Vec<FloorOrg>) {
        let tb = Testbed::get();
        let admin = common::pg_connect(tb.pg_admin_url())
            .await
            .expect("pg admin");
        let db = common::pg_connect(&self.pg_url).await.expect("floor db");
        let ns_api: Api<Namespace> = Api::all(self.kube.clone());
        let mut con = self.redis.clone();
        for o in &orgs {
            db.batch_execute(&format!("DROP OWNED BY {}", quote_ident(&o.role)))
                .await
                .expect("drop owned");
            admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&o.role)))
                .await
                .expect("drop role");
            let _: i64 = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&o.acl_user)
                .query_async(&mut con)
                .await
                .expect("ACL DELUSER");
            let _ = ns_api.delete(&o.namespace, &DeleteParams::default()).await;
            for key in &o.objects {
                let _ = self
                    .s3
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await;
            }
            if let Some((user, arn)) = o.iam_user.as_deref().and_then(|u| u.split_once('\n')) {
                if let Ok(keys) = self.iam.list_access_keys().user_name(user).send().await {
                    for k in keys.access_key_metadata() {
                        let _ = self
                            .iam
                            .delete_access_key()
                            .user_name(user)
                            .access_key_id(k.access_key_id().unwrap_or_default())
                            .send()
                            .await;
                    }
                }
                let _ = self
                    .iam
                    .detach_user_policy()
                    .user_name(user)
                    .policy_arn(arn)
                    .send()
                    .await;
                let _ = self.iam.delete_policy().policy_arn(arn).send().await;
                let _ = self.iam.delete_user().user_name(user).send().await;
            }
        }
        // Sessions cannot be revoked; they expire. The bucket is empty once the objects are gone.
        if self.storage != StorageChoice::Off {
            let _ = self.s3.delete_bucket().bucket(&self.bucket).send().await;
        }
    }
}

/// A credentials Secret's keys as the operator writes them: the database and cache layers', and
/// with storage on (`bucket`) the location and `storage`, the keys of the storage mode's
/// credentials.
fn floor_credentials(
    org: &OrgId,
    role: &str,
    acl_user: &str,
    bucket: Option<&str>,
    storage: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let tb = Testbed::get();
    let pg_pw = bulkhead::layers::random_secret(32);
    let redis_pw = bulkhead::layers::random_secret(32);
    let mut creds = BTreeMap::from([
        (
            "DATABASE_URL".into(),
            format!("postgres://{role}:{pg_pw}@127.0.0.1/floor"),
        ),
        ("DATABASE_USER".into(), role.to_owned()),
        ("DATABASE_PASSWORD".into(), pg_pw),
        (
            "REDIS_URL".into(),
            format!("redis://{acl_user}:{redis_pw}@127.0.0.1"),
        ),
        ("REDIS_USERNAME".into(), acl_user.to_owned()),
        ("REDIS_PASSWORD".into(), redis_pw),
        ("REDIS_KEY_PREFIX".into(), format!("org:{org}:")),
        ("REDIS_CHANNEL_PREFIX".into(), format!("org:{org}:")),
    ]);
    if let Some(bucket) = bucket {
        creds.extend([
            (storage::KEY_BUCKET.into(), bucket.to_owned()),
            (storage::KEY_PREFIX.into(), format!("{org}/")),
            (storage::KEY_REGION.into(), "us-east-1".into()),
            (storage::KEY_FORCE_PATH_STYLE.into(), "true".into()),
            (storage::KEY_ENDPOINT.into(), tb.s3_endpoint().to_owned()),
        ]);
        creds.extend(storage);
    }
    creds
}

// ---------------------------------------------------------------------------------------------
// Measurements.

struct Burst {
    /// CPU seconds of the operator and of each backend from the first create to the last Ready.
    cpu: Vec<(String, f64)>,
    n: usize,
    ready: usize,
    seconds: f64,
    passes_mean: f64,
    passes_min: usize,
    passes_max: usize,
    reconciles_per_org: f64,
}

/// Where the harness creates Organizations and how it sees them get Ready.
struct Fleet<'a> {
    api: &'a Api<Organization>,
    seen: &'a ReadySeen,
    run: &'a str,
    platform: &'a str,
    timeout: Duration,
}

async fn burst(op: &Operator, fleet: &Fleet<'_>, names: &[String], all_layers: bool) -> Burst {
    let Fleet {
        api,
        seen,
        run,
        platform,
        timeout,
    } = *fleet;
    let log_from = op.log_len();
    let before = op.org_reconciles().await;
    let (op_cpu0, cpu0) = (op.cpu_seconds(), component_cpu());
    let t0 = Instant::now();
    create_orgs(api, run, platform, names, all_layers).await;
    let ready = seen.wait(names, timeout).await;
    let mut cpu1 = component_cpu();
    cpu1.insert("operator".into(), op.cpu_seconds());
    let mut cpu0 = cpu0;
    cpu0.insert("operator".into(), op_cpu0);
    let last = names.iter().filter_map(|n| seen.get(n)).max().unwrap_or(t0);
    // Whatever the passes wrote must not start more passes: wait, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = op.org_reconciles().await;
    let counts = passes_in(&op.log_since(log_from), names);
    let n = names.len();
    Burst {
        cpu: cpu_delta(&cpu0, &cpu1),
        n,
        ready,
        seconds: (last - t0).as_secs_f64(),
        passes_mean: counts.iter().sum::<usize>() as f64 / n as f64,
        passes_min: counts.iter().copied().min().unwrap_or(0),
        passes_max: counts.iter().copied().max().unwrap_or(0),
        reconciles_per_org: (after - before) / n as f64,
    }
}

struct Sweep {
    /// Backend CPU seconds over the same window (not corrected for idle).
    backends: Vec<(String, f64)>,
    orgs: usize,
    passes: f64,
    cpu_seconds: f64,
    idle_cpu_seconds: f64,
    wall_seconds: f64,
}

/// One pass per Organization, started by a change of the platform's spec (the verification
/// interval), which runs the same pass as the schedule; CPU of the operator from the change
/// until every Organization had its pass and the operator is quiet again.
async fn sweep(
    op: &Operator,
    client: &kube::Client,
    platform: &str,
    orgs: usize,
    interval: u32,
) -> Sweep {
    // Idle rate first, over 5 s.
    let c0 = op.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_rate = (op.cpu_seconds() - c0) / 5.0;
    let before = op.org_reconciles().await;
    let cpu0 = op.cpu_seconds();
    let backends0 = component_cpu();
    let t0 = Instant::now();
    Api::<IsolationPlatform>::all(client.clone())
        .patch(
            platform,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "verification": { "intervalSeconds": interval } } })),
        )
        .await
        .expect("patch platform");
    let mut last_change = Instant::now();
    let mut last = before;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = op.org_reconciles().await;
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        let done = now - before >= orgs as f64;
        if (done && last_change.elapsed() > Duration::from_secs(2))
            || t0.elapsed() > Duration::from_secs(1800)
        {
            break;
        }
    }
    let wall = (last_change - t0).as_secs_f64();
    let cpu = op.cpu_seconds() - cpu0;
    let idle = idle_rate * t0.elapsed().as_secs_f64();
    Sweep {
        backends: cpu_delta(&backends0, &component_cpu()),
        orgs,
        passes: last - before,
        cpu_seconds: cpu - idle,
        idle_cpu_seconds: idle,
        wall_seconds: wall,
    }
}

struct Latency {
    created: usize,
    offered_rate: f64,
    achieved_rate: f64,
    ready: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

async fn steady_rate(
    fleet: &Fleet<'_>,
    prefix: &str,
    rate: f64,
    seconds: u64,
) -> (Latency, Vec<String>) {
    let Fleet {
        api,
        seen,
        run,
        platform,
        timeout,
    } = *fleet;
    let count = (rate * seconds as f64).round() as usize;
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let applied = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for name in &names {
        ticker.tick().await;
        let (api, applied) = (api.clone(), applied.clone());
        let o = organization(run, platform, name, true);
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            api.create(&PostParams::default(), &o)
                .await
                .expect("create organization");
            applied.lock().unwrap().insert(name, t);
        }));
    }
    for t in tasks {
        t.await.expect("create task");
    }
    let achieved = count as f64 / start.elapsed().as_secs_f64();
    let ready = seen.wait(&names, timeout).await;
    let applied = applied.lock().unwrap().clone();
    let mut lat: Vec<f64> = names
        .iter()
        .filter_map(|n| Some((seen.get(n)? - applied[n]).as_secs_f64()))
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1]
        }
    };
    (
        Latency {
            created: count,
            offered_rate: rate,
            achieved_rate: achieved,
            ready,
            p50: pct(0.50),
            p99: pct(0.99),
            max: lat.last().copied().unwrap_or(f64::NAN),
        },
        names,
    )
}

/// What the backends hold that a pass may write, to compare before and after a restart.
#[derive(Default)]
struct Snapshot {
    pg_writes: i64,
    /// Rows written per table of the platform's database (catalogs and shared catalogs too).
    pg_tables: HashMap<String, i64>,
    roles: HashMap<String, String>,
    acl_setuser: i64,
    redis_writes: i64,
    kube: HashMap<String, String>,
    orgs: HashMap<String, String>,
    s3: HashMap<String, String>,
}

async fn snapshot(client: &kube::Client, platform: &Platform, storage: StorageChoice) -> Snapshot {
    let tb = Testbed::get();
    let pg = common::pg_connect(tb.pg_admin_url())
        .await
        .expect("pg admin");
    // pg_stat_database includes a row (datid 0) for the shared catalogs, where roles live.
    let row = pg
        .query_one(
            "SELECT coalesce(sum(tup_inserted + tup_updated + tup_deleted), 0)::bigint FROM pg_stat_database",
            &[],
        )
        .await
        .expect("pg_stat_database");
    let pg_tables = common::pg_connect(&common::with_database(tb.pg_admin_url(), &platform.db_name))
        .await
        .expect("platform database")
        .query(
            "SELECT schemaname::text || '.' || relname::text, (n_tup_ins + n_tup_upd + n_tup_del)::bigint
               FROM pg_stat_all_tables",
            &[],
        )
        .await
        .expect("pg_stat_all_tables")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // A role's row gets a new xmin with every change of its attributes, password or settings.
    let roles = pg
        .query(
            "SELECT a.rolname::text, a.xmin::text || '/' || coalesce(s.xmin::text, '-')
               FROM pg_authid a LEFT JOIN pg_db_role_setting s ON s.setrole = a.oid AND s.setdatabase = 0",
            &[],
        )
        .await
        .expect("roles")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut con = redis::Client::open(tb.redis_admin_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .expect("INFO");
    let calls = |cmd: &str| -> i64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let redis_writes = [
        "set",
        "del",
        "unlink",
        "acl|deluser",
        "acl|save",
        "client|kill",
        "eval",
    ]
    .iter()
    .map(|c| calls(c))
    .sum();
    let mut kube_objs = HashMap::new();
    let sel = ListParams::default().labels("app.kubernetes.io/managed-by=bulkhead");
    let prefix = format!("{}-", platform.name);
    for (kind, items) in [
        (
            "Namespace",
            managed_metadata::<Namespace>(client, &sel).await,
        ),
        (
            "NetworkPolicy",
            managed_metadata::<NetworkPolicy>(client, &sel).await,
        ),
        ("Secret", managed_metadata::<Secret>(client, &sel).await),
    ] {
        for m in items {
            let ns = m.namespace.clone().unwrap_or_default();
            let name = m.name.clone().unwrap_or_default();
            if ns.starts_with(&prefix) || name.starts_with(&prefix) {
                kube_objs.insert(
                    format!("{kind}/{ns}/{name}"),
                    m.resource_version.unwrap_or_default(),
                );
            }
        }
    }
    let orgs = Api::<Organization>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .expect("organizations")
        .items
        .into_iter()
        .map(|m| {
            (
                m.metadata.name.unwrap_or_default(),
                m.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect();
    let mut s3 = HashMap::new();
    if storage != StorageChoice::Off {
        let pages = s3_client(tb)
            .list_objects_v2()
            .bucket(&platform.bucket)
            .into_paginator()
            .send()
            .collect::<Vec<_>>()
            .await;
        for page in pages {
            for o in page.expect("list objects").contents() {
                s3.insert(
                    o.key().unwrap_or_default().to_owned(),
                    format!("{:?}/{}", o.last_modified(), o.e_tag().unwrap_or_default()),
                );
            }
        }
    }
    Snapshot {
        pg_writes: row.get(0),
        pg_tables,
        roles,
        acl_setuser: calls("acl|setuser"),
        redis_writes,
        kube: kube_objs,
        orgs,
        s3,
    }
}

/// Entries of `after` that are new or differ from `before`, plus entries gone.
fn changed(before: &HashMap<String, String>, after: &HashMap<String, String>) -> usize {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .count()
        + before.keys().filter(|k| !after.contains_key(*k)).count()
}

struct Restart {
    orgs: usize,
    until_ready: f64,
    until_idle: f64,
    passes: usize,
    reconciles: f64,
    status_patches: f64,
    pg_tuples: i64,
    pg_tables: Vec<(String, i64)>,
    pg_roles_changed: usize,
    acl_setuser: i64,
    redis_other_writes: i64,
    kube_changed: usize,
    kube_total: usize,
    /// The credentials Secrets among the kube objects: a new session is written into one.
    secrets_changed: usize,
    secrets_total: usize,
    orgs_changed: usize,
    s3_changed: usize,
    s3_total: usize,
}

async fn noop_restart(
    root: &Path,
    client: &kube::Client,
    platform: &Platform,
    cfg: &Config,
    orgs: usize,
) -> (Restart, Operator) {
    // Statistics of earlier work reach pg_stat_* within about 10 s of a backend going idle.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = snapshot(client, platform, cfg.storage).await;
    stop_operator(root);
    let t0 = Instant::now();
    let op = start_operator(root, &platform.name, &platform.operator_ns, cfg.concurrency);
    while !op.ready().await && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until_ready = t0.elapsed().as_secs_f64();
    // Idle: the first moment after which the operator used under 2% of a core for 3 s in a row
    // (measured in 0.5 s windows).
    let mut quiet_since: Option<Instant> = None;
    let mut cpu = op.cpu_seconds();
    let until_idle = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now_cpu = op.cpu_seconds();
        let busy = (now_cpu - cpu) / 0.5 > 0.02;
        cpu = now_cpu;
        match (busy, quiet_since) {
            (true, _) => quiet_since = None,
            (false, None) => quiet_since = Some(Instant::now() - Duration::from_millis(500)),
            (false, Some(q)) if q.elapsed() >= Duration::from_secs(3) => {
                break (q - t0).as_secs_f64();
            }
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(600) {
            break f64::NAN;
        }
    };
    // PostgreSQL publishes a backend's statistics within about a second, idle ones within 10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let metrics = op.metrics().await;
    let log = op.log_since(0);
    // This process's lines start after the last "starting operator" banner of testbed/operator.
    let own = log.rsplit("===== ").next().unwrap_or("");
    let passes = own.lines().filter(|l| l.contains(" reconciled ")).count();
    let after = snapshot(client, platform, cfg.storage).await;
    let secrets = |m: &HashMap<String, String>| -> HashMap<String, String> {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("Secret/") && k.ends_with(&format!("/{CREDENTIALS_SECRET}"))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (secrets_before, secrets_after) = (secrets(&before.kube), secrets(&after.kube));
    (
        Restart {
            orgs,
            until_ready,
            until_idle,
            passes,
            reconciles: metric(&metrics, "bulkhead_reconciles_total{kind=\"organization\"}"),
            status_patches: metric(
                &metrics,
                "bulkhead_status_patches_total{kind=\"organization\"}",
            ),
            pg_tuples: after.pg_writes - before.pg_writes,
            pg_tables: {
                let mut t: Vec<(String, i64)> = after
                    .pg_tables
                    .iter()
                    .map(|(k, v)| (k.clone(), v - before.pg_tables.get(k).copied().unwrap_or(0)))
                    .filter(|(_, d)| *d != 0)
                    .collect();
                t.sort_by_key(|e| std::cmp::Reverse(e.1));
                t
            },
            pg_roles_changed: changed(&before.roles, &after.roles),
            acl_setuser: after.acl_setuser - before.acl_setuser,
            redis_other_writes: after.redis_writes - before.redis_writes,
            kube_changed: changed(&before.kube, &after.kube),
            kube_total: after.kube.len(),
            secrets_changed: changed(&secrets_before, &secrets_after),
            secrets_total: secrets_after.len(),
            orgs_changed: changed(&before.orgs, &after.orgs),
            s3_changed: changed(&before.s3, &after.s3),
            s3_total: after.s3.len(),
        },
        op,
    )
}

async fn delete_orgs(api: &Api<Organization>, names: &[String]) -> f64 {
    let t0 = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|n| {
            let api = api.clone();
            async move {
                let _ = api.delete(&n, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let set: std::collections::HashSet<&String> = names.iter().collect();
    while t0.elapsed() < Duration::from_secs(900) {
        let left = api
            .list_metadata(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|m| m.metadata.name.as_ref().is_some_and(|n| set.contains(n)))
                    .count()
            })
            .unwrap_or(usize::MAX);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    t0.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    format!("{nproc} cores (nproc), {mem_gib:.1} GiB memory, load average {load} at start")
}

/// The tables `BULKHEAD_SCALE_RECORD` may add to `BENCHMARKS.md`, with their headings. A table
/// whose markers are there already is replaced, whatever its name.
const RECORDS: &[(&str, &str)] = &[(
    "storage-session",
    "### Run 3: every layer on (SeaweedFS `session` mode)",
)];

/// Replaces the block between `<!-- scale-table NAME -->` and `<!-- /scale-table NAME -->` in
/// `path` with `table`. Without that block, a name of [`RECORDS`] gets it, under its heading, at
/// the end of the Scale section (the end of the file when there is none).
fn record(path: &Path, name: &str, table: &str) {
    let text = std::fs::read_to_string(path).expect("read BENCHMARKS.md");
    let new = recorded(&text, name, table).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::write(path, new).expect("write BENCHMARKS.md");
    eprintln!("[scale] table recorded in {} ({name})", path.display());
}

/// `text` with the table `name` replaced or added (see [`record`]).
fn recorded(text: &str, name: &str, table: &str) -> Result<String, String> {
    let (open, close) = (
        format!("<!-- scale-table {name} -->"),
        format!("<!-- /scale-table {name} -->"),
    );
    match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if a < b => Ok(format!("{}{open}\n{table}\n{}", &text[..a], &text[b..])),
        (Some(_), Some(_)) => Err(format!("{open} comes after {close}")),
        (Some(_), None) | (None, Some(_)) => Err(format!("{open} or {close} is missing")),
        (None, None) => {
            let Some((_, heading)) = RECORDS.iter().find(|(n, _)| *n == name) else {
                return Err(format!(
                    "no {open} … {close} block, and the harness adds only {}",
                    RECORDS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let block = format!("{heading}\n\n{open}\n{table}\n{close}\n");
            // Before the next level-2 heading after "## Scale", else at the end.
            let next = text
                .find("\n## Scale\n")
                .and_then(|s| text[s + 1..].find("\n## ").map(|n| s + 2 + n));
            Ok(match next {
                Some(at) => format!("{}\n\n{block}\n{}", text[..at].trim_end(), &text[at..]),
                None => format!("{}\n\n{block}", text.trim_end()),
            })
        }
    }
}

fn secs(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2} s")
    } else {
        format!("{x:.1} s")
    }
}

#[tokio::main]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tb = Testbed::get();
    let cfg = Config::from_env(&root);
    let machine = machine();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let client = tb.kube().await;
    common::install_crds(&client).await;
    let run = format!("sc{}", std::process::id() % 100_000);
    let mut lines: Vec<String> = Vec::new();
    let say = |s: String| {
        eprintln!("[scale] {s}");
    };
    say(format!(
        "run {run}: sizes {:?}, storage {:?}, concurrency {}, rate {}/s for {} s, RSS point {}",
        cfg.sizes, cfg.storage, cfg.concurrency, cfg.rate, cfg.rate_seconds, cfg.rss_orgs
    ));

    let interval = 3600;
    let platform = create_platform(&client, &run, cfg.storage, interval).await;
    let floor = Floor::setup(&format!("{run}f"), cfg.storage, client.clone()).await;
    let api: Api<Organization> = Api::all(client.clone());
    let seen = ReadySeen::start(client.clone(), &run);
    let fleet = Fleet {
        api: &api,
        seen: &seen,
        run: &run,
        platform: &platform.name,
        timeout: cfg.timeout,
    };
    let mut op = start_operator(
        &root,
        &platform.name,
        &platform.operator_ns,
        cfg.concurrency,
    );
    // The platform's own pass (prepare of every layer), then quiet.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss0 = op.rss_mb();
    say(format!("RSS with 0 Organizations: {rss0:.1} MB"));

    let mut bursts: Vec<(Burst, Duration, CpuByProcess)> = Vec::new();
    let mut rss: Vec<(String, f64)> = vec![("0".into(), rss0)];
    let mut sweeps: Vec<Sweep> = Vec::new();
    let mut restart: Option<Restart> = None;
    let mut deletes: Vec<(usize, f64)> = Vec::new();
    let mut latency: Option<Latency> = None;
    let mut big: Option<Burst> = None;
    let mut live: Vec<String> = Vec::new();
    let mut floor_left: Vec<FloorOrg> = Vec::new();
    let largest = *cfg.sizes.iter().max().expect("a size");
    let mut toggle = interval;
    for (k, &n) in cfg.sizes.iter().enumerate() {
        let names: Vec<String> = (0..n).map(|i| format!("{run}-b{k}-{i}")).collect();
        let mut floor_result = None;
        if cfg.floor_first {
            say(format!("floor for {n} (before the operator)"));
            let (t, cpu, orgs) = floor.run(&format!("{k}"), n, cfg.concurrency).await;
            say(format!("floor for {n}: {:.1} s", t.as_secs_f64()));
            floor_left.extend(orgs);
            floor_result = Some((t, cpu));
        }
        say(format!("burst of {n}: creating"));
        let b = burst(&op, &fleet, &names, true).await;
        say(format!(
            "burst of {n}: {} Ready in {:.1} s, passes per org mean {:.2} (min {}, max {}), reconciles per org {:.2}",
            b.ready, b.seconds, b.passes_mean, b.passes_min, b.passes_max, b.reconciles_per_org
        ));
        live.extend(names.iter().cloned());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let r = op.rss_mb();
        rss.push((format!("{n}"), r));
        say(format!("RSS with {n} Organizations: {r:.1} MB"));
        toggle = if toggle == interval {
            interval - 1
        } else {
            interval
        };
        let s = sweep(&op, &client, &platform.name, live.len(), toggle).await;
        say(format!(
            "sweep of {}: {} passes, {:.2} CPU s (idle {:.2} s subtracted), {:.1} s wall",
            s.orgs, s.passes, s.cpu_seconds, s.idle_cpu_seconds, s.wall_seconds
        ));
        sweeps.push(s);
        if n == largest && restart.is_none() {
            say("no-op restart".into());
            let (r, new_op) = noop_restart(&root, &client, &platform, &cfg, live.len()).await;
            op = new_op;
            say(format!(
                "restart: ready {:.2} s, idle {:.2} s, passes {}, pg tuples {}, roles changed {}, acl setuser {}, kube changed {} (Secrets {} of {}), orgs changed {}, s3 changed {}",
                r.until_ready,
                r.until_idle,
                r.passes,
                r.pg_tuples,
                r.pg_roles_changed,
                r.acl_setuser,
                r.kube_changed,
                r.secrets_changed,
                r.secrets_total,
                r.orgs_changed,
                r.s3_changed
            ));
            restart = Some(r);
        }
        let (floor_time, floor_cpu) = match floor_result {
            Some(f) => f,
            None => {
                say(format!("floor for {n}"));
                let (t, cpu, orgs) = floor.run(&format!("{k}"), n, cfg.concurrency).await;
                say(format!("floor for {n}: {:.1} s", t.as_secs_f64()));
                floor_left.extend(orgs);
                (t, cpu)
            }
        };
        bursts.push((b, floor_time, floor_cpu));
        if n != largest {
            say(format!("deleting {} Organizations", live.len()));
            let d = delete_orgs(&api, &live).await;
            say(format!("deleted in {d:.1} s"));
            deletes.push((live.len(), d));
            live.clear();
        }
    }

    if cfg.rate > 0.0 && cfg.rate_seconds > 0 {
        say(format!(
            "steady rate {}/s for {} s on top of {} Organizations",
            cfg.rate,
            cfg.rate_seconds,
            live.len()
        ));
        let (l, names) =
            steady_rate(&fleet, &format!("{run}-r-"), cfg.rate, cfg.rate_seconds).await;
        say(format!(
            "latency: {} of {} Ready, p50 {:.2} s, p99 {:.2} s, max {:.2} s, achieved {:.1}/s",
            l.ready, l.created, l.p50, l.p99, l.max, l.achieved_rate
        ));
        latency = Some(l);
        live.extend(names);
    }

    if cfg.rss_orgs > live.len() {
        let extra = cfg.rss_orgs - live.len();
        let names: Vec<String> = (0..extra).map(|i| format!("{run}-n-{i}")).collect();
        say(format!(
            "{extra} more Organizations, network layer only, up to {}",
            cfg.rss_orgs
        ));
        let b = burst(&op, &fleet, &names, false).await;
        say(format!(
            "{} of {extra} Ready in {:.1} s, passes per org mean {:.2} (max {})",
            b.ready, b.seconds, b.passes_mean, b.passes_max
        ));
        live.extend(names);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let r = op.rss_mb();
        say(format!("RSS with {} Organizations: {r:.1} MB", live.len()));
        rss.push((
            format!(
                "{} ({extra} with the network layer only, {} of them Ready)",
                live.len(),
                b.ready
            ),
            r,
        ));
        big = Some(b);
    }
    stop_operator(&root);

    // The table.
    let cmd = std::env::var("BULKHEAD_SCALE_COMMAND").unwrap_or_else(|_| "scripts/scale".into());
    lines.push(format!("Command: `{cmd}`  "));
    lines.push(format!("Machine: {machine}  "));
    lines.push(format!("Date: {date}  "));
    lines.push(format!(
        "Operator: `{}` (`--concurrency {}`); storage {}. Organizations use `deletionPolicy: Retain`. The floor ran {} the operator at each size, on the same backends.",
        std::env::var("BULKHEAD_BIN").unwrap_or_else(|_| "the bench profile's bulkhead".into()),
        cfg.concurrency,
        cfg.storage.describe(),
        if cfg.floor_first { "before" } else { "after" }
    ));
    lines.push(String::new());
    lines.push("| figure | N | operator | floor | ratio | goal |".into());
    lines.push("|---|---|---|---|---|---|".into());
    for (b, floor_time, _) in &bursts {
        let f = floor_time.as_secs_f64();
        let ready = if b.ready == b.n {
            secs(b.seconds)
        } else {
            format!("{} of {} Ready after {}", b.ready, b.n, secs(b.seconds))
        };
        lines.push(format!(
            "| created at once → all Ready | {} | {ready} ({:.1}/s) | {} ({:.1}/s) | {:.2}× | ≤ 1.5× |",
            b.n,
            b.ready as f64 / b.seconds.max(1e-9),
            secs(f),
            b.n as f64 / f,
            b.seconds / f
        ));
    }
    for (b, _, floor_cpu) in &bursts {
        lines.push(format!(
            "| CPU seconds during the above, by process | {} | {} | {} | - | - |",
            b.n,
            cpu_cell(&b.cpu),
            cpu_cell(floor_cpu)
        ));
    }
    for (b, _, _) in &bursts {
        lines.push(format!(
            "| passes per Organization, creation → Ready (log; min–max) | {} | {:.2} ({}–{}); reconcile calls {:.2} (the first adds the finalizer) | - | - | 1 |",
            b.n, b.passes_mean, b.passes_min, b.passes_max, b.reconciles_per_org
        ));
    }
    if let Some(l) = &latency {
        lines.push(format!(
            "| apply → Ready at a steady {}/s (achieved {:.1}/s), p50 / p99 / max | {} created, {} Ready | {} / {} / {} | - | - | - |",
            l.offered_rate,
            l.achieved_rate,
            l.created,
            l.ready,
            secs(l.p50),
            secs(l.p99),
            secs(l.max)
        ));
    }
    let base = rss0;
    for (label, r) in &rss {
        let per = label
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .filter(|n| *n > 0.0)
            .map(|n| {
                format!(
                    "{:.1} MB per 1,000 beyond the baseline",
                    (r - base) / n * 1000.0
                )
            })
            .unwrap_or_else(|| "baseline".into());
        lines.push(format!(
            "| operator RSS | {label} | {r:.1} MB ({per}) | - | - | ≤ 10 MB per 1,000 |"
        ));
    }
    for s in &sweeps {
        lines.push(format!(
            "| verification sweep: operator CPU seconds (passes, wall) | {} | {:.2} s ({:.0} passes, {:.1} s wall; {:.2} ms CPU per Organization) | - | - | linear in N |",
            s.orgs,
            s.cpu_seconds,
            s.passes,
            s.wall_seconds,
            s.cpu_seconds / s.orgs.max(1) as f64 * 1000.0
        ));
        lines.push(format!(
            "| verification sweep: backends' CPU seconds in the same window | {} | {} | - | - | - |",
            s.orgs,
            cpu_cell(&s.backends)
        ));
    }
    if let Some(r) = &restart {
        lines.push(format!(
            "| no-op restart: until /readyz, until idle | {} | {} / {} | - | - | - |",
            r.orgs,
            secs(r.until_ready),
            secs(r.until_idle)
        ));
        lines.push(format!(
            "| no-op restart: passes (log), reconcile calls, status patches | {} | {} / {:.0} / {:.0} | - | - | 0 passes |",
            r.orgs, r.passes, r.reconciles, r.status_patches
        ));
        lines.push(format!(
            "| no-op restart: PostgreSQL rows written (all databases and shared catalogs), roles changed | {} | {} / {} | - | - | 0 |",
            r.orgs, r.pg_tuples, r.pg_roles_changed
        ));
        if !r.pg_tables.is_empty() {
            lines.push(format!(
                "| no-op restart: rows written by table of the platform's database | {} | {} | - | - | 0 |",
                r.orgs,
                r.pg_tables
                    .iter()
                    .take(8)
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        lines.push(format!(
            "| no-op restart: Redis ACL SETUSER, other writes (SET, DEL, ACL DELUSER/SAVE, CLIENT KILL, EVAL) | {} | {} / {} | - | - | 0 |",
            r.orgs, r.acl_setuser, r.redis_other_writes
        ));
        lines.push(format!(
            "| no-op restart: kube objects changed (Namespaces, NetworkPolicies, Secrets of {}), Organizations changed | {} | {} of {} / {} | - | - | 0 |",
            r.kube_total, r.orgs, r.kube_changed, r.kube_total, r.orgs_changed
        ));
        if cfg.storage != StorageChoice::Off {
            lines.push(format!(
                "| no-op restart: S3 objects changed (ETag, LastModified) | {} | {} of {} | - | - | 0 |",
                r.orgs, r.s3_changed, r.s3_total
            ));
        }
        if cfg.storage == StorageChoice::Session {
            // The operator counts no AssumeRole call; each one's session is written into the
            // organization's credentials Secret, so an unchanged Secret had none.
            lines.push(format!(
                "| no-op restart: credentials Secrets changed (resourceVersion; every new session is written into one) | {} | {} of {} | - | - | 0 |",
                r.orgs, r.secrets_changed, r.secrets_total
            ));
        }
    }
    for (n, d) in &deletes {
        lines.push(format!(
            "| deletion of every Organization → gone | {n} | {} | - | - | - |",
            secs(*d)
        ));
    }
    if let Some(b) = &big {
        lines.push(format!(
            "| network-layer-only Organizations created at once → Ready (RSS point) | {} | {} ({} Ready), passes {:.2} (max {}) | - | - | - |",
            b.n,
            secs(b.seconds),
            b.ready,
            b.passes_mean,
            b.passes_max
        ));
    }
    let table = lines.join("\n");
    println!("{table}");
    if let Some(dir) = cfg.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&cfg.out, format!("{table}\n")).expect("write the table");
    eprintln!("[scale] table written to {}", cfg.out.display());
    if let Ok(name) = std::env::var("BULKHEAD_SCALE_RECORD") {
        record(&root.join("BENCHMARKS.md"), &name, &table);
    }
    if env_or("BULKHEAD_SCALE_CLEANUP", 1) == 1 {
        say(format!("cleanup: {} floor organizations", floor_left.len()));
        floor.cleanup(floor_left).await;
        say(format!("cleanup: deleting {} Organizations", live.len()));
        let _op = start_operator(
            &root,
            &platform.name,
            &platform.operator_ns,
            cfg.concurrency,
        );
        let d = delete_orgs(&api, &live).await;
        say(format!("deleted in {d:.1} s"));
        stop_operator(&root);
        let _ = Api::<IsolationPlatform>::all(client.clone())
            .delete(&platform.name, &DeleteParams::default())
            .await;
        let admin = common::pg_connect(tb.pg_admin_url())
            .await
            .expect("pg admin");
        for db in [platform.db_name.clone(), floor.tag.replace('-', "_")] {
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&db)
                ))
                .await;
        }
        let _ = admin
            .batch_execute(&format!(
                "DROP ROLE IF EXISTS {}",
                quote_ident(&floor.group)
            ))
            .await;
    }
}

/// The metadata of every object of kind `K` that `sel` selects, cluster-wide.
async fn managed_metadata<K>(client: &kube::Client, sel: &ListParams) -> Vec<kube::api::ObjectMeta>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Api::<K>::all(client.clone())
        .list_metadata(sel)
        .await
        .unwrap_or_else(|e| panic!("list {}: {e}", K::kind(&())))
        .items
        .into_iter()
        .map(|m| m.metadata)
        .collect()
}
