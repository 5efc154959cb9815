//! Turns one reconcile pass's layer outcomes into conditions and per-layer detail. Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, ConditionStatus, LayerDetail};
use crate::layers::network::traffic::Traffic;
use crate::layers::{LayerKind, Verification};

/// Longest condition message; the API server allows 32 KiB, `kubectl` readers far less.
const MAX_MESSAGE: usize = 1024;

/// What happened to one layer in this pass.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerOutcome {
    /// The Organization switched the layer off.
    Disabled,
    /// The platform has no section for this layer.
    NotConfigured,
    /// The layer could not be built, ensured or verified.
    Failed { reason: String, message: String },
    /// The layer ran: its audit findings and probes.
    Checked {
        verification: Verification,
        probed_at: Time,
    },
}

impl LayerOutcome {
    /// Whether the layer counts towards `Ready` and `IsolationVerified`.
    fn counts(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::Checked { .. })
    }
}

/// The organization-level facts besides the layers: namespace, credentials Secret, BYOK keys.
#[derive(Clone, Debug, PartialEq)]
pub enum Workspace {
    Ready,
    Failed { reason: String, message: String },
}

/// The freshly computed conditions, before merging with the previous ones.
pub fn conditions(
    workspace: &Workspace,
    layers: &BTreeMap<LayerKind, LayerOutcome>,
) -> Vec<Condition> {
    // (reason, message) of everything that keeps the organization from Ready, in order.
    let mut not_ready: Vec<(String, String)> = Vec::new();
    let mut out = vec![workspace_condition(workspace, &mut not_ready)];
    for kind in LayerKind::ALL {
        let outcome = layers.get(&kind).unwrap_or(&LayerOutcome::NotConfigured);
        out.push(layer_condition(kind, outcome, &mut not_ready));
    }
    if let Some(LayerOutcome::Checked { verification, .. }) = layers.get(&LayerKind::Network)
        && let Some(traffic) = &verification.traffic
    {
        out.push(enforced_condition(traffic, &mut not_ready));
    }
    out.push(verified_condition(layers, &mut not_ready));
    let any_layer = layers.values().any(LayerOutcome::counts);
    out.insert(0, ready_condition(&not_ready, any_layer));
    out
}

fn workspace_condition(workspace: &Workspace, not_ready: &mut Vec<(String, String)>) -> Condition {
    match workspace {
        Workspace::Ready => Condition::new(
            "CredentialsReady",
            ConditionStatus::True,
            "SecretWritten",
            "namespace and credentials Secret are in place",
        ),
        Workspace::Failed { reason, message } => {
            not_ready.push((reason.clone(), message.clone()));
            Condition::new(
                "CredentialsReady",
                ConditionStatus::False,
                reason.clone(),
                clip(message),
            )
        }
    }
}

fn layer_condition(
    kind: LayerKind,
    outcome: &LayerOutcome,
    not_ready: &mut Vec<(String, String)>,
) -> Condition {
    let (status, reason, message) = match outcome {
        LayerOutcome::Disabled => (
            ConditionStatus::Unknown,
            "Disabled".to_owned(),
            format!("the {kind} layer is switched off for this organization"),
        ),
        LayerOutcome::NotConfigured => (
            ConditionStatus::Unknown,
            "NotConfigured".to_owned(),
            format!("the platform does not manage the {kind} layer"),
        ),
        LayerOutcome::Failed { reason, message } => {
            not_ready.push((reason.clone(), format!("{kind}: {message}")));
            (ConditionStatus::False, reason.clone(), clip(message))
        }
        LayerOutcome::Checked { verification, .. } if verification.isolated() => (
            ConditionStatus::True,
            "Isolated".to_owned(),
            isolated_message(kind, verification),
        ),
        LayerOutcome::Checked { verification, .. } => {
            let msg = verification.findings.join("; ");
            not_ready.push(("IsolationFindings".into(), format!("{kind}: {msg}")));
            (
                ConditionStatus::False,
                "IsolationFindings".to_owned(),
                clip(&msg),
            )
        }
    };
    Condition::new(kind.condition_type(), status, reason, message)
}

/// `NetworkPolicyEnforced`: whether real packets did what the NetworkPolicies say.
fn enforced_condition(t: &Traffic, not_ready: &mut Vec<(String, String)>) -> Condition {
    const TYPE: &str = "NetworkPolicyEnforced";
    let unenforced: Vec<String> = t
        .unenforced()
        .map(|p| {
            format!(
                "{} ({}): the policies refuse it, a packet got through",
                p.path, p.destination
            )
        })
        .collect();
    let dropped: Vec<String> = t
        .dropped()
        .map(|p| {
            format!(
                "{} ({}): the policies allow it, the packet was {}",
                p.path, p.destination, p.packet
            )
        })
        .collect();
    let (status, reason, msg) = if let Some(why) = &t.not_run {
        (
            ConditionStatus::Unknown,
            "TrafficProbeNotRun",
            format!("no packet was sent: {why}"),
        )
    } else if !unenforced.is_empty() {
        (
            ConditionStatus::False,
            "NotEnforced",
            format!(
                "the cluster's network does not enforce NetworkPolicy: {}",
                unenforced.join("; ")
            ),
        )
    } else if !dropped.is_empty() {
        (
            ConditionStatus::False,
            "DataplaneRefuses",
            format!(
                "the cluster's network refuses what the NetworkPolicies allow: {}",
                dropped.join("; ")
            ),
        )
    } else {
        let mut msg = format!(
            "{} paths tried with real packets; each did what the NetworkPolicies say",
            t.paths.len()
        );
        if !t.skipped.is_empty() {
            msg.push_str(&format!(" (not tried: {})", t.skipped.join("; ")));
        }
        (ConditionStatus::True, "PacketsMatchPolicy", msg)
    };
    if status != ConditionStatus::True {
        not_ready.push((reason.to_owned(), format!("network traffic: {msg}")));
    }
    Condition::new(TYPE, status, reason, clip(&msg))
}

fn ready_condition(not_ready: &[(String, String)], any_layer: bool) -> Condition {
    match not_ready.first() {
        None if any_layer => Condition::new(
            "Ready",
            ConditionStatus::True,
            "Isolated",
            "every managed layer is isolated and verified",
        ),
        None => Condition::new(
            "Ready",
            ConditionStatus::False,
            "NoLayers",
            "the platform manages no layer for this organization",
        ),
        Some((reason, _)) => {
            let msg = not_ready
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            Condition::new("Ready", ConditionStatus::False, reason.clone(), clip(&msg))
        }
    }
}

fn verified_condition(
    layers: &BTreeMap<LayerKind, LayerOutcome>,
    not_ready: &mut Vec<(String, String)>,
) -> Condition {
    let mut refused = 0usize;
    let mut failing = Vec::new();
    let mut unverified = Vec::new();
    for (kind, outcome) in layers {
        match outcome {
            LayerOutcome::Checked { verification, .. } => {
                refused += verification.probes.iter().filter(|p| p.passed).count();
                failing.extend(
                    verification
                        .probes
                        .iter()
                        .filter(|p| !p.passed)
                        .map(|p| format!("{kind}: {}: {}", p.name, p.detail)),
                );
                if verification.probes.is_empty() {
                    unverified.push(format!("{kind}: no probe ran"));
                }
            }
            LayerOutcome::Failed { .. } => {
                unverified.push(format!("{kind}: not probed, the layer failed"))
            }
            LayerOutcome::Disabled | LayerOutcome::NotConfigured => {}
        }
    }
    let blocking = if !failing.is_empty() {
        Some(("ProbeFailed", failing))
    } else if !unverified.is_empty() {
        Some(("NotVerified", unverified))
    } else {
        None
    };
    if let Some((reason, items)) = blocking {
        let msg = items.join("; ");
        not_ready.push((reason.into(), msg.clone()));
        Condition::new(
            "IsolationVerified",
            ConditionStatus::False,
            reason,
            clip(&msg),
        )
    } else if refused == 0 {
        Condition::new(
            "IsolationVerified",
            ConditionStatus::Unknown,
            "NoLayers",
            "no layer to verify",
        )
    } else {
        Condition::new(
            "IsolationVerified",
            ConditionStatus::True,
            "ProbesPassed",
            format!(
                "{refused} probes behaved as isolation requires (cross-tenant attempts refused, own access allowed)"
            ),
        )
    }
}

fn isolated_message(kind: LayerKind, v: &Verification) -> String {
    format!(
        "{kind} isolation in place; {} of {} probes passed",
        v.probes.iter().filter(|p| p.passed).count(),
        v.probes.len()
    )
}

/// Per-layer detail for status.
pub fn layer_details(layers: &BTreeMap<LayerKind, LayerOutcome>) -> Vec<LayerDetail> {
    layers
        .iter()
        .filter_map(|(kind, outcome)| match outcome {
            LayerOutcome::Disabled | LayerOutcome::NotConfigured => None,
            LayerOutcome::Failed { message, .. } => Some(LayerDetail {
                layer: kind.name().to_owned(),
                isolated: false,
                verified: false,
                last_probe_time: None,
                probes_passed: 0,
                probes_failed: 0,
                failures: vec![clip(message)],
                traffic: Vec::new(),
            }),
            LayerOutcome::Checked {
                verification,
                probed_at,
            } => Some(LayerDetail {
                layer: kind.name().to_owned(),
                isolated: verification.isolated(),
                verified: verification.verified(),
                last_probe_time: Some(probed_at.clone()),
                probes_passed: count(verification.probes.iter().filter(|p| p.passed).count()),
                probes_failed: count(verification.probes.iter().filter(|p| !p.passed).count()),
                failures: verification
                    .failures()
                    .iter()
                    .take(20)
                    .map(|f| clip(f))
                    .collect(),
                traffic: verification
                    .traffic
                    .as_ref()
                    .map(|t| t.paths.clone())
                    .unwrap_or_default(),
            }),
        })
        .collect()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Cuts a message to [`MAX_MESSAGE`] bytes on a character boundary.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut end = MAX_MESSAGE - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Probe;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap())
    }

    fn checked(findings: &[&str], probes: &[(&str, bool)]) -> LayerOutcome {
        LayerOutcome::Checked {
            verification: Verification {
                findings: findings.iter().map(|s| s.to_string()).collect(),
                probes: probes
                    .iter()
                    .map(|(n, ok)| Probe::new(*n, *ok, if *ok { "refused" } else { "allowed" }))
                    .collect(),
                traffic: None,
            },
            probed_at: now(),
        }
    }

    fn get<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == t).unwrap()
    }

    fn network_with(traffic: Traffic) -> BTreeMap<LayerKind, LayerOutcome> {
        let mut outcome = checked(&[], &[("ingress from org-b", true)]);
        if let LayerOutcome::Checked { verification, .. } = &mut outcome {
            verification.traffic = Some(traffic);
        }
        BTreeMap::from([(LayerKind::Network, outcome)])
    }

    fn path(policy: &str, packet: &str) -> crate::api::TrafficPath {
        crate::api::TrafficPath {
            path: "to beta's canary".into(),
            destination: "org-beta/bulkhead-canary 10.244.0.7:8080".into(),
            policy: policy.into(),
            packet: packet.into(),
            agrees: (policy == "allows") == (packet == "open"),
        }
    }

    #[test]
    fn no_traffic_probe_means_no_enforcement_condition() {
        let layers = BTreeMap::from([(LayerKind::Network, checked(&[], &[("x", true)]))]);
        let cs = conditions(&Workspace::Ready, &layers);
        assert!(cs.iter().all(|c| c.type_ != "NetworkPolicyEnforced"));
    }

    #[test]
    fn packets_that_match_the_policies_are_enforced() {
        let cs = conditions(
            &Workspace::Ready,
            &network_with(Traffic {
                paths: vec![path("refuses", "refused"), path("allows", "open")],
                not_run: None,
                skipped: vec!["no Ready DNS Pod in kube-system".into()],
            }),
        );
        let c = get(&cs, "NetworkPolicyEnforced");
        assert_eq!(c.status, ConditionStatus::True);
        assert_eq!(c.reason, "PacketsMatchPolicy");
        assert!(c.message.contains("no Ready DNS Pod"), "{}", c.message);
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::True);
    }

    #[test]
    fn a_packet_through_a_refusing_policy_is_not_enforced_and_not_ready() {
        let cs = conditions(
            &Workspace::Ready,
            &network_with(Traffic {
                paths: vec![path("refuses", "open"), path("allows", "open")],
                ..Default::default()
            }),
        );
        let c = get(&cs, "NetworkPolicyEnforced");
        assert_eq!(c.status, ConditionStatus::False);
        assert_eq!(c.reason, "NotEnforced");
        assert!(
            c.message.contains("does not enforce NetworkPolicy"),
            "{}",
            c.message
        );
        assert!(c.message.contains("10.244.0.7:8080"), "{}", c.message);
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::False);
        // The evaluator still says isolated: the two verdicts stand side by side.
        assert_eq!(get(&cs, "NetworkIsolated").status, ConditionStatus::True);
    }

    #[test]
    fn a_dropped_allowed_packet_and_a_probe_that_did_not_run_are_told_apart() {
        let cs = conditions(
            &Workspace::Ready,
            &network_with(Traffic {
                paths: vec![path("allows", "timeout")],
                ..Default::default()
            }),
        );
        assert_eq!(get(&cs, "NetworkPolicyEnforced").reason, "DataplaneRefuses");
        let cs = conditions(
            &Workspace::Ready,
            &network_with(Traffic::not_run(
                "the canary Pod org-a/bulkhead-canary is not Ready",
                vec![],
            )),
        );
        let c = get(&cs, "NetworkPolicyEnforced");
        assert_eq!(c.status, ConditionStatus::Unknown);
        assert_eq!(c.reason, "TrafficProbeNotRun");
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::False);
    }

    #[test]
    fn traffic_paths_reach_the_layer_detail() {
        let d = layer_details(&network_with(Traffic {
            paths: vec![path("refuses", "refused")],
            ..Default::default()
        }));
        assert_eq!(d[0].traffic.len(), 1);
        assert_eq!(d[0].traffic[0].packet, "refused");
    }

    #[test]
    fn all_isolated_and_verified_is_ready() {
        let layers = BTreeMap::from([
            (LayerKind::Database, checked(&[], &[("select other", true)])),
            (
                LayerKind::Network,
                checked(&[], &[("ingress from org-b", true)]),
            ),
            (LayerKind::Storage, LayerOutcome::NotConfigured),
            (LayerKind::Cache, LayerOutcome::Disabled),
        ]);
        let cs = conditions(&Workspace::Ready, &layers);
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::True);
        assert_eq!(get(&cs, "IsolationVerified").status, ConditionStatus::True);
        assert_eq!(get(&cs, "DatabaseIsolated").status, ConditionStatus::True);
        assert_eq!(
            get(&cs, "StorageIsolated").status,
            ConditionStatus::Unknown,
            "not configured never looks isolated"
        );
        assert_eq!(get(&cs, "StorageIsolated").reason, "NotConfigured");
        assert_eq!(get(&cs, "CacheIsolated").reason, "Disabled");
        assert_eq!(cs[0].type_, "Ready");
    }

    #[test]
    fn a_failing_layer_sets_only_its_own_condition_false() {
        let layers = BTreeMap::from([
            (LayerKind::Database, checked(&[], &[("select other", true)])),
            (
                LayerKind::Cache,
                LayerOutcome::Failed {
                    reason: "BackendUnreachable".into(),
                    message: "connection refused".into(),
                },
            ),
            (LayerKind::Network, checked(&[], &[("ingress", true)])),
        ]);
        let cs = conditions(&Workspace::Ready, &layers);
        assert_eq!(get(&cs, "CacheIsolated").status, ConditionStatus::False);
        assert_eq!(get(&cs, "CacheIsolated").reason, "BackendUnreachable");
        assert_eq!(get(&cs, "DatabaseIsolated").status, ConditionStatus::True);
        assert_eq!(get(&cs, "NetworkIsolated").status, ConditionStatus::True);
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::False);
        assert_eq!(get(&cs, "Ready").reason, "BackendUnreachable");
        assert_eq!(get(&cs, "IsolationVerified").status, ConditionStatus::False);
    }

    #[test]
    fn an_allowed_cross_tenant_probe_fails_verification_with_its_name() {
        let layers = BTreeMap::from([(
            LayerKind::Cache,
            checked(&[], &[("GET org:b:canary", false), ("SET org:b:x", true)]),
        )]);
        let cs = conditions(&Workspace::Ready, &layers);
        let v = get(&cs, "IsolationVerified");
        assert_eq!(v.status, ConditionStatus::False);
        assert_eq!(v.reason, "ProbeFailed");
        assert!(v.message.contains("GET org:b:canary"), "{}", v.message);
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::False);
    }

    #[test]
    fn findings_make_the_layer_not_isolated() {
        let layers = BTreeMap::from([(
            LayerKind::Database,
            checked(&["messages: RLS disabled"], &[("select", true)]),
        )]);
        let cs = conditions(&Workspace::Ready, &layers);
        let d = get(&cs, "DatabaseIsolated");
        assert_eq!(
            (d.status, d.reason.as_str()),
            (ConditionStatus::False, "IsolationFindings")
        );
        assert!(d.message.contains("messages: RLS disabled"));
        let details = layer_details(&layers);
        assert_eq!(details.len(), 1);
        assert!(!details[0].isolated);
        assert!(details[0].verified);
        assert_eq!(details[0].probes_passed, 1);
    }

    #[test]
    fn no_layers_is_not_ready() {
        let cs = conditions(&Workspace::Ready, &BTreeMap::new());
        assert_eq!(get(&cs, "Ready").status, ConditionStatus::False);
        assert_eq!(get(&cs, "Ready").reason, "NoLayers");
    }

    #[test]
    fn workspace_failure_blocks_ready() {
        let layers = BTreeMap::from([(LayerKind::Network, checked(&[], &[("x", true)]))]);
        let ws = Workspace::Failed {
            reason: "NamespaceConflict".into(),
            message: "namespace org-a belongs to someone else".into(),
        };
        let cs = conditions(&ws, &layers);
        assert_eq!(get(&cs, "CredentialsReady").status, ConditionStatus::False);
        assert_eq!(get(&cs, "Ready").reason, "NamespaceConflict");
    }

    #[test]
    fn clip_respects_char_boundaries() {
        let long = "é".repeat(2000);
        let c = clip(&long);
        assert!(c.len() <= MAX_MESSAGE);
        assert!(c.ends_with("..."));
    }
}
