//! Cache benchmark: run with `cargo bench --bench cache` against the testbed (`testbed/up`).
//!
//! 1. GET and SET throughput of an organization's ACL user against the default user, in
//!    interleaved rounds on the same server, the same keys, the same connection count and
//!    pipeline depth; prints the ratio (target: at least 0.95). Every reply is checked (each GET
//!    returns the value written, each SET `OK`), the server's own call counters must match the
//!    operations counted, and the server's CPU time per operation is printed for each side: the
//!    work an ACL check adds, which the throughput of a loaded machine can hide or exaggerate.
//! 2. Time to provision 10,000 organizations through the layer's `ensure`, with a PING sampler
//!    on a separate connection measuring the server's longest stall meanwhile; then the cost of
//!    the per-user drift check (`ACL GETUSER`) and of one verification at that size. The users
//!    and keys are removed afterwards.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::{CachePlatform, SecretKeySelector};
use bulkhead::layers::cache::{self, CacheLayer};
use bulkhead::layers::{Credentials, Layer, Tenant};
use bulkhead::tenant::OrgId;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use redis::aio::MultiplexedConnection;

const CONNECTIONS: usize = 4;
const PIPELINE: usize = 32;
const ROUND: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 6;
const KEYS: usize = 1000;
const USERS: usize = 10_000;
const PROVISION_CONCURRENCY: usize = 16;
const PROVISION_LIMIT: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn spec(user_prefix: &str) -> CachePlatform {
    CachePlatform {
        admin_url_secret_ref: SecretKeySelector {
            name: "unused".into(),
            namespace: None,
            key: "url".into(),
        },
        ca_secret_ref: None,
        nodes: vec![],
        discover_nodes: false,
        tenant_endpoint: None,
        key_prefix: "org:{orgId}:".into(),
        channel_prefix: "org:{orgId}:".into(),
        user_prefix: user_prefix.into(),
        allow_scripting: false,
        acl_file: false,
    }
}

fn tenant(org: &str) -> Result<Tenant, BoxError> {
    Ok(Tenant {
        name: org.to_owned(),
        org_id: OrgId::parse(org)?,
        display_name: org.to_owned(),
        namespace: format!("org-{org}"),
        deletion_policy: DeletionPolicy::Delete,
        rotate: false,
        peers: vec![OrgId::sentinel()],
        // The layer records an owner UID before creating anything.
        owner: OwnerReference {
            uid: format!("bench-{org}"),
            ..OwnerReference::default()
        },
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    })
}

async fn connections(url: &str) -> Result<Vec<MultiplexedConnection>, BoxError> {
    let client = redis::Client::open(url)?;
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS {
        out.push(client.get_multiplexed_async_connection().await?);
    }
    Ok(out)
}

const VALUE: &str = "0123456789abcdef";

/// The server's CPU seconds (user + system) and, for `op`, its call and refusal counters.
#[derive(Clone, Copy, Default)]
struct ServerStats {
    cpu: f64,
    calls: u64,
    refused: u64,
}

async fn server_stats(conn: &mut MultiplexedConnection, op: &str) -> Result<ServerStats, BoxError> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut out = ServerStats::default();
    let cmdstat = format!("cmdstat_{}:", op.to_ascii_lowercase());
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            out.cpu += v.trim().parse::<f64>()?;
        } else if let Some(fields) = line.strip_prefix(&cmdstat) {
            for field in fields.trim().split(',') {
                match field.split_once('=') {
                    Some(("calls", n)) => out.calls = n.parse()?,
                    Some(("rejected_calls" | "failed_calls", n)) => {
                        out.refused += n.parse::<u64>()?
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

/// One side's round: operations done (every reply checked), elapsed seconds, and what the
/// server counted meanwhile.
struct Round {
    ops: u64,
    secs: f64,
    server_cpu: f64,
    server_calls: u64,
    server_refused: u64,
}

impl Round {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn server_us_per_op(&self) -> f64 {
        self.server_cpu * 1e6 / self.ops as f64
    }
}

/// `op` ("GET" or "SET") for `ROUND` on every connection at once, with the server's counters
/// read on `stats` (a connection of its own) before and after.
async fn round(
    stats: &mut MultiplexedConnection,
    conns: &[MultiplexedConnection],
    op: &str,
    prefix: &str,
) -> Result<Round, BoxError> {
    let before = server_stats(stats, op).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, conn) in conns.iter().enumerate() {
        let mut conn = conn.clone();
        let op = op.to_owned();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = c * 7919;
            while start.elapsed() < ROUND {
                let mut pipe = redis::pipe();
                for _ in 0..PIPELINE {
                    let key = format!("{prefix}bench:{}", i % KEYS);
                    if op == "GET" {
                        pipe.cmd("GET").arg(key);
                    } else {
                        pipe.cmd("SET").arg(key).arg(VALUE);
                    }
                    i += 1;
                }
                let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                let expected = |v: &redis::Value| match v {
                    redis::Value::BulkString(b) => op == "GET" && b == VALUE.as_bytes(),
                    redis::Value::Okay => op == "SET",
                    _ => false,
                };
                if replies.len() != PIPELINE || !replies.iter().all(expected) {
                    return Err(
                        format!("{op}: a reply is not the one expected: {replies:?}").into(),
                    );
                }
                done += PIPELINE as u64;
            }
            Ok::<u64, BoxError>(done)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let after = server_stats(stats, op).await?;
    Ok(Round {
        ops,
        secs,
        server_cpu: after.cpu - before.cpu,
        server_calls: after.calls - before.calls,
        server_refused: after.refused - before.refused,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn throughput(admin_url: &str) -> Result<(), BoxError> {
    let prefix = format!("bkbench-tp-{}-", std::process::id());
    let layer = CacheLayer::connect(&spec(&prefix), admin_url).await?;
    layer.prepare().await?;
    let org = format!("bench-tp-{}", std::process::id());
    let t = tenant(&org)?;
    let mut creds = Credentials::default();
    layer.ensure(&t, &mut creds).await?;
    let org_url = creds.get(cache::KEY_URL).ok_or("no REDIS_URL")?.to_owned();
    let key_prefix = creds
        .get(cache::KEY_KEY_PREFIX)
        .ok_or("no prefix")?
        .to_owned();
    let org_conns = connections(&org_url).await?;
    let default_conns = connections(admin_url).await?;
    // The server's counters are read on a connection of their own, outside both sides.
    let mut stats = redis::Client::open(admin_url)?
        .get_multiplexed_async_connection()
        .await?;
    // Warm-up: fill the keys, one round each.
    round(&mut stats, &default_conns, "SET", &key_prefix).await?;
    round(&mut stats, &org_conns, "SET", &key_prefix).await?;

    println!(
        "## throughput: {CONNECTIONS} connections x pipeline {PIPELINE}, {ROUNDS} interleaved rounds of {ROUND:?} per side"
    );
    for op in ["GET", "SET"] {
        let (mut org_r, mut def_r) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            // ABBA order so drift in machine load hits both sides alike.
            let order = if r % 2 == 0 {
                ["org", "default"]
            } else {
                ["default", "org"]
            };
            for side in order {
                let (conns, out) = if side == "org" {
                    (&org_conns, &mut org_r)
                } else {
                    (&default_conns, &mut def_r)
                };
                let x = round(&mut stats, conns, op, &key_prefix).await?;
                println!(
                    "  {op} round {r} {side:>7}: {:>9.0} ops/s, server {:.3} µs CPU per op",
                    x.ops_per_sec(),
                    x.server_us_per_op()
                );
                out.push(x);
            }
        }
        let ratios: Vec<f64> = org_r
            .iter()
            .zip(&def_r)
            .map(|(o, d)| o.ops_per_sec() / d.ops_per_sec())
            .collect();
        let (o, d) = (
            median(org_r.iter().map(Round::ops_per_sec).collect()),
            median(def_r.iter().map(Round::ops_per_sec).collect()),
        );
        let verdict = |ratio: f64| {
            if ratio >= 0.95 {
                "meets >= 0.95"
            } else {
                "BELOW 0.95"
            }
        };
        println!(
            "{op}: org user {o:.0} ops/s, default user {d:.0} ops/s, ratio of medians {:.3}, median per-round ratio {:.3} (min {:.3}, max {:.3}) -> {}",
            o / d,
            median(ratios.clone()),
            ratios.iter().cloned().fold(f64::INFINITY, f64::min),
            ratios.iter().cloned().fold(0.0, f64::max),
            verdict(o / d)
        );
        // What the ACL check costs the server, independent of how busy the client side was:
        // default/org is the throughput ratio of a server saturated by this traffic.
        let (oc, dc) = (
            median(org_r.iter().map(Round::server_us_per_op).collect()),
            median(def_r.iter().map(Round::server_us_per_op).collect()),
        );
        println!(
            "{op}: server CPU per op: org user {oc:.3} µs, default user {dc:.3} µs, default/org {:.3} -> {}",
            dc / oc,
            verdict(dc / oc)
        );
        // Equal work: both sides' replies were all checked; the server's counters must agree.
        for (side, rounds) in [("org", &org_r), ("default", &def_r)] {
            let ops: u64 = rounds.iter().map(|x| x.ops).sum();
            let calls: u64 = rounds.iter().map(|x| x.server_calls).sum();
            let refused: u64 = rounds.iter().map(|x| x.server_refused).sum();
            println!(
                "{op}: {side} user: {ops} ops, every reply checked; server counted {calls} {op} calls, {refused} refused{}",
                if calls == ops && refused == 0 {
                    ""
                } else {
                    " (MISMATCH: another client uses this server, or commands were refused)"
                }
            );
        }
    }
    layer.cleanup(&t).await?;
    let mut admin = default_conns[0].clone();
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(layer.rules().reference_user())
        .query_async(&mut admin)
        .await?;
    Ok(())
}

/// PINGs every millisecond until `stop`; returns (samples, longest round trip).
fn spawn_sampler(
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(u64, Duration), BoxError>> {
    tokio::spawn(async move {
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let (mut n, mut worst) = (0u64, Duration::ZERO);
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed)
            && start.elapsed() < PROVISION_LIMIT + Duration::from_secs(60)
        {
            let t = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok((n, worst))
    })
}

async fn provisioning(admin_url: &str) -> Result<(), BoxError> {
    let pid = std::process::id();
    let prefix = format!("bkbench-{pid}-");
    let layer = CacheLayer::connect(&spec(&prefix), admin_url).await?;
    layer.prepare().await?;
    let orgs: Vec<String> = (0..USERS).map(|i| format!("bench-{pid}-{i}")).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(admin_url.to_owned(), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(orgs.iter().map(|o| {
        let layer = layer.clone();
        async move {
            if start.elapsed() > PROVISION_LIMIT {
                return Err("time limit".to_owned());
            }
            let t = tenant(o).map_err(|e| e.to_string())?;
            let mut creds = Credentials::default();
            layer
                .ensure(&t, &mut creds)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }))
    .buffer_unordered(PROVISION_CONCURRENCY)
    .collect()
    .await;
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (samples, worst) = sampler.await??;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "## provisioning {USERS} organizations (ensure: GETUSER + SETUSER + canary SET; {PROVISION_CONCURRENCY} at a time)"
    );
    println!(
        "provisioned {ok}/{USERS} in {:.2} s ({:.0} per second); longest PING round trip meanwhile {:.1} ms over {samples} samples",
        took.as_secs_f64(),
        ok as f64 / took.as_secs_f64(),
        worst.as_secs_f64() * 1e3
    );
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        println!("first error: {e}");
    }

    // The routine drift check at this size: one ACL GETUSER per user.
    let mut admin = redis::Client::open(admin_url)?
        .get_multiplexed_async_connection()
        .await?;
    let n = 1000;
    let t = Instant::now();
    for o in orgs.iter().take(n) {
        let _: redis::Value = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(format!("{prefix}{o}"))
            .query_async(&mut admin)
            .await?;
    }
    println!(
        "ACL GETUSER with {USERS} users: {:.1} µs per call (mean of {n})",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let probe_org = &orgs[0];
    let probe_t = tenant(probe_org)?;
    let mut creds = Credentials::default();
    layer.ensure(&probe_t, &mut creds).await?;
    let t = Instant::now();
    let v = layer.verify(&probe_t, &creds).await?;
    println!(
        "one verify (audit + {} probes) with {USERS} users: {:.1} ms, verified = {}",
        v.probes.len(),
        t.elapsed().as_secs_f64() * 1e3,
        v.verified() && v.isolated()
    );
    // One Delete cleanup: DELUSER plus a SCAN MATCH over the whole keyspace.
    let t = Instant::now();
    layer.cleanup(&probe_t).await?;
    println!(
        "one Delete cleanup (DELUSER + SCAN MATCH/UNLINK) with {USERS}+ keys: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Remove the rest in bulk: DELUSER takes many names, UNLINK many keys.
    let t = Instant::now();
    for chunk in orgs[1..].chunks(500) {
        let mut del = redis::cmd("ACL");
        del.arg("DELUSER");
        let mut unlink = redis::cmd("UNLINK");
        for o in chunk {
            del.arg(format!("{prefix}{o}"));
            unlink.arg(format!("org:{o}:canary"));
        }
        let _: i64 = del.query_async(&mut admin).await?;
        let _: i64 = unlink.query_async(&mut admin).await?;
    }
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(layer.rules().reference_user())
        .query_async(&mut admin)
        .await?;
    println!(
        "removed the benchmark's users and keys in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    bulkhead::install_crypto_provider();
    let admin_url = common::Testbed::get().redis_admin_url().to_owned();
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    if filter.is_empty() || "throughput".contains(&filter) {
        throughput(&admin_url).await?;
    }
    if filter.is_empty() || "provisioning".contains(&filter) {
        provisioning(&admin_url).await?;
    }
    Ok(())
}
