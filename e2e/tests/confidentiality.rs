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
