//! The database layer against one tenant holding only its own credentials (the `DATABASE_URL`
//! of its Secret). Each test plays one attack on the testbed's PostgreSQL, prints a row
//! (attempt, expected, observed) and fails if the defence is removed.
//!
//! Run with `cargo test --test adversary_database -- --nocapture` to see the table.

mod common;

use common::TestDb;

use std::time::{Duration, Instant};

use bulkhead::api::DeletionPolicy;
use bulkhead::layers::database::{ADMIN_LOCK_TIMEOUT, DatabaseLayer, KEY_URL, reaper};
use bulkhead::layers::{Credentials, ErrorClass, Layer, Tenant};
use bulkhead::tenant::OrgId;
use common::attempt_row;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const SEED: &str = r#"
CREATE TABLE projects (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE TABLE messages (id bigserial PRIMARY KEY, org_id text NOT NULL, body text);
CREATE INDEX ON projects (org_id);
CREATE INDEX ON messages (org_id);
"#;

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

impl TestDb {
    async fn layer(&self, limits: serde_json::Value) -> DatabaseLayer {
        let spec = serde_json::from_value(json!({
            "adminUrlSecretRef": {"name": "pg", "key": "url"},
            "rolePrefix": self.role_prefix,
            "groupRole": self.group,
            "tenantLimits": limits,
        }))
        .expect("spec");
        DatabaseLayer::connect(&spec, &self.url)
            .await
            .expect("connect layer")
            .with_audit_ttl(Duration::ZERO)
    }
}

fn tenant(org: &OrgId, peers: &[&OrgId]) -> Tenant {
    common::tenant_of(org, &format!("uid-{org}"), peers, DeletionPolicy::Delete)
}

/// Two provisioned organizations: `a` is the attacker, `b` the victim.
struct Pair {
    db: TestDb,
    layer: DatabaseLayer,
    a: Tenant,
    b: Tenant,
    ca: Credentials,
    cb: Credentials,
}

async fn pair(limits: serde_json::Value) -> Pair {
    let db = TestDb::create("a", SEED).await;
    let layer = db.layer(limits).await;
    layer.prepare().await.expect("prepare");
    let (oa, ob) = (db.org("mallory"), db.org("victim"));
    let a = tenant(&oa, &[&ob]);
    let b = tenant(&ob, &[&oa]);
    let (mut ca, mut cb) = (Credentials::default(), Credentials::default());
    layer.ensure(&a, &mut ca).await.expect("ensure a");
    layer.ensure(&b, &mut cb).await.expect("ensure b");
    Pair {
        db,
        layer,
        a,
        b,
        ca,
        cb,
    }
}

impl Pair {
    async fn attacker(&self) -> Client {
        connect(self.ca.get(KEY_URL).expect("url")).await
    }
    async fn victim(&self) -> Client {
        connect(self.cb.get(KEY_URL).expect("url")).await
    }
    async fn finish(self) {
        let Pair { db, layer, .. } = self;
        drop(layer);
        db.finish().await;
    }
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// The advisory-lock key the operator used to wait on (sha256 of a public string).
fn old_key(purpose: &str) -> i64 {
    let digest = Sha256::digest(purpose.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

#[tokio::test]
async fn a_tenant_cannot_take_or_stall_the_operators_locks() {
    let mut p = pair(json!({})).await;
    let attacker = p.attacker().await;
    // The keys the operator once waited on are still free for anyone: holding them must not matter.
    for purpose in [
        "bulkhead:prepare".to_owned(),
        format!("bulkhead:org:{}", p.b.org_id),
        format!("bulkhead:org:{}", p.a.org_id),
    ] {
        attacker
            .execute("SELECT pg_advisory_lock($1)", &[&old_key(&purpose)])
            .await
            .expect("advisory locks are open to every role");
    }
    // The row locks the operator uses now are out of reach.
    for sql in [
        "SELECT * FROM bulkhead.locks FOR UPDATE",
        "BEGIN; LOCK TABLE bulkhead.locks IN ACCESS SHARE MODE",
        "BEGIN; LOCK TABLE bulkhead.tenant_roles IN EXCLUSIVE MODE",
    ] {
        let err = attacker
            .batch_execute(sql)
            .await
            .expect_err("the operator's lock table is private");
        let _ = attacker.batch_execute("ROLLBACK").await;
        attempt_row(
            &format!("tenant: {sql}"),
            "permission denied (42501)",
            &code(&err),
        );
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }
    // With the old keys held, every operator pass runs at once.
    let started = Instant::now();
    let passes = async {
        p.layer.prepare().await.expect("prepare");
        p.layer
            .ensure(&p.b, &mut p.cb)
            .await
            .expect("ensure victim");
        p.layer
            .ensure(&p.a, &mut p.ca)
            .await
            .expect("ensure attacker");
    };
    tokio::time::timeout(Duration::from_secs(30), passes)
        .await
        .expect("the operator must not wait on a tenant's advisory locks");
    let took = started.elapsed();
    attempt_row(
        "tenant holds pg_advisory_lock on bulkhead:prepare and bulkhead:org:* keys",
        "prepare and ensure unaffected",
        &format!("prepare + 2 ensure passes took {took:?}"),
    );
    assert!(took < ADMIN_LOCK_TIMEOUT, "{took:?}");
    drop(attacker);
    p.finish().await;
}

/// Holds `LOCK TABLE projects IN ACCESS EXCLUSIVE MODE` and keeps the transaction busy, in one
/// of two ways, for up to `hold`. Returns whether the session was ended under it.
async fn hold_table_lock(c: Client, one_long_sleep: bool, hold: Duration) -> bool {
    let mut c = c;
    let Ok(tx) = c.transaction().await else {
        return true;
    };
    if tx
        .batch_execute("LOCK TABLE public.projects IN ACCESS EXCLUSIVE MODE")
        .await
        .is_err()
    {
        return true;
    }
    let started = Instant::now();
    if one_long_sleep {
        // Role settings are only defaults: a session may lift its own statement timeout.
        let sql = format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SELECT pg_sleep({})",
            hold.as_secs()
        );
        return tx.batch_execute(&sql).await.is_err();
    }
    while started.elapsed() < hold {
        // Each statement stays well under the role's statement timeout.
        if tx.batch_execute("SELECT pg_sleep(1)").await.is_err() {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_table_lock_blocks_other_tenants_only_for_the_bound() {
    let p = pair(json!({})).await;
    let bound_hold = Duration::from_millis(p.layer.settings().limits.lock_hold_ms);
    // The documented bound: the lock-hold limit, plus the reaper's interval, plus a second.
    let documented = bound_hold + reaper::INTERVAL + Duration::from_secs(1);
    for one_long_sleep in [false, true] {
        let attacker = p.attacker().await;
        let victim = p.victim().await;
        // The victim waits as long as it takes, so the wait measures the block itself.
        victim
            .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
            .await
            .unwrap();
        let hold = Duration::from_secs(40);
        let attack = tokio::spawn(hold_table_lock(attacker, one_long_sleep, hold));
        // Let the lock be taken before the victim asks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let n: i64 = tokio::time::timeout(
            hold + Duration::from_secs(10),
            victim.query_one("SELECT count(*) FROM public.projects", &[]),
        )
        .await
        .expect("the victim's SELECT finishes")
        .expect("the victim's SELECT succeeds")
        .get(0);
        let blocked = started.elapsed();
        let ended = attack.await.unwrap();
        let how = if one_long_sleep {
            "one pg_sleep(40) with statement_timeout lifted"
        } else {
            "pg_sleep(1) statements under the statement timeout"
        };
        attempt_row(
            &format!("tenant: LOCK TABLE projects IN ACCESS EXCLUSIVE MODE, then {how}"),
            &format!(
                "other tenants blocked < {documented:?} (lockHoldSeconds + reaper interval + 1 s)"
            ),
            &format!(
                "victim's SELECT blocked {:.2} s; attacker's session ended: {ended}",
                blocked.as_secs_f64()
            ),
        );
        assert!(n >= 1, "the victim sees its canary");
        assert!(ended, "the attacker's session is ended");
        assert!(
            blocked < documented,
            "blocked {blocked:?}, documented bound {documented:?}"
        );
        assert!(
            blocked + Duration::from_secs(1) >= bound_hold,
            "the lock was really held ({blocked:?}); otherwise the test proves nothing"
        );
    }
    p.finish().await;
}

#[tokio::test]
async fn ordinary_long_transactions_are_left_alone() {
    // The bound is about table locks: a tenant's long write transaction on its own rows, or a
    // long read, holds only ROW EXCLUSIVE / ACCESS SHARE and is never ended.
    let p = pair(json!({"lockHoldSeconds": 1})).await;
    let mut c = p.attacker().await;
    let tx = c.transaction().await.unwrap();
    tx.execute("UPDATE public.projects SET name = 'mine'", &[])
        .await
        .unwrap();
    tx.batch_execute("SELECT count(*) FROM public.messages; SELECT pg_sleep(3)")
        .await
        .expect("not ended");
    tx.commit().await.expect("commits");
    attempt_row(
        "tenant: a 3 s write transaction on its own rows (lockHoldSeconds: 1)",
        "left alone",
        "committed",
    );
    drop(c);
    p.finish().await;
}

#[tokio::test]
async fn the_operator_gives_up_on_a_held_table_lock_instead_of_hanging() {
    // A long lock-hold bound, so the operator's own lock timeout is what ends its wait.
    let p = pair(json!({"lockHoldSeconds": 60})).await;
    let mut attacker = p.attacker().await;
    let tx = attacker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE public.projects IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let newcomer = tenant(&p.db.org("newcomer"), &[]);
    let mut creds = Credentials::default();
    let started = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        p.layer.ensure(&newcomer, &mut creds),
    )
    .await
    .expect("ensure must not hang on a tenant's lock");
    let took = started.elapsed();
    let err = res.expect_err("the canary insert waits on the lock");
    attempt_row(
        "tenant holds ACCESS EXCLUSIVE on projects while the operator plants canaries",
        &format!(
            "the pass gives up after the admin lock_timeout ({ADMIN_LOCK_TIMEOUT:?}), transient"
        ),
        &format!("{:?} after {:.2} s: {err}", err.class(), took.as_secs_f64()),
    );
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(err.to_string().contains("gave up after waiting"), "{err}");
    assert!(
        took < ADMIN_LOCK_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    tx.rollback().await.unwrap();
    // Once the lock is gone the pass succeeds.
    p.layer.ensure(&newcomer, &mut creds).await.expect("ensure");
    drop(attacker);
    p.finish().await;
}

#[tokio::test]
async fn connection_exhaustion_stops_at_the_tenants_own_limit() {
    let limit = 5;
    let p = pair(json!({"connectionLimit": limit})).await;
    let url = p.ca.get(KEY_URL).unwrap().to_owned();
    let mut held = Vec::new();
    let mut refusal = None;
    for _ in 0..(limit * 4) {
        match try_connect(&url).await {
            Ok(c) => held.push(c),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let refusal = refusal.expect("the tenant's connections are limited");
    attempt_row(
        "tenant opens connections until refused",
        &format!("refused after {limit} (CONNECTION LIMIT), 53300"),
        &format!("opened {}, then {}", held.len(), code(&refusal)),
    );
    assert_eq!(held.len(), limit as usize);
    assert_eq!(refusal.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    // Others still get in: the victim tenant, and the operator's admin.
    let victim = try_connect(p.cb.get(KEY_URL).unwrap()).await;
    let admin = try_connect(&p.db.url).await;
    attempt_row(
        "another tenant and the operator connect while the attacker holds its slots",
        "both connect",
        &format!(
            "victim: {}, admin: {}",
            if victim.is_ok() {
                "connected"
            } else {
                "refused"
            },
            if admin.is_ok() {
                "connected"
            } else {
                "refused"
            }
        ),
    );
    victim
        .expect("the victim connects")
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    admin.expect("the admin connects");
    let mut cb = p.cb.clone();
    p.layer
        .ensure(&p.b, &mut cb)
        .await
        .expect("the operator keeps working");
    drop(held);
    p.finish().await;
}

#[tokio::test]
async fn a_tenant_cannot_plant_objects_the_operator_would_run() {
    let db = TestDb::create("a", SEED).await;
    let admin = db.admin().await;
    // PostgreSQL 14's default, kept by clusters upgraded from it: PUBLIC may CREATE in public.
    admin
        .batch_execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    let layer = db.layer(json!({})).await;
    let before = layer.findings().await.unwrap();
    assert!(
        before
            .iter()
            .any(|f| f.subject == "schema public" && f.message.contains("through PUBLIC")),
        "{before:?}"
    );
    layer.prepare().await.expect("prepare");
    let a = tenant(&db.org("planter"), &[]);
    let mut ca = Credentials::default();
    layer.ensure(&a, &mut ca).await.unwrap();
    let c = connect(ca.get(KEY_URL).unwrap()).await;
    for sql in [
        "CREATE FUNCTION public.unnest(oid[]) RETURNS SETOF oid LANGUAGE sql AS 'SELECT 0::oid'",
        "CREATE TABLE public.planted (x int)",
        "CREATE FUNCTION bulkhead.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE FUNCTION auth.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ] {
        let err = c
            .batch_execute(sql)
            .await
            .expect_err("no CREATE for tenants");
        attempt_row(
            &format!("tenant: {}", &sql[..sql.find('(').unwrap_or(sql.len())]),
            "permission denied (42501)",
            &code(&err),
        );
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }

    // A schema the tenant can create in, on the search_path of every new session (the way
    // `public` was before PostgreSQL 15): a shadowing unnest(oid[]) that records its callers.
    let role = layer.role_of(&a.org_id);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA open; GRANT USAGE, CREATE ON SCHEMA open TO \"{role}\";
             ALTER DATABASE \"{}\" SET search_path = \"$user\", public, open",
            db.name
        ))
        .await
        .unwrap();
    c.batch_execute(
        "CREATE TABLE open.calls (who text);
         GRANT INSERT ON open.calls TO PUBLIC;
         CREATE FUNCTION open.unnest(oid[]) RETURNS SETOF oid LANGUAGE sql
           AS 'INSERT INTO open.calls VALUES (current_user::text) RETURNING 0::oid'",
    )
    .await
    .unwrap();
    // It is a real trap: an unqualified call from a fresh admin session runs it as the admin.
    let fresh = db.admin().await;
    fresh
        .query("SELECT * FROM unnest(ARRAY[1::oid])", &[])
        .await
        .unwrap();
    let trapped: i64 = fresh
        .query_one("SELECT count(*) FROM open.calls", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(trapped, 1, "the shadow works on unqualified calls");
    fresh.batch_execute("TRUNCATE open.calls").await.unwrap();
    // The audit flags the tenant's CREATE on... nothing governed: `open` is not the operator's.
    // Every operator pass now reads the catalog; none may call the shadow.
    let fresh_layer = db.layer(json!({})).await;
    fresh_layer.prepare().await.unwrap();
    fresh_layer.ensure(&a, &mut ca).await.unwrap();
    let v = fresh_layer.verify(&a, &ca).await.unwrap();
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());
    let calls: i64 = fresh
        .query_one("SELECT count(*) FROM open.calls", &[])
        .await
        .unwrap()
        .get(0);
    attempt_row(
        "tenant plants open.unnest(oid[]) on the database's search_path",
        "the operator's catalog queries never call it",
        &format!("calls recorded after prepare, ensure, verify: {calls}"),
    );
    assert_eq!(calls, 0);
    drop((c, fresh, admin));
    drop((layer, fresh_layer));
    db.finish().await;
}

#[tokio::test]
async fn a_connection_opened_before_rotation_is_dead_after_it() {
    let mut p = pair(json!({})).await;
    let old_url = p.ca.get(KEY_URL).unwrap().to_owned();
    let old = p.attacker().await;
    old.query_one("SELECT 1", &[]).await.unwrap();
    p.a.rotate = true;
    p.layer.ensure(&p.a, &mut p.ca).await.expect("rotate");
    p.a.rotate = false;
    let used = old
        .query_one("SELECT count(*) FROM public.projects", &[])
        .await;
    let relogin = try_connect(&old_url).await;
    attempt_row(
        "tenant keeps using a connection opened with the old password after rotation",
        "the session is ended",
        &match &used {
            Ok(_) => "query answered".to_owned(),
            Err(e) => format!(
                "error: {}",
                if e.is_closed() {
                    "connection closed".to_owned()
                } else {
                    code(e)
                }
            ),
        },
    );
    attempt_row(
        "tenant logs in again with the old password",
        "refused (28P01)",
        &match &relogin {
            Ok(_) => "logged in".to_owned(),
            Err(e) => code(e),
        },
    );
    assert!(used.is_err(), "the old session still works");
    assert!(relogin.is_err(), "the old password still works");
    let fresh = p.attacker().await;
    fresh
        .query_one("SELECT 1", &[])
        .await
        .expect("new password works");
    drop(fresh);
    p.finish().await;
}
