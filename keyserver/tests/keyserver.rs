//! The keyserver over real HTTP on loopback, with evidence signed by a software
//! key standing in for the TPM's attestation key (`cinfer-attest` fixtures).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::fixture::Fixture;
use cinfer_attest::{
    Evidence, KeyRelease, ReleasedKeyKind, SignedRequestKey, StatementError, release_context,
};
use cinfer_envelope::RequestPrivateKey;
use cinfer_envelope::keywrap::{WrappedSecret, unwrap_key};
use cinfer_keyserver::config::Config;
use cinfer_keyserver::{Clock, KeyServer, KeyServerError, ManualClock, StateDir, StateError};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;
use common::{Harness, MODEL_KEY, START, error_of, get, http, json, post, temp_root};

/// Reference values accepting `Fixture` evidence (they do not depend on the
/// nonce or the HPKE key).
fn fixture_config(root: &Path) -> Config {
    let refs = Fixture::new(&[0; 32], &[]).reference_values();
    common::config_with(root, refs)
}

async fn start_with(edit: impl FnOnce(&mut Config)) -> Harness {
    common::start_server(Fixture::new(&[0; 32], &[]).reference_values(), edit).await
}

async fn start() -> Harness {
    start_with(|_| {}).await
}

async fn nonce(h: &Harness) -> Vec<u8> {
    let (status, body) = post(h.addr, "/v1/nonce", b"").await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(v["expires_at"].as_u64(), Some(h.clock.now_unix() + 60));
    hex::decode(v["nonce"].as_str().unwrap()).unwrap()
}

/// Fresh evidence for a fresh nonce, and the loader's ephemeral private key.
async fn evidence(h: &Harness) -> (Evidence, RequestPrivateKey) {
    let loader_key = RequestPrivateKey::generate();
    let nonce = nonce(h).await;
    let ev = Fixture::new(&nonce, &loader_key.public_key().to_bytes()).evidence();
    (ev, loader_key)
}

fn audit_text(h: &Harness) -> String {
    std::fs::read_to_string(h.root.join("audit.jsonl")).unwrap()
}

fn audit_lines(h: &Harness) -> Vec<serde_json::Value> {
    audit_text(h)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn release_unwraps_with_the_ephemeral_key() {
    let h = start().await;
    let (ev, loader_key) = evidence(&h).await;
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    assert_eq!(release.version, 1);
    assert_eq!(release.nonce, ev.nonce);
    assert_eq!(release.keys.len(), 3, "model, request and receipt keys");

    let unwrap = |kind: ReleasedKeyKind| {
        let k = release.keys.iter().find(|k| k.kind == kind).unwrap();
        let secret = unwrap_key(
            &loader_key,
            &release_context(kind, &k.id),
            &release.nonce,
            &WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone(),
            },
        )
        .unwrap();
        (k.id.clone(), secret)
    };
    let (model_id, model_key) = unwrap(ReleasedKeyKind::Model);
    assert_eq!(model_id, "m1");
    assert_eq!(model_key.as_slice(), MODEL_KEY);
    let (request_id, request_secret) = unwrap(ReleasedKeyKind::Request);
    let request_key = RequestPrivateKey::from_bytes(&request_secret).unwrap();
    assert_eq!(request_key.public_key().key_id(), request_id);

    // The released request key is the one the keyserver publishes.
    let (status, body) = get(h.addr, "/v1/request-key").await;
    assert_eq!(status, 200);
    let signed: SignedRequestKey = serde_json::from_slice(&body).unwrap();
    let statement = signed.verify(&h.server.identity_public_key()).unwrap();
    assert_eq!(statement.public_key, request_key.public_key().to_bytes());
    assert_eq!(statement.key_id, request_id);
    // The receipt key released is the one whose public half the statement names.
    let (receipt_id, receipt_secret) = unwrap(ReleasedKeyKind::Receipt);
    assert_eq!(receipt_id, cinfer_attest::RECEIPT_KEY_ID);
    let receipt_key = p256::ecdsa::SigningKey::from_slice(&receipt_secret).unwrap();
    assert_eq!(
        receipt_key.verifying_key().to_sec1_point(false).as_bytes(),
        statement.receipt_public_key.as_slice()
    );

    // Another loader key cannot unwrap (the model key is bound to the evidence's key).
    let k = &release.keys[0];
    assert!(
        unwrap_key(
            &RequestPrivateKey::generate(),
            &release_context(k.kind, &k.id),
            &release.nonce,
            &WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone()
            },
        )
        .is_err()
    );

    // Audit: one released line naming the keys, and no key material anywhere.
    let lines = audit_lines(&h);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "released");
    assert_eq!(
        lines[0]["peer"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_eq!(
        lines[0]["keys"],
        serde_json::json!([
            "model:m1",
            format!("request:{request_id}"),
            "receipt:receipt"
        ])
    );
    assert_eq!(
        lines[0]["ak_fingerprint"].as_str().unwrap(),
        cinfer_attest::verify::ak_fingerprint(&ev.ak_public)
    );
    let audit = audit_text(&h);
    for secret in [model_key.as_slice(), request_secret.as_slice()] {
        assert!(!audit.contains(&hex::encode(secret)));
        assert!(!contains(audit.as_bytes(), secret));
    }

    // Keys at rest are encrypted: neither secret appears in any state file.
    let mut files = Vec::new();
    all_files(&h.root.join("state"), &mut files);
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for secret in [model_key.as_slice(), request_secret.as_slice()] {
            assert!(!contains(&bytes, secret), "{} holds a key", file.display());
            assert!(!contains(&bytes, hex::encode(secret).as_bytes()));
        }
    }
}

#[tokio::test]
async fn replayed_nonce_is_refused() {
    let h = start().await;
    let (ev, _) = evidence(&h).await;
    assert_eq!(post(h.addr, "/v1/attest", &ev.to_json()).await.0, 200);
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(
        (status, error_of(&body).as_str()),
        (403, "nonce already used")
    );

    // Only a successful attestation spends its nonce: evidence that fails to
    // verify releases nothing and leaves the nonce to the real quote, which is
    // then single use.
    let (ev, _) = evidence(&h).await;
    let mut bad = ev.clone();
    bad.pcrs.insert(0, [0xee; 32]);
    assert_eq!(post(h.addr, "/v1/attest", &bad.to_json()).await.0, 403);
    assert_eq!(post(h.addr, "/v1/attest", &ev.to_json()).await.0, 200);
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(
        (status, error_of(&body).as_str()),
        (403, "nonce already used")
    );

    let outcomes: Vec<_> = audit_lines(&h)
        .iter()
        .map(|l| l["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        outcomes,
        ["released", "refused", "refused", "released", "refused"]
    );

    // The same in /metrics: two releases, two refusals by the nonce, one by
    // the TPM quote; and /readyz: two spent nonces remembered, room for more.
    let (status, m) = get(h.addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = String::from_utf8(m).unwrap();
    for line in [
        "cinfer_keyserver_attestations_total{outcome=\"released\",reason=\"none\"} 2",
        "cinfer_keyserver_attestations_total{outcome=\"refused\",reason=\"nonce\"} 2",
        "cinfer_keyserver_attestations_total{outcome=\"refused\",reason=\"tpm\"} 1",
        "cinfer_keyserver_attestations_total{outcome=\"refused\",reason=\"tdx\"} 0",
        "cinfer_keyserver_attest_duration_seconds_count{outcome=\"refused\"} 3",
        "cinfer_keyserver_nonces_total{outcome=\"issued\"} 2",
        "cinfer_keyserver_spent_nonces 2",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    let (status, body) = get(h.addr, "/readyz").await;
    let ready = json(&body);
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ready")),
        "{ready}"
    );
    assert_eq!(ready["spent_nonces"], 2);
}

/// `/readyz` is 503, saying why, while the spent-nonce table is full.
#[tokio::test]
async fn readyz_says_when_attestations_cannot_succeed() {
    let h = start_with(|c| c.max_outstanding_nonces = 1).await;
    let (status, body) = get(h.addr, "/readyz").await;
    assert_eq!(status, 200, "{}", json(&body));
    let (ev, _) = evidence(&h).await;
    assert_eq!(post(h.addr, "/v1/attest", &ev.to_json()).await.0, 200);
    let (status, body) = get(h.addr, "/readyz").await;
    let ready = json(&body);
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reason"]
            .as_str()
            .is_some_and(|r| r.contains("max-outstanding-nonces is 1")),
        "{ready}"
    );
}

#[tokio::test]
async fn expired_nonce_is_refused() {
    let h = start_with(|c| c.nonce_ttl_secs = 5).await;
    let loader_key = RequestPrivateKey::generate();
    let (_, body) = post(h.addr, "/v1/nonce", b"").await;
    let n = hex::decode(json(&body)["nonce"].as_str().unwrap()).unwrap();
    let ev = Fixture::new(&n, &loader_key.public_key().to_bytes()).evidence();
    h.clock.advance(6);
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!((status, error_of(&body).as_str()), (403, "nonce expired"));
}

#[tokio::test]
async fn unknown_nonce_is_refused() {
    let h = start().await;
    let loader_key = RequestPrivateKey::generate();
    let ev = Fixture::new(&[0x77; 32], &loader_key.public_key().to_bytes()).evidence();
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    const UNKNOWN: &str = "unknown nonce: not issued by this keyserver (bad length or MAC)";
    assert_eq!((status, error_of(&body).as_str()), (403, UNKNOWN));
    let line = &audit_lines(&h)[0];
    assert_eq!(line["outcome"], "refused");
    assert_eq!(line["reason"], UNKNOWN);
    assert_eq!(line["nonce"], hex::encode([0x77; 32]));
    // A forged nonce: an issued one with its expiry moved later (to outlive
    // its lifetime), or with another byte changed.
    let issued = nonce(&h).await;
    for at in [7, 12, 31] {
        let mut forged = issued.clone();
        forged[at] ^= 0x01;
        let ev = Fixture::new(&forged, &loader_key.public_key().to_bytes()).evidence();
        let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
        assert_eq!(
            (status, error_of(&body).as_str()),
            (403, UNKNOWN),
            "byte {at}"
        );
    }
}

#[tokio::test]
async fn tampered_evidence_is_refused_with_its_reason() {
    let h = start().await;

    let (ev, _) = evidence(&h).await;
    let mut bad = ev.clone();
    bad.pcrs.insert(7, [0x71; 32]);
    let (status, body) = post(h.addr, "/v1/attest", &bad.to_json()).await;
    assert_eq!(status, 403);
    assert_eq!(
        error_of(&body),
        "tpm: PCR values do not match the quote's pcrDigest"
    );

    let (ev, _) = evidence(&h).await;
    let mut bad = ev.clone();
    bad.hpke_public_key = RequestPrivateKey::generate().public_key().to_bytes();
    let (status, body) = post(h.addr, "/v1/attest", &bad.to_json()).await;
    assert_eq!(status, 403);
    assert_eq!(
        error_of(&body),
        "tpm: quote extraData does not bind the nonce and the HPKE public key"
    );

    // Signed by a key that is not pinned.
    let loader_key = RequestPrivateKey::generate();
    let n = nonce(&h).await;
    let mut f = Fixture::new(&n, &loader_key.public_key().to_bytes());
    f.ak = cinfer_attest::fixture::test_key(99);
    let (status, body) = post(h.addr, "/v1/attest", &f.evidence().to_json()).await;
    assert_eq!(status, 403);
    assert!(error_of(&body).contains("is not trusted"));

    // A structurally broken quote is a bad request.
    let (ev, _) = evidence(&h).await;
    let mut bad = ev.clone();
    bad.attest.truncate(10);
    let (status, body) = post(h.addr, "/v1/attest", &bad.to_json()).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).starts_with("tpm: malformed evidence"));

    // Not evidence at all.
    let (status, body) = post(h.addr, "/v1/attest", b"{\"version\": 1").await;
    assert_eq!(status, 400);
    assert!(error_of(&body).starts_with("malformed evidence JSON"));

    let reasons: Vec<_> = audit_lines(&h)
        .iter()
        .map(|l| l["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.len(), 5);
    assert!(reasons[2].contains("is not trusted"));
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let h = start_with(|c| c.max_body_bytes = 4096).await;
    // Declared too large: refused before any of it is read.
    let (status, body) = http(
        h.addr,
        "POST /v1/attest HTTP/1.1\r\nContent-Length: 10000000",
        b"",
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(error_of(&body), "request body larger than 4096 bytes");

    // No length declared (chunked): refused once the limit is passed.
    let request = Request::post("/v1/attest")
        .body(Full::new(Bytes::from(vec![b' '; 4097])))
        .unwrap();
    let response = h
        .server
        .handle(request, "127.0.0.1:1".parse().unwrap())
        .await;
    assert_eq!(response.status(), 413);
    // At the limit it is read (and refused as not JSON).
    let request = Request::post("/v1/attest")
        .body(Full::new(Bytes::from(vec![b' '; 4096])))
        .unwrap();
    let response = h
        .server
        .handle(request, "127.0.0.1:1".parse().unwrap())
        .await;
    assert_eq!(response.status(), 400);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(error_of(&body).starts_with("malformed evidence JSON"));
}

#[tokio::test]
async fn request_key_signature_verifies_and_tampering_fails() {
    let h = start().await;
    let (status, body) = get(h.addr, "/v1/request-key").await;
    assert_eq!(status, 200);
    let signed: SignedRequestKey = serde_json::from_slice(&body).unwrap();
    let identity = h.server.identity_public_key();
    let statement = signed.verify(&identity).unwrap();
    assert_eq!(
        statement.suite,
        "DHKEM(P-256,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
    );
    assert!(statement.is_valid_at(START) && statement.is_valid_at(START + 7 * 24 * 3600));
    assert!(!statement.is_valid_at(START + 7 * 24 * 3600 + 1));
    assert_eq!(statement.public_key.len(), 65);

    let mut tampered = signed.clone();
    let other = RequestPrivateKey::generate().public_key().to_bytes();
    tampered.statement_json = tampered
        .statement_json
        .replace(&hex::encode(&statement.public_key), &hex::encode(other));
    assert_ne!(tampered.statement_json, signed.statement_json);
    assert_eq!(
        tampered.verify(&identity),
        Err(StatementError::BadSignature)
    );
    let mut tampered = signed.clone();
    tampered.signature[10] ^= 1;
    assert_eq!(
        tampered.verify(&identity),
        Err(StatementError::BadSignature)
    );
}

#[tokio::test]
async fn routes_methods_and_health() {
    let h = start().await;
    let (status, body) = get(h.addr, "/healthz").await;
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    assert_eq!(get(h.addr, "/nope").await.0, 404);
    assert_eq!(get(h.addr, "/v1/attest").await.0, 405);
    assert_eq!(get(h.addr, "/v1/nonce").await.0, 405);
    assert_eq!(post(h.addr, "/v1/request-key", b"").await.0, 405);
    // Nonces are fresh.
    assert_ne!(nonce(&h).await, nonce(&h).await);
}

/// Handing out nonces stores nothing: a flood of anonymous `POST /v1/nonce`
/// (more than the bound on remembered nonces) does not stop a real
/// attestation. The bound only counts successful attestations within one
/// nonce lifetime.
#[tokio::test]
async fn a_nonce_flood_does_not_stop_attestation() {
    let h = start_with(|c| c.max_outstanding_nonces = 2).await;
    for _ in 0..200 {
        nonce(&h).await;
    }
    let (ev, _) = evidence(&h).await;
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (ev, _) = evidence(&h).await;
    assert_eq!(post(h.addr, "/v1/attest", &ev.to_json()).await.0, 200);
    // Two successful attestations within a nonce lifetime fill this bound.
    let (ev, _) = evidence(&h).await;
    let (status, body) = post(h.addr, "/v1/attest", &ev.to_json()).await;
    assert_eq!(
        (status, error_of(&body).as_str()),
        (
            503,
            "too many attestations within the nonce lifetime; try again later"
        )
    );
    // Once they expire there is room again.
    h.clock.advance(61);
    let (ev, _) = evidence(&h).await;
    assert_eq!(post(h.addr, "/v1/attest", &ev.to_json()).await.0, 200);
}

#[test]
fn wrong_kek_is_a_clear_startup_error() {
    let root = temp_root();
    let config = fixture_config(&root);
    StateDir::init(&config.state_dir, &config.kek_file).unwrap();
    let mut wrong = config.clone();
    wrong.kek_file = root.join("other-kek");
    std::fs::write(&wrong.kek_file, hex::encode([9u8; 32])).unwrap();
    let err = KeyServer::new(wrong, Arc::new(ManualClock::new(START))).unwrap_err();
    assert!(
        matches!(err, KeyServerError::State(StateError::Decrypt(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("wrong KEK"), "{err}");

    // A KEK of the wrong form is named as such.
    std::fs::write(root.join("short-kek"), "abcd").unwrap();
    let mut short = config.clone();
    short.kek_file = root.join("short-kek");
    let err = KeyServer::new(short, Arc::new(ManualClock::new(START))).unwrap_err();
    assert!(matches!(err, KeyServerError::State(StateError::BadKek(_))));

    // A model configured for release but never stored is refused at startup.
    let mut missing = config.clone();
    missing.release.models = Some(vec!["absent".into()]);
    let err = KeyServer::new(missing, Arc::new(ManualClock::new(START))).unwrap_err();
    assert!(matches!(err, KeyServerError::MissingModelKey(_)));

    // A tampered key file is refused too.
    let identity = config.state_dir.join("identity.key.enc");
    let mut bytes = std::fs::read(&identity).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&identity, bytes).unwrap();
    let err = KeyServer::new(config, Arc::new(ManualClock::new(START))).unwrap_err();
    assert!(matches!(err, KeyServerError::State(StateError::Decrypt(_))));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn cli_init_import_and_identity() {
    let root = temp_root();
    let bin = env!("CARGO_BIN_EXE_keyserver");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env_remove("CINFER_KEYSERVER_KEK_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let help = run(&["--help"]);
    for cmd in [
        "init",
        "add-model-key",
        "add-share",
        "public-identity",
        "serve",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
    // A state that was never initialised: the missing file and the reason, once.
    let share = cinfer_attest::shares::ShareFile {
        format: cinfer_attest::shares::SHARE_FILE_FORMAT.into(),
        shares: vec![
            cinfer_attest::shares::split(
                cinfer_attest::ReleasedKeyKind::Model,
                "m",
                &[1; 32],
                2,
                3,
            )
            .unwrap()
            .remove(0),
        ],
        request_key: None,
    };
    let share_path = root.join("share-1.json");
    std::fs::write(&share_path, serde_json::to_vec(&share).unwrap()).unwrap();
    let missing = root.join("nowhere");
    let out = std::process::Command::new(bin)
        .arg("--state")
        .arg(&missing)
        .arg("--kek")
        .arg(missing.join("kek"))
        .arg("add-share")
        .arg("--share-file")
        .arg(&share_path)
        .env_remove("CINFER_KEYSERVER_KEK_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&missing.join("kek").display().to_string()),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    // So is a configuration file that is not there.
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(missing.join("keyserver.toml"))
        .arg("serve")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("keyserver.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let state = root.join("state");
    let kek = root.join("kek");
    let (state, kek) = (state.to_str().unwrap(), kek.to_str().unwrap());
    let identity = run(&["init", "--state", state, "--kek", kek]);
    let key_file = root.join("model.key");
    std::fs::write(
        &key_file,
        format!(
            "# cinfer DEVELOPMENT-ONLY model data key.\ncinfer-dev-model-key-v1 {}\n",
            hex::encode(MODEL_KEY)
        ),
    )
    .unwrap();
    run(&[
        "--state",
        state,
        "--kek",
        kek,
        "add-model-key",
        "--id",
        "smollm2",
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    assert_eq!(
        run(&["--state", state, "--kek", kek, "public-identity"]),
        identity
    );
    let keys = StateDir::open(Path::new(state), Path::new(kek))
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(*keys.models["smollm2"], MODEL_KEY);

    // Serving needs a config; a config with a reference-file loads.
    let refs = Fixture::new(&[0; 32], &[]).reference_values();
    std::fs::write(root.join("reference.toml"), toml::to_string(&refs).unwrap()).unwrap();
    std::fs::write(
        root.join("keyserver.toml"),
        "state-dir = \"state\"\nkek-file = \"kek\"\naudit-log = \"audit.jsonl\"\nreference-file = \"reference.toml\"\n[release]\nmodels = [\"smollm2\"]\n",
    )
    .unwrap();
    let config = Config::load(&root.join("keyserver.toml")).unwrap();
    KeyServer::new(config, Arc::new(ManualClock::new(START))).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

// ------------------------------------------------ slow clients (issue 16, bug 9)

/// Sends a `POST /v1/attest` head announcing `len` body bytes, then trickles
/// one byte every 100 ms (until the server stops reading).
async fn trickle_body(addr: std::net::SocketAddr, len: usize) -> tokio::net::tcp::OwnedReadHalf {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let head =
        format!("POST /v1/attest HTTP/1.1\r\nHost: keyserver\r\nContent-Length: {len}\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        for _ in 0..len {
            if wr.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    rd
}

/// Everything the server sends until it closes (a reset counts as closed).
async fn read_until_closed(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: std::time::Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the keyserver did not close the connection in time");
    out
}

fn status_and_error(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, error_of(body.as_bytes()))
}

/// A trickled evidence body is answered 408 with the reason after
/// `request-timeout-secs` (and audited); a request head that never ends is
/// disconnected after the same time, unanswered.
#[tokio::test]
async fn slow_bodies_get_408_and_slow_heads_are_disconnected() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let h = start_with(|c| c.request_timeout_secs = 1).await;
    let started = Instant::now();
    let mut rd = trickle_body(h.addr, 4096).await;
    let mut partial = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    partial
        .write_all(b"POST /v1/attest HTTP/1.1\r\nHost: keyserver\r\n")
        .await
        .unwrap();
    let response = read_until_closed(&mut rd, Duration::from_secs(6)).await;
    assert_eq!(
        status_and_error(&response),
        (408, "request body not received within 1 s".to_owned())
    );
    let from_partial = read_until_closed(&mut partial, Duration::from_secs(6)).await;
    assert_eq!(String::from_utf8_lossy(&from_partial), "");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let audit = audit_lines(&h);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["outcome"], "refused");
    assert_eq!(audit[0]["reason"], "request body not received within 1 s");
}

/// With `max-connections` slow senders open, a further connection is closed
/// at once without an answer (a served one would wait for its headers); once
/// the slow senders are cut off (408), the keyserver serves again.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_while_the_cap_holds() {
    use std::time::{Duration, Instant};
    let h = start_with(|c| {
        c.max_connections = 3;
        c.request_timeout_secs = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(trickle_body(h.addr, 4096).await);
    }
    for _ in 0..10 {
        let t = Instant::now();
        let mut extra = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let answer = read_until_closed(&mut extra, Duration::from_secs(3)).await;
        assert_eq!(String::from_utf8_lossy(&answer), "");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a connection over the cap was not closed at once: {:?}",
            t.elapsed()
        );
    }
    for mut rd in held {
        let response = read_until_closed(&mut rd, Duration::from_secs(6)).await;
        assert_eq!(
            status_and_error(&response),
            (408, "request body not received within 2 s".to_owned())
        );
    }
    // The permits come back as the connection tasks end.
    let t = Instant::now();
    loop {
        let mut probe = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed(&mut probe, Duration::from_secs(3)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Endorsement against the golden fixture (tests/fixtures/endorsement: an EK
// certificate, EK and AK areas from a real endorsed swtpm and its local CA),
// without a TPM: what the chain check, the area parsers and the comparisons
// accept and refuse, byte by byte.

mod golden_endorsement {
    use cinfer_keyserver::endorsement::{self, EkTrust, EndorsementError, make_credential};
    use std::path::Path;

    pub struct Golden {
        pub time: u64,
        pub ak_public: Vec<u8>,
        pub endorsement: cinfer_attest::Endorsement,
        pub trust: EkTrust,
    }

    pub fn golden() -> Golden {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/endorsement");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&read("endorsement.json")).unwrap();
        let trust = EkTrust::new(
            &endorsement::certificates_from_pem(&read("root.pem")).unwrap(),
            &endorsement::certificates_from_pem(&read("intermediate.pem")).unwrap(),
        )
        .unwrap();
        Golden {
            time: v["time"].as_u64().unwrap(),
            ak_public: hex::decode(v["ak_public"].as_str().unwrap()).unwrap(),
            endorsement: serde_json::from_value(v["endorsement"].clone()).unwrap(),
            trust,
        }
    }

    fn name_of(area: &[u8]) -> Vec<u8> {
        use sha2::Digest as _;
        [&[0x00, 0x0b][..], &sha2::Sha256::digest(area)[..]].concat()
    }

    #[test]
    fn golden_endorsement_verifies_at_its_time_only() {
        let g = golden();
        let ok = endorsement::verify(&g.endorsement, &g.ak_public, &g.trust, g.time).unwrap();
        assert_eq!(ok.ak_name, name_of(&g.endorsement.ak_public_area));
        make_credential(&ok.ek, &ok.ak_name, &[1; 32]).unwrap();
        // Before the certificates' notBefore (they were issued at `time`).
        let early = endorsement::verify(&g.endorsement, &g.ak_public, &g.trust, g.time - 86_400);
        assert!(
            matches!(&early, Err(EndorsementError::UntrustedCertificate { reason, .. }) if reason.contains("NotValidYet")),
            "{early:?}"
        );
        // Trusting no CA at all.
        assert_eq!(
            endorsement::verify(&g.endorsement, &g.ak_public, &EkTrust::default(), g.time)
                .unwrap_err(),
            EndorsementError::NoCaConfigured
        );
        // Another quoting key than the AK area's.
        let mut other = g.ak_public.clone();
        other[40] ^= 1;
        assert_eq!(
            endorsement::verify(&g.endorsement, &other, &g.trust, g.time).unwrap_err(),
            EndorsementError::AkMismatch
        );
    }

    /// Every single-byte change of the certificate is refused; of the EK
    /// and AK areas, refused or (for fields the keyserver does not use, e.g.
    /// the EK's authPolicy or AK attribute bits it does not require) accepted
    /// with the name of the changed area, whose credential only a TPM
    /// holding that exact object could activate. Nothing panics.
    #[test]
    fn every_byte_of_the_golden_endorsement_matters_or_is_named() {
        let g = golden();
        let e = &g.endorsement;
        for i in 0..e.ek_certificate.len() {
            for flip in [0x01, 0x80] {
                let mut m = e.clone();
                m.ek_certificate[i] ^= flip;
                assert!(
                    endorsement::verify(&m, &g.ak_public, &g.trust, g.time).is_err(),
                    "certificate byte {i} ^ {flip:#x} accepted"
                );
            }
        }
        let mut ek_accepted = 0;
        for i in 0..e.ek_public.len() {
            let mut m = e.clone();
            m.ek_public[i] ^= 0x01;
            if endorsement::verify(&m, &g.ak_public, &g.trust, g.time).is_ok() {
                ek_accepted += 1;
                // Only inside the attributes (bytes 4..8) or authPolicy
                // (bytes 10..42): never the key, the algorithms or the sizes.
                assert!((4..8).contains(&i) || (10..42).contains(&i), "EK byte {i}");
            }
        }
        assert!(ek_accepted <= 36);
        for i in 0..e.ak_public_area.len() {
            let mut m = e.clone();
            m.ak_public_area[i] ^= 0x01;
            if let Ok(ok) = endorsement::verify(&m, &g.ak_public, &g.trust, g.time) {
                assert_eq!(ok.ak_name, name_of(&m.ak_public_area), "AK byte {i}");
                assert_ne!(ok.ak_name, name_of(&e.ak_public_area));
            }
        }
        // Truncations and extensions of the areas are malformed.
        for n in 0..e.ek_public.len() {
            let mut m = e.clone();
            m.ek_public.truncate(n);
            assert!(endorsement::verify(&m, &g.ak_public, &g.trust, g.time).is_err());
        }
        let mut m = e.clone();
        m.ak_public_area.push(0);
        assert_eq!(
            endorsement::verify(&m, &g.ak_public, &g.trust, g.time).unwrap_err(),
            EndorsementError::MalformedAkPublic("trailing bytes")
        );
    }
}

/// With `tls-cert`/`tls-key` the keyserver speaks only TLS: the inference
/// server's keyserver client gets answers over https when it trusts the CA
/// (`keyserver-ca-cert`), fails the handshake with the certificate's reason
/// when it does not, and plain HTTP to the TLS port gets no answer. The CA
/// and certificate are made here (rcgen), never real ones.
#[tokio::test]
async fn the_listener_speaks_tls_to_keyserver_clients_that_trust_its_ca() {
    use cinfer_server::keyclient::{KeyserverClient, KeyserverError};
    let test_ca = cinfer_tls::TestCa::new("127.0.0.1").unwrap();
    let h = start_with(|c| c.tls = Some(test_ca.identity().unwrap())).await;
    let client = |ca_pem: Option<&[u8]>| {
        KeyserverClient::new(
            std::time::Duration::from_secs(5),
            1 << 20,
            cinfer_tls::client_config(ca_pem).unwrap(),
        )
    };
    let ca_pem = test_ca.ca_pem.clone();
    let port = h.addr.port();
    let healthz = format!("https://127.0.0.1:{port}/healthz");
    let ok = client(Some(&ca_pem))
        .call(hyper::Method::GET, &healthz, Default::default())
        .await
        .expect("https with the CA trusted");
    assert_eq!(ok.status, 200);
    match client(None)
        .call(hyper::Method::GET, &healthz, Default::default())
        .await
    {
        Err(KeyserverError::Unreachable { reason, .. }) => {
            assert!(reason.contains("UnknownIssuer"), "{reason}")
        }
        other => panic!("a client without the CA: {other:?}"),
    }
    let plain = client(Some(&ca_pem))
        .call(
            hyper::Method::GET,
            &format!("http://127.0.0.1:{port}/healthz"),
            Default::default(),
        )
        .await;
    assert!(plain.is_err(), "plain HTTP to the TLS port: {plain:?}");
    // A configuration naming only one of the two files is refused.
    let root = temp_root();
    std::fs::write(root.join("cert.pem"), &test_ca.cert_pem).unwrap();
    let text = "state-dir = \"s\"\naudit-log = \"a\"\ntls-cert = \"cert.pem\"\n[reference]\ntrusted-aks = []\n";
    match Config::parse(text, &root) {
        Err(cinfer_keyserver::ConfigError::Invalid(m)) => {
            assert!(m.contains("tls-cert and tls-key go together"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}
