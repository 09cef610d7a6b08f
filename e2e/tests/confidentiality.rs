//! The property this project exists for: nothing secret crosses the untrusted side
//! in cleartext, and a hostile inference server is detected, not believed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_client::ClientError;
use cinfer_e2e::{Hostile, System, chat_request, model_path};
use std::io::{Read, Seek, SeekFrom};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// 64-byte samples of the model's plaintext weights, from the tensor data region.
fn weight_samples() -> Vec<Vec<u8>> {
    let mut f = std::fs::File::open(model_path()).unwrap();
    let len = f.metadata().unwrap().len();
    [0.3, 0.5, 0.7, 0.9]
        .iter()
        .map(|frac| {
            let mut buf = vec![0u8; 64];
            f.seek(SeekFrom::Start((len as f64 * frac) as u64)).unwrap();
            f.read_exact(&mut buf).unwrap();
            buf
        })
        .collect()
}

#[test]
fn no_prompt_completion_or_weight_crosses_the_untrusted_side() {
    let system = System::start("confidential");
    let client = system.client();
    let stamp = format!("{:x}", std::process::id() as u64 * 0x9e37_79b9);
    let canaries = [
        format!("ZEBRA-{stamp}-ORCHID"),
        format!("my password is Xq7{stamp}"),
    ];
    let mut completions = Vec::new();
    // Two chats at once, each prompt carrying a canary.
    std::thread::scope(|s| {
        let handles: Vec<_> = canaries
            .iter()
            .map(|c| {
                let client = &client;
                s.spawn(move || {
                    let mut text = Vec::new();
                    let r = client
                        .chat(
                            "llama-chat",
                            &chat_request(&format!("Repeat this code word exactly: {c}"), 24),
                            |chunk| text.extend_from_slice(chunk),
                        )
                        .expect("chat through the confidential path");
                    assert_eq!(r.receipt.outcome, "completed");
                    String::from_utf8(text).unwrap()
                })
            })
            .collect();
        for h in handles {
            completions.push(h.join().unwrap());
        }
    });
    for c in &completions {
        assert!(c.len() >= 8, "a real completion: {c:?}");
    }
    let weights = weight_samples();
    let seen = system.untrusted_bytes();
    // Positive controls: the recordings hold what does cross in the clear (the
    // program name in each request line and Submit frame, the server's log lines).
    for link in ["client link (in)", "loader link (in)", "server log"] {
        let (_, bytes) = seen.iter().find(|(w, _)| w == link).unwrap();
        assert!(contains(bytes, b"llama-chat"), "{link} was not recorded");
    }
    let (_, replies) = seen.iter().find(|(w, _)| w == "loader link (out)").unwrap();
    assert!(
        replies.len() > 1000,
        "sealed replies recorded: {} bytes",
        replies.len()
    );
    for (where_, bytes) in &seen {
        for c in &canaries {
            assert!(!contains(bytes, c.as_bytes()), "canary {c:?} in {where_}");
            // Nor its distinctive part on its own.
            assert!(
                !contains(bytes, stamp.as_bytes()),
                "canary stamp in {where_}"
            );
        }
        for text in &completions {
            assert!(
                !contains(bytes, text.trim().as_bytes()),
                "completion {text:?} in {where_}"
            );
        }
        for w in &weights {
            assert!(!contains(bytes, w), "plaintext weight bytes in {where_}");
        }
    }
}

#[test]
fn a_hostile_server_is_detected_and_refused() {
    let system = System::start("hostile");
    let client = system.client();
    let ask = |prompt: &str| {
        let mut text = Vec::new();
        let r = client.chat("llama-chat", &chat_request(prompt, 8), |c| {
            text.extend_from_slice(c)
        });
        (r, text)
    };
    // An honest exchange first (and the previous request the replay mode reuses).
    let (ok, _) = ask("Say hello.");
    ok.expect("honest exchange");

    system.set_hostile(Hostile::TamperReply);
    let (r, _) = ask("Name a colour.");
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 1 })),
        "tampered frame: {r:?}"
    );

    system.set_hostile(Hostile::ReorderReplies);
    let (r, text) = ask("Name a fruit.");
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 0 })),
        "reordered frames: {r:?}"
    );
    assert!(text.is_empty(), "nothing delivered from reordered frames");

    system.set_hostile(Hostile::Truncate);
    let (r, _) = ask("Name a country.");
    assert!(
        matches!(r, Err(ClientError::Truncated)),
        "truncated reply: {r:?}"
    );

    system.set_hostile(Hostile::Honest);
    ask("Name a city.").0.expect("honest again");
    system.set_hostile(Hostile::ReplayReply);
    let (r, text) = ask("Name an animal.");
    assert!(
        matches!(r, Err(ClientError::ReplyAuthentication { index: 0 })),
        "frame replayed from another request: {r:?}"
    );
    assert!(text.is_empty());

    system.set_hostile(Hostile::TamperReceipt);
    let (r, _) = ask("Name a planet.");
    assert!(
        matches!(r, Err(ClientError::ReceiptSignature)),
        "tampered receipt: {r:?}"
    );

    system.set_hostile(Hostile::TamperRequest);
    let (r, text) = ask("Name a river.");
    let e = r.expect_err("a tampered request never runs");
    assert!(e.to_string().contains("refused by the loader"), "{e}");
    assert!(text.is_empty());

    // A program the server stores but no policy signer signed was refused by
    // the loader when the server submitted it: it is not served.
    let r = client.chat("evil", &chat_request("hi", 4), |_| {});
    assert!(
        matches!(&r, Err(ClientError::Server { status: 400, .. })),
        "{r:?}"
    );

    // Back to honest: the system still serves.
    system.set_hostile(Hostile::Honest);
    ask("Name a tree.").0.expect("honest at the end");
}

/// A client that hangs up mid-generation stops the work on the trusted side:
/// the server sends the loader a Cancel for that request, and the loader ends
/// the run early with a receipt whose outcome is `cancelled` — long before the
/// 2000 tokens asked for could have been generated.
#[test]
fn a_client_that_hangs_up_stops_its_generation_on_the_loader() {
    use std::io::Write;
    let system = System::start("hangup");
    let statement = system.client().request_key().unwrap();
    let key = cinfer_envelope::RequestPublicKey::from_bytes(&statement.public_key).unwrap();
    let request = serde_json::to_vec(&serde_json::json!({
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "temperature": 0.0,
        "format": "text",
        "ignore_eos": true,
    }))
    .unwrap();
    let (sealed, _) = cinfer_envelope::seal_request(&key, &request).unwrap();
    let started = std::time::Instant::now();
    let url = system.server_url.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&url).unwrap();
    write!(
        conn,
        "POST /v1/requests?program=llama-chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        sealed.len()
    )
    .unwrap();
    conn.write_all(&sealed).unwrap();
    // Wait for the response head and the first streamed bytes, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, b"\r\n\r\n") || got.len() < 512 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(conn);

    // The loader's receipt for it says `cancelled`, and a Cancel frame
    // (version 1, kind 13, 8-byte request id) went from the server to the loader.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (inbound, outbound) = {
            let r = system.loader_link.lock().unwrap();
            (r.inbound.clone(), r.outbound.clone())
        };
        // (The receipt is a JSON string inside the signed receipt: quotes escaped.)
        if contains(&outbound, br#"\"outcome\":\"cancelled\""#) {
            assert!(
                contains(&inbound, &[1, 13, 0, 0, 0, 0, 0, 8]),
                "no Cancel frame"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the loader did not cancel the run"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    // 2000 tokens at ~100 tok/s would take ~20 s.
    assert!(elapsed < std::time::Duration::from_secs(10), "{elapsed:?}");
    // The system still serves.
    let mut text = Vec::new();
    system
        .client()
        .chat(
            "llama-chat",
            &chat_request("What is the capital of France?", 12),
            |c| text.extend_from_slice(c),
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&text).contains("Paris"));
}
