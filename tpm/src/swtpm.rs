//! A throw-away software TPM (`swtpm`) for tests: a fresh state directory (so
//! fresh seeds: a different AK), TCP on loopback, started with
//! `TPM2_Startup(CLEAR)` done. Dropping it kills the process and removes the
//! state.
//!
//! swtpm serves one client connection at a time: open one [`crate::Tpm`] (or
//! other client) at a time on it.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How many port pairs to try before giving up.
const ATTEMPTS: usize = 5;

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
    /// `swtpm` is not on `PATH`.
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
            let log_path = state.path().join("stderr.log");
            let log = File::create(&log_path).map_err(|source| SwtpmError::Io {
                what: "creating the log file",
                source,
            })?;
            let spawned = Command::new("swtpm")
                .arg("socket")
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
                .stderr(log)
                .spawn();
            let child = match spawned {
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
