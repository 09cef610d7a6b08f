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
}

/// Prints the event log (as `#` comments), then the reference values as TOML
/// after the line `# keyserver reference values:`.
pub fn run(args: &MeasureArgs) -> Result<()> {
    let binary = std::fs::read(&args.binary)
        .with_context(|| format!("reading {}", args.binary.display()))?;
    let measured = cinfer_host::measure::measure(&args.config, &binary)?;
    print!("{}", render(&measured, args.tpm.as_deref(), &args.config)?);
    Ok(())
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
    if let Some(tcti) = tpm {
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
    if !others
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
