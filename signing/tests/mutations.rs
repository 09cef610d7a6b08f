//! Mutations of good bundles, as a stable stand-in for the `sigstore_bundle` fuzz target in CI:
//!
//! - a one-bit change in any signed or authenticated field (decoded from base64, flipped,
//!   re-encoded) is refused — never accepted, never a panic;
//! - random byte edits of the JSON text are refused or, where the edit left the bundle's meaning
//!   intact (whitespace, an unknown field), accepted — and never panic.
//!
//! Deterministic (a fixed-seed xorshift), so a failure names the field and the seed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cinfer_signing::{IdentityRule, TrustRoot, verify_bundle, verify_logged_key_bundle};
use serde_json::Value;

const ISSUER: &str = "https://token.actions.githubusercontent.com";
const SUBJECT: &str =
    "https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main";

fn read(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/sigstore/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// JSON pointers of base64 fields whose every bit is authenticated (by a certificate, SCT, log
/// or checkpoint signature, the Merkle path, or the artifact digest).
const KEYLESS_FIELDS: &[&str] = &[
    "/verificationMaterial/certificate/rawBytes",
    "/verificationMaterial/tlogEntries/0/canonicalizedBody",
    "/verificationMaterial/tlogEntries/0/inclusionPromise/signedEntryTimestamp",
    "/verificationMaterial/tlogEntries/0/logId/keyId",
    "/verificationMaterial/tlogEntries/0/inclusionProof/rootHash",
    "/verificationMaterial/tlogEntries/0/inclusionProof/hashes/0",
    "/verificationMaterial/tlogEntries/0/inclusionProof/hashes/3",
    "/messageSignature/messageDigest/digest",
    "/messageSignature/signature",
];

fn flip_bit(doc: &Value, pointer: &str, rng: &mut Rng) -> Option<Vec<u8>> {
    let mut doc = doc.clone();
    let field = doc.pointer_mut(pointer)?;
    let mut bytes = B64.decode(field.as_str()?).ok()?;
    let i = rng.below(bytes.len());
    bytes[i] ^= 1 << rng.below(8);
    *field = Value::String(B64.encode(&bytes));
    Some(serde_json::to_vec(&doc).unwrap())
}

#[test]
fn a_flipped_bit_in_any_authenticated_field_is_refused() {
    let trust = TrustRoot::from_json(&read("trusted_root.json")).unwrap();
    let artifact = read("artifact.bin");
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for bundle in ["artifact.sigstore.json", "artifact.v02.sigstore.json"] {
        let good = read(bundle);
        verify_bundle(&artifact, &good, &trust, &rules).unwrap();
        let doc: Value = serde_json::from_slice(&good).unwrap();
        let v02 = doc.pointer(KEYLESS_FIELDS[0]).is_none();
        for pointer in KEYLESS_FIELDS {
            // v0.2 carries the leaf in a one-certificate chain.
            let pointer = if v02 && *pointer == KEYLESS_FIELDS[0] {
                "/verificationMaterial/x509CertificateChain/certificates/0/rawBytes"
            } else {
                pointer
            };
            let mut tried = 0;
            for _ in 0..40 {
                let Some(bad) = flip_bit(&doc, pointer, &mut rng) else {
                    continue;
                };
                tried += 1;
                let verdict = verify_bundle(&artifact, &bad, &trust, &rules);
                assert!(
                    verdict.is_err(),
                    "{bundle} {pointer}: a flipped bit was accepted"
                );
            }
            assert_eq!(tried, 40, "{bundle}: no base64 field at {pointer}");
        }
        // The checkpoint's signed note: any byte of the text before the blank line.
        let pointer = "/verificationMaterial/tlogEntries/0/inclusionProof/checkpoint/envelope";
        let envelope = doc
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap()
            .to_owned();
        let signed_len = envelope.find("\n\n").unwrap() + 1;
        for _ in 0..40 {
            let mut bytes = envelope.clone().into_bytes();
            let i = rng.below(signed_len);
            bytes[i] = if bytes[i] == b'7' { b'8' } else { b'7' };
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            let mut bad = doc.clone();
            *bad.pointer_mut(pointer).unwrap() = Value::String(text);
            let verdict = verify_bundle(
                &artifact,
                &serde_json::to_vec(&bad).unwrap(),
                &trust,
                &rules,
            );
            assert!(
                verdict.is_err(),
                "{bundle}: checkpoint byte {i} changed and accepted"
            );
        }
    }
}

#[test]
fn random_edits_of_the_json_never_panic() {
    let trust = TrustRoot::from_json(&read("trusted_root.json")).unwrap();
    let artifact = read("artifact.bin");
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut refused = 0;
    for bundle in [
        "artifact.sigstore.json",
        "artifact.v02.sigstore.json",
        "artifact.key.sigstore.json",
    ] {
        let good = read(bundle);
        for _ in 0..1500 {
            let mut bad = good.clone();
            for _ in 0..=rng.below(3) {
                let i = rng.below(bad.len());
                match rng.below(3) {
                    0 => bad[i] = rng.next() as u8,
                    1 => {
                        bad.remove(i);
                    }
                    _ => bad.truncate(i),
                }
            }
            let keyless = verify_bundle(&artifact, &bad, &trust, &rules);
            let key = verify_logged_key_bundle(&artifact, &bad, &trust);
            refused += usize::from(keyless.is_err() && key.is_err());
        }
    }
    // Nearly every edit breaks the JSON, a base64 field or a signature.
    assert!(refused > 4000, "only {refused} of 4500 edits refused");
}
