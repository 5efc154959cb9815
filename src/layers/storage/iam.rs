//! IAM objects per mode: the organization's user and access key (`user`), its role (`role`), or
//! the one shared tenant role (`abac`). Readers turn IAM into a [`UserState`] or [`RoleState`];
//! the pure diff in [`super::diff`] says what to do; the appliers here carry out its actions.

use aws_sdk_iam::types::{AttachedPolicy, Tag};
use aws_sdk_s3::config::Credentials as AwsCredentials;
use serde_json::Value;

use super::diff::{
    self, Action, Attached, Claim, ManagedPolicy, OWNER_TAG, OwnerTags, RolePlan, RoleState,
    UserPlan, UserState,
};
use super::policy::{self, ORG_TAG, PolicyDocument};
use super::{
    KEY_ACCESS_KEY_ID, KEY_CREDENTIAL_EXPIRATION, KEY_ROLE_ARN, KEY_SECRET_ACCESS_KEY,
    KEY_SESSION_TAG, KEY_SESSION_TOKEN, StorageLayer, api_error, call, call_opt,
};
use crate::api::platform::StorageMode;
use crate::layers::{Credentials, LayerError, Repair, Tenant};
use crate::tenant::OrgId;

/// Sends a deletion request; what is already gone counts as deleted.
macro_rules! gone {
    ($op:literal, $req:expr) => {
        call_opt($op, NO_SUCH, $req.send()).await.map(drop)
    };
}

/// Name of the inline policy on an organization's role and on the shared role.
const ROLE_POLICY_NAME: &str = "bulkhead-prefix";
/// IAM's error code for "not there".
const NO_SUCH: &str = "NoSuchEntity";

/// IAM user (or role) name of an organization: the org id itself, because the bucket guard
/// resolves the owner's prefix from `${aws:username}`.
pub fn principal_name(org: &OrgId) -> String {
    org.as_str().to_owned()
}

/// Name of the organization's managed policy in `user` mode.
pub fn policy_name(org: &OrgId) -> String {
    format!("bulkhead-{}", org.as_str())
}

fn tag(key: &str, value: &str) -> Result<Tag, LayerError> {
    Tag::builder()
        .key(key)
        .value(value)
        .build()
        .map_err(|e| LayerError::Backend(format!("tag: {e}")))
}

/// The tags that record a principal's orgId and owning Organization.
fn owner_tags(tenant: &Tenant) -> Result<Vec<Tag>, LayerError> {
    Ok(vec![
        tag(ORG_TAG, tenant.org_id.as_str())?,
        tag(OWNER_TAG, &tenant.owner.uid)?,
    ])
}

fn decode(op: &str, raw: &str) -> Result<Value, LayerError> {
    policy::decode_document(raw).map_err(|e| LayerError::Backend(format!("{op}: {e}")))
}

fn attached_list(policies: &[AttachedPolicy]) -> Vec<Attached> {
    let one = |p: &AttachedPolicy| Attached {
        name: p.policy_name().unwrap_or_default().to_owned(),
        arn: p.policy_arn().unwrap_or_default().to_owned(),
    };
    policies.iter().map(one).collect()
}

fn tags_of(tags: &[Tag]) -> OwnerTags {
    OwnerTags::from_pairs(tags.iter().map(|t| (t.key(), t.value())))
}

/// The refusal of a claim on a principal, as a layer error.
fn claim_principal_of(
    what: &str,
    tenant: &Tenant,
    record: &diff::Record,
) -> Result<Claim, LayerError> {
    diff::claim(
        what,
        tenant.org_id.as_str(),
        record,
        &tenant.owner.uid,
        tenant.adopt_from.as_deref(),
    )
    .map_err(LayerError::Refused)
}

/// What `ensure` will converge, decided (and refused) before anything is written.
pub(super) enum PrincipalWork {
    User(UserState, Claim),
    Role(RoleState, Claim),
    Shared,
    /// `session` mode: nothing in IAM, a session per organization.
    Session,
}

/// Drops the keys of temporary credentials (a session's token and expiry) from a Secret that
/// gets a long-lived key or a role ARN instead.
fn drop_session_keys(creds: &mut Credentials) {
    creds.remove(KEY_SESSION_TOKEN);
    creds.remove(KEY_CREDENTIAL_EXPIRATION);
}

/// What the applier needs besides the action: the principal, its plan, and where results go.
struct Run<'a> {
    name: &'a str,
    /// The organization owning the principal (`None` for the shared role).
    tenant: Option<&'a Tenant>,
    /// The planned managed policy (user) or inline policy (role).
    policy: PolicyDocument,
    /// The planned trust policy (role).
    trust: PolicyDocument,
    /// The managed policy's ARN (user).
    policy_arn: Option<String>,
    /// The role's ARN (role).
    role_arn: Option<String>,
    /// Where an issued access key goes.
    creds: Option<&'a mut Credentials>,
}

impl<'a> Run<'a> {
    fn new(name: &'a str, tenant: Option<&'a Tenant>) -> Self {
        Self {
            name,
            tenant,
            policy: PolicyDocument::new(Vec::new()),
            trust: PolicyDocument::new(Vec::new()),
            policy_arn: None,
            role_arn: None,
            creds: None,
        }
    }

    fn tenant(&self) -> Result<&'a Tenant, LayerError> {
        self.tenant
            .ok_or_else(|| LayerError::Backend(format!("{} has no organization", self.name)))
    }
}

impl StorageLayer {
    fn policy_arn_guess(&self, org: &OrgId) -> String {
        format!(
            "arn:aws:iam::{}:policy{}{}",
            self.spec.account_id,
            self.spec.iam_path,
            policy_name(org)
        )
    }

    /// Whether the org id names a principal the guard exempts (the operator's own or one in
    /// `guardExemptUsers`): such an orgId is refused in every mode and never cleaned up.
    pub(super) async fn exempt(&self, org: &OrgId) -> Result<bool, LayerError> {
        Ok(self.exempt_refusal(org).await?.is_some())
    }

    async fn exempt_refusal(&self, org: &OrgId) -> Result<Option<String>, LayerError> {
        let operator = self.operator().await?;
        Ok(diff::exempt_refusal(
            org.as_str(),
            &operator.arn,
            &self.spec.guard_exempt_users,
        ))
    }

    /// Refuses org ids that collide with a principal the guard exempts.
    pub(super) async fn check_not_exempt(&self, org: &OrgId) -> Result<(), LayerError> {
        match self.exempt_refusal(org).await? {
            Some(why) => Err(LayerError::Refused(why)),
            None => Ok(()),
        }
    }

    // ---- readers ----

    async fn read_managed_policy(&self, org: &OrgId) -> Result<Option<ManagedPolicy>, LayerError> {
        let req = self.iam.get_policy().policy_arn(self.policy_arn_guess(org));
        let Some(out) = call_opt("GetPolicy", NO_SUCH, req.send()).await? else {
            return Ok(None);
        };
        let Some(p) = out.policy() else {
            return Ok(None);
        };
        let arn = p.arn().unwrap_or_default().to_owned();
        let version = p.default_version_id().unwrap_or("v1");
        let req = self.iam.get_policy_version().policy_arn(&arn);
        let v = call("GetPolicyVersion", req.version_id(version).send()).await?;
        let document = v
            .policy_version()
            .and_then(|v| v.document())
            .map(|d| decode("GetPolicyVersion", d))
            .transpose()?;
        Ok(Some(ManagedPolicy { arn, document }))
    }

    /// The organization's user, its tags, policies and keys, and its managed policy.
    pub(super) async fn read_user(&self, org: &OrgId) -> Result<UserState, LayerError> {
        let name = principal_name(org);
        let policy = self.read_managed_policy(org).await?;
        let iam = &self.iam;
        if call_opt("GetUser", NO_SUCH, iam.get_user().user_name(&name).send())
            .await?
            .is_none()
        {
            return Ok(UserState {
                policy,
                ..UserState::default()
            });
        }
        let tags = call("ListUserTags", iam.list_user_tags().user_name(&name).send()).await?;
        let attached = iam.list_attached_user_policies().user_name(&name);
        let attached = call("ListAttachedUserPolicies", attached.send()).await?;
        let inline = call(
            "ListUserPolicies",
            iam.list_user_policies().user_name(&name).send(),
        );
        let keys = call(
            "ListAccessKeys",
            iam.list_access_keys().user_name(&name).send(),
        )
        .await?;
        Ok(UserState {
            exists: true,
            tags: tags_of(tags.tags()),
            policy,
            attached: attached_list(attached.attached_policies()),
            inline: inline.await?.policy_names().to_vec(),
            keys: keys
                .access_key_metadata()
                .iter()
                .filter_map(|k| k.access_key_id().map(str::to_owned))
                .collect(),
        })
    }

    /// Who owns the organization's user, as read: its tags, or, for an untagged user holding
    /// nothing, the creation record of a pass that stopped between CreateUser and TagUser.
    async fn user_record(&self, org: &OrgId, st: &UserState) -> Result<diff::Record, LayerError> {
        let record = diff::principal_record(st.exists, &st.tags, org.as_str());
        let empty = st.keys.is_empty() && st.attached.is_empty() && st.inline.is_empty();
        if record != diff::Record::Foreign || st.tags != diff::OwnerTags::default() || !empty {
            return Ok(record);
        }
        let pending = self.creation_owner(org).await?;
        Ok(diff::interrupted_creation(
            record,
            &st.tags,
            empty,
            pending.as_deref(),
        ))
    }

    /// A role, its tags, trust policy and policies.
    async fn read_role(&self, name: &str) -> Result<RoleState, LayerError> {
        let iam = &self.iam;
        let Some(out) = call_opt("GetRole", NO_SUCH, iam.get_role().role_name(name).send()).await?
        else {
            return Ok(RoleState::default());
        };
        let role = out
            .role()
            .ok_or_else(|| LayerError::Backend("GetRole returned no role".to_owned()))?;
        let tags = call("ListRoleTags", iam.list_role_tags().role_name(name).send()).await?;
        let inline = call(
            "ListRolePolicies",
            iam.list_role_policies().role_name(name).send(),
        );
        let inline = inline.await?.policy_names().to_vec();
        let policy = if inline.iter().any(|p| p == ROLE_POLICY_NAME) {
            let req = iam.get_role_policy().role_name(name);
            let out = call("GetRolePolicy", req.policy_name(ROLE_POLICY_NAME).send()).await?;
            Some(decode("GetRolePolicy", out.policy_document())?)
        } else {
            None
        };
        let attached = iam.list_attached_role_policies().role_name(name);
        let attached = call("ListAttachedRolePolicies", attached.send()).await?;
        Ok(RoleState {
            exists: true,
            arn: Some(role.arn().to_owned()),
            tags: tags_of(tags.tags()),
            trust: role
                .assume_role_policy_document()
                .map(|d| decode("GetRole", d))
                .transpose()?,
            inline,
            policy,
            attached: attached_list(attached.attached_policies()),
        })
    }

    // ---- appliers ----

    /// Carries out one action of the diff on IAM. Deletions of what is already gone succeed.
    async fn apply(&self, run: &mut Run<'_>, action: &Action) -> Result<(), LayerError> {
        let (iam, name) = (&self.iam, run.name);
        match action {
            Action::CreateUser => {
                let tenant = run.tenant()?;
                // Recorded first, so a crash before the tags are written leaves a user the
                // next pass can prove it created (an untagged user is otherwise foreign).
                self.record_creation(tenant).await?;
                let tags = Some(owner_tags(tenant)?);
                let req = iam.create_user().user_name(name).path(&self.spec.iam_path);
                let req = req.set_tags(tags).send();
                if call_opt("CreateUser", "EntityAlreadyExists", req)
                    .await?
                    .is_none()
                {
                    // Someone else created the name between the read and this call: the record
                    // must not let a later pass take their user as this Organization's own.
                    self.forget_creation(&tenant.org_id).await?;
                    return Err(LayerError::Refused(format!(
                        "orgId {}: IAM user {name} was created by someone else while this pass created it; it is never adopted, choose another orgId",
                        tenant.org_id
                    )));
                }
                // Servers that drop tags on CreateUser keep them from TagUser.
                let tagged = self.tag_principal(tenant).await;
                if tagged.is_err() {
                    // An untagged user would be refused as foreign next pass: undo the creation.
                    let _ = gone!("DeleteUser", iam.delete_user().user_name(name));
                }
                tagged?;
                self.forget_creation(&tenant.org_id).await
            }
            Action::DeleteUser => gone!("DeleteUser", iam.delete_user().user_name(name)),
            Action::CreatePolicy => {
                let org = &run.tenant()?.org_id;
                run.policy_arn = Some(self.create_policy(org, &run.policy).await?);
                Ok(())
            }
            Action::DeletePolicy { arn } => {
                self.delete_old_policy_versions(arn).await?;
                gone!("DeletePolicy", iam.delete_policy().policy_arn(arn))
            }
            Action::DetachUserPolicy { arn } => {
                let req = iam.detach_user_policy().user_name(name);
                gone!("DetachUserPolicy", req.policy_arn(arn))
            }
            Action::RestorePolicy { arn } => self.replace_policy_version(arn, &run.policy).await,
            Action::DeleteUserInline { name: p } => {
                gone!(
                    "DeleteUserPolicy",
                    iam.delete_user_policy().user_name(name).policy_name(p)
                )
            }
            Action::AttachPolicy => {
                let guess = self.policy_arn_guess(&run.tenant()?.org_id);
                let arn = run.policy_arn.clone().unwrap_or(guess);
                let req = iam.attach_user_policy().user_name(name).policy_arn(arn);
                call("AttachUserPolicy", req.send()).await.map(drop)
            }
            Action::DeleteKey { id } => {
                let req = iam.delete_access_key().access_key_id(id);
                gone!("DeleteAccessKey", req.user_name(name))
            }
            Action::IssueKey => self.issue_key(run).await,
            Action::CreateRole => {
                let tags = run.tenant.map(owner_tags).transpose()?;
                let req = iam.create_role().role_name(name).path(&self.spec.iam_path);
                let req = req.assume_role_policy_document(run.trust.to_json());
                let out = call("CreateRole", req.set_tags(tags).send()).await?;
                let role = out
                    .role()
                    .ok_or_else(|| LayerError::Backend("CreateRole returned no role".to_owned()))?;
                run.role_arn = Some(role.arn().to_owned());
                Ok(())
            }
            Action::DeleteRole => gone!("DeleteRole", iam.delete_role().role_name(name)),
            Action::UpdateTrust => {
                let req = iam.update_assume_role_policy().role_name(name);
                let req = req.policy_document(run.trust.to_json());
                call("UpdateAssumeRolePolicy", req.send()).await.map(drop)
            }
            Action::DetachRolePolicy { arn } => {
                gone!(
                    "DetachRolePolicy",
                    iam.detach_role_policy().role_name(name).policy_arn(arn)
                )
            }
            Action::PutRolePolicy => {
                let req = iam
                    .put_role_policy()
                    .role_name(name)
                    .policy_name(ROLE_POLICY_NAME);
                call(
                    "PutRolePolicy",
                    req.policy_document(run.policy.to_json()).send(),
                )
                .await
                .map(drop)
            }
            Action::DeleteRoleInline { name: p } => {
                gone!(
                    "DeleteRolePolicy",
                    iam.delete_role_policy().role_name(name).policy_name(p)
                )
            }
        }
    }

    /// Issues an access key and writes it into the run's credentials.
    async fn issue_key(&self, run: &mut Run<'_>) -> Result<(), LayerError> {
        let req = self.iam.create_access_key().user_name(run.name);
        let out = call("CreateAccessKey", req.send()).await?;
        let key = out
            .access_key()
            .ok_or_else(|| LayerError::Backend("CreateAccessKey returned no key".to_owned()))?;
        let creds = run
            .creds
            .as_deref_mut()
            .ok_or_else(|| LayerError::Backend("no credentials to write a key into".to_owned()))?;
        creds.set(KEY_ACCESS_KEY_ID, key.access_key_id());
        creds.set(KEY_SECRET_ACCESS_KEY, key.secret_access_key());
        Ok(())
    }

    /// Records the tenant's orgId and owner UID on its user or role.
    async fn tag_principal(&self, tenant: &Tenant) -> Result<(), LayerError> {
        let name = principal_name(&tenant.org_id);
        let tags = Some(owner_tags(tenant)?);
        if self.spec.mode == StorageMode::Role {
            let req = self.iam.tag_role().role_name(name).set_tags(tags);
            call("TagRole", req.send()).await?;
        } else {
            let req = self.iam.tag_user().user_name(name).set_tags(tags);
            call("TagUser", req.send()).await?;
        }
        Ok(())
    }

    /// Takes over a principal recorded as another Organization's, when the claim says so.
    async fn adopt(&self, tenant: &Tenant, claim: &Claim) -> Result<Vec<Repair>, LayerError> {
        let name = principal_name(&tenant.org_id);
        if *claim == Claim::Finish {
            self.tag_principal(tenant).await?;
            self.forget_creation(&tenant.org_id).await?;
            return Ok(vec![Repair(format!(
                "IAM user {name}: its interrupted creation finished, the owner tags written"
            ))]);
        }
        let Claim::Adopt(old) = claim else {
            return Ok(Vec::new());
        };
        self.tag_principal(tenant).await?;
        Ok(vec![Repair(format!(
            "IAM principal {name} taken over from Organization UID {old}; its old credentials are replaced"
        ))])
    }

    async fn create_policy(&self, org: &OrgId, doc: &PolicyDocument) -> Result<String, LayerError> {
        let req = self.iam.create_policy().policy_name(policy_name(org));
        let req = req.path(&self.spec.iam_path).policy_document(doc.to_json());
        let created = call_opt("CreatePolicy", "EntityAlreadyExists", req.send()).await?;
        if let Some(out) = created {
            return out
                .policy()
                .and_then(|p| p.arn())
                .map(str::to_owned)
                .ok_or_else(|| LayerError::Backend("CreatePolicy returned no ARN".to_owned()));
        }
        // Left over without its user: take it over and make its content ours.
        let arn = self.policy_arn_guess(org);
        self.replace_policy_version(&arn, doc).await?;
        Ok(arn)
    }

    /// Makes `doc` the policy's default version, making room first (IAM keeps at most five).
    async fn replace_policy_version(
        &self,
        arn: &str,
        doc: &PolicyDocument,
    ) -> Result<(), LayerError> {
        self.delete_old_policy_versions(arn).await?;
        let req = self.iam.create_policy_version().policy_arn(arn);
        let req = req.policy_document(doc.to_json()).set_as_default(true);
        call("CreatePolicyVersion", req.send()).await?;
        Ok(())
    }

    async fn delete_old_policy_versions(&self, arn: &str) -> Result<(), LayerError> {
        let req = self.iam.list_policy_versions().policy_arn(arn);
        let versions = call("ListPolicyVersions", req.send()).await?;
        for v in versions
            .versions()
            .iter()
            .filter(|v| !v.is_default_version())
        {
            if let Some(id) = v.version_id() {
                let req = self.iam.delete_policy_version().policy_arn(arn);
                call_opt("DeletePolicyVersion", NO_SUCH, req.version_id(id).send()).await?;
            }
        }
        Ok(())
    }

    // ---- ensure ----

    /// Reads the organization's principal and decides whether this Organization may have it.
    pub(super) async fn claim_principal(
        &self,
        tenant: &Tenant,
    ) -> Result<PrincipalWork, LayerError> {
        let org = &tenant.org_id;
        let name = principal_name(org);
        match self.spec.mode {
            StorageMode::User => {
                let st = self.read_user(org).await?;
                let record = self.user_record(org, &st).await?;
                let claim = claim_principal_of(&format!("IAM user {name}"), tenant, &record)?;
                Ok(PrincipalWork::User(st, claim))
            }
            StorageMode::Role => {
                let st = self.read_role(&name).await?;
                let record = diff::principal_record(st.exists, &st.tags, org.as_str());
                let claim = claim_principal_of(&format!("IAM role {name}"), tenant, &record)?;
                Ok(PrincipalWork::Role(st, claim))
            }
            StorageMode::Abac => Ok(PrincipalWork::Shared),
            StorageMode::Session => {
                self.claim_session(tenant)?;
                Ok(PrincipalWork::Session)
            }
        }
    }

    /// Brings the claimed principal to the plan and writes its credentials.
    pub(super) async fn converge_principal(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
        work: PrincipalWork,
    ) -> Result<Vec<Repair>, LayerError> {
        match work {
            PrincipalWork::User(st, claim) => self.converge_user(tenant, creds, st, claim).await,
            PrincipalWork::Role(st, claim) => {
                self.converge_org_role(tenant, creds, st, claim).await
            }
            PrincipalWork::Shared => {
                let arn = self.shared_role_arn().await?;
                creds.remove(KEY_ACCESS_KEY_ID);
                creds.remove(KEY_SECRET_ACCESS_KEY);
                creds.set(KEY_ROLE_ARN, arn);
                creds.set(KEY_SESSION_TAG, tenant.org_id.as_str());
                drop_session_keys(creds);
                Ok(Vec::new())
            }
            PrincipalWork::Session => self.converge_session(tenant, creds).await,
        }
    }

    /// `user` mode: the IAM user, its managed policy (nothing else attached), and one access key.
    async fn converge_user(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
        st: UserState,
        claim: Claim,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = &tenant.org_id;
        let name = principal_name(org);
        let mut repairs = self.adopt(tenant, &claim).await?;
        let planned = policy::org_policy(&self.spec.bucket, &self.prefix(org));
        let document = planned.to_value();
        let held = creds
            .get(KEY_ACCESS_KEY_ID)
            .filter(|_| {
                creds
                    .get(KEY_SECRET_ACCESS_KEY)
                    .is_some_and(|s| !s.is_empty())
            })
            .map(str::to_owned);
        let pname = policy_name(org);
        let plan = UserPlan {
            name: &name,
            policy_name: &pname,
            document: &document,
            held_key: held.as_deref(),
            // A principal taken over keeps no key its earlier owner held.
            rotate: tenant.rotate || matches!(claim, Claim::Adopt(_)),
        };
        let steps = diff::user_diff(&plan, &st);
        creds.remove(KEY_ROLE_ARN);
        drop_session_keys(creds);
        let mut run = Run::new(&name, Some(tenant));
        run.policy = planned;
        run.policy_arn = st.policy.as_ref().map(|p| p.arn.clone());
        run.creds = Some(creds);
        for step in &steps {
            self.apply(&mut run, &step.action).await?;
            repairs.extend(step.repair.clone().map(Repair));
        }
        Ok(repairs)
    }

    /// The principal the operator's probes act as, for trust policies.
    async fn operator_principal(&self) -> Result<String, LayerError> {
        Ok(policy::trust_principal(&self.operator().await?.arn))
    }

    fn role_trust(&self, tenant: &Tenant, operator: &str) -> PolicyDocument {
        policy::role_trust_policy(
            &self.spec.account_id,
            self.spec.oidc_issuer.as_deref().unwrap_or_default(),
            &tenant.namespace,
            &self.spec.service_account,
            operator,
        )
    }

    fn shared_trust(&self, operator: &str) -> PolicyDocument {
        let mut trusted = self.spec.abac_trusted_principals.clone();
        trusted.push(operator.to_owned());
        policy::abac_trust_policy(&trusted)
    }

    /// Brings a role to the plan: trust policy, the one inline policy, nothing attached. Returns
    /// the role ARN and the repairs.
    async fn converge_role(
        &self,
        run: &mut Run<'_>,
        st: &RoleState,
    ) -> Result<(String, Vec<Repair>), LayerError> {
        let (trust, permissions) = (run.trust.to_value(), run.policy.to_value());
        let plan = RolePlan {
            name: run.name,
            policy_name: ROLE_POLICY_NAME,
            trust: &trust,
            permissions: &permissions,
        };
        let mut repairs = Vec::new();
        for step in diff::role_diff(&plan, st) {
            self.apply(run, &step.action).await?;
            repairs.extend(step.repair.map(Repair));
        }
        let arn = run
            .role_arn
            .clone()
            .ok_or_else(|| LayerError::Backend(format!("role {} has no ARN", run.name)))?;
        Ok((arn, repairs))
    }

    /// `role` mode: the organization's role; the Secret gets its ARN (no long-lived key).
    async fn converge_org_role(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
        st: RoleState,
        claim: Claim,
    ) -> Result<Vec<Repair>, LayerError> {
        let mut repairs = self.adopt(tenant, &claim).await?;
        let (org, name) = (&tenant.org_id, principal_name(&tenant.org_id));
        let operator = self.operator_principal().await?;
        let trust = self.role_trust(tenant, &operator);
        let permissions = policy::org_policy(&self.spec.bucket, &self.prefix(org));
        let mut run = Run::new(&name, Some(tenant));
        (run.trust, run.policy, run.role_arn) = (trust, permissions, st.arn.clone());
        let (arn, more) = self.converge_role(&mut run, &st).await?;
        repairs.extend(more);
        creds.remove(KEY_ACCESS_KEY_ID);
        creds.remove(KEY_SECRET_ACCESS_KEY);
        creds.remove(KEY_SESSION_TAG);
        drop_session_keys(creds);
        creds.set(KEY_ROLE_ARN, arn);
        Ok(repairs)
    }

    /// `abac` mode, platform level: the one shared tenant role.
    pub(super) async fn ensure_shared_role(&self) -> Result<Vec<Repair>, LayerError> {
        let operator = self.operator_principal().await?;
        let trust = self.shared_trust(&operator);
        let permissions = policy::abac_policy(&self.spec.bucket, &self.spec.prefix_template);
        let name = &self.spec.shared_role_name;
        let st = self.read_role(name).await?;
        let mut run = Run::new(name, None);
        (run.trust, run.policy, run.role_arn) = (trust, permissions, st.arn.clone());
        Ok(self.converge_role(&mut run, &st).await?.1)
    }

    pub(super) async fn shared_role_arn(&self) -> Result<String, LayerError> {
        let req = self.iam.get_role().role_name(&self.spec.shared_role_name);
        let out = call("GetRole", req.send()).await?;
        out.role()
            .map(|r| r.arn().to_owned())
            .ok_or_else(|| LayerError::Backend("GetRole returned no role".to_owned()))
    }

    // ---- removal ----

    /// Removes the organization's user or role with its keys and policies, when this
    /// Organization owns it; anything else (absent, untagged, another owner's) is left alone.
    pub(super) async fn remove_principal(
        &self,
        tenant: &Tenant,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = &tenant.org_id;
        let name = principal_name(org);
        let (record, actions, what) = match self.spec.mode {
            StorageMode::User => {
                let st = self.read_user(org).await?;
                let keys = st.keys.len();
                (
                    self.user_record(org, &st).await?,
                    diff::user_removal(&st),
                    format!("IAM user {name}, its policy and {keys} access key(s) removed"),
                )
            }
            StorageMode::Role => {
                let st = self.read_role(&name).await?;
                (
                    diff::principal_record(st.exists, &st.tags, org.as_str()),
                    diff::role_removal(&st),
                    format!("IAM role {name} and its policies removed"),
                )
            }
            StorageMode::Abac | StorageMode::Session => return Ok(Vec::new()),
        };
        if !diff::removable(&record, &tenant.owner.uid) {
            // A creation record of this Organization whose CreateUser never ran.
            if self.spec.mode == StorageMode::User
                && self.creation_owner(org).await?.as_deref() == Some(tenant.owner.uid.as_str())
            {
                self.forget_creation(org).await?;
            }
            return Ok(Vec::new());
        }
        let mut run = Run::new(&name, Some(tenant));
        for action in actions {
            self.apply(&mut run, &action).await?;
        }
        if self.spec.mode == StorageMode::User {
            self.forget_creation(org).await?;
        }
        Ok(vec![Repair(what)])
    }

    // ---- audit ----

    /// Read-only audit of the organization's IAM objects against the plan.
    pub(super) async fn audit_org(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Vec<String>, LayerError> {
        let org = &tenant.org_id;
        let name = principal_name(org);
        let uid = &tenant.owner.uid;
        let operator = self.operator_principal().await?;
        match self.spec.mode {
            StorageMode::User => {
                let st = self.read_user(org).await?;
                let record = self.user_record(org, &st).await?;
                let document = policy::org_policy(&self.spec.bucket, &self.prefix(org)).to_value();
                let pname = policy_name(org);
                let plan = UserPlan {
                    name: &name,
                    policy_name: &pname,
                    document: &document,
                    held_key: creds.get(KEY_ACCESS_KEY_ID),
                    rotate: false,
                };
                let what = format!("IAM user {name}");
                let mut findings: Vec<String> =
                    diff::ownership_finding(&what, org.as_str(), &record, uid)
                        .into_iter()
                        .collect();
                findings.extend(diff::findings(&diff::user_diff(&plan, &st)));
                Ok(findings)
            }
            StorageMode::Role => {
                let st = self.read_role(&name).await?;
                let record = diff::principal_record(st.exists, &st.tags, org.as_str());
                let trust = self.role_trust(tenant, &operator);
                let permissions = policy::org_policy(&self.spec.bucket, &self.prefix(org));
                let what = format!("IAM role {name}");
                let mut findings: Vec<String> =
                    diff::ownership_finding(&what, org.as_str(), &record, uid)
                        .into_iter()
                        .collect();
                findings.extend(self.role_findings(&name, &st, &trust, &permissions));
                Ok(findings)
            }
            StorageMode::Abac => {
                let name = &self.spec.shared_role_name;
                let st = self.read_role(name).await?;
                let permissions =
                    policy::abac_policy(&self.spec.bucket, &self.spec.prefix_template);
                let trust = self.shared_trust(&operator);
                let mut findings = self.role_findings(name, &st, &trust, &permissions);
                if creds.get(KEY_SESSION_TAG) != Some(org.as_str()) {
                    findings.push(format!(
                        "the credentials Secret's {KEY_SESSION_TAG} is not {org}"
                    ));
                }
                Ok(findings)
            }
            StorageMode::Session => self.audit_session(tenant, creds).await,
        }
    }

    fn role_findings(
        &self,
        name: &str,
        st: &RoleState,
        trust: &PolicyDocument,
        permissions: &PolicyDocument,
    ) -> Vec<String> {
        let (trust, permissions) = (trust.to_value(), permissions.to_value());
        let plan = RolePlan {
            name,
            policy_name: ROLE_POLICY_NAME,
            trust: &trust,
            permissions: &permissions,
        };
        diff::findings(&diff::role_diff(&plan, st))
    }

    /// An S3 client acting as the organization, from its credentials Secret: its access key, the
    /// session the Secret holds (`session` mode), or a session of its role (tagged with its org id
    /// in `abac` mode). `Err` is a probe failure.
    pub(super) async fn tenant_client(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Result<aws_sdk_s3::Client, String>, LayerError> {
        let aws = match self.spec.mode {
            StorageMode::User => {
                let (Some(id), Some(secret)) = (
                    creds.get(KEY_ACCESS_KEY_ID),
                    creds.get(KEY_SECRET_ACCESS_KEY),
                ) else {
                    return Ok(Err("the credentials Secret holds no access key".to_owned()));
                };
                AwsCredentials::new(id, secret, None, None, "bulkhead-tenant")
            }
            StorageMode::Session => {
                let (Some(id), Some(secret), Some(token)) = (
                    creds.get(KEY_ACCESS_KEY_ID),
                    creds.get(KEY_SECRET_ACCESS_KEY),
                    creds.get(KEY_SESSION_TOKEN),
                ) else {
                    return Ok(Err("the credentials Secret holds no session".to_owned()));
                };
                AwsCredentials::new(
                    id,
                    secret,
                    Some(token.to_owned()),
                    None,
                    "bulkhead-tenant-session",
                )
            }
            StorageMode::Role | StorageMode::Abac => {
                let Some(role) = creds.get(KEY_ROLE_ARN) else {
                    return Ok(Err("the credentials Secret holds no role ARN".to_owned()));
                };
                let session: String = format!("bulkhead-probe-{}", tenant.org_id)
                    .chars()
                    .take(64)
                    .collect();
                let mut req = self
                    .sts
                    .assume_role()
                    .role_arn(role)
                    .role_session_name(session)
                    .duration_seconds(900);
                if self.spec.mode == StorageMode::Abac {
                    let tag = aws_sdk_sts::types::Tag::builder()
                        .key(ORG_TAG)
                        .value(creds.get(KEY_SESSION_TAG).unwrap_or_default())
                        .build()
                        .map_err(|e| LayerError::Backend(format!("session tag: {e}")))?;
                    req = req.tags(tag);
                }
                let out = match req.send().await {
                    Ok(out) => out,
                    Err(e) => return Ok(Err(api_error("AssumeRole", &e).describe())),
                };
                let Some(c) = out.credentials() else {
                    return Ok(Err("AssumeRole returned no credentials".to_owned()));
                };
                AwsCredentials::new(
                    c.access_key_id(),
                    c.secret_access_key(),
                    Some(c.session_token().to_owned()),
                    None,
                    "bulkhead-tenant-session",
                )
            }
        };
        Ok(Ok(self.conn.s3(aws)))
    }
}
