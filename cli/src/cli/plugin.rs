//! `orch plugin ...`: the install store as operators use it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch::plugin::store::Mode;
use orch::plugin::{gated_imports, manifest, signature, Checked, PluginError, PluginRecord};
use orch::units::format_size;

use super::{exit, plugin_error, Context, Output};

pub const WORKFLOW: &str = "\
A plugin is a component (NAME.wasm) plus a manifest: NAME.toml beside it, or embedded with
`orch plugin pack`. The manifest names the plugin and its capabilities, may ask for limits
(within the host's maxima in $ORCH_HOME/config.toml) and lists its grants: a kv namespace,
environment variables, directories. Nothing is granted that the manifest does not list.

Workflow:
  orch plugin install counter.wasm        check, show grants and limits, confirm, store
  orch run counter --input -              run the active version by name
  orch plugin upgrade counter next.wasm   new version becomes active; the old one is kept
  orch plugin rollback counter            the previously active version again
  orch plugin remove counter              all versions; its kv data stays, its namespace reserved
  orch plugin remove counter --purge      and its kv data deleted, the namespace free again

Signing: `orch key generate --out k.nk`, then `orch plugin sign counter.wasm --key k.nk`.
A host with `require_signed = true` and `trusted_keys = [...]` under [plugins] in config.toml
refuses unsigned, tampered or untrusted plugins before compiling them.";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a plugin (component + NAME.toml manifest beside it, or embedded), show
    /// what it asks for, and install it after confirmation.
    Install(InstallArgs),
    /// Install a new version of an installed plugin and make it active; the old one is kept.
    Upgrade {
        name: String,
        #[command(flatten)]
        args: InstallArgs,
    },
    /// Make the previously active version active again.
    Rollback { name: String },
    /// Remove a plugin and all its versions. Its kv data stays, and its kv
    /// namespace stays reserved for its name, unless --purge is given.
    Remove {
        name: String,
        /// Also delete its kv data and free its namespace (also for a
        /// plugin removed earlier).
        #[arg(long)]
        purge: bool,
    },
    /// List installed plugins.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show an installed plugin: versions, manifest, grants, limits.
    Inspect {
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Embed a manifest in a component (custom section `orch-manifest`), so the
    /// plugin is one file.
    Pack {
        component: PathBuf,
        /// The manifest; defaults to NAME.toml beside the component.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Where to write the packed component.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Sign a component and its manifest with a key from `orch key generate`;
    /// writes COMPONENT.sig beside it.
    Sign {
        component: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct InstallArgs {
    /// The component file, or an https:// URL of one. Its manifest is NAME.toml
    /// beside it (fetched from beside the URL too) or an `orch-manifest` custom
    /// section; a signature, if any, is NAME.wasm.sig.
    path: String,
    /// Refuse the file unless its sha256 is this (hex).
    #[arg(long)]
    sha256: Option<String>,
    /// Install without asking for confirmation.
    #[arg(long, short)]
    yes: bool,
}

pub async fn run(home: &Path, cmd: Command) -> u8 {
    let ctx = match Context::open(home) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let changes_store = matches!(
        cmd,
        Command::Install(_)
            | Command::Upgrade { .. }
            | Command::Rollback { .. }
            | Command::Remove { .. }
    );
    let code = dispatch(&ctx, cmd).await;
    if code == 0 && changes_store {
        let home = home.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || notify_host(&home)).await;
    }
    code
}

/// Tells a host running on this data directory to pick up the change now
/// (it would within a second anyway) and reports what it serves.
fn notify_host(home: &Path) {
    let Some(api) = orch::daemon::read_address(home) else {
        return;
    };
    let client = super::client::Client::new(api.clone(), Duration::from_secs(60));
    // A stale host.json (the host died) is not an error of this command:
    // a note, not the client's "error: cannot reach".
    if !client.answers() {
        eprintln!("note: no host answered at {api}; the change applies when one starts");
        return;
    }
    match client.request("POST", "/v1/plugins/sync", None) {
        Ok((_, report)) => {
            let list = |k: &str| -> String {
                report[k]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let (loaded, removed) = (list("loaded"), list("removed"));
            if !loaded.is_empty() {
                println!("the running host at {api} now serves {loaded}");
            }
            if !removed.is_empty() {
                println!("the running host at {api} no longer serves {removed}");
            }
            for e in report["errors"].as_array().cloned().unwrap_or_default() {
                eprintln!(
                    "warning: the running host cannot load {}: {}",
                    e["plugin"].as_str().unwrap_or_default(),
                    e["error"].as_str().unwrap_or_default()
                );
            }
        }
        // Printed by the client; the change stays installed.
        Err(_) => eprintln!("note: the host at {api} picks the change up within a second"),
    }
}

async fn dispatch(ctx: &Context, cmd: Command) -> u8 {
    match cmd {
        Command::Install(args) => install(ctx, args, Mode::Install, None).await,
        Command::Upgrade { name, args } => install(ctx, args, Mode::Upgrade, Some(name)).await,
        Command::Rollback { name } => match ctx.store.rollback(&name) {
            Ok((from, to)) => {
                println!("{name}: {from} -> {to}");
                0
            }
            Err(e) => plugin_error(&e.into()),
        },
        Command::Remove { name, purge: true } => purge(ctx, &name),
        Command::Remove { name, purge: false } => match ctx.store.remove(&name) {
            Ok(record) => {
                let versions: Vec<&str> =
                    record.versions.iter().map(|v| v.version.as_str()).collect();
                println!("removed {name} ({})", versions.join(", "));
                0
            }
            Err(e) => plugin_error(&e.into()),
        },
        Command::List { output } => list(ctx, output),
        Command::Inspect { name, output } => inspect(ctx, &name, output),
        Command::Sign { component, key } => sign(&component, &key),
        Command::Pack {
            component,
            manifest,
            out,
        } => pack(&component, manifest, &out),
    }
}

fn purge(ctx: &Context, name: &str) -> u8 {
    let installed = ctx.store.get(name).ok();
    let mut keys = Vec::new();
    let purged = ctx.store.purge(name, |ns| {
        keys.push((ns.to_string(), ctx.kv.delete_namespace(ns)?));
        Ok(())
    });
    if let Some(record) = installed {
        let versions: Vec<&str> = record.versions.iter().map(|v| v.version.as_str()).collect();
        println!("removed {name} ({})", versions.join(", "));
    }
    for (ns, n) in keys {
        println!("deleted kv namespace {ns} ({n} keys)");
    }
    match purged {
        Ok(_) => 0,
        Err(orch::plugin::store::PurgeError::Store(e)) => plugin_error(&e.into()),
        Err(e) => {
            eprintln!("error: {e}");
            exit::ERROR
        }
    }
}

async fn install(ctx: &Context, args: InstallArgs, mode: Mode, upgrade_name: Option<String>) -> u8 {
    // Kept alive until the install is done: dropping it removes the download.
    let mut _download = None;
    let path = if super::fetch::is_url(&args.path) {
        let url = args.path.clone();
        let home = ctx.home.clone();
        match tokio::task::spawn_blocking(move || super::fetch::fetch(&home, &url)).await {
            Ok(Ok(d)) => {
                let path = d.component.clone();
                eprintln!("downloaded {}", args.path);
                _download = Some(d);
                path
            }
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                return exit::BAD_INPUT;
            }
            Err(e) => {
                eprintln!("error: download failed: {e}");
                return exit::ERROR;
            }
        }
    } else {
        PathBuf::from(&args.path)
    };
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let progress = Progress::start(&path, size);
    let checked = orch::plugin::check(
        &ctx.engine,
        ctx.kv.clone(),
        &ctx.config,
        &path,
        args.sha256.as_deref(),
    )
    .await;
    progress.finish();
    let checked = match checked {
        Ok(c) => c,
        Err(e) => return plugin_error(&e),
    };
    let name = &checked.manifest.manifest.plugin.name;
    if let Some(expected) = upgrade_name {
        if &expected != name {
            return plugin_error(&PluginError::DescriptorMismatch {
                path,
                field: "its name",
                manifest: name.clone(),
                component: expected,
            });
        }
    }
    print_summary(
        &checked,
        &path,
        ctx.config.host.instances,
        &mut std::io::stdout().lock(),
    );
    let verb = if mode == Mode::Install {
        "install this plugin with these grants?"
    } else {
        "upgrade this plugin with these grants?"
    };
    if !args.yes && !confirm(verb) {
        eprintln!("not installed");
        return exit::BAD_INPUT;
    }
    // Which version was active, when the upgrade is to a kept version (its
    // record is then the one made active again, not a new one).
    let switched_from = ctx.store.get(name).ok().and_then(|r| {
        r.versions
            .iter()
            .any(|v| {
                v.version == checked.manifest.manifest.plugin.version && v.sha256 == checked.sha256
            })
            .then_some(r.active)
    });
    match ctx.store.commit(&checked, mode) {
        Ok(record) => {
            match switched_from {
                Some(from) => println!(
                    "{name}: {from} -> {} (a kept version, active again; {})",
                    record.version,
                    &record.sha256[..12]
                ),
                None => println!(
                    "installed {name} {} ({})",
                    record.version,
                    &record.sha256[..12]
                ),
            }
            0
        }
        Err(e) => plugin_error(&e.into()),
    }
}

/// Asks `question` on stderr and reads the answer from stdin; no answer
/// (stdin closed) is no.
pub fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) => {
            eprintln!();
            eprintln!("no answer on standard input; pass --yes to go ahead without asking");
            false
        }
        Ok(_) => matches!(line.trim(), "y" | "Y" | "yes"),
        Err(_) => false,
    }
}

/// Shows elapsed time on stderr while a large component compiles, when
/// stderr is a terminal.
struct Progress {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Progress {
    fn start(path: &Path, size: u64) -> Progress {
        if size < (1 << 20) || !std::io::stderr().is_terminal() {
            return Progress { stop: None };
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let label = format!(
            "checking and compiling {} ({})",
            path.display(),
            size_text(size)
        );
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                eprint!("\r{label} ... {}s", started.elapsed().as_secs());
                let _ = std::io::stderr().flush();
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            eprintln!(
                "\r{label} ... done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        });
        Progress { stop: Some(tx) }
    }

    fn finish(self) {
        if let Some(tx) = self.stop {
            let _ = tx.send(());
        }
    }
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// What the user is asked to confirm. `default_instances` is the host's
/// `[host] instances`, in force when the manifest sets no `max_instances`.
pub fn print_summary(c: &Checked, path: &Path, default_instances: u32, out: &mut dyn Write) {
    // A closed pipe is not worth failing the command for.
    let _ = write_summary(c, path, default_instances, out);
}

fn write_summary(
    c: &Checked,
    path: &Path,
    default_instances: u32,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let m = &c.manifest.manifest;
    let l = &c.limits;
    writeln!(
        out,
        "plugin {} {}: {}",
        m.plugin.name, m.plugin.version, m.plugin.description
    )?;
    writeln!(
        out,
        "  file:         {} ({})",
        path.display(),
        size_text(c.bytes.len() as u64)
    )?;
    writeln!(out, "  sha256:       {}", c.sha256)?;
    match &c.signed_by {
        Some(k) => writeln!(out, "  signed by:    {k}")?,
        None => writeln!(out, "  signed by:    (not signed)")?,
    }
    writeln!(out, "  capabilities: {}", m.plugin.capabilities.join(", "))?;
    writeln!(
        out,
        "  limits:       fuel {}, memory {}, timeout {}ms, instances {}",
        l.fuel,
        format_size(l.memory),
        l.timeout.as_millis(),
        m.limits
            .max_instances
            .map_or(format!("{default_instances} (the host's default)"), |n| n
                .to_string())
    )?;
    if let Some(n) = m.limits.reuse.filter(|&n| n > 1) {
        writeln!(
            out,
            "  reuse:        one instance serves up to {n} tasks in a row; memory and globals carry over between them"
        )?;
    }
    writeln!(out, "  grants:")?;
    let g = &m.grants;
    writeln!(
        out,
        "    kv namespace: {}",
        g.kv.as_deref().unwrap_or("(none)")
    )?;
    writeln!(
        out,
        "    environment:  {}",
        if g.env.is_empty() {
            "(none)".to_string()
        } else {
            g.env.join(", ")
        }
    )?;
    if g.dirs.is_empty() {
        writeln!(out, "    directories:  (none)")?;
    }
    for d in &g.dirs {
        let mode = match d.mode {
            manifest::DirMode::ReadOnly => "read-only",
            manifest::DirMode::ReadWrite => "read-write",
        };
        // What the agent really gets: `..` and symlinks resolved.
        let real = manifest::resolve_host_dir(&d.host);
        let given = if real != d.host {
            format!(" (given as {})", d.host.display())
        } else {
            String::new()
        };
        writeln!(
            out,
            "    directory:    {}{given} as {} ({mode})",
            real.display(),
            d.guest
        )?;
    }
    if !g.messaging.is_empty() {
        writeln!(out, "    messaging:    {}", g.messaging.join(", "))?;
    }
    if !m.plugin.subscriptions.is_empty() {
        writeln!(
            out,
            "  subscriptions: {}",
            m.plugin.subscriptions.join(", ")
        )?;
    }
    let gated = gated_imports(&c.agent.info().imports);
    if !gated.is_empty() {
        writeln!(out, "  imports that need a grant:")?;
        for (grant, imports) in gated {
            let granted = match grant {
                "kv" => g.kv.is_some(),
                "messaging" => !g.messaging.is_empty(),
                "dirs" => !g.dirs.is_empty(),
                "env" => !g.env.is_empty(),
                _ => false,
            };
            let status = if granted {
                "granted"
            } else {
                "not granted: calls are refused or see nothing"
            };
            writeln!(out, "    {grant}: {} import(s), {status}", imports.len())?;
        }
    }
    Ok(())
}

fn list(ctx: &Context, output: Output) -> u8 {
    let plugins = match ctx.store.list() {
        Ok(p) => p,
        Err(e) => return plugin_error(&e.into()),
    };
    match output {
        Output::Json => {
            let items: Vec<serde_json::Value> = plugins
                .iter()
                .map(|(name, r)| record_json(name, r))
                .collect();
            println!("{}", serde_json::Value::Array(items));
        }
        Output::Text => {
            if plugins.is_empty() {
                println!("no plugins installed");
            }
            for (name, r) in &plugins {
                let caps = r
                    .active_version()
                    .and_then(|v| manifest::Manifest::parse(&v.manifest, name).ok())
                    .map(|m| m.plugin.capabilities.join(", "))
                    .unwrap_or_default();
                let versions: Vec<&str> = r.versions.iter().map(|v| v.version.as_str()).collect();
                println!(
                    "{name} {} [{caps}] (versions: {})",
                    r.active,
                    versions.join(", ")
                );
            }
        }
    }
    0
}

fn record_json(name: &str, r: &PluginRecord) -> serde_json::Value {
    let manifest = r
        .active_version()
        .and_then(|v| manifest::Manifest::parse(&v.manifest, name).ok());
    serde_json::json!({
        "name": name,
        "active": r.active,
        "capabilities": manifest.as_ref().map(|m| m.plugin.capabilities.clone()).unwrap_or_default(),
        "versions": r.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "sha256": v.sha256,
            "size": v.size,
            "signed_by": v.signed_by,
            "installed_at": v.installed_at,
        })).collect::<Vec<_>>(),
        "history": r.history,
    })
}

fn inspect(ctx: &Context, name: &str, output: Output) -> u8 {
    let record = match ctx.store.get(name) {
        Ok(r) => r,
        Err(e) => return plugin_error(&e.into()),
    };
    let Some(active) = record.active_version() else {
        eprintln!(
            "error: {name}: the active version {} has no record",
            record.active
        );
        return exit::ERROR;
    };
    let manifest = match manifest::Manifest::parse(&active.manifest, name) {
        Ok(m) => m,
        Err(e) => return plugin_error(&e.into()),
    };
    match output {
        Output::Json => {
            let mut v = record_json(name, &record);
            v["manifest"] = serde_json::to_value(&manifest).unwrap_or_default();
            v["blob"] = serde_json::json!(ctx.store.blob_path(&active.sha256));
            println!("{v:#}");
        }
        Output::Text => {
            println!("{name} {} (active)", record.active);
            println!("  description:  {}", manifest.plugin.description);
            println!(
                "  capabilities: {}",
                manifest.plugin.capabilities.join(", ")
            );
            println!("  sha256:       {}", active.sha256);
            println!(
                "  signed by:    {}",
                active.signed_by.as_deref().unwrap_or("(not signed)")
            );
            println!("  versions:");
            for v in &record.versions {
                let mark = if v.version == record.active { "*" } else { " " };
                println!(
                    "    {mark} {} {} ({})",
                    v.version,
                    &v.sha256[..12],
                    size_text(v.size)
                );
            }
            println!("  manifest:");
            for line in active.manifest.lines() {
                println!("    {line}");
            }
        }
    }
    0
}

fn sign(component: &Path, key: &Path) -> u8 {
    let seed = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read key {}: {e}", key.display());
            return exit::BAD_INPUT;
        }
    };
    let bytes = match std::fs::read(component) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", component.display());
            return exit::BAD_INPUT;
        }
    };
    let loaded = match manifest::require(component, &bytes) {
        Ok(m) => m,
        Err(e) => return plugin_error(&e.into()),
    };
    let sig = match signature::sign(&seed, &bytes, &loaded.text) {
        Ok(s) => s,
        Err(e) => return plugin_error(&e.into()),
    };
    let out = signature::path_for(component);
    if let Err(e) = std::fs::write(&out, sig.to_text()) {
        eprintln!("error: cannot write {}: {e}", out.display());
        return exit::ERROR;
    }
    println!(
        "signed {} with {}; wrote {}",
        component.display(),
        sig.key,
        out.display()
    );
    0
}

fn pack(component: &Path, manifest_path: Option<PathBuf>, out: &Path) -> u8 {
    let manifest_path = manifest_path.unwrap_or_else(|| manifest::beside(component));
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let (bytes, text) = match (read(component), read(&manifest_path)) {
        (Ok(b), Ok(t)) => (b, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return exit::BAD_INPUT;
        }
    };
    let text = match String::from_utf8(text) {
        Ok(t) => t,
        Err(_) => {
            eprintln!("error: {} is not UTF-8", manifest_path.display());
            return exit::BAD_INPUT;
        }
    };
    if let Err(e) = manifest::Manifest::parse(&text, &manifest_path.display().to_string()) {
        return plugin_error(&e.into());
    }
    if orch::plugin::section::find(&bytes, manifest::SECTION).is_some() {
        eprintln!(
            "error: {} already has an embedded manifest",
            component.display()
        );
        return exit::BAD_INPUT;
    }
    let packed = orch::plugin::section::append(&bytes, manifest::SECTION, text.as_bytes());
    if let Err(e) = std::fs::write(out, packed) {
        eprintln!("error: cannot write {}: {e}", out.display());
        return exit::ERROR;
    }
    println!(
        "wrote {} with the manifest of {} embedded",
        out.display(),
        manifest_path.display()
    );
    0
}
