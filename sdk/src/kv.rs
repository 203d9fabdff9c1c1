//! The agent's private key-value store. Values outlive the instance, the task
//! and the host process.

use crate::bindings::orch::agent::kv;

/// The raw bytes stored under `key`, if any.
pub fn get(key: &str) -> Option<Vec<u8>> {
    kv::get(key)
}

/// Stores `value` under `key`. Fails when the host refuses the write (for
/// example a value over the host's size limit) or the store is unavailable.
pub fn set(key: &str, value: &[u8]) -> Result<(), String> {
    kv::set(key, value)
}

/// Removes `key`; removing a missing key is not an error.
pub fn delete(key: &str) -> Result<(), String> {
    kv::delete(key)
}

/// The UTF-8 string stored under `key`. `None` when the key is missing or the
/// value is not UTF-8.
pub fn get_string(key: &str) -> Option<String> {
    get(key).and_then(|v| String::from_utf8(v).ok())
}

pub fn set_string(key: &str, value: &str) -> Result<(), String> {
    set(key, value.as_bytes())
}

/// A counter-style value stored as decimal text, so that it reads well in
/// the host's tools. `None` when missing or not a number.
pub fn get_u64(key: &str) -> Option<u64> {
    get_string(key).and_then(|s| s.trim().parse().ok())
}

pub fn set_u64(key: &str, value: u64) -> Result<(), String> {
    set_string(key, &value.to_string())
}
