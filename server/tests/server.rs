//! The inference server in process on loopback, against a fake loader (the
//! channel protocol over TCP) and a fake keyserver (HTTP). The real loader's end
//! to end test lives elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn expected_frame(body: &[u8], i: usize) -> Vec<u8> {
    let mut f = body.to_vec();
    f.extend_from_slice(format!("#{i}").as_bytes());
    f
}

/// Checks a completed stream: `FRAMES` frames of `body` in order, then the receipt.
fn assert_completed(body: &[u8], records: &[(u8, Vec<u8>)]) {
    assert_eq!(records.len(), FRAMES + 1, "{records:?}");
    for (i, (kind, bytes)) in records[..FRAMES].iter().enumerate() {
        assert_eq!(*kind, 1);
        assert_eq!(bytes, &expected_frame(body, i));
    }
    assert_eq!(records[FRAMES].0, 2, "receipt last");
    assert_eq!(json(&records[FRAMES].1)["receipt"], "fake");
}

#[tokio::test]
async fn a_request_streams_records_in_order_as_they_arrive() {
    let h = start().await;
    wait_ready(h.addr).await;
    let loader = h.loader.as_ref().unwrap();
    let body = b"gated sealed request";
    let mut reply = post_request(h.addr, "echo", body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/vnd.cinfer.reply-stream")
    );
    assert_eq!(
        reply.header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    // The first record arrives while the loader is still holding the rest back.
    let first = reply.next_record().await.unwrap();
    assert_eq!(first, (1, expected_frame(body, 0)));
    assert_eq!(loader.stats.frames_sent.load(Ordering::SeqCst), 1);
    loader.gate.add_permits(1);
    let mut records = vec![first];
    records.extend(reply.records().await);
    assert_completed(body, &records);
}

#[tokio::test]
async fn concurrent_requests_get_their_own_frames() {
    let h = start().await;
    wait_ready(h.addr).await;
    let loader = h.loader.as_ref().unwrap();
    let (a, b) = (b"gated request A".as_slice(), b"gated request B".as_slice());
    let mut ra = post_request(h.addr, "echo", a).await;
    let mut rb = post_request(h.addr, "echo", b).await;
    // Both are in flight on the one loader connection at once.
    let fa = ra.next_record().await.unwrap();
    let fb = rb.next_record().await.unwrap();
    assert_eq!(loader.stats.submits.load(Ordering::SeqCst), 2);
    loader.gate.add_permits(2);
    let (rest_a, rest_b) = tokio::join!(ra.records(), rb.records());
    let mut all_a = vec![fa];
    all_a.extend(rest_a);
    let mut all_b = vec![fb];
    all_b.extend(rest_b);
    assert_completed(a, &all_a);
    assert_completed(b, &all_b);
}

#[tokio::test]
async fn unknown_programs_and_refusals_are_400_busy_429_and_wrong_routes_404_405() {
    let h = start().await;
    wait_ready(h.addr).await;
    // Not in the loader's Hello: refused here, never submitted.
    let r = post_request(h.addr, "nope", b"x").await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r.body().await).contains("unknown program \"nope\""));
    // Listed, but refused by the loader (e.g. the request does not open).
    let r = post_request(h.addr, "refuse-me", b"x").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r.body().await),
        "refused by the loader: request does not open"
    );
    assert_eq!(
        h.loader
            .as_ref()
            .unwrap()
            .stats
            .submits
            .load(Ordering::SeqCst),
        1
    );
    // A busy loader (in-flight slots or the replay window full) is 429, one
    // shutting down 503, both with Retry-After: the client may try again.
    for (reason, status) in [
        ("busy: 8 requests in flight", 429),
        (
            "busy: 4096 requests already run within the replay window of 300s; try again later",
            429,
        ),
        ("shutting down: not taking new requests", 503),
    ] {
        let submits = || {
            h.loader
                .as_ref()
                .unwrap()
                .stats
                .submits
                .load(Ordering::SeqCst)
        };
        let before = submits();
        let r = post_request(h.addr, "refuse-me", format!("reason:{reason}").as_bytes()).await;
        // No in-flight place on the loader may be a moment's race with a run
        // ending: submitted again 4 times (10 + 20 + 40 + 80 ms) before the 429.
        let tries = if reason.contains("in flight") { 5 } else { 1 };
        assert_eq!(submits() - before, tries, "{reason}");
        assert_eq!(r.status, status, "{reason}");
        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{reason}");
        assert_eq!(
            error_of(&r.body().await),
            format!("refused by the loader: {reason}")
        );
    }
    let r = post_request(h.addr, "refuse-me", b"reason:malformed request: bad header").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("retry-after"), None);
    // No program at all.
    let r = Reply::send(
        h.addr,
        "POST /v1/requests HTTP/1.1\r\nContent-Length: 1",
        b"x",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r.body().await).contains("program"));
    let r = Reply::send(h.addr, "GET /v1/requests?program=echo HTTP/1.1", b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    let r = Reply::send(h.addr, "POST /readyz HTTP/1.1\r\nContent-Length: 0", b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(get(h.addr, "/v2/whatever").await.0, 404);
    // The server still serves.
    let mut r = post_request(h.addr, "echo", b"after").await;
    assert_completed(b"after", &r.records().await);
}

/// A bounded queue in front of the loader (`max-in-flight` 1, `max-queued`
/// 1): a second request waits, in the server and not on the loader, for the
/// first to finish and then runs; a third, with the queue full, is 429 with
/// `Retry-After` at once and never submitted.
#[tokio::test]
async fn requests_wait_in_a_bounded_queue_then_are_429() {
    let h = start_with(|c| {
        c.max_in_flight = 1;
        c.max_queued = 1;
    })
    .await;
    wait_ready(h.addr).await;
    let loader = h.loader.as_ref().unwrap();
    let a = b"gated request A";
    let mut ra = post_request(h.addr, "echo", a).await;
    let first_a = ra.next_record().await.unwrap();
    let addr = h.addr;
    let b = tokio::spawn(async move {
        let mut rb = post_request(addr, "echo", b"request B").await;
        (rb.status, rb.records().await)
    });
    let started = Instant::now();
    loop {
        let (_, text) = get(h.addr, "/metrics").await;
        if metric(
            &String::from_utf8_lossy(&text),
            "cinfer_server_requests_queued ",
        ) == 1
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "B never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        loader.stats.submits.load(Ordering::SeqCst),
        1,
        "B waits here"
    );
    let rc = post_request(h.addr, "echo", b"request C").await;
    assert_eq!(rc.status, 429);
    assert_eq!(rc.header("retry-after").as_deref(), Some("1"));
    assert!(
        error_of(&rc.body().await).contains("1 requests running on the loader and 1 waiting"),
        "the reason names the limits"
    );
    loader.gate.add_permits(1);
    let mut records_a = vec![first_a];
    records_a.extend(ra.records().await);
    assert_completed(a, &records_a);
    let (status_b, records_b) = b.await.unwrap();
    assert_eq!(status_b, 200);
    assert_completed(b"request B", &records_b);
    assert_eq!(
        loader.stats.submits.load(Ordering::SeqCst),
        2,
        "C never submitted"
    );
    let (_, text) = get(h.addr, "/metrics").await;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(
        metric(&text, "cinfer_server_requests_total{outcome=\"busy\"}"),
        1
    );
    assert_eq!(metric(&text, "cinfer_server_requests_queued "), 0);
}

#[tokio::test]
async fn keyserver_down_means_503_quickly_never_a_hang() {
    capture_logs();
    let refused = closed_port_url().await;
    let hung = black_hole_url().await;
    let h = start_with(|c| {
        c.keyservers = vec![refused.clone(), hung.clone()];
        c.keyserver_timeout = Duration::from_millis(300);
        c.ready_timeout = Duration::from_millis(800);
    })
    .await;
    // Let the link connect and fail at least one round.
    let t = Instant::now();
    loop {
        let m = get(h.addr, "/metrics").await.1;
        let m = String::from_utf8(m).unwrap();
        if metric(
            &m,
            "cinfer_server_attestations_total{outcome=\"keyserver_error\"}",
        ) >= 2
        {
            assert!(m.contains("cinfer_server_loader_connected 1"), "{m}");
            assert!(m.contains("cinfer_server_loader_ready 0"), "{m}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(h.addr, "/readyz").await;
    assert_eq!(status, 503);
    let reason = error_of(&body);
    assert!(reason.contains("no keyserver released keys"), "{reason}");
    assert!(
        reason.contains(&refused) && reason.contains("unreachable"),
        "{reason}"
    );
    assert!(
        reason.contains(&hung) && reason.contains("no answer within 300 ms"),
        "{reason}"
    );

    let t = Instant::now();
    let r = post_request(h.addr, "echo", b"sealed").await;
    let waited = t.elapsed();
    assert_eq!(r.status, 503);
    let reason = error_of(&r.body().await);
    assert!(
        reason.starts_with("no attested loader available"),
        "{reason}"
    );
    assert!(reason.contains("keyserver"), "{reason}");
    assert!(
        // Bounded by the ready-timeout (0.8 s), not the request timeout (120 s);
        // the upper bound leaves room for a loaded CI machine.
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(
        h.loader
            .as_ref()
            .unwrap()
            .stats
            .submits
            .load(Ordering::SeqCst),
        0
    );
    // Nothing relayable either.
    let (status, body) = get(h.addr, "/v1/request-key").await;
    assert_eq!(status, 502);
    assert!(error_of(&body).contains("no keyserver reachable"));
}

#[tokio::test]
async fn a_restarted_loader_is_reconnected_and_attested_again() {
    let mut h = start().await;
    wait_ready(h.addr).await;
    assert_eq!(h.ks.attests.load(Ordering::SeqCst), 1);
    let loader = h.loader.take().unwrap();
    let addr = loader.addr;
    // A request in flight when the loader goes away ends with an error record.
    let body = b"gated in flight";
    let mut r = post_request(h.addr, "echo", body).await;
    assert_eq!(r.next_record().await.unwrap(), (1, expected_frame(body, 0)));
    loader.stop().await;
    let rest = r.records().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].0, 3);
    assert!(
        error_of(&rest[0].1).contains("loader connection was lost"),
        "{rest:?}"
    );
    // Meanwhile: not ready; requests get a 503.
    let (status, _) = get(h.addr, "/readyz").await;
    assert_eq!(status, 503);

    // The loader comes back on the same port, holding no keys.
    let loader = FakeLoader::start(addr).await;
    wait_ready(h.addr).await;
    assert_eq!(h.ks.attests.load(Ordering::SeqCst), 2, "attested again");
    assert_eq!(loader.stats.attest_requests.load(Ordering::SeqCst), 1);
    assert_eq!(loader.stats.connections.load(Ordering::SeqCst), 1);
    let mut r = post_request(h.addr, "echo", b"after restart").await;
    assert_eq!(r.status, 200);
    assert_completed(b"after restart", &r.records().await);
    h.loader = Some(loader);
    let m = String::from_utf8(get(h.addr, "/metrics").await.1).unwrap();
    assert!(
        m.contains("cinfer_server_requests_total{outcome=\"stream_error\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cinfer_server_attestations_total{outcome=\"released\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let h = start().await;
    wait_ready(h.addr).await;
    let big = vec![7u8; 4097];
    let r = post_request(h.addr, "echo", &big).await;
    assert_eq!(r.status, 413);
    assert!(error_of(&r.body().await).contains("larger than 4096 bytes"));
    // Chunked, no Content-Length: counted as it arrives.
    let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = Reply::send(
        h.addr,
        "POST /v1/requests?program=echo HTTP/1.1\r\nTransfer-Encoding: chunked",
        &chunked,
    )
    .await;
    assert_eq!(r.status, 413);
    // Exactly the limit is fine.
    let mut r = post_request(h.addr, "echo", &big[..4096]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.records().await.len(), FRAMES + 1);
    assert_eq!(
        h.loader
            .as_ref()
            .unwrap()
            .stats
            .submits
            .load(Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn metrics_models_programs_request_key_and_health() {
    let refused = closed_port_url().await;
    let h = start_with(|_| {}).await;
    // A second server whose first keyserver is down: request-key comes from the next.
    let h2 = start_with(|c| c.keyservers = vec![refused.clone(), h.ks.url()]).await;
    wait_ready(h.addr).await;
    wait_ready(h2.addr).await;

    let mut r = post_request(h.addr, "echo", b"counted").await;
    assert_completed(b"counted", &r.records().await);
    assert_eq!(post_request(h.addr, "nope", b"x").await.status, 400);

    let r = Reply::send(h.addr, "GET /metrics HTTP/1.1", b"").await;
    assert_eq!(r.status, 200);
    // The same exposition type as the keyserver's and the proxy's.
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let m = String::from_utf8(r.body().await).unwrap();
    for line in [
        "cinfer_server_requests_total{outcome=\"completed\"} 1",
        "cinfer_server_requests_total{outcome=\"bad_request\"} 1",
        "cinfer_server_requests_total{outcome=\"unavailable\"} 0",
        "cinfer_server_reply_frames_total 3",
        &format!(
            "cinfer_server_reply_bytes_total {}",
            3 * (b"counted".len() + 2)
        ),
        "cinfer_server_attestations_total{outcome=\"released\"} 1",
        "cinfer_server_attestations_total{outcome=\"keyserver_error\"} 0",
        "cinfer_server_requests_in_flight 0",
        "cinfer_server_loader_connected 1",
        "cinfer_server_loader_ready 1",
        "# TYPE cinfer_server_requests_total counter",
        "# TYPE cinfer_server_loader_ready gauge",
        // Histograms: the completed request's time to its first frame, its
        // duration, its wait for a place and its frames; the bad request's
        // duration; the attestation round.
        "cinfer_server_time_to_first_frame_seconds_count 1",
        "cinfer_server_request_duration_seconds_count{outcome=\"completed\"} 1",
        "cinfer_server_request_duration_seconds_count{outcome=\"bad_request\"} 1",
        "cinfer_server_queue_wait_seconds_count 1",
        "cinfer_server_reply_frames_per_request_count 1",
        "cinfer_server_reply_frames_per_request_sum 3.0",
        "cinfer_server_attestation_duration_seconds_count{outcome=\"released\"} 1",
        "# TYPE cinfer_server_time_to_first_frame_seconds histogram",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing from\n{m}");
    }
    // The loader became ready at a time the test saw pass.
    let since: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cinfer_server_loader_link_ready_since_seconds{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("ready_since gauge");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(since > now - 600 && since <= now, "{since} vs {now}");

    let (status, body) = get(h.addr, "/v1/models").await;
    assert_eq!(
        (status, json(&body)),
        (200, serde_json::json!({"models": ["m1"]}))
    );
    let (status, body) = get(h.addr, "/v1/programs").await;
    assert_eq!(status, 200);
    let programs = json(&body);
    assert_eq!(programs["programs"][0]["name"], "echo");
    assert_eq!(programs["programs"][0]["sha256"], "aa");
    assert_eq!(programs["programs"][0]["world"], "request-reply");
    assert_eq!(get(h.addr, "/healthz").await.0, 200);
    assert_eq!(get(h.addr, "/readyz").await.0, 200);

    for addr in [h.addr, h2.addr] {
        let r = Reply::send(addr, "GET /v1/request-key HTTP/1.1", b"").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(r.body().await, REQUEST_KEY.as_bytes(), "relayed verbatim");
    }
    // The evidence reached the keyserver verbatim.
    let evidence = h.ks.evidence.lock().unwrap().clone();
    assert!(evidence.iter().all(|e| json(e)["fake"] == "evidence"));
}

#[tokio::test]
async fn logs_never_contain_request_or_reply_bytes() {
    let h = start().await;
    wait_ready(h.addr).await;
    let canary = b"CANARY-5e1f-sealed-request-bytes";
    let mut r = post_request(h.addr, "echo", canary).await;
    assert_completed(canary, &r.records().await);
    let r = post_request(h.addr, "refuse-me", canary).await;
    assert_eq!(r.status, 400);
    let r = post_request(h.addr, "nope", canary).await;
    assert_eq!(r.status, 400);
    let logs = logs();
    let text = String::from_utf8_lossy(&logs);
    assert!(text.contains("request finished"), "logs captured");
    assert!(text.contains("request_id="), "logs carry the request id");
    assert!(text.contains("request_bytes=32"), "and sizes");
    assert!(!contains(&logs, b"CANARY"), "payload bytes in the logs");
    assert!(!contains(&logs, hex::encode(canary).as_bytes()));
    assert!(!contains(&logs, hex::encode_upper(canary).as_bytes()));
    assert!(
        !contains(&logs, RELEASE.as_bytes()),
        "key release in the logs"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_streams_finish() {
    let mut h = start().await;
    wait_ready(h.addr).await;
    let body = b"gated during shutdown";
    let mut r = post_request(h.addr, "echo", body).await;
    let first = r.next_record().await.unwrap();
    h.shutdown.take().unwrap().send(()).unwrap();
    // New connections are refused once the listener is gone.
    let t = Instant::now();
    while tokio::net::TcpStream::connect(h.addr).await.is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.loader.as_ref().unwrap().gate.add_permits(1);
    let mut records = vec![first];
    records.extend(r.records().await);
    assert_completed(body, &records);
    tokio::time::timeout(Duration::from_secs(5), h.serve.take().unwrap())
        .await
        .expect("serve returns after the last stream")
        .unwrap();
}

/// A client that hangs up mid-stream gets its request cancelled on the loader
/// (a Cancel frame with its id); a request that finished is not cancelled.
#[tokio::test]
async fn a_client_that_hangs_up_gets_its_request_cancelled_on_the_loader() {
    let h = start().await;
    wait_ready(h.addr).await;
    let loader = h.loader.as_ref().unwrap();
    // A request that completes: no Cancel.
    let done = post_request(h.addr, "echo", b"plain request").await;
    assert_eq!(done.status, 200);
    let _ = done.body().await;
    // A request whose client goes away after the first record.
    let mut reply = post_request(h.addr, "echo", b"gated request").await;
    assert_eq!(reply.status, 200);
    assert!(reply.next_record().await.is_some());
    drop(reply);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let cancelled = loader.stats.cancelled.lock().unwrap().clone();
        if !cancelled.is_empty() {
            assert_eq!(
                cancelled.len(),
                1,
                "only the unfinished request: {cancelled:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Cancel reached the loader"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The connection stays up: the next request is served.
    loader.gate.add_permits(1);
    let next = post_request(h.addr, "echo", b"after the cancel").await;
    assert_eq!(next.status, 200);
    assert_eq!(loader.stats.connections.load(Ordering::SeqCst), 1);
}

// ------------------------------------------------ slow clients (issue 16, bug 9)

/// Sends a request head announcing `len` body bytes, then trickles one body
/// byte every 100 ms (until the server stops reading). Returns the read half.
async fn trickle_body(addr: std::net::SocketAddr, len: usize) -> tokio::net::tcp::OwnedReadHalf {
    use tokio::io::AsyncWriteExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /v1/requests?program=echo HTTP/1.1\r\nHost: server\r\nContent-Length: {len}\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        for _ in 0..len {
            if wr.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    rd
}

/// Everything the server sends until it closes (a reset counts as closed),
/// within `limit`.
async fn read_until_closed(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server did not close the connection in time");
    out
}

/// The status and JSON `error` of a whole `Content-Length` response.
fn status_and_error(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, error_of(body.as_bytes()))
}

fn connections_open(h: &Harness) -> u64 {
    metric(
        &h.server.metrics_text(),
        "cinfer_server_http_connections_open",
    )
}

async fn wait_connections_open(h: &Harness, n: u64) {
    let t = Instant::now();
    while connections_open(h) != n {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} connections open, expected {n}",
            connections_open(h)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client that sends its headers and then trickles the body is answered 408
/// with the reason once `body-timeout` passes (not after the 10 s request
/// timeout), nothing reaches the loader, and its connection is closed.
#[tokio::test]
async fn a_trickled_body_is_cut_off_with_408_after_the_body_timeout() {
    let h = start_with(|c| {
        c.body_timeout = Duration::from_millis(1000);
        c.header_timeout = Duration::from_secs(5);
    })
    .await;
    wait_ready(h.addr).await;
    let started = Instant::now();
    let mut rd = trickle_body(h.addr, 4096).await;
    let response = read_until_closed(&mut rd, Duration::from_secs(8)).await;
    let elapsed = started.elapsed();
    assert_eq!(
        status_and_error(&response),
        (408, "request body not received within 1000 ms".to_owned())
    );
    assert!(
        String::from_utf8_lossy(&response)
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert!(
        elapsed >= Duration::from_millis(1000),
        "cut off early: {elapsed:?}"
    );
    let loader = h.loader.as_ref().unwrap();
    assert_eq!(loader.stats.submits.load(Ordering::SeqCst), 0);
    wait_connections_open(&h, 0).await;
}

/// A client that never finishes its request head, and one that connects and
/// says nothing, are disconnected after `header-timeout` without an answer.
#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let h = start_with(|c| c.header_timeout = Duration::from_millis(1000)).await;
    wait_ready(h.addr).await;
    let started = Instant::now();
    let mut partial = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    partial
        .write_all(b"POST /v1/requests?program=echo HTTP/1.1\r\nHost: server\r\n")
        .await
        .unwrap();
    let mut idle = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    wait_connections_open(&h, 2).await;
    let from_partial = read_until_closed(&mut partial, Duration::from_secs(6)).await;
    let from_idle = read_until_closed(&mut idle, Duration::from_secs(6)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "closed early: {:?}",
        started.elapsed()
    );
    assert_eq!(String::from_utf8_lossy(&from_partial), "");
    assert_eq!(String::from_utf8_lossy(&from_idle), "");
    wait_connections_open(&h, 0).await;
}

/// With `max-connections` open (slow senders), further connections are
/// closed at once without an answer while the cap holds; the open count never
/// passes the cap (so body memory stays within max-connections ×
/// max-request-bytes); once the body timeout frees the slots, clients are
/// served again.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_while_the_cap_holds() {
    let h = start_with(|c| {
        c.max_connections = 4;
        c.body_timeout = Duration::from_millis(3000);
    })
    .await;
    wait_ready(h.addr).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(trickle_body(h.addr, 4096).await);
    }
    wait_connections_open(&h, 4).await;
    let refused_before = metric(
        &h.server.metrics_text(),
        "cinfer_server_http_connections_refused_total",
    );
    for _ in 0..20 {
        let t = Instant::now();
        let mut extra = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let answer = read_until_closed(&mut extra, Duration::from_secs(2)).await;
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "",
            "an answer over the cap"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "not closed at once");
        assert!(connections_open(&h) <= 4, "more than the cap open");
    }
    let text = h.server.metrics_text();
    assert_eq!(
        metric(&text, "cinfer_server_http_connections_refused_total") - refused_before,
        20
    );
    assert_eq!(metric(&text, "cinfer_server_http_connections_open"), 4);
    // The slow senders are cut off with 408, which frees the cap.
    for mut rd in held {
        let response = read_until_closed(&mut rd, Duration::from_secs(8)).await;
        assert_eq!(
            status_and_error(&response),
            (408, "request body not received within 3000 ms".to_owned())
        );
    }
    wait_connections_open(&h, 0).await;
    let (status, _) = get(h.addr, "/healthz").await;
    assert_eq!(status, 200);
    let r = post_request(h.addr, "echo", b"after the slow senders").await;
    assert_eq!(r.status, 200);
}

// ------------------------------------------------ the loader's channel (issue 16, bug 7)

/// Against a loader that serves only servers it lists, the server answers the
/// challenge with its channel key, becomes ready and serves requests, and
/// pings the link every third of the loader's idle timeout while it is idle.
#[tokio::test]
async fn the_server_answers_the_loaders_challenge_and_pings_an_idle_link() {
    let key = cinfer_server::ChannelKey::generate().unwrap();
    let auth = FakeAuth {
        key: p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_sec1()).unwrap(),
        idle_timeout_ms: 300,
    };
    let loader = FakeLoader::start_authenticating(auth).await;
    let h = start_with_loader(loader, |c| c.channel_key = Some(key)).await;
    wait_ready(h.addr).await;
    let stats = h.loader.as_ref().unwrap().stats.clone();
    assert_eq!(stats.authenticated.load(Ordering::SeqCst), 1);
    let mut r = post_request(h.addr, "echo", b"after auth").await;
    assert_eq!(r.status, 200);
    assert_completed(b"after auth", &r.records().await);
    let before = stats.pings.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pings = stats.pings.load(Ordering::SeqCst) - before;
    assert!(
        (2..=8).contains(&pings),
        "{pings} pings in 700 ms at one per 100 ms"
    );
    assert_eq!(stats.connections.load(Ordering::SeqCst), 1);
}

/// A server whose key the loader does not list, or that has none, is not
/// served and says why in `/readyz`.
#[tokio::test]
async fn a_server_without_the_loaders_key_is_not_served_and_says_why() {
    let listed = cinfer_server::ChannelKey::generate().unwrap();
    let auth = FakeAuth {
        key: p256::ecdsa::VerifyingKey::from_sec1_bytes(&listed.public_sec1()).unwrap(),
        idle_timeout_ms: 60_000,
    };
    let other = cinfer_server::ChannelKey::generate().unwrap();
    let other_hex = other.public_hex();
    for (key, expected) in [
        (
            Some(other),
            format!(
                "the loader refused this server's channel key {other_hex}: peer dropped: key is not one of this loader's server-keys"
            ),
        ),
        (
            None,
            "the loader serves only servers it lists (server-keys) and no channel-key is configured"
                .to_owned(),
        ),
    ] {
        let loader = FakeLoader::start_authenticating(auth.clone()).await;
        let h = start_with_loader(loader, |c| c.channel_key = key).await;
        let t = Instant::now();
        let reason = loop {
            let (status, body) = get(h.addr, "/readyz").await;
            assert_eq!(status, 503);
            let reason = error_of(&body);
            if reason.contains("loader connection lost") {
                break reason;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{reason}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            reason,
            format!("no attested loader: loader connection lost: {expected}")
        );
        let stats = &h.loader.as_ref().unwrap().stats;
        assert_eq!(stats.authenticated.load(Ordering::SeqCst), 0);
        assert_eq!(stats.attest_requests.load(Ordering::SeqCst), 0);
    }
}

/// With `tls-cert`/`tls-key` the listener speaks only TLS: a client that
/// trusts the deployment's CA gets its answers over https (here the fake
/// keyserver's canned statement, which it then refuses as malformed), one that does not is refused in the handshake, and plain HTTP gets
/// no answer. The CA and certificate are made here (rcgen), never real ones.
#[tokio::test]
async fn the_listener_speaks_tls_to_clients_that_trust_its_ca() {
    use cinfer_client::{Client, ClientError};
    let test_ca = cinfer_tls::TestCa::new("127.0.0.1").unwrap();
    let h = start_with(|c| c.tls = Some(test_ca.identity().unwrap())).await;
    let https = format!("https://127.0.0.1:{}", h.addr.port());
    let ca_pem = test_ca.ca_pem.clone();
    // Any well-formed keyserver identity: the fake's statement will not verify under it.
    let identity = p256::ecdsa::SigningKey::from_slice(&[7u8; 32])
        .unwrap()
        .verifying_key()
        .to_sec1_point(false)
        .as_bytes()
        .to_vec();
    let identity2 = identity.clone();
    let (trusted, untrusted, plain) = tokio::task::spawn_blocking(move || {
        let client = |url: &str| {
            Client::new(url, identity.clone())
                .map(|c| c.with_timeouts(Duration::from_secs(5), Duration::from_secs(5)))
        };
        let trusted = client(&https)
            .and_then(|c| c.with_root_certificates(&ca_pem))
            .and_then(|c| c.request_key());
        let untrusted = client(&https).and_then(|c| c.request_key());
        let plain = client(&https.replacen("https://", "http://", 1)).and_then(|c| c.request_key());
        (trusted, untrusted, plain)
    })
    .await
    .unwrap();
    // Over TLS the fake's canned statement arrives and is refused on its merits.
    match trusted {
        Err(ClientError::MalformedResponse(m)) => assert!(m.contains("SignedRequestKey"), "{m}"),
        other => panic!("{other:?}"),
    }
    match untrusted {
        Err(ClientError::Io(m)) => assert!(m.contains("UnknownIssuer"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(plain, Err(ClientError::Io(_) | ClientError::Http(_))),
        "{plain:?}"
    );
    // A CA file without a certificate, and tls-cert without tls-key, are refused.
    let c = Client::new(&format!("https://127.0.0.1:{}", h.addr.port()), identity2);
    assert!(matches!(
        c.and_then(|c| c.with_root_certificates(b"not pem")),
        Err(ClientError::InvalidCaCertificate(_))
    ));
    let e = cinfer_server::config::Config::parse("tls-cert = \"a.pem\"\n").unwrap_err();
    assert!(
        e.to_string().contains("tls-cert and tls-key go together"),
        "{e}"
    );
}

/// The harness with a second fake loader (`loaders = [first, second]`),
/// once both links are attested.
async fn start_two_loaders() -> (Harness, FakeLoader) {
    let second = FakeLoader::start("127.0.0.1:0".parse().unwrap()).await;
    let second_addr = second.addr;
    let h = start_with(|c| {
        c.loaders
            .push(cinfer_channel::Endpoint::Tcp(second_addr.to_string()));
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.server.links().iter().all(|l| l.status().ready()) {
        assert!(Instant::now() < deadline, "both loaders attested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (h, second)
}

/// `loaders`: each loader its own link and attestation; requests go to the
/// least busy ready loader; with one gone, the other serves alone, and
/// `/readyz` names each loader's state.
#[tokio::test]
async fn requests_spread_over_two_loaders_and_one_down_leaves_the_other_serving() {
    let (mut h, second) = start_two_loaders().await;
    let second_addr = second.addr;
    // Both attested (each to the keyserver on its own), as /readyz says.
    let (status, body) = get(h.addr, "/readyz").await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert!(
        v["loaders"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|l| l["ready"] == true)),
        "{v}"
    );
    assert_eq!(h.ks.attests.load(Ordering::SeqCst), 2);
    let first = h.loader.take().unwrap();
    // Four requests held in flight: two on each loader.
    let bodies: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("gated request {i}").into_bytes())
        .collect();
    let mut replies = Vec::new();
    for body in &bodies {
        let mut r = post_request(h.addr, "echo", body).await;
        assert_eq!(r.status, 200);
        let head = r.next_record().await.unwrap();
        replies.push((r, head));
    }
    assert_eq!(first.stats.submits.load(Ordering::SeqCst), 2);
    assert_eq!(second.stats.submits.load(Ordering::SeqCst), 2);
    // Per-loader gauges: both ready, two requests running on each.
    let m = String::from_utf8(get(h.addr, "/metrics").await.1).unwrap();
    for addr in [first.addr, second_addr] {
        for line in [
            format!("cinfer_server_loader_link_ready{{loader=\"tcp:{addr}\"}} 1"),
            format!("cinfer_server_loader_link_requests_running{{loader=\"tcp:{addr}\"}} 2"),
        ] {
            assert!(m.contains(&line), "{line} in\n{m}");
        }
    }
    first.gate.add_permits(2);
    second.gate.add_permits(2);
    for ((mut r, head), body) in replies.into_iter().zip(&bodies) {
        let mut records = vec![head];
        records.extend(r.records().await);
        assert_completed(body, &records);
    }

    // The first loader goes away: the second serves every request.
    first.stop().await;
    for i in 0..3 {
        let body = format!("after the first loader left {i}");
        let mut r = post_request(h.addr, "echo", body.as_bytes()).await;
        assert_eq!(r.status, 200);
        assert_completed(body.as_bytes(), &r.records().await);
    }
    assert_eq!(second.stats.submits.load(Ordering::SeqCst), 5);
    let (status, body) = get(h.addr, "/readyz").await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(v["loaders"][0]["ready"], false, "{v}");
    assert!(v["loaders"][0]["error"].as_str().is_some(), "{v}");
    assert_eq!(v["loaders"][1]["ready"], true, "{v}");
    h.loader = Some(second);
}

/// A loader lost before the request ran (no reply came): the request is
/// submitted to another ready loader and completes there.
#[tokio::test]
async fn a_request_whose_loader_is_lost_before_it_ran_completes_on_another() {
    let (mut h, second) = start_two_loaders().await;
    let first = h.loader.take().unwrap();
    first.stats.crash_on_submit.store(true, Ordering::SeqCst);
    let body = b"crash: the first loader dies on this one";
    let mut r = post_request(h.addr, "echo", body).await;
    assert_eq!(r.status, 200);
    assert_completed(body, &r.records().await);
    assert_eq!(first.stats.submits.load(Ordering::SeqCst), 1, "tried first");
    assert_eq!(second.stats.submits.load(Ordering::SeqCst), 1, "ran here");
    h.loader = Some(second);
    first.stop().await;
}
