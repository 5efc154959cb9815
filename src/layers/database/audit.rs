//! The RLS coverage audit: a pure function of the settings and a catalog snapshot.

use serde::Serialize;

use super::catalog::{Catalog, TableState};
use super::plan::{self, IDENTITY_CONFIG};
use super::settings::{POLICY, SHARED_READ_POLICY, Settings};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Isolation does not hold (or cannot be vouched for): organizations' conditions go False.
    Breach,
    /// Worth fixing (performance, coverage), but no organization can reach another's rows.
    Warning,
}

/// One thing the audit found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The table, role or function concerned.
    pub subject: String,
    pub message: String,
}

impl Finding {
    fn breach(subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Breach,
            subject: subject.into(),
            message: message.into(),
        }
    }
    fn warning(subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            subject: subject.into(),
            message: message.into(),
        }
    }
    /// `subject: message`, as conditions and status show it.
    pub fn text(&self) -> String {
        format!("{}: {}", self.subject, self.message)
    }
}

/// The audit's result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    /// Tables with the tenant column.
    pub tables_found: u32,
    /// Those whose isolation is complete.
    pub governed_tables: u32,
    pub findings: Vec<Finding>,
}

impl AuditReport {
    pub fn coverage(&self) -> String {
        format!("{}/{}", self.governed_tables, self.tables_found)
    }
    pub fn breaches(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Breach)
    }
}

/// Whether an expression calls a function outside a sub-select, i.e. once per row.
pub fn calls_function_per_row(expr: &str) -> bool {
    let cleaned = strip_subselects(&strip_literals(expr));
    let b = cleaned.as_bytes();
    b.windows(2)
        .any(|w| (w[0].is_ascii_alphanumeric() || w[0] == b'_' || w[0] == b'"') && w[1] == b'(')
}

fn strip_literals(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut in_lit = false;
    for c in expr.chars() {
        if c == '\'' {
            in_lit = !in_lit;
            out.push(c);
        } else if !in_lit {
            out.push(c);
        }
    }
    out
}

fn strip_subselects(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find("( SELECT ") {
        out.push_str(&rest[..at]);
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest[at..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push_str("(subselect)");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Whether an expression mentions the tenant column.
pub fn mentions_column(expr: &str, column: &str) -> bool {
    let quoted = super::ident::quote_ident(column);
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    expr.contains(&quoted)
        || expr.match_indices(column).any(|(i, _)| {
            let before = i == 0 || !ident(bytes[i - 1]);
            let after = i + column.len() >= bytes.len() || !ident(bytes[i + column.len()]);
            before && after
        })
}

/// Whether a function's result cannot depend on the caller's search_path: it pins the path to
/// `pg_catalog, pg_temp`, or sets no path and its body is schema-qualified throughout.
pub fn search_path_safe(body: &str, config: &[String]) -> bool {
    let pins_path = |c: &String| c.starts_with("search_path=");
    match config.iter().find(|c| pins_path(c)) {
        Some(c) => c == IDENTITY_CONFIG,
        None => body_is_qualified(body),
    }
}

/// Words that may stand before `(` or after `FROM` without naming a function or relation.
const SYNTAX: &[&str] = &[
    "RETURN", "SELECT", "WHERE", "WHEN", "THEN", "ELSE", "AND", "OR", "NOT", "FROM", "COALESCE",
    "EXISTS", "OPERATOR", "BEGIN", "END", "CASE", "IS", "NULL",
];

/// A conservative lexical check (false when unsure) that a body names every relation, function,
/// type and operator with its schema: `NULLIF`, bare operators, unqualified casts, calls and
/// relations all resolve through the search_path (relations and types through `pg_temp` first).
pub fn body_is_qualified(body: &str) -> bool {
    let text = strip_literals(body).replace("''", "");
    // Explicit operators are safe; what remains must hold no operator character.
    let mut rest = text.as_str();
    let mut code = String::with_capacity(text.len());
    while let Some(at) = rest.find("OPERATOR(pg_catalog.") {
        code.push_str(&rest[..at]);
        let Some(close) = rest[at..].find(')') else {
            return false;
        };
        code.push(' ');
        rest = &rest[at + close + 1..];
    }
    code.push_str(rest);
    if code.contains([
        '+', '-', '*', '/', '<', '>', '=', '~', '!', '@', '#', '%', '^', '&', '|', '`', '?',
    ]) {
        return false;
    }
    // Tokens: quoted or bare identifiers joined by dots, punctuation, `::`.
    let mut tokens: Vec<String> = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push("::".into());
            i += 2;
        } else if c == '"' || c.is_alphanumeric() || c == '_' {
            let mut t = String::new();
            while i < chars.len() {
                let c = chars[i];
                if c == '"' {
                    let end = chars[i + 1..]
                        .iter()
                        .position(|&x| x == '"')
                        .map(|p| i + 1 + p);
                    let Some(end) = end else { return false };
                    t.extend(&chars[i..=end]);
                    i = end + 1;
                } else if c.is_alphanumeric() || c == '_' || c == '.' || c == '$' {
                    t.push(c);
                    i += 1;
                } else {
                    break;
                }
            }
            tokens.push(t);
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    let qualified = |t: &str| t.contains('.');
    let word = |t: &str| t.starts_with(|c: char| c == '"' || c.is_alphabetic() || c == '_');
    let syntax = |t: &str| SYNTAX.iter().any(|k| k.eq_ignore_ascii_case(t));
    for (k, t) in tokens.iter().enumerate() {
        let next = tokens.get(k + 1).map(String::as_str);
        if t == "::" && !next.is_some_and(qualified) {
            return false;
        }
        if word(t) && next == Some("(") && !qualified(t) && !syntax(t) {
            return false;
        }
        if (t.eq_ignore_ascii_case("FROM") || t.eq_ignore_ascii_case("JOIN"))
            && !next.is_some_and(|n| n == "(" || qualified(n))
        {
            return false;
        }
        if ["DECLARE", "CAST", "EXECUTE", "PERFORM"]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(t))
        {
            return false;
        }
    }
    true
}

/// Runs the audit over a snapshot.
pub fn audit(s: &Settings, cat: &Catalog) -> AuditReport {
    let mut f = Vec::new();
    let g = s.group_role.as_str();
    let tenants = cat.tenant_role_names();

    match &cat.group {
        None => f.push(Finding::breach(
            format!("role {g}"),
            "the tenant group role does not exist",
        )),
        Some(r) => {
            if r.superuser || r.bypass_rls {
                f.push(Finding::breach(
                    format!("role {g}"),
                    "the tenant group role has SUPERUSER or BYPASSRLS",
                ));
            }
            if r.can_login {
                f.push(Finding::breach(
                    format!("role {g}"),
                    "the tenant group role can log in",
                ));
            }
            if r.create_role {
                f.push(Finding::breach(
                    format!("role {g}"),
                    "the tenant group role has CREATEROLE",
                ));
            }
            for m in &r.other_memberships {
                f.push(Finding::breach(
                    format!("role {g}"),
                    format!("the tenant group role is a member of role {m}"),
                ));
            }
        }
    }
    if cat.group_mapped {
        f.push(Finding::breach(
            format!("role {g}"),
            "the tenant group role is mapped to an organization",
        ));
    }
    let governed_schema = |schema: &str| s.schemas.iter().any(|x| x.as_str() == schema);
    let create_finding = |schema: &str, who: &str| {
        let what = if governed_schema(schema) {
            "this governed schema (they would own, and could unprotect, new tables, or plant functions and operators that shadow others')"
        } else {
            "the operator's schema (they could plant objects beside the role mapping or the identity function)"
        };
        Finding::breach(
            format!("schema {schema}"),
            format!("tenants can CREATE in {what}, through {who}"),
        )
    };
    for schema in &cat.public_schema_create {
        f.push(create_finding(schema, "PUBLIC"));
    }
    for schema in &cat.group_schema_create {
        if !cat.public_schema_create.contains(schema) {
            f.push(create_finding(schema, &format!("group role {g}")));
        }
    }
    for (schema, role) in &cat.tenant_schema_create {
        if !cat.public_schema_create.contains(schema) && !cat.group_schema_create.contains(schema) {
            f.push(create_finding(schema, &format!("tenant role {role}")));
        }
    }

    let func = s.identity_function.plain();
    match &cat.function {
        None => f.push(Finding::breach(
            format!("function {func}()"),
            "the identity function does not exist",
        )),
        Some(x) => {
            if x.body != plan::identity_body(s) {
                f.push(Finding::breach(
                    format!("function {func}()"),
                    "the identity function's body differs from the planned one",
                ));
            }
            if x.parallel != "s" || x.language != "plpgsql" {
                f.push(Finding::warning(
                    format!("function {func}()"),
                    "the identity function is not the planned PL/pgSQL, PARALLEL SAFE one (slower queries)",
                ));
            }
            if x.volatility != "s" {
                f.push(Finding::breach(
                    format!("function {func}()"),
                    "the identity function is not STABLE",
                ));
            }
            if x.security_definer {
                f.push(Finding::breach(
                    format!("function {func}()"),
                    "the identity function is SECURITY DEFINER",
                ));
            }
            if !search_path_safe(&x.body, &x.config) {
                f.push(Finding::breach(
                    format!("function {func}()"),
                    "the identity function neither pins `SET search_path = pg_catalog, pg_temp` nor schema-qualifies every name (a caller's search_path could change what it returns)",
                ));
            }
            if tenants.contains(x.owner.as_str()) || x.owner == g {
                f.push(Finding::breach(
                    format!("function {func}()"),
                    format!("owned by tenant role {}", x.owner),
                ));
            }
        }
    }

    let rows = s.identity_rows_function.plain();
    match &cat.rows_function {
        None => f.push(Finding::breach(
            format!("function {rows}()"),
            "the identity function's set-returning twin, which the policies call, does not exist",
        )),
        Some(x) => {
            let subject = format!("function {rows}()");
            if x.body != plan::identity_rows_body(s) {
                f.push(Finding::breach(
                    subject.clone(),
                    "the set-returning identity function's body differs from the planned one",
                ));
            }
            if x.volatility != "s" {
                f.push(Finding::breach(
                    subject.clone(),
                    "the set-returning identity function is not STABLE",
                ));
            }
            if x.security_definer {
                f.push(Finding::breach(
                    subject.clone(),
                    "the set-returning identity function is SECURITY DEFINER",
                ));
            }
            if !search_path_safe(&x.body, &x.config) {
                f.push(Finding::breach(
                    subject.clone(),
                    "the set-returning identity function neither pins search_path nor schema-qualifies every name",
                ));
            }
            if !plan::rows_function_intact(x, &plan::identity_rows_body(s))
                && x.body == plan::identity_rows_body(s)
                && x.volatility == "s"
                && !x.security_definer
            {
                f.push(Finding::warning(
                    subject.clone(),
                    "the set-returning identity function is not the planned SQL, PARALLEL SAFE, SETOF text one without a SET clause: PostgreSQL cannot inline it (slower queries)",
                ));
            }
            if !cat.group_can_execute_rows_function {
                f.push(Finding::warning(
                    subject.clone(),
                    "tenants cannot execute the set-returning identity function: every governed query fails (closed, but broken)",
                ));
            }
            if tenants.contains(x.owner.as_str()) || x.owner == g {
                f.push(Finding::breach(
                    subject,
                    format!("owned by tenant role {}", x.owner),
                ));
            }
        }
    }

    let mapping = s.mapping.plain();
    match &cat.mapping {
        None => f.push(Finding::breach(
            format!("table {mapping}"),
            "the role mapping table does not exist",
        )),
        Some(t) => {
            if t.group.insert
                || t.group.update
                || t.group.delete
                || t.group.truncate
                || t.group.trigger
            {
                f.push(Finding::breach(
                    format!("table {mapping}"),
                    "tenants can write the role mapping",
                ));
            }
            if !t.rls
                || !t.force
                || t.policy(plan::MAPPING_POLICY).is_none()
                || t.policies.len() != 1
            {
                f.push(Finding::breach(
                    format!("table {mapping}"),
                    "the role mapping is not limited to each session's own row (RLS, FORCE or its policy changed)",
                ));
            }
        }
    }
    let registry = s.registry.plain();
    match &cat.registry {
        None => f.push(Finding::warning(
            format!("table {registry}"),
            "the organization registry does not exist",
        )),
        Some(t) => {
            if !t.rls || !t.force || t.policy(POLICY).is_none() {
                f.push(Finding::breach(
                    format!("table {registry}"),
                    "the registry lacks RLS, FORCE or its policy",
                ));
            }
            for x in t
                .policies
                .iter()
                .filter(|x| x.name != POLICY && x.permissive && x.applies_to_tenants)
            {
                f.push(Finding::breach(
                    format!("table {registry}"),
                    format!("permissive policy {:?} widens access", x.name),
                ));
            }
            if t.group.insert || t.group.update || t.group.delete || t.group.truncate {
                f.push(Finding::breach(
                    format!("table {registry}"),
                    "tenants can write the registry",
                ));
            }
        }
    }

    for func in &cat.definer_functions {
        f.push(Finding::breach(
            format!("function {func}"),
            "SECURITY DEFINER function executable by tenants (runs with its owner's rights, outside their RLS)",
        ));
    }

    let mut found = 0u32;
    let mut governed = 0u32;
    for t in &cat.relations {
        if t.is_table() && t.has_tenant_column() {
            found += 1;
            let before = f.iter().filter(|x| x.severity == Severity::Breach).count();
            audit_table(s, t, &tenants, &mut f);
            if f.iter().filter(|x| x.severity == Severity::Breach).count() == before {
                governed += 1;
            }
        } else if t.is_table() {
            if !s.excluded_tables.contains(&t.name) {
                f.push(Finding::warning(
                    format!("table {}", t.qualified()),
                    format!("in a governed schema without column {}; list it in excludedTables if it is shared on purpose", s.tenant_column.as_str()),
                ));
            }
        } else if (t.kind == "v" || t.kind == "m") && t.group.select {
            if t.kind == "m" {
                f.push(Finding::breach(
                    format!("materialized view {}", t.qualified()),
                    "tenants can read it, and materialized views have no RLS",
                ));
            } else if !t.security_invoker {
                f.push(Finding::breach(
                    format!("view {}", t.qualified()),
                    "tenants can read it and it runs with its owner's rights; set security_invoker = true",
                ));
            }
        }
        if tenants.contains(t.owner.as_str()) || t.owner == g {
            f.push(Finding::breach(
                format!("table {}", t.qualified()),
                format!(
                    "owned by tenant role {}, which can disable its RLS",
                    t.owner
                ),
            ));
        }
    }

    for r in &cat.tenant_roles {
        let subject = format!("role {}", r.name);
        if r.superuser {
            f.push(Finding::breach(
                &subject,
                "tenant role is SUPERUSER (bypasses RLS)",
            ));
        }
        if r.bypass_rls {
            f.push(Finding::breach(&subject, "tenant role has BYPASSRLS"));
        }
        if r.create_role {
            f.push(Finding::breach(
                &subject,
                "tenant role has CREATEROLE (can join other roles)",
            ));
        }
        for m in &r.other_memberships {
            let whose = if tenants.contains(m.as_str()) {
                "another organization's role"
            } else {
                "role"
            };
            f.push(Finding::breach(
                &subject,
                format!("tenant role is a member of {whose} {m}"),
            ));
        }
        if !r.in_group && r.can_login {
            f.push(Finding::warning(
                &subject,
                format!("tenant role is not a member of {g}"),
            ));
        }
        let drift = plan::bounds_drift(s, r, cat.server_version);
        if r.can_login && !drift.is_empty() {
            f.push(Finding::breach(
                &subject,
                format!(
                    "tenant role lacks its bounds, so its sessions can stall other organizations: {}",
                    drift.join(", ")
                ),
            ));
        }
    }
    let logins = cat.tenant_roles.iter().filter(|r| r.can_login).count();
    let limit = usize::try_from(s.limits.connection_limit).unwrap_or(0);
    let shared = usize::try_from(cat.shared_connections).unwrap_or(0);
    if shared > 0 && logins.saturating_mul(limit) > shared {
        f.push(Finding::warning(
            format!("role {g}"),
            format!(
                "{logins} organizations × connectionLimit {limit} exceed the {shared} connection slots left after the superuser reserve: together they can still fill the server"
            ),
        ));
    }
    f.sort_by(|a, b| {
        (a.severity, &a.subject, &a.message).cmp(&(b.severity, &b.subject, &b.message))
    });
    f.dedup();
    AuditReport {
        tables_found: found,
        governed_tables: governed,
        findings: f,
    }
}

fn audit_table(
    s: &Settings,
    t: &TableState,
    tenants: &std::collections::BTreeSet<&str>,
    f: &mut Vec<Finding>,
) {
    let subject = format!("table {}", t.qualified());
    let shared = s.shared_read(&t.name);
    let _ = tenants;
    if !t.rls {
        f.push(Finding::breach(&subject, "row-level security is disabled"));
    }
    if !t.force {
        f.push(Finding::breach(
            &subject,
            "row-level security is not forced (the owner bypasses it)",
        ));
    }
    match (t.policy(POLICY), &t.expected) {
        (_, None) => f.push(Finding::breach(
            &subject,
            "the planned policy cannot be built on this table (is the tenant column not text, or the override column missing?)",
        )),
        (None, Some(_)) => f.push(Finding::breach(
            &subject,
            format!("policy {POLICY} is missing"),
        )),
        (Some(p), Some(exp)) => {
            if !plan::policy_intact(p, &exp.using, Some(&exp.check), "*") {
                f.push(Finding::breach(
                    &subject,
                    format!(
                        "policy {POLICY} differs from the planned one (USING {}, WITH CHECK {})",
                        p.using.as_deref().unwrap_or("-"),
                        p.check.as_deref().unwrap_or("-")
                    ),
                ));
            }
        }
    }
    if let Some(_sr) = shared {
        match (
            t.policy(SHARED_READ_POLICY),
            t.expected.as_ref().and_then(|e| e.shared_using.as_deref()),
        ) {
            (None, _) => f.push(Finding::warning(
                &subject,
                format!("shared-read policy {SHARED_READ_POLICY} is missing"),
            )),
            (Some(p), Some(exp)) if !plan::policy_intact(p, exp, None, "r") => {
                f.push(Finding::breach(
                    &subject,
                    format!("shared-read policy {SHARED_READ_POLICY} differs from the planned one"),
                ))
            }
            _ => {}
        }
    }
    for p in &t.policies {
        let ours = p.name == POLICY || (shared.is_some() && p.name == SHARED_READ_POLICY);
        if !ours && p.permissive && p.applies_to_tenants {
            let constrains = p
                .using
                .as_deref()
                .is_some_and(|u| mentions_column(u, s.tenant_column.as_str()));
            let what = if constrains {
                "an OR branch beside the operator's policy"
            } else {
                "it does not constrain the tenant column"
            };
            f.push(Finding::breach(
                &subject,
                format!(
                    "permissive policy {:?} widens access: {what} (USING {})",
                    p.name,
                    p.using.as_deref().unwrap_or("-")
                ),
            ));
        }
        for expr in [p.using.as_deref(), p.check.as_deref()]
            .into_iter()
            .flatten()
        {
            if calls_function_per_row(expr) {
                f.push(Finding::warning(
                    &subject,
                    format!(
                        "policy {:?} calls a function once per row; wrap it as (SELECT f())",
                        p.name
                    ),
                ));
                break;
            }
        }
    }
    if t.group.truncate {
        f.push(Finding::breach(
            &subject,
            "tenants hold TRUNCATE, which bypasses RLS",
        ));
    }
    if t.group.trigger {
        f.push(Finding::breach(
            &subject,
            "tenants hold TRIGGER (a trigger runs in other organizations' sessions)",
        ));
    }
    if t.group.references {
        f.push(Finding::warning(
            &subject,
            "tenants hold REFERENCES (foreign keys can probe other organizations' keys)",
        ));
    }
    if !(t.group.select && t.group.insert && t.group.update && t.group.delete) {
        f.push(Finding::warning(
            &subject,
            format!(
                "the group role {} lacks SELECT/INSERT/UPDATE/DELETE",
                s.group_role.as_str()
            ),
        ));
    }
    if let Some(exp) = &t.expected
        && t.tenant_default.as_deref() != Some(exp.default.as_str())
    {
        f.push(Finding::warning(
            &subject,
            format!(
                "column {} does not default to the identity function",
                s.tenant_column.as_str()
            ),
        ));
    }
    if !t.indexed {
        f.push(Finding::warning(
            &subject,
            format!("no index leads with {}", s.tenant_column.as_str()),
        ));
    }
}

/// The audit as a readable table.
pub fn render_table(report: &AuditReport) -> String {
    let mut out = format!("RLS coverage: {} tables governed\n", report.coverage());
    if report.findings.is_empty() {
        out.push_str("No findings.\n");
        return out;
    }
    let w_sev = 8;
    let w_sub = report
        .findings
        .iter()
        .map(|f| f.subject.chars().count())
        .max()
        .unwrap_or(7)
        .max(7);
    out.push_str(&format!(
        "{:<w_sev$}  {:<w_sub$}  FINDING\n",
        "SEVERITY", "SUBJECT"
    ));
    out.push_str(&format!(
        "{}  {}  {}\n",
        "-".repeat(w_sev),
        "-".repeat(w_sub),
        "-".repeat(7)
    ));
    for f in &report.findings {
        let sev = match f.severity {
            Severity::Breach => "BREACH",
            Severity::Warning => "warning",
        };
        out.push_str(&format!(
            "{sev:<w_sev$}  {:<w_sub$}  {}\n",
            f.subject, f.message
        ));
    }
    let breaches = report.breaches().count();
    out.push_str(&format!(
        "\n{} finding(s): {} breach(es), {} warning(s)\n",
        report.findings.len(),
        breaches,
        report.findings.len() - breaches
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::database::catalog::{
        Expected, FunctionState, PolicyState, Privileges, RoleState,
    };
    use crate::layers::database::settings::spec_from;
    use serde_json::json;

    const USING: &str = "(org_id = ( SELECT auth.org_id() AS org_id))";

    fn settings() -> Settings {
        Settings::from_spec(&spec_from(json!({
            "overrides": [{"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "system"}]
        })))
        .unwrap()
    }

    fn good_table(name: &str) -> TableState {
        TableState {
            schema: "public".into(),
            name: name.into(),
            kind: "r".into(),
            owner: "postgres".into(),
            rls: true,
            force: true,
            tenant_type: Some("text".into()),
            tenant_default: Some("auth.org_id()".into()),
            indexed: true,
            columns: vec!["org_id".into()],
            group: Privileges {
                select: true,
                insert: true,
                update: true,
                delete: true,
                ..Default::default()
            },
            security_invoker: false,
            policies: vec![PolicyState {
                name: POLICY.into(),
                permissive: true,
                command: "*".into(),
                roles: vec!["public".into()],
                applies_to_tenants: true,
                using: Some(USING.into()),
                check: Some(USING.into()),
            }],
            sequences_without_usage: vec![],
            expected: Some(Expected {
                using: USING.into(),
                check: USING.into(),
                shared_using: None,
                default: "auth.org_id()".into(),
            }),
        }
    }

    fn good_catalog() -> Catalog {
        let s = settings();
        let mut mapping = good_table("tenant_roles");
        mapping.schema = "bulkhead".into();
        mapping.group = Privileges {
            select: true,
            ..Default::default()
        };
        mapping.policies = vec![PolicyState {
            name: plan::MAPPING_POLICY.into(),
            permissive: true,
            command: "r".into(),
            roles: vec!["public".into()],
            applies_to_tenants: true,
            using: Some("(role_name = (CURRENT_USER)::text)".into()),
            check: None,
        }];
        let mut registry = good_table("organizations");
        registry.group = Privileges {
            select: true,
            ..Default::default()
        };
        Catalog {
            group: Some(RoleState {
                name: "bulkhead_tenant".into(),
                ..Default::default()
            }),
            function: Some(FunctionState {
                body: plan::identity_body(&s),
                volatility: "s".into(),
                parallel: "s".into(),
                language: "plpgsql".into(),
                security_definer: false,
                config: vec![],
                owner: "postgres".into(),
                result: "text".into(),
            }),
            rows_function: Some(FunctionState {
                body: plan::identity_rows_body(&s),
                volatility: "s".into(),
                parallel: "s".into(),
                language: "sql".into(),
                security_definer: false,
                config: vec![],
                owner: "postgres".into(),
                result: "SETOF text".into(),
            }),
            group_can_execute_rows_function: true,
            mapping: Some(mapping),
            registry: Some(registry),
            relations: vec![good_table("conversations"), good_table("messages")],
            tenant_roles: vec![RoleState {
                name: "bulkhead_org_acme".into(),
                org_id: Some("acme".into()),
                can_login: true,
                in_group: true,
                conn_limit: 20,
                config: s
                    .limits
                    .role_settings(150_000)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
                ..Default::default()
            }],
            server_version: 150_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_catalog_has_no_findings() {
        let r = audit(&settings(), &good_catalog());
        assert_eq!(r.findings, vec![]);
        assert_eq!(r.coverage(), "2/2");
    }

    fn breach_of(mutate: impl FnOnce(&mut Catalog)) -> Vec<String> {
        let mut cat = good_catalog();
        mutate(&mut cat);
        let r = audit(&settings(), &cat);
        r.breaches().map(|f| f.text()).collect()
    }

    type Mutation = Box<dyn FnOnce(&mut Catalog)>;

    #[test]
    fn a_twin_that_cannot_be_inlined_or_executed_is_a_warning() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "cannot inline it",
                Box::new(|c| c.rows_function.as_mut().unwrap().language = "plpgsql".into()),
            ),
            (
                "cannot inline it",
                Box::new(|c| c.rows_function.as_mut().unwrap().result = "text".into()),
            ),
            (
                "cannot execute",
                Box::new(|c| c.group_can_execute_rows_function = false),
            ),
        ];
        for (want, mutate) in cases {
            let mut cat = good_catalog();
            mutate(&mut cat);
            let r = audit(&settings(), &cat);
            assert_eq!(r.breaches().count(), 0, "{want}");
            assert!(
                r.findings.iter().any(|f| f.text().contains(want)),
                "{want}: {:?}",
                r.findings
            );
        }
    }

    #[test]
    fn every_breach_is_found() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("disabled", Box::new(|c| c.relations[0].rls = false)),
            ("not forced", Box::new(|c| c.relations[0].force = false)),
            ("missing", Box::new(|c| c.relations[0].policies.clear())),
            (
                "differs",
                Box::new(|c| c.relations[0].policies[0].using = Some("true".into())),
            ),
            (
                "differs",
                Box::new(|c| c.relations[0].policies[0].roles = vec!["someone".into()]),
            ),
            (
                "widens access",
                Box::new(|c| {
                    let mut p = c.relations[0].policies[0].clone();
                    p.name = "everyone".into();
                    p.using = Some("true".into());
                    c.relations[0].policies.push(p);
                }),
            ),
            (
                "owned by tenant role",
                Box::new(|c| c.relations[1].owner = "bulkhead_org_acme".into()),
            ),
            (
                "BYPASSRLS",
                Box::new(|c| c.tenant_roles[0].bypass_rls = true),
            ),
            (
                "SUPERUSER",
                Box::new(|c| c.tenant_roles[0].superuser = true),
            ),
            (
                "another organization's role",
                Box::new(|c| {
                    c.tenant_roles.push(RoleState {
                        name: "bulkhead_org_peer".into(),
                        in_group: true,
                        can_login: true,
                        ..Default::default()
                    });
                    c.tenant_roles[0].other_memberships = vec!["bulkhead_org_peer".into()];
                }),
            ),
            (
                "SECURITY DEFINER",
                Box::new(|c| c.definer_functions.push("public.leak()".into())),
            ),
            (
                "write the role mapping",
                Box::new(|c| c.mapping.as_mut().unwrap().group.insert = true),
            ),
            (
                "body differs",
                Box::new(|c| c.function.as_mut().unwrap().body = "SELECT 'x'".into()),
            ),
            ("does not exist", Box::new(|c| c.function = None)),
            (
                "twin, which the policies call, does not exist",
                Box::new(|c| c.rows_function = None),
            ),
            (
                "set-returning identity function's body differs",
                Box::new(|c| c.rows_function.as_mut().unwrap().body = "SELECT 'x'".into()),
            ),
            (
                "set-returning identity function is not STABLE",
                Box::new(|c| c.rows_function.as_mut().unwrap().volatility = "v".into()),
            ),
            (
                "set-returning identity function is SECURITY DEFINER",
                Box::new(|c| c.rows_function.as_mut().unwrap().security_definer = true),
            ),
            (
                "set-returning identity function neither pins",
                Box::new(|c| {
                    c.rows_function.as_mut().unwrap().config = vec!["search_path=public".into()]
                }),
            ),
            (
                "owned by tenant role bulkhead_org_acme",
                Box::new(|c| c.rows_function.as_mut().unwrap().owner = "bulkhead_org_acme".into()),
            ),
            (
                "search_path could change",
                Box::new(|c| {
                    c.function.as_mut().unwrap().config = vec!["search_path=public".into()]
                }),
            ),
            (
                "TRUNCATE",
                Box::new(|c| c.relations[0].group.truncate = true),
            ),
            (
                "mapped to an organization",
                Box::new(|c| c.group_mapped = true),
            ),
            (
                "can CREATE",
                Box::new(|c| {
                    c.group_schema_create.insert("public".into());
                }),
            ),
            (
                "tenants can CREATE in the operator's schema",
                Box::new(|c| {
                    c.tenant_schema_create
                        .push(("bulkhead".into(), "bulkhead_org_acme".into()));
                }),
            ),
            (
                "through PUBLIC",
                Box::new(|c| {
                    c.public_schema_create.insert("public".into());
                }),
            ),
            (
                "lacks its bounds",
                Box::new(|c| c.tenant_roles[0].config.clear()),
            ),
            (
                "CONNECTION LIMIT -1 instead of 20",
                Box::new(|c| c.tenant_roles[0].conn_limit = -1),
            ),
            (
                "statement_timeout is 0 instead of 30000",
                Box::new(|c| c.tenant_roles[0].config[0] = "statement_timeout=0".into()),
            ),
            (
                "permissive policy \"acme_only\" widens access",
                Box::new(|c| {
                    let mut p = c.relations[0].policies[0].clone();
                    p.name = "acme_only".into();
                    p.roles = vec!["bulkhead_org_acme".into()];
                    p.using = Some("true".into());
                    c.relations[0].policies.push(p);
                }),
            ),
            (
                "security_invoker",
                Box::new(|c| {
                    let mut v = good_table("all_messages");
                    v.kind = "v".into();
                    v.tenant_type = None;
                    c.relations.push(v);
                }),
            ),
        ];
        for (want, mutate) in cases {
            let found = breach_of(mutate);
            assert!(found.iter().any(|f| f.contains(want)), "{want}: {found:?}");
        }
    }

    #[test]
    fn connection_limits_that_overbook_the_server_are_a_warning() {
        let mut cat = good_catalog();
        cat.shared_connections = 100;
        assert!(audit(&settings(), &cat).findings.is_empty());
        cat.shared_connections = 19;
        let r = audit(&settings(), &cat);
        assert_eq!(r.breaches().count(), 0);
        assert!(
            r.findings[0]
                .message
                .contains("1 organizations × connectionLimit 20 exceed the 19"),
            "{:?}",
            r.findings
        );
    }

    #[test]
    fn breaches_lower_coverage_and_warnings_do_not() {
        let mut cat = good_catalog();
        cat.relations[0].indexed = false;
        let r = audit(&settings(), &cat);
        assert_eq!(r.coverage(), "2/2");
        assert_eq!(r.breaches().count(), 0);
        assert!(r.findings[0].message.contains("no index leads with org_id"));
        cat.relations[1].rls = false;
        assert_eq!(audit(&settings(), &cat).coverage(), "1/2");
    }

    #[test]
    fn shared_tables_are_reported_unless_excluded() {
        let mut cat = good_catalog();
        let mut plans = good_table("plans");
        plans.tenant_type = None;
        plans.policies.clear();
        cat.relations.push(plans);
        let r = audit(&settings(), &cat);
        assert!(
            r.findings
                .iter()
                .any(|f| f.subject == "table public.plans" && f.severity == Severity::Warning)
        );
        let s = Settings::from_spec(&spec_from(json!({"excludedTables": ["plans"]}))).unwrap();
        let r = audit(&s, &cat);
        assert!(
            !r.findings.iter().any(|f| f.subject == "table public.plans"),
            "{:?}",
            r.findings
        );
    }

    #[test]
    fn the_planned_bodies_are_qualified_in_every_mode() {
        for mode in ["role", "setting", "jwt"] {
            let s = Settings::from_spec(&spec_from(
                json!({"identityMode": mode, "jwtClaim": "o'rg", "settingName": "a.b"}),
            ))
            .unwrap();
            let body = plan::identity_body(&s);
            assert!(body_is_qualified(&body), "{mode}: {body}");
            assert!(search_path_safe(&body, &[]), "{mode}");
        }
    }

    #[test]
    fn unqualified_names_without_a_pinned_search_path_are_unsafe() {
        let ok = "RETURN (SELECT m.org_id FROM \"bulkhead\".\"tenant_roles\" m WHERE m.role_name OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);";
        assert!(body_is_qualified(ok));
        for bad in [
            // The earlier body: its cast and `=` resolve through the search_path.
            "RETURN (SELECT m.org_id FROM \"bulkhead\".\"tenant_roles\" m WHERE m.role_name = current_user::text);",
            "RETURN (SELECT m.org_id FROM tenant_roles m WHERE m.role_name OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);",
            "RETURN (SELECT m.org_id FROM \"tenant_roles\" m WHERE m.role_name OPERATOR(pg_catalog.=) CURRENT_USER::pg_catalog.text);",
            "RETURN NULLIF(pg_catalog.current_setting('x', true), '');",
            "RETURN current_setting('x', true);",
            "RETURN (pg_catalog.current_setting('x', true))::jsonb OPERATOR(pg_catalog.->>) 'o';",
            "RETURN pg_catalog.current_setting('x', true)::pg_catalog.jsonb ->> 'o';",
            "RETURN CAST(pg_catalog.current_setting('x', true) AS text);",
            "DECLARE v text; BEGIN RETURN v; END",
        ] {
            assert!(!body_is_qualified(bad), "{bad}");
            assert!(!search_path_safe(bad, &[]), "{bad}");
        }
        // Literals hold no names; a pinned search_path makes any body safe; another path does not.
        assert!(body_is_qualified("RETURN 'x = y(z)::text FROM t';"));
        let old = "RETURN (SELECT m.org_id FROM t m WHERE m.role_name = current_user::text);";
        assert!(search_path_safe(old, &[IDENTITY_CONFIG.into()]));
        assert!(!search_path_safe(
            ok,
            &["search_path=public, pg_catalog".into()]
        ));
        assert!(search_path_safe(ok, &["work_mem=64kB".into()]));
    }

    #[test]
    fn per_row_calls_are_told_apart() {
        assert!(calls_function_per_row("(org_id = auth.org_id())"));
        assert!(calls_function_per_row(
            "(org_id = current_setting('app.org'::text))"
        ));
        assert!(!calls_function_per_row(USING));
        assert!(!calls_function_per_row(
            "((org_id = ( SELECT auth.org_id() AS org_id)) OR ((scope)::text = 'system'::text))"
        ));
        assert!(!calls_function_per_row("(org_id = 'f(x)'::text)"));
        assert!(calls_function_per_row(
            "((org_id = ( SELECT auth.org_id() AS org_id)) OR lower(scope) = 'x')"
        ));
    }

    #[test]
    fn column_mentions_are_tokens() {
        assert!(mentions_column("(org_id = 'x'::text)", "org_id"));
        assert!(!mentions_column("(my_org_id = 'x'::text)", "org_id"));
        assert!(!mentions_column("true", "org_id"));
        assert!(mentions_column("(\"Org Id\" = 'x'::text)", "Org Id"));
    }

    #[test]
    fn the_table_is_readable() {
        let mut cat = good_catalog();
        cat.relations[0].rls = false;
        let text = render_table(&audit(&settings(), &cat));
        assert!(text.starts_with("RLS coverage: 1/2 tables governed\n"));
        assert!(text.contains("SEVERITY  SUBJECT"));
        assert!(
            text.contains("BREACH    table public.conversations  row-level security is disabled")
        );
        assert!(text.contains("1 finding(s): 1 breach(es), 0 warning(s)"));
        assert!(render_table(&audit(&settings(), &good_catalog())).contains("No findings."));
    }
}
