//! Organizations as the tests see them from outside: conditions, waiting for Ready and
//! Verified, and the credentials Secret.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bulkhead::api::Organization;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

/// Whether condition `t` of `o` is True.
pub fn is_true(o: &Organization, t: &str) -> bool {
    o.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == t && format!("{:?}", c.status) == "True")
    })
}

/// Every condition of `o`, one per line, for failure messages.
pub fn conditions(o: &Organization) -> String {
    o.status
        .as_ref()
        .map(|s| {
            s.conditions
                .iter()
                .map(|c| format!("{}={:?} {}: {}", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Waits until `name` is Ready and IsolationVerified (at most `limit`).
pub async fn wait_verified_within(
    api: &Api<Organization>,
    name: &str,
    limit: Duration,
) -> Organization {
    let start = Instant::now();
    loop {
        let o = api.get(name).await.expect("get org");
        if is_true(&o, "Ready") && is_true(&o, "IsolationVerified") {
            return o;
        }
        if start.elapsed() > limit {
            panic!(
                "{name} not Ready and Verified after {limit:?}:\n{}",
                conditions(&o)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// [`wait_verified_within`] 180 s.
pub async fn wait_verified(api: &Api<Organization>, name: &str) -> Organization {
    wait_verified_within(api, name, Duration::from_secs(180)).await
}

/// The organization's credentials Secret in `ns`, decoded.
pub async fn credentials(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get("bulkhead-credentials")
        .await
        .expect("credentials Secret");
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}
