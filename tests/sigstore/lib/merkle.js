'use strict';
// RFC 6962 / RFC 9162 Merkle tree hashing and inclusion proofs (SHA-256).

const crypto = require('crypto');

function sha256(...parts) {
  const h = crypto.createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
}

const leafHash = (data) => sha256(Buffer.from([0x00]), data);
const nodeHash = (l, r) => sha256(Buffer.from([0x01]), l, r);

// Largest power of two strictly smaller than n (n >= 2).
function splitPoint(n) {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

// MTH over leaves[lo, hi) where leaves are already leaf hashes.
function rootOf(leaves, lo = 0, hi = leaves.length) {
  const n = hi - lo;
  if (n === 0) return sha256(Buffer.alloc(0));
  if (n === 1) return leaves[lo];
  const k = splitPoint(n);
  return nodeHash(rootOf(leaves, lo, lo + k), rootOf(leaves, lo + k, hi));
}

// PATH(m, D[lo:hi]) of RFC 6962 section 2.1.1, ordered from the leaf upwards.
function inclusionPath(leaves, m, lo = 0, hi = leaves.length) {
  const n = hi - lo;
  if (n <= 1) return [];
  const k = splitPoint(n);
  if (m < k) {
    return [
      ...inclusionPath(leaves, m, lo, lo + k),
      rootOf(leaves, lo + k, hi),
    ];
  }
  return [...inclusionPath(leaves, m - k, lo + k, hi), rootOf(leaves, lo, lo + k)];
}

// Verification as clients do it (RFC 9162 section 2.1.3.2); used as a
// self-check of the generator.
function verifyInclusion(leaf, index, size, path, root) {
  if (index >= size) return false;
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of path) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 && r.equals(root);
}

module.exports = { sha256, leafHash, nodeHash, rootOf, inclusionPath, verifyInclusion };
