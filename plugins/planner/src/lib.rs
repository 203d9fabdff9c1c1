//! Writes a report on a document: splits it into sections (at Markdown
//! headings, or at blank lines when it has none), has `text.wordcount` count
//! each section through `tasks.call`, all sections at once, and adds up the
//! counts.

use orch_sdk::{export_agent, tasks, Agent, Descriptor, Task, TaskError};

struct Planner;

/// Most sections counted in one report: each is a sub-task, and the host
/// bounds how many one task may start.
const MAX_SECTIONS: usize = 16;

struct Section<'a> {
    title: String,
    text: &'a str,
}

impl Agent for Planner {
    fn describe() -> Descriptor {
        Descriptor::new("planner", "0.1.0").capability(
            "text.report",
            "1.0.0",
            "counts words per section of a UTF-8 document by calling text.wordcount; returns JSON",
        )
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = std::str::from_utf8(&task.payload)
            .map_err(|e| TaskError::InvalidInput(format!("payload is not UTF-8: {e}")))?;
        let sections = split(text);
        if sections.len() > MAX_SECTIONS {
            return Err(TaskError::InvalidInput(format!(
                "the document has {} sections; this agent counts at most {MAX_SECTIONS}",
                sections.len()
            )));
        }
        let requests: Vec<_> = sections
            .iter()
            .map(|s| tasks::request("text.wordcount", s.text.as_bytes(), None))
            .collect();
        let results = tasks::call_all(&requests);
        let mut total = [0u64; 3];
        let mut parts = Vec::new();
        for (section, result) in sections.iter().zip(results) {
            let counts = match result {
                Ok(bytes) => parse_counts(&bytes).ok_or_else(|| {
                    TaskError::Failed(format!(
                        "text.wordcount answered {:?}, not word counts",
                        String::from_utf8_lossy(&bytes)
                    ))
                })?,
                Err(tasks::CallError::Task(TaskError::Retryable(m))) => {
                    return Err(TaskError::Retryable(format!("text.wordcount: {m}")))
                }
                Err(e) => {
                    return Err(TaskError::Failed(format!(
                        "text.wordcount failed on section {:?}: {}",
                        section.title,
                        e.text()
                    )))
                }
            };
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
            parts.push(format!(
                "{{\"title\":{},\"words\":{},\"lines\":{},\"bytes\":{}}}",
                json_string(&section.title),
                counts[0],
                counts[1],
                counts[2]
            ));
        }
        Ok(format!(
            "{{\"sections\":[{}],\"total\":{{\"words\":{},\"lines\":{},\"bytes\":{}}}}}",
            parts.join(","),
            total[0],
            total[1],
            total[2]
        )
        .into_bytes())
    }
}

/// Sections start at lines beginning with `#`; a document without headings
/// is split at blank lines into paragraphs, titled by number.
fn split(text: &str) -> Vec<Section<'_>> {
    let mut starts: Vec<(usize, String)> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('#') {
            starts.push((offset, line.trim_start_matches('#').trim().to_string()));
        }
        offset += line.len();
    }
    if starts.is_empty() {
        return text
            .split("\n\n")
            .filter(|p| !p.trim().is_empty())
            .enumerate()
            .map(|(i, p)| Section {
                title: format!("paragraph {}", i + 1),
                text: p,
            })
            .collect();
    }
    let mut sections = Vec::new();
    if starts[0].0 > 0 && !text[..starts[0].0].trim().is_empty() {
        sections.push(Section {
            title: "preamble".into(),
            text: &text[..starts[0].0],
        });
    }
    for (i, (start, title)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |s| s.0);
        sections.push(Section {
            title: title.clone(),
            text: &text[*start..end],
        });
    }
    sections
}

/// Reads `{"words":N,"lines":N,"bytes":N}` as text.wordcount writes it.
fn parse_counts(bytes: &[u8]) -> Option<[u64; 3]> {
    let text = std::str::from_utf8(bytes).ok()?;
    let field = |name: &str| -> Option<u64> {
        let at = text.find(&format!("\"{name}\":"))? + name.len() + 3;
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some([field("words")?, field("lines")?, field("bytes")?])
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

export_agent!(Planner);
