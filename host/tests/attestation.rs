//! `trusted-loader serve` end to end on loopback: a real swtpm, the keyserver, the
//! loader binary, and a small relay of the test's own standing in for the untrusted
//! inference server. The relay carries the keyserver's nonce to the loader, the
//! loader's evidence to the keyserver and the wrapped keys back — and sees only
//! ciphertext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_attest::shares::{RequestKeyPublic, ShareEntry, ShareFile};
use cinfer_attest::{Evidence, KeyRelease, ReferenceValues, SignedRequestKey};
use cinfer_channel::{Frame, Kind};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use sha2::Digest as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

const MODEL_ID: &str = "smollm2-135m-instruct";
const MODEL_KEY: [u8; 32] = [0x5a; 32];
const MAX: u32 = cinfer_channel::DEFAULT_MAX_PAYLOAD;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cinfer-attest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loader configuration directory: the dev policy, its worlds, and loader.toml.
fn loader_dir(dir: &Path, tcti: &str, policy_suffix: &str, pinned: &[&[u8]]) -> PathBuf {
    let policy = std::fs::read_to_string(root().join("policies/dev.toml")).unwrap();
    std::fs::write(dir.join("dev.toml"), format!("{policy}{policy_suffix}")).unwrap();
    std::fs::copy(root().join("policies/worlds.wit"), dir.join("worlds.wit")).unwrap();
    std::fs::copy(
        root().join("target/programs/echo.wasm"),
        dir.join("echo.wasm"),
    )
    .expect("target/programs/echo.wasm: run cargo run --release -p build-programs");
    let config = dir.join("loader.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"tcp:127.0.0.1:0\"\ntpm = \"{tcti}\"\npolicy = \"dev.toml\"\npcr = 23\nquote-pcrs = [0, 7, 23]\nkeyservers = [{}]\nserver-keys = [\"{}\"]\npeer-auth-timeout-ms = 5000\npeer-idle-timeout-ms = 60000\n[[program]]\npath = \"echo.wasm\"\n",
            pinned
                .iter()
                .map(|k| format!("\"{}\"", hex::encode(k)))
                .collect::<Vec<_>>()
                .join(", "),
            hex::encode(public_sec1(&server_key()))
        ),
    )
    .unwrap();
    config
}

/// The inference server's channel key the test loaders list in `server-keys`.
fn server_key() -> SigningKey {
    SigningKey::from_slice(&[0x5e; 32]).unwrap()
}

fn public_sec1(k: &SigningKey) -> [u8; 65] {
    k.verifying_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

/// `key`'s `Auth` payload for `challenge`.
fn auth_payload(key: &SigningKey, challenge: &[u8]) -> Vec<u8> {
    let challenge: [u8; cinfer_channel::CHALLENGE_LEN] = challenge.try_into().unwrap();
    let signature: Signature = key.sign(&cinfer_channel::auth_message(&challenge));
    cinfer_channel::PeerAuth {
        public_key: public_sec1(key),
        signature: signature.to_bytes().into(),
    }
    .encode()
}

fn loader_bin() -> &'static str {
    env!("CARGO_BIN_EXE_trusted-loader")
}

/// The measured binary carries no development or operator command (they live
/// in `cinfer`, `measure` as `cinfer measure-loader`): it only serves.
#[test]
fn the_measured_loader_binary_only_serves() {
    for gone in ["run", "check", "dev-keygen", "measure"] {
        let out = Command::new(loader_bin()).arg(gone).output().unwrap();
        assert!(!out.status.success(), "{gone}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains(&format!("unexpected argument \"{gone}\"")),
            "{gone}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = Command::new(loader_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A command's name is indented by two; its description continues deeper.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["serve"], "{help}");
}

/// The operator's reference values for a loader run from `loader_bin()` with
/// `config` on the TPM at `tcti`, as `cinfer measure-loader --tpm` builds them
/// (that command's own test is in `cli/tests`): the event log the loader
/// computes at start, that TPM's AK and its other quoted PCRs.
fn reference_values(config: &Path, tcti: &str) -> ReferenceValues {
    let binary = std::fs::read(loader_bin()).unwrap();
    let m = cinfer_host::measure::measure(config, &binary).unwrap();
    let mut refs = ReferenceValues::for_events(m.cfg.pcr, &m.events);
    let others: Vec<u8> = m
        .cfg
        .quote_pcrs()
        .into_iter()
        .filter(|p| *p != m.cfg.pcr)
        .collect();
    let mut tpm = cinfer_tpm::Tpm::open(tcti).unwrap();
    refs.trusted_aks.push(tpm.ak_public().to_vec());
    refs.pcrs = tpm.read_pcrs(&others).unwrap();
    refs
}

/// A running loader, its channel address and its log lines so far.
struct Served(Child, SocketAddr, Arc<Mutex<Vec<String>>>);

impl Served {
    /// Waits (up to 5 s) for a log line containing `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(l) = self.2.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?}: {:?}",
                self.2.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(config: &Path) -> Served {
    // Started when no TSS context of this process is open (they are not
    // close-on-exec: the loader would keep another test's swtpm connection).
    let mut child = cinfer_tpm::swtpm::spawn_guarded(
        Command::new(loader_bin())
            .args(["serve", "--config"])
            .arg(config)
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("loader exited before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("listening on tcp:") {
            break a.parse().unwrap();
        }
    };
    // Keep draining stderr so the loader never blocks on a full pipe.
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    Served(child, addr, log)
}

struct KeyServer {
    addr: SocketAddr,
    identity: Vec<u8>,
    _runtime: tokio::runtime::Runtime,
}

/// Creates a keyserver's state (identity, request, receipt and model keys) in
/// `dir/name`; returns its identity public key.
fn keyserver_state(dir: &Path, name: &str) -> Vec<u8> {
    let state = cinfer_keyserver::StateDir::init(&dir.join(name), &dir.join(format!("{name}.kek")))
        .unwrap();
    state.add_model_key(MODEL_ID, &MODEL_KEY).unwrap();
    cinfer_keyserver::server::identity_public_key(&state.load().unwrap())
}

/// Serves the keyserver whose state `keyserver_state(dir, name)` made.
fn keyserver(dir: &Path, name: &str, refs: ReferenceValues) -> KeyServer {
    keyserver_with(dir, name, refs, |_| {})
}

/// [`keyserver`] with its configuration edited by `edit`.
fn keyserver_with(
    dir: &Path,
    name: &str,
    refs: ReferenceValues,
    edit: impl FnOnce(&mut cinfer_keyserver::Config),
) -> KeyServer {
    let mut config = cinfer_keyserver::Config::new(
        dir.join(name),
        dir.join(format!("{name}.kek")),
        dir.join(format!("{name}-audit.jsonl")),
        refs,
    );
    edit(&mut config);
    let server =
        cinfer_keyserver::KeyServer::new(config, Arc::new(cinfer_keyserver::SystemClock)).unwrap();
    let identity = server.identity_public_key();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(cinfer_keyserver::serve(listener, server));
    KeyServer {
        addr,
        identity,
        _runtime: runtime,
    }
}

/// One HTTP/1.1 exchange (the relay's keyserver client); returns status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: keyserver\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&response[..split])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, response[split + 4..].to_vec())
}

/// The relay's side of the loader channel.
struct Relay {
    stream: TcpStream,
    /// Every byte the relay saw from either side (the untrusted side's view).
    seen: Vec<u8>,
}

impl Relay {
    /// Connects and authenticates with the server's channel key.
    fn connect(addr: SocketAddr) -> (Self, serde_json::Value) {
        let (mut relay, hello) = Relay::connect_unauthenticated(addr);
        let challenge = hex::decode(hello["challenge"].as_str().expect("a challenge")).unwrap();
        let answer = relay.ask(Kind::Auth, &auth_payload(&server_key(), &challenge));
        assert_eq!(
            answer.kind,
            Kind::Authenticated,
            "{}",
            String::from_utf8_lossy(&answer.payload)
        );
        (relay, hello)
    }

    /// Connects and reads `Hello`; nothing else.
    fn connect_unauthenticated(addr: SocketAddr) -> (Self, serde_json::Value) {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut relay = Relay {
            stream,
            seen: Vec::new(),
        };
        let hello = relay.read();
        assert_eq!(hello.kind, Kind::Hello);
        let v = serde_json::from_slice(&hello.payload).unwrap();
        (relay, v)
    }

    /// The loader's last word: an `Error` frame, then the connection closes.
    fn dropped_because(&mut self) -> String {
        let why = error_of(&self.read());
        let end = cinfer_channel::read_frame(&mut self.stream, MAX);
        assert!(
            matches!(end, Ok(None) | Err(_)),
            "the connection stays open after {why:?}: {end:?}"
        );
        why
    }

    fn read(&mut self) -> Frame {
        let f = cinfer_channel::read_frame(&mut self.stream, MAX)
            .unwrap()
            .expect("a frame");
        self.seen.extend_from_slice(&f.payload);
        f
    }

    fn ask(&mut self, kind: Kind, payload: &[u8]) -> Frame {
        cinfer_channel::write_frame(&mut self.stream, kind, payload, MAX).unwrap();
        self.read()
    }

    /// Nonce from the keyserver → evidence from the loader → keyserver verdict.
    fn attest(&mut self, ks: SocketAddr) -> (u16, Vec<u8>) {
        let (status, body) = http(ks, "POST", "/v1/nonce", b"");
        assert_eq!(status, 200);
        self.seen.extend_from_slice(&body);
        let nonce: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let nonce = hex::decode(nonce["nonce"].as_str().unwrap()).unwrap();
        let evidence = self.ask(Kind::AttestRequest, &nonce);
        assert_eq!(
            evidence.kind,
            Kind::Evidence,
            "{}",
            String::from_utf8_lossy(&evidence.payload)
        );
        Evidence::from_json(&evidence.payload).expect("evidence JSON");
        let (status, body) = http(ks, "POST", "/v1/attest", &evidence.payload);
        self.seen.extend_from_slice(&body);
        (status, body)
    }
}

impl Relay {
    /// Attests to `ks` and installs its release; asserts both succeed.
    fn attest_and_install(&mut self, ks: &KeyServer) {
        let (status, body) = self.attest(ks.addr);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let installed = self.ask(Kind::KeyRelease, &body);
        assert_eq!(
            installed.kind,
            Kind::KeysInstalled,
            "{}",
            String::from_utf8_lossy(&installed.payload)
        );
    }

    /// Submits `sealed` for `program` as request 7 and returns the reason of
    /// the refusal it must get.
    fn submit_refused(&mut self, program: &str, sealed: Vec<u8>) -> String {
        let submit = cinfer_channel::Submit {
            request_id: 7,
            program: program.into(),
            sealed,
        };
        let refused = self.ask(Kind::Submit, &submit.encode());
        assert_eq!(refused.kind, Kind::Refused);
        let (id, rest) = cinfer_channel::split_request_id(&refused.payload).unwrap();
        assert_eq!(id, 7);
        let why: serde_json::Value = serde_json::from_slice(rest).unwrap();
        why["error"].as_str().unwrap().to_owned()
    }
}

fn error_of(frame: &Frame) -> String {
    assert_eq!(frame.kind, Kind::Error);
    let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
    v["error"].as_str().unwrap().to_owned()
}

#[test]
fn an_attested_loader_gets_its_keys_through_a_relay_that_learns_nothing() {
    let swtpm = match cinfer_tpm::swtpm::Swtpm::start() {
        Ok(s) => s,
        Err(e) => panic!("swtpm is required (scripts/setup installs it): {e}"),
    };
    let dir = scratch("release");
    let pinned = keyserver_state(&dir, "ks");
    keyserver_state(&dir, "other-ks");
    let config = loader_dir(&dir, &swtpm.tcti(), "", &[&pinned]);
    let refs = reference_values(&config, &swtpm.tcti());
    assert_eq!(refs.trusted_aks.len(), 1);
    let ks = keyserver(&dir, "ks", refs.clone());
    // A keyserver the loader does not pin (it verifies the same evidence fine).
    let other = keyserver(&dir, "other-ks", refs.clone());
    let loader = serve(&config);

    let (mut relay, hello) = Relay::connect(loader.1);
    assert_eq!(hello["ak_public"], hex::encode(&refs.trusted_aks[0]));
    // Keys released by a keyserver the loader does not pin are not installed.
    let (status, body) = relay.attest(other.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let refused = relay.ask(Kind::KeyRelease, &body);
    assert!(
        error_of(&refused).contains("not signed by a pinned keyserver"),
        "{}",
        error_of(&refused)
    );
    let (status, body) = relay.attest(ks.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let release: KeyRelease = serde_json::from_slice(&body).unwrap();
    assert_eq!(release.keys.len(), 3, "model key, request key, receipt key");

    let installed = relay.ask(Kind::KeyRelease, &body);
    assert_eq!(
        installed.kind,
        Kind::KeysInstalled,
        "{}",
        String::from_utf8_lossy(&installed.payload)
    );
    let installed: serde_json::Value = serde_json::from_slice(&installed.payload).unwrap();
    assert_eq!(installed["models"], serde_json::json!([MODEL_ID]));

    // The request key the keyserver publishes (signed by its identity) is the one
    // the loader now holds: the loader derived this key id from the unwrapped scalar.
    let (status, body) = http(ks.addr, "GET", "/v1/request-key", b"");
    assert_eq!(status, 200);
    let statement = serde_json::from_slice::<SignedRequestKey>(&body)
        .unwrap()
        .verify(&ks.identity)
        .unwrap();
    assert_eq!(
        installed["request_keys"],
        serde_json::json!([statement.key_id])
    );

    // A request sealed by a client to the published key runs, streams sealed
    // frames and ends with a receipt signed by the released receipt key.
    assert_eq!(hello["programs"][0]["name"], "echo");
    let canary = b"canary-7f3a9 confidential prompt";
    let request_key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let (sealed, mut opener) = cinfer_envelope::seal_request(&request_key, canary).unwrap();
    let submit = cinfer_channel::Submit {
        request_id: 42,
        program: "echo".into(),
        sealed: sealed.clone(),
    };
    cinfer_channel::write_frame(&mut relay.stream, Kind::Submit, &submit.encode(), MAX).unwrap();
    let mut frames = Vec::new();
    let done = loop {
        let f = relay.read();
        let (id, rest) = cinfer_channel::split_request_id(&f.payload).unwrap();
        assert_eq!(id, 42);
        match f.kind {
            Kind::Reply => frames.push(rest.to_vec()),
            Kind::Done => break rest.to_vec(),
            other => panic!("{other:?}: {}", String::from_utf8_lossy(rest)),
        }
    };
    let mut text = Vec::new();
    for f in &frames {
        if let cinfer_envelope::ReplyChunk::Data(d) = opener.open(f).unwrap() {
            text.extend_from_slice(&d);
        }
    }
    assert_eq!(text, canary);
    let receipt = serde_json::from_slice::<cinfer_attest::SignedReceipt>(&done)
        .unwrap()
        .verify(&statement.receipt_public_key)
        .unwrap();
    assert_eq!(receipt.outcome, "completed");
    assert_eq!(
        receipt.request_sha256,
        hex::encode(sha2::Sha256::digest(&sealed))
    );
    assert_eq!(
        receipt.reply_sha256,
        hex::encode(cinfer_attest::reply_digest(
            frames.iter().map(Vec::as_slice)
        ))
    );
    assert_eq!(receipt.reply_frames, frames.len() as u64);
    let echo = std::fs::read(root().join("target/programs/echo.wasm")).unwrap();
    assert_eq!(
        receipt.program_sha256,
        hex::encode(sha2::Sha256::digest(&echo))
    );
    // Programs the untrusted side stores and submits: admitted only as the policy says.
    let upload = |name: &str, file: &str| cinfer_channel::ProgramUpload {
        name: name.into(),
        component: std::fs::read(root().join("target/programs").join(file)).unwrap(),
        signatures: Vec::new(),
    };
    let admitted = relay.ask(
        Kind::Program,
        &upload("vector-ops", "vector-ops.wasm").encode(),
    );
    assert_eq!(
        admitted.kind,
        Kind::Admitted,
        "{}",
        String::from_utf8_lossy(&admitted.payload)
    );
    let info: serde_json::Value = serde_json::from_slice(&admitted.payload).unwrap();
    assert_eq!(
        (info["name"].as_str(), info["world"].as_str()),
        (Some("vector-ops"), Some("compute"))
    );
    let refused = relay.ask(
        Kind::Program,
        &upload("bomb", "fixtures/egress-bomb.wasm").encode(),
    );
    assert!(
        error_of(&refused).contains("is not listed in the policy"),
        "{}",
        error_of(&refused)
    );
    let signed_by_nobody = cinfer_channel::ProgramUpload {
        signatures: vec![b"MEUCIQDfake".to_vec()],
        ..upload("echo2", "echo.wasm")
    };
    let refused = relay.ask(Kind::Program, &signed_by_nobody.encode());
    assert!(
        error_of(&refused).contains("signature refused"),
        "{}",
        error_of(&refused)
    );
    assert!(error_of(&relay.ask(Kind::Program, b"\0\0")).contains("malformed Program frame"));
    // A refused upload is not served.
    let (sealed_bomb, _) = cinfer_envelope::seal_request(&request_key, b"x").unwrap();
    let s = cinfer_channel::Submit {
        request_id: 44,
        program: "bomb".into(),
        sealed: sealed_bomb,
    };
    let f = relay.ask(Kind::Submit, &s.encode());
    assert_eq!(f.kind, Kind::Refused);

    // The same sealed request again (a replay by the untrusted side) never runs twice.
    let replayed = cinfer_channel::Submit {
        request_id: 43,
        program: "echo".into(),
        sealed: sealed.clone(),
    };
    let f = relay.ask(Kind::Submit, &replayed.encode());
    assert_eq!(f.kind, Kind::Refused);
    let (id, why) = cinfer_channel::split_request_id(&f.payload).unwrap();
    assert_eq!(id, 43);
    assert!(
        String::from_utf8_lossy(why).contains("replayed request"),
        "{}",
        String::from_utf8_lossy(why)
    );
    // Unknown programs and requests sealed to another key are refused, not run.
    for (program, key) in [
        ("nope", request_key.clone()),
        (
            "echo",
            cinfer_envelope::RequestPrivateKey::generate()
                .public_key()
                .clone(),
        ),
    ] {
        let (sealed, _) = cinfer_envelope::seal_request(&key, b"x").unwrap();
        let s = cinfer_channel::Submit {
            request_id: 7,
            program: program.into(),
            sealed,
        };
        let f = relay.ask(Kind::Submit, &s.encode());
        assert_eq!(f.kind, Kind::Refused);
        let (_, why) = cinfer_channel::split_request_id(&f.payload).unwrap();
        let why = String::from_utf8_lossy(why);
        assert!(
            why.contains("unknown program") || why.contains("no request key"),
            "{why}"
        );
    }

    // The relay saw only wrapped keys, sealed requests and sealed replies.
    assert!(
        !relay.seen.windows(canary.len()).any(|w| w == canary),
        "canary in clear"
    );
    let seen = relay.seen.clone();
    assert!(
        !seen.windows(32).any(|w| w == MODEL_KEY),
        "model key in clear"
    );
    assert!(
        !String::from_utf8_lossy(&seen).contains(&hex::encode(MODEL_KEY)),
        "model key in hex"
    );

    // Replaying the same release: the attestation's key was used once.
    let replay = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&release).unwrap());
    assert!(error_of(&replay).contains("without a pending attestation"));
    // A release tampered in transit fails the keyserver's signature, and installs nothing.
    let (status, body) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let mut tampered: KeyRelease = serde_json::from_slice(&body).unwrap();
    tampered.keys[0].ciphertext[0] ^= 1;
    let refused = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&tampered).unwrap());
    assert!(
        error_of(&refused).contains("not signed by a pinned keyserver")
            && error_of(&refused).contains("signature does not verify"),
        "{}",
        error_of(&refused)
    );
    // Frames the loader never accepts, and a nonce of the wrong size.
    assert!(error_of(&relay.ask(Kind::Evidence, b"{}")).contains("unexpected Evidence frame"));
    assert!(error_of(&relay.ask(Kind::AttestRequest, &[0; 8])).contains("nonce of 8 bytes"));

    // An oversized frame closes that connection only; the loader serves the next.
    // (One peer at a time: the relay hangs up first.)
    drop(relay);
    let (mut raw, _) = Relay::connect(loader.1);
    raw.stream
        .write_all(&[1, 2, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let mut rest = Vec::new();
    let _ = raw.stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing answered to an oversized frame");
    let (mut again, _) = Relay::connect(loader.1);
    let (status, _) = again.attest(ks.addr);
    assert_eq!(status, 200, "the loader still attests after a bad peer");
    drop(again);
    // SIGTERM: a graceful shutdown (drain, then exit 0), not death by signal.
    let mut loader = loader;
    let term = Command::new("kill")
        .args(["-TERM", &loader.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = loader.0.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    drop(loader);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loader_with_a_changed_policy_is_refused() {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("changed");
    let config = loader_dir(&dir, &swtpm.tcti(), "", &[]);
    let refs = reference_values(&config, &swtpm.tcti());
    keyserver_state(&dir, "ks");
    let ks = keyserver(&dir, "ks", refs);
    // Same binary and TPM, one more line in the policy file.
    let changed = loader_dir(&dir, &swtpm.tcti(), "\n# one more line\n", &[]);
    let loader = serve(&changed);
    let (mut relay, _) = Relay::connect(loader.1);
    let (status, body) = relay.attest(ks.addr);
    let reason = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 403, "{reason}");
    assert!(
        reason.contains("policy") && reason.contains("not allowed"),
        "{reason}"
    );
    drop(relay);
    drop(loader);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The request-key statement `ks` publishes, verified.
fn statement_of(ks: &KeyServer) -> cinfer_attest::RequestKeyStatement {
    let (status, body) = http(ks.addr, "GET", "/v1/request-key", b"");
    assert_eq!(status, 200);
    serde_json::from_slice::<SignedRequestKey>(&body)
        .unwrap()
        .verify(&ks.identity)
        .unwrap()
}

/// One test's world: a swtpm, the keyserver `ks` (state in `dir`) and a loader
/// pinning it, serving `dir/loader.toml` (the dev policy plus `policy_suffix`,
/// then `edit(dir, config)`), with a relay connected. Drop removes `dir`.
struct World {
    relay: Relay,
    ks: KeyServer,
    dir: PathBuf,
    _loader: Served,
    _swtpm: cinfer_tpm::swtpm::Swtpm,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn world(name: &str, policy_suffix: &str, edit: impl FnOnce(&Path, &Path)) -> World {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch(name);
    let pinned = keyserver_state(&dir, "ks");
    let config = loader_dir(&dir, &swtpm.tcti(), policy_suffix, &[&pinned]);
    edit(&dir, &config);
    let refs = reference_values(&config, &swtpm.tcti());
    let ks = keyserver(&dir, "ks", refs);
    let loader = serve(&config);
    let (relay, _) = Relay::connect(loader.1);
    World {
        relay,
        ks,
        dir,
        _loader: loader,
        _swtpm: swtpm,
    }
}

/// Asserts the request key `ks` publishes is not installed: a request sealed
/// to it is refused for that reason.
fn assert_request_key_not_installed(relay: &mut Relay, ks: &KeyServer) {
    let statement = statement_of(ks);
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let (sealed, _) = cinfer_envelope::seal_request(&key, b"hello").unwrap();
    let why = relay.submit_refused("echo", sealed);
    assert!(
        why.contains(&format!("no request key {}", statement.key_id)),
        "{why}"
    );
}

/// Seals `prompt` to the request key `ks` publishes (bound to the component
/// `bind` when given), submits it to echo and returns the echoed text and the
/// signed receipt (unverified), with the keyserver's statement.
fn echo_through(
    relay: &mut Relay,
    ks: &KeyServer,
    request_id: u64,
    prompt: &[u8],
    bind: Option<[u8; 32]>,
) -> (
    Vec<u8>,
    cinfer_attest::SignedReceipt,
    cinfer_attest::RequestKeyStatement,
) {
    let statement = statement_of(ks);
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let (sealed, mut opener) = match bind {
        Some(d) => cinfer_envelope::seal_request_for_program(&key, &d, prompt),
        None => cinfer_envelope::seal_request(&key, prompt),
    }
    .unwrap();
    let submit = cinfer_channel::Submit {
        request_id,
        program: "echo".into(),
        sealed,
    };
    cinfer_channel::write_frame(&mut relay.stream, Kind::Submit, &submit.encode(), MAX).unwrap();
    let mut text = Vec::new();
    loop {
        let f = relay.read();
        let (id, rest) = cinfer_channel::split_request_id(&f.payload).unwrap();
        assert_eq!(id, request_id);
        match f.kind {
            Kind::Reply => {
                if let cinfer_envelope::ReplyChunk::Data(d) = opener.open(rest).unwrap() {
                    text.extend_from_slice(&d);
                }
            }
            Kind::Done => {
                let receipt = serde_json::from_slice(rest).unwrap();
                return (text, receipt, statement);
            }
            other => panic!("{other:?}: {}", String::from_utf8_lossy(rest)),
        }
    }
}

/// A loader pinning two keyservers holds both request keys; each request's
/// receipt is signed with the receipt key released by the keyserver whose
/// request key opened it, so each keyserver's clients verify their receipts
/// (and a receipt does not verify under the other keyserver's key).
#[test]
fn each_keyservers_clients_get_receipts_signed_by_that_keyservers_receipt_key() {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("two-keyservers");
    let a = keyserver_state(&dir, "ks-a");
    let b = keyserver_state(&dir, "ks-b");
    let config = loader_dir(&dir, &swtpm.tcti(), "", &[&a, &b]);
    let refs = reference_values(&config, &swtpm.tcti());
    let (ks_a, ks_b) = (
        keyserver(&dir, "ks-a", refs.clone()),
        keyserver(&dir, "ks-b", refs),
    );
    let loader = serve(&config);
    let (mut relay, _) = Relay::connect(loader.1);
    relay.attest_and_install(&ks_a);
    relay.attest_and_install(&ks_b);
    let (text_a, receipt_a, statement_a) = echo_through(&mut relay, &ks_a, 1, b"for a", None);
    let (text_b, receipt_b, statement_b) = echo_through(&mut relay, &ks_b, 2, b"for b", None);
    assert_eq!((&text_a[..], &text_b[..]), (&b"for a"[..], &b"for b"[..]));
    assert_ne!(
        statement_a.receipt_public_key,
        statement_b.receipt_public_key
    );
    // The receipt key installed last (b's) must not sign a's receipts.
    receipt_a.verify(&statement_a.receipt_public_key).unwrap();
    receipt_b.verify(&statement_b.receipt_public_key).unwrap();
    assert!(receipt_a.verify(&statement_b.receipt_public_key).is_err());
    assert!(receipt_b.verify(&statement_a.receipt_public_key).is_err());

    // A request bound to echo's component runs on echo; one bound to another
    // component is refused before it is opened, with the reason.
    let echo: [u8; 32] =
        sha2::Sha256::digest(std::fs::read(root().join("target/programs/echo.wasm")).unwrap())
            .into();
    let (text, receipt, statement) = echo_through(&mut relay, &ks_a, 3, b"bound", Some(echo));
    assert_eq!(text, b"bound");
    let receipt = receipt.verify(&statement.receipt_public_key).unwrap();
    assert_eq!(receipt.program_sha256, hex::encode(echo));
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement_a.public_key).unwrap();
    let (sealed, _) = cinfer_envelope::seal_request_for_program(&key, &[0x42; 32], b"x").unwrap();
    assert_eq!(
        relay.submit_refused("echo", sealed),
        format!(
            "the request is bound to program sha256 {}, not to \"echo\" (sha256 {})",
            "42".repeat(32),
            hex::encode(echo)
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A release is installed all or nothing: when its model key does not open the
/// configured sealed model, the loader answers with the reason and installs
/// none of its keys — a request sealed to the released request key is refused.
#[test]
fn a_release_whose_model_key_fails_installs_no_key() {
    let World { relay, ks, .. } = &mut world("all-or-nothing", "", |dir, config| {
        // The model file is sealed under another key than the keyserver holds.
        let other_key = cinfer_sealed_model::ModelKey::from_bytes(&[0x11; 32]).unwrap();
        let sealed =
            cinfer_sealed_model::seal_bytes(&other_key, MODEL_ID, "k", 4096, b"not the key")
                .unwrap();
        std::fs::write(dir.join("model.sealed"), sealed).unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        text.push_str(&format!(
            "[[model]]\nid = \"{MODEL_ID}\"\npath = \"model.sealed\"\n"
        ));
        std::fs::write(config, text).unwrap();
    });
    let (status, body) = relay.attest(ks.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer = relay.ask(Kind::KeyRelease, &body);
    let why = error_of(&answer);
    assert!(why.contains(MODEL_ID), "{why}");
    // The request key of that release was not installed.
    assert_request_key_not_installed(relay, ks);
}

/// The peer cancels a running request (its client went away): the run stops
/// within milliseconds, long before its deadline, and ends as usual with the
/// sealed final frame and a receipt whose outcome is `cancelled`. A malformed
/// Cancel is answered with an error.
#[test]
fn a_cancelled_request_stops_long_before_its_deadline() {
    let op_loop = std::fs::read(root().join("target/programs/op-loop.wasm")).unwrap();
    let suffix = format!(
        "\n[[program]]\nname = \"op-loop\"\nsha256 = \"{}\"\nworld = \"compute\"\nlimits = {{ deadline-ms = 60000 }}\n",
        hex::encode(sha2::Sha256::digest(&op_loop))
    );
    let World { relay, ks, .. } = &mut world("cancel", &suffix, |_, _| {});
    relay.attest_and_install(ks);
    let upload = cinfer_channel::ProgramUpload {
        name: "op-loop".into(),
        component: op_loop,
        signatures: Vec::new(),
    };
    let admitted = relay.ask(Kind::Program, &upload.encode());
    assert_eq!(
        admitted.kind,
        Kind::Admitted,
        "{}",
        String::from_utf8_lossy(&admitted.payload)
    );

    let bad = relay.ask(Kind::Cancel, b"abc");
    assert_eq!(error_of(&bad), "malformed Cancel frame");

    // About four billion accelerator ops: far longer than the 60 s deadline.
    let statement = statement_of(ks);
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let (sealed, mut opener) = cinfer_envelope::seal_request(&key, b"4000000000").unwrap();
    let submit = cinfer_channel::Submit {
        request_id: 5,
        program: "op-loop".into(),
        sealed,
    };
    let started = std::time::Instant::now();
    cinfer_channel::write_frame(&mut relay.stream, Kind::Submit, &submit.encode(), MAX).unwrap();
    // A second request under the id of the running one is refused (replies
    // and Cancels could not tell the two apart).
    let (other, _) = cinfer_envelope::seal_request(&key, b"1").unwrap();
    let again = cinfer_channel::Submit {
        request_id: 5,
        program: "op-loop".into(),
        sealed: other,
    };
    let refused = relay.ask(Kind::Submit, &again.encode());
    assert_eq!(refused.kind, Kind::Refused);
    let (id, why) = cinfer_channel::split_request_id(&refused.payload).unwrap();
    assert_eq!(id, 5);
    assert!(
        String::from_utf8_lossy(why).contains("request id 5 is already running"),
        "{}",
        String::from_utf8_lossy(why)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    cinfer_channel::write_frame(&mut relay.stream, Kind::Cancel, &5u64.to_be_bytes(), MAX).unwrap();
    let done = loop {
        let f = relay.read();
        let (id, rest) = cinfer_channel::split_request_id(&f.payload).unwrap();
        assert_eq!(id, 5);
        match f.kind {
            Kind::Reply => {
                opener.open(rest).unwrap();
            }
            Kind::Done => break rest.to_vec(),
            other => panic!("{other:?}: {}", String::from_utf8_lossy(rest)),
        }
    };
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_secs(10),
        "stopped after {elapsed:?}"
    );
    assert_eq!(
        opener.finish().unwrap(),
        cinfer_envelope::ReplyStatus::Aborted
    );
    let receipt = serde_json::from_slice::<cinfer_attest::SignedReceipt>(&done)
        .unwrap()
        .verify(&statement.receipt_public_key)
        .unwrap();
    assert_eq!(receipt.outcome, "cancelled");
    // A Cancel for a request no longer running changes nothing.
    cinfer_channel::write_frame(&mut relay.stream, Kind::Cancel, &5u64.to_be_bytes(), MAX).unwrap();
    let (echoed, _, _) = echo_through(relay, ks, 6, b"still serving", None);
    assert_eq!(echoed, b"still serving");
}

/// A release (signed by a pinned keyserver) that carries a request key but no
/// receipt key is refused with the reason and installs nothing: requests
/// under that key could not get a receipt its clients verify.
#[test]
fn a_release_without_a_receipt_key_is_refused_and_installs_nothing() {
    let World { relay, ks, dir, .. } = &mut world("no-receipt-key", "", |_, _| {});
    let (status, body) = relay.attest(ks.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The keyserver's own release, its receipt key taken out and re-signed
    // with the keyserver's identity (so only the missing key is wrong).
    let mut release: KeyRelease = serde_json::from_slice(&body).unwrap();
    release
        .keys
        .retain(|k| k.kind != cinfer_attest::ReleasedKeyKind::Receipt);
    let identity = cinfer_keyserver::StateDir::open(&dir.join("ks"), &dir.join("ks.kek"))
        .unwrap()
        .load()
        .unwrap()
        .identity;
    release.sign(&identity);
    let answer = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&release).unwrap());
    let why = error_of(&answer);
    assert!(why.contains("request keys without a receipt key"), "{why}");
    assert_request_key_not_installed(relay, ks);
}

/// A release that does not parse, or has another format version, is refused
/// with that reason before anything is spent: the attestation stays pending
/// and the keyserver's real release still installs afterwards.
#[test]
fn malformed_and_other_version_releases_are_refused_and_spend_nothing() {
    let World { relay, ks, .. } = &mut world("malformed-release", "", |_, _| {});
    let (status, body) = relay.attest(ks.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let why = error_of(&relay.ask(Kind::KeyRelease, b"{\"version\": 1, \"keys\": "));
    assert!(why.starts_with("malformed key release:"), "{why}");
    let mut other: serde_json::Value = serde_json::from_slice(&body).unwrap();
    other["version"] = serde_json::json!(99);
    let why = error_of(&relay.ask(Kind::KeyRelease, &serde_json::to_vec(&other).unwrap()));
    assert!(
        why.contains(&format!(
            "key release of version 99 (this loader reads {})",
            cinfer_attest::KEY_RELEASE_VERSION
        )),
        "{why}"
    );
    assert_request_key_not_installed(relay, ks);
    let installed = relay.ask(Kind::KeyRelease, &body);
    assert_eq!(
        installed.kind,
        Kind::KeysInstalled,
        "{}",
        String::from_utf8_lossy(&installed.payload)
    );
}

/// Replay protection cannot be flushed: a flood of junk Submits copying a real
/// request's header (more than the loader remembers) takes no place in its
/// replay window, because only requests whose envelope opened are recorded;
/// the captured request is still refused as a replay afterwards. Requests
/// sealed outside the window, or without a seal time, are refused with the
/// reason before they are opened.
#[test]
fn a_flood_of_junk_with_a_copied_header_does_not_flush_replay_protection() {
    let World { relay, ks, .. } = &mut world("replay-flood", "", |_, _| {});
    relay.attest_and_install(ks);
    let statement = statement_of(ks);
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let (sealed, _) = cinfer_envelope::seal_request(&key, b"captured").unwrap();
    let run = |relay: &mut Relay, request_id: u64| -> Frame {
        let submit = cinfer_channel::Submit {
            request_id,
            program: "echo".into(),
            sealed: sealed.clone(),
        };
        cinfer_channel::write_frame(&mut relay.stream, Kind::Submit, &submit.encode(), MAX)
            .unwrap();
        loop {
            let f = relay.read();
            let (id, _) = cinfer_channel::split_request_id(&f.payload).unwrap();
            if id == request_id && f.kind != Kind::Reply {
                return f;
            }
        }
    };
    assert_eq!(run(relay, 1).kind, Kind::Done);

    // The flood: the real header and encapsulated key, junk after them, more
    // Submits than the loader could ever remember, paced below the loader's
    // in-flight limit so that every one reaches the envelope (none is refused
    // as busy).
    let header_len = 1 + 6 + 1 + statement.key_id.len() + 8;
    let prefix = sealed[..header_len + cinfer_envelope::ENC_LEN].to_vec();
    const FLOOD: u64 = (1 << 16) + 4096;
    const AHEAD: u64 = 4;
    let (mut sent, mut refused) = (0u64, 0u64);
    while refused < FLOOD {
        while sent < FLOOD && sent - refused < AHEAD {
            let mut junk = prefix.clone();
            junk.extend_from_slice(&sent.to_be_bytes());
            junk.extend_from_slice(&[0u8; cinfer_envelope::TAG_LEN]);
            let submit = cinfer_channel::Submit {
                request_id: 1_000_000 + sent,
                program: "echo".into(),
                sealed: junk,
            };
            cinfer_channel::write_frame(&mut relay.stream, Kind::Submit, &submit.encode(), MAX)
                .unwrap();
            sent += 1;
        }
        let f = cinfer_channel::read_frame(&mut relay.stream, MAX)
            .unwrap()
            .expect("a frame");
        assert_eq!(f.kind, Kind::Refused);
        let (_, why) = cinfer_channel::split_request_id(&f.payload).unwrap();
        assert!(
            String::from_utf8_lossy(why).contains("authentication failed"),
            "{}",
            String::from_utf8_lossy(why)
        );
        refused += 1;
    }

    // The captured request replayed: refused, with the reason.
    let f = run(relay, 2);
    assert_eq!(
        f.kind,
        Kind::Refused,
        "the captured request ran again after the flood"
    );
    let (_, why) = cinfer_channel::split_request_id(&f.payload).unwrap();
    let why: serde_json::Value = serde_json::from_slice(why).unwrap();
    assert_eq!(
        why["error"].as_str().unwrap(),
        "replayed request: this sealed request was already run"
    );

    // Outside the window (default: 300 s back, 5 s ahead), or untimed: refused
    // with the reason, before opening.
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let (old, _) = cinfer_envelope::seal_request_at(&key, None, now_ms - 301_000, b"x").unwrap();
    let why = relay.submit_refused("echo", old);
    assert!(
        why.contains("before this loader started") || why.contains("older than the replay window"),
        "{why}"
    );
    let (future, _) = cinfer_envelope::seal_request_at(&key, None, now_ms + 60_000, b"x").unwrap();
    let why = relay.submit_refused("echo", future);
    assert!(
        why.contains("in the future (allowed clock skew 5s)"),
        "{why}"
    );
    let mut untimed = sealed.clone();
    untimed[0] = cinfer_envelope::REQUEST_VERSION;
    untimed.drain(header_len - 8..header_len);
    let why = relay.submit_refused("echo", untimed);
    assert!(why.contains("carries no seal time"), "{why}");
}

// ------------------------------------------------ the channel's peer (issue 16, bug 7)

/// Writes loader.toml for the peer tests: no keyserver, the peer timeouts given.
fn peer_loader(dir: &Path, tcti: &str, auth_ms: u64, idle_ms: u64) -> PathBuf {
    let config = loader_dir(dir, tcti, "", &[]);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "peer-auth-timeout-ms = 5000",
            &format!("peer-auth-timeout-ms = {auth_ms}"),
        )
        .replace(
            "peer-idle-timeout-ms = 60000",
            &format!("peer-idle-timeout-ms = {idle_ms}"),
        );
    std::fs::write(&config, text).unwrap();
    config
}

/// A peer is served only after it signs this connection's challenge with a
/// key the loader's configuration lists. One that says nothing, speaks first,
/// signs with another key or replays an old signature is told why, dropped
/// and logged; the next connection (the real server) is served.
#[test]
fn peers_that_do_not_authenticate_are_dropped_with_the_reason_and_the_next_is_served() {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("peer-auth");
    let loader = serve(&peer_loader(&dir, &swtpm.tcti(), 500, 60_000));

    // Silent: dropped after the auth timeout.
    let started = std::time::Instant::now();
    let (mut silent, hello) = Relay::connect_unauthenticated(loader.1);
    assert_eq!(hello["challenge"].as_str().map(str::len), Some(64));
    assert_eq!(hello["idle_timeout_ms"], 60_000);
    assert_eq!(
        silent.dropped_because(),
        "peer dropped: no Auth frame within 500 ms of Hello (peer-auth-timeout-ms)"
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
    loader.wait_log("no Auth frame within 500 ms");

    // Speaks before authenticating.
    let (mut eager, _) = Relay::connect_unauthenticated(loader.1);
    let s = cinfer_channel::Submit {
        request_id: 1,
        program: "echo".into(),
        sealed: vec![1, 2, 3],
    };
    cinfer_channel::write_frame(&mut eager.stream, Kind::Submit, &s.encode(), MAX).unwrap();
    assert_eq!(
        eager.dropped_because(),
        "peer dropped: the first frame is Submit, not Auth: this loader serves only authenticated peers"
    );

    // Another key.
    let stranger = SigningKey::from_slice(&[0x77; 32]).unwrap();
    let (mut other, hello) = Relay::connect_unauthenticated(loader.1);
    let challenge = hex::decode(hello["challenge"].as_str().unwrap()).unwrap();
    cinfer_channel::write_frame(
        &mut other.stream,
        Kind::Auth,
        &auth_payload(&stranger, &challenge),
        MAX,
    )
    .unwrap();
    let fingerprint = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(public_sec1(&stranger)))
    );
    assert_eq!(
        other.dropped_because(),
        format!("peer dropped: key {fingerprint} is not one of this loader's server-keys")
    );
    loader.wait_log(&fingerprint);

    // The right key, but a signature over an earlier connection's challenge.
    let (mut replayer, _) = Relay::connect_unauthenticated(loader.1);
    cinfer_channel::write_frame(
        &mut replayer.stream,
        Kind::Auth,
        &auth_payload(&server_key(), &challenge),
        MAX,
    )
    .unwrap();
    assert!(replayer.dropped_because().starts_with(
        "peer dropped: the signature over the challenge does not verify under key sha256:"
    ));

    // The server with its key is served.
    let (mut server, hello) = Relay::connect(loader.1);
    assert_eq!(hello["programs"][0]["name"], "echo");
    let f = server.ask(Kind::AttestRequest, &[0; 8]);
    assert!(
        error_of(&f).contains("nonce of 8 bytes"),
        "{}",
        error_of(&f)
    );
    drop(server);
    drop(loader);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An authenticated peer that sends no complete frame within the idle
/// timeout — silent, or trickling one frame byte by byte — is dropped with the
/// reason; one that pings stays, and the next peer is served after a drop.
#[test]
fn idle_peers_are_dropped_and_pinging_peers_stay() {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("peer-idle");
    let loader = serve(&peer_loader(&dir, &swtpm.tcti(), 5_000, 700));
    let why = "peer dropped: no complete frame within 700 ms (peer-idle-timeout-ms)";

    let (mut silent, hello) = Relay::connect(loader.1);
    assert_eq!(hello["idle_timeout_ms"], 700);
    let started = std::time::Instant::now();
    assert_eq!(silent.dropped_because(), why);
    assert!(started.elapsed() >= std::time::Duration::from_millis(700));
    loader.wait_log("no complete frame within 700 ms");

    // A frame trickled a byte every 100 ms never completes in time.
    let (mut trickler, _) = Relay::connect(loader.1);
    let frame = cinfer_channel::encode(Kind::AttestRequest, &[0; 32], MAX).unwrap();
    let mut writer = trickler.stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in frame {
            if writer.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    assert_eq!(trickler.dropped_because(), why);
    trickle.join().unwrap();

    // Pings every 200 ms keep a peer for three idle timeouts; it is then
    // still served.
    let (mut pinger, _) = Relay::connect(loader.1);
    for _ in 0..10 {
        cinfer_channel::write_frame(&mut pinger.stream, Kind::Ping, b"", MAX).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let f = pinger.ask(Kind::AttestRequest, &[0; 8]);
    assert!(
        error_of(&f).contains("nonce of 8 bytes"),
        "{}",
        error_of(&f)
    );
    drop(pinger);
    drop(loader);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Programs a peer uploads are served while it is connected only: a name it
/// took over (a configured one) serves the configured program again, and a
/// name it added is unknown, once it leaves.
#[test]
fn a_peers_program_uploads_leave_with_it() {
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("peer-uploads");
    let loader = serve(&peer_loader(&dir, &swtpm.tcti(), 5_000, 60_000));
    let programs = root().join("target/programs");
    let echo = hex::encode(sha2::Sha256::digest(
        std::fs::read(programs.join("echo.wasm")).unwrap(),
    ));
    let vector_ops = std::fs::read(programs.join("vector-ops.wasm")).unwrap();
    let vector_ops_sha = hex::encode(sha2::Sha256::digest(&vector_ops));
    let upload = |name: &str| cinfer_channel::ProgramUpload {
        name: name.into(),
        component: vector_ops.clone(),
        signatures: Vec::new(),
    };
    let submit_to = |relay: &mut Relay, program: &str| {
        let (sealed, _) = cinfer_envelope::seal_request(
            cinfer_envelope::RequestPrivateKey::generate().public_key(),
            b"x",
        )
        .unwrap();
        relay.submit_refused(program, sealed)
    };

    let (mut first, hello) = Relay::connect(loader.1);
    assert_eq!(hello["programs"][0]["sha256"], echo.as_str());
    for name in ["echo", "vops"] {
        let f = first.ask(Kind::Program, &upload(name).encode());
        assert_eq!(
            f.kind,
            Kind::Admitted,
            "{}",
            String::from_utf8_lossy(&f.payload)
        );
    }
    // While it is connected its uploads are served (the request is refused
    // only for its key: no keys were released here).
    assert!(submit_to(&mut first, "vops").starts_with("no request key"));
    drop(first);

    let (mut next, hello) = Relay::connect(loader.1);
    let listed: Vec<(String, String)> = hello["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(listed, [("echo".to_owned(), echo.clone())]);
    assert_ne!(echo, vector_ops_sha);
    assert_eq!(submit_to(&mut next, "vops"), "unknown program \"vops\"");
    drop(next);
    drop(loader);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without `server-keys`, `serve` (and the measurement operators compute
/// reference values with) refuse the configuration unless it says
/// `allow-unauthenticated-peers = true`; naming both is refused too.
#[test]
fn serve_refuses_a_configuration_without_server_keys() {
    let dir = scratch("no-server-keys");
    let config = loader_dir(&dir, "swtpm:host=127.0.0.1,port=1", "", &[]);
    let text = std::fs::read_to_string(&config).unwrap();
    let keys_line = text
        .lines()
        .find(|l| l.starts_with("server-keys"))
        .unwrap()
        .to_owned();
    let measure = |text: &str| {
        std::fs::write(&config, text).unwrap();
        cinfer_host::measure::measure(&config, b"loader binary").map(|_| ())
    };
    let without = text.replace(&keys_line, "");
    std::fs::write(&config, &without).unwrap();
    let out = Command::new(loader_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server-keys: no inference server key is configured"),
        "{stderr}"
    );
    let err = measure(&without).unwrap_err().to_string();
    assert!(
        err.contains("server-keys: no inference server key is configured"),
        "{err}"
    );
    let both = text.replace(
        &keys_line,
        &format!("{keys_line}\nallow-unauthenticated-peers = true"),
    );
    let err = measure(&both).unwrap_err().to_string();
    assert!(err.contains("contradict each other"), "{err}");
    let dev = text.replace(&keys_line, "allow-unauthenticated-peers = true");
    measure(&dev).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An endorsed TPM (EK certificate from a local CA), a keyserver that pins no
/// AK and requires endorsement by that CA, and a loader pinning `pinned`
/// keyservers (the keyserver's identity when `pin`), with a relay connected.
struct EndorsedWorld {
    relay: Relay,
    ks: KeyServer,
    dir: PathBuf,
    _loader: Served,
    _swtpm: cinfer_tpm::swtpm::Swtpm,
    _ca: cinfer_tpm::swtpm::LocalCa,
}

impl Drop for EndorsedWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn endorsed_world(name: &str, pin: bool) -> EndorsedWorld {
    let ca = cinfer_tpm::swtpm::LocalCa::new().unwrap();
    let swtpm = cinfer_tpm::swtpm::Swtpm::start_endorsed(&ca)
        .expect("swtpm, swtpm_setup and swtpm_localca (scripts/setup installs them)");
    let dir = scratch(name);
    let identity = keyserver_state(&dir, "ks");
    let pinned: Vec<&[u8]> = if pin { vec![&identity] } else { vec![] };
    let config = loader_dir(&dir, &swtpm.tcti(), "", &pinned);
    let mut refs = reference_values(&config, &swtpm.tcti());
    // No pinned AK: the keyserver trusts the TPM's manufacturer (the local CA).
    refs.trusted_aks.clear();
    let ks = keyserver_with(&dir, "ks", refs, |c| {
        c.endorsement = cinfer_keyserver::EndorsementPolicy {
            ek_ca_certs: vec![ca.root_cert()],
            ek_intermediate_certs: vec![ca.intermediate_cert()],
            required: true,
        };
    });
    let loader = serve(&config);
    let (relay, _) = Relay::connect(loader.1);
    EndorsedWorld {
        relay,
        ks,
        dir,
        _loader: loader,
        _swtpm: swtpm,
        _ca: ca,
    }
}

#[test]
fn an_endorsed_loader_gets_its_keys_with_no_pinned_ak_and_refuses_replayed_answers() {
    let EndorsedWorld { relay, ks, .. } = &mut endorsed_world("endorsed", true);
    let (status, first) = relay.attest(ks.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&first));
    let release: KeyRelease = serde_json::from_slice(&first).unwrap();
    assert!(release.credential.is_some(), "released under a credential");
    let installed = relay.ask(Kind::KeyRelease, &first);
    assert_eq!(
        installed.kind,
        Kind::KeysInstalled,
        "{}",
        String::from_utf8_lossy(&installed.payload)
    );
    let statement = statement_of(ks);
    let installed: serde_json::Value = serde_json::from_slice(&installed.payload).unwrap();
    assert_eq!(installed["request_keys"][0], statement.key_id);
    assert_eq!(installed["models"][0], MODEL_ID);

    // The same answer again: no attestation is waiting for it.
    let answer = relay.ask(Kind::KeyRelease, &first);
    assert_eq!(
        error_of(&answer),
        "key release without a pending attestation (each attestation's key is used once)"
    );
    // A new attestation answered with the old release: another nonce.
    let (status, second) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let answer = relay.ask(Kind::KeyRelease, &first);
    assert_eq!(
        error_of(&answer),
        "key release answers another nonce than the pending attestation"
    );
    // The new release with the old credential spliced in: the pinned
    // keyserver's signature covers the credential.
    let (status, third) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let mut spliced: KeyRelease = serde_json::from_slice(&third).unwrap();
    spliced.credential = release.credential.clone();
    let answer = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&spliced).unwrap());
    assert!(
        error_of(&answer).contains("not signed by a pinned keyserver"),
        "{}",
        error_of(&answer)
    );
    drop(second);
}

#[test]
fn a_loader_pinning_no_keyserver_refuses_a_credential_of_another_attestation() {
    let EndorsedWorld { relay, ks, .. } = &mut endorsed_world("endorsed-unpinned", false);
    let (status, first) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let first: KeyRelease = serde_json::from_slice(&first).unwrap();
    // (The loader never saw the first release: its attestation stays pending
    // until the next one replaces it.)
    let (status, second) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let mut spliced: KeyRelease = serde_json::from_slice(&second).unwrap();
    spliced.credential = first.credential.clone();
    let answer = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&spliced).unwrap());
    assert_eq!(
        error_of(&answer),
        "the TPM credential is not for this attestation (replayed or spliced in)"
    );
    // Without a credential the keys (wrapped under its secret) do not unwrap.
    let (status, third) = relay.attest(ks.addr);
    assert_eq!(status, 200);
    let mut stripped: KeyRelease = serde_json::from_slice(&third).unwrap();
    stripped.credential = None;
    let answer = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&stripped).unwrap());
    assert!(
        error_of(&answer).contains("does not unwrap"),
        "{}",
        error_of(&answer)
    );
    // The real answer to a fresh attestation is installed.
    relay.attest_and_install(ks);
}

/// Each configuration mistake is refused with its own typed reason, before
/// anything is measured or served.
#[test]
fn serve_configuration_refusals_are_typed() {
    use cinfer_host::serve::{ConfigError, ServeConfig, ServeError};
    let base = "listen = \"tcp:127.0.0.1:0\"\ntpm = \"swtpm:host=127.0.0.1,port=1\"\npolicy = \"dev.toml\"\nallow-unauthenticated-peers = true\n";
    ServeConfig::parse(base).unwrap_or_else(|e| panic!("{e}"));
    let refused = |extra: &str| match ServeConfig::parse(&format!("{base}{extra}")) {
        Err(ServeError::Config(e)) => e,
        other => panic!("{extra:?}: expected a configuration refusal, got {other:?}"),
    };
    assert!(matches!(
        refused("pcr = 23\nquote-pcrs = [0, 1]\n"),
        ConfigError::MeasuredPcrNotQuoted { pcr: 23, .. }
    ));
    assert!(matches!(
        refused("quote-pcrs = [0, 23, 24]\n"),
        ConfigError::NotAPcr(24)
    ));
    assert!(matches!(refused("bogus = 1\n"), ConfigError::Toml(m) if m.contains("bogus")));
    assert!(matches!(
        refused("keyservers = [\"00\"]\n"),
        ConfigError::BadKeyserverKey(k) if k == "00"
    ));
    assert!(matches!(
        refused("peer-idle-timeout-ms = 0\n"),
        ConfigError::ZeroPeerTimeout
    ));
    // k-of-n keyservers: a threshold needs that many distinct pinned keyservers.
    let ks = |b: u8| {
        let k = SigningKey::from_slice(&[b; 32]).unwrap();
        format!("\"{}\"", hex::encode(public_sec1(&k)))
    };
    assert!(matches!(
        refused(&format!(
            "keyservers = [{}, {}]\nkeyserver-threshold = 3\n",
            ks(1),
            ks(2)
        )),
        ConfigError::KeyserverThreshold {
            threshold: 3,
            pinned: 2
        }
    ));
    assert!(matches!(
        refused(&format!(
            "keyservers = [{}, {}]\nkeyserver-threshold = 2\n",
            ks(1),
            ks(1)
        )),
        ConfigError::KeyserverThreshold {
            threshold: 2,
            pinned: 1
        }
    ));
    assert!(matches!(
        refused("keyserver-threshold = 0\n"),
        ConfigError::KeyserverThreshold { threshold: 0, .. }
    ));
    ServeConfig::parse(&format!(
        "{base}keyservers = [{}, {}, {}]\nkeyserver-threshold = 2\n",
        ks(1),
        ks(2),
        ks(3)
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // The window of the thread-per-run batcher is gone with it.
    assert!(matches!(
        refused("batching-window-us = 500\n"),
        ConfigError::Toml(m) if m.contains("batching-window-us")
    ));
    let default = ServeConfig::parse(base).unwrap_or_else(|e| panic!("{e}"));
    assert!(default.batching, "batching is on by default");
    let off =
        ServeConfig::parse(&format!("{base}batching = false\n")).unwrap_or_else(|e| panic!("{e}"));
    assert!(!off.batching);
    let listen = ServeConfig::parse(&base.replace("tcp:127.0.0.1:0", "ftp:x"));
    assert!(
        matches!(listen, Err(ServeError::Config(ConfigError::Listen(_)))),
        "{listen:?}"
    );
    let no_keys = ServeConfig::parse(&base.replace("allow-unauthenticated-peers = true\n", ""));
    assert!(
        matches!(no_keys, Err(ServeError::Config(ConfigError::NoServerKeys))),
        "{no_keys:?}"
    );
    // Evidence kinds: a TPM, a TD quote provider, or both; never neither.
    let no_tpm = base.replace("tpm = \"swtpm:host=127.0.0.1,port=1\"\n", "");
    let nothing = ServeConfig::parse(&no_tpm);
    assert!(
        matches!(nothing, Err(ServeError::Config(ConfigError::NoEvidence))),
        "{nothing:?}"
    );
    let td_only = ServeConfig::parse(&format!("{no_tpm}[tdx]\n")).unwrap_or_else(|e| panic!("{e}"));
    assert!(td_only.tpm.is_none());
    let tdx = td_only.tdx.expect("[tdx]");
    assert_eq!(tdx.rtmr, 3);
    assert_eq!(
        tdx.report_dir,
        std::path::Path::new("/sys/kernel/config/tsm/report")
    );
    assert!(matches!(
        refused("[tdx]\nrtmr-index = 3\n"),
        ConfigError::Toml(m) if m.contains("rtmr-index")
    ));
}

/// A keyserver state holding only its identity (and the request key `init`
/// makes, which a keyserver with request-key shares never uses) plus the
/// share files given; returns its identity public key.
fn share_holder_state(dir: &Path, name: &str, files: &[&ShareFile]) -> Vec<u8> {
    let state = cinfer_keyserver::StateDir::init(&dir.join(name), &dir.join(format!("{name}.kek")))
        .unwrap();
    for f in files {
        state.add_share(&serde_json::to_vec(f).unwrap()).unwrap();
    }
    cinfer_keyserver::server::identity_public_key(&state.load().unwrap())
}

fn share_file(shares: Vec<ShareEntry>, request_key: Option<RequestKeyPublic>) -> ShareFile {
    ShareFile {
        format: cinfer_attest::shares::SHARE_FILE_FORMAT.into(),
        shares,
        request_key,
    }
}

/// Nonce from `ks` → evidence → `ks`'s release (status 200 asserted): the
/// release as JSON and the loader's HPKE key it is wrapped to.
fn release_from(relay: &mut Relay, ks: &KeyServer) -> (KeyRelease, Vec<u8>) {
    let (status, body) = http(ks.addr, "POST", "/v1/nonce", b"");
    assert_eq!(status, 200);
    let nonce: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let nonce = hex::decode(nonce["nonce"].as_str().unwrap()).unwrap();
    let evidence = relay.ask(Kind::AttestRequest, &nonce);
    let hpke = Evidence::from_json(&evidence.payload)
        .unwrap()
        .hpke_public_key;
    let (status, body) = http(ks.addr, "POST", "/v1/attest", &evidence.payload);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    (serde_json::from_slice(&body).unwrap(), hpke)
}

/// The identity key of the keyserver whose state `keyserver_state` or
/// `share_holder_state` made under `dir/name`.
fn keyserver_identity(dir: &Path, name: &str) -> SigningKey {
    cinfer_keyserver::StateDir::open(&dir.join(name), &dir.join(format!("{name}.kek")))
        .unwrap()
        .load()
        .unwrap()
        .identity
}

/// Replaces the model entry of `release` with `secret` wrapped to the
/// loader's HPKE key `hpke` under `context`, as a share of `split` or whole
/// (the caller signs the release again).
fn rewrap_model(
    release: &mut KeyRelease,
    hpke: &[u8],
    context: &[u8],
    secret: &[u8],
    split: Option<cinfer_attest::shares::SplitManifest>,
) {
    let recipient = cinfer_envelope::RequestPublicKey::from_bytes(hpke).unwrap();
    let wrapped =
        cinfer_envelope::keywrap::wrap_key(&recipient, context, &release.nonce, secret).unwrap();
    let entry = release
        .keys
        .iter_mut()
        .find(|k| k.kind == cinfer_attest::ReleasedKeyKind::Model)
        .unwrap();
    (entry.enc, entry.ciphertext, entry.split) = (wrapped.enc, wrapped.ciphertext, split);
}

/// k-of-n keyservers at the loader, with three real keyservers on loopback
/// holding shares of the model key and of one request key (2 of 3): one
/// keyserver's shares install nothing; a keyserver whose reference values
/// refuse the loader releases nothing (with its reason); a keyserver that
/// returns a wrong share is refused and named, and a whole key is refused;
/// the second honest keyserver completes the keys, and the receipt names the
/// two keyservers whose shares opened the request.
#[test]
fn two_of_three_keyservers_open_the_loader_and_a_wrong_share_is_named() {
    use cinfer_attest::ReleasedKeyKind as K;
    use cinfer_attest::shares::split;
    let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
    let dir = scratch("quorum");
    let request = cinfer_envelope::RequestPrivateKey::generate();
    let receipt = SigningKey::from_slice(&[0x33; 32]).unwrap();
    let key_id = request.public_key().key_id();
    let public = RequestKeyPublic {
        key_id: key_id.clone(),
        public_key: request.public_key().to_bytes(),
        receipt_public_key: public_sec1(&receipt).to_vec(),
    };
    let model = split(K::Model, MODEL_ID, &MODEL_KEY, 2, 3).unwrap();
    let requests = split(K::Request, &key_id, &request.to_bytes(), 2, 3).unwrap();
    let receipts = split(K::Receipt, &key_id, &receipt.to_bytes(), 2, 3).unwrap();
    let names = ["ks-a", "ks-b", "ks-c"];
    let ids: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            share_holder_state(
                &dir,
                names[i],
                &[
                    &share_file(vec![model[i].clone()], None),
                    &share_file(
                        vec![requests[i].clone(), receipts[i].clone()],
                        Some(public.clone()),
                    ),
                ],
            )
        })
        .collect();
    let config = loader_dir(
        &dir,
        &swtpm.tcti(),
        "",
        &ids.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[[program]]", "keyserver-threshold = 2\n[[program]]", 1),
    )
    .unwrap();
    let refs = reference_values(&config, &swtpm.tcti());
    let mut refuses = refs.clone();
    *refuses.pcrs.values_mut().next().unwrap() = [0xee; 32];
    let ks_a = keyserver(&dir, "ks-a", refs.clone());
    let ks_b = keyserver(&dir, "ks-b", refs.clone());
    let ks_c = keyserver(&dir, "ks-c", refuses);
    let loader = serve(&config);
    let (mut relay, _) = Relay::connect(loader.1);

    // Every keyserver states the split request key.
    for ks in [&ks_a, &ks_b, &ks_c] {
        let s = statement_of(ks);
        assert_eq!(
            (&s.key_id, &s.public_key, &s.receipt_public_key),
            (
                &public.key_id,
                &public.public_key,
                &public.receipt_public_key
            )
        );
    }

    // a's shares alone install nothing: the loader says what it waits for.
    let (status, body) = relay.attest(ks_a.addr);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let installed = relay.ask(Kind::KeyRelease, &body);
    assert_eq!(installed.kind, Kind::KeysInstalled);
    let installed: serde_json::Value = serde_json::from_slice(&installed.payload).unwrap();
    assert_eq!(installed["models"], serde_json::json!([]));
    assert_eq!(installed["request_keys"], serde_json::json!([]));
    let waiting = installed["waiting"].as_array().unwrap();
    assert_eq!(waiting.len(), 3, "{installed}");
    assert!(
        waiting.iter().all(|w| w["have"] == 1 && w["need"] == 2),
        "{installed}"
    );
    assert_request_key_not_installed(&mut relay, &ks_a);

    // c's reference values refuse this loader: nothing released, the reason given.
    let (status, body) = relay.attest(ks_c.addr);
    assert_eq!(status, 403);
    assert!(
        String::from_utf8_lossy(&body).contains("differs from its reference value"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // c, turned malicious, returns a wrong share of the model key (under the
    // right manifest, wrapped to the loader, signed with its identity key):
    // refused and named; the release installs nothing.
    let (mut forged, hpke) = release_from(&mut relay, &ks_b);
    let mut wrong = model[2].share.clone();
    wrong[7] ^= 0x40;
    let share = cinfer_attest::share_context(K::Model, MODEL_ID);
    rewrap_model(
        &mut forged,
        &hpke,
        &share,
        &wrong,
        Some(model[2].manifest.clone()),
    );
    forged.sign(&keyserver_identity(&dir, "ks-c"));
    let refused = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&forged).unwrap());
    let why = error_of(&refused);
    assert_eq!(
        why,
        format!(
            "the model share \"{MODEL_ID}\" from keyserver {} does not match its commitment",
            cinfer_attest::shares::keyserver_fingerprint(&ids[2])
        )
    );

    // A whole key released to this loader is refused, whoever signs it.
    let (mut whole, hpke) = release_from(&mut relay, &ks_b);
    let context = cinfer_attest::release_context(K::Model, MODEL_ID);
    rewrap_model(&mut whole, &hpke, &context, &MODEL_KEY, None);
    whole.sign(&keyserver_identity(&dir, "ks-b"));
    let refused = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&whole).unwrap());
    assert_eq!(
        error_of(&refused),
        format!(
            "released model key `{MODEL_ID}` is whole, but this loader takes keys only as shares of 2 keyservers"
        )
    );
    assert_request_key_not_installed(&mut relay, &ks_a);

    // Two shares of one key in a release, or a request key's share without
    // its receipt key's: refused with the reason, nothing kept.
    let (mut twice, _) = release_from(&mut relay, &ks_b);
    let model_entry = twice
        .keys
        .iter()
        .find(|k| k.kind == K::Model)
        .unwrap()
        .clone();
    twice.keys.push(model_entry);
    twice.sign(&keyserver_identity(&dir, "ks-b"));
    let refused = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&twice).unwrap());
    assert_eq!(
        error_of(&refused),
        format!("one key release carries two shares of the model key \"{MODEL_ID}\"")
    );
    let (mut unpaired, _) = release_from(&mut relay, &ks_b);
    unpaired.keys.retain(|k| k.kind != K::Receipt);
    unpaired.sign(&keyserver_identity(&dir, "ks-b"));
    let refused = relay.ask(Kind::KeyRelease, &serde_json::to_vec(&unpaired).unwrap());
    assert_eq!(
        error_of(&refused),
        "key release has request keys without a receipt key"
    );
    assert_request_key_not_installed(&mut relay, &ks_a);

    // b, honest, completes every key.
    let (status, body) = relay.attest(ks_b.addr);
    assert_eq!(status, 200);
    let installed = relay.ask(Kind::KeyRelease, &body);
    let installed: serde_json::Value = serde_json::from_slice(&installed.payload).unwrap();
    assert_eq!(installed["models"], serde_json::json!([MODEL_ID]));
    assert_eq!(installed["request_keys"], serde_json::json!([key_id]));
    assert!(installed.get("waiting").is_none(), "{installed}");

    let (text, signed, statement) = echo_through(&mut relay, &ks_b, 11, b"two of three", None);
    assert_eq!(text, b"two of three");
    let r = signed.verify(&statement.receipt_public_key).unwrap();
    assert_eq!(
        r.keyservers,
        vec![hex::encode(&ids[0]), hex::encode(&ids[1])]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
