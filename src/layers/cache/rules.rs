//! The pure half of the cache layer: validated settings, the ACL rule plan for one organization,
//! the parsed `ACL GETUSER` reply and the drift between the two. No I/O here.

use std::collections::BTreeSet;
use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use redis::Value;
use sha2::{Digest, Sha256};

use crate::api::platform::CachePlatform;
use crate::tenant::{OrgId, SENTINEL_ORG_ID};

/// Longest rendered key or channel prefix accepted.
pub const MAX_PREFIX_LEN: usize = 128;
/// Longest user-name prefix accepted.
pub const MAX_USER_PREFIX_LEN: usize = 64;
/// Key (under the organization's prefix) of each organization's canary.
pub const CANARY_SUFFIX: &str = "canary";
/// Value stored in every canary; probes never need to read it back, only to be refused.
pub const CANARY_VALUE: &str =
    "bulkhead canary: reading this from another organization is a breach";

/// Characters that are special in Redis glob patterns or ACL rule syntax.
const GLOB_CHARACTERS: &[char] = &['*', '?', '[', ']', '\\', '{', '}'];

/// An ACL command category. Only these typed values ever become `+@`/`-@` rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    All,
    String,
    Hash,
    List,
    Set,
    SortedSet,
    Stream,
    Bitmap,
    HyperLogLog,
    Geo,
    PubSub,
    Transaction,
    Scripting,
    Admin,
    Dangerous,
}

impl Category {
    /// The category's name as Redis spells it after `@`.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::String => "string",
            Self::Hash => "hash",
            Self::List => "list",
            Self::Set => "set",
            Self::SortedSet => "sortedset",
            Self::Stream => "stream",
            Self::Bitmap => "bitmap",
            Self::HyperLogLog => "hyperloglog",
            Self::Geo => "geo",
            Self::PubSub => "pubsub",
            Self::Transaction => "transaction",
            Self::Scripting => "scripting",
            Self::Admin => "admin",
            Self::Dangerous => "dangerous",
        }
    }
}

/// A command, or one subcommand of a container command (`client|setname`). Built only from the
/// constant tables below, never from input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Command {
    pub name: &'static str,
    pub sub: Option<&'static str>,
}

impl Command {
    pub const fn new(name: &'static str) -> Self {
        Self { name, sub: None }
    }
    pub const fn sub(name: &'static str, sub: &'static str) -> Self {
        Self {
            name,
            sub: Some(sub),
        }
    }
    /// `name` or `name|sub`, as ACL rules and NOPERM replies spell it.
    pub fn spelled(&self) -> String {
        match self.sub {
            Some(s) => format!("{}|{s}", self.name),
            None => self.name.to_owned(),
        }
    }
}

/// What one command rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleTarget {
    Category(Category),
    Command(Command),
}

/// One command rule of the profile: allow (`+`) or deny (`-`) a category or a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandRule {
    Allow(RuleTarget),
    Deny(RuleTarget),
}

impl CommandRule {
    /// The rule as one `ACL SETUSER` argument.
    pub fn render(&self) -> String {
        let (sign, target) = match self {
            Self::Allow(t) => ('+', t),
            Self::Deny(t) => ('-', t),
        };
        match target {
            RuleTarget::Category(c) => format!("{sign}@{}", c.name()),
            RuleTarget::Command(c) => format!("{sign}{}", c.spelled()),
        }
    }
}

/// Data-type categories an application needs. Every command in them names its keys (or
/// channels, for pub/sub), so the key and channel patterns apply to all of them, including ones a
/// newer Redis adds. Broad categories (`@read`, `@write`, `@keyspace`, `@connection`, `@fast`,
/// `@slow`) are never granted: modules and new keyspace-wide commands land there.
pub const ALLOWED_CATEGORIES: &[Category] = &[
    Category::String,
    Category::Hash,
    Category::List,
    Category::Set,
    Category::SortedSet,
    Category::Stream,
    Category::Bitmap,
    Category::HyperLogLog,
    Category::Geo,
    Category::PubSub,
    Category::Transaction,
];

/// Single commands an application needs outside the data-type categories: per-key keyspace
/// commands (expiry, delete, rename, type), the caller's own connection, and cluster topology
/// for cluster-aware clients. Each touches only named keys or the caller's connection.
pub const ALLOWED_COMMANDS: &[Command] = &[
    Command::new("del"),
    Command::new("unlink"),
    Command::new("exists"),
    Command::new("type"),
    Command::new("touch"),
    Command::new("rename"),
    Command::new("renamenx"),
    Command::new("expire"),
    Command::new("pexpire"),
    Command::new("expireat"),
    Command::new("pexpireat"),
    Command::new("expiretime"),
    Command::new("pexpiretime"),
    Command::new("ttl"),
    Command::new("pttl"),
    Command::new("persist"),
    Command::new("object"),
    Command::new("ping"),
    Command::new("echo"),
    Command::new("auth"),
    Command::new("hello"),
    Command::new("quit"),
    Command::new("time"),
    Command::new("command"),
    Command::new("readonly"),
    Command::new("readwrite"),
    Command::new("asking"),
    Command::sub("cluster", "slots"),
    Command::sub("cluster", "shards"),
    Command::sub("cluster", "nodes"),
    Command::sub("cluster", "myid"),
    Command::sub("cluster", "info"),
    Command::sub("cluster", "keyslot"),
];

/// Categories taken away after the allowed ones, whatever a Redis version puts in the data-type
/// categories (`SORT` with `BY`/`GET` patterns, `PFDEBUG`, `PFSELFTEST`).
pub const DENIED_CATEGORIES: &[Category] = &[Category::Admin, Category::Dangerous];

/// Commands denied to every organization after the allowed ones, whatever the category
/// membership on a given Redis version: keyspace-wide and introspection commands, other logical
/// databases, server administration, and the cluster's key listing (on a cluster
/// `CLUSTER GETKEYSINSLOT`/`COUNTKEYSINSLOT` list and count other organizations' keys).
pub const DENIED_COMMANDS: &[Command] = &[
    Command::new("keys"),
    Command::new("scan"),
    Command::new("randomkey"),
    Command::new("dbsize"),
    Command::new("select"),
    Command::new("swapdb"),
    Command::new("move"),
    Command::new("copy"),
    Command::new("flushall"),
    Command::new("flushdb"),
    Command::new("config"),
    Command::new("info"),
    Command::new("monitor"),
    Command::new("client"),
    Command::new("debug"),
    Command::new("migrate"),
    Command::new("pubsub"),
    Command::new("function"),
    Command::new("script"),
    Command::new("acl"),
    Command::new("memory"),
    Command::new("latency"),
    Command::new("slowlog"),
    Command::sub("cluster", "getkeysinslot"),
    Command::sub("cluster", "countkeysinslot"),
];

/// Per-connection CLIENT subcommands that client libraries send on connect; they touch only the
/// caller's own connection.
pub const ALLOWED_CLIENT_SUBCOMMANDS: &[Command] = &[
    Command::sub("client", "setname"),
    Command::sub("client", "getname"),
    Command::sub("client", "id"),
];

/// Key namespace of the owner records (`bulkhead:owner:{orgId}` -> owning Organization UID). No
/// organization's key or channel prefix may overlap it, so no tenant user can read or forge one.
pub const OWNER_RECORD_NAMESPACE: &str = "bulkhead:owner:";

/// The value of `adopt_from` that takes over state with no owner record (made before owner
/// records existed).
pub const ADOPT_LEGACY: &str = "legacy";

/// Whether keys starting with `prefix` can include owner records (or the other way round): two
/// literal prefixes overlap exactly when one starts with the other.
pub fn overlaps_owner_records(prefix: &str) -> bool {
    prefix.starts_with(OWNER_RECORD_NAMESPACE) || OWNER_RECORD_NAMESPACE.starts_with(prefix)
}

/// Why a setting or an organization id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{field} {value:?} must contain {{orgId}} exactly once")]
    TemplateWithoutOrgId { field: &'static str, value: String },
    #[error(
        "{field} {value:?}: the character after {{orgId}} must be one an org id cannot contain (e.g. ':'), or one organization's pattern would match another's keys"
    )]
    AmbiguousTemplate { field: &'static str, value: String },
    #[error(
        "{field} {value:?} contains {bad:?}; allowed are letters, digits and ':', '.', '_', '-', '/', '|', '@', '#', '='"
    )]
    BadCharacter {
        field: &'static str,
        value: String,
        bad: char,
    },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("org id {0:?} is not valid: {1}")]
    BadOrgId(String, String),
    #[error(
        "{field} {value:?} places every organization's prefix inside the owner records' namespace {OWNER_RECORD_NAMESPACE:?}"
    )]
    TemplateCoversOwnerRecords { field: &'static str, value: String },
    #[error(
        "org id {org:?}: its {field} {prefix:?} overlaps the owner records' namespace {OWNER_RECORD_NAMESPACE:?}; its user could read or forge which Organization owns an org id"
    )]
    PrefixCoversOwnerRecords {
        org: String,
        field: &'static str,
        prefix: String,
    },
}

/// True for characters allowed in a rendered key or channel prefix (the CRD's pattern).
fn prefix_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-' | '/' | '|' | '@' | '#' | '=')
}

/// Checks a rendered prefix: no glob or ACL-syntax characters, no whitespace, bounded length.
pub fn check_prefix(field: &'static str, value: &str) -> Result<(), RuleError> {
    if value.is_empty() {
        return Err(RuleError::Empty { field });
    }
    if value.len() > MAX_PREFIX_LEN {
        return Err(RuleError::TooLong {
            field,
            max: MAX_PREFIX_LEN,
        });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| GLOB_CHARACTERS.contains(c) || !prefix_char_ok(*c))
    {
        return Err(RuleError::BadCharacter {
            field,
            value: value.to_owned(),
            bad,
        });
    }
    Ok(())
}

/// Checks a prefix template: `{orgId}` once, followed by a character no org id holds (so no
/// organization's pattern is a prefix of another's), and safe characters everywhere else.
pub fn check_template(field: &'static str, template: &str) -> Result<(), RuleError> {
    let Some((before, after)) = template.split_once("{orgId}") else {
        return Err(RuleError::TemplateWithoutOrgId {
            field,
            value: template.to_owned(),
        });
    };
    if after.contains("{orgId}") {
        return Err(RuleError::TemplateWithoutOrgId {
            field,
            value: template.to_owned(),
        });
    }
    match after.chars().next() {
        Some(c) if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') => {}
        _ => {
            return Err(RuleError::AmbiguousTemplate {
                field,
                value: template.to_owned(),
            });
        }
    }
    let rest = format!("{before}{after}");
    if let Some(bad) = rest
        .chars()
        .find(|c| GLOB_CHARACTERS.contains(c) || !prefix_char_ok(*c))
    {
        return Err(RuleError::BadCharacter {
            field,
            value: template.to_owned(),
            bad,
        });
    }
    // Every org's prefix would start with the owner namespace.
    if before.starts_with(OWNER_RECORD_NAMESPACE) {
        return Err(RuleError::TemplateCoversOwnerRecords {
            field,
            value: template.to_owned(),
        });
    }
    // The longest org id must still fit.
    check_prefix(
        field,
        &template.replace("{orgId}", &"a".repeat(crate::tenant::MAX_ORG_ID_LEN)),
    )
}

/// Refuses an organization whose rendered prefix overlaps the owner records' namespace.
fn check_owner_namespace(org: &OrgId, field: &'static str, prefix: &str) -> Result<(), RuleError> {
    if overlaps_owner_records(prefix) {
        return Err(RuleError::PrefixCoversOwnerRecords {
            org: org.as_str().to_owned(),
            field,
            prefix: prefix.to_owned(),
        });
    }
    Ok(())
}

/// Checks the user-name prefix: non-empty, letters, digits, '-', '_', '.'.
pub fn check_user_prefix(prefix: &str) -> Result<(), RuleError> {
    const FIELD: &str = "userPrefix";
    if prefix.is_empty() {
        return Err(RuleError::Empty { field: FIELD });
    }
    if prefix.len() > MAX_USER_PREFIX_LEN {
        return Err(RuleError::TooLong {
            field: FIELD,
            max: MAX_USER_PREFIX_LEN,
        });
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(RuleError::BadCharacter {
            field: FIELD,
            value: prefix.to_owned(),
            bad,
        });
    }
    Ok(())
}

/// Re-validates an org id in this layer (defence in depth: the CRD and `OrgId` check it too).
/// The sentinel id is accepted here: its canaries and reference user live under the same rules.
pub fn checked_org(raw: &str) -> Result<OrgId, RuleError> {
    if raw == SENTINEL_ORG_ID {
        return Ok(OrgId::sentinel());
    }
    let org = OrgId::parse(raw).map_err(|e| RuleError::BadOrgId(raw.to_owned(), e.to_string()))?;
    if org.as_str().chars().any(|c| GLOB_CHARACTERS.contains(&c)) {
        return Err(RuleError::BadOrgId(
            raw.to_owned(),
            "glob character".to_owned(),
        ));
    }
    Ok(org)
}

/// The platform's cache settings, validated once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheRules {
    key_template: String,
    channel_template: String,
    user_prefix: String,
    allow_scripting: bool,
}

impl CacheRules {
    pub fn from_spec(spec: &CachePlatform) -> Result<Self, RuleError> {
        check_template("keyPrefix", &spec.key_prefix)?;
        check_template("channelPrefix", &spec.channel_prefix)?;
        check_user_prefix(&spec.user_prefix)?;
        Ok(Self {
            key_template: spec.key_prefix.clone(),
            channel_template: spec.channel_prefix.clone(),
            user_prefix: spec.user_prefix.clone(),
            allow_scripting: spec.allow_scripting,
        })
    }

    pub fn allow_scripting(&self) -> bool {
        self.allow_scripting
    }

    /// The organization's key prefix, re-checked after rendering.
    pub fn key_prefix(&self, org: &OrgId) -> Result<String, RuleError> {
        let org = checked_org(org.as_str())?;
        let p = crate::tenant::render_template(&self.key_template, &org);
        check_prefix("keyPrefix", &p)?;
        check_owner_namespace(&org, "keyPrefix", &p)?;
        Ok(p)
    }

    /// The organization's channel prefix, re-checked after rendering.
    pub fn channel_prefix(&self, org: &OrgId) -> Result<String, RuleError> {
        let org = checked_org(org.as_str())?;
        let p = crate::tenant::render_template(&self.channel_template, &org);
        check_prefix("channelPrefix", &p)?;
        check_owner_namespace(&org, "channelPrefix", &p)?;
        Ok(p)
    }

    /// The ACL user owned by bulkhead for `org`; the prefix keeps it apart from other users.
    pub fn user_name(&self, org: &OrgId) -> String {
        format!("{}{}", self.user_prefix, org.as_str())
    }

    /// Name of the switched-off reference user whose `ACL GETUSER` command description is the
    /// expected description for every organization (the server's own normalisation of the profile).
    pub fn reference_user(&self) -> String {
        self.user_name(&OrgId::sentinel())
    }

    /// The key of `org`'s canary.
    pub fn canary_key(&self, org: &OrgId) -> Result<String, RuleError> {
        Ok(format!("{}{CANARY_SUFFIX}", self.key_prefix(org)?))
    }

    /// `SCAN MATCH` pattern for all of `org`'s keys: the validated literal prefix then `*`.
    pub fn scan_pattern(&self, org: &OrgId) -> Result<String, RuleError> {
        Ok(format!("{}*", self.key_prefix(org)?))
    }

    /// The command profile, typed: deny everything, allow the data-type categories and the
    /// listed commands, then deny the dangerous ones again (scripting only when the platform
    /// allows it), and finally allow the per-connection CLIENT subcommands.
    pub fn command_rules(&self) -> Vec<CommandRule> {
        use RuleTarget::{Category as Cat, Command as Cmd};
        let mut out = vec![CommandRule::Deny(Cat(Category::All))];
        out.extend(
            ALLOWED_CATEGORIES
                .iter()
                .map(|c| CommandRule::Allow(Cat(*c))),
        );
        if self.allow_scripting {
            out.push(CommandRule::Allow(Cat(Category::Scripting)));
        }
        out.extend(ALLOWED_COMMANDS.iter().map(|c| CommandRule::Allow(Cmd(*c))));
        out.extend(DENIED_CATEGORIES.iter().map(|c| CommandRule::Deny(Cat(*c))));
        if !self.allow_scripting {
            out.push(CommandRule::Deny(Cat(Category::Scripting)));
        }
        out.extend(DENIED_COMMANDS.iter().map(|c| CommandRule::Deny(Cmd(*c))));
        out.extend(
            ALLOWED_CLIENT_SUBCOMMANDS
                .iter()
                .map(|c| CommandRule::Allow(Cmd(*c))),
        );
        out
    }

    /// The command profile, as separate ACL rules.
    pub fn command_profile(&self) -> Vec<String> {
        self.command_rules()
            .iter()
            .map(CommandRule::render)
            .collect()
    }

    /// The key of `org`'s owner record, outside every organization's key prefix.
    pub fn owner_record_key(&self, org: &OrgId) -> Result<String, RuleError> {
        let org = checked_org(org.as_str())?;
        // Both prefixes are checked against the namespace: an org whose prefix overlaps it
        // never gets a record or a user.
        self.key_prefix(&org)?;
        self.channel_prefix(&org)?;
        Ok(format!("{OWNER_RECORD_NAMESPACE}{}", org.as_str()))
    }

    /// The plan for `org` with the password whose SHA-256 is `password_sha256`.
    pub fn plan(&self, org: &OrgId, password_sha256: &str) -> Result<AclPlan, RuleError> {
        let key_prefix = self.key_prefix(org)?;
        let channel_prefix = self.channel_prefix(org)?;
        Ok(AclPlan {
            user: self.user_name(org),
            key_pattern: format!("{key_prefix}*"),
            channel_pattern: format!("{channel_prefix}*"),
            password_sha256: Some(password_sha256.to_ascii_lowercase()),
            enabled: true,
            profile: self.command_profile(),
        })
    }

    /// The key, beside the sentinel's canary, that holds [`reference_fingerprint`] of the
    /// reference user last written: a start that finds it current writes nothing.
    pub fn reference_key(&self) -> Result<String, RuleError> {
        Ok(format!(
            "{}{REFERENCE_SUFFIX}",
            self.key_prefix(&OrgId::sentinel())?
        ))
    }

    /// The reference user's plan: switched off, no password, the sentinel's patterns.
    pub fn reference_plan(&self) -> Result<AclPlan, RuleError> {
        let org = OrgId::sentinel();
        Ok(AclPlan {
            user: self.reference_user(),
            key_pattern: format!("{}*", self.key_prefix(&org)?),
            channel_pattern: format!("{}*", self.channel_prefix(&org)?),
            password_sha256: None,
            enabled: false,
            profile: self.command_profile(),
        })
    }
}

/// Last part of [`CacheRules::reference_key`].
pub const REFERENCE_SUFFIX: &str = "reference-profile";

/// Lowercase hex SHA-256 of the rules an `ACL SETUSER` of `plan` sends (one per line).
pub fn reference_fingerprint(plan: &AclPlan) -> String {
    hex::encode(Sha256::digest(plan.setuser_rules().join("\n").as_bytes()))
}

/// Whether the reference user found on a node can stand for `plan` without being written
/// again: the recorded fingerprint is `plan`'s, and the user is still switched off, without a
/// password, with exactly the plan's patterns and no selectors. Its command description is
/// the server's own and cannot be judged here; a tampered one shows as command drift on every
/// organization, and `ensure` then writes the reference again before repairing anything.
pub fn reference_is_current(plan: &AclPlan, user: &AclUser, fingerprint: Option<&str>) -> bool {
    fingerprint == Some(reference_fingerprint(plan).as_str())
        && user.flags.contains("off")
        && !user.flags.contains("on")
        && !user.flags.contains("nopass")
        && user.passwords.is_empty()
        && user.selectors == 0
        && user.keys == BTreeSet::from([plan.key_pattern.clone()])
        && user.channels == BTreeSet::from([plan.channel_pattern.clone()])
}

/// The desired state of one organization's ACL user.
#[derive(Clone, PartialEq, Eq)]
pub struct AclPlan {
    pub user: String,
    pub key_pattern: String,
    pub channel_pattern: String,
    /// Lowercase hex SHA-256 of the password; `None` means no password at all (cannot log in).
    pub password_sha256: Option<String>,
    pub enabled: bool,
    pub profile: Vec<String>,
}

impl fmt::Debug for AclPlan {
    // The hash is not the password, but it is still not for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AclPlan")
            .field("user", &self.user)
            .field("key_pattern", &self.key_pattern)
            .field("channel_pattern", &self.channel_pattern)
            .field("enabled", &self.enabled)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl AclPlan {
    /// The rules of `ACL SETUSER <user> ...`, one argument each, starting from `reset`. The
    /// password is given as `#<sha256>` so the plaintext never reaches the server's command log.
    pub fn setuser_rules(&self) -> Vec<String> {
        let mut out = vec![
            "reset".to_owned(),
            if self.enabled { "on" } else { "off" }.to_owned(),
        ];
        if let Some(h) = &self.password_sha256 {
            out.push(format!("#{h}"));
        }
        out.push(format!("~{}", self.key_pattern));
        out.push(format!("&{}", self.channel_pattern));
        out.extend(self.profile.iter().cloned());
        out
    }
}

/// Lowercase hex SHA-256 of a password, as `ACL GETUSER` reports it.
pub fn password_sha256(password: &str) -> String {
    hex::encode(Sha256::digest(password.as_bytes()))
}

/// An ACL user as `ACL GETUSER` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclUser {
    pub flags: BTreeSet<String>,
    pub passwords: BTreeSet<String>,
    pub commands: String,
    pub keys: BTreeSet<String>,
    pub channels: BTreeSet<String>,
    /// Extra selectors (Redis 7); each is more access beside the root permissions.
    pub selectors: usize,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) | Value::Set(items) => items.iter().filter_map(text).collect(),
        other => text(other)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// Strips the rule sigil from a key or channel pattern (`~p`, `%RW~p`, `&p`); patterns with a
/// partial permission (`%R~p`) keep it so they never compare equal to a full grant.
fn bare_pattern(p: &str, sigil: char) -> String {
    let p = p.strip_prefix("%RW").unwrap_or(p);
    p.strip_prefix(sigil).unwrap_or(p).to_owned()
}

/// Parses an `ACL GETUSER` reply (RESP2 flat array or RESP3 map); `None` when the user is absent.
pub fn parse_getuser(v: &Value) -> Result<Option<AclUser>, String> {
    let pairs: Vec<(String, &Value)> = match v {
        Value::Nil => return Ok(None),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| text(k).map(|k| (k, v)))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => text(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        other => {
            return Err(format!(
                "unexpected ACL GETUSER reply: {:?}",
                other_kind(other)
            ));
        }
    };
    let mut user = AclUser::default();
    let mut seen_flags = false;
    for (k, v) in pairs {
        match k.as_str() {
            "flags" => {
                seen_flags = true;
                user.flags = strings(v).into_iter().collect();
            }
            "passwords" => {
                user.passwords = strings(v)
                    .into_iter()
                    .map(|s| s.to_ascii_lowercase())
                    .collect()
            }
            "commands" => user.commands = text(v).unwrap_or_default(),
            "keys" => user.keys = strings(v).iter().map(|p| bare_pattern(p, '~')).collect(),
            "channels" => user.channels = strings(v).iter().map(|p| bare_pattern(p, '&')).collect(),
            "selectors" => {
                user.selectors = match v {
                    Value::Array(s) | Value::Set(s) => s.len(),
                    _ => 0,
                }
            }
            _ => {}
        }
    }
    if !seen_flags {
        return Err("ACL GETUSER reply has no flags".to_owned());
    }
    Ok(Some(user))
}

fn other_kind(v: &Value) -> &'static str {
    match v {
        Value::Int(_) => "integer",
        Value::ServerError(_) => "error",
        _ => "value",
    }
}

/// One way the user on the server differs from the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The user does not exist (deleted, or lost in a restart without persistence).
    Missing,
    /// Key patterns other than the organization's own.
    Keys { extra: Vec<String> },
    /// Channel patterns other than the organization's own.
    Channels { extra: Vec<String> },
    /// The command rules differ from the profile (commands added or removed). Redis re-describes
    /// the whole rule set after a change, so both descriptions are kept rather than a token diff.
    Commands { actual: String, expected: String },
    /// Flags differ (switched off, `nopass`, `allkeys`, ...).
    Flags { actual: Vec<String> },
    /// The password is not (only) the one in the organization's credentials.
    Password,
    /// Extra selectors grant access beside the root permissions.
    Selectors(usize),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("ACL user is missing"),
            Self::Keys { extra } => {
                write!(f, "key patterns widened or changed: {}", extra.join(" "))
            }
            Self::Channels { extra } => write!(
                f,
                "channel patterns widened or changed: {}",
                extra.join(" ")
            ),
            Self::Commands { actual, expected } => {
                write!(
                    f,
                    "command rules changed: \"{actual}\" instead of \"{expected}\""
                )
            }
            Self::Flags { actual } => write!(f, "flags changed to: {}", actual.join(" ")),
            Self::Password => f.write_str("password changed"),
            Self::Selectors(n) => write!(f, "{n} extra selector(s) grant additional access"),
        }
    }
}

/// Flags the reference user reports, with its `off` replaced by the `on` an organization has.
pub fn expected_flags(reference: &AclUser, enabled: bool) -> BTreeSet<String> {
    let mut f = reference.flags.clone();
    f.remove("off");
    f.remove("on");
    f.insert(if enabled { "on" } else { "off" }.to_owned());
    f
}

/// A command-rule description in a canonical order, for comparison. Redis 7.0 re-describes
/// rules from its permission bits and lists per-command adjustments in hash-table order, which
/// differs between nodes and restarts. Reordering is applied only where it cannot change the
/// meaning: after the leading category rules, rules on different commands commute, and so do
/// rules of one sign on the same command; anything else (a category rule later on, or `+` and
/// `-` on the same command) keeps its order.
pub fn canonical_commands(description: &str) -> String {
    let tokens: Vec<&str> = description.split_whitespace().collect();
    let lead = tokens
        .iter()
        .take_while(|t| t.starts_with("+@") || t.starts_with("-@"))
        .count();
    let (head, rest) = tokens.split_at(lead);
    if rest.iter().any(|t| t.contains('@')) {
        return tokens.join(" ");
    }
    let mut groups: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for t in rest {
        let base = t
            .trim_start_matches(['+', '-'])
            .split('|')
            .next()
            .unwrap_or("");
        groups.entry(base).or_default().push(t);
    }
    let mut out: Vec<&str> = head.to_vec();
    for (_, mut group) in groups {
        let one_sign =
            group.iter().all(|t| t.starts_with('+')) || group.iter().all(|t| t.starts_with('-'));
        if one_sign {
            group.sort_unstable();
        }
        out.extend(group);
    }
    out.join(" ")
}

/// Compares the user on the server with the plan. `reference` is the server's own description
/// of the same profile (the reference user's GETUSER reply); only its flags and commands are used.
pub fn diff(plan: &AclPlan, actual: Option<&AclUser>, reference: &AclUser) -> Vec<Drift> {
    let Some(actual) = actual else {
        return vec![Drift::Missing];
    };
    let mut out = Vec::new();
    let want_keys: BTreeSet<String> = [plan.key_pattern.clone()].into();
    if actual.keys != want_keys {
        out.push(Drift::Keys {
            extra: actual
                .keys
                .iter()
                .filter(|k| !want_keys.contains(*k))
                .cloned()
                .collect(),
        });
    }
    let want_channels: BTreeSet<String> = [plan.channel_pattern.clone()].into();
    if actual.channels != want_channels {
        out.push(Drift::Channels {
            extra: actual
                .channels
                .iter()
                .filter(|k| !want_channels.contains(*k))
                .cloned()
                .collect(),
        });
    }
    if canonical_commands(&actual.commands) != canonical_commands(&reference.commands) {
        out.push(Drift::Commands {
            actual: actual.commands.clone(),
            expected: reference.commands.clone(),
        });
    }
    if actual.flags != expected_flags(reference, plan.enabled) {
        out.push(Drift::Flags {
            actual: actual.flags.iter().cloned().collect(),
        });
    }
    let want_pw: BTreeSet<String> = plan.password_sha256.iter().cloned().collect();
    if actual.passwords != want_pw {
        out.push(Drift::Password);
    }
    if actual.selectors > 0 {
        out.push(Drift::Selectors(actual.selectors));
    }
    out
}

/// Characters escaped in the user-info part of a URL.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The organization's connection URL: user and password percent-encoded.
pub fn tenant_url(tls: bool, user: &str, password: &str, endpoint: &str, db: i64) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    let user = utf8_percent_encode(user, USERINFO);
    let password = utf8_percent_encode(password, USERINFO);
    if db == 0 {
        format!("{scheme}://{user}:{password}@{endpoint}")
    } else {
        format!("{scheme}://{user}:{password}@{endpoint}/{db}")
    }
}

/// Whether a Redis error text is an ACL refusal. `Some(true)` for NOPERM, `Some(false)` for the
/// script-side "can't access" refusal, `None` for anything else.
pub fn refusal_kind(err: &str) -> Option<Refusal> {
    let lower = err.to_ascii_lowercase();
    if lower.starts_with("noperm") || lower.contains("noperm") {
        Some(Refusal::NoPerm)
    } else if lower.contains("no permission")
        || lower.contains("can't access")
        || lower.contains("can't run this command")
    {
        Some(Refusal::ScriptDenied)
    } else {
        None
    }
}

/// How Redis refused a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `NOPERM` from the ACL check before execution.
    NoPerm,
    /// The refusal raised inside a script when it touched a key or command the user lacks.
    ScriptDenied,
}

/// Replicas a primary reports in its `ROLE` reply, as `host:port`.
pub fn parse_role_replicas(v: &Value) -> Vec<String> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    if items.first().and_then(text).as_deref() != Some("master") {
        return Vec::new();
    }
    let Some(Value::Array(replicas)) = items.get(2) else {
        return Vec::new();
    };
    replicas
        .iter()
        .filter_map(|r| match r {
            Value::Array(f) => {
                let host = f.first().and_then(text)?;
                let port = f.get(1).and_then(text)?;
                Some(format!("{host}:{port}"))
            }
            _ => None,
        })
        .collect()
}

/// Nodes of a cluster from `CLUSTER NODES`, as `host:port`; failed or address-less nodes are skipped.
pub fn parse_cluster_nodes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _id = f.next()?;
            let addr = f.next()?;
            let flags = f.next()?;
            if flags
                .split(',')
                .any(|fl| matches!(fl, "fail" | "noaddr" | "handshake"))
            {
                return None;
            }
            let hostport = addr.split('@').next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            if host.is_empty() || port.parse::<u16>().ok()? == 0 {
                return None;
            }
            Some(hostport.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::platform::SecretKeySelector;

    fn spec() -> CachePlatform {
        CachePlatform {
            admin_url_secret_ref: SecretKeySelector {
                name: "redis".into(),
                namespace: None,
                key: "url".into(),
            },
            ca_secret_ref: None,
            nodes: vec![],
            discover_nodes: false,
            tenant_endpoint: None,
            key_prefix: "org:{orgId}:".into(),
            channel_prefix: "org:{orgId}:".into(),
            user_prefix: "bulkhead-org-".into(),
            allow_scripting: false,
            acl_file: false,
        }
    }

    fn acme() -> OrgId {
        OrgId::parse("acme").unwrap()
    }

    #[test]
    fn plan_is_a_list_of_separate_rules_starting_from_reset() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let plan = rules.plan(&acme(), &password_sha256("pw")).unwrap();
        assert_eq!(plan.user, "bulkhead-org-acme");
        let r = plan.setuser_rules();
        assert_eq!(
            &r[..5],
            &[
                "reset".to_owned(),
                "on".to_owned(),
                format!("#{}", password_sha256("pw")),
                "~org:acme:*".to_owned(),
                "&org:acme:*".to_owned()
            ]
        );
        assert!(
            r.iter().all(|a| !a.contains(' ')),
            "every rule is one argument: {r:?}"
        );
        assert!(
            !r.iter().any(|a| a.contains(">pw")),
            "plaintext never in the rules"
        );
        for denied in [
            "-keys",
            "-scan",
            "-randomkey",
            "-dbsize",
            "-select",
            "-flushall",
            "-flushdb",
            "-config",
            "-info",
            "-monitor",
            "-client",
            "-debug",
            "-migrate",
            "-pubsub",
            "-function",
            "-script",
            "-@scripting",
            "-@dangerous",
        ] {
            assert!(
                r.contains(&denied.to_owned()),
                "{denied} missing from {r:?}"
            );
        }
        assert_eq!(
            r[5], "-@all",
            "the profile starts by denying everything: {r:?}"
        );
        assert!(!r.contains(&"+@all".to_owned()), "{r:?}");
    }

    #[test]
    fn profile_denies_by_default_then_allows_then_denies_again() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let typed = rules.command_rules();
        assert_eq!(
            typed[0],
            CommandRule::Deny(RuleTarget::Category(Category::All))
        );
        let allows: Vec<usize> = typed
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, CommandRule::Allow(_)))
            .map(|(i, _)| i)
            .collect();
        let last_deny = typed
            .iter()
            .rposition(|r| matches!(r, CommandRule::Deny(_)))
            .unwrap();
        // Every allow except the CLIENT per-connection ones comes before every later deny.
        let first_later_deny = typed
            .iter()
            .skip(1)
            .position(|r| matches!(r, CommandRule::Deny(_)))
            .unwrap()
            + 1;
        for i in &allows {
            let is_client = matches!(typed[*i], CommandRule::Allow(RuleTarget::Command(c)) if c.name == "client");
            assert!(
                is_client || *i < first_later_deny,
                "allow {:?} after a deny",
                typed[*i]
            );
            if is_client {
                assert!(*i > last_deny);
            }
        }
        // No broad category is ever granted.
        for r in &typed {
            if let CommandRule::Allow(RuleTarget::Category(c)) = r {
                assert!(
                    ALLOWED_CATEGORIES.contains(c),
                    "{c:?} granted but not a data-type category"
                );
                assert!(!matches!(
                    c,
                    Category::All | Category::Admin | Category::Dangerous
                ));
            }
        }
        let profile = rules.command_profile();
        for must in [
            "-@all",
            "+@string",
            "+@hash",
            "+@list",
            "+@set",
            "+@sortedset",
            "+@stream",
            "+@pubsub",
            "+@transaction",
            "+expire",
            "+del",
            "+ping",
            "-@admin",
            "-@dangerous",
            "-pubsub",
            "-cluster|getkeysinslot",
            "-cluster|countkeysinslot",
            "+client|setname",
            "+client|getname",
            "+client|id",
        ] {
            assert!(
                profile.contains(&must.to_owned()),
                "{must} missing: {profile:?}"
            );
        }
        for never in [
            "+@all",
            "+@read",
            "+@write",
            "+@keyspace",
            "+@connection",
            "+cluster",
            "+client",
            "+keys",
            "+scan",
        ] {
            assert!(
                !profile.contains(&never.to_owned()),
                "{never} in {profile:?}"
            );
        }
    }

    #[test]
    fn rendered_rules_hold_only_rule_characters() {
        for scripting in [false, true] {
            let mut s = spec();
            s.allow_scripting = scripting;
            for r in CacheRules::from_spec(&s).unwrap().command_profile() {
                let (sign, body) = r.split_at(1);
                assert!(sign == "+" || sign == "-", "{r}");
                let body = body.strip_prefix('@').unwrap_or(body);
                assert!(
                    !body.is_empty()
                        && body
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c == '|' || c == '_' || c == '-'),
                    "{r}"
                );
                assert!(!r.contains(GLOB_CHARACTERS), "{r}");
            }
        }
        assert_eq!(
            CommandRule::Deny(RuleTarget::Command(Command::sub(
                "cluster",
                "getkeysinslot"
            )))
            .render(),
            "-cluster|getkeysinslot"
        );
        assert_eq!(
            CommandRule::Allow(RuleTarget::Category(Category::SortedSet)).render(),
            "+@sortedset"
        );
    }

    #[test]
    fn scripting_is_granted_only_when_the_platform_allows_it() {
        let off = CacheRules::from_spec(&spec()).unwrap().command_profile();
        assert!(!off.contains(&"+@scripting".to_owned()));
        assert!(off.contains(&"-@scripting".to_owned()));
        let mut s = spec();
        s.allow_scripting = true;
        let on = CacheRules::from_spec(&s).unwrap().command_profile();
        let grant = on.iter().position(|r| r == "+@scripting").unwrap();
        let deny_script = on.iter().position(|r| r == "-script").unwrap();
        assert!(
            grant < deny_script,
            "script management is denied after the grant"
        );
    }

    #[test]
    fn owner_records_lie_outside_every_prefix() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        assert_eq!(
            rules.owner_record_key(&acme()).unwrap(),
            "bulkhead:owner:acme"
        );
        let record = rules.owner_record_key(&acme()).unwrap();
        for org in ["acme", "owner", "bulkhead", "a"] {
            let p = rules.key_prefix(&OrgId::parse(org).unwrap()).unwrap();
            assert!(!record.starts_with(&p), "{p} covers {record}");
        }
        assert!(overlaps_owner_records("bulkhead:"));
        assert!(overlaps_owner_records("bulkhead:owner:"));
        assert!(overlaps_owner_records("bulkhead:owner:acme:"));
        assert!(overlaps_owner_records("b"));
        assert!(!overlaps_owner_records("org:acme:"));
        assert!(!overlaps_owner_records("bulkhead-owner:"));
        assert!(!overlaps_owner_records("bulkhead:owners:"));
    }

    #[test]
    fn a_template_inside_the_owner_namespace_is_a_configuration_error() {
        for tpl in ["bulkhead:owner:{orgId}:", "bulkhead:owner:x:{orgId}:"] {
            let mut s = spec();
            s.key_prefix = tpl.into();
            assert!(
                matches!(
                    CacheRules::from_spec(&s),
                    Err(RuleError::TemplateCoversOwnerRecords { .. })
                ),
                "{tpl}"
            );
            let mut s = spec();
            s.channel_prefix = tpl.into();
            assert!(CacheRules::from_spec(&s).is_err(), "{tpl}");
        }
    }

    #[test]
    fn an_org_whose_prefix_covers_the_owner_records_is_refused() {
        let mut s = spec();
        s.key_prefix = "bulkhead:{orgId}:".into();
        let rules = CacheRules::from_spec(&s).unwrap();
        let owner = OrgId::parse("owner").unwrap();
        for r in [
            rules.key_prefix(&owner).map(|_| ()),
            rules.plan(&owner, "h").map(|_| ()),
            rules.owner_record_key(&owner).map(|_| ()),
            rules.canary_key(&owner).map(|_| ()),
            rules.scan_pattern(&owner).map(|_| ()),
        ] {
            assert!(
                matches!(r, Err(RuleError::PrefixCoversOwnerRecords { .. })),
                "{r:?}"
            );
        }
        assert!(rules.plan(&acme(), "h").is_ok());
        let mut s = spec();
        s.channel_prefix = "{orgId}:".into();
        let rules = CacheRules::from_spec(&s).unwrap();
        assert!(matches!(
            rules.plan(&OrgId::parse("bulkhead").unwrap(), "h"),
            Err(RuleError::PrefixCoversOwnerRecords {
                field: "channelPrefix",
                ..
            })
        ));
        assert!(rules.plan(&acme(), "h").is_ok());
    }

    #[test]
    fn scripting_allowed_keeps_script_and_function_management_denied() {
        let mut s = spec();
        s.allow_scripting = true;
        let profile = CacheRules::from_spec(&s).unwrap().command_profile();
        assert!(!profile.contains(&"-@scripting".to_owned()));
        assert!(profile.contains(&"-script".to_owned()));
        assert!(profile.contains(&"-function".to_owned()));
    }

    #[test]
    fn a_reference_user_is_reused_only_when_fingerprint_and_shape_match() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let plan = rules.reference_plan().unwrap();
        let fp = reference_fingerprint(&plan);
        assert_eq!(
            rules.reference_key().unwrap(),
            "org:bulkhead-sentinel:reference-profile"
        );
        let good = AclUser {
            flags: ["off".to_owned()].into(),
            commands: "+@all -@dangerous".into(),
            keys: [plan.key_pattern.clone()].into(),
            channels: [plan.channel_pattern.clone()].into(),
            ..AclUser::default()
        };
        assert!(reference_is_current(&plan, &good, Some(&fp)));
        assert!(!reference_is_current(&plan, &good, None), "no fingerprint");
        assert!(
            !reference_is_current(&plan, &good, Some("00")),
            "another profile's"
        );
        let mut other = plan.clone();
        other.profile.push("-get".into());
        assert_ne!(
            reference_fingerprint(&other),
            fp,
            "the profile is in the fingerprint"
        );
        let bad: [fn(&mut AclUser); 6] = [
            |u| {
                u.flags.remove("off");
                u.flags.insert("on".into());
            },
            |u| {
                u.flags.insert("nopass".into());
            },
            |u| {
                u.passwords.insert("ab".into());
            },
            |u| u.selectors = 1,
            |u| {
                u.keys.insert("*".into());
            },
            |u| u.channels = ["*".to_owned()].into(),
        ];
        for (i, change) in bad.iter().enumerate() {
            let mut u = good.clone();
            change(&mut u);
            assert!(!reference_is_current(&plan, &u, Some(&fp)), "change {i}");
        }
    }

    #[test]
    fn reference_plan_cannot_log_in() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let plan = rules.reference_plan().unwrap();
        assert_eq!(plan.user, "bulkhead-org-bulkhead-sentinel");
        let r = plan.setuser_rules();
        assert_eq!(&r[..2], &["reset", "off"]);
        assert!(
            !r.iter()
                .any(|a| a.starts_with('#') || a.starts_with('>') || a == "nopass")
        );
    }

    #[test]
    fn names_and_patterns_derive_from_the_org_id() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        assert_eq!(
            rules.canary_key(&OrgId::sentinel()).unwrap(),
            "org:bulkhead-sentinel:canary"
        );
        assert_eq!(rules.canary_key(&acme()).unwrap(), "org:acme:canary");
        assert_eq!(rules.scan_pattern(&acme()).unwrap(), "org:acme:*");
        assert_eq!(rules.user_name(&acme()), "bulkhead-org-acme");
    }

    #[test]
    fn bad_org_ids_are_refused() {
        for bad in [
            "acme*", "a?c", "a[b]", "a\\b", "a{b}", "", "A", "a b", "a:b", "-a", "o'brien",
        ] {
            assert!(checked_org(bad).is_err(), "{bad:?} accepted");
        }
        assert!(checked_org("acme").is_ok());
        assert!(checked_org(SENTINEL_ORG_ID).is_ok());
    }

    #[test]
    fn bad_templates_are_refused() {
        let cases = [
            ("org:*:", "keyPrefix"),
            ("org:{orgId}", "keyPrefix"),
            ("org:{orgId}-", "keyPrefix"),
            ("org:{orgId}x:", "keyPrefix"),
            ("{orgId}", "keyPrefix"),
            ("org:{orgId}:{orgId}:", "keyPrefix"),
            ("org?:{orgId}:", "keyPrefix"),
            ("org[1]:{orgId}:", "keyPrefix"),
            ("org\\:{orgId}:", "keyPrefix"),
            ("org :{orgId}:", "keyPrefix"),
            ("org:{orgId}:*", "keyPrefix"),
            ("org:{orgId}:}", "keyPrefix"),
        ];
        for (tpl, _) in cases {
            let mut s = spec();
            s.key_prefix = tpl.into();
            assert!(
                CacheRules::from_spec(&s).is_err(),
                "key template {tpl:?} accepted"
            );
            let mut s = spec();
            s.channel_prefix = tpl.into();
            assert!(
                CacheRules::from_spec(&s).is_err(),
                "channel template {tpl:?} accepted"
            );
        }
        let mut s = spec();
        s.key_prefix = format!("{}{{orgId}}:", "x".repeat(100));
        assert!(matches!(
            CacheRules::from_spec(&s),
            Err(RuleError::TooLong { .. })
        ));
        for bad in ["", "bulk head", "bulk:", "b*", &"x".repeat(65)] {
            let mut s = spec();
            s.user_prefix = bad.into();
            assert!(
                CacheRules::from_spec(&s).is_err(),
                "user prefix {bad:?} accepted"
            );
        }
        let mut s = spec();
        s.key_prefix = "tenant/{orgId}/cache:".into();
        s.channel_prefix = "chan.{orgId}.".into();
        assert!(CacheRules::from_spec(&s).is_ok());
    }

    #[test]
    fn no_org_pattern_matches_another_orgs_keys() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let a = rules.key_prefix(&OrgId::parse("a").unwrap()).unwrap();
        let ab = rules.key_prefix(&OrgId::parse("a-b").unwrap()).unwrap();
        assert!(!ab.starts_with(&a) && !a.starts_with(&ab));
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn getuser_reply(
        flags: &[&str],
        pw: &[&str],
        commands: &str,
        keys: &str,
        channels: &str,
    ) -> Value {
        Value::Array(vec![
            bulk("flags"),
            Value::Array(flags.iter().map(|f| bulk(f)).collect()),
            bulk("passwords"),
            Value::Array(pw.iter().map(|f| bulk(f)).collect()),
            bulk("commands"),
            bulk(commands),
            bulk("keys"),
            bulk(keys),
            bulk("channels"),
            bulk(channels),
            bulk("selectors"),
            Value::Array(vec![]),
        ])
    }

    fn fixture() -> (AclPlan, AclUser, String) {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let h = password_sha256("pw");
        let plan = rules.plan(&acme(), &h).unwrap();
        let reference = parse_getuser(&getuser_reply(
            &["off", "sanitize-payload"],
            &[],
            "+@all -@dangerous -keys",
            "~org:bulkhead-sentinel:*",
            "&org:bulkhead-sentinel:*",
        ))
        .unwrap()
        .unwrap();
        (plan, reference, h)
    }

    #[test]
    fn parses_getuser_and_finds_no_drift_when_as_planned() {
        let (plan, reference, h) = fixture();
        let actual = parse_getuser(&getuser_reply(
            &["on", "sanitize-payload"],
            &[&h],
            "+@all -@dangerous -keys",
            "~org:acme:*",
            "&org:acme:*",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(actual.keys, ["org:acme:*".to_owned()].into());
        assert_eq!(diff(&plan, Some(&actual), &reference), vec![]);
        assert_eq!(parse_getuser(&Value::Nil).unwrap(), None);
        assert_eq!(diff(&plan, None, &reference), vec![Drift::Missing]);
    }

    #[test]
    fn each_kind_of_drift_is_found() {
        let (plan, reference, h) = fixture();
        let user = |flags: &[&str], pw: &[&str], cmds: &str, keys: &str, ch: &str| {
            parse_getuser(&getuser_reply(flags, pw, cmds, keys, ch))
                .unwrap()
                .unwrap()
        };
        let ok = ["on", "sanitize-payload"];
        let base = "+@all -@dangerous -keys";
        let widened = user(&ok, &[&h], base, "~org:acme:* ~*", "&org:acme:*");
        assert_eq!(
            diff(&plan, Some(&widened), &reference),
            vec![Drift::Keys {
                extra: vec!["*".into()]
            }]
        );
        let chans = user(&ok, &[&h], base, "~org:acme:*", "&*");
        assert_eq!(
            diff(&plan, Some(&chans), &reference),
            vec![Drift::Channels {
                extra: vec!["*".into()]
            }]
        );
        let cmds = user(
            &ok,
            &[&h],
            "+@all -@dangerous",
            "~org:acme:*",
            "&org:acme:*",
        );
        assert_eq!(
            diff(&plan, Some(&cmds), &reference),
            vec![Drift::Commands {
                actual: "+@all -@dangerous".into(),
                expected: "+@all -@dangerous -keys".into()
            }]
        );
        let added = user(
            &ok,
            &[&h],
            "+@all -@dangerous -keys +flushall",
            "~org:acme:*",
            "&org:acme:*",
        );
        assert!(
            diff(&plan, Some(&added), &reference)[0]
                .to_string()
                .contains("-keys +flushall\" instead of")
        );
        let pw = user(
            &ok,
            &[&password_sha256("other")],
            base,
            "~org:acme:*",
            "&org:acme:*",
        );
        assert_eq!(diff(&plan, Some(&pw), &reference), vec![Drift::Password]);
        let two_pw = user(
            &ok,
            &[&h, &password_sha256("other")],
            base,
            "~org:acme:*",
            "&org:acme:*",
        );
        assert_eq!(
            diff(&plan, Some(&two_pw), &reference),
            vec![Drift::Password]
        );
        let nopass = user(
            &["on", "nopass", "sanitize-payload"],
            &[],
            base,
            "~org:acme:*",
            "&org:acme:*",
        );
        assert_eq!(diff(&plan, Some(&nopass), &reference).len(), 2);
        let all = user(
            &["on", "allkeys", "sanitize-payload"],
            &[&h],
            base,
            "~*",
            "&org:acme:*",
        );
        assert_eq!(diff(&plan, Some(&all), &reference).len(), 2);
    }

    #[test]
    fn command_descriptions_compare_in_canonical_order_only_where_meaning_is_kept() {
        let a = "-@all +@string +@pubsub -pubsub|numpat -pubsub|channels +object -keys";
        let b = "-@all +@string +@pubsub -keys -pubsub|channels +object -pubsub|numpat";
        assert_eq!(canonical_commands(a), canonical_commands(b));
        // Category order matters.
        assert_ne!(
            canonical_commands("-@all +@string -get"),
            canonical_commands("+@string -@all -get")
        );
        // + and - on one command keep their order.
        assert_ne!(
            canonical_commands("-@all -client +client|setname"),
            canonical_commands("-@all +client|setname -client")
        );
        // A later category rule keeps everything in order.
        assert_ne!(
            canonical_commands("-@all -keys +@all"),
            canonical_commands("-@all +@all -keys")
        );
        // Different sets of rules never compare equal.
        assert_ne!(
            canonical_commands("-@all +@string -keys"),
            canonical_commands("-@all +@string -keys +flushall")
        );
    }

    #[test]
    fn resp3_map_and_selectors_parse() {
        let v = Value::Map(vec![
            (bulk("flags"), Value::Set(vec![bulk("on")])),
            (bulk("passwords"), Value::Array(vec![])),
            (bulk("commands"), bulk("+@all")),
            (bulk("keys"), bulk("%RW~org:acme:* %R~*")),
            (bulk("channels"), bulk("&org:acme:*")),
            (bulk("selectors"), Value::Array(vec![Value::Map(vec![])])),
        ]);
        let u = parse_getuser(&v).unwrap().unwrap();
        assert_eq!(u.keys, ["org:acme:*".to_owned(), "%R~*".to_owned()].into());
        assert_eq!(u.selectors, 1);
        assert!(parse_getuser(&Value::Int(3)).is_err());
    }

    #[test]
    fn tenant_url_encodes_user_and_password() {
        assert_eq!(
            tenant_url(false, "bulkhead-org-acme", "pw", "127.0.0.1:6379", 0),
            "redis://bulkhead-org-acme:pw@127.0.0.1:6379"
        );
        assert_eq!(
            tenant_url(true, "a:b", "p@ss/w", "redis.svc:6380", 2),
            "rediss://a%3Ab:p%40ss%2Fw@redis.svc:6380/2"
        );
    }

    #[test]
    fn refusals_are_told_apart() {
        assert_eq!(
            refusal_kind("NOPERM: this user has no permissions to run the 'keys' command"),
            Some(Refusal::NoPerm)
        );
        assert_eq!(
            refusal_kind("ERR The user executing the script can't access at least one of the keys"),
            Some(Refusal::ScriptDenied)
        );
        assert_eq!(refusal_kind("WRONGTYPE Operation against a key"), None);
    }

    #[test]
    fn parses_role_and_cluster_nodes() {
        let role = Value::Array(vec![
            bulk("master"),
            Value::Int(10),
            Value::Array(vec![Value::Array(vec![
                bulk("127.0.0.1"),
                bulk("6380"),
                bulk("10"),
            ])]),
        ]);
        assert_eq!(
            parse_role_replicas(&role),
            vec!["127.0.0.1:6380".to_owned()]
        );
        assert!(parse_role_replicas(&Value::Array(vec![bulk("slave")])).is_empty());
        let nodes = "07c3 127.0.0.1:30004@31004,host replica e7d1 0 1 4 connected\n\
                     67ed 127.0.0.1:30002@31002 master - 0 1 2 connected 5461-10922\n\
                     aaaa :0@0 master,noaddr - 0 0 0 disconnected\n\
                     bbbb 127.0.0.1:30009@31009 master,fail - 0 0 0 disconnected\n";
        assert_eq!(
            parse_cluster_nodes(nodes),
            vec!["127.0.0.1:30004".to_owned(), "127.0.0.1:30002".to_owned()]
        );
    }

    #[test]
    fn plan_debug_hides_the_hash() {
        let rules = CacheRules::from_spec(&spec()).unwrap();
        let h = password_sha256("pw");
        let plan = rules.plan(&acme(), &h).unwrap();
        assert!(!format!("{plan:?}").contains(&h));
    }
}
