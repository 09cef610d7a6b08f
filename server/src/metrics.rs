//! Counters and gauges, rendered in the Prometheus text format by hand.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// How a `POST /v1/requests` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The loader sent `Done`: every record and the receipt were streamed.
    Completed,
    /// Refused by the loader before it ran (400).
    Refused,
    /// No or unknown program, or an unreadable body (400), or a body not
    /// received within `body-timeout` (408).
    BadRequest,
    /// Body over `max-request-bytes` (413).
    TooLarge,
    /// No attested loader within `ready-timeout` (503).
    Unavailable,
    /// The request deadline passed before the first record (504).
    Timeout,
    /// The stream started and then failed (loader lost, deadline): an error record.
    StreamError,
    /// The client went away before the end.
    ClientGone,
    /// Refused as busy (the queue full, or the loader busy): 429.
    Busy,
}

impl RequestOutcome {
    const ALL: [RequestOutcome; 9] = [
        RequestOutcome::Completed,
        RequestOutcome::Refused,
        RequestOutcome::BadRequest,
        RequestOutcome::TooLarge,
        RequestOutcome::Unavailable,
        RequestOutcome::Timeout,
        RequestOutcome::StreamError,
        RequestOutcome::ClientGone,
        RequestOutcome::Busy,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Completed => "completed",
            RequestOutcome::Refused => "refused",
            RequestOutcome::BadRequest => "bad_request",
            RequestOutcome::TooLarge => "too_large",
            RequestOutcome::Unavailable => "unavailable",
            RequestOutcome::Timeout => "timeout",
            RequestOutcome::StreamError => "stream_error",
            RequestOutcome::ClientGone => "client_gone",
            RequestOutcome::Busy => "busy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How one attestation round with one keyserver ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestOutcome {
    /// The keyserver released keys and the loader installed them.
    Released,
    /// The keyserver refused, failed or was unreachable.
    KeyserverError,
    /// The loader refused, failed or went away.
    LoaderError,
}

impl AttestOutcome {
    const ALL: [AttestOutcome; 3] = [
        AttestOutcome::Released,
        AttestOutcome::KeyserverError,
        AttestOutcome::LoaderError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttestOutcome::Released => "released",
            AttestOutcome::KeyserverError => "keyserver_error",
            AttestOutcome::LoaderError => "loader_error",
        }
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 9],
    reply_frames: AtomicU64,
    reply_bytes: AtomicU64,
    attestations: [AtomicU64; 3],
    in_flight: AtomicI64,
    queued: AtomicI64,
    connections_open: AtomicI64,
    connections_refused: AtomicU64,
}

/// Decrements `http_connections_open` when dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements `requests_queued` when dropped.
#[derive(Debug)]
pub struct Queued(Arc<Metrics>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements `requests_in_flight` when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, outcome: RequestOutcome) {
        self.requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one relayed reply frame of `len` bytes.
    pub fn reply_frame(&self, len: usize) {
        self.reply_frames.fetch_add(1, Ordering::Relaxed);
        self.reply_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Counts an attestation round.
    pub fn attestation(&self, outcome: AttestOutcome) {
        self.attestations[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts a request waiting for a place on the loader until the guard is
    /// dropped; `None` (nothing counted) when `max` are waiting already.
    pub fn enqueue(self: &Arc<Self>, max: usize) -> Option<Queued> {
        let before = self.queued.fetch_add(1, Ordering::Relaxed);
        let guard = Queued(self.clone());
        (usize::try_from(before).unwrap_or(0) < max).then_some(guard)
    }

    /// Requests waiting for a place on the loader now.
    pub fn requests_queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts an open client connection until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Client connections open now.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Counts a connection closed at once because `max-connections` were open;
    /// returns the count so far.
    pub fn connection_refused(&self) -> u64 {
        self.connections_refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connections refused so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition, with the state of each loader link.
    pub fn render(&self, loaders: &[LoaderState]) -> String {
        let loader_connected = loaders.iter().any(|l| l.connected);
        let loader_ready = loaders.iter().any(|l| l.ready);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP cinfer_server_requests_total Inference requests by outcome.\n# TYPE cinfer_server_requests_total counter"
        );
        for o in RequestOutcome::ALL {
            let _ = writeln!(
                out,
                "cinfer_server_requests_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.requests[o.index()].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cinfer_server_reply_frames_total Sealed reply frames relayed.\n# TYPE cinfer_server_reply_frames_total counter\ncinfer_server_reply_frames_total {}",
            self.reply_frames.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_reply_bytes_total Bytes of sealed reply frames relayed.\n# TYPE cinfer_server_reply_bytes_total counter\ncinfer_server_reply_bytes_total {}",
            self.reply_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_attestations_total Attestation rounds (one loader, one keyserver) by outcome.\n# TYPE cinfer_server_attestations_total counter"
        );
        for o in AttestOutcome::ALL {
            let _ = writeln!(
                out,
                "cinfer_server_attestations_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.attestations[o as usize].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cinfer_server_requests_in_flight Requests being served.\n# TYPE cinfer_server_requests_in_flight gauge\ncinfer_server_requests_in_flight {}",
            self.requests_in_flight()
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_requests_queued Requests waiting for a place on the loader (max-in-flight).\n# TYPE cinfer_server_requests_queued gauge\ncinfer_server_requests_queued {}",
            self.requests_queued()
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_http_connections_open Client connections open.\n# TYPE cinfer_server_http_connections_open gauge\ncinfer_server_http_connections_open {}",
            self.connections_open()
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_http_connections_refused_total Client connections closed at once because max-connections were open.\n# TYPE cinfer_server_http_connections_refused_total counter\ncinfer_server_http_connections_refused_total {}",
            self.connections_refused()
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_loader_connected Whether a loader channel is connected (any loader).\n# TYPE cinfer_server_loader_connected gauge\ncinfer_server_loader_connected {}",
            u8::from(loader_connected)
        );
        let _ = writeln!(
            out,
            "# HELP cinfer_server_loader_ready Whether a loader is attested and holds keys (any loader).\n# TYPE cinfer_server_loader_ready gauge\ncinfer_server_loader_ready {}",
            u8::from(loader_ready)
        );
        for (name, help, value) in [
            (
                "cinfer_server_loader_link_connected",
                "Whether this loader's channel is connected.",
                (|l: &LoaderState| u64::from(l.connected)) as fn(&LoaderState) -> u64,
            ),
            (
                "cinfer_server_loader_link_ready",
                "Whether this loader is attested and holds keys.",
                |l: &LoaderState| u64::from(l.ready),
            ),
            (
                "cinfer_server_loader_link_requests_running",
                "Requests this server has running on this loader.",
                |l: &LoaderState| l.running as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for l in loaders {
                let _ = writeln!(
                    out,
                    "{name}{{loader=\"{}\"}} {}",
                    label_value(&l.endpoint),
                    value(l)
                );
            }
        }
        out
    }
}

/// One loader link's state, for [`Metrics::render`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderState {
    /// Its endpoint as configured (`tcp:HOST:PORT`, `unix:PATH`).
    pub endpoint: String,
    /// Channel connected.
    pub connected: bool,
    /// Attested, keys installed.
    pub ready: bool,
    /// Requests this server has running on it.
    pub running: usize,
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_labels_are_escaped_and_every_loader_has_its_gauges() {
        let m = Metrics::default();
        let text = m.render(&[
            LoaderState {
                endpoint: "tcp:10.0.0.5:7300".into(),
                connected: true,
                ready: false,
                running: 3,
            },
            LoaderState {
                endpoint: "unix:/run/a\"b\\c".into(),
                connected: false,
                ready: false,
                running: 0,
            },
        ]);
        for line in [
            "cinfer_server_loader_connected 1",
            "cinfer_server_loader_ready 0",
            "cinfer_server_loader_link_connected{loader=\"tcp:10.0.0.5:7300\"} 1",
            "cinfer_server_loader_link_requests_running{loader=\"tcp:10.0.0.5:7300\"} 3",
            "cinfer_server_loader_link_ready{loader=\"unix:/run/a\\\"b\\\\c\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
