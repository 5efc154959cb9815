//! A snapshot of what the database holds: the input of the pure plan and audit.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;

use super::expr;
use super::ident::QualifiedName;
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
    /// `CONNECTION LIMIT` (-1: none).
    pub conn_limit: i32,
    /// Its `ALTER ROLE ... SET` entries for every database (`name=value`).
    pub config: Vec<String>,
    /// UID of the Organization its mapping row records as owner (None: no owner recorded).
    pub owner_uid: Option<String>,
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
    /// None when the identity function or its twin is missing or the planned policy cannot be built here.
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
    /// (schema, role) pairs: a tenant login role that can CREATE in one of the operator's or the
    /// governed schemas (directly, through PUBLIC or through another role).
    pub tenant_schema_create: Vec<(String, String)>,
    /// Schemas (of the same set) where PUBLIC holds CREATE.
    pub public_schema_create: BTreeSet<String>,
    /// `server_version_num`.
    pub server_version: i32,
    /// `max_connections` minus `superuser_reserved_connections`: the slots roles share.
    pub shared_connections: i32,
    pub group: Option<RoleState>,
    /// The group appears in the mapping table.
    pub group_mapped: bool,
    pub function: Option<FunctionState>,
    pub group_can_execute_function: bool,
    /// The identity's set-returning twin that the policies call.
    pub rows_function: Option<FunctionState>,
    pub group_can_execute_rows_function: bool,
    pub mapping: Option<TableState>,
    pub registry: Option<TableState>,
    /// The operator's lock table.
    pub locks: Option<TableState>,
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
    super::backend(e)
}

/// Every operator and function below is schema-qualified (`OPERATOR(pg_catalog.=)`,
/// `pg_catalog.unnest`): a tenant function or operator on the search_path cannot shadow them.
pub(crate) const RELATIONS_SQL: &str = r#"
SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, c.relkind::pg_catalog.text, pg_catalog.pg_get_userbyid(c.relowner)::pg_catalog.text,
       c.relrowsecurity, c.relforcerowsecurity,
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       pg_catalog.pg_get_expr(d.adbin, d.adrelid),
       COALESCE((SELECT true FROM pg_catalog.pg_index i
                 WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indkey[0] OPERATOR(pg_catalog.=) a.attnum AND i.indisvalid LIMIT 1), false),
       ARRAY(SELECT x.attname::pg_catalog.text FROM pg_catalog.pg_attribute x
             WHERE x.attrelid OPERATOR(pg_catalog.=) c.oid AND x.attnum OPERATOR(pg_catalog.>) 0 AND NOT x.attisdropped ORDER BY x.attnum),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'SELECT'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'INSERT'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'UPDATE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'DELETE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'TRUNCATE'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'REFERENCES'), false),
       COALESCE(pg_catalog.has_table_privilege(g.oid, c.oid, 'TRIGGER'), false),
       COALESCE('security_invoker=true'::pg_catalog.text OPERATOR(pg_catalog.=) ANY(c.reloptions)
                OR 'security_invoker=on'::pg_catalog.text OPERATOR(pg_catalog.=) ANY(c.reloptions), false),
       ARRAY(SELECT ROW(p.polname::pg_catalog.text, p.polpermissive, p.polcmd::pg_catalog.text,
                 ARRAY(SELECT CASE WHEN r OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 'public'::pg_catalog.text
                                   ELSE pg_catalog.pg_get_userbyid(r)::pg_catalog.text END
                       FROM pg_catalog.unnest(p.polroles) r),
                 (0::pg_catalog.oid OPERATOR(pg_catalog.=) ANY(p.polroles))
                 OR COALESCE((SELECT pg_catalog.bool_or(
                                  r OPERATOR(pg_catalog.=) g.oid
                                  OR pg_catalog.pg_has_role(g.oid, r, 'MEMBER')
                                  OR EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members am
                                             WHERE am.roleid OPERATOR(pg_catalog.=) g.oid
                                               AND pg_catalog.pg_has_role(am.member, r, 'MEMBER')))
                       FROM pg_catalog.unnest(p.polroles) r WHERE r OPERATOR(pg_catalog.<>) 0::pg_catalog.oid), false),
                 pg_catalog.pg_get_expr(p.polqual, p.polrelid),
                 pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))::pg_catalog.text
             FROM pg_catalog.pg_policy p WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid ORDER BY p.polname),
       ARRAY(SELECT ROW(sn.nspname::pg_catalog.text, sq.relname::pg_catalog.text)::pg_catalog.text
             FROM pg_catalog.pg_depend dp
             JOIN pg_catalog.pg_class sq ON sq.oid OPERATOR(pg_catalog.=) dp.objid AND sq.relkind OPERATOR(pg_catalog.=) 'S'::"char"
             JOIN pg_catalog.pg_namespace sn ON sn.oid OPERATOR(pg_catalog.=) sq.relnamespace
             WHERE dp.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass AND dp.refobjid OPERATOR(pg_catalog.=) c.oid
               AND dp.deptype OPERATOR(pg_catalog.=) ANY (ARRAY['a', 'i']::"char"[])
               AND NOT COALESCE(CASE WHEN sq.relkind OPERATOR(pg_catalog.=) 'S'::"char"
                                     THEN pg_catalog.has_sequence_privilege(g.oid, sq.oid, 'USAGE') END, true)
             ORDER BY sq.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $2::pg_catalog.name
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) $3::pg_catalog.name
     AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid OPERATOR(pg_catalog.=) c.oid AND d.adnum OPERATOR(pg_catalog.=) a.attnum
WHERE c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v', 'm', 'f']::"char"[])
  AND (n.nspname OPERATOR(pg_catalog.=) ANY($1::pg_catalog.name[])
       OR c.oid OPERATOR(pg_catalog.=) ANY(ARRAY(SELECT pg_catalog.to_regclass(x) FROM pg_catalog.unnest($4::pg_catalog.text[]) x)))
ORDER BY n.nspname, c.relname
"#;

pub(crate) const SCHEMAS_SQL: &str = r#"
SELECT n.nspname::pg_catalog.text,
       COALESCE(pg_catalog.has_schema_privilege(g.oid, n.oid, 'USAGE'), false),
       COALESCE(pg_catalog.has_schema_privilege(g.oid, n.oid, 'CREATE'), false),
       EXISTS (SELECT 1 FROM pg_catalog.aclexplode(n.nspacl) x
               WHERE x.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid
                 AND x.privilege_type OPERATOR(pg_catalog.=) 'CREATE'::pg_catalog.text),
       ARRAY(SELECT t.rolname::pg_catalog.text FROM pg_catalog.pg_roles t
             WHERE t.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT am.member FROM pg_catalog.pg_auth_members am
                                                          WHERE am.roleid OPERATOR(pg_catalog.=) g.oid))
               AND NOT t.rolsuper AND pg_catalog.has_schema_privilege(t.oid, n.oid, 'CREATE')
             ORDER BY 1)
FROM pg_catalog.pg_namespace n LEFT JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $2::pg_catalog.name
WHERE n.nspname OPERATOR(pg_catalog.=) ANY($1::pg_catalog.name[])
"#;

const GROUP_SQL: &str = r#"
SELECT r.rolname::pg_catalog.text, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin,
       ARRAY(SELECT pg_catalog.pg_get_userbyid(m.roleid)::pg_catalog.text FROM pg_catalog.pg_auth_members m
             WHERE m.member OPERATOR(pg_catalog.=) r.oid ORDER BY 1)
FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name
"#;

const FUNCTION_SQL: &str = r#"
SELECT p.prosrc, p.provolatile::pg_catalog.text, p.prosecdef, COALESCE(p.proconfig, '{}')::pg_catalog.text[],
       pg_catalog.pg_get_userbyid(p.proowner)::pg_catalog.text, pg_catalog.pg_get_function_result(p.oid),
       COALESCE(pg_catalog.has_function_privilege(g.oid, p.oid, 'EXECUTE'), false),
       p.proparallel::pg_catalog.text,
       (SELECT l.lanname::pg_catalog.text FROM pg_catalog.pg_language l WHERE l.oid OPERATOR(pg_catalog.=) p.prolang)
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
LEFT JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $3::pg_catalog.name
WHERE n.nspname OPERATOR(pg_catalog.=) $1::pg_catalog.name AND p.proname OPERATOR(pg_catalog.=) $2::pg_catalog.name
  AND p.pronargs OPERATOR(pg_catalog.=) 0::pg_catalog.int2
"#;

/// A row of [`FUNCTION_SQL`].
fn function_state(row: &tokio_postgres::Row) -> FunctionState {
    FunctionState {
        body: row.get(0),
        volatility: row.get(1),
        parallel: row.get(7),
        language: row.get(8),
        security_definer: row.get(2),
        config: row.get(3),
        owner: row.get(4),
        result: row.get(5),
    }
}

const DEFINER_SQL: &str = r#"
SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name
WHERE p.prosecdef AND NOT (n.nspname OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog', 'information_schema']::pg_catalog.name[]))
  AND pg_catalog.has_function_privilege(g.oid, p.oid, 'EXECUTE')
  AND pg_catalog.has_schema_privilege(g.oid, n.oid, 'USAGE')
ORDER BY 1
"#;

/// Columns of a login role's state; `{mapping}` is the quoted mapping table, `$G` the group.
fn role_columns(mapping: &str) -> String {
    format!(
        "r.rolname::pg_catalog.text, m.org_id, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb,
         r.rolcanlogin,
         COALESCE(r.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT x.member FROM pg_catalog.pg_auth_members x
                                                          WHERE x.roleid OPERATOR(pg_catalog.=) g.oid)), false),
         ARRAY(SELECT pg_catalog.pg_get_userbyid(am.roleid)::pg_catalog.text FROM pg_catalog.pg_auth_members am
               WHERE am.member OPERATOR(pg_catalog.=) r.oid
                 AND (g.oid IS NULL OR am.roleid OPERATOR(pg_catalog.<>) g.oid) ORDER BY 1),
         r.rolconnlimit,
         COALESCE((SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
                   WHERE s.setrole OPERATOR(pg_catalog.=) r.oid AND s.setdatabase OPERATOR(pg_catalog.=) 0::pg_catalog.oid),
                  '{{}}')::pg_catalog.text[],
         {owner}
         FROM pg_catalog.pg_roles r
         LEFT JOIN pg_catalog.pg_roles g ON g.rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name
         LEFT JOIN {mapping} m ON m.role_name OPERATOR(pg_catalog.=) r.rolname::pg_catalog.text",
        owner = "m.owner_uid"
    )
}

fn role_from_row(row: &tokio_postgres::Row) -> RoleState {
    RoleState {
        name: row.get(0),
        org_id: row.get(1),
        superuser: row.get(2),
        bypass_rls: row.get(3),
        create_role: row.get(4),
        create_db: row.get(5),
        can_login: row.get(6),
        in_group: row.get(7),
        other_memberships: row.get(8),
        conn_limit: row.get(9),
        config: row.get(10),
        owner_uid: row.get(11),
    }
}

/// Reads the snapshot. `expected` computes the planned policy texts through throw-away temporary
/// tables inside a savepoint, so it needs a transaction (`client` is one).
pub async fn read(client: &impl GenericClient, s: &Settings) -> Result<Catalog, LayerError> {
    let mut cat = Catalog::default();
    let group = s.group_role.as_str();
    let row = client
        .query_one(
            "SELECT pg_catalog.session_user()::pg_catalog.text,
                    pg_catalog.current_setting('server_version_num')::pg_catalog.int4,
                    pg_catalog.int4mi(pg_catalog.current_setting('max_connections')::pg_catalog.int4,
                                      pg_catalog.current_setting('superuser_reserved_connections')::pg_catalog.int4)",
            &[],
        )
        .await
        .map_err(db)?;
    cat.reader = row.get(0);
    cat.server_version = row.get(1);
    cat.shared_connections = row.get(2);

    let wanted: Vec<String> = s
        .schema_names()
        .into_iter()
        .chain([
            s.operator_schema.as_str().to_owned(),
            s.identity_function.schema.as_str().to_owned(),
        ])
        .collect();
    for row in client
        .query(SCHEMAS_SQL, &[&wanted, &group])
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
        if row.get::<_, bool>(3) {
            cat.public_schema_create.insert(name.clone());
        }
        for role in row.get::<_, Vec<String>>(4) {
            cat.tenant_schema_create.push((name.clone(), role));
        }
        cat.schemas.insert(name);
    }

    if let Some(row) = client.query_opt(GROUP_SQL, &[&group]).await.map_err(db)? {
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
            conn_limit: -1,
            config: Vec::new(),
            owner_uid: None,
        });
    }

    if let Some(row) = client
        .query_opt(
            FUNCTION_SQL,
            &[
                &s.identity_function.schema.as_str(),
                &s.identity_function.name.as_str(),
                &group,
            ],
        )
        .await
        .map_err(db)?
    {
        cat.function = Some(function_state(&row));
        cat.group_can_execute_function = row.get(6);
    }
    if let Some(row) = client
        .query_opt(
            FUNCTION_SQL,
            &[
                &s.identity_rows_function.schema.as_str(),
                &s.identity_rows_function.name.as_str(),
                &group,
            ],
        )
        .await
        .map_err(db)?
    {
        cat.rows_function = Some(function_state(&row));
        cat.group_can_execute_rows_function = row.get(6);
    }

    let extra = vec![
        s.mapping.to_string(),
        s.registry.to_string(),
        s.locks.to_string(),
    ];
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
        let is = |q: &QualifiedName| t.schema == q.schema.as_str() && t.name == q.name.as_str();
        if is(&s.mapping) {
            cat.mapping = Some(t);
        } else if is(&s.registry) {
            cat.registry = Some(t);
        } else if is(&s.locks) {
            cat.locks = Some(t);
        } else if s.schema_names().contains(&t.schema) {
            cat.relations.push(t);
        }
    }

    if let Some(mapping) = &cat.mapping {
        let owner = if mapping.has_column(OWNER_COLUMN) {
            "m.owner_uid"
        } else {
            "NULL::pg_catalog.text"
        };
        let sql = format!(
            "SELECT {} WHERE (COALESCE(r.oid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT x.member FROM pg_catalog.pg_auth_members x
                                                          WHERE x.roleid OPERATOR(pg_catalog.=) g.oid)), false)
                    OR m.role_name IS NOT NULL) AND r.rolname OPERATOR(pg_catalog.<>) $1::pg_catalog.name
             ORDER BY 1",
            role_columns(&s.mapping.to_string()).replace("m.owner_uid", owner)
        );
        for row in client.query(&sql, &[&group]).await.map_err(db)? {
            cat.tenant_roles.push(role_from_row(&row));
        }
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} m WHERE m.role_name OPERATOR(pg_catalog.=) $1::pg_catalog.text)",
            s.mapping
        );
        cat.group_mapped = client.query_one(&sql, &[&group]).await.map_err(db)?.get(0);
    }

    if cat.group.is_some() {
        for row in client.query(DEFINER_SQL, &[&group]).await.map_err(db)? {
            cat.definer_functions.push(row.get(0));
        }
    }

    if cat.function.is_some() && cat.rows_function.is_some() {
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

/// Column of the mapping table recording the owning Organization's UID.
pub const OWNER_COLUMN: &str = "owner_uid";

/// Reads one login role's state (attributes, memberships, mapping, owner). The mapping table
/// must have the owner column (`prepare` adds it).
pub async fn read_role(
    client: &impl GenericClient,
    s: &Settings,
    role: &str,
) -> Result<Option<RoleState>, LayerError> {
    let sql = format!(
        "SELECT {} WHERE r.rolname OPERATOR(pg_catalog.=) $2::pg_catalog.name",
        role_columns(&s.mapping.to_string())
    );
    let row = client
        .query_opt(&sql, &[&s.group_role.as_str(), &role])
        .await
        .map_err(db)?;
    Ok(row.as_ref().map(role_from_row))
}

/// The mapping rows of an organization or its login role: (role name, owner UID).
pub async fn read_claims(
    client: &impl GenericClient,
    s: &Settings,
    org: &str,
    role: &str,
) -> Result<Vec<(String, Option<String>)>, LayerError> {
    let sql = format!(
        "SELECT m.role_name, m.owner_uid FROM {} m
         WHERE m.org_id OPERATOR(pg_catalog.=) $1::pg_catalog.text OR m.role_name OPERATOR(pg_catalog.=) $2::pg_catalog.text
         ORDER BY 1",
        s.mapping
    );
    Ok(client
        .query(&sql, &[&org, &role])
        .await
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
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
            expr::policy_using(s),
            expr::policy_check(s, s.shared_read(table_name))
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
            expr::shared_read_using(sr)
        ));
    }
    let mut built = true;
    for stmt in &stmts {
        if let Err(e) = client.batch_execute(stmt).await {
            // A held lock says nothing about the table's shape: give up the pass, not the table.
            if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                || e.code() == Some(&SqlState::QUERY_CANCELED)
            {
                client
                    .batch_execute(
                        "ROLLBACK TO SAVEPOINT bulkhead_shape; RELEASE SAVEPOINT bulkhead_shape",
                    )
                    .await
                    .map_err(db)?;
                return Err(super::backend(e));
            }
            built = false;
            break;
        }
    }
    let out = if built {
        let rows = client
            .query(
                "SELECT p.polname::pg_catalog.text, pg_catalog.pg_get_expr(p.polqual, p.polrelid),
                        pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid OPERATOR(pg_catalog.=) 'pg_temp.bulkhead_shape'::pg_catalog.regclass",
                &[],
            )
            .await
            .map_err(db)?;
        let default: Option<String> = client
            .query_one(
                "SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d
                 JOIN pg_catalog.pg_attribute a
                   ON a.attrelid OPERATOR(pg_catalog.=) d.adrelid AND a.attnum OPERATOR(pg_catalog.=) d.adnum
                 WHERE d.adrelid OPERATOR(pg_catalog.=) 'pg_temp.bulkhead_shape'::pg_catalog.regclass
                   AND a.attname OPERATOR(pg_catalog.=) $1::pg_catalog.name",
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

    /// Names that may stand before `(` unqualified: syntax, not functions or operators.
    const SYNTAX: &[&str] = &[
        "ARRAY",
        "EXISTS",
        "COALESCE",
        "ROW",
        "ANY",
        "OPERATOR",
        "AND",
        "OR",
        "NOT",
        "ON",
        "WHERE",
        "FROM",
        "AS",
        "SELECT",
        "THEN",
        "ELSE",
        "WHEN",
        "JOIN",
        "QUALIFIED_OPERATOR",
    ];

    /// Every operator is `OPERATOR(pg_catalog.x)` and every function `pg_catalog.f(...)`; no
    /// `IN (...)` or `IS DISTINCT FROM`, which look `=` up on the search_path.
    fn assert_qualified(sql: &str) {
        let mut text = String::new();
        let mut in_lit = false;
        for c in sql.chars() {
            if c == '\'' {
                in_lit = !in_lit;
            } else if !in_lit {
                text.push(c);
            }
        }
        let mut rest = text.replace("=>", " ");
        while let Some(at) = rest.find("OPERATOR(pg_catalog.") {
            let close = at + rest[at..].find(')').expect("closed");
            rest.replace_range(at..=close, " QUALIFIED_OPERATOR ");
        }
        for bad in ["=", "<", ">", "!", " IN (", "DISTINCT FROM", "||"] {
            assert!(!rest.contains(bad), "{bad:?} in {sql}");
        }
        let chars: Vec<char> = rest.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_alphabetic() || chars[i] == '_' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                if chars.get(j) == Some(&'(') {
                    assert!(
                        word.starts_with("pg_catalog.")
                            || SYNTAX.iter().any(|k| k.eq_ignore_ascii_case(&word)),
                        "unqualified call {word}( in {sql}"
                    );
                }
            } else {
                i += 1;
            }
        }
    }

    #[test]
    fn catalog_queries_are_schema_qualified() {
        for sql in [
            RELATIONS_SQL,
            SCHEMAS_SQL,
            GROUP_SQL,
            FUNCTION_SQL,
            DEFINER_SQL,
            super::super::reaper::REAP_SQL,
            &role_columns("\"bulkhead\".\"tenant_roles\""),
        ] {
            assert_qualified(sql);
        }
        for bad in [
            "SELECT x FROM pg_catalog.unnest(a) x WHERE x = 1",
            "SELECT x FROM unnest(a) x",
            "SELECT 1 WHERE a IN (SELECT b FROM t)",
            "SELECT a IS DISTINCT FROM b",
            "SELECT a <> b",
        ] {
            assert!(
                std::panic::catch_unwind(|| assert_qualified(bad)).is_err(),
                "{bad}"
            );
        }
    }

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
