'use strict';
// A private, deterministic Sigstore test instance built on @sigstore/mock:
// a Fulcio-style CA, a CT log and a Rekor (v1 API) log, plus the matching
// trusted_root.json.
//
// What is taken from @sigstore/mock as is: certificate issuance with embedded
// SCT (fulcioHandler / CA), the CT log that signs the SCT, the Rekor handler
// that canonicalises the proposed entry and signs the SET and checkpoint.
//
// What this file adds or overrides (see README.md, "Limits of the mocks"):
//   * fixed keys (lib/keys.js) instead of fresh random ones;
//   * a root certificate with a fixed validity window (the mock's starts "now",
//     which makes any certificate issued at a fixed past time unchainable);
//   * a clock per signing, so the certificate, SCT and log entry carry chosen
//     times (needed for deterministic fixtures and the expired / not-yet-valid
//     negatives);
//   * the Rekor entry is re-anchored in a larger Merkle tree: the mock logs
//     every entry as the single leaf of a tree of size 1 (inclusion proof
//     without any hash, proof index 0 whatever the entry's log index), so a
//     verifier's Merkle path code would never run. We keep an append-only log
//     per instance (filler leaves stand for other people's entries), append
//     the entry, and re-sign the checkpoint and the SET with the same Rekor
//     key. All checkpoints of one run are thus consistent with each other.

require('reflect-metadata');
const crypto = require('crypto');
const { Crypto } = require('@peculiar/webcrypto');
const x509 = require('@peculiar/x509');
const { initializeCA, initializeCTLog, initializeTLog } = require('@sigstore/mock');
const { keyObjectToCryptoKey } = require('@sigstore/mock/dist/util/key');

const { deriveP256, spkiDER, keyID } = require('./keys');
const merkle = require('./merkle');

// The mock CA writes this issuer DN into every leaf it issues (hard-coded in
// @sigstore/mock/dist/fulcio/ca.js), so the root must carry the same subject.
const MOCK_CA_DN = 'CN=sigstore,O=sigstore.mock';

const TRUSTED_ROOT_MEDIA_TYPE =
  'application/vnd.dev.sigstore.trustedroot+json;version=0.1';

// Hosts under the reserved .test TLD: nothing here can resolve, and nock
// intercepts every request anyway (net connect is disabled).
const URLS = {
  fulcio: 'https://fulcio.cinfer.test',
  rekor: 'https://rekor.cinfer.test',
  ctlog: 'https://ctfe.cinfer.test',
};

// Validity of the test instance: root certificate and trusted_root validFor.
const INSTANCE_START = new Date('2025-01-01T00:00:00Z');
const INSTANCE_END = new Date('2035-01-01T00:00:00Z');

async function createRoot(cryptoKeyPair, webcrypto, serial) {
  return x509.X509CertificateGenerator.createSelfSigned(
    {
      serialNumber: serial,
      name: MOCK_CA_DN,
      notBefore: INSTANCE_START,
      notAfter: INSTANCE_END,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-384' },
      keys: cryptoKeyPair,
      extensions: [
        new x509.BasicConstraintsExtension(true, undefined, true),
        new x509.KeyUsagesExtension(
          x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.keyCertSign,
          true
        ),
        await x509.SubjectKeyIdentifierExtension.create(
          cryptoKeyPair.publicKey,
          false,
          webcrypto
        ),
        await x509.AuthorityKeyIdentifierExtension.create(
          cryptoKeyPair.publicKey,
          false,
          webcrypto
        ),
      ],
    },
    webcrypto
  );
}

// One Sigstore "instance": keys derived from `name`.
class Instance {
  constructor(name) {
    this.name = name;
    this.webcrypto = new Crypto();
    this.caKeys = deriveP256(`${name}/fulcio-root`);
    this.ctKeys = deriveP256(`${name}/ctlog`);
    this.rekorKeys = deriveP256(`${name}/rekor`);
    this.rootCert = null; // @peculiar/x509 X509Certificate
  }

  async init(rootDER) {
    const cryptoKeyPair = {
      privateKey: await keyObjectToCryptoKey(this.caKeys.privateKey),
      publicKey: await keyObjectToCryptoKey(this.caKeys.publicKey),
    };
    this.caCryptoKeys = cryptoKeyPair;
    if (rootDER) {
      // Reuse a root that is already pinned in a trusted_root.json.
      this.rootCert = new x509.X509Certificate(rootDER);
      const pinned = Buffer.from(this.rootCert.publicKey.rawData);
      if (!pinned.equals(spkiDER(this.caKeys.publicKey))) {
        throw new Error(`pinned root certificate does not belong to instance ${this.name}`);
      }
    } else {
      // Serial: 16 bytes derived from the instance name (positive).
      const serial = crypto.createHash('sha256').update(`${this.name}/root-serial`).digest('hex').slice(0, 32);
      this.rootCert = await createRoot(cryptoKeyPair, this.webcrypto, '01' + serial.slice(2));
    }
    return this;
  }

  get rootDER() {
    return Buffer.from(this.rootCert.rawData);
  }

  // A CA from @sigstore/mock, but with our root certificate and a clock.
  // The mock's initializeCA() always mints a fresh root valid from "now"; we
  // call it once and reuse its (unexported) class with our root.
  async ca(clock, ctlog) {
    const probe = await initializeCA(this.caKeys, ctlog, clock);
    const CAImpl = probe.constructor;
    const ca = new CAImpl({
      keyPair: this.caCryptoKeys,
      rootCertificate: this.rootCert,
      ctLog: ctlog,
      clock,
    });
    if (!ca.rootCertificate.equals(this.rootDER) || typeof ca.issueCertificate !== 'function') {
      throw new Error('@sigstore/mock CA internals changed; update lib/instance.js');
    }
    return ca;
  }

  ctlog(clock) {
    return initializeCTLog(this.ctKeys, clock);
  }

  tlog(clock) {
    return initializeTLog(URLS.rekor, this.rekorKeys, clock);
  }

  get rekorLogID() {
    return keyID(this.rekorKeys.publicKey);
  }

  get ctLogID() {
    return keyID(this.ctKeys.publicKey);
  }

  // The log's state: leaf hashes of an append-only Merkle tree. Entries that
  // are not ours are fixed filler leaves ("other people's entries").
  startLog(firstIndex) {
    this.logLeaves = [];
    this.appendFillers(firstIndex);
    return this;
  }

  appendFillers(count) {
    for (let i = 0; i < count; i++) {
      const idx = this.logLeaves.length;
      this.logLeaves.push(merkle.leafHash(Buffer.from(`cinfer test rekor filler entry ${idx}`)));
    }
  }

  // Rewrite a mock Rekor v1 response: append the entry to this instance's
  // log (after startLog()), then `trailing` filler entries, and answer with
  // the inclusion proof against the resulting tree, a checkpoint and a SET
  // signed with this instance's Rekor key.
  reanchor(responseJSON, { trailing = 3 } = {}) {
    const resp = JSON.parse(responseJSON);
    const [[, entry]] = Object.entries(resp);
    if (!this.logLeaves) throw new Error('startLog() first');

    const body = Buffer.from(entry.body, 'base64');
    const logIndex = this.logLeaves.length;
    this.logLeaves.push(merkle.leafHash(body));
    this.appendFillers(trailing);
    const leaves = this.logLeaves;
    const treeSize = leaves.length;
    const root = merkle.rootOf(leaves);
    const path = merkle.inclusionPath(leaves, logIndex);
    if (!merkle.verifyInclusion(leaves[logIndex], logIndex, treeSize, path, root)) {
      throw new Error('internal error: inclusion proof does not verify');
    }

    const logID = this.rekorLogID;
    if (entry.logID !== logID.toString('hex')) {
      throw new Error('mock Rekor answered with an unexpected log ID');
    }
    const host = new URL(URLS.rekor).host;
    const treeID = BigInt('0x' + crypto.createHash('sha256').update(`${this.name}/rekor-tree`).digest('hex').slice(0, 15));
    const note = [
      `${host} - ${treeID}`,
      `${treeSize}`,
      root.toString('base64'),
      `Timestamp: ${BigInt(entry.integratedTime) * 1000000000n}`,
      '',
    ].join('\n');
    const noteSig = crypto.sign('sha256', Buffer.from(note), this.rekorKeys.privateKey);
    const checkpoint = `${note}\n\u2014 ${host} ${Buffer.concat([logID.subarray(0, 4), noteSig]).toString('base64')}\n`;

    // SET: signature over the RFC 8785 canonical JSON of these four fields
    // (keys in lexicographic order; all values are plain strings/integers).
    const setPayload = JSON.stringify({
      body: entry.body,
      integratedTime: entry.integratedTime,
      logID: entry.logID,
      logIndex,
    });
    const set = crypto.sign('sha256', Buffer.from(setPayload), this.rekorKeys.privateKey);

    // Rekor's entry UUID is the leaf hash.
    const uuid = leaves[logIndex].toString('hex');
    return JSON.stringify({
      [uuid]: {
        body: entry.body,
        integratedTime: entry.integratedTime,
        logID: entry.logID,
        logIndex,
        verification: {
          inclusionProof: {
            logIndex,
            treeSize,
            rootHash: root.toString('hex'),
            hashes: path.map((h) => h.toString('hex')),
            checkpoint,
          },
          signedEntryTimestamp: set.toString('base64'),
        },
      },
    });
  }
}

function iso(d) {
  return d.toISOString().replace(/\.000Z$/, 'Z');
}

function tlogInstance(baseUrl, publicKey) {
  return {
    baseUrl,
    hashAlgorithm: 'SHA2_256',
    publicKey: {
      rawBytes: spkiDER(publicKey).toString('base64'),
      keyDetails: 'PKIX_ECDSA_P256_SHA_256',
      validFor: { start: iso(INSTANCE_START) },
    },
    logId: { keyId: keyID(publicKey).toString('base64') },
  };
}

// trusted_root.json (protobuf-specs TrustedRoot, JSON mapping, media type
// 0.1) with every field written out explicitly, in the layout of the public
// good instance's file. The mock's own (unexported) trust-root helper relies
// on protobuf JSON serialisation, which drops default values (empty
// timestampAuthorities, media type, ...) and some parsers reject that.
function trustedRoot(instance) {
  return {
    mediaType: TRUSTED_ROOT_MEDIA_TYPE,
    tlogs: [tlogInstance(URLS.rekor, instance.rekorKeys.publicKey)],
    certificateAuthorities: [
      {
        subject: { organization: 'sigstore.mock', commonName: 'sigstore' },
        uri: URLS.fulcio,
        certChain: {
          certificates: [{ rawBytes: instance.rootDER.toString('base64') }],
        },
        validFor: { start: iso(INSTANCE_START) },
      },
    ],
    ctlogs: [tlogInstance(URLS.ctlog, instance.ctKeys.publicKey)],
    timestampAuthorities: [],
  };
}

// ClientTrustConfig for the sigstore-python CLI (`--trust-config`), which
// wants a trusted root and a signing config together.
function clientTrustConfig(instance) {
  const service = (url) => ({
    url,
    majorApiVersion: 1,
    validFor: { start: iso(INSTANCE_START) },
    operator: 'cinfer-test',
  });
  return {
    mediaType: 'application/vnd.dev.sigstore.clienttrustconfig.v0.1+json',
    trustedRoot: trustedRoot(instance),
    signingConfig: {
      mediaType: 'application/vnd.dev.sigstore.signingconfig.v0.2+json',
      caUrls: [service(URLS.fulcio)],
      oidcUrls: [],
      rekorTlogUrls: [service(URLS.rekor)],
      rekorTlogConfig: { selector: 'ANY' },
      tsaUrls: [],
      tsaConfig: { selector: 'ANY' },
    },
  };
}

module.exports = {
  Instance,
  URLS,
  INSTANCE_START,
  INSTANCE_END,
  MOCK_CA_DN,
  TRUSTED_ROOT_MEDIA_TYPE,
  trustedRoot,
  clientTrustConfig,
  iso,
};
