//! TLS and mTLS on the client listener (rustls, ring provider), and the
//! development certificate generator behind `rstmdb --gen-dev-certs DIR`.
//!
//! The frontend runs the handshake on the connection's own executor before
//! the first frame is read; a handshake gets [`HANDSHAKE_TIMEOUT`] so a
//! client that connects and says nothing cannot hold a connection slot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Longest a TLS handshake may take before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS configuration cannot be used. Each message names the file and
/// the config key, so an operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key file could not be read.
    #[error("cannot read {key} {}: {source}", path.display())]
    Read {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the expected kind.
    #[error("{key} {}: {what}", path.display())]
    Pem {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate, or a CA certificate is malformed).
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

/// The one crypto provider the server uses (PLATFORM-NOTES: exactly one).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order; an error if there is none.
fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            key,
            path: path.to_path_buf(),
            what: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            key,
            path: path.to_path_buf(),
            what: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#1 (`RSA PRIVATE KEY`), PKCS#8
/// (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read("tls.key_path", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsSetupError::Pem {
        key: "tls.key_path",
        path: path.to_path_buf(),
        what: format!("no usable private key (PKCS#1, PKCS#8 or SEC1 PEM): {e}"),
    })
}

/// Builds the listener's TLS configuration from `tls.*`; `None` when TLS is
/// off. Called once at start-up, so a bad file stops the server there.
pub fn server_config(cfg: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, TlsSetupError> {
    if !cfg.enabled {
        return Ok(None);
    }
    // Validation guarantees both paths when TLS is enabled.
    let cert_path = cfg.cert_path.as_deref().expect("validated: tls.cert_path");
    let key_path = cfg.key_path.as_deref().expect("validated: tls.key_path");
    let chain = certificates("tls.cert_path", cert_path)?;
    let key = private_key(key_path)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = if cfg.require_client_cert {
        let ca_path = cfg
            .client_ca_path
            .as_deref()
            .expect("validated: tls.client_ca_path");
        let mut roots = RootCertStore::empty();
        for ca in certificates("tls.client_ca_path", ca_path)? {
            roots.add(ca).map_err(|e| TlsSetupError::Pem {
                key: "tls.client_ca_path",
                path: ca_path.to_path_buf(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Rustls(format!("tls.cert_path / tls.key_path: {e}")))?;
    Ok(Some(Arc::new(config)))
}

/// Files written by [`generate_dev_certs`], relative to its directory.
pub const DEV_CERT_FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// Writes a development PKI into `dir`: a CA, a server certificate for
/// `127.0.0.1` (IP SAN) and `localhost` (DNS SAN), and a client certificate
/// for mTLS, all signed by the CA, with PKCS#8 keys (mode 0600). For
/// trying TLS locally and for tests; production certificates come from the
/// operator's own CA.
pub fn generate_dev_certs(dir: &Path) -> Result<(), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| err(&format!("creating {}", dir.display()), &e))?;

    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "rstmdb development CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(|e| err("CA key", &e))?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| err("CA certificate", &e))?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |cn: &str, purpose: ExtendedKeyUsagePurpose, sans: Vec<SanType>| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![purpose];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| err("key", &e))?;
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(|e| err(&format!("{cn} certificate"), &e))?;
        Ok::<_, String>((cert.pem(), key.serialize_pem()))
    };
    let localhost = "localhost"
        .to_string()
        .try_into()
        .map_err(|e| err("SAN", &e))?;
    let (server_pem, server_key) = leaf(
        "rstmdb server",
        ExtendedKeyUsagePurpose::ServerAuth,
        vec![
            SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
            SanType::DnsName(localhost),
        ],
    )?;
    let (client_pem, client_key) = leaf(
        "rstmdb client",
        ExtendedKeyUsagePurpose::ClientAuth,
        Vec::new(),
    )?;

    for (name, text) in DEV_CERT_FILES.iter().zip([
        ca_pem, ca_key_pem, server_pem, server_key, client_pem, client_key,
    ]) {
        let path = dir.join(name);
        write_private(&path, text.as_bytes(), name.ends_with("-key.pem"))
            .map_err(|e| err(&format!("writing {}", path.display()), &e))?;
    }
    Ok(())
}

/// Writes a file; keys get mode 0600 from the start.
fn write_private(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(dir: &Path, mtls: bool) -> TlsConfig {
        TlsConfig {
            enabled: true,
            cert_path: Some(dir.join("server.pem")),
            key_path: Some(dir.join("server-key.pem")),
            require_client_cert: mtls,
            client_ca_path: mtls.then(|| dir.join("ca.pem")),
        }
    }

    #[test]
    fn generated_certificates_make_a_server_config_with_and_without_mtls() {
        let dir = tempfile::tempdir().unwrap();
        generate_dev_certs(dir.path()).unwrap();
        for name in DEV_CERT_FILES {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        assert!(server_config(&tls(dir.path(), false)).unwrap().is_some());
        assert!(server_config(&tls(dir.path(), true)).unwrap().is_some());
        assert!(server_config(&TlsConfig::default()).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        generate_dev_certs(dir.path()).unwrap();
        let mut cfg = tls(dir.path(), false);
        cfg.cert_path = Some(dir.path().join("missing.pem"));
        let e = server_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("tls.cert_path") && e.contains("missing.pem"),
            "{e}"
        );

        // A key file holding a certificate.
        let mut cfg = tls(dir.path(), false);
        cfg.key_path = Some(dir.path().join("ca.pem"));
        let e = server_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("tls.key_path") && e.contains("private key"),
            "{e}"
        );

        // A key that does not belong to the certificate.
        let mut cfg = tls(dir.path(), false);
        cfg.key_path = Some(dir.path().join("client-key.pem"));
        let e = server_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("rejected"), "{e}");

        // A CA file without certificates.
        let mut cfg = tls(dir.path(), true);
        cfg.client_ca_path = Some(dir.path().join("server-key.pem"));
        let e = server_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("tls.client_ca_path") && e.contains("no CERTIFICATE"),
            "{e}"
        );
    }
}

// ---- between cluster peers -------------------------------------------------

/// TLS on the peer port (`replication.tls_enabled`): the node's
/// certificate (`tls.cert_path` / `tls.key_path`) for the peers that
/// connect, and for its own connections the CA to verify peers with
/// (`replication.tls_ca_path`), or none (`replication.tls_insecure`).
/// Peers authenticate each other by the replication token inside the TLS
/// session, so no client certificate is asked for.
#[derive(Clone)]
pub struct PeerTls {
    pub acceptor: futures_rustls::TlsAcceptor,
    pub connector: futures_rustls::TlsConnector,
}

impl PeerTls {
    /// The peer TLS of a node, from its `tls.*` certificate and its
    /// `replication.tls_*` settings.
    pub fn load(
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
        insecure: bool,
    ) -> Result<PeerTls, TlsSetupError> {
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certificates("tls.cert_path", cert)?, private_key(key)?)
            .map_err(|e| TlsSetupError::Rustls(format!("tls.cert_path / tls.key_path: {e}")))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let client = match (ca, insecure) {
            (_, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyPeer(provider())))
                .with_no_client_auth(),
            (Some(ca), false) => {
                let mut roots = RootCertStore::empty();
                for c in certificates("replication.tls_ca_path", ca)? {
                    roots.add(c).map_err(|e| TlsSetupError::Pem {
                        key: "replication.tls_ca_path",
                        path: ca.to_path_buf(),
                        what: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, false) => {
                return Err(TlsSetupError::Rustls(
                    "replication.tls_enabled needs replication.tls_ca_path (or tls_insecure)"
                        .into(),
                ))
            }
        };
        Ok(PeerTls {
            acceptor: futures_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: futures_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// `replication.tls_insecure`: any certificate is accepted (the session is
/// still encrypted, and the token still checked). For testing only.
#[derive(Debug)]
struct AnyPeer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyPeer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
