//! The trust root: `trusted_root.json` (protobuf-specs `TrustedRoot`, JSON mapping).

use rustls_pki_types::CertificateDer;
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};

use crate::bundle::{TimeRange, TransparencyLogInstance, TrustedRoot as ProtoTrustedRoot};
use crate::cert::unix;
use crate::crypto::EcKey;
use crate::{CertValidity, ChainCert, SigningError};

/// A validity window in Unix seconds; `None` = open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    start: Option<i64>,
    end: Option<i64>,
}

impl Window {
    fn from_proto(range: Option<&TimeRange>) -> Self {
        Self {
            start: range.and_then(|r| r.start),
            end: range.and_then(|r| r.end),
        }
    }

    /// Whether `t` (Unix seconds) lies in the window.
    pub(crate) fn contains(&self, t: i64) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}

/// One certificate of a CA chain, with what the chain checks need from it.
#[derive(Debug, Clone)]
struct CaCert {
    der: Vec<u8>,
    cert: Certificate,
    not_before: i64,
    not_after: i64,
}

impl CaCert {
    fn parse(der: Vec<u8>) -> Result<Self, String> {
        let cert = Certificate::from_der(&der).map_err(|e| e.to_string())?;
        let validity = cert.tbs_certificate().validity();
        let (not_before, not_after) = (unix(validity.not_before), unix(validity.not_after));
        Ok(Self {
            der,
            cert,
            not_before,
            not_after,
        })
    }

    /// Whether `t` (Unix seconds) lies in `notBefore ..= notAfter`.
    fn valid_at(&self, t: i64) -> bool {
        self.not_before <= t && t <= self.not_after
    }

    /// Whether this certificate may be the issuer of `leaf`: same name, and the same key
    /// identifier where both name one. (A hint for naming a refusal, not a signature check.)
    fn may_have_issued(&self, leaf: &Certificate) -> bool {
        if self.cert.tbs_certificate().subject() != leaf.tbs_certificate().issuer() {
            return false;
        }
        let aki = leaf
            .tbs_certificate()
            .get_extension::<AuthorityKeyIdentifier>()
            .ok()
            .flatten()
            .and_then(|(_, a)| a.key_identifier);
        let ski = self
            .cert
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .map(|(_, s)| s.0);
        match (aki, ski) {
            (Some(a), Some(s)) => a == s,
            _ => true,
        }
    }

    fn refusal(&self, t: i64) -> SigningError {
        SigningError::CertificateNotValidAtSigningTime {
            certificate: ChainCert::Ca {
                subject: self.cert.tbs_certificate().subject().to_string(),
            },
            kind: if t < self.not_before {
                CertValidity::NotYetValid
            } else {
                CertValidity::Expired
            },
            signing_time: t,
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

/// One certificate authority: its chain (leaf-most first, root last) and `validFor` window.
#[derive(Debug, Clone)]
struct Ca {
    chain: Vec<CaCert>,
    valid_for: Window,
}

impl Ca {
    /// The certificates of this CA that may anchor a leaf signed at `t`: none outside the CA's
    /// `validFor`; else each certificate that is valid at `t` together with every certificate
    /// above it in the chain (its path to the root) — the longest such tail of the chain.
    ///
    /// Every one of them is handed to webpki as a trust anchor, so a leaf chains to whichever of
    /// them issued it, and webpki never checks an anchor's dates. Offering only these
    /// certificates makes every certificate of the path valid at the signing time.
    fn anchors_at(&self, t: i64) -> &[CaCert] {
        if !self.valid_for.contains(t) {
            return &[];
        }
        let first = self
            .chain
            .iter()
            .rposition(|c| !c.valid_at(t))
            .map_or(0, |i| i + 1);
        &self.chain[first..]
    }
}

/// A transparency log (Rekor) or CT log: key ID, DER SubjectPublicKeyInfo, validity.
#[derive(Debug, Clone)]
pub(crate) struct Log {
    pub(crate) log_id: Vec<u8>,
    /// The log's key, or why it cannot be used here (only ECDSA P-256 / P-384 keys are: a root
    /// may list logs of other kinds, e.g. public-good's Ed25519 Rekor v2 log, and entries from
    /// those are refused by name rather than the whole root).
    pub(crate) key: Result<EcKey, String>,
    pub(crate) valid_for: Window,
    pub(crate) base_url: String,
}

/// What a verifier trusts: certificate authorities, Rekor logs and CT logs, each with its
/// validity window, parsed from a `trusted_root.json`.
#[derive(Debug, Clone)]
pub struct TrustRoot {
    cas: Vec<Ca>,
    tlogs: Vec<Log>,
    ctlogs: Vec<Log>,
}

const MEDIA_TYPE_PREFIX: &str = "application/vnd.dev.sigstore.trustedroot";

impl TrustRoot {
    /// Parses a `trusted_root.json` (media type
    /// `application/vnd.dev.sigstore.trustedroot+json;version=0.1` or later).
    ///
    /// Refuses a root without a certificate authority or without a Rekor log, and any log
    /// without a key or log ID. Timestamp authorities are ignored (not used by this crate).
    pub fn from_json(json: &[u8]) -> Result<Self, SigningError> {
        let root: ProtoTrustedRoot = serde_json::from_slice(json)
            .map_err(|e| SigningError::MalformedTrustRoot(format!("not a TrustedRoot: {e}")))?;
        if !root.media_type.starts_with(MEDIA_TYPE_PREFIX) {
            return Err(SigningError::MalformedTrustRoot(format!(
                "unexpected media type {:?}",
                root.media_type
            )));
        }
        let mut cas = Vec::new();
        for (i, ca) in root.certificate_authorities.iter().enumerate() {
            let chain: Vec<CaCert> = ca
                .cert_chain
                .as_ref()
                .map(|c| c.certificates.as_slice())
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    CaCert::parse(c.raw_bytes.clone()).map_err(|e| {
                        SigningError::MalformedTrustRoot(format!(
                            "certificateAuthorities[{i}].certChain[{j}]: {e}"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            if chain.is_empty() {
                return Err(SigningError::MalformedTrustRoot(format!(
                    "certificateAuthorities[{i}] has no certificate"
                )));
            }
            cas.push(Ca {
                chain,
                valid_for: Window::from_proto(ca.valid_for.as_ref()),
            });
        }
        let tlogs = logs(&root.tlogs, "tlogs")?;
        let ctlogs = logs(&root.ctlogs, "ctlogs")?;
        if cas.is_empty() {
            return Err(SigningError::MalformedTrustRoot(
                "no certificate authority".to_owned(),
            ));
        }
        if tlogs.is_empty() {
            return Err(SigningError::MalformedTrustRoot(
                "no transparency log".to_owned(),
            ));
        }
        Ok(Self { cas, tlogs, ctlogs })
    }

    /// The Rekor log with this log ID, if trusted.
    pub(crate) fn tlog(&self, log_id: &[u8]) -> Option<&Log> {
        self.tlogs.iter().find(|l| l.log_id == log_id)
    }

    /// The CA certificates that may anchor a leaf signed at `t` (Unix seconds): those of CAs
    /// whose `validFor` contains `t` that are valid at `t` with every certificate above them
    /// ([`Ca::anchors_at`]).
    pub(crate) fn anchors_at(&self, t: i64) -> Vec<CertificateDer<'_>> {
        self.cas
            .iter()
            .flat_map(|ca| ca.anchors_at(t))
            .map(|c| CertificateDer::from(c.der.as_slice()))
            .collect()
    }

    /// The key of the CT log with this log ID, if trusted and valid at `t`.
    pub(crate) fn ctlog(&self, log_id: &[u8], t: i64) -> Option<&EcKey> {
        self.ctlogs
            .iter()
            .find(|l| l.log_id == log_id && l.valid_for.contains(t))
            .and_then(|l| l.key.as_ref().ok())
    }

    /// Why `leaf` found no anchor at `t`, when a CA certificate (of a CA whose `validFor`
    /// contains `t`) names itself as the leaf's issuer but it, or one above it in its chain, was
    /// not valid at `t`: that certificate's refusal. `None` when no such certificate exists.
    pub(crate) fn ca_not_valid_at(&self, leaf: &Certificate, t: i64) -> Option<SigningError> {
        self.cas
            .iter()
            .filter(|ca| ca.valid_for.contains(t))
            .find_map(|ca| {
                let issuer = ca.chain.iter().position(|c| c.may_have_issued(leaf))?;
                ca.chain[issuer..].iter().find(|c| !c.valid_at(t))
            })
            .map(|c| c.refusal(t))
    }
}

fn logs(list: &[TransparencyLogInstance], what: &str) -> Result<Vec<Log>, SigningError> {
    list.iter()
        .enumerate()
        .map(|(i, l)| {
            let key = l.public_key.as_ref();
            let spki = key.and_then(|k| k.raw_bytes.clone()).ok_or_else(|| {
                SigningError::MalformedTrustRoot(format!("{what}[{i}] has no public key"))
            })?;
            let log_id = l
                .log_id
                .as_ref()
                .map(|id| id.key_id.clone())
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    SigningError::MalformedTrustRoot(format!("{what}[{i}] has no log ID"))
                })?;
            Ok(Log {
                log_id,
                key: EcKey::from_spki_der(&spki),
                valid_for: Window::from_proto(key.and_then(|k| k.valid_for.as_ref())),
                base_url: l.base_url.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn windows_are_inclusive_and_may_be_open() {
        let w = Window {
            start: Some(10),
            end: Some(20),
        };
        assert!(!w.contains(9) && w.contains(10) && w.contains(20) && !w.contains(21));
        let open = Window {
            start: Some(10),
            end: None,
        };
        assert!(open.contains(i64::MAX) && !open.contains(9));
        let all = Window {
            start: None,
            end: None,
        };
        assert!(all.contains(0));
    }
}
