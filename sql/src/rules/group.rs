//! Cohort grouping of a rule's alerts: one alert when a site goes dark, not five hundred.
//!
//! A rule with `group_by = 'tenant, site'` puts each firing key in its cohort (the `group_by`
//! values of its row, joined with `/`) and holds it back for `group_wait` of observed stream
//! time ([`super::clock`]). When the wait is over:
//!
//! - at least `group_min` keys of the cohort fired: one **cohort alert** is published (its key
//!   is the cohort, with `count` and the `members`), and the cohort is open: keys of it that
//!   fire later are folded into it, and when every member has resolved, one resolved cohort
//!   alert names them all;
//! - fewer: each held key's alert is published as if the rule were not grouped.
//!
//! A key that fires and resolves while held publishes nothing. Every key's own transitions are
//! recorded in `final.alerts` whatever is published; the cohort alerts are recorded there too.
//! Cohort alert ids are a hash of the rule version, the cohort, the state and the event time
//! (the earliest member's for firing, the last resolving one's for resolved), so a replay that
//! groups the same keys gives the same ids.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{RuleRunner, Transition};

/// A grouped rule's cohorts: keys held back and cohorts firing. Snapshotted with the rule.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Grouper {
    held: BTreeMap<String, Held>,
    open: BTreeMap<String, Open>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    /// Observed time (µs) the cohort's first held key fired.
    since: i64,
    firing: Vec<Transition>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Open {
    /// Every key that fired in the cohort while it was open.
    members: BTreeSet<String>,
    /// The members still firing.
    active: BTreeSet<String>,
    values: serde_json::Map<String, serde_json::Value>,
}

impl Grouper {
    /// What to publish of `rule`'s `transitions`, at the rule's observed time (see the module
    /// docs). Called after every micro-batch and tick, also with no transitions, so held keys
    /// are released when their wait is over.
    pub(super) fn route(
        &mut self,
        rule: &RuleRunner,
        transitions: &[Transition],
    ) -> Vec<Transition> {
        let clock = rule.clock;
        let mut publish = Vec::new();
        for t in transitions {
            let Some(cohort) = t.cohort.clone() else {
                publish.push(t.clone());
                continue;
            };
            if t.state == "firing" {
                if let Some(open) = self.open.get_mut(&cohort) {
                    open.members.insert(t.key.clone());
                    open.active.insert(t.key.clone());
                    continue;
                }
                self.held
                    .entry(cohort)
                    .or_insert_with(|| Held {
                        since: clock,
                        firing: Vec::new(),
                    })
                    .firing
                    .push(t.clone());
                continue;
            }
            if let Some(open) = self.open.get_mut(&cohort)
                && open.active.remove(&t.key)
            {
                if open.active.is_empty() {
                    let open = self.open.remove(&cohort).expect("present");
                    publish.push(cohort_alert(
                        rule,
                        &cohort,
                        "resolved",
                        t.event_time,
                        t.stream_seq,
                        open.members,
                        open.values,
                    ));
                }
                continue;
            }
            if let Some(held) = self.held.get_mut(&cohort)
                && let Some(at) = held.firing.iter().position(|f| f.key == t.key)
            {
                // Fired and resolved while held back: nothing was published, nothing is.
                held.firing.remove(at);
                if held.firing.is_empty() {
                    self.held.remove(&cohort);
                }
                continue;
            }
            publish.push(t.clone());
        }
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| clock.saturating_sub(h.since) >= rule.def.group_wait)
            .map(|(c, _)| c.clone())
            .collect();
        for cohort in due {
            let held = self.held.remove(&cohort).expect("present");
            if held.firing.len() < rule.def.group_min {
                publish.extend(held.firing);
                continue;
            }
            let members: BTreeSet<String> = held.firing.iter().map(|t| t.key.clone()).collect();
            let first = held
                .firing
                .iter()
                .min_by_key(|t| t.event_time)
                .expect("not empty");
            let values: serde_json::Map<String, serde_json::Value> = rule
                .def
                .group_by
                .iter()
                .filter_map(|c| Some((c.clone(), first.values.get(c)?.clone())))
                .collect();
            // Released now, between messages: like a silence firing, it carries the sequence
            // after the rule's position (so the commit that follows records it).
            let seq = rule.position + 1;
            publish.push(cohort_alert(
                rule,
                &cohort,
                "firing",
                first.event_time,
                seq,
                members.clone(),
                values.clone(),
            ));
            self.open.insert(
                cohort,
                Open {
                    active: members.clone(),
                    members,
                    values,
                },
            );
        }
        publish
    }
}

/// One alert for a cohort: its key is the cohort, its values the `group_by` columns and the
/// `count` of members.
fn cohort_alert(
    rule: &RuleRunner,
    cohort: &str,
    state: &str,
    event_time: i64,
    stream_seq: i64,
    members: BTreeSet<String>,
    mut values: serde_json::Map<String, serde_json::Value>,
) -> Transition {
    values.insert("count".into(), serde_json::json!(members.len()));
    let mut t = rule.transition(
        cohort.to_string(),
        state,
        event_time,
        stream_seq,
        values,
        Some(cohort.to_string()),
    );
    t.alert_id = format!(
        "{}-{:016x}",
        rule.def.name,
        crate::hash::stable_hash(&[
            &rule.version,
            "cohort",
            cohort,
            state,
            &event_time.to_string()
        ])
    );
    t.members = members.into_iter().collect();
    // The key is the cohort, not the rule's key columns: the tenant only from the cohort's values.
    t.tenant = t
        .values
        .get(&rule.tenant_column)
        .and_then(|v| v.as_str())
        .map(str::to_string);
    t
}
