//! The cache layer attacked, on the testbed's Redis. Two attackers: a tenant holding only its
//! own Redis credentials, and someone who can create Organizations (simulated here by the
//! `Tenant` values the controller would pass). Each attempt prints one row (attempt, expected,
//! observed); the test fails if any defence is missing.

mod common;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::CachePlatform;
use bulkhead::layers::cache::{self, CacheLayer};
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant};
use bulkhead::tenant::OrgId;
use common::{Testbed, attempt_row, unique};
use redis::Value;
use redis::aio::MultiplexedConnection;

fn spec() -> CachePlatform {
    common::cache_spec()
}

fn tenant(org: &str, uid: &str) -> Tenant {
    common::tenant_of(
        &OrgId::parse(org).unwrap(),
        uid,
        &[],
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

async fn admin_cmd(args: &[&str]) -> redis::RedisResult<Value> {
    let mut conn = redis::Client::open(Testbed::get().redis_admin_url())?
        .get_multiplexed_async_connection()
        .await?;
    cmd(args).query_async(&mut conn).await
}

async fn conn_of(creds: &Credentials) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(creds.get(cache::KEY_URL).unwrap())?
        .get_multiplexed_async_connection()
        .await
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// What Redis did with an attempt, in words, and whether the ACL refused it.
fn observed(r: &redis::RedisResult<Value>) -> (bool, String) {
    match r {
        Err(e) => {
            let text = match (e.code(), e.detail()) {
                (Some(c), Some(d)) => format!("{c} {d}"),
                _ => e.to_string(),
            };
            (text.to_ascii_uppercase().starts_with("NOPERM"), text)
        }
        Ok(Value::SimpleString(s)) if s == "QUEUED" => {
            (false, "accepted (queued, then discarded)".into())
        }
        Ok(v) => (false, format!("allowed: {v:?}").chars().take(120).collect()),
    }
}

/// Attempts and their verdicts; the test fails at the end if any defence was missing.
#[derive(Default)]
struct Table {
    failures: Vec<String>,
}

impl Table {
    fn row(&mut self, attempt: &str, expected: &str, observed: &str, held: bool) {
        attempt_row(attempt, expected, observed);
        if !held {
            self.failures.push(format!("{attempt}: {observed}"));
        }
    }

    fn refused(&mut self, attempt: &str, r: &redis::RedisResult<Value>) {
        let (noperm, text) = observed(r);
        self.row(attempt, "NOPERM", &text, noperm);
    }

    fn assert_held(&self) {
        assert!(
            self.failures.is_empty(),
            "defences missing: {:#?}",
            self.failures
        );
    }
}

/// Redis Cluster's hash slot of a key without hash tags: CRC16-XMODEM modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in key {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Sends `args` inside MULTI and discards it: the ACL verdict without the effect.
async fn queued(conn: &mut MultiplexedConnection, args: &[&str]) -> redis::RedisResult<Value> {
    let _: Value = redis::cmd("MULTI").query_async(conn).await?;
    let r = cmd(args).query_async(conn).await;
    let _: Value = redis::cmd("DISCARD").query_async(conn).await?;
    r
}

#[tokio::test]
async fn a_tenant_with_its_own_credentials_cannot_reach_beyond_its_keys() {
    let layer = layer_with(&spec()).await;
    let (a, b) = (unique("advc"), unique("advc"));
    let mut ta = tenant(&a, &format!("uid-{a}"));
    let tb = tenant(&b, &format!("uid-{b}"));
    let mut creds_a = Credentials::default();
    layer.ensure(&ta, &mut creds_a).await.expect("ensure a");
    let mut creds_b = Credentials::default();
    layer.ensure(&tb, &mut creds_b).await.expect("ensure b");
    let victim_key = format!("org:{b}:realdata");
    admin_cmd(&["SET", &victim_key, "precious"]).await.unwrap();
    let own_key = format!("org:{a}:list");
    admin_cmd(&["RPUSH", &own_key, "1", "2"]).await.unwrap();
    let own_record = format!("bulkhead:owner:{a}");
    let victim_record = format!("bulkhead:owner:{b}");
    let victim_user = layer.identity(&tb.org_id).unwrap();
    // The victim key's hash slot, as a cluster computes it (this Redis runs without cluster).
    let slot = key_slot(victim_key.as_bytes()).to_string();

    let mut victim = conn_of(&creds_b).await.unwrap();
    let mut conn = conn_of(&creds_a).await.unwrap();
    let mut t = Table::default();
    println!("| attempt (as {a}) | expected | observed |\n|---|---|---|");

    // Read-only or introspection: run for real.
    let reads: Vec<Vec<&str>> = vec![
        vec!["KEYS", "*"],
        vec!["SCAN", "0", "COUNT", "100"],
        vec!["RANDOMKEY"],
        vec!["DBSIZE"],
        vec!["INFO", "keyspace"],
        vec!["CONFIG", "GET", "*"],
        vec!["PUBSUB", "CHANNELS", "*"],
        vec!["PUBSUB", "NUMSUB", "org:x:events"],
        vec!["PUBSUB", "NUMPAT"],
        vec!["CLUSTER", "GETKEYSINSLOT", &slot, "10"],
        vec!["CLUSTER", "COUNTKEYSINSLOT", &slot],
        vec!["CLIENT", "LIST"],
        vec!["CLIENT", "INFO"],
        vec!["ACL", "LIST"],
        vec!["ACL", "USERS"],
        vec!["ACL", "WHOAMI"],
        vec!["ACL", "GETUSER", &victim_user],
        vec!["ACL", "LOG"],
        vec!["SLOWLOG", "GET"],
        vec!["LATENCY", "LATEST"],
        vec!["MEMORY", "STATS"],
        vec!["OBJECT", "ENCODING", &victim_key],
        vec!["GET", &victim_key],
        vec!["SELECT", "1"],
        vec!["LOLWUT"],
        vec!["SORT", &own_key],
        vec!["GET", &own_record],
        vec!["GET", &victim_record],
        vec!["EXISTS", &own_record],
        vec!["TYPE", &victim_record],
        vec![
            "EVAL",
            "return redis.call('GET', KEYS[1])",
            "1",
            &victim_record,
        ],
    ];
    for args in &reads {
        let r = cmd(args).query_async(&mut conn).await;
        t.refused(&args.join(" "), &r);
    }
    // Writes and administration: queued inside MULTI and discarded, so a missing defence changes
    // nothing shared.
    let copy_target = format!("org:{a}:copy");
    let writes: Vec<Vec<&str>> = vec![
        vec!["FLUSHALL"],
        vec!["FLUSHDB"],
        vec!["SWAPDB", "0", "1"],
        vec!["MOVE", &own_key, "1"],
        vec!["COPY", &own_key, &copy_target, "DB", "1"],
        vec!["CONFIG", "SET", "maxmemory", "1"],
        vec!["SET", &own_record, "uid-forged"],
        vec!["DEL", &victim_record],
        vec!["ACL", "SETUSER", &victim_user, "nopass"],
        vec!["ACL", "DELUSER", &victim_user],
        vec!["CLIENT", "PAUSE", "1000"],
        vec!["CLIENT", "NO-EVICT", "on"],
        vec!["MONITOR"],
        vec!["SCRIPT", "FLUSH"],
        vec!["FUNCTION", "FLUSH"],
        vec!["MIGRATE", "127.0.0.1", "1", &own_key, "0", "1"],
    ];
    for args in &writes {
        let r = queued(&mut conn, args).await;
        t.refused(&format!("{} (in MULTI)", args.join(" ")), &r);
    }

    // The server refuses these before the ACL check (DEBUG is disabled, SHUTDOWN is refused in
    // MULTI) and they are not to be tried for real: the ACL's own verdict, from ACL DRYRUN.
    let user_a = layer.identity(&ta.org_id).unwrap();
    for args in [
        vec!["DEBUG", "SLEEP", "0"],
        vec!["SHUTDOWN", "NOSAVE"],
        vec!["SAVE"],
    ] {
        let mut dry = vec!["ACL", "DRYRUN", user_a.as_str()];
        dry.extend(args.iter().copied());
        let verdict = match admin_cmd(&dry).await {
            Ok(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => format!("{other:?}"),
        };
        t.row(
            &format!("{} (ACL DRYRUN)", args.join(" ")),
            "no permissions",
            &verdict,
            verdict.contains("no permissions to run"),
        );
    }

    // Kill another organization's connections, for real: the victim's stays open.
    let r = cmd(&["CLIENT", "KILL", "USER", &victim_user])
        .query_async(&mut conn)
        .await;
    t.refused(&format!("CLIENT KILL USER {victim_user}"), &r);
    let victim_id = match cmd(&["CLIENT", "ID"]).query_async(&mut victim).await {
        Ok(Value::Int(n)) => n.to_string(),
        other => panic!("CLIENT ID {other:?}"),
    };
    let r = cmd(&["CLIENT", "KILL", "ID", &victim_id])
        .query_async(&mut conn)
        .await;
    t.refused(&format!("CLIENT KILL ID {victim_id} (the victim's)"), &r);
    let alive = cmd(&["PING"]).query_async::<Value>(&mut victim).await;
    t.row(
        "victim's connection after the kills",
        "still open",
        &format!("{alive:?}"),
        alive.is_ok(),
    );

    // The owner records are untouched.
    let rec = admin_cmd(&["GET", &own_record]).await.unwrap();
    t.row(
        "owner record after the attempts",
        "names the attacker's own UID",
        &format!("{rec:?}"),
        rec == Value::BulkString(format!("uid-{a}").into_bytes()),
    );

    // Keep a connection after rotation (a leaked password's session).
    let before = cmd(&["LLEN", &own_key])
        .query_async::<Value>(&mut conn)
        .await;
    t.row(
        "own keys on the attacker's connection before rotation",
        "works",
        &format!("{before:?}"),
        before == Ok(Value::Int(2)),
    );
    let stolen = creds_a.clone();
    ta.rotate = true;
    layer.ensure(&ta, &mut creds_a).await.expect("rotate");
    let after = cmd(&["LLEN", &own_key])
        .query_async::<Value>(&mut conn)
        .await;
    let closed = after.as_ref().err().is_some_and(|e| {
        e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
    });
    t.row(
        "use a connection opened before rotation",
        "connection closed",
        &match &after {
            Ok(v) => format!("allowed: {v:?}"),
            Err(e) => format!("closed: {:?}", e.kind()),
        },
        closed,
    );
    let relogin = conn_of(&stolen).await;
    t.row(
        "log in again with the old password",
        "refused",
        &match &relogin {
            Ok(_) => "logged in".to_owned(),
            Err(e) => format!(
                "refused: {}",
                e.code()
                    .map_or_else(|| format!("{:?}", e.kind()), str::to_owned)
            ),
        },
        relogin.is_err(),
    );
    let mut fresh = conn_of(&creds_a).await.unwrap();
    let works = cmd(&["LLEN", &own_key])
        .query_async::<Value>(&mut fresh)
        .await;
    t.row(
        "own keys with the new password",
        "works",
        &format!("{works:?}"),
        works == Ok(Value::Int(2)),
    );

    assert_eq!(key_slot(b"123456789"), 0x31C3, "CRC16 check value");
    t.assert_held();
    for tn in [&ta, &tb] {
        let mut d = tn.clone();
        d.deletion_policy = DeletionPolicy::Delete;
        layer.cleanup(&d).await.unwrap();
    }
}

#[tokio::test]
async fn an_attacker_who_creates_organizations_cannot_take_or_wipe_another_orgs_cache() {
    let layer = layer_with(&spec()).await;
    let mut t = Table::default();
    println!("| attempt (creating Organizations) | expected | observed |\n|---|---|---|");

    // An owned org id, with real data.
    let g = unique("advg");
    let owner = tenant(&g, &format!("uid-{g}"));
    let mut owner_creds = Credentials::default();
    layer.ensure(&owner, &mut owner_creds).await.unwrap();
    let realdata = format!("org:{g}:realdata");
    admin_cmd(&["SET", &realdata, "precious"]).await.unwrap();
    let owner_user = layer.identity(&owner.org_id).unwrap();

    let mut squatter = tenant(&g, "uid-squatter");
    let r = layer.ensure(&squatter, &mut Credentials::default()).await;
    t.row(
        &format!("claim orgId {g} owned by another Organization"),
        "Refused naming the owner UID and the adopt-from annotation",
        &format!("{r:?}"),
        matches!(&r, Err(LayerError::Refused(m)) if m.contains(&format!("uid-{g}")) && m.contains("adopt-from")),
    );
    squatter.adopt_from = Some("legacy".into());
    let r = layer.ensure(&squatter, &mut Credentials::default()).await;
    t.row(
        "claim it with adopt-from: legacy",
        "Refused (the record names an owner)",
        &format!("{r:?}"),
        matches!(r, Err(LayerError::Refused(_))),
    );
    squatter.adopt_from = None;
    squatter.deletion_policy = DeletionPolicy::Delete;
    let r = layer.cleanup(&squatter).await;
    let mut sq_creds = Credentials::default();
    let retired = layer.retire(&squatter, &mut sq_creds).await;
    let user_left = admin_cmd(&["ACL", "GETUSER", &owner_user]).await.unwrap() != Value::Nil;
    let data_left =
        admin_cmd(&["GET", &realdata]).await.unwrap() == Value::BulkString(b"precious".to_vec());
    t.row(
        "delete the claimant with deletionPolicy Delete (and retire its cache)",
        "owner's ACL user and org:<id>:realdata untouched",
        &format!(
            "cleanup {:?}, retire {:?}, user kept: {user_left}, realdata kept: {data_left}",
            r.is_ok(),
            retired.map(|v| v.len())
        ),
        user_left && data_left,
    );
    let still = match conn_of(&owner_creds).await {
        Ok(mut c) => cmd(&["GET", &realdata]).query_async::<Value>(&mut c).await,
        Err(e) => Err(e),
    };
    t.row(
        "owner reads its data afterwards",
        "works",
        &format!("{:?}", still.is_ok()),
        still.is_ok(),
    );

    // Retained data of a deleted Organization.
    layer.cleanup(&owner).await.unwrap(); // Retain
    let heir = tenant(&g, "uid-heir");
    let r = layer.ensure(&heir, &mut Credentials::default()).await;
    t.row(
        "new Organization with the orgId of a deleted one (Retain)",
        "Refused without adopt-from",
        &format!("{r:?}"),
        matches!(r, Err(LayerError::Refused(_))),
    );
    let mut heir = heir;
    heir.adopt_from = Some("uid-not-the-owner".into());
    let r = layer.ensure(&heir, &mut Credentials::default()).await;
    t.row(
        "the same with adopt-from naming a wrong UID",
        "Refused",
        &format!("{r:?}"),
        matches!(r, Err(LayerError::Refused(_))),
    );

    // An org id (under a platform template) whose prefix would cover the owner records.
    let mut s = spec();
    s.key_prefix = "bulkhead:{orgId}:".into();
    s.user_prefix = format!("{}-", unique("bkadv"));
    let wide = layer_with(&s).await;
    let mut covering = tenant("owner", "uid-covering");
    let user = wide.identity(&covering.org_id).unwrap();
    for adopt in [None, Some("legacy")] {
        covering.adopt_from = adopt.map(str::to_owned);
        let r = wide.ensure(&covering, &mut Credentials::default()).await;
        let created = admin_cmd(&["ACL", "GETUSER", &user]).await.unwrap() != Value::Nil;
        t.row(
            &format!(
                "orgId 'owner' with keyPrefix bulkhead:{{orgId}}: (pattern bulkhead:owner:*), adopt-from {adopt:?}"
            ),
            "Refused: prefix overlaps the owner records; no ACL user",
            &format!("{r:?}, user created: {created}"),
            matches!(&r, Err(LayerError::Refused(m)) if m.contains("overlaps the owner records"))
                && !created,
        );
    }
    // Never leave such a user behind, even when the defence above is missing.
    admin_cmd(&["ACL", "DELUSER", &user]).await.unwrap();
    admin_cmd(&["DEL", "bulkhead:owner:owner"]).await.unwrap();
    let mut s2 = spec();
    s2.channel_prefix = "bulkhead:owner:{orgId}:".into();
    let r = CacheLayer::connect(&s2, "redis://default:x@127.0.0.1:1").await;
    t.row(
        "platform channelPrefix bulkhead:owner:{orgId}:",
        "Config error before any Redis call",
        &format!("{:?}", r.as_ref().err()),
        matches!(r, Err(LayerError::Config(_))),
    );
    admin_cmd(&["ACL", "DELUSER", &wide.rules().reference_user()])
        .await
        .unwrap();

    // Redis metacharacters in the org id never reach a rule.
    for bad in ["a*", "a?", "a[b]", "a{b}", "a b", "a\r\nb", "a\\b"] {
        let r = layer.plan_for(bad, "pw");
        t.row(
            &format!("orgId {bad:?}"),
            "Refused before any Redis call",
            &format!("{:?}", r.as_ref().err().map(|e| e.reason())),
            matches!(r, Err(LayerError::Refused(_))),
        );
    }

    t.assert_held();
    let mut od = heir.clone();
    od.adopt_from = Some(format!("uid-{g}"));
    layer
        .ensure(&od, &mut Credentials::default())
        .await
        .unwrap();
    od.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&od).await.unwrap();
}
