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
/// Suffix of a creation record beside the owner records.
pub const CREATION_SUFFIX: &str = ".creating";

/// The owner record's content.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct OwnerRecord {
    org_id: String,
    owner_uid: String,
}

/// The query prefix and first `start-after` key for looking under `prefix` (which ends with '/')
/// with no '/' in the query: everything the query matches before the prefix starts `{base}.`.
pub fn listing_window(prefix: &str) -> (&str, String) {
    let base = prefix.strip_suffix('/').unwrap_or(prefix);
    (base, format!("{base}."))
}

/// What one listed key says: under the prefix (`Some(true)`), past it (`Some(false)`), or before
/// it, so the listing goes on (`None`).
pub fn key_verdict(prefix: &str, key: &str) -> Option<bool> {
    if key.starts_with(prefix) {
        Some(true)
    } else if key.as_bytes() > prefix.as_bytes() {
        Some(false)
    } else {
        None
    }
}

impl StorageLayer {
    /// Key of the organization's owner record.
    pub fn owner_record_key(&self, org: &OrgId) -> String {
        format!("{OWNER_MARKERS}{}", org.as_str())
    }

    /// Key of the record written right before the organization's IAM user is created: which
    /// Organization UID is creating it. Org ids hold no '.', so it never names another org's
    /// owner record.
    pub fn creation_record_key(&self, org: &OrgId) -> String {
        format!("{OWNER_MARKERS}{}{CREATION_SUFFIX}", org.as_str())
    }

    /// The content of an owner (or creation) record: the orgId and its Organization's UID.
    pub fn owner_record_body(org: &OrgId, owner_uid: &str) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&OwnerRecord {
            org_id: org.to_string(),
            owner_uid: owner_uid.to_owned(),
        })
    }

    /// The UID recorded as owning the organization's prefix, if any.
    pub async fn prefix_owner(&self, org: &OrgId) -> Result<Option<String>, LayerError> {
        let key = self.owner_record_key(org);
        self.read_record("GetObject owner record", "owner record", &key, org)
            .await
    }

    /// The UID recorded as creating the organization's IAM user, if a creation record is there.
    pub(super) async fn creation_owner(&self, org: &OrgId) -> Result<Option<String>, LayerError> {
        let key = self.creation_record_key(org);
        self.read_record("GetObject creation record", "creation record", &key, org)
            .await
    }

    /// The owner UID of the record at `key`, which must name `org`.
    async fn read_record(
        &self,
        op: &'static str,
        what: &str,
        key: &str,
        org: &OrgId,
    ) -> Result<Option<String>, LayerError> {
        let req = self.s3.get_object().bucket(&self.spec.bucket);
        let got = call_opt(op, "NoSuchKey", req.key(key).send()).await?;
        let Some(out) = got else {
            return Ok(None);
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| LayerError::Backend(format!("{op}: {e}")))?;
        let record: OwnerRecord = serde_json::from_slice(&bytes.into_bytes()).map_err(|e| {
            LayerError::Backend(format!(
                "{what} of {org} is not readable, so nothing is assumed: {e}"
            ))
        })?;
        if record.org_id != org.as_str() {
            return Err(LayerError::Backend(format!(
                "{what} at {key} names orgId {}, not {org}, so nothing is assumed",
                record.org_id
            )));
        }
        Ok(Some(record.owner_uid))
    }

    /// Writes the creation record: the tenant's Organization is about to create its IAM user.
    pub(super) async fn record_creation(&self, tenant: &Tenant) -> Result<(), LayerError> {
        let key = self.creation_record_key(&tenant.org_id);
        self.write_record("PutObject creation record", &key, tenant)
            .await
    }

    /// Writes the record at `key`: the tenant's orgId and its Organization's UID.
    async fn write_record(
        &self,
        op: &'static str,
        key: &str,
        tenant: &Tenant,
    ) -> Result<(), LayerError> {
        let body = Self::owner_record_body(&tenant.org_id, &tenant.owner.uid)
            .map_err(|e| LayerError::Backend(format!("{op}: {e}")))?;
        let req = self.s3.put_object().bucket(&self.spec.bucket).key(key);
        call(op, req.body(ByteStream::from(body)).send()).await?;
        Ok(())
    }

    /// Removes the creation record once the owner is recorded on the user, or the user is gone.
    pub(super) async fn forget_creation(&self, org: &OrgId) -> Result<(), LayerError> {
        self.delete_object(
            "DeleteObject creation record",
            &self.creation_record_key(org),
        )
        .await
    }

    async fn prefix_record(&self, org: &OrgId) -> Result<diff::Record, LayerError> {
        let owner = self.prefix_owner(org).await?;
        let has_objects = match owner {
            Some(_) => false,
            None => self.any_object_under(&self.prefix(org)).await?,
        };
        Ok(diff::prefix_record(owner.as_deref(), has_objects))
    }

    /// Whether any object lies under `prefix`. The trailing '/' stays out of the query, which
    /// some S3 servers (moto) cannot sign; keys listed before the prefix are skipped.
    async fn any_object_under(&self, prefix: &str) -> Result<bool, LayerError> {
        const MAX_PAGES: usize = 1000;
        let (query, mut cursor) = listing_window(prefix);
        for _ in 0..MAX_PAGES {
            let req = self.s3.list_objects_v2().bucket(&self.spec.bucket);
            let req = req.prefix(query).start_after(&cursor).max_keys(100);
            let page = call("ListObjectsV2", req.send()).await?;
            let keys: Vec<&str> = page.contents().iter().filter_map(|o| o.key()).collect();
            for key in &keys {
                if let Some(found) = key_verdict(prefix, key) {
                    return Ok(found);
                }
            }
            match keys.last() {
                Some(last) if page.is_truncated() == Some(true) => cursor = (*last).to_owned(),
                _ => return Ok(false),
            }
        }
        Err(LayerError::Backend(format!(
            "more than {MAX_PAGES} pages of keys sort right before {prefix}"
        )))
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
        let key = self.owner_record_key(&tenant.org_id);
        self.write_record("PutObject owner record", &key, tenant)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_window_starts_right_before_the_prefix() {
        let (query, after) = listing_window("acme/");
        assert_eq!((query, after.as_str()), ("acme", "acme."));
        assert_eq!(listing_window("tenants/acme/").0, "tenants/acme");
        // Keys the query matches that sort before the start are never under the prefix.
        for before in ["acme", "acme-2/x", "acme-", "acme!"] {
            assert!(before.as_bytes() <= after.as_bytes(), "{before}");
        }
    }

    #[test]
    fn listed_keys_say_under_past_or_go_on() {
        assert_eq!(key_verdict("acme/", "acme/x"), Some(true));
        assert_eq!(key_verdict("acme/", "acme/"), Some(true));
        assert_eq!(key_verdict("acme/", "acme0/x"), Some(false));
        assert_eq!(key_verdict("acme/", "acmez"), Some(false));
        assert_eq!(key_verdict("acme/", "acme.txt"), None);
        assert_eq!(key_verdict("acme/", "acme.\u{e9}"), None);
    }
}
