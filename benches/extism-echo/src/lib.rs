//! Returns its input: the same work as orch's `echo` plugin, for the
//! Extism side of the `reuse` bench.

use extism_pdk::{plugin_fn, FnResult};

#[plugin_fn]
pub fn echo(input: Vec<u8>) -> FnResult<Vec<u8>> {
    Ok(input)
}
