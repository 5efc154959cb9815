use super::*;
use crate::layers::network::plan::tests::tenant;
use serde_json::json;

fn probe(v: serde_json::Value) -> TrafficProbe {
    serde_json::from_value(v).unwrap()
}

fn config() -> TrafficConfig {
    validate(
        &probe(json!({"image": "bulkhead.local/netprobe:1"})),
        NetworkMode::Namespace,
    )
    .unwrap()
}

fn target(name: &str, cross: bool, allows: bool) -> Target {
    Target {
        name: name.to_owned(),
        what: format!("to {name}"),
        pod: format!("ns/{name}"),
        ip: "10.244.0.9".to_owned(),
        port: 8080,
        cross_tenant: cross,
        policy_allows: allows,
        policy_stable: true,
    }
}

#[test]
fn defaults_are_filled_in() {
    let c = config();
    assert_eq!(c.port, 8080);
    assert_eq!(c.settle_millis, 2000);
    assert_eq!(c.timeout_millis, 1500);
    assert_eq!(c.pull_policy, "IfNotPresent");
    assert_eq!(
        c.dns_labels.get("k8s-app").map(String::as_str),
        Some("kube-dns")
    );
    assert_eq!(c.probe_deadline().as_millis(), 2000 + 1500 + 45_000);
}

#[test]
fn bad_settings_are_refused_with_their_field() {
    let cases = [
        (json!({"image": ""}), "image"),
        (json!({"image": "a b"}), "image"),
        (json!({"image": "img;rm -rf /"}), "image"),
        (json!({"image": "-flag"}), "image"),
        (json!({"image": "x".repeat(513)}), "image"),
        (
            json!({"image": "i", "imagePullPolicy": "Sometimes"}),
            "imagePullPolicy",
        ),
        (json!({"image": "i", "canaryPort": 80}), "canaryPort"),
        (json!({"image": "i", "canaryPort": 70000}), "canaryPort"),
        (json!({"image": "i", "settleMillis": 30001}), "settleMillis"),
        (
            json!({"image": "i", "connectTimeoutMillis": 10}),
            "connectTimeoutMillis",
        ),
        (json!({"image": "i", "dnsPodLabels": {}}), "dnsPodLabels"),
        (
            json!({"image": "i", "dnsPodLabels": {"k8s-app": "a b"}}),
            "dnsPodLabels",
        ),
        (
            json!({"image": "i", "dnsPodLabels": {"bad key!": "x"}}),
            "dnsPodLabels",
        ),
        (
            json!({"image": "i", "dnsPodLabels": {"a,b": "x"}}),
            "dnsPodLabels",
        ),
        (
            json!({"image": "i", "dnsPodLabels": {"k": "x=y"}}),
            "dnsPodLabels",
        ),
    ];
    for (v, field) in cases {
        let err = validate(&probe(v.clone()), NetworkMode::Namespace).unwrap_err();
        assert!(err.contains(field), "{v}: {err}");
    }
    let err = validate(&probe(json!({"image": "i"})), NetworkMode::SharedNamespace).unwrap_err();
    assert!(err.contains("mode namespace"), "{err}");
}

#[test]
fn image_references_with_registry_digest_and_port_pass() {
    for image in [
        "bulkhead.local/netprobe:1",
        "registry.example:5000/team/netprobe:0.1.0",
        "example/netprobe@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        validate(&probe(json!({ "image": image })), NetworkMode::Namespace).unwrap();
    }
}

fn restricted(pod: &Pod) {
    let spec = pod.spec.as_ref().unwrap();
    let psc = spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65534));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.host_network, None);
    for c in &spec.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
        assert_eq!(sc.privileged, None);
        let r = c.resources.as_ref().unwrap();
        assert!(r.requests.is_some() && r.limits.is_some());
    }
}

#[test]
fn canary_runs_restricted_owned_and_labelled() {
    let t = tenant("acme");
    let pod = canary_pod(&config(), &t);
    restricted(&pod);
    assert_eq!(pod.metadata.name.as_deref(), Some(CANARY_NAME));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("org-acme"));
    let l = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(l.get(ORG_ID_LABEL).map(String::as_str), Some("acme"));
    assert_eq!(l.get(ROLE_LABEL).map(String::as_str), Some(CANARY));
    assert_eq!(
        pod.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-acme"
    );
    let c = &pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        c.args.as_deref(),
        Some(&["listen".to_owned(), "8080".to_owned()][..])
    );
    assert!(c.readiness_probe.is_some());
    assert!(owned_by(&pod, &t));
    assert!(current(&pod, &canary_pod(&config(), &t)));
}

#[test]
fn a_changed_setting_makes_the_canary_stale() {
    let t = tenant("acme");
    let old = canary_pod(&config(), &t);
    let mut c = config();
    c.port = 9090;
    assert!(!current(&old, &canary_pod(&c, &t)));
    let mut c = config();
    c.image = "other/netprobe:2".into();
    assert!(!current(&old, &canary_pod(&c, &t)));
    // A live Pod without the annotation is never taken as current.
    let mut bare = old.clone();
    bare.metadata.annotations = None;
    assert!(!current(&bare, &old));
}

#[test]
fn pods_bulkhead_did_not_create_for_the_organization_are_not_owned() {
    let t = tenant("acme");
    let mine = canary_pod(&config(), &t);
    // Another organization's canary.
    assert!(!owned_by(&mine, &tenant("beta")));
    // The tenant's own Pod named like the canary, even with copied labels.
    let mut forged = mine.clone();
    forged.metadata.owner_references = None;
    assert!(!owned_by(&forged, &t));
    let mut forged = mine.clone();
    forged.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-other".into();
    assert!(!owned_by(&forged, &t));
    let mut unlabelled = mine;
    unlabelled.metadata.labels = None;
    assert!(!owned_by(&unlabelled, &t));
}

#[test]
fn probe_pod_is_one_shot_restricted_and_bounded() {
    let t = tenant("acme");
    let targets = [target("peer", true, false), target("own", false, true)];
    let pod = probe_pod(&config(), &t, &targets);
    restricted(&pod);
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.active_deadline_seconds, Some(48));
    assert_eq!(pod.metadata.generate_name.as_deref(), Some(PROBE_PREFIX));
    assert_eq!(pod.metadata.name, None);
    assert_eq!(
        spec.containers[0].args.as_deref().unwrap(),
        [
            "connect",
            "--timeout-ms",
            "1500",
            "--delay-ms",
            "2000",
            "peer=10.244.0.9:8080",
            "own=10.244.0.9:8080"
        ]
    );
    assert_eq!(
        pod.metadata
            .labels
            .as_ref()
            .unwrap()
            .get(ROLE_LABEL)
            .map(String::as_str),
        Some(PROBE)
    );
}

#[test]
fn ipv6_targets_are_bracketed() {
    let mut t = target("own", false, true);
    t.ip = "fd00::7".into();
    assert_eq!(probe_args(&config(), &[t])[5], "own=[fd00::7]:8080");
}

#[test]
fn reports_parse_in_target_order() {
    let targets = [target("peer", true, false), target("own", false, true)];
    let got = parse_report("own open 3\npeer timeout 1500\n", &targets).unwrap();
    assert_eq!(got, vec![(Packet::Timeout, 1500), (Packet::Open, 3)]);
}

#[test]
fn bad_reports_are_refused_whole() {
    let targets = [target("peer", true, false), target("own", false, true)];
    for (report, why) in [
        ("peer refused 1\n", "no line for own"),
        ("peer refused 1\nown open 2\nown open 2\n", "twice"),
        (
            "peer refused 1\nown open 2\nmystery open 1\n",
            "unknown target",
        ),
        ("peer maybe 1\nown open 2\n", "unknown verdict"),
        ("peer refused x\nown open 2\n", "bad duration"),
        ("peer refused\nown open 2\n", "unreadable"),
        ("peer refused 1 extra\nown open 2\n", "unreadable"),
        ("", "no line for peer"),
    ] {
        let err = parse_report(report, &targets).unwrap_err();
        assert!(err.contains(why), "{report:?}: {err}");
    }
}

#[test]
fn a_refused_cross_tenant_packet_passes_and_agrees() {
    let targets = [target("peer", true, false), target("own", false, true)];
    let (paths, probes) = judge(&targets, &[(Packet::Refused, 1), (Packet::Open, 2)]);
    assert!(paths.iter().all(|p| p.agrees));
    assert_eq!(probes.len(), 2);
    assert!(probes.iter().all(|p| p.passed), "{probes:?}");
    let t = Traffic {
        paths,
        ..Default::default()
    };
    assert_eq!(t.unenforced().count(), 0);
    assert_eq!(t.dropped().count(), 0);
}

#[test]
fn a_packet_through_a_refusing_policy_is_unenforced() {
    let targets = [target("peer", true, false), target("own", false, true)];
    let (paths, probes) = judge(&targets, &[(Packet::Open, 1), (Packet::Open, 2)]);
    assert!(!paths[0].agrees);
    assert_eq!(paths[0].policy, "refuses");
    assert_eq!(paths[0].packet, "open");
    assert!(!probes[0].passed);
    assert!(probes[0].detail.contains("reached ns/peer"));
    let t = Traffic {
        paths,
        ..Default::default()
    };
    assert_eq!(t.unenforced().count(), 1);
}

#[test]
fn an_open_policy_and_an_open_packet_agree_but_fail_the_probe() {
    // A foreign allow-all policy: the evaluator and the packet agree the path is open, and
    // isolation is still broken.
    let targets = [target("peer", true, true)];
    let (paths, probes) = judge(&targets, &[(Packet::Open, 1)]);
    assert!(paths[0].agrees);
    assert!(!probes[0].passed);
}

#[test]
fn a_dropped_allowed_path_is_told_apart() {
    let targets = [target("own", false, true), target("dns", false, true)];
    let (paths, probes) = judge(&targets, &[(Packet::Open, 1), (Packet::Timeout, 1500)]);
    let t = Traffic {
        paths,
        ..Default::default()
    };
    assert_eq!(
        t.dropped().map(|p| p.path.as_str()).collect::<Vec<_>>(),
        ["to dns"]
    );
    // DNS and egress are not isolation probes: only the condition reports them.
    assert_eq!(probes.len(), 1);
}

#[test]
fn a_policy_that_changed_during_the_probe_counts_neither_way() {
    let mut t = target("peer", true, false);
    t.policy_stable = false;
    let (paths, probes) = judge(&[t], &[(Packet::Open, 1)]);
    assert_eq!(paths[0].policy, "changed during the probe");
    assert!(!paths[0].agrees);
    // The packet still reached another organization: the isolation probe fails.
    assert!(!probes[0].passed);
    let t = Traffic {
        paths,
        ..Default::default()
    };
    assert_eq!(t.unenforced().count(), 0);
    assert_eq!(t.dropped().count(), 0);
}
