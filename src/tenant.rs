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
    fn templates_substitute_the_id() {
        let id = OrgId::parse("acme").unwrap();
        assert_eq!(render_template("org-{orgId}", &id), "org-acme");
        assert_eq!(render_template("org:{orgId}:", &id), "org:acme:");
    }
}
