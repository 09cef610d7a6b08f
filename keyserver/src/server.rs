//! The HTTP API (HTTP/1.1, JSON):
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/nonce` | `{"nonce": hex, "expires_at": unix seconds}` |
//! | `POST /v1/attest` (body: `Evidence` JSON) | `KeyRelease` JSON; 403 `{"error": reason}` if refused, 400 if malformed, 413 if too large, 408 if the body did not arrive within `request-timeout-secs` |
//! | `GET /v1/request-key` | `SignedRequestKey` JSON |
//! | `GET /healthz` | `{"status": "ok"}` |
//!
//! Anything else is 404, or 405 for a known path with the wrong method.
//!
//! At most `max-connections` connections are open at once (one accepted over
//! the cap is closed at once); a request's headers must arrive within
//! `request-timeout-secs` (else hyper closes the connection, also one idle
//! between requests), and then its body within as long again (else 408).

use crate::audit::{AuditLog, AuditRecord};
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::endorsement::{self, EkTrust, EndorsedAk, EndorsementError};
use crate::metrics::{Metrics, Refusal};
use crate::nonce::{NonceError, NonceStore};
use crate::state::{Keys, StateDir, StateError};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State as Shared};
use axum::routing::{get, post};
use cinfer_attest::release::{REQUEST_KEY_STATEMENT_TYPE, REQUEST_KEY_SUITE};
use cinfer_attest::shares::{ShareEntry, SplitManifest};
use cinfer_attest::{
    AkTrust, CREDENTIAL_PSK_ID, Credential, Evidence, EvidenceError, KEY_RELEASE_VERSION,
    KeyRelease, ReferenceValues, ReleasedKey, ReleasedKeyKind, RequestKeyStatement,
    SignedRequestKey, credential_binding, credential_psk, release_context, share_context,
};
use cinfer_envelope::RequestPublicKey;
use cinfer_envelope::keywrap::{wrap_key, wrap_key_psk};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;
use tower_service::Service as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the keyserver could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyServerError {
    /// The configuration or reference values are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory or KEK is unusable (e.g. the wrong KEK).
    #[error(transparent)]
    State(#[from] StateError),
    /// The audit log cannot be opened.
    #[error("opening audit log {path}: {source}")]
    Audit {
        /// The audit file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No randomness for the nonce MAC key.
    #[error("nonce key: {0}")]
    Nonce(#[from] NonceError),
    /// A model configured for release has no key in the state directory.
    #[error("model {0:?} is configured for release but has no key in the state directory")]
    MissingModelKey(String),
}

/// A running keyserver's state; cheap to clone (shared).
#[derive(Clone)]
pub struct KeyServer {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    clock: Arc<dyn Clock>,
    refs: ReferenceValues,
    ek_trust: EkTrust,
    /// TD quotes required, checked against this (`[tdx]`).
    tdx: Option<crate::config::TdxTrust>,
    keys: Keys,
    release_models: Vec<String>,
    nonces: Mutex<NonceStore>,
    audit: AuditLog,
    signed_request_key: Bytes,
    metrics: Metrics,
}

impl std::fmt::Debug for KeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServer")
            .field("config", &self.inner.config)
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

impl KeyServer {
    /// Loads the reference values, decrypts the state with the KEK, opens the
    /// audit log and signs the request-key statement (valid from now).
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, KeyServerError> {
        let refs = config.reference_values()?;
        let ek_trust = config.ek_trust()?;
        let tdx = config.tdx_trust()?;
        if !config.endorsement.required && !refs.trusted_aks.is_empty() && !ek_trust.is_empty() {
            tracing::info!(
                "AKs are trusted through EK certificates, or pinned (trusted-aks; set endorsement.required to refuse pins)"
            );
        }
        if refs.allow_resettable_pcrs_only
            && !refs
                .pcrs
                .keys()
                .any(|p| !cinfer_attest::RESETTABLE_PCRS.contains(p))
        {
            tracing::warn!(
                "reference values pin no boot PCR (allow-resettable-pcrs-only): root on the loader's host could replay the event log (development only)"
            );
        }
        let keys = StateDir::open(&config.state_dir, &config.kek_file)?.load()?;
        let release_models = match &config.release.models {
            None => keys
                .models
                .keys()
                .chain(keys.model_shares.keys())
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            Some(ids) => {
                for id in ids {
                    if !keys.models.contains_key(id) && !keys.model_shares.contains_key(id) {
                        return Err(KeyServerError::MissingModelKey(id.clone()));
                    }
                }
                ids.clone()
            }
        };
        let audit = AuditLog::open(&config.audit_log).map_err(|source| KeyServerError::Audit {
            path: config.audit_log.clone(),
            source,
        })?;
        let now = clock.now_unix();
        // A split request key (k-of-n keyservers) is the one this keyserver
        // states and releases its share of; otherwise its own.
        let (key_id, public_key, receipt_public_key) = match &keys.request_shares {
            Some(shares) => (
                shares.public.key_id.clone(),
                shares.public.public_key.clone(),
                shares.public.receipt_public_key.clone(),
            ),
            None => {
                let public = keys.request.public_key();
                (
                    public.key_id(),
                    public.to_bytes(),
                    keys.receipt
                        .verifying_key()
                        .to_sec1_point(false)
                        .as_bytes()
                        .to_vec(),
                )
            }
        };
        let statement = RequestKeyStatement {
            statement_type: REQUEST_KEY_STATEMENT_TYPE.into(),
            key_id,
            suite: REQUEST_KEY_SUITE.into(),
            public_key,
            not_before: now,
            not_after: now.saturating_add(config.request_key_validity_secs),
            receipt_public_key,
        };
        let signed = SignedRequestKey::sign(&statement, &keys.identity);
        let signed_request_key = Bytes::from(serde_json::to_vec(&signed).unwrap_or_default());
        let nonces = Mutex::new(NonceStore::new(
            config.nonce_ttl_secs,
            config.max_outstanding_nonces,
        )?);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                clock,
                refs,
                ek_trust,
                tdx,
                keys,
                release_models,
                nonces,
                audit,
                signed_request_key,
                metrics: Metrics::default(),
            }),
        })
    }

    /// The identity public key (uncompressed SEC1) clients pin.
    pub fn identity_public_key(&self) -> Vec<u8> {
        identity_public_key(&self.inner.keys)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The HTTP API's routes (axum), with request tracing (tower-http). The
    /// peer's address is read from the request's `ConnectInfo` extension.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/healthz",
                get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "ok"})) })
                    .fallback(get_only),
            )
            .route(
                "/readyz",
                get(|Shared(s): Shared<KeyServer>| async move { s.readyz() }).fallback(get_only),
            )
            .route(
                "/metrics",
                get(|Shared(s): Shared<KeyServer>| async move {
                    let mut resp = respond(
                        StatusCode::OK,
                        Bytes::from(s.inner.metrics.render(s.spent_nonces())),
                    );
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    resp
                })
                .fallback(get_only),
            )
            .route(
                "/v1/nonce",
                post(|Shared(s): Shared<KeyServer>| async move { s.issue_nonce() })
                    .fallback(post_only),
            )
            .route(
                "/v1/attest",
                post(
                    |Shared(s): Shared<KeyServer>,
                     ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     req: axum::extract::Request| async move {
                        s.attest(req, peer).await
                    },
                )
                .fallback(post_only),
            )
            .route(
                "/v1/request-key",
                get(|Shared(s): Shared<KeyServer>| async move {
                    s.inner.metrics.statement();
                    respond(StatusCode::OK, s.inner.signed_request_key.clone())
                })
                .fallback(get_only),
            )
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
            .layer(TraceLayer::new_for_http())
            .with_state(self.clone())
    }

    /// Answers one request from `peer` (what a connection's service does).
    pub async fn handle<B>(&self, mut req: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        req.extensions_mut().insert(ConnectInfo(peer));
        match self.router().call(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    fn spent_nonces(&self) -> usize {
        self.inner.nonces.lock().map_or(0, |n| n.len())
    }

    /// Ready while an attestation can succeed: the spent-nonce table has
    /// room. Says what it would release (names and counts, no key).
    fn readyz(&self) -> Response<Full<Bytes>> {
        let spent = self.spent_nonces();
        let capacity = self.inner.config.max_outstanding_nonces;
        let ready = spent < capacity;
        json(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &serde_json::json!({
                "status": if ready { "ready" } else { "not ready" },
                "reason": (!ready).then(|| format!(
                    "{spent} spent nonces remembered, max-outstanding-nonces is {capacity}: attestations are refused until they expire"
                )),
                "models": self.inner.release_models,
                "request_key_split": self.inner.keys.request_shares.is_some(),
                "evidence": self.inner.config.evidence_kinds(),
                "spent_nonces": spent,
            }),
        )
    }

    fn issue_nonce(&self) -> Response<Full<Bytes>> {
        let now = self.inner.clock.now_unix();
        let issued = match self.inner.nonces.lock() {
            Ok(store) => store.issue(now),
            Err(_) => Err(NonceError::NoRandomness),
        };
        self.inner.metrics.nonce(issued.is_ok());
        match issued {
            Ok((nonce, expires_at)) => json(
                StatusCode::OK,
                &serde_json::json!({"nonce": hex::encode(nonce), "expires_at": expires_at}),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn attest<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let refuse = |why: Refusal,
                      status: StatusCode,
                      reason: String,
                      nonce: Option<&[u8]>,
                      ak: Option<String>| {
            self.inner.metrics.refused(why, started.elapsed());
            self.inner.audit.record(&AuditRecord {
                time: self.inner.clock.now_unix(),
                peer: peer.to_string(),
                outcome: "refused",
                reason: Some(reason.clone()),
                nonce: nonce.map(hex::encode),
                ak_fingerprint: ak,
                measured_pcr_value: None,
                tpm_reset_count: None,
                tpm_clock: None,
                ak_trust: None,
                ek_certificate_fingerprint: None,
                tdx_tcb_status: None,
                tdx_mrtd: None,
                keys: Vec::new(),
            });
            error(status, &reason)
        };

        let body = match self.read_body(req).await {
            Ok(b) => b,
            Err((status, reason)) => {
                let mut resp = refuse(Refusal::Request, status, reason, None, None);
                if status == StatusCode::REQUEST_TIMEOUT {
                    // The rest of the body is never read: close, don't wait for it.
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                return resp;
            }
        };
        let evidence = match Evidence::from_json(&body) {
            Ok(e) => e,
            Err(e) => {
                return refuse(
                    Refusal::Request,
                    StatusCode::BAD_REQUEST,
                    format!(
                        "malformed evidence JSON at line {} column {}",
                        e.line(),
                        e.column()
                    ),
                    None,
                    None,
                );
            }
        };
        let nonce = evidence.nonce.as_slice();
        let tpm_required = self.inner.config.tpm_evidence;
        let ak = tpm_required.then(|| cinfer_attest::verify::ak_fingerprint(&evidence.ak_public));

        // The nonce is checked (ours, not expired, not spent) before anything
        // else is looked at, and spent only once the evidence verified: the
        // spent set grows with successful attestations only (nonce.rs).
        let checked = match self.inner.nonces.lock() {
            Ok(store) => store.check(nonce, self.inner.clock.now_unix()).map(|_| ()),
            Err(_) => Err(NonceError::Unknown),
        };
        if let Err(e) = checked {
            return refuse(
                Refusal::Nonce,
                StatusCode::FORBIDDEN,
                e.to_string(),
                Some(nonce),
                ak,
            );
        }

        // The AK: endorsed (EK certificate to a configured CA, EK and AK
        // areas consistent; the release is then wrapped under a credential
        // only that TPM can activate) or pinned, unless endorsement is required.
        // Without TPM evidence an endorsement is not looked at.
        let endorsement = if tpm_required {
            self.check_endorsement(&evidence)
        } else {
            Ok(None)
        };
        let endorsed = match endorsement {
            Ok(e) => e,
            Err(e) => {
                return refuse(
                    Refusal::Endorsement,
                    StatusCode::FORBIDDEN,
                    format!("endorsement: {e}"),
                    Some(nonce),
                    ak,
                );
            }
        };
        let ak_trust = if endorsed.is_some() {
            AkTrust::Endorsed
        } else {
            AkTrust::Pinned
        };
        // The TPM quote (when TPM evidence is required), or else the event
        // log's checks alone, which the TD quote's RTMR then proves.
        let checked = if tpm_required {
            cinfer_attest::verify_with(&evidence, nonce, &self.inner.refs, ak_trust).map(Some)
        } else {
            cinfer_attest::verify_event_log(&evidence, nonce, &self.inner.refs).map(|()| None)
        };
        let verified = match checked {
            Ok(v) => v,
            Err(e) => {
                let status = match e {
                    EvidenceError::Malformed { .. } => StatusCode::BAD_REQUEST,
                    _ => StatusCode::FORBIDDEN,
                };
                // Named by kind: the TPM quote, or (TD quotes alone) the
                // event log the TD quote is to prove.
                let (kind, why) = if tpm_required {
                    ("tpm", Refusal::Tpm)
                } else {
                    ("event log", Refusal::EventLog)
                };
                return refuse(why, status, format!("{kind}: {e}"), Some(nonce), ak);
            }
        };
        // A TD quote, when the reference values require TDX evidence: the
        // quote verified against the collateral at the keyserver's clock, the
        // report data bound to this nonce and key, the event RTMR replayed
        // from the same event log the TPM's PCR replays.
        let td = match &self.inner.tdx {
            Some(t) => match cinfer_attest::tdx::verify_evidence(
                &evidence,
                nonce,
                &t.collateral,
                &t.refs,
                self.inner.clock.now_unix(),
            ) {
                Ok(v) => Some(v),
                Err(e) => {
                    return refuse(
                        Refusal::Tdx,
                        StatusCode::FORBIDDEN,
                        format!("tdx: {e}"),
                        Some(nonce),
                        ak,
                    );
                }
            },
            None => None,
        };
        // Spent now, atomically with its check: of two attestations racing on
        // one nonce, the second is refused.
        let spent = match self.inner.nonces.lock() {
            Ok(mut store) => store.spend(nonce, self.inner.clock.now_unix()),
            Err(_) => Err(NonceError::Unknown),
        };
        if let Err(e) = spent {
            let status = match e {
                NonceError::Full => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::FORBIDDEN,
            };
            return refuse(Refusal::Nonce, status, e.to_string(), Some(nonce), ak);
        }

        let release = match self.wrap_keys(&evidence, endorsed.as_ref()) {
            Ok(r) => r,
            Err(reason) => {
                return refuse(
                    Refusal::Release,
                    StatusCode::BAD_REQUEST,
                    reason,
                    Some(nonce),
                    ak,
                );
            }
        };
        self.inner.audit.record(&AuditRecord {
            time: self.inner.clock.now_unix(),
            peer: peer.to_string(),
            outcome: "released",
            reason: None,
            nonce: Some(hex::encode(nonce)),
            ak_fingerprint: verified.as_ref().map(|v| v.ak_fingerprint.clone()),
            measured_pcr_value: verified.as_ref().map(|v| hex::encode(v.measured_value)),
            tpm_reset_count: verified.as_ref().map(|v| v.clock_info.reset_count),
            tpm_clock: verified.as_ref().map(|v| v.clock_info.clock),
            ak_trust: verified.as_ref().map(|_| {
                if endorsed.is_some() {
                    "endorsed"
                } else {
                    "pinned"
                }
            }),
            ek_certificate_fingerprint: endorsed.map(|e| e.ek_certificate_fingerprint),
            tdx_mrtd: td.as_ref().map(|v| hex::encode(v.mr_td)),
            tdx_tcb_status: td.map(|v| v.tcb_status),
            keys: release
                .keys
                .iter()
                .map(|k| format!("{}:{}", k.kind, k.id))
                .collect(),
        });
        self.inner.metrics.released(started.elapsed());
        json(StatusCode::OK, &release)
    }

    /// `Some` when the AK is trusted through its endorsement, `None` when only
    /// a pin can trust it (then `cinfer_attest::verify` checks the pin).
    fn check_endorsement(
        &self,
        evidence: &Evidence,
    ) -> Result<Option<EndorsedAk>, EndorsementError> {
        let trust = &self.inner.ek_trust;
        match &evidence.endorsement {
            // A keyserver without EK CAs trusts pins only, whatever the
            // loader sends.
            Some(_) if trust.is_empty() => Ok(None),
            Some(e) => {
                endorsement::verify(e, &evidence.ak_public, trust, self.inner.clock.now_unix())
                    .map(Some)
            }
            None if self.inner.config.endorsement.required => Err(EndorsementError::Missing),
            None => Ok(None),
        }
    }

    /// Wraps every released key to the evidence's HPKE key, AAD = the nonce;
    /// for an endorsed AK in PSK mode under a fresh credential's secret.
    fn wrap_keys(
        &self,
        evidence: &Evidence,
        endorsed: Option<&EndorsedAk>,
    ) -> Result<KeyRelease, String> {
        let recipient = RequestPublicKey::from_bytes(&evidence.hpke_public_key)
            .map_err(|e| format!("HPKE public key: {e}"))?;
        let keys = &self.inner.keys;
        // (kind, id, secret or share, the split's manifest for a share)
        type Secret = (
            ReleasedKeyKind,
            String,
            zeroize::Zeroizing<Vec<u8>>,
            Option<SplitManifest>,
        );
        let share = |s: &ShareEntry| -> Secret {
            (
                s.kind,
                s.id.clone(),
                zeroize::Zeroizing::new(s.share.clone()),
                Some(s.manifest.clone()),
            )
        };
        let mut secrets: Vec<Secret> = Vec::new();
        for id in &self.inner.release_models {
            if let Some(k) = keys.models.get(id) {
                secrets.push((
                    ReleasedKeyKind::Model,
                    id.clone(),
                    zeroize::Zeroizing::new(k.to_vec()),
                    None,
                ));
            }
            if let Some(s) = keys.model_shares.get(id) {
                secrets.push(share(s));
            }
        }
        if self.inner.config.release.request_key {
            match &keys.request_shares {
                Some(shares) => {
                    secrets.push(share(&shares.request));
                    secrets.push(share(&shares.receipt));
                }
                None => {
                    secrets.push((
                        ReleasedKeyKind::Request,
                        keys.request.public_key().key_id(),
                        keys.request.to_bytes(),
                        None,
                    ));
                    secrets.push((
                        ReleasedKeyKind::Receipt,
                        cinfer_attest::RECEIPT_KEY_ID.to_owned(),
                        zeroize::Zeroizing::new(keys.receipt.to_bytes().to_vec()),
                        None,
                    ));
                }
            }
        }
        // A fresh secret per release, carried to the TPM by the credential:
        // the keys unwrap only with it, and it is bound to this nonce.
        let mut credential = None;
        let mut psk = None;
        if let Some(endorsed) = endorsed {
            let mut secret = zeroize::Zeroizing::new([0u8; 32]);
            getrandom::fill(secret.as_mut()).map_err(|_| "no randomness for the credential")?;
            let made =
                endorsement::make_credential(&endorsed.ek, &endorsed.ak_name, secret.as_ref())
                    .map_err(|e| format!("making the credential: {e}"))?;
            credential = Some(Credential {
                id_object: made.id_object,
                encrypted_secret: made.encrypted_secret,
                binding: credential_binding(secret.as_ref(), &evidence.nonce).to_vec(),
            });
            psk = Some(credential_psk(secret.as_ref(), &evidence.nonce));
        }
        let mut released = Vec::with_capacity(secrets.len());
        for (kind, id, secret, split) in secrets {
            let context = match split {
                Some(_) => share_context(kind, &id),
                None => release_context(kind, &id),
            };
            let wrapped = match &psk {
                Some(psk) => wrap_key_psk(
                    &recipient,
                    &context,
                    &evidence.nonce,
                    &secret,
                    psk.as_ref(),
                    CREDENTIAL_PSK_ID,
                ),
                None => wrap_key(&recipient, &context, &evidence.nonce, &secret),
            }
            .map_err(|e| format!("wrapping to the HPKE key: {e}"))?;
            released.push(ReleasedKey {
                kind,
                id,
                enc: wrapped.enc,
                ciphertext: wrapped.ciphertext,
                split,
            });
        }
        let mut release = KeyRelease {
            version: KEY_RELEASE_VERSION,
            nonce: evidence.nonce.clone(),
            keys: released,
            identity: Vec::new(),
            signature: Vec::new(),
            credential,
        };
        // Signed, so a loader that pins keyservers installs only what they released.
        release.sign(&keys.identity);
        Ok(release)
    }

    /// Reads a body of at most `max-body-bytes` within `request-timeout-secs`.
    async fn read_body<B>(&self, req: Request<B>) -> Result<Bytes, (StatusCode, String)>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let max = self.inner.config.max_body_bytes;
        let too_large = || {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {max} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(too_large());
        }
        let timeout = Duration::from_secs(self.inner.config.request_timeout_secs);
        match tokio::time::timeout(timeout, Limited::new(req.into_body(), max).collect()).await {
            Err(_) => Err((
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {} s", timeout.as_secs()),
            )),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(_)) => Err((StatusCode::BAD_REQUEST, "reading the request body".into())),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}

/// The identity public key (uncompressed SEC1) of a set of keys.
pub fn identity_public_key(keys: &Keys) -> Vec<u8> {
    keys.identity
        .verifying_key()
        .to_sec1_point(false)
        .as_bytes()
        .to_vec()
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    respond(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": reason }))
}

/// The 405 of a route that takes only GET.
async fn get_only() -> Response<Full<Bytes>> {
    method_not_allowed("GET")
}

/// The 405 of a route that takes only POST.
async fn post_only() -> Response<Full<Bytes>> {
    method_not_allowed("POST")
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, server: KeyServer) {
    serve_until(listener, server, std::future::pending()).await;
}

/// Serves HTTP/1.1 on `listener` until `shutdown` completes (then stops
/// accepting; connections in progress finish on their own tasks). At most
/// `max-connections` are open at once: one accepted over the cap is closed at
/// once, and a refusal is logged at most once a second.
pub async fn serve_until(
    listener: TcpListener,
    server: KeyServer,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let header_timeout = Duration::from_secs(server.inner.config.request_timeout_secs);
    let max_connections = server.inner.config.max_connections;
    let permits = Arc::new(Semaphore::new(max_connections));
    // TLS on the listener when configured (the identity loaded when the
    // configuration was parsed).
    let tls = match server
        .inner
        .config
        .tls
        .as_ref()
        .map(|id| id.server_config())
    {
        None => None,
        Some(Ok(config)) => Some(tokio_rustls::TlsAcceptor::from(config)),
        Some(Err(e)) => {
            tracing::error!("tls: {e}; not serving");
            return;
        }
    };
    let mut refused: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            refused += 1;
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(
                    max_connections,
                    refused_total = refused,
                    "connections closed at once: max-connections are open"
                );
                last_warning = Some(Instant::now());
            }
            continue;
        };
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_http(TokioIo::new(stream), server, peer, header_timeout).await,
                // The handshake must finish within the header timeout too.
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_http(TokioIo::new(stream), server, peer, header_timeout).await
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer}: timed out"),
                    }
                }
            }
        });
    }
}

/// HTTP/1.1 on one accepted connection (plain or TLS).
async fn serve_http<I>(io: I, server: KeyServer, peer: SocketAddr, header_timeout: Duration)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let router = server.router();
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(crate::config::MAX_HTTP_BUF_BYTES);
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!("connection from {peer}: {e}");
    }
}
