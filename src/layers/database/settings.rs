//! The validated database configuration: every name the layer puts into SQL, checked once.

use std::collections::{BTreeMap, BTreeSet};

use super::ident::{BadIdent, Ident, QualifiedName};
use crate::api::platform::{DatabasePlatform, IdentityMode, TenantLimits};
use crate::layers::LayerError;

/// Name of the operator's policy on every governed table.
pub const POLICY: &str = "bulkhead_isolation";
/// Name of the read-only companion policy on tables with a shared-read override.
pub const SHARED_READ_POLICY: &str = "bulkhead_shared_read";
/// Table, in the operator schema, that maps login roles to organizations.
pub const MAPPING_TABLE: &str = "tenant_roles";
/// Table, in the operator schema, whose rows the operator locks (`FOR UPDATE`) to serialize its
/// own passes; tenants hold no privilege on it, so they cannot take or wait on those locks.
pub const LOCKS_TABLE: &str = "locks";
/// Setting that PostgREST and Supabase fill with the request's JWT claims.
pub const JWT_CLAIMS_SETTING: &str = "request.jwt.claims";

/// A shared-read exception of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRead {
    pub column: Ident,
    pub value: String,
}

/// Bounds set on every organization's login role, in milliseconds (what PostgreSQL stores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub statement_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
    pub lock_timeout_ms: u64,
    /// Applied on PostgreSQL 17 and later only.
    pub transaction_timeout_ms: u64,
    pub connection_limit: i32,
    /// How long a tenant transaction may hold a table lock stronger than ROW EXCLUSIVE.
    pub lock_hold_ms: u64,
}

/// A timeout in seconds, validated and converted to milliseconds.
fn millis(value: u32, field: &str, max: u32) -> Result<u64, LayerError> {
    if value == 0 || value > max {
        return Err(LayerError::Config(format!(
            "database: tenantLimits.{field} must be between 1 and {max} seconds, got {value}"
        )));
    }
    Ok(u64::from(value) * 1000)
}

impl Limits {
    pub fn from_spec(l: &TenantLimits) -> Result<Self, LayerError> {
        if l.connection_limit == 0 || l.connection_limit > 10_000 {
            return Err(LayerError::Config(format!(
                "database: tenantLimits.connectionLimit must be between 1 and 10000, got {}",
                l.connection_limit
            )));
        }
        Ok(Self {
            statement_timeout_ms: millis(
                l.statement_timeout_seconds,
                "statementTimeoutSeconds",
                86_400,
            )?,
            idle_in_transaction_timeout_ms: millis(
                l.idle_in_transaction_timeout_seconds,
                "idleInTransactionTimeoutSeconds",
                86_400,
            )?,
            lock_timeout_ms: millis(l.lock_timeout_seconds, "lockTimeoutSeconds", 86_400)?,
            transaction_timeout_ms: millis(
                l.transaction_timeout_seconds,
                "transactionTimeoutSeconds",
                86_400,
            )?,
            connection_limit: i32::try_from(l.connection_limit).unwrap_or(10_000),
            lock_hold_ms: millis(l.lock_hold_seconds, "lockHoldSeconds", 3_600)?,
        })
    }

    /// The `ALTER ROLE ... SET` parameters a login role must carry on a server of this version
    /// (`server_version_num`), as PostgreSQL stores them in `pg_db_role_setting`.
    pub fn role_settings(&self, server_version: i32) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("statement_timeout", self.statement_timeout_ms.to_string()),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout_ms.to_string(),
            ),
            ("lock_timeout", self.lock_timeout_ms.to_string()),
        ];
        if server_version >= 170_000 {
            out.push((
                "transaction_timeout",
                self.transaction_timeout_ms.to_string(),
            ));
        }
        out
    }
}

/// Suffix of the identity function's set-returning twin.
pub const ROWS_SUFFIX: &str = "_rows";

/// The database layer's configuration, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub schemas: Vec<Ident>,
    pub tenant_column: Ident,
    pub operator_schema: Ident,
    pub identity_function: QualifiedName,
    /// The set-returning twin of the identity function that the policies call in FROM
    /// (`<identityFunction>_rows`): PostgreSQL inlines it into the query.
    pub identity_rows_function: QualifiedName,
    pub registry: QualifiedName,
    pub mapping: QualifiedName,
    pub locks: QualifiedName,
    pub mode: IdentityMode,
    pub setting_name: String,
    pub jwt_claim: String,
    pub group_role: Ident,
    pub role_prefix: String,
    /// Shared-read overrides by table name.
    pub overrides: BTreeMap<String, SharedRead>,
    pub excluded_tables: BTreeSet<String>,
    pub create_indexes: bool,
    pub embeddings_table: Ident,
    pub embedding_column: Ident,
    pub tenant_endpoint: Option<String>,
    pub limits: Limits,
}

fn cfg(e: BadIdent) -> LayerError {
    LayerError::Config(format!("database: {e}"))
}

impl Settings {
    /// Validates the platform's database section. Every refusal names the field.
    pub fn from_spec(spec: &DatabasePlatform) -> Result<Self, LayerError> {
        if spec.schemas.is_empty() {
            return Err(LayerError::Config("database: schemas is empty".into()));
        }
        let schemas = spec
            .schemas
            .iter()
            .map(|s| Ident::new(s, "schemas[]"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cfg)?;
        let unique: BTreeSet<_> = schemas.iter().collect();
        if unique.len() != schemas.len() {
            return Err(LayerError::Config(
                "database: schemas lists a schema twice".into(),
            ));
        }
        let operator_schema = Ident::new(&spec.operator_schema, "operatorSchema").map_err(cfg)?;
        if schemas.contains(&operator_schema) {
            return Err(LayerError::Config(
                "database: operatorSchema must not be a governed schema".into(),
            ));
        }
        let identity_function =
            QualifiedName::parse(&spec.identity_function, "identityFunction").map_err(cfg)?;
        if schemas.contains(&identity_function.schema) {
            return Err(LayerError::Config(
                "database: identityFunction must live outside the governed schemas".into(),
            ));
        }
        let identity_rows_function = QualifiedName::new(
            identity_function.schema.clone(),
            Ident::new(
                &format!("{}{ROWS_SUFFIX}", identity_function.name.as_str()),
                "identityFunction's name plus \"_rows\" (the policies' set-returning twin)",
            )
            .map_err(cfg)?,
        );
        let registry_name = Ident::new(&spec.registry_table, "registryTable").map_err(cfg)?;
        let setting_name = spec.setting_name.clone();
        let valid_setting = setting_name.contains('.')
            && !setting_name.starts_with('.')
            && !setting_name.ends_with('.')
            && setting_name.len() <= 63
            && setting_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid_setting || setting_name == JWT_CLAIMS_SETTING {
            return Err(LayerError::Config(format!(
                "database: settingName {setting_name:?} must look like `prefix.name` (letters, digits, `_`)"
            )));
        }
        if spec.jwt_claim.is_empty() || spec.jwt_claim.contains('\0') {
            return Err(LayerError::Config(
                "database: jwtClaim must be a non-empty string without NUL".into(),
            ));
        }
        let role_prefix = spec.role_prefix.clone();
        if role_prefix.is_empty()
            || role_prefix.len() > 30
            || !role_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(LayerError::Config(format!(
                "database: rolePrefix {role_prefix:?} must be 1-30 of [a-z0-9_]"
            )));
        }
        let group_role = Ident::new(&spec.group_role, "groupRole").map_err(cfg)?;
        if group_role.as_str().starts_with(&role_prefix) {
            return Err(LayerError::Config(
                "database: groupRole must not start with rolePrefix".into(),
            ));
        }
        let mut overrides = BTreeMap::new();
        for o in &spec.overrides {
            let table = Ident::new(&o.table, "overrides[].table").map_err(cfg)?;
            let column =
                Ident::new(&o.shared_read_column, "overrides[].sharedReadColumn").map_err(cfg)?;
            if o.shared_read_value.contains('\0') {
                return Err(LayerError::Config(
                    "database: overrides[].sharedReadValue contains NUL".into(),
                ));
            }
            if column.as_str() == spec.tenant_column {
                return Err(LayerError::Config(
                    "database: overrides[].sharedReadColumn must not be the tenant column".into(),
                ));
            }
            let prior = overrides.insert(
                table.as_str().to_owned(),
                SharedRead {
                    column,
                    value: o.shared_read_value.clone(),
                },
            );
            if prior.is_some() {
                return Err(LayerError::Config(format!(
                    "database: table {:?} has two overrides",
                    o.table
                )));
            }
        }
        let excluded_tables = spec
            .excluded_tables
            .iter()
            .map(|t| Ident::new(t, "excludedTables[]").map(|i| i.as_str().to_owned()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(cfg)?;
        if let Some(ep) = &spec.tenant_endpoint {
            let ok = ep
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(LayerError::Config(format!(
                    "database: tenantEndpoint {ep:?} must be host:port"
                )));
            }
        }
        Ok(Self {
            registry: QualifiedName::new(schemas[0].clone(), registry_name),
            mapping: QualifiedName::new(
                operator_schema.clone(),
                Ident::new(MAPPING_TABLE, "mapping").map_err(cfg)?,
            ),
            locks: QualifiedName::new(
                operator_schema.clone(),
                Ident::new(LOCKS_TABLE, "locks").map_err(cfg)?,
            ),
            schemas,
            tenant_column: Ident::new(&spec.tenant_column, "tenantColumn").map_err(cfg)?,
            operator_schema,
            identity_function,
            identity_rows_function,
            mode: spec.identity_mode,
            setting_name,
            jwt_claim: spec.jwt_claim.clone(),
            group_role,
            role_prefix,
            overrides,
            excluded_tables,
            create_indexes: spec.create_indexes,
            embeddings_table: Ident::new(&spec.embeddings_table, "embeddingsTable").map_err(cfg)?,
            embedding_column: Ident::new(&spec.embedding_column, "embeddingColumn").map_err(cfg)?,
            tenant_endpoint: spec.tenant_endpoint.clone(),
            limits: Limits::from_spec(&spec.tenant_limits)?,
        })
    }

    /// Governed schema names, unquoted, for catalog queries.
    pub fn schema_names(&self) -> Vec<String> {
        self.schemas.iter().map(|s| s.as_str().to_owned()).collect()
    }

    pub fn shared_read(&self, table: &str) -> Option<&SharedRead> {
        self.overrides.get(table)
    }
}

#[cfg(test)]
pub(crate) fn spec_from(json: serde_json::Value) -> DatabasePlatform {
    let mut base = serde_json::json!({"adminUrlSecretRef": {"name": "pg", "key": "url"}});
    if let (Some(b), Some(extra)) = (base.as_object_mut(), json.as_object()) {
        for (k, v) in extra {
            b.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(base).expect("valid DatabasePlatform json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_validate() {
        let s = Settings::from_spec(&spec_from(json!({}))).unwrap();
        assert_eq!(s.tenant_column.as_str(), "org_id");
        assert_eq!(s.identity_function.plain(), "auth.org_id");
        assert_eq!(s.registry.plain(), "public.organizations");
        assert_eq!(s.mapping.plain(), "bulkhead.tenant_roles");
        assert_eq!(s.mode, IdentityMode::Role);
        assert_eq!(s.role_prefix, "bulkhead_org_");
        assert_eq!(s.limits.connection_limit, 20);
        assert_eq!(s.limits.lock_hold_ms, 5_000);
    }

    #[test]
    fn role_settings_are_integers_and_follow_the_server_version() {
        let s = Settings::from_spec(&spec_from(json!({
            "tenantLimits": {"statementTimeoutSeconds": 7, "lockTimeoutSeconds": 2}
        })))
        .unwrap();
        let on15 = s.limits.role_settings(150_004);
        assert_eq!(
            on15,
            vec![
                ("statement_timeout", "7000".to_owned()),
                ("idle_in_transaction_session_timeout", "60000".to_owned()),
                ("lock_timeout", "2000".to_owned()),
            ]
        );
        let on17 = s.limits.role_settings(170_000);
        assert_eq!(on17.len(), 4);
        assert_eq!(on17[3], ("transaction_timeout", "300000".to_owned()));
        for (_, v) in on17 {
            assert!(v.chars().all(|c| c.is_ascii_digit()), "{v}");
        }
    }

    #[test]
    fn bad_configuration_is_refused_with_the_field_name() {
        let cases = [
            (json!({"schemas": []}), "schemas"),
            (json!({"schemas": ["public", "public"]}), "twice"),
            (json!({"tenantColumn": ""}), "tenantColumn"),
            (json!({"tenantColumn": "x".repeat(64)}), "tenantColumn"),
            (json!({"identityFunction": "org_id"}), "identityFunction"),
            (
                json!({"identityFunction": "public.org_id"}),
                "identityFunction",
            ),
            (json!({"operatorSchema": "public"}), "operatorSchema"),
            (json!({"settingName": "noprefix"}), "settingName"),
            (json!({"settingName": "a.b'; drop"}), "settingName"),
            (json!({"settingName": "request.jwt.claims"}), "settingName"),
            (json!({"rolePrefix": "Bad-Prefix"}), "rolePrefix"),
            (json!({"groupRole": "bulkhead_org_all"}), "groupRole"),
            (json!({"tenantEndpoint": "nohost"}), "tenantEndpoint"),
            (
                json!({"tenantLimits": {"statementTimeoutSeconds": 0}}),
                "statementTimeoutSeconds",
            ),
            (
                json!({"tenantLimits": {"lockHoldSeconds": 7200}}),
                "lockHoldSeconds",
            ),
            (
                json!({"tenantLimits": {"connectionLimit": 0}}),
                "connectionLimit",
            ),
            (
                json!({"overrides": [{"table": "skills", "sharedReadColumn": "org_id", "sharedReadValue": "x"}]}),
                "tenant column",
            ),
            (
                json!({"overrides": [
                    {"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "a"},
                    {"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "b"}]}),
                "two overrides",
            ),
        ];
        for (json, want) in cases {
            let err = Settings::from_spec(&spec_from(json.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn odd_but_valid_names_are_accepted_and_quoted() {
        let s = Settings::from_spec(&spec_from(json!({
            "schemas": ["app data", "Select"],
            "tenantColumn": "Org\"Id",
            "overrides": [{"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "sys'tem"}]
        })))
        .unwrap();
        assert_eq!(s.tenant_column.quoted(), "\"Org\"\"Id\"");
        assert_eq!(s.registry.to_string(), "\"app data\".\"organizations\"");
        assert_eq!(s.shared_read("skills").unwrap().value, "sys'tem");
    }
}
