//! Slurm hostlist expressions, expanded as `scontrol show hostnames` does,
//! without `scontrol`: a comma-separated list (commas inside brackets do not
//! split), `prefix[1-3,7]suffix` with ranges and single numbers, leading
//! zeros fixing the width (`n[008-010]`), several bracket groups expanding
//! as a cartesian product in order (`rack[0-1]_blade[0-2]`).

/// A hostlist that cannot be expanded, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hostlist '{list}': {reason}")]
pub struct HostlistError {
    pub list: String,
    pub reason: String,
}

/// More hosts than any cluster has: a typo such as `n[0-999999999]` is an
/// error, not an allocation of gigabytes.
const MAX_HOSTS: usize = 1 << 20;

/// Expands `list` into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let err = |reason: &str| HostlistError {
        list: list.to_string(),
        reason: reason.to_string(),
    };
    let mut hosts = Vec::new();
    for item in split_top(list).map_err(|r| err(&r))? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut partial = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    if rest.contains(']') {
                        return Err(err("']' without '['"));
                    }
                    partial.iter_mut().for_each(|p| p.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let (lit, after) = rest.split_at(open);
                    if lit.contains(']') {
                        return Err(err("']' without '['"));
                    }
                    let close = after.find(']').ok_or_else(|| err("'[' without ']'"))?;
                    let values = expand_group(&after[1..close]).map_err(|r| err(&r))?;
                    // Checked before anything is built: groups multiply.
                    let count = partial.len().saturating_mul(values.len());
                    if hosts.len().saturating_add(count) > MAX_HOSTS {
                        return Err(err("expands to more than 1,048,576 hosts"));
                    }
                    let mut next = Vec::with_capacity(count);
                    for p in &partial {
                        for v in &values {
                            next.push(format!("{p}{lit}{v}"));
                        }
                    }
                    partial = next;
                    rest = &after[close + 1..];
                }
            }
        }
        hosts.extend(partial);
        if hosts.len() > MAX_HOSTS {
            return Err(err("expands to more than 1,048,576 hosts"));
        }
    }
    if hosts.is_empty() {
        return Err(err("no host"));
    }
    Ok(hosts)
}

/// Splits on commas outside brackets.
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err("nested '['".to_string()),
            '[' => depth += 1,
            ']' if depth == 0 => return Err("']' without '['".to_string()),
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("'[' without ']'".to_string());
    }
    out.push(&list[start..]);
    Ok(out)
}

/// `1-3,7,010-012` → ["1", "2", "3", "7", "010", "011", "012"].
fn expand_group(group: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in group.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!(
                "'{part}' in brackets: expected a number or a range like 1-4"
            ));
        }
        let width = lo.len();
        let (a, b): (u64, u64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(format!("'{part}': number too large")),
        };
        if a > b {
            return Err(format!("'{part}': range runs backwards"));
        }
        if b - a >= MAX_HOSTS as u64 || out.len() as u64 + (b - a) >= MAX_HOSTS as u64 {
            return Err("expands to more than 1,048,576 hosts".to_string());
        }
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(s: &str) -> Vec<String> {
        expand(s).unwrap()
    }

    #[test]
    fn scontrol_show_hostnames_semantics() {
        // (expression, what `scontrol show hostnames` prints)
        let table: &[(&str, &[&str])] = &[
            ("node1", &["node1"]),
            ("node[1-3]", &["node1", "node2", "node3"]),
            ("linux[0-2,5]", &["linux0", "linux1", "linux2", "linux5"]),
            ("lx[15,18,32-33]", &["lx15", "lx18", "lx32", "lx33"]),
            ("n[008-011]", &["n008", "n009", "n010", "n011"]),
            ("n[98-101]", &["n98", "n99", "n100", "n101"]),
            ("a1,b[2-3],c", &["a1", "b2", "b3", "c"]),
            (
                "rack[0-1]_blade[0-2]",
                &[
                    "rack0_blade0",
                    "rack0_blade1",
                    "rack0_blade2",
                    "rack1_blade0",
                    "rack1_blade1",
                    "rack1_blade2",
                ],
            ),
            ("gpu-[1-2].cluster", &["gpu-1.cluster", "gpu-2.cluster"]),
            ("127.0.0.[2-3]", &["127.0.0.2", "127.0.0.3"]),
        ];
        for (expr, want) in table {
            assert_eq!(e(expr), *want, "{expr}");
        }
    }

    #[test]
    fn bad_lists_are_named_with_the_reason() {
        for (bad, reason) in [
            ("n[1-3", "'[' without ']'"),
            ("n1-3]", "']' without '['"),
            ("n[3-1]", "backwards"),
            ("n[a-b]", "expected a number"),
            ("n[]", "expected a number"),
            ("n[[1]]", "nested"),
            ("", "no host"),
            ("n[0-99999999]", "more than"),
            ("a[0-1023]b[0-1023]c[0-1023]", "more than"),
        ] {
            let got = expand(bad).unwrap_err();
            assert!(got.reason.contains(reason), "{bad}: {got}");
            assert!(got.to_string().contains(bad), "{got}");
        }
    }

    proptest! {
        #[test]
        fn any_text_expands_or_is_one_error(s in ".{0,40}") {
            if let Err(e) = expand(&s) {
                prop_assert!(!e.to_string().contains('\n') || s.contains('\n'));
            }
        }
    }
}
