//! Independent cross-check: the Python Sigstore client (sigstore-python, the reference
//! client) verifies the same fixture bundles offline against the same trust root and gives
//! the same verdict as the manifest, which this crate's own tests hold our verifier to.
//!
//! The interpreter is `$CINFER_SIGSTORE_PYTHON`, else the venv `scripts/setup` makes
//! (`~/.cache/cinfer/sigstore-venv`, `sigstore==4.5.1`). Without either the test prints why it
//! is skipped; CI always has the venv.

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CINFER_SIGSTORE_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("CINFER_SIGSTORE_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cinfer/sigstore-venv"))
        })?;
    let p = venv.join("bin/python");
    p.exists().then_some(p)
}

#[test]
fn sigstore_python_agrees_on_every_fixture() {
    let Some(python) = python() else {
        eprintln!(
            "skipped: no sigstore-python venv (run scripts/setup, or set CINFER_SIGSTORE_PYTHON)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sigstore");
    let out = Command::new(&python)
        .arg(root.join("crosscheck.py"))
        .arg(root.join("fixtures"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.starts_with("skipped"),
        "{} has no sigstore package: {stdout}",
        python.display()
    );
    assert!(out.status.success(), "mismatch:\n{stdout}\n{stderr}");
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    let passed: usize = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("summary {summary:?}"));
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    // Keyless bundles (API and CLI) plus detached signatures: well over a dozen verdicts.
    assert!(passed >= 20, "only {passed} verdicts checked:\n{stdout}");
    eprintln!("{summary}");
}
