//! The `status` and `probe` commands: what an operator of the platform runs by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};

use crate::api::{ConditionStatus, IsolationPlatform, Organization};
use crate::controller::pass;
use crate::controller::workspace::CREDENTIALS_SECRET;
use crate::layers::{self, BuildEnv, Credentials, LayerKind, Probe, Tenant};
use crate::tenant::OrgId;

/// Renders a compact table: per organization and per layer, isolated and verified.
pub fn status_table(orgs: &[Organization]) -> String {
    let mut rows = vec![
        [
            "ORGANIZATION",
            "ORG ID",
            "READY",
            "VERIFIED",
            "DATABASE",
            "STORAGE",
            "CACHE",
            "NETWORK",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for o in orgs {
        let status = o.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| match c.status {
                    ConditionStatus::True => "yes".to_owned(),
                    ConditionStatus::False => "NO".to_owned(),
                    ConditionStatus::Unknown => "-".to_owned(),
                })
        };
        let mut row = vec![
            o.name_any(),
            o.spec.org_id.clone(),
            cond("Ready").unwrap_or_else(|| "?".into()),
            cond("IsolationVerified").unwrap_or_else(|| "?".into()),
        ];
        for kind in LayerKind::ALL {
            let cell = match status.layers.iter().find(|l| l.layer == kind.name()) {
                Some(l) => format!(
                    "{} {} {}/{}",
                    if l.isolated { "isolated" } else { "OPEN" },
                    if l.verified { "verified" } else { "UNVERIFIED" },
                    l.probes_passed,
                    l.probes_passed + l.probes_failed
                ),
                None => status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == kind.condition_type())
                    .map(|c| c.reason.clone())
                    .unwrap_or_else(|| "-".into()),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    render(&rows)
}

/// Left-aligned columns separated by two spaces.
pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Errors of the hand-run commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Layer(#[from] layers::LayerError),
    #[error("{0}")]
    Usage(String),
}

/// Attacks `target`'s canaries with `attacker`'s own credentials in every layer and returns the
/// probes per layer. Nothing is written but the layers' probe keys and objects of the attacker.
pub async fn cross_tenant_probe(
    client: Client,
    operator_namespace: &str,
    attacker: &str,
    target: Option<&str>,
) -> Result<BTreeMap<LayerKind, Result<Vec<Probe>, String>>, CliError> {
    let orgs: Api<Organization> = Api::all(client.clone());
    let org = orgs.get(attacker).await?;
    let peers = match target {
        Some(t) => {
            let other = orgs.get(t).await?;
            vec![OrgId::parse(&other.spec.org_id).map_err(|e| CliError::Usage(e.to_string()))?]
        }
        None => vec![OrgId::sentinel()],
    };
    let platform = Api::<IsolationPlatform>::all(client.clone())
        .get(&org.spec.platform_ref)
        .await?;
    let resolved = pass::resolve_with(std::sync::Arc::new(org), platform, peers)
        .map_err(|b| CliError::Usage(b.message()))?;
    let namespace = resolved.recorded_namespace();
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .get_opt(CREDENTIALS_SECRET)
        .await?
        .ok_or_else(|| {
            CliError::Usage(format!(
                "Organization {attacker} has no credentials Secret in {namespace} yet"
            ))
        })?;
    let creds = Credentials::new(
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect(),
    );
    let env = BuildEnv {
        client: client.clone(),
        operator_namespace,
        platform: &resolved.platform,
        drift: None,
    };
    let built = layers::build_all(&env).await;
    let tenant = Tenant {
        namespace,
        ..resolved.tenant
    };
    let mut out = BTreeMap::new();
    for (kind, slot) in built {
        let res = match slot {
            Err(e) => Err(e.to_string()),
            Ok(layer) => layer
                .verify(&tenant, &creds)
                .await
                .map(|v| v.probes)
                .map_err(|e| e.to_string()),
        };
        out.insert(kind, res);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let t = render(&[
            vec!["A".into(), "BB".into()],
            vec!["CCC".into(), "D".into()],
        ]);
        assert_eq!(t, "A    BB\nCCC  D\n");
    }
}
