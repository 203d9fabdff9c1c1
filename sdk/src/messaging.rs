//! Messages between agents (`messaging`). Subjects are dot-separated tokens
//! such as `orders.created`; the plugin's manifest must grant them
//! (`[grants] messaging = ["orders.*"]`). Messages on the subjects listed in
//! the manifest's `subscriptions` arrive as tasks whose capability is the
//! subject and whose content type is [`MESSAGE_CONTENT_TYPE`]; for a
//! request, the task's result is the reply.

use std::time::Duration;

use crate::bindings::orch::agent::messaging;

/// The content type of a task that delivers a message.
pub const MESSAGE_CONTENT_TYPE: &str = "application/vnd.orch.message";

/// Sends a message to whoever subscribes to `subject` (nobody: dropped).
pub fn publish(subject: &str, payload: &[u8]) -> Result<(), String> {
    messaging::publish(subject, payload)
}

/// Sends a request and waits up to `timeout` (and at most until this task's
/// deadline) for the reply.
pub fn request(subject: &str, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let ms = timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
    messaging::request(subject, payload, ms)
}
