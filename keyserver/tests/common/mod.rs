//! Shared by the keyserver's integration tests and benches: an in-process
//! keyserver on 127.0.0.1:0 with a temporary state directory, and a raw
//! HTTP/1.1 client (one request per connection).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::{KeyRelease, ReferenceValues, ReleasedKeyKind, release_context};
use cinfer_envelope::RequestPrivateKey;
use cinfer_envelope::keywrap::{WrappedSecret, unwrap_key};
use cinfer_keyserver::config::Config;
use cinfer_keyserver::{KeyServer, ManualClock, StateDir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MODEL_KEY: [u8; 32] = [0xc3; 32];
pub const START: u64 = 1_700_000_000;

pub struct Harness {
    pub root: PathBuf,
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub server: KeyServer,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub fn temp_root() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let root = std::env::temp_dir().join(format!(
        "cinfer-keyserver-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A configuration under `root` with reference values `refs`.
pub fn config_with(root: &Path, refs: ReferenceValues) -> Config {
    Config::new(
        root.join("state"),
        root.join("kek"),
        root.join("audit.jsonl"),
        refs,
    )
}

/// Starts a keyserver (model key "m1" = `MODEL_KEY`, clock at `START`) on
/// 127.0.0.1:0, serving on the current tokio runtime.
pub async fn start_server(refs: ReferenceValues, edit: impl FnOnce(&mut Config)) -> Harness {
    start_server_with(refs, edit, |state| {
        state.add_model_key("m1", &MODEL_KEY).unwrap();
    })
    .await
}

/// [`start_server`] with the state filled by `fill` (after `init`).
pub async fn start_server_with(
    refs: ReferenceValues,
    edit: impl FnOnce(&mut Config),
    fill: impl FnOnce(&StateDir),
) -> Harness {
    let root = temp_root();
    let mut config = config_with(&root, refs);
    edit(&mut config);
    let state = StateDir::init(&config.state_dir, &config.kek_file).unwrap();
    fill(&state);
    let clock = ManualClock::new(START);
    let server = KeyServer::new(config, Arc::new(clock.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(cinfer_keyserver::serve(listener, server.clone()));
    Harness {
        root,
        addr,
        clock,
        server,
    }
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
pub async fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nHost: keyserver\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, response[split + 4..].to_vec())
}

pub async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http(
        addr,
        &format!("POST {path} HTTP/1.1\r\nContent-Length: {}", body.len()),
        body,
    )
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    http(addr, &format!("GET {path} HTTP/1.1"), b"").await
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

pub fn error_of(body: &[u8]) -> String {
    json(body)["error"].as_str().unwrap().to_owned()
}

/// A fresh nonce from `POST /v1/nonce` (without checking its expiry).
pub async fn fresh_nonce(addr: SocketAddr) -> Vec<u8> {
    let (status, body) = post(addr, "/v1/nonce", b"").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    hex::decode(json(&body)["nonce"].as_str().unwrap()).unwrap()
}

/// Unwraps the released key of `kind` with the loader's ephemeral key
/// (context `release_context(kind, id)`, aad = the release's nonce); returns
/// its id and secret.
pub fn unwrap_released(
    release: &KeyRelease,
    loader_key: &RequestPrivateKey,
    kind: ReleasedKeyKind,
) -> (String, Vec<u8>) {
    let k = release.keys.iter().find(|k| k.kind == kind).unwrap();
    let secret = unwrap_key(
        loader_key,
        &release_context(kind, &k.id),
        &release.nonce,
        &WrappedSecret {
            enc: k.enc.clone(),
            ciphertext: k.ciphertext.clone(),
        },
    )
    .unwrap();
    (k.id.clone(), secret.to_vec())
}

/// TD quotes for a keyserver's `[tdx]`: a test TDX platform (PCK chain under
/// a test root, collateral valid at [`START`]) and the TD's registers.
pub struct TestTd {
    pub platform: cinfer_attest::tdx_test::TestTdxPlatform,
    pub fields: cinfer_attest::tdx_test::TdFields,
}

/// The MRTD of [`TestTd`]'s TD.
pub const TD_MRTD: [u8; 48] = [0x5d; 48];

impl TestTd {
    pub fn new() -> Self {
        let platform = cinfer_attest::tdx_test::TestTdxPlatform::generate(
            cinfer_attest::tdx_test::TestTcb::UpToDate,
            START,
        )
        .unwrap();
        let fields = cinfer_attest::tdx_test::TdFields {
            mr_td: TD_MRTD,
            ..Default::default()
        };
        TestTd { platform, fields }
    }

    /// The keyserver's `[tdx]`, its root CA and collateral written under
    /// `root`.
    pub fn policy(&self, root: &Path) -> cinfer_keyserver::config::TdxPolicy {
        std::fs::write(root.join("tdx-root.der"), self.platform.root_ca_der()).unwrap();
        std::fs::write(
            root.join("tdx-collateral.json"),
            self.platform.collateral_json(),
        )
        .unwrap();
        cinfer_keyserver::config::TdxPolicy {
            root_ca: root.join("tdx-root.der"),
            collateral: root.join("tdx-collateral.json"),
            mrtd: hex::encode(TD_MRTD),
            rtmr0: None,
            rtmr1: None,
            rtmr2: None,
            mrconfigid: None,
            mrowner: None,
            event_rtmr: 3,
            allowed_tcb_statuses: vec!["UpToDate".to_owned()],
        }
    }

    /// Adds the TD quote a loader in this TD would send: report data over
    /// the evidence's nonce and key, RTMR3 the replay of its event log.
    pub fn add_quote(&mut self, ev: &mut cinfer_attest::Evidence) {
        self.fields.report_data = cinfer_attest::tdx_report_data(&ev.nonce, &ev.hpke_public_key);
        self.fields.rtmrs[3] = cinfer_attest::rtmr_replay(&ev.event_log);
        ev.tdx = Some(cinfer_attest::TdxEvidence {
            quote: self.platform.quote(&self.fields),
            rtmr: 3,
        });
    }
}
