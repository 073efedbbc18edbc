//! One loaded model and the thread that runs it for every session.
//!
//! The model is loaded once per process. Sessions hand it jobs through a
//! bounded queue (a full queue makes the sender wait, so memory stays
//! bounded); the thread keeps up to [`MAX_ACTIVE`] jobs going and gives each
//! one step in turn, so a long reply does not hold up a short one. A job
//! ends at an end-of-turn token, at its token budget, when its grammar is
//! complete, or as soon as its caller stops waiting (a cancelled session).
//!
//! Prompt processing dominates on a CPU, and an agent's prompts repeat: the
//! system prompt with its tool list begins every session of an agent, and
//! each step's prompt begins with the previous step's. The thread keeps the
//! model's attention state at those points ([`PrefixCache`]) and starts a new
//! prompt from the longest one it has.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use super::chat::Template;

/// Jobs generating at once; more wait in the queue.
const MAX_ACTIVE: usize = 4;
/// Jobs waiting beyond those; a caller finding the queue full waits.
const QUEUE: usize = 32;
/// Prompt tokens fed at once when a prompt starts from nothing. Beyond
/// this, attention's scratch space (heads × chunk² floats per layer) grows
/// faster than feeding the rest one token at a time costs.
const FIRST_CHUNK: usize = 512;
/// The most tokens a conversation may hold, prompt and reply together,
/// whatever the model file allows. candle copies a job's attention state
/// for every token fed after the first chunk, so the cost of a token grows
/// with its position: on two cores a 2,000-token prompt takes about a
/// minute before the first token, and its state some 200 MB.
const MAX_CONTEXT: usize = 2048;
/// Prompt tokens fed one by one in a job's turn once it has a start.
const TOKENS_PER_TURN: usize = 8;
/// Prompt tokens whose attention state the prefix cache keeps, in all
/// (about 46 KiB each for the default model).
const CACHE_TOKENS: usize = 1024;
const REPEAT_PENALTY: f32 = 1.1;
const REPEAT_WINDOW: usize = 64;

/// What a loaded model offers the code that builds its prompts.
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub template: Template,
    /// Texts of the control tokens, which no message may contain.
    pub reserved: Vec<String>,
}

impl ModelInfo {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizing the prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Prompt lengths worth remembering for later prompts.
    pub checkpoints: Vec<usize>,
    /// A Lark grammar the reply must follow.
    pub grammar: Option<String>,
    /// 0 picks the likeliest token every time.
    pub temperature: f64,
    pub max_tokens: usize,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of turn, or the grammar is complete.
    Stop,
    /// The token budget (or the context) ran out.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A finished job.
#[derive(Debug)]
pub struct Generation {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// From submission until the thread took the job up.
    pub queued: Duration,
    /// From taking the job up until its first token.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub generating: Duration,
}

type Reply = oneshot::Sender<Result<Generation, String>>;

struct Submitted {
    job: Job,
    at: Instant,
    reply: Reply,
}

/// A handle on the model's thread; clones share it.
#[derive(Clone)]
pub struct Engine {
    queue: mpsc::Sender<Submitted>,
    pub info: Arc<ModelInfo>,
}

impl Engine {
    /// Loads the GGUF file at `path` and starts its thread. Blocking.
    pub fn load(path: &Path) -> Result<Self, String> {
        let loaded = Loaded::open(path)?;
        let info = Arc::new(ModelInfo {
            tokenizer: loaded.tokenizer.clone(),
            template: Template::new(loaded.template.clone())?,
            reserved: loaded.reserved.clone(),
        });
        let (queue, jobs) = mpsc::channel(QUEUE);
        let scheduler = Scheduler::new(loaded, jobs);
        std::thread::Builder::new()
            .name("outrider-model".into())
            .spawn(move || scheduler.run())
            .map_err(|e| format!("starting the model thread: {e}"))?;
        Ok(Self { queue, info })
    }

    /// Runs a job. Dropping the returned future abandons the job: the
    /// thread notices at its next turn and stops generating for it.
    pub async fn generate(&self, job: Job) -> Result<Generation, String> {
        let (reply, answer) = oneshot::channel();
        let submitted = Submitted {
            job,
            at: Instant::now(),
            reply,
        };
        let stopped = || "the model thread has stopped".to_owned();
        self.queue.send(submitted).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Everything read from a model file.
struct Loaded {
    weights: ModelWeights,
    tokenizer: Tokenizer,
    template: Option<String>,
    reserved: Vec<String>,
    eos: Vec<u32>,
    context: usize,
    factory: ParserFactory,
}

impl Loaded {
    fn open(path: &Path) -> Result<Self, String> {
        let unreadable =
            |e: &dyn std::fmt::Display| format!("{} is unreadable: {e}", path.display());
        let mut file = std::fs::File::open(path).map_err(|e| unreadable(&e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| unreadable(&e))?;
        let meta = |key: &str| content.metadata.get(key);

        let gguf = Gguf(&content);
        let tokenizer = gguf.tokenizer().map_err(|e| unreadable(&e))?;
        let reserved = gguf.control_tokens().map_err(|e| unreadable(&e))?;
        let template = meta("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let eos = gguf.end_tokens(&tokenizer);
        let context = meta("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(MAX_CONTEXT, |n| n as usize)
            .min(MAX_CONTEXT);
        let vocab = gguf.vocab_size().map_err(|e| unreadable(&e))?;

        let factory = grammar_factory(&tokenizer, &eos, vocab)?;
        let weights = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .map_err(|e| unreadable(&e))?;
        Ok(Self {
            weights,
            tokenizer,
            template,
            reserved,
            eos,
            context,
            factory,
        })
    }
}

fn grammar_factory(
    tokenizer: &Tokenizer,
    eos: &[u32],
    vocab: usize,
) -> Result<ParserFactory, String> {
    let failed = |e: anyhow::Error| format!("preparing constrained decoding: {e}");
    let mut bytes =
        toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(tokenizer.clone()).map_err(failed)?;
    bytes.set_eos_tokens(eos);
    let env = bytes.into_tok_env(Some(vocab)).map_err(failed)?;
    let mut factory = ParserFactory::new_simple(&env).map_err(failed)?;
    factory.quiet();
    Ok(factory)
}

/// Reads the tokenizer out of GGUF metadata.
struct Gguf<'a>(&'a gguf_file::Content);

impl Gguf<'_> {
    fn get(&self, key: &str) -> candle_core::Result<&gguf_file::Value> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| candle_core::Error::Msg(format!("no {key} in the metadata")))
    }

    fn strings(&self, key: &str) -> candle_core::Result<Vec<String>> {
        let values = self.get(key)?.to_vec()?;
        values.iter().map(|v| v.to_string().cloned()).collect()
    }

    fn vocab_size(&self) -> candle_core::Result<usize> {
        Ok(self.get("tokenizer.ggml.tokens")?.to_vec()?.len())
    }

    /// A byte-level BPE tokenizer, as GPT-2-style models (SmolLM, Llama 3,
    /// Qwen) store it.
    fn tokenizer(&self) -> candle_core::Result<Tokenizer> {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits};
        use tokenizers::pre_tokenizers::{sequence::Sequence, PreTokenizerWrapper};

        let kind = self.get("tokenizer.ggml.model")?.to_string()?;
        if kind != "gpt2" {
            let message = format!("tokenizer {kind:?} is not supported (only gpt2-style BPE)");
            return Err(candle_core::Error::Msg(message));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect();
        let vocab: Vocab = tokens.iter().cloned().zip(0..).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(candle_core::Error::msg)?;

        let mut tokenizer = Tokenizer::new(bpe);
        let prefix_space = self
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool())
            .unwrap_or(false);
        let byte_level: PreTokenizerWrapper = ByteLevel::new(prefix_space, true, true).into();
        // SmolLM's tokenizer splits numbers into single digits first.
        let pre = self.get("tokenizer.ggml.pre").and_then(|v| v.to_string());
        let pre_tokenizer = match pre.map(String::as_str) {
            Ok("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level]).into(),
            _ => byte_level,
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let specials: Vec<tokenizers::AddedToken> = self
            .control_tokens()?
            .into_iter()
            .map(|token| tokenizers::AddedToken::from(token, true))
            .collect();
        tokenizer.add_special_tokens(&specials);
        Ok(tokenizer)
    }

    /// Tokens of type "control" (3): turn markers and the like.
    fn control_tokens(&self) -> candle_core::Result<Vec<String>> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.get("tokenizer.ggml.token_type")?.to_vec()?;
        let control = types
            .iter()
            .zip(tokens)
            .filter(|(kind, _)| kind.to_i32().is_ok_and(|kind| kind == 3))
            .map(|(_, token)| token)
            .collect();
        Ok(control)
    }

    /// The end-of-sequence token and, if the vocabulary has them, the usual
    /// end-of-turn and end-of-text tokens.
    fn end_tokens(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut eos: Vec<u32> = self
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32())
            .into_iter()
            .collect();
        for name in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
        ] {
            if let Some(id) = tokenizer.token_to_id(name) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        eos
    }
}

/// A job on the thread.
struct Active {
    job: Job,
    reply: Reply,
    queued: Duration,
    started: Instant,
    model: ModelWeights,
    /// Prompt tokens already fed to the model.
    fed: usize,
    cached: usize,
    logits: Option<Tensor>,
    matcher: Option<Matcher>,
    sampler: LogitsProcessor,
    out: Vec<u32>,
    first_token: Option<Instant>,
}

enum Step {
    Continue,
    Done(Finish),
}

struct Scheduler {
    base: ModelWeights,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    context: usize,
    factory: ParserFactory,
    cache: PrefixCache,
    jobs: mpsc::Receiver<Submitted>,
    active: Vec<Active>,
}

impl Scheduler {
    fn new(loaded: Loaded, jobs: mpsc::Receiver<Submitted>) -> Self {
        Self {
            base: loaded.weights,
            tokenizer: loaded.tokenizer,
            eos: loaded.eos,
            context: loaded.context,
            factory: loaded.factory,
            cache: PrefixCache::default(),
            jobs,
            active: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            if self.active.is_empty() {
                match self.jobs.blocking_recv() {
                    Some(submitted) => self.admit(submitted),
                    // Every handle is gone: the process is shutting down.
                    None => return,
                }
            }
            while self.active.len() < MAX_ACTIVE {
                match self.jobs.try_recv() {
                    Ok(submitted) => self.admit(submitted),
                    Err(_) => break,
                }
            }
            self.turn();
        }
    }

    fn admit(&mut self, submitted: Submitted) {
        let Submitted { job, at, reply } = submitted;
        if job.prompt.is_empty() || job.prompt.len() >= self.context {
            let message = format!(
                "the conversation is {} tokens; the local model takes fewer than {}",
                job.prompt.len(),
                self.context
            );
            let _ = reply.send(Err(message));
            return;
        }
        let matcher = match &job.grammar {
            None => None,
            Some(lark) => {
                let grammar = TopLevelGrammar::from_lark(lark.clone());
                match self.factory.create_parser(grammar) {
                    Ok(parser) => Some(Matcher::new(Ok(parser))),
                    Err(e) => {
                        let _ = reply.send(Err(format!("the tool grammar is invalid: {e}")));
                        return;
                    }
                }
            }
        };
        let (cached, model) = self
            .cache
            .longest_prefix_of(&job.prompt)
            .unwrap_or_else(|| (0, self.base.clone()));
        let sampling = if job.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::TopKThenTopP {
                k: 40,
                p: 0.9,
                temperature: job.temperature,
            }
        };
        self.active.push(Active {
            queued: at.elapsed(),
            started: Instant::now(),
            model,
            fed: cached,
            cached,
            logits: None,
            matcher,
            sampler: LogitsProcessor::from_sampling(rand::random(), sampling),
            out: Vec::new(),
            first_token: None,
            job,
            reply,
        });
    }

    /// Gives every active job one step; finishes those that are done.
    fn turn(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let outcome = if self.active[i].reply.is_closed() {
                Err("abandoned".to_owned())
            } else {
                self.step(i)
            };
            match outcome {
                Ok(Step::Continue) => i += 1,
                Ok(Step::Done(finish)) => {
                    let active = self.active.swap_remove(i);
                    let generation = active.finished(finish, &self.tokenizer);
                    let _ = active.reply.send(generation);
                }
                Err(message) => {
                    let active = self.active.swap_remove(i);
                    let _ = active.reply.send(Err(message));
                }
            }
        }
    }

    fn step(&mut self, i: usize) -> Result<Step, String> {
        let active = &mut self.active[i];
        if active.fed < active.job.prompt.len() {
            active
                .feed_prompt(&mut self.cache)
                .map_err(|e| e.to_string())?;
            return Ok(Step::Continue);
        }
        active.next_token(&self.eos, self.context)
    }
}

impl Active {
    /// Feeds the next stretch of prompt, remembering checkpoints on the way.
    fn feed_prompt(&mut self, cache: &mut PrefixCache) -> candle_core::Result<()> {
        let prompt = &self.job.prompt;
        // From nothing, a first chunk goes in one pass. After that tokens go
        // one at a time: this model's attention mask only covers a chunk
        // that starts at position 0.
        let upto = if self.fed == 0 {
            let mut end = prompt.len().min(FIRST_CHUNK);
            if let Some(&checkpoint) = self.job.checkpoints.iter().find(|&&c| c > 0 && c < end) {
                end = checkpoint;
            }
            end
        } else {
            prompt.len().min(self.fed + TOKENS_PER_TURN)
        };
        while self.fed < upto {
            let end = if self.fed == 0 { upto } else { self.fed + 1 };
            let input = Tensor::new(&prompt[self.fed..end], &Device::Cpu)?.unsqueeze(0)?;
            self.logits = Some(self.model.forward(&input, self.fed)?.squeeze(0)?);
            self.fed = end;
            if self.job.checkpoints.contains(&self.fed) {
                cache.insert(&prompt[..self.fed], &self.model);
            }
        }
        Ok(())
    }

    /// Samples one token and feeds it back.
    fn next_token(&mut self, eos: &[u32], context: usize) -> Result<Step, String> {
        let failed = |e: candle_core::Error| format!("the local model failed: {e}");
        let logits = self.logits.take().expect("a fed prompt leaves logits");
        let mut logits: Vec<f32> = logits.to_vec1().map_err(failed)?;
        let window = self.out.len().saturating_sub(REPEAT_WINDOW);
        penalise_repeats(&mut logits, &self.out[window..]);
        if let Some(matcher) = &mut self.matcher {
            let mask = matcher
                .compute_mask()
                .map_err(|e| format!("constrained decoding failed: {e}"))?;
            for (id, logit) in logits.iter_mut().enumerate() {
                if !mask.is_allowed(id as u32) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        let logits = Tensor::new(logits, &Device::Cpu).map_err(failed)?;
        let token = self.sampler.sample(&logits).map_err(failed)?;
        self.first_token.get_or_insert_with(Instant::now);

        if eos.contains(&token) {
            return Ok(Step::Done(Finish::Stop));
        }
        self.out.push(token);
        if let Some(matcher) = &mut self.matcher {
            matcher
                .consume_token(token)
                .map_err(|e| format!("constrained decoding failed: {e}"))?;
            if matcher.is_stopped() {
                return Ok(Step::Done(Finish::Stop));
            }
        }
        let position = self.job.prompt.len() + self.out.len();
        if self.out.len() >= self.job.max_tokens || position >= context {
            return Ok(Step::Done(Finish::Length));
        }

        let input = Tensor::new(&[token], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(failed)?;
        let logits = self.model.forward(&input, position - 1).map_err(failed)?;
        self.logits = Some(logits.squeeze(0).map_err(failed)?);
        Ok(Step::Continue)
    }

    fn finished(&self, finish: Finish, tokenizer: &Tokenizer) -> Result<Generation, String> {
        let text = tokenizer
            .decode(&self.out, true)
            .map_err(|e| format!("decoding the reply: {e}"))?;
        let first = self.first_token.unwrap_or_else(Instant::now);
        Ok(Generation {
            text,
            finish,
            prompt_tokens: self.job.prompt.len(),
            cached_tokens: self.cached,
            completion_tokens: self.out.len(),
            queued: self.queued,
            time_to_first_token: first - self.started,
            generating: first.elapsed(),
        })
    }
}

/// Makes tokens just produced less likely again, as llama.cpp does.
fn penalise_repeats(logits: &mut [f32], recent: &[u32]) {
    let mut seen = std::collections::HashSet::new();
    for &token in recent {
        if !seen.insert(token) {
            continue;
        }
        if let Some(logit) = logits.get_mut(token as usize) {
            *logit = if *logit >= 0.0 {
                *logit / REPEAT_PENALTY
            } else {
                *logit * REPEAT_PENALTY
            };
        }
    }
}

/// The model's state after given prompt prefixes, least recently used
/// dropped first. Snapshots share their tensors with the jobs that made
/// them, so keeping one costs only what the job later changes.
#[derive(Default)]
struct PrefixCache {
    entries: Vec<Snapshot>,
    clock: u64,
}

struct Snapshot {
    tokens: Vec<u32>,
    model: ModelWeights,
    used: u64,
}

impl PrefixCache {
    /// The longest remembered proper prefix of `prompt`, and its state.
    fn longest_prefix_of(&mut self, prompt: &[u32]) -> Option<(usize, ModelWeights)> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|s| s.tokens.len() < prompt.len() && prompt.starts_with(&s.tokens))
            .max_by_key(|s| s.tokens.len())?;
        best.used = self.clock;
        Some((best.tokens.len(), best.model.clone()))
    }

    fn insert(&mut self, tokens: &[u32], model: &ModelWeights) {
        self.clock += 1;
        if tokens.len() > CACHE_TOKENS {
            return;
        }
        if let Some(existing) = self.entries.iter_mut().find(|s| s.tokens == tokens) {
            existing.used = self.clock;
            return;
        }
        self.entries.push(Snapshot {
            tokens: tokens.to_vec(),
            model: model.clone(),
            used: self.clock,
        });
        while self.entries.iter().map(|s| s.tokens.len()).sum::<usize>() > CACHE_TOKENS {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].used)
                .expect("over budget means not empty");
            self.entries.swap_remove(oldest);
        }
    }
}
