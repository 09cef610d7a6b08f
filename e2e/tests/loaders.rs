//! Several trusted loaders behind one inference server (`loaders = [...]`),
//! as operators run them: each loader its own process, swtpm and
//! configuration, each attested to the keyserver on its own; real processes
//! on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{System, chat_request};
use std::collections::BTreeSet;

fn chat(client: &cinfer_client::Client, prompt: &str) {
    let mut text = Vec::new();
    let r = client
        .chat("llama-chat", &chat_request(prompt, 6), |c| {
            text.extend_from_slice(c)
        })
        .expect("chat over two loaders");
    assert_eq!(r.receipt.outcome, "completed");
    assert!(!text.is_empty());
}

/// Concurrent chats go to both loaders; with one killed, the other serves
/// every request and `/readyz` still answers ready, naming the one down.
#[test]
fn two_loaders_share_the_requests_and_one_killed_leaves_the_other_serving() {
    let mut system = System::start_loaders("two-loaders", 2);
    let clients: Vec<_> = (0..4).map(|_| system.client()).collect();
    std::thread::scope(|s| {
        for (i, c) in clients.iter().enumerate() {
            s.spawn(move || chat(c, &format!("Count to {}.", i + 3)));
        }
    });
    let used: BTreeSet<String> = system.submitted_to().into_iter().collect();
    assert_eq!(used.len(), 2, "both loaders got requests: {used:?}");

    system.kill_loader(1);
    let before = system.submitted_to().len();
    for i in 0..3 {
        chat(&system.client(), &format!("Name a colour, {i}."));
    }
    let (status, body) = system.readyz();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let loaders = v["loaders"].as_array().unwrap();
    let ready: Vec<bool> = loaders.iter().map(|l| l["ready"] == true).collect();
    assert_eq!(ready, [true, false], "{body}");
    // Every request after the kill completed on the first loader (one
    // submitted to the killed loader before the server noticed is moved).
    let first = loaders[0]["loader"].as_str().unwrap().to_owned();
    let after = system.submitted_to();
    let on_first = after[before..].iter().filter(|l| **l == first).count();
    assert_eq!(on_first, 3, "{after:?}");
}
