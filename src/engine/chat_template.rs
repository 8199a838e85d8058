//! Chat templates: the model's own (from its GGUF metadata), applied by llama.cpp when it knows the
//! template and rendered with minijinja when it does not. A model without a template gets ChatML.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use minijinja::{context, Environment, Error, ErrorKind};

use super::{ChatMessage, EngineError};

pub enum ChatTemplate {
    /// A template llama.cpp recognises.
    Native(LlamaChatTemplate),
    /// A Jinja template llama.cpp does not know, with the model's BOS/EOS texts.
    Jinja {
        source: String,
        bos: String,
        eos: String,
    },
}

impl ChatTemplate {
    /// The model's template, checked once on a probe conversation.
    pub fn of_model(model: &LlamaModel) -> Result<Self, EngineError> {
        let native = match model.chat_template(None) {
            Ok(t) => t,
            Err(_) => LlamaChatTemplate::new("chatml")
                .map_err(|e| EngineError::Template(e.to_string()))?,
        };
        let probe = [
            LlamaChatMessage::new("system".into(), "s".into()),
            LlamaChatMessage::new("user".into(), "u".into()),
        ]
        .map(|m| m.expect("probe messages contain no NUL byte"));
        if model.apply_chat_template(&native, &probe, true).is_ok() {
            return Ok(ChatTemplate::Native(native));
        }
        let source = native
            .to_string()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let vocab = model.vocab();
        let text_of = |t| {
            vocab
                .text(t)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let template = ChatTemplate::Jinja {
            source,
            bos: text_of(vocab.bos()),
            eos: text_of(vocab.eos()),
        };
        template.render(model, &[ChatMessage::new(super::Role::User, "probe")])?;
        Ok(template)
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    pub fn render(
        &self,
        model: &LlamaModel,
        messages: &[ChatMessage],
    ) -> Result<String, EngineError> {
        match self {
            ChatTemplate::Native(t) => {
                let chat = messages
                    .iter()
                    .map(|m| LlamaChatMessage::new(m.role.as_str().into(), m.content.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        EngineError::InvalidRequest("a message contains a NUL character".into())
                    })?;
                model
                    .apply_chat_template(t, &chat, true)
                    .map_err(|e| EngineError::Template(e.to_string()))
            }
            ChatTemplate::Jinja { source, bos, eos } => render_jinja(source, bos, eos, messages)
                .map_err(|e| EngineError::Template(e.to_string())),
        }
    }
}

fn render_jinja(
    source: &str,
    bos: &str,
    eos: &str,
    messages: &[ChatMessage],
) -> Result<String, Error> {
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", source)?;
    env.get_template("chat")?.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
}

#[cfg(test)]
mod tests {
    use super::render_jinja;
    use crate::engine::{ChatMessage, Role};

    #[test]
    fn jinja_templates_render_messages_and_generation_prompt() {
        let source = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let out = render_jinja(
            source,
            "<s>",
            "</s>",
            &[
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "hi"),
            ],
        )
        .unwrap();
        assert_eq!(out, "<s><system>be brief</s><user>hi</s><assistant>");
    }
}
