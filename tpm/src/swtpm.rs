//! A throw-away software TPM (`swtpm`) for tests: a fresh state directory (so
//! fresh seeds: a different AK), TCP on loopback, started with
//! `TPM2_Startup(CLEAR)` done. Dropping it kills the process and removes the
//! state.
//!
//! swtpm serves one client connection at a time: open one [`crate::Tpm`] (or
//! other client) at a time on it.
//!
//! [`Swtpm::start_endorsed`] first manufactures the TPM with `swtpm_setup
//! --create-ek-cert`: an EK and its certificate in NV memory, issued by a
//! [`LocalCa`] (`swtpm_localca` in a temporary directory: a root CA and an
//! intermediate that signs EK certificates), as a TPM vendor would.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How many port pairs to try before giving up.
const ATTEMPTS: usize = 5;

/// TSS contexts ([`crate::Tpm`]s) open in this process, counted when the
/// `swtpm` feature is on. libtss2's sockets are not close-on-exec, so a child
/// started while one is open inherits its connection to a swtpm and keeps it
/// for its whole life; swtpm serves one client at a time on each port, so that
/// TPM's next client then waits forever (seen in CI: two e2e tests in
/// parallel, `cinfer measure-loader` hung on the other test's swtpm). Test
/// harnesses therefore start children with [`spawn_guarded`], which waits
/// until no context is open.
static TSS_OPEN: Mutex<usize> = Mutex::new(0);
static TSS_CLOSED: Condvar = Condvar::new();

/// How long [`spawn_guarded`] waits for open TSS contexts to close before it
/// starts the child anyway (a thread holding a `Tpm` for long, or the calling
/// thread itself: never a deadlock, at worst the old race).
const FORK_WAIT: Duration = Duration::from_secs(10);

fn tss_open() -> MutexGuard<'static, usize> {
    TSS_OPEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One open TSS context, counted in [`TSS_OPEN`] until dropped.
#[derive(Debug)]
pub(crate) struct TssContext(());

impl TssContext {
    /// Creates a context with `open` and counts it; `open` runs while no
    /// child can be starting.
    pub(crate) fn counted<T, E>(open: impl FnOnce() -> Result<T, E>) -> Result<(T, Self), E> {
        let mut n = tss_open();
        let context = open()?;
        *n += 1;
        Ok((context, TssContext(())))
    }
}

impl Drop for TssContext {
    fn drop(&mut self) {
        let mut n = tss_open();
        *n = n.saturating_sub(1);
        if *n == 0 {
            TSS_CLOSED.notify_all();
        }
    }
}

/// Starts `cmd` when no TSS context is open in this process (see
/// [`TSS_OPEN`]; after [`FORK_WAIT`] at most), none opening meanwhile.
pub fn spawn_guarded(cmd: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + FORK_WAIT;
    let mut open = tss_open();
    while *open > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        open = match TSS_CLOSED.wait_timeout(open, left) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
    cmd.spawn()
}

/// `cmd.output()` (stdin null, stdout and stderr captured), started under
/// [`spawn_guarded`] (the wait is not).
pub fn output_guarded(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_guarded(cmd)?.wait_with_output()
}

/// The boot PCRs the harness measures at start.
pub const BOOT_PCRS: std::ops::RangeInclusive<u8> = 0..=7;

/// What the harness extends boot PCR `pcr` with: SHA-256 of a fixed label.
pub fn boot_stand_in_digest(pcr: u8) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(format!(
        "cinfer swtpm harness: stands in for the firmware measuring PCR {pcr}"
    ))
    .into()
}
/// How long swtpm may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a software TPM could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwtpmError {
    /// `swtpm` (or, for an endorsed TPM, `swtpm_setup` or `swtpm_localca`) is
    /// not on `PATH`.
    #[error("swtpm is not installed (install it: apt-get install swtpm swtpm-tools)")]
    NotInstalled,
    /// Creating the state directory or choosing a port failed.
    #[error("preparing swtpm: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// swtpm exited or did not accept connections in time, for every port
    /// pair tried.
    #[error("swtpm did not start after {ATTEMPTS} attempts; last: {last}")]
    Start {
        /// What happened on the last attempt (including swtpm's stderr).
        last: String,
    },
}

/// A throw-away EK certificate authority: `swtpm_localca`'s state (root CA,
/// intermediate CA, serial numbers) in a temporary directory. The CA keys
/// are made when the first TPM is manufactured with it.
pub struct LocalCa {
    dir: tempfile::TempDir,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl LocalCa {
    /// Creates the directory and the `swtpm_setup`/`swtpm_localca`
    /// configuration files pointing into it.
    pub fn new() -> Result<Self, SwtpmError> {
        let io = |what| move |source| SwtpmError::Io { what, source };
        let localca = find_in_path("swtpm_localca").ok_or(SwtpmError::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("cinfer-ek-ca-")
            .tempdir()
            .map_err(io("creating the CA directory"))?;
        let d = dir.path();
        std::fs::create_dir(d.join("ca")).map_err(io("creating the CA directory"))?;
        let ca = d.join("ca");
        std::fs::write(
            d.join("localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = ca.display()
            ),
        )
        .map_err(io("writing localca.conf"))?;
        std::fs::write(d.join("localca.options"), "").map_err(io("writing localca.options"))?;
        std::fs::write(
            d.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = {}\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                localca.display(),
                d.join("localca.conf").display(),
                d.join("localca.options").display()
            ),
        )
        .map_err(io("writing swtpm_setup.conf"))?;
        Ok(Self { dir })
    }

    /// The root CA certificate (PEM): the trust anchor of EK certificates.
    /// Exists once a TPM was manufactured with this CA.
    pub fn root_cert(&self) -> std::path::PathBuf {
        self.dir.path().join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The intermediate CA certificate (PEM) that signs EK certificates.
    pub fn intermediate_cert(&self) -> std::path::PathBuf {
        self.dir.path().join("ca/issuercert.pem")
    }

    /// Runs `swtpm_setup --create-ek-cert` on the state directory `state`.
    fn manufacture(&self, state: &std::path::Path) -> Result<(), String> {
        let mut setup = Command::new("swtpm_setup");
        setup
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(state)
            .arg("--create-ek-cert")
            .arg("--overwrite")
            .arg("--config")
            .arg(self.dir.path().join("swtpm_setup.conf"));
        let out = output_guarded(&mut setup).map_err(|e| format!("running swtpm_setup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "swtpm_setup failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// A running swtpm process.
pub struct Swtpm {
    child: Child,
    port: u16,
    // Removed on drop, after the process is killed.
    state: tempfile::TempDir,
}

impl fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Swtpm")
            .field("pid", &self.child.id())
            .field("port", &self.port)
            .field("state", &self.state.path())
            .finish()
    }
}

impl Swtpm {
    /// Starts `swtpm socket --tpm2` on a free port pair of 127.0.0.1 (server
    /// `P`, control `P+1`) with a fresh state directory, and waits until the
    /// server port accepts connections.
    pub fn start() -> Result<Self, SwtpmError> {
        Self::start_with(None)
    }

    /// [`Swtpm::start`] on a TPM manufactured with an EK certificate issued
    /// by `ca` (`swtpm_setup --create-ek-cert`: RSA 2048 and ECC EKs and
    /// their certificates in NV memory).
    pub fn start_endorsed(ca: &LocalCa) -> Result<Self, SwtpmError> {
        if find_in_path("swtpm_setup").is_none() {
            return Err(SwtpmError::NotInstalled);
        }
        Self::start_with(Some(ca))
    }

    fn start_with(ca: Option<&LocalCa>) -> Result<Self, SwtpmError> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_port_pair()?;
            let state = tempfile::Builder::new()
                .prefix("cinfer-swtpm-")
                .tempdir()
                .map_err(|source| SwtpmError::Io {
                    what: "creating the state directory",
                    source,
                })?;
            if let Some(ca) = ca
                && let Err(why) = ca.manufacture(state.path())
            {
                last = why;
                continue;
            }
            let log_path = state.path().join("stderr.log");
            let log = File::create(&log_path).map_err(|source| SwtpmError::Io {
                what: "creating the log file",
                source,
            })?;
            let mut cmd = Command::new("swtpm");
            cmd.arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port}"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={}", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            let child = match spawn_guarded(&mut cmd) {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SwtpmError::NotInstalled);
                }
                Err(source) => {
                    return Err(SwtpmError::Io {
                        what: "spawning swtpm",
                        source,
                    });
                }
            };
            let mut swtpm = Swtpm { child, port, state };
            match swtpm.wait_ready().and_then(|()| swtpm.measure_boot()) {
                Ok(()) => return Ok(swtpm),
                Err(why) => {
                    let mut stderr = String::new();
                    // Best effort: the log only decorates the error.
                    let _ = File::open(&log_path).and_then(|mut f| f.read_to_string(&mut stderr));
                    last = format!("port {port}: {why}; stderr: {}", stderr.trim());
                    // Drop kills it (if still alive) and removes the state.
                }
            }
        }
        Err(SwtpmError::Start { last })
    }

    /// The TCTI configuration for this TPM: `swtpm:host=127.0.0.1,port=P`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The server (command) port; the control port is `port() + 1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits until both ports accept and the process is still ours and alive.
    /// Plays the firmware of a measured boot: extends each of PCRs 0–7 once
    /// with [`boot_stand_in_digest`], as OVMF/shim/the kernel would in a VM,
    /// so the boot PCRs hold measured values (not their reset value) that
    /// reference values can pin.
    fn measure_boot(&mut self) -> Result<(), String> {
        let mut tpm = crate::Tpm::open(&self.tcti()).map_err(|e| e.to_string())?;
        for pcr in BOOT_PCRS {
            tpm.extend_sha256(pcr, &boot_stand_in_digest(pcr))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        for port in [self.port + 1, self.port] {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(format!("swtpm exited ({status})"));
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("port {port} not accepting after {START_TIMEOUT:?}"));
                }
                sleep(Duration::from_millis(5));
            }
        }
        // If another process had taken one of the ports, swtpm fails to bind
        // and exits right away, while our connect reached the other process.
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!("swtpm exited ({status})"));
        }
        Ok(())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        // Best effort: it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port `P` such that `P` and `P + 1` are both free on 127.0.0.1 right now.
fn free_port_pair() -> Result<u16, SwtpmError> {
    let io = |source| SwtpmError::Io {
        what: "finding a free port",
        source,
    };
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io)?;
        let port = first.local_addr().map_err(io)?.port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            return Ok(port);
        }
    }
    Err(io(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free pair of adjacent ports",
    )))
}
