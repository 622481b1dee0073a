//! The notary's own topic names, and MQTT topic-filter matching.
//!
//! Everything under [`OWN_PREFIX`] belongs to mqtt-notary: it is never
//! notarized, and only the notary publishes answers, checkpoints and
//! rejection events there.

/// Topics under this prefix belong to mqtt-notary and are never notarized.
pub const OWN_PREFIX: &str = "notary/";
/// Proof requests over MQTT (docs/PROTOCOL.md §Proofs over MQTT).
pub const PROOF_REQUEST_TOPIC: &str = "notary/proof/request";
/// Answers go to a topic under this prefix, named by the request.
pub const RESPONSE_PREFIX: &str = "notary/proof/response/";
/// Answers to requests that name no usable reply topic.
pub const ERROR_TOPIC: &str = "notary/proof/errors";
/// Rejection events, as JSON (docs/PROTOCOL.md §Rejections).
pub const REJECTIONS_TOPIC: &str = "notary/rejections";
/// The newest signed checkpoint, retained.
pub const CHECKPOINT_TOPIC: &str = "notary/checkpoint";

/// MQTT topic filter matching (`+` one level, `#` the rest). As in MQTT,
/// wildcards at the first level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks a topic filter as MQTT defines one.
pub fn valid_topic_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, l)| match *l {
            "#" => i == levels.len() - 1,
            "+" => true,
            l => !l.contains(['+', '#']),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_match_as_mqtt_does() {
        for (f, t, m) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "x/y", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("a/+/c", "a//c", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(topic_matches(f, t), m, "{f} {t}");
        }
        assert!(valid_topic_filter("a/+/#"));
        assert!(!valid_topic_filter("a/#/b"));
        assert!(!valid_topic_filter("a/b+"));
        assert!(!valid_topic_filter(""));
    }
}
