//! TLS pieces shared by the Redis and Postgres clients: the process-wide rustls crypto provider,
//! and reading a CA file so that a bad one stops startup with its path in the message.
//!
//! Both drivers use rustls with the ring provider. sqlx hands its provider over explicitly; the
//! redis crate takes the process default, which rustls only picks by itself while exactly one
//! provider is compiled in, so relay installs ring before the first Redis client instead of
//! relying on that. reqwest (the webhook client, which gets its own ring configuration, and
//! every other reqwest client in the process: healthcheck, trace export, the load generator,
//! tests) is built with rustls and no provider of its own, and panics when a client is built
//! without a process default: every binary installs ring first thing ([`crate::cli::main`]).

use std::path::Path;

use rustls::pki_types::{CertificateDer, pem::PemObject};

/// Why a CA file cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read `{path}`: {reason}")]
    Read { path: String, reason: String },
    #[error("`{path}` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate { path: String },
    #[error("`{path}` is not a usable PEM CA certificate: {reason}")]
    Invalid { path: String, reason: String },
}

/// Make ring the process-wide rustls provider (a no-op when one is installed already).
pub fn install_crypto_provider() {
    // `Err` only means a provider is already in place, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Read a PEM file of CA certificates: readable, at least one certificate, each one usable as a
/// trust anchor. Returns the file's bytes.
pub fn read_ca_pem(path: &Path) -> Result<Vec<u8>, CaFileError> {
    let shown = || path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| CaFileError::Read {
        path: shown(),
        reason: e.to_string(),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| CaFileError::Invalid {
            path: shown(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| CaFileError::Invalid {
            path: shown(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(CaFileError::NoCertificate { path: shown() });
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("relay-tls-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read_ca_pem(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(matches!(err, CaFileError::Read { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let path = temp_file("empty.pem", "not a certificate\n");
        let err = read_ca_pem(&path).unwrap_err();
        assert!(matches!(err, CaFileError::NoCertificate { .. }), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_broken_certificate_is_refused() {
        let path = temp_file(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let err = read_ca_pem(&path).unwrap_err();
        assert!(matches!(err, CaFileError::Invalid { .. }), "{err}");
        let _ = std::fs::remove_file(path);
    }
}
