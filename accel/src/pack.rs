//! Quantized weight matrices repacked for SIMD kernels.
//!
//! GGUF stores a Q4_1 row as 20-byte blocks (f16 scale, f16 minimum, 16
//! bytes of nibbles) and a Q8_0 row as 34-byte blocks. A kernel that walks one
//! row at a time loads 16 or 32 bytes at odd offsets, converts two scalars per
//! block, and ends every block in a horizontal sum: on Intel cores that work,
//! not the memory, bounds the speed (see BENCHMARKS.md, "why the old kernel
//! was slow").
//!
//! Here the rows of a matrix are taken [`GROUP`] (16) at a time and, block by
//! block, stored transposed in 4-byte words: word `c` of row `r` sits in lane
//! `r` of vector `c`. One 512-bit `vpdpbusd` then multiplies 4 values of all
//! 16 rows with the same 4 activation values (broadcast), so 16 rows finish a
//! block together with their exact integer sums in 16 lanes, and their 16
//! scales are one contiguous f16 vector. The bytes per block stay those of
//! GGUF (Q4_1: 16 + 2 + 2, Q8_0: 32 + 2); a last partial group is padded
//! with zero rows, which the kernels compute and drop.
//!
//! - Q4_1, per (group, block): `qs` 256 bytes = 4 vectors × 16 lanes × 4
//!   bytes, lane `r` of vector `c` = bytes `4c..4c+4` of row `r`'s nibbles
//!   (low nibbles: elements `4c..4c+4`, high nibbles: `16+4c..16+4c+4`);
//!   `d`, `m`: 16 f16 each.
//! - Q8_0, per (group, block): `qs` 512 bytes = 8 vectors × 16 lanes × 4
//!   bytes, each value stored as `q + 128` (an unsigned byte, what
//!   `vpdpbusd` takes; the kernels subtract `128 · Σx` exactly); `d`: 16 f16.
//!
//! Results are bit for bit those of the row-at-a-time reference
//! ([`crate::quant::dot_q4_1_q8_1`], [`crate::quant::dot_q8_0_q8_0`]): block
//! sums are exact integers and every float operation is the reference's,
//! in the reference's order, per row.

use crate::quant::{BlockQ4_1, BlockQ8_0, QK};
use rayon::prelude::*;

/// Rows per group.
pub const GROUP: usize = 16;

/// A Q4_1 matrix `[rows, kb · 32]` in the grouped layout.
#[derive(Clone, PartialEq)]
pub struct PackedQ4_1 {
    rows: usize,
    kb: usize,
    pub(crate) qs: Vec<u8>,
    pub(crate) d: Vec<u16>,
    pub(crate) m: Vec<u16>,
}

/// A Q8_0 matrix `[rows, kb · 32]` in the grouped layout.
#[derive(Clone, PartialEq)]
pub struct PackedQ8_0 {
    rows: usize,
    kb: usize,
    pub(crate) qs: Vec<u8>,
    pub(crate) d: Vec<u16>,
}

impl std::fmt::Debug for PackedQ4_1 {
    // Never print contents: they are model weights.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ4_1([{}, {}])", self.rows, self.kb * QK)
    }
}

impl std::fmt::Debug for PackedQ8_0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ8_0([{}, {}])", self.rows, self.kb * QK)
    }
}

/// Index of (group, block) in per-group-block arrays.
#[inline]
fn gb(kb: usize, g: usize, b: usize) -> usize {
    g * kb + b
}

impl PackedQ4_1 {
    /// Repacks `rows` rows of `kb` blocks each (`blocks.len() == rows · kb`).
    pub fn new(blocks: &[BlockQ4_1], rows: usize, kb: usize) -> Self {
        debug_assert_eq!(blocks.len(), rows * kb);
        let groups = rows.div_ceil(GROUP);
        let mut qs = vec![0u8; groups * kb * 256];
        let mut d = vec![0u16; groups * kb * GROUP];
        let mut m = vec![0u16; groups * kb * GROUP];
        let kb1 = kb.max(1);
        // Groups are disjoint in every array: pack them in parallel (model load).
        qs.par_chunks_mut(kb1 * 256)
            .zip(d.par_chunks_mut(kb1 * GROUP))
            .zip(m.par_chunks_mut(kb1 * GROUP))
            .enumerate()
            .for_each(|(g, ((qs, d), m))| {
                let first = g * GROUP;
                for r in 0..GROUP.min(rows.saturating_sub(first)) {
                    let row = &blocks[(first + r) * kb..(first + r + 1) * kb];
                    for (b, blk) in row.iter().enumerate() {
                        d[b * GROUP + r] = blk.d;
                        m[b * GROUP + r] = blk.m;
                        for c in 0..4 {
                            let at = b * 256 + c * 64 + r * 4;
                            qs[at..at + 4].copy_from_slice(&blk.qs[4 * c..4 * c + 4]);
                        }
                    }
                }
            });
        PackedQ4_1 { rows, kb, qs, d, m }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.kb
    }

    /// Groups (`rows / 16`, rounded up).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Block `i` in row-major block order (what the GGUF layout holds at `i`).
    pub fn block(&self, i: usize) -> BlockQ4_1 {
        let (row, b) = (i / self.kb, i % self.kb);
        let (g, r) = (row / GROUP, row % GROUP);
        let j = gb(self.kb, g, b);
        let mut qs = [0u8; 16];
        for c in 0..4 {
            let at = j * 256 + c * 64 + r * 4;
            qs[4 * c..4 * c + 4].copy_from_slice(&self.qs[at..at + 4]);
        }
        BlockQ4_1 {
            d: self.d[j * GROUP + r],
            m: self.m[j * GROUP + r],
            qs,
        }
    }

    /// All blocks in GGUF order.
    pub fn unpack(&self) -> Vec<BlockQ4_1> {
        (0..self.rows * self.kb).map(|i| self.block(i)).collect()
    }

    /// Nibbles of (group, block): 256 bytes.
    #[inline]
    pub(crate) fn qs_of(&self, g: usize, b: usize) -> &[u8; 256] {
        let i = gb(self.kb, g, b) * 256;
        self.qs[i..i + 256].first_chunk().unwrap_or(&[0; 256])
    }

    /// Scales (f16 bits) of (group, block).
    #[inline]
    pub(crate) fn d_of(&self, g: usize, b: usize) -> &[u16; GROUP] {
        let i = gb(self.kb, g, b) * GROUP;
        self.d[i..i + GROUP].first_chunk().unwrap_or(&[0; GROUP])
    }

    /// Minimums (f16 bits) of (group, block).
    #[inline]
    pub(crate) fn m_of(&self, g: usize, b: usize) -> &[u16; GROUP] {
        let i = gb(self.kb, g, b) * GROUP;
        self.m[i..i + GROUP].first_chunk().unwrap_or(&[0; GROUP])
    }
}

impl PackedQ8_0 {
    /// Repacks `rows` rows of `kb` blocks each (`blocks.len() == rows · kb`).
    pub fn new(blocks: &[BlockQ8_0], rows: usize, kb: usize) -> Self {
        debug_assert_eq!(blocks.len(), rows * kb);
        let groups = rows.div_ceil(GROUP);
        // Padding rows hold q = 0, stored as 128.
        let mut qs = vec![128u8; groups * kb * 512];
        let mut d = vec![0u16; groups * kb * GROUP];
        let kb1 = kb.max(1);
        qs.par_chunks_mut(kb1 * 512)
            .zip(d.par_chunks_mut(kb1 * GROUP))
            .enumerate()
            .for_each(|(g, (qs, d))| {
                let first = g * GROUP;
                for r in 0..GROUP.min(rows.saturating_sub(first)) {
                    let row = &blocks[(first + r) * kb..(first + r + 1) * kb];
                    for (b, blk) in row.iter().enumerate() {
                        d[b * GROUP + r] = blk.d;
                        for c in 0..8 {
                            let at = b * 512 + c * 64 + r * 4;
                            for t in 0..4 {
                                qs[at + t] = (blk.qs[4 * c + t] as u8) ^ 0x80;
                            }
                        }
                    }
                }
            });
        PackedQ8_0 { rows, kb, qs, d }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.kb
    }

    /// Groups (`rows / 16`, rounded up).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Block `i` in row-major block order.
    pub fn block(&self, i: usize) -> BlockQ8_0 {
        let (row, b) = (i / self.kb, i % self.kb);
        let (g, r) = (row / GROUP, row % GROUP);
        let j = gb(self.kb, g, b);
        let mut qs = [0i8; 32];
        for c in 0..8 {
            let at = j * 512 + c * 64 + r * 4;
            for t in 0..4 {
                qs[4 * c + t] = (self.qs[at + t] ^ 0x80) as i8;
            }
        }
        BlockQ8_0 {
            d: self.d[j * GROUP + r],
            qs,
        }
    }

    /// All blocks in GGUF order.
    pub fn unpack(&self) -> Vec<BlockQ8_0> {
        (0..self.rows * self.kb).map(|i| self.block(i)).collect()
    }

    /// Offset values of (group, block): 512 bytes.
    #[inline]
    pub(crate) fn qs_of(&self, g: usize, b: usize) -> &[u8; 512] {
        let i = gb(self.kb, g, b) * 512;
        self.qs[i..i + 512].first_chunk().unwrap_or(&[0; 512])
    }

    /// Scales (f16 bits) of (group, block).
    #[inline]
    pub(crate) fn d_of(&self, g: usize, b: usize) -> &[u16; GROUP] {
        let i = gb(self.kb, g, b) * GROUP;
        self.d[i..i + GROUP].first_chunk().unwrap_or(&[0; GROUP])
    }
}
