//! Admission by signature: which policy signers signed these component bytes,
//! and which signed grant (single signer or N-of-M quorum) that earns.
//!
//! Every presented signature must verify: one that is malformed, does not match
//! the bytes, or fails a chain, SCT or transparency-log check refuses the
//! program with that reason, even when other signatures are fine (a bad
//! signature attached to a program is never ignored). A *valid* signature by
//! someone the policy does not list is ignored; if no grant is then satisfied
//! the refusal is `IdentityNotAllowed` (nobody listed signed) or `QuorumNotMet`
//! (some listed signers did, not enough).

use crate::admission::{AdmissionError, SignatureRefusal};
use crate::policy::{Policy, SignedGrant, SignerKind};
use cinfer_signing::{SignatureKind, SigningError};

/// One signature that verified and belongs to a policy signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The policy signer it counts for.
    pub signer: String,
    /// `issuer / subject` for keyless signatures, `key sha256:<fingerprint>` for keys.
    pub identity: String,
    /// Signing time, log index and log for signatures with a transparency-log
    /// entry (keyless and key-based bundles); `None` for detached signatures.
    pub log: Option<cinfer_signing::VerifiedSigner>,
}

fn refused(e: &SigningError) -> AdmissionError {
    AdmissionError::Signature {
        refusal: SignatureRefusal::of(e),
        detail: e.to_string(),
    }
}

/// What one valid signature proves.
struct Proved {
    /// The policy signers it counts for (empty when it is by nobody listed).
    listed: Vec<VerifiedSignature>,
    /// The identity that signed, when no policy signer is it.
    unlisted: Option<String>,
}

impl From<Vec<VerifiedSignature>> for Proved {
    fn from(listed: Vec<VerifiedSignature>) -> Self {
        Proved {
            listed,
            unlisted: None,
        }
    }
}

/// What one signature proves: the policy signers it counts for (empty when it is
/// valid but by nobody the policy lists, with the identity found).
fn verify_one(policy: &Policy, bytes: &[u8], sig: &[u8]) -> Result<Proved, AdmissionError> {
    let keys = || {
        policy.signers().iter().filter_map(|s| match &s.kind {
            SignerKind::Key {
                public_key_pem,
                fingerprint,
            } => Some((
                s.name.as_str(),
                public_key_pem.as_slice(),
                fingerprint.as_str(),
            )),
            SignerKind::Keyless(_) => None,
        })
    };
    match cinfer_signing::signature_kind(sig).map_err(|e| refused(&e))? {
        SignatureKind::KeylessBundle => {
            let trust = policy.trust_root().ok_or(AdmissionError::NoTrustRoot)?;
            let listed: Vec<_> = policy
                .signers()
                .iter()
                .filter_map(|s| match &s.kind {
                    SignerKind::Keyless(rule) => Some((s.name.as_str(), rule)),
                    SignerKind::Key { .. } => None,
                })
                .collect();
            let rules: Vec<_> = listed.iter().map(|(_, r)| (*r).clone()).collect();
            match cinfer_signing::verify_bundle(bytes, sig, trust, &rules) {
                Ok(v) => Ok(listed
                    .iter()
                    .filter(|(_, r)| r.issuer.matches(&v.issuer) && r.subject.matches(&v.subject))
                    .map(|(name, _)| VerifiedSignature {
                        signer: (*name).to_owned(),
                        identity: format!("{} / {}", v.issuer, v.subject),
                        log: Some(v.clone()),
                    })
                    .collect::<Vec<_>>()
                    .into()),
                Err(SigningError::IdentityNotAllowed { issuer, subject }) => Ok(Proved {
                    listed: Vec::new(),
                    unlisted: Some(format!("{issuer} / {subject}")),
                }),
                Err(e) => Err(refused(&e)),
            }
        }
        SignatureKind::KeyBundle => {
            let trust = policy.trust_root().ok_or(AdmissionError::NoTrustRoot)?;
            // Verified under the key its log entry records before any policy key is
            // looked at: an invalid bundle refuses even when no listed key made it.
            let v = cinfer_signing::verify_logged_key_bundle(bytes, sig, trust)
                .map_err(|e| refused(&e))?;
            let listed: Vec<_> = keys()
                .filter(|(_, _, fingerprint)| *fingerprint == v.subject)
                .map(|(name, _, fingerprint)| VerifiedSignature {
                    signer: name.to_owned(),
                    identity: format!("key sha256:{fingerprint}"),
                    log: Some(v.clone()),
                })
                .collect();
            let unlisted = listed
                .is_empty()
                .then(|| format!("key sha256:{}", v.subject));
            Ok(Proved { listed, unlisted })
        }
        SignatureKind::Detached => {
            // A detached ECDSA signature names no key: it is valid for a listed
            // key or it is not (over other bytes and by another key look alike).
            cinfer_signing::parse_detached(sig).map_err(|e| refused(&e))?;
            let mut found = Vec::new();
            let mut listed_keys = 0;
            for (name, pem, fingerprint) in keys() {
                listed_keys += 1;
                match cinfer_signing::verify_detached(bytes, sig, pem) {
                    Ok(()) => found.push(VerifiedSignature {
                        signer: name.to_owned(),
                        identity: format!("key sha256:{fingerprint}"),
                        log: None,
                    }),
                    Err(SigningError::KeySignatureInvalid) => {}
                    Err(e) => return Err(refused(&e)),
                }
            }
            if listed_keys == 0 {
                return Err(AdmissionError::Signature {
                    refusal: SignatureRefusal::IdentityNotAllowed,
                    detail: "a detached key signature, but the policy lists no signer keys".into(),
                });
            }
            if found.is_empty() {
                return Err(AdmissionError::Signature {
                    refusal: SignatureRefusal::KeySignatureInvalid,
                    detail: format!(
                        "the detached signature does not verify over these bytes under any of the policy's {listed_keys} signer key(s)"
                    ),
                });
            }
            Ok(found.into())
        }
    }
}

/// Verifies every signature over `bytes` and returns the first grant (in
/// [`Policy::signed_grants`] order) whose threshold the verified signers meet,
/// with the signatures that count.
pub(crate) fn admit(
    policy: &Policy,
    bytes: &[u8],
    signatures: &[&[u8]],
) -> Result<(SignedGrant, Vec<VerifiedSignature>), AdmissionError> {
    if signatures.is_empty() {
        return Err(AdmissionError::Signature {
            refusal: SignatureRefusal::Unsigned,
            detail: "no signature presented".into(),
        });
    }
    let mut verified: Vec<VerifiedSignature> = Vec::new();
    let mut unlisted: Vec<String> = Vec::new();
    for sig in signatures {
        let proved = verify_one(policy, bytes, sig)?;
        for v in proved.listed {
            if !verified.iter().any(|o| o.signer == v.signer) {
                verified.push(v);
            }
        }
        if let Some(who) = proved.unlisted
            && !unlisted.contains(&who)
        {
            unlisted.push(who);
        }
    }
    for g in policy.signed_grants() {
        // Distinct identities, not names: one key or certificate identity listed
        // under two signer names counts once towards a quorum.
        let mut counted: Vec<VerifiedSignature> = Vec::new();
        for v in verified.iter().filter(|v| g.signers.contains(&v.signer)) {
            if !counted.iter().any(|c| c.identity == v.identity) {
                counted.push(v.clone());
            }
        }
        if counted.len() >= g.threshold {
            return Ok((g.clone(), counted));
        }
    }
    let have: Vec<&str> = verified.iter().map(|v| v.signer.as_str()).collect();
    let unlisted_note = if unlisted.is_empty() {
        String::new()
    } else {
        format!("; signed by unlisted [{}]", unlisted.join(", "))
    };
    if have.is_empty() {
        return Err(AdmissionError::Signature {
            refusal: SignatureRefusal::IdentityNotAllowed,
            detail: format!(
                "the signatures are valid but none is by a signer the policy lists{unlisted_note}"
            ),
        });
    }
    // The listed signers that signed, grouped by identity: two names for one
    // key or certificate identity count once, and the message says so.
    let mut identities: Vec<(&str, Vec<&str>)> = Vec::new();
    for v in &verified {
        match identities.iter_mut().find(|(id, _)| *id == v.identity) {
            Some((_, names)) => names.push(&v.signer),
            None => identities.push((&v.identity, vec![&v.signer])),
        }
    }
    let signed_by: Vec<String> = identities
        .iter()
        .map(|(id, names)| match names.as_slice() {
            [one] => format!("`{one}` ({id})"),
            many => format!("{} (all {id}, counted once)", many.join(" = ")),
        })
        .collect();
    let needs: Vec<String> = policy
        .signed_grants()
        .iter()
        .filter(|g| g.signers.iter().any(|s| have.contains(&s.as_str())))
        .map(|g| {
            format!(
                "`{}` needs {} distinct of [{}]",
                g.grant.name,
                g.threshold,
                g.signers.join(", ")
            )
        })
        .collect();
    Err(AdmissionError::Signature {
        refusal: SignatureRefusal::QuorumNotMet,
        detail: format!(
            "signed by {} distinct listed identit{}: {}{unlisted_note}; {}",
            identities.len(),
            if identities.len() == 1 { "y" } else { "ies" },
            signed_by.join(", "),
            if needs.is_empty() {
                "no grant names these signers".to_owned()
            } else {
                needs.join("; ")
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::path::PathBuf;

    const ACTIONS: &str = "https://token.actions.githubusercontent.com";
    const RELEASE: &str =
        "https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main";

    fn repo(rel: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn fixture(name: &str) -> Vec<u8> {
        repo(&format!("tests/sigstore/fixtures/{name}"))
    }

    /// A policy that lists the release workflow (keyless) and no key.
    fn keyless_policy() -> Policy {
        let toml_text = format!(
            "worlds = \"worlds.wit\"\ntrust-root = \"trusted_root.json\"\n\
             [[signer]]\nname = \"ci-release\"\nissuer = \"{ACTIONS}\"\nsubject = \"{RELEASE}\"\nworld = \"request-reply\"\n"
        );
        Policy::parse(&toml_text, |name| {
            let bytes = match name {
                "trusted_root.json" => fixture(name),
                _ => repo("policies/worlds.wit"),
            };
            Ok(String::from_utf8(bytes).unwrap())
        })
        .expect("policy")
    }

    /// `bundle` with its message signature taken from `donor` (valid-looking, wrong).
    fn with_signature_of(bundle: &str, donor: &str) -> Vec<u8> {
        let donor: serde_json::Value = serde_json::from_slice(&fixture(donor)).unwrap();
        let mut b: serde_json::Value = serde_json::from_slice(&fixture(bundle)).unwrap();
        b["messageSignature"]["signature"] = donor["messageSignature"]["signature"].clone();
        serde_json::to_vec(&b).unwrap()
    }

    fn refusal(
        r: Result<(SignedGrant, Vec<VerifiedSignature>), AdmissionError>,
    ) -> SignatureRefusal {
        match r {
            Err(AdmissionError::Signature { refusal, .. }) => refusal,
            Err(other) => panic!("expected a signature refusal, got {other}"),
            Ok((g, _)) => panic!("admitted under {}", g.grant.name),
        }
    }

    #[test]
    fn an_invalid_signature_by_an_unlisted_signer_refuses_the_program() {
        let policy = keyless_policy();
        let artifact = fixture("artifact.bin");
        let good = fixture("artifact.sigstore.json");
        admit(&policy, &artifact, &[&good]).expect("the good bundle alone");

        // Keyless, by an identity the policy does not list, signature not over these bytes.
        let bad_keyless =
            with_signature_of("other-identity.sigstore.json", "artifact.sigstore.json");
        // Key-based, by a key the policy does not list (it lists none), signature not the
        // logged one.
        let bad_key =
            with_signature_of("key-untrusted.sigstore.json", "artifact.key.sigstore.json");

        for (bad, reason) in [
            (&bad_keyless, SignatureRefusal::SignatureMismatch),
            (&bad_key, SignatureRefusal::TransparencyProofInvalid),
        ] {
            // Beside a good signature, in either order, and alone.
            assert_eq!(refusal(admit(&policy, &artifact, &[&good, bad])), reason);
            assert_eq!(refusal(admit(&policy, &artifact, &[bad, &good])), reason);
            assert_eq!(refusal(admit(&policy, &artifact, &[bad])), reason);
        }

        // Valid signatures by unlisted signers are still only ignored.
        let other = fixture("other-identity.sigstore.json");
        let other_key = fixture("key-untrusted.sigstore.json");
        admit(&policy, &artifact, &[&good, &other, &other_key]).expect("valid, unlisted: ignored");
        assert_eq!(
            refusal(admit(&policy, &artifact, &[&other, &other_key])),
            SignatureRefusal::IdentityNotAllowed
        );
    }
}
