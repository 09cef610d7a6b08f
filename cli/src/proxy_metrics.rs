//! `cinfer proxy`'s metrics (`GET /metrics`): kept and rendered (Prometheus
//! text format 0.0.4) by `prometheus-client`. The proxy is the one place that
//! sees tokens as the client does, so time to first token and token counts
//! are measured here (from the program's own `usage`, inside the verified
//! reply).

use crate::openai::{ApiError, Usage};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// `{route="...",status="..."}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

/// `{route="..."}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

fn seconds() -> Histogram {
    // 5 ms to ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    duration: Family<Route, Histogram, fn() -> Histogram>,
    first_token: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    receipts_verified: Counter,
    verification_failures: Counter,
    stream_errors: Counter,
    in_flight: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut m = ProxyMetrics {
            registry: Registry::with_prefix("cinfer_proxy"),
            requests: Family::default(),
            duration: Family::new_with_constructor(seconds),
            first_token: seconds(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            receipts_verified: Counter::default(),
            verification_failures: Counter::default(),
            stream_errors: Counter::default(),
            in_flight: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "HTTP requests by route and status (a stream that fails after its 200 also counts in stream_errors)",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Completions: from the request's arrival to its last choice's verified receipt (or its error)",
            m.duration.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Completions: from the request's arrival to the first text of the reply, authenticated",
            m.first_token.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of completed, verified choices (the program's count)",
            m.prompt_tokens.clone(),
        );
        r.register(
            "completion_tokens",
            "Generated tokens of completed, verified choices (the program's count)",
            m.completion_tokens.clone(),
        );
        r.register(
            "receipts_verified",
            "Choices whose signed receipt verified",
            m.receipts_verified.clone(),
        );
        r.register(
            "verification_failures",
            "Replies refused because a statement, frame or receipt did not verify (502)",
            m.verification_failures.clone(),
        );
        r.register(
            "stream_errors",
            "Streams that ended with an error event after their 200",
            m.stream_errors.clone(),
        );
        r.register(
            "requests_in_flight",
            "Completions being answered",
            m.in_flight.clone(),
        );
        m
    }
}

impl ProxyMetrics {
    /// Counts an answered HTTP request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
    }

    /// A completion began: in flight until [`ProxyMetrics::completion_done`].
    pub fn completion_started(&self) {
        self.in_flight.inc();
    }

    /// A completion ended (answered, failed, or its client went away),
    /// `took` after it arrived.
    pub fn completion_done(&self, route: &'static str, took: Duration) {
        self.in_flight.dec();
        self.duration
            .get_or_create(&Route { route })
            .observe(took.as_secs_f64());
    }

    /// A completion's first text, `took` after it arrived.
    pub fn first_token(&self, took: Duration) {
        self.first_token.observe(took.as_secs_f64());
    }

    /// One choice's verdict.
    pub fn verdict(&self, v: Result<&Usage, &ApiError>) {
        match v {
            Ok(usage) => {
                self.receipts_verified.inc();
                self.prompt_tokens.inc_by(usage.prompt_tokens);
                self.completion_tokens.inc_by(usage.completion_tokens);
            }
            Err(e) if e.kind == "cinfer_verification_failed" => {
                self.verification_failures.inc();
            }
            Err(_) => {}
        }
    }

    /// A stream ended with an error event.
    pub fn stream_error(&self) {
        self.stream_errors.inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_it_is_told() {
        let m = ProxyMetrics::default();
        m.request("chat", 200);
        m.request("chat", 200);
        m.request("chat", 400);
        m.first_token(Duration::from_millis(7));
        m.completion_started();
        assert!(m.render().contains("cinfer_proxy_requests_in_flight 1\n"));
        m.completion_done("chat", Duration::from_millis(250));
        m.verdict(Ok(&Usage {
            prompt_tokens: 12,
            completion_tokens: 30,
            finish_reason: "stop".into(),
        }));
        let bad = ApiError::new(502, "cinfer_verification_failed", "x");
        m.verdict(Err(&bad));
        let text = m.render();
        for line in [
            "cinfer_proxy_requests_total{route=\"chat\",status=\"200\"} 2",
            "cinfer_proxy_requests_total{route=\"chat\",status=\"400\"} 1",
            "cinfer_proxy_time_to_first_token_seconds_bucket{le=\"0.01\"} 1",
            "cinfer_proxy_time_to_first_token_seconds_bucket{le=\"0.005\"} 0",
            "cinfer_proxy_request_duration_seconds_sum{route=\"chat\"} 0.25",
            "cinfer_proxy_prompt_tokens_total 12",
            "cinfer_proxy_completion_tokens_total 30",
            "cinfer_proxy_receipts_verified_total 1",
            "cinfer_proxy_verification_failures_total 1",
            "cinfer_proxy_requests_in_flight 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
