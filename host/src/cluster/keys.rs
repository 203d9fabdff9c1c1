//! The key layout of the task buckets, and the reads it makes cheap.
//!
//! A key carries what a listing filters on, so that the server's subject
//! index answers a listing instead of a scan of every task:
//! - `ORCH_QUEUED`: `task.<capability>.<task id>` for a task that has not
//!   ended (deleted when it ends), `claim/<task id>` for a claim.
//! - `ORCH_RESULTS`: `<status>.<capability>.<task id>`. A task has one
//!   result whatever its status: a write checks that no subject
//!   `*.*.<task id>` has a message yet (NATS 2.11's
//!   `Nats-Expected-Last-Subject-Sequence-Subject`), which is `create` over
//!   all statuses at once.
//!
//! A capability becomes one subject token by writing its dots as `=`,
//! which capability names cannot hold. A task id keeps its dots (a sub-task
//! is `ID.N`): it is always the last tokens, after a fixed number of them.

use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use futures_util::StreamExt;

use crate::daemon::Status;

/// `capability` as one subject token.
fn token(capability: &str) -> String {
    capability.replace('.', "=")
}

pub fn queued(capability: &str, id: &str) -> String {
    format!("task.{}.{id}", token(capability))
}

pub fn result(status: Status, capability: &str, id: &str) -> String {
    format!("{}.{}.{id}", status.as_str(), token(capability))
}

/// The subject filter of every result key of `id`.
pub fn result_of(bucket: &str, id: &str) -> String {
    format!("$KV.{bucket}.*.*.{id}")
}

/// The subject filter of the queued key of `id`.
pub fn queued_of(bucket: &str, id: &str) -> String {
    format!("$KV.{bucket}.task.*.{id}")
}

/// The subject filter of the results with `status` (any when `None`) of
/// `capability` (any when `None`).
pub fn results_where(bucket: &str, status: Option<Status>, capability: Option<&str>) -> String {
    format!(
        "$KV.{bucket}.{}.{}.>",
        status.map_or("*", Status::as_str),
        capability.map_or_else(|| "*".to_string(), token)
    )
}

/// The subject filter of the unfinished tasks of `capability` (any when
/// `None`).
pub fn queued_where(bucket: &str, capability: Option<&str>) -> String {
    format!(
        "$KV.{bucket}.task.{}.>",
        capability.map_or_else(|| "*".to_string(), token)
    )
}

/// A read the server did not answer as asked.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("request to {subject}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("{subject} answered with status {status}")]
    Status { subject: String, status: u16 },
    #[error("{subject} did not answer within {0:?}", READ_TIMEOUT)]
    TimedOut { subject: String },
}

/// How long a read waits for each answer of the server.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One stored message: its stream sequence and payload.
pub struct Entry {
    pub sequence: u64,
    pub payload: bytes::Bytes,
    /// A KV delete or purge marker rather than a value.
    pub deleted: bool,
}

/// Decodes a direct-get answer: `None` for "no such message".
fn entry(stream_subject: &str, message: async_nats::Message) -> Result<Option<Entry>, ReadError> {
    match message.status {
        None | Some(StatusCode::OK) => {}
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(status) => {
            return Err(ReadError::Status {
                subject: stream_subject.to_string(),
                status: status.as_u16(),
            })
        }
    }
    let headers = message.headers.unwrap_or_default();
    let get = |name: &str, headers: &HeaderMap| {
        headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    let operation = get("KV-Operation", &headers);
    let sequence = get("Nats-Sequence", &headers)
        .parse()
        .map_err(|_| ReadError::Status {
            subject: stream_subject.to_string(),
            status: 200,
        })?;
    Ok(Some(Entry {
        sequence,
        payload: message.payload,
        deleted: operation == "DEL" || operation == "PURGE",
    }))
}

/// The last message of `stream` on a subject matching `filter` (wildcards
/// allowed), through the stream's direct get.
pub async fn last(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
) -> Result<Option<Entry>, ReadError> {
    let subject = format!("$JS.API.DIRECT.GET.{stream}");
    let body = serde_json::json!({ "last_by_subj": filter }).to_string();
    let answer = tokio::time::timeout(READ_TIMEOUT, client.request(subject.clone(), body.into()))
        .await
        .map_err(|_| ReadError::TimedOut {
            subject: subject.clone(),
        })?
        .map_err(|e| ReadError::Request {
            subject: subject.clone(),
            source: e.into(),
        })?;
    entry(&subject, answer)
}

/// The last message of each subject of `stream` matching `filter`, at most
/// `most` of them, in one batched direct get (`multi_last`, NATS 2.11).
pub async fn last_each(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    most: usize,
) -> Result<Vec<Entry>, ReadError> {
    let subject = format!("$JS.API.DIRECT.GET.{stream}");
    let request_error = |e: async_nats::Error| ReadError::Request {
        subject: subject.clone(),
        source: e,
    };
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| request_error(e.into()))?;
    let body = serde_json::json!({ "multi_last": [filter], "batch": most }).to_string();
    client
        .publish_with_reply(subject.clone(), inbox, body.into())
        .await
        .map_err(|e| request_error(e.into()))?;
    let mut found = Vec::new();
    // Bounded by `most`: a server that sent more is not read further.
    while found.len() <= most {
        let answer = tokio::time::timeout(READ_TIMEOUT, answers.next())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| ReadError::TimedOut {
                subject: subject.clone(),
            })?;
        // The end of the batch (204), or no subject matched (404).
        if matches!(answer.status.map(|s| s.as_u16()), Some(204 | 404)) {
            break;
        }
        match entry(&subject, answer)? {
            Some(entry) => found.push(entry),
            None => break,
        }
    }
    Ok(found)
}

/// Most messages one batch read asks for.
const BATCH: u64 = 256;

/// Largest window of sequences one pass reads.
const MAX_WINDOW: u64 = 1 << 20;

/// The newest `want` messages of `stream` on subjects matching `filter`
/// that `keep` turns into a value, newest first (fewer when the stream has
/// fewer). The server's subject index finds them: the tail is read in
/// windows of sequences, each larger than the last, with batched direct
/// gets, so the work follows what is wanted, not the size of the stream;
/// at most `want` values are held at once.
pub async fn newest<T>(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    want: usize,
    mut keep: impl FnMut(Entry) -> Option<T>,
) -> Result<Vec<T>, ReadError> {
    let mut out = Vec::new();
    if want == 0 {
        return Ok(out);
    }
    let Some(last) = last(client, stream, filter).await? else {
        return Ok(out);
    };
    let mut high = last.sequence;
    let mut window = (want as u64).saturating_mul(4).max(BATCH);
    loop {
        let low = high.saturating_sub(window - 1).max(1);
        let need = want - out.len();
        let found = between(client, stream, filter, low, high, need, &mut keep).await?;
        out.extend(found.into_iter().rev());
        if out.len() >= want || low <= 1 {
            return Ok(out);
        }
        high = low - 1;
        window = window.saturating_mul(4).min(MAX_WINDOW);
    }
}

/// The newest `need` values `keep` makes of the messages matching `filter`
/// with sequences in `low..=high`, oldest first.
async fn between<T>(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    low: u64,
    high: u64,
    need: usize,
    keep: &mut impl FnMut(Entry) -> Option<T>,
) -> Result<std::collections::VecDeque<T>, ReadError> {
    let subject = format!("$JS.API.DIRECT.GET.{stream}");
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| ReadError::Request {
            subject: subject.clone(),
            source: e.into(),
        })?;
    let mut found = std::collections::VecDeque::new();
    let mut from = low;
    'batches: while from <= high {
        let body = serde_json::json!({
            "seq": from,
            "next_by_subj": filter,
            "batch": BATCH.min(high - from + 1),
        })
        .to_string();
        client
            .publish_with_reply(subject.clone(), inbox.clone(), body.into())
            .await
            .map_err(|e| ReadError::Request {
                subject: subject.clone(),
                source: e.into(),
            })?;
        let mut got = 0;
        loop {
            let answer = tokio::time::timeout(READ_TIMEOUT, answers.next())
                .await
                .map_err(|_| ReadError::TimedOut {
                    subject: subject.clone(),
                })?
                .ok_or_else(|| ReadError::TimedOut {
                    subject: subject.clone(),
                })?;
            // The end of a batch (204), or nothing more from `from` on (404).
            match answer.status.map(|s| s.as_u16()) {
                Some(204) => break,
                Some(404) => break 'batches,
                _ => {}
            }
            let Some(entry) = entry(&subject, answer)? else {
                break 'batches;
            };
            // Past the window, or not forward (a server that answered
            // otherwise than asked): this window is done.
            if entry.sequence > high || entry.sequence < from {
                break 'batches;
            }
            got += 1;
            from = entry.sequence + 1;
            if let Some(value) = keep(entry) {
                found.push_back(value);
                if found.len() > need {
                    found.pop_front();
                }
            }
        }
        if got == 0 {
            break;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_the_id_last_and_the_capability_in_one_token() {
        let key = result(Status::Dead, "text.word-count", "01J.3-2");
        assert_eq!(key, "dead.text=word-count.01J.3-2");
        assert_eq!(queued("a.b", "x"), "task.a=b.x");
        assert_eq!(results_where("R", None, Some("a.b")), "$KV.R.*.a=b.>");
        assert_eq!(result_of("R", "01J.3"), "$KV.R.*.*.01J.3");
    }
}
