//! Text that came from a guest or a file and is about to reach a log or a
//! terminal. A guest's log line or error message, or a manifest field, could
//! otherwise carry a newline that starts a forged host log line, or terminal
//! escapes that move the cursor over what a person is asked to confirm.

use std::borrow::Cow;

/// `s` with every control character (newlines, carriage returns, escapes,
/// C1 controls, tabs included) written as a Rust escape (`\n`, `\u{1b}`), so
/// that the text stays on one line and cannot drive a terminal.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape_control`] of at most `max` bytes of `s`, the result cut to
/// `max` bytes again (escapes make text longer) and marked ` [truncated]`
/// when anything was cut. Cutting first bounds the work for any input.
pub fn escape_capped(s: &str, max: usize) -> String {
    let cut = |s: &str| -> (usize, bool) {
        if s.len() <= max {
            return (s.len(), false);
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        (end, true)
    };
    let (end, mut truncated) = cut(s);
    let mut out = escape_control(&s[..end]).into_owned();
    let (end, again) = cut(&out);
    out.truncate(end);
    truncated |= again;
    if truncated {
        out.push_str(" [truncated]");
    }
    out
}

/// Like [`escape_control`] but keeps newlines and tabs: for multi-line text
/// the host itself produced around untrusted parts (an error with a TOML
/// excerpt), printed on a terminal.
pub fn escape_terminal(s: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_not_copied() {
        assert!(matches!(escape_control("plain text é"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\n2026-01-01 ERROR orch::host: forged"),
            "a\\n2026-01-01 ERROR orch::host: forged"
        );
        assert_eq!(
            escape_control("\x1b[1A\x1b[2K\rx\u{9b}"),
            "\\u{1b}[1A\\u{1b}[2K\\rx\\u{9b}"
        );
        assert_eq!(
            escape_terminal("line 1\n\tline 2\x1b[2K"),
            "line 1\n\tline 2\\u{1b}[2K"
        );
    }
}
