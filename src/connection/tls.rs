//! TLS for database connections, with rustls.
//!
//! Why rustls (through tokio-postgres-rustls) rather than OpenSSL: it is Rust all the way, so the
//! binary needs no system library, builds the same everywhere (with the `ring` provider, which
//! needs only a C compiler), and cannot pick up a host's OpenSSL configuration. libpq's modes map
//! onto rustls verifiers: no verification, the chain only (`verify-ca`, or any mode once a root
//! certificate is at hand), or the chain and the host name (`verify-full`). Channel binding for
//! SCRAM (`tls-server-end-point`) comes with tokio-postgres-rustls. Not supported: encrypted
//! client keys (`sslpassword`) and revocation lists (`sslcrl`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verification {
    /// Nothing (libpq's `allow`, `prefer` and `require` without a root certificate): the
    /// connection is encrypted, not authenticated.
    None,
    /// The chain, up to one of the roots, but not the name (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots in a PEM file (`sslrootcert`).
pub(crate) fn roots_from_file(path: &Path) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("sslrootcert {}: {err}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no usable certificate in it",
            path.display()
        ));
    }
    Ok(roots)
}

/// The platform's roots (`sslrootcert=system`).
pub(crate) fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err("sslrootcert=system: the system has no CA certificates (Debian: install ca-certificates)".into());
    }
    Ok(roots)
}

/// The client configuration for `verification` against `roots`, presenting `identity` if any.
pub(crate) fn client_config(
    verification: Verification,
    roots: Option<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, String> {
    let provider = provider();
    let chain = match roots {
        Some(roots) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|err| format!("sslrootcert: {err}"))?,
        ),
        None => None,
    };
    let verifier = Arc::new(Verifier {
        verification,
        chain,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|err| format!("sslcert and sslkey: {err}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// libpq's checks of the server certificate, on top of webpki's.
#[derive(Debug)]
struct Verifier {
    verification: Verification,
    /// Checks the chain (and the name); None without roots.
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return match self.verification {
                Verification::None => Ok(ServerCertVerified::assertion()),
                _ => Err(rustls::Error::General("no root certificates".into())),
            };
        };
        let verified = chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match (self.verification, verified) {
            (
                Verification::Chain | Verification::None,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )),
            ) => Ok(ServerCertVerified::assertion()),
            (_, verified) => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
