//! Database drift is repaired within seconds, not at the next verification interval: changes
//! made behind the operator's back (RLS disabled, FORCE dropped, policy dropped or opened up, a
//! new unprotected table) are caught by the event triggers and put back by the platform's pass.
//!
//! Needs the testbed (`testbed/up`). Run: `cargo test --test tamper -- --nocapture`.

mod common;

use std::time::{Duration, Instant};

use bulkhead::api::IsolationPlatform;
use common::{Operator, TestDb, Testbed, install_crds, unique};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const SEED: &str = r#"
CREATE TABLE projects (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE INDEX ON projects (org_id);
"#;

/// Far longer than the test: a repair within it can only come from the drift listener.
const INTERVAL_SECONDS: u32 = 300;
/// What CI accepts per change; the measured figures are printed (and in BENCHMARKS.md).
const BOUND: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// (RLS enabled, RLS forced, policies, their USING expressions) of `public.<table>`.
type State = (bool, bool, i64, String);

async fn state(db: &tokio_postgres::Client, table: &str) -> Option<State> {
    let row = db
        .query_opt(
            "SELECT c.relrowsecurity, c.relforcerowsecurity,
                    (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid),
                    coalesce((SELECT string_agg(coalesce(pg_get_expr(p.polqual, p.polrelid), ''), ';' ORDER BY p.polname)
                              FROM pg_policy p WHERE p.polrelid = c.oid), '')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relname = $1",
            &[&table],
        )
        .await
        .expect("read state")?;
    Some((row.get(0), row.get(1), row.get(2), row.get(3)))
}

fn notified(op: &Operator) -> usize {
    op.log().matches("database drift notified").count()
}

/// Waits until no notification arrived for 600 ms (the operator's own repairs notify too), so
/// a change's detection is not an earlier notification arriving late.
async fn settle(op: &Operator) {
    let mut last = notified(op);
    let mut quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(600) {
        tokio::time::sleep(POLL).await;
        let n = notified(op);
        if n != last {
            last = n;
            quiet = Instant::now();
        }
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[tokio::test]
async fn database_drift_is_repaired_within_seconds() {
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let db = TestDb::create("t", SEED).await;
    let platform = unique("tamper");
    let ns = unique("tamper-op");
    common::ensure_namespace(&client, &ns).await;
    common::put_secret(&client, &ns, "pg", &[("url", &db.url)]).await;
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform },
        "spec": {
            "database": {
                "adminUrlSecretRef": { "name": "pg", "key": "url" },
                "rolePrefix": db.role_prefix,
                "groupRole": db.group,
            },
            "verification": { "intervalSeconds": INTERVAL_SECONDS }
        }
    }))
    .expect("platform");
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    platforms
        .create(&PostParams::default(), &p)
        .await
        .expect("create platform");
    let op = Operator::start(&platform, &ns);
    let admin = db.admin().await;

    // The first pass governs the table; the listener is up.
    let baseline = common::wait_for("projects governed", Duration::from_secs(60), || {
        let admin = &admin;
        async move {
            state(admin, "projects")
                .await
                .filter(|s| s.0 && s.1 && s.2 == 1)
        }
    })
    .await;
    common::wait_for("drift listener", Duration::from_secs(30), || {
        let log = op.log();
        async move { log.contains("drift listener connected").then_some(()) }
    })
    .await;
    // Let the first pass (and the notifications of its own DDL) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let policy: String = admin
        .query_one(
            "SELECT polname::text FROM pg_policy WHERE polrelid = 'public.projects'::regclass",
            &[],
        )
        .await
        .expect("policy")
        .get(0);
    let pol = quote(&policy);

    let changes: Vec<(&str, String, &str)> = vec![
        (
            "RLS disabled",
            "ALTER TABLE public.projects DISABLE ROW LEVEL SECURITY".into(),
            "projects",
        ),
        (
            "FORCE dropped",
            "ALTER TABLE public.projects NO FORCE ROW LEVEL SECURITY".into(),
            "projects",
        ),
        (
            "policy dropped",
            format!("DROP POLICY {pol} ON public.projects"),
            "projects",
        ),
        (
            "policy replaced by USING (true)",
            format!(
                "DROP POLICY {pol} ON public.projects; CREATE POLICY {pol} ON public.projects USING (true)"
            ),
            "projects",
        ),
        (
            "new unprotected table with org_id",
            "CREATE TABLE public.drift_new (id bigserial PRIMARY KEY, org_id text NOT NULL)".into(),
            "drift_new",
        ),
    ];
    let mut rows = Vec::new();
    for (what, sql, table) in &changes {
        settle(&op).await;
        let before = notified(&op);
        let started = Instant::now();
        admin.batch_execute(sql).await.expect(what);
        let mut detected = None;
        let repaired = loop {
            let elapsed = started.elapsed();
            if detected.is_none() && notified(&op) > before {
                detected = Some(elapsed);
            }
            let now = state(&admin, table).await;
            let ok = match (*table, &now) {
                ("projects", Some(s)) => *s == baseline,
                (_, Some(s)) => s.0 && s.1 && s.2 == 1 && !s.3.is_empty() && s.3 != "true",
                _ => false,
            };
            if ok {
                break elapsed;
            }
            assert!(
                elapsed < BOUND,
                "{what}: not repaired within {BOUND:?} (state {now:?}, baseline {baseline:?})\n{}",
                op.log()
            );
            tokio::time::sleep(POLL).await;
        };
        let detected = detected.unwrap_or(repaired);
        println!(
            "| {what} | {} ms | {} ms |",
            detected.as_millis(),
            repaired.as_millis()
        );
        rows.push((what, detected, repaired));
    }
    // The listening connection ended by someone else: the listener reconnects (with a pass of
    // its own) and the next change is repaired as fast as before.
    let ended: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query = $1",
            &[&"LISTEN \"bulkhead_drift\""],
        )
        .await
        .expect("end the listener")
        .get(0);
    assert_eq!(ended, 1, "one listening connection");
    common::wait_for(
        "drift listener reconnected",
        Duration::from_secs(15),
        || {
            let n = op.log().matches("drift listener connected").count();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;
    settle(&op).await;
    let what = "RLS disabled, after the listener reconnected";
    let before = notified(&op);
    let started = Instant::now();
    admin
        .batch_execute("ALTER TABLE public.projects DISABLE ROW LEVEL SECURITY")
        .await
        .expect(what);
    let mut detected = None;
    let repaired = loop {
        let elapsed = started.elapsed();
        if detected.is_none() && notified(&op) > before {
            detected = Some(elapsed);
        }
        if state(&admin, "projects").await.as_ref() == Some(&baseline) {
            break elapsed;
        }
        assert!(
            elapsed < BOUND,
            "{what}: not repaired within {BOUND:?}\n{}",
            op.log()
        );
        tokio::time::sleep(POLL).await;
    };
    rows.push((&what, detected.unwrap_or(repaired), repaired));

    println!("| change | detected | repaired |");
    println!("|---|---|---|");
    for (what, d, r) in &rows {
        println!("| {what} | {} ms | {} ms |", d.as_millis(), r.as_millis());
    }

    drop(op);
    drop(admin);
    let _ = platforms.delete(&platform, &DeleteParams::default()).await;
    db.finish().await;
}
