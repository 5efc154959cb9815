//! IAM objects per mode: the organization's user and access key (`user`), its role (`role`), or
//! the one shared tenant role (`abac`). Every step is idempotent and repairs drift.

use aws_sdk_s3::config::Credentials as AwsCredentials;
use serde_json::Value;

use super::policy::{self, ORG_TAG, PolicyDocument, same_document};
use super::{
    KEY_ACCESS_KEY_ID, KEY_ROLE_ARN, KEY_SECRET_ACCESS_KEY, KEY_SESSION_TAG, StorageLayer,
    api_error,
};
use crate::api::platform::StorageMode;
use crate::layers::{Credentials, LayerError, Repair, Tenant};
use crate::tenant::OrgId;

/// Name of the inline policy on an organization's role and on the shared role.
const ROLE_POLICY_NAME: &str = "bulkhead-prefix";

/// IAM user (or role) name of an organization: the org id itself, because the bucket guard
/// resolves the owner's prefix from `${aws:username}`.
pub fn principal_name(org: &OrgId) -> String {
    org.as_str().to_owned()
}

/// Name of the organization's managed policy in `user` mode.
pub fn policy_name(org: &OrgId) -> String {
    format!("bulkhead-{}", org.as_str())
}

fn tag(key: &str, value: &str) -> Result<aws_sdk_iam::types::Tag, LayerError> {
    aws_sdk_iam::types::Tag::builder()
        .key(key)
        .value(value)
        .build()
        .map_err(|e| LayerError::Backend(format!("tag: {e}")))
}

fn decode(op: &str, raw: &str) -> Result<Value, LayerError> {
    policy::decode_document(raw).map_err(|e| LayerError::Backend(format!("{op}: {e}")))
}

/// What the audit found about an organization's user.
#[derive(Debug, Default)]
struct UserState {
    exists: bool,
    /// The `org_id` tag, when present.
    tag: Option<String>,
    policy_doc: Option<Value>,
    policy_arn: Option<String>,
    attached: Vec<(String, String)>,
    inline: Vec<String>,
    keys: Vec<String>,
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

    /// Refuses org ids that collide with a principal the guard exempts.
    async fn check_not_exempt(&self, org: &OrgId) -> Result<(), LayerError> {
        let name = principal_name(org);
        let operator = if self.spec.mode == StorageMode::User {
            self.operator().await?.user.clone()
        } else {
            None
        };
        if self.spec.guard_exempt_users.contains(&name)
            || operator.as_deref() == Some(name.as_str())
        {
            return Err(LayerError::Refused(format!(
                "orgId {org} names an IAM user the bucket guard exempts (the operator or guardExemptUsers)"
            )));
        }
        Ok(())
    }

    async fn read_user(&self, org: &OrgId) -> Result<UserState, LayerError> {
        let name = principal_name(org);
        let mut st = UserState::default();
        match self.iam.get_user().user_name(&name).send().await {
            Ok(_) => st.exists = true,
            Err(e) => {
                let err = api_error("GetUser", &e);
                if err.is("NoSuchEntity") {
                    return Ok(st);
                }
                return Err(err.into_layer());
            }
        }
        let tags = self
            .iam
            .list_user_tags()
            .user_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListUserTags", &e).into_layer())?;
        st.tag = tags
            .tags()
            .iter()
            .find(|t| t.key() == ORG_TAG)
            .map(|t| t.value().to_owned());
        match self
            .iam
            .get_policy()
            .policy_arn(self.policy_arn_guess(org))
            .send()
            .await
        {
            Ok(out) => {
                if let Some(p) = out.policy() {
                    let arn = p.arn().unwrap_or_default().to_owned();
                    let version = p.default_version_id().unwrap_or("v1").to_owned();
                    let v = self
                        .iam
                        .get_policy_version()
                        .policy_arn(&arn)
                        .version_id(version)
                        .send()
                        .await
                        .map_err(|e| api_error("GetPolicyVersion", &e).into_layer())?;
                    if let Some(doc) = v.policy_version().and_then(|v| v.document()) {
                        st.policy_doc = Some(decode("GetPolicyVersion", doc)?);
                    }
                    st.policy_arn = Some(arn);
                }
            }
            Err(e) => {
                let err = api_error("GetPolicy", &e);
                if !err.is("NoSuchEntity") {
                    return Err(err.into_layer());
                }
            }
        }
        let attached = self
            .iam
            .list_attached_user_policies()
            .user_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListAttachedUserPolicies", &e).into_layer())?;
        st.attached = attached
            .attached_policies()
            .iter()
            .map(|p| {
                (
                    p.policy_name().unwrap_or_default().to_owned(),
                    p.policy_arn().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let inline = self
            .iam
            .list_user_policies()
            .user_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListUserPolicies", &e).into_layer())?;
        st.inline = inline.policy_names().to_vec();
        let keys = self
            .iam
            .list_access_keys()
            .user_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListAccessKeys", &e).into_layer())?;
        st.keys = keys
            .access_key_metadata()
            .iter()
            .filter_map(|k| k.access_key_id().map(str::to_owned))
            .collect();
        Ok(st)
    }

    /// `user` mode: the IAM user, its managed policy (nothing else attached), and one access key.
    pub(super) async fn ensure_user(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = &tenant.org_id;
        self.check_not_exempt(org).await?;
        let name = principal_name(org);
        let planned = policy::org_policy(&self.spec.bucket, &self.prefix(org));
        let mut repairs = Vec::new();
        let st = self.read_user(org).await?;
        let fresh = !st.exists;
        if fresh {
            self.iam
                .create_user()
                .user_name(&name)
                .path(&self.spec.iam_path)
                .send()
                .await
                .map_err(|e| api_error("CreateUser", &e).into_layer())?;
        } else if st.tag.as_deref() != Some(org.as_str()) {
            // Adopt only a bare user (a crash between CreateUser and TagUser); never someone else's.
            let bare = st.tag.is_none()
                && st.keys.is_empty()
                && st.attached.is_empty()
                && st.inline.is_empty();
            if !bare {
                return Err(LayerError::Refused(format!(
                    "IAM user {name} exists and is not managed by bulkhead for orgId {org}"
                )));
            }
        }
        if st.tag.as_deref() != Some(org.as_str()) {
            // Servers that drop tags on CreateUser keep them from TagUser.
            self.iam
                .tag_user()
                .user_name(&name)
                .tags(tag(ORG_TAG, org.as_str())?)
                .send()
                .await
                .map_err(|e| api_error("TagUser", &e).into_layer())?;
        }

        let arn = match (&st.policy_arn, &st.policy_doc) {
            (Some(arn), Some(doc)) if same_document(doc, &planned.to_value()) => arn.clone(),
            (Some(arn), _) => {
                self.replace_policy_version(arn, &planned).await?;
                repairs.push(Repair(format!(
                    "IAM policy {} differed from the plan (widened or edited); restored",
                    policy_name(org)
                )));
                arn.clone()
            }
            (None, _) => self.create_policy(org, &planned).await?,
        };
        let ours = policy_name(org);
        if !st.attached.iter().any(|(n, _)| *n == ours) {
            self.iam
                .attach_user_policy()
                .user_name(&name)
                .policy_arn(&arn)
                .send()
                .await
                .map_err(|e| api_error("AttachUserPolicy", &e).into_layer())?;
            if !fresh {
                repairs.push(Repair(format!(
                    "IAM policy {ours} was detached from user {name}; attached again"
                )));
            }
        }
        for (other, other_arn) in st.attached.iter().filter(|(n, _)| *n != ours) {
            self.iam
                .detach_user_policy()
                .user_name(&name)
                .policy_arn(other_arn)
                .send()
                .await
                .map_err(|e| api_error("DetachUserPolicy", &e).into_layer())?;
            repairs.push(Repair(format!(
                "policy {other} attached to user {name} widened its access; detached"
            )));
        }
        for inline in &st.inline {
            self.iam
                .delete_user_policy()
                .user_name(&name)
                .policy_name(inline)
                .send()
                .await
                .map_err(|e| api_error("DeleteUserPolicy", &e).into_layer())?;
            repairs.push(Repair(format!(
                "inline policy {inline} on user {name} widened its access; deleted"
            )));
        }
        repairs.extend(self.ensure_access_key(tenant, creds, &st.keys).await?);
        creds.remove(KEY_ROLE_ARN);
        Ok(repairs)
    }

    async fn create_policy(&self, org: &OrgId, doc: &PolicyDocument) -> Result<String, LayerError> {
        let created = self
            .iam
            .create_policy()
            .policy_name(policy_name(org))
            .path(&self.spec.iam_path)
            .policy_document(doc.to_json())
            .send()
            .await;
        let out = match created {
            Ok(out) => out,
            Err(e) => {
                let err = api_error("CreatePolicy", &e);
                if !err.is("EntityAlreadyExists") {
                    return Err(err.into_layer());
                }
                // Left over without its user: take it over and make its content ours.
                let existing = self
                    .iam
                    .get_policy()
                    .policy_arn(self.policy_arn_guess(org))
                    .send()
                    .await
                    .map_err(|e| api_error("GetPolicy", &e).into_layer())?;
                let arn = existing
                    .policy()
                    .and_then(|p| p.arn())
                    .map(str::to_owned)
                    .ok_or_else(|| LayerError::Backend("GetPolicy returned no ARN".to_owned()))?;
                self.replace_policy_version(&arn, doc).await?;
                return Ok(arn);
            }
        };
        out.policy()
            .and_then(|p| p.arn())
            .map(str::to_owned)
            .ok_or_else(|| LayerError::Backend("CreatePolicy returned no ARN".to_owned()))
    }

    /// Makes `doc` the policy's default version, making room first (IAM keeps at most five).
    async fn replace_policy_version(
        &self,
        arn: &str,
        doc: &PolicyDocument,
    ) -> Result<(), LayerError> {
        self.delete_old_policy_versions(arn).await?;
        self.iam
            .create_policy_version()
            .policy_arn(arn)
            .policy_document(doc.to_json())
            .set_as_default(true)
            .send()
            .await
            .map_err(|e| api_error("CreatePolicyVersion", &e).into_layer())?;
        Ok(())
    }

    async fn delete_old_policy_versions(&self, arn: &str) -> Result<(), LayerError> {
        let versions = self
            .iam
            .list_policy_versions()
            .policy_arn(arn)
            .send()
            .await
            .map_err(|e| api_error("ListPolicyVersions", &e).into_layer())?;
        for v in versions
            .versions()
            .iter()
            .filter(|v| !v.is_default_version())
        {
            if let Some(id) = v.version_id() {
                self.iam
                    .delete_policy_version()
                    .policy_arn(arn)
                    .version_id(id)
                    .send()
                    .await
                    .map_err(|e| api_error("DeletePolicyVersion", &e).into_layer())?;
            }
        }
        Ok(())
    }

    /// Keeps the access key the Secret holds, unless it is gone or rotation is asked for; then
    /// issues a new one. Every other key of the user is deleted, so an old key stops working.
    async fn ensure_access_key(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
        existing: &[String],
    ) -> Result<Vec<Repair>, LayerError> {
        let name = principal_name(&tenant.org_id);
        let mut repairs = Vec::new();
        let current = creds.get(KEY_ACCESS_KEY_ID).filter(|_| {
            creds
                .get(KEY_SECRET_ACCESS_KEY)
                .is_some_and(|s| !s.is_empty())
        });
        let kept = current
            .filter(|id| existing.iter().any(|k| k == id))
            .map(str::to_owned);
        if current.is_some() && kept.is_none() {
            repairs.push(Repair(format!(
                "access key of user {name} was deleted; a new one was issued"
            )));
        }
        let keep = match kept {
            Some(id) if !tenant.rotate => id,
            _ => {
                // IAM allows two keys per user: make room before creating.
                for old in existing {
                    self.delete_access_key(&name, old).await?;
                }
                let out = self
                    .iam
                    .create_access_key()
                    .user_name(&name)
                    .send()
                    .await
                    .map_err(|e| api_error("CreateAccessKey", &e).into_layer())?;
                let key = out.access_key().ok_or_else(|| {
                    LayerError::Backend("CreateAccessKey returned no key".to_owned())
                })?;
                creds.set(KEY_ACCESS_KEY_ID, key.access_key_id());
                creds.set(KEY_SECRET_ACCESS_KEY, key.secret_access_key());
                if tenant.rotate && !existing.is_empty() {
                    repairs.push(Repair(format!("access key of user {name} rotated")));
                }
                return Ok(repairs);
            }
        };
        for stray in existing.iter().filter(|k| **k != keep) {
            self.delete_access_key(&name, stray).await?;
            repairs.push(Repair(format!(
                "an access key of user {name} not held by the credentials Secret was deleted"
            )));
        }
        Ok(repairs)
    }

    async fn delete_access_key(&self, user: &str, id: &str) -> Result<(), LayerError> {
        match self
            .iam
            .delete_access_key()
            .user_name(user)
            .access_key_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = api_error("DeleteAccessKey", &e);
                if err.is("NoSuchEntity") {
                    Ok(())
                } else {
                    Err(err.into_layer())
                }
            }
        }
    }

    /// Removes the organization's user, keys and policies. Missing pieces are fine.
    pub(super) async fn delete_user(&self, org: &OrgId) -> Result<(), LayerError> {
        let name = principal_name(org);
        let st = self.read_user(org).await?;
        if st.exists {
            if st.tag.as_deref().is_some_and(|t| t != org.as_str()) {
                return Err(LayerError::Refused(format!(
                    "IAM user {name} belongs to another organization; left alone"
                )));
            }
            for key in &st.keys {
                self.delete_access_key(&name, key).await?;
            }
            for (_, arn) in &st.attached {
                self.iam
                    .detach_user_policy()
                    .user_name(&name)
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(|e| api_error("DetachUserPolicy", &e).into_layer())?;
            }
            for inline in &st.inline {
                self.iam
                    .delete_user_policy()
                    .user_name(&name)
                    .policy_name(inline)
                    .send()
                    .await
                    .map_err(|e| api_error("DeleteUserPolicy", &e).into_layer())?;
            }
        }
        if let Some(arn) = &st.policy_arn {
            self.delete_old_policy_versions(arn).await?;
            if let Err(e) = self.iam.delete_policy().policy_arn(arn).send().await {
                let err = api_error("DeletePolicy", &e);
                if !err.is("NoSuchEntity") {
                    return Err(err.into_layer());
                }
            }
        }
        if st.exists
            && let Err(e) = self.iam.delete_user().user_name(&name).send().await
        {
            let err = api_error("DeleteUser", &e);
            if !err.is("NoSuchEntity") {
                return Err(err.into_layer());
            }
        }
        Ok(())
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

    /// Creates or repairs a role: trust policy, `org_id` tag (when given), the one inline policy,
    /// nothing attached. Returns the role ARN and the repairs.
    async fn converge_role(
        &self,
        name: &str,
        trust: &PolicyDocument,
        permissions: &PolicyDocument,
        org_tag: Option<&str>,
    ) -> Result<(String, Vec<Repair>), LayerError> {
        let mut repairs = Vec::new();
        let arn = match self.iam.get_role().role_name(name).send().await {
            Ok(out) => {
                let role = out
                    .role()
                    .ok_or_else(|| LayerError::Backend("GetRole returned no role".to_owned()))?;
                let trust_now = role
                    .assume_role_policy_document()
                    .map(|d| decode("GetRole", d))
                    .transpose()?;
                if !trust_now.is_some_and(|t| same_document(&t, &trust.to_value())) {
                    self.iam
                        .update_assume_role_policy()
                        .role_name(name)
                        .policy_document(trust.to_json())
                        .send()
                        .await
                        .map_err(|e| api_error("UpdateAssumeRolePolicy", &e).into_layer())?;
                    repairs.push(Repair(format!(
                        "trust policy of role {name} differed from the plan; restored"
                    )));
                }
                if let Some(org) = org_tag {
                    let tags = self
                        .iam
                        .list_role_tags()
                        .role_name(name)
                        .send()
                        .await
                        .map_err(|e| api_error("ListRoleTags", &e).into_layer())?;
                    let tagged = tags
                        .tags()
                        .iter()
                        .find(|t| t.key() == ORG_TAG)
                        .map(|t| t.value().to_owned());
                    match tagged.as_deref() {
                        Some(t) if t == org => {}
                        Some(_) => {
                            return Err(LayerError::Refused(format!(
                                "IAM role {name} is tagged for another organization"
                            )));
                        }
                        None => {
                            self.iam
                                .tag_role()
                                .role_name(name)
                                .tags(tag(ORG_TAG, org)?)
                                .send()
                                .await
                                .map_err(|e| api_error("TagRole", &e).into_layer())?;
                            repairs.push(Repair(format!(
                                "tag {ORG_TAG} of role {name} was missing; restored"
                            )));
                        }
                    }
                }
                role.arn().to_owned()
            }
            Err(e) => {
                let err = api_error("GetRole", &e);
                if !err.is("NoSuchEntity") {
                    return Err(err.into_layer());
                }
                let mut req = self
                    .iam
                    .create_role()
                    .role_name(name)
                    .path(&self.spec.iam_path)
                    .assume_role_policy_document(trust.to_json());
                if let Some(org) = org_tag {
                    req = req.tags(tag(ORG_TAG, org)?);
                }
                let out = req
                    .send()
                    .await
                    .map_err(|e| api_error("CreateRole", &e).into_layer())?;
                out.role()
                    .map(|r| r.arn().to_owned())
                    .ok_or_else(|| LayerError::Backend("CreateRole returned no role".to_owned()))?
            }
        };
        let inline = self
            .iam
            .list_role_policies()
            .role_name(name)
            .send()
            .await
            .map_err(|e| api_error("ListRolePolicies", &e).into_layer())?;
        let mut has_ours = false;
        for p in inline.policy_names() {
            if p == ROLE_POLICY_NAME {
                has_ours = true;
                continue;
            }
            self.iam
                .delete_role_policy()
                .role_name(name)
                .policy_name(p)
                .send()
                .await
                .map_err(|e| api_error("DeleteRolePolicy", &e).into_layer())?;
            repairs.push(Repair(format!(
                "inline policy {p} on role {name} widened its access; deleted"
            )));
        }
        let current = if has_ours {
            let out = self
                .iam
                .get_role_policy()
                .role_name(name)
                .policy_name(ROLE_POLICY_NAME)
                .send()
                .await
                .map_err(|e| api_error("GetRolePolicy", &e).into_layer())?;
            Some(decode("GetRolePolicy", out.policy_document())?)
        } else {
            None
        };
        if !current
            .as_ref()
            .is_some_and(|c| same_document(c, &permissions.to_value()))
        {
            self.iam
                .put_role_policy()
                .role_name(name)
                .policy_name(ROLE_POLICY_NAME)
                .policy_document(permissions.to_json())
                .send()
                .await
                .map_err(|e| api_error("PutRolePolicy", &e).into_layer())?;
            if current.is_some() {
                repairs.push(Repair(format!(
                    "policy of role {name} differed from the plan (widened or edited); restored"
                )));
            }
        }
        let attached = self
            .iam
            .list_attached_role_policies()
            .role_name(name)
            .send()
            .await
            .map_err(|e| api_error("ListAttachedRolePolicies", &e).into_layer())?;
        for p in attached.attached_policies() {
            if let Some(arn) = p.policy_arn() {
                self.iam
                    .detach_role_policy()
                    .role_name(name)
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(|e| api_error("DetachRolePolicy", &e).into_layer())?;
                repairs.push(Repair(format!(
                    "policy {} attached to role {name} widened its access; detached",
                    p.policy_name().unwrap_or(arn)
                )));
            }
        }
        Ok((arn, repairs))
    }

    /// `role` mode: the organization's role; the Secret gets its ARN (no long-lived key).
    pub(super) async fn ensure_role(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let org = &tenant.org_id;
        let operator = self.operator_principal().await?;
        let trust = self.role_trust(tenant, &operator);
        let permissions = policy::org_policy(&self.spec.bucket, &self.prefix(org));
        let (arn, repairs) = self
            .converge_role(
                &principal_name(org),
                &trust,
                &permissions,
                Some(org.as_str()),
            )
            .await?;
        creds.remove(KEY_ACCESS_KEY_ID);
        creds.remove(KEY_SECRET_ACCESS_KEY);
        creds.remove(KEY_SESSION_TAG);
        creds.set(KEY_ROLE_ARN, arn);
        Ok(repairs)
    }

    fn shared_trust(&self, operator: &str) -> PolicyDocument {
        let mut trusted = self.spec.abac_trusted_principals.clone();
        trusted.push(operator.to_owned());
        policy::abac_trust_policy(&trusted)
    }

    /// `abac` mode, platform level: the one shared tenant role.
    pub(super) async fn ensure_shared_role(&self) -> Result<Vec<Repair>, LayerError> {
        let operator = self.operator_principal().await?;
        let permissions = policy::abac_policy(&self.spec.bucket, &self.spec.prefix_template);
        let (_, repairs) = self
            .converge_role(
                &self.spec.shared_role_name,
                &self.shared_trust(&operator),
                &permissions,
                None,
            )
            .await?;
        Ok(repairs)
    }

    pub(super) async fn shared_role_arn(&self) -> Result<String, LayerError> {
        let out = self
            .iam
            .get_role()
            .role_name(&self.spec.shared_role_name)
            .send()
            .await
            .map_err(|e| api_error("GetRole", &e).into_layer())?;
        out.role()
            .map(|r| r.arn().to_owned())
            .ok_or_else(|| LayerError::Backend("GetRole returned no role".to_owned()))
    }

    pub(super) async fn delete_role(&self, org: &OrgId) -> Result<(), LayerError> {
        let name = principal_name(org);
        match self.iam.get_role().role_name(&name).send().await {
            Ok(_) => {}
            Err(e) => {
                let err = api_error("GetRole", &e);
                return if err.is("NoSuchEntity") {
                    Ok(())
                } else {
                    Err(err.into_layer())
                };
            }
        }
        let inline = self
            .iam
            .list_role_policies()
            .role_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListRolePolicies", &e).into_layer())?;
        for p in inline.policy_names() {
            self.iam
                .delete_role_policy()
                .role_name(&name)
                .policy_name(p)
                .send()
                .await
                .map_err(|e| api_error("DeleteRolePolicy", &e).into_layer())?;
        }
        let attached = self
            .iam
            .list_attached_role_policies()
            .role_name(&name)
            .send()
            .await
            .map_err(|e| api_error("ListAttachedRolePolicies", &e).into_layer())?;
        for p in attached.attached_policies() {
            if let Some(arn) = p.policy_arn() {
                self.iam
                    .detach_role_policy()
                    .role_name(&name)
                    .policy_arn(arn)
                    .send()
                    .await
                    .map_err(|e| api_error("DetachRolePolicy", &e).into_layer())?;
            }
        }
        if let Err(e) = self.iam.delete_role().role_name(&name).send().await {
            let err = api_error("DeleteRole", &e);
            if !err.is("NoSuchEntity") {
                return Err(err.into_layer());
            }
        }
        Ok(())
    }

    /// Read-only audit of the organization's IAM objects against the plan.
    pub(super) async fn audit_org(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Vec<String>, LayerError> {
        let org = &tenant.org_id;
        let name = principal_name(org);
        let mut findings = Vec::new();
        match self.spec.mode {
            StorageMode::User => {
                let st = self.read_user(org).await?;
                if !st.exists {
                    findings.push(format!("IAM user {name} is missing"));
                    return Ok(findings);
                }
                let planned = policy::org_policy(&self.spec.bucket, &self.prefix(org)).to_value();
                match &st.policy_doc {
                    None => findings.push(format!("IAM policy {} is missing", policy_name(org))),
                    Some(doc) if !same_document(doc, &planned) => findings.push(format!(
                        "IAM policy {} differs from the plan (widened or edited)",
                        policy_name(org)
                    )),
                    Some(_) => {}
                }
                let ours = policy_name(org);
                if !st.attached.iter().any(|(n, _)| *n == ours) {
                    findings.push(format!("IAM policy {ours} is not attached to user {name}"));
                }
                for (other, _) in st.attached.iter().filter(|(n, _)| *n != ours) {
                    findings.push(format!(
                        "policy {other} is attached to user {name} and widens its access"
                    ));
                }
                for inline in &st.inline {
                    findings.push(format!(
                        "inline policy {inline} on user {name} widens its access"
                    ));
                }
                match creds.get(KEY_ACCESS_KEY_ID) {
                    Some(id) if st.keys.iter().any(|k| k == id) => {}
                    Some(_) => findings.push(format!(
                        "the access key in the credentials Secret no longer exists for user {name}"
                    )),
                    None => findings.push("the credentials Secret holds no access key".to_owned()),
                }
                if st.keys.len() > 1 {
                    findings.push(format!("user {name} has {} access keys; only the one in the credentials Secret should exist", st.keys.len()));
                }
            }
            StorageMode::Role => {
                let operator = self.operator_principal().await?;
                let trust = self.role_trust(tenant, &operator);
                let permissions = policy::org_policy(&self.spec.bucket, &self.prefix(org));
                findings.extend(
                    self.audit_role(&name, &trust, &permissions, Some(org.as_str()))
                        .await?,
                );
            }
            StorageMode::Abac => {
                let operator = self.operator_principal().await?;
                let permissions =
                    policy::abac_policy(&self.spec.bucket, &self.spec.prefix_template);
                findings.extend(
                    self.audit_role(
                        &self.spec.shared_role_name,
                        &self.shared_trust(&operator),
                        &permissions,
                        None,
                    )
                    .await?,
                );
                if creds.get(KEY_SESSION_TAG) != Some(org.as_str()) {
                    findings.push(format!(
                        "the credentials Secret's {KEY_SESSION_TAG} is not {org}"
                    ));
                }
            }
        }
        Ok(findings)
    }

    async fn audit_role(
        &self,
        name: &str,
        trust: &PolicyDocument,
        permissions: &PolicyDocument,
        org_tag: Option<&str>,
    ) -> Result<Vec<String>, LayerError> {
        let mut findings = Vec::new();
        let role = match self.iam.get_role().role_name(name).send().await {
            Ok(out) => out.role().cloned(),
            Err(e) => {
                let err = api_error("GetRole", &e);
                if err.is("NoSuchEntity") {
                    return Ok(vec![format!("IAM role {name} is missing")]);
                }
                return Err(err.into_layer());
            }
        };
        let trust_now = role
            .as_ref()
            .and_then(|r| r.assume_role_policy_document())
            .map(|d| decode("GetRole", d))
            .transpose()?;
        if !trust_now.is_some_and(|t| same_document(&t, &trust.to_value())) {
            findings.push(format!("trust policy of role {name} differs from the plan"));
        }
        if let Some(org) = org_tag {
            let tags = self
                .iam
                .list_role_tags()
                .role_name(name)
                .send()
                .await
                .map_err(|e| api_error("ListRoleTags", &e).into_layer())?;
            if !tags
                .tags()
                .iter()
                .any(|t| t.key() == ORG_TAG && t.value() == org)
            {
                findings.push(format!("role {name} is not tagged {ORG_TAG}={org}"));
            }
        }
        let inline = self
            .iam
            .list_role_policies()
            .role_name(name)
            .send()
            .await
            .map_err(|e| api_error("ListRolePolicies", &e).into_layer())?;
        for p in inline
            .policy_names()
            .iter()
            .filter(|p| *p != ROLE_POLICY_NAME)
        {
            findings.push(format!(
                "inline policy {p} on role {name} widens its access"
            ));
        }
        if inline.policy_names().iter().any(|p| p == ROLE_POLICY_NAME) {
            let out = self
                .iam
                .get_role_policy()
                .role_name(name)
                .policy_name(ROLE_POLICY_NAME)
                .send()
                .await
                .map_err(|e| api_error("GetRolePolicy", &e).into_layer())?;
            if !same_document(
                &decode("GetRolePolicy", out.policy_document())?,
                &permissions.to_value(),
            ) {
                findings.push(format!(
                    "policy of role {name} differs from the plan (widened or edited)"
                ));
            }
        } else {
            findings.push(format!("role {name} has no policy {ROLE_POLICY_NAME}"));
        }
        let attached = self
            .iam
            .list_attached_role_policies()
            .role_name(name)
            .send()
            .await
            .map_err(|e| api_error("ListAttachedRolePolicies", &e).into_layer())?;
        for p in attached.attached_policies() {
            findings.push(format!(
                "policy {} is attached to role {name} and widens its access",
                p.policy_name().unwrap_or("?")
            ));
        }
        Ok(findings)
    }

    /// An S3 client acting as the organization, from its credentials Secret: its access key, or a
    /// session of its role (tagged with its org id in `abac` mode). `Err` is a probe failure.
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
