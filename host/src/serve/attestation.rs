//! Attestation: the quote over a keyserver nonce and a fresh key, and the
//! key releases it answers (all or nothing; a TPM credential activated first).

use super::*;

const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// Keys received from keyservers, by id. Never printed.
#[derive(Default, Clone)]
pub struct InstalledKeys {
    /// Request private keys, by key id, each with the receipt signing key of
    /// the release (so of the keyserver) it came with: a request sealed to a
    /// keyserver's request key gets a receipt that keyserver's clients verify.
    pub request: BTreeMap<String, RequestKeys>,
    /// Model data keys, by model id.
    pub models: BTreeMap<String, ModelKey>,
}

/// A request key and the receipt key released with it. Its `Debug` output
/// shows no key material.
#[derive(Clone)]
pub struct RequestKeys {
    /// Opens requests sealed to this key id.
    pub request: RequestPrivateKey,
    /// Signs the receipts of those requests.
    pub receipt: p256::ecdsa::SigningKey,
    /// Identity keys (SEC1) of the keyservers that released it: the one that
    /// released it whole, or those whose shares rebuilt it (k-of-n). Named
    /// in every receipt.
    pub keyservers: Vec<Vec<u8>>,
}

impl std::fmt::Debug for RequestKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestKeys")
            .field("key_id", &self.request.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InstalledKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstalledKeys")
            .field("request", &self.request.keys().collect::<Vec<_>>())
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A key release verified and unwrapped, not installed yet
/// ([`Attestor::stage`], [`Attestor::commit`]). Never printed.
pub struct StagedRelease {
    keys: InstalledKeys,
    /// The share pool with this release's shares added and the keys they
    /// completed taken out.
    pool: SharePool,
    /// Keyservers whose shares disagree with the manifest a rebuilt key's
    /// shares agreed on.
    dissent: Vec<String>,
}

impl std::fmt::Debug for StagedRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedRelease")
            .field("keys", &self.keys)
            .finish()
    }
}

impl StagedRelease {
    /// The keys it would install.
    pub fn keys(&self) -> &InstalledKeys {
        &self.keys
    }
}

struct Pending {
    nonce: Vec<u8>,
    key: RequestPrivateKey,
}

/// The attestation side of a serving loader: its TPM, its event log, the
/// pending attestation and the keys it received.
pub struct Attestor {
    /// `None` in a TD without a vTPM: then TD quotes alone attest
    /// ([`Attestor::with_tdx`]).
    tpm: Option<cinfer_tpm::Tpm>,
    /// The TPM's EK certificate, EK and AK areas, sent with every evidence;
    /// `None` when the TPM has no EK certificate (then only a keyserver that
    /// pins the AK releases keys).
    endorsement: Option<Endorsement>,
    events: Vec<Event>,
    quote_pcrs: Vec<u8>,
    pending: Option<Pending>,
    pub(super) keys: InstalledKeys,
    pinned: Vec<Vec<u8>>,
    /// Keyservers whose shares a key needs (`keyserver-threshold`); from 2
    /// on, whole keys are refused and only split keys are installed.
    threshold: u8,
    /// Shares of split keys not yet complete.
    pool: SharePool,
    /// The TD's quote provider, when the loader runs in a TDX guest
    /// configured to produce TD quotes.
    tdx: Option<super::tdx::TdxQuoter>,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("tpm", &self.tpm)
            .field("events", &self.events.len())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Hello<'a> {
    protocol: u8,
    loader: &'a str,
    #[serde(with = "hex::serde")]
    ak_public: &'a [u8],
    pcr: u8,
    programs: &'a [ProgramInfo],
    /// Present when the peer must authenticate: what it signs (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    challenge: Option<String>,
    /// The peer is dropped after this long without a complete frame.
    idle_timeout_ms: u64,
}

/// A served program as the peer sees it (`Hello`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramInfo {
    /// The name requests use.
    pub name: String,
    /// SHA-256 of the component.
    pub sha256: String,
    /// The capability world it was granted.
    pub world: String,
}

#[derive(serde::Serialize)]
struct Installed<'a> {
    models: Vec<&'a str>,
    request_keys: Vec<&'a str>,
    /// Split keys still waiting for shares (k-of-n keyservers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    waiting: Vec<Waiting>,
}

impl Attestor {
    /// Resets `pcr` of the TPM and extends it with `events` (which must all
    /// name it). Without a TPM the events are only kept: they are extended
    /// into the TD's RTMR by [`Attestor::with_tdx`], which such a loader
    /// needs.
    pub fn measure(
        mut tpm: Option<cinfer_tpm::Tpm>,
        pcr: u8,
        events: Vec<Event>,
        quote_pcrs: Vec<u8>,
    ) -> Result<Self, ServeError> {
        let mut endorsement = None;
        if let Some(tpm) = &mut tpm {
            tpm.measure(pcr, &events)?;
            endorsement = match tpm.endorsement() {
                Ok(e) => Some(e),
                Err(cinfer_tpm::TpmError::NoEkCertificate { nv_index, .. }) => {
                    tracing::info!(
                        nv_index = format_args!("{nv_index:#010x}"),
                        "the TPM has no EK certificate: only keyservers that pin the AK will release keys"
                    );
                    None
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(Self {
            tpm,
            endorsement,
            events,
            quote_pcrs,
            pending: None,
            keys: InstalledKeys::default(),
            pinned: Vec::new(),
            threshold: 1,
            pool: SharePool::default(),
            tdx: None,
        })
    }

    /// Also produces TDX evidence: extends the event log into the configured
    /// RTMR now, and sends a TD quote with every evidence.
    pub fn with_tdx(mut self, config: super::tdx::TdxConfig) -> Result<Self, ServeError> {
        self.tdx = Some(super::tdx::TdxQuoter::extend(config, &self.events)?);
        Ok(self)
    }

    /// Installs only releases signed by one of these keyserver identities (SEC1).
    pub fn pin_keyservers(mut self, identities: Vec<Vec<u8>>) -> Self {
        self.pinned = identities;
        self
    }

    /// Installs a key only from the shares of `threshold` different pinned
    /// keyservers (k-of-n; `keyserver-threshold`). From 2 on, whole keys are
    /// refused. The configuration checks that enough keyservers are pinned.
    pub fn keyserver_threshold(mut self, threshold: u8) -> Self {
        self.threshold = threshold.max(1);
        self
    }

    /// Split keys still waiting for shares.
    pub fn waiting(&self) -> Vec<Waiting> {
        self.pool.waiting()
    }

    /// The event log.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The endorsement sent with every evidence, if the TPM has an EK certificate.
    pub fn endorsement(&self) -> Option<&Endorsement> {
        self.endorsement.as_ref()
    }

    /// The keys received so far.
    pub fn keys(&self) -> &InstalledKeys {
        &self.keys
    }

    /// The first frame on a new connection: the AK, the measured PCR, the
    /// programs served, the challenge the peer must sign (if it must) and the
    /// idle timeout it must stay within.
    pub fn hello(
        &self,
        programs: &[ProgramInfo],
        challenge: Option<&[u8; cinfer_channel::CHALLENGE_LEN]>,
        idle_timeout: std::time::Duration,
    ) -> Frame {
        let pcr = self
            .events
            .first()
            .map_or(cinfer_attest::DEFAULT_PCR, |e| e.pcr);
        Frame {
            kind: Kind::Hello,
            payload: serde_json::to_vec(&Hello {
                protocol: cinfer_channel::VERSION,
                loader: env!("CARGO_PKG_VERSION"),
                ak_public: self.tpm.as_ref().map_or(&[][..], |t| t.ak_public()),
                pcr,
                programs,
                challenge: challenge.map(hex::encode),
                idle_timeout_ms: u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX),
            })
            .unwrap_or_default(),
        }
    }

    /// Handles one frame from the peer and returns the answer (a key release
    /// is staged and committed at once: see [`Service`] for the serving path,
    /// which opens the models in between).
    pub fn handle(&mut self, frame: &Frame) -> Result<Frame, ServeError> {
        match frame.kind {
            Kind::AttestRequest => self.attest(&frame.payload),
            Kind::KeyRelease => {
                let staged = self.stage(&frame.payload)?;
                Ok(self.commit(staged))
            }
            other => Err(ServeError::UnexpectedFrame(other)),
        }
    }

    fn attest(&mut self, nonce: &[u8]) -> Result<Frame, ServeError> {
        if !NONCE_LEN.contains(&nonce.len()) {
            return Err(ServeError::BadNonce(nonce.len()));
        }
        let key = RequestPrivateKey::generate();
        let public_key = key.public_key().to_bytes();
        let mut evidence: Evidence = match &mut self.tpm {
            Some(tpm) => tpm.quote(&self.quote_pcrs, nonce, &public_key, &self.events)?,
            None if self.tdx.is_some() => Evidence {
                version: cinfer_attest::EVIDENCE_VERSION,
                nonce: nonce.to_vec(),
                hpke_public_key: public_key,
                ak_public: Vec::new(),
                attest: Vec::new(),
                signature: Vec::new(),
                pcrs: BTreeMap::new(),
                event_log: self.events.clone(),
                endorsement: None,
                tdx: None,
            },
            None => return Err(ServeError::NoEvidence),
        };
        evidence.endorsement = self.endorsement.clone();
        if let Some(tdx) = &mut self.tdx {
            let report_data = cinfer_attest::tdx_report_data(nonce, &evidence.hpke_public_key);
            evidence.tdx = Some(cinfer_attest::TdxEvidence {
                quote: tdx.quote(&report_data)?,
                rtmr: tdx.rtmr(),
            });
        }
        self.pending = Some(Pending {
            nonce: nonce.to_vec(),
            key,
        });
        Ok(Frame {
            kind: Kind::Evidence,
            payload: evidence.to_json(),
        })
    }

    /// Verifies and unwraps a key release without installing anything: the
    /// attestation's ephemeral key is spent once the release passed its
    /// format and signature checks, whatever happens next.
    pub fn stage(&mut self, payload: &[u8]) -> Result<StagedRelease, ServeError> {
        let release: KeyRelease =
            serde_json::from_slice(payload).map_err(ServeError::MalformedRelease)?;
        if release.version != cinfer_attest::KEY_RELEASE_VERSION {
            return Err(ServeError::ReleaseVersion {
                found: release.version,
                expected: cinfer_attest::KEY_RELEASE_VERSION,
            });
        }
        if !self.pinned.is_empty() {
            release
                .verify(&self.pinned)
                .map_err(ServeError::UntrustedRelease)?;
        }
        // The attestation's key is spent whatever happens next.
        let pending = self
            .pending
            .take()
            .ok_or(ServeError::NoPendingAttestation)?;
        if release.nonce != pending.nonce {
            return Err(ServeError::NonceMismatch);
        }
        // An endorsed AK: the keys are wrapped under the credential's secret,
        // which only this TPM (its EK, with this AK loaded) recovers.
        let psk = match &release.credential {
            None => None,
            Some(credential) => {
                // An endorsement is sent only by a loader with a TPM.
                let (Some(tpm), Some(_)) = (&mut self.tpm, &self.endorsement) else {
                    return Err(ServeError::UnexpectedCredential);
                };
                let secret =
                    tpm.activate_credential(&credential.id_object, &credential.encrypted_secret)?;
                let expected = credential_binding(&secret, &release.nonce);
                if !constant_time_eq(&expected, &credential.binding) {
                    return Err(ServeError::CredentialNotForThisAttestation);
                }
                Some(credential_psk(&secret, &release.nonce))
            }
        };
        let mut requests = BTreeMap::new();
        let mut receipt = None;
        let mut keys = InstalledKeys::default();
        let mut pool = self.pool.clone();
        let mut shared = std::collections::BTreeSet::new();
        for k in &release.keys {
            if k.split.is_none() && self.threshold >= 2 {
                return Err(ServeError::WholeKeyUnderThreshold {
                    kind: k.kind,
                    id: k.id.clone(),
                    threshold: self.threshold,
                });
            }
            let context = match k.split {
                Some(_) => share_context(k.kind, &k.id),
                None => release_context(k.kind, &k.id),
            };
            let wrapped = WrappedSecret {
                enc: k.enc.clone(),
                ciphertext: k.ciphertext.clone(),
            };
            let secret = match &psk {
                Some(psk) => unwrap_key_psk(
                    &pending.key,
                    &context,
                    &release.nonce,
                    &wrapped,
                    psk.as_ref(),
                    CREDENTIAL_PSK_ID,
                ),
                None => unwrap_key(&pending.key, &context, &release.nonce, &wrapped),
            }
            .map_err(|_| ServeError::Unwrap {
                kind: k.kind,
                id: k.id.clone(),
            })?;
            if let Some(manifest) = &k.split {
                // A share: checked against its manifest's commitments and
                // kept until shares of `threshold` keyservers are in.
                if !shared.insert((k.kind, k.id.clone())) {
                    return Err(ShareError::Duplicate {
                        kind: k.kind,
                        id: k.id.clone(),
                    }
                    .into());
                }
                pool.add(
                    &release.identity,
                    k.kind,
                    &k.id,
                    manifest,
                    secret,
                    self.threshold.max(2),
                )?;
                continue;
            }
            match ReleasedSecret::parse(k.kind, &k.id, &secret)? {
                ReleasedSecret::Request(key) => {
                    requests.insert(k.id.clone(), key);
                }
                ReleasedSecret::Model(key) => {
                    keys.models.insert(k.id.clone(), key);
                }
                ReleasedSecret::Receipt(key) => receipt = Some(key),
            }
        }
        if !requests.is_empty() {
            // A request key is usable only with its keyserver's receipt key.
            let receipt = receipt.ok_or(ServeError::RequestKeysWithoutReceiptKey)?;
            let keyservers: Vec<Vec<u8>> = Some(release.identity.clone())
                .filter(|i| !i.is_empty())
                .into_iter()
                .collect();
            keys.request = requests
                .into_iter()
                .map(|(id, request)| {
                    let receipt = receipt.clone();
                    let keyservers = keyservers.clone();
                    (
                        id,
                        RequestKeys {
                            request,
                            receipt,
                            keyservers,
                        },
                    )
                })
                .collect();
        }
        // A split request key comes with its receipt key's shares, by the
        // same keyservers.
        for (kind, id) in &shared {
            let other = match kind {
                ReleasedKeyKind::Request => ReleasedKeyKind::Receipt,
                ReleasedKeyKind::Receipt => ReleasedKeyKind::Request,
                ReleasedKeyKind::Model => continue,
            };
            if !shared.contains(&(other, id.clone())) {
                return Err(ServeError::RequestKeysWithoutReceiptKey);
            }
        }
        let (complete, dissent) = pool.take_complete();
        let mut split_receipts = BTreeMap::new();
        let mut split_requests = BTreeMap::new();
        for c in complete {
            match ReleasedSecret::parse(c.kind, &c.id, &c.secret)? {
                ReleasedSecret::Model(key) => {
                    keys.models.insert(c.id, key);
                }
                ReleasedSecret::Request(key) => {
                    split_requests.insert(c.id, (key, c.keyservers));
                }
                ReleasedSecret::Receipt(key) => {
                    split_receipts.insert(c.id, key);
                }
            }
        }
        for (id, (request, keyservers)) in split_requests {
            let receipt = split_receipts
                .remove(&id)
                .ok_or(ServeError::RequestKeysWithoutReceiptKey)?;
            keys.request.insert(
                id,
                RequestKeys {
                    request,
                    receipt,
                    keyservers,
                },
            );
        }
        Ok(StagedRelease {
            keys,
            pool,
            dissent,
        })
    }

    /// Installs a staged release (later keys with the same id replace earlier ones).
    pub fn commit(&mut self, staged: StagedRelease) -> Frame {
        let StagedRelease {
            mut keys,
            pool,
            dissent,
        } = staged;
        self.keys.request.append(&mut keys.request);
        self.keys.models.append(&mut keys.models);
        self.pool = pool;
        for keyserver in dissent {
            tracing::warn!(%keyserver, "a keyserver's share belongs to another split than the one the others agree on: not used");
        }
        let waiting = self.pool.waiting();
        tracing::info!(keys = ?self.keys, waiting = ?waiting, "keys installed");
        Frame {
            kind: Kind::KeysInstalled,
            payload: serde_json::to_vec(&Installed {
                models: self.keys.models.keys().map(String::as_str).collect(),
                request_keys: self.keys.request.keys().map(String::as_str).collect(),
                waiting,
            })
            .unwrap_or_default(),
        }
    }
}

/// A released secret (whole, or rebuilt from shares) as the key it must be.
enum ReleasedSecret {
    Model(ModelKey),
    Request(RequestPrivateKey),
    Receipt(p256::ecdsa::SigningKey),
}

impl ReleasedSecret {
    /// Parses `secret` released as (`kind`, `id`): a request key must have
    /// that id; errors say which key and why, never its bytes.
    fn parse(kind: ReleasedKeyKind, id: &str, secret: &[u8]) -> Result<Self, ServeError> {
        let bad = |reason: BadKeyReason| ServeError::BadKey {
            kind,
            id: id.to_owned(),
            reason,
        };
        Ok(match kind {
            ReleasedKeyKind::Model => {
                Self::Model(ModelKey::from_bytes(secret).map_err(|e| bad(BadKeyReason::Model(e)))?)
            }
            ReleasedKeyKind::Request => {
                let key = RequestPrivateKey::from_bytes(secret)
                    .map_err(|e| bad(BadKeyReason::Request(e)))?;
                let key_id = key.public_key().key_id();
                if key_id != id {
                    return Err(bad(BadKeyReason::RequestKeyId(key_id)));
                }
                Self::Request(key)
            }
            ReleasedKeyKind::Receipt => Self::Receipt(
                p256::ecdsa::SigningKey::from_slice(secret)
                    .map_err(|_| bad(BadKeyReason::ReceiptNotP256))?,
            ),
        })
    }
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
