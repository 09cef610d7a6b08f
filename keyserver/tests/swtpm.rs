//! The keyserver against evidence from a real software TPM: each test starts
//! its own `swtpm` (through `cinfer_tpm::swtpm`) and its own keyserver on
//! 127.0.0.1:0, measures test files into PCR 23 with `cinfer_tpm`, quotes with
//! the keyserver's nonce, and posts the evidence over HTTP. Refusals are
//! checked by their exact reason. The last test makes the quote with
//! tpm2-tools instead of `cinfer_tpm`.
//!
//! Skipped (with a printed reason) where swtpm or tpm2-tools are missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cinfer_attest::verify::ak_fingerprint;
use cinfer_attest::{
    EVIDENCE_VERSION, Event, EventKind, Evidence, EvidenceError, KeyRelease, ReferenceValues,
    ReleasedKeyKind, SignedRequestKey, binding, replay,
};
use cinfer_envelope::RequestPrivateKey;
use cinfer_keyserver::config::Config;
use cinfer_tpm::Tpm;
use cinfer_tpm::swtpm::{Swtpm, SwtpmError};
use common::{Harness, MODEL_KEY, error_of, fresh_nonce, get, post, unwrap_released};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const PCR: u8 = 23;

/// The test loader's files: binary, config, policy, trust root.
const LOADER: &[u8] = b"\x7fELF trusted-loader test binary v1";
const CONFIG: &[u8] = b"accelerator = \"cpu\"\nmeasured-pcr = 23\n";
const POLICY: &[u8] = b"[[program]]\nname = \"echo\"\nworld = \"request-reply\"\n";
const TRUST_ROOT: &[u8] = b"{\"mediaType\": \"application/vnd.dev.sigstore.trustedroot+json\"}";

/// A software TPM, or `None` (after printing why) where swtpm is missing.
fn swtpm() -> Option<Swtpm> {
    match Swtpm::start() {
        Ok(sw) => Some(sw),
        Err(SwtpmError::NotInstalled) => {
            println!("SKIPPED: swtpm is not installed (apt-get install swtpm swtpm-tools)");
            None
        }
        Err(e) => panic!("starting swtpm: {e}"),
    }
}

/// What the loader measures, in order, with `policy` as its policy file.
fn events_with_policy(policy: &[u8]) -> Vec<Event> {
    vec![
        Event::measure(PCR, EventKind::LoaderBinary, "trusted-loader", LOADER),
        Event::measure(PCR, EventKind::Config, "loader.toml", CONFIG),
        Event::measure(PCR, EventKind::Policy, "policy.toml", policy),
        Event::measure(PCR, EventKind::TrustRoot, "trusted_root.json", TRUST_ROOT),
    ]
}

fn good_events() -> Vec<Event> {
    events_with_policy(POLICY)
}

/// The boot PCRs the tests quote and pin beside the measured one.
const BOOT_PCRS: [u8; 2] = [0, 7];

/// Reference values pinning `ak`, the boot PCRs as `boot` and allowing exactly
/// the digests of `events`.
fn reference(ak: &[u8], boot: BTreeMap<u8, [u8; 32]>, events: &[Event]) -> ReferenceValues {
    let mut allowed: BTreeMap<EventKind, BTreeSet<[u8; 32]>> = BTreeMap::new();
    for e in events {
        allowed.entry(e.kind).or_default().insert(e.digest);
    }
    let refs = ReferenceValues {
        trusted_aks: vec![ak.to_vec()],
        measured_pcr: PCR,
        events: allowed,
        pcrs: boot,
        allow_resettable_pcrs_only: false,
    };
    refs.check().unwrap();
    refs
}

/// One test's world: a swtpm with a `Tpm` open on it that has measured the
/// good events, and a keyserver trusting that TPM's AK and those events.
struct Setup {
    tpm: Tpm,
    h: Harness,
    // Dropped last: the TPM client goes before the process.
    _sw: Swtpm,
}

async fn setup_with(edit: impl FnOnce(&mut Config)) -> Option<Setup> {
    let sw = swtpm()?;
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let events = good_events();
    tpm.measure(PCR, &events).unwrap();
    let boot = tpm.read_pcrs(&BOOT_PCRS).unwrap();
    let h = common::start_server(reference(tpm.ak_public(), boot, &events), edit).await;
    Some(Setup { tpm, h, _sw: sw })
}

async fn setup() -> Option<Setup> {
    setup_with(|_| {}).await
}

/// A fresh nonce, a fresh ephemeral key, and the TPM's quote over the boot
/// PCRs and PCR 23 bound to both, carrying `event_log`.
async fn quote(s: &mut Setup, event_log: &[Event]) -> (Evidence, RequestPrivateKey) {
    let nonce = fresh_nonce(s.h.addr).await;
    let loader_key = RequestPrivateKey::generate();
    let ev = s
        .tpm
        .quote(
            &[BOOT_PCRS[0], BOOT_PCRS[1], PCR],
            &nonce,
            &loader_key.public_key().to_bytes(),
            event_log,
        )
        .unwrap();
    (ev, loader_key)
}

/// A TPM evidence refusal as the keyserver words it: the kind, then the check.
fn tpm(e: EvidenceError) -> String {
    format!("tpm: {e}")
}

/// Posts `ev` and asserts it is refused (403) with exactly `reason`.
async fn assert_refused(h: &Harness, ev: &Evidence, reason: &str) {
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{text}");
    assert_eq!(error_of(&body), reason, "{text}");
    let audit = std::fs::read_to_string(h.root.join("audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "refused");
    assert_eq!(last["reason"], reason);
}

/// Posts `ev`, expects a release, and checks every released key unwraps with
/// `loader_key` and is what the keyserver holds or publishes.
async fn assert_released(h: &Harness, ev: &Evidence, loader_key: &RequestPrivateKey) {
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    assert_eq!(release.nonce, ev.nonce);
    assert_eq!(release.keys.len(), 3);

    let (model_id, model_key) = unwrap_released(&release, loader_key, ReleasedKeyKind::Model);
    assert_eq!(
        (model_id.as_str(), model_key.as_slice()),
        ("m1", &MODEL_KEY[..])
    );
    let (request_id, request_secret) =
        unwrap_released(&release, loader_key, ReleasedKeyKind::Request);
    let request_key = RequestPrivateKey::from_bytes(&request_secret).unwrap();
    assert_eq!(request_key.public_key().key_id(), request_id);

    // The released request key is the one the keyserver publishes, signed by
    // its identity key.
    let (status, body) = get(h.addr, "/v1/request-key").await;
    assert_eq!(status, 200);
    let signed: SignedRequestKey = serde_json::from_slice(&body).unwrap();
    let statement = signed.verify(&h.server.identity_public_key()).unwrap();
    assert_eq!(statement.key_id, request_id);
    assert_eq!(statement.public_key, request_key.public_key().to_bytes());

    // Audited with the TPM's AK and the replayed PCR value.
    let audit = std::fs::read_to_string(h.root.join("audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "released");
    assert_eq!(last["ak_fingerprint"], ak_fingerprint(&ev.ak_public));
    assert_eq!(
        last["measured_pcr_value"],
        hex::encode(replay(&ev.event_log, PCR))
    );
}

#[tokio::test]
async fn correctly_measured_loader_gets_its_keys() {
    let Some(mut s) = setup().await else { return };
    let (ev, loader_key) = quote(&mut s, &good_events()).await;
    assert_eq!(ev.ak_public, s.tpm.ak_public());
    assert_eq!(ev.pcrs[&PCR], replay(&good_events(), PCR));
    assert_released(&s.h, &ev, &loader_key).await;

    // Another ephemeral key cannot unwrap what was released to this one.
    let (ev, loader_key) = quote(&mut s, &good_events()).await;
    let (status, body) = post(s.h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200);
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    let k = &release.keys[0];
    let other = RequestPrivateKey::generate();
    assert!(
        cinfer_envelope::keywrap::unwrap_key(
            &other,
            &cinfer_attest::release_context(k.kind, &k.id),
            &release.nonce,
            &cinfer_envelope::keywrap::WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone(),
            },
        )
        .is_err()
    );
    drop(loader_key);
}

#[tokio::test]
async fn changed_policy_file_is_refused() {
    let Some(mut s) = setup().await else { return };
    // The loader now runs with an edited policy file: PCR 23 and the log both
    // say so, truthfully, and the keyserver does not allow that digest.
    let changed = events_with_policy(b"[[program]]\nname = \"anything\"\nworld = \"compute\"\n");
    s.tpm.measure(PCR, &changed).unwrap();
    let (ev, _) = quote(&mut s, &changed).await;
    let reason = tpm(EvidenceError::EventNotAllowed {
        kind: EventKind::Policy,
        digest: hex::encode(changed[2].digest),
    });
    assert!(reason.contains("policy event digest"), "{reason}");
    assert_refused(&s.h, &ev, &reason).await;

    // Claiming the old policy in the log does not help: the log no longer
    // replays to the quoted PCR.
    let (ev, _) = quote(&mut s, &good_events()).await;
    assert_refused(
        &s.h,
        &ev,
        &tpm(EvidenceError::EventLogReplayMismatch { pcr: PCR }),
    )
    .await;

    // Measured back to the reference files, it is released again.
    s.tpm.measure(PCR, &good_events()).unwrap();
    let (ev, loader_key) = quote(&mut s, &good_events()).await;
    assert_released(&s.h, &ev, &loader_key).await;
}

#[tokio::test]
async fn replayed_nonce_is_refused() {
    let Some(mut s) = setup().await else { return };
    let (ev, loader_key) = quote(&mut s, &good_events()).await;
    assert_released(&s.h, &ev, &loader_key).await;
    assert_refused(&s.h, &ev, "nonce already used").await;
}

#[tokio::test]
async fn expired_nonce_is_refused() {
    let Some(mut s) = setup_with(|c| c.nonce_ttl_secs = 30).await else {
        return;
    };
    let (ev, _) = quote(&mut s, &good_events()).await;
    s.h.clock.advance(31);
    assert_refused(&s.h, &ev, "nonce expired").await;

    // At the TTL exactly it is still good.
    let (ev, loader_key) = quote(&mut s, &good_events()).await;
    s.h.clock.advance(30);
    assert_released(&s.h, &ev, &loader_key).await;
}

#[tokio::test]
async fn tampered_quote_byte_is_refused() {
    let Some(mut s) = setup().await else { return };
    let (ev, _) = quote(&mut s, &good_events()).await;
    let mut bad = ev.clone();
    // TPMS_ATTEST: magic (4), type (2), qualifiedSigner TPM2B_NAME (2 + 34):
    // byte 20 is inside the signer's name digest, signed, and parses the same.
    bad.attest[20] ^= 0x01;
    assert_refused(&s.h, &bad, &tpm(EvidenceError::BadSignature)).await;

    // A flipped byte of the signature itself (inside s).
    let (ev, _) = quote(&mut s, &good_events()).await;
    let mut bad = ev.clone();
    let last = bad.signature.len() - 1;
    bad.signature[last] ^= 0x01;
    assert_refused(&s.h, &bad, &tpm(EvidenceError::BadSignature)).await;
}

#[tokio::test]
async fn quote_from_an_untrusted_ak_is_refused() {
    let Some(s) = setup().await else { return };
    // A second TPM measuring the very same files: fresh seeds, another AK.
    let Some(other_sw) = swtpm() else { return };
    let mut other = Tpm::open(&other_sw.tcti()).unwrap();
    assert_ne!(other.ak_public(), s.tpm.ak_public());
    other.measure(PCR, &good_events()).unwrap();

    let nonce = fresh_nonce(s.h.addr).await;
    let loader_key = RequestPrivateKey::generate();
    let ev = other
        .quote(
            &[PCR],
            &nonce,
            &loader_key.public_key().to_bytes(),
            &good_events(),
        )
        .unwrap();
    let reason = tpm(EvidenceError::UntrustedAk {
        fingerprint: ak_fingerprint(other.ak_public()),
    });
    assert!(reason.contains("is not trusted"), "{reason}");
    assert_refused(&s.h, &ev, &reason).await;

    // Presenting it under the trusted AK's name: the signature does not verify.
    let nonce = fresh_nonce(s.h.addr).await;
    let mut ev = other
        .quote(
            &[PCR],
            &nonce,
            &loader_key.public_key().to_bytes(),
            &good_events(),
        )
        .unwrap();
    ev.ak_public = s.tpm.ak_public().to_vec();
    assert_refused(&s.h, &ev, &tpm(EvidenceError::BadSignature)).await;
}

#[tokio::test]
async fn wrong_extra_data_binding_is_refused() {
    let Some(mut s) = setup().await else { return };
    // Quoted over binding(nonce, pk1); the evidence carries pk2 (a key whose
    // private half the attacker holds).
    let (ev, _) = quote(&mut s, &good_events()).await;
    let mut bad = ev.clone();
    bad.hpke_public_key = RequestPrivateKey::generate().public_key().to_bytes();
    assert_ne!(bad.hpke_public_key, ev.hpke_public_key);
    assert_refused(&s.h, &bad, &tpm(EvidenceError::BindingMismatch)).await;
}

#[tokio::test]
async fn event_log_that_does_not_replay_is_refused() {
    let Some(mut s) = setup().await else { return };
    let reason = tpm(EvidenceError::EventLogReplayMismatch { pcr: PCR });

    // Two events swapped after quoting.
    let (ev, _) = quote(&mut s, &good_events()).await;
    let mut bad = ev.clone();
    bad.event_log.swap(1, 2);
    assert_refused(&s.h, &bad, &reason).await;

    // One event dropped (the trust root: not a required kind).
    let (ev, _) = quote(&mut s, &good_events()).await;
    let mut bad = ev.clone();
    bad.event_log.pop();
    assert_refused(&s.h, &bad, &reason).await;
}

// ---- tpm2-tools cross-check --------------------------------------------------

/// The DER prefix of a SubjectPublicKeyInfo of an uncompressed P-256 point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Runs one tpm2-tools command against `tcti` in `dir`; panics with its
/// stderr if it fails.
fn tpm2(dir: &Path, tcti: &str, tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tpm2_quote_is_accepted() {
    if Command::new("tpm2_quote").arg("-v").output().is_err() {
        println!("SKIPPED: tpm2_quote not installed (apt-get install tpm2-tools)");
        return;
    }
    let Some(sw) = swtpm() else { return };
    let tcti = sw.tcti();
    // cinfer_tpm's AK, for comparison; the Tpm is dropped (its AK flushed)
    // before tpm2-tools connect: swtpm serves one client at a time.
    let (cinfer_ak, boot) = {
        let mut t = Tpm::open(&tcti).unwrap();
        (t.ak_public().to_vec(), t.read_pcrs(&BOOT_PCRS).unwrap())
    };

    let dir = common::temp_root();
    let d = dir.as_path();
    // The AK: an ECC P-256 restricted signing primary in the endorsement
    // hierarchy (the template cinfer_tpm uses).
    tpm2(
        d,
        &tcti,
        "tpm2_createprimary",
        &[
            "-C",
            "e",
            "-g",
            "sha256",
            "-G",
            "ecc256:ecdsa-sha256:null",
            "-a",
            "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
            "-c",
            "ak.ctx",
        ],
    );
    tpm2(
        d,
        &tcti,
        "tpm2_readpublic",
        &["-c", "ak.ctx", "-f", "der", "-o", "ak.der"],
    );
    let der = std::fs::read(d.join("ak.der")).unwrap();
    assert_eq!(der.len(), 91);
    assert_eq!(der[..26], P256_SPKI_PREFIX);
    let ak = der[26..].to_vec();
    assert_eq!(
        ak, cinfer_ak,
        "same template, same endorsement seed: the same AK"
    );

    let events = good_events();
    let h = common::start_server(reference(&ak, boot.clone(), &events), |_| {}).await;
    let nonce = fresh_nonce(h.addr).await;
    let loader_key = RequestPrivateKey::generate();
    let hpke = loader_key.public_key().to_bytes();

    tpm2(d, &tcti, "tpm2_pcrreset", &["23"]);
    for e in &events {
        let arg = format!("23:sha256={}", hex::encode(e.digest));
        tpm2(d, &tcti, "tpm2_pcrextend", &[&arg]);
    }
    let qualification = hex::encode(binding(&nonce, &hpke));
    tpm2(
        d,
        &tcti,
        "tpm2_quote",
        &[
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,7,23",
            "-q",
            &qualification,
            "-g",
            "sha256",
            "-m",
            "msg.bin",
            "-s",
            "sig.bin",
            "-o",
            "pcrs.bin",
            "--pcrs_format",
            "values",
        ],
    );
    tpm2(d, &tcti, "tpm2_flushcontext", &["-t"]);

    // The quoted values, in selection order: PCR 0, 7, 23.
    let values = std::fs::read(d.join("pcrs.bin")).unwrap();
    assert_eq!(values.len(), 3 * 32);
    let value = |i: usize| -> [u8; 32] { values[i * 32..(i + 1) * 32].try_into().unwrap() };
    let pcr23 = value(2);
    assert_eq!(pcr23, replay(&events, PCR));
    assert_eq!((value(0), value(1)), (boot[&0], boot[&7]));
    let ev = Evidence {
        version: EVIDENCE_VERSION,
        nonce: nonce.clone(),
        hpke_public_key: hpke,
        ak_public: ak,
        // TPMS_ATTEST as the TPM marshalled it, and the marshalled
        // TPMT_SIGNATURE (tpm2-tools' default "tss" signature format).
        attest: std::fs::read(d.join("msg.bin")).unwrap(),
        signature: std::fs::read(d.join("sig.bin")).unwrap(),
        pcrs: BTreeMap::from([(0, value(0)), (7, value(1)), (PCR, pcr23)]),
        event_log: events,
        endorsement: None,
        tdx: None,
    };
    let _ = std::fs::remove_dir_all(&dir);

    // The verifier alone, then the keyserver over HTTP.
    let verified =
        cinfer_attest::verify(&ev, &nonce, &reference(&ev.ak_public, boot, &ev.event_log)).unwrap();
    assert_eq!(verified.measured_value, pcr23);
    assert_eq!(verified.quoted_pcrs, BTreeSet::from([0, 7, PCR]));
    assert_released(&h, &ev, &loader_key).await;
}

// ---------------------------------------------------------------------------
// Endorsement: the AK trusted through the TPM's EK certificate and a
// credential, not a pin. Each test manufactures its swtpms with EK
// certificates from a local CA (`swtpm_localca`) in a temporary directory.

use cinfer_attest::{CREDENTIAL_PSK_ID, credential_binding, credential_psk, release_context};
use cinfer_keyserver::EndorsementPolicy;
use cinfer_keyserver::endorsement::{EndorsementError, make_credential, tpm_public::TpmPublic};
use cinfer_tpm::swtpm::LocalCa;

/// A local EK CA and a TPM it certified, or `None` where swtpm's tools are
/// missing.
fn endorsed_swtpm(ca: &LocalCa) -> Option<Swtpm> {
    match Swtpm::start_endorsed(ca) {
        Ok(sw) => Some(sw),
        Err(SwtpmError::NotInstalled) => {
            println!(
                "SKIPPED: swtpm_setup/swtpm_localca not installed (apt-get install swtpm-tools)"
            );
            None
        }
        Err(e) => panic!("starting an endorsed swtpm: {e}"),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An endorsed TPM (measured, endorsement read) and a keyserver that pins no
/// AK and requires endorsement by `trusted` (the TPM's own CA unless given).
struct Endorsed {
    tpm: Tpm,
    endorsement: cinfer_attest::Endorsement,
    h: Harness,
    ca: LocalCa,
    _sw: Swtpm,
}

async fn endorsed_setup(trusted: Option<&LocalCa>) -> Option<Endorsed> {
    let ca = LocalCa::new().ok()?;
    let sw = endorsed_swtpm(&ca)?;
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let endorsement = tpm.endorsement().unwrap();
    let events = good_events();
    tpm.measure(PCR, &events).unwrap();
    let boot = tpm.read_pcrs(&BOOT_PCRS).unwrap();
    let mut refs = reference(tpm.ak_public(), boot, &events);
    refs.trusted_aks.clear();
    let trusted = trusted.unwrap_or(&ca);
    let policy = EndorsementPolicy {
        ek_ca_certs: vec![trusted.root_cert()],
        ek_intermediate_certs: vec![trusted.intermediate_cert()],
        required: true,
    };
    let h = common::start_server(refs, |c| c.endorsement = policy).await;
    // The local CA's certificates are valid from now on.
    h.clock.advance(unix_now() - common::START);
    Some(Endorsed {
        tpm,
        endorsement,
        h,
        ca,
        _sw: sw,
    })
}

/// A fresh nonce and ephemeral key, and endorsed evidence for them.
async fn endorsed_quote(s: &mut Endorsed) -> (Evidence, RequestPrivateKey) {
    let nonce = fresh_nonce(s.h.addr).await;
    let loader_key = RequestPrivateKey::generate();
    let mut ev = s
        .tpm
        .quote(
            &[BOOT_PCRS[0], BOOT_PCRS[1], PCR],
            &nonce,
            &loader_key.public_key().to_bytes(),
            &good_events(),
        )
        .unwrap();
    ev.endorsement = Some(s.endorsement.clone());
    (ev, loader_key)
}

/// What the loader does with a release that carries a credential: activate
/// it in the TPM, check its binding to `nonce`, unwrap every key in PSK mode.
/// Returns the model key.
fn activate_and_unwrap(
    tpm: &mut Tpm,
    release: &KeyRelease,
    nonce: &[u8],
    loader_key: &RequestPrivateKey,
) -> Result<Vec<u8>, String> {
    let c = release.credential.as_ref().ok_or("no credential")?;
    let secret = tpm
        .activate_credential(&c.id_object, &c.encrypted_secret)
        .map_err(|e| e.to_string())?;
    if credential_binding(&secret, nonce).as_slice() != c.binding {
        return Err("credential not for this attestation".into());
    }
    let psk = credential_psk(&secret, nonce);
    let k = release
        .keys
        .iter()
        .find(|k| k.kind == ReleasedKeyKind::Model)
        .ok_or("no model key")?;
    cinfer_envelope::keywrap::unwrap_key_psk(
        loader_key,
        &release_context(k.kind, &k.id),
        nonce,
        &cinfer_envelope::keywrap::WrappedSecret {
            enc: k.enc.clone(),
            ciphertext: k.ciphertext.clone(),
        },
        psk.as_ref(),
        CREDENTIAL_PSK_ID,
    )
    .map(|s| s.to_vec())
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn endorsed_ak_gets_its_keys_through_the_credential() {
    let Some(mut s) = endorsed_setup(None).await else {
        return;
    };
    let (ev, loader_key) = endorsed_quote(&mut s).await;
    let (status, body) = post(s.h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    release.verify(&[s.h.server.identity_public_key()]).unwrap();
    assert!(release.credential.is_some());

    // Without the credential's secret the keys do not unwrap, even with the
    // ephemeral key: base mode fails.
    let k = &release.keys[0];
    assert!(
        cinfer_envelope::keywrap::unwrap_key(
            &loader_key,
            &release_context(k.kind, &k.id),
            &release.nonce,
            &cinfer_envelope::keywrap::WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone(),
            },
        )
        .is_err()
    );
    // The TPM activates it, and the keys unwrap.
    let model = activate_and_unwrap(&mut s.tpm, &release, &ev.nonce, &loader_key).unwrap();
    assert_eq!(model, MODEL_KEY);

    let audit = std::fs::read_to_string(s.h.root.join("audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "released");
    assert_eq!(last["ak_trust"], "endorsed");
    assert_eq!(
        last["ek_certificate_fingerprint"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            &s.endorsement.ek_certificate
        ))
    );

    // The same evidence again: its nonce is spent.
    assert_refused(&s.h, &ev, "nonce already used").await;

    // A later attestation with the first release's credential spliced in:
    // the TPM activates it (same EK, same AK), but its secret binds the
    // first nonce, and the keys of the second release were wrapped under
    // another secret.
    let (ev2, loader_key2) = endorsed_quote(&mut s).await;
    let (status, body) = post(s.h.addr, "/v1/attest", &ev2.to_json()).await;
    assert_eq!(status, 200);
    let mut release2: KeyRelease = serde_json::from_slice(&body).unwrap();
    assert_ne!(release2.credential, release.credential, "fresh per release");
    release2.credential = release.credential.clone();
    assert_eq!(
        activate_and_unwrap(&mut s.tpm, &release2, &ev2.nonce, &loader_key2),
        Err("credential not for this attestation".into())
    );
    // And a release signed as it is cannot be altered so: the signature
    // covers the credential.
    assert!(
        release2
            .verify(&[s.h.server.identity_public_key()])
            .is_err()
    );
}

#[tokio::test]
async fn endorsement_required_refuses_evidence_without_one() {
    let Some(mut s) = endorsed_setup(None).await else {
        return;
    };
    let (mut ev, _) = endorsed_quote(&mut s).await;
    ev.endorsement = None;
    let reason = format!("endorsement: {}", EndorsementError::Missing);
    assert_refused(&s.h, &ev, &reason).await;
}

#[tokio::test]
async fn ek_certificate_from_another_ca_is_refused() {
    // The keyserver trusts CA B; the TPM was certified by its own CA A.
    let Ok(other_ca) = LocalCa::new() else { return };
    // CA B's keys exist once it certified a TPM.
    let Some(_b) = endorsed_swtpm(&other_ca) else {
        return;
    };
    let Some(mut s) = endorsed_setup(Some(&other_ca)).await else {
        return;
    };
    let (ev, _) = endorsed_quote(&mut s).await;
    let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        &s.endorsement.ek_certificate,
    ));
    // swtpm_localca gives every CA the same names (CN=swtpm-localca under
    // CN=swtpm-localca-rootca), so the path is built by name and fails on
    // the signature: CA B's key did not sign this certificate.
    let reason = format!(
        "endorsement: {}",
        EndorsementError::UntrustedCertificate {
            fingerprint,
            reason: "InvalidSignatureForPublicKey".into(),
        }
    );
    assert_refused(&s.h, &ev, &reason).await;
    drop(s.ca);
}

#[tokio::test]
async fn ek_certificate_of_another_key_and_ak_area_of_another_key_are_refused() {
    let Some(mut s) = endorsed_setup(None).await else {
        return;
    };
    // A second TPM certified by the same CA.
    let Some(other_sw) = endorsed_swtpm(&s.ca) else {
        return;
    };
    // Its EK certificate is valid from the second it was made, which can be
    // after the keyserver's clock was set: bring the clock up to now (it
    // once read "CertNotValidYet", one second short, on a loaded machine).
    let at = cinfer_keyserver::Clock::now_unix(&s.h.clock);
    s.h.clock.advance(unix_now().saturating_sub(at));
    let mut other = Tpm::open(&other_sw.tcti()).unwrap();
    let other_endorsement = other.endorsement().unwrap();

    // This TPM's quote with the other TPM's (valid) EK certificate: the
    // certificate's key is not the EK presented.
    let (mut ev, _) = endorsed_quote(&mut s).await;
    ev.endorsement.as_mut().unwrap().ek_certificate = other_endorsement.ek_certificate.clone();
    let reason = format!("endorsement: {}", EndorsementError::EkMismatch);
    assert_refused(&s.h, &ev, &reason).await;

    // The other TPM's EK and certificate, consistent, for this TPM's AK: the
    // keyserver would make a credential only the other TPM can open, and
    // that TPM has no object with this AK's name loaded, so it refuses.
    let (mut ev, _) = endorsed_quote(&mut s).await;
    {
        let e = ev.endorsement.as_mut().unwrap();
        e.ek_certificate = other_endorsement.ek_certificate.clone();
        e.ek_public = other_endorsement.ek_public.clone();
    }
    let (status, body) = post(s.h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    let c = release.credential.as_ref().unwrap();
    assert!(matches!(
        other.activate_credential(&c.id_object, &c.encrypted_secret),
        Err(cinfer_tpm::TpmError::CredentialRefused { .. })
    ));
    // ...and this TPM cannot decrypt a seed made for the other EK.
    assert!(matches!(
        s.tpm.activate_credential(&c.id_object, &c.encrypted_secret),
        Err(cinfer_tpm::TpmError::CredentialRefused { .. })
    ));

    // The other TPM's AK area beside this TPM's quote: not the quoting key.
    let (mut ev, _) = endorsed_quote(&mut s).await;
    ev.endorsement.as_mut().unwrap().ak_public_area = other.ak_public_area().to_vec();
    let reason = format!("endorsement: {}", EndorsementError::AkMismatch);
    assert_refused(&s.h, &ev, &reason).await;

    // This TPM's AK area with adminWithPolicy set (the same point): a
    // public-only copy of such an area could be authorized to activate.
    let (mut ev, _) = endorsed_quote(&mut s).await;
    ev.endorsement.as_mut().unwrap().ak_public_area[7] |= 0x80;
    let reason = format!(
        "endorsement: {}",
        EndorsementError::AkAttributes(
            "adminWithPolicy (a public-only copy could be authorized to activate)"
        )
    );
    assert_refused(&s.h, &ev, &reason).await;
    // Without fixedTPM.
    let (mut ev, _) = endorsed_quote(&mut s).await;
    ev.endorsement.as_mut().unwrap().ak_public_area[7] &= !0x02;
    let reason = format!(
        "endorsement: {}",
        EndorsementError::AkAttributes("not fixedTPM")
    );
    assert_refused(&s.h, &ev, &reason).await;
}

#[tokio::test]
async fn rust_make_credential_activates_in_swtpm_like_tpm2_makecredential() {
    let Ok(ca) = LocalCa::new() else { return };
    let Some(sw) = endorsed_swtpm(&ca) else {
        return;
    };
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let e = tpm.endorsement().unwrap();
    let ek = TpmPublic::parse(&e.ek_public).unwrap();
    let ak = TpmPublic::parse(&e.ak_public_area).unwrap();
    let name = ak.name(&e.ak_public_area).unwrap();

    // Ours: the TPM recovers the secret.
    let secret = [0x42; 32];
    let made = make_credential(&ek, &name, &secret).unwrap();
    assert_eq!(made.encrypted_secret.len(), 256);
    let got = tpm
        .activate_credential(&made.id_object, &made.encrypted_secret)
        .unwrap();
    assert_eq!(got.as_slice(), secret);

    // Made for another AK name: the TPM refuses it (TPM_RC_INTEGRITY).
    let mut other_name = name.clone();
    other_name[33] ^= 1;
    let made = make_credential(&ek, &other_name, &secret).unwrap();
    assert!(matches!(
        tpm.activate_credential(&made.id_object, &made.encrypted_secret),
        Err(cinfer_tpm::TpmError::CredentialRefused { .. })
    ));

    // tpm2-tools' tpm2_makecredential for the same EK and name: the same
    // layout (sizes), and the TPM recovers the secret from it too.
    if Command::new("tpm2_makecredential")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIPPED (cross-check): tpm2_makecredential not installed");
        return;
    }
    let dir = tempfile_dir();
    let mut tpm2b_public = (e.ek_public.len() as u16).to_be_bytes().to_vec();
    tpm2b_public.extend_from_slice(&e.ek_public);
    std::fs::write(dir.join("ek.pub"), tpm2b_public).unwrap();
    std::fs::write(dir.join("secret.bin"), secret).unwrap();
    let out = Command::new("tpm2_makecredential")
        .current_dir(&dir)
        .args(["-T", "none", "-u", "ek.pub", "-s", "secret.bin"])
        .args(["-n", &hex::encode(&name), "-o", "cred.out"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = std::fs::read(dir.join("cred.out")).unwrap();
    let n = usize::from(u16::from_be_bytes([blob[8], blob[9]]));
    let (id_object, rest) = (&blob[10..10 + n], &blob[10 + n..]);
    let encrypted_secret = &rest[2..];
    let ours = make_credential(&ek, &name, &secret).unwrap();
    assert_eq!(id_object.len(), ours.id_object.len());
    assert_eq!(
        id_object[..2],
        ours.id_object[..2],
        "TPM2B_DIGEST size of the HMAC"
    );
    assert_eq!(encrypted_secret.len(), ours.encrypted_secret.len());
    let got = tpm
        .activate_credential(id_object, encrypted_secret)
        .unwrap();
    assert_eq!(got.as_slice(), secret);
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = common::temp_root();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `tests/fixtures/endorsement/` (the golden endorsement the
/// swtpm-free tests and the fuzz target use) from a fresh endorsed swtpm.
/// Run by hand: `cargo test --release -p cinfer-keyserver --test swtpm --
/// --ignored write_endorsement_fixtures`.
#[tokio::test]
#[ignore = "writes fixtures"]
async fn write_endorsement_fixtures() {
    let ca = LocalCa::new().unwrap();
    let sw = endorsed_swtpm(&ca).unwrap();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let e = tpm.endorsement().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/endorsement");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ca.root_cert(), dir.join("root.pem")).unwrap();
    std::fs::copy(ca.intermediate_cert(), dir.join("intermediate.pem")).unwrap();
    let golden = serde_json::json!({
        "time": unix_now(),
        "ak_public": hex::encode(tpm.ak_public()),
        "endorsement": e,
    });
    std::fs::write(
        dir.join("endorsement.json"),
        serde_json::to_vec_pretty(&golden).unwrap(),
    )
    .unwrap();
}

/// `[tdx]`: both kinds required. Evidence with the TPM quote and a TD quote
/// (test platform) bound to the same nonce and key, the TD's RTMR3 the
/// replay of the same event log, is released and audited with the TD's TCB
/// status and MRTD; the same TPM quote without a TD quote, with a TD quote
/// of another attestation, or from another TD firmware, is refused by kind
/// and check, and spends nothing.
#[tokio::test]
async fn with_tdx_required_keys_need_the_tpm_quote_and_a_td_quote() {
    let mut td = common::TestTd::new();
    let root = common::temp_root();
    let policy = td.policy(&root);
    let Some(mut s) = setup_with(|c| c.tdx = Some(policy)).await else {
        return;
    };
    let (mut first, first_key) = quote(&mut s, &good_events()).await;
    assert_refused(&s.h, &first, "tdx: the evidence has no TD quote").await;

    let (mut ev, _) = quote(&mut s, &good_events()).await;
    let (mut other, _) = quote(&mut s, &good_events()).await;
    td.add_quote(&mut other);
    ev.tdx = other.tdx.clone();
    assert_refused(
        &s.h,
        &ev,
        "tdx: the TD report data does not bind this attestation (nonce and key)",
    )
    .await;

    let (mut ev, _) = quote(&mut s, &good_events()).await;
    let mrtd = td.fields.mr_td;
    td.fields.mr_td = [0x11; 48];
    td.add_quote(&mut ev);
    td.fields.mr_td = mrtd;
    assert_refused(
        &s.h,
        &ev,
        &format!(
            "tdx: MRTD {} is not the reference {}",
            hex::encode([0x11; 48]),
            hex::encode(mrtd)
        ),
    )
    .await;

    // The refusals spent nothing: the first nonce still attests, now with
    // its TD quote.
    td.add_quote(&mut first);
    assert_released(&s.h, &first, &first_key).await;
    let audit = std::fs::read_to_string(s.h.root.join("audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["tdx_tcb_status"], "UpToDate");
    assert_eq!(last["tdx_mrtd"], hex::encode(common::TD_MRTD));
    let _ = std::fs::remove_dir_all(&root);
}
