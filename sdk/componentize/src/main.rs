//! `orch-componentize CORE.wasm OUT.wasm`: wraps a core module into a
//! component. Modules that import `wasi_snapshot_preview1` (built for
//! `wasm32-wasip1`) get the preview1-to-preview2 reactor adapter that matches
//! the host's wasmtime-wasi version, so the component imports `wasi:*@0.2`.

use anyhow::{bail, Context, Result};
use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
use wasmparser::{Parser, Payload};
use wit_component::ComponentEncoder;

const PREVIEW1: &str = "wasi_snapshot_preview1";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: orch-componentize CORE.wasm OUT.wasm");
    };
    let core = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let mut encoder = ComponentEncoder::default();
    encoder
        .module(&core)
        .with_context(|| format!("{input} is not a core module with component type information"))?;
    encoder.validate(true);
    // The adapter is only added when the module asks for preview1, so a
    // module without WASI imports stays free of them.
    if imports_module(&core, PREVIEW1).with_context(|| format!("parsing {input}"))? {
        encoder
            .adapter(PREVIEW1, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER)
            .context("adding the wasi preview1 adapter")?;
    }
    let component = encoder
        .encode()
        .with_context(|| format!("encoding {input} as a component"))?;
    std::fs::write(output, component).with_context(|| format!("writing {output}"))?;
    Ok(())
}

/// Whether any import of the core module comes from `module`.
fn imports_module(core: &[u8], module: &str) -> Result<bool> {
    for payload in Parser::new(0).parse_all(core) {
        if let Payload::ImportSection(reader) = payload? {
            for import in reader.into_imports() {
                if import?.module == module {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}
