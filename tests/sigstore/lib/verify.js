'use strict';
// Self-check of generated fixtures with sigstore-js (@sigstore/verify): the
// generator refuses to write a fixture set in which a good bundle does not
// verify. This is the *same* ecosystem as the signer; the independent check
// is crosscheck.py (sigstore-python).

const crypto = require('crypto');
const { TrustedRoot } = require('@sigstore/protobuf-specs');
const { bundleFromJSON } = require('@sigstore/bundle');
const { toTrustMaterial, toSignedEntity, Verifier } = require('@sigstore/verify');

// fixture: { bundle (JSON object), artifact (Buffer), policy }
// policy: { issuer, subject } for keyless, { publicKeyPEM } for key-based.
function verifyBundle(trustedRootJSON, bundleJSON, artifact, policy) {
  const root = TrustedRoot.fromJSON(trustedRootJSON);
  let keys;
  if (policy.publicKeyPEM) {
    const hint = bundleJSON.verificationMaterial.publicKey.hint;
    const der = crypto.createPublicKey(policy.publicKeyPEM).export({ format: 'der', type: 'spki' });
    keys = {
      [hint]: {
        rawBytes: der,
        keyDetails: 'PKIX_ECDSA_P256_SHA_256',
        validFor: { start: new Date(0) },
      },
    };
  }
  const verifier = new Verifier(toTrustMaterial(root, keys));
  const entity = toSignedEntity(bundleFromJSON(bundleJSON), artifact);
  const p = policy.publicKeyPEM
    ? undefined
    : { subjectAlternativeName: policy.subject, extensions: { issuer: policy.issuer } };
  return verifier.verify(entity, p);
}

function verifyDetached(sigB64, artifact, publicKeyPEM) {
  return crypto.verify('sha256', artifact, publicKeyPEM, Buffer.from(sigB64.trim(), 'base64'));
}

// Returns { ok: boolean, error?: string }.
function check(fn) {
  try {
    const r = fn();
    if (r === false) return { ok: false, error: 'signature verification failed' };
    return { ok: true };
  } catch (e) {
    return { ok: false, error: `${e.code ? e.code + ': ' : ''}${e.message}` };
  }
}

module.exports = { verifyBundle, verifyDetached, check };
