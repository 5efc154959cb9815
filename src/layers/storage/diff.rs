//! Pure decisions of the storage layer: who owns a principal or a prefix, and what differs between
//! an organization's IAM principal as read and as planned. `ensure` carries out the steps,
//! `verify` reports their findings, and `cleanup`/`retire` carry out the removal steps.

use serde_json::Value;

use super::policy::{ORG_TAG, same_document};

/// Tag that records the UID of the Organization owning a principal.
pub const OWNER_TAG: &str = "bulkhead_owner_uid";
/// `adopt_from` value that takes over state recorded with no owner UID (made before owners were
/// recorded).
pub const LEGACY: &str = "legacy";
/// Annotation that sets `adopt_from`, named in refusals.
pub const ADOPT_ANNOTATION: &str = "bulkhead.dev/adopt-from";

/// The ownership tags of a principal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerTags {
    /// The `org_id` tag.
    pub org: Option<String>,
    /// The owner UID tag.
    pub owner: Option<String>,
}

impl OwnerTags {
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut tags = Self::default();
        for (k, v) in pairs {
            match k {
                ORG_TAG => tags.org = Some(v.to_owned()),
                OWNER_TAG => tags.owner = Some(v.to_owned()),
                _ => {}
            }
        }
        tags
    }
}

/// What the backend records about who owns a thing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Nothing there.
    Absent,
    /// Recorded as owned by this Organization UID.
    Owned(String),
    /// Made by bulkhead for this orgId before owners were recorded.
    Legacy,
    /// Not made by bulkhead for this orgId: untagged, or tagged for another orgId.
    Foreign,
    /// Created by this Organization UID in a pass that stopped before the owner tags were
    /// written: untagged, holding nothing, and named by the creation record written before the
    /// create call (see [`interrupted_creation`]).
    Interrupted(String),
}

/// The record of a principal, given the creation record (`pending`: the UID that was about to
/// create it) and whether it is `empty` (no access key, no policy). A crash between CreateUser
/// and TagUser leaves exactly that: an untagged, empty principal named in an operator-only
/// creation record, which only the admin could have written. Anything else stays as recorded;
/// a tagged or non-empty principal is never taken as an interrupted creation.
pub fn interrupted_creation(
    record: Record,
    tags: &OwnerTags,
    empty: bool,
    pending: Option<&str>,
) -> Record {
    match (record, pending) {
        (Record::Foreign, Some(uid)) if *tags == OwnerTags::default() && empty => {
            Record::Interrupted(uid.to_owned())
        }
        (r, _) => r,
    }
}

/// The record of a principal named after `org`, from its tags.
pub fn principal_record(exists: bool, tags: &OwnerTags, org: &str) -> Record {
    if !exists {
        return Record::Absent;
    }
    match (&tags.org, &tags.owner) {
        (Some(o), Some(uid)) if o == org => Record::Owned(uid.clone()),
        (Some(o), None) if o == org => Record::Legacy,
        _ => Record::Foreign,
    }
}

/// The record of a prefix, from its owner marker and whether any object lies under it.
pub fn prefix_record(marker: Option<&str>, has_objects: bool) -> Record {
    match marker {
        Some(uid) => Record::Owned(uid.to_owned()),
        None if has_objects => Record::Legacy,
        None => Record::Absent,
    }
}

/// What `ensure` may do with a thing, given its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nothing there: create it, recording the owner.
    Create,
    /// Already recorded as ours.
    Ours,
    /// Explicitly taken over from this earlier owner (a UID, or `legacy`): record the new owner.
    Adopt(String),
    /// This Organization's own creation, interrupted before the owner was recorded: record it.
    Finish,
}

/// Decides whether the Organization `uid` may take `what` (e.g. "IAM user acme"); `Err` is the
/// refusal, naming the orgId, the other owner and the adoption annotation.
pub fn claim(
    what: &str,
    org: &str,
    record: &Record,
    uid: &str,
    adopt_from: Option<&str>,
) -> Result<Claim, String> {
    match record {
        Record::Absent => Ok(Claim::Create),
        Record::Owned(owner) if owner == uid => Ok(Claim::Ours),
        Record::Owned(owner) if adopt_from == Some(owner.as_str()) => {
            Ok(Claim::Adopt(owner.clone()))
        }
        Record::Owned(owner) => Err(format!(
            "orgId {org}: {what} is owned by Organization UID {owner}, not {uid}; to take over its retained data set the annotation {ADOPT_ANNOTATION}: {owner}"
        )),
        Record::Legacy if adopt_from == Some(LEGACY) => Ok(Claim::Adopt(LEGACY.to_owned())),
        Record::Legacy => Err(format!(
            "orgId {org}: {what} has no recorded owner (made before owners were recorded); to take it over set the annotation {ADOPT_ANNOTATION}: {LEGACY}"
        )),
        Record::Interrupted(owner) if owner == uid => Ok(Claim::Finish),
        Record::Foreign | Record::Interrupted(_) => Err(format!(
            "orgId {org}: {what} exists and was not created by bulkhead for this orgId; it is never adopted, choose another orgId"
        )),
    }
}

/// Whether removal by the Organization `uid` may touch the thing: only what it owns.
pub fn removable(record: &Record, uid: &str) -> bool {
    matches!(record, Record::Owned(owner) | Record::Interrupted(owner) if owner == uid)
}

/// The audit's view of a principal's ownership; an empty `uid` (a caller that does not know the
/// owner, such as the CLI) checks the orgId tag only.
pub fn ownership_finding(what: &str, org: &str, record: &Record, uid: &str) -> Option<String> {
    match record {
        Record::Absent => None,
        Record::Owned(owner) if uid.is_empty() || owner == uid => None,
        Record::Owned(owner) => Some(format!(
            "{what} is owned by Organization UID {owner}, not {uid}"
        )),
        Record::Legacy if uid.is_empty() => None,
        Record::Legacy => Some(format!("{what} has no {OWNER_TAG} tag")),
        Record::Foreign => Some(format!("{what} is not tagged {ORG_TAG}={org}")),
        Record::Interrupted(owner) if owner == uid => Some(format!(
            "{what} is not tagged yet: its creation was interrupted; the next pass records the owner"
        )),
        Record::Interrupted(_) => Some(format!("{what} is not tagged {ORG_TAG}={org}")),
    }
}

/// The IAM principal name of the caller `arn`: a user, a role, or an assumed-role session's role.
pub fn principal_of_arn(arn: &str) -> Option<&str> {
    if let Some((_, rest)) = arn.split_once(":assumed-role/") {
        return rest.split('/').next().filter(|n| !n.is_empty());
    }
    let (_, rest) = arn
        .split_once(":user/")
        .or_else(|| arn.split_once(":role/"))?;
    rest.rsplit('/').next().filter(|n| !n.is_empty())
}

/// Why an orgId may not be used: it names a principal the guard exempts (the operator's own, or
/// one listed in `guardExemptUsers`). Checked in every mode.
pub fn exempt_refusal(org: &str, operator_arn: &str, exempt: &[String]) -> Option<String> {
    if principal_of_arn(operator_arn) == Some(org) {
        return Some(format!(
            "orgId {org} names the operator's own IAM principal; refused"
        ));
    }
    exempt.iter().any(|e| e == org).then(|| {
        format!("orgId {org} names an IAM principal the bucket guard exempts (guardExemptUsers); refused")
    })
}

/// A policy attached to a principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub name: String,
    pub arn: String,
}

/// The organization's managed policy (`user` mode).
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedPolicy {
    pub arn: String,
    /// The default version's document, decoded.
    pub document: Option<Value>,
}

/// An IAM user as read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserState {
    pub exists: bool,
    pub tags: OwnerTags,
    pub policy: Option<ManagedPolicy>,
    pub attached: Vec<Attached>,
    pub inline: Vec<String>,
    pub keys: Vec<String>,
}

/// An IAM role as read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoleState {
    pub exists: bool,
    pub arn: Option<String>,
    pub tags: OwnerTags,
    pub trust: Option<Value>,
    /// Names of the inline policies.
    pub inline: Vec<String>,
    /// The document of the inline policy bulkhead writes, when present.
    pub policy: Option<Value>,
    pub attached: Vec<Attached>,
}

/// What the organization's user should be.
#[derive(Clone, Debug)]
pub struct UserPlan<'a> {
    pub name: &'a str,
    pub policy_name: &'a str,
    pub document: &'a Value,
    /// The access key id the credentials Secret holds (with its secret).
    pub held_key: Option<&'a str>,
    /// Replace the access key.
    pub rotate: bool,
}

/// What a role should be.
#[derive(Clone, Debug)]
pub struct RolePlan<'a> {
    pub name: &'a str,
    /// Name of the one inline policy.
    pub policy_name: &'a str,
    pub trust: &'a Value,
    pub permissions: &'a Value,
}

/// One change to an IAM principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    CreateUser,
    CreatePolicy,
    RestorePolicy { arn: String },
    AttachPolicy,
    DetachUserPolicy { arn: String },
    DeleteUserInline { name: String },
    DeleteKey { id: String },
    IssueKey,
    DeletePolicy { arn: String },
    DeleteUser,
    CreateRole,
    UpdateTrust,
    PutRolePolicy,
    DeleteRoleInline { name: String },
    DetachRolePolicy { arn: String },
    DeleteRole,
}

/// An action with what the audit says before it and what `ensure` reports after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub finding: Option<String>,
    pub repair: Option<String>,
}

impl Step {
    fn new(action: Action, finding: Option<String>, repair: Option<String>) -> Self {
        Self {
            action,
            finding,
            repair,
        }
    }
    /// Drift found, and repaired by the action.
    fn fix(action: Action, finding: String, repair: String) -> Self {
        Self::new(action, Some(finding), Some(repair))
    }
    /// Drift found and repaired (neither is reported for a principal created this pass).
    fn drift(action: Action, fresh: bool, finding: String, repair: String) -> Self {
        if fresh {
            Self::new(action, None, None)
        } else {
            Self::new(action, Some(finding), Some(repair))
        }
    }
}

/// The findings of a list of steps.
pub fn findings(steps: &[Step]) -> Vec<String> {
    steps.iter().filter_map(|s| s.finding.clone()).collect()
}

/// The steps from the user as read to the user as planned.
pub fn user_diff(plan: &UserPlan<'_>, st: &UserState) -> Vec<Step> {
    let (name, ours) = (plan.name, plan.policy_name);
    let fresh = !st.exists;
    let mut steps = Vec::new();
    if fresh {
        steps.push(Step::new(
            Action::CreateUser,
            Some(format!("IAM user {name} is missing")),
            None,
        ));
    }
    match &st.policy {
        None => steps.push(Step::drift(
            Action::CreatePolicy,
            fresh,
            format!("IAM policy {ours} is missing"),
            format!("IAM policy {ours} was missing; created"),
        )),
        Some(p)
            if p.document
                .as_ref()
                .is_some_and(|d| same_document(d, plan.document)) => {}
        Some(p) => steps.push(Step::drift(
            Action::RestorePolicy { arn: p.arn.clone() },
            fresh,
            format!("IAM policy {ours} differs from the plan (widened or edited)"),
            format!("IAM policy {ours} differed from the plan (widened or edited); restored"),
        )),
    }
    if !st.attached.iter().any(|a| a.name == ours) {
        steps.push(Step::drift(
            Action::AttachPolicy,
            fresh,
            format!("IAM policy {ours} is not attached to user {name}"),
            format!("IAM policy {ours} was detached from user {name}; attached again"),
        ));
    }
    for other in st.attached.iter().filter(|a| a.name != ours) {
        steps.push(Step::fix(
            Action::DetachUserPolicy {
                arn: other.arn.clone(),
            },
            format!(
                "policy {} is attached to user {name} and widens its access",
                other.name
            ),
            format!(
                "policy {} attached to user {name} widened its access; detached",
                other.name
            ),
        ));
    }
    for inline in &st.inline {
        steps.push(Step::fix(
            Action::DeleteUserInline {
                name: inline.clone(),
            },
            format!("inline policy {inline} on user {name} widens its access"),
            format!("inline policy {inline} on user {name} widened its access; deleted"),
        ));
    }
    steps.extend(key_steps(plan, &st.keys, fresh));
    steps
}

/// Keeps the key the Secret holds unless it is gone or rotation is asked for; every other key is
/// deleted, so an old key stops working.
fn key_steps(plan: &UserPlan<'_>, keys: &[String], fresh: bool) -> Vec<Step> {
    let name = plan.name;
    let kept = plan.held_key.filter(|id| keys.iter().any(|k| k == id));
    let mut steps = Vec::new();
    if let Some(keep) = kept.filter(|_| !plan.rotate) {
        for stray in keys.iter().filter(|k| *k != keep) {
            steps.push(Step::fix(
                Action::DeleteKey { id: stray.clone() },
                format!("user {name} has an access key the credentials Secret does not hold"),
                format!(
                    "an access key of user {name} not held by the credentials Secret was deleted"
                ),
            ));
        }
        return steps;
    }
    // IAM allows two keys per user: make room before issuing.
    for old in keys {
        steps.push(Step::new(Action::DeleteKey { id: old.clone() }, None, None));
    }
    let (finding, repair) = match (plan.held_key, kept) {
        (Some(_), None) => (
            Some(format!(
                "the access key in the credentials Secret no longer exists for user {name}"
            )),
            Some(format!(
                "access key of user {name} was deleted; a new one was issued"
            )),
        ),
        (None, _) if fresh => (None, None),
        (None, _) => (
            Some("the credentials Secret holds no access key".to_owned()),
            None,
        ),
        (Some(_), Some(_)) => (None, None),
    };
    let repair = if plan.rotate && !keys.is_empty() {
        Some(format!("access key of user {name} rotated"))
    } else {
        repair
    };
    steps.push(Step::new(Action::IssueKey, finding, repair));
    steps
}

/// The steps from the role as read to the role as planned.
pub fn role_diff(plan: &RolePlan<'_>, st: &RoleState) -> Vec<Step> {
    let (name, ours, fresh) = (plan.name, plan.policy_name, !st.exists);
    let missing = || Some(format!("IAM role {name} is missing"));
    let mut steps = Vec::new();
    if fresh {
        steps.push(Step::new(Action::CreateRole, missing(), None));
    } else if !st
        .trust
        .as_ref()
        .is_some_and(|t| same_document(t, plan.trust))
    {
        steps.push(Step::fix(
            Action::UpdateTrust,
            format!("trust policy of role {name} differs from the plan"),
            format!("trust policy of role {name} differed from the plan; restored"),
        ));
    }
    for p in st.inline.iter().filter(|p| *p != ours) {
        steps.push(Step::fix(
            Action::DeleteRoleInline { name: p.clone() },
            format!("inline policy {p} on role {name} widens its access"),
            format!("inline policy {p} on role {name} widened its access; deleted"),
        ));
    }
    match &st.policy {
        Some(doc) if same_document(doc, plan.permissions) => {}
        Some(_) => steps.push(Step::fix(
            Action::PutRolePolicy,
            format!("policy of role {name} differs from the plan (widened or edited)"),
            format!("policy of role {name} differed from the plan (widened or edited); restored"),
        )),
        None => steps.push(Step::drift(
            Action::PutRolePolicy,
            fresh,
            format!("role {name} has no policy {ours}"),
            format!("policy {ours} of role {name} was missing; restored"),
        )),
    }
    for p in &st.attached {
        steps.push(Step::fix(
            Action::DetachRolePolicy { arn: p.arn.clone() },
            format!(
                "policy {} is attached to role {name} and widens its access",
                p.name
            ),
            format!(
                "policy {} attached to role {name} widened its access; detached",
                p.name
            ),
        ));
    }
    steps
}

/// Everything that removes a user: keys, policies, the managed policy, the user.
pub fn user_removal(st: &UserState) -> Vec<Action> {
    if !st.exists {
        return Vec::new();
    }
    let mut out: Vec<Action> = st
        .keys
        .iter()
        .map(|id| Action::DeleteKey { id: id.clone() })
        .collect();
    out.extend(
        st.attached
            .iter()
            .map(|a| Action::DetachUserPolicy { arn: a.arn.clone() }),
    );
    out.extend(
        st.inline
            .iter()
            .map(|n| Action::DeleteUserInline { name: n.clone() }),
    );
    out.extend(
        st.policy
            .iter()
            .map(|p| Action::DeletePolicy { arn: p.arn.clone() }),
    );
    out.push(Action::DeleteUser);
    out
}

/// Everything that removes a role: its inline and attached policies, then the role.
pub fn role_removal(st: &RoleState) -> Vec<Action> {
    let inline = st
        .inline
        .iter()
        .cloned()
        .map(|name| Action::DeleteRoleInline { name });
    let detach = st.attached.iter().map(|a| a.arn.clone());
    let detach = detach.map(|arn| Action::DetachRolePolicy { arn });
    match st.exists {
        true => inline.chain(detach).chain([Action::DeleteRole]).collect(),
        false => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
