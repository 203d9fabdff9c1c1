//! Rust SDK for writing orch agents.
//!
//! An agent is a type that implements [`Agent`], exported with [`export_agent!`]:
//!
//! ```ignore
//! use orch_sdk::{export_agent, Agent, Capability, Descriptor, Task, TaskError};
//!
//! struct Echo;
//!
//! impl Agent for Echo {
//!     fn describe() -> Descriptor {
//!         Descriptor::new("echo", "0.1.0").capability("echo", "1.0.0", "returns the payload")
//!     }
//!     fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
//!         Ok(task.payload)
//!     }
//! }
//!
//! export_agent!(Echo);
//! ```
//!
//! The crate is compiled to a core wasm module (`wasm32-unknown-unknown` or
//! `wasm32-wasip1`) and turned into a component with `orch-componentize`; see
//! `plugins/build.sh`.

#[doc(hidden)]
// Generated code: the export glue takes one argument per flattened WIT value.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "agent",
        pub_export_macro: true,
        export_macro_name: "__export_agent_world",
        default_bindings_module: "orch_sdk::bindings",
    });
}

pub use bindings::orch::agent::types::{Capability, Descriptor, Task, TaskError};

pub mod kv;
pub mod log;
pub mod messaging;
pub mod tasks;

/// What an agent implements. Both functions run in a fresh instance for every
/// call (the host has no setting to reuse instances), so nothing in memory
/// survives from one call to the next; keep state in [`kv`], which in a
/// cluster is per host.
pub trait Agent {
    /// Names the agent and the capabilities it provides. The host calls it once
    /// when it loads the component.
    fn describe() -> Descriptor;

    /// Works on one task. `Ok` bytes are the result; an error says whether a
    /// retry can help.
    fn handle(task: Task) -> Result<Vec<u8>, TaskError>;
}

impl Descriptor {
    /// A descriptor with no capabilities yet.
    pub fn new(name: &str, version: &str) -> Self {
        Descriptor {
            name: name.to_string(),
            version: version.to_string(),
            capabilities: Vec::new(),
        }
    }

    /// Adds one capability.
    pub fn capability(mut self, name: &str, version: &str, description: &str) -> Self {
        self.capabilities.push(Capability {
            name: name.to_string(),
            version: version.to_string(),
            description: description.to_string(),
        });
        self
    }
}

#[doc(hidden)]
pub mod __private {
    use std::sync::Once;

    static HOOK: Once = Once::new();

    /// Routes panic messages through the host's log import. Without it a
    /// panic on wasm32-unknown-unknown is a bare `unreachable` trap and the
    /// message is lost. The host recognises the `panicked at` prefix and puts
    /// the text into the trap error it reports.
    pub fn install_panic_hook() {
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
                    (*s).to_string()
                } else if let Some(s) = info.payload().downcast_ref::<String>() {
                    s.clone()
                } else {
                    "Box<dyn Any>".to_string()
                };
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_else(|| "<unknown>".to_string());
                crate::log::error(&format!("panicked at {location}: {message}"));
            }));
        });
    }
}

/// Exports a type implementing [`Agent`] as the component's `agent` world.
#[macro_export]
macro_rules! export_agent {
    ($agent:ty) => {
        const _: () = {
            struct __OrchAgentExport;

            impl $crate::bindings::Guest for __OrchAgentExport {
                fn describe() -> $crate::Descriptor {
                    $crate::__private::install_panic_hook();
                    <$agent as $crate::Agent>::describe()
                }

                fn handle(task: $crate::Task) -> ::core::result::Result<Vec<u8>, $crate::TaskError> {
                    $crate::__private::install_panic_hook();
                    <$agent as $crate::Agent>::handle(task)
                }
            }

            $crate::bindings::__export_agent_world!(__OrchAgentExport with_types_in $crate::bindings);
        };
    };
}
