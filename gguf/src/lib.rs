//! GGUF (v2/v3) parsing: header, key/value metadata and tensor infos.
//!
//! Hand-written because the format is small and fixed, and the crates that
//! read it come with whole inference frameworks; this one borrows from the
//! input, bounds every length by the bytes actually present, and returns a
//! typed error for anything malformed (the bytes may come from an untrusted
//! side before decryption checks, or from a program's request).
//!
//! ```text
//! "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv × (key: string, type: u32, value)
//! n_tensors × (name: string, n_dims: u32, dims: u64 × n_dims, type: u32, offset: u64)
//! padding to `general.alignment` (default 32), then tensor data
//! ```
#![forbid(unsafe_code)]

use std::fmt;

/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Limits that keep a hostile header from asking for absurd allocations.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most key/value pairs.
pub const MAX_KV: u64 = 1 << 16;
/// Most dimensions of a tensor.
pub const MAX_DIMS: u32 = 4;

/// Why bytes are not a GGUF file (or not enough of one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// No `GGUF` magic.
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    /// A version this parser does not read.
    #[error("unsupported GGUF version {0}")]
    UnsupportedVersion(u32),
    /// The input ends inside the named field.
    #[error("GGUF truncated in {0}")]
    Truncated(&'static str),
    /// A count or length is beyond this parser's limits.
    #[error("GGUF {0} out of range")]
    OutOfRange(&'static str),
    /// An unknown value type code.
    #[error("unknown GGUF value type {0}")]
    BadValueType(u32),
    /// A string is not UTF-8.
    #[error("GGUF string is not UTF-8")]
    BadUtf8,
    /// A key was missing or had another type than asked for.
    #[error("GGUF key `{key}`: {problem}")]
    Key {
        /// The key.
        key: String,
        /// "missing" or "expected TYPE".
        problem: &'static str,
    },
    /// An unknown or unsupported tensor type.
    #[error("tensor `{name}`: unsupported ggml type {ty}")]
    BadTensorType {
        /// The tensor.
        name: String,
        /// Its type code.
        ty: u32,
    },
}

/// Element types of tensors that this project reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// Blocks of 32: f16 scale `d`, f16 min `m`, 16 bytes of 4-bit values (`d·q + m`).
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 signed bytes (`d·q`).
    Q8_0,
}

impl GgmlType {
    /// From the ggml type code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(GgmlType::F32),
            1 => Some(GgmlType::F16),
            3 => Some(GgmlType::Q4_1),
            8 => Some(GgmlType::Q8_0),
            _ => None,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 => 2,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
        }
    }

    /// Bytes of a row of `n` elements, if `n` is a whole number of blocks.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

/// A metadata value, borrowing from the input.
#[derive(Clone, PartialEq)]
pub enum Value<'a> {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f32
    F32(f32),
    /// f64
    F64(f64),
    /// bool
    Bool(bool),
    /// A UTF-8 string.
    Str(&'a str),
    /// An array, kept encoded; iterate with [`Array::iter`].
    Array(Array<'a>),
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) if s.len() > 64 => {
                write!(f, "Str({:?}…)", &s[..s.floor_char_boundary(64)])
            }
            Value::Str(s) => write!(f, "Str({s:?})"),
            Value::Array(a) => write!(f, "Array(type {}, {} items)", a.elem_type, a.len),
            Value::U8(v) => write!(f, "U8({v})"),
            Value::I8(v) => write!(f, "I8({v})"),
            Value::U16(v) => write!(f, "U16({v})"),
            Value::I16(v) => write!(f, "I16({v})"),
            Value::U32(v) => write!(f, "U32({v})"),
            Value::I32(v) => write!(f, "I32({v})"),
            Value::U64(v) => write!(f, "U64({v})"),
            Value::I64(v) => write!(f, "I64({v})"),
            Value::F32(v) => write!(f, "F32({v})"),
            Value::F64(v) => write!(f, "F64({v})"),
            Value::Bool(v) => write!(f, "Bool({v})"),
        }
    }
}

impl Value<'_> {
    /// Any unsigned or non-negative signed integer as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float (f32 or f64) as f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }
}

/// An encoded array value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Array<'a> {
    elem_type: u32,
    len: u64,
    bytes: &'a [u8],
}

impl<'a> Array<'a> {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.len as usize // bounded by the input length when parsed
    }

    /// Whether it has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The items, decoded one at a time. A string item that is not UTF-8 ends
    /// the iteration early (so [`strings`](Self::strings) gives `None`).
    pub fn iter(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let mut r = Reader {
            bytes: self.bytes,
            pos: 0,
        };
        let ty = self.elem_type;
        (0..self.len).map_while(move |_| r.value(ty, 0).ok())
    }

    /// The raw bytes of an array of `u8` (or `i8`) items.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        matches!(self.elem_type, 0 | 1).then_some(self.bytes)
    }

    /// All items as strings, if they are all UTF-8 strings.
    pub fn strings(&self) -> Option<Vec<&'a str>> {
        let v: Vec<&str> = self
            .iter()
            .map(|v| match v {
                Value::Str(s) => Some(s),
                _ => None,
            })
            .collect::<Option<_>>()?;
        (v.len() as u64 == self.len).then_some(v)
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elems(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct Gguf<'a> {
    /// Format version.
    pub version: u32,
    /// Key/value metadata, in file order.
    pub kv: Vec<(&'a str, Value<'a>)>,
    /// Tensor infos (empty if only the metadata was parsed).
    pub tensors: Vec<TensorInfo>,
    /// Byte offset where the key/value section ends (the metadata blob is `[0, kv_end)`).
    pub kv_end: usize,
    /// Byte offset of the data section (0 if only the metadata was parsed).
    pub data_offset: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).ok_or(GgufError::Truncated(what))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(GgufError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &'static str) -> Result<&'a str, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| GgufError::Truncated(what))?;
        std::str::from_utf8(self.take(len, what)?).map_err(|_| GgufError::BadUtf8)
    }
    /// Skips `len` strings. Their UTF-8 is checked when they are read
    /// ([`Array::iter`]): vocabularies make string arrays the bulk of the
    /// metadata, and a program that needs only a few keys should not pay for
    /// validating 100,000 strings.
    fn skip_strings(&mut self, len: u64) -> Result<(), GgufError> {
        for _ in 0..len {
            let n = usize::try_from(self.u64("string length")?)
                .map_err(|_| GgufError::Truncated("string"))?;
            self.take(n, "string")?;
        }
        Ok(())
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value<'a>, GgufError> {
        const W: &str = "value";
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(W)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.arr(W)?)),
            2 => Value::U16(u16::from_le_bytes(self.arr(W)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(W)?)),
            4 => Value::U32(u32::from_le_bytes(self.arr(W)?)),
            5 => Value::I32(i32::from_le_bytes(self.arr(W)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(W)?)),
            7 => Value::Bool(self.arr::<1>(W)?[0] != 0),
            8 => Value::Str(self.string(W)?),
            9 => {
                if depth > 0 {
                    return Err(GgufError::OutOfRange("nested array"));
                }
                let elem_type = self.u32("array type")?;
                let len = self.u64("array length")?;
                let start = self.pos;
                // Find the end: numbers need no validation, strings are
                // checked as they are read.
                match fixed_size(elem_type) {
                    Some(size) => {
                        let n = usize::try_from(len)
                            .ok()
                            .and_then(|l| l.checked_mul(size))
                            .ok_or(GgufError::Truncated("array"))?;
                        self.take(n, "array")?;
                    }
                    None if elem_type == 8 => self.skip_strings(len)?,
                    None => {
                        for _ in 0..len {
                            self.value(elem_type, depth + 1)?;
                        }
                    }
                }
                Value::Array(Array {
                    elem_type,
                    len,
                    bytes: &self.bytes[start..self.pos],
                })
            }
            10 => Value::U64(u64::from_le_bytes(self.arr(W)?)),
            11 => Value::I64(i64::from_le_bytes(self.arr(W)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(W)?)),
            other => return Err(GgufError::BadValueType(other)),
        })
    }
}

/// Bytes per item of the fixed-size value types.
fn fixed_size(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn parse_inner(bytes: &[u8], with_tensors: bool) -> Result<Gguf<'_>, GgufError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4, "magic")? != b"GGUF" {
        return Err(GgufError::BadMagic);
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("kv count")?;
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::OutOfRange("tensor count"));
    }
    if n_kv > MAX_KV {
        return Err(GgufError::OutOfRange("kv count"));
    }
    let mut kv = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = r.string("key")?;
        let ty = r.u32("value type")?;
        kv.push((key, r.value(ty, 0)?));
    }
    let kv_end = r.pos;
    let mut gguf = Gguf {
        version,
        kv,
        tensors: Vec::new(),
        kv_end,
        data_offset: 0,
    };
    if !with_tensors {
        return Ok(gguf);
    }
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?.to_owned();
        let n_dims = r.u32("tensor dims")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::OutOfRange("tensor dims"));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64("tensor dim"))
            .collect::<Result<Vec<_>, _>>()?;
        let code = r.u32("tensor type")?;
        let ty = GgmlType::from_code(code).ok_or_else(|| GgufError::BadTensorType {
            name: name.clone(),
            ty: code,
        })?;
        let offset = r.u64("tensor offset")?;
        let elems = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .ok_or(GgufError::OutOfRange("tensor size"))?;
        let size = ty
            .row_bytes(elems)
            .filter(|_| dims[0].is_multiple_of(ty.block_elems()))
            .ok_or(GgufError::OutOfRange("tensor size"))?;
        gguf.tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }
    let align = match gguf.get("general.alignment") {
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or(GgufError::OutOfRange("alignment"))?,
        None => DEFAULT_ALIGNMENT,
    };
    gguf.data_offset = (r.pos as u64).div_ceil(align) * align;
    Ok(gguf)
}

/// Parses the header, metadata and tensor infos. `bytes` must hold at least
/// everything up to the end of the tensor infos (the tensor data may be absent).
pub fn parse(bytes: &[u8]) -> Result<Gguf<'_>, GgufError> {
    parse_inner(bytes, true)
}

/// Parses the header and metadata only (what a program receives as model metadata).
pub fn parse_metadata(bytes: &[u8]) -> Result<Gguf<'_>, GgufError> {
    parse_inner(bytes, false)
}

/// The byte span of every key/value pair of the metadata in `bytes` (a
/// prefix holding the key/value section is enough), in file order: what
/// copying a subset of the pairs, or replacing one, needs.
pub fn kv_spans(bytes: &[u8]) -> Result<Vec<(&str, std::ops::Range<usize>)>, GgufError> {
    spans_of(bytes, &parse_metadata(bytes)?)
}

/// [`kv_spans`] of `bytes`, already parsed as `g`.
fn spans_of<'a>(
    bytes: &'a [u8],
    g: &Gguf<'_>,
) -> Result<Vec<(&'a str, std::ops::Range<usize>)>, GgufError> {
    let mut r = Reader { bytes, pos: 24 };
    let mut spans = Vec::with_capacity(g.kv.len());
    for _ in &g.kv {
        let start = r.pos;
        let key = r.string("key")?;
        let ty = r.u32("value type")?;
        r.value(ty, 0)?;
        spans.push((key, start..r.pos));
    }
    Ok(spans)
}

impl<'a> Gguf<'a> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.kv.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&Value<'a>, GgufError> {
        self.get(key).ok_or_else(|| GgufError::Key {
            key: key.to_owned(),
            problem: "missing",
        })
    }

    fn wrong(key: &str, problem: &'static str) -> GgufError {
        GgufError::Key {
            key: key.to_owned(),
            problem,
        }
    }

    /// An integer key.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| Self::wrong(key, "expected an integer"))
    }

    /// A float key.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        self.require(key)?
            .as_f32()
            .ok_or_else(|| Self::wrong(key, "expected a float"))
    }

    /// A string key.
    pub fn str(&self, key: &str) -> Result<&'a str, GgufError> {
        match self.require(key)? {
            Value::Str(s) => Ok(s),
            _ => Err(Self::wrong(key, "expected a string")),
        }
    }

    /// An array key.
    pub fn array(&self, key: &str) -> Result<Array<'a>, GgufError> {
        match self.require(key)? {
            Value::Array(a) => Ok(*a),
            _ => Err(Self::wrong(key, "expected an array")),
        }
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Writes GGUF files (for tests and tools that generate tiny models).
pub mod write {
    use super::{GgmlType, GgufError, Reader};

    /// A value to write.
    #[derive(Debug, Clone)]
    pub enum Val {
        /// u32
        U32(u32),
        /// i32
        I32(i32),
        /// f32
        F32(f32),
        /// bool
        Bool(bool),
        /// string
        Str(String),
        /// array of strings
        Strs(Vec<String>),
        /// array of i32
        I32s(Vec<i32>),
        /// array of f32
        F32s(Vec<f32>),
        /// array of u8
        U8s(Vec<u8>),
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn value(out: &mut Vec<u8>, v: &Val) {
        let (ty, body): (u32, Vec<u8>) = match v {
            Val::U32(x) => (4, x.to_le_bytes().to_vec()),
            Val::I32(x) => (5, x.to_le_bytes().to_vec()),
            Val::F32(x) => (6, x.to_le_bytes().to_vec()),
            Val::Bool(x) => (7, vec![u8::from(*x)]),
            Val::Str(s) => {
                let mut b = Vec::new();
                string(&mut b, s);
                (8, b)
            }
            Val::Strs(items) => {
                let mut b = 8u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    string(&mut b, s);
                }
                (9, b)
            }
            Val::I32s(items) => {
                let mut b = 5u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for x in items {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                (9, b)
            }
            Val::F32s(items) => {
                let mut b = 6u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for x in items {
                    b.extend_from_slice(&x.to_le_bytes());
                }
                (9, b)
            }
            Val::U8s(items) => {
                let mut b = 0u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                b.extend_from_slice(items);
                (9, b)
            }
        };
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&body);
    }

    /// `file` (a whole GGUF file, tensor data included) with metadata `key`
    /// set to `v`: its value replaced where the key exists, else the pair
    /// appended after the others. Tensor infos and data are copied unchanged
    /// (their offsets are relative to the data section, which moves to the
    /// next multiple of the file's alignment after the longer header).
    /// `general.alignment` cannot be set this way (the tensor offsets were
    /// laid out for the old one).
    pub fn set_kv(file: &[u8], key: &str, v: &Val) -> Result<Vec<u8>, GgufError> {
        let g = super::parse(file)?;
        let (mut out, data) = header_with(file, &g, key, v)?;
        let data_len = g
            .tensors
            .iter()
            .map(|t| t.offset.checked_add(t.size))
            .try_fold(0u64, |m, end| end.map(|e| m.max(e)))
            .ok_or(GgufError::OutOfRange("tensor offset"))?;
        let data = usize::try_from(data).map_err(|_| GgufError::Truncated("tensor data"))?;
        match usize::try_from(data_len)
            .ok()
            .and_then(|l| file.get(data..data.checked_add(l)?))
        {
            Some(d) => out.extend_from_slice(d),
            None => return Err(GgufError::Truncated("tensor data")),
        }
        Ok(out)
    }

    /// The header part of [`set_kv`] for files too large to hold in memory:
    /// from `prefix` (the file up to at least the end of its tensor infos),
    /// the new header padded to the data section, and the offset of the data
    /// section in the old file. The new file is that header followed by the
    /// old file from that offset on.
    pub fn set_kv_header(prefix: &[u8], key: &str, v: &Val) -> Result<(Vec<u8>, u64), GgufError> {
        header_with(prefix, &super::parse(prefix)?, key, v)
    }

    /// [`set_kv_header`] of `prefix`, already parsed (with its tensors) as `g`.
    fn header_with(
        prefix: &[u8],
        g: &super::Gguf<'_>,
        key: &str,
        v: &Val,
    ) -> Result<(Vec<u8>, u64), GgufError> {
        if key == "general.alignment" {
            return Err(GgufError::Key {
                key: key.to_owned(),
                problem: "cannot be changed in place",
            });
        }
        // Where the tensor infos end.
        let pairs = super::spans_of(prefix, g)?;
        let mut r = Reader {
            bytes: prefix,
            pos: g.kv_end,
        };
        for t in &g.tensors {
            r.string("tensor name")?;
            r.take(4 + 8 * t.dims.len() + 4 + 8, "tensor info")?;
        }
        let infos = g.kv_end..r.pos;
        let mut out = prefix[..16].to_vec();
        let kept: Vec<_> = pairs.iter().filter(|(k, _)| *k != key).collect();
        out.extend_from_slice(&(kept.len() as u64 + 1).to_le_bytes());
        for (_, span) in kept {
            out.extend_from_slice(&prefix[span.clone()]);
        }
        string(&mut out, key);
        value(&mut out, v);
        out.extend_from_slice(&prefix[infos]);
        let align = g
            .get("general.alignment")
            .and_then(|a| a.as_u64())
            .unwrap_or(super::DEFAULT_ALIGNMENT);
        let data_start = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_start as usize, 0);
        Ok((out, g.data_offset))
    }

    /// A metadata-only GGUF (the same version, no tensors) holding the
    /// key/value pairs of `meta` whose key `keep` accepts, in file order and
    /// byte for byte.
    pub fn metadata_subset(meta: &[u8], keep: impl Fn(&str) -> bool) -> Result<Vec<u8>, GgufError> {
        let spans = super::kv_spans(meta)?;
        Ok(metadata_of_pairs(
            meta,
            spans.into_iter().filter(|(k, _)| keep(k)).map(|(_, s)| s),
        ))
    }

    /// A metadata-only GGUF of the key/value pairs at `spans` of `meta`
    /// (spans from [`kv_spans`](super::kv_spans) of the same bytes).
    pub fn metadata_of_pairs(
        meta: &[u8],
        spans: impl Iterator<Item = std::ops::Range<usize>> + Clone,
    ) -> Vec<u8> {
        let (n, len) = spans
            .clone()
            .fold((0u64, 0), |(n, l), s| (n + 1, l + s.len()));
        let mut out = Vec::with_capacity(24 + len);
        out.extend_from_slice(&meta[..8]);
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        for span in spans {
            out.extend_from_slice(&meta[span]);
        }
        out
    }

    /// Serializes a GGUF v3 file: metadata, then tensors (name, dims innermost
    /// first, type, raw data already in that type's encoding), 32-byte aligned.
    pub fn gguf(kv: &[(&str, Val)], tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)]) -> Vec<u8> {
        let code = |t: GgmlType| match t {
            GgmlType::F32 => 0u32,
            GgmlType::F16 => 1,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
        };
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            string(&mut out, k);
            value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&code(*ty).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(32) * 32;
        }
        let data_start = out.len().div_ceil(32) * 32;
        out.resize(data_start, 0);
        for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{Val, gguf};
    use super::*;

    fn sample() -> Vec<u8> {
        gguf(
            &[
                ("general.architecture", Val::Str("llama".into())),
                ("llama.block_count", Val::U32(2)),
                ("llama.rope.freq_base", Val::F32(10000.0)),
                (
                    "tokenizer.ggml.tokens",
                    Val::Strs(vec!["a".into(), "b".into()]),
                ),
                ("tokenizer.ggml.token_type", Val::I32s(vec![1, 3])),
            ],
            &[
                ("x", vec![4, 2], GgmlType::F32, vec![0u8; 32]),
                ("q", vec![32, 1], GgmlType::Q4_1, vec![1u8; 20]),
            ],
        )
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let g = parse(&bytes).expect("parse");
        assert_eq!(g.str("general.architecture").expect("arch"), "llama");
        assert_eq!(g.u64("llama.block_count").expect("blocks"), 2);
        assert_eq!(g.f32("llama.rope.freq_base").expect("theta"), 10000.0);
        assert_eq!(
            g.array("tokenizer.ggml.tokens").expect("tokens").strings(),
            Some(vec!["a", "b"])
        );
        let types: Vec<u64> = g
            .array("tokenizer.ggml.token_type")
            .expect("types")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(types, vec![1, 3]);
        let q = g.tensor("q").expect("q");
        assert_eq!((q.ty, q.size, q.offset), (GgmlType::Q4_1, 20, 32));
        assert_eq!(g.data_offset % 32, 0);
        let data = &bytes[(g.data_offset + q.offset) as usize..][..20];
        assert_eq!(data, &[1u8; 20]);
        // The metadata prefix parses on its own.
        let m = parse_metadata(&bytes[..g.kv_end]).expect("metadata");
        assert_eq!(m.kv.len(), 5);
        assert!(m.tensors.is_empty());
    }

    #[test]
    fn typed_errors() {
        assert_eq!(parse(b"GG").unwrap_err(), GgufError::Truncated("magic"));
        assert_eq!(
            parse(b"GGMLxxxxxxxxxxxxxxxxxxxx").unwrap_err(),
            GgufError::BadMagic
        );
        let mut v = sample();
        v[4] = 9;
        assert_eq!(parse(&v).unwrap_err(), GgufError::UnsupportedVersion(9));
        let bytes = sample();
        let g = parse(&bytes).expect("parse");
        assert!(matches!(
            g.u64("general.architecture"),
            Err(GgufError::Key {
                problem: "expected an integer",
                ..
            })
        ));
        assert!(matches!(
            g.str("nope"),
            Err(GgufError::Key {
                problem: "missing",
                ..
            })
        ));
        // Every truncation of the header is an error, never a panic.
        for cut in 0..g.kv_end {
            assert!(parse(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    /// A metadata-only file with one array of the given encoded strings.
    fn strings_file(items: &[&[u8]]) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        v.push(b'k');
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&8u32.to_le_bytes());
        v.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for s in items {
            v.extend_from_slice(&(s.len() as u64).to_le_bytes());
            v.extend_from_slice(s);
        }
        v
    }

    #[test]
    fn string_arrays_are_checked_item_by_item_when_read() {
        let long = "é".repeat(100); // 200 bytes: a length byte ≥ 0x80
        let good: [&[u8]; 4] = [b"a", b"", "Ġthe".as_bytes(), long.as_bytes()];
        let bytes = strings_file(&good);
        let a = parse_metadata(&bytes)
            .expect("valid")
            .array("k")
            .expect("k");
        assert_eq!(
            a.strings().expect("strings"),
            ["a", "", "Ġthe", long.as_str()]
        );
        // Each string must be UTF-8 on its own, even where the bytes around it
        // would complete a character: "\xc3" + "\xa9" is "é" across two items.
        for bad in [
            &[b"a" as &[u8], b"\xc3", b"\xa9"][..],
            &[b"\xff"],
            &[long.as_bytes(), &long.as_bytes()[1..]],
            &[&long.as_bytes()[..199]],
        ] {
            let bytes = strings_file(bad);
            let a = parse_metadata(&bytes)
                .expect("framing is valid")
                .array("k")
                .expect("k");
            assert_eq!(a.strings(), None, "{bad:?}");
        }
        // Lengths past the end are truncation, not a panic.
        let mut cut = strings_file(&good);
        cut.pop();
        assert_eq!(
            parse_metadata(&cut).unwrap_err(),
            GgufError::Truncated("string")
        );
    }

    #[test]
    fn set_kv_replaces_or_appends_and_keeps_the_tensors() {
        let bytes = sample();
        let image: Vec<u8> = (0..=255).collect();
        let with = write::set_kv(&bytes, "cinfer.blob", &Val::U8s(image.clone())).expect("set");
        let g = parse(&with).expect("parse");
        assert_eq!(g.kv.len(), 6);
        assert_eq!(
            g.array("cinfer.blob").expect("blob").as_bytes(),
            Some(&image[..])
        );
        assert_eq!(g.str("general.architecture").expect("arch"), "llama");
        for t in &parse(&bytes).expect("parse").tensors {
            let old = &bytes[(parse(&bytes).expect("p").data_offset + t.offset) as usize..]
                [..t.size as usize];
            let n = g.tensor(&t.name).expect("tensor");
            assert_eq!(n, t);
            assert_eq!(
                &with[(g.data_offset + n.offset) as usize..][..n.size as usize],
                old
            );
        }
        // Setting it again replaces the value instead of adding a pair.
        let again = write::set_kv(&with, "cinfer.blob", &Val::U8s(vec![7])).expect("set");
        let g = parse(&again).expect("parse");
        assert_eq!(g.kv.len(), 6);
        assert_eq!(
            g.array("cinfer.blob").expect("blob").as_bytes(),
            Some(&[7u8][..])
        );
        // A file without its tensor data, or the alignment, is refused.
        assert_eq!(
            write::set_kv(&bytes[..bytes.len() - 1], "k", &Val::U32(1)).unwrap_err(),
            GgufError::Truncated("tensor data")
        );
        assert!(matches!(
            write::set_kv(&bytes, "general.alignment", &Val::U32(64)),
            Err(GgufError::Key { .. })
        ));
    }

    #[test]
    fn metadata_subset_copies_the_chosen_pairs() {
        let bytes = sample();
        let sub = write::metadata_subset(&bytes, |k| k.starts_with("llama.")).expect("subset");
        let g = parse_metadata(&sub).expect("parse");
        let keys: Vec<&str> = g.kv.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["llama.block_count", "llama.rope.freq_base"]);
        assert_eq!(g.u64("llama.block_count").expect("blocks"), 2);
        assert_eq!(g.kv_end, sub.len());
        let none = write::metadata_subset(&bytes, |_| false).expect("subset");
        assert_eq!(parse_metadata(&none).expect("parse").kv.len(), 0);
        assert_eq!(
            write::metadata_subset(b"GGUF", |_| true).unwrap_err(),
            GgufError::Truncated("version")
        );
    }

    #[test]
    fn tensor_sizes_do_not_overflow() {
        assert_eq!(GgmlType::F32.row_bytes(1 << 62), None);
        assert_eq!(GgmlType::Q4_1.row_bytes(33), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
    }

    #[test]
    fn hostile_lengths_do_not_allocate() {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&u64::MAX.to_le_bytes()); // key length
        assert_eq!(parse(&v).unwrap_err(), GgufError::Truncated("key"));
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&u64::MAX.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            parse(&v).unwrap_err(),
            GgufError::OutOfRange("tensor count")
        );
    }
}
