//! Real packets beside the policy evaluator: a canary Pod in every organization's namespace,
//! and a short-lived probe Pod that tries TCP from the organization's namespace to another
//! organization's canary, to its own canary, to DNS and to the platform's egress targets.
//!
//! Each attempt is set beside the evaluator's verdict for the very same path (the probe's
//! labels, the target Pod's namespace, labels and port). Where the two disagree, the cluster's
//! dataplane does not do what its NetworkPolicies say: most often a CNI that does not enforce
//! NetworkPolicy at all.
//!
//! Everything here but the I/O in the layer is pure: the Pods, the probe's arguments, the
//! parsing of its report and the judgement.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, Pod, PodSecurityContext, PodSpec, Probe as KubeProbe,
    ResourceRequirements, SeccompProfile, SecurityContext, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::plan;
use crate::api::platform::{NetworkMode, TrafficProbe};
use crate::api::{ORG_ID_LABEL, TrafficPath};
use crate::layers::{Probe, Tenant};

/// Label telling canary and probe Pods apart (`canary` or `probe`).
pub const ROLE_LABEL: &str = "bulkhead.dev/probe-role";
pub const CANARY: &str = "canary";
pub const PROBE: &str = "probe";
/// Name of the canary Pod in each organization's namespace.
pub const CANARY_NAME: &str = "bulkhead-canary";
/// Probe Pods are named `bulkhead-probe-<random>` by the API server.
pub const PROBE_PREFIX: &str = "bulkhead-probe-";
/// Hash of the canary's spec as bulkhead wrote it: a canary with another hash is replaced.
pub const SPEC_ANNOTATION: &str = "bulkhead.dev/canary-spec";
/// The user every probe container runs as (`nobody`).
const USER: i64 = 65534;
/// Longest image reference accepted.
const MAX_IMAGE: usize = 512;
/// The probe binary's limit on targets per run.
pub const MAX_TARGETS: usize = 32;

/// `TrafficProbe`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficConfig {
    pub image: String,
    pub pull_policy: String,
    pub port: i32,
    pub settle_millis: u32,
    pub timeout_millis: u32,
    pub dns_labels: BTreeMap<String, String>,
}

impl TrafficConfig {
    /// How long a probe Pod may take from creation to its report: scheduling and start, the
    /// settle delay, one connection timeout (the attempts run in parallel), and slack.
    pub fn probe_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            u64::from(self.settle_millis) + u64::from(self.timeout_millis) + 45_000,
        )
    }
}

fn valid_image(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IMAGE
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
        })
        && !s.starts_with(['-', '.', '/', ':', '@'])
}

fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    });
    name_ok && prefix_ok
}

fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.as_bytes().first().is_none_or(u8::is_ascii_alphanumeric)
        && v.as_bytes().last().is_none_or(u8::is_ascii_alphanumeric)
}

/// Validates the platform's `trafficProbe`; every problem is named.
pub fn validate(t: &TrafficProbe, mode: NetworkMode) -> Result<TrafficConfig, String> {
    if mode != NetworkMode::Namespace {
        return Err(
            "trafficProbe needs network mode namespace (each organization's canary lives in its own namespace)"
                .to_owned(),
        );
    }
    if !valid_image(&t.image) {
        return Err(format!(
            "trafficProbe.image {:?} is not an image reference (1-{MAX_IMAGE} of A-Z, a-z, 0-9, '.', '_', '-', '/', ':', '@')",
            t.image
        ));
    }
    if !matches!(
        t.image_pull_policy.as_str(),
        "Always" | "IfNotPresent" | "Never"
    ) {
        return Err(format!(
            "trafficProbe.imagePullPolicy {:?} must be Always, IfNotPresent or Never",
            t.image_pull_policy
        ));
    }
    if !(1024..=65535).contains(&t.canary_port) {
        return Err(format!(
            "trafficProbe.canaryPort {} must be 1024-65535 (the canary runs without privileges)",
            t.canary_port
        ));
    }
    if t.settle_millis > 30_000 {
        return Err(format!(
            "trafficProbe.settleMillis {} must be at most 30000",
            t.settle_millis
        ));
    }
    if !(100..=30_000).contains(&t.connect_timeout_millis) {
        return Err(format!(
            "trafficProbe.connectTimeoutMillis {} must be 100-30000",
            t.connect_timeout_millis
        ));
    }
    if t.dns_pod_labels.is_empty() {
        return Err("trafficProbe.dnsPodLabels must name at least one label".to_owned());
    }
    for (k, v) in &t.dns_pod_labels {
        if !valid_label_key(k) || !valid_label_value(v) {
            return Err(format!(
                "trafficProbe.dnsPodLabels entry {k:?}: {v:?} is not a valid label"
            ));
        }
    }
    Ok(TrafficConfig {
        image: t.image.clone(),
        pull_policy: t.image_pull_policy.clone(),
        port: t.canary_port,
        settle_millis: t.settle_millis,
        timeout_millis: t.connect_timeout_millis,
        dns_labels: t.dns_pod_labels.clone(),
    })
}

/// The `restricted` Pod Security profile, Pod level.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(USER),
        run_as_group: Some(USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `restricted` Pod Security profile, container level, with a read-only root.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..Default::default()
    }
}

/// Small, fixed requests and limits, so that a namespace with a ResourceQuota admits the Pods.
fn resources() -> ResourceRequirements {
    let q = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(mem.to_owned())),
        ])
    };
    ResourceRequirements {
        requests: Some(q("5m", "8Mi")),
        limits: Some(q("100m", "32Mi")),
        ..Default::default()
    }
}

fn labels(tenant: &Tenant, role: &str) -> BTreeMap<String, String> {
    let mut l = plan::labels(tenant);
    l.insert(ROLE_LABEL.to_owned(), role.to_owned());
    l
}

/// Label selector for the organization's Pods of one role.
pub fn role_selector(tenant: &Tenant, role: &str) -> String {
    format!("{},{ROLE_LABEL}={role}", plan::managed_selector(tenant))
}

fn pod_spec(cfg: &TrafficConfig, container: Container, restart: &str) -> PodSpec {
    PodSpec {
        containers: vec![Container {
            image: Some(cfg.image.clone()),
            image_pull_policy: Some(cfg.pull_policy.clone()),
            security_context: Some(container_security()),
            resources: Some(resources()),
            ..container
        }],
        restart_policy: Some(restart.to_owned()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(pod_security()),
        termination_grace_period_seconds: Some(2),
        ..Default::default()
    }
}

/// The organization's canary: listens on the canary port and is Ready once it does.
pub fn canary_pod(cfg: &TrafficConfig, tenant: &Tenant) -> Pod {
    let container = Container {
        name: "canary".to_owned(),
        args: Some(vec!["listen".to_owned(), cfg.port.to_string()]),
        ports: Some(vec![ContainerPort {
            name: Some("canary".to_owned()),
            container_port: cfg.port,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(KubeProbe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(cfg.port),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = pod_spec(cfg, container, "Always");
    let hash = spec_hash(&spec);
    Pod {
        metadata: ObjectMeta {
            name: Some(CANARY_NAME.to_owned()),
            namespace: Some(tenant.namespace.clone()),
            labels: Some(labels(tenant, CANARY)),
            annotations: Some(BTreeMap::from([(SPEC_ANNOTATION.to_owned(), hash)])),
            owner_references: Some(vec![tenant.owner.clone()]),
            ..Default::default()
        },
        spec: Some(spec),
        ..Default::default()
    }
}

fn spec_hash(spec: &PodSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a live Pod is this organization's canary as bulkhead wrote it: its labels and its
/// owner reference (the Organization's UID). Anything else in that name is never adopted.
pub fn owned_by(pod: &Pod, tenant: &Tenant) -> bool {
    let l = pod.metadata.labels.as_ref();
    let label = |k: &str| l.and_then(|l| l.get(k)).map(String::as_str);
    label(plan::MANAGED_BY_LABEL) == Some(crate::api::MANAGED_BY)
        && label(ORG_ID_LABEL) == Some(tenant.org_id.as_str())
        && pod
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o.iter().any(|r| r.uid == tenant.owner.uid))
}

/// Whether the live canary carries the spec that bulkhead wants now.
pub fn current(live: &Pod, want: &Pod) -> bool {
    let ann = |p: &Pod| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_ANNOTATION))
            .cloned()
    };
    ann(live).is_some() && ann(live) == ann(want)
}

/// Where one probe connection goes, and what the evaluator says of that path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Short name on the probe's command line (`peer`, `own`, `dns`, `egress-<name>`).
    pub name: String,
    /// The path in words, e.g. `to beta's canary`.
    pub what: String,
    /// `namespace/pod`.
    pub pod: String,
    pub ip: String,
    pub port: i32,
    /// Another organization's canary: isolation needs this attempt refused.
    pub cross_tenant: bool,
    /// The evaluator's verdict: the policies let this connection through.
    pub policy_allows: bool,
    /// The verdict was the same just before and just after the probe. A policy that changed
    /// meanwhile says nothing about enforcement either way.
    pub policy_stable: bool,
}

/// The probe Pod's arguments.
pub fn probe_args(cfg: &TrafficConfig, targets: &[Target]) -> Vec<String> {
    let mut args = vec![
        "connect".to_owned(),
        "--timeout-ms".to_owned(),
        cfg.timeout_millis.to_string(),
        "--delay-ms".to_owned(),
        cfg.settle_millis.to_string(),
    ];
    args.extend(targets.iter().take(MAX_TARGETS).map(|t| {
        let addr = match t.ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => t.ip.clone(),
        };
        format!("{}={addr}:{}", t.name, t.port)
    }));
    args
}

/// A one-shot probe Pod in the organization's namespace.
pub fn probe_pod(cfg: &TrafficConfig, tenant: &Tenant, targets: &[Target]) -> Pod {
    let container = Container {
        name: "probe".to_owned(),
        args: Some(probe_args(cfg, targets)),
        termination_message_policy: Some("File".to_owned()),
        ..Default::default()
    };
    let mut spec = pod_spec(cfg, container, "Never");
    spec.active_deadline_seconds =
        Some(i64::try_from(cfg.probe_deadline().as_secs()).unwrap_or(i64::MAX));
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(PROBE_PREFIX.to_owned()),
            namespace: Some(tenant.namespace.clone()),
            labels: Some(labels(tenant, PROBE)),
            owner_references: Some(vec![tenant.owner.clone()]),
            ..Default::default()
        },
        spec: Some(spec),
        ..Default::default()
    }
}

/// The labels a probe Pod carries, for the evaluator's side of the question.
pub fn probe_labels(tenant: &Tenant) -> BTreeMap<String, String> {
    labels(tenant, PROBE)
}

/// How one connection attempt ended, as the probe reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    Open,
    Refused,
    Timeout,
    Unreachable,
    Denied,
    Error,
}

impl Packet {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => Self::Open,
            "refused" => Self::Refused,
            "timeout" => Self::Timeout,
            "unreachable" => Self::Unreachable,
            "denied" => Self::Denied,
            "error" => Self::Error,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// Reads the probe's report (`NAME VERDICT MILLIS` per line): one answer per target, or why
/// the report is unusable. A report naming a target twice, an unknown target, or missing one
/// is refused whole.
pub fn parse_report(report: &str, targets: &[Target]) -> Result<Vec<(Packet, u64)>, String> {
    let mut out: Vec<Option<(Packet, u64)>> = vec![None; targets.len()];
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (Some(name), Some(verdict), Some(ms), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(format!("unreadable report line {:?}", clip(line)));
        };
        let i = targets
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| format!("report names unknown target {:?}", clip(name)))?;
        let packet = Packet::parse(verdict)
            .ok_or_else(|| format!("unknown verdict {:?} for {name}", clip(verdict)))?;
        let ms = ms
            .parse::<u64>()
            .map_err(|_| format!("bad duration {:?} for {name}", clip(ms)))?;
        if out[i].replace((packet, ms)).is_some() {
            return Err(format!("report names {name} twice"));
        }
    }
    out.into_iter()
        .zip(targets)
        .map(|(r, t)| r.ok_or_else(|| format!("report has no line for {}", t.name)))
        .collect()
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// What the packets showed, beside the evaluator's verdicts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// One entry per connection tried.
    pub paths: Vec<TrafficPath>,
    /// Why no packet was sent this pass (no canary ready, the probe Pod failed, ...).
    pub not_run: Option<String>,
    /// Targets that could not be tried, in words (no DNS Pod found, no peer canary ready).
    pub skipped: Vec<String>,
}

impl Traffic {
    pub fn not_run(why: impl Into<String>, skipped: Vec<String>) -> Self {
        Self {
            paths: Vec::new(),
            not_run: Some(why.into()),
            skipped,
        }
    }

    /// Paths where the policies refuse and a packet went through.
    pub fn unenforced(&self) -> impl Iterator<Item = &TrafficPath> {
        self.paths
            .iter()
            .filter(|p| p.policy == "refuses" && p.packet == Packet::Open.as_str())
    }

    /// Paths where the policies allow and the packet did not get through.
    pub fn dropped(&self) -> impl Iterator<Item = &TrafficPath> {
        self.paths
            .iter()
            .filter(|p| p.policy == "allows" && p.packet != Packet::Open.as_str())
    }
}

/// Sets each answer beside the evaluator's verdict. Returns the status entries, and the probes
/// that count towards `IsolationVerified`: the attempt on another organization's canary must be
/// refused, and the organization's own canary must answer.
pub fn judge(targets: &[Target], answers: &[(Packet, u64)]) -> (Vec<TrafficPath>, Vec<Probe>) {
    let mut paths = Vec::new();
    let mut probes = Vec::new();
    for (t, (packet, ms)) in targets.iter().zip(answers) {
        let open = *packet == Packet::Open;
        paths.push(TrafficPath {
            path: t.what.clone(),
            destination: format!("{} {}:{}", t.pod, t.ip, t.port),
            policy: match (t.policy_stable, t.policy_allows) {
                (false, _) => "changed during the probe",
                (true, true) => "allows",
                (true, false) => "refuses",
            }
            .to_owned(),
            packet: packet.as_str().to_owned(),
            agrees: t.policy_stable && t.policy_allows == open,
        });
        let name = format!("TCP {}", t.what);
        if t.cross_tenant {
            let detail = if open {
                format!("a packet reached {} in {ms} ms", t.pod)
            } else {
                format!("{} after {ms} ms", packet.as_str())
            };
            probes.push(Probe::new(name, !open, detail));
        } else if t.name == "own" {
            let detail = if open {
                format!("open in {ms} ms")
            } else {
                format!(
                    "{} after {ms} ms: the organization's own pods cannot reach each other",
                    packet.as_str()
                )
            };
            probes.push(Probe::new(name, open, detail));
        }
    }
    (paths, probes)
}

#[cfg(test)]
mod tests;
