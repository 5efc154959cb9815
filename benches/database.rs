//! Database benchmark: `cargo bench --bench database` against the testbed's PostgreSQL.
//!
//! 1. Provisions 1,000 organizations through the layer and measures the time and the catalog
//!    growth (roles, mapping rows, the table's ACL and policies).
//! 2. Loads 1,000,000 rows spread over those organizations and compares, in one run, queries
//!    through the generated policy (tenant role, no WHERE) with hand-written `WHERE org_id = $1`
//!    (admin, RLS bypassed): point lookup, 50-row page, sequential-scan aggregate (over an
//!    unindexed copy, `docs_scan`). Then the same with the previous form of the policy
//!    (`org_id = (SELECT auth.org_id())`, the PL/pgSQL function, not inlined) and with the naive
//!    policy `org_id = auth.org_id()` (unwrapped), restored afterwards.
//!
//! Every loop is bounded in count and time; all traffic goes to the testbed on 127.0.0.1.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::DatabasePlatform;
use bulkhead::layers::database::{DatabaseLayer, KEY_URL};
use bulkhead::layers::{Credentials, Layer, Tenant};
use bulkhead::tenant::OrgId;
use tokio_postgres::{Client, NoTls};

const ORGS: usize = 1_000;
const ROWS: i64 = 1_000_000;
const CONCURRENCY: usize = 4;

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

fn with_db(url: &str, db: &str) -> String {
    let (server, _) = url.rsplit_once('/').expect("admin URL has a database path");
    format!("{server}/{db}")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn tenant(org: OrgId) -> Tenant {
    Tenant {
        name: org.as_str().to_owned(),
        namespace: format!("org-{org}"),
        display_name: format!("Bench {org}"),
        deletion_policy: DeletionPolicy::Delete,
        rotate: false,
        peers: vec![OrgId::sentinel()],
        owner: Default::default(),
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
        org_id: org,
    }
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// One form of a query: who runs it, and how.
struct Side<'a> {
    client: &'a Client,
    sql: &'a str,
    params: Params<'a>,
}

/// Runs `base` and `rls` alternately `n` times (or until `budget` is spent) and returns the
/// medians of each.
async fn compare(
    n: usize,
    budget: Duration,
    base: Side<'_>,
    rls: Side<'_>,
) -> (Duration, Duration, usize) {
    let bs = base
        .client
        .prepare(base.sql)
        .await
        .expect("prepare baseline");
    let rs = rls.client.prepare(rls.sql).await.expect("prepare rls");
    // Warm both plans and caches (once: a naive seq-scan takes seconds).
    {
        let a = base.client.query(&bs, base.params).await.expect("baseline");
        let b = rls.client.query(&rs, rls.params).await.expect("rls");
        assert_eq!(
            a.len(),
            b.len(),
            "both forms return the same rows:\n{}\n{}",
            base.sql,
            rls.sql
        );
    }
    let (mut tb, mut tr) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let start = Instant::now();
    for round in 0..n {
        // Alternate which side goes first, so neither always runs right after the other.
        for side in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if side == 0 {
                base.client.query(&bs, base.params).await.expect("baseline");
                tb.push(t.elapsed());
            } else {
                rls.client.query(&rs, rls.params).await.expect("rls");
                tr.push(t.elapsed());
            }
        }
        if start.elapsed() > budget {
            break;
        }
    }
    let count = tb.len();
    (median(tb), median(tr), count)
}

struct Row {
    name: &'static str,
    base: Duration,
    rls: Duration,
    iterations: usize,
}

async fn measure(admin: &Client, tenant_db: &Client, org: &str, ids: &[i64]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut tb = Vec::new();
    let mut tr = Vec::new();
    let mut n = 0;
    let start = Instant::now();
    let bs = admin
        .prepare("SELECT id, org_id, amount, body FROM docs WHERE id = $1 AND org_id = $2")
        .await
        .unwrap();
    let rs = tenant_db
        .prepare("SELECT id, org_id, amount, body FROM docs WHERE id = $1")
        .await
        .unwrap();
    for round in 0..3000 {
        let id = ids[round % ids.len()];
        let (mut a, mut b) = (0, 0);
        for side in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if side == 0 {
                a = admin.query(&bs, &[&id, &org]).await.unwrap().len();
                tb.push(t.elapsed());
            } else {
                b = tenant_db.query(&rs, &[&id]).await.unwrap().len();
                tr.push(t.elapsed());
            }
        }
        assert_eq!((a, b), (1, 1));
        n += 1;
        if start.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    out.push(Row {
        name: "point lookup",
        base: median(tb),
        rls: median(tr),
        iterations: n,
    });

    let (b, r, n) = compare(
        1500,
        Duration::from_secs(20),
        Side {
            client: admin,
            sql: "SELECT id, created_at, amount FROM docs WHERE org_id = $1 ORDER BY created_at DESC LIMIT 50",
            params: &[&org],
        },
        Side { client: tenant_db, sql: "SELECT id, created_at, amount FROM docs ORDER BY created_at DESC LIMIT 50", params: &[] },
    )
    .await;
    out.push(Row {
        name: "50-row page",
        base: b,
        rls: r,
        iterations: n,
    });

    // `docs_scan` holds the same rows without an index, so both forms scan it sequentially;
    // session-wide enable_* switches would also slow the identity function's own lookup.
    let serial = "SET max_parallel_workers_per_gather = 0";
    let undo = "RESET max_parallel_workers_per_gather";
    admin.batch_execute(serial).await.unwrap();
    tenant_db.batch_execute(serial).await.unwrap();
    let (b, r, n) = compare(
        15,
        Duration::from_secs(45),
        Side {
            client: admin,
            sql: "SELECT count(*), sum(amount) FROM docs_scan WHERE org_id = $1",
            params: &[&org],
        },
        Side {
            client: tenant_db,
            sql: "SELECT count(*), sum(amount) FROM docs_scan",
            params: &[],
        },
    )
    .await;
    admin.batch_execute(undo).await.unwrap();
    tenant_db.batch_execute(undo).await.unwrap();
    out.push(Row {
        name: "seq-scan aggregate",
        base: b,
        rls: r,
        iterations: n,
    });
    out
}

fn print(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<20} {:>14} {:>14} {:>11} {:>8} {:>6}",
        "query", "WHERE org_id", "through RLS", "overhead", "ratio", "runs"
    );
    for r in rows {
        let (b, x) = (r.base.as_secs_f64() * 1e6, r.rls.as_secs_f64() * 1e6);
        println!(
            "{:<20} {:>11.1} µs {:>11.1} µs {:>+8.1} µs {:>7.3}× {:>6}",
            r.name,
            b,
            x,
            x - b,
            x / b,
            r.iterations
        );
    }
}

async fn catalog_counts(admin: &Client, prefix: &str) -> (i64, i64, i32, i64) {
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)),
                    (SELECT count(*) FROM bulkhead.tenant_roles),
                    (SELECT pg_column_size(relacl) FROM pg_class WHERE oid = 'public.docs'::regclass),
                    (SELECT count(*) FROM pg_policy WHERE polrelid = 'public.docs'::regclass)",
            &[&prefix],
        )
        .await
        .expect("catalog counts");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

async fn run(tag: &str) {
    let tb = common::Testbed::get();
    let server_url = tb.pg_admin_url().to_owned();
    let dbname = format!("bh_bench_{tag}");
    let server = connect(&server_url).await;
    server
        .batch_execute(&format!("CREATE DATABASE \"{dbname}\""))
        .await
        .expect("create database");
    let url = with_db(&server_url, &dbname);
    let admin = connect(&url).await;
    let prefix = format!("bhb{tag}_");
    let group = format!("bhbg{tag}");

    let t = Instant::now();
    admin
        .batch_execute(&format!(
            "CREATE TABLE docs (id bigserial PRIMARY KEY, org_id text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
                                amount int NOT NULL DEFAULT 0, body text);
             INSERT INTO docs (org_id, created_at, amount, body)
               SELECT 'b{tag}-' || (g % {ORGS}), now() - g * interval '1 second', g % 100, 'payload ' || g
               FROM generate_series(1, {ROWS}) g;
             CREATE INDEX docs_org_created ON docs (org_id, created_at);
             CREATE TABLE docs_scan AS SELECT * FROM docs;"
        ))
        .await
        .expect("load rows");
    admin
        .batch_execute("VACUUM ANALYZE docs")
        .await
        .expect("vacuum");
    admin
        .batch_execute("VACUUM ANALYZE docs_scan")
        .await
        .expect("vacuum");
    println!(
        "loaded {ROWS} rows over {ORGS} organizations in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let spec: DatabasePlatform = serde_json::from_value(serde_json::json!({
        "adminUrlSecretRef": {"name": "pg", "key": "url"},
        "rolePrefix": prefix,
        "groupRole": group,
    }))
    .expect("spec");
    let layer = Arc::new(DatabaseLayer::connect(&spec, &url).await.expect("layer"));
    layer.prepare().await.expect("prepare");
    let before = catalog_counts(&admin, &prefix).await;

    // Provisioning: 1,000 organizations, CONCURRENCY at a time.
    let t = Instant::now();
    let orgs: Vec<OrgId> = (0..ORGS)
        .map(|i| OrgId::parse(&format!("b{}-{i}", tag.replace('_', "-"))).expect("org"))
        .collect();
    let mut creds = vec![Credentials::default(); ORGS];
    for chunk in (0..ORGS).collect::<Vec<_>>().chunks(CONCURRENCY) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let layer = layer.clone();
            let org = orgs[i].clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Credentials::default();
                layer.ensure(&tenant(org), &mut c).await.expect("ensure");
                (i, c)
            }));
        }
        for task in tasks {
            let (i, c) = task.await.expect("task");
            creds[i] = c;
        }
        if t.elapsed() > Duration::from_secs(240) {
            panic!("provisioning exceeded its time budget");
        }
    }
    let took = t.elapsed();
    let after = catalog_counts(&admin, &prefix).await;
    println!(
        "\nprovisioning {ORGS} organizations (concurrency {CONCURRENCY}): {:.1} s, {:.1} ms per organization",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / ORGS as f64
    );
    println!(
        "catalog growth: roles +{}, mapping rows +{}, docs ACL {} -> {} bytes, docs policies {} -> {}",
        after.0 - before.0,
        after.1 - before.1,
        before.2,
        after.2,
        before.3,
        after.3
    );

    // Queries as organization #7.
    let who = 7;
    let org = orgs[who].as_str().to_owned();
    let tenant_db = connect(creds[who].get(KEY_URL).expect("url")).await;
    let ids: Vec<i64> = admin
        .query(
            "SELECT id FROM docs WHERE org_id = $1 ORDER BY id LIMIT 500",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The generated form between two runs of the previous one, so that whatever the first
    // section pays (a cold cache after the load, autovacuum) cannot favour either form.
    let forms = [
        (
            "previous policy: org_id = (SELECT auth.org_id()) (PL/pgSQL, not inlined)",
            "(org_id = (SELECT auth.org_id()))",
        ),
        (
            "generated policy: org_id = (SELECT o FROM auth.org_id_rows() o) (inlined)",
            "(org_id = (SELECT o FROM auth.org_id_rows() o))",
        ),
        ("previous policy again", "(org_id = (SELECT auth.org_id()))"),
    ];
    for (label, expr) in forms {
        admin
            .batch_execute(&format!(
                "ALTER POLICY bulkhead_isolation ON docs USING {expr} WITH CHECK {expr};
                 ALTER POLICY bulkhead_isolation ON docs_scan USING {expr} WITH CHECK {expr}"
            ))
            .await
            .unwrap();
        let rows = measure(&admin, &tenant_db, &org, &ids).await;
        print(label, &rows);
    }

    admin
        .batch_execute(
            "ALTER POLICY bulkhead_isolation ON docs USING (org_id = auth.org_id()) WITH CHECK (org_id = auth.org_id());
             ALTER POLICY bulkhead_isolation ON docs_scan USING (org_id = auth.org_id()) WITH CHECK (org_id = auth.org_id())",
        )
        .await
        .unwrap();
    let naive = measure(&admin, &tenant_db, &org, &ids).await;
    print("naive policy: org_id = auth.org_id() (unwrapped)", &naive);
    let repairs = layer.prepare().await.expect("restore");
    println!(
        "\nprepare restored the generated policy: {:?}",
        repairs.iter().map(|r| &r.0).collect::<Vec<_>>()
    );

    drop(tenant_db);
    drop(admin);
    drop(layer);
    server
        .batch_execute(&format!("DROP DATABASE \"{dbname}\" WITH (FORCE)"))
        .await
        .expect("drop database");
    let roles: Vec<String> = server
        .query(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) OR rolname = $2",
            &[&prefix, &group],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for chunk in roles.chunks(200) {
        let list: Vec<String> = chunk
            .iter()
            .map(|r| format!("\"{}\"", r.replace('"', "\"\"")))
            .collect();
        server
            .batch_execute(&format!("DROP ROLE {}", list.join(", ")))
            .await
            .expect("drop roles");
    }
}

fn main() {
    let tag = format!("{}", std::process::id() % 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t = Instant::now();
    rt.block_on(run(&tag));
    println!("\ntotal {:.0} s", t.elapsed().as_secs_f64());
}
