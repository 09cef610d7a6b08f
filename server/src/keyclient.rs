//! A small HTTP/1.1 client for keyservers (hyper-util's pooled client).
//!
//! Every call — connect, request, whole response body — runs under one deadline
//! (`keyserver-timeout-ms`), so a down or hung keyserver is a quick, typed error,
//! never a hang. Response bodies are bounded. Nothing here logs or returns body
//! bytes except where the caller relays them verbatim.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

/// Why a keyserver call failed. Messages name the keyserver and the reason, never
/// payload bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyserverError {
    /// No complete answer within the deadline.
    #[error("keyserver {url}: no answer within {ms} ms")]
    Timeout {
        /// The URL called.
        url: String,
        /// The deadline.
        ms: u128,
    },
    /// Connecting or talking to it failed.
    #[error("keyserver {url}: unreachable: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
    /// It answered with an error status.
    #[error("keyserver {url}: HTTP {status}: {reason}")]
    Status {
        /// The URL called.
        url: String,
        /// The status.
        status: u16,
        /// Its `{"error": …}` text (truncated), or the status text.
        reason: String,
    },
    /// Its answer is not what the API promises.
    #[error("keyserver {url}: malformed answer: {reason}")]
    Malformed {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
}

/// A keyserver's answer.
#[derive(Debug, Clone)]
pub struct KsResponse {
    /// The status.
    pub status: StatusCode,
    /// Its `Content-Type`, if any.
    pub content_type: Option<HeaderValue>,
    /// The whole body.
    pub body: Bytes,
}

/// The keyserver client; cheap to clone.
#[derive(Clone)]
pub struct KeyserverClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for KeyserverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyserverClient")
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// Longest error text kept from a keyserver's answer.
const MAX_REASON: usize = 200;

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The `error` member of a JSON error body, printable and truncated; else the
/// status text.
fn reason_of(status: StatusCode, body: &[u8]) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON)
        .collect()
}

impl KeyserverClient {
    /// A client whose every call ends within `timeout`, reading at most `max_body`
    /// response bytes; `https://` keyservers are verified against `tls`
    /// ([`cinfer_tls::client_config`]), `http://` ones are plain.
    pub fn new(timeout: Duration, max_body: usize, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            timeout,
            max_body,
        }
    }

    /// One call; any status is returned.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<KsResponse, KeyserverError> {
        let unreachable = |reason: String| KeyserverError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let len = body.len();
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, len)
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let max_body = self.max_body;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let content_type = resp.headers().get(CONTENT_TYPE).cloned();
            let body = Limited::new(resp.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(KsResponse {
                status,
                content_type,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(KeyserverError::Timeout {
                url: url.to_owned(),
                ms: self.timeout.as_millis(),
            }),
        }
    }

    async fn call_ok(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<Bytes, KeyserverError> {
        let resp = self.call(method, url, body).await?;
        if resp.status != StatusCode::OK {
            return Err(KeyserverError::Status {
                url: url.to_owned(),
                status: resp.status.as_u16(),
                reason: reason_of(resp.status, &resp.body),
            });
        }
        Ok(resp.body)
    }

    /// `POST {base}/v1/nonce` → the nonce's raw bytes.
    pub async fn nonce(&self, base: &str) -> Result<Vec<u8>, KeyserverError> {
        let url = format!("{base}/v1/nonce");
        let body = self.call_ok(Method::POST, &url, Bytes::new()).await?;
        let malformed = |reason: &str| KeyserverError::Malformed {
            url: url.clone(),
            reason: reason.to_owned(),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| malformed("not JSON"))?;
        let hex_nonce = v
            .get("nonce")
            .and_then(|n| n.as_str())
            .ok_or_else(|| malformed("no nonce"))?;
        hex::decode(hex_nonce).map_err(|_| malformed("nonce is not hex"))
    }

    /// `POST {base}/v1/attest` with the evidence verbatim → the `KeyRelease` body verbatim.
    pub async fn attest(&self, base: &str, evidence: Vec<u8>) -> Result<Bytes, KeyserverError> {
        let url = format!("{base}/v1/attest");
        self.call_ok(Method::POST, &url, Bytes::from(evidence))
            .await
    }

    /// `GET {base}/v1/request-key`, any status.
    pub async fn request_key(&self, base: &str) -> Result<KsResponse, KeyserverError> {
        let url = format!("{base}/v1/request-key");
        self.call(Method::GET, &url, Bytes::new()).await
    }
}
