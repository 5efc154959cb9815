//! Drift detected in seconds. Two event triggers (`ddl_command_end`, `sql_drop`) run one
//! plpgsql function of the operator's schema that `pg_notify`s [`CHANNEL`] whenever a command
//! touches a table or a policy of a governed schema (or drops a governed schema). One dedicated
//! connection per platform `LISTEN`s on the channel and reports each notification, so the
//! platform's pass (which repairs tables and policies) runs at once instead of at the next
//! verification interval.
//!
//! Role-level changes (`ALTER ROLE ... BYPASSRLS`, `GRANT role`) fire no event trigger: they
//! stay on the verification interval. Event triggers need a superuser; with a non-superuser
//! admin nothing is installed and every change waits for the interval.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::{Config, GenericClient};

use super::connect::Connector;

use super::ident::{quote_ident, quote_literal};
use super::settings::Settings;

/// The channel every notification goes to.
pub const CHANNEL: &str = "bulkhead_drift";
/// The trigger function, in the operator's schema.
pub const FUNCTION: &str = "drift_notify";
/// At most this many bytes of an object's identity go into a payload (PostgreSQL's limit is
/// 8000 bytes).
pub const MAX_PAYLOAD: usize = 1000;
/// Backoff of the listening connection after it dropped: first and longest wait.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The two event triggers, by (name, event). Event triggers are database-wide, so the names
/// carry the operator's schema (cut to fit 63 bytes) to keep two platforms on one database apart.
pub fn triggers(s: &Settings) -> [(String, &'static str); 2] {
    let mut schema = s.operator_schema.as_str().to_owned();
    let mut cut = 40.min(schema.len());
    while !schema.is_char_boundary(cut) {
        cut -= 1;
    }
    schema.truncate(cut);
    [
        (format!("bulkhead_drift_ddl_{schema}"), "ddl_command_end"),
        (format!("bulkhead_drift_drop_{schema}"), "sql_drop"),
    ]
}

/// The body of the trigger function: the governed schemas are the one literal in it.
pub fn function_body(s: &Settings) -> String {
    let governed = s
        .schemas
        .iter()
        .map(|g| quote_literal(g.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let channel = quote_literal(CHANNEL);
    format!(
        r#"
DECLARE
  governed pg_catalog.text[] := ARRAY[{governed}]::pg_catalog.text[];
  r record;
  nsp pg_catalog.text;
BEGIN
  IF TG_EVENT OPERATOR(pg_catalog.=) 'sql_drop' THEN
    FOR r IN SELECT d.object_type, d.schema_name, d.object_identity
             FROM pg_catalog.pg_event_trigger_dropped_objects() d
             WHERE d.object_type OPERATOR(pg_catalog.=) ANY (ARRAY['table', 'policy', 'schema']) LOOP
      nsp := CASE WHEN r.object_type OPERATOR(pg_catalog.=) 'schema'
                  THEN r.object_identity ELSE r.schema_name END;
      IF nsp OPERATOR(pg_catalog.=) ANY (governed) THEN
        PERFORM pg_catalog.pg_notify({channel},
          pg_catalog.left(TG_TAG OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) r.object_identity, {MAX_PAYLOAD}));
      END IF;
    END LOOP;
  ELSE
    FOR r IN SELECT c.object_type, c.schema_name, c.object_identity, c.objid, c.command_tag
             FROM pg_catalog.pg_event_trigger_ddl_commands() c
             WHERE c.object_type OPERATOR(pg_catalog.=) ANY (ARRAY['table', 'policy']) LOOP
      nsp := r.schema_name;
      IF r.object_type OPERATOR(pg_catalog.=) 'policy' THEN
        SELECT n.nspname INTO nsp
        FROM pg_catalog.pg_policy p
        JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) p.polrelid
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) t.relnamespace
        WHERE p.oid OPERATOR(pg_catalog.=) r.objid;
      END IF;
      IF nsp OPERATOR(pg_catalog.=) ANY (governed) THEN
        PERFORM pg_catalog.pg_notify({channel},
          pg_catalog.left(r.command_tag OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) r.object_identity, {MAX_PAYLOAD}));
      END IF;
    END LOOP;
  END IF;
END
"#
    )
}

/// `CREATE OR REPLACE FUNCTION` of the trigger function; the body is a quoted literal.
pub fn function_sql(s: &Settings) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS event_trigger LANGUAGE plpgsql \
         SET search_path = pg_catalog, pg_temp AS {}",
        s.operator_schema,
        quote_ident(FUNCTION),
        quote_literal(&function_body(s))
    )
}

/// What [`install`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Whether the triggers are in place (false: the admin is no superuser).
    pub active: bool,
    /// What had been changed behind the operator's back and was put back.
    pub repairs: Vec<String>,
}

/// Installs (or puts back) the function and both event triggers, idempotently: nothing is
/// written when they are in place, enabled and current.
pub async fn install(
    c: &impl GenericClient,
    s: &Settings,
) -> Result<Installed, tokio_postgres::Error> {
    let superuser: bool = c
        .query_one(
            "SELECT r.rolsuper FROM pg_catalog.pg_roles r \
             WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER",
            &[],
        )
        .await?
        .get(0);
    if !superuser {
        return Ok(Installed::default());
    }
    let mut out = Installed {
        active: true,
        repairs: Vec::new(),
    };
    let body = function_body(s);
    let find = "SELECT p.oid, p.prosrc FROM pg_catalog.pg_proc p \
                JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace \
                WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND p.proname OPERATOR(pg_catalog.=) $2 \
                  AND p.pronargs OPERATOR(pg_catalog.=) 0";
    let schema = s.operator_schema.as_str();
    let current = c.query_opt(find, &[&schema, &FUNCTION]).await?;
    let oid: u32 = match current {
        Some(row) if row.get::<_, String>(1) == body => row.get(0),
        other => {
            if other.is_some() {
                out.repairs.push(format!(
                    "drift trigger function {schema}.{FUNCTION} was changed; put back"
                ));
            }
            c.batch_execute(&function_sql(s)).await?;
            c.query_one(find, &[&schema, &FUNCTION]).await?.get(0)
        }
    };
    for (name, event) in triggers(s) {
        let row = c
            .query_opt(
                "SELECT e.evtenabled::pg_catalog.text, e.evtevent::pg_catalog.text, e.evtfoid \
                 FROM pg_catalog.pg_event_trigger e WHERE e.evtname OPERATOR(pg_catalog.=) $1",
                &[&name],
            )
            .await?;
        let create = format!(
            "CREATE EVENT TRIGGER {} ON {event} EXECUTE FUNCTION {}.{}()",
            quote_ident(&name),
            s.operator_schema,
            quote_ident(FUNCTION)
        );
        match row {
            None => c.batch_execute(&create).await?,
            Some(r) => {
                let (enabled, ev, foid): (String, String, u32) = (r.get(0), r.get(1), r.get(2));
                if enabled == "D" || ev != event || foid != oid {
                    c.batch_execute(&format!("DROP EVENT TRIGGER {}", quote_ident(&name)))
                        .await?;
                    c.batch_execute(&create).await?;
                    out.repairs.push(format!(
                        "event trigger {name} was disabled or changed; put back"
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Starts the listening connection of platform `platform`: every notification on [`CHANNEL`]
/// sends the platform's name to `tx`. After the connection dropped it reconnects with backoff
/// and sends the name once (changes made while nobody listened were missed). Stops when the
/// handle is aborted or `tx` is closed.
pub fn spawn_listener(
    config: Config,
    connector: Connector,
    platform: String,
    tx: UnboundedSender<String>,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut backoff = BACKOFF_FIRST;
        let mut first = true;
        loop {
            match listen_once(&config, &connector, &platform, &tx, first).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(platform = %platform, error = %e,
                        "drift listener lost its connection; reconnecting");
                }
            }
            first = false;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if tx.is_closed() {
                return;
            }
        }
    })
    .abort_handle()
}

/// One connection's life. `Ok` only when the receiver is gone.
async fn listen_once(
    config: &Config,
    connector: &Connector,
    platform: &str,
    tx: &UnboundedSender<String>,
    first: bool,
) -> Result<(), String> {
    let (client, mut msg_rx, driver) = connector.connect_notifying(config).await?;
    let listened = client
        .batch_execute(&format!("LISTEN {}", quote_ident(CHANNEL)))
        .await;
    if let Err(e) = listened {
        driver.abort();
        return Err(super::describe(&e));
    }
    tracing::info!(platform = %platform, channel = CHANNEL, "drift listener connected");
    if !first && tx.send(platform.to_owned()).is_err() {
        driver.abort();
        return Ok(());
    }
    let result = loop {
        match msg_rx.recv().await {
            Some(Ok(payload)) => {
                tracing::info!(platform = %platform, object = %payload, "database drift notified");
                if tx.send(platform.to_owned()).is_err() {
                    break Ok(());
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Err("connection closed".into()),
        }
    };
    driver.abort();
    drop(client);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::platform::DatabasePlatform;

    fn settings(schemas: &[&str]) -> Settings {
        let spec: DatabasePlatform = serde_json::from_value(serde_json::json!({
            "adminUrlSecretRef": {"name": "pg", "key": "url"},
            "schemas": schemas,
        }))
        .expect("spec");
        Settings::from_spec(&spec).expect("settings")
    }

    #[test]
    fn governed_schemas_are_quoted_literals_in_a_quoted_body() {
        let s = settings(&["app", "it's$$"]);
        let body = function_body(&s);
        assert!(body.contains("ARRAY['app', 'it''s$$']"), "{body}");
        let sql = function_sql(&s);
        assert!(sql.contains("AS '\nDECLARE"), "{sql}");
        assert!(sql.contains("'it''''s$$'"), "{sql}");
    }

    #[test]
    fn trigger_names_fit_an_identifier() {
        let s = settings(&["app"]);
        for (name, _) in triggers(&s) {
            assert!(name.len() <= 63, "{name}");
        }
    }
}
