//! TLS client settings of the delivery tier.
//!
//! Opportunistic STARTTLS (`may`, `encrypt`) accepts any certificate, as
//! RFC 7435 describes: it protects against passive eavesdropping, and a
//! check would only make delivery fall back to plain text. `verify` checks
//! the certificate chain against the system's roots plus an optional CA file,
//! and the name against the host that was connected to.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Client configurations for the STARTTLS policies.
#[derive(Clone)]
pub struct TlsClients {
    /// For `may` and `encrypt`: any certificate is accepted.
    pub unverified: Arc<ClientConfig>,
    /// For `verify`.
    pub verified: Arc<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("TLS client setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsClients {
    /// Builds both configurations; `ca_file` adds trust anchors for `verify`.
    pub fn new(ca_file: Option<&Path>) -> Result<TlsClients, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(error = %error, "a system CA certificate could not be loaded");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system CA certificates loaded");
        if let Some(path) = ca_file {
            let failure = |detail: String| TlsSetupError::CaFile {
                path: path.display().to_string(),
                detail,
            };
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|e| failure(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failure(e.to_string()))?;
            if certificates.is_empty() {
                return Err(failure("no certificate in the file".to_string()));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| failure(e.to_string()))?;
            }
        }
        let verified = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let unverified = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth();

        Ok(TlsClients {
            unverified: Arc::new(unverified),
            verified: Arc::new(verified),
        })
    }
}

/// The server name for a handshake with `host`: a DNS name, or an IP
/// address when the host is written as one.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_end_matches('.');
    ServerName::try_from(host.to_string()).ok()
}

/// Accepts any certificate but still checks the handshake signatures, so
/// the session is encrypted with the key of whoever answered.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
