//! A bounded parser of `TPMT_PUBLIC` (TPM 2.0 Part 2 §12.2.4) for RSA and ECC
//! keys: every length is checked, the input must be consumed exactly, and
//! anything this keyserver does not use (keyed-hash and symmetric objects,
//! ECDAA) is refused rather than skipped.

/// `TPM_ALG_RSA`.
pub const ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_ECC`.
pub const ALG_ECC: u16 = 0x0023;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000b;
/// `TPM_ALG_AES`.
pub const ALG_AES: u16 = 0x0006;
/// `TPM_ALG_CFB`.
pub const ALG_CFB: u16 = 0x0043;
/// `TPM_ALG_NULL`.
pub const ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_ECDAA` (its scheme carries a count this parser does not take).
const ALG_ECDAA: u16 = 0x001a;
/// `TPM_ECC_NIST_P256`.
pub const ECC_NIST_P256: u16 = 0x0003;

/// `TPMA_OBJECT` bits.
pub mod attr {
    /// The object cannot be duplicated.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// Its parent cannot change.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated its sensitive part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The ADMIN role is authorized by the policy only.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// Restricted: signs only TPM-made structures / decrypts only TPM formats.
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN: u32 = 1 << 18;
}

/// The symmetric definition of a storage key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    /// `TPM_ALG_AES`, or `TPM_ALG_NULL` (then `key_bits` and `mode` are 0).
    pub algorithm: u16,
    /// Key size in bits.
    pub key_bits: u16,
    /// Block mode.
    pub mode: u16,
}

/// The `unique` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unique {
    /// RSA modulus, big-endian.
    Rsa {
        /// The modulus.
        modulus: Vec<u8>,
    },
    /// ECC point.
    Ecc {
        /// X coordinate, big-endian.
        x: Vec<u8>,
        /// Y coordinate, big-endian.
        y: Vec<u8>,
    },
}

/// The fields of a `TPMT_PUBLIC` this keyserver looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// `TPM_ALG_RSA` or `TPM_ALG_ECC`.
    pub object_type: u16,
    /// The name algorithm.
    pub name_alg: u16,
    /// `TPMA_OBJECT`.
    pub object_attributes: u32,
    /// The symmetric definition (storage keys).
    pub symmetric: SymDef,
    /// The scheme's algorithm (`TPM_ALG_NULL` for storage keys).
    pub scheme: u16,
    /// RSA: key size in bits; ECC: 0.
    pub rsa_key_bits: u16,
    /// RSA: the exponent as encoded (0 means 65537); ECC: 0.
    pub rsa_exponent: u32,
    /// ECC: the curve; RSA: 0.
    pub curve: u16,
    /// The public key.
    pub unique: Unique,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err(what);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, &'static str> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, &'static str> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self, what: &'static str) -> Result<&'a [u8], &'static str> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

impl TpmPublic {
    /// Parses a marshalled `TPMT_PUBLIC`, which must be consumed exactly.
    pub fn parse(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut r = Reader(bytes);
        let object_type = r.u16("truncated type")?;
        let name_alg = r.u16("truncated nameAlg")?;
        let object_attributes = r.u32("truncated objectAttributes")?;
        let _auth_policy = r.tpm2b("truncated authPolicy")?;
        let symmetric = {
            let algorithm = r.u16("truncated symmetric algorithm")?;
            if algorithm == ALG_NULL {
                SymDef {
                    algorithm,
                    key_bits: 0,
                    mode: 0,
                }
            } else {
                SymDef {
                    algorithm,
                    key_bits: r.u16("truncated symmetric key bits")?,
                    mode: r.u16("truncated symmetric mode")?,
                }
            }
        };
        let scheme = r.u16("truncated scheme")?;
        if scheme == ALG_ECDAA {
            return Err("ECDAA scheme not supported");
        }
        if scheme != ALG_NULL {
            let _scheme_hash = r.u16("truncated scheme hash")?;
        }
        let (rsa_key_bits, rsa_exponent, curve, unique) = match object_type {
            ALG_RSA => {
                let bits = r.u16("truncated RSA key bits")?;
                let exponent = r.u32("truncated RSA exponent")?;
                let modulus = r.tpm2b("truncated RSA modulus")?.to_vec();
                if modulus.len() * 8 != usize::from(bits) {
                    return Err("RSA modulus length differs from keyBits");
                }
                (bits, exponent, 0, Unique::Rsa { modulus })
            }
            ALG_ECC => {
                let curve = r.u16("truncated curve")?;
                let kdf = r.u16("truncated KDF scheme")?;
                if kdf != ALG_NULL {
                    let _kdf_hash = r.u16("truncated KDF hash")?;
                }
                let x = r.tpm2b("truncated ECC x")?.to_vec();
                let y = r.tpm2b("truncated ECC y")?.to_vec();
                (0, 0, curve, Unique::Ecc { x, y })
            }
            _ => return Err("not an RSA or ECC key"),
        };
        if !r.0.is_empty() {
            return Err("trailing bytes");
        }
        Ok(Self {
            object_type,
            name_alg,
            object_attributes,
            symmetric,
            scheme,
            rsa_key_bits,
            rsa_exponent,
            curve,
            unique,
        })
    }

    /// The RSA public exponent (0 encodes 65537); `None` for ECC keys.
    pub fn rsa_exponent(&self) -> Option<u32> {
        (self.object_type == ALG_RSA).then_some(if self.rsa_exponent == 0 {
            65537
        } else {
            self.rsa_exponent
        })
    }

    /// A P-256 key's point as uncompressed SEC1 (`04 || X || Y`); `None` for
    /// anything else.
    pub fn ecc_point_sec1(&self) -> Option<Vec<u8>> {
        let Unique::Ecc { x, y } = &self.unique else {
            return None;
        };
        if self.curve != ECC_NIST_P256 || x.len() > 32 || y.len() > 32 {
            return None;
        }
        let mut point = vec![0u8; 65];
        point[0] = 0x04;
        point[33 - x.len()..33].copy_from_slice(x);
        point[65 - y.len()..].copy_from_slice(y);
        Some(point)
    }

    /// The object's name, `nameAlg || H(area)` for the marshalled `area` this
    /// was parsed from; `None` unless the name algorithm is SHA-256.
    pub fn name(&self, area: &[u8]) -> Option<Vec<u8>> {
        use sha2::Digest as _;
        if self.name_alg != ALG_SHA256 {
            return None;
        }
        let mut name = ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&sha2::Sha256::digest(area));
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RSA 2048 storage key area as the EK template L-1 gives.
    pub(crate) fn rsa_area(modulus: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&ALG_RSA.to_be_bytes());
        a.extend_from_slice(&ALG_SHA256.to_be_bytes());
        a.extend_from_slice(&0x0003_00b2u32.to_be_bytes());
        a.extend_from_slice(&32u16.to_be_bytes());
        a.extend_from_slice(&[0x83; 32]);
        a.extend_from_slice(&ALG_AES.to_be_bytes());
        a.extend_from_slice(&128u16.to_be_bytes());
        a.extend_from_slice(&ALG_CFB.to_be_bytes());
        a.extend_from_slice(&ALG_NULL.to_be_bytes());
        a.extend_from_slice(&((modulus.len() * 8) as u16).to_be_bytes());
        a.extend_from_slice(&0u32.to_be_bytes());
        a.extend_from_slice(&(modulus.len() as u16).to_be_bytes());
        a.extend_from_slice(modulus);
        a
    }

    #[test]
    fn parses_an_rsa_storage_key_and_refuses_every_truncation() {
        let area = rsa_area(&[0xab; 256]);
        let p = TpmPublic::parse(&area).unwrap();
        assert_eq!(p.object_type, ALG_RSA);
        assert_eq!(p.rsa_exponent(), Some(65537));
        assert_eq!(
            p.symmetric,
            SymDef {
                algorithm: ALG_AES,
                key_bits: 128,
                mode: ALG_CFB
            }
        );
        assert_eq!(p.name(&area).unwrap().len(), 34);
        for n in 0..area.len() {
            assert!(TpmPublic::parse(&area[..n]).is_err(), "truncated at {n}");
        }
        let mut long = area.clone();
        long.push(0);
        assert_eq!(TpmPublic::parse(&long), Err("trailing bytes"));
    }
}
