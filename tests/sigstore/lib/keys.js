'use strict';
// Deterministic ECDSA P-256 test keys.
//
// Every key of the private test instance (Fulcio root, CT log, Rekor, the
// ephemeral signing keys, the cosign-style key pair) is derived from a fixed
// label, so regenerating the fixtures yields the same keys, key IDs and
// certificate/log names. ECDSA *signatures* still differ between runs: Node's
// crypto (OpenSSL) draws a random nonce and exposes no RFC 6979 mode.
//
// THESE KEYS ARE PUBLIC TEST KEYS. Anybody who reads this file can sign with
// them. Never put trusted_root.json from this directory into a production
// policy.

const crypto = require('crypto');

const P256_ORDER = BigInt(
  '0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551'
);
const DOMAIN = 'cinfer-sigstore-test-key/v1';

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

// Returns { privateKey, publicKey } as Node KeyObjects (P-256).
function deriveP256(label) {
  for (let ctr = 0; ; ctr++) {
    const d = crypto
      .createHash('sha256')
      .update(`${DOMAIN}/${label}/${ctr}`)
      .digest();
    const n = BigInt('0x' + d.toString('hex'));
    if (n === 0n || n >= P256_ORDER) continue;
    const ecdh = crypto.createECDH('prime256v1');
    ecdh.setPrivateKey(d);
    const pub = ecdh.getPublicKey(null, 'uncompressed'); // 0x04 || X || Y
    const jwk = {
      kty: 'EC',
      crv: 'P-256',
      d: b64url(d),
      x: b64url(pub.subarray(1, 33)),
      y: b64url(pub.subarray(33, 65)),
    };
    const privateKey = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
    const publicKey = crypto.createPublicKey(privateKey);
    return { privateKey, publicKey };
  }
}

function spkiDER(publicKey) {
  return publicKey.export({ format: 'der', type: 'spki' });
}

function spkiPEM(publicKey) {
  return publicKey.export({ format: 'pem', type: 'spki' }).toString();
}

function pkcs8PEM(privateKey) {
  return privateKey.export({ format: 'pem', type: 'pkcs8' }).toString();
}

// SHA-256 over the DER SubjectPublicKeyInfo: the Sigstore / RFC 6962 log ID
// and key ID convention.
function keyID(publicKey) {
  return crypto.createHash('sha256').update(spkiDER(publicKey)).digest();
}

// A Signer for @sigstore/sign that holds a fixed key (used both as the
// "ephemeral" key behind a Fulcio certificate and for the key-based path).
class FixedKeySigner {
  constructor(keyPair, hint) {
    this.keyPair = keyPair;
    this.hint = hint;
  }

  async sign(data) {
    const signature = crypto.sign('sha256', data, this.keyPair.privateKey);
    return {
      signature,
      key: {
        $case: 'publicKey',
        publicKey: spkiPEM(this.keyPair.publicKey),
        hint: this.hint,
      },
    };
  }
}

// RFC 7468 PEM with 64-column lines (the mock writes base64 on one line).
function derToPEM(der, label) {
  const b64 = Buffer.from(der).toString('base64');
  const lines = b64.match(/.{1,64}/g) || [];
  return `-----BEGIN ${label}-----\n${lines.join('\n')}\n-----END ${label}-----\n`;
}

module.exports = {
  deriveP256,
  spkiDER,
  spkiPEM,
  pkcs8PEM,
  keyID,
  FixedKeySigner,
  derToPEM,
};
