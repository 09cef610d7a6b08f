//! The `inference-server` binary's logs (the one set-up every cinfer binary
//! shares, `cinfer-log`): JSON lines with `CINFER_LOG_FORMAT=json`, plain text
//! otherwise, and never colour codes when stderr is not a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs the server for a moment (no loader, no keyserver: it logs that it
/// listens and that it cannot connect) and returns what it wrote to stderr.
fn run(env: &[(&str, &str)]) -> String {
    let bin = env!("CARGO_BIN_EXE_inference-server");
    let dir = std::env::temp_dir().join(format!(
        "cinfer-server-log-{}-{}",
        std::process::id(),
        env.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let keygen = Command::new(bin)
        .args(["keygen", "--out"])
        .arg(dir.join("channel.key"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nloader = \"tcp:127.0.0.1:{}\"\nchannel-key = \"channel.key\"\nkeyservers = [\"http://127.0.0.1:{}\"]\n",
            closed_port(),
            closed_port()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin)
        .args(["--config", "server.toml"])
        .current_dir(&dir)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn json_lines_on_request_plain_text_otherwise_and_no_colour_codes() {
    let json = run(&[("CINFER_LOG", "info"), ("CINFER_LOG_FORMAT", "json")]);
    assert!(json.lines().count() >= 2, "{json}");
    for line in json.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(
        json.lines()
            .any(|l| l.contains("inference server listening")),
        "{json}"
    );
    let text = run(&[("CINFER_LOG", "info")]);
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe: {text:?}");
    assert!(
        text.lines()
            .any(|l| l.contains(" INFO ") && l.contains("inference server listening")),
        "{text}"
    );
    // A filter it cannot read is reported, and the default (info) kept.
    let bad = run(&[("CINFER_LOG", "info,x=loud")]);
    assert!(
        bad.contains("inference-server: CINFER_LOG=\"info,x=loud\" ignored"),
        "{bad}"
    );
    assert!(bad.contains("inference server listening"), "{bad}");
    // Warnings only: the listening line (info) is not written.
    let quiet = run(&[("CINFER_LOG", "warn")]);
    assert!(!quiet.contains("inference server listening"), "{quiet}");
}
