//! Who owns an organization's prefix. The record is an object `.bulkhead/owners/{orgId}` in the
//! shared bucket, written by the admin only: no tenant policy grants it and the bucket guard
//! denies it to every tenant. It outlives the IAM principal, so retained data stays owned by the
//! Organization that wrote it until another one adopts it explicitly.

use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};

use super::diff::{self, Claim};
use super::{StorageLayer, call, call_opt};
use crate::layers::{LayerError, Repair, Tenant};
use crate::tenant::OrgId;

/// Key prefix of the owner records; prefix templates may not start with it.
pub const OWNER_MARKERS: &str = ".bulkhead/owners/";

/// The owner record's content.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct OwnerRecord {
    org_id: String,
    owner_uid: String,
}

impl StorageLayer {
    /// Key of the organization's owner record.
    pub fn owner_record_key(&self, org: &OrgId) -> String {
        format!("{OWNER_MARKERS}{}", org.as_str())
    }

    /// The UID recorded as owning the organization's prefix, if any.
    pub async fn prefix_owner(&self, org: &OrgId) -> Result<Option<String>, LayerError> {
        let req = self.s3.get_object().bucket(&self.spec.bucket);
        let got = call_opt(
            "GetObject owner record",
            "NoSuchKey",
            req.key(self.owner_record_key(org)).send(),
        )
        .await?;
        let Some(out) = got else {
            return Ok(None);
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| LayerError::Backend(format!("GetObject owner record: {e}")))?;
        let record: OwnerRecord = serde_json::from_slice(&bytes.into_bytes()).map_err(|e| {
            LayerError::Backend(format!(
                "owner record of {org} is not readable, so nothing is assumed: {e}"
            ))
        })?;
        Ok(Some(record.owner_uid))
    }

    async fn prefix_record(&self, org: &OrgId) -> Result<diff::Record, LayerError> {
        let owner = self.prefix_owner(org).await?;
        let has_objects = match owner {
            Some(_) => false,
            None => self.list_prefix(&self.prefix(org), 1).await?.key_count() > Some(0),
        };
        Ok(diff::prefix_record(owner.as_deref(), has_objects))
    }

    /// Decides, without writing, whether the tenant may use its prefix.
    pub(super) async fn claim_prefix(&self, tenant: &Tenant) -> Result<Claim, LayerError> {
        let org = &tenant.org_id;
        let record = self.prefix_record(org).await?;
        let what = format!("the data under {}", self.prefix(org));
        diff::claim(
            &what,
            org.as_str(),
            &record,
            &tenant.owner.uid,
            tenant.adopt_from.as_deref(),
        )
        .map_err(LayerError::Refused)
    }

    /// Records the tenant as the prefix's owner when it was created or adopted.
    pub(super) async fn record_prefix_owner(
        &self,
        tenant: &Tenant,
        claim: &Claim,
    ) -> Result<Vec<Repair>, LayerError> {
        if *claim == Claim::Ours {
            return Ok(Vec::new());
        }
        let record = OwnerRecord {
            org_id: tenant.org_id.to_string(),
            owner_uid: tenant.owner.uid.clone(),
        };
        let body = serde_json::to_vec(&record)
            .map_err(|e| LayerError::Backend(format!("owner record: {e}")))?;
        let req = self.s3.put_object().bucket(&self.spec.bucket);
        let req = req.key(self.owner_record_key(&tenant.org_id));
        call(
            "PutObject owner record",
            req.body(ByteStream::from(body)).send(),
        )
        .await?;
        Ok(match claim {
            Claim::Adopt(old) => vec![Repair(format!(
                "re-attached retained data of Organization UID {old}"
            ))],
            _ => Vec::new(),
        })
    }

    /// Whether the tenant's Organization owns its prefix (only then may cleanup touch it).
    pub(super) async fn owns_prefix(&self, tenant: &Tenant) -> Result<bool, LayerError> {
        let owner = self.prefix_owner(&tenant.org_id).await?;
        Ok(owner.is_some_and(|o| diff::removable(&diff::Record::Owned(o), &tenant.owner.uid)))
    }

    pub(super) async fn forget_prefix_owner(&self, org: &OrgId) -> Result<(), LayerError> {
        self.delete_object("DeleteObject owner record", &self.owner_record_key(org))
            .await
    }
}
