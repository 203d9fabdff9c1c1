//! `orch inspect`: what a component is and what it asks for.

use std::path::Path;

use orch::units::format_size;

use super::{Context, Output};

#[derive(clap::Args)]
pub struct Args {
    /// A component file (.wasm), or the name of an installed plugin.
    component: String,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

enum Loaded {
    File(Box<orch::plugin::Loaded>),
    Installed(Box<orch::Agent>),
}

pub async fn run(home: &Path, args: Args) -> u8 {
    let ctx = match Context::open(home) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // A file is only described: nothing of its manifest is granted or
    // claimed. A name is the installed plugin.
    let is_file = args.component.contains('/') || args.component.ends_with(".wasm");
    let loaded = if is_file {
        match super::load_file(&ctx, Path::new(&args.component)).await {
            Ok(l) => Loaded::File(Box::new(l)),
            Err(code) => return code,
        }
    } else {
        match super::load_agent(&ctx, &args.component, true).await {
            Ok((agent, _)) => Loaded::Installed(Box::new(agent)),
            Err(code) => return code,
        }
    };
    let agent = match &loaded {
        Loaded::File(l) => l.agent(),
        Loaded::Installed(a) => a,
    };
    let d = agent.descriptor();
    let info = agent.info();
    match args.output {
        Output::Json => {
            let json = serde_json::json!({
                "path": info.path,
                "sha256": info.sha256,
                "size": info.size,
                "descriptor": d,
                "imports": info.imports,
                "exports": info.exports,
                "compiled": if info.from_cache { "cache" } else { "fresh" },
            });
            println!("{json:#}");
        }
        Output::Text => {
            println!("{} {}", d.name, d.version);
            println!(
                "  file:    {} ({})",
                info.path.display(),
                format_size_text(info.size)
            );
            println!("  sha256:  {}", info.sha256);
            println!("  capabilities:");
            for c in &d.capabilities {
                println!("    {} {}: {}", c.name, c.version, c.description);
            }
            println!("  imports:");
            for i in &info.imports {
                println!("    {i}");
            }
            println!("  exports:");
            for e in &info.exports {
                println!("    {e}");
            }
        }
    }
    0
}

fn format_size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB, {bytes} bytes", bytes as f64 / (1 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB, {bytes} bytes", bytes as f64 / (1 << 10) as f64)
    } else {
        format_size(bytes)
    }
}
