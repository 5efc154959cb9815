//! Property-based tests of bad input: org ids, display names, schema and table names and prefix
//! templates never change the meaning of the generated SQL, ACL rules or policy JSON. Pure: no
//! servers.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Value, json};

use bulkhead::api::platform::{CachePlatform, DatabasePlatform, GuardStyle, StoragePlatform};
use bulkhead::layers::cache::rules::{CacheRules, OWNER_RECORD_NAMESPACE, overlaps_owner_records};
use bulkhead::layers::database::catalog::{
    Catalog, Expected, PolicyState, Privileges, RoleState, TableState,
};
use bulkhead::layers::database::ident::{
    Ident, MAX_IDENT_BYTES, QualifiedName, quote_ident, quote_literal, role_name,
};
use bulkhead::layers::database::plan;
use bulkhead::layers::database::settings::Settings;
use bulkhead::layers::storage;
use bulkhead::layers::storage::policy::{BucketGuard, abac_policy, org_policy};
use bulkhead::tenant::{MAX_ORG_ID_LEN, OrgId, SENTINEL_ORG_ID, render_template};

/// `n` cases, failures reported here rather than saved to a regressions file (shrunk
/// counterexamples become plain unit tests next to the code they found wrong).
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Glob characters of Redis patterns and IAM ARNs, and the braces of templates.
const GLOB: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Pieces that make input interesting: quotes, globs, separators, unicode, SQL syntax.
fn nasty_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9_]{1,4}",
        1 => Just("\"".to_owned()),
        1 => Just("'".to_owned()),
        1 => Just("\\".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(" ".to_owned()),
        1 => Just("$".to_owned()),
        1 => Just("$bulkhead$".to_owned()),
        1 => Just("$$".to_owned()),
        1 => Just(";".to_owned()),
        1 => Just("--".to_owned()),
        1 => Just("/*".to_owned()),
        1 => Just("*".to_owned()),
        1 => Just("?".to_owned()),
        1 => Just("[".to_owned()),
        1 => Just("]".to_owned()),
        1 => Just("{".to_owned()),
        1 => Just("}".to_owned()),
        1 => Just("{orgId}".to_owned()),
        1 => Just("-".to_owned()),
        1 => Just("/".to_owned()),
        1 => Just("E'".to_owned()),
        1 => Just("é".to_owned()),
        1 => Just("\u{1F600}".to_owned()),
        1 => Just("\n".to_owned()),
        2 => any::<char>().prop_filter("no NUL", |c| *c != '\0').prop_map(String::from),
    ]
}

fn nasty_string(max_pieces: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(nasty_piece(), 0..max_pieces).prop_map(|v| v.concat())
}

/// A configured SQL name: any NUL-free string of 1-63 bytes.
fn sql_name() -> impl Strategy<Value = String> {
    nasty_string(12).prop_filter("valid identifier", |s| {
        !s.is_empty() && s.len() <= MAX_IDENT_BYTES
    })
}

/// Org ids that spell parts of the operator's own namespaces; every template is tried with them.
fn suspicious_orgs() -> Vec<OrgId> {
    ["bulkhead", "owners", "owner", "own", "o", "b", "bulk", "x"]
        .iter()
        .filter_map(|s| OrgId::parse(s).ok())
        .collect()
}

/// A valid org id (not the sentinel), biased to long ids sharing a prefix.
fn org_id() -> impl Strategy<Value = OrgId> {
    prop_oneof![
        3 => "[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?",
        1 => "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        1 => "a{40,62}[a-z0-9]",
        1 => prop_oneof![
            Just("bulkhead".to_owned()),
            Just("owner".to_owned()),
            Just("owners".to_owned()),
            Just("b".to_owned()),
            Just("bulk".to_owned()),
        ],
    ]
    .prop_filter_map("valid org id", |s| OrgId::parse(&s).ok())
}

// ---------------------------------------------------------------------------------------------
// A small SQL lexer: quoted identifiers, string literals (standard and E''), dollar quotes, and
// the bare text in between. It follows PostgreSQL's lexing rules for these forms.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Bare(String),
    Ident(String),
    Lit(String),
    Dollar(Vec<Tok>),
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

fn lex(sql: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut bare = String::new();
    let mut i = 0;
    let flush = |bare: &mut String, out: &mut Vec<Tok>| {
        if !bare.is_empty() {
            out.push(Tok::Bare(std::mem::take(bare)));
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\0' => return Err("NUL in SQL text".into()),
            '"' => {
                flush(&mut bare, &mut out);
                let mut name = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("unterminated identifier in {sql:?}")),
                        Some('"') if chars.get(i + 1) == Some(&'"') => {
                            name.push('"');
                            i += 2;
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(x) => {
                            name.push(*x);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Ident(name));
            }
            '\'' => {
                // `E'...'`: an E that is a word of its own (not the end of a longer word).
                let escaped = bare.ends_with(['E', 'e']) && {
                    let before: Vec<char> = bare.chars().collect();
                    before.len() < 2 || !is_ident_char(before[before.len() - 2])
                };
                if escaped {
                    bare.pop();
                }
                flush(&mut bare, &mut out);
                let mut value = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("unterminated literal in {sql:?}")),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            value.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some('\\') if escaped => match chars.get(i + 1) {
                            Some(e @ ('\\' | '\'')) => {
                                value.push(*e);
                                i += 2;
                            }
                            other => {
                                return Err(format!(
                                    "escape \\{other:?} in an E'' literal changes its value"
                                ));
                            }
                        },
                        Some(x) => {
                            value.push(*x);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Lit(value));
            }
            '$' if !bare.chars().last().is_some_and(is_ident_char) => {
                // A dollar-quote opener is `$tag$` with tag empty or an identifier; `$1` is a
                // parameter.
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphabetic()
                        || chars[j] == '_'
                        || (j > i + 1 && chars[j].is_ascii_digit()))
                {
                    j += 1;
                }
                if chars.get(j) == Some(&'$') {
                    let tag: String = chars[i..=j].iter().collect();
                    let rest: String = chars[j + 1..].iter().collect();
                    let Some(end) = rest.find(&tag) else {
                        return Err(format!("unterminated dollar quote {tag} in {sql:?}"));
                    };
                    flush(&mut bare, &mut out);
                    out.push(Tok::Dollar(lex(&rest[..end])?));
                    let consumed = rest[..end].chars().count() + tag.chars().count();
                    i = j + 1 + consumed;
                } else {
                    bare.push(c);
                    i += 1;
                }
            }
            _ => {
                bare.push(c);
                i += 1;
            }
        }
    }
    flush(&mut bare, &mut out);
    Ok(out)
}

/// Every identifier and literal of a token stream, recursively.
fn quoted_values(toks: &[Tok], out: &mut BTreeSet<String>) {
    for t in toks {
        match t {
            Tok::Ident(s) | Tok::Lit(s) => {
                out.insert(s.clone());
            }
            Tok::Dollar(inner) => quoted_values(inner, out),
            Tok::Bare(_) => {}
        }
    }
}

/// Renames identifiers and literals through `map`; the operator's hashed index names become one
/// placeholder (their hash covers the names).
fn rename(toks: &[Tok], map: &BTreeMap<String, String>) -> Vec<Tok> {
    let one = |s: &String| {
        if s.starts_with("bulkhead_org_idx_") && s.len() == "bulkhead_org_idx_".len() + 16 {
            "<index>".to_owned()
        } else {
            map.get(s).cloned().unwrap_or_else(|| s.clone())
        }
    };
    toks.iter()
        .map(|t| match t {
            Tok::Ident(s) => Tok::Ident(one(s)),
            Tok::Lit(s) => Tok::Lit(one(s)),
            Tok::Dollar(inner) => Tok::Dollar(rename(inner, map)),
            Tok::Bare(s) => Tok::Bare(s.clone()),
        })
        .collect()
}

/// Undoes [`quote_ident`]: strips the outer quotes and un-doubles inner ones; None if a quote is
/// unbalanced.
fn unquote_ident(q: &str) -> Option<String> {
    let inner = q.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut it = inner.chars();
    while let Some(c) = it.next() {
        if c == '"' && it.next() != Some('"') {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Org ids and templates
// ---------------------------------------------------------------------------------------------

fn is_conservative_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn org_ids_are_refused_or_conservative(raw in prop_oneof![
        nasty_string(10),
        "[-a-zA-Z0-9*?{}\\[\\]\\\\'\" /_.:]{0,70}",
        "[-a-z0-9]{0,70}",
    ]) {
        match OrgId::parse(&raw) {
            Ok(id) => {
                prop_assert_eq!(id.as_str(), raw.as_str());
                prop_assert!(is_conservative_label(&raw), "accepted {:?}", raw);
                prop_assert!(raw.len() <= MAX_ORG_ID_LEN);
                prop_assert!(!raw.contains(GLOB) && !raw.contains(['"', '\'', ' ', '/']));
                prop_assert_ne!(raw.as_str(), SENTINEL_ORG_ID);
            }
            // Completeness: only what breaks the rules (or is the sentinel) is refused.
            Err(_) => prop_assert!(!is_conservative_label(&raw) || raw == SENTINEL_ORG_ID, "refused {:?}", raw),
        }
    }

    #[test]
    fn namespace_templates_render_dns_labels_or_are_refused(
        template in prop_oneof![
            "[a-z0-9-]{0,8}\\{orgId\\}[a-z0-9-]{0,8}",
            nasty_string(6),
            Just("org-{orgId}".to_owned()),
        ],
        orgs in prop::collection::vec(org_id(), 1..6),
    ) {
        let checked = bulkhead::tenant::check_namespace_template(&template);
        for org in &orgs {
            match (checked.is_ok(), bulkhead::tenant::render_namespace(&template, org)) {
                (true, Ok(ns)) => {
                    prop_assert!(is_conservative_label(&ns), "{:?} -> {:?}", template, ns);
                    prop_assert_eq!(&ns, &render_template(&template, org));
                }
                (true, Err(_)) => {}
                (false, Ok(ns)) => prop_assert!(false, "refused template {:?} rendered {:?}", template, ns),
                (false, Err(_)) => {}
            }
        }
        // Distinct organizations never share a namespace.
        if checked.is_ok() {
            let mut seen = BTreeMap::new();
            for org in &orgs {
                if let Ok(ns) = bulkhead::tenant::render_namespace(&template, org)
                    && let Some(other) = seen.insert(ns.clone(), org.clone())
                {
                    prop_assert_eq!(&other, org, "{:?} shared by two orgs", ns);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL identifiers, literals and role names
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn quoted_identifiers_round_trip(name in prop_oneof![nasty_string(16), any::<String>()]
        .prop_filter("no NUL", |s| !s.contains('\0'))) {
        let q = quote_ident(&name);
        prop_assert!(q.starts_with('"') && q.ends_with('"') && q.len() >= 2);
        prop_assert_eq!(unquote_ident(&q), Some(name.clone()));
        // Lexed inside a statement, the identifier is one token that ends where it should.
        let toks = lex(&format!("SELECT {q} FROM t")).map_err(TestCaseError::fail)?;
        prop_assert_eq!(toks, vec![
            Tok::Bare("SELECT ".into()),
            Tok::Ident(name.clone()),
            Tok::Bare(" FROM t".into()),
        ]);
        match Ident::new(&name, "x") {
            Ok(id) => {
                prop_assert!(!name.is_empty() && name.len() <= MAX_IDENT_BYTES);
                prop_assert_eq!(id.to_string(), q.clone());
                prop_assert_eq!(id.quoted(), q);
            }
            Err(_) => prop_assert!(name.is_empty() || name.len() > MAX_IDENT_BYTES),
        }
    }

    #[test]
    fn quoted_literals_round_trip(value in prop_oneof![nasty_string(16), any::<String>()]
        .prop_filter("no NUL", |s| !s.contains('\0'))) {
        let toks = lex(&format!("SELECT {} AS x", quote_literal(&value))).map_err(TestCaseError::fail)?;
        prop_assert_eq!(toks, vec![
            Tok::Bare("SELECT ".into()),
            Tok::Lit(value.clone()),
            Tok::Bare(" AS x".into()),
        ]);
    }

    #[test]
    fn qualified_names_split_at_the_first_dot_and_stay_quoted(
        schema in sql_name().prop_filter("no dot", |s| !s.contains('.')),
        name in sql_name(),
    ) {
        let q = QualifiedName::parse(&format!("{schema}.{name}"), "f").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(q.schema.as_str(), schema.as_str());
        prop_assert_eq!(q.name.as_str(), name.as_str());
        let toks = lex(&q.to_string()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(toks, vec![Tok::Ident(schema), Tok::Bare(".".into()), Tok::Ident(name)]);
    }

    #[test]
    fn role_names_fit_and_never_collide(
        prefix in "[a-z0-9_]{1,30}",
        base in "[a-z0-9]{30,60}",
        tails in prop::collection::vec("[-a-z0-9]{0,20}[a-z0-9]", 2..40),
    ) {
        let mut seen: BTreeMap<String, OrgId> = BTreeMap::new();
        let ids = tails.iter().map(|t| format!("{base}{t}")).chain(tails.iter().cloned());
        for raw in ids {
            let Ok(org) = OrgId::parse(&raw) else { continue };
            let role = role_name(&prefix, &org);
            prop_assert!(role.len() <= MAX_IDENT_BYTES, "{:?}", role);
            prop_assert!(Ident::new(&role, "role").is_ok());
            prop_assert!(role.starts_with(&prefix));
            prop_assert_eq!(&role, &role_name(&prefix, &org));
            if let Some(other) = seen.insert(role.clone(), org.clone()) {
                prop_assert_eq!(other, org, "role {:?} shared", role);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Database plans: names only ever appear quoted, values only as literals or bound parameters.
// ---------------------------------------------------------------------------------------------

/// The configurable names of the database layer, in a fixed order.
#[derive(Clone, Debug)]
struct DbNames {
    schema0: String,
    schema1: String,
    operator_schema: String,
    function_schema: String,
    function_name: String,
    registry: String,
    tenant_column: String,
    group_role: String,
    table: String,
    shared_column: String,
    foreign_policy: String,
    sequence: String,
    other_role: String,
    embeddings_table: String,
    embedding_column: String,
}

impl DbNames {
    fn all(&self) -> Vec<&String> {
        vec![
            &self.schema0,
            &self.schema1,
            &self.operator_schema,
            &self.function_schema,
            &self.function_name,
            &self.registry,
            &self.tenant_column,
            &self.group_role,
            &self.table,
            &self.shared_column,
            &self.foreign_policy,
            &self.sequence,
            &self.other_role,
            &self.embeddings_table,
            &self.embedding_column,
        ]
    }

    /// The identity function's set-returning twin, named after it.
    fn rows_function(&self) -> String {
        format!("{}_rows", self.function_name)
    }

    /// The same configuration with plain names `n0`, `n1`, ...
    fn plain() -> Self {
        let n = |i: usize| format!("n{i}");
        Self {
            schema0: n(0),
            schema1: n(1),
            operator_schema: n(2),
            function_schema: n(3),
            function_name: n(4),
            registry: n(5),
            tenant_column: n(6),
            group_role: n(7),
            table: n(8),
            shared_column: n(9),
            foreign_policy: n(10),
            sequence: n(11),
            other_role: n(12),
            embeddings_table: n(13),
            embedding_column: n(14),
        }
    }
}

fn db_names() -> impl Strategy<Value = DbNames> {
    (
        prop::collection::vec(sql_name(), 13),
        sql_name().prop_filter("no dot", |s| !s.contains('.')),
        sql_name().prop_filter("group must not look like a tenant role", |s| {
            !s.starts_with("bulkhead_org_")
        }),
    )
        .prop_map(|(v, function_schema, group_role)| DbNames {
            schema0: v[0].clone(),
            schema1: v[1].clone(),
            operator_schema: v[2].clone(),
            function_schema,
            function_name: v[3].clone(),
            registry: v[4].clone(),
            tenant_column: v[5].clone(),
            group_role,
            table: v[6].clone(),
            shared_column: v[7].clone(),
            foreign_policy: v[8].clone(),
            sequence: v[9].clone(),
            other_role: v[10].clone(),
            embeddings_table: v[11].clone(),
            embedding_column: v[12].clone(),
        })
        .prop_filter("names pairwise distinct", |n| {
            let rows = n.rows_function();
            n.all().into_iter().collect::<BTreeSet<_>>().len() == n.all().len()
                && !n.all().contains(&&rows)
        })
}

#[derive(Clone, Debug)]
struct DbValues {
    setting_name: String,
    jwt_claim: String,
    shared_value: String,
    verifier: String,
    display_name: String,
    mode: &'static str,
}

fn db_values() -> impl Strategy<Value = DbValues> {
    (
        "[a-z_]{1,8}\\.[a-z0-9_]{1,8}",
        nasty_string(8).prop_filter("non-empty", |s| !s.is_empty()),
        nasty_string(8),
        nasty_string(8),
        nasty_string(8).prop_map(|s| format!("display:{s}")),
        prop_oneof![Just("role"), Just("setting"), Just("jwt")],
    )
        .prop_map(
            |(setting_name, jwt_claim, shared_value, verifier, display_name, mode)| DbValues {
                setting_name,
                jwt_claim,
                shared_value,
                verifier,
                display_name,
                mode,
            },
        )
}

fn db_settings(n: &DbNames, v: &DbValues) -> Result<Settings, String> {
    let spec: DatabasePlatform = serde_json::from_value(json!({
        "adminUrlSecretRef": {"name": "pg", "key": "url"},
        "schemas": [n.schema0, n.schema1],
        "tenantColumn": n.tenant_column,
        "operatorSchema": n.operator_schema,
        "identityFunction": format!("{}.{}", n.function_schema, n.function_name),
        "registryTable": n.registry,
        "identityMode": v.mode,
        "settingName": v.setting_name,
        "jwtClaim": v.jwt_claim,
        "groupRole": n.group_role,
        "overrides": [{"table": n.table, "sharedReadColumn": n.shared_column, "sharedReadValue": v.shared_value}],
        "excludedTables": [n.embeddings_table],
        "createIndexes": true,
        "embeddingsTable": n.embeddings_table,
        "embeddingColumn": n.embedding_column,
    }))
    .map_err(|e| e.to_string())?;
    Settings::from_spec(&spec).map_err(|e| e.to_string())
}

fn table_state(n: &DbNames) -> TableState {
    TableState {
        schema: n.schema0.clone(),
        name: n.table.clone(),
        kind: "r".into(),
        owner: n.other_role.clone(),
        rls: false,
        force: false,
        tenant_type: Some("text".into()),
        tenant_default: None,
        indexed: false,
        columns: vec![n.tenant_column.clone(), n.shared_column.clone()],
        group: Privileges {
            truncate: true,
            ..Privileges::default()
        },
        security_invoker: false,
        policies: vec![PolicyState {
            name: n.foreign_policy.clone(),
            permissive: true,
            command: "*".into(),
            roles: vec!["public".into()],
            applies_to_tenants: true,
            using: Some("true".into()),
            check: None,
        }],
        sequences_without_usage: vec![(n.schema0.clone(), n.sequence.clone())],
        expected: Some(Expected {
            using: "x".into(),
            check: "x".into(),
            shared_using: Some("x".into()),
            default: "x".into(),
        }),
    }
}

/// Every statement the pure database plans produce for these names, in a fixed order.
fn db_statements(s: &Settings, n: &DbNames, v: &DbValues, role: &str) -> Vec<String> {
    let mut out = Vec::new();
    let empty = Catalog {
        server_version: 170_000,
        ..Catalog::default()
    };
    let drifted_role = RoleState {
        name: role.to_owned(),
        superuser: true,
        other_memberships: vec![n.other_role.clone()],
        conn_limit: 1,
        ..RoleState::default()
    };
    let mut registry = table_state(n);
    registry.schema = n.schema0.clone();
    registry.name = n.registry.clone();
    let drifted = Catalog {
        group: Some(RoleState {
            name: n.group_role.clone(),
            superuser: true,
            other_memberships: vec![n.other_role.clone()],
            ..RoleState::default()
        }),
        group_mapped: true,
        public_schema_create: [n.schema0.clone()].into(),
        group_schema_create: [n.schema1.clone()].into(),
        tenant_schema_create: vec![(n.operator_schema.clone(), n.other_role.clone())],
        registry: Some(registry),
        tenant_roles: vec![drifted_role.clone()],
        ..empty.clone()
    };
    let t = table_state(n);
    for cat in [&empty, &drifted] {
        let p = plan::bootstrap(s, cat);
        out.extend(p.statements);
        out.extend(p.concurrent);
    }
    let p = plan::govern_table(s, &t);
    out.extend(p.statements);
    out.extend(p.concurrent);
    out.extend(plan::locks_table(s));
    out.push(plan::identity_function_sql(s));
    out.push(plan::delete_batch(s, &t, 500));
    for existing in [None, Some(&drifted_role)] {
        out.extend(plan::tenant_role(s, role, existing, Some(&v.verifier), 170_000).statements);
    }
    out.push(bulkhead::layers::database::registry_upsert_sql(s));
    out
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn database_plans_keep_their_meaning_for_any_names(
        names in db_names(),
        values in db_values(),
        org in org_id(),
    ) {
        let plain = DbNames::plain();
        let odd = db_settings(&names, &values).map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        let reference = db_settings(&plain, &values).map_err(TestCaseError::fail)?;
        let odd_role = role_name(&odd.role_prefix, &org);
        let plain_role = "r0".to_owned();
        let odd_sql = db_statements(&odd, &names, &values, &odd_role);
        let plain_sql = db_statements(&reference, &plain, &values, &plain_role);
        prop_assert_eq!(odd_sql.len(), plain_sql.len());

        let mut map: BTreeMap<String, String> = names
            .all()
            .into_iter()
            .zip(plain.all())
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        map.insert(odd_role.clone(), plain_role.clone());
        map.insert(names.rows_function(), plain.rows_function());
        // A generated name equal to one of the fixed words of the SQL ("C", "public", a policy
        // name) would be renamed there too; such a case proves nothing either way.
        let mut fixed = BTreeSet::new();
        for sql in &plain_sql {
            quoted_values(&lex(sql).map_err(TestCaseError::fail)?, &mut fixed);
        }
        for p in plain.all() {
            fixed.remove(p);
        }
        fixed.remove(&plain_role);
        fixed.remove(&plain.rows_function());
        prop_assume!(map.keys().all(|k| !fixed.contains(k)));

        for (a, b) in odd_sql.iter().zip(&plain_sql) {
            prop_assert!(!a.contains(&values.display_name), "display name pasted into {:?}", a);
            let ta = lex(a).map_err(TestCaseError::fail)?;
            let tb = lex(b).map_err(TestCaseError::fail)?;
            prop_assert_eq!(rename(&ta, &map), rename(&tb, &BTreeMap::new()), "\n{}\n{}", a, b);
        }
        // The registry row's values travel as parameters.
        let upsert = bulkhead::layers::database::registry_upsert_sql(&odd);
        prop_assert!(upsert.contains("VALUES ($1, $2)"), "{}", upsert);
    }

    #[test]
    fn database_names_are_validated_not_trusted(raw in nasty_string(40)) {
        let spec: DatabasePlatform = serde_json::from_value(json!({
            "adminUrlSecretRef": {"name": "pg", "key": "url"},
            "tenantColumn": raw,
        })).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match Settings::from_spec(&spec) {
            Ok(s) => {
                prop_assert!(!raw.is_empty() && raw.len() <= MAX_IDENT_BYTES);
                prop_assert_eq!(s.tenant_column.as_str(), raw.as_str());
            }
            Err(e) => {
                prop_assert!(raw.is_empty() || raw.len() > MAX_IDENT_BYTES, "{}", e);
                prop_assert!(e.to_string().contains("tenantColumn"), "{}", e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cache ACL rules
// ---------------------------------------------------------------------------------------------

fn cache_template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[A-Za-z0-9:._/|@#=-]{1,4}",
        1 => Just("{orgId}".to_owned()),
        1 => Just("bulkhead:".to_owned()),
        1 => Just("owner:".to_owned()),
        1 => Just("bulkhead:owner:".to_owned()),
        1 => Just("~".to_owned()),
        1 => Just("&".to_owned()),
        1 => Just("%".to_owned()),
        1 => Just("+".to_owned()),
        1 => Just("^".to_owned()),
        3 => nasty_piece(),
    ];
    prop_oneof![
        // Near-valid: the CRD's shape with a stray piece somewhere.
        2 => (
            "[A-Za-z0-9:._/|@#=-]{0,6}",
            prop::collection::vec(piece.clone(), 0..2),
            "[A-Z:._/|@#=][A-Za-z0-9:._/|@#=-]{0,6}",
            prop::collection::vec(piece.clone(), 0..2),
        )
            .prop_map(|(a, x, b, y)| format!("{a}{}{{orgId}}{b}{}", x.concat(), y.concat())),
        2 => (prop::option::of("[a-z]{1,3}"), prop::option::of("[a-z]{1,3}"))
            .prop_map(|(a, b)| format!("{}{{orgId}}:{}", a.map(|a| format!("bulkhead:{a}")).unwrap_or_else(|| "bulkhead:".into()), b.unwrap_or_default())),
        1 => prop::collection::vec(piece, 0..8).prop_map(|v| v.concat()),
    ]
}

fn cache_rules(key: &str, channel: &str, user_prefix: &str) -> Option<CacheRules> {
    let spec: CachePlatform = serde_json::from_value(json!({
        "adminUrlSecretRef": {"name": "redis", "key": "url"},
        "keyPrefix": key,
        "channelPrefix": channel,
        "userPrefix": user_prefix,
    }))
    .ok()?;
    CacheRules::from_spec(&spec).ok()
}

fn check_pattern(pattern: &str, prefix: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(pattern.strip_suffix('*'), Some(prefix));
    prop_assert!(!prefix.contains(GLOB), "glob in {:?}", prefix);
    prop_assert!(
        !prefix.chars().any(char::is_whitespace),
        "space in {:?}",
        prefix
    );
    prop_assert!(!prefix.is_empty());
    prop_assert!(
        !overlaps_owner_records(prefix),
        "{:?} overlaps owner records",
        prefix
    );
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn cache_acl_rules_hold_no_glob_from_the_input(
        key in cache_template(),
        channel in cache_template(),
        user_prefix in prop_oneof!["[A-Za-z0-9._-]{1,12}".prop_map(|s| s), nasty_string(4)],
        orgs in prop::collection::vec(org_id(), 1..6),
    ) {
        let Some(rules) = cache_rules(&key, &channel, &user_prefix) else {
            return Ok(());
        };
        // Accepted templates: `{orgId}` once, and nothing but safe characters around it.
        for t in [&key, &channel] {
            prop_assert_eq!(t.matches("{orgId}").count(), 1);
            prop_assert!(!t.replace("{orgId}", "").contains(GLOB), "{:?}", t);
        }
        let hash = "ab".repeat(32);
        let mut prefixes: Vec<(OrgId, String, String)> = Vec::new();
        let reference = rules.reference_plan();
        let planned = orgs
            .iter()
            .cloned()
            .chain(suspicious_orgs())
            .map(|o| {
                let plan = rules.plan(&o, &hash);
                (o, plan)
            });
        for (org, plan) in planned.chain(std::iter::once((OrgId::sentinel(), reference))) {
            let Ok(plan) = plan else {
                // Refused: the organization gets no user, no record.
                prop_assert!(rules.owner_record_key(&org).is_err());
                continue;
            };
            let key_prefix = render_template(&key, &org);
            let channel_prefix = render_template(&channel, &org);
            check_pattern(&plan.key_pattern, &key_prefix)?;
            check_pattern(&plan.channel_pattern, &channel_prefix)?;
            prop_assert_eq!(rules.scan_pattern(&org).ok(), Some(plan.key_pattern.clone()));
            prop_assert_eq!(&plan.user, &format!("{user_prefix}{org}"));
            prop_assert!(!plan.user.contains(GLOB) && !plan.user.chars().any(char::is_whitespace));
            let setuser = plan.setuser_rules();
            for rule in &setuser {
                prop_assert!(!rule.is_empty() && !rule.chars().any(char::is_whitespace), "{:?}", rule);
                prop_assert!(!rule.contains('\0'));
            }
            // Exactly one key rule and one channel rule, each the pattern; every other rule is
            // a flag, the password hash or a command rule.
            let keys: Vec<String> = setuser.iter().filter(|r| r.starts_with('~') || r.starts_with('%')).cloned().collect();
            let channels: Vec<String> = setuser.iter().filter(|r| r.starts_with('&')).cloned().collect();
            prop_assert_eq!(keys, vec![format!("~{}", plan.key_pattern)]);
            prop_assert_eq!(channels, vec![format!("&{}", plan.channel_pattern)]);
            for rule in &setuser {
                let kind_ok = matches!(rule.as_str(), "reset" | "on" | "off")
                    || rule.starts_with(['~', '&', '+', '-'])
                    || (rule.starts_with('#') && rule.len() == 65);
                prop_assert!(kind_ok, "unexpected rule {:?}", rule);
                prop_assert!(!matches!(rule.as_str(), "allkeys" | "allchannels" | "nopass" | "resetkeys" | "resetchannels" | "+@all"), "{:?}", rule);
            }
            // The owner record lies outside every pattern of this organization.
            let record = rules.owner_record_key(&org).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(record.starts_with(OWNER_RECORD_NAMESPACE));
            prop_assert!(!record.starts_with(&key_prefix) && !record.starts_with(&channel_prefix));
            prefixes.push((org, key_prefix, channel_prefix));
        }
        // No organization's pattern matches another's keys or channels.
        for (a, ka, ca) in &prefixes {
            for (b, kb, cb) in &prefixes {
                if a != b {
                    prop_assert!(!kb.starts_with(ka.as_str()), "{:?} covers {:?}", ka, kb);
                    prop_assert!(!cb.starts_with(ca.as_str()), "{:?} covers {:?}", ca, cb);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Storage policy JSON
// ---------------------------------------------------------------------------------------------

fn storage_template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[A-Za-z0-9_-]{1,4}",
        3 => Just("/".to_owned()),
        2 => Just("{orgId}".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just(".bulkhead/".to_owned()),
        1 => Just("owners/".to_owned()),
        1 => Just(".bulkhead/owners/".to_owned()),
        1 => Just("${aws:username}".to_owned()),
        1 => Just("$".to_owned()),
        2 => nasty_piece(),
    ];
    prop_oneof![
        // Near the owner records' namespace `.bulkhead/owners/`.
        2 => (
            prop_oneof![Just(""), Just("."), Just(".bulkhead/"), Just(".bulkhead/own"), Just("bulkhead/")],
            prop_oneof![Just("/"), Just("s/"), Just("/owners/"), Just("ers/"), Just("-x/")],
        )
            .prop_map(|(a, b)| format!("{a}{{orgId}}{b}")),
        2 => ("[A-Za-z0-9._-]{0,5}/?", "[A-Za-z0-9._/-]{0,5}/")
            .prop_map(|(a, b)| format!("{a}{{orgId}}{b}")),
        1 => prop::collection::vec(piece.clone(), 0..4)
            .prop_map(|v| format!("{}{{orgId}}/", v.concat())),
        2 => prop::collection::vec(piece, 0..8).prop_map(|v| format!("{}/", v.concat())),
    ]
}

fn storage_spec(template: &str) -> StoragePlatform {
    serde_json::from_value(json!({
        "bucket": "files",
        "adminSecretRef": {"name": "s3"},
        "prefixTemplate": template,
    }))
    .expect("storage spec")
}

fn resources(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for st in doc["Statement"].as_array().into_iter().flatten() {
        for key in ["Resource", "NotResource"] {
            for r in st[key].as_array().into_iter().flatten() {
                out.push(r.as_str().unwrap_or_default().to_owned());
            }
        }
    }
    out
}

fn check_json_round_trip(doc: &Value, text: &str) -> Result<(), TestCaseError> {
    let back: Value = serde_json::from_str(text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, doc);
    prop_assert!(bulkhead::layers::storage::policy::same_document(&back, doc));
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn storage_policies_stay_inside_the_rendered_prefix(
        template in storage_template(),
        orgs in prop::collection::vec(org_id(), 1..6),
    ) {
        let accepted = storage::validate(&storage_spec(&template)).is_ok();
        if !accepted {
            return Ok(());
        }
        prop_assert_eq!(template.matches("{orgId}").count(), 1);
        prop_assert!(!template.starts_with('/') && template.ends_with('/'));
        let literal = template.replace("{orgId}", "x");
        prop_assert!(!literal.contains(GLOB) && !literal.contains(['$', ' ', '"', '\'']), "{:?}", template);
        for segment in literal.strip_suffix('/').unwrap_or(&literal).split('/') {
            prop_assert!(!segment.is_empty() && segment != "." && segment != "..", "{:?} escapes its prefix", template);
        }
        let mut rendered = Vec::new();
        for org in orgs.iter().cloned().chain(suspicious_orgs()).chain([OrgId::sentinel()]) {
            let prefix = render_template(&template, &org);
            prop_assert!(!prefix.contains(GLOB) && !prefix.contains('$'));
            prop_assert!(
                !prefix.starts_with(".bulkhead/owners/") && !".bulkhead/owners/".starts_with(prefix.as_str()),
                "{:?} renders {:?} over the owner records", template, prefix
            );
            let doc = org_policy("files", &prefix);
            let value = doc.to_value();
            check_json_round_trip(&value, &doc.to_json())?;
            let objects = format!("arn:aws:s3:::files/{prefix}*");
            for r in resources(&value) {
                prop_assert!(r == objects || r == "arn:aws:s3:::files", "{:?} outside {:?}", r, prefix);
            }
            prop_assert_eq!(
                &value["Statement"][1]["Condition"]["StringLike"]["s3:prefix"],
                &json!([format!("{prefix}*")])
            );
            rendered.push((org, prefix));
        }
        // No organization's prefix contains another's.
        for (a, pa) in &rendered {
            for (b, pb) in &rendered {
                if a != b {
                    prop_assert!(!pb.starts_with(pa.as_str()), "{:?} covers {:?}", pa, pb);
                }
            }
        }
        // The guard and the abac policy: the prefix pattern with a policy variable, from serde.
        for (by_tag, var) in [(false, "${aws:username}"), (true, "${aws:PrincipalTag/org_id}")] {
            for style in [GuardStyle::AllUsers, GuardStyle::PathCondition] {
                let guard = BucketGuard {
                    style,
                    account_id: "000000000000".into(),
                    bucket: "files".into(),
                    prefix_template: template.clone(),
                    iam_path: "/bulkhead/".into(),
                    by_tag,
                    exempt_users: vec!["admin".into()],
                    sessions: None,
                };
                let own = format!("arn:aws:s3:::files/{}*", template.replace("{orgId}", var));
                for st in guard.statement_values() {
                    check_json_round_trip(&st, &st.to_string())?;
                    let doc = json!({"Statement": [st]});
                    for r in resources(&doc) {
                        prop_assert!(r == own || r == "arn:aws:s3:::files", "{:?}", r);
                    }
                }
            }
            if by_tag {
                let doc = abac_policy("files", &template);
                let value = doc.to_value();
                check_json_round_trip(&value, &doc.to_json())?;
                let own = format!("arn:aws:s3:::files/{}*", template.replace("{orgId}", var));
                for r in resources(&value) {
                    prop_assert!(r == own || r == "arn:aws:s3:::files", "{:?}", r);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection URLs: credentials with any characters reach the client unchanged.
// ---------------------------------------------------------------------------------------------

fn credential() -> impl Strategy<Value = String> {
    prop_oneof![
        nasty_string(12),
        any::<String>(),
        Just("p@ss:w/rd?#%25&=+ ".to_owned()),
    ]
    .prop_filter("non-empty, no NUL", |s| !s.is_empty() && !s.contains('\0'))
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn connection_urls_carry_credentials_unchanged(
        user in credential(),
        password in credential(),
        dbname in credential(),
        db in 0i64..16,
        tls in any::<bool>(),
        mode in prop::sample::select(vec!["disable", "require", "verify-ca", "verify-full"]),
    ) {
        use bulkhead::layers::database::connect;
        let mode = connect::SslMode::parse(mode).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let url = bulkhead::layers::database::tenant_url(
            "127.0.0.1:5432", &dbname, &user, &password, &connect::tenant_url_query(mode),
        );
        // The TLS parameters are the query's only ones, and what is left parses unchanged.
        let split = connect::split_url_tls(&url);
        let want = (mode != connect::SslMode::Disable).then(|| mode.as_str().to_owned());
        prop_assert_eq!(split.sslmode, want);
        prop_assert_eq!(split.sslrootcert, None);
        let cfg: tokio_postgres::Config = split.url
            .parse()
            .map_err(|e: tokio_postgres::Error| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(cfg.get_user(), Some(user.as_str()));
        prop_assert_eq!(cfg.get_password(), Some(password.as_bytes()));
        prop_assert_eq!(cfg.get_dbname(), Some(dbname.as_str()));
        prop_assert_eq!(cfg.get_ports(), &[5432]);
        prop_assert_eq!(cfg.get_hosts().len(), 1);

        let url = bulkhead::layers::cache::rules::tenant_url(tls, &user, &password, "127.0.0.1:6379", db);
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(info.redis_settings().username(), Some(user.as_str()));
        prop_assert_eq!(info.redis_settings().password(), Some(password.as_str()));
        prop_assert_eq!(info.redis_settings().db(), db);
        prop_assert_eq!(info.addr().to_string(), "127.0.0.1:6379");
    }
}
