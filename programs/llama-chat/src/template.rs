//! Chat templates. The GGUF carries a Jinja template; this program recognises
//! ChatML templates (`<|im_start|>role\ncontent<|im_end|>\n`, ending with the
//! assistant header) and the default system turn such a template inserts when
//! the conversation has none. Other template families are refused with a
//! clear message (send a raw `prompt` for those).

/// Renders `turns` (role, content) with the template `tmpl`.
pub fn apply(tmpl: &str, turns: &[(&str, &str)], default_system: bool) -> Result<String, String> {
    if !tmpl.is_empty() && !tmpl.contains("<|im_start|>") {
        return Err(
            "unsupported chat template (only ChatML templates are recognised); send a raw `prompt`"
                .into(),
        );
    }
    let mut out = String::new();
    let has_system = turns.first().is_some_and(|(r, _)| *r == "system");
    if default_system
        && !has_system
        && let Some(sys) = default_system_text(tmpl)
    {
        out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    for (role, content) in turns {
        if !matches!(*role, "system" | "user" | "assistant" | "tool") {
            return Err(format!("unknown chat role `{role}`"));
        }
        out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    out.push_str("<|im_start|>assistant\n");
    Ok(out)
}

/// The literal default system message of a ChatML Jinja template, if it has one:
/// a string literal `'<|im_start|>system\n…<|im_end|>` emitted when the first
/// message is not a system message.
fn default_system_text(tmpl: &str) -> Option<String> {
    if !tmpl.contains("!= 'system'") && !tmpl.contains("!= \"system\"") {
        return None;
    }
    for marker in ["<|im_start|>system\\n", "<|im_start|>system\n"] {
        if let Some(start) = tmpl.find(marker) {
            let rest = &tmpl[start + marker.len()..];
            let end = rest.find("<|im_end|>")?;
            let text = &rest[..end];
            // A literal, not a Jinja expression such as {{ message['content'] }}.
            if text.contains("{{") || text.contains("{%") {
                return None;
            }
            return Some(text.replace("\\n", "\n"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_with_and_without_the_default_system_turn() {
        let bare = apply(SMOL, &[("user", "Hi")], false).expect("bare");
        assert_eq!(
            bare,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let full = apply(SMOL, &[("user", "Hi")], true).expect("full");
        assert!(full.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"));
        let own =
            apply(SMOL, &[("system", "Be brief."), ("user", "Hi")], true).expect("own system");
        assert!(own.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"));
    }

    #[test]
    fn refusals() {
        assert!(apply("{{ bos_token }}[INST]", &[("user", "x")], true).is_err());
        assert!(apply(SMOL, &[("wizard", "x")], true).is_err());
    }
}
