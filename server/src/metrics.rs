//! The server's metrics: counters, gauges and histograms kept and rendered
//! (Prometheus text format 0.0.4) by `prometheus-client`, the Prometheus
//! project's Rust client library.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
/// How a `POST /v1/requests` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// The loader sent `Done` with a receipt whose outcome is `completed`:
    /// every record and the receipt were streamed.
    Completed,
    /// The loader sent `Done`, its receipt saying the run did not complete
    /// (the program failed, the classifier refused, the deadline passed...).
    RunFailed,
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
    const ALL: [RequestOutcome; 10] = [
        RequestOutcome::Completed,
        RequestOutcome::RunFailed,
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
            RequestOutcome::RunFailed => "run_failed",
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
}

/// How one attestation round with one keyserver ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// `{outcome="..."}` of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    outcome: RequestOutcome,
}

/// `{outcome="..."}` of an attestation round.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestLabel {
    outcome: AttestOutcome,
}

impl EncodeLabelValue for RequestOutcome {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

impl EncodeLabelValue for AttestOutcome {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

/// `{loader="tcp:HOST:PORT"}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByLoader {
    loader: String,
}

/// `{loader="...",outcome="..."}`: a run's outcome as its receipt states it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoaderRun {
    loader: String,
    outcome: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    // 5 ms to ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn queue_buckets() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabel, Counter>,
    request_seconds: Histograms<RequestLabel>,
    first_frame_seconds: Histogram,
    queue_wait_seconds: Histogram,
    reply_frames_per_request: Histogram,
    reply_frames: Counter,
    reply_bytes: Counter,
    attestations: Family<AttestLabel, Counter>,
    attestation_seconds: Histograms<AttestLabel>,
    in_flight: Gauge,
    queued: Gauge,
    connections_open: Gauge,
    connections_refused: Counter,
    loader_connected: Gauge,
    loader_ready: Gauge,
    link_connected: Family<ByLoader, Gauge>,
    link_ready: Family<ByLoader, Gauge>,
    link_running: Family<ByLoader, Gauge>,
    link_ready_since: Family<ByLoader, Gauge>,
    loader_runs: Family<LoaderRun, Counter>,
    loader_run_seconds: Histograms<ByLoader>,
}

/// Decrements `http_connections_open` when dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// Decrements `requests_queued` when dropped.
#[derive(Debug)]
pub struct Queued(Arc<Metrics>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.dec();
    }
}

/// Decrements `requests_in_flight` when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::with_prefix("cinfer_server"),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(seconds_buckets),
            first_frame_seconds: seconds_buckets(),
            queue_wait_seconds: queue_buckets(),
            // 1 to 4096 frames.
            reply_frames_per_request: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            reply_frames: Counter::default(),
            reply_bytes: Counter::default(),
            attestations: Family::default(),
            attestation_seconds: Family::new_with_constructor(seconds_buckets),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            loader_connected: Gauge::default(),
            loader_ready: Gauge::default(),
            link_connected: Family::default(),
            link_ready: Family::default(),
            link_running: Family::default(),
            link_ready_since: Family::default(),
            loader_runs: Family::default(),
            loader_run_seconds: Family::new_with_constructor(seconds_buckets),
        };
        // Every outcome from the start, at zero (a series that appears only
        // at its first event hides it from rate()).
        for outcome in RequestOutcome::ALL {
            let _ = m.requests.get_or_create(&RequestLabel { outcome });
        }
        for outcome in AttestOutcome::ALL {
            let _ = m.attestations.get_or_create(&AttestLabel { outcome });
        }
        m.register()
    }
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "requests",
            "Inference requests by outcome",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Inference requests: from arrival to the last record sent (or the error answer), by outcome",
            self.request_seconds.clone(),
        );
        r.register(
            "time_to_first_frame_seconds",
            "From a request's arrival to its first sealed reply frame relayed (time to first token, as the server sees it)",
            self.first_frame_seconds.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "How long requests waited for a place on a loader (0 when one was free)",
            self.queue_wait_seconds.clone(),
        );
        r.register(
            "reply_frames_per_request",
            "Sealed reply frames of each completed request (about one per generated token for streaming programs)",
            self.reply_frames_per_request.clone(),
        );
        r.register(
            "reply_frames",
            "Sealed reply frames relayed",
            self.reply_frames.clone(),
        );
        r.register(
            "reply_bytes",
            "Bytes of sealed reply frames relayed",
            self.reply_bytes.clone(),
        );
        r.register(
            "attestations",
            "Attestation rounds (one loader, one keyserver) by outcome",
            self.attestations.clone(),
        );
        r.register(
            "attestation_duration_seconds",
            "Attestation rounds (one loader, one keyserver): quote, keyserver, key installation, by outcome",
            self.attestation_seconds.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests being served",
            self.in_flight.clone(),
        );
        r.register(
            "requests_queued",
            "Requests waiting for a place on the loader (max-in-flight)",
            self.queued.clone(),
        );
        r.register(
            "http_connections_open",
            "Client connections open",
            self.connections_open.clone(),
        );
        r.register(
            "http_connections_refused",
            "Client connections closed at once because max-connections were open",
            self.connections_refused.clone(),
        );
        r.register(
            "loader_connected",
            "Whether a loader channel is connected (any loader)",
            self.loader_connected.clone(),
        );
        r.register(
            "loader_ready",
            "Whether a loader is attested and holds keys (any loader)",
            self.loader_ready.clone(),
        );
        r.register(
            "loader_link_connected",
            "Whether this loader's channel is connected",
            self.link_connected.clone(),
        );
        r.register(
            "loader_link_ready",
            "Whether this loader is attested and holds keys",
            self.link_ready.clone(),
        );
        r.register(
            "loader_link_requests_running",
            "Requests this server has running on this loader",
            self.link_running.clone(),
        );
        r.register(
            "loader_link_ready_since_seconds",
            "Unix time this loader last became ready (attested, keys installed); 0 while it is not. Attestation age: time() - this",
            self.link_ready_since.clone(),
        );
        r.register(
            "loader_runs",
            "Runs each loader finished, by the outcome its signed receipt states (completed, program-failed, refused, cancelled, aborted)",
            self.loader_runs.clone(),
        );
        r.register(
            "loader_run_duration_seconds",
            "Runs each loader finished: from the request's arrival here to the loader's receipt",
            self.loader_run_seconds.clone(),
        );
        self
    }

    /// A run `loader` finished with the receipt's `outcome`, `took` after
    /// the request arrived. (The loader has no network stack of its own: its
    /// figures are exported here, labelled by loader.)
    pub fn loader_run(&self, loader: &str, outcome: &str, took: Duration) {
        self.loader_runs
            .get_or_create(&LoaderRun {
                loader: loader.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.loader_run_seconds
            .get_or_create(&ByLoader {
                loader: loader.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a finished request that arrived at `started`.
    pub fn request(&self, outcome: RequestOutcome, took: Duration) {
        self.requests.get_or_create(&RequestLabel { outcome }).inc();
        self.request_seconds
            .get_or_create(&RequestLabel { outcome })
            .observe(took.as_secs_f64());
    }

    /// A completed request's reply frames.
    pub fn reply_frames_of_request(&self, frames: u64) {
        self.reply_frames_per_request.observe(frames as f64);
    }

    /// The first reply frame of a request relayed, `took` after it arrived.
    pub fn first_frame(&self, took: Duration) {
        self.first_frame_seconds.observe(took.as_secs_f64());
    }

    /// A request got a place on a loader after waiting `took`.
    pub fn queue_wait(&self, took: Duration) {
        self.queue_wait_seconds.observe(took.as_secs_f64());
    }

    /// Counts one relayed reply frame of `len` bytes.
    pub fn reply_frame(&self, len: usize) {
        self.reply_frames.inc();
        self.reply_bytes.inc_by(len as u64);
    }

    /// Counts an attestation round that took `took`.
    pub fn attestation(&self, outcome: AttestOutcome, took: Duration) {
        self.attestations
            .get_or_create(&AttestLabel { outcome })
            .inc();
        self.attestation_seconds
            .get_or_create(&AttestLabel { outcome })
            .observe(took.as_secs_f64());
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    /// Counts a request waiting for a place on the loader until the guard is
    /// dropped; `None` (nothing counted) when `max` are waiting already.
    pub fn enqueue(self: &Arc<Self>, max: usize) -> Option<Queued> {
        let before = self.queued.inc();
        let guard = Queued(self.clone());
        (usize::try_from(before).unwrap_or(0) < max).then_some(guard)
    }

    /// Requests waiting for a place on the loader now.
    pub fn requests_queued(&self) -> i64 {
        self.queued.get()
    }

    /// Counts an open client connection until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.clone())
    }

    /// Client connections open now.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.get()
    }

    /// Counts a connection closed at once because `max-connections` were open;
    /// returns the count so far.
    pub fn connection_refused(&self) -> u64 {
        self.connections_refused.inc() + 1
    }

    /// Connections refused so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }

    /// Requests in flight now.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The Prometheus text exposition, with the state of each loader link.
    pub fn render(&self, loaders: &[LoaderState]) -> String {
        self.loader_connected
            .set(i64::from(loaders.iter().any(|l| l.connected)));
        self.loader_ready
            .set(i64::from(loaders.iter().any(|l| l.ready)));
        for l in loaders {
            let label = ByLoader {
                loader: l.endpoint.clone(),
            };
            self.link_connected
                .get_or_create(&label)
                .set(i64::from(l.connected));
            self.link_ready
                .get_or_create(&label)
                .set(i64::from(l.ready));
            self.link_running
                .get_or_create(&label)
                .set(i64::try_from(l.running).unwrap_or(i64::MAX));
            let since = l
                .ready_since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.link_ready_since.get_or_create(&label).set(since);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
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
    /// When it last became ready; `None` while it is not.
    pub ready_since: Option<SystemTime>,
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
                ready: true,
                running: 3,
                ready_since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            },
            LoaderState {
                endpoint: "unix:/run/a\"b\\c".into(),
                connected: false,
                ready: false,
                running: 0,
                ready_since: None,
            },
        ]);
        for line in [
            "cinfer_server_loader_connected 1",
            "cinfer_server_loader_ready 1",
            "cinfer_server_loader_link_connected{loader=\"tcp:10.0.0.5:7300\"} 1",
            "cinfer_server_loader_link_requests_running{loader=\"tcp:10.0.0.5:7300\"} 3",
            "cinfer_server_loader_link_ready_since_seconds{loader=\"tcp:10.0.0.5:7300\"} 1700000000",
            "cinfer_server_loader_link_ready{loader=\"unix:/run/a\\\"b\\\\c\"} 0",
            "cinfer_server_loader_link_ready_since_seconds{loader=\"unix:/run/a\\\"b\\\\c\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn histograms_count_what_they_observe() {
        let m = Metrics::default();
        m.request(RequestOutcome::Completed, Duration::from_millis(125));
        m.request(RequestOutcome::Completed, Duration::from_millis(250));
        m.request(RequestOutcome::Busy, Duration::from_millis(1));
        m.first_frame(Duration::from_millis(7));
        m.queue_wait(Duration::ZERO);
        m.reply_frames_of_request(17);
        m.attestation(AttestOutcome::Released, Duration::from_millis(12));
        m.loader_run("tcp:a:1", "completed", Duration::from_millis(30));
        m.loader_run("tcp:a:1", "program-failed", Duration::from_millis(3));
        let text = m.render(&[]);
        for line in [
            "# TYPE cinfer_server_request_duration_seconds histogram",
            "cinfer_server_request_duration_seconds_count{outcome=\"completed\"} 2",
            "cinfer_server_request_duration_seconds_sum{outcome=\"completed\"} 0.375",
            "cinfer_server_request_duration_seconds_bucket{outcome=\"completed\",le=\"0.08\"} 0",
            "cinfer_server_request_duration_seconds_bucket{outcome=\"completed\",le=\"0.16\"} 1",
            "cinfer_server_request_duration_seconds_bucket{outcome=\"completed\",le=\"0.32\"} 2",
            "cinfer_server_request_duration_seconds_count{outcome=\"busy\"} 1",
            "cinfer_server_requests_total{outcome=\"completed\"} 2",
            "cinfer_server_requests_total{outcome=\"timeout\"} 0",
            "cinfer_server_time_to_first_frame_seconds_bucket{le=\"0.01\"} 1",
            "cinfer_server_time_to_first_frame_seconds_bucket{le=\"0.005\"} 0",
            "cinfer_server_queue_wait_seconds_bucket{le=\"0.001\"} 1",
            "cinfer_server_reply_frames_per_request_bucket{le=\"16\"} 0",
            "cinfer_server_reply_frames_per_request_bucket{le=\"32\"} 1",
            "cinfer_server_attestation_duration_seconds_count{outcome=\"released\"} 1",
            "cinfer_server_attestations_total{outcome=\"loader_error\"} 0",
            "cinfer_server_loader_runs_total{loader=\"tcp:a:1\",outcome=\"completed\"} 1",
            "cinfer_server_loader_runs_total{loader=\"tcp:a:1\",outcome=\"program-failed\"} 1",
            "cinfer_server_loader_run_duration_seconds_count{loader=\"tcp:a:1\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
