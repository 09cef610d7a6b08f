//! `cinfer keygen`, `sign`, `verify` and `inspect` as a team and an operator use them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cinfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cinfer"))
        .args(args)
        .output()
        .expect("run cinfer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn echo_wasm() -> PathBuf {
    let p = root().join("target/programs/echo.wasm");
    assert!(
        p.exists(),
        "{} missing: run cargo run --release -p build-programs",
        p.display()
    );
    p
}

/// A scratch directory holding a copy of the policy worlds (a policy names files beside it).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cinfer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("policies/worlds.wit"), dir.join("worlds.wit")).unwrap();
    dir
}

#[test]
fn a_team_signs_with_its_key_and_the_policy_admits_by_that_key() {
    let dir = scratch("sign");
    let (private, public) = (dir.join("team.key"), dir.join("team.pub"));
    let o = cinfer(&[
        "keygen",
        "--private",
        private.to_str().unwrap(),
        "--public",
        public.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private key readable by others");
    }
    // keygen never overwrites a key.
    let again = cinfer(&[
        "keygen",
        "--private",
        private.to_str().unwrap(),
        "--public",
        dir.join("x.pub").to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    let wasm = dir.join("echo.wasm");
    std::fs::copy(echo_wasm(), &wasm).unwrap();
    let o = cinfer(&[
        "sign",
        wasm.to_str().unwrap(),
        "--key",
        private.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let sig = dir.join("echo.wasm.sig");
    assert!(sig.exists());

    std::fs::write(
        dir.join("policy.toml"),
        "worlds = \"worlds.wit\"\n[[signer]]\nname = \"team-key\"\npublic-key = \"team.pub\"\nworld = \"request-reply\"\n",
    )
    .unwrap();
    let policy = dir.join("policy.toml");
    let o = cinfer(&[
        "verify",
        wasm.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--signature",
        sig.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("signer:   `team-key`: key sha256:"), "{out}");
    assert!(
        out.contains("log:    none (detached key signature)"),
        "{out}"
    );
    assert!(
        out.contains("verdict:  ADMITTED as `team-key` in world `request-reply`"),
        "{out}"
    );

    // The same signature over other bytes is refused.
    let mut bytes = std::fs::read(&wasm).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = dir.join("tampered.wasm");
    std::fs::write(&tampered, &bytes).unwrap();
    let o = cinfer(&[
        "verify",
        tampered.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--signature",
        sig.to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("REFUSED: signature refused (KeySignatureInvalid)"),
        "{out}"
    );
    // Unsigned: the policy has no digest entries, so nothing is admitted.
    let o = cinfer(&[
        "verify",
        wasm.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is not listed in the policy"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_prints_who_signed_when_and_which_log_entry() {
    let sig = |f: &str| root().join("tests/sigstore/programs").join(f);
    let o = cinfer(&[
        "verify",
        echo_wasm().to_str().unwrap(),
        "--policy",
        root().join("policies/signed-dev.toml").to_str().unwrap(),
        "--bundle",
        sig("echo.wasm.sigstore.json").to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("signer:   `ci-release`: https://token.actions.githubusercontent.com / https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main"),
        "{out}"
    );
    assert!(out.contains("  signed: "), "{out}");
    assert!(out.contains("  log:    entry "), "{out}");
    assert!(out.contains("verdict:  ADMITTED"), "{out}");
    // The review workflow counts only towards the built-and-reviewed quorum.
    let o = cinfer(&[
        "verify",
        echo_wasm().to_str().unwrap(),
        "--policy",
        root().join("policies/signed-dev.toml").to_str().unwrap(),
        "--bundle",
        sig("echo.review.sigstore.json").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("QuorumNotMet): signed by 1 distinct listed identity: `review` ("),
        "{}",
        text(&o)
    );
}

#[test]
fn inspect_lists_digest_imports_and_exports() {
    let o = cinfer(&["inspect", echo_wasm().to_str().unwrap()]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(echo_wasm()).unwrap()))
    };
    assert!(out.contains(&format!("sha256:   {digest}")), "{out}");
    assert!(
        out.contains("interface cinfer:loader/crypto@0.1.0"),
        "{out}"
    );
    assert!(
        out.contains("interface cinfer:loader/output@0.1.0"),
        "{out}"
    );
    assert!(
        !out.contains("accelerator"),
        "echo imports no accelerator: {out}"
    );
    assert!(out.contains("exports:\n  func run"), "{out}");
    // Not a component.
    let dir = scratch("inspect");
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap();
    let o = cinfer(&["inspect", junk.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a WebAssembly component"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
