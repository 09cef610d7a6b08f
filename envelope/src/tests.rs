use super::*;

fn round_trip_setup(msg: &[u8]) -> (RequestPrivateKey, Vec<u8>, ReplyOpener) {
    let key = RequestPrivateKey::generate();
    let (sealed, opener) = seal_request(key.public_key(), msg).expect("seal");
    (key, sealed, opener)
}

#[test]
fn request_and_reply_round_trip() {
    let (key, sealed, opener) = round_trip_setup(b"hello loader");
    assert!(!sealed.windows(12).any(|w| w == b"hello loader"));
    let (pt, mut sealer) = open_request(&key, &sealed).expect("open");
    assert_eq!(pt.as_slice(), b"hello loader");
    let frames = [
        sealer.seal_chunk(b"hel").expect("chunk"),
        sealer.seal_chunk(b"lo").expect("chunk"),
        sealer.finish(ReplyStatus::Completed).expect("finish"),
    ];
    let (reply, status) = opener
        .open_all(frames.iter().map(Vec::as_slice))
        .expect("open reply");
    assert_eq!(reply.as_slice(), b"hello");
    assert_eq!(status, ReplyStatus::Completed);
}

#[test]
fn every_flipped_request_byte_is_refused() {
    let (key, sealed, _) = round_trip_setup(b"x");
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x01;
        assert!(
            open_request(&key, &bad).is_err(),
            "flip at byte {i} accepted"
        );
    }
}

#[test]
fn tampered_ciphertext_is_opaque_authentication_failure() {
    let (key, mut sealed, _) = round_trip_setup(b"secret prompt");
    let last = sealed.len() - 1;
    sealed[last] ^= 0x80;
    assert_eq!(
        open_request(&key, &sealed).unwrap_err(),
        EnvelopeError::AuthenticationFailed
    );
}

#[test]
fn wrong_key_is_named() {
    let (_, sealed, _) = round_trip_setup(b"x");
    let other = RequestPrivateKey::generate();
    assert!(matches!(
        open_request(&other, &sealed),
        Err(EnvelopeError::WrongKey { .. })
    ));
}

#[test]
fn header_errors_are_typed() {
    let (key, sealed, _) = round_trip_setup(b"x");
    let mut v = sealed.clone();
    v[0] = 9;
    assert_eq!(
        open_request(&key, &v).unwrap_err(),
        EnvelopeError::UnsupportedVersion(9)
    );
    let mut s = sealed.clone();
    s[2] = 0x20;
    assert!(matches!(
        open_request(&key, &s),
        Err(EnvelopeError::UnsupportedSuite(0x0020, 1, 2))
    ));
    assert_eq!(
        open_request(&key, &sealed[..5]).unwrap_err(),
        EnvelopeError::Truncated("suite")
    );
    assert_eq!(
        open_request(&key, &[]).unwrap_err(),
        EnvelopeError::Truncated("version")
    );
    // Cut inside the ciphertext's tag.
    let cut = &sealed[..sealed.len() - 17 + 1];
    assert!(open_request(&key, cut).is_err());
}

fn sealed_reply(n: usize) -> (ReplyOpener, Vec<Vec<u8>>) {
    let (key, sealed, opener) = round_trip_setup(b"x");
    let (_, mut sealer) = open_request(&key, &sealed).expect("open");
    let mut frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            sealer
                .seal_chunk(format!("chunk{i}").as_bytes())
                .expect("seal")
        })
        .collect();
    frames.push(sealer.finish(ReplyStatus::Completed).expect("finish"));
    (opener, frames)
}

#[test]
fn reordered_reply_is_refused() {
    let (opener, mut frames) = sealed_reply(3);
    frames.swap(0, 1);
    assert_eq!(
        opener
            .open_all(frames.iter().map(Vec::as_slice))
            .unwrap_err(),
        EnvelopeError::AuthenticationFailed
    );
}

#[test]
fn replayed_reply_chunk_is_refused() {
    let (opener, mut frames) = sealed_reply(2);
    let first = frames[0].clone();
    frames.insert(1, first);
    assert_eq!(
        opener
            .open_all(frames.iter().map(Vec::as_slice))
            .unwrap_err(),
        EnvelopeError::AuthenticationFailed
    );
}

#[test]
fn truncated_reply_is_refused() {
    let (opener, mut frames) = sealed_reply(2);
    frames.pop();
    assert_eq!(
        opener
            .open_all(frames.iter().map(Vec::as_slice))
            .unwrap_err(),
        EnvelopeError::ReplyTruncated
    );
}

#[test]
fn final_flag_flip_is_refused() {
    // Marking a data chunk as final (to cut the stream short) fails authentication.
    let (opener, mut frames) = sealed_reply(2);
    frames[1][0] = 1;
    frames.truncate(2);
    assert_eq!(
        opener
            .open_all(frames.iter().map(Vec::as_slice))
            .unwrap_err(),
        EnvelopeError::AuthenticationFailed
    );
}

#[test]
fn frame_after_end_is_refused() {
    let (mut opener, frames) = sealed_reply(1);
    for f in &frames {
        opener.open(f).expect("in order");
    }
    assert_eq!(
        opener.open(&frames[0]).unwrap_err(),
        EnvelopeError::FrameAfterEnd
    );
}

#[test]
fn reply_for_another_request_is_refused() {
    let (opener_a, _) = sealed_reply(1);
    let (_, frames_b) = sealed_reply(1);
    assert_eq!(
        opener_a
            .open_all(frames_b.iter().map(Vec::as_slice))
            .unwrap_err(),
        EnvelopeError::AuthenticationFailed
    );
}

#[test]
fn dev_key_file_round_trip_and_debug_hides_key() {
    let key = RequestPrivateKey::generate();
    let file = key.to_dev_key_file();
    assert!(file.contains("DEVELOPMENT-ONLY"));
    let back = RequestPrivateKey::from_dev_key_file(&file).expect("parse");
    assert_eq!(back.public_key(), key.public_key());
    let scalar = hex::encode(key.to_bytes().as_slice());
    assert!(!format!("{key:?}").contains(&scalar));
    assert!(matches!(
        RequestPrivateKey::from_dev_key_file("# nothing\n"),
        Err(EnvelopeError::MalformedKey(_))
    ));
    assert!(matches!(
        RequestPrivateKey::from_dev_key_file("cinfer-dev-request-key-v1 zz"),
        Err(EnvelopeError::MalformedKey("key is not hex"))
    ));
}

#[test]
fn public_key_round_trip() {
    let key = RequestPrivateKey::generate();
    let pk = RequestPublicKey::from_bytes(&key.public_key().to_bytes()).expect("pk");
    assert_eq!(&pk, key.public_key());
    assert_eq!(pk.key_id().len(), 16);
    assert!(RequestPublicKey::from_bytes(&[4u8; 65]).is_err());
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
fn random_bytes(state: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *state ^= *state >> 12;
            *state ^= *state << 25;
            *state ^= *state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn arbitrary_bytes_never_panic_and_never_open() {
    // The corpus/property test that CI runs; `fuzz/` has the coverage-guided twin.
    let key = RequestPrivateKey::generate();
    let (valid, _) = seal_request(key.public_key(), b"seed").expect("seal");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..3000 {
        let len = (i % 200) + (i % 7) * 13;
        let mut input = random_bytes(&mut state, len);
        // Half the inputs keep a valid header so the parser gets past it.
        if i % 2 == 0 && input.len() > 8 {
            let n = 8 + key.public_key().key_id().len();
            let cut = n.min(input.len());
            input[..cut].copy_from_slice(&valid[..cut]);
        }
        assert!(
            open_request(&key, &input).is_err(),
            "random input {i} opened"
        );
        let (_, mut opener) = seal_request(key.public_key(), b"x").expect("seal");
        assert!(opener.open(&input).is_err(), "random frame {i} opened");
    }
}

#[test]
fn every_truncation_of_a_reply_frame_is_refused() {
    let frame_len = sealed_reply(1).1[0].len();
    for cut in 0..frame_len {
        let (mut fresh, frames) = sealed_reply(1);
        assert!(
            fresh.open(&frames[0][..cut]).is_err(),
            "cut at {cut} opened"
        );
    }
}

#[test]
fn the_same_request_run_twice_gets_a_fresh_reply_key() {
    // A replay by the untrusted side: the loader opens the same sealed request
    // twice. Each run draws its own salt, so the two streams share no key and
    // nonce (the same plaintext seals to different bytes), and a frame from one
    // run never opens in the other's stream.
    let key = RequestPrivateKey::generate();
    let (sealed, opener) = seal_request(key.public_key(), b"hi").unwrap();
    let (_, mut a) = open_request(&key, &sealed).unwrap();
    let (_, mut b) = open_request(&key, &sealed).unwrap();
    let fa = a.seal_chunk(b"same reply").unwrap();
    let fb = b.seal_chunk(b"same reply").unwrap();
    assert_ne!(fa, fb);
    assert_ne!(
        fa[1 + REPLY_SALT_LEN..],
        fb[1 + REPLY_SALT_LEN..],
        "no keystream reuse"
    );
    let final_b = b.finish(ReplyStatus::Completed).unwrap();
    // The client opens run a's first frame, then run b's final frame: refused.
    let mut opener = opener;
    assert!(matches!(opener.open(&fa).unwrap(), ReplyChunk::Data(_)));
    assert_eq!(
        opener.open(&final_b),
        Err(EnvelopeError::AuthenticationFailed)
    );
}

#[test]
fn a_request_bound_to_a_program_names_it_and_the_binding_cannot_be_changed() {
    let key = RequestPrivateKey::generate();
    let program = [0x42u8; 32];
    let (sealed, opener) =
        seal_request_for_program(key.public_key(), &program, b"for one program").expect("seal");
    assert_eq!(sealed[0], REQUEST_VERSION_TIMED_BOUND);
    assert_eq!(request_program(&sealed).expect("parse"), Some(program));
    assert_eq!(
        request_key_id(&sealed).expect("parse"),
        key.public_key().key_id()
    );
    let (pt, sealer) = open_request(&key, &sealed).expect("open");
    assert_eq!(pt.as_slice(), b"for one program");
    let (reply, _) = opener
        .open_all(
            [sealer.finish(ReplyStatus::Completed).expect("finish")]
                .iter()
                .map(Vec::as_slice),
        )
        .expect("reply");
    assert!(reply.is_empty());

    // An unbound request names no program.
    let (_, plain, _) = round_trip_setup(b"x");
    assert_eq!(request_program(&plain).expect("parse"), None);

    // The untrusted side rebinds it to another program: it no longer opens.
    let digest_at = 1 + 6 + 1 + key.public_key().key_id().len();
    let mut rebound = sealed.clone();
    rebound[digest_at..digest_at + 32].copy_from_slice(&[0x43; 32]);
    assert_eq!(request_program(&rebound).expect("parse"), Some([0x43; 32]));
    assert!(matches!(
        open_request(&key, &rebound),
        Err(EnvelopeError::AuthenticationFailed)
    ));
    // ... or strips the binding (version 3, digest removed): it no longer opens.
    let mut stripped = sealed.clone();
    stripped[0] = REQUEST_VERSION_TIMED;
    stripped.drain(digest_at..digest_at + 32);
    assert_eq!(request_program(&stripped).expect("parse"), None);
    assert!(matches!(
        open_request(&key, &stripped),
        Err(EnvelopeError::AuthenticationFailed)
    ));
    // A truncated binding is a typed error.
    assert!(matches!(
        request_program(&sealed[..digest_at + 10]),
        Err(EnvelopeError::Truncated("program digest"))
    ));
}

#[test]
fn a_request_carries_its_seal_time_and_it_cannot_be_changed() {
    let key = RequestPrivateKey::generate();
    let (sealed, _) =
        seal_request_at(key.public_key(), None, 1_700_000_000_123, b"t").expect("seal");
    assert_eq!(sealed[0], REQUEST_VERSION_TIMED);
    assert_eq!(request_sealed_at(&sealed), Ok(Some(1_700_000_000_123)));
    // The untrusted side moves the time forward (to pass a replay window): it
    // no longer opens.
    let at = 1 + 6 + 1 + key.public_key().key_id().len();
    let mut moved = sealed.clone();
    moved[at..at + 8].copy_from_slice(&1_800_000_000_000u64.to_be_bytes());
    assert_eq!(request_sealed_at(&moved), Ok(Some(1_800_000_000_000)));
    assert_eq!(
        open_request(&key, &moved).map(|_| ()),
        Err(EnvelopeError::AuthenticationFailed)
    );
    // ... or strips it (version 1): it no longer opens either.
    let mut stripped = sealed.clone();
    stripped[0] = REQUEST_VERSION;
    stripped.drain(at..at + 8);
    assert_eq!(request_sealed_at(&stripped), Ok(None));
    assert_eq!(
        open_request(&key, &stripped).map(|_| ()),
        Err(EnvelopeError::AuthenticationFailed)
    );
    assert_eq!(
        request_sealed_at(&sealed[..at + 3]),
        Err(EnvelopeError::Truncated("seal time"))
    );
    // seal_request stamps the current time.
    let (now, _) = seal_request(key.public_key(), b"n").expect("seal");
    assert!(request_sealed_at(&now).expect("parse").expect("timed") > 1_700_000_000_000);
}

#[test]
fn frame_len_predicts_each_data_frame() {
    let rk = RequestPrivateKey::generate();
    let (sealed, _) = seal_request(rk.public_key(), b"hi").expect("seal");
    let (_, mut sealer) = open_request(&rk, &sealed).expect("open");
    // The first frame carries the salt, the next ones do not.
    for len in [0usize, 5, 4096, 7] {
        let want = sealer.frame_len(len);
        assert_eq!(
            sealer.seal_chunk(&vec![7u8; len]).expect("seal").len(),
            want
        );
    }
}
