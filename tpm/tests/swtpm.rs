//! cinfer-tpm against a real software TPM: one swtpm per test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns

use base64::Engine;
use cinfer_attest::{
    EVIDENCE_VERSION, Event, EventKind, Evidence, NONCE_LEN, binding, pcr_digest, replay,
};
use cinfer_tpm::{Tpm, TpmError, swtpm::Swtpm};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Instant;
use tss_esapi::{
    Context,
    constants::{CapabilityType, tss::TPM2_TRANSIENT_FIRST},
    interface_types::{
        algorithm::HashingAlgorithm, ecc::EccCurve, resource_handles::Hierarchy,
        session_handles::AuthSession,
    },
    structures::{CapabilityData, EccScheme},
    tcti_ldr::TctiNameConf,
};

const PCR: u8 = 23;

fn start() -> Swtpm {
    Swtpm::start().unwrap_or_else(|e| panic!("{e}"))
}

fn events(pcr: u8) -> Vec<Event> {
    vec![
        Event::measure(
            pcr,
            EventKind::LoaderBinary,
            "trusted-loader",
            b"loader bytes",
        ),
        Event::measure(pcr, EventKind::Config, "loader.toml", b"pcr = 23"),
        Event::measure(pcr, EventKind::Policy, "dev.toml", b"[[program]]"),
        Event::measure(pcr, EventKind::TrustRoot, "trusted_root.json", b"{}"),
    ]
}

/// The fields of a marshalled quote `TPMS_ATTEST` the tests look at.
#[derive(Debug)]
struct QuoteFields {
    extra_data: Vec<u8>,
    /// (hash algorithm, select bitmap) per bank.
    selection: Vec<(u16, Vec<u8>)>,
    pcr_digest: Vec<u8>,
}

/// Parses a `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` by hand (big-endian,
/// TPM2B = u16 size + bytes), insisting that it is consumed exactly.
fn parse_quote(b: &[u8]) -> QuoteFields {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> Vec<u8> {
            let (h, t) = self.0.split_at(n);
            self.0 = t;
            h.to_vec()
        }
        fn u16(&mut self) -> u16 {
            u16::from_be_bytes(self.take(2).try_into().unwrap())
        }
        fn u32(&mut self) -> u32 {
            u32::from_be_bytes(self.take(4).try_into().unwrap())
        }
        fn tpm2b(&mut self) -> Vec<u8> {
            let n = self.u16() as usize;
            self.take(n)
        }
    }
    let mut r = R(b);
    assert_eq!(r.u32(), 0xff54_4347, "magic TPM_GENERATED_VALUE");
    assert_eq!(r.u16(), 0x8018, "type TPM_ST_ATTEST_QUOTE");
    let _qualified_signer = r.tpm2b();
    let extra_data = r.tpm2b();
    let _clock_info = r.take(8 + 4 + 4 + 1);
    let _firmware_version = r.take(8);
    let count = r.u32();
    let selection = (0..count)
        .map(|_| {
            let alg = r.u16();
            let size = r.take(1)[0] as usize;
            (alg, r.take(size))
        })
        .collect();
    let pcr_digest = r.tpm2b();
    assert!(r.0.is_empty(), "trailing bytes after TPMS_ATTEST");
    QuoteFields {
        extra_data,
        selection,
        pcr_digest,
    }
}

/// Transient object handles currently loaded in the TPM.
fn transient_handles(tcti: &str) -> Vec<u32> {
    let mut ctx = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        .unwrap();
    let CapabilityData::Handles(list) = data else {
        panic!("not a handle list: {data:?}")
    };
    list.into_inner().into_iter().map(u32::from).collect()
}

fn sample_evidence(tpm: &mut Tpm, pcrs: &[u8]) -> Evidence {
    let log = events(PCR);
    tpm.measure(PCR, &log).unwrap();
    tpm.quote(pcrs, &[7; NONCE_LEN], &[4; 65], &log).unwrap()
}

#[test]
fn measure_and_quote_give_consistent_evidence() {
    let sw = start();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let nonce = [0x5a; NONCE_LEN];
    let hpke = [0x04; 65];
    let log = events(PCR);
    tpm.measure(PCR, &log).unwrap();
    let ev = tpm.quote(&[PCR, 0, 16], &nonce, &hpke, &log).unwrap();

    assert_eq!(ev.version, EVIDENCE_VERSION);
    assert_eq!(ev.nonce, nonce);
    assert_eq!(ev.hpke_public_key, hpke);
    assert_eq!(ev.ak_public, tpm.ak_public());
    assert_eq!(ev.ak_public.len(), 65);
    assert_eq!(ev.ak_public[0], 0x04);
    assert_eq!(ev.event_log, log);
    assert_eq!(ev.pcrs.keys().copied().collect::<Vec<_>>(), [0, 16, 23]);
    assert_eq!(ev.pcrs[&PCR], replay(&ev.event_log, PCR));
    assert_ne!(ev.pcrs[&PCR], [0; 32]);

    let q = parse_quote(&ev.attest);
    assert_eq!(q.extra_data, binding(&nonce, &hpke));
    assert_eq!(q.pcr_digest, pcr_digest(&ev.pcrs));
    // SHA-256 bank (0x000b), PCRs 0, 16 and 23.
    assert_eq!(q.selection, [(0x000b, vec![0x01, 0x00, 0x81])]);
    // TPMT_SIGNATURE: ECDSA (0x0018), SHA-256 (0x000b), r and s of 32 bytes.
    assert_eq!(&ev.signature[..4], &[0x00, 0x18, 0x00, 0x0b]);
    assert_eq!(ev.signature.len(), 4 + 2 + 32 + 2 + 32);

    assert_eq!(Evidence::from_json(&ev.to_json()).unwrap(), ev);
}

#[test]
fn ak_is_deterministic_per_tpm() {
    let sw = start();
    let first = Tpm::open(&sw.tcti()).unwrap().ak_public().to_vec();
    let second = Tpm::open(&sw.tcti()).unwrap().ak_public().to_vec();
    assert_eq!(first, second, "same TPM, same AK");
    let other = start();
    let third = Tpm::open(&other.tcti()).unwrap().ak_public().to_vec();
    assert_ne!(first, third, "another TPM (other seeds), another AK");
}

#[test]
fn measuring_again_resets_the_pcr() {
    let sw = start();
    let log = events(PCR);
    let first = {
        let mut tpm = Tpm::open(&sw.tcti()).unwrap();
        tpm.measure(PCR, &log).unwrap();
        tpm.read_pcrs(&[PCR]).unwrap()[&PCR]
    };
    // A restarted loader: new process, same inputs.
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    tpm.measure(PCR, &log).unwrap();
    let second = tpm.read_pcrs(&[PCR]).unwrap()[&PCR];
    assert_eq!(first, second);
    assert_eq!(first, replay(&log, PCR));
    // Other inputs, other value; an empty log leaves the reset value.
    tpm.measure(PCR, &log[1..]).unwrap();
    assert_ne!(tpm.read_pcrs(&[PCR]).unwrap()[&PCR], first);
    tpm.measure(PCR, &[]).unwrap();
    assert_eq!(tpm.read_pcrs(&[PCR]).unwrap()[&PCR], [0; 32]);
    // PCR 16 is resettable too.
    tpm.measure(16, &events(16)).unwrap();
    tpm.measure(16, &events(16)).unwrap();
}

#[test]
fn refuses_what_it_cannot_measure_or_quote() {
    let sw = start();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    // PCR 10 is not resettable: accepted while it reads zeros, then refused.
    tpm.measure(10, &events(10)).unwrap();
    let err = tpm.measure(10, &events(10)).unwrap_err();
    assert!(
        matches!(err, TpmError::PcrNotResettable { pcr: 10, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("PCR 10"), "{err}");

    let mut mixed = events(PCR);
    mixed[2].pcr = 16;
    let err = tpm.measure(PCR, &mixed).unwrap_err();
    assert!(
        matches!(
            err,
            TpmError::EventForOtherPcr {
                pcr: 23,
                index: 2,
                event_pcr: 16,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        tpm.measure(24, &[]).unwrap_err(),
        TpmError::PcrOutOfRange { pcr: 24 }
    ));
    assert!(matches!(
        tpm.quote(&[], &[0; 32], &[4; 65], &[]).unwrap_err(),
        TpmError::NoPcrSelected
    ));
    assert!(matches!(
        tpm.quote(&[23, 30], &[0; 32], &[4; 65], &[]).unwrap_err(),
        TpmError::PcrOutOfRange { pcr: 30 }
    ));
}

#[test]
fn bad_tcti_and_unreachable_tpm_are_typed_errors() {
    let err = Tpm::open("carrier-pigeon:coop=3").unwrap_err();
    assert!(matches!(err, TpmError::TctiConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("carrier-pigeon:coop=3"), "{err}");

    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let err = Tpm::open(&tcti).unwrap_err();
    assert!(matches!(err, TpmError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&tcti), "{err}");
}

#[test]
fn no_transient_object_outlives_tpm() {
    let sw = start();
    let tcti = sw.tcti();
    // A "crashed" earlier process: a primary key left loaded (closing the ESYS
    // handle without flushing it, as a killed process would).
    {
        let mut ctx = Context::new(TctiNameConf::from_str(&tcti).unwrap()).unwrap();
        let template = tss_esapi::utils::create_unrestricted_signing_ecc_public(
            EccScheme::EcDsa(tss_esapi::structures::HashScheme::new(
                HashingAlgorithm::Sha256,
            )),
            EccCurve::NistP256,
        )
        .unwrap();
        let mut key = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .unwrap()
            .key_handle
            .into();
        // tss-esapi reports InvalidHandleState (it expected a flush) after
        // closing the ESYS handle and forgetting it: what we want here.
        let _ = ctx.tr_close(&mut key);
    }
    assert_eq!(transient_handles(&tcti).len(), 1, "the leftover is loaded");
    {
        let mut tpm = Tpm::open(&tcti).unwrap();
        // Still works, and again after a second measure/quote.
        sample_evidence(&mut tpm, &[PCR]);
        sample_evidence(&mut tpm, &[PCR]);
    }
    assert_eq!(transient_handles(&tcti), Vec::<u32>::new());
    // Many opens in a row do not exhaust the TPM's object slots.
    for _ in 0..5 {
        Tpm::open(&tcti).unwrap();
    }
    assert_eq!(transient_handles(&tcti), Vec::<u32>::new());
}

/// SubjectPublicKeyInfo PEM of an uncompressed P-256 point.
fn p256_spki_pem(point: &[u8]) -> String {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes) }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    assert_eq!(point.len(), 65);
    let der = [&PREFIX[..], point].concat();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

fn checkquote(dir: &Path, ev: &Evidence, message: &[u8], qualification: &[u8]) -> bool {
    std::fs::write(dir.join("ak.pem"), p256_spki_pem(&ev.ak_public)).unwrap();
    std::fs::write(dir.join("attest.bin"), message).unwrap();
    std::fs::write(dir.join("sig.bin"), &ev.signature).unwrap();
    let values: Vec<u8> = ev.pcrs.values().flatten().copied().collect();
    std::fs::write(dir.join("pcrs.bin"), values).unwrap();
    let list = ev
        .pcrs
        .keys()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("tpm2_checkquote")
        .current_dir(dir)
        .args(["-u", "ak.pem", "-m", "attest.bin", "-s", "sig.bin"])
        .args([
            "-f",
            "pcrs.bin",
            "-l",
            &format!("sha256:{list}"),
            "-g",
            "sha256",
        ])
        .args(["-q", &hex::encode(qualification)])
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "tpm2_checkquote refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

#[test]
fn tpm2_checkquote_accepts_the_quote() {
    if Command::new("tpm2_checkquote").arg("-v").output().is_err() {
        println!("SKIPPED: tpm2_checkquote not installed (apt-get install tpm2-tools)");
        return;
    }
    let sw = start();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let ev = sample_evidence(&mut tpm, &[0, 16, PCR]);
    let qualification = binding(&ev.nonce, &ev.hpke_public_key);
    let dir = tempfile::tempdir().unwrap();

    assert!(checkquote(dir.path(), &ev, &ev.attest, &qualification));

    // A flipped byte in the signed message.
    let mut flipped = ev.attest.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(!checkquote(dir.path(), &ev, &flipped, &qualification));
    // Another nonce.
    let other = binding(&[0; NONCE_LEN], &ev.hpke_public_key);
    assert!(!checkquote(dir.path(), &ev, &ev.attest, &other));
    // Other PCR values.
    let mut lying = ev.clone();
    lying.pcrs.insert(PCR, [0; 32]);
    assert!(!checkquote(dir.path(), &lying, &ev.attest, &qualification));
}

/// Prints how long open, measure and quote take (run with `--nocapture`).
#[test]
fn timings() {
    let sw = start();
    let log = events(PCR);
    for round in 0..5 {
        let t = Instant::now();
        let mut tpm = Tpm::open(&sw.tcti()).unwrap();
        let open = t.elapsed();
        let t = Instant::now();
        tpm.measure(PCR, &log).unwrap();
        let measure = t.elapsed();
        let t = Instant::now();
        tpm.quote(&[PCR], &[1; NONCE_LEN], &[4; 65], &log).unwrap();
        let quote = t.elapsed();
        let t = Instant::now();
        drop(tpm);
        let close = t.elapsed();
        println!(
            "round {round}: open {open:?}, measure ({} events) {measure:?}, quote {quote:?}, drop {close:?}",
            log.len()
        );
    }
}

/// `tpm2_makecredential -T none` (tpm2-tools, no TPM) for the EK public area
/// `ek_public` and object `name`; returns (id_object, encrypted_secret), the
/// TPM2B contents, parsed from tpm2-tools' file format (magic `0xBADCC0DE`,
/// version 1, `TPM2B_ID_OBJECT`, `TPM2B_ENCRYPTED_SECRET`).
fn tpm2_makecredential(
    dir: &Path,
    ek_public: &[u8],
    name: &[u8],
    secret: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let mut tpm2b_public = (ek_public.len() as u16).to_be_bytes().to_vec();
    tpm2b_public.extend_from_slice(ek_public);
    std::fs::write(dir.join("ek.pub"), tpm2b_public).unwrap();
    std::fs::write(dir.join("secret.bin"), secret).unwrap();
    let out = Command::new("tpm2_makecredential")
        .current_dir(dir)
        .args(["-T", "none", "-u", "ek.pub", "-s", "secret.bin"])
        .args(["-n", &hex::encode(name), "-o", "cred.out"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = std::fs::read(dir.join("cred.out")).unwrap();
    assert_eq!(blob[..8], [0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let n = usize::from(u16::from_be_bytes([blob[8], blob[9]]));
    let id_object = blob[10..10 + n].to_vec();
    let rest = &blob[10 + n..];
    let m = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    assert_eq!(rest.len(), 2 + m, "trailing bytes in cred.out");
    (id_object, rest[2..].to_vec())
}

/// `0x000b || SHA-256(area)`: a SHA-256 object's name.
fn name_of(area: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    [&[0x00, 0x0b][..], &sha2::Sha256::digest(area)[..]].concat()
}

#[test]
fn endorsed_tpm_gives_its_ek_certificate_and_activates_credentials() {
    if Command::new("tpm2_makecredential")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIPPED: tpm2_makecredential not installed (apt-get install tpm2-tools)");
        return;
    }
    let ca = cinfer_tpm::swtpm::LocalCa::new().unwrap();
    let sw = Swtpm::start_endorsed(&ca).unwrap_or_else(|e| panic!("{e}"));
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let e = tpm.endorsement().unwrap();
    // A DER certificate (SEQUENCE), and the CA's files exist now.
    assert_eq!(e.ek_certificate[0], 0x30);
    assert!(ca.root_cert().is_file() && ca.intermediate_cert().is_file());
    assert_eq!(e.ak_public_area, tpm.ak_public_area());
    // RSA (0x0001) EK with name algorithm SHA-256 (0x000b).
    assert_eq!(e.ek_public[..4], [0, 1, 0, 0x0b]);
    // Asking again gives the same EK (kept loaded, not created twice).
    assert_eq!(tpm.endorsement().unwrap(), e);

    let dir = tempfile::tempdir().unwrap();
    let secret = [0x5c; 32];
    let (id_object, encrypted_secret) = tpm2_makecredential(
        dir.path(),
        &e.ek_public,
        &name_of(&e.ak_public_area),
        &secret,
    );
    let got = tpm
        .activate_credential(&id_object, &encrypted_secret)
        .unwrap();
    assert_eq!(got.as_slice(), secret);

    // A credential for another object's name: the TPM refuses it.
    let mut other = e.ak_public_area.clone();
    *other.last_mut().unwrap() ^= 1;
    let (id_object, encrypted_secret) =
        tpm2_makecredential(dir.path(), &e.ek_public, &name_of(&other), &secret);
    assert!(matches!(
        tpm.activate_credential(&id_object, &encrypted_secret),
        Err(TpmError::CredentialRefused { .. })
    ));
    // Dropped, it leaves no object (AK, EK) and no policy session loaded.
    drop(tpm);
    assert_eq!(transient_handles(&sw.tcti()), Vec::<u32>::new());
    assert_eq!(loaded_sessions(&sw.tcti()), Vec::<u32>::new());
}

/// Session handles (HMAC and policy) loaded in the TPM.
fn loaded_sessions(tcti: &str) -> Vec<u32> {
    let mut ctx = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, 0x0200_0000, 64)
        .unwrap();
    let CapabilityData::Handles(list) = data else {
        panic!("not a handle list: {data:?}")
    };
    list.into_inner().into_iter().map(u32::from).collect()
}

#[test]
fn tpm_without_ek_certificate_says_so() {
    let sw = start();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    assert!(matches!(
        tpm.endorsement(),
        Err(TpmError::NoEkCertificate {
            nv_index: 0x01c0_0002,
            ..
        })
    ));
}

/// A copy of the AK's public area loaded public-only (`TPM2_LoadExternal`
/// accepts `fixedTPM | restricted` there) has the AK's name, so a credential
/// made for that name would activate against it if its ADMIN role could be
/// authorized: without `adminWithPolicy` that needs the authValue, which a
/// public-only object does not have (`TPM_RC_AUTH_UNAVAILABLE`). The
/// keyserver therefore refuses AK areas with `adminWithPolicy` set; this
/// checks the TPM half of that argument on swtpm, with tpm2-tools.
#[test]
fn a_public_only_copy_of_the_ak_cannot_activate_its_credential() {
    if Command::new("tpm2_activatecredential")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIPPED: tpm2-tools not installed (apt-get install tpm2-tools)");
        return;
    }
    let ca = cinfer_tpm::swtpm::LocalCa::new().unwrap();
    let sw = Swtpm::start_endorsed(&ca).unwrap_or_else(|e| panic!("{e}"));
    let e = Tpm::open(&sw.tcti()).unwrap().endorsement().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (id_object, encrypted_secret) =
        tpm2_makecredential(d, &e.ek_public, &name_of(&e.ak_public_area), &[0x33; 32]);
    // tpm2-tools' credential file: magic, version, the two TPM2B.
    let mut cred = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
    for part in [&id_object, &encrypted_secret] {
        cred.extend_from_slice(&(part.len() as u16).to_be_bytes());
        cred.extend_from_slice(part);
    }
    std::fs::write(d.join("cred.out"), cred).unwrap();
    let mut ak = (e.ak_public_area.len() as u16).to_be_bytes().to_vec();
    ak.extend_from_slice(&e.ak_public_area);
    std::fs::write(d.join("ak.pub"), ak).unwrap();
    let run = |cmd: &str| {
        Command::new("bash")
            .args(["-c", cmd])
            .current_dir(d)
            .env("TPM2TOOLS_TCTI", sw.tcti())
            .output()
            .unwrap()
    };
    // Loaded public-only, it gets the AK's name.
    let out = run("tpm2_loadexternal -C e -u ak.pub -c ak.ctx");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&hex::encode(name_of(&e.ak_public_area))),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The contexts are saved in files; swtpm has no resource manager, so
    // flush what the tools left loaded before they load them again.
    let out = run(
        "tpm2_createek -c ek.ctx -G rsa -u ek.pub && tpm2_flushcontext -t && \
         tpm2_startauthsession --policy-session -S s.ctx && tpm2_policysecret -S s.ctx -c e && \
         tpm2_activatecredential -c ak.ctx -C ek.ctx -i cred.out -o secret.out -P session:s.ctx",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0x12F") || stderr.contains("0x12f"),
        "{stderr}"
    );
    assert!(!d.join("secret.out").exists());
}
