//! A **test** TDX platform: real, signed TD quotes (version 4, TDX 1.0 TD
//! report body, ECDSA P-256 attestation key) and the collateral that verifies
//! them, all under a root CA made at run time — never Intel's keys.
//!
//! **Test only; never a production platform.** [`TestTdxPlatform::generate`]
//! makes every key fresh from the OS RNG (root CA, PCK CA, PCK key, TCB signing
//! key, the quoting enclave's attestation key) and keeps the private halves in
//! memory. Nothing here runs in a TEE: whoever holds a `TestTdxPlatform` can
//! quote any TD contents. A verifier accepts these quotes only when configured
//! with [`TestTdxPlatform::root_ca_der`] as its root, which no production
//! configuration is (production trusts Intel's SGX root CA). Feature
//! `tdx-test`.
//!
//! What is made, following Intel's DCAP PKI as `dcap-qvl` verifies it:
//! - root CA → PCK CA → PCK certificate carrying the Intel SGX extension
//!   (OID 1.2.840.113741.1.13.1: PPID, TCB (CPUSVN components, PCESVN, CPUSVN),
//!   PCE-ID, FMSPC, SGX type) for this platform's [`CPU_SVN`], [`PCE_SVN`] and
//!   [`FMSPC`];
//! - root CA → TCB signing certificate, which signs the TCB info and the QE
//!   identity; a CRL from the root CA and one from the PCK CA (none revoked
//!   until [`TestTdxPlatform::revoke_pck_certificate`]);
//! - TDX TCB info (version 3) whose TCB levels give the platform the
//!   [`TestTcb`] it was made with, with a TDX module identity `TDX_01`; a `TD_QE`
//!   QE identity (version 2);
//! - per quote ([`TestTdxPlatform::quote`]): the header, the TD report from
//!   [`TdFields`], the attestation key's signature over both, and the QE report
//!   certification data (type 6): a QE report whose report data is
//!   `SHA-256(attestation key || QE auth data)`, signed by the PCK key, and the
//!   PCK chain (type 5, PEM: PCK, PCK CA, root).
//!
//! Collateral is issued [`COLLATERAL_BACKDATE_SECS`] before the `now_secs`
//! given to [`TestTdxPlatform::generate`] and is next updated
//! [`COLLATERAL_LIFETIME_SECS`] after it; certificates are valid for longer, so
//! that time checks fail on the collateral dates first.

use crate::tdx::TdxCollateral;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, RevocationReason, RevokedCertParams, SerialNumber,
    SignatureAlgorithm,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroize;

/// TD attribute bit 0, DEBUG: the host can read and write the TD's memory and
/// state.
pub const TD_ATTRIBUTES_DEBUG: u64 = 1;
/// TD attribute bit 28, SEPT_VE_DISABLE: `dcap-qvl` requires it set.
pub const TD_ATTRIBUTES_SEPT_VE_DISABLE: u64 = 1 << 28;
/// TD attribute bit 29, MIGRATABLE: `dcap-qvl` refuses a migratable TD.
pub const TD_ATTRIBUTES_MIGRATABLE: u64 = 1 << 29;

/// The platform's FMSPC (family-model-stepping-platform-custom SKU), in the
/// PCK certificate and the TCB info. A made-up value.
pub const FMSPC: [u8; 6] = [0x0C, 0x1F, 0xE5, 0x70, 0x00, 0x00];
/// The platform's PCE-ID.
pub const PCE_ID: [u8; 2] = [0, 0];
/// The platform's CPUSVN: its 16 SGX TCB components, in the PCK certificate.
pub const CPU_SVN: [u8; 16] = [3, 3, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
/// The platform's PCE SVN, in the PCK certificate.
pub const PCE_SVN: u16 = 13;
/// The TD report's default TEE_TCB_SVN: TDX module ISVSVN 5 (byte 0), module
/// version 1 (byte 1: the TCB info's module identity `TDX_01` rates byte 0),
/// TDX late microcode SVN 2 (byte 2).
pub const TEE_TCB_SVN: [u8; 16] = [5, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// The lowest TDX module ISVSVN (`TEE_TCB_SVN[0]`) the TCB info rates
/// `UpToDate`; from [`MODULE_OUT_OF_DATE_ISVSVN`] up to this it is
/// `OutOfDate`, below that it has no TCB level.
pub const MODULE_UP_TO_DATE_ISVSVN: u8 = 5;
/// The lowest TDX module ISVSVN the TCB info knows (rated `OutOfDate`).
pub const MODULE_OUT_OF_DATE_ISVSVN: u8 = 3;
/// The TD quoting enclave's MRSIGNER (in its QE report and the QE identity).
/// A made-up value, not Intel's.
pub const QE_MRSIGNER: [u8; 32] = [
    0xC1, 0xF0, 0x7E, 0x57, 0x00, 0x0E, 0x5E, 0x00, 0xC1, 0xF0, 0x7E, 0x57, 0x00, 0x0E, 0x5E, 0x00,
    0xC1, 0xF0, 0x7E, 0x57, 0x00, 0x0E, 0x5E, 0x00, 0xC1, 0xF0, 0x7E, 0x57, 0x00, 0x0E, 0x5E, 0x01,
];
/// The TD quoting enclave's ISVPRODID (2, as Intel's TD QE).
pub const QE_ISV_PROD_ID: u16 = 2;
/// The TD quoting enclave's ISVSVN, rated `UpToDate` by the QE identity.
pub const QE_ISV_SVN: u16 = 4;
/// How long before `now_secs` the collateral (CRLs, TCB info, QE identity)
/// is issued: one day.
pub const COLLATERAL_BACKDATE_SECS: u64 = 86_400;
/// How long after `now_secs` the collateral's next update is: 30 days.
pub const COLLATERAL_LIFETIME_SECS: u64 = 30 * 86_400;
/// Certificates are valid from a week before `now_secs` to a year after it.
const CERT_BACKDATE_SECS: u64 = 7 * 86_400;
const CERT_LIFETIME_SECS: u64 = 365 * 86_400;

/// Advisories of the `SWHardeningNeeded` TCB level (IDs in Intel's format).
pub const SW_HARDENING_ADVISORIES: &[&str] = &["INTEL-SA-00615"];
/// Advisories of the `OutOfDate` TCB level the platform meets.
pub const OUT_OF_DATE_ADVISORIES: &[&str] = &["INTEL-SA-00837", "INTEL-SA-01036"];
/// Advisories of the `OutOfDate` TDX module level.
pub const MODULE_OUT_OF_DATE_ADVISORIES: &[&str] = &["INTEL-SA-00960"];

/// An SGX CPUSVN one step above the platform's: a newer microcode.
const NEWER_CPU_SVN: [u8; 16] = [3, 4, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
/// An older CPUSVN (and PCESVN): the lowest level of every TCB info.
const OLDER_CPU_SVN: [u8; 16] = [3, 1, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
const OLDER_PCE_SVN: u16 = 11;
/// The TCB evaluation data number of the TCB info and QE identity.
const TCB_EVALUATION_DATA_NUMBER: u32 = 17;
/// The TD QE's MRENCLAVE (not checked by verifiers; made up).
const QE_MRENCLAVE: [u8; 32] = [0x7E; 32];
/// QE report ATTRIBUTES: INIT and MODE64BIT, DEBUG off.
const QE_ATTRIBUTES: [u8; 16] = [0x11, 0, 0, 0, 0, 0, 0, 0, 0xE7, 0, 0, 0, 0, 0, 0, 0];
/// The QE authentication data: 32 bytes, as Intel's QE makes it.
const QE_AUTH_DATA: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];

const QUOTE_VERSION: u16 = 4;
const ATTESTATION_KEY_TYPE_ECDSA_P256: u16 = 2;
const TEE_TYPE_TDX: u32 = 0x81;
const CERT_TYPE_PCK_CERT_CHAIN: u16 = 5;
const CERT_TYPE_QE_REPORT: u16 = 6;
/// Quote header length.
pub const HEADER_LEN: usize = 48;
/// TDX 1.0 TD report body length.
pub const TD_REPORT_BODY_LEN: usize = 584;
/// SGX enclave (QE) report length.
const QE_REPORT_LEN: usize = 384;

/// The Intel SGX extension's OID (1.2.840.113741.1.13.1) and the arcs below it.
const SGX_EXTENSION_OID: [u64; 7] = [1, 2, 840, 113_741, 1, 13, 1];

/// Why a test platform could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestPlatformError {
    /// The OS RNG failed.
    #[error("no randomness for a test key: {0}")]
    Random(String),
    /// `now_secs` is too close to either end of the representable range for
    /// the collateral's dates.
    #[error("Unix time {0} cannot date test collateral")]
    Time(u64),
    /// A certificate or CRL could not be made.
    #[error("making the test {what}: {source}")]
    Pki {
        /// Which certificate or CRL.
        what: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// Something could not be encoded (a length out of range, JSON).
    #[error("encoding the test {0}")]
    Encoding(String),
}

/// The TCB status `dcap-qvl` gives quotes of a test platform (with the default
/// [`TdFields::tee_tcb_svn`]): which TCB level of the TCB info the platform's
/// CPUSVN, PCESVN and TEE_TCB_SVN meet first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestTcb {
    /// The platform meets the newest level, rated `UpToDate`.
    UpToDate,
    /// The platform meets the newest level, rated `SWHardeningNeeded` with
    /// [`SW_HARDENING_ADVISORIES`].
    SwHardeningNeeded,
    /// A newer level (a newer CPUSVN) exists; the platform meets the next one,
    /// rated `OutOfDate` with [`OUT_OF_DATE_ADVISORIES`].
    OutOfDate,
}

impl TestTcb {
    /// The status as `dcap-qvl` (and Intel's collateral) spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpToDate => "UpToDate",
            Self::SwHardeningNeeded => "SWHardeningNeeded",
            Self::OutOfDate => "OutOfDate",
        }
    }

    /// The advisory IDs of the TCB level the platform meets.
    pub fn advisory_ids(self) -> &'static [&'static str] {
        match self {
            Self::UpToDate => &[],
            Self::SwHardeningNeeded => SW_HARDENING_ADVISORIES,
            Self::OutOfDate => OUT_OF_DATE_ADVISORIES,
        }
    }
}

/// The contents of a TDX 1.0 TD report (`TDREPORT` body of a v4 quote), as
/// the TDX module would report them for a TD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdFields {
    /// REPORTDATA: 64 bytes the TD chose (e.g. [`crate::tdx_report_data`]).
    pub report_data: [u8; 64],
    /// MRTD: the TD's initial contents (firmware).
    pub mr_td: [u8; 48],
    /// RTMR0..3: run-time measurement registers.
    pub rtmrs: [[u8; 48]; 4],
    /// MRCONFIGID: a configuration ID the host set at TD creation.
    pub mr_config_id: [u8; 48],
    /// MROWNER: the TD owner's ID, set at TD creation.
    pub mr_owner: [u8; 48],
    /// MROWNERCONFIG: the owner's configuration, set at TD creation.
    pub mr_owner_config: [u8; 48],
    /// TD attributes (little-endian bit field; [`TD_ATTRIBUTES_DEBUG`]...).
    pub td_attributes: [u8; 8],
    /// XFAM: the extended features the TD may use (XCR0/IA32_XSS bits).
    pub xfam: [u8; 8],
    /// TEE_TCB_SVN: the TDX module's SVNs ([`TEE_TCB_SVN`] by default, which
    /// the TCB info rates as the platform's [`TestTcb`]).
    pub tee_tcb_svn: [u8; 16],
    /// MRSEAM: the TDX module's measurement (not checked by verifiers).
    pub mr_seam: [u8; 48],
    /// MRSIGNERSEAM: the TDX module's signer; the TCB info's module identity
    /// requires zeros (Intel's module).
    pub mr_signer_seam: [u8; 48],
    /// SEAMATTRIBUTES: the TDX module's attributes; the TCB info requires
    /// zeros.
    pub seam_attributes: [u8; 8],
}

impl Default for TdFields {
    /// A production-like TD: DEBUG off, SEPT_VE_DISABLE set (no other TD
    /// attribute), XFAM of a typical TD (x87, SSE, AVX, AVX-512, PKRU...), the
    /// platform's TEE_TCB_SVN and an Intel-signed module (MRSIGNERSEAM and
    /// SEAMATTRIBUTES zero); measurement registers and report data all zero.
    fn default() -> Self {
        TdFields {
            report_data: [0; 64],
            mr_td: [0; 48],
            rtmrs: [[0; 48]; 4],
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
            mr_owner_config: [0; 48],
            td_attributes: TD_ATTRIBUTES_SEPT_VE_DISABLE.to_le_bytes(),
            xfam: [0xE7, 0x02, 0x06, 0, 0, 0, 0, 0],
            tee_tcb_svn: TEE_TCB_SVN,
            mr_seam: [0x5E; 48],
            mr_signer_seam: [0; 48],
            seam_attributes: [0; 8],
        }
    }
}

impl TdFields {
    /// The 584-byte TDX 1.0 TD report body as a v4 quote carries it (after the
    /// 48-byte header).
    pub fn td_report_body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(TD_REPORT_BODY_LEN);
        body.extend_from_slice(&self.tee_tcb_svn);
        body.extend_from_slice(&self.mr_seam);
        body.extend_from_slice(&self.mr_signer_seam);
        body.extend_from_slice(&self.seam_attributes);
        body.extend_from_slice(&self.td_attributes);
        body.extend_from_slice(&self.xfam);
        body.extend_from_slice(&self.mr_td);
        body.extend_from_slice(&self.mr_config_id);
        body.extend_from_slice(&self.mr_owner);
        body.extend_from_slice(&self.mr_owner_config);
        for rtmr in &self.rtmrs {
            body.extend_from_slice(rtmr);
        }
        body.extend_from_slice(&self.report_data);
        body
    }
}

/// A test TDX platform: it quotes any [`TdFields`] with its own attestation key
/// and serves the collateral that verifies those quotes under its own root CA.
/// See the module documentation; **test only**.
///
/// It keeps, in memory, the private keys it still needs: the attestation key
/// (to sign quotes) and the PCK CA's (to reissue its CRL). The root CA's, the
/// PCK's and the TCB signing key are dropped once the certificates, CRLs, QE
/// report and collateral signatures are made. `Debug` shows no key.
pub struct TestTdxPlatform {
    tcb: TestTcb,
    root_der: Vec<u8>,
    /// The PCK CA (kept to reissue its CRL).
    pck_ca: Issuer<'static, KeyPair>,
    pck_serial: SerialNumber,
    attestation_key: SigningKey,
    /// Header user data: the QE ID (16 random bytes) then 4 zero bytes.
    user_data: [u8; 20],
    /// Everything of the quote's auth data after the signature: the
    /// attestation key, then the type-6 certification data.
    auth_data_tail: Vec<u8>,
    /// The auth data's length (signature + tail), as the quote writes it.
    auth_data_len: u32,
    issued_at: u64,
    next_update: u64,
    collateral: TdxCollateral,
    collateral_json: Vec<u8>,
}

impl std::fmt::Debug for TestTdxPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestTdxPlatform")
            .field("tcb", &self.tcb)
            .field("fmspc", &hex::encode(FMSPC))
            .field("collateral_issued_at", &self.issued_at)
            .field("collateral_next_update", &self.next_update)
            .finish_non_exhaustive()
    }
}

// A provider thread holds the platform; keep that possible.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<TestTdxPlatform>();
};

impl TestTdxPlatform {
    /// Makes a platform with fresh keys whose quotes verify with status `tcb`
    /// and whose collateral is valid around `now_secs` (Unix time): issued
    /// [`COLLATERAL_BACKDATE_SECS`] before, next update
    /// [`COLLATERAL_LIFETIME_SECS`] after.
    pub fn generate(tcb: TestTcb, now_secs: u64) -> Result<Self, TestPlatformError> {
        let issued_at = now_secs
            .checked_sub(COLLATERAL_BACKDATE_SECS)
            .ok_or(TestPlatformError::Time(now_secs))?;
        let next_update = now_secs
            .checked_add(COLLATERAL_LIFETIME_SECS)
            .ok_or(TestPlatformError::Time(now_secs))?;
        let validity = (
            datetime(
                now_secs
                    .checked_sub(CERT_BACKDATE_SECS)
                    .ok_or(TestPlatformError::Time(now_secs))?,
            )?,
            datetime(
                now_secs
                    .checked_add(CERT_LIFETIME_SECS)
                    .ok_or(TestPlatformError::Time(now_secs))?,
            )?,
        );

        // Root CA (self-signed) and PCK CA: they sign certificates and CRLs.
        let root_key = ca_key("root CA key")?;
        let root_params = ca_params("cinfer TEST SGX Root CA", validity, 1)?;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(pki("root CA certificate"))?;
        let root = Issuer::new(root_params, root_key);
        let pck_ca_key = ca_key("PCK CA key")?;
        let pck_ca_params = ca_params("cinfer TEST SGX PCK Processor CA", validity, 0)?;
        let pck_ca_cert = pck_ca_params
            .signed_by(&pck_ca_key, &root)
            .map_err(pki("PCK CA certificate"))?;
        let pck_ca = Issuer::new(pck_ca_params, pck_ca_key);

        // The PCK certificate: the platform's identity and TCB.
        let pck_key = p256_key()?;
        let mut ppid = [0u8; 16];
        fill_random(&mut ppid)?;
        let mut pck_params = leaf_params("cinfer TEST SGX PCK Certificate", validity)?;
        let pck_serial = pck_params
            .serial_number
            .clone()
            .ok_or_else(|| TestPlatformError::Encoding("PCK serial number".into()))?;
        pck_params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                &SGX_EXTENSION_OID,
                sgx_extension(&ppid),
            ));
        let pck_cert = pck_params
            .signed_by(&P256Public::of(&pck_key)?, &pck_ca)
            .map_err(pki("PCK certificate"))?;

        // The TCB signing certificate, directly under the root.
        let tcb_key = p256_key()?;
        let tcb_cert = leaf_params("cinfer TEST SGX TCB Signing", validity)?
            .signed_by(&P256Public::of(&tcb_key)?, &root)
            .map_err(pki("TCB signing certificate"))?;

        // The quoting enclave: its attestation key, bound into a QE report
        // the PCK key signs.
        let attestation_key = p256_key()?;
        let attestation_public = raw_public_key(&attestation_key)?;
        let qe_report = qe_report(&attestation_public);
        let qe_report_signature: Signature = pck_key.sign(&qe_report);
        let pck_chain = format!("{}{}{}", pck_cert.pem(), pck_ca_cert.pem(), root_cert.pem());
        let qe_certification =
            qe_certification_data(&qe_report, &qe_report_signature, pck_chain.as_bytes())?;
        let mut auth_data_tail = attestation_public.to_vec();
        auth_data_tail.extend_from_slice(&CERT_TYPE_QE_REPORT.to_le_bytes());
        auth_data_tail.extend_from_slice(&len_u32(qe_certification.len(), "QE certification")?);
        auth_data_tail.extend_from_slice(&qe_certification);
        let auth_data_len = u32::try_from(auth_data_tail.len().saturating_add(64))
            .map_err(|_| TestPlatformError::Encoding("auth data length".into()))?;
        let mut user_data = [0u8; 20];
        fill_random(&mut user_data[..16])?;

        // Collateral.
        let tcb_info = tcb_info_json(tcb, issued_at, next_update)?;
        let tcb_info_signature: Signature = tcb_key.sign(tcb_info.as_bytes());
        let qe_identity = qe_identity_json(issued_at, next_update)?;
        let qe_identity_signature: Signature = tcb_key.sign(qe_identity.as_bytes());
        let signer_chain = format!("{}{}", tcb_cert.pem(), root_cert.pem());
        let collateral = TdxCollateral {
            pck_crl_issuer_chain: format!("{}{}", pck_ca_cert.pem(), root_cert.pem()),
            root_ca_crl: crl(&root, issued_at, next_update, 1, &[], "root CA CRL")?,
            pck_crl: crl(&pck_ca, issued_at, next_update, 1, &[], "PCK CRL")?,
            tcb_info_issuer_chain: signer_chain.clone(),
            tcb_info,
            tcb_info_signature: tcb_info_signature.to_bytes().to_vec(),
            qe_identity_issuer_chain: signer_chain,
            qe_identity,
            qe_identity_signature: qe_identity_signature.to_bytes().to_vec(),
            // Absent, so that verifiers check the chain the quote carries
            // (dcap-qvl prefers this one when present).
            pck_certificate_chain: None,
        };
        let collateral_json = to_json(&collateral)?;
        Ok(TestTdxPlatform {
            tcb,
            root_der: root_cert.der().to_vec(),
            pck_ca,
            pck_serial,
            attestation_key,
            user_data,
            auth_data_tail,
            auth_data_len,
            issued_at,
            next_update,
            collateral,
            collateral_json,
        })
    }

    /// The TCB status this platform's quotes verify with (default
    /// [`TdFields::tee_tcb_svn`]).
    pub fn tcb(&self) -> TestTcb {
        self.tcb
    }

    /// The test root CA certificate (DER): the trust anchor a verifier needs
    /// for this platform's quotes and collateral.
    pub fn root_ca_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The collateral (CRLs, TCB info, QE identity and their signing chains)
    /// for this platform's quotes.
    pub fn collateral(&self) -> &TdxCollateral {
        &self.collateral
    }

    /// [`Self::collateral`] as JSON, the form
    /// [`crate::tdx::parse_collateral`] reads (Intel PCS collateral as
    /// `dcap-qvl` assembles it).
    pub fn collateral_json(&self) -> Vec<u8> {
        self.collateral_json.clone()
    }

    /// When the collateral was issued (Unix time): CRLs' thisUpdate, TCB info
    /// and QE identity issueDate.
    pub fn collateral_issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The collateral's next update (Unix time): verification at or after it
    /// fails (the CRLs have expired).
    pub fn collateral_next_update(&self) -> u64 {
        self.next_update
    }

    /// Revokes the PCK certificate: reissues the PCK CA's CRL listing it, so
    /// that every quote of this platform is refused.
    pub fn revoke_pck_certificate(&mut self) -> Result<(), TestPlatformError> {
        self.collateral.pck_crl = crl(
            &self.pck_ca,
            self.issued_at,
            self.next_update,
            2,
            std::slice::from_ref(&self.pck_serial),
            "PCK CRL",
        )?;
        self.collateral_json = to_json(&self.collateral)?;
        Ok(())
    }

    /// A v4 TD quote of `fields`, signed by this platform's attestation key
    /// (ECDSA P-256 over header and TD report), with the QE report
    /// certification data (type 6) holding the PCK chain (type 5).
    pub fn quote(&self, fields: &TdFields) -> Vec<u8> {
        let mut quote = Vec::with_capacity(
            HEADER_LEN + TD_REPORT_BODY_LEN + 4 + 64 + self.auth_data_tail.len(),
        );
        quote.extend_from_slice(&QUOTE_VERSION.to_le_bytes());
        quote.extend_from_slice(&ATTESTATION_KEY_TYPE_ECDSA_P256.to_le_bytes());
        quote.extend_from_slice(&TEE_TYPE_TDX.to_le_bytes());
        // Reserved in a TDX v4 header (QE SVN and PCE SVN in SGX v3).
        quote.extend_from_slice(&[0; 4]);
        // Intel's QE vendor ID: verifiers require it.
        quote.extend_from_slice(&dcap_qvl::INTEL_QE_VENDOR_ID);
        quote.extend_from_slice(&self.user_data);
        quote.extend_from_slice(&fields.td_report_body());
        let signature: Signature = self.attestation_key.sign(&quote);
        quote.extend_from_slice(&self.auth_data_len.to_le_bytes());
        quote.extend_from_slice(&signature.to_bytes());
        quote.extend_from_slice(&self.auth_data_tail);
        quote
    }
}

/// The QE report (an SGX enclave report): the TD QE's identity, and in its
/// report data `SHA-256(attestation key || QE auth data)`, zero-padded.
fn qe_report(attestation_public: &[u8; 64]) -> Vec<u8> {
    let mut report = Vec::with_capacity(QE_REPORT_LEN);
    report.extend_from_slice(&CPU_SVN);
    report.extend_from_slice(&0u32.to_le_bytes()); // MISCSELECT
    report.extend_from_slice(&[0; 28]);
    report.extend_from_slice(&QE_ATTRIBUTES);
    report.extend_from_slice(&QE_MRENCLAVE);
    report.extend_from_slice(&[0; 32]);
    report.extend_from_slice(&QE_MRSIGNER);
    report.extend_from_slice(&[0; 96]);
    report.extend_from_slice(&QE_ISV_PROD_ID.to_le_bytes());
    report.extend_from_slice(&QE_ISV_SVN.to_le_bytes());
    report.extend_from_slice(&[0; 60]);
    let mut h = Sha256::new();
    h.update(attestation_public);
    h.update(QE_AUTH_DATA);
    report.extend_from_slice(&h.finalize());
    report.extend_from_slice(&[0; 32]);
    report
}

/// The body of certification data type 6: QE report, its signature, the QE
/// auth data, and the PCK chain as certification data type 5.
fn qe_certification_data(
    qe_report: &[u8],
    qe_report_signature: &Signature,
    pck_chain_pem: &[u8],
) -> Result<Vec<u8>, TestPlatformError> {
    let mut data = qe_report.to_vec();
    data.extend_from_slice(&qe_report_signature.to_bytes());
    data.extend_from_slice(&len_u16(QE_AUTH_DATA.len(), "QE auth data")?);
    data.extend_from_slice(&QE_AUTH_DATA);
    data.extend_from_slice(&CERT_TYPE_PCK_CERT_CHAIN.to_le_bytes());
    data.extend_from_slice(&len_u32(pck_chain_pem.len(), "PCK chain")?);
    data.extend_from_slice(pck_chain_pem);
    Ok(data)
}

/// The TDX TCB info (version 3) for [`FMSPC`], whose levels rate the platform
/// `tcb`. Verifiers take the first level, highest SVNs first, that the
/// platform's CPUSVN, PCESVN and TEE_TCB_SVN (bytes 2.., the module's bytes 0
/// and 1 being left to the module identity) all meet.
fn tcb_info_json(
    tcb: TestTcb,
    issued_at: u64,
    next_update: u64,
) -> Result<String, TestPlatformError> {
    let level_date = rfc3339(issued_at.saturating_sub(30 * 86_400))?;
    let old_date = rfc3339(issued_at.saturating_sub(400 * 86_400))?;
    let level = |cpu_svn: &[u8; 16], pce_svn: u16, status: &str, advisories: &[&str], date| {
        json!({
            "tcb": {
                "sgxtcbcomponents": components(cpu_svn),
                "pcesvn": pce_svn,
                "tdxtcbcomponents": components(&TEE_TCB_SVN),
            },
            "tcbDate": date,
            "tcbStatus": status,
            "advisoryIDs": advisories,
        })
    };
    let older = level(
        &OLDER_CPU_SVN,
        OLDER_PCE_SVN,
        "OutOfDate",
        OUT_OF_DATE_ADVISORIES,
        &old_date,
    );
    let levels = match tcb {
        TestTcb::UpToDate => vec![
            level(&CPU_SVN, PCE_SVN, "UpToDate", &[], &level_date),
            older,
        ],
        TestTcb::SwHardeningNeeded => vec![
            level(
                &CPU_SVN,
                PCE_SVN,
                "SWHardeningNeeded",
                SW_HARDENING_ADVISORIES,
                &level_date,
            ),
            older,
        ],
        TestTcb::OutOfDate => vec![
            level(&NEWER_CPU_SVN, PCE_SVN, "UpToDate", &[], &level_date),
            level(
                &CPU_SVN,
                PCE_SVN,
                "OutOfDate",
                OUT_OF_DATE_ADVISORIES,
                &old_date,
            ),
            older,
        ],
    };
    let intel_module = |extra: Value| {
        let mut module = json!({
            "mrsigner": hex::encode_upper([0u8; 48]),
            "attributes": hex::encode_upper([0u8; 8]),
            "attributesMask": hex::encode_upper([0xFFu8; 8]),
        });
        if let (Some(module), Value::Object(extra)) = (module.as_object_mut(), extra) {
            module.extend(extra);
        }
        module
    };
    let info = json!({
        "id": "TDX",
        "version": 3,
        "issueDate": rfc3339(issued_at)?,
        "nextUpdate": rfc3339(next_update)?,
        "fmspc": hex::encode_upper(FMSPC),
        "pceId": hex::encode_upper(PCE_ID),
        "tcbType": 0,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "tdxModule": intel_module(json!({})),
        "tdxModuleIdentities": [intel_module(json!({
            "id": "TDX_01",
            "tcbLevels": [
                {
                    "tcb": { "isvsvn": MODULE_UP_TO_DATE_ISVSVN },
                    "tcbDate": level_date,
                    "tcbStatus": "UpToDate",
                },
                {
                    "tcb": { "isvsvn": MODULE_OUT_OF_DATE_ISVSVN },
                    "tcbDate": old_date,
                    "tcbStatus": "OutOfDate",
                    "advisoryIDs": MODULE_OUT_OF_DATE_ADVISORIES,
                },
            ],
        }))],
        "tcbLevels": levels,
    });
    serde_json::to_string(&info).map_err(|e| TestPlatformError::Encoding(format!("TCB info: {e}")))
}

/// The TD QE identity (version 2): MRSIGNER, ISVPRODID, MISCSELECT and
/// ATTRIBUTES under masks, and the TCB levels of its ISVSVN.
fn qe_identity_json(issued_at: u64, next_update: u64) -> Result<String, TestPlatformError> {
    let identity = json!({
        "id": "TD_QE",
        "version": 2,
        "issueDate": rfc3339(issued_at)?,
        "nextUpdate": rfc3339(next_update)?,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": hex::encode_upper(QE_MRSIGNER),
        "isvprodid": QE_ISV_PROD_ID,
        "tcbLevels": [
            {
                "tcb": { "isvsvn": QE_ISV_SVN },
                "tcbDate": rfc3339(issued_at.saturating_sub(30 * 86_400))?,
                "tcbStatus": "UpToDate",
            },
        ],
    });
    serde_json::to_string(&identity)
        .map_err(|e| TestPlatformError::Encoding(format!("QE identity: {e}")))
}

/// 16 TCB components (`[{"svn": n}, ...]`).
fn components(svns: &[u8; 16]) -> Value {
    svns.iter().map(|svn| json!({ "svn": svn })).collect()
}

/// The Intel SGX extension's value (DER): PPID, TCB, PCE-ID, FMSPC, SGX type.
fn sgx_extension(ppid: &[u8; 16]) -> Vec<u8> {
    let entry = |arcs: &[u64], value: Vec<u8>| {
        let mut oid = SGX_EXTENSION_OID.to_vec();
        oid.extend_from_slice(arcs);
        der(0x30, &[der_oid(&oid), value].concat())
    };
    let mut tcb = Vec::new();
    for (arc, svn) in (1u64..).zip(CPU_SVN) {
        tcb.extend(entry(&[2, arc], der_uint(u16::from(svn))));
    }
    tcb.extend(entry(&[2, 17], der_uint(PCE_SVN)));
    tcb.extend(entry(&[2, 18], der(0x04, &CPU_SVN)));
    let entries = [
        entry(&[1], der(0x04, ppid)),
        entry(&[2], der(0x30, &tcb)),
        entry(&[3], der(0x04, &PCE_ID)),
        entry(&[4], der(0x04, &FMSPC)),
        // SGX type: Standard (ENUMERATED 0).
        entry(&[5], der(0x0A, &[0])),
    ];
    der(0x30, &entries.concat())
}

/// A DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let significant: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(&significant);
    }
    out.extend_from_slice(content);
    out
}

/// A DER OBJECT IDENTIFIER (at least two arcs, the first two small).
fn der_oid(arcs: &[u64]) -> Vec<u8> {
    let (head, rest) = arcs.split_at(arcs.len().min(2));
    let first = head.iter().fold(0u64, |acc, arc| acc * 40 + arc);
    let mut body = Vec::new();
    for arc in std::iter::once(first).chain(rest.iter().copied()) {
        let mut septets = vec![(arc & 0x7F) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            septets.push(0x80 | (rest & 0x7F) as u8);
            rest >>= 7;
        }
        body.extend(septets.iter().rev());
    }
    der(0x06, &body)
}

/// A DER INTEGER of a non-negative value, minimally encoded.
fn der_uint(value: u16) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let mut content: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if content.first().is_none_or(|b| b & 0x80 != 0) {
        content.insert(0, 0);
    }
    der(0x02, &content)
}

/// A fresh P-256 key for rcgen (it signs certificates and CRLs).
fn ca_key(what: &'static str) -> Result<KeyPair, TestPlatformError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki(what))
}

/// A fresh P-256 key for raw `r || s` signatures (quotes, QE reports, TCB
/// info and QE identity).
fn p256_key() -> Result<SigningKey, TestPlatformError> {
    // A random 32-byte string is a valid scalar but with probability ~2^-32;
    // a few tries make failure practically impossible.
    for _ in 0..4 {
        let mut scalar = [0u8; 32];
        fill_random(&mut scalar)?;
        let key = SigningKey::from_slice(&scalar);
        scalar.zeroize();
        if let Ok(key) = key {
            return Ok(key);
        }
    }
    Err(TestPlatformError::Random("no valid P-256 scalar".into()))
}

fn fill_random(out: &mut [u8]) -> Result<(), TestPlatformError> {
    getrandom::fill(out).map_err(|e| TestPlatformError::Random(e.to_string()))
}

/// A P-256 public key as the quote carries it: `x || y`, without the SEC1
/// `0x04` prefix.
fn raw_public_key(key: &SigningKey) -> Result<[u8; 64], TestPlatformError> {
    let point = key.verifying_key().to_sec1_point(false);
    point
        .as_bytes()
        .get(1..)
        .and_then(|xy| <[u8; 64]>::try_from(xy).ok())
        .ok_or_else(|| TestPlatformError::Encoding("P-256 public key".into()))
}

/// The public half of a [`SigningKey`], for rcgen to certify.
struct P256Public(Vec<u8>);

impl P256Public {
    fn of(key: &SigningKey) -> Result<Self, TestPlatformError> {
        let xy = raw_public_key(key)?;
        Ok(P256Public([&[0x04], &xy[..]].concat()))
    }
}

impl PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(
        DnType::OrganizationName,
        "cinfer test platform (not Intel; test only)",
    );
    dn
}

/// A random positive 16-byte serial number.
fn random_serial() -> Result<SerialNumber, TestPlatformError> {
    let mut serial = [0u8; 16];
    fill_random(&mut serial)?;
    serial[0] = (serial[0] & 0x7F) | 0x40;
    Ok(SerialNumber::from_slice(&serial))
}

fn ca_params(
    common_name: &str,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    path_len: u8,
) -> Result<CertificateParams, TestPlatformError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn leaf_params(
    common_name: &str,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<CertificateParams, TestPlatformError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A CRL (DER) of `issuer`, revoking `revoked`.
fn crl(
    issuer: &Issuer<'_, KeyPair>,
    this_update: u64,
    next_update: u64,
    number: u64,
    revoked: &[SerialNumber],
    what: &'static str,
) -> Result<Vec<u8>, TestPlatformError> {
    let revoked_at = datetime(this_update)?;
    let params = CertificateRevocationListParams {
        this_update: revoked_at,
        next_update: datetime(next_update)?,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: serial.clone(),
                revocation_time: revoked_at,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer).map_err(pki(what))?.der().to_vec())
}

fn pki(what: &'static str) -> impl FnOnce(rcgen::Error) -> TestPlatformError {
    move |source| TestPlatformError::Pki { what, source }
}

fn datetime(secs: u64) -> Result<OffsetDateTime, TestPlatformError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(TestPlatformError::Time(secs))
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as Intel's collateral dates.
fn rfc3339(secs: u64) -> Result<String, TestPlatformError> {
    let t = datetime(secs)?;
    Ok(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

fn len_u16(len: usize, what: &str) -> Result<[u8; 2], TestPlatformError> {
    u16::try_from(len)
        .map(u16::to_le_bytes)
        .map_err(|_| TestPlatformError::Encoding(format!("{what} length {len}")))
}

fn len_u32(len: usize, what: &str) -> Result<[u8; 4], TestPlatformError> {
    u32::try_from(len)
        .map(u32::to_le_bytes)
        .map_err(|_| TestPlatformError::Encoding(format!("{what} length {len}")))
}

fn to_json(collateral: &TdxCollateral) -> Result<Vec<u8>, TestPlatformError> {
    serde_json::to_vec(collateral)
        .map_err(|e| TestPlatformError::Encoding(format!("collateral JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_encodings_match_known_values() {
        assert_eq!(
            der_oid(&SGX_EXTENSION_OID),
            [
                0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x01, 0x0D, 0x01
            ]
        );
        assert_eq!(der_uint(0), [0x02, 0x01, 0x00]);
        assert_eq!(der_uint(13), [0x02, 0x01, 0x0D]);
        assert_eq!(der_uint(0x80), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_uint(0x1234), [0x02, 0x02, 0x12, 0x34]);
        let long = der(0x04, &[7; 300]);
        assert_eq!(long[..4], [0x04, 0x82, 0x01, 0x2C]);
        assert_eq!(long.len(), 304);
        assert_eq!(der(0x04, &[1, 2]), [0x04, 0x02, 1, 2]);
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_752_919_234).unwrap(), "2025-07-19T10:00:34Z");
    }

    #[test]
    fn the_pck_extension_reads_back_as_the_platform_tcb() {
        let ext = dcap_qvl::intel::PckExtension {
            ppid: vec![],
            cpu_svn: [0; 16],
            pce_svn: 0,
            pce_id: vec![],
            fmspc: [0; 6],
            sgx_type: 9,
            platform_instance_id: None,
            raw_extension: sgx_extension(&[9; 16]),
            dynamic_platform: None,
            cached_keys: None,
            smt_enabled: None,
        };
        use dcap_qvl::oids;
        let value = |oid| ext.get_value(oid).unwrap();
        assert_eq!(value(&oids::FMSPC), Some(FMSPC.to_vec()));
        assert_eq!(value(&oids::CPUSVN), Some(CPU_SVN.to_vec()));
        assert_eq!(value(&oids::PCESVN), Some(vec![13]));
        assert_eq!(value(&oids::PCEID), Some(PCE_ID.to_vec()));
        assert_eq!(value(&oids::PPID), Some(vec![9; 16]));
    }
}
