//! k-of-n keyservers end to end, as operators run them: `cinfer split-key`
//! shares imported with `keyserver add-share` into three keyserver processes,
//! a loader with `keyserver-threshold = 2`, the untrusted inference server
//! attesting it to each keyserver, and a client that seals only to a request
//! key two pinned keyservers state (all real processes and swtpm on loopback).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{KeyserverRole, System, chat_request};
use std::time::{Duration, Instant};

fn chat(system: &System) -> cinfer_client::ChatResult {
    let mut text = Vec::new();
    let r = system
        .client()
        .chat(
            "llama-chat",
            &chat_request("What is the capital of France?", 8),
            |c| text.extend_from_slice(c),
        )
        .expect("chat through 2-of-3 keyservers");
    assert!(!text.is_empty());
    assert_eq!(r.receipt.outcome, "completed");
    r
}

fn hex_ids(system: &System, which: &[usize]) -> Vec<String> {
    which
        .iter()
        .map(|i| hex::encode(&system.identities[*i]))
        .collect()
}

/// One keyserver down, or one whose reference values refuse this loader:
/// the other two serve, and the receipt names them.
#[test]
fn two_of_three_keyservers_serve_with_one_down_or_refusing() {
    use KeyserverRole::*;
    for (name, roles, opened_by) in [
        ("quorum-down", [Honest, Down, Honest], [0, 2]),
        ("quorum-refuses", [Refuses, Honest, Honest], [1, 2]),
    ] {
        let system = System::start_quorum(name, &roles, 2);
        system.wait_ready();
        let r = chat(&system);
        assert_eq!(r.receipt.keyservers, hex_ids(&system, &opened_by), "{name}");
        // A client that pins one of them and a keyserver that is not in
        // this system, needing two, refuses to seal to the key.
        let stranger = p256::ecdsa::SigningKey::from_slice(&[9; 32])
            .unwrap()
            .verifying_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec();
        let err = cinfer_client::Client::new(&system.server_url, stranger.clone())
            .unwrap()
            .with_keyserver_quorum(vec![system.identities[opened_by[0]].clone(), stranger], 2)
            .unwrap()
            .chat("llama-chat", &chat_request("hello", 4), |_| {})
            .unwrap_err();
        assert!(
            matches!(
                err,
                cinfer_client::ClientError::NoKeyserverQuorum {
                    agreeing: 1,
                    needed: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}

/// Two of three refuse: nothing is released, the server never becomes ready,
/// and `/readyz` tells the operator why (the refusal and the shares still
/// missing). Clients still see the request key stated by all three, but the
/// loader holds no key, so a request is refused without running.
#[test]
fn two_refusing_keyservers_release_nothing_and_say_why() {
    use KeyserverRole::*;
    let system = System::start_quorum("quorum-two-refuse", &[Refuses, Honest, Refuses], 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = system.readyz();
        assert_ne!(status, 200, "ready with one keyserver's shares: {body}");
        if body.contains("differs from its reference value") && body.contains("1 of the 2") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no reason in /readyz: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        body.contains("has shares of 1 of the 2 keyservers it needs"),
        "{body}"
    );
    let err = system
        .client()
        .chat("llama-chat", &chat_request("hello", 4), |_| {})
        .unwrap_err();
    assert!(
        matches!(err, cinfer_client::ClientError::NoAttestedLoader(_)),
        "{err}"
    );
}

/// `cinfer proxy` pinned to the three keyservers with `--keyserver-threshold
/// 2` serves an OpenAI chat completion through a 2-of-3 system, with a
/// verified receipt naming the two keyservers whose shares opened it.
#[test]
fn the_proxy_trusts_two_of_three_keyservers() {
    use std::io::{Read, Write};
    let system = System::start_quorum("quorum-proxy", &[KeyserverRole::Honest; 3], 2);
    system.wait_ready();
    let mut args: Vec<String> = system
        .identities
        .iter()
        .flat_map(|id| ["--keyserver-identity".to_owned(), hex::encode(id)])
        .collect();
    args.extend(["--keyserver-threshold", "2", "--any-program"].map(String::from));
    let (proxy, line, base) = cinfer_e2e::start_proxy(&system.server_url, &args);
    assert!(line.contains("2 of 3 keyservers"), "{line}");
    let addr = base
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let body = serde_json::json!({
        "model": cinfer_e2e::MODEL_ID,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(&addr).expect("proxy");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    drop(proxy);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let json: serde_json::Value = serde_json::from_str(
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}: {response}"));
    let content = json["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(json["cinfer"]["verified"], true, "{json}");
    assert_eq!(
        json["cinfer"]["receipt"]["keyservers"],
        serde_json::json!(hex_ids(&system, &[0, 1])),
        "{json}"
    );
}
