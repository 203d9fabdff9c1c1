//! Ed25519 signatures over a plugin, with keys in NATS nkey form (seeds
//! `SU...`, public keys `U...`). A signature covers the sha256 of the
//! component and the sha256 of the manifest text, so changing either one
//! byte of the component or the manifest invalidates it. It lives beside the
//! component as `NAME.wasm.sig`:
//!
//! ```text
//! orch-signature-v1
//! key UC3Z...
//! sig 4f2a...
//! ```

use std::path::{Path, PathBuf};

use nkeys::KeyPair;
use sha2::{Digest, Sha256};

const HEADER: &str = "orch-signature-v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("{path} is not signed (no {sig} beside it), and this host requires signed plugins")]
    Unsigned { path: PathBuf, sig: PathBuf },
    #[error("signature file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} is signed by key {key}, which is not in this host's trusted_keys")]
    UntrustedKey { path: PathBuf, key: String },
    #[error("signature of {path} by key {key} does not match: the component or its manifest changed after signing")]
    Mismatch { path: PathBuf, key: String },
    #[error("key {0}")]
    Key(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key: String,
    pub sig: Vec<u8>,
}

/// Where the signature of `component` lives.
pub fn path_for(component: &Path) -> PathBuf {
    let mut name = component.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

fn message(component: &[u8], manifest: &str) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(HEADER.as_bytes());
    m.push(0);
    m.extend_from_slice(&Sha256::digest(component));
    m.extend_from_slice(&Sha256::digest(manifest.as_bytes()));
    m
}

/// A new key pair: (seed, public key).
pub fn generate() -> Result<(String, String), SignatureError> {
    let kp = KeyPair::new_user();
    let seed = kp.seed().map_err(|e| SignatureError::Key(e.to_string()))?;
    Ok((seed, kp.public_key()))
}

/// Checks that `key` is a user public key in nkey form.
pub fn check_public_key(key: &str) -> Result<(), String> {
    let kp = KeyPair::from_public_key(key).map_err(|e| format!("not an nkey public key: {e}"))?;
    if !kp.public_key().starts_with('U') {
        return Err("expected a user public key (starting with U)".into());
    }
    Ok(())
}

pub fn sign(seed: &str, component: &[u8], manifest: &str) -> Result<Signature, SignatureError> {
    let kp =
        KeyPair::from_seed(seed.trim()).map_err(|e| SignatureError::Key(format!("seed: {e}")))?;
    let sig = kp
        .sign(&message(component, manifest))
        .map_err(|e| SignatureError::Key(e.to_string()))?;
    Ok(Signature {
        key: kp.public_key(),
        sig,
    })
}

impl Signature {
    pub fn to_text(&self) -> String {
        format!(
            "{HEADER}\nkey {}\nsig {}\n",
            self.key,
            hex::encode(&self.sig)
        )
    }

    pub fn parse(text: &str, path: &Path) -> Result<Signature, SignatureError> {
        let malformed = |reason: &str| SignatureError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed("the first line must be orch-signature-v1"));
        }
        let key = lines
            .next()
            .and_then(|l| l.strip_prefix("key "))
            .ok_or_else(|| malformed("missing `key` line"))?;
        let sig = lines
            .next()
            .and_then(|l| l.strip_prefix("sig "))
            .ok_or_else(|| malformed("missing `sig` line"))?;
        let sig = hex::decode(sig.trim()).map_err(|_| malformed("`sig` is not hex"))?;
        Ok(Signature {
            key: key.trim().to_string(),
            sig,
        })
    }
}

/// Reads the signature beside `path` (if any).
pub fn read_beside(path: &Path) -> Result<Option<Signature>, SignatureError> {
    let sig_path = path_for(path);
    use crate::engine::{read_regular, ReadError};
    // A signature file is a few hundred bytes; 64 KiB is room to spare.
    let malformed = |reason: String| SignatureError::Malformed {
        path: sig_path.clone(),
        reason,
    };
    match read_regular(&sig_path, 64 << 10) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8".into()))?;
            Signature::parse(&text, &sig_path).map(Some)
        }
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(ReadError::Io(e)) => Err(malformed(e.to_string())),
        Err(ReadError::NotAFile(kind)) => Err(malformed(format!("is {kind}, not a file"))),
        Err(ReadError::TooLarge(size)) => Err(malformed(format!(
            "{size} bytes, past the limit of 65536 bytes for a signature"
        ))),
    }
}

/// Verifies `signature` of the plugin at `path` against the trusted keys;
/// returns the key that signed it.
pub fn verify(
    path: &Path,
    signature: Option<&Signature>,
    component: &[u8],
    manifest: &str,
    trusted: &[String],
) -> Result<String, SignatureError> {
    let sig = signature.ok_or_else(|| SignatureError::Unsigned {
        path: path.to_path_buf(),
        sig: path_for(path),
    })?;
    if !trusted.iter().any(|k| k == &sig.key) {
        return Err(SignatureError::UntrustedKey {
            path: path.to_path_buf(),
            key: sig.key.clone(),
        });
    }
    let kp = KeyPair::from_public_key(&sig.key)
        .map_err(|e| SignatureError::Key(format!("{}: {e}", sig.key)))?;
    kp.verify(&message(component, manifest), &sig.sig)
        .map_err(|_| SignatureError::Mismatch {
            path: path.to_path_buf(),
            key: sig.key.clone(),
        })?;
    Ok(sig.key.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let (seed, public) = generate().unwrap();
        let p = Path::new("a.wasm");
        let sig = sign(&seed, b"component", "manifest").unwrap();
        let parsed = Signature::parse(&sig.to_text(), p).unwrap();
        assert_eq!(parsed, sig);
        let trusted = vec![public.clone()];
        assert_eq!(
            verify(p, Some(&sig), b"component", "manifest", &trusted).unwrap(),
            public
        );
        assert!(matches!(
            verify(p, Some(&sig), b"componenT", "manifest", &trusted),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            verify(p, Some(&sig), b"component", "manifesT", &trusted),
            Err(SignatureError::Mismatch { .. })
        ));
        let (_, other) = generate().unwrap();
        assert!(matches!(
            verify(p, Some(&sig), b"component", "manifest", &[other]),
            Err(SignatureError::UntrustedKey { .. })
        ));
        assert!(matches!(
            verify(p, None, b"c", "m", &trusted),
            Err(SignatureError::Unsigned { .. })
        ));
        assert!(check_public_key(&public).is_ok());
        assert!(check_public_key("not-a-key").is_err());
    }
}
