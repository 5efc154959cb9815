use serde_json::json;

use super::*;

fn tags(org: Option<&str>, owner: Option<&str>) -> OwnerTags {
    OwnerTags {
        org: org.map(str::to_owned),
        owner: owner.map(str::to_owned),
    }
}

fn doc() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::b/acme/*"]}]})
}

fn wide() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
}

fn attached(name: &str) -> Attached {
    Attached {
        name: name.to_owned(),
        arn: format!("arn:aws:iam::1:policy/{name}"),
    }
}

/// A user exactly as planned, holding key `k1`.
fn good_user() -> UserState {
    UserState {
        exists: true,
        tags: tags(Some("acme"), Some("u1")),
        policy: Some(ManagedPolicy {
            arn: "arn:aws:iam::1:policy/bulkhead-acme".into(),
            document: Some(doc()),
        }),
        attached: vec![attached("bulkhead-acme")],
        inline: vec![],
        keys: vec!["k1".into()],
    }
}

fn plan<'a>(d: &'a Value, held: Option<&'a str>, rotate: bool) -> UserPlan<'a> {
    UserPlan {
        name: "acme",
        policy_name: "bulkhead-acme",
        document: d,
        held_key: held,
        rotate,
    }
}

/// The diff of `st` against the plan, with the Secret holding `k1` and no rotation.
fn diff_k1(st: &UserState) -> Vec<Step> {
    user_diff(&plan(&doc(), Some("k1"), false), st)
}

fn actions(steps: &[Step]) -> Vec<Action> {
    steps.iter().map(|s| s.action.clone()).collect()
}

fn repairs(steps: &[Step]) -> Vec<String> {
    steps.iter().filter_map(|s| s.repair.clone()).collect()
}

#[test]
fn tags_are_read_by_key_and_others_ignored() {
    let t = OwnerTags::from_pairs([("team", "x"), (ORG_TAG, "acme"), (OWNER_TAG, "u1")]);
    assert_eq!(t, tags(Some("acme"), Some("u1")));
    assert_eq!(OwnerTags::from_pairs([]), OwnerTags::default());
}

#[test]
fn principal_records_follow_the_tags() {
    assert_eq!(
        principal_record(false, &tags(Some("acme"), Some("u1")), "acme"),
        Record::Absent
    );
    assert_eq!(
        principal_record(true, &tags(Some("acme"), Some("u1")), "acme"),
        Record::Owned("u1".into())
    );
    assert_eq!(
        principal_record(true, &tags(Some("acme"), None), "acme"),
        Record::Legacy
    );
    // Untagged (ci-deploy, the operator's own) or another orgId's: never ours.
    assert_eq!(
        principal_record(true, &tags(None, None), "acme"),
        Record::Foreign
    );
    assert_eq!(
        principal_record(true, &tags(None, Some("u1")), "acme"),
        Record::Foreign
    );
    assert_eq!(
        principal_record(true, &tags(Some("globex"), Some("u1")), "acme"),
        Record::Foreign
    );
}

#[test]
fn only_an_untagged_empty_principal_named_in_the_creation_record_is_an_interrupted_creation() {
    let none = OwnerTags::default();
    let interrupted = |r, t: &OwnerTags, empty, pending| interrupted_creation(r, t, empty, pending);
    assert_eq!(
        interrupted(Record::Foreign, &none, true, Some("u1")),
        Record::Interrupted("u1".into())
    );
    // No creation record: someone else's user.
    assert_eq!(
        interrupted(Record::Foreign, &none, true, None),
        Record::Foreign
    );
    // Holding a key or a policy: not what a crash between CreateUser and TagUser leaves.
    assert_eq!(
        interrupted(Record::Foreign, &none, false, Some("u1")),
        Record::Foreign
    );
    // Tagged for another orgId or owner: never.
    let other = tags(Some("other"), Some("u9"));
    assert_eq!(
        interrupted(Record::Foreign, &other, true, Some("u1")),
        Record::Foreign
    );
    let half = tags(None, Some("u1"));
    assert_eq!(
        interrupted(Record::Foreign, &half, true, Some("u1")),
        Record::Foreign
    );
    // What is recorded otherwise stays.
    for r in [Record::Absent, Record::Owned("u2".into()), Record::Legacy] {
        assert_eq!(interrupted(r.clone(), &none, true, Some("u1")), r);
    }
    // Its own interrupted creation is finished and removable by its creator only.
    let rec = Record::Interrupted("u1".into());
    assert_eq!(
        claim("IAM user acme", "acme", &rec, "u1", None),
        Ok(Claim::Finish)
    );
    let refused = claim("IAM user acme", "acme", &rec, "u2", Some("u1")).unwrap_err();
    assert!(refused.contains("never adopted"), "{refused}");
    assert!(removable(&rec, "u1") && !removable(&rec, "u2"));
    assert!(
        ownership_finding("IAM user acme", "acme", &rec, "u1")
            .is_some_and(|f| f.contains("interrupted"))
    );
}

#[test]
fn prefix_records_follow_the_marker_then_the_objects() {
    assert_eq!(prefix_record(None, false), Record::Absent);
    assert_eq!(prefix_record(None, true), Record::Legacy);
    assert_eq!(prefix_record(Some("u1"), false), Record::Owned("u1".into()));
    assert_eq!(prefix_record(Some("u1"), true), Record::Owned("u1".into()));
}

#[test]
fn claims_create_keep_adopt_or_refuse() {
    let owned = Record::Owned("u1".into());
    assert_eq!(
        claim("x", "acme", &Record::Absent, "u2", None),
        Ok(Claim::Create)
    );
    assert_eq!(claim("x", "acme", &owned, "u1", None), Ok(Claim::Ours));
    assert_eq!(
        claim("x", "acme", &owned, "u1", Some("u0")),
        Ok(Claim::Ours),
        "an adopt-from left in place changes nothing"
    );
    assert_eq!(
        claim("x", "acme", &owned, "u2", Some("u1")),
        Ok(Claim::Adopt("u1".into()))
    );
    let refused = claim("IAM user acme", "acme", &owned, "u2", None).unwrap_err();
    for part in ["acme", "u1", "u2", ADOPT_ANNOTATION] {
        assert!(refused.contains(part), "{refused} lacks {part}");
    }
    assert!(claim("x", "acme", &owned, "u2", Some("u3")).is_err());
    assert!(claim("x", "acme", &owned, "u2", Some(LEGACY)).is_err());
    assert_eq!(
        claim("x", "acme", &Record::Legacy, "u2", Some(LEGACY)),
        Ok(Claim::Adopt(LEGACY.into()))
    );
    let legacy = claim("x", "acme", &Record::Legacy, "u2", None).unwrap_err();
    assert!(legacy.contains(LEGACY) && legacy.contains(ADOPT_ANNOTATION));
    assert!(claim("x", "acme", &Record::Legacy, "u2", Some("u1")).is_err());
    // Foreign is never adopted, whatever the annotation says.
    for adopt in [None, Some(LEGACY), Some("u1"), Some("")] {
        assert!(claim("x", "acme", &Record::Foreign, "u2", adopt).is_err());
    }
}

#[test]
fn only_the_owner_removes() {
    assert!(removable(&Record::Owned("u1".into()), "u1"));
    assert!(!removable(&Record::Owned("u1".into()), "u2"));
    assert!(!removable(&Record::Owned("u1".into()), ""));
    for r in [Record::Absent, Record::Legacy, Record::Foreign] {
        assert!(!removable(&r, "u1"), "{r:?}");
    }
}

#[test]
fn ownership_findings() {
    let owned = Record::Owned("u1".into());
    assert_eq!(ownership_finding("user a", "a", &owned, "u1"), None);
    assert_eq!(
        ownership_finding("user a", "a", &owned, ""),
        None,
        "unknown owner"
    );
    assert!(
        ownership_finding("user a", "a", &owned, "u2")
            .unwrap()
            .contains("u1")
    );
    assert!(ownership_finding("user a", "a", &Record::Legacy, "u1").is_some());
    assert!(ownership_finding("user a", "a", &Record::Legacy, "").is_none());
    assert!(
        ownership_finding("user a", "a", &Record::Foreign, "")
            .unwrap()
            .contains("org_id=a")
    );
    assert_eq!(
        ownership_finding("user a", "a", &Record::Absent, "u1"),
        None
    );
}

#[test]
fn principal_names_of_caller_arns() {
    for (arn, want) in [
        ("arn:aws:iam::000000000000:user/admin", Some("admin")),
        ("arn:aws:iam::1:user/some/path/ops", Some("ops")),
        ("arn:aws:iam::1:role/bulkhead/operator", Some("operator")),
        (
            "arn:aws:sts::1:assumed-role/operator/session-1",
            Some("operator"),
        ),
        ("arn:aws:iam::1:root", None),
        ("", None),
        ("arn:aws:iam::1:user/", None),
    ] {
        assert_eq!(principal_of_arn(arn), want, "{arn}");
    }
}

#[test]
fn exempt_principals_are_refused_in_every_form() {
    let exempt = vec!["backup-svc".to_owned()];
    let op_user = "arn:aws:iam::1:user/ops";
    assert!(exempt_refusal("ops", op_user, &exempt).is_some());
    assert!(exempt_refusal("backup-svc", op_user, &exempt).is_some());
    assert!(exempt_refusal("acme", op_user, &exempt).is_none());
    let op_role = "arn:aws:sts::1:assumed-role/bulkhead-operator/s";
    assert!(exempt_refusal("bulkhead-operator", op_role, &[]).is_some());
    assert!(exempt_refusal("s", op_role, &[]).is_none());
    assert!(exempt_refusal("ops", "", &[]).is_none());
}

#[test]
fn a_user_as_planned_needs_nothing() {
    let steps = diff_k1(&good_user());
    assert!(steps.is_empty(), "{steps:?}");
}

#[test]
fn a_missing_user_is_created_with_everything_and_reports_one_finding() {
    let d = doc();
    let steps = user_diff(&plan(&d, None, false), &UserState::default());
    assert_eq!(
        actions(&steps),
        vec![
            Action::CreateUser,
            Action::CreatePolicy,
            Action::AttachPolicy,
            Action::IssueKey
        ]
    );
    assert_eq!(
        findings(&steps),
        vec!["IAM user acme is missing".to_owned()]
    );
    assert!(repairs(&steps).is_empty(), "creation is not a repair");
}

#[test]
fn a_leftover_policy_of_a_missing_user_is_reused() {
    let d = doc();
    let st = UserState {
        policy: good_user().policy,
        ..UserState::default()
    };
    let steps = user_diff(&plan(&d, None, false), &st);
    assert_eq!(
        actions(&steps),
        vec![Action::CreateUser, Action::AttachPolicy, Action::IssueKey]
    );
}

#[test]
fn a_widened_or_unreadable_policy_is_restored() {
    for document in [Some(wide()), None] {
        let mut st = good_user();
        st.policy.as_mut().unwrap().document = document;
        let steps = diff_k1(&st);
        assert_eq!(
            actions(&steps),
            vec![Action::RestorePolicy {
                arn: "arn:aws:iam::1:policy/bulkhead-acme".into()
            }]
        );
        assert!(findings(&steps)[0].contains("differs from the plan"));
        assert!(repairs(&steps)[0].contains("widened or edited"));
    }
}

#[test]
fn reformatted_policy_is_not_drift() {
    let mut st = good_user();
    st.policy.as_mut().unwrap().document = Some(
        json!({"Statement": [{"Resource": "arn:aws:s3:::b/acme/*", "Action": "s3:GetObject", "Effect": "Allow"}], "Version": "2012-10-17"}),
    );
    assert!(diff_k1(&st).is_empty());
}

#[test]
fn a_missing_policy_of_an_existing_user_is_created_and_reported() {
    let mut st = good_user();
    st.policy = None;
    st.attached.clear();
    let steps = diff_k1(&st);
    assert_eq!(
        actions(&steps),
        vec![Action::CreatePolicy, Action::AttachPolicy]
    );
    assert_eq!(findings(&steps).len(), 2);
    assert!(findings(&steps)[1].contains("is not attached to user acme"));
    assert!(repairs(&steps)[1].contains("attached again"));
}

#[test]
fn extra_attached_and_inline_policies_are_removed() {
    let mut st = good_user();
    st.attached.push(attached("admin-all"));
    st.inline = vec!["sneaky".into(), "more".into()];
    let steps = diff_k1(&st);
    assert_eq!(
        actions(&steps),
        vec![
            Action::DetachUserPolicy {
                arn: "arn:aws:iam::1:policy/admin-all".into()
            },
            Action::DeleteUserInline {
                name: "sneaky".into()
            },
            Action::DeleteUserInline {
                name: "more".into()
            },
        ]
    );
    let f = findings(&steps);
    assert!(f[0].contains("admin-all is attached to user acme"), "{f:?}");
    assert!(f[1].contains("inline policy sneaky"), "{f:?}");
    assert!(repairs(&steps)[0].contains("detached"));
}

#[test]
fn the_held_key_is_kept_and_strays_deleted() {
    let mut st = good_user();
    st.keys = vec!["k0".into(), "k1".into()];
    let steps = diff_k1(&st);
    assert_eq!(actions(&steps), vec![Action::DeleteKey { id: "k0".into() }]);
    assert_eq!(findings(&steps).len(), 1);
    assert!(!findings(&steps)[0].contains("k0"), "no key id in findings");
    assert!(repairs(&steps)[0].contains("not held by the credentials Secret"));
}

#[test]
fn a_deleted_held_key_is_replaced() {
    let mut st = good_user();
    st.keys = vec!["k9".into()];
    let steps = diff_k1(&st);
    assert_eq!(
        actions(&steps),
        vec![Action::DeleteKey { id: "k9".into() }, Action::IssueKey]
    );
    assert!(findings(&steps)[0].contains("no longer exists"));
    assert!(repairs(&steps)[0].contains("was deleted; a new one was issued"));
}

#[test]
fn no_held_key_issues_one_and_the_audit_says_so() {
    let d = doc();
    let mut st = good_user();
    st.keys.clear();
    let steps = user_diff(&plan(&d, None, false), &st);
    assert_eq!(actions(&steps), vec![Action::IssueKey]);
    assert_eq!(
        findings(&steps),
        vec!["the credentials Secret holds no access key".to_owned()]
    );
}

#[test]
fn rotation_deletes_every_old_key_before_issuing() {
    let d = doc();
    let mut st = good_user();
    st.keys = vec!["k0".into(), "k1".into()];
    let steps = user_diff(&plan(&d, Some("k1"), true), &st);
    assert_eq!(
        actions(&steps),
        vec![
            Action::DeleteKey { id: "k0".into() },
            Action::DeleteKey { id: "k1".into() },
            Action::IssueKey
        ]
    );
    assert_eq!(
        repairs(&steps),
        vec!["access key of user acme rotated".to_owned()]
    );
    // Rotation of a fresh user is no repair.
    let steps = user_diff(&plan(&d, None, true), &UserState::default());
    assert!(repairs(&steps).is_empty());
    assert_eq!(steps.last().unwrap().action, Action::IssueKey);
}

fn role_plan<'a>(trust: &'a Value, perms: &'a Value) -> RolePlan<'a> {
    RolePlan {
        name: "acme",
        policy_name: "bulkhead-prefix",
        trust,
        permissions: perms,
    }
}

fn trust() -> Value {
    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:user/ops"}, "Action": "sts:AssumeRole"}]})
}

fn good_role() -> RoleState {
    RoleState {
        exists: true,
        arn: Some("arn:aws:iam::1:role/bulkhead/acme".into()),
        tags: tags(Some("acme"), Some("u1")),
        trust: Some(trust()),
        inline: vec!["bulkhead-prefix".into()],
        policy: Some(doc()),
        attached: vec![],
    }
}

#[test]
fn a_role_as_planned_needs_nothing() {
    let (t, p) = (trust(), doc());
    assert!(role_diff(&role_plan(&t, &p), &good_role()).is_empty());
}

#[test]
fn a_missing_role_is_created_with_its_policy_and_no_repair() {
    let (t, p) = (trust(), doc());
    let steps = role_diff(&role_plan(&t, &p), &RoleState::default());
    assert_eq!(
        actions(&steps),
        vec![Action::CreateRole, Action::PutRolePolicy]
    );
    assert_eq!(
        findings(&steps),
        vec!["IAM role acme is missing".to_owned()]
    );
    assert!(repairs(&steps).is_empty());
}

#[test]
fn a_changed_trust_policy_is_restored() {
    let (t, p) = (trust(), doc());
    for changed in [Some(wide()), None] {
        let mut st = good_role();
        st.trust = changed;
        let steps = role_diff(&role_plan(&t, &p), &st);
        assert_eq!(actions(&steps), vec![Action::UpdateTrust]);
        assert!(repairs(&steps)[0].contains("trust policy of role acme"));
    }
}

#[test]
fn widened_role_policies_are_found_and_repaired_one_repair_each() {
    let (t, p) = (trust(), doc());
    let mut st = good_role();
    st.policy = Some(wide());
    st.inline.push("sneaky".into());
    st.attached.push(attached("admin-all"));
    let steps = role_diff(&role_plan(&t, &p), &st);
    assert_eq!(
        actions(&steps),
        vec![
            Action::DeleteRoleInline {
                name: "sneaky".into()
            },
            Action::PutRolePolicy,
            Action::DetachRolePolicy {
                arn: "arn:aws:iam::1:policy/admin-all".into()
            },
        ]
    );
    let f = findings(&steps);
    assert!(f.iter().any(|x| x.contains("sneaky")), "{f:?}");
    assert!(f.iter().any(|x| x.contains("widened or edited")), "{f:?}");
    assert!(f.iter().any(|x| x.contains("admin-all")), "{f:?}");
    assert_eq!(repairs(&steps).len(), 3);
}

#[test]
fn a_missing_inline_policy_of_an_existing_role_is_restored() {
    let (t, p) = (trust(), doc());
    let mut st = good_role();
    st.inline.clear();
    st.policy = None;
    let steps = role_diff(&role_plan(&t, &p), &st);
    assert_eq!(actions(&steps), vec![Action::PutRolePolicy]);
    assert!(findings(&steps)[0].contains("has no policy bulkhead-prefix"));
    assert!(repairs(&steps)[0].contains("was missing"));
}

#[test]
fn user_removal_takes_everything_in_order() {
    let mut st = good_user();
    st.keys.push("k2".into());
    st.inline.push("x".into());
    assert_eq!(
        user_removal(&st),
        vec![
            Action::DeleteKey { id: "k1".into() },
            Action::DeleteKey { id: "k2".into() },
            Action::DetachUserPolicy {
                arn: "arn:aws:iam::1:policy/bulkhead-acme".into()
            },
            Action::DeleteUserInline { name: "x".into() },
            Action::DeletePolicy {
                arn: "arn:aws:iam::1:policy/bulkhead-acme".into()
            },
            Action::DeleteUser,
        ]
    );
    assert!(user_removal(&UserState::default()).is_empty());
    let leftover = UserState {
        policy: good_user().policy,
        ..UserState::default()
    };
    assert!(
        user_removal(&leftover).is_empty(),
        "a policy without its user is nobody's to remove"
    );
}

#[test]
fn role_removal_takes_policies_then_the_role() {
    let mut st = good_role();
    st.attached.push(attached("extra"));
    assert_eq!(
        role_removal(&st),
        vec![
            Action::DeleteRoleInline {
                name: "bulkhead-prefix".into()
            },
            Action::DetachRolePolicy {
                arn: "arn:aws:iam::1:policy/extra".into()
            },
            Action::DeleteRole,
        ]
    );
    assert!(role_removal(&RoleState::default()).is_empty());
}
