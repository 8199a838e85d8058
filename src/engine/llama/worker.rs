//! The worker thread: owns one llama.cpp context with several sequence slots.
//!
//! Each step decodes, in one batch, the next token of every generating sequence plus prompt
//! chunks of newly admitted ones (continuous batching). A slot keeps its tokens between turns, so
//! the next turn of a conversation only computes what is new (prefix reuse); idle slots are
//! reused least-recently-used first, and the cache a conversation loses to another is kept in RAM
//! and put back when it returns (llama.cpp's per-sequence state). A participant waiting for a
//! first token may pause a reply that has had its slot for a while; the paused reply's state is kept
//! in RAM the same way and it goes on when a slot frees. Cancellation is checked every step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::{LoadedModel, WorkerConfig, BATCH_TOKENS};
use crate::engine::chat_template::ChatTemplate;
use crate::engine::text::{Pushed, TextStream};
use crate::engine::{
    ChatRequest, Completion, Constraint, EngineError, EngineEvent, EngineStatus, FinishReason,
    Priority, Sampling, TokenLogprob,
};

/// Largest prompt chunk one sequence may add to a step, so generating sequences keep streaming
/// while a long prompt is read.
const PREFILL_CHUNK_TOKENS: usize = 512;
/// Share of a slot's cached text a prompt must continue for the slot to be picked by prefix.
const SLOT_SIMILARITY: f64 = 0.5;
/// How long after a participant's request other work keeps slots free for participants.
const PARTICIPANT_RESERVATION: Duration = Duration::from_secs(600);
/// Window over which tokens per second are reported.
const RATE_WINDOW: Duration = Duration::from_secs(10);

pub(crate) struct Job {
    pub request: ChatRequest,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub cancel: Arc<AtomicBool>,
    pub arrived: Instant,
    /// The place last reported to the caller ([`EngineEvent::Queued`]).
    pub reported_ahead: Option<usize>,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    fn fail(&self, error: EngineError) {
        let _ = self.events.send(EngineEvent::Error(error));
    }
}

/// A sequence of the context: what its KV cache holds and the request it serves.
struct Slot {
    seq: i32,
    cache: SeqCache,
    conversation: Option<String>,
    last_used: Instant,
    active: Option<Active>,
}

/// The tokens whose keys and values are in a sequence's cache, in position order.
#[derive(Default, Clone)]
struct SeqCache {
    tokens: Vec<LlamaToken>,
    /// The text those tokens spell, and where each token ends in it.
    text: Vec<u8>,
    ends: Vec<usize>,
    /// Whether `text` is exactly the prompt text that produced the tokens (then a new prompt can
    /// be matched by text and only its new tail tokenised).
    exact: bool,
}

/// The request a slot is serving.
struct Active {
    job: Job,
    /// Prompt tokens not yet decoded.
    prefill: VecDeque<LlamaToken>,
    prompt_text_len: usize,
    /// Sampled but not yet decoded.
    next: Option<LlamaToken>,
    /// Index in the current batch whose logits this slot samples from.
    logits_at: Option<i32>,
    sampler: LlamaSampler,
    /// Applied before `sampler`, which then has no penalties of its own.
    penalty: Option<RepeatPenalty>,
    stream: TextStream,
    prompt_tokens: usize,
    prompt_processed: usize,
    generated: usize,
    max_tokens: usize,
    seed: u32,
    first_token_at: Option<Instant>,
    /// Admission number: names the leader of a shared prefix and orders replies for pausing.
    admission: u64,
    /// The prompt prefix this request takes from another of its group, once that one has
    /// computed it.
    share: Option<Share>,
    /// `generated` when the request last took a slot: a reply is paused only after a time slice
    /// of its own.
    slice_start: usize,
    /// The generated tokens' log-probabilities, when the request asked for them.
    logprobs: Vec<TokenLogprob>,
}

/// A reply paused for a participant's first token, with what its sequence held.
struct Paused {
    active: Active,
    cache: SeqCache,
    conversation: Option<String>,
    /// None when llama.cpp could not copy the state: the cache is computed again on resuming.
    state: Option<SeqState>,
}

/// What takes the next free slot.
enum Next {
    New(Job),
    Resume(Box<Paused>),
}

/// A prompt prefix shared with a request admitted in the same step (the leader). The follower
/// waits until the leader's cache holds the prefix, then copies the leader's sequence and keeps
/// the prefix: computed once, the same way every run, so sharing keeps replies reproducible.
#[derive(Clone)]
struct Share {
    leader: u64,
    prefix: Vec<LlamaToken>,
}

/// A prefix shorter than this is computed again rather than copied (a copy moves the whole
/// sequence buffer).
const MIN_SHARED_TOKENS: usize = 64;

pub(crate) struct Worker<'m> {
    model: &'m LlamaModel,
    context: LlamaContext<'m>,
    template: Option<ChatTemplate>,
    slots: Vec<Slot>,
    /// Jobs waiting for a slot, one queue per [`Priority`].
    queues: [VecDeque<Job>; 3],
    /// Replies paused for participants' first tokens, oldest first; at most one per slot.
    paused: VecDeque<Paused>,
    /// Tokens a reply streams after taking a slot before it may be paused; 0 never pauses.
    time_slice_tokens: usize,
    /// When a participant's request was last admitted.
    last_participant: Option<Instant>,
    /// Jobs admitted so far; numbers the jobs in admission order.
    admitted: u64,
    context_tokens: usize,
    reuse_prefix: bool,
    saved: SavedCaches,
    status: Arc<Mutex<EngineStatus>>,
    recent: VecDeque<(Instant, usize)>,
}

/// Caches of conversations evicted from their slot, oldest first, within a byte budget. With more
/// conversations than slots (a study has more participants than slots), a conversation's next
/// turn would otherwise compute its whole history again.
struct SavedCaches {
    entries: VecDeque<Saved>,
    bytes: usize,
    budget: usize,
}

struct Saved {
    conversation: Option<String>,
    cache: SeqCache,
    state: SeqState,
}

/// A cache shorter than this is not worth keeping: computing it again is as fast.
const MIN_SAVED_TOKENS: usize = 32;

impl SavedCaches {
    fn insert(&mut self, saved: Saved) {
        if saved.conversation.is_some() {
            self.entries
                .retain(|e| e.conversation != saved.conversation);
        }
        self.bytes = self.entries.iter().map(|e| e.state.byte_len()).sum();
        self.bytes += saved.state.byte_len();
        self.entries.push_back(saved);
        while self.bytes > self.budget {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= oldest.state.byte_len();
        }
    }

    /// The saved cache of the job's conversation; for a request without one, the saved cache
    /// without a conversation that the prompt continues furthest.
    fn take(&mut self, conversation: Option<&str>, prompt: &[u8]) -> Option<Saved> {
        let at = match conversation {
            Some(c) => self
                .entries
                .iter()
                .position(|e| e.conversation.as_deref() == Some(c)),
            None => self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.conversation.is_none())
                .filter_map(|(i, e)| Some((i, e.cache.continued_by(prompt)?)))
                .max_by_key(|&(_, shared)| shared)
                .map(|(i, _)| i),
        }?;
        let saved = self.entries.remove(at)?;
        self.bytes -= saved.state.byte_len();
        Some(saved)
    }
}

impl<'m> Worker<'m> {
    pub(crate) fn new(
        model: &'m LoadedModel,
        context: LlamaContext<'m>,
        config: &WorkerConfig,
        status: Arc<Mutex<EngineStatus>>,
    ) -> Self {
        let template = match ChatTemplate::of_model(&model.model) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(model = %config.name, error = %e, "no usable chat template");
                None
            }
        };
        let now = Instant::now();
        let slots = (0..config.slots.max(1))
            .map(|seq| Slot {
                seq: i32::try_from(seq).expect("slot count fits i32"),
                cache: SeqCache {
                    exact: true,
                    ..Default::default()
                },
                conversation: None,
                last_used: now,
                active: None,
            })
            .collect();
        Self {
            model: &model.model,
            context,
            template,
            slots,
            queues: Default::default(),
            paused: VecDeque::new(),
            time_slice_tokens: config.time_slice_tokens as usize,
            last_participant: None,
            admitted: 0,
            context_tokens: config.context_tokens as usize,
            reuse_prefix: config.reuse_prefix,
            saved: SavedCaches {
                entries: VecDeque::new(),
                bytes: 0,
                budget: config.saved_cache_bytes,
            },
            status,
            recent: VecDeque::new(),
        }
    }

    /// Serves jobs until every handle is dropped and nothing is left to do.
    pub(crate) fn run(mut self, inbox: &std_mpsc::Receiver<Vec<Job>>) {
        let mut batch = LlamaBatch::new(BATCH_TOKENS as usize, self.slots.len() as i32);
        loop {
            if self.idle() {
                match inbox.recv() {
                    Ok(jobs) => self.enqueue(jobs),
                    Err(_) => return,
                }
            }
            while let Ok(jobs) = inbox.try_recv() {
                self.enqueue(jobs);
            }
            self.drop_cancelled_queued();
            self.admit();
            self.report_places();
            self.cancel_active();
            let generated = self.step(&mut batch);
            self.publish(generated);
        }
    }

    fn enqueue(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            self.queues[job.request.priority.index()].push_back(job);
        }
    }

    fn idle(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
            && self.paused.is_empty()
            && self.slots.iter().all(|s| s.active.is_none())
    }

    /// What to admit next: participants' new requests first (someone is waiting for a first
    /// token), then replies paused for them and the other classes, most urgent first, a paused
    /// reply before its class's queue (it arrived earlier). While participants are being served,
    /// other work leaves a quarter of the slots (at least one) free for them, so a participant
    /// never waits for a long background generation to end.
    fn take_next(&mut self) -> Option<Next> {
        let participant = Priority::Participant;
        if let Some(job) = self.queues[participant.index()].pop_front() {
            self.last_participant = Some(Instant::now());
            self.unqueued(participant);
            return Some(Next::New(job));
        }
        let idle = self.slots.iter().filter(|s| s.active.is_none()).count();
        let serving_participants = self
            .last_participant
            .is_some_and(|t| t.elapsed() < PARTICIPANT_RESERVATION);
        let reserved = if serving_participants && self.slots.len() > 1 {
            (self.slots.len() / 4).max(1)
        } else {
            0
        };
        for class in Priority::ALL {
            if class != participant && idle <= reserved {
                return None;
            }
            let paused = self
                .paused
                .iter()
                .position(|p| p.active.job.request.priority == class);
            if let Some(paused) = paused.and_then(|at| self.paused.remove(at)) {
                return Some(Next::Resume(Box::new(paused)));
            }
            if let Some(job) = self.queues[class.index()].pop_front() {
                self.unqueued(class);
                return Some(Next::New(job));
            }
        }
        None
    }

    fn unqueued(&self, class: Priority) {
        let mut status = self.status.lock().expect("status lock");
        status.queued = status.queued.saturating_sub(1);
        let by_class = &mut status.queued_by_priority[class.index()];
        *by_class = by_class.saturating_sub(1);
    }

    /// Ends queued jobs whose caller is gone (cancelled) or whose class's deadline has passed
    /// (busy).
    fn drop_cancelled_queued(&mut self) {
        for class in Priority::ALL {
            let queue = std::mem::take(&mut self.queues[class.index()]);
            for job in queue {
                let expired = class
                    .deadline()
                    .is_some_and(|deadline| job.arrived.elapsed() > deadline);
                if job.cancelled() {
                    self.unqueued(class);
                    let _ = job.events.send(EngineEvent::Done(Completion {
                        text: String::new(),
                        finish_reason: FinishReason::Cancelled,
                        prompt_tokens: 0,
                        prompt_tokens_processed: 0,
                        generated_tokens: 0,
                        ttft_ms: 0,
                        total_ms: ms_since(job.arrived),
                        seed: job.request.sampling.seed.unwrap_or(0),
                        logprobs: Vec::new(),
                    }));
                } else if expired {
                    self.unqueued(class);
                    job.fail(EngineError::Busy {
                        class: class.name(),
                        queued: self.queues[class.index()].len() + 1,
                    });
                } else {
                    self.queues[class.index()].push_back(job);
                }
            }
        }
        for paused in std::mem::take(&mut self.paused) {
            if paused.active.job.cancelled() {
                self.report(paused.active, FinishReason::Cancelled);
            } else {
                self.paused.push_back(paused);
            }
        }
    }

    /// With every slot busy and a participant waiting for a first token: pauses the running reply
    /// that has had its slot longest past its time slice, least urgent class first, keeping its
    /// sequence's state in RAM. Replies of reproducible groups, replies about to end and replies
    /// still reading their prompt keep their slot, and at most one reply per slot is paused (so
    /// paused state never holds more than the context does). Returns whether a slot was freed.
    fn pause_for_participant(&mut self) -> bool {
        let slice = self.time_slice_tokens;
        if slice == 0
            || self.queues[Priority::Participant.index()].is_empty()
            || self.paused.len() >= self.slots.len()
        {
            return false;
        }
        let pausable = |a: &Active| {
            !a.job.request.reproducible
                && a.share.is_none()
                && a.prefill.is_empty()
                && a.next.is_some()
                && a.generated - a.slice_start >= slice
                && a.max_tokens.saturating_sub(a.generated) >= slice
        };
        let victim = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.active.as_ref().filter(|a| pausable(a))?)))
            .max_by_key(|(_, a)| {
                let class = a.job.request.priority.index();
                (
                    class,
                    a.generated - a.slice_start,
                    std::cmp::Reverse(a.admission),
                )
            })
            .map(|(i, _)| i);
        let Some(index) = victim else {
            return false;
        };
        let slot = &mut self.slots[index];
        let active = slot.active.take().expect("the victim is active");
        let state = match self
            .context
            .state_seq_get(slot.seq, LlamaStateSeqFlags::empty())
        {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep a paused reply's cache; it is computed again");
                None
            }
        };
        let cache = std::mem::replace(
            &mut slot.cache,
            SeqCache {
                exact: true,
                ..Default::default()
            },
        );
        let _ = self
            .context
            .clear_kv_cache_seq(Some(slot.seq as u32), None, None);
        self.paused.push_back(Paused {
            active,
            cache,
            conversation: slot.conversation.take(),
            state,
        });
        self.status.lock().expect("status lock").replies_paused += 1;
        true
    }

    /// Puts a paused reply back in the idle slot `index`. If its state cannot be put back, its
    /// tokens and the one sampled last are computed again, whose logits give the next.
    fn resume(&mut self, index: usize, paused: Paused) {
        self.keep_in_ram(index);
        let seq = self.slots[index].seq;
        self.slots[index].cache.truncate(&mut self.context, seq, 0);
        let Paused {
            mut active,
            cache,
            conversation,
            state,
        } = paused;
        active.slice_start = active.generated;
        active.logits_at = None;
        let restored = state
            .as_ref()
            .is_some_and(|state| self.context.state_seq_set(state, seq).is_ok());
        let slot = &mut self.slots[index];
        if restored {
            slot.cache = cache;
        } else {
            let _ = self
                .context
                .clear_kv_cache_seq(Some(seq as u32), None, None);
            active.prefill = cache
                .tokens
                .iter()
                .copied()
                .chain(active.next.take())
                .collect();
            active.prompt_processed += active.prefill.len();
            slot.cache = SeqCache::default();
        }
        slot.conversation = conversation;
        slot.active = Some(active);
    }

    /// Moves queued jobs into idle slots, most urgent class first, first come first served
    /// within a class.
    fn admit(&mut self) {
        // Reproducible requests admitted in this step, whose prompts later ones may share.
        let mut leaders: Vec<(u64, Vec<LlamaToken>)> = Vec::new();
        loop {
            if self.slots.iter().all(|s| s.active.is_some()) && !self.pause_for_participant() {
                break;
            }
            let job = match self.take_next() {
                None => break,
                Some(Next::Resume(paused)) => {
                    // A slot is idle here: the loop's first check saw one or paused a reply.
                    let index = self
                        .idle_slot_to_take()
                        .expect("admit checks that an idle slot exists");
                    self.resume(index, *paused);
                    continue;
                }
                Some(Next::New(job)) => job,
            };
            if job.reported_ahead.is_some() {
                let _ = job.events.send(EngineEvent::Started);
            }
            let prompt = match self.render(&job.request) {
                Ok(p) => p,
                Err(e) => {
                    job.fail(e);
                    continue;
                }
            };
            let index = self.choose_slot(&job, prompt.as_bytes());
            self.swap_caches(index, &job, prompt.as_bytes());
            match self.start_in_slot(index, job, &prompt, &leaders) {
                Ok(Some(leader)) => leaders.push(leader),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "request rejected"),
            }
        }
    }

    /// Tells each participant's waiting request its place when it changed. Participants are
    /// admitted first, first come first served, so the place is the index in their queue.
    fn report_places(&mut self) {
        for (ahead, job) in self.queues[Priority::Participant.index()]
            .iter_mut()
            .enumerate()
        {
            if job.reported_ahead != Some(ahead) {
                job.reported_ahead = Some(ahead);
                let _ = job.events.send(EngineEvent::Queued { ahead });
            }
        }
    }

    fn render(&self, request: &ChatRequest) -> Result<String, EngineError> {
        if request.messages.is_empty() {
            return Err(EngineError::EmptyMessages);
        }
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::Template("the model has no usable chat template".into()))?;
        template.render(self.model, &request.messages)
    }

    /// The idle slot for a job: the one holding its conversation; for a request without a
    /// conversation id, an unowned slot whose cache the prompt continues (as llama.cpp's server
    /// does for clients that resend the whole history); else the least recently used. Another
    /// conversation's cache is only taken as the least recently used.
    fn choose_slot(&self, job: &Job, prompt: &[u8]) -> usize {
        let idle = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.active.is_none())
        };
        if job.request.reproducible {
            // Computed from scratch anyway; the lowest free sequence id keeps a group's batch
            // layout (rows in sequence order) the same on every run.
            return idle()
                .next()
                .map(|(i, _)| i)
                .expect("admit checks that an idle slot exists");
        }
        let wanted = job.request.conversation.as_deref();
        if wanted.is_some() {
            if let Some((i, _)) = idle().find(|(_, s)| s.conversation.as_deref() == wanted) {
                return i;
            }
        } else {
            let continued = idle()
                .filter(|(_, s)| s.conversation.is_none())
                .filter_map(|(i, s)| Some((i, s.cache.continued_by(prompt)?)))
                .max_by_key(|&(_, shared)| shared);
            if let Some((i, _)) = continued {
                return i;
            }
        }
        self.idle_slot_to_take()
            .expect("admit checks that an idle slot exists")
    }

    /// The idle slot to take for a request that has no cache of its own in one (see
    /// [`slot_to_take`]).
    fn idle_slot_to_take(&self) -> Option<usize> {
        let slots: Vec<(bool, Instant)> = self
            .slots
            .iter()
            .map(|s| (s.active.is_some(), s.last_used))
            .collect();
        slot_to_take(&slots)
    }

    /// Before a job takes a slot that holds another conversation: keeps that conversation's cache
    /// in RAM, and puts the job's own saved cache, if there is one, in its place.
    fn swap_caches(&mut self, index: usize, job: &Job, prompt: &[u8]) {
        if !self.reuse_prefix || self.saved.budget == 0 {
            return;
        }
        let request = &job.request;
        let slot = &self.slots[index];
        let holds_own = match request.conversation.as_deref() {
            Some(c) => slot.conversation.as_deref() == Some(c),
            None => slot.conversation.is_none() && slot.cache.continued_by(prompt).is_some(),
        };
        if holds_own && !request.reproducible {
            return;
        }
        let seq = slot.seq;
        self.keep_in_ram(index);
        if request.reproducible {
            return;
        }
        let Some(saved) = self.saved.take(request.conversation.as_deref(), prompt) else {
            return;
        };
        // What the slot held is saved; its cells make way for the returning conversation's.
        let slot = &mut self.slots[index];
        slot.cache.truncate(&mut self.context, seq, 0);
        match self.context.state_seq_set(&saved.state, seq) {
            Ok(()) => {
                slot.cache = saved.cache;
                slot.conversation = saved.conversation;
                self.status.lock().expect("status lock").caches_restored += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore a conversation's cache");
                let _ = self
                    .context
                    .clear_kv_cache_seq(Some(seq as u32), None, None);
            }
        }
    }

    /// Keeps the conversation an idle slot holds in RAM, before the slot is given to another.
    fn keep_in_ram(&mut self, index: usize) {
        let slot = &self.slots[index];
        if !self.reuse_prefix
            || self.saved.budget == 0
            || slot.cache.tokens.len() < MIN_SAVED_TOKENS
        {
            return;
        }
        match self
            .context
            .state_seq_get(slot.seq, LlamaStateSeqFlags::empty())
        {
            Ok(state) if state.byte_len() <= self.saved.budget => {
                self.saved.insert(Saved {
                    conversation: slot.conversation.clone(),
                    cache: slot.cache.clone(),
                    state,
                });
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot keep a conversation's cache"),
        }
    }

    /// Starts a job in a slot. A reproducible job whose prompt starts like the prompt of one
    /// admitted before it in this step follows that one; every reproducible job is returned as a
    /// possible leader (admission number and prompt tokens).
    fn start_in_slot(
        &mut self,
        index: usize,
        job: Job,
        prompt: &str,
        leaders: &[(u64, Vec<LlamaToken>)],
    ) -> Result<Option<(u64, Vec<LlamaToken>)>, EngineError> {
        let (sampler, seed) = match build_sampler(self.model, &job.request) {
            Ok(s) => s,
            Err(e) => {
                job.fail(e.clone());
                return Err(e);
            }
        };
        let model = self.model;
        let slot = &mut self.slots[index];
        let cache = &mut slot.cache;
        // A reproducible request is computed from scratch: logits of a prompt decoded in one
        // piece differ in the last bits from those of a cached prefix plus a tail, enough to
        // change what a seed samples.
        let (keep, tail) = if !self.reuse_prefix || job.request.reproducible {
            (0, tokenize(model, prompt, true))
        } else if cache.exact {
            let shared = common_prefix(&cache.text, prompt.as_bytes());
            let keep = cache.ends.partition_point(|&end| end <= shared);
            let from = if keep == 0 { 0 } else { cache.ends[keep - 1] };
            let tail = tokenize(model, &prompt[from..], keep == 0);
            (keep, tail)
        } else {
            let all = tokenize(model, prompt, true);
            let keep = cache
                .tokens
                .iter()
                .zip(&all)
                .take_while(|(a, b)| a == b)
                .count();
            (keep, all[keep..].to_vec())
        };
        // At least one token must be decoded to get logits for the first reply token.
        let (keep, tail) = if tail.is_empty() && keep > 0 {
            let mut t = vec![cache.tokens[keep - 1]];
            t.extend(tail);
            (keep - 1, t)
        } else {
            (keep, tail)
        };
        let prompt_tokens = keep + tail.len();
        if prompt_tokens + 1 >= self.context_tokens {
            let e = EngineError::PromptTooLong {
                tokens: prompt_tokens,
                limit: self.context_tokens - 1,
            };
            job.fail(e.clone());
            return Err(e);
        }
        cache.truncate(&mut self.context, slot.seq, keep);
        if keep == 0 {
            // A fresh sequence: its text is rebuilt from the prompt and checked after prefill.
            cache.exact = true;
        }
        slot.conversation = job.request.conversation.clone();
        let max_tokens =
            (job.request.sampling.max_tokens as usize).min(self.context_tokens - prompt_tokens - 1);
        let stop = job.request.sampling.stop.clone();
        let reproducible = job.request.reproducible;
        // The leader whose prompt shares the longest prefix with this one (at least one token
        // of the prompt stays to be decoded, for the logits).
        let share = if reproducible {
            leaders
                .iter()
                .map(|(admission, tokens)| {
                    let shared = common_prefix(tokens, &tail).min(tail.len().saturating_sub(1));
                    (shared, *admission)
                })
                .max_by_key(|&(shared, admission)| (shared, std::cmp::Reverse(admission)))
                .filter(|&(shared, _)| shared >= MIN_SHARED_TOKENS)
                .map(|(shared, leader)| Share {
                    leader,
                    prefix: tail[..shared].to_vec(),
                })
        } else {
            None
        };
        // A follower leads too: the next request may share more of its prompt. Copies are made
        // in order, so one made from a follower sees what that follower copied.
        let leader = reproducible.then(|| (self.admitted, tail.clone()));
        let tail = match &share {
            Some(s) => tail[s.prefix.len()..].to_vec(),
            None => tail,
        };
        slot.active = Some(Active {
            prefill: tail.into(),
            prompt_text_len: prompt.len(),
            next: None,
            logits_at: None,
            sampler,
            penalty: RepeatPenalty::of(&job.request.sampling),
            stream: TextStream::new(stop),
            prompt_tokens,
            prompt_processed: prompt_tokens - keep,
            generated: 0,
            max_tokens,
            seed,
            first_token_at: None,
            admission: self.admitted,
            share,
            slice_start: 0,
            logprobs: Vec::new(),
            job,
        });
        self.admitted += 1;
        Ok(leader)
    }

    /// Followers whose leader has computed the shared prefix copy it; followers whose leader is
    /// gone compute the prefix themselves.
    fn resolve_shares(&mut self) {
        for i in 0..self.slots.len() {
            let Some(share) = self.slots[i].active.as_ref().and_then(|a| a.share.clone()) else {
                continue;
            };
            let leader = self.slots.iter().position(|s| {
                s.active
                    .as_ref()
                    .is_some_and(|a| a.admission == share.leader)
            });
            let ready = leader.filter(|&l| {
                self.slots[l].cache.tokens.len() >= share.prefix.len()
                    && self.slots[l].cache.tokens[..share.prefix.len()] == share.prefix[..]
            });
            let copied = ready.is_some_and(|l| {
                let (from, to) = (self.slots[l].seq, self.slots[i].seq);
                // The whole sequence buffer is copied at the next decode, then cut to the prefix.
                self.context.copy_kv_cache_seq(from, to, None, None).is_ok()
                    && self.context.clear_kv_cache_seq(
                        Some(to as u32),
                        Some(share.prefix.len() as u32),
                        None,
                    ) == Ok(true)
            });
            if copied {
                let l = ready.expect("copied from a leader");
                let mut cache = SeqCache {
                    tokens: self.slots[l].cache.tokens.clone(),
                    text: self.slots[l].cache.text.clone(),
                    ends: self.slots[l].cache.ends.clone(),
                    exact: self.slots[l].cache.exact,
                };
                let keep = share.prefix.len();
                cache.tokens.truncate(keep);
                cache.ends.truncate(keep);
                cache.text.truncate(cache.ends.last().copied().unwrap_or(0));
                let slot = &mut self.slots[i];
                slot.cache = cache;
                let active = slot.active.as_mut().expect("checked active");
                active.prompt_processed -= keep;
                active.share = None;
            } else if leader.is_none() || ready.is_some() {
                // No leader to copy from (it failed or was cancelled), or the copy failed.
                let slot = &mut self.slots[i];
                slot.cache.truncate(&mut self.context, slot.seq, 0);
                let active = slot.active.as_mut().expect("checked active");
                for token in share.prefix.iter().rev() {
                    active.prefill.push_front(*token);
                }
                active.share = None;
            }
        }
    }

    fn cancel_active(&mut self) {
        for i in 0..self.slots.len() {
            let cancelled = self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| a.job.cancelled());
            if cancelled {
                self.finish(i, FinishReason::Cancelled);
            }
        }
    }

    /// One decode over every active slot; returns the number of tokens generated.
    fn step(&mut self, batch: &mut LlamaBatch) -> usize {
        batch.clear();
        self.resolve_shares();
        // Room for every generating sequence's token comes first; prompt chunks share the rest.
        let generating = self
            .slots
            .iter()
            .filter(|s| s.active.as_ref().is_some_and(|a| a.next.is_some()))
            .count();
        let mut prompt_room = BATCH_TOKENS as usize - generating.min(BATCH_TOKENS as usize);
        // Sequence by sequence in id order, each one's tokens together: llama.cpp splits a batch
        // of several sequences (one KV stream each) into a forward pass for every run of
        // consecutive sequence ids, so any other order computes a step several times over.
        for Slot {
            seq, cache, active, ..
        } in &mut self.slots
        {
            let Some(active) = active.as_mut() else {
                continue;
            };
            active.logits_at = None;
            if let Some(token) = active.next.take() {
                let pos = cache.tokens.len() as i32;
                if batch.add(token, pos, &[*seq], true).is_err() {
                    active.next = Some(token);
                    continue;
                }
                active.logits_at = Some(batch.n_tokens() - 1);
                cache.push(self.model, token);
                continue;
            }
            if active.share.is_some() {
                continue;
            }
            let chunk = active
                .prefill
                .len()
                .min(prompt_room)
                .min(PREFILL_CHUNK_TOKENS);
            prompt_room -= chunk;
            for _ in 0..chunk {
                let token = active.prefill.pop_front().expect("chunk ≤ prefill length");
                let last = active.prefill.is_empty();
                let pos = cache.tokens.len() as i32;
                batch
                    .add(token, pos, &[*seq], last)
                    .expect("room was checked");
                if last {
                    active.logits_at = Some(batch.n_tokens() - 1);
                }
                cache.push(self.model, token);
            }
            if active.prefill.is_empty() && chunk > 0 {
                cache.exact = cache.exact && cache.text.len() == active.prompt_text_len;
            }
        }
        if batch.n_tokens() == 0 {
            return 0;
        }
        let decoded = {
            let _cores = super::cpu_lease();
            self.context.decode(batch)
        };
        if let Err(e) = decoded {
            let error = EngineError::Inference(format!("decode failed: {e}"));
            tracing::error!(%error, "decode failed; failing the requests of this batch");
            for i in 0..self.slots.len() {
                let in_batch = self.slots[i]
                    .active
                    .as_ref()
                    .is_some_and(|a| a.logits_at.is_some() || !a.prefill.is_empty());
                if in_batch {
                    let active = self.slots[i].active.take().expect("checked active");
                    active.job.fail(error.clone());
                    let slot = &mut self.slots[i];
                    slot.cache.truncate(&mut self.context, slot.seq, 0);
                }
            }
            return 0;
        }
        let mut generated = 0;
        for i in 0..self.slots.len() {
            let Some(at) = self.slots[i].active.as_ref().and_then(|a| a.logits_at) else {
                continue;
            };
            generated += 1;
            match self.sample(i, at) {
                Ok(Some(reason)) => self.finish(i, reason),
                Ok(None) => {}
                Err(e) => self.fail(i, e),
            }
        }
        generated
    }

    /// Samples the slot's next token; returns why generation ends, if it does, or why this
    /// request cannot go on.
    ///
    /// Not llama.cpp's `llama_sampler_sample`: when a grammar allows no token it would pick one
    /// anyway and its grammar would then throw a C++ exception (which aborts the process when it
    /// reaches Rust) or abort outright. Here the chain is applied, a pick the grammar ruled out
    /// ends the request, and the pick is accepted through a call that catches exceptions in C++.
    fn sample(&mut self, index: usize, at: i32) -> Result<Option<FinishReason>, EngineError> {
        let model = self.model;
        let context_tokens = self.context_tokens;
        let slot = &mut self.slots[index];
        let active = slot.active.as_mut().expect("sampled slots are active");
        let distribution = active
            .job
            .request
            .top_logprobs
            .map(|n| Distribution::of(self.context.get_logits_ith(at), n as usize));
        let mut candidates = LlamaTokenDataArray::from_iter(self.context.candidates_ith(at), false);
        if let Some(penalty) = &active.penalty {
            penalty.apply(&mut candidates.data);
        }
        candidates.apply_sampler(&mut active.sampler);
        let token = candidates
            .selected
            .and_then(|i| candidates.data.get(i))
            .filter(|picked| picked.logit().is_finite())
            .map(|picked| picked.id())
            .ok_or_else(|| {
                EngineError::Grammar("the grammar allows no continuation of the output".into())
            })?;
        active.sampler.try_accept(token).map_err(|e| {
            EngineError::Grammar(format!("the grammar cannot accept the next token ({e})"))
        })?;
        if let Some(penalty) = &mut active.penalty {
            penalty.accept(token);
        }
        if let Some(d) = distribution {
            let piece = |t: i32| {
                model
                    .vocab()
                    .token_to_piece(LlamaToken::new(t), false, None)
            };
            active.logprobs.push(TokenLogprob {
                bytes: piece(token.0),
                logprob: self.context.get_logits_ith(at)[token.0 as usize] - d.log_sum,
                top: d.top.into_iter().map(|(t, lp)| (piece(t), lp)).collect(),
            });
        }
        active.first_token_at.get_or_insert_with(Instant::now);
        active.generated += 1;
        #[cfg(debug_assertions)]
        injected_panic(&active.job.request, active.generated);
        let eog = model.vocab().is_eog(token);
        if eog && !active.job.request.ignore_eos {
            return Ok(Some(FinishReason::Stop));
        }
        let piece = if eog {
            Vec::new()
        } else {
            model.vocab().token_to_piece(token, false, None)
        };
        match active.stream.push(&piece) {
            Pushed::Text(text) => {
                if !text.is_empty() {
                    let _ = active.job.events.send(EngineEvent::Token(text));
                }
            }
            Pushed::Stopped(text) => {
                if !text.is_empty() {
                    let _ = active.job.events.send(EngineEvent::Token(text));
                }
                return Ok(Some(FinishReason::Stop));
            }
        }
        if active.generated >= active.max_tokens || slot.cache.tokens.len() + 1 >= context_tokens {
            return Ok(Some(FinishReason::Length));
        }
        active.next = Some(token);
        Ok(None)
    }

    /// Ends the slot's request with an error; the slot is free for the next one.
    fn fail(&mut self, index: usize, error: EngineError) {
        let slot = &mut self.slots[index];
        let Some(active) = slot.active.take() else {
            return;
        };
        slot.last_used = Instant::now();
        tracing::warn!(error = %error, "request failed");
        active.job.fail(error);
    }

    /// Ends the slot's request: flushes the text, reports the completion, frees the slot.
    fn finish(&mut self, index: usize, reason: FinishReason) {
        let slot = &mut self.slots[index];
        let Some(active) = slot.active.take() else {
            return;
        };
        slot.last_used = Instant::now();
        if !active.prefill.is_empty() {
            // Cancelled while reading the prompt: the cache holds part of it, which the text
            // check after prefill never confirmed.
            slot.cache.exact = false;
        }
        self.report(active, reason);
    }

    /// Flushes a request's text and reports its completion.
    fn report(&self, mut active: Active, reason: FinishReason) {
        let rest = active.stream.finish();
        if !rest.is_empty() && reason != FinishReason::Cancelled {
            let _ = active.job.events.send(EngineEvent::Token(rest));
        }
        let ttft = active.first_token_at.map_or(0, |t| {
            t.duration_since(active.job.arrived).as_millis() as u64
        });
        let completion = Completion {
            text: active.stream.text().to_string(),
            finish_reason: reason,
            prompt_tokens: active.prompt_tokens as u32,
            prompt_tokens_processed: active.prompt_processed as u32,
            generated_tokens: active.generated as u32,
            ttft_ms: ttft,
            total_ms: ms_since(active.job.arrived),
            seed: active.seed,
            logprobs: std::mem::take(&mut active.logprobs),
        };
        {
            let mut status = self.status.lock().expect("status lock");
            status.prompt_tokens_processed += active.prompt_processed as u64;
            status.prompt_tokens_reused += (active.prompt_tokens - active.prompt_processed) as u64;
        }
        let _ = active.job.events.send(EngineEvent::Done(completion));
    }

    fn publish(&mut self, generated: usize) {
        let now = Instant::now();
        if generated > 0 {
            self.recent.push_back((now, generated));
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let in_window: usize = self.recent.iter().map(|(_, n)| n).sum();
        let span = self
            .recent
            .front()
            .map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64());
        let mut status = self.status.lock().expect("status lock");
        status.active = self.slots.iter().filter(|s| s.active.is_some()).count();
        status.paused = self.paused.len();
        status.generated_tokens += generated as u64;
        status.tokens_per_second = if span > 0.0 {
            in_window as f64 / span
        } else {
            0.0
        };
    }
}

impl SeqCache {
    /// How many bytes of the cached text `prompt` repeats, when it continues enough of it
    /// ([`SLOT_SIMILARITY`]) for the cache to be the prompt's own; none for an empty cache.
    fn continued_by(&self, prompt: &[u8]) -> Option<usize> {
        let shared = common_prefix(&self.text, prompt);
        (!self.text.is_empty() && shared as f64 >= SLOT_SIMILARITY * self.text.len() as f64)
            .then_some(shared)
    }

    /// Records that `token` is now in the cache at the next position.
    fn push(&mut self, model: &LlamaModel, token: LlamaToken) {
        // A BOS that tokenisation adds is not spelled in the prompt text.
        let vocab = model.vocab();
        let piece = if self.tokens.is_empty() && vocab.should_add_bos() && token == vocab.bos() {
            Vec::new()
        } else {
            vocab.token_to_piece(token, true, None)
        };
        self.tokens.push(token);
        self.text.extend_from_slice(&piece);
        self.ends.push(self.text.len());
    }

    /// Keeps the first `keep` tokens in the cache and forgets the rest.
    fn truncate(&mut self, context: &mut LlamaContext, seq: i32, keep: usize) {
        let seq = seq as u32;
        if keep < self.tokens.len() {
            let from = (keep > 0).then_some(keep as u32);
            let removed = context.clear_kv_cache_seq(Some(seq), from, None);
            if removed != Ok(true) {
                // The backend could not drop part of the sequence: drop all of it.
                let _ = context.clear_kv_cache_seq(Some(seq), None, None);
                self.tokens.clear();
                self.text.clear();
                self.ends.clear();
                return;
            }
        }
        self.tokens.truncate(keep);
        self.ends.truncate(keep);
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }
}

/// Of `slots` (busy, last used), the idle one that leaves the busy sequence ids in the fewest runs
/// (a decode computes each run of consecutive ids apart, see `Worker::step`), then the one used
/// longest ago, whose cache is least likely to be wanted again.
fn slot_to_take(slots: &[(bool, Instant)]) -> Option<usize> {
    let busy = |i: usize| slots.get(i).is_some_and(|&(busy, _)| busy);
    // Taking slot i joins the runs on its two sides into one (−1), extends one (0) or starts a
    // new one (+1).
    let runs_added = |i: usize| {
        let before = i > 0 && busy(i - 1);
        1 - i32::from(before) - i32::from(busy(i + 1))
    };
    slots
        .iter()
        .enumerate()
        .filter(|(_, &(busy, _))| !busy)
        .min_by_key(|&(i, &(_, last_used))| (runs_added(i), last_used))
        .map(|(i, _)| i)
}

/// Tokens of prompt text; special tokens of the chat template are parsed, and BOS is added at the
/// start of a sequence when the model wants one.
fn tokenize(model: &LlamaModel, text: &str, at_start: bool) -> Vec<LlamaToken> {
    model.vocab().tokenize(text.as_bytes(), at_start, true)
}

fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// llama.cpp's `penalties` sampler as the engine uses it (a repeat penalty on the last `last_n`
/// sampled tokens; no frequency or presence penalty), applied to those tokens instead of by a
/// look-up for each token of the vocabulary: that sampler's ~50,000 hash look-ups a token, for
/// each slot, cost more than a decode step of a small model.
struct RepeatPenalty {
    penalty: f32,
    last_n: usize,
    recent: VecDeque<LlamaToken>,
}

impl RepeatPenalty {
    /// None when the request asks for no penalty (1.0, or a window of 0 or less, as llama.cpp).
    fn of(s: &Sampling) -> Option<Self> {
        let last_n = usize::try_from(s.repeat_last_n).ok().filter(|&n| n > 0)?;
        (s.repeat_penalty != 1.0).then(|| Self {
            penalty: s.repeat_penalty,
            last_n,
            recent: VecDeque::with_capacity(last_n),
        })
    }

    /// Penalises each recent token once, as llama.cpp does; `data` holds the vocabulary's
    /// candidates in token order, as they come from the logits.
    fn apply(&self, data: &mut [llama_cpp_2::token::data::LlamaTokenData]) {
        let mut tokens: Vec<i32> = self.recent.iter().map(|t| t.0).collect();
        tokens.sort_unstable();
        tokens.dedup();
        for token in tokens {
            let Some(d) = usize::try_from(token).ok().and_then(|i| data.get_mut(i)) else {
                continue;
            };
            debug_assert_eq!(d.id().0, token, "candidates are in token order");
            let logit = d.logit();
            d.set_logit(if logit <= 0.0 {
                logit * self.penalty
            } else {
                logit / self.penalty
            });
        }
    }

    fn accept(&mut self, token: LlamaToken) {
        if self.recent.len() == self.last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }
}

/// The model's distribution at one position, as `top_logprobs` reports it: the log of the
/// softmax's denominator and the likeliest tokens with their log-probabilities.
struct Distribution {
    log_sum: f32,
    top: Vec<(i32, f32)>,
}

impl Distribution {
    fn of(logits: &[f32], n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let mut top: Vec<(i32, f32)> = Vec::with_capacity(n + 1);
        for (t, &l) in logits.iter().enumerate() {
            if top.len() == n && top.last().is_none_or(|&(_, worst)| l <= worst) {
                continue;
            }
            let at = top.partition_point(|&(_, better)| better >= l);
            top.insert(at, (t as i32, l));
            top.truncate(n);
        }
        for entry in &mut top {
            entry.1 -= log_sum;
        }
        Self { log_sum, top }
    }
}

/// The sampler chain of a request, and the seed it uses.
fn build_sampler(
    model: &LlamaModel,
    request: &ChatRequest,
) -> Result<(LlamaSampler, u32), EngineError> {
    let s: &Sampling = &request.sampling;
    let seed = s.seed.unwrap_or_else(rand::random);
    let mut chain = Vec::new();
    if let Some(constraint) = &request.constraint {
        let grammar = match constraint {
            Constraint::Grammar(g) => g.clone(),
            Constraint::JsonSchema(schema) => {
                llama_cpp_2::json_schema_to_grammar(&schema.to_string())
                    .map_err(|e| EngineError::Grammar(format!("JSON schema: {e}")))?
            }
        };
        let sampler = LlamaSampler::grammar(model, &grammar, "root")
            .map_err(|e| EngineError::Grammar(e.to_string()))?;
        chain.push(sampler);
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        chain.push(LlamaSampler::top_p(s.top_p, 1));
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(seed));
    }
    Ok((LlamaSampler::chain_simple(chain), seed))
}

/// Test builds only (`debug_assertions`): with `COLLABLLM_FAULT_WORKER_PANIC=TEXT` set, the first
/// request whose last message contains TEXT panics the worker at its third token, as a bug would,
/// so that a test can check that the reply fails cleanly and the worker restarts.
#[cfg(debug_assertions)]
fn injected_panic(request: &crate::engine::ChatRequest, generated: usize) {
    static MARKER: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
        std::env::var("COLLABLLM_FAULT_WORKER_PANIC")
            .ok()
            .filter(|m| !m.is_empty())
    });
    static FIRED: AtomicBool = AtomicBool::new(false);
    let Some(marker) = MARKER.as_deref() else {
        return;
    };
    let asked = request
        .messages
        .last()
        .is_some_and(|m| m.content.contains(marker));
    if generated == 3 && asked && !FIRED.swap(true, Ordering::SeqCst) {
        panic!("injected fault: the request asked the worker to panic");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots from a picture: `#` busy, `.` idle; slot i was last used i seconds after the first.
    fn slots(picture: &str) -> Vec<(bool, Instant)> {
        let start = Instant::now();
        picture
            .chars()
            .enumerate()
            .map(|(i, c)| (c == '#', start + Duration::from_secs(i as u64)))
            .collect()
    }

    #[test]
    fn a_new_request_keeps_the_busy_sequences_in_one_run() {
        // The gap between two runs, not the slot used longest ago (slot 0 of the idle ones).
        assert_eq!(slot_to_take(&slots("#.#..")), Some(1));
        // Next to the run rather than apart from it.
        assert_eq!(slot_to_take(&slots("..##..")), Some(1));
        // Nothing busy: the slot used longest ago.
        let mut idle = slots("...");
        idle[0].1 += Duration::from_secs(10);
        assert_eq!(slot_to_take(&idle), Some(1));
        assert_eq!(slot_to_take(&slots("###")), None);
    }
}
