//! Pure SQL plans: from the settings and a catalog snapshot to the statements that converge it.

use sha2::{Digest, Sha256};

use super::catalog::{Catalog, OWNER_COLUMN, PolicyState, RoleState, TableState};
use super::expr::{policy_check, policy_using, shared_read_using};
use super::ident::{quote_ident, quote_literal};
use super::settings::{JWT_CLAIMS_SETTING, POLICY, SHARED_READ_POLICY, Settings};
use crate::api::platform::IdentityMode;
use crate::layers::Repair;

/// Policy on the mapping table: a session sees only its own row.
pub const MAPPING_POLICY: &str = "bulkhead_own_mapping";

/// Statements for one step, and the drifts they repair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub statements: Vec<String>,
    pub repairs: Vec<Repair>,
    /// `CREATE INDEX CONCURRENTLY` statements, run outside the transaction.
    pub concurrent: Vec<String>,
}

impl Plan {
    fn push(&mut self, sql: String) {
        self.statements.push(sql);
    }
    fn extend(&mut self, sql: Vec<String>) {
        self.statements.extend(sql);
    }
    fn repair(&mut self, what: String) {
        self.repairs.push(Repair(what));
    }
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty() && self.concurrent.is_empty()
    }
}

/// The body of the identity function. Tenant login roles are pinned to their mapping in every
/// mode; members of the group without a mapping (the group itself) get NULL, so no rows. Only
/// other roles (a pooled application role) may name an organization by setting or JWT.
///
/// Every table, function, type and operator is schema-qualified (`OPERATOR(pg_catalog.=)`, no
/// `NULLIF`, which looks `=` up): the function needs no `SET search_path`, and the caller's
/// search_path (or a temporary object) cannot change what it returns.
pub fn identity_body(s: &Settings) -> String {
    format!("\nBEGIN\n  RETURN {};\nEND\n", identity_value(s))
}

/// The identity as one parenthesized expression, shared by the function and its twin.
fn identity_value(s: &Settings) -> String {
    let mapped = format!(
        "SELECT m.org_id FROM {} m WHERE m.role_name OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text",
        s.mapping
    );
    let fallback = match s.mode {
        IdentityMode::Role => return format!("({mapped})"),
        IdentityMode::Setting => format!(
            "(SELECT CASE WHEN c OPERATOR(pg_catalog.=) '' THEN NULL ELSE c END FROM pg_catalog.current_setting({}, true) c)",
            quote_literal(&s.setting_name)
        ),
        IdentityMode::Jwt => format!(
            "(SELECT CASE WHEN c OPERATOR(pg_catalog.=) '' THEN NULL ELSE c::pg_catalog.jsonb OPERATOR(pg_catalog.->>) {} END \
             FROM pg_catalog.current_setting({}, true) c)",
            quote_literal(&s.jwt_claim),
            quote_literal(JWT_CLAIMS_SETTING)
        ),
    };
    format!(
        "COALESCE(({mapped}), CASE WHEN pg_catalog.pg_has_role(CURRENT_USER, {}, 'MEMBER') THEN NULL ELSE {fallback} END)",
        quote_literal(s.group_role.as_str())
    )
}

/// The body of the identity's set-returning twin: one `SELECT` of the same value, so
/// PostgreSQL can inline it where a policy calls it in FROM. Same schema-qualification rules.
pub fn identity_rows_body(s: &Settings) -> String {
    format!("\nSELECT {}\n", identity_value(s))
}

/// `CREATE OR REPLACE FUNCTION` for the twin. Inlining needs exactly this shape: `LANGUAGE sql`,
/// a set result, not STRICT, not SECURITY DEFINER, no SET clause, not VOLATILE.
pub fn identity_rows_function_sql(s: &Settings) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}() RETURNS SETOF text LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER AS {}",
        s.identity_rows_function,
        dollar_quote(&identity_rows_body(s))
    )
}

/// Whether the stored twin is the planned one, in the shape PostgreSQL inlines.
pub fn rows_function_intact(f: &super::catalog::FunctionState, planned_body: &str) -> bool {
    f.body == planned_body
        && f.volatility == "s"
        && f.parallel == "s"
        && f.language == "sql"
        && f.result == "SETOF text"
        && !f.security_definer
        && f.config.is_empty()
}

/// `CREATE OR REPLACE FUNCTION` for the identity function. PL/pgSQL keeps the lookup's plan
/// for the session (a SQL function cannot be inlined with a FROM clause, so it is re-planned
/// at every query); no SET clause, whose save and restore of search_path costs at every call,
/// since the body is schema-qualified; PARALLEL SAFE keeps parallel scans available.
pub fn identity_function_sql(s: &Settings) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}() RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER AS {}",
        s.identity_function,
        dollar_quote(&identity_body(s))
    )
}

/// The `proconfig` entry of the identity function's earlier form (a pinned search_path);
/// the audit still accepts it as search_path-safe.
pub const IDENTITY_CONFIG: &str = "search_path=pg_catalog, pg_temp";

/// Dollar-quotes a body with a tag that does not occur in it.
pub fn dollar_quote(body: &str) -> String {
    let mut tag = "bulkhead".to_owned();
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    format!("${tag}${body}${tag}$")
}

fn table_ref(t: &TableState) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

/// Name of the index the operator creates on a table (hashed: table names may be long).
pub fn index_name(t: &TableState) -> String {
    let digest = hex::encode(Sha256::digest(t.qualified().as_bytes()));
    format!("bulkhead_org_idx_{}", &digest[..16])
}

/// The platform objects: schemas, group role, mapping table, identity function, registry.
pub fn bootstrap(s: &Settings, cat: &Catalog) -> Plan {
    let mut p = Plan::default();
    let g = &s.group_role;
    let mut schemas: Vec<&super::ident::Ident> =
        vec![&s.operator_schema, &s.identity_function.schema];
    schemas.extend(s.schemas.iter());
    let mut seen = std::collections::BTreeSet::new();
    for schema in schemas {
        if seen.insert(schema.as_str()) && !cat.schemas.contains(schema.as_str()) {
            p.push(format!("CREATE SCHEMA IF NOT EXISTS {schema}"));
        }
    }

    match &cat.group {
        None => p.push(format!(
            "CREATE ROLE {g} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION"
        )),
        Some(r) => {
            if r.superuser || r.bypass_rls || r.can_login || r.create_role || r.create_db {
                p.push(format!(
                    "ALTER ROLE {g} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                ));
                p.repair(format!(
                    "group role {} had LOGIN, SUPERUSER, BYPASSRLS or CREATE* attributes; removed",
                    g.as_str()
                ));
            }
            for m in &r.other_memberships {
                p.push(format!("REVOKE {} FROM {g}", quote_ident(m)));
                p.repair(format!(
                    "group role {} was a member of {m}; revoked",
                    g.as_str()
                ));
            }
        }
    }
    for schema in std::iter::once(&s.operator_schema)
        .chain([&s.identity_function.schema])
        .chain(s.schemas.iter())
    {
        if !cat.group_schema_usage.contains(schema.as_str()) {
            p.push(format!("GRANT USAGE ON SCHEMA {schema} TO {g}"));
        }
    }
    if cat.group_mapped {
        p.push(format!(
            "DELETE FROM {} WHERE role_name = {}",
            s.mapping,
            quote_literal(g.as_str())
        ));
        p.repair(format!(
            "group role {} was mapped to an organization; mapping removed",
            g.as_str()
        ));
    }

    for schema in &cat.public_schema_create {
        p.push(format!(
            "REVOKE CREATE ON SCHEMA {} FROM PUBLIC",
            quote_ident(schema)
        ));
        p.repair(format!("schema {schema}: revoked CREATE from PUBLIC"));
    }
    for schema in &cat.group_schema_create {
        p.push(format!(
            "REVOKE CREATE ON SCHEMA {} FROM {g}",
            quote_ident(schema)
        ));
        if !cat.public_schema_create.contains(schema) {
            p.repair(format!(
                "schema {schema}: revoked CREATE from group role {}",
                g.as_str()
            ));
        }
    }
    for (schema, role) in &cat.tenant_schema_create {
        if !cat.public_schema_create.contains(schema) && !cat.group_schema_create.contains(schema) {
            p.push(format!(
                "REVOKE CREATE ON SCHEMA {} FROM {}",
                quote_ident(schema),
                quote_ident(role)
            ));
            p.repair(format!(
                "schema {schema}: revoked CREATE from tenant role {role}"
            ));
        }
    }
    match &cat.locks {
        None => p.extend(locks_table(s)),
        Some(t) if t.group != Default::default() => {
            p.push(format!("REVOKE ALL ON {} FROM PUBLIC", s.locks));
            p.push(format!("REVOKE ALL ON {} FROM {g}", s.locks));
            p.repair(format!(
                "lock table {}: revoked tenant privileges",
                s.locks.plain()
            ));
        }
        Some(_) => {}
    }

    let mapping = &s.mapping;
    match &cat.mapping {
        None => {
            // The key is collated like `current_user` ("C"), or the lookup cannot use its index.
            p.push(format!(
                "CREATE TABLE IF NOT EXISTS {mapping} (role_name text COLLATE \"C\" PRIMARY KEY, org_id text NOT NULL UNIQUE, \
                 created_at timestamptz NOT NULL DEFAULT now(), {OWNER_COLUMN} text)"
            ));
            p.push(format!("ALTER TABLE {mapping} ENABLE ROW LEVEL SECURITY"));
            p.push(format!("ALTER TABLE {mapping} FORCE ROW LEVEL SECURITY"));
            p.push(format!(
                "CREATE POLICY {} ON {mapping} FOR SELECT USING (role_name = current_user::text)",
                quote_ident(MAPPING_POLICY)
            ));
            // Safe for PUBLIC: the policy shows each role only its own row; pooled roles need it.
            p.push(format!("GRANT SELECT ON {mapping} TO PUBLIC"));
        }
        Some(t) => {
            let mut fixed = Vec::new();
            if !t.has_column(OWNER_COLUMN) {
                // Rows from before owners were recorded keep NULL: only `adopt-from: legacy` takes them.
                p.push(format!(
                    "ALTER TABLE {mapping} ADD COLUMN IF NOT EXISTS {OWNER_COLUMN} text"
                ));
            }
            if !t.rls {
                p.push(format!("ALTER TABLE {mapping} ENABLE ROW LEVEL SECURITY"));
                fixed.push("enabled RLS");
            }
            if !t.force {
                p.push(format!("ALTER TABLE {mapping} FORCE ROW LEVEL SECURITY"));
                fixed.push("forced RLS");
            }
            let others: Vec<&PolicyState> = t
                .policies
                .iter()
                .filter(|x| x.name != MAPPING_POLICY)
                .collect();
            for x in others {
                p.push(format!("DROP POLICY {} ON {mapping}", quote_ident(&x.name)));
                fixed.push("dropped a foreign policy");
            }
            if t.policy(MAPPING_POLICY).is_none() {
                p.push(format!(
                    "CREATE POLICY {} ON {mapping} FOR SELECT USING (role_name = current_user::text)",
                    quote_ident(MAPPING_POLICY)
                ));
                fixed.push("restored its policy");
            }
            if t.group.insert
                || t.group.update
                || t.group.delete
                || t.group.truncate
                || t.group.trigger
                || t.group.references
            {
                p.push(format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON {mapping} FROM {g}"));
                p.push(format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON {mapping} FROM PUBLIC"));
                fixed.push("revoked tenant write privileges");
            }
            if !t.group.select {
                p.push(format!("GRANT SELECT ON {mapping} TO PUBLIC"));
            }
            if !fixed.is_empty() {
                p.repair(format!(
                    "role mapping {}: {}",
                    mapping.plain(),
                    fixed.join(", ")
                ));
            }
        }
    }

    let planned_body = identity_body(s);
    match &cat.function {
        None => p.push(identity_function_sql(s)),
        Some(f) => {
            let intact = f.body == planned_body
                && f.volatility == "s"
                && f.parallel == "s"
                && f.language == "plpgsql"
                && !f.security_definer
                && f.config.is_empty();
            if !intact {
                p.push(identity_function_sql(s));
                p.repair(format!(
                    "identity function {}() differed from the planned one; replaced",
                    s.identity_function.plain()
                ));
            }
            if cat.tenant_role_names().contains(f.owner.as_str()) || f.owner == g.as_str() {
                p.push(format!(
                    "ALTER FUNCTION {}() OWNER TO CURRENT_USER",
                    s.identity_function
                ));
                p.repair(format!(
                    "identity function was owned by tenant role {}; reassigned",
                    f.owner
                ));
            }
        }
    }

    let planned_rows = identity_rows_body(s);
    match &cat.rows_function {
        None => p.push(identity_rows_function_sql(s)),
        Some(f) => {
            if !rows_function_intact(f, &planned_rows) {
                p.push(identity_rows_function_sql(s));
                p.repair(format!(
                    "identity function {}() differed from the planned one; replaced",
                    s.identity_rows_function.plain()
                ));
            }
            if cat.tenant_role_names().contains(f.owner.as_str()) || f.owner == g.as_str() {
                p.push(format!(
                    "ALTER FUNCTION {}() OWNER TO CURRENT_USER",
                    s.identity_rows_function
                ));
                p.repair(format!(
                    "identity function {}() was owned by tenant role {}; reassigned",
                    s.identity_rows_function.plain(),
                    f.owner
                ));
            }
        }
    }

    let registry = &s.registry;
    let reg_policy = format!(
        "CREATE POLICY {} ON {registry} FOR SELECT USING (id = (SELECT {}()))",
        quote_ident(POLICY),
        s.identity_function
    );
    match &cat.registry {
        None => {
            p.push(format!(
                "CREATE TABLE IF NOT EXISTS {registry} (id text PRIMARY KEY, display_name text NOT NULL, \
                 created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())"
            ));
            p.push(format!("ALTER TABLE {registry} ENABLE ROW LEVEL SECURITY"));
            p.push(format!("ALTER TABLE {registry} FORCE ROW LEVEL SECURITY"));
            p.push(reg_policy);
            p.push(format!("GRANT SELECT ON {registry} TO {g}"));
        }
        Some(t) => {
            let mut fixed = Vec::new();
            if !t.rls {
                p.push(format!("ALTER TABLE {registry} ENABLE ROW LEVEL SECURITY"));
                fixed.push("enabled RLS");
            }
            if !t.force {
                p.push(format!("ALTER TABLE {registry} FORCE ROW LEVEL SECURITY"));
                fixed.push("forced RLS");
            }
            if t.policy(POLICY).is_none() {
                p.push(reg_policy);
                fixed.push("restored its policy");
            }
            for x in t
                .policies
                .iter()
                .filter(|x| x.name != POLICY && x.permissive && x.applies_to_tenants)
            {
                p.push(format!(
                    "DROP POLICY {} ON {registry}",
                    quote_ident(&x.name)
                ));
                fixed.push("dropped a widening policy");
            }
            if t.group.insert
                || t.group.update
                || t.group.delete
                || t.group.truncate
                || t.group.trigger
            {
                p.push(format!(
                    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON {registry} FROM {g}"
                ));
                fixed.push("revoked tenant write privileges");
            }
            if !t.group.select {
                p.push(format!("GRANT SELECT ON {registry} TO {g}"));
            }
            if !fixed.is_empty() {
                p.repair(format!(
                    "registry {}: {}",
                    registry.plain(),
                    fixed.join(", ")
                ));
            }
        }
    }
    p
}

/// The operator's lock table: one row per lock name, locked `FOR UPDATE` by the operator's
/// passes. No role but its owner has any privilege on it, so no tenant can take or hold one.
pub fn locks_table(s: &Settings) -> Vec<String> {
    vec![
        format!("CREATE SCHEMA IF NOT EXISTS {}", s.operator_schema),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (name text COLLATE \"C\" PRIMARY KEY)",
            s.locks
        ),
        format!("REVOKE ALL ON {} FROM PUBLIC", s.locks),
    ]
}

/// Whether the operator's policy on a table is exactly as planned.
pub fn policy_intact(
    policy: &PolicyState,
    using: &str,
    check: Option<&str>,
    command: &str,
) -> bool {
    policy.permissive
        && policy.command == command
        && policy.roles == ["public"]
        && policy.using.as_deref() == Some(using)
        && policy.check.as_deref() == check
}

/// Statements that bring one governed table to the planned state.
pub fn govern_table(s: &Settings, t: &TableState) -> Plan {
    let mut p = Plan::default();
    // The planned policy cannot be built here (tenant column not text, override column
    // missing): leave the table to the audit, so one odd table does not block the others.
    if t.expected.is_none() {
        return p;
    }
    let tbl = table_ref(t);
    let g = &s.group_role;
    let shared = s.shared_read(&t.name);
    let mut fixed: Vec<String> = Vec::new();
    if !t.rls {
        p.push(format!("ALTER TABLE {tbl} ENABLE ROW LEVEL SECURITY"));
        fixed.push("enabled RLS".into());
    }
    if !t.force {
        p.push(format!("ALTER TABLE {tbl} FORCE ROW LEVEL SECURITY"));
        fixed.push("forced RLS".into());
    }
    let create = format!(
        "CREATE POLICY {} ON {tbl} USING ({}) WITH CHECK ({})",
        quote_ident(POLICY),
        policy_using(s),
        policy_check(s, shared)
    );
    match (t.policy(POLICY), &t.expected) {
        (None, _) => {
            p.push(create);
            fixed.push("created the isolation policy".into());
        }
        (Some(pol), Some(exp)) if !policy_intact(pol, &exp.using, Some(&exp.check), "*") => {
            p.push(format!("DROP POLICY {} ON {tbl}", quote_ident(POLICY)));
            p.push(create);
            fixed.push("restored the altered isolation policy".into());
        }
        _ => {}
    }
    if let Some(sr) = shared {
        let create_shared = format!(
            "CREATE POLICY {} ON {tbl} FOR SELECT USING ({})",
            quote_ident(SHARED_READ_POLICY),
            shared_read_using(sr)
        );
        match (
            t.policy(SHARED_READ_POLICY),
            t.expected.as_ref().and_then(|e| e.shared_using.as_deref()),
        ) {
            (None, _) => {
                p.push(create_shared);
                fixed.push("created the shared-read policy".into());
            }
            (Some(pol), Some(exp)) if !policy_intact(pol, exp, None, "r") => {
                p.push(format!(
                    "DROP POLICY {} ON {tbl}",
                    quote_ident(SHARED_READ_POLICY)
                ));
                p.push(create_shared);
                fixed.push("restored the altered shared-read policy".into());
            }
            _ => {}
        }
    }
    for x in &t.policies {
        let ours = x.name == POLICY || (shared.is_some() && x.name == SHARED_READ_POLICY);
        if !ours && x.permissive && x.applies_to_tenants {
            p.push(format!("DROP POLICY {} ON {tbl}", quote_ident(&x.name)));
            fixed.push(format!("dropped widening policy {}", x.name));
        }
    }
    if let Some(exp) = &t.expected
        && t.tenant_default.as_deref() != Some(exp.default.as_str())
    {
        p.push(format!(
            "ALTER TABLE {tbl} ALTER COLUMN {} SET DEFAULT {}()",
            s.tenant_column, s.identity_function
        ));
        fixed.push("set the tenant column's default".into());
    }
    if !(t.group.select && t.group.insert && t.group.update && t.group.delete) {
        p.push(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {tbl} TO {g}"
        ));
    }
    for (schema, seq) in &t.sequences_without_usage {
        p.push(format!(
            "GRANT USAGE ON SEQUENCE {}.{} TO {g}",
            quote_ident(schema),
            quote_ident(seq)
        ));
    }
    if t.group.truncate || t.group.trigger || t.group.references {
        p.push(format!(
            "REVOKE TRUNCATE, TRIGGER, REFERENCES ON {tbl} FROM {g}"
        ));
        p.push(format!(
            "REVOKE TRUNCATE, TRIGGER, REFERENCES ON {tbl} FROM PUBLIC"
        ));
        fixed.push("revoked TRUNCATE/TRIGGER/REFERENCES from tenants".into());
    }
    if !t.indexed && s.create_indexes && t.kind == "r" {
        // An earlier build that gave up (a lock timeout) leaves an invalid index of this name,
        // which IF NOT EXISTS would keep forever; no valid one exists, or `indexed` would be set.
        p.concurrent.push(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
            quote_ident(&t.schema),
            quote_ident(&index_name(t))
        ));
        p.concurrent.push(format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {tbl} ({})",
            quote_ident(&index_name(t)),
            s.tenant_column
        ));
    }
    if !fixed.is_empty() {
        p.repair(format!("table {}: {}", t.qualified(), fixed.join(", ")));
    }
    p
}

/// Statements for every governed table of the snapshot.
pub fn govern_tables(s: &Settings, cat: &Catalog) -> Plan {
    let mut all = Plan::default();
    for t in cat.tenant_tables() {
        let p = govern_table(s, t);
        all.statements.extend(p.statements);
        all.repairs.extend(p.repairs);
        all.concurrent.extend(p.concurrent);
    }
    all
}

/// Statements for an organization's login role. `verifier` is a SCRAM verifier to store as the
/// password (never the plaintext); None keeps the current one. The role carries the platform's
/// bounds (timeouts, connection limit) for a server of `server_version`; every value is an
/// integer validated by the settings.
pub fn tenant_role(
    s: &Settings,
    role: &str,
    existing: Option<&RoleState>,
    verifier: Option<&str>,
    server_version: i32,
) -> Plan {
    let mut p = Plan::default();
    let r = quote_ident(role);
    let g = &s.group_role;
    let attrs = "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT";
    let limit = s.limits.connection_limit;
    match existing {
        None => {
            let pw = verifier
                .map(|v| format!(" PASSWORD {}", quote_literal(v)))
                .unwrap_or_default();
            p.push(format!(
                "CREATE ROLE {r} LOGIN {attrs} CONNECTION LIMIT {limit}{pw}"
            ));
            p.push(format!("GRANT {g} TO {r}"));
            for (name, value) in s.limits.role_settings(server_version) {
                p.push(format!("ALTER ROLE {r} SET {name} = {value}"));
            }
        }
        Some(st) => {
            if st.superuser || st.bypass_rls || st.create_role || st.create_db {
                p.push(format!("ALTER ROLE {r} {attrs}"));
                p.repair(format!(
                    "role {role} had SUPERUSER, BYPASSRLS or CREATE* attributes; removed"
                ));
            }
            if !st.can_login {
                p.push(format!("ALTER ROLE {r} LOGIN"));
            }
            if let Some(v) = verifier {
                p.push(format!("ALTER ROLE {r} PASSWORD {}", quote_literal(v)));
            }
            if !st.in_group {
                p.push(format!("GRANT {g} TO {r}"));
            }
            for m in &st.other_memberships {
                p.push(format!("REVOKE {} FROM {r}", quote_ident(m)));
                p.repair(format!("role {role} was a member of role {m}; revoked"));
            }
            let drift = bounds_drift(s, st, server_version);
            if !drift.is_empty() {
                if st.conn_limit != limit {
                    p.push(format!("ALTER ROLE {r} CONNECTION LIMIT {limit}"));
                }
                for (name, value) in s.limits.role_settings(server_version) {
                    if !st.config.contains(&format!("{name}={value}")) {
                        p.push(format!("ALTER ROLE {r} SET {name} = {value}"));
                    }
                }
                p.repair(format!(
                    "role {role}: restored its bounds ({})",
                    drift.join(", ")
                ));
            }
        }
    }
    p
}

/// The bounds a login role lacks or carries with another value, in words (empty: as planned).
pub fn bounds_drift(s: &Settings, st: &RoleState, server_version: i32) -> Vec<String> {
    let mut out = Vec::new();
    if st.conn_limit != s.limits.connection_limit {
        out.push(format!(
            "CONNECTION LIMIT {} instead of {}",
            st.conn_limit, s.limits.connection_limit
        ));
    }
    for (name, value) in s.limits.role_settings(server_version) {
        let prefix = format!("{name}=");
        match st.config.iter().find(|c| c.starts_with(&prefix)) {
            None => out.push(format!("{name} not set")),
            Some(c) if c[prefix.len()..] != value => out.push(format!(
                "{name} is {} instead of {value}",
                &c[prefix.len()..]
            )),
            Some(_) => {}
        }
    }
    out
}

/// One batch of the deletion of an organization's rows from a table.
pub fn delete_batch(s: &Settings, t: &TableState, batch: i64) -> String {
    let tbl = table_ref(t);
    format!(
        "DELETE FROM {tbl} WHERE ctid OPERATOR(pg_catalog.=) ANY(ARRAY(SELECT ctid FROM {tbl} \
         WHERE {} OPERATOR(pg_catalog.=) $1::pg_catalog.text LIMIT {batch}))",
        s.tenant_column
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::database::catalog::{Expected, FunctionState, Privileges};
    use crate::layers::database::settings::spec_from;
    use serde_json::json;

    fn settings(extra: serde_json::Value) -> Settings {
        Settings::from_spec(&spec_from(extra)).unwrap()
    }

    fn table(name: &str) -> TableState {
        TableState {
            schema: "public".into(),
            name: name.into(),
            kind: "r".into(),
            owner: "postgres".into(),
            rls: false,
            force: false,
            tenant_type: Some("text".into()),
            tenant_default: None,
            indexed: false,
            columns: vec!["id".into(), "org_id".into()],
            group: Privileges::default(),
            security_invoker: false,
            policies: vec![],
            sequences_without_usage: vec![],
            expected: Some(Expected {
                using: "(org_id = ( SELECT auth.org_id() AS org_id))".into(),
                check: "(org_id = ( SELECT auth.org_id() AS org_id))".into(),
                shared_using: Some("(scope = 'system'::text)".into()),
                default: "auth.org_id()".into(),
            }),
        }
    }

    fn governed(name: &str) -> TableState {
        let using = "(org_id = ( SELECT auth.org_id() AS org_id))".to_owned();
        TableState {
            rls: true,
            force: true,
            tenant_default: Some("auth.org_id()".into()),
            indexed: true,
            group: Privileges {
                select: true,
                insert: true,
                update: true,
                delete: true,
                ..Default::default()
            },
            policies: vec![PolicyState {
                name: POLICY.into(),
                permissive: true,
                command: "*".into(),
                roles: vec!["public".into()],
                applies_to_tenants: true,
                using: Some(using.clone()),
                check: Some(using.clone()),
            }],
            expected: Some(Expected {
                using: using.clone(),
                check: using,
                shared_using: None,
                default: "auth.org_id()".into(),
            }),
            ..table(name)
        }
    }

    #[test]
    fn identity_body_per_mode() {
        let role = identity_body(&settings(json!({})));
        assert_eq!(
            role.trim(),
            "BEGIN\n  RETURN (SELECT m.org_id FROM \"bulkhead\".\"tenant_roles\" m WHERE m.role_name OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);\nEND"
        );
        let setting = identity_body(&settings(json!({"identityMode": "setting"})));
        assert!(setting.contains(
            "pg_catalog.pg_has_role(CURRENT_USER, 'bulkhead_tenant', 'MEMBER') THEN NULL"
        ));
        assert!(setting.contains("FROM pg_catalog.current_setting('bulkhead.org_id', true) c"));
        let jwt = identity_body(&settings(
            json!({"identityMode": "jwt", "jwtClaim": "o'rg"}),
        ));
        assert!(jwt.contains("c::pg_catalog.jsonb OPERATOR(pg_catalog.->>) 'o''rg'"));
        assert!(jwt.contains("FROM pg_catalog.current_setting('request.jwt.claims', true) c"));
        for body in [role, setting, jwt] {
            assert!(
                !body.contains("NULLIF"),
                "NULLIF looks `=` up on the search_path"
            );
        }
    }

    #[test]
    fn the_rows_twin_selects_the_same_value_in_an_inlinable_shape() {
        for mode in [
            json!({}),
            json!({"identityMode": "setting"}),
            json!({"identityMode": "jwt"}),
        ] {
            let s = settings(mode);
            let body = identity_rows_body(&s);
            let value = identity_body(&s)
                .trim()
                .strip_prefix("BEGIN\n  RETURN ")
                .and_then(|b| b.strip_suffix(";\nEND"))
                .unwrap()
                .to_owned();
            assert_eq!(
                body,
                format!("\nSELECT {value}\n"),
                "one SELECT of the same value"
            );
            assert!(!body.contains("NULLIF"));
        }
        let sql = identity_rows_function_sql(&settings(json!({})));
        assert!(sql.starts_with(
            "CREATE OR REPLACE FUNCTION \"auth\".\"org_id_rows\"() RETURNS SETOF text LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER AS $bulkhead$"
        ), "{sql}");
        assert!(
            !sql.contains(" SET ") && !sql.contains("STRICT"),
            "either blocks inlining"
        );
    }

    #[test]
    fn identity_function_is_stable_invoker_without_a_set_clause() {
        let sql = identity_function_sql(&settings(json!({})));
        assert!(sql.starts_with(
            "CREATE OR REPLACE FUNCTION \"auth\".\"org_id\"() RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE"
        ));
        assert!(sql.contains("SECURITY INVOKER"));
        assert!(!sql.contains(" SET "), "a SET clause costs at every call");
        assert!(sql.contains("$bulkhead$"));
    }

    #[test]
    fn dollar_quote_never_collides() {
        assert_eq!(dollar_quote("x"), "$bulkhead$x$bulkhead$");
        assert_eq!(
            dollar_quote("a $bulkhead$ b"),
            "$bulkhead_$a $bulkhead$ b$bulkhead_$"
        );
    }

    #[test]
    fn a_new_table_gets_everything() {
        let s = settings(json!({}));
        let p = govern_table(&s, &table("messages"));
        let sql = p.statements.join(";\n");
        assert!(sql.contains("ALTER TABLE \"public\".\"messages\" ENABLE ROW LEVEL SECURITY"));
        assert!(sql.contains("ALTER TABLE \"public\".\"messages\" FORCE ROW LEVEL SECURITY"));
        assert!(
            sql.contains("CREATE POLICY \"bulkhead_isolation\" ON \"public\".\"messages\" USING")
        );
        assert!(sql.contains("SET DEFAULT \"auth\".\"org_id\"()"));
        assert!(sql.contains(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON \"public\".\"messages\" TO \"bulkhead_tenant\""
        ));
        assert!(p.concurrent.is_empty(), "indexes only when createIndexes");
        let mut t = governed("messages");
        t.sequences_without_usage = vec![("public".into(), "messages_id_seq".into())];
        assert_eq!(
            govern_table(&s, &t).statements,
            vec!["GRANT USAGE ON SEQUENCE \"public\".\"messages_id_seq\" TO \"bulkhead_tenant\""]
        );
        assert_eq!(p.repairs.len(), 1);
        assert!(
            p.repairs[0]
                .0
                .contains("enabled RLS, forced RLS, created the isolation policy")
        );
    }

    #[test]
    fn a_table_the_policy_cannot_be_built_on_is_left_alone() {
        let s = settings(json!({}));
        let mut t = table("odd");
        t.expected = None;
        assert!(govern_table(&s, &t).is_empty());
    }

    #[test]
    fn a_governed_table_needs_nothing() {
        let s = settings(json!({}));
        let p = govern_table(&s, &governed("messages"));
        assert!(p.is_empty(), "{p:?}");
        assert!(p.repairs.is_empty());
    }

    #[test]
    fn drift_is_repaired() {
        let s = settings(json!({}));
        let mut t = governed("messages");
        t.force = false;
        let p = govern_table(&s, &t);
        assert_eq!(
            p.statements,
            vec!["ALTER TABLE \"public\".\"messages\" FORCE ROW LEVEL SECURITY"]
        );

        let mut t = governed("messages");
        t.policies[0].using = Some("true".into());
        let p = govern_table(&s, &t);
        assert_eq!(
            p.statements[0],
            "DROP POLICY \"bulkhead_isolation\" ON \"public\".\"messages\""
        );
        assert!(p.statements[1].starts_with("CREATE POLICY"));

        let mut t = governed("messages");
        t.policies.push(PolicyState {
            name: "open door".into(),
            permissive: true,
            command: "r".into(),
            roles: vec!["public".into()],
            applies_to_tenants: true,
            using: Some("true".into()),
            check: None,
        });
        t.policies.push(PolicyState {
            name: "service".into(),
            permissive: true,
            command: "*".into(),
            roles: vec!["service_role".into()],
            applies_to_tenants: false,
            using: Some("true".into()),
            check: None,
        });
        t.policies.push(PolicyState {
            name: "narrow".into(),
            permissive: false,
            command: "*".into(),
            roles: vec!["public".into()],
            applies_to_tenants: true,
            using: Some("false".into()),
            check: None,
        });
        let p = govern_table(&s, &t);
        assert_eq!(
            p.statements,
            vec!["DROP POLICY \"open door\" ON \"public\".\"messages\""]
        );

        let mut t = governed("messages");
        t.group.truncate = true;
        let p = govern_table(&s, &t);
        assert!(p.statements[0].starts_with("REVOKE TRUNCATE, TRIGGER, REFERENCES"));
    }

    #[test]
    fn indexes_are_created_concurrently_on_request() {
        let s = settings(json!({"createIndexes": true}));
        let mut t = governed("messages");
        t.indexed = false;
        let p = govern_table(&s, &t);
        assert!(p.statements.is_empty());
        assert_eq!(p.concurrent.len(), 2);
        assert!(
            p.concurrent[0]
                .starts_with("DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"bulkhead_org_idx_"),
            "an invalid leftover of a failed build is dropped first"
        );
        assert!(
            p.concurrent[1]
                .starts_with("CREATE INDEX CONCURRENTLY IF NOT EXISTS \"bulkhead_org_idx_")
        );
        assert!(p.concurrent[1].ends_with("ON \"public\".\"messages\" (\"org_id\")"));
    }

    #[test]
    fn override_tables_get_a_read_only_companion() {
        let s = settings(json!({
            "overrides": [{"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "system"}]
        }));
        let p = govern_table(&s, &table("skills"));
        let sql = p.statements.join(";\n");
        assert!(sql.contains("CREATE POLICY \"bulkhead_shared_read\" ON \"public\".\"skills\" FOR SELECT USING (\"scope\" = 'system')"));
        assert!(sql.contains("IS DISTINCT FROM 'system'"));
    }

    #[test]
    fn bootstrap_creates_then_converges() {
        let s = settings(json!({}));
        let p = bootstrap(&s, &Catalog::default());
        let sql = p.statements.join(";\n");
        for want in [
            "CREATE SCHEMA IF NOT EXISTS \"bulkhead\"",
            "CREATE SCHEMA IF NOT EXISTS \"auth\"",
            "CREATE ROLE \"bulkhead_tenant\" NOLOGIN NOSUPERUSER NOBYPASSRLS",
            "CREATE TABLE IF NOT EXISTS \"bulkhead\".\"tenant_roles\"",
            "FOR SELECT USING (role_name = current_user::text)",
            "GRANT SELECT ON \"bulkhead\".\"tenant_roles\" TO PUBLIC",
            "CREATE OR REPLACE FUNCTION \"auth\".\"org_id\"()",
            "CREATE TABLE IF NOT EXISTS \"public\".\"organizations\"",
        ] {
            assert!(sql.contains(want), "missing {want}");
        }
        assert!(p.repairs.is_empty(), "creating is not repairing");
        // Mapping must exist before the function that reads it is created.
        let map_at = p
            .statements
            .iter()
            .position(|x| x.contains("CREATE TABLE IF NOT EXISTS \"bulkhead\""))
            .unwrap();
        let fn_at = p
            .statements
            .iter()
            .position(|x| x.contains("CREATE OR REPLACE FUNCTION"))
            .unwrap();
        assert!(map_at < fn_at);

        let cat = Catalog {
            function: Some(FunctionState {
                body: "\nSELECT 'acme'\n".into(),
                volatility: "s".into(),
                parallel: "s".into(),
                language: "plpgsql".into(),
                security_definer: false,
                config: vec![],
                owner: "postgres".into(),
                result: "text".into(),
            }),
            group: Some(RoleState {
                name: "bulkhead_tenant".into(),
                bypass_rls: true,
                ..Default::default()
            }),
            group_mapped: true,
            ..Default::default()
        };
        let p = bootstrap(&s, &cat);
        let text: Vec<String> = p.repairs.iter().map(|r| r.0.clone()).collect();
        assert!(
            text.iter().any(|r| r.contains("identity function")),
            "{text:?}"
        );
        assert!(text.iter().any(|r| r.contains("BYPASSRLS")), "{text:?}");
        assert!(
            text.iter().any(|r| r.contains("mapped to an organization")),
            "{text:?}"
        );
    }

    #[test]
    fn tenant_roles_are_created_locked_down_and_repaired() {
        let s = settings(json!({}));
        let p = tenant_role(
            &s,
            "bulkhead_org_acme",
            None,
            Some("SCRAM-SHA-256$4096:c2FsdA==$a:b"),
            150_000,
        );
        assert_eq!(
            p.statements,
            vec![
                "CREATE ROLE \"bulkhead_org_acme\" LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT CONNECTION LIMIT 20 PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b'",
                "GRANT \"bulkhead_tenant\" TO \"bulkhead_org_acme\"",
                "ALTER ROLE \"bulkhead_org_acme\" SET statement_timeout = 30000",
                "ALTER ROLE \"bulkhead_org_acme\" SET idle_in_transaction_session_timeout = 60000",
                "ALTER ROLE \"bulkhead_org_acme\" SET lock_timeout = 10000",
            ]
        );
        let bounded = |st: RoleState| RoleState {
            conn_limit: 20,
            config: vec![
                "statement_timeout=30000".into(),
                "idle_in_transaction_session_timeout=60000".into(),
                "lock_timeout=10000".into(),
            ],
            ..st
        };
        let st = bounded(RoleState {
            name: "bulkhead_org_acme".into(),
            bypass_rls: true,
            can_login: true,
            in_group: true,
            other_memberships: vec!["bulkhead_org_peer".into()],
            ..Default::default()
        });
        let p = tenant_role(&s, "bulkhead_org_acme", Some(&st), None, 150_000);
        assert_eq!(
            p.statements,
            vec![
                "ALTER ROLE \"bulkhead_org_acme\" NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT",
                "REVOKE \"bulkhead_org_peer\" FROM \"bulkhead_org_acme\"",
            ]
        );
        assert_eq!(p.repairs.len(), 2);
        let fine = bounded(RoleState {
            name: "r".into(),
            can_login: true,
            in_group: true,
            ..Default::default()
        });
        assert!(tenant_role(&s, "r", Some(&fine), None, 150_000).is_empty());
        // On PostgreSQL 17 the role also needs transaction_timeout.
        let p = tenant_role(&s, "r", Some(&fine), None, 170_002);
        assert_eq!(
            p.statements,
            vec!["ALTER ROLE \"r\" SET transaction_timeout = 300000"]
        );
    }

    #[test]
    fn drifted_bounds_are_restored_and_reported() {
        let s = settings(json!({"tenantLimits": {"connectionLimit": 5}}));
        let st = RoleState {
            name: "r".into(),
            can_login: true,
            in_group: true,
            conn_limit: -1,
            config: vec![
                "statement_timeout=0".into(),
                "lock_timeout=10000".into(),
                "search_path=x".into(),
            ],
            ..Default::default()
        };
        let drift = bounds_drift(&s, &st, 150_000);
        assert_eq!(
            drift,
            vec![
                "CONNECTION LIMIT -1 instead of 5",
                "statement_timeout is 0 instead of 30000",
                "idle_in_transaction_session_timeout not set",
            ]
        );
        let p = tenant_role(&s, "r", Some(&st), None, 150_000);
        assert_eq!(
            p.statements,
            vec![
                "ALTER ROLE \"r\" CONNECTION LIMIT 5",
                "ALTER ROLE \"r\" SET statement_timeout = 30000",
                "ALTER ROLE \"r\" SET idle_in_transaction_session_timeout = 60000",
            ]
        );
        assert_eq!(p.repairs.len(), 1);
        assert!(p.repairs[0].0.contains("restored its bounds"));
    }

    #[test]
    fn prepare_revokes_create_and_keeps_the_lock_table_private() {
        let s = settings(json!({}));
        let mut cat = Catalog::default();
        cat.public_schema_create.insert("public".into());
        cat.group_schema_create.insert("public".into());
        cat.tenant_schema_create
            .push(("public".into(), "bulkhead_org_acme".into()));
        cat.tenant_schema_create
            .push(("auth".into(), "bulkhead_org_acme".into()));
        let p = bootstrap(&s, &cat);
        let sql = p.statements.join(";\n");
        assert!(sql.contains("REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC"));
        assert!(sql.contains("REVOKE CREATE ON SCHEMA \"public\" FROM \"bulkhead_tenant\""));
        assert!(sql.contains("REVOKE CREATE ON SCHEMA \"auth\" FROM \"bulkhead_org_acme\""));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"bulkhead\".\"locks\""));
        assert!(sql.contains("REVOKE ALL ON \"bulkhead\".\"locks\" FROM PUBLIC"));
        assert!(
            sql.contains("owner_uid text"),
            "the mapping records owners: {sql}"
        );
        assert_eq!(p.repairs.len(), 2, "{:?}", p.repairs);
    }

    #[test]
    fn deletes_are_batched_and_bound() {
        let s = settings(json!({}));
        assert_eq!(
            delete_batch(&s, &table("messages"), 500),
            "DELETE FROM \"public\".\"messages\" WHERE ctid OPERATOR(pg_catalog.=) ANY(ARRAY(SELECT ctid FROM \"public\".\"messages\" WHERE \"org_id\" OPERATOR(pg_catalog.=) $1::pg_catalog.text LIMIT 500))"
        );
    }
}
