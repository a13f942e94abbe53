//! `/debug/vars`: the expvar-style JSON chasquid serves, with the same
//! variable names, so dashboards and prometheus-expvar-exporter configs
//! work unchanged.

use serde_json::{Map, Value, json};

use tambo_common::build;
use tambo_proto::metrics::names;

use crate::collector::Totals;

/// The live processes, as monitord knows them.
pub const PROCESSES: &str = "tambo/processes";

/// The entries monitord writes itself. The collector drops pushed
/// increases to any of them, and [`render`] writes them after the pushed
/// variables, so no peer can replace monitord's version or command line.
pub const FIXED: [&str; 5] = [
    "cmdline",
    names::VERSION,
    names::SOURCE_DATE_STR,
    names::SOURCE_DATE_TIMESTAMP,
    PROCESSES,
];

pub fn render(t: &Totals, cmdline: &[String]) -> String {
    let mut m = Map::new();
    for (k, v) in &t.counters {
        m.insert(k.clone(), json!(v));
    }
    for (k, map) in &t.maps {
        m.insert(k.clone(), json!(map));
    }
    // Last: each replaces a pushed variable of the same name, should one
    // ever get past the collector.
    m.insert(FIXED[0].into(), json!(cmdline));
    m.insert(FIXED[1].into(), json!(build::VERSION));
    m.insert(FIXED[2].into(), json!(build::date_str()));
    m.insert(FIXED[3].into(), json!(build::timestamp()));
    m.insert(
        FIXED[4].into(),
        Value::Array(
            t.processes
                .iter()
                .filter(|p| p.connected)
                .map(|p| json!({"role": p.role.name(), "pid": p.pid, "version": p.version}))
                .collect(),
        ),
    );
    // serde_json's map is sorted, so the output is stable.
    serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::Budget;
    use std::collections::BTreeMap;
    use tambo_proto::Role;
    use tambo_proto::monitor::Delta;

    #[test]
    fn pushed_names_cannot_replace_fixed_entries() {
        let mut t = Totals::new();
        let mut b = Budget::new(Role::Smtpd);
        for var in FIXED {
            t.apply(
                &mut b,
                &Delta {
                    var: var.into(),
                    label: None,
                    value: 7,
                },
            );
        }
        // Even were the collector to let them through.
        for var in &FIXED[..3] {
            t.counters.insert(var.to_string(), 7);
        }
        for var in &FIXED[3..] {
            t.maps
                .insert(var.to_string(), BTreeMap::from([("x".into(), 7)]));
        }
        let v: Value = serde_json::from_str(&render(&t, &["tambo-monitord".into()])).unwrap();
        assert_eq!(v["cmdline"], json!(["tambo-monitord"]));
        assert_eq!(v[names::VERSION], build::VERSION);
        assert_eq!(v[names::SOURCE_DATE_STR], build::date_str());
        assert_eq!(v[names::SOURCE_DATE_TIMESTAMP], build::timestamp());
        assert_eq!(v[PROCESSES], json!([]));
        assert_eq!(v[names::MONITORD_DROPPED_KEYS], 5);
    }
}
