//! Host-side bindings for the `orch:agent/agent` world. `bindgen!` runs here
//! and only here; everything else imports the generated types from this
//! module (the sandbox implements the generated import traits).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "agent",
    imports: {
        // kv touches the disk, so it runs off the wasm thread and under the
        // task's deadline.
        "orch:agent/kv": async,
        // `get` has no error case in the WIT: a store that cannot be read
        // fails the task (`host`) rather than reading as a missing key.
        "orch:agent/kv.get": async | trappable,
        // A call suspends the guest until the sub-task ends.
        "orch:agent/tasks": async,
        "orch:agent/messaging": async,
    },
    exports: { default: async },
});
