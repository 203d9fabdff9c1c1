//! `orch key generate`: a new Ed25519 signing key in NATS nkey form.

use std::io::Write;
use std::path::PathBuf;

use orch::plugin::signature;

use super::exit;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generate a signing key: writes the seed (secret) to --out with mode 0600
    /// and prints the public key to put in a host's trusted_keys.
    Generate {
        /// Where to write the seed; it must not exist yet.
        #[arg(long, default_value = "orch-signing.nk")]
        out: PathBuf,
    },
}

pub fn run(cmd: Command) -> u8 {
    match cmd {
        Command::Generate { out } => {
            let (seed, public) = match signature::generate() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::ERROR;
                }
            };
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let written = options
                .open(&out)
                .and_then(|mut f| f.write_all(format!("{seed}\n").as_bytes()));
            if let Err(e) = written {
                eprintln!("error: cannot write {}: {e}", out.display());
                return exit::ERROR;
            }
            println!("{public}");
            eprintln!(
                "wrote the secret seed to {}; add the public key above to trusted_keys in a host's config.toml",
                out.display()
            );
            0
        }
    }
}
