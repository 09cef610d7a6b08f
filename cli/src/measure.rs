//! `cinfer measure-loader`: the event log and PCR value a trusted loader with
//! a given binary, serve configuration and policy produces, and the keyserver
//! reference values that pin them. The loader computes the same log at start
//! (`cinfer_host::measure`); building reference values is the operator's job,
//! so it lives here and not in the measured binary.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `cinfer measure-loader` arguments.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// The loader's serve configuration TOML.
    #[arg(long)]
    pub config: PathBuf,
    /// The `trusted-loader` binary to measure (the file the loader will run
    /// from: it measures its own executable).
    #[arg(long)]
    pub binary: PathBuf,
    /// TCTI of the TPM whose attestation key and boot PCRs to include (e.g.
    /// swtpm:host=127.0.0.1,port=2321); without it, add them by hand.
    #[arg(long)]
    pub tpm: Option<String>,
    /// The TDX guest driver's measurement registers
    /// (`/sys/class/misc/tdx_guest/measurements` in the TD the loader will
    /// run in): prints the keyserver's `[tdx]` table pinning this TD's MRTD,
    /// RTMR0, RTMR1 (and RTMR2 unless it is the event RTMR).
    #[arg(long)]
    pub tdx_measurements: Option<PathBuf>,
}

/// Prints the event log (as `#` comments), then the reference values as TOML
/// after the line `# keyserver reference values:`.
pub fn run(args: &MeasureArgs) -> Result<()> {
    let binary = std::fs::read(&args.binary)
        .with_context(|| format!("reading {}", args.binary.display()))?;
    let measured = cinfer_host::measure::measure(&args.config, &binary)?;
    let mut out = String::new();
    if let Some(dir) = &args.tdx_measurements {
        out.push_str(&render_tdx(&measured, dir)?);
    } else if measured.cfg.tdx.is_some() {
        out.push_str(
            "# the configuration has [tdx]: give --tdx-measurements to print the keyserver's [tdx] table\n",
        );
    }
    out.push_str(&render(&measured, args.tpm.as_deref(), &args.config)?);
    print!("{out}");
    Ok(())
}

/// One register as the TDX guest driver shows it: 48 raw bytes, or hex text.
fn read_register(dir: &Path, name: &str) -> Result<[u8; 48]> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = [0u8; 48];
    if bytes.len() == 48 {
        out.copy_from_slice(&bytes);
    } else {
        let text = String::from_utf8_lossy(&bytes);
        hex::decode_to_slice(text.trim(), &mut out)
            .with_context(|| format!("{} is neither 48 bytes nor their hex", path.display()))?;
    }
    Ok(out)
}

/// The keyserver's `[tdx]` table for a loader in this TD: its registers
/// read from `dir`, the event RTMR from the loader's configuration (whose
/// value a keyserver replays from the event log instead of pinning it).
fn render_tdx(m: &cinfer_host::measure::Measured, dir: &Path) -> Result<String> {
    use std::fmt::Write as _;
    let event_rtmr = m
        .cfg
        .tdx
        .as_ref()
        .map_or(cinfer_attest::TDX_EVENT_RTMR, |t| t.rtmr);
    let mut out = String::new();
    if m.cfg.tdx.is_none() {
        writeln!(
            out,
            "# the loader configuration has no [tdx] table: it will send no TD quote"
        )?;
    }
    writeln!(
        out,
        "# RTMR{event_rtmr} after measurement (replayed by the keyserver from the event log): {}",
        hex::encode(cinfer_attest::rtmr_replay(&m.events))
    )?;
    writeln!(
        out,
        "# keyserver [tdx] table (add root-ca and collateral: the operator's trust anchor and the platform's collateral):"
    )?;
    writeln!(out, "[tdx]")?;
    writeln!(
        out,
        "mrtd = \"{}\"",
        hex::encode(read_register(dir, "mrtd:sha384")?)
    )?;
    for i in 0..3u8 {
        if i != event_rtmr {
            let v = read_register(dir, &format!("rtmr{i}:sha384"))?;
            writeln!(out, "rtmr{i} = \"{}\"", hex::encode(v))?;
        }
    }
    writeln!(out, "event-rtmr = {event_rtmr}")?;
    Ok(out)
}

fn render(m: &cinfer_host::measure::Measured, tpm: Option<&str>, config: &Path) -> Result<String> {
    use std::fmt::Write as _;
    let (cfg, events) = (&m.cfg, &m.events);
    let mut out = String::new();
    writeln!(
        out,
        "# event log of {} (PCR {}, SHA-256 bank, from reset):",
        config.display(),
        cfg.pcr
    )?;
    for e in events {
        writeln!(
            out,
            "#   {:<14} {} {}",
            e.kind.as_str(),
            hex::encode(e.digest),
            e.name
        )?;
    }
    writeln!(
        out,
        "# PCR {} after measurement: {}",
        cfg.pcr,
        hex::encode(cinfer_attest::replay(events, cfg.pcr))
    )?;
    let mut refs = cinfer_attest::ReferenceValues::for_events(cfg.pcr, events);
    // The other quoted PCRs (the boot PCRs), as this TPM holds them now: run
    // on the machine (VM image) the loader will run on.
    let others: Vec<u8> = cfg
        .quote_pcrs()
        .into_iter()
        .filter(|p| *p != cfg.pcr)
        .collect();
    if cfg.tpm.is_none() {
        writeln!(
            out,
            "# the loader configuration has no tpm: it attests with TD quotes alone; a keyserver \
             needs evidence = [\"tdx\"] and uses only [events] below (not trusted-aks or [pcrs])"
        )?;
    } else if let Some(tcti) = tpm {
        let mut t = cinfer_tpm::Tpm::open(tcti)?;
        refs.trusted_aks.push(t.ak_public().to_vec());
        refs.pcrs = t.read_pcrs(&others)?;
    } else {
        writeln!(
            out,
            "# no --tpm: add the AK of each TPM to trust to trusted-aks"
        )?;
        if !others.is_empty() {
            writeln!(
                out,
                "# no --tpm: add the expected values of PCRs {others:?} to [pcrs]"
            )?;
        }
    }
    if cfg.tpm.is_none() {
        // No PCRs: nothing to warn about.
    } else if !others
        .iter()
        .any(|p| !cinfer_attest::RESETTABLE_PCRS.contains(p))
    {
        writeln!(
            out,
            "# quote-pcrs holds no boot PCR: a keyserver refuses these values unless \
             allow-resettable-pcrs-only = true (development)"
        )?;
    } else if tpm.is_some()
        && !refs
            .pcrs
            .iter()
            .any(|(p, v)| !cinfer_attest::is_reset_value(*p, v))
    {
        writeln!(
            out,
            "# every quoted boot PCR holds its reset value (nothing measured this boot): \
             a keyserver refuses these values unless allow-resettable-pcrs-only = true (development)"
        )?;
    }
    writeln!(out, "# keyserver reference values:")?;
    out.push_str(&toml::to_string(&refs).context("rendering the reference values")?);
    Ok(out)
}
