//! TLS for the untrusted services around the loader: the inference server's
//! and the keyserver's listeners ([`TlsIdentity`]) and the server's HTTPS
//! client to keyservers ([`client_config`]). rustls with ring, TLS 1.2 and
//! 1.3, HTTP/1.1 by ALPN. Confidentiality never depends on it (requests,
//! replies and key releases are sealed end to end); it keeps metadata and
//! bearer-free endpoints off the wire and lets clients check whom they talk
//! to. The trusted loader has no TLS stack (its ban list says so).
#![forbid(unsafe_code)]

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Why a TLS identity or trust store did not load. Names the file's role,
/// never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn bad(what: &str, e: &dyn std::fmt::Display) -> TlsError {
    TlsError(format!("{what}: {e}"))
}

/// The ring provider every configuration here uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PEM certificates, at least one.
fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, &e))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what}: no PEM certificate in it")));
    }
    Ok(certs)
}

/// A listener's TLS identity: a certificate chain and its private key (PEM),
/// checked to load when it is made.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TlsIdentity {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity")
    }
}

impl TlsIdentity {
    /// An identity from a PEM certificate chain (leaf first) and a PEM private key.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Self, TlsError> {
        let id = TlsIdentity {
            cert_pem,
            key_pem: zeroize::Zeroizing::new(key_pem),
        };
        id.server_config()?;
        Ok(id)
    }

    /// The rustls configuration serving it.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = certificates("tls-cert", &self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("tls-key", &e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("tls-cert and tls-key", &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A client configuration trusting the Mozilla roots (`webpki-roots`) and
/// the certificates of `extra_ca_pem` (an operator's private CA, PEM).
pub fn client_config(extra_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        for cert in certificates("keyserver-ca-cert", pem)? {
            roots.add(cert).map_err(|e| bad("keyserver-ca-cert", &e))?;
        }
    }
    // No ALPN here: the HTTP connector sets it (hyper-rustls refuses a
    // configuration that has it already).
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A throwaway CA and a server certificate it signed, made fresh for tests.
#[cfg(feature = "test-ca")]
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate (PEM): what a client trusts.
    pub ca_pem: Vec<u8>,
    /// The server certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// Its private key (PEM).
    pub key_pem: Vec<u8>,
}

#[cfg(feature = "test-ca")]
impl TestCa {
    /// A CA and a certificate for `host` (a DNS name or an IP address).
    pub fn new(host: &str) -> Result<Self, TlsError> {
        let err = |e: rcgen::Error| bad("test CA", &e);
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(
            ca_params,
            rcgen::KeyPair::generate().map_err(err)?,
        )
        .map_err(err)?;
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .map_err(err)?
            .signed_by(&key, &ca)
            .map_err(err)?;
        Ok(TestCa {
            ca_pem: ca.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        })
    }

    /// The server certificate and key as a listener identity.
    pub fn identity(&self) -> Result<TlsIdentity, TlsError> {
        TlsIdentity::from_pem(self.cert_pem.clone(), self.key_pem.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_their_contents_are_refused_with_their_role() {
        let e = TlsIdentity::from_pem(b"not pem".to_vec(), b"nor this".to_vec()).unwrap_err();
        assert!(e.0.starts_with("tls-cert"), "{e}");
        let e = client_config(Some(b"no certificate here")).unwrap_err();
        assert_eq!(e.0, "keyserver-ca-cert: no PEM certificate in it");
        assert!(client_config(None).is_ok());
    }
}
