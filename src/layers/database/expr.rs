//! Desired-state expressions: the policy and default texts the plan creates and the catalog
//! rebuilds to compare against. Depends on the settings only, so plan and catalog both use it.

use super::ident::quote_literal;
use super::settings::{Settings, SharedRead};

/// `USING` of the operator's policy: the identity's set-returning twin called in FROM inside a
/// sub-select, so it runs once per query (an InitPlan), not once per row, and PostgreSQL inlines
/// the function's body, the mapping lookup, into the query: no function call at all. No row
/// (no mapping) makes the sub-select NULL, and `org_id = NULL` admits nothing: fail-closed.
pub fn policy_using(s: &Settings) -> String {
    format!(
        "{} = (SELECT o FROM {}() o)",
        s.tenant_column, s.identity_rows_function
    )
}

/// `WITH CHECK` of the operator's policy; shared rows can never be written by a tenant.
pub fn policy_check(s: &Settings, shared: Option<&SharedRead>) -> String {
    match shared {
        None => policy_using(s),
        Some(sr) => format!(
            "{} AND {} IS DISTINCT FROM {}",
            policy_using(s),
            sr.column,
            quote_literal(&sr.value)
        ),
    }
}

/// `USING` of the read-only companion policy of an override table.
pub fn shared_read_using(sr: &SharedRead) -> String {
    format!("{} = {}", sr.column, quote_literal(&sr.value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::database::settings::spec_from;
    use serde_json::json;

    fn settings(extra: serde_json::Value) -> Settings {
        Settings::from_spec(&spec_from(extra)).unwrap()
    }

    #[test]
    fn policy_wraps_the_function_in_a_subselect() {
        let s = settings(json!({}));
        assert_eq!(
            policy_using(&s),
            "\"org_id\" = (SELECT o FROM \"auth\".\"org_id_rows\"() o)"
        );
        let s = settings(json!({
            "overrides": [{"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "sys'tem"}]
        }));
        let sr = s.shared_read("skills").unwrap();
        assert_eq!(
            policy_check(&s, Some(sr)),
            "\"org_id\" = (SELECT o FROM \"auth\".\"org_id_rows\"() o) AND \"scope\" IS DISTINCT FROM 'sys''tem'"
        );
        assert_eq!(shared_read_using(sr), "\"scope\" = 'sys''tem'");
    }
}
