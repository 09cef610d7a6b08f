//! `cinfer tdx-test-provider`: plays an Intel TDX guest's quote and
//! measurement interfaces in a directory, with a TEST platform
//! (`cinfer_attest::tdx_test`: a PCK chain under a root CA made at start,
//! never Intel's), so the attest → release → serve flow runs with TD quotes
//! on machines without TDX (tests, the demo). TESTING ONLY: its quotes prove
//! nothing about hardware; a keyserver trusts them only if it is configured
//! with this run's `root-ca.der`.
//!
//! The directory it makes:
//! - `report/`: configfs-tsm's report directory. For each entry a loader
//!   makes there and writes `inblob` (64 bytes of report data) into, it
//!   writes `outblob` (a TD quote over the current registers), `provider`
//!   (`tdx_guest`) and then `generation` (`1`).
//! - `measurements/`: the TDX guest driver's registers. `mrtd:sha384`,
//!   and the RTMRs are plain files holding the test TD's fixed values (48
//!   raw bytes), except the event RTMR (`--event-rtmr`, 3 by default): a
//!   FIFO, each 48 bytes written to it an extend, as a write to the
//!   kernel's attribute is.
//! - `root-ca.der` and `collateral.json`: the keyserver's `[tdx]` root-ca
//!   and collateral.

use anyhow::{Context, Result, bail};
use cinfer_attest::tdx_test::{TdFields, TestTcb, TestTdxPlatform};
use sha2::{Digest as _, Sha384};
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// `cinfer tdx-test-provider` arguments.
#[derive(Debug, clap::Args)]
pub struct ProviderArgs {
    /// The directory to play the interfaces in (created; must not exist or
    /// be empty).
    #[arg(long)]
    pub dir: PathBuf,
    /// The TCB status the test platform's collateral gives it:
    /// up-to-date, sw-hardening-needed or out-of-date.
    #[arg(long, default_value = "up-to-date")]
    pub tcb: String,
    /// Set the TD's DEBUG attribute (a TD whose memory the host can read:
    /// keyservers must refuse it).
    #[arg(long)]
    pub debug: bool,
    /// MRTD (hex, 48 bytes) [default: SHA-384 of "cinfer test TD firmware"].
    #[arg(long)]
    pub mrtd: Option<String>,
    /// The RTMR software extends (2 or 3; the loader's `tdx.rtmr`): a FIFO.
    /// The other registers are plain files holding fixed test values.
    #[arg(long, default_value_t = 3)]
    pub event_rtmr: u8,
}

/// A fixed test measurement: SHA-384 of a label.
fn test_value(label: &str) -> [u8; 48] {
    Sha384::digest(label.as_bytes()).into()
}

/// Runs the provider until killed. Prints `ready DIR` on stdout once the
/// directory is complete.
pub fn run(args: &ProviderArgs) -> Result<()> {
    let tcb = match args.tcb.as_str() {
        "up-to-date" => TestTcb::UpToDate,
        "sw-hardening-needed" => TestTcb::SwHardeningNeeded,
        "out-of-date" => TestTcb::OutOfDate,
        other => bail!("--tcb {other:?}: up-to-date, sw-hardening-needed or out-of-date"),
    };
    let mut fields = TdFields {
        mr_td: test_value("cinfer test TD firmware"),
        ..TdFields::default()
    };
    if let Some(hex_value) = &args.mrtd {
        hex::decode_to_slice(hex_value.trim(), &mut fields.mr_td)
            .context("--mrtd is not 48 bytes of hex")?;
    }
    if !(2..=3).contains(&args.event_rtmr) {
        bail!("--event-rtmr {}: 2 or 3", args.event_rtmr);
    }
    let event_rtmr = usize::from(args.event_rtmr);
    for i in 0..3 {
        if i != event_rtmr {
            fields.rtmrs[i] = test_value(&format!("cinfer test TD rtmr{i}"));
        }
    }
    if args.debug {
        fields.td_attributes[0] |= 1;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let platform = TestTdxPlatform::generate(tcb, now).context("making the test platform")?;

    let dir = &args.dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let (report, measurements) = (dir.join("report"), dir.join("measurements"));
    std::fs::create_dir_all(&report).with_context(|| format!("creating {}", report.display()))?;
    std::fs::create_dir_all(&measurements)?;
    std::fs::write(dir.join("root-ca.der"), platform.root_ca_der())?;
    std::fs::write(dir.join("collateral.json"), platform.collateral_json())?;
    std::fs::write(measurements.join("mrtd:sha384"), fields.mr_td)?;
    for i in 0..4 {
        if i != event_rtmr {
            std::fs::write(
                measurements.join(format!("rtmr{i}:sha384")),
                fields.rtmrs[i],
            )?;
        }
    }
    let path = measurements.join(format!("rtmr{event_rtmr}:sha384"));
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .context("running mkfifo")?;
    if !status.success() {
        bail!("mkfifo {} failed", path.display());
    }
    // Read and write, so the FIFO never reports end of file and a writer
    // never blocks on a missing reader; non-blocking, so an empty FIFO does
    // not hold up the loop.
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut pending = Vec::new();
    println!("ready {}", dir.display());

    loop {
        // Extends first: a loader writes them before it asks for a quote.
        let mut buf = [0u8; 4096];
        loop {
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading the RTMR FIFO"),
            }
        }
        // The kernel's extend, written here rather than calling
        // `cinfer_attest::rtmr_extend`: the provider plays the hardware, so a
        // mistake in the verifier's replay must not be mirrored here.
        while pending.len() >= 48 {
            let value: Vec<u8> = pending.drain(..48).collect();
            let rtmr = &mut fields.rtmrs[event_rtmr];
            let mut h = Sha384::new();
            h.update(*rtmr);
            h.update(&value);
            *rtmr = h.finalize().into();
        }
        for entry in std::fs::read_dir(&report)? {
            let entry = entry?.path();
            if entry.join("generation").exists() || !entry.join("inblob").exists() {
                continue;
            }
            answer(&platform, &mut fields, &entry)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Writes the quote for one report entry.
fn answer(platform: &TestTdxPlatform, fields: &mut TdFields, entry: &Path) -> Result<()> {
    let inblob = std::fs::read(entry.join("inblob"))?;
    let quote = match <[u8; 64]>::try_from(inblob.as_slice()) {
        Ok(report_data) => {
            fields.report_data = report_data;
            platform.quote(fields)
        }
        // Still being written: the next round.
        Err(_) if inblob.len() < 64 => return Ok(()),
        // The kernel refuses a longer write; here the entry gets an empty
        // quote, which the loader refuses.
        Err(_) => Vec::new(),
    };
    let tmp = entry.join(".outblob");
    std::fs::write(&tmp, quote)?;
    std::fs::rename(&tmp, entry.join("outblob"))?;
    std::fs::write(entry.join("provider"), "tdx_guest\n")?;
    std::fs::write(entry.join("generation"), "1\n")?;
    Ok(())
}
