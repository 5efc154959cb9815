//! The organization's workspace: its namespace and its credentials Secret (with BYOK keys).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sha2::{Digest, Sha256};

use super::Context;
use crate::api::{
    BYOK_LABEL, FIELD_MANAGER, IsolationPlatform, MANAGED_BY, ORG_ID_LABEL, ORGANIZATION_LABEL,
    Organization,
};
use crate::layers::{Credentials, ErrorClass, LayerError, Repair, Tenant};

/// Name of the credentials Secret in the organization's namespace.
pub const CREDENTIALS_SECRET: &str = "bulkhead-credentials";
/// Annotation on the Secret with the digest of the data bulkhead wrote, to notice edits.
pub const CREDENTIALS_DIGEST_ANNOTATION: &str = "bulkhead.dev/credentials-digest";
const PROVIDER_KEY_PREFIX: &str = "AI_";
const PROVIDER_KEY_SUFFIX: &str = "_API_KEY";

/// Labels on every object bulkhead creates for an organization.
pub fn managed_labels(tenant: &Tenant) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (ORG_ID_LABEL.to_owned(), tenant.org_id.to_string()),
        (ORGANIZATION_LABEL.to_owned(), tenant.name.clone()),
    ])
}

/// The namespace as planned: org labels and Pod Security Admission at `restricted`.
pub fn namespace_plan(tenant: &Tenant) -> Namespace {
    let mut labels = managed_labels(tenant);
    for mode in ["enforce", "audit", "warn"] {
        labels.insert(
            format!("pod-security.kubernetes.io/{mode}"),
            "restricted".to_owned(),
        );
    }
    Namespace {
        metadata: ObjectMeta {
            name: Some(tenant.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![tenant.owner.clone()]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Creates or repairs the organization's namespace. A namespace that exists and belongs to
/// anyone else is refused, never adopted.
pub async fn ensure_namespace(
    ctx: &Context,
    org: &Organization,
    tenant: &Tenant,
    existed_before: bool,
) -> Result<Vec<Repair>, LayerError> {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let plan = namespace_plan(tenant);
    let mut repairs = Vec::new();
    match api.get_opt(&tenant.namespace).await? {
        Some(live) => {
            let owned = live
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == org.metadata.uid.as_ref());
            if !owned {
                return Err(LayerError::Refused(format!(
                    "namespace {} already exists and does not belong to Organization {}; it is not adopted",
                    tenant.namespace, tenant.name
                )));
            }
            if live.metadata.deletion_timestamp.is_some() {
                return Err(LayerError::Refused(format!(
                    "namespace {} is being deleted",
                    tenant.namespace
                )));
            }
            let live_labels = live.labels();
            let missing: Vec<&String> = plan
                .labels()
                .iter()
                .filter(|(k, v)| live_labels.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            if !missing.is_empty() {
                repairs.push(Repair(format!(
                    "namespace {} labels restored: {}",
                    tenant.namespace,
                    missing
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        None if existed_before => repairs.push(Repair(format!(
            "namespace {} was deleted; created again",
            tenant.namespace
        ))),
        None => {}
    }
    api.patch(
        &tenant.namespace,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&plan),
    )
    .await?;
    if let Some(access) = &ctx.namespace_access {
        let rb = access_binding(tenant, access, &ctx.operator_namespace);
        let rbs: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &tenant.namespace);
        rbs.patch(
            ACCESS_BINDING,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rb),
        )
        .await?;
    }
    Ok(repairs)
}

/// Name of the RoleBinding that gives the operator Secret access in an organization's namespace.
pub const ACCESS_BINDING: &str = "bulkhead-operator";

/// The RoleBinding that lets the operator manage Secrets in this namespace only.
pub fn access_binding(
    tenant: &Tenant,
    access: &super::NamespaceAccess,
    operator_namespace: &str,
) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(ACCESS_BINDING.to_owned()),
            namespace: Some(tenant.namespace.clone()),
            labels: Some(managed_labels(tenant)),
            owner_references: Some(vec![tenant.owner.clone()]),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "ClusterRole".to_owned(),
            name: access.cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: access.service_account.clone(),
            namespace: Some(operator_namespace.to_owned()),
            api_group: None,
        }]),
    }
}

/// The credentials Secret as found.
#[derive(Clone, Debug)]
pub struct LoadedCredentials {
    pub credentials: Credentials,
    /// No Secret exists yet.
    pub missing: bool,
    /// The data differs from what bulkhead last wrote.
    pub tampered: bool,
}

/// Reads the credentials Secret, allowing a just-created access RoleBinding a moment to reach
/// the API server's authorizer.
pub async fn load_credentials_when_bound(
    ctx: &Context,
    tenant: &Tenant,
) -> Result<LoadedCredentials, LayerError> {
    let mut attempt = 0;
    loop {
        match load_credentials(ctx, tenant).await {
            Err(LayerError::Kube(kube::Error::Api(s)))
                if s.code == 403 && ctx.namespace_access.is_some() && attempt < 10 =>
            {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// Reads the organization's credentials Secret.
pub async fn load_credentials(
    ctx: &Context,
    tenant: &Tenant,
) -> Result<LoadedCredentials, LayerError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &tenant.namespace);
    let Some(secret) = api.get_opt(CREDENTIALS_SECRET).await? else {
        return Ok(LoadedCredentials {
            credentials: Credentials::default(),
            missing: true,
            tampered: false,
        });
    };
    let mut entries = BTreeMap::new();
    for (k, v) in secret.data.clone().unwrap_or_default() {
        entries.insert(k, String::from_utf8_lossy(&v.0).into_owned());
    }
    let credentials = Credentials::new(entries);
    let recorded = secret
        .annotations()
        .get(CREDENTIALS_DIGEST_ANNOTATION)
        .cloned();
    let tampered = recorded.as_deref() != Some(digest(&credentials).as_str());
    Ok(LoadedCredentials {
        credentials,
        missing: false,
        tampered,
    })
}

/// Digest of the Secret's data, stored beside it to notice edits made outside bulkhead.
pub fn digest(creds: &Credentials) -> String {
    let mut h = Sha256::new();
    for (k, v) in creds.entries() {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Writes the Secret in one apply, only when its content changed.
pub async fn write_credentials(
    ctx: &Context,
    tenant: &Tenant,
    loaded: &LoadedCredentials,
    creds: &Credentials,
) -> Result<(), LayerError> {
    if !loaded.missing && !loaded.tampered && &loaded.credentials == creds {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &tenant.namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CREDENTIALS_SECRET.to_owned()),
            namespace: Some(tenant.namespace.clone()),
            labels: Some(managed_labels(tenant)),
            annotations: Some(BTreeMap::from([(
                CREDENTIALS_DIGEST_ANNOTATION.to_owned(),
                digest(creds),
            )])),
            owner_references: Some(vec![tenant.owner.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(
            creds
                .entries()
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    if loaded.tampered {
        // Server-side apply keeps keys that another manager added; after an edit the whole data
        // is replaced so that nothing but what bulkhead wrote remains.
        if let Some(mut live) = api.get_opt(CREDENTIALS_SECRET).await? {
            live.data = secret.data;
            live.string_data = None;
            live.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(CREDENTIALS_DIGEST_ANNOTATION.to_owned(), digest(creds));
            api.replace(CREDENTIALS_SECRET, &PostParams::default(), &live)
                .await?;
            return Ok(());
        }
    }
    api.patch(
        CREDENTIALS_SECRET,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await?;
    Ok(())
}

/// Secret key under which a provider's key is stored, e.g. `AI_OPENAI_API_KEY`.
pub fn provider_key_name(provider: &str) -> String {
    format!(
        "{PROVIDER_KEY_PREFIX}{}{PROVIDER_KEY_SUFFIX}",
        provider.to_ascii_uppercase().replace('-', "_")
    )
}

/// Why a BYOK source cannot be used. Its reason names the condition.
#[derive(Debug, thiserror::Error)]
pub enum ProviderKeyError {
    /// The source Secret or its key does not exist.
    #[error("{0}")]
    Missing(String),
    /// The source exists but is not this organization's to use.
    #[error("{0}")]
    Ineligible(String),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

impl ProviderKeyError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "ConfigurationError",
            Self::Ineligible(_) => "ProviderKeyIneligible",
            Self::Kube(_) => "KubernetesError",
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Missing(_) | Self::Ineligible(_) => ErrorClass::Configuration,
            Self::Kube(_) => ErrorClass::Transient,
        }
    }
}

/// Whether any IsolationPlatform refers to Secret `name` in `namespace` (its admin Secrets).
pub fn platform_refers_to(
    platforms: &[IsolationPlatform],
    operator_namespace: &str,
    namespace: &str,
    name: &str,
) -> Option<String> {
    platforms.iter().find_map(|p| {
        let s = &p.spec;
        let refs = [
            s.database.as_ref().map(|d| {
                (
                    d.admin_url_secret_ref.namespace.as_deref(),
                    &d.admin_url_secret_ref.name,
                )
            }),
            s.storage.as_ref().map(|st| {
                (
                    st.admin_secret_ref.namespace.as_deref(),
                    &st.admin_secret_ref.name,
                )
            }),
            s.cache.as_ref().map(|c| {
                (
                    c.admin_url_secret_ref.namespace.as_deref(),
                    &c.admin_url_secret_ref.name,
                )
            }),
        ];
        refs.into_iter()
            .flatten()
            .any(|(ns, n)| ns.unwrap_or(operator_namespace) == namespace && n == name)
            .then(|| p.name_any())
    })
}

/// Why `source` may not feed `org_id`'s credentials (pure), or `None` when it may: it must carry
/// the label `bulkhead.dev/byok-org=<orgId>` and no IsolationPlatform may refer to it.
pub fn byok_ineligibility(
    source: &Secret,
    org_id: &str,
    operator_namespace: &str,
    platforms: &[IsolationPlatform],
) -> Option<String> {
    let name = source.name_any();
    if let Some(p) = platform_refers_to(platforms, operator_namespace, operator_namespace, &name) {
        return Some(format!(
            "Secret {operator_namespace}/{name} is an admin Secret of IsolationPlatform {p:?}; it can never be a BYOK source"
        ));
    }
    match source.labels().get(BYOK_LABEL) {
        Some(v) if v == org_id => None,
        Some(v) => Some(format!(
            "Secret {operator_namespace}/{name} is labelled {BYOK_LABEL}={v:?}, not {org_id:?}; it belongs to another organization"
        )),
        None => Some(format!(
            "Secret {operator_namespace}/{name} is not marked for this organization: label it {BYOK_LABEL}={org_id} to make it a BYOK source"
        )),
    }
}

/// Reads every BYOK key from its source Secret in the operator's namespace:
/// (provider, Secret key name, value). A source must be marked for this organization and must
/// not be one of the platform's admin Secrets.
pub async fn provider_keys(
    ctx: &Context,
    org: &Organization,
) -> Result<Vec<(String, String, String)>, ProviderKeyError> {
    if org.spec.ai_providers.is_empty() {
        return Ok(Vec::new());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let platforms = Api::<IsolationPlatform>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items;
    let ns = &ctx.operator_namespace;
    let mut out = Vec::new();
    for p in &org.spec.ai_providers {
        let source = api.get_opt(&p.secret_ref.name).await?.ok_or_else(|| {
            ProviderKeyError::Missing(format!(
                "AI provider {}: Secret {ns}/{} not found",
                p.name, p.secret_ref.name
            ))
        })?;
        if let Some(why) = byok_ineligibility(&source, &org.spec.org_id, ns, &platforms) {
            return Err(ProviderKeyError::Ineligible(format!(
                "AI provider {}: {why}",
                p.name
            )));
        }
        let value = source
            .data
            .as_ref()
            .and_then(|d| d.get(&p.secret_ref.key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
            .unwrap_or_default();
        if value.is_empty() {
            return Err(ProviderKeyError::Missing(format!(
                "AI provider {}: Secret {ns}/{} has no non-empty key {:?}",
                p.name, p.secret_ref.name, p.secret_ref.key
            )));
        }
        out.push((p.name.clone(), provider_key_name(&p.name), value));
    }
    Ok(out)
}

/// Removes keys of providers no longer in the spec.
pub fn drop_stale_provider_keys(org: &Organization, creds: &mut Credentials) {
    let wanted: Vec<String> = org
        .spec
        .ai_providers
        .iter()
        .map(|p| provider_key_name(&p.name))
        .collect();
    let stale: Vec<String> = creds
        .entries()
        .keys()
        .filter(|k| {
            k.starts_with(PROVIDER_KEY_PREFIX)
                && k.ends_with(PROVIDER_KEY_SUFFIX)
                && !wanted.contains(k)
        })
        .cloned()
        .collect();
    for k in stale {
        creds.remove(&k);
    }
}

/// Deletes the organization's namespace (and with it the credentials Secret), if it owns it.
pub async fn delete_namespace(
    ctx: &Context,
    org: &Organization,
    tenant: &Tenant,
) -> Result<(), kube::Error> {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    if let Some(live) = api.get_opt(&tenant.namespace).await? {
        let owned = live
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == org.metadata.uid.as_ref());
        if owned && live.metadata.deletion_timestamp.is_none() {
            api.delete(&tenant.namespace, &DeleteParams::background())
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DeletionPolicy;
    use crate::tenant::OrgId;

    fn tenant() -> Tenant {
        Tenant {
            name: "acme".into(),
            org_id: OrgId::parse("acme").unwrap(),
            display_name: "Acme".into(),
            namespace: "org-acme".into(),
            deletion_policy: DeletionPolicy::Retain,
            rotate: false,
            peers: vec![],
            owner: Default::default(),
            adopt_from: None,
            resource_quota: None,
            limit_range: None,
        }
    }

    #[test]
    fn namespace_is_labelled_and_restricted() {
        let ns = namespace_plan(&tenant());
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(labels["bulkhead.dev/org-id"], "acme");
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "bulkhead");
    }

    #[test]
    fn digest_changes_with_any_edit() {
        let mut c = Credentials::default();
        c.set("A", "1");
        let d1 = digest(&c);
        c.set("A", "2");
        assert_ne!(d1, digest(&c));
        // Length-prefixed: moving a boundary between key and value changes the digest.
        let a = Credentials::new(BTreeMap::from([("AB".into(), "C".into())]));
        let b = Credentials::new(BTreeMap::from([("A".into(), "BC".into())]));
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn provider_key_names() {
        assert_eq!(provider_key_name("openai"), "AI_OPENAI_API_KEY");
        assert_eq!(provider_key_name("azure-openai"), "AI_AZURE_OPENAI_API_KEY");
    }

    fn source(name: &str, label: Option<&str>) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        if let Some(v) = label {
            s.metadata.labels = Some(BTreeMap::from([(BYOK_LABEL.to_owned(), v.to_owned())]));
        }
        s
    }

    fn platform(db_secret: &str, db_ns: Option<&str>) -> IsolationPlatform {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
            "metadata": { "name": "default" },
            "spec": {
                "database": { "adminUrlSecretRef": { "name": db_secret, "key": "url", "namespace": db_ns } },
                "storage": { "bucket": "b", "adminSecretRef": { "name": "s3-admin" } },
                "cache": { "adminUrlSecretRef": { "name": "redis-admin", "key": "url" } },
            }
        }))
        .unwrap()
    }

    #[test]
    fn byok_source_must_be_marked_for_the_organization() {
        let p = [platform("pg", None)];
        assert_eq!(
            byok_ineligibility(&source("k", Some("acme")), "acme", "ops", &p),
            None
        );
        let unmarked = byok_ineligibility(&source("k", None), "acme", "ops", &p).unwrap();
        assert!(
            unmarked.contains("bulkhead.dev/byok-org=acme"),
            "{unmarked}"
        );
        let other = byok_ineligibility(&source("k", Some("globex")), "acme", "ops", &p).unwrap();
        assert!(other.contains("another organization"), "{other}");
    }

    #[test]
    fn byok_source_can_never_be_an_admin_secret() {
        let p = [platform("pg", None)];
        for admin in ["pg", "s3-admin", "redis-admin"] {
            // Even a label naming the organization does not make an admin Secret eligible.
            let why = byok_ineligibility(&source(admin, Some("acme")), "acme", "ops", &p)
                .unwrap_or_else(|| panic!("{admin} accepted as a BYOK source"));
            assert!(why.contains("admin Secret"), "{why}");
        }
        // A Secret of the same name in another namespace is not the admin Secret.
        let elsewhere = [platform("pg", Some("db-system"))];
        assert_eq!(
            byok_ineligibility(&source("pg", Some("acme")), "acme", "ops", &elsewhere),
            None
        );
        assert!(
            byok_ineligibility(&source("pg", Some("acme")), "acme", "db-system", &elsewhere)
                .is_some()
        );
    }
}
