//! A snapshot of what the database holds: the input of the pure plan and audit.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use super::ident::QualifiedName;
use super::plan;
use super::settings::{POLICY, SHARED_READ_POLICY, Settings};
use crate::layers::LayerError;

/// Attributes of a role that matter to isolation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    pub name: String,
    /// Organization it maps to, when it has a mapping row.
    pub org_id: Option<String>,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub create_role: bool,
    pub create_db: bool,
    pub can_login: bool,
    pub in_group: bool,
    /// Roles it is a direct member of, other than the group.
    pub other_memberships: Vec<String>,
}

/// The identity function as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionState {
    pub body: String,
    pub volatility: String,
    /// `proparallel`: `s`, `r` or `u`.
    pub parallel: String,
    pub language: String,
    pub security_definer: bool,
    pub config: Vec<String>,
    pub owner: String,
    pub result: String,
}

/// One row-security policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyState {
    pub name: String,
    pub permissive: bool,
    /// `r`, `a`, `w`, `d` or `*`.
    pub command: String,
    pub roles: Vec<String>,
    /// Applies to PUBLIC, the group, or a role the group belongs to.
    pub applies_to_tenants: bool,
    pub using: Option<String>,
    pub check: Option<String>,
}

/// Privileges the group role holds on a relation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    pub select: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    pub references: bool,
    pub trigger: bool,
}

/// What the planned policy and default look like once PostgreSQL has parsed them, as
/// `pg_get_expr` prints them for this table's column types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub using: String,
    pub check: String,
    pub shared_using: Option<String>,
    pub default: String,
}

/// A relation in a governed schema (or one of the operator's tables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableState {
    pub schema: String,
    pub name: String,
    /// `r`, `p`, `v`, `m`, `f`.
    pub kind: String,
    pub owner: String,
    pub rls: bool,
    pub force: bool,
    /// Type of the tenant column; None when the relation lacks it.
    pub tenant_type: Option<String>,
    pub tenant_default: Option<String>,
    /// A valid index leads with the tenant column.
    pub indexed: bool,
    pub columns: Vec<String>,
    pub group: Privileges,
    /// `security_invoker=true` is set (views).
    pub security_invoker: bool,
    pub policies: Vec<PolicyState>,
    /// Sequences owned by the table's columns on which the group lacks USAGE (schema, name).
    pub sequences_without_usage: Vec<(String, String)>,
    /// None when the identity function is missing or the planned policy cannot be built here.
    pub expected: Option<Expected>,
}

impl TableState {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
    pub fn is_table(&self) -> bool {
        self.kind == "r" || self.kind == "p"
    }
    pub fn has_tenant_column(&self) -> bool {
        self.tenant_type.is_some()
    }
    pub fn policy(&self, name: &str) -> Option<&PolicyState> {
        self.policies.iter().find(|p| p.name == name)
    }
    pub fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }
}

/// Everything the plan and the audit look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub schemas: BTreeSet<String>,
    /// Governed schemas where the group has USAGE / CREATE.
    pub group_schema_usage: BTreeSet<String>,
    pub group_schema_create: BTreeSet<String>,
    pub group: Option<RoleState>,
    /// The group appears in the mapping table.
    pub group_mapped: bool,
    pub function: Option<FunctionState>,
    pub group_can_execute_function: bool,
    pub mapping: Option<TableState>,
    pub registry: Option<TableState>,
    pub relations: Vec<TableState>,
    pub tenant_roles: Vec<RoleState>,
    /// SECURITY DEFINER functions the group can execute (regprocedure text).
    pub definer_functions: Vec<String>,
    /// Name of the session user reading the snapshot.
    pub reader: String,
}

impl Catalog {
    /// Tables with the tenant column: the ones the operator governs.
    pub fn tenant_tables(&self) -> impl Iterator<Item = &TableState> {
        self.relations
            .iter()
            .filter(|t| t.is_table() && t.has_tenant_column())
    }
    /// Tenant tables the planned policy fits (tenant column of a comparable type): the ones
    /// canaries, probes and deletions work on.
    pub fn governable_tables(&self) -> impl Iterator<Item = &TableState> {
        self.tenant_tables().filter(|t| t.expected.is_some())
    }
    pub fn tenant_role_names(&self) -> BTreeSet<&str> {
        self.tenant_roles.iter().map(|r| r.name.as_str()).collect()
    }
}

fn db(e: tokio_postgres::Error) -> LayerError {
    LayerError::Backend(super::describe(&e))
}

const RELATIONS_SQL: &str = r#"
SELECT n.nspname::text, c.relname::text, c.relkind::text, pg_catalog.pg_get_userbyid(c.relowner)::text,
       c.relrowsecurity, c.relforcerowsecurity,
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       pg_catalog.pg_get_expr(d.adbin, d.adrelid),
       COALESCE((SELECT true FROM pg_catalog.pg_index i
                 WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum AND i.indisvalid LIMIT 1), false),
       ARRAY(SELECT x.attname::text FROM pg_catalog.pg_attribute x
             WHERE x.attrelid = c.oid AND x.attnum > 0 AND NOT x.attisdropped ORDER BY x.attnum),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'SELECT'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'INSERT'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'UPDATE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'DELETE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'TRUNCATE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'REFERENCES'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'TRIGGER'), false),
       COALESCE('security_invoker=true' = ANY(c.reloptions) OR 'security_invoker=on' = ANY(c.reloptions), false),
       ARRAY(SELECT ROW(p.polname::text, p.polpermissive, p.polcmd::text,
                 ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_catalog.pg_get_userbyid(r)::text END
                       FROM unnest(p.polroles) r),
                 (0 = ANY(p.polroles)) OR COALESCE((SELECT bool_or(r = g.oid OR pg_catalog.pg_has_role(g.oid, r, 'MEMBER'))
                       FROM unnest(p.polroles) r WHERE r <> 0), false),
                 pg_catalog.pg_get_expr(p.polqual, p.polrelid),
                 pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))::text
             FROM pg_catalog.pg_policy p WHERE p.polrelid = c.oid ORDER BY p.polname),
       ARRAY(SELECT ROW(sn.nspname::text, sq.relname::text)::text
             FROM pg_catalog.pg_depend dp
             JOIN pg_catalog.pg_class sq ON sq.oid = dp.objid AND sq.relkind = 'S'
             JOIN pg_catalog.pg_namespace sn ON sn.oid = sq.relnamespace
             WHERE dp.classid = 'pg_catalog.pg_class'::regclass AND dp.refobjid = c.oid AND dp.deptype IN ('a', 'i')
               AND NOT COALESCE(CASE WHEN sq.relkind = 'S' THEN pg_catalog.has_sequence_privilege(g.oid, sq.oid, 'USAGE') END, true)
             ORDER BY sq.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_roles g ON g.rolname = $2
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (n.nspname = ANY($1) OR c.oid = ANY(ARRAY(SELECT pg_catalog.to_regclass(x) FROM unnest($4::text[]) x)))
ORDER BY n.nspname, c.relname
"#;

/// Reads the snapshot. `expected` computes the planned policy texts through throw-away temporary
/// tables inside a savepoint, so it needs a transaction (`client` is one).
pub async fn read(client: &impl GenericClient, s: &Settings) -> Result<Catalog, LayerError> {
    let mut cat = Catalog::default();
    let group = s.group_role.as_str();
    cat.reader = client
        .query_one("SELECT session_user::text", &[])
        .await
        .map_err(db)?
        .get(0);

    let wanted: Vec<String> = s
        .schema_names()
        .into_iter()
        .chain([
            s.operator_schema.as_str().to_owned(),
            s.identity_function.schema.as_str().to_owned(),
        ])
        .collect();
    for row in client
        .query(
            "SELECT n.nspname::text,
                    COALESCE(pg_catalog.has_schema_privilege(g.oid, n.oid, 'USAGE'), false),
                    COALESCE(pg_catalog.has_schema_privilege(g.oid, n.oid, 'CREATE'), false)
             FROM pg_catalog.pg_namespace n LEFT JOIN pg_catalog.pg_roles g ON g.rolname = $2
             WHERE n.nspname = ANY($1)",
            &[&wanted, &group],
        )
        .await
        .map_err(db)?
    {
        let name: String = row.get(0);
        if row.get::<_, bool>(1) {
            cat.group_schema_usage.insert(name.clone());
        }
        if row.get::<_, bool>(2) {
            cat.group_schema_create.insert(name.clone());
        }
        cat.schemas.insert(name);
    }

    if let Some(row) = client
        .query_opt(
            "SELECT rolname::text, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin,
                    ARRAY(SELECT pg_catalog.pg_get_userbyid(m.roleid)::text FROM pg_catalog.pg_auth_members m
                          WHERE m.member = r.oid ORDER BY 1)
             FROM pg_catalog.pg_roles r WHERE rolname = $1",
            &[&group],
        )
        .await
        .map_err(db)?
    {
        cat.group = Some(RoleState {
            name: row.get(0),
            org_id: None,
            superuser: row.get(1),
            bypass_rls: row.get(2),
            create_role: row.get(3),
            create_db: row.get(4),
            can_login: row.get(5),
            in_group: false,
            other_memberships: row.get(6),
        });
    }

    if let Some(row) = client
        .query_opt(
            "SELECT p.prosrc, p.provolatile::text, p.prosecdef, COALESCE(p.proconfig, '{}')::text[],
                    pg_catalog.pg_get_userbyid(p.proowner)::text, pg_catalog.pg_get_function_result(p.oid),
                    COALESCE(pg_catalog.has_function_privilege(g.oid, p.oid, 'EXECUTE'), false),
                    p.proparallel::text, (SELECT l.lanname::text FROM pg_catalog.pg_language l WHERE l.oid = p.prolang)
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
             LEFT JOIN pg_catalog.pg_roles g ON g.rolname = $3
             WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0",
            &[&s.identity_function.schema.as_str(), &s.identity_function.name.as_str(), &group],
        )
        .await
        .map_err(db)?
    {
        cat.function = Some(FunctionState {
            body: row.get(0),
            volatility: row.get(1),
            parallel: row.get(7),
            language: row.get(8),
            security_definer: row.get(2),
            config: row.get(3),
            owner: row.get(4),
            result: row.get(5),
        });
        cat.group_can_execute_function = row.get(6);
    }

    let extra = vec![s.mapping.to_string(), s.registry.to_string()];
    let rows = client
        .query(
            RELATIONS_SQL,
            &[&s.schema_names(), &group, &s.tenant_column.as_str(), &extra],
        )
        .await
        .map_err(db)?;
    for row in rows {
        let policies: Vec<String> = row.get(18);
        let t = TableState {
            schema: row.get(0),
            name: row.get(1),
            kind: row.get(2),
            owner: row.get(3),
            rls: row.get(4),
            force: row.get(5),
            tenant_type: row.get(6),
            tenant_default: row.get(7),
            indexed: row.get(8),
            columns: row.get(9),
            group: Privileges {
                select: row.get(10),
                insert: row.get(11),
                update: row.get(12),
                delete: row.get(13),
                truncate: row.get(14),
                references: row.get(15),
                trigger: row.get(16),
            },
            security_invoker: row.get(17),
            policies: policies
                .iter()
                .filter_map(|p| parse_policy_record(p))
                .collect(),
            sequences_without_usage: row
                .get::<_, Vec<String>>(19)
                .iter()
                .filter_map(|r| match parse_record(r)?.as_slice() {
                    [Some(a), Some(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                })
                .collect(),
            expected: None,
        };
        if t.schema == s.mapping.schema.as_str() && t.name == s.mapping.name.as_str() {
            cat.mapping = Some(t);
        } else if t.schema == s.registry.schema.as_str() && t.name == s.registry.name.as_str() {
            cat.registry = Some(t);
        } else if s.schema_names().contains(&t.schema) {
            cat.relations.push(t);
        }
    }

    if cat.mapping.is_some() {
        let sql = format!(
            "SELECT r.rolname::text, m.org_id, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
                    r.rolcanlogin, COALESCE(r.oid IN (SELECT member FROM pg_catalog.pg_auth_members WHERE roleid = g.oid), false),
                    ARRAY(SELECT pg_catalog.pg_get_userbyid(am.roleid)::text FROM pg_catalog.pg_auth_members am
                          WHERE am.member = r.oid AND am.roleid IS DISTINCT FROM g.oid ORDER BY 1)
             FROM pg_catalog.pg_roles r
             LEFT JOIN pg_catalog.pg_roles g ON g.rolname = $1
             LEFT JOIN {} m ON m.role_name = r.rolname::text
             WHERE (r.oid IN (SELECT member FROM pg_catalog.pg_auth_members WHERE roleid = g.oid)
                    OR m.role_name IS NOT NULL) AND r.rolname <> $1
             ORDER BY 1",
            s.mapping
        );
        for row in client.query(&sql, &[&group]).await.map_err(db)? {
            cat.tenant_roles.push(RoleState {
                name: row.get(0),
                org_id: row.get(1),
                superuser: row.get(2),
                bypass_rls: row.get(3),
                create_role: row.get(4),
                create_db: row.get(5),
                can_login: row.get(6),
                in_group: row.get(7),
                other_memberships: row.get(8),
            });
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE role_name = $1)",
            s.mapping
        );
        cat.group_mapped = client.query_one(&sql, &[&group]).await.map_err(db)?.get(0);
    }

    if cat.group.is_some() {
        for row in client
            .query(
                "SELECT p.oid::pg_catalog.regprocedure::text
                 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                 JOIN pg_catalog.pg_roles g ON g.rolname = $1
                 WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND pg_catalog.has_function_privilege(g.oid, p.oid, 'EXECUTE')
                   AND pg_catalog.has_schema_privilege(g.oid, n.oid, 'USAGE')
                 ORDER BY 1",
                &[&group],
            )
            .await
            .map_err(db)?
        {
            cat.definer_functions.push(row.get(0));
        }
    }

    if cat.function.is_some() {
        let mut targets: Vec<usize> = cat
            .relations
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_table() && t.has_tenant_column())
            .map(|(i, _)| i)
            .collect();
        targets.sort_unstable();
        for i in targets {
            let qn = QualifiedName::new(
                super::ident::Ident::new(&cat.relations[i].schema, "schema")
                    .map_err(|e| LayerError::Backend(e.to_string()))?,
                super::ident::Ident::new(&cat.relations[i].name, "table")
                    .map_err(|e| LayerError::Backend(e.to_string()))?,
            );
            cat.relations[i].expected =
                expected_texts(client, s, &qn, &cat.relations[i].name).await?;
        }
    }
    Ok(cat)
}

/// Reads one login role's state (attributes, memberships, mapping).
pub async fn read_role(
    client: &impl GenericClient,
    s: &Settings,
    role: &str,
) -> Result<Option<RoleState>, LayerError> {
    let sql = format!(
        "SELECT r.rolname::text, (SELECT m.org_id FROM {} m WHERE m.role_name = r.rolname::text),
                r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
                COALESCE(r.oid IN (SELECT member FROM pg_catalog.pg_auth_members WHERE roleid = g.oid), false),
                ARRAY(SELECT pg_catalog.pg_get_userbyid(am.roleid)::text FROM pg_catalog.pg_auth_members am
                      WHERE am.member = r.oid AND am.roleid IS DISTINCT FROM g.oid ORDER BY 1)
         FROM pg_catalog.pg_roles r LEFT JOIN pg_catalog.pg_roles g ON g.rolname = $2
         WHERE r.rolname = $1",
        s.mapping
    );
    let row = client
        .query_opt(&sql, &[&role, &s.group_role.as_str()])
        .await
        .map_err(db)?;
    Ok(row.map(|row| RoleState {
        name: row.get(0),
        org_id: row.get(1),
        superuser: row.get(2),
        bypass_rls: row.get(3),
        create_role: row.get(4),
        create_db: row.get(5),
        can_login: row.get(6),
        in_group: row.get(7),
        other_memberships: row.get(8),
    }))
}

/// Builds the planned policy on a temporary copy of the table's columns and reads it back, so
/// the comparison with the real policy is exact for these column types and this search_path.
async fn expected_texts(
    client: &impl GenericClient,
    s: &Settings,
    table: &QualifiedName,
    table_name: &str,
) -> Result<Option<Expected>, LayerError> {
    client
        .batch_execute("SAVEPOINT bulkhead_shape")
        .await
        .map_err(db)?;
    let shape = "pg_temp.bulkhead_shape";
    let mut stmts = vec![
        format!("CREATE TEMPORARY TABLE bulkhead_shape (LIKE {table})"),
        format!(
            "CREATE POLICY {} ON {shape} USING ({}) WITH CHECK ({})",
            super::ident::quote_ident(POLICY),
            plan::policy_using(s),
            plan::policy_check(s, s.shared_read(table_name))
        ),
        format!(
            "ALTER TABLE {shape} ALTER COLUMN {} SET DEFAULT {}()",
            s.tenant_column, s.identity_function
        ),
    ];
    if let Some(sr) = s.shared_read(table_name) {
        stmts.push(format!(
            "CREATE POLICY {} ON {shape} FOR SELECT USING ({})",
            super::ident::quote_ident(SHARED_READ_POLICY),
            plan::shared_read_using(sr)
        ));
    }
    let mut built = true;
    for stmt in &stmts {
        if client.batch_execute(stmt).await.is_err() {
            built = false;
            break;
        }
    }
    let out = if built {
        let rows = client
            .query(
                "SELECT p.polname::text, pg_catalog.pg_get_expr(p.polqual, p.polrelid),
                        pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)
                 FROM pg_catalog.pg_policy p WHERE p.polrelid = 'pg_temp.bulkhead_shape'::regclass",
                &[],
            )
            .await
            .map_err(db)?;
        let default: Option<String> = client
            .query_one(
                "SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                 WHERE d.adrelid = 'pg_temp.bulkhead_shape'::regclass AND a.attname = $1",
                &[&s.tenant_column.as_str()],
            )
            .await
            .map_err(db)?
            .get(0);
        let mut exp = Expected {
            using: String::new(),
            check: String::new(),
            shared_using: None,
            default: default.unwrap_or_default(),
        };
        for row in rows {
            let name: String = row.get(0);
            if name == POLICY {
                exp.using = row.get::<_, Option<String>>(1).unwrap_or_default();
                exp.check = row.get::<_, Option<String>>(2).unwrap_or_default();
            } else {
                exp.shared_using = row.get(1);
            }
        }
        Some(exp)
    } else {
        None
    };
    client
        .batch_execute("ROLLBACK TO SAVEPOINT bulkhead_shape; RELEASE SAVEPOINT bulkhead_shape")
        .await
        .map_err(db)?;
    Ok(out)
}

/// Parses the text form of `ROW(name, permissive, cmd, roles[], applies, using, check)`.
fn parse_policy_record(text: &str) -> Option<PolicyState> {
    let fields = parse_record(text)?;
    if fields.len() != 7 {
        return None;
    }
    Some(PolicyState {
        name: fields[0].clone()?,
        permissive: fields[1].as_deref() == Some("t"),
        command: fields[2].clone()?,
        roles: fields[3].as_deref().map(parse_array).unwrap_or_default(),
        applies_to_tenants: fields[4].as_deref() == Some("t"),
        using: fields[5].clone(),
        check: fields[6].clone(),
    })
}

/// Splits a composite's text output into fields (None for NULL), undoing its quoting.
pub(crate) fn parse_record(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        let mut field = String::new();
        let mut quoted_any = false;
        let mut in_quotes = false;
        while let Some(&c) = chars.peek() {
            if in_quotes {
                chars.next();
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => in_quotes = false,
                    '\\' => field.push(chars.next()?),
                    _ => field.push(c),
                }
            } else if c == ',' {
                break;
            } else {
                chars.next();
                match c {
                    '"' => {
                        in_quotes = true;
                        quoted_any = true;
                    }
                    '\\' => field.push(chars.next()?),
                    _ => field.push(c),
                }
            }
        }
        out.push(if field.is_empty() && !quoted_any {
            None
        } else {
            Some(field)
        });
        if chars.next().is_none() {
            break;
        }
    }
    Some(out)
}

/// Splits a one-dimensional text array's output (`{a,"b c"}`).
pub(crate) fn parse_array(text: &str) -> Vec<String> {
    let Some(inner) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) else {
        return Vec::new();
    };
    if inner.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        let mut field = String::new();
        let mut in_quotes = false;
        while let Some(&c) = chars.peek() {
            if !in_quotes && c == ',' {
                break;
            }
            chars.next();
            match c {
                '"' => in_quotes = !in_quotes,
                '\\' => {
                    if let Some(n) = chars.next() {
                        field.push(n);
                    }
                }
                _ => field.push(c),
            }
        }
        out.push(field);
        if chars.next().is_none() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_arrays_parse() {
        let rec = r#"(bulkhead_isolation,t,*,{public},t,"(org_id = ( SELECT auth.org_id() AS org_id))","(a, ""b"")")"#;
        let p = parse_policy_record(rec).unwrap();
        assert_eq!(p.name, "bulkhead_isolation");
        assert!(p.permissive && p.applies_to_tenants);
        assert_eq!(p.command, "*");
        assert_eq!(p.roles, vec!["public"]);
        assert_eq!(
            p.using.as_deref(),
            Some("(org_id = ( SELECT auth.org_id() AS org_id))")
        );
        assert_eq!(p.check.as_deref(), Some("(a, \"b\")"));
        let rec = r#"(p,f,r,"{app,""we ird""}",f,true,)"#;
        let p = parse_policy_record(rec).unwrap();
        assert!(!p.permissive);
        assert_eq!(p.roles, vec!["app", "we ird"]);
        assert_eq!(p.using.as_deref(), Some("true"));
        assert_eq!(p.check, None);
        assert_eq!(parse_array("{}"), Vec::<String>::new());
        assert_eq!(parse_array(r#"{a,"b,c","d\"e"}"#), vec!["a", "b,c", "d\"e"]);
    }
}
