//! Which Organization owns an orgId's state in the database: a pure decision from the mapping
//! rows (each records the owning Organization's UID) and the tenant's UID and adoption request.

/// `adopt_from` value that takes over state recorded without any owner.
pub const LEGACY: &str = "legacy";

/// What the database records for an orgId, before this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// No login role and no mapping row: nothing to own yet.
    Nothing,
    /// A login role or mapping row exists without an owner record (created before owners were
    /// recorded, or by someone else).
    Unowned,
    /// The mapping records this Organization UID as owner.
    Owner(String),
}

/// What a pass may do with the orgId's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nothing exists: create it and record the tenant as owner.
    Free,
    /// The tenant already owns it.
    Owned,
    /// The tenant named the recorded owner (or `legacy`) in `adopt_from`: re-record the owner.
    Adopt { from: String },
    /// Someone else owns it (`None`: no owner recorded).
    Foreign { other: Option<String> },
}

/// Decides the claim of `uid` (adopting `adopt_from`, if any) on what is recorded.
pub fn claim(recorded: &Recorded, uid: &str, adopt_from: Option<&str>) -> Claim {
    match recorded {
        Recorded::Nothing => Claim::Free,
        Recorded::Owner(o) if o == uid => Claim::Owned,
        Recorded::Owner(o) if adopt_from == Some(o.as_str()) => Claim::Adopt { from: o.clone() },
        Recorded::Owner(o) => Claim::Foreign {
            other: Some(o.clone()),
        },
        Recorded::Unowned if adopt_from == Some(LEGACY) => Claim::Adopt {
            from: LEGACY.to_owned(),
        },
        Recorded::Unowned => Claim::Foreign { other: None },
    }
}

/// Folds the mapping rows of an orgId (and of its role name) and whether its login role exists
/// into what is recorded. Two different owners recorded count as the first one that is not `uid`.
pub fn recorded(rows: &[Option<String>], role_exists: bool, uid: &str) -> Recorded {
    if rows.is_empty() {
        return if role_exists {
            Recorded::Unowned
        } else {
            Recorded::Nothing
        };
    }
    if rows.iter().any(Option::is_none) {
        return Recorded::Unowned;
    }
    let other = rows.iter().flatten().find(|o| o.as_str() != uid);
    match other {
        Some(o) => Recorded::Owner(o.clone()),
        None => Recorded::Owner(uid.to_owned()),
    }
}

/// The refusal `ensure` gives for a foreign claim: names the orgId, the other owner and the
/// annotation that adopts it.
pub fn refusal(org: &str, other: Option<&str>) -> String {
    match other {
        Some(uid) => format!(
            "database: orgId {org} is owned by Organization UID {uid}; to take over its retained \
             data, annotate this Organization with bulkhead.dev/adopt-from: {uid}"
        ),
        None => format!(
            "database: orgId {org} has a login role or mapping with no recorded owner (created \
             before owners were recorded, or by someone else); to take it over, annotate this \
             Organization with bulkhead.dev/adopt-from: {LEGACY}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_follow_the_recorded_owner() {
        let a = "uid-a";
        assert_eq!(claim(&Recorded::Nothing, a, None), Claim::Free);
        assert_eq!(claim(&Recorded::Owner(a.into()), a, None), Claim::Owned);
        assert_eq!(
            claim(&Recorded::Owner("uid-b".into()), a, None),
            Claim::Foreign {
                other: Some("uid-b".into())
            }
        );
        assert_eq!(
            claim(&Recorded::Owner("uid-b".into()), a, Some("uid-c")),
            Claim::Foreign {
                other: Some("uid-b".into())
            }
        );
        assert_eq!(
            claim(&Recorded::Owner("uid-b".into()), a, Some("uid-b")),
            Claim::Adopt {
                from: "uid-b".into()
            }
        );
        assert_eq!(
            claim(&Recorded::Unowned, a, None),
            Claim::Foreign { other: None }
        );
        assert_eq!(
            claim(&Recorded::Unowned, a, Some("uid-b")),
            Claim::Foreign { other: None }
        );
        assert_eq!(
            claim(&Recorded::Unowned, a, Some(LEGACY)),
            Claim::Adopt {
                from: LEGACY.into()
            }
        );
        // `legacy` never adopts state that has a recorded owner.
        assert_eq!(
            claim(&Recorded::Owner("uid-b".into()), a, Some(LEGACY)),
            Claim::Foreign {
                other: Some("uid-b".into())
            }
        );
    }

    #[test]
    fn recorded_state_is_folded_from_rows() {
        assert_eq!(recorded(&[], false, "a"), Recorded::Nothing);
        assert_eq!(recorded(&[], true, "a"), Recorded::Unowned);
        assert_eq!(recorded(&[None], true, "a"), Recorded::Unowned);
        assert_eq!(
            recorded(&[Some("a".into())], true, "a"),
            Recorded::Owner("a".into())
        );
        assert_eq!(
            recorded(&[Some("a".into()), Some("b".into())], true, "a"),
            Recorded::Owner("b".into())
        );
    }

    #[test]
    fn refusals_name_the_org_the_owner_and_the_annotation() {
        let m = refusal("acme", Some("1234"));
        assert!(m.contains("acme") && m.contains("1234") && m.contains("bulkhead.dev/adopt-from"));
        let m = refusal("acme", None);
        assert!(m.contains("adopt-from: legacy"));
    }
}
