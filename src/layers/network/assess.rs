//! Turns the evaluator's answers for one organization into probes and findings.

use std::collections::BTreeMap;

use super::plan::NetworkConfig;
use super::reach::{
    AddrSet, Cluster, Endpoint, KeyDomain, LabelSpace, LabelledNamespaces, NAMESPACE_NAME_LABEL,
    NamespaceRef, PodSet, Port, Side,
};
use crate::api::ORG_ID_LABEL;
use crate::api::platform::NetworkMode;
use crate::layers::{Probe, Tenant, Verification};

/// Other namespaces named in a failing probe's detail at most.
const MAX_NAMED: usize = 5;

/// One set of the organization's pods, and how to call it in words.
struct Own {
    pods: PodSet,
    what: String,
}

/// A set of pods that must not reach the organization's pods, nor be reached by them.
struct Foreign {
    pods: PodSet,
    what: String,
}

#[derive(Default)]
struct Report {
    verification: Verification,
    /// (offending policy, direction) → what it opens.
    offenders: BTreeMap<(String, &'static str), Vec<String>>,
}

impl Report {
    fn deny(
        &mut self,
        name: String,
        dir: &'static str,
        side: &Side,
        opened: &str,
        other_side: Option<&Side>,
    ) {
        let detail = if !side.allowed {
            "denied".to_owned()
        } else {
            let mut by = side.allowed_by.clone();
            if side.unisolated {
                by.push(format!("no {dir} policy selecting the pods"));
            }
            let path = match other_side {
                Some(o) if o.allowed => "; the other side allows it too: reachable",
                Some(_) => "; the other side's policies still deny it",
                None => "",
            };
            format!("admitted by {}{path}", by.join(", "))
        };
        if side.allowed {
            for p in &side.allowed_by {
                self.offenders
                    .entry((p.clone(), dir))
                    .or_default()
                    .push(opened.to_owned());
            }
        }
        self.verification
            .probes
            .push(Probe::new(name, !side.allowed, detail));
    }

    fn allow(&mut self, name: String, reachable: bool) {
        let detail = if reachable {
            "allowed"
        } else {
            "denied: the organization's own traffic is blocked"
        };
        self.verification
            .probes
            .push(Probe::new(name, reachable, detail));
    }
}

/// Other organizations' namespaces: every namespace with an org-id label other than this
/// organization's, bar the organization's own namespace.
enum Others<'a> {
    /// Grouped by what the organization's policies can tell apart: each group is asked about
    /// once, through one of its namespaces, so the cost follows the number of groups (a handful
    /// when every organization runs the planned policies), not the number of organizations.
    Grouped(LabelledNamespaces<'a>),
    /// Each namespace asked about in turn (name, org id), in name order: what the groups must
    /// answer like, word for word.
    #[cfg(test)]
    Each(Vec<(&'a String, &'a String)>),
}

/// What the namespaces of other organizations may do, one direction: the policies' answers
/// merged over every namespace let through, and those namespaces in words.
struct Admitted {
    side: Side,
    named: String,
}

impl<'a> Others<'a> {
    fn grouped(cluster: &'a Cluster, id: &str, namespace: &str) -> Self {
        Others::Grouped(cluster.labelled_namespaces(ORG_ID_LABEL, id, namespace))
    }

    #[cfg(test)]
    fn each(cluster: &'a Cluster, id: &str, namespace: &str) -> Self {
        Others::Each(
            cluster
                .namespaces()
                .filter_map(|(ns, labels)| labels.get(ORG_ID_LABEL).map(|org| (ns, org)))
                .filter(|(ns, org)| org.as_str() != id && **ns != namespace)
                .collect(),
        )
    }

    fn count(&self) -> usize {
        match self {
            Others::Grouped(g) => g.count(),
            #[cfg(test)]
            Others::Each(all) => all.len(),
        }
    }

    /// The namespaces of organization `org`, in name order.
    fn of(&self, org: &str) -> Vec<String> {
        match self {
            Others::Grouped(g) => g.with_value(org),
            #[cfg(test)]
            Others::Each(all) => all
                .iter()
                .filter(|(_, o)| o.as_str() == org)
                .map(|(ns, _)| (*ns).clone())
                .collect(),
        }
    }

    /// Whether any pod of these namespaces gets into `o`'s pods, and whether `o`'s pods get out
    /// to any of them.
    fn against(&self, cluster: &Cluster, o: &Own, pod_ips: &AddrSet) -> (Admitted, Admitted) {
        let mut admitted_in = Vec::new();
        let mut admitted_out = Vec::new();
        let mut sides_in = Side::default();
        let mut sides_out = Side::default();
        match self {
            Others::Grouped(g) => {
                // Merged in the order of each group's first namespace: the policies come out in
                // the order a walk through every namespace by name meets them.
                let mut groups = g.groups(o.pods_namespace(), MAX_NAMED);
                groups.sort_by(|a, b| a.representative().cmp(b.representative()));
                let (mut count_in, mut count_out) = (0, 0);
                for group in &groups {
                    let them = PodSet::any_in(group.representative(), pod_ips.clone());
                    let i = cluster.ingress(&Endpoint::Pods(them.clone()), &o.pods, &Port::Any);
                    if i.allowed {
                        admitted_in.extend(group.first.iter().cloned());
                        count_in += group.count;
                        merge(&mut sides_in, i);
                    }
                    let e = cluster.egress(&o.pods, &Endpoint::Pods(them), &Port::Any);
                    if e.allowed {
                        admitted_out.extend(group.first.iter().cloned());
                        count_out += group.count;
                        merge(&mut sides_out, e);
                    }
                }
                admitted_in.sort();
                admitted_out.sort();
                (
                    Admitted {
                        side: sides_in,
                        named: named(&admitted_in, count_in),
                    },
                    Admitted {
                        side: sides_out,
                        named: named(&admitted_out, count_out),
                    },
                )
            }
            #[cfg(test)]
            Others::Each(all) => {
                for (ns, _) in all {
                    let them = PodSet::any_in(ns, pod_ips.clone());
                    let i = cluster.ingress(&Endpoint::Pods(them.clone()), &o.pods, &Port::Any);
                    if i.allowed {
                        admitted_in.push((*ns).clone());
                        merge(&mut sides_in, i);
                    }
                    let e = cluster.egress(&o.pods, &Endpoint::Pods(them), &Port::Any);
                    if e.allowed {
                        admitted_out.push((*ns).clone());
                        merge(&mut sides_out, e);
                    }
                }
                (
                    Admitted {
                        side: sides_in,
                        named: named(&admitted_in, admitted_in.len()),
                    },
                    Admitted {
                        side: sides_out,
                        named: named(&admitted_out, admitted_out.len()),
                    },
                )
            }
        }
    }
}

/// Evaluates the organization's isolation on `cluster` (which must hold fresh policies for the
/// namespaces where the organization's pods run).
pub fn assess(cluster: &Cluster, cfg: &NetworkConfig, tenant: &Tenant) -> Verification {
    check(cluster, cfg, tenant, Others::grouped)
}

/// [`assess`] asking about every other organization's namespace in turn.
#[cfg(test)]
fn assess_each(cluster: &Cluster, cfg: &NetworkConfig, tenant: &Tenant) -> Verification {
    check(cluster, cfg, tenant, Others::each)
}

fn check<'a>(
    cluster: &'a Cluster,
    cfg: &NetworkConfig,
    tenant: &Tenant,
    others: fn(&'a Cluster, &str, &str) -> Others<'a>,
) -> Verification {
    let pod_ips = AddrSet::new(cfg.pod_cidrs.clone());
    let id = tenant.org_id.as_str();
    let mut r = Report::default();

    let (own, mut foreign, trusted_in, trusted_out) = match cfg.mode {
        NetworkMode::Namespace => {
            let own = vec![Own {
                pods: PodSet::any_in(&tenant.namespace, pod_ips.clone()),
                what: tenant.namespace.clone(),
            }];
            let mut trusted_in = vec![tenant.namespace.clone()];
            trusted_in.extend(cfg.ingress_namespaces.iter().cloned());
            let mut trusted_out = vec![tenant.namespace.clone(), cfg.dns_namespace.clone()];
            trusted_out.extend(cfg.backend_namespaces.iter().cloned());
            (own, Vec::new(), trusted_in, trusted_out)
        }
        NetworkMode::SharedNamespace => {
            let org_label = |d: KeyDomain| LabelSpace::any().with(ORG_ID_LABEL, d);
            let mut own = Vec::new();
            let mut foreign = Vec::new();
            for ns in &cfg.shared_namespaces {
                own.push(Own {
                    pods: PodSet {
                        labels: org_label(KeyDomain::equals(id)),
                        ..PodSet::any_in(ns, pod_ips.clone())
                    },
                    what: format!("{id}'s pods in {ns}"),
                });
                foreign.push(Foreign {
                    pods: PodSet {
                        labels: org_label(KeyDomain::not_in([id])),
                        ..PodSet::any_in(ns, pod_ips.clone())
                    },
                    what: format!("other pods of shared namespace {ns}"),
                });
                for peer in tenant
                    .peers
                    .iter()
                    .filter(|p| !p.is_sentinel() && p.as_str() != id)
                {
                    foreign.push(Foreign {
                        pods: PodSet {
                            labels: org_label(KeyDomain::equals(peer.as_str())),
                            ..PodSet::any_in(ns, pod_ips.clone())
                        },
                        what: format!("{peer}'s pods in {ns}"),
                    });
                }
            }
            let mut trusted_in = cfg.shared_namespaces.clone();
            trusted_in.extend(cfg.ingress_namespaces.iter().cloned());
            let mut trusted_out = cfg.shared_namespaces.clone();
            trusted_out.push(cfg.dns_namespace.clone());
            trusted_out.extend(cfg.backend_namespaces.iter().cloned());
            (own, foreign, trusted_in, trusted_out)
        }
    };

    // Other organizations' namespaces, as they are; peers the controller names get probes of their own.
    let others = others(cluster, id, &tenant.namespace);
    for peer in tenant.peers.iter().filter(|p| !p.is_sentinel()) {
        for ns in others.of(peer.as_str()) {
            foreign.push(Foreign {
                pods: PodSet::any_in(&ns, pod_ips.clone()),
                what: format!("{peer}'s namespace {ns}"),
            });
        }
    }
    // Whoever else: a namespace with any labels, bar the trusted names and this organization's id.
    let adversary = |trusted: &[String]| PodSet {
        namespace: NamespaceRef::Unknown(
            LabelSpace::any()
                .with(
                    NAMESPACE_NAME_LABEL,
                    KeyDomain::present_but(trusted.iter().map(String::as_str)),
                )
                .with(ORG_ID_LABEL, KeyDomain::not_in([id])),
        ),
        ..PodSet::any_in("", pod_ips.clone())
    };
    let adversary_in = adversary(&trusted_in);
    let adversary_out = adversary(&trusted_out);

    for o in &own {
        let me = Endpoint::Pods(o.pods.clone());
        let side = cluster.ingress(&Endpoint::Pods(adversary_in.clone()), &o.pods, &Port::Any);
        r.deny(
            format!("ingress into {} from any other namespace", o.what),
            "ingress",
            &side,
            "any other namespace",
            None,
        );
        let side = cluster.egress(&o.pods, &Endpoint::Pods(adversary_out.clone()), &Port::Any);
        r.deny(
            format!("egress from {} to any other namespace", o.what),
            "egress",
            &side,
            "any other namespace",
            None,
        );

        for f in &foreign {
            let them = Endpoint::Pods(f.pods.clone());
            let inbound = cluster.path(&them, &me, &Port::Any);
            r.deny(
                format!("ingress into {} from {}", o.what, f.what),
                "ingress",
                &inbound.ingress,
                &f.what,
                Some(&inbound.egress),
            );
            let outbound = cluster.path(&me, &them, &Port::Any);
            r.deny(
                format!("egress from {} to {}", o.what, f.what),
                "egress",
                &outbound.egress,
                &f.what,
                Some(&outbound.ingress),
            );
        }

        let n = others.count();
        if n > 0 {
            let (admitted_in, admitted_out) = others.against(cluster, o, &pod_ips);
            r.deny(
                format!(
                    "ingress into {} from other organizations' namespaces ({n} checked)",
                    o.what
                ),
                "ingress",
                &admitted_in.side,
                &admitted_in.named,
                None,
            );
            r.deny(
                format!(
                    "egress from {} to other organizations' namespaces ({n} checked)",
                    o.what
                ),
                "egress",
                &admitted_out.side,
                &admitted_out.named,
                None,
            );
        }

        // The organization's own paths must stay open, or the policies prove nothing useful.
        let within = cluster.path(&me, &me, &Port::Any).reachable();
        r.allow(format!("within {}: pods reach each other", o.what), within);
        let dns = Endpoint::Pods(PodSet::any_in(&cfg.dns_namespace, pod_ips.clone()));
        let dns_ok = cluster.path(&me, &dns, &Port::udp(53)).egress.allowed;
        r.allow(
            format!(
                "egress from {} to DNS in {} (UDP 53)",
                o.what, cfg.dns_namespace
            ),
            dns_ok,
        );
        for gw in &cfg.ingress_namespaces {
            let g = Endpoint::Pods(PodSet::any_in(gw, pod_ips.clone()));
            let ok = cluster.ingress(&g, &o.pods, &Port::Any).allowed;
            r.allow(
                format!("ingress into {} from gateway namespace {gw}", o.what),
                ok,
            );
        }
        if side_unisolated(cluster, &o.pods) {
            r.verification.findings.push(format!(
                "some pods of {} are selected by no NetworkPolicy: their traffic is not restricted",
                o.what
            ));
        }
    }

    let own_namespaces: Vec<&str> = own.iter().map(|o| o.pods_namespace()).collect();
    for (policy, why) in cluster.unreadable() {
        if own_namespaces
            .iter()
            .any(|ns| policy.starts_with(&format!("{ns}/")))
        {
            r.verification
                .findings
                .push(format!("NetworkPolicy {policy} could not be read ({why}); it is counted as allowing everything"));
        }
    }
    for ((policy, dir), opened) in std::mem::take(&mut r.offenders) {
        let mut opened: Vec<String> = opened.into_iter().filter(|s| !s.is_empty()).collect();
        opened.sort();
        opened.dedup();
        let to_from = if dir == "ingress" { "from" } else { "to" };
        r.verification.findings.push(format!(
            "NetworkPolicy {policy} admits {dir} {to_from} other organizations ({})",
            opened.join("; ")
        ));
    }
    r.verification
}

impl Own {
    fn pods_namespace(&self) -> &str {
        match &self.pods.namespace {
            NamespaceRef::Known(ns) => ns,
            NamespaceRef::Unknown(_) => "",
        }
    }
}

fn merge(into: &mut Side, side: Side) {
    into.allowed |= side.allowed;
    into.unisolated |= side.unisolated;
    for p in side.allowed_by {
        if !into.allowed_by.contains(&p) {
            into.allowed_by.push(p);
        }
    }
}

/// `total` namespaces in words, by the first of them (in name order) and a count of the rest.
fn named(first: &[String], total: usize) -> String {
    let mut s = first
        .iter()
        .take(MAX_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if total > MAX_NAMED {
        s.push_str(&format!(" and {} more", total - MAX_NAMED));
    }
    s
}

/// Whether some of the pods are selected by no ingress or no egress policy at all.
fn side_unisolated(cluster: &Cluster, pods: &PodSet) -> bool {
    let nobody = Endpoint::External(AddrSet::default());
    cluster.ingress(&nobody, pods, &Port::Any).unisolated
        || cluster.egress(pods, &nobody, &Port::Any).unisolated
}

#[cfg(test)]
mod tests;
