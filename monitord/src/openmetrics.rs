//! `/metrics`: the same counters in the OpenMetrics text format
//! (REFERENCE §7.3): names with every character outside `[A-Za-z0-9_]`
//! turned into `_`, one HELP line per variable, no TYPE lines (a counter
//! type would force a `_total` suffix and change the names).

use std::collections::BTreeMap;

use tambo_proto::metrics::VARIABLES;

use crate::collector::Totals;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn metric_name(var: &str) -> String {
    let mut s: String = var
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, 'i');
    }
    s
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(t: &Totals) -> String {
    let help: BTreeMap<&str, &str> = VARIABLES.iter().map(|(n, _, h)| (*n, *h)).collect();
    // Sorted by exposed name.
    let mut entries: Vec<(String, &str)> = t
        .counters
        .keys()
        .chain(t.maps.keys())
        .map(|k| (metric_name(k), k.as_str()))
        .collect();
    entries.sort();
    let mut out = String::new();
    for (name, var) in entries {
        out.push_str(&format!(
            "# HELP {name} {}\n",
            help.get(var).copied().unwrap_or(var)
        ));
        if let Some(v) = t.counters.get(var) {
            out.push_str(&format!("{name} {v}\n"));
        } else if let Some(map) = t.maps.get(var) {
            let label = label_name(var);
            for (k, v) in map {
                out.push_str(&format!("{name}{{{label}=\"{}\"}} {v}\n", escape_label(k)));
            }
        }
    }
    out.push_str(
        "# HELP non-numeric variables left out: chasquid/version chasquid/sourceDateStr cmdline\n",
    );
    out.push_str("# EOF\n");
    out
}

/// The label name of a map variable (REFERENCE §7.2).
fn label_name(var: &str) -> &'static str {
    match var {
        "chasquid/smtpIn/commandCount" | "chasquid/smtpIn/wrongProtoCount" => "command",
        "chasquid/smtpIn/responseCodeCount" => "code",
        "chasquid/smtpIn/tlsCount" => "status",
        "chasquid/queue/deliverAttempts" => "recipient_type",
        "chasquid/smtpOut/sts/mode" => "mode",
        _ => "result",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tambo_proto::monitor::Delta;

    #[test]
    fn format() {
        let mut t = Totals::new();
        t.apply(&Delta {
            var: "chasquid/smtpIn/commandCount".into(),
            label: Some("unknown\"X\"".into()),
            value: 2,
        });
        t.apply(&Delta {
            var: "chasquid/queue/putCount".into(),
            label: None,
            value: 7,
        });
        let s = render(&t);
        assert!(s.contains("# HELP chasquid_queue_putCount envelopes put in the queue\nchasquid_queue_putCount 7\n"), "{s}");
        assert!(
            s.contains("chasquid_smtpIn_commandCount{command=\"unknown\\\"X\\\"\"} 2\n"),
            "{s}"
        );
        assert!(s.ends_with("# EOF\n"));
        assert!(!s.contains("\n\n"), "no blank lines");
        assert!(!s.contains("# TYPE"));
        assert_eq!(metric_name("9x/y"), "i9x_y");
    }
}
