//! Cache layer against the testbed's Redis: every probe passes while isolation holds, and fails
//! (with a finding) once the ACL user is widened behind the operator's back; `ensure` repairs it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::CachePlatform;
use bulkhead::layers::cache::{self, CacheLayer};
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant, Verification};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use redis::Value;
use redis::aio::MultiplexedConnection;

fn spec() -> CachePlatform {
    common::cache_spec()
}

fn org_id() -> String {
    unique("cache")
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

async fn layer_with(spec: &CachePlatform) -> CacheLayer {
    let layer = CacheLayer::connect(spec, Testbed::get().redis_admin_url())
        .await
        .expect("connect");
    layer.prepare().await.expect("prepare");
    layer
}

async fn layer() -> CacheLayer {
    layer_with(&spec()).await
}

async fn admin() -> MultiplexedConnection {
    redis::Client::open(Testbed::get().redis_admin_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

async fn admin_cmd(args: &[&str]) -> redis::RedisResult<Value> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut admin().await).await
}

async fn tenant_conn(creds: &Credentials) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(creds.get(cache::KEY_URL).unwrap())?;
    client.get_multiplexed_async_connection().await
}

/// Provisions `org` with `peers` and returns its credentials.
async fn provision(layer: &CacheLayer, t: &Tenant) -> Credentials {
    let mut creds = Credentials::default();
    let repairs = layer.ensure(t, &mut creds).await.expect("ensure");
    assert!(
        repairs.is_empty(),
        "first ensure is a creation, not a repair: {repairs:?}"
    );
    creds
}

fn is_noperm(err: &str) -> bool {
    err.to_ascii_uppercase().starts_with("NOPERM")
}

fn failed(v: &Verification) -> Vec<String> {
    v.probes
        .iter()
        .filter(|p| !p.passed)
        .map(|p| format!("{}: {}", p.name, p.detail))
        .collect()
}

fn probe<'a>(v: &'a Verification, starts: &str) -> &'a bulkhead::layers::Probe {
    v.probes
        .iter()
        .find(|p| p.name.starts_with(starts))
        .unwrap_or_else(|| panic!("no probe {starts:?} in {:#?}", v.probes))
}

fn assert_clean(v: &Verification) {
    assert!(v.findings.is_empty(), "findings: {:?}", v.findings);
    assert!(v.verified(), "failed probes: {:?}", failed(v));
}

async fn cleanup_delete(layer: &CacheLayer, org: &str) {
    let mut t = tenant(org, &[]);
    t.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&t).await.expect("cleanup");
}

#[tokio::test]
async fn isolation_holds_every_probe_passes_and_credentials_work() {
    let layer = layer().await;
    let (a, b) = (org_id(), org_id());
    let ta = tenant(&a, &[&b]);
    let tb = tenant(&b, &[&a]);
    let creds_a = provision(&layer, &ta).await;
    let creds_b = provision(&layer, &tb).await;

    let v = layer.verify(&ta, &creds_a).await.unwrap();
    assert_clean(&v);
    let names: BTreeSet<String> = v.probes.iter().map(|p| p.name.clone()).collect();
    let sentinel = "org:bulkhead-sentinel:canary";
    for want in [
        format!("SET org:{a}:bulkhead:probe as {a}"),
        format!("INCR org:{a}:ratelimit:bulkhead-probe as {a}"),
        format!("EXPIRE org:{a}:ratelimit:bulkhead-probe as {a}"),
        format!("KEYS * as {a}"),
        format!("SCAN 0 as {a}"),
        format!("FLUSHALL as {a}"),
        format!("CONFIG GET maxmemory as {a}"),
        format!("ACL LIST as {a}"),
        format!("GET {sentinel} as {a}"),
        format!("SET {sentinel} as {a}"),
        format!("DEL {sentinel} as {a}"),
        format!("GET org:{b}:canary as {a}"),
        format!("MGET org:{a}:canary org:{b}:canary as {a}"),
        format!("PUBLISH org:{b}:events as {a}"),
        format!("SUBSCRIBE org:{b}:events as {a}"),
        format!("EVAL GET org:{b}:canary (undeclared key) as {a}"),
    ] {
        assert!(
            names.contains(&want),
            "missing probe {want:?} in {names:#?}"
        );
    }
    // Scripting is off: EVAL itself is refused, and the detail says so.
    assert!(
        probe(&v, &format!("EVAL GET org:{b}:canary (undeclared"))
            .detail
            .contains("eval")
    );
    assert_clean(&layer.verify(&tb, &creds_b).await.unwrap());

    // The Secret's content is usable as written.
    assert_eq!(
        creds_a.get(cache::KEY_USERNAME),
        Some(format!("bulkhead-org-{a}").as_str())
    );
    assert_eq!(
        creds_a.get(cache::KEY_KEY_PREFIX),
        Some(format!("org:{a}:").as_str())
    );
    assert_eq!(
        creds_a.get(cache::KEY_CHANNEL_PREFIX),
        Some(format!("org:{a}:").as_str())
    );
    assert!(
        creds_a
            .get(cache::KEY_URL)
            .unwrap()
            .starts_with(&format!("redis://bulkhead-org-{a}:"))
    );
    let mut conn = tenant_conn(&creds_a).await.expect("tenant URL works");
    let whoami = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async::<String>(&mut conn)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        is_noperm(&whoami),
        "ACL is denied to tenants, even WHOAMI: {whoami}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("org:{a}:session:s1"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let peer: redis::RedisResult<Value> = redis::cmd("GET")
        .arg(format!("org:{b}:session:s1"))
        .query_async(&mut conn)
        .await;
    assert!(is_noperm(&peer.unwrap_err().to_string()));

    // A second pass changes nothing: no ACL write, no repair, same password.
    let before = layer.acl_changes();
    let mut again = creds_a.clone();
    assert!(layer.ensure(&ta, &mut again).await.unwrap().is_empty());
    assert_eq!(
        layer.acl_changes(),
        before,
        "an unchanged user is not rewritten"
    );
    assert_eq!(again, creds_a);

    cleanup_delete(&layer, &a).await;
    cleanup_delete(&layer, &b).await;
}

/// Widens the user with `rules` behind the operator's back, checks the finding and the failing
/// probes, then checks that `ensure` reports a repair and verification is clean again.
async fn tamper_and_repair(
    layer: &CacheLayer,
    t: &Tenant,
    creds: &mut Credentials,
    rules: &[&str],
    finding: &str,
    failing: &[String],
) {
    let user = layer.identity(&t.org_id).unwrap();
    let mut args = vec!["ACL", "SETUSER", user.as_str()];
    args.extend_from_slice(rules);
    admin_cmd(&args).await.expect("tamper");
    let v = layer.verify(t, creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains(finding)),
        "{rules:?}: no finding {finding:?} in {:?}",
        v.findings
    );
    assert!(!v.isolated());
    let bad = failed(&v);
    for f in failing {
        assert!(
            bad.iter().any(|b| b.starts_with(f.as_str())),
            "{rules:?}: probe {f:?} did not fail; failed: {bad:#?}"
        );
    }
    let repairs = layer.ensure(t, creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r.0.contains(finding)),
        "{rules:?}: repairs {repairs:?}"
    );
    assert_clean(&layer.verify(t, creds).await.unwrap());
}

#[tokio::test]
async fn widened_key_pattern_fails_probes_and_is_repaired() {
    let layer = layer().await;
    let (a, b) = (org_id(), org_id());
    let ta = tenant(&a, &[&b]);
    let mut creds = provision(&layer, &ta).await;
    provision(&layer, &tenant(&b, &[])).await;
    let s = "org:bulkhead-sentinel:canary";
    let failing = [
        format!("GET {s} as {a}"),
        format!("SET {s} as {a}"),
        format!("DEL {s} as {a}"),
        format!("GET org:{b}:canary as {a}"),
        format!("MGET org:{a}:canary org:{b}:canary as {a}"),
    ];
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["~*"],
        "key patterns widened",
        &failing,
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["allkeys"],
        "key patterns widened",
        &failing,
    )
    .await;
    // The canary the widened user could have written is untouched: SET ran queued and discarded.
    let canary = admin_cmd(&["GET", s]).await.unwrap();
    assert_eq!(
        canary,
        Value::BulkString(
            bulkhead::layers::cache::rules::CANARY_VALUE
                .as_bytes()
                .to_vec()
        )
    );
    cleanup_delete(&layer, &a).await;
    cleanup_delete(&layer, &b).await;
}

#[tokio::test]
async fn added_commands_fail_probes_and_are_repaired() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let every = [
        format!("KEYS * as {a}"),
        format!("SCAN 0 as {a}"),
        format!("RANDOMKEY as {a}"),
        format!("DBSIZE as {a}"),
        format!("FLUSHALL as {a}"),
        format!("CONFIG GET maxmemory as {a}"),
        format!("ACL LIST as {a}"),
        format!("PUBSUB CHANNELS as {a}"),
    ];
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+@all"],
        "command rules changed",
        &every,
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+keys"],
        "command rules changed",
        &[format!("KEYS * as {a}")],
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+flushall"],
        "command rules changed",
        &[format!("FLUSHALL as {a}")],
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+scan"],
        "command rules changed",
        &[format!("SCAN 0 as {a}")],
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+config|get"],
        "command rules changed",
        &[format!("CONFIG GET maxmemory as {a}")],
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["+acl"],
        "command rules changed",
        &[format!("ACL LIST as {a}")],
    )
    .await;
    // The FLUSHALL probe never ran: the sentinel's canary is still there.
    assert!(matches!(
        admin_cmd(&["GET", "org:bulkhead-sentinel:canary"])
            .await
            .unwrap(),
        Value::BulkString(_)
    ));
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn widened_channels_fail_pubsub_probes_and_are_repaired() {
    let layer = layer().await;
    let (a, b) = (org_id(), org_id());
    let ta = tenant(&a, &[&b]);
    let mut creds = provision(&layer, &ta).await;
    let failing = [
        format!("PUBLISH org:{b}:events as {a}"),
        format!("SUBSCRIBE org:{b}:events as {a}"),
    ];
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["&*"],
        "channel patterns widened",
        &failing,
    )
    .await;
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["allchannels"],
        "channel patterns widened",
        &failing,
    )
    .await;
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn scripting_allowed_still_refuses_peer_keys_inside_scripts() {
    let mut s = spec();
    s.allow_scripting = true;
    s.user_prefix = format!("{}-", unique("bkscript"));
    let layer = layer_with(&s).await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert_clean(&v);
    let hidden = probe(&v, "EVAL GET org:bulkhead-sentinel:canary (undeclared");
    assert!(
        hidden.detail.starts_with("refused inside the script"),
        "{}",
        hidden.detail
    );
    let declared = probe(&v, "EVAL GET org:bulkhead-sentinel:canary (declared");
    assert!(
        declared.detail.to_ascii_uppercase().contains("NOPERM"),
        "{}",
        declared.detail
    );
    // Own keys work from a script.
    let mut conn = tenant_conn(&creds).await.unwrap();
    let n: i64 = redis::cmd("EVAL")
        .arg("return redis.call('INCR', KEYS[1])")
        .arg(1)
        .arg(format!("org:{a}:ratelimit:x"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Script management stays denied.
    let flush: redis::RedisResult<Value> = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await;
    assert!(is_noperm(&flush.unwrap_err().to_string()));
    let failing = [
        format!("EVAL GET org:bulkhead-sentinel:canary (declared key) as {a}"),
        format!("EVAL GET org:bulkhead-sentinel:canary (undeclared key) as {a}"),
    ];
    tamper_and_repair(
        &layer,
        &ta,
        &mut creds,
        &["~*"],
        "key patterns widened",
        &failing,
    )
    .await;
    cleanup_delete(&layer, &a).await;
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
}

#[tokio::test]
async fn deleted_user_and_changed_password_are_found_and_repaired() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let user = layer.identity(&ta.org_id).unwrap();

    admin_cmd(&["ACL", "DELUSER", &user]).await.unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("missing")),
        "{:?}",
        v.findings
    );
    assert!(!probe(&v, &format!("AUTH as {a}")).passed);
    let repairs = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r.0.contains("ACL user is missing")),
        "{repairs:?}"
    );
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());

    // Someone logs in with a password of their own; the repair also evicts that session.
    admin_cmd(&["ACL", "SETUSER", &user, ">intruder-password"])
        .await
        .unwrap();
    let intruder =
        redis::Client::open(format!("redis://{user}:intruder-password@{}", endpoint())).unwrap();
    let mut intruder = intruder
        .get_multiplexed_async_connection()
        .await
        .expect("intruder logs in");
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("password changed")),
        "{:?}",
        v.findings
    );
    let repairs = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r.0.contains("password changed")),
        "{repairs:?}"
    );
    let after: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut intruder).await;
    assert!(after.is_err(), "the intruder's session survived the repair");
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());

    // Replaced password (resetpass): the organization cannot log in, the AUTH probe fails.
    admin_cmd(&["ACL", "SETUSER", &user, "resetpass", ">other"])
        .await
        .unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(!probe(&v, &format!("AUTH as {a}")).passed);
    assert!(
        layer
            .ensure(&ta, &mut creds)
            .await
            .unwrap()
            .iter()
            .any(|r| r.0.contains("password changed"))
    );

    // nopass is a flag drift.
    admin_cmd(&["ACL", "SETUSER", &user, "nopass"])
        .await
        .unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("flags changed")),
        "{:?}",
        v.findings
    );
    assert!(!layer.ensure(&ta, &mut creds).await.unwrap().is_empty());
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());

    // Rotation replaces the password without reporting drift; the old one stops working.
    let old = creds.clone();
    let mut rotating = ta.clone();
    rotating.rotate = true;
    assert!(
        layer
            .ensure(&rotating, &mut creds)
            .await
            .unwrap()
            .is_empty()
    );
    assert_ne!(creds.get(cache::KEY_PASSWORD), old.get(cache::KEY_PASSWORD));
    assert!(tenant_conn(&old).await.is_err());
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());
    cleanup_delete(&layer, &a).await;
}

fn endpoint() -> String {
    let url = Testbed::get().redis_admin_url();
    url.rsplit('@')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned()
}

#[tokio::test]
async fn users_lost_in_a_restart_are_recreated_by_the_next_pass() {
    let mut s = spec();
    s.user_prefix = format!("{}-", unique("bkrestart"));
    let layer = layer_with(&s).await;
    let orgs: Vec<String> = (0..3).map(|_| org_id()).collect();
    let mut all = Vec::new();
    for o in &orgs {
        let t = tenant(o, &[]);
        let c = provision(&layer, &t).await;
        all.push((t, c));
    }
    // A restart without persistence: every user this operator owns is gone (ACL USERS lists
    // names only and is cheap; the operator itself never needs it).
    let Value::Array(users) = admin_cmd(&["ACL", "USERS"]).await.unwrap() else {
        panic!("ACL USERS")
    };
    for u in users {
        let Value::BulkString(u) = u else { continue };
        let u = String::from_utf8(u).unwrap();
        if u.starts_with(&s.user_prefix) {
            admin_cmd(&["ACL", "DELUSER", &u]).await.unwrap();
        }
    }
    layer.prepare().await.unwrap();
    for (t, c) in &mut all {
        assert!(!layer.verify(t, c).await.unwrap().verified());
        let repairs = layer.ensure(t, c).await.unwrap();
        assert!(
            repairs.iter().any(|r| r.0.contains("missing")),
            "{repairs:?}"
        );
        assert_clean(&layer.verify(t, c).await.unwrap());
    }
    for o in &orgs {
        cleanup_delete(&layer, o).await;
    }
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_settings_and_ids_are_refused_before_any_redis_call() {
    // Nothing listens on port 1: a Config error (not Unreachable) proves no connection was tried.
    for (field, value) in [
        ("key", "org:{orgId}"),
        ("key", "org:*:{orgId}:"),
        ("key", "org:{orgId}-"),
        ("channel", "chan:[{orgId}]:"),
        ("channel", "{orgId}"),
        ("user", "bulk head"),
        ("user", ""),
    ] {
        let mut s = spec();
        match field {
            "key" => s.key_prefix = value.into(),
            "channel" => s.channel_prefix = value.into(),
            _ => s.user_prefix = value.into(),
        }
        let err = CacheLayer::connect(&s, "redis://default:x@127.0.0.1:1")
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, LayerError::Config(_)),
            "{field} {value:?}: {err:?}"
        );
    }
    let layer = layer().await;
    for bad in [
        "acme*", "ac?me", "a[b]c", "a\\b", "a{b}", "ACME", "a:b", "a b", "-a", "",
    ] {
        let err = layer.plan_for(bad, "pw").expect_err(bad);
        assert!(matches!(err, LayerError::Refused(_)), "{bad:?}: {err:?}");
    }
    let users = admin_cmd(&["ACL", "USERS"]).await.unwrap();
    let Value::Array(users) = users else { panic!() };
    for u in users {
        let Value::BulkString(u) = u else { continue };
        let u = String::from_utf8(u).unwrap();
        assert!(
            !u.contains(['*', '?', '[', '\\', '{']),
            "a user with a glob name exists: {u}"
        );
    }
}

#[tokio::test]
async fn cleanup_retain_switches_the_user_off_and_keeps_keys() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let creds = provision(&layer, &ta).await;
    let mut conn = tenant_conn(&creds).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("org:{a}:session:1"))
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();

    layer.cleanup(&ta).await.unwrap();
    let user = layer.identity(&ta.org_id).unwrap();
    let Value::Array(info) = admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap() else {
        panic!("user kept")
    };
    let flags = format!("{:?}", info[1]);
    assert!(flags.contains("off"), "{flags}");
    assert_eq!(info[3], Value::Array(vec![]), "passwords reset");
    let open: redis::RedisResult<Value> = redis::cmd("GET")
        .arg(format!("org:{a}:session:1"))
        .query_async(&mut conn)
        .await;
    assert!(open.is_err(), "an open session survived the switch-off");
    assert!(
        tenant_conn(&creds).await.is_err(),
        "the organization can no longer log in"
    );
    assert_eq!(
        admin_cmd(&["GET", &format!("org:{a}:session:1")])
            .await
            .unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        !v.verified() && !v.isolated(),
        "a switched-off user is not reported as isolated and verified"
    );
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn cleanup_delete_removes_the_user_and_only_the_orgs_keys() {
    let layer = layer().await;
    let a = org_id();
    let neighbour = format!("{a}-1"); // its prefix starts with a's id: must survive
    let ta = tenant(&a, &[]);
    let creds = provision(&layer, &ta).await;
    let mut conn = tenant_conn(&creds).await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..1_234 {
        pipe.cmd("SET")
            .arg(format!("org:{a}:k:{i}"))
            .arg(i)
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    admin_cmd(&["SET", &format!("org:{neighbour}:keep"), "1"])
        .await
        .unwrap();

    let mut td = ta.clone();
    td.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&td).await.unwrap();
    let user = layer.identity(&ta.org_id).unwrap();
    assert_eq!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
    let left = layer.delete_keys(&ta.org_id).await.unwrap();
    assert_eq!(left, 0, "every key was already unlinked");
    assert_eq!(
        admin_cmd(&[
            "EXISTS",
            &format!("org:{a}:k:7"),
            &format!("org:{a}:canary")
        ])
        .await
        .unwrap(),
        Value::Int(0)
    );
    assert_eq!(
        admin_cmd(&["EXISTS", &format!("org:{neighbour}:keep")])
            .await
            .unwrap(),
        Value::Int(1)
    );
    assert!(matches!(
        admin_cmd(&["GET", "org:bulkhead-sentinel:canary"])
            .await
            .unwrap(),
        Value::BulkString(_)
    ));
    admin_cmd(&["DEL", &format!("org:{neighbour}:keep")])
        .await
        .unwrap();
    // Cleanup is idempotent.
    layer.cleanup(&td).await.unwrap();
}

fn acl_save_calls(info: &Value) -> u64 {
    let text = match info {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        _ => String::new(),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_acl|save:calls="))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn acl_save_runs_once_per_batch_when_an_aclfile_is_configured() {
    let mut s = spec();
    s.acl_file = true;
    s.user_prefix = format!("{}-", unique("bksave"));
    let layer = layer_with(&s).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // let prepare's own save happen
    let before = acl_save_calls(&admin_cmd(&["INFO", "commandstats"]).await.unwrap());
    let orgs: Vec<String> = (0..4).map(|_| org_id()).collect();
    for o in &orgs {
        provision(&layer, &tenant(o, &[])).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut after = before;
    while after == before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = acl_save_calls(&admin_cmd(&["INFO", "commandstats"]).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    after = acl_save_calls(&admin_cmd(&["INFO", "commandstats"]).await.unwrap());
    assert_eq!(
        after,
        before + 1,
        "one ACL SAVE for the batch of four organizations"
    );
    let file = std::fs::read_to_string(Testbed::get().var("BULKHEAD_REDIS_ACLFILE")).unwrap();
    for o in &orgs {
        assert!(
            file.contains(&format!("user {}{o} on", s.user_prefix)),
            "{o} not persisted"
        );
        assert!(!file.contains('>'), "aclfile holds only hashes");
    }
    // Without aclFile, nothing is ever saved.
    assert!(!layer_with(&spec()).await.persist_acl().await.unwrap());
    for o in &orgs {
        cleanup_delete(&layer, o).await;
    }
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
    layer.persist_acl().await.unwrap();
}

/// A replica of the testbed's Redis, started for one test on a free port in a temp dir.
struct Replica {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Replica {
    async fn start() -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("bulkhead-replica"));
        std::fs::create_dir_all(&dir).unwrap();
        let url = url_parts(Testbed::get().redis_admin_url());
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", dir.to_str().unwrap(), "--logfile", "replica.log"])
            .args(["--replicaof", &url.host, &url.port])
            .args([
                "--masteruser",
                &url.user,
                "--masterauth",
                &url.password,
                "--requirepass",
                &url.password,
            ])
            .spawn()
            .expect("redis-server on PATH");
        let replica = Replica { child, port, dir };
        // Wait until the primary lists it and the link is up.
        for _ in 0..100 {
            let role = admin_cmd(&["ROLE"]).await.unwrap();
            if format!("{role:?}").contains(&port.to_string()) {
                return replica;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("replica on port {port} never attached");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct UrlParts {
    user: String,
    password: String,
    host: String,
    port: String,
}

fn url_parts(url: &str) -> UrlParts {
    let rest = url.trim_start_matches("redis://");
    let (auth, hostport) = rest.rsplit_once('@').unwrap();
    let (user, password) = auth.split_once(':').unwrap();
    let (host, port) = hostport.trim_end_matches('/').rsplit_once(':').unwrap();
    let user = if user.is_empty() { "default" } else { user };
    UrlParts {
        user: user.into(),
        password: password.into(),
        host: host.into(),
        port: port.into(),
    }
}

#[tokio::test]
async fn acls_are_applied_and_verified_on_every_node() {
    let replica = Replica::start().await;
    let node = format!("127.0.0.1:{}", replica.port);
    let mut s = spec();
    s.user_prefix = format!("{}-", unique("bkrepl"));
    s.discover_nodes = true;
    let layer = layer_with(&s).await;
    assert!(
        layer.nodes().contains(&node),
        "ROLE discovery missed {node}: {:?}",
        layer.nodes()
    );
    let mut s2 = s.clone();
    s2.discover_nodes = false;
    s2.nodes = vec![node.clone()];
    let layer = layer_with(&s2).await;
    assert_eq!(layer.nodes().len(), 2);

    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert_clean(&v);
    assert!(
        v.probes
            .iter()
            .any(|p| p.name == format!("GET org:bulkhead-sentinel:canary as {a} on {node}"))
    );

    // Widen the user on the replica only: the finding names the replica, the probe there fails.
    let user = layer.identity(&ta.org_id).unwrap();
    let url = url_parts(Testbed::get().redis_admin_url());
    let replica_admin =
        redis::Client::open(format!("redis://{}:{}@{node}", url.user, url.password)).unwrap();
    let mut rconn = replica_admin
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("~*")
        .query_async(&mut rconn)
        .await
        .unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&node) && f.contains("key patterns widened")),
        "{:?}",
        v.findings
    );
    let bad = failed(&v);
    assert!(
        bad.iter().any(|b| b.starts_with(&format!(
            "GET org:bulkhead-sentinel:canary as {a} on {node}"
        ))),
        "{bad:?}"
    );
    let repairs = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(repairs.iter().any(|r| r.0.contains(&node)), "{repairs:?}");
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());

    // Deleted on the replica only.
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut rconn)
        .await
        .unwrap();
    assert!(!layer.verify(&ta, &creds).await.unwrap().isolated());
    assert!(
        layer
            .ensure(&ta, &mut creds)
            .await
            .unwrap()
            .iter()
            .any(|r| r.0.contains("missing"))
    );

    // Rotation ends the old password's connections on every node, the replica included.
    let user_name = creds.get(cache::KEY_USERNAME).unwrap().to_owned();
    let old_password = creds.get(cache::KEY_PASSWORD).unwrap().to_owned();
    let on_replica = redis::Client::open(format!("redis://{user_name}:{old_password}@{node}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let mut on_replica = on_replica.expect("tenant logs in on the replica");
    let _: Value = redis::cmd("PING")
        .query_async(&mut on_replica)
        .await
        .unwrap();
    let mut rotating = ta.clone();
    rotating.rotate = true;
    layer.ensure(&rotating, &mut creds).await.unwrap();
    let after: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut on_replica).await;
    assert!(
        after.is_err(),
        "a replica connection survived rotation: {after:?}"
    );

    cleanup_delete(&layer, &a).await;
    let gone: Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&user)
        .query_async(&mut rconn)
        .await
        .unwrap();
    assert_eq!(gone, Value::Nil, "cleanup reached the replica");
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
    drop(replica);
}

fn owned_by(org: &str, uid: &str) -> Tenant {
    let mut t = tenant(org, &[]);
    t.owner.uid = uid.to_owned();
    t
}

fn text_of(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}

fn names(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Array(a) | Value::Set(a) => a.iter().map(text_of).collect(),
        _ => BTreeSet::new(),
    }
}

/// The commands (and subcommands) this Redis lets the profile through, computed from the
/// server's own category lists by the same steps as the profile: allow, deny, re-allow.
async fn expected_allowed(scripting: bool) -> BTreeSet<String> {
    use cache::rules::{
        ALLOWED_CATEGORIES, ALLOWED_CLIENT_SUBCOMMANDS, ALLOWED_COMMANDS, DENIED_CATEGORIES,
        DENIED_COMMANDS,
    };
    let all = names(&admin_cmd(&["COMMAND", "LIST"]).await.unwrap());
    let expand = |c: &cache::rules::Command| -> BTreeSet<String> {
        let spelled = c.spelled();
        all.iter()
            .filter(|n| {
                **n == spelled || (c.sub.is_none() && n.starts_with(&format!("{spelled}|")))
            })
            .cloned()
            .collect()
    };
    let mut allowed = BTreeSet::new();
    let mut cats: Vec<&str> = ALLOWED_CATEGORIES.iter().map(|c| c.name()).collect();
    if scripting {
        cats.push("scripting");
    }
    for c in cats {
        allowed.extend(names(&admin_cmd(&["ACL", "CAT", c]).await.unwrap()));
    }
    for c in ALLOWED_COMMANDS {
        allowed.extend(expand(c));
    }
    let mut denied_cats: Vec<&str> = DENIED_CATEGORIES.iter().map(|c| c.name()).collect();
    if !scripting {
        denied_cats.push("scripting");
    }
    for c in denied_cats {
        for n in names(&admin_cmd(&["ACL", "CAT", c]).await.unwrap()) {
            allowed.remove(&n);
        }
    }
    for c in DENIED_COMMANDS {
        for n in expand(c) {
            allowed.remove(&n);
        }
    }
    for c in ALLOWED_CLIENT_SUBCOMMANDS {
        allowed.extend(expand(c));
    }
    allowed
}

/// Commands flagged `no_auth`: Redis never checks them against ACLs.
async fn no_auth_commands() -> BTreeSet<String> {
    let Value::Array(all) = admin_cmd(&["COMMAND"]).await.unwrap() else {
        panic!("COMMAND")
    };
    all.iter()
        .filter_map(|c| match c {
            Value::Array(f) if f.len() > 2 && names(&f[2]).contains("no_auth") => {
                Some(text_of(&f[0]))
            }
            _ => None,
        })
        .collect()
}

/// `ACL DRYRUN` of `command` (`name` or `name|sub`) for `user` with own-prefixed arguments,
/// trying argument counts until the arity fits. `None` when no count fits.
async fn dryrun(user: &str, command: &str, own: &str) -> Option<String> {
    let mut words: Vec<String> = command.split('|').map(str::to_owned).collect();
    for _ in 0..8 {
        let mut args = vec!["ACL", "DRYRUN", user];
        args.extend(words.iter().map(String::as_str));
        match admin_cmd(&args).await {
            Ok(v) => return Some(text_of(&v)),
            Err(e) if e.to_string().contains("wrong number of arguments") => {
                words.push(own.to_owned());
            }
            Err(e) => return Some(e.to_string()),
        }
    }
    None
}

#[tokio::test]
async fn allowlist_profile_denies_every_command_outside_it_on_this_redis() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let creds = provision(&layer, &ta).await;
    let user = layer.identity(&ta.org_id).unwrap();
    let profile = layer.rules().command_profile();
    assert_eq!(profile[0], "-@all");

    // The server describes the user's rules starting from -@all: deny by default.
    let Value::Array(info) = admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap() else {
        panic!("GETUSER")
    };
    let commands = info
        .chunks(2)
        .find(|c| text_of(&c[0]) == "commands")
        .map(|c| text_of(&c[1]))
        .unwrap();
    assert!(commands.starts_with("-@all "), "{commands}");

    // Every command and subcommand this Redis knows: the verdict is the profile's. Commands
    // that Redis runs before authentication (AUTH, HELLO, RESET, QUIT) skip ACLs entirely.
    let allowed = expected_allowed(false).await;
    let exempt = no_auth_commands().await;
    assert!(
        exempt.contains("reset") && exempt.contains("auth"),
        "{exempt:?}"
    );
    let all = names(&admin_cmd(&["COMMAND", "LIST"]).await.unwrap());
    let own = format!("org:{a}:x");
    let (mut denied_n, mut allowed_n) = (0, 0);
    let mut wrong = Vec::new();
    for c in &all {
        // Container commands are judged by their subcommands.
        if !c.contains('|') && all.iter().any(|n| n.starts_with(&format!("{c}|"))) {
            continue;
        }
        if exempt.contains(c) {
            continue;
        }
        let Some(verdict) = dryrun(&user, c, &own).await else {
            continue;
        };
        let refused = verdict.contains("no permissions to run");
        if allowed.contains(c) {
            allowed_n += 1;
            if refused {
                wrong.push(format!("{c} should be allowed: {verdict}"));
            }
        } else {
            denied_n += 1;
            if !refused {
                wrong.push(format!("{c} should be denied: {verdict}"));
            }
        }
    }
    println!("profile on this Redis: {allowed_n} commands allowed, {denied_n} denied");
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(
        denied_n > 100 && allowed_n > 100,
        "{allowed_n} / {denied_n}"
    );
    for must_deny in [
        "keys",
        "scan",
        "randomkey",
        "dbsize",
        "select",
        "flushall",
        "flushdb",
        "config|get",
        "debug",
        "monitor",
        "pubsub|channels",
        "pubsub|numsub",
        "cluster|getkeysinslot",
        "cluster|countkeysinslot",
        "client|list",
        "client|kill",
        "acl|whoami",
        "eval",
        "sort",
        "lolwut",
    ] {
        assert!(all.contains(must_deny), "{must_deny} unknown to this Redis");
        assert!(!allowed.contains(must_deny), "{must_deny} allowed");
    }

    // A command this Redis has, in no allowed category: refused for real, only by default.
    let mut conn = tenant_conn(&creds).await.unwrap();
    for c in ["lolwut"] {
        for cat in cache::rules::ALLOWED_CATEGORIES {
            let members = names(&admin_cmd(&["ACL", "CAT", cat.name()]).await.unwrap());
            assert!(!members.contains(c), "{c} is in @{}", cat.name());
        }
        let r: redis::RedisResult<Value> = redis::cmd(c).query_async(&mut conn).await;
        assert!(is_noperm(&r.unwrap_err().to_string()), "{c} not refused");
    }

    // What an application needs works on its own keys.
    let k = |s: &str| format!("org:{a}:{s}");
    let checks: Vec<Vec<String>> = vec![
        vec!["PING".into()],
        vec!["ECHO".into(), "hi".into()],
        vec!["CLIENT".into(), "SETNAME".into(), "app".into()],
        vec!["CLIENT".into(), "GETNAME".into()],
        vec!["CLIENT".into(), "ID".into()],
        vec!["SET".into(), k("s"), "1".into()],
        vec!["INCR".into(), k("s")],
        vec!["GET".into(), k("s")],
        vec!["HSET".into(), k("h"), "f".into(), "v".into()],
        vec!["HGETALL".into(), k("h")],
        vec!["LPUSH".into(), k("l"), "v".into()],
        vec!["LRANGE".into(), k("l"), "0".into(), "-1".into()],
        vec!["SADD".into(), k("set"), "m".into()],
        vec!["SMEMBERS".into(), k("set")],
        vec!["ZADD".into(), k("z"), "1".into(), "m".into()],
        vec!["ZRANGE".into(), k("z"), "0".into(), "-1".into()],
        vec!["XADD".into(), k("x"), "*".into(), "f".into(), "v".into()],
        vec!["XLEN".into(), k("x")],
        vec!["PFADD".into(), k("hll"), "a".into()],
        vec!["SETBIT".into(), k("b"), "7".into(), "1".into()],
        vec![
            "GEOADD".into(),
            k("g"),
            "13.4".into(),
            "52.5".into(),
            "berlin".into(),
        ],
        vec!["EXPIRE".into(), k("s"), "100".into()],
        vec!["TTL".into(), k("s")],
        vec!["PERSIST".into(), k("s")],
        vec!["TYPE".into(), k("h")],
        vec!["EXISTS".into(), k("h")],
        vec!["OBJECT".into(), "ENCODING".into(), k("h")],
        vec!["RENAME".into(), k("l"), k("l2")],
        vec!["PUBLISH".into(), k("events"), "hi".into()],
        vec!["UNLINK".into(), k("l2")],
        vec![
            "DEL".into(),
            k("s"),
            k("h"),
            k("set"),
            k("z"),
            k("x"),
            k("hll"),
            k("b"),
            k("g"),
        ],
    ];
    for args in &checks {
        let mut c = redis::cmd(&args[0]);
        for a in &args[1..] {
            c.arg(a);
        }
        let r: redis::RedisResult<Value> = c.query_async(&mut conn).await;
        assert!(r.is_ok(), "{args:?} refused: {r:?}");
    }
    // Transactions and WATCH.
    let r: redis::RedisResult<Value> = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(k("t"))
        .arg("1")
        .cmd("DEL")
        .arg(k("t"))
        .query_async(&mut conn)
        .await;
    assert!(r.is_ok(), "MULTI/EXEC: {r:?}");
    let r: redis::RedisResult<Value> = redis::cmd("WATCH").arg(k("t")).query_async(&mut conn).await;
    assert!(r.is_ok(), "WATCH: {r:?}");
    // RESP3 HELLO with the organization's own credentials.
    let r: redis::RedisResult<Value> = redis::cmd("HELLO")
        .arg(3)
        .arg("AUTH")
        .arg(creds.get(cache::KEY_USERNAME).unwrap())
        .arg(creds.get(cache::KEY_PASSWORD).unwrap())
        .query_async(&mut conn)
        .await;
    assert!(r.is_ok(), "HELLO: {:?}", r.err());
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn allowlist_with_scripting_allows_eval_and_still_denies_script_management() {
    let mut s = spec();
    s.allow_scripting = true;
    s.user_prefix = format!("{}-", unique("bkscript2"));
    let layer = layer_with(&s).await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    provision(&layer, &ta).await;
    let user = layer.identity(&ta.org_id).unwrap();
    let allowed = expected_allowed(true).await;
    assert!(allowed.contains("eval") && allowed.contains("fcall"));
    assert!(!allowed.contains("script|flush") && !allowed.contains("function|flush"));
    let own = format!("org:{a}:x");
    for c in ["eval", "evalsha", "fcall", "eval_ro"] {
        let v = dryrun(&user, c, &own).await.unwrap();
        assert!(!v.contains("no permissions to run"), "{c}: {v}");
    }
    for c in [
        "script|flush",
        "script|load",
        "function|flush",
        "function|load",
        "lolwut",
    ] {
        let v = dryrun(&user, c, &own).await.unwrap();
        assert!(v.contains("no permissions to run"), "{c}: {v}");
    }
    cleanup_delete(&layer, &a).await;
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_user_left_with_the_old_plus_all_profile_is_drift_and_repaired() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let user = layer.identity(&ta.org_id).unwrap();
    // The profile of earlier versions: everything, minus a list.
    admin_cmd(&["ACL", "SETUSER", &user, "+@all", "-@dangerous", "-keys"])
        .await
        .unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("command rules changed")),
        "{:?}",
        v.findings
    );
    assert!(!probe(&v, &format!("LOLWUT (outside the allowlist) as {a}")).passed);
    let repairs = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(
        repairs
            .iter()
            .any(|r| r.0.contains("command rules changed"))
    );
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert_clean(&v);
    for p in [
        format!("CLUSTER GETKEYSINSLOT as {a}"),
        format!("CLUSTER COUNTKEYSINSLOT as {a}"),
        format!("CLIENT LIST as {a}"),
        format!("LOLWUT (outside the allowlist) as {a}"),
        format!("GET bulkhead:owner:{a} as {a}"),
    ] {
        assert!(probe(&v, &p).passed, "{p}");
    }
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn rotation_ends_connections_opened_with_the_old_password() {
    let layer = layer().await;
    let a = org_id();
    let ta = tenant(&a, &[]);
    let mut creds = provision(&layer, &ta).await;
    let mut old_conn = tenant_conn(&creds).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("org:{a}:k"))
        .arg("1")
        .query_async(&mut old_conn)
        .await
        .unwrap();
    let mut rotating = ta.clone();
    rotating.rotate = true;
    let old = creds.clone();
    assert!(
        layer
            .ensure(&rotating, &mut creds)
            .await
            .unwrap()
            .is_empty()
    );
    assert_ne!(creds.get(cache::KEY_PASSWORD), old.get(cache::KEY_PASSWORD));
    let after: redis::RedisResult<Value> = redis::cmd("GET")
        .arg(format!("org:{a}:k"))
        .query_async(&mut old_conn)
        .await;
    assert!(
        after.is_err(),
        "a connection from before rotation still works: {after:?}"
    );
    assert!(
        tenant_conn(&old).await.is_err(),
        "the old password still logs in"
    );
    let mut new_conn = tenant_conn(&creds).await.unwrap();
    let v: String = redis::cmd("GET")
        .arg(format!("org:{a}:k"))
        .query_async(&mut new_conn)
        .await
        .unwrap();
    assert_eq!(v, "1");
    // A pass without rotation leaves the new connection alone.
    layer.ensure(&ta, &mut creds).await.unwrap();
    let still: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut new_conn).await;
    assert!(still.is_ok());
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn a_claimant_of_an_owned_org_id_is_refused_and_its_cleanup_removes_nothing() {
    let layer = layer().await;
    let a = org_id();
    let owner = owned_by(&a, "uid-owner-1");
    let creds = provision(&layer, &owner).await;
    admin_cmd(&["SET", &format!("org:{a}:realdata"), "precious"])
        .await
        .unwrap();
    assert_eq!(
        admin_cmd(&["GET", &format!("bulkhead:owner:{a}")])
            .await
            .unwrap(),
        Value::BulkString(b"uid-owner-1".to_vec())
    );

    let mut claimant = owned_by(&a, "uid-claimant-2");
    let err = layer
        .ensure(&claimant, &mut Credentials::default())
        .await
        .expect_err("claimant refused");
    let msg = err.to_string();
    assert!(matches!(err, LayerError::Refused(_)), "{err:?}");
    assert!(
        msg.contains(&a) && msg.contains("uid-owner-1") && msg.contains("bulkhead.dev/adopt-from"),
        "{msg}"
    );
    for policy in [DeletionPolicy::Delete, DeletionPolicy::Retain] {
        claimant.deletion_policy = policy;
        layer.cleanup(&claimant).await.unwrap();
        let mut c = creds.clone();
        assert!(
            layer
                .retire(&claimant, &mut c)
                .await
                .unwrap()
                .iter()
                .all(|r| !r.0.contains("ACL user"))
        );
    }
    // The owner's user, keys and record are untouched, and it still works.
    let user = layer.identity(&owner.org_id).unwrap();
    assert_ne!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
    assert_eq!(
        admin_cmd(&["GET", &format!("org:{a}:realdata")])
            .await
            .unwrap(),
        Value::BulkString(b"precious".to_vec())
    );
    assert_clean(&layer.verify(&owner, &creds).await.unwrap());
    // The claimant's verify sees the record names someone else.
    let v = layer.verify(&claimant, &creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("uid-owner-1")),
        "{:?}",
        v.findings
    );

    let mut od = owner.clone();
    od.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&od).await.unwrap();
    assert_eq!(
        admin_cmd(&[
            "EXISTS",
            &format!("org:{a}:realdata"),
            &format!("bulkhead:owner:{a}")
        ])
        .await
        .unwrap(),
        Value::Int(0)
    );
}

#[tokio::test]
async fn retained_keys_are_inherited_only_with_adopt_from() {
    let layer = layer().await;
    let a = org_id();
    let first = owned_by(&a, "uid-first");
    provision(&layer, &first).await;
    admin_cmd(&["SET", &format!("org:{a}:realdata"), "kept"])
        .await
        .unwrap();
    layer.cleanup(&first).await.unwrap(); // Retain

    let mut second = owned_by(&a, "uid-second");
    let err = layer
        .ensure(&second, &mut Credentials::default())
        .await
        .expect_err("refused without adopt-from");
    assert!(
        matches!(err, LayerError::Refused(ref m) if m.contains("uid-first")),
        "{err}"
    );
    second.adopt_from = Some("uid-somebody-else".into());
    assert!(
        layer
            .ensure(&second, &mut Credentials::default())
            .await
            .is_err()
    );

    second.adopt_from = Some("uid-first".into());
    let mut creds = Credentials::default();
    let repairs = layer.ensure(&second, &mut creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r
            .0
            .contains("re-attached retained data of Organization UID uid-first")),
        "{repairs:?}"
    );
    assert_eq!(
        admin_cmd(&["GET", &format!("bulkhead:owner:{a}")])
            .await
            .unwrap(),
        Value::BulkString(b"uid-second".to_vec())
    );
    let mut conn = tenant_conn(&creds).await.unwrap();
    let v: String = redis::cmd("GET")
        .arg(format!("org:{a}:realdata"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "kept");
    // The first owner can no longer remove anything.
    let mut fd = first.clone();
    fd.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&fd).await.unwrap();
    assert_eq!(
        admin_cmd(&["EXISTS", &format!("org:{a}:realdata")])
            .await
            .unwrap(),
        Value::Int(1)
    );
    // A later pass of the adopter is quiet.
    assert!(layer.ensure(&second, &mut creds).await.unwrap().is_empty());
    let mut sd = second.clone();
    sd.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&sd).await.unwrap();
}

#[tokio::test]
async fn state_without_an_owner_record_is_adopted_only_as_legacy() {
    let layer = layer().await;
    let a = org_id();
    let t = owned_by(&a, "uid-legacy-owner");
    let mut creds = provision(&layer, &t).await;
    // The record lost, the ACL user kept (a restart with an aclfile and no data persistence):
    // the Organization whose Secret holds the user's password records itself again.
    admin_cmd(&["DEL", &format!("bulkhead:owner:{a}")])
        .await
        .unwrap();
    let repairs = layer
        .ensure(&t, &mut creds)
        .await
        .expect("proven by the password");
    assert!(
        repairs.iter().any(|r| r.0.contains("was recorded again")),
        "{repairs:?}"
    );
    assert!(layer.ensure(&t, &mut creds).await.unwrap().is_empty());

    // As before owner records existed: the user and keys, no record, and a claimant that does
    // not hold the user's password (none, or another one) is refused.
    admin_cmd(&["DEL", &format!("bulkhead:owner:{a}")])
        .await
        .unwrap();
    let mut wrong = creds.clone();
    wrong.set(cache::KEY_PASSWORD, "not-the-password");
    for mut c in [Credentials::default(), wrong] {
        let err = layer.ensure(&t, &mut c).await.expect_err("refused");
        assert!(
            matches!(err, LayerError::Refused(ref m) if m.contains("no recorded owner") && m.contains("legacy")),
            "{err}"
        );
    }
    let mut creds = Credentials::default();
    // Cleanup without the adoption removes nothing.
    let mut td = t.clone();
    td.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&td).await.unwrap();
    let user = layer.identity(&t.org_id).unwrap();
    assert_ne!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );

    let mut adopting = t.clone();
    adopting.adopt_from = Some("legacy".into());
    let repairs = layer.ensure(&adopting, &mut creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r
            .0
            .contains("re-attached retained data of Organization UID legacy")),
        "{repairs:?}"
    );
    assert!(layer.ensure(&t, &mut creds).await.unwrap().is_empty());

    // Keys alone (no user, no canary) also count as state.
    let b = org_id();
    admin_cmd(&["SET", &format!("org:{b}:stray"), "x"])
        .await
        .unwrap();
    let err = layer
        .ensure(&owned_by(&b, "uid-b"), &mut Credentials::default())
        .await
        .expect_err("keys with no owner are not adopted");
    assert!(matches!(err, LayerError::Refused(_)));
    admin_cmd(&["DEL", &format!("org:{b}:stray")])
        .await
        .unwrap();
    layer.cleanup(&td).await.unwrap();
    assert_eq!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
}

#[tokio::test]
async fn retire_removes_the_user_and_credentials_and_keeps_the_keys() {
    let layer = layer().await;
    let a = org_id();
    let t = tenant(&a, &[]);
    let mut creds = provision(&layer, &t).await;
    creds.set("DATABASE_URL", "kept");
    let mut conn = tenant_conn(&creds).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("org:{a}:data"))
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let repairs = layer.retire(&t, &mut creds).await.unwrap();
    assert!(
        repairs.iter().any(|r| r.0.contains("ACL user")),
        "{repairs:?}"
    );
    assert!(
        repairs.iter().any(|r| r.0.contains("REDIS_PASSWORD")),
        "{repairs:?}"
    );
    for k in [
        cache::KEY_URL,
        cache::KEY_USERNAME,
        cache::KEY_PASSWORD,
        cache::KEY_KEY_PREFIX,
        cache::KEY_CHANNEL_PREFIX,
    ] {
        assert_eq!(creds.get(k), None, "{k} kept");
    }
    assert_eq!(creds.get("DATABASE_URL"), Some("kept"));
    let user = layer.identity(&t.org_id).unwrap();
    assert_eq!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
    let open: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(open.is_err(), "a session survived the retirement");
    assert_eq!(
        admin_cmd(&["GET", &format!("org:{a}:data")]).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    // Idempotent.
    assert!(layer.retire(&t, &mut creds).await.unwrap().is_empty());
    // Switched back on: a fresh user and password, the data is there.
    let mut creds2 = Credentials::default();
    layer.ensure(&t, &mut creds2).await.unwrap();
    let mut conn = tenant_conn(&creds2).await.unwrap();
    let v: String = redis::cmd("GET")
        .arg(format!("org:{a}:data"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "v");
    cleanup_delete(&layer, &a).await;
}

#[tokio::test]
async fn an_org_whose_prefix_covers_the_owner_records_is_refused_before_any_write() {
    let mut s = spec();
    s.key_prefix = "bulkhead:owner:{orgId}:".into();
    let err = CacheLayer::connect(&s, "redis://default:x@127.0.0.1:1")
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, LayerError::Config(ref m) if m.contains("owner")),
        "{err:?}"
    );

    let mut s = spec();
    s.key_prefix = "bulkhead:{orgId}:".into();
    s.user_prefix = format!("{}-", unique("bkowner"));
    let layer = layer_with(&s).await;
    let t = owned_by("owner", "uid-owner-ns");
    let before = layer.acl_changes();
    let err = layer
        .ensure(&t, &mut Credentials::default())
        .await
        .expect_err("refused");
    assert!(
        matches!(err, LayerError::Refused(ref m) if m.contains("owner records")),
        "{err:?}"
    );
    assert_eq!(layer.acl_changes(), before, "no ACL write");
    let user = layer.identity(&t.org_id).unwrap();
    assert_eq!(
        admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap(),
        Value::Nil
    );
    admin_cmd(&["ACL", "DELUSER", &layer.rules().reference_user()])
        .await
        .unwrap();
}
