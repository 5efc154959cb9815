//! Faults on the testbed, end to end: each backend stopped while a burst of Organizations is
//! being reconciled, the operator SIGKILLed at random points while Organizations are created
//! and deleted, and the kube-apiserver restarted under a running operator.
//!
//! What must hold (the reliability issue):
//! - while a backend is down, the affected layer's condition is False with `BackendUnreachable`
//!   and names the server; the other layers converge; no Organization is reported Ready;
//! - once it is back, everything converges with no manual step, and tenant data (rows, objects,
//!   keys of the Organizations that held data before the fault) is unchanged by checksum;
//! - after the kills, everything converges, and no role, ACL user, IAM user or access key is
//!   left without an Organization, or duplicated;
//! - after an API server restart, the watches resume: a new Organization and a deleted
//!   NetworkPolicy are both acted on.
//!
//! The tests stop and restart the shared testbed's servers, so they run one at a time, and put
//! every server back (`testbed/up`) even when an assertion fails.
//!
//! Sizes: `BULKHEAD_FAULTS_ORGS` Organizations per burst (default 8; the full run is
//! 50), `BULKHEAD_FAULTS_KILLS` operator kills (default 20), `BULKHEAD_FAULTS_SEED` the kill
//! schedule's seed (printed by every run). Full mode:
//! `BULKHEAD_FAULTS_ORGS=50 cargo test --test faults -- --nocapture --test-threads=1`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bulkhead::api::Organization;
use bulkhead::layers::database::ident::quote_ident;
use common::admin::{iam_admin, redis_cmd, s3_admin, try_redis_cmd};
use common::org::{conditions, credentials, is_true, wait_verified_within};
use common::{FullPlatform, Operator, Testbed, install_crds, pg_connect, unique, wait_gone};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// Verification interval of the platforms here: a Ready Organization notices an outage at its
/// next verification, so this bounds how long detection takes.
const INTERVAL: u32 = 15;
/// The application's tables that carry tenant rows (examples/schema.sql).
const TABLES: [&str; 4] = ["conversations", "messages", "projects", "files"];

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn burst_size() -> usize {
    env_usize("BULKHEAD_FAULTS_ORGS", 8).max(2)
}

/// The tests stop shared servers: one at a time (each test has a runtime of its own; tokio's
/// lock works across them and is not poisoned by a failed test).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

// ---------------------------------------------------------------------------------------------
// The testbed's servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Postgres,
    Redis,
    SeaweedFs,
    KubeApiserver,
}

impl Backend {
    /// Name of its pid file in `$BULKHEAD_TESTBED_DIR/pids`.
    fn component(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Redis => "redis",
            Backend::SeaweedFs => "seaweedfs",
            Backend::KubeApiserver => "kube-apiserver",
        }
    }

    /// How it is stopped: PostgreSQL's immediate shutdown (a crash: recovery on restart),
    /// SIGKILL for Redis (after a snapshot: the testbed's Redis keeps no data otherwise) and the
    /// API server (its state is in etcd); SeaweedFS keeps its IAM store and volumes in files it
    /// must close, so it gets SIGTERM.
    fn signal(self) -> &'static str {
        match self {
            Backend::Postgres => "QUIT",
            Backend::Redis | Backend::KubeApiserver => "KILL",
            Backend::SeaweedFs => "TERM",
        }
    }

    /// The condition of the layer that depends on it.
    fn condition(self) -> Option<&'static str> {
        match self {
            Backend::Postgres => Some("DatabaseIsolated"),
            Backend::Redis => Some("CacheIsolated"),
            Backend::SeaweedFs => Some("StorageIsolated"),
            Backend::KubeApiserver => None,
        }
    }

    /// `host:port` the condition must name.
    fn address(self, tb: &Testbed) -> String {
        let url = match self {
            Backend::Postgres => tb.pg_admin_url(),
            Backend::Redis => tb.redis_admin_url(),
            Backend::SeaweedFs => tb.s3_endpoint(),
            Backend::KubeApiserver => return format!("127.0.0.1:{}", tb.var("APISERVER_PORT")),
        };
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
    }

    fn stop(self, tb: &Testbed) {
        let dir = tb.var("BULKHEAD_TESTBED_DIR");
        let pidfile = format!("{dir}/pids/{}.pid", self.component());
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{pidfile}: {e}"))
            .trim()
            .to_owned();
        let ok = std::process::Command::new("kill")
            .args(["-s", self.signal(), &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {} {pid} ({})", self.signal(), self.component());
        let proc = format!("/proc/{pid}");
        let start = Instant::now();
        while std::path::Path::new(&proc).exists() {
            // A zombie of a process we did not start is reaped by init; it no longer listens.
            let zombie = std::fs::read_to_string(format!("{proc}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            if zombie {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} (pid {pid}) still running 30 s after SIG{}",
                self.component(),
                self.signal()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts whatever of the testbed is not running (`testbed/up` is idempotent and keeps ports
/// and data). Run on drop, so a failed assertion never leaves a server down for later tests.
struct Restore;

impl Restore {
    fn now(&self) {
        let up = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/up");
        let out = std::process::Command::new(up).output().expect("testbed/up");
        assert!(
            out.status.success(),
            "testbed/up failed ({:?}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::panic::catch_unwind(|| self.now());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Organizations

fn org(name: &str, platform: &str) -> Organization {
    serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": { "name": name },
        "spec": { "orgId": name, "platformRef": platform, "deletionPolicy": "Delete" }
    }))
    .expect("organization")
}

async fn create_all(api: &Api<Organization>, platform: &str, names: &[String]) {
    for n in names {
        api.create(&PostParams::default(), &org(n, platform))
            .await
            .unwrap_or_else(|e| panic!("create {n}: {e}"));
    }
}

/// The current state of `names` (absent ones, and any when the API server does not answer,
/// are left out).
async fn snapshot(api: &Api<Organization>, names: &[String]) -> BTreeMap<String, Organization> {
    let mut out = BTreeMap::new();
    for n in names {
        if let Ok(Some(o)) = api.get_opt(n).await {
            out.insert(n.clone(), o);
        }
    }
    out
}

fn condition<'a>(o: &'a Organization, t: &str) -> Option<&'a bulkhead::api::Condition> {
    o.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

const LAYERS: [&str; 4] = [
    "DatabaseIsolated",
    "StorageIsolated",
    "CacheIsolated",
    "NetworkIsolated",
];

/// Waits until every one of `names` is Ready and Verified; how long it took.
async fn converge(api: &Api<Organization>, names: &[String], limit: Duration) -> Duration {
    let start = Instant::now();
    for n in names {
        let left = limit.saturating_sub(start.elapsed());
        wait_verified_within(api, n, left.max(Duration::from_secs(1))).await;
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Tenant data: rows, objects and keys written as each backend's admin, checksummed

struct TenantData {
    db_url: String,
    bucket: String,
    redis: String,
    orgs: Vec<String>,
}

impl TenantData {
    async fn seed(fp: &FullPlatform, orgs: &[String]) -> TenantData {
        let tb = Testbed::get();
        let d = TenantData {
            db_url: fp.db_url.clone(),
            bucket: fp.bucket.clone(),
            redis: tb.redis_admin_url().to_owned(),
            orgs: orgs.to_vec(),
        };
        let db = pg_connect(&d.db_url).await.expect("admin");
        let s3 = s3_admin(tb);
        for o in orgs {
            for t in TABLES {
                let col = match t {
                    "conversations" => "title",
                    "messages" => "body",
                    "projects" => "name",
                    _ => "s3_key",
                };
                let sql = format!(
                    "INSERT INTO public.{} (org_id, {}) SELECT $1, $1 || ' row ' || g FROM generate_series(1, 25) g",
                    quote_ident(t),
                    quote_ident(col)
                );
                db.execute(&sql, &[o]).await.expect("seed rows");
            }
            for i in 0..5 {
                s3.put_object()
                    .bucket(&d.bucket)
                    .key(format!("{o}/data/{i}.txt"))
                    .body(format!("{o} object {i}").into_bytes().into())
                    .send()
                    .await
                    .expect("seed object");
                redis_cmd(
                    &d.redis,
                    &[
                        "SET",
                        &format!("org:{o}:data:{i}"),
                        &format!("{o} value {i}"),
                    ],
                )
                .await;
            }
        }
        d
    }

    /// One line per backend: the tenant rows, objects (key, size, ETag) and keys with values.
    /// Only what `seed` wrote is compared: the layers' own canaries and the short-lived keys
    /// a verification pass writes under the org's prefix (with a TTL) come and go on their own.
    async fn checksum(&self) -> BTreeMap<&'static str, String> {
        let tb = Testbed::get();
        let mut out = BTreeMap::new();
        let db = pg_connect(&self.db_url).await.expect("admin");
        let mut rows = Vec::new();
        for t in TABLES {
            let sql = format!(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), ''))
                 FROM public.{} t WHERE t.org_id = ANY($1)",
                quote_ident(t)
            );
            let r = db
                .query_one(&sql, &[&self.orgs])
                .await
                .expect("checksum rows");
            rows.push(format!(
                "{t}:{}:{}",
                r.get::<_, i64>(0),
                r.get::<_, String>(1)
            ));
        }
        out.insert("rows", rows.join(" "));
        let s3 = s3_admin(tb);
        let mut objects = Vec::new();
        for o in &self.orgs {
            let list = s3
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{o}/data/"))
                .send()
                .await
                .expect("list objects");
            for obj in list.contents() {
                objects.push(format!(
                    "{}:{}:{}",
                    obj.key().unwrap_or_default(),
                    obj.size().unwrap_or_default(),
                    obj.e_tag().unwrap_or_default()
                ));
            }
        }
        objects.sort();
        out.insert("objects", objects.join(" "));
        let mut keys = Vec::new();
        for o in &self.orgs {
            let mut cursor = "0".to_owned();
            loop {
                let v = redis_cmd(
                    &self.redis,
                    &[
                        "SCAN",
                        &cursor,
                        "MATCH",
                        &format!("org:{o}:data:*"),
                        "COUNT",
                        "1000",
                    ],
                )
                .await;
                let redis::Value::Array(parts) = v else {
                    panic!("SCAN: {v:?}")
                };
                let (redis::Value::BulkString(c), redis::Value::Array(found)) =
                    (&parts[0], &parts[1])
                else {
                    panic!("SCAN: {parts:?}")
                };
                for k in found {
                    let redis::Value::BulkString(k) = k else {
                        continue;
                    };
                    let k = String::from_utf8_lossy(k).into_owned();
                    let val = redis_cmd(&self.redis, &["GET", &k]).await;
                    keys.push(format!("{k}={val:?}"));
                }
                cursor = String::from_utf8_lossy(c).into_owned();
                if cursor == "0" {
                    break;
                }
            }
        }
        keys.sort();
        out.insert("keys", format!("{} {}", keys.len(), keys.join(" ")));
        assert!(
            !out["rows"].contains(":0:") && !out["objects"].is_empty() && !keys.is_empty(),
            "tenant data missing: {out:?}"
        );
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Each backend stopped mid-burst

async fn backend_stopped_mid_burst(backend: Backend) {
    let _serial = serial().await;
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let short = match backend {
        Backend::Postgres => "fpg",
        Backend::Redis => "frd",
        Backend::SeaweedFs => "fs3",
        Backend::KubeApiserver => "fka",
    };
    let tag = unique(short);
    let fp = FullPlatform::create(&client, &tag, INTERVAL).await;
    let mut op = Operator::start(&fp.name, &fp.operator_ns);
    let api: Api<Organization> = Api::all(client.clone());

    // Two Organizations with data before the fault.
    let residents: Vec<String> = (0..2).map(|i| format!("{tag}-r{i}")).collect();
    create_all(&api, &fp.name, &residents).await;
    converge(&api, &residents, Duration::from_secs(240)).await;
    let data = TenantData::seed(&fp, &residents).await;
    let before = data.checksum().await;

    // The burst; the server stops once a quarter of it is Ready.
    let n = burst_size();
    let burst: Vec<String> = (0..n).map(|i| format!("{tag}-b{i}")).collect();
    let all: Vec<String> = residents.iter().chain(&burst).cloned().collect();
    create_all(&api, &fp.name, &burst).await;
    // Stopped as soon as the first of the burst is Ready: the others are mid-pass or queued.
    let ready_at_stop = common::wait_for(
        "the first of the burst Ready",
        Duration::from_secs(240),
        || async {
            let s = snapshot(&api, &burst).await;
            let ready = s.values().filter(|o| is_true(o, "Ready")).count();
            (ready >= 1).then_some(ready)
        },
    )
    .await;
    if backend == Backend::Redis {
        // A snapshot, as a Redis with persistence would have: the testbed's keeps none.
        try_redis_cmd(tb.redis_admin_url(), &["SAVE"])
            .await
            .expect("SAVE");
    }
    let restore = Restore;
    let stopped = Instant::now();
    backend.stop(tb);
    println!("{backend:?} stopped with {ready_at_stop} of the {n} in the burst Ready");

    let detected;
    if let Some(cond) = backend.condition() {
        let addr = backend.address(tb);
        // Every Organization notices: the burst at its next retry, the Ready ones at their next
        // verification. The other layers still converge.
        let limit = Duration::from_secs(u64::from(INTERVAL) * 2 + 90);
        let mut last = String::new();
        loop {
            let s = snapshot(&api, &all).await;
            let mut pending = Vec::new();
            for name in &all {
                let Some(o) = s.get(name) else {
                    pending.push(format!("{name}: missing"));
                    continue;
                };
                let c = condition(o, cond);
                let down = c.is_some_and(|c| {
                    format!("{:?}", c.status) == "False"
                        && c.reason == "BackendUnreachable"
                        && c.message.contains(&addr)
                });
                let others = LAYERS.iter().filter(|l| **l != cond).all(|l| is_true(o, l));
                if !(down && others) {
                    pending.push(format!("{name}:\n{}", conditions(o)));
                }
            }
            if pending.is_empty() {
                break;
            }
            last = pending.join("\n");
            assert!(
                stopped.elapsed() < limit,
                "{cond} not False/BackendUnreachable naming {addr}, or other layers not True, \
                 {limit:?} after {backend:?} stopped:\n{last}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = last;
        detected = stopped.elapsed();
        // Nothing is reported Ready while the server is down, through another verification.
        let hold = Instant::now();
        while hold.elapsed() < Duration::from_secs(u64::from(INTERVAL) + 5) {
            let s = snapshot(&api, &all).await;
            for (name, o) in &s {
                assert!(
                    !is_true(o, "Ready") && !is_true(o, cond),
                    "{name} reported Ready/{cond} while {backend:?} is down:\n{}",
                    conditions(o)
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    } else {
        // The API server: nothing can be read or written; keep it down a moment.
        tokio::time::sleep(Duration::from_secs(5)).await;
        detected = stopped.elapsed();
    }

    let restarted = Instant::now();
    restore.now();
    let back = restarted.elapsed();
    let converged = converge(&api, &all, Duration::from_secs(300)).await;
    assert!(
        op.alive(),
        "the operator exited during the outage:\n{}",
        op.log()
    );

    if backend == Backend::KubeApiserver {
        // The watches resumed: a new Organization and a deleted NetworkPolicy are acted on.
        let late = format!("{tag}-late");
        let t_late = Instant::now();
        create_all(&api, &fp.name, std::slice::from_ref(&late)).await;
        let ns = format!("{tag}-{}", residents[0]);
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let np = policies
            .list(&ListParams::default())
            .await
            .expect("policies")
            .items
            .into_iter()
            .find_map(|p| p.metadata.name)
            .expect("a NetworkPolicy");
        let t_np = Instant::now();
        policies
            .delete(&np, &DeleteParams::default())
            .await
            .expect("delete policy");
        common::wait_for(
            "the deleted NetworkPolicy recreated (watch resumed)",
            Duration::from_secs(30),
            || async { policies.get_opt(&np).await.ok().flatten().map(|_| ()) },
        )
        .await;
        let t_np = t_np.elapsed();
        converge(&api, std::slice::from_ref(&late), Duration::from_secs(45)).await;
        println!(
            "after the restart: NetworkPolicy recreated in {:.1} s, a new Organization Ready in {:.1} s",
            t_np.as_secs_f64(),
            t_late.elapsed().as_secs_f64()
        );
    }

    let after = data.checksum().await;
    assert_eq!(
        before, after,
        "tenant data changed across the {backend:?} outage"
    );
    println!(
        "| {backend:?} | {} | {:.1} s | {:.1} s | {:.1} s | unchanged |",
        all.len(),
        detected.as_secs_f64(),
        back.as_secs_f64(),
        converged.as_secs_f64()
    );

    // Deletion after the fault removes everything.
    for name in &all {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
    for name in &all {
        wait_gone(&api, name, Duration::from_secs(180)).await;
    }
    assert!(op.alive(), "the operator exited:\n{}", op.log());
    op.kill();
}

#[tokio::test]
async fn postgres_stopped_mid_burst() {
    backend_stopped_mid_burst(Backend::Postgres).await;
}

#[tokio::test]
async fn redis_stopped_mid_burst() {
    backend_stopped_mid_burst(Backend::Redis).await;
}

#[tokio::test]
async fn seaweedfs_stopped_mid_burst() {
    backend_stopped_mid_burst(Backend::SeaweedFs).await;
}

#[tokio::test]
async fn kube_apiserver_restarted_mid_burst_and_watches_resume() {
    backend_stopped_mid_burst(Backend::KubeApiserver).await;
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random points

/// xorshift64*: a reproducible kill schedule without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi) milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

/// What this platform's Organizations own in each backend, found as each backend's admin.
#[derive(Debug, Default, PartialEq, Eq)]
struct Owned {
    roles: BTreeSet<String>,
    registry: BTreeMap<String, i64>,
    acl_users: BTreeSet<String>,
    iam_users: BTreeMap<String, usize>,
    namespaces: BTreeSet<String>,
    /// Operator records in the bucket (owner and creation records).
    records: BTreeSet<String>,
}

async fn owned(fp: &FullPlatform, tag: &str, client: &kube::Client) -> Owned {
    let tb = Testbed::get();
    let db = pg_connect(&fp.db_url).await.expect("admin");
    let roles = db
        .query(
            "SELECT rolname::text FROM pg_roles WHERE strpos(rolname, $1) > 0",
            &[&tag],
        )
        .await
        .expect("roles")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let registry = db
        .query(
            "SELECT id, count(*) FROM public.organizations WHERE strpos(id, $1) > 0 GROUP BY id",
            &[&tag],
        )
        .await
        .expect("registry")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let redis::Value::Array(users) = redis_cmd(tb.redis_admin_url(), &["ACL", "USERS"]).await
    else {
        panic!("ACL USERS")
    };
    let acl_users = users
        .iter()
        .filter_map(|u| match u {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .filter(|u| u.contains(tag))
        .collect();
    let iam = iam_admin(tb);
    let mut iam_users = BTreeMap::new();
    let list = iam.list_users().send().await.expect("list users");
    for u in list.users() {
        if u.user_name().contains(tag) {
            let keys = iam
                .list_access_keys()
                .user_name(u.user_name())
                .send()
                .await
                .expect("list keys")
                .access_key_metadata()
                .len();
            iam_users.insert(u.user_name().to_owned(), keys);
        }
    }
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .filter(|n| n.starts_with(&format!("{tag}-{tag}")))
        .collect();
    let mut records = BTreeSet::new();
    let listed = s3_admin(tb)
        .list_objects_v2()
        .bucket(&fp.bucket)
        .prefix(".bulkhead/")
        .send()
        .await
        .expect("list records");
    for o in listed.contents() {
        if let Some(k) = o.key().filter(|k| k.contains(tag)) {
            records.insert(k.to_owned());
        }
    }
    Owned {
        records,
        roles,
        registry,
        acl_users,
        iam_users,
        namespaces,
    }
}

#[tokio::test]
async fn sigkilled_operator_leaks_and_duplicates_nothing() {
    let _serial = serial().await;
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let tag = unique("fkl");
    let fp = FullPlatform::create(&client, &tag, 30).await;
    let api: Api<Organization> = Api::all(client.clone());
    let kills = env_usize("BULKHEAD_FAULTS_KILLS", 20);
    let seed = std::env::var("BULKHEAD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("kill schedule: BULKHEAD_FAULTS_SEED={seed}");
    let mut rng = Rng(seed);

    // Organizations are created and deleted at random all through the kills: a first wave,
    // then one creation or deletion every 0.3-1.5 s (at most twice the wave created more).
    let n = burst_size().max(4);
    let first: Vec<String> = (0..n).map(|i| format!("{tag}-o{i}")).collect();
    create_all(&api, &fp.name, &first).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let api = api.clone();
        let platform = fp.name.clone();
        let tag = tag.clone();
        let stop = stop.clone();
        let mut r = Rng(seed.rotate_left(17) | 1);
        tokio::spawn(async move {
            let (mut live, mut deleted, mut next) = (first, Vec::new(), n);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(r.millis(300, 1_500)).await;
                if r.next().is_multiple_of(2) && live.len() > 2 {
                    let i = (r.next() % live.len() as u64) as usize;
                    let name = live.swap_remove(i);
                    api.delete(&name, &DeleteParams::default())
                        .await
                        .expect("delete");
                    deleted.push(name);
                } else if next < 3 * n {
                    let name = format!("{tag}-o{next}");
                    next += 1;
                    create_all(&api, &platform, std::slice::from_ref(&name)).await;
                    live.push(name);
                }
            }
            (live, deleted)
        })
    };
    let mut lived = Vec::new();
    for _ in 0..kills {
        let mut op = Operator::start(&fp.name, &fp.operator_ns);
        let life = rng.millis(300, 4_000);
        tokio::time::sleep(life).await;
        assert!(op.alive(), "the operator exited on its own:\n{}", op.log());
        op.kill();
        lived.push(life.as_millis());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (kept, deleted) = churn.await.expect("churn");
    println!(
        "{kills} SIGKILLs after {lived:?} ms; {} Organizations created, {} deleted meanwhile",
        kept.len() + deleted.len(),
        deleted.len()
    );

    let op = Operator::start(&fp.name, &fp.operator_ns);
    let t = converge(&api, &kept, Duration::from_secs(300)).await;
    for name in &deleted {
        wait_gone(&api, name, Duration::from_secs(120)).await;
    }
    println!("converged {:.1} s after the last kill", t.as_secs_f64());

    // Exactly what the remaining Organizations own: one role, one registry row, one ACL user,
    // one IAM user with one key, one namespace each.
    let mut want = Owned::default();
    for name in &kept {
        let c = credentials(&client, &format!("{tag}-{name}")).await;
        want.roles.insert(c["DATABASE_USER"].clone());
        want.registry.insert(name.clone(), 1);
        want.acl_users.insert(c["REDIS_USERNAME"].clone());
        want.iam_users.insert(name.clone(), 1);
        want.namespaces.insert(format!("{tag}-{name}"));
        want.records.insert(format!(".bulkhead/owners/{name}"));
    }
    let mut got = common::wait_for(
        "deleted Organizations' namespaces gone",
        Duration::from_secs(120),
        || async {
            let got = owned(&fp, &tag, &client).await;
            (got.namespaces == want.namespaces).then_some(got)
        },
    )
    .await;
    // A kill between TagUser and the creation record's deletion leaves the record beside a
    // tagged user; it belongs to a live Organization and goes with it.
    got.records.retain(|r| {
        r.strip_prefix(".bulkhead/owners/")
            .and_then(|r| r.strip_suffix(".creating"))
            .is_none_or(|org| !kept.iter().any(|k| k == org))
    });
    assert_eq!(got, want, "leaked or duplicated after {kills} SIGKILLs");

    // And deleting the rest leaves nothing.
    for name in &kept {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    for name in &kept {
        wait_gone(&api, name, Duration::from_secs(120)).await;
    }
    let left = owned(&fp, &tag, &client).await;
    assert_eq!(
        (
            left.roles.len(),
            left.registry.len(),
            left.acl_users.len(),
            left.iam_users.len(),
            left.records.len()
        ),
        (0, 0, 0, 0, 0),
        "left behind after deleting every Organization: {left:?}"
    );
    drop(op);
}
