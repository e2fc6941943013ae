//! TLS for the listeners: load the configured certificate, or make a
//! self-signed one in `data_dir` on first start so STARTTLS works out of the
//! box.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::session::TlsInfo;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: no usable PEM {what} found")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where a certificate came from, for the startup log.
#[derive(Debug, Clone)]
pub enum CertSource {
    Configured(PathBuf),
    Generated(PathBuf),
    Existing(PathBuf),
}

/// Builds the rustls server config from explicit files.
pub fn from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = fs::read(cert).map_err(|source| TlsError::Read {
        path: cert.into(),
        source,
    })?;
    let key_pem = fs::read(key).map_err(|source| TlsError::Read {
        path: key.into(),
        source,
    })?;
    build(&cert_pem, cert, &key_pem, key)
}

/// Uses `dir/cert.pem` and `dir/key.pem`, generating them for `hostname`
/// (and `localhost`) when they do not exist yet.
pub fn self_signed(
    dir: &Path,
    hostname: &str,
) -> Result<(Arc<ServerConfig>, CertSource), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        let config = from_files(&cert_path, &key_path)?;
        return Ok((config, CertSource::Existing(cert_path)));
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.into(),
        source,
    })?;
    let mut names = vec![hostname.to_owned()];
    if hostname != "localhost" {
        names.push("localhost".into());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    let cert_pem = certified.cert.pem();
    let key_pem = certified.key_pair.serialize_pem();
    write_private(&key_path, key_pem.as_bytes())?;
    fs::write(&cert_path, cert_pem.as_bytes()).map_err(|source| TlsError::Write {
        path: cert_path.clone(),
        source,
    })?;
    let config = build(
        cert_pem.as_bytes(),
        &cert_path,
        key_pem.as_bytes(),
        &key_path,
    )?;
    Ok((config, CertSource::Generated(cert_path)))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let err = |source| TlsError::Write {
        path: path.into(),
        source,
    };
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn build(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.into(),
            what: "certificate",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::Pem {
        path: key_path.into(),
        what: "private key",
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Version and cipher suite of an established server connection.
pub fn info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    TlsInfo { version, cipher }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = std::env::temp_dir().join(format!("mailroom-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (_, first) = self_signed(&dir, "mx.test").unwrap();
        assert!(matches!(first, CertSource::Generated(_)));
        let (_, second) = self_signed(&dir, "mx.test").unwrap();
        assert!(matches!(second, CertSource::Existing(_)));
        let _ = fs::remove_dir_all(&dir);
    }
}
