//! The request service: peers on the channel, admitted programs, runs and
//! their receipts.

use super::config::unix_millis_now;
use super::*;

/// A serving loader: the attestor, the wasmtime loader, the admitted programs and
/// the sealed models waiting for their keys.
pub struct Service {
    attestor: Attestor,
    loader: Arc<Loader>,
    policy_sha256: String,
    /// What is served now: the configured programs and this peer's uploads.
    programs: HashMap<String, Arc<AdmittedProgram>>,
    program_list: Vec<ProgramInfo>,
    /// The configured programs, restored when a peer leaves (its uploads go with it).
    configured: (HashMap<String, Arc<AdmittedProgram>>, Vec<ProgramInfo>),
    peers: crate::peer::PeerPolicy,
    sealed_models: Vec<(String, std::fs::File)>,
    model_sha256: Arc<RwLock<BTreeMap<String, String>>>,
    max_frame: u32,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    draining: Arc<AtomicBool>,
    replay: Arc<Mutex<ReplayWindow>>,
    running: Running,
}

/// The cancellation flags of the requests running now, by request id.
type Running = Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>>;

/// A running request's entry in [`Running`], removed on drop.
struct RunningEntry {
    running: Running,
    id: u64,
    flag: Arc<AtomicBool>,
}

impl RunningEntry {
    fn register(running: &Running, id: u64) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, flag.clone());
        Self {
            running: running.clone(),
            id,
            flag,
        }
    }
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this run's entry (a peer may reuse an id once it finished).
        if running
            .get(&self.id)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flag))
        {
            running.remove(&self.id);
        }
    }
}

/// One running request's slot in the in-flight count, given back on drop.
struct InFlight {
    counter: Arc<AtomicUsize>,
    /// The count including this request.
    count: usize,
}

impl InFlight {
    fn take(counter: &Arc<AtomicUsize>) -> Self {
        let count = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Self {
            counter: counter.clone(),
            count,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lets another thread stop a [`Service`] taking requests and wait for the
/// ones running to finish (graceful shutdown).
#[derive(Debug, Clone)]
pub struct DrainHandle {
    draining: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
}

impl DrainHandle {
    /// Refuses new requests from now on, then waits until none is running or
    /// `grace` has passed; returns how many were still running.
    pub fn drain(&self, grace: std::time::Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + grace;
        loop {
            let running = self.in_flight.load(Ordering::SeqCst);
            if running == 0 || std::time::Instant::now() >= deadline {
                return running;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("attestor", &self.attestor)
            .field("programs", &self.program_list)
            .finish_non_exhaustive()
    }
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(w: &SharedWriter, kind: Kind, payload: &[u8], max: u32) -> Result<(), FrameError> {
    let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
    cinfer_channel::write_frame(&mut *w, kind, payload, max)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn error_json(e: &impl std::fmt::Display) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": e.to_string() })).unwrap_or_default()
}

fn outcome_name(o: &RunOutcome) -> &'static str {
    match o {
        RunOutcome::Completed => "completed",
        RunOutcome::ProgramFailed => "program-failed",
        RunOutcome::Aborted(AbortReason::Cancelled) => "cancelled",
        RunOutcome::Aborted(_) => "aborted",
        RunOutcome::Refused => "refused",
    }
}

impl Service {
    /// Admits the configured programs (read through `dir`, the configuration's
    /// directory) and opens the sealed model files. Fails on the first program
    /// the policy refuses.
    pub fn new(
        attestor: Attestor,
        policy: Policy,
        config: &ServeConfig,
        dir: &crate::dir::Dir,
    ) -> Result<Self, ServeError> {
        let policy_sha256 = hex::encode(policy.digest());
        policy
            .check_backend(&config.backend)
            .map_err(ConfigError::BackendNotAllowed)?;
        let backend =
            crate::backend::backend_from_name(&config.backend).map_err(ConfigError::Backend)?;
        let loader = Arc::new(
            Loader::new(
                policy,
                LoaderConfig {
                    backend,
                    batching: config.batching,
                    ..LoaderConfig::default()
                },
            )
            .map_err(ConfigError::Loader)?,
        );
        let read = |path: &str| {
            dir.read(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let mut programs = HashMap::new();
        let mut program_list = Vec::new();
        for p in &config.programs {
            let name = p.name.clone().unwrap_or_else(|| {
                p.path
                    .rsplit('/')
                    .next()
                    .unwrap_or(&p.path)
                    .trim_end_matches(".wasm")
                    .to_owned()
            });
            let bytes = read(&p.path)?;
            let sigs = p
                .signatures
                .iter()
                .map(|s| read(s))
                .collect::<Result<Vec<_>, _>>()?;
            let admitted = if sigs.is_empty() {
                loader.admit(&bytes)
            } else {
                let refs: Vec<&[u8]> = sigs.iter().map(Vec::as_slice).collect();
                loader.admit_signatures(&bytes, &refs)
            }
            .map_err(|source| ConfigError::Program {
                name: name.clone(),
                source,
            })?;
            program_list.push(ProgramInfo {
                name: name.clone(),
                sha256: hex::encode(admitted.grant().digest),
                world: admitted.grant().world.clone(),
            });
            if programs.insert(name.clone(), admitted).is_some() {
                return Err(ConfigError::DuplicateProgram(name).into());
            }
        }
        let mut sealed_models = Vec::new();
        for m in &config.models {
            let f = dir.open(&m.path).map_err(|source| ConfigError::OpenModel {
                path: m.path.clone(),
                source,
            })?;
            sealed_models.push((m.id.clone(), f));
        }
        Ok(Self {
            attestor,
            loader,
            policy_sha256,
            configured: (programs.clone(), program_list.clone()),
            programs,
            program_list,
            peers: config.peer_policy()?,
            sealed_models,
            model_sha256: Arc::default(),
            max_frame: config.max_frame_bytes,
            max_in_flight: config.max_in_flight,
            in_flight: Arc::default(),
            draining: Arc::default(),
            replay: Arc::new(Mutex::new(ReplayWindow::new(
                std::time::Duration::from_secs(config.request_max_age_secs),
                std::time::Duration::from_secs(config.request_clock_skew_secs),
                unix_millis_now(),
                ReplayWindow::DEFAULT_CAPACITY,
            ))),
            running: Arc::default(),
        })
    }

    /// A handle for graceful shutdown.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle {
            draining: self.draining.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// The attestation side.
    pub fn attestor(&self) -> &Attestor {
        &self.attestor
    }

    /// Installs a key release all or nothing: verified and unwrapped first,
    /// then every configured model whose key is installed or arriving is
    /// opened; only when all open are the keys installed and the models served.
    fn install_release(&mut self, payload: &[u8]) -> Result<Frame, ServeError> {
        let staged = self.attestor.stage(payload)?;
        let mut models = self.attestor.keys.models.clone();
        models.extend(
            staged
                .keys()
                .models
                .iter()
                .map(|(id, k)| (id.clone(), k.clone())),
        );
        let (store, digests) = self.open_models(&models)?;
        let answer = self.attestor.commit(staged);
        self.loader.set_models(store);
        *self
            .model_sha256
            .write()
            .unwrap_or_else(PoisonError::into_inner) = digests;
        Ok(answer)
    }

    /// Opens every configured model whose key is in `keys`.
    #[allow(clippy::type_complexity)]
    fn open_models(
        &self,
        keys: &BTreeMap<String, ModelKey>,
    ) -> Result<(ModelStore, BTreeMap<String, String>), ServeError> {
        let mut store = ModelStore::default();
        let mut digests = BTreeMap::new();
        for (id, file) in &self.sealed_models {
            let Some(key) = keys.get(id) else {
                continue;
            };
            let source = file
                .try_clone()
                .map_err(|source| ConfigError::ReopenModel {
                    id: id.clone(),
                    source,
                })?;
            let model =
                SealedGguf::open(Box::new(source), key).map_err(|e| ServeError::BadKey {
                    kind: ReleasedKeyKind::Model,
                    id: id.clone(),
                    reason: BadKeyReason::SealedFile(e),
                })?;
            if model.model_id() != id {
                return Err(ServeError::BadKey {
                    kind: ReleasedKeyKind::Model,
                    id: id.clone(),
                    reason: BadKeyReason::OtherModel(model.model_id().to_owned()),
                });
            }
            digests.insert(id.clone(), hex::encode(model.plaintext_sha256()));
            store.insert(id.clone(), Arc::new(model));
        }
        Ok((store, digests))
    }

    /// Serves one peer until it hangs up, sends a malformed frame, fails to
    /// authenticate or goes idle ([`crate::peer`]). Requests run on their own
    /// threads; their frames interleave with other answers. When the peer
    /// leaves, its running requests are cancelled and its uploaded programs are
    /// no longer served.
    pub fn serve_connection(
        &mut self,
        reader: impl PeerStream,
        writer: Box<dyn Write + Send>,
    ) -> Result<(), ServeError> {
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        let mut reader = DeadlineReader::new(reader);
        let served = self.serve_peer(&mut reader, &writer);
        if let Err(e @ ServeError::Peer(_)) = &served {
            // Say why before hanging up (best effort: the peer may be gone).
            let _ = send(&writer, Kind::Error, &error_json(e), self.max_frame);
        }
        // The peer is gone: nobody can receive what running requests produce.
        {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            for flag in running.values() {
                flag.store(true, Ordering::Relaxed);
            }
            if !running.is_empty() {
                tracing::info!(
                    requests = running.len(),
                    "peer gone: running requests cancelled"
                );
            }
        }
        // Its uploads go with it: a name it replaced serves the configured program again.
        let uploaded = self
            .program_list
            .iter()
            .filter(|p| {
                !self
                    .configured
                    .1
                    .iter()
                    .any(|c| c.sha256 == p.sha256 && c.name == p.name)
            })
            .count();
        if uploaded > 0 {
            tracing::info!(
                programs = uploaded,
                "peer gone: the programs it uploaded are no longer served"
            );
        }
        self.programs = self.configured.0.clone();
        self.program_list = self.configured.1.clone();
        served
    }

    fn serve_peer<R: PeerStream>(
        &mut self,
        reader: &mut DeadlineReader<R>,
        writer: &SharedWriter,
    ) -> Result<(), ServeError> {
        let max = self.max_frame;
        let challenge = if self.peers.authenticates() {
            Some(crate::peer::PeerPolicy::challenge()?)
        } else {
            None
        };
        let hello = self.attestor.hello(
            &self.program_list,
            challenge.as_ref(),
            self.peers.idle_timeout,
        );
        send(writer, hello.kind, &hello.payload, max)?;
        if let Some(challenge) = &challenge {
            let timeout_ms = millis(self.peers.auth_timeout);
            reader.deadline_in(self.peers.auth_timeout);
            let frame = match cinfer_channel::read_frame(&mut *reader, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Err(PeerError::ClosedBeforeAuth.into()),
                Err(FrameError::Io(e)) if DeadlineReader::<R>::is_timeout(&e) => {
                    return Err(PeerError::AuthTimeout { timeout_ms }.into());
                }
                Err(e) => return Err(e.into()),
            };
            if frame.kind != Kind::Auth {
                return Err(PeerError::NotAuth(frame.kind).into());
            }
            let key = self.peers.verify(challenge, &frame.payload)?;
            tracing::info!(key = %key, "peer authenticated");
            send(
                writer,
                Kind::Authenticated,
                &serde_json::to_vec(&serde_json::json!({ "key": key })).unwrap_or_default(),
                max,
            )?;
        }
        self.serve_frames(reader, writer)
    }

    fn serve_frames<R: PeerStream>(
        &mut self,
        reader: &mut DeadlineReader<R>,
        writer: &SharedWriter,
    ) -> Result<(), ServeError> {
        let max = self.max_frame;
        loop {
            reader.deadline_in(self.peers.idle_timeout);
            let frame = match cinfer_channel::read_frame(&mut *reader, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) if DeadlineReader::<R>::is_timeout(&e) => {
                    return Err(PeerError::Idle {
                        timeout_ms: millis(self.peers.idle_timeout),
                    }
                    .into());
                }
                Err(e) => return Err(e.into()),
            };
            match frame.kind {
                Kind::Ping => {}
                Kind::Submit => self.submit(&frame.payload, writer),
                Kind::Cancel => {
                    let Ok(id) = <[u8; 8]>::try_from(frame.payload.as_slice()) else {
                        send(
                            writer,
                            Kind::Error,
                            &error_json(&"malformed Cancel frame"),
                            max,
                        )?;
                        continue;
                    };
                    let id = u64::from_be_bytes(id);
                    let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                    match running.get(&id) {
                        Some(flag) => {
                            flag.store(true, Ordering::Relaxed);
                            tracing::info!(request = id, "request cancelled by the peer");
                        }
                        None => tracing::debug!(request = id, "cancel for no running request"),
                    }
                }
                Kind::Program => {
                    let answer = match self.upload(&frame.payload) {
                        Ok(info) => Frame {
                            kind: Kind::Admitted,
                            payload: serde_json::to_vec(&info).unwrap_or_default(),
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "program refused");
                            Frame {
                                kind: Kind::Error,
                                payload: error_json(&e),
                            }
                        }
                    };
                    send(writer, answer.kind, &answer.payload, max)?;
                }
                _ => {
                    let answer = if frame.kind == Kind::KeyRelease {
                        self.install_release(&frame.payload)
                    } else {
                        self.attestor.handle(&frame)
                    };
                    let answer = answer.unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "frame refused");
                        Frame {
                            kind: Kind::Error,
                            payload: error_json(&e),
                        }
                    });
                    send(writer, answer.kind, &answer.payload, max)?;
                }
            }
        }
    }

    /// Admits a program the peer stores and submits (`Program` frame): the
    /// policy decides, as for configured programs (by its signatures, else by
    /// digest). A later upload under the same name replaces the earlier one,
    /// for as long as this peer stays connected.
    fn upload(&mut self, payload: &[u8]) -> Result<ProgramInfo, ServeError> {
        let p = cinfer_channel::ProgramUpload::decode(payload)
            .ok_or(ServeError::MalformedProgramFrame)?;
        let admitted = if p.signatures.is_empty() {
            self.loader.admit(&p.component)
        } else {
            let refs: Vec<&[u8]> = p.signatures.iter().map(Vec::as_slice).collect();
            self.loader.admit_signatures(&p.component, &refs)
        }
        .map_err(|source| ServeError::ProgramRefused {
            name: p.name.clone(),
            source,
        })?;
        let info = ProgramInfo {
            name: p.name.clone(),
            sha256: hex::encode(admitted.grant().digest),
            world: admitted.grant().world.clone(),
        };
        tracing::info!(program = %p.name, sha256 = %info.sha256, world = %info.world, "program admitted from the peer");
        self.program_list.retain(|i| i.name != p.name);
        self.program_list.push(info.clone());
        self.programs.insert(p.name, admitted);
        Ok(info)
    }

    fn submit(&mut self, payload: &[u8], writer: &SharedWriter) {
        let max = self.max_frame;
        let Some(submit) = Submit::decode(payload) else {
            let _ = send(
                writer,
                Kind::Error,
                &error_json(&"malformed Submit frame"),
                max,
            );
            return;
        };
        let id = submit.request_id;
        let refuse = |why: String| {
            tracing::info!(request = id, reason = %why, "request refused");
            let _ = send(
                writer,
                Kind::Refused,
                &cinfer_channel::with_request_id(id, &error_json(&why)),
                max,
            );
        };
        let Some(program) = self.programs.get(&submit.program).cloned() else {
            return refuse(format!("unknown program {:?}", submit.program));
        };
        let key_id = match cinfer_envelope::request_key_id(&submit.sealed) {
            Ok(k) => k.to_owned(),
            Err(e) => return refuse(format!("malformed request: {e}")),
        };
        // A request the client bound to one component runs on that one only
        // (the binding is authenticated when the request opens).
        match cinfer_envelope::request_program(&submit.sealed) {
            Ok(Some(bound)) if bound != program.grant().digest => {
                return refuse(format!(
                    "the request is bound to program sha256 {}, not to {:?} (sha256 {})",
                    hex::encode(bound),
                    submit.program,
                    hex::encode(program.grant().digest)
                ));
            }
            Ok(_) => {}
            Err(e) => return refuse(format!("malformed request: {e}")),
        }
        let Some(RequestKeys {
            request: key,
            receipt: receipt_key,
            keyservers,
        }) = self.attestor.keys.request.get(&key_id).cloned()
        else {
            return refuse(format!(
                "no request key {key_id} (not attested yet, or sealed to another keyserver's key)"
            ));
        };
        // Counted before the drain check, so a drain never sees 0 while one starts;
        // the guard gives the slot back however the worker ends.
        let slot = InFlight::take(&self.in_flight);
        if self.draining.load(Ordering::SeqCst) {
            return refuse("shutting down: not taking new requests".into());
        }
        if slot.count > self.max_in_flight {
            return refuse(format!("busy: {} requests in flight", self.max_in_flight));
        }
        if self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
        {
            // Two runs under one id could not be told apart (replies, Cancel).
            return refuse(format!("request id {id} is already running"));
        }
        // Replays: a request outside the replay window is refused here; one
        // inside it is recorded only once its envelope opened (below), so junk
        // copying a real header never takes a place in the window.
        let sealed_at = match cinfer_envelope::request_sealed_at(&submit.sealed) {
            Ok(t) => t,
            Err(e) => return refuse(format!("malformed request: {e}")),
        };
        if let Err(e) = self
            .replay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check_time(sealed_at, unix_millis_now())
        {
            return refuse(e.to_string());
        }
        let request_sha256: [u8; 32] = Sha256::digest(&submit.sealed).into();
        let replay = self.replay.clone();
        let record = move || {
            replay
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(request_sha256, sealed_at, unix_millis_now())
                .map_err(crate::loader::RequestError::from)
        };
        let (loader, writer) = (self.loader.clone(), writer.clone());
        let entry = RunningEntry::register(&self.running, id);
        // The model digests the receipt names, as they are when the run starts.
        let model_digests = self
            .model_sha256
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let policy_sha256 = self.policy_sha256.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("request-{id}"))
            .spawn(move || {
                let _slot = slot;
                let cancel = entry.flag.clone();
                let _entry = entry;
                let hasher = Arc::new(Mutex::new(cinfer_attest::ReplyDigest::default()));
                let (h, w) = (hasher.clone(), writer.clone());
                let sink: FrameSink = Box::new(move |frame: Vec<u8>| {
                    h.lock().unwrap_or_else(PoisonError::into_inner).update(&frame);
                    let _ = send(&w, Kind::Reply, &cinfer_channel::with_request_id(id, &frame), max);
                });
                let options = crate::RunOptions::default()
                    .stream_to(sink)
                    .cancel_on(cancel)
                    .on_opened(record);
                let answer = match loader.run(&program, &submit.sealed, &key, options) {
                    Ok(report) => {
                        let (digest, frames) = {
                            let h = hasher.lock().unwrap_or_else(PoisonError::into_inner);
                            (h.finish(), h.frames())
                        };
                        let receipt = Receipt {
                            receipt_type: cinfer_attest::RECEIPT_TYPE.into(),
                            request_sha256: hex::encode(request_sha256),
                            program_sha256: hex::encode(program.grant().digest),
                            policy_sha256,
                            model_sha256: program
                                .grant()
                                .models
                                .iter()
                                .filter_map(|m| model_digests.get(m).map(|d| (m.clone(), d.clone())))
                                .collect(),
                            reply_sha256: hex::encode(digest),
                            reply_frames: frames,
                            outcome: outcome_name(&report.outcome).into(),
                            classifier: report.classifier.as_ref().map(|c| {
                                cinfer_attest::ReceiptClassifier {
                                    name: c.name.clone(),
                                    sha256: hex::encode(c.digest),
                                    verdict: c.verdict.as_str().into(),
                                }
                            }),
                            keyservers: keyservers.iter().map(hex::encode).collect(),
                        };
                        tracing::info!(request = id, outcome = %report.outcome, frames, elapsed = ?report.elapsed, "request done");
                        let signed = SignedReceipt::sign(&receipt, &receipt_key);
                        (
                            Kind::Done,
                            serde_json::to_vec(&signed).unwrap_or_default(),
                        )
                    }
                    Err(e) => {
                        tracing::info!(request = id, reason = %e, "request refused");
                        (Kind::Refused, error_json(&e))
                    }
                };
                let _ = send(
                    &writer,
                    answer.0,
                    &cinfer_channel::with_request_id(id, &answer.1),
                    max,
                );
            });
        if let Err(e) = spawned {
            refuse(format!("cannot start a worker: {e}"));
        }
    }
}
