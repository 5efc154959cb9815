//! Cache layer against the testbed's opt-in Redis Cluster (`BULKHEAD_TESTBED_REDIS_CLUSTER=1
//! testbed/up`: 3 primaries and 3 replicas on 127.0.0.1, `BULKHEAD_REDIS_CLUSTER_URL`): the ACL
//! user is written on every node, probes across slots and nodes pass, a node restarted without
//! its aclfile is named by verification and gets the user back on the next pass.

mod common;

use std::process::Command;
use std::time::Duration;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::CachePlatform;
use bulkhead::layers::cache::{self, CacheLayer};
use bulkhead::layers::{Credentials, Layer, Tenant};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use redis::{ConnectionAddr, IntoConnectionInfo, Value};

/// The restart test stops a node: the tests of this file run one at a time.
/// (An async mutex: each test holds it across its awaits; a failed test does not poison it.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn spec() -> CachePlatform {
    CachePlatform {
        discover_nodes: true,
        ..common::cache_spec()
    }
}

fn cluster_url() -> &'static str {
    Testbed::get().var("BULKHEAD_REDIS_CLUSTER_URL")
}

fn tenant(org: &str, peers: &[&str]) -> Tenant {
    let peers: Vec<OrgId> = peers.iter().map(|p| OrgId::parse(p).unwrap()).collect();
    let peers: Vec<&OrgId> = peers.iter().collect();
    common::tenant_of(
        &OrgId::parse(org).unwrap(),
        "00000000-0000-0000-0000-000000000000",
        &peers,
        DeletionPolicy::Retain,
    )
}

async fn on_node(node: &str, args: &[&str]) -> redis::RedisResult<Value> {
    let info = cluster_url().into_connection_info().unwrap().set_addr({
        let (host, port) = node.rsplit_once(':').unwrap();
        ConnectionAddr::Tcp(host.into(), port.parse().unwrap())
    });
    let mut conn = redis::Client::open(info)?
        .get_multiplexed_async_connection()
        .await?;
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut conn).await
}

/// `(host:port, flags)` of every node, from `CLUSTER NODES` of the URL's node.
async fn cluster_nodes() -> Vec<(String, String)> {
    let first = {
        let info = cluster_url().into_connection_info().unwrap();
        match info.addr() {
            ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
            a => panic!("{a:?}"),
        }
    };
    let Value::BulkString(text) = on_node(&first, &["CLUSTER", "NODES"]).await.unwrap() else {
        panic!("CLUSTER NODES is not a string")
    };
    String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].split('@').next().unwrap().to_owned(), f[2].to_owned())
        })
        .collect()
}

async fn layer() -> CacheLayer {
    let layer = CacheLayer::connect(&spec(), cluster_url())
        .await
        .expect("connect");
    layer.prepare().await.expect("prepare");
    layer
}

fn assert_clean(v: &bulkhead::layers::Verification) {
    assert!(v.findings.is_empty(), "findings: {:?}", v.findings);
    let failed: Vec<_> = v.probes.iter().filter(|p| !p.passed).collect();
    assert!(v.verified(), "failed probes: {failed:#?}");
}

#[tokio::test]
async fn users_on_every_node_and_probes_across_slots_and_nodes() {
    let _serial = serial().await;
    let layer = layer().await;
    let nodes = cluster_nodes().await;
    assert_eq!(nodes.len(), 6, "3 primaries + 3 replicas: {nodes:?}");
    let mut known = layer.nodes();
    known.sort();
    let mut expected: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(known, expected, "the layer discovered every node");

    let a = unique("clu");
    let b = unique("clu");
    let (ta, tb) = (tenant(&a, &[&b]), tenant(&b, &[&a]));
    let mut ca = Credentials::default();
    let mut cb = Credentials::default();
    layer.ensure(&ta, &mut ca).await.expect("ensure a");
    layer.ensure(&tb, &mut cb).await.expect("ensure b");
    let user = ca.get(cache::KEY_USERNAME).unwrap().to_owned();
    for (node, flags) in &nodes {
        let v = on_node(node, &["ACL", "GETUSER", &user]).await.unwrap();
        assert_ne!(v, Value::Nil, "no ACL user {user} on {node} ({flags})");
    }
    for (t, c) in [(&ta, &ca), (&tb, &cb)] {
        let v = layer.verify(t, c).await.expect("verify");
        assert_clean(&v);
        // Probes ran on every node, replicas included, and the cross-slot MGET was refused.
        for (node, _) in &nodes {
            assert!(
                v.probes.iter().any(|p| p.name.contains(node.as_str())) || node_is_first(node),
                "no probe on {node}"
            );
        }
        assert!(v.probes.iter().any(|p| p.name.starts_with("MGET")));
    }
    for t in [&ta, &tb] {
        layer.cleanup(t).await.expect("cleanup");
    }
}

fn node_is_first(node: &str) -> bool {
    cluster_url().ends_with(&format!("@{node}"))
}

#[tokio::test]
async fn node_restarted_without_aclfile_is_named_and_repaired() {
    let _serial = serial().await;
    let layer = layer().await;
    let a = unique("clr");
    let ta = tenant(&a, &[]);
    let mut ca = Credentials::default();
    layer.ensure(&ta, &mut ca).await.expect("ensure");
    let user = ca.get(cache::KEY_USERNAME).unwrap().to_owned();

    // A replica loses its ACLs: shut down without saving, aclfile reset to the admin only.
    let (node, _) = cluster_nodes()
        .await
        .into_iter()
        .find(|(_, f)| f.contains("slave"))
        .expect("a replica");
    let port = node.rsplit_once(':').unwrap().1.to_owned();
    let dir = std::path::Path::new(Testbed::get().var("BULKHEAD_REDIS_CLUSTER_DIR")).join(&port);
    let password = cluster_url()
        .into_connection_info()
        .unwrap()
        .redis_settings()
        .password()
        .unwrap()
        .to_owned();
    let _ = on_node(&node, &["SHUTDOWN", "NOSAVE"]).await;
    common::wait_for("the replica stopped", Duration::from_secs(20), || {
        let node = node.clone();
        async move { on_node(&node, &["PING"]).await.is_err().then_some(()) }
    })
    .await;
    std::fs::write(
        dir.join("users.acl"),
        format!("user default on >{password} ~* &* +@all\n"),
    )
    .unwrap();
    let status = Command::new("setsid")
        .arg("-f")
        .arg("redis-server")
        .arg(dir.join("redis.conf"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("start redis-server");
    assert!(status.success());
    common::wait_for("the replica is back", Duration::from_secs(30), || {
        let node = node.clone();
        async move {
            match on_node(&node, &["CLUSTER", "INFO"]).await {
                Ok(Value::BulkString(b))
                    if String::from_utf8_lossy(&b).contains("cluster_state:ok") =>
                {
                    Some(())
                }
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(
        on_node(&node, &["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil,
        "the restarted node lost the user"
    );

    // Status names the node; the next pass writes the user back there.
    let v = layer.verify(&ta, &ca).await.expect("verify");
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&node) && f.contains("missing")),
        "no finding names {node}: {:?}",
        v.findings
    );
    let repairs = layer.ensure(&ta, &mut ca).await.expect("next pass");
    assert!(
        repairs.iter().any(|r| r.0.contains(&node)),
        "no repair on {node}: {repairs:?}"
    );
    assert_ne!(
        on_node(&node, &["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
    assert_clean(&layer.verify(&ta, &ca).await.expect("verify"));
    layer.cleanup(&ta).await.expect("cleanup");
}

/// The keys matching `pattern` on `node` (one `SCAN` call: the test's databases are small).
async fn keys_on(node: &str, pattern: &str) -> Vec<Value> {
    let v = on_node(node, &["SCAN", "0", "MATCH", pattern, "COUNT", "100000"])
        .await
        .unwrap();
    let Value::Array(mut parts) = v else {
        panic!("SCAN reply: {v:?}")
    };
    match parts.pop() {
        Some(Value::Array(keys)) => keys,
        other => panic!("SCAN reply keys: {other:?}"),
    }
}

/// `SET key value` as admin on the node that serves the key's slot (following one `MOVED`).
async fn set_routed(first: &str, key: &str) {
    match on_node(first, &["SET", key, "v"]).await {
        Ok(_) => {}
        Err(e) => {
            let (to, _) = e
                .redirect_node()
                .unwrap_or_else(|| panic!("SET {key}: {e}"));
            on_node(to, &["SET", key, "v"]).await.unwrap();
        }
    }
}

#[tokio::test]
async fn delete_cleanup_removes_keys_on_every_primary() {
    let _serial = serial().await;
    let layer = layer().await;
    let a = unique("cld");
    let mut ta = tenant(&a, &[]);
    ta.deletion_policy = DeletionPolicy::Delete;
    let mut ca = Credentials::default();
    layer.ensure(&ta, &mut ca).await.expect("ensure");
    let nodes = cluster_nodes().await;
    let first = nodes[0].0.clone();
    for i in 0..40 {
        set_routed(&first, &format!("org:{a}:k{i}")).await;
    }
    let pattern = format!("org:{a}:*");
    let mut holding = 0;
    for (node, _) in nodes.iter().filter(|(_, f)| f.contains("master")) {
        if !keys_on(node, &pattern).await.is_empty() {
            holding += 1;
        }
    }
    assert!(
        holding >= 2,
        "the keys span primaries ({holding} hold some)"
    );

    layer.cleanup(&ta).await.expect("cleanup Delete");
    for (node, _) in nodes.iter().filter(|(_, f)| f.contains("master")) {
        let left = keys_on(node, &pattern).await;
        assert!(left.is_empty(), "keys left on {node}: {left:?}");
    }
}

/// Calls of the write commands a pass may send, summed over every node (`INFO commandstats`).
async fn write_calls() -> u64 {
    let mut total = 0;
    for (node, _) in cluster_nodes().await {
        let Value::BulkString(text) = on_node(&node, &["INFO", "commandstats"]).await.unwrap()
        else {
            panic!("INFO is not a string")
        };
        for line in String::from_utf8(text).unwrap().lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let write = [
                "cmdstat_set",
                "cmdstat_del",
                "cmdstat_unlink",
                "cmdstat_acl|setuser",
                "cmdstat_acl|deluser",
                "cmdstat_acl|save",
                "cmdstat_client|kill",
            ];
            if write.contains(&name) {
                let calls = rest
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .unwrap();
                total += calls.parse::<u64>().unwrap();
            }
        }
    }
    total
}

/// A restarted operator (a new layer) prepares and passes over an organization that did not
/// drift without one write on any node (verification is not counted: its probes write the
/// organization's own keys), the reference user included; a reference user
/// tampered with while it was down is written again by the first pass, and the organization's
/// user is left alone.
#[tokio::test]
async fn a_restart_writes_nothing_and_a_tampered_reference_is_rewritten() {
    let _serial = serial().await;
    let first = layer().await;
    let a = unique("clr");
    let ta = tenant(&a, &[]);
    let mut ca = Credentials::default();
    first.ensure(&ta, &mut ca).await.expect("ensure");
    let user = ca.get(cache::KEY_USERNAME).unwrap().to_owned();
    drop(first);

    let before = write_calls().await;
    let restarted = layer().await;
    let repairs = restarted.ensure(&ta, &mut ca).await.expect("ensure again");
    assert!(repairs.is_empty(), "{repairs:?}");
    let writes = write_calls().await - before;
    println!("writes by a restart's prepare and pass: {writes}");
    assert_eq!(writes, 0, "a restart with nothing drifted wrote to Redis");
    // (Verification writes: its probes set and delete the organization's own keys.)
    assert_clean(&restarted.verify(&ta, &ca).await.expect("verify"));
    drop(restarted);

    // The reference user widened behind the operator's back on one primary.
    let rules = bulkhead::layers::cache::rules::CacheRules::from_spec(&spec()).unwrap();
    let reference = rules.reference_plan().unwrap().user;
    let (node, _) = cluster_nodes()
        .await
        .into_iter()
        .find(|(_, f)| f.contains("master"))
        .expect("a primary");
    on_node(&node, &["ACL", "SETUSER", &reference, "+@all"])
        .await
        .unwrap();
    let tenant_before = on_node(&node, &["ACL", "GETUSER", &user]).await.unwrap();
    let restarted = layer().await;
    let repairs = restarted.ensure(&ta, &mut ca).await.expect("ensure");
    assert!(
        repairs.is_empty(),
        "the tenant was judged by a tampered reference: {repairs:?}"
    );
    assert_eq!(
        on_node(&node, &["ACL", "GETUSER", &user]).await.unwrap(),
        tenant_before,
        "the organization's user was rewritten"
    );
    let Value::Array(fields) = on_node(&node, &["ACL", "GETUSER", &reference])
        .await
        .unwrap()
    else {
        panic!("no reference user")
    };
    let commands = fields
        .windows(2)
        .find_map(|w| match (&w[0], &w[1]) {
            (Value::BulkString(k), Value::BulkString(v)) if k == b"commands" => {
                Some(String::from_utf8_lossy(v).into_owned())
            }
            _ => None,
        })
        .unwrap();
    assert_ne!(
        commands, "+@all",
        "the reference user was not written again"
    );
    assert_clean(&restarted.verify(&ta, &ca).await.expect("verify"));
    restarted.cleanup(&ta).await.expect("cleanup");
}
