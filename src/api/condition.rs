//! Kubernetes-style conditions, merged so that `lastTransitionTime` moves only on real transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether a condition holds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One observation about the resource, in the shape `kubectl` and GitOps tools understand.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `DatabaseIsolated`, `IsolationVerified`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the status.
    pub reason: String,
    /// Human-readable detail: for a failure, the failing check in words. Never holds credentials.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: Time,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }
}

/// Merges freshly computed conditions into the previous ones.
///
/// The transition time is kept from the previous condition of the same type when its status
/// did not change, and set to `now` otherwise. Conditions not in `fresh` are dropped.
pub fn merge(
    previous: &[Condition],
    fresh: Vec<Condition>,
    now: &Time,
    generation: Option<i64>,
) -> Vec<Condition> {
    fresh
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            c
        })
        .collect()
}

/// The conditions whose status changed between `previous` and `current`, as (type, old, new).
pub fn transitions<'a>(
    previous: &'a [Condition],
    current: &'a [Condition],
) -> impl Iterator<Item = (&'a Condition, Option<ConditionStatus>)> + 'a {
    current.iter().filter_map(move |c| {
        let old = previous
            .iter()
            .find(|p| p.type_ == c.type_)
            .map(|p| p.status);
        (old != Some(c.status)).then_some((c, old))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let first = merge(
            &[],
            vec![Condition::new(
                "Ready",
                ConditionStatus::False,
                "Pending",
                "",
            )],
            &t(10),
            Some(1),
        );
        assert_eq!(first[0].last_transition_time, t(10));
        let same = merge(
            &first,
            vec![Condition::new(
                "Ready",
                ConditionStatus::False,
                "Other",
                "x",
            )],
            &t(20),
            Some(2),
        );
        assert_eq!(
            same[0].last_transition_time,
            t(10),
            "same status keeps the time"
        );
        assert_eq!(same[0].reason, "Other");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            vec![Condition::new(
                "Ready",
                ConditionStatus::True,
                "Isolated",
                "",
            )],
            &t(30),
            Some(2),
        );
        assert_eq!(flipped[0].last_transition_time, t(30));
    }

    #[test]
    fn transitions_lists_only_changes() {
        let a = vec![
            Condition::new("A", ConditionStatus::True, "r", ""),
            Condition::new("B", ConditionStatus::False, "r", ""),
        ];
        let b = vec![
            Condition::new("A", ConditionStatus::True, "r2", ""),
            Condition::new("B", ConditionStatus::True, "r", ""),
            Condition::new("C", ConditionStatus::Unknown, "r", ""),
        ];
        let changed: Vec<_> = transitions(&a, &b)
            .map(|(c, old)| (c.type_.as_str(), old))
            .collect();
        assert_eq!(
            changed,
            vec![("B", Some(ConditionStatus::False)), ("C", None)]
        );
    }
}
