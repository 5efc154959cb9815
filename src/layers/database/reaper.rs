//! The lock-hold bound. Any role with UPDATE or DELETE on a table may `LOCK TABLE ... IN ACCESS
//! EXCLUSIVE MODE`, and PostgreSQL before 17 has no `transaction_timeout`: a tenant that keeps
//! its transaction busy (statements under its statement timeout) would block every other
//! organization's queries on that table for as long as it likes. Every second, the reaper ends
//! the session of any tenant role whose transaction, older than the bound, holds a lock stronger
//! than ROW EXCLUSIVE on a relation of a governed schema or of the operator's schema.

use std::time::Duration;

use tokio_postgres::{Client, Config};

use super::settings::Settings;

/// How often the reaper looks.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Lock modes that block other organizations' reads or writes (or the operator's DDL) beyond
/// what ordinary row-level work needs.
pub const STRONG_MODES: [&str; 5] = [
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

/// Ends the sessions and returns (role, relation, mode) of each lock that was over the bound.
/// `$1` schemas, `$2` group role, `$3` lock modes, `$4` bound in seconds. The transaction's start
/// stands in for the lock's: a lock is never older than its transaction.
pub(crate) const REAP_SQL: &str = r#"
SELECT a.usename::pg_catalog.text, n.nspname::pg_catalog.text, c.relname::pg_catalog.text,
       l.mode, pg_catalog.pg_terminate_backend(a.pid)
FROM pg_catalog.pg_locks l
JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) l.relation
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $2::pg_catalog.name
WHERE l.locktype OPERATOR(pg_catalog.=) 'relation'::pg_catalog.text AND l.granted
  AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                         WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
  AND l.mode OPERATOR(pg_catalog.=) ANY ($3::pg_catalog.text[])
  AND n.nspname OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.name[])
  AND a.usesysid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT m.member FROM pg_catalog.pg_auth_members m
                                                   WHERE m.roleid OPERATOR(pg_catalog.=) g.oid))
  AND a.xact_start OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp()
      OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $4::pg_catalog.float8))
"#;

/// One lock the reaper ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub role: String,
    pub relation: String,
    pub mode: String,
}

/// What the reaper watches, from the settings.
#[derive(Clone, Debug)]
pub struct Watch {
    pub schemas: Vec<String>,
    pub group: String,
    pub bound: Duration,
}

impl Watch {
    pub fn from_settings(s: &Settings) -> Self {
        let mut schemas = s.schema_names();
        schemas.push(s.operator_schema.as_str().to_owned());
        Self {
            schemas,
            group: s.group_role.as_str().to_owned(),
            bound: Duration::from_millis(s.limits.lock_hold_ms),
        }
    }
}

/// One look: ends every session over the bound.
pub async fn reap_once(client: &Client, w: &Watch) -> Result<Vec<Reaped>, tokio_postgres::Error> {
    let modes: Vec<&str> = STRONG_MODES.to_vec();
    let rows = client
        .query(
            REAP_SQL,
            &[&w.schemas, &w.group, &modes, &w.bound.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Reaped {
            role: r.get(0),
            relation: format!("{}.{}", r.get::<_, String>(1), r.get::<_, String>(2)),
            mode: r.get(3),
        })
        .collect())
}

/// Starts the reaper on a connection of its own (never one of the pool's, so a busy pool cannot
/// delay it). It reconnects after an error and stops when the handle is aborted.
pub fn spawn(
    config: Config,
    connector: super::Connector,
    s: &Settings,
) -> tokio::task::AbortHandle {
    let watch = Watch::from_settings(s);
    tokio::spawn(async move {
        let mut client: Option<Client> = None;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if client.as_ref().is_none_or(Client::is_closed) {
                client = match connector.connect(&config).await {
                    Ok((c, _task)) => Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "lock reaper cannot connect");
                        None
                    }
                };
            }
            let Some(c) = client.as_ref() else { continue };
            match reap_once(c, &watch).await {
                Ok(reaped) => {
                    for r in reaped {
                        tracing::warn!(
                            role = %r.role, relation = %r.relation, mode = %r.mode,
                            bound_seconds = watch.bound.as_secs_f64(),
                            "ended a tenant session holding a table lock past the bound"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %super::describe(&e), "lock reaper query failed");
                    client = None;
                }
            }
        }
    })
    .abort_handle()
}
