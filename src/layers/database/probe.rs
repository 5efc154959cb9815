//! Cross-tenant probes, run over a connection logged in as the organization's own role. Every
//! attempt runs inside one transaction that is always rolled back, so a probe that succeeds
//! against broken isolation still changes nothing.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

use super::catalog::TableState;
use super::ident::quote_ident;
use super::settings::{JWT_CLAIMS_SETTING, Settings};
use crate::layers::Probe;

/// The vector every embeddings canary carries, and the probe searches for.
pub const CANARY_VECTOR: [f64; 3] = [0.25, 0.5, 0.75];

/// Whom the probes attack, prepared by the admin side.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// The organization probing.
    pub org: String,
    /// The organization's login role.
    pub role: String,
    /// Peer organizations whose canaries are attacked (sentinel first).
    pub peers: Vec<String>,
    /// Roles the organization must not be able to become: peers' roles and table owners.
    pub foreign_roles: Vec<String>,
    /// Governed tables.
    pub tables: Vec<TableState>,
    /// Governed tables in which the organization has rows (seen by the admin).
    pub own_rows_in: Vec<String>,
}

fn tref(t: &TableState) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

fn what(e: &tokio_postgres::Error) -> String {
    super::describe(e)
}

fn is_rls_violation(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &SqlState::INSUFFICIENT_PRIVILEGE && d.message().contains("row-level security")
    })
}

fn is_denied(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Runs `sql` in a savepoint that is always rolled back; returns the affected row count.
async fn attempt(
    tx: &mut Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let sp = tx.savepoint("bulkhead_probe").await?;
    let out = sp.execute(sql, params).await;
    sp.rollback().await?;
    out
}

/// Rows of other organizations (not shared on purpose) that the session can see in `t`.
fn foreign_rows_sql(s: &Settings, t: &TableState, of: &str) -> String {
    let shared = s
        .shared_read(&t.name)
        .map(|sr| {
            format!(
                " AND {} IS DISTINCT FROM {}",
                sr.column,
                super::ident::quote_literal(&sr.value)
            )
        })
        .unwrap_or_default();
    format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} WHERE ({} {of}){shared} LIMIT 100) x",
        tref(t),
        s.tenant_column
    )
}

/// Runs every probe. The transaction is rolled back whatever happens.
pub async fn run(client: &mut Client, s: &Settings, tg: &Targets) -> Vec<Probe> {
    let mut probes = Vec::new();
    let mut tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            probes.push(Probe::new(format!("begin as {}", tg.role), false, what(&e)));
            return probes;
        }
    };
    if let Err(e) = run_in(&mut tx, s, tg, &mut probes).await {
        probes.push(Probe::new(
            format!("probe session as {}", tg.role),
            false,
            what(&e),
        ));
    }
    let _ = tx.rollback().await;
    probes
}

async fn run_in(
    tx: &mut Transaction<'_>,
    s: &Settings,
    tg: &Targets,
    probes: &mut Vec<Probe>,
) -> Result<(), tokio_postgres::Error> {
    let me = &tg.org;
    let col = &s.tenant_column;

    let identity: Option<String> = tx
        .query_one(&format!("SELECT {}()", s.identity_function), &[])
        .await?
        .get(0);
    probes.push(Probe::new(
        format!("identity of {}", tg.role),
        identity.as_deref() == Some(me.as_str()),
        format!("{}() returns {:?}", s.identity_function.plain(), identity),
    ));

    for t in &tg.tables {
        let name = t.qualified();
        let n: i64 = tx
            .query_one(&foreign_rows_sql(s, t, "IS DISTINCT FROM $1"), &[me])
            .await?
            .get(0);
        probes.push(Probe::new(
            format!("read other organizations' rows in {name}"),
            n == 0,
            if n == 0 {
                "0 rows visible".to_owned()
            } else {
                format!("{n} foreign row(s) visible")
            },
        ));
        if tg.own_rows_in.contains(&name) {
            let seen: bool = tx
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {} WHERE {col} = $1)", tref(t)),
                    &[me],
                )
                .await?
                .get(0);
            probes.push(Probe::new(
                format!("read own rows in {name}"),
                seen,
                if seen {
                    "own rows visible".to_owned()
                } else {
                    "own rows exist but are not visible".to_owned()
                },
            ));
        }

        // Own insert through the column default first: proves own writes work and that the
        // default stamps the caller's org; tables with further required columns are skipped.
        let sp = tx.savepoint("bulkhead_own_insert").await?;
        let own = sp
            .query_opt(
                &format!(
                    "INSERT INTO {} DEFAULT VALUES RETURNING {col}::text",
                    tref(t)
                ),
                &[],
            )
            .await;
        sp.rollback().await?;
        let insertable = match own {
            Ok(row) => {
                let stamped: Option<String> = row.and_then(|r| r.get(0));
                probes.push(Probe::new(
                    format!("insert own row into {name}"),
                    stamped.as_deref() == Some(me.as_str()),
                    format!("stamped with {stamped:?}"),
                ));
                true
            }
            Err(e) if is_rls_violation(&e) => {
                probes.push(Probe::new(
                    format!("insert own row into {name}"),
                    false,
                    what(&e),
                ));
                true
            }
            Err(_) => false,
        };

        for peer in &tg.peers {
            if insertable {
                let sql = format!("INSERT INTO {} ({col}) VALUES ($1)", tref(t));
                let (passed, detail) = match attempt(tx, &sql, &[peer]).await {
                    Ok(_) => (false, "row inserted (rolled back)".to_owned()),
                    Err(e) if is_rls_violation(&e) => {
                        (true, "refused by row-level security".to_owned())
                    }
                    Err(e) => (false, format!("inconclusive: {}", what(&e))),
                };
                probes.push(Probe::new(
                    format!("insert into {name} as {peer}"),
                    passed,
                    detail,
                ));
            }
            let pick = format!(
                "ARRAY(SELECT ctid FROM {} WHERE {col} = $1 LIMIT 1)",
                tref(t)
            );
            for (verb, sql) in [
                (
                    "update",
                    format!(
                        "UPDATE {} SET {col} = {col} WHERE ctid = ANY({pick})",
                        tref(t)
                    ),
                ),
                (
                    "delete",
                    format!("DELETE FROM {} WHERE ctid = ANY({pick})", tref(t)),
                ),
            ] {
                let (passed, detail) = match attempt(tx, &sql, &[peer]).await {
                    Ok(0) => (true, "0 rows affected".to_owned()),
                    Ok(n) => (false, format!("{n} row(s) affected (rolled back)")),
                    Err(e) if is_denied(&e) => (true, "refused".to_owned()),
                    Err(e) => (false, format!("inconclusive: {}", what(&e))),
                };
                probes.push(Probe::new(
                    format!("{verb} {peer}'s rows in {name}"),
                    passed,
                    detail,
                ));
            }
        }

        for (verb, sql) in [
            (
                "disable row-level security on",
                format!("ALTER TABLE {} DISABLE ROW LEVEL SECURITY", tref(t)),
            ),
            (
                "drop the policy of",
                format!(
                    "DROP POLICY {} ON {}",
                    quote_ident(super::settings::POLICY),
                    tref(t)
                ),
            ),
        ] {
            let (passed, detail) = match attempt(tx, &sql, &[]).await {
                Ok(_) => (false, "allowed (rolled back)".to_owned()),
                Err(e) if is_denied(&e) => (true, "denied".to_owned()),
                Err(e) => (false, format!("inconclusive: {}", what(&e))),
            };
            probes.push(Probe::new(format!("{verb} {name}"), passed, detail));
        }
    }

    for role in &tg.foreign_roles {
        let sql = format!("SET ROLE {}", quote_ident(role));
        let (passed, detail) = match attempt(tx, &sql, &[]).await {
            Ok(_) => (false, "allowed".to_owned()),
            Err(e) if is_denied(&e) => (true, "denied".to_owned()),
            Err(e) => (false, format!("inconclusive: {}", what(&e))),
        };
        probes.push(Probe::new(format!("set role {role}"), passed, detail));
    }

    // Membership lets a tenant become the group (PostgreSQL 15): the group must see nothing.
    {
        let sp = tx.savepoint("bulkhead_group").await?;
        let entered = sp
            .batch_execute(&format!("SET LOCAL ROLE {}", s.group_role))
            .await;
        let mut seen = 0i64;
        let mut detail = String::new();
        match entered {
            Ok(()) => {
                for t in &tg.tables {
                    let n: i64 = sp
                        .query_one(&foreign_rows_sql(s, t, "IS NOT NULL OR TRUE"), &[])
                        .await?
                        .get(0);
                    if n > 0 {
                        detail.push_str(&format!("{n} row(s) in {}; ", t.qualified()));
                    }
                    seen += n;
                }
            }
            Err(e) => detail = format!("could not become the group: {}", what(&e)),
        }
        sp.rollback().await?;
        probes.push(Probe::new(
            format!("read rows as the group role {}", s.group_role.as_str()),
            seen == 0,
            if seen == 0 {
                "no organization's rows visible".to_owned()
            } else {
                detail.trim_end_matches("; ").to_owned()
            },
        ));
    }

    // The identity settings name another organization: a tenant login role must stay pinned.
    for peer in &tg.peers {
        let sp = tx.savepoint("bulkhead_spoof").await?;
        let claims = serde_json::json!({ s.jwt_claim.clone(): peer }).to_string();
        sp.query(
            "SELECT pg_catalog.set_config($1, $2, true), pg_catalog.set_config($3, $4, true)",
            &[&s.setting_name, peer, &JWT_CLAIMS_SETTING, &claims],
        )
        .await?;
        let mut seen = 0i64;
        for t in &tg.tables {
            let n: i64 = sp
                .query_one(&foreign_rows_sql(s, t, "= $1"), &[peer])
                .await?
                .get(0);
            seen += n;
        }
        sp.rollback().await?;
        probes.push(Probe::new(
            format!("spoof the identity setting as {peer}"),
            seen == 0,
            if seen == 0 {
                "visibility unchanged".to_owned()
            } else {
                format!("{seen} row(s) of {peer} visible")
            },
        ));
    }

    if let Some(t) = tg.tables.iter().find(|t| {
        t.name == s.embeddings_table.as_str() && t.has_column(s.embedding_column.as_str())
    }) {
        let sql = format!(
            "SELECT {col}::text FROM {tbl} e ORDER BY (SELECT sum((u.a - u.b) * (u.a - u.b)) \
             FROM unnest(e.{vec}::float8[], $1::float8[]) AS u(a, b)) NULLS LAST LIMIT 20",
            tbl = tref(t),
            vec = s.embedding_column
        );
        let v: Vec<f64> = CANARY_VECTOR.to_vec();
        let rows = tx.query(&sql, &[&v]).await?;
        let foreign: Vec<String> = rows
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .filter(|o| o != me)
            .collect();
        probes.push(Probe::new(
            format!("similarity search over {}", t.qualified()),
            foreign.is_empty(),
            if foreign.is_empty() {
                format!("{} nearest row(s), all own", rows.len())
            } else {
                format!(
                    "{} of the nearest rows belong to other organizations",
                    foreign.len()
                )
            },
        ));
    }
    Ok(())
}
