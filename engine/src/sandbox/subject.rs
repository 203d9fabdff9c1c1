//! Message subjects as agents name them: dot-separated tokens relative to
//! the host's message prefix, and grant patterns with NATS wildcards (`*`
//! one token, `>` the rest). Pure functions: no NATS here.

/// Whether `subject` is a concrete subject: tokens of letters, digits,
/// `-` and `_`, separated by single dots, at most 256 bytes.
pub fn is_subject(subject: &str) -> bool {
    subject.len() <= 256 && !subject.is_empty() && subject.split('.').all(is_token)
}

fn is_token(t: &str) -> bool {
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `pattern` is a valid grant: a subject whose tokens may be `*`,
/// and whose last token may be `>`.
pub fn is_pattern(pattern: &str) -> bool {
    if pattern.is_empty() || pattern.len() > 256 {
        return false;
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| is_token(t) || *t == "*" || (*t == ">" && i == tokens.len() - 1))
}

/// Whether the grant `pattern` covers `subject`.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_patterns() {
        assert!(is_subject("orders.created"));
        assert!(!is_subject("orders..created"));
        assert!(!is_subject("orders.*"));
        assert!(!is_subject("orders created"));
        assert!(is_pattern("orders.*"));
        assert!(is_pattern("orders.>"));
        assert!(!is_pattern("orders.>.x"));
        assert!(!is_pattern(""));
    }

    #[test]
    fn wildcards_match_as_in_nats() {
        assert!(matches("orders.*", "orders.created"));
        assert!(!matches("orders.*", "orders.created.eu"));
        assert!(matches("orders.>", "orders.created.eu"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.c"));
        assert!(!matches("a.b", "a.b.c"));
    }
}
