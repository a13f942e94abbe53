//! `%name%` placeholders, expanded in one left-to-right pass: a value is
//! never scanned again, so an address that contains `%to_domain%` stays
//! that text instead of being substituted a second time.

/// Replaces each `%name%` in `template` whose name is in `vars` with its
/// value. Unknown placeholders and lone `%` are kept as they are.
pub fn expand(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let hit = vars.iter().find_map(|(name, value)| {
            tail.strip_prefix(name)
                .and_then(|t| t.strip_prefix('%'))
                .map(|after| (*value, after))
        });
        match hit {
            Some((value, after)) => {
                out.push_str(value);
                rest = after;
            }
            // The `%` may open the next placeholder (`100%%to%`): go on
            // right after it.
            None => {
                out.push('%');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARS: &[(&str, &str)] = &[("to", "a@b"), ("to_user", "a"), ("to_domain", "b")];

    #[test]
    fn substitutes_each_placeholder() {
        assert_eq!(expand("/m/%to_domain%/%to_user%", VARS), "/m/b/a");
        assert_eq!(expand("%to%%to%", VARS), "a@ba@b");
        assert_eq!(expand("no placeholders", VARS), "no placeholders");
        assert_eq!(expand("", VARS), "");
    }

    #[test]
    fn values_are_not_expanded_again() {
        let vars = [("to_user", "%to_domain%"), ("to_domain", "evil")];
        assert_eq!(
            expand("/m/%to_user%/%to_domain%", &vars),
            "/m/%to_domain%/evil"
        );
        // A value that completes a placeholder with the template's next
        // character is not one either.
        let vars = [("to_user", "%to"), ("to", "X")];
        assert_eq!(expand("%to_user%%", &vars), "%to%");
    }

    #[test]
    fn unknown_and_stray_percent_signs_stay() {
        assert_eq!(expand("100% %nope% %to", VARS), "100% %nope% %to");
        assert_eq!(expand("%%to%", VARS), "%a@b");
        assert_eq!(expand("%", VARS), "%");
    }
}
