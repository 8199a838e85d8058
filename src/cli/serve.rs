//! The web server, and a terminal chat with one arm to pilot a policy before a study.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::config::ServeSettings;
use collabllm::engine::registry::engine_name;
use collabllm::engine::{ChatMessage, ChatRequest, EngineEvent, Engines, Role};
use collabllm::protocol::LoadedProtocol;
use collabllm::protocol::{EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
use collabllm::web::{self, AppState};

use super::Context;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Protocol file that defines the arm.
    #[arg(long, env = "COLLABLLM_PROTOCOL", default_value = EXAMPLE_PROTOCOL_PATH)]
    protocol: PathBuf,
    /// Arm id to chat with.
    #[arg(long)]
    arm: String,
}

/// `serve`: the protocols given (or the embedded example) imported, their models started, then
/// the web server until it is stopped.
pub fn serve(ctx: &Context, serve: ServeSettings) -> Result<()> {
    let models_dir = &ctx.settings.models_dir;
    let protocols = if serve.protocols.is_empty() {
        let embedded = LoadedProtocol::from_text(
            Path::new(EXAMPLE_PROTOCOL_PATH),
            EXAMPLE_PROTOCOL.to_string(),
            models_dir,
        )
        .map_err(super::protocol_error)?;
        vec![embedded]
    } else {
        serve
            .protocols
            .iter()
            .map(|p| ctx.load_protocol(p))
            .collect::<Result<_>>()?
    };
    let pool = ctx.pool()?;
    {
        let mut conn = pool.get().context("cannot get a database connection")?;
        for p in &protocols {
            ctx.import(&mut conn, p)?;
        }
    }
    let _guard = ctx.runtime()?.enter();
    let engines = Engines::new();
    for p in &protocols {
        engines
            .load_protocol(&p.protocol, models_dir)
            .with_context(|| format!("cannot start the models of {}", p.source.display()))?;
    }
    let mut state = AppState::new(pool, engines, models_dir.clone())?;
    state.limits = std::sync::Arc::new(web::limits::Limits::new(
        serve.new_sessions_per_hour,
        serve.trust_forwarded_for,
    ));
    state.api_keys = std::sync::Arc::new(
        serve
            .api_keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(web::openai::key_sha256)
            .collect(),
    );
    actix_web::rt::System::new()
        .block_on(web::serve(state, serve.bind, serve.http_workers))
        .with_context(|| format!("the web server on {} failed", serve.bind))
}

/// `chat`: one conversation with an arm on the terminal, with each reply's timings.
pub fn chat(ctx: &Context, args: ChatArgs) -> Result<()> {
    let ChatArgs {
        protocol,
        arm: arm_id,
    } = args;
    let loaded = ctx.load_protocol(&protocol)?;
    let arm = loaded.protocol.arm(&arm_id).with_context(|| {
        let ids: Vec<&str> = loaded.protocol.arms.iter().map(|a| a.id.as_str()).collect();
        format!(
            "the protocol has no arm {arm_id:?}; its arms are: {}",
            ids.join(", ")
        )
    })?;
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    engines.load_protocol(&loaded.protocol, &ctx.settings.models_dir)?;
    let engine = engines.get(&engine_name(&arm.model, arm.lora.first()))?;
    let mut messages = vec![ChatMessage::new(Role::System, arm.system_prompt.clone())];
    let conversation = uuid::Uuid::new_v4().to_string();
    eprintln!("Chatting with arm {arm_id:?}. Type a message and press Enter; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        eprint!("you> ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(ChatMessage::new(Role::User, line.trim()));
        let mut request = ChatRequest::new(messages.clone(), arm.sampling.clone());
        request.conversation = Some(conversation.clone());
        let mut generation = engine.start(request)?;
        print!("assistant> ");
        let completion = runtime.block_on(async {
            while let Some(event) = generation.next().await {
                match event {
                    EngineEvent::Token(t) => {
                        print!("{t}");
                        std::io::stdout().flush().ok();
                    }
                    EngineEvent::Queued { .. } | EngineEvent::Started => {}
                    EngineEvent::Done(c) => return Ok(c),
                    EngineEvent::Error(e) => return Err(e),
                }
            }
            Err(collabllm::engine::EngineError::Stopped)
        })?;
        println!();
        eprintln!(
            "  [{} tokens, first token after {} ms, {} ms in all, {} prompt tokens computed of {}]",
            completion.generated_tokens,
            completion.ttft_ms,
            completion.total_ms,
            completion.prompt_tokens_processed,
            completion.prompt_tokens
        );
        messages.push(ChatMessage::new(Role::Assistant, completion.text));
    }
}
