//! `/metrics`: the same counters in the OpenMetrics text format
//! (REFERENCE §7.3): names with every character outside `[A-Za-z0-9_]`
//! turned into `_`, one HELP line per variable, no TYPE lines (a counter
//! type would force a `_total` suffix and change the names), and no other
//! comment: non-numeric variables are simply left out. Pushed names and
//! labels are arbitrary text, so everything is escaped or replaced to keep
//! the output parseable whatever peers send.

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
    // Exposed name → variable, sorted by exposed name. Two variables can
    // share an exposed name (`a/b` and `a_b`), and a family may appear only
    // once: the first one wins, the known variables before pushed ones.
    let mut families: BTreeMap<String, &str> = BTreeMap::new();
    let known = VARIABLES.iter().map(|(n, _, _)| *n);
    let all = t.counters.keys().chain(t.maps.keys()).map(String::as_str);
    for var in known.chain(all) {
        let name = metric_name(var);
        if !name.is_empty() {
            families.entry(name).or_insert(var);
        }
    }
    let mut out = String::new();
    for (name, var) in families {
        let text = match help.get(var) {
            Some(h) => h.to_string(),
            None => help_text(var),
        };
        if let Some(v) = t.counters.get(var) {
            out.push_str(&format!("# HELP {name} {text}\n{name} {v}\n"));
        } else if let Some(map) = t.maps.get(var) {
            out.push_str(&format!("# HELP {name} {text}\n"));
            let label = label_name(var);
            for (k, v) in map {
                out.push_str(&format!("{name}{{{label}=\"{}\"}} {v}\n", escape_label(k)));
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// A pushed variable's name as its help text. OpenMetrics wants `"` and
/// `\` escaped in help texts and Prometheus's classic text parser refuses
/// an escaped `"`; neither has any use in a name, so they become `_`, as
/// does any control character.
fn help_text(var: &str) -> String {
    var.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The label name of a map variable (REFERENCE §7.2).
fn label_name(var: &str) -> &'static str {
    match var {
        "chasquid/smtpIn/commandCount" | "chasquid/smtpIn/wrongProtoCount" => "command",
        "chasquid/smtpIn/responseCodeCount" => "code",
        "chasquid/smtpIn/tlsCount" => "status",
        "chasquid/queue/deliverAttempts" => "recipient_type",
        "chasquid/smtpOut/sts/mode" => "mode",
        "tambo/monitord/droppedDeltas" | "tambo/monitord/httpClosed" => "reason",
        _ => "result",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::Budget;
    use tambo_proto::Role;
    use tambo_proto::monitor::Delta;

    fn push(t: &mut Totals, var: &str, label: Option<&str>, value: u64) {
        t.apply(
            &mut Budget::new(Role::Smtpd),
            &Delta {
                var: var.into(),
                label: label.map(String::from),
                value,
            },
        );
    }

    #[test]
    fn format() {
        let mut t = Totals::new();
        push(
            &mut t,
            "chasquid/smtpIn/commandCount",
            Some("unknown\"X\""),
            2,
        );
        push(&mut t, "chasquid/queue/putCount", None, 7);
        let s = render(&t);
        assert!(s.contains("# HELP chasquid_queue_putCount envelopes put in the queue\nchasquid_queue_putCount 7\n"), "{s}");
        assert!(
            s.contains("chasquid_smtpIn_commandCount{command=\"unknown\\\"X\\\"\"} 2\n"),
            "{s}"
        );
        assert!(s.ends_with("\n# EOF\n"));
        assert!(!s.contains("\n\n"), "no blank lines");
        assert!(!s.contains("# TYPE"));
        assert!(!s.contains("non-numeric"), "no free comments");
        assert_eq!(metric_name("9x/y"), "i9x_y");
        check_grammar(&s);
    }

    /// Whatever peers push, every line is one the OpenMetrics grammar
    /// allows (the subset tambo emits): `# HELP` with a valid metric name
    /// and an escaped text, samples of that family with escaped label
    /// values, each family once, and `# EOF` last.
    #[test]
    fn any_pushed_names_give_valid_openmetrics() {
        let mut t = Totals::new();
        for (var, label) in [
            ("tambo/e2e/a\"b\\c\nd\re", None),
            (
                "tambo/e2e/map",
                Some("quote\" back\\ nl\n cr\r tab\t nul\0 ünï"),
            ),
            ("tambo/e2e/map", Some("")),
            ("tambo/ünïcödé/näme", Some("x")),
            // Both expose as tambo_e2e_same: one family only.
            ("tambo/e2e/same", None),
            ("tambo/e2e.same", None),
            ("tambo/e2e/same:map", Some("a")),
            ("tambo/e2e/same_map", Some("b")),
            // Collides with a known variable, which must win.
            ("chasquid/queue:putCount", None),
            ("tambo/#", None),
            ("tambo/ ", Some(" ")),
        ] {
            push(&mut t, var, label, 1);
        }
        push(&mut t, "chasquid/queue/putCount", None, u64::MAX);
        let s = render(&t);
        check_grammar(&s);
        assert!(
            s.contains("\nchasquid_queue_putCount 18446744073709551615\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "tambo_e2e_map{result=\"quote\\\" back\\\\ nl\\n cr\r tab\t nul\0 ünï\"} 1\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("# HELP tambo_e2e_a_b_c_d_e tambo/e2e/a_b_c_d_e\n"),
            "{s}"
        );
    }

    #[test]
    fn known_variables_have_distinct_names_and_plain_help() {
        let mut seen = std::collections::HashSet::new();
        for (var, _, help) in VARIABLES {
            assert!(seen.insert(metric_name(var)), "{var} collides");
            assert_eq!(help_text(help), *help, "{var}'s help needs escaping");
        }
    }

    fn is_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// The rest of `s` after one escaped string (up to an unescaped `"`,
    /// or the end if `quoted` is false), or None if it is not one.
    fn escaped(s: &str, quoted: bool) -> Option<&str> {
        let mut it = s.char_indices();
        while let Some((i, c)) = it.next() {
            match c {
                // The guard takes the escaped character.
                '\\' if !matches!(it.next(), Some((_, 'n' | '"' | '\\'))) => return None,
                '"' if quoted => return Some(&s[i + 1..]),
                '"' | '\n' => return None,
                _ => {}
            }
        }
        (!quoted).then_some("")
    }

    fn check_grammar(s: &str) {
        let body = s
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("no final # EOF: {s}"));
        let mut families = std::collections::HashSet::new();
        let mut family: Option<&str> = None;
        for line in body.split_inclusive('\n') {
            let line = line
                .strip_suffix('\n')
                .unwrap_or_else(|| panic!("unterminated line {line:?}"));
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(is_name(name), "bad name in {line:?}");
                assert!(families.insert(name), "{name} appears twice");
                assert!(escaped(text, false).is_some(), "bad help in {line:?}");
                // Prometheus's classic parser refuses `\"` in a help text,
                // so tambo emits no escapes there at all.
                assert!(!text.contains(['\\', '"']), "escape in help {line:?}");
                family = Some(name);
                continue;
            }
            assert!(
                !line.starts_with('#'),
                "a comment other than HELP: {line:?}"
            );
            let cut = line.find(['{', ' ']).unwrap_or_else(|| panic!("{line:?}"));
            let (name, mut rest) = line.split_at(cut);
            assert_eq!(Some(name), family, "sample outside its family: {line:?}");
            if let Some(labels) = rest.strip_prefix('{') {
                let (lname, after) = labels
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("{line:?}"));
                assert!(is_name(lname) && !lname.contains(':'), "{line:?}");
                let after = escaped(after, true).unwrap_or_else(|| panic!("{line:?}"));
                rest = after
                    .strip_prefix('}')
                    .unwrap_or_else(|| panic!("one label only: {line:?}"));
            }
            let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("{line:?}"));
            assert!(
                !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
                "bad value in {line:?}"
            );
        }
    }
}
