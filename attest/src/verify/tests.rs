use super::*;
use crate::fixture::{Fixture, public_bytes, sign_attest, test_key};
use crate::{Event, EventKind, NONCE_LEN};

const NONCE: [u8; NONCE_LEN] = [0x5a; NONCE_LEN];

fn fixture() -> Fixture {
    Fixture::new(&NONCE, &public_bytes(&test_key(42)))
}

/// Verifies `evidence` against the default fixture's reference values.
fn check(evidence: &Evidence) -> Result<Verified, EvidenceError> {
    verify(evidence, &NONCE, &fixture().reference_values())
}

/// Evidence whose quote is changed by `edit` and then properly signed.
fn with_quote(edit: impl FnOnce(&mut Quote)) -> Evidence {
    let f = fixture();
    let mut quote = f.quote();
    edit(&mut quote);
    f.evidence_with_quote(&quote)
}

fn selection_problem(evidence: &Evidence, refs: &ReferenceValues) -> SelectionProblem {
    match verify(evidence, &NONCE, refs) {
        Err(EvidenceError::SelectionMismatch(p)) => p,
        other => panic!("expected a selection mismatch, got {other:?}"),
    }
}

#[test]
fn valid_evidence_verifies() {
    let f = fixture();
    let v = check(&f.evidence()).unwrap();
    assert_eq!(v.ak_fingerprint, ak_fingerprint(&public_bytes(&f.ak)));
    assert_eq!(v.measured_pcr, 23);
    assert_eq!(v.measured_value, crate::replay(&f.events, 23));
    assert_eq!(v.clock_info, f.clock_info);
    assert_eq!(v.quoted_pcrs, BTreeSet::from([0, 7, 23]));
}

#[test]
fn evidence_survives_its_json_wire_form() {
    let ev = fixture().evidence();
    let back = Evidence::from_json(&ev.to_json()).unwrap();
    check(&back).unwrap();
}

#[test]
fn trust_root_event_is_optional() {
    let mut f = fixture();
    let refs = f.reference_values();
    f.events.retain(|e| e.kind != EventKind::TrustRoot);
    verify(&f.evidence(), &NONCE, &refs).unwrap();
}

#[test]
fn short_signature_scalars_are_left_padded() {
    // About 1 in 256 real signatures has r or s below 2^248; the TPM then
    // sends fewer than 32 bytes. Find such a signature by varying the clock.
    let mut f = fixture();
    for clock in 0u64.. {
        f.clock_info.clock = clock;
        let ev = f.evidence();
        // sigAlg, hash, r size: a 31-byte r or s means a stripped scalar.
        let r_len = u16::from_be_bytes([ev.signature[4], ev.signature[5]]);
        if r_len < 32 || ev.signature.len() < 4 + 2 + 32 + 2 + 32 {
            check(&ev).unwrap();
            return;
        }
    }
}

#[test]
fn refuses_unsupported_version() {
    let mut ev = fixture().evidence();
    ev.version = 2;
    assert_eq!(check(&ev), Err(EvidenceError::UnsupportedVersion(2)));
}

#[test]
fn refuses_truncated_attest() {
    let mut ev = fixture().evidence();
    ev.attest.pop();
    assert_eq!(
        check(&ev),
        Err(EvidenceError::Malformed { what: "pcrDigest" })
    );
}

#[test]
fn refuses_trailing_bytes() {
    let mut ev = fixture().evidence();
    ev.attest.push(0);
    assert_eq!(
        check(&ev),
        Err(EvidenceError::Malformed {
            what: "trailing bytes after TPMS_ATTEST"
        })
    );
    let mut ev = fixture().evidence();
    ev.signature.push(0);
    assert_eq!(
        check(&ev),
        Err(EvidenceError::Malformed {
            what: "trailing bytes after TPMT_SIGNATURE"
        })
    );
}

#[test]
fn refuses_wrong_magic() {
    let mut ev = fixture().evidence();
    ev.attest[0] = 0xfe;
    assert_eq!(check(&ev), Err(EvidenceError::WrongMagic(0xfe54_4347)));
}

#[test]
fn refuses_other_attestation_types() {
    let mut ev = fixture().evidence();
    // TPM_ST_ATTEST_CERTIFY
    ev.attest[4..6].copy_from_slice(&0x8017u16.to_be_bytes());
    assert_eq!(check(&ev), Err(EvidenceError::NotAQuote(0x8017)));
}

#[test]
fn refuses_unsupported_signature_scheme() {
    let mut ev = fixture().evidence();
    ev.signature[0..2].copy_from_slice(&0x0014u16.to_be_bytes()); // RSASSA
    assert_eq!(
        check(&ev),
        Err(EvidenceError::UnsupportedSignature {
            sig_alg: 0x0014,
            hash: 0x000b
        })
    );
    let mut ev = fixture().evidence();
    ev.signature[2..4].copy_from_slice(&0x0004u16.to_be_bytes()); // SHA-1
    assert_eq!(
        check(&ev),
        Err(EvidenceError::UnsupportedSignature {
            sig_alg: 0x0018,
            hash: 0x0004
        })
    );
}

#[test]
fn refuses_bad_signature() {
    // A changed byte in the signed structure (the TPM clock).
    let mut ev = fixture().evidence();
    let clock_offset = 4 + 2 + 2 + 34 + 2 + 32;
    ev.attest[clock_offset] ^= 1;
    assert_eq!(check(&ev), Err(EvidenceError::BadSignature));
    // A changed signature byte.
    let mut ev = fixture().evidence();
    let last = ev.signature.len() - 1;
    ev.signature[last] ^= 1;
    assert_eq!(check(&ev), Err(EvidenceError::BadSignature));
    // r = 0 is not a valid scalar.
    let mut ev = fixture().evidence();
    ev.signature = EcdsaSignature {
        r: [0; 32],
        s: [1; 32],
    }
    .to_bytes();
    assert_eq!(check(&ev), Err(EvidenceError::BadSignature));
}

#[test]
fn refuses_untrusted_ak() {
    let mut f = fixture();
    let refs = f.reference_values();
    f.ak = test_key(8);
    let ev = f.evidence();
    let err = verify(&ev, &NONCE, &refs).unwrap_err();
    let fingerprint = ak_fingerprint(&ev.ak_public);
    assert_eq!(
        err,
        EvidenceError::UntrustedAk {
            fingerprint: fingerprint.clone()
        }
    );
    let message = err.to_string();
    assert!(message.contains(&fingerprint));
    assert!(!message.contains(&hex::encode(&ev.ak_public)));
}

#[test]
fn refuses_ak_swapped_after_signing() {
    // The signature was made by an untrusted key but the evidence names the
    // trusted AK: the signature check catches it.
    let f = fixture();
    let mut ev = f.evidence();
    ev.signature = sign_attest(&test_key(8), &ev.attest);
    assert_eq!(check(&ev), Err(EvidenceError::BadSignature));
}

#[test]
fn refuses_other_nonce() {
    let ev = fixture().evidence();
    let refs = fixture().reference_values();
    assert_eq!(
        verify(&ev, &[0x5b; NONCE_LEN], &refs),
        Err(EvidenceError::NonceMismatch)
    );
    assert_eq!(
        verify(&ev, &NONCE[..31], &refs),
        Err(EvidenceError::NonceMismatch)
    );
}

#[test]
fn refuses_invalid_hpke_key() {
    let mut ev = fixture().evidence();
    ev.hpke_public_key = vec![4; 65];
    assert_eq!(check(&ev), Err(EvidenceError::InvalidHpkeKey));
    let mut ev = fixture().evidence();
    ev.hpke_public_key.truncate(33);
    assert_eq!(check(&ev), Err(EvidenceError::InvalidHpkeKey));
}

#[test]
fn refuses_hpke_key_not_bound_by_quote() {
    // Someone relays a genuine quote but swaps in their own HPKE key.
    let mut ev = fixture().evidence();
    ev.hpke_public_key = public_bytes(&test_key(43));
    assert_eq!(check(&ev), Err(EvidenceError::BindingMismatch));
}

#[test]
fn refuses_quote_for_another_nonce() {
    // A genuine quote made for an older nonce, presented with the new one.
    let ev = with_quote(|q| {
        q.extra_data = crate::binding(&[0x11; NONCE_LEN], &public_bytes(&test_key(42))).to_vec();
    });
    assert_eq!(check(&ev), Err(EvidenceError::BindingMismatch));
}

#[test]
fn refuses_other_pcr_banks() {
    let ev = with_quote(|q| {
        q.pcr_selections.push(PcrSelection {
            hash_alg: 0x0004,
            bitmap: vec![0, 0, 0x80],
        });
    });
    assert_eq!(
        selection_problem(&ev, &fixture().reference_values()),
        SelectionProblem::NotSha256(0x0004)
    );
    let ev = with_quote(|q| q.pcr_selections.push(PcrSelection::sha256([])));
    assert_eq!(
        selection_problem(&ev, &fixture().reference_values()),
        SelectionProblem::BankCount
    );
}

#[test]
fn refuses_quote_without_measured_pcr() {
    let mut f = fixture();
    let mut refs = f.reference_values();
    refs.pcrs.clear();
    f.measured_pcr = 16; // events and the quote on PCR 16, refs expect 23
    for e in &mut f.events {
        e.pcr = 16;
    }
    assert_eq!(
        selection_problem(&f.evidence(), &refs),
        SelectionProblem::MeasuredPcrNotQuoted(23)
    );
}

#[test]
fn refuses_quote_without_reference_pcr() {
    let f = fixture();
    let mut refs = f.reference_values();
    refs.pcrs.insert(4, [0x40; 32]);
    assert_eq!(
        selection_problem(&f.evidence(), &refs),
        SelectionProblem::ReferencePcrNotQuoted(4)
    );
}

#[test]
fn refuses_pcr_values_for_unquoted_pcrs() {
    let mut ev = fixture().evidence();
    ev.pcrs.insert(9, [0x90; 32]);
    assert_eq!(
        selection_problem(&ev, &fixture().reference_values()),
        SelectionProblem::EvidencePcrsDiffer
    );
    let mut ev = fixture().evidence();
    ev.pcrs.remove(&7);
    assert_eq!(
        selection_problem(&ev, &fixture().reference_values()),
        SelectionProblem::EvidencePcrsDiffer
    );
}

#[test]
fn refuses_pcr_values_not_matching_the_digest() {
    let mut ev = fixture().evidence();
    ev.pcrs.insert(0, [0x11; 32]);
    assert_eq!(check(&ev), Err(EvidenceError::PcrDigestMismatch));
}

#[test]
fn refuses_events_on_other_pcrs() {
    let mut ev = fixture().evidence();
    ev.event_log
        .insert(1, Event::measure(16, EventKind::Config, "x", b"x"));
    assert_eq!(
        check(&ev),
        Err(EvidenceError::EventWrongPcr {
            index: 1,
            pcr: 16,
            measured: 23
        })
    );
}

#[test]
fn refuses_event_log_that_does_not_replay() {
    let mut ev = fixture().evidence();
    ev.event_log.remove(2);
    assert_eq!(
        check(&ev),
        Err(EvidenceError::EventLogReplayMismatch { pcr: 23 })
    );
    let mut ev = fixture().evidence();
    ev.event_log.swap(0, 1);
    assert_eq!(
        check(&ev),
        Err(EvidenceError::EventLogReplayMismatch { pcr: 23 })
    );
}

#[test]
fn refuses_events_not_allowed() {
    let mut f = fixture();
    let refs = f.reference_values();
    f.events[2] = Event::measure(23, EventKind::Policy, "dev.toml", b"a permissive policy");
    let digest = f.events[2].digest;
    assert_eq!(
        verify(&f.evidence(), &NONCE, &refs),
        Err(EvidenceError::EventNotAllowed {
            kind: EventKind::Policy,
            digest: hex::encode(digest)
        })
    );
    // An allowed digest logged under another kind is not allowed either.
    let mut f = fixture();
    f.events[1].kind = EventKind::TrustRoot;
    assert!(matches!(
        verify(&f.evidence(), &NONCE, &fixture().reference_values()),
        Err(EvidenceError::EventNotAllowed {
            kind: EventKind::TrustRoot,
            ..
        })
    ));
}

#[test]
fn refuses_log_without_required_event() {
    let mut f = fixture();
    let refs = f.reference_values();
    f.events.retain(|e| e.kind != EventKind::Config);
    assert_eq!(
        verify(&f.evidence(), &NONCE, &refs),
        Err(EvidenceError::MissingEvent {
            kind: EventKind::Config
        })
    );
    f.events.clear();
    assert_eq!(
        verify(&f.evidence(), &NONCE, &refs),
        Err(EvidenceError::MissingEvent {
            kind: EventKind::LoaderBinary
        })
    );
}

#[test]
fn refuses_other_pcr_values() {
    let f = fixture();
    let mut refs = f.reference_values();
    refs.pcrs.insert(7, [0x71; 32]);
    assert_eq!(
        verify(&f.evidence(), &NONCE, &refs),
        Err(EvidenceError::PcrValueMismatch { pcr: 7 })
    );
}

#[test]
fn quote_round_trips() {
    let q = fixture().quote();
    assert_eq!(Quote::parse(&q.to_bytes()).unwrap(), q);
    let sig = EcdsaSignature {
        r: [[0u8; 2].as_slice(), &[9; 30]].concat().try_into().unwrap(),
        s: [7; 32],
    };
    let bytes = sig.to_bytes();
    assert_eq!(u16::from_be_bytes([bytes[4], bytes[5]]), 30);
    assert_eq!(EcdsaSignature::parse(&bytes).unwrap(), sig);
}

#[test]
fn parser_limits() {
    let mut q = fixture().quote();
    q.pcr_digest = vec![0; 65];
    assert_eq!(
        Quote::parse(&q.to_bytes()),
        Err(EvidenceError::Malformed { what: "pcrDigest" })
    );
    let mut q = fixture().quote();
    q.pcr_selections[0].bitmap = vec![0xff; 5];
    assert_eq!(
        Quote::parse(&q.to_bytes()),
        Err(EvidenceError::Malformed {
            what: "pcrSelections.sizeofSelect too large"
        })
    );
    let mut bytes = fixture().quote().to_bytes();
    let safe_offset = 4 + 2 + 2 + 34 + 2 + 32 + 8 + 4 + 4;
    bytes[safe_offset] = 2;
    assert_eq!(
        Quote::parse(&bytes),
        Err(EvidenceError::Malformed {
            what: "clockInfo.safe is not a TPMI_YES_NO"
        })
    );
    let mut sig = sign_attest(&test_key(7), b"x");
    sig[4..6].copy_from_slice(&33u16.to_be_bytes());
    assert_eq!(
        EcdsaSignature::parse(&sig),
        Err(EvidenceError::Malformed { what: "signatureR" })
    );
}

/// xorshift64*: a reproducible stream of test bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn parsers_never_panic() {
    let f = fixture();
    let ev = f.evidence();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Every truncation.
    for n in 0..ev.attest.len() {
        assert!(Quote::parse(&ev.attest[..n]).is_err());
    }
    for n in 0..ev.signature.len() {
        assert!(EcdsaSignature::parse(&ev.signature[..n]).is_err());
    }
    // Random mutations of valid structures, and random bytes.
    for _ in 0..20_000 {
        for valid in [&ev.attest, &ev.signature] {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                bytes.truncate(rng.below(bytes.len() + 1));
            }
            let _ = Quote::parse(&bytes);
            let _ = EcdsaSignature::parse(&bytes);
        }
        let random: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
        let _ = Quote::parse(&random);
        let _ = EcdsaSignature::parse(&random);
    }
    // Whole-evidence mutations never verify and never panic.
    let refs = f.reference_values();
    for _ in 0..2_000 {
        let mut bad = ev.clone();
        let field = match rng.below(4) {
            0 => &mut bad.attest,
            1 => &mut bad.signature,
            2 => &mut bad.ak_public,
            _ => &mut bad.hpke_public_key,
        };
        let i = rng.below(field.len());
        field[i] ^= 1 + (rng.next() as u8 % 255);
        assert!(verify(&bad, &NONCE, &refs).is_err());
    }
}

#[test]
fn reference_values_from_toml() {
    let f = fixture();
    let refs = f.reference_values();
    let text = toml::to_string(&refs).unwrap();
    let parsed: ReferenceValues = toml::from_str(&text).unwrap();
    assert_eq!(parsed, refs);
    parsed.check().unwrap();

    let ak = hex::encode(public_bytes(&f.ak));
    let digest = hex::encode([1u8; 32]);
    let text = format!(
        "trusted-aks = [\"{ak}\"]\n[events]\nloader-binary = [\"{digest}\"]\nconfig = [\"{digest}\"]\npolicy = [\"{digest}\"]\n[pcrs]\n0 = \"{digest}\"\n"
    );
    let parsed: ReferenceValues = toml::from_str(&text).unwrap();
    assert_eq!(parsed.measured_pcr, 23, "default");
    assert_eq!(parsed.pcrs[&0], [1; 32]);
    parsed.check().unwrap();

    let unknown_kind = text.replace("policy =", "bios =");
    assert!(toml::from_str::<ReferenceValues>(&unknown_kind).is_err());
    let unknown_field = format!("{text}\n[extra]\n");
    assert!(toml::from_str::<ReferenceValues>(&unknown_field).is_err());
}

#[test]
fn reference_values_check() {
    let good = fixture().reference_values();
    good.check().unwrap();
    let mut r = good.clone();
    r.trusted_aks.clear();
    assert_eq!(r.check(), Err(ReferenceError::NoTrustedAk));
    let mut r = good.clone();
    r.trusted_aks.push(vec![4; 65]);
    assert_eq!(r.check(), Err(ReferenceError::BadAk(1)));
    let mut r = good.clone();
    r.measured_pcr = 24;
    assert_eq!(r.check(), Err(ReferenceError::MeasuredPcrOutOfRange(24)));
    let mut r = good.clone();
    r.events.remove(&EventKind::Policy);
    assert_eq!(
        r.check(),
        Err(ReferenceError::NoAllowedDigests(EventKind::Policy))
    );

    // Pinning only resettable PCRs (the measured one, 16) is refused, with or
    // without PCR 16 pinned, unless the development flag says otherwise.
    let mut r = good.clone();
    r.pcrs.clear();
    assert_eq!(r.check(), Err(ReferenceError::OnlyResettablePcrs));
    r.pcrs.insert(16, [0; 32]);
    assert_eq!(r.check(), Err(ReferenceError::OnlyResettablePcrs));
    assert!(
        ReferenceError::OnlyResettablePcrs
            .to_string()
            .contains("allow-resettable-pcrs-only")
    );
    r.allow_resettable_pcrs_only = true;
    r.check().unwrap();
    // One measured boot PCR (here 7 alone) is enough...
    let mut r = good.clone();
    r.pcrs.retain(|p, _| *p == 7);
    r.check().unwrap();
    // ...but not boot PCRs at their reset value (nothing was measured).
    let mut r = good.clone();
    r.pcrs = std::collections::BTreeMap::from([(0, [0; 32]), (7, [0; 32]), (17, [0xff; 32])]);
    assert_eq!(r.check(), Err(ReferenceError::OnlyResettablePcrs));
    r.pcrs.insert(17, [0x17; 32]);
    r.check().unwrap();
    // A pinned index past 23 is refused (no quote could ever select it).
    let mut r = good;
    r.pcrs.insert(24, [1; 32]);
    assert_eq!(r.check(), Err(ReferenceError::PcrOutOfRange(24)));

    // The flag round-trips through TOML and is left out when false.
    let mut r = fixture().reference_values();
    assert!(!toml::to_string(&r).unwrap().contains("allow-resettable"));
    r.pcrs.clear();
    r.allow_resettable_pcrs_only = true;
    let text = toml::to_string(&r).unwrap();
    assert!(text.contains("allow-resettable-pcrs-only = true"), "{text}");
    assert_eq!(toml::from_str::<ReferenceValues>(&text).unwrap(), r);
}
