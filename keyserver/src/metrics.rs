//! The keyserver's metrics (`GET /metrics`): kept and rendered (Prometheus
//! text format 0.0.4) by `prometheus-client`. Counts and durations only:
//! never a key, a nonce or a peer.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Why an attestation was refused: which check said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The request itself: unreadable, too large, too slow, malformed evidence.
    Request,
    /// The nonce: not ours, expired, spent, or the spent-nonce table full.
    Nonce,
    /// The TPM's endorsement (EK certificate, AK binding).
    Endorsement,
    /// The TPM quote and the event log it covers.
    Tpm,
    /// The event log (TD quotes alone).
    EventLog,
    /// The TD quote.
    Tdx,
    /// Wrapping the keys for the loader.
    Release,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Request => "request",
            Refusal::Nonce => "nonce",
            Refusal::Endorsement => "endorsement",
            Refusal::Tpm => "tpm",
            Refusal::EventLog => "event_log",
            Refusal::Tdx => "tdx",
            Refusal::Release => "release",
        }
    }
}

/// `{outcome="released|refused",reason="..."}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    reason: &'static str,
}

/// `{outcome="..."}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Issued {
    outcome: &'static str,
}

/// The keyserver's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    attestations: Family<Outcome, Counter>,
    attest_seconds: Family<Issued, Histogram, fn() -> Histogram>,
    nonces: Family<Issued, Counter>,
    statements: Counter,
    spent_nonces: Gauge,
}

fn seconds() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

const REFUSALS: [Refusal; 7] = [
    Refusal::Request,
    Refusal::Nonce,
    Refusal::Endorsement,
    Refusal::Tpm,
    Refusal::EventLog,
    Refusal::Tdx,
    Refusal::Release,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("cinfer_keyserver"),
            attestations: Family::default(),
            attest_seconds: Family::new_with_constructor(seconds),
            nonces: Family::default(),
            statements: Counter::default(),
            spent_nonces: Gauge::default(),
        };
        // Every series from the start, at zero.
        let _ = m.attestations.get_or_create(&Outcome {
            outcome: "released",
            reason: "none",
        });
        for r in REFUSALS {
            let _ = m.attestations.get_or_create(&Outcome {
                outcome: "refused",
                reason: r.as_str(),
            });
        }
        for outcome in ["issued", "refused"] {
            let _ = m.nonces.get_or_create(&Issued { outcome });
        }
        let r = &mut m.registry;
        r.register(
            "attestations",
            "Attestations by outcome, and for refusals the check that refused",
            m.attestations.clone(),
        );
        r.register(
            "attest_duration_seconds",
            "Attestations: from the request to the answer, by outcome",
            m.attest_seconds.clone(),
        );
        r.register("nonces", "Nonces handed out (or not)", m.nonces.clone());
        r.register(
            "request_key_statements",
            "Signed request-key statements served",
            m.statements.clone(),
        );
        r.register(
            "spent_nonces",
            "Spent nonces remembered until they expire (at max-outstanding-nonces, attestations are refused)",
            m.spent_nonces.clone(),
        );
        m
    }
}

impl Metrics {
    /// Keys released after `took`.
    pub fn released(&self, took: Duration) {
        self.count("released", "none", took);
    }

    /// An attestation refused by `why` after `took`.
    pub fn refused(&self, why: Refusal, took: Duration) {
        self.count("refused", why.as_str(), took);
    }

    fn count(&self, outcome: &'static str, reason: &'static str, took: Duration) {
        self.attestations
            .get_or_create(&Outcome { outcome, reason })
            .inc();
        self.attest_seconds
            .get_or_create(&Issued { outcome })
            .observe(took.as_secs_f64());
    }

    /// A nonce handed out (`true`) or not.
    pub fn nonce(&self, issued: bool) {
        let outcome = if issued { "issued" } else { "refused" };
        self.nonces.get_or_create(&Issued { outcome }).inc();
    }

    /// A request-key statement served.
    pub fn statement(&self) {
        self.statements.inc();
    }

    /// The Prometheus text exposition, with the spent-nonce count now.
    pub fn render(&self, spent_nonces: usize) -> String {
        self.spent_nonces
            .set(i64::try_from(spent_nonces).unwrap_or(i64::MAX));
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
    fn every_outcome_is_there_from_the_start_and_counts() {
        let m = Metrics::default();
        m.released(Duration::from_millis(3));
        m.refused(Refusal::Tdx, Duration::from_millis(1));
        m.nonce(true);
        m.statement();
        let text = m.render(5);
        for line in [
            "cinfer_keyserver_attestations_total{outcome=\"released\",reason=\"none\"} 1",
            "cinfer_keyserver_attestations_total{outcome=\"refused\",reason=\"tdx\"} 1",
            "cinfer_keyserver_attestations_total{outcome=\"refused\",reason=\"endorsement\"} 0",
            "cinfer_keyserver_attest_duration_seconds_count{outcome=\"released\"} 1",
            "cinfer_keyserver_nonces_total{outcome=\"issued\"} 1",
            "cinfer_keyserver_nonces_total{outcome=\"refused\"} 0",
            "cinfer_keyserver_request_key_statements_total 1",
            "cinfer_keyserver_spent_nonces 5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
