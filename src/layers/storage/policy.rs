//! Pure IAM and bucket-policy documents: built with serde, compared as canonical JSON, and the
//! bucket guard merged into a policy the operator does not own by `Sid`.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::api::platform::GuardStyle;

/// `Sid` of the guard statement that fences objects outside the principal's own prefix.
pub const GUARD_SID: &str = "BulkheadTenantGuard";
/// `Sid` of the guard statement that fences bucket-level actions (listing outside the own prefix,
/// reading or writing the bucket policy).
pub const GUARD_BUCKET_SID: &str = "BulkheadTenantGuardBucket";
/// `Sid`s of the same two fences for the sessions of the shared role (`session` mode).
pub const GUARD_SESSION_SID: &str = "BulkheadTenantGuardSession";
pub const GUARD_SESSION_BUCKET_SID: &str = "BulkheadTenantGuardSessionBucket";
/// The statements the operator owns in the shared bucket policy, by `Sid`.
pub const GUARD_SIDS: [&str; 4] = [
    GUARD_SID,
    GUARD_BUCKET_SID,
    GUARD_SESSION_SID,
    GUARD_SESSION_BUCKET_SID,
];
/// The largest session policy STS accepts (AWS: 2,048 characters of plain text; SeaweedFS 4.48
/// refuses longer ones too).
pub const SESSION_POLICY_MAX_BYTES: usize = 2048;
/// IAM policy language version.
pub const POLICY_VERSION: &str = "2012-10-17";
/// Tag (and session tag) that names a principal's organization.
pub const ORG_TAG: &str = "org_id";
/// Policy variable holding an IAM user's name.
pub const USERNAME_VAR: &str = "${aws:username}";
/// Policy variable holding the principal's (or session's) `org_id` tag.
pub const ORG_TAG_VAR: &str = "${aws:PrincipalTag/org_id}";

/// Object-level actions an organization may perform under its own prefix. (SeaweedFS 4.48 refuses
/// `s3:ListMultipartUploadParts` in CreatePolicyVersion, so repairs could not restore it.)
pub const OBJECT_ACTIONS: &[&str] = &[
    "s3:AbortMultipartUpload",
    "s3:DeleteObject",
    "s3:GetObject",
    "s3:GetObjectTagging",
    "s3:PutObject",
    "s3:PutObjectTagging",
];

/// An IAM policy document.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PolicyDocument {
    #[serde(rename = "Version")]
    pub version: &'static str,
    #[serde(rename = "Statement")]
    pub statement: Vec<Statement>,
}

impl PolicyDocument {
    pub fn new(statement: Vec<Statement>) -> Self {
        Self {
            version: POLICY_VERSION,
            statement,
        }
    }

    /// Compact JSON, as sent to IAM.
    pub fn to_json(&self) -> String {
        serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// One statement. Fields left `None` are omitted.
#[derive(Serialize, Clone, Debug, PartialEq, Default)]
pub struct Statement {
    #[serde(rename = "Sid", skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(rename = "Effect")]
    pub effect: &'static str,
    #[serde(rename = "Principal", skip_serializing_if = "Option::is_none")]
    pub principal: Option<Value>,
    #[serde(rename = "Action")]
    pub action: Vec<String>,
    #[serde(rename = "Resource", skip_serializing_if = "Option::is_none")]
    pub resource: Option<Vec<String>>,
    #[serde(rename = "NotResource", skip_serializing_if = "Option::is_none")]
    pub not_resource: Option<Vec<String>>,
    #[serde(rename = "Condition", skip_serializing_if = "Option::is_none")]
    pub condition: Option<Value>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `arn:aws:s3:::{bucket}`.
pub fn bucket_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

/// Where a prefix (or a prefix pattern with a policy variable) lives, as an object ARN pattern.
fn objects_arn(bucket: &str, prefix: &str) -> String {
    format!("arn:aws:s3:::{bucket}/{prefix}*")
}

/// The two statements that scope an organization to `prefix`: object actions under it, and
/// `ListBucket` only when the listing prefix is inside it. `prefix` may hold a policy variable.
fn prefix_statements(bucket: &str, prefix: &str) -> Vec<Statement> {
    vec![
        Statement {
            sid: Some("OrgObjects".to_owned()),
            effect: "Allow",
            action: strings(OBJECT_ACTIONS),
            resource: Some(vec![objects_arn(bucket, prefix)]),
            ..Statement::default()
        },
        Statement {
            sid: Some("OrgList".to_owned()),
            effect: "Allow",
            action: vec!["s3:ListBucket".to_owned()],
            resource: Some(vec![bucket_arn(bucket)]),
            condition: Some(json!({ "StringLike": { "s3:prefix": [format!("{prefix}*")] } })),
            ..Statement::default()
        },
    ]
}

/// The permissions of one organization's IAM user or role: its own prefix, nothing else.
pub fn org_policy(bucket: &str, prefix: &str) -> PolicyDocument {
    PolicyDocument::new(prefix_statements(bucket, prefix))
}

/// The session policy of one organization's session in `session` mode: the same two statements
/// as a user's policy, for its own prefix only. STS grants the session the intersection of this
/// and the role's permissions.
pub fn session_policy(bucket: &str, prefix: &str) -> PolicyDocument {
    org_policy(bucket, prefix)
}

/// The shared tenant role's permissions in `abac` mode: the prefix named by the session's tag.
pub fn abac_policy(bucket: &str, prefix_template: &str) -> PolicyDocument {
    PolicyDocument::new(prefix_statements(
        bucket,
        &prefix_template.replace("{orgId}", ORG_TAG_VAR),
    ))
}

/// The guard statement for the shared bucket policy. Its size depends only on the platform, never
/// on the number of organizations.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketGuard {
    pub style: GuardStyle,
    pub account_id: String,
    pub bucket: String,
    pub prefix_template: String,
    pub iam_path: String,
    /// Principals keyed by IAM user name (user mode) or by `org_id` tag (role and abac modes).
    pub by_tag: bool,
    /// User names never subject to the guard (the operator itself, other services).
    pub exempt_users: Vec<String>,
    /// The role whose sessions are fenced too (`session` mode), besides the principals above.
    pub sessions: Option<SessionRole>,
}

/// The one role every organization's session is assumed from (`session` mode), from its ARN
/// `arn:{partition}:iam::{account}:role/{path}{name}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRole {
    pub arn: String,
    pub partition: String,
    pub account: String,
    pub name: String,
}

impl SessionRole {
    /// Parses and checks a role ARN.
    pub fn parse(arn: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "sessionRoleArn {arn:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>): {why}"
            ))
        };
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [scheme, partition, service, region, account, resource] = parts[..] else {
            return bad("it needs six ':'-separated fields");
        };
        if scheme != "arn" || service != "iam" || !region.is_empty() {
            return bad("it must start with arn:<partition>:iam::");
        }
        if partition.is_empty()
            || !partition
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
        {
            return bad("the partition is not valid");
        }
        if account.is_empty() || !account.chars().all(|c| c.is_ascii_digit()) {
            return bad("the account id must be digits");
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return bad("the resource must be role/<name>");
        };
        let name = path_and_name.rsplit('/').next().unwrap_or_default();
        let name_ok = (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
        let path_ok = path_and_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-/".contains(c));
        if !name_ok || !path_ok {
            return bad("the role name has 1-64 letters, digits or _+=,.@-");
        }
        Ok(Self {
            arn: arn.to_owned(),
            partition: partition.to_owned(),
            account: account.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The ARN STS gives the session named `session`, as `GetCallerIdentity` reports it.
    pub fn session_arn(&self, session: &str) -> String {
        format!(
            "arn:{}:sts::{}:assumed-role/{}/{session}",
            self.partition, self.account, self.name
        )
    }
}

impl BucketGuard {
    /// The two Deny statements, for any tenant principal: every action on objects outside its own
    /// prefix; and every bucket-level action unless it lists inside its own prefix.
    pub fn statements(&self) -> Vec<Statement> {
        let var = if self.by_tag {
            ORG_TAG_VAR
        } else {
            USERNAME_VAR
        };
        let own_prefix = self.prefix_template.replace("{orgId}", var);
        let own = objects_arn(&self.bucket, &own_prefix);
        let kind = if self.by_tag { "role" } else { "user" };
        let (principal, condition) = match self.style {
            // Servers that ignore IAM paths (SeaweedFS): every IAM user, minus the exemptions.
            GuardStyle::AllUsers => {
                let mut exempt = self.exempt_users.clone();
                exempt.sort();
                exempt.dedup();
                let mut condition = Map::new();
                if !exempt.is_empty() {
                    condition.insert(
                        "StringNotEquals".to_owned(),
                        json!({ "aws:username": exempt }),
                    );
                }
                (
                    json!({ "AWS": format!("arn:aws:iam::{}:{kind}/*", self.account_id) }),
                    condition,
                )
            }
            // AWS: wildcards are not allowed inside a Principal ARN, so match the tenant path.
            GuardStyle::PathCondition => {
                let mut condition = Map::new();
                condition.insert(
                    "ArnLike".to_owned(),
                    json!({ "aws:PrincipalArn": format!("arn:aws:iam::{}:{kind}{}*", self.account_id, self.iam_path) }),
                );
                (json!("*"), condition)
            }
        };
        let mut out = self
            .deny_outside(
                [GUARD_SID, GUARD_BUCKET_SID],
                principal,
                condition,
                own,
                &own_prefix,
            )
            .to_vec();
        if let Some(role) = &self.sessions {
            out.extend(self.session_statements(role));
        }
        out
    }

    /// Two Deny statements for `principal` (under `condition`): one on every object outside
    /// `own` (and anything but the bucket itself), and one on the bucket unless the listing's
    /// `s3:prefix` lies under `own_prefix`. A missing `s3:prefix` matches the negated operator,
    /// so whole-bucket listings and policy reads or writes are denied too.
    fn deny_outside(
        &self,
        [objects_sid, bucket_sid]: [&str; 2],
        principal: Value,
        condition: Map<String, Value>,
        own: String,
        own_prefix: &str,
    ) -> [Statement; 2] {
        let objects = Statement {
            sid: Some(objects_sid.to_owned()),
            effect: "Deny",
            principal: Some(principal.clone()),
            action: vec!["s3:*".to_owned()],
            resource: None,
            not_resource: Some(vec![own, bucket_arn(&self.bucket)]),
            condition: (!condition.is_empty()).then(|| Value::Object(condition.clone())),
        };
        let mut bucket_condition = condition;
        bucket_condition.insert(
            "StringNotLike".to_owned(),
            json!({ "s3:prefix": format!("{own_prefix}*") }),
        );
        let bucket = Statement {
            sid: Some(bucket_sid.to_owned()),
            effect: "Deny",
            principal: Some(principal),
            action: vec!["s3:*".to_owned()],
            resource: Some(vec![bucket_arn(&self.bucket)]),
            not_resource: None,
            condition: Some(Value::Object(bucket_condition)),
        };
        [objects, bucket]
    }

    /// The same two fences for the sessions of the shared role, whose session name is the
    /// organization's id. SeaweedFS names such a session in `Principal` by its assumed-role ARN
    /// and resolves `${aws:username}` to the session name (tested). AWS names it by the role's
    /// ARN in `aws:PrincipalArn` and has no variable for the session name, so there the session
    /// carries the tag `org_id` (not tested here: it needs an AWS account).
    fn session_statements(&self, role: &SessionRole) -> Vec<Statement> {
        let (principal, condition, var) = match self.style {
            GuardStyle::AllUsers => (
                json!({ "AWS": format!("arn:{}:sts::{}:assumed-role/{}/*", role.partition, role.account, role.name) }),
                Map::new(),
                USERNAME_VAR,
            ),
            GuardStyle::PathCondition => {
                let mut condition = Map::new();
                condition.insert(
                    "ArnEquals".to_owned(),
                    json!({ "aws:PrincipalArn": role.arn }),
                );
                (json!("*"), condition, ORG_TAG_VAR)
            }
        };
        let own_prefix = self.prefix_template.replace("{orgId}", var);
        self.deny_outside(
            [GUARD_SESSION_SID, GUARD_SESSION_BUCKET_SID],
            principal,
            condition,
            objects_arn(&self.bucket, &own_prefix),
            &own_prefix,
        )
        .to_vec()
    }

    pub fn statement_values(&self) -> Vec<Value> {
        self.statements()
            .iter()
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
            .collect()
    }
}

/// Trust policy of an organization's role: its ServiceAccount through the cluster's OIDC issuer,
/// and the operator (for probes).
pub fn role_trust_policy(
    account_id: &str,
    oidc_issuer: &str,
    namespace: &str,
    service_account: &str,
    operator_arn: &str,
) -> PolicyDocument {
    let issuer = oidc_issuer
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let mut cond = Map::new();
    cond.insert(
        format!("{issuer}:sub"),
        json!(format!(
            "system:serviceaccount:{namespace}:{service_account}"
        )),
    );
    cond.insert(format!("{issuer}:aud"), json!("sts.amazonaws.com"));
    PolicyDocument::new(vec![
        Statement {
            sid: Some("OrgServiceAccount".to_owned()),
            effect: "Allow",
            principal: Some(
                json!({ "Federated": format!("arn:aws:iam::{account_id}:oidc-provider/{issuer}") }),
            ),
            action: vec!["sts:AssumeRoleWithWebIdentity".to_owned()],
            condition: Some(json!({ "StringEquals": Value::Object(cond) })),
            ..Statement::default()
        },
        Statement {
            sid: Some("BulkheadProbe".to_owned()),
            effect: "Allow",
            principal: Some(json!({ "AWS": operator_arn })),
            action: vec!["sts:AssumeRole".to_owned()],
            ..Statement::default()
        },
    ])
}

/// Trust policy of the shared `abac` role: the principals that assume it on an organization's
/// behalf must tag the session with `org_id`, and only with it.
pub fn abac_trust_policy(trusted: &[String]) -> PolicyDocument {
    let mut principals: Vec<String> = trusted.to_vec();
    principals.sort();
    principals.dedup();
    PolicyDocument::new(vec![Statement {
        sid: Some("TaggedSessions".to_owned()),
        effect: "Allow",
        principal: Some(json!({ "AWS": principals })),
        action: vec!["sts:AssumeRole".to_owned(), "sts:TagSession".to_owned()],
        condition: Some(json!({
            "StringLike": { format!("aws:RequestTag/{ORG_TAG}"): "?*" },
            "ForAllValues:StringEquals": { "aws:TagKeys": [ORG_TAG] },
        })),
        ..Statement::default()
    }])
}

/// The principal to name in a trust policy for the caller `arn`: an assumed-role session is
/// trusted through its role.
pub fn trust_principal(arn: &str) -> String {
    if let Some(rest) = arn.strip_prefix("arn:aws:sts::")
        && let Some((account, tail)) = rest.split_once(":assumed-role/")
        && let Some((role, _session)) = tail.split_once('/')
    {
        return format!("arn:aws:iam::{account}:role/{role}");
    }
    arn.to_owned()
}

/// Decodes a policy document as IAM returns it (URL-encoded on AWS, plain on some servers).
pub fn decode_document(raw: &str) -> Result<Value, String> {
    let text = if raw.trim_start().starts_with('{') {
        raw.to_owned()
    } else {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|e| format!("policy document is not UTF-8: {e}"))?
            .into_owned()
    };
    serde_json::from_str(&text).map_err(|e| format!("policy document is not JSON: {e}"))
}

/// Canonical form for comparison: object keys sorted, a lone string equal to a one-element list,
/// string lists sorted and deduplicated (IAM treats them as sets).
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: std::collections::BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let mut s: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            s.sort_unstable();
            s.dedup();
            if s.len() == 1 { json!(s[0]) } else { json!(s) }
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Whether two documents mean the same, ignoring key order, whitespace and list order.
pub fn same_document(a: &Value, b: &Value) -> bool {
    canonical_string(a) == canonical_string(b)
}

fn canonical_string(v: &Value) -> String {
    // serde_json may preserve insertion order, so render the canonical form key by key.
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push(':');
                    write(&m[k.as_str()], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(&canonical(v), &mut out);
    out
}

/// State of the guard inside a bucket policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardState {
    InPlace,
    Missing,
    /// Present under its `Sid` but different from the plan (or present more than once).
    Edited,
}

impl GuardState {
    /// Audit finding in words, if any.
    pub fn finding(self) -> Option<String> {
        match self {
            Self::InPlace => None,
            Self::Missing => Some(format!(
                "the bucket policy has no guard statement ({GUARD_SID}*)"
            )),
            Self::Edited => Some(format!(
                "the bucket policy's guard statements ({GUARD_SID}*) were edited or removed"
            )),
        }
    }
}

/// A parsed bucket policy. Statements the operator does not own are kept verbatim.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketPolicy {
    root: Map<String, Value>,
    statements: Vec<Value>,
}

impl BucketPolicy {
    /// Parses the policy text; `None` means the bucket has no policy.
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
            let mut root = Map::new();
            root.insert("Version".to_owned(), json!(POLICY_VERSION));
            return Ok(Self {
                root,
                statements: Vec::new(),
            });
        };
        let value = decode_document(text)?;
        let Value::Object(mut root) = value else {
            return Err("the bucket policy is not a JSON object".to_owned());
        };
        let statements = match root.remove("Statement") {
            None => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(single @ Value::Object(_)) => vec![single],
            Some(_) => {
                return Err(
                    "the bucket policy's Statement is neither an object nor a list".to_owned(),
                );
            }
        };
        Ok(Self { root, statements })
    }

    fn is_guard(st: &Value) -> bool {
        st.get("Sid")
            .and_then(Value::as_str)
            .is_some_and(|sid| GUARD_SIDS.contains(&sid))
    }

    /// Whether the guard is there as planned: each planned statement exactly once, unchanged.
    pub fn guard_state(&self, guard: &[Value]) -> GuardState {
        let mine: Vec<&Value> = self
            .statements
            .iter()
            .filter(|s| Self::is_guard(s))
            .collect();
        if mine.is_empty() {
            return GuardState::Missing;
        }
        let intact = mine.len() == guard.len()
            && guard
                .iter()
                .all(|g| mine.iter().filter(|m| same_document(m, g)).count() == 1);
        if intact {
            GuardState::InPlace
        } else {
            GuardState::Edited
        }
    }

    /// Replaces every statement with a guard `Sid` by the planned guard, appended after the
    /// statements the operator does not own.
    pub fn with_guard(&self, guard: &[Value]) -> Self {
        let mut statements: Vec<Value> = self
            .statements
            .iter()
            .filter(|s| !Self::is_guard(s))
            .cloned()
            .collect();
        statements.extend(guard.iter().cloned());
        Self {
            root: self.root.clone(),
            statements,
        }
    }

    /// Statements the operator does not own, verbatim.
    pub fn foreign_statements(&self) -> Vec<&Value> {
        self.statements
            .iter()
            .filter(|s| !Self::is_guard(s))
            .collect()
    }

    pub fn to_json(&self) -> String {
        let mut root = self.root.clone();
        if !root.contains_key("Version") {
            root.insert("Version".to_owned(), json!(POLICY_VERSION));
        }
        root.insert(
            "Statement".to_owned(),
            Value::Array(self.statements.clone()),
        );
        Value::Object(root).to_string()
    }
}

/// What `prepare` must write to put the guard in place: `None` when it already is.
pub fn merge_guard(
    existing: Option<&str>,
    guard: &BucketGuard,
) -> Result<(GuardState, Option<String>), String> {
    let policy = BucketPolicy::parse(existing)?;
    let planned = guard.statement_values();
    let state = policy.guard_state(&planned);
    let write = (state != GuardState::InPlace).then(|| policy.with_guard(&planned).to_json());
    Ok((state, write))
}

/// Validates a prefix template: exactly one `{orgId}`, ends with `/`, and nothing a policy would
/// read as a wildcard or variable.
pub fn validate_prefix_template(template: &str) -> Result<(), String> {
    if template.matches("{orgId}").count() != 1 {
        return Err(format!(
            "prefixTemplate {template:?} must contain {{orgId}} exactly once"
        ));
    }
    if !template.ends_with('/') {
        return Err(format!("prefixTemplate {template:?} must end with '/'"));
    }
    if template.starts_with('/') {
        return Err(format!(
            "prefixTemplate {template:?} must not start with '/'"
        ));
    }
    // S3 servers backed by a file tree (SeaweedFS's filer) normalise `.`, `..` and `//`, so
    // such a segment could put one organization's prefix over another's or the bucket root.
    let path = template.replace("{orgId}", "x");
    if let Some(seg) = path
        .strip_suffix('/')
        .unwrap_or(&path)
        .split('/')
        .find(|seg| seg.is_empty() || *seg == "." || *seg == "..")
    {
        return Err(format!(
            "prefixTemplate {template:?} has the path segment {seg:?}; empty, '.' and '..' segments are not allowed"
        ));
    }
    let rest = template.replace("{orgId}", "");
    if let Some(bad) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.')))
    {
        return Err(format!(
            "prefixTemplate {template:?} contains {bad:?}; only letters, digits, '/', '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(style: GuardStyle) -> BucketGuard {
        BucketGuard {
            style,
            account_id: "000000000000".into(),
            bucket: "files".into(),
            prefix_template: "{orgId}/".into(),
            iam_path: "/bulkhead/".into(),
            by_tag: false,
            exempt_users: vec!["admin".into(), "admin".into(), "backup".into()],
            sessions: None,
        }
    }

    fn session_role() -> SessionRole {
        SessionRole::parse("arn:aws:iam::000000000000:role/tenants/bulkhead-sessions").unwrap()
    }

    #[test]
    fn org_policy_scopes_objects_and_listing_to_the_prefix() {
        let doc = org_policy("files", "acme/").to_value();
        assert_eq!(doc["Version"], POLICY_VERSION);
        assert_eq!(
            doc["Statement"][0]["Resource"],
            json!(["arn:aws:s3:::files/acme/*"])
        );
        assert_eq!(doc["Statement"][1]["Action"], json!(["s3:ListBucket"]));
        assert_eq!(
            doc["Statement"][1]["Resource"],
            json!(["arn:aws:s3:::files"])
        );
        assert_eq!(
            doc["Statement"][1]["Condition"],
            json!({"StringLike": {"s3:prefix": ["acme/*"]}})
        );
        let text = org_policy("files", "acme/").to_json();
        assert!(
            !text.contains("\"s3:*\""),
            "no wildcard action in a tenant's policy"
        );
    }

    #[test]
    fn abac_policy_uses_the_session_tag() {
        let text = abac_policy("files", "tenants/{orgId}/").to_json();
        assert!(text.contains("arn:aws:s3:::files/tenants/${aws:PrincipalTag/org_id}/*"));
        assert!(text.contains("\"tenants/${aws:PrincipalTag/org_id}/*\""));
    }

    #[test]
    fn session_policy_is_serialized_with_serde_and_scoped_to_the_prefix() {
        let text = session_policy("files", "tenants/acme/").to_json();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            doc,
            json!({"Version": POLICY_VERSION, "Statement": [
                {"Sid": "OrgObjects", "Effect": "Allow", "Action": OBJECT_ACTIONS,
                 "Resource": ["arn:aws:s3:::files/tenants/acme/*"]},
                {"Sid": "OrgList", "Effect": "Allow", "Action": ["s3:ListBucket"],
                 "Resource": ["arn:aws:s3:::files"],
                 "Condition": {"StringLike": {"s3:prefix": ["tenants/acme/*"]}}}
            ]})
        );
        assert!(!text.contains("\"s3:*\"") && !text.contains("\"*\""));
        assert!(
            !text.contains(' ') && !text.contains('\n'),
            "compact: {text}"
        );
        assert!(text.len() < SESSION_POLICY_MAX_BYTES);
    }

    #[test]
    fn session_role_arns_are_parsed_and_checked() {
        let r = session_role();
        assert_eq!(
            (r.partition.as_str(), r.account.as_str(), r.name.as_str()),
            ("aws", "000000000000", "bulkhead-sessions")
        );
        assert_eq!(
            r.session_arn("acme"),
            "arn:aws:sts::000000000000:assumed-role/bulkhead-sessions/acme",
            "the path is not part of an assumed-role ARN"
        );
        let cn = SessionRole::parse("arn:aws-cn:iam::123456789012:role/x").unwrap();
        assert_eq!(
            cn.session_arn("a1"),
            "arn:aws-cn:sts::123456789012:assumed-role/x/a1"
        );
        for bad in [
            "",
            "bulkhead-sessions",
            "arn:aws:iam::000000000000:user/admin",
            "arn:aws:sts::000000000000:assumed-role/x/y",
            "arn:aws:iam:us-east-1:000000000000:role/x",
            "arn:aws:iam::acct:role/x",
            "arn:aws:iam::000000000000:role/",
            "arn:aws:iam::000000000000:role/a b",
            "arn:aws:iam::000000000000:role/x\"",
            &format!("arn:aws:iam::000000000000:role/{}", "r".repeat(65)),
        ] {
            let err = SessionRole::parse(bad).unwrap_err();
            assert!(err.contains("sessionRoleArn"), "{bad}: {err}");
        }
    }

    #[test]
    fn guard_fences_the_sessions_of_the_shared_role_too() {
        let mut g = guard(GuardStyle::AllUsers);
        g.sessions = Some(session_role());
        let sts = g.statement_values();
        assert_eq!(sts.len(), 4);
        assert_eq!(
            sts[..2],
            guard(GuardStyle::AllUsers).statement_values()[..],
            "the users' fences stay as they are"
        );
        let (objects, bucket) = (&sts[2], &sts[3]);
        assert_eq!(objects["Sid"], GUARD_SESSION_SID);
        assert_eq!(
            objects["Principal"],
            json!({"AWS": "arn:aws:sts::000000000000:assumed-role/bulkhead-sessions/*"})
        );
        assert_eq!(
            objects["NotResource"],
            json!(["arn:aws:s3:::files/${aws:username}/*", "arn:aws:s3:::files"])
        );
        assert!(objects.get("Condition").is_none());
        assert_eq!(bucket["Sid"], GUARD_SESSION_BUCKET_SID);
        assert_eq!(
            bucket["Condition"],
            json!({"StringNotLike": {"s3:prefix": "${aws:username}/*"}})
        );
        // AWS: the role's ARN by condition, the prefix from the session tag.
        let mut g = guard(GuardStyle::PathCondition);
        g.sessions = Some(session_role());
        let sts = g.statement_values();
        assert_eq!(sts[2]["Principal"], json!("*"));
        assert_eq!(
            sts[2]["Condition"],
            json!({"ArnEquals": {"aws:PrincipalArn": "arn:aws:iam::000000000000:role/tenants/bulkhead-sessions"}})
        );
        assert_eq!(
            sts[2]["NotResource"][0],
            "arn:aws:s3:::files/${aws:PrincipalTag/org_id}/*"
        );
        assert_eq!(
            sts[3]["Condition"]["StringNotLike"]["s3:prefix"],
            "${aws:PrincipalTag/org_id}/*"
        );
        // Switching modes replaces the guard by Sid: no session statement is left behind.
        let (_, with) = merge_guard(None, &g).unwrap();
        let (state, without) =
            merge_guard(with.as_deref(), &guard(GuardStyle::PathCondition)).unwrap();
        assert_eq!(state, GuardState::Edited);
        let out: Value = serde_json::from_str(&without.unwrap()).unwrap();
        assert_eq!(out["Statement"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn guard_for_servers_without_paths_names_every_user_and_exempts_the_operator() {
        let sts = guard(GuardStyle::AllUsers).statement_values();
        assert_eq!(sts.len(), 2);
        let (objects, bucket) = (&sts[0], &sts[1]);
        assert_eq!(objects["Sid"], GUARD_SID);
        assert_eq!(objects["Effect"], "Deny");
        assert_eq!(
            objects["Principal"],
            json!({"AWS": "arn:aws:iam::000000000000:user/*"})
        );
        assert_eq!(objects["Action"], json!(["s3:*"]));
        assert_eq!(
            objects["NotResource"],
            json!(["arn:aws:s3:::files/${aws:username}/*", "arn:aws:s3:::files"])
        );
        assert_eq!(
            objects["Condition"],
            json!({"StringNotEquals": {"aws:username": ["admin", "backup"]}})
        );
        assert_eq!(bucket["Sid"], GUARD_BUCKET_SID);
        assert_eq!(bucket["Resource"], json!(["arn:aws:s3:::files"]));
        assert_eq!(
            bucket["Condition"],
            json!({"StringNotEquals": {"aws:username": ["admin", "backup"]}, "StringNotLike": {"s3:prefix": "${aws:username}/*"}})
        );
    }

    #[test]
    fn guard_for_aws_matches_the_tenant_path_by_condition() {
        let sts = guard(GuardStyle::PathCondition).statement_values();
        assert_eq!(sts[0]["Principal"], json!("*"));
        assert_eq!(
            sts[0]["Condition"],
            json!({"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::000000000000:user/bulkhead/*"}})
        );
        assert_eq!(
            sts[1]["Condition"]["ArnLike"],
            sts[0]["Condition"]["ArnLike"]
        );
        let mut g = guard(GuardStyle::PathCondition);
        g.by_tag = true;
        let sts = g.statement_values();
        assert_eq!(
            sts[0]["NotResource"][0],
            "arn:aws:s3:::files/${aws:PrincipalTag/org_id}/*"
        );
        assert_eq!(
            sts[0]["Condition"]["ArnLike"]["aws:PrincipalArn"],
            "arn:aws:iam::000000000000:role/bulkhead/*"
        );
        assert_eq!(
            sts[1]["Condition"]["StringNotLike"]["s3:prefix"],
            "${aws:PrincipalTag/org_id}/*"
        );
    }

    #[test]
    fn guard_size_does_not_depend_on_the_number_of_organizations() {
        // The guard takes no organization as input at all; the merged policy is the same for 1 or 10,000.
        let g = guard(GuardStyle::AllUsers);
        let (_, once) = merge_guard(None, &g).unwrap();
        let once = once.unwrap();
        let (state, again) = merge_guard(Some(&once), &g).unwrap();
        assert_eq!(state, GuardState::InPlace);
        assert!(again.is_none());
        assert!(once.len() < 1000, "{}", once.len());
    }

    #[test]
    fn merge_keeps_foreign_statements_verbatim_and_replaces_only_the_guard() {
        let g = guard(GuardStyle::AllUsers);
        let existing = json!({
            "Version": "2012-10-17",
            "Id": "operator-policy",
            "Statement": [
                {"Sid": "PublicRead", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::files/public/*"},
                {"Sid": GUARD_SID, "Effect": "Deny", "Principal": "*", "Action": "s3:*", "Resource": "arn:aws:s3:::files/*"},
                {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:user/backup"}, "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": ["arn:aws:s3:::files", "arn:aws:s3:::files/*"]}
            ]
        })
        .to_string();
        let (state, out) = merge_guard(Some(&existing), &g).unwrap();
        assert_eq!(state, GuardState::Edited);
        let out: Value = serde_json::from_str(&out.unwrap()).unwrap();
        assert_eq!(out["Id"], "operator-policy");
        let sts = out["Statement"].as_array().unwrap();
        assert_eq!(sts.len(), 4);
        assert_eq!(sts[0]["Sid"], "PublicRead");
        assert_eq!(
            sts[0]["Action"], "s3:GetObject",
            "foreign statements are not normalized"
        );
        assert!(sts[1].get("Sid").is_none());
        assert_eq!(sts[2..].to_vec(), g.statement_values());
    }

    #[test]
    fn a_single_statement_object_is_accepted() {
        let existing = json!({"Version": "2012-10-17", "Statement": {"Sid": "X", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::files/p/*"}}).to_string();
        let (state, out) = merge_guard(Some(&existing), &guard(GuardStyle::AllUsers)).unwrap();
        assert_eq!(state, GuardState::Missing);
        let out: Value = serde_json::from_str(&out.unwrap()).unwrap();
        assert_eq!(out["Statement"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn reordering_and_whitespace_never_cause_an_update() {
        let g = guard(GuardStyle::AllUsers);
        let sts = g.statement_values();
        let st = &sts[0];
        // Keys reversed, lists reversed, lone strings for one-element lists, pretty-printed, statements swapped.
        let reordered = format!(
            "{{\n  \"Statement\" : [ {}, {{ \"Condition\": {{\"StringNotEquals\": {{\"aws:username\": [\"backup\", \"admin\"]}}}},\n \"NotResource\": [{}, {}], \"Action\": \"s3:*\", \"Principal\": {{\"AWS\": [{}]}}, \"Effect\": \"Deny\", \"Sid\": \"{GUARD_SID}\" }} ],\n \"Version\": \"2012-10-17\" }}",
            serde_json::to_string_pretty(&sts[1]).unwrap(),
            st["NotResource"][1],
            st["NotResource"][0],
            st["Principal"]["AWS"]
        );
        let (state, write) = merge_guard(Some(&reordered), &g).unwrap();
        assert_eq!(state, GuardState::InPlace);
        assert!(write.is_none());
    }

    #[test]
    fn edits_removals_and_duplicates_are_detected() {
        let g = guard(GuardStyle::AllUsers);
        let sts = g.statement_values();
        let mut edited = sts[0].clone();
        edited["NotResource"] = json!(["arn:aws:s3:::files/*"]);
        let policy = json!({"Version": "2012-10-17", "Statement": [edited, sts[1]]}).to_string();
        assert_eq!(
            merge_guard(Some(&policy), &g).unwrap().0,
            GuardState::Edited
        );
        let half = json!({"Version": "2012-10-17", "Statement": [sts[0]]}).to_string();
        assert_eq!(
            merge_guard(Some(&half), &g).unwrap().0,
            GuardState::Edited,
            "one of two removed"
        );
        let dup =
            json!({"Version": "2012-10-17", "Statement": [sts[0], sts[1], sts[0]]}).to_string();
        let (state, write) = merge_guard(Some(&dup), &g).unwrap();
        assert_eq!(state, GuardState::Edited);
        let out: Value = serde_json::from_str(&write.unwrap()).unwrap();
        assert_eq!(out["Statement"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn unreadable_policies_are_refused_not_overwritten() {
        assert!(merge_guard(Some("not json"), &guard(GuardStyle::AllUsers)).is_err());
        assert!(merge_guard(Some("[1,2]"), &guard(GuardStyle::AllUsers)).is_err());
        assert!(merge_guard(Some(r#"{"Statement": 3}"#), &guard(GuardStyle::AllUsers)).is_err());
    }

    #[test]
    fn url_encoded_documents_decode() {
        let doc = org_policy("files", "acme/").to_json();
        let encoded =
            percent_encoding::utf8_percent_encode(&doc, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        assert!(same_document(
            &decode_document(&encoded).unwrap(),
            &org_policy("files", "acme/").to_value()
        ));
    }

    #[test]
    fn widened_documents_differ() {
        let planned = org_policy("files", "acme/").to_value();
        let mut widened = planned.clone();
        widened["Statement"][0]["Resource"] = json!("arn:aws:s3:::files/*");
        assert!(!same_document(&planned, &widened));
    }

    #[test]
    fn trust_policies_are_well_formed() {
        let t = role_trust_policy(
            "123456789012",
            "https://oidc.example.test/id/ABC/",
            "org-acme",
            "app",
            "arn:aws:iam::123456789012:role/bulkhead",
        )
        .to_value();
        assert_eq!(
            t["Statement"][0]["Principal"]["Federated"],
            "arn:aws:iam::123456789012:oidc-provider/oidc.example.test/id/ABC"
        );
        assert_eq!(
            t["Statement"][0]["Condition"]["StringEquals"]["oidc.example.test/id/ABC:sub"],
            "system:serviceaccount:org-acme:app"
        );
        let a = abac_trust_policy(&[
            "arn:aws:iam::1:role/b".into(),
            "arn:aws:iam::1:role/a".into(),
        ])
        .to_value();
        assert_eq!(
            a["Statement"][0]["Principal"]["AWS"],
            json!(["arn:aws:iam::1:role/a", "arn:aws:iam::1:role/b"])
        );
        assert_eq!(
            a["Statement"][0]["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"],
            json!(["org_id"])
        );
    }

    #[test]
    fn assumed_role_sessions_are_trusted_through_their_role() {
        assert_eq!(
            trust_principal("arn:aws:sts::123:assumed-role/operator/pod-1"),
            "arn:aws:iam::123:role/operator"
        );
        assert_eq!(
            trust_principal("arn:aws:iam::123:user/admin"),
            "arn:aws:iam::123:user/admin"
        );
    }

    #[test]
    fn prefix_templates_are_validated() {
        for ok in ["{orgId}/", "tenants/{orgId}/", "t_1.{orgId}-x/"] {
            assert!(validate_prefix_template(ok).is_ok(), "{ok}");
        }
        for bad in [
            "{orgId}",
            "tenants/",
            "{orgId}/{orgId}/",
            "/{orgId}/",
            "t*/{orgId}/",
            "${x}/{orgId}/",
            "a b/{orgId}/",
            "t\"/{orgId}/",
        ] {
            assert!(validate_prefix_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_templates_with_dot_or_empty_segments_are_refused() {
        // Shrunk counterexample of the storage property test.
        for bad in [
            "{orgId}.bulkhead/./",
            "{orgId}/../",
            "../{orgId}/",
            "./{orgId}/",
            "{orgId}//",
            "a//{orgId}/",
        ] {
            let err = validate_prefix_template(bad).unwrap_err();
            assert!(err.contains("segment"), "{bad}: {err}");
        }
        for ok in ["{orgId}../", "..{orgId}/", "a.b/{orgId}/", ".x/{orgId}/"] {
            assert!(validate_prefix_template(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn odd_org_ids_render_valid_json() {
        for id in ["0", "a-b-c", "9-9", &"z".repeat(63)] {
            let doc = org_policy("files", &format!("{id}/")).to_json();
            let back: Value = serde_json::from_str(&doc).unwrap();
            assert_eq!(
                back["Statement"][0]["Resource"][0],
                format!("arn:aws:s3:::files/{id}/*")
            );
        }
    }
}
