//! `/debug/vars`: the expvar-style JSON chasquid serves, with the same
//! variable names, so dashboards and prometheus-expvar-exporter configs
//! work unchanged.

use serde_json::{Map, Value, json};

use tambo_common::build;

use crate::collector::Totals;

pub fn render(t: &Totals, cmdline: &[String]) -> String {
    let mut m = Map::new();
    m.insert("cmdline".into(), json!(cmdline));
    m.insert("chasquid/version".into(), json!(build::VERSION));
    m.insert("chasquid/sourceDateStr".into(), json!(build::date_str()));
    m.insert(
        "chasquid/sourceDateTimestamp".into(),
        json!(build::timestamp()),
    );
    for (k, v) in &t.counters {
        m.insert(k.clone(), json!(v));
    }
    for (k, map) in &t.maps {
        m.insert(k.clone(), json!(map));
    }
    m.insert(
        "tambo/processes".into(),
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
