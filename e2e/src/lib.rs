//! The whole system on loopback, started from the release binaries the workspace
//! builds (`trusted-loader`, `keyserver`, `inference-server`, `cinfer`), with a
//! software TPM, and with a **recording relay** on every link that touches the
//! untrusted side:
//!
//! ```text
//! client ──rec──▶ inference-server ──rec/hostile──▶ trusted-loader ── swtpm
//!                        └──────────rec──────────▶ keyserver
//! ```
//!
//! Everything the untrusted side sees — bytes in both directions on each of its
//! links, its log, its working directory — can then be searched for secrets. The
//! loader link relay can also turn hostile ([`Hostile`]) and tamper with, replay,
//! reorder or truncate the loader's frames, as a compromised server would.
#![forbid(unsafe_code)]
#![allow(clippy::expect_used)]

use cinfer_channel::{Frame, Kind};
use cinfer_tpm::swtpm::{output_guarded, spawn_guarded};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The model id served.
pub const MODEL_ID: &str = "smollm2-135m-instruct";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A release binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    let p = root().join("target/release").join(name);
    assert!(
        p.exists(),
        "{} missing: build the workspace (cargo build --release --bins)",
        p.display()
    );
    p
}

/// The SmolLM2 GGUF `scripts/fetch-model` downloads.
pub fn model_path() -> PathBuf {
    let p = std::env::var_os("CINFER_MODEL").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/cinfer/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-model",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = output_guarded(cmd).expect("run a workspace binary");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A sealed copy of the model, made once per process (sealing takes a second).
fn sealed_model() -> &'static (PathBuf, PathBuf) {
    static SEALED: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    SEALED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cinfer-e2e-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("model dir");
        let (key, sealed) = (dir.join("model.key"), dir.join("smollm2.sealed"));
        run(Command::new(bin("cinfer"))
            .args(["dev-model-key", "--out"])
            .arg(&key));
        run(Command::new(bin("cinfer"))
            .arg("seal-model")
            .arg(model_path())
            .args(["--model-id", MODEL_ID, "--key-id", "e2e-1", "--key"])
            .arg(&key)
            .arg("--out")
            .arg(&sealed));
        (key, sealed)
    })
}

/// What the relay on the loader link does to the loader's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Relays faithfully.
    Honest,
    /// Flips a byte in the second `Reply` frame of each request.
    TamperReply,
    /// Swaps the first two `Reply` frames of each request.
    ReorderReplies,
    /// Drops the last `Reply` frame (the sealed final frame) of each request.
    Truncate,
    /// Replaces the first `Reply` of each request with the first `Reply` of the
    /// previous request.
    ReplayReply,
    /// Flips a byte in the receipt carried by `Done`.
    TamperReceipt,
    /// Flips a byte in the sealed request of each `Submit`.
    TamperRequest,
}

/// Everything that crossed one link, per direction.
#[derive(Debug, Default)]
pub struct Recording {
    /// Bytes towards the trusted side (client → server, server → loader/keyserver).
    pub inbound: Vec<u8>,
    /// Bytes back.
    pub outbound: Vec<u8>,
}

/// A byte-level recording relay (client ⇄ server, server ⇄ keyserver).
fn tcp_relay(target: SocketAddr, rec: Arc<Mutex<Recording>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay listen");
    let addr = listener.local_addr().expect("relay addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to, inbound) in [
                (
                    a.try_clone().expect("clone"),
                    b.try_clone().expect("clone"),
                    true,
                ),
                (b, a, false),
            ] {
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        {
                            let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
                            let side = if inbound {
                                &mut r.inbound
                            } else {
                                &mut r.outbound
                            };
                            side.extend_from_slice(&buf[..n]);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    addr
}

/// The frame-level relay on the loader link: records, and misbehaves on demand.
fn loader_relay(
    target: SocketAddr,
    rec: Arc<Mutex<Recording>>,
    mode: Arc<Mutex<Hostile>>,
) -> SocketAddr {
    const MAX: u32 = cinfer_channel::DEFAULT_MAX_PAYLOAD;
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay listen");
    let addr = listener.local_addr().expect("relay addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(server) = conn else { continue };
            let Ok(loader) = TcpStream::connect(target) else {
                continue;
            };
            // server → loader
            {
                let (mut from, mut to) = (
                    server.try_clone().expect("clone"),
                    loader.try_clone().expect("clone"),
                );
                let (rec, mode) = (rec.clone(), mode.clone());
                std::thread::spawn(move || {
                    while let Ok(Some(mut f)) = cinfer_channel::read_frame(&mut from, MAX) {
                        let m = *mode.lock().unwrap_or_else(|e| e.into_inner());
                        if f.kind == Kind::Submit
                            && m == Hostile::TamperRequest
                            && let Some(last) = f.payload.last_mut()
                        {
                            *last ^= 1;
                        }
                        record(&rec, true, &f);
                        if cinfer_channel::write_frame(&mut to, f.kind, &f.payload, MAX).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
            // loader → server
            let (mut from, mut to) = (loader, server);
            let (rec, mode) = (rec.clone(), mode.clone());
            std::thread::spawn(move || {
                let mut state = RequestTamper::default();
                while let Ok(Some(f)) = cinfer_channel::read_frame(&mut from, MAX) {
                    let m = *mode.lock().unwrap_or_else(|e| e.into_inner());
                    for f in state.apply(m, f) {
                        record(&rec, false, &f);
                        if cinfer_channel::write_frame(&mut to, f.kind, &f.payload, MAX).is_err() {
                            return;
                        }
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

fn record(rec: &Mutex<Recording>, inbound: bool, f: &Frame) {
    let bytes = cinfer_channel::encode(f.kind, &f.payload, u32::MAX).unwrap_or_default();
    let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
    if inbound {
        r.inbound.extend_from_slice(&bytes);
    } else {
        r.outbound.extend_from_slice(&bytes);
    }
}

/// Per-request state of a hostile loader-link relay.
#[derive(Default)]
struct RequestTamper {
    /// Reply frames of the request in flight, held back where the mode needs it.
    held: Vec<Frame>,
    replies_seen: usize,
    previous_first: Option<Vec<u8>>,
    current_first: Option<Vec<u8>>,
}

impl RequestTamper {
    fn apply(&mut self, mode: Hostile, mut f: Frame) -> Vec<Frame> {
        match f.kind {
            Kind::Reply => {
                self.replies_seen += 1;
                let n = self.replies_seen;
                if n == 1 {
                    self.current_first =
                        cinfer_channel::split_request_id(&f.payload).map(|(_, b)| b.to_vec());
                }
                match mode {
                    Hostile::TamperReply if n == 2 => {
                        if let Some(last) = f.payload.last_mut() {
                            *last ^= 1;
                        }
                        vec![f]
                    }
                    Hostile::ReorderReplies if n == 1 => {
                        self.held.push(f);
                        vec![]
                    }
                    Hostile::ReorderReplies if n == 2 => {
                        let mut out = vec![f];
                        out.append(&mut self.held);
                        out
                    }
                    Hostile::Truncate => {
                        // Hold each frame back until the next one shows it was not the last.
                        let out = std::mem::take(&mut self.held);
                        self.held.push(f);
                        out
                    }
                    Hostile::ReplayReply if n == 1 => match (
                        &self.previous_first,
                        cinfer_channel::split_request_id(&f.payload),
                    ) {
                        (Some(prev), Some((id, _))) => vec![Frame {
                            kind: Kind::Reply,
                            payload: cinfer_channel::with_request_id(id, prev),
                        }],
                        _ => vec![f],
                    },
                    _ => vec![f],
                }
            }
            Kind::Done => {
                self.replies_seen = 0;
                self.previous_first = self.current_first.take();
                let mut out = std::mem::take(&mut self.held);
                if mode == Hostile::Truncate {
                    out.clear(); // the sealed final frame never arrives
                }
                if mode == Hostile::TamperReceipt {
                    // Flip a hex digit of the signature (stays valid JSON).
                    if let Some(pos) = f.payload.iter().rposition(|b| b.is_ascii_hexdigit()) {
                        f.payload[pos] = if f.payload[pos] == b'0' { b'1' } else { b'0' };
                    }
                }
                out.push(f);
                out
            }
            _ => vec![f],
        }
    }
}

/// The running system.
pub struct System {
    /// The inference server as clients reach it (through the client relay).
    pub server_url: String,
    /// The keyserver identity clients pin.
    pub identity: Vec<u8>,
    /// client ⇄ server bytes.
    pub client_link: Arc<Mutex<Recording>>,
    /// server ⇄ loader frames.
    pub loader_link: Arc<Mutex<Recording>>,
    /// server ⇄ keyserver bytes.
    pub keyserver_link: Arc<Mutex<Recording>>,
    /// What the loader-link relay does.
    pub hostile: Arc<Mutex<Hostile>>,
    /// The inference server's working directory (its files on disk).
    pub server_dir: PathBuf,
    /// The inference server's log (stderr, at trace level).
    pub server_log: PathBuf,
    /// The inference server's direct address (no relay; for benchmarks).
    pub server_direct: SocketAddr,
    /// Every keyserver's identity (k-of-n systems have several).
    pub identities: Vec<Vec<u8>>,
    /// Keyservers whose shares a key needs (1: whole keys).
    pub threshold: u8,
    dir: PathBuf,
    children: Vec<Child>,
    /// Which of `children` are the loaders, in the server's `loaders` order.
    loader_slots: Vec<usize>,
    _swtpm: cinfer_tpm::swtpm::Swtpm,
    /// The other loaders' TPMs ([`System::start_loaders`]).
    _extra_swtpms: Vec<cinfer_tpm::swtpm::Swtpm>,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("server_url", &self.server_url)
            .finish_non_exhaustive()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `trusted-loader serve --config CONFIG`; the process and the
/// address it listens on (from its log), the rest of its log drained.
fn spawn_loader(config: &Path) -> (Child, SocketAddr) {
    let mut loader = spawn_guarded(
        Command::new(bin("trusted-loader"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stderr(Stdio::piped()),
    )
    .expect("trusted-loader");
    let mut lines = BufReader::new(loader.stderr.take().expect("stderr")).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("loader exited before listening")
            .expect("line");
        if let Some(a) = line.strip_prefix("listening on tcp:") {
            break a.parse().expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (loader, addr)
}

/// Reference values allowing what either allows: the union of
/// `trusted-aks` and of each event kind's digests (the rest from `a`).
fn merge_references(a: &str, b: &str) -> String {
    let mut a: cinfer_attest::ReferenceValues = toml::from_str(a).expect("reference TOML");
    let b: cinfer_attest::ReferenceValues = toml::from_str(b).expect("reference TOML");
    for ak in b.trusted_aks {
        if !a.trusted_aks.contains(&ak) {
            a.trusted_aks.push(ak);
        }
    }
    for (kind, digests) in b.events {
        a.events.entry(kind).or_default().extend(digests);
    }
    assert_eq!(a.pcrs, b.pcrs, "the loaders' boot PCRs differ");
    toml::to_string(&a).expect("reference TOML")
}

/// A loader in a test TD ([`System::start_tdx`]).
#[derive(Debug, Clone, Copy)]
struct Tdx<'a> {
    /// Extra arguments of `cinfer tdx-test-provider`.
    provider_args: &'a [&'a str],
    /// Whether the loader has a TPM too (both kinds of evidence).
    tpm: bool,
}

/// How one keyserver of a k-of-n system behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyserverRole {
    /// Runs with the loader's reference values.
    Honest,
    /// Never started: the server reaches nothing at its address.
    Down,
    /// Runs with reference values that refuse this loader (its operator
    /// pinned another boot PCR value).
    Refuses,
}

impl System {
    /// Starts everything and waits until the server reports an attested loader.
    pub fn start(name: &str) -> System {
        let system = Self::start_with(name, &[KeyserverRole::Honest], 1, None, 1);
        system.wait_ready();
        system
    }

    /// k-of-n keyservers: one keyserver per role, each holding one share of
    /// the model key and of the request and receipt keys (`cinfer split-key`
    /// with `threshold` of `roles.len()`); the loader pins all of them with
    /// `keyserver-threshold = threshold`. Does not wait for readiness
    /// ([`System::wait_ready`], [`System::readyz`]). With one role and
    /// threshold 1, the keyserver holds whole keys instead.
    pub fn start_quorum(name: &str, roles: &[KeyserverRole], threshold: u8) -> System {
        Self::start_with(name, roles, threshold, None, 1)
    }

    /// A loader in a (test) TD as well: `cinfer tdx-test-provider` (with
    /// `provider_args`, e.g. `--debug`) plays the TD's quote and RTMR
    /// interfaces, the loader's `[tdx]` table points at them, and the
    /// keyserver requires both kinds of evidence (`[tdx]` pinning the
    /// provider's MRTD and RTMR0–2, trusting its test root CA). Does not wait
    /// for readiness.
    pub fn start_tdx(name: &str, provider_args: &[&str]) -> System {
        let tdx = Tdx {
            provider_args,
            tpm: true,
        };
        Self::start_with(name, &[KeyserverRole::Honest], 1, Some(tdx), 1)
    }

    /// A loader in a (test) TD without a vTPM: no `tpm` in its
    /// configuration, TD quotes alone, and a keyserver with `evidence =
    /// ["tdx"]`. Does not wait for readiness.
    pub fn start_tdx_only(name: &str) -> System {
        let tdx = Tdx {
            provider_args: &[],
            tpm: false,
        };
        Self::start_with(name, &[KeyserverRole::Honest], 1, Some(tdx), 1)
    }

    /// A keyserver's audit log (`audit-{i}.jsonl`), one JSON value a line.
    pub fn audit(&self, keyserver: usize) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join(format!("audit-{keyserver}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// `loaders` trusted loaders, each with its own swtpm and configuration
    /// (the same but for its TPM), behind one inference server (`loaders =
    /// [...]`); the keyserver's reference values allow each one's
    /// configuration digest and AK. Waits until every loader is attested.
    pub fn start_loaders(name: &str, loaders: usize) -> System {
        let system = Self::start_with(name, &[KeyserverRole::Honest], 1, None, loaders);
        system.wait_ready();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, body) = system.readyz();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let ready = v["loaders"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|l| l["ready"] == true).count());
            if ready == loaders {
                return system;
            }
            assert!(
                Instant::now() < deadline,
                "not every loader attested: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_with(
        name: &str,
        roles: &[KeyserverRole],
        threshold: u8,
        tdx: Option<Tdx<'_>>,
        loaders: usize,
    ) -> System {
        let with_tpm = tdx.as_ref().is_none_or(|t| t.tpm);
        let dir = std::env::temp_dir().join(format!("cinfer-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (loader_dir, server_dir) = (dir.join("loader"), dir.join("server"));
        std::fs::create_dir_all(&loader_dir).expect("dirs");
        std::fs::create_dir_all(&server_dir).expect("dirs");
        let (model_key, sealed) = sealed_model();

        // Keyserver states: the model key goes in (whole, or one share per
        // keyserver), encrypted under each keyserver's KEK.
        let split = roles.len() > 1;
        if split {
            for args in [
                vec![
                    "--model-key",
                    model_key.to_str().expect("utf-8"),
                    "--model-id",
                    MODEL_ID,
                ],
                vec!["--request-key"],
            ] {
                let what = if args.len() > 1 { "model" } else { "request" };
                run(Command::new(bin("cinfer"))
                    .arg("split-key")
                    .args(["--threshold", &threshold.to_string()])
                    .args(["--shares", &roles.len().to_string()])
                    .args(args)
                    .arg("--out")
                    .arg(dir.join("shares").join(what)));
            }
        }
        let mut identities = Vec::new();
        for i in 0..roles.len() {
            let (state, kek) = (
                dir.join(format!("ks-state-{i}")),
                dir.join(format!("ks-kek-{i}")),
            );
            let ks = |args: &[&str]| {
                run(Command::new(bin("keyserver"))
                    .arg("--state")
                    .arg(&state)
                    .arg("--kek")
                    .arg(&kek)
                    .args(args))
            };
            ks(&["init"]);
            if split {
                for what in ["model", "request"] {
                    let file = dir
                        .join("shares")
                        .join(what)
                        .join(format!("share-{}.json", i + 1));
                    ks(&["add-share", "--share-file", file.to_str().expect("utf-8")]);
                }
            } else {
                ks(&[
                    "add-model-key",
                    "--id",
                    MODEL_ID,
                    "--key-file",
                    model_key.to_str().expect("utf-8"),
                ]);
            }
            identities.push(hex::decode(ks(&["public-identity"]).trim()).expect("identity hex"));
        }
        let _ = std::fs::remove_dir_all(dir.join("shares"));
        let identity = identities[0].clone();

        // The program, signed with a fresh team key; a policy admitting that key.
        let l = &loader_dir;
        run(Command::new(bin("cinfer"))
            .arg("keygen")
            .arg("--private")
            .arg(dir.join("team.key"))
            .arg("--public")
            .arg(l.join("team.pub")));
        // The server stores the signed program and submits it to the loader, with
        // a second one signed by a key the policy does not know (refused).
        let sd = &server_dir;
        std::fs::copy(
            root().join("target/programs/llama-chat.wasm"),
            sd.join("llama-chat.wasm"),
        )
        .expect("target/programs/llama-chat.wasm: run cargo run --release -p build-programs");
        run(Command::new(bin("cinfer"))
            .arg("sign")
            .arg(sd.join("llama-chat.wasm"))
            .arg("--key")
            .arg(dir.join("team.key")));
        std::fs::copy(
            root().join("target/programs/fixtures/egress-bomb.wasm"),
            sd.join("evil.wasm"),
        )
        .expect("fixtures");
        run(Command::new(bin("cinfer"))
            .arg("keygen")
            .arg("--private")
            .arg(dir.join("evil.key"))
            .arg("--public")
            .arg(dir.join("evil.pub")));
        run(Command::new(bin("cinfer"))
            .arg("sign")
            .arg(sd.join("evil.wasm"))
            .arg("--key")
            .arg(dir.join("evil.key")));
        std::fs::copy(root().join("policies/worlds.wit"), l.join("worlds.wit")).expect("worlds");
        if std::fs::hard_link(sealed, l.join("smollm2.sealed")).is_err() {
            std::fs::copy(sealed, l.join("smollm2.sealed")).expect("model copy");
        }
        std::fs::write(
            l.join("policy.toml"),
            format!(
                "worlds = \"worlds.wit\"\n[[signer]]\nname = \"team\"\npublic-key = \"team.pub\"\nworld = \"inference\"\nmodels = [\"{MODEL_ID}\"]\nlimits = {{ memory-bytes = 268435456, deadline-ms = 120000, accelerator-bytes = 1073741824 }}\n"
            ),
        )
        .expect("policy");
        let mut children = Vec::new();
        // The test TD's interfaces, up before the loader extends its RTMR.
        let tdx_dir = dir.join("tdx");
        let tdx_table = if let Some(Tdx {
            provider_args: args,
            ..
        }) = tdx
        {
            let mut provider = spawn_guarded(
                Command::new(bin("cinfer"))
                    .arg("tdx-test-provider")
                    .arg("--dir")
                    .arg(&tdx_dir)
                    .args(args)
                    .stdout(Stdio::piped()),
            )
            .expect("cinfer tdx-test-provider");
            let mut ready = String::new();
            BufReader::new(provider.stdout.take().expect("stdout"))
                .read_line(&mut ready)
                .expect("provider output");
            assert!(ready.starts_with("ready "), "provider: {ready:?}");
            children.push(provider);
            format!(
                "[tdx]\nreport-dir = \"{}\"\nmeasurements-dir = \"{}\"\n",
                tdx_dir.join("report").display(),
                tdx_dir.join("measurements").display()
            )
        } else {
            String::new()
        };
        let swtpm = cinfer_tpm::swtpm::Swtpm::start().expect("swtpm (scripts/setup installs it)");
        // The server's channel key; the loader serves only the server holding it.
        let server_key = run(Command::new(bin("inference-server"))
            .arg("keygen")
            .arg("--out")
            .arg(sd.join("channel.key")));
        let loader_toml = |tcti: Option<String>| {
            format!(
                "listen = \"tcp:127.0.0.1:0\"\n{}policy = \"policy.toml\"\nmax-in-flight = 8\nkeyservers = [{}]\nkeyserver-threshold = {threshold}\nserver-keys = [\"{}\"]\n{tdx_table}[[model]]\nid = \"{MODEL_ID}\"\npath = \"smollm2.sealed\"\n",
                tcti.map(|t| format!("tpm = \"{t}\"\n")).unwrap_or_default(),
                identities
                    .iter()
                    .map(|i| format!("\"{}\"", hex::encode(i)))
                    .collect::<Vec<_>>()
                    .join(", "),
                server_key.trim()
            )
        };
        std::fs::write(
            l.join("loader.toml"),
            loader_toml(with_tpm.then(|| swtpm.tcti())),
        )
        .expect("loader config");
        // More loaders: each its own swtpm (the same boot PCRs) and its own
        // configuration file, differing in the TPM only.
        let extra_swtpms: Vec<cinfer_tpm::swtpm::Swtpm> = (1..loaders)
            .map(|_| cinfer_tpm::swtpm::Swtpm::start().expect("swtpm"))
            .collect();
        for (i, sw) in extra_swtpms.iter().enumerate() {
            std::fs::write(
                l.join(format!("loader-{}.toml", i + 1)),
                loader_toml(Some(sw.tcti())),
            )
            .expect("loader config");
        }

        // Reference values, as an operator computes them.
        let measure = |config: &str, tcti: Option<String>, more: Vec<String>| {
            run(Command::new(bin("cinfer"))
                .arg("measure-loader")
                .arg("--config")
                .arg(l.join(config))
                .arg("--binary")
                .arg(bin("trusted-loader"))
                .args(
                    tcti.map(|t| vec!["--tpm".to_owned(), t])
                        .unwrap_or_default(),
                )
                .args(more))
        };
        let mut extra_references = Vec::new();
        for (i, sw) in extra_swtpms.iter().enumerate() {
            let out = measure(
                &format!("loader-{}.toml", i + 1),
                Some(sw.tcti()),
                Vec::new(),
            );
            extra_references.push(
                out.split_once("# keyserver reference values:\n")
                    .expect("reference values")
                    .1
                    .to_owned(),
            );
        }
        let measured = measure(
            "loader.toml",
            with_tpm.then(|| swtpm.tcti()),
            tdx.as_ref()
                .map(|_| {
                    vec![
                        "--tdx-measurements".to_owned(),
                        tdx_dir.join("measurements").display().to_string(),
                    ]
                })
                .unwrap_or_default(),
        );
        let (before, reference) = measured
            .split_once("# keyserver reference values:\n")
            .expect("reference values");
        let merged = extra_references
            .iter()
            .fold(reference.to_owned(), |a, b| merge_references(&a, b));
        let reference = merged.as_str();
        // The keyserver's [tdx] table, with the provider's trust anchor and
        // collateral.
        let keyserver_tdx = match tdx {
            Some(Tdx { tpm, .. }) => {
                let table = before
                    .split_once("[tdx]\n")
                    .expect("measure-loader printed a [tdx] table")
                    .1;
                format!(
                    "{}[tdx]\nroot-ca = \"{}\"\ncollateral = \"{}\"\n{table}",
                    if tpm { "" } else { "evidence = [\"tdx\"]\n" },
                    tdx_dir.join("root-ca.der").display(),
                    tdx_dir.join("collateral.json").display()
                )
            }
            None => String::new(),
        };
        std::fs::write(dir.join("reference.toml"), reference).expect("reference");
        // A reference that pins another value for boot PCR 0.
        let mut refusing = String::new();
        let mut in_pcrs = false;
        for line in reference.lines() {
            if line.trim_start().starts_with('[') {
                in_pcrs = line.trim() == "[pcrs]";
            }
            match line.split_once('=') {
                Some((k, _)) if in_pcrs && k.trim() == "0" => {
                    refusing.push_str(&format!("0 = \"{}\"\n", "ee".repeat(32)));
                }
                _ => {
                    refusing.push_str(line);
                    refusing.push('\n');
                }
            }
        }
        if with_tpm {
            assert_ne!(
                refusing, reference,
                "the reference pins boot PCR 0: {reference}"
            );
        }
        std::fs::write(dir.join("refusing.toml"), refusing).expect("reference");
        let mut ks_ports = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let port = free_port();
            ks_ports.push(port);
            let reference = match role {
                KeyserverRole::Refuses => "refusing.toml",
                _ => "reference.toml",
            };
            std::fs::write(
                dir.join(format!("keyserver-{i}.toml")),
                format!(
                    "listen = \"127.0.0.1:{port}\"\nstate-dir = \"{}\"\nkek-file = \"{}\"\naudit-log = \"{}\"\nreference-file = \"{}\"\n{keyserver_tdx}",
                    dir.join(format!("ks-state-{i}")).display(),
                    dir.join(format!("ks-kek-{i}")).display(),
                    dir.join(format!("audit-{i}.jsonl")).display(),
                    dir.join(reference).display()
                ),
            )
            .expect("keyserver config");
            if *role != KeyserverRole::Down {
                children.push(
                    spawn_guarded(
                        Command::new(bin("keyserver"))
                            .arg("--config")
                            .arg(dir.join(format!("keyserver-{i}.toml")))
                            .arg("serve")
                            .stderr(Stdio::null()),
                    )
                    .expect("keyserver"),
                );
            }
        }

        let (loader, loader_addr) = spawn_loader(&l.join("loader.toml"));
        let mut loader_slots = vec![children.len()];
        children.push(loader);
        let mut extra_addrs = Vec::new();
        for i in 1..loaders {
            let (loader, addr) = spawn_loader(&l.join(format!("loader-{i}.toml")));
            loader_slots.push(children.len());
            children.push(loader);
            extra_addrs.push(addr);
        }

        let loader_link = Arc::new(Mutex::new(Recording::default()));
        let keyserver_link = Arc::new(Mutex::new(Recording::default()));
        let client_link = Arc::new(Mutex::new(Recording::default()));
        let hostile = Arc::new(Mutex::new(Hostile::Honest));
        let loader_relay = loader_relay(loader_addr, loader_link.clone(), hostile.clone());
        // The first keyserver's link is recorded; the others are reached directly.
        let ks_relay = tcp_relay(
            SocketAddr::from(([127, 0, 0, 1], ks_ports[0])),
            keyserver_link.clone(),
        );
        let ks_urls: Vec<String> = std::iter::once(format!("\"http://{ks_relay}\""))
            .chain(
                ks_ports[1..]
                    .iter()
                    .map(|p| format!("\"http://127.0.0.1:{p}\"")),
            )
            .collect();
        let server_port = free_port();
        std::fs::write(
            server_dir.join("server.toml"),
            format!(
                "listen = \"127.0.0.1:{server_port}\"\nloaders = [{}]\nchannel-key = \"channel.key\"\nkeyservers = [{}]\n[[program]]\npath = \"llama-chat.wasm\"\nsignatures = [\"llama-chat.wasm.sig\"]\n[[program]]\npath = \"evil.wasm\"\nsignatures = [\"evil.wasm.sig\"]\n",
                std::iter::once(format!("\"tcp:{loader_relay}\""))
                    .chain(extra_addrs.iter().map(|a| format!("\"tcp:{a}\"")))
                    .collect::<Vec<_>>()
                    .join(", "),
                ks_urls.join(", ")
            ),
        )
        .expect("server config");
        let server_log = dir.join("server.log");
        children.push(
            spawn_guarded(
                Command::new(bin("inference-server"))
                    .args(["--config", "server.toml"])
                    .current_dir(&server_dir)
                    .env("CINFER_LOG", "trace")
                    .stderr(std::fs::File::create(&server_log).expect("log")),
            )
            .expect("inference-server"),
        );
        let server_direct = SocketAddr::from(([127, 0, 0, 1], server_port));
        let client_relay = tcp_relay(server_direct, client_link.clone());
        System {
            server_url: format!("http://{client_relay}"),
            identity,
            client_link,
            loader_link,
            keyserver_link,
            hostile,
            server_dir,
            server_log,
            server_direct,
            dir,
            children,
            loader_slots,
            _swtpm: swtpm,
            _extra_swtpms: extra_swtpms,
            identities,
            threshold,
        }
    }

    /// The server's `/readyz` status and body.
    pub fn readyz(&self) -> (u16, String) {
        self.server_get("/readyz")
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> String {
        self.server_get("/metrics").1
    }

    /// `GET path` on the server directly: the status and the body.
    fn server_get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(self.server_direct) else {
            return (0, String::new());
        };
        let _ = s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        let status = r
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }

    /// Waits (up to 60 s) until the server reports an attested loader.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(self.server_direct) {
                let _ =
                    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the inference server never became ready: {}",
                std::fs::read_to_string(&self.server_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client of this system (through the recording client relay); in a
    /// k-of-n system, one that needs `threshold` keyservers to agree.
    /// Kills loader `i` (in the server's `loaders` order) and waits for it.
    pub fn kill_loader(&mut self, i: usize) {
        let child = &mut self.children[self.loader_slots[i]];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The loader each request went to, from the server's log (its
    /// endpoint as the server's `loaders` names it), in submission order.
    pub fn submitted_to(&self) -> Vec<String> {
        std::fs::read_to_string(&self.server_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("request submitted"))
            .filter_map(|l| l.split("loader=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// `cinfer proxy` arguments pinning this system's keyserver identity and
    /// the built llama-chat program.
    pub fn proxy_pins(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--keyserver-identity".into(),
            hex::encode(&self.identity).into(),
            "--program-file".into(),
            root().join("target/programs/llama-chat.wasm").into(),
        ]
    }

    pub fn client(&self) -> cinfer_client::Client {
        let client =
            cinfer_client::Client::new(&self.server_url, self.identity.clone()).expect("client");
        if self.identities.len() > 1 {
            client
                .with_keyserver_quorum(self.identities.clone(), usize::from(self.threshold))
                .expect("quorum")
        } else {
            client
        }
    }

    /// A client that talks to the server directly (no relay; for benchmarks).
    pub fn direct_client(&self) -> cinfer_client::Client {
        cinfer_client::Client::new(
            &format!("http://{}", self.server_direct),
            self.identity.clone(),
        )
        .expect("client")
    }

    /// Sets what the loader-link relay does from now on.
    pub fn set_hostile(&self, mode: Hostile) {
        *self.hostile.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// Every byte the untrusted side saw or wrote: both directions of its three
    /// links, its log, and every file under its working directory.
    pub fn untrusted_bytes(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, rec) in [
            ("client link", &self.client_link),
            ("loader link", &self.loader_link),
            ("keyserver link", &self.keyserver_link),
        ] {
            let r = rec.lock().unwrap_or_else(|e| e.into_inner());
            out.push((format!("{name} (in)"), r.inbound.clone()));
            out.push((format!("{name} (out)"), r.outbound.clone()));
        }
        out.push((
            "server log".into(),
            std::fs::read(&self.server_log).unwrap_or_default(),
        ));
        let mut stack = vec![self.server_dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((
                        p.display().to_string(),
                        std::fs::read(&p).unwrap_or_default(),
                    ));
                }
            }
        }
        out
    }
}

/// A running `cinfer proxy`, stopped on drop.
#[derive(Debug)]
pub struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cinfer proxy --listen 127.0.0.1:0 --server <server_url>` with
/// `args` (its keyserver pins and program pin); returns it, its first log
/// line and its base URL as that line gives it (`http://…/v1`).
pub fn start_proxy<S: AsRef<std::ffi::OsStr>>(
    server_url: &str,
    args: &[S],
) -> (Proxy, String, String) {
    let mut child = spawn_guarded(
        Command::new(bin("cinfer"))
            .args(["proxy", "--listen", "127.0.0.1:0", "--server", server_url])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("cinfer proxy");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("the proxy's first line");
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches(',')
        .to_owned();
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (Proxy(child), line, base)
}

/// A llama-chat request.
pub fn chat_request(prompt: &str, max_tokens: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "default_system": false,
        "format": "text",
    }))
    .expect("json")
}
