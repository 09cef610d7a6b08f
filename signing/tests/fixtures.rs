//! Every fixture of `tests/sigstore/fixtures/manifest.json` gets the expected verdict, and every
//! refusal the expected reason (matched on the error variant).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

use cinfer_signing::{
    CertValidity, IdentityRule, Matcher, SigningError, TransparencyError, TrustRoot, verify_bundle,
    verify_detached, verify_key_bundle,
};
use serde_json::Value;

const ISSUER: &str = "https://token.actions.githubusercontent.com";
const SUBJECT: &str =
    "https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sigstore/fixtures")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

fn trust() -> TrustRoot {
    TrustRoot::from_json(&read("trusted_root.json")).expect("trusted_root.json")
}

fn manifest() -> Value {
    serde_json::from_slice(&read("manifest.json")).expect("manifest.json")
}

/// Whether `err` is the refusal the manifest names for `file`.
fn reason_matches(reason: &str, kind: &str, file: &str, err: &SigningError) -> bool {
    use SigningError as E;
    use TransparencyError as T;
    match (reason, kind) {
        ("transparency-proof-invalid", _) => match file {
            "tampered-integrated-time.sigstore.json" | "tampered-log-index.sigstore.json" => {
                matches!(err, E::TransparencyProofInvalid(T::SignedEntryTimestamp))
            }
            "tampered-inclusion-proof.sigstore.json" => {
                matches!(err, E::TransparencyProofInvalid(T::InclusionProof))
            }
            // The index check runs before the Merkle path (which would fail too).
            "tampered-proof-log-index.sigstore.json" => matches!(
                err,
                E::TransparencyProofInvalid(T::LogIndexMismatch {
                    entry: 1337,
                    proof: 1338
                })
            ),
            "tampered-checkpoint.sigstore.json" => {
                matches!(err, E::TransparencyProofInvalid(T::CheckpointSignature))
            }
            "untrusted-rekor.sigstore.json" => {
                matches!(err, E::TransparencyProofInvalid(T::UntrustedLog { .. }))
            }
            _ => matches!(err, E::TransparencyProofInvalid(_)),
        },
        // ECDSA cannot tell "other key" from "other bytes": one reason for both.
        ("signature-mismatch" | "identity-not-in-policy", "detached-signature") => {
            matches!(err, E::KeySignatureInvalid)
        }
        ("signature-mismatch", _) => matches!(err, E::SignatureMismatch),
        ("untrusted-ca", _) => matches!(err, E::UntrustedCa),
        ("identity-not-in-policy", "key-bundle") => matches!(err, E::KeyNotTrusted { .. }),
        ("identity-not-in-policy", _) => matches!(err, E::IdentityNotAllowed { .. }),
        ("cert-expired-at-signing-time", _) => matches!(
            err,
            E::CertificateNotValidAtSigningTime {
                kind: CertValidity::Expired,
                ..
            }
        ),
        ("cert-not-yet-valid-at-signing-time", _) => matches!(
            err,
            E::CertificateNotValidAtSigningTime {
                kind: CertValidity::NotYetValid,
                ..
            }
        ),
        ("sct-invalid", _) => matches!(err, E::SctInvalid),
        _ => false,
    }
}

#[test]
fn every_manifest_fixture_gets_its_verdict_and_reason() {
    let trust = trust();
    let manifest = manifest();
    let fixtures = manifest["fixtures"].as_array().expect("fixtures");
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    let mut failures = Vec::new();
    for f in fixtures {
        let file = f["file"].as_str().unwrap();
        let kind = f["type"].as_str().unwrap();
        let expect = f["expect"].as_str().unwrap();
        let reason = f["reason"].as_str().unwrap();
        let artifact = read(f["artifact"].as_str().unwrap());
        let policy = &f["policy"];
        let result: Result<(), SigningError> = match kind {
            "keyless-bundle" => {
                let rule = IdentityRule::exact(
                    policy["issuer"].as_str().unwrap(),
                    policy["subject"].as_str().unwrap(),
                );
                verify_bundle(&artifact, &read(file), &trust, &[rule]).map(|_| ())
            }
            "key-bundle" => {
                let key = read(policy["publicKey"].as_str().unwrap());
                verify_key_bundle(&artifact, &read(file), &trust, &key).map(|_| ())
            }
            "detached-signature" => {
                let key = read(policy["publicKey"].as_str().unwrap());
                verify_detached(&artifact, &read(file), &key)
            }
            other => panic!("unknown fixture type {other}"),
        };
        let verdict = match (&result, expect) {
            (Ok(()), "accept") => Ok(()),
            (Err(e), "refuse") if reason_matches(reason, kind, file, e) => Ok(()),
            (r, _) => Err(format!("{file}: expected {expect} ({reason}), got {r:?}")),
        };
        println!(
            "{file:45} {kind:19} expect {expect:6} {reason:36} got {}",
            match &result {
                Ok(()) => "accept".to_owned(),
                Err(e) => format!("refuse: {e}"),
            }
        );
        if let Err(msg) = verdict {
            failures.push(msg);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn good_bundles_v03_and_v02_report_the_signer() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let rule = IdentityRule::exact(ISSUER, SUBJECT);
    let mut log_id = None;
    for file in ["artifact.sigstore.json", "artifact.v02.sigstore.json"] {
        let s = verify_bundle(&artifact, &read(file), &trust, std::slice::from_ref(&rule))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(s.issuer, ISSUER);
        assert_eq!(s.subject, SUBJECT);
        assert_eq!(s.integrated_time, 1_748_858_403, "2025-06-02T10:00:03Z");
        assert_eq!(s.log_index, 1337);
        assert_eq!(s.log_url, "https://rekor.cinfer.test");
        assert_eq!(
            hex::encode(s.artifact_sha256),
            "d39c76452537d4e2d2cdf57a4d4840282f3c71d13e43d5386dec3ffd26449709"
        );
        log_id.get_or_insert(s.log_id.clone());
        assert_eq!(
            s.log_id,
            "cb609c76527b0e04c2916239e8a3c76ed72fc8b8a3fcc988027a2c591fe3fc90"
        );
    }
}

#[test]
fn regex_identity_rules_are_anchored() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let bundle = read("artifact.sigstore.json");
    let ok = |rules: &[IdentityRule]| verify_bundle(&artifact, &bundle, &trust, rules);

    // A regex over the whole workflow reference matches.
    let rule = IdentityRule::new(
        Matcher::regex(r"https://token\.actions\.githubusercontent\.com").unwrap(),
        Matcher::regex(
            r"https://github\.com/cinfer/cinfer/\.github/workflows/[a-z]+\.yml@refs/heads/main",
        )
        .unwrap(),
    );
    let s = ok(&[rule]).expect("regex rule");
    assert_eq!(s.subject, SUBJECT);

    // Not anchored by the caller: a prefix of the subject must not match the longer subject,
    // nor a suffix, nor a substring.
    for pattern in [
        r"https://github\.com/cinfer/cinfer/\.github/workflows/release\.yml",
        r"release\.yml@refs/heads/main",
        r"cinfer/cinfer",
    ] {
        let rule = IdentityRule::new(Matcher::exact(ISSUER), Matcher::regex(pattern).unwrap());
        match ok(&[rule]) {
            Err(SigningError::IdentityNotAllowed { issuer, subject }) => {
                assert_eq!(issuer, ISSUER);
                assert_eq!(subject, SUBJECT);
            }
            other => panic!("{pattern}: {other:?}"),
        }
    }
    // Alternation inside the anchors stays anchored: `a|b` is `^(?:a|b)$`, not `^a|b$`.
    let rule = IdentityRule::new(
        Matcher::exact(ISSUER),
        Matcher::regex(r"nothing|refs/heads/main").unwrap(),
    );
    assert!(matches!(
        ok(&[rule]),
        Err(SigningError::IdentityNotAllowed { .. })
    ));

    // Issuer regex that does not match the whole issuer.
    let rule = IdentityRule::new(
        Matcher::regex(r"https://token").unwrap(),
        Matcher::exact(SUBJECT),
    );
    assert!(matches!(
        ok(&[rule]),
        Err(SigningError::IdentityNotAllowed { .. })
    ));

    // An invalid regex is refused when the rule is built.
    assert!(matches!(
        Matcher::regex("("),
        Err(SigningError::InvalidIdentityRule(_))
    ));

    // Any one of several rules suffices; none → refused.
    let other = IdentityRule::exact(ISSUER, "https://example.test/other");
    assert!(ok(&[other.clone(), IdentityRule::exact(ISSUER, SUBJECT)]).is_ok());
    assert!(matches!(
        ok(&[other]),
        Err(SigningError::IdentityNotAllowed { .. })
    ));
    assert!(matches!(
        ok(&[]),
        Err(SigningError::IdentityNotAllowed { .. })
    ));
}

#[test]
fn identity_refusal_names_the_identity_found() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let rule = IdentityRule::exact(ISSUER, SUBJECT);
    match verify_bundle(
        &artifact,
        &read("other-identity.sigstore.json"),
        &trust,
        std::slice::from_ref(&rule),
    ) {
        Err(SigningError::IdentityNotAllowed { issuer, subject }) => {
            assert_eq!(issuer, ISSUER);
            assert_eq!(
                subject,
                "https://github.com/attacker/cinfer/.github/workflows/release.yml@refs/heads/main"
            );
        }
        other => panic!("{other:?}"),
    }
    match verify_bundle(
        &artifact,
        &read("other-issuer.sigstore.json"),
        &trust,
        &[rule],
    ) {
        Err(SigningError::IdentityNotAllowed { issuer, subject }) => {
            assert_eq!(issuer, "https://gitlab.com");
            assert_eq!(subject, SUBJECT);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_and_unsigned_bundles() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    for junk in [&b""[..], b"{", b"[]", b"{\"mediaType\": 3}"] {
        assert!(
            matches!(
                verify_bundle(&artifact, junk, &trust, &rules),
                Err(SigningError::MalformedBundle(_))
            ),
            "{junk:?}"
        );
    }
    // No signature.
    let mut bundle: Value = serde_json::from_slice(&read("artifact.sigstore.json")).unwrap();
    bundle["messageSignature"]["signature"] = Value::String(String::new());
    let json = serde_json::to_vec(&bundle).unwrap();
    let r = verify_bundle(&artifact, &json, &trust, &rules);
    assert!(matches!(r, Err(SigningError::Unsigned)), "{r:?}");
    bundle.as_object_mut().unwrap().remove("messageSignature");
    let json = serde_json::to_vec(&bundle).unwrap();
    let r = verify_bundle(&artifact, &json, &trust, &rules);
    assert!(matches!(r, Err(SigningError::Unsigned)), "{r:?}");

    // A key-based bundle is not a keyless one, and vice versa.
    let r = verify_bundle(
        &artifact,
        &read("artifact.key.sigstore.json"),
        &trust,
        &rules,
    );
    assert!(matches!(r, Err(SigningError::MalformedBundle(_))), "{r:?}");
    let r = verify_key_bundle(
        &artifact,
        &read("artifact.sigstore.json"),
        &trust,
        &read("cosign.pub"),
    );
    assert!(matches!(r, Err(SigningError::MalformedBundle(_))), "{r:?}");

    // No tlog entry.
    let mut bundle: Value = serde_json::from_slice(&read("artifact.sigstore.json")).unwrap();
    bundle["verificationMaterial"]["tlogEntries"] = Value::Array(vec![]);
    let r = verify_bundle(
        &artifact,
        &serde_json::to_vec(&bundle).unwrap(),
        &trust,
        &rules,
    );
    assert!(
        matches!(
            r,
            Err(SigningError::TransparencyProofInvalid(
                TransparencyError::Malformed(_)
            ))
        ),
        "{r:?}"
    );
}

#[test]
fn wrong_artifact_and_other_artifact() {
    let trust = trust();
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    // wrong-artifact.sigstore.json is a valid bundle for other-artifact.bin.
    let s = verify_bundle(
        &read("other-artifact.bin"),
        &read("wrong-artifact.sigstore.json"),
        &trust,
        &rules,
    )
    .expect("valid for other-artifact.bin");
    assert_eq!(
        hex::encode(s.artifact_sha256),
        "738763eb4a32f0fc6a2abb4d5af383305aa4295d80a3338b997cf02b41f18840"
    );
    let r = verify_bundle(
        &read("other-artifact.bin"),
        &read("artifact.sigstore.json"),
        &trust,
        &rules,
    );
    assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
}

#[test]
fn key_based_paths() {
    let artifact = read("artifact.bin");
    let key = read("cosign.pub");
    verify_detached(&artifact, &read("artifact.bin.sig"), &key).expect("detached");
    // Signatures by other-key verify under other-key.pub.
    verify_detached(
        &artifact,
        &read("key-untrusted.sig"),
        &read("other-key.pub"),
    )
    .expect("other key");
    verify_key_bundle(
        &artifact,
        &read("key-untrusted.sigstore.json"),
        &trust(),
        &read("other-key.pub"),
    )
    .expect("other key bundle");
    let s = verify_key_bundle(
        &artifact,
        &read("artifact.key.sigstore.json"),
        &trust(),
        &key,
    )
    .expect("key bundle");
    assert!(s.issuer.is_empty());
    assert_eq!(s.subject.len(), 64);
    // Over other bytes.
    let r = verify_detached(b"something else", &read("artifact.bin.sig"), &key);
    assert!(matches!(r, Err(SigningError::KeySignatureInvalid)), "{r:?}");
    let r = verify_key_bundle(
        &read("other-artifact.bin"),
        &read("artifact.key.sigstore.json"),
        &trust(),
        &key,
    );
    assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
    // Malformed inputs.
    assert!(matches!(
        verify_detached(&artifact, b"", &key),
        Err(SigningError::Unsigned)
    ));
    assert!(matches!(
        verify_detached(&artifact, b"!!not base64!!", &key),
        Err(SigningError::MalformedSignature(_))
    ));
    assert!(matches!(
        verify_detached(&artifact, &read("artifact.bin.sig"), b"not a key"),
        Err(SigningError::MalformedKey(_))
    ));
    // A certificate is not a P-256 public key PEM.
    assert!(matches!(
        verify_detached(
            &artifact,
            &read("artifact.bin.sig"),
            &read("fulcio_root.pem")
        ),
        Err(SigningError::MalformedKey(_))
    ));
}

#[test]
fn trust_root_is_validated() {
    assert!(matches!(
        TrustRoot::from_json(b"{"),
        Err(SigningError::MalformedTrustRoot(_))
    ));
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["mediaType"] = Value::String("application/json".to_owned());
    assert!(matches!(
        TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()),
        Err(SigningError::MalformedTrustRoot(_))
    ));
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["tlogs"] = Value::Array(vec![]);
    assert!(matches!(
        TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()),
        Err(SigningError::MalformedTrustRoot(_))
    ));
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["certificateAuthorities"] = Value::Array(vec![]);
    assert!(matches!(
        TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()),
        Err(SigningError::MalformedTrustRoot(_))
    ));
}

#[test]
fn validity_windows_of_the_trust_root_apply_at_signing_time() {
    let artifact = read("artifact.bin");
    let bundle = read("artifact.sigstore.json");
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    // CA valid only until before the signing time → the chain has no trusted CA.
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["certificateAuthorities"][0]["validFor"]["end"] =
        Value::String("2025-06-01T00:00:00Z".to_owned());
    let trust = TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()).unwrap();
    let r = verify_bundle(&artifact, &bundle, &trust, &rules);
    assert!(matches!(r, Err(SigningError::UntrustedCa)), "{r:?}");
    // Rekor key valid only from after the signing time.
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["tlogs"][0]["publicKey"]["validFor"]["start"] =
        Value::String("2025-07-01T00:00:00Z".to_owned());
    let trust = TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()).unwrap();
    let r = verify_bundle(&artifact, &bundle, &trust, &rules);
    assert!(
        matches!(
            r,
            Err(SigningError::TransparencyProofInvalid(
                TransparencyError::LogNotValidAtSigningTime(_)
            ))
        ),
        "{r:?}"
    );
    // CT log key expired before the signing time → no trusted SCT.
    let mut root: Value = serde_json::from_slice(&read("trusted_root.json")).unwrap();
    root["ctlogs"][0]["publicKey"]["validFor"]["end"] =
        Value::String("2025-06-01T00:00:00Z".to_owned());
    let trust = TrustRoot::from_json(&serde_json::to_vec(&root).unwrap()).unwrap();
    let r = verify_bundle(&artifact, &bundle, &trust, &rules);
    assert!(matches!(r, Err(SigningError::SctInvalid)), "{r:?}");
}

#[test]
fn error_messages_do_not_carry_artifact_bytes() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let text = String::from_utf8_lossy(&artifact).into_owned();
    let needle = text.lines().next().unwrap();
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    for f in manifest()["fixtures"].as_array().unwrap() {
        let file = f["file"].as_str().unwrap();
        if !file.ends_with(".sigstore.json") || f["type"] != "keyless-bundle" {
            continue;
        }
        if let Err(e) = verify_bundle(&artifact, &read(file), &trust, &rules) {
            let msg = format!("{e} {e:?}");
            assert!(!msg.contains(needle), "{file}: {msg}");
        }
    }
}

/// Timing of one keyless verification (signature + identity + transparency), median of 200.
/// `cargo test --release -p cinfer-signing -- --ignored --nocapture timing`
#[test]
#[ignore = "timing, not a check"]
fn timing_keyless_bundle() {
    let trust = trust();
    let artifact = read("artifact.bin");
    let bundle = read("artifact.sigstore.json");
    let rules = [IdentityRule::exact(ISSUER, SUBJECT)];
    let mut times: Vec<std::time::Duration> = (0..200)
        .map(|_| {
            let t = std::time::Instant::now();
            verify_bundle(&artifact, &bundle, &trust, &rules).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "verify_bundle median {:?}, p90 {:?}",
        times[100], times[180]
    );
}

#[test]
fn trust_root_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TrustRoot>();
    assert_send_sync::<IdentityRule>();
    assert_send_sync::<SigningError>();
}

/// Real bundles from the public-good instance (`tests/sigstore/public-good/`, see its
/// README): public Rekor v1 is sharded, so `logIndex` (global) and `inclusionProof.logIndex`
/// (per shard) differ, and both reference clients accept these bundles offline.
mod public_good {
    use super::*;

    fn read(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/sigstore/public-good")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn trust() -> TrustRoot {
        TrustRoot::from_json(&read("trusted_root.json")).expect("public-good trusted_root.json")
    }

    const REKOR_LOG_ID: &str = "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d";
    const GHA: &str = "https://token.actions.githubusercontent.com";
    const RFC8785_RELEASE: &str =
        "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2";

    #[test]
    fn sharded_log_bundle_from_sigstore_python_verifies() {
        let trust = trust();
        let bundle = read("bundle_v3_github.whl.sigstore");
        // The shard-local index really differs from the global one in this bundle.
        let json: Value = serde_json::from_slice(&bundle).unwrap();
        let entry = &json["verificationMaterial"]["tlogEntries"][0];
        assert_eq!(entry["logIndex"], "79605083");
        assert_eq!(entry["inclusionProof"]["logIndex"], "75441652");

        let s = verify_bundle(
            &read("bundle_v3_github.whl"),
            &bundle,
            &trust,
            &[IdentityRule::exact(GHA, RFC8785_RELEASE)],
        )
        .unwrap_or_else(|e| panic!("public-good bundle refused: {e}"));
        assert_eq!(s.issuer, GHA);
        assert_eq!(s.subject, RFC8785_RELEASE);
        assert_eq!(s.log_index, 79_605_083, "the global index is reported");
        assert_eq!(s.integrated_time, 1_710_888_076);
        assert_eq!(s.log_id, REKOR_LOG_ID);
        assert_eq!(s.log_url, "https://rekor.sigstore.dev");
    }

    #[test]
    fn sharded_log_bundle_v02_from_sigstore_js_verifies() {
        let s = verify_bundle(
            &read("hello.txt"),
            &read("hello.txt.v02.sigstore.json"),
            &trust(),
            &[IdentityRule::exact(
                "https://github.com/login/oauth",
                "brian@dehamer.com",
            )],
        )
        .unwrap_or_else(|e| panic!("public-good bundle refused: {e}"));
        assert_eq!(s.issuer, "https://github.com/login/oauth");
        assert_eq!(s.subject, "brian@dehamer.com");
        assert_eq!(s.log_index, 6_757_503, "global index (shard-local 2594072)");
        assert_eq!(s.integrated_time, 1_667_957_590);
        assert_eq!(s.log_id, REKOR_LOG_ID);
    }

    #[test]
    fn sharded_log_bundle_v03_from_sigstore_conformance_verifies() {
        const BEACON: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
        let s = verify_bundle(
            &read("a.txt"),
            &read("a.txt.v03.sigstore.json"),
            &trust(),
            &[IdentityRule::exact(GHA, BEACON)],
        )
        .unwrap_or_else(|e| panic!("public-good bundle refused: {e}"));
        assert_eq!(s.subject, BEACON);
        assert_eq!(
            s.log_index, 79_571_823,
            "global index (shard-local 75408392)"
        );
        assert_eq!(s.integrated_time, 1_710_869_186);
        assert_eq!(s.log_id, REKOR_LOG_ID);
    }

    #[test]
    fn legacy_v03_media_type_is_accepted_and_unknown_ones_are_named() {
        const BEACON: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
        let with_media_type = |m: &str| {
            let mut json: Value = serde_json::from_slice(&read("a.txt.v03.sigstore.json")).unwrap();
            json["mediaType"] = Value::String(m.to_owned());
            serde_json::to_vec(&json).unwrap()
        };
        let verify = |bundle: &[u8]| {
            verify_bundle(
                &read("a.txt"),
                bundle,
                &trust(),
                &[IdentityRule::exact(GHA, BEACON)],
            )
        };
        // sigstore-js wrote v0.3 bundles under this media type; sigstore-python accepts them.
        verify(&with_media_type(
            "application/vnd.dev.sigstore.bundle+json;version=0.3",
        ))
        .unwrap_or_else(|e| panic!("legacy v0.3 media type refused: {e}"));
        match verify(&with_media_type(
            "application/vnd.dev.sigstore.bundle.v0.9+json",
        )) {
            Err(SigningError::MalformedBundle(m)) => {
                assert!(
                    m.contains("unknown bundle media type") && m.contains("v0.9"),
                    "{m}"
                )
            }
            other => panic!("expected an unknown media type refusal, got {other:?}"),
        }
    }

    #[test]
    fn public_good_bundle_refusals_keep_their_reasons() {
        let trust = trust();
        let artifact = read("bundle_v3_github.whl");
        let bundle = read("bundle_v3_github.whl.sigstore");
        let rules = [IdentityRule::exact(GHA, RFC8785_RELEASE)];

        // Another workflow of the same repository is another identity.
        let r = verify_bundle(
            &artifact,
            &bundle,
            &trust,
            &[IdentityRule::exact(
                GHA,
                "https://github.com/trailofbits/rfc8785.py/.github/workflows/ci.yml@refs/tags/v0.1.2",
            )],
        );
        match r {
            Err(SigningError::IdentityNotAllowed { issuer, subject }) => {
                assert_eq!(issuer, GHA);
                assert_eq!(subject, RFC8785_RELEASE);
            }
            other => panic!("{other:?}"),
        }

        // Other bytes.
        let r = verify_bundle(&read("a.txt"), &bundle, &trust, &rules);
        assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");

        // A shard-local index above the global one cannot come from a sharded log (the global
        // index is the shard's offset plus the local one): refused before the Merkle path.
        let mut json: Value = serde_json::from_slice(&bundle).unwrap();
        json["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["logIndex"] =
            Value::String("79605084".to_owned());
        let r = verify_bundle(
            &artifact,
            &serde_json::to_vec(&json).unwrap(),
            &trust,
            &rules,
        );
        assert!(
            matches!(
                r,
                Err(SigningError::TransparencyProofInvalid(
                    TransparencyError::LogIndexMismatch {
                        entry: 79_605_083,
                        proof: 79_605_084
                    }
                ))
            ),
            "{r:?}"
        );

        // Another shard-local index below the global one: the Merkle path does not lead to
        // the checkpoint's root.
        let mut json: Value = serde_json::from_slice(&bundle).unwrap();
        json["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["logIndex"] =
            Value::String("75441653".to_owned());
        let r = verify_bundle(
            &artifact,
            &serde_json::to_vec(&json).unwrap(),
            &trust,
            &rules,
        );
        assert!(
            matches!(
                r,
                Err(SigningError::TransparencyProofInvalid(
                    TransparencyError::InclusionProof
                ))
            ),
            "{r:?}"
        );

        // The global index is covered by the SET.
        let mut json: Value = serde_json::from_slice(&bundle).unwrap();
        json["verificationMaterial"]["tlogEntries"][0]["logIndex"] =
            Value::String("79605082".to_owned());
        let r = verify_bundle(
            &artifact,
            &serde_json::to_vec(&json).unwrap(),
            &trust,
            &rules,
        );
        assert!(
            matches!(
                r,
                Err(SigningError::TransparencyProofInvalid(
                    TransparencyError::SignedEntryTimestamp
                ))
            ),
            "{r:?}"
        );
    }
}

/// The trust root's CA is an intermediate under an outer root, both listed in the trust root
/// (`tests/sigstore/ca-chain/`, made by its `generate.py`): the same leaf, SCT and Rekor entry
/// as `artifact.sigstore.json`, only the CA certificates' validity differs. Every certificate of
/// the path must be valid at the signing time (2025-06-02T10:00:03Z), the trust root's too.
mod ca_chain {
    use super::*;
    use cinfer_signing::ChainCert;

    /// 2025-05-01T00:00:00Z, 2025-07-01T00:00:00Z.
    const MAY_1: i64 = 1_746_057_600;
    const JULY_1: i64 = 1_751_328_000;
    const SIGNING_TIME: i64 = 1_748_858_403;

    fn verify(trust_root: &str) -> Result<cinfer_signing::VerifiedSigner, SigningError> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/sigstore/ca-chain")
            .join(format!("trusted_root.{trust_root}.json"));
        let json = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let trust = TrustRoot::from_json(&json).expect(trust_root);
        verify_bundle(
            &read("artifact.bin"),
            &read("artifact.sigstore.json"),
            &trust,
            &[IdentityRule::exact(ISSUER, SUBJECT)],
        )
    }

    #[test]
    fn leaf_under_an_intermediate_valid_at_signing_time_is_accepted() {
        let s = verify("valid-intermediate").expect("valid intermediate and root");
        assert_eq!(s.subject, SUBJECT);
        assert_eq!(s.integrated_time, SIGNING_TIME);
    }

    #[test]
    fn leaf_under_an_intermediate_expired_at_signing_time_is_refused() {
        match verify("expired-intermediate") {
            Err(SigningError::CertificateNotValidAtSigningTime {
                certificate: ChainCert::Ca { subject },
                kind: CertValidity::Expired,
                signing_time: SIGNING_TIME,
                not_after: MAY_1,
                ..
            }) => assert_eq!(subject, "O=sigstore.mock,CN=sigstore"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leaf_under_an_intermediate_not_yet_valid_at_signing_time_is_refused() {
        match verify("not-yet-valid-intermediate") {
            Err(SigningError::CertificateNotValidAtSigningTime {
                certificate: ChainCert::Ca { subject },
                kind: CertValidity::NotYetValid,
                not_before: JULY_1,
                ..
            }) => assert_eq!(subject, "O=sigstore.mock,CN=sigstore"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn intermediate_under_a_root_expired_at_signing_time_is_refused() {
        // sigstore-python 4.5.1 accepts this one (it stops at the first trusted certificate);
        // the root is part of the path and is checked like the others here.
        match verify("expired-root") {
            Err(SigningError::CertificateNotValidAtSigningTime {
                certificate: ChainCert::Ca { subject },
                kind: CertValidity::Expired,
                not_after: MAY_1,
                ..
            }) => assert_eq!(subject, "O=sigstore.mock,CN=cinfer test outer root"),
            other => panic!("{other:?}"),
        }
    }
}

/// Every signature is verified before the signer's identity or key is looked at: an invalid
/// bundle by an identity or key the caller does not list is refused for what is wrong with it,
/// not reported as "another signer" (which callers skip).
mod invalid_before_identity {
    use super::*;
    use cinfer_signing::{key_fingerprint, verify_logged_key_bundle};

    /// `bundle` with its message signature replaced by another valid-looking one (the good
    /// bundle's, by another certificate key).
    fn with_foreign_signature(bundle: &str) -> Vec<u8> {
        let good: Value = serde_json::from_slice(&read("artifact.sigstore.json")).unwrap();
        let mut b: Value = serde_json::from_slice(&read(bundle)).unwrap();
        assert_ne!(
            b["messageSignature"]["signature"],
            good["messageSignature"]["signature"]
        );
        b["messageSignature"]["signature"] = good["messageSignature"]["signature"].clone();
        serde_json::to_vec(&b).unwrap()
    }

    #[test]
    fn invalid_keyless_bundle_by_an_unlisted_identity_is_refused_as_invalid() {
        let trust = trust();
        let artifact = read("artifact.bin");
        // Valid as is: refused only for its identity, which names the attacker.
        let r = verify_bundle(
            &artifact,
            &read("other-identity.sigstore.json"),
            &trust,
            &[IdentityRule::exact(ISSUER, SUBJECT)],
        );
        assert!(
            matches!(r, Err(SigningError::IdentityNotAllowed { .. })),
            "{r:?}"
        );
        // With a signature that does not verify under its certificate: refused as such,
        // whether rules are listed or none are.
        let bad = with_foreign_signature("other-identity.sigstore.json");
        for rules in [&[IdentityRule::exact(ISSUER, SUBJECT)][..], &[]] {
            let r = verify_bundle(&artifact, &bad, &trust, rules);
            assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
        }
        // The same for an unlisted issuer, and for a certificate that had expired at signing
        // time under a rule that does not list it.
        let bad = with_foreign_signature("other-issuer.sigstore.json");
        let r = verify_bundle(
            &artifact,
            &bad,
            &trust,
            &[IdentityRule::exact(ISSUER, SUBJECT)],
        );
        assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
        let r = verify_bundle(
            &artifact,
            &read("expired-cert.sigstore.json"),
            &trust,
            &[IdentityRule::exact(
                ISSUER,
                "https://example.test/someone-else",
            )],
        );
        assert!(
            matches!(
                r,
                Err(SigningError::CertificateNotValidAtSigningTime {
                    kind: CertValidity::Expired,
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn invalid_key_bundle_by_an_unlisted_key_is_refused_as_invalid() {
        let trust = trust();
        let policy_key = read("cosign.pub");
        // key-untrusted.sigstore.json is a valid bundle by other-key, over artifact.bin.
        let bundle = read("key-untrusted.sigstore.json");
        let r = verify_key_bundle(&read("artifact.bin"), &bundle, &trust, &policy_key);
        assert!(
            matches!(r, Err(SigningError::KeyNotTrusted { .. })),
            "{r:?}"
        );
        // Over other bytes it is invalid: that is the refusal, not "another key".
        let r = verify_key_bundle(&read("other-artifact.bin"), &bundle, &trust, &policy_key);
        assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
        // A signature the log did not record for it.
        let mut b: Value = serde_json::from_slice(&bundle).unwrap();
        let good: Value = serde_json::from_slice(&read("artifact.key.sigstore.json")).unwrap();
        b["messageSignature"]["signature"] = good["messageSignature"]["signature"].clone();
        let r = verify_key_bundle(
            &read("artifact.bin"),
            &serde_json::to_vec(&b).unwrap(),
            &trust,
            &policy_key,
        );
        assert!(
            matches!(
                r,
                Err(SigningError::TransparencyProofInvalid(
                    TransparencyError::BodyMismatch
                ))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn key_bundle_verifies_under_its_logged_key_without_a_policy_key() {
        let trust = trust();
        let s = verify_logged_key_bundle(
            &read("artifact.bin"),
            &read("key-untrusted.sigstore.json"),
            &trust,
        )
        .expect("valid bundle by other-key");
        assert_eq!(s.subject, key_fingerprint(&read("other-key.pub")).unwrap());
        assert!(s.issuer.is_empty());
        let r = verify_logged_key_bundle(
            &read("other-artifact.bin"),
            &read("key-untrusted.sigstore.json"),
            &trust,
        );
        assert!(matches!(r, Err(SigningError::SignatureMismatch)), "{r:?}");
        let r = verify_logged_key_bundle(
            &read("artifact.bin"),
            &read("artifact.sigstore.json"),
            &trust,
        );
        assert!(matches!(r, Err(SigningError::MalformedBundle(_))), "{r:?}");
    }
}
