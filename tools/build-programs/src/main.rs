//! Builds every program under `programs/` into a Wasm component.
//!
//! 1. `cargo build --profile programs --target wasm32-unknown-unknown` of the
//!    program crates, with registry paths remapped, so the bytes (and so the digests
//!    a policy pins) do not depend on where the repository lives.
//! 2. Each core module is encoded into a component with `wit-component`
//!    (the `program` world's type information is embedded by wit-bindgen).
//!    Building for `wasm32-unknown-unknown` keeps WASI out entirely.
//! 3. WAT fixtures under `tests/fixtures/*.wat` (negative programs) are
//!    assembled as they are, malformed ones included.
//!
//! With `--update-policies`, the digests pinned in `policies/*.toml` are
//! rewritten to match (entries are matched by `name`).
//!
//! Output: `target/programs/NAME.wasm`, `target/programs/fixtures/NAME.wasm`,
//! and `target/programs/digests.txt` (`sha256  path`).
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cargo profile programs are built with (see the root Cargo.toml).
const PROFILE: &str = "programs";

/// Programs built from crates: (crate directory under programs/, output name, is fixture).
const CRATES: &[(&str, &str, bool)] = &[
    ("echo", "echo", false),
    ("vector-ops", "vector-ops", false),
    ("op-loop", "op-loop", false),
    ("llama-chat", "llama-chat", false),
    ("keyword-classifier", "keyword-classifier", false),
    ("fixtures/egress-bomb", "egress-bomb", true),
    ("fixtures/handle-bomb", "handle-bomb", true),
    ("fixtures/model-user", "model-user", true),
];

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .context("locating the repository root")?;
    let wasm_target = root.join("target/wasm");
    let out = root.join("target/programs");
    std::fs::create_dir_all(out.join("fixtures"))?;

    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    // Programs and the guest SDK are members of the root workspace, so their
    // paths reach rustc relative to it (cargo also hashes a path package's
    // location into its metadata, and so into the code layout, unless it lies
    // inside the workspace); only registry sources need remapping.
    let rustflags = format!("--remap-path-prefix={}=/cargo", cargo_home.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "build",
            "--profile",
            PROFILE,
            "--locked",
            "--target",
            "wasm32-unknown-unknown",
        ])
        .arg("--target-dir")
        .arg(&wasm_target);
    for (dir, _, _) in CRATES {
        cmd.arg("-p")
            .arg(Path::new(dir).file_name().context("crate dir")?);
    }
    let status = cmd.status().context("running cargo for the programs")?;
    if !status.success() {
        bail!(
            "building programs failed ({status}); is the wasm32-unknown-unknown target installed? (rustup target add wasm32-unknown-unknown)"
        );
    }

    let mut digests = Vec::new();
    for &(dir, name, fixture) in CRATES {
        let file = wasm_target
            .join("wasm32-unknown-unknown")
            .join(PROFILE)
            .join(format!("{}.wasm", name.replace('-', "_")));
        let module = std::fs::read(&file)
            .with_context(|| format!("reading {} (built from programs/{dir})", file.display()))?;
        let component = wit_component::ComponentEncoder::default()
            .module(&module)
            .with_context(|| format!("{name}: reading the embedded component type"))?
            .validate(true)
            .encode()
            .with_context(|| format!("{name}: encoding the component"))?;
        let dest = if fixture {
            out.join("fixtures").join(format!("{name}.wasm"))
        } else {
            out.join(format!("{name}.wasm"))
        };
        write(&dest, &component, &root, &mut digests)?;
    }

    let fixtures = root.join("tests/fixtures");
    let mut wats: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .with_context(|| format!("reading {}", fixtures.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wat"))
        .collect();
    wats.sort();
    for wat_path in wats {
        let bytes = wat::parse_file(&wat_path)
            .with_context(|| format!("assembling {}", wat_path.display()))?;
        let stem = wat_path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("fixture name is not UTF-8")?;
        write(
            &out.join("fixtures").join(format!("{stem}.wasm")),
            &bytes,
            &root,
            &mut digests,
        )?;
    }
    // A component header followed by garbage: must be refused as malformed.
    write(
        &out.join("fixtures/truncated-component.wasm"),
        b"\0asm\x0d\x00\x01\x00\x01\xff\xff\xff",
        &root,
        &mut digests,
    )?;
    // A fixture that is not Wasm at all.
    write(
        &out.join("fixtures/not-wasm.wasm"),
        b"this is not a WebAssembly binary\n",
        &root,
        &mut digests,
    )?;

    std::fs::write(out.join("digests.txt"), digests.join(""))?;
    if std::env::args().any(|a| a == "--update-policies") {
        update_policies(&root.join("policies"), &digests)?;
    }
    Ok(())
}

/// Rewrites the `sha256 = "..."` line of each `[[program]]` entry in
/// `policies/*.toml` whose `name` matches a built artifact's name. Text-based,
/// so comments and layout survive.
fn update_policies(dir: &Path, digests: &[String]) -> Result<()> {
    let by_name: std::collections::HashMap<String, String> = digests
        .iter()
        .filter_map(|line| {
            let (digest, path) = line.trim_end().split_once("  ")?;
            let name = Path::new(path).file_stem()?.to_str()?.to_owned();
            Some((name, digest.to_owned()))
        })
        .collect();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let mut current: Option<String> = None;
        let mut changed = 0;
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            let trimmed = line.trim_start();
            if let Some(v) = trimmed.strip_prefix("name = ") {
                current = Some(v.trim().trim_matches('"').to_owned());
            }
            match (
                trimmed.starts_with("sha256 = "),
                current.as_ref().and_then(|n| by_name.get(n)),
            ) {
                (true, Some(d)) => {
                    let new = format!("sha256 = \"{d}\"");
                    if trimmed != new {
                        changed += 1;
                    }
                    out.push_str(&new);
                }
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        if changed > 0 {
            std::fs::write(&path, out)?;
        }
        println!("updated {changed} digest(s) in {}", path.display());
    }
    Ok(())
}

fn write(dest: &Path, bytes: &[u8], root: &Path, digests: &mut Vec<String>) -> Result<()> {
    std::fs::write(dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
    let rel = dest.strip_prefix(root).unwrap_or(dest);
    let digest = hex::encode(Sha256::digest(bytes));
    println!("{digest}  {:>7} B  {}", bytes.len(), rel.display());
    digests.push(format!("{digest}  {}\n", rel.display()));
    Ok(())
}
