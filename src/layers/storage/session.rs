//! `session` mode: no per-organization IAM object. Per organization the operator assumes one
//! existing role with a session policy scoped to the organization's prefix, and writes the
//! temporary credentials into the credentials Secret. A pass replaces them `refresh_before`
//! seconds before they expire, and the controller schedules the next pass by then.
//!
//! The pure part ([`renewal`], [`Timing`]) decides whether the session in the Secret is kept;
//! the rest talks to STS.

use aws_sdk_s3::config::Credentials as AwsCredentials;
use k8s_openapi::jiff::Timestamp;

use super::policy::{self, ORG_TAG, SESSION_POLICY_MAX_BYTES, SessionRole};
use super::{
    ApiError, KEY_ACCESS_KEY_ID, KEY_BUCKET, KEY_CREDENTIAL_EXPIRATION, KEY_PREFIX, KEY_ROLE_ARN,
    KEY_SECRET_ACCESS_KEY, KEY_SESSION_TAG, KEY_SESSION_TOKEN, StorageLayer, api_error,
};
use crate::api::platform::{GuardStyle, StoragePlatform};
use crate::layers::{Credentials, LayerError, Repair, Tenant};
use crate::tenant::OrgId;

/// AssumeRole's bounds on `DurationSeconds` (AWS; SeaweedFS 4.48 enforces the same).
pub const MIN_DURATION_SECONDS: u32 = 900;
pub const MAX_DURATION_SECONDS: u32 = 43_200;
/// The least time a new session is kept before it is due for replacement, and the least time
/// consumers get to re-read the Secret before the old one expires.
pub const MIN_REFRESH_GAP_SECONDS: u32 = 60;
/// AssumeRole's bounds on `RoleSessionName`'s length.
const SESSION_NAME_LEN: std::ops::RangeInclusive<usize> = 2..=64;

/// How long a session lives, and how long before its end it is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub duration_seconds: u32,
    pub refresh_before_seconds: u32,
}

impl Timing {
    /// From the platform's spec: `sessionRefreshBeforeSeconds` defaults to half the duration.
    pub fn of(spec: &StoragePlatform) -> Result<Self, String> {
        let duration = spec.session_duration_seconds;
        if !(MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&duration) {
            return Err(format!(
                "sessionDurationSeconds {duration} must be between {MIN_DURATION_SECONDS} and {MAX_DURATION_SECONDS} (STS AssumeRole's bounds)"
            ));
        }
        let before = spec.session_refresh_before_seconds.unwrap_or(duration / 2);
        let most = duration - MIN_REFRESH_GAP_SECONDS;
        if !(MIN_REFRESH_GAP_SECONDS..=most).contains(&before) {
            return Err(format!(
                "sessionRefreshBeforeSeconds {before} must be between {MIN_REFRESH_GAP_SECONDS} and sessionDurationSeconds - {MIN_REFRESH_GAP_SECONDS} ({most}): a new session must not be due at once, and consumers need time to re-read the Secret"
            ));
        }
        Ok(Self {
            duration_seconds: duration,
            refresh_before_seconds: before,
        })
    }

    /// When a session expiring at `expiry` is due for replacement.
    pub fn renew_at(&self, expiry: Timestamp) -> Timestamp {
        Timestamp::from_second(
            expiry
                .as_second()
                .saturating_sub(i64::from(self.refresh_before_seconds)),
        )
        .unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// The session the credentials Secret holds, as read from it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held<'a> {
    pub access_key: Option<&'a str>,
    pub secret_key: Option<&'a str>,
    pub token: Option<&'a str>,
    pub expiry: Option<&'a str>,
    pub bucket: Option<&'a str>,
    pub prefix: Option<&'a str>,
}

impl<'a> Held<'a> {
    pub fn of(creds: &'a Credentials) -> Self {
        let some = |k: &str| creds.get(k).filter(|v| !v.is_empty());
        Self {
            access_key: some(KEY_ACCESS_KEY_ID),
            secret_key: some(KEY_SECRET_ACCESS_KEY),
            token: some(KEY_SESSION_TOKEN),
            expiry: some(KEY_CREDENTIAL_EXPIRATION),
            bucket: some(KEY_BUCKET),
            prefix: some(KEY_PREFIX),
        }
    }

    /// The expiry, when it is there and readable.
    pub fn expiry(&self) -> Option<Timestamp> {
        self.expiry.and_then(|e| e.parse().ok())
    }
}

/// What `ensure` does with the session in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Keep it (once STS confirms it is this organization's); the next pass comes by `renew_at`.
    Keep { renew_at: Timestamp },
    /// Issue a new one. `why` is a drift to report; `None` for a first issue or a routine refresh.
    Mint { why: Option<String> },
}

/// Decides whether the session in the Secret can stay (pure).
pub fn renewal(
    held: &Held<'_>,
    bucket: &str,
    prefix: &str,
    timing: &Timing,
    rotate: bool,
    now: Timestamp,
) -> Renewal {
    if rotate {
        let until = held
            .expiry()
            .map(|e| format!("until {e}"))
            .unwrap_or_else(|| "until it expires".to_owned());
        return Renewal::Mint {
            why: Some(format!(
                "a new session was issued (rotation); the previous one stays valid {until}, as STS sessions cannot be revoked"
            )),
        };
    }
    if held.access_key.is_none() || held.secret_key.is_none() || held.token.is_none() {
        return Renewal::Mint { why: None };
    }
    let Some(expiry) = held.expiry() else {
        return Renewal::Mint {
            why: Some(format!(
                "the credentials Secret's {KEY_CREDENTIAL_EXPIRATION} was missing or unreadable; a new session was issued"
            )),
        };
    };
    if held.bucket != Some(bucket) || held.prefix != Some(prefix) {
        return Renewal::Mint {
            why: Some(format!(
                "the session in the credentials Secret was issued for another bucket or prefix; a new one for {bucket}/{prefix} was issued"
            )),
        };
    }
    let renew_at = timing.renew_at(expiry);
    if now >= renew_at {
        Renewal::Mint { why: None }
    } else {
        Renewal::Keep { renew_at }
    }
}

/// The session name of an organization: its org id, which the bucket guard reads back as the
/// session's `${aws:username}` on SeaweedFS.
pub fn session_name(org: &OrgId) -> Result<String, String> {
    let name = org.as_str();
    if SESSION_NAME_LEN.contains(&name.len()) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "orgId {org}: session mode names each organization's STS session after its orgId, and a session name has {} to {} characters; choose a longer orgId",
            SESSION_NAME_LEN.start(),
            SESSION_NAME_LEN.end()
        ))
    }
}

/// Checks the session policy of the longest org id against STS's size limit.
pub fn check_policy_size(bucket: &str, prefix_template: &str) -> Result<(), String> {
    let longest = "o".repeat(crate::tenant::MAX_ORG_ID_LEN);
    let prefix = prefix_template.replace("{orgId}", &longest);
    let size = policy::session_policy(bucket, &prefix).to_json().len();
    if size > SESSION_POLICY_MAX_BYTES {
        return Err(format!(
            "the session policy for a {}-character orgId would be {size} bytes, over STS's {SESSION_POLICY_MAX_BYTES}: shorten the bucket name or prefixTemplate",
            crate::tenant::MAX_ORG_ID_LEN
        ));
    }
    Ok(())
}

/// STS error codes that mean the platform's configuration is wrong, not that STS is unwell.
fn is_configuration(e: &ApiError) -> bool {
    e.is_access_denied()
        || [
            "MalformedPolicyDocument",
            "PackedPolicyTooLarge",
            "ValidationError",
            "InvalidParameterValue",
            "RegionDisabledException",
        ]
        .iter()
        .any(|c| e.is(c))
}

impl StorageLayer {
    fn session_role(&self) -> Result<&SessionRole, LayerError> {
        self.session
            .as_ref()
            .ok_or_else(|| LayerError::Config("mode session needs sessionRoleArn".to_owned()))
    }

    /// The session principal recorded as the organization's storage identity.
    pub(super) fn session_identity(&self, org: &OrgId) -> Option<String> {
        self.session
            .as_ref()
            .map(|r| format!("assumed-role/{}/{org}", r.name))
    }

    /// Refuses what cannot have a session, before anything is written.
    pub(super) fn claim_session(&self, tenant: &Tenant) -> Result<(), LayerError> {
        self.session_role()?;
        session_name(&tenant.org_id)
            .map(drop)
            .map_err(LayerError::Refused)
    }

    /// `session` mode: keeps the Secret's session while it is this organization's and not due,
    /// or issues a new one. Returns the drifts repaired.
    pub(super) async fn converge_session(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let prefix = self.prefix(&tenant.org_id);
        let decision = renewal(
            &Held::of(creds),
            &self.spec.bucket,
            &prefix,
            &self.timing,
            tenant.rotate,
            Timestamp::now(),
        );
        let why = match decision {
            Renewal::Keep { .. } => match self.held_session_check(tenant, creds).await? {
                None => {
                    creds.remove(KEY_ROLE_ARN);
                    creds.remove(KEY_SESSION_TAG);
                    return Ok(Vec::new());
                }
                Some(problem) => Some(format!("{problem}; a new session was issued")),
            },
            Renewal::Mint { why } => why,
        };
        self.mint_session(tenant, creds).await?;
        Ok(why.into_iter().map(Repair).collect())
    }

    /// Assumes the role for the organization with its session policy and writes the session into
    /// `creds`.
    async fn mint_session(
        &self,
        tenant: &Tenant,
        creds: &mut Credentials,
    ) -> Result<(), LayerError> {
        let role = self.session_role()?;
        let name = session_name(&tenant.org_id).map_err(LayerError::Refused)?;
        let document = policy::session_policy(&self.spec.bucket, &self.prefix(&tenant.org_id));
        let mut req = self
            .sts
            .assume_role()
            .role_arn(&role.arn)
            .role_session_name(name)
            .duration_seconds(i32::try_from(self.timing.duration_seconds).unwrap_or(i32::MAX))
            .policy(document.to_json());
        if self.style == GuardStyle::PathCondition {
            // The AWS guard finds the session's prefix through this tag.
            let tag = aws_sdk_sts::types::Tag::builder()
                .key(ORG_TAG)
                .value(tenant.org_id.as_str())
                .build()
                .map_err(|e| LayerError::Backend(format!("session tag: {e}")))?;
            req = req.tags(tag);
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) => {
                let err = api_error("AssumeRole", &e);
                return Err(if is_configuration(&err) {
                    LayerError::Config(format!("sessionRoleArn {}: {}", role.arn, err.describe()))
                } else {
                    err.into_layer()
                });
            }
        };
        let c = out
            .credentials()
            .ok_or_else(|| LayerError::Backend("AssumeRole returned no credentials".to_owned()))?;
        let expiry = Timestamp::from_second(c.expiration().secs())
            .map_err(|e| LayerError::Backend(format!("AssumeRole expiration: {e}")))?;
        creds.set(KEY_ACCESS_KEY_ID, c.access_key_id());
        creds.set(KEY_SECRET_ACCESS_KEY, c.secret_access_key());
        creds.set(KEY_SESSION_TOKEN, c.session_token());
        creds.set(KEY_CREDENTIAL_EXPIRATION, expiry.to_string());
        creds.remove(KEY_ROLE_ARN);
        creds.remove(KEY_SESSION_TAG);
        Ok(())
    }

    /// Asks STS who the Secret's session is. `None` when it is this organization's session of the
    /// configured role; otherwise what is wrong, in words (never a credential).
    pub(super) async fn held_session_check(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Option<String>, LayerError> {
        let role = self.session_role()?;
        let held = Held::of(creds);
        let (Some(id), Some(secret), Some(token)) = (held.access_key, held.secret_key, held.token)
        else {
            return Ok(Some(
                "the credentials Secret holds no session (access key, secret and token)".to_owned(),
            ));
        };
        let session = AwsCredentials::new(
            id,
            secret,
            Some(token.to_owned()),
            None,
            "bulkhead-tenant-session",
        );
        let expected = role.session_arn(tenant.org_id.as_str());
        match self.conn.sts(session).get_caller_identity().send().await {
            Ok(out) if out.arn() == Some(expected.as_str()) => Ok(None),
            Ok(out) => Ok(Some(format!(
                "the credentials Secret's session is {}, not {expected}",
                out.arn().unwrap_or("unnamed")
            ))),
            Err(e) => {
                let err = api_error("GetCallerIdentity", &e);
                if err.unreachable {
                    Err(err.into_layer())
                } else {
                    Ok(Some(format!(
                        "the credentials Secret's session was refused by STS ({})",
                        err.describe()
                    )))
                }
            }
        }
    }

    /// The audit of `session` mode: the Secret's session is this organization's and unexpired.
    pub(super) async fn audit_session(
        &self,
        tenant: &Tenant,
        creds: &Credentials,
    ) -> Result<Vec<String>, LayerError> {
        let mut findings = Vec::new();
        match Held::of(creds).expiry() {
            None => findings.push(format!(
                "the credentials Secret has no readable {KEY_CREDENTIAL_EXPIRATION}"
            )),
            Some(e) if e <= Timestamp::now() => {
                findings.push(format!("the credentials Secret's session expired at {e}"));
            }
            Some(_) => {}
        }
        findings.extend(self.held_session_check(tenant, creds).await?);
        Ok(findings)
    }

    /// When the session in `creds` must be replaced, in `session` mode.
    pub(super) fn session_renew_by(&self, creds: &Credentials) -> Option<Timestamp> {
        self.session.as_ref()?;
        Held::of(creds).expiry().map(|e| self.timing.renew_at(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> StoragePlatform {
        let mut v = json!({"bucket": "files", "adminSecretRef": {"name": "s3"}, "mode": "session",
            "sessionRoleArn": "arn:aws:iam::000000000000:role/bulkhead-tenant-sessions"});
        if let (Some(base), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
            base.extend(more);
        }
        serde_json::from_value(v).unwrap()
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    const EXPIRY: i64 = 1_800_003_600;

    fn held(expiry: &str) -> Held<'_> {
        Held {
            access_key: Some("ASIA1"),
            secret_key: Some("s"),
            token: Some("t"),
            expiry: Some(expiry),
            bucket: Some("files"),
            prefix: Some("acme/"),
        }
    }

    #[test]
    fn refresh_defaults_to_half_the_duration_and_is_bounded() {
        let t = Timing::of(&spec(json!({}))).unwrap();
        assert_eq!((t.duration_seconds, t.refresh_before_seconds), (3600, 1800));
        let t = Timing::of(&spec(
            json!({"sessionDurationSeconds": 900, "sessionRefreshBeforeSeconds": 840}),
        ))
        .unwrap();
        assert_eq!(t.refresh_before_seconds, 840);
        for (d, r, word) in [
            (899, None, "sessionDurationSeconds 899"),
            (43_201, None, "sessionDurationSeconds 43201"),
            (900, Some(841), "sessionRefreshBeforeSeconds 841"),
            (900, Some(59), "sessionRefreshBeforeSeconds 59"),
            (3600, Some(3600), "sessionRefreshBeforeSeconds 3600"),
        ] {
            let err = Timing::of(&spec(
                json!({"sessionDurationSeconds": d, "sessionRefreshBeforeSeconds": r}),
            ))
            .unwrap_err();
            assert!(err.contains(word), "{err}");
        }
    }

    #[test]
    fn a_session_is_kept_until_it_is_due_then_replaced() {
        let timing = Timing {
            duration_seconds: 3600,
            refresh_before_seconds: 600,
        };
        let expiry = at(EXPIRY).to_string();
        let h = held(&expiry);
        let due = at(EXPIRY - 600);
        assert_eq!(
            renewal(&h, "files", "acme/", &timing, false, at(EXPIRY - 3600)),
            Renewal::Keep { renew_at: due }
        );
        assert_eq!(
            renewal(&h, "files", "acme/", &timing, false, at(EXPIRY - 601)),
            Renewal::Keep { renew_at: due }
        );
        // Due: a routine refresh, not a drift.
        for now in [EXPIRY - 600, EXPIRY - 1, EXPIRY, EXPIRY + 3600] {
            assert_eq!(
                renewal(&h, "files", "acme/", &timing, false, at(now)),
                Renewal::Mint { why: None },
                "{now}"
            );
        }
    }

    #[test]
    fn a_missing_or_foreign_session_is_replaced() {
        let timing = Timing {
            duration_seconds: 3600,
            refresh_before_seconds: 600,
        };
        let now = at(EXPIRY - 3000);
        let expiry = at(EXPIRY).to_string();
        // First issue: nothing held.
        assert_eq!(
            renewal(&Held::default(), "files", "acme/", &timing, false, now),
            Renewal::Mint { why: None }
        );
        // A user-mode key (no token) is not a session.
        let mut h = held(&expiry);
        h.token = None;
        assert_eq!(
            renewal(&h, "files", "acme/", &timing, false, now),
            Renewal::Mint { why: None }
        );
        for (h, word) in [
            (
                Held {
                    expiry: Some("soon"),
                    ..held(&expiry)
                },
                "unreadable",
            ),
            (
                Held {
                    expiry: None,
                    ..held(&expiry)
                },
                "missing",
            ),
            (
                Held {
                    prefix: Some("other/"),
                    ..held(&expiry)
                },
                "another bucket or prefix",
            ),
            (
                Held {
                    bucket: Some("old"),
                    ..held(&expiry)
                },
                "another bucket or prefix",
            ),
        ] {
            match renewal(&h, "files", "acme/", &timing, false, now) {
                Renewal::Mint { why: Some(w) } => assert!(w.contains(word), "{w}"),
                other => panic!("{word}: {other:?}"),
            }
        }
        match renewal(&held(&expiry), "files", "acme/", &timing, true, now) {
            Renewal::Mint { why: Some(w) } => {
                assert!(
                    w.contains("rotation") && w.contains("cannot be revoked"),
                    "{w}"
                );
                assert!(w.contains(&expiry), "names when the old session ends: {w}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_expiry_round_trips_through_the_secret() {
        let t = at(EXPIRY);
        let text = t.to_string();
        assert!(text.ends_with('Z'), "RFC 3339 in UTC: {text}");
        let mut c = Credentials::default();
        c.set(KEY_CREDENTIAL_EXPIRATION, text);
        assert_eq!(Held::of(&c).expiry(), Some(t));
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(
            session_name(&OrgId::parse("acme").unwrap()).unwrap(),
            "acme"
        );
        let err = session_name(&OrgId::parse("a").unwrap()).unwrap_err();
        assert!(err.contains("orgId a") && err.contains("2 to 64"), "{err}");
        let longest = "a".repeat(crate::tenant::MAX_ORG_ID_LEN);
        assert!(session_name(&OrgId::parse(&longest).unwrap()).is_ok());
    }

    #[test]
    fn the_session_policy_fits_sts_for_the_longest_org_id() {
        assert!(check_policy_size("files", "{orgId}/").is_ok());
        let long_bucket = "b".repeat(63);
        assert!(check_policy_size(&long_bucket, "tenants/{orgId}/").is_ok());
        let huge = format!("{}/{{orgId}}/", "p".repeat(1500));
        let err = check_policy_size("files", &huge).unwrap_err();
        assert!(err.contains("2048"), "{err}");
    }
}
