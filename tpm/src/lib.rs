//! The trusted loader's TPM side: measurement into a PCR and a quote over it,
//! producing the [`cinfer_attest::Evidence`] a keyserver verifies.
//!
//! Built on `tss-esapi` 7.x (the Rust wrapper of tpm2-tss's ESAPI); the TPM is
//! reached through a TCTI (`device:/dev/tpmrm0` on a host, `swtpm:` or `mssim:`
//! for a software TPM). [`swtpm`] starts a throw-away software TPM for tests.
//!
//! # Measurement
//!
//! [`Tpm::measure`] resets one PCR (23 by default, [`cinfer_attest::DEFAULT_PCR`])
//! and extends its SHA-256 bank with each event's digest, in log order, so that
//! afterwards `PCR = replay(event_log)` exactly: a verifier recomputes it from the
//! event log alone. PCR 23 is the PC client profile's "application support" PCR,
//! resettable at locality 0, which is what a user-space loader has: a restarted
//! loader resets it and measures again, getting the same value for the same
//! inputs instead of an ever-growing chain. (PCR 16, the debug PCR, is the only
//! other one resettable at locality 0.) The PCR is read back after the extends
//! and compared with the replay; any difference (another process extending the
//! same PCR concurrently) is an error, not evidence.
//!
//! The reset is also the weak point: anyone with locality-0 access to the TPM can
//! reset PCR 23 and extend values of their choice. The quote proves "this TPM's
//! PCR 23 held X when it signed", not who extended it; what makes the evidence
//! meaningful is that only the measured loader holds the HPKE private key the
//! quote is bound to, and that the machine's operator controls who may talk to
//! the TPM.
//!
//! # Attestation key (AK)
//!
//! A primary key created with `TPM2_CreatePrimary` in the **endorsement
//! hierarchy**: ECC NIST P-256, restricted signing key, ECDSA with SHA-256,
//! attributes `fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth |
//! restricted | sign`, empty auth and policy, empty `unique`. A primary key is a
//! deterministic function of the hierarchy seed and the template, so every
//! [`Tpm::open`] on the same TPM yields the same key: the operator records
//! [`Tpm::ak_public`] once and the keyserver pins it; nothing has to be persisted
//! in NV memory. The endorsement hierarchy is used rather than the owner hierarchy
//! because its seed survives `TPM2_Clear` (a change of owner): the pinned AK only
//! changes if the TPM itself is replaced (or its EPS regenerated). `restricted`
//! means the TPM only signs with it data it produced itself (a `TPMS_ATTEST` that
//! starts with `TPM_GENERATED_VALUE`), so it cannot be made to sign a forged
//! quote. The endorsement hierarchy's auth must be empty (the default).
//!
//! # Quote binding
//!
//! [`Tpm::quote`] asks `TPM2_Quote` with the AK over the SHA-256 bank of the given
//! PCRs, with `qualifyingData = cinfer_attest::binding(nonce, hpke_public_key)`:
//! the signed `TPMS_ATTEST` then carries the keyserver's fresh nonce (no replay)
//! and the hash of the loader's ephemeral HPKE public key (keys released in
//! answer can only be unwrapped by the process that made the quote). The PCR
//! values themselves are read with `PCR_Read` and shipped beside the quote; their
//! digest is checked against the quote's `pcrDigest` before returning.
//!
//! # Flush discipline
//!
//! A TPM need hold only 3 transient objects (`TPM2_PT_HR_TRANSIENT_MIN`) and, without a resource
//! manager (swtpm, `/dev/tpm0`), objects of a process that crashed stay loaded
//! until the TPM restarts. [`Tpm::open`] therefore flushes every transient object
//! it finds before creating the AK, and `Drop` flushes the AK (and the EK, if
//! [`Tpm::endorsement`] created it). Authorization uses the password session,
//! except for the one policy session [`Tpm::activate_credential`] starts and
//! flushes, so no session slot is left behind. Do not point two processes at the same
//! TPM without a resource manager (`/dev/tpmrm0` is one; `/dev/tpm0` and swtpm
//! are not): `open` of one would flush the other's AK.
//!
//! [`Tpm`] is not `Send` (the ESAPI context is not): open it on the thread that
//! uses it.
//!
//! # Endorsement
//!
//! A keyserver that does not pin the AK trusts it through the TPM's
//! endorsement key (EK) instead: [`Tpm::endorsement`] reads the manufacturer's
//! EK certificate from its NV index (RSA 2048, `0x01c00002`, TCG EK Credential
//! Profile), creates the EK from the profile's default template (template L-1:
//! a primary key, so the same key the certificate certifies) and returns both
//! with the AK's public area, whose name the keyserver computes. The keyserver
//! checks the certificate and answers with a credential (`TPM2_MakeCredential`
//! done in software) that only this TPM can open, and only while an object with
//! the AK's name is loaded in it: [`Tpm::activate_credential`]
//! (`TPM2_ActivateCredential`, the EK authorized by its policy,
//! `PolicySecret(TPM_RH_ENDORSEMENT)`, in a policy session flushed after use).
//! All verification happens on the keyserver: the loader only reads and
//! activates.
#![forbid(unsafe_code)]

#[cfg(feature = "swtpm")]
pub mod swtpm;

use cinfer_attest::{
    Digest32, EVIDENCE_VERSION, Endorsement, Event, Evidence, binding, pcr_digest, replay,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use tss_esapi::{
    Context,
    abstraction::{AsymmetricAlgorithmSelection, ek, nv},
    attributes::ObjectAttributesBuilder,
    constants::{CapabilityType, SessionType, tss::TPM2_TRANSIENT_FIRST},
    handles::{KeyHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, TpmHandle},
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::{Hierarchy, NvAuth},
        session_handles::{AuthSession, PolicySession},
        structure_tags::AttestationType,
    },
    structures::{
        AttestInfo, CapabilityData, Data, Digest, DigestValues, EccPoint, EccScheme,
        EncryptedSecret, HashScheme, IdObject, KeyDerivationFunctionScheme, Nonce,
        PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Public, PublicBuilder,
        PublicEccParametersBuilder, SignatureScheme, SymmetricDefinition,
        SymmetricDefinitionObject,
    },
    tcti_ldr::TctiNameConf,
    traits::Marshall,
};

/// Highest PCR index (PC client TPMs have 24 PCRs).
pub const MAX_PCR: u8 = 23;
/// PCRs resettable at locality 0 (PC client profile): the debug PCR and the
/// application PCR.
pub const RESETTABLE_PCRS: [u8; 2] = [16, 23];

/// NV index of the RSA 2048 EK certificate (TCG EK Credential Profile 2.0,
/// §2.2.1.4: the low range), where swtpm and TPM manufacturers store it.
pub const RSA_2048_EK_CERTIFICATE_NV_INDEX: u32 = 0x01c0_0002;

/// ESAPI handles of PCR 0..=23, by index.
const PCR_HANDLES: [PcrHandle; 24] = [
    PcrHandle::Pcr0,
    PcrHandle::Pcr1,
    PcrHandle::Pcr2,
    PcrHandle::Pcr3,
    PcrHandle::Pcr4,
    PcrHandle::Pcr5,
    PcrHandle::Pcr6,
    PcrHandle::Pcr7,
    PcrHandle::Pcr8,
    PcrHandle::Pcr9,
    PcrHandle::Pcr10,
    PcrHandle::Pcr11,
    PcrHandle::Pcr12,
    PcrHandle::Pcr13,
    PcrHandle::Pcr14,
    PcrHandle::Pcr15,
    PcrHandle::Pcr16,
    PcrHandle::Pcr17,
    PcrHandle::Pcr18,
    PcrHandle::Pcr19,
    PcrHandle::Pcr20,
    PcrHandle::Pcr21,
    PcrHandle::Pcr22,
    PcrHandle::Pcr23,
];

/// A TPM operation that failed. Messages name the TCTI and the PCR; they never
/// contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The TCTI configuration string could not be parsed.
    #[error(
        "invalid TCTI configuration {tcti:?} (expected e.g. \"device:/dev/tpmrm0\" or \"swtpm:host=127.0.0.1,port=2321\")"
    )]
    TctiConfig {
        /// The string given.
        tcti: String,
        /// The parser's error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TCTI could not be initialized: no TPM at that device or address.
    #[error("TPM unreachable through TCTI {tcti:?}")]
    Unreachable {
        /// The TCTI configuration used.
        tcti: String,
        /// The ESAPI error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM command {command} failed (TCTI {tcti:?})")]
    Command {
        /// The TCTI configuration used.
        tcti: String,
        /// The command (e.g. `"PCR_Extend"`, `"Quote"`).
        command: &'static str,
        /// The ESAPI or TPM error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A PCR index above [`MAX_PCR`].
    #[error("PCR index {pcr} out of range (0..={MAX_PCR})")]
    PcrOutOfRange {
        /// The index given.
        pcr: u8,
    },
    /// An event given to [`Tpm::measure`] names another PCR.
    #[error("event {index} ({name:?}) is for PCR {event_pcr}, not PCR {pcr}")]
    EventForOtherPcr {
        /// The PCR being measured.
        pcr: u8,
        /// Position of the event in the list.
        index: usize,
        /// The event's name.
        name: String,
        /// The PCR the event names.
        event_pcr: u8,
    },
    /// The PCR cannot be reset at locality 0 and does not read zeros, so the
    /// event log could not replay to it.
    #[error(
        "PCR {pcr} is not resettable at locality 0 (only 16 and 23 are) and is not zero (TCTI {tcti:?})"
    )]
    PcrNotResettable {
        /// The PCR.
        pcr: u8,
        /// The TCTI configuration used.
        tcti: String,
    },
    /// After measuring, the PCR does not hold the event log's replay (something
    /// else extended it concurrently).
    #[error("PCR {pcr} reads {actual} after measuring but the event log replays to {expected}")]
    MeasurementMismatch {
        /// The PCR.
        pcr: u8,
        /// Hex of the replayed value.
        expected: String,
        /// Hex of the value read.
        actual: String,
    },
    /// [`Tpm::quote`] was given no PCR.
    #[error("no PCR selected for the quote")]
    NoPcrSelected,
    /// The PCRs changed between the quote and reading them, twice in a row.
    #[error("PCRs {pcrs:?} changed while quoting (twice); TCTI {tcti:?}")]
    PcrsChanged {
        /// The quoted PCRs.
        pcrs: Vec<u8>,
        /// The TCTI configuration used.
        tcti: String,
    },
    /// The TPM has no EK certificate at the NV index (not provisioned by its
    /// manufacturer, or a software TPM set up without `--create-ek-cert`).
    #[error("no EK certificate at NV index {nv_index:#010x} (TCTI {tcti:?})")]
    NoEkCertificate {
        /// The NV index read.
        nv_index: u32,
        /// The TCTI configuration used.
        tcti: String,
        /// The ESAPI or TPM error.
        #[source]
        source: tss_esapi::Error,
    },
    /// `TPM2_ActivateCredential` refused the credential: it was made for
    /// another AK name or another EK, or was tampered with.
    #[error(
        "the TPM refused to activate the credential (made for another AK or EK, or altered; TCTI {tcti:?})"
    )]
    CredentialRefused {
        /// The TCTI configuration used.
        tcti: String,
        /// The ESAPI or TPM error (e.g. `TPM_RC_INTEGRITY`).
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM answered something that does not match what was asked.
    #[error("unexpected TPM response to {command}: {what} (TCTI {tcti:?})")]
    UnexpectedResponse {
        /// The TCTI configuration used.
        tcti: String,
        /// The command.
        command: &'static str,
        /// What was wrong.
        what: String,
    },
}

/// An open TPM with the attestation key loaded.
pub struct Tpm {
    context: Context,
    tcti: String,
    /// The AK's transient handle; `None` only once flushed.
    ak: Option<KeyHandle>,
    ak_public: Vec<u8>,
    /// The AK's marshalled `TPMT_PUBLIC` (its name is `nameAlg || H(this)`).
    ak_public_area: Vec<u8>,
    /// The EK's transient handle, once [`Tpm::endorsement`] created it.
    ek: Option<KeyHandle>,
    /// Counts this context for test harnesses (see `swtpm::spawn_guarded`).
    #[cfg(feature = "swtpm")]
    _counted: swtpm::TssContext,
}

impl fmt::Debug for Tpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tpm")
            .field("tcti", &self.tcti)
            .field("ak_public", &hex::encode(&self.ak_public))
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// Opens the TPM behind `tcti` (`"device:/dev/tpmrm0"`,
    /// `"swtpm:host=127.0.0.1,port=2321"`, `"mssim:host=...,port=..."`), flushes
    /// transient objects left by earlier processes and creates the AK.
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|source| TpmError::TctiConfig {
            tcti: tcti.to_owned(),
            source,
        })?;
        let unreachable = |source| TpmError::Unreachable {
            tcti: tcti.to_owned(),
            source,
        };
        #[cfg(feature = "swtpm")]
        let (context, counted) =
            swtpm::TssContext::counted(|| Context::new(conf)).map_err(unreachable)?;
        #[cfg(not(feature = "swtpm"))]
        let context = Context::new(conf).map_err(unreachable)?;
        let mut tpm = Tpm {
            #[cfg(feature = "swtpm")]
            _counted: counted,
            context,
            tcti: tcti.to_owned(),
            ak: None,
            ak_public: Vec::new(),
            ak_public_area: Vec::new(),
            ek: None,
        };
        tpm.flush_transient_objects()?;
        tpm.create_ak()?;
        Ok(tpm)
    }

    /// The AK's public key: an uncompressed SEC1 P-256 point (`0x04 || X || Y`,
    /// 65 bytes). The same for every `open` of the same TPM; this is what a
    /// keyserver pins.
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// The AK's public area: the marshalled `TPMT_PUBLIC` the TPM returned.
    pub fn ak_public_area(&self) -> &[u8] {
        &self.ak_public_area
    }

    /// Reads the RSA 2048 EK certificate from its NV index, creates the EK
    /// from the default template (kept loaded until drop) and returns both
    /// with the AK's public area: what the loader sends a keyserver that
    /// trusts AKs through their EK. Nothing here is verified: the keyserver
    /// does that.
    pub fn endorsement(&mut self) -> Result<Endorsement, TpmError> {
        let ek_certificate = self.read_ek_certificate()?;
        const CMD: &str = "CreatePrimary (endorsement key)";
        let ek_public = match self.ek {
            Some(ek) => {
                let (public, _, _) = self
                    .context
                    .execute_without_session(|ctx| ctx.read_public(ek))
                    .map_err(|e| self.err("ReadPublic (endorsement key)", e))?;
                public
            }
            None => {
                let template = ek::create_ek_public_from_default_template_2(
                    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                    None,
                )
                .map_err(|e| self.err(CMD, e))?;
                let created = self.authorized(CMD, |ctx| {
                    ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
                })?;
                self.ek = Some(created.key_handle);
                created.out_public
            }
        };
        Ok(Endorsement {
            ek_certificate,
            ek_public: ek_public.marshall().map_err(|e| self.err(CMD, e))?,
            ak_public_area: self.ak_public_area.clone(),
        })
    }

    /// `TPM2_ActivateCredential` with the AK as the activated object and the
    /// EK (created by [`Tpm::endorsement`]) as the key that decrypts the
    /// seed: returns the credential (the keyserver's secret), which the TPM
    /// only releases if the credential was made for this EK and the AK's
    /// name. `id_object` and `encrypted_secret` are the contents of the
    /// `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET` (no size prefix).
    pub fn activate_credential(
        &mut self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, TpmError> {
        const CMD: &str = "ActivateCredential";
        let ak = self
            .ak
            .ok_or_else(|| self.unexpected(CMD, "no AK loaded"))?;
        let ek = self
            .ek
            .ok_or_else(|| self.unexpected(CMD, "no EK loaded (call endorsement first)"))?;
        let id_object = IdObject::try_from(id_object.to_vec()).map_err(|e| self.err(CMD, e))?;
        let secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(|e| self.err(CMD, e))?;
        // The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT): a policy
        // session satisfied with the endorsement hierarchy's (empty) auth.
        let session = self
            .context
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::Null,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| self.err("StartAuthSession (EK policy)", e))?
            .ok_or_else(|| self.unexpected("StartAuthSession (EK policy)", "no session"))?;
        let result = self.activate_in_session(session, ak, ek, id_object, secret);
        // Without continueSession the TPM ends the session after a command
        // that succeeds; after a failure it is still loaded. Flush it in both
        // cases, ignoring the error of a session already gone.
        let handle: ObjectHandle = tss_esapi::handles::SessionHandle::from(session).into();
        let _ = self.context.flush_context(handle);
        result
    }

    fn activate_in_session(
        &mut self,
        session: AuthSession,
        ak: KeyHandle,
        ek: KeyHandle,
        id_object: IdObject,
        secret: EncryptedSecret,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, TpmError> {
        let policy = PolicySession::try_from(session)
            .map_err(|e| self.err("PolicySecret (EK policy)", e))?;
        self.authorized("PolicySecret (EK policy)", |ctx| {
            ctx.policy_secret(
                policy,
                tss_esapi::handles::AuthHandle::Endorsement,
                Nonce::default(),
                Digest::default(),
                Nonce::default(),
                None,
            )
        })?;
        let credential = self
            .context
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                ctx.activate_credential(ak, ek, id_object, secret)
            })
            .map_err(|source| TpmError::CredentialRefused {
                tcti: self.tcti.clone(),
                source,
            })?;
        Ok(zeroize::Zeroizing::new(credential.value().to_vec()))
    }

    fn read_ek_certificate(&mut self) -> Result<Vec<u8>, TpmError> {
        let nv_index = RSA_2048_EK_CERTIFICATE_NV_INDEX;
        let missing = |tcti: &str, source| TpmError::NoEkCertificate {
            nv_index,
            tcti: tcti.to_owned(),
            source,
        };
        let index = NvIndexTpmHandle::new(nv_index).map_err(|e| missing(&self.tcti, e))?;
        let auth = self
            .context
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(index)))
            .map_err(|e| missing(&self.tcti, e))?;
        let tcti = self.tcti.clone();
        self.context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                nv::read_full(ctx, NvAuth::NvIndex(auth.into()), index)
            })
            .map_err(|e| missing(&tcti, e))
    }

    /// The TCTI configuration this TPM was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Resets `pcr` and extends its SHA-256 bank with each event's digest, in
    /// order; then checks the PCR equals `replay(events, pcr)`.
    ///
    /// PCRs 16 and 23 are reset; any other PCR is refused unless it already
    /// reads zeros. Every event must name `pcr`.
    pub fn measure(&mut self, pcr: u8, events: &[Event]) -> Result<(), TpmError> {
        let handle = pcr_handle(pcr)?;
        if let Some((index, e)) = events.iter().enumerate().find(|(_, e)| e.pcr != pcr) {
            return Err(TpmError::EventForOtherPcr {
                pcr,
                index,
                name: e.name.clone(),
                event_pcr: e.pcr,
            });
        }
        if RESETTABLE_PCRS.contains(&pcr) {
            self.authorized("PCR_Reset", |ctx| ctx.pcr_reset(handle))?;
        } else if self.read_pcrs(&[pcr])?.get(&pcr) != Some(&[0; 32]) {
            return Err(TpmError::PcrNotResettable {
                pcr,
                tcti: self.tcti.clone(),
            });
        }
        for event in events {
            let mut values = DigestValues::new();
            values.set(HashingAlgorithm::Sha256, self.digest(&event.digest)?);
            self.authorized("PCR_Extend", |ctx| ctx.pcr_extend(handle, values))?;
        }
        let expected = replay(events, pcr);
        let actual = self
            .read_pcrs(&[pcr])?
            .get(&pcr)
            .copied()
            .unwrap_or_default();
        if actual != expected {
            return Err(TpmError::MeasurementMismatch {
                pcr,
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }

    /// Extends `pcr` (SHA-256 bank) with `digest` once, as firmware does for
    /// the boot PCRs (the test harness plays that part: [`swtpm`]).
    pub fn extend_sha256(&mut self, pcr: u8, digest: &Digest32) -> Result<(), TpmError> {
        let handle = pcr_handle(pcr)?;
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, self.digest(digest)?);
        self.authorized("PCR_Extend", |ctx| ctx.pcr_extend(handle, values))
    }

    /// Quotes the SHA-256 bank of `pcrs` with the AK, bound to
    /// `binding(nonce, hpke_public_key)`, and returns the evidence (with the PCR
    /// values read and `event_log` as given).
    ///
    /// The PCR values are read after the quote and their digest checked against
    /// the quote's `pcrDigest`; if they differ (a concurrent extend) the quote is
    /// retried once.
    pub fn quote(
        &mut self,
        pcrs: &[u8],
        nonce: &[u8],
        hpke_public_key: &[u8],
        event_log: &[Event],
    ) -> Result<Evidence, TpmError> {
        let set: BTreeSet<u8> = pcrs.iter().copied().collect();
        if set.is_empty() {
            return Err(TpmError::NoPcrSelected);
        }
        let selection = selection(&set)?;
        let qualifying = binding(nonce, hpke_public_key);
        let ak = self
            .ak
            .ok_or_else(|| self.unexpected("Quote", "no AK loaded"))?;
        for _attempt in 0..2 {
            let data = Data::try_from(qualifying.to_vec()).map_err(|e| self.err("Quote", e))?;
            let scheme = SignatureScheme::EcDsa {
                hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
            };
            let sel = selection.clone();
            let (attest, signature) =
                self.authorized("Quote", |ctx| ctx.quote(ak, data, scheme, sel))?;
            let values = self.read_set(&set)?;

            if attest.attestation_type() != AttestationType::Quote {
                return Err(self.unexpected("Quote", "attestation type is not a quote"));
            }
            if attest.extra_data().value() != qualifying {
                return Err(self.unexpected("Quote", "extraData is not the binding asked for"));
            }
            let AttestInfo::Quote { info } = attest.attested() else {
                return Err(self.unexpected("Quote", "attested info is not a quote"));
            };
            if info.pcr_selection() != &selection {
                return Err(self.unexpected("Quote", "quoted PCR selection differs"));
            }
            if info.pcr_digest().value() != pcr_digest(&values) {
                continue;
            }
            // tss-esapi parses TPM2B_ATTEST into `Attest`; marshalling it back
            // gives the TPM's bytes (canonical encoding; checked against
            // tpm2_checkquote in the tests).
            let attest = attest.marshall().map_err(|e| self.err("Quote", e))?;
            let signature = signature.marshall().map_err(|e| self.err("Quote", e))?;
            return Ok(Evidence {
                version: EVIDENCE_VERSION,
                nonce: nonce.to_vec(),
                hpke_public_key: hpke_public_key.to_vec(),
                ak_public: self.ak_public.clone(),
                attest,
                signature,
                pcrs: values,
                event_log: event_log.to_vec(),
                endorsement: None,
                tdx: None,
            });
        }
        Err(TpmError::PcrsChanged {
            pcrs: set.into_iter().collect(),
            tcti: self.tcti.clone(),
        })
    }

    /// Reads the SHA-256 bank of `pcrs`.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<BTreeMap<u8, Digest32>, TpmError> {
        self.read_set(&pcrs.iter().copied().collect())
    }

    fn read_set(&mut self, pcrs: &BTreeSet<u8>) -> Result<BTreeMap<u8, Digest32>, TpmError> {
        let indices: Vec<u8> = pcrs.iter().copied().collect();
        let mut out = BTreeMap::new();
        // A TPML_DIGEST holds at most 8 digests: read 8 PCRs at a time.
        for chunk in indices.chunks(8) {
            let chunk_set: BTreeSet<u8> = chunk.iter().copied().collect();
            let sel = selection(&chunk_set)?;
            let (_, read, digests) = self
                .context
                .execute_without_session(|ctx| ctx.pcr_read(sel.clone()))
                .map_err(|e| self.err("PCR_Read", e))?;
            if read != sel || digests.len() != chunk.len() {
                return Err(self.unexpected("PCR_Read", "not all requested PCRs were read"));
            }
            for (&i, d) in chunk.iter().zip(digests.value()) {
                let v: Digest32 = d
                    .value()
                    .try_into()
                    .map_err(|_| self.unexpected("PCR_Read", "a SHA-256 PCR is not 32 bytes"))?;
                out.insert(i, v);
            }
        }
        Ok(out)
    }

    /// Flushes every transient object loaded in the TPM.
    fn flush_transient_objects(&mut self) -> Result<(), TpmError> {
        let mut handles = Vec::new();
        let mut next = TPM2_TRANSIENT_FIRST;
        loop {
            let (data, more) = self
                .context
                .execute_without_session(|ctx| {
                    ctx.get_capability(CapabilityType::Handles, next, 64)
                })
                .map_err(|e| self.err("GetCapability", e))?;
            let CapabilityData::Handles(list) = data else {
                return Err(self.unexpected("GetCapability", "no handle list"));
            };
            let list = list.into_inner();
            let Some(&last) = list.last() else { break };
            handles.extend(
                list.into_iter()
                    .filter(|h| matches!(h, TpmHandle::Transient(_))),
            );
            if !more {
                break;
            }
            next = u32::from(last).saturating_add(1);
        }
        for handle in handles {
            let object = self
                .context
                .execute_without_session(|ctx| ctx.tr_from_tpm_public(handle))
                .map_err(|e| self.err("ReadPublic (leftover object)", e))?;
            self.context
                .flush_context(object)
                .map_err(|e| self.err("FlushContext (leftover object)", e))?;
        }
        Ok(())
    }

    /// Creates the AK (see the crate docs) and records its public point.
    fn create_ak(&mut self) -> Result<(), TpmError> {
        const CMD: &str = "CreatePrimary (attestation key)";
        let template = ak_template().map_err(|e| self.err(CMD, e))?;
        let created = self.authorized(CMD, |ctx| {
            ctx.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
        })?;
        // Own the handle first so that Drop flushes it whatever happens next.
        self.ak = Some(created.key_handle);
        self.ak_public_area = created
            .out_public
            .marshall()
            .map_err(|e| self.err(CMD, e))?;
        let Public::Ecc { unique, .. } = &created.out_public else {
            return Err(self.unexpected(CMD, "the key is not an ECC key"));
        };
        let (x, y) = (unique.x().value(), unique.y().value());
        if x.len() > 32 || y.len() > 32 {
            return Err(self.unexpected(CMD, "coordinate longer than 32 bytes"));
        }
        let mut point = vec![0u8; 65];
        point[0] = 0x04;
        point[33 - x.len()..33].copy_from_slice(x);
        point[65 - y.len()..].copy_from_slice(y);
        self.ak_public = point;
        Ok(())
    }

    /// Runs `f` with the password session (empty auth) as the one
    /// authorization.
    fn authorized<T>(
        &mut self,
        command: &'static str,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> Result<T, TpmError> {
        self.context
            .execute_with_session(Some(AuthSession::Password), f)
            .map_err(|e| self.err(command, e))
    }

    fn digest(&self, d: &Digest32) -> Result<Digest, TpmError> {
        Digest::try_from(d.to_vec()).map_err(|e| self.err("PCR_Extend", e))
    }

    fn err(&self, command: &'static str, source: tss_esapi::Error) -> TpmError {
        TpmError::Command {
            tcti: self.tcti.clone(),
            command,
            source,
        }
    }

    fn unexpected(&self, command: &'static str, what: &str) -> TpmError {
        TpmError::UnexpectedResponse {
            tcti: self.tcti.clone(),
            command,
            what: what.to_owned(),
        }
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // Best effort: an error here (TPM gone) leaves nothing we can fix;
        // the next `open` flushes leftovers anyway.
        for key in [self.ak.take(), self.ek.take()].into_iter().flatten() {
            let _ = self.context.flush_context(key.into());
        }
    }
}

/// The AK template: restricted ECDSA-P256-SHA256 signing key, empty unique.
fn ak_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()?;
    let parameters = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

fn pcr_handle(pcr: u8) -> Result<PcrHandle, TpmError> {
    PCR_HANDLES
        .get(usize::from(pcr))
        .copied()
        .ok_or(TpmError::PcrOutOfRange { pcr })
}

/// A SHA-256-bank selection of `pcrs`.
fn selection(pcrs: &BTreeSet<u8>) -> Result<PcrSelectionList, TpmError> {
    let mut slots = Vec::with_capacity(pcrs.len());
    for &pcr in pcrs {
        if pcr > MAX_PCR {
            return Err(TpmError::PcrOutOfRange { pcr });
        }
        // In range, so the one-bit mask is a valid slot.
        let slot = PcrSlot::try_from(1u32 << pcr).map_err(|_| TpmError::PcrOutOfRange { pcr })?;
        slots.push(slot);
    }
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|_| TpmError::NoPcrSelected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_builds() {
        ak_template().unwrap();
    }

    #[test]
    fn pcr_handles_are_in_order() {
        assert_eq!(pcr_handle(23).unwrap(), PcrHandle::Pcr23);
        assert_eq!(pcr_handle(16).unwrap(), PcrHandle::Pcr16);
        assert!(matches!(
            pcr_handle(24),
            Err(TpmError::PcrOutOfRange { pcr: 24 })
        ));
    }

    #[test]
    fn selection_rejects_out_of_range() {
        assert!(selection(&BTreeSet::from([0, 23])).is_ok());
        assert!(matches!(
            selection(&BTreeSet::from([24])),
            Err(TpmError::PcrOutOfRange { pcr: 24 })
        ));
    }
}
