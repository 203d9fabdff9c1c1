//! `orch host start`: the long-running host with its control API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use orch::cluster::NatsOptions;
use orch::config::HostConfig;
use orch::daemon::address_file;
use orch::node::{Node, NodeOptions};

use super::{exit, load_error_code};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Serve the installed plugins: accept tasks over the HTTP API, run them by
    /// capability, keep them in the journal until they have a result. SIGTERM or
    /// Ctrl-C stops it gracefully.
    Start(StartArgs),
}

#[derive(clap::Args)]
pub struct StartArgs {
    /// Configuration file (default: $ORCH_HOME/config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of the HTTP control API: an IP address and port, or
    /// localhost:PORT; loopback only (it has no authentication). Port 0
    /// picks a free port. Default: [host] listen in the config, else
    /// 127.0.0.1:7878.
    #[arg(long, value_parser = orch::config::parse_listen)]
    listen: Option<SocketAddr>,
    /// Join other hosts through this NATS server (nats-server 2.15.1 or
    /// later, the version tested; 2.9 does not work; several URLs
    /// comma-separated). Without it the host runs alone.
    #[arg(long, env = "ORCH_NATS")]
    nats: Option<String>,
    /// Authenticate to NATS with a token.
    #[arg(long, requires = "nats", conflicts_with = "nats_creds")]
    nats_token: Option<String>,
    /// Authenticate to NATS with a .creds file.
    #[arg(long, requires = "nats")]
    nats_creds: Option<PathBuf>,
    /// Verify the NATS server's TLS certificate against this CA (PEM).
    #[arg(long, requires = "nats")]
    nats_tls_ca: Option<PathBuf>,
    /// Set the cluster's retention of finished tasks to this host's
    /// [host] retention even when it is shorter: every host's finished
    /// tasks older than it are dropped. Without it a host only lengthens
    /// the cluster's retention.
    #[arg(long, requires = "nats")]
    shorten_retention: bool,
}

pub async fn run(home: &Path, cmd: Command) -> u8 {
    match cmd {
        Command::Start(args) => start(home, args).await,
    }
}

/// For `orch host start` with an OTLP endpoint (config or environment):
/// what the trace exporter needs. A config that does not load is reported
/// by the command itself.
pub fn export(home: &Path, command: &super::Command) -> Option<super::telemetry::Export> {
    let super::Command::Host(Command::Start(args)) = command else {
        return None;
    };
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| home.join("config.toml"));
    let telemetry = HostConfig::load(&path).ok()?.telemetry;
    if !super::telemetry::wanted(telemetry.otlp_endpoint.as_deref()) {
        return None;
    }
    let host_id = orch::daemon::host_id_of(home).ok()?;
    Some(super::telemetry::Export {
        endpoint: telemetry.otlp_endpoint,
        host_id,
        max_traces_per_second: telemetry.max_traces_per_second,
    })
}

async fn start(home: &Path, args: StartArgs) -> u8 {
    let config_path = args.config.unwrap_or_else(|| home.join("config.toml"));
    let config = match HostConfig::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::ERROR;
        }
    };
    let listen = args.listen.unwrap_or(config.host.listen);
    if !listen.ip().is_loopback() {
        eprintln!(
            "error: --listen {listen}: the control API has no authentication and binds to loopback \
             addresses only (127.0.0.1, ::1)"
        );
        return exit::BAD_INPUT;
    }
    let engine = match super::engine_with(home, config.host.instance_slots) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return load_error_code(&e);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return exit::ERROR;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    let max_payload = config.limits.defaults.max_payload;
    let grace = config.host.shutdown_grace;
    let api = format!("http://{addr}");
    let nats = args.nats.as_ref().map(|url| NatsOptions {
        url: url.clone(),
        token: args.nats_token.clone(),
        creds: args.nats_creds.clone(),
        tls_ca: args.nats_tls_ca.clone(),
        shorten_retention: args.shorten_retention,
    });
    let options = NodeOptions {
        nats,
        api: Some(api.clone()),
    };
    let node = match Node::start(home, config, engine, options).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::ERROR;
        }
    };
    let host = node.host().clone();
    // The configuration it started with, for the audit trail: a change
    // shows as a new sha256 from one start to the next. Not the text, nor
    // a NATS URL's user and password: the audit trail is readable by
    // anyone who reaches the API.
    let text = std::fs::read(&config_path).unwrap_or_default();
    let nats_url = args.nats.as_deref().map(|urls| {
        urls.split(',')
            .map(|u| match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}{}", &u[..scheme + 3], &u[at + 1..])
                }
                _ => u.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    });
    host.audit().record(
        orch::audit::Kind::HostStart,
        &orch::audit::local_user(),
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config_path": config_path.display().to_string(),
            "config_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&text)),
            "config_bytes": text.len(),
            "listen": api,
            "nats": nats_url,
        }),
    );
    let published = serde_json::json!({
        "api": api,
        "pid": std::process::id(),
        "host": host.id(),
    });
    if let Err(e) = std::fs::write(address_file(home), published.to_string()) {
        eprintln!(
            "warning: cannot write {}: {e}",
            address_file(home).display()
        );
    }
    for (plugin, error) in host.plugin_errors() {
        eprintln!("warning: plugin {plugin} is not served: {error}");
    }
    let plugins = host.plugins();
    let names: Vec<String> = plugins.iter().map(|p| p.label.clone()).collect();
    println!(
        "orch host {} listening on {api} (data {}), serving {} plugin(s){}{}; {} unfinished task(s) requeued from the journal",
        host.id(),
        home.display(),
        plugins.len(),
        if names.is_empty() { "" } else { ": " },
        names.join(", "),
        host.recovered()
    );
    let _ = std::io::stdout().flush();

    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(orch::api::serve(
        node.api_state(),
        listener,
        max_payload,
        async move {
            let _ = api_stopped.await;
        },
    ));
    wait_for_signal().await;
    eprintln!(
        "stopping: waiting up to {} ms for running tasks",
        grace.as_millis()
    );
    let clustered = node.cluster().is_some();
    let cut = node.shutdown(grace).await;
    // Off the runtime: the exporter's last send blocks.
    let _ = tokio::task::spawn_blocking(super::telemetry::flush).await;
    let _ = stop_api.send(());
    // Requests still open after the stop (a client that keeps a stream
    // open) are not waited for long.
    if tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .is_err()
    {
        eprintln!("warning: requests still open after 10 s were cut off");
    }
    let (queued, _) = host.live_counts();
    if published_by_us(home) {
        let _ = std::fs::remove_file(address_file(home));
    }
    if clustered {
        // They were the stream's, not this host's: it redelivers them.
        eprintln!(
            "stopped: {cut} running task(s) cut off; this host's unfinished tasks stay on the NATS stream and run on any host that serves them"
        );
    } else {
        eprintln!(
            "stopped: {cut} running task(s) cut off; {} task(s) stay in the journal and run after the next start",
            queued + cut as usize
        );
    }
    0
}

fn published_by_us(home: &Path) -> bool {
    std::fs::read_to_string(address_file(home))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["pid"].as_u64())
        == Some(u64::from(std::process::id()))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
