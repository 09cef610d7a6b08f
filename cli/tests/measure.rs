//! `cinfer measure-loader`: the event log a trusted loader computes at start
//! (`cinfer_host::measure`) and reference values a keyserver accepts, with and
//! without a TPM (swtpm, started here).

use std::path::{Path, PathBuf};
use std::process::Command;

use cinfer_attest::ReferenceValues;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn measure_loader(extra: &[&str]) -> (String, ReferenceValues) {
    let config = root().join("policies/loader-dev.toml");
    // Any file stands in for the loader binary: its SHA-256 is the first event.
    let binary = root().join("policies/worlds.wit");
    let out = Command::new(env!("CARGO_BIN_EXE_cinfer"))
        .arg("measure-loader")
        .arg("--config")
        .arg(&config)
        .arg("--binary")
        .arg(&binary)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running cinfer: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, toml_part) = stdout
        .split_once("# keyserver reference values:\n")
        .unwrap_or_else(|| panic!("no reference values in {stdout}"));
    let refs: ReferenceValues =
        toml::from_str(toml_part).unwrap_or_else(|e| panic!("{e}: {toml_part}"));
    (stdout, refs)
}

#[test]
fn reference_values_pin_the_loaders_own_event_log() {
    let (out, refs) = measure_loader(&[]);
    let binary = std::fs::read(root().join("policies/worlds.wit")).unwrap_or_default();
    let m = cinfer_host::measure::measure(&root().join("policies/loader-dev.toml"), &binary)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refs, ReferenceValues::for_events(m.cfg.pcr, &m.events));
    assert_eq!(refs.measured_pcr, 23);
    // Each event is listed with its digest, and the PCR they replay to.
    for e in &m.events {
        assert!(
            out.contains(&hex::encode(e.digest)),
            "{} missing:\n{out}",
            e.name
        );
    }
    let pcr = hex::encode(cinfer_attest::replay(&m.events, 23));
    assert!(
        out.contains(&format!("# PCR 23 after measurement: {pcr}")),
        "{out}"
    );
    // Without a TPM nothing is trusted yet, and the output says what to add.
    assert!(refs.trusted_aks.is_empty() && refs.pcrs.is_empty());
    assert!(out.contains("no --tpm: add the AK"), "{out}");
}

#[test]
fn with_a_tpm_its_ak_and_boot_pcrs_are_pinned() {
    let swtpm = match cinfer_tpm::swtpm::Swtpm::start() {
        Ok(s) => s,
        Err(cinfer_tpm::swtpm::SwtpmError::NotInstalled) => {
            println!("SKIPPED: swtpm is not installed (apt-get install swtpm swtpm-tools)");
            return;
        }
        Err(e) => panic!("starting swtpm: {e}"),
    };
    let (_, refs) = measure_loader(&["--tpm", &swtpm.tcti()]);
    let mut tpm = cinfer_tpm::Tpm::open(&swtpm.tcti()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refs.trusted_aks, vec![tpm.ak_public().to_vec()]);
    let boot: Vec<u8> = (0..8).collect();
    assert_eq!(
        refs.pcrs,
        tpm.read_pcrs(&boot).unwrap_or_else(|e| panic!("{e}"))
    );
    // The harness measured a boot: these pin PCRs software cannot reset.
    assert!(
        refs.pcrs
            .iter()
            .any(|(p, v)| !cinfer_attest::is_reset_value(*p, v))
    );
}
