//! TLS material: listener certificates (PEM text or files) and the client side for `https` targets.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use rustls_platform_verifier::BuilderVerifierExt;

use crate::config::TlsConfig;
use crate::error::{ConfigError, ProxyError};

/// The one crypto provider of the workspace.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn is_pem_text(s: &str) -> bool {
    s.trim_start().starts_with("-----BEGIN")
}

fn load_certs(host: &str, src: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let err = |message: String| ConfigError::Tls { host: host.to_string(), message };
    let certs: Result<Vec<_>, _> = if is_pem_text(src) {
        CertificateDer::pem_slice_iter(src.as_bytes()).collect()
    } else {
        let path = Path::new(src.trim());
        CertificateDer::pem_file_iter(path)
            .map_err(|e| err(format!("cannot read certificate file {}: {e}", path.display())))?
            .collect()
    };
    let certs = certs.map_err(|e| err(format!("certificate PEM is invalid: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found in the certificate PEM".into()));
    }
    Ok(certs)
}

fn load_key(host: &str, src: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let err = |message: String| ConfigError::Tls { host: host.to_string(), message };
    if is_pem_text(src) {
        PrivateKeyDer::from_pem_slice(src.as_bytes()).map_err(|e| err(format!("private key PEM is invalid: {e}")))
    } else {
        let path = Path::new(src.trim());
        PrivateKeyDer::from_pem_file(path).map_err(|e| err(format!("cannot use key file {}: {e}", path.display())))
    }
}

/// Build the server configuration of a TLS listener. `alpn` lists the protocols offered.
pub(crate) fn server_config(host: &str, tls: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, ConfigError> {
    let err = |message: String| ConfigError::Tls { host: host.to_string(), message };
    if tls.cert.trim().is_empty() || tls.key.trim().is_empty() {
        return Err(err("tls is enabled but cert or key is empty".into()));
    }
    let certs = load_certs(host, &tls.cert)?;
    let key = load_key(host, &tls.key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err(format!("certificate and key do not make a usable pair: {e}")))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Client configuration for `https` targets.
#[derive(Clone, Debug, Default)]
pub enum UpstreamTrust {
    /// The operating system's trust store (rustls-platform-verifier).
    #[default]
    Platform,
    /// Only these roots (for private CAs, and in tests).
    Roots(Arc<RootCertStore>),
}

pub(crate) fn client_config(trust: &UpstreamTrust) -> Result<ClientConfig, ProxyError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::UpstreamTls(e.to_string()))?;
    let cfg = match trust {
        UpstreamTrust::Platform => {
            builder.with_platform_verifier().map_err(|e| ProxyError::UpstreamTls(e.to_string()))?.with_no_client_auth()
        }
        UpstreamTrust::Roots(roots) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
    };
    Ok(cfg)
}
