//! Workflow definitions: the TOML (or JSON) format, references into the
//! run's data, and the checks made at registration.
//!
//! A definition is checked whole before it is stored, so a run never meets
//! a cycle, an unknown step or a reference it cannot resolve by
//! construction; what only a run can know (a capability no agent serves, a
//! `for_each` source that is not an array) fails the step at run time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::units::parse_duration;

/// The most steps a definition may have, and elements a fan-out may run.
pub const MAX_STEPS: usize = 256;
pub const MAX_FAN_OUT: usize = 10_000;
/// The most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// The longest first backoff of a retry policy.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The most elements of one fan-out at once.
pub const MAX_CONCURRENCY: u32 = 1000;

/// A definition as written. Unknown fields are refused, so a misspelt
/// field is an error instead of a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The default deadline of a run, counted from its start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub steps: Vec<Step>,
    /// What starts runs besides a request: schedules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
}

/// What starts a run besides a request: a schedule (a run at each tick,
/// with `input` as its input) or a subject (a run per message published
/// on it, with the message as its input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Five-field cron (`*/5 * * * *`: minute, hour, day of month, month,
    /// day of week), or six with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// An IANA time zone (`Europe/Berlin`); default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// A subject or pattern (`orders.*`, `orders.>`) of agents' messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// A trigger's schedule, parsed.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its index in `triggers`.
    pub trigger: usize,
    pub schedule: String,
    pub cron: croner::Cron,
    pub timezone: chrono_tz::Tz,
    pub input: Value,
}

impl Schedule {
    /// The first tick after `after_ms` (Unix ms), if any.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        use chrono::TimeZone;
        let after = chrono::Utc
            .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
            .single()?
            .with_timezone(&self.timezone);
        let next = self.cron.find_next_occurrence(&after, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

fn schedule(i: usize, t: &Trigger, field: &str, bad: &mut impl FnMut(String)) -> Option<Schedule> {
    let (schedule, subject) = (t.schedule.as_ref(), t.subject.as_ref());
    let schedule = match (schedule, subject) {
        (Some(_), Some(_)) | (None, None) => {
            bad(format!(
                "{field}: give a schedule or a subject, one of the two"
            ));
            return None;
        }
        (None, Some(subject)) => {
            if !crate::sandbox::subject::is_pattern(subject) {
                bad(format!(
                    "{field}.subject: {subject:?} is not a subject or pattern (tokens of letters, digits, - and _, with * or a last >)"
                ));
            }
            if t.timezone.is_some() || t.input.is_some() {
                bad(format!(
                    "{field}: timezone and input are for a schedule; a message is the run's input"
                ));
            }
            return None;
        }
        (Some(s), None) => s,
    };
    let timezone = match &t.timezone {
        None => chrono_tz::UTC,
        Some(z) => match z.parse::<chrono_tz::Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                bad(format!(
                    "{field}.timezone: {z:?} is not an IANA time zone (e.g. Europe/Berlin, UTC)"
                ));
                return None;
            }
        },
    };
    let fields = schedule.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        bad(format!(
            "{field}.schedule: {schedule:?} has {fields} fields: expected 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        ));
        return None;
    }
    match croner::Cron::new(schedule).with_seconds_optional().parse() {
        Ok(cron) => Some(Schedule {
            trigger: i,
            schedule: schedule.clone(),
            cron,
            timezone,
            input: t.input.clone().unwrap_or(Value::Null),
        }),
        Err(e) => {
            // croner does not say which field it refused: the first one
            // that fails alone, the others made `*`, is named.
            let names: &[&str] = if fields == 6 {
                &[
                    "seconds",
                    "minute",
                    "hour",
                    "day-of-month",
                    "month",
                    "day-of-week",
                ]
            } else {
                &["minute", "hour", "day-of-month", "month", "day-of-week"]
            };
            let parts: Vec<&str> = schedule.split_whitespace().collect();
            let culprit = (0..parts.len()).find(|&k| {
                let alone: Vec<&str> = (0..parts.len())
                    .map(|j| if j == k { parts[j] } else { "*" })
                    .collect();
                croner::Cron::new(&alone.join(" "))
                    .with_seconds_optional()
                    .parse()
                    .is_err()
            });
            let reason = e.to_string();
            let reason = reason
                .trim_start_matches("Component error: ")
                .trim_end_matches('.');
            match culprit {
                Some(k) => bad(format!(
                    "{field}.schedule: {schedule:?}: its {} field {:?}: {reason}",
                    names[k], parts[k]
                )),
                None => bad(format!("{field}.schedule: {schedule:?}: {reason}")),
            }
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    pub capability: String,
    /// The task's input: a JSON document in which a string `${...}` is a
    /// reference (see [`Ref`]). Default: `${item}` in a fan-out, else
    /// `${input}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Steps that must end before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Each attempt's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<When>,
    /// Whether the step runs when a step it runs after was skipped.
    #[serde(default)]
    pub if_skipped: IfSkipped,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Compensate>,
    /// Run the capability once per element of this array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<Value>,
    /// At most this many elements of a fan-out at once (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, the first included (default 1).
    #[serde(default = "one")]
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each later one
    /// (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// A reference (`${steps.check/ok}`).
    pub value: String,
    /// The step runs when the value equals this; without it, when the value
    /// is `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfSkipped {
    #[default]
    Skip,
    Run,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compensate {
    pub capability: String,
    /// Default: `{"input": <the step's input>, "result": <its result>}`;
    /// `${input}` and `${result}` here name those two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A parsed reference: `${input}`, `${steps.ID}`, `${item}` (in a fan-out)
/// or `${result}` (in a compensation), each with an optional JSON pointer
/// after the first `/` (`${steps.split/sections/0}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Input(String),
    Step(String, String),
    Item(String),
    Result(String),
}

impl Ref {
    /// The reference a string is, if it is one; an error for a string
    /// that looks like one (`${...}`) but names nothing known.
    pub fn parse(s: &str) -> Option<Result<Ref, String>> {
        let inner = s.strip_prefix("${")?.strip_suffix('}')?;
        let (head, pointer) = match inner.find('/') {
            Some(i) => (&inner[..i], inner[i..].to_string()),
            None => (inner, String::new()),
        };
        Some(match head {
            "input" => Ok(Ref::Input(pointer)),
            "item" => Ok(Ref::Item(pointer)),
            "result" => Ok(Ref::Result(pointer)),
            _ => match head.strip_prefix("steps.") {
                Some(id) if !id.is_empty() => Ok(Ref::Step(id.to_string(), pointer)),
                _ => Err(format!(
                    "{s:?} is not a reference: expected ${{input}}, ${{steps.ID}}, ${{item}} or ${{result}}, each with an optional /json/pointer"
                )),
            },
        })
    }
}

/// Every reference in a JSON document, with where it is.
fn refs(value: &Value, out: &mut Vec<Result<Ref, String>>) {
    match value {
        Value::String(s) => {
            if let Some(r) = Ref::parse(s) {
                out.push(r);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        Value::Object(o) => o.values().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// Why a definition was refused: each message names the step and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workflow: {}", .problems.join("; "))]
pub struct Invalid {
    pub problems: Vec<String>,
}

/// A definition that passed [`Definition::check`], with its durations
/// parsed and its steps in an order where each comes after those it runs
/// after.
#[derive(Debug, Clone)]
pub struct Checked {
    pub def: Definition,
    pub deadline: Option<Duration>,
    pub steps: Vec<CheckedStep>,
    /// Steps by id, as an index into `steps`.
    pub index: HashMap<String, usize>,
    /// Capabilities named, for the warning of those no agent serves.
    pub capabilities: BTreeSet<String>,
    /// The triggers' schedules, in definition order.
    pub schedules: Vec<Schedule>,
    /// The triggers' subjects (patterns), in definition order.
    pub subjects: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CheckedStep {
    pub step: Step,
    pub timeout: Option<Duration>,
    pub attempts: u32,
    pub backoff: Duration,
    pub compensation: Option<CheckedCompensation>,
}

#[derive(Debug, Clone)]
pub struct CheckedCompensation {
    pub capability: String,
    pub input: Option<Value>,
    pub timeout: Option<Duration>,
    pub attempts: u32,
    pub backoff: Duration,
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Definition {
    /// Parses a TOML definition; the message names the step, the field
    /// and the line.
    pub fn from_toml(text: &str) -> Result<Definition, Invalid> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let step_id = |i: usize| {
                let doc = toml::from_str::<toml::Table>(text).ok()?;
                let id = doc.get("steps")?.get(i)?.get("id")?.as_str()?;
                Some(id.to_string())
            };
            let inner = e.inner();
            let message = inner.message().to_string() + &toml_where(text, inner.span());
            Invalid {
                problems: vec![located(e.path(), message, step_id)],
            }
        })
    }

    pub fn from_json(text: &[u8]) -> Result<Definition, Invalid> {
        let mut de = serde_json::Deserializer::from_slice(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let step_id = |i: usize| {
                let doc = serde_json::from_slice::<Value>(text).ok()?;
                Some(doc.get("steps")?.get(i)?.get("id")?.as_str()?.to_string())
            };
            Invalid {
                problems: vec![located(e.path(), e.inner().to_string(), step_id)],
            }
        })
    }

    /// Every check made at registration, all problems at once.
    pub fn check_new(self) -> Result<Checked, Invalid> {
        self.check_with(true)
    }

    /// The checks of a stored definition when it is loaded: those of
    /// registration but the ones added after it may have been stored (a
    /// capability's name), so that a definition registered before them
    /// still loads, its runs resume and its triggers run.
    pub fn check(self) -> Result<Checked, Invalid> {
        self.check_with(false)
    }

    fn check_with(self, new: bool) -> Result<Checked, Invalid> {
        let mut problems = Vec::new();
        let mut bad = |m: String| problems.push(m);
        if !valid_name(&self.name) {
            bad(format!(
                "name: {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.version == 0 {
            bad("version: must be 1 or more".into());
        }
        let deadline = duration(&self.deadline, "deadline", &mut bad);
        let schedules: Vec<Schedule> = self
            .triggers
            .iter()
            .enumerate()
            .filter_map(|(i, t)| schedule(i, t, &format!("triggers[{i}]"), &mut bad))
            .collect();
        if self.steps.is_empty() {
            bad("steps: a workflow needs at least one step".into());
        }
        if self.steps.len() > MAX_STEPS {
            bad(format!(
                "steps: {} steps, past the limit of {MAX_STEPS}",
                self.steps.len()
            ));
        }
        let mut index = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            if !valid_name(&s.id) {
                bad(format!(
                    "step {:?}: id: must be 1 to 64 letters, digits, '-', '_' or '.'",
                    s.id
                ));
            }
            if index.insert(s.id.clone(), i).is_some() {
                bad(format!("step {:?}: id: a second step has this id", s.id));
            }
        }
        let mut capabilities = BTreeSet::new();
        let mut checked = Vec::new();
        for s in &self.steps {
            let at = |field: &str| format!("step {:?}: {field}", s.id);
            if s.capability.is_empty() {
                bad(format!("{}: is empty", at("capability")));
            } else if new && !crate::sandbox::is_capability_name(&s.capability) {
                bad(format!(
                    "{}: {}",
                    at("capability"),
                    not_a_capability(&s.capability)
                ));
            }
            capabilities.insert(s.capability.clone());
            for a in &s.after {
                if !index.contains_key(a) {
                    bad(format!("{}: unknown step {a:?}", at("after")));
                }
                if a == &s.id {
                    bad(format!("{}: a step cannot run after itself", at("after")));
                }
            }
            let timeout = duration(&s.timeout, &at("timeout"), &mut bad);
            let (attempts, backoff) = retry(&s.retry, &at("retry"), &mut bad);
            match (&s.for_each, s.concurrency) {
                (None, Some(_)) => bad(format!("{}: is for a step with for_each", at("concurrency"))),
                (Some(_), Some(0)) => bad(format!("{}: must be 1 or more", at("concurrency"))),
                (Some(_), Some(n)) if n > MAX_CONCURRENCY => bad(format!(
                    "{}: {n}, past the limit of {MAX_CONCURRENCY}",
                    at("concurrency")
                )),
                (Some(Value::Array(a)), _) if a.len() > MAX_FAN_OUT => bad(format!(
                    "{}: {} elements, past the limit of {MAX_FAN_OUT}",
                    at("for_each"),
                    a.len()
                )),
                (Some(Value::Array(_)), _) => {}
                (Some(Value::String(r)), _) if Ref::parse(r).is_some() => {}
                (Some(other), _) => bad(format!(
                    "{}: needs an array: a reference to one (${{input/list}}, ${{steps.ID/list}}) or a literal array, not {other}",
                    at("for_each")
                )),
                (None, None) => {}
            }
            let compensation = s.compensate.as_ref().map(|c| {
                let field = |f: &str| at(&format!("compensate.{f}"));
                if c.capability.is_empty() {
                    bad(format!("{}: is empty", field("capability")));
                } else if new && !crate::sandbox::is_capability_name(&c.capability) {
                    bad(format!(
                        "{}: {}",
                        field("capability"),
                        not_a_capability(&c.capability)
                    ));
                }
                capabilities.insert(c.capability.clone());
                let timeout = duration(&c.timeout, &field("timeout"), &mut bad);
                let (attempts, backoff) = retry(&c.retry, &field("retry"), &mut bad);
                CheckedCompensation {
                    capability: c.capability.clone(),
                    input: c.input.clone(),
                    timeout,
                    attempts,
                    backoff,
                }
            });
            checked.push(CheckedStep {
                step: s.clone(),
                timeout,
                attempts,
                backoff,
                compensation,
            });
        }
        let order = match topological(&self.steps, &index) {
            Ok(order) => order,
            Err(cycle) => {
                bad(format!("steps {} form a cycle", cycle.join(" -> ")));
                Vec::new()
            }
        };
        if !order.is_empty() {
            let ancestors = ancestors(&self.steps, &index, &order);
            for s in &self.steps {
                check_refs(s, &ancestors[&s.id], &index, &mut bad);
            }
        }
        if !problems.is_empty() {
            return Err(Invalid { problems });
        }
        // Steps in dependency order: a run starts them in this order when
        // several are ready at once.
        let mut by_id: BTreeMap<usize, CheckedStep> = checked.into_iter().enumerate().collect();
        let steps: Vec<CheckedStep> = order.iter().filter_map(|i| by_id.remove(i)).collect();
        let index = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.step.id.clone(), i))
            .collect();
        Ok(Checked {
            deadline,
            steps,
            index,
            capabilities,
            subjects: self
                .triggers
                .iter()
                .filter_map(|t| t.subject.clone())
                .collect(),
            def: self,
            schedules,
        })
    }
}

/// A parse error named as the checks name problems: `steps[0].retry` is
/// `step "a": retry`. The field of an unknown-field error is left out of
/// the path: the message names it.
fn located(
    path: &serde_path_to_error::Path,
    message: String,
    step_id: impl Fn(usize) -> Option<String>,
) -> String {
    use serde_path_to_error::Segment;
    let mut parts: Vec<String> = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => parts.push(key.clone()),
            Segment::Seq { index } => {
                let top = parts.len() == 1;
                match parts.last_mut() {
                    Some(last) if top && last == "steps" => {
                        *last = match step_id(*index) {
                            Some(id) => format!("step {id:?}"),
                            None => format!("steps[{index}]"),
                        };
                    }
                    Some(last) => last.push_str(&format!("[{index}]")),
                    None => parts.push(format!("[{index}]")),
                }
            }
            Segment::Enum { variant } => parts.push(variant.clone()),
            Segment::Unknown => {}
        }
    }
    if message.starts_with("unknown field") {
        parts.pop();
    }
    let mut parts = parts.into_iter();
    let Some(head) = parts.next() else {
        return message;
    };
    let rest: Vec<String> = parts.collect();
    if rest.is_empty() {
        format!("{head}: {message}")
    } else {
        format!("{head}: {}: {message}", rest.join("."))
    }
}

/// " (line L)" for a TOML error's span.
fn toml_where(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) if r.start <= text.len() => {
            let line = text[..r.start].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        _ => String::new(),
    }
}

fn duration(s: &Option<String>, field: &str, bad: &mut impl FnMut(String)) -> Option<Duration> {
    let s = s.as_ref()?;
    match parse_duration(s) {
        Ok(d) if d.is_zero() => {
            bad(format!("{field}: must be more than 0"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            bad(format!("{field}: {e}"));
            None
        }
    }
}

fn retry(r: &Option<Retry>, field: &str, bad: &mut impl FnMut(String)) -> (u32, Duration) {
    let Some(r) = r else {
        return (1, Duration::from_secs(1));
    };
    if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
        bad(format!(
            "{field}.attempts: {} is not between 1 and {MAX_ATTEMPTS}",
            r.attempts
        ));
    }
    let backoff = match &r.backoff {
        None => Duration::from_secs(1),
        Some(b) => match parse_duration(b) {
            Ok(d) if d > MAX_BACKOFF => {
                bad(format!("{field}.backoff: {b} is past the limit of 1h"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                bad(format!("{field}.backoff: {e}"));
                Duration::ZERO
            }
        },
    };
    (r.attempts.clamp(1, MAX_ATTEMPTS), backoff)
}

/// Step indexes in an order where each comes after the steps it runs
/// after (Kahn's algorithm, ties by definition order); or a cycle's ids.
fn topological(steps: &[Step], index: &HashMap<String, usize>) -> Result<Vec<usize>, Vec<String>> {
    let n = steps.len();
    let mut waiting: Vec<usize> = vec![0; n];
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in steps.iter().enumerate() {
        let deps: BTreeSet<usize> = s
            .after
            .iter()
            .filter_map(|a| index.get(a).copied())
            .collect();
        waiting[i] = deps.len();
        for d in deps {
            next[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &next[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk back from a step left over along its unfinished dependencies
    // until one repeats: that loop is a cycle.
    let left: Vec<usize> = (0..n).filter(|&i| waiting[i] > 0).collect();
    let mut path = vec![left[0]];
    loop {
        let cur = *path.last().unwrap_or(&left[0]);
        let prev = steps[cur]
            .after
            .iter()
            .filter_map(|a| index.get(a).copied())
            .find(|&d| waiting[d] > 0);
        let Some(prev) = prev else {
            break;
        };
        if let Some(start) = path.iter().position(|&p| p == prev) {
            // `path` walks back along "runs after"; reversed, each step
            // runs after the one before it, and the first after the last.
            let mut cycle: Vec<String> = path[start..]
                .iter()
                .rev()
                .map(|&i| format!("{:?}", steps[i].id))
                .collect();
            cycle.push(cycle[0].clone());
            return Err(cycle);
        }
        path.push(prev);
    }
    Err(left.iter().map(|&i| format!("{:?}", steps[i].id)).collect())
}

/// Each step's ancestors: the steps it runs after, directly or not.
fn ancestors(
    steps: &[Step],
    index: &HashMap<String, usize>,
    order: &[usize],
) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for &i in order {
        let mut set = BTreeSet::new();
        for a in &steps[i].after {
            if index.contains_key(a) {
                set.insert(a.clone());
                if let Some(up) = out.get(a) {
                    set.extend(up.iter().cloned());
                }
            }
        }
        out.insert(steps[i].id.clone(), set);
    }
    out
}

fn check_refs(
    s: &Step,
    ancestors: &BTreeSet<String>,
    index: &HashMap<String, usize>,
    bad: &mut impl FnMut(String),
) {
    let fan_out = s.for_each.is_some();
    if let Some(w) = &s.when {
        if Ref::parse(&w.value).is_none() {
            bad(format!(
                "step {:?}: when.value: {:?} must be a reference (${{steps.ID/pointer}} or ${{input/pointer}})",
                s.id, w.value
            ));
        }
    }
    let mut check = |field: &str, value: &Value, item: bool, result: bool| {
        let mut found = Vec::new();
        refs(value, &mut found);
        for r in found {
            let at = format!("step {:?}: {field}", s.id);
            match r {
                Err(e) => bad(format!("{at}: {e}")),
                Ok(Ref::Item(_)) if !item => bad(format!(
                    "{at}: ${{item}} is only for the input of a step with for_each"
                )),
                Ok(Ref::Result(_)) if !result => bad(format!(
                    "{at}: ${{result}} is only for a compensation's input"
                )),
                Ok(Ref::Step(id, _)) if !index.contains_key(&id) => {
                    bad(format!("{at}: refers to unknown step {id:?}"))
                }
                Ok(Ref::Step(id, _)) if !ancestors.contains(&id) => bad(format!(
                    "{at}: refers to step {id:?}, which is not among the steps it runs after (directly or not)"
                )),
                Ok(Ref::Input(p) | Ref::Item(p) | Ref::Result(p) | Ref::Step(_, p))
                    if !(p.is_empty() || p.starts_with('/')) =>
                {
                    bad(format!("{at}: {p:?} is not a JSON pointer"))
                }
                Ok(_) => {}
            }
        }
    };
    if let Some(v) = &s.input {
        check("input", v, fan_out, false);
    }
    if let Some(v) = &s.for_each {
        check("for_each", v, false, false);
    }
    if let Some(w) = &s.when {
        let v = Value::String(w.value.clone());
        check("when.value", &v, false, false);
    }
    if let Some(c) = &s.compensate {
        if let Some(v) = &c.input {
            // A compensation's ${input} is the step's input, and ${result}
            // its result; step references are as for the step.
            check("compensate.input", v, false, true);
        }
    }
}

/// Why `name` cannot be a capability that an agent provides.
fn not_a_capability(name: &str) -> String {
    format!(
        "{name:?} is not one: {} (others, such as ':', are reserved)",
        crate::sandbox::CAPABILITY_NAME_RULE
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Checked, Vec<String>> {
        Definition::from_toml(text)
            .and_then(Definition::check_new)
            .map_err(|e| e.problems)
    }

    const HEAD: &str = "name = \"w\"\nversion = 1\n";

    /// A capability that cannot be a capability name is refused at
    /// registration, but a definition stored before that rule still loads.
    #[test]
    fn a_reserved_capability_is_refused_when_registered_and_loads_when_stored() {
        let text = format!("{HEAD}[[steps]]\nid = \"a\"\ncapability = \"echo:x\"\n");
        let problems = check(&text).unwrap_err();
        assert!(
            problems[0].starts_with("step \"a\": capability: \"echo:x\" is not one"),
            "{problems:?}"
        );
        let stored = Definition::from_toml(&text).unwrap();
        assert!(stored.check().is_ok());
    }

    #[test]
    fn a_diamond_is_ordered_with_each_step_after_its_dependencies() {
        let text = format!(
            "{HEAD}[[steps]]\nid = \"d\"\ncapability = \"c\"\nafter = [\"b\", \"c\"]\n\
             [[steps]]\nid = \"b\"\ncapability = \"c\"\nafter = [\"a\"]\n\
             [[steps]]\nid = \"c\"\ncapability = \"c\"\nafter = [\"a\"]\n\
             [[steps]]\nid = \"a\"\ncapability = \"c\"\n"
        );
        let c = check(&text).unwrap();
        let ids: Vec<&str> = c.steps.iter().map(|s| s.step.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_field_serde_refuses_is_named_with_its_step() {
        let two = format!(
            "{HEAD}[[steps]]\nid = \"a\"\ncapability = \"c\"\n\
             [[steps]]\nid = \"b\"\ncapability = \"c\"\n"
        );
        let e = check(&format!("{two}retries = 3\n")).unwrap_err();
        assert!(
            e[0].starts_with(r#"step "b": unknown field `retries`, expected one of `id`"#),
            "{e:?}"
        );
        assert!(e[0].ends_with("(line 9)"), "{e:?}");
        let e = check(&format!("{two}retry = {{ attempt = 3 }}\n")).unwrap_err();
        assert!(
            e[0].starts_with(r#"step "b": retry: unknown field `attempt`, expected"#),
            "{e:?}"
        );
        let e = check(&format!("{two}timeout = 5\n")).unwrap_err();
        assert!(
            e[0].starts_with(r#"step "b": timeout: invalid type: integer `5`"#),
            "{e:?}"
        );
        // A step without an id is named by its place; a top-level field by
        // the message alone.
        let e = check(&format!("{HEAD}[[steps]]\ncapability = \"c\"\n")).unwrap_err();
        assert!(e[0].starts_with("steps[0]: missing field `id`"), "{e:?}");
        let e = check(&format!(
            "{HEAD}owner = \"x\"\n[[steps]]\nid = \"a\"\ncapability = \"c\"\n"
        ))
        .unwrap_err();
        assert!(e[0].starts_with("unknown field `owner`, expected"), "{e:?}");
        // The same in JSON.
        let json = br#"{"name":"w","version":1,"steps":[{"id":"a","capability":"c"},{"id":"b","capability":"c","retry":{"attempt":1}}]}"#;
        let e = Definition::from_json(json).unwrap_err().problems;
        assert!(
            e[0].starts_with(r#"step "b": retry: unknown field `attempt`"#),
            "{e:?}"
        );
    }

    #[test]
    fn a_cycle_is_named_step_by_step() {
        let text = format!(
            "{HEAD}[[steps]]\nid = \"a\"\ncapability = \"c\"\nafter = [\"b\"]\n\
             [[steps]]\nid = \"b\"\ncapability = \"c\"\nafter = [\"a\"]\n"
        );
        let e = check(&text).unwrap_err();
        assert_eq!(e, [r#"steps "b" -> "a" -> "b" form a cycle"#], "{e:?}");
    }

    #[test]
    fn a_reference_to_a_step_that_is_not_an_ancestor_is_refused() {
        let text = format!(
            "{HEAD}[[steps]]\nid = \"a\"\ncapability = \"c\"\n\
             [[steps]]\nid = \"b\"\ncapability = \"c\"\ninput = \"${{steps.a/x}}\"\n"
        );
        let e = check(&text).unwrap_err();
        assert!(
            e[0].contains(r#"step "b": input: refers to step "a", which is not among"#),
            "{e:?}"
        );
    }

    #[test]
    fn references_through_ancestors_pass() {
        let text = format!(
            "{HEAD}[[steps]]\nid = \"a\"\ncapability = \"c\"\n\
             [[steps]]\nid = \"b\"\ncapability = \"c\"\nafter = [\"a\"]\n\
             [[steps]]\nid = \"c\"\ncapability = \"c\"\nafter = [\"b\"]\nfor_each = \"${{steps.a/list}}\"\n\
             input = {{ x = \"${{item}}\", y = \"${{input/z}}\" }}\n"
        );
        check(&text).unwrap();
    }
}
