//! SQL identifiers and literals, and the names the database layer derives from an org id.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::tenant::OrgId;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
pub const MAX_IDENT_BYTES: usize = 63;

/// Quotes an identifier: always double-quoted, embedded quotes doubled. Never fails, because
/// every identifier reaching SQL went through [`Ident::new`] first.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a string literal for the few places that cannot take a bind parameter (DDL such as
/// `ALTER ROLE ... PASSWORD`, function bodies, policy expressions). Uses the `E''` form when a
/// backslash is present so the result means the same whatever `standard_conforming_strings` is.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push_str("E'");
    } else {
        out.push('\'');
    }
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A validated SQL identifier: 1-63 bytes, no NUL. Displayed quoted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ident(String);

/// Why a configured name cannot be used as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadIdent {
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{what} is {len} bytes long; PostgreSQL identifiers hold at most 63")]
    TooLong { what: String, len: usize },
    #[error("{what} contains a NUL character")]
    Nul { what: String },
    #[error("{what} must be `schema.name`, got {got:?}")]
    NotQualified { what: String, got: String },
}

impl Ident {
    /// Validates `raw` as an identifier; `what` names the field in the error.
    pub fn new(raw: &str, what: &str) -> Result<Self, BadIdent> {
        if raw.is_empty() {
            return Err(BadIdent::Empty {
                what: what.to_owned(),
            });
        }
        if raw.len() > MAX_IDENT_BYTES {
            return Err(BadIdent::TooLong {
                what: what.to_owned(),
                len: raw.len(),
            });
        }
        if raw.contains('\0') {
            return Err(BadIdent::Nul {
                what: what.to_owned(),
            });
        }
        Ok(Self(raw.to_owned()))
    }

    /// The unquoted name, as the catalogs store it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The quoted form, for SQL text.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&quote_ident(&self.0))
    }
}

/// A schema-qualified name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QualifiedName {
    pub schema: Ident,
    pub name: Ident,
}

impl QualifiedName {
    pub fn new(schema: Ident, name: Ident) -> Self {
        Self { schema, name }
    }

    /// Parses `schema.name` (split at the first dot; no quoting syntax).
    pub fn parse(raw: &str, what: &str) -> Result<Self, BadIdent> {
        let Some((schema, name)) = raw.split_once('.') else {
            return Err(BadIdent::NotQualified {
                what: what.to_owned(),
                got: raw.to_owned(),
            });
        };
        Ok(Self {
            schema: Ident::new(schema, what)?,
            name: Ident::new(name, what)?,
        })
    }

    /// `schema.name` unquoted, for messages.
    pub fn plain(&self) -> String {
        format!("{}.{}", self.schema.as_str(), self.name.as_str())
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The login role of an organization: `prefix + orgId`, or, when that exceeds 63 bytes, a
/// truncated form ending in `_` and 12 hex digits of the id's SHA-256. Org ids hold no `_`, so
/// a hashed name can never equal an unhashed one.
pub fn role_name(prefix: &str, org: &OrgId) -> String {
    let full = format!("{prefix}{}", org.as_str());
    if full.len() <= MAX_IDENT_BYTES {
        return full;
    }
    let digest = hex::encode(Sha256::digest(org.as_str().as_bytes()));
    let suffix = format!("_{}", &digest[..12]);
    let keep = MAX_IDENT_BYTES.saturating_sub(prefix.len() + suffix.len());
    // Org ids are ASCII, so any byte index is a char boundary.
    format!(
        "{prefix}{}{suffix}",
        &org.as_str()[..keep.min(org.as_str().len())]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_doubles_quotes_and_always_quotes() {
        assert_eq!(quote_ident("org_id"), "\"org_id\"");
        assert_eq!(quote_ident("Select"), "\"Select\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("\"; DROP TABLE x; --"),
            "\"\"\"; DROP TABLE x; --\""
        );
        assert_eq!(
            quote_ident("bulkhead_org_acme-corp"),
            "\"bulkhead_org_acme-corp\""
        );
        assert_eq!(quote_ident("ünïcødé"), "\"ünïcødé\"");
    }

    #[test]
    fn quote_literal_escapes_quotes_and_backslashes() {
        assert_eq!(quote_literal("system"), "'system'");
        assert_eq!(quote_literal("O'Brien"), "'O''Brien'");
        assert_eq!(
            quote_literal("'); DROP TABLE t; --"),
            "'''); DROP TABLE t; --'"
        );
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(quote_literal("$$"), "'$$'");
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn idents_are_validated() {
        assert!(Ident::new("org_id", "tenantColumn").is_ok());
        assert!(matches!(Ident::new("", "x"), Err(BadIdent::Empty { .. })));
        assert!(matches!(
            Ident::new(&"a".repeat(64), "x"),
            Err(BadIdent::TooLong { len: 64, .. })
        ));
        assert!(Ident::new(&"a".repeat(63), "x").is_ok());
        // 32 two-byte characters are 64 bytes.
        assert!(matches!(
            Ident::new(&"é".repeat(32), "x"),
            Err(BadIdent::TooLong { .. })
        ));
        assert!(matches!(Ident::new("a\0b", "x"), Err(BadIdent::Nul { .. })));
        assert_eq!(
            Ident::new("we\"ird", "x").unwrap().to_string(),
            "\"we\"\"ird\""
        );
    }

    #[test]
    fn qualified_names_parse() {
        let q = QualifiedName::parse("auth.org_id", "identityFunction").unwrap();
        assert_eq!(q.to_string(), "\"auth\".\"org_id\"");
        assert_eq!(q.plain(), "auth.org_id");
        assert!(matches!(
            QualifiedName::parse("org_id", "f"),
            Err(BadIdent::NotQualified { .. })
        ));
        assert!(QualifiedName::parse(".x", "f").is_err());
        assert!(QualifiedName::parse("x.", "f").is_err());
        // Split at the first dot: the name keeps the rest, quoted as one identifier.
        assert_eq!(
            QualifiedName::parse("a.b.c", "f").unwrap().name.as_str(),
            "b.c"
        );
    }

    #[test]
    fn role_names_are_deterministic_and_fit() {
        let acme = OrgId::parse("acme").unwrap();
        assert_eq!(role_name("bulkhead_org_", &acme), "bulkhead_org_acme");
        let long = OrgId::parse(&"a".repeat(63)).unwrap();
        let name = role_name("bulkhead_org_", &long);
        assert_eq!(name.len(), 63);
        assert_eq!(name, role_name("bulkhead_org_", &long));
        assert!(name.starts_with("bulkhead_org_aaaa"));
        // Two long ids sharing a prefix still get different names.
        let long2 = OrgId::parse(&format!("{}b", "a".repeat(62))).unwrap();
        assert_ne!(role_name("bulkhead_org_", &long2), name);
        // Exactly 63 bytes is kept as is.
        let fits = OrgId::parse(&"c".repeat(50)).unwrap();
        assert_eq!(
            role_name("bulkhead_org_", &fits),
            format!("bulkhead_org_{}", "c".repeat(50))
        );
        let over = OrgId::parse(&"c".repeat(51)).unwrap();
        assert_ne!(
            role_name("bulkhead_org_", &over),
            format!("bulkhead_org_{}", "c".repeat(51))
        );
        assert!(role_name("bulkhead_org_", &over).len() <= 63);
    }
}
