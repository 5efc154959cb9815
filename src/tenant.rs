//! The validated organization id and the names derived from it.

use std::fmt;

/// Reserved id whose canaries every organization's probes attack; no Organization may use it.
pub const SENTINEL_ORG_ID: &str = "bulkhead-sentinel";
/// Longest org id: a DNS label, a label value and a PostgreSQL identifier with room for a prefix.
pub const MAX_ORG_ID_LEN: usize = 63;

/// An organization id that has passed validation: 1-63 of `[a-z0-9-]`, starting and ending with
/// a letter or digit. Safe as a SQL value, an S3 prefix, a Redis pattern and a label value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrgId(String);

/// Why an org id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOrgId {
    #[error("orgId is empty")]
    Empty,
    #[error("orgId is {0} characters long; at most 63 are allowed")]
    TooLong(usize),
    #[error("orgId contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    BadCharacter(char),
    #[error("orgId must start and end with a lowercase letter or digit")]
    BadEdge,
    #[error("orgId {SENTINEL_ORG_ID:?} is reserved for the operator's canaries")]
    Reserved,
}

impl OrgId {
    /// Validates `raw` with the same rules as the CRD's CEL validation.
    pub fn parse(raw: &str) -> Result<Self, InvalidOrgId> {
        Self::parse_inner(raw).and_then(|id| {
            if id.0 == SENTINEL_ORG_ID {
                Err(InvalidOrgId::Reserved)
            } else {
                Ok(id)
            }
        })
    }

    /// The sentinel organization, whose canaries every probe attacks.
    pub fn sentinel() -> Self {
        Self(SENTINEL_ORG_ID.to_owned())
    }

    fn parse_inner(raw: &str) -> Result<Self, InvalidOrgId> {
        if raw.is_empty() {
            return Err(InvalidOrgId::Empty);
        }
        let len = raw.chars().count();
        if len > MAX_ORG_ID_LEN {
            return Err(InvalidOrgId::TooLong(len));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(InvalidOrgId::BadCharacter(bad));
        }
        if raw.starts_with('-') || raw.ends_with('-') {
            return Err(InvalidOrgId::BadEdge);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_sentinel(&self) -> bool {
        self.0 == SENTINEL_ORG_ID
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Replaces `{orgId}` in a template. The id is validated, so the result holds no glob or quote
/// characters that the template did not already have.
pub fn render_template(template: &str, org: &OrgId) -> String {
    template.replace("{orgId}", org.as_str())
}

/// Checks a namespace template: `{orgId}` exactly once (or organizations would share a
/// namespace), and only `[a-z0-9-]` around it, so that it renders a DNS label for short ids.
pub fn check_namespace_template(template: &str) -> Result<(), String> {
    if template.matches("{orgId}").count() != 1 {
        return Err(format!(
            "namespaceTemplate {template:?} must contain {{orgId}} exactly once"
        ));
    }
    let literal = template.replace("{orgId}", "");
    if let Some(bad) = literal
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "namespaceTemplate {template:?} contains {bad:?}; only lowercase letters, digits and '-' are allowed"
        ));
    }
    if template.starts_with('-') || template.ends_with('-') || literal.len() >= MAX_ORG_ID_LEN {
        return Err(format!(
            "namespaceTemplate {template:?} must start and end with a letter, a digit or {{orgId}}, and leave room for the org id"
        ));
    }
    Ok(())
}

/// The organization's namespace: the template rendered, refused when it is not a namespace name
/// (a long org id can push it past 63 characters).
pub fn render_namespace(template: &str, org: &OrgId) -> Result<String, String> {
    check_namespace_template(template)?;
    let ns = render_template(template, org);
    if ns.len() > MAX_ORG_ID_LEN {
        return Err(format!(
            "orgId {org}: its namespace {ns:?} from namespaceTemplate {template:?} is longer than 63 characters"
        ));
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_conservative_ids() {
        for ok in ["a", "acme", "acme-corp", "0", "org-123", &"a".repeat(63)] {
            assert_eq!(OrgId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let cases: &[(&str, InvalidOrgId)] = &[
            ("", InvalidOrgId::Empty),
            (&"a".repeat(64), InvalidOrgId::TooLong(64)),
            ("Acme", InvalidOrgId::BadCharacter('A')),
            ("acme*", InvalidOrgId::BadCharacter('*')),
            ("a?c", InvalidOrgId::BadCharacter('?')),
            ("a[b]", InvalidOrgId::BadCharacter('[')),
            ("a\\b", InvalidOrgId::BadCharacter('\\')),
            ("a{b}", InvalidOrgId::BadCharacter('{')),
            ("a b", InvalidOrgId::BadCharacter(' ')),
            ("o'brien", InvalidOrgId::BadCharacter('\'')),
            ("a;drop", InvalidOrgId::BadCharacter(';')),
            ("a/b", InvalidOrgId::BadCharacter('/')),
            ("a:b", InvalidOrgId::BadCharacter(':')),
            ("a_b", InvalidOrgId::BadCharacter('_')),
            ("é", InvalidOrgId::BadCharacter('é')),
            ("-a", InvalidOrgId::BadEdge),
            ("a-", InvalidOrgId::BadEdge),
            (SENTINEL_ORG_ID, InvalidOrgId::Reserved),
        ];
        for (raw, want) in cases {
            assert_eq!(OrgId::parse(raw).unwrap_err(), *want, "{raw:?}");
        }
    }

    #[test]
    fn namespaces_are_dns_labels_or_refused() {
        let id = OrgId::parse("acme").unwrap();
        assert_eq!(render_namespace("org-{orgId}", &id).unwrap(), "org-acme");
        assert_eq!(render_namespace("{orgId}", &id).unwrap(), "acme");
        // Shrunk counterexample of the namespace property test: 64 characters.
        let long = OrgId::parse(&"a".repeat(63)).unwrap();
        assert!(
            render_namespace("{orgId}0", &long)
                .unwrap_err()
                .contains("63")
        );
        assert!(render_namespace("org-{orgId}", &long).is_err());
        let fits = OrgId::parse(&"a".repeat(59)).unwrap();
        assert_eq!(render_namespace("org-{orgId}", &fits).unwrap().len(), 63);
        // Without `{orgId}` every organization would share one namespace.
        for bad in [
            "",
            "shared",
            "{orgId}-",
            "-{orgId}",
            "Org-{orgId}",
            "a_{orgId}",
            "{orgId}{orgId}",
            "a.{orgId}",
        ] {
            assert!(check_namespace_template(bad).is_err(), "{bad}");
            assert!(render_namespace(bad, &id).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_substitute_the_id() {
        let id = OrgId::parse("acme").unwrap();
        assert_eq!(render_template("org-{orgId}", &id), "org-acme");
        assert_eq!(render_template("org:{orgId}:", &id), "org:acme:");
    }
}
