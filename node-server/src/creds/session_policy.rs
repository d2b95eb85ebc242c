//! A session policy (AssumeRole's `Policy`, a scope-down of the role's permissions): checked once,
//! where it is written (the config at load, a namespace annotation at resolve), and sent compact.

/// STS's limit on the plaintext of an inline session policy, in characters (AssumeRole's
/// `Policy`: "can't exceed 2,048 characters"). The packed size STS also checks (policy and
/// session tags compressed together, `PackedPolicyTooLarge`) cannot be computed here: STS refuses
/// it at the call, and the association's `session_tags = false` is the usual way out.
pub const MAX_POLICY_CHARS: usize = 2048;

/// The policy as sent to STS: `text` parsed as a JSON object and written back without
/// whitespace, so that the limit applies to what STS receives. Refused: not JSON, not an object,
/// a character STS does not take (outside U+0020..=U+00FF), or longer than [`MAX_POLICY_CHARS`].
pub fn compact(text: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("is not a JSON object (an IAM policy document)".into());
    }
    let compact = value.to_string();
    if let Some(c) = compact.chars().find(|c| !('\u{20}'..='\u{ff}').contains(c)) {
        return Err(format!("has the character {c:?}, which STS does not accept in a policy (U+0020..U+00FF only)"));
    }
    let chars = compact.chars().count();
    if chars > MAX_POLICY_CHARS {
        return Err(format!("is {chars} characters without whitespace, over STS's {MAX_POLICY_CHARS}"));
    }
    Ok(compact)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_sent_without_whitespace_and_refused_when_it_is_not_a_json_object() {
        let p = compact("{ \"Version\": \"2012-10-17\",\n  \"Statement\": [] }").unwrap();
        assert_eq!(p, r#"{"Version":"2012-10-17","Statement":[]}"#);
        assert!(compact("{").unwrap_err().contains("not JSON"));
        assert!(compact("[1]").unwrap_err().contains("not a JSON object"));
        assert!(compact(r#"{"a":"€"}"#).unwrap_err().contains("U+0020..U+00FF"));
    }

    #[test]
    fn the_limit_applies_to_the_compact_form() {
        let pad = |n: usize| format!("{{\"a\":\"{}\"}}", "x".repeat(n));
        assert_eq!(compact(&pad(MAX_POLICY_CHARS - 8)).unwrap().len(), MAX_POLICY_CHARS);
        assert!(compact(&pad(MAX_POLICY_CHARS - 7)).unwrap_err().contains("2049 characters"));
        let spaced = format!("{{ \"a\" : \"{}\" {} }}", "x".repeat(2000), " ".repeat(500));
        assert!(compact(&spaced).is_ok(), "whitespace does not count");
    }
}
