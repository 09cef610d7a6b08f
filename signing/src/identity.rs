//! Signer identities: OIDC issuer + certificate subject, exact or anchored regex.

use const_oid::ObjectIdentifier;
use regex::Regex;
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::der::asn1::Utf8StringRef;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::SigningError;

/// Fulcio's OIDC issuer extension, v1 (raw string) and v2 (DER UTF8String).
const OIDC_ISSUER_V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.1");
const OIDC_ISSUER_V2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.8");
/// Fulcio's "other name" SAN type (usernames).
const OTHERNAME_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.57264.1.7");

/// How one field of an identity is matched.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Matcher {
    /// Byte-for-byte equality.
    Exact(String),
    /// A regular expression that must match the *whole* value (anchored by this crate as
    /// `^(?:pattern)$`, whatever the caller wrote).
    Regex(Regex),
}

impl Matcher {
    /// Exact match.
    pub fn exact(value: impl Into<String>) -> Self {
        Matcher::Exact(value.into())
    }

    /// Whole-value regular expression (`regex` crate syntax); anchored here.
    pub fn regex(pattern: &str) -> Result<Self, SigningError> {
        Regex::new(&format!("^(?:{pattern})$"))
            .map(Matcher::Regex)
            .map_err(|e| SigningError::InvalidIdentityRule(format!("regex {pattern:?}: {e}")))
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == value,
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// An allowed signer: OIDC issuer and certificate subject (SAN URI, e-mail or Fulcio
/// username), both of which must match.
#[derive(Debug, Clone)]
pub struct IdentityRule {
    /// Matcher for the OIDC issuer (Fulcio certificate extension).
    pub issuer: Matcher,
    /// Matcher for the certificate subject (any one SAN must match).
    pub subject: Matcher,
}

impl IdentityRule {
    /// Both exact.
    pub fn exact(issuer: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            issuer: Matcher::exact(issuer),
            subject: Matcher::exact(subject),
        }
    }

    /// From two matchers.
    pub fn new(issuer: Matcher, subject: Matcher) -> Self {
        Self { issuer, subject }
    }

    /// Whether the identity found in a certificate satisfies this rule.
    pub(crate) fn allows(&self, found: &FoundIdentity) -> bool {
        found
            .issuer
            .as_deref()
            .is_some_and(|i| self.issuer.matches(i))
            && found.subjects.iter().any(|s| self.subject.matches(s))
    }
}

/// The identity a certificate claims.
#[derive(Debug, Clone, Default)]
pub(crate) struct FoundIdentity {
    pub(crate) issuer: Option<String>,
    pub(crate) subjects: Vec<String>,
}

impl FoundIdentity {
    /// Reads the OIDC issuer (v2 extension preferred, v1 otherwise) and the SANs.
    pub(crate) fn from_cert(cert: &Certificate) -> Self {
        let exts = cert
            .tbs_certificate()
            .extensions()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let v2 = exts
            .iter()
            .find(|e| e.extn_id == OIDC_ISSUER_V2)
            .and_then(|e| Utf8StringRef::from_der(e.extn_value.as_bytes()).ok())
            .map(|s| s.as_str().to_owned());
        let v1 = || {
            exts.iter()
                .find(|e| e.extn_id == OIDC_ISSUER_V1)
                .and_then(|e| std::str::from_utf8(e.extn_value.as_bytes()).ok())
                .map(str::to_owned)
        };
        let issuer = v2.or_else(v1);
        let subjects = match cert.tbs_certificate().get_extension::<SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .iter()
                .filter_map(|name| match name {
                    GeneralName::Rfc822Name(n) => Some(n.as_str().to_owned()),
                    GeneralName::UniformResourceIdentifier(n) => Some(n.as_str().to_owned()),
                    GeneralName::OtherName(n) if n.type_id == OTHERNAME_OID => {
                        std::str::from_utf8(n.value.value()).ok().map(str::to_owned)
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Self { issuer, subjects }
    }

    pub(crate) fn refusal(&self) -> SigningError {
        SigningError::IdentityNotAllowed {
            issuer: self.issuer.clone().unwrap_or_default(),
            subject: self.subjects.join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Matcher;

    #[test]
    fn regex_is_anchored_whatever_the_caller_wrote() {
        let m = Matcher::regex("a|b").unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches("a") && m.matches("b"));
        assert!(!m.matches("ab") && !m.matches("xa") && !m.matches("bx"));
        let m = Matcher::regex("^abc$").unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches("abc") && !m.matches("abcd"));
        let m = Matcher::regex("abc").unwrap_or_else(|e| panic!("{e}"));
        assert!(!m.matches("abcd") && !m.matches("zabc"));
        assert!(Matcher::exact("abc").matches("abc") && !Matcher::exact("abc").matches("ab"));
    }
}
